// SPDX-License-Identifier: MIT OR Apache-2.0
//! Production lines from one TOML config file: global `[defaults]`, an optional `[mqtt]`
//! output, an optional `[health]` endpoint, and `[[lines]]` that each hold
//! `[[lines.cameras]]`. `patchflow run` plays
//! every camera in one process, each in its own GStreamer pipeline around
//! `patchflowscore`, with its own alarm tracker. Cameras that use the same model file on
//! the same device share one loaded model.
//!
//! Relative paths in a config are resolved against the config file's folder. String
//! values may use `${VAR}` or `${VAR:-default}` to take a value from the environment.

mod config;
mod output;
mod pipeline;
mod run;
mod snapshot;

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};

pub use config::{
    CameraConfig, Config, ConfigError, Delivery, HealthConfig, ModelSection, MqttConfig,
    RestartConfig, ScoringConfig, SinkConfig, SnapshotConfig, SourceConfig, TopicOptions,
    expand_env,
};
pub use output::{OFFLINE, ONLINE};
pub use pipeline::{SCORER_NAME, description as pipeline_description};
pub use run::{RunSummary, run};

/// A commented config with every setting, printed by `patchflow config example`.
pub const EXAMPLE_CONFIG: &str = include_str!("../../configs/example.toml");

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

/// Loads a config, runs every camera and prints a summary per camera and for MQTT.
pub fn run_file(path: &Path) -> Result<ExitCode> {
    run::install_signal_handlers()?;
    let config = Config::load(path)?;
    let summary = run(&config, |_| {})?;
    for (line, camera, stats) in &summary.cameras {
        eprintln!(
            "camera {camera} (line {line}): {} frames scored, {} skipped, {} anomalous, {} events, {} snapshots, {} restarts, max normalised score {:.3}, mean inference {:.1} ms",
            stats.frames_scored,
            stats.frames_skipped,
            stats.frames_anomalous,
            stats.events,
            stats.snapshots,
            stats.source_restarts,
            stats.max_normalized_score,
            stats.mean_inference_ms
        );
    }
    if let Some((url, m)) = &summary.mqtt {
        eprintln!(
            "mqtt {url}: {} messages published, {} dropped, {} still queued, {} reconnects",
            m.published, m.dropped, m.queued, m.reconnect_attempts
        );
    }
    Ok(ExitCode::SUCCESS)
}
