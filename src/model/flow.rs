// SPDX-License-Identifier: MIT OR Apache-2.0
//! The normalizing flow: a sequence of affine coupling blocks with the semantics of the
//! `AllInOneBlock` that anomalib 2.7 vendors (`anomalib/models/components/flow/
//! all_in_one_block.py`, itself FrEIA 0.2's block before FrEIA PR #165).
//!
//! Per block, with `C1 = C - C/2` passive and `C2 = C/2` transformed channels:
//! `a = 0.1 * subnet(x1)`, `s = 2 tanh(a[:C2])`, `y2 = x2 * exp(s) + a[C2:]`, then a
//! learned per-channel affine `u * g + offset` with `g = 0.2 ln(1 + exp(0.5 gs))`, then a
//! fixed channel permutation. The subnet is conv3x3 -> conv3x3 -> BatchNorm ->
//! LeakyReLU(0.2), with no activation between the two convolutions.

use std::sync::Mutex;

use candle_core::{D, DType, Device, IndexOp, Result as CandleResult, Tensor};

use super::ops::{self, Activation};
use super::weights::{ModelError, Weights};

/// anomalib's `affine_clamping` default.
const CLAMP: f64 = 2.0;
/// The subnet output is damped by this factor before it becomes scale and shift.
const SUBNET_DAMPING: f64 = 0.1;
/// Epsilon of the subnet's BatchNorm (PyTorch default).
const BN_EPS: f64 = 1e-5;
/// Momentum of the running-statistics update (PyTorch default).
const BN_MOMENTUM: f64 = 0.1;
/// `global_scale` starts at `2 ln(e^5 - 1)`, which makes `g` equal 1.
pub const GLOBAL_SCALE_INIT: f64 = 9.986_476_834_167_06;

/// Shapes of one coupling block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockDims {
    pub channels: usize,
    pub hidden: usize,
}

impl BlockDims {
    /// Channels passed through unchanged (the subnet's input).
    pub fn passive(&self) -> usize {
        self.channels - self.channels / 2
    }

    /// Channels that get the affine transform.
    pub fn active(&self) -> usize {
        self.channels / 2
    }
}

/// One `AllInOneBlock` coupling step.
#[derive(Debug)]
pub struct FlowBlock {
    dims: BlockDims,
    conv0_w: Tensor,
    conv0_b: Tensor,
    conv1_w: Tensor,
    conv1_b: Tensor,
    bn_w: Tensor,
    bn_b: Tensor,
    running: Mutex<(Tensor, Tensor)>,
    global_scale: Tensor,
    global_offset: Tensor,
    perm: Tensor,
    perm_inv: Tensor,
    perm_index: Vec<usize>,
}

/// `softplus(beta=0.5, threshold=20)` scaled by 0.1, as the block's global scale
/// activation: `0.2 ln(1 + exp(0.5 x))`, and `0.1 x` where `0.5 x > 20`.
fn global_scale_activation(gs: &Tensor) -> CandleResult<Tensor> {
    let half = gs.affine(0.5, 0.0)?;
    let soft = half.exp()?.affine(1.0, 1.0)?.log()?.affine(0.2, 0.0)?;
    let linear = gs.affine(0.1, 0.0)?;
    let mask = half.gt(20.0)?;
    mask.where_cond(&linear, &soft)
}

/// Reads the permutation `perm[i] = argmax_j w[i, j]` from a permutation matrix and
/// checks that it is one.
pub fn permutation_from_matrix(name: &str, w: &Tensor) -> Result<Vec<usize>, ModelError> {
    let c = w.dim(0)?;
    let rows = w.reshape((c, c))?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let mut perm = Vec::with_capacity(c);
    let mut seen = vec![false; c];
    for (i, row) in rows.iter().enumerate() {
        let ones: Vec<usize> = row
            .iter()
            .enumerate()
            .filter(|(_, v)| **v == 1.0)
            .map(|(j, _)| j)
            .collect();
        let zeros = row.iter().filter(|v| **v == 0.0).count();
        if ones.len() != 1 || zeros != c - 1 || seen[ones[0]] {
            return Err(ModelError::InvalidField {
                field: name.to_string(),
                reason: format!("row {i} is not part of a permutation matrix"),
            });
        }
        seen[ones[0]] = true;
        perm.push(ones[0]);
    }
    Ok(perm)
}

