// SPDX-License-Identifier: MIT OR Apache-2.0
//! CPU kernels for the frozen backbone, as candle custom ops (inference only, f32,
//! contiguous NCHW input).
//!
//! candle 0.11's broadcast binary ops and its `conv2d` are slow for these shapes. On a
//! 96x128x128 map, a broadcast bias add plus the two-pass clamp of ReLU6 took 22 ms,
//! against 1.8 ms for the 1x1 convolution's matrix product itself. The stem's 3x3/s2
//! `conv2d` took 25 ms. These kernels do the same work in one pass per plane.

use std::cell::Cell;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape};
use rayon::prelude::*;

use super::ops::{Activation, Padding, same_padding};
use crate::imageops::{ResizeMode, resize_taps};

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
    static COLUMNS: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
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
            // The buffer leaves the thread-local while in use: a worker that waits for
            // the parallel im2col or product may meanwhile run another convolution on
            // the same thread, which then starts from an empty buffer.
            let mut columns = COLUMNS.take();
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
            COLUMNS.set(columns);
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
        if c != self.bias.len() || self.weight.len() != c * self.kernel * self.kernel {
            candle_core::bail!(
                "depthwise convolution expects {} channels and {} weights, got {c} channels",
                self.bias.len(),
                self.weight.len()
            );
        }
        let geometry = DepthwiseGeometry::new((h, w), self.kernel, self.stride);
        let (oh, ow) = (geometry.oh, geometry.ow);
        let n = b * c * oh * ow;
        let mut out = Vec::with_capacity(n);
        out.spare_capacity_mut()[..n]
            .par_chunks_mut((oh * ow).max(1))
            .enumerate()
            .for_each_init(
                || vec![0f32; geometry.buffer_len()],
                |phases, (plane, dst)| {
                    let ch = plane % c;
                    let k2 = self.kernel * self.kernel;
                    depthwise_plane(
                        &geometry,
                        &src[plane * h * w..(plane + 1) * h * w],
                        &self.weight[ch * k2..(ch + 1) * k2],
                        self.bias[ch],
                        self.activation,
                        phases,
                        dst,
                    );
                },
            );
        // SAFETY: `depthwise_plane` writes every element of each plane, and the planes
        // cover `..n`.
        unsafe { out.set_len(n) };
        Ok((CpuStorage::F32(out), Shape::from((b, c, oh, ow))))
    }
}

/// Output columns computed together, held in one AVX-512 register (two with AVX2).
const LANES: usize = 16;
/// Taps of the largest depthwise kernel (7 x 7).
const MAX_TAPS: usize = 49;

/// Sizes of one depthwise "SAME" convolution of an (h, w) plane.
///
/// The kernel reads the zero-padded input through `stride` phase planes: phase `p`
/// contains padded columns `p, p + stride, p + 2 stride, ...`, so that tap `kx` of
/// consecutive outputs reads consecutive values of phase `kx % stride`, starting at
/// column `kx / stride`. Phase rows are long enough for whole blocks of [`LANES`]
/// outputs, with zeros past the padded row.
#[derive(Debug, Clone, Copy)]
struct DepthwiseGeometry {
    h: usize,
    w: usize,
    kernel: usize,
    stride: usize,
    top: usize,
    left: usize,
    oh: usize,
    ow: usize,
    /// Padded input rows.
    rows: usize,
    /// Values per phase row.
    phase_width: usize,
    /// Offset in the phase planes of tap `ky * kernel + kx` of output (0, 0), kept so
    /// that the inner loop does no division by the stride.
    offsets: [usize; MAX_TAPS],
}

impl DepthwiseGeometry {
    fn new((h, w): (usize, usize), kernel: usize, stride: usize) -> Self {
        let (top, bottom) = same_padding(h, kernel, stride);
        let (left, _) = same_padding(w, kernel, stride);
        let (oh, ow) = (h.div_ceil(stride), w.div_ceil(stride));
        let blocks = ow.div_ceil(LANES).max(1);
        let rows = h + top + bottom;
        let phase_width = blocks * LANES + (kernel - 1) / stride;
        assert!(
            kernel * kernel <= MAX_TAPS,
            "depthwise kernel {kernel} is larger than 7"
        );
        let mut offsets = [0; MAX_TAPS];
        for (t, offset) in offsets[..kernel * kernel].iter_mut().enumerate() {
            let (ky, kx) = (t / kernel, t % kernel);
            *offset = ((kx % stride) * rows + ky) * phase_width + kx / stride;
        }
        Self {
            h,
            w,
            kernel,
            stride,
            top,
            left,
            oh,
            ow,
            rows,
            phase_width,
            offsets,
        }
    }

