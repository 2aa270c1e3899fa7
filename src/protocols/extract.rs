//! Feature extraction: an encoder over a data split with the eval transform, into a safetensors file
//! (`features` [N, D] f32 or f16, `labels` [N] i64, metadata), with a cache shared by all protocols.
//!
//! The cache key hashes everything that changes the numbers: checkpoint sha256, the resolved model config, the
//! dataset fingerprint and cache key (which adds the files' times and inodes) and split, the transform, the feature kind and blocks, and the precision. A second protocol on
//! the same checkpoint and data reuses the file; a changed checkpoint or transform never does.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{self, load_vit_with, Family, LoadOptions};
use crate::data::{Dataset, Loader, LoaderConfig, Op, Transform};
use crate::config::Precision;
use crate::error::{Error, Result};
use crate::model::vit::with_amp;
use crate::model::VisionTransformer;

/// Version of the features file layout and of the cache key; bump when either changes meaning.
pub const FEATURES_FORMAT: &str = "lmim-bench-features/1";

/// Which vector represents an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FeatureKind {
    /// CLS token after the final LayerNorm (DINO's k-NN feature).
    #[serde(rename = "cls")]
    Cls,
    /// Mean of the patch tokens after the final LayerNorm.
    #[serde(rename = "avg", alias = "avgpool")]
    Avg,
    /// CLS and patch mean, concatenated.
    #[serde(rename = "cls+avg", alias = "cls_avg")]
    ClsAvg,
    /// Mean of the patch tokens before the final LayerNorm (the Latent MIM NN monitor's feature).
    #[serde(rename = "avg-prenorm", alias = "avg_prenorm")]
    AvgPrenorm,
    /// CLS token of the last block before the final LayerNorm (the probing benchmark's `raw` k-NN feature).
    #[serde(rename = "cls-prenorm", alias = "cls_prenorm")]
    ClsPrenorm,
}

impl FeatureKind {
    pub const NAMES: &'static [&'static str] = &["cls", "avg", "cls+avg", "avg-prenorm", "cls-prenorm"];

    pub fn name(self) -> &'static str {
        match self {
            FeatureKind::Cls => "cls",
            FeatureKind::Avg => "avg",
            FeatureKind::ClsAvg => "cls+avg",
            FeatureKind::AvgPrenorm => "avg-prenorm",
            FeatureKind::ClsPrenorm => "cls-prenorm",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "cls" => FeatureKind::Cls,
            "avg" | "avgpool" => FeatureKind::Avg,
            "cls+avg" | "cls_avg" => FeatureKind::ClsAvg,
            "avg-prenorm" | "avg_prenorm" => FeatureKind::AvgPrenorm,
            "cls-prenorm" | "cls_prenorm" => FeatureKind::ClsPrenorm,
            other => return Err(Error::option("--feature", format!("`{other}` is not one of {}", Self::NAMES.join(", ")))),
        })
    }
}

impl std::fmt::Display for FeatureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Features of one split, on the CPU.
#[derive(Debug)]
pub struct FeatureSet {
    /// [N, D], f32 (or f16 as stored).
    pub features: Tensor,
    /// [N] i64 class indices.
    pub labels: Tensor,
    pub meta: FeatureMeta,
}

/// What a features file says about itself. Files written by other tools may lack everything but the tensors.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct FeatureMeta {
    pub format: Option<String>,
    pub checkpoint: Option<String>,
    pub checkpoint_sha256: Option<String>,
    pub arch: Option<String>,
    pub model_config: Option<serde_json::Value>,
    /// Human description of the transform, e.g. `Resize(256, bicubic) + CenterCrop(224) + Normalize(imagenet)`.
    pub transform: Option<String>,
    pub feature: Option<String>,
    pub last_blocks: Option<i64>,
    pub precision: Option<String>,
    pub dataset_root: Option<String>,
    pub split: Option<String>,
    pub dataset_fingerprint: Option<serde_json::Value>,
    /// sha256 of the fingerprint's JSON: one string to compare.
    pub dataset_hash: Option<String>,
    pub num_classes: Option<i64>,
    pub class_names: Option<Vec<String>>,
    pub cache_key: Option<String>,
    pub created_at: Option<String>,
    /// Where the encoder came from: family layout, sub-model taken, the original file's sha256.
    pub checkpoint_source: Option<serde_json::Value>,
}

