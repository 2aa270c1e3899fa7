//! The dataset index: what opening a split finds (relative paths, labels, sizes and, for tar shards, where each
//! member lies) and the fingerprint computed from it. It is kept in the cache, keyed by the root and the split
//! and checked against the modification times of the folders (and shard files) it was made from, so the second
//! open of an unchanged ImageNet reads one file and stats a thousand folders instead of 1.3 M files. Under a
//! launcher rank 0 makes (or reads) it and broadcasts it: one scan per job, not one per rank.
//!
//! The walk reads each entry's type from the directory listing (`DirEntry::file_type`, no stat) and follows a
//! symlink only where the entry is one, as torchvision's `find_classes` / `make_dataset` do with `os.scandir`
//! (pytorch/vision torchvision/datasets/folder.py). The sizes that the fingerprint hashes cost one stat per file.
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use super::dataset::Fingerprint;
use crate::error::{Error, Result};

/// One sample: its path relative to the split folder (inside its shard for tar shards), label and size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub rel: String,
    /// -1: a shard sample without a readable label (the loader reports it when the sample is drawn).
    pub label: i64,
    pub size: u64,
    /// Tar shards: the shard's position in `DatasetIndex::shards` and the member data's byte offset.
    pub shard: u32,
    pub offset: u64,
}

/// A folder or file the index was made from, with what it looked like then: a folder's modification time
/// changes when an entry is added, removed or renamed in it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stamp {
    /// Relative to the split folder ("" is the split folder itself).
    pub rel: String,
    pub mtime_ns: i128,
    pub size: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Header {
    pub version: u32,
    /// The canonical root and the split: a cache file found under another key's name is not used.
    pub root: String,
    pub split: String,
    pub layout: String,
    pub classes: Vec<String>,
    pub empty_classes: Vec<String>,
    /// Shard file names (tar shards only).
    pub shards: Vec<String>,
    pub stamps: Vec<Stamp>,
    /// Warnings of the scan (a truncated shard, a sample without a label): repeated at each open.
    pub problems: Vec<String>,
    pub fingerprint: Fingerprint,
    /// What the caches (this index's users: the feature cache) key on: the fingerprint plus each file's
    /// modification time and inode (see [`cache_key`]), so that a file rewritten in place under the same name and
    /// size gives another key once the folders are walked again (`--rescan`).
    #[serde(default)]
    pub cache_key: String,
    /// Tar shards: samples known to be lost (a shard cut short or with a corrupt header, or fewer samples than
    /// `data pack` wrote into it): an evaluation refuses them, as unreadable images.
    #[serde(default)]
    pub lost: Vec<Lost>,
    pub count: u64,
}

/// Samples of a shard that cannot be read: those after byte `offset` of `shard`, where the reading stopped.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Lost {
    pub shard: String,
    pub offset: u64,
    /// The shard's samples that were found before the loss (their ordinals in it are 0..first).
    pub first: u64,
    /// How many were lost, when `data pack` recorded how many the shard holds; None otherwise (the rest of it).
    pub count: Option<u64>,
    pub why: String,
}

impl Lost {
    /// `<shard>#<ordinal>` for each lost sample (or `<shard>#<first>..` for an unknown rest): the names the record
    /// lists under `skipped_eval`.
    pub fn names(&self) -> Vec<String> {
        match self.count {
            Some(n) => (self.first..self.first + n).map(|i| format!("{}#{i}", self.shard)).collect(),
            None => vec![format!("{}#{}..", self.shard, self.first)],
        }
    }

    /// One line for an error or a warning, naming the shard and the byte offset.
    pub fn describe(&self) -> String {
        let what = match self.count {
            Some(1) => "1 sample".to_string(),
            Some(n) => format!("{n} samples"),
            None => "the rest of the shard".to_string(),
        };
        format!("{}: {what} from byte {} cannot be read ({})", self.shard, self.offset, self.why)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatasetIndex {
    pub header: Header,
    pub entries: Vec<Entry>,
}

/// Where a dataset's index came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IndexSource {
    /// A walk of the folders (or a pass over the shards' tar headers).
    Scan,
    /// The cache file of an earlier open.
    Cache,
    /// Received from rank 0.
    Rank0,
}

impl IndexSource {
    pub fn describe(self) -> &'static str {
        match self {
            IndexSource::Scan => "scanned",
            IndexSource::Cache => "cached index",
            IndexSource::Rank0 => "received from rank 0",
        }
    }
}

