// SPDX-License-Identifier: MIT OR Apache-2.0
//! CPU kernels for the frozen backbone, as candle custom ops (inference only, f32,
//! contiguous NCHW input).
//!
//! candle 0.11's broadcast binary ops and its `conv2d` are slow for these shapes. On a
//! 96x128x128 map, a broadcast bias add plus the two-pass clamp of ReLU6 took 22 ms,
//! against 1.8 ms for the 1x1 convolution's matrix product itself. The stem's 3x3/s2
//! `conv2d` took 25 ms. These kernels do the same work in one pass per plane.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape};
use rayon::prelude::*;

use super::ops::{Activation, Padding, same_padding};

/// Returns the contiguous f32 data of an op's input.
fn input<'a>(op: &str, storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    match storage {
        CpuStorage::F32(v) => match layout.contiguous_offsets() {
            Some((start, end)) => Ok(&v[start..end]),
            None => candle_core::bail!("{op} needs a contiguous input"),
        },
        other => candle_core::bail!("{op} supports f32 only, got {:?}", other.dtype()),
    }
}

/// `act(x + bias[c])` over an NCHW tensor.
#[derive(Debug, Clone)]
pub struct BiasActivation {
    pub bias: Vec<f32>,
    pub activation: Activation,
}

impl CustomOp1 for BiasActivation {
    fn name(&self) -> &'static str {
        "bias-activation"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, c, h, w) = layout.shape().dims4()?;
        let src = input(self.name(), storage, layout)?;
        if c != self.bias.len() {
            candle_core::bail!(
                "bias-activation expects {} channels, got {c}",
                self.bias.len()
            );
        }
        let mut out = vec![0f32; src.len()];
        out.par_chunks_mut(h * w)
            .zip(src.par_chunks(h * w))
            .enumerate()
            .for_each(|(plane, (dst, x))| {
                let bias = self.bias[plane % c];
                for (d, v) in dst.iter_mut().zip(x) {
                    *d = self.activation.apply_scalar(v + bias);
                }
            });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// `act(x + bias[c] + residual)` over two NCHW tensors of the same shape: the end of a
/// residual block, where candle's own addition spins in its thread barrier.
#[derive(Debug, Clone)]
pub struct BiasResidual {
    pub bias: Vec<f32>,
    pub activation: Activation,
}

impl CustomOp2 for BiasResidual {
    fn name(&self) -> &'static str {
        "bias-residual"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, c, h, w) = l1.shape().dims4()?;
        if l1.shape() != l2.shape() {
            candle_core::bail!(
                "bias-residual shapes differ: {:?} and {:?}",
                l1.shape(),
                l2.shape()
            );
        }
        let x = input(self.name(), s1, l1)?;
        let residual = input(self.name(), s2, l2)?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(h * w)
            .zip(x.par_chunks(h * w).zip(residual.par_chunks(h * w)))
            .enumerate()
            .for_each(|(plane, (dst, (x, r)))| {
                let bias = self.bias[plane % c];
                for ((d, a), b) in dst.iter_mut().zip(x).zip(r) {
                    *d = self.activation.apply_scalar(a + bias + b);
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Depthwise "SAME" convolution with bias and activation.
#[derive(Debug, Clone)]
pub struct DepthwiseSame {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub kernel: usize,
    pub stride: usize,
    pub activation: Activation,
}

impl CustomOp1 for DepthwiseSame {
    fn name(&self) -> &'static str {
        "depthwise-conv-same"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = layout.shape().dims4()?;
        let src = input(self.name(), storage, layout)?;
        if c != self.bias.len() {
            candle_core::bail!(
                "depthwise convolution expects {} channels, got {c}",
                self.bias.len()
            );
        }
        let (k, s) = (self.kernel, self.stride);
        let (top, bottom) = same_padding(h, k, s);
        let (left, right) = same_padding(w, k, s);
        let (ph, pw) = (h + top + bottom, w + left + right);
        let (oh, ow) = (h.div_ceil(s), w.div_ceil(s));
        let mut out = vec![0f32; b * c * oh * ow];
        out.par_chunks_mut(oh * ow).enumerate().for_each_init(
            || vec![0f32; ph * pw],
            |padded, (plane, dst)| {
                // Copying the plane into a zero border lets the inner loops run without
                // bounds tests, and the copy costs far less than the k*k passes over it.
                let x = &src[plane * h * w..(plane + 1) * h * w];
                for (y, row) in x.chunks_exact(w).enumerate() {
                    padded[(y + top) * pw + left..(y + top) * pw + left + w].copy_from_slice(row);
                }
                let ch = plane % c;
                let kw = &self.weight[ch * k * k..(ch + 1) * k * k];
                let bias = self.bias[ch];
                for (oy, out_row) in dst.chunks_exact_mut(ow).enumerate() {
                    out_row.fill(bias);
                    for ky in 0..k {
                        let row = &padded[(oy * s + ky) * pw..(oy * s + ky + 1) * pw];
                        for kx in 0..k {
                            let weight = kw[ky * k + kx];
                            let taps = &row[kx..];
                            if s == 1 {
                                for (o, v) in out_row.iter_mut().zip(taps) {
                                    *o += weight * v;
                                }
                            } else {
                                for (o, v) in out_row.iter_mut().zip(taps.iter().step_by(s)) {
                                    *o += weight * v;
                                }
                            }
                        }
                    }
                    for o in out_row.iter_mut() {
                        *o = self.activation.apply_scalar(*o);
                    }
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((b, c, oh, ow))))
    }
}

/// Unfolds zero-padded k x k patches into columns: (B, C, H, W) ->
/// (B, C*k*k, OH*OW), row order (c, ky, kx) as PyTorch's weight layout.
#[derive(Debug, Clone)]
pub struct Im2Col {
    pub kernel: usize,
    pub stride: usize,
    pub padding: Padding,
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = layout.shape().dims4()?;
        let src = input(self.name(), storage, layout)?;
        let (k, s) = (self.kernel, self.stride);
        let top = self.padding.before(h, k, s);
        let left = self.padding.before(w, k, s);
        let oh = self.padding.output_size(h, k, s);
        let ow = self.padding.output_size(w, k, s);
        let mut out = vec![0f32; b * c * k * k * oh * ow];
        out.par_chunks_mut(oh * ow)
            .enumerate()
            .for_each(|(row, dst)| {
                // Row `row` of the column matrix is (batch, channel, ky, kx).
                let kx = row % k;
                let ky = (row / k) % k;
                let plane = row / (k * k);
                let x = &src[plane * h * w..(plane + 1) * h * w];
                for oy in 0..oh {
                    let iy = (oy * s + ky) as isize - top as isize;
                    if iy < 0 || iy >= h as isize {
                        continue;
                    }
                    let line = &x[iy as usize * w..(iy as usize + 1) * w];
                    for ox in 0..ow {
                        let ix = (ox * s + kx) as isize - left as isize;
                        if ix >= 0 && ix < w as isize {
                            dst[oy * ow + ox] = line[ix as usize];
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((b, c * k * k, oh * ow))))
    }
}
