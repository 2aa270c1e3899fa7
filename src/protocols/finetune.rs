//! Full fine-tuning with MAE's recipe (`facebookresearch/mae:main_finetune.py`): AdamW with layer-wise lr decay
//! (`util/lr_decay.py:param_groups_lrd`), linear warmup from 0 then cosine to `min_lr` set per iteration
//! (`util/lr_sched.py`), drop path ramped linearly over the blocks, global average pooling with `fc_norm`, a fresh
//! head with trunc-normal(2e-5) weights, Mixup/CutMix with label smoothing and soft-target cross entropy,
//! RandAugment and RandomErasing, gradient accumulation and bf16 on CUDA.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use crate::checkpoint::{load_any, load_into, resolve_config, to_timm_names, LoadReport};
use crate::data::augment::{mixup_cutmix, MixupConfig, RandAugment, RandomErasing};
use crate::data::dataset::Dataset;
use crate::data::decode::load_rgb;
use crate::data::loader::{sample_rng, Loader, LoaderConfig};
use crate::data::transforms::{to_tensor_normalize, Transform};
use crate::error::{Error, Result};
use crate::model::vit::with_amp;
use crate::model::{VisionTransformer, VitConfig};
use crate::protocols::linear::topk_correct;
use crate::train::optim::{AdamW, Param};
use crate::train::schedule::lr_at_from_zero;

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
    /// Effective batch (per optimiser step).
    pub batch_size: usize,
    /// Batch per forward pass; `accum_iter = ceil(batch_size / micro_batch_size)`.
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
    /// "avg" (mean of patch tokens + `fc_norm`) or "token" (CLS).
    pub global_pool: String,
    pub model_ema: bool,
    /// timm `ModelEma` decay, applied after every optimiser step; the EMA model is evaluated beside the model.
    pub model_ema_decay: f64,
    /// Gradient clipping (MAE's `--clip_grad`, off by default).
    pub clip_grad: Option<f64>,
    /// Eval crop = model image size; resize = int(size / crop_pct) (timm's 0.875).
    pub crop_pct: f64,
    pub workers: usize,
    pub seed: u64,
    pub device: String,
    pub precision: String,
    pub eval_every: usize,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        FinetuneConfig {
            version: "mae-finetune-1".into(),
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
            global_pool: "avg".into(),
            model_ema: false,
            model_ema_decay: 0.9999,
            clip_grad: None,
            crop_pct: 0.875,
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            seed: 0,
            device: "auto".into(),
            precision: "auto".into(),
            eval_every: 1,
        }
    }
}

impl FinetuneConfig {
    /// Reads a TOML recipe (e.g. `protocols/finetune.toml`); missing keys keep the defaults.
    pub fn from_toml(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        toml::from_str(&text).map_err(|e| Error::BadConfig { path: path.to_path_buf(), reason: e.to_string() })
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |o: &str, r: &str| Err(Error::option(o, r));
        if self.epochs == 0 {
            return bad("epochs", "must be positive");
        }
        if self.batch_size == 0 || self.micro_batch_size == 0 {
            return bad("batch_size", "batch_size and micro_batch_size must be positive");
        }
        if !(self.layer_decay > 0.0 && self.layer_decay <= 1.0) {
            return bad("layer_decay", "must be in (0, 1]");
        }
        if !(0.0..1.0).contains(&self.drop_path) {
            return bad("drop_path", "must be in [0, 1)");
        }
        if !matches!(self.global_pool.as_str(), "avg" | "token") {
            return bad("global_pool", "must be `avg` or `token`");
        }
        if !matches!(self.precision.as_str(), "auto" | "bf16" | "f32") {
            return bad("precision", "must be auto, bf16 or f32");
        }
        if !(0.0..=1.0).contains(&self.model_ema_decay) {
            return bad("model_ema_decay", "must be in [0, 1]");
        }
        if !(0.0..=1.0).contains(&self.reprob) || !(0.0..=1.0).contains(&self.mixup_prob) {
            return bad("reprob", "probabilities must be in [0, 1]");
        }
        if !self.randaug.is_empty() {
            RandAugment::parse(&self.randaug).map_err(|e| Error::option("randaug", e))?;
        }
        Ok(())
    }

    pub fn accum_iter(&self) -> usize {
        self.batch_size.div_ceil(self.micro_batch_size)
    }

