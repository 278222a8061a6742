// SPDX-License-Identifier: MIT OR Apache-2.0
//! Import of PatchFlow models trained in anomalib 2.4 to 2.7 (Python).
//!
//! anomalib's `Engine` saves a Lightning checkpoint: a torch zip archive whose pickle
//! contains the `state_dict`, the `hyper_parameters` of `Patchflow` and the
//! configuration of its pre- and post-processor. [`import_checkpoint`] reads it with
//! [`crate::pth`], which runs no code from the file and rejects pickle globals outside
//! its allow list, and builds a patchflow model with the same weights, configuration
//! and score statistics:
//!
//! - tensors: `model.feature_extractor.feature_extractor.<timm key>` (anomalib 2.5.1 and
//!   later) or `model.feature_extractor.<timm key>` (2.4 to 2.5.0) become
//!   `backbone.<timm key>`, `model.feature_adaptor.*` becomes `feature_adaptor.*` and
//!   `model.flow.module_list.{k}.*` becomes `flow.module_list.{k}.*`. anomalib's
//!   `w_perm_inv` (the transpose of `w_perm`) and BatchNorm `num_batches_tracked`
//!   counters are dropped, because inference does not use them;
//! - configuration: `hyper_parameters` and the `Resize` and `Normalize` steps of
//!   `anomalib_pre_processor_config`, with anomalib 2.7.0's defaults for missing fields;
//! - statistics: the post-processor buffers `_image_threshold`, `_pixel_threshold`,
//!   `image_min`, `image_max`, `pixel_min` and `pixel_max`, in raw-score units. NaN
//!   (never computed) stays NaN, and [`crate::scoring::normalize`] treats it as anomalib
//!   does.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

use crate::checkpoint::{BackboneSource, ModelMeta};
use crate::imageops::ResizeMode;
use crate::model::flow::permutation_from_matrix;
use crate::model::synthetic::tensor_shapes;
use crate::model::{ModelConfig, ModelError, PatchFlow, Preprocess, Weights};
use crate::pickle::{self, PickleError, Value};
use crate::pth::{self, Checkpoint, PthError};
use crate::scoring::ScoreStats;

/// State-dict prefix of the backbone in anomalib 2.5.1 and later, where `Patchflow`
/// wraps the timm model in a `TimmFeatureExtractor`.
pub const TIMM_EXTRACTOR_PREFIX: &str = "model.feature_extractor.feature_extractor.";

/// State-dict prefix of the backbone in anomalib 2.4.0 to 2.5.0.
pub const LEGACY_EXTRACTOR_PREFIX: &str = "model.feature_extractor.";

const ADAPTOR_PREFIX: &str = "model.feature_adaptor.";
const FLOW_PREFIX: &str = "model.flow.";
const POST_PROCESSOR_PREFIX: &str = "post_processor.";

/// anomalib 2.7.0's `Patchflow` defaults for the hyper-parameters that shape the model.
pub const DEFAULT_BACKBONE: &str = "tf_efficientnet_b5";
const DEFAULT_FLOW_STEPS: usize = 1;
const DEFAULT_FLOW_FEATURE_DIM: usize = 128;
const DEFAULT_NUM_SCALES: usize = 3;
const DEFAULT_PATCH_SIZE: usize = 3;
const DEFAULT_FLOW_HIDDEN_DIM: usize = 128;
/// anomalib 2.7.0's `Patchflow.configure_pre_processor` resize target.
const DEFAULT_INPUT_SIZE: [usize; 2] = [768, 768];

/// Side of the square patches of DINOv2 ViTs, to which anomalib aligns the input crop.
const DINOV2_PATCH_SIZE: usize = 14;

/// Error from importing an anomalib checkpoint. Every variant is a problem of the
/// input file.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read the file: {0}")]
    Io(std::io::Error),
    #[error(
        "not a PyTorch checkpoint ({0}); pass the .ckpt file that anomalib's Engine writes, a zip archive with a pickle"
    )]
    NotACheckpoint(String),
    #[error(
        "the checkpoint is damaged or truncated ({0}); copy or download the .ckpt file again"
    )]
    Damaged(String),
    #[error(
        "the checkpoint's pickle uses the global {global}, which the importer does not load: \
         it reads only tensors and plain Python data (dicts, lists, numbers, strings), because \
         loading any other global runs code from the file. Do not load this file in Python \
         either unless you trust its source; if you do, save its state_dict, hyper_parameters \
         and anomalib_*_config entries again as plain data with torch.save"
    )]
    GlobalNotAllowed {
        /// The global as `module.name`, e.g. `builtins.eval`.
        global: String,
    },
    #[error("the checkpoint is invalid: {0}")]
    Invalid(String),
    #[error(
        "{field} is invalid: {reason}; the checkpoint was not written by anomalib's Patchflow, or the value was edited"
    )]
    InvalidField { field: String, reason: String },
    #[error(
        "backbone {name:?} (hyper_parameters.backbone) is not supported; supported backbones: {supported}"
    )]
    UnsupportedBackbone { name: String, supported: String },
    #[error("unsupported state_dict layout: {0}")]
    UnsupportedLayout(String),
    #[error(
        "backbone {backbone:?} was saved by anomalib 2.4 to 2.5.0, which names DINOv2 weights with its own ViT module names, not timm's; retrain the model with anomalib 2.5.1 or later, whose checkpoints use timm names"
    )]
    LegacyDinov2 { backbone: String },
    #[error(
        "tensor {key} is missing from the state_dict; the checkpoint does not contain a complete Patchflow model with these hyper_parameters"
    )]
    MissingTensor { key: String },
    #[error(
        "tensor {key} has shape {actual:?}, but the hyper_parameters ({config}) need {expected:?}; the weights and hyper_parameters do not belong together"
    )]
    ShapeMismatch {
        key: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
        config: String,
    },
    #[error(
        "tensor {key} is not part of a Patchflow model with these hyper_parameters ({config}); the weights and hyper_parameters do not belong together"
    )]
    UnexpectedTensor { key: String, config: String },
    #[error(
        "tensor {key} contains NaN or infinite values; the training that produced it diverged"
    )]
    NonFinite { key: String },
    #[error("the weights do not form a valid model: {0}")]
    Model(ModelError),
}

