// SPDX-License-Identifier: MIT OR Apache-2.0
//! Scores, their normalisation and the per-frame scorer that the element and the CLI use.
//!
//! Normalisation follows anomalib 2.x's post-processor:
//! `clamp((x - t) / (hi - lo) + 0.5, 0, 1)`, so the model's own threshold always maps
//! to 0.5 and `normalised > 0.5` is the same decision as `raw > t`.
//!
//! Every score also has a log-domain value. anomalib's map is `-exp(-l)` with
//! `l = 0.5 mean_c z^2` per patch. Near -1, float32 values lie about 6e-8 apart, so
//! patches whose `l` differ by less than that tie, and above `l` = 104 the map is
//! exactly 0. The log score, the maximum of `l` over the flow grid, keeps such images
//! apart. Use the raw or normalised score to reproduce anomalib's decisions, and the log
//! score to rank or threshold images that tie at either end.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use candle_core::{Device, DeviceLocation};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, ModelMeta};
use crate::imageops::{HeatMap, PackedFrame};
use crate::model::{ModelError, PatchFlow};

/// Threshold and range of raw scores, for images and for pixels of the anomaly map.
///
/// A value may be NaN, as in anomalib before its post-processor has seen validation
/// data, and [`normalize`] treats it as anomalib does. JSON has no NaN, so serde_json
/// writes it as `null`, which reads back as NaN.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScoreStats {
    #[serde(deserialize_with = "f32_or_nan")]
    pub image_threshold: f32,
    #[serde(deserialize_with = "f32_or_nan")]
    pub image_min: f32,
    #[serde(deserialize_with = "f32_or_nan")]
    pub image_max: f32,
    #[serde(deserialize_with = "f32_or_nan")]
    pub pixel_threshold: f32,
    #[serde(deserialize_with = "f32_or_nan")]
    pub pixel_min: f32,
    #[serde(deserialize_with = "f32_or_nan")]
    pub pixel_max: f32,
    /// Threshold on the log score, calibrated like `image_threshold`. Absent in models
    /// that were imported or written before log scores existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_log_threshold: Option<f32>,
}

/// Reads a number, or `null` as NaN.
fn f32_or_nan<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<f32, D::Error> {
    let value: Option<f32> = Option::deserialize(deserializer)?;
    Ok(value.unwrap_or(f32::NAN))
}

impl ScoreStats {
    /// Returns the model's own threshold on the scale of `domain`. Without a calibrated
    /// log threshold, the log threshold is `-ln(-image_threshold)`: the map is an
    /// interpolation of `-exp(-l)`, so every image whose raw score exceeds the raw
    /// threshold also exceeds this log threshold.
    pub fn threshold(&self, domain: ScoreDomain) -> f32 {
        match domain {
            ScoreDomain::Normalized => 0.5,
            ScoreDomain::Raw => self.image_threshold,
            ScoreDomain::Log => self
                .image_log_threshold
                .unwrap_or_else(|| -(-self.image_threshold).ln()),
        }
    }

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

/// Scale on which a threshold is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScoreDomain {
    /// The normalised score in [0, 1]; 0.5 is the model's own threshold.
    #[default]
    Normalized,
    /// The raw score, the maximum of the anomaly map, in [-1, 0].
    Raw,
    /// The log score, the maximum over patches of `0.5 mean_c z^2`, in [0, inf).
    Log,
}

impl ScoreDomain {
    pub const NAMES: [&'static str; 3] = ["normalized", "raw", "log"];

    /// Lower-case name, as written in configs and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Normalized => "normalized",
            Self::Raw => "raw",
            Self::Log => "log",
        }
    }

    /// Range of values that a threshold on this scale can take.
    pub fn range(self) -> (f32, f32) {
        match self {
            Self::Normalized => (0.0, 1.0),
            Self::Raw => (-1.0, 0.0),
            Self::Log => (0.0, f32::INFINITY),
        }
    }
}

impl std::fmt::Display for ScoreDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ScoreDomain {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "normalized" | "normalised" => Ok(Self::Normalized),
            "raw" => Ok(Self::Raw),
            "log" => Ok(Self::Log),
            other => Err(format!(
                "unknown score domain {other:?}: expected one of {}",
                Self::NAMES.join(", ")
            )),
        }
    }
}

/// Decision rule: a frame is anomalous when its score in `domain` exceeds `value`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Threshold {
    pub value: f32,
    pub domain: ScoreDomain,
}

impl Threshold {
    /// The model's own decision: normalised score above 0.5.
    pub const MODEL: Self = Self::normalized(0.5);

    pub const fn normalized(value: f32) -> Self {
        Self {
            value,
            domain: ScoreDomain::Normalized,
        }
    }

