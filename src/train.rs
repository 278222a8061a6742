// SPDX-License-Identifier: MIT OR Apache-2.0
//! Training on a folder of good images, as anomalib trains PatchFlow: the backbone is
//! frozen (eval-mode BatchNorm), the adaptor and flow are trained with Adam (lr 1e-3,
//! classic L2 weight decay 1e-4) on the negative log-likelihood. Because the backbone
//! never changes and no augmentation is applied, the fused features of every training
//! image are computed once and reused in every epoch.
//!
//! After training, held-out good images give the score statistics and the threshold.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor, Var, backprop::GradStore};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::SeedableRng;
use rand::seq::SliceRandom;

use crate::checkpoint::{BackboneSource, ModelMeta, TrainingInfo};
use crate::imageops::load_rgb_chw;
use crate::model::{self, BACKBONE_PREFIX, ModelConfig, PatchFlow, Weights, flow};
use crate::scoring::ScoreStats;

/// Image file extensions that training and prediction pick up from a folder: the
/// formats this build decodes.
pub const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// Training settings; the defaults are anomalib's optimiser settings.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    /// Share of the images held out to compute the score statistics.
    pub holdout_fraction: f64,
    /// Quantile of held-out good scores used as the image threshold.
    pub threshold_quantile: f64,
    pub seed: u64,
    /// Draw a progress bar on stderr when it is a terminal.
    pub progress: bool,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            epochs: 20,
            batch_size: 16,
            learning_rate: 1e-3,
            weight_decay: 1e-4,
            holdout_fraction: 0.2,
            threshold_quantile: 0.99,
            seed: 0,
            progress: true,
        }
    }
}

