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
use crate::train::step::run_steps;

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

/// Runs `run(n, index)` (n optimiser steps as epoch `index` of a run) for the warm-up steps and then for the timed
/// steps, synchronising the device around the timed ones; returns their seconds.
fn timed(t: Timing, device: Device, mut run: impl FnMut(usize, usize) -> Result<()>) -> Result<f64> {
    if t.steps == 0 {
        return Err(Error::option("--steps", "must be positive"));
    }
    if t.warmup > 0 {
        run(t.warmup, 0)?;
    }
    sync(device);
    let start = Instant::now();
    run(t.steps, 1)?;
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
    // One counted step (also a warm-up step): the FLOPs for MFU.
    let (r, flops) = crate::model::flops::count(|| tr.timed_steps(&images, 1, 2));
    r?;
    cuda_peak_mib(device, true);
    let secs = timed(t, device, |n, index| {
        last_loss = tr.timed_steps(&images, n, index)?;
        Ok(())
    })?;
    let step_flops = flops.training_step();
    let details = serde_json::json!({ "train_size": size, "num_vis": cfg.model.num_vis, "patch_gap": cfg.model.patch_gap,
        "decoder_depth": cfg.model.decoder_depth, "last_loss": last_loss, "input": "random images on the device",
        "flops_per_step": step_flops, "flops": flops, "tflops_per_s": step_flops * t.steps as f64 / secs / 1e12,
        "sdpa": sdpa_backend(device, amp.unwrap_or(Kind::Float), batch, &vit, cfg.model.num_vis + 1),
        "cuda_peak_mib": cuda_peak_mib(device, false) });
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
            if train.num_batches() < t.warmup + t.steps + 1 {
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
    let (r, flops) = crate::model::flops::count(|| {
        let mut one = batches.by_ref().take(1);
        run_steps(&mut ft, &mut one, 1, 2, clip)
    });
    r?;
    cuda_peak_mib(device, true);
    let secs = timed(t, device, |n, index| {
        let mut some = batches.by_ref().take(n);
        run_steps(&mut ft, &mut some, n, index, clip)?;
        Ok(())
    })?;
    let input = if data.is_some() { "augmentation pipeline (RandAugment, RandomErasing, Mixup/CutMix)" } else { "random images, Mixup/CutMix" };
    let step_flops = flops.training_step();
    let vit = &ft.fm.cfg;
    let details = serde_json::json!({ "input": input, "drop_path": cfg.drop_path, "layer_decay": cfg.layer_decay, "classes": classes,
        "flops_per_step": step_flops, "tflops_per_s": step_flops * t.steps as f64 / secs / 1e12,
        "sdpa": sdpa_backend(device, amp.unwrap_or(Kind::Float), b, vit, vit.num_patches() + 1),
        "cuda_peak_mib": cuda_peak_mib(device, false) });
    Ok(result("finetune-step", arch, b, t, secs, b as f64, device, amp, details))
}

/// The 52-head linear sweep (`cfg.epochs` epochs) on `n` random feature rows of width `dim` (4 blocks + avgpool).
pub fn sweep(n: i64, dim: i64, classes: i64, cfg: &SweepConfig, device: Device) -> Result<BenchResult> {
    // Made on the device: 1.28 M x 5 x 768 normal draws are minutes of one CPU core, seconds of a GPU.
    let feats = |n: i64| SweepFeatures {
        cls: Tensor::randn([n, 4, dim], (Kind::Float, device)),
        avg: Tensor::randn([n, dim], (Kind::Float, device)),
        labels: Tensor::randint(classes, [n], (Kind::Int64, device)),
    };
    let (train, val) = (feats(n), feats((n / 10).max(classes)));
    let t = Timing { warmup: 0, steps: 1 };
    let mut heads = 0;
    let secs = timed(t, device, |_, _| {
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
    let secs = timed(t, device, |n, _| (0..n).try_for_each(|_| world.average_gradients(params.iter())))?;
    let bytes = 4.0 * n as f64;
    let per = secs / t.steps as f64;
    // Ring all-reduce moves 2 (w - 1) / w of the data through each link (NCCL's "bus bandwidth").
    let bus = 2.0 * (world.size as f64 - 1.0) / world.size as f64 * bytes / per / 1e9;
    let details = serde_json::json!({ "gradients": n, "megabytes": bytes / 1e6, "tensors": params.len(), "bus_gb_per_s": bus, "world": world.describe() });
    Ok(result("allreduce", arch, 0, t, secs, n as f64, device, None, details))
}

/// Gathering an `[n, dim]` feature matrix of a split to rank 0, as `extract` does after each rank extracted its
/// block (`protocols::extract::gather_rows`: chunks of `GATHER_ROWS` rows, only rank 0 holds the matrix), or with
/// `naive` as an all-reduce of a zero-padded full matrix on every rank. The details give every rank's peak RSS.
pub fn gather(n: i64, dim: i64, naive: bool) -> Result<BenchResult> {
    let world = crate::dist::world();
    let (w, r) = (world.size as i64, world.rank as i64);
    let (start, end) = (n * r / w, n * (r + 1) / w);
    let rows = Tensor::randn([end - start, dim], (Kind::Float, Device::Cpu));
    let ids = Tensor::arange_start(start, end, (Kind::Int64, Device::Cpu));
    let labels = ids.remainder(1000);
    let rss_before = peak_rss_mib();
    let t0 = Instant::now();
    let held = if naive {
        let full = Tensor::zeros([n, dim], (Kind::Float, Device::Cpu));
        let _ = full.shallow_clone().index_copy_(0, &ids, &rows);
        world.all_reduce_sum(std::slice::from_ref(&full), "the naive gather")?;
        Some(full)
    } else {
        crate::protocols::extract::gather_rows(world, Some((rows.shallow_clone(), ids, labels)), n)?.and_then(|(f, _, _)| f)
    };
    let secs = t0.elapsed().as_secs_f64();
    if let Some(f) = held.as_ref().filter(|_| r == 0) {
        // The gathered matrix is the blocks in order: row i of rank r's block is block row i.
        let own = f.narrow(0, 0, end - start);
        if !own.equal(&rows) {
            return Err(Error::Dist("the gathered matrix differs from rank 0's block".into()));
        }
    }
    let mut slots = vec![0.0; 2 * world.size];
    slots[world.rank] = peak_rss_mib().unwrap_or(f64::NAN);
    slots[world.size + world.rank] = rss_before.unwrap_or(f64::NAN);
    let all = world.sum_f64(&slots, "the peak RSS of every rank")?;
    let matrix_mib = (n * dim * 4) as f64 / (1 << 20) as f64;
    let details = serde_json::json!({
        "n": n, "dim": dim, "mode": if naive { "all-reduce of the full matrix" } else { "gather_rows (chunks to rank 0)" },
        "chunk_rows": crate::protocols::extract::GATHER_ROWS, "matrix_mib": matrix_mib,
        "peak_rss_mib_per_rank": &all[..world.size], "peak_rss_before_mib_per_rank": &all[world.size..], "world": world.describe(),
    });
    let t = Timing { warmup: 0, steps: 1 };
    Ok(result("gather", &format!("features {n}x{dim}"), 0, t, secs, n as f64, Device::Cpu, None, details))
}

/// Peak bytes of CUDA memory allocated by libtorch's caching allocator on `device` since the last reset, in MiB,
/// resetting the peak when `reset` (as `torch.cuda.max_memory_allocated` / `reset_peak_memory_stats`). `None` on
/// the CPU and in builds without the CUDA part of the shim.
pub fn cuda_peak_mib(device: Device, reset: bool) -> Option<f64> {
    #[cfg(lmim_cuda)]
    if let Device::Cuda(i) = device {
        let mut out = 0i64;
        // SAFETY: plain integers across the C boundary; the shim catches C++ exceptions.
        let rc = unsafe { crate::ffi::lmim_cuda_peak_bytes(i as i32, reset as i32, &mut out) };
        return (rc == 0).then(|| out as f64 / (1024.0 * 1024.0));
    }
    let _ = (device, reset);
    None
}

/// The scaled-dot-product-attention kernel libtorch picks for the attention of `vit` over `tokens` tokens at batch
/// `b` in `kind` on `device` (`at::_fused_sdp_choice`, the choice `scaled_dot_product_attention` makes).
pub fn sdpa_backend(device: Device, kind: Kind, b: i64, vit: &VitConfig, tokens: i64) -> String {
    let q = Tensor::zeros([b, vit.num_heads, tokens, vit.embed_dim / vit.num_heads], (kind, device));
    match Tensor::f_internal_fused_sdp_choice(&q, &q, &q, None::<&Tensor>, 0.0, false, None, false) {
        Ok(0) => "math".into(),
        Ok(1) => "flash".into(),
        Ok(2) => "memory-efficient".into(),
        Ok(3) => "cudnn".into(),
        Ok(n) => format!("other ({n})"),
        Err(e) => format!("unknown ({e})"),
    }
}

/// Forward passes of `arch` (eval mode, no grad, `forward_features`) on random images at `batch`: inference img/s.
pub fn infer(arch: &str, batch: i64, t: Timing, device: Device, precision: Precision) -> Result<BenchResult> {
    let cfg = VitConfig::from_arch(arch)?;
    let vs = tch::nn::VarStore::new(device);
    let vit = crate::model::VisionTransformer::new(&vs.root(), &cfg);
    let amp = precision.autocast(device);
    let x = Tensor::randn([batch, 3, cfg.img_size, cfg.img_size], (Kind::Float, device));
    let fwd = || tch::no_grad(|| crate::model::vit::with_amp(amp, || vit.forward_features(&x, &[], false).tokens));
    let (_, flops) = crate::model::flops::count(fwd);
    cuda_peak_mib(device, true);
    let secs = timed(t, device, |n, _| {
        for _ in 0..n {
            let _ = fwd();
        }
        Ok(())
    })?;
    let kind = amp.unwrap_or(Kind::Float);
    let details = serde_json::json!({ "flops_per_step": flops.forward(), "tflops_per_s": flops.forward() * t.steps as f64 / secs / 1e12,
        "sdpa": sdpa_backend(device, kind, batch, &cfg, cfg.num_patches() + 1),
        "cuda_peak_mib": cuda_peak_mib(device, false), "input": "random images on the device" });
    Ok(result("inference", arch, batch, t, secs, batch as f64, device, amp, details))
}

/// DINO's weighted k-NN (`protocols::knn::weighted_knn`, T = 0.07) of `n_query` random unit queries against
/// `n_bank` random unit bank rows of width `dim` with `classes` labels, at `k`: the similarity products alone are
/// 2 x n_query x n_bank x dim FLOPs.
pub fn knn(n_bank: i64, n_query: i64, dim: i64, k: i64, classes: i64, device: Device) -> Result<BenchResult> {
    use crate::protocols::knn::{l2_normalize, weighted_knn, KnnParams, SearchConfig};
    let feats = |n: i64| l2_normalize(&Tensor::randn([n, dim], (Kind::Float, device)));
    let labels = |n: i64| Tensor::randint(classes, [n], (Kind::Int64, device));
    let (bank, bank_labels, queries, query_labels) = (feats(n_bank), labels(n_bank), feats(n_query), labels(n_query));
    let search = SearchConfig::auto(device, n_bank);
    let ks = [k];
    let params = KnnParams { ks: &ks, temperature: 0.07 };
    let t = Timing { warmup: 0, steps: 1 };
    let mut top1 = 0.0;
    let secs = timed(t, device, |_, _| {
        top1 = weighted_knn(&bank, &bank_labels, &queries, &query_labels, classes, &params, &search)?.scores[0].top1;
        Ok(())
    })?;
    let flops = 2.0 * n_query as f64 * n_bank as f64 * dim as f64;
    let details = serde_json::json!({ "n_bank": n_bank, "n_query": n_query, "dim": dim, "k": k, "classes": classes, "top1_random": top1,
        "similarity_tflop": flops / 1e12, "tflops_per_s": flops / secs / 1e12, "backend": search.backend_name(), "cuda_peak_mib": cuda_peak_mib(device, false) });
    Ok(result("knn", &format!("{n_query}x{n_bank}x{dim}"), n_query, t, secs, n_query as f64, device, None, details))
}

/// The pretraining loader (decode, RandomResizedCrop to `size`, flip, normalise on `workers` threads) over the
/// train split of the ImageFolder `root`, batches of `batch` for `batches` batches (one epoch, repeated as needed):
/// does the CPU feed the GPU?
/// The loader's img/s; on a CUDA `device` into device memory as training gets them (pinned on the producer thread,
/// copied ahead on the copy stream), so the number is what a step can be fed.
pub fn loader(root: &Path, size: u32, batch: usize, workers: usize, batches: usize, device: Device) -> Result<BenchResult> {
    use crate::data::{Dataset, Loader, LoaderConfig, Transform};
    let dataset = Dataset::open(root, "train")?;
    let pin_device = device.is_cuda().then_some(device);
    let cfg = LoaderConfig { batch_size: batch, shuffle: true, drop_last: true, workers: workers.max(1), quiet: true, pin_device, ..Default::default() };
    let loader = Loader::new(dataset, Transform::train(size, 0.2), cfg)?;
    let per_epoch = loader.num_batches();
    if per_epoch == 0 {
        return Err(Error::data(root, format!("the train split has fewer images than one batch of {batch}")));
    }
    let t = Timing { warmup: 0, steps: batches.max(1) };
    let mut images = 0usize;
    let secs = timed(t, device, |n, _| {
        let mut epoch = 0u64;
        while images < n * batch {
            let wanted = n - images / batch;
            for b in crate::device::stage_ahead(loader.epoch(epoch).take(wanted), |b| crate::data::loader::stage_images(b, device)) {
                images += b?.images.size()[0] as usize;
            }
            epoch += 1;
        }
        Ok(())
    })?;
    let details = serde_json::json!({ "workers": workers, "size": size, "images": images, "train_images": loader.dataset().samples.len(),
        "into": crate::info::device_name(device), "pinned": pin_device.is_some(),
        "transform": "decode, RandomResizedCrop(scale 0.2-1, bicubic), flip, normalise" });
    Ok(result("loader", &format!("{}", root.display()), batch as i64, t, secs, images as f64 / t.steps as f64, device, None, details))
}

/// Tolerances of the device parity checks (max |difference|): fp32 forward against timm on the same device; bf16
/// autocast against timm's bf16 autocast (the mean too: bf16 keeps 8 bits of mantissa, so single elements of
/// unit-scale features differ by a few 1e-2 where the kernels round differently); one Latent MIM step on the
/// device against the same step on the CPU, relative to the largest |value| (TF32 is off for fp32 matmuls, as
/// PyTorch's default, and for cuDNN's convolutions during the check, where PyTorch's default has it on: the
/// difference is then the kernels' summation order).
pub const TOL_F32: f64 = 1e-3;
pub const TOL_BF16_MAX: f64 = 0.25;
pub const TOL_BF16_MEAN: f64 = 2e-2;
pub const TOL_STEP_REL: f64 = 1e-3;

/// A parity check's outcome: its numbers as JSON, and whether they are within the tolerances.
/// The collectives of a data-parallel run checked for their values on the world this process joined (a group of
/// one included: `RANK=0 WORLD_SIZE=1 ... --dist-backend nccl` runs them through NCCL on one GPU): an all-reduce,
/// a broadcast from rank 0, the bucketed gradient average over more than one bucket, then an abort of the group.
pub fn dist_check() -> Result<Parity> {
    let world = crate::dist::world();
    let (w, r) = (world.size as f64, world.rank as f64);
    let dev = world.device;
    let t0 = std::time::Instant::now();
    let x = Tensor::full([1 << 20], r + 1.0, (Kind::Float, dev));
    world.all_reduce_sum(std::slice::from_ref(&x), "the check's all-reduce")?;
    let want_sum = w * (w + 1.0) / 2.0;
    let sum_err = (x.to_kind(Kind::Double) - want_sum).abs().max().double_value(&[]);
    let b = Tensor::full([4096], r, (Kind::Float, dev));
    world.broadcast(std::slice::from_ref(&b), 0, "the check's broadcast")?;
    let bcast_err = b.abs().max().double_value(&[]);
    // Two parameters of 4 Mi floats: 32 MiB, more than one 25 MB bucket.
    let vs = tch::nn::VarStore::new(dev);
    let ps: Vec<Tensor> = (0..2).map(|i| vs.root().zeros(&format!("p{i}"), &[1 << 22])).collect();
    let loss = ps.iter().map(|p| p.sum(Kind::Float)).fold(Tensor::zeros([], (Kind::Float, dev)), |a, b| a + b) * (r + 1.0);
    loss.backward();
    world.average_gradients(ps.iter())?;
    let want_avg = (w + 1.0) / 2.0;
    let avg_err = ps.iter().map(|p| (p.grad().to_kind(Kind::Double) - want_avg).abs().max().double_value(&[])).fold(0.0, f64::max);
    let collectives_s = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    crate::dist::shutdown(Some("dist-check: the group is aborted on purpose"));
    let abort_s = t1.elapsed().as_secs_f64();
    let pass = sum_err == 0.0 && bcast_err == 0.0 && avg_err == 0.0;
    let report = serde_json::json!({
        "backend": world.backend.name(), "world_size": world.size, "device": crate::info::device_name(dev),
        "all_reduce_max_err": sum_err, "broadcast_max_err": bcast_err, "gradient_average_max_err": avg_err,
        "collectives_s": collectives_s, "abort_s": abort_s, "pass": pass,
    });
    Ok(Parity { report, pass })
}

pub struct Parity {
    pub report: serde_json::Value,
    pub pass: bool,
}

fn diff(a: &Tensor, b: &Tensor) -> (f64, f64) {
    let d = (a.to_kind(Kind::Double).to_device(Device::Cpu) - b.to_kind(Kind::Double).to_device(Device::Cpu)).abs();
    (d.max().double_value(&[]), d.mean(Kind::Double).double_value(&[]))
}

/// `forward_features` of the timm-named weights in `weights` on `device`, in fp32 and in bf16 autocast, against
/// timm's outputs in `io` (`input`, `out_f32`, `out_bf16`, written by benches/py/gpu_parity_ref.py on the same
/// device).
pub fn vit_parity(weights: &Path, io: &Path, arch: &str, device: Device) -> Result<Parity> {
    let m = crate::checkpoint::load_vit(weights, Some(arch), device, 0)?;
    let io_ck = crate::checkpoint::load(io)?;
    let get = |k: &str| io_ck.get(k).map(|t| t.to_device(device)).ok_or_else(|| Error::checkpoint(io, format!("lacks `{k}`")));
    let x = get("input")?;
    let ours_f32 = tch::no_grad(|| m.model.forward_features(&x, &[], false).tokens);
    let (max_f32, mean_f32) = diff(&ours_f32, &get("out_f32")?);
    let mut report = serde_json::json!({ "arch": arch, "device": crate::info::device_name(device), "batch": x.size()[0],
        "f32": { "max_abs": max_f32, "mean_abs": mean_f32, "tolerance_max": TOL_F32 } });
    let mut pass = max_f32 <= TOL_F32;
    if let Some(timm_bf16) = io_ck.get("out_bf16") {
        let ours = tch::no_grad(|| crate::model::vit::with_amp(Some(Kind::BFloat16), || m.model.forward_features(&x, &[], false).tokens));
        let (max_b, mean_b) = diff(&ours, &timm_bf16);
        report["bf16"] = serde_json::json!({ "max_abs": max_b, "mean_abs": mean_b, "tolerance_max": TOL_BF16_MAX, "tolerance_mean": TOL_BF16_MEAN });
        pass &= max_b <= TOL_BF16_MAX && mean_b <= TOL_BF16_MEAN;
    }
    let cfg = &m.model.cfg;
    for (key, kind) in [("sdpa_f32", Kind::Float), ("sdpa_bf16", Kind::BFloat16)] {
        report[key] = serde_json::json!(sdpa_backend(device, kind, x.size()[0], cfg, cfg.num_patches() + 1));
    }
    report["pass"] = serde_json::json!(pass);
    Ok(Parity { report, pass })
}

/// One Latent MIM step (EMA update, views, both encoders, decoder, loss, backward) in fp32 on `device` against the
/// same step on the CPU from the same weights and images: the loss, every gradient, and the EMA'd target. With
/// `reference` (the output of tests/py/ref_lmim_step.py on [`lmim_step_reference_input`]'s file), the device's
/// loss and gradients are also compared with that independent PyTorch step.
pub fn lmim_step_parity(cfg: &PretrainConfig, batch: i64, device: Device, reference: Option<&Path>) -> Result<Parity> {
    // The patch embedding is a convolution: in TF32 (cuDNN's default) it alone is off by ~1e-3 relative.
    // SAFETY: sets a flag of ATen's global context; the shim catches C++ exceptions.
    let prev_tf32 = unsafe { crate::ffi::lmim_set_cudnn_tf32(0) };
    let out = lmim_step_parity_fp32(cfg, batch, device, reference);
    // SAFETY: as above.
    unsafe { crate::ffi::lmim_set_cudnn_tf32(prev_tf32) };
    out
}

/// The step's config in fp32 with one micro-batch of `batch`, and its images (seeded, on the CPU).
fn step_parity_setup(cfg: &PretrainConfig, batch: i64) -> Result<(PretrainConfig, Tensor)> {
    let mut cfg = cfg.clone();
    cfg.precision = Precision::F32;
    cfg.micro_batch_size = batch;
    cfg.batch_size = batch;
    cfg.validate()?;
    let size = cfg.model.train_size()?;
    tch::manual_seed(cfg.seed as i64 + 1);
    Ok((cfg, Tensor::randn([batch, 3, size, size], (Kind::Float, Device::Cpu))))
}

/// Schedule time of the parity step (mid-warm-up, so that the EMA and the similarity target are not at their ends).
const STEP_PARITY_T: f64 = 0.5;

/// Writes the input of tests/py/ref_lmim_step.py for the step [`lmim_step_parity`] takes: the weights after the
/// step's EMA update (lmim-bench's names), the images, the view draw of micro-batch 0 of epoch 0, and the sizes and
/// scalars in the metadata. The reference implements the InfoNCE-over-patches loss without stochastic depth.
pub fn lmim_step_reference_input(cfg: &PretrainConfig, batch: i64, path: &Path) -> Result<()> {
    use crate::train::step::TrainStep;
    let (cfg, images) = step_parity_setup(cfg, batch)?;
    let m = &cfg.model;
    if m.loss != crate::model::lmim::LossKind::InfoncePatches || m.drop_path != 0.0 {
        return Err(Error::option("--config", "the PyTorch reference step implements loss = \"infonce_patches\" with drop_path = 0"));
    }
    let mut tr = Trainer::new(&cfg, Device::Cpu)?;
    let lr = tr.begin_step(STEP_PARITY_T);
    let draw = tr.view_draw(batch, 0, 0);
    let (sim_target, momentum) = tr.step_targets();
    let v = &tr.model.vit_cfg;
    let meta_cfg = serde_json::json!({
        "patch": v.patch_size, "gap": m.patch_gap, "num_vis": m.num_vis, "tau": m.tau, "avg_sim_coeff": m.avg_sim_coeff,
        "sim_target": sim_target, "dim": v.embed_dim, "depth": v.depth, "heads": v.num_heads, "proj_depth": m.proj_mlp_depth,
        "dec_heads": m.decoder_heads, "dec_depth": m.decoder_depth, "lr": lr, "wd": cfg.weight_decay, "momentum": momentum,
    });
    let mut tensors: Vec<(String, Tensor)> = tr.vs.variables().into_iter().collect();
    tensors.extend([("images".into(), images), ("oy".into(), draw.oy), ("ox".into(), draw.ox), ("ids".into(), draw.ids)]);
    let meta = [("config".to_string(), meta_cfg.to_string())].into_iter().collect();
    crate::checkpoint::save(path, &tensors, &meta)
}

fn lmim_step_parity_fp32(cfg: &PretrainConfig, batch: i64, device: Device, reference: Option<&Path>) -> Result<Parity> {
    use crate::train::step::TrainStep;
    let (cfg, images) = step_parity_setup(cfg, batch)?;
    let mut cpu = Trainer::new(&cfg, Device::Cpu)?;
    let mut dev = Trainer::new(&cfg, device)?;
    dev.vs.copy(&cpu.vs).map_err(Error::Torch)?;
    let mut side_stream = false;
    let mut run = |tr: &mut Trainer| -> Result<Tensor> {
        tr.begin_step(STEP_PARITY_T);
        // Through the copy ahead that run_epoch uses (the side stream on CUDA), so the parity covers it.
        let (staged, ready) = tr.stage(images.shallow_clone())?;
        side_stream |= ready.on_side_stream();
        ready.wait()?;
        let loss = tr.loss(staged, 0, 0)?;
        loss.backward();
        Ok(loss.detach())
    };
    let (l_cpu, l_dev) = (run(&mut cpu)?, run(&mut dev)?);
    let (lc, ld) = (l_cpu.double_value(&[]), l_dev.double_value(&[]));
    let loss_rel = (lc - ld).abs() / lc.abs().max(1e-12);
    let dev_vars = dev.vs.variables();
    let pairs = cpu.vs.variables().into_iter().map(|(name, t)| {
        let other = &dev_vars[&name];
        let (a, b) = if t.requires_grad() { (t.grad(), other.grad()) } else { (t.shallow_clone(), other.shallow_clone()) };
        (name, a, b)
    });
    let (worst_grad, worst_name) = worst_relative(pairs.filter(|(_, a, b)| a.defined() && b.defined()));
    let mut pass = loss_rel <= TOL_STEP_REL && worst_grad <= TOL_STEP_REL;
    let mut report = serde_json::json!({ "encoder": cfg.model.encoder, "batch": batch, "device": crate::info::device_name(device),
        "loss_cpu": lc, "loss_device": ld, "loss_rel_diff": loss_rel,
        "max_rel_diff_grads_and_target": worst_grad, "worst_tensor": worst_name, "tolerance_rel": TOL_STEP_REL,
        "batch_copy": if side_stream { "copy stream" } else { "compute stream" } });
    if let Some(path) = reference {
        let (r, ok) = against_reference_step(path, ld, &dev_vars)?;
        report["pytorch_reference"] = r;
        pass &= ok;
    }
    report["pass"] = serde_json::json!(pass);
    Ok(Parity { report, pass })
}

/// The largest difference over `(name, reference, other)` triples, each relative to its reference's largest |value|,
/// and the name it was found at.
fn worst_relative(pairs: impl IntoIterator<Item = (String, Tensor, Tensor)>) -> (f64, String) {
    let mut worst = (0.0f64, String::from("-"));
    for (name, reference, other) in pairs {
        let rel = diff(&reference, &other).0 / reference.abs().max().double_value(&[]).max(1e-12);
        if rel > worst.0 {
            worst = (rel, name);
        }
    }
    worst
}

/// The device's loss and gradients against the PyTorch step's (`loss`, `grad.<name>` in `path`): relative to the
/// loss and to each tensor's largest reference gradient.
fn against_reference_step(path: &Path, loss: f64, vars: &std::collections::HashMap<String, Tensor>) -> Result<(serde_json::Value, bool)> {
    let r = crate::checkpoint::load(path)?;
    let want = |k: &str| r.get(k).ok_or_else(|| Error::data(path, format!("has no tensor `{k}`: not an output of tests/py/ref_lmim_step.py")));
    let rl = want("loss")?.double_value(&[0]);
    let loss_rel = (loss - rl).abs() / rl.abs().max(1e-12);
    let pairs = vars.iter().filter(|(_, t)| t.requires_grad()).map(|(name, t)| Ok((name.clone(), want(&format!("grad.{name}"))?.shallow_clone(), t.grad()))).collect::<Result<Vec<_>>>()?;
    let compared = pairs.len();
    let (worst, worst_name) = worst_relative(pairs);
    let ok = loss_rel <= TOL_STEP_REL && worst <= TOL_STEP_REL && compared > 0;
    let v = serde_json::json!({ "file": path.display().to_string(), "loss": rl, "loss_rel_diff": loss_rel, "gradients": compared,
        "max_rel_diff_grads": worst, "worst_tensor": worst_name, "pass": ok });
    Ok((v, ok))
}
