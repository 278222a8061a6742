// SPDX-License-Identifier: MIT OR Apache-2.0
//! End-to-end tests that load the built plugin into real `gst-launch-1.0` and
//! `gst-inspect-1.0` processes.
//!
//! The tests load `libgstpatchflow.so` from the `deps` folder next to the test executable,
//! where `cargo test --release -p gst-plugin-patchflow` writes it while building the
//! library for the tests. When it is missing there, they fall back to the copy that
//! `cargo build --release -p gst-plugin-patchflow` leaves in `target/release`. They need
//! the converted backbone weights (`scripts/setup.sh`) and GStreamer's command-line tools
//! with the base and good plugins (videotestsrc, videoconvert, multifilesrc, pngdec).

mod support;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Maximum run time of one GStreamer process, including the first registry scan.
const PROCESS_TIMEOUT: Duration = Duration::from_secs(60);

const PLUGIN_FILE: &str = "libgstpatchflow.so";

/// Exit status and output of a finished process.
struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// A temporary plugin folder containing only a link to the built plugin, and a registry file
/// of its own, so that neither other libraries in the target folder nor a stale registry
/// that blacklisted an older build can interfere.
struct PluginEnvironment {
    dir: tempfile::TempDir,
}

impl PluginEnvironment {
    fn new() -> PluginEnvironment {
        let plugin = built_plugin();
        let dir = tempfile::tempdir().expect("failed to create a temporary directory");
        let plugin_dir = dir.path().join("plugins");
        std::fs::create_dir(&plugin_dir).unwrap();
        std::os::unix::fs::symlink(&plugin, plugin_dir.join(PLUGIN_FILE)).unwrap();
        PluginEnvironment { dir }
    }

    /// Runs `program` with `args` in this environment, killing it after
    /// [`PROCESS_TIMEOUT`].
    fn run(&self, program: &str, args: &[&str]) -> Output {
        let mut child = Command::new(program)
            .args(args)
            .env("GST_PLUGIN_PATH", self.dir.path().join("plugins"))
            .env("GST_REGISTRY", self.dir.path().join("registry.bin"))
            // Logging from the caller's environment would only clutter the output.
            .env_remove("GST_DEBUG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| panic!("failed to run {program}: {err}"));

        let stdout = read_in_background(child.stdout.take().unwrap());
        let stderr = read_in_background(child.stderr.take().unwrap());
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > PROCESS_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{program} {args:?} did not finish within {PROCESS_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Output {
            status,
            stdout: stdout.join().unwrap(),
            stderr: stderr.join().unwrap(),
        }
    }
}

fn read_in_background(mut stream: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        // A read error leaves the text read so far, which is all a failure message needs.
        let _ = stream.read_to_string(&mut text);
        text
    })
}

/// Finds the plugin library built for this test run.
///
/// Panics with the build command when no built plugin is found.
fn built_plugin() -> PathBuf {
    // The test executable is target/<profile>/deps/gst_launch-<hash>.
    let exe = std::env::current_exe().expect("the test executable has a path");
    let deps = exe.parent().expect("the test executable is in a folder");
    let candidates = [
        deps.join(PLUGIN_FILE),
        deps.parent()
            .expect("the deps folder is in the profile folder")
            .join(PLUGIN_FILE),
    ];
    candidates
        .iter()
        .find(|path| path.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "{PLUGIN_FILE} not found in {} or its parent: run \
                 `cargo build --release -p gst-plugin-patchflow` before the tests",
                deps.display()
            )
        })
}

fn assert_success(output: &Output, command: &str) {
    assert!(
        output.status.success(),
        "{command} failed with {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        output.stdout,
        output.stderr
    );
}

/// Number of `patchflow` element messages that `gst-launch-1.0 -m` printed.
fn count_reports(stdout: &str) -> usize {
    stdout.matches("patchflow, score=(double)").count()
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

#[test]
fn gst_launch_videotestsrc_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let model = support::write_model(dir.path(), &support::small_config());
    let environment = PluginEnvironment::new();
    let pipeline = format!(
        "videotestsrc num-buffers=10 ! video/x-raw,width=160,height=120 ! videoconvert ! \
         patchflowscore model={} ! videoconvert ! fakesink",
        path_str(&model)
    );
    let mut args = vec!["-m"];
    args.extend(pipeline.split_whitespace());

    let output = environment.run("gst-launch-1.0", &args);
    assert_success(&output, "gst-launch-1.0");
    assert_eq!(
        count_reports(&output.stdout),
        10,
        "stdout:\n{}",
        output.stdout
    );
    assert!(
        output.stdout.contains("frame=(guint64)9"),
        "{}",
        output.stdout
    );
}

