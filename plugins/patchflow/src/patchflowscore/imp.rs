// SPDX-License-Identifier: MIT OR Apache-2.0
//! Implementation of `patchflowscore`: properties, the lifetime of the model and the MQTT
//! publisher (created in `start()`, dropped in `stop()`) and the per-frame work.
//!
//! The model math lives in the `patchflow` library. This file only moves frames in and
//! results out.

use std::path::PathBuf;
use std::sync::{Arc, Condvar, LazyLock, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_base::subclass::prelude::*;
use gst_video::prelude::*;
use gst_video::subclass::prelude::*;
use patchflow::imageops::{HeatMap, PackedFrame, PixelLayout, blend_heatmap};
use patchflow::mqtt::{MqttSettings, Publisher, TlsFiles, frame_message};
use patchflow::scoring::{FrameScore, Scorer, Threshold};

use super::{Colormap, ScoreDomain, ScoringMode};

static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "patchflowscore",
        gst::DebugColorFlags::empty(),
        Some("PatchFlow anomaly scoring"),
    )
});

const DEFAULT_DEVICE: &str = "cpu";
const DEFAULT_THRESHOLD: f64 = 0.5;
const DEFAULT_THRESHOLD_DOMAIN: ScoreDomain = ScoreDomain::Normalized;
/// Upper bound of `threshold`, far above any log score that float32 maps can tell apart.
const MAX_THRESHOLD: f64 = 1e9;
const DEFAULT_OVERLAY: bool = true;
const DEFAULT_ALPHA: f64 = 0.5;
const DEFAULT_COLORMAP: Colormap = Colormap::Jet;
const DEFAULT_MQTT_URL: &str = "";
const DEFAULT_MQTT_QOS: u32 = 0;
const DEFAULT_SCORING_INTERVAL: u32 = 1;
/// Upper bound of `scoring-interval`; beyond it the reused heatmap would be meaningless.
const MAX_SCORING_INTERVAL: u32 = 1000;

/// Time that `stop()` gives the MQTT publisher to send what is queued and disconnect.
const MQTT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(1);

/// Dropped MQTT messages are logged at warning level for the first one and then every
/// this many, so that a long broker outage does not flood the log.
const MQTT_DROP_LOG_INTERVAL: u64 = 100;

/// A broker without connection for this long is reported once as a bus warning, which
/// applications and `patchflow run` show; the video keeps flowing either way.
const MQTT_OUTAGE_WARNING: Duration = Duration::from_secs(3);

/// Packed 8-bit RGB formats, which the scorer reads and the overlay writes in place.
const FORMATS: [gst_video::VideoFormat; 10] = [
    gst_video::VideoFormat::Rgb,
    gst_video::VideoFormat::Bgr,
    gst_video::VideoFormat::Rgbx,
    gst_video::VideoFormat::Bgrx,
    gst_video::VideoFormat::Xrgb,
    gst_video::VideoFormat::Xbgr,
    gst_video::VideoFormat::Rgba,
    gst_video::VideoFormat::Bgra,
    gst_video::VideoFormat::Argb,
    gst_video::VideoFormat::Abgr,
];

#[derive(Debug, Clone)]
struct Settings {
    model: Option<PathBuf>,
    device: String,
    threshold: f64,
    /// Whether `threshold` was set; if not, the model's own threshold on the scale of
    /// `threshold_domain` applies.
    threshold_set: bool,
    threshold_domain: ScoreDomain,
    overlay: bool,
    alpha: f64,
    colormap: Colormap,
    mqtt_url: String,
    /// `None` means `patchflow/<element name>/score`.
    mqtt_topic: Option<String>,
    mqtt_qos: u32,
    /// CA file and client certificate for an `mqtts://` `mqtt_url`.
    mqtt_tls: TlsFiles,
    scoring_interval: u32,
    scoring_mode: ScoringMode,
    /// CPU threads of the process's inference pool, 0 for the default.
    threads: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            model: None,
            device: DEFAULT_DEVICE.to_owned(),
            threshold: DEFAULT_THRESHOLD,
            threshold_set: false,
            threshold_domain: DEFAULT_THRESHOLD_DOMAIN,
            overlay: DEFAULT_OVERLAY,
            alpha: DEFAULT_ALPHA,
            colormap: DEFAULT_COLORMAP,
            mqtt_url: DEFAULT_MQTT_URL.to_owned(),
            mqtt_topic: None,
            mqtt_qos: DEFAULT_MQTT_QOS,
            mqtt_tls: TlsFiles::default(),
            scoring_interval: DEFAULT_SCORING_INTERVAL,
            scoring_mode: ScoringMode::Interval,
            threads: 0,
        }
    }
}

/// The settings that can change while playing, copied once per frame so that the
/// settings lock is never held during inference.
#[derive(Debug, Clone, Copy)]
struct FrameSettings {
    threshold: f64,
    threshold_set: bool,
    threshold_domain: ScoreDomain,
    overlay: bool,
    alpha: f64,
    colormap: Colormap,
    scoring_interval: u32,
}

impl Settings {
    /// Checks that a `threshold` that was set lies in the range of `threshold-domain`.
    fn check_threshold(&self) -> Result<(), String> {
        if !self.threshold_set {
            return Ok(());
        }
        Threshold::new(self.threshold as f32, self.threshold_domain.into()).map(|_| ())
    }
}

impl FrameSettings {
    /// Returns the decision rule for this frame: the `threshold` property when it was set
    /// and lies in the scale's range, otherwise the model's own threshold on that scale.
    /// An out-of-range value was already reported when it was set.
    fn decision(&self, scorer: &Scorer) -> Threshold {
        let domain = self.threshold_domain.into();
        let own = Threshold {
            value: scorer.meta().stats.threshold(domain),
            domain,
        };
        if !self.threshold_set {
            return own;
        }
        Threshold::new(self.threshold as f32, domain).unwrap_or(own)
    }
}

