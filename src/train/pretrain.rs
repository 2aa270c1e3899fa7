//! `lmim-bench pretrain`: the Latent MIM training loop, in the order of the reference step (spec section 5.3),
//! with atomic checkpoints that carry everything a bitwise-identical resume needs.
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use super::optim::{AdamW, Param};
use super::schedule::{lr_at, momentum_at, sim_target_at};
use crate::checkpoint;
use crate::error::{Error, Result};
use crate::model::lmim::{decays, export_encoder, random_views, Lmim, LmimModelConfig};
use crate::model::vit::with_amp;

/// Pretraining config. Keys follow the reference command (`blr`, `min_lr_frac`, `accum_iter`, ...).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct PretrainConfig {
    #[serde(flatten)]
    pub model: LmimModelConfig,
    /// Data root with a `train/` split (ImageFolder layout).
    pub data: String,
    pub epochs: f64,
    pub warmup_epochs: f64,
    /// Base learning rate; lr = blr * batch_size * accum_iter * world_size / 256.
    pub blr: f64,
    /// Floor (and warmup start) of the lr, as a fraction of the peak lr.
    pub min_lr_frac: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// Micro-batch size per process.
    pub batch_size: i64,
    pub accum_iter: i64,
    /// Gradient clipping by global norm; 0 disables it (the reference does not clip).
    pub clip_grad: f64,
    /// RandomResizedCrop scale range of the training crop.
    pub crop_scale_min: f64,
    pub crop_scale_max: f64,
    pub seed: u64,
    /// `auto` (CUDA if present), `cpu`, `cuda`, `cuda:N`.
    pub device: String,
    /// `auto` (bf16 on CUDA, f32 on CPU), `bf16` or `f32`.
    pub precision: String,
    pub num_workers: usize,
    /// Optimiser steps between metric lines.
    pub log_every: i64,
    /// Optimiser steps between checkpoints (0: only at the end of each epoch).
    pub checkpoint_every: i64,
    /// Checkpoints kept on disk (the newest ones).
    pub keep_last: usize,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        PretrainConfig {
            model: LmimModelConfig::default(),
            data: "data/imagenet".into(),
            epochs: 800.0,
            warmup_epochs: 40.0,
            blr: 1.5e-4,
            min_lr_frac: 0.25,
            weight_decay: 0.05,
            beta1: 0.9,
            beta2: 0.95,
            batch_size: 256,
            accum_iter: 2,
            clip_grad: 0.0,
            crop_scale_min: 0.2,
            crop_scale_max: 1.0,
            seed: 0,
            device: "auto".into(),
            precision: "auto".into(),
            num_workers: 0,
            log_every: 20,
            checkpoint_every: 0,
            keep_last: 3,
        }
    }
}

impl PretrainConfig {
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        let bad = |k: &str, r: &str| Err(Error::option(k, r));
        if self.epochs <= 0.0 || self.epochs.fract() != 0.0 {
            return bad("epochs", "must be a positive whole number");
        }
        if self.warmup_epochs < 0.0 || self.warmup_epochs > self.epochs {
            return bad("warmup_epochs", "must be between 0 and epochs");
        }
        if self.batch_size < 1 || self.accum_iter < 1 {
            return bad("batch_size", "batch_size and accum_iter must be >= 1");
        }
        if !matches!(self.precision.as_str(), "auto" | "bf16" | "f32") {
            return bad("precision", "must be auto, bf16 or f32");
        }
        Ok(())
    }

    pub fn effective_batch(&self) -> i64 {
        self.batch_size * self.accum_iter
    }
    pub fn peak_lr(&self) -> f64 {
        self.blr * self.effective_batch() as f64 / 256.0
    }
}

/// Where training images come from: batches of normalised crops `[B, 3, S, S]` for an epoch, starting at a
/// given micro-batch, in an order that depends only on (seed, epoch).
pub trait BatchSource {
    fn batches_per_epoch(&self) -> usize;
    fn epoch_batches(&self, epoch: usize, start: usize) -> Box<dyn Iterator<Item = Result<Tensor>> + '_>;
}

/// Files a run writes in its output directory.
pub struct RunPaths {
    pub dir: PathBuf,
}

