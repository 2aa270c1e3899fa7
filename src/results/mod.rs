//! Results as data: one JSON record per run (versioned schema, with provenance), one CSV row per run appended to a
//! table, and a Markdown renderer; the training curves as JSON lines and TensorBoard event files.
pub mod check;
pub mod metrics_log;
pub mod table;
pub mod tensorboard;

pub use metrics_log::MetricsLog;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fsutil::{append_lines_locked, write_atomic, write_new_file};

pub const SCHEMA_VERSION: u32 = 1;

/// Where a run's inputs came from.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct Provenance {
    pub git_commit: String,
    pub crate_version: String,
    pub libtorch_version: String,
    /// The JPEG decoder of the build (`info::JPEG_DECODER`); empty in records written before it was named.
    #[serde(default)]
    pub jpeg_decoder: String,
    pub device: String,
    pub hostname: String,
    pub command: String,
}

impl Provenance {
    pub fn current(device: &str) -> Self {
        let info = crate::info::Info::collect();
        Provenance {
            git_commit: info.git_commit,
            crate_version: info.crate_version,
            libtorch_version: info.libtorch_version,
            jpeg_decoder: info.jpeg_decoder,
            device: device.to_string(),
            hostname: std::fs::read_to_string("/etc/hostname").map(|s| s.trim().to_string()).unwrap_or_default(),
            command: std::env::args().collect::<Vec<_>>().join(" "),
        }
    }
}

/// One run of one protocol on one checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunRecord {
    pub schema_version: u32,
    /// Protocol name (`knn`, `nn-loo`, `linear`, `linear-sweep`, `finetune`, `pretrain`, ...).
    pub protocol: String,
    pub protocol_version: String,
    /// Headline and secondary metrics, e.g. `top1`, `top5`, `top1@k20`.
    pub metrics: BTreeMap<String, f64>,
    /// The metric that the table shows for this protocol.
    pub headline: String,
    pub checkpoint: Option<String>,
    pub checkpoint_sha256: Option<String>,
    /// Where the encoder came from (`checkpoint::SourceInfo`): the family layout, the sub-model taken, the
    /// original file's sha256 and what was dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_source: Option<serde_json::Value>,
    /// Short human name of the model (the table row); defaults to the checkpoint file stem.
    pub model_name: String,
    pub arch: Option<String>,
    pub dataset: Option<String>,
    pub dataset_fingerprint: Option<serde_json::Value>,
    pub config: serde_json::Value,
    pub seed: u64,
    pub provenance: Provenance,
    pub started_at: String,
    pub duration_s: f64,
    /// Extra data (per-k scores, all heads of a sweep, ...).
    #[serde(default)]
    pub details: serde_json::Value,
}

impl RunRecord {
    pub fn new(protocol: &str, protocol_version: &str, headline: &str) -> Self {
        RunRecord {
            schema_version: SCHEMA_VERSION,
            protocol: protocol.into(),
            protocol_version: protocol_version.into(),
            metrics: BTreeMap::new(),
            headline: headline.into(),
            checkpoint: None,
            checkpoint_sha256: None,
            checkpoint_source: None,
            model_name: String::new(),
            arch: None,
            dataset: None,
            dataset_fingerprint: None,
            config: serde_json::Value::Null,
            seed: 0,
            provenance: Provenance::default(),
            started_at: now_rfc3339(),
            duration_s: 0.0,
            details: serde_json::Value::Null,
        }
    }

    pub fn headline_value(&self) -> Option<f64> {
        self.metrics.get(&self.headline).copied()
    }

    /// `<model>-<protocol>-<YYYYMMDD-HHMMSS-mmm>` from the start time, to the millisecond.
    fn file_stem(&self) -> String {
        let stamp = self.started_at.replace([':', '-'], "").replace('T', "-").replace('.', "-");
        format!("{}-{}-{}", sanitize(&self.model_name), self.protocol, stamp.trim_end_matches('Z'))
    }

    /// The record's file name (`write` adds `-2`, `-3`, ... when another record already has it).
    pub fn file_name(&self) -> String {
        format!("{}.json", self.file_stem())
    }

    /// Writes the record as a new `<dir>/<name>.json` and appends its row to `<dir>/results.csv`; returns the JSON
    /// path. Concurrent writers never lose a record: the JSON file is created under a name nobody holds (complete
    /// and synced before the name appears) and the row is appended under a lock (see `fsutil`).
    pub fn write(&self, dir: &Path) -> Result<PathBuf> {
        let json = serde_json::to_vec_pretty(self).expect("record serialises");
        let path = write_new_file(dir, &self.file_stem(), "json", &json)?;
        append_csv(&dir.join("results.csv"), self)?;
        Ok(path)
    }