    /// Absolute lr: `lr`, else `blr * (micro_batch_size * accum_iter) / 256`.
    pub fn lr(&self) -> f64 {
        self.lr.unwrap_or(self.blr * (self.micro_batch_size * self.accum_iter()) as f64 / 256.0)
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

/// Builds the classifier: from a checkpoint (any format `load_any` reads; its head and `fc_norm` are dropped) or
/// fresh from `arch`; drop path and pooling from the recipe; MAE's head init (trunc-normal std 2e-5, bias 0).
pub fn build_model(ckpt: Option<&Path>, arch: Option<&str>, num_classes: i64, cfg: &FinetuneConfig, device: Device) -> Result<FinetuneModel> {
    let (mut vcfg, loaded) = match ckpt {
        Some(path) => {
            let mut c = to_timm_names(load_any(path)?);
            let vcfg = resolve_config(&c, arch)?;
            c.tensors.retain(|(n, _)| !n.starts_with("head.") && !n.starts_with("fc_norm."));
            (vcfg, Some(c))
        }
        None => {
            let a = arch.ok_or_else(|| Error::option("--arch", "an architecture is needed when no checkpoint is given"))?;
            (VitConfig::from_arch(a)?, None)
        }
    };
    vcfg.num_classes = num_classes;
    vcfg.global_pool = cfg.global_pool.clone();
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
// Data.

/// The training pipeline of MAE's `build_transform(is_train=True)`: RandomResizedCrop(size, (0.08, 1), bicubic) +
/// flip, RandAugment on the u8 image, ToTensor + Normalize, RandomErasing. Batches come from rayon workers.
pub struct TrainData {
    pub dataset: Dataset,
    pub transform: Transform,
    pub randaug: Option<RandAugment>,
    pub erasing: Option<RandomErasing>,
    pub size: u32,
    pub seed: u64,
    pub batch_size: usize,
    pool: rayon::ThreadPool,
}

impl TrainData {
    pub fn new(dataset: Dataset, size: u32, cfg: &FinetuneConfig) -> Result<Self> {
        let randaug = if cfg.randaug.is_empty() { None } else { Some(RandAugment::parse(&cfg.randaug).map_err(|e| Error::option("randaug", e))?) };
        let erasing = (cfg.reprob > 0.0).then(|| RandomErasing { probability: cfg.reprob, ..Default::default() });
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.workers.max(1))
            .build()
            .map_err(|e| Error::option("workers", e.to_string()))?;
        Ok(TrainData { dataset, transform: Transform::train(size, 0.08), randaug, erasing, size, seed: cfg.seed, batch_size: cfg.micro_batch_size, pool })
    }

    /// Full batches per epoch (drop_last, as MAE's train loader).
    pub fn num_batches(&self) -> usize {
        self.dataset.len() / self.batch_size
    }

    /// The shuffled sample order of an epoch.
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.dataset.len()).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0x5EED_F1E7);
        rng.set_stream(epoch);
        order.shuffle(&mut rng);
        order
    }

    /// One sample, CHW f32, with its own rng (seed, epoch, index).
    pub fn sample(&self, index: usize, epoch: u64) -> Result<Vec<f32>> {
        let (path, _) = &self.dataset.samples[index];
        let mut rng = sample_rng(self.seed, epoch, index);
        let img = load_rgb(path)?;
        let mut img = self.transform.apply_u8(img, &mut rng).map_err(|e| Error::data(path, e))?;
        if let Some(ra) = &self.randaug {
            img = ra.apply(img, &mut rng);
        }
        let s = self.size as usize;
        let mut out = vec![0f32; 3 * s * s];
        to_tensor_normalize(&img, self.transform.mean, self.transform.std, &mut out);
        if let Some(er) = &self.erasing {
            er.apply(&mut out, 3, s, s, &mut rng);
        }
        Ok(out)
    }

    /// The batches of `epoch`, assembled by a producer thread two batches ahead of the training loop.
    pub fn epoch_batches(self: &std::sync::Arc<Self>, epoch: u64) -> impl Iterator<Item = Result<(Tensor, Tensor)>> {
        let (tx, rx) = crossbeam_channel::bounded(2);
        let me = self.clone();
        std::thread::spawn(move || {
            let order = me.epoch_order(epoch);
            for b in 0..me.num_batches() {
                let item = me.batch(&order, b, epoch);
                let stop = item.is_err();
                // A closed channel means the consumer stopped early.
                if tx.send(item).is_err() || stop {
                    break;
                }
            }
        });
        rx.into_iter()
    }

    /// Batch `b` of `epoch`: images `[B,3,S,S]` and labels `[B]`.
    pub fn batch(&self, order: &[usize], b: usize, epoch: u64) -> Result<(Tensor, Tensor)> {
        let idx = &order[b * self.batch_size..(b + 1) * self.batch_size];
        let samples: Vec<Result<Vec<f32>>> = self.pool.install(|| idx.par_iter().map(|&i| self.sample(i, epoch)).collect());
        let mut flat = Vec::with_capacity(idx.len() * 3 * (self.size * self.size) as usize);
        for s in samples {
            flat.extend_from_slice(&s?);
        }
        let s = self.size as i64;
        let x = Tensor::from_slice(&flat).view([idx.len() as i64, 3, s, s]);
        let y = Tensor::from_slice(&idx.iter().map(|&i| self.dataset.samples[i].1).collect::<Vec<i64>>());
        Ok((x, y))
    }
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

