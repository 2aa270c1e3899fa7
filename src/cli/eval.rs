//! `lmim-bench extract` and `lmim-bench eval` (k-NN and leave-one-out 1-NN).
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::{Args, ValueEnum};

use crate::error::Error;
use crate::info::{device_name, parse_device};
use crate::protocols::extract::{self, ExtractReport, ExtractRequest, FeatureKind, FeatureSet};
use crate::protocols::knn::{self, KnnParams, ProtocolSpec, SearchConfig};
use crate::results::{write_output, Provenance, RunRecord};

#[derive(Debug, Args)]
pub struct ExtractArgs {
    /// Encoder checkpoint (safetensors or .pth; timm, MAE or Latent MIM keys).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Dataset root with <split>/<class>/*.jpg (or ImageNet's flat val).
    #[arg(long)]
    pub data: PathBuf,
    /// Split to extract.
    #[arg(long, default_value = "val")]
    pub split: String,
    /// Architecture, when the checkpoint does not say (it must match when it does).
    #[arg(long)]
    pub arch: Option<String>,
    /// Feature: cls (CLS after the final norm), avg (patch mean after the norm), cls+avg, avg-prenorm (patch mean
    /// of the last block before the final norm).
    #[arg(long, default_value = "cls")]
    pub feature: String,
    /// Concatenate the features of the last N blocks.
    #[arg(long, default_value_t = 1)]
    pub last_blocks: i64,
    /// Eval transform: Resize(floor(img_size / crop_pct), bicubic) + CenterCrop(img_size).
    #[arg(long, default_value_t = 0.875)]
    pub crop_pct: f64,
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    /// Decode threads (default: all cores).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Device: auto, cpu, cuda or cuda:N (bf16 autocast on CUDA).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Store the features as f16.
    #[arg(long)]
    pub half: bool,
    /// Feature cache directory.
    #[arg(long, default_value = "results/cache")]
    pub cache_dir: PathBuf,
    /// Always extract; do not read or write the cache.
    #[arg(long)]
    pub no_cache: bool,
    /// Also write the features to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// No progress bar or warnings.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Protocol {
    /// DINO's weighted k-NN, train bank -> val (protocols/knn.toml).
    Knn,
    /// The Latent MIM code's leave-one-out 1-NN on val (protocols/nn_loo.toml).
    NnLoo,
    /// MAE's linear probe: LARS, BN + Linear head, the backbone on every augmented crop (protocols/linear.toml).
    Linear,
    /// 52 linear heads on cached features, chosen on held-out train data (protocols/linear_sweep.toml).
    LinearSweep,
    /// MAE's full fine-tuning (protocols/finetune.toml); without --checkpoint, from a random init of --arch.
    Finetune,
}

impl Protocol {
    fn name(self) -> &'static str {
        match self {
            Protocol::Knn => "knn",
            Protocol::NnLoo => "nn-loo",
            Protocol::Linear => "linear",
            Protocol::LinearSweep => "linear-sweep",
            Protocol::Finetune => "finetune",
        }
    }
}

fn inputs<'a>(a: &'a EvalArgs, data: &'a Path) -> super::linear_cmds::ProtocolInputs<'a> {
    super::linear_cmds::ProtocolInputs {
        checkpoint: a.checkpoint.as_deref(),
        arch: a.arch.as_deref(),
        data,
        device: &a.device,
        output: &a.output,
        name: a.name.clone(),
        quiet: a.quiet,
        workers: a.workers,
        protocol_file: a.protocol_file.as_deref(),
        sets: &a.sets,
        fresh: a.fresh,
    }
}

fn eval_finetune(a: &EvalArgs) -> anyhow::Result<()> {
    let Some(data) = a.data.as_deref() else {
        return Err(Error::option("--data", "fine-tuning needs a dataset root with train/ and val/").into());
    };
    print_record(a, &super::finetune_cmds::finetune(&inputs(a, data))?)
}

fn print_record(a: &EvalArgs, rec: &RunRecord) -> anyhow::Result<()> {
    let text = if a.json {
        serde_json::to_string_pretty(rec)? + "\n"
    } else {
        format!("{} {}: top-1 {:.2}, top-5 {:.2}\n", rec.model_name, rec.protocol, rec.metrics["top1"], rec.metrics["top5"])
    };
    crate::results::write_output("-", &text)?;
    Ok(())
}

