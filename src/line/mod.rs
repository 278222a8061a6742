// SPDX-License-Identifier: MIT OR Apache-2.0
//! Production-line configs: a TOML file that names a video source, a model, scoring and
//! overlay settings, MQTT and a sink, and the runner that turns it into a GStreamer
//! pipeline around `patchflowscore`.
//!
//! Relative paths in a config are resolved against the config file's folder. String
//! values may use `${VAR}` or `${VAR:-default}` to take a value from the environment.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use gst::prelude::*;
use serde::Deserialize;

use crate::scoring::{ScoreDomain, Threshold};

/// A commented config with every setting, printed by `patchflow config example`.
pub const EXAMPLE_CONFIG: &str = include_str!("../configs/example.toml");

/// Name of the scoring element inside every line pipeline.
const SCORER_NAME: &str = "scorer";

/// A config that cannot be used, with every problem found.
#[derive(Debug, thiserror::Error)]
#[error("invalid line config {path}:\n  {}", problems.join("\n  "))]
pub struct ConfigError {
    pub path: PathBuf,
    pub problems: Vec<String>,
}

/// A production line: one source, one model, one sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LineConfig {
    /// Line name: used for the MQTT topic and in logs.
    pub name: String,
    pub source: SourceConfig,
    pub model: ModelSection,
    #[serde(default)]
    pub scoring: ScoringConfig,
    #[serde(default)]
    pub mqtt: Option<MqttConfig>,
    #[serde(default)]
    pub sink: SinkConfig,
}

/// The video source of a line.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceConfig {
    /// Numbered image files, e.g. `frames/%05d.png`, played as video.
    Images {
        location: String,
        #[serde(default = "default_framerate")]
        framerate: u32,
    },
    /// Anything `uridecodebin` plays: `file://`, `rtsp://`, `http://`.
    Uri { uri: String },
    /// A V4L2 camera.
    V4l2 {
        #[serde(default = "default_v4l2_device")]
        device: String,
    },
    /// GStreamer's test pattern, for trying a setup without a camera.
    Test {
        #[serde(default = "default_test_frames")]
        num_buffers: u32,
        #[serde(default = "default_test_width")]
        width: u32,
        #[serde(default = "default_test_height")]
        height: u32,
        #[serde(default = "default_framerate")]
        framerate: u32,
        #[serde(default)]
        pattern: Option<String>,
    },
}

fn default_framerate() -> u32 {
    25
}
fn default_v4l2_device() -> String {
    "/dev/video0".into()
}
fn default_test_frames() -> u32 {
    100
}
fn default_test_width() -> u32 {
    320
}
fn default_test_height() -> u32 {
    240
}

/// The model file and where to run it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    pub path: String,
    #[serde(default = "default_device")]
    pub device: String,
}

fn default_device() -> String {
    "cpu".into()
}

/// Decision and overlay settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScoringConfig {
    /// Score above which a frame is anomalous, on the scale of `threshold_domain`.
    pub threshold: f64,
    /// `normalized` (0.5 is the model's threshold), `raw` or `log`.
    pub threshold_domain: String,
    pub overlay: bool,
    pub alpha: f64,
    pub colormap: String,
    /// Score every Nth frame; the frames in between get the last heatmap.
    pub interval: u32,
}

impl Default for ScoringConfig {
    fn default() -> Self {
        Self {
            threshold: 0.5,
            threshold_domain: "normalized".into(),
            overlay: true,
            alpha: 0.5,
            colormap: "jet".into(),
            interval: 1,
        }
    }
}

/// Broker and topic for the per-frame score messages.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    pub url: String,
    /// Topic of the per-frame messages; default `patchflow/<line name>/score`.
    #[serde(default)]
    pub topic: Option<String>,
    #[serde(default)]
    pub qos: u8,
}

/// The destination of the scored (and overlaid) video.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SinkConfig {
    /// Discard the frames.
    #[default]
    None,
    /// A window (needs a display).
    Display,
    /// A Motion-JPEG video file; `.avi` or `.mkv`.
    File { location: String },
    /// One PNG per frame into a folder.
    Frames { folder: String },
}

