// SPDX-License-Identifier: MIT OR Apache-2.0
//! PyTorch checkpoint (`.pth`, `.pt`, `.ckpt`) reading without torch.
//!
//! `torch.save` writes one of two layouts, and [`Checkpoint`] reads both:
//!
//! - Zip (torch 1.6 and later, and Lightning `.ckpt` files): `<archive>/data.pkl` contains
//!   the pickled object and `<archive>/data/<key>` the raw bytes of each storage.
//! - Legacy (before 1.6): five pickles in a row (the magic number
//!   `0x1950a86a20f9469cfc6c`, the protocol version 1001, a system-info dict, the object,
//!   and the list of storage keys), then each storage in key-list order as a
//!   little-endian `i64` element count followed by the raw bytes.
//!
//! The pickles go through [`crate::pickle`], which runs no Python code and accepts only
//! allow-listed globals. Tensors are copied out honouring their size, stride and
//! offset, because saved tensors are often permuted views of their storage.

use std::collections::HashMap;
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};

use crate::pickle::{self, AllowList, DType, PickleError, TensorRef, Value};

/// The integer that the first pickle of a legacy checkpoint holds.
pub const LEGACY_MAGIC_NUMBER: i128 = 0x1950a86a20f9469cfc6c;

/// The protocol version that the second pickle of a legacy checkpoint holds.
pub const LEGACY_PROTOCOL_VERSION: i64 = 1001;

/// Error from reading a torch checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum PthError {
    /// The file could not be read.
    #[error("failed to read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is neither a zip nor a legacy torch checkpoint.
    #[error("not a torch checkpoint: {0}")]
    NotACheckpoint(String),
    /// A torch checkpoint variant that this reader does not handle.
    #[error("unsupported torch checkpoint: {0}")]
    Unsupported(String),
    /// One of the pickles in the file is invalid or uses a global that is not allowed.
    #[error("{part}: {source}")]
    Pickle {
        /// Name of the pickle, e.g. `data.pkl` or `legacy storage key list`.
        part: &'static str,
        /// The cause.
        source: PickleError,
    },
    /// The zip archive is invalid.
    #[error("invalid zip archive: {0}")]
    Zip(#[from] zip::result::ZipError),
    /// A storage is missing or does not match its description in the pickle.
    #[error("storage {key}: {message}")]
    Storage {
        /// Storage key.
        key: String,
        /// Description of the problem.
        message: String,
    },
    /// A tensor does not fit its storage or cannot be copied out.
    #[error("tensor {name}: {message}")]
    Tensor {
        /// Tensor name, e.g. its state dict key.
        name: String,
        /// Description of the problem.
        message: String,
    },
    /// A value has another type than the caller expected.
    #[error("{what}: expected {expected}, found {found}")]
    UnexpectedValue {
        /// The value, e.g. `checkpoint root`.
        what: String,
        /// The expected Python type.
        expected: &'static str,
        /// The Python type found.
        found: &'static str,
    },
}

type Result<T, E = PthError> = std::result::Result<T, E>;

/// The layout of a torch checkpoint file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Zip archive, written by torch 1.6 and later.
    Zip,
    /// Concatenated pickles and raw storages, written before torch 1.6.
    Legacy,
}

/// A tensor copied out of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tensor {
    /// Element type.
    pub dtype: DType,
    /// Size of each dimension, empty for a scalar.
    pub shape: Vec<usize>,
    /// Elements in row-major (C-contiguous) order, little-endian.
    pub data: Vec<u8>,
}

impl Tensor {
    /// Returns the number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Decodes the elements of a [`DType::F32`] tensor, or returns `None` for other types.
    pub fn to_f32_vec(&self) -> Option<Vec<f32>> {
        if self.dtype != DType::F32 {
            return None;
        }
        let values = self
            .data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Some(values)
    }
}

#[derive(Debug)]
struct Storage {
    dtype: DType,
    bytes: Vec<u8>,
}

/// A loaded torch checkpoint: the unpickled object and the bytes of every storage it uses.
#[derive(Debug)]
pub struct Checkpoint {
    root: Value,
    storages: HashMap<String, Storage>,
    layout: Layout,
}

