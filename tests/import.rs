// SPDX-License-Identifier: MIT OR Apache-2.0
//! `patchflow import` on a real anomalib 2.7.0 checkpoint.
//!
//! `scripts/reference/make_checkpoint_fixture.py` trained anomalib's `Patchflow`
//! (EfficientNet-Lite0, 64x64) and saved its Lightning checkpoint under
//! `tests/fixtures/anomalib/`, with anomalib's raw and normalised scores, labels and
//! anomaly maps for five images. These tests import that checkpoint and compare the
//! imported model's outputs with anomalib's.
//!
//! Variants of the checkpoint (the anomalib 2.4 to 2.5.0 key layout, a forbidden
//! pickle global, edited hyper-parameters) are made by editing a copy of its pickle.
//! torch writes it with protocol 2, where every string is a `BINUNICODE` opcode with
//! its length in front and no frame lengths need fixing.

mod support;

use std::collections::HashMap;
use std::io::{Cursor, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};
use patchflow::imageops::{ResizeMode, load_rgb_chw};
use patchflow::import::{self, ImportError, KeyLayout};
use patchflow::scoring::Scorer;
use serde_json::Value;
use support::fixtures::repo_path;
use support::tensors::max_abs_diff;

/// Largest absolute difference allowed between raw scores and raw anomaly-map values
/// of the imported model and anomalib, as in the parity tests.
const MAX_RAW_DIFF: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    repo_path(&format!("tests/fixtures/anomalib/{name}"))
}

fn checkpoint_path() -> PathBuf {
    fixture("patchflow_lite0.ckpt")
}

fn checkpoint_bytes() -> Vec<u8> {
    let path = checkpoint_path();
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e}; regenerate it with scripts/reference/make_checkpoint_fixture.py",
            path.display()
        )
    })
}

/// `expected.json`, which the fixture script wrote.
fn expected() -> Value {
    let text = std::fs::read_to_string(fixture("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Reads a statistic from `expected.json`, where NaN is the string "nan".
fn statistic(doc: &Value, name: &str) -> f32 {
    match &doc["statistics"][name] {
        Value::String(text) if text == "nan" => f32::NAN,
        value => value.as_f64().expect("a number or \"nan\"") as f32,
    }
}

fn expected_maps() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("expected_maps.safetensors"), &Device::Cpu).unwrap()
}

/// Rebuilds the checkpoint zip with `edit` applied to its `data.pkl` record.
fn edit_pickle(bytes: &[u8], edit: impl FnOnce(&[u8]) -> Vec<u8>) -> Vec<u8> {
    let mut archive = zip::ZipArchive::new(Cursor::new(bytes)).unwrap();
    let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .large_file(true);
    let mut edit = Some(edit);
    for index in 0..archive.len() {
        let mut entry = archive.by_index(index).unwrap();
        let name = entry.name().unwrap().into_owned();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        if name.ends_with("/data.pkl") {
            assert!(
                data.starts_with(b"\x80\x02"),
                "the edits below assume pickle protocol 2"
            );
            data = (edit.take().unwrap())(&data);
        }
        writer.start_file(name, options).unwrap();
        writer.write_all(&data).unwrap();
    }
    assert!(edit.is_none(), "the checkpoint has no data.pkl record");
    writer.finish().unwrap().into_inner()
}

/// Replaces every `BINUNICODE` string that starts with `from` by one that starts with
/// `to`, fixing the length in front of it.
fn rename_strings(pickle: &[u8], from: &str, to: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(pickle.len());
    let mut pos = 0;
    let mut renamed = 0;
    while pos < pickle.len() {
        let is_string = pickle[pos] == b'X'
            && pickle.get(pos + 5..pos + 5 + from.len()) == Some(from.as_bytes());
        if !is_string {
            out.push(pickle[pos]);
            pos += 1;
            continue;
        }
        let len = u32::from_le_bytes(pickle[pos + 1..pos + 5].try_into().unwrap()) as usize;
        let text = std::str::from_utf8(&pickle[pos + 5..pos + 5 + len]).unwrap();
        let renamed_text = format!("{to}{}", &text[from.len()..]);
        out.push(b'X');
        out.extend_from_slice(&(renamed_text.len() as u32).to_le_bytes());
        out.extend_from_slice(renamed_text.as_bytes());
        pos += 5 + len;
        renamed += 1;
    }
    assert!(renamed > 0, "no string starts with {from:?}");
    out
}

/// Replaces the single occurrence of `from` in the pickle by `to`.
fn replace_once(pickle: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let positions: Vec<usize> = pickle
        .windows(from.len())
        .enumerate()
        .filter(|(_, window)| *window == from)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        positions.len(),
        1,
        "expected {:?} once in the pickle",
        String::from_utf8_lossy(from)
    );
    let at = positions[0];
    [&pickle[..at], to, &pickle[at + from.len()..]].concat()
}

