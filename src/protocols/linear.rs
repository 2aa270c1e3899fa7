//! Linear probing: the MAE recipe (`--protocol linear`, the headline LP number) with the backbone run on every
//! augmented crop, and a DINOv2-style sweep of many heads on cached features (`--protocol linear-sweep`).
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use super::record::{RecordBuilder, SplitPrint};
use super::{EvalRequest, Protocol};
use crate::train::device::{to_device_async, Ready};
use crate::checkpoint::load_vit_with;
use crate::data::loader::{stage_batch, Batch, Loader};
use crate::data::transforms::Transform;
use crate::error::{Error, Result};
use crate::info::device_name;
use crate::model::vit::{layer_norm, norm, with_amp};
use crate::model::VisionTransformer;
use crate::results::metrics_log::MetricsLog;
use crate::results::RunRecord;
use crate::train::optim::{Lars, Param};
use crate::train::schedule::lr_at_from_zero;
use crate::train::step::{evaluate_topk, run_epoch, Flow, Optimizer, StepRule, TrainStep};

/// The probe's input feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeFeature {
    /// The CLS token after the final norm (MAE's default, `--global_pool` off).
    Cls,
    /// MAE's `--global_pool`: `fc_norm(mean of the last block's patch tokens)` before the final norm, `fc_norm` a
    /// fresh LayerNorm (weight 1, bias 0, frozen like the rest of the encoder).
    GlobalPool,
}

/// `protocols/linear.toml`: the MAE linear-probe recipe. Every key can be overridden with `key=value`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LinearConfig {
    pub version: String,
    pub feature: ProbeFeature,
    pub epochs: f64,
    pub warmup_epochs: f64,
    /// Base lr; lr = blr * batch_size / 256.
    pub blr: f64,
    /// Global batch per optimiser step (16384 in MAE), reached by accumulating `micro_batch_size` batches.
    pub batch_size: i64,
    pub micro_batch_size: i64,
    pub weight_decay: f64,
    pub momentum: f64,
    pub trust_coefficient: f64,
    /// RandomResizedCrop scale range of the training crop (size = the model's input size).
    pub crop_scale_min: f64,
    pub min_lr: f64,
    pub seed: u64,
    /// Epochs between evaluations on the validation split (the last epoch is always evaluated).
    pub eval_every: usize,
}

impl Default for LinearConfig {
    fn default() -> Self {
        LinearConfig {
            version: "mae-linprobe-2".into(),
            feature: ProbeFeature::Cls,
            epochs: 90.0,
            warmup_epochs: 10.0,
            blr: 0.1,
            batch_size: 16384,
            micro_batch_size: 512,
            weight_decay: 0.0,
            momentum: 0.9,
            trust_coefficient: 0.001,
            crop_scale_min: 0.08,
            min_lr: 0.0,
            seed: 0,
            eval_every: 10,
        }
    }
}

impl LinearConfig {
    pub fn validate(&self) -> Result<()> {
        crate::train::accum_for(self.batch_size, self.micro_batch_size, crate::dist::world().size as i64)?;
        if !(self.epochs > 0.0 && self.epochs.is_finite()) || self.warmup_epochs < 0.0 || self.warmup_epochs > self.epochs {
            return Err(Error::option("epochs", "need epochs > 0 and 0 <= warmup_epochs <= epochs"));
        }
        if !(self.blr > 0.0 && self.blr.is_finite()) {
            return Err(Error::option("blr", "must be a positive number"));
        }
        Ok(())
    }
    pub fn accum_iter(&self) -> i64 {
        crate::train::accum_for(self.batch_size, self.micro_batch_size, crate::dist::world().size as i64).unwrap_or(1)
    }
    pub fn lr(&self) -> f64 {
        crate::train::scaled_lr(self.blr, self.batch_size)
    }
}

/// MAE's probe head: `BatchNorm1d(D, affine=False, eps=1e-6)` then `Linear(D, C)` with trunc-normal(0.01) weights.
#[derive(Debug)]
pub struct ProbeHead {
    pub running_mean: Tensor,
    pub running_var: Tensor,
    pub weight: Tensor,
    pub bias: Tensor,
}

impl ProbeHead {
    pub fn new(p: &nn::Path, dim: i64, classes: i64) -> Self {
        let weight = (p / "head").var("weight", &[classes, dim], nn::Init::Const(0.0));
        tch::no_grad(|| {
            // timm's trunc_normal_(std=0.01): normal truncated to [-2, 2] absolute, i.e. effectively untruncated.
            let mut w = weight.shallow_clone();
            let _ = w.normal_(0.0, 0.01).clamp_(-2.0, 2.0);
        });
        ProbeHead {
            running_mean: (p / "bn").zeros_no_train("running_mean", &[dim]),
            running_var: (p / "bn").ones_no_train("running_var", &[dim]),
            weight,
            bias: (p / "head").var("bias", &[classes], nn::Init::Const(0.0)),
        }
    }

    pub fn forward(&self, feats: &Tensor, train: bool) -> Tensor {
        let x = Tensor::batch_norm(&feats.to_kind(Kind::Float), None::<&Tensor>, None::<&Tensor>, Some(&self.running_mean), Some(&self.running_var), train, 0.1, 1e-6, false);
        x.linear(&self.weight, Some(&self.bias))
    }

