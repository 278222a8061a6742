// SPDX-License-Identifier: MIT OR Apache-2.0
//! Tensor operations that candle lacks or does slowly: TensorFlow "SAME" padding,
//! depthwise convolution, 1x1 convolution as a matrix product, bilinear resize with
//! half-pixel centres, zero-padded average pooling and `-inf`-padded max pooling.

use candle_core::{DType, Module, Result, Tensor};

use super::cpu;
use crate::imageops::{ResizeMode, resize_matrix};

/// Padding (before, after) that TensorFlow's "SAME" mode adds to one axis: the output
/// has `ceil(input / stride)` samples and the odd pixel goes after.
pub fn same_padding(input: usize, kernel: usize, stride: usize) -> (usize, usize) {
    let out = input.div_ceil(stride);
    let total = ((out - 1) * stride + kernel).saturating_sub(input);
    (total / 2, total - total / 2)
}

/// Padding rule of a convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// TensorFlow "SAME": `ceil(input / stride)` outputs, the odd pixel after.
    Same,
    /// PyTorch's `padding=(k - 1) / 2` on both sides, as timm's ResNets use.
    Symmetric,
}

impl Padding {
    /// Padding before the first sample of one axis.
    pub fn before(self, input: usize, kernel: usize, stride: usize) -> usize {
        match self {
            Padding::Same => same_padding(input, kernel, stride).0,
            Padding::Symmetric => (kernel - 1) / 2,
        }
    }

    /// Number of output samples on one axis.
    pub fn output_size(self, input: usize, kernel: usize, stride: usize) -> usize {
        match self {
            Padding::Same => input.div_ceil(stride),
            Padding::Symmetric => (input + 2 * ((kernel - 1) / 2) - kernel) / stride + 1,
        }
    }
}

/// Pads the two spatial axes of an NCHW tensor with zeros for a "SAME" convolution.
pub fn pad_same(x: &Tensor, kernel: usize, stride: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (top, bottom) = same_padding(h, kernel, stride);
    let (left, right) = same_padding(w, kernel, stride);
    if top + bottom + left + right == 0 {
        return Ok(x.clone());
    }
    x.pad_with_zeros(2, top, bottom)?
        .pad_with_zeros(3, left, right)
}

/// Element-wise activation applied after a convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    None,
    Relu,
    Relu6,
    Silu,
    /// LeakyReLU with slope [`LEAKY_SLOPE`], as in the flow's coupling subnet.
    LeakyRelu,
}

/// Negative slope of [`Activation::LeakyRelu`].
pub const LEAKY_SLOPE: f32 = 0.2;

impl Activation {
    /// Applies the activation to one value.
    #[inline]
    pub fn apply_scalar(self, v: f32) -> f32 {
        match self {
            Activation::None => v,
            Activation::Relu => v.max(0.0),
            Activation::Relu6 => v.clamp(0.0, 6.0),
            Activation::Silu => v / (1.0 + (-v).exp()),
            Activation::LeakyRelu => v.max(LEAKY_SLOPE * v),
        }
    }

    /// Applies the activation in place, with one loop per activation so that each
    /// loop can be vectorised.
    #[inline]
    pub fn apply_slice(self, values: &mut [f32]) {
        match self {
            Activation::None => {}
            Activation::Relu => values.iter_mut().for_each(|v| *v = v.max(0.0)),
            Activation::Relu6 => values.iter_mut().for_each(|v| *v = v.clamp(0.0, 6.0)),
            Activation::Silu => values.iter_mut().for_each(|v| *v /= 1.0 + (-*v).exp()),
            Activation::LeakyRelu => values.iter_mut().for_each(|v| *v = v.max(LEAKY_SLOPE * *v)),
        }
    }
}

impl Module for Activation {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::None => Ok(x.clone()),
            Activation::Relu => x.relu(),
            Activation::Relu6 => x.clamp(0f32, 6f32),
            Activation::Silu => x.silu(),
            Activation::LeakyRelu => x.maximum(&x.affine(LEAKY_SLOPE as f64, 0.0)?),
        }
    }
}

