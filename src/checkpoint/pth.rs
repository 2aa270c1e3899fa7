//! Import of PyTorch `torch.save` state dicts (zip format) without Python.
//!
//! Since PyTorch 1.6, `torch.save` writes a zip archive with one top folder (its name varies: `archive/`, the file
//! stem, ...) holding
//! - `data.pkl`: the saved object as a pickle (protocol 2 by default), in which every tensor is a call of
//!   `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])` (or `_v3`
//!   with an extra dtype, for dtypes that have no legacy storage class), and every storage is a persistent id
//!   `('storage', storage_type, key, location, numel)`;
//! - `data/<key>`: the raw bytes of each storage;
//! - `byteorder` (`little` or `big`; absent means little) and `version`.
//!
//! This module runs a small pickle virtual machine over `data.pkl` that builds an inert object graph (nothing is
//! ever executed or imported), picks the state dict out of it, and builds the tensors from the storage bytes
//! honouring offsets and strides.
//!
//! Checkpoints are untrusted input, so the reader is as strict as `torch.load(weights_only=True)`:
//! - a pickle may only name the globals that weights need (see [`check_global`]; the list follows
//!   `_get_allowed_globals` in pytorch/pytorch, torch/_weights_only_unpickler.py); any other global, such as
//!   `posix.system`, makes the whole file an error that names it;
//! - a storage may not claim more bytes than the file can hold, and the tensors may not expand (stride-0 or
//!   overlapping views) to much more memory than the file holds; both are checked before anything is allocated.
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::Checkpoint;
use crate::error::{Error, Result};

/// Keys under which training scripts store the model's state dict, in order of preference.
const STATE_DICT_KEYS: [&str; 4] = ["model", "state_dict", "module", "model_state"];
/// A view may always materialise this much, however small its storage (a small `expand`ed tensor).
const VIEW_SLACK_BYTES: u64 = 1 << 20;
/// All tensors together may take at most this many times the file's size (tied weights, views of one buffer).
const EXPANSION_FACTOR: u64 = 4;
/// Deflate cannot expand data by more than this factor, which bounds what a compressed entry can hold.
const DEFLATE_MAX_RATIO: u64 = 1032;
/// Nesting deeper than this is not searched for tensors.
const MAX_DEPTH: usize = 64;
/// The walk over the object graph visits at most this many nodes (guards against exponential DAGs).
const MAX_VISITS: usize = 10_000_000;

/// Loads the tensors of a `torch.save` zip checkpoint onto the CPU.
pub fn load(path: &Path) -> Result<Checkpoint> {
    let bad = |reason: String| Error::checkpoint(path, reason);
    let file = super::open_regular(path)?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut head = [0u8; 512];
    let n = read_prefix(&file, &mut head).map_err(|e| Error::io(path, e))?;
    let head = &head[..n];
    if !head.starts_with(b"PK") {
        return Err(bad(not_zip_reason(head)));
    }
    let mut zip = zip::ZipArchive::new(BufReader::new(file))
        .map_err(|e| bad(format!("corrupt or truncated zip archive ({e}); file has {file_len} bytes")))?;

    let pkl_name = find_data_pkl(&zip).ok_or_else(|| {
        bad("zip archive has no `data.pkl`; not a checkpoint written by torch.save".to_string())
    })?;
    let prefix = pkl_name[..pkl_name.len() - "data.pkl".len()].to_string();
    let is_torchscript = zip.file_names().any(|n| n == format!("{prefix}constants.pkl") || n.starts_with(&format!("{prefix}code/")));

    let big_endian = match read_entry(&mut zip, &format!("{prefix}byteorder"), 64) {
        Ok(Some(b)) => match String::from_utf8_lossy(&b).trim() {
            "little" => false,
            "big" => true,
            other => return Err(bad(format!("unknown byte order `{other}` in {prefix}byteorder"))),
        },
        Ok(None) => false,
        Err(e) => return Err(bad(e)),
    };

    let pkl = read_entry(&mut zip, &pkl_name, u64::MAX)
        .map_err(&bad)?
        .ok_or_else(|| bad(format!("cannot read `{pkl_name}`")))?;
    let mut vm = Unpickler::new(&pkl);
    let root = vm.run().map_err(|e| bad(format!("{pkl_name}: {e}")))?;
    let nodes = vm.nodes;

    let (entries, key) = select_state_dict(&nodes, root).map_err(&bad)?;
    if entries.is_empty() {
        let reason = if is_torchscript {
            "this is a TorchScript archive (torch.jit.save), not a state dict; save `model.state_dict()` with torch.save"
                .to_string()
        } else {
            "the checkpoint contains no tensors".to_string()
        };
        return Err(bad(reason));
    }

    let mut storages = StorageCache {
        zip: &mut zip,
        prefix: &prefix,
        big_endian,
        file_len,
        budget: file_len.saturating_mul(EXPANSION_FACTOR).saturating_add(VIEW_SLACK_BYTES),
        tensors: HashMap::new(),
    };
    let mut tensors = Vec::with_capacity(entries.len());
    for (name, id) in entries {
        let Node::Tensor(desc) = &nodes[id] else { unreachable!("select_state_dict returns tensors only") };
        let t = build_tensor(&nodes, desc, &mut storages).map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
        tensors.push((name, t));
    }

    let mut metadata = BTreeMap::new();
    metadata.insert("source_format".to_string(), "pth".to_string());
    if let Some(k) = key {
        metadata.insert("pth_state_dict_key".to_string(), k.to_string());
    }
    Ok(Checkpoint { tensors, metadata, path: path.to_path_buf() })
}

