// SPDX-License-Identifier: MIT OR Apache-2.0
//! A pickle reader for PyTorch checkpoints that executes nothing.
//!
//! Python's `pickle` imports and calls every global that a file names, so loading an
//! untrusted checkpoint with it can run arbitrary code. [`load`] instead interprets the
//! opcodes of pickle protocols 0 to 5 itself and builds an inert [`Value`] tree. It
//! resolves `GLOBAL`, `STACK_GLOBAL`, `INST` and `OBJ` only against a fixed set of
//! globals that torch checkpoints use, plus the extra classes an [`AllowList`] names,
//! and rejects every other global with [`PickleError::GlobalNotAllowed`].
//!
//! The torch rebuild functions (`torch._utils._rebuild_tensor_v2` and friends) become
//! [`TensorRef`]s that point into storages by key, and storage persistent ids become
//! [`StorageRef`]s. [`crate::pth`] reads the storage bytes that those keys name.
//!
//! Malformed, truncated or hostile input returns a [`PickleError`]. Nesting deeper than
//! [`MAX_DEPTH`] and shared references that would expand to more values than the input
//! size justifies are errors too, so that a small file cannot exhaust the stack or memory.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::rc::{Rc, Weak};

/// Maximum nesting depth of containers in a loaded value.
///
/// CPython's pickler recurses once per level and raises `RecursionError` near its
/// default recursion limit of 1000. Containers in the EfficientNet-Lite0 checkpoint nest
/// 3 levels deep: the state dict, the arguments of each tensor, and its size tuple.
pub const MAX_DEPTH: usize = 256;

/// Number of values [`load`] may produce regardless of input size.
///
/// Memo references let a pickle share one object many times, and the owned [`Value`]
/// tree copies each shared object, so the number of values is capped at this base plus
/// [`VALUES_PER_INPUT_BYTE`] per input byte.
pub const BASE_VALUE_LIMIT: usize = 1 << 20;

/// Number of values [`load`] may produce per byte of input, on top of [`BASE_VALUE_LIMIT`].
pub const VALUES_PER_INPUT_BYTE: usize = 16;

/// Highest pickle protocol that [`load`] reads.
pub const HIGHEST_PROTOCOL: u8 = 5;

/// Error from reading a pickle.
#[derive(Debug, thiserror::Error)]
pub enum PickleError {
    /// The input ends inside an opcode or before `STOP`.
    #[error("truncated pickle: {what} at byte {offset} runs past the end of the input")]
    Truncated {
        /// The item being read.
        what: &'static str,
        /// Byte offset where the item starts.
        offset: usize,
    },
    /// A byte that is no pickle opcode.
    #[error("unknown pickle opcode 0x{opcode:02x} at byte {offset}")]
    UnknownOpcode {
        /// The byte.
        opcode: u8,
        /// Its offset.
        offset: usize,
    },
    /// An opcode that this reader does not implement.
    #[error("pickle opcode {name} at byte {offset} is not supported")]
    UnsupportedOpcode {
        /// Opcode name as in Python's `pickletools`.
        name: &'static str,
        /// Its offset.
        offset: usize,
    },
    /// A `PROTO` opcode with a protocol above [`HIGHEST_PROTOCOL`].
    #[error("pickle protocol {0} is not supported (maximum {HIGHEST_PROTOCOL})")]
    UnsupportedProtocol(u8),
    /// A global that is neither built in nor on the [`AllowList`].
    #[error("pickle global {module}.{name} is not allowed")]
    GlobalNotAllowed {
        /// Module part, e.g. `os`.
        module: String,
        /// Name part, e.g. `system`.
        name: String,
    },
    /// An opcode found a stack, memo or argument it cannot work with.
    #[error("invalid pickle: {opcode} at byte {offset}: {message}")]
    Invalid {
        /// Opcode name as in Python's `pickletools`.
        opcode: &'static str,
        /// Its offset.
        offset: usize,
        /// Description of the problem.
        message: String,
    },
    /// An allowed function was called with arguments it does not accept.
    #[error("invalid arguments for {callable}: {message}")]
    InvalidArguments {
        /// The function or class, as `module.name`.
        callable: String,
        /// Description of the problem.
        message: String,
    },
    /// A persistent id that is not a torch storage reference.
    #[error("invalid persistent id: {0}")]
    InvalidPersistentId(String),
    /// Containers nest deeper than [`MAX_DEPTH`], which includes cycles.
    #[error("pickle values are nested deeper than {MAX_DEPTH} levels or contain a cycle")]
    TooDeep,
    /// Shared references expand to more values than the limit allows.
    #[error("pickle expands to more than {limit} values")]
    TooLarge {
        /// The limit for this input.
        limit: usize,
    },
}

type Result<T, E = PickleError> = std::result::Result<T, E>;

/// Element type of a torch storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// `torch.bool`, one byte per element.
    Bool,
    /// `torch.uint8`.
    U8,
    /// `torch.int8`.
    I8,
    /// `torch.int16`.
    I16,
    /// `torch.int32`.
    I32,
    /// `torch.int64`.
    I64,
    /// `torch.float16`.
    F16,
    /// `torch.bfloat16`.
    BF16,
    /// `torch.float32`.
    F32,
    /// `torch.float64`.
    F64,
    /// `torch.complex64`: two `f32` per element.
    C64,
    /// `torch.complex128`: two `f64` per element.
    C128,
}

impl DType {
    /// Returns the size of one element in bytes.
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::Bool | DType::U8 | DType::I8 => 1,
            DType::I16 | DType::F16 | DType::BF16 => 2,
            DType::I32 | DType::F32 => 4,
            DType::I64 | DType::F64 | DType::C64 => 8,
            DType::C128 => 16,
        }
    }

    /// Maps a torch storage class name such as `FloatStorage` to its element type.
    ///
    /// `UntypedStorage` maps to [`DType::U8`] because torch counts its elements in bytes.
    pub fn from_storage_class(name: &str) -> Option<Self> {
        let dtype = match name {
            "BoolStorage" => DType::Bool,
            "ByteStorage" | "UntypedStorage" => DType::U8,
            "CharStorage" => DType::I8,
            "ShortStorage" => DType::I16,
            "IntStorage" => DType::I32,
            "LongStorage" => DType::I64,
            "HalfStorage" => DType::F16,
            "BFloat16Storage" => DType::BF16,
            "FloatStorage" => DType::F32,
            "DoubleStorage" => DType::F64,
            "ComplexFloatStorage" => DType::C64,
            "ComplexDoubleStorage" => DType::C128,
            _ => return None,
        };
        Some(dtype)
    }
}

/// A module-qualified Python name, such as `collections.OrderedDict`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Global {
    /// Module, e.g. `torch._utils`.
    pub module: String,
    /// Name inside the module, e.g. `_rebuild_tensor_v2`.
    pub name: String,
}

impl fmt::Display for Global {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.module, self.name)
    }
}

/// A torch storage, as named by a persistent id in the pickle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageRef {
    /// Key of the stored storage: a record name in zip checkpoints, a position in the
    /// key list in legacy ones.
    pub key: String,
    /// Element type, from the storage class.
    pub dtype: DType,
    /// Device the storage was saved from, e.g. `cpu` or `cuda:0`.
    pub location: String,
    /// Number of elements of the stored storage.
    pub numel: usize,
    /// Part of the stored storage that this reference covers, for legacy checkpoints
    /// that saved storage views. `None` covers all `numel` elements.
    pub view: Option<StorageView>,
}

impl StorageRef {
    /// Returns the element range `(start, len)` of the stored storage that this reference covers.
    pub fn window(&self) -> (usize, usize) {
        match &self.view {
            Some(view) => (view.offset, view.numel),
            None => (0, self.numel),
        }
    }
}

/// Element range of a storage view in legacy checkpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageView {
    /// First element of the view within the stored storage.
    pub offset: usize,
    /// Number of elements in the view.
    pub numel: usize,
}

/// A tensor as torch pickles it: a strided view into a storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorRef {
    /// Storage that contains the elements.
    pub storage: StorageRef,
    /// Offset of the first element within the storage, in elements.
    pub storage_offset: usize,
    /// Size of each dimension.
    pub shape: Vec<usize>,
    /// Step between neighbours along each dimension, in elements.
    pub stride: Vec<usize>,
    /// Whether the tensor was an autograd leaf that requires gradients.
    pub requires_grad: bool,
}

/// An instance of an allowed opaque class, with its constructor arguments and state.
///
/// Nothing of the class is run: the fields record what the pickle passed to it.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    /// The class.
    pub class: Global,
    /// Positional arguments of `REDUCE`, `NEWOBJ`, `INST` or `OBJ`.
    pub args: Vec<Value>,
    /// Argument of `BUILD`, usually the instance `__dict__`.
    pub state: Option<Value>,
    /// Items added with `APPEND`/`APPENDS`, for list subclasses.
    pub list_items: Vec<Value>,
    /// Items added with `SETITEM`/`SETITEMS`, for dict subclasses.
    pub dict_items: Vec<(Value, Value)>,
}

/// A value read from a pickle.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `None`.
    None,
    /// `bool`.
    Bool(bool),
    /// `int` that fits in 64 bits.
    Int(i64),
    /// Larger `int`, as minimal little-endian two's-complement bytes.
    BigInt(Vec<u8>),
    /// `float`.
    Float(f64),
    /// `str`, and Python 2 `str` that is valid UTF-8.
    Str(String),
    /// `bytes`, `bytearray`, and Python 2 `str` that is not valid UTF-8.
    Bytes(Vec<u8>),
    /// `tuple`, and `torch.Size`.
    Tuple(Vec<Value>),
    /// `list`.
    List(Vec<Value>),
    /// `set` or `frozenset`, in pickle order.
    Set(Vec<Value>),
    /// `dict` or `collections.OrderedDict`, in insertion order with unique keys.
    Dict(Vec<(Value, Value)>),
    /// A reference to an allowed global that was not called, such as `torch.float32`.
    Global(Global),
    /// A torch storage from a persistent id.
    Storage(Box<StorageRef>),
    /// A torch tensor or `torch.nn.Parameter`.
    Tensor(Box<TensorRef>),
    /// An instance of an allowed opaque class such as `torch.device`.
    Object(Box<Object>),
}

