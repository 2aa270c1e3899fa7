//! ADE20K's `ADEChallengeData2016` layout, read as CAPI's `data.py:ADE20K` and `eval_segmentation.py:eval_model`
//! read it (facebookresearch/capi), and generated sets of that layout for tests and the demo.
//!
//! - `images/{training,validation}/<stem>.jpg` and `annotations/{training,validation}/<stem>.png`; the label PNG
//!   is 8-bit grayscale (L) or palette (P): 0 = unlabeled, 1..=150 the classes.
//! - Image: `convert("RGB")`, `Resize((r, r))` bicubic (torchvision's PIL path, not aspect-preserving), ImageNet
//!   normalisation. Label: `convert("P")` (an L image keeps its values), `Resize((r, r))` nearest (PIL's).
use std::path::{Path, PathBuf};

use rand::Rng;
use rayon::prelude::*;

use super::davis::pil_resize_nearest;
use super::fmnist::{encode_jpeg, read_manifest, write_tree, Manifest};
use super::loader::sample_rng;
use super::pil_resample::{self, Filter};
use super::transforms::{to_tensor_normalize, IMAGENET_MEAN, IMAGENET_STD};
use crate::error::{Error, Result};

/// ADE20K's class count (labels 1..=150; 0 is unlabeled).
pub const NUM_CLASSES: u8 = 150;

/// The folder CAPI's `ADE20K(root)` reads: `root/ADEChallengeData2016`.
pub const FOLDER: &str = "ADEChallengeData2016";

/// One image and its annotation.
#[derive(Clone, Debug)]
pub struct Pair {
    pub stem: String,
    pub image: PathBuf,
    pub annotation: PathBuf,
}

/// The two splits of an ADE20K tree, each sorted by stem (CAPI takes the glob's order, which the file system
/// decides; sorting makes the order, and so the held-out split of a seed, the same everywhere).
#[derive(Clone, Debug)]
pub struct AdeSet {
    pub root: PathBuf,
    pub train: Vec<Pair>,
    pub val: Vec<Pair>,
}

/// `dir` itself when it holds `images/` and `annotations/`, else `dir/ADEChallengeData2016` (CAPI's root).
pub fn resolve_root(dir: &Path) -> Result<PathBuf> {
    let has = |d: &Path| d.join("images").is_dir() && d.join("annotations").is_dir();
    if has(dir) {
        return Ok(dir.to_path_buf());
    }
    let inner = dir.join(FOLDER);
    if has(&inner) {
        return Ok(inner);
    }
    Err(Error::data(dir, format!("not an ADE20K tree: neither it nor {FOLDER}/ inside it holds images/ and annotations/")))
}

