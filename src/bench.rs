//! Throughput of the training loops, measured with the same code the commands run: the step skeleton
//! (`train::step::run_epoch`) driving the Latent MIM step of `pretrain` (views, online + target encoders, decoder,
//! loss, backward, AdamW, EMA) and the fine-tuning step of `eval --protocol finetune` (Mixup/CutMix, forward with
//! drop path, backward, AdamW with layer decay; optionally fed by the real augmentation pipeline), and the 52-head
//! linear sweep on random features. `lmim-bench bench` writes the results as JSON.
use std::path::Path;
use std::time::Instant;

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::config::Precision;
use crate::data::loader::Batch;
use crate::error::{Error, Result};
use crate::model::VitConfig;
use crate::protocols::finetune::{loaders, FinetuneConfig, Finetuner};
use crate::protocols::linear_sweep::{run_sweep, SweepConfig, SweepFeatures};
use crate::protocols::RunOptions;
use crate::train::pretrain::{PretrainConfig, Trainer};
use crate::train::step::one_step;

/// Steps not timed (allocator, kernel selection), then timed steps.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Timing {
    pub warmup: usize,
    pub steps: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub what: String,
    pub arch: String,
    pub batch: i64,
    pub steps: usize,
    pub seconds: f64,
    pub s_per_step: f64,
    /// Images (or, for the sweep, feature rows x epochs) per second.
    pub items_per_s: f64,
    /// Peak resident memory of the process (VmHWM), all phases included.
    pub peak_rss_mib: Option<f64>,
    pub device: String,
    pub precision: String,
    pub threads: i64,
    pub details: serde_json::Value,
}

/// The process's peak resident set size in MiB (Linux), `None` elsewhere.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Runs `step(i)` for warmup + steps iterations and times the last `steps`, synchronising the device around them.
fn timed(t: Timing, device: Device, mut step: impl FnMut(usize) -> Result<()>) -> Result<f64> {
    if t.steps == 0 {
        return Err(Error::option("--steps", "must be positive"));
    }
    for i in 0..t.warmup {
        step(i)?;
    }
    sync(device);
    let start = Instant::now();
    for i in 0..t.steps {
        step(t.warmup + i)?;
    }
    sync(device);
    Ok(start.elapsed().as_secs_f64())
}

fn result(what: &str, arch: &str, batch: i64, t: Timing, secs: f64, items_per_step: f64, device: Device, amp: Option<Kind>, details: serde_json::Value) -> BenchResult {
    BenchResult {
        what: what.into(),
        arch: arch.into(),
        batch,
        steps: t.steps,
        seconds: secs,
        s_per_step: secs / t.steps as f64,
        items_per_s: items_per_step * t.steps as f64 / secs,
        peak_rss_mib: peak_rss_mib(),
        device: crate::info::device_name(device),
        precision: if amp.is_some() { "bf16".into() } else { "f32".into() },
        threads: tch::get_num_threads() as i64,
        details,
    }
}

/// Latent MIM pretraining steps (one micro-batch of `batch` each) on random images of the config's training size:
/// the model and the step of `pretrain`, not the loader.
pub fn pretrain_steps(cfg: &PretrainConfig, batch: i64, t: Timing, device: Device) -> Result<BenchResult> {
    let mut tr = Trainer::new(cfg, device)?;
    let amp = cfg.precision.autocast(device);
    let vit = tr.model.vit_cfg.clone();
    let size = cfg.model.train_size()?;
    let images = Tensor::randn([batch, 3, size, size], (Kind::Float, device));
    let mut last_loss = f64::NAN;
    let secs = timed(t, device, |i| {
        last_loss = tr.timed_step(vec![images.shallow_clone()], i)?;
        Ok(())
    })?;
    let details = serde_json::json!({ "train_size": size, "num_vis": cfg.model.num_vis, "patch_gap": cfg.model.patch_gap,
        "decoder_depth": cfg.model.decoder_depth, "last_loss": last_loss, "input": "random images on the device" });
    Ok(result("pretrain-step", &vit.arch, batch, t, secs, batch as f64, device, amp, details))
}

