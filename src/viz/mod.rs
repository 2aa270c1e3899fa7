//! Unsupervised segmentation maps and t-SNE of one image's patch features (`lmim-bench visualize`).
//!
//! For each image: resize (shorter side) and centre-crop to the input size, run the encoder, take the patch
//! tokens of one block (before the final norm), L2-normalise them, cluster them agglomeratively (Ward by
//! default) and cut the tree at a few nested levels; paint the clusters over the image and embed the same
//! features with t-SNE, coloured by the finest level. The choices follow `latentmim.md` section 7 (our
//! defaults, the paper does not state them): last block before the norm, Ward on L2-normalised features, cuts at
//! 3, 4, 5 clusters, a 28 x 28 grid (448 px for 16-px patches), alpha 0.6, perplexity 30.
//!
//! `plot` draws the other figures, training curves and result bars (`lmim-bench plot`).
pub mod cluster;
pub mod figure;
pub mod plot;
pub mod tsne;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::data::decode::{load_rgb, RgbImage};
use crate::data::transforms::{center_crop, resize_shorter, to_tensor_normalize, Interp, IMAGENET_MEAN, IMAGENET_STD};
use crate::error::{Error, Result};
use crate::model::pos_embed::{sincos_2d, PosEmbedKind};
use crate::model::VisionTransformer;
use cluster::Linkage;
use tsne::TsneOptions;

/// Grid side that the defaults aim at: the paper's figure has about 28 x 28 blocks.
pub const DEFAULT_GRID: i64 = 28;

/// How the position embedding reaches a grid other than the trained one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PosEmbedMode {
    /// `sincos` when the checkpoint's embedding is the Latent MIM sin-cos one (coordinates normalised to the
    /// image, so a finer grid covers the same range), else `interpolate`.
    Auto,
    /// Recompute the fixed sin-cos embedding for the new grid with the checkpoint's formula.
    Sincos,
    /// Resample the stored embedding bicubically (timm, and MAE's fine-tuning at other resolutions).
    Interpolate,
}

/// Settings of a run.
#[derive(Clone, Debug)]
pub struct VizOptions {
    /// Numbers of clusters to cut at.
    pub levels: Vec<usize>,
    /// Input side in pixels; `None`: `DEFAULT_GRID` patches.
    pub size: Option<u32>,
    /// Block whose output is used (negative counts from the end); `None`: the last.
    pub layer: Option<i64>,
    pub linkage: Linkage,
    pub tsne: TsneOptions,
    pub pos_embed: PosEmbedMode,
    pub alpha: f32,
    pub panel: u32,
}

impl Default for VizOptions {
    fn default() -> Self {
        VizOptions {
            levels: vec![3, 4, 5],
            size: None,
            layer: None,
            linkage: Linkage::Ward,
            tsne: TsneOptions::default(),
            pos_embed: PosEmbedMode::Auto,
            alpha: 0.6,
            panel: 224,
        }
    }
}

/// The input side for a model when none is given: a 28 x 28 grid (448 px for 16-px patches, 112 px for the
/// 4-px patches of `vit_pico_patch4_32`).
pub fn default_size(model: &VisionTransformer) -> u32 {
    (DEFAULT_GRID * model.cfg.patch_size) as u32
}

/// Settings resolved against a model: input size, grid, block index; checks them.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub size: u32,
    pub grid: usize,
    pub layer: usize,
    pub depth: usize,
    /// How the position embedding was obtained, for the records.
    pub pos_embed: String,
    sincos: Option<PosEmbedKind>,
}