impl TrainOptions {
    /// Checks every setting, so that a bad one fails before any work is done.
    pub fn validate(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        if self.epochs == 0 {
            problems.push("epochs must be at least 1".to_string());
        }
        if self.batch_size == 0 {
            problems.push("batch size must be at least 1".to_string());
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            problems.push(format!(
                "learning rate {} must be a positive number",
                self.learning_rate
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            problems.push(format!(
                "weight decay {} must be zero or positive",
                self.weight_decay
            ));
        }
        if !(self.holdout_fraction > 0.0 && self.holdout_fraction < 1.0) {
            problems.push(format!(
                "holdout share {} must be between 0 and 1 (exclusive)",
                self.holdout_fraction
            ));
        }
        if !(0.0..=1.0).contains(&self.threshold_quantile) {
            problems.push(format!(
                "threshold quantile {} must be between 0 and 1",
                self.threshold_quantile
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

/// Lists the image files of a folder (not recursive), sorted by name.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read image folder {}", dir.display()))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        if path.is_file() && ext.is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str())) {
            files.push(path);
        }
    }
    files.sort();
    if files.is_empty() {
        bail!(
            "no images ({}) found in {}",
            IMAGE_EXTENSIONS.join(", "),
            dir.display()
        );
    }
    Ok(files)
}

/// Reads the converted backbone weights and where they came from.
fn read_backbone(
    path: &Path,
    config: &ModelConfig,
) -> Result<(HashMap<String, Tensor>, BackboneSource)> {
    let bytes = std::fs::read(path).with_context(|| {
        format!(
            "cannot read backbone weights {} (run scripts/setup.sh to create them)",
            path.display()
        )
    })?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).with_context(|| {
        format!(
            "backbone weights {} are not a valid safetensors file",
            path.display()
        )
    })?;
    let fields = header.metadata().clone().unwrap_or_default();
    let name = fields
        .get("patchflow.backbone")
        .cloned()
        .unwrap_or_else(|| config.backbone.clone());
    if name != config.backbone {
        bail!(
            "backbone weights {} are for {name}, but the model config asks for {}",
            path.display(),
            config.backbone
        );
    }
    let source = BackboneSource {
        name,
        source: fields
            .get("patchflow.source")
            .cloned()
            .unwrap_or_else(|| path.display().to_string()),
        sha256: fields
            .get("patchflow.source_sha256")
            .cloned()
            .unwrap_or_default(),
    };
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .with_context(|| format!("cannot read tensors from {}", path.display()))?;
    // The classification head is not part of the feature extractor.
    let is_head = |k: &str| {
        k.starts_with("conv_head.") || k.starts_with("bn2.") || k.starts_with("classifier.")
    };
    let tensors = tensors
        .into_iter()
        .filter(|(k, _)| !is_head(k) && !k.ends_with("num_batches_tracked"))
        .map(|(k, v)| (format!("{BACKBONE_PREFIX}.{k}"), v))
        .collect();
    Ok((tensors, source))
}

/// Builds an untrained model: pretrained backbone, freshly initialised adaptor and flow,
/// and placeholder statistics (threshold at the middle of [-1, 0]).
pub fn init_model(
    config: &ModelConfig,
    backbone: &Path,
    seed: u64,
) -> Result<(PatchFlow, ModelMeta)> {
    init_model_on(config, backbone, seed, &Device::Cpu)
}

/// [`init_model`] on a chosen device.
pub fn init_model_on(
    config: &ModelConfig,
    backbone: &Path,
    seed: u64,
    device: &Device,
) -> Result<(PatchFlow, ModelMeta)> {
    let (mut tensors, source) = read_backbone(backbone, config)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for (name, t) in model::init_head_tensors(config, &mut rng, &Device::Cpu)? {
        tensors.insert(name, t);
    }
    let weights = Weights::new(tensors, device, DType::F32)?;
    let model = PatchFlow::new(config, &weights)?;
    let stats = ScoreStats {
        image_threshold: -0.5,
        image_min: -1.0,
        image_max: 0.0,
        pixel_threshold: -0.5,
        pixel_min: -1.0,
        pixel_max: 0.0,
        image_log_threshold: None,
    };
    let meta = ModelMeta {
        config: config.clone(),
        backbone: source,
        stats,
        training: None,
    };
    Ok((model, meta))
}

/// Adam with classic (coupled) L2 weight decay, as `torch.optim.Adam(weight_decay=...)`.
struct Adam {
    vars: Vec<(Var, Tensor, Tensor)>,
    lr: f64,
    weight_decay: f64,
    step: i32,
}

impl Adam {
    const BETA1: f64 = 0.9;
    const BETA2: f64 = 0.999;
    const EPS: f64 = 1e-8;

    fn new(vars: Vec<Var>, lr: f64, weight_decay: f64) -> candle_core::Result<Self> {
        let vars = vars
            .into_iter()
            .map(|v| {
                let m = v.zeros_like()?;
                let s = v.zeros_like()?;
                Ok((v, m, s))
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            vars,
            lr,
            weight_decay,
            step: 0,
        })
    }

    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        self.step += 1;
        let c1 = 1.0 - Self::BETA1.powi(self.step);
        let c2 = 1.0 - Self::BETA2.powi(self.step);
        for (var, m, v) in self.vars.iter_mut() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let g = (g + var.as_tensor().affine(self.weight_decay, 0.0)?)?;
            *m = ((&*m * Self::BETA1)? + (&g * (1.0 - Self::BETA1))?)?;
            *v = ((&*v * Self::BETA2)? + (g.sqr()? * (1.0 - Self::BETA2))?)?;
            let update = ((&*m / c1)? / ((&*v / c2)?.sqrt()? + Self::EPS)?)?;
            var.set(&(var.as_tensor() - (update * self.lr)?)?)?;
        }
        Ok(())
    }
}

/// Tensor names that training changes by gradient.
fn is_trainable(name: &str) -> bool {
    let head = name.starts_with(&format!("{}.", model::ADAPTOR_PREFIX))
        || name.starts_with(&format!("{}.", model::FLOW_PREFIX));
    head && !name.ends_with("w_perm") && !name.contains("running_")
}

/// Wraps the trainable tensors of `model` in variables and rebuilds the model on them,
/// so that the optimiser's updates show in the model.
fn with_variables(model: PatchFlow) -> Result<(PatchFlow, Vec<Var>)> {
    let mut tensors = HashMap::new();
    let mut vars = Vec::new();
    for (name, t) in model.tensors() {
        if is_trainable(&name) {
            let var = Var::from_tensor(&t)?;
            tensors.insert(name, var.as_tensor().clone());
            vars.push(var);
        } else {
            tensors.insert(name, t);
        }
    }
    let weights = Weights::new(tensors, model.device(), DType::F32)?;
    Ok((PatchFlow::new(model.config(), &weights)?, vars))
}

fn progress_bar(len: u64, enabled: bool, template: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(
        Some(len),
        if enabled {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Loads and pre-processes one image into the model input (1, 3, H, W).
pub fn load_input(model: &PatchFlow, path: &Path) -> Result<Tensor> {
    let (chw, h, w) = load_rgb_chw(path)?;
    Ok(model.preprocess(&chw, (h, w))?)
}

/// Trains a model on good images and calibrates its statistics on a held-out share.
pub fn train(
    config: &ModelConfig,
    backbone: &Path,
    images: &[PathBuf],
    opts: &TrainOptions,
    device: &Device,
) -> Result<(PatchFlow, ModelMeta)> {
    opts.validate()
        .map_err(|e| anyhow::anyhow!("invalid training settings: {e}"))?;
    if images.len() < 2 {
        bail!(
            "training needs at least 2 good images (one to train on, one to calibrate the threshold), got {}",
            images.len()
        );
    }
    let started = Instant::now();
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let mut order: Vec<PathBuf> = images.to_vec();
    order.shuffle(&mut rng);
    let holdout_n =
        ((images.len() as f64 * opts.holdout_fraction).round() as usize).clamp(1, images.len() - 1);
    let (holdout, train_set) = order.split_at(holdout_n);

    let (model, mut meta) = init_model_on(config, backbone, opts.seed, device)?;
    let (model, vars) = with_variables(model)?;

    let bar = progress_bar(
        train_set.len() as u64,
        opts.progress,
        "features {bar:30} {pos}/{len} {elapsed}",
    );
    let mut cache = Vec::with_capacity(train_set.len());
    for path in train_set {
        let x = load_input(&model, path)?;
        cache.push(model.embed(&x)?.detach());
        bar.inc(1);
    }
    bar.finish_and_clear();
    tracing::info!(
        images = train_set.len(),
        seconds = started.elapsed().as_secs_f64(),
        "extracted training features"
    );

    let batch = opts.batch_size.max(1);
    let batches = train_set.len().div_ceil(batch);
    let mut adam = Adam::new(vars, opts.learning_rate, opts.weight_decay)?;
    let bar = progress_bar(
        (opts.epochs * batches) as u64,
        opts.progress,
        "train {bar:30} {pos}/{len} {msg} {elapsed}",
    );
    let mut final_loss = f32::NAN;
    let mut indices: Vec<usize> = (0..cache.len()).collect();
    for epoch in 0..opts.epochs {
        indices.shuffle(&mut rng);
        let mut epoch_loss = 0.0;
        for chunk in indices.chunks(batch) {
            let x = Tensor::cat(&chunk.iter().map(|&i| &cache[i]).collect::<Vec<_>>(), 0)?;
            let (z, logdet) = model.flow_forward(&x, true)?;
            let loss = flow::nll_loss(&z, &logdet)?;
            let value = loss.to_scalar::<f32>()?;
            if !value.is_finite() {
                bail!(
                    "training diverged at epoch {}: loss is {value}; try a lower --lr",
                    epoch + 1
                );
            }
            adam.step(&loss.backward()?)?;
            epoch_loss += value as f64 * chunk.len() as f64;
            bar.set_message(format!(
                "epoch {}/{} loss {value:.4}",
                epoch + 1,
                opts.epochs
            ));
            bar.inc(1);
        }
        final_loss = (epoch_loss / cache.len() as f64) as f32;
        tracing::debug!(epoch = epoch + 1, loss = final_loss, "epoch done");
        if !opts.progress {
            eprintln!("epoch {}/{}: loss {final_loss:.5}", epoch + 1, opts.epochs);
        }
    }
    bar.finish_and_clear();
    drop(cache);

    meta.stats = calibrate(&model, holdout, opts.threshold_quantile)?;
    meta.training = Some(TrainingInfo {
        train_images: train_set.len(),
        holdout_images: holdout.len(),
        epochs: opts.epochs,
        batch_size: batch,
        learning_rate: opts.learning_rate,
        weight_decay: opts.weight_decay,
        final_loss,
        seconds: started.elapsed().as_secs_f64(),
        seed: opts.seed,
    });
    Ok((model, meta))
}

/// Linear-interpolated quantile of unsorted values.
pub fn quantile(values: &[f32], q: f64) -> f32 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f32::total_cmp);
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    let frac = (pos - lo as f64) as f32;
    sorted[lo] + (sorted[hi] - sorted[lo]) * frac
}

/// Score statistics on good images: the image threshold is the `q` quantile of their
/// scores, and the log threshold the `q` quantile of their log scores. Min and max bound
/// the scores and the map values. Without defect masks the
/// pixel threshold equals the image threshold, as anomalib's threshold matching does.
pub fn calibrate(model: &PatchFlow, good: &[PathBuf], q: f64) -> Result<ScoreStats> {
    let mut scores = Vec::with_capacity(good.len());
    let mut log_scores = Vec::with_capacity(good.len());
    let (mut pixel_min, mut pixel_max) = (f32::INFINITY, f32::NEG_INFINITY);
    for path in good {
        let out = model.forward(&load_input(model, path)?)?;
        scores.push(out.score.flatten_all()?.to_vec1::<f32>()?[0]);
        log_scores.push(out.log_score.flatten_all()?.to_vec1::<f32>()?[0]);
        let map = out.anomaly_map.flatten_all()?;
        pixel_min = pixel_min.min(map.min(0)?.to_scalar::<f32>()?);
        pixel_max = pixel_max.max(map.max(0)?.to_scalar::<f32>()?);
    }
    if let Some(bad) = scores.iter().position(|s| !s.is_finite()) {
        bail!(
            "the trained model gives a non-finite score on {}; training diverged: try a lower --lr",
            good[bad].display()
        );
    }
    let threshold = quantile(&scores, q);
    let image_min = scores.iter().copied().fold(f32::INFINITY, f32::min);
    let image_max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    Ok(ScoreStats {
        image_threshold: threshold,
        image_min,
        image_max,
        pixel_threshold: threshold,
        pixel_min,
        pixel_max,
        image_log_threshold: Some(quantile(&log_scores, q)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_interpolates() {
        let v = [4.0, 1.0, 3.0, 2.0];
        assert_eq!(quantile(&v, 0.0), 1.0);
        assert_eq!(quantile(&v, 1.0), 4.0);
        assert!((quantile(&v, 0.5) - 2.5).abs() < 1e-6);
    }

    #[test]
    fn options_are_validated() {
        assert!(TrainOptions::default().validate().is_ok());
        let bad = TrainOptions {
            epochs: 0,
            batch_size: 0,
            learning_rate: f64::NAN,
            holdout_fraction: 1.5,
            threshold_quantile: 2.0,
            ..TrainOptions::default()
        };
        let err = bad.validate().unwrap_err();
        for part in [
            "epochs",
            "batch size",
            "learning rate",
            "holdout",
            "quantile",
        ] {
            assert!(err.contains(part), "{part} missing from {err}");
        }
    }

    #[test]
    fn trainable_names() {
        assert!(is_trainable("feature_adaptor.weight"));
        assert!(is_trainable("flow.module_list.0.subnet.0.weight"));
        assert!(is_trainable("flow.module_list.0.global_scale"));
        assert!(!is_trainable("flow.module_list.0.w_perm"));
        assert!(!is_trainable("flow.module_list.0.subnet.2.running_var"));
        assert!(!is_trainable("backbone.conv_stem.weight"));
    }
}
