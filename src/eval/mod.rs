// SPDX-License-Identifier: MIT OR Apache-2.0
//! `patchflow eval`: scores a labelled test set and computes the metrics that
//! anomalib 2.7.0's test evaluator reports for PatchFlow, plus the F1-adaptive
//! thresholds, AUPRO and per-defect image AUROC.
//!
//! As in anomalib's test stage, AUROC and F1 work on the normalised, clamped scores and
//! maps (see [`crate::scoring::normalize`]), and F1 on the labels
//! `normalised > threshold` (0.5 by default, which is `raw > model threshold`). The
//! clamp can tie scores at 0 and 1, so the report also gives image AUROC on the raw
//! scores. The adaptive thresholds are searched on raw values, as anomalib's
//! post-processor does during validation, and reported in both units.

pub mod canvas;
pub mod dataset;
pub mod plots;

use std::path::PathBuf;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::imageops::{HeatMap, ResizeMode, load_rgb_chw, resize_planes};
use crate::metrics::{AdaptiveThreshold, Confusion, RankedScores, RegionScores};
use crate::predict::overlay_rgb;
use crate::scoring::{ScoreStats, Scorer};
use dataset::{Dataset, GOOD, TestSample, load_mask};

/// Settings of an evaluation.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Normalised score (and map value) above which an image (or pixel) is anomalous.
    pub threshold: f32,
    /// False positive rate up to which AUPRO integrates.
    pub aupro_fpr_limit: f64,
    /// Width in pixels of the overlay thumbnails kept for the grid plot; `None` keeps none.
    pub thumbnail_width: Option<usize>,
    /// Shows a progress bar on stderr while scoring.
    pub progress: bool,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            threshold: 0.5,
            aupro_fpr_limit: 0.3,
            thumbnail_width: None,
            progress: false,
        }
    }
}

/// A small packed RGB overlay of an image, its heatmap and its mask outline.
#[derive(Debug, Clone)]
pub struct Thumbnail {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
}

/// One scored test image.
#[derive(Debug, Clone)]
pub struct ScoredImage {
    pub sample: TestSample,
    /// Raw image score.
    pub score: f32,
    pub normalized_score: f32,
    /// Log score: the maximum over patches of `0.5 mean_c z^2`.
    pub log_score: f32,
    /// Raw anomaly map, row-major at `map_size`.
    pub map: Vec<f32>,
    /// (height, width) of the map: the model's input size.
    pub map_size: (usize, usize),
    /// Ground-truth mask at `map_size` when the dataset has masks.
    pub mask: Option<Vec<bool>>,
    pub thumbnail: Option<Thumbnail>,
}