fn read_prefix(mut f: &File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Whether the first bytes of a file are those of the legacy (pre-1.6, not zip) `torch.save` format: a pickle
/// stream (which starts with the pickled magic number), or the older tar archive.
pub fn is_legacy_torch_save(head: &[u8]) -> bool {
    // PROTO 2, then the magic number 0x1950a86a20f9469cfc6c as a LONG1 of 10 bytes (torch/serialization.py).
    const LEGACY: &[u8] = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19";
    let is_tar = head.len() >= 262 && &head[257..262] == b"ustar";
    // A pickle's PROTO opcode; byte 8 of a safetensors file is the `{` of its header, which a pickle never has.
    let is_pickle = head.len() >= 2 && head[0] == 0x80 && head[1] <= 5 && head.get(8) != Some(&b'{');
    head.starts_with(LEGACY) || is_tar || is_pickle
}

/// Why a file that does not start like a zip archive cannot be read.
fn not_zip_reason(head: &[u8]) -> String {
    if is_legacy_torch_save(head) {
        "legacy torch.save format (not zip), which this reader does not support; re-save it with PyTorch >= 1.6 as \
         torch.save(torch.load(path), path, _use_new_zipfile_serialization=True)"
            .to_string()
    } else if head.is_empty() {
        "empty file, not a zip archive".to_string()
    } else {
        "not a zip archive (torch.save writes zip archives since PyTorch 1.6)".to_string()
    }
}

/// The `data.pkl` closest to the archive's root.
fn find_data_pkl<R: Read + std::io::Seek>(zip: &zip::ZipArchive<R>) -> Option<String> {
    zip.file_names()
        .filter(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
        .min_by_key(|n| (n.matches('/').count(), n.len()))
        .map(str::to_string)
}

/// Reads one entry; `Ok(None)` when there is no such entry. At most `limit` bytes are read.
fn read_entry<R: Read + std::io::Seek>(
    zip: &mut zip::ZipArchive<R>,
    name: &str,
    limit: u64,
) -> std::result::Result<Option<Vec<u8>>, String> {
    let mut f = match zip.by_name(name) {
        Ok(f) => f,
        Err(zip::result::ZipError::FileNotFound) => return Ok(None),
        Err(e) => return Err(format!("cannot read `{name}` in the zip archive: {e}")),
    };
    let mut buf = Vec::with_capacity(f.size().min(limit).min(1 << 30) as usize);
    (&mut f).take(limit).read_to_end(&mut buf).map_err(|e| format!("cannot read `{name}` (truncated or corrupt?): {e}"))?;
    Ok(Some(buf))
}

// ---------------------------------------------------------------------------------------------------------------
// The object graph.

type Id = usize;

// Scalars' values and opaque objects' classes are kept for `Debug` output when investigating a file.
#[allow(dead_code)]
#[derive(Debug, Clone)]
enum Node {
    None,
    Bool(bool),
    Int(i64),
    /// An integer that does not fit in 64 bits; its value is never needed.
    BigInt,
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Id>),
    List(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    Set(Vec<Id>),
    /// A class or function named by GLOBAL / STACK_GLOBAL; never imported.
    Global { module: String, name: String },
    /// The result of calling something we do not model. Items set on it (dict subclasses) are kept.
    Object { class: Id, state: Option<Id>, items: Vec<(Id, Id)> },
    /// A persistent id `('storage', type, key, location, numel)`.
    Storage { type_name: String, key: String, numel: i64 },
    Tensor(TensorDesc),
}

#[derive(Debug, Clone)]
struct TensorDesc {
    storage: Id,
    /// The dtype name (`float16`, ...) of `_rebuild_tensor_v3`; `None`: the storage's type gives it.
    dtype: Option<String>,
    offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
}

type VmResult<T> = std::result::Result<T, String>;

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    nodes: Vec<Node>,
    stack: Vec<Id>,
    marks: Vec<usize>,
    memo: HashMap<u64, Id>,
}

mod op {
    pub const MARK: u8 = b'(';
    pub const STOP: u8 = b'.';
    pub const POP: u8 = b'0';
    pub const POP_MARK: u8 = b'1';
    pub const DUP: u8 = b'2';
    pub const FLOAT: u8 = b'F';
    pub const INT: u8 = b'I';
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const LONG: u8 = b'L';
    pub const BININT2: u8 = b'M';
    pub const NONE: u8 = b'N';
    pub const PERSID: u8 = b'P';
    pub const BINPERSID: u8 = b'Q';
    pub const REDUCE: u8 = b'R';
    pub const STRING: u8 = b'S';
    pub const BINSTRING: u8 = b'T';
    pub const SHORT_BINSTRING: u8 = b'U';
    pub const UNICODE: u8 = b'V';
    pub const BINUNICODE: u8 = b'X';
    pub const APPEND: u8 = b'a';
    pub const BUILD: u8 = b'b';
    pub const GLOBAL: u8 = b'c';
    pub const DICT: u8 = b'd';
    pub const EMPTY_DICT: u8 = b'}';
    pub const APPENDS: u8 = b'e';
    pub const GET: u8 = b'g';
    pub const BINGET: u8 = b'h';
    pub const INST: u8 = b'i';
    pub const LONG_BINGET: u8 = b'j';
    pub const LIST: u8 = b'l';
    pub const EMPTY_LIST: u8 = b']';
    pub const OBJ: u8 = b'o';
    pub const PUT: u8 = b'p';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const SETITEM: u8 = b's';
    pub const TUPLE: u8 = b't';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const SETITEMS: u8 = b'u';
    pub const BINFLOAT: u8 = b'G';
    // protocol 2
    pub const PROTO: u8 = 0x80;
    pub const NEWOBJ: u8 = 0x81;
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const LONG1: u8 = 0x8a;
    pub const LONG4: u8 = 0x8b;
    // protocol 3
    pub const BINBYTES: u8 = b'B';
    pub const SHORT_BINBYTES: u8 = b'C';
    // protocol 4
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE8: u8 = 0x8d;
    pub const BINBYTES8: u8 = 0x8e;
    pub const EMPTY_SET: u8 = 0x8f;
    pub const ADDITEMS: u8 = 0x90;
    pub const FROZENSET: u8 = 0x91;
    pub const NEWOBJ_EX: u8 = 0x92;
    pub const STACK_GLOBAL: u8 = 0x93;
    pub const MEMOIZE: u8 = 0x94;
    pub const FRAME: u8 = 0x95;
    // protocol 5
    pub const BYTEARRAY8: u8 = 0x96;
}

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8]) -> Self {
        Unpickler { data, pos: 0, nodes: Vec::new(), stack: Vec::new(), marks: Vec::new(), memo: HashMap::new() }
    }

    // --- reading

    fn take(&mut self, n: usize) -> VmResult<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len()).ok_or_else(|| {
            format!("truncated pickle: {n} more bytes needed at offset {} of {}", self.pos, self.data.len())
        })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> VmResult<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> VmResult<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> VmResult<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn i32(&mut self) -> VmResult<i32> {
        Ok(i32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> VmResult<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn len_u64(&mut self) -> VmResult<usize> {
        let n = self.u64()?;
        usize::try_from(n).map_err(|_| format!("length {n} out of range"))
    }
    /// A text line without its `\n`.
    fn line(&mut self) -> VmResult<&'a [u8]> {
        let rest = &self.data[self.pos..];
        let n = rest.iter().position(|&b| b == b'\n').ok_or_else(|| "truncated pickle: missing end of line".to_string())?;
        self.pos += n + 1;
        let line = &rest[..n];
        Ok(line.strip_suffix(b"\r").unwrap_or(line))
    }
    fn line_str(&mut self) -> VmResult<String> {
        let l = self.line()?;
        Ok(String::from_utf8_lossy(l).into_owned())
    }

    // --- stack

    fn add(&mut self, node: Node) -> Id {
        self.nodes.push(node);
        self.nodes.len() - 1
    }
    fn push(&mut self, node: Node) {
        let id = self.add(node);
        self.stack.push(id);
    }
    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }
    fn pop(&mut self) -> VmResult<Id> {
        if self.stack.len() <= self.floor() {
            return Err("pickle stack underflow".into());
        }
        Ok(self.stack.pop().expect("checked"))
    }
    fn top(&self) -> VmResult<Id> {
        if self.stack.len() <= self.floor() {
            return Err("pickle stack underflow".into());
        }
        Ok(*self.stack.last().expect("checked"))
    }
    fn pop_mark(&mut self) -> VmResult<Vec<Id>> {
        let m = self.marks.pop().ok_or_else(|| "pickle MARK missing".to_string())?;
        Ok(self.stack.split_off(m.min(self.stack.len())))
    }
    fn memo_get(&self, k: u64) -> VmResult<Id> {
        self.memo.get(&k).copied().ok_or_else(|| format!("pickle memo key {k} is not defined"))
    }

    // --- accessors

    fn as_str(&self, id: Id) -> Option<&str> {
        match &self.nodes[id] {
            Node::Str(s) => Some(s),
            _ => None,
        }
    }
    fn as_int(&self, id: Id) -> Option<i64> {
        match self.nodes[id] {
            Node::Int(i) => Some(i),
            Node::Bool(b) => Some(b as i64),
            _ => None,
        }
    }
    fn as_seq(&self, id: Id) -> Option<&[Id]> {
        match &self.nodes[id] {
            Node::Tuple(v) | Node::List(v) => Some(v),
            _ => None,
        }
    }
    fn as_ints(&self, id: Id) -> Option<Vec<i64>> {
        self.as_seq(id)?.iter().map(|&i| self.as_int(i)).collect()
    }

    // --- execution

    fn run(&mut self) -> VmResult<Id> {
        loop {
            let at = self.pos;
            let code = self.u8().map_err(|_| "truncated pickle: no STOP opcode".to_string())?;
            match code {
                op::PROTO => {
                    let v = self.u8()?;
                    if v > 5 {
                        return Err(format!("unsupported pickle protocol {v}"));
                    }
                }
                op::FRAME => {
                    self.u64()?;
                }
                op::STOP => return self.pop(),
                op::MARK => self.marks.push(self.stack.len()),
                op::POP => {
                    if self.stack.len() > self.floor() {
                        self.stack.pop();
                    } else {
                        self.pop_mark()?;
                    }
                }
                op::POP_MARK => {
                    self.pop_mark()?;
                }
                op::DUP => {
                    let t = self.top()?;
                    self.stack.push(t);
                }

                // scalars
                op::NONE => self.push(Node::None),
                op::NEWTRUE => self.push(Node::Bool(true)),
                op::NEWFALSE => self.push(Node::Bool(false)),
                op::BININT => {
                    let v = self.i32()?;
                    self.push(Node::Int(v as i64));
                }
                op::BININT1 => {
                    let v = self.u8()?;
                    self.push(Node::Int(v as i64));
                }
                op::BININT2 => {
                    let v = self.u16()?;
                    self.push(Node::Int(v as i64));
                }
                op::INT => {
                    let l = self.line_str()?;
                    let node = match l.trim() {
                        "00" => Node::Bool(false),
                        "01" => Node::Bool(true),
                        s => parse_int_text(s)?,
                    };
                    self.push(node);
                }
                op::LONG => {
                    let l = self.line_str()?;
                    let node = parse_int_text(l.trim().trim_end_matches('L'))?;
                    self.push(node);
                }
                op::LONG1 => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    self.push(decode_long(b));
                }
                op::LONG4 => {
                    let n = self.i32()?;
                    let n = usize::try_from(n).map_err(|_| "negative LONG4 length".to_string())?;
                    let b = self.take(n)?;
                    self.push(decode_long(b));
                }
                op::BINFLOAT => {
                    let b = self.take(8)?;
                    self.push(Node::Float(f64::from_be_bytes(b.try_into().expect("8 bytes"))));
                }
                op::FLOAT => {
                    let l = self.line_str()?;
                    let v = l.trim().parse::<f64>().map_err(|_| format!("bad FLOAT `{l}`"))?;
                    self.push(Node::Float(v));
                }

                // strings and bytes
                op::BINUNICODE => {
                    let n = self.u32()? as usize;
                    let b = self.take(n)?;
                    self.push(Node::Str(String::from_utf8_lossy(b).into_owned()));
                }
                op::SHORT_BINUNICODE => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    self.push(Node::Str(String::from_utf8_lossy(b).into_owned()));
                }
                op::BINUNICODE8 => {
                    let n = self.len_u64()?;
                    let b = self.take(n)?;
                    self.push(Node::Str(String::from_utf8_lossy(b).into_owned()));
                }
                op::UNICODE => {
                    let l = self.line()?;
                    self.push(Node::Str(decode_raw_unicode_escape(l)));
                }
                op::BINSTRING => {
                    let n = self.i32()?;
                    let n = usize::try_from(n).map_err(|_| "negative BINSTRING length".to_string())?;
                    let b = self.take(n)?;
                    self.push(Node::Str(latin1(b)));
                }
                op::SHORT_BINSTRING => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    self.push(Node::Str(latin1(b)));
                }
                op::STRING => {
                    let l = self.line()?;
                    let s = decode_string_repr(l)?;
                    self.push(Node::Str(latin1(&s)));
                }
                op::BINBYTES => {
                    let n = self.u32()? as usize;
                    let b = self.take(n)?;
                    self.push(Node::Bytes(b.to_vec()));
                }
                op::SHORT_BINBYTES => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    self.push(Node::Bytes(b.to_vec()));
                }
                op::BINBYTES8 | op::BYTEARRAY8 => {
                    let n = self.len_u64()?;
                    let b = self.take(n)?;
                    self.push(Node::Bytes(b.to_vec()));
                }

                // containers
                op::EMPTY_TUPLE => self.push(Node::Tuple(vec![])),
                op::TUPLE => {
                    let items = self.pop_mark()?;
                    self.push(Node::Tuple(items));
                }
                op::TUPLE1 | op::TUPLE2 | op::TUPLE3 => {
                    let n = (code - op::TUPLE1 + 1) as usize;
                    if self.stack.len() < self.floor() + n {
                        return Err("pickle stack underflow".into());
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push(Node::Tuple(items));
                }
                op::EMPTY_LIST => self.push(Node::List(vec![])),
                op::LIST => {
                    let items = self.pop_mark()?;
                    self.push(Node::List(items));
                }
                op::APPEND => {
                    let v = self.pop()?;
                    let l = self.top()?;
                    self.extend_list(l, vec![v])?;
                }
                op::APPENDS => {
                    let items = self.pop_mark()?;
                    let l = self.top()?;
                    self.extend_list(l, items)?;
                }
                op::EMPTY_DICT => self.push(Node::Dict(vec![])),
                op::DICT => {
                    let items = self.pop_mark()?;
                    let pairs = pairs(&items)?;
                    self.push(Node::Dict(pairs));
                }
                op::SETITEM => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let d = self.top()?;
                    self.extend_dict(d, vec![(k, v)])?;
                }
                op::SETITEMS => {
                    let items = self.pop_mark()?;
                    let pairs = pairs(&items)?;
                    let d = self.top()?;
                    self.extend_dict(d, pairs)?;
                }
                op::EMPTY_SET => self.push(Node::Set(vec![])),
                op::ADDITEMS => {
                    let items = self.pop_mark()?;
                    let s = self.top()?;
                    self.extend_list(s, items)?;
                }
                op::FROZENSET => {
                    let items = self.pop_mark()?;
                    self.push(Node::Set(items));
                }

                // memo
                op::PUT => {
                    let l = self.line_str()?;
                    let k = l.trim().parse::<u64>().map_err(|_| format!("bad PUT index `{l}`"))?;
                    let t = self.top()?;
                    self.memo.insert(k, t);
                }
                op::BINPUT => {
                    let k = self.u8()? as u64;
                    let t = self.top()?;
                    self.memo.insert(k, t);
                }
                op::LONG_BINPUT => {
                    let k = self.u32()? as u64;
                    let t = self.top()?;
                    self.memo.insert(k, t);
                }
                op::MEMOIZE => {
                    let t = self.top()?;
                    self.memo.insert(self.memo.len() as u64, t);
                }
                op::GET => {
                    let l = self.line_str()?;
                    let k = l.trim().parse::<u64>().map_err(|_| format!("bad GET index `{l}`"))?;
                    let id = self.memo_get(k)?;
                    self.stack.push(id);
                }
                op::BINGET => {
                    let k = self.u8()? as u64;
                    let id = self.memo_get(k)?;
                    self.stack.push(id);
                }
                op::LONG_BINGET => {
                    let k = self.u32()? as u64;
                    let id = self.memo_get(k)?;
                    self.stack.push(id);
                }

                // classes, calls, objects
                op::GLOBAL => {
                    let module = self.line_str()?;
                    let name = self.line_str()?;
                    check_global(&module, &name)?;
                    self.push(Node::Global { module, name });
                }
                op::STACK_GLOBAL => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Some(module), Some(name)) = (self.as_str(module), self.as_str(name)) else {
                        return Err("STACK_GLOBAL needs two strings".into());
                    };
                    check_global(module, name)?;
                    let node = Node::Global { module: module.to_string(), name: name.to_string() };
                    self.push(node);
                }
                op::REDUCE => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let node = self.call(func, args, 0)?;
                    self.push(node);
                }
                op::NEWOBJ => {
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let node = self.call(cls, args, 0)?;
                    self.push(node);
                }
                op::NEWOBJ_EX => {
                    let _kwargs = self.pop()?;
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let node = self.call(cls, args, 0)?;
                    self.push(node);
                }
                op::INST => {
                    let module = self.line_str()?;
                    let name = self.line_str()?;
                    check_global(&module, &name)?;
                    let items = self.pop_mark()?;
                    let cls = self.add(Node::Global { module, name });
                    let args = self.add(Node::Tuple(items));
                    let node = self.call(cls, args, 0)?;
                    self.push(node);
                }
                op::OBJ => {
                    let mut items = self.pop_mark()?;
                    if items.is_empty() {
                        return Err("OBJ without a class".into());
                    }
                    let cls = items.remove(0);
                    let args = self.add(Node::Tuple(items));
                    let node = self.call(cls, args, 0)?;
                    self.push(node);
                }
                op::BUILD => {
                    let state = self.pop()?;
                    let target = self.top()?;
                    // Only opaque objects keep a state; a dict's state holds attributes (OrderedDict's `_metadata`
                    // in state dicts), not items, and tensors carry nothing we need in theirs.
                    if let Node::Object { state: s, .. } = &mut self.nodes[target] {
                        *s = Some(state);
                    }
                }
                op::BINPERSID => {
                    let pid = self.pop()?;
                    let node = self.persistent_load(pid)?;
                    self.push(node);
                }
                op::PERSID => {
                    let l = self.line_str()?;
                    return Err(format!("unsupported text persistent id `{l}` (not written by torch.save)"));
                }
                _ => {
                    return Err(format!("unsupported pickle opcode 0x{code:02x} at offset {at}"));
                }
            }
        }
    }

    fn extend_list(&mut self, target: Id, items: Vec<Id>) -> VmResult<()> {
        match &mut self.nodes[target] {
            Node::List(v) | Node::Set(v) => v.extend(items),
            Node::Object { .. } => {} // list subclasses and the like: contents not needed
            other => return Err(format!("APPEND on a {} (not a list)", kind_name(other))),
        }
        Ok(())
    }

    fn extend_dict(&mut self, target: Id, pairs: Vec<(Id, Id)>) -> VmResult<()> {
        match &mut self.nodes[target] {
            Node::Dict(v) => v.extend(pairs),
            Node::Object { items, .. } => items.extend(pairs),
            other => return Err(format!("SETITEM on a {} (not a dict)", kind_name(other))),
        }
        Ok(())
    }

    fn persistent_load(&mut self, pid: Id) -> VmResult<Node> {
        let items = self.as_seq(pid).ok_or_else(|| "persistent id is not a tuple".to_string())?.to_vec();
        match items.first().and_then(|&i| self.as_str(i)) {
            Some("storage") if items.len() >= 5 => {
                let type_name = match &self.nodes[items[1]] {
                    Node::Global { name, .. } => name.clone(),
                    Node::Str(s) => s.clone(),
                    _ => return Err("storage type in persistent id is not a class".into()),
                };
                let key = match &self.nodes[items[2]] {
                    Node::Str(s) => s.clone(),
                    Node::Int(i) => i.to_string(),
                    _ => return Err("storage key in persistent id is not a string".into()),
                };
                let numel = self.as_int(items[4]).ok_or_else(|| "storage size in persistent id is not an integer".to_string())?;
                Ok(Node::Storage { type_name, key, numel })
            }
            Some(other) => Err(format!("unsupported persistent id type `{other}`")),
            None => Err("malformed persistent id".into()),
        }
    }

    /// What calling `func(*args)` (REDUCE) or `cls.__new__(cls, *args)` (NEWOBJ) stands for. Only functions that
    /// build tensors and a few containers are understood; anything else becomes an opaque object.
    fn call(&mut self, func: Id, args: Id, depth: usize) -> VmResult<Node> {
        let opaque = Node::Object { class: func, state: None, items: vec![] };
        let (module, name) = match &self.nodes[func] {
            Node::Global { module, name } => (module.clone(), name.clone()),
            _ => return Ok(opaque),
        };
        let Some(a) = self.as_seq(args).map(<[Id]>::to_vec) else { return Ok(opaque) };
        let builtin = module == "builtins" || module == "__builtin__";
        let node = match (module.as_str(), name.as_str()) {
            ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor" | "_rebuild_tensor_v3") => {
                let v3 = name == "_rebuild_tensor_v3";
                if a.len() < if v3 { 7 } else { 4 } {
                    return Err(format!("{name} called with {} arguments", a.len()));
                }
                if !matches!(self.nodes[a[0]], Node::Storage { .. }) {
                    return Err(format!("{name}: first argument is not a storage"));
                }
                let offset = self.as_int(a[1]).ok_or_else(|| format!("{name}: storage offset is not an integer"))?;
                let size = self.as_ints(a[2]).ok_or_else(|| format!("{name}: size is not a tuple of integers"))?;
                let stride = self.as_ints(a[3]).ok_or_else(|| format!("{name}: stride is not a tuple of integers"))?;
                let dtype = if v3 {
                    match &self.nodes[a[6]] {
                        Node::Global { name, .. } => Some(name.clone()),
                        _ => return Err(format!("{name}: dtype is not a torch dtype")),
                    }
                } else {
                    None
                };
                Node::Tensor(TensorDesc { storage: a[0], dtype, offset, size, stride })
            }
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") if !a.is_empty() => {
                self.nodes[a[0]].clone()
            }
            ("torch._tensor" | "torch._utils", "_rebuild_from_type_v2" | "_rebuild_from_type") if a.len() >= 3 => {
                // Tensor subclasses: (func, type, args, state); the tensor is func(*args).
                if depth > 4 {
                    return Err("tensor subclass rebuild nested too deeply".into());
                }
                self.call(a[0], a[2], depth + 1)?
            }
            ("collections", "OrderedDict") | (_, "dict") if builtin || module == "collections" => {
                let mut pairs = vec![];
                if let Some(&first) = a.first() {
                    match self.nodes[first].clone() {
                        Node::Dict(p) => pairs = p,
                        Node::List(v) | Node::Tuple(v) => {
                            for item in v {
                                match self.as_seq(item) {
                                    Some([k, v]) => pairs.push((*k, *v)),
                                    _ => return Ok(opaque),
                                }
                            }
                        }
                        _ => return Ok(opaque),
                    }
                }
                Node::Dict(pairs)
            }
            ("torch", "Size") => match a.first().and_then(|&i| self.as_seq(i)) {
                Some(items) => Node::Tuple(items.to_vec()),
                None => opaque,
            },
            ("_codecs", "encode") if !a.is_empty() => match self.as_str(a[0]) {
                // protocol 2 pickles `bytes` as `_codecs.encode(latin-1 text, 'latin1')`
                Some(s) => Node::Bytes(s.chars().map(|c| c as u32 as u8).collect()),
                None => opaque,
            },
            (_, "list" | "tuple" | "set" | "frozenset") if builtin => {
                let items = match a.first() {
                    None => vec![],
                    Some(&i) => match &self.nodes[i] {
                        Node::Tuple(v) | Node::List(v) | Node::Set(v) => v.clone(),
                        _ => return Ok(opaque),
                    },
                };
                match name.as_str() {
                    "list" => Node::List(items),
                    "tuple" => Node::Tuple(items),
                    _ => Node::Set(items),
                }
            }
            _ => opaque,
        };
        Ok(node)
    }
}