/// Which anomalib versions' state-dict names the checkpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyLayout {
    /// anomalib 2.5.1 and later: `model.feature_extractor.feature_extractor.<timm key>`.
    TimmExtractor,
    /// anomalib 2.4.0 to 2.5.0: `model.feature_extractor.<timm key>`.
    Legacy,
}

impl KeyLayout {
    /// Describes the layout for the import summary.
    pub fn describe(self) -> &'static str {
        match self {
            KeyLayout::TimmExtractor => {
                "anomalib 2.5.1+ keys (model.feature_extractor.feature_extractor.*)"
            }
            KeyLayout::Legacy => "anomalib 2.4-2.5.0 keys (model.feature_extractor.*)",
        }
    }

    /// Returns the state-dict prefix of the backbone tensors.
    pub fn backbone_prefix(self) -> &'static str {
        match self {
            KeyLayout::TimmExtractor => TIMM_EXTRACTOR_PREFIX,
            KeyLayout::Legacy => LEGACY_EXTRACTOR_PREFIX,
        }
    }
}

/// Model file names of the state-dict tensors, and the entries the import leaves out.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyMap {
    pub layout: KeyLayout,
    /// Checkpoint key to model file name, for every backbone, adaptor and flow tensor.
    pub tensors: BTreeMap<String, String>,
    /// Post-processor buffer name (such as `image_min`) to checkpoint key.
    pub post_processor: BTreeMap<String, String>,
}

/// A model built from an anomalib checkpoint, with what the import found out on the way.
#[derive(Debug)]
pub struct Imported {
    pub model: PatchFlow,
    pub meta: ModelMeta,
    pub layout: KeyLayout,
    /// Sentences for the user: defaults that filled missing fields, tensors left out,
    /// and post-processor settings that change how anomalib labels images.
    pub notes: Vec<String>,
    /// Lightning version that wrote the checkpoint, when it records one.
    pub lightning_version: Option<String>,
    /// Training epoch and optimizer step counts recorded by Lightning.
    pub epoch: Option<i64>,
    pub global_step: Option<i64>,
    /// Number of tensors and of their elements in the model.
    pub tensor_count: usize,
    pub element_count: usize,
}

/// Reads an anomalib Lightning checkpoint file and builds the model on the CPU.
pub fn import_checkpoint(path: &Path) -> Result<Imported, ImportError> {
    let bytes = std::fs::read(path).map_err(ImportError::Io)?;
    let file_name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    import_bytes(&bytes, &file_name)
}

/// Builds the model from the bytes of a checkpoint. `file_name` is recorded as the
/// source of the backbone weights, together with the sha256 of `bytes`.
pub fn import_bytes(bytes: &[u8], file_name: &str) -> Result<Imported, ImportError> {
    let checkpoint = Checkpoint::from_bytes(bytes).map_err(read_error)?;
    let root = checkpoint.root();
    if root.get("state_dict").is_none() {
        return Err(ImportError::Invalid(format!(
            "the root of the pickle is a {} without a \"state_dict\" entry, so it is no Lightning checkpoint; pass the .ckpt file that anomalib's Engine writes",
            root.type_name()
        )));
    }
    let mut notes = Vec::new();
    let config = model_config(root, &mut notes)?;
    let post_config = PostProcessorConfig::read(root, &mut notes)?;

    let state = checkpoint.state_dict().map_err(read_error)?;
    let keys: Vec<String> = state.iter().map(|(key, _)| key.clone()).collect();
    let key_map = map_state_dict_keys(&keys, &config.backbone)?;
    let backbone = crate::model::backbone_config(&config.backbone).map_err(unsupported_backbone)?;
    let tensors: HashMap<&str, &pth::Tensor> =
        state.iter().map(|(key, t)| (key.as_str(), t)).collect();

    let stats = post_config.score_stats(&key_map, &tensors)?;
    let weights = model_tensors(&config, &key_map, &tensors, &mut notes)?;
    let tensor_count = weights.len();
    let element_count = weights.values().map(Tensor::elem_count).sum();
    let weights = Weights::new(weights, &Device::Cpu, DType::F32).map_err(ImportError::Model)?;
    let model = PatchFlow::new(&config, &weights).map_err(ImportError::Model)?;

    let meta = ModelMeta {
        config,
        backbone: BackboneSource {
            name: backbone.name().to_owned(),
            source: file_name.to_owned(),
            sha256: format!("{:x}", Sha256::digest(bytes)),
        },
        stats,
        training: None,
    };
    Ok(Imported {
        model,
        meta,
        layout: key_map.layout,
        notes,
        lightning_version: root
            .get("pytorch-lightning_version")
            .and_then(Value::as_str)
            .map(str::to_owned),
        epoch: root.get("epoch").and_then(Value::as_i64),
        global_step: root.get("global_step").and_then(Value::as_i64),
        tensor_count,
        element_count,
    })
}

fn read_error(error: PthError) -> ImportError {
    match error {
        PthError::Io { source, .. } => ImportError::Io(source),
        PthError::NotACheckpoint(reason) => ImportError::NotACheckpoint(reason),
        PthError::Zip(error) => ImportError::Damaged(format!("invalid zip archive: {error}")),
        PthError::Pickle {
            source: PickleError::GlobalNotAllowed { module, name },
            ..
        } => ImportError::GlobalNotAllowed {
            global: format!("{module}.{name}"),
        },
        PthError::Pickle {
            source: source @ PickleError::Truncated { .. },
            part,
        } => ImportError::Damaged(format!("{part}: {source}")),
        PthError::Storage { key, message } => {
            ImportError::Damaged(format!("storage {key}: {message}"))
        }
        other => ImportError::Invalid(other.to_string()),
    }
}

fn unsupported_backbone(error: ModelError) -> ImportError {
    match error {
        ModelError::UnknownBackbone { name, supported } => {
            ImportError::UnsupportedBackbone { name, supported }
        }
        other => ImportError::Model(other),
    }
}

