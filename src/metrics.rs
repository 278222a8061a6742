// SPDX-License-Identifier: MIT OR Apache-2.0
//! Detection metrics computed the way anomalib 2.7.0's evaluator computes them: an exact
//! ROC over the distinct score values, integrated with the trapezoid rule, F1 on hard
//! labels, the F1-adaptive threshold over the exact precision-recall curve, and AUPRO.
//!
//! Everything is computed in `f64` from sorted `f32` values. Scores are ranked with
//! [`f32::total_cmp`], so a NaN sorts above every number; `-0.0` and `0.0` are one value.
//! Memory stays linear in the number of values: the sorts work in place on plain `f32`
//! arrays (one for each class), and only AUPRO keeps a region index next to the values
//! inside defect regions.

use serde::Serialize;

/// Area under the ROC curve of `scores` for `labels` (true = anomalous). Tied scores
/// form one point of the curve. Returns `None` when either class is empty.
pub fn auroc(scores: &[f32], labels: &[bool]) -> Option<f64> {
    RankedScores::from_labels(scores, labels).auroc()
}

/// Tells whether two sorted neighbours form one threshold: equal numbers, or the same NaN.
fn same_value(a: f32, b: f32) -> bool {
    a == b || a.total_cmp(&b).is_eq()
}

fn sort_descending(values: &mut [f32]) {
    values.sort_unstable_by(|a, b| b.total_cmp(a));
}

/// Scores split by ground truth, each class sorted from the highest value down: the
/// input of the ROC, its area and the F1-adaptive threshold.
#[derive(Debug, Clone, Default)]
pub struct RankedScores {
    positives: Vec<f32>,
    negatives: Vec<f32>,
}

/// One point of a ranking: the samples scoring at least `threshold`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct RankPoint {
    threshold: f32,
    true_positives: usize,
    false_positives: usize,
}

impl RankedScores {
    /// Sorts the scores of anomalous (`positives`) and normal (`negatives`) samples.
    pub fn new(mut positives: Vec<f32>, mut negatives: Vec<f32>) -> Self {
        sort_descending(&mut positives);
        sort_descending(&mut negatives);
        Self {
            positives,
            negatives,
        }
    }

    /// Splits `scores` by `labels` (true = anomalous).
    pub fn from_labels(scores: &[f32], labels: &[bool]) -> Self {
        assert_eq!(scores.len(), labels.len(), "one label per score");
        let mut positives = Vec::new();
        let mut negatives = Vec::new();
        for (&score, &label) in scores.iter().zip(labels) {
            if label {
                positives.push(score);
            } else {
                negatives.push(score);
            }
        }
        Self::new(positives, negatives)
    }

    /// Number of anomalous samples.
    pub fn positives(&self) -> usize {
        self.positives.len()
    }

    /// Number of normal samples.
    pub fn negatives(&self) -> usize {
        self.negatives.len()
    }

    /// Visits each distinct score from the highest down, with the counts of positives and
    /// negatives that score at least that much. Samples with equal scores are consumed
    /// together, so ties form one point.
    fn for_each_point(&self, mut visit: impl FnMut(RankPoint)) {
        let (pos, neg) = (&self.positives, &self.negatives);
        let (mut i, mut j) = (0, 0);
        while i < pos.len() || j < neg.len() {
            let threshold = match (pos.get(i), neg.get(j)) {
                (Some(&p), Some(&n)) => {
                    if p.total_cmp(&n).is_ge() {
                        p
                    } else {
                        n
                    }
                }
                (Some(&p), None) => p,
                (None, Some(&n)) => n,
                (None, None) => unreachable!("the loop condition leaves a sample"),
            };
            while i < pos.len() && same_value(pos[i], threshold) {
                i += 1;
            }
            while j < neg.len() && same_value(neg[j], threshold) {
                j += 1;
            }
            visit(RankPoint {
                threshold,
                true_positives: i,
                false_positives: j,
            });
        }
    }

