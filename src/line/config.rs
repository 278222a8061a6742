// SPDX-License-Identifier: MIT OR Apache-2.0
//! The config file: `[defaults]`, `[mqtt]`, `[health]` and `[[lines]]` with
//! `[[lines.cameras]]`, read into one [`CameraConfig`] per camera.
//!
//! `model`, `scoring`, `alarm` and `restart` merge key by key: a camera's value wins over
//! its line's, which wins over `[defaults]`, which wins over the built-in default. `sink`
//! is replaced as a whole, because its keys depend on its `kind`. Every problem is
//! reported with the full path of the key that contains the invalid value, such as
//! `lines[0].cameras[1].scoring.threshold` or `defaults.alarm.raise_frames`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::alarm::AlarmConfig;
use crate::mqtt::{MqttError, TlsFileKind, TlsFiles};
use crate::scoring::{ScoreDomain, Threshold};

/// A config that cannot be used, with every problem found.
#[derive(Debug, thiserror::Error)]
#[error("invalid config {path}:\n  {}", problems.join("\n  "))]
pub struct ConfigError {
    pub path: PathBuf,
    pub problems: Vec<String>,
}

/// A whole config file: every camera with its settings resolved, the MQTT output and the
/// health endpoint.
#[derive(Debug, Clone)]
pub struct Config {
    /// `None` publishes nothing.
    pub mqtt: Option<MqttConfig>,
    /// `None` serves no health or metrics endpoint.
    pub health: Option<HealthConfig>,
    pub cameras: Vec<CameraConfig>,
    /// The file the config was read from, which `patchflow run` reads again on SIGHUP.
    pub source: Option<PathBuf>,
}

/// One camera with its line's and the defaults' settings merged in.
#[derive(Debug, Clone)]
pub struct CameraConfig {
    /// Name of the line the camera belongs to.
    pub line: String,
    /// Camera name, unique in the file: part of the MQTT topics and of event ids.
    pub name: String,
    pub source: SourceConfig,
    pub model: ModelSection,
    pub scoring: ScoringConfig,
    pub alarm: AlarmConfig,
    pub sink: SinkConfig,
    pub restart: RestartConfig,
    pub snapshot: SnapshotConfig,
}

/// The video source of a camera.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceConfig {
    /// Still images played as video: a folder, a glob such as `frames/*.png` (wildcards in
    /// the file name only) or a numbered pattern such as `frames/%05d.png`.
    Images {
        location: String,
        #[serde(default = "default_framerate")]
        framerate: u32,
        /// Start again from the first image after the last one.
        #[serde(default, rename = "loop")]
        repeat: bool,
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
        /// Produce frames at `framerate` in real time, as a camera does, instead of as
        /// fast as the pipeline takes them.
        #[serde(default)]
        is_live: bool,
    },
}

/// Largest `width` and `height` of a `test` source.
const MAX_TEST_SIZE: u32 = 16384;

/// The patterns of GStreamer 1.22's `videotestsrc`, as its `pattern` property names them.
const TEST_PATTERNS: [&str; 26] = [
    "smpte",
    "snow",
    "black",
    "white",
    "red",
    "green",
    "blue",
    "checkers-1",
    "checkers-2",
    "checkers-4",
    "checkers-8",
    "circular",
    "blink",
    "smpte75",
    "zone-plate",
    "gamut",
    "chroma-zone-plate",
    "solid-color",
    "ball",
    "smpte100",
    "bar",
    "pinwheel",
    "spokes",
    "gradient",
    "colors",
    "smpte-rp-219",
];

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
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// Required, in `[defaults.model]`, the line or the camera.
    pub path: String,
    pub device: String,
}

/// Decision and overlay settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScoringConfig {
    /// Score above which a frame is anomalous, on the scale of `threshold_domain`. When
    /// left out, the model's own threshold on that scale applies.
    pub threshold: Option<f64>,
    /// `normalized` (0.5 is the model's threshold), `raw` or `log`.
    pub threshold_domain: String,
    pub overlay: bool,
    pub alpha: f64,
    pub colormap: String,
    /// Score every Nth frame. The frames in between get the last heatmap. Ignored with
    /// `mode = "newest"`.
    pub interval: u32,
    /// The element's `scoring-mode`: `interval` scores on the streaming thread, `newest`
    /// scores the newest frame on a worker thread and never holds up the source.
    pub mode: String,
}

/// Values of `scoring.mode`, as the element's `scoring-mode` property spells them.
const SCORING_MODES: [&str; 2] = ["interval", "newest"];

impl Default for ScoringConfig {
    fn default() -> Self {
        Self {
            threshold: None,
            threshold_domain: "normalized".into(),
            overlay: true,
            alpha: 0.5,
            colormap: "jet".into(),
            interval: 1,
            mode: "interval".into(),
        }
    }
}

/// Delays between restarts of a camera's pipeline after an error, in seconds. The delay
/// doubles after each failed attempt up to `max_delay`, and returns to `initial_delay`
/// once a restarted pipeline has scored a frame.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RestartConfig {
    pub initial_delay: f64,
    pub max_delay: f64,
}

impl Default for RestartConfig {
    fn default() -> Self {
        Self {
            initial_delay: 1.0,
            max_delay: 30.0,
        }
    }
}

/// Snapshots of alarm events: the overlaid frames that start and peak each event.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotConfig {
    /// Folder for `<event id>-start.jpg` and `<event id>-peak.jpg`. Unset: no files.
    pub folder: Option<String>,
    /// JPEG quality, 1 to 100.
    pub quality: u32,
    /// Publish each new snapshot on `<prefix>/<camera>/snapshot` (needs `[mqtt]`).
    pub publish: bool,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        Self {
            folder: None,
            quality: 90,
            publish: false,
        }
    }
}

impl SnapshotConfig {
    /// Returns whether snapshots are taken at all.
    pub fn enabled(&self) -> bool {
        self.folder.is_some() || self.publish
    }
}

/// The destination of the scored (and overlaid) video.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SinkConfig {
    /// Discard the frames.
    #[default]
    None,
    /// A window (needs a display).
    Display,
    /// A Motion-JPEG video file, `.avi` or `.mkv`.
    File { location: String },
    /// One PNG per frame into a folder.
    Frames { folder: String },
}

/// QoS and retain flag of one kind of topic. Unset values take the kind's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicOptions {
    pub qos: Option<u8>,
    pub retain: Option<bool>,
}

/// QoS and retain flag in force for one kind of topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub qos: u8,
    pub retain: bool,
}

impl TopicOptions {
    fn resolve(self, qos: u8, retain: bool) -> Delivery {
        Delivery {
            qos: self.qos.unwrap_or(qos),
            retain: self.retain.unwrap_or(retain),
        }
    }
}