/// Refuses a pickle global that a weights file has no business naming. The allow-list is that of
/// `torch.load(weights_only=True)` (`_get_allowed_globals` in pytorch/pytorch, torch/_weights_only_unpickler.py):
/// the tensor rebuild functions, storage, tensor and dtype classes, `torch.Size`, `torch.device`,
/// `collections.OrderedDict`, and inert builtins. Added to it, because the MAE, DeiT and timm training scripts save
/// them beside the weights and this reader never calls anything: `argparse.Namespace` (the `args` entry) and
/// NumPy's scalar and array reconstructors (metrics saved as NumPy values).
fn check_global(module: &str, name: &str) -> VmResult<()> {
    // Python 2 names (protocol 0-2 pickles from Python 2), as pickle's own compatibility mapping renames them.
    let module = match module {
        "__builtin__" => "builtins",
        "copy_reg" => "copyreg",
        m => m,
    };
    let allowed = match module {
        "torch._utils" => matches!(
            name,
            "_rebuild_tensor"
                | "_rebuild_tensor_v2"
                | "_rebuild_tensor_v3"
                | "_rebuild_parameter"
                | "_rebuild_parameter_with_state"
                | "_rebuild_from_type"
                | "_rebuild_qtensor"
                | "_rebuild_sparse_tensor"
                | "_rebuild_meta_tensor_no_storage"
                | "_rebuild_wrapper_subclass"
                | "_rebuild_device_tensor_from_numpy"
                | "_rebuild_device_tensor_from_cpu_tensor"
        ),
        "torch._tensor" => name == "_rebuild_from_type_v2",
        "torch" | "torch.storage" | "torch.cuda" => {
            matches!(name, "Size" | "Tensor" | "device" | "TypedStorage" | "UntypedStorage")
                || (name.ends_with("Storage") && storage_kind(name).is_ok())
                || (name.ends_with("Tensor") && name.len() > "Tensor".len() && name.bytes().all(|b| b.is_ascii_alphanumeric()))
                || dtype_kind(name).is_ok()
                || is_other_torch_dtype(name)
                || name.starts_with("per_tensor_")
                || name.starts_with("per_channel_")
        }
        "torch.nn.parameter" => name == "Parameter",
        "torch.serialization" => name == "_get_layout",
        "collections" => matches!(name, "OrderedDict" | "Counter"),
        "_codecs" => name == "encode",
        "builtins" => matches!(
            name,
            "set" | "frozenset" | "dict" | "list" | "tuple" | "bytearray" | "bytes" | "complex" | "int" | "float" | "bool" | "str"
        ),
        "argparse" => name == "Namespace",
        "numpy.core.multiarray" | "numpy._core.multiarray" => matches!(name, "_reconstruct" | "scalar"),
        "numpy" => matches!(name, "ndarray" | "dtype"),
        "numpy.dtypes" => name.ends_with("DType") && name.bytes().all(|b| b.is_ascii_alphanumeric()),
        _ => false,
    };
    if allowed {
        return Ok(());
    }
    Err(format!(
        "pickle global `{module}.{name}` is not allowed in a weights file: only the classes and functions that \
         rebuild tensors and plain containers may appear (the allow-list of torch.load(weights_only=True)), so the \
         file is refused without running anything. If it is a whole pickled model or another Python object you \
         trust, load it in Python and save `model.state_dict()` instead"
    ))
}