/// 2: a sha256 of all the bytes before it ends the file; the header has the cache key and the lost samples.
pub(crate) const VERSION: u32 = 2;
const MAGIC: &[u8; 16] = b"LMIM-DATA-INDEX\n";
/// The trailing checksum's bytes.
const SUM: usize = 32;
/// A header longer than this is not one this build wrote (ImageNet's train split: about 100 KB of stamps).
const HEADER_LIMIT: u64 = 1 << 28;
/// A relative path longer than this (Linux's PATH_MAX) is not one a walk found.
const PATH_LIMIT: u64 = 4096;
/// Cache files kept: the oldest beyond this are removed when one is written.
const KEEP: usize = 16;
/// A folder modified this shortly before its scan may change again within the file system's timestamp
/// granularity without its time changing (git's "racy" entries): such an index is not kept.
const RACY: Duration = Duration::from_secs(2);

/// `$LMIM_CACHE/data-index`, else `$XDG_CACHE_HOME/lmim-bench/data-index`, else `~/.cache/lmim-bench/data-index`
/// (the cache folder of scripts/env.sh); None without any of them.
pub fn default_dir() -> Option<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    let base = var("LMIM_CACHE")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("lmim-bench")))
        .or_else(|| var("HOME").map(|d| d.join(".cache/lmim-bench")))?;
    Some(base.join("data-index"))
}

/// The modification time in nanoseconds since the epoch.
pub fn mtime_ns(meta: &std::fs::Metadata) -> i128 {
    match meta.modified() {
        Ok(t) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_nanos() as i128,
            Err(e) => -(e.duration().as_nanos() as i128),
        },
        Err(_) => 0,
    }
}

/// The stamp of `dir/rel` now (following symlinks).
pub fn stamp(dir: &Path, rel: &str) -> Result<Stamp> {
    let p = if rel.is_empty() { dir.to_path_buf() } else { dir.join(rel) };
    let m = std::fs::metadata(&p).map_err(|e| Error::io(&p, e))?;
    Ok(Stamp { rel: rel.to_string(), mtime_ns: mtime_ns(&m), size: if m.is_dir() { 0 } else { m.len() } })
}

/// The fingerprint of a split from its entries: sha256 of "relative/path\tsize\n" over the sorted relative paths,
/// and of the class names joined by newlines.
pub fn fingerprint(split: &str, classes: &[String], entries: &[Entry]) -> Fingerprint {
    use rayon::prelude::*;
    let mut rel: Vec<(std::borrow::Cow<str>, u64)> = entries
        .iter()
        .map(|e| (if e.rel.contains('\\') { e.rel.replace('\\', "/").into() } else { e.rel.as_str().into() }, e.size))
        .collect();
    rel.par_sort_unstable();
    let mut h = Sha256::new();
    let mut line = String::new();
    for (r, s) in &rel {
        use std::fmt::Write;
        line.clear();
        let _ = write!(line, "{r}\t{s}\n");
        h.update(line.as_bytes());
    }
    Fingerprint {
        split: split.to_string(),
        num_files: entries.len(),
        num_classes: classes.len(),
        classes_hash: hex::encode(Sha256::digest(classes.join("\n").as_bytes())),
        files_hash: hex::encode(h.finalize()),
    }
}

/// What identifies a file's content to the caches without reading it: its modification time and inode. A file
/// rewritten in place changes its time; one replaced by a rename changes its inode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileId {
    pub mtime_ns: i128,
    pub ino: u64,
}

impl FileId {
    pub fn of(meta: &std::fs::Metadata) -> FileId {
        use std::os::unix::fs::MetadataExt;
        FileId { mtime_ns: mtime_ns(meta), ino: meta.ino() }
    }
}