impl FeatureMeta {
    fn to_map(&self) -> BTreeMap<String, String> {
        let v = serde_json::to_value(self).expect("meta serialises");
        let mut m = BTreeMap::new();
        for (k, v) in v.as_object().expect("object") {
            match v {
                serde_json::Value::Null => {}
                serde_json::Value::String(s) => {
                    m.insert(k.clone(), s.clone());
                }
                other => {
                    m.insert(k.clone(), other.to_string());
                }
            }
        }
        m
    }

    fn from_map(m: &BTreeMap<String, String>) -> Self {
        let s = |k: &str| m.get(k).cloned();
        let j = |k: &str| m.get(k).and_then(|v| serde_json::from_str::<serde_json::Value>(v).ok());
        FeatureMeta {
            format: s("format"),
            checkpoint: s("checkpoint"),
            checkpoint_sha256: s("checkpoint_sha256"),
            arch: s("arch"),
            model_config: j("model_config"),
            transform: s("transform"),
            feature: s("feature"),
            last_blocks: m.get("last_blocks").and_then(|v| v.parse().ok()),
            precision: s("precision"),
            dataset_root: s("dataset_root"),
            split: s("split"),
            dataset_fingerprint: j("dataset_fingerprint"),
            dataset_hash: s("dataset_hash"),
            num_classes: m.get("num_classes").and_then(|v| v.parse().ok()),
            class_names: m.get("class_names").and_then(|v| serde_json::from_str(v).ok()),
            cache_key: s("cache_key"),
            created_at: s("created_at"),
            checkpoint_source: j("checkpoint_source"),
        }
    }
}

impl FeatureSet {
    /// What a rank other than 0 holds after a data-parallel extraction: no rows.
    pub fn empty_on_peer(dim: i64) -> FeatureSet {
        FeatureSet { features: Tensor::zeros([0, dim], (Kind::Float, Device::Cpu)), labels: Tensor::zeros([0], (Kind::Int64, Device::Cpu)), meta: FeatureMeta::default() }
    }