    /// Builds a threshold after checking that `value` lies in the domain's range.
    pub fn new(value: f32, domain: ScoreDomain) -> Result<Self, String> {
        let (lo, hi) = domain.range();
        if value.is_nan() || value < lo || value > hi {
            return Err(format!(
                "threshold {value} is outside the {domain} score range [{lo}, {hi}]"
            ));
        }
        Ok(Self { value, domain })
    }

    /// Tells whether `score` is above the threshold.
    pub fn is_exceeded_by(&self, score: &FrameScore) -> bool {
        score.value(self.domain) > self.value
    }
}

impl From<f32> for Threshold {
    /// Reads a bare number as a normalised threshold.
    fn from(value: f32) -> Self {
        Self::normalized(value)
    }
}

impl std::fmt::Display for Threshold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.domain {
            ScoreDomain::Normalized => write!(f, "{}", self.value),
            domain => write!(f, "{} ({domain})", self.value),
        }
    }
}

/// Result of scoring one image or frame.
#[derive(Debug, Clone)]
pub struct FrameScore {
    /// Raw image score: the maximum of the anomaly map, in [-1, 0].
    pub score: f32,
    /// Score normalised with the model's statistics, in [0, 1].
    pub normalized_score: f32,
    /// Log score: the maximum over patches of `0.5 mean_c z^2`.
    pub log_score: f32,
    /// Normalised anomaly map at the model's input size, in [0, 1].
    pub heat: HeatMap,
    /// Per-patch `0.5 mean_c z^2` on the flow grid.
    pub log_patches: HeatMap,
}

impl FrameScore {
    /// Builds a result with the three image scores and empty maps, for code that only
    /// needs the decision, such as message builders and alarm logic.
    pub fn without_maps(score: f32, normalized_score: f32, log_score: f32) -> Self {
        let empty = HeatMap {
            width: 0,
            height: 0,
            values: Vec::new(),
        };
        Self {
            score,
            normalized_score,
            log_score,
            heat: empty.clone(),
            log_patches: empty,
        }
    }

    /// Tells whether the normalised score exceeds `threshold` (0.5 is the model's own).
    pub fn is_anomalous(&self, threshold: f32) -> bool {
        self.normalized_score > threshold
    }

    /// Returns the image score on the scale of `domain`.
    pub fn value(&self, domain: ScoreDomain) -> f32 {
        match domain {
            ScoreDomain::Normalized => self.normalized_score,
            ScoreDomain::Raw => self.score,
            ScoreDomain::Log => self.log_score,
        }
    }
}

/// Raw model output for one image, before normalisation.
#[derive(Debug, Clone)]
pub struct RawScore {
    /// Image score: the maximum of the anomaly map before any crop padding, in [-1, 0].
    pub score: f32,
    /// Log score: the maximum over patches of `0.5 mean_c z^2`.
    pub log_score: f32,
    /// Anomaly map at the model's input size, row-major, in [-1, 0].
    pub map: Vec<f32>,
    pub width: usize,
    pub height: usize,
    /// Per-patch `0.5 mean_c z^2` on the flow grid.
    pub log_patches: HeatMap,
}

/// Models loaded through [`Scorer::shared`], by canonical file path and device.
type SharedScorers = HashMap<(PathBuf, DeviceLocation), Weak<Scorer>>;

static SHARED_SCORERS: Mutex<Option<SharedScorers>> = Mutex::new(None);

