// SPDX-License-Identifier: MIT OR Apache-2.0
//! Per-camera health and Prometheus metrics, served over HTTP.
//!
//! A [`Registry`] contains one [`CameraMetrics`] per camera name. A runner calls
//! [`Registry::camera`] once per camera and keeps the returned `Arc`. The pipeline's
//! streaming thread then updates it with atomic operations, except for two short locks:
//! one around the frame times behind the fps gauge, and one around the last error text.
//! The HTTP side keeps each of them only for a binary search or a string copy.
//!
//! [`HealthServer`] serves the registry on a loopback address by default
//! ([`DEFAULT_ADDR`]). It runs one accept thread and one short-lived thread per connection,
//! up to [`ServerOptions::max_connections`]. Each connection answers one request and is
//! closed (`Connection: close`). A request head must arrive within
//! [`ServerOptions::request_timeout`] and fit in [`MAX_REQUEST_HEAD_BYTES`], so a slow or
//! malformed client only occupies its own thread. Dropping the server or calling
//! [`HealthServer::shutdown`] stops accepting, closes open connections and releases the port.
//!
//! # Endpoints
//!
//! `GET /health` returns `200 OK` when every registered camera's pipeline is running and
//! `503 Service Unavailable` otherwise, with a JSON body. A registry without cameras is
//! reported as `ok`.
//!
//! ```text
//! HTTP/1.1 503 Service Unavailable
//! Content-Type: application/json
//! Content-Length: 199
//! Connection: close
//!
//! {"status":"degraded","cameras":{"cam-1":{"running":true,"state":"ok","fps":29.97,"last_error":null},
//! "cam-2":{"running":false,"state":"ok","fps":0.0,"last_error":"rtspsrc0: could not open resource"}}}
//! ```
//!
//! (The JSON body is one line; it is wrapped here for width.) `state` is `ok` or `anomalous`,
//! and `fps` is the measured input frame rate over the last [`FPS_WINDOW`].
//!
//! `GET /metrics` returns the Prometheus text exposition format, version 0.0.4, with
//! `Content-Type: text/plain; version=0.0.4; charset=utf-8`. Every sample has a `camera`
//! label, escaped as the format requires. An excerpt:
//!
//! ```text
//! # HELP patchflow_up Whether the camera's pipeline is running (1) or not (0).
//! # TYPE patchflow_up gauge
//! patchflow_up{camera="cam-1"} 1
//! patchflow_up{camera="cam-2"} 0
//! # HELP patchflow_frames_scored_total Frames scored by the model.
//! # TYPE patchflow_frames_scored_total counter
//! patchflow_frames_scored_total{camera="cam-1"} 1523
//! patchflow_frames_scored_total{camera="cam-2"} 0
//! # HELP patchflow_frames_per_second Input frame rate measured over the last 5 s.
//! # TYPE patchflow_frames_per_second gauge
//! patchflow_frames_per_second{camera="cam-1"} 29.97
//! patchflow_frames_per_second{camera="cam-2"} 0
//! ```
//!
//! `HEAD` is answered like `GET` without a body. Other methods on these paths get
//! `405 Method Not Allowed` with an `Allow` header, and other paths get `404 Not Found`.
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::{Duration, Instant};
//! use patchflow::health::{HealthServer, Registry, ServerOptions};
//!
//! let registry = Arc::new(Registry::new());
//! let server = HealthServer::start(&ServerOptions::default(), Arc::clone(&registry))?;
//! println!("health and metrics on http://{}", server.local_addr());
//!
//! let camera = registry.camera("cam-1");
//! camera.set_running();
//! camera.record_scored(Instant::now(), Duration::from_millis(12));
//! # Ok::<(), patchflow::health::ServerError>(())
//! ```

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::mqtt::PublisherStats;

/// Address served by [`ServerOptions::default`]: loopback only, so that exposing the
/// endpoint to other hosts is an explicit choice.
pub const DEFAULT_ADDR: &str = "127.0.0.1:9464";

/// Length of the sliding window over which the fps gauge is measured.
pub const FPS_WINDOW: Duration = Duration::from_secs(5);

/// Maximum number of frame times kept for the fps gauge. Above 204 fps the window
/// covers less than [`FPS_WINDOW`], but the rate measured over it is still correct.
const FPS_MAX_SAMPLES: usize = 1024;

/// Maximum size of a request line plus headers. Larger requests get `431`.
pub const MAX_REQUEST_HEAD_BYTES: usize = 8 * 1024;

/// How long a connection is kept open after its response to read what the client still
/// sends, and the maximum number of bytes read then. See [`close_gracefully`].
const LINGER_TIMEOUT: Duration = Duration::from_millis(500);
const LINGER_MAX_BYTES: usize = 64 * 1024;

/// How long the accept loop sleeps when no connection is waiting. It bounds both the extra
/// latency of a new connection and how long [`HealthServer::shutdown`] waits for the loop.
const ACCEPT_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Pause after a failed `accept`, so that a persistent error (such as running out of file
/// descriptors) does not spin the accept thread.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(200);

/// Accept errors and rejected connections are logged the first time and then every this
/// many times.
const LOG_REPEAT_INTERVAL: u64 = 100;

const CONTENT_TYPE_JSON: &str = "application/json";
const CONTENT_TYPE_PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";
const CONTENT_TYPE_TEXT: &str = "text/plain; charset=utf-8";

/// Metrics of all cameras in a process, keyed by camera name.
///
/// Share it as `Arc<Registry>` between the runner and [`HealthServer`].
#[derive(Debug, Default)]
pub struct Registry {
    cameras: RwLock<BTreeMap<String, Arc<CameraMetrics>>>,
}

impl Registry {
    /// Creates an empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Returns the metrics of camera `name`, creating them on first use.
    ///
    /// Every call with the same name returns the same `Arc`. A new camera starts as not
    /// running, so `/health` reports `degraded` until [`CameraMetrics::set_running`] is called.
    pub fn camera(&self, name: &str) -> Arc<CameraMetrics> {
        let cameras = self.cameras.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(camera) = cameras.get(name) {
            return Arc::clone(camera);
        }
        drop(cameras);

        let mut cameras = self.cameras.write().unwrap_or_else(PoisonError::into_inner);
        let camera = cameras.entry(name.to_owned()).or_default();
        Arc::clone(camera)
    }

    /// Copies every camera's values at time `now`, sorted by camera name.
    pub fn snapshot(&self, now: Instant) -> Vec<(String, CameraSnapshot)> {
        // Clone the handles first so that no camera is read while the map is locked.
        let cameras: Vec<(String, Arc<CameraMetrics>)> = self
            .cameras
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(name, camera)| (name.clone(), Arc::clone(camera)))
            .collect();
        cameras
            .into_iter()
            .map(|(name, camera)| (name, camera.snapshot(now)))
            .collect()
    }
}

/// Counters and gauges of one camera, updated by its pipeline.
///
/// Obtain it from [`Registry::camera`]. Every method takes `&self` and is safe to call from
/// several threads at once.
#[derive(Debug, Default)]
pub struct CameraMetrics {
    frames_scored: AtomicU64,
    frames_anomalous: AtomicU64,
    /// Bits of the highest normalised score as an `f64`, 0.0 before the first frame.
    max_normalized_score_bits: AtomicU64,
    frames_skipped: AtomicU64,
    events: AtomicU64,
    snapshots: AtomicU64,
    anomalous: AtomicBool,
    last_inference_ns: AtomicU64,
    inference_total_ns: AtomicU64,
    mqtt_queue_depth: AtomicU64,
    mqtt_published: AtomicU64,
    mqtt_dropped: AtomicU64,
    source_restarts: AtomicU64,
    running: AtomicBool,
    last_error: Mutex<Option<String>>,
    frame_times: FrameTimes,
}

impl CameraMetrics {
    /// Counts a frame that the model scored at `at`, taking `inference` to run.
    ///
    /// `at` also feeds the fps gauge. Pass `Instant::now()` when the frame arrives.
    pub fn record_scored(&self, at: Instant, inference: Duration) {
        let nanos = u64::try_from(inference.as_nanos()).unwrap_or(u64::MAX);
        self.last_inference_ns.store(nanos, Ordering::Relaxed);
        self.inference_total_ns.fetch_add(nanos, Ordering::Relaxed);
        self.frames_scored.fetch_add(1, Ordering::Relaxed);
        self.frame_times.push(at);
    }

    /// Records the decision on a scored frame: its normalised score, which raises the
    /// maximum, and whether it is above the threshold. NaN scores leave the maximum as it is.
    pub fn record_score(&self, normalized_score: f64, is_anomalous: bool) {
        if is_anomalous {
            self.frames_anomalous.fetch_add(1, Ordering::Relaxed);
        }
        // fetch_update retries when another thread raised the maximum in between.
        let _ = self.max_normalized_score_bits.fetch_update(
            Ordering::Relaxed,
            Ordering::Relaxed,
            |bits| (normalized_score > f64::from_bits(bits)).then(|| normalized_score.to_bits()),
        );
    }

