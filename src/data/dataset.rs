//! Datasets as people keep them on disk: ImageFolder trees (`root/<split>/<class>/**/*.jpg`) and ImageNet's flat
//! validation folder (`val/ILSVRC2012_val_%08d.JPEG` plus a labels file). Class indices are the sorted folder
//! names, as torchvision's `ImageFolder`, so labels agree with PyTorch checkpoints.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;

use super::index::{self, DatasetIndex, Entry, FileId, Header, IndexCache, IndexSource, Lost, Stamp};
use super::shards::ShardSet;
use crate::error::{Error, Result};

/// How a run opens its splits (`--rescan`, `--content-key`): carried by each request, not held by the process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ScanFlags {
    /// Walk the folders even when the cached index is up to date.
    pub rescan: bool,
    /// Key the caches by a hash of every file's bytes.
    pub content_key: bool,
}

/// File extensions taken as images (case-insensitive).
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png"];

#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// An empty class folder is an error instead of a warning.
    pub strict: bool,
    /// No warnings on stderr.
    pub quiet: bool,
    /// Walk the folders even when the cached index is up to date (`--rescan`).
    pub rescan: bool,
    /// Key the caches by a hash of every file's bytes instead of their times and inodes (`--content-key`): reads the
    /// whole split once per open, for file systems whose times cannot be trusted.
    pub content_key: bool,
    /// Folder of the index cache (None: [`index::default_dir`]).
    pub index_dir: Option<PathBuf>,
    /// Every rank of a job opens the split at this point: rank 0 makes or reads the index and sends it to the
    /// others ([`Dataset::open_on_all_ranks`]).
    pub all_ranks: bool,
}

#[derive(Clone, Debug)]
pub struct Dataset {
    /// `root/split`.
    pub dir: PathBuf,
    pub split: String,
    /// (path, class index), in torchvision's order: classes sorted, files sorted within each class.
    pub samples: Vec<(PathBuf, i64)>,
    pub classes: Vec<String>,
    /// Class folders without any image, kept in `classes` so that the other indices stay those of the sorted
    /// folder names.
    pub empty_classes: Vec<String>,
    /// `image_folder`, `imagenet_val_flat` or `wds_shards` (tar shards, see [`super::shards`]).
    pub layout: &'static str,
    /// Bytes of each sample, the sizes its fingerprint hashes.
    pub sizes: Vec<u64>,
    /// Where the index came from: a scan, the cache, or rank 0.
    pub index: IndexSource,
    /// Tar shards: where each sample's bytes lie.
    shards: Option<Arc<ShardSet>>,
    fingerprint: Fingerprint,
    cache_key: String,
    /// Tar shards: samples known to be lost (see [`Lost`]).
    lost: Vec<Lost>,
}

/// What identifies a dataset in a results record. A folder and the tar shards packed from it have the same.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Fingerprint {
    pub split: String,
    pub num_files: usize,
    pub num_classes: usize,
    /// sha256 of the class names joined by newlines.
    pub classes_hash: String,
    /// sha256 of "relative/path\tsize\n" over the sorted relative paths.
    pub files_hash: String,
}

fn is_image(p: &Path) -> bool {
    p.extension().and_then(|e| e.to_str()).is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// A directory entry with its type from the listing: a symlink is followed (one stat), anything else is not
/// stat-ed at all.
pub(crate) struct Item {
    pub name: String,
    pub entry: std::fs::DirEntry,
    pub is_dir: bool,
    pub is_link: bool,
}

impl Item {
    /// The file's size, modification time and inode (following a symlink): the one metadata call per file.
    fn size(&self) -> Result<(u64, FileId)> {
        let m = if self.is_link { std::fs::metadata(self.entry.path()) } else { self.entry.metadata() };
        m.map(|m| (m.len(), FileId::of(&m))).map_err(|e| Error::io(self.entry.path(), e))
    }
}

/// The entries of `dir` sorted by name.
pub(crate) fn read_dir_sorted(dir: &Path) -> Result<Vec<Item>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            return Err(Error::data(entry.path(), "file name is not valid UTF-8"));
        };
        let ft = entry.file_type().map_err(|e| Error::io(entry.path(), e))?;
        // Follows symlinks, as torchvision's os.walk(followlinks=True) and DirEntry.is_dir().
        let is_dir = if ft.is_symlink() { entry.path().is_dir() } else { ft.is_dir() };
        out.push(Item { name, entry, is_dir, is_link: ft.is_symlink() });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The images under `dir/rel` in walk order (sorted names, folders entered where they sort), with their sizes,