impl Checkpoint {
    /// Reads a checkpoint file, accepting only the globals that torch checkpoints need.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, &AllowList::default())
    }

    /// Reads a checkpoint file, also accepting the extra classes on `allow`.
    pub fn open_with(path: &Path, allow: &AllowList) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| PthError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_bytes_with(&bytes, allow)
    }

    /// Reads a checkpoint from memory, accepting only the globals that torch checkpoints need.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        Self::from_bytes_with(bytes, &AllowList::default())
    }

    /// Reads a checkpoint from memory, also accepting the extra classes on `allow`.
    pub fn from_bytes_with(bytes: &[u8], allow: &AllowList) -> Result<Self> {
        if bytes.starts_with(b"PK") {
            read_zip(bytes, allow)
        } else if bytes.get(257..262) == Some(b"ustar") {
            Err(PthError::Unsupported(
                "tar archives from torch before 0.1.10 are not supported".into(),
            ))
        } else {
            read_legacy(bytes, allow)
        }
    }

    /// Returns the unpickled object, usually a state dict or a dict that contains one.
    pub fn root(&self) -> &Value {
        &self.root
    }

    /// Returns the layout the file was written in.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Looks up a value by a path of `str` dict keys from the root, e.g.
    /// `["hyper_parameters", "backbone"]`.
    pub fn value(&self, path: &[&str]) -> Option<&Value> {
        path.iter()
            .try_fold(&self.root, |value, key| value.get(key))
    }

    /// Returns the tensors of the state dict: the root dict, or `root["state_dict"]` when
    /// the root has that key (as Lightning checkpoints do).
    pub fn state_dict(&self) -> Result<Vec<(String, Tensor)>> {
        match self.root.get("state_dict") {
            Some(inner) => self.tensors_in(inner, "state_dict"),
            None => self.tensors_in(&self.root, "checkpoint root"),
        }
    }

    /// Copies out the tensors of a dict with `str` keys, in dict order. Entries whose key
    /// is no `str` or whose value is no tensor are skipped.
    pub fn tensors_in(&self, dict: &Value, what: &str) -> Result<Vec<(String, Tensor)>> {
        let entries = dict.as_dict().ok_or_else(|| PthError::UnexpectedValue {
            what: what.to_owned(),
            expected: "dict",
            found: dict.type_name(),
        })?;
        let mut tensors = Vec::new();
        for (key, value) in entries {
            if let (Some(name), Some(tensor)) = (key.as_str(), value.as_tensor()) {
                tensors.push((name.to_owned(), self.tensor(name, tensor)?));
            }
        }
        Ok(tensors)
    }

    /// Copies a tensor out of its storage into row-major order. `name` identifies the
    /// tensor in errors.
    pub fn tensor(&self, name: &str, tensor: &TensorRef) -> Result<Tensor> {
        let error = |message: String| PthError::Tensor {
            name: name.to_owned(),
            message,
        };
        let key = &tensor.storage.key;
        let storage = self
            .storages
            .get(key)
            .ok_or_else(|| error(format!("storage {key} is missing")))?;
        if storage.dtype != tensor.storage.dtype {
            return Err(error(format!(
                "storage {key} holds {:?}, not {:?}",
                storage.dtype, tensor.storage.dtype
            )));
        }
        let element_size = storage.dtype.size_in_bytes();
        let (window_start, window_len) = tensor.storage.window();
        let window = window_start
            .checked_mul(element_size)
            .zip(window_start.checked_add(window_len))
            .and_then(|(start, end)| Some(start..end.checked_mul(element_size)?))
            .and_then(|range| storage.bytes.get(range))
            .ok_or_else(|| error(format!("the view of storage {key} exceeds its size")))?;
        let data = copy_elements(window, element_size, tensor).map_err(error)?;
        Ok(Tensor {
            dtype: storage.dtype,
            shape: tensor.shape.clone(),
            data,
        })
    }
}