    /// Area under the ROC curve, with the trapezoid rule between the points of the
    /// distinct thresholds. Returns `None` when either class is empty.
    pub fn auroc(&self) -> Option<f64> {
        if self.positives.is_empty() || self.negatives.is_empty() {
            return None;
        }
        let (p, n) = (self.positives.len() as f64, self.negatives.len() as f64);
        let (mut prev_fpr, mut prev_tpr) = (0f64, 0f64);
        let mut area = 0f64;
        self.for_each_point(|point| {
            let tpr = point.true_positives as f64 / p;
            let fpr = point.false_positives as f64 / n;
            area += (fpr - prev_fpr) * (tpr + prev_tpr) / 2.0;
            (prev_fpr, prev_tpr) = (fpr, tpr);
        });
        Some(area)
    }

    /// ROC points `[fpr, tpr]` from `[0, 0]` to `[1, 1]`, thinned for plotting: a point is
    /// kept when it lies at least `1 / max_points` (in fpr + tpr) from the last kept
    /// one, and the last point is always kept. Returns an empty curve when either class
    /// is empty.
    pub fn roc_curve(&self, max_points: usize) -> Vec<[f64; 2]> {
        if self.positives.is_empty() || self.negatives.is_empty() {
            return Vec::new();
        }
        let (p, n) = (self.positives.len() as f64, self.negatives.len() as f64);
        let step = 1.0 / max_points.max(1) as f64;
        let mut curve = vec![[0.0, 0.0]];
        let mut pending = None;
        self.for_each_point(|point| {
            let xy = [
                point.false_positives as f64 / n,
                point.true_positives as f64 / p,
            ];
            let last = curve[curve.len() - 1];
            if (xy[0] - last[0]).abs() + (xy[1] - last[1]).abs() >= step {
                curve.push(xy);
                pending = None;
            } else {
                pending = Some(xy);
            }
        });
        curve.extend(pending);
        curve
    }

    /// Computes the F1-adaptive threshold of anomalib's `F1AdaptiveThreshold` without
    /// binning: the score that maximises `F1 = 2PR / (P + R + 1e-10)` for the decision
    /// `score >= threshold` over every distinct score. Among equal maxima the lowest
    /// threshold wins, as the first `argmax` over ascending thresholds does. Without
    /// anomalous samples it is the highest score, without normal samples the lowest.
    /// Returns `None` without samples.
    ///
    /// NOTE: anomalib computes precision and recall in `f32`, so two nearly equal F1
    /// maxima can resolve to a different threshold there than in this `f64` version.
    pub fn f1_adaptive_threshold(&self) -> Option<AdaptiveThreshold> {
        let positives = self.positives.len();
        if positives == 0 {
            let highest = *self.negatives.first()?;
            return Some(AdaptiveThreshold {
                threshold: highest,
                f1: 0.0,
            });
        }
        if self.negatives.is_empty() {
            let lowest = self.positives[positives - 1];
            return Some(AdaptiveThreshold {
                threshold: lowest,
                f1: adaptive_f1(positives, 0, positives),
            });
        }
        let mut best = AdaptiveThreshold {
            threshold: f32::NAN,
            f1: f64::NEG_INFINITY,
        };
        self.for_each_point(|point| {
            let f1 = adaptive_f1(point.true_positives, point.false_positives, positives);
            // `>=` because the walk runs from the highest threshold down.
            if f1 >= best.f1 {
                best = AdaptiveThreshold {
                    threshold: point.threshold,
                    f1,
                };
            }
        });
        Some(best)
    }
}

/// F1 as anomalib's adaptive threshold computes it, with NaN replaced by 0.
fn adaptive_f1(true_positives: usize, false_positives: usize, positives: usize) -> f64 {
    let precision = true_positives as f64 / (true_positives + false_positives) as f64;
    let recall = true_positives as f64 / positives as f64;
    let f1 = 2.0 * precision * recall / (precision + recall + 1e-10);
    if f1.is_nan() { 0.0 } else { f1 }
}

/// The threshold that maximises F1 and the F1 of `score >= threshold` there.
///
/// NOTE: anomalib's post-processor labels a sample anomalous when `score > threshold`
/// (strictly), so the samples scoring exactly the threshold count as normal there and
/// its F1 at this threshold can be lower than `f1`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct AdaptiveThreshold {
    pub threshold: f32,
    pub f1: f64,
}

/// Counts of a binary decision against ground truth.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Confusion {
    pub true_positive: usize,
    pub false_positive: usize,
    pub true_negative: usize,
    pub false_negative: usize,
}