    pub fn params(&self) -> Vec<Param> {
        vec![
            Param { name: "head.weight".into(), tensor: self.weight.shallow_clone(), weight_decay: 0.0, lr_scale: 1.0 },
            Param { name: "head.bias".into(), tensor: self.bias.shallow_clone(), weight_decay: 0.0, lr_scale: 1.0 },
        ]
    }
}

/// The frozen encoder and how the probe reads it.
pub struct ProbeEncoder<'a> {
    pub model: &'a VisionTransformer,
    pub feature: ProbeFeature,
    /// MAE's fresh `fc_norm` for the global-pool feature.
    fc_norm: nn::LayerNorm,
    _vs: nn::VarStore,
}

impl<'a> ProbeEncoder<'a> {
    pub fn new(model: &'a VisionTransformer, feature: ProbeFeature, device: Device) -> Self {
        let vs = nn::VarStore::new(device);
        let fc_norm = layer_norm(vs.root() / "fc_norm", model.cfg.embed_dim, 1e-6);
        ProbeEncoder { model, feature, fc_norm, _vs: vs }
    }

    /// The pooled feature `[B, D]` (no grad, f32).
    pub fn features(&self, images: &Tensor, amp: Option<Kind>) -> Tensor {
        let last = self.model.cfg.depth - 1;
        tch::no_grad(|| {
            with_amp(amp, || match self.feature {
                ProbeFeature::Cls => self.model.forward_features(images, &[], false).cls().to_kind(Kind::Float),
                ProbeFeature::GlobalPool => {
                    let out = self.model.forward_features(images, &[last], false);
                    let x = &out.intermediates[0];
                    let (n, prefix) = (x.size()[1], self.model.cfg.num_prefix_tokens());
                    norm(&self.fc_norm, &x.narrow(1, prefix, n - prefix).mean_dim(1, false, Kind::Float))
                }
            })
        })
    }
}

/// Result of a probe run.
#[derive(Debug, Clone, Serialize)]
pub struct LinearResult {
    pub top1: f64,
    pub top5: f64,
    pub best_top1: f64,
    pub best_epoch: usize,
    pub history: Vec<BTreeMap<String, f64>>,
    pub steps: i64,
    pub steps_per_epoch: usize,
}

/// The probe's step: features of the frozen encoder, BN + Linear, cross entropy, LARS.
struct ProbeStep<'a> {
    enc: &'a ProbeEncoder<'a>,
    head: &'a ProbeHead,
    opt: Lars,
    cfg: &'a LinearConfig,
    device: Device,
    amp: Option<Kind>,
}

impl TrainStep for ProbeStep<'_> {
    type Batch = Batch;
    fn batch_len(b: &Batch) -> usize {
        b.indices.len()
    }
    fn begin_step(&mut self, t: f64) -> f64 {
        lr_at_from_zero(t, self.cfg.lr(), self.cfg.min_lr, self.cfg.warmup_epochs, self.cfg.epochs)
    }
    fn stage(&self, b: Batch) -> Result<(Batch, Ready)> {
        stage_batch(b, self.device)
    }
    fn loss(&mut self, b: Batch, _epoch: usize, _iter: usize) -> Result<Tensor> {
        let f = self.enc.features(&to_device_async(&b.images, self.device), self.amp);
        Ok(self.head.forward(&f, true).cross_entropy_for_logits(&to_device_async(&b.labels, self.device)))
    }
    fn optimizer(&mut self) -> &mut dyn Optimizer {
        &mut self.opt
    }
    fn what(&self) -> &'static str {
        "linear probe"
    }
}

/// Top-1 / top-5 of the probe on the validation loader.
pub fn evaluate(enc: &ProbeEncoder, head: &ProbeHead, val: &Loader, device: Device, amp: Option<Kind>) -> Result<(f64, f64)> {
    let batches = val.epoch(0).map(|b| b.map(|b| (b.images, b.labels)));
    evaluate_topk(batches, &val.dataset().dir, |x| head.forward(&enc.features(&to_device_async(x, device), amp), false))
}

