// SPDX-License-Identifier: MIT OR Apache-2.0
//! The model file: one safetensors file with every tensor (backbone, adaptor, flow) and
//! metadata fields that carry the configuration, pre-processing, backbone identity and
//! score statistics.
//!
//! Metadata fields (all strings, JSON where structured):
//! - `patchflow.format_version`: [`FORMAT_VERSION`];
//! - `patchflow.config`: [`ModelConfig`];
//! - `patchflow.backbone`: [`BackboneSource`];
//! - `patchflow.stats`: [`ScoreStats`];
//! - `patchflow.training`: [`TrainingInfo`], absent for imported models.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::model::{ModelConfig, ModelError, PatchFlow, Weights};
use crate::scoring::ScoreStats;

/// Version of the layout below; files with another version are rejected.
pub const FORMAT_VERSION: &str = "1";

const KEY_VERSION: &str = "patchflow.format_version";
const KEY_CONFIG: &str = "patchflow.config";
const KEY_BACKBONE: &str = "patchflow.backbone";
const KEY_STATS: &str = "patchflow.stats";
const KEY_TRAINING: &str = "patchflow.training";

/// Origin of the backbone weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackboneSource {
    /// timm model name.
    pub name: String,
    /// Package or file the weights were taken from.
    pub source: String,
    /// sha256 of that file, hex.
    pub sha256: String,
}

/// Training settings and results of a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingInfo {
    pub train_images: usize,
    pub holdout_images: usize,
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub final_loss: f32,
    pub seconds: f64,
    pub seed: u64,
}

/// Everything in a model file besides the tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelMeta {
    pub config: ModelConfig,
    pub backbone: BackboneSource,
    pub stats: ScoreStats,
    pub training: Option<TrainingInfo>,
}

/// Writes the model and its metadata to `path`. The file is written next to its final
/// name and renamed, so an interrupted save never leaves a half-written model behind.
pub fn save(path: &Path, model: &PatchFlow, meta: &ModelMeta) -> anyhow::Result<()> {
    use anyhow::Context;
    let mut info = HashMap::new();
    info.insert(KEY_VERSION.to_string(), FORMAT_VERSION.to_string());
    info.insert(KEY_CONFIG.to_string(), serde_json::to_string(&meta.config)?);
    info.insert(
        KEY_BACKBONE.to_string(),
        serde_json::to_string(&meta.backbone)?,
    );
    info.insert(KEY_STATS.to_string(), serde_json::to_string(&meta.stats)?);
    if let Some(training) = &meta.training {
        info.insert(KEY_TRAINING.to_string(), serde_json::to_string(training)?);
    }
    let tensors = model
        .tensors()
        .into_iter()
        .map(|(name, t)| Ok((name, t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)))
        .collect::<candle_core::Result<Vec<(String, Tensor)>>>()?;
    let tmp = path.with_extension("safetensors.partial");
    safetensors::serialize_to_file(tensors, Some(info), &tmp)
        .with_context(|| format!("cannot write model file {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// Reads a model file and builds the model on `device`.
pub fn load(path: &Path, device: &Device) -> Result<(PatchFlow, ModelMeta), ModelError> {
    let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let corrupt = |reason: String| ModelError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let header = read_header(path, &bytes)?;
    let fields = header.metadata().clone().unwrap_or_default();
    let meta = parse_meta(&fields)?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| corrupt(e.to_string()))?;
    let weights = Weights::new(tensors, device, DType::F32)?;
    weights.check_finite()?;
    let model = PatchFlow::new(&meta.config, &weights)?;
    Ok((model, meta))
}

fn field<'a>(fields: &'a HashMap<String, String>, key: &str) -> Result<&'a str, ModelError> {
    fields
        .get(key)
        .map(String::as_str)
        .ok_or_else(|| ModelError::MissingField {
            field: key.to_string(),
        })
}

fn json_field<T: serde::de::DeserializeOwned>(
    fields: &HashMap<String, String>,
    key: &str,
) -> Result<T, ModelError> {
    serde_json::from_str(field(fields, key)?).map_err(|e| ModelError::InvalidField {
        field: key.to_string(),
        reason: e.to_string(),
    })
}

fn parse_meta(fields: &HashMap<String, String>) -> Result<ModelMeta, ModelError> {
    let version = field(fields, KEY_VERSION)?;
    if version != FORMAT_VERSION {
        return Err(ModelError::UnsupportedVersion {
            found: version.to_string(),
            supported: FORMAT_VERSION.to_string(),
        });
    }
    let training = match fields.get(KEY_TRAINING) {
        Some(_) => Some(json_field(fields, KEY_TRAINING)?),
        None => None,
    };
    Ok(ModelMeta {
        config: json_field(fields, KEY_CONFIG)?,
        backbone: json_field(fields, KEY_BACKBONE)?,
        stats: json_field(fields, KEY_STATS)?,
        training,
    })
}

/// Reads only the metadata of a model file, without building the model.
pub fn read_meta(path: &Path) -> Result<ModelMeta, ModelError> {
    let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let header = read_header(path, &bytes)?;
    parse_meta(&header.metadata().clone().unwrap_or_default())
}

/// Reads the safetensors header of a model file, telling a zip archive (a Lightning
/// checkpoint or a PyTorch file) apart from a damaged model.
fn read_header(path: &Path, bytes: &[u8]) -> Result<safetensors::tensor::Metadata, ModelError> {
    if bytes.starts_with(b"PK\x03\x04") {
        return Err(ModelError::ZipArchive {
            path: path.to_path_buf(),
        });
    }
    safetensors::SafeTensors::read_metadata(bytes)
        .map(|(_, header)| header)
        .map_err(|e| ModelError::Corrupt {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}
