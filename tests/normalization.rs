// SPDX-License-Identifier: MIT OR Apache-2.0
//! Score normalisation and labels against anomalib 2.7.0's own post-processor, on the
//! edge cases recorded by `scripts/reference/make_normalization_fixture.py`: the
//! threshold itself, clamping, a NaN threshold, NaN bounds, equal bounds, NaN and
//! infinite scores.

mod support;

use patchflow::scoring::normalize;
use serde_json::Value;

fn number(v: &Value) -> f32 {
    match v {
        Value::String(s) if s == "nan" => f32::NAN,
        Value::String(s) if s == "inf" => f32::INFINITY,
        Value::String(s) if s == "-inf" => f32::NEG_INFINITY,
        other => other.as_f64().expect("a number or nan/inf") as f32,
    }
}

#[test]
fn normalization_matches_anomalib() {
    let path = support::fixtures::repo_path("tests/fixtures/normalization.json");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let cases = doc["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    for case in cases {
        let (x, t) = (number(&case["value"]), number(&case["threshold"]));
        let (lo, hi) = (number(&case["min"]), number(&case["max"]));
        let expected = number(&case["normalized"]);
        let ours = normalize(x, t, lo, hi);
        if expected.is_nan() {
            assert!(ours.is_nan(), "{case}: got {ours}");
        } else {
            // Both sides compute in float32 in the same order, so the values are equal.
            assert_eq!(ours, expected, "{case}");
        }
        let label = case["label"].as_bool().unwrap();
        assert_eq!(ours > 0.5, label, "{case}");
    }
}
