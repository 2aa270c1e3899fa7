//! WebDataset-style tar shards: `lmim-bench data pack` writes a split as `shard-NNNNNN.tar` files (members
//! `<key>.cls`, the class index as text, then `<key>.<ext>`, the image file as it was, in the dataset's order)
//! and a `classes.txt` (one class name per line, in index order), and every command reads a folder of shards
//! like a folder of images: one pass over the tar headers gives each member's offset, so any sample is read
//! with one `pread` and the sampler, batches and random draws are those of the folder it was packed from.
//!
//! Facts used: the POSIX ustar header (IEEE Std 1003.1 `pax` format: 512-byte blocks, octal fields, `prefix` +
//! `name`, `x` extended headers with `path=` / `size=` records) and GNU tar's `L` long-name members; WebDataset's
//! grouping (webdataset/webdataset `webdataset/tariterators.py`, `base_plus_ext`): consecutive members whose names
//! agree up to the first dot of the file name form one sample, the rest of the name is the field. Existing
//! ImageNet shards in that convention (`<key>.jpg|jpeg|png` + `<key>.cls`, e.g. timm's `imagenet-1k-wds`) are read
//! as they are; without a `classes.txt` the class names are the indices.
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use rayon::prelude::*;

use super::dataset::{make_index, Dataset, Fingerprint, Item, OpenOptions, IMAGE_EXTENSIONS};
use super::index::{self, DatasetIndex, Entry, FileId, Lost, Stamp};
use crate::error::{Error, Result};

const BLOCK: u64 = 512;
/// The class names of a packed split.
pub const CLASSES_FILE: &str = "classes.txt";
/// How many samples `data pack` wrote into each shard (`<shard>\t<samples>` per line): a shard found with fewer,
/// even one cut cleanly at a member boundary, has lost the rest, known without reading its data.
pub const COUNTS_FILE: &str = "counts.tsv";
/// Extended-header and long-name members bigger than this are not a name: a corrupt shard.
const MAX_META: u64 = 1 << 20;

/// Whether a split-folder entry is a shard.
pub fn is_shard_name(name: &str) -> bool {
    name.len() > 4 && name[name.len() - 4..].eq_ignore_ascii_case(".tar")
}

/// The open shards of a dataset and where each sample's bytes lie in them.
pub struct ShardSet {
    paths: Vec<PathBuf>,
    files: Vec<OnceLock<File>>,
    /// Per sample: shard, byte offset of the member's data.
    loc: Vec<(u32, u64)>,
}

impl std::fmt::Debug for ShardSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ShardSet({} shards, {} samples)", self.paths.len(), self.loc.len())
    }
}

impl ShardSet {
    pub fn new(dir: &Path, names: &[String], entries: &[Entry]) -> ShardSet {
        ShardSet {
            paths: names.iter().map(|n| dir.join(n)).collect(),
            files: names.iter().map(|_| OnceLock::new()).collect(),
            loc: entries.iter().map(|e| (e.shard, e.offset)).collect(),
        }
    }

    fn file(&self, s: usize) -> Result<&File> {
        if let Some(f) = self.files[s].get() {
            return Ok(f);
        }
        // A FIFO or device named `.tar` is refused, not read forever.
        let f = crate::fsutil::open_regular(&self.paths[s], None)?;
        Ok(self.files[s].get_or_init(|| f))
    }

    /// Sample `i`'s member (`size` bytes); `path` (shard/member) names it in errors.
    /// The samples `rows` (indices into this set, in that order) as a set of their own, over the same shard files.
    pub fn select(&self, rows: &[usize]) -> ShardSet {
        ShardSet { paths: self.paths.clone(), files: self.paths.iter().map(|_| OnceLock::new()).collect(), loc: rows.iter().map(|&i| self.loc[i]).collect() }
    }