impl Value {
    /// Returns the Python type name, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::BigInt(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Set(_) => "set",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
            Value::Object(_) => "object",
        }
    }

    /// Returns whether the value is `None`.
    pub fn is_none(&self) -> bool {
        matches!(self, Value::None)
    }

    /// Returns the string of a `str`.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(text) => Some(text),
            _ => None,
        }
    }

    /// Returns a `bool`.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(flag) => Some(*flag),
            _ => None,
        }
    }

    /// Returns an `int` that fits in 64 bits.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(number) => Some(*number),
            _ => None,
        }
    }

    /// Returns an `int` that fits in 128 bits.
    pub fn as_i128(&self) -> Option<i128> {
        match self {
            Value::Int(number) => Some(i128::from(*number)),
            Value::BigInt(bytes) if bytes.len() <= 16 => {
                let fill = if bytes.last().is_some_and(|b| b & 0x80 != 0) {
                    0xff
                } else {
                    0
                };
                let mut buffer = [fill; 16];
                buffer[..bytes.len()].copy_from_slice(bytes);
                Some(i128::from_le_bytes(buffer))
            }
            _ => None,
        }
    }

    /// Returns a `float`, or an `int` converted to `f64`.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float(number) => Some(*number),
            Value::Int(number) => Some(*number as f64),
            _ => None,
        }
    }

    /// Returns the bytes of a `bytes`.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Bytes(bytes) => Some(bytes),
            _ => None,
        }
    }

    /// Returns the items of a `tuple` or `list`.
    pub fn as_sequence(&self) -> Option<&[Value]> {
        match self {
            Value::Tuple(items) | Value::List(items) => Some(items),
            _ => None,
        }
    }

    /// Returns the entries of a `dict`.
    pub fn as_dict(&self) -> Option<&[(Value, Value)]> {
        match self {
            Value::Dict(entries) => Some(entries),
            _ => None,
        }
    }

    /// Returns the tensor of a [`Value::Tensor`].
    pub fn as_tensor(&self) -> Option<&TensorRef> {
        match self {
            Value::Tensor(tensor) => Some(tensor),
            _ => None,
        }
    }

    /// Looks up a `str` key in a `dict`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.as_dict()?
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v)
    }
}

/// Extra globals that [`load`] accepts as inert classes.
///
/// The globals that torch checkpoints need are always accepted: the tensor rebuild
/// functions in `torch._utils` and `torch._tensor`, the `torch.*Storage` classes,
/// the dtypes such as `torch.float32`, `torch.Size`, `torch.device`,
/// `torch.nn.parameter.Parameter`, `collections.OrderedDict`, `builtins.set`,
/// `builtins.frozenset`, `builtins.bytearray` and `_codecs.encode`. Classes added here
/// become [`Value::Object`]s when the pickle instantiates them.
#[derive(Debug, Clone, Default)]
pub struct AllowList {
    opaque: HashSet<(String, String)>,
}

impl AllowList {
    /// Also accepts `module.name`, as a class whose instances become [`Value::Object`]s.
    pub fn with_opaque(mut self, module: &str, name: &str) -> Self {
        self.opaque.insert((module.to_owned(), name.to_owned()));
        self
    }

    /// Returns whether [`load`] accepts the global `module.name`.
    pub fn is_allowed(&self, module: &str, name: &str) -> bool {
        self.resolve(module, name).is_some()
    }

    fn resolve(&self, module: &str, name: &str) -> Option<Builtin> {
        builtin(module, name).or_else(|| {
            self.opaque
                .contains(&(module.to_owned(), name.to_owned()))
                .then_some(Builtin::Opaque)
        })
    }
}

/// Effect of calling an allowed global from the pickle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Builtin {
    OrderedDict,
    Set,
    Bytearray,
    CodecsEncode,
    RebuildTensor,
    RebuildTensorV2,
    RebuildParameter,
    RebuildParameterWithState,
    RebuildFromTypeV2,
    Size,
    /// A class whose instances become [`Value::Object`].
    Opaque,
    /// A value that is never called, such as a storage class or a dtype.
    Constant,
}

const TORCH_DTYPES: &[&str] = &[
    "bool",
    "uint8",
    "int8",
    "int16",
    "short",
    "int32",
    "int",
    "int64",
    "long",
    "float16",
    "half",
    "bfloat16",
    "float32",
    "float",
    "float64",
    "double",
    "complex64",
    "cfloat",
    "complex128",
    "cdouble",
];

fn builtin(module: &str, name: &str) -> Option<Builtin> {
    // Python 2 pickles name the builtins module `__builtin__`.
    let module = if module == "__builtin__" {
        "builtins"
    } else {
        module
    };
    let found = match (module, name) {
        ("collections", "OrderedDict") => Builtin::OrderedDict,
        ("builtins", "set" | "frozenset") => Builtin::Set,
        ("builtins", "bytearray") => Builtin::Bytearray,
        ("_codecs", "encode") => Builtin::CodecsEncode,
        ("torch._utils", "_rebuild_tensor") => Builtin::RebuildTensor,
        ("torch._utils", "_rebuild_tensor_v2") => Builtin::RebuildTensorV2,
        ("torch._utils", "_rebuild_parameter") => Builtin::RebuildParameter,
        ("torch._utils", "_rebuild_parameter_with_state") => Builtin::RebuildParameterWithState,
        ("torch._tensor", "_rebuild_from_type_v2") => Builtin::RebuildFromTypeV2,
        ("torch", "Size") => Builtin::Size,
        ("torch", "device")
        | ("torch._tensor", "Tensor")
        | ("torch", "Tensor")
        | ("torch.nn.parameter", "Parameter") => Builtin::Opaque,
        ("torch", storage) if DType::from_storage_class(storage).is_some() => Builtin::Constant,
        ("torch", dtype) if TORCH_DTYPES.contains(&dtype) => Builtin::Constant,
        _ => return None,
    };
    Some(found)
}

/// Reads one pickle from the start of `data`.
///
/// Returns the value and the number of bytes read, up to and including the `STOP`
/// opcode, so that callers can read pickles that follow each other. Persistent ids must
/// be torch storage references (`('storage', StorageClass, key, location, numel)`).
pub fn load(data: &[u8], allow: &AllowList) -> Result<(Value, usize)> {
    let mut machine = Machine::new(data, allow);
    let value = machine.run()?;
    Ok((value, machine.reader.pos))
}

// Opcodes, named as in CPython's Lib/pickle.py.
const MARK: u8 = b'(';
const STOP: u8 = b'.';
const POP: u8 = b'0';
const POP_MARK: u8 = b'1';
const DUP: u8 = b'2';
const FLOAT: u8 = b'F';
const INT: u8 = b'I';
const BININT: u8 = b'J';
const BININT1: u8 = b'K';
const LONG: u8 = b'L';
const BININT2: u8 = b'M';
const NONE: u8 = b'N';
const PERSID: u8 = b'P';
const BINPERSID: u8 = b'Q';
const REDUCE: u8 = b'R';
const STRING: u8 = b'S';
const BINSTRING: u8 = b'T';
const SHORT_BINSTRING: u8 = b'U';
const UNICODE: u8 = b'V';
const BINUNICODE: u8 = b'X';
const APPEND: u8 = b'a';
const BUILD: u8 = b'b';
const GLOBAL: u8 = b'c';
const DICT: u8 = b'd';
const EMPTY_DICT: u8 = b'}';
const APPENDS: u8 = b'e';
const GET: u8 = b'g';
const BINGET: u8 = b'h';
const INST: u8 = b'i';
const LONG_BINGET: u8 = b'j';
const LIST: u8 = b'l';
const EMPTY_LIST: u8 = b']';
const OBJ: u8 = b'o';
const PUT: u8 = b'p';
const BINPUT: u8 = b'q';
const LONG_BINPUT: u8 = b'r';
const SETITEM: u8 = b's';
const TUPLE: u8 = b't';
const EMPTY_TUPLE: u8 = b')';
const SETITEMS: u8 = b'u';
const BINFLOAT: u8 = b'G';
const PROTO: u8 = 0x80;
const NEWOBJ: u8 = 0x81;
const EXT1: u8 = 0x82;
const EXT2: u8 = 0x83;
const EXT4: u8 = 0x84;
const TUPLE1: u8 = 0x85;
const TUPLE2: u8 = 0x86;
const TUPLE3: u8 = 0x87;
const NEWTRUE: u8 = 0x88;
const NEWFALSE: u8 = 0x89;
const LONG1: u8 = 0x8a;
const LONG4: u8 = 0x8b;
const BINBYTES: u8 = b'B';
const SHORT_BINBYTES: u8 = b'C';
const SHORT_BINUNICODE: u8 = 0x8c;
const BINUNICODE8: u8 = 0x8d;
const BINBYTES8: u8 = 0x8e;
const EMPTY_SET: u8 = 0x8f;
const ADDITEMS: u8 = 0x90;
const FROZENSET: u8 = 0x91;
const NEWOBJ_EX: u8 = 0x92;
const STACK_GLOBAL: u8 = 0x93;
const MEMOIZE: u8 = 0x94;
const FRAME: u8 = 0x95;
const BYTEARRAY8: u8 = 0x96;
const NEXT_BUFFER: u8 = 0x97;
const READONLY_BUFFER: u8 = 0x98;

