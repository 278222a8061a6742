// SPDX-License-Identifier: MIT OR Apache-2.0
//! Model configuration: the PatchFlow hyper-parameters, the backbone choice and the
//! pre-processing that belongs to the weights. Stored as JSON in every model file.

use serde::{Deserialize, Serialize};

use super::backbone::BackboneConfig;
use crate::imageops::ResizeMode;

/// ImageNet channel means, as used by timm's ImageNet backbones and anomalib's default
/// pre-processor.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Pre-processing from a frame to the model's input tensor: resize to `input_size`, then
/// `(x - mean) / std` per channel on [0, 1] values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    pub resize: ResizeMode,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Preprocess {
    /// Pre-processing for timm ImageNet backbones (ResNet, tf_efficientnet_b*).
    pub fn imagenet() -> Self {
        Self {
            resize: ResizeMode::Antialias,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }

    /// Pre-processing that the TF EfficientNet-Lite weights were trained with.
    pub fn lite() -> Self {
        Self {
            resize: ResizeMode::Antialias,
            mean: [0.5; 3],
            std: [0.5; 3],
        }
    }
}

/// PatchFlow hyper-parameters, with anomalib's names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// timm model name of the backbone, e.g. `tf_efficientnet_lite0`.
    pub backbone: String,
    /// Height and width of the model input, in pixels.
    pub input_size: [usize; 2],
    /// Optional centre crop (height, width) applied to the input tensor before the backbone.
    pub crop_size: Option<[usize; 2]>,
    /// Number of input resolutions: scale `s` runs the backbone at `input / 2^s`.
    pub num_scales: usize,
    /// Side of the average-pooling window applied to every feature map.
    pub patch_size: usize,
    /// Number of coupling blocks in the normalizing flow.
    pub flow_steps: usize,
    /// Channels after the 1x1 adaptor, which is the flow's dimension.
    pub flow_feature_dim: usize,
    /// Hidden channels of the coupling subnet.
    pub flow_hidden_dim: usize,
    pub preprocess: Preprocess,
}

impl ModelConfig {
    /// Returns the CPU default: EfficientNet-Lite0 at 256x256 with 3 scales.
    pub fn lite0() -> Self {
        Self {
            backbone: "tf_efficientnet_lite0".into(),
            input_size: [256, 256],
            crop_size: None,
            num_scales: 3,
            patch_size: 3,
            flow_steps: 1,
            flow_feature_dim: 128,
            flow_hidden_dim: 128,
            preprocess: Preprocess::lite(),
        }
    }

    /// anomalib 2.7's default: tf_efficientnet_b5 at 768x768 with ImageNet normalisation.
    pub fn b5() -> Self {
        Self {
            backbone: "tf_efficientnet_b5".into(),
            input_size: [768, 768],
            preprocess: Preprocess::imagenet(),
            ..Self::lite0()
        }
    }

    /// timm ResNet-18 at 256x256 with ImageNet normalisation, the input size of
    /// anomalib's FastFlow default with the same backbone.
    pub fn resnet18() -> Self {
        Self {
            backbone: "resnet18".into(),
            preprocess: Preprocess::imagenet(),
            ..Self::lite0()
        }
    }

    /// Returns a DINOv2 ViT (`vit_small_patch14_dinov2`, `vit_base_patch14_dinov2` or
    /// `vit_large_patch14_dinov2`) at 256x256 with ImageNet normalisation. The backbone
    /// works on the centre 252x252, an 18x18 grid of 14-pixel patches.
    pub fn dinov2(backbone: &str) -> Self {
        Self {
            backbone: backbone.into(),
            preprocess: Preprocess::imagenet(),
            ..Self::lite0()
        }
    }