    /// The shard files, in shard order.
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    pub fn read(&self, i: usize, size: u64, label: i64, path: &Path) -> Result<Vec<u8>> {
        if label < 0 {
            return Err(Error::data(path, "no readable label (`.cls` member) for this sample in its shard"));
        }
        if size > crate::fsutil::IMAGE_LIMIT {
            return Err(Error::data(path, format!("{size} bytes, more than the {} an image may have", crate::fsutil::IMAGE_LIMIT)));
        }
        let (s, offset) = self.loc[i];
        let f = self.file(s as usize)?;
        let mut buf = vec![0u8; size as usize];
        f.read_exact_at(&mut buf, offset).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => Error::data(path, "the shard ends inside this member (a truncated tar)"),
            _ => Error::io(path, e),
        })?;
        Ok(buf)
    }
}

/// A regular member of a tar: its name and where its data lies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub offset: u64,
    pub size: u64,
}

fn cstr(b: &[u8]) -> std::result::Result<String, String> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8(b[..end].to_vec()).map_err(|_| "a member name is not UTF-8".to_string())
}

/// An octal field, or GNU's base-256 form for big values (high bit of the first byte set).
fn numeric(b: &[u8]) -> std::result::Result<u64, String> {
    if b.first().is_some_and(|&c| c & 0x80 != 0) {
        let mut v: u64 = (b[0] & 0x7f) as u64;
        for &c in &b[1..] {
            v = v.checked_mul(256).ok_or("numeric field overflows")? + c as u64;
        }
        return Ok(v);
    }
    let s: String = b.iter().take_while(|&&c| c != 0).map(|&c| c as char).collect();
    let s = s.trim();
    if s.is_empty() {
        return Ok(0);
    }
    u64::from_str_radix(s, 8).map_err(|_| format!("`{s}` is not an octal number"))
}

struct RawHeader {
    name: String,
    size: u64,
    kind: u8,
}

/// A 512-byte header block: None for an all-zero block (the end of the archive).
fn parse_header(b: &[u8; 512]) -> std::result::Result<Option<RawHeader>, String> {
    if b.iter().all(|&c| c == 0) {
        return Ok(None);
    }
    let stored = numeric(&b[148..156])?;
    let sum: u64 = b.iter().enumerate().map(|(i, &c)| if (148..156).contains(&i) { b' ' as u64 } else { c as u64 }).sum();
    if stored != sum {
        return Err("header checksum mismatch (not a tar, or a corrupt one)".into());
    }
    let mut name = cstr(&b[0..100])?;
    if &b[257..262] == b"ustar" {
        let prefix = cstr(&b[345..500])?;
        if !prefix.is_empty() {
            name = format!("{prefix}/{name}");
        }
    }
    Ok(Some(RawHeader { name, size: numeric(&b[124..136])?, kind: b[156] }))
}

/// The `path` and `size` of a pax extended header's records (`<len> <key>=<value>\n`).
fn parse_pax(data: &[u8]) -> std::result::Result<(Option<String>, Option<u64>), String> {
    let (mut path, mut size) = (None, None);
    let mut rest = data;
    while !rest.is_empty() {
        let sp = rest.iter().position(|&c| c == b' ').ok_or("bad pax record")?;
        let len: usize = std::str::from_utf8(&rest[..sp]).ok().and_then(|s| s.parse().ok()).ok_or("bad pax record length")?;
        if len <= sp || len > rest.len() {
            return Err("bad pax record length".into());
        }
        let rec = &rest[sp + 1..len - 1];
        if let Some(eq) = rec.iter().position(|&c| c == b'=') {
            let (k, v) = (&rec[..eq], &rec[eq + 1..]);
            match k {
                b"path" => path = Some(String::from_utf8(v.to_vec()).map_err(|_| "a pax path is not UTF-8")?),
                b"size" => size = std::str::from_utf8(v).ok().and_then(|s| s.parse().ok()),
                _ => {}
            }
        }
        rest = &rest[len..];
    }
    Ok((path, size))
}

/// The regular members of the tar at `path`, from one pass over its headers (one 512-byte read per member), and
/// what is wrong with it: a tar cut short or a corrupt header ends the list there.
pub fn read_members(path: &Path) -> Result<(Vec<Member>, Option<String>)> {
    let (members, stop) = scan_members(path)?;
    Ok((members, stop.map(|(_, why)| why)))
}