fn opcode_name(opcode: u8) -> &'static str {
    match opcode {
        MARK => "MARK",
        STOP => "STOP",
        POP => "POP",
        POP_MARK => "POP_MARK",
        DUP => "DUP",
        FLOAT => "FLOAT",
        INT => "INT",
        BININT => "BININT",
        BININT1 => "BININT1",
        LONG => "LONG",
        BININT2 => "BININT2",
        NONE => "NONE",
        PERSID => "PERSID",
        BINPERSID => "BINPERSID",
        REDUCE => "REDUCE",
        STRING => "STRING",
        BINSTRING => "BINSTRING",
        SHORT_BINSTRING => "SHORT_BINSTRING",
        UNICODE => "UNICODE",
        BINUNICODE => "BINUNICODE",
        APPEND => "APPEND",
        BUILD => "BUILD",
        GLOBAL => "GLOBAL",
        DICT => "DICT",
        EMPTY_DICT => "EMPTY_DICT",
        APPENDS => "APPENDS",
        GET => "GET",
        BINGET => "BINGET",
        INST => "INST",
        LONG_BINGET => "LONG_BINGET",
        LIST => "LIST",
        EMPTY_LIST => "EMPTY_LIST",
        OBJ => "OBJ",
        PUT => "PUT",
        BINPUT => "BINPUT",
        LONG_BINPUT => "LONG_BINPUT",
        SETITEM => "SETITEM",
        TUPLE => "TUPLE",
        EMPTY_TUPLE => "EMPTY_TUPLE",
        SETITEMS => "SETITEMS",
        BINFLOAT => "BINFLOAT",
        PROTO => "PROTO",
        NEWOBJ => "NEWOBJ",
        EXT1 => "EXT1",
        EXT2 => "EXT2",
        EXT4 => "EXT4",
        TUPLE1 => "TUPLE1",
        TUPLE2 => "TUPLE2",
        TUPLE3 => "TUPLE3",
        NEWTRUE => "NEWTRUE",
        NEWFALSE => "NEWFALSE",
        LONG1 => "LONG1",
        LONG4 => "LONG4",
        BINBYTES => "BINBYTES",
        SHORT_BINBYTES => "SHORT_BINBYTES",
        SHORT_BINUNICODE => "SHORT_BINUNICODE",
        BINUNICODE8 => "BINUNICODE8",
        BINBYTES8 => "BINBYTES8",
        EMPTY_SET => "EMPTY_SET",
        ADDITEMS => "ADDITEMS",
        FROZENSET => "FROZENSET",
        NEWOBJ_EX => "NEWOBJ_EX",
        STACK_GLOBAL => "STACK_GLOBAL",
        MEMOIZE => "MEMOIZE",
        FRAME => "FRAME",
        BYTEARRAY8 => "BYTEARRAY8",
        NEXT_BUFFER => "NEXT_BUFFER",
        READONLY_BUFFER => "READONLY_BUFFER",
        _ => "unknown opcode",
    }
}

/// Bounds-checked cursor over the input.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize, what: &'static str) -> Result<&'a [u8]> {
        let remaining = self.data.len() - self.pos;
        if len > remaining {
            return Err(PickleError::Truncated {
                what,
                offset: self.pos,
            });
        }
        let bytes = &self.data[self.pos..self.pos + len];
        self.pos += len;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N]> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn i32(&mut self, what: &'static str) -> Result<i32> {
        Ok(i32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Reads up to the next newline and returns the bytes before it.
    fn line(&mut self, what: &'static str) -> Result<&'a [u8]> {
        let rest = &self.data[self.pos..];
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            return Err(PickleError::Truncated {
                what,
                offset: self.pos,
            });
        };
        self.pos += end + 1;
        Ok(&rest[..end])
    }
}

type Seq = Rc<RefCell<Vec<Item>>>;

/// A value on the machine's stack or in its memo.
///
/// Containers are shared and mutable, as in Python: the pickler memoizes a container
/// before it fills it, so a later `BINGET` must see the items that `APPENDS` or
/// `SETITEMS` added afterwards. [`Item::Leaf`] contains only non-container values.
#[derive(Clone)]
enum Item {
    Leaf(Value),
    Tuple(Seq),
    List(Seq),
    Set(Seq),
    Dict(Rc<RefCell<DictItem>>),
    Object(Rc<RefCell<ObjectItem>>),
}

impl Item {
    fn type_name(&self) -> &'static str {
        match self {
            Item::Leaf(value) => value.type_name(),
            Item::Tuple(_) => "tuple",
            Item::List(_) => "list",
            Item::Set(_) => "set",
            Item::Dict(_) => "dict",
            Item::Object(_) => "object",
        }
    }
}

impl Drop for Item {
    /// Drops nested containers with an explicit stack, because a pickle can nest far
    /// deeper than the call stack allows (one byte per level with `TUPLE1`).
    fn drop(&mut self) {
        let mut pending = Vec::new();
        self.take_children_if_unique(&mut pending);
        while let Some(mut child) = pending.pop() {
            child.take_children_if_unique(&mut pending);
            // `child` drops here without children, so its own `drop` returns at once.
        }
    }
}

impl Item {
    /// Moves the children of a container out when this is its last strong reference.
    fn take_children_if_unique(&mut self, pending: &mut Vec<Item>) {
        match self {
            Item::Leaf(_) => {}
            Item::Tuple(seq) | Item::List(seq) | Item::Set(seq) => {
                if Rc::strong_count(seq) == 1
                    && let Ok(mut items) = seq.try_borrow_mut()
                {
                    pending.append(&mut items);
                }
            }
            Item::Dict(dict) => {
                if Rc::strong_count(dict) == 1
                    && let Ok(mut dict) = dict.try_borrow_mut()
                {
                    release_dict(std::mem::take(&mut *dict), pending);
                }
            }
            Item::Object(object) => {
                if Rc::strong_count(object) == 1
                    && let Ok(mut object) = object.try_borrow_mut()
                {
                    release_object(&mut object, pending);
                }
            }
        }
    }
}

#[derive(Default)]
struct DictItem {
    entries: Vec<(Item, Item)>,
    index: HashMap<HashKey, usize>,
}

impl DictItem {
    /// Inserts or replaces, keeping the first insertion position like Python dicts do.
    fn insert(&mut self, key: HashKey, key_item: Item, value: Item) {
        if let Some(&position) = self.index.get(&key) {
            self.entries[position].1 = value;
        } else {
            self.index.insert(key, self.entries.len());
            self.entries.push((key_item, value));
        }
    }
}

struct ObjectItem {
    class: Global,
    args: Vec<Item>,
    state: Option<Item>,
    list_items: Vec<Item>,
    dict_items: DictItem,
}

/// Hashable form of a dict key or set item, with Python's equality: `True == 1 == 1.0`.
#[derive(PartialEq, Eq, Hash)]
enum HashKey {
    None,
    Int(i64),
    BigInt(Vec<u8>),
    Float(u64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<HashKey>),
    Global(Global),
}

/// Weak handle to every container the machine created, so that dropping the machine
/// can empty them and break the reference cycles that `DUP` or the memo can create.
enum Registered {
    Seq(Weak<RefCell<Vec<Item>>>),
    Dict(Weak<RefCell<DictItem>>),
    Object(Weak<RefCell<ObjectItem>>),
}

struct Machine<'a> {
    reader: Reader<'a>,
    allow: &'a AllowList,
    stack: Vec<Item>,
    metastack: Vec<Vec<Item>>,
    memo: HashMap<u64, Item>,
    registered: Vec<Registered>,
    values_left: usize,
    value_limit: usize,
    opcode: u8,
    opcode_offset: usize,
}

impl Drop for Machine<'_> {
    fn drop(&mut self) {
        let mut released = Vec::new();
        for handle in self.registered.drain(..) {
            match handle {
                Registered::Seq(weak) => {
                    if let Some(seq) = weak.upgrade() {
                        released.append(&mut seq.borrow_mut());
                    }
                }
                Registered::Dict(weak) => {
                    if let Some(dict) = weak.upgrade() {
                        let dict = std::mem::take(&mut *dict.borrow_mut());
                        release_dict(dict, &mut released);
                    }
                }
                Registered::Object(weak) => {
                    if let Some(object) = weak.upgrade() {
                        release_object(&mut object.borrow_mut(), &mut released);
                    }
                }
            }
        }
    }
}

fn release_dict(dict: DictItem, released: &mut Vec<Item>) {
    for (key, value) in dict.entries {
        released.push(key);
        released.push(value);
    }
}

fn release_object(object: &mut ObjectItem, released: &mut Vec<Item>) {
    released.append(&mut object.args);
    released.extend(object.state.take());
    released.append(&mut object.list_items);
    release_dict(std::mem::take(&mut object.dict_items), released);
}

impl<'a> Machine<'a> {
    fn new(data: &'a [u8], allow: &'a AllowList) -> Self {
        let value_limit =
            BASE_VALUE_LIMIT.saturating_add(data.len().saturating_mul(VALUES_PER_INPUT_BYTE));
        Machine {
            reader: Reader { data, pos: 0 },
            allow,
            stack: Vec::new(),
            metastack: Vec::new(),
            memo: HashMap::new(),
            registered: Vec::new(),
            values_left: value_limit,
            value_limit,
            opcode: 0,
            opcode_offset: 0,
        }
    }

    fn invalid(&self, message: impl Into<String>) -> PickleError {
        PickleError::Invalid {
            opcode: opcode_name(self.opcode),
            offset: self.opcode_offset,
            message: message.into(),
        }
    }

    fn run(&mut self) -> Result<Value> {
        loop {
            self.opcode_offset = self.reader.pos;
            self.opcode = self.reader.u8("opcode")?;
            if self.opcode == STOP {
                let top = self.pop()?;
                return self.materialize(&top, 0);
            }
            self.step()?;
        }
    }

    fn step(&mut self) -> Result<()> {
        match self.opcode {
            PROTO => {
                let protocol = self.reader.u8("PROTO argument")?;
                if protocol > HIGHEST_PROTOCOL {
                    return Err(PickleError::UnsupportedProtocol(protocol));
                }
            }
            FRAME => {
                // Frames only group opcodes for buffered reading, and the whole input is in memory.
                let len = self.reader.u64("FRAME length")?;
                let remaining = self.reader.data.len() - self.reader.pos;
                if len > remaining as u64 {
                    return Err(PickleError::Truncated {
                        what: "FRAME",
                        offset: self.opcode_offset,
                    });
                }
            }
            MARK => self.metastack.push(std::mem::take(&mut self.stack)),
            POP => {
                if self.stack.is_empty() && !self.metastack.is_empty() {
                    self.pop_mark()?;
                } else {
                    self.pop()?;
                }
            }
            POP_MARK => {
                self.pop_mark()?;
            }
            DUP => {
                let top = self.top()?.clone();
                self.stack.push(top);
            }
            _ => return self.step_value(),
        }
        Ok(())
    }

