// SPDX-License-Identifier: MIT OR Apache-2.0
//! `patchflow eval` end to end, with a model trained by the CLI on a tiny MVTec AD-style
//! dataset. The dataset is built from the committed textures: grass crops as good
//! images, the same with a pasted gravel or brick patch as defects, and their masks.
//! The tests check the report, the text summary and the plots.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use image::{GrayImage, Luma, RgbImage};
use serde_json::Value;
use support::fixtures;

/// Side of the test images in pixels, and of the model input.
const IMAGE_SIZE: u32 = 96;
const INPUT_SIZE: usize = 64;
/// Side of the pasted defect patch in image pixels (24 map pixels at 64x64).
const PATCH: u32 = 36;

fn patchflow() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_patchflow"));
    cmd.env("RUST_LOG", "warn");
    cmd
}

fn run(cmd: &mut Command) -> Output {
    let output = cmd.output().expect("patchflow starts");
    eprintln!("stderr: {}", String::from_utf8_lossy(&output.stderr));
    output
}

fn texture(name: &str) -> RgbImage {
    image::open(fixtures::image(name)).unwrap().to_rgb8()
}

fn crop(img: &RgbImage, (x, y): (u32, u32)) -> RgbImage {
    image::imageops::crop_imm(img, x, y, IMAGE_SIZE, IMAGE_SIZE).to_image()
}

/// Writes the dataset under `root`: `train/` (good images for training) and an MVTec AD
/// category in `root/mvtec` with 4 good images and 3 images of each defect type.
fn build_dataset(root: &Path) -> PathBuf {
    let grass = texture("grass.png");
    let train = root.join("train");
    std::fs::create_dir_all(&train).unwrap();
    for i in 0..12u32 {
        let at = ((i * 37) % 400, (i * 53) % 400);
        crop(&grass, at)
            .save(train.join(format!("{i:02}.png")))
            .unwrap();
    }

    let mvtec = root.join("mvtec");
    let good = mvtec.join("test/good");
    std::fs::create_dir_all(&good).unwrap();
    for i in 0..4u32 {
        let at = (20 + i * 97, 300 - i * 61);
        crop(&grass, at)
            .save(good.join(format!("{i:03}.png")))
            .unwrap();
    }
    for (k, defect) in ["gravel", "brick"].into_iter().enumerate() {
        let source = texture(&format!("{defect}.png"));
        let images = mvtec.join("test").join(defect);
        let masks = mvtec.join("ground_truth").join(defect);
        std::fs::create_dir_all(&images).unwrap();
        std::fs::create_dir_all(&masks).unwrap();
        for j in 0..3u32 {
            let mut img = crop(&grass, (150 + j * 71 + k as u32 * 13, 40 + j * 83));
            let mut mask = GrayImage::new(IMAGE_SIZE, IMAGE_SIZE);
            let (left, top) = (8 + j * 20, 10 + j * 15);
            for y in top..top + PATCH {
                for x in left..left + PATCH {
                    img.put_pixel(x, y, *source.get_pixel(x + 100, y + 100));
                    mask.put_pixel(x, y, Luma([255]));
                }
            }
            img.save(images.join(format!("{j:03}.png"))).unwrap();
            mask.save(masks.join(format!("{j:03}_mask.png"))).unwrap();
        }
    }
    mvtec
}

fn train_model(root: &Path) -> PathBuf {
    let model = root.join("grass.safetensors");
    let out = run(patchflow()
        .args(["train", "--images"])
        .arg(root.join("train"))
        .arg("--backbone")
        .arg(fixtures::backbone_path())
        .arg("--output")
        .arg(&model)
        .args(["--input-size", &INPUT_SIZE.to_string()])
        .args(["--epochs", "2", "--batch-size", "4", "--holdout", "0.4"]));
    assert!(out.status.success());
    model
}