    /// Counts a frame that arrived at `at` and was passed on without scoring.
    ///
    /// Skipped frames count towards the fps gauge, which measures the input rate.
    pub fn record_skipped(&self, at: Instant) {
        self.record_skipped_frames(1, at);
    }

    /// Counts `count` frames passed on without scoring, all taken as arriving at `at`.
    ///
    /// For a skip counter that is read periodically rather than per frame. Within the fps
    /// window the rate stays right, because the gauge divides a frame count by a time span.
    pub fn record_skipped_frames(&self, count: u64, at: Instant) {
        self.frames_skipped.fetch_add(count, Ordering::Relaxed);
        // More than FPS_MAX_SAMPLES equal times would only push older ones out of the queue.
        for _ in 0..count.min(FPS_MAX_SAMPLES as u64) {
            self.frame_times.push(at);
        }
    }

    /// Counts an anomaly event raised for this camera.
    pub fn record_event(&self) {
        self.events.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts `count` event snapshot files written.
    pub fn record_snapshots(&self, count: u64) {
        self.snapshots.fetch_add(count, Ordering::Relaxed);
    }

    /// Sets the camera's current state: anomalous or ok.
    pub fn set_anomalous(&self, anomalous: bool) {
        self.anomalous.store(anomalous, Ordering::Relaxed);
    }

    /// Copies the MQTT publisher's queue depth and its cumulative published and dropped
    /// counts. Call it periodically with [`crate::mqtt::Publisher::stats`].
    pub fn set_mqtt_stats(&self, stats: &PublisherStats) {
        self.mqtt_queue_depth
            .store(stats.queued as u64, Ordering::Relaxed);
        self.mqtt_published
            .store(stats.published, Ordering::Relaxed);
        self.mqtt_dropped.store(stats.dropped, Ordering::Relaxed);
    }

    /// Counts a restart of the camera's video source.
    pub fn record_restart(&self) {
        self.source_restarts.fetch_add(1, Ordering::Relaxed);
    }

    /// Marks the camera's pipeline as running. The last error, if any, is kept.
    pub fn set_running(&self) {
        self.running.store(true, Ordering::Relaxed);
    }

    /// Marks the camera's pipeline as stopped, and stores `error` as the last error when it
    /// is given. A stopped camera makes `/health` return `503`.
    pub fn set_stopped(&self, error: Option<&str>) {
        if let Some(error) = error {
            *self
                .last_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(error.to_owned());
        }
        self.running.store(false, Ordering::Relaxed);
    }

    /// Copies the current values. `now` is the end of the fps window.
    ///
    /// Counters are read one at a time, so a snapshot taken during updates may combine
    /// values from slightly different moments.
    pub fn snapshot(&self, now: Instant) -> CameraSnapshot {
        let frames_scored = self.frames_scored.load(Ordering::Relaxed);
        let total_ns = self.inference_total_ns.load(Ordering::Relaxed);
        let mean_inference_ms = if frames_scored == 0 {
            0.0
        } else {
            total_ns as f64 / frames_scored as f64 / 1e6
        };
        CameraSnapshot {
            frames_scored,
            frames_anomalous: self.frames_anomalous.load(Ordering::Relaxed),
            max_normalized_score: f64::from_bits(
                self.max_normalized_score_bits.load(Ordering::Relaxed),
            ),
            frames_skipped: self.frames_skipped.load(Ordering::Relaxed),
            events: self.events.load(Ordering::Relaxed),
            snapshots: self.snapshots.load(Ordering::Relaxed),
            anomalous: self.anomalous.load(Ordering::Relaxed),
            last_inference_ms: self.last_inference_ns.load(Ordering::Relaxed) as f64 / 1e6,
            mean_inference_ms,
            fps: self.frame_times.fps(now),
            mqtt_queue_depth: self.mqtt_queue_depth.load(Ordering::Relaxed),
            mqtt_published: self.mqtt_published.load(Ordering::Relaxed),
            mqtt_dropped: self.mqtt_dropped.load(Ordering::Relaxed),
            source_restarts: self.source_restarts.load(Ordering::Relaxed),
            running: self.running.load(Ordering::Relaxed),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }
}

/// Values of one camera at one moment, as returned by [`CameraMetrics::snapshot`].
#[derive(Debug, Clone, PartialEq)]
pub struct CameraSnapshot {
    pub frames_scored: u64,
    /// Scored frames above the threshold.
    pub frames_anomalous: u64,
    /// Highest normalised score of a scored frame, 0 before the first one.
    pub max_normalized_score: f64,
    pub frames_skipped: u64,
    pub events: u64,
    /// Event snapshot files written.
    pub snapshots: u64,
    pub anomalous: bool,
    /// Inference time of the most recently scored frame, in milliseconds.
    pub last_inference_ms: f64,
    /// Mean inference time over all scored frames, in milliseconds.
    pub mean_inference_ms: f64,
    /// Input frame rate over the [`FPS_WINDOW`] that ends at the snapshot's time.
    pub fps: f64,
    pub mqtt_queue_depth: u64,
    pub mqtt_published: u64,
    pub mqtt_dropped: u64,
    pub source_restarts: u64,
    pub running: bool,
    pub last_error: Option<String>,
}

/// Arrival times of the most recent frames, oldest first.
#[derive(Debug, Default)]
struct FrameTimes {
    times: Mutex<VecDeque<Instant>>,
}

impl FrameTimes {
    fn push(&self, at: Instant) {
        let mut times = self.times.lock().unwrap_or_else(PoisonError::into_inner);
        // Keep the queue sorted even if callers on different threads race: a time older
        // than the newest one is recorded as the newest one.
        let at = times.back().map_or(at, |&newest| at.max(newest));
        if let Some(cutoff) = at.checked_sub(FPS_WINDOW) {
            while times.front().is_some_and(|&oldest| oldest <= cutoff) {
                times.pop_front();
            }
        }
        if times.len() == FPS_MAX_SAMPLES {
            times.pop_front();
        }
        times.push_back(at);
    }

    /// Frame rate over the window `(end - FPS_WINDOW, end]`, where `end` is the later of
    /// `now` and the newest frame time.
    ///
    /// With `n` frames in the window, the rate is `(n - 1) / (end - oldest)`: exact for a
    /// steady stream when `now` is the newest frame time, and falling towards 0 when frames
    /// stop arriving. Fewer than two frames give 0.
    ///
    /// NOTE: while the window spans only a few frames, as in the first frames of a stream,
    /// a burst of frames that arrive together reads as a very high rate.
    fn fps(&self, now: Instant) -> f64 {
        let times = self.times.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(&newest) = times.back() else {
            return 0.0;
        };
        let end = now.max(newest);
        // The times are sorted, so the frames in the window are a suffix of the queue.
        let first = match end.checked_sub(FPS_WINDOW) {
            Some(cutoff) => times.partition_point(|&t| t <= cutoff),
            None => 0,
        };
        let count = times.len() - first;
        let oldest = times.get(first).copied();
        drop(times);

        let Some(oldest) = oldest else {
            return 0.0;
        };
        let span = end.duration_since(oldest).as_secs_f64();
        if count < 2 || span == 0.0 {
            return 0.0;
        }
        (count - 1) as f64 / span
    }
}

/// Body of `GET /health`.
#[derive(Debug, Serialize)]
struct HealthBody<'a> {
    status: &'static str,
    cameras: BTreeMap<&'a str, CameraHealth<'a>>,
}

#[derive(Debug, Serialize)]
struct CameraHealth<'a> {
    running: bool,
    state: &'static str,
    fps: f64,
    last_error: Option<&'a str>,
}

/// Renders the `/health` body and returns it with whether every camera is running.
fn render_health(cameras: &[(String, CameraSnapshot)]) -> (bool, String) {
    let all_running = cameras.iter().all(|(_, camera)| camera.running);
    let body = HealthBody {
        status: if all_running { "ok" } else { "degraded" },
        cameras: cameras
            .iter()
            .map(|(name, camera)| {
                let health = CameraHealth {
                    running: camera.running,
                    state: if camera.anomalous { "anomalous" } else { "ok" },
                    fps: camera.fps,
                    last_error: camera.last_error.as_deref(),
                };
                (name.as_str(), health)
            })
            .collect(),
    };
    let json = serde_json::to_string(&body).expect("health body serializes to JSON");
    (all_running, json)
}

/// A sample value in the Prometheus text format.
enum Value {
    Count(u64),
    Real(f64),
}

impl Value {
    fn flag(value: bool) -> Self {
        Value::Count(u64::from(value))
    }
}

/// One metric family of `/metrics`: name, type, help text and how to read it from a
/// snapshot.
struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    value: fn(&CameraSnapshot) -> Value,
}

