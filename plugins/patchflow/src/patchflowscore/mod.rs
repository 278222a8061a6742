// SPDX-License-Identifier: MIT OR Apache-2.0
//! `patchflowscore`: an in-place video filter that scores each frame with a PatchFlow
//! anomaly model.
//!
//! For every frame the element
//! - scores the frame with the model set by the `model` property;
//! - blends the anomaly heatmap onto the frame when `overlay` is true;
//! - posts an element message named `patchflow` on the bus (fields listed below);
//! - publishes the same result as JSON over MQTT when `mqtt-url` is set. Publishing never
//!   waits for the broker: while it is unreachable, messages queue up and, once the queue
//!   is full, are dropped.
//!
//! Timestamps, durations and offsets pass through unchanged.
//!
//! Fields of the `patchflow` message:
//! - `score` (f64): raw image score of the model;
//! - `normalized-score` (f64): the score normalised to 0..1, where 0.5 is the model's
//!   threshold;
//! - `log-score` (f64): the maximum over patches of `0.5 mean z^2`, which keeps apart
//!   frames whose raw scores tie at 0 or -1 in float32;
//! - `is-anomalous` (bool): whether the score that `threshold-domain` selects is above
//!   `threshold`;
//! - `label` (string): `"anomalous"` or `"normal"`;
//! - `threshold` (f64): the threshold in force when the frame was scored;
//! - `threshold-domain` (string): `normalized`, `raw` or `log`;
//! - `pts` (u64): presentation timestamp in nanoseconds, `GST_CLOCK_TIME_NONE` when the
//!   buffer has none;
//! - `frame` (u64): number of the frame, counted from 0 since the element started;
//! - `inference-ms` (f64): time spent scoring the frame, in milliseconds.
//!
//! `GST_DEBUG=patchflowscore:6` logs one line per frame with the score and the inference
//! and overlay times.
//!
//! Example, showing the heatmap on a test pattern:
//!
//! ```text
//! gst-launch-1.0 videotestsrc num-buffers=30 ! videoconvert ! \
//!     patchflowscore model=model.safetensors ! videoconvert ! autovideosink
//! ```
//!
//! Add `-m` to `gst-launch-1.0` to print the per-frame messages, and
//! `mqtt-url=mqtt://127.0.0.1:1883` to publish them to a local broker.

use gst::glib;
use gst::prelude::*;

mod imp;

glib::wrapper! {
    pub struct PatchflowScore(ObjectSubclass<imp::PatchflowScore>)
        @extends gst_video::VideoFilter, gst_base::BaseTransform, gst::Element, gst::Object;
}

/// Colour scale of the heatmap that `patchflowscore` draws onto frames.
#[derive(Debug, Default, Eq, PartialEq, Ord, PartialOrd, Hash, Clone, Copy, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstPatchflowColormap")]
pub enum Colormap {
    #[default]
    #[enum_value(
        name = "Jet: blue (normal) through green and yellow to red (anomalous)",
        nick = "jet"
    )]
    Jet = 0,
    #[enum_value(name = "Hot: black through red and yellow to white", nick = "hot")]
    Hot = 1,
}

/// Rule by which `patchflowscore` picks the frames it scores.
#[derive(Debug, Default, Eq, PartialEq, Ord, PartialOrd, Hash, Clone, Copy, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstPatchflowScoringMode")]
pub enum ScoringMode {
    #[default]
    #[enum_value(
        name = "Interval: score every Nth frame on the streaming thread (scoring-interval)",
        nick = "interval"
    )]
    Interval = 0,
    #[enum_value(
        name = "Newest: score on a worker thread, always the newest frame; never blocks the stream",
        nick = "newest"
    )]
    Newest = 1,
}

/// Score that `patchflowscore` compares with its `threshold` property.
#[derive(Debug, Default, Eq, PartialEq, Ord, PartialOrd, Hash, Clone, Copy, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstPatchflowScoreDomain")]
pub enum ScoreDomain {
    #[default]
    #[enum_value(
        name = "Normalized: 0 to 1, the model's own threshold is 0.5",
        nick = "normalized"
    )]
    Normalized = 0,
    #[enum_value(name = "Raw: the anomaly map's maximum, -1 to 0", nick = "raw")]
    Raw = 1,
    #[enum_value(
        name = "Log: the maximum over patches of 0.5 mean z^2, 0 and up",
        nick = "log"
    )]
    Log = 2,
}

impl From<ScoreDomain> for patchflow::scoring::ScoreDomain {
    fn from(domain: ScoreDomain) -> Self {
        match domain {
            ScoreDomain::Normalized => patchflow::scoring::ScoreDomain::Normalized,
            ScoreDomain::Raw => patchflow::scoring::ScoreDomain::Raw,
            ScoreDomain::Log => patchflow::scoring::ScoreDomain::Log,
        }
    }
}

impl From<Colormap> for patchflow::imageops::Colormap {
    fn from(colormap: Colormap) -> Self {
        match colormap {
            Colormap::Jet => patchflow::imageops::Colormap::Jet,
            Colormap::Hot => patchflow::imageops::Colormap::Hot,
        }
    }
}

/// Registers `patchflowscore` with `plugin`.
pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    gst::Element::register(
        Some(plugin),
        "patchflowscore",
        gst::Rank::NONE,
        PatchflowScore::static_type(),
    )
}