#[test]
fn gst_launch_png_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let model = support::write_model(dir.path(), &support::small_config());
    let environment = PluginEnvironment::new();
    let image = support::repo_path("tests/data/brick.png");
    // Without a %d in the location, multifilesrc reads the same file for every buffer.
    let pipeline = format!(
        "multifilesrc location={} num-buffers=3 caps=image/png,framerate=1/1 ! pngdec ! \
         videoconvert ! patchflowscore model={} ! videoconvert ! fakesink",
        path_str(&image),
        path_str(&model)
    );
    let mut args = vec!["-m"];
    args.extend(pipeline.split_whitespace());

    let output = environment.run("gst-launch-1.0", &args);
    assert_success(&output, "gst-launch-1.0");
    assert_eq!(
        count_reports(&output.stdout),
        3,
        "stdout:\n{}",
        output.stdout
    );
}

#[test]
fn gst_launch_reports_missing_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("missing.safetensors");
    let environment = PluginEnvironment::new();
    let pipeline = format!(
        "videotestsrc num-buffers=1 ! videoconvert ! patchflowscore model={} ! fakesink",
        path_str(&model)
    );
    let args: Vec<&str> = pipeline.split_whitespace().collect();

    let output = environment.run("gst-launch-1.0", &args);
    assert!(
        !output.status.success(),
        "gst-launch-1.0 succeeded without a model"
    );
    let expected = format!("Failed to load model {}", model.display());
    let all_output = format!("{}{}", output.stdout, output.stderr);
    assert!(all_output.contains(&expected), "output:\n{all_output}");
}

#[test]
fn gst_launch_threads_are_set_once() {
    let dir = tempfile::tempdir().unwrap();
    let model = support::write_model(dir.path(), &support::small_config());
    let environment = PluginEnvironment::new();
    // Elements start from the sink upwards, so `last` sizes the process's pool and
    // `first` requests another size too late.
    let pipeline = format!(
        "videotestsrc num-buffers=3 ! video/x-raw,width=64,height=64 ! videoconvert ! \
         patchflowscore name=first threads=1 model={model} ! \
         patchflowscore name=last threads=2 model={model} ! fakesink",
        model = path_str(&model)
    );
    let mut args = vec!["-m"];
    args.extend(pipeline.split_whitespace());

    let output = environment.run("gst-launch-1.0", &args);
    assert_success(&output, "gst-launch-1.0");
    assert_eq!(count_reports(&output.stdout), 6, "{}", output.stdout);
    let all = format!("{}{}", output.stdout, output.stderr);
    assert!(all.contains("threads=1 ignored"), "{all}");
    assert!(all.contains("already runs inference on 2"), "{all}");
}

#[test]
fn gst_inspect_lists_properties() {
    let environment = PluginEnvironment::new();

    let output = environment.run("gst-inspect-1.0", &["patchflowscore"]);
    assert_success(&output, "gst-inspect-1.0 patchflowscore");
    for property in [
        "model",
        "device",
        "threshold",
        "threshold-domain",
        "overlay",
        "alpha",
        "colormap",
        "mqtt-url",
        "mqtt-topic",
        "mqtt-qos",
        "mqtt-ca-file",
        "mqtt-client-cert-file",
        "mqtt-client-key-file",
        "mqtt-stats",
        "threads",
    ] {
        let line = format!("\n  {property:<20}: ");
        assert!(
            output.stdout.contains(&line),
            "property {property} is not listed:\n{}",
            output.stdout
        );
    }
    assert!(output.stdout.contains("Filter/Analyzer/Video"));
}

/// One `patchflow` element message, as `gst-launch-1.0 -m` prints it.
#[derive(Debug)]
struct Report {
    frame: u64,
    score: f64,
    normalized_score: f64,
    is_anomalous: bool,
}