const FAMILIES: &[Family] = &[
    Family {
        name: "patchflow_up",
        kind: "gauge",
        help: "Whether the camera's pipeline is running (1) or not (0).",
        value: |c| Value::flag(c.running),
    },
    Family {
        name: "patchflow_anomalous",
        kind: "gauge",
        help: "Whether the camera's current state is anomalous (1) or ok (0).",
        value: |c| Value::flag(c.anomalous),
    },
    Family {
        name: "patchflow_frames_scored_total",
        kind: "counter",
        help: "Frames scored by the model.",
        value: |c| Value::Count(c.frames_scored),
    },
    Family {
        name: "patchflow_frames_anomalous_total",
        kind: "counter",
        help: "Scored frames above the threshold.",
        value: |c| Value::Count(c.frames_anomalous),
    },
    Family {
        name: "patchflow_normalized_score_max",
        kind: "gauge",
        help: "Highest normalised score of a scored frame since the start (0 to 1).",
        value: |c| Value::Real(c.max_normalized_score),
    },
    Family {
        name: "patchflow_frames_skipped_total",
        kind: "counter",
        help: "Frames passed on without scoring.",
        value: |c| Value::Count(c.frames_skipped),
    },
    Family {
        name: "patchflow_events_total",
        kind: "counter",
        help: "Anomaly events raised.",
        value: |c| Value::Count(c.events),
    },
    Family {
        name: "patchflow_snapshots_total",
        kind: "counter",
        help: "Event snapshot files written.",
        value: |c| Value::Count(c.snapshots),
    },
    Family {
        name: "patchflow_frames_per_second",
        kind: "gauge",
        help: "Input frame rate measured over the last 5 s.",
        value: |c| Value::Real(c.fps),
    },
    Family {
        name: "patchflow_inference_last_milliseconds",
        kind: "gauge",
        help: "Inference time of the most recently scored frame, in milliseconds.",
        value: |c| Value::Real(c.last_inference_ms),
    },
    Family {
        name: "patchflow_inference_mean_milliseconds",
        kind: "gauge",
        help: "Mean inference time over all scored frames, in milliseconds.",
        value: |c| Value::Real(c.mean_inference_ms),
    },
    Family {
        name: "patchflow_mqtt_queue_depth",
        kind: "gauge",
        help: "Messages waiting in the MQTT publisher's queue, shared by all cameras of the process.",
        value: |c| Value::Count(c.mqtt_queue_depth),
    },
    Family {
        name: "patchflow_mqtt_published_total",
        kind: "counter",
        help: "MQTT messages published by the publisher shared by all cameras of the process.",
        value: |c| Value::Count(c.mqtt_published),
    },
    Family {
        name: "patchflow_mqtt_dropped_total",
        kind: "counter",
        help: "MQTT messages dropped by the publisher shared by all cameras of the process.",
        value: |c| Value::Count(c.mqtt_dropped),
    },
    Family {
        name: "patchflow_source_restarts_total",
        kind: "counter",
        help: "Restarts of the camera's video source.",
        value: |c| Value::Count(c.source_restarts),
    },
];

/// Renders the `/metrics` body in the Prometheus text format 0.0.4.
fn render_metrics(cameras: &[(String, CameraSnapshot)]) -> String {
    let mut text = String::new();
    for family in FAMILIES {
        // Writing to a String cannot fail.
        let _ = writeln!(text, "# HELP {} {}", family.name, family.help);
        let _ = writeln!(text, "# TYPE {} {}", family.name, family.kind);
        for (name, camera) in cameras {
            let _ = write!(
                text,
                "{}{{camera=\"{}\"}} ",
                family.name,
                escape_label_value(name)
            );
            match (family.value)(camera) {
                Value::Count(count) => {
                    let _ = writeln!(text, "{count}");
                }
                Value::Real(real) => {
                    let _ = writeln!(text, "{}", format_float(real));
                }
            }
        }
    }
    text
}

/// Escapes a label value as the text format requires: backslash, double quote and line
/// feed become `\\`, `\"` and `\n`.
fn escape_label_value(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            _ => escaped.push(c),
        }
    }
    escaped
}

/// Formats a float as the text format spells it: `NaN`, `+Inf` and `-Inf` for the
/// non-finite values, which Rust prints as `NaN`, `inf` and `-inf`.
fn format_float(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_owned()
    } else if value == f64::INFINITY {
        "+Inf".to_owned()
    } else if value == f64::NEG_INFINITY {
        "-Inf".to_owned()
    } else {
        value.to_string()
    }
}

/// Settings of a [`HealthServer`].
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Address to listen on, `HOST:PORT`. Port 0 picks a free port, which
    /// [`HealthServer::local_addr`] then reports.
    pub addr: String,
    /// Time a client has to send its request line and headers, and also the timeout of
    /// each write of the response.
    pub request_timeout: Duration,
    /// Maximum number of connections served at once. Further connections get `503` and are
    /// closed.
    pub max_connections: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            addr: DEFAULT_ADDR.to_owned(),
            request_timeout: Duration::from_secs(5),
            max_connections: 16,
        }
    }
}

/// Errors from [`HealthServer::start`].
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(
        "cannot serve health and metrics on {addr}: the address is already in use. Stop the \
         process that listens on it or choose another port (port 0 picks a free one)"
    )]
    AddressInUse { addr: String, source: io::Error },
    #[error("cannot serve health and metrics on {addr}: {source}")]
    Bind { addr: String, source: io::Error },
    #[error("invalid health server options: {0}")]
    InvalidOptions(&'static str),
    #[error("cannot start the health server thread: {0}")]
    Thread(io::Error),
}

/// HTTP server for `/health` and `/metrics`, running on its own threads.
///
/// Dropping it has the same effect as [`HealthServer::shutdown`].
#[derive(Debug)]
pub struct HealthServer {
    local_addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept_thread: Option<JoinHandle<()>>,
}

impl HealthServer {
    /// Binds `options.addr` and starts serving `registry` in the background.
    pub fn start(options: &ServerOptions, registry: Arc<Registry>) -> Result<Self, ServerError> {
        // The socket timeouts reject a zero duration, and a limit of zero would reject every
        // connection.
        if options.request_timeout.is_zero() {
            return Err(ServerError::InvalidOptions(
                "request_timeout must be greater than zero",
            ));
        }
        if options.max_connections == 0 {
            return Err(ServerError::InvalidOptions(
                "max_connections must be at least 1",
            ));
        }
        let listener = TcpListener::bind(options.addr.as_str()).map_err(|source| {
            let addr = options.addr.clone();
            if source.kind() == io::ErrorKind::AddrInUse {
                ServerError::AddressInUse { addr, source }
            } else {
                ServerError::Bind { addr, source }
            }
        })?;
        let bind_error = |source| ServerError::Bind {
            addr: options.addr.clone(),
            source,
        };
        let local_addr = listener.local_addr().map_err(bind_error)?;
        // A non-blocking listener lets the accept loop notice the stop flag.
        listener.set_nonblocking(true).map_err(bind_error)?;

        let stop = Arc::new(AtomicBool::new(false));
        let server = Server {
            listener,
            registry,
            options: options.clone(),
            stop: Arc::clone(&stop),
            active: Arc::new(AtomicUsize::new(0)),
            open: Arc::new(Mutex::new(HashMap::new())),
            workers: Vec::new(),
            next_id: 0,
            accept_errors: 0,
            rejected: 0,
        };
        let accept_thread = std::thread::Builder::new()
            .name("health-accept".to_owned())
            .spawn(move || server.run())
            .map_err(ServerError::Thread)?;
        tracing::info!(addr = %local_addr, "serving health and metrics");

        Ok(Self {
            local_addr,
            stop,
            accept_thread: Some(accept_thread),
        })
    }

    /// Returns the address the server listens on, with the port chosen for port 0.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting connections, closes the open ones and waits for all server threads
    /// to finish. The port is free when this returns.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(accept_thread) = self.accept_thread.take() else {
            return;
        };
        self.stop.store(true, Ordering::Relaxed);
        if accept_thread.join().is_err() {
            tracing::error!(addr = %self.local_addr, "health server accept thread panicked");
        }
        tracing::info!(addr = %self.local_addr, "stopped serving health and metrics");
    }
}

impl Drop for HealthServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// State of the accept thread.
struct Server {
    listener: TcpListener,
    registry: Arc<Registry>,
    options: ServerOptions,
    stop: Arc<AtomicBool>,
    /// Connections being served, counted for [`ServerOptions::max_connections`].
    active: Arc<AtomicUsize>,
    /// Clones of the open connections by id, so that shutdown can close them.
    open: Arc<Mutex<HashMap<u64, TcpStream>>>,
    workers: Vec<JoinHandle<()>>,
    next_id: u64,
    accept_errors: u64,
    rejected: u64,
}