/// The broker and topics that `patchflow run` publishes to.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// `mqtt://HOST[:PORT]` (port 1883 by default) or `mqtts://HOST[:PORT]` for TLS (port
    /// 8883 by default).
    pub url: String,
    /// First level of every topic.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Default: `patchflow-<prefix>-<process id>`, unique per process.
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    /// Name of the environment variable that contains the password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// File whose content, without the final line break, is the password.
    #[serde(default)]
    pub password_file: Option<String>,
    /// PEM file of the CAs that the broker's certificate must chain to, for an `mqtts://`
    /// URL. Without it, the system trust store is used.
    #[serde(default)]
    pub ca_file: Option<String>,
    /// PEM client certificate for brokers that require one, for an `mqtts://` URL.
    #[serde(default)]
    pub client_cert_file: Option<String>,
    /// Unencrypted PKCS#8 PEM private key of `client_cert_file`.
    #[serde(default)]
    pub client_key_file: Option<String>,
    /// Seconds between keep-alive pings. The broker publishes the Last Will about 1.5
    /// times this long after the connection goes silent.
    #[serde(default = "default_keep_alive")]
    pub keep_alive: u64,
    /// Messages kept while the broker is unreachable. Further ones are dropped and counted.
    #[serde(default = "default_queue_capacity")]
    pub queue_capacity: usize,
    /// Maximum per-frame score messages per second and camera. 0 publishes none.
    #[serde(default = "default_score_max_rate")]
    pub score_max_rate: f64,
    #[serde(default)]
    pub availability: TopicOptions,
    #[serde(default)]
    pub state: TopicOptions,
    #[serde(default)]
    pub events: TopicOptions,
    #[serde(default)]
    pub score: TopicOptions,
    #[serde(default)]
    pub snapshot: TopicOptions,
}

fn default_prefix() -> String {
    "patchflow".into()
}
fn default_keep_alive() -> u64 {
    30
}
fn default_queue_capacity() -> usize {
    1024
}
fn default_score_max_rate() -> f64 {
    1.0
}

impl MqttConfig {
    /// `<prefix>/available`: retained, QoS 1 by default, as is the Last Will.
    pub fn availability(&self) -> Delivery {
        self.availability.resolve(1, true)
    }
    /// `<prefix>/<camera>/state`: retained, QoS 1 by default.
    pub fn state(&self) -> Delivery {
        self.state.resolve(1, true)
    }
    /// `<prefix>/events`: not retained, QoS 1 by default.
    pub fn events(&self) -> Delivery {
        self.events.resolve(1, false)
    }
    /// `<prefix>/<camera>/score`: not retained, QoS 0 by default.
    pub fn score(&self) -> Delivery {
        self.score.resolve(0, false)
    }
    /// `<prefix>/<camera>/snapshot`: retained, QoS 0 by default, so that a dashboard
    /// that subscribes later still gets the latest picture.
    pub fn snapshot(&self) -> Delivery {
        self.snapshot.resolve(0, true)
    }

    /// Returns the client id: the configured one or `patchflow-<prefix>-<process id>`.
    pub fn client_id(&self) -> String {
        self.client_id.clone().unwrap_or_else(|| {
            format!(
                "patchflow-{}-{}",
                self.prefix.replace('/', "-"),
                std::process::id()
            )
        })
    }

    /// Reads the password from `password_env` or `password_file`, if either is set.
    pub fn password(&self) -> Result<Option<String>, String> {
        if let Some(name) = &self.password_env {
            return std::env::var(name).map(Some).map_err(|_| {
                format!(
                    "environment variable {name} is not set: export it or remove mqtt.password_env"
                )
            });
        }
        if let Some(file) = &self.password_file {
            let text =
                std::fs::read_to_string(file).map_err(|e| format!("cannot read {file}: {e}"))?;
            let password = text.strip_suffix('\n').unwrap_or(&text);
            let password = password.strip_suffix('\r').unwrap_or(password);
            return Ok(Some(password.to_owned()));
        }
        Ok(None)
    }

    /// Returns the TLS files. `Config::parse` has resolved relative paths against the config
    /// file's folder.
    pub fn tls_files(&self) -> TlsFiles {
        TlsFiles {
            ca_file: self.ca_file.as_ref().map(PathBuf::from),
            client_cert_file: self.client_cert_file.as_ref().map(PathBuf::from),
            client_key_file: self.client_key_file.as_ref().map(PathBuf::from),
        }
    }

    fn problems(&self, p: &mut Problems) {
        match crate::mqtt::is_tls_url(&self.url) {
            Ok(tls) => self.tls_problems(tls, p),
            Err(e) => p.push("mqtt.url", e.to_string()),
        }
        if self.prefix.is_empty() || self.prefix.contains(['+', '#', '\0']) {
            p.push(
                "mqtt.prefix",
                format!(
                    "{:?} must be non-empty and contain no '+', '#' or NUL (wildcards are for subscribing)",
                    self.prefix
                ),
            );
        }
        if self.client_id.as_ref().is_some_and(String::is_empty) {
            p.push(
                "mqtt.client_id",
                "must not be empty: remove it for a unique default".into(),
            );
        }
        if self.password_env.is_some() && self.password_file.is_some() {
            p.push(
                "mqtt.password_file",
                "set either password_env or password_file, not both".into(),
            );
        } else if let Err(e) = self.password() {
            let field = if self.password_env.is_some() {
                "mqtt.password_env"
            } else {
                "mqtt.password_file"
            };
            p.push(field, e);
        }
        if (self.password_env.is_some() || self.password_file.is_some()) && self.username.is_none()
        {
            p.push(
                "mqtt.username",
                "missing: a password needs a user name".into(),
            );
        }
        if !(1..=65535).contains(&self.keep_alive) {
            p.push(
                "mqtt.keep_alive",
                format!("{} must be from 1 to 65535 seconds", self.keep_alive),
            );
        }
        if self.queue_capacity == 0 {
            p.push("mqtt.queue_capacity", "must be at least 1 message".into());
        }
        if !(self.score_max_rate.is_finite() && self.score_max_rate >= 0.0) {
            p.push(
                "mqtt.score_max_rate",
                format!(
                    "{} must be 0 (off) or a positive number of messages per second",
                    self.score_max_rate
                ),
            );
        }
        for (kind, options) in [
            ("availability", self.availability),
            ("state", self.state),
            ("events", self.events),
            ("score", self.score),
            ("snapshot", self.snapshot),
        ] {
            if let Some(qos) = options.qos.filter(|qos| *qos > 2) {
                p.push(
                    &format!("mqtt.{kind}.qos"),
                    format!("{qos} must be 0, 1 or 2"),
                );
            }
        }
    }
}