/// As [`read_members`], with the byte offset where the reading stopped (the header of a member cut short).
pub fn scan_members(path: &Path) -> Result<(Vec<Member>, Option<(u64, String)>)> {
    let f = crate::fsutil::open_regular(path, None)?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut members = Vec::new();
    let (mut pos, mut long_name, mut pax): (u64, Option<String>, (Option<String>, Option<u64>)) = (0, None, (None, None));
    let mut block = [0u8; 512];
    let problem = loop {
        if pos + BLOCK > len {
            break Some((pos, if pos == len {
                "ends without the end-of-archive blocks (a truncated tar?)".to_string()
            } else {
                format!("ends inside a header at byte {pos} (a truncated tar)")
            }));
        }
        f.read_exact_at(&mut block, pos).map_err(|e| Error::io(path, e))?;
        let h = match parse_header(&block) {
            Ok(Some(h)) => h,
            Ok(None) => break None,
            Err(e) => break Some((pos, format!("bad tar header at byte {pos}: {e}"))),
        };
        let data = pos + BLOCK;
        let read_meta = |size: u64| -> Result<std::result::Result<Vec<u8>, String>> {
            if size > MAX_META || data + size > len {
                return Ok(Err(format!("bad extended header at byte {pos}")));
            }
            let mut v = vec![0u8; size as usize];
            f.read_exact_at(&mut v, data).map_err(|e| Error::io(path, e))?;
            Ok(Ok(v))
        };
        match h.kind {
            b'x' => match read_meta(h.size)?.and_then(|v| parse_pax(&v)) {
                Ok(p) => pax = p,
                Err(e) => break Some((pos, e)),
            },
            b'L' => match read_meta(h.size)?.and_then(|v| cstr(&v)) {
                Ok(n) => long_name = Some(n),
                Err(e) => break Some((pos, e)),
            },
            b'0' | 0 | b'7' => {
                let name = pax.0.take().or(long_name.take()).unwrap_or(h.name);
                let size = pax.1.take().unwrap_or(h.size);
                if data + size > len {
                    // A member cut short is lost with the rest, not listed: the refusal and --skip-bad's list then
                    // count the same samples.
                    break Some((pos, format!("ends inside member `{name}` (a truncated tar)")));
                }
                members.push(Member { name, offset: data, size });
                pos = data + size.div_ceil(BLOCK) * BLOCK;
                continue;
            }
            // Global headers, folders, links and the like carry no sample.
            _ => {
                pax = (None, None);
                long_name = None;
            }
        }
        pos = data + h.size.div_ceil(BLOCK) * BLOCK;
    };
    Ok((members, problem))
}

/// WebDataset's split of a member name: the key (up to the first dot of the file name) and the field.
pub fn split_key(name: &str) -> Option<(&str, &str)> {
    let base = name.rfind('/').map_or(0, |i| i + 1);
    let dot = name[base..].find('.')? + base;
    (dot > base).then(|| (&name[..dot], &name[dot + 1..]))
}

fn is_image_field(field: &str) -> bool {
    let last = field.rsplit('.').next().unwrap_or(field);
    IMAGE_EXTENSIONS.iter().any(|x| last.eq_ignore_ascii_case(x))
}

/// One shard's samples: (image member, label member), grouped as WebDataset does.
/// A shard `cut` short ends inside its last sample: a label left without its image there is part of what was lost,
/// not an orphan.
fn samples_of(members: &[Member], cut: bool) -> (Vec<(&Member, Option<&Member>)>, usize) {
    let mut out = Vec::new();
    let mut orphans = 0;
    let mut i = 0;
    while i < members.len() {
        let Some((key, _)) = split_key(&members[i].name) else {
            i += 1;
            continue;
        };
        let mut j = i;
        let (mut image, mut cls) = (None, None);
        while j < members.len() && split_key(&members[j].name).is_some_and(|(k, _)| k == key) {
            let field = split_key(&members[j].name).expect("checked").1;
            if field == "cls" {
                cls = cls.or(Some(&members[j]));
            } else if is_image_field(field) {
                image = image.or(Some(&members[j]));
            }
            j += 1;
        }
        match image {
            Some(m) => out.push((m, cls)),
            None if cls.is_some() && !(cut && j == members.len()) => orphans += 1,
            None => {}
        }
        i = j;
    }
    (out, orphans)
}

