//! Datasets as people keep them on disk: ImageFolder trees (`root/<split>/<class>/**/*.jpg`) and ImageNet's flat
//! validation folder (`val/ILSVRC2012_val_%08d.JPEG` plus a labels file). Class indices are the sorted folder
//! names, as torchvision's `ImageFolder`, so labels agree with PyTorch checkpoints.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// File extensions taken as images (case-insensitive).
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png"];

#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// An empty class folder is an error instead of a warning.
    pub strict: bool,
    /// No warnings on stderr.
    pub quiet: bool,
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
    /// `image_folder` or `imagenet_val_flat`.
    pub layout: &'static str,
}

/// What identifies a dataset in a results record.
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

fn read_dir_sorted(dir: &Path) -> Result<Vec<(String, PathBuf, bool)>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            return Err(Error::data(path, "file name is not valid UTF-8"));
        };
        // Follows symlinks, as torchvision's os.walk(followlinks=True).
        let is_dir = path.is_dir();
        out.push((name, path, is_dir));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn walk_images(dir: &Path, out: &mut Vec<PathBuf>, depth: usize) -> Result<()> {
    if depth > 32 {
        return Err(Error::data(dir, "folders nested too deep (a symlink loop?)"));
    }
    for (_, path, is_dir) in read_dir_sorted(dir)? {
        if is_dir {
            walk_images(&path, out, depth + 1)?;
        } else if is_image(&path) {
            out.push(path);
        }
    }
    Ok(())
}

impl Dataset {
    /// Opens `root/split` with default options (empty class folders are warned about and kept).
    pub fn open(root: &Path, split: &str) -> Result<Dataset> {
        Self::open_with(root, split, &OpenOptions::default())
    }

    pub fn open_with(root: &Path, split: &str, opts: &OpenOptions) -> Result<Dataset> {
        match std::fs::metadata(root) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(Error::data(root, "data root is not a directory")),
            Err(e) => return Err(Error::data(root, format!("cannot read data root: {e}"))),
        }
        std::fs::read_dir(root).map_err(|e| Error::data(root, format!("cannot read data root: {e}")))?;
        let dir = root.join(split);
        if !dir.is_dir() && std::fs::symlink_metadata(&dir).is_ok() {
            return Err(Error::data(&dir, format!("split `{split}` is not a folder (a file, or a symlink to nothing)")));
        }
        if !dir.is_dir() {
            let have: Vec<String> =
                read_dir_sorted(root)?.into_iter().filter(|(_, _, d)| *d).map(|(n, _, _)| n).collect();
            let have = if have.is_empty() { "no folders".to_string() } else { have.join(", ") };
            return Err(Error::data(&dir, format!("missing split `{split}` (the root has: {have})")));
        }
        let entries = read_dir_sorted(&dir)?;
        let class_dirs: Vec<_> = entries.iter().filter(|(_, _, d)| *d).collect();
        if class_dirs.is_empty() {
            if entries.iter().any(|(n, _, _)| n.starts_with("ILSVRC2012_val_")) {
                return Self::open_imagenet_val_flat(root, split, &dir, &entries);
            }
            return Err(Error::data(&dir, "no class folders (expected <split>/<class>/*.jpg)"));
        }
        let classes: Vec<String> = class_dirs.iter().map(|(n, _, _)| n.clone()).collect();
        let per_class: Vec<Result<Vec<PathBuf>>> = class_dirs
            .par_iter()
            .map(|(_, p, _)| {
                let mut v = Vec::new();
                walk_images(p, &mut v, 0)?;
                Ok(v)
            })
            .collect();
        let mut samples = Vec::new();
        let mut empty_classes = Vec::new();
        for (ci, files) in per_class.into_iter().enumerate() {
            let files = files?;
            if files.is_empty() {
                let path = &class_dirs[ci].1;
                if opts.strict {
                    return Err(Error::data(path, "empty class folder (no .jpg/.jpeg/.png files)"));
                }
                if !opts.quiet {
                    eprintln!(
                        "warning: {}: empty class folder (no .jpg/.jpeg/.png files); class kept, no samples",
                        path.display()
                    );
                }
                empty_classes.push(classes[ci].clone());
            }
            samples.extend(files.into_iter().map(|p| (p, ci as i64)));
        }
        if samples.is_empty() {
            return Err(Error::data(&dir, "no images in any class folder"));
        }
        Ok(Dataset { dir, split: split.to_string(), samples, classes, empty_classes, layout: "image_folder" })
    }

    /// `val/ILSVRC2012_val_%08d.JPEG`. Labels come from either `LOC_val_solution.csv` (wnid per image) or
    /// `ILSVRC2012_validation_ground_truth.txt` (1-based ILSVRC2012 ids, in file-number order) together with
    /// `map_clsloc.txt` (`wnid id name` lines) to turn ids into wnids. Indices are the sorted wnids, which are the
    /// train folder names, so both splits share one label space.
    fn open_imagenet_val_flat(
        root: &Path,
        split: &str,
        dir: &Path,
        entries: &[(String, PathBuf, bool)],
    ) -> Result<Dataset> {
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
            classes.extend(read_dir_sorted(&train)?.into_iter().filter(|e| e.2).map(|e| e.0));
        }
        classes.sort();
        classes.dedup();
        let index: HashMap<&str, i64> = classes.iter().enumerate().map(|(i, c)| (c.as_str(), i as i64)).collect();
        let mut samples = Vec::new();
        for (name, path, is_dir) in entries {
            if *is_dir || !is_image(path) {
                continue;
            }
            let num = name
                .strip_prefix("ILSVRC2012_val_")
                .and_then(|s| s.split('.').next())
                .and_then(|s| s.parse::<u32>().ok());
            let Some(wnid) = num.and_then(|n| wnid_of.get(&n)) else {
                return Err(Error::data(path, "no label for this file in the ground-truth file"));
            };
            samples.push((path.clone(), index[wnid.as_str()]));
        }
        if samples.is_empty() {
            return Err(Error::data(dir, "no images"));
        }
        Ok(Dataset {
            dir: dir.to_path_buf(),
            split: split.to_string(),
            samples,
            classes,
            empty_classes: Vec::new(),
            layout: "imagenet_val_flat",
        })
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Images per class index.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.classes.len()];
        for (_, l) in &self.samples {
            c[*l as usize] += 1;
        }
        c
    }

    /// Stats every file (in parallel) and hashes the sorted relative paths with their sizes.
    pub fn fingerprint(&self) -> Result<Fingerprint> {
        let mut rel: Vec<(String, u64)> = self
            .samples
            .par_iter()
            .map(|(p, _)| {
                let size = std::fs::metadata(p).map_err(|e| Error::io(p, e))?.len();
                let r = p.strip_prefix(&self.dir).unwrap_or(p).to_string_lossy().replace('\\', "/");
                Ok((r, size))
            })
            .collect::<Result<_>>()?;
        rel.sort();
        let mut h = Sha256::new();
        for (r, s) in &rel {
            h.update(format!("{r}\t{s}\n").as_bytes());
        }
        let files_hash = hex::encode(h.finalize());
        let classes_hash = hex::encode(Sha256::digest(self.classes.join("\n").as_bytes()));
        Ok(Fingerprint {
            split: self.split.clone(),
            num_files: self.samples.len(),
            num_classes: self.classes.len(),
            classes_hash,
            files_hash,
        })
    }
}