/// Returns the value after `name=(type)` in a printed structure, up to the next comma.
fn field<'a>(line: &'a str, name: &str) -> &'a str {
    let start = line
        .find(&format!(" {name}=("))
        .unwrap_or_else(|| panic!("no field {name} in {line}"));
    let rest = &line[start..];
    let value = &rest[rest.find(')').expect("a closing bracket after the type") + 1..];
    value
        .split([',', ';'])
        .next()
        .expect("split yields at least one part")
        .trim()
}

fn parse_reports(stdout: &str) -> Vec<Report> {
    stdout
        .lines()
        .filter(|line| line.contains("patchflow, score=(double)"))
        .map(|line| Report {
            frame: field(line, "frame").parse().unwrap(),
            score: field(line, "score").parse().unwrap(),
            normalized_score: field(line, "normalized-score").parse().unwrap(),
            is_anomalous: field(line, "is-anomalous") == "true",
        })
        .collect()
}

/// A model trained in anomalib and imported with `patchflow import` gives anomalib's
/// scores and labels in a real pipeline. The images and anomalib's outputs come from
/// `scripts/reference/make_checkpoint_fixture.py`. pngdec decodes the grey PNGs to
/// GRAY8 and videoconvert copies the grey value to R, G and B, as PIL's RGB conversion
/// does in anomalib.
#[test]
fn gst_launch_imported_anomalib_model() {
    let fixtures = support::repo_path("tests/fixtures/anomalib");
    let imported = patchflow::import::import_checkpoint(&fixtures.join("patchflow_lite0.ckpt"))
        .unwrap_or_else(|err| panic!("failed to import the anomalib checkpoint: {err}"));
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("imported.safetensors");
    patchflow::checkpoint::save(&model, &imported.model, &imported.meta).unwrap();

    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("expected.json")).unwrap())
            .unwrap();
    let predictions = expected["predictions"].as_array().unwrap();
    for (index, prediction) in predictions.iter().enumerate() {
        let image = fixtures
            .join("images")
            .join(prediction["image"].as_str().unwrap());
        std::fs::copy(&image, dir.path().join(format!("frame-{index}.png"))).unwrap();
    }
    let environment = PluginEnvironment::new();
    let location = dir.path().join("frame-%d.png");
    let pipeline = format!(
        "multifilesrc location={} index=0 stop-index={} caps=image/png,framerate=1/1 ! \
         pngdec ! videoconvert ! patchflowscore model={} ! fakesink",
        path_str(&location),
        predictions.len() - 1,
        path_str(&model)
    );
    let mut args = vec!["-m"];
    args.extend(pipeline.split_whitespace());

    let output = environment.run("gst-launch-1.0", &args);
    assert_success(&output, "gst-launch-1.0");
    let reports = parse_reports(&output.stdout);
    assert_eq!(
        reports.len(),
        predictions.len(),
        "stdout:\n{}",
        output.stdout
    );
    // The same bound as the library's import tests: 1e-4 on raw scores, scaled by the
    // score range for normalised ones, and equal labels.
    let stats = imported.meta.stats;
    let max_raw_diff = 1e-4;
    let max_normalized_diff = max_raw_diff / f64::from(stats.image_max - stats.image_min);
    for (report, prediction) in reports.iter().zip(predictions) {
        let image = prediction["image"].as_str().unwrap();
        let raw = prediction["raw_score"].as_f64().unwrap();
        let normalized = prediction["normalized_score"].as_f64().unwrap();
        let raw_diff = (report.score - raw).abs();
        let normalized_diff = (report.normalized_score - normalized).abs();
        println!(
            "frame {} ({image}): raw score diff {raw_diff:.3e}, normalised diff {normalized_diff:.3e}",
            report.frame
        );
        assert!(
            raw_diff <= max_raw_diff,
            "{image}: score {} vs anomalib {raw}",
            report.score
        );
        assert!(
            normalized_diff <= max_normalized_diff,
            "{image}: normalised score {} vs anomalib {normalized}",
            report.normalized_score
        );
        assert_eq!(
            report.is_anomalous,
            prediction["label"].as_bool().unwrap(),
            "{image}: label"
        );
    }
}