/// and the stamps of the folders walked.
fn walk_images(dir: &Path, rel: &str, depth: usize, files: &mut Vec<(String, (u64, FileId))>, stamps: &mut Vec<Stamp>) -> Result<()> {
    let path = dir.join(rel);
    if depth > 32 {
        return Err(Error::data(&path, "folders nested too deep (a symlink loop?)"));
    }
    stamps.push(index::stamp(dir, rel)?);
    for item in read_dir_sorted(&path)? {
        let child = format!("{rel}/{}", item.name);
        if item.is_dir {
            walk_images(dir, &child, depth + 1, files, stamps)?;
        } else if is_image(Path::new(&item.name)) {
            files.push((child, item.size()?));
        }
    }
    Ok(())
}

fn layout_name(s: &str) -> &'static str {
    match s {
        "imagenet_val_flat" => "imagenet_val_flat",
        "wds_shards" => "wds_shards",
        _ => "image_folder",
    }
}

impl Dataset {
    /// Opens `root/split` with default options (empty class folders are warned about and kept).
    pub fn open(root: &Path, split: &str) -> Result<Dataset> {
        Self::open_with(root, split, &OpenOptions::default())
    }

    /// Opens `root/split` on every rank of a job: rank 0 reads or makes the index and sends it to the others
    /// (see [`index::shared_by_rank0`]); every rank must call it at the same point.
    pub fn open_on_all_ranks(root: &Path, split: &str, scan: ScanFlags) -> Result<Dataset> {
        Self::open_with(root, split, &OpenOptions { all_ranks: true, rescan: scan.rescan, content_key: scan.content_key, ..Default::default() })
    }

    pub fn open_with(root: &Path, split: &str, opts: &OpenOptions) -> Result<Dataset> {
        let dir = root.join(split);
        let make = || -> Result<(DatasetIndex, IndexSource)> {
            check_root(root, split, &dir)?;
            let cache = opts.index_dir.clone().or_else(index::default_dir).map(|d| IndexCache::new(&d, root, split));
            if !opts.rescan {
                if let Some(c) = cache.as_ref() {
                    match c.load(&dir) {
                        Ok(Some(idx)) => return Ok((idx, IndexSource::Cache)),
                        Ok(None) => {}
                        Err(why) if !opts.quiet => eprintln!("warning: {}: the cached dataset index is not usable ({why}); walking {} again", c.path.display(), dir.display()),
                        Err(_) => {}
                    }
                }
            }
            let start = std::time::SystemTime::now();
            let idx = scan(root, split, &dir)?;
            if let Some(c) = cache.as_ref().filter(|_| idx.header.layout != "imagenet_val_flat") {
                if let Err(e) = c.store(&idx, start) {
                    if !opts.quiet {
                        eprintln!("warning: cannot keep the dataset index: {e}");
                    }
                }
            }
            Ok((idx, IndexSource::Scan))
        };
        let (idx, source) = if opts.all_ranks { index::shared_by_rank0(&dir, make)? } else { make()? };
        for p in &idx.header.problems {
            if opts.strict {
                return Err(Error::data(&dir, p.clone()));
            }
            if !opts.quiet {
                eprintln!("warning: {}: {p}", dir.display());
            }
        }
        for c in &idx.header.empty_classes {
            let path = dir.join(c);
            if opts.strict {
                return Err(Error::data(path, "empty class folder (no .jpg/.jpeg/.png files)"));
            }
            if !opts.quiet {
                eprintln!("warning: {}: empty class folder (no .jpg/.jpeg/.png files); class kept, no samples", path.display());
            }
        }
        let mut ds = Dataset::from_index(dir, split, idx, source);
        if opts.content_key {
            let make = || {
                if !opts.quiet {
                    eprintln!("{}: content key: reading every file of the split ({} samples)", ds.dir.display(), ds.len());
                }
                ds.content_key()
            };
            // Once per job: rank 0 reads the bytes, the others wait for its key on the store.
            ds.cache_key = if opts.all_ranks { index::string_from_rank0("content key", &ds.dir, make)? } else { make()? };
        }
        Ok(ds)
    }

