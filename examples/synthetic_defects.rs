// SPDX-License-Identifier: MIT OR Apache-2.0
//! Builds a defect-detection dataset in the MVTec AD layout from one texture image, with
//! painted defects and their ground-truth masks.
//!
//! ```text
//! cargo run --release --example synthetic_defects -- tests/data/brick.png data/brick
//! patchflow train --images data/brick/train/good --output brick.safetensors
//! patchflow eval --model brick.safetensors --dataset data/brick
//! ```
//!
//! Crops (96x96 by default) come from four horizontal bands of equal height: training
//! crops from the first and third, test crops from the second and fourth. No test crop
//! shares a pixel with a training crop, and both sets see the top and the bottom of the
//! texture, which matters for photographed textures with perspective. Defects are
//! painted onto test crops only:
//! - `crack`: a dark random-walk line, 2 to 3 pixels wide;
//! - `stain`: an elliptical blob that darkens or brightens the texture, with a soft edge;
//! - `foreign`: a square of a second texture (`--foreign`, gravel by default) pasted in.
//!
//! A mask pixel is 255 where the defect changed the image and 0 elsewhere. The output is
//! the same for the same inputs and `--seed`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use image::{GrayImage, Luma};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const DEFECTS: [&str; 3] = ["crack", "stain", "foreign"];
/// Horizontal bands of the texture; even ones give training crops, odd ones test crops.
const BANDS: u32 = 4;

struct Options {
    texture: PathBuf,
    output: PathBuf,
    foreign: PathBuf,
    crop: u32,
    train: usize,
    test_good: usize,
    per_defect: usize,
    seed: u64,
}

fn parse_args() -> Result<Options> {
    let mut positional = Vec::new();
    let mut options = Options {
        texture: PathBuf::new(),
        output: PathBuf::new(),
        foreign: PathBuf::from("tests/data/gravel.png"),
        crop: 96,
        train: 200,
        test_good: 30,
        per_defect: 20,
        seed: 7,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--foreign" => options.foreign = PathBuf::from(value("--foreign")?),
            "--crop" => options.crop = value("--crop")?.parse().context("--crop")?,
            "--train" => options.train = value("--train")?.parse().context("--train")?,
            "--test-good" => {
                options.test_good = value("--test-good")?.parse().context("--test-good")?
            }
            "--per-defect" => {
                options.per_defect = value("--per-defect")?.parse().context("--per-defect")?
            }
            "--seed" => options.seed = value("--seed")?.parse().context("--seed")?,
            flag if flag.starts_with("--") => bail!("unknown option {flag}"),
            _ => positional.push(PathBuf::from(arg)),
        }
    }
    let [texture, output] = <[PathBuf; 2]>::try_from(positional).map_err(|_| {
        anyhow::anyhow!(
            "usage: synthetic_defects TEXTURE OUTPUT_DIR [--foreign IMAGE] [--crop N] \
             [--train N] [--test-good N] [--per-defect N] [--seed N]"
        )
    })?;
    options.texture = texture;
    options.output = output;
    Ok(options)
}

fn load_gray(path: &Path) -> Result<GrayImage> {
    Ok(image::open(path)
        .with_context(|| format!("cannot read image {}", path.display()))?
        .to_luma8())
}

/// Copies a `size` x `size` crop at a random position inside the given rows.
fn random_crop(
    texture: &GrayImage,
    size: u32,
    rows: std::ops::Range<u32>,
    rng: &mut StdRng,
) -> GrayImage {
    let x = rng.random_range(0..=texture.width() - size);
    let y = rng.random_range(rows.start..=rows.end - size);
    image::imageops::crop_imm(texture, x, y, size, size).to_image()
}

/// Copies a crop from one of the bands `first`, `first + 2`, ... of [`BANDS`] bands.
fn band_crop(texture: &GrayImage, size: u32, first: u32, rng: &mut StdRng) -> GrayImage {
    let height = texture.height() / BANDS;
    let band = first + 2 * rng.random_range(0..BANDS / 2);
    random_crop(texture, size, band * height..(band + 1) * height, rng)
}

/// Draws a dark random-walk line and marks its pixels in `mask`.
fn paint_crack(image: &mut GrayImage, mask: &mut GrayImage, rng: &mut StdRng) {
    let size = image.width() as f32;
    let (mut x, mut y) = (
        rng.random_range(0.25 * size..0.75 * size),
        rng.random_range(0.25 * size..0.75 * size),
    );
    let mut angle = rng.random_range(0.0..std::f32::consts::TAU);
    let steps = rng.random_range((0.3 * size) as usize..(0.6 * size) as usize);
    let radius = rng.random_range(1.0f32..1.6);
    for _ in 0..steps {
        angle += rng.random_range(-0.35..0.35);
        x = (x + angle.cos()).clamp(2.0, size - 3.0);
        y = (y + angle.sin()).clamp(2.0, size - 3.0);
        let reach = radius.ceil() as i32;
        for dy in -reach..=reach {
            for dx in -reach..=reach {
                if ((dx * dx + dy * dy) as f32).sqrt() > radius {
                    continue;
                }
                let (px, py) = ((x as i32 + dx) as u32, (y as i32 + dy) as u32);
                let old = image.get_pixel(px, py)[0] as f32;
                image.put_pixel(px, py, Luma([(old * 0.25) as u8]));
                mask.put_pixel(px, py, Luma([255]));
            }
        }
    }
}

