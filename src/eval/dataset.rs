// SPDX-License-Identifier: MIT OR Apache-2.0
//! Labelled test sets for `patchflow eval`: an MVTec AD category folder, or a folder of
//! good and a folder of anomalous images with optional ground-truth masks.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::train::list_images;

/// Name of the defect type of good images.
pub const GOOD: &str = "good";

/// One test image and its ground truth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestSample {
    pub path: PathBuf,
    /// Defect type: the image's folder name, [`GOOD`] for good images.
    pub defect: String,
    pub anomalous: bool,
    /// Ground-truth mask file. `None` means an all-normal mask when the dataset has
    /// masks.
    pub mask: Option<PathBuf>,
}

/// A labelled test set.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub samples: Vec<TestSample>,
    /// Whether every image has a ground-truth mask (an absent file meaning all-normal
    /// for good images), so that pixel metrics can be computed.
    pub has_masks: bool,
}

impl Dataset {
    /// Reads an MVTec AD category: `DIR/test/good/*`, `DIR/test/<defect>/*` and, if
    /// `DIR/ground_truth` exists, `DIR/ground_truth/<defect>/<stem>_mask.png` for every
    /// defect image. Without `DIR/ground_truth` the dataset has no masks.
    pub fn mvtec(root: &Path) -> Result<Self> {
        let test = root.join("test");
        if !test.is_dir() {
            bail!(
                "{} not found: expected an MVTec AD category folder with test/good and test/<defect>",
                test.display()
            );
        }
        let mut folders = Vec::new();
        for entry in std::fs::read_dir(&test)
            .with_context(|| format!("cannot read folder {}", test.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                folders.push(path);
            }
        }
        folders.sort();
        if !folders.iter().any(|f| f.file_name() == Some(GOOD.as_ref())) {
            bail!(
                "{} not found: the good test images are missing",
                test.join(GOOD).display()
            );
        }

        let ground_truth = root.join("ground_truth");
        let has_masks = ground_truth.is_dir();
        if !has_masks {
            tracing::info!(
                "{} not found: pixel metrics are not computed",
                ground_truth.display()
            );
        }
        let mut samples = Vec::new();
        for folder in &folders {
            let defect = folder_name(folder)?;
            let anomalous = defect != GOOD;
            for path in list_images(folder)? {
                let mask = if anomalous && has_masks {
                    Some(required_mask(&ground_truth.join(&defect), &path)?)
                } else {
                    None
                };
                samples.push(TestSample {
                    path,
                    defect: defect.clone(),
                    anomalous,
                    mask,
                });
            }
        }
        Ok(Self { samples, has_masks })
    }

    /// Reads a folder of good images and one of anomalous images. With `masks`, each
    /// anomalous image needs `<masks>/<stem>_mask.png`, and a good image's mask is used
    /// when that file exists (all-normal otherwise). The anomalous images' defect type is
    /// their folder's name.
    pub fn folders(good: &Path, anomalous: &Path, masks: Option<&Path>) -> Result<Self> {
        if let Some(dir) = masks.filter(|d| !d.is_dir()) {
            bail!("mask folder {} not found", dir.display());
        }
        let mut samples = Vec::new();
        for path in list_images(good)? {
            let mask = masks
                .map(|dir| mask_path(dir, &path))
                .filter(|m| m.is_file());
            samples.push(TestSample {
                path,
                defect: GOOD.to_string(),
                anomalous: false,
                mask,
            });
        }
        let mut defect = folder_name(anomalous)?;
        if defect == GOOD {
            // Keep the good images' name for the good images only.
            defect = "anomalous".to_string();
        }
        for path in list_images(anomalous)? {
            let mask = match masks {
                Some(dir) => Some(required_mask(dir, &path)?),
                None => None,
            };
            samples.push(TestSample {
                path,
                defect: defect.clone(),
                anomalous: true,
                mask,
            });
        }
        Ok(Self {
            samples,
            has_masks: masks.is_some(),
        })
    }

    pub fn good_count(&self) -> usize {
        self.samples.iter().filter(|s| !s.anomalous).count()
    }

    pub fn anomalous_count(&self) -> usize {
        self.samples.iter().filter(|s| s.anomalous).count()
    }
}

fn folder_name(folder: &Path) -> Result<String> {
    // `canonicalize` gives `.` and `..` a name.
    let full = folder
        .canonicalize()
        .with_context(|| format!("cannot read folder {}", folder.display()))?;
    Ok(full
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "anomalous".to_string()))
}

/// Returns `<dir>/<stem>_mask.png` for `image`.
pub fn mask_path(dir: &Path, image: &Path) -> PathBuf {
    let stem = image.file_stem().unwrap_or_default().to_string_lossy();
    dir.join(format!("{stem}_mask.png"))
}

fn required_mask(dir: &Path, image: &Path) -> Result<PathBuf> {
    let mask = mask_path(dir, image);
    if !mask.is_file() {
        bail!(
            "ground-truth mask {} not found for {}: every anomalous image needs one (nonzero = defect)",
            mask.display(),
            image.display()
        );
    }
    Ok(mask)
}

