//! `eval --protocol finetune`: MAE's full fine-tuning recipe, with its state kept in a run folder so that a killed
//! run resumes, and one results record at the end.
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;

use crate::data::dataset::Dataset;
use crate::protocols::finetune::{run_finetune_with, FinetuneConfig, RunOptions, CHECKPOINT_NAME};
use super::linear_cmds::ProtocolInputs;
use crate::results::{Provenance, RunRecord};

pub fn finetune(inp: &ProtocolInputs) -> anyhow::Result<RunRecord> {
    if inp.checkpoint.is_none() && inp.arch.is_none() {
        return Err(crate::Error::option("--checkpoint/--arch", "fine-tuning needs a pretrained --checkpoint, or --arch to train from scratch").into());
    }
    let mut cfg: FinetuneConfig =
        super::linear_cmds::protocol_config(inp.protocol_file, "protocols/finetune.toml", include_str!("../../protocols/finetune.toml"), inp.sets)?;
    if inp.device != "auto" {
        cfg.device = inp.device.to_string();
    }
    if let Some(w) = inp.workers {
        cfg.workers = w;
    }
    cfg.validate()?;
    let name = inp.name.clone().unwrap_or_else(|| match inp.checkpoint {
        Some(c) => c.file_stem().map_or("model".into(), |s| s.to_string_lossy().into_owned()),
        None => format!("{}-scratch", inp.arch.unwrap_or("vit")),
    });
    let run_dir: PathBuf = inp.output.join(format!("{name}-finetune"));
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    if inp.fresh {
        let _ = std::fs::remove_file(run_dir.join(CHECKPOINT_NAME));
    }
    crate::config::save(&cfg, &run_dir.join("finetune.toml"))?;
    let log_path = run_dir.join("metrics.jsonl");
    let mut log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).with_context(|| format!("opening {}", log_path.display()))?;

    let started_at = crate::results::now_rfc3339();
    let t0 = Instant::now();
    let opts = RunOptions { output_dir: Some(run_dir.clone()), resume: true, stop_after_epochs: None };
    let quiet = inp.quiet;
    let (res, _) = run_finetune_with(inp.checkpoint, inp.arch, inp.data, &cfg, &opts, |v| {
        let _ = writeln!(log, "{v}");
        if !quiet {
            eprintln!("finetune {v}");
        }
    })
    .with_context(|| format!("fine-tuning on {}", inp.data.display()))?;

    let mut rec = RunRecord::new("finetune", &cfg.version, "top1");
    rec.started_at = started_at;
    rec.model_name = name;
    rec.checkpoint = inp.checkpoint.map(|c| c.display().to_string());
    rec.checkpoint_sha256 = match inp.checkpoint {
        Some(c) => Some(crate::checkpoint::sha256_file(c)?),
        None => None,
    };
    rec.arch = Some(res.arch.clone());
    rec.dataset = Some(inp.data.display().to_string());
    rec.dataset_fingerprint = Some(serde_json::to_value(Dataset::open(inp.data, "train")?.fingerprint()?)?);
    rec.metrics.insert("top1".into(), res.top1);
    rec.metrics.insert("top5".into(), res.top5);
    rec.metrics.insert("best_top1".into(), res.best_top1);
    if let (Some(l), Some(b)) = (res.ema_top1, res.ema_best_top1) {
        rec.metrics.insert("ema_top1".into(), l);
        rec.metrics.insert("ema_best_top1".into(), b);
    }
    rec.config = serde_json::to_value(&cfg)?;
    rec.seed = cfg.seed;
    rec.provenance = Provenance::current(&res.device);
    rec.duration_s = t0.elapsed().as_secs_f64();
    rec.details = serde_json::json!({
        "init": if inp.checkpoint.is_some() { "checkpoint" } else { "random (from scratch)" },
        "history": res.history, "best_epoch": res.best_epoch, "steps": res.steps, "lr": res.lr,
        "accum_iter": res.accum_iter, "precision": res.precision, "resumed_from_epoch": res.resumed_from_epoch,
        "exported": res.exported, "run_dir": run_dir,
        "load_report": res.load_report.as_ref().map(|r| r.summary()),
    });
    rec.write(inp.output)?;
    Ok(rec)
}