fn import_error(bytes: &[u8]) -> ImportError {
    match import::import_bytes(bytes, "edited.ckpt") {
        Ok(_) => panic!("the edited checkpoint was imported"),
        Err(error) => error,
    }
}

/// Scores the fixture images with a model file and compares them with anomalib's.
fn check_scores_match(model_file: &Path) {
    let doc = expected();
    let maps = expected_maps();
    let scorer = Scorer::load(model_file, &Device::Cpu).unwrap();
    let stats = scorer.meta().stats;
    // Normalisation divides differences by the range of the statistics and clamps.
    let max_norm_score_diff = MAX_RAW_DIFF / (stats.image_max - stats.image_min);
    let max_norm_map_diff = MAX_RAW_DIFF / (stats.pixel_max - stats.pixel_min);

    let predictions = doc["predictions"].as_array().unwrap();
    assert_eq!(predictions.len(), 5);
    for prediction in predictions {
        let image = prediction["image"].as_str().unwrap();
        let (chw, h, w) = load_rgb_chw(&fixture(&format!("images/{image}"))).unwrap();
        let ours = scorer.score_chw(&chw, (h, w)).unwrap();

        let raw = prediction["raw_score"].as_f64().unwrap() as f32;
        let normalized = prediction["normalized_score"].as_f64().unwrap() as f32;
        let label = prediction["label"].as_bool().unwrap();
        let raw_diff = (ours.score - raw).abs();
        let norm_diff = (ours.normalized_score - normalized).abs();
        println!("{image:<18} raw score diff {raw_diff:.3e}, normalised diff {norm_diff:.3e}");
        assert!(
            raw_diff <= MAX_RAW_DIFF,
            "{image}: raw score {} vs anomalib {raw}",
            ours.score
        );
        assert!(
            norm_diff <= max_norm_score_diff,
            "{image}: normalised score {} vs anomalib {normalized}",
            ours.normalized_score
        );
        assert_eq!(ours.is_anomalous(0.5), label, "{image}: label");

        let stem = image.trim_end_matches(".png");
        let input = scorer.model().preprocess(&chw, (h, w)).unwrap();
        let raw_map = scorer.model().forward(&input).unwrap().anomaly_map;
        let expected_raw = maps[&format!("{stem}.raw")].unsqueeze(0).unwrap();
        assert_eq!(raw_map.dims(), expected_raw.dims(), "{image}: map shape");
        let map_diff = max_abs_diff(&raw_map, &expected_raw);
        let expected_norm = maps[&format!("{stem}.normalized")].flatten_all().unwrap();
        let ours_norm = Tensor::new(ours.heat.values.as_slice(), &Device::Cpu).unwrap();
        let norm_map_diff = max_abs_diff(&ours_norm, &expected_norm);
        println!(
            "{image:<18} raw map diff {map_diff:.3e}, normalised map diff {norm_map_diff:.3e}"
        );
        assert!(
            map_diff <= MAX_RAW_DIFF,
            "{image}: raw map diff {map_diff:e}"
        );
        assert!(
            norm_map_diff <= max_norm_map_diff,
            "{image}: normalised map diff {norm_map_diff:e}"
        );
    }
}

#[test]
fn imported_model_scores_like_anomalib() {
    let imported = import::import_checkpoint(&checkpoint_path()).unwrap();
    assert_eq!(imported.layout, KeyLayout::TimmExtractor);
    let dir = tempfile::tempdir().unwrap();
    let model_file = dir.path().join("model.safetensors");
    patchflow::checkpoint::save(&model_file, &imported.model, &imported.meta).unwrap();
    check_scores_match(&model_file);
}

#[test]
fn imported_configuration_and_statistics() {
    let doc = expected();
    let imported = import::import_checkpoint(&checkpoint_path()).unwrap();
    assert!(imported.notes.is_empty(), "{:?}", imported.notes);
    let config = &imported.meta.config;
    assert_eq!(config.backbone, "tf_efficientnet_lite0");
    assert_eq!(config.input_size, [64, 64]);
    assert_eq!(config.crop_size, None);
    assert_eq!(config.num_scales, 3);
    assert_eq!(config.patch_size, 3);
    assert_eq!(config.flow_steps, 1);
    assert_eq!(config.flow_feature_dim, 128);
    assert_eq!(config.flow_hidden_dim, 128);
    assert_eq!(config.preprocess.resize, ResizeMode::Antialias);
    assert_eq!(config.preprocess.mean, [0.5; 3]);
    assert_eq!(config.preprocess.std, [0.5; 3]);

    // Both sides hold the buffers as float32, so they are equal.
    let stats = imported.meta.stats;
    assert_eq!(stats.image_threshold, statistic(&doc, "image_threshold"));
    assert_eq!(stats.image_min, statistic(&doc, "image_min"));
    assert_eq!(stats.image_max, statistic(&doc, "image_max"));
    assert_eq!(stats.pixel_threshold, statistic(&doc, "pixel_threshold"));
    assert_eq!(stats.pixel_min, statistic(&doc, "pixel_min"));
    assert_eq!(stats.pixel_max, statistic(&doc, "pixel_max"));

    let backbone = &imported.meta.backbone;
    assert_eq!(backbone.name, "tf_efficientnet_lite0");
    assert_eq!(backbone.source, "patchflow_lite0.ckpt");
    let digest = sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(
        checkpoint_bytes(),
    ));
    assert_eq!(backbone.sha256, format!("{digest:x}"));
    assert!(imported.meta.training.is_none());
    assert_eq!(imported.lightning_version.as_deref(), Some("2.6.6"));
}

