// SPDX-License-Identifier: MIT OR Apache-2.0
//! The model configuration and score statistics of an anomalib checkpoint:
//! `hyper_parameters`, `anomalib_pre_processor_config`, `anomalib_post_processor_config`
//! and the post-processor buffers.

use std::collections::HashMap;

use crate::imageops::ResizeMode;
use crate::model::{ModelConfig, Preprocess};
use crate::pickle::Value;
use crate::pth;
use crate::scoring::ScoreStats;

use super::ImportError;
use super::keys::{KeyMap, f32_values};

/// anomalib 2.7.0's `Patchflow` defaults for the hyper-parameters that shape the model.
pub const DEFAULT_BACKBONE: &str = "tf_efficientnet_b5";
const DEFAULT_FLOW_STEPS: usize = 1;
const DEFAULT_FLOW_FEATURE_DIM: usize = 128;
const DEFAULT_NUM_SCALES: usize = 3;
const DEFAULT_PATCH_SIZE: usize = 3;
const DEFAULT_FLOW_HIDDEN_DIM: usize = 128;
/// anomalib 2.7.0's `Patchflow.configure_pre_processor` resize target.
const DEFAULT_INPUT_SIZE: [usize; 2] = [768, 768];

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
        None => &empty,
    };
    // (field, default) of each missing hyper-parameter, for the notes.
    let mut defaulted: Vec<(&str, String)> = Vec::new();
    let mut backbone = match hyper.get("backbone") {
        Some(value) => value
            .as_str()
            .ok_or_else(|| ImportError::InvalidField {
                field: "hyper_parameters.backbone".into(),
                reason: format!("expected a str, found a {}", value.type_name()),
            })?
            .to_owned(),
        None => {
            defaulted.push(("backbone", DEFAULT_BACKBONE.to_owned()));
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

    let mut count = |name: &'static str, default: usize| -> Result<usize, ImportError> {
        let field = format!("hyper_parameters.{name}");
        match hyper.get(name) {
            Some(value) => positive_int(value).ok_or_else(|| ImportError::InvalidField {
                field,
                reason: format!("expected a positive int, found {}", describe(value)),
            }),
            None => {
                defaulted.push((name, default.to_string()));
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
            defaulted.push(("crop_size", "None (no crop)".to_owned()));
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

    if root.get("hyper_parameters").is_none() {
        let list: Vec<String> = defaulted.iter().map(|(f, v)| format!("{f} {v}")).collect();
        notes.push(format!(
            "hyper_parameters is missing: using anomalib 2.7.0's defaults {}",
            list.join(", ")
        ));
    } else {
        for (field, value) in &defaulted {
            notes.push(format!(
                "hyper_parameters.{field} is missing: using anomalib 2.7.0's default {value}"
            ));
        }
    }

    let (input_size, preprocess) = pre_processor(root, notes)?;
    let config = ModelConfig {
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
    config
        .validate()
        .map_err(|reason| ImportError::InvalidField {
            field: "hyper_parameters".into(),
            reason,
        })?;
    Ok(config)
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
        let numbers: Option<Vec<f32>> =
            items.iter().map(|v| v.as_f64().map(|x| x as f32)).collect();
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
pub(super) struct PostProcessorConfig {
    threshold_matching: bool,
}

impl PostProcessorConfig {
    pub(super) fn read(root: &Value, notes: &mut Vec<String>) -> Result<Self, ImportError> {
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
    pub(super) fn score_stats(
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
            // anomalib thresholds raw scores only. The log-domain threshold then follows
            // from the raw one (see `ScoreStats::threshold`).
            image_log_threshold: None,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::keys::map_state_dict_keys;
    use crate::pickle;

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
            (
                "crop_size",
                Value::Tuple(vec![Value::Int(56), Value::Int(48)]),
            ),
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
        assert!(
            notes[0].starts_with("hyper_parameters is missing: using anomalib 2.7.0's defaults backbone tf_efficientnet_b5, flow_steps 1,"),
            "{notes:?}"
        );
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
            error
                .to_string()
                .contains("transform CenterCrop is not supported"),
            "{error}"
        );
    }

    #[test]
    fn square_int_resize_is_rejected() {
        let pre = transform(vec![resize(Value::Int(64), true)]);
        let error = model_config(&root(full_hyper(), Some(pre)), &mut Vec::new()).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("a single int keeps the aspect ratio"),
            "{error}"
        );
    }

    #[test]
    fn dinov2_crop_stays_as_saved() {
        let hyper = dict(vec![
            ("backbone", s("vit_small_patch14_dinov2")),
            ("crop_size", Value::None),
        ]);
        let mut notes = Vec::new();
        let config = model_config(&root(hyper, None), &mut notes).unwrap();
        assert_eq!(config.crop_size, None);
        // The model floors the 768x768 input to 756x756 for the 14-pixel patches, as
        // anomalib does.
        assert_eq!(config.internal_size(), [756, 756]);
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
