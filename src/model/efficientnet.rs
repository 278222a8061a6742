// SPDX-License-Identifier: MIT OR Apache-2.0
//! EfficientNet backbones with TensorFlow "SAME" padding, as timm's `tf_efficientnet_*`
//! models (timm 1.0, `timm/models/efficientnet.py` and `_efficientnet_blocks.py`).
//!
//! One code path serves the whole family: the B0-B7 variants (SiLU, squeeze-excite) and
//! the Lite0-Lite4 variants (ReLU6, no squeeze-excite, fixed stem and head). Tensor names
//! follow timm's state dict, e.g. `blocks.2.1.conv_dw.weight`. BatchNorm is folded into
//! the convolutions at load time, which shifts outputs by about 1e-6 relative.

use candle_core::{D, Module, Result as CandleResult, Tensor};

use super::ops::{Activation, ConvBn, pointwise};
use super::weights::{ModelError, Weights};

/// timm's `BN_EPS_TF_DEFAULT`: the TF-ported weights use eps 1e-3.
const TF_BN_EPS: f64 = 1e-3;

/// One stage of identical blocks (the first may change stride and width).
#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    pub repeats: usize,
    pub kernel: usize,
    pub stride: usize,
    pub expand: usize,
    pub out_channels: usize,
    /// Depthwise-separable block (no expansion conv) instead of an inverted residual.
    pub separable: bool,
}

/// Architecture of one EfficientNet variant.
#[derive(Debug, Clone, PartialEq)]
pub struct EfficientNetConfig {
    pub name: String,
    pub stem_channels: usize,
    pub head_channels: usize,
    pub activation: Activation,
    pub squeeze_excite: bool,
    pub stages: Vec<Stage>,
}

/// timm's `make_divisible(v, 8)`: round to a multiple of 8, never more than 10% down.
fn round_channels(channels: f64) -> usize {
    let rounded = (((channels + 4.0) as usize) / 8 * 8).max(8);
    if (rounded as f64) < 0.9 * channels {
        rounded + 8
    } else {
        rounded
    }
}

impl EfficientNetConfig {
    /// Builds the architecture for a timm model name such as `tf_efficientnet_b5` or
    /// `tf_efficientnet_lite0`.
    pub fn from_name(name: &str) -> Option<Self> {
        let (width, depth, lite) = match name {
            "tf_efficientnet_b0" => (1.0, 1.0, false),
            "tf_efficientnet_b1" => (1.0, 1.1, false),
            "tf_efficientnet_b2" => (1.1, 1.2, false),
            "tf_efficientnet_b3" => (1.2, 1.4, false),
            "tf_efficientnet_b4" => (1.4, 1.8, false),
            "tf_efficientnet_b5" => (1.6, 2.2, false),
            "tf_efficientnet_b6" => (1.8, 2.6, false),
            "tf_efficientnet_b7" => (2.0, 3.1, false),
            "tf_efficientnet_lite0" => (1.0, 1.0, true),
            "tf_efficientnet_lite1" => (1.0, 1.1, true),
            "tf_efficientnet_lite2" => (1.1, 1.2, true),
            "tf_efficientnet_lite3" => (1.2, 1.4, true),
            "tf_efficientnet_lite4" => (1.4, 1.8, true),
            _ => return None,
        };
        // (repeats, kernel, stride, expand, channels) of the B0 baseline.
        let base = [
            (1, 3, 1, 1, 16),
            (2, 3, 2, 6, 24),
            (2, 5, 2, 6, 40),
            (3, 3, 2, 6, 80),
            (3, 5, 1, 6, 112),
            (4, 5, 2, 6, 192),
            (1, 3, 1, 6, 320),
        ];
        let last = base.len() - 1;
        let stages = base
            .iter()
            .enumerate()
            .map(|(i, &(repeats, kernel, stride, expand, channels))| {
                // The Lite variants keep the first and last stage at one block.
                let fixed = lite && (i == 0 || i == last);
                let repeats = if fixed {
                    repeats
                } else {
                    (repeats as f64 * depth).ceil() as usize
                };
                Stage {
                    repeats,
                    kernel,
                    stride,
                    expand,
                    out_channels: round_channels(channels as f64 * width),
                    separable: i == 0,
                }
            })
            .collect();
        let (stem_channels, head_channels) = if lite {
            (32, 1280)
        } else {
            (round_channels(32.0 * width), round_channels(1280.0 * width))
        };
        Some(Self {
            name: name.to_string(),
            stem_channels,
            head_channels,
            activation: if lite {
                Activation::Relu6
            } else {
                Activation::Silu
            },
            squeeze_excite: !lite,
            stages,
        })
    }

