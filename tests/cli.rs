// SPDX-License-Identifier: MIT OR Apache-2.0
//! The `patchflow` binary as a user runs it: train, info and predict on real textures,
//! and `run` on line configs, with the GStreamer plugin and a real mosquitto broker.
//!
//! `run` needs `libgstpatchflow.so` next to the binary, which
//! `cargo build --release --workspace` (run by scripts/setup.sh) puts there.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use patchflow::checkpoint;
use patchflow::model::ModelConfig;
use serde_json::Value;
use support::broker::{Broker, Subscriber, TlsListener};
use support::fixtures;
use support::pki::Pki;

fn patchflow() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_patchflow"));
    // A private registry, so that a stale cache cannot hide the plugin.
    let registry =
        std::env::temp_dir().join(format!("patchflow-cli-registry-{}.bin", std::process::id()));
    cmd.env("GST_REGISTRY", registry).env("RUST_LOG", "warn");
    cmd
}

fn run(cmd: &mut Command) -> Output {
    let output = cmd.output().expect("patchflow starts");
    eprintln!("stderr: {}", String::from_utf8_lossy(&output.stderr));
    output
}

fn plugin_next_to_binary() {
    let dir = Path::new(env!("CARGO_BIN_EXE_patchflow"))
        .parent()
        .unwrap()
        .to_path_buf();
    let so = dir.join("libgstpatchflow.so");
    assert!(
        so.is_file(),
        "{} is missing: build it with `cargo build --release --workspace` before the tests",
        so.display()
    );
}

/// Writes `count` 96x96 crops of a committed texture into `dir`.
fn texture_crops(name: &str, dir: &Path, count: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let img = image::open(fixtures::image(name)).unwrap().to_rgb8();
    for i in 0..count {
        let (x, y) = ((i * 61) % 400, (i * 89) % 400);
        let crop = image::imageops::crop_imm(&img, x as u32, y as u32, 96, 96).to_image();
        crop.save(dir.join(format!("{i:02}.png"))).unwrap();
    }
}

/// Writes an untrained 64x64 model file, enough to exercise the pipeline.
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

#[test]
fn train_info_predict() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    texture_crops("gravel.png", &good, 6);
    let model = dir.path().join("gravel.safetensors");
    let out = run(patchflow()
        .args(["train", "--images"])
        .arg(&good)
        .arg("--backbone")
        .arg(fixtures::backbone_path())
        .arg("--output")
        .arg(&model)
        .args(["--input-size", "64", "--epochs", "2", "--batch-size", "2"]));
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("5 train / 1 held-out images"));

    let out = run(patchflow().arg("info").arg(&model));
    assert!(out.status.success());
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["config"]["input_size"], serde_json::json!([64, 64]));
    assert_eq!(
        info["config"]["preprocess"]["mean"],
        serde_json::json!([0.5, 0.5, 0.5])
    );
    assert_eq!(info["backbone"]["name"], "tf_efficientnet_lite0");
    assert_eq!(info["training"]["epochs"], 2);

    let overlays = dir.path().join("overlays");
    let out = run(patchflow()
        .args(["predict", "--model"])
        .arg(&model)
        .arg("--output-dir")
        .arg(&overlays)
        .arg(&good)
        .arg(fixtures::image("brick.png")));
    assert!(out.status.success());
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 7);
    for line in &lines {
        let score = line["score"].as_f64().unwrap();
        assert!((-1.0..=0.0).contains(&score), "{line}");
        assert!(line["label"] == "normal" || line["label"] == "anomalous");
        let overlay = PathBuf::from(line["overlay"].as_str().unwrap());
        assert!(overlay.is_file(), "{}", overlay.display());
    }
    let brick = image::open(overlays.join("brick_overlay.png")).unwrap();
    assert_eq!((brick.width(), brick.height()), (512, 512));

    // Training calibrates a log threshold too, and predict uses it when asked for the
    // log domain without a value.
    let log_threshold = info["stats"]["image_log_threshold"].as_f64().unwrap();
    assert!(log_threshold > 0.0, "{info}");
    let out = run(patchflow()
        .args(["predict", "--threshold-domain", "log", "--model"])
        .arg(&model)
        .arg(&good)
        .arg(fixtures::image("brick.png")));
    assert!(out.status.success());
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let line: Value = serde_json::from_str(line).unwrap();
        // Both values were float32 before JSON; compare them as such.
        let log_score = line["log_score"].as_f64().unwrap() as f32;
        assert_eq!(
            line["is_anomalous"],
            log_score > log_threshold as f32,
            "{line}"
        );
    }
}