/// Darkens or brightens an elliptical blob with a smooth edge. The mask covers the part
/// where the blob's weight is above one half.
fn paint_stain(image: &mut GrayImage, mask: &mut GrayImage, rng: &mut StdRng) {
    let size = image.width() as f32;
    let (cx, cy) = (
        rng.random_range(0.25 * size..0.75 * size),
        rng.random_range(0.25 * size..0.75 * size),
    );
    let (rx, ry) = (
        rng.random_range(0.08 * size..0.16 * size),
        rng.random_range(0.08 * size..0.16 * size),
    );
    let shift = if rng.random_bool(0.5) { -90.0 } else { 80.0 };
    for (px, py, pixel) in image.enumerate_pixels_mut() {
        let (dx, dy) = ((px as f32 - cx) / rx, (py as f32 - cy) / ry);
        let distance = (dx * dx + dy * dy).sqrt();
        // Full strength inside 0.7 of the radii, fading to nothing at 1.3.
        let weight = ((1.3 - distance) / 0.6).clamp(0.0, 1.0);
        if weight == 0.0 {
            continue;
        }
        pixel[0] = (pixel[0] as f32 + shift * weight).clamp(0.0, 255.0) as u8;
        if weight > 0.5 {
            mask.put_pixel(px, py, Luma([255]));
        }
    }
}

/// Pastes a square from `foreign` with a 2-pixel blended border.
fn paint_foreign(
    image: &mut GrayImage,
    mask: &mut GrayImage,
    foreign: &GrayImage,
    rng: &mut StdRng,
) {
    let size = image.width();
    let side = rng.random_range(size * 3 / 16..size * 5 / 16);
    let patch = random_crop(foreign, side, 0..foreign.height(), rng);
    let x0 = rng.random_range(size / 8..size - side - size / 8);
    let y0 = rng.random_range(size / 8..size - side - size / 8);
    for (px, py, source) in patch.enumerate_pixels() {
        let edge = px.min(py).min(side - 1 - px).min(side - 1 - py);
        let weight = ((edge + 1) as f32 / 3.0).min(1.0);
        let target = image.get_pixel_mut(x0 + px, y0 + py);
        target[0] = (target[0] as f32 * (1.0 - weight) + source[0] as f32 * weight) as u8;
        mask.put_pixel(x0 + px, y0 + py, Luma([255]));
    }
}

fn save(image: &GrayImage, path: &Path) -> Result<()> {
    std::fs::create_dir_all(path.parent().expect("dataset paths have a parent"))?;
    image
        .save(path)
        .with_context(|| format!("cannot write {}", path.display()))
}

fn main() -> Result<()> {
    let options = parse_args()?;
    let texture = load_gray(&options.texture)?;
    let foreign = load_gray(&options.foreign)?;
    let size = options.crop;
    let band_height = texture.height() / BANDS;
    if size < 32 || texture.width() < size || band_height < size {
        bail!(
            "crop {size} does not fit {}x{} {}: crops must be 32 pixels or more and fit in a band of {band_height} rows",
            texture.width(),
            texture.height(),
            options.texture.display(),
        );
    }
    if foreign.width() < size * 5 / 16 || foreign.height() < size * 5 / 16 {
        bail!(
            "{} is too small for {size}-pixel crops",
            options.foreign.display()
        );
    }

    let mut rng = StdRng::seed_from_u64(options.seed);
    let out = &options.output;
    for i in 0..options.train {
        let crop = band_crop(&texture, size, 0, &mut rng);
        save(&crop, &out.join(format!("train/good/{i:03}.png")))?;
    }
    for i in 0..options.test_good {
        let crop = band_crop(&texture, size, 1, &mut rng);
        save(&crop, &out.join(format!("test/good/{i:03}.png")))?;
    }
    for defect in DEFECTS {
        for i in 0..options.per_defect {
            let mut crop = band_crop(&texture, size, 1, &mut rng);
            let mut mask = GrayImage::new(size, size);
            match defect {
                "crack" => paint_crack(&mut crop, &mut mask, &mut rng),
                "stain" => paint_stain(&mut crop, &mut mask, &mut rng),
                _ => paint_foreign(&mut crop, &mut mask, &foreign, &mut rng),
            }
            save(&crop, &out.join(format!("test/{defect}/{i:03}.png")))?;
            save(
                &mask,
                &out.join(format!("ground_truth/{defect}/{i:03}_mask.png")),
            )?;
        }
    }
    println!(
        "wrote {}: {} training crops, {} good and {} defective test crops ({}) of {size}x{size}",
        out.display(),
        options.train,
        options.test_good,
        options.per_defect * DEFECTS.len(),
        DEFECTS.join(", ")
    );
    Ok(())
}
