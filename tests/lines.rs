// SPDX-License-Identifier: MIT OR Apache-2.0
//! `patchflow run` with several cameras against a real mosquitto broker: availability and
//! its Last Will, alarm events, state topics, broker restarts, camera restarts and clean
//! stops. Frames are crops of the committed textures. A "defect" is a few frames of
//! another texture amid the normal one.
//!
//! `run` needs `libgstpatchflow.so` next to the binary, which
//! `cargo build --release --workspace` puts there.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use patchflow::checkpoint;
use patchflow::model::ModelConfig;
use patchflow::scoring::Scorer;
use serde_json::Value;
use support::broker::{Broker, ReceivedMessage, Subscriber, TlsListener, hex_bytes};
use support::fixtures;
use support::pki::Pki;

fn patchflow() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_patchflow"));
    let registry = std::env::temp_dir().join(format!(
        "patchflow-lines-registry-{}.bin",
        std::process::id()
    ));
    cmd.env("GST_REGISTRY", registry).env(
        "RUST_LOG",
        std::env::var("PATCHFLOW_TEST_LOG").unwrap_or("warn".into()),
    );
    cmd
}

/// Writes an untrained 64x64 model file.
fn small_model(dir: &Path) -> PathBuf {
    let cfg = ModelConfig {
        input_size: [64, 64],
        ..ModelConfig::lite0()
    };
    let (model, meta) = patchflow::train::init_model(&cfg, &fixtures::backbone_path(), 5).unwrap();
    let path = dir.join("model.safetensors");
    checkpoint::save(&path, &model, &meta).unwrap();
    path
}

/// Returns the `index`-th 96x96 crop of a committed texture.
fn crop(texture: &str, index: usize) -> image::RgbImage {
    let img = image::open(fixtures::image(texture)).unwrap().to_rgb8();
    let x = (index as u32 * 61) % (img.width() - 96);
    let y = (index as u32 * 89) % (img.height() - 96);
    image::imageops::crop_imm(&img, x, y, 96, 96).to_image()
}

/// Writes numbered frames `000.png`... into `dir`: `normal` crops, with `defect` crops at
/// the frames in `defect_frames`.
fn write_frames(
    dir: &Path,
    count: usize,
    textures: (&str, &str),
    defect_frames: std::ops::Range<usize>,
) {
    let crops: Vec<usize> = defect_frames.clone().collect();
    write_frames_with(dir, count, textures, defect_frames, &crops);
}

/// Writes frames as [`write_frames`] does, taking the `k`-th defect frame from crop
/// `defect_crops[k]`.
fn write_frames_with(
    dir: &Path,
    count: usize,
    (normal, defect): (&str, &str),
    defect_frames: std::ops::Range<usize>,
    defect_crops: &[usize],
) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..count {
        let image = if defect_frames.contains(&i) {
            crop(defect, defect_crops[i - defect_frames.start])
        } else {
            crop(normal, i)
        };
        image.save(dir.join(format!("{i:03}.png"))).unwrap();
    }
}

/// Scores a crop as the element scores a 96x96 frame and returns its log score.
fn crop_log_score(scorer: &Scorer, texture: &str, index: usize) -> f64 {
    let image = crop(texture, index);
    let chw: Vec<f32> = (0..3)
        .flat_map(|c| image.pixels().map(move |p| f32::from(p[c]) / 255.0))
        .collect();
    scorer.score_chw(&chw, (96, 96)).unwrap().log_score as f64
}

/// Returns `count` crop indices of `texture` whose log scores rise from one to the next:
/// the lowest, the highest and evenly spaced ranks in between among 30 crops.
fn rising_crops(model: &Path, texture: &str, count: usize) -> Vec<usize> {
    let scorer = Scorer::load(model, &candle_core::Device::Cpu).unwrap();
    let mut scored: Vec<(f64, usize)> = (0..30)
        .map(|i| (crop_log_score(&scorer, texture, i), i))
        .collect();
    scored.sort_by(|a, b| a.0.total_cmp(&b.0));
    (0..count)
        .map(|k| scored[k * (scored.len() - 1) / (count - 1)].1)
        .collect()
}

