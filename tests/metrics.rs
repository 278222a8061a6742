// SPDX-License-Identifier: MIT OR Apache-2.0
//! The metrics of `patchflow eval` against scikit-learn 1.9.1 and anomalib 2.7.0, on the
//! seeded score sets recorded by `scripts/reference/make_metric_fixture.py`: ties,
//! all-equal scores, one class only, and anomaly maps with several defect regions
//! for AUPRO.

mod support;

use patchflow::metrics::{Confusion, RankedScores, RegionScores};
use serde_json::Value;

fn fixture() -> Value {
    let path = support::fixtures::repo_path("tests/fixtures/metrics.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// Checks the values that image and pixel cases share.
fn check_binary(name: &str, case: &Value, scores: &[f32], labels: &[bool]) {
    let ranked = RankedScores::from_labels(scores, labels);
    match case["roc_auc"].as_f64() {
        Some(expected) => {
            let ours = ranked.auroc().unwrap();
            assert!(
                (ours - expected).abs() < 1e-9,
                "{name}: AUROC {ours} vs {expected}"
            );
        }
        None => assert_eq!(ranked.auroc(), None, "{name}: AUROC of one class"),
    }

    // Ours is the correctly rounded ratio 2 TP / (2 TP + FP + FN). scikit-learn reaches
    // it in more steps and can be one unit in the last place away.
    let predicted: Vec<bool> = scores.iter().map(|&s| s > 0.5).collect();
    let f1 = Confusion::new(&predicted, labels).f1();
    let expected_f1 = case["f1_at_half"].as_f64().unwrap();
    assert!(
        (f1 - expected_f1).abs() < 1e-15,
        "{name}: F1 {f1} vs {expected_f1}"
    );

    let adaptive = ranked.f1_adaptive_threshold().unwrap();
    let expected = case["adaptive_threshold"].as_f64().unwrap() as f32;
    assert_eq!(adaptive.threshold, expected, "{name}: adaptive threshold");
    let from_anomalib = case["anomalib_threshold"].as_f64().unwrap() as f32;
    assert_eq!(
        adaptive.threshold, from_anomalib,
        "{name}: anomalib's threshold"
    );
    let expected_f1 = case["adaptive_f1"].as_f64().unwrap();
    assert!(
        (adaptive.f1 - expected_f1).abs() < 1e-9,
        "{name}: F1 at the adaptive threshold {} vs {expected_f1}",
        adaptive.f1
    );
}

#[test]
fn image_metrics_match_sklearn() {
    let doc = fixture();
    let cases = doc["image_cases"].as_array().unwrap();
    assert!(cases.len() >= 6);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let scores: Vec<f32> = case["scores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let labels: Vec<bool> = case["labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_bool().unwrap())
            .collect();
        check_binary(name, case, &scores, &labels);
    }
}

#[test]
fn pixel_metrics_match_sklearn_and_anomalib() {
    let doc = fixture();
    let case = &doc["pixel_case"];
    let shape: Vec<usize> = case["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let (images, height, width) = (shape[0], shape[1], shape[2]);
    let scores: Vec<f32> = case["map_1024"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as f32 / 1024.0)
        .collect();
    let mask: Vec<bool> = case["mask"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() == 1)
        .collect();
    assert_eq!(scores.len(), images * height * width);
    assert_eq!(mask.len(), scores.len());
    check_binary("pixels", case, &scores, &mask);

    let mut regions = RegionScores::new();
    for (map, mask) in scores
        .chunks_exact(height * width)
        .zip(mask.chunks_exact(height * width))
    {
        regions.push(map, mask, width);
    }
    // A rectangle, a bar with a corner-touching pixel, a single pixel, a border block,
    // a ring and an X.
    assert_eq!(regions.regions(), 6);
    let aupro = regions.aupro(case["fpr_limit"].as_f64().unwrap()).unwrap();
    let expected = case["aupro"].as_f64().unwrap();
    assert!(
        (aupro - expected).abs() < 1e-9,
        "AUPRO {aupro} vs {expected}"
    );
    // anomalib sums in float32.
    let from_anomalib = case["anomalib_aupro"].as_f64().unwrap();
    assert!(
        (aupro - from_anomalib).abs() < 1e-6,
        "AUPRO {aupro} vs anomalib's {from_anomalib}"
    );
}