    pub fn read(path: &Path) -> Result<Self> {
        let text = crate::fsutil::read_regular_text(path, Some(crate::fsutil::TEXT_LIMIT))?;
        let rec: RunRecord = serde_json::from_str(&text).map_err(|e| Error::data(path, format!("not a results record: {e}")))?;
        if rec.schema_version != SCHEMA_VERSION {
            return Err(Error::data(path, format!("results schema {} is not supported (this build reads {SCHEMA_VERSION})", rec.schema_version)));
        }
        Ok(rec)
    }
}

/// A file-name-safe form of a model name.
/// A protocol version as tables and summaries print it: "v1" for a number, a named version ("mae-linprobe-2") as is.
pub fn version_label(v: &str) -> String {
    if v.starts_with(|c: char| c.is_ascii_digit()) {
        format!("v{v}")
    } else {
        v.to_string()
    }
}

pub fn sanitize(s: &str) -> String {
    let s: String = s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '.' { c } else { '-' }).collect();
    if s.is_empty() { "model".into() } else { s }
}

pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

const CSV_HEADER: &[&str] = &[
    "started_at", "model", "protocol", "protocol_version", "headline", "value", "top1", "top5", "arch", "checkpoint_sha256",
    "dataset_fingerprint", "seed", "git_commit", "duration_s",
];

/// Short id of a record's dataset fingerprint: its `hash` field, else the sha256 of its JSON.
pub fn fingerprint_id(rec: &RunRecord) -> Option<String> {
    let fp = rec.dataset_fingerprint.as_ref()?;
    let h = match fp.get("hash").and_then(|v| v.as_str()) {
        Some(h) => h.to_string(),
        None => crate::protocols::extract::fingerprint_hash(fp),
    };
    Some(h.chars().take(12).collect())
}

/// One CSV line, with its newline, as the csv crate quotes it.
fn csv_line<I: IntoIterator<Item = T>, T: AsRef<[u8]>>(fields: I) -> Vec<u8> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(fields).expect("writing to memory");
    w.into_inner().map_err(|e| e.into_error()).expect("writing to memory")
}

/// Appends the record's row to the table: the header only into an empty table, and both as whole lines in one
/// write under an exclusive lock, so concurrent runs neither interleave rows nor write the header twice.
fn append_csv(path: &Path, rec: &RunRecord) -> Result<()> {
    let f = |k: &str| rec.metrics.get(k).map(|v| format!("{v:.4}")).unwrap_or_default();
    let row = csv_line([
        rec.started_at.clone(),
        rec.model_name.clone(),
        rec.protocol.clone(),
        rec.protocol_version.clone(),
        rec.headline.clone(),
        rec.headline_value().map(|v| format!("{v:.4}")).unwrap_or_default(),
        f("top1"),
        f("top5"),
        rec.arch.clone().unwrap_or_default(),
        rec.checkpoint_sha256.clone().unwrap_or_default(),
        fingerprint_id(rec).unwrap_or_default(),
        rec.seed.to_string(),
        rec.provenance.git_commit.clone(),
        format!("{:.1}", rec.duration_s),
    ]);
    append_lines_locked(path, &csv_line(CSV_HEADER), &row)
}

/// Reads back a `results.csv` written by `RunRecord::write`: one record per row with what the row keeps (model,
/// protocol and version, headline value, top-1/5, arch, checkpoint and dataset ids, seed, commit, duration).
pub fn read_csv(path: &Path) -> Result<Vec<RunRecord>> {
    let mut r = csv::Reader::from_reader(crate::fsutil::open_regular(path, None)?);
    let header = r.headers().map_err(|e| Error::data(path, e.to_string()))?.clone();
    let col = |name: &str| header.iter().position(|h| h == name);
    let Some(idx) = CSV_HEADER.iter().map(|h| col(h)).collect::<Option<Vec<usize>>>() else {
        return Err(Error::data(path, format!("not a results.csv (expected the columns {})", CSV_HEADER.join(","))));
    };
    let mut out = Vec::new();
    for (i, row) in r.records().enumerate() {
        let row = row.map_err(|e| Error::data(path, format!("row {}: {e}", i + 2)))?;
        let get = |name: &str| CSV_HEADER.iter().position(|h| *h == name).and_then(|k| row.get(idx[k])).unwrap_or("").to_string();
        let num = |name: &str| -> Result<Option<f64>> {
            let s = get(name);
            if s.is_empty() {
                return Ok(None);
            }
            s.parse().map(Some).map_err(|_| Error::data(path, format!("row {}: {name} `{s}` is not a number", i + 2)))
        };
        let mut rec = RunRecord::new(&get("protocol"), &get("protocol_version"), &get("headline"));
        rec.started_at = get("started_at");
        rec.model_name = get("model");
        for (key, v) in [(get("headline"), num("value")?), ("top1".into(), num("top1")?), ("top5".into(), num("top5")?)] {
            if let Some(v) = v {
                rec.metrics.insert(key, v);
            }
        }
        let opt = |s: String| (!s.is_empty()).then_some(s);
        rec.arch = opt(get("arch"));
        rec.checkpoint_sha256 = opt(get("checkpoint_sha256"));
        rec.dataset_fingerprint = opt(get("dataset_fingerprint")).map(|h| serde_json::json!({ "hash": h }));
        rec.seed = num("seed")?.unwrap_or(0.0) as u64;
        rec.provenance.git_commit = get("git_commit");
        rec.duration_s = num("duration_s")?.unwrap_or(0.0);
        out.push(rec);
    }
    Ok(out)
}

