//! The training-step skeleton shared by pretraining, the linear probe and fine-tuning: a protocol says how a
//! micro-batch becomes a loss ([`TrainStep`]); [`run_epoch`] owns everything around it — the schedule at the start
//! of each optimiser step, backward of `loss / accum`, the NaN stop, clipping, the optimiser step, the EMA hook and
//! the per-step callback where the caller logs and checkpoints. The split follows burn's `TrainStep` / `Learner`.
//!
//! One rule for every protocol (the reference's `drop_last=True` loaders and `(it + 1) % accum_iter == 0` steps):
//! an epoch has `floor(batches / accum)` optimiser steps and the micro-batches of a trailing partial step are not
//! used. The top-k evaluation loop ([`evaluate_topk`]) is shared the same way.
//!
//! Data parallel ([`crate::dist`]): rank r's local micro-batch `it` is the epoch's global micro-batch
//! `it * world + r` (the loader deals global micro-batches out round-robin), which keys the randomness of `loss`, so
//! world 2 x accum 1 makes the same micro-batches with the same random draws as world 1 x accum 2. At the last
//! micro-batch of a step the ranks sum their losses (and divergence flags) and average their gradients, then clip
//! and step identically.
use tch::{Kind, Tensor};

use super::optim::{grad_norm, AdamW, Lars, Param};
use crate::error::{Error, Result};

/// What the step skeleton needs of an optimiser.
pub trait Optimizer {
    fn step(&mut self, lr: f64);
    fn zero_grad(&mut self);
    /// Global L2 norm of the gradients, clipping them to `max_norm` when given.
    fn grad_norm(&self, max_norm: Option<f64>) -> f64;
    /// The parameters it updates (their gradients are averaged over ranks before the step).
    fn params(&self) -> &[Param];
}

impl Optimizer for AdamW {
    fn step(&mut self, lr: f64) {
        AdamW::step(self, lr)
    }
    fn zero_grad(&mut self) {
        AdamW::zero_grad(self)
    }
    fn grad_norm(&self, max_norm: Option<f64>) -> f64 {
        AdamW::grad_norm(self, max_norm)
    }
    fn params(&self) -> &[Param] {
        &self.params
    }
}

impl Optimizer for Lars {
    fn step(&mut self, lr: f64) {
        Lars::step(self, lr)
    }
    fn zero_grad(&mut self) {
        Lars::zero_grad(self)
    }
    fn grad_norm(&self, max_norm: Option<f64>) -> f64 {
        grad_norm(self.params.iter().map(|p| &p.tensor), max_norm)
    }
    fn params(&self) -> &[Param] {
        &self.params
    }
}

/// One protocol's step: the schedule, the loss of a micro-batch and the hooks around the optimiser step.
pub trait TrainStep {
    type Batch;
    /// Images in a batch (for img/s).
    fn batch_len(batch: &Self::Batch) -> usize;
    /// Called before the first micro-batch of every optimiser step with the fractional epoch
    /// `t = epoch + iter / batches_per_epoch`; returns the learning rate of the step (EMA updates that the
    /// reference makes before the forward pass go here too).
    fn begin_step(&mut self, t: f64) -> f64;
    /// The loss of one micro-batch, with the graph for backward. `epoch` and `iter` key its randomness.
    fn loss(&mut self, batch: Self::Batch, epoch: usize, iter: usize) -> Result<Tensor>;
    fn optimizer(&mut self) -> &mut dyn Optimizer;
    /// After every optimiser step (e.g. the model EMA of fine-tuning).
    fn end_step(&mut self) {}
    /// Names the run in a divergence message.
    fn what(&self) -> &'static str;
}

/// Accumulation and clipping of a run.
#[derive(Debug, Clone, Copy)]
pub struct StepRule {
    pub accum: usize,
    pub clip: Option<f64>,
}

