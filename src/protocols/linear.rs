//! Linear probing: the MAE recipe (`--protocol linear`, the headline LP number) with the backbone run on every
//! augmented crop, and a DINOv2-style sweep of many heads on cached features (`--protocol linear-sweep`).
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use super::record::{RecordBuilder, SplitPrint};
use super::{EvalRequest, Protocol};
use crate::checkpoint::load_vit_with;
use super::probe::{BnHead, FrozenInput, Probe, ProbeRun, ProbeSchedule};
use crate::data::loader::Loader;
use crate::data::transforms::Transform;
use crate::error::{Error, Result};
use crate::info::device_name;
use crate::model::vit::{layer_norm, norm, with_amp};
use crate::model::VisionTransformer;
use crate::results::metrics_log::MetricsLog;
use crate::results::RunRecord;
use crate::train::optim::{Lars, Param};

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

/// BatchNorm1d's default momentum.
const BN_MOMENTUM: f64 = 0.1;

/// BatchNorm1d(affine=False, eps=1e-6) in training mode on `f` `[B, D]`: normalised with the batch's statistics,
/// and those statistics `[2, D]` (mean, unbiased variance) for [`bn_running_update`], the running ones untouched.
pub fn bn_train(f: &Tensor) -> (Tensor, Tensor) {
    let x = Tensor::batch_norm(f, None::<&Tensor>, None::<&Tensor>, None::<&Tensor>, None::<&Tensor>, true, BN_MOMENTUM, 1e-6, false);
    let stats = tch::no_grad(|| {
        let f = f.detach();
        Tensor::stack(&[f.mean_dim(0, false, Kind::Float), f.var_dim(0, true, false)], 0)
    });
    (x, stats)
}

/// BatchNorm's running-statistics update by each `[2, D]` (mean, unbiased variance) of `stats` in order.
pub fn bn_running_update(running_mean: &Tensor, running_var: &Tensor, stats: &[Tensor]) {
    tch::no_grad(|| {
        for s in stats {
            let s = s.to_device(running_mean.device());
            let _ = running_mean.shallow_clone().g_mul_scalar_(1.0 - BN_MOMENTUM).g_add_(&(s.get(0) * BN_MOMENTUM));
            let _ = running_var.shallow_clone().g_mul_scalar_(1.0 - BN_MOMENTUM).g_add_(&(s.get(1) * BN_MOMENTUM));
        }
    });
}

/// The BatchNorm statistics of this step's micro-batch on every rank, in global micro-batch order: rank r's local
/// micro-batch `it` is global micro-batch `it * world + r` (`train::step`), so applying the gathered list in rank
/// order moves the running statistics exactly as one process running the same micro-batches one after another
/// (1 rank x accumulation W); the exported head and its evaluation do not depend on the number of ranks.
pub fn gather_bn_stats(world: &crate::dist::World, stats: &Tensor) -> Result<Vec<Tensor>> {
    world.all_gather_on(stats, "the BatchNorm statistics gather")
}

/// MAE's probe head: `BatchNorm1d(D, affine=False, eps=1e-6)` then `Linear(D, C)` with trunc-normal(0.01) weights.
#[derive(Debug)]
pub struct ProbeHead {
    pub running_mean: Tensor,
    pub running_var: Tensor,
    pub weight: Tensor,
    pub bias: Tensor,
    /// BatchNorm's `num_batches_tracked`: training batches that moved the running statistics.
    pub batches_tracked: std::cell::Cell<i64>,
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
            batches_tracked: std::cell::Cell::new(0),
        }
    }

    pub fn params(&self) -> Vec<Param> {
        vec![
            Param { name: "head.weight".into(), tensor: self.weight.shallow_clone(), weight_decay: 0.0, lr_scale: 1.0 },
            Param { name: "head.bias".into(), tensor: self.bias.shallow_clone(), weight_decay: 0.0, lr_scale: 1.0 },
        ]
    }
}

