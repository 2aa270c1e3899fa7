//! `--protocol linear-sweep`: one backbone pass caches the CLS tokens of the last 4 blocks (after the final norm)
//! and the mean of the last block's patch tokens; then 52 linear heads train at once on those features —
//! {last 1, last 4 blocks} x {without, with avgpool} x 13 learning rates — with SGD (momentum 0.9) and a cosine
//! schedule, as DINOv2's linear evaluation. The best head is chosen on a held-out part of the training split,
//! never on the validation set, and reported on validation.
use std::collections::BTreeMap;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::record::{RecordBuilder, SplitPrint};
use super::{EvalRequest, Protocol};
use crate::checkpoint::load_vit_with;
use crate::data::loader::Loader;
use crate::info::device_name;
use crate::results::RunRecord;
use crate::train::step::topk_hits;
use crate::error::{Error, Result};
use crate::model::vit::with_amp;
use crate::model::VisionTransformer;

pub const LRS: [f64; 13] = [1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1];

/// `protocols/linear_sweep.toml`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct SweepConfig {
    pub version: String,
    pub epochs: usize,
    pub batch_size: i64,
    pub momentum: f64,
    /// Base learning rates; each is scaled by batch_size / 256.
    pub lrs: Vec<f64>,
    pub n_last_blocks: Vec<i64>,
    /// Fraction of the training split held out to choose the head, and the smallest held-out set.
    pub holdout_frac: f64,
    pub holdout_min: usize,
    pub seed: u64,
}

impl Default for SweepConfig {
    fn default() -> Self {
        SweepConfig {
            version: "dinov2-sweep-1".into(),
            epochs: 10,
            batch_size: 1024,
            momentum: 0.9,
            lrs: LRS.to_vec(),
            n_last_blocks: vec![1, 4],
            holdout_frac: 0.01,
            holdout_min: 1000,
            seed: 0,
        }
    }
}

impl crate::config::Recipe for SweepConfig {
    fn rules() -> Vec<crate::config::Rule> {
        use crate::config::Rule;
        vec![
            Rule::int("epochs", 1, 1 << 20),
            Rule::int("batch_size", 1, 1 << 24),
            Rule::below("momentum", 0.0, 1.0),
            // Per entry.
            Rule::above("lrs", 0.0, 1000.0),
            // The cache holds the CLS tokens of the last 4 blocks.
            Rule::int("n_last_blocks", 1, 4),
            Rule::below("holdout_frac", 0.0, 1.0),
            Rule::int("holdout_min", 0, 1 << 40),
            Rule::int("seed", 0, i64::MAX),
        ]
    }
}

impl SweepConfig {
    /// The table of every numeric key, and non-empty lists.
    pub fn validate(&self) -> Result<()> {
        crate::config::check_rules(self)?;
        if self.lrs.is_empty() {
            return Err(Error::option("lrs", "must be a non-empty list of positive learning rates"));
        }
        if self.n_last_blocks.is_empty() {
            return Err(Error::option("n_last_blocks", "must be a non-empty list of 1 to 4 blocks"));
        }
        Ok(())
    }
}

/// Cached features: `cls` `[N, 4, D]` (CLS of the last 4 blocks, oldest first, each after the final norm), `avg`
/// `[N, D]` (mean of the last block's normed patch tokens), `labels` `[N]`.
pub struct SweepFeatures {
    pub cls: Tensor,
    pub avg: Tensor,
    pub labels: Tensor,
}