/// The MAE linear probe on a frozen encoder: LARS on the head, lr warmup from 0 then cosine, whole optimiser steps
/// only (`drop_last`), evaluation every `eval_every` epochs. `log` receives one JSON object per epoch.
pub fn train_probe(
    model: &VisionTransformer,
    train: &Loader,
    val: &Loader,
    cfg: &LinearConfig,
    device: Device,
    amp: Option<Kind>,
    mut log: impl FnMut(&serde_json::Value) -> Result<()>,
) -> Result<LinearResult> {
    cfg.validate()?;
    tch::manual_seed(cfg.seed as i64);
    let vs = nn::VarStore::new(device);
    let classes = train.dataset().classes.len() as i64;
    let head = ProbeHead::new(&vs.root(), model.cfg.embed_dim, classes);
    let enc = ProbeEncoder::new(model, cfg.feature, device);
    let mut opt = Lars::new(head.params(), cfg.momentum, cfg.trust_coefficient);
    for p in &mut opt.params {
        p.weight_decay = cfg.weight_decay;
    }
    let rule = StepRule { accum: cfg.accum_iter() as usize, clip: None };
    let per_epoch = train.global_batches();
    if rule.used_iters(per_epoch) == 0 {
        return Err(Error::option("batch_size", format!("the train split gives {per_epoch} micro-batches of {}, fewer than one step of {}", cfg.micro_batch_size, cfg.batch_size)));
    }
    let mut st = ProbeStep { enc: &enc, head: &head, opt, cfg, device, amp };
    let epochs = cfg.epochs.ceil() as usize;
    let (mut best, mut best_epoch, mut last) = (f64::NEG_INFINITY, 0, (0.0, 0.0));
    let mut history = Vec::new();
    let mut steps = 0i64;
    for epoch in 0..epochs {
        let mut batches = train.epoch(epoch as u64);
        let stats = run_epoch(&mut st, rule, &mut batches, epoch, 0, per_epoch, &mut steps, &|_| false, &mut |_, _| Ok(Flow::Continue))?;
        let mut entry = BTreeMap::from([("epoch".to_string(), epoch as f64 + 1.0), ("loss".to_string(), stats.mean_loss()), ("lr".to_string(), stats.lr), ("step".to_string(), steps as f64)]);
        if (epoch + 1) % cfg.eval_every.max(1) == 0 || epoch + 1 == epochs {
            last = evaluate(&enc, &head, val, device, amp)?;
            entry.insert("val_top1".into(), last.0);
            entry.insert("val_top5".into(), last.1);
            if last.0 > best {
                best = last.0;
                best_epoch = epoch + 1;
            }
        }
        log(&serde_json::to_value(&entry).expect("json"))?;
        history.push(entry);
    }
    Ok(LinearResult { top1: last.0, top5: last.1, best_top1: best, best_epoch, history, steps, steps_per_epoch: rule.used_iters(per_epoch) / rule.accum })
}

/// `eval --protocol linear`.
pub fn run(req: &EvalRequest) -> Result<RunRecord> {
    let loaded = Protocol::Linear.load::<LinearConfig>(req.protocol_file.as_deref(), &req.sets)?;
    let cfg = &loaded.cfg;
    cfg.validate()?;
    let device = req.run.device()?;
    let amp = req.run.precision.unwrap_or_default().autocast(device);
    let ckpt = req.checkpoint()?;
    let enc = load_vit_with(ckpt, &req.load_options(), device, 0)?;
    if !enc.model.cfg.class_token && cfg.feature == ProbeFeature::Cls {
        return Err(crate::error::Error::option("feature", format!("`cls`: {} has no CLS token; use feature=\"global_pool\"", ckpt.display())));
    }
    let (train_ds, val_ds) = super::open_splits(req.data()?)?;
    let prints = [SplitPrint::of_dataset("train", &train_ds)?, SplitPrint::of_dataset("val", &val_ds)?];
    let size = enc.model.cfg.img_size as u32;
    let micro = cfg.micro_batch_size as usize;
    let train = super::train_loader(train_ds, Transform::linprobe_train(size, cfg.crop_scale_min), micro, cfg.seed, &req.run)?;
    let val = super::eval_loader(val_ds, super::extract::eval_transform(size as i64, 0.875)?, micro, &req.run, true)?;
    let name = req.model_name("model");
    let overrides = loaded.overrides(&[]);
    let b = RecordBuilder::new(Protocol::Linear, &cfg.version, &overrides);
    // A folder per (model, feature, source checkpoint): TensorBoard shows one run per folder.
    let feature = serde_json::to_value(cfg.feature).expect("feature serialises");
    let run_dir = req.output.join(format!("{}-linear-{}-{}", crate::results::sanitize(&name), feature.as_str().unwrap_or("cls"), &enc.sha256[..12]));
    let mut log = MetricsLog::open(&run_dir, "metrics.jsonl", req.run.tensorboard)?;
    let quiet = req.run.quiet;
    let res = train_probe(&enc.model, &train, &val, cfg, device, amp, |v| {
        if !quiet {
            eprintln!("linear {v}");
        }
        log.log(v)
    })?;
    let extra = serde_json::json!({ "lr": cfg.lr(), "accum_iter": cfg.accum_iter(), "precision": req.run.precision.unwrap_or_default().effective(device) });
    b.model(name, Some(ckpt), Some(enc.sha256.clone()), Some(enc.model.cfg.arch.clone()))
        .source(serde_json::to_value(&enc.source).ok())
        .data(Some(req.data()?.display().to_string()), &prints)
        .config(&loaded.origin, cfg, &overrides, &req.run, extra)
        .seed(cfg.seed)
        .metric("top1", res.top1)
        .metric("top5", res.top5)
        .metric("best_top1", res.best_top1)
        .finish(
            serde_json::json!({ "history": res.history, "best_epoch": res.best_epoch, "steps": res.steps, "steps_per_epoch": res.steps_per_epoch, "skipped_files": train.skipped() + val.skipped(), "run_dir": run_dir }),
            &device_name(device),
            &req.output,
        )
}
