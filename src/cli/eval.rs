//! `lmim-bench extract` and `lmim-bench eval`: argument definitions and printing; the protocols are library
//! calls (`protocols::run`, `protocols::extract::extract`).
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

use crate::config::Precision;
use crate::error::Error;
use crate::info::{device_name, parse_device};
use crate::protocols::extract::{self, ExtractRequest, FeatureKind};
use crate::protocols::knn::Backend;
use crate::protocols::{EvalRequest, Protocol, RunOptions};
use crate::results::{write_output, RunRecord};

#[derive(Debug, Args)]
pub struct ExtractArgs {
    /// Encoder checkpoint (safetensors or .pth; timm, MAE, DINO, iBOT, MoCo v3, I-JEPA, DINOv2 or Latent MIM
    /// layouts).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Checkpoint layout: timm, mae, dino, ibot, mocov3, ijepa, dinov2, lmim (default: detected; an ambiguous
    /// file is refused with the candidates).
    #[arg(long, value_parser = crate::cli::parse_family)]
    pub from: Option<crate::checkpoint::Family>,
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
    /// of the last block before the final norm). Default: the checkpoint family's own (avg for I-JEPA), else cls.
    #[arg(long)]
    pub feature: Option<String>,
    /// Concatenate the features of the last N blocks.
    #[arg(long, default_value_t = 1)]
    pub last_blocks: i64,
    /// Eval transform: Resize(floor(img_size / crop_pct), bicubic) + CenterCrop(img_size).
    #[arg(long, default_value_t = 0.875)]
    pub crop_pct: f64,
    /// Images per forward pass.
    #[arg(long, default_value_t = 128, value_parser = crate::cli::batch_size)]
    pub batch_size: usize,
    /// Decode threads (default: all cores).
    #[arg(long, value_parser = crate::cli::workers)]
    pub workers: Option<usize>,
    /// Device: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// f32 (as DINO's k-NN and the Latent MIM NN monitor), or bf16 autocast (recorded in the file).
    #[arg(long, value_enum, default_value = "f32")]
    pub precision: Precision,
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
    #[command(flatten)]
    pub dist: super::DistArgs,
    #[command(flatten)]
    pub scan: super::ScanArgs,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Protocol.
    #[arg(long, value_enum)]
    pub protocol: Protocol,
    /// Protocol-file overrides as bare `key=value` arguments (as Hydra overrides), e.g. `epochs=20 blr=0.05`.
    #[arg(value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Override a protocol-file key, e.g. `--set epochs=20` (repeatable; the record's version names it).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Encoder checkpoint; features are extracted (or taken from the cache).
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Checkpoint layout: timm, mae, dino, ibot, mocov3, ijepa, dinov2, lmim (default: detected; an ambiguous
    /// file is refused with the candidates).
    #[arg(long, value_parser = crate::cli::parse_family)]
    pub from: Option<crate::checkpoint::Family>,
    /// Dataset root with train/ and val/ (davis: a DAVIS-2017 root with JPEGImages/480p, Annotations/480p and
    /// ImageSets/2017/val.txt).
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
    /// Protocol file (default: protocols/<protocol>.toml here, else the built-in copy).
    #[arg(long)]
    pub protocol_file: Option<PathBuf>,
    /// Low-shot: a training subset list in MSN's format (one training image file name per line, as its
    /// imagenet_subsets*/*.txt), or a folder of such .txt lists; repeatable, one split each (the record keeps
    /// every split, their mean and standard deviation). Without it, `shots=N` draws N images per class.
    #[arg(long = "subset", value_name = "FILE|DIR")]
    pub subsets: Vec<PathBuf>,
    /// Shorthand for `feature=...`.
    #[arg(long)]
    pub feature: Option<String>,
    /// Shorthand for `last_blocks=...`.
    #[arg(long)]
    pub last_blocks: Option<i64>,
    /// Shorthand for `ks=[...]`, e.g. `--k 10,20`.
    #[arg(long, value_delimiter = ',')]
    pub k: Option<Vec<i64>>,
    /// Shorthand for `temperature=...`.
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Shorthand for `headline_k=...`.
    #[arg(long)]
    pub headline_k: Option<i64>,
    /// k-NN search back-end.
    #[arg(long, value_enum, default_value = "torch")]
    pub backend: Backend,
    /// Device: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Precision of the forward passes (default: f32 for the feature protocols, auto = bf16 on CUDA for the
    /// training ones); recorded.
    #[arg(long, value_enum)]
    pub precision: Option<Precision>,
    /// Queries per similarity block.
    #[arg(long)]
    pub query_chunk: Option<i64>,
    /// Bank rows per similarity block.
    #[arg(long)]
    pub bank_chunk: Option<i64>,
    /// Images per forward pass of feature extraction.
    #[arg(long, default_value_t = 128, value_parser = crate::cli::batch_size)]
    pub batch_size: usize,
    /// Decode threads (default: all cores).
    #[arg(long, value_parser = crate::cli::workers)]
    pub workers: Option<usize>,
    #[arg(long, default_value = "results/cache")]
    pub cache_dir: PathBuf,
    #[arg(long)]
    pub no_cache: bool,
    /// A file of a training split (the probe's and fine-tuning's train/) that cannot be read or decoded stops the
    /// run (default: skipped, counted and recorded, as in pretraining).
    #[arg(long)]
    pub strict: bool,
    /// Evaluation splits (val/, and every split that k-NN, nn-loo and the sweep extract) refuse a file that cannot
    /// be read or decoded, with exit 2 naming it: a score over part of a split is not comparable with one over all
    /// of it. With --skip-bad such files are skipped, counted and listed in the record instead.
    #[arg(long)]
    pub skip_bad: bool,
    /// No TensorBoard event files beside the metrics of the training protocols.
    #[arg(long)]
    pub no_tensorboard: bool,
    /// Model name in the record and the table (default: the checkpoint's file stem).
    #[arg(long)]
    pub name: Option<String>,
    /// Directory for the results record (JSON) and results.csv.
    #[arg(long, default_value = "results/runs", value_parser = crate::cli::output_dir)]
    pub output: PathBuf,
    /// Print the record as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    #[arg(long)]
    pub quiet: bool,
    /// Fine-tuning: start over instead of resuming from the run folder in `--output`.
    #[arg(long)]
    pub fresh: bool,
    #[command(flatten)]
    pub dist: super::DistArgs,
    #[command(flatten)]
    pub scan: super::ScanArgs,
}

impl EvalArgs {
    /// Every override in order: `--set`, the bare ones, then the shorthands.
    fn all_sets(&self) -> Vec<String> {
        let mut sets: Vec<String> = self.sets.iter().chain(&self.overrides).cloned().collect();
        sets.extend(self.shorthands().into_iter().map(|(set, _)| set));
        sets
    }