pub fn resolve(model: &VisionTransformer, opts: &VizOptions) -> Result<Resolved> {
    let patch = model.cfg.patch_size as u32;
    let size = opts.size.unwrap_or_else(|| default_size(model));
    if size == 0 || !size.is_multiple_of(patch) {
        return Err(Error::option("--size", format!("{size} is not a positive multiple of the patch size {patch}")));
    }
    let grid = (size / patch) as usize;
    let n = grid * grid;
    if opts.levels.is_empty() {
        return Err(Error::option("--levels", "give at least one number of clusters"));
    }
    let mut seen = HashSet::new();
    for &k in &opts.levels {
        if k < 1 {
            return Err(Error::option("--levels", "numbers of clusters must be at least 1"));
        }
        if !seen.insert(k) {
            return Err(Error::option("--levels", format!("{k} is given twice")));
        }
        if k > n {
            return Err(Error::option(
                "--levels",
                format!("{k} clusters but an input of {size} px has only {n} patches ({grid} x {grid}); raise --size or lower --levels"),
            ));
        }
    }
    if n < 4 {
        return Err(Error::option("--size", format!("a {grid} x {grid} grid has too few patches for t-SNE (at least 4)")));
    }
    let depth = model.blocks.len();
    let layer = opts.layer.unwrap_or(-1);
    let idx = if layer < 0 { depth as i64 + layer } else { layer };
    if idx < 0 || idx >= depth as i64 {
        return Err(Error::option("--layer", format!("{layer} is not a block of this {depth}-block model (0..{depth}, or -1 for the last)")));
    }
    if !(0.0..=1.0).contains(&opts.alpha) {
        return Err(Error::option("--alpha", format!("{} is not in [0, 1]", opts.alpha)));
    }
    if opts.panel < 16 || opts.panel > 4096 {
        return Err(Error::option("--panel", format!("{} px is outside 16..=4096", opts.panel)));
    }
    if opts.tsne.perplexity.is_nan() || opts.tsne.perplexity <= 0.0 {
        return Err(Error::option("--perplexity", format!("must be positive, got {}", opts.tsne.perplexity)));
    }
    if opts.tsne.epochs == 0 {
        return Err(Error::option("--tsne-iters", "must be at least 1"));
    }
    let trained = model.cfg.grid() as usize;
    let stored = stored_sincos_kind(model);
    let (pos_embed, sincos) = if grid == trained {
        ("stored (trained grid)".to_string(), None)
    } else {
        match (opts.pos_embed, stored) {
            (PosEmbedMode::Auto, Some(PosEmbedKind::Lmim)) | (PosEmbedMode::Sincos, Some(PosEmbedKind::Lmim)) => {
                ("sincos (lmim, recomputed)".to_string(), Some(PosEmbedKind::Lmim))
            }
            (PosEmbedMode::Sincos, Some(PosEmbedKind::Mae)) => ("sincos (mae, recomputed)".to_string(), Some(PosEmbedKind::Mae)),
            (PosEmbedMode::Sincos, None) => {
                return Err(Error::option(
                    "--pos-embed",
                    "sincos: the checkpoint's position embedding is learned (it matches no sin-cos formula), so it cannot be recomputed; use interpolate",
                ))
            }
            _ => ("interpolate (bicubic)".to_string(), None),
        }
    };
    Ok(Resolved { size, grid, layer: idx as usize, depth, pos_embed, sincos })
}

/// Which sin-cos formula the stored position embedding follows at the trained grid, if any.
pub fn stored_sincos_kind(model: &VisionTransformer) -> Option<PosEmbedKind> {
    let d = model.cfg.embed_dim;
    if d % 4 != 0 {
        return None;
    }
    let g = model.cfg.grid();
    let stored = model.pos_embed.detach().to_device(Device::Cpu).to_kind(Kind::Float).reshape([-1, d]).narrow(0, 1, g * g);
    let mut kinds = vec![model.cfg.pos_embed];
    kinds.extend([PosEmbedKind::Lmim, PosEmbedKind::Mae].into_iter().filter(|k| *k != model.cfg.pos_embed));
    kinds.into_iter().find(|&k| {
        let reference = sincos_2d(d, g, k, false);
        (&stored - reference).abs().max().double_value(&[]) < 1e-4
    })
}

/// Image files named by `paths`: files as given, folders' image files (by extension, not recursive), sorted.
pub fn collect_images(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        // BadData rather than Io: the CLI prints the error chain, and Io would repeat the OS message.
        let meta = std::fs::metadata(p).map_err(|e| Error::data(p, e.to_string()))?;
        if meta.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| Error::data(p, e.to_string()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.is_file() && has_image_extension(f))
                .collect();
            if found.is_empty() {
                return Err(Error::data(p, "folder holds no image files (.jpg, .jpeg, .png)"));
            }
            found.sort();
            out.extend(found);
        } else {
            out.push(p.clone());
        }
    }
    if out.is_empty() {
        return Err(Error::option("--images", "no images given"));
    }
    Ok(out)
}

fn has_image_extension(p: &Path) -> bool {
    p.extension().and_then(|e| e.to_str()).is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
}

