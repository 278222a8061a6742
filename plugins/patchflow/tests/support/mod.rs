// SPDX-License-Identifier: MIT OR Apache-2.0
//! Helpers shared by the plugin's integration tests: GStreamer set-up, small model files,
//! test images and the root crate's mosquitto helpers.

// Each test crate compiles its own copy of these helpers and uses only some of them.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Once;

use patchflow::model::ModelConfig;

#[path = "../../../../tests/support/broker.rs"]
pub mod broker;
#[path = "../../../../tests/support/fixtures.rs"]
pub mod fixtures;
#[path = "../../../../tests/support/pki.rs"]
pub mod pki;

pub use fixtures::{backbone_path, repo_path};

/// Initialises GStreamer and registers the plugin's elements, once per test process.
pub fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        gst::init().expect("failed to initialise GStreamer");
        gstpatchflow::plugin_register_static().expect("failed to register the patchflow plugin");
    });
}

/// Small configuration for fast tests: 64x64 input at a single scale.
pub fn small_config() -> ModelConfig {
    ModelConfig {
        input_size: [64, 64],
        num_scales: 1,
        ..ModelConfig::lite0()
    }
}

/// Writes an untrained model with `config` to `dir/model.safetensors` and returns its path.
pub fn write_model(dir: &Path, config: &ModelConfig) -> PathBuf {
    let (model, meta) = patchflow::train::init_model(config, &backbone_path(), 7)
        .unwrap_or_else(|err| panic!("failed to build an untrained model: {err:#}"));
    let path = dir.join("model.safetensors");
    patchflow::checkpoint::save(&path, &model, &meta)
        .unwrap_or_else(|err| panic!("failed to write {}: {err:#}", path.display()));
    path
}

/// Decodes one of the images under `tests/data` into packed RGB bytes, returning
/// (pixels, width, height).
pub fn rgb_image(name: &str) -> (Vec<u8>, usize, usize) {
    let path = repo_path(&format!("tests/data/{name}"));
    let (chw, height, width) = patchflow::imageops::load_rgb_chw(&path)
        .unwrap_or_else(|err| panic!("failed to load {}: {err:#}", path.display()));
    let plane = width * height;
    let mut rgb = Vec::with_capacity(3 * plane);
    for i in 0..plane {
        for c in 0..3 {
            // load_rgb_chw divides bytes by 255, so this restores them exactly.
            rgb.push((chw[c * plane + i] * 255.0).round() as u8);
        }
    }
    (rgb, width, height)
}
