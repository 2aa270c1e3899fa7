//! The demo dataset: Debian's Fashion-MNIST (package `dataset-fashion-mnist`, gzipped IDX files) written as an
//! ImageFolder tree of 28x28 greyscale JPEGs. Class folders are prefixed with the label so that their sorted
//! order, and so the ImageFolder indices, equal the original labels.
use std::io::Read;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::error::{Error, Result};

pub const CLASS_NAMES: [&str; 10] = [
    "0_tshirt_top",
    "1_trouser",
    "2_pullover",
    "3_dress",
    "4_coat",
    "5_sandal",
    "6_shirt",
    "7_sneaker",
    "8_bag",
    "9_ankle_boot",
];

pub const DEFAULT_SOURCE: &str = "/usr/share/datasets/fashion-mnist";
const JPEG_QUALITY: u8 = 95;
const MANIFEST: &str = "lmim-manifest.json";

/// `$LMIM_FASHION_MNIST`, else Debian's location.
pub fn default_source() -> PathBuf {
    std::env::var_os("LMIM_FASHION_MNIST").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEFAULT_SOURCE))
}

#[derive(Clone, Debug)]
pub struct PrepareOptions {
    pub source: PathBuf,
    pub out: PathBuf,
    pub train_per_class: usize,
    /// None: the whole test split.
    pub val_per_class: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub kind: String,
    pub version: u32,
    /// The options that made the tree; equal options mean the tree can be reused.
    pub options: serde_json::Value,
    pub train_images: usize,
    pub val_images: usize,
    pub classes: Vec<String>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct PrepareReport {
    pub out: PathBuf,
    pub train_images: usize,
    pub val_images: usize,
    /// The tree was already there with the same options.
    pub reused: bool,
}

fn read_gz(path: &Path) -> Result<Vec<u8>> {
    let f = crate::fsutil::open_regular(path, None)?;
    let mut buf = Vec::new();
    flate2::read::GzDecoder::new(f)
        .read_to_end(&mut buf)
        .map_err(|e| Error::data(path, format!("cannot gunzip: {e}")))?;
    Ok(buf)
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// An IDX3 image file: (count, rows, cols, pixels).
pub fn read_idx_images(path: &Path) -> Result<(usize, usize, usize, Vec<u8>)> {
    let b = read_gz(path)?;
    if b.len() < 16 || be32(&b, 0) != 0x0803 {
        return Err(Error::data(path, "not an IDX image file (magic 0x00000803)"));
    }
    let (n, r, c) = (be32(&b, 4) as usize, be32(&b, 8) as usize, be32(&b, 12) as usize);
    if b.len() != 16 + n * r * c {
        return Err(Error::data(path, format!("IDX size mismatch: {n}x{r}x{c} images but {} bytes", b.len() - 16)));
    }
    Ok((n, r, c, b[16..].to_vec()))
}

/// An IDX1 label file.
pub fn read_idx_labels(path: &Path) -> Result<Vec<u8>> {
    let b = read_gz(path)?;
    if b.len() < 8 || be32(&b, 0) != 0x0801 {
        return Err(Error::data(path, "not an IDX label file (magic 0x00000801)"));
    }
    let n = be32(&b, 4) as usize;
    if b.len() != 8 + n {
        return Err(Error::data(path, format!("IDX size mismatch: {n} labels but {} bytes", b.len() - 8)));
    }
    Ok(b[8..].to_vec())
}

/// Reads an existing manifest of a tree made by this crate.
pub fn read_manifest(out: &Path) -> Option<Manifest> {
    let s = std::fs::read_to_string(out.join(MANIFEST)).ok()?;
    serde_json::from_str(&s).ok()
}

/// Where a generated tree goes: refuses to replace a non-empty folder it did not make.
pub(crate) fn check_replaceable(out: &Path) -> Result<()> {
    if !out.exists() || read_manifest(out).is_some() {
        return Ok(());
    }
    let empty = std::fs::read_dir(out).map_err(|e| Error::io(out, e))?.next().is_none();
    if empty {
        Ok(())
    } else {
        Err(Error::data(
            out,
            format!("exists, is not empty and has no {MANIFEST}; not replacing it (choose another --out)"),
        ))
    }
}

/// Builds the tree in a sibling temporary folder by `fill`, then moves it into place.
pub(crate) fn write_tree(out: &Path, manifest: &Manifest, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    check_replaceable(out)?;
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let name = out.file_name().ok_or_else(|| Error::data(out, "not a folder name"))?.to_string_lossy();
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let res = fill(&tmp).and_then(|()| {
        let m = serde_json::to_string_pretty(manifest).expect("manifest serialises");
        std::fs::write(tmp.join(MANIFEST), m + "\n").map_err(|e| Error::io(tmp.join(MANIFEST), e))
    });
    if let Err(e) = res {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(|e| Error::io(out, e))?;
    }
    std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))
}