/// Returns a (normal, defect) pair of textures whose crops the model keeps apart, every
/// defect crop scoring above every normal one, and a log-domain threshold between them.
/// The alarm test then does not depend on how well a short training run separates them.
fn separated_textures(model: &Path) -> ((&'static str, &'static str), f64) {
    let scorer = Scorer::load(model, &candle_core::Device::Cpu).unwrap();
    let log_score = |texture: &str, i: usize| crop_log_score(&scorer, texture, i);
    let textures = [
        "gravel.png",
        "grass.png",
        "brick.png",
        "coffee.png",
        "chelsea.png",
    ];
    let ranges: Vec<(f64, f64)> = textures
        .iter()
        .map(|texture| {
            let scores: Vec<f64> = (0..30).map(|i| log_score(texture, i)).collect();
            let min = scores.iter().copied().fold(f64::MAX, f64::min);
            let max = scores.iter().copied().fold(f64::MIN, f64::max);
            (min, max)
        })
        .collect();
    for (i, normal) in ranges.iter().enumerate() {
        for (j, defect) in ranges.iter().enumerate() {
            if i != j && defect.0 > normal.1 {
                return ((textures[i], textures[j]), (normal.1 + defect.0) / 2.0);
            }
        }
    }
    panic!("no two textures are kept apart by the model: {textures:?} {ranges:?}");
}

/// Waits for the child to exit within `timeout`, killing it otherwise.
fn wait_exit(child: &mut Child, timeout: Duration, dir: &Path) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            child.kill().ok();
            panic!(
                "patchflow run did not exit within {timeout:?}; log:\n{}",
                run_log(dir)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([name, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// A `patchflow run` process that is killed when the test ends, also when an assertion
/// fails first, so that no endless camera outlives its test.
struct RunProcess(Child);

impl std::ops::Deref for RunProcess {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for RunProcess {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for RunProcess {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            self.0.kill().ok();
            self.0.wait().ok();
        }
    }
}

/// Starts `patchflow run CONFIG` with stderr written to `dir/run.log`.
fn spawn_run(config: &Path, dir: &Path, broker: &Broker) -> RunProcess {
    let log = std::fs::File::create(dir.join("run.log")).unwrap();
    let child = patchflow()
        .arg("run")
        .arg(config)
        .env("PATCHFLOW_TEST_BROKER", broker.url())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    RunProcess(child)
}

fn run_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("run.log")).unwrap_or_default()
}

/// Waits until a message with `payload` arrives on `topic`.
fn wait_for(subscriber: &Subscriber, topic: &str, payload: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        for message in subscriber.collect(1, left) {
            if message.topic == topic && message.payload == payload {
                return true;
            }
        }
    }
    false
}

fn mqtt_section(prefix: &str, extra: &str) -> String {
    format!(
        "[mqtt]\nurl = \"${{PATCHFLOW_TEST_BROKER}}\"\nprefix = \"{prefix}\"\nkeep_alive = 5\n{extra}\n"
    )
}

fn endless_camera(name: &str) -> String {
    format!(
        "[[lines.cameras]]\nname = \"{name}\"\nsource = {{ kind = \"test\", num_buffers = 1000000, width = 64, height = 64, framerate = 20 }}\n"
    )
}

fn payloads<'a>(messages: &'a [ReceivedMessage], topic: &str) -> Vec<&'a str> {
    messages
        .iter()
        .filter(|m| m.topic == topic)
        .map(|m| m.payload.as_str())
        .collect()
}