#[test]
fn legacy_key_layout_imports_same_model() {
    let bytes = edit_pickle(&checkpoint_bytes(), |pickle| {
        rename_strings(
            pickle,
            import::TIMM_EXTRACTOR_PREFIX,
            import::LEGACY_EXTRACTOR_PREFIX,
        )
    });
    let legacy = import::import_bytes(&bytes, "legacy.ckpt").unwrap();
    assert_eq!(legacy.layout, KeyLayout::Legacy);
    let current = import::import_checkpoint(&checkpoint_path()).unwrap();
    assert_eq!(legacy.meta.config, current.meta.config);
    assert_eq!(legacy.meta.stats, current.meta.stats);

    let ours: Vec<(String, Tensor)> = legacy.model.tensors();
    let reference: Vec<(String, Tensor)> = current.model.tensors();
    let names: Vec<&String> = ours.iter().map(|(n, _)| n).collect();
    let reference_names: Vec<&String> = reference.iter().map(|(n, _)| n).collect();
    assert_eq!(names, reference_names);
    for ((name, a), (_, b)) in ours.iter().zip(&reference) {
        assert_eq!(max_abs_diff(a, b), 0.0, "{name}");
    }

    let dir = tempfile::tempdir().unwrap();
    let model_file = dir.path().join("legacy.safetensors");
    patchflow::checkpoint::save(&model_file, &legacy.model, &legacy.meta).unwrap();
    check_scores_match(&model_file);
}

/// Puts `builtins.eval` where the pickle names `collections.OrderedDict` first, which
/// is the class of the state dict, so that loading it in Python would call `eval`.
fn call_builtins_eval(pickle: &[u8]) -> Vec<u8> {
    let global = b"ccollections\nOrderedDict\n";
    let at = pickle
        .windows(global.len())
        .position(|w| w == global)
        .expect("an OrderedDict global");
    [
        &pickle[..at],
        b"cbuiltins\neval\n",
        &pickle[at + global.len()..],
    ]
    .concat()
}

#[test]
fn builtins_eval_global_is_rejected() {
    let bytes = edit_pickle(&checkpoint_bytes(), call_builtins_eval);
    let error = import_error(&bytes);
    assert!(
        matches!(&error, ImportError::GlobalNotAllowed { global } if global == "builtins.eval"),
        "{error}"
    );
    assert!(
        error.to_string().contains("uses the global builtins.eval"),
        "{error}"
    );
}

#[test]
fn os_system_global_is_rejected() {
    let bytes = edit_pickle(&checkpoint_bytes(), |pickle| {
        // REDUCE calls os.system('true') in place of the first torch.FloatStorage
        // reference. The reader must stop at the global, before any call.
        let at = pickle
            .windows(20)
            .position(|w| w == b"ctorch\nFloatStorage\n")
            .expect("a FloatStorage global");
        let call = b"cos\nsystem\nX\x04\x00\x00\x00true\x85R";
        [&pickle[..at], call, &pickle[at + 20..]].concat()
    });
    let error = import_error(&bytes);
    assert!(
        matches!(&error, ImportError::GlobalNotAllowed { global } if global == "os.system"),
        "{error}"
    );
}

#[test]
fn truncated_checkpoint_is_rejected() {
    let bytes = checkpoint_bytes();
    for len in [
        0,
        1,
        100,
        bytes.len() / 2,
        bytes.len() - 22,
        bytes.len() - 1,
    ] {
        let error = import_error(&bytes[..len]);
        let message = error.to_string();
        assert!(
            matches!(
                error,
                ImportError::Damaged(_) | ImportError::NotACheckpoint(_)
            ),
            "{len} bytes: {message}"
        );
    }
    let error = import_error(&bytes[..bytes.len() / 2]);
    assert!(
        error.to_string().contains("damaged or truncated"),
        "{error}"
    );
}