/// The `*.jpg` of `images/<split>` with their `annotations/<split>/<stem>.png`; an image without its annotation,
/// or an empty split, is an error naming the file or folder.
pub fn list_split(root: &Path, split: &str) -> Result<Vec<Pair>> {
    let dir = root.join("images").join(split);
    let rd = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
    let mut stems = Vec::new();
    for e in rd {
        let e = e.map_err(|e| Error::io(&dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".jpg") {
            stems.push(stem.to_string());
        }
    }
    stems.sort();
    if stems.is_empty() {
        return Err(Error::data(&dir, "no .jpg images: the split is empty"));
    }
    let ann = root.join("annotations").join(split);
    stems
        .into_iter()
        .map(|stem| {
            let pair = Pair { image: dir.join(format!("{stem}.jpg")), annotation: ann.join(format!("{stem}.png")), stem };
            if !pair.annotation.is_file() {
                return Err(Error::data(&pair.image, format!("has no annotation: {} does not exist", pair.annotation.display())));
            }
            Ok(pair)
        })
        .collect()
}

/// Opens `training` and `validation` under `dir` (the tree or its parent).
pub fn open_set(dir: &Path) -> Result<AdeSet> {
    let root = resolve_root(dir)?;
    let train = list_split(&root, "training")?;
    let val = list_split(&root, "validation")?;
    Ok(AdeSet { root, train, val })
}

/// The image as CAPI's transform gives it: `[3, r, r]` f32 (CHW), bicubic `Resize((r, r))` as Pillow, then
/// `ToTensor` + ImageNet `Normalize`.
pub fn read_image(path: &Path, res: u32) -> Result<Vec<f32>> {
    let img = super::decode::load_rgb(path)?;
    let px = if (img.width, img.height) == (res, res) {
        img.data
    } else {
        let b = [0.0, 0.0, img.width as f64, img.height as f64];
        pil_resample::resize(&img.data, img.width, img.height, 3, res, res, Filter::Bicubic, b).map_err(|e| Error::data(path, e))?
    };
    let rgb = super::RgbImage::from_raw(res, res, px).expect("resized buffer is res x res x 3");
    let mut out = vec![0f32; 3 * (res * res) as usize];
    to_tensor_normalize(&rgb, IMAGENET_MEAN, IMAGENET_STD, &mut out);
    Ok(out)
}

/// A label PNG at its own size: `(width, height, labels)`. Grayscale (L) and palette (P) PNGs of 8 bits or fewer
/// give their values (`convert("P")` keeps both); any other colour type would be quantised by PIL and is refused.
pub fn read_label_png(path: &Path) -> Result<(usize, usize, Vec<u8>)> {
    let bytes = crate::fsutil::read_regular(path, Some(crate::fsutil::IMAGE_LIMIT))?;
    let mut dec = png::Decoder::new(std::io::Cursor::new(&bytes[..]));
    dec.set_transformations(png::Transformations::IDENTITY);
    let mut reader = dec.read_info().map_err(|e| Error::data(path, format!("not a readable PNG: {e}")))?;
    let info = reader.info();
    let (w, h) = (info.width as usize, info.height as usize);
    if !matches!(info.color_type, png::ColorType::Grayscale | png::ColorType::Indexed) {
        return Err(Error::data(path, format!("colour type {:?}: an ADE20K annotation is an 8-bit grayscale (L) or palette (P) PNG of class indices", info.color_type)));
    }
    let depth = info.bit_depth as usize;
    if depth > 8 {
        return Err(Error::data(path, format!("{depth}-bit PNG: an ADE20K annotation holds 8-bit class indices")));
    }
    if w == 0 || h == 0 || w.saturating_mul(h) > 179_000_000 {
        return Err(Error::data(path, format!("PNG size {w}x{h} is empty or too large")));
    }
    let gray = info.color_type == png::ColorType::Grayscale;
    let mut buf = vec![0u8; reader.output_buffer_size().ok_or_else(|| Error::data(path, "PNG too large"))?];
    let frame = reader.next_frame(&mut buf).map_err(|e| Error::data(path, format!("cannot decode the PNG: {e}")))?;
    let stride = frame.line_size;
    let mut out = Vec::with_capacity(w * h);
    for y in 0..h {
        let row = &buf[y * stride..(y + 1) * stride];
        if depth == 8 {
            out.extend_from_slice(&row[..w]);
            continue;
        }
        let per = 8 / depth;
        let mask = ((1u16 << depth) - 1) as u8;
        for x in 0..w {
            let v = (row[x / per] >> (8 - depth * (x % per + 1))) & mask;
            // PIL expands low-depth grayscale to 0..255 (L); palette indices stay indices.
            out.push(if gray { (v as u32 * 255 / mask as u32) as u8 } else { v });
        }
    }
    Ok((w, h, out))
}

/// The label map as CAPI's target transform gives it: `[r * r]` u8, PIL nearest to `(r, r)`. A value above the
/// class count that is not in `ignore` is an error naming the file.
pub fn read_label(path: &Path, res: u32, ignore: &[i64]) -> Result<Vec<u8>> {
    let (w, h, lab) = read_label_png(path)?;
    if let Some(&bad) = lab.iter().find(|&&v| v > NUM_CLASSES && !ignore.contains(&(v as i64))) {
        return Err(Error::data(path, format!("label {bad} is above ADE20K's {NUM_CLASSES} classes (0 = unlabeled) and not in `ignore`")));
    }
    Ok(pil_resize_nearest(&lab, w, h, res as usize, res as usize))
}

/// `lmim-bench data synth-ade20k` options.
#[derive(Clone, Debug)]
pub struct SynthAdeOptions {
    pub out: PathBuf,
    pub train: usize,
    pub val: usize,
    /// Classes used, 1..=classes (at most 150).
    pub classes: u8,
    pub width: u32,
    pub height: u32,
    pub seed: u64,
    pub quality: u8,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct SynthAdeReport {
    pub out: PathBuf,
    pub train_images: usize,
    pub val_images: usize,
    pub classes: u8,
    pub reused: bool,
}

/// A class's look: two colours in stripes of its own period and angle, so that patches of one class resemble
/// each other across images.
fn class_texture(class: u8, seed: u64) -> ([f32; 3], [f32; 3], f32, f32) {
    let mut rng = sample_rng(seed, 11, class as usize);
    let mut col = || [rng.gen_range(20.0..235.0f32), rng.gen_range(20.0..235.0), rng.gen_range(20.0..235.0)];
    let (a, b) = (col(), col());
    (a, b, rng.gen_range(3.0..12.0f32), rng.gen_range(0.0..3.14f32))
}

/// One generated image and its label map: a background class, two to four regions (ellipses or rectangles) of
/// other classes, and an unlabeled (0) band along one edge; every pixel's colour from its class's texture plus
/// noise. Deterministic from (seed, split, index).
fn render(split: u64, index: usize, opts: &SynthAdeOptions) -> (usize, usize, Vec<u8>, Vec<u8>) {
    let mut rng = sample_rng(opts.seed, split, index);
    // Sizes vary by a few pixels so that the resize to the model's input is never the identity.
    let w = opts.width as usize + rng.gen_range(0..9usize);
    let h = opts.height as usize + rng.gen_range(0..9usize);
    let (wf, hf) = (w as f32, h as f32);
    let pick = |rng: &mut rand_chacha::ChaCha8Rng| rng.gen_range(1..=opts.classes);
    let background = pick(&mut rng);
    let regions: Vec<(u8, f32, f32, f32, f32, bool)> = (0..rng.gen_range(2..=4))
        .map(|_| {
            let (rx, ry) = (rng.gen_range(0.12..0.35) * wf, rng.gen_range(0.12..0.35) * hf);
            (pick(&mut rng), rng.gen_range(0.0..wf), rng.gen_range(0.0..hf), rx, ry, rng.gen_bool(0.5))
        })
        .collect();
    let band = rng.gen_range(0..(h / 8).max(1));
    let mut px = vec![0u8; w * h * 3];
    let mut lab = vec![0u8; w * h];
    for y in 0..h {
        for x in 0..w {
            let (xf, yf) = (x as f32, y as f32);
            let mut class = background;
            for &(c, cx, cy, rx, ry, rect) in &regions {
                let (dx, dy) = ((xf - cx) / rx, (yf - cy) / ry);
                if if rect { dx.abs() < 1.0 && dy.abs() < 1.0 } else { dx * dx + dy * dy < 1.0 } {
                    class = c;
                }
            }
            let (a, b, period, angle) = class_texture(class, opts.seed);
            let t = (((xf * angle.cos() + yf * angle.sin()) / period).floor() as i64).rem_euclid(2) as f32;
            for k in 0..3 {
                let v = a[k] * t + b[k] * (1.0 - t) + rng.gen_range(-8.0..8.0f32);
                px[(y * w + x) * 3 + k] = v.clamp(0.0, 255.0) as u8;
            }
            lab[y * w + x] = if y < band { 0 } else { class };
        }
    }
    (w, h, px, lab)
}

/// An 8-bit grayscale (L) PNG of `labels`.
pub fn encode_l_png(labels: &[u8], w: usize, h: usize) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut buf, w as u32, h as u32);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        let mut wr = enc.write_header().map_err(|e| Error::data("<png>", e.to_string()))?;
        wr.write_image_data(labels).map_err(|e| Error::data("<png>", e.to_string()))?;
    }
    Ok(buf)
}

