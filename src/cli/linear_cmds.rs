//! `eval --protocol linear` (the MAE recipe) and `eval --protocol linear-sweep` (many heads on cached features).
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use tch::{Device, Kind, Tensor};

use crate::checkpoint::load_vit;
use crate::data::dataset::Dataset;
use crate::data::loader::{Loader, LoaderConfig};
use crate::data::transforms::Transform;
use crate::info::{device_name, parse_device};
use crate::protocols::extract::eval_transform;
use crate::protocols::linear::{train_probe, ImageBatches, LinearConfig};
use crate::protocols::linear_sweep::{heads_json, run_sweep, sweep_features, SweepConfig, SweepFeatures};
use crate::results::{Provenance, RunRecord};

/// What the training protocols (linear, linear-sweep, finetune) need from the command line.
pub struct ProtocolInputs<'a> {
    /// The encoder; the linear protocols require it, fine-tuning without it starts from a random init of `arch`.
    pub checkpoint: Option<&'a Path>,
    pub arch: Option<&'a str>,
    pub data: &'a Path,
    pub device: &'a str,
    pub output: &'a Path,
    pub name: Option<String>,
    pub quiet: bool,
    pub workers: Option<usize>,
    pub protocol_file: Option<&'a Path>,
    pub sets: &'a [String],
    /// Fine-tuning: start over instead of resuming.
    pub fresh: bool,
}

impl ProtocolInputs<'_> {
    fn checkpoint(&self) -> anyhow::Result<&Path> {
        self.checkpoint.ok_or_else(|| crate::Error::option("--checkpoint", "the linear protocols need an encoder checkpoint").into())
    }
}

/// The protocol file: the given one, else `protocols/<name>.toml` when present, else the built-in copy.
pub(super) fn protocol_config<T: serde::Serialize + serde::de::DeserializeOwned + Default>(file: Option<&Path>, default: &str, builtin: &str, sets: &[String]) -> anyhow::Result<T> {
    if let Some(f) = file {
        return Ok(crate::config::load(Some(f), sets)?);
    }
    let p = PathBuf::from(default);
    if p.exists() {
        return Ok(crate::config::load(Some(&p), sets)?);
    }
    let tmp = std::env::temp_dir().join(format!("lmim-bench-{}-{}.toml", std::process::id(), default.replace('/', "_")));
    std::fs::write(&tmp, builtin)?;
    let cfg = crate::config::load(Some(&tmp), sets);
    let _ = std::fs::remove_file(&tmp);
    Ok(cfg?)
}

struct ProbeData {
    train: Loader,
    val: Loader,
    classes: i64,
}

fn tensors(b: crate::Result<crate::data::loader::Batch>) -> crate::Result<(Tensor, Tensor)> {
    b.map(|b| (b.images, b.labels))
}

impl ImageBatches for ProbeData {
    fn num_classes(&self) -> i64 {
        self.classes
    }
    fn train_batches_per_epoch(&self) -> usize {
        self.train.num_batches()
    }
    fn train_epoch(&self, epoch: usize) -> Box<dyn Iterator<Item = crate::Result<(Tensor, Tensor)>> + '_> {
        Box::new(self.train.epoch(epoch as u64).map(tensors))
    }
    fn val_batches(&self) -> Box<dyn Iterator<Item = crate::Result<(Tensor, Tensor)>> + '_> {
        Box::new(self.val.epoch(0).map(tensors))
    }
}

fn open_splits(data: &Path) -> anyhow::Result<(Dataset, Dataset)> {
    let train = Dataset::open(data, "train")?;
    let val = Dataset::open(data, "val")?;
    if train.classes != val.classes {
        anyhow::bail!(crate::Error::data(data, format!("train has {} classes and val {}: the class folders differ", train.classes.len(), val.classes.len())));
    }
    Ok((train, val))
}

fn loader(ds: Dataset, t: Transform, batch: usize, shuffle: bool, seed: u64, inp: &ProtocolInputs) -> crate::Result<Loader> {
    let mut cfg = LoaderConfig { batch_size: batch, shuffle, drop_last: false, seed, quiet: inp.quiet, ..Default::default() };
    if let Some(w) = inp.workers {
        cfg.workers = w;
    }
    Loader::new(ds, t, cfg)
}

fn base_record(protocol: &str, version: &str, inp: &ProtocolInputs, sha: &str, arch: &str, train: &Dataset, device: Device) -> anyhow::Result<RunRecord> {
    let mut rec = RunRecord::new(protocol, version, "top1");
    let ckpt = inp.checkpoint()?;
    rec.model_name = inp.name.clone().unwrap_or_else(|| ckpt.file_stem().map_or("model".into(), |s| s.to_string_lossy().to_string()));
    rec.checkpoint = Some(ckpt.display().to_string());
    rec.checkpoint_sha256 = Some(sha.to_string());
    rec.arch = Some(arch.to_string());
    rec.dataset = Some(inp.data.display().to_string());
    rec.dataset_fingerprint = Some(serde_json::to_value(train.fingerprint()?)?);
    rec.provenance = Provenance::current(&device_name(device));
    Ok(rec)
}