/// Copies the elements of `tensor` out of `window`, the part of its storage it views.
fn copy_elements(
    window: &[u8],
    element_size: usize,
    tensor: &TensorRef,
) -> std::result::Result<Vec<u8>, String> {
    let numel = tensor
        .shape
        .iter()
        .try_fold(1usize, |count, &dim| count.checked_mul(dim))
        .ok_or("the element count overflows")?;
    if numel == 0 {
        return Ok(Vec::new());
    }

    let mut last = tensor.storage_offset;
    for (&dim, &step) in tensor.shape.iter().zip(&tensor.stride) {
        last = (dim - 1)
            .checked_mul(step)
            .and_then(|extent| last.checked_add(extent))
            .ok_or("the element offsets overflow")?;
    }
    let window_numel = window.len() / element_size;
    if last >= window_numel {
        return Err(format!(
            "size {:?}, stride {:?} and offset {} reach element {last}, but the storage has {window_numel}",
            tensor.shape, tensor.stride, tensor.storage_offset
        ));
    }

    let byte_len = numel * element_size;
    let mut data = Vec::new();
    // A stride of 0 lets a small storage describe a huge tensor, so allocation may fail.
    data.try_reserve_exact(byte_len)
        .map_err(|_| format!("cannot allocate {byte_len} bytes"))?;
    // `last < window_numel` bounds every element index below, so no slice can be out of range.
    if is_contiguous(&tensor.shape, &tensor.stride) {
        let start = tensor.storage_offset * element_size;
        data.extend_from_slice(&window[start..start + byte_len]);
    } else {
        copy_strided(window, element_size, tensor, &mut data);
    }
    Ok(data)
}

fn is_contiguous(shape: &[usize], stride: &[usize]) -> bool {
    let mut expected = 1;
    for (&dim, &step) in shape.iter().zip(stride).rev() {
        // The stride of a dimension of size 1 never moves, so it may be anything.
        if dim != 1 && step != expected {
            return false;
        }
        expected *= dim;
    }
    true
}

/// Gathers the elements of a non-contiguous, non-empty tensor of rank 1 or more.
fn copy_strided(window: &[u8], element_size: usize, tensor: &TensorRef, out: &mut Vec<u8>) {
    let shape = &tensor.shape;
    let stride = &tensor.stride;
    let rank = shape.len();
    let (row_len, row_step) = (shape[rank - 1], stride[rank - 1]);
    let mut index = vec![0usize; rank - 1];
    let mut row_start = tensor.storage_offset;
    loop {
        for i in 0..row_len {
            let start = (row_start + i * row_step) * element_size;
            out.extend_from_slice(&window[start..start + element_size]);
        }
        // Advance the index of the outer dimensions like an odometer.
        let mut dim = rank - 1;
        loop {
            if dim == 0 {
                return;
            }
            dim -= 1;
            index[dim] += 1;
            row_start += stride[dim];
            if index[dim] < shape[dim] {
                break;
            }
            row_start -= shape[dim] * stride[dim];
            index[dim] = 0;
        }
    }
}

/// Element type and element count of each storage that the unpickled object uses.
fn collect_storages(root: &Value) -> Result<HashMap<String, (DType, usize)>> {
    let mut found = HashMap::new();
    let mut pending = vec![root];
    while let Some(value) = pending.pop() {
        let storage = match value {
            Value::Storage(storage) => Some(&**storage),
            Value::Tensor(tensor) => Some(&tensor.storage),
            Value::Tuple(items) | Value::List(items) | Value::Set(items) => {
                pending.extend(items);
                None
            }
            Value::Dict(entries) => {
                pending.extend(entries.iter().flat_map(|(k, v)| [k, v]));
                None
            }
            Value::Object(object) => {
                pending.extend(&object.args);
                pending.extend(&object.state);
                pending.extend(&object.list_items);
                pending.extend(object.dict_items.iter().flat_map(|(k, v)| [k, v]));
                None
            }
            _ => None,
        };
        let Some(storage) = storage else { continue };
        let entry = (storage.dtype, storage.numel);
        if let Some(previous) = found.insert(storage.key.clone(), entry)
            && previous != entry
        {
            return Err(PthError::Storage {
                key: storage.key.clone(),
                message: format!(
                    "referenced as {} elements of {:?} and as {} elements of {:?}",
                    previous.1, previous.0, entry.1, entry.0
                ),
            });
        }
    }
    Ok(found)
}

fn storage_byte_len(key: &str, dtype: DType, numel: usize) -> Result<usize> {
    numel
        .checked_mul(dtype.size_in_bytes())
        .ok_or_else(|| PthError::Storage {
            key: key.to_owned(),
            message: format!("{numel} elements of {dtype:?} overflow the address space"),
        })
}

