// SPDX-License-Identifier: MIT OR Apache-2.0
//! The whole model on the real backbone: output shapes, model files (round trip and
//! every kind of rejection) and a short training run.

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use patchflow::checkpoint;
use patchflow::imageops::load_rgb_chw;
use patchflow::model::{ModelConfig, ModelError};
use patchflow::scoring::Scorer;
use patchflow::train::{self, TrainOptions};
use support::fixtures;

fn small_config() -> ModelConfig {
    ModelConfig {
        input_size: [64, 64],
        ..ModelConfig::lite0()
    }
}

fn saved_model(dir: &Path) -> PathBuf {
    let (model, meta) = train::init_model(&small_config(), &fixtures::backbone_path(), 1).unwrap();
    let path = dir.join("model.safetensors");
    checkpoint::save(&path, &model, &meta).unwrap();
    path
}

/// Rewrites a model file with changed tensors or metadata.
fn rewrite(
    src: &Path,
    dst: &Path,
    edit: impl FnOnce(&mut HashMap<String, Tensor>, &mut HashMap<String, String>),
) {
    let bytes = std::fs::read(src).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta = header.metadata().clone().unwrap();
    let mut tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
    edit(&mut tensors, &mut meta);
    safetensors::serialize_to_file(tensors, Some(meta), dst).unwrap();
}

fn load_err(path: &Path) -> ModelError {
    checkpoint::load(path, &Device::Cpu).expect_err("the model file should be rejected")
}

#[test]
fn forward_shapes() {
    let (model, _) = train::init_model(&small_config(), &fixtures::backbone_path(), 0).unwrap();
    assert_eq!(model.fused_channels(), 3 * (40 + 112 + 320));
    assert_eq!(model.grid_size(), (8, 8));
    let x = Tensor::zeros((2, 3, 64, 64), DType::F32, &Device::Cpu).unwrap();
    let out = model.forward(&x).unwrap();
    assert_eq!(out.anomaly_map.dims4().unwrap(), (2, 1, 64, 64));
    assert_eq!(out.score.dims(), &[2]);
    let values = out
        .anomaly_map
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(values.iter().all(|v| (-1.0..=0.0).contains(v)));
}