#[test]
fn image_file_is_not_a_checkpoint() {
    let png = std::fs::read(fixture("images/brick.png")).unwrap();
    let error = import_error(&png);
    assert!(matches!(error, ImportError::NotACheckpoint(_)), "{error}");
}

#[test]
fn missing_tensor_is_named() {
    let bytes = edit_pickle(&checkpoint_bytes(), |pickle| {
        // The same length, so that only the string changes.
        replace_once(
            pickle,
            b"model.flow.module_list.0.subnet.0.bias",
            b"model.flow.module_list.0.subnet.0.bxas",
        )
    });
    let error = import_error(&bytes);
    assert!(
        matches!(&error, ImportError::MissingTensor { key } if key == "model.flow.module_list.0.subnet.0.bias"),
        "{error}"
    );
}

#[test]
fn shape_mismatch_names_tensor() {
    let bytes = edit_pickle(&checkpoint_bytes(), |pickle| {
        // flow_hidden_dim 128 becomes 64. The key string is followed by a BINPUT or
        // LONG_BINPUT that memoizes it, then by the value as BININT1.
        let key = b"X\x0f\x00\x00\x00flow_hidden_dim";
        let at = pickle
            .windows(key.len())
            .position(|w| w == key)
            .expect("a flow_hidden_dim key")
            + key.len();
        let value_at = match pickle[at] {
            b'q' => at + 2,
            b'r' => at + 5,
            _ => at,
        };
        assert_eq!(
            &pickle[value_at..value_at + 2],
            b"K\x80",
            "flow_hidden_dim 128"
        );
        let mut edited = pickle.to_vec();
        edited[value_at + 1] = 64;
        edited
    });
    let error = import_error(&bytes);
    let message = error.to_string();
    assert!(
        matches!(&error, ImportError::ShapeMismatch { key, expected, actual, .. }
            if key == "model.flow.module_list.0.subnet.0.weight"
                && expected == &[64, 64, 3, 3]
                && actual == &[128, 64, 3, 3]),
        "{message}"
    );
    assert!(message.contains("flow_hidden_dim 64"), "{message}");
}

#[test]
fn unsupported_backbone_lists_supported() {
    let bytes = edit_pickle(&checkpoint_bytes(), |pickle| {
        replace_once(
            pickle,
            b"X\x15\x00\x00\x00tf_efficientnet_lite0",
            b"X\x15\x00\x00\x00mobilenetv3_large_100",
        )
    });
    let error = import_error(&bytes);
    let message = error.to_string();
    assert!(
        matches!(&error, ImportError::UnsupportedBackbone { name, .. } if name == "mobilenetv3_large_100"),
        "{message}"
    );
    assert!(message.contains("tf_efficientnet_lite0"), "{message}");
    assert!(message.contains("resnet18"), "{message}");
}

fn patchflow_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_patchflow"));
    command.env("RUST_LOG", "warn");
    command
}

#[test]
fn cli_import_writes_model() {
    let dir = tempfile::tempdir().unwrap();
    let model_file = dir.path().join("models").join("imported.safetensors");
    let output = patchflow_command()
        .arg("import")
        .arg(checkpoint_path())
        .arg("--output")
        .arg(&model_file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("anomalib 2.5.1+ keys"), "stdout:\n{stdout}");
    assert!(
        stdout.contains("backbone tf_efficientnet_lite0, input 64x64"),
        "stdout:\n{stdout}"
    );
    assert!(
        stdout.contains("image scores: threshold -0."),
        "stdout:\n{stdout}"
    );
    assert!(
        stdout.contains("pixel scores: threshold -0."),
        "stdout:\n{stdout}"
    );
    check_scores_match(&model_file);
}

#[test]
fn cli_rejects_forbidden_global() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.ckpt");
    let bytes = edit_pickle(&checkpoint_bytes(), call_builtins_eval);
    std::fs::write(&bad, bytes).unwrap();
    let model_file = dir.path().join("model.safetensors");
    let output = patchflow_command()
        .arg("import")
        .arg(&bad)
        .arg("-o")
        .arg(&model_file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "stderr:\n{stderr}");
    assert!(
        stderr.contains(&format!("cannot import {}", bad.display())),
        "stderr:\n{stderr}"
    );
    assert!(stderr.contains("builtins.eval"), "stderr:\n{stderr}");
    assert!(!model_file.exists(), "a model file was written");
}

#[test]
fn cli_rejects_truncated_file() {
    let dir = tempfile::tempdir().unwrap();
    let truncated = dir.path().join("truncated.ckpt");
    let bytes = checkpoint_bytes();
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let output = patchflow_command()
        .arg("import")
        .arg(&truncated)
        .arg("-o")
        .arg(dir.path().join("model.safetensors"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "stderr:\n{stderr}");
    assert!(stderr.contains("damaged or truncated"), "stderr:\n{stderr}");
}