    fn step_value(&mut self) -> Result<()> {
        match self.opcode {
            NONE => self.push_leaf(Value::None),
            NEWTRUE => self.push_leaf(Value::Bool(true)),
            NEWFALSE => self.push_leaf(Value::Bool(false)),
            INT => {
                let line = self.text_line("INT argument")?;
                let value = match line.as_str() {
                    // Protocol 0 writes booleans as INT 00 and 01.
                    "00" => Value::Bool(false),
                    "01" => Value::Bool(true),
                    text => Value::Int(self.parse_int(text)?),
                };
                self.push_leaf(value);
            }
            BININT => {
                let number = self.reader.i32("BININT argument")?;
                self.push_leaf(Value::Int(i64::from(number)));
            }
            BININT1 => {
                let number = self.reader.u8("BININT1 argument")?;
                self.push_leaf(Value::Int(i64::from(number)));
            }
            BININT2 => {
                let number = self.reader.u16("BININT2 argument")?;
                self.push_leaf(Value::Int(i64::from(number)));
            }
            LONG => {
                let line = self.text_line("LONG argument")?;
                let digits = line.strip_suffix('L').unwrap_or(&line);
                // NOTE: protocol 0 longs beyond 64 bits are rejected. Binary protocols
                // use LONG1/LONG4, which read any size.
                let number = self.parse_int(digits)?;
                self.push_leaf(Value::Int(number));
            }
            LONG1 => {
                let len = self.reader.u8("LONG1 length")?;
                let bytes = self.reader.take(usize::from(len), "LONG1 argument")?;
                self.push_leaf(decode_long(bytes));
            }
            LONG4 => {
                let len = self.reader.i32("LONG4 length")?;
                let len = usize::try_from(len)
                    .map_err(|_| self.invalid(format!("negative length {len}")))?;
                let bytes = self.reader.take(len, "LONG4 argument")?;
                self.push_leaf(decode_long(bytes));
            }
            FLOAT => {
                let line = self.text_line("FLOAT argument")?;
                let number = line
                    .parse::<f64>()
                    .map_err(|_| self.invalid(format!("invalid float {line:?}")))?;
                self.push_leaf(Value::Float(number));
            }
            BINFLOAT => {
                let number = f64::from_be_bytes(self.reader.array("BINFLOAT argument")?);
                self.push_leaf(Value::Float(number));
            }
            _ => return self.step_text(),
        }
        Ok(())
    }

    fn step_text(&mut self) -> Result<()> {
        match self.opcode {
            STRING => {
                let line = self.reader.line("STRING argument")?;
                let quoted = line.len() >= 2
                    && line[0] == line[line.len() - 1]
                    && (line[0] == b'\'' || line[0] == b'"');
                if !quoted {
                    return Err(self.invalid("the argument is not quoted"));
                }
                let bytes = unescape_bytes(&line[1..line.len() - 1]);
                self.push_leaf(python2_string(bytes));
            }
            BINSTRING => {
                let len = self.reader.i32("BINSTRING length")?;
                let len = usize::try_from(len)
                    .map_err(|_| self.invalid(format!("negative length {len}")))?;
                let bytes = self.reader.take(len, "BINSTRING argument")?;
                self.push_leaf(python2_string(bytes.to_vec()));
            }
            SHORT_BINSTRING => {
                let len = self.reader.u8("SHORT_BINSTRING length")?;
                let bytes = self
                    .reader
                    .take(usize::from(len), "SHORT_BINSTRING argument")?;
                self.push_leaf(python2_string(bytes.to_vec()));
            }
            UNICODE => {
                let line = self.reader.line("UNICODE argument")?;
                let text = decode_raw_unicode_escape(line)
                    .ok_or_else(|| self.invalid("invalid raw-unicode-escape text"))?;
                self.push_leaf(Value::Str(text));
            }
            SHORT_BINUNICODE => {
                let len = usize::from(self.reader.u8("SHORT_BINUNICODE length")?);
                self.push_unicode(len, "SHORT_BINUNICODE argument")?;
            }
            BINUNICODE => {
                let len = self.reader.u32("BINUNICODE length")?;
                self.push_unicode(self.length(u64::from(len))?, "BINUNICODE argument")?;
            }
            BINUNICODE8 => {
                let len = self.reader.u64("BINUNICODE8 length")?;
                self.push_unicode(self.length(len)?, "BINUNICODE8 argument")?;
            }
            SHORT_BINBYTES => {
                let len = usize::from(self.reader.u8("SHORT_BINBYTES length")?);
                self.push_bytes(len, "SHORT_BINBYTES argument")?;
            }
            BINBYTES => {
                let len = self.reader.u32("BINBYTES length")?;
                self.push_bytes(self.length(u64::from(len))?, "BINBYTES argument")?;
            }
            BINBYTES8 | BYTEARRAY8 => {
                let len = self.reader.u64("BINBYTES8 length")?;
                self.push_bytes(self.length(len)?, "BINBYTES8 argument")?;
            }
            _ => return self.step_container(),
        }
        Ok(())
    }

    fn step_container(&mut self) -> Result<()> {
        match self.opcode {
            EMPTY_TUPLE => self.push_seq(Item::Tuple, Vec::new()),
            TUPLE => {
                let items = self.pop_mark()?;
                self.push_seq(Item::Tuple, items);
            }
            TUPLE1 | TUPLE2 | TUPLE3 => {
                let count = usize::from(self.opcode - TUPLE1) + 1;
                if self.stack.len() < count {
                    return Err(self.invalid(format!("needs {count} items on the stack")));
                }
                let items = self.stack.split_off(self.stack.len() - count);
                self.push_seq(Item::Tuple, items);
            }
            EMPTY_LIST => self.push_seq(Item::List, Vec::new()),
            LIST => {
                let items = self.pop_mark()?;
                self.push_seq(Item::List, items);
            }
            APPEND => {
                let item = self.pop()?;
                self.append(vec![item])?;
            }
            APPENDS => {
                let items = self.pop_mark()?;
                self.append(items)?;
            }
            EMPTY_DICT => {
                let dict = self.new_dict();
                self.stack.push(dict);
            }
            DICT => {
                let items = self.pop_mark()?;
                let dict = self.new_dict();
                self.set_items(&dict, items)?;
                self.stack.push(dict);
            }
            SETITEM => {
                let value = self.pop()?;
                let key = self.pop()?;
                let target = self.top()?.clone();
                self.set_items(&target, vec![key, value])?;
            }
            SETITEMS => {
                let items = self.pop_mark()?;
                let target = self.top()?.clone();
                self.set_items(&target, items)?;
            }
            EMPTY_SET => self.push_seq(Item::Set, Vec::new()),
            FROZENSET => {
                let items = self.pop_mark()?;
                let set = self.new_set(items)?;
                self.stack.push(set);
            }
            ADDITEMS => {
                let items = self.pop_mark()?;
                let Item::Set(set) = self.top()? else {
                    let found = self.top()?.type_name();
                    return Err(self.invalid(format!("expected a set, found {found}")));
                };
                let set = set.clone();
                self.add_to_set(&set, items)?;
            }
            _ => return self.step_memo(),
        }
        Ok(())
    }

    fn step_memo(&mut self) -> Result<()> {
        match self.opcode {
            GET => {
                let index = self.text_index("GET argument")?;
                self.memo_get(index)?;
            }
            BINGET => {
                let index = self.reader.u8("BINGET argument")?;
                self.memo_get(u64::from(index))?;
            }
            LONG_BINGET => {
                let index = self.reader.u32("LONG_BINGET argument")?;
                self.memo_get(u64::from(index))?;
            }
            PUT => {
                let index = self.text_index("PUT argument")?;
                self.memo_put(index)?;
            }
            BINPUT => {
                let index = self.reader.u8("BINPUT argument")?;
                self.memo_put(u64::from(index))?;
            }
            LONG_BINPUT => {
                let index = self.reader.u32("LONG_BINPUT argument")?;
                self.memo_put(u64::from(index))?;
            }
            MEMOIZE => self.memo_put(self.memo.len() as u64)?,
            _ => return self.step_object(),
        }
        Ok(())
    }

    fn step_object(&mut self) -> Result<()> {
        match self.opcode {
            GLOBAL => {
                let module = self.text_line("GLOBAL module")?;
                let name = self.text_line("GLOBAL name")?;
                let global = self.resolve_global(module, name)?;
                self.push_leaf(Value::Global(global));
            }
            STACK_GLOBAL => {
                let name = self.pop_str()?;
                let module = self.pop_str()?;
                let global = self.resolve_global(module, name)?;
                self.push_leaf(Value::Global(global));
            }
            REDUCE => {
                let args = self.pop_args()?;
                let callable = self.pop_global()?;
                let result = self.call(&callable, args, 0)?;
                self.stack.push(result);
            }
            NEWOBJ => {
                let args = self.pop_args()?;
                let class = self.pop_global()?;
                let result = self.call(&class, args, 0)?;
                self.stack.push(result);
            }
            NEWOBJ_EX => {
                let kwargs = self.pop()?;
                let has_kwargs = match &kwargs {
                    Item::Dict(dict) => !dict.borrow().entries.is_empty(),
                    _ => true,
                };
                if has_kwargs {
                    return Err(self.invalid("keyword arguments are not supported"));
                }
                let args = self.pop_args()?;
                let class = self.pop_global()?;
                let result = self.call(&class, args, 0)?;
                self.stack.push(result);
            }
            INST => {
                let module = self.text_line("INST module")?;
                let name = self.text_line("INST name")?;
                let class = self.resolve_global(module, name)?;
                let args = self.pop_mark()?;
                let result = self.call(&class, args, 0)?;
                self.stack.push(result);
            }
            OBJ => {
                let mut items = self.pop_mark()?;
                let class = match items.first() {
                    Some(Item::Leaf(Value::Global(class))) => class.clone(),
                    _ => return Err(self.invalid("expected a class after MARK")),
                };
                let args = items.split_off(1);
                let result = self.call(&class, args, 0)?;
                self.stack.push(result);
            }
            BUILD => {
                let state = self.pop()?;
                let target = self.top()?.clone();
                self.build(&target, state)?;
            }
            PERSID => {
                let line = self.text_line("PERSID argument")?;
                let storage = storage_from_persistent_id(&Value::Str(line))?;
                self.push_leaf(Value::Storage(Box::new(storage)));
            }
            BINPERSID => {
                let pid = self.pop()?;
                let pid = self.materialize(&pid, 0)?;
                let storage = storage_from_persistent_id(&pid)?;
                self.push_leaf(Value::Storage(Box::new(storage)));
            }
            EXT1 | EXT2 | EXT4 | NEXT_BUFFER | READONLY_BUFFER => {
                return Err(PickleError::UnsupportedOpcode {
                    name: opcode_name(self.opcode),
                    offset: self.opcode_offset,
                });
            }
            opcode => {
                return Err(PickleError::UnknownOpcode {
                    opcode,
                    offset: self.opcode_offset,
                });
            }
        }
        Ok(())
    }