impl SweepFeatures {
    pub fn len(&self) -> i64 {
        self.labels.size()[0]
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn select(&self, idx: &Tensor) -> SweepFeatures {
        SweepFeatures { cls: self.cls.index_select(0, idx), avg: self.avg.index_select(0, idx), labels: self.labels.index_select(0, idx) }
    }
    /// The head input for a (blocks, avgpool) choice: CLS of the last `n` blocks concatenated, then the avgpool.
    pub fn input(&self, n: i64, avgpool: bool) -> Tensor {
        let k = self.cls.size()[1];
        let cls = self.cls.narrow(1, k - n, n).flatten(1, 2);
        if avgpool {
            Tensor::cat(&[cls, self.avg.shallow_clone()], 1)
        } else {
            cls
        }
    }
}

/// Features of one batch of images for the sweep.
pub fn sweep_features(model: &VisionTransformer, images: &Tensor, amp: Option<Kind>) -> (Tensor, Tensor) {
    tch::no_grad(|| {
        with_amp(amp, || {
            let depth = model.blocks.len() as i64;
            let keep: Vec<i64> = (depth.saturating_sub(4)..depth).collect();
            let out = model.forward_features(images, &keep, false);
            let cls: Vec<Tensor> = out.intermediates.iter().map(|t| model.final_norm(&t.select(1, 0))).collect();
            let mut cls = Tensor::stack(&cls, 1).to_kind(Kind::Float);
            if cls.size()[1] < 4 {
                // Fewer than 4 blocks: repeat the first so that "last 4" is defined.
                let pad = cls.narrow(1, 0, 1).repeat([1, 4 - cls.size()[1], 1]);
                cls = Tensor::cat(&[pad, cls], 1);
            }
            (cls, out.patch_tokens().mean_dim(1, false, Some(Kind::Float)))
        })
    })
}

/// One head's scores.
#[derive(Debug, Clone, Serialize)]
pub struct HeadScore {
    pub n_last_blocks: i64,
    pub avgpool: bool,
    pub lr: f64,
    pub holdout_top1: f64,
    pub val_top1: f64,
    pub val_top5: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SweepResult {
    pub best: HeadScore,
    pub heads: Vec<HeadScore>,
    pub holdout_size: i64,
    pub train_size: i64,
}

/// A group of heads sharing one input: a single `[H*C, in]` weight, trained with per-head learning rates.
struct HeadGroup {
    n: i64,
    avgpool: bool,
    w: Tensor,
    b: Tensor,
    buf_w: Tensor,
    buf_b: Tensor,
    lrs: Tensor,
}

fn scores(logits: &Tensor, labels: &Tensor, heads: i64, classes: i64) -> Vec<(f64, f64)> {
    let n = labels.size()[0].max(1);
    let logits = logits.view([-1, heads, classes]);
    // One host read for all heads.
    let hits = Tensor::stack(&(0..heads).map(|h| topk_hits(&logits.select(1, h), labels)).collect::<Vec<_>>(), 0);
    let v = crate::device::read_f64s(&hits).expect("hit counts read back");
    v.chunks(2).map(|c| (100.0 * c[0] / n as f64, 100.0 * c[1] / n as f64)).collect()
}

/// Trains all heads on `train` (minus a held-out part), chooses on the held-out part, reports on `val`.
pub fn run_sweep(train: &SweepFeatures, val: &SweepFeatures, classes: i64, cfg: &SweepConfig, device: Device) -> Result<SweepResult> {
    cfg.validate()?;
    if train.len() < 2 || val.is_empty() {
        return Err(Error::option("data", "the sweep needs at least 2 training and 1 validation images"));
    }
    let n_all = train.len();
    let holdout = ((n_all as f64 * cfg.holdout_frac).ceil() as i64).max((cfg.holdout_min as i64).min(n_all / 5)).clamp(1, n_all - 1);
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut perm: Vec<i64> = (0..n_all).collect();
    perm.shuffle(&mut rng);
    let hold = train.select(&Tensor::from_slice(&perm[..holdout as usize]));
    let fit = train.select(&Tensor::from_slice(&perm[holdout as usize..]));
    tch::manual_seed(cfg.seed as i64);
    let scale = crate::train::scaled_lr(1.0, cfg.batch_size);
    let h = cfg.lrs.len() as i64;
    let mut groups: Vec<HeadGroup> = Vec::new();
    for &n in &cfg.n_last_blocks {
        for avgpool in [false, true] {
            let dim = fit.input(n, avgpool).size()[1];
            let w = (Tensor::randn([h * classes, dim], (Kind::Float, device)) * 0.01).set_requires_grad(true);
            let b = Tensor::zeros([h * classes], (Kind::Float, device)).set_requires_grad(true);
            let lrs: Vec<f32> = cfg.lrs.iter().flat_map(|&lr| std::iter::repeat((lr * scale) as f32).take(classes as usize)).collect();
            groups.push(HeadGroup { n, avgpool, buf_w: w.zeros_like(), buf_b: b.zeros_like(), w, b, lrs: Tensor::from_slice(&lrs).to_device(device) });
        }
    }
    let inputs: Vec<Tensor> = groups.iter().map(|g| fit.input(g.n, g.avgpool).to_device(device)).collect();
    let labels = fit.labels.to_device(device);
    let nf = fit.len();
    let bs = cfg.batch_size.min(nf).max(1);
    let per_epoch = (nf / bs).max(1);
    let total = (per_epoch * cfg.epochs as i64).max(1);
    let mut it = 0i64;
    for epoch in 0..cfg.epochs {
        let order = Tensor::randperm(nf, (Kind::Int64, Device::Cpu));
        let _ = epoch;
        for k in 0..per_epoch {
            let idx = order.narrow(0, k * bs, bs).to_device(device);
            let y = labels.index_select(0, &idx);
            // Cosine from 1 to 0 over all iterations, applied to every head's own lr.
            let factor = 0.5 * (1.0 + (std::f64::consts::PI * it as f64 / total as f64).cos());
            for (g, x) in groups.iter_mut().zip(&inputs) {
                let logits = x.index_select(0, &idx).linear(&g.w, Some(&g.b)).view([bs, h, classes]);
                // Sum over heads of each head's mean cross entropy: the heads' gradients stay separate.
                let loss = logits.transpose(1, 2).cross_entropy_loss::<Tensor>(&y.unsqueeze(1).expand([bs, h], false), None, tch::Reduction::Mean, -100, 0.0) * h as f64;
                let (gw, gb) = {
                    let g2 = Tensor::run_backward(&[loss], &[&g.w, &g.b], false, false);
                    (g2[0].shallow_clone(), g2[1].shallow_clone())
                };
                tch::no_grad(|| {
                    let _ = g.buf_w.g_mul_scalar_(cfg.momentum).g_add_(&gw);
                    let _ = g.buf_b.g_mul_scalar_(cfg.momentum).g_add_(&gb);
                    let _ = g.w.g_sub_(&(&g.buf_w * g.lrs.unsqueeze(1) * factor));
                    let _ = g.b.g_sub_(&(&g.buf_b * &g.lrs * factor));
                });
            }
            it += 1;
        }
    }
    let mut heads = Vec::new();
    tch::no_grad(|| {
        for g in &groups {
            let eval = |f: &SweepFeatures| scores(&f.input(g.n, g.avgpool).to_device(device).linear(&g.w, Some(&g.b)), &f.labels.to_device(device), h, classes);
            let (hs, vs) = (eval(&hold), eval(val));
            for (i, &lr) in cfg.lrs.iter().enumerate() {
                heads.push(HeadScore { n_last_blocks: g.n, avgpool: g.avgpool, lr, holdout_top1: hs[i].0, val_top1: vs[i].0, val_top5: vs[i].1 });
            }
        }
    });
    // Ties on the held-out set go to the earlier head (smaller lr, fewer blocks), a fixed rule.
    let best = heads.iter().fold(None::<&HeadScore>, |acc, hd| match acc {
        Some(a) if a.holdout_top1 >= hd.holdout_top1 => Some(a),
        _ => Some(hd),
    });
    let best = best.cloned().expect("at least one head");
    Ok(SweepResult { best, heads, holdout_size: holdout, train_size: nf })
}

/// A compact per-head table for the results record.
pub fn heads_json(r: &SweepResult) -> serde_json::Value {
    let rows: Vec<BTreeMap<&str, serde_json::Value>> = r
        .heads
        .iter()
        .map(|h| {
            BTreeMap::from([
                ("blocks", serde_json::json!(h.n_last_blocks)),
                ("avgpool", serde_json::json!(h.avgpool)),
                ("lr", serde_json::json!(h.lr)),
                ("holdout_top1", serde_json::json!(h.holdout_top1)),
                ("val_top1", serde_json::json!(h.val_top1)),
            ])
        })
        .collect();
    serde_json::json!(rows)
}

/// The sweep's features of a whole split, on the CPU.
fn split_features(model: &VisionTransformer, ld: &Loader, device: Device, amp: Option<Kind>) -> Result<SweepFeatures> {
    let (mut cls, mut avg, mut labels) = (Vec::new(), Vec::new(), Vec::new());
    for b in crate::device::stage_ahead(ld.epoch(0), |b| crate::data::loader::stage_images(b, device)) {
        let b = b?;
        let (c, a) = sweep_features(model, &b.images, amp);
        cls.push(c.to_device(Device::Cpu));
        avg.push(a.to_device(Device::Cpu));
        labels.push(b.labels);
    }
    if labels.is_empty() {
        return Err(Error::data(ld.dataset().dir.clone(), "the split yielded no images"));
    }
    Ok(SweepFeatures { cls: Tensor::cat(&cls, 0), avg: Tensor::cat(&avg, 0), labels: Tensor::cat(&labels, 0) })
}

/// `eval --protocol linear-sweep`: one backbone pass per split, then every head on the cached features. It stays
/// a one-process job: after the feature pass, all 52 heads over ImageNet's cached rows are minutes of work.
pub fn run(req: &EvalRequest) -> Result<RunRecord> {
    if crate::dist::world().is_distributed() {
        return Err(Error::option("--protocol", "linear-sweep runs in one process (after one feature pass its 52 heads train on cached features in minutes): start it without torchrun or srun"));
    }
    let loaded = Protocol::LinearSweep.load::<SweepConfig>(req.protocol_file.as_deref(), &req.sets)?;
    let cfg = &loaded.cfg;
    cfg.validate()?;
    let device = req.run.device()?;
    let precision = req.run.precision.unwrap_or_default();
    let amp = precision.autocast(device);
    let ckpt = req.checkpoint()?;
    let enc = load_vit_with(ckpt, &req.load_options(), device, 0)?;
    if !enc.model.cfg.class_token {
        return Err(Error::option("--checkpoint", format!("{} has no CLS token; the sweep's heads read CLS tokens", ckpt.display())));
    }
    let (train_ds, val_ds) = super::open_splits(req.data()?, &req.run)?;
    let prints = [SplitPrint::of_dataset("train", &train_ds)?, SplitPrint::of_dataset("val", &val_ds)?];
    let classes = train_ds.classes.len() as i64;
    let overrides = loaded.overrides(&[]);
    let b = RecordBuilder::new(Protocol::LinearSweep, &cfg.version, &overrides);
    let t = super::extract::eval_transform(enc.model.cfg.img_size, 0.875)?;
    let t0 = std::time::Instant::now();
    let train_ld = super::eval_loader(train_ds, t.clone(), req.run.batch_size, &req.run, false)?;
    let val_ld = super::eval_loader(val_ds, t, req.run.batch_size, &req.run, false)?;
    let train = split_features(&enc.model, &train_ld, device, amp)?;
    let val = split_features(&enc.model, &val_ld, device, amp)?;
    let extract_s = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    let res = run_sweep(&train, &val, classes, cfg, device)?;
    let extra = serde_json::json!({ "precision": precision.effective(device) });
    b.model(req.model_name("model"), Some(ckpt), Some(enc.sha256.clone()), Some(enc.model.cfg.arch.clone()))
        .source(serde_json::to_value(&enc.source).ok())
        .data(Some(req.data()?.display().to_string()), &prints)
        .config(&loaded.origin, cfg, &overrides, &req.run, extra)
        .seed(cfg.seed)
        .metric("top1", res.best.val_top1)
        .metric("top5", res.best.val_top5)
        .metric("holdout_top1", res.best.holdout_top1)
        .finish(
            serde_json::json!({
                "best": res.best, "heads": heads_json(&res), "holdout_size": res.holdout_size, "train_size": res.train_size,
                "extract_s": extract_s, "train_heads_s": t1.elapsed().as_secs_f64(),
                "selection": "best head on a held-out part of the training split, reported on val",
            }),
            &device_name(device),
            &req.output,
        )
}