// --- configuration ---------------------------------------------------------------------

/// Reads the model configuration from `hyper_parameters` and
/// `anomalib_pre_processor_config`, adding a note to `notes` for every field that is
/// missing and takes anomalib 2.7.0's default.
pub fn model_config(root: &Value, notes: &mut Vec<String>) -> Result<ModelConfig, ImportError> {
    let empty = Value::Dict(Vec::new());
    let hyper = match root.get("hyper_parameters") {
        Some(value @ Value::Dict(_)) => value,
        Some(other) => {
            return Err(ImportError::InvalidField {
                field: "hyper_parameters".into(),
                reason: format!("expected a dict, found a {}", other.type_name()),
            });
        }
        None => {
            notes.push(
                "hyper_parameters is missing: using anomalib 2.7.0's defaults for all of them"
                    .into(),
            );
            &empty
        }
    };
    let mut backbone = match hyper.get("backbone") {
        Some(value) => value
            .as_str()
            .ok_or_else(|| ImportError::InvalidField {
                field: "hyper_parameters.backbone".into(),
                reason: format!("expected a str, found a {}", value.type_name()),
            })?
            .to_owned(),
        None => {
            notes.push(format!(
                "hyper_parameters.backbone is missing: using anomalib 2.7.0's default {DEFAULT_BACKBONE}"
            ));
            DEFAULT_BACKBONE.to_owned()
        }
    };
    // timm accepts a pretrained tag after a dot (`tf_efficientnet_b5.ns_jft_in1k`). The
    // tag selects weights to download, which the checkpoint already contains.
    if let Some((architecture, tag)) = backbone.split_once('.') {
        notes.push(format!(
            "hyper_parameters.backbone {backbone:?}: the pretrained tag {tag:?} is ignored, because the checkpoint contains the weights"
        ));
        backbone = architecture.to_owned();
    }

    let mut count = |name: &str, default: usize| -> Result<usize, ImportError> {
        let field = format!("hyper_parameters.{name}");
        match hyper.get(name) {
            Some(value) => positive_int(value).ok_or_else(|| ImportError::InvalidField {
                field,
                reason: format!("expected a positive int, found {}", describe(value)),
            }),
            None => {
                notes.push(format!(
                    "{field} is missing: using anomalib 2.7.0's default {default}"
                ));
                Ok(default)
            }
        }
    };
    let flow_steps = count("flow_steps", DEFAULT_FLOW_STEPS)?;
    let flow_feature_dim = count("flow_feature_dim", DEFAULT_FLOW_FEATURE_DIM)?;
    let num_scales = count("num_scales", DEFAULT_NUM_SCALES)?;
    let patch_size = count("patch_size", DEFAULT_PATCH_SIZE)?;
    let flow_hidden_dim = count("flow_hidden_dim", DEFAULT_FLOW_HIDDEN_DIM)?;
    let crop_size = match hyper.get("crop_size") {
        None => {
            notes.push(
                "hyper_parameters.crop_size is missing: using anomalib 2.7.0's default None (no crop)"
                    .into(),
            );
            None
        }
        Some(Value::None) => None,
        Some(value) => Some(size_pair(value).ok_or_else(|| ImportError::InvalidField {
            field: "hyper_parameters.crop_size".into(),
            reason: format!(
                "expected None or [height, width] in pixels, found {}",
                describe(value)
            ),
        })?),
    };

    let (input_size, preprocess) = pre_processor(root, notes)?;
    let mut config = ModelConfig {
        backbone,
        input_size,
        crop_size,
        num_scales,
        patch_size,
        flow_steps,
        flow_feature_dim,
        flow_hidden_dim,
        preprocess,
    };
    align_dinov2_crop(&mut config, notes);
    config.validate().map_err(|reason| ImportError::InvalidField {
        field: "hyper_parameters".into(),
        reason,
    })?;
    Ok(config)
}

/// Applies anomalib's crop for DINOv2 backbones: each side of the crop (or of the input,
/// without a crop) is floored to a multiple of the ViT patch size, and the crop is used
/// whenever one was given or the floored size differs from the input.
fn align_dinov2_crop(config: &mut ModelConfig, notes: &mut Vec<String>) {
    if !config.backbone.contains("dinov2") {
        return;
    }
    let [h, w] = config.crop_size.unwrap_or(config.input_size);
    let aligned = [
        h / DINOV2_PATCH_SIZE * DINOV2_PATCH_SIZE,
        w / DINOV2_PATCH_SIZE * DINOV2_PATCH_SIZE,
    ];
    if config.crop_size.is_some() || aligned != config.input_size {
        if config.crop_size != Some(aligned) {
            notes.push(format!(
                "DINOv2 backbone: the input is centre-cropped to {}x{}, a multiple of the {DINOV2_PATCH_SIZE}-pixel ViT patches, as anomalib does",
                aligned[0], aligned[1]
            ));
        }
        config.crop_size = Some(aligned);
    }
}