/// Dtype names that torch's allow-list has but [`dtype_kind`] does not map (tensors of them are refused later).
fn is_other_torch_dtype(name: &str) -> bool {
    let bits = |prefix: &str| name.strip_prefix(prefix).and_then(|b| b.parse::<u32>().ok()).is_some_and(|b| (1..=64).contains(&b));
    bits("uint") || bits("int") || name.starts_with("float8_") || matches!(name, "float4_e2m1fn_x2" | "qint8" | "quint8" | "qint32" | "quint4x2" | "quint2x4" | "bits1x8" | "bits2x4" | "bits4x2" | "bits8" | "bits16" | "complex32")
}

fn kind_name(n: &Node) -> &'static str {
    match n {
        Node::None => "None",
        Node::Bool(_) => "bool",
        Node::Int(_) | Node::BigInt => "int",
        Node::Float(_) => "float",
        Node::Str(_) => "str",
        Node::Bytes(_) => "bytes",
        Node::Tuple(_) => "tuple",
        Node::List(_) => "list",
        Node::Dict(_) => "dict",
        Node::Set(_) => "set",
        Node::Global { .. } => "class",
        Node::Object { .. } => "object",
        Node::Storage { .. } => "storage",
        Node::Tensor(_) => "tensor",
    }
}

fn pairs(items: &[Id]) -> VmResult<Vec<(Id, Id)>> {
    if !items.len().is_multiple_of(2) {
        return Err("odd number of items for a dict".into());
    }
    Ok(items.chunks_exact(2).map(|c| (c[0], c[1])).collect())
}