#[test]
fn bench_rejects_invalid_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let missing_folder = dir.path().join("missing").join("bench.json");
    let missing_python = dir.path().join("python");
    let cases: [(Vec<std::ffi::OsString>, &str); 7] = [
        (vec!["--threads".into(), "0".into()], "invalid --threads 0"),
        (
            vec!["--batch".into(), "100000".into()],
            "invalid --batch 100000",
        ),
        (
            vec!["--max-seconds".into(), "inf".into()],
            "invalid --max-seconds inf",
        ),
        (
            vec!["--iterations".into(), "0".into()],
            "invalid --iterations 0",
        ),
        (
            vec!["--warmup".into(), "99999999".into()],
            "invalid --warmup 99999999",
        ),
        (
            vec!["--json".into(), missing_folder.clone().into()],
            "not found; create it first",
        ),
        (
            vec!["--torch-python".into(), missing_python.clone().into()],
            "data/reference-venv/bin/python",
        ),
    ];
    for (args, expected) in cases {
        // Each is rejected before any measurement starts, so the run takes no time.
        let out = run(patchflow()
            .args(["bench", "--configs", "lite0"])
            .args(&args));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(expected), "{args:?}: {err}");
    }
}

#[test]
fn predict_rejects_threshold_outside_domain() {
    let dir = tempfile::tempdir().unwrap();
    let model = small_model(dir.path());
    let out = run(patchflow()
        .args([
            "predict",
            "--threshold",
            "0.3",
            "--threshold-domain",
            "raw",
            "--model",
        ])
        .arg(&model)
        .arg(fixtures::image("brick.png")));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--threshold"), "{err}");
    assert!(err.contains("raw score range [-1, 0]"), "{err}");
}

#[test]
fn predict_takes_negative_raw_threshold() {
    let dir = tempfile::tempdir().unwrap();
    let model = small_model(dir.path());
    // Raw scores lie in [-1, 0], so -1 flags every image and a value just below 0
    // flags none of these.
    for (threshold, expected) in [("-1", true), ("-0.000001", false)] {
        let out = run(patchflow()
            .args([
                "predict",
                "--threshold-domain",
                "raw",
                "--threshold",
                threshold,
            ])
            .arg("--model")
            .arg(&model)
            .arg(fixtures::image("brick.png")));
        assert!(out.status.success(), "--threshold {threshold}");
        let line: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            line["is_anomalous"], expected,
            "--threshold {threshold}: {line}"
        );
    }
}

#[test]
fn predict_rejects_corrupt_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("broken.safetensors");
    std::fs::write(&model, b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":").unwrap();
    let out = run(patchflow()
        .args(["predict", "--model"])
        .arg(&model)
        .arg(fixtures::image("brick.png")));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("broken.safetensors"), "{err}");
}

#[test]
fn predict_points_checkpoint_to_import() {
    let checkpoint =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/anomalib/patchflow_lite0.ckpt");
    let out = run(patchflow()
        .args(["predict", "--cpu-threads", "1", "--model"])
        .arg(&checkpoint)
        .arg(fixtures::image("brick.png")));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is a zip archive"), "{err}");
    assert!(err.contains("patchflow import"), "{err}");
}

fn write_config(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("line.toml");
    std::fs::write(&path, body).unwrap();
    path
}

