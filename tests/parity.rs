// SPDX-License-Identifier: MIT OR Apache-2.0
//! Numerical parity with anomalib 2.7.0's PatchFlow on EfficientNet, ResNet and DINOv2
//! ViT backbones.
//!
//! `scripts/reference/make_fixtures.py` built anomalib's `PatchflowModel` with weights
//! from the deterministic generator (`patchflow::model::synthetic`) and saved its
//! inputs and outputs under `tests/fixtures/parity/`. These tests regenerate the same
//! weights in Rust and run the port on the same inputs. They compare the
//! pre-processing, the backbone features per scale and layer, `z`, the log-determinant,
//! the loss, the anomaly map and the score. The fused and adapted features between the
//! backbone and the flow are not stored, to keep the fixtures small.

mod support;

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor};
use patchflow::imageops::load_rgb_chw;
use patchflow::model::flow::nll_loss;
use patchflow::model::synthetic::{
    synthetic_permutation, synthetic_tensors, synthetic_values, tensor_shapes,
};
use patchflow::model::{ModelConfig, PatchFlow, Preprocess, Weights};
use support::fixtures;
use support::tensors::max_abs_diff;

/// Largest absolute difference allowed between the port and anomalib, for every
/// compared tensor except the log-determinant.
const MAX_ABS_DIFF: f32 = 1e-4;

/// Largest difference allowed for the log-determinant, relative to `max(|logdet|, 1)`.
/// The log-determinant is a float32 sum over `flow_steps * C/2 * H * W` coupling scales
/// (each in (-2, 2)) plus `H * W * sum_c ln g`, about 3 to 220 in magnitude on these
/// inputs. The per-element differences of the scales (about 1e-6, like those of `z`)
/// add up over those thousands of terms, and so does the rounding of a sum in another
/// order than PyTorch's. An absolute bound of [`MAX_ABS_DIFF`] would therefore test the summation
/// order rather than the port. The largest relative difference this test measured on
/// x86-64 is 2.6e-6 (dinov2_small_60x46, an absolute difference of 7.6e-6).
const LOGDET_MAX_REL_DIFF: f64 = 1e-5;

struct Fixture {
    name: String,
    tensors: HashMap<String, Tensor>,
    metadata: HashMap<String, String>,
}

impl Fixture {
    fn load(name: &str) -> Self {
        let path = fixtures::repo_path(&format!("tests/fixtures/parity/{name}.safetensors"));
        let bytes = std::fs::read(&path)
            .unwrap_or_else(|e| {
                panic!(
                    "cannot read fixture {}: {e}; regenerate it with scripts/reference/make_fixtures.py",
                    path.display()
                )
            });
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let metadata = header.metadata().clone().unwrap_or_default();
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
        Self {
            name: name.to_string(),
            tensors,
            metadata,
        }
    }

    fn tensor(&self, name: &str) -> &Tensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("fixture {} has no tensor {name}", self.name))
    }

    fn meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> T {
        let text = self
            .metadata
            .get(key)
            .unwrap_or_else(|| panic!("fixture {} has no metadata {key}", self.name));
        serde_json::from_str(text)
            .unwrap_or_else(|e| panic!("fixture {} metadata {key} is invalid: {e}", self.name))
    }
}

/// Asserts that `actual` has the shape of `expected` and is within [`MAX_ABS_DIFF`].
fn assert_close(case: &str, group: &str, actual: &Tensor, expected: &Tensor) {
    assert_eq!(
        actual.dims(),
        expected.dims(),
        "{case} {group}: shape differs from anomalib"
    );
    let diff = max_abs_diff(actual, expected);
    println!("{case:<24} {group:<12} max abs diff {diff:.3e}");
    assert!(
        diff <= MAX_ABS_DIFF,
        "{case} {group}: max abs diff {diff:e} exceeds {MAX_ABS_DIFF:e}"
    );
}

/// Runs `preprocess` on one committed image per batch item.
fn preprocess_images(model: &PatchFlow, images: &[String]) -> Tensor {
    let items: Vec<Tensor> = images
        .iter()
        .map(|file| {
            let (chw, h, w) = load_rgb_chw(&fixtures::image(file)).unwrap();
            model.preprocess(&chw, (h, w)).unwrap()
        })
        .collect();
    Tensor::cat(&items, 0).unwrap()
}

fn synthetic_model(config: &ModelConfig) -> PatchFlow {
    let tensors = synthetic_tensors(config).unwrap();
    let weights = Weights::new(tensors, &Device::Cpu, DType::F32).unwrap();
    PatchFlow::new(config, &weights).unwrap()
}