/// Replaces `${VAR}` and `${VAR:-default}` with environment values.
pub fn expand_env(text: &str) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unclosed ${{ in {text:?}"))?;
        let expr = &after[..end];
        let (name, default) = match expr.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (expr, None),
        };
        match (std::env::var(name), default) {
            (Ok(v), _) if !v.is_empty() => out.push_str(&v),
            (_, Some(d)) => out.push_str(d),
            _ => {
                return Err(format!(
                    "environment variable {name} is not set (used in {text:?})"
                ));
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn expand_all(value: &mut toml::Value, problems: &mut Vec<String>, at: &str) {
    match value {
        toml::Value::String(s) => match expand_env(s) {
            Ok(v) => *s = v,
            Err(e) => problems.push(format!("{at}: {e}")),
        },
        toml::Value::Table(t) => {
            for (k, v) in t.iter_mut() {
                let path = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                };
                expand_all(v, problems, &path);
            }
        }
        toml::Value::Array(items) => {
            for (i, v) in items.iter_mut().enumerate() {
                expand_all(v, problems, &format!("{at}[{i}]"));
            }
        }
        _ => {}
    }
}

impl LineConfig {
    /// Reads, expands and validates a config file. Every problem is reported at once.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let fail = |problems: Vec<String>| ConfigError {
            path: path.to_path_buf(),
            problems,
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| fail(vec![format!("cannot read the file: {e}")]))?;
        let mut value: toml::Value =
            toml::from_str(&text).map_err(|e| fail(vec![e.to_string()]))?;
        let mut problems = Vec::new();
        expand_all(&mut value, &mut problems, "");
        if !problems.is_empty() {
            return Err(fail(problems));
        }
        let mut config: LineConfig = value
            .try_into()
            .map_err(|e: toml::de::Error| fail(vec![e.to_string()]))?;
        config.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        let problems = config.problems();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(fail(problems))
        }
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut String| {
            if !p.is_empty() && Path::new(p.as_str()).is_relative() {
                *p = base.join(p.as_str()).to_string_lossy().into_owned();
            }
        };
        resolve(&mut self.model.path);
        match &mut self.source {
            SourceConfig::Images { location, .. } => resolve(location),
            SourceConfig::Uri { uri } if uri.starts_with("file://") => {
                let mut file = uri.trim_start_matches("file://").to_string();
                resolve(&mut file);
                *uri = format!("file://{file}");
            }
            _ => {}
        }
        match &mut self.sink {
            SinkConfig::File { location } => resolve(location),
            SinkConfig::Frames { folder } => resolve(folder),
            _ => {}
        }
    }

    /// Problems that deserialisation cannot see, each with the field it concerns.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.name.trim().is_empty() || self.name.contains(['/', '#', '+']) {
            p.push(format!("name {:?}: must be non-empty and contain no '/', '#' or '+' (it is part of MQTT topics)", self.name));
        }
        if !Path::new(&self.model.path).is_file() {
            p.push(format!(
                "model.path {}: file not found; train one with `patchflow train`",
                self.model.path
            ));
        } else if let Err(e) = crate::checkpoint::read_meta(Path::new(&self.model.path)) {
            p.push(format!("model.path {}: {e}", self.model.path));
        }
        if let Err(e) = crate::device::parse(&self.model.device) {
            p.push(format!("model.device: {e}"));
        }
        match self.scoring.threshold_domain.parse::<ScoreDomain>() {
            Ok(domain) => {
                if let Err(e) = Threshold::new(self.scoring.threshold as f32, domain) {
                    p.push(format!("scoring.threshold: {e}"));
                }
            }
            Err(e) => p.push(format!("scoring.threshold_domain: {e}")),
        }
        if !(0.0..=1.0).contains(&self.scoring.alpha) {
            p.push(format!(
                "scoring.alpha {}: must be between 0 and 1",
                self.scoring.alpha
            ));
        }
        if !(1..=1000).contains(&self.scoring.interval) {
            p.push(format!(
                "scoring.interval {}: must be from 1 (every frame) to 1000",
                self.scoring.interval
            ));
        }
        if !["jet", "hot"].contains(&self.scoring.colormap.as_str()) {
            p.push(format!(
                "scoring.colormap {:?}: expected jet or hot",
                self.scoring.colormap
            ));
        }
        match &self.source {
            SourceConfig::Images {
                location,
                framerate,
            } => {
                if !location.contains('%') {
                    p.push(format!("source.location {location:?}: expected a numbered pattern such as frames/%05d.png"));
                }
                if image_decoder(location).is_none() {
                    p.push(format!(
                        "source.location {location:?}: expected .png, .jpg or .jpeg frames"
                    ));
                }
                if *framerate == 0 {
                    p.push("source.framerate: must be at least 1".into());
                }
            }
            SourceConfig::Uri { uri } if !uri.contains("://") => {
                p.push(format!("source.uri {uri:?}: expected a URI such as file:///path/video.mp4 or rtsp://host/stream"));
            }
            SourceConfig::Test { framerate: 0, .. } => {
                p.push("source.framerate: must be at least 1".into())
            }
            _ => {}
        }
        if let Some(mqtt) = &self.mqtt {
            if let Err(e) = crate::mqtt::validate_url(&mqtt.url) {
                p.push(format!("mqtt.url: {e}"));
            }
            if let Some(topic) = &mqtt.topic
                && (topic.is_empty() || topic.contains(['+', '#', '\0']))
            {
                p.push(format!(
                    "mqtt.topic {topic:?}: must be non-empty and contain no '+', '#' or NUL (wildcards are for subscribing)"
                ));
            }
            if mqtt.qos > 2 {
                p.push(format!("mqtt.qos {}: must be 0, 1 or 2", mqtt.qos));
            }
        }
        if let SinkConfig::File { location } = &self.sink
            && !(location.ends_with(".avi") || location.ends_with(".mkv"))
        {
            p.push(format!(
                "sink.location {location:?}: expected an .avi or .mkv file"
            ));
        }
        p
    }

    /// Returns the MQTT topic of the per-frame messages.
    pub fn topic(&self) -> Option<String> {
        self.mqtt.as_ref().map(|m| {
            m.topic
                .clone()
                .unwrap_or_else(|| format!("patchflow/{}/score", self.name))
        })
    }

    /// Builds the pipeline description in `gst-launch-1.0` syntax.
    pub fn pipeline_description(&self) -> String {
        let source = match &self.source {
            SourceConfig::Images {
                location,
                framerate,
            } => {
                let (caps, decoder) = image_decoder(location).unwrap_or(("image/png", "pngdec"));
                format!(
                    "multifilesrc location={} index=0 caps=\"{caps},framerate=(fraction){framerate}/1\" ! {decoder}",
                    quote(location)
                )
            }
            SourceConfig::Uri { uri } => format!("uridecodebin uri={}", quote(uri)),
            SourceConfig::V4l2 { device } => format!("v4l2src device={}", quote(device)),
            SourceConfig::Test {
                num_buffers,
                width,
                height,
                framerate,
                pattern,
            } => {
                let pattern = pattern
                    .as_ref()
                    .map(|p| format!(" pattern={}", quote(p)))
                    .unwrap_or_default();
                format!(
                    "videotestsrc num-buffers={num_buffers}{pattern} ! video/x-raw,width={width},height={height},framerate={framerate}/1"
                )
            }
        };
        let s = &self.scoring;
        let mut scorer = format!(
            "patchflowscore name={SCORER_NAME} model={} device={} threshold={} threshold-domain={} overlay={} alpha={} colormap={} scoring-interval={}",
            quote(&self.model.path),
            quote(&self.model.device),
            s.threshold,
            s.threshold_domain,
            s.overlay,
            s.alpha,
            s.colormap,
            s.interval
        );
        if let (Some(mqtt), Some(topic)) = (&self.mqtt, self.topic()) {
            scorer.push_str(&format!(
                " mqtt-url={} mqtt-topic={} mqtt-qos={}",
                quote(&mqtt.url),
                quote(&topic),
                mqtt.qos
            ));
        }
        let sink = match &self.sink {
            SinkConfig::None => "fakesink sync=false".to_string(),
            SinkConfig::Display => "autovideosink".to_string(),
            SinkConfig::File { location } if location.ends_with(".mkv") => {
                format!(
                    "jpegenc ! matroskamux ! filesink location={}",
                    quote(location)
                )
            }
            SinkConfig::File { location } => {
                format!("jpegenc ! avimux ! filesink location={}", quote(location))
            }
            SinkConfig::Frames { folder } => {
                let pattern = Path::new(folder).join("frame-%05d.png");
                format!(
                    "pngenc ! multifilesink location={}",
                    quote(&pattern.to_string_lossy())
                )
            }
        };
        format!("{source} ! videoconvert ! {scorer} ! videoconvert ! {sink}")
    }
}

