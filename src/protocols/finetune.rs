//! Full fine-tuning with MAE's recipe (`facebookresearch/mae:main_finetune.py`): AdamW with layer-wise lr decay
//! (`util/lr_decay.py:param_groups_lrd`), linear warmup from 0 then cosine to `min_lr` set per iteration
//! (`util/lr_sched.py`), drop path ramped linearly over the blocks, global average pooling of the last block's
//! patch tokens with `fc_norm` and no final `norm` (`models_vit.py`, `global_pool=True`), a fresh head with
//! trunc-normal(2e-5) weights, Mixup/CutMix with label smoothing and soft-target cross entropy, RandAugment and
//! RandomErasing in the shared loader, gradient accumulation and bf16 on CUDA. The step is the shared skeleton of
//! `train::step`; a run keeps its state in a run folder so that a killed run resumes.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use super::record::{RecordBuilder, SplitPrint};
use super::{EvalRequest, Protocol, RunOptions};
use crate::checkpoint::{load_into, sha256_file, LoadReport};
use crate::config::Rule;
use crate::data::augment::{mixup_cutmix, MixupConfig, RandAugment, RandomErasing};
use crate::data::loader::{stage_batch, Batch, Loader};
use crate::data::transforms::Transform;
use crate::error::{Error, Result};
use crate::model::vit::{with_amp, GlobalPool};
use crate::model::{VisionTransformer, VitConfig};
use crate::results::metrics_log::MetricsLog;
use crate::results::RunRecord;
use crate::device::Ready;
use crate::train::optim::{AdamW, Param};
use crate::train::schedule::lr_at_from_zero;
use crate::train::step::{evaluate_topk, run_epoch, Flow, Optimizer, StepRule, TrainStep};

/// The fine-tuning recipe. Defaults are MAE's ViT-B/16 command (`FINETUNE.md`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct FinetuneConfig {
    pub version: String,
    pub epochs: usize,
    pub warmup_epochs: f64,
    /// Base lr; the lr is `blr * effective_batch / 256` unless `lr` is given.
    pub blr: f64,
    pub lr: Option<f64>,
    /// Global batch per optimiser step, reached by accumulating `micro_batch_size` batches.
    pub batch_size: usize,
    pub micro_batch_size: usize,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub layer_decay: f64,
    pub drop_path: f64,
    pub min_lr: f64,
    pub smoothing: f64,
    pub mixup: f64,
    pub cutmix: f64,
    pub mixup_prob: f64,
    pub mixup_switch_prob: f64,
    pub reprob: f64,
    /// timm RandAugment policy; empty turns it off.
    pub randaug: String,
    /// `avg` (mean of the last block's patch tokens + `fc_norm`, no final norm) or `token` (CLS after the norm).
    pub global_pool: GlobalPool,
    pub model_ema: bool,
    /// timm `ModelEma` decay, applied after every optimiser step; the EMA model is evaluated beside the model.
    pub model_ema_decay: f64,
    /// Gradient clipping (MAE's `--clip_grad`, off by default).
    pub clip_grad: Option<f64>,
    /// Eval crop = model image size; resize = int(size / crop_pct) (timm's 0.875).
    pub crop_pct: f64,
    pub seed: u64,
    pub eval_every: usize,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        FinetuneConfig {
            version: "mae-finetune-2".into(),
            epochs: 100,
            warmup_epochs: 5.0,
            blr: 5e-4,
            lr: None,
            batch_size: 1024,
            micro_batch_size: 128,
            weight_decay: 0.05,
            beta1: 0.9,
            beta2: 0.999,
            layer_decay: 0.65,
            drop_path: 0.1,
            min_lr: 1e-6,
            smoothing: 0.1,
            mixup: 0.8,
            cutmix: 1.0,
            mixup_prob: 1.0,
            mixup_switch_prob: 0.5,
            reprob: 0.25,
            randaug: "rand-m9-mstd0.5-inc1".into(),
            global_pool: GlobalPool::Avg,
            model_ema: false,
            model_ema_decay: 0.9999,
            clip_grad: None,
            crop_pct: 0.875,
            seed: 0,
            eval_every: 1,
        }
    }
}

