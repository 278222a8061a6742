// SPDX-License-Identifier: MIT OR Apache-2.0
//! `patchflow run`: one pipeline, bus watch and alarm tracker per camera, each on its own
//! thread, with restarts after errors, a clean stop on SIGINT or SIGTERM, and scoring and
//! alarm settings read again from the config file on SIGHUP. Every camera reports into
//! one [`Registry`] of metrics, which the `[health]` endpoint serves.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Result, anyhow};
use gst::prelude::*;

use crate::alarm::{
    AlarmConfig, AlarmOutput, AlarmState, AlarmTracker, EventKind, ScoredFrame, Scores,
};
use crate::health::{CameraMetrics, CameraSnapshot, HealthServer, Registry, ServerOptions};
use crate::mqtt::{FrameMessage, PublisherStats};
use crate::scoring::ScoreDomain;

use super::config::{CameraConfig, Config, HealthConfig, ScoringConfig, SinkConfig};
use super::output::{Output, RateLimiter};
use super::pipeline::{self, SCORER_NAME, StagedImages};
use super::snapshot::Snapshots;

/// Time a stopping pipeline has to deliver end-of-stream, so that files are finalised.
const EOS_TIMEOUT: Duration = Duration::from_secs(5);

/// Interval at which bus watches and restart waits look at the stop flag.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Counts of one run, printed at the end.
#[derive(Debug, Clone, Default)]
pub struct RunSummary {
    /// (line, camera, final metrics) in config order.
    pub cameras: Vec<(String, String, CameraSnapshot)>,
    /// Broker URL and final publisher counters, when the run published.
    pub mqtt: Option<(String, PublisherStats)>,
}

