//! Linear probing: the MAE recipe (`--protocol linear`, the headline LP number) with the backbone run on every
//! augmented crop, and a DINOv2-style sweep of many heads on cached features (`--protocol linear-sweep`).
use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::model::vit::with_amp;
use crate::model::VisionTransformer;
use crate::train::optim::{Lars, Param};
use crate::train::schedule::lr_at_from_zero;

/// `protocols/linear.toml`: the MAE linear-probe recipe. Every key can be overridden with `--set`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct LinearConfig {
    pub version: String,
    /// `cls` (CLS token after the final norm, MAE's default) or `avg` (mean of the normed patch tokens).
    pub feature: String,
    pub epochs: f64,
    pub warmup_epochs: f64,
    /// Base lr; lr = blr * batch_size / 256.
    pub blr: f64,
    /// Effective batch (16384 in MAE); reached by gradient accumulation over `micro_batch_size` chunks.
    pub batch_size: i64,
    pub micro_batch_size: i64,
    pub weight_decay: f64,
    pub momentum: f64,
    pub trust_coefficient: f64,
    /// RandomResizedCrop scale range of the training crop (size = the model's input size).
    pub crop_scale_min: f64,
    pub min_lr: f64,
    pub seed: u64,
    pub device: String,
    /// `auto` (bf16 on CUDA), `bf16` or `f32`.
    pub precision: String,
    pub num_workers: usize,
    /// Epochs between evaluations on the validation split (the last epoch is always evaluated).
    pub eval_every: usize,
}

impl Default for LinearConfig {
    fn default() -> Self {
        LinearConfig {
            version: "mae-linprobe-1".into(),
            feature: "cls".into(),
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
            device: "auto".into(),
            precision: "auto".into(),
            num_workers: 0,
            eval_every: 10,
        }
    }
}