/// Scores every image of `dataset`, loading its mask (resized to the map) when the
/// dataset has masks.
pub fn score_dataset(
    scorer: &Scorer,
    dataset: &Dataset,
    options: &EvalOptions,
) -> Result<Vec<ScoredImage>> {
    let bar = ProgressBar::with_draw_target(
        Some(dataset.samples.len() as u64),
        if options.progress {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    if let Ok(style) = ProgressStyle::with_template("scoring {bar:30} {pos}/{len} {elapsed}") {
        bar.set_style(style.progress_chars("=> "));
    }
    let stats = scorer.meta().stats;
    let mut scored = Vec::with_capacity(dataset.samples.len());
    for sample in &dataset.samples {
        let (chw, h, w) = load_rgb_chw(&sample.path)?;
        let raw = scorer
            .score_chw_raw(&chw, (h, w))
            .with_context(|| format!("cannot score {}", sample.path.display()))?;
        let map_size = (raw.height, raw.width);
        let mask = if dataset.has_masks {
            Some(match &sample.mask {
                Some(path) => {
                    let (mask, mask_size) = load_mask(path, map_size)?;
                    if mask_size != (h, w) {
                        tracing::warn!(
                            "mask {} is {}x{} but image {} is {}x{}: both are resized to the map",
                            path.display(),
                            mask_size.1,
                            mask_size.0,
                            sample.path.display(),
                            w,
                            h
                        );
                    }
                    mask
                }
                None => vec![false; raw.map.len()],
            })
        } else {
            None
        };
        let thumbnail = options.thumbnail_width.map(|width| {
            let heat = HeatMap {
                width: raw.width,
                height: raw.height,
                values: raw.map.iter().map(|&v| stats.normalize_pixel(v)).collect(),
            };
            thumbnail(&chw, (h, w), &heat, mask.as_deref(), width)
        });
        scored.push(ScoredImage {
            sample: sample.clone(),
            score: raw.score,
            normalized_score: stats.normalize_image(raw.score),
            log_score: raw.log_score,
            map: raw.map,
            map_size,
            mask,
            thumbnail,
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(scored)
}

/// Draws the overlay thumbnail: the image resized to `width` and the map's aspect
/// ratio, the heatmap at opacity 0.5, and the mask outline in white.
fn thumbnail(
    chw: &[f32],
    (h, w): (usize, usize),
    heat: &HeatMap,
    mask: Option<&[bool]>,
    width: usize,
) -> Thumbnail {
    let height = ((width * heat.height) as f64 / heat.width as f64).round() as usize;
    let height = height.clamp(width / 4, width * 2).max(1);
    let small = resize_planes(chw, 3, (h, w), (height, width), ResizeMode::Antialias);
    let mut rgb = overlay_rgb(&small, (height, width), heat, 0.5);
    if let Some(mask) = mask {
        // Nearest sampling of the map-sized mask; a pixel is on the outline when it is
        // inside and a 4-neighbour (or the border) is outside.
        let inside = |x: i64, y: i64| -> bool {
            if x < 0 || y < 0 || x >= width as i64 || y >= height as i64 {
                return false;
            }
            let my = y as usize * heat.height / height;
            let mx = x as usize * heat.width / width;
            mask[my * heat.width + mx]
        };
        for y in 0..height as i64 {
            for x in 0..width as i64 {
                let edge = inside(x, y)
                    && !(inside(x - 1, y)
                        && inside(x + 1, y)
                        && inside(x, y - 1)
                        && inside(x, y + 1));
                if edge {
                    let i = 3 * (y as usize * width + x as usize);
                    rgb[i..i + 3].copy_from_slice(&[255, 255, 255]);
                }
            }
        }
    }
    Thumbnail { width, height, rgb }
}

/// A threshold in raw model units and in normalised units.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Threshold {
    /// Raw value; null (NaN) where the normalisation cannot be inverted (equal or
    /// missing score bounds).
    pub raw: f32,
    pub normalized: f32,
}

/// The F1-adaptive threshold found on the test set and the F1 it reaches.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct AdaptiveReport {
    pub raw: f32,
    pub normalized: f32,
    /// F1 of `raw >= threshold` with anomalib's formula `2PR / (P + R + 1e-10)`.
    pub f1: f64,
}

/// The model's statistics and the decision threshold, in raw and normalised units.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Thresholds {
    /// The model's image threshold (normalised: 0.5 unless its bounds are degenerate).
    pub image: Threshold,
    /// The model's pixel threshold.
    pub pixel: Threshold,
    /// The decision threshold (`--threshold`) for image scores.
    pub decision_image: Threshold,
    /// The decision threshold for anomaly-map values.
    pub decision_pixel: Threshold,
    /// The model's statistics: the raw range used to normalise.
    pub stats: ScoreStats,
}

/// Image AUROC of the good images against one defect type.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DefectReport {
    pub defect: String,
    pub images: usize,
    /// Images of this type above the decision threshold.
    pub detected: usize,
    /// AUROC of the normalised scores of the good images and this type's images.
    pub image_auroc: Option<f64>,
}

/// One image's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImageReport {
    pub path: PathBuf,
    pub defect: String,
    /// Ground truth: "good" or "anomalous".
    pub label: &'static str,
    /// Raw score, the maximum of the anomaly map.
    pub score: f32,
    pub normalized_score: f32,
    /// Log score, the maximum over patches of `0.5 mean_c z^2`.
    pub log_score: f32,
    /// The decision: `normalized_score > threshold`.
    pub is_anomalous: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mask: Option<PathBuf>,
    /// Ground-truth anomalous pixels at the map size, when the dataset has masks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anomalous_pixels: Option<usize>,
}

