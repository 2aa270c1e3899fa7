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

use crate::device::{copy_ahead, Ready};
use super::optim::{AdamW, Param};
use super::schedule::{lr_at, momentum_at, sim_target_at};
use super::step::{run_epoch, Flow, Optimizer, StepEvent, StepRule, TrainStep};
use crate::checkpoint;
use crate::config::{Precision, Rule};
use crate::error::{Error, Result};
use crate::model::lmim::{decays, draw_views, export_encoder, views_from, Lmim, LmimModelConfig, ViewDraw};
use crate::data::dataset::Dataset;
use crate::data::loader::{Loader, LoaderConfig};
use crate::data::transforms::Transform;
use crate::model::vit::with_amp;
use crate::model::VisionTransformer;
use crate::protocols::extract::{eval_transform, image_features, FeatureKind};
use crate::protocols::knn::{nn_loo, SearchConfig};
use crate::results::metrics_log::MetricsLog;
use crate::results::{Provenance, RunRecord};

/// Pretraining config. Keys follow the reference command (`blr`, `min_lr_frac`, `epochs`, ...); the batch is
/// named as the global batch of an optimiser step, and the accumulation follows from it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PretrainConfig {
    #[serde(flatten)]
    pub model: LmimModelConfig,
    /// Data root with a `train/` split (ImageFolder layout).
    pub data: String,
    pub epochs: f64,
    pub warmup_epochs: f64,
    /// Base learning rate; lr = blr * batch_size / 256.
    pub blr: f64,
    /// Floor (and warmup start) of the lr, as a fraction of the peak lr.
    pub min_lr_frac: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// Global batch of an optimiser step: 4096 in the reference (8 GPUs x 256 x accum 2).
    pub batch_size: i64,
    /// Batch of one forward pass of one process; accumulation = batch_size / (micro_batch_size x processes).
    pub micro_batch_size: i64,
    /// Gradient clipping by global norm; 0 disables it (the reference does not clip).
    pub clip_grad: f64,
    /// RandomResizedCrop scale range of the training crop.
    pub crop_scale_min: f64,
    pub crop_scale_max: f64,
    pub seed: u64,
    /// `auto` (CUDA if present), `cpu`, `cuda`, `cuda:N`.
    pub device: String,
    pub precision: Precision,
    /// Decode threads (0: all cores).
    pub num_workers: usize,
    /// Optimiser steps between metric lines (each the mean over its window).
    pub log_every: i64,
    /// Optimiser steps between checkpoints (0: only at the end of each epoch).
    pub checkpoint_every: i64,
    /// Checkpoints kept on disk (the newest ones).
    pub keep_last: usize,
    /// Epochs between permanent checkpoints that keep_last never removes (the reference's `save_freq`; 0: none).
    pub save_every: usize,
    /// Epochs between evaluations of the leave-one-out 1-NN monitor on the `val` split, when there is one (the
    /// reference's `eval_freq`; the first and last epochs are always evaluated; 0: never).
    pub nn_every: usize,
    /// Processes of the run and their collective back-end (`gloo`, `nccl`): written by the run for the record, set
    /// by the launcher (torchrun, srun), not by this key, and free to differ on resume.
    pub world_size: usize,
    pub backend: String,
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
            batch_size: 4096,
            micro_batch_size: 256,
            clip_grad: 0.0,
            crop_scale_min: 0.2,
            crop_scale_max: 1.0,
            seed: 0,
            device: "auto".into(),
            precision: Precision::Auto,
            num_workers: 0,
            log_every: 20,
            checkpoint_every: 0,
            keep_last: 3,
            save_every: 100,
            nn_every: 10,
            world_size: 1,
            backend: "gloo".into(),
        }
    }
}

/// Keys that may differ when a run is resumed: they change how it runs or what it writes, not its trajectory.
pub const RESUMABLE_KEYS: &[&str] = &["epochs", "data", "device", "num_workers", "log_every", "checkpoint_every", "keep_last", "save_every", "nn_every", "world_size", "backend"];

/// Valid values of the numeric keys (the model's are [`LmimModelConfig::RULES`]).
const RULES: &[Rule] = &[
    Rule::above("epochs", 0.0, 1e6),
    Rule::real("warmup_epochs", 0.0, 1e6).at_most("epochs"),
    // Far above any recipe's lr (1.5e-4), still finite through the schedule: larger only overflows.
    Rule::above("blr", 0.0, 1e4),
    Rule::real("min_lr_frac", 0.0, 1.0),
    Rule::real("weight_decay", 0.0, 10.0),
    Rule::below("beta1", 0.0, 1.0),
    Rule::below("beta2", 0.0, 1.0),
    Rule::int("batch_size", 1, 1 << 24),
    Rule::int("micro_batch_size", 1, 65536).at_most("batch_size"),
    // 0 turns clipping off.
    Rule::real("clip_grad", 0.0, 1e6),
    Rule::above("crop_scale_min", 0.0, 1.0).at_most("crop_scale_max"),
    Rule::above("crop_scale_max", 0.0, 1.0),
    Rule::int("seed", 0, i64::MAX),
    Rule::int("num_workers", 0, 1024),
    Rule::int("log_every", 1, 1 << 30),
    Rule::int("checkpoint_every", 0, 1 << 40),
    Rule::int("keep_last", 1, 1 << 20),
    Rule::int("save_every", 0, 1 << 20),
    Rule::int("nn_every", 0, 1 << 20),
    Rule::int("world_size", 1, 1 << 20),
];

impl crate::config::Recipe for PretrainConfig {
    fn rules() -> Vec<Rule> {
        [LmimModelConfig::RULES, RULES].concat()
    }
}