    /// `content-` and the sha256 of the fingerprint and of every file's own sha256 (each shard's for tar shards), in
    /// sample order, read in parallel: a rewrite that keeps a file's size, time and inode still changes it.
    fn content_key(&self) -> Result<String> {
        use sha2::{Digest, Sha256};
        let files: Vec<&Path> = match &self.shards {
            Some(s) => s.paths().iter().map(PathBuf::as_path).collect(),
            None => self.samples.iter().map(|(p, _)| p.as_path()).collect(),
        };
        let sums = files.par_iter().map(|p| crate::fsutil::sha256_file(p)).collect::<Result<Vec<String>>>()?;
        let mut h = Sha256::new();
        h.update(serde_json::to_vec(&self.fingerprint).expect("the fingerprint serialises"));
        for (p, sum) in files.iter().zip(&sums) {
            h.update(format!("\n{}\t{sum}", p.strip_prefix(&self.dir).unwrap_or(p).display()).as_bytes());
        }
        Ok(format!("content-{}", hex::encode(h.finalize())))
    }

    fn from_index(dir: PathBuf, split: &str, idx: DatasetIndex, index: IndexSource) -> Dataset {
        let DatasetIndex { header, entries } = idx;
        let layout = layout_name(&header.layout);
        let shards = (layout == "wds_shards").then(|| Arc::new(ShardSet::new(&dir, &header.shards, &entries)));
        let sizes = entries.iter().map(|e| e.size).collect();
        let lost = header.lost;
        // Consumed: each relative path is freed as its full path is made (ImageNet's 1.28 M strings).
        let samples = entries
            .into_iter()
            .map(|e| {
                let p = if shards.is_some() { dir.join(&header.shards[e.shard as usize]).join(&e.rel) } else { dir.join(&e.rel) };
                (p, e.label)
            })
            .collect();
        Dataset {
            sizes,
            dir,
            split: split.to_string(),
            samples,
            classes: header.classes,
            empty_classes: header.empty_classes,
            layout,
            index,
            shards,
            fingerprint: header.fingerprint,
            cache_key: header.cache_key,
            lost,
        }
    }