/// A convolution with a bias (BatchNorm already folded in) and a fused activation.
///
/// Depthwise and 1x1 convolutions take dedicated paths on the CPU; everything else uses
/// candle's `conv2d`. Padding follows TensorFlow's "SAME" rule unless
/// [`ConvBn::with_padding`] changes it.
#[derive(Debug, Clone)]
pub struct ConvBn {
    weight: Tensor,
    bias: Tensor,
    kernel: usize,
    stride: usize,
    groups: usize,
    padding: Padding,
    activation: Activation,
    cpu: Option<CpuConv>,
}

/// The CPU kernels of a [`ConvBn`], with the folded weights copied out of the tensors.
#[derive(Debug, Clone)]
enum CpuConv {
    Depthwise(cpu::DepthwiseSame),
    /// 1x1 or full convolution as a matrix product with a fused bias and activation.
    Gemm(cpu::GemmConv),
}

impl ConvBn {
    /// Builds the layer from a conv weight (O, I/groups, K, K) and BatchNorm parameters.
    pub fn fold(
        conv: &Tensor,
        bn: &BatchNormParams,
        stride: usize,
        groups: usize,
        activation: Activation,
    ) -> Result<Self> {
        let (out_c, _, kernel, _) = conv.dims4()?;
        let scale = (&bn.weight / (bn.running_var.affine(1.0, bn.eps)?.sqrt()?))?;
        let weight = conv.broadcast_mul(&scale.reshape((out_c, 1, 1, 1))?)?;
        let bias = (&bn.bias - (&bn.running_mean * &scale)?)?;
        let cpu = if !conv.device().is_cpu() || conv.dtype() != DType::F32 {
            None
        } else if groups > 1 && groups == out_c {
            Some(CpuConv::Depthwise(cpu::DepthwiseSame {
                weight: weight.flatten_all()?.to_vec1::<f32>()?,
                bias: bias.to_vec1::<f32>()?,
                kernel,
                stride,
                activation,
            }))
        } else if groups == 1 {
            Some(CpuConv::Gemm(cpu::GemmConv {
                bias: bias.to_vec1::<f32>()?,
                kernel,
                stride,
                padding: Padding::Same,
                activation,
            }))
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            kernel,
            stride,
            groups,
            padding: Padding::Same,
            activation,
            cpu,
        })
    }

    /// Switches the layer to another padding rule.
    pub fn with_padding(mut self, padding: Padding) -> Self {
        self.padding = padding;
        // The depthwise kernel implements "SAME" padding only, so other rules take
        // candle's grouped `conv2d`.
        match &mut self.cpu {
            Some(CpuConv::Depthwise(_)) if padding != Padding::Same => self.cpu = None,
            Some(CpuConv::Gemm(op)) => op.padding = padding,
            _ => {}
        }
        self
    }
}

impl ConvBn {
    /// `activation(conv(x) + bias + residual)`: the activation follows the addition, as
    /// at the end of a ResNet block. Fused on the CPU.
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        match &self.cpu {
            Some(CpuConv::Gemm(op)) => x.contiguous()?.apply_op3_no_bwd(
                &self.weight.contiguous()?,
                &residual.contiguous()?,
                op,
            ),
            _ => self
                .activation
                .forward(&(self.forward_linear(x)? + residual)?),
        }
    }

    /// Convolution plus bias without the activation, through candle's ops.
    fn forward_linear(&self, x: &Tensor) -> Result<Tensor> {
        if self.kernel == 1 && self.stride == 1 && self.groups == 1 {
            return pointwise(x, &self.weight, Some(&self.bias));
        }
        let y = match self.padding {
            Padding::Same => {
                let x = pad_same(x, self.kernel, self.stride)?;
                x.conv2d(&self.weight, 0, self.stride, 1, self.groups)?
            }
            Padding::Symmetric => {
                let pad = (self.kernel - 1) / 2;
                x.conv2d(&self.weight, pad, self.stride, 1, self.groups)?
            }
        };
        y.broadcast_add(&self.bias.reshape((1, (), 1, 1))?)
    }
}

impl Module for ConvBn {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.cpu {
            Some(CpuConv::Depthwise(op)) => return x.contiguous()?.apply_op1_no_bwd(op),
            Some(CpuConv::Gemm(op)) => {
                return x
                    .contiguous()?
                    .apply_op2_no_bwd(&self.weight.contiguous()?, op);
            }
            None => {}
        }
        self.activation.forward(&self.forward_linear(x)?)
    }
}