    pub fn len(&self) -> i64 {
        self.labels.size()[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dim(&self) -> i64 {
        self.features.size()[1]
    }

    /// Number of classes: the metadata's, else max label + 1.
    pub fn num_classes(&self) -> i64 {
        self.meta.num_classes.unwrap_or_else(|| if self.is_empty() { 0 } else { self.labels.max().int64_value(&[]) + 1 })
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let tensors = [("features".to_string(), self.features.shallow_clone()), ("labels".to_string(), self.labels.shallow_clone())];
        checkpoint::save(path, &tensors, &self.meta.to_map())
    }

    /// Reads and checks a features file: `features` 2-D float, `labels` 1-D integer, the same N, labels within
    /// the class count. Every problem is a data error naming the file.
    pub fn load(path: &Path) -> Result<FeatureSet> {
        if !path.is_file() {
            return Err(Error::data(path, "no such features file"));
        }
        let ck = checkpoint::load(path).map_err(|e| match e {
            Error::BadCheckpoint { reason, .. } => Error::data(path, format!("not a features file: {reason}")),
            other => other,
        })?;
        let get = |name: &str| {
            ck.get(name).map(|t| t.shallow_clone()).ok_or_else(|| {
                let have: Vec<&str> = ck.tensors.iter().map(|(n, _)| n.as_str()).collect();
                Error::data(path, format!("no tensor `{name}` (the file has: {}); expected `features` [N, D] and `labels` [N]", have.join(", ")))
            })
        };
        let features = get("features")?;
        let labels = get("labels")?;
        if features.dim() != 2 {
            return Err(Error::data(path, format!("`features` must be [N, D], found shape {:?}", features.size())));
        }
        if !matches!(features.kind(), Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double) {
            return Err(Error::data(path, format!("`features` must be floating point, found {:?}", features.kind())));
        }
        if labels.dim() != 1 {
            return Err(Error::data(path, format!("`labels` must be [N], found shape {:?}", labels.size())));
        }
        if !matches!(labels.kind(), Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8) {
            return Err(Error::data(path, format!("`labels` must be integers, found {:?}", labels.kind())));
        }
        let (n, nl) = (features.size()[0], labels.size()[0]);
        if n != nl {
            return Err(Error::data(path, format!("`features` has {n} rows but `labels` has {nl}")));
        }
        if n == 0 {
            return Err(Error::data(path, "the features file is empty (N = 0)"));
        }
        let labels = labels.to_kind(Kind::Int64);
        let meta = FeatureMeta::from_map(&ck.metadata);
        let (lo, hi) = (labels.min().int64_value(&[]), labels.max().int64_value(&[]));
        if lo < 0 {
            return Err(Error::data(path, format!("negative label {lo}")));
        }
        if let Some(c) = meta.num_classes {
            if hi >= c {
                return Err(Error::data(path, format!("label {hi} is not below num_classes = {c}")));
            }
        }
        if let (Some(c), Some(names)) = (meta.num_classes, &meta.class_names) {
            if names.len() as i64 != c {
                return Err(Error::data(path, format!("num_classes = {c} but {} class names", names.len())));
            }
        }
        Ok(FeatureSet { features, labels, meta })
    }
}

/// What to extract, and how.
#[derive(Clone, Debug)]
pub struct ExtractRequest {
    pub checkpoint: PathBuf,
    pub arch: Option<String>,
    /// Checkpoint layout; None detects it.
    pub from: Option<Family>,
    /// `feature` is the protocol's default rather than asked for: a checkpoint whose family has its own
    /// evaluation feature (I-JEPA's average pool) uses that instead.
    pub feature_is_default: bool,
    pub data_root: PathBuf,
    pub split: String,
    pub feature: FeatureKind,
    /// Features of the last n blocks, concatenated (block order); 1 = the last block only.
    pub last_blocks: i64,
    pub batch_size: usize,
    pub device: Device,
    /// Eval crop fraction: Resize(floor(img_size / crop_pct)) then CenterCrop(img_size), as timm.
    pub crop_pct: f64,
    /// Resize bilinear (torchvision's `Resize` default, MSN's eval transform) instead of bicubic.
    pub bilinear: bool,
    /// Store f16 instead of f32 (half the size; the protocols compute in f32 either way).
    pub half: bool,
    /// None: no cache (always extract).
    pub cache_dir: Option<PathBuf>,
    /// Decode threads (None: all cores).
    pub workers: Option<usize>,
    /// `f32` unless asked otherwise (see [`precision_of`]).
    pub precision: Precision,
    pub quiet: bool,
    /// Unreadable files are skipped and listed in the report instead of stopping the extraction; the features
    /// then cover part of the split and are not cached.
    pub skip_bad: bool,
    /// `--rescan` and `--content-key`.
    pub scan: crate::data::ScanFlags,
    /// Only these rows of the split, in this order (None: every row); the cache keys them.
    pub rows: Option<Vec<usize>>,
}

/// How a request was served.
#[derive(Clone, Debug, Serialize)]
pub struct ExtractReport {
    pub cache_key: String,
    /// The cached file (None without a cache).
    pub path: Option<PathBuf>,
    pub cache_hit: bool,
    pub seconds: f64,
    pub images_per_s: Option<f64>,
    /// The files skipped as unreadable (with `skip_bad`), in dataset order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub skipped_paths: Vec<PathBuf>,
    /// Tensors of the checkpoint that are not weights of the encoder and were left out (e.g. an extra tensor
    /// saved beside the weights).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ignored_keys: Vec<String>,
}

/// The eval transform for a model input size: Resize(floor(size / crop_pct), bicubic) + CenterCrop(size).
pub fn eval_transform(img_size: i64, crop_pct: f64) -> Result<Transform> {
    eval_transform_with(img_size, crop_pct, false)
}

/// [`eval_transform`], with a bilinear resize when `bilinear`.
pub fn eval_transform_with(img_size: i64, crop_pct: f64, bilinear: bool) -> Result<Transform> {
    if !(crop_pct > 0.0 && crop_pct <= 1.0) {
        return Err(Error::option("crop_pct", format!("{crop_pct} is not in (0, 1]")));
    }
    let crop = img_size as u32;
    // floor as timm's `scale_size = math.floor(img_size / crop_pct)`; the epsilon keeps 224 / 0.875 at 256.
    let resize = (img_size as f64 / crop_pct + 1e-9).floor() as u32;
    let mut t = Transform::eval(resize, crop);
    if bilinear {
        t.ops[0] = Op::Resize { size: resize, interp: crate::data::Interp::Bilinear };
    }
    Ok(t)
}

/// `Resize(256, bicubic) + CenterCrop(224) + Normalize(imagenet)`.
pub fn describe_transform(t: &Transform) -> String {
    let mut parts: Vec<String> = t
        .ops
        .iter()
        .map(|op| match op {
            Op::Resize { size, interp } => format!("Resize({size}, {})", interp_name(*interp)),
            Op::CenterCrop { size } if size.0 == size.1 => format!("CenterCrop({})", size.0),
            Op::CenterCrop { size } => format!("CenterCrop({}x{})", size.0, size.1),
            other => format!("{other:?}"),
        })
        .collect();
    let imagenet = t.mean == crate::data::IMAGENET_MEAN && t.std == crate::data::IMAGENET_STD;
    parts.push(if imagenet { "Normalize(imagenet)".into() } else { format!("Normalize({:?}, {:?})", t.mean, t.std) });
    parts.join(" + ")
}

fn interp_name(i: crate::data::Interp) -> &'static str {
    match i {
        crate::data::Interp::Bicubic => "bicubic",
        crate::data::Interp::Bilinear => "bilinear",
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// sha256 of a dataset fingerprint's JSON.
pub fn fingerprint_hash(fp: &serde_json::Value) -> String {
    sha256_hex(fp.to_string().as_bytes())
}

/// Feature vectors `[B, D']` of a batch of images (no grad, f32).
pub fn image_features(model: &VisionTransformer, images: &Tensor, kind: FeatureKind, last_blocks: i64) -> Tensor {
    let depth = model.blocks.len() as i64;
    let keep: Vec<i64> = (depth - last_blocks..depth).collect();
    let out = model.forward_features(images, &keep, false);
    let parts: Vec<Tensor> = out
        .intermediates
        .iter()
        .map(|block_out| {
            let prenorm = matches!(kind, FeatureKind::AvgPrenorm | FeatureKind::ClsPrenorm);
            let tokens = if prenorm { block_out.shallow_clone() } else { model.final_norm(block_out) };
            let tokens = tokens.to_kind(Kind::Float);
            let n = tokens.size()[1];
            let prefix = model.cfg.num_prefix_tokens();
            let cls = || tokens.select(1, 0);
            // Registers are not patches: the average is over the patch tokens only, as timm's `global_pool='avg'`.
            let avg = || tokens.narrow(1, prefix, n - prefix).mean_dim(1, false, Kind::Float);
            match kind {
                FeatureKind::Cls | FeatureKind::ClsPrenorm => cls(),
                FeatureKind::Avg | FeatureKind::AvgPrenorm => avg(),
                FeatureKind::ClsAvg => Tensor::cat(&[cls(), avg()], 1),
            }
        })
        .collect();
    Tensor::cat(&parts, 1)
}

/// The record's name of an extraction precision and its autocast dtype. Extraction defaults to f32 outside
/// autocast, as DINO's `eval_knn.py` and the Latent MIM NN monitor: bf16 can flip near-ties of the k-NN vote.
fn precision_of(p: Precision, device: Device) -> (&'static str, Option<Kind>) {
    match p.autocast(device) {
        Some(_) => ("bf16-amp", Some(Kind::BFloat16)),
        None => ("f32", None),
    }
}

/// Rows of a rank's block gathered at a time: bounds what a rank holds of the others' blocks (W x this x D floats)
/// while rank 0 assembles the matrix.
pub const GATHER_ROWS: i64 = 16384;

/// Assembles the `[n, D]` matrix of a split on rank 0 from every rank's block (`(rows, dataset indices, labels)`,
/// or None for an empty block): `Some((matrix or None when no rank had rows, labels, rows filled))` on rank 0,
/// `None` elsewhere. The blocks travel in chunks of [`GATHER_ROWS`] rows, so no rank ever holds the whole matrix
/// but rank 0 (an all-reduce of the full matrix would put one in every rank: 3.9 GB x 8 for ImageNet's train set).
pub fn gather_rows(world: &crate::dist::World, local: Option<(Tensor, Tensor, Tensor)>, n: i64) -> Result<Option<(Option<Tensor>, Tensor, usize)>> {
    if !world.is_distributed() {
        let labels = Tensor::full([n], -1i64, (Kind::Int64, Device::Cpu));
        let Some((rows, ids, labs)) = local else { return Ok(Some((None, labels, 0))) };
        let features = Tensor::zeros([n, rows.size()[1]], (Kind::Float, Device::Cpu));
        let _ = features.shallow_clone().index_copy_(0, &ids, &rows);
        let _ = labels.shallow_clone().index_copy_(0, &ids, &labs);
        return Ok(Some((Some(features), labels, ids.size()[0] as usize)));
    }
    // Every rank's row count and width (a rank with an empty block learns the width from the others).
    let (m, d) = local.as_ref().map_or((0, 0), |(r, _, _)| (r.size()[0], r.size()[1]));
    let sizes = world.all_gather(&Tensor::from_slice(&[m, d]), "the feature gather")?;
    let sizes: Vec<(i64, i64)> = sizes.iter().map(|t| (t.int64_value(&[0]), t.int64_value(&[1]))).collect();
    let dim = sizes.iter().map(|s| s.1).max().unwrap_or(0);
    let most = sizes.iter().map(|s| s.0).max().unwrap_or(0);
    let main = world.is_main();
    let out = main.then(|| (Tensor::zeros([n, dim.max(1)], (Kind::Float, Device::Cpu)), Tensor::full([n], -1i64, (Kind::Int64, Device::Cpu))));
    let chunk = GATHER_ROWS.min(most.max(1));
    let mut start = 0;
    while start < most {
        // This rank's rows start..start+chunk, padded to the chunk (index -1 marks padding).
        let take = (m - start).clamp(0, chunk);
        let rows = Tensor::zeros([chunk, dim.max(1)], (Kind::Float, Device::Cpu));
        let meta = Tensor::full([chunk, 2], -1i64, (Kind::Int64, Device::Cpu));
        if let Some((r, ids, labs)) = local.as_ref().filter(|_| take > 0) {
            rows.narrow(0, 0, take).copy_(&r.narrow(0, start, take));
            meta.narrow(0, 0, take).copy_(&Tensor::stack(&[ids.narrow(0, start, take), labs.narrow(0, start, take)], 1));
        }
        let all_rows = world.all_gather(&rows, "the feature gather")?;
        let all_meta = world.all_gather(&meta, "the feature gather")?;
        if let Some((features, labels)) = out.as_ref() {
            for (r, (rr, mm)) in all_rows.iter().zip(&all_meta).enumerate() {
                let k = (sizes[r].0 - start).clamp(0, chunk);
                if k > 0 {
                    let idx = mm.narrow(0, 0, k).select(1, 0);
                    let _ = features.shallow_clone().index_copy_(0, &idx, &rr.narrow(0, 0, k));
                    let _ = labels.shallow_clone().index_copy_(0, &idx, &mm.narrow(0, 0, k).select(1, 1));
                }
            }
        }
        start += chunk;
    }
    let filled = sizes.iter().map(|s| s.0).sum::<i64>() as usize;
    Ok(out.map(|(f, l)| ((dim > 0).then_some(f), l, filled)))
}

/// Features of a split, from the cache when a file with the same key is there, else extracted (and cached). In a
/// data-parallel run the ranks extract their blocks and rank 0 alone gets the set (the others get an empty one:
/// the protocols search and write on rank 0).
pub fn extract(req: &ExtractRequest) -> Result<(FeatureSet, ExtractReport)> {
    let t0 = Instant::now();
    if req.last_blocks < 1 {
        return Err(Error::option("--last-blocks", "must be at least 1"));
    }
    if req.batch_size == 0 {
        return Err(Error::option("--batch-size", "must be positive"));
    }
    let opts = LoadOptions { arch: req.arch.clone(), from: req.from, img_size: None };
    let loaded = load_vit_with(&req.checkpoint, &opts, req.device, 0)?;
    let cfg = loaded.model.cfg.clone();
    let ignored_keys = loaded.report.unexpected.clone();
    if !ignored_keys.is_empty() && !req.quiet && crate::dist::world().is_main() {
        eprintln!("warning: {}: {} tensor(s) that are not weights of the {} encoder were ignored: {}", req.checkpoint.display(), ignored_keys.len(), cfg.arch, ignored_keys.join(", "));
    }
    let family_feature = loaded.source.eval_feature.as_deref().filter(|_| req.feature_is_default).map(FeatureKind::parse).transpose()?;
    let feature = family_feature.unwrap_or(req.feature);
    if !cfg.class_token && matches!(feature, FeatureKind::Cls | FeatureKind::ClsAvg | FeatureKind::ClsPrenorm) {
        return Err(Error::option("feature", format!("`{feature}`: {} has no CLS token; use avg", req.checkpoint.display())));
    }
    let req = &ExtractRequest { feature, ..req.clone() };
    if req.last_blocks > cfg.depth {
        return Err(Error::option("--last-blocks", format!("{} is more than the model's {} blocks", req.last_blocks, cfg.depth)));
    }
    let dataset = Dataset::open_on_all_ranks(&req.data_root, &req.split, req.scan)?;
    let dataset = match &req.rows {
        Some(rows) => dataset.select(rows)?,
        None => dataset,
    };
    if dataset.is_empty() {
        return Err(Error::data(&dataset.dir, "the split has no images"));
    }
    let fp = serde_json::to_value(dataset.fingerprint()?).expect("fingerprint serialises");
    let transform = eval_transform_with(cfg.img_size, req.crop_pct, req.bilinear)?;
    let (precision, amp) = precision_of(req.precision, req.device);
    let dtype = if req.half { "f16" } else { "f32" };
    let key_src = serde_json::json!({
        "format": FEATURES_FORMAT,
        "checkpoint_sha256": loaded.sha256,
        "model_config": cfg,
        "dataset_fingerprint": fp,
        // The files' times and inodes too: a file rewritten in place gives other features once the index sees it.
        "dataset_cache_key": dataset.cache_key(),
        "split": req.split,
        "transform": transform,
        "feature": req.feature.name(),
        "last_blocks": req.last_blocks,
        "precision": precision,
        "dtype": dtype,
    });
    let mut key_src = key_src;
    if !loaded.source.submodel.is_empty() || loaded.source.pos_embed_resampled.is_some() {
        // Another sub-model of the same file (or another resampling) gives other features.
        key_src["checkpoint_source"] = serde_json::json!([loaded.source.submodel, loaded.source.pos_embed_resampled]);
    }
    let key = sha256_hex(key_src.to_string().as_bytes());
    let cache_path = req.cache_dir.as_ref().map(|d| {
        let name = format!("{}-{}-{}-{}.safetensors", cfg.arch, req.split, req.feature.name().replace('+', "_"), &key[..20]);
        d.join(name)
    });
    let world = crate::dist::world();
    // Rank 0 reads the cache; the others only learn whether it hit, since the features end up on rank 0 alone.
    if cache_path.as_ref().is_some_and(|p| world.is_main() && p.is_file()) {
        crate::fault::fault_point("cache", 1)?;
    }
    let cached = cache_path.as_ref().filter(|p| world.is_main() && p.is_file()).and_then(|p| {
        // A file that does not load, or carries another key, is recomputed and overwritten.
        FeatureSet::load(p).ok().filter(|set| set.meta.cache_key.as_deref() == Some(key.as_str()) && set.len() == dataset.len() as i64).map(|set| (p.clone(), set))
    });
    // The others wait for rank 0's read on the store, not inside a collective (a large cache file on a slow file
    // system would otherwise trip NCCL's watchdog).
    let hit = crate::data::index::string_from_rank0("feature cache check", &req.data_root, || Ok(cached.is_some().to_string()))? == "true";
    if hit {
        let report = ExtractReport { cache_key: key, path: cache_path.clone(), cache_hit: true, seconds: t0.elapsed().as_secs_f64(), images_per_s: None, skipped_paths: Vec::new(), ignored_keys };
        let set = cached.map_or_else(|| FeatureSet::empty_on_peer(cfg.embed_dim), |(_, set)| set);
        return Ok((set, report));
    }

    let n = dataset.len();
    let num_classes = dataset.classes.len() as i64;
    let class_names = dataset.classes.clone();
    let dataset_dir = dataset.dir.clone();
    // Each rank extracts its contiguous block of the split; the blocks are gathered to rank 0 below.
    let mut lcfg = LoaderConfig { batch_size: req.batch_size, shuffle: false, drop_last: false, strict: !req.skip_bad, rank: world.rank, world_size: world.size, quiet: req.quiet || !world.is_main(), pin_device: Some(req.device), ..Default::default() };
    if let Some(w) = req.workers {
        lcfg.workers = w.max(1);
    }
    let loader = Loader::new(dataset, transform.clone(), lcfg)?;
    let t_extract = Instant::now();
    let pb = if req.quiet || !world.is_main() { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(n as u64) };
    // This rank's rows in the order it extracts them, with their dataset indices and labels.
    let (mut rows, mut ids, mut labs) = (Vec::new(), Vec::new(), Vec::new());
    let device = req.device;
    for batch in crate::device::stage_ahead(loader.epoch(0), |b| crate::data::loader::stage_batch(b, device)) {
        let b = batch?;
        let f = tch::no_grad(|| with_amp(amp, || image_features(&loaded.model, &b.images, req.feature, req.last_blocks)));
        rows.push(f.to_kind(Kind::Float).to_device(Device::Cpu));
        ids.extend(b.indices.iter().map(|&i| i as i64));
        // The labels from the host's dataset, not read back from the device.
        labs.extend(b.indices.iter().map(|&i| loader.dataset().samples[i].1));
        pb.inc(b.indices.len() as u64);
    }
    pb.finish_and_clear();
    let local = (!rows.is_empty()).then(|| (Tensor::cat(&rows, 0), Tensor::from_slice(&ids), Tensor::from_slice(&labs)));
    drop(rows);
    let gathered = gather_rows(world, local, n as i64)?;
    let Some((features, labels, filled)) = gathered else {
        let report = ExtractReport { cache_key: key, path: cache_path, cache_hit: false, seconds: t0.elapsed().as_secs_f64(), images_per_s: None, skipped_paths: Vec::new(), ignored_keys };
        return Ok((FeatureSet::empty_on_peer(cfg.embed_dim), report));
    };
    let features = features.ok_or_else(|| Error::data(&dataset_dir, "the split has no images"))?;
    let mut skipped_paths = Vec::new();
    let lost = loader.dataset().lost_paths();
    let (features, labels) = if filled == n && labels.min().int64_value(&[]) >= 0 && lost.is_empty() {
        (features, labels)
    } else if req.skip_bad {
        // The rows of the files that could not be read are left out; the record lists them.
        let kept = labels.ge(0);
        let missing = Vec::<i64>::try_from(kept.logical_not().nonzero().view([-1])).expect("int64 indices");
        skipped_paths = missing.iter().map(|&i| loader.dataset().samples[i as usize].0.clone()).chain(lost).collect();
        let rows = kept.nonzero().view([-1]);
        if rows.size()[0] == 0 {
            return Err(Error::data(&dataset_dir, "no image of the split could be read"));
        }
        (features.index_select(0, &rows), labels.index_select(0, &rows))
    } else {
        return Err(Error::data(&dataset_dir, format!("extracted {filled} of {n} images (unreadable files?)")));
    };
    if features.isfinite().logical_not().any().int64_value(&[]) != 0 {
        return Err(Error::Diverged(format!("{}: the model produced non-finite features", req.checkpoint.display())));
    }
    let extract_s = t_extract.elapsed().as_secs_f64();
    let features = if req.half { features.to_kind(Kind::Half) } else { features };
    let meta = FeatureMeta {
        format: Some(FEATURES_FORMAT.into()),
        checkpoint: Some(req.checkpoint.display().to_string()),
        checkpoint_sha256: Some(loaded.sha256.clone()),
        arch: Some(cfg.arch.clone()),
        model_config: Some(serde_json::to_value(&cfg).expect("config serialises")),
        transform: Some(describe_transform(&transform)),
        feature: Some(req.feature.name().into()),
        last_blocks: Some(req.last_blocks),
        precision: Some(precision.into()),
        dataset_root: Some(req.data_root.display().to_string()),
        split: Some(req.split.clone()),
        dataset_hash: Some(fingerprint_hash(&fp)),
        dataset_fingerprint: Some(fp),
        num_classes: Some(num_classes),
        class_names: Some(class_names),
        cache_key: Some(key.clone()),
        created_at: Some(crate::results::now_rfc3339()),
        checkpoint_source: Some(serde_json::to_value(&loaded.source).expect("source serialises")),
    };
    let set = FeatureSet { features, labels, meta };
    if let Some(p) = cache_path.as_ref().filter(|_| world.is_main() && skipped_paths.is_empty()) {
        set.save(p)?;
    }
    let report = ExtractReport {
        cache_key: key,
        path: cache_path,
        cache_hit: false,
        seconds: t0.elapsed().as_secs_f64(),
        images_per_s: Some(n as f64 / extract_s.max(1e-9)),
        skipped_paths,
        ignored_keys,
    };
    Ok((set, report))
}
