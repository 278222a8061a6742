// SPDX-License-Identifier: MIT OR Apache-2.0
//! State-dict keys of an anomalib checkpoint: the two key layouts, their mapping to
//! model file names, and the checks of every tensor the model needs.

use std::collections::{BTreeMap, HashMap, HashSet};

use candle_core::{DType, Device, Tensor};

use crate::model::ModelConfig;
use crate::model::flow::permutation_from_matrix;
use crate::model::synthetic::tensor_shapes;
use crate::pickle;
use crate::pth;

use super::{ImportError, unsupported_backbone};

/// State-dict prefix of the backbone in anomalib 2.5.1 and later, where `Patchflow`
/// wraps the timm model in a `TimmFeatureExtractor`.
pub const TIMM_EXTRACTOR_PREFIX: &str = "model.feature_extractor.feature_extractor.";

/// State-dict prefix of the backbone in anomalib 2.4.0 to 2.5.0.
pub const LEGACY_EXTRACTOR_PREFIX: &str = "model.feature_extractor.";

const ADAPTOR_PREFIX: &str = "model.feature_adaptor.";
const FLOW_PREFIX: &str = "model.flow.";
const POST_PROCESSOR_PREFIX: &str = "post_processor.";

/// Naming scheme of the state-dict keys, by the anomalib versions that wrote it.
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
    let first: Vec<&str> = keys.iter().take(3).map(String::as_str).collect();
    format!("; the state_dict starts with {}", first.join(", "))
}

/// Checks every tensor the model needs against its expected shape and converts it.
///
/// Backbone tensors that the model does not read (such as a classifier head) are left
/// out with a note. Adaptor or flow tensors it does not read are an error, because they
/// mean the hyper_parameters describe another model than the weights.
pub(super) fn model_tensors(
    config: &ModelConfig,
    key_map: &KeyMap,
    tensors: &HashMap<&str, &pth::Tensor>,
    notes: &mut Vec<String>,
) -> Result<HashMap<String, Tensor>, ImportError> {
    // In the order the model reads them, so that the first problem reported is the
    // first tensor that shows it.
    let expected = tensor_shapes(config).map_err(unsupported_backbone)?;
    let expected_names: HashSet<&str> = expected.iter().map(|(name, _)| name.as_str()).collect();
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
        .filter(|(_, name)| !expected_names.contains(name.as_str()))
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
pub(super) fn f32_values(key: &str, tensor: &pth::Tensor) -> Result<Vec<f32>, ImportError> {
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
            map.post_processor
                .get("_image_threshold")
                .map(String::as_str),
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
        assert!(
            error.to_string().contains("anomalib 2.5.1 or later"),
            "{error}"
        );
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
        assert!(
            matches!(error, ImportError::UnsupportedLayout(_)),
            "{error}"
        );
        assert!(
            error
                .to_string()
                .contains("starts with backbone.conv_stem.weight"),
            "{error}"
        );
    }
}