fn parse_int_text(s: &str) -> VmResult<Node> {
    match s.parse::<i64>() {
        Ok(v) => Ok(Node::Int(v)),
        Err(_) if !s.is_empty() && s.trim_start_matches(['-', '+']).bytes().all(|b| b.is_ascii_digit()) => Ok(Node::BigInt),
        Err(_) => Err(format!("bad integer `{s}`")),
    }
}

/// A little-endian two's complement integer of any length (LONG1 / LONG4).
fn decode_long(b: &[u8]) -> Node {
    if b.is_empty() {
        return Node::Int(0);
    }
    let negative = b[b.len() - 1] & 0x80 != 0;
    let fill = if negative { 0xff } else { 0 };
    if b.len() > 8 && (b[8..].iter().any(|&x| x != fill) || ((b[7] & 0x80 != 0) != negative)) {
        return Node::BigInt;
    }
    let mut buf = [fill; 8];
    let n = b.len().min(8);
    buf[..n].copy_from_slice(&b[..n]);
    Node::Int(i64::from_le_bytes(buf))
}

fn latin1(b: &[u8]) -> String {
    b.iter().map(|&c| c as char).collect()
}

/// Python's `raw-unicode-escape` decoding (UNICODE opcode): `\uXXXX` and `\UXXXXXXXX` escapes, other bytes latin-1.
fn decode_raw_unicode_escape(b: &[u8]) -> String {
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 1 < b.len() && (b[i + 1] == b'u' || b[i + 1] == b'U') {
            let n = if b[i + 1] == b'u' { 4 } else { 8 };
            if let Some(hex) = b.get(i + 2..i + 2 + n) {
                if let Some(c) = std::str::from_utf8(hex).ok().and_then(|h| u32::from_str_radix(h, 16).ok()).and_then(char::from_u32) {
                    out.push(c);
                    i += 2 + n;
                    continue;
                }
            }
        }
        out.push(b[i] as char);
        i += 1;
    }
    out
}