/// Every metric of an evaluation. Pixel fields are null when the dataset has no masks.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalSummary {
    pub good_images: usize,
    pub anomalous_images: usize,
    /// AUROC of the normalised, clamped image scores (anomalib's test metric).
    pub image_auroc: Option<f64>,
    /// AUROC of the raw image scores, free of the ties the clamp creates.
    pub image_auroc_raw: Option<f64>,
    /// AUROC of the log scores, which separate images whose raw scores tie in `f32`
    /// near -1 or at 0.
    pub image_auroc_log: Option<f64>,
    /// Images whose normalised score is 0 or 1, the bounds of the clamp, where scores tie.
    pub clamped_images: usize,
    /// F1 of `normalised score > threshold`.
    pub image_f1: f64,
    pub accuracy: f64,
    /// The normalised decision threshold.
    pub threshold: f32,
    pub true_positive: usize,
    pub false_positive: usize,
    pub true_negative: usize,
    pub false_negative: usize,
    pub image_adaptive_threshold: Option<AdaptiveReport>,
    pub has_masks: bool,
    /// Pixels of all maps, and the anomalous ones among them.
    pub pixels: Option<usize>,
    pub anomalous_pixels: Option<usize>,
    /// AUROC of the normalised, clamped map values against the masks.
    pub pixel_auroc: Option<f64>,
    /// F1 of `normalised map value > threshold` against the masks.
    pub pixel_f1: Option<f64>,
    pub pixel_confusion: Option<Confusion>,
    /// Area under the per-region overlap curve up to `aupro_fpr_limit`, divided by it.
    pub pixel_aupro: Option<f64>,
    pub aupro_fpr_limit: f64,
    pub pixel_adaptive_threshold: Option<AdaptiveReport>,
    pub thresholds: Thresholds,
}

/// Files written by [`plots::write_plots`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlotFiles {
    pub roc: plots::PlotFile,
    pub histogram: plots::PlotFile,
    pub grid: plots::PlotFile,
}

/// The report that `patchflow eval --report` writes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalReport {
    pub summary: EvalSummary,
    pub per_defect: Vec<DefectReport>,
    pub images: Vec<ImageReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plots: Option<PlotFiles>,
}

/// The report and the curves the plots draw.
#[derive(Debug, Clone)]
pub struct Evaluation {
    pub report: EvalReport,
    /// Image ROC points `[fpr, tpr]` of the normalised scores.
    pub image_roc: Vec<[f64; 2]>,
    /// Pixel ROC points, when the dataset has masks.
    pub pixel_roc: Option<Vec<[f64; 2]>>,
}

/// Points kept on each ROC curve for plotting.
const ROC_PLOT_POINTS: usize = 1000;

/// Inverts the normalisation for a value strictly inside (0, 1): the raw value that
/// normalises to `normalized`. Returns NaN when the bounds are equal or missing.
fn denormalize(normalized: f32, threshold: f32, lo: f32, hi: f32) -> f32 {
    if lo.is_nan() || hi.is_nan() || hi == lo {
        return f32::NAN;
    }
    let t = if threshold.is_nan() {
        (hi + lo) / 2.0
    } else {
        threshold
    };
    (normalized - 0.5) * (hi - lo) + t
}

fn thresholds(stats: &ScoreStats, decision: f32) -> Thresholds {
    let s = stats;
    Thresholds {
        image: Threshold {
            raw: s.image_threshold,
            normalized: s.normalize_image(s.image_threshold),
        },
        pixel: Threshold {
            raw: s.pixel_threshold,
            normalized: s.normalize_pixel(s.pixel_threshold),
        },
        decision_image: Threshold {
            raw: denormalize(decision, s.image_threshold, s.image_min, s.image_max),
            normalized: decision,
        },
        decision_pixel: Threshold {
            raw: denormalize(decision, s.pixel_threshold, s.pixel_min, s.pixel_max),
            normalized: decision,
        },
        stats: *stats,
    }
}