    /// The override each shorthand flag stands for, with the flag as the user wrote it.
    fn shorthands(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Some(f) = &self.feature {
            let name = FeatureKind::parse(f).map_or_else(|_| f.clone(), |k| k.name().to_string());
            out.push((format!("feature=\"{name}\""), format!("--feature {f}")));
        }
        if let Some(n) = self.last_blocks {
            out.push((format!("last_blocks={n}"), format!("--last-blocks {n}")));
        }
        if let Some(k) = &self.k {
            let list = k.iter().map(|v| v.to_string()).collect::<Vec<_>>();
            out.push((format!("ks=[{}]", list.join(",")), format!("--k {}", list.join(","))));
        }
        if let Some(t) = self.temperature {
            out.push((format!("temperature={t:?}"), format!("--temperature {t}")));
        }
        if let Some(h) = self.headline_k {
            out.push((format!("headline_k={h}"), format!("--headline-k {h}")));
        }
        out
    }

    /// An error about an override a shorthand made names the shorthand (`--k 0`), not `--set ks=[0]`.
    fn name_shorthand(&self, e: Error) -> Error {
        if let Error::BadOption { option, reason } = &e {
            if option == "--set" {
                for (set, flag) in self.shorthands() {
                    if let Some(rest) = reason.strip_prefix(&format!("`{set}`")) {
                        let option = flag.split(' ').next().unwrap_or(&flag).to_string();
                        return Error::BadOption { option, reason: format!("`{flag}`{rest}") };
                    }
                }
            }
        }
        e
    }