/// Builds the permutation matrix `w[i, perm[i]] = 1` with shape (C, C, 1, 1).
pub fn permutation_matrix(perm: &[usize], device: &Device) -> CandleResult<Tensor> {
    let c = perm.len();
    let mut data = vec![0f32; c * c];
    for (i, &p) in perm.iter().enumerate() {
        data[i * c + p] = 1.0;
    }
    Tensor::from_vec(data, (c, c, 1, 1), device)
}

impl FlowBlock {
    /// Loads a block from anomalib-style names under `w` (`subnet.0.weight`,
    /// `global_scale`, `w_perm`, ...).
    pub fn load(w: &Weights, dims: BlockDims) -> Result<Self, ModelError> {
        let (c, h) = (dims.channels, dims.hidden);
        let (c1, c2) = (dims.passive(), dims.active());
        let perm_w = w.get("w_perm", &[c, c, 1, 1])?;
        let perm_index = permutation_from_matrix(&w.full_name("w_perm"), &perm_w)?;
        let device = perm_w.device().clone();
        let mut inverse = vec![0usize; c];
        for (i, &p) in perm_index.iter().enumerate() {
            inverse[p] = i;
        }
        let to_index = |v: &[usize]| {
            Tensor::from_vec(v.iter().map(|&i| i as u32).collect::<Vec<_>>(), c, &device)
        };
        Ok(Self {
            dims,
            conv0_w: w.get("subnet.0.weight", &[h, c1, 3, 3])?,
            conv0_b: w.get("subnet.0.bias", &[h])?,
            conv1_w: w.get("subnet.1.weight", &[2 * c2, h, 3, 3])?,
            conv1_b: w.get("subnet.1.bias", &[2 * c2])?,
            bn_w: w.get("subnet.2.weight", &[2 * c2])?,
            bn_b: w.get("subnet.2.bias", &[2 * c2])?,
            running: Mutex::new((
                w.get("subnet.2.running_mean", &[2 * c2])?,
                w.get("subnet.2.running_var", &[2 * c2])?,
            )),
            global_scale: w.get("global_scale", &[1, c, 1, 1])?,
            global_offset: w.get("global_offset", &[1, c, 1, 1])?,
            perm: to_index(&perm_index)?,
            perm_inv: to_index(&inverse)?,
            perm_index,
        })
    }

    /// Current BatchNorm running statistics (mean, variance).
    pub fn running_stats(&self) -> (Tensor, Tensor) {
        self.running
            .lock()
            .expect("running statistics lock poisoned")
            .clone()
    }

    /// Returns the channel permutation: output channel `i` is input channel `perm[i]`.
    pub fn permutation(&self) -> &[usize] {
        &self.perm_index
    }

    fn subnet(&self, x1: &Tensor, train: bool) -> CandleResult<Tensor> {
        if !train {
            return self.subnet_eval(x1);
        }
        let h = x1
            .conv2d(&self.conv0_w, 1, 1, 1, 1)?
            .broadcast_add(&self.conv0_b.reshape((1, (), 1, 1))?)?;
        let h = h
            .conv2d(&self.conv1_w, 1, 1, 1, 1)?
            .broadcast_add(&self.conv1_b.reshape((1, (), 1, 1))?)?;
        let h = self.batch_norm_train(&h)?;
        // LeakyReLU with slope 0.2: max(x, 0.2 x).
        h.maximum(&h.affine(0.2, 0.0)?)
    }