    fn buffer_len(&self) -> usize {
        self.stride * self.rows * self.phase_width
    }
}

/// Convolves one plane: splits the padded input into phases, then computes each block
/// of outputs over all taps in registers and writes it once, activation applied.
fn depthwise_plane(
    g: &DepthwiseGeometry,
    x: &[f32],
    weight: &[f32],
    bias: f32,
    activation: Activation,
    phases: &mut [f32],
    dst: &mut [std::mem::MaybeUninit<f32>],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the features the function is compiled for.
            unsafe { depthwise_plane_avx512(g, x, weight, bias, activation, phases, dst) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: as above.
            unsafe { depthwise_plane_avx2(g, x, weight, bias, activation, phases, dst) };
            return;
        }
    }
    depthwise_plane_body::<false>(g, x, weight, bias, activation, phases, dst);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
fn depthwise_plane_avx512(
    g: &DepthwiseGeometry,
    x: &[f32],
    weight: &[f32],
    bias: f32,
    activation: Activation,
    phases: &mut [f32],
    dst: &mut [std::mem::MaybeUninit<f32>],
) {
    depthwise_plane_body::<true>(g, x, weight, bias, activation, phases, dst);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn depthwise_plane_avx2(
    g: &DepthwiseGeometry,
    x: &[f32],
    weight: &[f32],
    bias: f32,
    activation: Activation,
    phases: &mut [f32],
    dst: &mut [std::mem::MaybeUninit<f32>],
) {
    depthwise_plane_body::<true>(g, x, weight, bias, activation, phases, dst);
}

/// Convolves one plane. The body is inlined into each CPU-feature variant so that the
/// compiler vectorises it for that instruction set. `FMA` selects fused multiply-adds, which
/// are only fast where the CPU has them.
#[inline(always)]
fn depthwise_plane_body<const FMA: bool>(
    g: &DepthwiseGeometry,
    x: &[f32],
    weight: &[f32],
    bias: f32,
    activation: Activation,
    phases: &mut [f32],
    dst: &mut [std::mem::MaybeUninit<f32>],
) {
    let (k, s, pw) = (g.kernel, g.stride, g.phase_width);
    let phases = &mut phases[..g.buffer_len()];
    // Every value of the phase planes is written: input where the padded column is
    // inside the image, zero elsewhere.
    for (index, row) in phases.chunks_exact_mut(pw).enumerate() {
        let (phase, y) = (index / g.rows, index % g.rows);
        let iy = y.wrapping_sub(g.top);
        if iy >= g.h {
            row.fill(0.0);
            continue;
        }
        let line = &x[iy * g.w..(iy + 1) * g.w];
        // Phase columns `first..end` hold input columns: 0 <= j s + phase - left < w.
        let first = g.left.saturating_sub(phase).div_ceil(s).min(pw);
        let end = (g.w + g.left)
            .saturating_sub(phase)
            .div_ceil(s)
            .clamp(first, pw);
        row[..first].fill(0.0);
        row[end..].fill(0.0);
        if first == end {
            continue;
        }
        let inside = &mut row[first..end];
        let taps = &line[first * s + phase - g.left..];
        if s == 1 {
            inside.copy_from_slice(&taps[..inside.len()]);
        } else {
            for (v, t) in inside.iter_mut().zip(taps.iter().step_by(s)) {
                *v = *t;
            }
        }
    }
    let phases = &*phases;
    let (offsets, weight) = (&g.offsets[..k * k], &weight[..k * k]);
    assert_eq!(dst.len(), g.oh * g.ow);
    // Rows go in groups of four: their sums are independent, so four chains of
    // multiply-adds are in flight instead of one waiting on the last.
    let mut rows = dst.chunks_exact_mut(g.ow * 4);
    let mut oy = 0;
    for group in &mut rows {
        depthwise_rows::<4, FMA>(g, phases, offsets, weight, bias, activation, oy, group);
        oy += 4;
    }
    for row in rows.into_remainder().chunks_exact_mut(g.ow) {
        depthwise_rows::<1, FMA>(g, phases, offsets, weight, bias, activation, oy, row);
        oy += 1;
    }
}

/// Computes output rows `first..first + R` of a plane from its phase planes.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn depthwise_rows<const R: usize, const FMA: bool>(
    g: &DepthwiseGeometry,
    phases: &[f32],
    offsets: &[usize],
    weight: &[f32],
    bias: f32,
    activation: Activation,
    first: usize,
    dst: &mut [std::mem::MaybeUninit<f32>],
) {
    let pw = g.phase_width;
    for x0 in (0..g.ow).step_by(LANES) {
        let mut acc = [[bias; LANES]; R];
        for (&offset, &wt) in offsets.iter().zip(weight) {
            for (r, acc) in acc.iter_mut().enumerate() {
                let start = (first + r) * g.stride * pw + x0 + offset;
                let taps: &[f32; LANES] = phases[start..start + LANES]
                    .try_into()
                    .expect("phase rows hold whole blocks");
                for (a, v) in acc.iter_mut().zip(taps) {
                    *a = if FMA { v.mul_add(wt, *a) } else { *a + wt * v };
                }
            }
        }
        let n = LANES.min(g.ow - x0);
        for (r, acc) in acc.iter_mut().enumerate() {
            activation.apply_slice(acc);
            let out = &mut dst[r * g.ow + x0..r * g.ow + x0 + n];
            for (o, a) in out.iter_mut().zip(acc.iter()) {
                o.write(*a);
            }
        }
    }
}

