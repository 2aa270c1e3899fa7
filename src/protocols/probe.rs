//! The training loop that the linear probe and the attentive probe share: MAE's main_linprobe.py recipe (LARS on the
//! head, lr warmup from 0 then cosine per step, whole optimiser steps only, `drop_last`) around a head on a frozen
//! encoder, an evaluation every `eval_every` epochs and the best epoch kept.
use std::collections::BTreeMap;

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::data::loader::{stage_batch, Batch, Loader};
use crate::error::{Error, Result};
use crate::device::{to_device_async, Ready};
use crate::train::optim::Lars;
use crate::train::schedule::lr_at_from_zero;
use crate::train::step::{evaluate_topk, run_epoch, Flow, Optimizer, StepRule, TrainStep};

/// What a probe reads from its frozen encoder: a pooled feature `[B, D]` or tokens `[B, N, D]` (no grad, f32).
pub trait FrozenInput {
    fn read(&self, images: &Tensor, amp: Option<Kind>) -> Tensor;
}

/// A probe head with a non-affine BatchNorm in it, whose running statistics are moved outside the forward pass so
/// that a data-parallel step applies every rank's statistics in global micro-batch order
/// ([`super::linear::gather_bn_stats`]): the head then does not depend on the number of ranks.
pub trait BnHead {
    /// The probe's name in messages ("linear probe").
    const WHAT: &'static str;
    /// Training-mode logits (normalised with the batch's statistics, as BatchNorm1d in train mode) and the batch's
    /// statistics `[2, D]` (mean, unbiased variance), the running ones untouched.
    fn forward_train(&self, x: &Tensor) -> (Tensor, Tensor);
    /// Eval-mode logits (normalised with the running statistics).
    fn forward_eval(&self, x: &Tensor) -> Tensor;
    /// Moves the running statistics by each batch's statistics in turn (BatchNorm1d's momentum-0.1 update).
    fn update_running(&self, stats: &[Tensor]);
    /// The head's state dict under the reference code's names (on the CPU, copied).
    fn state_dict(&self) -> Vec<(String, Tensor)>;
    /// Logits of `x`; `train` normalises with the batch's statistics and moves the running ones by this batch, as
    /// the PyTorch module does in one process.
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        if !train {
            return self.forward_eval(x);
        }
        let (logits, stats) = self.forward_train(x);
        self.update_running(&[stats]);
        logits
    }
}

/// A head on a frozen encoder.
pub struct Probe<'a, I: FrozenInput, H: BnHead> {
    pub input: &'a I,
    pub head: &'a H,
}

/// The schedule keys both probe recipes have.
#[derive(Debug, Clone, Copy)]
pub struct ProbeSchedule {
    /// The peak lr (blr * batch_size / 256).
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_epochs: f64,
    pub epochs: f64,
    /// Micro-batches per optimiser step on each rank.
    pub accum: usize,
    pub batch_size: i64,
    pub micro_batch_size: i64,
    pub eval_every: usize,
}

/// What a probe run gives: top-1 / top-5 at the last epoch and at the best one.
#[derive(Debug, Serialize)]
pub struct ProbeRun {
    pub top1: f64,
    pub top5: f64,
    pub best_top1: f64,
    pub best_top5: f64,
    pub best_epoch: usize,
    pub history: Vec<BTreeMap<String, f64>>,
    pub steps: i64,
    pub steps_per_epoch: usize,
    /// The head's state dict at the best epoch (the earliest of equal ones).
    #[serde(skip)]
    pub best_state: Vec<(String, Tensor)>,
}

struct ProbeStep<'a, I: FrozenInput, H: BnHead> {
    probe: &'a Probe<'a, I, H>,
    opt: Lars,
    sched: &'a ProbeSchedule,
    device: Device,
    amp: Option<Kind>,
    world: &'static crate::dist::World,
}