    /// `val/ILSVRC2012_val_%08d.JPEG`. Labels come from either `LOC_val_solution.csv` (wnid per image) or
    /// `ILSVRC2012_validation_ground_truth.txt` (1-based ILSVRC2012 ids, in file-number order) together with
    /// `map_clsloc.txt` (`wnid id name` lines) to turn ids into wnids. Indices are the sorted wnids, which are the
    /// train folder names, so both splits share one label space.
    fn scan_imagenet_val_flat(root: &Path, split: &str, dir: &Path, entries: &[Item]) -> Result<DatasetIndex> {
        let search = [root.to_path_buf(), root.join("anno"), dir.to_path_buf(), root.join("devkit/data")];
        let find = |name: &str| search.iter().map(|d| d.join(name)).find(|p| p.is_file());
        let read = |p: &Path| crate::fsutil::read_regular_text(p, Some(crate::fsutil::TEXT_LIMIT << 2));

        let mut wnid_of: HashMap<u32, String> = HashMap::new(); // file number -> wnid
        if let Some(csv) = find("LOC_val_solution.csv") {
            for (ln, line) in read(&csv)?.lines().enumerate().skip(1) {
                let mut it = line.splitn(2, ',');
                let (Some(id), Some(pred)) = (it.next(), it.next()) else { continue };
                let num = id.trim().strip_prefix("ILSVRC2012_val_").and_then(|n| n.parse::<u32>().ok());
                let wnid = pred.split_whitespace().next();
                match (num, wnid) {
                    (Some(n), Some(w)) => {
                        wnid_of.insert(n, w.to_string());
                    }
                    _ => return Err(Error::data(&csv, format!("line {}: cannot parse `{line}`", ln + 1))),
                }
            }
        } else if let Some(gt) = find("ILSVRC2012_validation_ground_truth.txt") {
            let Some(map) = find("map_clsloc.txt") else {
                return Err(Error::data(
                    &gt,
                    "ILSVRC2012 ids need map_clsloc.txt (`wnid id name` per line) beside it to become class folders; \
                     or arrange val/ in class folders",
                ));
            };
            let mut id_to_wnid = HashMap::new();
            for (ln, line) in read(&map)?.lines().enumerate() {
                let f: Vec<&str> = line.split_whitespace().collect();
                if f.is_empty() {
                    continue;
                }
                match f.get(1).and_then(|s| s.parse::<u32>().ok()) {
                    Some(id) => id_to_wnid.insert(id, f[0].to_string()),
                    None => return Err(Error::data(&map, format!("line {}: expected `wnid id name`", ln + 1))),
                };
            }
            for (ln, line) in read(&gt)?.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                match line.parse::<u32>().ok().and_then(|id| id_to_wnid.get(&id)) {
                    Some(w) => wnid_of.insert(ln as u32 + 1, w.clone()),
                    None => {
                        return Err(Error::data(
                            &gt,
                            format!("line {}: `{line}` is not an id in {}", ln + 1, map.display()),
                        ))
                    }
                };
            }
        } else {
            return Err(Error::data(
                dir,
                "flat ImageNet val needs LOC_val_solution.csv, or ILSVRC2012_validation_ground_truth.txt with \
                 map_clsloc.txt, in the root, root/anno or the split folder",
            ));
        }
        let mut classes: Vec<String> = wnid_of.values().cloned().collect();
        let train = root.join("train");
        if train.is_dir() {
            // The train folders define the label space when present (a class may be absent from val).
            classes.extend(read_dir_sorted(&train)?.into_iter().filter(|e| e.is_dir).map(|e| e.name));
        }
        classes.sort();
        classes.dedup();
        let index: HashMap<&str, i64> = classes.iter().enumerate().map(|(i, c)| (c.as_str(), i as i64)).collect();
        let mut files = Vec::new();
        for item in entries {
            if item.is_dir || !is_image(Path::new(&item.name)) {
                continue;
            }
            let num = item
                .name
                .strip_prefix("ILSVRC2012_val_")
                .and_then(|s| s.split('.').next())
                .and_then(|s| s.parse::<u32>().ok());
            let Some(wnid) = num.and_then(|n| wnid_of.get(&n)) else {
                return Err(Error::data(item.entry.path(), "no label for this file in the ground-truth file"));
            };
            files.push((item, index[wnid.as_str()]));
        }
        if files.is_empty() {
            return Err(Error::data(dir, "no images"));
        }
        let (entries, ids): (Vec<Entry>, Vec<FileId>) = files
            .par_iter()
            .map(|(item, label)| {
                let (size, id) = item.size()?;
                Ok((Entry { rel: item.name.clone(), label: *label, size, shard: 0, offset: 0 }, id))
            })
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .unzip();
        // No stamps: the labels come from files outside the split, so this layout is not cached.
        Ok(make_index(root, split, "imagenet_val_flat", classes, Vec::new(), Vec::new(), Vec::new(), Vec::new(), entries, &ids))
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Images per class index (a shard sample without a label counts nowhere).
    pub fn class_counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.classes.len()];
        for (_, l) in &self.samples {
            if let Some(n) = usize::try_from(*l).ok().and_then(|l| c.get_mut(l)) {
                *n += 1;
            }
        }
        c
    }

    /// The fingerprint, computed when the index was made (no file is read).
    pub fn fingerprint(&self) -> Result<Fingerprint> {
        Ok(self.fingerprint.clone())
    }

    /// The samples `rows` (indices into this split, in that order) as a dataset of their own, for a protocol that
    /// reads only some rows (low-shot's subsets): the split's fingerprint, a cache key that adds the rows, and none
    /// of the split's lost samples (they are not among its samples).
    pub fn select(&self, rows: &[usize]) -> Result<Dataset> {
        use sha2::{Digest, Sha256};
        if let Some(&bad) = rows.iter().find(|&&i| i >= self.samples.len()) {
            return Err(Error::data(&self.dir, format!("row {bad} is beyond the split's {} samples", self.samples.len())));
        }
        let mut h = Sha256::new();
        for &i in rows {
            h.update((i as u64).to_le_bytes());
        }
        Ok(Dataset {
            samples: rows.iter().map(|&i| self.samples[i].clone()).collect(),
            sizes: rows.iter().map(|&i| self.sizes[i]).collect(),
            shards: self.shards.as_ref().map(|s| Arc::new(s.select(rows))),
            cache_key: format!("{}+rows-{}", self.cache_key, &hex::encode(h.finalize())[..16]),
            lost: Vec::new(),
            ..self.clone()
        })
    }

    /// The key of the caches made from this split (the feature cache): the fingerprint plus each file's
    /// modification time and inode when the folders were last walked (see [`index::cache_key`]).
    pub fn cache_key(&self) -> &str {
        &self.cache_key
    }

    /// Tar shards: the samples known to be lost at open (a cut or corrupt shard), each naming its shard.
    pub fn lost(&self) -> &[Lost] {
        &self.lost
    }

    /// The lost samples as the record lists them: `<split folder>/<shard>#<n>` ([`Lost::names`]).
    pub fn lost_paths(&self) -> Vec<PathBuf> {
        self.lost.iter().flat_map(|l| l.names()).map(|n| self.dir.join(n)).collect()
    }

    /// The bytes of sample `i`: its file, or its member of a tar shard. Errors name the file (or shard/member).
    pub fn read_bytes(&self, i: usize) -> Result<Vec<u8>> {
        let (path, label) = &self.samples[i];
        match &self.shards {
            Some(s) => s.read(i, self.sizes[i], *label, path),
            None => crate::fsutil::read_regular(path, Some(crate::fsutil::IMAGE_LIMIT)).map_err(|e| match e {
                // The index names a file that is gone: say where that list came from and how to refresh it.
                Error::Io { io, .. } if io.kind() == std::io::ErrorKind::NotFound && self.index != IndexSource::Scan => Error::data(
                    path,
                    format!("no such file, though the dataset index ({}) lists it: it was removed or renamed since the folders were walked, without its folder's time changing; run again with --rescan to walk them again", self.index.describe()),
                ),
                other => other,
            }),
        }
    }

    /// Sample `i`'s path relative to the split folder (for a shard sample: its member name).
    pub fn rel_path(&self, i: usize) -> String {
        let p = &self.samples[i].0;
        let rel = p.strip_prefix(&self.dir).unwrap_or(p);
        let rel: PathBuf = if self.shards.is_some() { rel.components().skip(1).collect() } else { rel.to_path_buf() };
        rel.to_string_lossy().into_owned()
    }
}