/// Trains a 64x64 model on gravel crops with `patchflow train`.
fn gravel_model(dir: &Path) -> PathBuf {
    let good = dir.join("good");
    std::fs::create_dir_all(&good).unwrap();
    for i in 0..8 {
        crop("gravel.png", 100 + i)
            .save(good.join(format!("{i:02}.png")))
            .unwrap();
    }
    let model = dir.join("gravel.safetensors");
    let out = patchflow()
        .args(["train", "--images"])
        .arg(&good)
        .arg("--backbone")
        .arg(fixtures::backbone_path())
        .arg("--output")
        .arg(&model)
        .args(["--input-size", "64", "--epochs", "3", "--batch-size", "2"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    model
}

#[test]
fn shared_scorer_loads_once_and_frees() {
    let dir = tempfile::tempdir().unwrap();
    let model = small_model(dir.path());
    let device = candle_core::Device::Cpu;
    let (first, loaded) = Scorer::shared(&model, &device).unwrap();
    assert!(loaded);
    let relative = dir.path().join(".").join("model.safetensors");
    let (second, loaded) = Scorer::shared(&relative, &device).unwrap();
    assert!(!loaded);
    assert!(Arc::ptr_eq(&first, &second));
    let weak = Arc::downgrade(&first);
    drop(first);
    drop(second);
    assert!(weak.upgrade().is_none(), "the cache kept the model alive");
    let (third, loaded) = Scorer::shared(&model, &device).unwrap();
    assert!(loaded);
    assert_eq!(Arc::strong_count(&third), 1);
}

#[test]
fn defect_raises_event_with_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let model = gravel_model(dir.path());
    let (textures, threshold) = separated_textures(&model);
    // Defect crops in rising score order: the event's peak rises on each of its frames.
    let rising = rising_crops(&model, textures.1, 5);
    write_frames_with(&dir.path().join("defect"), 30, textures, 12..17, &rising);
    write_frames(&dir.path().join("normal"), 30, textures, 0..0);
    let broker = Broker::start();
    let subscriber = Subscriber::start(broker.port, "pf1/#");
    let snapshot_subscriber = Subscriber::start_hex(broker.port, "pf1/+/snapshot");
    let config = dir.path().join("lines.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[defaults.model]
path = "{}"
[defaults.scoring]
threshold = {threshold}
threshold_domain = "log"
[defaults.alarm]
raise_frames = 3
clear_after = 0.0
update_interval = 0.0
[defaults.snapshot]
folder = "shots"
publish = true
{}
[[lines]]
name = "line-a"
[[lines.cameras]]
name = "defect"
source = {{ kind = "images", location = "defect/%03d.png" }}
sink = {{ kind = "frames", folder = "overlaid" }}
[[lines.cameras]]
name = "normal"
source = {{ kind = "images", location = "normal" }}
"#,
            model.display(),
            mqtt_section("pf1", "score_max_rate = 1000.0")
        ),
    )
    .unwrap();
    let out = patchflow()
        .arg("run")
        .arg(&config)
        .env("PATCHFLOW_TEST_BROKER", broker.url())
        .env("GST_DEBUG", "patchflowscore:4")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(
            "camera defect (line line-a): 30 frames scored, 0 skipped, 5 anomalous, 1 events, 4 snapshots"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "camera normal (line line-a): 30 frames scored, 0 skipped, 0 anomalous, 0 events, 0 snapshots"
        ),
        "{stderr}"
    );
    assert_eq!(stderr.matches("Loaded model").count(), 1, "{stderr}");
    assert_eq!(stderr.matches("Reusing model").count(), 1, "{stderr}");

    let messages = subscriber.collect_for(Duration::from_secs(2));
    let events: Vec<Value> = payloads(&messages, "pf1/events")
        .iter()
        .map(|p| serde_json::from_str(p).unwrap())
        .collect();
    // Raised on the third defect frame (14), updated as the peak rises on 15 and 16, and
    // ended by the quiet frame 17 (clear_after = 0).
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["start", "update", "update", "end"], "{events:#?}");
    assert!(events.iter().all(|e| e["id"] == events[0]["id"]));
    assert!(events.iter().all(|e| e["camera"] == "defect"));
    let peaks: Vec<u64> = events
        .iter()
        .map(|e| e["peak_frame"].as_u64().unwrap())
        .collect();
    assert_eq!(peaks, [14, 15, 16, 16]);
    let frames: Vec<u64> = events
        .iter()
        .map(|e| e["frames"].as_u64().unwrap())
        .collect();
    assert_eq!(frames, [3, 4, 5, 6]);
    let scores: Vec<f64> = events
        .iter()
        .map(|e| e["peak_log_score"].as_f64().unwrap())
        .collect();
    assert!(scores[0] < scores[1], "{scores:?}");
    assert!(scores[1] < scores[2], "{scores:?}");

    // Snapshots: the start frame and the peak, rewritten on each new peak, named in the
    // events and published as JPEG.
    let id = events[0]["id"].as_str().unwrap();
    let shots = dir.path().join("shots");
    let start_file = shots.join(format!("{id}-start.jpg"));
    let peak_file = shots.join(format!("{id}-peak.jpg"));
    let peak_path = peak_file.to_string_lossy();
    assert!(
        events.iter().all(|e| e["snapshot"] == *peak_path),
        "{events:#?}"
    );
    let mut names: Vec<String> = std::fs::read_dir(&shots)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, [format!("{id}-peak.jpg"), format!("{id}-start.jpg")]);
    // Each snapshot is the overlaid frame as the sink wrote it, up to JPEG's error.
    let overlaid = |frame: usize| {
        image::open(dir.path().join(format!("overlaid/frame-{frame:05}.png")))
            .unwrap()
            .to_rgb8()
    };
    let peak = image::open(&peak_file).unwrap().to_rgb8();
    let start = image::open(&start_file).unwrap().to_rgb8();
    assert_eq!(peak.dimensions(), (96, 96));
    let peak_error = mean_abs_diff(&peak, &overlaid(16));
    assert!(peak_error < 3.0, "peak snapshot vs frame 16: {peak_error}");
    assert!(mean_abs_diff(&peak, &overlaid(15)) > 2.0 * peak_error);
    let start_error = mean_abs_diff(&start, &overlaid(14));
    assert!(
        start_error < 6.0,
        "start snapshot vs frame 14: {start_error}"
    );
    let published: Vec<Vec<u8>> = snapshot_subscriber
        .collect_for(Duration::from_millis(500))
        .iter()
        .filter(|m| m.topic == "pf1/defect/snapshot")
        .map(|m| hex_bytes(&m.payload))
        .collect();
    // One per new peak (frames 14, 15 and 16). The last one is the file on disk.
    assert_eq!(published.len(), 3);
    assert_eq!(published.last(), Some(&std::fs::read(&peak_file).unwrap()));

    assert_eq!(
        payloads(&messages, "pf1/defect/state"),
        ["ok", "anomalous", "ok"]
    );
    assert_eq!(payloads(&messages, "pf1/normal/state"), ["ok"]);
    assert_eq!(payloads(&messages, "pf1/defect/score").len(), 30);
    let available = payloads(&messages, "pf1/available");
    assert_eq!(available.first(), Some(&"online"));
    assert_eq!(available.last(), Some(&"offline"));
}

