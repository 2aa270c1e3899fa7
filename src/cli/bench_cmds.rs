//! `lmim-bench bench`: throughput of the training loops as JSON (stdout or a file), for the benchmark records in
//! benchmarks/ and for comparisons beside other implementations on the same machine.
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::bench::{self, BenchResult, Timing};
use crate::config::Precision;
use crate::info::parse_device;
use crate::protocols::Protocol;
use crate::protocols::finetune::FinetuneConfig;
use crate::protocols::linear_sweep::SweepConfig;
use crate::train::pretrain::PretrainConfig;

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
    /// Device: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", global = true)]
    pub device: String,
    /// Precision of the fine-tuning step (pretraining takes the config's `precision`).
    #[arg(long, value_enum, default_value = "auto", global = true)]
    pub precision: Precision,
    /// Untimed steps before the timed ones.
    #[arg(long, default_value_t = 2, global = true)]
    pub warmup: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 5, global = true)]
    pub steps: usize,
    /// Write the JSON result here (`-` for stdout).
    #[arg(long, short, default_value = "-", global = true)]
    pub output: String,
    #[command(flatten)]
    pub dist: super::DistArgs,
}

#[derive(Debug, Subcommand)]
pub enum BenchWhat {
    /// Latent MIM pretraining steps on random images (config file plus `--set key=value`).
    Pretrain {
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Images per step (default: the config's micro_batch_size).
        #[arg(long)]
        batch_size: Option<i64>,
    },
    /// Fine-tuning steps with the recipe of protocols/finetune.toml (`--set` overrides it).
    Finetune {
        #[arg(long, default_value = "vit_base_patch16_224")]
        arch: String,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Images per step.
        #[arg(long, default_value_t = 128)]
        batch_size: usize,
        /// Feed the steps from this ImageFolder's train/ split through the full augmentation pipeline.
        #[arg(long)]
        data: Option<PathBuf>,
    },
    /// The gradient all-reduce of data-parallel training over an architecture's parameters, between the
    /// processes of a torchrun / srun job (a no-op in one process).
    Allreduce {
        #[arg(long, default_value = "vit_base_patch16_224")]
        arch: String,
    },
    /// Inference (forward_features, no grad) of an architecture on random images: img/s.
    Infer {
        #[arg(long, default_value = "vit_base_patch16_224")]
        arch: String,
        #[arg(long, default_value_t = 256)]
        batch_size: i64,
    },
    /// Weighted k-NN (DINO's, T = 0.07) of random unit features: queries x bank x dim similarity products.
    Knn {
        #[arg(long, default_value_t = 1_281_167)]
        n_bank: i64,
        #[arg(long, default_value_t = 50_000)]
        n_query: i64,
        #[arg(long, default_value_t = 768)]
        dim: i64,
        #[arg(long, default_value_t = 20)]
        k: i64,
        #[arg(long, default_value_t = 1000)]
        classes: i64,
    },
    /// The pretraining loader (decode, RandomResizedCrop, flip, normalise) over an ImageFolder's train/ split.
    Loader {
        /// ImageFolder root (with train/).
        #[arg(long)]
        data: PathBuf,
        /// Crop size (Latent MIM's ViT-B/16 with patch gap 4 trains on 280 px).
        #[arg(long, default_value_t = 280)]
        size: u32,
        #[arg(long, default_value_t = 256)]
        batch_size: usize,
        /// Decode threads.
        #[arg(long, default_value_t = 16)]
        workers: usize,
    },
    /// ViT forward parity against timm on this device, fp32 and bf16 (reference files from
    /// benches/py/gpu_parity_ref.py); exit 1 when a difference is over its tolerance.
    Parity {
        /// timm-named weights (safetensors).
        #[arg(long)]
        weights: PathBuf,
        /// `input`, `out_f32`, `out_bf16` (safetensors).
        #[arg(long)]
        io: PathBuf,
        #[arg(long, default_value = "vit_base_patch16_224")]
        arch: String,
    },
    /// One Latent MIM training step in fp32 on the device against the same step on the CPU (loss and every
    /// gradient); exit 1 when a difference is over its tolerance. With --write-reference-input, writes the step's
    /// weights, images and views for tests/py/ref_lmim_step.py instead; with --reference, also compares the device
    /// with that script's output (an independent PyTorch step).
    StepParity {
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        #[arg(long, default_value_t = 4)]
        batch_size: i64,
        /// Write the reference script's input (safetensors) here and exit.
        #[arg(long, value_name = "FILE", conflicts_with = "reference")]
        write_reference_input: Option<PathBuf>,
        /// The reference script's output (safetensors) for the same config and batch size.
        #[arg(long, value_name = "FILE")]
        reference: Option<PathBuf>,
    },
    /// The collectives of this process's world checked for their values (all-reduce, broadcast, the bucketed
    /// gradient average, abort); exit 1 on a wrong value. In one process launched with RANK=0 WORLD_SIZE=1 and
    /// `--dist-backend nccl` (or gloo) it runs them through a real group of one.
    DistCheck,
    /// Gathering an n x dim feature matrix to rank 0 as `extract` does between the processes of a job, or with
    /// --naive as an all-reduce of the full matrix on every rank: time and every rank's peak RSS.
    Gather {
        #[arg(long, default_value_t = 1_281_167)]
        n: i64,
        #[arg(long, default_value_t = 768)]
        dim: i64,
        #[arg(long)]
        naive: bool,
    },
    /// The low-shot logistic regression (protocols/lowshot.toml's lambd, grad_tol, max_iter, memory; `--set`
    /// overrides them) on a features file (safetensors `x` [n, D], `y` [n]): preprocessing and solve, timed once
    /// (`--steps` times), with the objective and gradient norm reached.
    Lowshot {
        #[arg(long)]
        features: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
    /// The 52-head linear sweep on random features (protocols/linear_sweep.toml, `--set` overrides it).
    Sweep {
        #[arg(long, default_value_t = 100_000)]
        n: i64,
        #[arg(long, default_value_t = 768)]
        dim: i64,
        #[arg(long, default_value_t = 1000)]
        classes: i64,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
}

/// Runs a benchmark and writes its JSON; returns the exit code (1 when a parity check is over its tolerance).
pub fn bench(a: BenchArgs) -> anyhow::Result<i32> {
    let world = a.dist.init(&a.device)?;
    let device = parse_device(&a.device)?;
    let t = Timing { warmup: a.warmup, steps: a.steps };
    let parity = match &a.what {
        BenchWhat::Parity { weights, io, arch } => Some(bench::vit_parity(weights, io, arch, device).context("ViT parity against timm")?),
        BenchWhat::StepParity { config, sets, batch_size, write_reference_input, reference } => {
            let cfg: PretrainConfig = crate::config::load(config.as_deref(), sets)?;
            if *batch_size < 1 {
                return Err(crate::Error::option("--batch-size", "must be at least 1").into());
            }
            if let Some(path) = write_reference_input {
                bench::lmim_step_reference_input(&cfg, *batch_size, path).with_context(|| format!("writing the reference step's input {}", path.display()))?;
                return Ok(0);
            }
            Some(bench::lmim_step_parity(&cfg, *batch_size, device, reference.as_deref()).context("Latent MIM step parity against the CPU")?)
        }
        BenchWhat::DistCheck => Some(bench::dist_check().context("the collectives check")?),
        BenchWhat::Lowshot { features, sets } => {
            let v = lowshot(features, sets, device, a.steps).context("timing the low-shot solve")?;
            crate::results::write_output(&a.output, &(serde_json::to_string_pretty(&v)? + "\n"))?;
            return Ok(0);
        }
        _ => None,
    };
    if let Some(p) = parity {
        let mut v = p.report;
        v["provenance"] = serde_json::to_value(crate::results::Provenance::current(&crate::info::device_name(device)))?;
        v["time"] = serde_json::json!(crate::results::now_rfc3339());
        crate::results::write_output(&a.output, &(serde_json::to_string_pretty(&v)? + "\n"))?;
        return Ok(if p.pass { 0 } else { 1 });
    }
    let r: BenchResult = match &a.what {
        BenchWhat::Parity { .. } | BenchWhat::StepParity { .. } | BenchWhat::DistCheck | BenchWhat::Lowshot { .. } => unreachable!("handled above"),
        BenchWhat::Infer { arch, batch_size } => {
            let cfg = crate::model::VitConfig::from_arch(arch)?;
            if *batch_size < 1 {
                return Err(crate::Error::option("--batch-size", "must be at least 1").into());
            }
            crate::info::check_fits("--batch-size", &format!("{batch_size} images through {arch}"), crate::info::vit_forward_bytes(&cfg, *batch_size as u128))?;
            bench::infer(arch, *batch_size, t, device, a.precision).context("timing inference")?
        }
        BenchWhat::Knn { n_bank, n_query, dim, k, classes } => {
            if *n_bank < 1 || *n_query < 1 || *dim < 1 || *k < 1 || *classes < 1 {
                return Err(crate::Error::option("--n-bank/--n-query/--dim/--k/--classes", "must be positive").into());
            }
            let rows = *n_bank as u128 + *n_query as u128;
            crate::info::check_fits("--n-bank/--n-query/--dim", &format!("{rows} features of {dim} values"), rows * *dim as u128 * 4)?;
            bench::knn(*n_bank, *n_query, *dim, *k, *classes, device).context("timing k-NN")?
        }
        BenchWhat::Loader { data, size, batch_size, workers } => {
            if *batch_size == 0 || *size == 0 {
                return Err(crate::Error::option("--batch-size/--size", "must be positive").into());
            }
            if *workers > 1024 {
                return Err(crate::Error::option("--workers", format!("{workers} decode threads is more than 1024")).into());
            }
            crate::info::check_fits("--batch-size/--size", &format!("batches of {batch_size} {size}-px crops"), *batch_size as u128 * 3 * (*size as u128).pow(2) * 4)?;
            bench::loader(data, *size, *batch_size, *workers, a.steps, device).context("timing the loader")?
        }
        BenchWhat::Pretrain { config, sets, batch_size } => {
            let mut cfg: PretrainConfig = crate::config::load(config.as_deref(), sets)?;
            cfg.device = a.device.clone();
            let b = batch_size.unwrap_or(cfg.micro_batch_size);
            if b < 1 {
                return Err(crate::Error::option("--batch-size", "must be at least 1").into());
            }
            // A training step keeps the forward's activations for the backward: about three forwards' worth.
            crate::info::check_fits("--batch-size", &format!("training steps of {b} images"), 3 * crate::info::vit_forward_bytes(&cfg.model.vit_config()?, b as u128))?;
            // One micro-batch per process and timed step.
            cfg.micro_batch_size = b;
            cfg.batch_size = b * world.size as i64;
            bench::pretrain_steps(&cfg, b, t, device).context("timing pretraining steps")?
        }
        BenchWhat::Finetune { arch, sets, batch_size, data } => {
            let mut cfg: FinetuneConfig = Protocol::Finetune.load(None, sets)?.cfg;
            if *batch_size < 1 {
                return Err(crate::Error::option("--batch-size", "must be at least 1").into());
            }
            crate::info::check_fits("--batch-size", &format!("training steps of {batch_size} images"), 3 * crate::info::vit_forward_bytes(&crate::model::VitConfig::from_arch(arch)?, *batch_size as u128))?;
            cfg.micro_batch_size = *batch_size;
            cfg.batch_size = *batch_size * world.size;
            bench::finetune_steps(arch, &cfg, t, device, a.precision, data.as_deref()).context("timing fine-tuning steps")?
        }
        BenchWhat::Allreduce { arch } => bench::allreduce(arch, t, world.device).context("timing the gradient all-reduce")?,
        BenchWhat::Gather { n, dim, naive } => {
            if *n < 1 || *dim < 1 {
                return Err(crate::Error::option("--n/--dim", "need n >= 1 rows and dim >= 1").into());
            }
            crate::info::check_fits("--n/--dim", &format!("{n} features of {dim} values"), *n as u128 * *dim as u128 * 4)?;
            bench::gather(*n, *dim, *naive).context("timing the feature gather")?
        }
        BenchWhat::Sweep { n, dim, classes, sets } => {
            if *n < 2 || *dim < 1 || *classes < 1 {
                return Err(crate::Error::option("--n/--dim/--classes", "need n >= 2 rows, dim >= 1 and classes >= 1").into());
            }
            crate::info::check_fits("--n/--dim", &format!("{n} features of {dim} values"), *n as u128 * *dim as u128 * 4)?;
            crate::info::check_fits("--dim/--classes", &format!("52 heads of {dim} x {classes} weights"), 52 * 4 * *dim as u128 * *classes as u128)?;
            let cfg: SweepConfig = Protocol::LinearSweep.load(None, sets)?.cfg;
            bench::sweep(*n, *dim, *classes, &cfg, device).context("timing the linear sweep")?
        }
    };
    let mut v = serde_json::to_value(&r)?;
    v["provenance"] = serde_json::to_value(crate::results::Provenance::current(&r.device))?;
    v["time"] = serde_json::json!(crate::results::now_rfc3339());
    v["world"] = world.describe();
    if world.is_main() {
        crate::results::write_output(&a.output, &(serde_json::to_string_pretty(&v)? + "\n"))?;
    }
    Ok(0)
}

/// `bench lowshot`: preprocessing + solve on the features of `path`, `steps` times (the fastest is reported).
fn lowshot(path: &std::path::Path, sets: &[String], device: tch::Device, steps: usize) -> anyhow::Result<serde_json::Value> {
    use crate::protocols::lowshot::{fit, preprocess, LowshotConfig, SolveOptions};
    let cfg: LowshotConfig = Protocol::Lowshot.load(None, sets)?.cfg;
    cfg.validate("--set")?;
    let f = crate::checkpoint::load(path)?;
    let get = |n: &str| f.get(n).map(|t| t.shallow_clone()).ok_or_else(|| crate::Error::data(path, format!("no tensor `{n}` (expected `x` [n, D] and `y` [n])")));
    let (x, y) = (get("x")?, get("y")?.to_kind(tch::Kind::Int64));
    let classes = y.max().int64_value(&[]) + 1;
    let opts = SolveOptions { lambd: cfg.lambd, grad_tol: cfg.grad_tol, max_iter: cfg.max_iter, memory: cfg.memory, device, line_search: crate::protocols::lowshot::LineSearch::Armijo, f32_products: false };
    let mut runs = Vec::new();
    for _ in 0..steps.max(1) {
        let t0 = std::time::Instant::now();
        let xp = preprocess(&x.to_device(device).to_kind(tch::Kind::Double));
        let r = fit(&xp, &y, classes, &opts)?;
        if let tch::Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
        runs.push((t0.elapsed().as_secs_f64(), r));
    }
    let (seconds, r) = runs.into_iter().min_by(|a, b| a.0.total_cmp(&b.0)).expect("one run");
    Ok(serde_json::json!({
        "bench": "lowshot",
        "n": x.size()[0], "dim": x.size()[1], "classes": classes,
        "lambd": cfg.lambd, "grad_tol": cfg.grad_tol,
        "seconds": seconds,
        "solve": r,
        "threads": tch::get_num_threads(),
        "provenance": crate::results::Provenance::current(&crate::info::device_name(device)),
        "time": crate::results::now_rfc3339(),
    }))
}
