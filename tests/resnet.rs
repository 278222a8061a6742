// SPDX-License-Identifier: MIT OR Apache-2.0
//! timm ResNet checkpoints load by key name: a state dict named as timm's `resnet18` or
//! `resnet50` (with the classifier `fc`) builds the backbone, which taps feature maps
//! at strides 8, 16 and 32.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use patchflow::model::resnet::{FEATURE_LAYERS, ResNet, ResNetConfig};
use patchflow::model::synthetic::{synthetic_tensors, synthetic_values};
use patchflow::model::{ModelConfig, ModelError, PatchFlow, Preprocess, Weights};

/// A timm-named state dict (`conv1.weight`, `layer1.0.bn1.running_var`, `fc.bias`, ...)
/// with values from the synthetic generator.
fn timm_state_dict(cfg: &ResNetConfig, classifier_in: usize) -> HashMap<String, Tensor> {
    let mut shapes = cfg.tensor_shapes();
    shapes.push(("fc.weight".into(), vec![1000, classifier_in]));
    shapes.push(("fc.bias".into(), vec![1000]));
    shapes
        .into_iter()
        .map(|(name, shape)| {
            // The generator's ranges are keyed by model-file names.
            let values = synthetic_values(&format!("backbone.{name}"), &shape).unwrap();
            let tensor = Tensor::from_vec(values, shape.as_slice(), &Device::Cpu).unwrap();
            (name, tensor)
        })
        .collect()
}

fn load(name: &str, classifier_in: usize) -> ResNet {
    let cfg = ResNetConfig::from_name(name).unwrap();
    let tensors = timm_state_dict(&cfg, classifier_in);
    let weights = Weights::new(tensors, &Device::Cpu, DType::F32).unwrap();
    ResNet::load(&weights, &cfg).unwrap()
}

fn tap_shapes(net: &ResNet, (h, w): (usize, usize)) -> Vec<(usize, usize, usize, usize)> {
    let x = Tensor::randn(0f32, 1.0, (1, 3, h, w), &Device::Cpu).unwrap();
    let feats = net.features(&x, &FEATURE_LAYERS).unwrap();
    feats.iter().map(|f| f.dims4().unwrap()).collect()
}

#[test]
fn resnet18_taps_at_224() {
    let net = load("resnet18", 512);
    assert_eq!(
        tap_shapes(&net, (224, 224)),
        vec![(1, 128, 28, 28), (1, 256, 14, 14), (1, 512, 7, 7)]
    );
}

#[test]
fn resnet50_taps_at_224() {
    let net = load("resnet50", 2048);
    assert_eq!(
        tap_shapes(&net, (224, 224)),
        vec![(1, 512, 28, 28), (1, 1024, 14, 14), (1, 2048, 7, 7)]
    );
}

#[test]
fn resnet18_odd_input_sizes() {
    // Symmetric padding gives floor((size - 1) / 2) + 1 at each of the five halvings.
    let net = load("resnet18", 512);
    assert_eq!(
        tap_shapes(&net, (200, 130)),
        vec![(1, 128, 25, 17), (1, 256, 13, 9), (1, 512, 7, 5)]
    );
}

#[test]
fn resnet18_classifier_loads_from_fc() {
    let net = load("resnet18", 512);
    let x = Tensor::zeros((2, 3, 64, 64), DType::F32, &Device::Cpu).unwrap();
    let logits = net.classify(&x).unwrap();
    assert_eq!(logits.dims(), &[2, 1000]);
}

#[test]
fn missing_downsample_names_the_tensor() {
    let cfg = ResNetConfig::from_name("resnet18").unwrap();
    let mut tensors = timm_state_dict(&cfg, 512);
    tensors.remove("layer3.0.downsample.0.weight");
    let weights = Weights::new(tensors, &Device::Cpu, DType::F32).unwrap();
    let err = ResNet::load(&weights, &cfg).unwrap_err();
    assert!(
        matches!(&err, ModelError::MissingTensor { name } if name == "layer3.0.downsample.0.weight"),
        "{err}"
    );
}

#[test]
fn patchflow_runs_on_resnet18() {
    let config = ModelConfig {
        backbone: "resnet18".into(),
        input_size: [64, 48],
        preprocess: Preprocess::imagenet(),
        ..ModelConfig::lite0()
    };
    let tensors = synthetic_tensors(&config).unwrap();
    let weights = Weights::new(tensors, &Device::Cpu, DType::F32).unwrap();
    let model = PatchFlow::new(&config, &weights).unwrap();
    assert_eq!(model.grid_size(), (8, 6));
    assert_eq!(model.fused_channels(), 3 * (128 + 256 + 512));
    let x = Tensor::randn(0f32, 1.0, (1, 3, 64, 48), &Device::Cpu).unwrap();
    let out = model.forward(&x).unwrap();
    assert_eq!(out.anomaly_map.dims(), &[1, 1, 64, 48]);
}

#[test]
fn resnet18_preset_builds() {
    let config = ModelConfig::preset("resnet18").unwrap();
    assert_eq!(config.backbone, "resnet18");
    let tensors = synthetic_tensors(&config).unwrap();
    let weights = Weights::new(tensors, &Device::Cpu, DType::F32).unwrap();
    let model = PatchFlow::new(&config, &weights).unwrap();
    assert_eq!(model.grid_size(), (32, 32));
}

#[test]
fn unknown_backbone_lists_resnets() {
    let config = ModelConfig {
        backbone: "resnet101".into(),
        ..ModelConfig::lite0()
    };
    let message = synthetic_tensors(&config).unwrap_err().to_string();
    assert!(message.contains("resnet101"), "{message}");
    assert!(message.contains("wide_resnet50_2"), "{message}");
    assert!(message.contains("tf_efficientnet_lite0"), "{message}");
}