impl From<&Settings> for FrameSettings {
    fn from(settings: &Settings) -> Self {
        FrameSettings {
            threshold: settings.threshold,
            threshold_set: settings.threshold_set,
            threshold_domain: settings.threshold_domain,
            overlay: settings.overlay,
            alpha: settings.alpha,
            colormap: settings.colormap,
            scoring_interval: settings.scoring_interval,
        }
    }
}

/// The loaded model and the frame counters, from `start()` to `stop()`.
struct State {
    /// Shared with every element of the process that uses the same file and device.
    scorer: Arc<Scorer>,
    /// Number of frames seen since `start()`, which is also the next frame's number.
    frame_count: u64,
    /// Frames passed on without scoring because of `scoring-interval`.
    frames_skipped: u64,
    /// Heatmap of the last scored frame, drawn on the frames in between.
    last_heat: Option<HeatMap>,
    /// The scoring thread of `scoring-mode=newest`.
    worker: Option<Worker>,
}

/// A frame copied for the scoring thread.
struct Job {
    data: Vec<u8>,
    width: usize,
    height: usize,
    stride: usize,
    layout: PixelLayout,
    frame: u64,
    pts: Option<gst::ClockTime>,
    settings: FrameSettings,
}

/// State shared by the streaming thread and the scoring thread in `scoring-mode=newest`.
#[derive(Default)]
struct Mailbox {
    /// The newest frame not yet taken by the scoring thread.
    pending: Option<Job>,
    /// Heatmap of the last scored frame.
    last_heat: Option<HeatMap>,
    /// Whether the scoring thread is scoring a frame it took.
    busy: bool,
    stop: bool,
}

/// Mailbox of `scoring-mode=newest`, with the condition variable that both threads wait on.
type SharedMailbox = Arc<(Mutex<Mailbox>, Condvar)>;

/// Waits until the scoring thread has scored the frame left for it and the one it was
/// scoring, or has stopped.
fn drain(mailbox: &SharedMailbox) {
    let (lock, wake) = &**mailbox;
    let mut mailbox = lock.lock().unwrap();
    while (mailbox.pending.is_some() || mailbox.busy) && !mailbox.stop {
        mailbox = wake.wait(mailbox).unwrap();
    }
}

/// Clears [`Mailbox::busy`] when dropped, at the end of each frame the scoring thread took.
struct Finished<'a>(&'a SharedMailbox);

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        let (lock, wake) = &**self.0;
        if let Ok(mut mailbox) = lock.lock() {
            mailbox.busy = false;
        }
        wake.notify_all();
    }
}

/// The scoring thread of `scoring-mode=newest` and its mailbox.
struct Worker {
    mailbox: SharedMailbox,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Leaves `job` for the scoring thread, replacing a frame it has not taken yet.
    /// Returns whether a frame was replaced, and the last heatmap.
    fn submit(&self, job: Job) -> (bool, Option<HeatMap>) {
        let (lock, wake) = &*self.mailbox;
        let mut mailbox = lock.lock().unwrap();
        let replaced = mailbox.pending.replace(job).is_some();
        // Wakes every waiter, because a thread that waits for the mailbox to drain shares
        // the condition variable.
        wake.notify_all();
        (replaced, mailbox.last_heat.clone())
    }

