//! `lmim-bench suite`: every axis of a checkpoint in one job, from one suite file (TOML): named data roots and a
//! list of `[[eval]]` entries, each a protocol of `eval --protocol` with its overrides. Like CAPI's
//! `benchmark.py` (facebookresearch/capi) evaluates a model in one call, and DINOv2's one entry point per axis.
//!
//! The whole file is checked before any work (every key, every protocol's overrides through the one validation
//! table, every data root's layout, the subset lists). Entries run cheap first (cached-feature protocols, then
//! DAVIS, then the trained probes), each writing its own record into the output folder; an entry whose record is
//! already there for the same checkpoint, data and definition is kept (`--rerun` runs it again), so a suite that
//! was interrupted, run again, does only what is missing. A failed entry does not stop the others (unless
//! `fail_fast`, or under a launcher: the ranks could not agree to skip it without a collective).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::{EvalRequest, Protocol, RunOptions};
use crate::error::{Error, Result};
use crate::results::RunRecord;

/// A suite file.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SuiteFile {
    /// What the suite is (shown in the log).
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub version: Option<String>,
    /// Named data roots; relative paths are relative to the suite file.
    #[serde(default)]
    pub data: BTreeMap<String, String>,
    #[serde(default)]
    pub eval: Vec<EntrySpec>,
}

/// One `[[eval]]` entry.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EntrySpec {
    /// Any protocol of `eval --protocol`.
    pub protocol: String,
    /// A name from `[data]`.
    #[serde(default)]
    pub data: Option<String>,
    /// Overrides of the protocol file, exactly as `--set` (named in the record's version).
    #[serde(default)]
    pub set: toml::Table,
    /// Low-shot subset lists (files or folders), as `--subset`; relative to the suite file.
    #[serde(default)]
    pub subset: Vec<String>,
    /// Tells two entries of one protocol apart in the output.
    #[serde(default)]
    pub label: Option<String>,
    /// A protocol file instead of the built-in one; relative to the suite file.
    #[serde(default)]
    pub protocol_file: Option<String>,
    /// False: listed but not run (fine-tuning in the ImageNet suite: a day of 8 GPUs).
    #[serde(default = "yes")]
    pub enabled: bool,
}

fn yes() -> bool {
    true
}

/// A suite run as the command gives it.
#[derive(Debug, Clone)]
pub struct SuiteRequest {
    pub suite: PathBuf,
    pub checkpoint: PathBuf,
    pub from: Option<crate::checkpoint::Family>,
    /// Model name of the records (default: the checkpoint's file stem).
    pub name: Option<String>,
    pub output: PathBuf,
    /// Only these entries (labels or protocol names).
    pub only: Vec<String>,
    /// Run entries whose record is already there again.
    pub rerun: bool,
    /// Stop at the first failed entry.
    pub fail_fast: bool,
    /// `NAME=PATH` replacements of the file's data roots.
    pub data: Vec<(String, PathBuf)>,
    pub run: RunOptions,
}

/// One entry as it will run.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// Its place in the file (1-based, as messages name it).
    pub index: usize,
    /// `protocol` or `protocol:label`.
    pub label: String,
    #[serde(serialize_with = "ser_protocol")]
    pub protocol: Protocol,
    pub data_name: String,
    pub data: PathBuf,
    pub sets: Vec<String>,
    pub subsets: Vec<PathBuf>,
    pub protocol_file: Option<PathBuf>,
}

fn ser_protocol<S: serde::Serializer>(p: &Protocol, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(p.name())
}

/// What became of an entry.
#[derive(Debug, Clone)]
pub enum Outcome {
    Ran(Box<RunRecord>),
    Kept(Box<RunRecord>),
    Failed(String),
}

/// The suite's end: every entry in the order it ran, with its outcome.
#[derive(Debug, Clone)]
pub struct SuiteResult {
    pub entries: Vec<(Entry, Outcome)>,
    pub skipped: Vec<String>,
}

