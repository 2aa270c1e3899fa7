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

use crate::device::{read_f64s, stage_ahead, stage_pair, Ready};
use super::optim::{grad_norm, AdamW, Lars, Param};
use crate::dist::World;
use crate::error::{Error, Result};

/// What the step skeleton needs of an optimiser.
pub trait Optimizer {
    /// One update, skipped when `skip` (a one-element device tensor) is non-zero.
    fn step(&mut self, lr: f64, skip: Option<&Tensor>);
    fn zero_grad(&mut self);
    /// Global L2 norm of the gradients as a device scalar, clipping them to `max_norm` when given.
    fn grad_norm(&self, max_norm: Option<f64>) -> Tensor;
    /// The parameters it updates (their gradients are averaged over ranks before the step).
    fn params(&self) -> &[Param];
}

impl Optimizer for AdamW {
    fn step(&mut self, lr: f64, skip: Option<&Tensor>) {
        AdamW::step_unless(self, lr, skip)
    }
    fn zero_grad(&mut self) {
        AdamW::zero_grad(self)
    }
    fn grad_norm(&self, max_norm: Option<f64>) -> Tensor {
        AdamW::grad_norm(self, max_norm)
    }
    fn params(&self) -> &[Param] {
        &self.params
    }
}

impl Optimizer for Lars {
    fn step(&mut self, lr: f64, skip: Option<&Tensor>) {
        Lars::step_unless(self, lr, skip)
    }
    fn zero_grad(&mut self) {
        Lars::zero_grad(self)
    }
    fn grad_norm(&self, max_norm: Option<f64>) -> Tensor {
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
    /// Moves a host batch to the device ahead of its step ([`copy_ahead`]): [`run_epoch`] stages micro-batch
    /// i + 1 before it runs micro-batch i, so on CUDA the copy overlaps step i, and waits on the returned
    /// [`Ready`] just before micro-batch i + 1's kernels. The default leaves the batch where it is (`loss` moves it).
    fn stage(&self, batch: Self::Batch) -> Result<(Self::Batch, Ready)> {
        Ok((batch, Ready::now()))
    }
    /// The loss of one micro-batch, with the graph for backward. `epoch` and `iter` key its randomness.
    fn loss(&mut self, batch: Self::Batch, epoch: usize, iter: usize) -> Result<Tensor>;
    fn optimizer(&mut self) -> &mut dyn Optimizer;
    /// After every optimiser step (e.g. the model EMA of fine-tuning).
    fn end_step(&mut self) {}
    /// Names the run in a divergence message.
    fn what(&self) -> &'static str;
}

/// Accumulation and clipping of a run, and the world it runs in (passed, not looked up: the ranks that sum the
/// losses and average the gradients are the caller's).
#[derive(Clone, Copy)]
pub struct StepRule {
    pub accum: usize,
    pub clip: Option<f64>,
    pub world: &'static World,
}

impl StepRule {
    /// Micro-batches of this rank that an epoch of `batches_per_epoch` global micro-batches uses (whole optimiser
    /// steps of `accum` x world micro-batches only).
    pub fn used_iters(&self, batches_per_epoch: usize) -> usize {
        let accum = self.accum.max(1);
        batches_per_epoch / (accum * self.world.size) * accum
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
    /// Mean loss over the step's micro-batches; read from the device only at the steps `sync_at` names and at
    /// the end of the epoch (`None` elsewhere).
    pub loss: Option<f64>,
    pub lr: f64,
    /// Read with the loss, at a synced step (computed on every step, for the skip of a non-finite one).
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

/// A step whose values are still on the device: `[loss sum over its micro-batches (all ranks), NaN losses, inf
/// losses (micro-batches of all ranks), grad norm or 0]`.
struct Pending {
    step: i64,
    first_iter: usize,
    values: Tensor,
}

/// Runs this rank's micro-batches `start_iter..used_iters` of `epoch` from `batches` (which starts at
/// `start_iter`); `batches_per_epoch` counts the epoch's micro-batches over all ranks.
/// `step` counts optimiser steps over the run. Nothing is read from the device except at the steps where
/// `sync_at(step)` is true and at the end of the epoch: there the losses, gradient norms and divergence flags of
/// the steps since the last read come back in one read. A non-finite loss or gradient norm skips its optimiser
/// step on the device (see [`Optimizer::step`]), and the next read stops the run naming that step, so a
/// diverged update never reaches the weights even though it is noticed a few steps late.
#[allow(clippy::too_many_arguments)]
pub fn run_epoch<S: TrainStep + ?Sized>(
    s: &mut S,
    rule: StepRule,
    batches: &mut dyn Iterator<Item = Result<S::Batch>>,
    epoch: usize,
    start_iter: usize,
    batches_per_epoch: usize,
    step: &mut i64,
    sync_at: &dyn Fn(i64) -> bool,
    on_step: &mut dyn FnMut(&mut S, &StepEvent) -> Result<Flow>,
) -> Result<EpochStats> {
    let accum = rule.accum.max(1);
    let used = rule.used_iters(batches_per_epoch);
    let world = rule.world;
    let mut st = EpochStats::default();
    let mut pending: Vec<Pending> = Vec::new();
    let mut epoch_loss: Option<Tensor> = None;
    let (mut step_loss, mut step_bad, mut step_images, mut first_iter) = (None::<Tensor>, None::<Tensor>, 0usize, 0usize);
    let mut next_batch = |s: &S, it: usize| -> Result<(S::Batch, Ready)> {
        let batch = batches
            .next()
            .ok_or_else(|| Error::data("<loader>", format!("the data ended early in epoch {epoch} at batch {it} of {used}")))??;
        s.stage(batch)
    };
    // One micro-batch is staged ahead; its error (a failed read) is raised when its turn comes.
    let mut ahead = (start_iter < used).then(|| next_batch(s, start_iter));
    let mut epoch_read = false;
    for it in start_iter..used {
        let (batch, ready) = ahead.take().expect("staged before its turn")?;
        ahead = (it + 1 < used).then(|| next_batch(s, it + 1));
        ready.wait()?;
        let global_it = it * world.size + world.rank;
        if it % accum == 0 {
            st.lr = s.begin_step(epoch as f64 + (it * world.size) as f64 / batches_per_epoch as f64);
            step_loss = None;
            step_bad = None;
            step_images = 0;
            first_iter = global_it;
        }
        step_images += S::batch_len(&batch);
        let loss = s.loss(batch, epoch, global_it)?;
        let lv = loss.detach().to_kind(Kind::Double);
        let bad = Tensor::stack(&[lv.isnan(), lv.isinf()], 0).to_kind(Kind::Double);
        if accum > 1 {
            (loss / accum as f64).backward();
        } else {
            loss.backward();
        }
        // A non-finite loss adds 0 to the sums; the divergence count carries it.
        let lv = lv.nan_to_num(0.0, 0.0, 0.0);
        epoch_loss = Some(epoch_loss.map_or_else(|| lv.shallow_clone(), |e| e + &lv));
        step_loss = Some(step_loss.map_or_else(|| lv.shallow_clone(), |l| l + &lv));
        step_bad = Some(step_bad.map_or_else(|| bad.shallow_clone(), |b| b + &bad));
        st.micro_batches += 1;
        if (it + 1) % accum != 0 {
            continue;
        }
        let epoch_end = it + 1 == used;
        let sync = epoch_end || sync_at(*step + 1);
        let mut sums = Tensor::cat(&[step_loss.take().expect("a micro-batch ran").reshape([1]), step_bad.take().expect("a micro-batch ran")], 0);
        if world.is_distributed() {
            world.all_reduce_sum(std::slice::from_ref(&sums), "the loss all-reduce")?;
            world.average_gradients(s.optimizer().params().iter().map(|p| &p.tensor))?;
        }
        let opt = s.optimizer();
        // The norm is computed on every step, on the device: a bf16 backward can overflow with a finite loss, and
        // such a step must be skipped whether or not clipping is on or the step is read.
        let norm = opt.grad_norm(rule.clip).to_device(sums.device()).to_kind(Kind::Double);
        let loss_bad = sums.narrow(0, 1, 2).sum(Kind::Double).gt(0.0);
        let skip = loss_bad.logical_or(&norm.isfinite().logical_not());
        opt.step(st.lr, Some(&skip));
        opt.zero_grad();
        s.end_step();
        *step += 1;
        st.steps += 1;
        sums = Tensor::cat(&[sums, norm.reshape([1])], 0);
        pending.push(Pending { step: *step, first_iter, values: sums });
        let (loss, grad_norm) = if sync {
            // The epoch's loss sum rides along with the last step's read.
            let extra = if epoch_end { epoch_sums(world, epoch_loss.as_ref(), st.micro_batches)? } else { None };
            let (v, e) = read_pending(&mut pending, s.what(), epoch, world.size, extra.as_ref())?;
            if let Some(e) = e {
                (st.loss_sum, st.micro_batches, epoch_read) = (e[0], e[1] as usize, true);
            }
            (Some(v[0] / (accum * world.size) as f64), Some(v[3]))
        } else {
            (None, None)
        };
        let ev = StepEvent { epoch, next_iter: it + 1, step: *step, loss, lr: st.lr, grad_norm, images: step_images, epoch_end };
        if on_step(s, &ev)? == Flow::Stop {
            st.stopped = true;
            break;
        }
    }
    if !epoch_read && epoch_loss.is_some() {
        // Stopped by the callback before the epoch's end: the pending steps and the epoch's sums, in one read.
        let extra = epoch_sums(world, epoch_loss.as_ref(), st.micro_batches)?;
        let (_, e) = read_pending(&mut pending, s.what(), epoch, world.size, extra.as_ref())?;
        if let Some(e) = e {
            (st.loss_sum, st.micro_batches) = (e[0], e[1] as usize);
        }
    }
    Ok(st)
}

/// `[loss sum, micro-batches]` of the epoch so far over all ranks, on the device (`None` before any micro-batch).
fn epoch_sums(world: &World, epoch_loss: Option<&Tensor>, micro_batches: usize) -> Result<Option<Tensor>> {
    let Some(e) = epoch_loss else { return Ok(None) };
    let n = Tensor::from(micro_batches as f64).to_device(e.device());
    let sums = Tensor::stack(&[e.shallow_clone(), n], 0);
    if world.is_distributed() {
        world.all_reduce_sum(std::slice::from_ref(&sums), "the epoch loss all-reduce")?;
    }
    Ok(Some(sums.to_kind(Kind::Double)))
}

/// Reads the pending steps' values, and `extra` (a 1-d f64 tensor) when given, in one host read; returns
/// `[loss sum, NaN count, inf count, grad norm]` of the last step (zeros when none is pending) and `extra`'s values,
/// and stops the run at the first step that diverged.
fn read_pending(pending: &mut Vec<Pending>, what: &str, epoch: usize, world: usize, extra: Option<&Tensor>) -> Result<([f64; 4], Option<Vec<f64>>)> {
    let mut parts: Vec<Tensor> = pending.iter().map(|p| p.values.shallow_clone()).collect();
    parts.extend(extra.map(|e| e.shallow_clone()));
    if parts.is_empty() {
        return Ok(([0.0; 4], None));
    }
    let mut v = read_f64s(&Tensor::cat(&parts, 0))?;
    let e = extra.map(|e| v.split_off(v.len() - e.numel()));
    for (p, row) in pending.iter().zip(v.chunks(4)) {
        let (nan, inf, norm) = (row[1], row[2], row[3]);
        if nan + inf == 0.0 && norm.is_finite() {
            continue;
        }
        let msg = if nan + inf > 0.0 {
            let value = if nan > 0.0 { "NaN" } else { "inf" };
            let count = if world > 1 { format!(" in {} of the step's micro-batches over {world} ranks", nan + inf) } else { String::new() };
            format!("{what} loss is {value} at step {} (epoch {epoch}, from micro-batch {}){count}", p.step, p.first_iter)
        } else {
            format!("{what} gradient norm is {norm} at step {} (epoch {epoch}, from micro-batch {})", p.step, p.first_iter)
        };
        return Err(Error::Diverged(format!("{msg}; that update was skipped")));
    }
    pending.clear();
    Ok((v.last_chunk::<4>().copied().unwrap_or([0.0; 4]), e))
}

/// Top-1 / top-5 hits of `logits [N, C]` against `labels [N]` (top-5 over min(5, C) classes), as a device
/// tensor `[2]` (i64), so that an evaluation loop can add them up without reading each batch back.
pub fn topk_hits(logits: &Tensor, labels: &Tensor) -> Tensor {
    let c = logits.size()[1];
    let (_, idx) = logits.topk(c.min(5), 1, true, true);
    let hits = idx.eq_tensor(&labels.to_device(logits.device()).unsqueeze(1));
    Tensor::stack(&[hits.narrow(1, 0, 1).sum(Kind::Int64), hits.any_dim(1, false).sum(Kind::Int64)], 0)
}

/// [`topk_hits`] read back to the host.
pub fn topk_correct(logits: &Tensor, labels: &Tensor) -> (i64, i64) {
    let v = read_f64s(&topk_hits(logits, labels)).expect("a two-element tensor reads back");
    (v[0] as i64, v[1] as i64)
}

/// Top-1 and top-5 accuracy in percent over evaluation batches `(images, labels)`, copied to `device` one batch
/// ahead ([`stage_ahead`]); `logits` runs the model (without grad). The hits stay on the device until the
/// end. An empty split is an error naming `split`.
pub fn evaluate_topk(
    world: &World,
    device: tch::Device,
    batches: impl Iterator<Item = Result<(Tensor, Tensor)>>,
    split: &std::path::Path,
    mut logits: impl FnMut(&Tensor) -> Tensor,
) -> Result<(f64, f64)> {
    let mut n = 0i64;
    let mut hits: Option<Tensor> = None;
    for b in stage_ahead(batches, |p| stage_pair(p, device)) {
        let (x, y) = b?;
        let out = tch::no_grad(|| logits(&x));
        let h = topk_hits(&out, &y);
        hits = Some(hits.map_or(h.shallow_clone(), |a| a + h));
        n += y.size()[0];
    }
    let (c1, c5) = match hits {
        Some(h) => {
            let v = read_f64s(&h)?;
            (v[0], v[1])
        }
        None => (0.0, 0.0),
    };
    // Each rank saw its shard of the split (see `protocols::eval_loader`).
    let sums = world.sum_f64(&[n as f64, c1, c5], "the evaluation all-reduce")?;
    let (n, c1, c5) = (sums[0], sums[1], sums[2]);
    if n == 0.0 {
        return Err(Error::data(split, "the split yielded no images"));
    }
    Ok((100.0 * c1 / n, 100.0 * c5 / n))
}

/// `steps` optimiser steps of `s`, one micro-batch from `batches` each, as epoch `index` of a run, through the
/// same [`run_epoch`] as the commands: what `bench` times. Values are read from the device once, at the end.
/// Returns the last step's mean loss.
pub fn run_steps<S: TrainStep + ?Sized>(s: &mut S, batches: &mut dyn Iterator<Item = Result<S::Batch>>, steps: usize, index: usize, clip: Option<f64>) -> Result<f64> {
    let rule = StepRule { accum: 1, clip, world: crate::dist::world() };
    let (mut loss, mut step) = (f64::NAN, 0i64);
    // Every rank brings `steps` micro-batches: the epoch has steps x world of them.
    run_epoch(s, rule, batches, index, 0, steps * rule.world.size, &mut step, &|_| false, &mut |_, ev| {
        if let Some(l) = ev.loss {
            loss = l;
        }
        Ok(Flow::Continue)
    })?;
    Ok(loss)
}