    /// Names accepted by [`ModelConfig::preset`].
    pub fn preset_names() -> Vec<&'static str> {
        vec![
            "lite0",
            "b5",
            "resnet18",
            "vit_small_patch14_dinov2",
            "vit_base_patch14_dinov2",
            "vit_large_patch14_dinov2",
        ]
    }

    /// Looks a preset up by name (see [`ModelConfig::preset_names`]) or by backbone name.
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "lite0" | "tf_efficientnet_lite0" => Some(Self::lite0()),
            "b5" | "tf_efficientnet_b5" => Some(Self::b5()),
            "resnet18" => Some(Self::resnet18()),
            "vit_small_patch14_dinov2" | "vit_base_patch14_dinov2" | "vit_large_patch14_dinov2" => {
                Some(Self::dinov2(name))
            }
            _ => None,
        }
    }

    /// Number that the backbone needs every input side to be a multiple of (see
    /// [`BackboneConfig::input_multiple`]); 1 for unknown backbones, which
    /// [`super::PatchFlow::new`] rejects anyway.
    pub fn input_multiple(&self) -> usize {
        BackboneConfig::from_name(&self.backbone).map_or(1, |b| b.input_multiple())
    }

    /// Size the backbone works at: the crop if one is set, else the input size, with
    /// each side floored to [`ModelConfig::input_multiple`]. anomalib floors the same way
    /// for DINOv2, so 768x768 becomes 756x756.
    pub fn internal_size(&self) -> [usize; 2] {
        let [h, w] = self.crop_size.unwrap_or(self.input_size);
        let m = self.input_multiple();
        [h / m * m, w / m * m]
    }

    /// Tells whether the input is centre-cropped to [`ModelConfig::internal_size`] before
    /// the backbone: when `crop_size` is set, or when flooring changed the input size.
    pub fn is_cropped(&self) -> bool {
        self.internal_size() != self.input_size
    }

    /// Size of the backbone input at scale `s`: the internal size divided by `2^s`
    /// (integer division), each side floored to [`ModelConfig::input_multiple`].
    pub fn scale_size(&self, s: usize) -> [usize; 2] {
        let [h, w] = self.internal_size();
        let m = self.input_multiple();
        [(h >> s) / m * m, (w >> s) / m * m]
    }

    /// Checks the values that would otherwise fail deep inside a forward pass.
    pub fn validate(&self) -> Result<(), String> {
        // The flow works on the grid of the backbone's finest stride (8 for the CNNs,
        // 14 for the ViTs) over the internal size, so that size must hold one cell.
        let stride = BackboneConfig::from_name(&self.backbone).map_or(8, |b| b.min_stride());
        let [h, w] = self.input_size;
        if h < stride || w < stride {
            return Err(format!(
                "input_size {h}x{w} is too small for {}: each side must be at least {stride} pixels",
                self.backbone
            ));
        }
        if let Some([ch, cw]) = self.crop_size
            && (ch > h || cw > w)
        {
            return Err(format!(
                "crop_size {ch}x{cw} is larger than input_size {h}x{w}"
            ));
        }
        let [ih, iw] = self.internal_size();
        if ih < stride || iw < stride {
            return Err(format!(
                "crop_size {ih}x{iw} is too small for {}: each side must be at least {stride} pixels",
                self.backbone
            ));
        }
        // Every scale needs a backbone input of at least one pixel, or one patch for a
        // ViT.
        let multiple = self.input_multiple();
        let fits = |s: usize| self.scale_size(s).iter().all(|&side| side >= multiple);
        if self.num_scales == 0 || self.num_scales > 8 || !fits(self.num_scales - 1) {
            let unit = if multiple == 1 {
                "1 pixel".to_string()
            } else {
                format!("{multiple} pixels")
            };
            return Err(format!(
                "num_scales {} does not fit {ih}x{iw}: use 1 to 8 scales, with the smallest scale at least {unit}",
                self.num_scales
            ));
        }
        if self.patch_size == 0 {
            return Err("patch_size must be at least 1".into());
        }
        if self.flow_steps == 0 || self.flow_feature_dim < 2 || self.flow_hidden_dim == 0 {
            return Err(format!(
                "flow_steps {}, flow_feature_dim {} and flow_hidden_dim {} must be positive (feature dim at least 2)",
                self.flow_steps, self.flow_feature_dim, self.flow_hidden_dim
            ));
        }
        if self.preprocess.std.iter().any(|s| *s <= 0.0) {
            return Err(format!(
                "preprocess.std {:?} must be positive",
                self.preprocess.std
            ));
        }
        Ok(())
    }
}
