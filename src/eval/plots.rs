// SPDX-License-Identifier: MIT OR Apache-2.0
//! The PNG plots of `patchflow eval --plots`: ROC curves, a histogram of the image
//! scores, and a grid of overlays. Each plot names its colours in its own text, and
//! [`COLOURS`] lists them for the report.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

use super::canvas::{BLACK, Canvas, GREY, LIGHT_GREY, Rgb, WHITE};
use super::{EvalReport, Evaluation, PlotFiles, ScoredImage};

const BLUE: Rgb = [31, 119, 180];
const ORANGE: Rgb = [255, 127, 14];
const RED: Rgb = [214, 39, 40];
const GREEN: Rgb = [44, 160, 44];

/// Meaning of each colour, as written into the report.
pub const COLOURS: &[(&str, &str)] = &[
    ("roc: image curve", "blue"),
    ("roc: pixel curve", "orange"),
    ("roc: chance diagonal", "grey, dashed"),
    ("histogram: good images", "blue"),
    ("histogram: anomalous images", "red"),
    ("histogram: decision threshold", "black"),
    ("histogram: F1-adaptive threshold", "green, dashed"),
    (
        "grid: border of an image above the decision threshold",
        "red",
    ),
    ("grid: border of an image at or below it", "green"),
    ("grid: outline of the ground-truth mask", "white"),
];

/// File names inside the plot folder.
pub const ROC_FILE: &str = "roc.png";
pub const HISTOGRAM_FILE: &str = "score_histogram.png";
pub const GRID_FILE: &str = "overlays.png";

/// Size in pixels of the ROC plot.
pub const ROC_SIZE: (usize, usize) = (560, 560);
/// Size in pixels of the histogram.
pub const HISTOGRAM_SIZE: (usize, usize) = (760, 480);
/// Width in pixels of one overlay in the grid.
pub const GRID_CELL_WIDTH: usize = 160;
/// Images per row of the grid.
pub const GRID_COLUMNS: usize = 4;

/// A written plot.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlotFile {
    pub path: PathBuf,
    pub width: usize,
    pub height: usize,
}

/// Writes the ROC plot, the histogram and the overlay grid into `dir`, creating it.
/// The grid needs the images' thumbnails ([`super::EvalOptions::thumbnail_width`]).
pub fn write_plots(
    dir: &Path,
    evaluation: &Evaluation,
    images: &[ScoredImage],
) -> Result<PlotFiles> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create plot folder {}", dir.display()))?;
    let save = |canvas: Canvas, name: &str| -> Result<PlotFile> {
        let path = dir.join(name);
        canvas.save_png(&path)?;
        Ok(PlotFile {
            path,
            width: canvas.width(),
            height: canvas.height(),
        })
    };
    Ok(PlotFiles {
        roc: save(roc_plot(evaluation), ROC_FILE)?,
        histogram: save(histogram_plot(&evaluation.report, images), HISTOGRAM_FILE)?,
        grid: save(
            overlay_grid(images, evaluation.report.summary.threshold),
            GRID_FILE,
        )?,
    })
}

/// Evenly spaced round tick values (steps of 1, 2 or 5 times a power of ten) that
/// cover `[lo, hi]`, about `target` of them, and the decimals their labels need.
fn nice_ticks(lo: f64, hi: f64, target: usize) -> (Vec<f64>, usize) {
    let span = if hi > lo {
        hi - lo
    } else {
        lo.abs().max(1.0) * 1e-6
    };
    let rough = span / target.max(1) as f64;
    let magnitude = 10f64.powf(rough.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= rough)
        .unwrap_or(10.0 * magnitude);
    let first = (lo / step).floor() as i64;
    let last = ((lo + span) / step).ceil() as i64;
    let ticks = (first..=last)
        .map(|k| {
            let v = k as f64 * step;
            // Rounding can leave -0.0 or -1e-17, which would print as "-0.00".
            if v.abs() < step * 1e-9 { 0.0 } else { v }
        })
        .collect();
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    (ticks, decimals)
}