#[test]
fn kill_publishes_last_will() {
    let dir = tempfile::tempdir().unwrap();
    let model = small_model(dir.path());
    let broker = Broker::start();
    let subscriber = Subscriber::start(broker.port, "pf2/available");
    let config = dir.path().join("lines.toml");
    std::fs::write(
        &config,
        format!(
            "[defaults.model]\npath = \"{}\"\n{}[[lines]]\nname = \"l\"\n{}",
            model.display(),
            mqtt_section("pf2", ""),
            endless_camera("cam")
        ),
    )
    .unwrap();
    let mut child = spawn_run(&config, dir.path(), &broker);
    assert!(
        wait_for(
            &subscriber,
            "pf2/available",
            "online",
            Duration::from_secs(60)
        ),
        "{}",
        run_log(dir.path())
    );
    // A subscriber that connects later gets the retained value.
    let late = Subscriber::start(broker.port, "pf2/available");
    assert_eq!(
        late.collect(1, Duration::from_secs(5))
            .first()
            .map(|m| m.payload.clone()),
        Some("online".to_owned())
    );

    signal(&child, "-KILL");
    wait_exit(&mut child, Duration::from_secs(10), dir.path());
    assert!(
        wait_for(
            &subscriber,
            "pf2/available",
            "offline",
            Duration::from_secs(15)
        ),
        "no Last Will after kill -9"
    );
    let after = Subscriber::start(broker.port, "pf2/available");
    assert_eq!(
        after
            .collect(1, Duration::from_secs(5))
            .first()
            .map(|m| m.payload.clone()),
        Some("offline".to_owned()),
        "the Last Will is not retained"
    );
}

#[test]
fn sigterm_publishes_offline_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let model = small_model(dir.path());
    let broker = Broker::start();
    let subscriber = Subscriber::start(broker.port, "pf3/#");
    let config = dir.path().join("lines.toml");
    std::fs::write(
        &config,
        format!(
            "[defaults.model]\npath = \"{}\"\n{}[[lines]]\nname = \"l\"\n{}{}",
            model.display(),
            mqtt_section("pf3", ""),
            endless_camera("cam-a"),
            endless_camera("cam-b")
        ),
    )
    .unwrap();
    let mut child = spawn_run(&config, dir.path(), &broker);
    assert!(
        wait_for_topic(&subscriber, "pf3/cam-b/score", Duration::from_secs(60)),
        "{}",
        run_log(dir.path())
    );
    signal(&child, "-TERM");
    let status = wait_exit(&mut child, Duration::from_secs(30), dir.path());
    let log = run_log(dir.path());
    assert!(status.success(), "{status:?}: {log}");
    assert!(log.contains("camera cam-a (line l)"), "{log}");
    assert!(
        wait_for(
            &subscriber,
            "pf3/available",
            "offline",
            Duration::from_secs(5)
        ),
        "{log}"
    );
}