/// Top-1 / top-5 (percent) over a loader's epoch 0.
pub fn evaluate(model: &VisionTransformer, val: &Loader, device: Device, amp: Option<Kind>) -> Result<(f64, f64)> {
    let (mut n, mut c1, mut c5) = (0i64, 0i64, 0i64);
    for b in val.epoch(0) {
        let b = b?;
        let logits = tch::no_grad(|| with_amp(amp, || model.forward(&b.images.to_device(device), false)));
        let (a, a5) = topk_correct(&logits, &b.labels.to_device(device));
        n += b.labels.size()[0];
        c1 += a;
        c5 += a5;
    }
    if n == 0 {
        return Err(Error::data(&val.dataset().dir, "the validation split yielded no images"));
    }
    Ok((100.0 * c1 as f64 / n as f64, 100.0 * c5 as f64 / n as f64))
}

// ---------------------------------------------------------------------------------------------------------------
// Training.

/// Where a run keeps its state. With `output_dir`, a checkpoint `finetune-last.safetensors` (model, optimizer,
/// EMA, epoch, step, history) is written atomically after every epoch and the fine-tuned classifier is exported
/// as `finetuned.safetensors` (timm names, `arch`/`config` metadata) at the end; `resume` continues from the
/// checkpoint when it exists. Resuming is exact at epoch boundaries: every epoch reseeds its data order,
/// augmentation, Mixup and torch (drop path) randomness from (seed, epoch).
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
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
}

