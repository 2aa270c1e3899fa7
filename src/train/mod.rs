//! Training: optimisers with checkpointable state, the reference schedules, and the pretraining loop.
pub mod optim;
pub mod pretrain;
pub mod schedule;