/// Decodes an image and brings it to `size` x `size`: shorter side to `size` (bicubic), then a centre crop.
pub fn load_input(path: &Path, size: u32) -> Result<RgbImage> {
    let img = load_rgb(path)?;
    let resized = resize_shorter(&img, size, Interp::Bicubic).map_err(|e| Error::data(path, e))?;
    Ok(center_crop(&resized, (size, size)))
}

/// Output of block `layer` (before the final norm, CLS first) for images `x`. With `sincos`, the patch tokens get
/// the sin-cos position embedding of that formula recomputed for the input's grid; otherwise the model's own
/// (stored, or interpolated for another grid).
pub fn block_tokens(model: &VisionTransformer, x: &Tensor, layer: usize, sincos: Option<PosEmbedKind>) -> Tensor {
    let keep = [layer as i64];
    let mut out = tch::no_grad(|| match sincos {
        Some(kind) => {
            let d = model.cfg.embed_dim;
            let t = x.apply(&model.patch_embed);
            let (b, _, gh, gw) = t.size4().expect("patch embedding is [B, D, H, W]");
            assert_eq!(gh, gw, "square inputs only");
            let tokens = t.reshape([b, d, gh * gw]).transpose(1, 2);
            let pe = sincos_2d(d, gh, kind, false).to_device(x.device()).unsqueeze(0);
            model.run_blocks(model.prepend_prefix(&(tokens + pe)), &keep, false)
        }
        None => model.forward_features(x, &keep, false),
    });
    out.intermediates.remove(0)
}

/// L2-normalised patch features of one image: `n = grid * grid` rows of `dim`, row-major over the grid.
#[derive(Debug, Clone)]
pub struct PatchFeatures {
    pub data: Vec<f32>,
    pub n: usize,
    pub dim: usize,
}

/// Runs the encoder on one `size` x `size` image and returns the block's patch tokens, L2-normalised.
pub fn patch_features(model: &VisionTransformer, device: Device, img: &RgbImage, r: &Resolved) -> Result<PatchFeatures> {
    let s = img.width as i64;
    let mut buf = vec![0f32; (3 * s * s) as usize];
    to_tensor_normalize(img, IMAGENET_MEAN, IMAGENET_STD, &mut buf);
    let x = Tensor::from_slice(&buf).reshape([1, 3, s, s]).to_device(device);
    let block = block_tokens(model, &x, r.layer, r.sincos);
    let (_, tokens, dim) = block.size3().map_err(Error::Torch)?;
    let n = r.grid * r.grid;
    if tokens as usize != n + 1 {
        return Err(Error::option("--size", format!("the model returned {} tokens for a {} x {} grid", tokens - 1, r.grid, r.grid)));
    }
    let patches = block.select(0, 0).narrow(0, 1, n as i64).to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
    let mut data = Vec::<f32>::try_from(patches.flatten(0, -1)).map_err(Error::Torch)?;
    cluster::l2_normalize(&mut data, dim as usize);
    Ok(PatchFeatures { data, n, dim: dim as usize })
}

/// Clustering and t-SNE of one image's features.
#[derive(Debug, Clone, Serialize)]
pub struct Analysis {
    /// Row-major labels per level, in the order of the levels asked.
    pub labels: Vec<Vec<u32>>,
    pub embedding: Vec<[f32; 2]>,
    pub perplexity: f64,
}

pub fn analyse(f: &PatchFeatures, levels: &[usize], linkage: Linkage, tsne_opts: &TsneOptions) -> Result<Analysis> {
    if f.data.iter().any(|v| !v.is_finite()) {
        return Err(Error::option("--checkpoint", "the model produced non-finite features"));
    }
    let condensed = cluster::condensed_euclidean(&f.data, f.dim);
    let dendrogram = cluster::linkage_condensed(condensed.clone(), f.n, linkage);
    let labels = cluster::cut_nested(&dendrogram, levels)?;
    let (embedding, perplexity) = tsne::embed_2d(&condensed, f.n, tsne_opts)?;
    Ok(Analysis { labels, embedding, perplexity })
}

/// The files written for one image.
#[derive(Debug, Clone)]
pub struct Written {
    pub image: PathBuf,
    pub png: PathBuf,
    pub json: PathBuf,
}

/// Describes the run in each JSON file.
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    pub checkpoint: String,
    pub sha256: String,
    pub arch: String,
}