/// Computes every metric of the scored images with the model's statistics.
pub fn evaluate(
    images: &[ScoredImage],
    stats: &ScoreStats,
    has_masks: bool,
    options: &EvalOptions,
) -> Evaluation {
    let threshold = options.threshold;
    let labels: Vec<bool> = images.iter().map(|i| i.sample.anomalous).collect();
    let normalized: Vec<f32> = images.iter().map(|i| i.normalized_score).collect();
    let raw: Vec<f32> = images.iter().map(|i| i.score).collect();
    let log: Vec<f32> = images.iter().map(|i| i.log_score).collect();
    let predicted: Vec<bool> = normalized.iter().map(|&s| s > threshold).collect();

    let ranked = RankedScores::from_labels(&normalized, &labels);
    let image_auroc = ranked.auroc();
    let image_roc = ranked.roc_curve(ROC_PLOT_POINTS);
    let ranked_raw = RankedScores::from_labels(&raw, &labels);
    let image_adaptive = ranked_raw
        .f1_adaptive_threshold()
        .map(|t| adaptive_report(t, |v| stats.normalize_image(v)));
    let confusion = Confusion::new(&predicted, &labels);

    let pixel = has_masks.then(|| pixel_metrics(images, stats, options));
    let pixel_roc = pixel.as_ref().map(|p| p.roc.clone());

    let summary = EvalSummary {
        good_images: labels.iter().filter(|l| !**l).count(),
        anomalous_images: labels.iter().filter(|l| **l).count(),
        image_auroc,
        image_auroc_raw: ranked_raw.auroc(),
        image_auroc_log: RankedScores::from_labels(&log, &labels).auroc(),
        clamped_images: normalized.iter().filter(|&&s| s == 0.0 || s == 1.0).count(),
        image_f1: confusion.f1(),
        accuracy: confusion.accuracy(),
        threshold,
        true_positive: confusion.true_positive,
        false_positive: confusion.false_positive,
        true_negative: confusion.true_negative,
        false_negative: confusion.false_negative,
        image_adaptive_threshold: image_adaptive,
        has_masks,
        pixels: pixel.as_ref().map(|p| p.pixels),
        anomalous_pixels: pixel.as_ref().map(|p| p.anomalous_pixels),
        pixel_auroc: pixel.as_ref().and_then(|p| p.auroc),
        pixel_f1: pixel.as_ref().map(|p| p.confusion.f1()),
        pixel_confusion: pixel.as_ref().map(|p| p.confusion),
        pixel_aupro: pixel.as_ref().and_then(|p| p.aupro),
        aupro_fpr_limit: options.aupro_fpr_limit,
        pixel_adaptive_threshold: pixel.as_ref().and_then(|p| p.adaptive),
        thresholds: thresholds(stats, threshold),
    };
    let report = EvalReport {
        summary,
        per_defect: per_defect(images, threshold),
        images: images
            .iter()
            .map(|i| ImageReport {
                path: i.sample.path.clone(),
                defect: i.sample.defect.clone(),
                label: if i.sample.anomalous {
                    "anomalous"
                } else {
                    GOOD
                },
                score: i.score,
                normalized_score: i.normalized_score,
                log_score: i.log_score,
                is_anomalous: i.normalized_score > threshold,
                mask: i.sample.mask.clone(),
                anomalous_pixels: i.mask.as_ref().map(|m| m.iter().filter(|v| **v).count()),
            })
            .collect(),
        plots: None,
    };
    Evaluation {
        report,
        image_roc,
        pixel_roc,
    }
}

fn adaptive_report(t: AdaptiveThreshold, normalize: impl Fn(f32) -> f32) -> AdaptiveReport {
    AdaptiveReport {
        raw: t.threshold,
        normalized: normalize(t.threshold),
        f1: t.f1,
    }
}

/// Defect types in order of first appearance, each against all good images.
fn per_defect(images: &[ScoredImage], threshold: f32) -> Vec<DefectReport> {
    let mut defects: Vec<&str> = Vec::new();
    for image in images.iter().filter(|i| i.sample.anomalous) {
        if !defects.contains(&image.sample.defect.as_str()) {
            defects.push(&image.sample.defect);
        }
    }
    let good: Vec<f32> = images
        .iter()
        .filter(|i| !i.sample.anomalous)
        .map(|i| i.normalized_score)
        .collect();
    defects
        .into_iter()
        .map(|defect| {
            let scores: Vec<f32> = images
                .iter()
                .filter(|i| i.sample.anomalous && i.sample.defect == defect)
                .map(|i| i.normalized_score)
                .collect();
            DefectReport {
                defect: defect.to_string(),
                images: scores.len(),
                detected: scores.iter().filter(|&&s| s > threshold).count(),
                image_auroc: RankedScores::new(scores, good.clone()).auroc(),
            }
        })
        .collect()
}

struct PixelMetrics {
    pixels: usize,
    anomalous_pixels: usize,
    auroc: Option<f64>,
    roc: Vec<[f64; 2]>,
    confusion: Confusion,
    aupro: Option<f64>,
    adaptive: Option<AdaptiveReport>,
}

