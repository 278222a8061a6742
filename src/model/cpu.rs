// SPDX-License-Identifier: MIT OR Apache-2.0
//! CPU kernels for the frozen backbone, as candle custom ops (inference only, f32,
//! contiguous NCHW input).
//!
//! candle 0.11's broadcast binary ops and its `conv2d` are slow for these shapes. On a
//! 96x128x128 map, a broadcast bias add plus the two-pass clamp of ReLU6 took 22 ms,
//! against 1.8 ms for the 1x1 convolution's matrix product itself. The stem's 3x3/s2
//! `conv2d` took 25 ms. These kernels do the same work in one pass per plane.

use std::cell::RefCell;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape};
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

/// Convolution as one matrix product per image, `act(W cols + bias [+ residual])`.
///
/// `W` is the (O, C, k, k) weight read as an (O, C*k*k) matrix and `cols` the unfolded
/// input, or the input itself for a 1x1 stride-1 convolution. The output starts as the
/// bias (plus the residual), the product accumulates into it, and the activation runs
/// in place, so no zeroed or intermediate tensor is made. As a [`CustomOp2`] the inputs
/// are (x, weight). As a [`CustomOp3`] they are (x, weight, residual) and the activation
/// follows the residual addition, as at the end of a residual block.
#[derive(Debug, Clone)]
pub struct GemmConv {
    pub bias: Vec<f32>,
    pub kernel: usize,
    pub stride: usize,
    pub padding: Padding,
    pub activation: Activation,
}

thread_local! {
    /// Column matrix of the last im2col on this thread, kept so that steady-state
    /// inference does not allocate it again. It only grows.
    static COLUMNS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl GemmConv {
    const NAME: &'static str = "gemm-conv";

    fn run(
        &self,
        (x, x_layout): (&CpuStorage, &Layout),
        (weight, weight_layout): (&CpuStorage, &Layout),
        residual: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = x_layout.shape().dims4()?;
        let (out_c, in_c, kh, kw) = weight_layout.shape().dims4()?;
        let (k, s) = (self.kernel, self.stride);
        if in_c != c || (kh, kw) != (k, k) || out_c != self.bias.len() {
            candle_core::bail!(
                "{}: weight {:?} does not match {c} input channels, kernel {k} and {} biases",
                Self::NAME,
                weight_layout.shape(),
                self.bias.len()
            );
        }
        let x = input(Self::NAME, x, x_layout)?;
        let weight = input(Self::NAME, weight, weight_layout)?;
        let oh = self.padding.output_size(h, k, s);
        let ow = self.padding.output_size(w, k, s);
        let out_shape = Shape::from((b, out_c, oh, ow));
        let residual = match residual {
            Some((storage, layout)) if layout.shape() == &out_shape => {
                Some(input(Self::NAME, storage, layout)?)
            }
            Some((_, layout)) => candle_core::bail!(
                "{}: residual {:?} does not match the output {out_shape:?}",
                Self::NAME,
                layout.shape()
            ),
            None => None,
        };
        let plane = oh * ow;
        let mut out = self.initial_output(b, plane, residual);
        if plane > 0 {
            let depth = c * k * k;
            let direct = k == 1 && s == 1;
            COLUMNS.with_borrow_mut(|columns| {
                for (image, dst) in x
                    .chunks_exact(c * h * w)
                    .zip(out.chunks_exact_mut(out_c * plane))
                {
                    let cols: &[f32] = if direct {
                        image
                    } else {
                        if columns.len() < depth * plane {
                            columns.resize(depth * plane, 0.0);
                        }
                        let cols = &mut columns[..depth * plane];
                        im2col(image, (c, h, w), k, s, self.padding, cols);
                        cols
                    };
                    multiply_add(weight, cols, dst, (out_c, depth, plane));
                }
            });
        }
        if self.activation != Activation::None {
            out.par_chunks_mut(plane.max(1))
                .for_each(|p| self.activation.apply_slice(p));
        }
        Ok((CpuStorage::F32(out), out_shape))
    }

    /// Returns `b` images of (O, plane) values, each set to its channel's bias plus the
    /// residual.
    fn initial_output(&self, b: usize, plane: usize, residual: Option<&[f32]>) -> Vec<f32> {
        let channels = self.bias.len();
        let n = b * channels * plane;
        let mut out = Vec::with_capacity(n);
        out.spare_capacity_mut()[..n]
            .par_chunks_mut(plane.max(1))
            .enumerate()
            .for_each(|(index, dst)| {
                let bias = self.bias[index % channels];
                match residual {
                    Some(r) => {
                        let r = &r[index * plane..(index + 1) * plane];
                        for (d, v) in dst.iter_mut().zip(r) {
                            d.write(v + bias);
                        }
                    }
                    None => {
                        for d in dst.iter_mut() {
                            d.write(bias);
                        }
                    }
                }
            });
        // SAFETY: the chunks above cover `..n` and write every element of each.
        unsafe { out.set_len(n) };
        out
    }
}

/// `dst += lhs x rhs` for row-major matrices lhs (m, k), rhs (k, n) and dst (m, n).
fn multiply_add(lhs: &[f32], rhs: &[f32], dst: &mut [f32], (m, k, n): (usize, usize, usize)) {
    assert!(lhs.len() >= m * k);
    assert!(rhs.len() >= k * n);
    assert!(dst.len() >= m * n);
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above keep every access inside the three slices, whose
    // strides describe the row-major layouts, and `dst` does not overlap the inputs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            true,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            1,
            n as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

impl CustomOp2 for GemmConv {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run((s1, l1), (s2, l2), None)
    }
}

impl CustomOp3 for GemmConv {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run((s1, l1), (s2, l2), Some((s3, l3)))
    }
}