    /// Names accepted by [`EfficientNetConfig::from_name`].
    pub fn supported_names() -> Vec<String> {
        let mut names: Vec<String> = (0..8).map(|i| format!("tf_efficientnet_b{i}")).collect();
        names.extend((0..5).map(|i| format!("tf_efficientnet_lite{i}")));
        names
    }

    /// Channels of the outputs of the given stages.
    pub fn stage_channels(&self, stages: &[usize]) -> Vec<usize> {
        stages
            .iter()
            .map(|&s| self.stages[s].out_channels)
            .collect()
    }

    /// Total stride (reduction) at the output of a stage: the stem halves, then each
    /// stage's stride multiplies.
    pub fn stage_reduction(&self, stage: usize) -> usize {
        2 * self.stages[..=stage]
            .iter()
            .map(|s| s.stride)
            .product::<usize>()
    }

    /// Lists the names and shapes of the tensors that [`EfficientNet::load`] reads for the
    /// feature extractor (stem and all stages, no classification head), in timm's naming
    /// and load order. This is the float part of a timm `features_only` state dict, which
    /// also has an int64 `num_batches_tracked` per BatchNorm.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        fn batch_norm(out: &mut Vec<(String, Vec<usize>)>, prefix: &str, channels: usize) {
            for name in ["weight", "bias", "running_mean", "running_var"] {
                out.push((format!("{prefix}.{name}"), vec![channels]));
            }
        }
        let mut out = vec![(
            "conv_stem.weight".to_string(),
            vec![self.stem_channels, 3, 3, 3],
        )];
        batch_norm(&mut out, "bn1", self.stem_channels);
        let mut in_c = self.stem_channels;
        for (s, stage) in self.stages.iter().enumerate() {
            let (k, out_c) = (stage.kernel, stage.out_channels);
            for b in 0..stage.repeats {
                let p = format!("blocks.{s}.{b}");
                let mid = in_c * stage.expand;
                let (dw_bn, pw_name, pw_bn) = if stage.separable {
                    ("bn1", "conv_pw", "bn2")
                } else {
                    out.push((format!("{p}.conv_pw.weight"), vec![mid, in_c, 1, 1]));
                    batch_norm(&mut out, &format!("{p}.bn1"), mid);
                    ("bn2", "conv_pwl", "bn3")
                };
                out.push((format!("{p}.conv_dw.weight"), vec![mid, 1, k, k]));
                batch_norm(&mut out, &format!("{p}.{dw_bn}"), mid);
                if self.squeeze_excite {
                    // Same reduced width as `Block::load`: a quarter of the block input.
                    let r = ((in_c as f64) * 0.25).round().max(1.0) as usize;
                    out.push((format!("{p}.se.conv_reduce.weight"), vec![r, mid, 1, 1]));
                    out.push((format!("{p}.se.conv_reduce.bias"), vec![r]));
                    out.push((format!("{p}.se.conv_expand.weight"), vec![mid, r, 1, 1]));
                    out.push((format!("{p}.se.conv_expand.bias"), vec![mid]));
                }
                out.push((format!("{p}.{pw_name}.weight"), vec![out_c, mid, 1, 1]));
                batch_norm(&mut out, &format!("{p}.{pw_bn}"), out_c);
                in_c = out_c;
            }
        }
        out
    }
}

/// timm's `features_only` taps for `out_indices=[2, 3, 4]`: the outputs of stages 2, 4
/// and 6, at strides 8, 16 and 32.
pub const FEATURE_STAGES: [usize; 3] = [2, 4, 6];

#[derive(Debug, Clone)]
struct SqueezeExcite {
    reduce_w: Tensor,
    reduce_b: Tensor,
    expand_w: Tensor,
    expand_b: Tensor,
}

impl SqueezeExcite {
    fn load(w: &Weights, channels: usize, reduced: usize) -> Result<Self, ModelError> {
        Ok(Self {
            reduce_w: w.get("conv_reduce.weight", &[reduced, channels, 1, 1])?,
            reduce_b: w.get("conv_reduce.bias", &[reduced])?,
            expand_w: w.get("conv_expand.weight", &[channels, reduced, 1, 1])?,
            expand_b: w.get("conv_expand.bias", &[channels])?,
        })
    }
}