/// Pools and resizes backbone feature maps onto one grid and concatenates them along
/// the channels: `AvgPool2d(kernel, stride 1, padding kernel / 2)` with the padding
/// counted, then plain bilinear resizing (`align_corners=False`) to `grid`, as
/// [`super::ops::avg_pool_same`] and [`super::ops::resize`] do, in one pass per plane.
///
/// `maps` are contiguous (B, C_i, H_i, W_i) values with the same B; the result is
/// (B, sum C_i, grid.0, grid.1).
pub fn pool_resize_concat(
    maps: &[(&[f32], [usize; 4])],
    kernel: usize,
    (gh, gw): (usize, usize),
) -> Vec<f32> {
    let batch = maps.first().map_or(0, |(_, dims)| dims[0]);
    let channels: usize = maps.iter().map(|(_, dims)| dims[1]).sum();
    let pad = kernel / 2;
    // Per map: the pooled size and the resize taps from it to the grid.
    let plans: Vec<_> = maps
        .iter()
        .map(|(data, [b, c, h, w])| {
            assert_eq!(*b, batch, "feature maps with different batch sizes");
            assert_eq!(data.len(), b * c * h * w, "feature map size");
            let (ph, pw) = (h + 2 * pad + 1 - kernel, w + 2 * pad + 1 - kernel);
            let taps_h = resize_taps(ph, gh, ResizeMode::Bilinear);
            let taps_w = resize_taps(pw, gw, ResizeMode::Bilinear);
            (ph, pw, taps_h, taps_w)
        })
        .collect();
    // For output channel `i` of the concatenation: its map and the channel in it.
    let sources: Vec<(usize, usize)> = maps
        .iter()
        .enumerate()
        .flat_map(|(m, (_, dims))| (0..dims[1]).map(move |c| (m, c)))
        .collect();
    let plane = gh * gw;
    let n = batch * channels * plane;
    let mut out = Vec::with_capacity(n);
    out.spare_capacity_mut()[..n]
        .par_chunks_mut(plane.max(1))
        .enumerate()
        .for_each_init(
            || (Vec::new(), Vec::new(), vec![0f32; gw]),
            |(pooled, rows, line_out), (index, dst)| {
                let (b, i) = (index / channels, index % channels);
                let (m, c) = sources[i];
                let (data, [_, cm, h, w]) = maps[m];
                let (ph, pw, taps_h, taps_w) = &plans[m];
                let src = &data[(b * cm + c) * h * w..][..h * w];
                avg_pool_plane(src, (h, w), kernel, pad, (*ph, *pw), pooled);
                // Along each row to the grid's width, then down the columns.
                rows.clear();
                rows.resize(ph * gw, 0.0);
                for (y, row) in rows.chunks_exact_mut(gw).enumerate() {
                    let line = &pooled[y * pw..(y + 1) * pw];
                    for (r, taps) in row.iter_mut().zip(taps_w) {
                        let window = &line[taps.start..taps.start + taps.weights.len()];
                        *r = window.iter().zip(&taps.weights).map(|(a, t)| a * t).sum();
                    }
                }
                for (out_row, taps) in dst.chunks_exact_mut(gw).zip(taps_h) {
                    line_out.fill(0.0);
                    for (k, t) in taps.weights.iter().enumerate() {
                        let row = &rows[(taps.start + k) * gw..(taps.start + k + 1) * gw];
                        for (o, v) in line_out.iter_mut().zip(row) {
                            *o += t * v;
                        }
                    }
                    for (o, v) in out_row.iter_mut().zip(line_out.iter()) {
                        o.write(*v);
                    }
                }
            },
        );
    // SAFETY: the planes cover `..n`, and each writes all of its rows.
    unsafe { out.set_len(n) };
    out
}