/// The root must be a readable folder and hold the split; the error lists the folders it has otherwise.
fn check_root(root: &Path, split: &str, dir: &Path) -> Result<()> {
    match std::fs::metadata(root) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(Error::data(root, "data root is not a directory")),
        Err(e) => return Err(Error::data(root, format!("cannot read data root: {e}"))),
    }
    std::fs::read_dir(root).map_err(|e| Error::data(root, format!("cannot read data root: {e}")))?;
    if !dir.is_dir() && std::fs::symlink_metadata(dir).is_ok() {
        return Err(Error::data(dir, format!("split `{split}` is not a folder (a file, or a symlink to nothing)")));
    }
    if !dir.is_dir() {
        let have: Vec<String> = read_dir_sorted(root)?.into_iter().filter(|e| e.is_dir).map(|e| e.name).collect();
        let have = if have.is_empty() { "no folders".to_string() } else { have.join(", ") };
        return Err(Error::data(dir, format!("missing split `{split}` (the root has: {have})")));
    }
    Ok(())
}

/// Walks `root/split`: an ImageFolder tree, a folder of tar shards, or ImageNet's flat val.
fn scan(root: &Path, split: &str, dir: &Path) -> Result<DatasetIndex> {
    let entries = read_dir_sorted(dir)?;
    let class_dirs: Vec<&Item> = entries.iter().filter(|e| e.is_dir).collect();
    if class_dirs.is_empty() {
        if entries.iter().any(|e| super::shards::is_shard_name(&e.name)) {
            return super::shards::scan(root, split, dir, &entries);
        }
        if entries.iter().any(|e| e.name.starts_with("ILSVRC2012_val_")) {
            return Dataset::scan_imagenet_val_flat(root, split, dir, &entries);
        }
        return Err(Error::data(dir, "no class folders (expected <split>/<class>/*.jpg, or tar shards)"));
    }
    let classes: Vec<String> = class_dirs.iter().map(|e| e.name.clone()).collect();
    let per_class: Vec<Result<(Vec<(String, (u64, FileId))>, Vec<Stamp>)>> = class_dirs
        .par_iter()
        .map(|e| {
            let (mut files, mut stamps) = (Vec::new(), Vec::new());
            walk_images(dir, &e.name, 0, &mut files, &mut stamps)?;
            Ok((files, stamps))
        })
        .collect();
    let mut stamps = vec![index::stamp(dir, "")?];
    let (mut files, mut ids) = (Vec::new(), Vec::new());
    let mut empty_classes = Vec::new();
    for (ci, r) in per_class.into_iter().enumerate() {
        let (f, s) = r?;
        if f.is_empty() {
            empty_classes.push(classes[ci].clone());
        }
        stamps.extend(s);
        for (rel, (size, id)) in f {
            files.push(Entry { rel, label: ci as i64, size, shard: 0, offset: 0 });
            ids.push(id);
        }
    }
    if files.is_empty() {
        return Err(Error::data(dir, "no images in any class folder"));
    }
    Ok(make_index(root, split, "image_folder", classes, empty_classes, Vec::new(), stamps, Vec::new(), files, &ids))
}

/// An index with its fingerprint and cache key (`ids`: each entry's file identity, parallel to `entries`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn make_index(
    root: &Path,
    split: &str,
    layout: &str,
    classes: Vec<String>,
    empty_classes: Vec<String>,
    shards: Vec<String>,
    stamps: Vec<Stamp>,
    problems: Vec<String>,
    entries: Vec<Entry>,
    ids: &[FileId],
) -> DatasetIndex {
    let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf()).to_string_lossy().into_owned();
    let fingerprint = index::fingerprint(split, &classes, &entries);
    let header = Header {
        version: index::VERSION,
        root,
        split: split.to_string(),
        layout: layout.to_string(),
        cache_key: index::cache_key(&fingerprint, &entries, ids),
        lost: Vec::new(),
        fingerprint,
        classes,
        empty_classes,
        shards,
        stamps,
        problems,
        count: entries.len() as u64,
    };
    DatasetIndex { header, entries }
}