    /// Stops the thread after the frame it is scoring, if any.
    fn stop(mut self) {
        let (lock, wake) = &*self.mailbox;
        lock.lock().unwrap().stop = true;
        wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The running MQTT publisher, from `start()` to `stop()`.
struct MqttOutput {
    publisher: Publisher,
    topic: String,
    /// Element name, sent as `source` in every message.
    source: String,
    /// Messages that `Publisher::publish` rejected, counted here for rate-limited logging.
    dropped: u64,
    /// Broker URL, for the unreachable-broker warning.
    url: String,
    /// Since when the publisher has had no connection (counted from `start()`).
    disconnected_since: Option<Instant>,
    /// Whether the current outage was already reported as a bus warning.
    outage_reported: bool,
}

/// Result of scoring one frame, as posted on the bus and sent over MQTT.
struct FrameReport {
    frame: u64,
    pts: Option<gst::ClockTime>,
    scores: FrameScore,
    threshold: Threshold,
    is_anomalous: bool,
    inference_ms: f64,
}

impl FrameReport {
    fn label(&self) -> &'static str {
        if self.is_anomalous {
            "anomalous"
        } else {
            "normal"
        }
    }
}

#[derive(Default)]
pub struct PatchflowScore {
    settings: Mutex<Settings>,
    /// Locked for the whole of a frame's inference, so `stop()` waits for a running frame.
    state: Mutex<Option<State>>,
    /// Kept apart from `state` so that reading `mqtt-stats` never waits for inference.
    mqtt: Mutex<Option<MqttOutput>>,
}

#[glib::object_subclass]
impl ObjectSubclass for PatchflowScore {
    const NAME: &'static str = "GstPatchflowScore";
    type Type = super::PatchflowScore;
    type ParentType = gst_video::VideoFilter;
}

impl ObjectImpl for PatchflowScore {
    fn properties() -> &'static [glib::ParamSpec] {
        static PROPERTIES: LazyLock<Vec<glib::ParamSpec>> = LazyLock::new(|| {
            vec![
                glib::ParamSpecString::builder("model")
                    .nick("Model file")
                    .blurb(
                        "Path of the PatchFlow model file (.safetensors) to score frames with. \
                         Required. Read when the element starts.",
                    )
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("device")
                    .nick("Device")
                    .blurb(
                        "Device that runs the model: cpu, or cuda:N for GPU N (cuda means \
                         cuda:0) when the plugin is built with the cuda feature. Read when the \
                         element starts.",
                    )
                    .default_value(Some(DEFAULT_DEVICE))
                    .mutable_ready()
                    .build(),
                glib::ParamSpecDouble::builder("threshold")
                    .nick("Threshold")
                    .blurb(
                        "Score above which a frame is anomalous, on the scale that \
                         threshold-domain selects: 0 to 1 for normalized (0.5 is the threshold \
                         that the model was calibrated with), -1 to 0 for raw, 0 and up for \
                         log. When not set, the model's own threshold on that scale applies. \
                         A value outside the scale's range stops the element from starting; \
                         set while playing, it is reported as a warning and the model's own \
                         threshold is used until it is fixed.",
                    )
                    .minimum(-1.0)
                    .maximum(MAX_THRESHOLD)
                    .default_value(DEFAULT_THRESHOLD)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecEnum::builder_with_default(
                    "threshold-domain",
                    DEFAULT_THRESHOLD_DOMAIN,
                )
                .nick("Threshold domain")
                .blurb(
                    "Score that threshold applies to: normalized (anomalib's normalised score), \
                     raw (the anomaly map's maximum, which saturates at 0 and -1 in float32) \
                     or log (the maximum over patches of 0.5 mean z^2, which does not).",
                )
                .mutable_playing()
                .build(),
                glib::ParamSpecUInt::builder("scoring-interval")
                    .nick("Scoring interval")
                    .blurb(
                        "Score every Nth frame (1 scores every frame). The frames in between \
                         pass through with the last heatmap drawn on them and without a bus or \
                         MQTT message, so that a source faster than the model is not slowed \
                         down as much.",
                    )
                    .minimum(1)
                    .maximum(MAX_SCORING_INTERVAL)
                    .default_value(DEFAULT_SCORING_INTERVAL)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecEnum::builder_with_default("scoring-mode", ScoringMode::Interval)
                    .nick("Scoring mode")
                    .blurb(
                        "interval scores every Nth frame (scoring-interval) on the streaming \
                         thread, so a scored frame waits for the model. newest scores on a \
                         worker thread: each frame is copied to it and passes on at once with \
                         the last heatmap, and the worker always takes the newest frame, so a \
                         live source is never slowed down. Bus and MQTT messages carry the \
                         number and timestamp of the frame that was scored. Meant for live \
                         sources: a file played faster than real time skips most frames. At \
                         end of stream, the frame still waiting is scored before the \
                         end-of-stream event passes on.",
                    )
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("threads")
                    .nick("CPU threads")
                    .blurb(
                        "CPU threads that inference runs on, 0 for RAYON_NUM_THREADS when set, \
                         else one per logical CPU. The pool is shared by the whole process and \
                         its size is fixed when the first model runs, so a different value on \
                         a later element is reported as a warning and ignored.",
                    )
                    .maximum(1024)
                    .default_value(0)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt64::builder("frames-skipped")
                    .nick("Frames skipped")
                    .blurb(
                        "Frames passed on without scoring because of scoring-interval, or \
                         replaced by a newer frame before the worker took them in \
                         scoring-mode=newest, since the element started.",
                    )
                    .read_only()
                    .build(),
                glib::ParamSpecBoolean::builder("overlay")
                    .nick("Overlay")
                    .blurb(
                        "Whether to blend the anomaly heatmap onto the frame. When false, \
                         frames pass through unchanged.",
                    )
                    .default_value(DEFAULT_OVERLAY)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecDouble::builder("alpha")
                    .nick("Alpha")
                    .blurb(
                        "Opacity of the heatmap overlay, from 0 (invisible) to 1 (heatmap \
                         only).",
                    )
                    .minimum(0.0)
                    .maximum(1.0)
                    .default_value(DEFAULT_ALPHA)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecEnum::builder_with_default("colormap", DEFAULT_COLORMAP)
                    .nick("Colormap")
                    .blurb("Colour scale of the heatmap overlay.")
                    .mutable_playing()
                    .build(),
                glib::ParamSpecString::builder("mqtt-url")
                    .nick("MQTT broker URL")
                    .blurb(
                        "Broker to publish per-frame scores to, as mqtt://HOST[:PORT] (port \
                         1883 by default) or mqtts://HOST[:PORT] for TLS (port 8883 by \
                         default). Empty disables MQTT. An unreachable broker does not stop \
                         the video: messages queue up and are dropped once the queue is \
                         full. Read when the element starts.",
                    )
                    .default_value(Some(DEFAULT_MQTT_URL))
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("mqtt-topic")
                    .nick("MQTT topic")
                    .blurb(
                        "Topic that per-frame scores are published to. Unset or empty means \
                         patchflow/<element name>/score. Read when the element starts.",
                    )
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("mqtt-qos")
                    .nick("MQTT QoS")
                    .blurb("MQTT quality of service of every message: 0, 1 or 2.")
                    .minimum(0)
                    .maximum(2)
                    .default_value(DEFAULT_MQTT_QOS)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("mqtt-ca-file")
                    .nick("MQTT CA file")
                    .blurb(
                        "PEM file of the CA certificates that the broker's certificate must \
                         chain to, for an mqtts:// mqtt-url. When set, only these CAs are \
                         trusted. Unset or empty uses the system trust store. Read when the \
                         element starts.",
                    )
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("mqtt-client-cert-file")
                    .nick("MQTT client certificate file")
                    .blurb(
                        "PEM client certificate, followed by any intermediate CAs, for \
                         brokers that require client authentication over mqtts://. Needs \
                         mqtt-client-key-file. Read when the element starts.",
                    )
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("mqtt-client-key-file")
                    .nick("MQTT client key file")
                    .blurb(
                        "Unencrypted PKCS#8 PEM private key (BEGIN PRIVATE KEY) of \
                         mqtt-client-cert-file. Read when the element starts.",
                    )
                    .mutable_ready()
                    .build(),
                glib::ParamSpecBoxed::builder::<gst::Structure>("mqtt-stats")
                    .nick("MQTT statistics")
                    .blurb(
                        "Counters of the MQTT publisher since the element started: published, \
                         dropped and queued messages, whether the broker is connected, and \
                         reconnect attempts. All zero while MQTT is off or the element is \
                         stopped.",
                    )
                    .read_only()
                    .build(),
            ]
        });