impl BnHead for ProbeHead {
    const WHAT: &'static str = "linear probe";
    /// The head as MAE's `model.head` (`Sequential(BatchNorm1d(D, affine=False, eps=1e-6), Linear(D, C))`, its
    /// main_linprobe.py) names its state: `load_state_dict` takes it as is.
    fn state_dict(&self) -> Vec<(String, Tensor)> {
        vec![
            ("0.running_mean".into(), self.running_mean.detach().copy()),
            ("0.running_var".into(), self.running_var.detach().copy()),
            ("0.num_batches_tracked".into(), Tensor::from(self.batches_tracked.get())),
            ("1.weight".into(), self.weight.detach().copy()),
            ("1.bias".into(), self.bias.detach().copy()),
        ]
    }

    fn forward_eval(&self, feats: &Tensor) -> Tensor {
        let x = Tensor::batch_norm(&feats.to_kind(Kind::Float), None::<&Tensor>, None::<&Tensor>, Some(&self.running_mean), Some(&self.running_var), false, BN_MOMENTUM, 1e-6, false);
        x.linear(&self.weight, Some(&self.bias))
    }

    fn forward_train(&self, feats: &Tensor) -> (Tensor, Tensor) {
        let (x, stats) = bn_train(&feats.to_kind(Kind::Float));
        (x.linear(&self.weight, Some(&self.bias)), stats)
    }

    fn update_running(&self, stats: &[Tensor]) {
        bn_running_update(&self.running_mean, &self.running_var, stats);
        self.batches_tracked.set(self.batches_tracked.get() + stats.len() as i64);
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
}

impl FrozenInput for ProbeEncoder<'_> {
    /// The pooled feature `[B, D]` (no grad, f32).
    fn read(&self, images: &Tensor, amp: Option<Kind>) -> Tensor {
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

/// The MAE linear probe on a frozen encoder ([`super::probe::fit`]). Returns the run and the head's state dict at
/// the last epoch (the one MAE's recipe reports).
pub fn train_probe(
    model: &VisionTransformer,
    train: &Loader,
    val: &Loader,
    cfg: &LinearConfig,
    device: Device,
    amp: Option<Kind>,
    log: impl FnMut(&serde_json::Value) -> Result<()>,
) -> Result<(ProbeRun, Vec<(String, Tensor)>)> {
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
    let sched = ProbeSchedule {
        lr: cfg.lr(),
        min_lr: cfg.min_lr,
        warmup_epochs: cfg.warmup_epochs,
        epochs: cfg.epochs,
        accum: cfg.accum_iter() as usize,
        batch_size: cfg.batch_size,
        micro_batch_size: cfg.micro_batch_size,
        eval_every: cfg.eval_every,
    };
    let probe = Probe { input: &enc, head: &head };
    let res = super::probe::fit(&probe, opt, &sched, train, val, device, amp, log)?;
    Ok((res, head.state_dict()))
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
    let (train_ds, val_ds) = super::open_splits(req.data()?, &req.run)?;
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
    // One writer of the run's metrics and events: rank 0 (every rank holds the same values).
    let mut log = if crate::dist::world().is_main() { MetricsLog::open(&run_dir, "metrics.jsonl", req.run.tensorboard)? } else { MetricsLog::discard()? };
    let quiet = req.run.quiet;
    let (res, head) = train_probe(&enc.model, &train, &val, cfg, device, amp, |v| {
        if !quiet {
            eprintln!("linear {v}");
        }
        log.log(v)
    })?;
    let head_path = run_dir.join("linear_head.safetensors");
    if crate::dist::world().is_main() {
        let meta = [("format".to_string(), "mae-linprobe-head".to_string()), ("checkpoint_sha256".to_string(), enc.sha256.clone())].into_iter().collect();
        crate::checkpoint::save(&head_path, &head, &meta)?;
    }
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
            serde_json::json!({ "history": res.history, "best_epoch": res.best_epoch, "steps": res.steps, "steps_per_epoch": res.steps_per_epoch, "skipped_files": train.skipped() + val.skipped(), "skipped_eval": val.skipped_files(), "run_dir": run_dir, "head": head_path }),
            &device_name(device),
            &req.output,
        )
}