/// A plot area on a canvas and the data ranges it shows.
struct Axes {
    left: f64,
    top: f64,
    width: f64,
    height: f64,
    x_range: (f64, f64),
    y_range: (f64, f64),
}

impl Axes {
    fn to_pixel(&self, x: f64, y: f64) -> (f64, f64) {
        let fx = (x - self.x_range.0) / (self.x_range.1 - self.x_range.0);
        let fy = (y - self.y_range.0) / (self.y_range.1 - self.y_range.0);
        (
            self.left + fx * self.width,
            self.top + (1.0 - fy) * self.height,
        )
    }

    /// Draws grid lines, the frame, tick labels and the axis titles.
    fn draw_frame(
        &self,
        canvas: &mut Canvas,
        (x_ticks, x_decimals): (&[f64], usize),
        (y_ticks, y_decimals): (&[f64], usize),
        x_title: &str,
        y_title: &str,
    ) {
        let (left, top) = (self.left as i64, self.top as i64);
        let (right, bottom) = (
            (self.left + self.width) as i64,
            (self.top + self.height) as i64,
        );
        for &x in x_ticks {
            let (px, _) = self.to_pixel(x, self.y_range.0);
            canvas.line(
                (px, self.top),
                (px, self.top + self.height),
                1,
                LIGHT_GREY,
                None,
            );
            let label = format!("{x:.x_decimals$}");
            let w = Canvas::text_width(&label, 1) as i64;
            canvas.text(px.round() as i64 - w / 2, bottom + 6, &label, 1, BLACK);
        }
        for &y in y_ticks {
            let (_, py) = self.to_pixel(self.x_range.0, y);
            canvas.line(
                (self.left, py),
                (self.left + self.width, py),
                1,
                LIGHT_GREY,
                None,
            );
            let label = format!("{y:.y_decimals$}");
            let w = Canvas::text_width(&label, 1) as i64;
            canvas.text(left - 6 - w, py.round() as i64 - 3, &label, 1, BLACK);
        }
        canvas.stroke_rect(left - 1, top - 1, right + 2, bottom + 2, 1, BLACK);
        let w = Canvas::text_width(x_title, 1) as i64;
        canvas.text((left + right) / 2 - w / 2, bottom + 22, x_title, 1, BLACK);
        canvas.text(left - 40, top - 16, y_title, 1, BLACK);
    }
}

/// Draws a coloured square and a label; returns the y of the next legend line.
fn legend_line(canvas: &mut Canvas, x: i64, y: i64, colour: Rgb, label: &str) -> i64 {
    canvas.fill_rect(x, y, x + 10, y + 10, colour);
    canvas.text(x + 16, y + 2, label, 1, BLACK);
    y + 16
}

fn format_auroc(value: Option<f64>) -> String {
    value.map_or_else(|| "N/A".to_string(), |v| format!("{v:.4}"))
}