#[test]
fn sighup_reloads_threshold_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let model = small_model(dir.path());
    let broker = Broker::start();
    let subscriber = Subscriber::start(broker.port, "pf6/#");
    let config = dir.path().join("lines.toml");
    let write_config = |threshold: &str| {
        std::fs::write(
            &config,
            format!(
                "[defaults.model]\npath = \"{}\"\n[defaults.scoring]\nthreshold = {threshold}\n{}[[lines]]\nname = \"l\"\n{}",
                model.display(),
                mqtt_section("pf6", "score_max_rate = 50.0"),
                endless_camera("cam")
            ),
        )
        .unwrap();
    };
    // (frame, threshold) of the score messages that arrive within `timeout`, until one
    // has `threshold`.
    let scores_until = |threshold: f64, timeout: Duration| {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            for message in subscriber.collect(1, Duration::from_millis(200)) {
                let Ok(v) = serde_json::from_str::<Value>(&message.payload) else {
                    continue;
                };
                if message.topic == "pf6/cam/score" {
                    let pair = (
                        v["frame"].as_u64().unwrap(),
                        v["threshold"].as_f64().unwrap(),
                    );
                    seen.push(pair);
                    if (pair.1 - threshold).abs() < 1e-6 {
                        return seen;
                    }
                }
            }
        }
        panic!(
            "no score with threshold {threshold} in {timeout:?}: {seen:?}\n{}",
            run_log(dir.path())
        );
    };

    write_config("0.9");
    let mut child = spawn_run(&config, dir.path(), &broker);
    let before = scores_until(0.9, Duration::from_secs(60));
    write_config("0.25");
    signal(&child, "-HUP");
    let after = scores_until(0.25, Duration::from_secs(30));
    // The pipeline kept playing: frame numbers go on rather than starting again at 0.
    let last_before = before.last().unwrap().0;
    let first_new = after.last().unwrap().0;
    assert!(first_new > last_before, "{before:?} {after:?}");

    // An invalid file changes nothing and the run goes on.
    write_config("\"high\"");
    signal(&child, "-HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !run_log(dir.path()).contains("cannot reload the config") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = run_log(dir.path());
    assert!(log.contains("cannot reload the config"), "{log}");
    assert!(log.contains("scoring.threshold"), "{log}");
    let later = scores_until(0.25, Duration::from_secs(10));
    assert!(
        later.iter().all(|(_, t)| (t - 0.25).abs() < 1e-6),
        "{later:?}"
    );

    signal(&child, "-TERM");
    let status = wait_exit(&mut child, Duration::from_secs(30), dir.path());
    let log = run_log(dir.path());
    assert!(status.success(), "{status:?}: {log}");
    assert!(log.contains("reloaded "), "{log}");
    assert!(log.contains(" 0 restarts"), "{log}");
}

/// Waits until any message arrives on `topic`.
fn wait_for_topic(subscriber: &Subscriber, topic: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        if subscriber.collect(1, left).iter().any(|m| m.topic == topic) {
            return true;
        }
    }
    false
}

/// Mean absolute difference of two images' channel values.
fn mean_abs_diff(a: &image::RgbImage, b: &image::RgbImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions());
    let total: u64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| u64::from(x.abs_diff(*y)))
        .sum();
    total as f64 / a.as_raw().len() as f64
}

fn score_frames(messages: &[ReceivedMessage], topic: &str) -> Vec<u64> {
    payloads(messages, topic)
        .iter()
        .filter_map(|p| serde_json::from_str::<Value>(p).ok())
        .filter_map(|v| v["frame"].as_u64())
        .collect()
}

#[test]
fn broker_restart_resumes_publishing() {
    let dir = tempfile::tempdir().unwrap();
    let model = small_model(dir.path());
    let mut broker = Broker::start();
    let subscriber = Subscriber::start(broker.port, "pf4/#");
    let config = dir.path().join("lines.toml");
    std::fs::write(
        &config,
        format!(
            "[defaults.model]\npath = \"{}\"\n{}[[lines]]\nname = \"l\"\n{}",
            model.display(),
            mqtt_section("pf4", "score_max_rate = 20.0"),
            endless_camera("cam")
        ),
    )
    .unwrap();
    let mut child = spawn_run(&config, dir.path(), &broker);
    assert!(
        wait_for_topic(&subscriber, "pf4/cam/score", Duration::from_secs(60)),
        "{}",
        run_log(dir.path())
    );
    let before = score_frames(
        &subscriber.collect_for(Duration::from_millis(500)),
        "pf4/cam/score",
    );
    let last_before = before.iter().copied().max().unwrap_or(0);

    broker.stop();
    drop(subscriber);
    std::thread::sleep(Duration::from_secs(2));
    broker.restart();
    let resumed = Subscriber::start(broker.port, "pf4/#");
    // The restarted broker has no retained messages, so `online` comes from the publisher's
    // reconnect.
    assert!(
        wait_for(&resumed, "pf4/available", "online", Duration::from_secs(15)),
        "{}",
        run_log(dir.path())
    );
    // The camera's state is published again after the reconnect and retained, so a client
    // that subscribes later still gets it.
    let late = Subscriber::start(broker.port, "pf4/cam/state");
    assert!(
        wait_for_topic(&late, "pf4/cam/state", Duration::from_secs(5)),
        "{}",
        run_log(dir.path())
    );
    let after = score_frames(
        &resumed.collect_for(Duration::from_secs(2)),
        "pf4/cam/score",
    );
    assert!(
        after.iter().any(|frame| *frame > last_before + 20),
        "no scores of frames after the outage: before {last_before}, after {after:?}"
    );
    assert!(child.try_wait().unwrap().is_none(), "patchflow run exited");

    signal(&child, "-TERM");
    let status = wait_exit(&mut child, Duration::from_secs(30), dir.path());
    let log = run_log(dir.path());
    assert!(status.success(), "{log}");
    assert!(log.contains("lost connection to MQTT broker"), "{log}");
    let summary = log
        .lines()
        .find(|l| l.starts_with("mqtt "))
        .unwrap_or_default();
    assert!(!summary.contains(" 0 reconnects"), "{log}");
}