/// Reads the `Resize` and `Normalize` steps of `anomalib_pre_processor_config`.
fn pre_processor(
    root: &Value,
    notes: &mut Vec<String>,
) -> Result<([usize; 2], Preprocess), ImportError> {
    const FIELD: &str = "anomalib_pre_processor_config";
    let Some(config) = root.get(FIELD) else {
        notes.push(format!(
            "{FIELD} is missing: using anomalib 2.7.0's default pre-processing, an antialiased resize to {}x{} and ImageNet normalisation",
            DEFAULT_INPUT_SIZE[0], DEFAULT_INPUT_SIZE[1]
        ));
        return Ok((DEFAULT_INPUT_SIZE, Preprocess::imagenet()));
    };
    let invalid = |reason: String| ImportError::InvalidField {
        field: format!("{FIELD}.transform"),
        reason,
    };
    let transform = config
        .get("transform")
        .filter(|t| !t.is_none())
        .ok_or_else(|| {
            invalid(
                "the pre-processor has no transform, so the input size is unknown; patchflow needs a Resize to a fixed [height, width]"
                    .into(),
            )
        })?;
    let steps = transform_steps(transform).map_err(invalid)?;

    let mut size = None;
    let mut resize = ResizeMode::Antialias;
    let mut normalize = None;
    for (class, args) in steps {
        match class {
            "Resize" => {
                if size.is_some() {
                    return Err(invalid("the transform contains two Resize steps".into()));
                }
                let (step_size, mode) = resize_step(args).map_err(invalid)?;
                size = Some(step_size);
                resize = mode;
            }
            "Normalize" => {
                if size.is_none() {
                    return Err(invalid(
                        "Normalize comes before Resize; patchflow resizes first".into(),
                    ));
                }
                if normalize.is_some() {
                    return Err(invalid("the transform contains two Normalize steps".into()));
                }
                normalize = Some(normalize_step(args).map_err(invalid)?);
            }
            other => {
                return Err(invalid(format!(
                    "transform {other} is not supported: patchflow's pre-processing is one Resize followed by one Normalize"
                )));
            }
        }
    }
    let size = size.ok_or_else(|| {
        invalid(
            "the transform has no Resize, so the input size is unknown; patchflow needs a Resize to a fixed [height, width]"
                .into(),
        )
    })?;
    let (mean, std) = normalize.unwrap_or_else(|| {
        notes.push(format!(
            "{FIELD} has no Normalize step: pixel values stay in [0, 1] as in anomalib"
        ));
        ([0.0; 3], [1.0; 3])
    });
    Ok((size, Preprocess { resize, mean, std }))
}

/// Returns the `(class name, init_args)` of each step of a transform spec: the steps
/// of a `Compose`, or the transform itself.
fn transform_steps(spec: &Value) -> Result<Vec<(&str, &Value)>, String> {
    let (class, args) = transform_class(spec)?;
    if class != "Compose" {
        return Ok(vec![(class, args)]);
    }
    let items = args
        .get("transforms")
        .and_then(Value::as_sequence)
        .ok_or("Compose has no list of transforms")?;
    items
        .iter()
        .map(|item| {
            let (class, args) = transform_class(item)?;
            if class == "Compose" {
                return Err("nested Compose transforms are not supported".to_owned());
            }
            Ok((class, args))
        })
        .collect()
}

/// Splits a `{"class_path": ..., "init_args": ...}` spec into the class name (the last
/// component of the path) and its arguments.
fn transform_class(spec: &Value) -> Result<(&str, &Value), String> {
    let path = spec
        .get("class_path")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("expected a class_path, found {}", describe(spec)))?;
    if !path.starts_with("torchvision.transforms") {
        return Err(format!(
            "transform {path} is not supported: patchflow reads only torchvision's Resize and Normalize"
        ));
    }
    let class = path.rsplit('.').next().unwrap_or(path);
    static EMPTY: Value = Value::None;
    Ok((class, spec.get("init_args").unwrap_or(&EMPTY)))
}

fn resize_step(args: &Value) -> Result<([usize; 2], ResizeMode), String> {
    let size = args.get("size").ok_or("Resize has no size")?;
    let size = size_pair(size).ok_or_else(|| {
        format!(
            "Resize size must be [height, width] in pixels, found {}; a single int keeps the aspect ratio, so frames of other shapes would give the model another input size",
            describe(size)
        )
    })?;
    if let Some(interpolation) = args.get("interpolation")
        && !interpolation.is_none()
        && interpolation.as_str().map(str::to_ascii_lowercase) != Some("bilinear".to_owned())
    {
        return Err(format!(
            "Resize interpolation {} is not supported: patchflow resizes bilinearly",
            describe(interpolation)
        ));
    }
    if args.get("max_size").is_some_and(|v| !v.is_none()) {
        return Err("Resize max_size is not supported".into());
    }
    // torchvision v2's Resize antialiases by default.
    let antialias = match args.get("antialias") {
        None | Some(Value::None) => true,
        Some(value) => value
            .as_bool()
            .ok_or_else(|| format!("Resize antialias must be a bool, found {}", describe(value)))?,
    };
    let mode = if antialias {
        ResizeMode::Antialias
    } else {
        ResizeMode::Bilinear
    };
    Ok((size, mode))
}

fn normalize_step(args: &Value) -> Result<([f32; 3], [f32; 3]), String> {
    let channels = |name: &str| -> Result<[f32; 3], String> {
        let value = args
            .get(name)
            .ok_or_else(|| format!("Normalize has no {name}"))?;
        let items = value.as_sequence().unwrap_or(&[]);
        let numbers: Option<Vec<f32>> = items.iter().map(|v| v.as_f64().map(|x| x as f32)).collect();
        match numbers.as_deref() {
            Some([a, b, c]) => Ok([*a, *b, *c]),
            // torchvision broadcasts one value to every channel.
            Some([a]) => Ok([*a; 3]),
            _ => Err(format!(
                "Normalize {name} must be 1 or 3 numbers, found {}",
                describe(value)
            )),
        }
    };
    Ok((channels("mean")?, channels("std")?))
}

/// The parts of `anomalib_post_processor_config` that change scores or labels.
#[derive(Debug, Clone, PartialEq)]
struct PostProcessorConfig {
    threshold_matching: bool,
}