fn eval_linear(a: &EvalArgs) -> anyhow::Result<()> {
    let (Some(_), Some(data)) = (a.checkpoint.as_deref(), a.data.as_deref()) else {
        return Err(Error::option("--checkpoint/--data", "the linear protocols need both (they run the encoder)").into());
    };
    let inp = inputs(a, data);
    let rec = match a.protocol {
        Protocol::Linear => super::linear_cmds::linear(&inp)?,
        _ => super::linear_cmds::sweep(&inp)?,
    };
    print_record(a, &rec)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// libtorch (the faster of the two on the CPU here, see benchmarks/knn.md).
    Auto,
    /// Chunked libtorch matmul + top-k on --device.
    Torch,
    /// faiss's exact inner-product index (IndexFlatIP), CPU.
    Faiss,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Protocol.
    #[arg(long, value_enum)]
    pub protocol: Protocol,
    /// Override a protocol-file key of the linear and fine-tuning protocols, e.g. `--set epochs=20` (repeatable;
    /// recorded).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Encoder checkpoint; features are extracted (or taken from the cache).
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Dataset root with train/ and val/.
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[arg(long)]
    pub arch: Option<String>,
    /// Train features file (k-NN), instead of --checkpoint/--data.
    #[arg(long)]
    pub train_features: Option<PathBuf>,
    /// Val features file, instead of --checkpoint/--data.
    #[arg(long)]
    pub val_features: Option<PathBuf>,
    /// Protocol file (default: protocols/knn.toml or protocols/nn_loo.toml here, else the built-in copy).
    #[arg(long)]
    pub protocol_file: Option<PathBuf>,
    /// Override the protocol's feature (the record's protocol version then says so).
    #[arg(long)]
    pub feature: Option<String>,
    /// Override the protocol's number of blocks.
    #[arg(long)]
    pub last_blocks: Option<i64>,
    /// Override the list of k, e.g. `10,20`.
    #[arg(long, value_delimiter = ',')]
    pub k: Option<Vec<i64>>,
    /// Override the temperature.
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Override the k of the headline number.
    #[arg(long)]
    pub headline_k: Option<i64>,
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: Backend,
    /// Device for extraction and search: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Queries per similarity block.
    #[arg(long)]
    pub query_chunk: Option<i64>,
    /// Bank rows per similarity block.
    #[arg(long)]
    pub bank_chunk: Option<i64>,
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    #[arg(long)]
    pub workers: Option<usize>,
    #[arg(long, default_value = "results/cache")]
    pub cache_dir: PathBuf,
    #[arg(long)]
    pub no_cache: bool,
    /// Model name in the record and the table (default: the checkpoint's file stem).
    #[arg(long)]
    pub name: Option<String>,
    /// Directory for the results record (JSON) and results.csv.
    #[arg(long, default_value = "results/runs")]
    pub output: PathBuf,
    /// Print the record as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    #[arg(long)]
    pub quiet: bool,
    /// Fine-tuning: start over instead of resuming from the checkpoint in `<output>/<name>-finetune/`.
    #[arg(long)]
    pub fresh: bool,
}

pub fn extract(a: ExtractArgs) -> anyhow::Result<()> {
    let device = parse_device(&a.device)?;
    let req = ExtractRequest {
        checkpoint: a.checkpoint.clone(),
        arch: a.arch.clone(),
        data_root: a.data.clone(),
        split: a.split.clone(),
        feature: FeatureKind::parse(&a.feature)?,
        last_blocks: a.last_blocks,
        batch_size: a.batch_size,
        device,
        crop_pct: a.crop_pct,
        half: a.half,
        cache_dir: (!a.no_cache).then(|| a.cache_dir.clone()),
        workers: a.workers,
        quiet: a.quiet,
    };
    let (set, report) = extract::extract(&req).with_context(|| format!("extracting {} features of {}", a.split, a.checkpoint.display()))?;
    if let Some(out) = &a.out {
        match &report.path {
            Some(p) => copy_file(p, out)?,
            None => set.save(out).with_context(|| format!("writing {}", out.display()))?,
        }
    }
    let summary = serde_json::json!({
        "n": set.len(),
        "dim": set.dim(),
        "num_classes": set.num_classes(),
        "feature": set.meta.feature,
        "transform": set.meta.transform,
        "checkpoint_sha256": set.meta.checkpoint_sha256,
        "device": device_name(device),
        "cache": report,
        "out": a.out,
    });
    let text = if a.json {
        serde_json::to_string_pretty(&summary)? + "\n"
    } else {
        let src = if report.cache_hit { "cache hit".to_string() } else { format!("extracted in {:.1} s", report.seconds) };
        let mut s = format!(
            "{} features: {} x {} ({} classes), {}; {}\n",
            a.split,
            set.len(),
            set.dim(),
            set.num_classes(),
            set.meta.transform.as_deref().unwrap_or(""),
            src
        );
        if let Some(p) = &report.path {
            s.push_str(&format!("cache: {}\n", p.display()));
        }
        if let Some(o) = &a.out {
            s.push_str(&format!("written: {}\n", o.display()));
        }
        s
    };
    write_output("-", &text)?;
    Ok(())
}