impl RunPaths {
    pub fn checkpoints(&self) -> PathBuf {
        self.dir.join("checkpoints")
    }
    pub fn metrics(&self) -> PathBuf {
        self.dir.join("metrics.jsonl")
    }
    pub fn config(&self) -> PathBuf {
        self.dir.join("config.toml")
    }
    pub fn encoder(&self) -> PathBuf {
        self.dir.join("encoder.safetensors")
    }
    pub fn checkpoint(&self, step: i64) -> PathBuf {
        self.checkpoints().join(format!("ckpt-{step:08}.safetensors"))
    }
    /// Checkpoints on disk, oldest first.
    pub fn list_checkpoints(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(self.checkpoints())
            .map(|rd| {
                rd.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("ckpt-") && n.ends_with(".safetensors")))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

/// Position in the run: `epoch` and the next micro-batch `iter` within it; `step` counts optimiser steps.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Position {
    pub epoch: usize,
    pub iter: usize,
    pub step: i64,
}

/// What a finished run reports.
#[derive(Debug, Clone, Serialize)]
pub struct PretrainSummary {
    pub steps: i64,
    pub epochs: usize,
    pub final_loss: f64,
    pub img_per_s: f64,
    pub resumed_from: Option<String>,
    pub last_checkpoint: Option<String>,
    pub encoder: String,
    pub final_monitors: BTreeMap<String, f64>,
}

pub struct Trainer {
    pub cfg: PretrainConfig,
    pub vs: nn::VarStore,
    pub model: Lmim,
    pub opt: AdamW,
    pub pos: Position,
    pub device: Device,
    amp: Option<Kind>,
}

fn seed_for(seed: u64, epoch: usize, iter: usize) -> u64 {
    // SplitMix-style mixing, so neighbouring (epoch, iter) pairs get unrelated streams.
    let mut z = seed ^ ((epoch as u64) << 32) ^ (iter as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Trainer {
    pub fn new(cfg: &PretrainConfig, device: Device) -> Result<Self> {
        cfg.validate()?;
        tch::manual_seed(cfg.seed as i64);
        let vs = nn::VarStore::new(device);
        let model = Lmim::new(&vs, &cfg.model)?;
        let params = model
            .trainable_vars(&vs)
            .into_iter()
            .map(|(name, tensor)| {
                let weight_decay = if decays(&name, &tensor) { cfg.weight_decay } else { 0.0 };
                Param { name, tensor, weight_decay, lr_scale: 1.0 }
            })
            .collect();
        let opt = AdamW::new(params, cfg.beta1, cfg.beta2, 1e-8);
        let amp = match cfg.precision.as_str() {
            "bf16" => Some(Kind::BFloat16),
            "auto" if device.is_cuda() => Some(Kind::BFloat16),
            _ => None,
        };
        Ok(Trainer { cfg: cfg.clone(), vs, model, opt, pos: Position::default(), device, amp })
    }

    /// Writes model, target, optimiser state and position to `path` atomically.
    pub fn save_checkpoint(&self, path: &Path) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> = self.vs.variables().into_iter().map(|(n, t)| (format!("model.{n}"), t)).collect();
        tensors.extend(self.opt.state().into_iter().map(|(n, t)| (format!("optim.{n}"), t)));
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), "lmim-bench-pretrain".to_string());
        meta.insert("epoch".to_string(), self.pos.epoch.to_string());
        meta.insert("iter".to_string(), self.pos.iter.to_string());
        meta.insert("step".to_string(), self.pos.step.to_string());
        meta.insert("config".to_string(), serde_json::to_string(&self.cfg).expect("config serialises"));
        meta.insert("arch".to_string(), self.model.vit_cfg.arch.clone());
        checkpoint::save(path, &tensors, &meta)
    }

    /// Restores everything [`Trainer::save_checkpoint`] wrote. A checkpoint of another model is an error.
    pub fn load_checkpoint(&mut self, path: &Path) -> Result<()> {
        let ck = checkpoint::load(path)?;
        if ck.metadata.get("format").map(String::as_str) != Some("lmim-bench-pretrain") {
            return Err(Error::checkpoint(path, "not a pretraining checkpoint of lmim-bench (metadata `format` differs)"));
        }
        let num = |k: &str| -> Result<i64> {
            ck.metadata.get(k).and_then(|v| v.parse().ok()).ok_or_else(|| Error::checkpoint(path, format!("metadata `{k}` is missing")))
        };
        let model_ck = checkpoint::Checkpoint {
            tensors: ck.tensors.iter().filter_map(|(n, t)| n.strip_prefix("model.").map(|s| (s.to_string(), t.shallow_clone()))).collect(),
            metadata: Default::default(),
            path: path.to_path_buf(),
        };
        checkpoint::load_into(&self.vs, &model_ck, &[])?;
        let by_name: std::collections::HashMap<&str, &Tensor> =
            ck.tensors.iter().filter_map(|(n, t)| n.strip_prefix("optim.").map(|s| (s, t))).collect();
        let step = num("step")?;
        self.opt.load_state(|k| by_name.get(k).map(|t| t.shallow_clone()), step).map_err(|r| Error::checkpoint(path, r))?;
        self.pos = Position { epoch: num("epoch")? as usize, iter: num("iter")? as usize, step };
        Ok(())
    }

