// SPDX-License-Identifier: MIT OR Apache-2.0
//! The EfficientNet-Lite0 port with the real ImageNet weights: it must classify real
//! photos as the original network does, and tap feature maps at strides 8, 16 and 32.

mod support;

use candle_core::{D, DType, Device, Tensor};
use patchflow::imageops::{ResizeMode, load_rgb_chw, resize_planes};
use patchflow::model::efficientnet::{EfficientNet, EfficientNetConfig, FEATURE_STAGES};
use patchflow::model::{Preprocess, Weights};
use support::fixtures;

fn lite0() -> EfficientNet {
    let tensors = candle_core::safetensors::load(fixtures::backbone_path(), &Device::Cpu).unwrap();
    let weights = Weights::new(tensors, &Device::Cpu, DType::F32).unwrap();
    let cfg = EfficientNetConfig::from_name("tf_efficientnet_lite0").unwrap();
    EfficientNet::load(&weights, &cfg).unwrap()
}

/// Loads the image at 224x224, normalised with the Lite weights' mean and std of 0.5.
fn input(name: &str) -> Tensor {
    let (chw, h, w) = load_rgb_chw(&fixtures::image(name)).unwrap();
    let mut data = resize_planes(&chw, 3, (h, w), (224, 224), ResizeMode::Antialias);
    let p = Preprocess::lite();
    for (c, plane) in data.chunks_exact_mut(224 * 224).enumerate() {
        plane
            .iter_mut()
            .for_each(|v| *v = (*v - p.mean[c]) / p.std[c]);
    }
    Tensor::from_vec(data, (1, 3, 224, 224), &Device::Cpu).unwrap()
}

fn top1(net: &EfficientNet, name: &str) -> u32 {
    let logits = net.classify(&input(name)).unwrap();
    logits
        .argmax(D::Minus1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<u32>()
        .unwrap()[0]
}

#[test]
fn classifies_cat_as_egyptian_cat() {
    // ImageNet class 285 is "Egyptian cat".
    assert_eq!(top1(&lite0(), "chelsea.png"), 285);
}

#[test]
fn classifies_coffee_as_espresso() {
    // ImageNet class 967 is "espresso".
    assert_eq!(top1(&lite0(), "coffee.png"), 967);
}

#[test]
fn feature_taps_have_timm_shapes() {
    let net = lite0();
    let x = Tensor::zeros((2, 3, 256, 256), DType::F32, &Device::Cpu).unwrap();
    let feats = net.features(&x, &FEATURE_STAGES).unwrap();
    let shapes: Vec<_> = feats.iter().map(|f| f.dims4().unwrap()).collect();
    assert_eq!(
        shapes,
        vec![(2, 40, 32, 32), (2, 112, 16, 16), (2, 320, 8, 8)]
    );
}

#[test]
fn odd_input_uses_ceil_sizes() {
    // TF "SAME" padding gives ceil(size / stride) at every stride-2 step.
    let net = lite0();
    let x = Tensor::zeros((1, 3, 200, 130), DType::F32, &Device::Cpu).unwrap();
    let feats = net.features(&x, &FEATURE_STAGES).unwrap();
    let shapes: Vec<_> = feats.iter().map(|f| f.dims4().unwrap()).collect();
    assert_eq!(
        shapes,
        vec![(1, 40, 25, 17), (1, 112, 13, 9), (1, 320, 7, 5)]
    );
}