    // Stack helpers.

    fn push_leaf(&mut self, value: Value) {
        self.stack.push(Item::Leaf(value));
    }

    fn push_seq(&mut self, kind: fn(Seq) -> Item, items: Vec<Item>) {
        let item = self.new_seq(kind, items);
        self.stack.push(item);
    }

    fn new_seq(&mut self, kind: fn(Seq) -> Item, items: Vec<Item>) -> Item {
        let seq = Rc::new(RefCell::new(items));
        self.registered.push(Registered::Seq(Rc::downgrade(&seq)));
        kind(seq)
    }

    fn new_dict(&mut self) -> Item {
        let dict = Rc::new(RefCell::new(DictItem::default()));
        self.registered.push(Registered::Dict(Rc::downgrade(&dict)));
        Item::Dict(dict)
    }

    fn new_set(&mut self, items: Vec<Item>) -> Result<Item> {
        let set = self.new_seq(Item::Set, Vec::new());
        if let Item::Set(seq) = &set {
            self.add_to_set(seq, items)?;
        }
        Ok(set)
    }

    fn pop(&mut self) -> Result<Item> {
        self.stack
            .pop()
            .ok_or_else(|| self.invalid("the stack is empty"))
    }

    fn top(&self) -> Result<&Item> {
        self.stack
            .last()
            .ok_or_else(|| self.invalid("the stack is empty"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Item>> {
        let previous = self
            .metastack
            .pop()
            .ok_or_else(|| self.invalid("no MARK on the stack"))?;
        Ok(std::mem::replace(&mut self.stack, previous))
    }

    fn pop_str(&mut self) -> Result<String> {
        match &self.pop()? {
            Item::Leaf(Value::Str(text)) => Ok(text.clone()),
            other => Err(self.invalid(format!("expected a str, found {}", other.type_name()))),
        }
    }

    fn pop_global(&mut self) -> Result<Global> {
        match &self.pop()? {
            Item::Leaf(Value::Global(global)) => Ok(global.clone()),
            other => Err(self.invalid(format!(
                "expected a global to call, found {}",
                other.type_name()
            ))),
        }
    }

    fn pop_args(&mut self) -> Result<Vec<Item>> {
        match &self.pop()? {
            Item::Tuple(seq) => Ok(seq.borrow().clone()),
            other => Err(self.invalid(format!(
                "expected an argument tuple, found {}",
                other.type_name()
            ))),
        }
    }

    // Argument parsing.

    fn text_line(&mut self, what: &'static str) -> Result<String> {
        let line = self.reader.line(what)?;
        String::from_utf8(line.to_vec()).map_err(|_| self.invalid(format!("{what} is not UTF-8")))
    }

    fn text_index(&mut self, what: &'static str) -> Result<u64> {
        let line = self.text_line(what)?;
        line.parse()
            .map_err(|_| self.invalid(format!("invalid memo index {line:?}")))
    }

    fn parse_int(&self, text: &str) -> Result<i64> {
        text.parse()
            .map_err(|_| self.invalid(format!("invalid or out-of-range integer {text:?}")))
    }

    /// Converts a length from the input to `usize`. The read that follows checks that
    /// the input contains that many bytes before anything is allocated.
    fn length(&self, len: u64) -> Result<usize> {
        usize::try_from(len).map_err(|_| PickleError::Truncated {
            what: "length",
            offset: self.opcode_offset,
        })
    }

    fn push_unicode(&mut self, len: usize, what: &'static str) -> Result<()> {
        let bytes = self.reader.take(len, what)?;
        let text = std::str::from_utf8(bytes)
            .map_err(|_| self.invalid("the string is not valid UTF-8"))?;
        self.push_leaf(Value::Str(text.to_owned()));
        Ok(())
    }

    fn push_bytes(&mut self, len: usize, what: &'static str) -> Result<()> {
        let bytes = self.reader.take(len, what)?;
        self.push_leaf(Value::Bytes(bytes.to_vec()));
        Ok(())
    }

    // Memo.

    fn memo_get(&mut self, index: u64) -> Result<()> {
        let item = self
            .memo
            .get(&index)
            .ok_or_else(|| self.invalid(format!("memo entry {index} is missing")))?
            .clone();
        self.stack.push(item);
        Ok(())
    }

    fn memo_put(&mut self, index: u64) -> Result<()> {
        let item = self.top()?.clone();
        self.memo.insert(index, item);
        Ok(())
    }

    // Containers.

    fn append(&mut self, items: Vec<Item>) -> Result<()> {
        match self.top()? {
            Item::List(list) => list.borrow_mut().extend(items),
            Item::Object(object) => object.borrow_mut().list_items.extend(items),
            other => {
                let found = other.type_name();
                return Err(self.invalid(format!("cannot append to a {found}")));
            }
        }
        Ok(())
    }

    fn set_items(&mut self, target: &Item, items: Vec<Item>) -> Result<()> {
        if !items.len().is_multiple_of(2) {
            return Err(self.invalid("odd number of items for key-value pairs"));
        }
        let mut pairs = Vec::with_capacity(items.len() / 2);
        let mut items = items.into_iter();
        while let (Some(key), Some(value)) = (items.next(), items.next()) {
            pairs.push((self.hash_key(&key, 0)?, key, value));
        }
        match target {
            Item::Dict(dict) => {
                let mut dict = dict.borrow_mut();
                for (hash, key, value) in pairs {
                    dict.insert(hash, key, value);
                }
            }
            Item::Object(object) => {
                let mut object = object.borrow_mut();
                for (hash, key, value) in pairs {
                    object.dict_items.insert(hash, key, value);
                }
            }
            other => {
                let found = other.type_name();
                return Err(self.invalid(format!("cannot set items on a {found}")));
            }
        }
        Ok(())
    }

    fn add_to_set(&mut self, set: &Seq, items: Vec<Item>) -> Result<()> {
        let mut seen = HashSet::new();
        for existing in set.borrow().iter() {
            seen.insert(self.hash_key(existing, 0)?);
        }
        for item in items {
            if seen.insert(self.hash_key(&item, 0)?) {
                set.borrow_mut().push(item);
            }
        }
        Ok(())
    }

    fn hash_key(&self, item: &Item, depth: usize) -> Result<HashKey> {
        if depth > MAX_DEPTH {
            return Err(PickleError::TooDeep);
        }
        let key = match item {
            Item::Leaf(Value::None) => HashKey::None,
            Item::Leaf(Value::Bool(flag)) => HashKey::Int(i64::from(*flag)),
            Item::Leaf(Value::Int(number)) => HashKey::Int(*number),
            Item::Leaf(Value::BigInt(bytes)) => HashKey::BigInt(bytes.clone()),
            Item::Leaf(Value::Float(number)) => float_key(*number),
            Item::Leaf(Value::Str(text)) => HashKey::Str(text.clone()),
            Item::Leaf(Value::Bytes(bytes)) => HashKey::Bytes(bytes.clone()),
            Item::Leaf(Value::Global(global)) => HashKey::Global(global.clone()),
            Item::Tuple(seq) => {
                let mut keys = Vec::new();
                for child in seq.borrow().iter() {
                    keys.push(self.hash_key(child, depth + 1)?);
                }
                HashKey::Tuple(keys)
            }
            other => {
                let found = other.type_name();
                return Err(self.invalid(format!("a {found} cannot be a dict key or set item")));
            }
        };
        Ok(key)
    }

    fn build(&mut self, target: &Item, state: Item) -> Result<()> {
        match target {
            Item::Object(object) => object.borrow_mut().state = Some(state),
            // OrderedDict state contains instance attributes, not items. torch keeps module
            // versions there (`_metadata`), which loading weights does not need.
            Item::Dict(_) => {}
            other => {
                let found = other.type_name();
                return Err(self.invalid(format!("cannot set the state of a {found}")));
            }
        }
        Ok(())
    }

    // Globals and calls.

    fn resolve_global(&self, module: String, name: String) -> Result<Global> {
        if self.allow.is_allowed(&module, &name) {
            Ok(Global { module, name })
        } else {
            Err(PickleError::GlobalNotAllowed { module, name })
        }
    }

    /// Applies an allowed global to arguments without running any Python.
    fn call(&mut self, callable: &Global, args: Vec<Item>, depth: usize) -> Result<Item> {
        if depth > MAX_DEPTH {
            return Err(PickleError::TooDeep);
        }
        let arguments_error = |message: String| PickleError::InvalidArguments {
            callable: callable.to_string(),
            message,
        };
        let builtin = self
            .allow
            .resolve(&callable.module, &callable.name)
            .ok_or_else(|| PickleError::GlobalNotAllowed {
                module: callable.module.clone(),
                name: callable.name.clone(),
            })?;
        match builtin {
            Builtin::OrderedDict => self.call_ordered_dict(args).map_err(arguments_error),
            Builtin::Set => {
                let items = match args.as_slice() {
                    [] => Vec::new(),
                    [Item::Tuple(seq) | Item::List(seq) | Item::Set(seq)] => seq.borrow().clone(),
                    _ => return Err(arguments_error("expected one list, tuple or set".into())),
                };
                self.new_set(items)
            }
            Builtin::Bytearray => match args.as_slice() {
                [] => Ok(Item::Leaf(Value::Bytes(Vec::new()))),
                [Item::Leaf(Value::Bytes(bytes))] => Ok(Item::Leaf(Value::Bytes(bytes.clone()))),
                [
                    Item::Leaf(Value::Str(text)),
                    Item::Leaf(Value::Str(encoding)),
                ] => encode_latin1(text, encoding).map_err(arguments_error),
                _ => Err(arguments_error(
                    "expected bytes, or a str and its encoding".into(),
                )),
            },
            Builtin::CodecsEncode => match args.as_slice() {
                [
                    Item::Leaf(Value::Str(text)),
                    Item::Leaf(Value::Str(encoding)),
                ] => encode_latin1(text, encoding).map_err(arguments_error),
                _ => Err(arguments_error("expected a str and an encoding".into())),
            },
            Builtin::RebuildTensor | Builtin::RebuildTensorV2 => {
                let tensor = rebuild_tensor(&args).map_err(arguments_error)?;
                Ok(Item::Leaf(Value::Tensor(Box::new(tensor))))
            }
            Builtin::RebuildParameter | Builtin::RebuildParameterWithState => {
                let expected = if builtin == Builtin::RebuildParameter {
                    3
                } else {
                    4
                };
                match args.as_slice() {
                    [Item::Leaf(Value::Tensor(data)), requires_grad, ..]
                        if args.len() == expected =>
                    {
                        let mut tensor = data.clone();
                        tensor.requires_grad = item_bool(requires_grad)
                            .ok_or_else(|| arguments_error("requires_grad is no bool".into()))?;
                        Ok(Item::Leaf(Value::Tensor(tensor)))
                    }
                    _ => Err(arguments_error(format!(
                        "expected a tensor and {} more arguments",
                        expected - 1
                    ))),
                }
            }
            Builtin::RebuildFromTypeV2 => match args.as_slice() {
                // (function, new_type, args, state): new_type and state carry Python
                // subclass details that a plain tensor does not need.
                [
                    Item::Leaf(Value::Global(function)),
                    Item::Leaf(Value::Global(_)),
                    Item::Tuple(inner),
                    _,
                ] => {
                    let inner = inner.borrow().clone();
                    self.call(function, inner, depth + 1)
                }
                _ => Err(arguments_error(
                    "expected a function, a type, an argument tuple and a state".into(),
                )),
            },
            Builtin::Size => match args.as_slice() {
                [Item::Tuple(seq) | Item::List(seq)] => {
                    let items = seq.borrow().clone();
                    Ok(self.new_seq(Item::Tuple, items))
                }
                _ => Err(arguments_error("expected one tuple of sizes".into())),
            },
            Builtin::Opaque => {
                let object = Rc::new(RefCell::new(ObjectItem {
                    class: callable.clone(),
                    args,
                    state: None,
                    list_items: Vec::new(),
                    dict_items: DictItem::default(),
                }));
                self.registered
                    .push(Registered::Object(Rc::downgrade(&object)));
                Ok(Item::Object(object))
            }
            Builtin::Constant => Err(arguments_error("this global cannot be called".into())),
        }
    }

    fn call_ordered_dict(&mut self, args: Vec<Item>) -> std::result::Result<Item, String> {
        let dict = self.new_dict();
        let items = match args.as_slice() {
            [] => Vec::new(),
            // Python 2 pickles pass the items as a list of [key, value] pairs.
            [Item::List(pairs) | Item::Tuple(pairs)] => {
                let mut items = Vec::new();
                for pair in pairs.borrow().iter() {
                    match pair {
                        Item::List(kv) | Item::Tuple(kv) if kv.borrow().len() == 2 => {
                            items.extend(kv.borrow().iter().cloned());
                        }
                        _ => return Err("expected [key, value] pairs".into()),
                    }
                }
                items
            }
            [Item::Dict(source)] => source
                .borrow()
                .entries
                .iter()
                .flat_map(|(k, v)| [k.clone(), v.clone()])
                .collect(),
            _ => return Err("expected no arguments, a list of pairs or a dict".into()),
        };
        self.set_items(&dict, items).map_err(|e| e.to_string())?;
        Ok(dict)
    }

    // Conversion to owned values.

    fn materialize(&mut self, item: &Item, depth: usize) -> Result<Value> {
        if depth > MAX_DEPTH {
            return Err(PickleError::TooDeep);
        }
        if self.values_left == 0 {
            return Err(PickleError::TooLarge {
                limit: self.value_limit,
            });
        }
        self.values_left -= 1;
        let value = match item {
            Item::Leaf(value) => value.clone(),
            Item::Tuple(seq) => Value::Tuple(self.materialize_seq(seq, depth)?),
            Item::List(seq) => Value::List(self.materialize_seq(seq, depth)?),
            Item::Set(seq) => Value::Set(self.materialize_seq(seq, depth)?),
            Item::Dict(dict) => Value::Dict(self.materialize_dict(&dict.borrow(), depth)?),
            Item::Object(object) => {
                let object = object.borrow();
                let mut args = Vec::with_capacity(object.args.len());
                for arg in &object.args {
                    args.push(self.materialize(arg, depth + 1)?);
                }
                let state = match &object.state {
                    Some(state) => Some(self.materialize(state, depth + 1)?),
                    None => None,
                };
                let mut list_items = Vec::with_capacity(object.list_items.len());
                for entry in &object.list_items {
                    list_items.push(self.materialize(entry, depth + 1)?);
                }
                let dict_items = self.materialize_dict(&object.dict_items, depth)?;
                Value::Object(Box::new(Object {
                    class: object.class.clone(),
                    args,
                    state,
                    list_items,
                    dict_items,
                }))
            }
        };
        Ok(value)
    }

    fn materialize_seq(&mut self, seq: &Seq, depth: usize) -> Result<Vec<Value>> {
        let seq = seq.borrow();
        let mut values = Vec::with_capacity(seq.len());
        for child in seq.iter() {
            values.push(self.materialize(child, depth + 1)?);
        }
        Ok(values)
    }

    fn materialize_dict(&mut self, dict: &DictItem, depth: usize) -> Result<Vec<(Value, Value)>> {
        let mut entries = Vec::with_capacity(dict.entries.len());
        for (key, value) in &dict.entries {
            let key = self.materialize(key, depth + 1)?;
            let value = self.materialize(value, depth + 1)?;
            entries.push((key, value));
        }
        Ok(entries)
    }
}

fn float_key(number: f64) -> HashKey {
    // Python compares 1.0 == 1 and hashes them alike, so integral floats share int keys.
    if number.fract() == 0.0 && number.abs() < 9.2e18 {
        HashKey::Int(number as i64)
    } else {
        HashKey::Float(number.to_bits())
    }
}

/// Decodes a LONG1/LONG4 argument: little-endian two's complement of any length.
fn decode_long(bytes: &[u8]) -> Value {
    let negative = bytes.last().is_some_and(|b| b & 0x80 != 0);
    let fill = if negative { 0xff } else { 0 };
    // Strip sign-extension bytes that do not change the value.
    let mut len = bytes.len();
    while len > 1 && bytes[len - 1] == fill && (bytes[len - 2] & 0x80 != 0) == negative {
        len -= 1;
    }
    let bytes = &bytes[..len];
    if bytes.len() <= 8 {
        let mut buffer = [fill; 8];
        buffer[..bytes.len()].copy_from_slice(bytes);
        Value::Int(i64::from_le_bytes(buffer))
    } else {
        Value::BigInt(bytes.to_vec())
    }
}

/// Converts a Python 2 `str` the way `torch.load` does with its default `encoding="utf-8"`.
/// Bytes that are not valid UTF-8 stay bytes where Python would raise.
fn python2_string(bytes: Vec<u8>) -> Value {
    match String::from_utf8(bytes) {
        Ok(text) => Value::Str(text),
        Err(error) => Value::Bytes(error.into_bytes()),
    }
}

fn encode_latin1(text: &str, encoding: &str) -> std::result::Result<Item, String> {
    if !matches!(
        encoding.to_ascii_lowercase().as_str(),
        "latin1" | "latin-1" | "iso-8859-1" | "iso8859-1"
    ) {
        return Err(format!("encoding {encoding:?} is not supported"));
    }
    let bytes = text
        .chars()
        .map(|c| u8::try_from(u32::from(c)).map_err(|_| format!("{c:?} is not in latin-1")))
        .collect::<std::result::Result<Vec<u8>, String>>()?;
    Ok(Item::Leaf(Value::Bytes(bytes)))
}

/// Decodes the backslash escapes of a Python 2 string literal, like `codecs.escape_decode`.
fn unescape_bytes(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        let byte = input[i];
        i += 1;
        if byte != b'\\' || i == input.len() {
            out.push(byte);
            continue;
        }
        let escape = input[i];
        i += 1;
        match escape {
            b'\n' => {}
            b'\\' | b'\'' | b'"' => out.push(escape),
            b'a' => out.push(0x07),
            b'b' => out.push(0x08),
            b'f' => out.push(0x0c),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(0x0b),
            b'0'..=b'7' => {
                let mut value = u32::from(escape - b'0');
                let mut digits = 1;
                while digits < 3 && i < input.len() && (b'0'..=b'7').contains(&input[i]) {
                    value = value * 8 + u32::from(input[i] - b'0');
                    i += 1;
                    digits += 1;
                }
                out.push((value & 0xff) as u8);
            }
            b'x' if i + 2 <= input.len() => match hex_value(&input[i..i + 2]) {
                Some(value) => {
                    out.push(value as u8);
                    i += 2;
                }
                None => out.extend_from_slice(b"\\x"),
            },
            other => out.extend_from_slice(&[b'\\', other]),
        }
    }
    out
}

/// Decodes Python's `raw-unicode-escape`: Latin-1 bytes with `\uXXXX` and `\UXXXXXXXX`.
fn decode_raw_unicode_escape(input: &[u8]) -> Option<String> {
    let mut out = String::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        if input[i] != b'\\' {
            out.push(char::from(input[i]));
            i += 1;
            continue;
        }
        let run = input[i..].iter().take_while(|&&b| b == b'\\').count();
        let escape = input.get(i + run).copied();
        // Only an odd run of backslashes before `u` or `U` starts an escape.
        let digits = match escape {
            Some(b'u') if run % 2 == 1 => 4,
            Some(b'U') if run % 2 == 1 => 8,
            _ => 0,
        };
        if digits == 0 {
            out.extend(std::iter::repeat_n('\\', run));
            i += run;
            continue;
        }
        out.extend(std::iter::repeat_n('\\', run - 1));
        let start = i + run + 1;
        let hex = input.get(start..start + digits)?;
        out.push(char::from_u32(hex_value(hex)?)?);
        i = start + digits;
    }
    Some(out)
}

fn hex_value(digits: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(digits).ok()?;
    if !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(text, 16).ok()
}

fn item_bool(item: &Item) -> Option<bool> {
    match item {
        Item::Leaf(Value::Bool(flag)) => Some(*flag),
        Item::Leaf(Value::Int(number)) => Some(*number != 0),
        _ => None,
    }
}

fn item_usize(item: &Item) -> Option<usize> {
    match item {
        Item::Leaf(Value::Int(number)) => usize::try_from(*number).ok(),
        _ => None,
    }
}

fn item_usizes(item: &Item) -> Option<Vec<usize>> {
    match item {
        Item::Tuple(seq) | Item::List(seq) => seq.borrow().iter().map(item_usize).collect(),
        _ => None,
    }
}

/// Builds a tensor from the arguments of `_rebuild_tensor` (storage, storage_offset,
/// size, stride) or `_rebuild_tensor_v2` (the same, then requires_grad,
/// backward_hooks and an optional metadata dict).
fn rebuild_tensor(args: &[Item]) -> std::result::Result<TensorRef, String> {
    if !matches!(args.len(), 4 | 6 | 7) {
        return Err(format!(
            "expected 4, 6 or 7 arguments, found {}",
            args.len()
        ));
    }
    let Item::Leaf(Value::Storage(storage)) = &args[0] else {
        return Err(format!("expected a storage, found {}", args[0].type_name()));
    };
    let storage_offset = item_usize(&args[1]).ok_or("the storage offset is no non-negative int")?;
    let shape = item_usizes(&args[2]).ok_or("the size is no tuple of non-negative ints")?;
    let stride = item_usizes(&args[3]).ok_or("the stride is no tuple of non-negative ints")?;
    if shape.len() != stride.len() {
        return Err(format!(
            "size has {} dimensions but stride has {}",
            shape.len(),
            stride.len()
        ));
    }
    let requires_grad = match args.get(4) {
        Some(item) => item_bool(item).ok_or("requires_grad is no bool")?,
        None => false,
    };
    Ok(TensorRef {
        storage: (**storage).clone(),
        storage_offset,
        shape,
        stride,
        requires_grad,
    })
}

/// Parses a torch storage persistent id: `('storage', StorageClass, key, location,
/// numel)`, which legacy checkpoints follow with a view descriptor: `None` or
/// `(view_key, offset, view_numel)`.
fn storage_from_persistent_id(pid: &Value) -> Result<StorageRef> {
    let invalid = |message: &str| PickleError::InvalidPersistentId(message.to_owned());
    let Some(fields) = pid.as_sequence() else {
        return Err(PickleError::InvalidPersistentId(format!(
            "expected a tuple, found {}",
            pid.type_name()
        )));
    };
    let (typename, class, key, location, numel, view) = match fields {
        [typename, class, key, location, numel] => (typename, class, key, location, numel, None),
        [typename, class, key, location, numel, view] => {
            (typename, class, key, location, numel, Some(view))
        }
        _ => {
            return Err(PickleError::InvalidPersistentId(format!(
                "expected 5 or 6 fields, found {}",
                fields.len()
            )));
        }
    };
    match typename.as_str() {
        Some("storage") => {}
        Some(other) => {
            return Err(PickleError::InvalidPersistentId(format!(
                "kind {other:?} is not supported, only 'storage'"
            )));
        }
        None => return Err(invalid("the first field is no str")),
    }
    let dtype = match class {
        Value::Global(global) if global.module == "torch" => {
            DType::from_storage_class(&global.name)
        }
        _ => None,
    }
    .ok_or_else(|| invalid("the second field is no torch storage class"))?;
    let key = match key {
        Value::Str(text) => text.clone(),
        Value::Int(number) => number.to_string(),
        _ => return Err(invalid("the key is no str")),
    };
    let location = location
        .as_str()
        .ok_or_else(|| invalid("the location is no str"))?
        .to_owned();
    let numel = numel
        .as_i64()
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| invalid("the element count is no non-negative int"))?;
    let view = match view {
        None | Some(Value::None) => None,
        Some(view) => {
            let parts = view.as_sequence().unwrap_or(&[]);
            let [_, offset, view_numel] = parts else {
                return Err(invalid("the view is no (key, offset, numel) tuple"));
            };
            let as_usize = |v: &Value| v.as_i64().and_then(|n| usize::try_from(n).ok());
            let (Some(offset), Some(view_numel)) = (as_usize(offset), as_usize(view_numel)) else {
                return Err(invalid("the view offset or size is no non-negative int"));
            };
            if offset.checked_add(view_numel).is_none_or(|end| end > numel) {
                return Err(invalid("the view extends past the end of its storage"));
            }
            Some(StorageView {
                offset,
                numel: view_numel,
            })
        }
    };
    Ok(StorageRef {
        key,
        dtype,
        location,
        numel,
        view,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `{'a': [1, 2.5, None, True], 'b': ('x', b'y')}` at protocol 2, where Python 3
    /// writes bytes as a call of `_codecs.encode`.
    const CONTAINERS: &[u8] = b"\x80\x02}q\x00(X\x01\x00\x00\x00a]q\x01(K\x01G@\x04\x00\x00\x00\x00\x00\x00N\x88eX\x01\x00\x00\x00bX\x01\x00\x00\x00xc_codecs\nencode\nX\x01\x00\x00\x00yX\x06\x00\x00\x00latin1\x86R\x86u.";

    /// `_rebuild_tensor_v2` of a 2x3 float tensor with stride (1, 2), as `torch.save`
    /// writes a transposed view, with the storage as persistent id `('storage',
    /// torch.FloatStorage, '0', 'cpu', 6)`.
    const STRIDED_TENSOR: &[u8] = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x06tQK\x00K\x02K\x03\x86K\x01K\x02\x86\x89ccollections\nOrderedDict\n)RtR.";

    fn load_value(data: &[u8]) -> Result<Value> {
        load(data, &AllowList::default()).map(|(value, _)| value)
    }

    fn string(text: &str) -> Value {
        Value::Str(text.to_owned())
    }

    #[test]
    fn protocol2_containers() {
        let value = load_value(CONTAINERS).unwrap();
        let expected = Value::Dict(vec![
            (
                string("a"),
                Value::List(vec![
                    Value::Int(1),
                    Value::Float(2.5),
                    Value::None,
                    Value::Bool(true),
                ]),
            ),
            (
                string("b"),
                Value::Tuple(vec![string("x"), Value::Bytes(b"y".to_vec())]),
            ),
        ]);
        assert_eq!(value, expected);
    }

    #[test]
    fn load_reports_bytes_read() {
        let mut data = CONTAINERS.to_vec();
        data.extend_from_slice(b"\x80\x02K\x05.");
        let (_, used) = load(&data, &AllowList::default()).unwrap();
        assert_eq!(used, CONTAINERS.len());
        let (second, _) = load(&data[used..], &AllowList::default()).unwrap();
        assert_eq!(second, Value::Int(5));
    }

    #[test]
    fn memo_shares_mutated_list() {
        // outer = [inner, inner], then inner.append(7) through the memo: [[7], [7]].
        let value = load_value(b"\x80\x02]q\x00(]q\x01h\x01eh\x01K\x07a0.").unwrap();
        let inner = Value::List(vec![Value::Int(7)]);
        assert_eq!(value, Value::List(vec![inner.clone(), inner]));
    }

    #[test]
    fn protocol4_frame_and_memoize() {
        // pickle.dumps({'k': ('v', 1)}, protocol=4)
        let data = b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x01k\x94\x8c\x01v\x94K\x01\x86\x94s.";
        let value = load_value(data).unwrap();
        let expected = Value::Dict(vec![(
            string("k"),
            Value::Tuple(vec![string("v"), Value::Int(1)]),
        )]);
        assert_eq!(value, expected);
    }

    #[test]
    fn protocol0_text_opcodes() {
        let data = b"(lp0\nI1\naF2.5\naS'a\\nb'\np1\naVcaf\\u00e9\np2\naI01\nag1\naL-12L\na.";
        let value = load_value(data).unwrap();
        let expected = Value::List(vec![
            Value::Int(1),
            Value::Float(2.5),
            string("a\nb"),
            string("caf\u{e9}"),
            Value::Bool(true),
            string("a\nb"),
            Value::Int(-12),
        ]);
        assert_eq!(value, expected);
    }

    #[test]
    fn long1_values() {
        let data = b"\x80\x02(\x8a\x01\xff\x8a\x00\x8a\x08\xff\xff\xff\xff\xff\xff\xff\x7f\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x80\x00\x8a\x02\xff\x00t.";
        let value = load_value(data).unwrap();
        let items = value.as_sequence().unwrap();
        assert_eq!(items[0], Value::Int(-1));
        assert_eq!(items[1], Value::Int(0));
        assert_eq!(items[2], Value::Int(i64::MAX));
        assert_eq!(items[3].as_i128(), Some(1i128 << 63));
        assert_eq!(items[4], Value::Int(255));
    }

    #[test]
    fn legacy_magic_number() {
        let value = load_value(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.").unwrap();
        assert_eq!(value.as_i128(), Some(0x1950a86a20f9469cfc6c));
    }

    #[test]
    fn duplicate_keys_keep_first_position() {
        // {1: 'a', True: 'b', 1.0: 'c'} is {1: 'c'} in Python.
        let data = b"\x80\x02}(K\x01X\x01\x00\x00\x00a\x88X\x01\x00\x00\x00bG?\xf0\x00\x00\x00\x00\x00\x00X\x01\x00\x00\x00cu.";
        let value = load_value(data).unwrap();
        assert_eq!(value, Value::Dict(vec![(Value::Int(1), string("c"))]));
    }

    #[test]
    fn sets_drop_duplicates() {
        let set = load_value(b"\x80\x04\x8f(K\x01K\x02K\x01\x90.").unwrap();
        assert_eq!(set, Value::Set(vec![Value::Int(1), Value::Int(2)]));
        let frozen = load_value(b"\x80\x04(K\x03K\x03\x91.").unwrap();
        assert_eq!(frozen, Value::Set(vec![Value::Int(3)]));
    }

    #[test]
    fn strided_tensor_reference() {
        let value = load_value(STRIDED_TENSOR).unwrap();
        let tensor = value.as_tensor().expect("a tensor");
        assert_eq!(tensor.shape, vec![2, 3]);
        assert_eq!(tensor.stride, vec![1, 2]);
        assert_eq!(tensor.storage_offset, 0);
        assert!(!tensor.requires_grad);
        let expected_storage = StorageRef {
            key: "0".to_owned(),
            dtype: DType::F32,
            location: "cpu".to_owned(),
            numel: 6,
            view: None,
        };
        assert_eq!(tensor.storage, expected_storage);
    }

    #[test]
    fn rebuild_parameter_sets_requires_grad() {
        // _rebuild_parameter(<STRIDED_TENSOR>, True, OrderedDict())
        let mut data = b"\x80\x02ctorch._utils\n_rebuild_parameter\n(".to_vec();
        data.extend_from_slice(&STRIDED_TENSOR[2..STRIDED_TENSOR.len() - 1]);
        data.extend_from_slice(b"\x88ccollections\nOrderedDict\n)RtR.");
        let value = load_value(&data).unwrap();
        let tensor = value.as_tensor().expect("a tensor");
        assert!(tensor.requires_grad);
        assert_eq!(tensor.shape, vec![2, 3]);
    }

    #[test]
    fn legacy_storage_view() {
        // Persistent id ('storage', torch.HalfStorage, '7', 'cuda:0', 10, ('8', 4, 3)).
        let data = b"\x80\x02(X\x07\x00\x00\x00storagectorch\nHalfStorage\nX\x01\x00\x00\x007X\x06\x00\x00\x00cuda:0K\x0aX\x01\x00\x00\x008K\x04K\x03\x87tQ.";
        let value = load_value(data).unwrap();
        let Value::Storage(storage) = value else {
            panic!("expected a storage, found {value:?}");
        };
        assert_eq!(storage.dtype, DType::F16);
        assert_eq!(storage.location, "cuda:0");
        assert_eq!(storage.window(), (4, 3));
    }

    #[test]
    fn storage_view_past_end_is_rejected() {
        let data = b"\x80\x02(X\x07\x00\x00\x00storagectorch\nHalfStorage\nX\x01\x00\x00\x007X\x03\x00\x00\x00cpuK\x0aX\x01\x00\x00\x008K\x08K\x03\x87tQ.";
        let error = load_value(data).unwrap_err();
        assert!(
            matches!(error, PickleError::InvalidPersistentId(_)),
            "{error}"
        );
    }

    #[test]
    fn ordered_dict_build_state_is_ignored() {
        // OrderedDict() with one item and torch's `_metadata` attribute set by BUILD.
        let data = b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01X\x01\x00\x00\x00kK\x01s}X\x09\x00\x00\x00_metadatah\x00)Rsb.";
        let value = load_value(data).unwrap();
        assert_eq!(value, Value::Dict(vec![(string("k"), Value::Int(1))]));
    }

