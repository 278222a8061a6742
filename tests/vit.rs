// SPDX-License-Identifier: MIT OR Apache-2.0
//! DINOv2 ViT backbones: timm-named weights load, the sizes follow anomalib's
//! flooring to the 14-pixel patch, the map is padded back to the input size, and
//! `patchflow train` accepts a user's weights file with a DINOv2 preset.

mod support;

use std::collections::HashMap;
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use patchflow::model::synthetic::{synthetic_tensors, synthetic_values};
use patchflow::model::vit::{Vit, VitConfig};
use patchflow::model::{ModelConfig, PatchFlow, Weights};
use support::fixtures;

/// A timm-named ViT state dict (`cls_token`, `blocks.0.attn.qkv.weight`, ...) with values
/// from the synthetic generator.
fn timm_state_dict(cfg: &VitConfig) -> HashMap<String, Tensor> {
    cfg.tensor_shapes()
        .into_iter()
        .map(|(name, shape)| {
            // The generator's ranges are keyed by model-file names.
            let values = synthetic_values(&format!("backbone.{name}"), &shape).unwrap();
            let tensor = Tensor::from_vec(values, shape.as_slice(), &Device::Cpu).unwrap();
            (name, tensor)
        })
        .collect()
}

fn synthetic_model(config: &ModelConfig) -> PatchFlow {
    let tensors = synthetic_tensors(config).unwrap();
    let weights = Weights::new(tensors, &Device::Cpu, DType::F32).unwrap();
    PatchFlow::new(config, &weights).unwrap()
}

#[test]
fn vit_small_taps_three_blocks() {
    let cfg = VitConfig::from_name("vit_small_patch14_dinov2").unwrap();
    let weights = Weights::new(timm_state_dict(&cfg), &Device::Cpu, DType::F32).unwrap();
    let net = Vit::load(&weights, &cfg).unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 3, 28, 42), &Device::Cpu).unwrap();
    let feats = net.features(&x, &cfg.feature_blocks()).unwrap();
    let shapes: Vec<_> = feats.iter().map(|f| f.dims4().unwrap()).collect();
    assert_eq!(shapes, vec![(2, 384, 2, 3); 3]);
}

#[test]
fn vit_rejects_unaligned_input() {
    let cfg = VitConfig::from_name("vit_small_patch14_dinov2").unwrap();
    let weights = Weights::new(timm_state_dict(&cfg), &Device::Cpu, DType::F32).unwrap();
    let net = Vit::load(&weights, &cfg).unwrap();
    let x = Tensor::zeros((1, 3, 28, 40), DType::F32, &Device::Cpu).unwrap();
    let err = net.features(&x, &[0]).unwrap_err().to_string();
    assert!(err.contains("28x40"), "{err}");
}

#[test]
fn vit_depths_match_timm() {
    let blocks = |name: &str| VitConfig::from_name(name).unwrap().feature_blocks();
    assert_eq!(blocks("vit_small_patch14_dinov2"), [0, 6, 11]);
    assert_eq!(blocks("vit_base_patch14_dinov2"), [0, 6, 11]);
    assert_eq!(blocks("vit_large_patch14_dinov2"), [0, 12, 23]);
    // timm 1.0.31's vit_large_patch14_dinov2 has 342 tensors and 304,367,616
    // parameters.
    let large = VitConfig::from_name("vit_large_patch14_dinov2").unwrap();
    let shapes = large.tensor_shapes();
    assert_eq!(shapes.len(), 342);
    let params: usize = shapes
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    assert_eq!(params, 304_367_616);
    assert!(VitConfig::from_name("vit_giant_patch14_dinov2").is_none());
}

#[test]
fn dinov2_sizes_floor_to_patch() {
    // anomalib's default 768x768 runs at 756x756, with 54, 27 and 13 patch grids.
    let config = ModelConfig {
        input_size: [768, 768],
        ..ModelConfig::dinov2("vit_base_patch14_dinov2")
    };
    config.validate().unwrap();
    assert_eq!(config.internal_size(), [756, 756]);
    assert!(config.is_cropped());
    assert_eq!(config.scale_size(0), [756, 756]);
    assert_eq!(config.scale_size(1), [378, 378]);
    assert_eq!(config.scale_size(2), [182, 182]);

    let cropped = ModelConfig {
        crop_size: Some([500, 300]),
        ..config.clone()
    };
    assert_eq!(cropped.internal_size(), [490, 294]);

    let aligned = ModelConfig {
        input_size: [252, 252],
        ..config
    };
    assert_eq!(aligned.internal_size(), [252, 252]);
    assert!(!aligned.is_cropped());
}

#[test]
fn cnn_sizes_stay_unfloored() {
    let config = ModelConfig {
        input_size: [100, 90],
        ..ModelConfig::lite0()
    };
    assert_eq!(config.internal_size(), [100, 90]);
    assert!(!config.is_cropped());
    assert_eq!(config.scale_size(2), [25, 22]);
}