/// Pixel metrics over all maps. Each pass builds its sorted arrays and drops them
/// before the next, so the peak is about the maps plus two copies of their values.
fn pixel_metrics(
    images: &[ScoredImage],
    stats: &ScoreStats,
    options: &EvalOptions,
) -> PixelMetrics {
    let masks = || {
        images.iter().map(|i| {
            i.mask
                .as_deref()
                .expect("every image has a mask when the dataset has masks")
        })
    };

    // Normalised values: AUROC, ROC curve and F1.
    let mut positives = Vec::new();
    let mut negatives = Vec::new();
    let mut confusion = Confusion::default();
    for (image, mask) in images.iter().zip(masks()) {
        for (&value, &label) in image.map.iter().zip(mask) {
            let v = stats.normalize_pixel(value);
            confusion.record(v > options.threshold, label);
            if label {
                positives.push(v);
            } else {
                negatives.push(v);
            }
        }
    }
    let (pixels, anomalous_pixels) = (positives.len() + negatives.len(), positives.len());
    let ranked = RankedScores::new(positives, negatives);
    let auroc = ranked.auroc();
    let roc = ranked.roc_curve(ROC_PLOT_POINTS);
    drop(ranked);

    // Raw values: the adaptive threshold.
    let mut positives = Vec::with_capacity(anomalous_pixels);
    let mut negatives = Vec::with_capacity(pixels - anomalous_pixels);
    for (image, mask) in images.iter().zip(masks()) {
        for (&value, &label) in image.map.iter().zip(mask) {
            if label {
                positives.push(value);
            } else {
                negatives.push(value);
            }
        }
    }
    let adaptive = RankedScores::new(positives, negatives)
        .f1_adaptive_threshold()
        .map(|t| adaptive_report(t, |v| stats.normalize_pixel(v)));

    // Normalised values with their regions: AUPRO.
    let mut regions = RegionScores::new();
    for (image, mask) in images.iter().zip(masks()) {
        let values: Vec<f32> = image
            .map
            .iter()
            .map(|&v| stats.normalize_pixel(v))
            .collect();
        regions.push(&values, mask, image.map_size.1);
    }
    let aupro = regions.aupro(options.aupro_fpr_limit);

    PixelMetrics {
        pixels,
        anomalous_pixels,
        auroc,
        roc,
        confusion,
        aupro,
        adaptive,
    }
}

fn format_metric(value: Option<f64>) -> String {
    value.map_or_else(|| "n/a".to_string(), |v| format!("{v:.4}"))
}

fn format_adaptive(adaptive: Option<&AdaptiveReport>) -> String {
    match adaptive {
        Some(a) => format!(
            "{:.4} normalised (raw {:.6}), F1 {:.4}",
            a.normalized, a.raw, a.f1
        ),
        None => "n/a".to_string(),
    }
}