/// ROC curves of the image scores and, with masks, the map values.
fn roc_plot(evaluation: &Evaluation) -> Canvas {
    let (width, height) = ROC_SIZE;
    let mut canvas = Canvas::new(width, height, WHITE);
    let axes = Axes {
        left: 70.0,
        top: 60.0,
        width: width as f64 - 100.0,
        height: height as f64 - 120.0,
        x_range: (0.0, 1.0),
        y_range: (0.0, 1.0),
    };
    canvas.text(70, 14, "ROC, NORMALISED SCORES", 2, BLACK);
    let (ticks, decimals) = nice_ticks(0.0, 1.0, 5);
    axes.draw_frame(
        &mut canvas,
        (&ticks, decimals),
        (&ticks, decimals),
        "FALSE POSITIVE RATE",
        "TRUE POSITIVE RATE",
    );
    canvas.line(
        axes.to_pixel(0.0, 0.0),
        axes.to_pixel(1.0, 1.0),
        1,
        GREY,
        Some(4),
    );

    let summary = &evaluation.report.summary;
    let mut curves = vec![(
        &evaluation.image_roc,
        BLUE,
        format!("IMAGE AUROC {}", format_auroc(summary.image_auroc)),
    )];
    if let Some(pixel_roc) = &evaluation.pixel_roc {
        curves.push((
            pixel_roc,
            ORANGE,
            format!("PIXEL AUROC {}", format_auroc(summary.pixel_auroc)),
        ));
    }
    for (curve, colour, _) in &curves {
        let points: Vec<(f64, f64)> = curve.iter().map(|p| axes.to_pixel(p[0], p[1])).collect();
        canvas.polyline(&points, 2, *colour);
    }
    let mut y = (axes.top + axes.height) as i64 - 16 * curves.len() as i64 - 8;
    let x = (axes.left + axes.width) as i64 - 170;
    for (curve, colour, label) in &curves {
        let label = if curve.is_empty() {
            format!("{label} (ONE CLASS)")
        } else {
            label.clone()
        };
        y = legend_line(&mut canvas, x, y, *colour, &label);
    }
    canvas
}

/// Histogram of the raw image scores of good and anomalous images, with the decision
/// and F1-adaptive thresholds.
fn histogram_plot(report: &EvalReport, images: &[ScoredImage]) -> Canvas {
    const BINS: usize = 20;
    let (width, height) = HISTOGRAM_SIZE;
    let mut canvas = Canvas::new(width, height, WHITE);
    let summary = &report.summary;
    let decision = summary.thresholds.decision_image.raw;
    let adaptive = summary.image_adaptive_threshold.map(|a| a.raw);

    let mut lo = f64::INFINITY;
    let mut hi = f64::NEG_INFINITY;
    let marks = [Some(decision), adaptive];
    let values = images
        .iter()
        .map(|i| i.score)
        .chain(marks.into_iter().flatten());
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v as f64);
        hi = hi.max(v as f64);
    }
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    let (x_ticks, x_decimals) = nice_ticks(lo, hi, 6);
    let x_range = (x_ticks[0], x_ticks[x_ticks.len() - 1]);

    let bin_of = |v: f32| -> usize {
        let f = (v as f64 - x_range.0) / (x_range.1 - x_range.0);
        ((f * BINS as f64).floor().max(0.0) as usize).min(BINS - 1)
    };
    let mut good = [0usize; BINS];
    let mut anomalous = [0usize; BINS];
    for image in images {
        let bins = if image.sample.anomalous {
            &mut anomalous
        } else {
            &mut good
        };
        bins[bin_of(image.score)] += 1;
    }
    let max_count = good
        .iter()
        .chain(&anomalous)
        .copied()
        .max()
        .unwrap_or(0)
        .max(1);
    let (mut y_ticks, _) = nice_ticks(0.0, max_count as f64, 5);
    // Counts are whole numbers: drop fractional ticks.
    y_ticks.retain(|t| t.fract() == 0.0 && *t >= 0.0);
    let y_top = y_ticks.last().copied().unwrap_or(1.0).max(max_count as f64);

    let axes = Axes {
        left: 70.0,
        top: 120.0,
        width: width as f64 - 100.0,
        height: height as f64 - 180.0,
        x_range,
        y_range: (0.0, y_top),
    };
    canvas.text(70, 12, "IMAGE SCORES (RAW)", 2, BLACK);
    axes.draw_frame(
        &mut canvas,
        (&x_ticks, x_decimals),
        (&y_ticks, 0),
        "RAW IMAGE SCORE",
        "IMAGES",
    );

    let bin_width = (x_range.1 - x_range.0) / BINS as f64;
    for bin in 0..BINS {
        let x0 = x_range.0 + bin as f64 * bin_width;
        let (left, _) = axes.to_pixel(x0, 0.0);
        let (right, base) = axes.to_pixel(x0 + bin_width, 0.0);
        let middle = (left + right) / 2.0;
        for (count, colour, (a, b)) in [
            (good[bin], BLUE, (left + 1.0, middle)),
            (anomalous[bin], RED, (middle, right - 1.0)),
        ] {
            if count > 0 {
                let (_, top) = axes.to_pixel(x0, count as f64);
                canvas.fill_rect(a as i64, top as i64, b as i64, base as i64, colour);
            }
        }
    }

    let mut legend = vec![
        (BLUE, format!("GOOD ({})", summary.good_images)),
        (RED, format!("ANOMALOUS ({})", summary.anomalous_images)),
    ];
    if decision.is_finite() {
        let (x, _) = axes.to_pixel(decision as f64, 0.0);
        canvas.line((x, axes.top), (x, axes.top + axes.height), 2, BLACK, None);
        legend.push((
            BLACK,
            format!(
                "DECISION THRESHOLD {:.5} (NORMALISED {})",
                decision, summary.threshold
            ),
        ));
    }
    if let Some(a) = summary.image_adaptive_threshold {
        let (x, _) = axes.to_pixel(a.raw as f64, 0.0);
        canvas.line(
            (x, axes.top),
            (x, axes.top + axes.height),
            2,
            GREEN,
            Some(5),
        );
        legend.push((
            GREEN,
            format!(
                "F1-ADAPTIVE THRESHOLD {:.5} (NORMALISED {:.3}, F1 {:.3})",
                a.raw, a.normalized, a.f1
            ),
        ));
    }
    let mut y = 38;
    for (colour, label) in &legend {
        y = legend_line(&mut canvas, 70, y, *colour, label);
    }
    canvas
}