/// The caches' key of a split: sha256 of the fingerprint and of "relative/path\tmtime_ns\tinode\n" over the
/// sorted paths (`ids` parallel to `entries`; for shards each sample has its shard file's). Unlike the
/// fingerprint it is not portable: a copy of the tree has other times and inodes, so its caches are its own.
pub fn cache_key(fp: &Fingerprint, entries: &[Entry], ids: &[FileId]) -> String {
    use rayon::prelude::*;
    let mut rows: Vec<(&str, FileId)> = entries.iter().map(|e| e.rel.as_str()).zip(ids.iter().copied()).collect();
    rows.par_sort_unstable_by(|a, b| a.0.cmp(b.0));
    let mut h = Sha256::new();
    h.update(serde_json::to_vec(fp).expect("the fingerprint serialises"));
    h.update(b"\n");
    let mut line = String::new();
    for (r, id) in &rows {
        use std::fmt::Write;
        line.clear();
        let _ = write!(line, "{r}\t{}\t{}\n", id.mtime_ns, id.ino);
        h.update(line.as_bytes());
    }
    hex::encode(h.finalize())
}

impl DatasetIndex {
    /// Bytes of the cache file (and of the broadcast): magic, the JSON header's length and text, then per entry
    /// the relative path's length and bytes, label, size, shard and offset (little-endian), then the sha256 of
    /// everything before it, checked before anything else is read.
    pub fn encode(&self) -> Vec<u8> {
        let body: usize = self.entries.iter().map(|e| 32 + e.rel.len()).sum();
        let mut out = Vec::with_capacity(4096 + SUM + body);
        self.encode_to(&mut out).expect("writing to memory");
        out
    }

    /// [`encode`](Self::encode) into `w`.
    pub fn encode_to(&self, w: &mut dyn std::io::Write) -> std::io::Result<()> {
        let mut w = Hashing { w, h: Sha256::new() };
        self.encode_body(&mut w)?;
        let sum = w.h.finalize();
        w.w.write_all(&sum)
    }

    fn encode_body(&self, w: &mut dyn std::io::Write) -> std::io::Result<()> {
        let header = serde_json::to_vec(&self.header).expect("the header serialises");
        w.write_all(MAGIC)?;
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(&header)?;
        for e in &self.entries {
            w.write_all(&(e.rel.len() as u32).to_le_bytes())?;
            w.write_all(e.rel.as_bytes())?;
            w.write_all(&e.label.to_le_bytes())?;
            w.write_all(&e.size.to_le_bytes())?;
            w.write_all(&e.shard.to_le_bytes())?;
            w.write_all(&e.offset.to_le_bytes())?;
        }
        Ok(())
    }

    /// The index in `bytes`, or why they are not one. The checksum is checked first: a changed byte anywhere
    /// is refused before any of it is believed.
    pub fn decode(bytes: &[u8]) -> std::result::Result<DatasetIndex, String> {
        if bytes.len() < MAGIC.len() + 8 + SUM || &bytes[..MAGIC.len()] != MAGIC {
            return Err("not a dataset index".into());
        }
        let (bytes, sum) = bytes.split_at(bytes.len() - SUM);
        if Sha256::digest(bytes).as_slice() != sum {
            return Err("checksum mismatch (the file was changed or damaged)".into());
        }
        let mut r = Reader { b: bytes, at: 0 };
        if r.take(MAGIC.len())? != MAGIC {
            return Err("not a dataset index".into());
        }
        let hlen = r.u64()? as usize;
        let header: Header = serde_json::from_slice(r.take(hlen)?).map_err(|e| format!("bad header: {e}"))?;
        if header.version != VERSION {
            return Err(format!("index version {}, this build writes {VERSION}", header.version));
        }
        // Each entry takes at least 32 bytes: a count beyond that is a corrupt header, not an allocation to make.
        if header.count > (bytes.len() / 32) as u64 {
            return Err("more entries announced than the file holds".into());
        }
        let mut entries = Vec::with_capacity(header.count as usize);
        for _ in 0..header.count {
            let n = r.u32()? as usize;
            let rel = std::str::from_utf8(r.take(n)?).map_err(|_| "a path is not UTF-8".to_string())?.to_string();
            let label = r.u64()? as i64;
            let size = r.u64()?;
            let shard = r.u32()?;
            let offset = r.u64()?;
            if shard as usize >= header.shards.len().max(1) || label >= header.classes.len() as i64 || label < -1 || n as u64 > PATH_LIMIT {
                return Err(format!("entry `{rel}` is out of range"));
            }
            entries.push(Entry { rel, label, size, shard, offset });
        }
        if r.at != bytes.len() {
            return Err("trailing bytes".into());
        }
        Ok(DatasetIndex { header, entries })
    }
}