fn copy_file(from: &Path, to: &Path) -> anyhow::Result<()> {
    if let Some(dir) = to.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::copy(from, to).map_err(|e| Error::io(to, e))?;
    Ok(())
}

/// The effective settings of a run: the protocol file plus the command line.
struct Settings {
    spec: ProtocolSpec,
    spec_origin: String,
    feature: FeatureKind,
    last_blocks: i64,
    ks: Vec<i64>,
    temperature: f64,
    headline_k: i64,
    /// What differs from the protocol file, e.g. `feature=avg`; appended to the version.
    overrides: Vec<String>,
}

impl Settings {
    fn new(a: &EvalArgs) -> anyhow::Result<Settings> {
        let (spec, spec_origin) = ProtocolSpec::resolve(a.protocol.name(), a.protocol_file.as_deref())?;
        let mut overrides = Vec::new();
        let feature = match &a.feature {
            Some(f) => FeatureKind::parse(f)?,
            None => FeatureKind::parse(&spec.feature)?,
        };
        let last_blocks = a.last_blocks.unwrap_or(spec.last_blocks);
        let mut ks = a.k.clone().unwrap_or_else(|| spec.ks.clone());
        let temperature = a.temperature.unwrap_or(spec.temperature.unwrap_or(0.07));
        let headline_k = a.headline_k.or(spec.headline_k).unwrap_or(1);
        if a.protocol == Protocol::Knn {
            if ks.is_empty() || ks.iter().any(|&k| k < 1) {
                return Err(Error::option("--k", "needs positive integers, e.g. 10,20,100,200").into());
            }
            ks.sort_unstable();
            ks.dedup();
            if !ks.contains(&headline_k) {
                return Err(Error::option("--headline-k", format!("{headline_k} is not among the k values {ks:?}")).into());
            }
            if !(temperature > 0.0 && temperature.is_finite()) {
                return Err(Error::option("--temperature", "must be a positive number").into());
            }
            if temperature != spec.temperature.unwrap_or(f64::NAN) {
                overrides.push(format!("T={temperature}"));
            }
            if Some(headline_k) != spec.headline_k {
                overrides.push(format!("headline_k={headline_k}"));
            }
        } else if a.k.is_some() || a.temperature.is_some() || a.headline_k.is_some() {
            return Err(Error::option("--k/--temperature/--headline-k", "nn-loo is a 1-NN without voting").into());
        }
        if feature.name() != FeatureKind::parse(&spec.feature)?.name() {
            overrides.push(format!("feature={feature}"));
        }
        if last_blocks != spec.last_blocks {
            overrides.push(format!("last_blocks={last_blocks}"));
        }
        Ok(Settings { spec, spec_origin, feature, last_blocks, ks, temperature, headline_k, overrides })
    }

    fn version(&self) -> String {
        if self.overrides.is_empty() {
            self.spec.version.clone()
        } else {
            format!("{}+{}", self.spec.version, self.overrides.join(","))
        }
    }
}

/// One split's features, with where they came from.
struct Loaded {
    set: FeatureSet,
    source: serde_json::Value,
}

fn load_features(path: &Path, role: &str) -> anyhow::Result<Loaded> {
    let set = FeatureSet::load(path).with_context(|| format!("reading the {role} features"))?;
    let source = serde_json::json!({ "file": path, "cache_key": set.meta.cache_key });
    Ok(Loaded { set, source })
}

fn extract_split(a: &EvalArgs, s: &Settings, split: &str, device: tch::Device) -> anyhow::Result<Loaded> {
    let (Some(ckpt), Some(data)) = (&a.checkpoint, &a.data) else { unreachable!("checked by the caller") };
    let req = ExtractRequest {
        checkpoint: ckpt.clone(),
        arch: a.arch.clone(),
        data_root: data.clone(),
        split: split.to_string(),
        feature: s.feature,
        last_blocks: s.last_blocks,
        batch_size: a.batch_size,
        device,
        crop_pct: s.spec.transform.crop_pct,
        half: false,
        cache_dir: (!a.no_cache).then(|| a.cache_dir.clone()),
        workers: a.workers,
        quiet: a.quiet,
    };
    let (set, report): (FeatureSet, ExtractReport) =
        extract::extract(&req).with_context(|| format!("extracting {split} features of {}", ckpt.display()))?;
    if !a.quiet {
        let how = if report.cache_hit { "from the cache".to_string() } else { format!("extracted in {:.1} s", report.seconds) };
        eprintln!("{split}: {} x {} features, {how}", set.len(), set.dim());
    }
    Ok(Loaded { set, source: serde_json::to_value(&report)? })
}

