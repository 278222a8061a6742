// SPDX-License-Identifier: MIT OR Apache-2.0
//! Scoring image files: per-image results and overlay images.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::imageops::{Colormap, HeatMap, PixelLayout, blend_heatmap, load_rgb_chw};
use crate::scoring::{FrameScore, Scorer, Threshold};
use crate::train::list_images;

/// One line of `patchflow predict` output.
#[derive(Debug, Clone, Serialize)]
pub struct ImageResult {
    pub path: PathBuf,
    /// Raw score, the maximum of the anomaly map in [-1, 0].
    pub score: f32,
    pub normalized_score: f32,
    /// Log score, the maximum over patches of `0.5 mean_c z^2`.
    pub log_score: f32,
    pub is_anomalous: bool,
    pub label: &'static str,
    /// Overlay image written for this input, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overlay: Option<PathBuf>,
}

/// Expands files and folders into a sorted list of image files.
pub fn collect_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for input in inputs {
        if input.is_dir() {
            files.extend(list_images(input)?);
        } else if input.is_file() {
            files.push(input.clone());
        } else {
            anyhow::bail!("input {} does not exist", input.display());
        }
    }
    Ok(files)
}

/// Scores one image file.
pub fn score_file(scorer: &Scorer, path: &Path) -> Result<(FrameScore, Vec<f32>, (usize, usize))> {
    let (chw, h, w) = load_rgb_chw(path)?;
    let result = scorer
        .score_chw(&chw, (h, w))
        .with_context(|| format!("cannot score {}", path.display()))?;
    Ok((result, chw, (h, w)))
}

/// Converts a planar RGB image (3, H, W) in [0, 1] to packed 8-bit RGB with the heatmap
/// blended on (JET colours, `alpha` the heatmap's opacity).
pub fn overlay_rgb(chw: &[f32], (h, w): (usize, usize), heat: &HeatMap, alpha: f32) -> Vec<u8> {
    let mut rgb = vec![0u8; 3 * h * w];
    for (i, px) in rgb.chunks_exact_mut(3).enumerate() {
        for (c, v) in px.iter_mut().enumerate() {
            *v = (chw[c * h * w + i] * 255.0).round().clamp(0.0, 255.0) as u8;
        }
    }
    blend_heatmap(
        &mut rgb,
        (w, h, 3 * w),
        PixelLayout::Rgb,
        heat,
        Colormap::Jet,
        alpha,
    );
    rgb
}

/// Writes the image with the heatmap blended on as an 8-bit RGB PNG.
pub fn write_overlay(
    path: &Path,
    chw: &[f32],
    (h, w): (usize, usize),
    result: &FrameScore,
    alpha: f32,
) -> Result<()> {
    let rgb = overlay_rgb(chw, (h, w), &result.heat, alpha);
    image::save_buffer(
        path,
        &rgb,
        w as u32,
        h as u32,
        image::ExtendedColorType::Rgb8,
    )
    .with_context(|| format!("cannot write overlay {}", path.display()))
}

/// Picks a file name for the overlay of `path` that no earlier input in this run used: the
/// file stem, prefixed with its folder's name and then numbered if that is taken too
/// (MVTec-style folders repeat names such as `000.png`).
fn overlay_name(path: &Path, used: &mut HashSet<String>) -> String {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("image");
    let folder = path
        .parent()
        .and_then(|p| p.file_name())
        .and_then(|s| s.to_str());
    let mut candidates = vec![format!("{stem}_overlay.png")];
    if let Some(folder) = folder {
        candidates.push(format!("{folder}_{stem}_overlay.png"));
    }
    for name in candidates {
        if used.insert(name.clone()) {
            return name;
        }
    }
    let base = folder.map_or_else(|| stem.to_string(), |f| format!("{f}_{stem}"));
    (2..)
        .map(|n| format!("{base}_{n}_overlay.png"))
        .find(|name| used.insert(name.clone()))
        .expect("an unused name exists")
}

/// Scores every image in order, writing overlays into `overlay_dir` when given, and
/// hands each result to `on_result` as soon as it is ready.
pub fn predict_each(
    scorer: &Scorer,
    files: &[PathBuf],
    threshold: impl Into<Threshold>,
    overlay_dir: Option<&Path>,
    alpha: f32,
    mut on_result: impl FnMut(ImageResult) -> Result<()>,
) -> Result<()> {
    if let Some(dir) = overlay_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create output folder {}", dir.display()))?;
    }
    let threshold = threshold.into();
    let mut used = HashSet::new();
    for path in files {
        let (score, chw, size) = score_file(scorer, path)?;
        let overlay = match overlay_dir {
            Some(dir) => {
                let out = dir.join(overlay_name(path, &mut used));
                write_overlay(&out, &chw, size, &score, alpha)?;
                Some(out)
            }
            None => None,
        };
        let is_anomalous = threshold.is_exceeded_by(&score);
        on_result(ImageResult {
            path: path.clone(),
            score: score.score,
            normalized_score: score.normalized_score,
            log_score: score.log_score,
            is_anomalous,
            label: if is_anomalous { "anomalous" } else { "normal" },
            overlay,
        })?;
    }
    Ok(())
}

/// Scores every image and collects the results; see [`predict_each`].
pub fn predict(
    scorer: &Scorer,
    files: &[PathBuf],
    threshold: impl Into<Threshold>,
    overlay_dir: Option<&Path>,
    alpha: f32,
) -> Result<Vec<ImageResult>> {
    let mut results = Vec::with_capacity(files.len());
    predict_each(scorer, files, threshold, overlay_dir, alpha, |r| {
        results.push(r);
        Ok(())
    })?;
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_names_do_not_collide() {
        let mut used = HashSet::new();
        let a = overlay_name(Path::new("test/crack/000.png"), &mut used);
        let b = overlay_name(Path::new("test/good/000.png"), &mut used);
        let c = overlay_name(Path::new("other/good/000.png"), &mut used);
        assert_eq!(a, "000_overlay.png");
        assert_eq!(b, "good_000_overlay.png");
        assert_eq!(c, "good_000_2_overlay.png");
    }
}