/// The MAE linear probe.
pub fn linear(inp: &ProtocolInputs) -> anyhow::Result<RunRecord> {
    let cfg: LinearConfig = protocol_config(inp.protocol_file, "protocols/linear.toml", include_str!("../../protocols/linear.toml"), inp.sets)?;
    cfg.validate()?;
    let device = parse_device(inp.device)?;
    let ckpt = inp.checkpoint()?;
    let loaded = load_vit(ckpt, inp.arch, device, 0).with_context(|| format!("loading {}", ckpt.display()))?;
    let (train_ds, val_ds) = open_splits(inp.data)?;
    let size = loaded.model.cfg.img_size as u32;
    let mut rec = base_record("linear", &cfg.version, inp, &loaded.sha256, &loaded.model.cfg.arch, &train_ds, device)?;
    let classes = train_ds.classes.len() as i64;
    let train_t = Transform::train(size, cfg.crop_scale_min);
    let data = ProbeData {
        train: loader(train_ds, train_t, cfg.micro_batch_size as usize, true, cfg.seed, inp)?,
        val: loader(val_ds, eval_transform(size as i64, 0.875)?, cfg.micro_batch_size as usize, false, cfg.seed, inp)?,
        classes,
    };
    let t0 = Instant::now();
    std::fs::create_dir_all(inp.output)?;
    let log_path = inp.output.join(format!("{}-linear-metrics.jsonl", rec.model_name));
    let mut log = std::fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let quiet = inp.quiet;
    let res = train_probe(&loaded.model, &data, &cfg, device, |v| {
        use std::io::Write;
        let _ = writeln!(log, "{v}");
        if !quiet {
            eprintln!("linear {v}");
        }
    })?;
    rec.metrics.insert("top1".into(), res.top1);
    rec.metrics.insert("top5".into(), res.top5);
    rec.metrics.insert("best_top1".into(), res.best_top1);
    rec.config = serde_json::to_value(&cfg)?;
    rec.seed = cfg.seed;
    rec.duration_s = t0.elapsed().as_secs_f64();
    rec.details = serde_json::json!({ "history": res.history, "best_epoch": res.best_epoch, "steps": res.steps, "lr": cfg.lr(), "accum_iter": cfg.accum_iter() });
    rec.write(inp.output)?;
    Ok(rec)
}

fn features(model: &crate::model::VisionTransformer, ld: &Loader, device: Device, amp: Option<Kind>) -> crate::Result<SweepFeatures> {
    let (mut cls, mut avg, mut labels) = (Vec::new(), Vec::new(), Vec::new());
    for b in ld.epoch(0) {
        let b = b?;
        let (c, a) = sweep_features(model, &b.images.to_device(device), amp);
        cls.push(c.to_device(Device::Cpu));
        avg.push(a.to_device(Device::Cpu));
        labels.push(b.labels);
    }
    if labels.is_empty() {
        return Err(crate::Error::data(ld.dataset().dir.clone(), "the split yielded no images"));
    }
    Ok(SweepFeatures { cls: Tensor::cat(&cls, 0), avg: Tensor::cat(&avg, 0), labels: Tensor::cat(&labels, 0) })
}

/// The DINOv2-style sweep of 52 heads on cached features.
pub fn sweep(inp: &ProtocolInputs) -> anyhow::Result<RunRecord> {
    let cfg: SweepConfig = protocol_config(inp.protocol_file, "protocols/linear_sweep.toml", include_str!("../../protocols/linear_sweep.toml"), inp.sets)?;
    let device = parse_device(inp.device)?;
    let amp = match cfg.precision.as_str() {
        "bf16" => Some(Kind::BFloat16),
        "auto" if device.is_cuda() => Some(Kind::BFloat16),
        _ => None,
    };
    let ckpt = inp.checkpoint()?;
    let loaded = load_vit(ckpt, inp.arch, device, 0).with_context(|| format!("loading {}", ckpt.display()))?;
    let (train_ds, val_ds) = open_splits(inp.data)?;
    let mut rec = base_record("linear-sweep", &cfg.version, inp, &loaded.sha256, &loaded.model.cfg.arch, &train_ds, device)?;
    let classes = train_ds.classes.len() as i64;
    let t = eval_transform(loaded.model.cfg.img_size, 0.875)?;
    let t0 = Instant::now();
    let train = features(&loaded.model, &loader(train_ds, t.clone(), 256, false, cfg.seed, inp)?, device, amp)?;
    let val = features(&loaded.model, &loader(val_ds, t, 256, false, cfg.seed, inp)?, device, amp)?;
    let extract_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let res = run_sweep(&train, &val, classes, &cfg, device)?;
    rec.metrics.insert("top1".into(), res.best.val_top1);
    rec.metrics.insert("top5".into(), res.best.val_top5);
    rec.metrics.insert("holdout_top1".into(), res.best.holdout_top1);
    rec.config = serde_json::to_value(&cfg)?;
    rec.seed = cfg.seed;
    rec.duration_s = t0.elapsed().as_secs_f64();
    rec.details = serde_json::json!({
        "best": res.best, "heads": heads_json(&res), "holdout_size": res.holdout_size, "train_size": res.train_size,
        "extract_s": extract_s, "train_heads_s": t1.elapsed().as_secs_f64(),
        "selection": "best head on a held-out part of the training split, reported on val",
    });
    rec.write(inp.output)?;
    Ok(rec)
}