impl MqttConfig {
    /// Checks the TLS files: only with an `mqtts://` URL, the key with its certificate, and
    /// each file readable and valid PEM.
    fn tls_problems(&self, tls: bool, p: &mut Problems) {
        let files = [
            ("mqtt.ca_file", &self.ca_file),
            ("mqtt.client_cert_file", &self.client_cert_file),
            ("mqtt.client_key_file", &self.client_key_file),
        ];
        if !tls {
            for (field, value) in files {
                if value.is_some() {
                    p.push(
                        field,
                        format!(
                            "only used with TLS, but mqtt.url {:?} is plain MQTT: change it to mqtts://HOST[:PORT] or remove {field}",
                            self.url
                        ),
                    );
                }
            }
            return;
        }

        if let Some(ca_file) = &self.ca_file
            && let Err(e) = crate::mqtt::read_ca_file(Path::new(ca_file))
        {
            p.push("mqtt.ca_file", e.to_string());
        }
        match (&self.client_cert_file, &self.client_key_file) {
            (Some(cert), Some(key)) => {
                if let Err(e) = crate::mqtt::read_client_identity(Path::new(cert), Path::new(key)) {
                    let field = match &e {
                        MqttError::TlsFile {
                            kind: TlsFileKind::ClientCertFile,
                            ..
                        } => "mqtt.client_cert_file",
                        _ => "mqtt.client_key_file",
                    };
                    p.push(field, e.to_string());
                }
            }
            (Some(_), None) => p.push(
                "mqtt.client_key_file",
                "missing: client_cert_file needs the certificate's private key".into(),
            ),
            (None, Some(_)) => p.push(
                "mqtt.client_cert_file",
                "missing: client_key_file needs the certificate it belongs to".into(),
            ),
            (None, None) => {}
        }
    }
}

/// The HTTP endpoint that serves `/health` and `/metrics` while `patchflow run` runs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// `false` serves nothing, like leaving the section out.
    pub enabled: bool,
    /// `IP:PORT` to listen on. Port 0 picks a free port, which the run prints.
    pub address: String,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            address: crate::health::DEFAULT_ADDR.into(),
        }
    }
}

impl HealthConfig {
    fn problems(&self, p: &mut Problems) {
        if self.address.parse::<SocketAddr>().is_err() {
            p.push(
                "health.address",
                format!(
                    "{:?} is not an IP address and port: expected IP:PORT such as 127.0.0.1:9464 or [::1]:9464 (port 0 picks a free port)",
                    self.address
                ),
            );
        }
    }
}

/// Problems found so far, in order and without repeats. A problem in `[defaults]`
/// concerns every camera but is listed once.
#[derive(Debug, Default)]
struct Problems {
    list: Vec<String>,
    seen: HashSet<String>,
}