/// A loaded model with its statistics, ready to score images.
///
/// Scoring takes `&self` and the model holds only immutable tensors, so one `Scorer` is
/// `Send + Sync` and serves several streaming threads at once without a lock.
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

    /// Returns the model in `path` on `device`, loading it only when no caller in this
    /// process keeps it already, and whether this call loaded it.
    ///
    /// Models are keyed by canonical path and device. The cache keeps weak references, so
    /// a model is freed when the last `Arc` is dropped and loaded again on the next call.
    /// A file changed on disk while a caller holds its model is not reloaded. The cache
    /// lock is held during loading, so concurrent calls for one model load it once.
    pub fn shared(path: &Path, device: &Device) -> Result<(Arc<Self>, bool), ModelError> {
        let canonical = path.canonicalize().map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let key = (canonical, device.location());
        // A panic while loading leaves no entry behind, so a poisoned lock is safe to use.
        let mut cache = SHARED_SCORERS
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let cache = cache.get_or_insert_with(HashMap::new);
        if let Some(scorer) = cache.get(&key).and_then(Weak::upgrade) {
            return Ok((scorer, false));
        }
        cache.retain(|_, weak| weak.strong_count() > 0);
        let scorer = Arc::new(Self::load(&key.0, device)?);
        cache.insert(key, Arc::downgrade(&scorer));
        Ok((scorer, true))
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
        let raw = self.score_chw_raw(chw, (h, w))?;
        let stats = &self.meta.stats;
        Ok(FrameScore {
            score: raw.score,
            normalized_score: stats.normalize_image(raw.score),
            log_score: raw.log_score,
            heat: HeatMap {
                width: raw.width,
                height: raw.height,
                values: raw.map.iter().map(|&v| stats.normalize_pixel(v)).collect(),
            },
            log_patches: raw.log_patches,
        })
    }

    /// Scores a planar RGB image (3, H, W) with values in [0, 1] and returns the raw
    /// score and anomaly map, before normalisation.
    pub fn score_chw_raw(
        &self,
        chw: &[f32],
        (h, w): (usize, usize),
    ) -> candle_core::Result<RawScore> {
        let x = self.model.preprocess(chw, (h, w))?;
        let out = self.model.forward(&x)?;
        let score = out.score.flatten_all()?.to_vec1::<f32>()?[0];
        let log_score = out.log_score.flatten_all()?.to_vec1::<f32>()?[0];
        if !score.is_finite() || log_score.is_nan() {
            // A NaN score compares false with every threshold and would pass as normal.
            candle_core::bail!(
                "the model produced a non-finite score ({score}); its weights or this input are invalid"
            );
        }
        let (_, _, height, width) = out.anomaly_map.dims4()?;
        let map = out.anomaly_map.flatten_all()?.to_vec1::<f32>()?;
        let (_, _, gh, gw) = out.log_map.dims4()?;
        Ok(RawScore {
            score,
            log_score,
            map,
            width,
            height,
            log_patches: HeatMap {
                width: gw,
                height: gh,
                values: out.log_map.flatten_all()?.to_vec1::<f32>()?,
            },
        })
    }

    /// Scores a packed 8-bit frame.
    pub fn score_frame(&self, frame: &PackedFrame) -> candle_core::Result<FrameScore> {
        frame.validate().map_err(candle_core::Error::msg)?;
        // The conversion and resizing before the forward pass run on the inference
        // pool too.
        crate::device::on_cpu_pool(|| self.score_chw(&frame.to_chw(), (frame.height, frame.width)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scorer_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Scorer>();
    }

    #[test]
    fn shared_scorer_reports_missing_file() {
        let err =
            Scorer::shared(Path::new("/nonexistent/model.safetensors"), &Device::Cpu).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/model.safetensors"),
            "{err}"
        );
    }

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

    fn frame(score: f32, normalized_score: f32, log_score: f32) -> FrameScore {
        FrameScore::without_maps(score, normalized_score, log_score)
    }

    #[test]
    fn threshold_compares_its_domain() {
        // Saturated frames: raw score 0 and normalised 1, distinguished only by the log score.
        let strong = frame(0.0, 1.0, 150.0);
        let log = Threshold::new(120.0, ScoreDomain::Log).unwrap();
        assert!(log.is_exceeded_by(&strong));
        assert!(!log.is_exceeded_by(&frame(0.0, 1.0, 110.0)));
        let raw = Threshold::new(-0.5, ScoreDomain::Raw).unwrap();
        assert!(raw.is_exceeded_by(&frame(-0.4, 0.2, 0.9)));
        assert!(!raw.is_exceeded_by(&frame(-0.6, 0.9, 0.5)));
        assert!(Threshold::MODEL.is_exceeded_by(&frame(-0.9, 0.6, 0.1)));
        assert!(!Threshold::MODEL.is_exceeded_by(&frame(-0.1, 0.5, 2.0)));
    }

    #[test]
    fn threshold_range_is_checked() {
        assert!(Threshold::new(1.5, ScoreDomain::Normalized).is_err());
        assert!(Threshold::new(0.5, ScoreDomain::Raw).is_err());
        assert!(Threshold::new(-1.0, ScoreDomain::Log).is_err());
        assert!(Threshold::new(f32::NAN, ScoreDomain::Log).is_err());
        assert!(Threshold::new(1e6, ScoreDomain::Log).is_ok());
        let err = Threshold::new(0.5, ScoreDomain::Raw).unwrap_err();
        assert!(err.contains("raw"), "{err}");
    }

    #[test]
    fn domain_names_round_trip() {
        for name in ScoreDomain::NAMES {
            let domain: ScoreDomain = name.parse().unwrap();
            assert_eq!(domain.name(), name);
        }
        assert!("linear".parse::<ScoreDomain>().is_err());
    }

    #[test]
    fn nan_statistics_survive_json() {
        let stats = ScoreStats {
            image_threshold: f32::NAN,
            image_min: -0.9,
            image_max: -0.1,
            pixel_threshold: -0.5,
            pixel_min: f32::NAN,
            pixel_max: f32::NAN,
            image_log_threshold: None,
        };
        let json = serde_json::to_string(&stats).unwrap();
        let back: ScoreStats = serde_json::from_str(&json).unwrap();
        assert!(back.image_threshold.is_nan(), "{json}");
        assert!(back.pixel_min.is_nan(), "{json}");
        assert!(back.pixel_max.is_nan(), "{json}");
        assert_eq!(back.image_min, -0.9);
        assert_eq!(back.pixel_threshold, -0.5);
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
