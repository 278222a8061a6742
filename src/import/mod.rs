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

mod config;
mod keys;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

use crate::checkpoint::{BackboneSource, ModelMeta};
use crate::model::{ModelError, PatchFlow, Weights};
use crate::pickle::{PickleError, Value};
use crate::pth::{self, Checkpoint, PthError};

use config::PostProcessorConfig;
use keys::model_tensors;

pub use config::{DEFAULT_BACKBONE, model_config};
pub use keys::{
    KeyLayout, KeyMap, LEGACY_EXTRACTOR_PREFIX, TIMM_EXTRACTOR_PREFIX, map_state_dict_keys,
};

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
    #[error("the checkpoint is damaged or truncated ({0}); copy or download the .ckpt file again")]
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
    #[error("tensor {key} contains NaN or infinite values; the training that produced it diverged")]
    NonFinite { key: String },
    #[error("the weights do not form a valid model: {0}")]
    Model(ModelError),
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
        // The legacy reader's detail (which pickle opcode failed) adds nothing useful
        // about a file that is no checkpoint at all.
        PthError::NotACheckpoint(reason) if reason.starts_with("neither a zip archive") => {
            ImportError::NotACheckpoint("neither a zip archive nor a legacy torch file".into())
        }
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
