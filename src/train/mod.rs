//! Training: optimisers with checkpointable state, the reference schedules, the step skeleton shared by every
//! training protocol, and the pretraining loop.
pub mod optim;
pub mod pretrain;
pub mod schedule;
pub mod step;

use crate::error::{Error, Result};

/// Micro-batches accumulated per optimiser step: the global batch over micro-batch x processes. Configs name the
/// global batch (as the reference's effective batch), so a run has the same trajectory on any number of processes;
/// a global batch that they cannot make exactly is refused.
pub fn accum_for(batch_size: i64, micro_batch_size: i64, world_size: i64) -> Result<i64> {
    if batch_size < 1 || micro_batch_size < 1 || world_size < 1 {
        return Err(Error::option("batch_size", format!("batch_size ({batch_size}) and micro_batch_size ({micro_batch_size}) must be >= 1")));
    }
    let per_step = micro_batch_size.checked_mul(world_size).ok_or_else(|| Error::option("micro_batch_size", "too large"))?;
    if batch_size % per_step != 0 {
        return Err(Error::option(
            "batch_size",
            format!("the global batch {batch_size} is not a multiple of micro_batch_size {micro_batch_size} x {world_size} process(es); choose a micro-batch that divides it"),
        ));
    }
    Ok(batch_size / per_step)
}

/// The one lr scaling rule of every recipe here (MAE, Latent MIM): `lr = blr * global_batch / 256`.
pub fn scaled_lr(blr: f64, global_batch: i64) -> f64 {
    blr * global_batch as f64 / 256.0
}