/// Picks the grid rows: good images with the highest scores, then anomalous images
/// with the lowest and with the highest scores, at most [`GRID_COLUMNS`] each.
fn grid_rows(images: &[ScoredImage]) -> Vec<(&'static str, Vec<&ScoredImage>)> {
    let by_score = |a: &&ScoredImage, b: &&ScoredImage| a.score.total_cmp(&b.score);
    let mut good: Vec<&ScoredImage> = images.iter().filter(|i| !i.sample.anomalous).collect();
    good.sort_by(|a, b| by_score(b, a));
    good.truncate(GRID_COLUMNS);
    let mut anomalous: Vec<&ScoredImage> = images.iter().filter(|i| i.sample.anomalous).collect();
    anomalous.sort_by(by_score);
    let lowest_count = anomalous.len().min(GRID_COLUMNS);
    let lowest: Vec<&ScoredImage> = anomalous[..lowest_count].to_vec();
    let rest = &anomalous[lowest_count..];
    let highest: Vec<&ScoredImage> = rest.iter().rev().take(GRID_COLUMNS).copied().collect();

    [
        ("GOOD IMAGES, HIGHEST SCORES", good),
        ("ANOMALOUS IMAGES, LOWEST SCORES", lowest),
        ("ANOMALOUS IMAGES, HIGHEST SCORES", highest),
    ]
    .into_iter()
    .filter(|(_, row)| !row.is_empty())
    .collect()
}

/// Shortens `text` to `max` characters, keeping its end.
fn tail(text: &str, max: usize) -> String {
    let count = text.chars().count();
    if count <= max {
        text.to_string()
    } else {
        let kept: String = text.chars().skip(count - max + 2).collect();
        format!("..{kept}")
    }
}