impl LinearConfig {
    pub fn validate(&self) -> Result<()> {
        if !matches!(self.feature.as_str(), "cls" | "avg") {
            return Err(Error::option("feature", format!("`{}` is not cls or avg", self.feature)));
        }
        if self.batch_size < 1 || self.micro_batch_size < 1 {
            return Err(Error::option("batch_size", "batch_size and micro_batch_size must be >= 1"));
        }
        if self.epochs <= 0.0 || self.warmup_epochs < 0.0 || self.warmup_epochs > self.epochs {
            return Err(Error::option("epochs", "need epochs > 0 and 0 <= warmup_epochs <= epochs"));
        }
        Ok(())
    }
    pub fn accum_iter(&self) -> i64 {
        (self.batch_size + self.micro_batch_size - 1) / self.micro_batch_size
    }
    pub fn lr(&self) -> f64 {
        self.blr * self.batch_size as f64 / 256.0
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

/// The pooled feature the probe reads from a frozen encoder.
pub fn probe_features(model: &VisionTransformer, images: &Tensor, feature: &str, amp: Option<Kind>) -> Tensor {
    tch::no_grad(|| {
        with_amp(amp, || {
            let out = model.forward_features(images, &[], false);
            match feature {
                "avg" => out.patch_tokens().mean_dim(1, false, Some(Kind::Float)),
                _ => out.cls().to_kind(Kind::Float),
            }
        })
    })
}

/// Top-1 and top-5 accuracy in percent of `logits [N, C]` against `labels [N]`: counts of correct predictions.
pub fn topk_correct(logits: &Tensor, labels: &Tensor) -> (i64, i64) {
    let c = logits.size()[1];
    let k = c.min(5);
    let (_, idx) = logits.topk(k, 1, true, true);
    let hits = idx.eq_tensor(&labels.unsqueeze(1));
    let top1 = hits.narrow(1, 0, 1).sum(Kind::Int64).int64_value(&[]);
    let top5 = hits.any_dim(1, false).sum(Kind::Int64).int64_value(&[]);
    (top1, top5)
}

/// Where a linear run gets its batches: augmented training crops and evaluation crops, `[B, 3, S, S]` + labels.
pub trait ImageBatches {
    fn num_classes(&self) -> i64;
    fn train_batches_per_epoch(&self) -> usize;
    fn train_epoch(&self, epoch: usize) -> Box<dyn Iterator<Item = Result<(Tensor, Tensor)>> + '_>;
    fn val_batches(&self) -> Box<dyn Iterator<Item = Result<(Tensor, Tensor)>> + '_>;
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
}

/// Evaluates the head on the validation batches: (top1 %, top5 %).
pub fn evaluate(model: &VisionTransformer, head: &ProbeHead, data: &dyn ImageBatches, cfg: &LinearConfig, device: Device, amp: Option<Kind>) -> Result<(f64, f64)> {
    let (mut n, mut c1, mut c5) = (0i64, 0i64, 0i64);
    for b in data.val_batches() {
        let (x, y) = b?;
        let f = probe_features(model, &x.to_device(device), &cfg.feature, amp);
        let logits = tch::no_grad(|| head.forward(&f, false));
        let (a, b5) = topk_correct(&logits, &y.to_device(device));
        n += y.size()[0];
        c1 += a;
        c5 += b5;
    }
    if n == 0 {
        return Err(Error::data(Path::new("val"), "the validation split yielded no images"));
    }
    Ok((100.0 * c1 as f64 / n as f64, 100.0 * c5 as f64 / n as f64))
}

/// The MAE linear probe: LARS on the head, lr warmup from 0 then cosine, evaluation every `eval_every` epochs.
/// `log` receives one JSON object per epoch.
pub fn train_probe(
    model: &VisionTransformer,
    data: &dyn ImageBatches,
    cfg: &LinearConfig,
    device: Device,
    mut log: impl FnMut(&serde_json::Value),
) -> Result<LinearResult> {
    cfg.validate()?;
    let amp = match cfg.precision.as_str() {
        "bf16" => Some(Kind::BFloat16),
        "auto" if device.is_cuda() => Some(Kind::BFloat16),
        _ => None,
    };
    tch::manual_seed(cfg.seed as i64);
    let vs = nn::VarStore::new(device);
    let head = ProbeHead::new(&vs.root(), model.cfg.embed_dim, data.num_classes());
    let mut opt = Lars::new(head.params(), cfg.momentum, cfg.trust_coefficient);
    for p in &mut opt.params {
        p.weight_decay = cfg.weight_decay;
    }
    let accum = cfg.accum_iter() as usize;
    let per_epoch = data.train_batches_per_epoch();
    let epochs = cfg.epochs.ceil() as usize;
    let (mut best, mut best_epoch, mut last) = (f64::NEG_INFINITY, 0, (0.0, 0.0));
    let mut history = Vec::new();
    let mut lr = 0.0;
    let mut steps = 0i64;
    for epoch in 0..epochs {
        let mut loss_sum = 0.0;
        let mut seen = 0usize;
        for (it, b) in data.train_epoch(epoch).enumerate() {
            let (x, y) = b?;
            if it % accum == 0 {
                lr = lr_at_from_zero(epoch as f64 + it as f64 / per_epoch.max(1) as f64, cfg.lr(), cfg.min_lr, cfg.warmup_epochs, cfg.epochs);
            }
            let f = probe_features(model, &x.to_device(device), &cfg.feature, amp);
            let loss = head.forward(&f, true).cross_entropy_for_logits(&y.to_device(device));
            let lv = loss.double_value(&[]);
            if !lv.is_finite() {
                return Err(Error::Diverged(format!("linear probe loss is {lv} at epoch {epoch}, batch {it}")));
            }
            (loss / accum as f64).backward();
            loss_sum += lv;
            seen += 1;
            if (it + 1) % accum == 0 || it + 1 == per_epoch {
                opt.step(lr);
                opt.zero_grad();
                steps += 1;
            }
        }
        let mut entry = BTreeMap::from([("epoch".to_string(), epoch as f64 + 1.0), ("loss".to_string(), loss_sum / seen.max(1) as f64), ("lr".to_string(), lr)]);
        if (epoch + 1) % cfg.eval_every.max(1) == 0 || epoch + 1 == epochs {
            last = evaluate(model, &head, data, cfg, device, amp)?;
            entry.insert("val_top1".into(), last.0);
            entry.insert("val_top5".into(), last.1);
            if last.0 > best {
                best = last.0;
                best_epoch = epoch + 1;
            }
        }
        log(&serde_json::to_value(&entry).expect("json"));
        history.push(entry);
    }
    Ok(LinearResult { top1: last.0, top5: last.1, best_top1: best, best_epoch, history, steps })
}