    /// Runs the subnet in eval mode, with the BatchNorm's running statistics folded into
    /// the second convolution. The fold happens per call because training moves them.
    fn subnet_eval(&self, x1: &Tensor) -> CandleResult<Tensor> {
        let (mean, var) = self.running_stats();
        let scale = (&self.bn_w / var.affine(1.0, BN_EPS)?.sqrt()?)?;
        let shift = (&self.bn_b - (&mean * &scale)?)?;
        let w1 = if self.conv1_w.device().is_cpu() && self.conv1_w.dtype() == DType::F32 {
            // One pass in place of candle's broadcast product, which hands tensors of
            // this size to candle's own thread pool on every call.
            let scale_values = scale.to_vec1::<f32>()?;
            let mut weights = self.conv1_w.flatten_all()?.to_vec1::<f32>()?;
            let per_channel = weights.len() / scale_values.len().max(1);
            for (channel, s) in weights.chunks_exact_mut(per_channel).zip(&scale_values) {
                channel.iter_mut().for_each(|w| *w *= s);
            }
            Tensor::from_vec(weights, self.conv1_w.shape(), self.conv1_w.device())?
        } else {
            self.conv1_w.broadcast_mul(&scale.reshape(((), 1, 1, 1))?)?
        };
        let b1 = ((&self.conv1_b * &scale)? + shift)?;
        let h = ops::conv_same(x1, &self.conv0_w, &self.conv0_b, 1, Activation::None)?;
        ops::conv_same(&h, &w1, &b1, 1, Activation::LeakyRelu)
    }

    /// BatchNorm with batch statistics over (B, H, W); updates the running statistics
    /// with the unbiased variance, as PyTorch does in training mode.
    fn batch_norm_train(&self, h: &Tensor) -> CandleResult<Tensor> {
        let (b, c, hh, ww) = h.dims4()?;
        let n = (b * hh * ww) as f64;
        // (B, C, H, W) -> (C, B*H*W)
        let flat = h.transpose(0, 1)?.reshape((c, b * hh * ww))?;
        let mean = flat.mean_keepdim(1)?;
        let centred = flat.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(1)?;
        let normed = centred.broadcast_div(&var.affine(1.0, BN_EPS)?.sqrt()?)?;
        let y = normed
            .broadcast_mul(&self.bn_w.reshape((c, 1))?)?
            .broadcast_add(&self.bn_b.reshape((c, 1))?)?;
        {
            let mut running = self
                .running
                .lock()
                .expect("running statistics lock poisoned");
            let mean = mean.detach().flatten_all()?;
            let unbiased = var
                .detach()
                .flatten_all()?
                .affine(n / (n - 1.0).max(1.0), 0.0)?;
            let new_mean = ((&running.0 * (1.0 - BN_MOMENTUM))? + (mean * BN_MOMENTUM)?)?;
            let new_var = ((&running.1 * (1.0 - BN_MOMENTUM))? + (unbiased * BN_MOMENTUM)?)?;
            *running = (new_mean, new_var);
        }
        // (C, B*H*W) -> (B, C, H, W)
        y.reshape((c, b, hh, ww))?.transpose(0, 1)?.contiguous()
    }

    /// Scale `s` and shift `t` for the active half, from the passive half.
    fn scale_shift(&self, x1: &Tensor, train: bool) -> CandleResult<(Tensor, Tensor)> {
        let c2 = self.dims.active();
        let a = self.subnet(x1, train)?.affine(SUBNET_DAMPING, 0.0)?;
        let s = a.narrow(1, 0, c2)?.tanh()?.affine(CLAMP, 0.0)?;
        let t = a.narrow(1, c2, c2)?;
        Ok((s, t))
    }

    /// Forward pass: returns `(y, log|det J|)` with the log-determinant per batch item.
    pub fn forward(&self, x: &Tensor, train: bool) -> CandleResult<(Tensor, Tensor)> {
        let (_, _, h, w) = x.dims4()?;
        let (c1, c2) = (self.dims.passive(), self.dims.active());
        let x1 = x.narrow(1, 0, c1)?;
        let x2 = x.narrow(1, c1, c2)?;
        let (s, t) = self.scale_shift(&x1, train)?;
        let y2 = (x2 * s.exp()?)?.add(&t)?;
        let u = Tensor::cat(&[&x1, &y2], 1)?;
        let g = global_scale_activation(&self.global_scale)?;
        let v = u.broadcast_mul(&g)?.broadcast_add(&self.global_offset)?;
        let y = v.index_select(&self.perm, 1)?;
        let coupling = s.flatten_from(1)?.sum(D::Minus1)?;
        let global = (g.log()?.sum_all()? * (h * w) as f64)?;
        Ok((y, coupling.broadcast_add(&global)?))
    }