        PROPERTIES.as_ref()
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        let mut settings = self.settings.lock().unwrap();
        match pspec.name() {
            "model" => {
                let model = value
                    .get::<Option<String>>()
                    .expect("type checked upstream")
                    .filter(|path| !path.is_empty())
                    .map(PathBuf::from);
                gst::info!(
                    CAT,
                    imp = self,
                    "Changing model from {:?} to {:?}",
                    settings.model,
                    model
                );
                settings.model = model;
            }
            "device" => {
                let device = value
                    .get::<Option<String>>()
                    .expect("type checked upstream")
                    .unwrap_or_else(|| DEFAULT_DEVICE.to_owned());
                gst::info!(
                    CAT,
                    imp = self,
                    "Changing device from {} to {}",
                    settings.device,
                    device
                );
                settings.device = device;
            }
            "scoring-interval" => {
                let interval = value.get().expect("type checked upstream");
                gst::info!(
                    CAT,
                    imp = self,
                    "Changing scoring-interval from {} to {}",
                    settings.scoring_interval,
                    interval
                );
                settings.scoring_interval = interval;
            }
            "threshold" => {
                let threshold = value.get().expect("type checked upstream");
                gst::info!(
                    CAT,
                    imp = self,
                    "Changing threshold from {} to {}",
                    settings.threshold,
                    threshold
                );
                settings.threshold = threshold;
                settings.threshold_set = true;
                self.check_decision(&settings);
            }
            "threads" => {
                settings.threads = value.get().expect("type checked upstream");
            }
            "scoring-mode" => {
                let mode = value.get().expect("type checked upstream");
                gst::info!(
                    CAT,
                    imp = self,
                    "Changing scoring-mode from {:?} to {:?}",
                    settings.scoring_mode,
                    mode
                );
                settings.scoring_mode = mode;
            }
            "threshold-domain" => {
                let domain = value.get().expect("type checked upstream");
                gst::info!(
                    CAT,
                    imp = self,
                    "Changing threshold-domain from {:?} to {:?}",
                    settings.threshold_domain,
                    domain
                );
                settings.threshold_domain = domain;
                self.check_decision(&settings);
            }
            "overlay" => {
                let overlay = value.get().expect("type checked upstream");
                gst::info!(
                    CAT,
                    imp = self,
                    "Changing overlay from {} to {}",
                    settings.overlay,
                    overlay
                );
                settings.overlay = overlay;
            }
            "alpha" => {
                let alpha = value.get().expect("type checked upstream");
                gst::info!(
                    CAT,
                    imp = self,
                    "Changing alpha from {} to {}",
                    settings.alpha,
                    alpha
                );
                settings.alpha = alpha;
            }
            "colormap" => {
                let colormap = value.get().expect("type checked upstream");
                gst::info!(
                    CAT,
                    imp = self,
                    "Changing colormap from {:?} to {:?}",
                    settings.colormap,
                    colormap
                );
                settings.colormap = colormap;
            }
            "mqtt-url" => {
                let url = value
                    .get::<Option<String>>()
                    .expect("type checked upstream")
                    .unwrap_or_default();
                gst::info!(
                    CAT,
                    imp = self,
                    "Changing mqtt-url from {:?} to {:?}",
                    settings.mqtt_url,
                    url
                );
                settings.mqtt_url = url;
            }
            "mqtt-topic" => {
                let topic = value
                    .get::<Option<String>>()
                    .expect("type checked upstream")
                    .filter(|topic| !topic.is_empty());
                gst::info!(
                    CAT,
                    imp = self,
                    "Changing mqtt-topic from {:?} to {:?}",
                    settings.mqtt_topic,
                    topic
                );
                settings.mqtt_topic = topic;
            }
            "mqtt-ca-file" | "mqtt-client-cert-file" | "mqtt-client-key-file" => {
                let path = value
                    .get::<Option<String>>()
                    .expect("type checked upstream")
                    .filter(|path| !path.is_empty())
                    .map(PathBuf::from);
                let tls = &mut settings.mqtt_tls;
                let field = match pspec.name() {
                    "mqtt-ca-file" => &mut tls.ca_file,
                    "mqtt-client-cert-file" => &mut tls.client_cert_file,
                    _ => &mut tls.client_key_file,
                };
                gst::info!(
                    CAT,
                    imp = self,
                    "Changing {} from {:?} to {:?}",
                    pspec.name(),
                    field,
                    path
                );
                *field = path;
            }
            "mqtt-qos" => {
                let qos = value.get().expect("type checked upstream");
                gst::info!(
                    CAT,
                    imp = self,
                    "Changing mqtt-qos from {} to {}",
                    settings.mqtt_qos,
                    qos
                );
                settings.mqtt_qos = qos;
            }
            _ => unimplemented!(),
        }
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        let settings = self.settings.lock().unwrap();
        match pspec.name() {
            "model" => settings
                .model
                .as_ref()
                .map(|path| path.to_string_lossy().into_owned())
                .to_value(),
            "device" => settings.device.to_value(),
            "threshold" => settings.threshold.to_value(),
            "threshold-domain" => settings.threshold_domain.to_value(),
            "scoring-interval" => settings.scoring_interval.to_value(),
            "scoring-mode" => settings.scoring_mode.to_value(),
            "threads" => settings.threads.to_value(),
            "frames-skipped" => {
                drop(settings);
                let state = self.state.lock().unwrap();
                state.as_ref().map_or(0u64, |s| s.frames_skipped).to_value()
            }
            "overlay" => settings.overlay.to_value(),
            "alpha" => settings.alpha.to_value(),
            "colormap" => settings.colormap.to_value(),
            "mqtt-url" => settings.mqtt_url.to_value(),
            "mqtt-topic" => self.mqtt_topic(&settings).to_value(),
            "mqtt-qos" => settings.mqtt_qos.to_value(),
            "mqtt-ca-file" => path_value(settings.mqtt_tls.ca_file.as_ref()),
            "mqtt-client-cert-file" => path_value(settings.mqtt_tls.client_cert_file.as_ref()),
            "mqtt-client-key-file" => path_value(settings.mqtt_tls.client_key_file.as_ref()),
            "mqtt-stats" => {
                drop(settings);
                self.mqtt_stats().to_value()
            }
            _ => unimplemented!(),
        }
    }
}