impl Server {
    fn run(mut self) {
        while !self.stop.load(Ordering::Relaxed) {
            match self.listener.accept() {
                Ok((stream, peer)) => self.serve(stream, peer),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    self.workers.retain(|worker| !worker.is_finished());
                    std::thread::sleep(ACCEPT_POLL_INTERVAL);
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    self.accept_errors += 1;
                    if self.accept_errors == 1
                        || self.accept_errors.is_multiple_of(LOG_REPEAT_INTERVAL)
                    {
                        tracing::warn!(
                            addr = ?self.listener.local_addr().ok(),
                            %error,
                            count = self.accept_errors,
                            "health server failed to accept a connection"
                        );
                    }
                    std::thread::sleep(ACCEPT_ERROR_BACKOFF);
                }
            }
        }
        self.close_connections();
    }

    fn serve(&mut self, stream: TcpStream, peer: SocketAddr) {
        // Accepted sockets inherit non-blocking mode from the listener on some platforms.
        if let Err(error) = stream.set_nonblocking(false) {
            tracing::warn!(%peer, %error, "health server cannot use a connection");
            return;
        }
        if self.active.load(Ordering::Relaxed) >= self.options.max_connections {
            self.reject(stream, peer);
            return;
        }

        let id = self.next_id;
        self.next_id += 1;
        match stream.try_clone() {
            Ok(clone) => {
                self.open
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(id, clone);
            }
            Err(error) => {
                tracing::warn!(%peer, %error, "health server cannot use a connection");
                return;
            }
        }
        self.active.fetch_add(1, Ordering::Relaxed);
        let connection = Connection {
            id,
            peer,
            stream,
            registry: Arc::clone(&self.registry),
            request_timeout: self.options.request_timeout,
            active: Arc::clone(&self.active),
            open: Arc::clone(&self.open),
        };
        match std::thread::Builder::new()
            .name("health-connection".to_owned())
            .spawn(move || connection.handle())
        {
            Ok(worker) => self.workers.push(worker),
            // Dropping the closure dropped the connection, whose `Drop` frees its slot.
            Err(error) => tracing::warn!(%peer, %error, "health server cannot start a thread"),
        }
    }

    /// Sends `503` to a connection beyond the limit, without reading its request.
    fn reject(&mut self, mut stream: TcpStream, peer: SocketAddr) {
        self.rejected += 1;
        if self.rejected == 1 || self.rejected.is_multiple_of(LOG_REPEAT_INTERVAL) {
            tracing::warn!(
                %peer,
                max_connections = self.options.max_connections,
                count = self.rejected,
                "health server is at its connection limit, rejecting a connection"
            );
        }
        let response = Response::text(503, "too many connections\n");
        // A short write timeout keeps a client that does not read from stalling the loop.
        let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
        let _ = response.write_to(&mut stream, true);
        let _ = stream.shutdown(std::net::Shutdown::Both);
    }

    fn close_connections(&mut self) {
        for stream in self
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
        {
            // The connection may have closed itself already.
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        for worker in self.workers.drain(..) {
            if worker.join().is_err() {
                tracing::error!("health server connection thread panicked");
            }
        }
    }
}

/// One accepted connection, served on its own thread.
struct Connection {
    id: u64,
    peer: SocketAddr,
    stream: TcpStream,
    registry: Arc<Registry>,
    request_timeout: Duration,
    active: Arc<AtomicUsize>,
    open: Arc<Mutex<HashMap<u64, TcpStream>>>,
}

impl Connection {
    fn handle(mut self) {
        let deadline = Instant::now() + self.request_timeout;
        let peer = self.peer;
        // Client errors are logged at debug level only, because any host that can reach the
        // port can cause them.
        let routed = match read_request_head(&mut self.stream, deadline) {
            Ok(head) => match parse_request(&head) {
                Ok(request) => route(&self.registry, &request),
                Err(error) => {
                    tracing::debug!(%peer, ?error, "health server rejected a malformed request");
                    error.response()
                }
            },
            Err(ReadError::TooLarge) => {
                tracing::debug!(%peer, "health server rejected a request head that is too large");
                Routed::Full(Response::text(431, "request head too large\n"))
            }
            Err(ReadError::TimedOut) => {
                tracing::debug!(%peer, "health server timed out waiting for a request");
                Routed::Full(Response::text(408, "request timed out\n"))
            }
            // The client is gone, so no response is sent.
            Err(ReadError::Closed) => return,
            Err(ReadError::Io(error)) => {
                tracing::debug!(%peer, %error, "health server failed to read a request");
                return;
            }
        };
        let (response, with_body) = match routed {
            Routed::Full(response) => (response, true),
            Routed::HeadOnly(response) => (response, false),
        };

        let _ = self.stream.set_write_timeout(Some(self.request_timeout));
        // The client may have gone away, which is not the server's error.
        if let Err(error) = response.write_to(&mut self.stream, with_body) {
            tracing::debug!(%peer, %error, "health server failed to send a response");
        }
        close_gracefully(&mut self.stream);
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
        self.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Closes a connection after its response. It sends FIN, then reads and discards what the
/// client still sends for up to [`LINGER_TIMEOUT`], because closing a socket with unread
/// data makes the kernel reset the connection, and the client may then lose the response.
fn close_gracefully(stream: &mut TcpStream) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let deadline = Instant::now() + LINGER_TIMEOUT;
    let mut discarded = 0;
    let mut chunk = [0u8; 1024];
    while discarded < LINGER_MAX_BYTES {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() || stream.set_read_timeout(Some(remaining)).is_err() {
            return;
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(count) => discarded += count,
        }
    }
}

#[derive(Debug)]
enum ReadError {
    /// The client closed the connection before the end of the headers.
    Closed,
    TimedOut,
    TooLarge,
    /// Any other I/O error, including the socket being shut down by the server.
    Io(io::Error),
}

/// Reads up to and including the blank line that ends the headers. Bytes after it are
/// ignored, because only `GET` and `HEAD` are served and they carry no body.
fn read_request_head(stream: &mut TcpStream, deadline: Instant) -> Result<Vec<u8>, ReadError> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(ReadError::TimedOut);
        }
        stream
            .set_read_timeout(Some(remaining))
            .map_err(ReadError::Io)?;
        let limit = chunk.len().min(MAX_REQUEST_HEAD_BYTES - head.len());
        let count = match stream.read(&mut chunk[..limit]) {
            Ok(0) => return Err(ReadError::Closed),
            Ok(count) => count,
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ReadError::TimedOut);
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(ReadError::Io(error)),
        };

        // The terminator may straddle two reads, so search from a little before the new data.
        let search_from = head.len().saturating_sub(3);
        head.extend_from_slice(&chunk[..count]);
        if let Some(end) = find_head_end(&head[search_from..]) {
            head.truncate(search_from + end);
            return Ok(head);
        }
        if head.len() >= MAX_REQUEST_HEAD_BYTES {
            return Err(ReadError::TooLarge);
        }
    }
}

/// Returns the length of the head in `bytes` if it contains the blank line that ends it:
/// `\r\n\r\n`, or `\n\n` from clients that end lines with a bare line feed.
fn find_head_end(bytes: &[u8]) -> Option<usize> {
    (0..bytes.len()).find_map(|i| {
        if bytes[i..].starts_with(b"\r\n\r\n") {
            Some(i + 4)
        } else if bytes[i..].starts_with(b"\n\n") {
            Some(i + 2)
        } else {
            None
        }
    })
}

#[derive(Debug, PartialEq)]
struct Request {
    method: String,
    /// Path of the request target, without its query.
    path: String,
}

#[derive(Debug, PartialEq)]
enum ParseError {
    Malformed(&'static str),
    UnsupportedVersion,
}

impl ParseError {
    fn response(&self) -> Routed {
        match self {
            ParseError::Malformed(reason) => {
                Routed::Full(Response::text(400, &format!("bad request: {reason}\n")))
            }
            ParseError::UnsupportedVersion => Routed::Full(Response::text(
                505,
                "only HTTP/1.0 and HTTP/1.1 are supported\n",
            )),
        }
    }
}

/// Parses the request line and checks the syntax of the header lines of `head`.
fn parse_request(head: &[u8]) -> Result<Request, ParseError> {
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line));
    let request_line = lines.next().unwrap_or_default();
    let request_line = std::str::from_utf8(request_line)
        .map_err(|_| ParseError::Malformed("request line is not UTF-8"))?;

    let parts: Vec<&str> = request_line.split(' ').collect();
    let [method, target, version] = parts[..] else {
        return Err(ParseError::Malformed(
            "expected a request line of the form METHOD TARGET HTTP-VERSION",
        ));
    };
    if method.is_empty() || !method.bytes().all(is_token_byte) {
        return Err(ParseError::Malformed("invalid method"));
    }
    if !target.starts_with('/') || target.bytes().any(|b| b.is_ascii_control()) {
        return Err(ParseError::Malformed(
            "request target must be an absolute path",
        ));
    }
    match version {
        "HTTP/1.1" | "HTTP/1.0" => {}
        _ if is_http_version(version) => return Err(ParseError::UnsupportedVersion),
        _ => return Err(ParseError::Malformed("invalid HTTP version")),
    }

    for line in lines.take_while(|line| !line.is_empty()) {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return Err(ParseError::Malformed("header line without a colon"));
        };
        if colon == 0 || !line[..colon].iter().copied().all(is_token_byte) {
            return Err(ParseError::Malformed("invalid header name"));
        }
    }

    let path = target.split_once('?').map_or(target, |(path, _)| path);
    Ok(Request {
        method: method.to_owned(),
        path: path.to_owned(),
    })
}

/// Returns whether `byte` may appear in an HTTP token (a method or header name): the
/// `tchar` set of RFC 9110.
fn is_token_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

/// Returns whether `version` has the form `HTTP/d.d`.
fn is_http_version(version: &str) -> bool {
    let bytes = version.as_bytes();
    bytes.len() == 8
        && bytes.starts_with(b"HTTP/")
        && bytes[5].is_ascii_digit()
        && bytes[6] == b'.'
        && bytes[7].is_ascii_digit()
}