/// Runs a "SAME" convolution with bias and activation for inference (no gradient). An
/// f32 CPU input takes the matrix-product path, anything else candle's `conv2d`.
pub fn conv_same(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stride: usize,
    activation: Activation,
) -> Result<Tensor> {
    let (_, _, kernel, _) = weight.dims4()?;
    let layer = ConvBn {
        weight: weight.clone(),
        bias: bias.clone(),
        kernel,
        stride,
        groups: 1,
        padding: Padding::Same,
        activation,
        cpu: if x.device().is_cpu() && x.dtype() == DType::F32 {
            Some(CpuConv::Gemm(cpu::GemmConv {
                bias: bias.to_vec1::<f32>()?,
                kernel,
                stride,
                padding: Padding::Same,
                activation,
            }))
        } else {
            None
        },
    };
    layer.forward(x)
}

/// Learned BatchNorm parameters and running statistics.
#[derive(Debug, Clone)]
pub struct BatchNormParams {
    pub weight: Tensor,
    pub bias: Tensor,
    pub running_mean: Tensor,
    pub running_var: Tensor,
    pub eps: f64,
}

/// 1x1 convolution as a batched matrix product: (O, I) x (B, I, H*W).
pub fn pointwise(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let out_c = weight.dim(0)?;
    let w2 = weight.reshape((out_c, c))?;
    // (B, I, H*W) -> (B, O, H*W)
    let y = w2.broadcast_matmul(&x.reshape((b, c, h * w))?)?;
    let y = match bias {
        Some(bias) => y.broadcast_add(&bias.reshape((1, out_c, 1))?)?,
        None => y,
    };
    y.reshape((b, out_c, h, w))
}

/// Resizes the two spatial axes of an NCHW tensor, as `F.interpolate(mode="bilinear",
/// align_corners=False)` with or without antialiasing, via two small matrix products.
pub fn resize(x: &Tensor, (out_h, out_w): (usize, usize), mode: ResizeMode) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if (h, w) == (out_h, out_w) {
        return Ok(x.clone());
    }
    let dev = x.device();
    let dtype = x.dtype();
    let rw = Tensor::from_vec(resize_matrix(w, out_w, mode), (out_w, w), dev)?.to_dtype(dtype)?;
    let rh = Tensor::from_vec(resize_matrix(h, out_h, mode), (out_h, h), dev)?.to_dtype(dtype)?;
    // (B, C, H, W) x (W, W') -> (B, C, H, W'), then (H', H) x that -> (B, C, H', W')
    let y = x.broadcast_matmul(&rw.t()?)?;
    rh.broadcast_matmul(&y)
}

/// `AvgPool2d(k, stride=1, padding=k/2)` with PyTorch's default `count_include_pad=True`.
pub fn avg_pool_same(x: &Tensor, kernel: usize) -> Result<Tensor> {
    if kernel == 1 {
        return Ok(x.clone());
    }
    let pad = kernel / 2;
    let x = x.pad_with_zeros(2, pad, pad)?.pad_with_zeros(3, pad, pad)?;
    x.avg_pool2d_with_stride((kernel, kernel), (1, 1))
}

/// `MaxPool2d(kernel, stride, padding)` with PyTorch's semantics: the border is padded
/// with `-inf`, so padding never wins a window, and the output has
/// `(input + 2 padding - kernel) / stride + 1` samples per axis.
pub fn max_pool(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    let x = if padding == 0 {
        x.clone()
    } else {
        let pad = |t: &Tensor, dim: usize| -> Result<Tensor> {
            let mut shape = t.dims().to_vec();
            shape[dim] = padding;
            let border = Tensor::full(f32::NEG_INFINITY, shape.as_slice(), t.device())?
                .to_dtype(t.dtype())?;
            Tensor::cat(&[&border, t, &border], dim)
        };
        pad(&pad(x, 2)?, 3)?
    };
    x.max_pool2d_with_stride((kernel, kernel), (stride, stride))
}

/// Centre crop of the spatial axes: `top = (H - h) / 2`, `left = (W - w) / 2`.
pub fn centre_crop(x: &Tensor, (h, w): (usize, usize)) -> Result<Tensor> {
    let (_, _, in_h, in_w) = x.dims4()?;
    x.narrow(2, (in_h - h) / 2, h)?.narrow(3, (in_w - w) / 2, w)
}