#[test]
fn dinov2_rejects_scales_below_one_patch() {
    // 60x46 is floored to 56x42; the third scale would be 14x10, below one patch.
    let config = ModelConfig {
        input_size: [60, 46],
        ..ModelConfig::dinov2("vit_small_patch14_dinov2")
    };
    let err = config.validate().unwrap_err();
    assert!(err.contains("num_scales 3"), "{err}");
    assert!(err.contains("14 pixels"), "{err}");
    let two_scales = ModelConfig {
        num_scales: 2,
        ..config
    };
    two_scales.validate().unwrap();
}

#[test]
fn dinov2_rejects_input_below_one_patch() {
    let config = ModelConfig {
        input_size: [13, 64],
        num_scales: 1,
        ..ModelConfig::dinov2("vit_small_patch14_dinov2")
    };
    let err = config.validate().unwrap_err();
    assert!(err.contains("at least 14 pixels"), "{err}");
}

#[test]
fn dinov2_preset_pads_map_to_input() {
    let config = ModelConfig::preset("vit_small_patch14_dinov2").unwrap();
    assert_eq!(config.input_size, [256, 256]);
    let model = synthetic_model(&config);
    assert_eq!(model.grid_size(), (18, 18));
    assert_eq!(model.fused_channels(), 3 * 3 * 384);

    let x = Tensor::randn(0f32, 1.0, (1, 3, 256, 256), &Device::Cpu).unwrap();
    let out = model.forward(&x).unwrap();
    assert_eq!(out.anomaly_map.dims(), &[1, 1, 256, 256]);
    // The backbone works on the centre 252x252, so the map has a 2-pixel border of -1.
    // The inner values are strictly inside (-1, 0) for these weights.
    let map = out.anomaly_map.squeeze(0).unwrap().squeeze(0).unwrap();
    let rows = map.to_vec2::<f32>().unwrap();
    for (y, row) in rows.iter().enumerate() {
        for (x, v) in row.iter().enumerate() {
            let border = !(2..254).contains(&y) || !(2..254).contains(&x);
            if border {
                assert_eq!(*v, -1.0, "border pixel ({y}, {x})");
            } else {
                assert!(*v > -1.0, "inner pixel ({y}, {x}) is {v}");
                assert!(*v < 0.0, "inner pixel ({y}, {x}) is {v}");
            }
        }
    }
    let inner_max = rows[2..254]
        .iter()
        .flat_map(|row| row[2..254].iter().copied())
        .fold(f32::NEG_INFINITY, f32::max);
    let score = out.score.to_vec1::<f32>().unwrap()[0];
    assert_eq!(score, inner_max);
}

#[test]
fn unknown_backbone_lists_dinov2() {
    let config = ModelConfig {
        backbone: "vit_giant_patch14_dinov2".into(),
        ..ModelConfig::lite0()
    };
    let tensors = synthetic_tensors(&ModelConfig::lite0()).unwrap();
    let weights = Weights::new(tensors, &Device::Cpu, DType::F32).unwrap();
    let err = PatchFlow::new(&config, &weights).unwrap_err().to_string();
    assert!(err.contains("vit_small_patch14_dinov2"), "{err}");
    assert!(err.contains("vit_large_patch14_dinov2"), "{err}");
}

/// Writes `count` 64x64 crops of a committed texture into `dir`.
fn texture_crops(name: &str, dir: &std::path::Path, count: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let img = image::open(fixtures::image(name)).unwrap().to_rgb8();
    for i in 0..count {
        let (x, y) = ((i * 61) % 400, (i * 89) % 400);
        let crop = image::imageops::crop_imm(&img, x as u32, y as u32, 64, 64).to_image();
        crop.save(dir.join(format!("{i:02}.png"))).unwrap();
    }
}

#[test]
fn train_with_dinov2_preset() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    texture_crops("gravel.png", &good, 5);
    // A timm state dict as a user would save it from vit_small_patch14_dinov2.
    let cfg = VitConfig::from_name("vit_small_patch14_dinov2").unwrap();
    let weights = dir.path().join("vit_small_patch14_dinov2.safetensors");
    candle_core::safetensors::save(&timm_state_dict(&cfg), &weights).unwrap();
    let model = dir.path().join("model.safetensors");

    let out = Command::new(env!("CARGO_BIN_EXE_patchflow"))
        .env("RUST_LOG", "warn")
        .args(["train", "--preset", "vit_small_patch14_dinov2", "--images"])
        .arg(&good)
        .arg("--backbone")
        .arg(&weights)
        .arg("--output")
        .arg(&model)
        .args([
            "--input-size",
            "60x46",
            "--num-scales",
            "2",
            "--epochs",
            "1",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "train failed: {stderr}");

    let out = Command::new(env!("CARGO_BIN_EXE_patchflow"))
        .arg("info")
        .arg(&model)
        .output()
        .unwrap();
    assert!(out.status.success());
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["backbone"]["name"], "vit_small_patch14_dinov2");
    assert_eq!(info["config"]["input_size"], serde_json::json!([60, 46]));
}

#[test]
fn train_lists_presets_on_unknown_preset() {
    let out = Command::new(env!("CARGO_BIN_EXE_patchflow"))
        .args(["train", "--preset", "vit_tiny", "--images", "."])
        .args([
            "--backbone",
            "missing.safetensors",
            "--output",
            "x.safetensors",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("vit_small_patch14_dinov2"), "{stderr}");
}