/// A config with one line of one camera, with `extra` appended to the camera's table.
fn one_camera(name: &str, model: &Path, source: &str, extra: &str) -> String {
    format!(
        "[defaults.model]\npath = \"{}\"\n[[lines]]\nname = \"line\"\n[[lines.cameras]]\nname = \"{name}\"\nsource = {source}\n{extra}",
        model.display()
    )
}

#[test]
fn run_line_to_frames_and_broker() {
    plugin_next_to_binary();
    let dir = tempfile::tempdir().unwrap();
    let model = small_model(dir.path());
    let broker = Broker::start();
    let subscriber = Subscriber::start(broker.port, "patchflow/cli-test/score");
    let config = write_config(
        dir.path(),
        &format!(
            r#"
[mqtt]
url = "${{PATCHFLOW_TEST_BROKER}}"
score_max_rate = 1000.0
{}"#,
            one_camera(
                "cli-test",
                &model,
                r#"{ kind = "test", num_buffers = 8, width = 80, height = 60 }"#,
                "sink = { kind = \"frames\", folder = \"frames\" }\n",
            )
        ),
    );
    let out = run(patchflow()
        .arg("run")
        .arg(&config)
        .env("PATCHFLOW_TEST_BROKER", broker.url()));
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("8 frames scored, 0 skipped"), "{stderr}");
    assert!(stderr.contains("0 dropped, 0 still queued"), "{stderr}");

    let frames: Vec<_> = std::fs::read_dir(dir.path().join("frames"))
        .unwrap()
        .collect();
    assert_eq!(frames.len(), 8);
    let messages = subscriber.collect(8, Duration::from_secs(10));
    assert_eq!(messages.len(), 8);
    let first: Value = serde_json::from_str(&messages[0].payload).unwrap();
    assert_eq!(first["frame"], 0);
    assert_eq!(first["source"], "cli-test");
}