    /// Eval-mode forward pass without the log-determinant, for scoring. On the CPU the
    /// coupling, global affine and permutation run as one pass over the values.
    pub fn transform(&self, x: &Tensor) -> CandleResult<Tensor> {
        if !x.device().is_cpu() || x.dtype() != DType::F32 {
            return Ok(self.forward(x, false)?.0);
        }
        let (b, c, h, w) = x.dims4()?;
        let (c1, c2) = (self.dims.passive(), self.dims.active());
        let x = x.contiguous()?;
        let subnet = self.subnet_eval(&x.narrow(1, 0, c1)?)?.contiguous()?;
        let g = global_scale_activation(&self.global_scale)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let offset = self.global_offset.flatten_all()?.to_vec1::<f32>()?;
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let a = subnet.flatten_all()?.to_vec1::<f32>()?;
        let plane = h * w;
        let mut y = vec![0f32; b * c * plane];
        {
            use rayon::prelude::*;
            y.par_chunks_mut(plane.max(1))
                .enumerate()
                .for_each(|(index, out)| {
                    let (item, i) = (index / c, index % c);
                    // Output channel i is channel perm[i] of the coupled values u.
                    let p = self.perm_index[i];
                    let input = |ch: usize| &xs[(item * c + ch) * plane..][..plane];
                    let (scale, shift) = (g[p], offset[p]);
                    if p < c1 {
                        for (o, v) in out.iter_mut().zip(input(p)) {
                            *o = v * scale + shift;
                        }
                    } else {
                        let j = p - c1;
                        let a_s = &a[(item * 2 * c2 + j) * plane..][..plane];
                        let a_t = &a[(item * 2 * c2 + c2 + j) * plane..][..plane];
                        for (((o, v), s), t) in out.iter_mut().zip(input(p)).zip(a_s).zip(a_t) {
                            let s = CLAMP as f32 * (SUBNET_DAMPING as f32 * s).tanh();
                            let coupled = v * s.exp() + SUBNET_DAMPING as f32 * t;
                            *o = coupled * scale + shift;
                        }
                    }
                });
        }
        Tensor::from_vec(y, (b, c, h, w), x.device())
    }

    /// Inverse pass (eval-mode BatchNorm): returns `(x, log|det J^-1|)`.
    pub fn inverse(&self, y: &Tensor) -> CandleResult<(Tensor, Tensor)> {
        let (_, _, h, w) = y.dims4()?;
        let (c1, c2) = (self.dims.passive(), self.dims.active());
        let g = global_scale_activation(&self.global_scale)?;
        let u = y
            .index_select(&self.perm_inv, 1)?
            .broadcast_sub(&self.global_offset)?
            .broadcast_div(&g)?;
        let x1 = u.narrow(1, 0, c1)?;
        let y2 = u.narrow(1, c1, c2)?;
        let (s, t) = self.scale_shift(&x1, false)?;
        let x2 = ((y2 - t)? * s.neg()?.exp()?)?;
        let x = Tensor::cat(&[&x1, &x2], 1)?;
        let coupling = s.flatten_from(1)?.sum(D::Minus1)?;
        let global = (g.log()?.sum_all()? * (h * w) as f64)?;
        Ok((x, coupling.broadcast_add(&global)?.neg()?))
    }
}

/// A sequence of coupling blocks (FrEIA's `SequenceINN`).
#[derive(Debug)]
pub struct Flow {
    pub blocks: Vec<FlowBlock>,
}

impl Flow {
    /// Loads `steps` blocks from `module_list.{k}` under `w`.
    pub fn load(w: &Weights, steps: usize, dims: BlockDims) -> Result<Self, ModelError> {
        let blocks = (0..steps)
            .map(|k| FlowBlock::load(&w.pp(format!("module_list.{k}")), dims))
            .collect::<Result<_, _>>()?;
        Ok(Self { blocks })
    }

    /// Returns `z` and the summed log-determinant, shape (B,).
    pub fn forward(&self, x: &Tensor, train: bool) -> CandleResult<(Tensor, Tensor)> {
        let b = x.dim(0)?;
        let mut z = x.clone();
        let mut logdet = Tensor::zeros(b, x.dtype(), x.device())?;
        for block in &self.blocks {
            let (y, ld) = block.forward(&z, train)?;
            z = y;
            logdet = (logdet + ld)?;
        }
        Ok((z, logdet))
    }