impl SuiteResult {
    pub fn records(&self) -> Vec<&RunRecord> {
        self.entries
            .iter()
            .filter_map(|(_, o)| match o {
                Outcome::Ran(r) | Outcome::Kept(r) => Some(r.as_ref()),
                Outcome::Failed(_) => None,
            })
            .collect()
    }

    pub fn failed(&self) -> Vec<(&Entry, &str)> {
        self.entries.iter().filter_map(|(e, o)| if let Outcome::Failed(m) = o { Some((e, m.as_str())) } else { None }).collect()
    }
}

/// The probes that train (LP, EP, Ft): minutes to days each, where the others take seconds to minutes.
fn is_trained(p: Protocol) -> bool {
    matches!(p, Protocol::Linear | Protocol::Attentive | Protocol::Finetune)
}

/// The remaining entries' time (`left`: whether each is a trained probe) by the mean of the entries of the same kind
/// that ran; trained probes before any has run are said, not guessed from the cheap entries.
fn estimate(left: &[bool], took: &[(f64, usize); 2]) -> String {
    let (mut seconds, mut known, mut unknown) = (0.0, 0, 0);
    for kind in [false, true] {
        let count = left.iter().filter(|&&t| t == kind).count();
        match took[kind as usize] {
            (s, ran) if ran > 0 => {
                seconds += s / ran as f64 * count as f64;
                known += count;
            }
            _ if kind => unknown += count,
            _ => {}
        }
    }
    let mut out = String::new();
    if known > 0 && took.iter().any(|t| t.1 > 0) {
        out = format!(", about {seconds:.0} s for {known} of the {} left by the mean of their kind so far", left.len());
    }
    if unknown > 0 {
        out += &format!("{}{unknown} trained probe(s) not yet estimated", if out.is_empty() { ", " } else { "; " });
    }
    out
}

/// Cheap first: protocols on cached features, then DAVIS, then the trained probes (the order; a stable
/// sort keeps the file's order within a rank).
fn cost_rank(p: Protocol) -> u8 {
    match p {
        Protocol::NnLoo => 0,
        Protocol::Knn => 1,
        Protocol::KnnSweep => 2,
        Protocol::Lowshot => 3,
        Protocol::LinearSweep => 4,
        Protocol::Davis | Protocol::Seg => 5,
        Protocol::Linear => 6,
        Protocol::Attentive => 7,
        Protocol::Finetune => 8,
    }
}