/// Train and val feature files must describe the same model, feature and label space.
fn check_pair(train: &FeatureSet, val: &FeatureSet) -> anyhow::Result<()> {
    let bad = |reason: String| -> anyhow::Error { Error::data("val features", reason).into() };
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

/// The feature kind and blocks of the features actually used: a file's own (an explicit --feature must agree),
/// reflected in the version when they are not the protocol's.
fn file_feature(a: &EvalArgs, set: &FeatureSet, s: &mut Settings) -> anyhow::Result<String> {
    let f = set.meta.feature.clone().unwrap_or_else(|| "unknown".into());
    if let (Some(asked), Some(have)) = (&a.feature, &set.meta.feature) {
        if FeatureKind::parse(asked)?.name() != have {
            return Err(Error::option("--feature", format!("`{asked}` but the features file holds `{have}` features")).into());
        }
    }
    s.overrides.retain(|o| !o.starts_with("feature=") && !o.starts_with("last_blocks="));
    if f != FeatureKind::parse(&s.spec.feature)?.name() {
        s.overrides.push(format!("feature={f}"));
    }
    let blocks = set.meta.last_blocks.unwrap_or(s.last_blocks);
    if blocks != s.spec.last_blocks {
        s.overrides.push(format!("last_blocks={blocks}"));
    }
    s.last_blocks = blocks;
    Ok(f)
}

fn combined_fingerprint(parts: &[(&str, &FeatureSet)]) -> Option<serde_json::Value> {
    let mut obj = serde_json::Map::new();
    let mut hashes = Vec::new();
    for (role, set) in parts {
        let fp = set.meta.dataset_fingerprint.clone()?;
        hashes.push(set.meta.dataset_hash.clone().unwrap_or_else(|| extract::fingerprint_hash(&fp)));
        obj.insert(role.to_string(), fp);
    }
    let hash = if hashes.len() == 1 { hashes[0].clone() } else { extract::fingerprint_hash(&serde_json::json!(hashes)) };
    obj.insert("hash".into(), serde_json::Value::String(hash));
    Some(serde_json::Value::Object(obj))
}

pub fn eval(a: EvalArgs) -> anyhow::Result<()> {
    if matches!(a.protocol, Protocol::Linear | Protocol::LinearSweep) {
        return eval_linear(&a);
    }
    if a.protocol == Protocol::Finetune {
        return eval_finetune(&a);
    }
    let t0 = Instant::now();
    let started_at = crate::results::now_rfc3339();
    let mut s = Settings::new(&a)?;
    let device = parse_device(&a.device)?;
    let backend = match a.backend {
        Backend::Faiss => knn::Backend::Faiss,
        Backend::Auto | Backend::Torch => knn::Backend::Torch,
    };
    // The search's own check, before any features are extracted.
    SearchConfig::with_backend(device, 1, backend).check()?;
    let from_model = a.checkpoint.is_some() || a.data.is_some();
    let from_files = a.train_features.is_some() || a.val_features.is_some();
    if from_model && from_files {
        return Err(Error::option("--checkpoint/--data", "give either --checkpoint and --data, or feature files, not both").into());
    }
    if from_model && (a.checkpoint.is_none() || a.data.is_none()) {
        return Err(Error::option("--checkpoint/--data", "both are needed to extract features").into());
    }
    let need_train = a.protocol == Protocol::Knn;
    if !from_model {
        if a.val_features.is_none() || (need_train && a.train_features.is_none()) {
            let what = if need_train { "--train-features and --val-features" } else { "--val-features" };
            return Err(Error::option("--checkpoint", format!("give --checkpoint and --data, or {what}")).into());
        }
        if !need_train && a.train_features.is_some() {
            return Err(Error::option("--train-features", "nn-loo uses the val split only").into());
        }
    }

    let load = |role: &str, file: &Option<PathBuf>, s: &Settings| -> anyhow::Result<Loaded> {
        match file {
            Some(f) => load_features(f, role),
            None => extract_split(&a, s, role, device),
        }
    };
    let val = load(&s.spec.query_split.clone(), &a.val_features, &s)?;
    let train = if need_train { Some(load(&s.spec.bank_split.clone(), &a.train_features, &s)?) } else { None };
    let feature_name = file_feature(&a, &val.set, &mut s)?;
    if let Some(t) = &train {
        check_pair(&t.set, &val.set)?;
    }
    let num_classes = val.set.num_classes();

    let n_bank = train.as_ref().map_or(val.set.len(), |t| t.set.len());
    let mut search = SearchConfig::with_backend(device, n_bank, backend);
    if let Some(q) = a.query_chunk {
        search.query_chunk = q;
    }
    if let Some(b) = a.bank_chunk {
        search.bank_chunk = b;
    }
    if search.query_chunk < 1 || search.bank_chunk < 1 {
        return Err(Error::option("--query-chunk/--bank-chunk", "must be positive").into());
    }

    let mut rec = RunRecord::new(a.protocol.name(), &s.version(), "top1");
    rec.started_at = started_at;
    let mut table = Vec::new();
    let details = match a.protocol {
        Protocol::Knn => {
            let t = train.as_ref().expect("train features");
            let r = knn::weighted_knn(&t.set.features, &t.set.labels, &val.set.features, &val.set.labels, num_classes, &KnnParams { ks: &s.ks, temperature: s.temperature }, &search)?;
            for sc in &r.scores {
                rec.metrics.insert(format!("top1@k{}", sc.k), sc.top1);
                rec.metrics.insert(format!("top5@k{}", sc.k), sc.top5);
                table.push(format!("k={:<4} top-1 {:6.2}  top-5 {:6.2}{}", sc.k, sc.top1, sc.top5, if sc.k == s.headline_k { "  (headline)" } else { "" }));
            }
            let h = r.score(s.headline_k).expect("headline k is among ks");
            rec.metrics.insert("top1".into(), h.top1);
            rec.metrics.insert("top5".into(), h.top5);
            serde_json::json!({ "knn": r, "train": t.source, "val": val.source, "n_train": t.set.len(), "n_val": val.set.len() })
        }
        Protocol::NnLoo => {
            let r = knn::nn_loo(&val.set.features, &val.set.labels, num_classes, &search)?;
            rec.metrics.insert("top1".into(), r.top1);
            table.push(format!("leave-one-out 1-NN on {} val images: top-1 {:.2}", r.n, r.top1));
            serde_json::json!({ "nn_loo": r, "val": val.source, "n_val": val.set.len() })
        }
        Protocol::Linear | Protocol::LinearSweep | Protocol::Finetune => unreachable!("dispatched at the top"),
    };
    let meta = &val.set.meta;
    let ckpt = a.checkpoint.as_ref().map(|p| p.display().to_string()).or_else(|| meta.checkpoint.clone());
    rec.model_name = a.name.clone().unwrap_or_else(|| {
        ckpt.as_ref()
            .and_then(|c| Path::new(c).file_stem().map(|s| s.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "features".into())
    });
    rec.checkpoint = ckpt;
    rec.checkpoint_sha256 = meta.checkpoint_sha256.clone();
    rec.arch = meta.arch.clone();
    rec.dataset = a.data.as_ref().map(|d| d.display().to_string()).or_else(|| meta.dataset_root.clone());
    rec.dataset_fingerprint = match &train {
        Some(t) => combined_fingerprint(&[("train", &t.set), ("val", &val.set)]),
        None => combined_fingerprint(&[("val", &val.set)]),
    };
    rec.config = serde_json::json!({
        "protocol_file": s.spec_origin,
        "protocol": s.spec,
        "overrides": s.overrides,
        "feature": feature_name,
        "last_blocks": s.last_blocks,
        "ks": if a.protocol == Protocol::Knn { serde_json::json!(s.ks) } else { serde_json::Value::Null },
        "temperature": if a.protocol == Protocol::Knn { serde_json::json!(s.temperature) } else { serde_json::Value::Null },
        "headline_k": if a.protocol == Protocol::Knn { serde_json::json!(s.headline_k) } else { serde_json::Value::Null },
        "transform": meta.transform,
        "precision": meta.precision,
        "backend": search.backend_name(),
        "query_chunk": search.query_chunk,
        "bank_chunk": search.bank_chunk,
        "tf32": false,
    });
    rec.provenance = Provenance::current(&device_name(device));
    rec.duration_s = t0.elapsed().as_secs_f64();
    rec.details = details;
    let path = rec.write(&a.output).with_context(|| format!("writing the record to {}", a.output.display()))?;
    let text = if a.json {
        serde_json::to_string_pretty(&rec)? + "\n"
    } else {
        format!(
            "{} v{} on {} ({} features, {}):\n{}\nrecord: {}\n",
            a.protocol.name(),
            rec.protocol_version,
            rec.model_name,
            feature_name,
            search.backend_name(),
            table.join("\n"),
            path.display()
        )
    };
    write_output("-", &text)?;
    Ok(())
}
