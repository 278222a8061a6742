// SPDX-License-Identifier: MIT OR Apache-2.0
//! Detection metrics computed the way anomalib's evaluator computes them: an exact ROC
//! over the distinct score values, integrated with the trapezoid rule, and F1 on hard
//! labels.

/// Area under the ROC curve of `scores` for `labels` (true = anomalous). Tied scores
/// form one point of the curve. Returns `None` when either class is empty.
pub fn auroc(scores: &[f32], labels: &[bool]) -> Option<f64> {
    assert_eq!(scores.len(), labels.len(), "one label per score");
    let positives = labels.iter().filter(|l| **l).count();
    let negatives = labels.len() - positives;
    if positives == 0 || negatives == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let (mut tp, mut fp) = (0usize, 0usize);
    let (mut prev_tpr, mut prev_fpr) = (0f64, 0f64);
    let mut area = 0f64;
    let mut i = 0;
    while i < order.len() {
        // Consume every sample that shares this score before adding a point.
        let value = scores[order[i]];
        while i < order.len() && scores[order[i]].total_cmp(&value).is_eq() {
            if labels[order[i]] {
                tp += 1
            } else {
                fp += 1
            }
            i += 1;
        }
        let tpr = tp as f64 / positives as f64;
        let fpr = fp as f64 / negatives as f64;
        area += (fpr - prev_fpr) * (tpr + prev_tpr) / 2.0;
        (prev_tpr, prev_fpr) = (tpr, fpr);
    }
    Some(area)
}

/// Counts of a binary decision against ground truth.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
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
            match (p, l) {
                (true, true) => c.true_positive += 1,
                (true, false) => c.false_positive += 1,
                (false, false) => c.true_negative += 1,
                (false, true) => c.false_negative += 1,
            }
        }
        c
    }

    /// F1 score; 0 when there are no positive predictions and no positives.
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
    fn single_class_has_no_auroc() {
        assert_eq!(auroc(&[0.1, 0.2], &[false, false]), None);
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
}