/// Grid of overlay thumbnails with their scores and file names, framed by the decision
/// at the normalised `threshold`.
fn overlay_grid(images: &[ScoredImage], threshold: f32) -> Canvas {
    const MARGIN: usize = 12;
    const GAP: usize = 12;
    const HEADER: usize = 22;
    const CAPTION: usize = 30;
    let rows = grid_rows(images);
    let cell_height = rows
        .iter()
        .flat_map(|(_, row)| row.iter())
        .filter_map(|i| i.thumbnail.as_ref().map(|t| t.height))
        .max()
        .unwrap_or(GRID_CELL_WIDTH);
    let width = 2 * MARGIN + GRID_COLUMNS * GRID_CELL_WIDTH + (GRID_COLUMNS - 1) * GAP;
    let row_height = HEADER + cell_height + CAPTION;
    let height = 2 * MARGIN + 40 + rows.len().max(1) * row_height;

    let mut canvas = Canvas::new(width, height, WHITE);
    let margin = MARGIN as i64;
    let title = "OVERLAYS (HEATMAP: NORMALISED MAP, BLUE 0 TO RED 1)";
    canvas.text(margin, margin, title, 1, BLACK);
    let key = "BORDER RED: ABOVE THRESHOLD, GREEN: BELOW. WHITE LINE: MASK";
    canvas.text(margin, margin + 14, key, 1, BLACK);
    if rows.is_empty() {
        canvas.text(margin, margin + 40, "NO IMAGES", 1, BLACK);
    }

    for (r, (title, row)) in rows.iter().enumerate() {
        let top = (MARGIN + 40 + r * row_height) as i64;
        canvas.text(margin, top + 4, title, 1, BLACK);
        for (c, image) in row.iter().enumerate() {
            let left = (MARGIN + c * (GRID_CELL_WIDTH + GAP)) as i64;
            let cell_top = top + HEADER as i64;
            draw_grid_cell(&mut canvas, (left, cell_top), cell_height, image, threshold);
        }
    }
    canvas
}

/// Draws one overlay with its top-left at `(left, top)`, a border coloured by the
/// decision, and a two-line caption below.
fn draw_grid_cell(
    canvas: &mut Canvas,
    (left, top): (i64, i64),
    cell_height: usize,
    image: &ScoredImage,
    threshold: f32,
) {
    let (right, bottom) = (left + GRID_CELL_WIDTH as i64, top + cell_height as i64);
    match &image.thumbnail {
        Some(t) => canvas.blit(left, top, &t.rgb, t.width, t.height),
        None => canvas.fill_rect(left, top, right, bottom, LIGHT_GREY),
    }
    let colour = if image.normalized_score > threshold {
        RED
    } else {
        GREEN
    };
    canvas.stroke_rect(left - 3, top - 3, right + 3, bottom + 3, 3, colour);

    let scores = format!("{:.3} ({:.5})", image.normalized_score, image.score);
    canvas.text(left, bottom + 6, &scores, 1, BLACK);
    let file = image.sample.path.file_name().unwrap_or_default();
    let name = format!("{}/{}", image.sample.defect, file.to_string_lossy());
    canvas.text(left, bottom + 17, &tail(&name, 26), 1, BLACK);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_cover_the_range() {
        let (ticks, decimals) = nice_ticks(0.0, 1.0, 5);
        assert_eq!(ticks, vec![0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0]);
        assert_eq!(decimals, 1);
        let (ticks, decimals) = nice_ticks(-0.953, -0.871, 6);
        assert!(
            ticks[0] <= -0.953 && *ticks.last().unwrap() >= -0.871,
            "{ticks:?}"
        );
        assert_eq!(decimals, 2);
        assert!(ticks.len() <= 10, "{ticks:?}");
    }

    #[test]
    fn ticks_of_a_single_value() {
        let (ticks, _) = nice_ticks(-0.5, -0.5, 5);
        assert!(ticks.len() >= 2, "{ticks:?}");
        assert!(ticks[0] <= -0.5, "{ticks:?}");
        assert!(*ticks.last().unwrap() >= -0.5, "{ticks:?}");
    }

    #[test]
    fn long_names_keep_their_end() {
        assert_eq!(tail("short", 10), "short");
        assert_eq!(tail("crack/0123456789.png", 10), "..6789.png");
    }
}