impl PostProcessorConfig {
    fn read(root: &Value, notes: &mut Vec<String>) -> Result<Self, ImportError> {
        const FIELD: &str = "anomalib_post_processor_config";
        let Some(config) = root.get(FIELD) else {
            notes.push(format!(
                "{FIELD} is missing: using anomalib 2.7.0's defaults (normalisation, thresholding and threshold matching on, sensitivity 0.5)"
            ));
            return Ok(Self {
                threshold_matching: true,
            });
        };
        let flag = |name: &str| -> Result<bool, ImportError> {
            match config.get(name) {
                None => Ok(true),
                Some(value) => value.as_bool().ok_or_else(|| ImportError::InvalidField {
                    field: format!("{FIELD}.{name}"),
                    reason: format!("expected a bool, found {}", describe(value)),
                }),
            }
        };
        let threshold_matching = flag("enable_threshold_matching")?;
        if !flag("enable_normalization")? {
            notes.push(
                "anomalib's post-processor did not normalise scores: its min and max statistics are NaN, so patchflow's normalised scores are the raw scores, as in anomalib"
                    .into(),
            );
        }
        if !flag("enable_thresholding")? {
            notes.push(
                "anomalib's post-processor did not compute thresholds: they are NaN, so the threshold is the middle of the score range".into(),
            );
        }
        for (name, kind) in [
            ("image_sensitivity", "an image"),
            ("pixel_sensitivity", "a pixel"),
        ] {
            let field = format!("{FIELD}.{name}");
            let Some(value) = config.get(name).filter(|v| !v.is_none()) else {
                continue;
            };
            let sensitivity = value.as_f64().ok_or_else(|| ImportError::InvalidField {
                field: field.clone(),
                reason: format!("expected a number, found {}", describe(value)),
            })?;
            if sensitivity != 0.5 {
                notes.push(format!(
                    "{field} is {sensitivity}: anomalib marks {kind} anomalous when its normalised score exceeds {}, where patchflow's default threshold is 0.5; set that threshold (patchflowscore threshold=, patchflow predict --threshold) to match",
                    1.0 - sensitivity
                ));
            }
        }
        Ok(Self { threshold_matching })
    }

    /// Reads the post-processor buffers. A missing buffer counts as NaN, the value
    /// anomalib starts from. With threshold matching, a NaN threshold takes the other
    /// one's value, as anomalib's `image_threshold` and `pixel_threshold` properties do.
    fn score_stats(
        &self,
        key_map: &KeyMap,
        tensors: &HashMap<&str, &pth::Tensor>,
    ) -> Result<ScoreStats, ImportError> {
        let buffer = |name: &str| -> Result<f32, ImportError> {
            let Some(key) = key_map.post_processor.get(name) else {
                return Ok(f32::NAN);
            };
            let tensor = tensors[key.as_str()];
            let values = f32_values(key, tensor)?;
            match values.as_slice() {
                [value] => Ok(*value),
                _ => Err(ImportError::ShapeMismatch {
                    key: key.clone(),
                    expected: Vec::new(),
                    actual: tensor.shape.clone(),
                    config: "a scalar post-processor statistic".into(),
                }),
            }
        };
        let image_own = buffer("_image_threshold")?;
        let pixel_own = buffer("_pixel_threshold")?;
        let matched = |own: f32, other: f32| {
            if own.is_nan() && self.threshold_matching {
                other
            } else {
                own
            }
        };
        Ok(ScoreStats {
            image_threshold: matched(image_own, pixel_own),
            image_min: buffer("image_min")?,
            image_max: buffer("image_max")?,
            pixel_threshold: matched(pixel_own, image_own),
            pixel_min: buffer("pixel_min")?,
            pixel_max: buffer("pixel_max")?,
        })
    }
}

fn positive_int(value: &Value) -> Option<usize> {
    value
        .as_i64()
        .and_then(|n| usize::try_from(n).ok())
        .filter(|&n| n > 0)
}

fn size_pair(value: &Value) -> Option<[usize; 2]> {
    match value.as_sequence()? {
        [h, w] => Some([positive_int(h)?, positive_int(w)?]),
        _ => None,
    }
}

/// Describes a pickled value for error messages: its type, and the value when it is short.
fn describe(value: &Value) -> String {
    match value {
        Value::None => "None".into(),
        Value::Bool(flag) => format!("the bool {}", if *flag { "True" } else { "False" }),
        Value::Int(number) => format!("the int {number}"),
        Value::Float(number) => format!("the float {number}"),
        Value::Str(text) if text.len() <= 60 => format!("the str {text:?}"),
        Value::Tuple(items) | Value::List(items) if items.len() <= 4 => {
            let inner: Vec<String> = items.iter().map(describe).collect();
            format!("a {} of [{}]", value.type_name(), inner.join(", "))
        }
        other => format!("a {}", other.type_name()),
    }
}

// --- tensors ---------------------------------------------------------------------------

/// Assigns every state-dict key its model file name and detects the key layout.
///
/// Keys outside `model.` and `post_processor.` (metrics, for example) are skipped.
/// `w_perm_inv` and `num_batches_tracked` are left out. Any other key under `model.`
/// that is not part of the backbone, the adaptor or the flow is an error, so that a
/// model with parts this importer does not know is never imported without them.
pub fn map_state_dict_keys(keys: &[String], backbone: &str) -> Result<KeyMap, ImportError> {
    let layout = if keys.iter().any(|k| k.starts_with(TIMM_EXTRACTOR_PREFIX)) {
        KeyLayout::TimmExtractor
    } else if keys.iter().any(|k| k.starts_with(LEGACY_EXTRACTOR_PREFIX)) {
        KeyLayout::Legacy
    } else {
        return Err(ImportError::UnsupportedLayout(format!(
            "no backbone tensors: expected keys starting with {TIMM_EXTRACTOR_PREFIX} (anomalib 2.5.1 and later) or {LEGACY_EXTRACTOR_PREFIX} (anomalib 2.4 to 2.5.0){}",
            first_keys(keys)
        )));
    };
    if layout == KeyLayout::Legacy && backbone.contains("dinov2") {
        return Err(ImportError::LegacyDinov2 {
            backbone: backbone.to_owned(),
        });
    }

    let mut tensors = BTreeMap::new();
    let mut post_processor = BTreeMap::new();
    for key in keys {
        if let Some(name) = key.strip_prefix(POST_PROCESSOR_PREFIX) {
            post_processor.insert(name.to_owned(), key.clone());
            continue;
        }
        if !key.starts_with("model.") {
            continue;
        }
        if key.ends_with(".num_batches_tracked") || key.ends_with(".w_perm_inv") {
            continue;
        }
        let name = if let Some(timm_key) = key.strip_prefix(layout.backbone_prefix()) {
            format!("{}.{timm_key}", crate::model::BACKBONE_PREFIX)
        } else if let Some(rest) = key.strip_prefix(ADAPTOR_PREFIX) {
            format!("{}.{rest}", crate::model::ADAPTOR_PREFIX)
        } else if let Some(rest) = key.strip_prefix(FLOW_PREFIX) {
            format!("{}.{rest}", crate::model::FLOW_PREFIX)
        } else {
            return Err(ImportError::UnsupportedLayout(format!(
                "tensor {key} belongs to no part of Patchflow that patchflow knows ({} for the backbone, {ADAPTOR_PREFIX}, {FLOW_PREFIX}); the checkpoint is from another model or another anomalib version",
                layout.backbone_prefix()
            )));
        };
        tensors.insert(key.clone(), name);
    }
    Ok(KeyMap {
        layout,
        tensors,
        post_processor,
    })
}