    pub fn request(&self) -> EvalRequest {
        EvalRequest {
            protocol: self.protocol,
            checkpoint: self.checkpoint.clone(),
            arch: self.arch.clone(),
            from: self.from,
            data: self.data.clone(),
            train_features: self.train_features.clone(),
            val_features: self.val_features.clone(),
            protocol_file: self.protocol_file.clone(),
            sets: self.all_sets(),
            subsets: self.subsets.clone(),
            name: self.name.clone(),
            output: self.output.clone(),
            run: RunOptions {
                device: self.device.clone(),
                workers: self.workers,
                precision: self.precision,
                batch_size: self.batch_size,
                cache_dir: (!self.no_cache).then(|| self.cache_dir.clone()),
                quiet: self.quiet || !crate::dist::world().is_main(),
                fresh: self.fresh,
                backend: self.backend,
                query_chunk: self.query_chunk,
                bank_chunk: self.bank_chunk,
                strict: self.strict,
                skip_bad: self.skip_bad,
                tensorboard: !self.no_tensorboard,
                suite_entry: None,
                scan: self.scan.flags(),
            },
        }
    }
}

pub fn extract(a: ExtractArgs) -> anyhow::Result<()> {
    let world = a.dist.init(&a.device)?;
    let device = parse_device(&a.device)?;
    let req = ExtractRequest {
        checkpoint: a.checkpoint.clone(),
        arch: a.arch.clone(),
        from: a.from,
        feature_is_default: a.feature.is_none(),
        data_root: a.data.clone(),
        split: a.split.clone(),
        feature: FeatureKind::parse(a.feature.as_deref().unwrap_or("cls"))?,
        last_blocks: a.last_blocks,
        batch_size: a.batch_size,
        device,
        crop_pct: a.crop_pct,
        bilinear: false,
        half: a.half,
        cache_dir: (!a.no_cache).then(|| a.cache_dir.clone()),
        workers: a.workers,
        precision: a.precision,
        quiet: a.quiet,
        skip_bad: false,
        scan: a.scan.flags(),
        rows: None,
    };
    let (set, report) = extract::extract(&req).with_context(|| format!("extracting {} features of {}", a.split, a.checkpoint.display()))?;
    if !world.is_main() {
        return Ok(());
    }
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
        "precision": set.meta.precision,
        "checkpoint_sha256": set.meta.checkpoint_sha256,
        "device": device_name(device),
        "cache": report,
        "out": a.out,
    });
    let text = if a.json {
        serde_json::to_string_pretty(&summary)? + "\n"
    } else {
        let src = if report.cache_hit { "cache hit".to_string() } else { format!("extracted in {:.1} s", report.seconds) };
        let mut s = format!("{} features: {} x {} ({} classes), {}; {}\n", a.split, set.len(), set.dim(), set.num_classes(), set.meta.transform.as_deref().unwrap_or(""), src);
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

/// The human summary of a record: the headline, and per-k scores for k-NN.
fn summary(rec: &RunRecord) -> String {
    let m = |k: &str| rec.metrics.get(k).copied().unwrap_or(f64::NAN);
    if rec.protocol == Protocol::Davis.name() {
        let measures: Vec<String> = crate::protocols::jandf::MEASURES.iter().map(|(k, label)| format!("{label} {:.2}", m(k))).collect();
        return format!(
            "{} davis: J&F-Mean {:.2} ({}; {}) (protocol {})\nmasks: {}\n",
            rec.model_name,
            m("j_and_f"),
            measures[..3].join(", "),
            measures[3..].join(", "),
            crate::results::version_label(&rec.protocol_version),
            rec.details.get("masks").and_then(|v| v.as_str()).unwrap_or("?"),
        );
    }
    if rec.protocol == Protocol::Seg.name() {
        let mut s = format!("{} seg (ADE20K):", rec.model_name);
        for (tag, what) in [("knn", "k-NN"), ("logreg", "logistic regression")] {
            if rec.metrics.contains_key(&format!("miou_{tag}")) {
                let chosen = rec.details.get(tag).and_then(|d| d.get("chosen")).and_then(|v| v.as_str()).unwrap_or("?");
                s.push_str(&format!(" {what} mIoU {:.2}, accuracy {:.2} ({chosen});", m(&format!("miou_{tag}")), m(&format!("acc_{tag}"))));
            }
        }
        return format!("{} (protocol {})\n", s.trim_end_matches(';'), crate::results::version_label(&rec.protocol_version));
    }
    let mut s = format!("{} {}: top-1 {:.2}", rec.model_name, rec.protocol, m("top1"));
    if rec.metrics.contains_key("top5") {
        s.push_str(&format!(", top-5 {:.2}", m("top5")));
    }
    s.push_str(&format!(" (protocol {})\n", crate::results::version_label(&rec.protocol_version)));
    if let Some(best) = rec.details.get("best").filter(|_| rec.protocol == Protocol::KnnSweep.name()) {
        s.push_str(&format!("best of the (k, T) grid: k={} T={}\n", best["k"], best["temperature"]));
    }
    if let Some(e) = rec.details.get("best_epoch").filter(|_| rec.metrics.contains_key("last_top1")) {
        s.push_str(&format!("top-1 at the best epoch ({e}); at the last: {:.2}\n", m("last_top1")));
    }
    if let Some(scores) = rec.details.pointer("/knn/scores").and_then(|v| v.as_array()) {
        let headline = rec.config.get("headline_k").and_then(|v| v.as_i64());
        for sc in scores {
            let k = sc.get("k").and_then(|v| v.as_i64()).unwrap_or(0);
            let (t1, t5) = (sc.get("top1").and_then(|v| v.as_f64()).unwrap_or(f64::NAN), sc.get("top5").and_then(|v| v.as_f64()).unwrap_or(f64::NAN));
            s.push_str(&format!("k={k:<4} top-1 {t1:6.2}  top-5 {t5:6.2}{}\n", if Some(k) == headline { "  (headline)" } else { "" }));
        }
    }
    s
}

pub fn eval(a: EvalArgs) -> anyhow::Result<()> {
    let world = a.dist.init(&a.device)?;
    let req = a.request();
    if a.protocol == Protocol::Finetune {
        crate::signals::set_resume_hint(format!("run the same command again to resume fine-tuning from its last finished epoch (run folders in {})", a.output.display()));
    }
    let rec = crate::protocols::run(&req).map_err(|e| a.name_shorthand(e)).with_context(|| format!("evaluating with the {} protocol", a.protocol))?;
    if !world.is_main() {
        return Ok(());
    }
    let text = if a.json { serde_json::to_string_pretty(&rec)? + "\n" } else { format!("{}records: {}\n", summary(&rec), a.output.display()) };
    write_output("-", &text)?;
    Ok(())
}