    #[test]
    fn torch_device_is_opaque_object() {
        let value = load_value(b"\x80\x02ctorch\ndevice\nX\x03\x00\x00\x00cpu\x85R.").unwrap();
        let Value::Object(object) = value else {
            panic!("expected an object, found {value:?}");
        };
        assert_eq!(object.class.to_string(), "torch.device");
        assert_eq!(object.args, vec![string("cpu")]);
    }

    #[test]
    fn dtype_global_is_value() {
        let value = load_value(b"\x80\x02ctorch\nfloat32\n.").unwrap();
        let expected = Global {
            module: "torch".to_owned(),
            name: "float32".to_owned(),
        };
        assert_eq!(value, Value::Global(expected));
    }

    #[test]
    fn os_system_global_is_rejected() {
        let data = b"\x80\x02cos\nsystem\nq\x00X\x02\x00\x00\x00lsq\x01\x85R.";
        let error = load_value(data).unwrap_err();
        assert_eq!(error.to_string(), "pickle global os.system is not allowed");
    }

    #[test]
    fn stack_global_is_checked() {
        // Protocol 4 names the function through STACK_GLOBAL.
        let data = b"\x80\x04\x8c\x05posix\x94\x8c\x06system\x94\x93\x94\x8c\x02ls\x94\x85R.";
        let error = load_value(data).unwrap_err();
        assert_eq!(
            error.to_string(),
            "pickle global posix.system is not allowed"
        );
    }

