//! Import of PyTorch `torch.save` state dicts (zip format) without Python.
use std::path::Path;

use super::Checkpoint;
use crate::error::{Error, Result};

pub fn load(path: &Path) -> Result<Checkpoint> {
    Err(Error::checkpoint(path, ".pth import is not implemented yet"))
}