impl EvalReport {
    /// Formats the text summary that `patchflow eval` prints. The first line keeps the
    /// format of earlier versions, which scripts parse.
    pub fn text_lines(&self) -> Vec<String> {
        let s = &self.summary;
        let mut lines = vec![format!(
            "image AUROC {}, image F1 {:.4}, accuracy {:.4} at threshold {} ({} good, {} anomalous; TP {} FP {} TN {} FN {})",
            format_metric(s.image_auroc),
            s.image_f1,
            s.accuracy,
            s.threshold,
            s.good_images,
            s.anomalous_images,
            s.true_positive,
            s.false_positive,
            s.true_negative,
            s.false_negative
        )];
        let scope = match (s.pixels, s.anomalous_pixels) {
            (Some(all), Some(anomalous)) => format!(
                " (FPR limit {}) over {all} pixels ({anomalous} anomalous)",
                s.aupro_fpr_limit
            ),
            _ => ": no ground-truth masks".to_string(),
        };
        lines.push(format!(
            "pixel AUROC {}, pixel F1 {}, AUPRO {}{scope}",
            format_metric(s.pixel_auroc),
            format_metric(s.pixel_f1),
            format_metric(s.pixel_aupro),
        ));
        let mut adaptive = format!(
            "F1-adaptive threshold: image {}",
            format_adaptive(s.image_adaptive_threshold.as_ref())
        );
        if s.has_masks {
            adaptive.push_str(&format!(
                "; pixel {}",
                format_adaptive(s.pixel_adaptive_threshold.as_ref())
            ));
        }
        lines.push(adaptive);
        lines.push(format!(
            "image AUROC on raw scores {}, on log scores {} ({} of {} normalised scores clamped to 0 or 1)",
            format_metric(s.image_auroc_raw),
            format_metric(s.image_auroc_log),
            s.clamped_images,
            s.good_images + s.anomalous_images
        ));
        if !self.per_defect.is_empty() {
            let parts: Vec<String> = self
                .per_defect
                .iter()
                .map(|d| {
                    format!(
                        "{} {} ({}/{} detected)",
                        d.defect,
                        format_metric(d.image_auroc),
                        d.detected,
                        d.images
                    )
                })
                .collect();
            lines.push(format!("image AUROC per defect: {}", parts.join(", ")));
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats() -> ScoreStats {
        ScoreStats {
            image_threshold: -0.5,
            image_min: -1.0,
            image_max: 0.0,
            pixel_threshold: -0.5,
            pixel_min: -1.0,
            pixel_max: 0.0,
            image_log_threshold: None,
        }
    }

    /// Builds a scored image with a 2x2 map whose maximum is the image score.
    fn image(defect: &str, map: [f32; 4], mask: Option<[bool; 4]>) -> ScoredImage {
        let score = map.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        ScoredImage {
            sample: TestSample {
                path: PathBuf::from(format!("{defect}.png")),
                defect: defect.to_string(),
                anomalous: defect != GOOD,
                mask: None,
            },
            score,
            normalized_score: stats().normalize_image(score),
            log_score: -(-score).ln(),
            map: map.to_vec(),
            map_size: (2, 2),
            mask: mask.map(|m| m.to_vec()),
            thumbnail: None,
        }
    }

    #[test]
    fn metrics_without_masks_are_null() {
        let images = [
            image(GOOD, [-0.9, -0.8, -0.7, -0.6], None),
            image("crack", [-0.9, -0.2, -0.7, -0.6], None),
        ];
        let eval = evaluate(&images, &stats(), false, &EvalOptions::default());
        let s = &eval.report.summary;
        assert_eq!(s.image_auroc, Some(1.0));
        assert_eq!(s.pixel_auroc, None);
        assert_eq!(s.pixel_f1, None);
        assert_eq!(s.pixel_aupro, None);
        assert!(eval.pixel_roc.is_none());
        let json = serde_json::to_value(&eval.report).unwrap();
        assert!(json["summary"]["pixel_auroc"].is_null());
        assert!(json["summary"]["pixel_f1"].is_null());
        let lines = eval.report.text_lines();
        assert!(lines[1].contains("pixel AUROC n/a"), "{}", lines[1]);
    }

    #[test]
    fn pixel_metrics_with_masks() {
        let images = [
            image(GOOD, [-0.9, -0.8, -0.7, -0.6], Some([false; 4])),
            image(
                "crack",
                [-0.9, -0.2, -0.7, -0.6],
                Some([false, true, false, false]),
            ),
        ];
        let eval = evaluate(&images, &stats(), true, &EvalOptions::default());
        let s = &eval.report.summary;
        assert_eq!(s.pixels, Some(8));
        assert_eq!(s.anomalous_pixels, Some(1));
        assert_eq!(s.pixel_auroc, Some(1.0));
        // Only -0.2 normalises above 0.5.
        assert_eq!(s.pixel_f1, Some(1.0));
        assert_eq!(s.pixel_aupro, Some(1.0));
        let adaptive = s.pixel_adaptive_threshold.unwrap();
        assert_eq!(adaptive.raw, -0.2);
        assert_eq!(eval.report.images[1].anomalous_pixels, Some(1));
    }

    #[test]
    fn per_defect_auroc_uses_all_good_images() {
        let images = [
            image(GOOD, [-0.9, -0.9, -0.9, -0.4], None),
            image(GOOD, [-0.9, -0.9, -0.9, -0.8], None),
            image("crack", [-0.9, -0.9, -0.9, -0.1], None),
            image("hole", [-0.9, -0.9, -0.9, -0.6], None),
        ];
        let eval = evaluate(&images, &stats(), false, &EvalOptions::default());
        let defects = &eval.report.per_defect;
        assert_eq!(defects.len(), 2);
        assert_eq!(defects[0].defect, "crack");
        assert_eq!(defects[0].image_auroc, Some(1.0));
        assert_eq!(defects[0].detected, 1);
        assert_eq!(defects[1].defect, "hole");
        assert_eq!(defects[1].image_auroc, Some(0.5));
        assert_eq!(defects[1].detected, 0);
    }

    #[test]
    fn decision_threshold_in_raw_units() {
        let t = thresholds(&stats(), 0.7);
        assert_eq!(t.image.raw, -0.5);
        assert_eq!(t.image.normalized, 0.5);
        assert!((t.decision_image.raw - (-0.3)).abs() < 1e-6);
        let flat = ScoreStats {
            image_min: 0.0,
            image_max: 0.0,
            ..stats()
        };
        assert!(thresholds(&flat, 0.5).decision_image.raw.is_nan());
    }
}