impl GstObjectImpl for PatchflowScore {}

impl ElementImpl for PatchflowScore {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static ELEMENT_METADATA: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            gst::subclass::ElementMetadata::new(
                "PatchFlow anomaly scorer",
                "Filter/Analyzer/Video",
                "Scores each frame with a PatchFlow anomaly model, blends the anomaly \
                 heatmap onto the frame and reports the score on the bus and over MQTT",
                "The patchflow developers",
            )
        });

        Some(&*ELEMENT_METADATA)
    }

    fn pad_templates() -> &'static [gst::PadTemplate] {
        static PAD_TEMPLATES: LazyLock<Vec<gst::PadTemplate>> = LazyLock::new(|| {
            let caps = gst_video::VideoCapsBuilder::new()
                .format_list(FORMATS)
                .build();
            let src_pad_template = gst::PadTemplate::new(
                "src",
                gst::PadDirection::Src,
                gst::PadPresence::Always,
                &caps,
            )
            .unwrap();
            let sink_pad_template = gst::PadTemplate::new(
                "sink",
                gst::PadDirection::Sink,
                gst::PadPresence::Always,
                &caps,
            )
            .unwrap();

            vec![src_pad_template, sink_pad_template]
        });

        PAD_TEMPLATES.as_ref()
    }
}

impl BaseTransformImpl for PatchflowScore {
    // The overlay writes into the input buffer, and frames with identical caps on both
    // sides must still be scored, so the transform is never skipped.
    const MODE: gst_base::subclass::BaseTransformMode =
        gst_base::subclass::BaseTransformMode::AlwaysInPlace;
    const PASSTHROUGH_ON_SAME_CAPS: bool = false;
    const TRANSFORM_IP_ON_PASSTHROUGH: bool = false;

    fn sink_event(&self, event: gst::Event) -> bool {
        if event.type_() == gst::EventType::Eos {
            self.drain_worker();
        }
        self.parent_sink_event(event)
    }

    fn start(&self) -> Result<(), gst::ErrorMessage> {
        let settings = self.settings.lock().unwrap().clone();
        if let Err(err) = settings.check_threshold() {
            return Err(gst::error_msg!(
                gst::LibraryError::Settings,
                (
                    "Invalid threshold: {}; set threshold within the range of threshold-domain",
                    err
                )
            ));
        }

        match patchflow::device::set_cpu_threads(settings.threads as usize) {
            Ok(threads) => gst::info!(CAT, imp = self, "Scoring on {} CPU threads", threads),
            Err(err) => {
                gst::element_imp_warning!(
                    self,
                    gst::LibraryError::Settings,
                    ("threads={} ignored: {}", settings.threads, err)
                );
            }
        }
        let scorer = self.load_model(&settings)?;
        let mqtt = if settings.mqtt_url.is_empty() {
            None
        } else {
            Some(self.start_mqtt(&settings)?)
        };

        let worker = match settings.scoring_mode {
            ScoringMode::Interval => None,
            ScoringMode::Newest => Some(self.start_worker(scorer.clone())?),
        };
        *self.state.lock().unwrap() = Some(State {
            scorer,
            frame_count: 0,
            frames_skipped: 0,
            last_heat: None,
            worker,
        });
        *self.mqtt.lock().unwrap() = mqtt;
        Ok(())
    }

    fn stop(&self) -> Result<(), gst::ErrorMessage> {
        // Shutting the publisher down can take up to MQTT_SHUTDOWN_TIMEOUT, so it happens
        // outside the lock.
        let mqtt = self.mqtt.lock().unwrap().take();
        if let Some(mqtt) = mqtt {
            let stats = mqtt.publisher.stats();
            gst::info!(
                CAT,
                imp = self,
                "Stopping MQTT publisher: {} messages published, {} dropped, {} still queued",
                stats.published,
                stats.dropped,
                stats.queued
            );
            mqtt.publisher.shutdown(MQTT_SHUTDOWN_TIMEOUT);
        }

        let state = self.state.lock().unwrap().take();
        if let Some(mut state) = state {
            // Joined outside the state lock: the worker does not take it, but a frame
            // it is scoring can take up to one inference.
            if let Some(worker) = state.worker.take() {
                worker.stop();
            }
            gst::info!(
                CAT,
                imp = self,
                "Stopped after {} frames",
                state.frame_count
            );
        }
        Ok(())
    }
}

