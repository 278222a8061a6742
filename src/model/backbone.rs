// SPDX-License-Identifier: MIT OR Apache-2.0
//! The frozen feature extractor, whichever timm family it comes from. anomalib's
//! `TimmFeatureExtractor` uses `out_indices=[2, 3, 4]` for every CNN backbone, which is
//! the stride-8, -16 and -32 outputs in both families. DINOv2 ViTs give three maps at
//! the patch stride 14 instead, from their first, middle and last blocks.

use candle_core::{Result as CandleResult, Tensor};

use super::efficientnet::{self, EfficientNet, EfficientNetConfig};
use super::resnet::{self, ResNet, ResNetConfig};
use super::vit::{self, Vit, VitConfig};
use super::weights::{ModelError, Weights};

/// Architecture of a backbone, looked up by its timm name.
#[derive(Debug, Clone, PartialEq)]
pub enum BackboneConfig {
    EfficientNet(EfficientNetConfig),
    ResNet(ResNetConfig),
    Vit(VitConfig),
}

impl BackboneConfig {
    /// Builds the architecture for a timm model name such as `tf_efficientnet_b5`,
    /// `resnet18` or `vit_small_patch14_dinov2`.
    pub fn from_name(name: &str) -> Option<Self> {
        EfficientNetConfig::from_name(name)
            .map(Self::EfficientNet)
            .or_else(|| ResNetConfig::from_name(name).map(Self::ResNet))
            .or_else(|| VitConfig::from_name(name).map(Self::Vit))
    }

    /// Names accepted by [`BackboneConfig::from_name`].
    pub fn supported_names() -> Vec<String> {
        let mut names = EfficientNetConfig::supported_names();
        names.extend(ResNetConfig::supported_names());
        names.extend(VitConfig::supported_names());
        names
    }

    /// timm model name.
    pub fn name(&self) -> &str {
        match self {
            Self::EfficientNet(cfg) => &cfg.name,
            Self::ResNet(cfg) => &cfg.name,
            Self::Vit(cfg) => &cfg.name,
        }
    }

    /// Channels of the three feature maps, finest first.
    pub fn stage_channels(&self) -> Vec<usize> {
        match self {
            Self::EfficientNet(cfg) => cfg.stage_channels(&efficientnet::FEATURE_STAGES),
            Self::ResNet(cfg) => cfg.stage_channels(&resnet::FEATURE_LAYERS),
            Self::Vit(cfg) => cfg.stage_channels(),
        }
    }

    /// Stride of the finest feature map, which sets the flow grid: anomalib's
    /// `min(feature_extractor.reductions)` for CNNs and the patch size for ViTs.
    pub fn min_stride(&self) -> usize {
        match self {
            Self::EfficientNet(cfg) => cfg.stage_reduction(efficientnet::FEATURE_STAGES[0]),
            Self::ResNet(cfg) => cfg.stage_reduction(resnet::FEATURE_LAYERS[0]),
            Self::Vit(_) => vit::PATCH_SIZE,
        }
    }

    /// Number that every side of a backbone input must be a multiple of: 1 for CNNs,
    /// which take any size, and the patch size for ViTs. PatchFlow floors its internal
    /// size and the size of every scale to this multiple.
    pub fn input_multiple(&self) -> usize {
        match self {
            Self::EfficientNet(_) | Self::ResNet(_) => 1,
            Self::Vit(_) => vit::PATCH_SIZE,
        }
    }

    /// Lists the names (timm keys, no prefix) and shapes of the tensors that
    /// [`Backbone::load`] reads.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        match self {
            Self::EfficientNet(cfg) => cfg.tensor_shapes(),
            Self::ResNet(cfg) => cfg.tensor_shapes(),
            Self::Vit(cfg) => cfg.tensor_shapes(),
        }
    }
}

/// A loaded backbone of any family.
#[derive(Debug, Clone)]
pub enum Backbone {
    EfficientNet(EfficientNet),
    ResNet(ResNet),
    Vit(Vit),
}

impl Backbone {
    /// Loads the backbone from timm-named weights.
    pub fn load(w: &Weights, config: &BackboneConfig) -> Result<Self, ModelError> {
        Ok(match config {
            BackboneConfig::EfficientNet(cfg) => Self::EfficientNet(EfficientNet::load(w, cfg)?),
            BackboneConfig::ResNet(cfg) => Self::ResNet(ResNet::load(w, cfg)?),
            BackboneConfig::Vit(cfg) => Self::Vit(Vit::load(w, cfg)?),
        })
    }

    /// Returns the architecture this backbone was built with.
    pub fn config(&self) -> BackboneConfig {
        match self {
            Self::EfficientNet(net) => BackboneConfig::EfficientNet(net.config().clone()),
            Self::ResNet(net) => BackboneConfig::ResNet(net.config().clone()),
            Self::Vit(net) => BackboneConfig::Vit(net.config().clone()),
        }
    }

    /// Returns the three feature maps of a normalised input, finest first: the
    /// stride-8, -16 and -32 maps of a CNN, or the stride-14 maps of a ViT's first,
    /// middle and last blocks.
    pub fn features(&self, x: &Tensor) -> CandleResult<Vec<Tensor>> {
        match self {
            Self::EfficientNet(net) => net.features(x, &efficientnet::FEATURE_STAGES),
            Self::ResNet(net) => net.features(x, &resnet::FEATURE_LAYERS),
            Self::Vit(net) => net.features(x, &net.config().feature_blocks()),
        }
    }

    /// Channels of the three feature maps, finest first.
    pub fn stage_channels(&self) -> Vec<usize> {
        self.config().stage_channels()
    }

    /// Stride of the finest feature map.
    pub fn min_stride(&self) -> usize {
        self.config().min_stride()
    }
}
