// SPDX-License-Identifier: MIT OR Apache-2.0
//! Tensor comparisons shared by the model tests.

use candle_core::Tensor;

/// Returns the largest absolute element-wise difference of two tensors of one shape.
pub fn max_abs_diff(actual: &Tensor, expected: &Tensor) -> f32 {
    (actual - expected)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