fn read_zip(bytes: &[u8], allow: &AllowList) -> Result<Checkpoint> {
    let mut archive = zip::ZipArchive::new(Cursor::new(bytes))?;
    // torch names the top directory after the file, and its reader takes it from the
    // first record, as this does.
    let first = archive
        .name_for_index(0)
        .ok_or_else(|| PthError::NotACheckpoint("the zip archive is empty".into()))??
        .into_owned();
    let Some((prefix, _)) = first.split_once('/') else {
        return Err(PthError::NotACheckpoint(format!(
            "the first zip record {first:?} is not inside a directory"
        )));
    };
    let prefix = prefix.to_owned();

    if let Some(order) = read_optional_record(&mut archive, &format!("{prefix}/byteorder"))?
        && order.trim_ascii() != b"little"
    {
        return Err(PthError::Unsupported(format!(
            "byte order {:?}, only little-endian is supported",
            String::from_utf8_lossy(&order)
        )));
    }
    let pickle_name = format!("{prefix}/data.pkl");
    let pickled = read_optional_record(&mut archive, &pickle_name)?.ok_or_else(|| {
        PthError::NotACheckpoint(format!("the zip archive has no {pickle_name} record"))
    })?;
    let (root, _) = pickle::load(&pickled, allow).map_err(|source| PthError::Pickle {
        part: "data.pkl",
        source,
    })?;

    let mut storages = HashMap::new();
    for (key, (dtype, numel)) in collect_storages(&root)? {
        let len = storage_byte_len(&key, dtype, numel)?;
        let name = format!("{prefix}/data/{key}");
        let bytes = read_record(&mut archive, &name, &key, len)?;
        storages.insert(key, Storage { dtype, bytes });
    }
    Ok(Checkpoint {
        root,
        storages,
        layout: Layout::Zip,
    })
}

fn read_optional_record(
    archive: &mut zip::ZipArchive<Cursor<&[u8]>>,
    name: &str,
) -> Result<Option<Vec<u8>>> {
    let mut entry = match archive.by_name(name) {
        Ok(entry) => entry,
        Err(zip::result::ZipError::FileNotFound) => return Ok(None),
        Err(other) => return Err(other.into()),
    };
    let mut bytes = Vec::new();
    entry.read_to_end(&mut bytes).map_err(|source| {
        PthError::Zip(zip::result::ZipError::Io(std::io::Error::new(
            source.kind(),
            format!("{name}: {source}"),
        )))
    })?;
    Ok(Some(bytes))
}

/// Reads a storage record that must hold exactly `len` bytes.
fn read_record(
    archive: &mut zip::ZipArchive<Cursor<&[u8]>>,
    name: &str,
    key: &str,
    len: usize,
) -> Result<Vec<u8>> {
    let storage_error = |message: String| PthError::Storage {
        key: key.to_owned(),
        message,
    };
    let entry = match archive.by_name(name) {
        Ok(entry) => entry,
        Err(zip::result::ZipError::FileNotFound) => {
            return Err(storage_error(format!("the zip record {name} is missing")));
        }
        Err(other) => return Err(other.into()),
    };
    let mut bytes = Vec::new();
    bytes
        .try_reserve_exact(len)
        .map_err(|_| storage_error(format!("cannot allocate {len} bytes")))?;
    // Reading one byte more than expected detects a longer record without inflating all of it.
    entry
        .take(len as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| storage_error(format!("failed to read {name}: {source}")))?;
    if bytes.len() != len {
        return Err(storage_error(format!(
            "the zip record {name} does not hold the {len} bytes the pickle describes"
        )));
    }
    Ok(bytes)
}

/// Cursor over the pickles and storages of a legacy checkpoint.
struct LegacyReader<'a> {
    bytes: &'a [u8],
    pos: usize,
    allow: &'a AllowList,
}

