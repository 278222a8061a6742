// SPDX-License-Identifier: MIT OR Apache-2.0
//! Scores, their normalisation and the per-frame scorer that the element and the CLI use.
//!
//! Normalisation follows anomalib 2.x's post-processor:
//! `clamp((x - t) / (hi - lo) + 0.5, 0, 1)`, so the model's own threshold always maps
//! to 0.5 and `normalised > 0.5` is the same decision as `raw > t`.

use std::path::Path;

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, ModelMeta};
use crate::imageops::{HeatMap, PackedFrame};
use crate::model::{ModelError, PatchFlow};

/// Threshold and range of raw scores, for images and for pixels of the anomaly map.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScoreStats {
    pub image_threshold: f32,
    pub image_min: f32,
    pub image_max: f32,
    pub pixel_threshold: f32,
    pub pixel_min: f32,
    pub pixel_max: f32,
}

impl ScoreStats {
    /// Normalised image score.
    pub fn normalize_image(&self, raw: f32) -> f32 {
        normalize(raw, self.image_threshold, self.image_min, self.image_max)
    }

    /// Normalised anomaly-map value.
    pub fn normalize_pixel(&self, raw: f32) -> f32 {
        normalize(raw, self.pixel_threshold, self.pixel_min, self.pixel_max)
    }
}

/// Normalises like anomalib's min-max post-processor around a threshold. A NaN
/// threshold becomes the middle of the range. NaN bounds leave `x` unchanged. Equal
/// bounds give 1, 0 or 0.5 for `x` above, below or at the threshold.
pub fn normalize(x: f32, threshold: f32, lo: f32, hi: f32) -> f32 {
    if lo.is_nan() || hi.is_nan() {
        return x;
    }
    let t = if threshold.is_nan() {
        (hi + lo) / 2.0
    } else {
        threshold
    };
    if hi == lo {
        return if x > t {
            1.0
        } else if x < t {
            0.0
        } else {
            0.5
        };
    }
    ((x - t) / (hi - lo) + 0.5).clamp(0.0, 1.0)
}

/// Result of scoring one image or frame.
#[derive(Debug, Clone)]
pub struct FrameScore {
    /// Raw image score: the maximum of the anomaly map, in [-1, 0].
    pub score: f32,
    /// Score normalised with the model's statistics, in [0, 1].
    pub normalized_score: f32,
    /// Normalised anomaly map at the model's input size, in [0, 1].
    pub heat: HeatMap,
}

impl FrameScore {
    /// Tells whether the normalised score exceeds `threshold` (0.5 is the model's own).
    pub fn is_anomalous(&self, threshold: f32) -> bool {
        self.normalized_score > threshold
    }
}

/// A loaded model with its statistics, ready to score images.
#[derive(Debug)]
pub struct Scorer {
    model: PatchFlow,
    meta: ModelMeta,
}

impl Scorer {
    /// Loads a model file onto `device`.
    pub fn load(path: &Path, device: &Device) -> Result<Self, ModelError> {
        let (model, meta) = checkpoint::load(path, device)?;
        Ok(Self { model, meta })
    }

    /// Wraps an already built model.
    pub fn new(model: PatchFlow, meta: ModelMeta) -> Self {
        Self { model, meta }
    }

    pub fn model(&self) -> &PatchFlow {
        &self.model
    }

    pub fn meta(&self) -> &ModelMeta {
        &self.meta
    }

    /// Scores a planar RGB image (3, H, W) with values in [0, 1].
    pub fn score_chw(
        &self,
        chw: &[f32],
        (h, w): (usize, usize),
    ) -> candle_core::Result<FrameScore> {
        let x = self.model.preprocess(chw, (h, w))?;
        let out = self.model.forward(&x)?;
        let score = out.score.flatten_all()?.to_vec1::<f32>()?[0];
        if !score.is_finite() {
            // A NaN score compares false with every threshold and would pass as normal.
            candle_core::bail!(
                "the model produced a non-finite score ({score}); its weights or this input are invalid"
            );
        }
        let (_, _, mh, mw) = out.anomaly_map.dims4()?;
        let stats = &self.meta.stats;
        let values = out
            .anomaly_map
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(|v| stats.normalize_pixel(v))
            .collect();
        Ok(FrameScore {
            score,
            normalized_score: stats.normalize_image(score),
            heat: HeatMap {
                width: mw,
                height: mh,
                values,
            },
        })
    }

    /// Scores a packed 8-bit frame.
    pub fn score_frame(&self, frame: &PackedFrame) -> candle_core::Result<FrameScore> {
        frame.validate().map_err(candle_core::Error::msg)?;
        self.score_chw(&frame.to_chw(), (frame.height, frame.width))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threshold_maps_to_half() {
        assert_eq!(normalize(-0.5, -0.5, -0.9, -0.1), 0.5);
        assert!(normalize(-0.4, -0.5, -0.9, -0.1) > 0.5);
        assert!(normalize(-0.6, -0.5, -0.9, -0.1) < 0.5);
    }

    #[test]
    fn normalize_clamps() {
        assert_eq!(normalize(10.0, 0.0, -1.0, 1.0), 1.0);
        assert_eq!(normalize(-10.0, 0.0, -1.0, 1.0), 0.0);
    }

    #[test]
    fn normalize_special_cases() {
        assert_eq!(normalize(0.3, 0.2, f32::NAN, 1.0), 0.3);
        assert_eq!(normalize(0.3, f32::NAN, 0.0, 1.0), 0.3 - 0.5 + 0.5);
        assert_eq!(normalize(0.3, 0.2, 0.5, 0.5), 1.0);
        assert_eq!(normalize(0.1, 0.2, 0.5, 0.5), 0.0);
        assert_eq!(normalize(0.2, 0.2, 0.5, 0.5), 0.5);
    }
}