/// `lmim-bench data synth-ade20k`: `ADEChallengeData2016/{images,annotations}/{training,validation}` under `out`,
/// JPEG images and L-mode PNG labels (0 = unlabeled), deterministic from the seed. Does nothing when `out` was
/// made with the same options.
pub fn synth_ade20k(opts: &SynthAdeOptions) -> Result<SynthAdeReport> {
    if opts.train == 0 || opts.val == 0 || opts.classes == 0 || opts.classes > NUM_CLASSES || opts.width < 16 || opts.height < 16 {
        return Err(Error::option("synth-ade20k", "needs train >= 1, val >= 1, 1..=150 classes and a size of at least 16x16"));
    }
    let options = serde_json::json!({
        "train": opts.train, "val": opts.val, "classes": opts.classes, "width": opts.width, "height": opts.height,
        "seed": opts.seed, "jpeg_quality": opts.quality,
    });
    let report = |reused| SynthAdeReport { out: opts.out.clone(), train_images: opts.train, val_images: opts.val, classes: opts.classes, reused };
    if let Some(m) = read_manifest(&opts.out) {
        if m.kind == "synth-ade20k" && m.options == options {
            return Ok(report(true));
        }
    }
    let classes = (1..=opts.classes).map(|c| format!("class_{c}")).collect();
    let manifest = Manifest { kind: "synth-ade20k".into(), version: 1, options, train_images: opts.train, val_images: opts.val, classes };
    write_tree(&opts.out, &manifest, |tmp: &Path| {
        for (split_id, split, n) in [(1u64, "training", opts.train), (2, "validation", opts.val)] {
            let img_dir = tmp.join(FOLDER).join("images").join(split);
            let ann_dir = tmp.join(FOLDER).join("annotations").join(split);
            for d in [&img_dir, &ann_dir] {
                std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
            }
            (0..n).into_par_iter().try_for_each(|i| {
                let (w, h, px, lab) = render(split_id, i, opts);
                let stem = format!("ADE_{split}_{:08}", i + 1);
                let p = img_dir.join(format!("{stem}.jpg"));
                std::fs::write(&p, encode_jpeg(&px, w as u32, h as u32, false, opts.quality)?).map_err(|e| Error::io(&p, e))?;
                let p = ann_dir.join(format!("{stem}.png"));
                std::fs::write(&p, encode_l_png(&lab, w, h)?).map_err(|e| Error::io(&p, e))
            })?;
        }
        Ok(())
    })?;
    Ok(report(false))
}