/// One shard's part of the index: its samples, the problems found, its stamp, what a cut or corrupt shard lost
/// (against `counts.tsv` where there is one) and its file id.
type ShardScan = (Vec<Entry>, Vec<String>, Stamp, Option<Lost>, FileId);

fn scan_shard(dir: &Path, s: usize, name: &str, packed: Option<&std::collections::HashMap<String, u64>>) -> Result<ShardScan> {
    let path = dir.join(name);
    let stamp = index::stamp(dir, name)?;
    let id = FileId::of(&std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?);
    let (members, stop) = scan_members(&path)?;
    let mut problems: Vec<String> = stop.iter().map(|(_, p)| format!("{name}: {p}")).collect();
    let (samples, orphans) = samples_of(&members, stop.is_some());
    let found = samples.len() as u64;
    let lost = match (packed.and_then(|c| c.get(name)), &stop) {
        (Some(&want), _) if found < want => Some(Lost {
            shard: name.to_string(),
            offset: stop.as_ref().map_or(stamp.size, |(o, _)| *o),
            first: found,
            count: Some(want - found),
            why: stop.as_ref().map_or_else(|| format!("{COUNTS_FILE} says {want} samples, the shard holds {found}"), |(_, w)| w.clone()),
        }),
        (Some(_), _) => None,
        (None, Some((offset, why))) => Some(Lost { shard: name.to_string(), offset: *offset, first: found, count: None, why: why.clone() }),
        (None, None) => None,
    };
    if orphans > 0 {
        problems.push(format!("{name}: {orphans} label(s) without an image member"));
    }
    let f = crate::fsutil::open_regular(&path, None)?;
    let mut unlabelled = 0;
    let entries = samples
        .into_iter()
        .map(|(img, cls)| {
            let label = cls.and_then(|c| {
                let mut v = vec![0u8; c.size.min(64) as usize];
                f.read_exact_at(&mut v, c.offset).ok()?;
                std::str::from_utf8(&v).ok()?.trim().parse::<i64>().ok().filter(|&l| l >= 0)
            });
            unlabelled += label.is_none() as usize;
            Entry { rel: img.name.to_string(), label: label.unwrap_or(-1), size: img.size, shard: s as u32, offset: img.offset }
        })
        .collect();
    if unlabelled > 0 {
        problems.push(format!("{name}: {unlabelled} sample(s) without a readable `.cls` label"));
    }
    if let Some(l) = lost.as_ref().filter(|_| stop.is_none()) {
        problems.push(l.describe());
    }
    Ok((entries, problems, stamp, lost, id))
}