impl PretrainConfig {
    /// The table of every numeric key, then what depends on the encoder and the number of processes.
    pub fn validate(&self) -> Result<()> {
        crate::config::check_rules(self)?;
        self.model.validate()?;
        if self.epochs.fract() != 0.0 {
            return Err(Error::option("epochs", format!("{} must be a whole number", self.epochs)));
        }
        self.accum_iter(crate::dist::world().size as i64)?;
        Ok(())
    }

    /// Micro-batches per optimiser step and process.
    pub fn accum_iter(&self, world_size: i64) -> Result<i64> {
        super::accum_for(self.batch_size, self.micro_batch_size, world_size)
    }
    pub fn peak_lr(&self) -> f64 {
        super::scaled_lr(self.blr, self.batch_size)
    }
}

/// Where training images come from: batches of normalised crops `[B, 3, S, S]` for an epoch, starting at a
/// given micro-batch, in an order that depends only on (seed, epoch).
pub trait BatchSource {
    /// Micro-batches of an epoch over all ranks (this rank gets every world-th of them).
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
    /// A permanent checkpoint (every `save_every` epochs), never rotated away.
    pub fn permanent(&self, epoch: usize) -> PathBuf {
        self.checkpoints().join("keep").join(format!("epoch-{epoch:05}.safetensors"))
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
    /// Hash of the training split's fingerprint, stored in checkpoints so that a resume on other data is refused.
    pub dataset_hash: Option<String>,
    /// Micro-batches per epoch of the data source (sets the fractional epoch of the schedules).
    iters_per_epoch: usize,
    step_state: StepState,
    window: Window,
    /// The log sums of the checkpoint resumed from ([`Window::state`]), restored when training starts.
    resumed_window: Option<serde_json::Value>,
    /// The checksum of the tensors of the checkpoint resumed from (its `data_sha256`), for the ranks' agreement.
    resumed_sha256: Option<String>,
}

/// The schedules' values of the current optimiser step.
#[derive(Debug, Clone, Copy, Default)]
struct StepState {
    lr: f64,
    mom: f64,
    sim_target: f64,
}

/// Sums of the per-micro-batch statistics over the current logging window and over the epoch, kept on the device
/// (read only when a window or an epoch is logged).
#[derive(Debug, Default)]
struct Window {
    sums: Option<Tensor>,
    epoch_sums: Option<Tensor>,
    n: usize,
    epoch_n: usize,
    images: usize,
    grad_norm: Vec<f64>,
}

impl Window {
    const NAMES: [&'static str; 7] = ["loss", "loss_main", "loss_reg", "avg_sim_pred", "avg_sim_vis", "avg_sim_trg", "target_std"];

    /// Adds one micro-batch's statistics (`[NAMES.len()]` f64 on the device).
    fn add(&mut self, values: &Tensor) {
        let add = |acc: &mut Option<Tensor>| *acc = Some(acc.as_ref().map_or_else(|| values.shallow_clone(), |a| a + values));
        add(&mut self.sums);
        add(&mut self.epoch_sums);
        self.n += 1;
        self.epoch_n += 1;
    }

    /// Means over the window's (or epoch's) micro-batches of every rank, and the window's images over all ranks,
    /// in one all-reduce and one host read. Every rank calls it at the same steps.
    fn means(&self, epoch: bool) -> Result<(BTreeMap<String, f64>, f64)> {
        let (sums, n) = if epoch { (&self.epoch_sums, self.epoch_n) } else { (&self.sums, self.n) };
        let k = Self::NAMES.len();
        let sums = sums.as_ref().map_or_else(|| Tensor::zeros([k as i64], (Kind::Double, Device::Cpu)), |s| s.shallow_clone());
        let counts = Tensor::from_slice(&[n as f64, self.images as f64]).to_device(sums.device());
        let local = Tensor::cat(&[sums, counts], 0);
        crate::dist::world().all_reduce_sum(std::slice::from_ref(&local), "the monitor all-reduce")?;
        let all = crate::device::read_f64s(&local)?;
        let (n, images) = (all[k].max(1.0), all[k + 1]);
        Ok((Self::NAMES.iter().zip(&all).map(|(name, s)| (name.to_string(), s / n)).collect(), images))
    }

    /// The sums, counts and images of the window and of the epoch over every rank, as a checkpoint keeps them
    /// (a resumed run's logs then continue the interrupted window and epoch instead of starting them again).
    /// Every rank calls it at the same steps.
    fn state(&self) -> Result<serde_json::Value> {
        let k = Self::NAMES.len() as i64;
        let zeros = || Tensor::zeros([k], (Kind::Double, Device::Cpu));
        let epoch = self.epoch_sums.as_ref().map_or_else(zeros, |s| s.to_device(Device::Cpu));
        let window = self.sums.as_ref().map_or_else(zeros, |s| s.to_device(Device::Cpu));
        let counts = Tensor::from_slice(&[self.epoch_n as f64, self.n as f64, self.images as f64]);
        let local = Tensor::cat(&[epoch, window, counts], 0);
        crate::dist::world().all_reduce_sum(std::slice::from_ref(&local), "the monitor all-reduce")?;
        let all = Vec::<f64>::try_from(&local).map_err(Error::Torch)?;
        let k = k as usize;
        Ok(serde_json::json!({
            "epoch_sums": &all[..k], "window_sums": &all[k..2 * k],
            "epoch_n": all[2 * k] as usize, "window_n": all[2 * k + 1] as usize, "images": all[2 * k + 2] as usize,
        }))
    }

    /// Restores [`Window::state`] on rank 0 (the other ranks' sums start at zero, so the all-reduced sums are
    /// those of the interrupted run). None when the checkpoint has none (written before they were kept).
    fn restore(&mut self, state: &serde_json::Value, device: Device) -> Option<()> {
        let vec = |k: &str| -> Option<Vec<f64>> { state.get(k)?.as_array()?.iter().map(|v| v.as_f64()).collect() };
        let (epoch, window) = (vec("epoch_sums")?, vec("window_sums")?);
        if epoch.len() != Self::NAMES.len() || window.len() != Self::NAMES.len() {
            return None;
        }
        let count = |k: &str| state.get(k)?.as_u64().map(|v| v as usize);
        let (epoch_n, n, images) = (count("epoch_n")?, count("window_n")?, count("images")?);
        self.reset(true);
        if crate::dist::world().is_main() {
            let t = |v: &[f64]| Tensor::from_slice(v).to_device(device);
            self.epoch_sums = (epoch_n > 0).then(|| t(&epoch));
            self.sums = (n > 0).then(|| t(&window));
            (self.epoch_n, self.n, self.images) = (epoch_n, n, images);
        }
        Some(())
    }

    fn reset(&mut self, epoch: bool) {
        self.sums = None;
        self.n = 0;
        self.images = 0;
        self.grad_norm.clear();
        if epoch {
            self.epoch_sums = None;
            self.epoch_n = 0;
        }
    }
}

pub(crate) fn seed_for(seed: u64, epoch: usize, iter: usize) -> u64 {
    // SplitMix-style mixing, so neighbouring (epoch, iter) pairs get unrelated streams.
    let mut z = seed ^ ((epoch as u64) << 32) ^ (iter as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The Latent MIM step (reference order): EMA update of the target and the schedules at the start of each
/// optimiser step, views keyed by (seed, epoch, micro-batch), online + target encoders, decoder, loss.
impl TrainStep for Trainer {
    type Batch = Tensor;
    fn batch_len(b: &Tensor) -> usize {
        b.size()[0] as usize
    }
    fn begin_step(&mut self, t: f64) -> f64 {
        let cfg = &self.cfg;
        let lr = cfg.peak_lr();
        self.step_state = StepState {
            lr: lr_at(t, lr, lr * cfg.min_lr_frac, cfg.warmup_epochs, cfg.epochs),
            mom: momentum_at(t, cfg.model.target_mom, cfg.epochs),
            sim_target: sim_target_at(t, cfg.model.sim_init, cfg.model.sim_end, cfg.epochs),
        };
        self.model.ema_update(&self.vs, self.step_state.mom);
        self.step_state.lr
    }
    fn stage(&self, images: Tensor) -> Result<(Tensor, Ready)> {
        let (mut t, ready) = copy_ahead(&[&images], self.device)?;
        Ok((t.remove(0), ready))
    }
    fn loss(&mut self, images: Tensor, epoch: usize, iter: usize) -> Result<Tensor> {
        let images = crate::device::to_device_async(&images, self.device);
        let draw = self.view_draw(images.size()[0], epoch, iter);
        let views = views_from(&images, self.model.vit_cfg.patch_size, self.cfg.model.patch_gap, self.cfg.model.num_vis, &draw);
        let out = with_amp(self.amp, || self.model.forward(&views, self.step_state.sim_target, true));
        // The monitors stay on the device until a window is logged.
        let stats = tch::no_grad(|| Tensor::stack(&[&out.loss, &out.loss_main, &out.loss_reg, &out.avg_sim_pred, &out.avg_sim_vis, &out.avg_sim_trg, &out.target_std].map(|t| t.to_kind(Kind::Double)), 0));
        self.window.add(&stats);
        self.window.images += images.size()[0] as usize;
        Ok(out.loss)
    }
    fn optimizer(&mut self) -> &mut dyn Optimizer {
        &mut self.opt
    }
    fn what(&self) -> &'static str {
        "pretraining"
    }
}

impl Trainer {
    /// The views of micro-batch `iter` of `epoch` (`batch` images), keyed by (seed, epoch, micro-batch) so that a
    /// resumed run draws what the uninterrupted one drew; also seeds libtorch's generator for the step.
    pub fn view_draw(&self, batch: i64, epoch: usize, iter: usize) -> ViewDraw {
        let sub_seed = seed_for(self.cfg.seed, epoch, iter);
        let mut rng = ChaCha8Rng::seed_from_u64(sub_seed);
        tch::manual_seed(sub_seed as i64 & i64::MAX);
        draw_views(batch, self.model.vit_cfg.grid(), self.cfg.model.patch_gap, &mut rng)
    }

    /// The similarity target and EMA momentum of the step that [`TrainStep::begin_step`] began.
    pub fn step_targets(&self) -> (f64, f64) {
        (self.step_state.sim_target, self.step_state.mom)
    }

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
        let amp = cfg.precision.autocast(device);
        Ok(Trainer { cfg: cfg.clone(), vs, model, opt, pos: Position::default(), device, amp, dataset_hash: None, iters_per_epoch: 1, step_state: StepState::default(), window: Window::default(), resumed_window: None, resumed_sha256: None })
    }

    /// The step rule of this run (one process).
    pub fn rule(&self) -> Result<StepRule> {
        let clip = (self.cfg.clip_grad > 0.0).then_some(self.cfg.clip_grad);
        let world = crate::dist::world();
        Ok(StepRule { accum: self.cfg.accum_iter(world.size as i64)? as usize, clip, world })
    }

    /// `steps` optimiser steps on `images` (one micro-batch each) outside any epoch loop, as epoch `index`: what
    /// `bench pretrain` times. Returns the last step's loss.
    pub fn timed_steps(&mut self, images: &Tensor, steps: usize, index: usize) -> Result<f64> {
        self.iters_per_epoch = steps.max(1);
        let clip = self.rule()?.clip;
        let mut batches = std::iter::repeat_with(|| Ok(images.shallow_clone())).take(steps);
        let loss = super::step::run_steps(self, &mut batches, steps, index, clip);
        self.window.reset(true);
        loss
    }

    /// Writes model, target, optimiser state and position to `path` atomically.
    pub fn save_checkpoint(&self, path: &Path) -> Result<()> {
        self.save_checkpoint_with(path, None)
    }

    /// As [`Trainer::save_checkpoint`], with the log sums of the current window and epoch ([`Window::state`]).
    fn save_checkpoint_with(&self, path: &Path, window: Option<&serde_json::Value>) -> Result<()> {
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
        if let Some(h) = &self.dataset_hash {
            meta.insert("dataset_hash".to_string(), h.clone());
        }
        if let Some(w) = window {
            meta.insert("log_sums".to_string(), w.to_string());
        }
        checkpoint::save_checked(path, &tensors, &meta)
    }

    /// Refuses to resume from `path` when its recipe or data differ from this run's (keys named), unless `anyway`.
    pub fn check_resume(&self, path: &Path, anyway: bool) -> Result<()> {
        let ck = checkpoint::load(path)?;
        let saved: PretrainConfig = ck
            .metadata
            .get("config")
            .ok_or_else(|| Error::checkpoint(path, "no `config` metadata"))
            .and_then(|c| serde_json::from_str(c).map_err(|e| Error::checkpoint(path, format!("metadata `config` does not parse: {e}"))))?;
        let mut changed: Vec<String> = crate::config::changed_keys(&saved, &self.cfg)
            .into_iter()
            .filter(|kv| !RESUMABLE_KEYS.iter().any(|k| kv.split('=').next() == Some(k)))
            .collect();
        if let (Some(a), Some(b)) = (ck.metadata.get("dataset_hash"), &self.dataset_hash) {
            if a != b {
                changed.push("the training data (dataset fingerprint)".into());
            }
        }
        if changed.is_empty() || anyway {
            return Ok(());
        }
        Err(Error::option(
            "--resume-anyway",
            format!("{} was made with another recipe: {} differ(s); start a new --output, or pass --resume-anyway", path.display(), changed.join(", ")),
        ))
    }

    /// Restores everything [`Trainer::save_checkpoint`] wrote. A checkpoint of another model is an error.
    pub fn load_checkpoint(&mut self, path: &Path) -> Result<()> {
        let ck = checkpoint::load_checked(path)?;
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
        self.resumed_window = ck.metadata.get("log_sums").and_then(|s| serde_json::from_str(s).ok());
        self.resumed_sha256 = match ck.metadata.get(checkpoint::DATA_SHA256) {
            Some(h) => Some(h.clone()),
            None => Some(crate::fsutil::sha256_file(path)?),
        };
        Ok(())
    }

    /// Whether every model and target variable is finite (checked before a checkpoint is written, so that a
    /// diverging update never becomes the "last good" checkpoint).
    fn weights_finite(&self) -> bool {
        tch::no_grad(|| self.vs.variables().values().all(|t| t.isfinite().all().int64_value(&[]) != 0))
    }

    /// Runs until `cfg.epochs`, resuming from `self.pos`. Metric lines (means over each logging window, and over
    /// each epoch) go to `log`; the NN monitor runs on `monitor` when given.
    pub fn train(&mut self, data: &dyn BatchSource, paths: &RunPaths, log: &mut MetricsLog, monitor: Option<&NnMonitor>, quiet: bool) -> Result<PretrainSummary> {
        let cfg = self.cfg.clone();
        let rule = self.rule()?;
        let world = crate::dist::world();
        let iters_per_epoch = data.batches_per_epoch();
        self.iters_per_epoch = iters_per_epoch;
        let used_iters = rule.used_iters(iters_per_epoch);
        if used_iters == 0 {
            return Err(Error::option("batch_size", format!("the data set gives {iters_per_epoch} micro-batches per epoch, fewer than one step of {} ({} x {} x {} process(es))", cfg.batch_size, cfg.micro_batch_size, rule.accum, world.size)));
        }
        let epochs = cfg.epochs as usize;
        let total_steps = (epochs * used_iters / rule.accum) as u64;
        let bar = progress_bar(total_steps, quiet);
        bar.set_position(self.pos.step as u64);
        std::fs::create_dir_all(paths.checkpoints()).map_err(|e| Error::io(paths.checkpoints(), e))?;
        let mut last_loss = f64::NAN;
        let mut monitors = BTreeMap::new();
        let mut window_start = Instant::now();
        let run_start = Instant::now();
        let mut run_imgs = 0usize;
        let mut last_ckpt: Option<PathBuf> = paths.list_checkpoints().last().cloned();
        // Only rank 0 writes files; every rank extracts its share of the NN monitor.
        let main = world.is_main();
        let mut nn_last: Option<f64> = None;
        if self.pos.step == 0 {
            if let Some(m) = monitor.filter(|_| cfg.nn_every > 0) {
                let top1 = m.evaluate(&self.model.encoder.vit)?;
                log.log(&serde_json::json!({ "step": 0, "epoch": 0.0, "nn_top1": top1 }))?;
                nn_last = Some(top1);
            }
        }
        self.window.reset(true);
        if let Some(state) = self.resumed_window.take() {
            if self.window.restore(&state, self.device).is_none() && main {
                eprintln!("warning: the checkpoint resumed from has no usable log sums: the first window and epoch means after the resume cover only the steps run since");
            }
        }
        while self.pos.epoch < epochs {
            let epoch = self.pos.epoch;
            // Positions are global micro-batches; each rank has 1 / world of them.
            let start = self.pos.iter / world.size;
            let mut batches = data.epoch_batches(epoch, start);
            // Device values are read at the steps that log or checkpoint (and at the end of the epoch) only.
            let sync_at = |step: i64| step % cfg.log_every.max(1) == 0 || (cfg.checkpoint_every > 0 && step % cfg.checkpoint_every == 0);
            let mut on_step = |tr: &mut Trainer, ev: &StepEvent| -> Result<Flow> {
                tr.pos.iter = ev.next_iter * world.size;
                tr.pos.step = ev.step;
                if ev.epoch_end {
                    tr.pos.epoch += 1;
                    tr.pos.iter = 0;
                }
                if let Some(g) = ev.grad_norm {
                    tr.window.grad_norm.push(g);
                }
                run_imgs += ev.images;
                crate::fault::fault_point("step", ev.step)?;
                bar.inc(1);
                if let Some(l) = ev.loss {
                    last_loss = l;
                    bar.set_message(format!("epoch {epoch} loss {l:.4}{}", nn_last.map_or(String::new(), |n| format!(" nn {n:.1}"))));
                }
                if ev.step % cfg.log_every.max(1) == 0 || ev.epoch_end {
                    let secs = window_start.elapsed().as_secs_f64().max(1e-9);
                    let (means, images) = tr.window.means(false)?;
                    monitors = means;
                    let st = tr.step_state;
                    let mut line = serde_json::json!({
                        "step": ev.step, "epoch": epoch as f64 + (ev.next_iter * world.size) as f64 / iters_per_epoch as f64,
                        "lr": st.lr, "mom": st.mom, "sim_trg": st.sim_target,
                        "img_per_s": images / secs,
                    });
                    if let Some(g) = tr.window.grad_norm.last() {
                        line["grad_norm"] = serde_json::json!(g);
                    }
                    for (k, v) in &monitors {
                        line[k] = serde_json::json!(v);
                    }
                    log.log(&line)?;
                    tr.window.reset(false);
                    window_start = Instant::now();
                }
                if ev.epoch_end {
                    // The epoch means (the reference logs these) under `epoch_<name>`, apart from the window means
                    // at the same step; logged before the epoch's checkpoint, so that a run killed in between
                    // resumes from the checkpoint before and logs the line again (a resume drops later lines).
                    let mut line = serde_json::json!({ "step": tr.pos.step, "epoch": tr.pos.epoch as f64 });
                    for (k, v) in tr.window.means(true)?.0 {
                        line[format!("epoch_{k}")] = serde_json::json!(v);
                    }
                    let done = tr.pos.epoch;
                    if let Some(m) = monitor.filter(|_| cfg.nn_every > 0 && (done % cfg.nn_every == 0 || done == epochs || done == 1)) {
                        let top1 = m.evaluate(&tr.model.encoder.vit)?;
                        line["nn_top1"] = serde_json::json!(top1);
                        nn_last = Some(top1);
                    }
                    log.log(&line)?;
                }
                // A signal (SIGINT, SIGTERM) stops the run here, after a whole optimiser step, with a checkpoint.
                let stop = crate::signals::interrupted();
                if ev.epoch_end || (cfg.checkpoint_every > 0 && ev.step % cfg.checkpoint_every == 0) || stop.is_some() {
                    if !tr.weights_finite() {
                        let keep = last_ckpt.as_ref().map_or("none".to_string(), |p| p.display().to_string());
                        return Err(Error::Diverged(format!(
                            "the weights are not finite after step {} (epoch {epoch}); nothing was saved. The last good checkpoint is {keep}: resume from it with `--resume-from` and a lower blr",
                            ev.step
                        )));
                    }
                    let path = paths.checkpoint(tr.pos.step);
                    // Mid-epoch, the epoch (and window) sums so far travel with the checkpoint: every rank adds its own.
                    let window = if ev.epoch_end { None } else { Some(tr.window.state()?) };
                    if !main {
                        // Rank 0 writes; this rank waits for it on the store, outside any collective.
                        world.after_rank0_writes(&format!("checkpoint {}", tr.pos.step))?;
                        return Ok(Flow::Continue);
                    }
                    crate::fault::fault_point("checkpoint", tr.pos.step)?;
                    tr.save_checkpoint_with(&path, window.as_ref())?;
                    last_ckpt = Some(path);
                    if ev.epoch_end && cfg.save_every > 0 && tr.pos.epoch % cfg.save_every == 0 {
                        let keep = paths.permanent(tr.pos.epoch);
                        std::fs::create_dir_all(keep.parent().expect("has a parent")).map_err(|e| Error::io(&keep, e))?;
                        tr.save_checkpoint(&keep)?;
                    }
                    let all = paths.list_checkpoints();
                    for old in all.iter().take(all.len().saturating_sub(cfg.keep_last.max(1))) {
                        let _ = std::fs::remove_file(old);
                    }
                    world.after_rank0_writes(&format!("checkpoint {}", tr.pos.step))?;
                    if let Some(signal) = stop {
                        let resume = format!("stopped after step {} with checkpoint {}; run the same command again to resume from it", tr.pos.step, paths.checkpoint(tr.pos.step).display());
                        return Err(Error::Interrupted { signal, resume });
                    }
                }
                Ok(Flow::Continue)
            };
            let mut step = self.pos.step;
            let stats = run_epoch(self, rule, &mut batches, epoch, start, iters_per_epoch, &mut step, &sync_at, &mut on_step)
                .map_err(|e| match e {
                    Error::Diverged(m) if !m.contains("last good") => {
                        let keep = paths.list_checkpoints().last().map_or("none".to_string(), |p| p.display().to_string());
                        Error::Diverged(format!("{m}; stopped. The last good checkpoint is {keep}: resume from it with `--resume-from` and a lower blr"))
                    }
                    other => other,
                })?;
            if stats.stopped {
                break;
            }
            self.window.reset(true);
            if main {
                self.export_encoder(&paths.encoder())?;
            }
            world.after_rank0_writes(&format!("encoder {}", self.pos.epoch))?;
        }
        bar.finish_and_clear();
        if main {
            self.export_encoder(&paths.encoder())?;
        }
        if let Some(n) = nn_last {
            monitors.insert("nn_top1".into(), n);
        }
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

/// The leave-one-out 1-NN monitor of the reference (`main_lmim.py`): mean of the last block's patch tokens before
/// the final norm, f32 outside autocast, over the whole `val` split (the reference drops the last partial batch of
/// a shuffled distributed sampler; this uses every image, as `eval --protocol nn-loo`). Sharded as the reference's
/// `eval_knn`: every rank extracts its contiguous block of the split, rank 0 gathers the blocks into the
/// dataset-order matrix and scores it, and every rank gets the score; the same number as one process computes.
pub struct NnMonitor {
    loader: Loader,
    device: Device,
    classes: i64,
}

impl NnMonitor {
    /// None when the data root has no `val` split. Called on every rank.
    pub fn new(root: &Path, img_size: i64, workers: usize, device: Device, quiet: bool, scan: crate::data::ScanFlags) -> Result<Option<NnMonitor>> {
        if !root.join("val").is_dir() {
            return Ok(None);
        }
        let ds = Dataset::open_on_all_ranks(root, "val", scan)?;
        let classes = ds.classes.len() as i64;
        let world = crate::dist::world();
        let cfg = LoaderConfig { batch_size: 256, shuffle: false, drop_last: false, rank: world.rank, world_size: world.size, workers, quiet, pin_device: Some(device), ..Default::default() };
        Ok(Some(NnMonitor { loader: Loader::new(ds, eval_transform(img_size, 0.875)?, cfg)?, device, classes }))
    }

    /// Collective: every rank calls it at the same point and gets rank 0's score.
    pub fn evaluate(&self, vit: &VisionTransformer) -> Result<f64> {
        let world = crate::dist::world();
        let (mut feats, mut labels, mut ids) = (Vec::new(), Vec::new(), Vec::new());
        let device = self.device;
        for b in crate::device::stage_ahead(self.loader.epoch(0), |b| crate::data::loader::stage_images(b, device)) {
            let b = b?;
            let f = tch::no_grad(|| image_features(vit, &b.images, FeatureKind::AvgPrenorm, 1));
            feats.push(f.to_device(Device::Cpu));
            labels.push(b.labels);
            ids.extend(b.indices.iter().map(|&i| i as i64));
        }
        let n = self.loader.dataset().len() as i64;
        let local = (!feats.is_empty()).then(|| (Tensor::cat(&feats, 0), Tensor::from_slice(&ids), Tensor::cat(&labels, 0)));
        let gathered = crate::protocols::extract::gather_rows(world, local, n)?;
        let mut top1 = [0.0f64];
        if let Some((features, labels, filled)) = gathered {
            let Some(features) = features.filter(|_| filled > 0) else {
                return Err(Error::data(&self.loader.dataset().dir, "the val split yielded no images"));
            };
            // Rows of images that could not be read (the loader skipped them) stay out, as in one process.
            let (features, labels) = if filled as i64 == n {
                (features, labels)
            } else {
                let keep = labels.ge(0).nonzero().squeeze_dim(1);
                (features.index_select(0, &keep), labels.index_select(0, &keep))
            };
            let search = SearchConfig::auto(self.device, filled as i64);
            top1[0] = nn_loo(&features, &labels, self.classes, &search)?.top1;
        }
        // Rank 0's score to every rank (the others hold 0).
        Ok(world.sum_f64(&top1, "the NN monitor's score")?[0])
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

/// Finds the checkpoint to resume from: the newest in the run directory whose tensors match the checksum written
/// with them. A newest checkpoint that cannot be read or fails its checksum is passed over for the one before it,
/// with a warning naming both; `set_aside` (the run's writer) renames it to `*.corrupt`, so that it is kept for
/// inspection but never listed again, nor named as the last good checkpoint. None readable: an error naming the
/// newest.
pub fn latest_checkpoint(paths: &RunPaths, set_aside: bool) -> Result<Option<PathBuf>> {
    let all = paths.list_checkpoints();
    let mut first_error = None;
    for (i, p) in all.iter().enumerate().rev() {
        match checkpoint::load_checked(p) {
            Ok(_) => return Ok(Some(p.clone())),
            Err(e) => {
                let prev = i.checked_sub(1).map_or("none".to_string(), |j| all[j].display().to_string());
                eprintln!("warning: not resuming from {}: {e}; trying the previous checkpoint, {prev}", p.display());
                if set_aside {
                    let aside = p.with_extension("safetensors.corrupt");
                    if std::fs::rename(p, &aside).is_ok() {
                        eprintln!("warning: {} set aside as {}", p.display(), aside.display());
                    }
                }
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) => Err(Error::checkpoint(all.last().expect("an error means a file"), format!("no checkpoint of the run can be resumed from; the newest: {e}"))),
        None => Ok(None),
    }
}

/// Every rank of a data-parallel run must resume from the same point (node-local output folders, or a checkpoint
/// that only some ranks see, would otherwise train the ranks from different states, or meet in mismatched
/// collectives): the step and the checkpoint's checksum are compared over the store before any collective; a
/// mismatch is exit 2 on every rank, naming each rank's folder and step.
fn agree_on_resume(world: &crate::dist::World, out: &Path, resume: Option<&Path>, trainer: &Trainer) -> Result<()> {
    let (key, desc) = match resume {
        Some(p) => (
            format!("step {} (checkpoint sha256 {})", trainer.pos.step, trainer.resumed_sha256.as_deref().map_or("?", |h| &h[..h.len().min(12)])),
            format!("{}", p.display()),
        ),
        None => ("a fresh start (no checkpoint)".to_string(), format!("{} holds none", out.join("checkpoints").display())),
    };
    world.agree("the resume point", &key, &desc)
}

/// A pretraining run as the command gives it.
#[derive(Debug, Clone, Default)]
pub struct PretrainRequest {
    pub config: Option<PathBuf>,
    /// `key=value` overrides.
    pub sets: Vec<String>,
    /// Overrides the config's `data`.
    pub data: Option<PathBuf>,
    /// Default: results/runs/pretrain-<config name>.
    pub output: Option<PathBuf>,
    pub no_resume: bool,
    pub resume_from: Option<PathBuf>,
    /// Resume even when the recipe or data differ from the checkpoint's.
    pub resume_anyway: bool,
    pub quiet: bool,
    pub tensorboard: bool,
    /// `--rescan` and `--content-key`.
    pub scan: crate::data::ScanFlags,
}

struct LoaderSource(Loader);

impl BatchSource for LoaderSource {
    fn batches_per_epoch(&self) -> usize {
        self.0.global_batches()
    }
    fn epoch_batches(&self, epoch: usize, start: usize) -> Box<dyn Iterator<Item = Result<Tensor>> + '_> {
        Box::new(self.0.iter_from(epoch as u64, start).map(|b| b.map(|b| b.images)))
    }
}

/// Pretrains as `req` says (resuming from the newest checkpoint of the output folder unless told otherwise) and
/// writes the run's record into the output folder.
pub fn run(req: &PretrainRequest) -> Result<RunRecord> {
    let mut cfg: PretrainConfig = crate::config::load(req.config.as_deref(), &req.sets)?;
    if let Some(d) = &req.data {
        cfg.data = d.display().to_string();
    }
    let world = crate::dist::world();
    cfg.world_size = world.size;
    cfg.backend = world.backend.name().into();
    cfg.validate()?;
    let main = world.is_main();
    let quiet = req.quiet || !main;
    let stem = req.config.as_ref().and_then(|p| p.file_stem()).map_or("default".into(), |s| s.to_string_lossy().to_string());
    let out = req.output.clone().unwrap_or_else(|| PathBuf::from("results/runs").join(format!("pretrain-{stem}")));
    let paths = RunPaths { dir: out.clone() };
    crate::signals::set_resume_hint(format!("run the same command again to resume from the newest checkpoint in {}", paths.checkpoints().display()));
    std::fs::create_dir_all(paths.checkpoints()).map_err(|e| Error::io(paths.checkpoints(), e))?;
    // One writer per run folder (rank 0 of a data-parallel run); partial files of killed writers would otherwise
    // block the resume.
    let _lock = if main { Some(crate::fsutil::RunLock::acquire(&out)?) } else { None };
    if main {
        crate::fsutil::clean_stale_temps(&out)?;
        crate::fsutil::clean_stale_temps(&paths.checkpoints())?;
    }
    let device = crate::info::parse_device(&cfg.device)?;
    crate::fault::set_device(if world.device.is_cuda() { world.device } else { device });
    let train_size = cfg.model.train_size()? as u32;
    let root = Path::new(&cfg.data);
    // Every rank that decodes says how many threads it takes, before rank 0's first scan (which can be long).
    let (workers, workers_line) = crate::data::loader::workers_line(Some(cfg.num_workers), "num_workers=N");
    if !req.quiet {
        eprintln!("{}{workers_line}", if world.is_distributed() { format!("rank {} of {}: ", world.rank, world.size) } else { String::new() });
    }
    let dataset = Dataset::open_on_all_ranks(root, "train", req.scan)?;
    let fingerprint = serde_json::to_value(dataset.fingerprint()?).expect("fingerprint serialises");
    let dataset_hash = crate::protocols::extract::fingerprint_hash(&fingerprint);
    let mut transform = Transform::train(train_size, cfg.crop_scale_min);
    if let crate::data::Op::RandomResizedCrop { scale, .. } = &mut transform.ops[0] {
        scale.1 = cfg.crop_scale_max;
    }
    let loader_cfg = LoaderConfig { batch_size: cfg.micro_batch_size as usize, shuffle: true, drop_last: true, seed: cfg.seed, rank: world.rank, world_size: world.size, workers, quiet, pin_device: Some(device), ..Default::default() };
    let source = LoaderSource(Loader::new(dataset, transform, loader_cfg)?);

    let mut trainer = Trainer::new(&cfg, device)?;
    trainer.dataset_hash = Some(dataset_hash.clone());
    let resume = match (&req.resume_from, req.no_resume) {
        (Some(p), _) => Some(p.clone()),
        (None, false) => latest_checkpoint(&paths, main)?,
        (None, true) => {
            if let Some(p) = paths.list_checkpoints().last() {
                return Err(Error::option("--no-resume", format!("{} already holds checkpoints (newest {}); choose another --output", out.display(), p.display())));
            }
            None
        }
    };
    if let Some(p) = &resume {
        trainer.check_resume(p, req.resume_anyway)?;
        trainer.load_checkpoint(p)?;
    }
    agree_on_resume(world, &out, resume.as_deref(), &trainer)?;
    if let Some(p) = &resume {
        if trainer.pos.iter % world.size != 0 {
            return Err(Error::checkpoint(p, format!("it stopped at micro-batch {} of its epoch, which {} processes cannot split; resume it on a number of processes that divides it", trainer.pos.iter, world.size)));
        }
        if main {
            eprintln!("resuming from {} (epoch {}, step {})", p.display(), trainer.pos.epoch, trainer.pos.step);
        }
        // A finished run is not run again: it would log an empty run and append a record of it.
        if trainer.pos.epoch >= cfg.epochs as usize {
            // Unless a kill came between the last checkpoint and the export of its encoder.
            let exported = checkpoint::load(&paths.encoder()).ok().and_then(|c| c.metadata.get("step").cloned());
            if main && exported != Some(trainer.pos.step.to_string()) {
                trainer.export_encoder(&paths.encoder())?;
            }
            // Opening the log drops a line that a kill cut short (nothing is appended).
            if main {
                MetricsLog::open(&out, "metrics.jsonl", false)?;
            }
            let mut rec = RunRecord::new("pretrain", "lmim-2", "final_loss");
            rec.model_name = out.file_name().map_or("pretrain".into(), |s| s.to_string_lossy().to_string());
            rec.metrics.insert("steps".into(), trainer.pos.step as f64);
            rec.checkpoint = Some(paths.encoder().display().to_string());
            rec.details = serde_json::json!({ "finished_already": true, "epochs": cfg.epochs, "last_checkpoint": p });
            return Ok(rec);
        }
    }
    // Every rank starts from rank 0's weights (and checks that it does).
    let mut named: Vec<(String, Tensor)> = trainer.vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    world.sync_parameters(&named)?;
    if main {
        crate::config::save(&cfg, &paths.config())?;
    }
    let monitor = NnMonitor::new(root, trainer.model.vit_cfg.img_size, workers, device, quiet, req.scan)?;
    if !quiet {
        eprintln!(
            "pretraining {} on {} ({}{}), batch {} = {} x {} accumulated x {} process(es), lr {:.3e}, {} epochs -> {}",
            trainer.model.vit_cfg.arch,
            cfg.data,
            crate::info::device_name(device),
            if world.is_distributed() { format!(", {} x {} via {}", world.size, world.backend.name(), world.launcher.name()) } else { String::new() },
            cfg.batch_size,
            cfg.micro_batch_size,
            cfg.accum_iter(world.size as i64)?,
            world.size,
            cfg.peak_lr(),
            cfg.epochs,
            out.display()
        );
    }
    let started = crate::results::now_rfc3339();
    let t0 = Instant::now();
    if main && resume.is_some() {
        // A kill after the last checkpoint left lines that the resume writes again.
        crate::results::metrics_log::drop_lines_after_step(&paths.metrics(), trainer.pos.step)?;
    }
    let mut log = if main { MetricsLog::open(&out, "metrics.jsonl", req.tensorboard)? } else { MetricsLog::discard()? };
    log.text("config", &toml::to_string_pretty(&cfg).unwrap_or_default())?;
    // In one process a signal stops the run after the current step, with a checkpoint; ranks of a data-parallel
    // run cannot agree on that step, so there the signal stops them at once (at the last checkpoint).
    let safe_points = (world.size == 1).then(crate::signals::safe_points);
    let mut summary = trainer.train(&source, &paths, &mut log, monitor.as_ref(), quiet)?;
    drop(safe_points);
    summary.resumed_from = resume.map(|p| p.display().to_string());

    let mut rec = RunRecord::new("pretrain", "lmim-2", "final_loss");
    rec.metrics.insert("final_loss".into(), summary.final_loss);
    rec.metrics.insert("img_per_s".into(), summary.img_per_s);
    rec.metrics.insert("steps".into(), summary.steps as f64);
    rec.metrics.extend(summary.final_monitors.clone());
    rec.metrics.retain(|_, v| v.is_finite());
    rec.model_name = out.file_name().map_or("pretrain".into(), |s| s.to_string_lossy().to_string());
    rec.checkpoint = Some(summary.encoder.clone());
    rec.checkpoint_sha256 = if main { Some(checkpoint::sha256_file(&paths.encoder())?) } else { None };
    rec.arch = Some(trainer.model.vit_cfg.arch.clone());
    rec.dataset = Some(cfg.data.clone());
    rec.dataset_fingerprint = Some(crate::protocols::record::combined_fingerprint(&[crate::protocols::record::SplitPrint {
        role: "train".into(),
        fingerprint,
        hash: dataset_hash,
    }]));
    rec.config = serde_json::to_value(&cfg).expect("config serialises");
    rec.config["accum_iter"] = serde_json::json!(cfg.accum_iter(world.size as i64)?);
    rec.config["launcher"] = serde_json::json!(world.launcher.name());
    rec.seed = cfg.seed;
    rec.provenance = Provenance::current(&crate::info::device_name(device));
    rec.started_at = started;
    rec.duration_s = t0.elapsed().as_secs_f64();
    rec.details = serde_json::to_value(&summary).expect("summary serialises");
    if main {
        rec.write(&out)?;
    }
    Ok(rec)
}
