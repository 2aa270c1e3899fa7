//! The one record builder of the evaluation protocols: model, data (every split the number depends on), recipe,
//! overrides, run options and provenance, assembled the same way for every protocol.
use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use super::{version_with, Protocol, RunOptions};
use crate::data::dataset::Dataset;
use crate::error::Result;
use crate::results::{Provenance, RunRecord};

pub struct RecordBuilder {
    rec: RunRecord,
    t0: Instant,
}

/// One split's fingerprint as a record stores it: the fingerprint and the hash that identifies it.
pub struct SplitPrint {
    pub role: String,
    pub fingerprint: serde_json::Value,
    pub hash: String,
}

impl SplitPrint {
    pub fn of_dataset(role: &str, ds: &Dataset) -> Result<SplitPrint> {
        let fingerprint = serde_json::to_value(ds.fingerprint()?).expect("fingerprint serialises");
        let hash = super::extract::fingerprint_hash(&fingerprint);
        Ok(SplitPrint { role: role.into(), fingerprint, hash })
    }
}

/// `{ "<role>": fingerprint, ..., "hash": <one hash over all splits> }`.
pub fn combined_fingerprint(parts: &[SplitPrint]) -> serde_json::Value {
    let mut obj = serde_json::Map::new();
    for p in parts {
        obj.insert(p.role.clone(), p.fingerprint.clone());
    }
    let hash = match parts {
        [one] => one.hash.clone(),
        _ => super::extract::fingerprint_hash(&serde_json::json!(parts.iter().map(|p| &p.hash).collect::<Vec<_>>())),
    };
    obj.insert("hash".into(), serde_json::Value::String(hash));
    serde_json::Value::Object(obj)
}

impl RecordBuilder {
    /// Starts the clock; `overrides` go into the version.
    pub fn new(protocol: Protocol, version: &str, overrides: &[String]) -> Self {
        let mut rec = RunRecord::new(protocol.name(), &version_with(version, overrides), "top1");
        rec.started_at = crate::results::now_rfc3339();
        RecordBuilder { rec, t0: Instant::now() }
    }

    pub fn model(mut self, name: String, checkpoint: Option<&Path>, sha256: Option<String>, arch: Option<String>) -> Self {
        self.rec.model_name = name;
        self.rec.checkpoint = checkpoint.map(|p| p.display().to_string());
        self.rec.checkpoint_sha256 = sha256;
        self.rec.arch = arch;
        self
    }

    /// The encoder's provenance (`checkpoint::SourceInfo` as JSON).
    pub fn source(mut self, source: Option<serde_json::Value>) -> Self {
        self.rec.checkpoint_source = source;
        self
    }

    pub fn data(mut self, root: Option<String>, splits: &[SplitPrint]) -> Self {
        self.rec.dataset = root;
        self.rec.dataset_fingerprint = (!splits.is_empty()).then(|| combined_fingerprint(splits));
        self
    }

    /// The recipe as used, where it came from, what was overridden, how it ran, and protocol-specific settings.
    pub fn config(mut self, origin: &str, recipe: &impl Serialize, overrides: &[String], run: &RunOptions, extra: serde_json::Value) -> Self {
        let mut cfg = serde_json::to_value(recipe).expect("recipe serialises");
        if let (serde_json::Value::Object(m), serde_json::Value::Object(e)) = (&mut cfg, extra) {
            m.extend(e);
        }
        cfg["protocol_file"] = serde_json::json!(origin);
        cfg["overrides"] = serde_json::json!(overrides);
        cfg["run"] = serde_json::to_value(run).expect("run options serialise");
        let world = crate::dist::world().describe();
        if let (serde_json::Value::Object(m), serde_json::Value::Object(w)) = (&mut cfg, world) {
            m.extend(w);
        }
        self.rec.config = cfg;
        self
    }

    pub fn seed(mut self, seed: u64) -> Self {
        self.rec.seed = seed;
        self
    }

    pub fn started_at(mut self, at: String) -> Self {
        self.rec.started_at = at;
        self
    }

    /// The metric the table shows (default `top1`).
    pub fn headline(mut self, key: &str) -> Self {
        self.rec.headline = key.into();
        self
    }

    pub fn metric(mut self, key: &str, value: f64) -> Self {
        self.rec.metrics.insert(key.into(), value);
        self
    }

    pub fn metrics<'a>(mut self, kv: impl IntoIterator<Item = (&'a str, f64)>) -> Self {
        self.rec.metrics.extend(kv.into_iter().map(|(k, v)| (k.to_string(), v)));
        self
    }

    /// Completes the record (provenance of `device`, duration) and writes it into `output` (rank 0 only in a
    /// data-parallel run).
    pub fn finish(mut self, details: serde_json::Value, device: &str, output: &Path) -> Result<RunRecord> {
        self.rec.provenance = Provenance::current(device);
        self.rec.duration_s = self.t0.elapsed().as_secs_f64();
        self.rec.details = details;
        if crate::dist::world().is_main() {
            self.rec.write(output)?;
        }
        Ok(self.rec)
    }
}