/// A response, and whether its body is sent (`GET`) or left out (`HEAD`).
enum Routed {
    Full(Response),
    HeadOnly(Response),
}

fn route(registry: &Registry, request: &Request) -> Routed {
    let render: fn(&Registry) -> Response = match request.path.as_str() {
        "/health" => health_response,
        "/metrics" => metrics_response,
        _ => return Routed::Full(Response::text(404, "not found\n")),
    };
    match request.method.as_str() {
        "GET" => Routed::Full(render(registry)),
        "HEAD" => Routed::HeadOnly(render(registry)),
        _ => {
            let mut response = Response::text(405, "method not allowed\n");
            response.allow = true;
            Routed::Full(response)
        }
    }
}

fn health_response(registry: &Registry) -> Response {
    let (all_running, body) = render_health(&registry.snapshot(Instant::now()));
    Response {
        status: if all_running { 200 } else { 503 },
        content_type: CONTENT_TYPE_JSON,
        allow: false,
        body: body.into_bytes(),
    }
}

fn metrics_response(registry: &Registry) -> Response {
    Response {
        status: 200,
        content_type: CONTENT_TYPE_PROMETHEUS,
        allow: false,
        body: render_metrics(&registry.snapshot(Instant::now())).into_bytes(),
    }
}

struct Response {
    status: u16,
    content_type: &'static str,
    /// Whether to send `Allow: GET, HEAD`, which a `405` response must carry.
    allow: bool,
    body: Vec<u8>,
}

impl Response {
    fn text(status: u16, body: &str) -> Self {
        Self {
            status,
            content_type: CONTENT_TYPE_TEXT,
            allow: false,
            body: body.as_bytes().to_vec(),
        }
    }

    /// Writes the status line, headers and, when `with_body` is set, the body. The headers
    /// are the same either way, so `HEAD` gets the `Content-Length` that `GET` would.
    fn write_to(&self, stream: &mut impl Write, with_body: bool) -> io::Result<()> {
        let mut message = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            reason_phrase(self.status),
            self.content_type,
            self.body.len()
        );
        if self.allow {
            message.push_str("Allow: GET, HEAD\r\n");
        }
        message.push_str("\r\n");
        let mut bytes = message.into_bytes();
        if with_body {
            bytes.extend_from_slice(&self.body);
        }
        stream.write_all(&bytes)?;
        stream.flush()
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// Read timeout of the test client, so that a server that never responds fails the test
    /// instead of hanging it.
    const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

    fn loopback_options() -> ServerOptions {
        ServerOptions {
            addr: "127.0.0.1:0".to_owned(),
            ..ServerOptions::default()
        }
    }

    fn start(registry: &Arc<Registry>) -> HealthServer {
        start_with(registry, loopback_options())
    }

    fn start_with(registry: &Arc<Registry>, options: ServerOptions) -> HealthServer {
        HealthServer::start(&options, Arc::clone(registry)).expect("server starts on loopback")
    }

    #[derive(Debug)]
    struct HttpResponse {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    }