/// Collects records from files and directories (recursively, `*.json` that parse as records).
pub fn collect_records(inputs: &[PathBuf]) -> Result<Vec<RunRecord>> {
    let mut out = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let mut entries: Vec<PathBuf> = walk_json(input)?;
            entries.sort();
            for p in entries {
                // Directories also hold configs and metric logs: keep what parses as a record, and name what looks
                // like one but cannot be read (cut short, another schema) instead of leaving it out silently.
                match RunRecord::read(&p) {
                    Ok(rec) => out.push(rec),
                    Err(e) => {
                        if let Some(why) = unreadable_record(&p, &e) {
                            eprintln!("warning: {}: left out: {why}", p.display());
                        }
                    }
                }
            }
        } else if input.exists() {
            out.push(RunRecord::read(input)?);
        } else {
            return Err(Error::data(input, "no such results file or directory"));
        }
    }
    Ok(out)
}

/// Why a `.json` file that failed to read as a record is worth a warning: it is not JSON at all (a record cut short
/// by a full disk), or it is a record of another schema version, or one that does not parse; None for other JSON
/// files (configs, reports) that share the folders.
fn unreadable_record(path: &Path, e: &Error) -> Option<String> {
    let text = crate::fsutil::read_regular_text(path, Some(crate::fsutil::TEXT_LIMIT)).ok()?;
    match serde_json::from_str::<serde_json::Value>(&text) {
        Err(j) => Some(format!("not readable JSON ({j}); a record cut short?")),
        Ok(v) if v.get("schema_version").is_some() && v.get("protocol").is_some() => Some(e.to_string()),
        Ok(_) => None,
    }
}

fn walk_json(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let p = entry.map_err(|e| Error::io(dir, e))?.path();
        if p.is_dir() {
            out.extend(walk_json(&p)?);
        } else if p.extension().is_some_and(|e| e == "json") {
            out.push(p);
        }
    }
    Ok(out)
}

/// Renders rows as a GitHub Markdown table.
pub fn markdown_table(header: &[String], rows: &[Vec<String>]) -> String {
    let mut s = String::new();
    s.push_str(&format!("| {} |\n", header.join(" | ")));
    s.push_str(&format!("|{}|\n", header.iter().map(|_| "---").collect::<Vec<_>>().join("|")));
    for r in rows {
        s.push_str(&format!("| {} |\n", r.join(" | ")));
    }
    s
}

/// Writes text to a path, or to stdout for `-`; a closed stdout pipe is not an error, any other write error is
/// (a full disk: exit 1). A path that exists and is not a regular file (a FIFO, `/dev/stdout`, `/dev/full`) is
/// written in place: the atomic rename would replace the device or pipe with a file.
pub fn write_output(path: &str, text: &str) -> Result<()> {
    if path == "-" {
        let mut out = std::io::stdout().lock();
        return match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            r => r.map_err(|e| Error::io("<stdout>", e)),
        };
    }
    let p = Path::new(path);
    if std::fs::metadata(p).is_ok_and(|m| !m.is_file() && !m.is_dir()) {
        let mut f = std::fs::OpenOptions::new().write(true).open(p).map_err(|e| Error::io(p, e))?;
        return match f.write_all(text.as_bytes()).and_then(|_| f.flush()) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            r => r.map_err(|e| Error::io(p, e)),
        };
    }
    write_atomic(p, text.as_bytes())
}