impl<I: FrozenInput, H: BnHead> TrainStep for ProbeStep<'_, I, H> {
    type Batch = Batch;
    fn batch_len(b: &Batch) -> usize {
        b.indices.len()
    }
    fn begin_step(&mut self, t: f64) -> f64 {
        lr_at_from_zero(t, self.sched.lr, self.sched.min_lr, self.sched.warmup_epochs, self.sched.epochs)
    }
    fn stage(&self, b: Batch) -> Result<(Batch, Ready)> {
        stage_batch(b, self.device)
    }
    fn loss(&mut self, b: Batch, _epoch: usize, _iter: usize) -> Result<Tensor> {
        let (logits, stats) = self.probe.head.forward_train(&self.probe.input.read(&to_device_async(&b.images, self.device), self.amp));
        self.probe.head.update_running(&super::linear::gather_bn_stats(self.world, &stats)?);
        Ok(logits.cross_entropy_for_logits(&to_device_async(&b.labels, self.device)))
    }
    fn optimizer(&mut self) -> &mut dyn Optimizer {
        &mut self.opt
    }
    fn what(&self) -> &'static str {
        H::WHAT
    }
}

/// Top-1 / top-5 of the probe on the validation loader.
pub fn evaluate<I: FrozenInput, H: BnHead>(probe: &Probe<I, H>, val: &Loader, device: Device, amp: Option<Kind>) -> Result<(f64, f64)> {
    let batches = val.epoch(0).map(|b| b.map(|b| (b.images, b.labels)));
    evaluate_topk(crate::dist::world(), device, batches, &val.dataset().dir, |x| probe.head.forward_eval(&probe.input.read(x, amp)))
}

/// Trains the probe's head with `opt` for `sched.epochs` epochs. `log` receives one JSON object per epoch.
pub fn fit<I: FrozenInput, H: BnHead>(
    probe: &Probe<I, H>,
    opt: Lars,
    sched: &ProbeSchedule,
    train: &Loader,
    val: &Loader,
    device: Device,
    amp: Option<Kind>,
    mut log: impl FnMut(&serde_json::Value) -> Result<()>,
) -> Result<ProbeRun> {
    let world = crate::dist::world();
    let rule = StepRule { accum: sched.accum, clip: None, world };
    let per_epoch = train.global_batches();
    if rule.used_iters(per_epoch) == 0 {
        return Err(Error::option("batch_size", format!("the train split gives {per_epoch} micro-batches of {}, fewer than one step of {}", sched.micro_batch_size, sched.batch_size)));
    }
    let mut st = ProbeStep { probe, opt, sched, device, amp, world };
    let epochs = sched.epochs.ceil() as usize;
    let mut res = ProbeRun { top1: 0.0, top5: 0.0, best_top1: f64::NEG_INFINITY, best_top5: 0.0, best_epoch: 0, history: Vec::new(), steps: 0, steps_per_epoch: rule.used_iters(per_epoch) / rule.accum, best_state: Vec::new() };
    for epoch in 0..epochs {
        let mut batches = train.epoch(epoch as u64);
        let stats = run_epoch(&mut st, rule, &mut batches, epoch, 0, per_epoch, &mut res.steps, &|_| false, &mut |_, _| Ok(Flow::Continue))?;
        let mut entry = BTreeMap::from([("epoch".to_string(), epoch as f64 + 1.0), ("loss".to_string(), stats.mean_loss()), ("lr".to_string(), stats.lr), ("step".to_string(), res.steps as f64)]);
        if (epoch + 1) % sched.eval_every.max(1) == 0 || epoch + 1 == epochs {
            (res.top1, res.top5) = evaluate(probe, val, device, amp)?;
            entry.insert("val_top1".into(), res.top1);
            entry.insert("val_top5".into(), res.top5);
            // Strictly better, as main_linprobe.py's `acc1 > max_accuracy`: the earliest of equal epochs is kept.
            if res.top1 > res.best_top1 {
                (res.best_top1, res.best_top5, res.best_epoch) = (res.top1, res.top5, epoch + 1);
                res.best_state = probe.head.state_dict();
            }
        }
        log(&serde_json::to_value(&entry).expect("json"))?;
        res.history.push(entry);
    }
    Ok(res)
}