impl StepRule {
    /// Micro-batches of this rank that an epoch of `batches_per_epoch` global micro-batches uses (whole optimiser
    /// steps of `accum` x world micro-batches only).
    pub fn used_iters(&self, batches_per_epoch: usize) -> usize {
        let accum = self.accum.max(1);
        batches_per_epoch / (accum * crate::dist::world().size) * accum
    }
}

/// What the callback sees after each optimiser step.
#[derive(Debug, Clone)]
pub struct StepEvent {
    pub epoch: usize,
    /// This rank's next micro-batch of the epoch (`used_iters` at the end of the epoch); times the world size,
    /// the global position.
    pub next_iter: usize,
    /// Optimiser steps done in the run.
    pub step: i64,
    /// Mean loss over the step's micro-batches.
    pub loss: f64,
    pub lr: f64,
    /// Only when computed: with clipping on, or when `want_norm(step)` asked for it.
    pub grad_norm: Option<f64>,
    pub images: usize,
    pub epoch_end: bool,
}

/// Whether the callback lets the run go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// The epoch's state the skeleton hands back.
#[derive(Debug, Clone, Copy, Default)]
pub struct EpochStats {
    pub loss_sum: f64,
    pub micro_batches: usize,
    pub steps: usize,
    pub lr: f64,
    pub stopped: bool,
}

impl EpochStats {
    pub fn mean_loss(&self) -> f64 {
        self.loss_sum / self.micro_batches.max(1) as f64
    }
}

/// Runs this rank's micro-batches `start_iter..used_iters` of `epoch` from `batches` (which starts at
/// `start_iter`); `batches_per_epoch` counts the epoch's micro-batches over all ranks.
/// `step` counts optimiser steps over the run; `want_norm(step)` says when the gradient norm is wanted without
/// clipping (it costs a pass over the gradients and a device sync).
#[allow(clippy::too_many_arguments)]
pub fn run_epoch<S: TrainStep + ?Sized>(
    s: &mut S,
    rule: StepRule,
    batches: &mut dyn Iterator<Item = Result<S::Batch>>,
    epoch: usize,
    start_iter: usize,
    batches_per_epoch: usize,
    step: &mut i64,
    want_norm: &dyn Fn(i64) -> bool,
    on_step: &mut dyn FnMut(&mut S, &StepEvent) -> Result<Flow>,
) -> Result<EpochStats> {
    let accum = rule.accum.max(1);
    let used = rule.used_iters(batches_per_epoch);
    let world = crate::dist::world();
    let mut st = EpochStats::default();
    let (mut step_loss, mut step_images, mut bad) = (0.0, 0usize, None);
    for it in start_iter..used {
        let batch = batches
            .next()
            .ok_or_else(|| Error::data("<loader>", format!("the data ended early in epoch {epoch} at batch {it} of {used}")))??;
        if it % accum == 0 {
            st.lr = s.begin_step(epoch as f64 + (it * world.size) as f64 / batches_per_epoch as f64);
            step_loss = 0.0;
            step_images = 0;
        }
        step_images += S::batch_len(&batch);
        let global_it = it * world.size + world.rank;
        let loss = s.loss(batch, epoch, global_it)?;
        let lv = loss.double_value(&[]);
        if !lv.is_finite() {
            let msg = format!("{} loss is {lv} at step {} (epoch {epoch}, micro-batch {global_it})", s.what(), *step + 1);
            // The other ranks learn of it at the end of the step instead of waiting in the all-reduce.
            if !world.is_distributed() {
                return Err(Error::Diverged(msg));
            }
            bad.get_or_insert(msg);
        } else if accum > 1 {
            (loss / accum as f64).backward();
        } else {
            loss.backward();
        }
        step_loss += lv;
        st.loss_sum += lv;
        st.micro_batches += 1;
        if (it + 1) % accum != 0 {
            continue;
        }
        if world.is_distributed() {
            let sums = world.sum_f64(&[step_loss, bad.is_some() as u8 as f64], "the loss all-reduce")?;
            if sums[1] > 0.0 {
                let mine = bad.map_or(String::new(), |m| format!(": {m} on rank {}", world.rank));
                return Err(Error::Diverged(format!("{} loss is not finite on {} of {} ranks at step {}{mine}", s.what(), sums[1], world.size, *step + 1)));
            }
            step_loss = sums[0] / world.size as f64;
            world.average_gradients(s.optimizer().params().iter().map(|p| &p.tensor))?;
        }
        let opt = s.optimizer();
        let grad_norm = (rule.clip.is_some() || want_norm(*step + 1)).then(|| opt.grad_norm(rule.clip));
        opt.step(st.lr);
        opt.zero_grad();
        s.end_step();
        *step += 1;
        st.steps += 1;
        let ev = StepEvent {
            epoch,
            next_iter: it + 1,
            step: *step,
            loss: step_loss / accum as f64,
            lr: st.lr,
            grad_norm,
            images: step_images,
            epoch_end: it + 1 == used,
        };
        if on_step(s, &ev)? == Flow::Stop {
            st.stopped = true;
            break;
        }
    }
    if world.is_distributed() {
        let sums = world.sum_f64(&[st.loss_sum, st.micro_batches as f64], "the epoch loss all-reduce")?;
        st.loss_sum = sums[0];
        st.micro_batches = sums[1] as usize;
    }
    Ok(st)
}