fn first_keys(keys: &[String]) -> String {
    if keys.is_empty() {
        return "; the state_dict is empty".into();
    }
    let shown: Vec<&str> = keys.iter().take(3).map(String::as_str).collect();
    format!("; the state_dict starts with {}", shown.join(", "))
}

/// Checks every tensor the model needs against its expected shape and converts it.
///
/// Backbone tensors that the model does not read (such as a classifier head) are left
/// out with a note. Adaptor or flow tensors it does not read are an error, because they
/// mean the hyper_parameters describe another model than the weights.
fn model_tensors(
    config: &ModelConfig,
    key_map: &KeyMap,
    tensors: &HashMap<&str, &pth::Tensor>,
    notes: &mut Vec<String>,
) -> Result<HashMap<String, Tensor>, ImportError> {
    let expected: BTreeMap<String, Vec<usize>> = tensor_shapes(config)
        .map_err(unsupported_backbone)?
        .into_iter()
        .collect();
    let by_name: HashMap<&str, &str> = key_map
        .tensors
        .iter()
        .map(|(key, name)| (name.as_str(), key.as_str()))
        .collect();
    let summary = config_summary(config);

    let mut out = HashMap::with_capacity(expected.len());
    for (name, shape) in &expected {
        let Some(&key) = by_name.get(name.as_str()) else {
            return Err(ImportError::MissingTensor {
                key: checkpoint_key(name, key_map.layout),
            });
        };
        let tensor = tensors[key];
        if &tensor.shape != shape {
            return Err(ImportError::ShapeMismatch {
                key: key.to_owned(),
                expected: shape.clone(),
                actual: tensor.shape.clone(),
                config: summary,
            });
        }
        let values = f32_values(key, tensor)?;
        if values.iter().any(|v| !v.is_finite()) {
            return Err(ImportError::NonFinite {
                key: key.to_owned(),
            });
        }
        let value = Tensor::from_vec(values, shape.as_slice(), &Device::Cpu)
            .map_err(|e| ImportError::Model(e.into()))?;
        if name.ends_with(".w_perm") {
            permutation_from_matrix(key, &value).map_err(ImportError::Model)?;
        }
        out.insert(name.clone(), value);
    }

    let unused: Vec<&str> = key_map
        .tensors
        .iter()
        .filter(|(_, name)| !expected.contains_key(name.as_str()))
        .map(|(key, _)| key.as_str())
        .collect();
    let (backbone_unused, head_unused): (Vec<&str>, Vec<&str>) = unused
        .into_iter()
        .partition(|key| key.starts_with(key_map.layout.backbone_prefix()));
    if let Some(key) = head_unused.first() {
        return Err(ImportError::UnexpectedTensor {
            key: (*key).to_owned(),
            config: summary,
        });
    }
    if !backbone_unused.is_empty() {
        notes.push(format!(
            "{} backbone tensors that {} does not use are left out: {}",
            backbone_unused.len(),
            config.backbone,
            backbone_unused.join(", ")
        ));
    }
    Ok(out)
}

/// Returns the checkpoint key of a model file name, for messages about missing tensors.
fn checkpoint_key(name: &str, layout: KeyLayout) -> String {
    let backbone = format!("{}.", crate::model::BACKBONE_PREFIX);
    let adaptor = format!("{}.", crate::model::ADAPTOR_PREFIX);
    let flow = format!("{}.", crate::model::FLOW_PREFIX);
    if let Some(rest) = name.strip_prefix(&backbone) {
        format!("{}{rest}", layout.backbone_prefix())
    } else if let Some(rest) = name.strip_prefix(&adaptor) {
        format!("{ADAPTOR_PREFIX}{rest}")
    } else if let Some(rest) = name.strip_prefix(&flow) {
        format!("{FLOW_PREFIX}{rest}")
    } else {
        name.to_owned()
    }
}

fn config_summary(config: &ModelConfig) -> String {
    format!(
        "backbone {}, num_scales {}, flow_steps {}, flow_feature_dim {}, flow_hidden_dim {}",
        config.backbone,
        config.num_scales,
        config.flow_steps,
        config.flow_feature_dim,
        config.flow_hidden_dim
    )
}

