//! lmim-bench: Latent MIM pretraining and k-NN / linear-probe / fine-tune evaluation of ViTs on libtorch.
//!
//! The binary `lmim-bench` is a thin layer over this crate; tests and benchmarks call the same code.
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod cli;
pub mod data;
pub mod device;
pub mod dist;
pub mod error;
pub mod fault;
pub mod ffi;
pub mod fsutil;
pub mod info;
pub mod model;
pub mod protocols;
pub mod results;
pub mod signals;
pub mod train;
pub mod viz;

pub use error::{Error, Result};