/// The quoted Python 2 `repr` of a byte string (STRING opcode).
fn decode_string_repr(l: &[u8]) -> VmResult<Vec<u8>> {
    let inner = match l {
        [q, inner @ .., q2] if (*q == b'\'' || *q == b'"') && q == q2 => inner,
        _ => return Err("STRING argument is not quoted".into()),
    };
    let mut out = Vec::with_capacity(inner.len());
    let mut i = 0;
    while i < inner.len() {
        let c = inner[i];
        i += 1;
        if c != b'\\' || i >= inner.len() {
            out.push(c);
            continue;
        }
        let e = inner[i];
        i += 1;
        match e {
            b'n' => out.push(b'\n'),
            b't' => out.push(b'\t'),
            b'r' => out.push(b'\r'),
            b'0'..=b'7' => {
                let mut v = (e - b'0') as u32;
                let mut k = 0;
                while k < 2 && i < inner.len() && (b'0'..=b'7').contains(&inner[i]) {
                    v = v * 8 + (inner[i] - b'0') as u32;
                    i += 1;
                    k += 1;
                }
                out.push(v as u8);
            }
            b'x' => {
                let hex = inner.get(i..i + 2).and_then(|h| std::str::from_utf8(h).ok()).and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => return Err("bad \\x escape in STRING".into()),
                }
            }
            b'\n' => {}
            other => {
                if !matches!(other, b'\\' | b'\'' | b'"') {
                    out.push(b'\\');
                }
                out.push(other);
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------------------------
// Finding the state dict in the object graph.

/// Named tensor nodes, in file order.
type Entries = Vec<(String, Id)>;

/// The (name, tensor node) pairs of the state dict, and the top-level key it was found under.
fn select_state_dict(nodes: &[Node], root: Id) -> std::result::Result<(Entries, Option<&'static str>), String> {
    if let Node::Dict(items) = &nodes[root] {
        for key in STATE_DICT_KEYS {
            let found = items.iter().rev().find(|(k, _)| matches!(&nodes[*k], Node::Str(s) if s == key));
            if let Some(&(_, v)) = found {
                if matches!(nodes[v], Node::Dict(_) | Node::Object { .. }) {
                    let entries = collect(nodes, v)?;
                    if !entries.is_empty() {
                        return Ok((entries, Some(key)));
                    }
                }
            }
        }
    }
    Ok((collect(nodes, root)?, None))
}

/// All tensors reachable through dicts (and pickled `nn.Module`s), with dotted names, in file order; a name seen
/// twice keeps its first position and its last value, as a Python dict would.
fn collect(nodes: &[Node], root: Id) -> std::result::Result<Entries, String> {
    let mut w = Walker { nodes, visits: 0, path: Vec::new(), out: Vec::new(), index: HashMap::new() };
    match &nodes[root] {
        Node::Tensor(_) => w.add(String::new(), root),
        _ => w.walk(root, "")?,
    }
    Ok(w.out)
}

struct Walker<'a> {
    nodes: &'a [Node],
    visits: usize,
    path: Vec<Id>,
    out: Entries,
    index: HashMap<String, usize>,
}

impl Walker<'_> {
    fn add(&mut self, name: String, id: Id) {
        let name = if name.is_empty() { "tensor".to_string() } else { name };
        match self.index.get(&name) {
            Some(&i) => self.out[i].1 = id,
            None => {
                self.index.insert(name.clone(), self.out.len());
                self.out.push((name, id));
            }
        }
    }

    fn key_name(&self, k: Id) -> Option<String> {
        match &self.nodes[k] {
            Node::Str(s) => Some(s.clone()),
            Node::Int(i) => Some(i.to_string()),
            _ => None,
        }
    }

    fn join(prefix: &str, name: &str) -> String {
        if prefix.is_empty() {
            name.to_string()
        } else {
            format!("{prefix}.{name}")
        }
    }

    /// Walks a dict-like node: a dict, a pickled `nn.Module`, or an object whose items were set (dict subclass).
    fn walk(&mut self, id: Id, prefix: &str) -> std::result::Result<(), String> {
        if self.path.contains(&id) || self.path.len() >= MAX_DEPTH {
            return Ok(());
        }
        self.visits += 1;
        if self.visits > MAX_VISITS {
            return Err("the pickled object graph is too large or too deeply shared".into());
        }
        self.path.push(id);
        let nodes = self.nodes;
        match &nodes[id] {
            Node::Dict(items) | Node::Object { items, .. } if !items.is_empty() => {
                for &(k, v) in items {
                    let Some(name) = self.key_name(k) else { continue };
                    self.value(v, &Self::join(prefix, &name))?;
                }
            }
            Node::Object { state: Some(state), .. } => {
                // A whole pickled nn.Module: its __dict__ has _parameters, _buffers and _modules.
                if let Node::Dict(attrs) = &nodes[*state] {
                    let attr = |name: &str| {
                        attrs.iter().rev().find(|(k, _)| matches!(&nodes[*k], Node::Str(s) if s == name)).map(|&(_, v)| v)
                    };
                    if let Some(params) = attr("_parameters") {
                        for group in [Some(params), attr("_buffers"), attr("_modules")].into_iter().flatten() {
                            if let Node::Dict(items) = &nodes[group] {
                                for &(k, v) in items {
                                    let Some(name) = self.key_name(k) else { continue };
                                    self.value(v, &Self::join(prefix, &name))?;
                                }
                            }
                        }
                    }
                }
            }
            _ => {}
        }
        self.path.pop();
        Ok(())
    }

    fn value(&mut self, v: Id, name: &str) -> std::result::Result<(), String> {
        match &self.nodes[v] {
            Node::Tensor(_) => self.add(name.to_string(), v),
            Node::Dict(_) | Node::Object { .. } => self.walk(v, name)?,
            _ => {}
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Building tensors.

fn storage_kind(type_name: &str) -> std::result::Result<Kind, String> {
    Ok(match type_name {
        "DoubleStorage" => Kind::Double,
        "FloatStorage" => Kind::Float,
        "HalfStorage" => Kind::Half,
        "BFloat16Storage" => Kind::BFloat16,
        "LongStorage" => Kind::Int64,
        "IntStorage" => Kind::Int,
        "ShortStorage" => Kind::Int16,
        "CharStorage" => Kind::Int8,
        "ByteStorage" | "UntypedStorage" => Kind::Uint8,
        "BoolStorage" => Kind::Bool,
        "ComplexFloatStorage" => Kind::ComplexFloat,
        "ComplexDoubleStorage" => Kind::ComplexDouble,
        other => return Err(format!("unsupported storage type `{other}`")),
    })
}

fn dtype_kind(name: &str) -> std::result::Result<Kind, String> {
    Ok(match name {
        "float32" | "float" => Kind::Float,
        "float64" | "double" => Kind::Double,
        "float16" | "half" => Kind::Half,
        "bfloat16" => Kind::BFloat16,
        "int64" | "long" => Kind::Int64,
        "int32" | "int" => Kind::Int,
        "int16" | "short" => Kind::Int16,
        "int8" => Kind::Int8,
        "uint8" => Kind::Uint8,
        "bool" => Kind::Bool,
        "complex32" | "chalf" => Kind::ComplexHalf,
        "complex64" | "cfloat" => Kind::ComplexFloat,
        "complex128" | "cdouble" => Kind::ComplexDouble,
        "float8_e5m2" => Kind::Float8e5m2,
        "float8_e4m3fn" => Kind::Float8e4m3fn,
        "float8_e5m2fnuz" => Kind::Float8e5m2fnuz,
        "float8_e4m3fnuz" => Kind::Float8e4m3fnuz,
        other => return Err(format!("dtype `torch.{other}` is not supported by the libtorch bindings")),
    })
}

fn is_complex(kind: Kind) -> bool {
    matches!(kind, Kind::ComplexHalf | Kind::ComplexFloat | Kind::ComplexDouble)
}

/// Storages read from the archive, as flat tensors of the element kind they are viewed with.
struct StorageCache<'z, R: Read + std::io::Seek> {
    zip: &'z mut zip::ZipArchive<R>,
    prefix: &'z str,
    big_endian: bool,
    /// The checkpoint file's size, which bounds what its storages can hold.
    file_len: u64,
    /// Bytes the tensors built from now on may still take.
    budget: u64,
    tensors: HashMap<(String, Kind), Tensor>,
}

impl<R: Read + std::io::Seek> StorageCache<'_, R> {
    /// The storage `key` as a 1-d tensor of `kind`; `nbytes` is its size according to the pickle, which
    /// `check_claim` has bounded.
    fn get(&mut self, key: &str, nbytes: usize, kind: Kind) -> std::result::Result<&Tensor, String> {
        let cache_key = (key.to_string(), kind);
        if !self.tensors.contains_key(&cache_key) {
            let name = format!("{}data/{key}", self.prefix);
            let mut bytes = read_entry(self.zip, &name, nbytes as u64)?.ok_or_else(|| format!("storage `{name}` is missing from the archive"))?;
            if bytes.len() < nbytes {
                return Err(format!("storage `{name}` has {} bytes, {nbytes} expected (truncated?)", bytes.len()));
            }
            let elt = kind.elt_size_in_bytes();
            let numel = nbytes / elt;
            bytes.truncate(numel * elt);
            if self.big_endian {
                let word = if is_complex(kind) { elt / 2 } else { elt };
                if word > 1 {
                    bytes.chunks_exact_mut(word).for_each(<[u8]>::reverse);
                }
            }
            let t = Tensor::f_from_data_size(&bytes, &[numel as i64], kind).map_err(|e| e.to_string())?;
            self.tensors.insert(cache_key.clone(), t);
        }
        Ok(&self.tensors[&cache_key])
    }

    /// Refuses, before reading or allocating, a storage that claims more bytes than its archive entry can hold: a
    /// stored entry holds at most the file's size, a deflated one at most deflate's ratio times its own size.
    fn check_claim(&mut self, key: &str, nbytes: u64) -> std::result::Result<(), String> {
        let name = format!("{}data/{key}", self.prefix);
        let capacity = match self.zip.by_name(&name) {
            Ok(f) if f.compression() == zip::CompressionMethod::Stored => self.file_len,
            Ok(f) => f.compressed_size().saturating_mul(DEFLATE_MAX_RATIO).min(self.file_len.saturating_mul(DEFLATE_MAX_RATIO)),
            Err(zip::result::ZipError::FileNotFound) => return Err(format!("storage `{name}` is missing from the archive")),
            Err(e) => return Err(format!("cannot read `{name}` in the zip archive: {e}")),
        };
        if nbytes > capacity {
            return Err(format!(
                "storage `{name}` claims {nbytes} bytes, more than the {}-byte file can hold (corrupt or forged)",
                self.file_len
            ));
        }
        Ok(())
    }

    /// Takes `nbytes` of the tensors' memory budget, refusing a view that would expand far beyond the file.
    fn reserve(&mut self, nbytes: u64) -> std::result::Result<(), String> {
        if nbytes > self.budget {
            return Err(format!(
                "the tensors would take more than {EXPANSION_FACTOR} times the file's {} bytes (views that repeat a \
                 storage: stride-0 or overlapping strides, corrupt or forged)",
                self.file_len
            ));
        }
        self.budget -= nbytes;
        Ok(())
    }
}

fn build_tensor<R: Read + std::io::Seek>(
    nodes: &[Node],
    desc: &TensorDesc,
    storages: &mut StorageCache<'_, R>,
) -> std::result::Result<Tensor, String> {
    let Node::Storage { type_name, key, numel } = &nodes[desc.storage] else {
        return Err("tensor without storage".into());
    };
    let storage_kind = storage_kind(type_name)?;
    let kind = match &desc.dtype {
        Some(d) => dtype_kind(d)?,
        None => storage_kind,
    };
    if desc.size.len() != desc.stride.len() {
        return Err(format!("size {:?} and stride {:?} differ in length", desc.size, desc.stride));
    }
    if desc.size.iter().chain(&desc.stride).any(|&v| v < 0) || desc.offset < 0 || *numel < 0 {
        return Err(format!("negative size, stride or offset (size {:?}, stride {:?}, offset {})", desc.size, desc.stride, desc.offset));
    }
    let count = desc.size.iter().try_fold(1i64, |a, &s| a.checked_mul(s)).ok_or("tensor size overflows")?;
    if count == 0 {
        return Tensor::f_empty(desc.size.as_slice(), (kind, Device::Cpu)).map_err(|e| e.to_string());
    }
    let nbytes = (*numel as u64)
        .checked_mul(storage_kind.elt_size_in_bytes() as u64)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or("storage size overflows")?;
    let storage_elems = (nbytes / kind.elt_size_in_bytes()) as i128;
    let last = desc.size.iter().zip(&desc.stride).map(|(&s, &st)| (s as i128 - 1) * st as i128).sum::<i128>() + desc.offset as i128;
    if last >= storage_elems {
        return Err(format!(
            "view (offset {}, size {:?}, stride {:?}) reaches element {last} of a storage of {storage_elems} elements",
            desc.offset, desc.size, desc.stride
        ));
    }
    // A view materialises count elements: with stride 0 or overlapping strides that can be far more than its
    // storage holds (a 4-element storage viewed as 10^5 x 10^5).
    storages.check_claim(key, nbytes as u64)?;
    let out_bytes = (count as u64).saturating_mul(kind.elt_size_in_bytes() as u64);
    if out_bytes > (nbytes as u64).max(VIEW_SLACK_BYTES) {
        return Err(format!(
            "view (size {:?}, stride {:?}) would expand a storage of {nbytes} bytes to {out_bytes} bytes (corrupt or forged)",
            desc.size, desc.stride
        ));
    }
    storages.reserve(out_bytes)?;
    let storage = storages.get(key, nbytes, kind)?;
    storage
        .f_as_strided(desc.size.as_slice(), desc.stride.as_slice(), desc.offset)
        .and_then(|t| t.f_contiguous())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(p: &[u8]) -> VmResult<(Vec<Node>, Id)> {
        let mut vm = Unpickler::new(p);
        let root = vm.run()?;
        Ok((vm.nodes, root))
    }

    #[test]
    fn longs() {
        assert!(matches!(decode_long(&[]), Node::Int(0)));
        assert!(matches!(decode_long(&[0xff]), Node::Int(-1)));
        assert!(matches!(decode_long(&[0x00, 0x80]), Node::Int(-32768)));
        assert!(matches!(decode_long(&[0xff, 0x00]), Node::Int(255)));
        assert!(matches!(decode_long(&[0, 0, 0, 0, 0, 0, 0, 0x80, 0]), Node::BigInt));
        assert!(matches!(decode_long(&[0xff; 9]), Node::Int(-1)));
    }

    #[test]
    fn protocol0_text() {
        // {'a': [1, 'x', 2.5, True]} in protocol 0
        let p = b"(dp0\nVa\np1\n(lp2\nI1\naS'x'\np3\naF2.5\naI01\nas.";
        let (nodes, root) = run(p).unwrap();
        let Node::Dict(items) = &nodes[root] else { panic!("not a dict") };
        assert_eq!(items.len(), 1);
        let Node::List(l) = &nodes[items[0].1] else { panic!("not a list") };
        assert!(matches!(nodes[l[0]], Node::Int(1)));
        assert!(matches!(&nodes[l[1]], Node::Str(s) if s == "x"));
        assert!(matches!(nodes[l[2]], Node::Float(f) if f == 2.5));
        assert!(matches!(nodes[l[3]], Node::Bool(true)));
    }

    #[test]
    fn errors_not_panics() {
        for p in [&b""[..], b"\x80\x02", b"\x80\x02}q\x00(", b"\x80\x02u.", b"\x80\x02h\x05.", b"\x80\x02\xff", b"t.", b"\x80\x02X\xff\xff\xff\xff"] {
            assert!(run(p).is_err(), "{p:?}");
        }
        let err = run(b"\x80\x02\x82\x01.").unwrap_err();
        assert!(err.contains("unsupported pickle opcode 0x82"), "{err}");
    }

    #[test]
    fn cycles_are_tolerated() {
        // d = {}; d['self'] = d
        let p = b"\x80\x02}q\x00X\x04\x00\x00\x00selfq\x01h\x00s.";
        let (nodes, root) = run(p).unwrap();
        assert!(collect(&nodes, root).unwrap().is_empty());
    }
}