#[test]
fn concurrent_forward_passes_agree() {
    // Several callers share the process's inference pool, as the cameras of a line do.
    // A worker that waits inside one pass may run part of another on the same stack,
    // so no kernel may keep per-thread state borrowed across its parallel work.
    let (model, _) = train::init_model(&small_config(), &fixtures::backbone_path(), 0).unwrap();
    let input = |seed: usize| {
        let data: Vec<f32> = (0..3 * 64 * 64)
            .map(|i| (((i + seed) * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        Tensor::from_vec(data, (1, 3, 64, 64), &Device::Cpu).unwrap()
    };
    let score = |x: &Tensor| model.forward(x).unwrap().score.to_vec1::<f32>().unwrap()[0];
    let expected: Vec<f32> = (0..4).map(|seed| score(&input(seed))).collect();
    std::thread::scope(|scope| {
        let callers: Vec<_> = (0..4)
            .map(|seed| {
                let (x, score) = (input(seed), &score);
                scope.spawn(move || (0..20).map(|_| score(&x)).collect::<Vec<f32>>())
            })
            .collect();
        for (seed, caller) in callers.into_iter().enumerate() {
            let scores = caller.join().expect("a concurrent forward pass panicked");
            for value in scores {
                assert_eq!(value, expected[seed], "caller {seed}");
            }
        }
    });
}

#[test]
fn log_map_matches_anomaly_map() {
    let (model, _) = train::init_model(&small_config(), &fixtures::backbone_path(), 0).unwrap();
    let (image, h, w) = patchflow::imageops::load_rgb_chw(&fixtures::image("gravel.png")).unwrap();
    let x = model.preprocess(&image, (h, w)).unwrap();
    let out = model.forward(&x).unwrap();
    assert_eq!(out.log_map.dims4().unwrap(), (1, 1, 8, 8));

    let fused = model.embed(&x).unwrap();
    let (z, _) = model.flow_forward(&fused, false).unwrap();
    let log_grid = model
        .log_map(&z)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let from_forward = out.log_map.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    // On the CPU the forward pass computes the adaptor, the flow and the map with its
    // own kernels. They sum in a different order than the tensor operations above, so
    // the two agree to float32 rounding rather than bit for bit.
    assert_eq!(log_grid.len(), from_forward.len());
    for (i, (a, b)) in log_grid.iter().zip(&from_forward).enumerate() {
        assert!(
            (a - b).abs() <= 1e-6 * a.abs().max(1.0),
            "patch {i}: {a} from z, {b} from forward"
        );
    }
    let log_score = out.log_score.to_vec1::<f32>().unwrap()[0];
    let max_l = from_forward
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    assert_eq!(log_score, max_l);
    // The map is -exp(-l) upsampled 8x with bilinear weights, a convex combination, so
    // the image score is at most m = -exp(-max l). The output pixels next to the centre
    // of the top patch give it weight (15/16)^2, and the other weights fall on values of
    // at least -1, which bounds the score from below.
    let score = out.score.to_vec1::<f32>().unwrap()[0];
    let m = -(-log_score).exp();
    let top_weight = (15.0f32 / 16.0).powi(2);
    assert!(score <= m + 1e-6, "score {score}, log score {log_score}");
    assert!(
        score >= top_weight * m - (1.0 - top_weight) - 1e-6,
        "score {score} too far below -exp(-{log_score})"
    );
}

#[test]
fn crop_pads_map_with_minus_one() {
    let cfg = ModelConfig {
        input_size: [80, 80],
        crop_size: Some([64, 64]),
        ..ModelConfig::lite0()
    };
    let (model, _) = train::init_model(&cfg, &fixtures::backbone_path(), 0).unwrap();
    let x = Tensor::zeros((1, 3, 80, 80), DType::F32, &Device::Cpu).unwrap();
    let out = model.forward(&x).unwrap();
    let map = out
        .anomaly_map
        .squeeze(0)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!((map.len(), map[0].len()), (80, 80));
    assert_eq!(map[0][0], -1.0);
    assert_eq!(map[7][40], -1.0);
    assert_eq!(map[40][79], -1.0);
    assert!(
        map[8][8] > -1.0 && map[71][71] > -1.0,
        "the cropped centre is scored"
    );
}

#[test]
fn model_file_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let (model, meta) = train::init_model(&small_config(), &fixtures::backbone_path(), 3).unwrap();
    let path = dir.path().join("m.safetensors");
    checkpoint::save(&path, &model, &meta).unwrap();
    let (loaded, loaded_meta) = checkpoint::load(&path, &Device::Cpu).unwrap();
    assert_eq!(loaded_meta, meta);
    let before: HashMap<_, _> = model.tensors().into_iter().collect();
    let after: HashMap<_, _> = loaded.tensors().into_iter().collect();
    assert_eq!(before.len(), after.len());
    for (name, t) in &before {
        assert_eq!(
            support::tensors::max_abs_diff(t, &after[name]),
            0.0,
            "{name} changed"
        );
    }
    let (chw, h, w) = load_rgb_chw(&fixtures::image("gravel.png")).unwrap();
    let a = Scorer::new(model, meta).score_chw(&chw, (h, w)).unwrap();
    let b = Scorer::new(loaded, loaded_meta)
        .score_chw(&chw, (h, w))
        .unwrap();
    assert_eq!(a.score, b.score);
    assert_eq!(a.heat, b.heat);
}

#[test]
fn truncated_file_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = saved_model(dir.path());
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(&cut);
    assert!(matches!(err, ModelError::Corrupt { .. }), "{err:?}");
    assert!(err.to_string().contains("cut.safetensors"), "{err}");
}

#[test]
fn garbage_file_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("noise.safetensors");
    std::fs::write(&path, b"this is not a model file at all").unwrap();
    assert!(matches!(load_err(&path), ModelError::Corrupt { .. }));
}

#[test]
fn missing_file_names_the_path() {
    let err = load_err(Path::new("/nonexistent/model.safetensors"));
    assert!(matches!(err, ModelError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("/nonexistent/model.safetensors"));
}

#[test]
fn missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = saved_model(dir.path());
    let edited = dir.path().join("edited.safetensors");
    rewrite(&path, &edited, |t, _| {
        t.remove("flow.module_list.0.subnet.1.bias");
    });
    let err = load_err(&edited);
    assert!(
        err.to_string().contains("flow.module_list.0.subnet.1.bias"),
        "{err}"
    );
    assert!(matches!(err, ModelError::MissingTensor { .. }));
}