/// A writer that hashes what goes through it.
struct Hashing<'a> {
    w: &'a mut dyn std::io::Write,
    h: Sha256,
}

impl std::io::Write for Hashing<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.w.write(buf)?;
        self.h.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len()).ok_or("cut short")?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u64(&mut self) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn u32(&mut self) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
}

/// The cache of one (root, split): a file named by the hash of both in `cache_dir`.
pub struct IndexCache {
    pub path: PathBuf,
    root: String,
    split: String,
}

impl IndexCache {
    pub fn new(cache_dir: &Path, root: &Path, split: &str) -> IndexCache {
        let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf()).to_string_lossy().into_owned();
        let key = hex::encode(Sha256::digest(format!("{root}\0{split}").as_bytes()));
        IndexCache { path: cache_dir.join(format!("{}.idx", &key[..32])), root, split: split.to_string() }
    }

    /// The cached index when it was made from this root and split and every folder and shard it was made from
    /// still has the time (and size) it had: `Ok(None)` for a missing or out-of-date file, `Err(why)` for one that
    /// is not a whole index this build wrote (damaged, edited, cut, not a regular file): the caller walks again.
    /// Reads are bounded: the file must be a regular file (a FIFO or a device is refused before it is read), and
    /// the sizes its header gives are checked against the file's size before anything is allocated for them.
    pub fn load(&self, dir: &Path) -> std::result::Result<Option<DatasetIndex>, String> {
        let bytes = match read_bounded(&self.path) {
            Ok(Some(b)) => b,
            Ok(None) => return Ok(None),
            Err(e) => return Err(e),
        };
        let idx = DatasetIndex::decode(&bytes)?;
        let h = &idx.header;
        if h.root != self.root || h.split != self.split || h.stamps.is_empty() {
            return Ok(None);
        }
        for s in &h.stamps {
            match stamp(dir, &s.rel) {
                Ok(now) if now == *s => {}
                _ => return Ok(None),
            }
        }
        Ok(Some(idx))
    }

    /// Keeps `idx` unless a folder or shard it was made from changed less than [`RACY`] before `scan_start`
    /// (a later change might then keep the same time). Returns whether it was written.
    pub fn store(&self, idx: &DatasetIndex, scan_start: SystemTime) -> Result<bool> {
        let start = scan_start.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i128);
        if idx.header.stamps.iter().any(|s| s.mtime_ns > start - RACY.as_nanos() as i128) {
            return Ok(false);
        }
        crate::fsutil::write_atomic_with(&self.path, |w| idx.encode_to(w))?;
        if let Some(dir) = self.path.parent() {
            evict(dir);
        }
        Ok(true)
    }
}

