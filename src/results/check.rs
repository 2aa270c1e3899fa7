//! Regression checks of results records against expected values: a reference file (the published table
//! `protocols/reference.toml`, or a golden results file) or a baseline run.
//!
//! Reference file (TOML, or JSON with the same fields):
//! ```toml
//! version = "1"
//! [tolerance]            # default tolerance per protocol, percentage points
//! knn = 0.5
//! [[expect]]             # golden values: a missing result fails the check
//! model = "pico-pretrained"   # a record's model_name, or "*"
//! protocol = "knn"
//! metric = "top1@k20"    # default "top1"
//! value = 61.2
//! tolerance = 0.5        # optional; else [tolerance], else 0.1
//! gate = "hard"          # hard (default): fail below value - tolerance; soft: warn (fail with --strict); info
//! two_sided = false      # also fail above value + tolerance (a re-evaluation of a fixed checkpoint)
//! [[result]]             # published numbers: same fields, a missing result is not an error
//! ```
//! `protocol` may also name a table column of a protocol (`lowshot:1img`, `lowshot:2img`, `lowshot:5img`,
//! `lowshot:1pct`: low-shot records by images per class of their subset).
//! Optional entry fields: `checkpoint_sha256` (prefix), `protocol_version`, `required`, `std`, and the descriptive
//! `method`, `pretrain_epochs`, `arch`, `suite`, `note`, `source`, `verified`.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{markdown_table, RunRecord};
use crate::error::{Error, Result};

pub const REFERENCE_TOML: &str = include_str!("../../protocols/reference.toml");
/// Tolerance when neither the entry, the file nor the command line gives one (protocols.md D.2: a re-evaluation
/// of a fixed checkpoint).
pub const DEFAULT_TOLERANCE: f64 = 0.1;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Gate {
    #[default]
    Hard,
    Soft,
    Info,
}

/// One expected value.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_sha256: Option<String>,
    pub protocol: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_version: Option<String>,
    #[serde(default = "default_metric")]
    pub metric: String,
    pub value: f64,
    /// A published standard deviation (over splits), shown by `table` as "value ± std".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub std: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerance: Option<f64>,
    #[serde(default)]
    pub gate: Gate,
    #[serde(default)]
    pub two_sided: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub required: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pretrain_epochs: Option<u64>,
    /// The entry's architecture when it is not the file's `arch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// Whose evaluation the number is, when not the method's own publication (e.g. a benchmark's); the table
    /// names it in the row instead of "published".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suite: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<bool>,
}

fn default_metric() -> String {
    "top1".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    version: Option<String>,
    dataset: Option<String>,
    arch: Option<String>,
    #[serde(default)]
    tolerance: BTreeMap<String, f64>,
    #[serde(default)]
    expect: Vec<Entry>,
    #[serde(default)]
    result: Vec<Entry>,
}

/// A parsed reference file. `entries` have `required` resolved (`[[expect]]` true, `[[result]]` false).
#[derive(Clone, Debug, Serialize)]
pub struct ReferenceFile {
    pub origin: String,
    pub version: Option<String>,
    pub dataset: Option<String>,
    pub arch: Option<String>,
    pub tolerance: BTreeMap<String, f64>,
    pub entries: Vec<Entry>,
}

impl ReferenceFile {
    pub fn parse(text: &str, origin: &Path) -> Result<Self> {
        let is_json = origin.extension().is_some_and(|e| e == "json");
        let raw: RawFile = if is_json {
            serde_json::from_str(text).map_err(|e| Error::data(origin, format!("not a reference file: {e}")))?
        } else {
            toml::from_str(text).map_err(|e| Error::data(origin, format!("not a reference file: {e}")))?
        };
        let mut entries = Vec::new();
        for (list, required) in [(raw.expect, true), (raw.result, false)] {
            for mut e in list {
                e.required.get_or_insert(required);
                entries.push(e);
            }
        }
        if entries.is_empty() {
            return Err(Error::data(origin, "no [[expect]] or [[result]] entries"));
        }
        for e in &entries {
            if !e.value.is_finite() || e.tolerance.is_some_and(|t| t.is_nan() || t < 0.0) {
                return Err(Error::data(origin, format!("{} {} {}: value and tolerance must be finite, tolerance >= 0", e.model, e.protocol, e.metric)));
            }
        }
        if let Some((p, t)) = raw.tolerance.iter().find(|(_, t)| t.is_nan() || **t < 0.0) {
            return Err(Error::data(origin, format!("[tolerance] {p} = {t} must be >= 0")));
        }
        Ok(ReferenceFile {
            origin: origin.display().to_string(),
            version: raw.version,
            dataset: raw.dataset,
            arch: raw.arch,
            tolerance: raw.tolerance,
            entries,
        })
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = crate::fsutil::read_regular_text(path, Some(crate::fsutil::TEXT_LIMIT)).map_err(|e| Error::data(path, format!("cannot read the reference file: {e}")))?;
        Self::parse(&text, path)
    }

