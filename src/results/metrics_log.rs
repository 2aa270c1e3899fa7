//! The metrics sink of the training loops: one JSON line per call in `<dir>/<jsonl_name>` (what `plot`,
//! scripts and the results records read) and, unless turned off, the same numbers as TensorBoard scalars in
//! `<dir>/tb/`, so `tensorboard --logdir <dir>/tb` shows the curves while a run goes.
//!
//! Mapping of a line to TensorBoard:
//! - step: the line's integer `step` field; else its `epoch` rounded to the nearest integer (the epoch loops log
//!   `epoch: 1.0, 2.0, ...`); else the number of lines logged before it by this `MetricsLog`;
//! - every other top-level number becomes a scalar tagged with its field name as is (`loss`, `lr`,
//!   `avg_sim_pred`, `val_top1`, ... ; a field named `train/loss` groups under `train` in TensorBoard), stored as
//!   f32; `epoch` too when `step` is the step; strings, booleans, nulls, arrays and objects are skipped;
//! - `text(tag, text)` writes a text summary at step 0 (TensorBoard renders Markdown: indent or fence a config
//!   to keep its lines).
use std::io::Write;
use std::path::{Path, PathBuf};

use super::tensorboard::EventWriter;
use crate::error::{Error, Result};

pub struct MetricsLog {
    jsonl_path: PathBuf,
    jsonl: std::fs::File,
    tb: Option<EventWriter>,
    lines: i64,
}

impl MetricsLog {
    /// Opens `dir/jsonl_name` for appending (created with `dir` if absent) and, with `tensorboard`, a new event
    /// file in `dir/tb/`. TensorBoard shows all event files of a folder as one run, so two logs of different runs
    /// need different `dir`s (a resumed run in the same `dir` continues its curves).
    pub fn open(dir: &Path, jsonl_name: &str, tensorboard: bool) -> Result<MetricsLog> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let jsonl_path = dir.join(jsonl_name);
        let jsonl = std::fs::OpenOptions::new().create(true).read(true).append(true).open(&jsonl_path).map_err(|e| Error::io(&jsonl_path, e))?;
        drop_torn_line(&jsonl).map_err(|e| Error::io(&jsonl_path, e))?;
        let tb = if tensorboard { Some(EventWriter::create(&dir.join("tb"))?) } else { None };
        Ok(MetricsLog { jsonl_path, jsonl, tb, lines: 0 })
    }

    /// A log that writes nothing: what the ranks other than 0 of a data-parallel run keep.
    pub fn discard() -> Result<MetricsLog> {
        let null = PathBuf::from("/dev/null");
        let jsonl = std::fs::OpenOptions::new().append(true).open(&null).map_err(|e| Error::io(&null, e))?;
        Ok(MetricsLog { jsonl_path: null, jsonl, tb: None, lines: 0 })
    }

    /// The JSON lines file.
    pub fn jsonl_path(&self) -> &Path {
        &self.jsonl_path
    }

    /// The event file, when TensorBoard output is on.
    pub fn event_file(&self) -> Option<&Path> {
        self.tb.as_ref().map(|w| w.path())
    }

    /// Appends `line` as one JSON line and its numbers as scalars, then flushes both files.
    pub fn log(&mut self, line: &serde_json::Value) -> Result<()> {
        // One write per line: an unbuffered File, so a killed run leaves whole lines only.
        self.jsonl.write_all(format!("{line}\n").as_bytes()).map_err(|e| Error::io(&self.jsonl_path, e))?;
        let fallback = self.lines;
        self.lines += 1;
        let Some(tb) = self.tb.as_mut() else { return Ok(()) };
        let Some(fields) = line.as_object() else { return Ok(()) };
        let (step, step_key) = match (fields.get("step").and_then(|s| s.as_i64()), fields.get("epoch").and_then(|e| e.as_f64())) {
            (Some(s), _) => (s, "step"),
            (None, Some(e)) => (e.round() as i64, "epoch"),
            (None, None) => (fallback, ""),
        };
        for (key, value) in fields {
            if key == step_key {
                continue;
            }
            if let Some(v) = value.as_f64() {
                tb.scalar(key, step, v as f32)?;
            }
        }
        tb.flush()
    }

    /// A text summary, e.g. the run's config; nothing without TensorBoard output (the JSON lines hold numbers).
    pub fn text(&mut self, tag: &str, text: &str) -> Result<()> {
        match self.tb.as_mut() {
            Some(tb) => {
                tb.text(tag, 0, text)?;
                tb.flush()
            }
            None => Ok(()),
        }
    }

    pub fn flush(&mut self) -> Result<()> {
        self.jsonl.flush().map_err(|e| Error::io(&self.jsonl_path, e))?;
        match self.tb.as_mut() {
            Some(tb) => tb.flush(),
            None => Ok(()),
        }
    }
}

/// Drops the lines of `path` whose `step` is beyond `step`: what a run killed after its last checkpoint logged
/// and its resume (from that checkpoint) logs again. Returns how many it dropped; a missing file has none.
pub fn drop_lines_after_step(path: &Path, step: i64) -> Result<usize> {
    if !path.exists() {
        return Ok(0);
    }
    let text = crate::fsutil::read_regular_text(path, None)?;
    let beyond = |l: &str| serde_json::from_str::<serde_json::Value>(l).ok().and_then(|v| v.get("step")?.as_i64()).is_some_and(|s| s > step);
    let kept: Vec<&str> = text.split_inclusive('\n').filter(|l| !beyond(l.trim_end())).collect();
    let dropped = text.split_inclusive('\n').count() - kept.len();
    if dropped > 0 {
        crate::fsutil::write_atomic(path, kept.concat().as_bytes())?;
    }
    Ok(dropped)
}

/// Cuts a last line left without its newline (a write cut short by a full disk or a crash) back to the end of
/// the last whole line, so that the next line is not glued to it and every line stays JSON (`plot` refuses a
/// file with a line that is not).
fn drop_torn_line(f: &std::fs::File) -> std::io::Result<()> {
    let len = f.metadata()?.len();
    let end = crate::fsutil::last_newline(&mut &*f, len)?.map_or(0, |i| i + 1);
    if end < len {
        f.set_len(end)?;
    }
    Ok(())
}

impl Drop for MetricsLog {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}