impl crate::config::Recipe for FinetuneConfig {
    fn rules() -> Vec<Rule> {
        vec![
            Rule::int("epochs", 1, 1 << 20),
            // Not bounded by `epochs`: MAE's schedule (util/lr_sched.py) only ramps up when a short run, such as
            // `--set epochs=1` over the recipe, ends inside the warmup.
            Rule::real("warmup_epochs", 0.0, 1e6),
            Rule::above("blr", 0.0, 10.0),
            Rule::above("lr", 0.0, 10.0),
            Rule::int("batch_size", 1, 1 << 24),
            Rule::int("micro_batch_size", 1, 65536).at_most("batch_size"),
            Rule::real("weight_decay", 0.0, 10.0),
            Rule::below("beta1", 0.0, 1.0),
            Rule::below("beta2", 0.0, 1.0),
            Rule::above("layer_decay", 0.0, 1.0),
            Rule::below("drop_path", 0.0, 1.0),
            Rule::real("min_lr", 0.0, 10.0),
            Rule::below("smoothing", 0.0, 1.0),
            // Beta-distribution alphas.
            Rule::real("mixup", 0.0, 100.0),
            Rule::real("cutmix", 0.0, 100.0),
            Rule::real("mixup_prob", 0.0, 1.0),
            Rule::real("mixup_switch_prob", 0.0, 1.0),
            Rule::real("reprob", 0.0, 1.0),
            Rule::real("model_ema_decay", 0.0, 1.0),
            Rule::above("clip_grad", 0.0, 1e6),
            Rule::above("crop_pct", 0.0, 1.0),
            Rule::int("seed", 0, i64::MAX),
            Rule::int("eval_every", 0, 1 << 20),
        ]
    }
}

impl FinetuneConfig {
    /// The table of every numeric key, the accumulation over this run's processes and the RandAugment policy.
    pub fn validate(&self) -> Result<()> {
        crate::config::check_rules(self)?;
        crate::train::accum_for(self.batch_size as i64, self.micro_batch_size as i64, crate::dist::world().size as i64)?;
        if !self.randaug.is_empty() {
            RandAugment::parse(&self.randaug).map_err(|e| Error::option("randaug", e))?;
        }
        Ok(())
    }

    pub fn accum_iter(&self) -> usize {
        crate::train::accum_for(self.batch_size as i64, self.micro_batch_size as i64, crate::dist::world().size as i64).unwrap_or(1) as usize
    }

    /// Absolute lr: `lr`, else `blr * batch_size / 256`.
    pub fn lr(&self) -> f64 {
        self.lr.unwrap_or_else(|| crate::train::scaled_lr(self.blr, self.batch_size as i64))
    }

    /// RandAugment and RandomErasing of the recipe.
    pub fn augmentations(&self) -> Result<(Option<RandAugment>, Option<RandomErasing>)> {
        let randaug = if self.randaug.is_empty() { None } else { Some(RandAugment::parse(&self.randaug).map_err(|e| Error::option("randaug", e))?) };
        let erasing = (self.reprob > 0.0).then(|| RandomErasing { probability: self.reprob, ..Default::default() });
        Ok((randaug, erasing))
    }

    /// timm's Mixup/CutMix settings of this recipe.
    pub fn mixup_config(&self, num_classes: i64) -> MixupConfig {
        MixupConfig {
            mixup_alpha: self.mixup,
            cutmix_alpha: self.cutmix,
            prob: self.mixup_prob,
            switch_prob: self.mixup_switch_prob,
            label_smoothing: self.smoothing,
            num_classes,
        }
    }