/// Fine-tuning steps of `arch` at `cfg.micro_batch_size` (the step of `eval --protocol finetune`): on random
/// images, or with `data` on batches from the recipe's loader (decode, RandomResizedCrop, RandAugment,
/// RandomErasing on worker threads).
pub fn finetune_steps(arch: &str, cfg: &FinetuneConfig, t: Timing, device: Device, precision: Precision, data: Option<&Path>) -> Result<BenchResult> {
    cfg.validate()?;
    let amp = precision.autocast(device);
    let run = RunOptions { quiet: true, ..Default::default() };
    let feed = match data {
        Some(root) => {
            let (train, _) = loaders(root, VitConfig::from_arch(arch)?.img_size as u32, cfg, &run)?;
            if train.num_batches() < t.warmup + t.steps {
                return Err(Error::option("--steps", format!("the data gives {} batches of {}, fewer than warmup + steps", train.num_batches(), cfg.micro_batch_size)));
            }
            Some(train)
        }
        None => None,
    };
    let classes = feed.as_ref().map_or(1000, |f| f.dataset().classes.len() as i64);
    let mut ft = Finetuner::new(None, Some(arch), classes, cfg, device, precision)?;
    let b = cfg.micro_batch_size as i64;
    let size = ft.fm.cfg.img_size;
    let mut batches: Box<dyn Iterator<Item = Result<Batch>>> = match &feed {
        Some(train) => Box::new(train.epoch(0)),
        None => {
            let x = Tensor::randn([b, 3, size, size], (Kind::Float, Device::Cpu));
            let y = Tensor::randint(classes, [b], (Kind::Int64, Device::Cpu));
            let indices: Vec<usize> = (0..b as usize).collect();
            Box::new(std::iter::repeat_with(move || Ok(Batch { images: x.shallow_clone(), labels: y.shallow_clone(), indices: indices.clone(), batch: 0, skipped: 0 })))
        }
    };
    let clip = cfg.clip_grad;
    let secs = timed(t, device, |i| {
        let batch = batches.next().ok_or_else(|| Error::option("--steps", "the data ran out"))??;
        one_step(&mut ft, vec![batch], i, clip)?;
        Ok(())
    })?;
    let input = if data.is_some() { "augmentation pipeline (RandAugment, RandomErasing, Mixup/CutMix)" } else { "random images, Mixup/CutMix" };
    let details = serde_json::json!({ "input": input, "drop_path": cfg.drop_path, "layer_decay": cfg.layer_decay, "classes": classes });
    Ok(result("finetune-step", arch, b, t, secs, b as f64, device, amp, details))
}

/// The 52-head linear sweep (`cfg.epochs` epochs) on `n` random feature rows of width `dim` (4 blocks + avgpool).
pub fn sweep(n: i64, dim: i64, classes: i64, cfg: &SweepConfig, device: Device) -> Result<BenchResult> {
    let feats = |n: i64| SweepFeatures {
        cls: Tensor::randn([n, 4, dim], (Kind::Float, Device::Cpu)),
        avg: Tensor::randn([n, dim], (Kind::Float, Device::Cpu)),
        labels: Tensor::randint(classes, [n], (Kind::Int64, Device::Cpu)),
    };
    let (train, val) = (feats(n), feats((n / 10).max(classes)));
    let t = Timing { warmup: 0, steps: 1 };
    let mut heads = 0;
    let secs = timed(t, device, |_| {
        heads = run_sweep(&train, &val, classes, cfg, device)?.heads.len();
        Ok(())
    })?;
    let details = serde_json::json!({ "n_train": n, "dim": dim, "classes": classes, "heads": heads, "epochs": cfg.epochs, "batch_size": cfg.batch_size });
    Ok(result("linear-sweep", &format!("features {n}x{dim}"), cfg.batch_size as i64, t, secs, (n as usize * cfg.epochs) as f64, device, None, details))
}

/// The gradient all-reduce of data-parallel training (`dist::World::average_gradients`: 25 MB buckets, all in
/// flight at once, then divided by the world size) over the parameters of `arch`, between the processes of the
/// job (start it with torchrun or the RANK / WORLD_SIZE / MASTER_* variables). Items per second are gradients.
pub fn allreduce(arch: &str, t: Timing, device: Device) -> Result<BenchResult> {
    let cfg = VitConfig::from_arch(arch)?;
    let vs = tch::nn::VarStore::new(device);
    let _vit = crate::model::VisionTransformer::new(&vs.root(), &cfg);
    let params = vs.trainable_variables();
    // Gradients of ones, allocated as backward allocates them.
    let total = params.iter().map(|p| p.sum(Kind::Float)).fold(Tensor::zeros([], (Kind::Float, device)), |a, b| a + b);
    total.backward();
    let n: i64 = params.iter().map(|p| p.numel() as i64).sum();
    let world = crate::dist::world();
    let secs = timed(t, device, |_| world.average_gradients(params.iter()))?;
    let bytes = 4.0 * n as f64;
    let per = secs / t.steps as f64;
    // Ring all-reduce moves 2 (w - 1) / w of the data through each link (NCCL's "bus bandwidth").
    let bus = 2.0 * (world.size as f64 - 1.0) / world.size as f64 * bytes / per / 1e9;
    let details = serde_json::json!({ "gradients": n, "megabytes": bytes / 1e6, "tensors": params.len(), "bus_gb_per_s": bus, "world": world.describe() });
    Ok(result("allreduce", arch, 0, t, secs, n as f64, device, None, details))
}