impl VideoFilterImpl for PatchflowScore {
    fn transform_frame_ip(
        &self,
        frame: &mut gst_video::VideoFrameRef<&mut gst::BufferRef>,
    ) -> Result<gst::FlowSuccess, gst::FlowError> {
        let settings = FrameSettings::from(&*self.settings.lock().unwrap());

        let Some(layout) = PixelLayout::from_video_format(frame.format()) else {
            gst::element_imp_error!(
                self,
                gst::CoreError::Negotiation,
                ("Unsupported video format {}", frame.format())
            );
            return Err(gst::FlowError::NotNegotiated);
        };
        let width = frame.width() as usize;
        let height = frame.height() as usize;
        let Ok(stride) = usize::try_from(frame.plane_stride()[0]) else {
            gst::element_imp_error!(
                self,
                gst::StreamError::Format,
                (
                    "Unsupported negative row stride {}",
                    frame.plane_stride()[0]
                )
            );
            return Err(gst::FlowError::Error);
        };
        let pts = frame.buffer().pts();

        let mut state_guard = self.state.lock().unwrap();
        let Some(state) = state_guard.as_mut() else {
            gst::debug!(CAT, imp = self, "Dropping frame: the element is stopped");
            return Err(gst::FlowError::Flushing);
        };
        let frame_number = state.frame_count;
        state.frame_count += 1;

        if let Some(worker) = &state.worker {
            let data = self.plane_data(frame, frame_number)?;
            let job = Job {
                data: data.to_vec(),
                width,
                height,
                stride,
                layout,
                frame: frame_number,
                pts,
                settings,
            };
            let (replaced, heat) = worker.submit(job);
            if replaced {
                state.frames_skipped += 1;
            }
            drop(state_guard);
            if let Some(heat) = heat {
                self.draw_overlay(
                    frame,
                    &settings,
                    &heat,
                    frame_number,
                    (width, height, stride),
                    layout,
                )?;
            }
            return Ok(gst::FlowSuccess::Ok);
        }

        let interval = u64::from(settings.scoring_interval.max(1));
        if frame_number % interval != 0
            && let Some(heat) = state.last_heat.clone()
        {
            state.frames_skipped += 1;
            drop(state_guard);
            gst::trace!(
                CAT,
                imp = self,
                "Frame {} not scored (scoring-interval {})",
                frame_number,
                interval
            );
            self.draw_overlay(
                frame,
                &settings,
                &heat,
                frame_number,
                (width, height, stride),
                layout,
            )?;
            return Ok(gst::FlowSuccess::Ok);
        }

        let data = self.plane_data(frame, frame_number)?;
        let started = Instant::now();
        let result = state.scorer.score_frame(&PackedFrame {
            data,
            width,
            height,
            stride,
            layout,
        });
        let inference_ms = started.elapsed().as_secs_f64() * 1e3;
        if let Ok(score) = &result {
            state.last_heat = Some(score.heat.clone());
        }
        let threshold = settings.decision(&state.scorer);
        drop(state_guard);

        let score = result.map_err(|err| {
            gst::element_imp_error!(
                self,
                gst::StreamError::Failed,
                ("Failed to score frame {}: {}", frame_number, err)
            );
            gst::FlowError::Error
        })?;

        let overlay_started = Instant::now();
        self.draw_overlay(
            frame,
            &settings,
            &score.heat,
            frame_number,
            (width, height, stride),
            layout,
        )?;
        let overlay_ms = overlay_started.elapsed().as_secs_f64() * 1e3;

        let report = FrameReport {
            frame: frame_number,
            pts,
            is_anomalous: threshold.is_exceeded_by(&score),
            scores: score,
            threshold,
            inference_ms,
        };
        gst::log!(
            CAT,
            imp = self,
            "Frame {} overlay {:.1} ms",
            frame_number,
            overlay_ms
        );
        self.report(report);
        Ok(gst::FlowSuccess::Ok)
    }
}