/// The index of a folder of tar shards (sorted by name), from one pass over each shard's headers.
pub(crate) fn scan(root: &Path, split: &str, dir: &Path, items: &[Item]) -> Result<DatasetIndex> {
    let names: Vec<String> = items.iter().filter(|e| !e.is_dir && is_shard_name(&e.name)).map(|e| e.name.clone()).collect();
    let classes_path = dir.join(CLASSES_FILE);
    let named: Option<Vec<String>> = if classes_path.is_file() {
        let text = crate::fsutil::read_regular_text(&classes_path, Some(crate::fsutil::TEXT_LIMIT))?;
        Some(text.lines().map(str::to_string).collect())
    } else {
        None
    };
    let mut stamps = vec![index::stamp(dir, "")?];
    if named.is_some() {
        stamps.push(index::stamp(dir, CLASSES_FILE)?);
    }
    let counts_path = dir.join(COUNTS_FILE);
    // Present in any form (a FIFO or a device included) means read through the regular-file guard, which refuses
    // anything but a file by name; only a missing file means "no counts".
    let packed: Option<std::collections::HashMap<String, u64>> = if std::fs::symlink_metadata(&counts_path).is_ok() {
        stamps.push(index::stamp(dir, COUNTS_FILE)?);
        Some(read_counts(&counts_path)?)
    } else {
        None
    };
    let per_shard: Vec<Result<ShardScan>> = names.par_iter().enumerate().map(|(s, name)| scan_shard(dir, s, name, packed.as_ref())).collect();
    let (mut entries, mut problems, mut lost, mut ids) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in per_shard {
        let (e, p, s, l, id) = r?;
        ids.extend(std::iter::repeat_n(id, e.len()));
        entries.extend(e);
        problems.extend(p);
        stamps.push(s);
        lost.extend(l);
    }
    if let Some(c) = &packed {
        let missing: Vec<&String> = c.keys().filter(|k| !names.contains(k)).collect();
        for m in missing {
            problems.push(format!("{m}: listed in {COUNTS_FILE} but missing"));
            lost.push(Lost { shard: m.clone(), offset: 0, first: 0, count: Some(c[m]), why: "the shard is missing".into() });
        }
        lost.sort_by(|a, b| a.shard.cmp(&b.shard));
    }
    if entries.is_empty() {
        return Err(Error::data(dir, "no samples (`<key>.jpg|jpeg|png` members) in any shard"));
    }
    let top = entries.iter().map(|e| e.label).max().unwrap_or(-1);
    let classes = named.unwrap_or_else(|| (0..=top.max(0)).map(|i| i.to_string()).collect());
    let mut out_of_range = 0;
    for e in entries.iter_mut().filter(|e| e.label >= classes.len() as i64) {
        e.label = -1;
        out_of_range += 1;
    }
    if out_of_range > 0 {
        problems.push(format!("{out_of_range} label(s) beyond the {} classes of {CLASSES_FILE}", classes.len()));
    }
    let mut counts = vec![0usize; classes.len()];
    for e in entries.iter().filter(|e| e.label >= 0) {
        counts[e.label as usize] += 1;
    }
    let empty = classes.iter().zip(&counts).filter(|(_, &n)| n == 0).map(|(c, _)| c.clone()).collect();
    let mut idx = make_index(root, split, "wds_shards", classes, empty, names, stamps, problems, entries, &ids);
    idx.header.lost = lost;
    Ok(idx)
}

/// The `<shard>\t<samples>` lines of a [`COUNTS_FILE`].
fn read_counts(path: &Path) -> Result<std::collections::HashMap<String, u64>> {
    let text = crate::fsutil::read_regular_text(path, Some(crate::fsutil::TEXT_LIMIT))?;
    let mut out = std::collections::HashMap::new();
    for (ln, line) in text.lines().enumerate().filter(|(_, l)| !l.is_empty() && !l.starts_with('#')) {
        let parsed = line.split_once('\t').and_then(|(n, c)| Some((n.to_string(), c.trim().parse::<u64>().ok()?)));
        let Some((name, count)) = parsed else {
            return Err(Error::data(path, format!("line {}: expected `<shard>\t<samples>`", ln + 1)));
        };
        out.insert(name, count);
    }
    Ok(out)
}

/// A ustar header for a regular file of `size` bytes; a name that does not fit `prefix` + `name` goes in a pax
/// `path` record before it.
fn write_header(w: &mut impl Write, name: &str, size: u64) -> std::io::Result<()> {
    if name.len() <= 100 {
        return write_block_header(w, "", name, size, b'0');
    }
    let split = name.match_indices('/').map(|(i, _)| i).find(|&i| i > 0 && i <= 155 && name.len() - i - 1 <= 100);
    if let Some(i) = split {
        return write_block_header(w, &name[..i], &name[i + 1..], size, b'0');
    }
    let rec = pax_record("path", name);
    write_block_header(w, "", "././@PaxHeader", rec.len() as u64, b'x')?;
    write_padded(w, &rec)?;
    // The ustar name is only what readers without pax see: the name's last 100 bytes or fewer.
    let mut cut = name.len() - 100;
    while !name.is_char_boundary(cut) {
        cut += 1;
    }
    write_block_header(w, "", &name[cut..], size, b'0')
}