impl LegacyReader<'_> {
    fn pickle(&mut self, part: &'static str) -> Result<Value> {
        let (value, len) = pickle::load(&self.bytes[self.pos..], self.allow)
            .map_err(|source| PthError::Pickle { part, source })?;
        self.pos += len;
        Ok(value)
    }

    fn storage(&mut self, key: &str, dtype: DType, numel: usize) -> Result<Vec<u8>> {
        let storage_error = |message: String| PthError::Storage {
            key: key.to_owned(),
            message,
        };
        let header = self
            .bytes
            .get(self.pos..self.pos + 8)
            .ok_or_else(|| storage_error("the file ends before the element count".into()))?;
        let count = i64::from_le_bytes(header.try_into().unwrap_or_default());
        if usize::try_from(count) != Ok(numel) {
            return Err(storage_error(format!(
                "the file holds {count} elements but the pickle describes {numel}"
            )));
        }
        let start = self.pos + 8;
        let len = storage_byte_len(key, dtype, numel)?;
        let data = start
            .checked_add(len)
            .and_then(|end| self.bytes.get(start..end))
            .ok_or_else(|| storage_error(format!("the file ends inside its {len} bytes")))?;
        self.pos = start + len;
        Ok(data.to_vec())
    }
}

fn read_legacy(bytes: &[u8], allow: &AllowList) -> Result<Checkpoint> {
    let mut reader = LegacyReader {
        bytes,
        pos: 0,
        allow,
    };
    let magic = reader.pickle("legacy magic number").map_err(|error| {
        PthError::NotACheckpoint(format!("neither a zip archive nor a legacy file ({error})"))
    })?;
    if magic.as_i128() != Some(LEGACY_MAGIC_NUMBER) {
        return Err(PthError::NotACheckpoint(
            "neither a zip archive nor a legacy file with the torch magic number".into(),
        ));
    }
    let version = reader.pickle("legacy protocol version")?;
    if version.as_i64() != Some(LEGACY_PROTOCOL_VERSION) {
        return Err(PthError::Unsupported(format!(
            "legacy protocol version {version:?}, only {LEGACY_PROTOCOL_VERSION} is supported"
        )));
    }
    let system_info = reader.pickle("legacy system info")?;
    if system_info.get("little_endian").and_then(Value::as_bool) == Some(false) {
        return Err(PthError::Unsupported(
            "the file was saved on a big-endian machine".into(),
        ));
    }
    let root = reader.pickle("legacy data")?;
    let key_list = reader.pickle("legacy storage key list")?;
    let keys = key_list
        .as_sequence()
        .ok_or(PthError::UnexpectedValue {
            what: "legacy storage key list".into(),
            expected: "list",
            found: key_list.type_name(),
        })?
        .iter()
        .map(|key| match key {
            Value::Str(text) => Ok(text.clone()),
            other => Err(PthError::UnexpectedValue {
                what: "legacy storage key".into(),
                expected: "str",
                found: other.type_name(),
            }),
        })
        .collect::<Result<Vec<_>>>()?;

    let used = collect_storages(&root)?;
    let mut storages = HashMap::new();
    for key in keys {
        let Some(&(dtype, numel)) = used.get(&key) else {
            return Err(PthError::Storage {
                key,
                message: "listed in the file but not used by the pickle, so its type is unknown"
                    .into(),
            });
        };
        let bytes = reader.storage(&key, dtype, numel)?;
        storages.insert(key, Storage { dtype, bytes });
    }
    if let Some(missing) = used.keys().find(|key| !storages.contains_key(*key)) {
        return Err(PthError::Storage {
            key: missing.clone(),
            message: "used by the pickle but missing from the file".into(),
        });
    }
    Ok(Checkpoint {
        root,
        storages,
        layout: Layout::Legacy,
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn unicode(text: &str) -> Vec<u8> {
        let mut out = vec![b'X'];
        out.extend_from_slice(&(text.len() as u32).to_le_bytes());
        out.extend_from_slice(text.as_bytes());
        out
    }

    fn small_ints(values: &[u8]) -> Vec<u8> {
        let mut out = vec![b'('];
        for &value in values {
            out.extend_from_slice(&[b'K', value]);
        }
        out.push(b't');
        out
    }

    /// Pickle opcodes of `_rebuild_tensor_v2` for a tensor on storage `key`.
    fn tensor_pickle(
        key: &str,
        class: &str,
        numel: u8,
        offset: u8,
        size: &[u8],
        stride: &[u8],
    ) -> Vec<u8> {
        let mut out = b"ctorch._utils\n_rebuild_tensor_v2\n((".to_vec();
        out.extend(unicode("storage"));
        out.extend(format!("ctorch\n{class}\n").bytes());
        out.extend(unicode(key));
        out.extend(unicode("cpu"));
        out.extend_from_slice(&[b'K', numel, b't', b'Q', b'K', offset]);
        out.extend(small_ints(size));
        out.extend(small_ints(stride));
        out.extend_from_slice(b"\x89ccollections\nOrderedDict\n)RtR");
        out
    }

    /// Builds a protocol-2 pickle of an OrderedDict with the given entries.
    fn dict_pickle(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut out = b"\x80\x02ccollections\nOrderedDict\n)R(".to_vec();
        for (name, value) in entries {
            out.extend(unicode(name));
            out.extend_from_slice(value);
        }
        out.extend_from_slice(b"u.");
        out
    }

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    /// Storage key, element count and bytes of each storage in a test file.
    type Storages = Vec<(&'static str, i64, Vec<u8>)>;

    /// Returns the state dict {'w': 2x3 float tensor with stride (1, 2) on storage
    /// '0', 'n': int64 scalar on storage '1'} and its storages.
    fn sample() -> (Vec<u8>, Storages) {
        let state = dict_pickle(&[
            (
                "w",
                tensor_pickle("0", "FloatStorage", 6, 0, &[2, 3], &[1, 2]),
            ),
            ("n", tensor_pickle("1", "LongStorage", 1, 0, &[], &[])),
        ]);
        let storages = vec![
            ("0", 6, f32_bytes(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0])),
            ("1", 1, 7i64.to_le_bytes().to_vec()),
        ];
        (state, storages)
    }

    fn legacy_file(state: &[u8], storages: &[(&str, i64, Vec<u8>)]) -> Vec<u8> {
        let mut out = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.".to_vec();
        out.extend_from_slice(b"\x80\x02M\xe9\x03.");
        out.extend_from_slice(b"\x80\x02}(");
        out.extend(unicode("little_endian"));
        out.extend_from_slice(b"\x88u.");
        out.extend_from_slice(state);
        out.extend_from_slice(b"\x80\x02](");
        for (key, _, _) in storages {
            out.extend(unicode(key));
        }
        out.extend_from_slice(b"e.");
        for (_, count, bytes) in storages {
            out.extend_from_slice(&count.to_le_bytes());
            out.extend_from_slice(bytes);
        }
        out
    }

    fn zip_file(state: &[u8], storages: &[(&str, i64, Vec<u8>)]) -> Vec<u8> {
        let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        writer.start_file("archive/data.pkl", options).unwrap();
        writer.write_all(state).unwrap();
        writer.start_file("archive/byteorder", options).unwrap();
        writer.write_all(b"little").unwrap();
        for (key, _, bytes) in storages {
            writer
                .start_file(format!("archive/data/{key}"), options)
                .unwrap();
            writer.write_all(bytes).unwrap();
        }
        writer.start_file("archive/version", options).unwrap();
        writer.write_all(b"3\n").unwrap();
        writer.finish().unwrap().into_inner()
    }

    fn check_sample_tensors(checkpoint: &Checkpoint) {
        let tensors = checkpoint.state_dict().unwrap();
        let names: Vec<&str> = tensors.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, ["w", "n"]);

        let weight = &tensors[0].1;
        assert_eq!(weight.dtype, DType::F32);
        assert_eq!(weight.shape, vec![2, 3]);
        // Element [i][j] is storage[i + 2 * j].
        let values = weight.to_f32_vec().unwrap();
        assert_eq!(values, vec![0.0, 2.0, 4.0, 1.0, 3.0, 5.0]);

        let count = &tensors[1].1;
        assert_eq!(count.dtype, DType::I64);
        assert_eq!(count.shape, Vec::<usize>::new());
        assert_eq!(count.data, 7i64.to_le_bytes());
    }

    #[test]
    fn legacy_strided_tensor() {
        let (state, storages) = sample();
        let checkpoint = Checkpoint::from_bytes(&legacy_file(&state, &storages)).unwrap();
        assert_eq!(checkpoint.layout(), Layout::Legacy);
        check_sample_tensors(&checkpoint);
    }

    #[test]
    fn zip_strided_tensor() {
        let (state, storages) = sample();
        let checkpoint = Checkpoint::from_bytes(&zip_file(&state, &storages)).unwrap();
        assert_eq!(checkpoint.layout(), Layout::Zip);
        check_sample_tensors(&checkpoint);
    }

    #[test]
    fn zip_lightning_state_dict() {
        let (inner, storages) = sample();
        // {'epoch': 3, 'state_dict': <sample state dict>}: the inner pickle without its
        // PROTO header and STOP.
        let mut state = b"\x80\x02}(".to_vec();
        state.extend(unicode("epoch"));
        state.extend_from_slice(b"K\x03");
        state.extend(unicode("state_dict"));
        state.extend_from_slice(&inner[2..inner.len() - 1]);
        state.extend_from_slice(b"u.");
        let checkpoint = Checkpoint::from_bytes(&zip_file(&state, &storages)).unwrap();
        assert_eq!(checkpoint.value(&["epoch"]), Some(&Value::Int(3)));
        check_sample_tensors(&checkpoint);
    }

    #[test]
    fn offset_and_broadcast_strides() {
        let state = dict_pickle(&[
            (
                "every_other",
                tensor_pickle("0", "FloatStorage", 6, 2, &[2], &[2]),
            ),
            (
                "broadcast",
                tensor_pickle("0", "FloatStorage", 6, 5, &[3], &[0]),
            ),
        ]);
        let storages = [("0", 6, f32_bytes(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]))];
        let checkpoint = Checkpoint::from_bytes(&legacy_file(&state, &storages)).unwrap();
        let tensors = checkpoint.state_dict().unwrap();
        assert_eq!(tensors[0].1.to_f32_vec().unwrap(), vec![2.0, 4.0]);
        assert_eq!(tensors[1].1.to_f32_vec().unwrap(), vec![5.0, 5.0, 5.0]);
    }

    #[test]
    fn tensor_past_storage_end_is_rejected() {
        let state = dict_pickle(&[(
            "w",
            tensor_pickle("0", "FloatStorage", 6, 1, &[2, 3], &[3, 1]),
        )]);
        let storages = [("0", 6, f32_bytes(&[0.0; 6]))];
        let checkpoint = Checkpoint::from_bytes(&legacy_file(&state, &storages)).unwrap();
        let error = checkpoint.state_dict().unwrap_err();
        assert!(matches!(error, PthError::Tensor { .. }), "{error}");
        assert!(error.to_string().contains("reach element 6"), "{error}");
    }

    #[test]
    fn legacy_count_mismatch_is_rejected() {
        let (state, mut storages) = sample();
        storages[0].1 = 5;
        let error = Checkpoint::from_bytes(&legacy_file(&state, &storages)).unwrap_err();
        assert!(
            matches!(&error, PthError::Storage { key, .. } if key == "0"),
            "{error}"
        );
    }

    #[test]
    fn every_legacy_truncation_is_an_error() {
        let (state, storages) = sample();
        let file = legacy_file(&state, &storages);
        for len in 0..file.len() {
            assert!(Checkpoint::from_bytes(&file[..len]).is_err(), "{len} bytes");
        }
    }

    #[test]
    fn zip_missing_storage_is_rejected() {
        let (state, storages) = sample();
        let error = Checkpoint::from_bytes(&zip_file(&state, &storages[..1])).unwrap_err();
        assert!(
            matches!(&error, PthError::Storage { key, .. } if key == "1"),
            "{error}"
        );
    }

    #[test]
    fn zip_short_storage_is_rejected() {
        let (state, mut storages) = sample();
        storages[0].2.truncate(20);
        let error = Checkpoint::from_bytes(&zip_file(&state, &storages)).unwrap_err();
        assert!(
            matches!(&error, PthError::Storage { key, .. } if key == "0"),
            "{error}"
        );
    }

    #[test]
    fn forbidden_global_names_pickle() {
        let state = b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00ls\x85R.";
        for file in [legacy_file(state, &[]), zip_file(state, &[])] {
            let error = Checkpoint::from_bytes(&file).unwrap_err();
            assert!(matches!(error, PthError::Pickle { .. }), "{error}");
            assert!(
                error
                    .to_string()
                    .ends_with("pickle global os.system is not allowed"),
                "{error}"
            );
        }
    }

    #[test]
    fn other_files_are_not_checkpoints() {
        for data in [&b""[..], b"hello", b"\x80\x02K\x01."] {
            let error = Checkpoint::from_bytes(data).unwrap_err();
            assert!(
                matches!(error, PthError::NotACheckpoint(_)),
                "{data:?}: {error}"
            );
        }
    }
}