impl PatchflowScore {
    /// Returns the frame's pixels, or posts an error when they cannot be mapped.
    fn plane_data<'a>(
        &self,
        frame: &'a gst_video::VideoFrameRef<&mut gst::BufferRef>,
        frame_number: u64,
    ) -> Result<&'a [u8], gst::FlowError> {
        frame.plane_data(0).map_err(|err| {
            gst::element_imp_error!(
                self,
                gst::StreamError::Failed,
                ("Failed to map frame {} for reading: {}", frame_number, err)
            );
            gst::FlowError::Error
        })
    }

    /// Starts the scoring thread of `scoring-mode=newest`. It scores the newest frame left
    /// in its mailbox, stores the heatmap for the streaming thread and posts the frame's
    /// bus and MQTT messages.
    /// Waits, at end of stream in `scoring-mode=newest`, until the frame still waiting for
    /// the scoring thread is scored, so that its report comes before end-of-stream.
    fn drain_worker(&self) {
        let mailbox = self
            .state
            .lock()
            .unwrap()
            .as_ref()
            .and_then(|state| state.worker.as_ref().map(|w| w.mailbox.clone()));
        if let Some(mailbox) = mailbox {
            drain(&mailbox);
        }
    }

    fn start_worker(&self, scorer: Arc<Scorer>) -> Result<Worker, gst::ErrorMessage> {
        let mailbox = Arc::new((Mutex::new(Mailbox::default()), Condvar::new()));
        let shared = mailbox.clone();
        let element = self.obj().downgrade();
        let thread = std::thread::Builder::new()
            .name("patchflowscore".into())
            .spawn(move || {
                let (lock, wake) = &*shared;
                loop {
                    let job = {
                        let mut mailbox = lock.lock().unwrap();
                        while mailbox.pending.is_none() && !mailbox.stop {
                            mailbox = wake.wait(mailbox).unwrap();
                        }
                        if mailbox.stop {
                            return;
                        }
                        mailbox.busy = true;
                        mailbox.pending.take().expect("woken with a pending frame")
                    };
                    // Marks the frame done when this iteration ends, on every path, and
                    // wakes a thread waiting for the mailbox to drain.
                    let _done = Finished(&shared);
                    let started = Instant::now();
                    let result = scorer.score_frame(&PackedFrame {
                        data: &job.data,
                        width: job.width,
                        height: job.height,
                        stride: job.stride,
                        layout: job.layout,
                    });
                    let inference_ms = started.elapsed().as_secs_f64() * 1e3;
                    let Some(element) = element.upgrade() else {
                        return;
                    };
                    let imp = element.imp();
                    match result {
                        Ok(score) => {
                            lock.lock().unwrap().last_heat = Some(score.heat.clone());
                            let threshold = job.settings.decision(&scorer);
                            imp.report(FrameReport {
                                frame: job.frame,
                                pts: job.pts,
                                is_anomalous: threshold.is_exceeded_by(&score),
                                scores: score,
                                threshold,
                                inference_ms,
                            });
                        }
                        Err(err) => {
                            gst::element_imp_error!(
                                imp,
                                gst::StreamError::Failed,
                                ("Failed to score frame {}: {}", job.frame, err)
                            );
                            return;
                        }
                    }
                }
            })
            .map_err(|err| {
                gst::error_msg!(
                    gst::CoreError::Thread,
                    ("Failed to start the scoring thread: {}", err)
                )
            })?;
        Ok(Worker {
            mailbox,
            thread: Some(thread),
        })
    }

    /// Logs a scored frame and sends its MQTT and bus messages.
    fn report(&self, report: FrameReport) {
        gst::log!(
            CAT,
            imp = self,
            "Frame {} (pts {}): score {:.5}, normalised {:.3}, log {:.3}, {}, inference {:.1} ms",
            report.frame,
            report.pts.display(),
            report.scores.score,
            report.scores.normalized_score,
            report.scores.log_score,
            report.label(),
            report.inference_ms
        );
        self.publish_mqtt(&report);
        self.post_report(&report);
    }

    /// Blends `heat` onto the frame when the overlay is on.
    fn draw_overlay(
        &self,
        frame: &mut gst_video::VideoFrameRef<&mut gst::BufferRef>,
        settings: &FrameSettings,
        heat: &HeatMap,
        frame_number: u64,
        geometry: (usize, usize, usize),
        layout: PixelLayout,
    ) -> Result<(), gst::FlowError> {
        if !settings.overlay || settings.alpha <= 0.0 {
            return Ok(());
        }
        let data = frame.plane_data_mut(0).map_err(|err| {
            gst::element_imp_error!(
                self,
                gst::StreamError::Failed,
                ("Failed to map frame {} for writing: {}", frame_number, err)
            );
            gst::FlowError::Error
        })?;
        blend_heatmap(
            data,
            geometry,
            layout,
            heat,
            settings.colormap.into(),
            settings.alpha as f32,
        );
        Ok(())
    }

    /// Loads the model file named by the `model` property onto the `device` property, or
    /// reuses the copy that another element of this process has loaded.
    fn load_model(&self, settings: &Settings) -> Result<Arc<Scorer>, gst::ErrorMessage> {
        let Some(path) = settings.model.as_ref() else {
            gst::error!(CAT, imp = self, "No model file set");
            return Err(gst::error_msg!(
                gst::LibraryError::Settings,
                ("No model file set: set the model property, e.g. model=PATH/model.safetensors")
            ));
        };
        let device = patchflow::device::parse(&settings.device).map_err(|err| {
            gst::error!(
                CAT,
                imp = self,
                "Failed to set up device {:?}: {}",
                settings.device,
                err
            );
            gst::error_msg!(
                gst::LibraryError::Settings,
                ("Failed to set up device {:?}: {}", settings.device, err)
            )
        })?;

        gst::info!(
            CAT,
            imp = self,
            "Loading model {} on {}",
            path.display(),
            settings.device
        );
        let started = Instant::now();
        let (scorer, loaded) = Scorer::shared(path, &device).map_err(|err| {
            gst::error!(
                CAT,
                imp = self,
                "Failed to load model {}: {}",
                path.display(),
                err
            );
            gst::error_msg!(
                gst::LibraryError::Settings,
                ("Failed to load model {}: {}", path.display(), err)
            )
        })?;

        let meta = scorer.meta();
        let [input_height, input_width] = meta.config.input_size;
        if !loaded {
            gst::info!(
                CAT,
                imp = self,
                "Reusing model {} on {}, already loaded in this process",
                path.display(),
                settings.device
            );
            return Ok(scorer);
        }
        gst::info!(
            CAT,
            imp = self,
            "Loaded model {} in {:.2} s: backbone {}, input {}x{}, raw image threshold {}",
            path.display(),
            started.elapsed().as_secs_f64(),
            meta.config.backbone,
            input_width,
            input_height,
            meta.stats.image_threshold
        );
        Ok(scorer)
    }

    /// Starts the MQTT publisher. It connects in the background, so only invalid settings
    /// fail here, never an unreachable broker.
    fn start_mqtt(&self, settings: &Settings) -> Result<MqttOutput, gst::ErrorMessage> {
        let source = self.obj().name().to_string();
        let topic = self.mqtt_topic(settings);
        if !is_valid_topic(&topic) {
            gst::error!(CAT, imp = self, "Invalid MQTT topic {:?}", topic);
            return Err(gst::error_msg!(
                gst::LibraryError::Settings,
                (
                    "Invalid mqtt-topic {:?}: expected a non-empty topic name without the wildcards + and #",
                    topic
                )
            ));
        }

        let mqtt_settings = MqttSettings {
            url: settings.mqtt_url.clone(),
            // The broker disconnects an older client with the same id, so the id includes
            // the process id to let several pipelines share one broker.
            client_id: format!("patchflow-{}-{}", source, std::process::id()),
            // The property's range is 0..=2, so the conversion cannot fail.
            qos: u8::try_from(settings.mqtt_qos).unwrap_or(u8::MAX),
            tls: settings.mqtt_tls.clone(),
            ..MqttSettings::default()
        };
        let publisher = Publisher::start(mqtt_settings).map_err(|err| {
            gst::error!(CAT, imp = self, "Failed to start MQTT publisher: {}", err);
            gst::error_msg!(
                gst::LibraryError::Settings,
                (
                    "Failed to start MQTT publisher for {}: {}",
                    settings.mqtt_url,
                    err
                )
            )
        })?;
        gst::info!(
            CAT,
            imp = self,
            "Publishing scores to {} on topic {} with QoS {}",
            settings.mqtt_url,
            topic,
            settings.mqtt_qos
        );

        Ok(MqttOutput {
            publisher,
            topic,
            source,
            dropped: 0,
            url: settings.mqtt_url.clone(),
            disconnected_since: Some(Instant::now()),
            outage_reported: false,
        })
    }

    /// Topic from the `mqtt-topic` property, or the default derived from the element name.
    fn mqtt_topic(&self, settings: &Settings) -> String {
        settings
            .mqtt_topic
            .clone()
            .unwrap_or_else(|| format!("patchflow/{}/score", self.obj().name()))
    }

    /// Reports a `threshold` outside the range of `threshold-domain` as a bus warning.
    fn check_decision(&self, settings: &Settings) {
        if let Err(err) = settings.check_threshold() {
            gst::element_imp_warning!(
                self,
                gst::LibraryError::Settings,
                (
                    "Invalid threshold: {}; frames are judged with the model's own threshold on that scale until it is fixed",
                    err
                )
            );
        }
    }

    /// Queues the frame's JSON message for the broker without waiting for the network.
    fn publish_mqtt(&self, report: &FrameReport) {
        let mut mqtt_guard = self.mqtt.lock().unwrap();
        let Some(mqtt) = mqtt_guard.as_mut() else {
            return;
        };

        let message = frame_message(
            &mqtt.source,
            report.frame,
            report.pts.map(gst::ClockTime::nseconds),
            &report.scores,
            report.threshold,
        );
        self.check_mqtt_connection(mqtt);
        if !mqtt.publisher.publish(&mqtt.topic, message.to_json()) {
            mqtt.dropped += 1;
            if mqtt.dropped == 1 || mqtt.dropped % MQTT_DROP_LOG_INTERVAL == 0 {
                let stats = mqtt.publisher.stats();
                gst::warning!(
                    CAT,
                    imp = self,
                    "Dropped the MQTT message of frame {} ({} dropped so far, broker {}): \
                     the queue is full",
                    report.frame,
                    mqtt.dropped,
                    if stats.connected {
                        "connected"
                    } else {
                        "not connected"
                    }
                );
            }
        }
    }

    /// Reports a broker outage once as a bus warning, and its end in the debug log.
    fn check_mqtt_connection(&self, mqtt: &mut MqttOutput) {
        let stats = mqtt.publisher.stats();
        if stats.connected {
            if mqtt.outage_reported {
                gst::info!(
                    CAT,
                    imp = self,
                    "MQTT broker {} is reachable again",
                    mqtt.url
                );
            }
            mqtt.disconnected_since = None;
            mqtt.outage_reported = false;
            return;
        }
        let since = *mqtt.disconnected_since.get_or_insert_with(Instant::now);
        if !mqtt.outage_reported && since.elapsed() >= MQTT_OUTAGE_WARNING {
            mqtt.outage_reported = true;
            let reason = mqtt
                .publisher
                .last_error()
                .unwrap_or_else(|| "no connection yet".to_owned());
            gst::element_imp_warning!(
                self,
                gst::ResourceError::OpenWrite,
                (
                    "MQTT broker {} is unreachable ({}); scores are queued ({} so far) and dropped once the queue is full, and sending resumes when it comes back",
                    mqtt.url,
                    reason,
                    stats.queued
                )
            );
        }
    }

    /// Posts the frame's `patchflow` element message on the bus.
    fn post_report(&self, report: &FrameReport) {
        let structure = gst::Structure::builder("patchflow")
            .field("score", f64::from(report.scores.score))
            .field(
                "normalized-score",
                f64::from(report.scores.normalized_score),
            )
            .field("log-score", f64::from(report.scores.log_score))
            .field("is-anomalous", report.is_anomalous)
            .field("label", report.label())
            .field("threshold", f64::from(report.threshold.value))
            .field("threshold-domain", report.threshold.domain.name())
            .field("pts", report.pts)
            .field("frame", report.frame)
            .field("inference-ms", report.inference_ms)
            .build();
        let message = gst::message::Element::builder(structure)
            .src(&*self.obj())
            .build();
        // Fails only when the element has no bus, and then no application can receive it.
        let _ = self.obj().post_message(message);
    }

    /// Current counters of the MQTT publisher as a `patchflow-mqtt-stats` structure.
    fn mqtt_stats(&self) -> gst::Structure {
        let stats = self
            .mqtt
            .lock()
            .unwrap()
            .as_ref()
            .map(|mqtt| mqtt.publisher.stats())
            .unwrap_or_default();
        gst::Structure::builder("patchflow-mqtt-stats")
            .field("published", stats.published)
            .field("dropped", stats.dropped)
            .field("queued", stats.queued as u64)
            .field("connected", stats.connected)
            .field("reconnect-attempts", stats.reconnect_attempts)
            .build()
    }
}

/// Converts an optional path property to its string value, `None` when unset.
fn path_value(path: Option<&PathBuf>) -> glib::Value {
    path.map(|path| path.to_string_lossy().into_owned())
        .to_value()
}

/// Checks that `topic` is a topic name that a client may publish to: non-empty, at most
/// 65535 bytes, and free of the wildcards `+` and `#` and of NUL.
fn is_valid_topic(topic: &str) -> bool {
    !topic.is_empty() && topic.len() <= usize::from(u16::MAX) && !topic.contains(['+', '#', '\0'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixel_layout_covers_template_formats() {
        for format in FORMATS {
            assert!(
                PixelLayout::from_video_format(format).is_some(),
                "{format:?}"
            );
        }
        assert!(PixelLayout::from_video_format(gst_video::VideoFormat::I420).is_none());
    }

    #[test]
    fn topic_validation() {
        assert!(is_valid_topic("patchflow/patchflowscore0/score"));
        assert!(!is_valid_topic(""));
        assert!(!is_valid_topic("patchflow/+/score"));
        assert!(!is_valid_topic("patchflow/#"));
    }
}