    /// `path`, or when it is the default `protocols/reference.toml` and absent here, the built-in copy.
    pub fn load_or_builtin(path: &Path) -> Result<Self> {
        if !path.exists() && path == Path::new("protocols/reference.toml") {
            return Self::parse(REFERENCE_TOML, Path::new("<built-in protocols/reference.toml>"));
        }
        Self::load(path)
    }

    fn tolerance_of(&self, e: &Entry, cli: Option<f64>) -> f64 {
        cli.or(e.tolerance).or_else(|| self.tolerance.get(&e.protocol).copied()).unwrap_or(DEFAULT_TOLERANCE)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Ok,
    Fail,
    Warn,
    Info,
    Missing,
    /// The result used another protocol version than the baseline.
    Incomparable,
}

impl Verdict {
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Fail => "FAIL",
            Verdict::Warn => "warn",
            Verdict::Info => "info",
            Verdict::Missing => "MISSING",
            Verdict::Incomparable => "INCOMPARABLE",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct CheckRow {
    pub model: String,
    pub protocol: String,
    pub metric: String,
    pub value: Option<f64>,
    pub reference: f64,
    pub delta: Option<f64>,
    pub tolerance: f64,
    pub gate: Gate,
    pub verdict: Verdict,
    /// Whether this row makes the check fail.
    pub failed: bool,
    pub note: String,
    /// The record compared (its file name).
    pub record: Option<String>,
}

#[derive(Clone, Debug, Default)]
pub struct CheckOptions {
    /// Overrides every tolerance.
    pub tolerance: Option<f64>,
    /// Soft gates fail too.
    pub strict: bool,
    /// Compare every record with the entries of this reference model, whatever the record's model name.
    pub reference_model: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CheckOutcome {
    pub rows: Vec<CheckRow>,
    pub failed: usize,
    /// Entries without a result that are not required (published numbers of protocols not run).
    pub skipped: usize,
}

fn latest<'a>(recs: impl Iterator<Item = &'a RunRecord>) -> Option<&'a RunRecord> {
    recs.max_by(|a, b| a.started_at.cmp(&b.started_at))
}

fn matches_sha(entry: &Option<String>, rec: &RunRecord) -> bool {
    match entry {
        None => true,
        Some(s) => rec.checkpoint_sha256.as_deref().is_some_and(|r| r.starts_with(s.as_str())),
    }
}

/// Compares records with the entries of a reference file.
pub fn check(records: &[RunRecord], reference: &ReferenceFile, opts: &CheckOptions) -> Result<CheckOutcome> {
    if records.is_empty() {
        return Err(Error::data(&reference.origin, "no results records to check"));
    }
    let entries: Vec<&Entry> = match &opts.reference_model {
        Some(m) => {
            let v: Vec<&Entry> = reference.entries.iter().filter(|e| &e.model == m).collect();
            if v.is_empty() {
                let mut models: Vec<&str> = reference.entries.iter().map(|e| e.model.as_str()).collect();
                models.dedup();
                return Err(Error::option("--reference-model", format!("no entries for `{m}` in {} (it has: {})", reference.origin, models.join(", "))));
            }
            v
        }
        None => reference.entries.iter().collect(),
    };
    let mut rows = Vec::new();
    let mut skipped = 0;
    for e in entries {
        let rec = latest(records.iter().filter(|r| {
            (r.protocol == e.protocol || super::table::column_key(r) == e.protocol)
                && (opts.reference_model.is_some() || e.model == "*" || r.model_name == e.model)
                && matches_sha(&e.checkpoint_sha256, r)
                && e.protocol_version.as_ref().is_none_or(|v| &r.protocol_version == v)
        }));
        let tol = reference.tolerance_of(e, opts.tolerance);
        let required = e.required.unwrap_or(true);
        let value = rec.and_then(|r| r.metrics.get(&e.metric).copied());
        if value.is_none() && !required {
            skipped += 1;
            continue;
        }
        let model = rec.map(|r| r.model_name.clone()).unwrap_or_else(|| e.model.clone());
        let mut note = e.note.clone().unwrap_or_default();
        if opts.reference_model.is_some() {
            note = format!("vs {}{}{}", e.model, if note.is_empty() { "" } else { ": " }, note);
        }
        rows.push(judge(e, model, value, tol, opts.strict, note, rec));
    }
    let outcome = finish(rows, skipped);
    if outcome.rows.iter().all(|r| r.value.is_none()) {
        let have: Vec<String> = records.iter().map(|r| format!("{} ({})", r.model_name, r.protocol)).collect();
        return Err(Error::data(&reference.origin, format!("no results match its entries; the results hold: {}", have.join(", "))));
    }
    Ok(outcome)
}

fn judge(e: &Entry, model: String, value: Option<f64>, tol: f64, strict: bool, note: String, rec: Option<&RunRecord>) -> CheckRow {
    let delta = value.map(|v| v - e.value);
    // Values are printed with two decimals: an epsilon keeps a delta of exactly -tolerance from failing on rounding.
    let eps = 1e-9;
    let verdict = match delta {
        None => Verdict::Missing,
        Some(_) if e.gate == Gate::Info => Verdict::Info,
        Some(d) if d < -tol - eps || (e.two_sided && d > tol + eps) => {
            if e.gate == Gate::Soft {
                Verdict::Warn
            } else {
                Verdict::Fail
            }
        }
        Some(_) => Verdict::Ok,
    };
    let failed = match verdict {
        Verdict::Fail | Verdict::Incomparable => true,
        Verdict::Missing => e.required.unwrap_or(true),
        Verdict::Warn => strict,
        _ => false,
    };
    CheckRow {
        model,
        protocol: e.protocol.clone(),
        metric: e.metric.clone(),
        value,
        reference: e.value,
        delta,
        tolerance: tol,
        gate: e.gate,
        verdict,
        failed,
        note,
        record: rec.map(|r| r.file_name()),
    }
}

fn finish(rows: Vec<CheckRow>, skipped: usize) -> CheckOutcome {
    let failed = rows.iter().filter(|r| r.failed).count();
    CheckOutcome { rows, failed, skipped }
}

/// Higher-is-better metrics of a record: accuracies (`top1`, `top5`, `top1@k20`, ...), ADE20K's mIoU and DAVIS's J&F, J and F
/// means and recalls (their decays are lower-is-better and are left out).
fn accuracy_metrics(rec: &RunRecord) -> impl Iterator<Item = (&String, &f64)> {
    // DAVIS's J&F, J and F means and recalls are accuracies too; a spread over splits (`top1_std`) is not: a lower
    // one is no regression.
    const DAVIS: [&str; 5] = ["j_and_f", "j_mean", "f_mean", "j_recall", "f_recall"];
    rec.metrics.iter().filter(|(k, v)| (k.starts_with("top") || k.starts_with("acc") || k.starts_with("miou") || DAVIS.contains(&k.as_str())) && !k.ends_with("_std") && v.is_finite())
}

/// Compares records with a baseline run: every accuracy metric of the baseline's latest record per (model,
/// protocol) must not drop by more than the tolerance. A model name found on one side only is paired with the
/// other side's only model of that protocol, so two differently named checkpoints can be compared.
pub fn check_baseline(records: &[RunRecord], baseline: &[RunRecord], opts: &CheckOptions, origin: &Path) -> Result<CheckOutcome> {
    if records.is_empty() {
        return Err(Error::data(origin, "no results records to check"));
    }
    if baseline.is_empty() {
        return Err(Error::data(origin, "no records in the baseline"));
    }
    let tol = opts.tolerance.unwrap_or(DEFAULT_TOLERANCE);
    let mut keys: Vec<(String, String)> = baseline.iter().map(|r| (r.model_name.clone(), super::table::column_key(r))).collect();
    keys.sort();
    keys.dedup();
    let mut rows = Vec::new();
    let mut matched_any = false;
    for (model, protocol) in keys {
        let base = latest(baseline.iter().filter(|r| r.model_name == model && super::table::column_key(r) == protocol)).expect("key from baseline");
        let mut rec = latest(records.iter().filter(|r| r.model_name == model && super::table::column_key(r) == protocol));
        if rec.is_none() {
            let mut names: Vec<&str> = records.iter().filter(|r| super::table::column_key(r) == protocol).map(|r| r.model_name.as_str()).collect();
            names.sort();
            names.dedup();
            if names.len() == 1 {
                rec = latest(records.iter().filter(|r| super::table::column_key(r) == protocol));
            }
        }
        matched_any |= rec.is_some();
        for (metric, &value) in accuracy_metrics(base) {
            let e = Entry {
                model: model.clone(),
                method: None,
                checkpoint_sha256: None,
                protocol: protocol.clone(),
                protocol_version: Some(base.protocol_version.clone()),
                metric: metric.clone(),
                value,
                std: None,
                tolerance: Some(tol),
                gate: Gate::Hard,
                two_sided: false,
                required: Some(true),
                pretrain_epochs: None,
                arch: None,
                suite: None,
                note: None,
                source: None,
                verified: None,
            };
            let v = rec.and_then(|r| r.metrics.get(metric).copied());
            let name = rec.map(|r| r.model_name.clone()).unwrap_or_else(|| model.clone());
            let note = if name != model { format!("vs baseline {model}") } else { String::new() };
            let mut row = judge(&e, name, v, tol, opts.strict, note, rec);
            if let Some(r) = rec.filter(|r| r.protocol_version != base.protocol_version) {
                row.verdict = Verdict::Incomparable;
                row.failed = true;
                row.note = format!("protocol version {} vs baseline {}", r.protocol_version, base.protocol_version);
            }
            rows.push(row);
        }
    }
    if !matched_any {
        let have: Vec<String> = records.iter().map(|r| format!("{} ({})", r.model_name, r.protocol)).collect();
        return Err(Error::data(origin, format!("no results match the baseline's models and protocols; the results hold: {}", have.join(", "))));
    }
    Ok(finish(rows, 0))
}

fn fmt_opt(v: Option<f64>, signed: bool) -> String {
    match v {
        Some(x) if signed => format!("{x:+.2}"),
        Some(x) => format!("{x:.2}"),
        None => "–".into(),
    }
}

/// The outcome as a Markdown table and a summary line.
pub fn render(outcome: &CheckOutcome, against: &str) -> String {
    let header: Vec<String> = ["model", "protocol", "metric", "value", "reference", "delta", "tolerance", "gate", "verdict", "note"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let rows: Vec<Vec<String>> = outcome
        .rows
        .iter()
        .map(|r| {
            vec![
                r.model.clone(),
                r.protocol.clone(),
                r.metric.clone(),
                fmt_opt(r.value, false),
                format!("{:.2}", r.reference),
                fmt_opt(r.delta, true),
                format!("{:.2}", r.tolerance),
                format!("{:?}", r.gate).to_lowercase(),
                r.verdict.label().into(),
                r.note.clone(),
            ]
        })
        .collect();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &outcome.rows {
        *counts.entry(r.verdict.label()).or_default() += 1;
    }
    let summary: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
    let mut s = markdown_table(&header, &rows);
    s.push_str(&format!(
        "\ncheck against {against}: {} compared ({}){}; {}\n",
        outcome.rows.len(),
        summary.join(", "),
        if outcome.skipped > 0 { format!(", {} reference entries without results skipped", outcome.skipped) } else { String::new() },
        if outcome.failed == 0 { "PASSED".to_string() } else { format!("FAILED ({} metric(s))", outcome.failed) }
    ));
    s
}

/// Reads results from files and directories; an input that holds no record is an error.
pub fn read_results(inputs: &[PathBuf]) -> Result<Vec<RunRecord>> {
    let recs = super::collect_records(inputs)?;
    if recs.is_empty() {
        let shown: Vec<String> = inputs.iter().map(|p| p.display().to_string()).collect();
        return Err(Error::data(shown.join(", "), "no results records found"));
    }
    Ok(recs)
}