/// Returns the f32 data type check used by the CPU-only kernels.
pub fn ensure_f32(x: &Tensor) -> Result<()> {
    if x.dtype() != DType::F32 {
        candle_core::bail!("expected an f32 tensor, got {:?}", x.dtype());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn same_padding_matches_tensorflow() {
        // k3/s2 on even input pads (0, 1); k5/s2 pads (1, 2); stride 1 is symmetric.
        assert_eq!(same_padding(256, 3, 2), (0, 1));
        assert_eq!(same_padding(256, 5, 2), (1, 2));
        assert_eq!(same_padding(255, 3, 2), (1, 1));
        assert_eq!(same_padding(200, 5, 2), (1, 2));
        assert_eq!(same_padding(7, 3, 1), (1, 1));
        assert_eq!(same_padding(7, 5, 1), (2, 2));
        assert_eq!(same_padding(1, 3, 2), (1, 1));
    }

    #[test]
    fn pad_same_gives_ceil_output() -> Result<()> {
        let dev = Device::Cpu;
        for (size, k) in [(64usize, 3usize), (65, 3), (64, 5), (33, 5)] {
            let x = Tensor::ones((1, 2, size, size), DType::F32, &dev)?;
            let padded = pad_same(&x, k, 2)?;
            let w = Tensor::ones((2, 2, k, k), DType::F32, &dev)?;
            let y = padded.conv2d(&w, 0, 2, 1, 1)?;
            assert_eq!(
                y.dims4()?,
                (1, 2, size.div_ceil(2), size.div_ceil(2)),
                "size {size} k {k}"
            );
        }
        Ok(())
    }

    fn bn_identity(c: usize, dev: &Device) -> Result<BatchNormParams> {
        Ok(BatchNormParams {
            weight: Tensor::ones(c, DType::F32, dev)?,
            bias: Tensor::zeros(c, DType::F32, dev)?,
            running_mean: Tensor::zeros(c, DType::F32, dev)?,
            running_var: Tensor::ones(c, DType::F32, dev)?,
            eps: 0.0,
        })
    }

    #[test]
    fn depthwise_matches_grouped_conv() -> Result<()> {
        let dev = Device::Cpu;
        for (size, k, s) in [(9usize, 3usize, 1usize), (10, 3, 2), (11, 5, 2), (8, 5, 1)] {
            let x = Tensor::randn(0f32, 1.0, (2, 4, size, size), &dev)?;
            let w = Tensor::randn(0f32, 1.0, (4, 1, k, k), &dev)?;
            let layer = ConvBn::fold(&w, &bn_identity(4, &dev)?, s, 4, Activation::Relu6)?;
            assert!(matches!(layer.cpu, Some(CpuConv::Depthwise(_))));
            let fast = layer.forward(&x)?;
            let reference = pad_same(&x, k, s)?
                .conv2d(&w, 0, s, 1, 4)?
                .clamp(0f32, 6f32)?;
            let diff = (fast - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "size {size} k {k} s {s}: {diff}");
        }
        Ok(())
    }

    #[test]
    fn strided_conv_matches_candle() -> Result<()> {
        let dev = Device::Cpu;
        for (size, k, s) in [(16usize, 3usize, 2usize), (15, 3, 2), (9, 3, 1), (12, 1, 1)] {
            let x = Tensor::randn(0f32, 1.0, (2, 3, size, size + 1), &dev)?;
            let w = Tensor::randn(0f32, 1.0, (5, 3, k, k), &dev)?;
            let layer = ConvBn::fold(&w, &bn_identity(5, &dev)?, s, 1, Activation::Silu)?;
            assert!(matches!(layer.cpu, Some(CpuConv::Gemm(_))));
            let fast = layer.forward(&x)?;
            let reference = pad_same(&x, k, s)?.conv2d(&w, 0, s, 1, 1)?.silu()?;
            let diff = (fast - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-4, "size {size} k {k} s {s}: {diff}");
        }
        Ok(())
    }

    #[test]
    fn symmetric_conv_matches_candle() -> Result<()> {
        let dev = Device::Cpu;
        for (size, k, s) in [
            (16usize, 7usize, 2usize),
            (15, 7, 2),
            (9, 3, 1),
            (10, 3, 2),
            (9, 1, 2),
        ] {
            let x = Tensor::randn(0f32, 1.0, (2, 3, size, size + 1), &dev)?;
            let w = Tensor::randn(0f32, 1.0, (5, 3, k, k), &dev)?;
            let bn = bn_identity(5, &dev)?;
            let layer =
                ConvBn::fold(&w, &bn, s, 1, Activation::Relu)?.with_padding(Padding::Symmetric);
            assert!(matches!(layer.cpu, Some(CpuConv::Gemm(_))));
            let fast = layer.forward(&x)?;
            let reference = x.conv2d(&w, (k - 1) / 2, s, 1, 1)?.relu()?;
            assert_eq!(fast.dims(), reference.dims(), "size {size} k {k} s {s}");
            let diff = (fast - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-4, "size {size} k {k} s {s}: {diff}");
        }
        Ok(())
    }

    #[test]
    fn residual_applies_activation_after_sum() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (1, 4, 5, 6), &dev)?;
        let residual = Tensor::randn(0f32, 1.0, (1, 4, 5, 6), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (4, 4, 3, 3), &dev)?;
        let layer = ConvBn::fold(&w, &bn_identity(4, &dev)?, 1, 1, Activation::Relu)?
            .with_padding(Padding::Symmetric);
        let fused = layer.forward_residual(&x, &residual)?;
        let reference = (x.conv2d(&w, 1, 1, 1, 1)? + &residual)?.relu()?;
        let diff = (fused - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-4, "{diff}");
        Ok(())
    }

    #[test]
    fn max_pool_ignores_padding() -> Result<()> {
        let dev = Device::Cpu;
        // All values negative: zero padding would win at the borders, -inf never does.
        let data: Vec<f32> = (0..25).map(|i| -1.0 - i as f32).collect();
        let x = Tensor::from_vec(data, (1, 1, 5, 5), &dev)?;
        let y = max_pool(&x, 3, 2, 1)?;
        assert_eq!(y.dims4()?, (1, 1, 3, 3));
        let v = y.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(v[0], -1.0);
        assert_eq!(v[8], -19.0);
        let even = Tensor::zeros((1, 1, 6, 4), DType::F32, &dev)?;
        assert_eq!(max_pool(&even, 3, 2, 1)?.dims4()?, (1, 1, 3, 2));
        Ok(())
    }

    #[test]
    fn pointwise_matches_conv() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 5, 6, 7), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (3, 5, 1, 1), &dev)?;
        let b = Tensor::randn(0f32, 1.0, 3, &dev)?;
        let fast = pointwise(&x, &w, Some(&b))?;
        let reference = x
            .conv2d(&w, 0, 1, 1, 1)?
            .broadcast_add(&b.reshape((1, 3, 1, 1))?)?;
        let diff = (fast - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        Ok(())
    }

    #[test]
    fn avg_pool_counts_padding() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::ones((1, 1, 4, 4), DType::F32, &dev)?;
        let y = avg_pool_same(&x, 3)?;
        assert_eq!(y.dims4()?, (1, 1, 4, 4));
        let v = y.flatten_all()?.to_vec1::<f32>()?;
        // The window covers 4 of 9 ones at a corner, 6 at an edge and 9 inside.
        assert!((v[0] - 4.0 / 9.0).abs() < 1e-6);
        assert!((v[1] - 6.0 / 9.0).abs() < 1e-6);
        assert!((v[5] - 1.0).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn resize_matches_cpu_planes() -> Result<()> {
        let dev = Device::Cpu;
        let data: Vec<f32> = (0..2 * 9 * 11).map(|i| ((i * 37) % 17) as f32).collect();
        let x = Tensor::from_vec(data.clone(), (1, 2, 9, 11), &dev)?;
        for mode in [ResizeMode::Bilinear, ResizeMode::Antialias] {
            let y = resize(&x, (4, 6), mode)?.flatten_all()?.to_vec1::<f32>()?;
            let expected = crate::imageops::resize_planes(&data, 2, (9, 11), (4, 6), mode);
            for (a, b) in y.iter().zip(&expected) {
                assert!((a - b).abs() < 1e-4, "{a} vs {b}");
            }
        }
        Ok(())
    }
}
