// SPDX-License-Identifier: MIT OR Apache-2.0
//! PatchFlow (Zhang et al., "PatchFlow", arXiv 2602.05238) as anomalib 2.7.0 implements
//! it in `anomalib/models/image/patchflow/torch_model.py`.
//!
//! The backbone runs at `num_scales` input resolutions (`input / 2^s`, plain bilinear).
//! Its three feature maps (stride 8, 16 and 32 for a CNN, or three blocks at the patch
//! stride 14 for a DINOv2 ViT) are average-pooled (`patch_size`, zero padding counted),
//! resized to the grid of the finest stride and concatenated. A 1x1 adaptor with bias
//! maps them to `flow_feature_dim` channels, and a normalizing flow maps those to `z`.
//! The anomaly map is `-exp(-0.5 mean_c z^2)` resized to the input, and the image score
//! is its maximum. For a ViT every size is floored to a multiple of 14, so an input that
//! is no multiple of 14 is centre-cropped and the map is padded back with -1 (see
//! [`ModelConfig::internal_size`]).

pub mod backbone;
pub mod config;
mod cpu;
pub mod efficientnet;
pub mod flow;
pub mod ops;
pub mod resnet;
pub mod synthetic;
pub mod vit;
pub mod weights;

use candle_core::{D, DType, Device, Result as CandleResult, Tensor};

pub use backbone::{Backbone, BackboneConfig};
pub use config::{ModelConfig, Preprocess};
pub use weights::{ModelError, Weights};

use crate::imageops::ResizeMode;
use flow::{BlockDims, Flow};

/// Key prefixes of the three parts of a model file.
pub const BACKBONE_PREFIX: &str = "backbone";
pub const ADAPTOR_PREFIX: &str = "feature_adaptor";
pub const FLOW_PREFIX: &str = "flow";

/// Outputs of a forward pass in eval mode.
#[derive(Debug)]
pub struct Inference {
    /// Anomaly map (B, 1, H, W) at the input size, values in [-1, 0].
    pub anomaly_map: Tensor,
    /// Image scores (B,): the maximum of the map before any crop padding.
    pub score: Tensor,
    /// Per-patch `0.5 mean_c z^2` on the flow grid (B, 1, Hg, Wg): the log-domain twin
    /// of the map, which keeps its resolution where the map saturates in float32.
    pub log_map: Tensor,
    /// Image log scores (B,): the maximum of `log_map`.
    pub log_score: Tensor,
}

/// A PatchFlow model: frozen backbone, trainable adaptor and flow.
#[derive(Debug)]
pub struct PatchFlow {
    config: ModelConfig,
    backbone: Backbone,
    adaptor_w: Tensor,
    adaptor_b: Tensor,
    flow: Flow,
    weights: Weights,
}