/// `data` and zeros up to the next block boundary.
fn write_padded(w: &mut impl Write, data: &[u8]) -> std::io::Result<()> {
    w.write_all(data)?;
    let pad = (BLOCK - data.len() as u64 % BLOCK) % BLOCK;
    w.write_all(&[0u8; 512][..pad as usize])
}

fn pax_record(key: &str, value: &str) -> Vec<u8> {
    let body = format!(" {key}={value}\n");
    let mut len = body.len() + 1;
    while format!("{len}").len() + body.len() != len {
        len = format!("{len}").len() + body.len();
    }
    format!("{len}{body}").into_bytes()
}

fn write_block_header(w: &mut impl Write, prefix: &str, name: &str, size: u64, kind: u8) -> std::io::Result<()> {
    let mut b = [0u8; 512];
    b[..name.len()].copy_from_slice(name.as_bytes());
    b[100..108].copy_from_slice(b"0000644\0");
    b[108..116].copy_from_slice(b"0000000\0");
    b[116..124].copy_from_slice(b"0000000\0");
    b[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    b[136..148].copy_from_slice(b"00000000000\0");
    b[156] = kind;
    b[257..263].copy_from_slice(b"ustar\0");
    b[263..265].copy_from_slice(b"00");
    b[345..345 + prefix.len()].copy_from_slice(prefix.as_bytes());
    b[148..156].copy_from_slice(b"        ");
    let sum: u64 = b.iter().map(|&c| c as u64).sum();
    b[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    w.write_all(&b)
}

/// What `data pack` wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PackReport {
    /// The shard folder (`<out>/<split>`).
    pub dir: PathBuf,
    pub shards: usize,
    pub samples: usize,
    pub bytes: u64,
    /// Equal to the source's (checked by reopening the shards).
    pub fingerprint: Fingerprint,
}

/// `1GB`, `500MB`, `64MiB`, `100000` (bytes): decimal units (KB, MB, GB, TB) and binary ones (KiB, MiB, GiB, TiB).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num.parse().map_err(|_| format!("`{s}` is not a size such as 1GB or 500MB"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" | "k" => 1e3,
        "mb" | "m" => 1e6,
        "gb" | "g" => 1e9,
        "tb" | "t" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024f64.powi(4),
        u => return Err(format!("`{s}`: unknown unit `{u}` (KB, MB, GB, TB, KiB, MiB, GiB, TiB)")),
    };
    let bytes = v * mult;
    if !(bytes >= 1.0 && bytes < 1e15) {
        return Err(format!("`{s}` is not between 1 byte and 1 PB"));
    }
    Ok(bytes as u64)
}

/// Writes `ds` as tar shards of at most about `shard_size` bytes into `out/<split>` (which must not exist): the
/// shards are written into a temporary folder, reopened there and their fingerprint compared with `ds`'s, and only
/// then does the folder take the final name, so an interrupted or failed pack leaves no split (and an existing
/// one as it was). A second pack of the same split into `out` while one runs is refused, naming its PID.
pub fn pack(ds: &Dataset, out: &Path, shard_size: u64) -> Result<PackReport> {
    let lock = pack_lock(out, &ds.split)?;
    pack_locked(ds, out, shard_size, &lock)
}

/// The lock of packing `split` into `out` (`out/.<split>.pack.lock`), taken without waiting: a second pack of the
/// same split into the same folder gets [`Error::FolderBusy`] naming the first's PID. `data pack` takes it before
/// it opens the source, so the second is refused up front.
pub fn pack_lock(out: &Path, split: &str) -> Result<crate::fsutil::RunLock> {
    let dest = out.join(split);
    if dest.exists() {
        return Err(Error::data(&dest, "exists already: remove it or choose another --out"));
    }
    crate::fsutil::RunLock::acquire_named(out, &format!(".{split}.pack.lock"), &dest)
}