#[test]
fn run_line_over_tls_with_client_certificate() {
    plugin_next_to_binary();
    let dir = tempfile::tempdir().unwrap();
    let model = small_model(dir.path());
    let pki = Pki::generate();
    let broker = Broker::start_tls(TlsListener {
        ca_file: pki.ca_file(),
        cert_file: pki.server_cert_file(),
        key_file: pki.server_key_file(),
        require_certificate: true,
    });
    let subscriber = Subscriber::start(broker.port, "patchflow/tls-test/score");
    let config = write_config(
        dir.path(),
        &format!(
            r#"
[mqtt]
url = "${{PATCHFLOW_TEST_BROKER}}"
ca_file = "{}"
client_cert_file = "{}"
client_key_file = "{}"
score_max_rate = 1000.0
{}"#,
            pki.ca_file().display(),
            pki.client_cert_file().display(),
            pki.client_key_file().display(),
            one_camera(
                "tls-test",
                &model,
                r#"{ kind = "test", num_buffers = 8, width = 80, height = 60 }"#,
                "",
            )
        ),
    );
    let url = broker.tls_url("localhost");

    let out = run(patchflow()
        .args(["config", "check"])
        .arg(&config)
        .env("PATCHFLOW_TEST_BROKER", &url));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = run(patchflow()
        .arg("run")
        .arg(&config)
        .env("PATCHFLOW_TEST_BROKER", &url));
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("mqtt {url}:")), "{stderr}");
    assert!(stderr.contains("0 dropped, 0 still queued"), "{stderr}");
    let messages = subscriber.collect(8, Duration::from_secs(10));
    let frames: Vec<u64> = messages
        .iter()
        .map(|message| {
            let json: Value = serde_json::from_str(&message.payload).unwrap();
            json["frame"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(frames, (0..8).collect::<Vec<u64>>());
}

#[test]
fn config_check_reports_tls_file_problems() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate();
    // The same EC key in the traditional SEC1 form, which native-tls does not read.
    let sec1_key = dir.path().join("client-sec1.key");
    let out = run(Command::new("openssl")
        .args(["pkey", "-traditional", "-in"])
        .arg(pki.client_key_file())
        .arg("-out")
        .arg(&sec1_key));
    assert!(out.status.success());
    let model = small_model(dir.path());
    let camera = one_camera("cam", &model, r#"{ kind = "test" }"#, "");
    let check = |mqtt: String| {
        let config = write_config(dir.path(), &format!("[mqtt]\n{mqtt}\n{camera}"));
        let out = run(patchflow().args(["config", "check"]).arg(&config));
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let (code, err) = check(format!(
        "url = \"mqtts://localhost\"\nca_file = \"{}\"\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"",
        pki.ca_file().display(),
        pki.client_cert_file().display(),
        pki.client_key_file().display()
    ));
    assert_eq!(code, Some(0), "{err}");

    let cases = [
        // A key file is no CA file.
        (
            format!("ca_file = \"{}\"", pki.client_key_file().display()),
            "mqtt.ca_file: invalid MQTT CA file",
            "contains no PEM certificate",
        ),
        (
            format!(
                "client_cert_file = \"{}\"\nclient_key_file = \"{}\"",
                pki.client_cert_file().display(),
                pki.other_key_file().display()
            ),
            "mqtt.client_key_file: invalid MQTT client key file",
            "does not belong to the certificate",
        ),
        (
            format!(
                "client_cert_file = \"{}\"\nclient_key_file = \"{}\"",
                pki.client_cert_file().display(),
                sec1_key.display()
            ),
            "mqtt.client_key_file: invalid MQTT client key file",
            "openssl pkcs8 -topk8 -nocrypt",
        ),
        (
            format!("ca_file = \"{}\"", dir.path().join("absent.pem").display()),
            "mqtt.ca_file: invalid MQTT CA file",
            "cannot read the file",
        ),
    ];
    for (files, field, reason) in cases {
        let (code, err) = check(format!("url = \"mqtts://localhost\"\n{files}"));
        assert_eq!(code, Some(2), "{files}: {err}");
        let line = err
            .lines()
            .find(|line| line.contains(field))
            .unwrap_or_else(|| panic!("{field} missing from: {err}"));
        assert!(line.contains(reason), "{line}");
    }

    let (code, err) = check(format!(
        "url = \"mqtt://localhost\"\nca_file = \"{}\"",
        pki.ca_file().display()
    ));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("mqtt.ca_file: only used with TLS"), "{err}");
}

#[test]
fn run_reports_every_config_problem() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        r#"
[defaults.model]
path = "missing.safetensors"
[defaults.scoring]
threshold = 1.5
[mqtt]
url = "http://localhost"
prefix = "lines/#"
[[lines]]
name = "bad/name"
[lines.scoring]
colormap = "rainbow"
[[lines.cameras]]
name = "cam"
source = { kind = "images", location = "frames/list.txt" }
"#,
    );
    let out = run(patchflow().arg("run").arg(&config));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for field in [
        "mqtt.prefix:",
        "lines[0].name:",
        "defaults.model.path:",
        "defaults.scoring.threshold:",
        "lines[0].scoring.colormap:",
        "mqtt.url:",
    ] {
        assert!(err.contains(field), "{field} missing from: {err}");
    }
}

#[test]
fn run_rejects_damaged_model_as_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = small_model(dir.path());
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() / 3]).unwrap();
    let config = write_config(
        dir.path(),
        &one_camera("x", &model, r#"{ kind = "test" }"#, ""),
    );
    let out = run(patchflow().arg("run").arg(&config));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("defaults.model.path"), "{err}");
    assert!(!err.contains("CRITICAL"), "{err}");
}