    /// Runs until `cfg.epochs`, resuming from `self.pos`. Metric lines go to `paths.metrics()`.
    pub fn train(&mut self, data: &dyn BatchSource, paths: &RunPaths, quiet: bool) -> Result<PretrainSummary> {
        let cfg = self.cfg.clone();
        let iters_per_epoch = data.batches_per_epoch();
        let accum = cfg.accum_iter as usize;
        // Micro-batches that complete an optimiser step; the reference discards the gradient of a trailing one.
        let used_iters = iters_per_epoch / accum * accum;
        if used_iters == 0 {
            return Err(Error::option("batch_size", format!("the data set gives {iters_per_epoch} batches per epoch, fewer than accum_iter = {accum}")));
        }
        let epochs = cfg.epochs as usize;
        let total_steps = (epochs * used_iters / accum) as u64;
        let (lr, min_lr) = (cfg.peak_lr(), cfg.peak_lr() * cfg.min_lr_frac);
        let bar = progress_bar(total_steps, quiet);
        bar.set_position(self.pos.step as u64);
        std::fs::create_dir_all(paths.checkpoints()).map_err(|e| Error::io(paths.checkpoints(), e))?;
        let mut log = std::fs::OpenOptions::new().create(true).append(true).open(paths.metrics()).map_err(|e| Error::io(paths.metrics(), e))?;
        let (mut cur_lr, mut mom, mut sim_t) = (0.0, 0.0, 0.0);
        let mut last_loss = f64::NAN;
        let mut monitors = BTreeMap::new();
        let mut window_imgs = 0usize;
        let mut window_start = Instant::now();
        let run_start = Instant::now();
        let mut run_imgs = 0usize;
        let mut last_ckpt: Option<PathBuf> = paths.list_checkpoints().last().cloned();
        while self.pos.epoch < epochs {
            let epoch = self.pos.epoch;
            let mut batches = data.epoch_batches(epoch, self.pos.iter);
            while self.pos.iter < used_iters {
                let it = self.pos.iter;
                let images = batches.next().ok_or_else(|| Error::data(&cfg.data, format!("the loader ended early in epoch {epoch} at batch {it}")))??;
                let images = images.to_device(self.device);
                if it % accum == 0 {
                    let t = epoch as f64 + it as f64 / iters_per_epoch as f64;
                    cur_lr = lr_at(t, lr, min_lr, cfg.warmup_epochs, cfg.epochs);
                    mom = momentum_at(t, cfg.model.target_mom, cfg.epochs);
                    sim_t = sim_target_at(t, cfg.model.sim_init, cfg.model.sim_end, cfg.epochs);
                    self.model.ema_update(&self.vs, mom);
                }
                let sub_seed = seed_for(cfg.seed, epoch, it);
                let mut rng = ChaCha8Rng::seed_from_u64(sub_seed);
                tch::manual_seed(sub_seed as i64 & i64::MAX);
                let vit = &self.model.vit_cfg;
                let views = random_views(&images, vit.patch_size, cfg.model.patch_gap, cfg.model.num_vis, &mut rng);
                let out = with_amp(self.amp, || self.model.forward(&views, sim_t, true));
                let loss = out.loss.double_value(&[]);
                if !loss.is_finite() {
                    let keep = last_ckpt.as_ref().map_or("none".to_string(), |p| p.display().to_string());
                    return Err(Error::Diverged(format!(
                        "loss is {loss} at step {} (epoch {epoch}, micro-batch {it}); stopped, last good checkpoint: {keep}",
                        self.pos.step + 1
                    )));
                }
                (&out.loss / cfg.accum_iter as f64).backward();
                window_imgs += images.size()[0] as usize;
                run_imgs += images.size()[0] as usize;
                self.pos.iter += 1;
                if (it + 1) % accum != 0 {
                    continue;
                }
                let clip = (cfg.clip_grad > 0.0).then_some(cfg.clip_grad);
                let gnorm = self.opt.grad_norm(clip);
                self.opt.step(cur_lr);
                self.opt.zero_grad();
                self.pos.step += 1;
                last_loss = loss;
                bar.inc(1);
                bar.set_message(format!("epoch {epoch} loss {loss:.4}"));
                if self.pos.iter == used_iters {
                    self.pos.epoch += 1;
                    self.pos.iter = 0;
                }
                let log_now = self.pos.step % cfg.log_every.max(1) == 0 || self.pos.iter == 0;
                if log_now {
                    let secs = window_start.elapsed().as_secs_f64().max(1e-9);
                    monitors = BTreeMap::from([
                        ("loss_main".to_string(), out.loss_main.double_value(&[])),
                        ("loss_reg".to_string(), out.loss_reg.double_value(&[])),
                        ("avg_sim_pred".to_string(), out.avg_sim_pred.double_value(&[])),
                        ("avg_sim_vis".to_string(), out.avg_sim_vis.double_value(&[])),
                        ("avg_sim_trg".to_string(), out.avg_sim_trg.double_value(&[])),
                        ("target_std".to_string(), out.target_std.double_value(&[])),
                    ]);
                    let mut line = serde_json::json!({
                        "step": self.pos.step, "epoch": epoch as f64 + it as f64 / iters_per_epoch as f64,
                        "loss": loss, "lr": cur_lr, "momentum": mom, "sim_target": sim_t, "grad_norm": gnorm,
                        "img_per_s": window_imgs as f64 / secs,
                    });
                    for (k, v) in &monitors {
                        line[k] = serde_json::json!(v);
                    }
                    use std::io::Write;
                    writeln!(log, "{line}").map_err(|e| Error::io(paths.metrics(), e))?;
                    window_imgs = 0;
                    window_start = Instant::now();
                }
                let epoch_end = self.pos.iter == 0;
                if epoch_end || (cfg.checkpoint_every > 0 && self.pos.step % cfg.checkpoint_every == 0) {
                    let path = paths.checkpoint(self.pos.step);
                    self.save_checkpoint(&path)?;
                    last_ckpt = Some(path);
                    let all = paths.list_checkpoints();
                    for old in all.iter().take(all.len().saturating_sub(cfg.keep_last.max(1))) {
                        let _ = std::fs::remove_file(old);
                    }
                }
                if epoch_end {
                    self.export_encoder(&paths.encoder())?;
                    break;
                }
            }
        }
        bar.finish_and_clear();
        self.export_encoder(&paths.encoder())?;
        Ok(PretrainSummary {
            steps: self.pos.step,
            epochs,
            final_loss: last_loss,
            img_per_s: run_imgs as f64 / run_start.elapsed().as_secs_f64().max(1e-9),
            resumed_from: None,
            last_checkpoint: last_ckpt.map(|p| p.display().to_string()),
            encoder: paths.encoder().display().to_string(),
            final_monitors: monitors,
        })
    }

