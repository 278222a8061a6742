// SPDX-License-Identifier: MIT OR Apache-2.0
//! Model configuration: the PatchFlow hyper-parameters, the backbone choice and the
//! pre-processing that belongs to the weights. Stored as JSON in every model file.

use serde::{Deserialize, Serialize};

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

    /// Looks a preset up by name (`lite0`, `b5`, `resnet18`) or by backbone name.
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "lite0" | "tf_efficientnet_lite0" => Some(Self::lite0()),
            "b5" | "tf_efficientnet_b5" => Some(Self::b5()),
            "resnet18" => Some(Self::resnet18()),
            _ => None,
        }
    }

    /// Size the backbone works at: the crop if one is set, else the input size.
    pub fn internal_size(&self) -> [usize; 2] {
        self.crop_size.unwrap_or(self.input_size)
    }

    /// Checks the values that would otherwise fail deep inside a forward pass.
    pub fn validate(&self) -> Result<(), String> {
        let [h, w] = self.input_size;
        if h < 8 || w < 8 {
            return Err(format!(
                "input_size {h}x{w} is too small: each side must be at least 8 pixels"
            ));
        }
        if let Some([ch, cw]) = self.crop_size
            && (ch > h || cw > w)
        {
            return Err(format!(
                "crop_size {ch}x{cw} is larger than input_size {h}x{w}"
            ));
        }
        // The flow works on the stride-8 grid of the (cropped) input, and every scale
        // needs at least one pixel.
        let [ih, iw] = self.internal_size();
        if ih < 8 || iw < 8 {
            return Err(format!(
                "crop_size {ih}x{iw} is too small: each side must be at least 8 pixels"
            ));
        }
        if self.num_scales == 0
            || self.num_scales > 8
            || (ih >> (self.num_scales - 1)) == 0
            || (iw >> (self.num_scales - 1)) == 0
        {
            return Err(format!(
                "num_scales {} does not fit {ih}x{iw}: use 1 to 8 scales, with the smallest scale at least 1 pixel",
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
