//! `knn`, `knn-sweep` and `nn-loo` as library calls: the protocol file with its overrides, features extracted (or cached, or
//! given as files), the search, and the record.
use std::path::Path;

use super::extract::{self, ExtractReport, ExtractRequest, FeatureSet};
use super::extract::FeatureKind;
use super::knn::{self, KnnParams, ProtocolSpec, SearchConfig, TransformSpec};
use super::record::{RecordBuilder, SplitPrint};
use super::{EvalRequest, Protocol};
use crate::config::Precision;
use crate::error::{Error, Result};
use crate::info::device_name;
use crate::results::RunRecord;

/// One split's features, with where they came from.
pub(crate) struct Split {
    pub set: FeatureSet,
    pub source: serde_json::Value,
}

fn load_file(path: &Path) -> Result<Split> {
    let set = FeatureSet::load(path)?;
    let source = serde_json::json!({ "file": path, "cache_key": set.meta.cache_key });
    Ok(Split { set, source })
}

/// A split's features for a protocol (extracted, or from the cache), with the extraction report as its source.
pub(crate) fn extract_split(req: &EvalRequest, feature: FeatureKind, last_blocks: i64, transform: &TransformSpec, split: &str, device: tch::Device) -> Result<Split> {
    extract_rows(req, feature, last_blocks, transform, split, device, None)
}

/// As [`extract_split`], for the `rows` of the split only (in that order) when given.
pub(crate) fn extract_rows(req: &EvalRequest, feature: FeatureKind, last_blocks: i64, transform: &TransformSpec, split: &str, device: tch::Device, rows: Option<Vec<usize>>) -> Result<Split> {
    let run = &req.run;
    let er = ExtractRequest {
        checkpoint: req.checkpoint()?.to_path_buf(),
        arch: req.arch.clone(),
        from: req.from,
        feature_is_default: req.feature_is_default(),
        data_root: req.data()?.to_path_buf(),
        split: split.to_string(),
        feature,
        last_blocks,
        batch_size: run.batch_size,
        device,
        crop_pct: transform.crop_pct,
        bilinear: transform.interpolation == "bilinear",
        half: false,
        cache_dir: run.cache_dir.clone(),
        workers: run.workers,
        precision: run.precision.unwrap_or(Precision::F32),
        quiet: run.quiet,
        skip_bad: run.skip_bad,
        scan: run.scan,
        rows,
    };
    let (set, report): (FeatureSet, ExtractReport) = extract::extract(&er)?;
    if !run.quiet {
        let how = if report.cache_hit { "from the cache".to_string() } else { format!("extracted in {:.1} s", report.seconds) };
        eprintln!("{split}: {} x {} features, {how}", set.len(), set.dim());
    }
    Ok(Split { set, source: serde_json::to_value(&report).expect("report serialises") })
}

/// Train and val feature files must describe the same model, feature and label space.
pub(crate) fn check_pair(train: &FeatureSet, val: &FeatureSet) -> Result<()> {
    let bad = |reason: String| Error::data("val features", reason);
    let (ct, cv) = (train.num_classes(), val.num_classes());
    if ct != cv {
        return Err(bad(format!("{cv} classes but the train features have {ct}")));
    }
    if let (Some(a), Some(b)) = (&train.meta.class_names, &val.meta.class_names) {
        if a != b {
            let first = a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(0);
            return Err(bad(format!("class names differ from the train split's (first at index {first}: `{}` vs `{}`)", b[first], a[first])));
        }
    }
    if let (Some(a), Some(b)) = (&train.meta.checkpoint_sha256, &val.meta.checkpoint_sha256) {
        if a != b {
            return Err(bad(format!("made by checkpoint {} but the train features by {}", &b[..12.min(b.len())], &a[..12.min(a.len())])));
        }
    }
    if let (Some(a), Some(b)) = (&train.meta.feature, &val.meta.feature) {
        if a != b {
            return Err(bad(format!("feature `{b}` but the train features are `{a}`")));
        }
    }
    if train.dim() != val.dim() {
        return Err(bad(format!("dimension {} but the train features have {}", val.dim(), train.dim())));
    }
    Ok(())
}

/// The feature and blocks of a features file replace the recipe's (an explicit override must agree), and the
/// overrides then say so.
fn adopt_file_feature(set: &FeatureSet, spec: &mut ProtocolSpec, base: &ProtocolSpec, sets: &[String]) -> Result<()> {
    let Some(have) = &set.meta.feature else { return Ok(()) };
    let asked = sets.iter().any(|s| s.trim_start().starts_with("feature="));
    if asked && spec.feature.name() != have {
        return Err(Error::option("feature", format!("`{}` but the features file holds `{have}` features", spec.feature)));
    }
    spec.feature = serde_json::from_value(serde_json::json!(have)).map_err(|_| Error::data("features file", format!("unknown feature `{have}`")))?;
    spec.last_blocks = set.meta.last_blocks.unwrap_or(base.last_blocks);
    Ok(())
}