#[test]
fn failed_camera_restarts_while_other_scores() {
    let dir = tempfile::tempdir().unwrap();
    let model = small_model(dir.path());
    let broker = Broker::start();
    let subscriber = Subscriber::start(broker.port, "pf5/#");
    let config = dir.path().join("lines.toml");
    std::fs::write(
        &config,
        format!(
            r#"[defaults.model]
path = "{}"
[defaults.restart]
initial_delay = 0.2
max_delay = 0.4
{}[[lines]]
name = "l"
{}[[lines.cameras]]
name = "late"
source = {{ kind = "images", location = "late/%03d.png" }}
"#,
            model.display(),
            mqtt_section("pf5", "score_max_rate = 1000.0"),
            endless_camera("steady")
        ),
    )
    .unwrap();
    let mut child = spawn_run(&config, dir.path(), &broker);
    assert!(
        wait_for_topic(&subscriber, "pf5/steady/score", Duration::from_secs(60)),
        "{}",
        run_log(dir.path())
    );
    let started = Instant::now();
    while run_log(dir.path())
        .matches("camera pipeline failed, restarting")
        .count()
        < 3
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no restarts logged: {}",
            run_log(dir.path())
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The missing frames appear: the camera's next restart plays them.
    write_frames(
        &dir.path().join("late"),
        5,
        ("gravel.png", "gravel.png"),
        0..0,
    );
    let messages = subscriber.collect_for(Duration::from_secs(1));
    let mut late = score_frames(&messages, "pf5/late/score");
    let deadline = Instant::now() + Duration::from_secs(30);
    while late.len() < 5 && Instant::now() < deadline {
        late.extend(score_frames(
            &subscriber.collect(1, Duration::from_secs(1)),
            "pf5/late/score",
        ));
    }
    assert_eq!(late, [0, 1, 2, 3, 4], "{}", run_log(dir.path()));
    let steady_after = score_frames(
        &subscriber.collect_for(Duration::from_secs(1)),
        "pf5/steady/score",
    );
    assert!(!steady_after.is_empty(), "the other camera stopped scoring");

    signal(&child, "-TERM");
    let status = wait_exit(&mut child, Duration::from_secs(30), dir.path());
    let log = run_log(dir.path());
    assert!(status.success(), "{log}");
    let late_summary = log
        .lines()
        .find(|l| l.starts_with("camera late "))
        .unwrap_or_default();
    assert!(late_summary.contains("5 frames scored"), "{log}");
    assert!(!late_summary.contains(" 0 restarts"), "{log}");
}

#[test]
fn wrong_tls_ca_is_reported_while_cameras_score() {
    let dir = tempfile::tempdir().unwrap();
    let model = small_model(dir.path());
    let pki = Pki::generate();
    let broker = Broker::start_tls(TlsListener {
        ca_file: pki.ca_file(),
        cert_file: pki.server_cert_file(),
        key_file: pki.server_key_file(),
        require_certificate: false,
    });
    let subscriber = Subscriber::start(broker.port, "pf6/#");
    let config = dir.path().join("lines.toml");
    std::fs::write(
        &config,
        format!(
            r#"[defaults.model]
path = "{}"
[mqtt]
url = "{}"
prefix = "pf6"
ca_file = "{}"
score_max_rate = 1000.0
[[lines]]
name = "l"
[[lines.cameras]]
name = "cam"
source = {{ kind = "test", num_buffers = 30, width = 64, height = 64 }}
"#,
            model.display(),
            broker.tls_url("127.0.0.1"),
            pki.other_ca_file().display()
        ),
    )
    .unwrap();

    let log = std::fs::File::create(dir.path().join("run.log")).unwrap();
    let mut child = patchflow()
        .arg("run")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(120), dir.path());
    let log = run_log(dir.path());
    assert!(status.success(), "{status:?}: {log}");

    // Every frame is scored although no message reaches the broker.
    assert!(
        log.contains("camera cam (line l): 30 frames scored"),
        "{log}"
    );
    assert!(log.contains("0 messages published"), "{log}");
    let handshake = log
        .lines()
        .find(|line| line.contains("TLS handshake with"))
        .unwrap_or_else(|| panic!("no TLS error logged: {log}"));
    assert!(
        handshake.contains(&broker.tls_url("127.0.0.1")),
        "{handshake}"
    );
    assert!(
        handshake.contains("certificate verify failed"),
        "{handshake}"
    );
    assert!(
        handshake.contains(&pki.other_ca_file().display().to_string()),
        "{handshake}"
    );
    assert_eq!(subscriber.collect_for(Duration::from_millis(300)), []);
}

