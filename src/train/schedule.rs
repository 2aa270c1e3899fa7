//! Schedules of the reference code, as functions of the fractional epoch `t = epoch + it / iters_per_epoch`.
use std::f64::consts::PI;

/// Learning rate: linear warmup from `min_lr` (not 0) to `lr` over `warmup` epochs, then a half cosine down to
/// `min_lr` at `epochs` (Latent MIM's `util/lr_sched.py` with `min_lr = min_lr_frac * lr`).
pub fn lr_at(t: f64, lr: f64, min_lr: f64, warmup: f64, epochs: f64) -> f64 {
    if t < warmup {
        min_lr + (lr - min_lr) * t / warmup
    } else {
        let span = (epochs - warmup).max(f64::MIN_POSITIVE);
        min_lr + (lr - min_lr) * 0.5 * (1.0 + (PI * (t - warmup) / span).cos())
    }
}

/// MAE-style lr: linear warmup from 0, then half cosine to `min_lr` (linear probe and fine-tuning recipes).
pub fn lr_at_from_zero(t: f64, lr: f64, min_lr: f64, warmup: f64, epochs: f64) -> f64 {
    if t < warmup {
        lr * t / warmup
    } else {
        let span = (epochs - warmup).max(f64::MIN_POSITIVE);
        min_lr + (lr - min_lr) * 0.5 * (1.0 + (PI * (t - warmup) / span).cos())
    }
}

/// A half cosine from `start` at t = 0 to `end` at t = `epochs`.
pub fn cosine(t: f64, start: f64, end: f64, epochs: f64) -> f64 {
    end + (start - end) * 0.5 * (1.0 + (PI * t / epochs).cos())
}

/// EMA momentum of the target encoder: cosine from `base` to 1.
pub fn momentum_at(t: f64, base: f64, epochs: f64) -> f64 {
    cosine(t, base, 1.0, epochs)
}

/// Target of the average-similarity regulariser: cosine from `sim_init` to `sim_end`.
pub fn sim_target_at(t: f64, sim_init: f64, sim_end: f64, epochs: f64) -> f64 {
    cosine(t, sim_init, sim_end, epochs)
}