/// [`pack`] under a lock that [`pack_lock`] gave.
pub fn pack_locked(ds: &Dataset, out: &Path, shard_size: u64, _lock: &crate::fsutil::RunLock) -> Result<PackReport> {
    let dest = out.join(&ds.split);
    if dest.exists() {
        return Err(Error::data(&dest, "exists already (another pack finished it): remove it or choose another --out"));
    }
    remove_stale_packs(out, &ds.split);
    let tmp = crate::fsutil::TempDir::create(out.join(format!("{}.tmp-{}", ds.split, std::process::id())))?;
    let (shards, bytes) = write_shards(ds, tmp.path(), shard_size)?;
    crate::fsutil::fsync_dir(tmp.path())?;
    // Checked before it takes its name: reopened through a private index cache that goes with the folder.
    let tmp_name = tmp.path().file_name().and_then(|n| n.to_str()).expect("a UTF-8 name").to_string();
    let check_cache = tmp.path().join(".check-index");
    let packed = Dataset::open_with(out, &tmp_name, &OpenOptions { quiet: true, rescan: true, index_dir: Some(check_cache.clone()), ..Default::default() })?;
    let _ = std::fs::remove_dir_all(&check_cache);
    let want = ds.fingerprint()?;
    let got = Fingerprint { split: want.split.clone(), ..packed.fingerprint()? };
    if want != got || !packed.lost().is_empty() {
        return Err(Error::data(&dest, format!("the shards' fingerprint {} differs from the source's {}; nothing was kept", got.files_hash, want.files_hash)));
    }
    tmp.publish(&dest)?;
    crate::fsutil::fsync_dir(out)?;
    crate::signals::set_finished(format!("{} is complete", dest.display()));
    crate::fault::fault_point("pack", 1)?;
    Ok(PackReport { dir: dest, shards, samples: ds.len(), bytes, fingerprint: got })
}

/// Removes `<split>.tmp-<pid>` folders that a killed pack left in `out`, those whose process is gone (on this
/// machine: a pack of the same split into the same folder from another host at the same time is not supported).
fn remove_stale_packs(out: &Path, split: &str) {
    let prefix = format!("{split}.tmp-");
    let Ok(entries) = std::fs::read_dir(out) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().filter(|n| n.starts_with(&prefix)).and_then(crate::fsutil::temp_owner) else { continue };
        if !crate::fsutil::pid_alive(pid) && std::fs::remove_dir_all(e.path()).is_ok() {
            eprintln!("{}: removed, left by an interrupted pack (process {pid} is gone)", e.path().display());
        }
    }
}