    #[test]
    fn builtins_eval_is_rejected() {
        let data = b"c__builtin__\neval\n(S'1'\ntR.";
        let error = load_value(data).unwrap_err();
        assert!(
            matches!(&error, PickleError::GlobalNotAllowed { module, name }
                if module == "__builtin__" && name == "eval"),
            "{error}"
        );
    }

    #[test]
    fn inst_opcode_is_checked() {
        let error = load_value(b"(S'ls'\nios\nsystem\n.").unwrap_err();
        assert_eq!(error.to_string(), "pickle global os.system is not allowed");
    }

    #[test]
    fn opaque_class_needs_allow_list() {
        let data = b"\x80\x02cpathlib\nPosixPath\nX\x04\x00\x00\x00/tmp\x85R.";
        let error = load_value(data).unwrap_err();
        assert_eq!(
            error.to_string(),
            "pickle global pathlib.PosixPath is not allowed"
        );

        let allow = AllowList::default().with_opaque("pathlib", "PosixPath");
        let (value, _) = load(data, &allow).unwrap();
        let Value::Object(object) = value else {
            panic!("expected an object, found {value:?}");
        };
        assert_eq!(object.args, vec![string("/tmp")]);
    }

    #[test]
    fn constant_global_cannot_be_called() {
        let error = load_value(b"\x80\x02ctorch\nFloatStorage\n)R.").unwrap_err();
        assert!(
            matches!(error, PickleError::InvalidArguments { .. }),
            "{error}"
        );
    }