/// The bytes of the cache file at `path` (None: there is none), read only when it is a regular file whose
/// header announces what its size holds: magic, a header length below [`HEADER_LIMIT`] and within the file, and
/// a count of entries that the rest of the file can hold (at least 32 bytes each, at most 32 + [`PATH_LIMIT`]).
fn read_bounded(path: &Path) -> std::result::Result<Option<Vec<u8>>, String> {
    use std::io::Read;
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        _ => {}
    }
    let mut f = crate::fsutil::open_regular(path, None).map_err(|e| e.to_string())?;
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    let lead = (MAGIC.len() + 8) as u64;
    if len < lead + SUM as u64 {
        return Err("shorter than an index".into());
    }
    let mut head = vec![0u8; lead as usize];
    f.read_exact(&mut head).map_err(|e| e.to_string())?;
    if &head[..MAGIC.len()] != MAGIC {
        return Err("not a dataset index".into());
    }
    let hlen = u64::from_le_bytes(head[MAGIC.len()..].try_into().expect("8 bytes"));
    if hlen > HEADER_LIMIT || hlen > len - lead - SUM as u64 {
        return Err(format!("its header claims {hlen} bytes, more than the file's {len}"));
    }
    let mut header = vec![0u8; hlen as usize];
    f.read_exact(&mut header).map_err(|e| e.to_string())?;
    #[derive(serde::Deserialize)]
    struct Count {
        count: u64,
    }
    let count = serde_json::from_slice::<Count>(&header).map_err(|e| format!("bad header: {e}"))?.count;
    let body = len - lead - hlen - SUM as u64;
    if count.checked_mul(32).is_none_or(|min| min > body) || count.saturating_mul(32 + PATH_LIMIT) < body {
        return Err(format!("{body} bytes of entries do not hold the {count} its header announces"));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    bytes.extend_from_slice(&head);
    bytes.extend_from_slice(&header);
    // `take`: a file that grows while it is read still stops at the size checked above.
    f.take(len - lead - hlen).read_to_end(&mut bytes).map_err(|e| e.to_string())?;
    if bytes.len() as u64 != len {
        return Err("changed while it was read".into());
    }
    Ok(Some(bytes))
}

/// Removes the least recently written cache files beyond [`KEEP`].
fn evict(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    let mut files: Vec<(SystemTime, PathBuf)> = rd
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.ends_with(".idx")))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    if files.len() <= KEEP {
        return;
    }
    files.sort();
    for (_, p) in &files[..files.len() - KEEP] {
        let _ = std::fs::remove_file(p);
    }
}

/// Under a launcher (a world of more than one that has been joined), rank 0 runs `make` and broadcasts the index
/// it made (or its failure) to the other ranks, which return it without touching the file system; otherwise
/// `make` runs here. Every rank must call it at the same point. While rank 0 scans (an hour for a first walk of
/// ImageNet on a network file system), the others wait on the store, not inside the broadcast: NCCL's watchdog
/// counts from the moment a collective is queued. (`LMIM_FAULT=scan=1:slow=S` delays rank 0's scan.)
pub fn shared_by_rank0(
    what: &Path,
    make: impl FnOnce() -> Result<(DatasetIndex, IndexSource)>,
) -> Result<(DatasetIndex, IndexSource)> {
    let Some(world) = crate::dist::joined_world().filter(|w| w.is_distributed()) else { return make() };
    use tch::{Kind, Tensor};
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (made, payload) = if world.is_main() {
        let made = crate::fault::fault_point("scan", 1).and_then(|_| make());
        let payload = match &made {
            Ok((idx, _)) => idx.encode(),
            Err(e) => e.to_string().into_bytes(),
        };
        (Some(made), payload)
    } else {
        (None, Vec::new())
    };
    // Keyed by the call's place in the run only: the ranks' paths may differ (node-local copies of the data).
    world.after_rank0_writes(&format!("dataset index {call}"))?;
    let head = Tensor::from_slice(&[made.as_ref().map_or(0, |m| m.is_ok() as i64), payload.len() as i64]);
    world.broadcast(std::slice::from_ref(&head), 0, "the dataset index broadcast")?;
    let (ok, len) = (head.int64_value(&[0]) == 1, head.int64_value(&[1]) as usize);
    let body = if world.is_main() { Tensor::from_slice(&payload) } else { Tensor::zeros([len as i64], (Kind::Uint8, tch::Device::Cpu)) };
    world.broadcast(std::slice::from_ref(&body), 0, "the dataset index broadcast")?;
    if let Some(made) = made {
        return made;
    }
    let bytes = Vec::<u8>::try_from(&body).map_err(Error::Torch)?;
    if !ok {
        return Err(Error::data(what, format!("rank 0 could not open the dataset: {}", String::from_utf8_lossy(&bytes))));
    }
    let idx = DatasetIndex::decode(&bytes).map_err(|e| Error::data(what, format!("the index rank 0 sent: {e}")))?;
    Ok((idx, IndexSource::Rank0))
}