#[test]
fn run_plays_jpeg_frames() {
    plugin_next_to_binary();
    let dir = tempfile::tempdir().unwrap();
    let model = small_model(dir.path());
    let frames = dir.path().join("jpg");
    std::fs::create_dir_all(&frames).unwrap();
    let img = image::open(fixtures::image("gravel.png"))
        .unwrap()
        .to_rgb8();
    for i in 0..3 {
        let crop = image::imageops::crop_imm(&img, i * 50, 0, 96, 64).to_image();
        crop.save(frames.join(format!("{i:03}.jpg"))).unwrap();
    }
    for location in ["jpg/%03d.jpg", "jpg/*.jpg", "jpg"] {
        let config = write_config(
            dir.path(),
            &one_camera(
                "jpeg",
                &model,
                &format!(r#"{{ kind = "images", location = "{location}" }}"#),
                "scoring = { interval = 2 }\n",
            ),
        );
        let out = run(patchflow().arg("run").arg(&config));
        assert!(out.status.success(), "{location}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("2 frames scored, 1 skipped"),
            "{location}: {stderr}"
        );
    }
}

#[test]
fn config_check_lists_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        r#"
[defaults.model]
path = "none.safetensors"
[defaults.alarm]
raise_frames = 0
[[lines]]
name = "a"
[[lines.cameras]]
name = "a/b"
source = { kind = "test" }
[[lines.cameras]]
name = "c2"
source = { kind = "test", framerate = 0 }
[lines.cameras.scoring]
interval = 0
alpha = 2.0
threshold_domain = "linear"
[lines.cameras.sink]
kind = "file"
location = "out.mp4"
"#,
    );
    let out = run(patchflow().args(["config", "check"]).arg(&config));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for field in [
        "lines[0].cameras[0].name:",
        "lines[0].cameras[1].source.framerate:",
        "defaults.model.path:",
        "defaults.alarm.raise_frames:",
        "lines[0].cameras[1].scoring.interval:",
        "lines[0].cameras[1].scoring.alpha:",
        "lines[0].cameras[1].scoring.threshold_domain:",
        "lines[0].cameras[1].sink.location:",
    ] {
        assert!(err.contains(field), "{field} missing from: {err}");
    }
}

#[test]
fn config_example_checks_apart_from_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(patchflow().args(["config", "example"]));
    assert!(out.status.success());
    let example = String::from_utf8(out.stdout).unwrap();
    let model = small_model(dir.path());
    let config = write_config(
        dir.path(),
        &example.replace(
            "../data/demo/model.safetensors",
            &model.display().to_string(),
        ),
    );
    let out = run(patchflow().args(["config", "check"]).arg(&config));
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("camera camera-1 (line line-1)"), "{stdout}");
    assert!(stdout.contains("patchflowscore name=scorer"), "{stdout}");
}

#[test]
fn run_rejects_unknown_fields() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "[[lines]]\nname = \"x\"\ncolour = 3\n[[lines.cameras]]\nname = \"c\"\nsource = { kind = \"test\" }\n",
    );
    let out = run(patchflow().arg("run").arg(&config));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("lines[0].colour: unknown key"), "{err}");
}

#[test]
fn interrupt_finishes_the_video_file() {
    plugin_next_to_binary();
    let dir = tempfile::tempdir().unwrap();
    let model = small_model(dir.path());
    let config = write_config(
        dir.path(),
        &one_camera(
            "endless",
            &model,
            r#"{ kind = "test", num_buffers = 100000, width = 64, height = 64 }"#,
            "sink = { kind = \"file\", location = \"out.avi\" }\n",
        ),
    );
    let mut child = patchflow()
        .arg("run")
        .arg(&config)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let video = dir.path().join("out.avi");
    let started = Instant::now();
    while std::fs::metadata(&video).map(|m| m.len()).unwrap_or(0) < 20_000 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no video written within 60 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().ok();
            panic!("patchflow run did not stop within 20 s of SIGINT");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(exit.success(), "{exit:?}");
    // avimux writes its index when it receives end-of-stream.
    let bytes = std::fs::read(&video).unwrap();
    assert!(
        bytes.windows(4).any(|w| w == b"idx1"),
        "the AVI index was not written"
    );
}