impl Module for SqueezeExcite {
    fn forward(&self, x: &Tensor) -> CandleResult<Tensor> {
        // (B, C, H, W) -> (B, C, 1, 1)
        let pooled = x.mean_keepdim(D::Minus1)?.mean_keepdim(D::Minus2)?;
        let gate = pointwise(&pooled, &self.reduce_w, Some(&self.reduce_b))?.silu()?;
        let gate =
            candle_nn::ops::sigmoid(&pointwise(&gate, &self.expand_w, Some(&self.expand_b))?)?;
        x.broadcast_mul(&gate)
    }
}

#[derive(Debug, Clone)]
struct Block {
    expand: Option<ConvBn>,
    depthwise: ConvBn,
    se: Option<SqueezeExcite>,
    project: ConvBn,
    skip: bool,
}

impl Block {
    fn load(
        w: &Weights,
        cfg: &EfficientNetConfig,
        stage: &Stage,
        in_c: usize,
        stride: usize,
    ) -> Result<Self, ModelError> {
        let act = cfg.activation;
        let out_c = stage.out_channels;
        let k = stage.kernel;
        let mid = in_c * stage.expand;
        // The depthwise-separable block names its BatchNorms bn1/bn2, the inverted
        // residual bn1/bn2/bn3, as in timm.
        let (expand, dw_bn, pw_name, pw_bn) = if stage.separable {
            (None, "bn1", "conv_pw", "bn2")
        } else {
            let conv = w.get("conv_pw.weight", &[mid, in_c, 1, 1])?;
            let bn = w.pp("bn1").batch_norm(mid, TF_BN_EPS)?;
            (
                Some(ConvBn::fold(&conv, &bn, 1, 1, act)?),
                "bn2",
                "conv_pwl",
                "bn3",
            )
        };
        let dw = w.get("conv_dw.weight", &[mid, 1, k, k])?;
        let depthwise = ConvBn::fold(
            &dw,
            &w.pp(dw_bn).batch_norm(mid, TF_BN_EPS)?,
            stride,
            mid,
            act,
        )?;
        let se = if cfg.squeeze_excite {
            let reduced = ((in_c as f64) * 0.25).round().max(1.0) as usize;
            Some(SqueezeExcite::load(&w.pp("se"), mid, reduced)?)
        } else {
            None
        };
        let pw = w.get(&format!("{pw_name}.weight"), &[out_c, mid, 1, 1])?;
        let project = ConvBn::fold(
            &pw,
            &w.pp(pw_bn).batch_norm(out_c, TF_BN_EPS)?,
            1,
            1,
            Activation::None,
        )?;
        Ok(Self {
            expand,
            depthwise,
            se,
            project,
            skip: stride == 1 && in_c == out_c,
        })
    }
}

impl Module for Block {
    fn forward(&self, x: &Tensor) -> CandleResult<Tensor> {
        let h = match &self.expand {
            Some(expand) => expand.forward(x)?,
            None => x.clone(),
        };
        let h = self.depthwise.forward(&h)?;
        let h = match &self.se {
            Some(se) => se.forward(&h)?,
            None => h,
        };
        if self.skip {
            self.project.forward_residual(&h, x)
        } else {
            self.project.forward(&h)
        }
    }
}

/// Classification head: 1x1 conv, BatchNorm + activation, global average pool, linear.
#[derive(Debug, Clone)]
struct Head {
    conv: ConvBn,
    classifier_w: Tensor,
    classifier_b: Tensor,
}

/// An EfficientNet feature extractor (and, when the weights have it, classifier).
#[derive(Debug, Clone)]
pub struct EfficientNet {
    config: EfficientNetConfig,
    stem: ConvBn,
    stages: Vec<Vec<Block>>,
    head: Option<Head>,
}