/// `make` on rank 0 only (work every rank would otherwise repeat, such as reading every byte of a split), its
/// result sent to the others over the store: they wait there, not inside a collective. Without a process group,
/// `make` itself.
pub fn string_from_rank0(what: &str, path: &Path, make: impl FnOnce() -> Result<String>) -> Result<String> {
    let Some(world) = crate::dist::joined_world().filter(|w| w.is_distributed()) else { return make() };
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let key = format!("{what} {}", CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let made = if world.is_main() { Some(make()) } else { None };
    let payload = match &made {
        Some(Ok(v)) => format!("ok:{v}"),
        Some(Err(e)) => format!("error:{e}"),
        None => String::new(),
    };
    world.after_rank0_writes(&key)?;
    let all = world.exchange(&key, payload.as_bytes())?;
    if let Some(made) = made {
        return made;
    }
    let sent = String::from_utf8_lossy(&all[0]).into_owned();
    match sent.strip_prefix("ok:") {
        Some(v) => Ok(v.to_string()),
        None => Err(Error::data(path, format!("rank 0 could not compute the {what}: {}", sent.strip_prefix("error:").unwrap_or(&sent)))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DatasetIndex {
        let entries = vec![
            Entry { rel: "a/x.jpg".into(), label: 0, size: 10, shard: 0, offset: 0 },
            Entry { rel: "b/é y.png".into(), label: 1, size: 7, shard: 0, offset: 1536 },
        ];
        let classes = vec!["a".to_string(), "b".to_string()];
        let header = Header {
            version: VERSION,
            root: "/r".into(),
            split: "train".into(),
            layout: "image_folder".into(),
            fingerprint: fingerprint("train", &classes, &entries),
            cache_key: String::new(),
            lost: vec![],
            classes,
            empty_classes: vec![],
            shards: vec![],
            stamps: vec![Stamp { rel: String::new(), mtime_ns: 5, size: 0 }],
            problems: vec![],
            count: 2,
        };
        DatasetIndex { header, entries }
    }

    #[test]
    fn encode_decode_round_trip_and_corruption_is_refused() {
        let idx = sample();
        let bytes = idx.encode();
        assert_eq!(DatasetIndex::decode(&bytes).unwrap(), idx);
        assert!(DatasetIndex::decode(&bytes[..bytes.len() - 1]).unwrap_err().contains("checksum"));
        let mut more = bytes.clone();
        more.push(0);
        assert!(DatasetIndex::decode(&more).unwrap_err().contains("checksum"));
        assert!(DatasetIndex::decode(b"garbage garbage garbage").is_err());
        // A label changed in place (the reproduction: one byte of a record) is refused by the checksum.
        let at = bytes.len() - SUM - (8 + 4 + 8 + 8);
        let mut relabelled = bytes.clone();
        relabelled[at] ^= 1;
        assert!(DatasetIndex::decode(&relabelled).unwrap_err().contains("checksum"));
    }

    #[test]
    fn fingerprint_hashes_sorted_paths_and_sizes() {
        let idx = sample();
        let mut h = Sha256::new();
        h.update(b"a/x.jpg\t10\nb/\xc3\xa9 y.png\t7\n");
        assert_eq!(idx.header.fingerprint.files_hash, hex::encode(h.finalize()));
        let mut swapped = idx.entries.clone();
        swapped.reverse();
        assert_eq!(fingerprint("train", &idx.header.classes, &swapped), idx.header.fingerprint);
        swapped[0].size += 1;
        assert_ne!(fingerprint("train", &idx.header.classes, &swapped), idx.header.fingerprint);
    }
}