/// Reads and checks the suite file: every entry's protocol, data root, overrides and subset lists. Returns the
/// entries to run, in running order, and the labels of those left out (`enabled = false`, `--only`). Errors name
/// the suite file, the entry (its index and protocol) and the key.
pub fn plan(req: &SuiteRequest) -> Result<(Vec<Entry>, Vec<String>)> {
    let text = crate::fsutil::read_regular_text(&req.suite, Some(crate::fsutil::TEXT_LIMIT))?;
    let file: SuiteFile = toml::from_str(&text).map_err(|e| Error::BadConfig { path: req.suite.clone(), reason: format!("not a suite file: {e}") })?;
    let bad = |reason: String| Error::BadConfig { path: req.suite.clone(), reason };
    let base = req.suite.parent().map(Path::to_path_buf).unwrap_or_default();
    let rel = |p: &str| if Path::new(p).is_absolute() { PathBuf::from(p) } else { base.join(p) };
    let mut roots: BTreeMap<String, PathBuf> = file.data.iter().map(|(k, v)| (k.clone(), rel(v))).collect();
    for (name, path) in &req.data {
        if !roots.contains_key(name) {
            return Err(Error::option("--data", format!("`{name}` is not a data root of {} (it has: {})", req.suite.display(), roots.keys().cloned().collect::<Vec<_>>().join(", "))));
        }
        roots.insert(name.clone(), path.clone());
    }
    if file.eval.is_empty() {
        return Err(bad("no [[eval]] entry".into()));
    }
    let mut entries = Vec::new();
    let mut skipped = Vec::new();
    let mut labels = std::collections::BTreeSet::new();
    for (i, spec) in file.eval.iter().enumerate() {
        let index = i + 1;
        let protocol = Protocol::from_name(&spec.protocol).ok_or_else(|| {
            bad(format!("entry {index}: protocol `{}` is not one of {}", spec.protocol, Protocol::ALL.iter().map(|p| p.name()).collect::<Vec<_>>().join(", ")))
        })?;
        let at = format!("entry {index} ({})", protocol.name());
        let label = match &spec.label {
            Some(l) if l.is_empty() || l.contains(['/', '\\', ',']) => return Err(bad(format!("{at}: label `{l}` is not a name"))),
            Some(l) => format!("{}:{l}", protocol.name()),
            None => protocol.name().to_string(),
        };
        if !labels.insert(label.clone()) {
            return Err(bad(format!("{at}: a second entry `{label}`; give one of them a `label`")));
        }
        let wanted = req.only.is_empty() || req.only.iter().any(|o| *o == label || *o == protocol.name());
        if !spec.enabled || !wanted {
            skipped.push(format!("{label} ({})", if spec.enabled { "not in --only" } else { "enabled = false" }));
            continue;
        }
        let data_name = spec.data.clone().ok_or_else(|| bad(format!("{at}: no `data` (a name from [data])")))?;
        let data = roots.get(&data_name).cloned().ok_or_else(|| bad(format!("{at}: data `{data_name}` is not in [data] (it has: {})", roots.keys().cloned().collect::<Vec<_>>().join(", "))))?;
        let sets: Vec<String> = spec.set.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let protocol_file = spec.protocol_file.as_deref().map(rel);
        let subsets: Vec<PathBuf> = spec.subset.iter().map(|s| rel(s)).collect();
        if !subsets.is_empty() && protocol != Protocol::Lowshot {
            return Err(bad(format!("{at}: `subset` is for the lowshot protocol")));
        }
        let entry = Entry { index, label, protocol, data_name, data, sets, subsets, protocol_file };
        check_entry(&entry).map_err(|e| bad(format!("{at}: {e}")))?;
        entries.push(entry);
    }
    entries.sort_by_key(|e| cost_rank(e.protocol));
    if let Some(o) = req.only.iter().find(|o| !file.eval.iter().enumerate().any(|(_, s)| s.protocol == **o || s.label.as_ref().is_some_and(|l| format!("{}:{l}", s.protocol) == **o))) {
        return Err(Error::option("--only", format!("`{o}` names no entry of {}", req.suite.display())));
    }
    Ok((entries, skipped))
}

/// An entry's overrides (through its protocol's recipe and validation table), its data root's layout and its
/// subset lists, before anything runs.
fn check_entry(e: &Entry) -> Result<()> {
    super::check_sets(e.protocol, e.protocol_file.as_deref(), &e.sets)?;
    let root = &e.data;
    if !root.is_dir() {
        return Err(Error::data(root, "data root not found (a folder)"));
    }
    match e.protocol {
        Protocol::Davis => {
            let loaded = Protocol::Davis.load::<super::davis::DavisConfig>(e.protocol_file.as_deref(), &e.sets)?;
            crate::data::davis::open_set(root, &loaded.cfg.subset, &loaded.cfg.resolution)?;
        }
        Protocol::Seg => {
            crate::data::ade20k::open_set(root)?;
        }
        p => {
            let splits: &[&str] = if p == Protocol::NnLoo { &["val"] } else { &["train", "val"] };
            for s in splits {
                let d = root.join(s);
                if !d.exists() {
                    return Err(Error::data(&d, format!("the {} protocol needs the {s}/ split here", p.name())));
                }
            }
        }
    }
    for s in &e.subsets {
        if s.is_dir() {
            continue;
        }
        crate::fsutil::read_regular_text(s, Some(crate::fsutil::TEXT_LIMIT))?;
    }
    Ok(())
}