/// Fine-tunes a ViT on `data_root/{train,val}` with the recipe `cfg`: from `model_ckpt` (head made fresh), or
/// from a random init of `arch` when no checkpoint is given. `log` gets one JSON object per epoch.
pub fn run_finetune(
    model_ckpt: Option<&Path>,
    arch: Option<&str>,
    data_root: &Path,
    cfg: &FinetuneConfig,
    log: impl FnMut(&serde_json::Value),
) -> Result<FinetuneResult> {
    run_finetune_with(model_ckpt, arch, data_root, cfg, &RunOptions::default(), log).map(|(r, _)| r)
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

fn save_state(path: &Path, fm: &FinetuneModel, opt: &AdamW, ema: Option<&Ema>, cfg: &FinetuneConfig, p: &Progress) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = fm.vs.variables().into_iter().map(|(n, t)| (format!("model.{n}"), t)).collect();
    tensors.extend(opt.state().into_iter().map(|(n, t)| (format!("optim.{n}"), t)));
    if let Some(e) = ema {
        tensors.extend(e.vs.variables().into_iter().map(|(n, t)| (format!("ema.{n}"), t)));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let meta = BTreeMap::from([
        ("format".to_string(), "lmim-bench-finetune".to_string()),
        ("finetune_config".to_string(), serde_json::to_string(cfg).expect("json")),
        ("config".to_string(), serde_json::to_string(&fm.cfg).expect("json")),
        ("arch".to_string(), fm.cfg.arch.clone()),
        ("epoch".to_string(), p.epoch.to_string()),
        ("step".to_string(), p.steps.to_string()),
        // JSON has no -inf: "not evaluated yet" is stored as null.
        ("best".to_string(), serde_json::to_string(&(finite(p.best), p.best_epoch, p.last, finite(p.ema_best), p.ema_last)).expect("json")),
        ("history".to_string(), serde_json::to_string(&p.history).expect("json")),
    ]);
    crate::checkpoint::save(path, &tensors, &meta)
}

fn load_state(path: &Path, fm: &FinetuneModel, opt: &mut AdamW, ema: Option<&Ema>, cfg: &FinetuneConfig) -> Result<Progress> {
    let ck = crate::checkpoint::load(path)?;
    let bad = |r: String| Error::checkpoint(path, r);
    let saved: FinetuneConfig = serde_json::from_str(ck.metadata.get("finetune_config").ok_or_else(|| bad("no `finetune_config` metadata".into()))?)
        .map_err(|e| bad(format!("bad `finetune_config`: {e}")))?;
    // Only the epoch count may grow on resume; the data workers do not change results.
    let norm = |c: &FinetuneConfig| FinetuneConfig { epochs: 0, workers: 0, device: String::new(), ..c.clone() };
    if norm(&saved) != norm(cfg) {
        return Err(bad("the checkpoint was made with a different fine-tuning recipe".into()));
    }
    let sub = |prefix: &str| crate::checkpoint::Checkpoint {
        tensors: ck.tensors.iter().filter_map(|(n, t)| n.strip_prefix(prefix).map(|s| (s.to_string(), t.shallow_clone()))).collect(),
        metadata: BTreeMap::new(),
        path: path.to_path_buf(),
    };
    load_into(&fm.vs, &sub("model."), &[])?;
    if let Some(e) = ema {
        load_into(&e.vs, &sub("ema."), &[])?;
    }
    let num = |k: &str| ck.metadata.get(k).and_then(|v| v.parse::<i64>().ok()).ok_or_else(|| bad(format!("no `{k}` metadata")));
    let (epoch, steps) = (num("epoch")? as usize, num("step")?);
    let optim = sub("optim.");
    opt.load_state(|k| optim.get(k).map(|t| t.shallow_clone()), steps).map_err(bad)?;
    type Best = (Option<f64>, usize, (f64, f64), Option<f64>, Option<f64>);
    let (best, best_epoch, last, ema_best, ema_last): Best =
        serde_json::from_str(ck.metadata.get("best").map_or("", |s| s)).map_err(|e| bad(format!("bad `best`: {e}")))?;
    let history = serde_json::from_str(ck.metadata.get("history").map_or("", |s| s)).map_err(|e| bad(format!("bad `history`: {e}")))?;
    let (best, ema_best) = (best.unwrap_or(f64::NEG_INFINITY), ema_best.unwrap_or(f64::NEG_INFINITY));
    Ok(Progress { epoch, steps, best, best_epoch, last, ema_best, ema_last, history })
}

/// As [`run_finetune`], with checkpoints/resume/export (`opts`), also returning the fine-tuned model.
pub fn run_finetune_with(
    model_ckpt: Option<&Path>,
    arch: Option<&str>,
    data_root: &Path,
    cfg: &FinetuneConfig,
    opts: &RunOptions,
    mut log: impl FnMut(&serde_json::Value),
) -> Result<(FinetuneResult, FinetuneModel)> {
    cfg.validate()?;
    let device = crate::info::parse_device(&cfg.device)?;
    let amp = match cfg.precision.as_str() {
        "bf16" => Some(Kind::BFloat16),
        "auto" if device.is_cuda() => Some(Kind::BFloat16),
        _ => None,
    };
    tch::manual_seed(cfg.seed as i64);
    let train_set = Dataset::open(data_root, "train")?;
    let val_set = Dataset::open(data_root, "val")?;
    let num_classes = train_set.classes.len() as i64;
    if val_set.classes != train_set.classes {
        return Err(Error::data(data_root, "train and val have different class lists"));
    }
    let fm = build_model(model_ckpt, arch, num_classes, cfg, device)?;
    let size = fm.cfg.img_size as u32;
    let train = std::sync::Arc::new(TrainData::new(train_set, size, cfg)?);
    let per_epoch = train.num_batches();
    if per_epoch == 0 {
        return Err(Error::data(data_root, format!("the train split has fewer samples than micro_batch_size {}", cfg.micro_batch_size)));
    }
    let resize = (size as f64 / cfg.crop_pct) as u32;
    let val = Loader::new(
        val_set,
        Transform::eval(resize, size),
        LoaderConfig { batch_size: cfg.micro_batch_size, shuffle: false, drop_last: false, seed: cfg.seed, workers: cfg.workers.max(1), quiet: true, ..Default::default() },
    )?;
    let mix = cfg.mixup_config(num_classes);
    let mut opt = AdamW::new(finetune_params(&fm.vs, fm.cfg.depth, cfg), cfg.beta1, cfg.beta2, 1e-8);
    let mut ema = if cfg.model_ema { Some(Ema::new(&fm, cfg.model_ema_decay, device)?) } else { None };
    let accum = cfg.accum_iter();
    let base_lr = cfg.lr();
    let ckpt_path = opts.output_dir.as_ref().map(|d| d.join(CHECKPOINT_NAME));
    let mut p = Progress { epoch: 0, steps: 0, best: f64::NEG_INFINITY, best_epoch: 0, last: (0.0, 0.0), ema_best: f64::NEG_INFINITY, ema_last: None, history: Vec::new() };
    let mut resumed_from_epoch = None;
    if let Some(path) = ckpt_path.as_ref().filter(|p| opts.resume && p.exists()) {
        p = load_state(path, &fm, &mut opt, ema.as_ref(), cfg)?;
        resumed_from_epoch = Some(p.epoch);
    }
    let mut lr = 0.0;
    for epoch in p.epoch..cfg.epochs {
        // Per-epoch seeding makes a resumed run identical to an uninterrupted one.
        tch::manual_seed(cfg.seed.wrapping_add(1 + epoch as u64) as i64);
        let mut mix_rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x00A1_1C0D);
        mix_rng.set_stream(epoch as u64);
        let mut loss_sum = 0.0;
        opt.zero_grad();
        for (it, b) in train.epoch_batches(epoch as u64).enumerate() {
            let (x, y) = b?;
            let (x, y) = (x.to_device(device), y.to_device(device));
            if it % accum == 0 {
                lr = lr_at_from_zero(epoch as f64 + it as f64 / per_epoch as f64, base_lr, cfg.min_lr, cfg.warmup_epochs, cfg.epochs as f64);
            }
            let loss = if cfg.mixup_active() {
                let (xm, target, _) = mixup_cutmix(&x, &y, &mix, &mut mix_rng);
                let logits = with_amp(amp, || fm.model.forward(&xm, true));
                soft_target_ce(&logits, &target)
            } else {
                let logits = with_amp(amp, || fm.model.forward(&x, true));
                if cfg.smoothing > 0.0 {
                    label_smoothing_ce(&logits, &y, cfg.smoothing)
                } else {
                    logits.cross_entropy_for_logits(&y)
                }
            };
            let lv = loss.double_value(&[]);
            if !lv.is_finite() {
                return Err(Error::Diverged(format!(
                    "fine-tuning loss is {lv} at epoch {epoch}, iteration {it} (optimizer step {})",
                    p.steps
                )));
            }
            (loss / accum as f64).backward();
            loss_sum += lv;
            if (it + 1) % accum == 0 || it + 1 == per_epoch {
                if let Some(c) = cfg.clip_grad {
                    opt.grad_norm(Some(c));
                }
                opt.step(lr);
                opt.zero_grad();
                p.steps += 1;
                if let Some(e) = ema.as_mut() {
                    e.update(&fm.vs);
                }
            }
        }
        let mut entry = BTreeMap::from([
            ("epoch".to_string(), epoch as f64 + 1.0),
            ("loss".to_string(), loss_sum / per_epoch as f64),
            ("lr".to_string(), lr),
            ("steps".to_string(), p.steps as f64),
        ]);
        if (epoch + 1) % cfg.eval_every.max(1) == 0 || epoch + 1 == cfg.epochs {
            p.last = evaluate(&fm.model, &val, device, amp)?;
            entry.insert("val_top1".into(), p.last.0);
            entry.insert("val_top5".into(), p.last.1);
            if p.last.0 > p.best {
                p.best = p.last.0;
                p.best_epoch = epoch + 1;
            }
            if let Some(e) = &ema {
                let (t1, t5) = evaluate(&e.model, &val, device, amp)?;
                entry.insert("ema_val_top1".into(), t1);
                entry.insert("ema_val_top5".into(), t5);
                p.ema_last = Some(t1);
                p.ema_best = p.ema_best.max(t1);
            }
        }
        log(&serde_json::to_value(&entry).expect("json"));
        p.history.push(entry);
        p.epoch = epoch + 1;
        if let Some(path) = &ckpt_path {
            save_state(path, &fm, &opt, ema.as_ref(), cfg, &p)?;
        }
        if opts.stop_after_epochs.is_some_and(|n| p.epoch >= n) {
            break;
        }
    }
    let finished = p.epoch >= cfg.epochs;
    let exported = match &opts.output_dir {
        Some(dir) if finished => {
            let path = dir.join(EXPORT_NAME);
            let meta = BTreeMap::from([("finetune_config".to_string(), serde_json::to_string(cfg).expect("json"))]);
            crate::checkpoint::save_vit(&path, &fm.vs, &fm.cfg, &meta)?;
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
        arch: fm.cfg.arch.clone(),
        num_classes,
        lr: base_lr,
        accum_iter: accum,
        device: crate::info::device_name(device),
        precision: if amp.is_some() { "bf16".into() } else { "f32".into() },
        checkpoint: model_ckpt.map(Path::to_path_buf),
        load_report: fm.report.clone(),
        ema_top1: p.ema_last,
        ema_best_top1: ema.as_ref().map(|_| p.ema_best),
        resumed_from_epoch,
        exported,
    };
    Ok((result, fm))
}
