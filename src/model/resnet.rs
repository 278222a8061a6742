// SPDX-License-Identifier: MIT OR Apache-2.0
//! ResNet backbones as timm's `resnet18`, `resnet34`, `resnet50` and `wide_resnet50_2`
//! (timm 1.0, `timm/models/resnet.py`).
//!
//! The facts ported from timm:
//!
//! - Stem: 7x7 stride-2 convolution with padding 3 (no bias), BatchNorm, ReLU, then a
//!   3x3 stride-2 max-pool with padding 1. Every convolution pads symmetrically with
//!   `(k - 1) / 2`, as PyTorch's `padding=` does, not with TensorFlow's "SAME" rule.
//! - BatchNorm eps is 1e-5 (PyTorch's default) everywhere.
//! - `BasicBlock` (ResNet-18/34): 3x3 conv (stride on it) → BN → ReLU → 3x3 conv → BN,
//!   plus the shortcut, then ReLU.
//! - `Bottleneck` (ResNet-50, wide ResNet-50-2): 1x1 conv → BN → ReLU → 3x3 conv (stride
//!   on it, "ResNet v1.5") → BN → ReLU → 1x1 conv to `4 planes` → BN, plus the shortcut,
//!   then ReLU. The inner width is `planes * base_width / 64`, so 2 planes for the wide
//!   variant (`base_width` 128).
//! - The first block of a layer whose stride or width changes has a projection shortcut
//!   `downsample`: 1x1 conv with the block's stride (padding 0), then BN.
//! - `features_only` with `out_indices=[2, 3, 4]` taps the outputs of layer2, layer3 and
//!   layer4, at strides 8, 16 and 32.
//!
//! Tensor names follow timm's state dict (`conv1.weight`, `bn1.*`,
//! `layer2.0.downsample.0.weight`, `fc.*`). BatchNorm is folded into the convolutions
//! at load time.

use candle_core::{D, Module, Result as CandleResult, Tensor};

use super::ops::{Activation, ConvBn, Padding, max_pool};
use super::weights::{ModelError, Weights};

/// PyTorch's `nn.BatchNorm2d` default eps, which timm's ResNets keep.
const BN_EPS: f64 = 1e-5;

/// Number of ImageNet classes of timm's classifier `fc`.
const NUM_CLASSES: usize = 1000;

/// Residual block type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// Two 3x3 convolutions, output width `planes`.
    Basic,
    /// 1x1, 3x3, 1x1 convolutions, output width `4 planes`.
    Bottleneck,
}

/// Architecture of one ResNet variant.
#[derive(Debug, Clone, PartialEq)]
pub struct ResNetConfig {
    pub name: String,
    pub block: BlockKind,
    /// Blocks in layer1 to layer4.
    pub layers: [usize; 4],
    /// timm's `base_width`: 64, or 128 for the wide variants.
    pub base_width: usize,
}

/// Channels of the stem's output.
const STEM_CHANNELS: usize = 64;

/// `planes` of layer1 to layer4.
const PLANES: [usize; 4] = [64, 128, 256, 512];

/// Stride of the first block of layer1 to layer4 (layer1 follows the stem's max-pool).
const LAYER_STRIDES: [usize; 4] = [1, 2, 2, 2];

/// timm's `features_only` taps for `out_indices=[2, 3, 4]`: indices into layer1..layer4
/// of the outputs of layer2, layer3 and layer4, at strides 8, 16 and 32.
pub const FEATURE_LAYERS: [usize; 3] = [1, 2, 3];

impl ResNetConfig {
    /// Builds the architecture for a timm model name such as `resnet18`.
    pub fn from_name(name: &str) -> Option<Self> {
        let (block, layers, base_width) = match name {
            "resnet18" => (BlockKind::Basic, [2, 2, 2, 2], 64),
            "resnet34" => (BlockKind::Basic, [3, 4, 6, 3], 64),
            "resnet50" => (BlockKind::Bottleneck, [3, 4, 6, 3], 64),
            "wide_resnet50_2" => (BlockKind::Bottleneck, [3, 4, 6, 3], 128),
            _ => return None,
        };
        Some(Self {
            name: name.to_string(),
            block,
            layers,
            base_width,
        })
    }