/// Reads a mask file (any channel nonzero = anomalous) and resizes it to
/// `(height, width)` with nearest-neighbour sampling: output pixel `(y, x)` takes input
/// pixel `(floor(y * in_h / height), floor(x * in_w / width))`, PyTorch's `nearest`
/// rule, which torchvision uses for masks. Returns the mask and its original size
/// `(height, width)`.
///
/// NOTE: PyTorch computes the source index in floating point, so at sizes where
/// `y * in_h / height` lands within rounding of an integer it can pick the neighbour.
pub fn load_mask(
    path: &Path,
    (height, width): (usize, usize),
) -> Result<(Vec<bool>, (usize, usize))> {
    let img = image::ImageReader::open(path)
        .with_context(|| format!("cannot open mask {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("cannot read mask {}", path.display()))?
        .decode()
        .with_context(|| format!("cannot decode mask {}", path.display()))?;
    // Converting to 16 bits keeps every nonzero 8-bit or 16-bit sample nonzero. Float
    // samples below 1/131070 round to 0.
    let rgb = img.to_rgb16();
    let (in_w, in_h) = (rgb.width() as usize, rgb.height() as usize);
    let raw = rgb.as_raw();
    let mut mask = Vec::with_capacity(height * width);
    for y in 0..height {
        let sy = y * in_h / height;
        for x in 0..width {
            let sx = x * in_w / width;
            let px = &raw[3 * (sy * in_w + sx)..3 * (sy * in_w + sx) + 3];
            mask.push(px.iter().any(|&v| v != 0));
        }
    }
    Ok((mask, (in_h, in_w)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_png(path: &Path, width: u32, height: u32, on: impl Fn(u32, u32) -> bool) {
        let img = image::GrayImage::from_fn(width, height, |x, y| {
            image::Luma([if on(x, y) { 255 } else { 0 }])
        });
        img.save(path).unwrap();
    }

    #[test]
    fn mask_resizes_with_nearest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m_mask.png");
        // 4x4 with the right half set: 2x2 keeps the right column.
        write_png(&path, 4, 4, |x, _| x >= 2);
        let (mask, size) = load_mask(&path, (2, 2)).unwrap();
        assert_eq!(size, (4, 4));
        assert_eq!(mask, vec![false, true, false, true]);
        // Upscaling 4 -> 8 repeats each pixel twice.
        let (mask, _) = load_mask(&path, (1, 8)).unwrap();
        assert_eq!(
            mask,
            vec![false, false, false, false, true, true, true, true]
        );
    }

    #[test]
    fn mask_counts_any_nonzero_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m_mask.png");
        let img = image::RgbImage::from_fn(2, 1, |x, _| {
            image::Rgb(if x == 0 { [0, 0, 0] } else { [0, 0, 1] })
        });
        img.save(&path).unwrap();
        let (mask, _) = load_mask(&path, (1, 2)).unwrap();
        assert_eq!(mask, vec![false, true]);
    }

    fn touch_image(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        write_png(path, 2, 2, |_, _| false);
    }

    #[test]
    fn mvtec_layout_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        touch_image(&root.join("test/good/000.png"));
        touch_image(&root.join("test/good/001.png"));
        touch_image(&root.join("test/crack/000.png"));
        touch_image(&root.join("test/scratch/000.png"));
        touch_image(&root.join("ground_truth/crack/000_mask.png"));
        touch_image(&root.join("ground_truth/scratch/000_mask.png"));
        let data = Dataset::mvtec(root).unwrap();
        assert!(data.has_masks);
        assert_eq!(data.good_count(), 2);
        assert_eq!(data.anomalous_count(), 2);
        let crack = &data.samples[0];
        assert_eq!(crack.defect, "crack");
        assert!(crack.anomalous);
        assert_eq!(
            crack.mask.as_deref(),
            Some(root.join("ground_truth/crack/000_mask.png").as_path())
        );
        let good = &data.samples[1];
        assert_eq!(good.defect, GOOD);
        assert_eq!(good.mask, None);
    }

    #[test]
    fn mvtec_without_ground_truth_has_no_masks() {
        let dir = tempfile::tempdir().unwrap();
        touch_image(&dir.path().join("test/good/000.png"));
        touch_image(&dir.path().join("test/hole/000.png"));
        let data = Dataset::mvtec(dir.path()).unwrap();
        assert!(!data.has_masks);
        assert!(data.samples.iter().all(|s| s.mask.is_none()));
    }

    #[test]
    fn mvtec_missing_mask_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        touch_image(&dir.path().join("test/good/000.png"));
        touch_image(&dir.path().join("test/hole/007.png"));
        std::fs::create_dir_all(dir.path().join("ground_truth/hole")).unwrap();
        let err = Dataset::mvtec(dir.path()).unwrap_err().to_string();
        assert!(err.contains("007_mask.png"), "{err}");
    }

    #[test]
    fn mvtec_without_test_folder_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = Dataset::mvtec(dir.path()).unwrap_err().to_string();
        assert!(err.contains("test/good"), "{err}");
    }

    #[test]
    fn folders_with_optional_good_masks() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        touch_image(&root.join("ok/a.png"));
        touch_image(&root.join("ok/b.png"));
        touch_image(&root.join("bad/c.png"));
        touch_image(&root.join("masks/c_mask.png"));
        touch_image(&root.join("masks/b_mask.png"));
        let masks = root.join("masks");
        let data = Dataset::folders(&root.join("ok"), &root.join("bad"), Some(&masks)).unwrap();
        assert!(data.has_masks);
        assert_eq!(data.samples[0].mask, None);
        assert_eq!(data.samples[1].mask, Some(masks.join("b_mask.png")));
        assert_eq!(data.samples[2].mask, Some(masks.join("c_mask.png")));
        assert_eq!(data.samples[2].defect, "bad");

        let plain = Dataset::folders(&root.join("ok"), &root.join("bad"), None).unwrap();
        assert!(!plain.has_masks);
        assert!(plain.samples.iter().all(|s| s.mask.is_none()));
    }
}