/// Processes each image into `<out>/<stem>.png` and `<out>/<stem>.json`.
pub fn run(
    model: &VisionTransformer,
    device: Device,
    images: &[PathBuf],
    out: &Path,
    opts: &VizOptions,
    info: &RunInfo,
    mut progress: impl FnMut(&Written),
) -> Result<Vec<Written>> {
    let r = resolve(model, opts)?;
    std::fs::create_dir_all(out).map_err(|e| Error::data(out, e.to_string()))?;
    let stems = output_stems(images);
    let inputs: HashSet<PathBuf> = images.iter().filter_map(|p| p.canonicalize().ok()).collect();
    for stem in &stems {
        let png = out.join(format!("{stem}.png"));
        if png.canonicalize().is_ok_and(|c| inputs.contains(&c)) {
            return Err(Error::option("--out", format!("{} would overwrite an input image; choose another folder", png.display())));
        }
    }
    let finest = opts.levels.iter().enumerate().max_by_key(|(_, k)| **k).map(|(i, _)| i).unwrap_or(0);
    let mut written = Vec::new();
    for (path, stem) in images.iter().zip(&stems) {
        let img = load_input(path, r.size)?;
        let feats = patch_features(model, device, &img, &r)?;
        let a = analyse(&feats, &opts.levels, opts.linkage, &opts.tsne)?;
        let name = path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let header = format!(
            "{name} \u{b7} {} block {}/{} \u{b7} {}\u{d7}{} patches \u{b7} pos-embed {} \u{b7} {} linkage",
            info.arch,
            r.layer + 1,
            r.depth,
            r.grid,
            r.grid,
            r.pos_embed.split(' ').next().unwrap_or_default(),
            opts.linkage.name()
        );
        let fig = figure::render(&figure::FigureInput {
            image: &img,
            grid: r.grid,
            levels: &opts.levels,
            labels: &a.labels,
            scatter_labels: &a.labels[finest],
            embedding: &a.embedding,
            header,
            tsne_title: format!("t-SNE (k = {})", opts.levels[finest]),
            alpha: opts.alpha,
            panel: opts.panel,
        })?;
        let png = out.join(format!("{stem}.png"));
        let json = out.join(format!("{stem}.json"));
        crate::checkpoint::write_atomic(&png, &figure::encode_png(&fig)?)?;
        let record = record_json(path, info, &r, opts, &a, finest);
        crate::checkpoint::write_atomic(&json, (serde_json::to_string(&record).expect("JSON") + "\n").as_bytes())?;
        let w = Written { image: path.clone(), png, json };
        progress(&w);
        written.push(w);
    }
    Ok(written)
}

fn record_json(path: &Path, info: &RunInfo, r: &Resolved, opts: &VizOptions, a: &Analysis, finest: usize) -> serde_json::Value {
    let rows = |l: &Vec<u32>| l.chunks(r.grid).map(|c| c.to_vec()).collect::<Vec<_>>();
    let max_k = opts.levels.iter().copied().max().unwrap_or(1) as u32;
    serde_json::json!({
        "image": path.display().to_string(),
        "model": info,
        "input_size": r.size,
        "grid": r.grid,
        "layer": r.layer,
        "depth": r.depth,
        "features": "block output before the final norm, patch tokens, L2-normalised",
        "pos_embed": r.pos_embed,
        "linkage": opts.linkage.name(),
        "metric": "euclidean",
        "levels": opts.levels.iter().zip(&a.labels).map(|(k, l)| serde_json::json!({"k": k, "labels": rows(l)})).collect::<Vec<_>>(),
        "colors": (0..max_k).map(figure::color_hex).collect::<Vec<_>>(),
        "tsne": {
            "perplexity": a.perplexity,
            "perplexity_requested": opts.tsne.perplexity,
            "epochs": opts.tsne.epochs,
            "theta": opts.tsne.theta,
            "seed": opts.tsne.seed,
            "colored_by_k": opts.levels[finest],
            "points": a.embedding,
        },
    })
}

/// File stems for the outputs, made unique (`name`, `name-2`, ...) when inputs share one.
fn output_stems(images: &[PathBuf]) -> Vec<String> {
    let mut used = HashSet::new();
    images
        .iter()
        .map(|p| {
            let base = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "image".into());
            let mut stem = base.clone();
            let mut i = 2;
            while !used.insert(stem.clone()) {
                stem = format!("{base}-{i}");
                i += 1;
            }
            stem
        })
        .collect()
}