    /// Names accepted by [`ResNetConfig::from_name`].
    pub fn supported_names() -> Vec<String> {
        ["resnet18", "resnet34", "resnet50", "wide_resnet50_2"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    fn expansion(&self) -> usize {
        match self.block {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }

    /// Output channels of layer `layer` (0-based: layer1 is 0).
    pub fn layer_channels(&self, layer: usize) -> usize {
        PLANES[layer] * self.expansion()
    }

    /// Channels of the outputs of the given layers (0-based).
    pub fn stage_channels(&self, layers: &[usize]) -> Vec<usize> {
        layers.iter().map(|&l| self.layer_channels(l)).collect()
    }

    /// Total stride at the output of a layer (0-based): the stem's convolution and
    /// max-pool each halve, then each layer's first block.
    pub fn stage_reduction(&self, layer: usize) -> usize {
        4 * LAYER_STRIDES[..=layer].iter().product::<usize>()
    }

    /// Inner width of the blocks of a layer: `planes` for the basic block,
    /// `planes * base_width / 64` for the bottleneck.
    fn inner_width(&self, layer: usize) -> usize {
        match self.block {
            BlockKind::Basic => PLANES[layer],
            BlockKind::Bottleneck => PLANES[layer] * self.base_width / 64,
        }
    }

    /// Lists the names and shapes of the tensors that [`ResNet::load`] reads for the
    /// feature extractor (stem and layer1 to layer4, no `fc`), in timm's naming and order.
    /// A timm state dict also has an int64 `num_batches_tracked` per BatchNorm.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        fn batch_norm(out: &mut Vec<(String, Vec<usize>)>, prefix: &str, channels: usize) {
            for name in ["weight", "bias", "running_mean", "running_var"] {
                out.push((format!("{prefix}.{name}"), vec![channels]));
            }
        }
        let mut out = vec![("conv1.weight".to_string(), vec![STEM_CHANNELS, 3, 7, 7])];
        batch_norm(&mut out, "bn1", STEM_CHANNELS);
        let mut in_c = STEM_CHANNELS;
        for (layer, (&blocks, &stride)) in self.layers.iter().zip(&LAYER_STRIDES).enumerate() {
            let (width, out_c) = (self.inner_width(layer), self.layer_channels(layer));
            for b in 0..blocks {
                let p = format!("layer{}.{b}", layer + 1);
                match self.block {
                    BlockKind::Basic => {
                        out.push((format!("{p}.conv1.weight"), vec![width, in_c, 3, 3]));
                        batch_norm(&mut out, &format!("{p}.bn1"), width);
                        out.push((format!("{p}.conv2.weight"), vec![out_c, width, 3, 3]));
                        batch_norm(&mut out, &format!("{p}.bn2"), out_c);
                    }
                    BlockKind::Bottleneck => {
                        out.push((format!("{p}.conv1.weight"), vec![width, in_c, 1, 1]));
                        batch_norm(&mut out, &format!("{p}.bn1"), width);
                        out.push((format!("{p}.conv2.weight"), vec![width, width, 3, 3]));
                        batch_norm(&mut out, &format!("{p}.bn2"), width);
                        out.push((format!("{p}.conv3.weight"), vec![out_c, width, 1, 1]));
                        batch_norm(&mut out, &format!("{p}.bn3"), out_c);
                    }
                }
                if b == 0 && (stride != 1 || in_c != out_c) {
                    out.push((format!("{p}.downsample.0.weight"), vec![out_c, in_c, 1, 1]));
                    batch_norm(&mut out, &format!("{p}.downsample.1"), out_c);
                }
                in_c = out_c;
            }
        }
        out
    }
}

/// Loads a bias-free convolution and its BatchNorm, folded, with symmetric padding.
fn conv_bn(
    w: &Weights,
    conv: &str,
    bn: &str,
    shape: [usize; 4],
    stride: usize,
    activation: Activation,
) -> Result<ConvBn, ModelError> {
    let weight = w.get(&format!("{conv}.weight"), &shape)?;
    let bn = w.pp(bn).batch_norm(shape[0], BN_EPS)?;
    Ok(ConvBn::fold(&weight, &bn, stride, 1, activation)?.with_padding(Padding::Symmetric))
}

#[derive(Debug, Clone)]
struct Block {
    /// Every convolution of the residual branch but the last, each followed by ReLU.
    inner: Vec<ConvBn>,
    /// The branch's last convolution: ReLU follows the addition of the shortcut.
    last: ConvBn,
    downsample: Option<ConvBn>,
}

impl Block {
    fn load(
        w: &Weights,
        cfg: &ResNetConfig,
        layer: usize,
        in_c: usize,
        stride: usize,
    ) -> Result<Self, ModelError> {
        let (width, out_c) = (cfg.inner_width(layer), cfg.layer_channels(layer));
        let relu = Activation::Relu;
        let (inner, last) = match cfg.block {
            BlockKind::Basic => (
                vec![conv_bn(
                    w,
                    "conv1",
                    "bn1",
                    [width, in_c, 3, 3],
                    stride,
                    relu,
                )?],
                conv_bn(w, "conv2", "bn2", [out_c, width, 3, 3], 1, relu)?,
            ),
            BlockKind::Bottleneck => (
                vec![
                    conv_bn(w, "conv1", "bn1", [width, in_c, 1, 1], 1, relu)?,
                    conv_bn(w, "conv2", "bn2", [width, width, 3, 3], stride, relu)?,
                ],
                conv_bn(w, "conv3", "bn3", [out_c, width, 1, 1], 1, relu)?,
            ),
        };
        let downsample = if stride != 1 || in_c != out_c {
            Some(conv_bn(
                w,
                "downsample.0",
                "downsample.1",
                [out_c, in_c, 1, 1],
                stride,
                Activation::None,
            )?)
        } else {
            None
        };
        Ok(Self {
            inner,
            last,
            downsample,
        })
    }
}

impl Module for Block {
    fn forward(&self, x: &Tensor) -> CandleResult<Tensor> {
        let mut h = x.clone();
        for conv in &self.inner {
            h = conv.forward(&h)?;
        }
        let shortcut = match &self.downsample {
            Some(downsample) => downsample.forward(x)?,
            None => x.clone(),
        };
        self.last.forward_residual(&h, &shortcut)
    }
}

/// Classification head: global average pool, then the linear layer `fc`.
#[derive(Debug, Clone)]
struct Head {
    weight: Tensor,
    bias: Tensor,
}

/// A ResNet feature extractor (and, when the weights have `fc`, classifier).
#[derive(Debug, Clone)]
pub struct ResNet {
    config: ResNetConfig,
    stem: ConvBn,
    layers: Vec<Vec<Block>>,
    head: Option<Head>,
}

impl ResNet {
    /// Loads the network from timm-named weights. The classifier is loaded when
    /// `fc.weight` is present.
    pub fn load(w: &Weights, config: &ResNetConfig) -> Result<Self, ModelError> {
        let stem = conv_bn(
            w,
            "conv1",
            "bn1",
            [STEM_CHANNELS, 3, 7, 7],
            2,
            Activation::Relu,
        )?;
        let mut in_c = STEM_CHANNELS;
        let mut layers = Vec::with_capacity(4);
        for (layer, (&count, &layer_stride)) in config.layers.iter().zip(&LAYER_STRIDES).enumerate()
        {
            let mut blocks = Vec::with_capacity(count);
            for b in 0..count {
                let stride = if b == 0 { layer_stride } else { 1 };
                let prefix = format!("layer{}.{b}", layer + 1);
                blocks.push(Block::load(&w.pp(prefix), config, layer, in_c, stride)?);
                in_c = config.layer_channels(layer);
            }
            layers.push(blocks);
        }
        let head = if w.contains("fc.weight") {
            Some(Head {
                weight: w.get("fc.weight", &[NUM_CLASSES, in_c])?,
                bias: w.get("fc.bias", &[NUM_CLASSES])?,
            })
        } else {
            None
        };
        Ok(Self {
            config: config.clone(),
            stem,
            layers,
            head,
        })
    }