impl Confusion {
    /// Tallies predictions against labels.
    pub fn new(predicted: &[bool], labels: &[bool]) -> Self {
        let mut c = Self::default();
        for (&p, &l) in predicted.iter().zip(labels) {
            c.record(p, l);
        }
        c
    }

    /// Counts one decision.
    pub fn record(&mut self, predicted: bool, label: bool) {
        match (predicted, label) {
            (true, true) => self.true_positive += 1,
            (true, false) => self.false_positive += 1,
            (false, false) => self.true_negative += 1,
            (false, true) => self.false_negative += 1,
        }
    }

    /// F1 score; 0 when there are no positive predictions and no positives, as
    /// torchmetrics' `BinaryF1Score` returns.
    pub fn f1(&self) -> f64 {
        let denom = 2 * self.true_positive + self.false_positive + self.false_negative;
        if denom == 0 {
            0.0
        } else {
            2.0 * self.true_positive as f64 / denom as f64
        }
    }

    /// Share of correct decisions.
    pub fn accuracy(&self) -> f64 {
        let total =
            self.true_positive + self.false_positive + self.true_negative + self.false_negative;
        if total == 0 {
            0.0
        } else {
            (self.true_positive + self.true_negative) as f64 / total as f64
        }
    }
}

/// Labels the 8-connected regions of a row-major mask of `width` columns: 0 for
/// background, 1 to `count` for the regions in raster order of their first pixel.
/// Returns the labels and `count`. Pixels touching only at a corner share a region,
/// as OpenCV's `connectedComponents` (anomalib's AUPRO on the CPU) counts them.
pub fn label_regions(mask: &[bool], width: usize) -> (Vec<u32>, usize) {
    assert!(
        width > 0 && mask.len().is_multiple_of(width),
        "mask of {} pixels is not a whole number of rows of {width}",
        mask.len()
    );
    let height = mask.len() / width;
    let mut labels = vec![0u32; mask.len()];
    let mut count = 0u32;
    let mut stack = Vec::new();
    for start in 0..mask.len() {
        if !mask[start] || labels[start] != 0 {
            continue;
        }
        count += 1;
        labels[start] = count;
        stack.push(start);
        // Depth-first flood fill over the eight neighbours.
        while let Some(index) = stack.pop() {
            let (y, x) = (index / width, index % width);
            for ny in y.saturating_sub(1)..=(y + 1).min(height - 1) {
                for nx in x.saturating_sub(1)..=(x + 1).min(width - 1) {
                    let neighbour = ny * width + nx;
                    if mask[neighbour] && labels[neighbour] == 0 {
                        labels[neighbour] = count;
                        stack.push(neighbour);
                    }
                }
            }
        }
    }
    (labels, count as usize)
}

/// Anomaly-map values gathered with their ground-truth regions, for AUPRO.
///
/// Background values are kept as plain `f32`, values inside regions with the index of
/// their region (8 bytes each). Regions are numbered across all maps, so two defects
/// in two images are two regions.
#[derive(Debug, Clone, Default)]
pub struct RegionScores {
    background: Vec<f32>,
    foreground: Vec<(f32, u32)>,
    region_sizes: Vec<u32>,
    sorted: bool,
}

impl RegionScores {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one map and its mask, both row-major with `width` columns.
    pub fn push(&mut self, scores: &[f32], mask: &[bool], width: usize) {
        assert_eq!(scores.len(), mask.len(), "one mask pixel per map value");
        let (labels, count) = label_regions(mask, width);
        let first = self.region_sizes.len() as u32;
        self.region_sizes.resize(self.region_sizes.len() + count, 0);
        for (&score, &label) in scores.iter().zip(&labels) {
            if label == 0 {
                self.background.push(score);
            } else {
                let region = first + label - 1;
                self.region_sizes[region as usize] += 1;
                self.foreground.push((score, region));
            }
        }
        self.sorted = false;
    }

    /// Number of ground-truth regions over all maps.
    pub fn regions(&self) -> usize {
        self.region_sizes.len()
    }