/// Unfolds the k x k patches of one image (C, H, W) into the rows of `cols`
/// (C*k*k, OH*OW), row order (c, ky, kx) as PyTorch's weight layout, with zeros where a
/// patch overlaps the padding. Every element of `cols` is written.
fn im2col(
    x: &[f32],
    (c, h, w): (usize, usize, usize),
    k: usize,
    s: usize,
    padding: Padding,
    cols: &mut [f32],
) {
    let top = padding.before(h, k, s);
    let left = padding.before(w, k, s);
    let oh = padding.output_size(h, k, s);
    let ow = padding.output_size(w, k, s);
    assert_eq!(cols.len(), c * k * k * oh * ow);
    cols.par_chunks_mut(oh * ow)
        .enumerate()
        .for_each(|(row, dst)| {
            let kx = row % k;
            let ky = (row / k) % k;
            let channel = &x[(row / (k * k)) * h * w..][..h * w];
            // Output columns `first..end` read inside the row: 0 <= ox*s + kx - left < w.
            let first = left.saturating_sub(kx).div_ceil(s).min(ow);
            let end = if w + left > kx {
                ((w + left - kx - 1) / s + 1).min(ow)
            } else {
                0
            }
            .max(first);
            for (oy, out_row) in dst.chunks_exact_mut(ow).enumerate() {
                let iy = (oy * s + ky).wrapping_sub(top);
                if iy >= h {
                    out_row.fill(0.0);
                    continue;
                }
                out_row[..first].fill(0.0);
                out_row[end..].fill(0.0);
                if end == first {
                    continue;
                }
                let line = &channel[iy * w..(iy + 1) * w];
                let taps = &line[first * s + kx - left..];
                let inside = &mut out_row[first..end];
                if s == 1 {
                    inside.copy_from_slice(&taps[..inside.len()]);
                } else {
                    for (o, v) in inside.iter_mut().zip(taps.iter().step_by(s)) {
                        *o = *v;
                    }
                }
            }
        });
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
        let n = b * c * oh * ow;
        let mut out = Vec::with_capacity(n);
        out.spare_capacity_mut()[..n]
            .par_chunks_mut((oh * ow).max(1))
            .enumerate()
            .for_each_init(
                || vec![0f32; ph * pw],
                |padded, (plane, dst)| {
                    // Copying the plane into a zero border lets the inner loops run
                    // without bounds tests, and the copy costs far less than the k*k
                    // passes over it.
                    let x = &src[plane * h * w..(plane + 1) * h * w];
                    for (y, row) in x.chunks_exact(w).enumerate() {
                        padded[(y + top) * pw + left..(y + top) * pw + left + w]
                            .copy_from_slice(row);
                    }
                    let ch = plane % c;
                    let kw = &self.weight[ch * k * k..(ch + 1) * k * k];
                    let bias = self.bias[ch];
                    for (oy, out_row) in dst.chunks_exact_mut(ow).enumerate() {
                        for o in out_row.iter_mut() {
                            o.write(bias);
                        }
                        // SAFETY: every element of the row was written just above, and
                        // `MaybeUninit<f32>` has the layout of `f32`.
                        let out_row = unsafe {
                            std::slice::from_raw_parts_mut(out_row.as_mut_ptr().cast::<f32>(), ow)
                        };
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
                        self.activation.apply_slice(out_row);
                    }
                },
            );
        // SAFETY: the planes above cover `..n` and write every element of each row.
        unsafe { out.set_len(n) };
        Ok((CpuStorage::F32(out), Shape::from((b, c, oh, ow))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads tap (ky, kx) of output (oy, ox) one index at a time, straight from the definition.
    fn im2col_reference(
        x: &[f32],
        (c, h, w): (usize, usize, usize),
        k: usize,
        s: usize,
        padding: Padding,
    ) -> Vec<f32> {
        let top = padding.before(h, k, s) as isize;
        let left = padding.before(w, k, s) as isize;
        let oh = padding.output_size(h, k, s);
        let ow = padding.output_size(w, k, s);
        let mut cols = Vec::new();
        for ch in 0..c {
            for ky in 0..k {
                for kx in 0..k {
                    for oy in 0..oh {
                        for ox in 0..ow {
                            let iy = (oy * s + ky) as isize - top;
                            let ix = (ox * s + kx) as isize - left;
                            let inside =
                                (0..h as isize).contains(&iy) && (0..w as isize).contains(&ix);
                            cols.push(if inside {
                                x[ch * h * w + iy as usize * w + ix as usize]
                            } else {
                                0.0
                            });
                        }
                    }
                }
            }
        }
        cols
    }

    #[test]
    fn im2col_matches_reference() {
        let cases = [
            (9usize, 9usize, 3usize, 1usize),
            (10, 7, 3, 2),
            (11, 13, 5, 2),
            (8, 5, 5, 1),
            (1, 1, 7, 2),
            (2, 3, 7, 2),
            (5, 4, 1, 2),
        ];
        for (h, w, k, s) in cases {
            for padding in [Padding::Same, Padding::Symmetric] {
                let c = 3;
                let x: Vec<f32> = (0..c * h * w).map(|i| i as f32 + 1.0).collect();
                let expected = im2col_reference(&x, (c, h, w), k, s, padding);
                // NaN everywhere first, so that an element the kernel skips shows up.
                let mut cols = vec![f32::NAN; expected.len()];
                im2col(&x, (c, h, w), k, s, padding, &mut cols);
                assert_eq!(cols, expected, "{h}x{w} k {k} s {s} {padding:?}");
            }
        }
    }
}