fn write_shards(ds: &Dataset, dir: &Path, shard_size: u64) -> Result<(usize, u64)> {
    let mut classes = ds.classes.join("\n");
    classes.push('\n');
    crate::fsutil::write_atomic(&dir.join(CLASSES_FILE), classes.as_bytes())?;
    let mut shard: Option<(PathBuf, BufWriter<File>, u64)> = None;
    let (mut count, mut total) = (0usize, 0u64);
    let finish = |s: Option<(PathBuf, BufWriter<File>, u64)>| -> Result<()> {
        if let Some((path, mut w, _)) = s {
            // Two zero blocks end a tar.
            w.write_all(&[0u8; 1024]).map_err(|e| Error::io(&path, e))?;
            let f = w.into_inner().map_err(|e| Error::io(&path, e.into_error()))?;
            f.sync_all().map_err(|e| Error::io(&path, e))?;
        }
        Ok(())
    };
    let mut prev_key = String::new();
    let mut per_shard: Vec<u64> = Vec::new();
    for i in 0..ds.len() {
        let rel = ds.rel_path(i);
        let path = &ds.samples[i].0;
        let Some((key, _)) = split_key(&rel) else {
            return Err(Error::data(path, "a file name without an extension cannot be a WebDataset member"));
        };
        if key == prev_key {
            return Err(Error::data(path, format!("has the WebDataset key `{key}` of the file before it (names that agree up to their first dot)")));
        }
        prev_key = key.to_string();
        let bytes = ds.read_bytes(i)?;
        let label = format!("{}", ds.samples[i].1);
        let need = 4 * BLOCK + label.len() as u64 + bytes.len() as u64;
        if shard.as_ref().is_some_and(|s| s.2 > 0 && s.2 + need > shard_size) {
            finish(shard.take())?;
        }
        if shard.is_none() {
            per_shard.push(0);
            let p = dir.join(format!("shard-{count:06}.tar"));
            let f = File::options().write(true).create_new(true).open(&p).map_err(|e| Error::io(&p, e))?;
            shard = Some((p, BufWriter::with_capacity(1 << 20, f), 0));
            count += 1;
        }
        let (p, w, used) = shard.as_mut().expect("opened above");
        // The label first: a shard cut inside the image still names the sample's class.
        let write = |w: &mut BufWriter<File>| -> std::io::Result<()> {
            write_header(w, &format!("{key}.cls"), label.len() as u64)?;
            write_padded(w, label.as_bytes())?;
            write_header(w, &rel, bytes.len() as u64)?;
            write_padded(w, &bytes)
        };
        write(w).map_err(|e| Error::io(&*p, e))?;
        *used += need;
        total += bytes.len() as u64;
        *per_shard.last_mut().expect("a shard is open") += 1;
    }
    finish(shard.take())?;
    let mut counts = format!("# samples per shard, as `data pack` wrote them\n");
    for (i, n) in per_shard.iter().enumerate() {
        counts.push_str(&format!("shard-{i:06}.tar\t{n}\n"));
    }
    crate::fsutil::write_atomic(&dir.join(COUNTS_FILE), counts.as_bytes())?;
    Ok((count, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(names: &[(&str, &[u8])]) -> Vec<u8> {
        let mut v = Vec::new();
        for (n, d) in names {
            write_header(&mut v, n, d.len() as u64).unwrap();
            write_padded(&mut v, d).unwrap();
        }
        v.extend_from_slice(&[0u8; 1024]);
        v
    }

    #[test]
    fn headers_round_trip_with_long_names_and_truncation_is_reported() {
        let long_dir = "d".repeat(120);
        let very_long = format!("{}/{}.jpg", "x".repeat(200), "é".repeat(80));
        let files: Vec<(String, Vec<u8>)> = vec![
            ("a/k1.cls".into(), b"3".to_vec()),
            ("a/k1.jpg".into(), vec![7u8; 700]),
            (format!("{long_dir}/k2.jpeg"), vec![1u8; 3]),
            (very_long.clone(), vec![2u8; 512]),
        ];
        let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect();
        let bytes = tar_of(&refs);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.tar");
        std::fs::write(&p, &bytes).unwrap();
        let (members, problem) = read_members(&p).unwrap();
        assert_eq!(problem, None);
        let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, files.iter().map(|f| f.0.as_str()).collect::<Vec<_>>());
        for (m, (_, d)) in members.iter().zip(&files) {
            assert_eq!(&bytes[m.offset as usize..][..m.size as usize], d.as_slice(), "{}", m.name);
        }
        // Cut inside the second member's data: that member is not listed, and the stop is its header.
        std::fs::write(&p, &bytes[..members[1].offset as usize + 100]).unwrap();
        let (cut, problem) = read_members(&p).unwrap();
        assert_eq!(cut.len(), 1);
        let (at, why) = scan_members(&p).unwrap().1.unwrap();
        assert_eq!(at, members[1].offset - 512);
        assert!(why.contains("ends inside member `a/k1.jpg`") && problem.as_deref() == Some(why.as_str()), "{why}");
        let mut bad = bytes.clone();
        bad[10] ^= 1;
        std::fs::write(&p, &bad).unwrap();
        assert!(read_members(&p).unwrap().1.unwrap().contains("checksum"));
    }

    #[test]
    fn keys_split_at_the_first_dot_of_the_file_name() {
        assert_eq!(split_key("n01/n01_1.JPEG"), Some(("n01/n01_1", "JPEG")));
        assert_eq!(split_key("a.b/img.v2.jpg"), Some(("a.b/img", "v2.jpg")));
        assert_eq!(split_key("dir/.hidden"), None);
        assert_eq!(split_key("noext"), None);
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert!(parse_size("12 parsecs").is_err());
    }
}