/// Caps and decoder for numbered image files, chosen by extension.
fn image_decoder(location: &str) -> Option<(&'static str, &'static str)> {
    let ext = Path::new(location)
        .extension()?
        .to_str()?
        .to_ascii_lowercase();
    match ext.as_str() {
        "png" => Some(("image/png", "pngdec")),
        "jpg" | "jpeg" => Some(("image/jpeg", "jpegdec")),
        _ => None,
    }
}

/// Quotes a value for the gst-launch syntax.
fn quote(value: &str) -> String {
    format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Makes sure the `patchflowscore` element can be created: it is looked up in the
/// GStreamer registry, then in the folder of this executable, where a workspace build
/// puts `libgstpatchflow.so`.
pub fn ensure_element() -> Result<()> {
    gst::init().context("cannot initialise GStreamer")?;
    if gst::ElementFactory::find("patchflowscore").is_some() {
        return Ok(());
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
    {
        gst::Registry::get().scan_path(&dir);
    }
    if gst::ElementFactory::find("patchflowscore").is_none() {
        bail!(
            "the GStreamer element patchflowscore was not found: build it with `cargo build --release -p gst-plugin-patchflow` and set GST_PLUGIN_PATH to the folder that contains libgstpatchflow.so"
        );
    }
    Ok(())
}

/// Counts of one run, printed at the end.
#[derive(Debug, Default, Clone)]
pub struct RunSummary {
    pub frames: u64,
    pub anomalous: u64,
    pub max_score: f64,
    pub inference_ms_total: f64,
    /// Frames passed on without scoring because of `scoring.interval`.
    pub skipped: u64,
    /// The MQTT publisher's counters at the end, when the line publishes.
    pub mqtt: Option<MqttSummary>,
}

/// MQTT publisher counters at the end of a run.
#[derive(Debug, Default, Clone)]
pub struct MqttSummary {
    pub published: u64,
    pub dropped: u64,
    /// Messages neither published nor dropped yet.
    pub queued: u64,
    pub connected: bool,
}

/// Loads a config and runs its line; see [`run_line`].
pub fn run_file(path: &Path) -> Result<ExitCode> {
    let config = LineConfig::load(path)?;
    let summary = run_line(&config)?;
    let mean_ms = if summary.frames > 0 {
        summary.inference_ms_total / summary.frames as f64
    } else {
        0.0
    };
    eprintln!(
        "line {}: {} frames scored, {} skipped, {} anomalous, max normalised score {:.3}, mean inference {:.1} ms",
        config.name, summary.frames, summary.skipped, summary.anomalous, summary.max_score, mean_ms
    );
    if let (Some(mqtt), Some(m)) = (&config.mqtt, &summary.mqtt) {
        eprintln!(
            "mqtt {}: {} messages published, {} dropped, {} still queued{}",
            mqtt.url,
            m.published,
            m.dropped,
            m.queued,
            if m.connected {
                ""
            } else {
                " (broker not connected at the end)"
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Builds and runs the pipeline until end of stream, an error, or Ctrl-C (which sends
/// end-of-stream so that files are finalised).
pub fn run_line(config: &LineConfig) -> Result<RunSummary> {
    ensure_element()?;
    match &config.sink {
        SinkConfig::File { location } => create_parent(Path::new(location))?,
        SinkConfig::Frames { folder } => std::fs::create_dir_all(folder)
            .with_context(|| format!("cannot create sink folder {folder}"))?,
        _ => {}
    }
    let description = config.pipeline_description();
    tracing::info!(line = %config.name, pipeline = %description, "starting line");
    let pipeline = gst::parse::launch(&description)
        .with_context(|| format!("cannot build the pipeline for line {}", config.name))?
        .downcast::<gst::Pipeline>()
        .map_err(|_| anyhow::anyhow!("the line description did not produce a pipeline"))?;

    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let pipeline = pipeline.downgrade();
        let interrupted = interrupted.clone();
        // Installing a second handler fails when one process runs several lines one after
        // another. The first handler still serves, so the error is ignored.
        let _ = ctrlc::set_handler(move || {
            interrupted.store(true, Ordering::SeqCst);
            if let Some(p) = pipeline.upgrade() {
                p.send_event(gst::event::Eos::new());
            }
        });
    }

    if pipeline.set_state(gst::State::Playing).is_err() {
        let reason = first_error(&pipeline).unwrap_or_default();
        pipeline.set_state(gst::State::Null).ok();
        bail!("cannot start line {}: {reason}", config.name);
    }
    let mut result = watch_bus(&pipeline, &interrupted);
    if let Ok(summary) = &mut result {
        summary.mqtt = mqtt_stats(&pipeline, summary.frames);
        if let Some(scorer) = pipeline.by_name(SCORER_NAME) {
            summary.skipped = scorer.property::<u64>("frames-skipped");
        }
    }
    pipeline.set_state(gst::State::Null).ok();
    result
}

/// Reads the counters of the scorer's MQTT publisher before the pipeline stops. Each
/// of the `sent` scored frames queued one message, so the messages neither published
/// nor dropped are still on their way, including those the publisher thread took from
/// its queue but has not written yet. While connected, it waits up to 2 s for them.
fn mqtt_stats(pipeline: &gst::Pipeline, sent: u64) -> Option<MqttSummary> {
    let scorer = pipeline.by_name(SCORER_NAME)?;
    let read = || -> Option<MqttSummary> {
        let stats = scorer.property::<gst::Structure>("mqtt-stats");
        let published = stats.get::<u64>("published").ok()?;
        let dropped = stats.get::<u64>("dropped").ok()?;
        Some(MqttSummary {
            published,
            dropped,
            queued: sent.saturating_sub(published + dropped),
            connected: stats.get::<bool>("connected").ok()?,
        })
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let summary = read()?;
        if !summary.connected || summary.queued == 0 || Instant::now() > deadline {
            return Some(summary);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn create_parent(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create folder {}", dir.display()))?;
    }
    Ok(())
}

/// Returns the first error message waiting on the bus, if any.
fn first_error(pipeline: &gst::Pipeline) -> Option<String> {
    let bus = pipeline.bus()?;
    while let Some(msg) = bus.pop() {
        if let gst::MessageView::Error(err) = msg.view() {
            return Some(format!(
                "{} ({})",
                err.error(),
                err.debug().map(|d| d.to_string()).unwrap_or_default()
            ));
        }
    }
    None
}

fn watch_bus(pipeline: &gst::Pipeline, interrupted: &AtomicBool) -> Result<RunSummary> {
    let bus = pipeline.bus().expect("a pipeline has a bus");
    let mut summary = RunSummary::default();
    let mut eos_deadline: Option<Instant> = None;
    loop {
        if interrupted.load(Ordering::SeqCst) && eos_deadline.is_none() {
            eprintln!("interrupted: finishing the stream");
            eos_deadline = Some(Instant::now() + Duration::from_secs(5));
        }
        if eos_deadline.is_some_and(|d| Instant::now() > d) {
            tracing::warn!("end of stream did not arrive within 5 s of the interrupt; stopping");
            return Ok(summary);
        }
        let Some(msg) = bus.timed_pop(gst::ClockTime::from_mseconds(200)) else {
            continue;
        };
        match msg.view() {
            gst::MessageView::Eos(_) => return Ok(summary),
            gst::MessageView::Error(err) => {
                let source = err
                    .src()
                    .map(|s| s.path_string().to_string())
                    .unwrap_or_default();
                let debug = err.debug().map(|d| d.to_string()).unwrap_or_default();
                bail!("{source}: {}\n{debug}", err.error());
            }
            gst::MessageView::Warning(w) => {
                tracing::warn!(warning = %w.error(), "pipeline warning")
            }
            gst::MessageView::Element(e) => {
                if let Some(s) = e.structure().filter(|s| s.name() == "patchflow") {
                    summary.frames += 1;
                    if s.get::<bool>("is-anomalous").unwrap_or(false) {
                        summary.anomalous += 1;
                    }
                    summary.max_score = summary
                        .max_score
                        .max(s.get::<f64>("normalized-score").unwrap_or(0.0));
                    summary.inference_ms_total += s.get::<f64>("inference-ms").unwrap_or(0.0);
                    tracing::debug!(
                        frame = s.get::<u64>("frame").unwrap_or(0),
                        score = s.get::<f64>("score").unwrap_or(f64::NAN),
                        "frame scored"
                    );
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_expansion() {
        // SAFETY: tests in this module are the only readers of this variable.
        unsafe { std::env::set_var("PATCHFLOW_TEST_PORT", "1999") };
        assert_eq!(
            expand_env("mqtt://h:${PATCHFLOW_TEST_PORT}").unwrap(),
            "mqtt://h:1999"
        );
        assert_eq!(
            expand_env("${PATCHFLOW_TEST_UNSET_X:-abc}/x").unwrap(),
            "abc/x"
        );
        assert!(
            expand_env("${PATCHFLOW_TEST_UNSET_X}")
                .unwrap_err()
                .contains("PATCHFLOW_TEST_UNSET_X")
        );
        assert!(expand_env("${OPEN").is_err());
    }

    #[test]
    fn example_config_parses() {
        let value: toml::Value = toml::from_str(EXAMPLE_CONFIG).unwrap();
        let config: LineConfig = value.try_into().unwrap();
        assert_eq!(config.name, "line-1");
        assert_eq!(config.scoring.interval, 1);
        assert!(matches!(config.source, SourceConfig::Test { .. }));
        assert!(matches!(config.sink, SinkConfig::None));
    }

    #[test]
    fn quoting_escapes() {
        assert_eq!(quote(r#"a "b"\c"#), r#""a \"b\"\\c""#);
    }
}