impl PatchFlow {
    /// Builds the model from weights named `backbone.*`, `feature_adaptor.*` and
    /// `flow.module_list.{k}.*`.
    pub fn new(config: &ModelConfig, weights: &Weights) -> Result<Self, ModelError> {
        config.validate().map_err(ModelError::InvalidConfig)?;
        let backbone_cfg = backbone_config(&config.backbone)?;
        let backbone = Backbone::load(&weights.pp(BACKBONE_PREFIX), &backbone_cfg)?;
        let fused = fused_channels(config, &backbone_cfg);
        let f = config.flow_feature_dim;
        let adaptor = weights.pp(ADAPTOR_PREFIX);
        let adaptor_w = adaptor.get("weight", &[f, fused, 1, 1])?;
        let adaptor_b = adaptor.get("bias", &[f])?;
        let dims = BlockDims {
            channels: f,
            hidden: config.flow_hidden_dim,
        };
        let flow = Flow::load(&weights.pp(FLOW_PREFIX), config.flow_steps, dims)?;
        Ok(Self {
            config: config.clone(),
            backbone,
            adaptor_w,
            adaptor_b,
            flow,
            weights: weights.clone(),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        self.adaptor_w.device()
    }

    pub fn backbone(&self) -> &Backbone {
        &self.backbone
    }

    pub fn flow(&self) -> &Flow {
        &self.flow
    }

    /// Returns the weights this model was built from. Flow BatchNorm running statistics may have
    /// moved on since (see [`PatchFlow::tensors`]).
    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    /// Lists every tensor of the model under its file name, with the current running statistics.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = self
            .weights
            .tensors()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (k, block) in self.flow.blocks.iter().enumerate() {
            let (mean, var) = block.running_stats();
            for (name, value) in [("running_mean", mean), ("running_var", var)] {
                let key = format!("{FLOW_PREFIX}.module_list.{k}.subnet.2.{name}");
                if let Some(entry) = out.iter_mut().find(|(n, _)| *n == key) {
                    entry.1 = value;
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Size (H, W) of the grid that the flow works on: the internal size divided by the
    /// finest feature stride.
    pub fn grid_size(&self) -> (usize, usize) {
        let [h, w] = self.config.internal_size();
        let stride = self.backbone.min_stride();
        (h / stride, w / stride)
    }

    /// Channels of the fused multi-scale features (the adaptor's input).
    pub fn fused_channels(&self) -> usize {
        fused_channels(&self.config, &self.backbone.config())
    }

    /// Backbone features of a normalised input (B, 3, H, W), scale-major:
    /// `[s0 L2, s0 L3, s0 L4, s1 L2, ...]`.
    pub fn extract(&self, x: &Tensor) -> CandleResult<Vec<Tensor>> {
        let x = self.crop(x)?;
        let mut feats = Vec::with_capacity(3 * self.config.num_scales);
        for s in 0..self.config.num_scales {
            let xs = if s == 0 {
                x.clone()
            } else {
                let [h, w] = self.config.scale_size(s);
                ops::resize(&x, (h, w), ResizeMode::Bilinear)?
            };
            feats.extend(self.backbone.features(&xs)?);
        }
        Ok(feats)
    }

    /// Pools, resizes and concatenates backbone features into (B, C_fused, Hg, Wg).
    pub fn fuse(&self, feats: &[Tensor]) -> CandleResult<Tensor> {
        let grid = self.grid_size();
        if !feats.is_empty()
            && feats
                .iter()
                .all(|f| f.device().is_cpu() && f.dtype() == DType::F32 && f.rank() == 4)
        {
            return self.fuse_cpu(feats, grid);
        }
        let pooled = feats
            .iter()
            .map(|f| {
                ops::resize(
                    &ops::avg_pool_same(f, self.config.patch_size)?,
                    grid,
                    ResizeMode::Bilinear,
                )
            })
            .collect::<CandleResult<Vec<_>>>()?;
        Tensor::cat(&pooled, 1)
    }

    /// [`Self::fuse`] for f32 maps on the CPU, in one pass per output plane.
    fn fuse_cpu(&self, feats: &[Tensor], (gh, gw): (usize, usize)) -> CandleResult<Tensor> {
        let feats = feats
            .iter()
            .map(Tensor::contiguous)
            .collect::<CandleResult<Vec<_>>>()?;
        let storages: Vec<_> = feats.iter().map(|f| f.storage_and_layout()).collect();
        let mut maps = Vec::with_capacity(feats.len());
        for (f, (storage, layout)) in feats.iter().zip(&storages) {
            let candle_core::Storage::Cpu(candle_core::CpuStorage::F32(data)) = &**storage else {
                candle_core::bail!("fusion expects f32 CPU feature maps");
            };
            let (start, end) = layout.contiguous_offsets().expect("made contiguous above");
            let (b, c, h, w) = f.dims4()?;
            maps.push((&data[start..end], [b, c, h, w]));
        }
        let batch = maps[0].1[0];
        let channels = maps.iter().map(|(_, d)| d[1]).sum::<usize>();
        let fused = cpu::pool_resize_concat(&maps, self.config.patch_size, (gh, gw));
        Tensor::from_vec(fused, (batch, channels, gh, gw), &Device::Cpu)
    }

    /// Fused features of a normalised input: the frozen part of the model.
    pub fn embed(&self, x: &Tensor) -> CandleResult<Tensor> {
        self.fuse(&self.extract(x)?)
    }

    /// Applies the 1x1 adaptor: (B, C_fused, Hg, Wg) -> (B, F, Hg, Wg).
    pub fn adapt(&self, fused: &Tensor) -> CandleResult<Tensor> {
        ops::pointwise(fused, &self.adaptor_w, Some(&self.adaptor_b))
    }

    /// Adaptor and flow on fused features: returns `(z, logdet)`.
    pub fn flow_forward(&self, fused: &Tensor, train: bool) -> CandleResult<(Tensor, Tensor)> {
        self.flow.forward(&self.adapt(fused)?, train)
    }

    /// Anomaly map at the internal size (B, 1, Hi, Wi) and image score (B,) from `z`.
    pub fn anomaly_map(&self, z: &Tensor) -> CandleResult<(Tensor, Tensor)> {
        self.upsample_map(&z.sqr()?.mean_keepdim(1)?.affine(-0.5, 0.0)?.exp()?.neg()?)
    }

    /// Resizes a map on the flow grid to the internal size and returns it with its
    /// maximum per image.
    fn upsample_map(&self, low: &Tensor) -> CandleResult<(Tensor, Tensor)> {
        let [h, w] = self.config.internal_size();
        let map = ops::resize(low, (h, w), ResizeMode::Bilinear)?;
        let score = map.flatten_from(1)?.max(D::Minus1)?;
        Ok((map, score))
    }

    /// Per-patch `0.5 mean_c z^2` on the flow grid (B, 1, Hg, Wg): the negative log of
    /// the map's magnitude, which does not saturate in float32.
    pub fn log_map(&self, z: &Tensor) -> CandleResult<Tensor> {
        z.sqr()?.mean_keepdim(1)?.affine(0.5, 0.0)
    }

    /// Full eval-mode forward pass on a normalised input at `input_size`.
    pub fn forward(&self, x: &Tensor) -> CandleResult<Inference> {
        crate::device::on_cpu_pool(|| self.forward_here(x))
    }

    fn forward_here(&self, x: &Tensor) -> CandleResult<Inference> {
        self.score_fused(&self.embed(x)?)
    }

    /// Runs the eval-mode forward pass from fused features (see [`Self::embed`]): the
    /// adaptor, the flow, the anomaly map and the scores.
    pub fn score_fused(&self, fused: &Tensor) -> CandleResult<Inference> {
        let ((map, score), log_map) = if fused.device().is_cpu() && fused.dtype() == DType::F32 {
            // The CPU kernels: the adaptor as a matrix product with its bias, the flow
            // without the log-determinant, and the map from one pass over z, because
            // `-exp(-0.5 mean z^2)` is `-exp(-log_map)`.
            let adapted = ops::conv_same(
                fused,
                &self.adaptor_w,
                &self.adaptor_b,
                1,
                ops::Activation::None,
            )?;
            let z = self.flow.transform(&adapted)?;
            let log_map = half_mean_square(&z)?;
            (self.upsample_map(&log_map.neg()?.exp()?.neg()?)?, log_map)
        } else {
            let (z, _) = self.flow_forward(fused, false)?;
            (self.anomaly_map(&z)?, self.log_map(&z)?)
        };
        let log_score = log_map.flatten_from(1)?.max(D::Minus1)?;
        Ok(Inference {
            anomaly_map: self.uncrop(&map)?,
            score,
            log_map,
            log_score,
        })
    }

    fn crop(&self, x: &Tensor) -> CandleResult<Tensor> {
        if self.config.is_cropped() {
            let [h, w] = self.config.internal_size();
            ops::centre_crop(x, (h, w))
        } else {
            Ok(x.clone())
        }
    }

    /// Pads a map made at the crop size with -1 back to the input size, split like the crop.
    fn uncrop(&self, map: &Tensor) -> CandleResult<Tensor> {
        let [ih, iw] = self.config.input_size;
        let (_, _, h, w) = map.dims4()?;
        if (h, w) == (ih, iw) {
            return Ok(map.clone());
        }
        let pad = |t: &Tensor, dim: usize, before: usize, after: usize| -> CandleResult<Tensor> {
            let shifted = t.affine(1.0, 1.0)?;
            shifted
                .pad_with_zeros(dim, before, after)?
                .affine(1.0, -1.0)
        };
        let top = (ih - h) / 2;
        let left = (iw - w) / 2;
        let padded = pad(map, 2, top, ih - h - top)?;
        pad(&padded, 3, left, iw - w - left)
    }

    /// Normalises an image (3, H, W) in [0, 1] at any size into the model input
    /// (1, 3, Hin, Win): resize, then `(x - mean) / std`.
    pub fn preprocess(&self, chw: &[f32], (h, w): (usize, usize)) -> CandleResult<Tensor> {
        let [ih, iw] = self.config.input_size;
        let p = &self.config.preprocess;
        let mut data = crate::imageops::resize_planes(chw, 3, (h, w), (ih, iw), p.resize);
        for (c, plane) in data.chunks_exact_mut(ih * iw).enumerate() {
            let (mean, std) = (p.mean[c], p.std[c]);
            for v in plane {
                *v = (*v - mean) / std;
            }
        }
        Tensor::from_vec(data, (1, 3, ih, iw), self.device())
    }
}

/// `0.5 mean_c z^2` of an f32 CPU tensor (B, C, H, W), as (B, 1, H, W).
fn half_mean_square(z: &Tensor) -> CandleResult<Tensor> {
    let (b, c, h, w) = z.dims4()?;
    let values = z.flatten_all()?.to_vec1::<f32>()?;
    let plane = h * w;
    let mut out = vec![0f32; b * plane];
    for (item, sums) in out.chunks_exact_mut(plane.max(1)).enumerate() {
        for channel in values[item * c * plane..(item + 1) * c * plane].chunks_exact(plane) {
            for (sum, v) in sums.iter_mut().zip(channel) {
                *sum += v * v;
            }
        }
        let scale = 0.5 / c as f32;
        for sum in sums.iter_mut() {
            *sum *= scale;
        }
    }
    Tensor::from_vec(out, (b, 1, h, w), z.device())
}

/// Looks the backbone architecture up by its timm name.
pub fn backbone_config(name: &str) -> Result<BackboneConfig, ModelError> {
    BackboneConfig::from_name(name).ok_or_else(|| ModelError::UnknownBackbone {
        name: name.to_string(),
        supported: BackboneConfig::supported_names().join(", "),
    })
}

fn fused_channels(config: &ModelConfig, backbone: &BackboneConfig) -> usize {
    config.num_scales * backbone.stage_channels().iter().sum::<usize>()
}

/// Untrained adaptor and flow tensors for `config`, named as [`PatchFlow::new`] expects.
/// The permutation of each flow block is drawn from `rng`.
pub fn init_head_tensors(
    config: &ModelConfig,
    rng: &mut impl rand::Rng,
    device: &Device,
) -> Result<Vec<(String, Tensor)>, ModelError> {
    let backbone_cfg = backbone_config(&config.backbone)?;
    let fused = fused_channels(config, &backbone_cfg);
    let f = config.flow_feature_dim;
    let bound = 1.0 / (fused as f64).sqrt();
    let mut out = vec![
        (
            format!("{ADAPTOR_PREFIX}.weight"),
            flow::uniform(rng, bound, &[f, fused, 1, 1], DType::F32, device)?,
        ),
        (
            format!("{ADAPTOR_PREFIX}.bias"),
            flow::uniform(rng, bound, &[f], DType::F32, device)?,
        ),
    ];
    let dims = BlockDims {
        channels: f,
        hidden: config.flow_hidden_dim,
    };
    for k in 0..config.flow_steps {
        let mut perm: Vec<usize> = (0..f).collect();
        rand::seq::SliceRandom::shuffle(perm.as_mut_slice(), rng);
        for (name, t) in flow::init_block_tensors(dims, &perm, rng, DType::F32, device)? {
            out.push((format!("{FLOW_PREFIX}.module_list.{k}.{name}"), t));
        }
    }
    Ok(out)
}