/// Returns the process-wide stop flag, installing the SIGINT and SIGTERM handlers on the
/// first call. A second SIGINT or SIGTERM while the streams finish exits at once with
/// status 1.
fn stop_flag() -> Result<Arc<AtomicBool>> {
    static STOP: OnceLock<Result<Arc<AtomicBool>, String>> = OnceLock::new();
    STOP.get_or_init(|| {
        let stop = Arc::new(AtomicBool::new(false));
        for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register_conditional_shutdown(signal, 1, Arc::clone(&stop))
                .and_then(|_| signal_hook::flag::register(signal, Arc::clone(&stop)))
                .map_err(|e| format!("cannot install the SIGINT/SIGTERM handler: {e}"))?;
        }
        Ok(stop)
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// Installs the SIGINT, SIGTERM and SIGHUP handlers of [`run`] now, so that a signal
/// that arrives while the config and the models load is not fatal. Once a stop signal
/// arrived, the flag stays set for the life of the process.
pub fn install_signal_handlers() -> Result<()> {
    stop_flag()?;
    reload_flag()?;
    Ok(())
}

/// Returns the process-wide reload flag, installing the SIGHUP handler on the first call.
fn reload_flag() -> Result<Arc<AtomicBool>> {
    static RELOAD: OnceLock<Result<Arc<AtomicBool>, String>> = OnceLock::new();
    RELOAD
        .get_or_init(|| {
            let reload = Arc::new(AtomicBool::new(false));
            signal_hook::flag::register(signal_hook::consts::SIGHUP, Arc::clone(&reload))
                .map_err(|e| format!("cannot install the SIGHUP handler: {e}"))?;
            Ok(reload)
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

/// The settings of one camera that a reload can change while its pipeline plays.
#[derive(Debug)]
struct LiveSettings {
    current: Mutex<Live>,
    /// Copy of `current.version`, polled by the camera thread without the lock.
    version: AtomicU64,
}

#[derive(Debug, Clone)]
struct Live {
    version: u64,
    scoring: ScoringConfig,
    alarm: AlarmConfig,
}

impl LiveSettings {
    fn new(camera: &CameraConfig) -> Self {
        Self {
            current: Mutex::new(Live {
                version: 0,
                scoring: camera.scoring.clone(),
                alarm: camera.alarm.clone(),
            }),
            version: AtomicU64::new(0),
        }
    }

    fn get(&self) -> Live {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the settings. Returns whether they changed.
    fn set(&self, scoring: &ScoringConfig, alarm: &AlarmConfig) -> bool {
        let mut live = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if live.scoring == *scoring && live.alarm == *alarm {
            return false;
        }
        live.version += 1;
        live.scoring = scoring.clone();
        live.alarm = alarm.clone();
        self.version.store(live.version, Ordering::SeqCst);
        true
    }
}

/// Reads the config file again and hands each running camera its new scoring and alarm
/// settings. Changes that need a new pipeline or a new process are logged and left for
/// the next start. An invalid file changes nothing.
fn reload(config: &Config, live: &[LiveSettings]) {
    let Some(path) = &config.source else {
        eprintln!("SIGHUP ignored: this run was not started from a config file");
        return;
    };
    let updated = match Config::load(path) {
        Ok(updated) => updated,
        Err(e) => {
            tracing::error!(error = %e, "reload failed");
            eprintln!("cannot reload the config, the current settings stay: {e}");
            return;
        }
    };
    let mut changed = 0;
    for (camera, live) in config.cameras.iter().zip(live) {
        let Some(new) = updated.cameras.iter().find(|c| c.name == camera.name) else {
            tracing::warn!(camera = %camera.name, "the camera is no longer in the config and runs until patchflow run starts again");
            continue;
        };
        let mut later = Vec::new();
        for (field, differs) in [
            ("line", new.line != camera.line),
            ("source", new.source != camera.source),
            ("model", new.model != camera.model),
            ("sink", new.sink != camera.sink),
            ("restart", new.restart != camera.restart),
            ("snapshot", new.snapshot != camera.snapshot),
            ("scoring.mode", new.scoring.mode != camera.scoring.mode),
        ] {
            if differs {
                later.push(field);
            }
        }
        if !later.is_empty() {
            tracing::warn!(camera = %camera.name, settings = ?later, "these settings take effect when patchflow run starts again");
        }
        if live.set(&new.scoring, &new.alarm) {
            changed += 1;
            tracing::info!(camera = %camera.name, scoring = ?new.scoring, alarm = ?new.alarm, "reloaded scoring and alarm settings");
        }
    }
    for new in &updated.cameras {
        if !config.cameras.iter().any(|c| c.name == new.name) {
            tracing::warn!(camera = %new.name, "the new camera in the config starts when patchflow run starts again");
        }
    }
    if updated.mqtt != config.mqtt {
        tracing::warn!("MQTT settings take effect when patchflow run starts again");
    }
    if updated.health != config.health {
        tracing::warn!("health settings take effect when patchflow run starts again");
    }
    eprintln!(
        "reloaded {}: new scoring or alarm settings for {changed} of {} cameras",
        path.display(),
        config.cameras.len()
    );
}

/// Runs every camera of `config` until all have ended (end of stream) or SIGINT or
/// SIGTERM stopped them, then publishes `offline` and stops the MQTT publisher. With a
/// `[health]` section, serves the cameras' metrics over HTTP while they run.
/// `on_start` receives the metrics registry before the cameras start.
pub fn run(config: &Config, on_start: impl FnOnce(&Arc<Registry>)) -> Result<RunSummary> {
    super::ensure_element()?;
    // A signal that arrived after `install_signal_handlers` and before this point still
    // counts: SIGINT or SIGTERM stops the cameras as soon as they play.
    let stop = stop_flag()?;
    let reload_requested = reload_flag()?;
    let live: Vec<LiveSettings> = config.cameras.iter().map(LiveSettings::new).collect();
    let registry = Arc::new(Registry::new());
    let metrics: Vec<Arc<CameraMetrics>> = config
        .cameras
        .iter()
        .map(|camera| registry.camera(&camera.name))
        .collect();
    // Before MQTT, so that a busy port fails the run before anything is published.
    let health = match &config.health {
        Some(health) => Some(start_health(health, &registry)?),
        None => None,
    };
    let output = match &config.mqtt {
        Some(mqtt) => Some(Output::start(mqtt).map_err(|e| anyhow!("cannot start MQTT: {e}"))?),
        None => None,
    };
    let clock = Clock::now();
    on_start(&registry);

    tracing::info!(cameras = config.cameras.len(), "starting cameras");
    std::thread::scope(|scope| {
        let mut handles = Vec::new();
        for ((camera, metrics), live) in config.cameras.iter().zip(&metrics).zip(&live) {
            let run = CameraRun {
                camera,
                live,
                output: output.as_ref(),
                metrics,
                stop: &stop,
                clock,
            };
            let handle = std::thread::Builder::new()
                .name(format!("camera-{}", camera.name))
                .spawn_scoped(scope, move || run.run());
            match handle {
                Ok(handle) => handles.push(handle),
                Err(e) => {
                    tracing::error!(camera = %camera.name, error = %e, "cannot start the camera thread");
                }
            }
        }
        let mut announced = false;
        while !handles.iter().all(|h| h.is_finished()) {
            if reload_requested.swap(false, Ordering::SeqCst) {
                reload(config, &live);
            }
            if stop.load(Ordering::SeqCst) && !announced {
                eprintln!("interrupted: finishing every camera's stream");
                announced = true;
            }
            if let Some(output) = &output {
                set_mqtt_stats(&metrics, &output.stats());
            }
            std::thread::sleep(POLL_INTERVAL);
        }
        if stop.load(Ordering::SeqCst) && !announced {
            eprintln!("interrupted: every camera's stream finished");
        }
    });

    let mqtt = output.map(|output| {
        let url = output.url().to_owned();
        let stats = output.shutdown();
        set_mqtt_stats(&metrics, &stats);
        (url, stats)
    });
    if let Some(health) = health {
        health.shutdown();
    }
    let now = Instant::now();
    Ok(RunSummary {
        cameras: config
            .cameras
            .iter()
            .zip(&metrics)
            .map(|(camera, m)| (camera.line.clone(), camera.name.clone(), m.snapshot(now)))
            .collect(),
        mqtt,
    })
}

/// Starts the health and metrics endpoint and prints where it listens.
fn start_health(health: &HealthConfig, registry: &Arc<Registry>) -> Result<HealthServer> {
    let options = ServerOptions {
        addr: health.address.clone(),
        ..ServerOptions::default()
    };
    let server = HealthServer::start(&options, Arc::clone(registry)).map_err(|e| {
        anyhow!(
            "{e}. The config's health.address sets the address, and health.enabled = false turns the endpoint off"
        )
    })?;
    // The actual port matters with port 0, and tests read it from this line.
    let addr = server.local_addr();
    eprintln!("serving health on http://{addr}/health and metrics on http://{addr}/metrics");
    Ok(server)
}

/// Copies the counters of the MQTT publisher, which all cameras share, to every camera.
fn set_mqtt_stats(metrics: &[Arc<CameraMetrics>], stats: &PublisherStats) {
    for camera in metrics {
        camera.set_mqtt_stats(stats);
    }
}

/// The monotonic start of the run and the matching Unix time, for alarm timestamps.
#[derive(Debug, Clone, Copy)]
struct Clock {
    start: Instant,
    wall_origin: Duration,
}

impl Clock {
    fn now() -> Self {
        Self {
            start: Instant::now(),
            // A clock before 1970 is a broken clock: event times then count from 0.
            wall_origin: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default(),
        }
    }
}

/// One camera's thread.
struct CameraRun<'a> {
    camera: &'a CameraConfig,
    live: &'a LiveSettings,
    output: Option<&'a Output>,
    metrics: &'a CameraMetrics,
    stop: &'a AtomicBool,
    clock: Clock,
}

/// State that the bus watch tracks between frames.
struct Watch {
    tracker: AlarmTracker,
    /// Limits the camera's score messages, `None` when none are published.
    score_limiter: Option<RateLimiter>,
    /// Set when the camera takes snapshots.
    snapshots: Option<Snapshots>,
    /// Number of the latest scored frame.
    last_frame: u64,
    /// Version of the live settings that the tracker and the pipeline use.
    applied: u64,
    skipped: SkippedFrames,
}

/// Skipped frames of the current pipeline, counted into the camera's metrics. Every frame
/// before a scored one was scored or skipped in both scoring modes, so a scored frame's
/// number updates the count. Reading `frames-skipped` while playing would stall the bus
/// watch, because `scoring-mode=interval` holds the element's lock during inference.
#[derive(Default)]
struct SkippedFrames {
    /// Frames scored in this pipeline.
    scored: u64,
    /// Skipped frames of this pipeline already added to the metrics.
    counted: u64,
}

impl SkippedFrames {
    /// Counts the scored frame `frame`, numbered from 0 in this pipeline, and the frames
    /// skipped before it.
    fn on_scored(&mut self, frame: u64, metrics: &CameraMetrics) {
        self.scored += 1;
        self.count_up_to((frame + 1).saturating_sub(self.scored), metrics);
    }

    /// Counts the frames skipped after the last scored one, from the element's
    /// `frames-skipped` property. Call it before the pipeline stops, which resets that count.
    fn finish(&mut self, pipeline: &gst::Pipeline, metrics: &CameraMetrics) {
        if let Some(scorer) = pipeline.by_name(SCORER_NAME) {
            self.count_up_to(scorer.property::<u64>("frames-skipped"), metrics);
        }
    }

    fn count_up_to(&mut self, total: u64, metrics: &CameraMetrics) {
        if total > self.counted {
            metrics.record_skipped_frames(total - self.counted, Instant::now());
            self.counted = total;
        }
    }
}

impl CameraRun<'_> {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn run(&self) {
        let camera = &self.camera.name;
        let tracker = match AlarmTracker::new(camera, &self.camera.alarm, self.clock.wall_origin) {
            Ok(tracker) => tracker,
            Err(e) => {
                // The config check validated the settings, so this is not expected.
                tracing::error!(camera = %camera, error = %e, "invalid alarm settings");
                return;
            }
        };
        let snapshot = &self.camera.snapshot;
        let mut watch = Watch {
            tracker,
            score_limiter: self.output.and_then(Output::score_limiter),
            snapshots: snapshot.enabled().then(|| Snapshots::new(snapshot.clone())),
            last_frame: 0,
            applied: 0,
            skipped: SkippedFrames::default(),
        };
        self.metrics
            .set_anomalous(watch.tracker.state() == AlarmState::Anomalous);
        if let Some(output) = self.output {
            output.state(camera, watch.tracker.state());
        }

        let restart = &self.camera.restart;
        let initial_delay = Duration::from_secs_f64(restart.initial_delay);
        let max_delay = Duration::from_secs_f64(restart.max_delay);
        let mut delay = initial_delay;
        let mut attempt = 0u64;
        while !self.stopping() {
            let frames_before = self.frames_scored();
            let result = self.run_pipeline(&mut watch);
            self.end_event(&mut watch);
            match result {
                Ok(()) => break,
                Err(error) if self.stopping() => {
                    tracing::warn!(camera = %camera, %error, "camera pipeline failed while stopping");
                    break;
                }
                Err(error) => {
                    if self.frames_scored() > frames_before {
                        delay = initial_delay;
                        attempt = 0;
                    }
                    attempt += 1;
                    self.metrics.record_restart();
                    tracing::warn!(
                        camera = %camera,
                        line = %self.camera.line,
                        %error,
                        attempt,
                        retry_in = ?delay,
                        "camera pipeline failed, restarting"
                    );
                    self.sleep(delay);
                    delay = (delay * 2).min(max_delay);
                }
            }
        }
        tracing::info!(camera = %camera, stats = ?self.metrics.snapshot(Instant::now()), "camera stopped");
    }

    fn frames_scored(&self) -> u64 {
        self.metrics.snapshot(Instant::now()).frames_scored
    }

    /// Waits for `duration`, or less when the run is stopping.
    fn sleep(&self, duration: Duration) {
        let until = Instant::now() + duration;
        while !self.stopping() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            std::thread::sleep(left.min(POLL_INTERVAL));
        }
    }

    /// Builds and plays the camera's pipeline until end-of-stream or an error, and records
    /// the outcome in the camera's metrics.
    fn run_pipeline(&self, watch: &mut Watch) -> Result<(), String> {
        let result = self.build_and_play(watch);
        self.metrics
            .set_stopped(result.as_ref().err().map(String::as_str));
        result
    }

    fn build_and_play(&self, watch: &mut Watch) -> Result<(), String> {
        let camera = &self.camera.name;
        let staged = match pipeline::needs_staging(self.camera) {
            Some(location) => Some(StagedImages::create(location, camera)?),
            None => None,
        };
        match &self.camera.sink {
            SinkConfig::File { location } => create_parent(Path::new(location))?,
            SinkConfig::Frames { folder } => std::fs::create_dir_all(folder)
                .map_err(|e| format!("cannot create sink folder {folder}: {e}"))?,
            _ => {}
        }
        // Snapshots are secondary to scoring: without their folder the camera still runs,
        // and each failed write is logged and counted.
        if let Some(folder) = &self.camera.snapshot.folder
            && let Err(e) = std::fs::create_dir_all(folder)
        {
            tracing::warn!(camera = %camera, folder = %folder, error = %e, "cannot create the snapshot folder; the camera runs without snapshot files");
        }
        // A restarted pipeline takes the scoring settings of the latest reload.
        let live = self.live.get();
        self.apply_alarm(watch, &live);
        // The mode stays as the run started: a reload reports a new mode as pending.
        let current = CameraConfig {
            scoring: ScoringConfig {
                mode: self.camera.scoring.mode.clone(),
                ..live.scoring
            },
            ..self.camera.clone()
        };
        let description = pipeline::description(&current, staged.as_ref());
        tracing::info!(camera = %camera, line = %self.camera.line, pipeline = %description, "starting camera pipeline");
        let pipeline = gst::parse::launch(&description)
            .map_err(|e| format!("cannot build the pipeline: {e}"))?
            .downcast::<gst::Pipeline>()
            .map_err(|_| "the camera description did not produce a pipeline".to_string())?;
        if let Some(snapshots) = &mut watch.snapshots
            && let Some(scorer) = pipeline.by_name(SCORER_NAME)
        {
            snapshots.new_tap().attach(&pipeline, &scorer);
        }

        let result = if pipeline.set_state(gst::State::Playing).is_err() {
            Err(format!(
                "cannot start the pipeline: {}",
                first_error(&pipeline).unwrap_or_default()
            ))
        } else {
            self.metrics.set_running();
            watch.skipped = SkippedFrames::default();
            let result = self.watch_bus(&pipeline, watch);
            watch.skipped.finish(&pipeline, self.metrics);
            result
        };
        pipeline.set_state(gst::State::Null).ok();
        result
    }

    fn watch_bus(&self, pipeline: &gst::Pipeline, watch: &mut Watch) -> Result<(), String> {
        let bus = pipeline.bus().expect("a pipeline has a bus");
        let mut eos_deadline: Option<Instant> = None;
        let mut eos_sent = false;
        loop {
            if self.live.version.load(Ordering::SeqCst) != watch.applied {
                self.apply_live(pipeline, watch);
            }
            if self.stopping() && eos_deadline.is_none() {
                eos_deadline = Some(Instant::now() + EOS_TIMEOUT);
            }
            if eos_deadline.is_some() && !eos_sent && state_settled(pipeline) {
                tracing::info!(camera = %self.camera.name, "stopping: sending end-of-stream");
                pipeline.send_event(gst::event::Eos::new());
                eos_sent = true;
            }
            if eos_deadline.is_some_and(|d| Instant::now() > d) {
                tracing::warn!(camera = %self.camera.name, timeout = ?EOS_TIMEOUT, eos_sent, "end-of-stream did not arrive in time; stopping the pipeline");
                return Ok(());
            }
            let Some(msg) = bus.timed_pop(gst::ClockTime::from_nseconds(
                POLL_INTERVAL.as_nanos() as u64
            )) else {
                continue;
            };
            match msg.view() {
                gst::MessageView::Eos(_) => {
                    tracing::info!(camera = %self.camera.name, "end of stream");
                    return Ok(());
                }
                gst::MessageView::Error(err) => {
                    let source = err
                        .src()
                        .map(|s| s.path_string().to_string())
                        .unwrap_or_default();
                    let debug = err.debug().map(|d| d.to_string()).unwrap_or_default();
                    return Err(format!("{source}: {} ({debug})", err.error()));
                }
                gst::MessageView::Warning(w) => {
                    tracing::warn!(camera = %self.camera.name, warning = %w.error(), "pipeline warning")
                }
                gst::MessageView::Element(e) => {
                    if let Some(s) = e.structure().filter(|s| s.name() == "patchflow") {
                        self.on_frame(s, watch);
                    }
                }
                _ => {}
            }
        }
    }

    /// Hands the reloaded settings to the alarm tracker and the playing scorer.
    fn apply_live(&self, pipeline: &gst::Pipeline, watch: &mut Watch) {
        let live = self.live.get();
        self.apply_alarm(watch, &live);
        let Some(scorer) = pipeline.by_name(SCORER_NAME) else {
            return;
        };
        let s = &live.scoring;
        // The element keeps an explicit threshold once one is set, so a threshold removed
        // from the config becomes the model's own one on the chosen scale.
        let threshold = match s.threshold {
            Some(threshold) => threshold,
            None => match s.threshold_domain.parse::<ScoreDomain>().map(|domain| {
                crate::checkpoint::read_meta(Path::new(&self.camera.model.path))
                    .map(|meta| f64::from(meta.stats.threshold(domain)))
            }) {
                Ok(Ok(threshold)) => threshold,
                Ok(Err(e)) => {
                    tracing::error!(camera = %self.camera.name, error = %e, "cannot read the model's threshold; the scorer keeps its settings");
                    return;
                }
                Err(e) => {
                    tracing::error!(camera = %self.camera.name, error = %e, "invalid threshold domain; the scorer keeps its settings");
                    return;
                }
            },
        };

        scorer.set_property_from_str("threshold-domain", &s.threshold_domain);
        scorer.set_property("threshold", threshold);
        scorer.set_property("overlay", s.overlay);
        scorer.set_property("alpha", s.alpha);
        scorer.set_property_from_str("colormap", &s.colormap);
        scorer.set_property("scoring-interval", s.interval);
        tracing::info!(camera = %self.camera.name, threshold, domain = %s.threshold_domain, "applied the reloaded scoring settings");
    }

    /// Hands the alarm settings of `live` to the tracker, once per version.
    fn apply_alarm(&self, watch: &mut Watch, live: &Live) {
        if watch.applied == live.version {
            return;
        }
        if let Err(e) = watch.tracker.reconfigure(&live.alarm) {
            // The config check validated the settings, so this is not expected.
            tracing::error!(camera = %self.camera.name, error = %e, "invalid reloaded alarm settings");
        }
        watch.applied = live.version;
    }

    /// Feeds one `patchflow` bus message to the metrics, the alarm tracker and MQTT.
    fn on_frame(&self, s: &gst::StructureRef, watch: &mut Watch) {
        let score = s.get::<f64>("score").unwrap_or(f64::NAN);
        let normalized_score = s.get::<f64>("normalized-score").unwrap_or(f64::NAN);
        let log_score = s.get::<f64>("log-score").unwrap_or(f64::NAN);
        let is_anomalous = s.get::<bool>("is-anomalous").unwrap_or(false);
        let frame = s.get::<u64>("frame").unwrap_or(0);
        let inference_ms = s.get::<f64>("inference-ms").unwrap_or(0.0);
        self.metrics.record_scored(
            Instant::now(),
            Duration::try_from_secs_f64(inference_ms / 1000.0).unwrap_or_default(),
        );
        self.metrics.record_score(normalized_score, is_anomalous);
        watch.skipped.on_scored(frame, self.metrics);
        let scores = Scores {
            score: score as f32,
            normalized_score: normalized_score as f32,
            log_score: log_score as f32,
        };
        let mut alarm = watch.tracker.observe(&ScoredFrame {
            time: self.clock.start.elapsed(),
            frame,
            is_anomalous,
            scores,
        });
        watch.last_frame = frame;
        self.take_snapshots(watch, &mut alarm, Some(frame));
        self.publish_alarm(&alarm);

        let Some(output) = self.output else {
            return;
        };
        let Some(limiter) = &mut watch.score_limiter else {
            return;
        };
        if !limiter.allow(Instant::now()) {
            return;
        }
        let pts = s.get::<u64>("pts").ok().filter(|pts| *pts != u64::MAX);
        let message = FrameMessage {
            source: self.camera.name.clone(),
            frame,
            pts_ns: pts,
            timestamp_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |t| t.as_millis() as u64),
            score: scores.score,
            normalized_score: scores.normalized_score,
            log_score: scores.log_score,
            threshold: s.get::<f64>("threshold").unwrap_or(f64::NAN) as f32,
            threshold_domain: s
                .get::<&str>("threshold-domain")
                .ok()
                .and_then(|d| d.parse().ok())
                .unwrap_or(ScoreDomain::Normalized),
            is_anomalous,
            label: if is_anomalous { "anomalous" } else { "normal" }.to_owned(),
        };
        output.score(&self.camera.name, &message);
    }

    /// Ends the active event, if any: at end of stream, on a stop or after an error.
    fn end_event(&self, watch: &mut Watch) {
        let mut output = watch.tracker.finish(self.clock.start.elapsed());
        self.take_snapshots(watch, &mut output, None);
        self.publish_alarm(&output);
    }

    /// Writes and publishes the snapshots of the events in `alarm` and names them in the
    /// event messages. `frame` is the frame just scored, `None` after the stream ended.
    fn take_snapshots(&self, watch: &mut Watch, alarm: &mut AlarmOutput, frame: Option<u64>) {
        let Some(snapshots) = &mut watch.snapshots else {
            return;
        };
        let peak = watch.tracker.active_peak_frame();
        let starts = alarm.events.iter().any(|e| e.kind == EventKind::Start);
        // Wait for the copy of this frame only when it is needed: it starts an event or
        // is the active event's new peak.
        let needed = frame.filter(|f| starts || peak == Some(*f));
        snapshots.collect(needed);
        if let Some(peak) = peak {
            snapshots.set_peak(peak);
        }
        let written_before = snapshots.written;
        for event in &mut alarm.events {
            let published = snapshots.on_event(event, frame.unwrap_or(watch.last_frame));
            if let (Some(published), Some(output)) = (published, self.output) {
                output.snapshot(&self.camera.name, published);
            }
        }
        self.metrics
            .record_snapshots(snapshots.written - written_before);
    }

    fn publish_alarm(&self, alarm: &AlarmOutput) {
        let camera = &self.camera.name;
        for event in &alarm.events {
            match event.kind {
                EventKind::Start => {
                    self.metrics.record_event();
                    tracing::info!(camera = %camera, id = %event.id, "alarm event started");
                }
                EventKind::End => {
                    tracing::info!(camera = %camera, id = %event.id, frames = event.frames, "alarm event ended");
                }
                _ => {}
            }
            if let Some(output) = self.output {
                output.event(event);
            }
        }
        if let Some(state) = alarm.state_change {
            self.metrics.set_anomalous(state == AlarmState::Anomalous);
            if let Some(output) = self.output {
                output.state(camera, state);
            }
        }
    }
}

fn create_parent(path: &Path) -> Result<(), String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create folder {}: {e}", dir.display()))?;
    }
    Ok(())
}

/// Returns whether the pipeline has finished its last state change.
///
/// `send_event` holds the pipeline's state lock while it hands end-of-stream to the
/// sources, and a source's streaming thread may hold the source's lock while a sink waits
/// for PLAYING. If the pipeline is still completing its asynchronous change to PLAYING,
/// that change needs the state lock, and the three threads wait for each other forever.
/// Sending end-of-stream only once no change is pending avoids this.
fn state_settled(pipeline: &gst::Pipeline) -> bool {
    let (result, _, pending) = pipeline.state(gst::ClockTime::ZERO);
    result.is_ok_and(|success| success != gst::StateChangeSuccess::Async)
        && pending == gst::State::VoidPending
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