/// Checks that the Rust generator names and shapes the tensors as anomalib's state dict
/// does, and produces the values the Python generator recorded.
fn check_generator(fixture: &Fixture, config: &ModelConfig) {
    let expected: BTreeMap<String, Vec<usize>> = fixture.meta("tensor_shapes");
    let actual: BTreeMap<String, Vec<usize>> = tensor_shapes(config).unwrap().into_iter().collect();
    let missing: Vec<&String> = expected
        .keys()
        .filter(|k| !actual.contains_key(*k))
        .collect();
    let extra: Vec<&String> = actual
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .collect();
    assert!(
        missing.is_empty(),
        "{}: tensors in anomalib's state dict but not generated: {missing:?}",
        fixture.name
    );
    assert!(
        extra.is_empty(),
        "{}: generated tensors that anomalib's state dict lacks: {extra:?}",
        fixture.name
    );
    for (name, shape) in &expected {
        assert_eq!(&actual[name], shape, "{}: shape of {name}", fixture.name);
    }

    let samples: BTreeMap<String, Vec<f64>> = fixture.meta("generator_samples");
    assert!(
        !samples.is_empty(),
        "{}: no generator samples",
        fixture.name
    );
    for (name, values) in &samples {
        let generated = synthetic_values(name, &expected[name]).unwrap();
        let python: Vec<f32> = values.iter().map(|v| *v as f32).collect();
        assert_eq!(
            &generated[..python.len()],
            python.as_slice(),
            "{}: generated values of {name} differ from the Python generator",
            fixture.name
        );
    }

    let permutations: BTreeMap<String, Vec<usize>> = fixture.meta("generator_permutations");
    assert_eq!(
        permutations.len(),
        config.flow_steps,
        "{}: one permutation per flow step",
        fixture.name
    );
    for (name, perm) in &permutations {
        assert_eq!(
            &synthetic_permutation(name, perm.len()),
            perm,
            "{}: generated permutation {name} differs from the Python generator",
            fixture.name
        );
    }
}

fn check_model_case(name: &str) {
    let fixture = Fixture::load(name);
    let config: ModelConfig = fixture.meta("config");
    check_generator(&fixture, &config);
    let model = synthetic_model(&config);

    let images: Vec<String> = fixture.meta("images");
    let x = fixture.tensor("input");
    assert_close(name, "preprocess", &preprocess_images(&model, &images), x);

    // Every stage runs on the port's own output of the stage before, so the
    // differences accumulate as in a real forward pass.
    let features = model.extract(x).unwrap();
    assert_eq!(
        features.len(),
        3 * config.num_scales,
        "{name}: feature count"
    );
    for (i, feature) in features.iter().enumerate() {
        let group = format!("features.{i}");
        assert_close(name, &group, feature, fixture.tensor(&group));
    }
    let fused = model.fuse(&features).unwrap();
    let (z, logdet) = model.flow_forward(&fused, false).unwrap();
    assert_close(name, "z", &z, fixture.tensor("z"));
    let expected_logdet = fixture.tensor("logdet").to_vec1::<f32>().unwrap();
    let actual_logdet = logdet.to_vec1::<f32>().unwrap();
    assert_eq!(actual_logdet.len(), expected_logdet.len(), "{name}: logdet");
    for (a, e) in actual_logdet.iter().zip(&expected_logdet) {
        let abs = f64::from((a - e).abs());
        let rel = abs / f64::from(e.abs()).max(1.0);
        println!(
            "{name:<24} {:<12} rel diff {rel:.3e}, abs diff {abs:.3e} (value {e})",
            "logdet"
        );
        assert!(
            rel <= LOGDET_MAX_REL_DIFF,
            "{name} logdet: {a} vs anomalib {e}, relative diff {rel:e} exceeds {LOGDET_MAX_REL_DIFF:e}"
        );
    }
    let loss = nll_loss(&z, &logdet).unwrap().reshape(1).unwrap();
    assert_close(name, "loss", &loss, fixture.tensor("loss"));

    let out = model.forward(x).unwrap();
    assert_close(
        name,
        "anomaly_map",
        &out.anomaly_map,
        fixture.tensor("anomaly_map"),
    );
    assert_close(name, "score", &out.score, fixture.tensor("score"));
}

#[test]
fn lite0_64_matches_anomalib() {
    check_model_case("lite0_64");
}

#[test]
fn b0_batch_of_two_matches_anomalib() {
    check_model_case("b0_64_batch2");
}

#[test]
fn b0_non_square_two_steps_matches_anomalib() {
    check_model_case("b0_96x64");
}

#[test]
fn lite0_crop_matches_anomalib() {
    check_model_case("lite0_crop");
}

#[test]
fn resnet18_non_square_matches_anomalib() {
    check_model_case("resnet18_80x48");
}

#[test]
fn wide_resnet50_2_matches_anomalib() {
    check_model_case("wide_resnet50_2_32");
}

#[test]
fn resnet34_matches_anomalib() {
    check_model_case("resnet34_64");
}

#[test]
fn resnet50_non_square_matches_anomalib() {
    check_model_case("resnet50_48x64");
}

#[test]
fn b5_non_square_matches_anomalib() {
    check_model_case("b5_64x48");
}

#[test]
fn dinov2_small_floor_crop_matches_anomalib() {
    check_model_case("dinov2_small_60x46");
}

#[test]
fn dinov2_base_crop_size_matches_anomalib() {
    check_model_case("dinov2_base_crop");
}

#[derive(serde::Deserialize)]
struct ResizeCase {
    image: String,
    size: [usize; 2],
    preprocess: Preprocess,
}

#[test]
fn preprocess_resize_paths_match_anomalib() {
    let fixture = Fixture::load("resize");
    let mut names: Vec<&String> = fixture.tensors.keys().collect();
    names.sort();
    assert_eq!(names.len(), 4, "resize fixture cases: {names:?}");
    for name in names {
        let case: ResizeCase = fixture.meta(name);
        let config = ModelConfig {
            input_size: case.size,
            preprocess: case.preprocess,
            ..ModelConfig::lite0()
        };
        let model = synthetic_model(&config);
        let actual = preprocess_images(&model, &[case.image]);
        assert_close(name, "preprocess", &actual, fixture.tensor(name));
    }
}