impl Problems {
    fn push(&mut self, field: &str, message: String) {
        let text = format!("{field}: {message}");
        if self.seen.insert(text.clone()) {
            self.list.push(text);
        }
    }
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

fn expand_all(value: &mut toml::Value, problems: &mut Problems, at: &str) {
    match value {
        toml::Value::String(s) => match expand_env(s) {
            Ok(v) => *s = v,
            Err(e) => problems.push(at, e),
        },
        toml::Value::Table(t) => {
            for (k, v) in t.iter_mut() {
                expand_all(v, problems, &join(at, k));
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

fn join(at: &str, key: &str) -> String {
    if at.is_empty() {
        key.to_owned()
    } else {
        format!("{at}.{key}")
    }
}

/// Sections merged key by key from the defaults, the line and the camera.
const MERGED_SECTIONS: [&str; 5] = ["model", "scoring", "alarm", "restart", "snapshot"];

const DEFAULTS_KEYS: [&str; 6] = ["model", "scoring", "alarm", "restart", "snapshot", "sink"];
const LINE_KEYS: [&str; 8] = [
    "name", "model", "scoring", "alarm", "restart", "snapshot", "sink", "cameras",
];
const CAMERA_KEYS: [&str; 8] = [
    "name", "source", "model", "scoring", "alarm", "restart", "snapshot", "sink",
];

/// One section (or the camera's whole table) with the path it was read from.
type Located<'a> = (&'a toml::Table, String);

impl Config {
    /// Reads, expands and validates a config file. Every problem is reported at once.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let fail = |problems: Vec<String>| ConfigError {
            path: path.to_path_buf(),
            problems,
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| fail(vec![format!("cannot read the file: {e}")]))?;
        // Absolute, so that paths in logs and event messages do not depend on the
        // directory the run was started from.
        let parent = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let base = std::fs::canonicalize(parent).unwrap_or_else(|_| parent.to_path_buf());
        let mut config = Self::parse(&text, &base).map_err(fail)?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parses config text. Relative paths are resolved against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self, Vec<String>> {
        let mut value: toml::Value = toml::from_str(text).map_err(|e| vec![e.to_string()])?;
        let mut p = Problems::default();
        expand_all(&mut value, &mut p, "");
        let root = value.as_table().cloned().unwrap_or_default();

        for key in root.keys() {
            if !["defaults", "mqtt", "health", "lines"].contains(&key.as_str()) {
                let hint = if ["name", "source", "model", "scoring", "sink"].contains(&key.as_str())
                {
                    ": settings of a line go under [[lines]], cameras under [[lines.cameras]] and shared settings under [defaults] (see `patchflow config example`)"
                } else {
                    ": expected defaults, mqtt, health or lines"
                };
                p.push(key, format!("unknown key{hint}"));
            }
        }

        let empty = toml::Table::new();
        let defaults = table_at(&root, "defaults", "", &mut p).unwrap_or(&empty);
        check_keys(defaults, "defaults", &DEFAULTS_KEYS, &mut p);
        check_sections(defaults, "defaults", &mut p);

        let mqtt = root.get("mqtt").and_then(|value| {
            let mut mqtt: MqttConfig = parse_whole(value, "mqtt", &mut p)?;
            for file in [
                &mut mqtt.password_file,
                &mut mqtt.ca_file,
                &mut mqtt.client_cert_file,
                &mut mqtt.client_key_file,
            ]
            .into_iter()
            .flatten()
            {
                resolve(file, base);
            }
            mqtt.problems(&mut p);
            Some(mqtt)
        });

        let health = parse_health(&root, &mut p);

        let lines = match root.get("lines") {
            Some(toml::Value::Array(lines)) => lines.as_slice(),
            Some(_) => {
                p.push("lines", "expected an array of tables: [[lines]]".into());
                &[]
            }
            None => {
                p.push(
                    "lines",
                    "missing: add at least one [[lines]] with a [[lines.cameras]]".into(),
                );
                &[]
            }
        };
        if root.contains_key("lines") && lines.is_empty() {
            p.push("lines", "must contain at least one line".into());
        }

        let has_mqtt = root.contains_key("mqtt");
        let mut cameras = Vec::new();
        let mut camera_names: HashMap<String, String> = HashMap::new();
        let mut line_names: HashMap<String, String> = HashMap::new();
        for (i, line) in lines.iter().enumerate() {
            let at = format!("lines[{i}]");
            let Some(line) = line.as_table() else {
                p.push(&at, "expected a table".into());
                continue;
            };
            check_keys(line, &at, &LINE_KEYS, &mut p);
            check_sections(line, &at, &mut p);
            let line_name = name_at(line, &at, &mut p);
            if let Some(name) = &line_name
                && let Some(first) = line_names.insert(name.clone(), at.clone())
            {
                p.push(
                    &format!("{at}.name"),
                    format!("{name:?} is already the name of {first}"),
                );
            }
            let list = match line.get("cameras") {
                Some(toml::Value::Array(list)) if !list.is_empty() => list.as_slice(),
                Some(toml::Value::Array(_)) | None => {
                    p.push(
                        &format!("{at}.cameras"),
                        "missing: add at least one [[lines.cameras]]".into(),
                    );
                    &[]
                }
                Some(_) => {
                    p.push(
                        &format!("{at}.cameras"),
                        "expected an array of tables: [[lines.cameras]]".into(),
                    );
                    &[]
                }
            };
            for (j, camera) in list.iter().enumerate() {
                let camera_at = format!("{at}.cameras[{j}]");
                let Some(camera) = camera.as_table() else {
                    p.push(&camera_at, "expected a table".into());
                    continue;
                };
                check_keys(camera, &camera_at, &CAMERA_KEYS, &mut p);
                check_sections(camera, &camera_at, &mut p);
                let name = name_at(camera, &camera_at, &mut p);
                if let Some(name) = &name
                    && let Some(first) = camera_names.insert(name.clone(), camera_at.clone())
                {
                    p.push(
                        &format!("{camera_at}.name"),
                        format!(
                            "{name:?} is already the name of {first}: camera names are MQTT topic levels and must be unique in the file"
                        ),
                    );
                }
                let levels = [
                    (defaults, "defaults".to_owned()),
                    (line, at.clone()),
                    (camera, camera_at.clone()),
                ];
                // An invalid name is already reported. The camera's other settings are
                // still checked, so that one run lists every problem.
                let line_name = line_name.clone().unwrap_or_default();
                let name = name.unwrap_or_default();
                if let Some(camera) =
                    build_camera(&line_name, name, &levels, base, has_mqtt, &mut p)
                {
                    cameras.push(camera);
                }
            }
        }

        if p.list.is_empty() {
            Ok(Config {
                mqtt,
                health,
                cameras,
                source: None,
            })
        } else {
            Err(p.list)
        }
    }
}

/// Reads `[health]`, key by key so that each invalid key is named. Returns `None` when the
/// section is missing, invalid or disabled.
fn parse_health(root: &toml::Table, p: &mut Problems) -> Option<HealthConfig> {
    let before = p.list.len();
    check_merged::<HealthConfig>(root, "", "health", p);
    let section = root.get("health")?;
    if p.list.len() > before {
        return None;
    }
    let health: HealthConfig = parse_whole(section, "health", p)?;
    health.problems(p);
    (p.list.len() == before && health.enabled).then_some(health)
}

/// Returns the table under `key`, reporting a value of another type.
fn table_at<'a>(
    table: &'a toml::Table,
    key: &str,
    at: &str,
    p: &mut Problems,
) -> Option<&'a toml::Table> {
    match table.get(key)? {
        toml::Value::Table(t) => Some(t),
        _ => {
            p.push(&join(at, key), "expected a table".into());
            None
        }
    }
}

fn check_keys(table: &toml::Table, at: &str, known: &[&str], p: &mut Problems) {
    for key in table.keys() {
        if !known.contains(&key.as_str()) {
            p.push(
                &join(at, key),
                format!("unknown key, expected one of: {}", known.join(", ")),
            );
        }
    }
}

/// Checks the types and names of the section keys at one level, so that each problem is
/// reported where it is written, once.
fn check_sections(level: &toml::Table, at: &str, p: &mut Problems) {
    check_merged::<ModelSection>(level, at, "model", p);
    check_merged::<ScoringConfig>(level, at, "scoring", p);
    check_merged::<AlarmConfig>(level, at, "alarm", p);
    check_merged::<RestartConfig>(level, at, "restart", p);
    check_merged::<SnapshotConfig>(level, at, "snapshot", p);
    if let Some(sink) = level.get("sink") {
        parse_whole::<SinkConfig>(sink, &join(at, "sink"), p);
    }
    if let Some(source) = level.get("source") {
        parse_whole::<SourceConfig>(source, &join(at, "source"), p);
    }
}

/// Checks a section that is merged key by key: each key on its own, so that every bad key
/// is named.
fn check_merged<T: DeserializeOwned>(
    level: &toml::Table,
    at: &str,
    section: &str,
    p: &mut Problems,
) {
    let Some(table) = table_at(level, section, at, p) else {
        return;
    };
    let section_at = join(at, section);
    for (key, value) in table {
        let single = toml::Table::from_iter([(key.clone(), value.clone())]);
        if let Err(e) = toml::Value::Table(single).try_into::<T>() {
            p.push(&join(&section_at, key), clean_error(&e));
        }
    }
}

/// Deserialises a section that is used as a whole, such as `source` or `mqtt`.
fn parse_whole<T: DeserializeOwned>(value: &toml::Value, at: &str, p: &mut Problems) -> Option<T> {
    match value.clone().try_into::<T>() {
        Ok(parsed) => Some(parsed),
        Err(e) => {
            p.push(at, clean_error(&e));
            None
        }
    }
}

/// Returns the message of a TOML error on one line.
fn clean_error(error: &toml::de::Error) -> String {
    error.message().trim().replace('\n', " ")
}

fn name_at(table: &toml::Table, at: &str, p: &mut Problems) -> Option<String> {
    let field = format!("{at}.name");
    match table.get("name") {
        Some(toml::Value::String(name)) => {
            if name.trim().is_empty() || name.contains(['/', '#', '+', '\0']) {
                p.push(
                    &field,
                    format!(
                        "{name:?} must be non-empty and contain no '/', '#', '+' or NUL (it is an MQTT topic level)"
                    ),
                );
                None
            } else {
                Some(name.clone())
            }
        }
        Some(_) => {
            p.push(&field, "expected a string".into());
            None
        }
        None => {
            p.push(&field, "missing".into());
            None
        }
    }
}

/// Merges one section from the levels, least specific first. Returns the merged table
/// and the path of the level that set each key.
fn merge(levels: &[Located<'_>], section: &str) -> (toml::Table, BTreeMap<String, String>) {
    let mut merged = toml::Table::new();
    let mut origin = BTreeMap::new();
    for (level, at) in levels {
        if let Some(toml::Value::Table(table)) = level.get(section) {
            for (key, value) in table {
                merged.insert(key.clone(), value.clone());
                origin.insert(key.clone(), join(at, section));
            }
        }
    }
    (merged, origin)
}

/// Maps a camera's section keys to the paths where their values were written.
struct Origins {
    camera_at: String,
    sections: HashMap<&'static str, BTreeMap<String, String>>,
    /// Level at which `sink` was written, if any.
    sink_at: Option<String>,
}

impl Origins {
    /// Full path of `section.key`: the level that set it, or the camera for a default.
    fn path(&self, section: &str, key: &str) -> String {
        if section == "sink" {
            let at = self
                .sink_at
                .clone()
                .unwrap_or_else(|| join(&self.camera_at, "sink"));
            return join(&at, key);
        }
        self.sections
            .get(section)
            .and_then(|keys| keys.get(key))
            .map(|at| join(at, key))
            .unwrap_or_else(|| format!("{}.{section}.{key}", self.camera_at))
    }
}

fn build_camera(
    line: &str,
    name: String,
    levels: &[Located<'_>; 3],
    base: &Path,
    has_mqtt: bool,
    p: &mut Problems,
) -> Option<CameraConfig> {
    let camera_at = levels[2].1.clone();
    let mut origins = Origins {
        camera_at: camera_at.clone(),
        sections: HashMap::new(),
        sink_at: None,
    };
    let before = p.list.len();
    let mut merged = HashMap::new();
    for section in MERGED_SECTIONS {
        let (table, origin) = merge(levels, section);
        origins.sections.insert(section, origin);
        merged.insert(section, toml::Value::Table(table));
    }
    let model: Option<ModelSection> = parse_valid_keys(&merged["model"]);
    let scoring: Option<ScoringConfig> = parse_valid_keys(&merged["scoring"]);
    let alarm: Option<AlarmConfig> = parse_valid_keys(&merged["alarm"]);
    let restart: Option<RestartConfig> = parse_valid_keys(&merged["restart"]);
    let snapshot: Option<SnapshotConfig> = parse_valid_keys(&merged["snapshot"]);

    let mut sink = Some(SinkConfig::None);
    for (level, at) in levels {
        if let Some(value) = level.get("sink") {
            origins.sink_at = Some(join(at, "sink"));
            sink = value.clone().try_into().ok();
        }
    }
    let source = match levels[2].0.get("source") {
        Some(value) => value.clone().try_into::<SourceConfig>().ok(),
        None => {
            p.push(
                &format!("{camera_at}.source"),
                "missing: add a source table with a kind (images, uri, v4l2 or test)".into(),
            );
            None
        }
    };

    let (
        Some(mut model),
        Some(scoring),
        Some(alarm),
        Some(restart),
        Some(mut snapshot),
        Some(mut sink),
        Some(mut source),
    ) = (model, scoring, alarm, restart, snapshot, sink, source)
    else {
        return None;
    };
    if model.device.is_empty() {
        model.device = "cpu".into();
    }
    resolve(&mut model.path, base);
    match &mut source {
        SourceConfig::Images { location, .. } => resolve(location, base),
        SourceConfig::Uri { uri } if uri.starts_with("file://") => {
            let mut file = uri.trim_start_matches("file://").to_string();
            resolve(&mut file, base);
            *uri = format!("file://{file}");
        }
        _ => {}
    }
    if let Some(folder) = &mut snapshot.folder {
        resolve(folder, base);
    }
    match &mut sink {
        SinkConfig::File { location } => resolve(location, base),
        SinkConfig::Frames { folder } => resolve(folder, base),
        _ => {}
    }
    let camera = CameraConfig {
        line: line.to_owned(),
        name,
        source,
        model,
        scoring,
        alarm,
        sink,
        restart,
        snapshot,
    };
    let mut problems = camera.problems();
    if camera.snapshot.publish && !has_mqtt {
        problems.push((
            "snapshot",
            "publish",
            "needs an [mqtt] section to publish to: add one or set publish = false".into(),
        ));
    }
    for (section, key, message) in problems {
        let field = if section == "source" {
            format!("{camera_at}.source.{key}")
        } else {
            origins.path(section, key)
        };
        p.push(&field, message);
    }
    (p.list.len() == before).then_some(camera)
}

/// Deserialises a merged section from its valid keys only. `check_sections` has reported
/// the others, and the camera's remaining settings can still be checked.
fn parse_valid_keys<T: DeserializeOwned>(section: &toml::Value) -> Option<T> {
    let table = section.as_table()?;
    let valid: toml::Table = table
        .iter()
        .filter(|(key, value)| {
            let single = toml::Table::from_iter([((*key).clone(), (*value).clone())]);
            toml::Value::Table(single).try_into::<T>().is_ok()
        })
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    toml::Value::Table(valid).try_into().ok()
}

fn resolve(path: &mut String, base: &Path) {
    if path.is_empty() || Path::new(path.as_str()).is_absolute() {
        return;
    }
    let relative = Path::new(path.as_str());
    let mut joined = base.to_path_buf();
    let mut rest = relative.components().peekable();
    // Leading `..` steps out of `base` itself. That is exact when `base` contains no links,
    // as after canonicalisation, so only then are they folded into it.
    if std::fs::canonicalize(base).is_ok_and(|canonical| canonical == base) {
        while rest.peek() == Some(&std::path::Component::ParentDir) && joined.pop() {
            rest.next();
        }
    }
    joined.extend(rest);
    *path = joined.to_string_lossy().into_owned();
}

impl CameraConfig {
    /// Problems that deserialisation cannot see, as (section, key, message).
    fn problems(&self) -> Vec<(&'static str, &'static str, String)> {
        let mut p = Vec::new();
        let model = Path::new(&self.model.path);
        if self.model.path.is_empty() {
            p.push((
                "model",
                "path",
                "missing: set model.path in [defaults], the line or the camera".into(),
            ));
        } else if !model.is_file() {
            p.push((
                "model",
                "path",
                format!(
                    "{} not found: train a model with `patchflow train`",
                    self.model.path
                ),
            ));
        } else if let Err(e) = crate::checkpoint::read_meta(model) {
            p.push(("model", "path", format!("{}: {e}", self.model.path)));
        }
        if let Err(e) = crate::device::parse(&self.model.device) {
            p.push(("model", "device", format!("{:?}: {e}", self.model.device)));
        }

        let s = &self.scoring;
        match s.threshold_domain.parse::<ScoreDomain>() {
            Ok(domain) => {
                if let Some(Err(e)) = s.threshold.map(|t| Threshold::new(t as f32, domain)) {
                    p.push(("scoring", "threshold", e));
                }
            }
            Err(e) => p.push(("scoring", "threshold_domain", e.to_string())),
        }
        if !(0.0..=1.0).contains(&s.alpha) {
            p.push((
                "scoring",
                "alpha",
                format!("{} must be between 0 and 1", s.alpha),
            ));
        }
        if !(1..=1000).contains(&s.interval) {
            p.push((
                "scoring",
                "interval",
                format!("{} must be from 1 (every frame) to 1000", s.interval),
            ));
        }
        if !SCORING_MODES.contains(&s.mode.as_str()) {
            p.push((
                "scoring",
                "mode",
                format!(
                    "{:?}: expected interval (every Nth frame, on the streaming thread) or newest (the newest frame, on a worker thread)",
                    s.mode
                ),
            ));
        }
        if !["jet", "hot"].contains(&s.colormap.as_str()) {
            p.push((
                "scoring",
                "colormap",
                format!("{:?}: expected jet or hot", s.colormap),
            ));
        }

        for invalid in self.alarm.validate() {
            p.push((
                "alarm",
                invalid.field,
                format!("{} {}", invalid.value, invalid.reason),
            ));
        }

        let r = &self.restart;
        if !(r.initial_delay.is_finite() && r.initial_delay > 0.0) {
            p.push((
                "restart",
                "initial_delay",
                format!("{} must be a number of seconds above 0", r.initial_delay),
            ));
        }
        if !(r.max_delay.is_finite() && r.max_delay >= r.initial_delay) {
            p.push((
                "restart",
                "max_delay",
                format!(
                    "{} must be a number of seconds, at least initial_delay ({})",
                    r.max_delay, r.initial_delay
                ),
            ));
        }

        match &self.source {
            SourceConfig::Images {
                location,
                framerate,
                ..
            } => {
                if super::pipeline::image_decoder(location).is_none()
                    && !Path::new(location).is_dir()
                {
                    p.push((
                        "source",
                        "location",
                        format!(
                            "{location:?}: expected a folder, or .png, .jpg or .jpeg files as a glob (frames/*.png) or a numbered pattern (frames/%05d.png)"
                        ),
                    ));
                }
                if *framerate == 0 {
                    p.push(("source", "framerate", "must be at least 1".into()));
                }
            }
            SourceConfig::Uri { uri } if !uri.contains("://") => {
                p.push((
                    "source",
                    "uri",
                    format!(
                        "{uri:?}: expected a URI such as file:///path/video.mp4 or rtsp://host/stream"
                    ),
                ));
            }
            SourceConfig::Test {
                num_buffers,
                width,
                height,
                framerate,
                pattern,
                ..
            } => {
                if *framerate == 0 {
                    p.push(("source", "framerate", "must be at least 1".into()));
                }
                if !(1..=i32::MAX as u32).contains(num_buffers) {
                    p.push((
                        "source",
                        "num_buffers",
                        format!("{num_buffers} must be from 1 to {}", i32::MAX),
                    ));
                }
                for (key, value) in [("width", width), ("height", height)] {
                    if !(1..=MAX_TEST_SIZE).contains(value) {
                        p.push((
                            "source",
                            key,
                            format!("{value} must be from 1 to {MAX_TEST_SIZE} pixels"),
                        ));
                    }
                }
                if let Some(pattern) = pattern
                    && !TEST_PATTERNS.contains(&pattern.as_str())
                {
                    p.push((
                        "source",
                        "pattern",
                        format!("{pattern:?}: expected one of {}", TEST_PATTERNS.join(", ")),
                    ));
                }
            }
            _ => {}
        }

        let snapshot = &self.snapshot;
        if !(1..=100).contains(&snapshot.quality) {
            p.push((
                "snapshot",
                "quality",
                format!("{} must be from 1 to 100", snapshot.quality),
            ));
        }
        if snapshot.folder.as_ref().is_some_and(String::is_empty) {
            p.push((
                "snapshot",
                "folder",
                "must not be empty: remove it to save no snapshot files".into(),
            ));
        }

        if let SinkConfig::File { location } = &self.sink
            && !(location.ends_with(".avi") || location.ends_with(".mkv"))
        {
            p.push((
                "sink",
                "location",
                format!("{location:?}: expected an .avi or .mkv file"),
            ));
        }
        p
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

    /// A model file is checked on disk, so these configs name a missing one and the
    /// tests look at the other problems.
    fn problems(text: &str) -> Vec<String> {
        Config::parse(text, Path::new("/nonexistent")).unwrap_err()
    }

    fn assert_listed(problems: &[String], field: &str) {
        assert!(
            problems.iter().any(|p| p.starts_with(&format!("{field}:"))),
            "{field} missing from {problems:#?}"
        );
    }

    #[test]
    fn problems_name_full_paths() {
        let found = problems(
            r#"
[defaults.alarm]
raise_frames = 0
[defaults.scoring]
alpha = 3.0
[[lines]]
name = "a"
[lines.scoring]
colormap = "rainbow"
[[lines.cameras]]
name = "c1"
source = { kind = "test" }
[[lines.cameras]]
name = "c2"
source = { kind = "test", framerate = 0 }
scoring = { threshold = "high" }
"#,
        );
        assert_listed(&found, "defaults.alarm.raise_frames");
        assert_listed(&found, "defaults.scoring.alpha");
        assert_listed(&found, "lines[0].scoring.colormap");
        assert_listed(&found, "lines[0].cameras[1].scoring.threshold");
        assert_listed(&found, "lines[0].cameras[1].source.framerate");
        assert_listed(&found, "lines[0].cameras[0].model.path");
        // A problem in the defaults is listed once, not once per camera.
        let alpha = found
            .iter()
            .filter(|p| p.starts_with("defaults.scoring.alpha"))
            .count();
        assert_eq!(alpha, 1, "{found:#?}");
    }

    #[test]
    fn camera_overrides_line_and_defaults() {
        let dir = tempfile_dir();
        let model = dir.join("m.safetensors");
        std::fs::write(&model, b"").unwrap();
        let text = format!(
            r#"
[defaults.model]
path = "{}"
[defaults.scoring]
threshold = 0.6
alpha = 0.2
[defaults.alarm]
raise_frames = 4
[[lines]]
name = "l"
scoring = {{ alpha = 0.3 }}
[[lines.cameras]]
name = "a"
source = {{ kind = "test" }}
scoring = {{ threshold = 0.7 }}
[[lines.cameras]]
name = "b"
source = {{ kind = "test" }}
"#,
            model.display()
        );
        // The empty model file fails its check, and that problem names where the path was set.
        let found = Config::parse(&text, &dir).unwrap_err();
        assert!(
            found.iter().all(|p| p.starts_with("defaults.model.path")),
            "{found:#?}"
        );

        let mut value: toml::Value = toml::from_str(&text).unwrap();
        let root = value.as_table_mut().unwrap();
        let defaults = root["defaults"].as_table().unwrap().clone();
        let line = root["lines"][0].as_table().unwrap().clone();
        let camera = line["cameras"][0].as_table().unwrap().clone();
        let levels = [
            (&defaults, "defaults".to_owned()),
            (&line, "lines[0]".to_owned()),
            (&camera, "lines[0].cameras[0]".to_owned()),
        ];
        let (scoring, origin) = merge(&levels, "scoring");
        let scoring: ScoringConfig = toml::Value::Table(scoring).try_into().unwrap();
        assert_eq!(scoring.threshold, Some(0.7));
        assert_eq!(scoring.alpha, 0.3);
        assert_eq!(scoring.colormap, "jet");
        assert_eq!(origin["threshold"], "lines[0].cameras[0].scoring");
        assert_eq!(origin["alpha"], "lines[0].scoring");
        let (alarm, _) = merge(&levels, "alarm");
        let alarm: AlarmConfig = toml::Value::Table(alarm).try_into().unwrap();
        assert_eq!(alarm.raise_frames, 4);
    }

    fn tempfile_dir() -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("patchflow-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn old_single_line_format_gets_a_hint() {
        let found = problems("name = \"x\"\n[source]\nkind = \"test\"\n");
        assert_listed(&found, "name");
        assert!(found[0].contains("[[lines]]"), "{found:#?}");
    }

    #[test]
    fn duplicate_camera_names_are_rejected() {
        let found = problems(
            r#"
[[lines]]
name = "a"
[[lines.cameras]]
name = "cam"
source = { kind = "test" }
[[lines]]
name = "b"
[[lines.cameras]]
name = "cam"
source = { kind = "test" }
"#,
        );
        assert_listed(&found, "lines[1].cameras[0].name");
    }

    #[test]
    fn mqtt_problems_are_listed() {
        let found = problems(
            r#"
[mqtt]
url = "http://x"
prefix = "a/#"
score_max_rate = -1.0
password_env = "PATCHFLOW_TEST_UNSET_PASSWORD"
state = { qos = 3 }
[[lines]]
name = "a"
[[lines.cameras]]
name = "cam"
source = { kind = "test" }
"#,
        );
        for field in [
            "mqtt.url",
            "mqtt.prefix",
            "mqtt.score_max_rate",
            "mqtt.password_env",
            "mqtt.username",
            "mqtt.state.qos",
        ] {
            assert_listed(&found, field);
        }
    }

    /// Returns the problems of a config whose `[mqtt]` section is `mqtt`.
    fn mqtt_problems(mqtt: &str) -> Vec<String> {
        problems(&format!(
            "[mqtt]\n{mqtt}\n[[lines]]\nname = \"a\"\n[[lines.cameras]]\nname = \"cam\"\nsource = {{ kind = \"test\" }}\n"
        ))
    }

    /// Returns the problem listed for `field`, failing when there is none.
    fn problem_of<'a>(problems: &'a [String], field: &str) -> &'a str {
        problems
            .iter()
            .find(|p| p.starts_with(&format!("{field}:")))
            .unwrap_or_else(|| panic!("{field} missing from {problems:#?}"))
    }

    #[test]
    fn tls_files_need_mqtts_url() {
        let found = mqtt_problems(
            r#"url = "mqtt://127.0.0.1:1883"
ca_file = "ca.pem"
client_cert_file = "client.pem"
client_key_file = "client.key""#,
        );
        for field in [
            "mqtt.ca_file",
            "mqtt.client_cert_file",
            "mqtt.client_key_file",
        ] {
            let problem = problem_of(&found, field);
            assert!(problem.contains("only used with TLS"), "{problem}");
            assert!(problem.contains("mqtts://"), "{problem}");
        }
        assert!(
            !found.iter().any(|p| p.starts_with("mqtt.url")),
            "{found:#?}"
        );
    }

    #[test]
    fn tls_client_key_and_cert_go_together() {
        let found = mqtt_problems(
            r#"url = "mqtts://broker.example"
client_key_file = "client.key""#,
        );
        let problem = problem_of(&found, "mqtt.client_cert_file");
        assert!(
            problem.starts_with("mqtt.client_cert_file: missing"),
            "{problem}"
        );

        let found = mqtt_problems(
            r#"url = "mqtts://broker.example"
client_cert_file = "client.pem""#,
        );
        let problem = problem_of(&found, "mqtt.client_key_file");
        assert!(
            problem.starts_with("mqtt.client_key_file: missing"),
            "{problem}"
        );
    }

    #[test]
    fn tls_files_are_read_and_parsed() {
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("not-pem.txt");
        std::fs::write(&not_pem, "plain text\n").unwrap();
        let rsa_key = dir.path().join("rsa.key");
        std::fs::write(&rsa_key, "-----BEGIN RSA PRIVATE KEY-----\nAAAA\n").unwrap();

        // Relative paths are resolved against the config's folder, /nonexistent here.
        let found = mqtt_problems(
            r#"url = "mqtts://broker.example:8884"
ca_file = "ca.pem""#,
        );
        let problem = problem_of(&found, "mqtt.ca_file");
        assert!(problem.contains("/nonexistent/ca.pem"), "{problem}");
        assert!(problem.contains("cannot read the file"), "{problem}");

        let found = mqtt_problems(&format!(
            "url = \"mqtts://broker.example\"\nca_file = \"{}\"",
            not_pem.display()
        ));
        let problem = problem_of(&found, "mqtt.ca_file");
        assert!(problem.contains("no PEM certificate"), "{problem}");

        // The certificate is checked first, so a bad certificate is blamed on its own field.
        let found = mqtt_problems(&format!(
            "url = \"mqtts://broker.example\"\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"",
            not_pem.display(),
            rsa_key.display()
        ));
        let problem = problem_of(&found, "mqtt.client_cert_file");
        assert!(problem.contains("no PEM certificate"), "{problem}");
        assert!(
            !found.iter().any(|p| p.starts_with("mqtt.client_key_file")),
            "{found:#?}"
        );
    }

    #[test]
    fn tls_url_with_ipv6_literal_is_rejected() {
        let found = mqtt_problems(r#"url = "mqtts://[::1]:8883""#);
        let problem = problem_of(&found, "mqtt.url");
        assert!(problem.contains("host name"), "{problem}");
    }

    fn health_section(text: &str) -> (Option<HealthConfig>, Vec<String>) {
        let root: toml::Table = toml::from_str(text).unwrap();
        let mut p = Problems::default();
        let health = parse_health(&root, &mut p);
        (health, p.list)
    }

    #[test]
    fn health_section_defaults_to_loopback() {
        let (health, found) = health_section("[health]\n");
        assert!(found.is_empty(), "{found:#?}");
        let health = health.expect("an empty [health] serves");
        assert_eq!(health.address, "127.0.0.1:9464");
        assert!(health.enabled);

        let (health, found) = health_section("[health]\naddress = \"[::1]:0\"\n");
        assert!(found.is_empty(), "{found:#?}");
        assert_eq!(health.map(|h| h.address).as_deref(), Some("[::1]:0"));
    }

    #[test]
    fn health_section_missing_or_disabled_serves_nothing() {
        let (health, found) = health_section("");
        assert!(found.is_empty(), "{found:#?}");
        assert_eq!(health, None);

        let (health, found) =
            health_section("[health]\nenabled = false\naddress = \"127.0.0.1:9000\"\n");
        assert!(found.is_empty(), "{found:#?}");
        assert_eq!(health, None);
    }

    #[test]
    fn health_problems_are_listed() {
        let cases = [
            ("address = \"localhost:9464\"", "health.address", "IP:PORT"),
            ("address = \"127.0.0.1\"", "health.address", "IP:PORT"),
            ("address = \"127.0.0.1:70000\"", "health.address", "IP:PORT"),
            ("address = 9464", "health.address", "string"),
            ("enabled = \"yes\"", "health.enabled", "bool"),
            ("adress = \"127.0.0.1:0\"", "health.adress", "unknown field"),
        ];
        for (line, field, reason) in cases {
            let (health, found) = health_section(&format!("[health]\n{line}\n"));
            assert_eq!(health, None, "{line}");
            assert_listed(&found, field);
            assert!(
                found.iter().any(|p| p.contains(reason)),
                "{line}: {reason} missing from {found:#?}"
            );
        }

        let (_, found) = health_section("health = 1\n");
        assert_listed(&found, "health");
    }

    #[test]
    fn health_problems_reach_config_check() {
        let found = problems(
            r#"
[health]
address = "nowhere"
[[lines]]
name = "a"
[[lines.cameras]]
name = "cam"
source = { kind = "test" }
"#,
        );
        assert_listed(&found, "health.address");
    }

    #[test]
    fn snapshot_problems_are_listed() {
        let found = problems(
            r#"
[defaults.snapshot]
quality = 0
publish = true
[[lines]]
name = "a"
snapshot = { folder = "" }
[[lines.cameras]]
name = "cam"
source = { kind = "test" }
snapshot = { jpeg = true }
"#,
        );
        for field in [
            "defaults.snapshot.quality",
            "defaults.snapshot.publish",
            "lines[0].snapshot.folder",
            "lines[0].cameras[0].snapshot.jpeg",
        ] {
            assert_listed(&found, field);
        }
    }

    #[test]
    fn relative_paths_leave_a_canonical_base() {
        let dir = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(dir.path()).unwrap();
        let configs = base.join("configs");
        std::fs::create_dir(&configs).unwrap();
        let mut path = "../out/shots".to_owned();
        resolve(&mut path, &configs);
        assert_eq!(Path::new(&path), base.join("out/shots"));
        let mut inner = "a/../b".to_owned();
        resolve(&mut inner, &configs);
        assert_eq!(Path::new(&inner), configs.join("a/../b"));
        let mut absolute = "/srv/x".to_owned();
        resolve(&mut absolute, &configs);
        assert_eq!(absolute, "/srv/x");
        // A base that does not exist is joined as it is.
        let mut missing = "../m".to_owned();
        resolve(&mut missing, Path::new("/nonexistent/configs"));
        assert_eq!(missing, "/nonexistent/configs/../m");
    }

    #[test]
    fn test_source_values_are_checked() {
        let found = problems(
            r#"
[[lines]]
name = "a"
[[lines.cameras]]
name = "cam"
source = { kind = "test", num_buffers = 3000000000, width = 0, pattern = "nosuchpattern" }
snapshot = { quality = 101 }
"#,
        );
        for field in [
            "lines[0].cameras[0].source.num_buffers",
            "lines[0].cameras[0].source.width",
            "lines[0].cameras[0].source.pattern",
            "lines[0].cameras[0].snapshot.quality",
        ] {
            assert_listed(&found, field);
        }
        let quality = found
            .iter()
            .find(|p| p.contains("snapshot.quality"))
            .unwrap();
        assert!(quality.contains("from 1 to 100"), "{quality}");
    }

    #[test]
    fn snapshot_defaults_are_off() {
        assert!(!SnapshotConfig::default().enabled());
        let files: SnapshotConfig = toml::from_str("folder = \"shots\"").unwrap();
        assert!(files.enabled());
        assert!(!files.publish);
        assert_eq!(files.quality, 90);
        let published: SnapshotConfig = toml::from_str("publish = true").unwrap();
        assert!(published.enabled());
        assert!(published.folder.is_none());
    }

    #[test]
    fn scoring_mode_is_checked() {
        let found = problems(
            r#"
[[lines]]
name = "a"
[[lines.cameras]]
name = "good"
source = { kind = "test", is_live = true }
scoring = { mode = "newest" }
[[lines.cameras]]
name = "bad-mode"
source = { kind = "test" }
scoring = { mode = "latest" }
[[lines.cameras]]
name = "bad-live"
source = { kind = "test", is_live = "yes" }
"#,
        );
        assert_listed(&found, "lines[0].cameras[1].scoring.mode");
        assert_listed(&found, "lines[0].cameras[2].source");
        assert!(
            !found
                .iter()
                .any(|p| p.starts_with("lines[0].cameras[0].scoring")
                    || p.starts_with("lines[0].cameras[0].source")),
            "{found:#?}"
        );
        let mode = found
            .iter()
            .find(|p| p.starts_with("lines[0].cameras[1].scoring.mode"))
            .unwrap();
        assert!(mode.contains("\"latest\""), "{mode}");
        assert!(mode.contains("interval"), "{mode}");
        assert!(mode.contains("newest"), "{mode}");
    }

    #[test]
    fn scoring_mode_defaults_to_interval() {
        assert_eq!(ScoringConfig::default().mode, "interval");
    }

    #[test]
    fn example_config_parses() {
        let value: toml::Value = toml::from_str(super::super::EXAMPLE_CONFIG).unwrap();
        let mut p = Problems::default();
        let root = value.as_table().unwrap();
        check_sections(root["defaults"].as_table().unwrap(), "defaults", &mut p);
        let mqtt: MqttConfig = root["mqtt"].clone().try_into().unwrap();
        assert_eq!(mqtt.prefix, "patchflow");
        let health = parse_health(root, &mut p).expect("the example serves health");
        assert_eq!(health, HealthConfig::default());
        let scoring: ScoringConfig = root["defaults"]["scoring"].clone().try_into().unwrap();
        assert_eq!(scoring.mode, "interval");
        assert!(p.list.is_empty(), "{:#?}", p.list);
        let found =
            Config::parse(super::super::EXAMPLE_CONFIG, Path::new("/nonexistent")).unwrap_err();
        // Only the model file, which the example names relative to the repository, is missing.
        assert!(found.iter().all(|p| p.contains("model.path")), "{found:#?}");
    }
}