/// Decodes a floating-point tensor to `f32`.
fn f32_values(key: &str, tensor: &pth::Tensor) -> Result<Vec<f32>, ImportError> {
    let dtype = match tensor.dtype {
        pickle::DType::F32 => return Ok(tensor.to_f32_vec().unwrap_or_default()),
        pickle::DType::F16 => DType::F16,
        pickle::DType::BF16 => DType::BF16,
        pickle::DType::F64 => DType::F64,
        other => {
            return Err(ImportError::Invalid(format!(
                "tensor {key} has element type {other:?}; expected a floating-point type"
            )));
        }
    };
    let converted = Tensor::from_raw_buffer(&tensor.data, dtype, &[tensor.numel()], &Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.to_vec1::<f32>());
    converted.map_err(|e| ImportError::Model(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(text: &str) -> Value {
        Value::Str(text.to_owned())
    }

    fn dict(entries: Vec<(&str, Value)>) -> Value {
        Value::Dict(entries.into_iter().map(|(k, v)| (s(k), v)).collect())
    }

    fn ints(values: &[i64]) -> Value {
        Value::List(values.iter().map(|&v| Value::Int(v)).collect())
    }

    fn floats(values: &[f64]) -> Value {
        Value::List(values.iter().map(|&v| Value::Float(v)).collect())
    }

    fn transform(steps: Vec<Value>) -> Value {
        dict(vec![(
            "transform",
            dict(vec![
                ("class_path", s("torchvision.transforms.v2.Compose")),
                ("init_args", dict(vec![("transforms", Value::List(steps))])),
            ]),
        )])
    }

    fn resize(size: Value, antialias: bool) -> Value {
        dict(vec![
            ("class_path", s("torchvision.transforms.v2.Resize")),
            (
                "init_args",
                dict(vec![
                    ("size", size),
                    ("interpolation", s("bilinear")),
                    ("max_size", Value::None),
                    ("antialias", Value::Bool(antialias)),
                ]),
            ),
        ])
    }

    fn normalize(mean: &[f64], std: &[f64]) -> Value {
        dict(vec![
            ("class_path", s("torchvision.transforms.v2.Normalize")),
            (
                "init_args",
                dict(vec![
                    ("mean", floats(mean)),
                    ("std", floats(std)),
                    ("inplace", Value::Bool(false)),
                ]),
            ),
        ])
    }

    fn root(hyper: Value, pre: Option<Value>) -> Value {
        let mut entries = vec![("hyper_parameters", hyper)];
        if let Some(pre) = pre {
            entries.push(("anomalib_pre_processor_config", pre));
        }
        dict(entries)
    }

    fn full_hyper() -> Value {
        dict(vec![
            ("backbone", s("tf_efficientnet_lite0")),
            ("pre_trained", Value::Bool(false)),
            ("flow_steps", Value::Int(2)),
            ("flow_feature_dim", Value::Int(64)),
            ("num_scales", Value::Int(2)),
            ("patch_size", Value::Int(5)),
            ("flow_hidden_dim", Value::Int(32)),
            ("crop_size", Value::Tuple(vec![Value::Int(56), Value::Int(48)])),
            ("lr", Value::Float(0.001)),
        ])
    }

    #[test]
    fn config_reads_every_field() {
        let pre = transform(vec![
            resize(ints(&[64, 80]), false),
            normalize(&[0.5, 0.5, 0.5], &[0.25, 0.5, 1.0]),
        ]);
        let mut notes = Vec::new();
        let config = model_config(&root(full_hyper(), Some(pre)), &mut notes).unwrap();
        assert!(notes.is_empty(), "{notes:?}");
        assert_eq!(config.backbone, "tf_efficientnet_lite0");
        assert_eq!(config.input_size, [64, 80]);
        assert_eq!(config.crop_size, Some([56, 48]));
        assert_eq!(config.flow_steps, 2);
        assert_eq!(config.flow_feature_dim, 64);
        assert_eq!(config.num_scales, 2);
        assert_eq!(config.patch_size, 5);
        assert_eq!(config.flow_hidden_dim, 32);
        assert_eq!(config.preprocess.resize, ResizeMode::Bilinear);
        assert_eq!(config.preprocess.mean, [0.5; 3]);
        assert_eq!(config.preprocess.std, [0.25, 0.5, 1.0]);
    }

    #[test]
    fn missing_fields_take_defaults_with_notes() {
        let mut notes = Vec::new();
        let config = model_config(&dict(vec![]), &mut notes).unwrap();
        assert_eq!(config.backbone, DEFAULT_BACKBONE);
        assert_eq!(config.input_size, [768, 768]);
        assert_eq!(config.crop_size, None);
        assert_eq!(config.preprocess, Preprocess::imagenet());
        assert_eq!(config.flow_steps, 1);
        assert_eq!(config.num_scales, 3);
        // One note for hyper_parameters and one for the pre-processor.
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[0].contains("hyper_parameters is missing"), "{notes:?}");
        assert!(notes[1].contains("768x768"), "{notes:?}");
    }

    #[test]
    fn one_missing_hyper_parameter_is_named() {
        let Value::Dict(mut entries) = full_hyper() else {
            unreachable!()
        };
        entries.retain(|(k, _)| k.as_str() != Some("patch_size"));
        let pre = transform(vec![resize(ints(&[64, 64]), true)]);
        let mut notes = Vec::new();
        let config = model_config(&root(Value::Dict(entries), Some(pre)), &mut notes).unwrap();
        assert_eq!(config.patch_size, 3);
        assert_eq!(
            notes,
            vec![
                "hyper_parameters.patch_size is missing: using anomalib 2.7.0's default 3"
                    .to_owned(),
                "anomalib_pre_processor_config has no Normalize step: pixel values stay in [0, 1] as in anomalib".to_owned(),
            ]
        );
        assert_eq!(config.preprocess.mean, [0.0; 3]);
        assert_eq!(config.preprocess.std, [1.0; 3]);
    }

    #[test]
    fn invalid_hyper_parameter_is_rejected() {
        let hyper = dict(vec![("flow_steps", Value::Int(0))]);
        let error = model_config(&root(hyper, None), &mut Vec::new()).unwrap_err();
        assert_eq!(
            error.to_string(),
            "hyper_parameters.flow_steps is invalid: expected a positive int, found the int 0; the checkpoint was not written by anomalib's Patchflow, or the value was edited"
        );
    }

    #[test]
    fn unsupported_transform_is_named() {
        let crop = dict(vec![
            ("class_path", s("torchvision.transforms.v2.CenterCrop")),
            ("init_args", dict(vec![("size", ints(&[56, 56]))])),
        ]);
        let pre = transform(vec![resize(ints(&[64, 64]), true), crop]);
        let error = model_config(&root(full_hyper(), Some(pre)), &mut Vec::new()).unwrap_err();
        assert!(
            error.to_string().contains("transform CenterCrop is not supported"),
            "{error}"
        );
    }

    #[test]
    fn square_int_resize_is_rejected() {
        let pre = transform(vec![resize(Value::Int(64), true)]);
        let error = model_config(&root(full_hyper(), Some(pre)), &mut Vec::new()).unwrap_err();
        assert!(error.to_string().contains("a single int keeps the aspect ratio"), "{error}");
    }

    #[test]
    fn dinov2_crop_is_aligned() {
        let hyper = dict(vec![
            ("backbone", s("vit_base_patch14_dinov2")),
            ("crop_size", Value::None),
        ]);
        let mut notes = Vec::new();
        // Whether DINOv2 is a supported backbone does not matter for the configuration.
        let config = model_config(&root(hyper, None), &mut notes).unwrap();
        assert_eq!(config.crop_size, Some([756, 756]));
        assert!(notes.iter().any(|n| n.contains("756x756")), "{notes:?}");
    }

    fn keys(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn timm_extractor_layout_maps_keys() {
        let map = map_state_dict_keys(
            &keys(&[
                "post_processor._image_threshold",
                "model.feature_extractor.feature_extractor.conv_stem.weight",
                "model.feature_extractor.feature_extractor.bn1.num_batches_tracked",
                "model.feature_adaptor.weight",
                "model.flow.module_list.0.w_perm",
                "model.flow.module_list.0.w_perm_inv",
                "evaluator.some_metric",
            ]),
            "tf_efficientnet_lite0",
        )
        .unwrap();
        assert_eq!(map.layout, KeyLayout::TimmExtractor);
        let expected: BTreeMap<String, String> = [
            (
                "model.feature_extractor.feature_extractor.conv_stem.weight",
                "backbone.conv_stem.weight",
            ),
            ("model.feature_adaptor.weight", "feature_adaptor.weight"),
            (
                "model.flow.module_list.0.w_perm",
                "flow.module_list.0.w_perm",
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(map.tensors, expected);
        assert_eq!(
            map.post_processor.get("_image_threshold").map(String::as_str),
            Some("post_processor._image_threshold")
        );
    }

    #[test]
    fn legacy_layout_maps_keys() {
        let map = map_state_dict_keys(
            &keys(&[
                "model.feature_extractor.blocks.0.0.conv_dw.weight",
                "model.flow.module_list.0.global_scale",
            ]),
            "tf_efficientnet_b5",
        )
        .unwrap();
        assert_eq!(map.layout, KeyLayout::Legacy);
        assert_eq!(
            map.tensors["model.feature_extractor.blocks.0.0.conv_dw.weight"],
            "backbone.blocks.0.0.conv_dw.weight"
        );
    }

    #[test]
    fn timm_dinov2_keys_pass_through() {
        let map = map_state_dict_keys(
            &keys(&[
                "model.feature_extractor.feature_extractor.pos_embed",
                "model.feature_extractor.feature_extractor.blocks.11.ls2.gamma",
            ]),
            "vit_base_patch14_dinov2",
        )
        .unwrap();
        assert_eq!(
            map.tensors["model.feature_extractor.feature_extractor.blocks.11.ls2.gamma"],
            "backbone.blocks.11.ls2.gamma"
        );
    }

    #[test]
    fn legacy_dinov2_is_rejected() {
        let error = map_state_dict_keys(
            &keys(&["model.feature_extractor.encoder.blocks.0.attn.qkv.weight"]),
            "vit_base_patch14_dinov2",
        )
        .unwrap_err();
        assert!(matches!(error, ImportError::LegacyDinov2 { .. }), "{error}");
        assert!(error.to_string().contains("anomalib 2.5.1 or later"), "{error}");
    }

    #[test]
    fn unknown_model_key_is_rejected() {
        let error = map_state_dict_keys(
            &keys(&[
                "model.feature_extractor.feature_extractor.conv_stem.weight",
                "model.extra_head.weight",
            ]),
            "tf_efficientnet_lite0",
        )
        .unwrap_err();
        assert!(
            error.to_string().contains("tensor model.extra_head.weight"),
            "{error}"
        );
    }

    #[test]
    fn missing_backbone_is_unsupported_layout() {
        let error = map_state_dict_keys(
            &keys(&["backbone.conv_stem.weight"]),
            "tf_efficientnet_lite0",
        )
        .unwrap_err();
        assert!(matches!(error, ImportError::UnsupportedLayout(_)), "{error}");
        assert!(
            error.to_string().contains("starts with backbone.conv_stem.weight"),
            "{error}"
        );
    }

    fn scalar(value: f32) -> pth::Tensor {
        pth::Tensor {
            dtype: pickle::DType::F32,
            shape: Vec::new(),
            data: value.to_le_bytes().to_vec(),
        }
    }

    #[test]
    fn threshold_matching_fills_nan_threshold() {
        let names = [
            ("_image_threshold", f32::NAN),
            ("_pixel_threshold", -0.5),
            ("image_min", -0.9),
            ("image_max", -0.1),
        ];
        let owned: Vec<(String, pth::Tensor)> = names
            .iter()
            .map(|(n, v)| (format!("post_processor.{n}"), scalar(*v)))
            .collect();
        let tensors: HashMap<&str, &pth::Tensor> =
            owned.iter().map(|(k, t)| (k.as_str(), t)).collect();
        let mut all_keys: Vec<String> = owned.iter().map(|(k, _)| k.clone()).collect();
        all_keys.push("model.feature_extractor.feature_extractor.conv_stem.weight".into());
        let key_map = map_state_dict_keys(&all_keys, "tf_efficientnet_lite0").unwrap();

        let matching = PostProcessorConfig {
            threshold_matching: true,
        };
        let stats = matching.score_stats(&key_map, &tensors).unwrap();
        assert_eq!(stats.image_threshold, -0.5);
        assert_eq!(stats.pixel_threshold, -0.5);
        assert_eq!(stats.image_min, -0.9);
        assert!(stats.pixel_min.is_nan());
        assert!(stats.pixel_max.is_nan());

        let separate = PostProcessorConfig {
            threshold_matching: false,
        };
        let stats = separate.score_stats(&key_map, &tensors).unwrap();
        assert!(stats.image_threshold.is_nan());
        assert_eq!(stats.pixel_threshold, -0.5);
    }
}