/// Average of each `kernel` x `kernel` window of a zero-padded plane, the zeros
/// counted, into `pooled` (ph x pw values).
fn avg_pool_plane(
    src: &[f32],
    (h, w): (usize, usize),
    kernel: usize,
    pad: usize,
    (ph, pw): (usize, usize),
    pooled: &mut Vec<f32>,
) {
    pooled.clear();
    if kernel == 1 {
        pooled.extend_from_slice(src);
        return;
    }
    // Sums along rows first, into `pooled` at width pw and height h.
    pooled.resize(h * pw + ph * pw, 0.0);
    let (horizontal, vertical) = pooled.split_at_mut(h * pw);
    for (row, line) in horizontal.chunks_exact_mut(pw).zip(src.chunks_exact(w)) {
        for (x, r) in row.iter_mut().enumerate() {
            // Window columns x - pad .. x - pad + kernel, clipped to the plane.
            let first = x.saturating_sub(pad);
            let end = (x + kernel).saturating_sub(pad).min(w);
            *r = if first < end {
                line[first..end].iter().sum()
            } else {
                0.0
            };
        }
    }
    let scale = 1.0 / (kernel * kernel) as f32;
    for (y, row) in vertical.chunks_exact_mut(pw).enumerate() {
        let first = y.saturating_sub(pad);
        let end = (y + kernel).saturating_sub(pad).min(h);
        for yy in first..end {
            for (r, v) in row.iter_mut().zip(&horizontal[yy * pw..(yy + 1) * pw]) {
                *r += v;
            }
        }
        for r in row.iter_mut() {
            *r *= scale;
        }
    }
    pooled.drain(..h * pw);
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

    /// Depthwise "SAME" convolution read straight from the definition.
    fn depthwise_reference(
        x: &[f32],
        (c, h, w): (usize, usize, usize),
        op: &DepthwiseSame,
    ) -> Vec<f32> {
        let (k, s) = (op.kernel, op.stride);
        let top = same_padding(h, k, s).0 as isize;
        let left = same_padding(w, k, s).0 as isize;
        let (oh, ow) = (h.div_ceil(s), w.div_ceil(s));
        let mut out = Vec::new();
        for ch in 0..c {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut sum = op.bias[ch];
                    for ky in 0..k {
                        for kx in 0..k {
                            let iy = (oy * s + ky) as isize - top;
                            let ix = (ox * s + kx) as isize - left;
                            if (0..h as isize).contains(&iy) && (0..w as isize).contains(&ix) {
                                sum += op.weight[(ch * k + ky) * k + kx]
                                    * x[(ch * h + iy as usize) * w + ix as usize];
                            }
                        }
                    }
                    out.push(op.activation.apply_scalar(sum));
                }
            }
        }
        out
    }

    #[test]
    fn depthwise_matches_reference() -> Result<()> {
        // Widths below, at and above one block of outputs, odd and even sizes.
        let cases = [
            (1usize, 1usize, 3usize, 1usize),
            (5, 7, 3, 1),
            (9, 16, 3, 2),
            (17, 33, 5, 1),
            (20, 35, 5, 2),
            (6, 3, 5, 2),
            (4, 40, 7, 2),
        ];
        for (h, w, k, s) in cases {
            for activation in [Activation::None, Activation::Relu6, Activation::Silu] {
                let c = 3;
                let op = DepthwiseSame {
                    weight: (0..c * k * k).map(|i| (i as f32 * 0.37).sin()).collect(),
                    bias: vec![0.5, -1.0, 2.0],
                    kernel: k,
                    stride: s,
                    activation,
                };
                // Two images, so that the plane index wraps around the channels.
                let x: Vec<f32> = (0..2 * c * h * w)
                    .map(|i| (i as f32 * 0.11).cos() * 3.0)
                    .collect();
                let storage = CpuStorage::F32(x.clone());
                let layout = Layout::contiguous((2, c, h, w));
                let (out, shape) = op.cpu_fwd(&storage, &layout)?;
                let CpuStorage::F32(out) = out else {
                    panic!("f32 output expected")
                };
                let (oh, ow) = (h.div_ceil(s), w.div_ceil(s));
                assert_eq!(shape.dims(), &[2, c, oh, ow]);
                let mut expected = depthwise_reference(&x[..c * h * w], (c, h, w), &op);
                expected.extend(depthwise_reference(&x[c * h * w..], (c, h, w), &op));
                // The portable body as well, which this CPU may not dispatch to.
                let geometry = DepthwiseGeometry::new((h, w), k, s);
                let mut phases = vec![0f32; geometry.buffer_len()];
                let mut portable = Vec::with_capacity(expected.len());
                for plane in 0..2 * c {
                    let mut dst = vec![std::mem::MaybeUninit::new(f32::NAN); oh * ow];
                    depthwise_plane_body::<false>(
                        &geometry,
                        &x[plane * h * w..(plane + 1) * h * w],
                        &op.weight[(plane % c) * k * k..][..k * k],
                        op.bias[plane % c],
                        activation,
                        &mut phases,
                        &mut dst,
                    );
                    // SAFETY: initialised above.
                    portable.extend(dst.iter().map(|v| unsafe { v.assume_init() }));
                }
                for (kernel, values) in [("dispatched", &out), ("portable", &portable)] {
                    for (i, (a, b)) in values.iter().zip(&expected).enumerate() {
                        assert!(
                            (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                            "{kernel} {h}x{w} k {k} s {s} {activation:?}: element {i} is {a}, \
                             expected {b}"
                        );
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn fusion_matches_pool_resize_and_cat() -> Result<()> {
        use crate::model::ops::{avg_pool_same, resize};
        use candle_core::{Device, Tensor};
        let shapes = [
            [2usize, 3, 12, 10],
            [2, 2, 6, 5],
            [2, 4, 3, 3],
            [2, 1, 1, 2],
        ];
        for kernel in [1usize, 2, 3, 4] {
            for grid in [(12usize, 10usize), (7, 9)] {
                let tensors = shapes
                    .iter()
                    .enumerate()
                    .map(|(i, shape)| {
                        let n: usize = shape.iter().product();
                        let data: Vec<f32> = (0..n)
                            .map(|j| ((j * 31 + i * 7) % 17) as f32 - 8.0)
                            .collect();
                        Tensor::from_vec(data, shape.as_slice(), &Device::Cpu)
                    })
                    .collect::<Result<Vec<_>>>()?;
                let expected = tensors
                    .iter()
                    .map(|t| resize(&avg_pool_same(t, kernel)?, grid, ResizeMode::Bilinear))
                    .collect::<Result<Vec<_>>>()?;
                let expected = Tensor::cat(&expected, 1)?.flatten_all()?.to_vec1::<f32>()?;
                let values: Vec<Vec<f32>> = tensors
                    .iter()
                    .map(|t| t.flatten_all()?.to_vec1::<f32>())
                    .collect::<Result<_>>()?;
                let maps: Vec<(&[f32], [usize; 4])> = values
                    .iter()
                    .zip(&shapes)
                    .map(|(v, s)| (v.as_slice(), *s))
                    .collect();
                let fused = pool_resize_concat(&maps, kernel, grid);
                assert_eq!(fused.len(), expected.len());
                for (i, (a, b)) in fused.iter().zip(&expected).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                        "kernel {kernel} grid {grid:?}: element {i} is {a}, expected {b}"
                    );
                }
            }
        }
        Ok(())
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