    /// Area under the per-region overlap (PRO) curve up to a false positive rate of
    /// `fpr_limit`, divided by `fpr_limit` so that a perfect ranking scores 1, as
    /// anomalib's `AUPRO` computes it (0.3 is its default limit).
    ///
    /// At each distinct threshold, the false positive rate is the share of background
    /// pixels at or above it and the overlap is the mean, over all regions, of the share
    /// of each region's pixels at or above it. The curve starts at (0, 0), is cut at
    /// `fpr_limit` by linear interpolation and is integrated with the trapezoid rule.
    /// Returns `None` without background pixels or without regions, where anomalib
    /// returns 0.
    pub fn aupro(&mut self, fpr_limit: f64) -> Option<f64> {
        assert!(
            fpr_limit > 0.0 && fpr_limit <= 1.0,
            "invalid FPR limit {fpr_limit}: expected a value in (0, 1]"
        );
        if self.background.is_empty() || self.region_sizes.is_empty() {
            return None;
        }
        if !self.sorted {
            sort_descending(&mut self.background);
            self.foreground.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
            self.sorted = true;
        }

        let (bg, fg) = (&self.background, &self.foreground);
        let background = bg.len() as f64;
        let regions = self.region_sizes.len() as f64;
        let (mut i, mut j) = (0, 0);
        let mut overlap_sum = 0f64;
        let (mut prev_fpr, mut prev_pro) = (0f64, 0f64);
        let mut area = 0f64;
        while i < bg.len() || j < fg.len() {
            // The next distinct value from the top, and every value equal to it.
            let threshold = match (bg.get(i), fg.get(j)) {
                (Some(&b), Some(&(f, _))) => {
                    if b.total_cmp(&f).is_ge() {
                        b
                    } else {
                        f
                    }
                }
                (Some(&b), None) => b,
                (None, Some(&(f, _))) => f,
                (None, None) => unreachable!("the loop condition leaves a value"),
            };
            while i < bg.len() && same_value(bg[i], threshold) {
                i += 1;
            }
            while j < fg.len() && same_value(fg[j].0, threshold) {
                overlap_sum += 1.0 / self.region_sizes[fg[j].1 as usize] as f64;
                j += 1;
            }

            let fpr = i as f64 / background;
            let pro = (overlap_sum / regions).min(1.0);
            if fpr > fpr_limit {
                // Cut the last segment at the limit and stop.
                if prev_fpr < fpr_limit {
                    let pro_at_limit =
                        prev_pro + (pro - prev_pro) * (fpr_limit - prev_fpr) / (fpr - prev_fpr);
                    area += (fpr_limit - prev_fpr) * (prev_pro + pro_at_limit) / 2.0;
                    prev_fpr = fpr_limit;
                }
                break;
            }
            area += (fpr - prev_fpr) * (pro + prev_pro) / 2.0;
            (prev_fpr, prev_pro) = (fpr, pro);
        }
        Some(area / prev_fpr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perfect_separation_is_one() {
        assert_eq!(
            auroc(&[0.1, 0.2, 0.8, 0.9], &[false, false, true, true]),
            Some(1.0)
        );
    }

    #[test]
    fn reversed_is_zero() {
        assert_eq!(
            auroc(&[0.9, 0.8, 0.2, 0.1], &[false, false, true, true]),
            Some(0.0)
        );
    }

    #[test]
    fn hand_computed_case() {
        // Positives 0.8, 0.4; negatives 0.6, 0.2. Pairs ranked right: (0.8>0.6),
        // (0.8>0.2), (0.4>0.2); wrong: (0.4<0.6). AUROC = 3/4.
        assert_eq!(
            auroc(&[0.8, 0.4, 0.6, 0.2], &[true, true, false, false]),
            Some(0.75)
        );
    }

    #[test]
    fn ties_count_half() {
        assert_eq!(auroc(&[0.5, 0.5], &[true, false]), Some(0.5));
        // One positive tied with one of two negatives, above the other: (1 + 0.5) / 2.
        assert_eq!(auroc(&[0.5, 0.5, 0.1], &[true, false, false]), Some(0.75));
    }

    #[test]
    fn all_equal_scores_are_chance() {
        let scores = [0.3f32; 7];
        let labels = [true, false, false, true, false, true, true];
        assert_eq!(auroc(&scores, &labels), Some(0.5));
    }

    #[test]
    fn signed_zeros_are_one_threshold() {
        assert_eq!(auroc(&[0.0, -0.0], &[true, false]), Some(0.5));
        assert_eq!(auroc(&[-0.0, 0.0], &[true, false]), Some(0.5));
    }

    #[test]
    fn single_class_has_no_auroc() {
        assert_eq!(auroc(&[0.1, 0.2], &[false, false]), None);
        assert_eq!(auroc(&[0.1, 0.2], &[true, true]), None);
        assert_eq!(auroc(&[], &[]), None);
    }

    #[test]
    fn roc_curve_runs_corner_to_corner() {
        let ranked = RankedScores::from_labels(&[0.8, 0.4, 0.6, 0.2], &[true, true, false, false]);
        let curve = ranked.roc_curve(100);
        assert_eq!(
            curve,
            vec![[0.0, 0.0], [0.0, 0.5], [0.5, 0.5], [0.5, 1.0], [1.0, 1.0]]
        );
    }

    #[test]
    fn roc_curve_thinning_keeps_the_end() {
        let scores: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        let labels: Vec<bool> = (0..1000).map(|i| i % 3 == 0).collect();
        let curve = RankedScores::from_labels(&scores, &labels).roc_curve(20);
        assert!(curve.len() <= 60, "{} points", curve.len());
        assert_eq!(curve.first(), Some(&[0.0, 0.0]));
        assert_eq!(curve.last(), Some(&[1.0, 1.0]));
    }

    #[test]
    fn adaptive_threshold_hand_computed() {
        // Scores 0.1 (normal), 0.4 (anomalous), 0.35 (normal), 0.8 (anomalous).
        // score >= 0.8: P 1, R 1/2, F1 2/3. >= 0.4: P 1, R 1, F1 1 (the maximum).
        // >= 0.35: P 2/3, R 1. >= 0.1: P 1/2, R 1.
        let ranked = RankedScores::from_labels(&[0.1, 0.4, 0.35, 0.8], &[false, true, false, true]);
        let t = ranked.f1_adaptive_threshold().unwrap();
        assert_eq!(t.threshold, 0.4);
        assert!((t.f1 - 1.0).abs() < 1e-9, "{}", t.f1);
    }

    #[test]
    fn adaptive_threshold_ties_pick_lowest() {
        // Two anomalous samples. >= 0.9: P 1, R 1/2, F1 2/3. >= 0.5 (one anomalous and
        // two normal samples tie there): P 1/2, R 1, F1 2/3 as well. The lower
        // threshold wins the tie.
        let ranked = RankedScores::from_labels(&[0.9, 0.5, 0.5, 0.5], &[true, true, false, false]);
        let t = ranked.f1_adaptive_threshold().unwrap();
        assert_eq!(t.threshold, 0.5);
        assert_eq!(t.f1, 1.0 / (1.5 + 1e-10));
    }

    #[test]
    fn adaptive_threshold_with_one_class() {
        let normal = RankedScores::new(vec![], vec![0.2, 0.7, 0.4]);
        let t = normal.f1_adaptive_threshold().unwrap();
        assert_eq!(t.threshold, 0.7);
        assert_eq!(t.f1, 0.0);

        let anomalous = RankedScores::new(vec![0.2, 0.7, 0.4], vec![]);
        let t = anomalous.f1_adaptive_threshold().unwrap();
        assert_eq!(t.threshold, 0.2);
        assert!((t.f1 - 1.0).abs() < 1e-9, "{}", t.f1);

        assert_eq!(RankedScores::default().f1_adaptive_threshold(), None);
    }

    #[test]
    fn adaptive_threshold_all_equal() {
        // One threshold: everything is predicted anomalous, P 2/5, R 1.
        let ranked = RankedScores::new(vec![0.5, 0.5], vec![0.5, 0.5, 0.5]);
        let t = ranked.f1_adaptive_threshold().unwrap();
        assert_eq!(t.threshold, 0.5);
        let expected = 2.0 * 0.4 / (1.4 + 1e-10);
        assert!((t.f1 - expected).abs() < 1e-12, "{}", t.f1);
    }

    #[test]
    fn f1_counts() {
        let c = Confusion::new(&[true, true, false, false], &[true, false, true, false]);
        assert_eq!(c.true_positive, 1);
        assert_eq!(c.false_positive, 1);
        assert_eq!(c.false_negative, 1);
        assert!((c.f1() - 0.5).abs() < 1e-12);
        assert!((c.accuracy() - 0.5).abs() < 1e-12);
    }

    #[test]
    fn f1_without_positives_is_zero() {
        let c = Confusion::new(&[false, false], &[false, false]);
        assert_eq!(c.f1(), 0.0);
        assert_eq!(c.accuracy(), 1.0);
    }

    fn mask(rows: &[&str]) -> (Vec<bool>, usize) {
        let width = rows[0].len();
        let pixels = rows
            .iter()
            .flat_map(|r| r.chars().map(|c| c == '#'))
            .collect();
        (pixels, width)
    }

    #[test]
    fn regions_connect_diagonally() {
        let (pixels, width) = mask(&[
            "#....", //
            ".#..#", //
            "....#", //
            "##...", //
        ]);
        let (labels, count) = label_regions(&pixels, width);
        assert_eq!(count, 3);
        assert_eq!(labels[0], 1);
        assert_eq!(labels[6], 1, "corner neighbour joins the first region");
        assert_eq!(labels[9], 2);
        assert_eq!(labels[14], 2);
        assert_eq!(labels[15], 3);
        assert_eq!(labels[16], 3);
        assert_eq!(labels[1], 0);
    }

    #[test]
    fn aupro_perfect_ranking_is_one() {
        let (pixels, width) = mask(&["##..", "....", "...#"]);
        let scores: Vec<f32> = pixels.iter().map(|&m| if m { 0.9 } else { 0.1 }).collect();
        let mut regions = RegionScores::new();
        regions.push(&scores, &pixels, width);
        assert_eq!(regions.regions(), 2);
        assert_eq!(regions.aupro(0.3), Some(1.0));
    }

    #[test]
    fn aupro_hand_computed() {
        // Two regions: A (2 pixels, scores 0.9 and 0.5) and B (1 pixel, 0.7). Ten
        // background pixels: 0.8, 0.6 and eight at 0.1.
        // Thresholds: 0.9 -> fpr 0, pro (1/2)/2 = 0.25; 0.8 -> fpr 0.1, pro 0.25;
        // 0.7 -> 0.1, 0.75; 0.6 -> 0.2, 0.75; 0.5 -> 0.2, 1.0; 0.1 -> 1.0, 1.0.
        // The limit 0.3 falls between (0.2, 1.0) and (1.0, 1.0): pro 1.0 there.
        // Area: 0 + 0.1 * 0.25 + 0 + 0.1 * 0.75 + 0 + 0.1 * 1.0 = 0.2; / 0.3.
        let scores = [
            0.9, 0.5, 0.7, 0.8, 0.6, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1,
        ];
        let pixels = [
            true, true, false, false, false, false, false, false, false, false, false, false, false,
        ];
        let mut regions = RegionScores::new();
        // Region A is the first map, B the second, and the background the third.
        regions.push(&scores[..2], &pixels[..2], 2);
        regions.push(&[0.7], &[true], 1);
        regions.push(&scores[3..], &pixels[3..], 10);
        let value = regions.aupro(0.3).unwrap();
        assert!((value - 0.2 / 0.3).abs() < 1e-12, "{value}");
    }

    #[test]
    fn aupro_interpolates_at_the_limit() {
        // One region of one pixel at 0.5; background 0.9 and 0.1. Curve: (0.5, 0) at
        // 0.9, (0.5, 1) at 0.5, (1, 1) at 0.1. With a limit of 0.25 the cut falls on the
        // first segment from (0, 0): the area is 0.
        let mut regions = RegionScores::new();
        regions.push(&[0.9, 0.5, 0.1], &[false, true, false], 3);
        assert_eq!(regions.aupro(0.25), Some(0.0));
        // With a limit of 1 the whole curve counts: 0.5 * 0 + 0 + 0.5 * 1 = 0.5.
        assert_eq!(regions.aupro(1.0), Some(0.5));
    }

    #[test]
    fn aupro_without_regions_is_none() {
        let mut regions = RegionScores::new();
        regions.push(&[0.1, 0.2], &[false, false], 2);
        assert_eq!(regions.aupro(0.3), None);
        let mut all_defect = RegionScores::new();
        all_defect.push(&[0.1, 0.2], &[true, true], 2);
        assert_eq!(all_defect.aupro(0.3), None);
    }
}