    pub fn mixup_active(&self) -> bool {
        self.mixup_prob > 0.0 && (self.mixup > 0.0 || self.cutmix > 0.0)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Layer-wise lr decay.

/// MAE's `get_layer_id_for_vit`: 0 for the embeddings, i+1 for `blocks.i`, `num_layers` (= depth + 1) otherwise.
pub fn layer_id_for_vit(name: &str, num_layers: i64) -> i64 {
    if name == "cls_token" || name == "pos_embed" || name.starts_with("patch_embed") {
        0
    } else if let Some(rest) = name.strip_prefix("blocks.") {
        rest.split('.').next().and_then(|i| i.parse::<i64>().ok()).map_or(num_layers, |i| i + 1)
    } else {
        num_layers
    }
}

/// The optimiser settings of one parameter under `param_groups_lrd`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LrdGroup {
    pub name: String,
    pub layer_id: i64,
    pub lr_scale: f64,
    pub weight_decay: f64,
}

/// MAE's `param_groups_lrd(model, weight_decay, no_weight_decay_list=model.no_weight_decay(), layer_decay)` over
/// (name, shape) pairs: no decay for 1-d tensors and for `cls_token`/`pos_embed`/`dist_token` (timm's
/// `no_weight_decay`), lr scale `layer_decay ^ (num_layers - layer_id)`.
pub fn param_groups_lrd(params: &[(String, Vec<i64>)], depth: i64, weight_decay: f64, layer_decay: f64) -> Vec<LrdGroup> {
    let num_layers = depth + 1;
    params
        .iter()
        .map(|(name, shape)| {
            let no_wd = shape.len() == 1 || matches!(name.as_str(), "cls_token" | "pos_embed" | "dist_token");
            let layer_id = layer_id_for_vit(name, num_layers);
            LrdGroup {
                name: name.clone(),
                layer_id,
                lr_scale: layer_decay.powi((num_layers - layer_id) as i32),
                weight_decay: if no_wd { 0.0 } else { weight_decay },
            }
        })
        .collect()
}

/// AdamW parameters of a fine-tuned ViT: every variable of `vs` (the position embedding is made trainable, as in
/// timm's fine-tuning), sorted by name, with layer-decay settings.
pub fn finetune_params(vs: &nn::VarStore, depth: i64, cfg: &FinetuneConfig) -> Vec<Param> {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let shapes: Vec<(String, Vec<i64>)> = vars.iter().map(|(n, t)| (n.clone(), t.size())).collect();
    let groups = param_groups_lrd(&shapes, depth, cfg.weight_decay, cfg.layer_decay);
    vars.into_iter()
        .zip(groups)
        .map(|((name, tensor), g)| {
            let tensor = if tensor.requires_grad() { tensor } else { tensor.set_requires_grad(true) };
            Param { name, tensor, weight_decay: g.weight_decay, lr_scale: g.lr_scale }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------------------------
// Model.

/// A classifier ready to fine-tune, with what loading reported (None for a random init).
pub struct FinetuneModel {
    pub vs: nn::VarStore,
    pub model: VisionTransformer,
    pub cfg: VitConfig,
    pub report: Option<LoadReport>,
}

/// Builds the classifier: from a checkpoint (any format and family layout `checkpoint::import` reads, detected;
/// its head and `fc_norm` are dropped) or
/// fresh from `arch`; drop path and pooling from the recipe; MAE's head init (trunc-normal std 2e-5, bias 0).
pub fn build_model(ckpt: Option<&Path>, arch: Option<&str>, num_classes: i64, cfg: &FinetuneConfig, device: Device) -> Result<FinetuneModel> {
    let (mut vcfg, loaded) = match ckpt {
        Some(path) => {
            let imported = crate::checkpoint::import(path, &crate::checkpoint::LoadOptions::arch(arch))?;
            let (mut c, vcfg) = (imported.ckpt, imported.cfg);
            c.tensors.retain(|(n, _)| !n.starts_with("head.") && !n.starts_with("fc_norm."));
            (vcfg, Some(c))
        }
        None => {
            let a = arch.ok_or_else(|| Error::option("--arch", "an architecture is needed when no checkpoint is given"))?;
            (VitConfig::from_arch(a)?, None)
        }
    };
    vcfg.num_classes = num_classes;
    vcfg.global_pool = cfg.global_pool;
    vcfg.drop_path_rate = cfg.drop_path;
    vcfg.drop_path_uniform = false;
    let vs = nn::VarStore::new(device);
    let model = VisionTransformer::new(&vs.root(), &vcfg);
    let report = match &loaded {
        Some(c) => Some(load_into(&vs, c, &["head.", "fc_norm."])?),
        None => None,
    };
    tch::no_grad(|| {
        let head = model.head.as_ref().expect("built with a head");
        // timm's trunc_normal_(std=2e-5) truncates at +-2 (absolute), i.e. never at this std.
        let w = Tensor::randn(head.ws.size(), (Kind::Float, device)) * 2e-5;
        let mut ws = head.ws.shallow_clone();
        ws.copy_(&w);
        if let Some(b) = &head.bs {
            let _ = b.shallow_clone().zero_();
        }
        if let Some(fc) = &model.fc_norm {
            if let Some(w) = &fc.ws {
                let _ = w.shallow_clone().fill_(1.0);
            }
            if let Some(b) = &fc.bs {
                let _ = b.shallow_clone().zero_();
            }
        }
    });
    Ok(FinetuneModel { vs, model, cfg: vcfg, report })
}

// ---------------------------------------------------------------------------------------------------------------
// Loss and evaluation.

/// timm's `SoftTargetCrossEntropy`: mean over the batch of `sum(-target * log_softmax(logits))`.
pub fn soft_target_ce(logits: &Tensor, target: &Tensor) -> Tensor {
    (-target * logits.log_softmax(-1, Kind::Float)).sum_dim_intlist(-1, false, Kind::Float).mean(Kind::Float)
}

/// timm's `LabelSmoothingCrossEntropy(smoothing)`: `(1-s) * nll + s * mean(-log_softmax)`.
pub fn label_smoothing_ce(logits: &Tensor, labels: &Tensor, smoothing: f64) -> Tensor {
    let logp = logits.log_softmax(-1, Kind::Float);
    let nll = -logp.gather(1, &labels.unsqueeze(1), false).squeeze_dim(1);
    let smooth = -logp.mean_dim(-1, false, Kind::Float);
    (nll * (1.0 - smoothing) + smooth * smoothing).mean(Kind::Float)
}

/// Top-1 / top-5 (percent) of a classifier over a loader's epoch 0.
pub fn evaluate(model: &VisionTransformer, val: &Loader, device: Device, amp: Option<Kind>) -> Result<(f64, f64)> {
    let batches = val.epoch(0).map(|b| b.map(|b| (b.images, b.labels)));
    evaluate_topk(crate::dist::world(), device, batches, &val.dataset().dir, |x| with_amp(amp, || model.forward(x, false)))
}

// ---------------------------------------------------------------------------------------------------------------
// Training.


/// Where a run keeps its state. With `output_dir`, a checkpoint `finetune-last.safetensors` (model, optimizer,
/// EMA, epoch, step, history, the source checkpoint's sha256) is written atomically after every epoch and the
/// fine-tuned classifier is exported as `finetuned.safetensors` (timm names, `arch`/`config` metadata) at the end;
/// `resume` continues from the checkpoint when it exists. Resuming is exact at epoch boundaries: the data order
/// and every augmentation are keyed by (seed, epoch, sample), Mixup and drop path by (seed, epoch, micro-batch).
#[derive(Debug, Clone, Default)]
pub struct FinetuneOptions {
    pub output_dir: Option<PathBuf>,
    pub resume: bool,
    /// Stop (after checkpointing) once this many epochs are done, e.g. to split a run over time-limited jobs;
    /// the schedule still spans `cfg.epochs`, and nothing is exported.
    pub stop_after_epochs: Option<usize>,
}

pub const CHECKPOINT_NAME: &str = "finetune-last.safetensors";
pub const EXPORT_NAME: &str = "finetuned.safetensors";

#[derive(Debug, Clone, Serialize)]
pub struct FinetuneResult {
    /// Last evaluation.
    pub top1: f64,
    pub top5: f64,
    pub best_top1: f64,
    pub best_epoch: usize,
    pub history: Vec<BTreeMap<String, f64>>,
    pub steps: i64,
    pub arch: String,
    pub num_classes: i64,
    pub lr: f64,
    pub accum_iter: usize,
    pub device: String,
    pub precision: String,
    pub checkpoint: Option<PathBuf>,
    pub load_report: Option<LoadReport>,
    /// Last / best top-1 of the EMA model (with `model_ema`).
    pub ema_top1: Option<f64>,
    pub ema_best_top1: Option<f64>,
    /// The epoch a resumed run started from.
    pub resumed_from_epoch: Option<usize>,
    pub exported: Option<PathBuf>,
    pub skipped_files: usize,
    /// The files skipped (training split; the val split with `--skip-bad`).
    pub skipped_paths: Vec<PathBuf>,
    /// The val files among them (`--skip-bad`): the score covers the rest of the split.
    pub skipped_eval: Vec<PathBuf>,
}

/// Exponential moving average of all model variables (timm's `ModelEma`), held in a second model for evaluation.
pub struct Ema {
    pub vs: nn::VarStore,
    pub model: VisionTransformer,
    pub decay: f64,
}

impl Ema {
    pub fn new(src: &FinetuneModel, decay: f64, device: Device) -> Result<Self> {
        let mut vs = nn::VarStore::new(device);
        let model = VisionTransformer::new(&vs.root(), &src.cfg);
        vs.copy(&src.vs)?;
        vs.freeze();
        Ok(Ema { vs, model, decay })
    }

    /// `ema = decay * ema + (1 - decay) * model`, variable by variable.
    pub fn update(&mut self, src: &nn::VarStore) {
        let from = src.variables();
        tch::no_grad(|| {
            for (name, e) in self.vs.variables() {
                if let Some(m) = from.get(&name) {
                    let _ = e.shallow_clone().lerp_(m, 1.0 - self.decay);
                }
            }
        });
    }
}

/// Evaluation results carried through a run (and its checkpoints).
#[derive(Debug, Clone)]
struct Progress {
    epoch: usize,
    steps: i64,
    best: f64,
    best_epoch: usize,
    last: (f64, f64),
    ema_best: f64,
    ema_last: Option<f64>,
    history: Vec<BTreeMap<String, f64>>,
}

fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// A fine-tuning run, set up: model, optimiser, EMA, data, and the state of the step.
pub struct Finetuner {
    pub fm: FinetuneModel,
    pub opt: AdamW,
    pub ema: Option<Ema>,
    pub cfg: FinetuneConfig,
    pub device: Device,
    amp: Option<Kind>,
    mix: MixupConfig,
    source_sha256: Option<String>,
}

/// The fine-tuning step: Mixup/CutMix (or label smoothing), forward with drop path, the recipe's loss; the model
/// EMA after each optimiser step.
impl TrainStep for Finetuner {
    type Batch = Batch;
    fn batch_len(b: &Batch) -> usize {
        b.indices.len()
    }
    fn begin_step(&mut self, t: f64) -> f64 {
        lr_at_from_zero(t, self.cfg.lr(), self.cfg.min_lr, self.cfg.warmup_epochs, self.cfg.epochs as f64)
    }
    fn stage(&self, b: Batch) -> Result<(Batch, Ready)> {
        stage_batch(b, self.device)
    }
    fn loss(&mut self, b: Batch, epoch: usize, iter: usize) -> Result<Tensor> {
        let (x, y) = (crate::device::to_device_async(&b.images, self.device), crate::device::to_device_async(&b.labels, self.device));
        let (model, amp, cfg) = (&self.fm.model, self.amp, &self.cfg);
        // Drop path draws from torch's generator, keyed by the micro-batch's place in the run (not a running
        // stream), so a resumed or data-parallel run draws the same.
        tch::manual_seed((crate::train::pretrain::seed_for(cfg.seed ^ 0xD509_7A7E, epoch, iter) & i64::MAX as u64) as i64);
        Ok(if cfg.mixup_active() {
            let mut rng = mix_rng(cfg.seed, epoch, iter);
            let (xm, target, _) = mixup_cutmix(&x, &y, &self.mix, &mut rng);
            soft_target_ce(&with_amp(amp, || model.forward(&xm, true)), &target)
        } else {
            let logits = with_amp(amp, || model.forward(&x, true));
            if cfg.smoothing > 0.0 {
                label_smoothing_ce(&logits, &y, cfg.smoothing)
            } else {
                logits.cross_entropy_for_logits(&y)
            }
        })
    }
    fn optimizer(&mut self) -> &mut dyn Optimizer {
        &mut self.opt
    }
    fn end_step(&mut self) {
        if let Some(e) = self.ema.as_mut() {
            e.update(&self.fm.vs);
        }
    }
    fn what(&self) -> &'static str {
        "fine-tuning"
    }
}

/// Mixup/CutMix draws of one micro-batch, keyed by its place in the run rather than by a running stream.
fn mix_rng(seed: u64, epoch: usize, iter: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x00A1_1C0D);
    rng.set_stream(((epoch as u64) << 32) | iter as u64);
    rng
}

impl Finetuner {
    /// Builds the classifier (from `ckpt`, or a random init of `arch`) for `num_classes`, its optimiser and EMA.
    pub fn new(ckpt: Option<&Path>, arch: Option<&str>, num_classes: i64, cfg: &FinetuneConfig, device: Device, precision: crate::config::Precision) -> Result<Self> {
        cfg.validate()?;
        tch::manual_seed(cfg.seed as i64);
        let fm = build_model(ckpt, arch, num_classes, cfg, device)?;
        let opt = AdamW::new(finetune_params(&fm.vs, fm.cfg.depth, cfg), cfg.beta1, cfg.beta2, 1e-8);
        let ema = if cfg.model_ema { Some(Ema::new(&fm, cfg.model_ema_decay, device)?) } else { None };
        let source_sha256 = ckpt.map(sha256_file).transpose()?;
        Ok(Finetuner { fm, opt, ema, cfg: cfg.clone(), device, amp: precision.autocast(device), mix: cfg.mixup_config(num_classes), source_sha256 })
    }

    pub fn rule(&self) -> StepRule {
        StepRule { accum: self.cfg.accum_iter(), clip: self.cfg.clip_grad, world: crate::dist::world() }
    }

    /// One epoch of training; returns the mean loss and the last lr.
    fn train_epoch(&mut self, train: &Loader, epoch: usize, steps: &mut i64) -> Result<(f64, f64)> {
        self.opt.zero_grad();
        let per_epoch = train.global_batches();
        let mut batches = train.epoch(epoch as u64);
        let rule = self.rule();
        let st = run_epoch(self, rule, &mut batches, epoch, 0, per_epoch, steps, &|_| false, &mut |_, _| Ok(Flow::Continue))?;
        Ok((st.mean_loss(), st.lr))
    }

    fn save_state(&self, path: &Path, p: &Progress) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> = self.fm.vs.variables().into_iter().map(|(n, t)| (format!("model.{n}"), t)).collect();
        tensors.extend(self.opt.state().into_iter().map(|(n, t)| (format!("optim.{n}"), t)));
        if let Some(e) = &self.ema {
            tensors.extend(e.vs.variables().into_iter().map(|(n, t)| (format!("ema.{n}"), t)));
        }
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let meta = BTreeMap::from([
            ("format".to_string(), "lmim-bench-finetune".to_string()),
            ("finetune_config".to_string(), serde_json::to_string(&self.cfg).expect("json")),
            ("config".to_string(), serde_json::to_string(&self.fm.cfg).expect("json")),
            ("arch".to_string(), self.fm.cfg.arch.clone()),
            ("source_sha256".to_string(), self.source_sha256.clone().unwrap_or_default()),
            ("epoch".to_string(), p.epoch.to_string()),
            ("step".to_string(), p.steps.to_string()),
            // JSON has no -inf: "not evaluated yet" is stored as null.
            ("best".to_string(), serde_json::to_string(&(finite(p.best), p.best_epoch, p.last, finite(p.ema_best), p.ema_last)).expect("json")),
            ("history".to_string(), serde_json::to_string(&p.history).expect("json")),
        ]);
        crate::checkpoint::save(path, &tensors, &meta)
    }

    fn load_state(&mut self, path: &Path) -> Result<Progress> {
        let ck = crate::checkpoint::load(path)?;
        let bad = |r: String| Error::checkpoint(path, r);
        let saved: FinetuneConfig = serde_json::from_str(ck.metadata.get("finetune_config").ok_or_else(|| bad("no `finetune_config` metadata".into()))?)
            .map_err(|e| bad(format!("bad `finetune_config`: {e}")))?;
        // Only the epoch count may grow on resume.
        let changed: Vec<String> = crate::config::changed_keys(&saved, &self.cfg).into_iter().filter(|k| !k.starts_with("epochs=")).collect();
        if !changed.is_empty() {
            return Err(bad(format!("the run was made with a different fine-tuning recipe ({}); use --fresh or another --output", changed.join(", "))));
        }
        let src = ck.metadata.get("source_sha256").cloned().unwrap_or_default();
        if src != self.source_sha256.clone().unwrap_or_default() {
            return Err(bad("the run fine-tunes another source checkpoint (sha256 differs); use --fresh or another --output".into()));
        }
        let sub = |prefix: &str| crate::checkpoint::Checkpoint {
            tensors: ck.tensors.iter().filter_map(|(n, t)| n.strip_prefix(prefix).map(|s| (s.to_string(), t.shallow_clone()))).collect(),
            metadata: BTreeMap::new(),
            path: path.to_path_buf(),
        };
        load_into(&self.fm.vs, &sub("model."), &[])?;
        if let Some(e) = &self.ema {
            load_into(&e.vs, &sub("ema."), &[])?;
        }
        let num = |k: &str| ck.metadata.get(k).and_then(|v| v.parse::<i64>().ok()).ok_or_else(|| bad(format!("no `{k}` metadata")));
        let (epoch, steps) = (num("epoch")? as usize, num("step")?);
        let optim = sub("optim.");
        self.opt.load_state(|k| optim.get(k).map(|t| t.shallow_clone()), steps).map_err(bad)?;
        type Best = (Option<f64>, usize, (f64, f64), Option<f64>, Option<f64>);
        let (best, best_epoch, last, ema_best, ema_last): Best =
            serde_json::from_str(ck.metadata.get("best").map_or("", |s| s)).map_err(|e| bad(format!("bad `best`: {e}")))?;
        let history = serde_json::from_str(ck.metadata.get("history").map_or("", |s| s)).map_err(|e| bad(format!("bad `history`: {e}")))?;
        let (best, ema_best) = (best.unwrap_or(f64::NEG_INFINITY), ema_best.unwrap_or(f64::NEG_INFINITY));
        Ok(Progress { epoch, steps, best, best_epoch, last, ema_best, ema_last, history })
    }

    /// Evaluates the model (and its EMA) into the epoch's log entry.
    fn evaluate_into(&self, val: &Loader, p: &mut Progress, entry: &mut BTreeMap<String, f64>, epoch: usize) -> Result<()> {
        p.last = evaluate(&self.fm.model, val, self.device, self.amp)?;
        entry.insert("val_top1".into(), p.last.0);
        entry.insert("val_top5".into(), p.last.1);
        if p.last.0 > p.best {
            p.best = p.last.0;
            p.best_epoch = epoch + 1;
        }
        if let Some(e) = &self.ema {
            let (t1, t5) = evaluate(&e.model, val, self.device, self.amp)?;
            entry.insert("ema_val_top1".into(), t1);
            entry.insert("ema_val_top5".into(), t5);
            p.ema_last = Some(t1);
            p.ema_best = p.ema_best.max(t1);
        }
        Ok(())
    }
}

/// The train loader (RandomResizedCrop, flip, RandAugment, normalisation, RandomErasing) and the eval loader.
pub fn loaders(data_root: &Path, size: u32, cfg: &FinetuneConfig, run: &RunOptions) -> Result<(Loader, Loader)> {
    let (train_ds, val_ds) = super::open_splits(data_root, run)?;
    let (randaug, erasing) = cfg.augmentations()?;
    let train = super::train_loader(train_ds, Transform::finetune_train(size, randaug, erasing), cfg.micro_batch_size, cfg.seed, run)?;
    let resize = (size as f64 / cfg.crop_pct) as u32;
    let val = super::eval_loader(val_ds, Transform::eval(resize, size), cfg.micro_batch_size, run, true)?;
    Ok((train, val))
}

/// Fine-tunes a ViT on `data_root/{train,val}` with the recipe `cfg`: from `model_ckpt` (head made fresh), or
/// from a random init of `arch` when no checkpoint is given; checkpoints, resume and export as `opts` say. `log`
/// gets one JSON object per epoch. Returns the result and the fine-tuned model.
pub fn run_finetune_with(
    model_ckpt: Option<&Path>,
    arch: Option<&str>,
    data_root: &Path,
    cfg: &FinetuneConfig,
    run: &RunOptions,
    opts: &FinetuneOptions,
    mut log: impl FnMut(&serde_json::Value) -> Result<()>,
) -> Result<(FinetuneResult, FinetuneModel)> {
    cfg.validate()?;
    let device = run.device()?;
    let precision = run.precision.unwrap_or_default();
    let classes = super::open_splits(data_root, run)?.0.classes.len() as i64;
    let mut ft = Finetuner::new(model_ckpt, arch, classes, cfg, device, precision)?;
    let (train, val) = loaders(data_root, ft.fm.cfg.img_size as u32, cfg, run)?;
    if ft.rule().used_iters(train.global_batches()) == 0 {
        return Err(Error::data(data_root, format!("the train split gives fewer micro-batches of {} than one step of {}", cfg.micro_batch_size, cfg.batch_size)));
    }
    let ckpt_path = opts.output_dir.as_ref().map(|d| d.join(CHECKPOINT_NAME));
    let mut p = Progress { epoch: 0, steps: 0, best: f64::NEG_INFINITY, best_epoch: 0, last: (0.0, 0.0), ema_best: f64::NEG_INFINITY, ema_last: None, history: Vec::new() };
    let mut resumed_from_epoch = None;
    if let Some(path) = ckpt_path.as_ref().filter(|p| opts.resume && p.exists()) {
        p = ft.load_state(path)?;
        resumed_from_epoch = Some(p.epoch);
    }
    let world = crate::dist::world();
    let mut named: Vec<(String, Tensor)> = ft.fm.vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    world.sync_parameters(&named)?;
    for epoch in p.epoch..cfg.epochs {
        let (loss, lr) = ft.train_epoch(&train, epoch, &mut p.steps)?;
        let mut entry = BTreeMap::from([
            ("epoch".to_string(), epoch as f64 + 1.0),
            ("loss".to_string(), loss),
            ("lr".to_string(), lr),
            ("step".to_string(), p.steps as f64),
        ]);
        if (epoch + 1) % cfg.eval_every.max(1) == 0 || epoch + 1 == cfg.epochs {
            ft.evaluate_into(&val, &mut p, &mut entry, epoch)?;
        }
        log(&serde_json::to_value(&entry).expect("json"))?;
        p.history.push(entry);
        p.epoch = epoch + 1;
        if let Some(path) = ckpt_path.as_ref().filter(|_| world.is_main()) {
            ft.save_state(path, &p)?;
        }
        if opts.stop_after_epochs.is_some_and(|n| p.epoch >= n) {
            break;
        }
    }
    let exported = match &opts.output_dir {
        Some(dir) if p.epoch >= cfg.epochs && world.is_main() => {
            let path = dir.join(EXPORT_NAME);
            let meta = BTreeMap::from([("finetune_config".to_string(), serde_json::to_string(cfg).expect("json"))]);
            crate::checkpoint::save_vit(&path, &ft.fm.vs, &ft.fm.cfg, &meta)?;
            Some(path)
        }
        _ => None,
    };
    let result = FinetuneResult {
        top1: p.last.0,
        top5: p.last.1,
        best_top1: p.best,
        best_epoch: p.best_epoch,
        history: p.history,
        steps: p.steps,
        arch: ft.fm.cfg.arch.clone(),
        num_classes: classes,
        lr: cfg.lr(),
        accum_iter: cfg.accum_iter(),
        device: crate::info::device_name(device),
        precision: precision.effective(device).into(),
        checkpoint: model_ckpt.map(Path::to_path_buf),
        load_report: ft.fm.report.clone(),
        ema_top1: p.ema_last,
        ema_best_top1: ft.ema.as_ref().map(|_| p.ema_best),
        resumed_from_epoch,
        exported,
        skipped_files: train.skipped() + val.skipped(),
        skipped_paths: train.skipped_files().into_iter().chain(val.skipped_files()).collect(),
        skipped_eval: val.skipped_files(),
    };
    Ok((result, ft.fm))
}

/// `eval --protocol finetune`: the run keeps its state in `<output>/<name>-finetune-<sha12 of the source>/`
/// (config, metrics, checkpoint, export), so two checkpoints never share a run folder; it resumes by default.
pub fn run(req: &EvalRequest) -> Result<RunRecord> {
    if let Some(f) = req.from {
        // The fine-tuning loop reads its checkpoint itself (and on resume); a converted file carries the layout.
        return Err(Error::option("--from", format!("fine-tuning detects the layout itself; to force `{f}`, convert first: lmim-bench convert --from {f} IN OUT.safetensors")));
    }
    if req.checkpoint.is_none() && req.arch.is_none() {
        return Err(Error::option("--checkpoint/--arch", "fine-tuning needs a pretrained --checkpoint, or --arch to train from scratch"));
    }
    let loaded = Protocol::Finetune.load::<FinetuneConfig>(req.protocol_file.as_deref(), &req.sets)?;
    let cfg = &loaded.cfg;
    cfg.validate()?;
    let data = req.data()?;
    let (train_ds, val_ds) = super::open_splits(data, &req.run)?;
    let prints = [SplitPrint::of_dataset("train", &train_ds)?, SplitPrint::of_dataset("val", &val_ds)?];
    let sha = req.checkpoint.as_deref().map(sha256_file).transpose()?;
    let name = match &req.checkpoint {
        Some(_) => req.model_name("model"),
        None => req.name.clone().unwrap_or_else(|| format!("{}-scratch", req.arch.as_deref().unwrap_or("vit"))),
    };
    let key = sha.as_deref().map_or_else(|| format!("scratch-s{}", cfg.seed), |s| s[..12].to_string());
    let run_dir = req.output.join(format!("{}-finetune-{key}", crate::results::sanitize(&name)));
    std::fs::create_dir_all(&run_dir).map_err(|e| Error::io(&run_dir, e))?;
    // Rank 0 owns the run folder; the others wait until it is set up before they look for a checkpoint.
    let world = crate::dist::world();
    let _lock = if world.is_main() { Some(crate::fsutil::RunLock::acquire(&run_dir)?) } else { None };
    if world.is_main() {
        crate::fsutil::clean_stale_temps(&run_dir)?;
        if req.run.fresh {
            let ck = run_dir.join(CHECKPOINT_NAME);
            if ck.exists() {
                std::fs::remove_file(&ck).map_err(|e| Error::io(&ck, e))?;
            }
        }
        crate::config::save(cfg, &run_dir.join("finetune.toml"))?;
    }
    world.barrier("the run folder set-up")?;
    let mut log = if world.is_main() { MetricsLog::open(&run_dir, "metrics.jsonl", req.run.tensorboard)? } else { MetricsLog::discard()? };
    let overrides = loaded.overrides(&[]);
    let b = RecordBuilder::new(Protocol::Finetune, &cfg.version, &overrides);
    let opts = FinetuneOptions { output_dir: Some(run_dir.clone()), resume: true, stop_after_epochs: None };
    let quiet = req.run.quiet || !world.is_main();
    let (res, _) = run_finetune_with(req.checkpoint.as_deref(), req.arch.as_deref(), data, cfg, &req.run, &opts, |v| {
        if !quiet {
            eprintln!("finetune {v}");
        }
        log.log(v)
    })?;
    let mut b = b
        .model(name, req.checkpoint.as_deref(), sha, Some(res.arch.clone()))
        .data(Some(data.display().to_string()), &prints)
        .config(&loaded.origin, cfg, &overrides, &req.run, serde_json::json!({ "lr": res.lr, "accum_iter": res.accum_iter, "precision": res.precision }))
        .seed(cfg.seed)
        .metric("top1", res.top1)
        .metric("top5", res.top5)
        .metric("best_top1", res.best_top1);
    if let (Some(l), Some(best)) = (res.ema_top1, res.ema_best_top1) {
        b = b.metric("ema_top1", l).metric("ema_best_top1", best);
    }
    let device = res.device.clone();
    b.finish(
        serde_json::json!({
            "init": if req.checkpoint.is_some() { "checkpoint" } else { "random (from scratch)" },
            "history": res.history, "best_epoch": res.best_epoch, "steps": res.steps,
            "resumed_from_epoch": res.resumed_from_epoch, "exported": res.exported, "run_dir": run_dir,
            "load_report": res.load_report.as_ref().map(|r| r.summary()), "skipped_files": res.skipped_files, "skipped_paths": res.skipped_paths, "skipped_eval": res.skipped_eval,
        }),
        &device,
        &req.output,
    )
}