    /// Saves the online encoder alone, with timm names and `arch`/`config` metadata, for `eval`.
    pub fn export_encoder(&self, path: &Path) -> Result<()> {
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), "lmim-bench".to_string());
        meta.insert("arch".to_string(), self.model.vit_cfg.arch.clone());
        let mut vit_cfg = self.model.vit_cfg.clone();
        vit_cfg.drop_path_rate = 0.0;
        meta.insert("config".to_string(), serde_json::to_string(&vit_cfg).expect("config serialises"));
        meta.insert("step".to_string(), self.pos.step.to_string());
        checkpoint::save(path, &export_encoder(&self.vs), &meta)
    }
}

fn progress_bar(total: u64, quiet: bool) -> indicatif::ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} steps ({per_sec}, eta {eta}) {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar
}

/// Finds the checkpoint to resume from: the newest in the run directory. A newest checkpoint that cannot be read
/// is an error naming it (and the previous one, which is still there) rather than a silent fallback.
pub fn latest_checkpoint(paths: &RunPaths) -> Result<Option<PathBuf>> {
    let all = paths.list_checkpoints();
    let Some(last) = all.last() else { return Ok(None) };
    if let Err(e) = checkpoint::load(last) {
        let prev = all.iter().rev().nth(1).map_or("none".to_string(), |p| p.display().to_string());
        return Err(Error::checkpoint(last, format!("{e}; the previous checkpoint is {prev} (resume from it with --resume-from)")));
    }
    Ok(Some(last.clone()))
}