    /// Returns `z` in eval mode, without the log-determinant.
    pub fn transform(&self, x: &Tensor) -> CandleResult<Tensor> {
        let mut z = x.clone();
        for block in &self.blocks {
            z = block.transform(&z)?;
        }
        Ok(z)
    }

    /// Maps `z` back to the flow input.
    pub fn inverse(&self, z: &Tensor) -> CandleResult<(Tensor, Tensor)> {
        let b = z.dim(0)?;
        let mut x = z.clone();
        let mut logdet = Tensor::zeros(b, z.dtype(), z.device())?;
        for block in self.blocks.iter().rev() {
            let (y, ld) = block.inverse(&x)?;
            x = y;
            logdet = (logdet + ld)?;
        }
        Ok((x, logdet))
    }
}

/// Negative log-likelihood per element under N(0, I), without the `ln(2 pi)` constant:
/// `mean_b(0.5 * sum(z_b^2) - logdet_b) / (C * H * W)`.
pub fn nll_loss(z: &Tensor, logdet: &Tensor) -> CandleResult<Tensor> {
    let (_, c, h, w) = z.dims4()?;
    let sq = z.sqr()?.flatten_from(1)?.sum(D::Minus1)?;
    let per_item = ((sq * 0.5)? - logdet)?;
    per_item.mean_all()? / (c * h * w) as f64
}

/// Fresh, untrained parameters for one block, named as [`FlowBlock::load`] expects.
/// Convolutions use PyTorch's default init (uniform in `+-1/sqrt(fan_in)`), BatchNorm
/// starts at identity and the global affine at `g = 1`, offset 0.
pub fn init_block_tensors(
    dims: BlockDims,
    perm: &[usize],
    rng: &mut impl rand::Rng,
    dtype: DType,
    device: &Device,
) -> CandleResult<Vec<(String, Tensor)>> {
    let (c, h) = (dims.channels, dims.hidden);
    let (c1, c2) = (dims.passive(), dims.active());
    let mut uniform = |shape: &[usize], fan_in: usize| -> CandleResult<Tensor> {
        uniform(rng, 1.0 / (fan_in as f64).sqrt(), shape, dtype, device)
    };
    let full = |value: f64, shape: &[usize]| -> CandleResult<Tensor> {
        Tensor::ones(shape, dtype, device)?.affine(value, 0.0)
    };
    Ok(vec![
        ("subnet.0.weight".into(), uniform(&[h, c1, 3, 3], c1 * 9)?),
        ("subnet.0.bias".into(), uniform(&[h], c1 * 9)?),
        (
            "subnet.1.weight".into(),
            uniform(&[2 * c2, h, 3, 3], h * 9)?,
        ),
        ("subnet.1.bias".into(), uniform(&[2 * c2], h * 9)?),
        ("subnet.2.weight".into(), full(1.0, &[2 * c2])?),
        ("subnet.2.bias".into(), full(0.0, &[2 * c2])?),
        ("subnet.2.running_mean".into(), full(0.0, &[2 * c2])?),
        ("subnet.2.running_var".into(), full(1.0, &[2 * c2])?),
        (
            "global_scale".into(),
            full(GLOBAL_SCALE_INIT, &[1, c, 1, 1])?,
        ),
        ("global_offset".into(), full(0.0, &[1, c, 1, 1])?),
        (
            "w_perm".into(),
            permutation_matrix(perm, device)?.to_dtype(dtype)?,
        ),
    ])
}

/// A tensor drawn uniformly from `[-bound, bound)` with a caller-seeded generator, so
/// that training runs are reproducible (candle's CPU generator cannot be seeded).
pub fn uniform(
    rng: &mut impl rand::Rng,
    bound: f64,
    shape: &[usize],
    dtype: DType,
    device: &Device,
) -> CandleResult<Tensor> {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|_| rng.random_range(-bound..bound) as f32)
        .collect();
    Tensor::from_vec(data, shape, device)?.to_dtype(dtype)
}

/// Row `i` of the batch, as a (1, C, H, W) tensor.
pub fn batch_item(x: &Tensor, i: usize) -> CandleResult<Tensor> {
    x.i(i)?.unsqueeze(0)
}