/// The key an entry's record carries (`config.run.suite_entry`): the checkpoint, the entry's definition (protocol,
/// overrides, protocol file, subset lists by content) and its data (root and cache key). A record with the same
/// key in the output is that entry done.
fn entry_key(e: &Entry, checkpoint_sha256: &str, scan: crate::data::ScanFlags) -> Result<String> {
    use sha2::{Digest, Sha256};
    let protocol_text = e.protocol.source(e.protocol_file.as_deref())?.text;
    let subsets: Vec<(String, String)> = e
        .subsets
        .iter()
        .map(|s| Ok((s.display().to_string(), if s.is_file() { crate::fsutil::sha256_file(s)? } else { "folder".into() })))
        .collect::<Result<_>>()?;
    let key = serde_json::json!({
        "checkpoint_sha256": checkpoint_sha256,
        "protocol": e.protocol.name(),
        "label": e.label,
        "sets": e.sets,
        "protocol_file": hex::encode(Sha256::digest(protocol_text.as_bytes())),
        "subsets": subsets,
        "data": std::fs::canonicalize(&e.data).unwrap_or_else(|_| e.data.clone()),
        "data_key": data_key(e, scan)?,
    });
    Ok(hex::encode(Sha256::digest(key.to_string().as_bytes()))[..24].to_string())
}

/// The data's cache key: the splits' (size, mtime, inode) keys for image protocols (`Dataset::cache_key`, read
/// from the index cache), the frames' sizes for DAVIS.
fn data_key(e: &Entry, scan: crate::data::ScanFlags) -> Result<String> {
    match e.protocol {
        Protocol::Davis => {
            let loaded = Protocol::Davis.load::<super::davis::DavisConfig>(e.protocol_file.as_deref(), &e.sets)?;
            let set = crate::data::davis::open_set(&e.data, &loaded.cfg.subset, &loaded.cfg.resolution)?;
            Ok(super::davis::set_fingerprint(&set)?.hash)
        }
        Protocol::Seg => Ok(super::seg::set_fingerprint(&crate::data::ade20k::open_set(&e.data)?)?.hash),
        _ => {
            let mut keys = Vec::new();
            for s in ["train", "val"] {
                if e.data.join(s).exists() {
                    let opts = crate::data::OpenOptions { quiet: true, rescan: scan.rescan, content_key: scan.content_key, ..Default::default() };
                    let ds = crate::data::Dataset::open_with(&e.data, s, &opts)?;
                    keys.push(ds.cache_key().to_string());
                }
            }
            Ok(keys.join("+"))
        }
    }
}

/// The records in `output` by their suite key (the newest of each).
fn done_records(output: &Path) -> BTreeMap<String, RunRecord> {
    let mut out: BTreeMap<String, RunRecord> = BTreeMap::new();
    let Ok(recs) = crate::results::collect_records(&[output.to_path_buf()]) else { return out };
    for r in recs {
        if let Some(k) = r.config.pointer("/run/suite_entry").and_then(|v| v.as_str()) {
            let newer = out.get(k).is_none_or(|o| o.started_at < r.started_at);
            if newer {
                out.insert(k.to_string(), r);
            }
        }
    }
    out
}

/// Whether the entry's features came from the cache, from what its record says of its extractions.
fn feature_source(rec: &RunRecord) -> String {
    fn walk(v: &serde_json::Value, hits: &mut (usize, usize)) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(h) = m.get("cache_hit").and_then(|h| h.as_bool()) {
                    if h {
                        hits.0 += 1;
                    } else {
                        hits.1 += 1;
                    }
                }
                m.values().for_each(|x| walk(x, hits));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, hits)),
            _ => {}
        }
    }
    let mut hits = (0, 0);
    walk(&rec.details, &mut hits);
    walk(&rec.config, &mut hits);
    match hits {
        (0, 0) => "features computed in the protocol".into(),
        (h, 0) => format!("features read from the cache ({h} split(s))"),
        (0, x) => format!("features extracted ({x} split(s))"),
        (h, x) => format!("features: {h} split(s) from the cache, {x} extracted"),
    }
}