/// Top-1 / top-5 hits of `logits [N, C]` against `labels [N]` (top-5 over min(5, C) classes).
pub fn topk_correct(logits: &Tensor, labels: &Tensor) -> (i64, i64) {
    let c = logits.size()[1];
    let (_, idx) = logits.topk(c.min(5), 1, true, true);
    let hits = idx.eq_tensor(&labels.unsqueeze(1));
    let top1 = hits.narrow(1, 0, 1).sum(Kind::Int64).int64_value(&[]);
    let top5 = hits.any_dim(1, false).sum(Kind::Int64).int64_value(&[]);
    (top1, top5)
}

/// Top-1 and top-5 accuracy in percent over evaluation batches `(images, labels)`; `logits` runs the model
/// (without grad). An empty split is an error naming `split`.
pub fn evaluate_topk(
    batches: impl Iterator<Item = Result<(Tensor, Tensor)>>,
    split: &std::path::Path,
    mut logits: impl FnMut(&Tensor) -> Tensor,
) -> Result<(f64, f64)> {
    let (mut n, mut c1, mut c5) = (0i64, 0i64, 0i64);
    for b in batches {
        let (x, y) = b?;
        let out = tch::no_grad(|| logits(&x));
        let (a, a5) = topk_correct(&out, &y.to_device(out.device()));
        n += y.size()[0];
        c1 += a;
        c5 += a5;
    }
    // Each rank saw its shard of the split (see `protocols::eval_loader`).
    let sums = crate::dist::world().sum_f64(&[n as f64, c1 as f64, c5 as f64], "the evaluation all-reduce")?;
    let (n, c1, c5) = (sums[0], sums[1], sums[2]);
    if n == 0.0 {
        return Err(Error::data(split, "the split yielded no images"));
    }
    Ok((100.0 * c1 / n, 100.0 * c5 / n))
}

/// One optimiser step of `s` over `micro_batches` (accumulated), through the same [`run_epoch`] as the
/// commands: what `bench` times. `index` keys the randomness. Returns the step's mean loss.
pub fn one_step<S: TrainStep + ?Sized>(s: &mut S, micro_batches: Vec<S::Batch>, index: usize, clip: Option<f64>) -> Result<f64> {
    let n = micro_batches.len();
    let rule = StepRule { accum: n.max(1), clip };
    let mut it = micro_batches.into_iter().map(Ok);
    let (mut loss, mut step) = (f64::NAN, 0i64);
    // Every rank brings `n` micro-batches: the step has n x world of them.
    run_epoch(s, rule, &mut it, index, 0, n * crate::dist::world().size, &mut step, &|_| false, &mut |_, ev| {
        loss = ev.loss;
        Ok(Flow::Continue)
    })?;
    Ok(loss)
}