#[test]
fn wrong_shape_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = saved_model(dir.path());
    let edited = dir.path().join("edited.safetensors");
    rewrite(&path, &edited, |t, _| {
        t.insert(
            "feature_adaptor.bias".into(),
            Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let err = load_err(&edited);
    assert!(
        err.to_string()
            .contains("feature_adaptor.bias has shape [7], expected [128]"),
        "{err}"
    );
}

#[test]
fn unknown_version_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = saved_model(dir.path());
    let edited = dir.path().join("edited.safetensors");
    rewrite(&path, &edited, |_, m| {
        m.insert("patchflow.format_version".into(), "99".into());
    });
    let err = load_err(&edited);
    assert!(
        matches!(err, ModelError::UnsupportedVersion { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("version 99"), "{err}");
}

#[test]
fn missing_and_invalid_fields_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = saved_model(dir.path());
    let edited = dir.path().join("edited.safetensors");
    rewrite(&path, &edited, |_, m| {
        m.remove("patchflow.stats");
    });
    assert!(
        load_err(&edited)
            .to_string()
            .contains("patchflow.stats is missing")
    );
    rewrite(&path, &edited, |_, m| {
        m.insert("patchflow.config".into(), "{\"backbone\": 3}".into());
    });
    let err = load_err(&edited);
    assert!(
        matches!(err, ModelError::InvalidField { ref field, .. } if field == "patchflow.config"),
        "{err:?}"
    );
}

#[test]
fn non_finite_weights_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = saved_model(dir.path());
    let edited = dir.path().join("edited.safetensors");
    rewrite(&path, &edited, |t, _| {
        let mut values = vec![0.1f32; 128];
        values[17] = f32::NAN;
        let bias = Tensor::from_vec(values, 128, &Device::Cpu).unwrap();
        t.insert("feature_adaptor.bias".into(), bias);
    });
    let err = load_err(&edited);
    assert!(matches!(err, ModelError::NonFinite { .. }), "{err:?}");
    assert!(err.to_string().contains("feature_adaptor.bias"), "{err}");
}

#[test]
fn broken_permutation_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = saved_model(dir.path());
    let edited = dir.path().join("edited.safetensors");
    rewrite(&path, &edited, |t, _| {
        t.insert(
            "flow.module_list.0.w_perm".into(),
            Tensor::ones((128, 128, 1, 1), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let err = load_err(&edited);
    assert!(
        err.to_string().contains("flow.module_list.0.w_perm"),
        "{err}"
    );
}

/// Writes `count` 96x96 crops of a committed texture into `dir`.
fn texture_crops(name: &str, dir: &Path, count: usize) -> Vec<PathBuf> {
    let img = image::open(fixtures::image(name)).unwrap().to_rgb8();
    (0..count)
        .map(|i| {
            let (x, y) = ((i * 53) % 400, (i * 97) % 400);
            let crop = image::imageops::crop_imm(&img, x as u32, y as u32, 96, 96).to_image();
            let path = dir.join(format!("{name}-{i:02}.png"));
            crop.save(&path).unwrap();
            path
        })
        .collect()
}

#[test]
fn training_lowers_the_loss_and_calibrates() {
    let dir = tempfile::tempdir().unwrap();
    let images = texture_crops("brick.png", dir.path(), 10);
    let cfg = small_config();
    let opts = TrainOptions {
        epochs: 4,
        batch_size: 4,
        progress: false,
        ..TrainOptions::default()
    };
    let (untrained, _) = train::init_model(&cfg, &fixtures::backbone_path(), opts.seed).unwrap();
    let (trained, meta) = train::train(
        &cfg,
        &fixtures::backbone_path(),
        &images,
        &opts,
        &Device::Cpu,
    )
    .unwrap();

    let loss = |m: &patchflow::model::PatchFlow| {
        let x = train::load_input(m, &images[0]).unwrap();
        let (z, logdet) = m.flow_forward(&m.embed(&x).unwrap(), false).unwrap();
        patchflow::model::flow::nll_loss(&z, &logdet)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let (before, after) = (loss(&untrained), loss(&trained));
    assert!(after < before, "loss {before} -> {after}");

    let info = meta.training.as_ref().unwrap();
    assert_eq!(info.train_images + info.holdout_images, 10);
    assert_eq!(info.holdout_images, 2);
    let s = meta.stats;
    assert!(
        s.image_min <= s.image_threshold && s.image_threshold <= s.image_max,
        "{s:?}"
    );
    assert!(s.pixel_min <= s.pixel_max);

    let path = dir.path().join("trained.safetensors");
    checkpoint::save(&path, &trained, &meta).unwrap();
    let (reloaded, _) = checkpoint::load(&path, &Device::Cpu).unwrap();
    assert!(
        (loss(&reloaded) - after).abs() < 1e-6,
        "running statistics are saved"
    );
}
