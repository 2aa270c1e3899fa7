//! The step skeleton reads device values only at the steps that log or checkpoint and at the end of an epoch, and
//! a non-finite loss between two reads is kept out of the weights by the optimiser's device-side skip, then stops
//! the run at the next read naming its step.
use lmim_bench::error::Result;
use lmim_bench::device::host_reads;
use lmim_bench::train::optim::{AdamW, Param};
use lmim_bench::train::step::{run_epoch, Flow, Optimizer, StepRule, TrainStep};
use tch::{Device, Kind, Tensor};

// The tests seed torch's one global generator for their weights: they must not run at the same time.
static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct Toy {
    w: Tensor,
    opt: AdamW,
    nan_at: Option<usize>,
}

impl Toy {
    fn new(nan_at: Option<usize>) -> Self {
        tch::manual_seed(0);
        let w = Tensor::randn([4, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let opt = AdamW::new(vec![Param { name: "w".into(), tensor: w.shallow_clone(), weight_decay: 0.05, lr_scale: 1.0 }], 0.9, 0.999, 1e-8);
        Toy { w, opt, nan_at }
    }
}

impl TrainStep for Toy {
    type Batch = Tensor;
    fn batch_len(b: &Tensor) -> usize {
        b.size()[0] as usize
    }
    fn begin_step(&mut self, _t: f64) -> f64 {
        1e-2
    }
    fn loss(&mut self, x: Tensor, _epoch: usize, iter: usize) -> Result<Tensor> {
        let loss = x.mm(&self.w).square().mean(Kind::Float);
        Ok(if Some(iter) == self.nan_at { loss * f64::NAN } else { loss })
    }
    fn optimizer(&mut self) -> &mut dyn Optimizer {
        &mut self.opt
    }
    fn what(&self) -> &'static str {
        "toy"
    }
}

fn run(toy: &mut Toy, steps: usize, sync_every: i64, losses: &mut Vec<Option<f64>>) -> Result<()> {
    let mut batches = (0..steps).map(|i| Ok(Tensor::ones([8, 4], (Kind::Float, Device::Cpu)) * (1.0 + i as f64)));
    let mut step = 0;
    let rule = StepRule { accum: 1, clip: Some(1.0), world: lmim_bench::dist::world() };
    run_epoch(toy, rule, &mut batches, 0, 0, steps, &mut step, &|s| s % sync_every == 0, &mut |_, ev| {
        losses.push(ev.loss);
        Ok(Flow::Continue)
    })?;
    Ok(())
}

#[test]
fn device_values_are_read_only_at_synced_steps_and_the_epoch_end() {
    let _rng = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let mut toy = Toy::new(None);
    let mut losses = Vec::new();
    let before = host_reads();
    run(&mut toy, 10, 5, &mut losses).unwrap();
    // Steps 5 and 10 in one read each (10 ends the epoch, and the epoch's loss sum rides along): 2 reads for 10 steps,
    // where reading every step's loss (as `loss.item()` does) would make at least 10.
    assert_eq!(host_reads() - before, 2);
    let synced: Vec<usize> = losses.iter().enumerate().filter(|(_, l)| l.is_some()).map(|(i, _)| i + 1).collect();
    assert_eq!(synced, vec![5, 10]);
    // The loss at step 5 is the loss of micro-batch 4 (inputs of 5.0) before that step's update.
    assert!(losses[4].unwrap() > 0.0 && losses[9].unwrap().is_finite());
}

#[test]
fn a_nan_loss_between_reads_is_skipped_on_the_device_and_stops_the_run_at_the_next_read() {
    let _rng = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let mut toy = Toy::new(Some(3));
    let mut losses = Vec::new();
    let err = run(&mut toy, 10, 5, &mut losses).unwrap_err().to_string();
    assert!(err.contains("toy loss is NaN at step 4") && err.contains("skipped"), "{err}");
    // Stopped at the read of step 5, not later.
    assert_eq!(losses.len(), 4, "the callback saw steps 1-4 before the read at step 5 failed");
    // The NaN step changed nothing (without the skip the NaN gradient would have reached the weights and moments).
    assert_eq!(toy.w.isfinite().all().int64_value(&[]), 1, "{:?}", toy.w);
    for (name, t) in toy.opt.state() {
        assert_eq!(t.isfinite().all().int64_value(&[]), 1, "{name} is not finite");
    }
    // And the weights equal a run whose step 4 is left out: steps 1-3 and 5 on the same inputs.
    let mut reference = Toy::new(None);
    let mut batches = [1.0, 2.0, 3.0, 5.0].into_iter().map(|v| Ok(Tensor::ones([8, 4], (Kind::Float, Device::Cpu)) * v));
    let mut step = 0;
    run_epoch(&mut reference, StepRule { accum: 1, clip: Some(1.0), world: lmim_bench::dist::world() }, &mut batches, 0, 0, 4, &mut step, &|_| false, &mut |_, _| Ok(Flow::Continue)).unwrap();
    let d = (&toy.w - &reference.w).abs().max().double_value(&[]);
    assert!(d < 1e-6, "weights differ from the run without step 4 by {d}");
}

/// LARS (the linear probe's optimiser) decides its skip on the device too: no host read, a skipped step leaves
/// weights and momentum as they were even with a NaN gradient, and the steps that are not skipped are bit for bit
/// the plain update.
#[test]
fn lars_skips_on_the_device_without_a_host_read() {
    use lmim_bench::train::optim::Lars;
    let _rng = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(1);
    let w0 = Tensor::randn([5, 3], (Kind::Float, Device::Cpu));
    let make = || {
        let w = w0.copy().set_requires_grad(true);
        let opt = Lars::new(vec![Param { name: "w".into(), tensor: w.shallow_clone(), weight_decay: 0.01, lr_scale: 1.0 }], 0.9, 0.001);
        (w, opt)
    };
    let grad = |w: &Tensor, scale: f64| (w.square().sum(Kind::Float) * scale).backward();
    // Flags 0, 1 (with a NaN gradient), 0 against two plain steps.
    let (wb, mut b) = make();
    let before = host_reads();
    for bad in [false, true, false] {
        grad(&wb, if bad { f64::NAN } else { 1.0 });
        b.step_unless(0.1, Some(&Tensor::from(bad)));
        b.zero_grad();
    }
    assert_eq!(host_reads(), before, "LARS read the skip flag on the host");
    let (wc, mut c) = make();
    for _ in 0..2 {
        grad(&wc, 1.0);
        c.step(0.1);
        c.zero_grad();
    }
    assert_eq!((&wb - &wc).abs().max().double_value(&[]), 0.0, "the skipped step changed the weights or the momentum");
    assert!((&wb - &w0).abs().max().double_value(&[]) > 0.0, "no step was taken");
}
