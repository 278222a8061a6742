// SPDX-License-Identifier: MIT OR Apache-2.0
//! GStreamer plugin `patchflow`: the `patchflowscore` element, which scores every video
//! frame with a PatchFlow anomaly model, draws the anomaly heatmap onto the frame and
//! reports each score as a bus message and, optionally, over MQTT.
//!
//! Build the plugin with `cargo build --release -p gst-plugin-patchflow`, then point
//! GStreamer at the directory that contains `libgstpatchflow.so`:
//!
//! ```text
//! GST_PLUGIN_PATH=target/release gst-inspect-1.0 patchflowscore
//! ```

use gst::glib;

mod patchflowscore;

pub use patchflowscore::Colormap;

fn plugin_init(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    patchflowscore::register(plugin)
}

gst::plugin_define!(
    patchflow,
    env!("CARGO_PKG_DESCRIPTION"),
    plugin_init,
    concat!(env!("CARGO_PKG_VERSION"), "-", env!("COMMIT_ID")),
    "MIT/X11",
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_REPOSITORY"),
    env!("BUILD_REL_DATE")
);