    #[test]
    fn every_truncation_is_an_error() {
        for data in [CONTAINERS, STRIDED_TENSOR] {
            for len in 0..data.len() {
                let error = load_value(&data[..len]).unwrap_err();
                assert!(
                    matches!(error, PickleError::Truncated { .. }),
                    "prefix of {len} bytes: {error}"
                );
            }
        }
    }

    #[test]
    fn unknown_opcode_is_rejected() {
        let error = load_value(b"\x80\x02\xff.").unwrap_err();
        assert!(
            matches!(
                error,
                PickleError::UnknownOpcode {
                    opcode: 0xff,
                    offset: 2
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn protocol_6_is_rejected() {
        let error = load_value(b"\x80\x06N.").unwrap_err();
        assert!(
            matches!(error, PickleError::UnsupportedProtocol(6)),
            "{error}"
        );
    }

    #[test]
    fn stack_underflow_is_rejected() {
        for data in [
            &b"\x80\x02."[..],
            b"\x80\x02a.",
            b"\x80\x02N\x86.",
            b"\x80\x02e.",
        ] {
            let error = load_value(data).unwrap_err();
            assert!(
                matches!(error, PickleError::Invalid { .. }),
                "{data:?}: {error}"
            );
        }
    }

    #[test]
    fn missing_memo_entry_is_rejected() {
        let error = load_value(b"\x80\x02h\x03.").unwrap_err();
        assert!(
            error.to_string().contains("memo entry 3 is missing"),
            "{error}"
        );
    }

    #[test]
    fn huge_length_is_truncation() {
        let error = load_value(b"\x80\x04\x8e\xff\xff\xff\xff\xff\xff\xff\x7f.").unwrap_err();
        assert!(matches!(error, PickleError::Truncated { .. }), "{error}");
    }

    #[test]
    fn self_containing_list_is_rejected() {
        // A list appended to itself through DUP.
        let error = load_value(b"\x80\x02]2a.").unwrap_err();
        assert!(matches!(error, PickleError::TooDeep), "{error}");
    }

    #[test]
    fn deep_nesting_is_rejected() {
        let mut data = b"\x80\x02N".to_vec();
        data.extend(std::iter::repeat_n(TUPLE1, 200_000));
        data.push(STOP);
        let error = load_value(&data).unwrap_err();
        assert!(matches!(error, PickleError::TooDeep), "{error}");
    }

    #[test]
    fn shared_expansion_is_limited() {
        // Each DUP, TUPLE2 pair doubles the tree: 2^60 values from 123 bytes.
        let mut data = b"\x80\x02]".to_vec();
        for _ in 0..60 {
            data.extend_from_slice(&[DUP, TUPLE2]);
        }
        data.push(STOP);
        let error = load_value(&data).unwrap_err();
        assert!(matches!(error, PickleError::TooLarge { .. }), "{error}");
    }

    #[test]
    fn mutated_input_never_panics() {
        // Deterministic xorshift, so a failure reproduces.
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for seed in [CONTAINERS, STRIDED_TENSOR] {
            for _ in 0..5000 {
                let mut data = seed.to_vec();
                for _ in 0..(next() % 4 + 1) {
                    let position = (next() % data.len() as u64) as usize;
                    data[position] = next() as u8;
                }
                let _ = load_value(&data);
            }
        }
    }
}
