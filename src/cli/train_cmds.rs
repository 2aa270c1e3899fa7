//! `lmim-bench pretrain`.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use tch::Tensor;

use crate::data::dataset::Dataset;
use crate::data::loader::{Loader, LoaderConfig};
use crate::data::transforms::Transform;
use crate::info::{device_name, parse_device};
use crate::results::{Provenance, RunRecord};
use crate::train::pretrain::{latest_checkpoint, BatchSource, PretrainConfig, RunPaths, Trainer};

#[derive(Debug, Args)]
pub struct PretrainArgs {
    /// Config file (TOML), e.g. configs/lmim_vit_base.toml or configs/lmim_tiny.toml; defaults are the reference's.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Override a config key, e.g. `--set epochs=100 --set batch_size=128` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Data root with a train/ split (overrides the config's `data`).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Output directory for checkpoints, metrics, the exported encoder and the config
    /// (default: results/runs/pretrain-<config name>).
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Start from scratch even if the output directory holds checkpoints (refused if it does).
    #[arg(long, conflicts_with = "resume_from")]
    pub no_resume: bool,
    /// Resume from this checkpoint instead of the newest one in the output directory.
    #[arg(long)]
    pub resume_from: Option<PathBuf>,
    /// No progress bar and no loader warnings.
    #[arg(long, short)]
    pub quiet: bool,
}

struct LoaderSource(Loader);

impl BatchSource for LoaderSource {
    fn batches_per_epoch(&self) -> usize {
        self.0.num_batches()
    }
    fn epoch_batches(&self, epoch: usize, start: usize) -> Box<dyn Iterator<Item = crate::Result<Tensor>> + '_> {
        Box::new(self.0.iter_from(epoch as u64, start).map(|b| b.map(|b| b.images)))
    }
}

pub fn pretrain(a: PretrainArgs) -> anyhow::Result<()> {
    let mut cfg: PretrainConfig = crate::config::load(a.config.as_deref(), &a.sets)?;
    if let Some(d) = &a.data {
        cfg.data = d.display().to_string();
    }
    cfg.validate()?;
    let stem = a.config.as_ref().and_then(|p| p.file_stem()).map_or("default".into(), |s| s.to_string_lossy().to_string());
    let out = a.output.clone().unwrap_or_else(|| PathBuf::from("results/runs").join(format!("pretrain-{stem}")));
    let paths = RunPaths { dir: out.clone() };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;

    let device = parse_device(&cfg.device)?;
    let train_size = cfg.model.train_size()? as u32;
    let dataset = Dataset::open(std::path::Path::new(&cfg.data), "train")?;
    let fingerprint = dataset.fingerprint()?;
    let transform = Transform::train(train_size, cfg.crop_scale_min);
    let loader_cfg = LoaderConfig {
        batch_size: cfg.batch_size as usize,
        shuffle: true,
        drop_last: true,
        seed: cfg.seed,
        workers: if cfg.num_workers == 0 { LoaderConfig::default().workers } else { cfg.num_workers },
        quiet: a.quiet,
        ..Default::default()
    };
    let source = LoaderSource(Loader::new(dataset, transform, loader_cfg)?);

    let mut trainer = Trainer::new(&cfg, device)?;
    let resume = match (&a.resume_from, a.no_resume) {
        (Some(p), _) => Some(p.clone()),
        (None, false) => latest_checkpoint(&paths)?,
        (None, true) => {
            if let Some(p) = paths.list_checkpoints().last() {
                anyhow::bail!(crate::Error::option(
                    "--no-resume",
                    format!("{} already holds checkpoints (newest {}); choose another --output", out.display(), p.display())
                ));
            }
            None
        }
    };
    if let Some(p) = &resume {
        trainer.load_checkpoint(p)?;
        let saved: PretrainConfig = crate::config::load(Some(&paths.config()), &[]).unwrap_or_else(|_| cfg.clone());
        if saved.model != cfg.model {
            anyhow::bail!(crate::Error::option("--config", format!("the model config differs from the one saved in {}", paths.config().display())));
        }
        eprintln!("resuming from {} (epoch {}, step {})", p.display(), trainer.pos.epoch, trainer.pos.step);
    }
    crate::config::save(&cfg, &paths.config())?;
    eprintln!(
        "pretraining {} on {} ({} images, {}), effective batch {}, lr {:.3e}, {} epochs -> {}",
        trainer.model.vit_cfg.arch,
        cfg.data,
        fingerprint.num_files,
        device_name(device),
        cfg.effective_batch(),
        cfg.peak_lr(),
        cfg.epochs,
        out.display()
    );
    let started = crate::results::now_rfc3339();
    let t0 = Instant::now();
    let mut summary = trainer.train(&source, &paths, a.quiet)?;
    summary.resumed_from = resume.map(|p| p.display().to_string());

    let mut rec = RunRecord::new("pretrain", "lmim-1", "final_loss");
    rec.metrics.insert("final_loss".into(), summary.final_loss);
    rec.metrics.insert("img_per_s".into(), summary.img_per_s);
    rec.metrics.insert("steps".into(), summary.steps as f64);
    rec.metrics.extend(summary.final_monitors.clone());
    rec.model_name = out.file_name().map_or("pretrain".into(), |s| s.to_string_lossy().to_string());
    rec.checkpoint = Some(summary.encoder.clone());
    rec.checkpoint_sha256 = Some(crate::checkpoint::sha256_file(&paths.encoder())?);
    rec.arch = Some(trainer.model.vit_cfg.arch.clone());
    rec.dataset = Some(cfg.data.clone());
    rec.dataset_fingerprint = Some(serde_json::to_value(&fingerprint)?);
    rec.config = serde_json::to_value(&cfg)?;
    rec.seed = cfg.seed;
    rec.provenance = Provenance::current(&device_name(device));
    rec.started_at = started;
    rec.duration_s = t0.elapsed().as_secs_f64();
    rec.details = serde_json::to_value(&summary)?;
    let path = rec.write(&out)?;
    eprintln!("done: {} steps, final loss {:.4}, {:.1} img/s; encoder {}; record {}", summary.steps, summary.final_loss, summary.img_per_s, summary.encoder, path.display());
    Ok(())
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Pretraining config whose encoder to initialise (the same initialisation as step 0 of `pretrain`).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Override a config key (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Output safetensors file (timm names, `arch`/`config` metadata).
    #[arg(long, short)]
    pub output: PathBuf,
}

/// Writes the randomly initialised encoder of a pretraining config: the baseline row of a results table.
pub fn init(a: InitArgs) -> anyhow::Result<()> {
    let cfg: PretrainConfig = crate::config::load(a.config.as_deref(), &a.sets)?;
    let trainer = Trainer::new(&cfg, tch::Device::Cpu)?;
    trainer.export_encoder(&a.output).with_context(|| format!("writing {}", a.output.display()))?;
    eprintln!("{}: randomly initialised {} (seed {})", a.output.display(), trainer.model.vit_cfg.arch, cfg.seed);
    Ok(())
}
