// SPDX-License-Identifier: MIT OR Apache-2.0
//! Named tensors with shape checks, and the errors that loading a model can raise.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

/// Errors raised while reading or building a model. Messages name the file, tensor or
/// field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read model file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "model file {path} is not a valid safetensors file ({reason}); it may be truncated or corrupt: re-create it with `patchflow train`"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "model file {path} is a zip archive, such as an anomalib (Lightning) .ckpt or a PyTorch .pth, not a patchflow model file: convert an anomalib checkpoint with `patchflow import {path} --output model.safetensors`"
    )]
    ZipArchive { path: PathBuf },
    #[error("tensor {name} is missing from the weights")]
    MissingTensor { name: String },
    #[error("tensor {name} has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("metadata field {field} is missing from the model file")]
    MissingField { field: String },
    #[error("metadata field {field} is invalid: {reason}")]
    InvalidField { field: String, reason: String },
    #[error(
        "model file format version {found} is not supported (this build reads version {supported}); re-create the file with this version of patchflow"
    )]
    UnsupportedVersion { found: String, supported: String },
    #[error("unknown backbone {name:?}; supported: {supported}")]
    UnknownBackbone { name: String, supported: String },
    #[error("invalid model configuration: {0}")]
    InvalidConfig(String),
    #[error(
        "tensor {name} contains NaN or infinite values; the model file is damaged or its training diverged: re-create it with `patchflow train`"
    )]
    NonFinite { name: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// A set of named tensors read from one file, viewed under a key prefix.
#[derive(Debug, Clone)]
pub struct Weights {
    tensors: Arc<HashMap<String, Tensor>>,
    prefix: String,
}

impl Weights {
    /// Moves every tensor to `device`, converting floating-point tensors to `dtype`
    /// (integer tensors are kept as they are).
    pub fn new(
        tensors: HashMap<String, Tensor>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, ModelError> {
        let mut moved = HashMap::with_capacity(tensors.len());
        for (name, t) in tensors {
            let t = if t.dtype().is_float() {
                t.to_dtype(dtype)?
            } else {
                t
            };
            moved.insert(name, t.to_device(device)?);
        }
        Ok(Self {
            tensors: Arc::new(moved),
            prefix: String::new(),
        })
    }

    /// Returns a view whose names are prefixed with `name.`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        Self {
            tensors: self.tensors.clone(),
            prefix,
        }
    }

    /// Returns the full tensor name of `name` under this view.
    pub fn full_name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// Tells whether a tensor exists under this view.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(&self.full_name(name))
    }

    /// Fetches a tensor and checks its shape.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        let full = self.full_name(name);
        let t = self
            .tensors
            .get(&full)
            .ok_or_else(|| ModelError::MissingTensor { name: full.clone() })?;
        if t.dims() != shape {
            return Err(ModelError::ShapeMismatch {
                name: full,
                expected: shape.to_vec(),
                actual: t.dims().to_vec(),
            });
        }
        Ok(t.clone())
    }

    /// Fetches the four BatchNorm tensors `weight`, `bias`, `running_mean`, `running_var`.
    pub fn batch_norm(
        &self,
        channels: usize,
        eps: f64,
    ) -> Result<super::ops::BatchNormParams, ModelError> {
        Ok(super::ops::BatchNormParams {
            weight: self.get("weight", &[channels])?,
            bias: self.get("bias", &[channels])?,
            running_mean: self.get("running_mean", &[channels])?,
            running_var: self.get("running_var", &[channels])?,
            eps,
        })
    }

    /// Fails on the first floating-point tensor (in name order) that contains a NaN or an
    /// infinity: such weights make every score NaN, which would read as "normal".
    pub fn check_finite(&self) -> Result<(), ModelError> {
        let mut names: Vec<&String> = self.tensors.keys().collect();
        names.sort();
        for name in names {
            let t = &self.tensors[name];
            if !t.dtype().is_float() {
                continue;
            }
            let values = t
                .flatten_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_vec1::<f64>()?;
            if values.iter().any(|v| !v.is_finite()) {
                return Err(ModelError::NonFinite { name: name.clone() });
            }
        }
        Ok(())
    }

    /// Lists the full tensor names that start with this view's prefix.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .tensors
            .keys()
            .filter(|k| self.prefix.is_empty() || k.starts_with(&format!("{}.", self.prefix)))
            .cloned()
            .collect();
        names.sort();
        names
    }

    /// Returns the tensor map behind every view.
    pub fn tensors(&self) -> &HashMap<String, Tensor> {
        &self.tensors
    }
}