/// Waits for the line in which `patchflow run` prints its health address and returns the
/// address, `IP:PORT`.
fn health_address(dir: &Path, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let log = run_log(dir);
        let address = log
            .lines()
            .find_map(|line| line.strip_prefix("serving health on http://"))
            .and_then(|rest| rest.split_once("/health"))
            .map(|(address, _)| address.to_owned());
        if let Some(address) = address {
            return address;
        }
        assert!(
            Instant::now() < deadline,
            "no health address printed: {log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends `GET path` over a plain TCP connection and returns the status code and the body.
fn http_get(address: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of headers in {response:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status code in {head:?}"));
    (status, body.to_owned())
}

/// Returns the value of the sample `name{camera="camera"}` in a Prometheus exposition.
fn metric(exposition: &str, name: &str, camera: &str) -> Option<f64> {
    let prefix = format!("{name}{{camera=\"{camera}\"}} ");
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .map(|value| value.parse().unwrap())
}

/// Fetches `/metrics` until `done` accepts it, and returns that exposition.
fn wait_for_metrics(
    address: &str,
    dir: &Path,
    timeout: Duration,
    done: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let (status, body) = http_get(address, "/metrics");
        assert_eq!(status, 200, "{body}");
        if done(&body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "metrics did not reach the expected values within {timeout:?}:\n{body}\nlog:\n{}",
            run_log(dir)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Fetches `/health` until it returns `status`, and returns the body as JSON.
fn wait_for_health(address: &str, dir: &Path, status: u16, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let (got, body) = http_get(address, "/health");
        if got == status {
            return serde_json::from_str(&body).unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "/health still {got} after {timeout:?}, expected {status}: {body}\nlog:\n{}",
            run_log(dir)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn health_endpoints_follow_cameras() {
    let dir = tempfile::tempdir().unwrap();
    let model = small_model(dir.path());
    let broker = Broker::start();
    let config = dir.path().join("lines.toml");
    std::fs::write(
        &config,
        format!(
            r#"[defaults.model]
path = "{}"
[defaults.restart]
initial_delay = 0.2
max_delay = 0.4
{}
[health]
address = "127.0.0.1:0"

[[lines]]
name = "l"
[[lines.cameras]]
name = "steady"
source = {{ kind = "test", num_buffers = 1000000, width = 64, height = 64, framerate = 20 }}
scoring = {{ interval = 2 }}
[[lines.cameras]]
name = "cells"
source = {{ kind = "images", location = "cells/%03d.png", framerate = 10, loop = true }}
"#,
            model.display(),
            mqtt_section("pf8", "score_max_rate = 5.0"),
        ),
    )
    .unwrap();
    let mut child = spawn_run(&config, dir.path(), &broker);
    let address = health_address(dir.path(), Duration::from_secs(60));
    assert!(
        address.starts_with("127.0.0.1:") && !address.ends_with(":0"),
        "{address}"
    );

    // The cells camera has no images yet, so its pipeline fails and restarts.
    let metrics = wait_for_metrics(&address, dir.path(), Duration::from_secs(60), |m| {
        metric(m, "patchflow_frames_scored_total", "steady").unwrap_or(0.0) >= 2.0
            && metric(m, "patchflow_source_restarts_total", "cells").unwrap_or(0.0) >= 2.0
    });
    for camera in ["steady", "cells"] {
        assert!(
            metric(&metrics, "patchflow_up", camera).is_some(),
            "no patchflow_up for {camera}:\n{metrics}"
        );
    }
    assert_eq!(
        metric(&metrics, "patchflow_frames_scored_total", "cells"),
        Some(0.0)
    );
    let health = wait_for_health(&address, dir.path(), 503, Duration::from_secs(10));
    assert_eq!(health["status"], "degraded");
    assert_eq!(health["cameras"]["steady"]["running"], true);
    assert_eq!(health["cameras"]["cells"]["running"], false);
    let error = health["cameras"]["cells"]["last_error"]
        .as_str()
        .unwrap_or_else(|| panic!("no last error: {health}"));
    assert!(!error.is_empty());

    // Frames scored keep growing, and with interval = 2 every other frame is skipped.
    let before = metric(&metrics, "patchflow_frames_scored_total", "steady").unwrap();
    let later = wait_for_metrics(&address, dir.path(), Duration::from_secs(30), |m| {
        metric(m, "patchflow_frames_scored_total", "steady").unwrap() > before + 5.0
            && metric(m, "patchflow_frames_skipped_total", "steady").unwrap() > 0.0
    });
    assert!(metric(&later, "patchflow_frames_per_second", "steady").unwrap() > 0.0);
    assert!(metric(&later, "patchflow_inference_mean_milliseconds", "steady").unwrap() > 0.0);
    assert!(metric(&later, "patchflow_mqtt_published_total", "steady").unwrap() > 0.0);
    assert_eq!(
        metric(&later, "patchflow_mqtt_dropped_total", "steady"),
        Some(0.0)
    );

    // The images appear: the next restart plays them in a loop and every camera runs.
    write_frames(
        &dir.path().join("cells"),
        5,
        ("gravel.png", "gravel.png"),
        0..0,
    );
    let health = wait_for_health(&address, dir.path(), 200, Duration::from_secs(30));
    assert_eq!(health["status"], "ok");
    assert_eq!(health["cameras"]["cells"]["running"], true);
    wait_for_metrics(&address, dir.path(), Duration::from_secs(30), |m| {
        metric(m, "patchflow_frames_scored_total", "cells").unwrap() >= 5.0
    });

    // Without its images, the looping source ends its stream and the camera stops.
    std::fs::remove_dir_all(dir.path().join("cells")).unwrap();
    let health = wait_for_health(&address, dir.path(), 503, Duration::from_secs(30));
    assert_eq!(health["cameras"]["cells"]["running"], false);
    assert_eq!(health["cameras"]["steady"]["running"], true);

    signal(&child, "-TERM");
    let status = wait_exit(&mut child, Duration::from_secs(30), dir.path());
    let log = run_log(dir.path());
    assert!(status.success(), "{log}");
    let cells_summary = log
        .lines()
        .find(|l| l.starts_with("camera cells "))
        .unwrap_or_default();
    assert!(!cells_summary.contains(" 0 restarts"), "{log}");
    assert!(
        std::net::TcpStream::connect(&address).is_err(),
        "the health endpoint still listens after the run"
    );
}

#[test]
fn newest_mode_reports_skipped_frames() {
    let dir = tempfile::tempdir().unwrap();
    let model = small_model(dir.path());
    let broker = Broker::start();
    let config = dir.path().join("lines.toml");
    std::fs::write(
        &config,
        format!(
            r#"[defaults.model]
path = "{}"
{}
[health]
address = "127.0.0.1:0"

[[lines]]
name = "l"
[[lines.cameras]]
name = "live"
source = {{ kind = "test", num_buffers = 1000000, width = 64, height = 64, framerate = 400, is_live = true }}
scoring = {{ mode = "newest" }}
"#,
            model.display(),
            mqtt_section("pf7", ""),
        ),
    )
    .unwrap();
    let mut child = spawn_run(&config, dir.path(), &broker);
    let address = health_address(dir.path(), Duration::from_secs(60));
    // At 400 frames a second, frames are skipped whenever scoring takes longer than 2.5 ms.
    // The 64x64 model took about 20 ms a frame on the 2-core development machine.
    let metrics = wait_for_metrics(&address, dir.path(), Duration::from_secs(60), |m| {
        metric(m, "patchflow_frames_scored_total", "live").unwrap_or(0.0) >= 5.0
            && metric(m, "patchflow_frames_skipped_total", "live").unwrap_or(0.0) >= 5.0
    });
    let fps = metric(&metrics, "patchflow_frames_per_second", "live").unwrap();
    assert!(fps > 0.0, "{metrics}");
    let (status, _) = http_get(&address, "/health");
    assert_eq!(status, 200);

    signal(&child, "-TERM");
    let status = wait_exit(&mut child, Duration::from_secs(30), dir.path());
    let log = run_log(dir.path());
    assert!(status.success(), "{log}");
    let summary = log
        .lines()
        .find(|l| l.starts_with("camera live "))
        .unwrap_or_default();
    assert!(!summary.contains(" 0 skipped"), "{log}");
}

#[test]
fn busy_health_port_fails_run() {
    let dir = tempfile::tempdir().unwrap();
    let model = small_model(dir.path());
    let occupant = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = occupant.local_addr().unwrap().to_string();
    let config = dir.path().join("lines.toml");
    std::fs::write(
        &config,
        format!(
            "[defaults.model]\npath = \"{}\"\n[health]\naddress = \"{address}\"\n[[lines]]\nname = \"l\"\n{}",
            model.display(),
            endless_camera("cam")
        ),
    )
    .unwrap();
    let out = patchflow().arg("run").arg(&config).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&address), "{stderr}");
    assert!(stderr.contains("already in use"), "{stderr}");
    assert!(stderr.contains("health.address"), "{stderr}");
    assert!(!stderr.contains("frames scored"), "{stderr}");
}
