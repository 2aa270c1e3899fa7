//! The metrics sink of the training loops: one JSON object per line, flushed at every line so that a killed run
//! keeps its curves up to the last logged step.
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    /// Appends to `dir/jsonl_name`.
    pub fn open(dir: &Path, jsonl_name: &str, _tensorboard: bool) -> Result<MetricsLog> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join(jsonl_name);
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(|e| Error::io(&path, e))?;
        Ok(MetricsLog { path, file })
    }

    pub fn log(&mut self, line: &serde_json::Value) -> Result<()> {
        writeln!(self.file, "{line}").and_then(|_| self.file.flush()).map_err(|e| Error::io(&self.path, e))
    }

    pub fn text(&mut self, _tag: &str, _text: &str) -> Result<()> {
        Ok(())
    }
}