pub(crate) fn print(set: &FeatureSet) -> Option<SplitPrint> {
    let fp = set.meta.dataset_fingerprint.clone()?;
    let hash = set.meta.dataset_hash.clone().unwrap_or_else(|| extract::fingerprint_hash(&fp));
    Some(SplitPrint { role: set.meta.split.clone().unwrap_or_else(|| "split".into()), fingerprint: fp, hash })
}

pub fn run(req: &EvalRequest) -> Result<RunRecord> {
    let mut loaded = req.protocol.load::<ProtocolSpec>(req.protocol_file.as_deref(), &req.sets)?;
    let origin = loaded.origin.clone();
    loaded.base.validate(&origin)?;
    let set_origin = if req.sets.is_empty() { origin.clone() } else { "--set".to_string() };
    loaded.cfg.validate(&set_origin)?;
    if loaded.cfg.name != req.protocol.name() {
        return Err(Error::BadConfig { path: origin.into(), reason: format!("the file is for protocol `{}`, not `{}`", loaded.cfg.name, req.protocol) });
    }
    let device = req.run.device()?;
    // The search's own check, before any features are extracted.
    SearchConfig::with_backend(device, 1, req.run.backend).check()?;
    let knn = matches!(req.protocol, Protocol::Knn | Protocol::KnnSweep);
    let from_model = req.checkpoint.is_some() || req.data.is_some();
    let from_files = req.train_features.is_some() || req.val_features.is_some();
    if from_model && from_files {
        return Err(Error::option("--checkpoint/--data", "give either --checkpoint and --data, or feature files, not both"));
    }
    if from_model && (req.checkpoint.is_none() || req.data.is_none()) {
        return Err(Error::option("--checkpoint/--data", "both are needed to extract features"));
    }
    if !from_model {
        if req.val_features.is_none() || (knn && req.train_features.is_none()) {
            let what = if knn { "--train-features and --val-features" } else { "--val-features" };
            return Err(Error::option("--checkpoint", format!("give --checkpoint and --data, or {what}")));
        }
        if !knn && req.train_features.is_some() {
            return Err(Error::option("--train-features", "nn-loo uses the val split only"));
        }
    }
    let load = |file: &Option<std::path::PathBuf>, split: &str, spec: &ProtocolSpec| match file {
        Some(f) => load_file(f),
        None => extract_split(req, spec.feature, spec.last_blocks, &spec.transform, split, device),
    };
    let spec = loaded.cfg.clone();
    let val = load(&req.val_features, &spec.query_split, &spec)?;
    let train = if knn { Some(load(&req.train_features, &spec.bank_split, &spec)?) } else { None };
    if !crate::dist::world().is_main() {
        // The features were gathered to rank 0, which searches once and writes the record; this rank's record
        // carries no metrics.
        let b = RecordBuilder::new(req.protocol, &spec.version, &loaded.overrides(&[]));
        return b.finish(serde_json::json!({ "search": "on rank 0" }), &device_name(device), &req.output);
    }
    adopt_file_feature(&val.set, &mut loaded.cfg, &loaded.base, &req.sets)?;
    if let Some(t) = &train {
        check_pair(&t.set, &val.set)?;
    }
    let spec = &loaded.cfg;
    let num_classes = val.set.num_classes();
    let n_bank = train.as_ref().map_or(val.set.len(), |t| t.set.len());
    let mut search = SearchConfig::with_backend(device, n_bank, req.run.backend);
    search.query_chunk = req.run.query_chunk.unwrap_or(search.query_chunk);
    search.bank_chunk = req.run.bank_chunk.unwrap_or(search.bank_chunk);
    search.check()?;

    let overrides = loaded.overrides(&[]);
    let mut b = RecordBuilder::new(req.protocol, &spec.version, &overrides);
    let mut details = match &train {
        Some(t) if req.protocol == Protocol::KnnSweep => {
            let grid = knn::weighted_knn_grid(&t.set.features, &t.set.labels, &val.set.features, &val.set.labels, num_classes, &spec.ks, &spec.temperatures, &search)?;
            for r in &grid {
                for sc in &r.scores {
                    b = b.metric(&format!("top1@k{}@T{}", sc.k, r.temperature), sc.top1);
                }
            }
            let (t_best, best) = knn::best_of_grid(&grid).expect("a validated sweep has a grid");
            b = b.metric("top1", best.top1).metric("top5", best.top5);
            let best = serde_json::json!({ "k": best.k, "temperature": t_best, "top1": best.top1, "top5": best.top5 });
            serde_json::json!({ "knn_sweep": grid, "best": best, "train": t.source, "val": val.source, "n_train": t.set.len(), "n_val": val.set.len(),
                "reported": "top1 is the best (k, T) of the grid, as the probing benchmark reports its k-NN; every pair is in the metrics as top1@k<k>@T<T>" })
        }
        Some(t) => {
            let r = knn::weighted_knn(&t.set.features, &t.set.labels, &val.set.features, &val.set.labels, num_classes, &KnnParams { ks: &spec.ks, temperature: spec.temperature.unwrap_or(0.07) }, &search)?;
            for sc in &r.scores {
                b = b.metric(&format!("top1@k{}", sc.k), sc.top1).metric(&format!("top5@k{}", sc.k), sc.top5);
            }
            let headline = spec.headline_k.unwrap_or(20);
            let h = r.score(headline).expect("headline k is among ks (validated)");
            b = b.metric("top1", h.top1).metric("top5", h.top5);
            serde_json::json!({ "knn": r, "train": t.source, "val": val.source, "n_train": t.set.len(), "n_val": val.set.len() })
        }
        None => {
            let (feats, labels, subset) = match (spec.subset.as_str(), spec.world_size, spec.batch_size) {
                ("lmim-ddp", Some(w), Some(bs)) => {
                    let rows = knn::lmim_ddp_rows(val.set.len(), w, bs, 0)?;
                    let distinct = rows.iter().collect::<std::collections::BTreeSet<_>>().len();
                    let idx = tch::Tensor::from_slice(&rows);
                    let note = if w == 1 {
                        "one rank: the reference takes a RandomSampler (unseeded) there, not a DistributedSampler; this is a DistributedSampler over 1 rank"
                    } else {
                        "the images LatentMIM's eval_knn scores: DistributedSampler(shuffle=True, seed=0), DataLoader drop_last=True, all-gathered rank by rank"
                    };
                    let subset = serde_json::json!({ "subset": "lmim-ddp", "world_size": w, "batch_size": bs, "seed": 0, "rows": rows.len(), "distinct_images": distinct, "note": note });
                    (val.set.features.index_select(0, &idx), val.set.labels.index_select(0, &idx), subset)
                }
                _ => (val.set.features.shallow_clone(), val.set.labels.shallow_clone(), serde_json::json!({ "subset": "all", "rows": val.set.len() })),
            };
            let r = knn::nn_loo(&feats, &labels, num_classes, &search)?;
            b = b.metric("top1", r.top1);
            serde_json::json!({ "nn_loo": r, "val": val.source, "n_val": val.set.len(), "scored": subset })
        }
    };
    let skipped: Vec<serde_json::Value> = ["train", "val"]
        .iter()
        .filter_map(|s| details.get(*s)?.get("skipped_paths")?.as_array().cloned())
        .flatten()
        .collect();
    details["skipped_eval"] = serde_json::Value::Array(skipped);
    let meta = &val.set.meta;
    let ckpt = req.checkpoint.clone().or_else(|| meta.checkpoint.as_ref().map(Into::into));
    let name = req.name.clone().unwrap_or_else(|| ckpt.as_ref().and_then(|c| c.file_stem()).map_or("features".into(), |s| s.to_string_lossy().into_owned()));
    let mut prints: Vec<SplitPrint> = Vec::new();
    prints.extend(train.as_ref().and_then(|t| print(&t.set)).map(|mut p| {
        p.role = "train".into();
        p
    }));
    prints.extend(print(&val.set).map(|mut p| {
        p.role = "val".into();
        p
    }));
    let root = req.data.as_ref().map(|d| d.display().to_string()).or_else(|| meta.dataset_root.clone());
    let mut extra = serde_json::json!({
        "transform": meta.transform,
        "precision": meta.precision,
        "backend": search.backend_name(),
        "query_chunk": search.query_chunk,
        "bank_chunk": search.bank_chunk,
    });
    if let Some(best) = details.get("best") {
        extra["best_k"] = best["k"].clone();
        extra["best_temperature"] = best["temperature"].clone();
    }
    b.model(name, ckpt.as_deref(), meta.checkpoint_sha256.clone(), meta.arch.clone())
        .source(meta.checkpoint_source.clone())
        .data(root, &prints)
        .config(&origin, spec, &overrides, &req.run, extra)
        .finish(details, &device_name(device), &req.output)
}