/// Runs the suite as `req` says. Returns every entry's outcome; a usage or suite-file error (exit 2) before any
/// work, an interruption (SIGINT, SIGTERM) as itself.
pub fn run(req: &SuiteRequest) -> Result<SuiteResult> {
    let (entries, skipped) = plan(req)?;
    let world = crate::dist::world();
    let say = |s: String| {
        if world.is_main() {
            eprintln!("{s}");
        }
    };
    let checkpoint_sha256 = crate::fsutil::sha256_file(&req.checkpoint)?;
    for s in &skipped {
        say(format!("suite: not run: {s}"));
    }
    let done = if req.rerun { BTreeMap::new() } else { done_records(&req.output) };
    let t0 = Instant::now();
    let mut out = SuiteResult { entries: Vec::new(), skipped };
    let n = entries.len();
    let trained: Vec<bool> = entries.iter().map(|e| is_trained(e.protocol)).collect();
    // Seconds and count of the entries that ran, cheap ones and trained probes apart.
    let mut took = [(0.0f64, 0usize); 2];
    for (i, e) in entries.into_iter().enumerate() {
        let key = entry_key(&e, &checkpoint_sha256, req.run.scan)?;
        // Every rank must take the same turn (ranks that see different output folders would otherwise part ways).
        let decision = if done.contains_key(&key) { "kept" } else { "to run" };
        world.agree(&format!("suite entry {}", e.label), &format!("{decision} (key {key})"), &req.output.display().to_string())?;
        if let Some(rec) = done.get(&key) {
            say(format!("[{}/{n}] {}: kept ({} = {:.2}, record of {})", i + 1, e.label, rec.headline, rec.headline_value().unwrap_or(f64::NAN), rec.started_at));
            out.entries.push((e, Outcome::Kept(Box::new(rec.clone()))));
            continue;
        }
        let eta = estimate(&trained[i..], &took);
        say(format!("[{}/{n}] {} on {} ({}); {:.0} s elapsed{eta}", i + 1, e.label, e.data_name, e.data.display(), t0.elapsed().as_secs_f64()));
        let started = Instant::now();
        let mut ereq = EvalRequest::new(e.protocol, &req.output);
        ereq.checkpoint = Some(req.checkpoint.clone());
        ereq.from = req.from;
        ereq.data = Some(e.data.clone());
        ereq.protocol_file = e.protocol_file.clone();
        ereq.sets = e.sets.clone();
        ereq.subsets = e.subsets.clone();
        ereq.name = req.name.clone();
        ereq.run = RunOptions { suite_entry: Some(key), ..req.run.clone() };
        match super::run(&ereq) {
            Ok(rec) => {
                let seconds = started.elapsed().as_secs_f64();
                let t = &mut took[trained[i] as usize];
                *t = (t.0 + seconds, t.1 + 1);
                say(format!("[{}/{n}] {}: {} = {:.2} in {seconds:.1} s; {}", i + 1, e.label, rec.headline, rec.headline_value().unwrap_or(f64::NAN), feature_source(&rec)));
                out.entries.push((e, Outcome::Ran(Box::new(rec))));
            }
            Err(err @ Error::Interrupted { .. }) => return Err(err),
            Err(err) if req.fail_fast || world.is_distributed() => {
                say(format!("[{}/{n}] {}: FAILED; the suite stops here ({})", i + 1, e.label, if req.fail_fast { "--fail-fast" } else { "a job of several ranks" }));
                return Err(err);
            }
            Err(err) => {
                say(format!("[{}/{n}] {}: FAILED: {err}", i + 1, e.label));
                out.entries.push((e, Outcome::Failed(err.to_string())));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::estimate;

    #[test]
    fn the_estimate_keeps_trained_probes_apart() {
        // Nothing ran yet: no estimate, but the trained probes are named.
        assert_eq!(estimate(&[false, true], &[(0.0, 0), (0.0, 0)]), ", 1 trained probe(s) not yet estimated");
        // Two cheap entries took 10 s each: two more cheap ones are about 20 s; the trained one is not guessed from them.
        assert_eq!(estimate(&[false, false, true], &[(20.0, 2), (0.0, 0)]), ", about 20 s for 2 of the 3 left by the mean of their kind so far; 1 trained probe(s) not yet estimated");
        // A trained probe took 300 s: the next one is estimated by it.
        assert_eq!(estimate(&[true, false], &[(20.0, 2), (300.0, 1)]), ", about 310 s for 2 of the 2 left by the mean of their kind so far");
    }
}