impl EfficientNet {
    /// Loads the backbone from timm-named weights. The classification head is loaded
    /// when `conv_head.weight` is present.
    pub fn load(w: &Weights, config: &EfficientNetConfig) -> Result<Self, ModelError> {
        let act = config.activation;
        let stem_w = w.get("conv_stem.weight", &[config.stem_channels, 3, 3, 3])?;
        let stem = ConvBn::fold(
            &stem_w,
            &w.pp("bn1").batch_norm(config.stem_channels, TF_BN_EPS)?,
            2,
            1,
            act,
        )?;
        let mut in_c = config.stem_channels;
        let mut stages = Vec::with_capacity(config.stages.len());
        for (s, stage) in config.stages.iter().enumerate() {
            let mut blocks = Vec::with_capacity(stage.repeats);
            for b in 0..stage.repeats {
                let stride = if b == 0 { stage.stride } else { 1 };
                blocks.push(Block::load(
                    &w.pp(format!("blocks.{s}.{b}")),
                    config,
                    stage,
                    in_c,
                    stride,
                )?);
                in_c = stage.out_channels;
            }
            stages.push(blocks);
        }
        let head = if w.contains("conv_head.weight") {
            let hc = config.head_channels;
            let conv = w.get("conv_head.weight", &[hc, in_c, 1, 1])?;
            let conv = ConvBn::fold(&conv, &w.pp("bn2").batch_norm(hc, TF_BN_EPS)?, 1, 1, act)?;
            let classifier_w = w.get("classifier.weight", &[1000, hc])?;
            let classifier_b = w.get("classifier.bias", &[1000])?;
            Some(Head {
                conv,
                classifier_w,
                classifier_b,
            })
        } else {
            None
        };
        Ok(Self {
            config: config.clone(),
            stem,
            stages,
            head,
        })
    }

    /// Returns the architecture this network was built with.
    pub fn config(&self) -> &EfficientNetConfig {
        &self.config
    }

    /// Runs the network up to the last requested stage and returns the outputs of
    /// `taps` (stage indices, ascending).
    pub fn features(&self, x: &Tensor, taps: &[usize]) -> CandleResult<Vec<Tensor>> {
        let last = taps.iter().copied().max().unwrap_or(0);
        let mut h = self.stem.forward(x)?;
        let mut out = Vec::with_capacity(taps.len());
        for (s, blocks) in self.stages.iter().enumerate().take(last + 1) {
            for block in blocks {
                h = block.forward(&h)?;
            }
            if taps.contains(&s) {
                out.push(h.clone());
            }
        }
        Ok(out)
    }

    /// ImageNet logits (B, 1000); fails when the weights had no classification head.
    pub fn classify(&self, x: &Tensor) -> CandleResult<Tensor> {
        let Some(head) = &self.head else {
            candle_core::bail!(
                "the backbone weights have no classification head (conv_head/classifier)"
            );
        };
        let last = self.stages.len() - 1;
        let h = self.features(x, &[last])?.remove(0);
        let h = head.conv.forward(&h)?;
        let pooled = h.mean(D::Minus1)?.mean(D::Minus1)?;
        pooled
            .matmul(&head.classifier_w.t()?)?
            .broadcast_add(&head.classifier_b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn b5_matches_timm_layout() {
        let cfg = EfficientNetConfig::from_name("tf_efficientnet_b5").unwrap();
        assert_eq!(cfg.stem_channels, 48);
        let repeats: Vec<usize> = cfg.stages.iter().map(|s| s.repeats).collect();
        assert_eq!(repeats, vec![3, 5, 5, 7, 7, 9, 3]);
        let channels: Vec<usize> = cfg.stages.iter().map(|s| s.out_channels).collect();
        assert_eq!(channels, vec![24, 40, 64, 128, 176, 304, 512]);
        assert_eq!(cfg.stage_channels(&FEATURE_STAGES), vec![64, 176, 512]);
        assert_eq!(cfg.stage_reduction(2), 8);
        assert_eq!(cfg.stage_reduction(4), 16);
        assert_eq!(cfg.stage_reduction(6), 32);
    }

    #[test]
    fn lite0_matches_timm_layout() {
        let cfg = EfficientNetConfig::from_name("tf_efficientnet_lite0").unwrap();
        assert_eq!(cfg.stem_channels, 32);
        assert_eq!(cfg.head_channels, 1280);
        let repeats: Vec<usize> = cfg.stages.iter().map(|s| s.repeats).collect();
        assert_eq!(repeats, vec![1, 2, 2, 3, 3, 4, 1]);
        assert_eq!(cfg.stage_channels(&FEATURE_STAGES), vec![40, 112, 320]);
        assert_eq!(cfg.activation, Activation::Relu6);
        assert!(!cfg.squeeze_excite);
    }
}