fn read_report(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn unit_interval(value: &Value, what: &str) -> f64 {
    let v = value
        .as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {value}"));
    assert!((0.0..=1.0).contains(&v), "{what} = {v}");
    v
}

#[test]
fn eval_mvtec_dataset_with_plots() {
    let dir = tempfile::tempdir().unwrap();
    let mvtec = build_dataset(dir.path());
    let model = train_model(dir.path());
    let report = dir.path().join("out/report.json");
    let plots = dir.path().join("out/plots");
    let out = run(patchflow()
        .args(["eval", "--model"])
        .arg(&model)
        .arg("--dataset")
        .arg(&mvtec)
        .arg("--report")
        .arg(&report)
        .arg("--plots")
        .arg(&plots));
    assert!(out.status.success());

    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("image AUROC "), "{stdout}");
    assert!(lines[0].contains("(4 good, 6 anomalous; TP "), "{stdout}");
    assert!(lines[1].starts_with("pixel AUROC 0.") || lines[1].starts_with("pixel AUROC 1."));
    assert!(!lines[1].contains("n/a"), "{stdout}");
    assert!(
        lines[2].starts_with("F1-adaptive threshold: image "),
        "{stdout}"
    );
    assert!(
        lines[3].starts_with("image AUROC on raw scores "),
        "{stdout}"
    );
    assert!(lines[4].contains("gravel"), "{stdout}");
    assert!(lines[4].contains("brick"), "{stdout}");

    let doc = read_report(&report);
    let s = &doc["summary"];
    assert_eq!(s["good_images"], 4);
    assert_eq!(s["anomalous_images"], 6);
    assert_eq!(s["has_masks"], true);
    assert!(s["clamped_images"].as_u64().unwrap() <= 10);
    unit_interval(&s["image_auroc"], "image AUROC");
    unit_interval(&s["image_auroc_raw"], "raw image AUROC");
    unit_interval(&s["image_auroc_log"], "log image AUROC");
    unit_interval(&s["image_f1"], "image F1");
    unit_interval(&s["pixel_auroc"], "pixel AUROC");
    unit_interval(&s["pixel_f1"], "pixel F1");
    unit_interval(&s["pixel_aupro"], "AUPRO");
    assert_eq!(s["aupro_fpr_limit"], 0.3);
    let counts: u64 = [
        "true_positive",
        "false_positive",
        "true_negative",
        "false_negative",
    ]
    .iter()
    .map(|k| s[k].as_u64().unwrap())
    .sum();
    assert_eq!(counts, 10);

    let map_pixels = (INPUT_SIZE * INPUT_SIZE) as u64;
    assert_eq!(s["pixels"].as_u64(), Some(10 * map_pixels));
    let patch_pixels = (PATCH as usize * INPUT_SIZE / IMAGE_SIZE as usize).pow(2) as u64;
    assert_eq!(s["anomalous_pixels"].as_u64(), Some(6 * patch_pixels));
    let pixel_counts: u64 = s["pixel_confusion"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(pixel_counts, 10 * map_pixels);

    for key in ["image_adaptive_threshold", "pixel_adaptive_threshold"] {
        let t = &s[key];
        assert!(t["raw"].as_f64().is_some(), "{key}: {t}");
        unit_interval(&t["normalized"], key);
        unit_interval(&t["f1"], key);
    }
    let thresholds = &s["thresholds"];
    assert_eq!(thresholds["image"]["normalized"], 0.5);
    assert_eq!(thresholds["decision_image"]["normalized"], 0.5);
    assert_eq!(
        thresholds["image"]["raw"],
        thresholds["stats"]["image_threshold"]
    );

    let defects = doc["per_defect"].as_array().unwrap();
    let names: Vec<&str> = defects
        .iter()
        .map(|d| d["defect"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["brick", "gravel"]);
    for defect in defects {
        assert_eq!(defect["images"], 3);
        unit_interval(&defect["image_auroc"], "per-defect AUROC");
    }

    let images = doc["images"].as_array().unwrap();
    assert_eq!(images.len(), 10);
    for image in images {
        let path = PathBuf::from(image["path"].as_str().unwrap());
        assert!(path.is_file(), "{}", path.display());
        assert!(image["score"].as_f64().is_some());
        assert!(image["log_score"].as_f64().unwrap() >= 0.0, "{image}");
        unit_interval(&image["normalized_score"], "normalised score");
        let pixels = image["anomalous_pixels"].as_u64().unwrap();
        if image["label"] == "good" {
            assert_eq!(image["defect"], "good");
            assert_eq!(pixels, 0);
        } else {
            assert_eq!(image["label"], "anomalous");
            assert_eq!(pixels, patch_pixels, "{image}");
            assert!(image["mask"].as_str().unwrap().ends_with("_mask.png"));
        }
    }

    let files = &doc["plots"];
    assert_eq!(files["colours"]["roc: pixel curve"], "orange");
    for (key, size) in [
        ("roc", Some((560, 560))),
        ("histogram", Some((760, 480))),
        ("grid", None),
    ] {
        let path = PathBuf::from(files[key]["path"].as_str().unwrap());
        assert!(path.starts_with(&plots), "{}", path.display());
        let png = image::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (width, height) = (png.width() as u64, png.height() as u64);
        assert_eq!(Some(width), files[key]["width"].as_u64(), "{key}");
        assert_eq!(Some(height), files[key]["height"].as_u64(), "{key}");
        if let Some((w, h)) = size {
            assert_eq!((width, height), (w, h), "{key}");
        }
    }
    let grid = image::open(plots.join("overlays.png")).unwrap();
    // Three rows of overlays 160 pixels wide, and 4 columns.
    assert!(grid.width() >= 4 * 160, "{}", grid.width());
    assert!(grid.height() >= 3 * 160, "{}", grid.height());
}

#[test]
fn eval_folders_without_masks() {
    let dir = tempfile::tempdir().unwrap();
    let mvtec = build_dataset(dir.path());
    let model = train_model(dir.path());
    let report = dir.path().join("plain.json");
    let out = run(patchflow()
        .args(["eval", "--model"])
        .arg(&model)
        .arg("--good")
        .arg(mvtec.join("test/good"))
        .arg("--anomalous")
        .arg(mvtec.join("test/gravel"))
        .arg("--report")
        .arg(&report));
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("(4 good, 3 anomalous; TP "), "{stdout}");
    assert!(
        stdout.contains("pixel AUROC n/a, pixel F1 n/a, AUPRO n/a"),
        "{stdout}"
    );
    let doc = read_report(&report);
    let s = &doc["summary"];
    assert_eq!(s["has_masks"], false);
    for key in [
        "pixel_auroc",
        "pixel_f1",
        "pixel_aupro",
        "pixel_confusion",
        "pixel_adaptive_threshold",
        "pixels",
    ] {
        assert!(s[key].is_null(), "{key} = {}", s[key]);
    }
    unit_interval(&s["image_auroc"], "image AUROC");
    assert_eq!(doc["per_defect"][0]["defect"], "gravel");
    assert!(doc.get("plots").is_none());

    // The same folders with --masks give pixel metrics.
    let out = run(patchflow()
        .args(["eval", "--model"])
        .arg(&model)
        .arg("--good")
        .arg(mvtec.join("test/good"))
        .arg("--anomalous")
        .arg(mvtec.join("test/gravel"))
        .arg("--masks")
        .arg(mvtec.join("ground_truth/gravel"))
        .arg("--report")
        .arg(&report));
    assert!(out.status.success());
    let s = &read_report(&report)["summary"];
    unit_interval(&s["pixel_auroc"], "pixel AUROC");
    unit_interval(&s["pixel_aupro"], "AUPRO");
}

#[test]
fn eval_rejects_missing_mask() {
    let dir = tempfile::tempdir().unwrap();
    let mvtec = build_dataset(dir.path());
    std::fs::remove_file(mvtec.join("ground_truth/brick/001_mask.png")).unwrap();
    let out = run(patchflow()
        .args(["eval", "--model"])
        .arg(dir.path().join("unused.safetensors"))
        .arg("--dataset")
        .arg(&mvtec));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("001_mask.png"), "{err}");
}
