// SPDX-License-Identifier: MIT OR Apache-2.0
//! The coupling flow against its own mathematics, in float64 on a tiny input: the
//! inverse undoes the forward pass, and the log-determinant equals `ln|det J|` of a
//! central-difference Jacobian.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use patchflow::model::Weights;
use patchflow::model::flow::{BlockDims, Flow, init_block_tensors, nll_loss, uniform};
use rand::SeedableRng;

const DIMS: BlockDims = BlockDims {
    channels: 5,
    hidden: 3,
};
const H: usize = 2;
const W: usize = 3;

/// Builds a two-block flow with non-trivial global scales, offsets and BatchNorm statistics,
/// so that every term of the log-determinant matters.
fn test_flow() -> Flow {
    let dev = Device::Cpu;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut tensors = HashMap::new();
    for (k, perm) in [[3usize, 0, 4, 1, 2], [1, 2, 0, 4, 3]].iter().enumerate() {
        for (name, t) in init_block_tensors(DIMS, perm, &mut rng, DType::F64, &dev).unwrap() {
            let t = match name.as_str() {
                "global_scale" => uniform(&mut rng, 3.0, &[1, 5, 1, 1], DType::F64, &dev)
                    .unwrap()
                    .affine(1.0, 8.0)
                    .unwrap(),
                "global_offset" | "subnet.2.bias" | "subnet.2.running_mean" => {
                    uniform(&mut rng, 0.5, t.dims(), DType::F64, &dev).unwrap()
                }
                "subnet.2.running_var" | "subnet.2.weight" => {
                    uniform(&mut rng, 0.5, t.dims(), DType::F64, &dev)
                        .unwrap()
                        .affine(1.0, 1.0)
                        .unwrap()
                }
                "w_perm" => t,
                _ => t.affine(3.0, 0.0).unwrap(),
            };
            tensors.insert(format!("module_list.{k}.{name}"), t);
        }
    }
    let weights = Weights::new(tensors, &dev, DType::F64).unwrap();
    Flow::load(&weights, 2, DIMS).unwrap()
}

fn input(batch: usize, seed: u64) -> Tensor {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    uniform(
        &mut rng,
        2.0,
        &[batch, DIMS.channels, H, W],
        DType::F64,
        &Device::Cpu,
    )
    .unwrap()
}

fn to_vec(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

/// ln|det A| by Gaussian elimination with partial pivoting.
fn log_abs_det(mut a: Vec<Vec<f64>>) -> f64 {
    let n = a.len();
    let mut total = 0.0;
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
            .unwrap();
        a.swap(col, pivot);
        let p = a[col][col];
        assert!(p != 0.0, "singular Jacobian");
        total += p.abs().ln();
        let pivot_row = a[col].clone();
        for row in a.iter_mut().skip(col + 1) {
            let f = row[col] / p;
            for (x, pv) in row.iter_mut().zip(&pivot_row).skip(col) {
                *x -= f * pv;
            }
        }
    }
    total
}

#[test]
fn inverse_undoes_forward() {
    let flow = test_flow();
    let x = input(2, 1);
    let (z, logdet) = flow.forward(&x, false).unwrap();
    let (back, inv_logdet) = flow.inverse(&z).unwrap();
    let err = to_vec(&(back - &x).unwrap())
        .iter()
        .fold(0f64, |m, v| m.max(v.abs()));
    assert!(err < 1e-12, "reconstruction error {err}");
    for (a, b) in to_vec(&logdet).iter().zip(to_vec(&inv_logdet)) {
        assert!((a + b).abs() < 1e-12, "forward {a} vs inverse {b}");
    }
}

#[test]
fn logdet_matches_numerical_jacobian() {
    let flow = test_flow();
    let x = input(1, 2);
    let base = to_vec(&x);
    let n = base.len();
    let step = 1e-6;
    let mut jac = vec![vec![0f64; n]; n];
    for j in 0..n {
        let eval = |delta: f64| {
            let mut v = base.clone();
            v[j] += delta;
            let t = Tensor::from_vec(v, x.dims(), &Device::Cpu).unwrap();
            to_vec(&flow.forward(&t, false).unwrap().0)
        };
        let (plus, minus) = (eval(step), eval(-step));
        for i in 0..n {
            jac[i][j] = (plus[i] - minus[i]) / (2.0 * step);
        }
    }
    let numeric = log_abs_det(jac);
    let analytic = to_vec(&flow.forward(&x, false).unwrap().1)[0];
    assert!(
        (numeric - analytic).abs() < 1e-6,
        "numerical {numeric} vs analytic {analytic}"
    );
}

#[test]
fn logdet_is_per_batch_item() {
    let flow = test_flow();
    let x = input(3, 3);
    let (_, batched) = flow.forward(&x, false).unwrap();
    let batched = to_vec(&batched);
    assert_eq!(batched.len(), 3);
    for (i, expected) in batched.iter().enumerate() {
        let single = flow.forward(&x.narrow(0, i, 1).unwrap(), false).unwrap().1;
        assert!((to_vec(&single)[0] - expected).abs() < 1e-12);
    }
}

#[test]
fn training_mode_updates_running_statistics() {
    let flow = test_flow();
    let before = to_vec(&flow.blocks[0].running_stats().0);
    flow.forward(&input(2, 4), true).unwrap();
    let after = to_vec(&flow.blocks[0].running_stats().0);
    assert!(before.iter().zip(&after).any(|(a, b)| (a - b).abs() > 1e-9));
}

#[test]
fn loss_is_normalised_nll() {
    let z = Tensor::ones((2, 2, 1, 2), DType::F64, &Device::Cpu).unwrap();
    let logdet = Tensor::new(&[1.0f64, 3.0], &Device::Cpu).unwrap();
    // 0.5 * 4 ones = 2 per item; mean(2 - 1, 2 - 3) = 0; over D = 4 -> 0.
    let loss = nll_loss(&z, &logdet).unwrap().to_scalar::<f64>().unwrap();
    assert!(loss.abs() < 1e-12);
    let loss = nll_loss(&z, &Tensor::new(&[0.0f64, 0.0], &Device::Cpu).unwrap()).unwrap();
    assert!((loss.to_scalar::<f64>().unwrap() - 0.5).abs() < 1e-12);
}
