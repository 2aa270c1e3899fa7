//! `lmim-bench pretrain` and `lmim-bench init`: arguments and printing; the run is `train::pretrain::run`.
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::train::pretrain::{PretrainConfig, PretrainRequest, Trainer};

#[derive(Debug, Args)]
pub struct PretrainArgs {
    /// Config file (TOML), e.g. configs/lmim_vit_base.toml or configs/lmim_tiny.toml; defaults are the reference's.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Config overrides as bare `key=value` arguments (as the reference's Hydra launcher), e.g. `blr=1.5e-4 epochs=800`.
    #[arg(value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Override a config key, e.g. `--set epochs=100` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Data root with a train/ split (overrides the config's `data`); a val/ split feeds the NN monitor.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Output directory for checkpoints, metrics, the exported encoder and the config
    /// (default: results/runs/pretrain-<config name>).
    #[arg(long, short, value_parser = crate::cli::output_dir)]
    pub output: Option<PathBuf>,
    /// Start from scratch even if the output directory holds checkpoints (refused if it does).
    #[arg(long, conflicts_with = "resume_from")]
    pub no_resume: bool,
    /// Resume from this checkpoint instead of the newest one in the output directory.
    #[arg(long)]
    pub resume_from: Option<PathBuf>,
    /// Resume even when the checkpoint's recipe or data differ from this run's.
    #[arg(long)]
    pub resume_anyway: bool,
    /// No TensorBoard event files beside metrics.jsonl.
    #[arg(long)]
    pub no_tensorboard: bool,
    /// No progress bar and no loader warnings.
    #[arg(long, short)]
    pub quiet: bool,
    #[command(flatten)]
    pub dist: super::DistArgs,
    #[command(flatten)]
    pub scan: super::ScanArgs,
}

pub fn pretrain(a: PretrainArgs) -> anyhow::Result<()> {
    let sets: Vec<String> = a.sets.iter().chain(&a.overrides).cloned().collect();
    // The recipe's device picks the collective back-end (the run reads the config again, with all its checks).
    let device = crate::config::load::<PretrainConfig>(a.config.as_deref(), &sets)?.device;
    let world = a.dist.init(&device)?;
    let req = PretrainRequest {
        config: a.config.clone(),
        sets,
        data: a.data.clone(),
        output: a.output.clone(),
        no_resume: a.no_resume,
        resume_from: a.resume_from.clone(),
        resume_anyway: a.resume_anyway,
        quiet: a.quiet,
        tensorboard: !a.no_tensorboard,
        scan: a.scan.flags(),
    };
    let rec = crate::train::pretrain::run(&req).context("pretraining")?;
    if !world.is_main() {
        return Ok(());
    }
    let m = |k: &str| rec.metrics.get(k).copied().unwrap_or(f64::NAN);
    if rec.details["finished_already"] == true {
        eprintln!(
            "{}: finished already ({} epochs, {} steps); nothing was trained or written. Raise `epochs` to train on, or choose another --output",
            rec.details["last_checkpoint"].as_str().unwrap_or(""),
            rec.details["epochs"],
            m("steps")
        );
        return Ok(());
    }
    eprintln!(
        "done: {} steps, final loss {:.4}, {:.1} img/s; encoder {}",
        m("steps"),
        m("final_loss"),
        m("img_per_s"),
        rec.checkpoint.as_deref().unwrap_or("")
    );
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