    /// Returns the architecture this network was built with.
    pub fn config(&self) -> &ResNetConfig {
        &self.config
    }

    /// Runs the network up to the last requested layer and returns the outputs of
    /// `taps` (0-based layer indices, ascending).
    pub fn features(&self, x: &Tensor, taps: &[usize]) -> CandleResult<Vec<Tensor>> {
        let last = taps.iter().copied().max().unwrap_or(0);
        let mut h = max_pool(&self.stem.forward(x)?, 3, 2, 1)?;
        let mut out = Vec::with_capacity(taps.len());
        for (l, blocks) in self.layers.iter().enumerate().take(last + 1) {
            for block in blocks {
                h = block.forward(&h)?;
            }
            if taps.contains(&l) {
                out.push(h.clone());
            }
        }
        Ok(out)
    }

    /// ImageNet logits (B, 1000); fails when the weights had no classifier `fc`.
    pub fn classify(&self, x: &Tensor) -> CandleResult<Tensor> {
        let Some(head) = &self.head else {
            candle_core::bail!("the backbone weights have no classifier (fc.weight, fc.bias)");
        };
        let h = self.features(x, &[3])?.remove(0);
        let pooled = h.mean(D::Minus1)?.mean(D::Minus1)?;
        pooled.matmul(&head.weight.t()?)?.broadcast_add(&head.bias)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resnet18_matches_timm_layout() {
        let cfg = ResNetConfig::from_name("resnet18").unwrap();
        assert_eq!(cfg.stage_channels(&FEATURE_LAYERS), vec![128, 256, 512]);
        assert_eq!(cfg.stage_reduction(1), 8);
        assert_eq!(cfg.stage_reduction(2), 16);
        assert_eq!(cfg.stage_reduction(3), 32);
        // timm 1.0's resnet18 has 100 float tensors in its features_only state dict.
        assert_eq!(cfg.tensor_shapes().len(), 100);
    }

    #[test]
    fn wide_resnet50_2_matches_timm_layout() {
        let cfg = ResNetConfig::from_name("wide_resnet50_2").unwrap();
        assert_eq!(cfg.stage_channels(&FEATURE_LAYERS), vec![512, 1024, 2048]);
        let shapes = cfg.tensor_shapes();
        let conv2 = shapes
            .iter()
            .find(|(n, _)| n == "layer1.0.conv2.weight")
            .unwrap();
        // Inner width 2 x 64 planes.
        assert_eq!(conv2.1, vec![128, 128, 3, 3]);
        let params: usize = shapes
            .iter()
            .filter(|(n, _)| !n.ends_with("running_mean") && !n.ends_with("running_var"))
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        // timm 1.0's wide_resnet50_2 has 68,883,240 parameters, of which fc has 2,049,000.
        assert_eq!(params, 68_883_240 - 2_049_000);
    }
}