    impl HttpResponse {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(name))
                .map(|(_, value)| value.as_str())
        }

        fn json(&self) -> serde_json::Value {
            serde_json::from_str(&self.body).expect("body is JSON")
        }
    }

    fn connect(addr: SocketAddr) -> TcpStream {
        let stream = TcpStream::connect(addr).expect("connects to the server");
        stream.set_read_timeout(Some(CLIENT_TIMEOUT)).unwrap();
        stream
    }

    /// Reads a whole response from a server that closes the connection after it.
    fn read_response(stream: &mut TcpStream) -> HttpResponse {
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).expect("reads the response");
        let text = String::from_utf8(raw).expect("response is UTF-8");
        let (head, body) = text
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("response without end of headers: {text:?}"));
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        let mut parts = status_line.splitn(3, ' ');
        assert_eq!(parts.next(), Some("HTTP/1.1"), "{status_line}");
        let status = parts.next().unwrap().parse().expect("numeric status");
        let headers = lines
            .map(|line| {
                let (name, value) = line.split_once(':').expect("header has a colon");
                (name.to_owned(), value.trim().to_owned())
            })
            .collect();
        HttpResponse {
            status,
            headers,
            body: body.to_owned(),
        }
    }

    fn send(addr: SocketAddr, request: &[u8]) -> HttpResponse {
        let mut stream = connect(addr);
        stream.write_all(request).expect("sends the request");
        read_response(&mut stream)
    }

    fn get(addr: SocketAddr, path: &str) -> HttpResponse {
        let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n");
        let response = send(addr, request.as_bytes());
        let length: usize = response
            .header("Content-Length")
            .expect("Content-Length is set")
            .parse()
            .unwrap();
        assert_eq!(length, response.body.len(), "Content-Length of {path}");
        assert_eq!(response.header("Connection"), Some("close"));
        response
    }

    /// One sample line of the Prometheus text format.
    #[derive(Debug)]
    struct Sample {
        name: String,
        labels: Vec<(String, String)>,
        value: f64,
    }

    /// A parsed exposition: HELP and TYPE by metric name, and the samples in order.
    #[derive(Debug, Default)]
    struct Exposition {
        help: HashMap<String, String>,
        types: HashMap<String, String>,
        samples: Vec<Sample>,
    }

    impl Exposition {
        fn value(&self, name: &str, camera: &str) -> f64 {
            let matching: Vec<&Sample> = self
                .samples
                .iter()
                .filter(|s| {
                    s.name == name && s.labels == [("camera".to_owned(), camera.to_owned())]
                })
                .collect();
            assert_eq!(matching.len(), 1, "samples of {name} for {camera}");
            matching[0].value
        }
    }

    /// Parses the text format strictly enough to catch malformed output: HELP and TYPE
    /// must precede a family's samples, and only the three label escapes are accepted.
    fn parse_exposition(text: &str) -> Exposition {
        assert!(text.ends_with('\n'), "exposition ends with a line feed");
        let mut exposition = Exposition::default();
        let mut sampled = HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').expect("HELP has a name and text");
                assert!(!sampled.contains(name), "HELP of {name} after its samples");
                let previous = exposition.help.insert(name.to_owned(), help.to_owned());
                assert!(previous.is_none(), "second HELP for {name}");
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE has a name and type");
                assert!(!sampled.contains(name), "TYPE of {name} after its samples");
                let previous = exposition.types.insert(name.to_owned(), kind.to_owned());
                assert!(previous.is_none(), "second TYPE for {name}");
            } else {
                assert!(!line.starts_with('#'), "unexpected comment {line:?}");
                let sample = parse_sample(line);
                assert!(
                    exposition.help.contains_key(&sample.name),
                    "no HELP: {line}"
                );
                assert!(
                    exposition.types.contains_key(&sample.name),
                    "no TYPE: {line}"
                );
                sampled.insert(sample.name.clone());
                exposition.samples.push(sample);
            }
        }
        exposition
    }

    fn parse_sample(line: &str) -> Sample {
        let name_end = line
            .find(['{', ' '])
            .unwrap_or_else(|| panic!("sample without value: {line:?}"));
        let name = &line[..name_end];
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':'),
            "invalid metric name {name:?}"
        );

        let mut labels = Vec::new();
        let mut rest = &line[name_end..];
        if let Some(after_brace) = rest.strip_prefix('{') {
            let mut chars = after_brace.char_indices();
            loop {
                let mut label = String::new();
                for (_, c) in chars.by_ref() {
                    if c == '=' {
                        break;
                    }
                    label.push(c);
                }
                assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "{line:?}");
                let mut value = String::new();
                loop {
                    match chars.next().map(|(_, c)| c) {
                        Some('"') => break,
                        Some('\\') => match chars.next().map(|(_, c)| c) {
                            Some('\\') => value.push('\\'),
                            Some('"') => value.push('"'),
                            Some('n') => value.push('\n'),
                            other => panic!("invalid escape {other:?} in {line:?}"),
                        },
                        Some('\n') => panic!("raw line feed in label value {line:?}"),
                        Some(c) => value.push(c),
                        None => panic!("unterminated label value in {line:?}"),
                    }
                }
                labels.push((label, value));
                match chars.next() {
                    Some((_, ',')) => continue,
                    Some((index, '}')) => {
                        rest = &after_brace[index + 1..];
                        break;
                    }
                    other => panic!("expected , or }} after a label, found {other:?} in {line:?}"),
                }
            }
        }
        let value = rest
            .strip_prefix(' ')
            .unwrap_or_else(|| panic!("no space before the value in {line:?}"));
        Sample {
            name: name.to_owned(),
            labels,
            value: value
                .parse()
                .unwrap_or_else(|_| panic!("invalid value in {line:?}")),
        }
    }

    #[test]
    fn camera_returns_same_handle() {
        let registry = Registry::new();
        let first = registry.camera("cam-1");
        let second = registry.camera("cam-1");
        let other = registry.camera("cam-2");
        assert!(Arc::ptr_eq(&first, &second));
        assert!(!Arc::ptr_eq(&first, &other));

        first.record_event();
        let names: Vec<String> = registry
            .snapshot(Instant::now())
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        assert_eq!(names, ["cam-1", "cam-2"]);
        assert_eq!(second.snapshot(Instant::now()).events, 1);
    }

    #[test]
    fn snapshot_reports_recorded_values() {
        let camera = CameraMetrics::default();
        let start = Instant::now();
        camera.record_scored(start, Duration::from_millis(10));
        camera.record_scored(start, Duration::from_millis(20));
        camera.record_scored(start, Duration::from_micros(12_500));
        camera.record_score(0.9, true);
        camera.record_score(f64::NAN, false);
        camera.record_score(0.4, false);
        camera.record_skipped(start);
        camera.record_skipped_frames(4, start);
        camera.record_event();
        camera.record_snapshots(3);
        camera.set_anomalous(true);
        camera.record_restart();
        camera.set_mqtt_stats(&PublisherStats {
            published: 40,
            dropped: 2,
            queued: 7,
            connected: true,
            reconnect_attempts: 3,
        });
        camera.set_running();

        let snapshot = camera.snapshot(start);
        assert_eq!(snapshot.frames_scored, 3);
        assert_eq!(snapshot.frames_anomalous, 1);
        assert_eq!(snapshot.max_normalized_score, 0.9);
        assert_eq!(snapshot.frames_skipped, 5);
        assert_eq!(snapshot.events, 1);
        assert_eq!(snapshot.snapshots, 3);
        assert!(snapshot.anomalous);
        assert_eq!(snapshot.last_inference_ms, 12.5);
        assert!((snapshot.mean_inference_ms - 42.5 / 3.0).abs() < 1e-9);
        assert_eq!(snapshot.mqtt_queue_depth, 7);
        assert_eq!(snapshot.mqtt_published, 40);
        assert_eq!(snapshot.mqtt_dropped, 2);
        assert_eq!(snapshot.source_restarts, 1);
        assert!(snapshot.running);
        assert_eq!(snapshot.last_error, None);
    }

    #[test]
    fn stopped_camera_keeps_last_error() {
        let camera = CameraMetrics::default();
        assert!(
            !camera.snapshot(Instant::now()).running,
            "new camera is not running"
        );

        camera.set_running();
        camera.set_stopped(Some("source failed"));
        let stopped = camera.snapshot(Instant::now());
        assert!(!stopped.running);
        assert_eq!(stopped.last_error.as_deref(), Some("source failed"));

        camera.set_running();
        camera.set_stopped(None);
        let stopped_cleanly = camera.snapshot(Instant::now());
        assert!(!stopped_cleanly.running);
        assert_eq!(stopped_cleanly.last_error.as_deref(), Some("source failed"));
    }

    #[test]
    fn fps_of_steady_stream() {
        let camera = CameraMetrics::default();
        let base = Instant::now();
        let interval = Duration::from_millis(40);
        // 25 fps for 10 s: frames at 0, 40 ms, ..., 9960 ms.
        for i in 0..250 {
            camera.record_scored(base + interval * i, Duration::ZERO);
        }
        let last = base + interval * 249;

        let fps = camera.snapshot(last).fps;
        assert!((fps - 25.0).abs() < 1e-9, "fps at the last frame: {fps}");

        // 2.5 s after the last frame the window (last - 2.5 s, last + 2.5 s] contains the 63
        // frames at last - 0 ms .. last - 2480 ms.
        let fps = camera.snapshot(last + Duration::from_millis(2500)).fps;
        let expected = 62.0 / 4.98;
        assert!((fps - expected).abs() < 1e-9, "fps 2.5 s after: {fps}");

        let fps = camera.snapshot(last + FPS_WINDOW).fps;
        assert_eq!(
            fps, 0.0,
            "fps once the stream has stopped for the whole window"
        );
    }

    #[test]
    fn fps_counts_skipped_frames() {
        let camera = CameraMetrics::default();
        let base = Instant::now();
        let interval = Duration::from_millis(100);
        for i in 0..30 {
            let at = base + interval * i;
            if i % 3 == 0 {
                camera.record_scored(at, Duration::ZERO);
            } else {
                camera.record_skipped(at);
            }
        }
        let fps = camera.snapshot(base + interval * 29).fps;
        assert!((fps - 10.0).abs() < 1e-9, "fps: {fps}");
    }

    #[test]
    fn fps_counts_batched_skips() {
        let camera = CameraMetrics::default();
        let base = Instant::now();
        // 10 scored frames a second, and 15 skipped frames counted every 500 ms: 40 fps.
        for i in 0..100 {
            let at = base + Duration::from_millis(100) * i;
            camera.record_scored(at, Duration::ZERO);
            if i % 5 == 4 {
                camera.record_skipped_frames(15, at);
            }
        }
        let fps = camera.snapshot(base + Duration::from_millis(9900)).fps;
        assert!((fps - 40.0).abs() < 4.0, "fps: {fps}");
        assert_eq!(camera.snapshot(base).frames_skipped, 300);
    }

    #[test]
    fn fps_with_too_few_frames_is_zero() {
        let camera = CameraMetrics::default();
        let base = Instant::now();
        assert_eq!(camera.snapshot(base).fps, 0.0, "no frames");

        camera.record_scored(base, Duration::ZERO);
        assert_eq!(camera.snapshot(base).fps, 0.0, "one frame");

        camera.record_scored(base, Duration::ZERO);
        assert_eq!(
            camera.snapshot(base).fps,
            0.0,
            "two frames at the same time"
        );
    }

    #[test]
    fn fps_above_sample_limit() {
        let camera = CameraMetrics::default();
        let base = Instant::now();
        // 1000 fps for 3 s keeps only the last FPS_MAX_SAMPLES frame times.
        for i in 0..3000 {
            camera.record_skipped(base + Duration::from_millis(i));
        }
        let fps = camera.snapshot(base + Duration::from_millis(2999)).fps;
        assert!((fps - 1000.0).abs() < 1e-6, "fps: {fps}");
        let kept = camera.frame_times.times.lock().unwrap().len();
        assert_eq!(kept, FPS_MAX_SAMPLES);
    }

    #[test]
    fn fps_tolerates_out_of_order_times() {
        let camera = CameraMetrics::default();
        let base = Instant::now();
        camera.record_skipped(base + Duration::from_millis(100));
        camera.record_skipped(base);
        camera.record_skipped(base + Duration::from_millis(200));
        let times: Vec<Instant> = camera
            .frame_times
            .times
            .lock()
            .unwrap()
            .iter()
            .copied()
            .collect();
        assert!(times.is_sorted(), "frame times stay sorted");
        let fps = camera.snapshot(base + Duration::from_millis(200)).fps;
        assert!((fps - 20.0).abs() < 1e-9, "fps: {fps}");
    }

    #[test]
    fn concurrent_updates_give_exact_totals() {
        const THREADS: u64 = 8;
        const FRAMES: u64 = 10_000;
        let registry = Arc::new(Registry::new());
        let base = Instant::now();
        let stop_reading = Arc::new(AtomicBool::new(false));

        // A reader takes snapshots throughout, as a scrape would.
        let reader = {
            let registry = Arc::clone(&registry);
            let stop_reading = Arc::clone(&stop_reading);
            std::thread::spawn(move || {
                let mut snapshots = 0u64;
                while !stop_reading.load(Ordering::Relaxed) {
                    let _ = render_metrics(&registry.snapshot(Instant::now()));
                    snapshots += 1;
                }
                snapshots
            })
        };
        let writers: Vec<_> = (0..THREADS)
            .map(|thread| {
                let registry = Arc::clone(&registry);
                std::thread::spawn(move || {
                    let camera = registry.camera("cam-1");
                    for frame in 0..FRAMES {
                        let at = base + Duration::from_micros(frame);
                        camera.record_scored(at, Duration::from_nanos(thread + 1));
                        camera.record_score((thread * FRAMES + frame) as f64, frame % 2 == 0);
                        camera.record_skipped(at);
                        camera.record_event();
                        camera.record_restart();
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.join().expect("writer thread finishes");
        }
        stop_reading.store(true, Ordering::Relaxed);
        assert!(reader.join().expect("reader thread finishes") > 0);

        let snapshot = registry.camera("cam-1").snapshot(Instant::now());
        assert_eq!(snapshot.frames_scored, THREADS * FRAMES);
        assert_eq!(snapshot.frames_anomalous, THREADS * FRAMES / 2);
        assert_eq!(
            snapshot.max_normalized_score,
            (THREADS * FRAMES - 1) as f64,
            "highest score of any thread"
        );
        assert_eq!(snapshot.frames_skipped, THREADS * FRAMES);
        assert_eq!(snapshot.events, THREADS * FRAMES);
        assert_eq!(snapshot.source_restarts, THREADS * FRAMES);
        // Thread t adds t + 1 ns per frame, so the total is FRAMES * (1 + ... + THREADS) ns.
        let total_ns = FRAMES * THREADS * (THREADS + 1) / 2;
        let expected_mean_ms = total_ns as f64 / (THREADS * FRAMES) as f64 / 1e6;
        assert_eq!(snapshot.mean_inference_ms, expected_mean_ms);
    }

    #[test]
    fn label_values_are_escaped() {
        let cases = [
            ("cam-1", "cam-1"),
            ("back\\slash", "back\\\\slash"),
            ("say \"hi\"", "say \\\"hi\\\""),
            ("two\nlines", "two\\nlines"),
            ("all \\\"\n", "all \\\\\\\"\\n"),
        ];
        for (raw, escaped) in cases {
            assert_eq!(escape_label_value(raw), escaped, "{raw:?}");
        }
    }

    #[test]
    fn floats_use_exposition_spelling() {
        assert_eq!(format_float(29.5), "29.5");
        assert_eq!(format_float(0.0), "0");
        assert_eq!(format_float(f64::NAN), "NaN");
        assert_eq!(format_float(f64::INFINITY), "+Inf");
        assert_eq!(format_float(f64::NEG_INFINITY), "-Inf");
    }

    #[test]
    fn health_body_has_documented_form() {
        let running = CameraMetrics::default();
        running.set_running();
        let stopped = CameraMetrics::default();
        stopped.set_anomalous(true);
        stopped.set_stopped(Some("rtspsrc0: could not open resource"));
        let now = Instant::now();
        let cameras = vec![
            ("cam-1".to_owned(), running.snapshot(now)),
            ("cam-2".to_owned(), stopped.snapshot(now)),
        ];

        let (all_running, body) = render_health(&cameras);
        assert!(!all_running);
        assert_eq!(
            body,
            "{\"status\":\"degraded\",\"cameras\":{\
             \"cam-1\":{\"running\":true,\"state\":\"ok\",\"fps\":0.0,\"last_error\":null},\
             \"cam-2\":{\"running\":false,\"state\":\"anomalous\",\"fps\":0.0,\
             \"last_error\":\"rtspsrc0: could not open resource\"}}}"
        );
    }

    #[test]
    fn health_ok_when_all_running() {
        let registry = Arc::new(Registry::new());
        let camera = registry.camera("cam-1");
        camera.set_running();
        let now = Instant::now();
        for i in 0..10 {
            camera.record_scored(now - Duration::from_millis(100) * (10 - i), Duration::ZERO);
        }
        let server = start(&registry);

        let response = get(server.local_addr(), "/health");
        assert_eq!(response.status, 200);
        assert_eq!(response.header("Content-Type"), Some("application/json"));
        let json = response.json();
        assert_eq!(json["status"], "ok");
        let cam = &json["cameras"]["cam-1"];
        assert_eq!(cam["running"], true);
        assert_eq!(cam["state"], "ok");
        assert_eq!(cam["last_error"], serde_json::Value::Null);
        // Frames 100 ms apart that ended 100 ms before the request: a little under 10 fps.
        let fps = cam["fps"].as_f64().expect("fps is a number");
        assert!(fps > 5.0, "fps: {fps}");
        assert!(fps < 10.0, "fps: {fps}");
    }

    #[test]
    fn health_ok_without_cameras() {
        let registry = Arc::new(Registry::new());
        let server = start(&registry);

        let response = get(server.local_addr(), "/health");
        assert_eq!(response.status, 200);
        assert_eq!(response.body, r#"{"status":"ok","cameras":{}}"#);
    }

    #[test]
    fn health_503_when_camera_stopped() {
        let registry = Arc::new(Registry::new());
        registry.camera("cam-1").set_running();
        let failing = registry.camera("cam-2");
        failing.set_anomalous(true);
        failing.set_stopped(Some("rtspsrc0: could not open resource"));
        let server = start(&registry);

        let response = get(server.local_addr(), "/health");
        assert_eq!(response.status, 503);
        assert_eq!(response.header("Content-Type"), Some("application/json"));
        let json = response.json();
        assert_eq!(json["status"], "degraded");
        assert_eq!(json["cameras"]["cam-1"]["running"], true);
        assert_eq!(json["cameras"]["cam-2"]["running"], false);
        assert_eq!(json["cameras"]["cam-2"]["state"], "anomalous");
        assert_eq!(
            json["cameras"]["cam-2"]["last_error"],
            "rtspsrc0: could not open resource"
        );

        failing.set_running();
        let response = get(server.local_addr(), "/health");
        assert_eq!(response.status, 200, "after the camera runs again");
        assert_eq!(response.json()["status"], "ok");
    }

    #[test]
    fn health_503_for_camera_never_started() {
        let registry = Arc::new(Registry::new());
        registry.camera("cam-1");
        let server = start(&registry);

        let response = get(server.local_addr(), "/health");
        assert_eq!(response.status, 503);
        assert_eq!(response.json()["cameras"]["cam-1"]["running"], false);
    }

    #[test]
    fn metrics_exposition_has_every_family() {
        let registry = Arc::new(Registry::new());
        let busy = registry.camera("cam-1");
        // Frames older than the fps window make the fps gauge exactly 0.
        let now = Instant::now()
            .checked_sub(FPS_WINDOW * 2)
            .expect("clock is past the fps window");
        busy.record_scored(now, Duration::from_millis(10));
        busy.record_scored(now, Duration::from_millis(20));
        busy.record_scored(now, Duration::from_micros(12_500));
        busy.record_score(0.25, false);
        busy.record_score(0.75, true);
        busy.record_skipped(now);
        busy.record_skipped(now);
        busy.record_event();
        busy.record_snapshots(2);
        busy.set_anomalous(true);
        busy.record_restart();
        busy.set_mqtt_stats(&PublisherStats {
            published: 40,
            dropped: 2,
            queued: 7,
            connected: true,
            reconnect_attempts: 0,
        });
        busy.set_running();
        registry.camera("cam-2");
        let server = start(&registry);

        let response = get(server.local_addr(), "/metrics");
        assert_eq!(response.status, 200);
        assert_eq!(
            response.header("Content-Type"),
            Some("text/plain; version=0.0.4; charset=utf-8")
        );
        let exposition = parse_exposition(&response.body);

        let expected = [
            ("patchflow_up", "gauge", 1.0, 0.0),
            ("patchflow_anomalous", "gauge", 1.0, 0.0),
            ("patchflow_frames_scored_total", "counter", 3.0, 0.0),
            ("patchflow_frames_anomalous_total", "counter", 1.0, 0.0),
            ("patchflow_normalized_score_max", "gauge", 0.75, 0.0),
            ("patchflow_frames_skipped_total", "counter", 2.0, 0.0),
            ("patchflow_events_total", "counter", 1.0, 0.0),
            ("patchflow_snapshots_total", "counter", 2.0, 0.0),
            ("patchflow_inference_last_milliseconds", "gauge", 12.5, 0.0),
            ("patchflow_mqtt_queue_depth", "gauge", 7.0, 0.0),
            ("patchflow_mqtt_published_total", "counter", 40.0, 0.0),
            ("patchflow_mqtt_dropped_total", "counter", 2.0, 0.0),
            ("patchflow_source_restarts_total", "counter", 1.0, 0.0),
        ];
        for (name, kind, busy_value, idle_value) in expected {
            assert_eq!(
                exposition.types.get(name).map(String::as_str),
                Some(kind),
                "{name}"
            );
            let help = exposition.help.get(name).map(String::as_str).unwrap_or("");
            assert!(!help.is_empty(), "HELP of {name}");
            assert_eq!(
                exposition.value(name, "cam-1"),
                busy_value,
                "{name} of cam-1"
            );
            assert_eq!(
                exposition.value(name, "cam-2"),
                idle_value,
                "{name} of cam-2"
            );
        }

        let mean_name = "patchflow_inference_mean_milliseconds";
        assert_eq!(exposition.types[mean_name], "gauge");
        let mean = exposition.value(mean_name, "cam-1");
        assert!((mean - 42.5 / 3.0).abs() < 1e-9, "mean inference: {mean}");
        assert_eq!(exposition.value(mean_name, "cam-2"), 0.0);

        let fps_name = "patchflow_frames_per_second";
        assert_eq!(exposition.types[fps_name], "gauge");
        assert_eq!(exposition.value(fps_name, "cam-1"), 0.0);

        let names: HashSet<&str> = exposition.samples.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names.len(), FAMILIES.len(), "families with samples");
        assert_eq!(
            exposition.samples.len(),
            2 * FAMILIES.len(),
            "one sample per camera"
        );
        for (name, kind) in &exposition.types {
            assert_eq!(
                name.ends_with("_total"),
                kind == "counter",
                "only counters end in _total: {name}"
            );
        }
    }

    #[test]
    fn metrics_label_escaping_round_trips() {
        let registry = Arc::new(Registry::new());
        let awkward = "dock \"A\"\\east\nline 2";
        registry.camera(awkward).record_event();
        let server = start(&registry);

        let response = get(server.local_addr(), "/metrics");
        assert_eq!(response.status, 200);
        assert!(
            response
                .body
                .contains("patchflow_events_total{camera=\"dock \\\"A\\\"\\\\east\\nline 2\"} 1\n"),
            "{}",
            response.body
        );
        let exposition = parse_exposition(&response.body);
        assert_eq!(exposition.value("patchflow_events_total", awkward), 1.0);
    }

    #[test]
    fn metrics_without_cameras_lists_families() {
        let registry = Arc::new(Registry::new());
        let server = start(&registry);

        let response = get(server.local_addr(), "/metrics");
        assert_eq!(response.status, 200);
        let exposition = parse_exposition(&response.body);
        assert!(exposition.samples.is_empty());
        assert_eq!(exposition.types.len(), FAMILIES.len());
        assert_eq!(exposition.help.len(), FAMILIES.len());
    }

    #[test]
    fn unknown_path_and_method() {
        let registry = Arc::new(Registry::new());
        let server = start(&registry);
        let addr = server.local_addr();

        let response = get(addr, "/nothing");
        assert_eq!(response.status, 404);
        assert_eq!(
            response.header("Content-Type"),
            Some("text/plain; charset=utf-8")
        );

        for method in ["POST", "PUT", "DELETE", "OPTIONS"] {
            for path in ["/health", "/metrics"] {
                let request = format!("{method} {path} HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
                let response = send(addr, request.as_bytes());
                assert_eq!(response.status, 405, "{method} {path}");
                assert_eq!(
                    response.header("Allow"),
                    Some("GET, HEAD"),
                    "{method} {path}"
                );
            }
        }

        let response = get(addr, "/metrics?name[]=patchflow_up");
        assert_eq!(response.status, 200, "query string is ignored");
    }

    #[test]
    fn head_sends_headers_only() {
        let registry = Arc::new(Registry::new());
        let server = start(&registry);
        let addr = server.local_addr();

        let full = get(addr, "/health");
        let head = send(addr, b"HEAD /health HTTP/1.1\r\nHost: localhost\r\n\r\n");
        assert_eq!(head.status, 200);
        assert_eq!(head.body, "");
        assert_eq!(head.header("Content-Type"), Some("application/json"));
        let full_length = full.body.len().to_string();
        assert_eq!(head.header("Content-Length"), Some(full_length.as_str()));
    }

    #[test]
    fn malformed_requests_are_rejected() {
        let registry = Arc::new(Registry::new());
        let server = start(&registry);
        let addr = server.local_addr();

        let cases: [(&[u8], u16); 9] = [
            (b"garbage\r\n\r\n", 400),
            (b"GET /health\r\n\r\n", 400),
            (b"GET  /health HTTP/1.1\r\n\r\n", 400),
            (b"GET health HTTP/1.1\r\n\r\n", 400),
            (b"G(T /health HTTP/1.1\r\n\r\n", 400),
            (b"\xff\xfe /health HTTP/1.1\r\n\r\n", 400),
            (b"GET /health HTTP/1.1\r\nno colon here\r\n\r\n", 400),
            (b"GET /health FTP/1.1\r\n\r\n", 400),
            (b"GET /health HTTP/2.0\r\n\r\n", 505),
        ];
        for (request, status) in cases {
            let response = send(addr, request);
            assert_eq!(
                response.status,
                status,
                "{}",
                String::from_utf8_lossy(request)
            );
        }

        let bare_line_feeds = send(addr, b"GET /health HTTP/1.0\n\n");
        assert_eq!(
            bare_line_feeds.status, 200,
            "lines ended by a bare line feed"
        );
        assert_eq!(get(addr, "/health").status, 200, "server still serves");
    }

    #[test]
    fn oversized_request_gets_431() {
        let registry = Arc::new(Registry::new());
        let server = start(&registry);

        let request = format!(
            "GET /health HTTP/1.1\r\nX-Padding: {}\r\n\r\n",
            "a".repeat(MAX_REQUEST_HEAD_BYTES)
        );
        let response = send(server.local_addr(), request.as_bytes());
        assert_eq!(response.status, 431);
    }

    #[test]
    fn client_closing_early_gets_no_response() {
        let registry = Arc::new(Registry::new());
        let server = start(&registry);

        let mut stream = connect(server.local_addr());
        stream.write_all(b"GET /hea").unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
        assert_eq!(get(server.local_addr(), "/health").status, 200);
    }

    #[test]
    fn slow_client_does_not_block_others() {
        let registry = Arc::new(Registry::new());
        let request_timeout = Duration::from_secs(2);
        let server = start_with(
            &registry,
            ServerOptions {
                request_timeout,
                ..loopback_options()
            },
        );
        let addr = server.local_addr();

        let started = Instant::now();
        let mut slow = connect(addr);
        slow.write_all(b"GET /hea").unwrap();

        let response = get(addr, "/health");
        let elapsed = started.elapsed();
        assert_eq!(response.status, 200);
        assert!(
            elapsed < request_timeout,
            "second client waited {elapsed:?}, the slow client's timeout is {request_timeout:?}"
        );

        let slow_response = read_response(&mut slow);
        assert_eq!(slow_response.status, 408);
        assert!(
            started.elapsed() >= request_timeout,
            "408 before the timeout"
        );
    }

    #[test]
    fn trickling_client_times_out() {
        let registry = Arc::new(Registry::new());
        let request_timeout = Duration::from_millis(500);
        let server = start_with(
            &registry,
            ServerOptions {
                request_timeout,
                ..loopback_options()
            },
        );

        // One byte every 100 ms keeps each read short, but the whole head is still late.
        let started = Instant::now();
        let mut stream = connect(server.local_addr());
        for &byte in b"GET /health HTTP/1.1\r\n" {
            if stream.write_all(&[byte]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let response = read_response(&mut stream);
        assert_eq!(response.status, 408);
        let elapsed = started.elapsed();
        assert!(elapsed < Duration::from_secs(3), "408 after {elapsed:?}");
    }

    #[test]
    fn connection_limit_answers_503() {
        let registry = Arc::new(Registry::new());
        let server = start_with(
            &registry,
            ServerOptions {
                max_connections: 1,
                ..loopback_options()
            },
        );
        let addr = server.local_addr();

        let idle = connect(addr);
        // Let the accept loop take the idle connection before the next one arrives.
        std::thread::sleep(ACCEPT_POLL_INTERVAL * 4);
        let mut rejected = connect(addr);
        let response = read_response(&mut rejected);
        assert_eq!(response.status, 503);
        assert_eq!(response.body, "too many connections\n");

        drop(idle);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let status = get(addr, "/health").status;
            if status == 200 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "still {status} after the idle client left"
            );
            std::thread::sleep(ACCEPT_POLL_INTERVAL);
        }
    }

    #[test]
    fn shutdown_releases_port() {
        let registry = Arc::new(Registry::new());
        let server = start_with(
            &registry,
            ServerOptions {
                request_timeout: Duration::from_secs(60),
                ..loopback_options()
            },
        );
        let addr = server.local_addr();
        assert_eq!(get(addr, "/health").status, 200);
        let mut idle = connect(addr);
        std::thread::sleep(ACCEPT_POLL_INTERVAL * 4);

        let started = Instant::now();
        server.shutdown();
        let elapsed = started.elapsed();
        assert!(
            elapsed < Duration::from_secs(2),
            "shutdown took {elapsed:?}"
        );

        let mut rest = Vec::new();
        let _ = idle.read_to_end(&mut rest);
        assert!(rest.is_empty(), "open connection closed without a response");
        assert!(
            TcpStream::connect(addr).is_err(),
            "nothing listens after shutdown"
        );
        TcpListener::bind(addr).expect("port can be bound again");
    }

    #[test]
    fn drop_releases_port() {
        let registry = Arc::new(Registry::new());
        let server = start(&registry);
        let addr = server.local_addr();
        assert_eq!(get(addr, "/health").status, 200);

        drop(server);
        assert!(
            TcpStream::connect(addr).is_err(),
            "nothing listens after drop"
        );
        TcpListener::bind(addr).expect("port can be bound again");
    }

    #[test]
    fn address_in_use_is_reported() {
        let occupant = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = occupant.local_addr().unwrap().to_string();
        let registry = Arc::new(Registry::new());

        let options = ServerOptions {
            addr: addr.clone(),
            ..ServerOptions::default()
        };
        let error = HealthServer::start(&options, registry).expect_err("port is taken");
        assert!(
            matches!(error, ServerError::AddressInUse { .. }),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(message.contains(&addr), "{message}");
        assert!(message.contains("already in use"), "{message}");
        assert!(message.contains("port 0"), "{message}");
    }

    #[test]
    fn invalid_options_are_rejected() {
        let registry = Arc::new(Registry::new());
        let zero_timeout = ServerOptions {
            request_timeout: Duration::ZERO,
            ..loopback_options()
        };
        let error = HealthServer::start(&zero_timeout, Arc::clone(&registry))
            .expect_err("zero request timeout");
        assert!(error.to_string().contains("request_timeout"), "{error}");

        let no_connections = ServerOptions {
            max_connections: 0,
            ..loopback_options()
        };
        let error =
            HealthServer::start(&no_connections, registry).expect_err("zero max connections");
        assert!(error.to_string().contains("max_connections"), "{error}");
    }

    #[test]
    fn default_options_use_loopback() {
        let options = ServerOptions::default();
        assert_eq!(options.addr, "127.0.0.1:9464");
        let addr: SocketAddr = options.addr.parse().unwrap();
        assert!(addr.ip().is_loopback());
    }
}