pub(crate) fn encode_jpeg(pixels: &[u8], w: u32, h: u32, gray: bool, quality: u8) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    let ty = if gray { image::ExtendedColorType::L8 } else { image::ExtendedColorType::Rgb8 };
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, quality)
        .encode(pixels, w, h, ty)
        .map_err(|e| Error::data("<jpeg encoder>", e.to_string()))?;
    Ok(buf)
}

/// `lmim-bench data prepare-demo`.
pub fn prepare_demo(opts: &PrepareOptions) -> Result<PrepareReport> {
    let src = &opts.source;
    let files = [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ];
    if let Some(missing) = files.iter().map(|f| src.join(f)).find(|p| !p.is_file()) {
        return Err(Error::data(
            missing,
            "Fashion-MNIST not found: install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist) \
             or pass --source (or set LMIM_FASHION_MNIST) to a folder with the four .gz IDX files",
        ));
    }
    let options = serde_json::json!({
        "train_per_class": opts.train_per_class,
        "val_per_class": opts.val_per_class,
        "jpeg_quality": JPEG_QUALITY,
    });
    if let Some(m) = read_manifest(&opts.out) {
        if m.kind == "fashion-mnist"
            && m.options == options
            && opts.out.join("train").is_dir()
            && opts.out.join("val").is_dir()
        {
            return Ok(PrepareReport {
                out: opts.out.clone(),
                train_images: m.train_images,
                val_images: m.val_images,
                reused: true,
            });
        }
    }
    let mut splits = Vec::new();
    for (split, img_f, lab_f, per_class) in
        [("train", files[0], files[1], Some(opts.train_per_class)), ("val", files[2], files[3], opts.val_per_class)]
    {
        let (n, r, c, px) = read_idx_images(&src.join(img_f))?;
        let labels = read_idx_labels(&src.join(lab_f))?;
        if labels.len() != n {
            return Err(Error::data(src.join(lab_f), format!("{} labels for {n} images", labels.len())));
        }
        // The first `per_class` images of each class, in file order.
        let mut taken = [0usize; 10];
        let mut picks = Vec::new();
        for (i, &l) in labels.iter().enumerate() {
            let l = l as usize;
            if l >= 10 {
                return Err(Error::data(src.join(lab_f), format!("label {l} at {i} is not in 0..10")));
            }
            if per_class.is_none_or(|k| taken[l] < k) {
                taken[l] += 1;
                picks.push((i, l));
            }
        }
        splits.push((split, r, c, px, picks));
    }
    let manifest = Manifest {
        kind: "fashion-mnist".into(),
        version: 1,
        options,
        train_images: splits[0].4.len(),
        val_images: splits[1].4.len(),
        classes: CLASS_NAMES.iter().map(|s| s.to_string()).collect(),
    };
    write_tree(&opts.out, &manifest, |tmp| {
        for (split, r, c, px, picks) in &splits {
            for name in CLASS_NAMES {
                let d = tmp.join(split).join(name);
                std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
            }
            picks.par_iter().try_for_each(|&(i, l)| {
                let img = &px[i * r * c..(i + 1) * r * c];
                let jpg = encode_jpeg(img, *c as u32, *r as u32, true, JPEG_QUALITY)?;
                let p = tmp.join(split).join(CLASS_NAMES[l]).join(format!("{i:05}.jpg"));
                std::fs::write(&p, jpg).map_err(|e| Error::io(&p, e))
            })?;
        }
        Ok(())
    })?;
    Ok(PrepareReport {
        out: opts.out.clone(),
        train_images: manifest.train_images,
        val_images: manifest.val_images,
        reused: false,
    })
}
