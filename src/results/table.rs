//! The NN / k-NN / LP / EP / Ft (and DAVIS J&F) table: one row per model (model name + checkpoint sha256), the latest record of each
//! protocol in its column, and the published reference rows beside them. Within a column, a row whose protocol
//! version or dataset fingerprint differs from the column's most common one is marked (`†`, `‡`) and explained in
//! a footnote, so numbers made differently are never silently compared.
use std::collections::BTreeMap;

use serde::Serialize;

use super::check::{Entry, ReferenceFile};
use crate::protocols::Protocol;
use super::{markdown_table, version_label, RunRecord};

/// The MAE probe on the global-pool feature gets a column of its own beside the CLS probe.
const LP_GAP: &str = "linear:global_pool";
/// The seg protocol's second number, the logistic regression's mIoU (`miou_logreg`), beside its k-NN headline.
pub const SEG_LR: &str = "seg:logreg";

/// The low-shot columns by images per class of the subset (`protocols::lowshot::column_kind`); other subsets go to
/// the protocol's own "low-shot" column.
const LOWSHOT: [(&str, &str, &str); 4] = [("lowshot:1img", "1 img", "lowshot_1img"), ("lowshot:2img", "2 img", "lowshot_2img"), ("lowshot:5img", "5 img", "lowshot_5img"), ("lowshot:1pct", "1 %", "lowshot_1pct")];

/// The longest cell of the Markdown table: versions and sources go to numbered footnotes, names are cut.
pub const MAX_CELL: usize = 60;

/// Column key, Markdown header and CSV prefix, in table order, by group: image-level (NN, k-NN, the k-NN sweep,
/// LP with its global-pool column and the LP sweep, EP, Ft), region-level (DAVIS J&F), label efficiency (the
/// low-shot columns by subset kind, then the other low-shot runs).
fn columns() -> Vec<(String, &'static str, &'static str)> {
    let p = |p: Protocol| (p.name().to_string(), p.column().0, p.column().1);
    let mut cols = vec![p(Protocol::NnLoo), p(Protocol::Knn), p(Protocol::KnnSweep), p(Protocol::Linear), (LP_GAP.into(), "LP (avg pool)", "lp_gap")];
    cols.extend([p(Protocol::LinearSweep), p(Protocol::Attentive), p(Protocol::Finetune), p(Protocol::Davis), p(Protocol::Seg)]);
    cols.push((SEG_LR.into(), "ADE20K LR", "ade_lr"));
    cols.extend(LOWSHOT.iter().map(|(k, h, c)| (k.to_string(), *h, *c)));
    cols.push(p(Protocol::Lowshot));
    debug_assert!(Protocol::ALL.iter().all(|x| cols.iter().any(|c| c.0 == x.name())), "every protocol has a column");
    cols
}

/// The group a column belongs to, for the legend under the table.
fn group_of(key: &str) -> &'static str {
    if key == Protocol::Davis.name() || key.starts_with(Protocol::Seg.name()) {
        "region-level"
    } else if key.starts_with(Protocol::Lowshot.name()) {
        "label efficiency"
    } else {
        "image-level"
    }
}

/// Whether `key` is a column of the table (a protocol, or a protocol's column by feature or subset kind).
pub fn is_column(key: &str) -> bool {
    columns().iter().any(|c| c.0 == key)
}

/// The column a record belongs to.
pub fn column_key(r: &RunRecord) -> String {
    let gap = r.protocol == Protocol::Linear.name() && r.config.get("feature").and_then(|f| f.as_str()) == Some("global_pool");
    if gap {
        LP_GAP.into()
    } else if r.protocol == Protocol::Lowshot.name() {
        r.config.get("column").and_then(|c| c.as_str()).filter(|c| is_column(c)).unwrap_or(Protocol::Lowshot.name()).to_string()
    } else {
        r.protocol.clone()
    }
}
const MARK_VERSION: &str = "†";
const MARK_DATA: &str = "‡";
const MARK_SKIPPED: &str = "§";

#[derive(Clone, Debug, Serialize)]
pub struct Cell {
    pub value: f64,
    /// Standard deviation over the splits (low-shot with several subsets), shown as "mean ± std".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub std: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top5: Option<f64>,
    /// k of a k-NN headline (the best k of a k-NN sweep).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub k: Option<i64>,
    /// The best temperature of a k-NN sweep.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// The absolute lr, and the base lr it was scaled from (`blr * batch / 256`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blr: Option<f64>,
    pub version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dataset_fingerprint: Option<String>,
    /// `†`, `‡` and reference note numbers.
    pub marks: Vec<String>,
    /// Unreadable files of the evaluation split left out (`eval --skip-bad`).
    #[serde(skip_serializing_if = "is_zero")]
    pub skipped_eval: usize,
    /// Records of this protocol for this row (the latest is shown).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub records: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verified: Option<bool>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// `run` or `reference`.
    pub kind: String,
    pub model: String,
    /// The method (`DINO`, `I-JEPA`, ...): a reference row's, or the family of a run's checkpoint. A run row is
    /// shown right before the published row of its method.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    pub checkpoint_sha256: Option<String>,
    pub arch: Option<String>,
    pub dataset: Option<String>,
    /// Protocol -> cell.
    pub cells: BTreeMap<String, Cell>,
    pub source: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Table {
    pub columns: Vec<String>,
    pub rows: Vec<Row>,
    pub footnotes: Vec<String>,
    pub reference_file: Option<String>,
    pub reference_version: Option<String>,
}

pub use super::fingerprint_id;

fn num(v: &serde_json::Value, key: &str) -> Option<f64> {
    v.get(key).and_then(|x| x.as_f64())
}

/// The latest record's headline, or `metric` of the latest record that has it.
fn cell_of(recs: &[&RunRecord], metric: Option<&str>) -> Option<Cell> {
    let rec = recs.iter().filter(|r| metric.is_none_or(|m| r.metrics.contains_key(m))).max_by(|a, b| a.started_at.cmp(&b.started_at))?;
    let value = match metric {
        Some(m) => rec.metrics.get(m).copied()?,
        None => rec.headline_value().or_else(|| rec.metrics.get("top1").copied())?,
    };
    let splits = rec.config.get("splits").and_then(|s| s.as_i64()).unwrap_or(1);
    Some(Cell {
        value,
        std: rec.metrics.get("top1_std").copied().filter(|_| splits > 1),
        top5: rec.metrics.get("top5").copied(),
        k: ["headline_k", "best_k"].iter().find_map(|key| rec.config.get(key).and_then(|k| k.as_i64())),
        temperature: num(&rec.config, "best_temperature"),
        lr: num(&rec.config, "lr"),
        blr: num(&rec.config, "blr"),
        version: Some(rec.protocol_version.clone()),
        dataset_fingerprint: fingerprint_id(rec),
        marks: Vec::new(),
        skipped_eval: rec.details.get("skipped_eval").and_then(|s| s.as_array()).map_or(0, Vec::len),
        records: Some(recs.len()),
        started_at: Some(rec.started_at.clone()),
        source: None,
        verified: None,
    })
}

/// The most common value (ties: the smallest), among the present ones.
fn mode<'a>(values: impl Iterator<Item = &'a str>) -> Option<String> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for v in values {
        *counts.entry(v).or_default() += 1;
    }
    let best = counts.values().copied().max()?;
    counts.into_iter().find(|(_, c)| *c == best).map(|(v, _)| v.to_string())
}

/// Builds the table from records and, optionally, a reference file.
pub fn build(records: &[RunRecord], reference: Option<&ReferenceFile>) -> Table {
    let cols = columns();
    let known = |p: &str| Protocol::from_name(p).is_some();
    let mut groups: BTreeMap<(String, String), Vec<&RunRecord>> = BTreeMap::new();
    for r in records.iter().filter(|r| known(&r.protocol)) {
        groups.entry((r.model_name.clone(), r.checkpoint_sha256.clone().unwrap_or_default())).or_default().push(r);
    }
    let mut name_count: BTreeMap<&str, usize> = BTreeMap::new();
    for (name, _) in groups.keys() {
        *name_count.entry(name.as_str()).or_default() += 1;
    }
    let mut rows = Vec::new();
    for ((name, sha), recs) in &groups {
        let mut cells = BTreeMap::new();
        for (proto, _, _) in &cols {
            // A seg record fills two columns: its k-NN headline and, in SEG_LR, its logistic regression's mIoU.
            let lr = proto == SEG_LR;
            let of: Vec<&RunRecord> = recs.iter().copied().filter(|r| if lr { r.protocol == Protocol::Seg.name() } else { column_key(r) == *proto }).collect();
            if let Some(c) = cell_of(&of, lr.then_some("miou_logreg")) {
                cells.insert(proto.to_string(), c);
            }
        }
        let model = if name_count[name.as_str()] > 1 && !sha.is_empty() { format!("{name} [{}]", &sha[..8.min(sha.len())]) } else { name.clone() };
        let latest = recs.iter().map(|r| r.started_at.as_str()).max().unwrap_or("");
        let dataset = recs.iter().find_map(|r| r.dataset.clone()).map(|d| {
            std::path::Path::new(&d).file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or(d)
        });
        let method = recs
            .iter()
            .find_map(|r| r.checkpoint_source.as_ref()?.get("family")?.as_str().and_then(|f| crate::checkpoint::Family::parse(f).ok()))
            .and_then(|f| f.method())
            .map(String::from);
        rows.push(Row {
            kind: "run".into(),
            model,
            method,
            checkpoint_sha256: (!sha.is_empty()).then(|| sha.clone()),
            arch: recs.iter().find_map(|r| r.arch.clone()),
            dataset,
            cells,
            source: format!("run {}", latest.split('T').next().unwrap_or(latest)),
        });
    }

    let mut footnotes = Vec::new();
    for row in rows.iter_mut() {
        for (proto, header, _) in &cols {
            if let Some(cell) = row.cells.get_mut(proto.as_str()).filter(|c| c.skipped_eval > 0) {
                cell.marks.push(MARK_SKIPPED.into());
                footnotes.push(format!(
                    "{MARK_SKIPPED} {}, {header}: {} unreadable files of the evaluation split skipped (--skip-bad); the score covers the rest",
                    row.model, cell.skipped_eval
                ));
            }
        }
    }
    for (proto, header, _) in &cols {
        let proto = &proto.as_str();
        let present: Vec<usize> = (0..rows.len()).filter(|&i| rows[i].cells.contains_key(*proto)).collect();
        if present.len() < 2 {
            continue;
        }
        let base_v = mode(present.iter().filter_map(|&i| rows[i].cells[*proto].version.as_deref()));
        let base_f = mode(present.iter().filter_map(|&i| rows[i].cells[*proto].dataset_fingerprint.as_deref()));
        for &i in &present {
            let model = rows[i].model.clone();
            let dataset = rows[i].dataset.clone().unwrap_or_else(|| "?".into());
            let cell = rows[i].cells.get_mut(*proto).expect("present");
            if cell.version != base_v {
                cell.marks.push(MARK_VERSION.into());
                footnotes.push(format!(
                    "{MARK_VERSION} {model}, {header}: protocol version {} (the column's others: {})",
                    cell.version.as_deref().unwrap_or("?"),
                    base_v.as_deref().unwrap_or("?")
                ));
            }
            if cell.dataset_fingerprint != base_f {
                cell.marks.push(MARK_DATA.into());
                footnotes.push(format!(
                    "{MARK_DATA} {model}, {header}: dataset {dataset} (fingerprint {}; the column's others: {})",
                    cell.dataset_fingerprint.as_deref().unwrap_or("none"),
                    base_f.as_deref().unwrap_or("none")
                ));
            }
        }
    }

    if let Some(rf) = reference {
        // A seg reference entry of `miou_logreg` belongs to the SEG_LR column.
        let seg_lr: Vec<Entry> = rf.entries.iter().filter(|e| e.protocol == Protocol::Seg.name() && e.metric == "miou_logreg").map(|e| Entry { protocol: SEG_LR.into(), ..e.clone() }).collect();
        let mut order: Vec<&str> = Vec::new();
        let mut by_model: BTreeMap<&str, Vec<&Entry>> = BTreeMap::new();
        // The row's headline metric per column (`j_and_f` for DAVIS; `top1` for the rest, low-shot's `lowshot:1img` ...
        // columns included).
        let headline = |p: &str| if p == SEG_LR { Some("miou_logreg") } else { Protocol::from_name(p.split(':').next().unwrap_or(p)).map(Protocol::headline_metric) };
        for e in rf.entries.iter().chain(&seg_lr).filter(|e| is_column(&e.protocol) && headline(&e.protocol) == Some(e.metric.as_str())) {
            if !by_model.contains_key(e.model.as_str()) {
                order.push(&e.model);
            }
            by_model.entry(&e.model).or_default().push(e);
        }
        let mut unverified = false;
        let mut note_no = 0;
        for m in order {
            let entries = &by_model[m];
            let first = entries[0];
            let mut cells = BTreeMap::new();
            let mut sources: Vec<String> = Vec::new();
            for e in entries {
                let mut marks = Vec::new();
                if let Some(n) = &e.note {
                    note_no += 1;
                    footnotes.push(format!("[{note_no}] {} {}: {n}", first.method.as_deref().unwrap_or(m), header_of(&e.protocol)));
                    marks.push(format!("[{note_no}]"));
                }
                if e.verified == Some(false) {
                    marks.push("°".into());
                    unverified = true;
                }
                if let Some(s) = &e.source {
                    if !sources.contains(s) {
                        sources.push(s.clone());
                    }
                }
                cells.insert(
                    e.protocol.clone(),
                    Cell {
                        value: e.value,
                        std: e.std,
                        top5: None,
                        k: (e.protocol == Protocol::Knn.name()).then_some(20),
                        temperature: None,
                        lr: None,
                        blr: None,
                        version: rf.version.as_ref().map(|v| format!("reference v{v}")),
                        dataset_fingerprint: None,
                        marks,
                        skipped_eval: 0,
                        records: None,
                        started_at: None,
                        source: e.source.clone(),
                        verified: e.verified,
                    },
                );
            }
            let epochs = first.pretrain_epochs.map(|e| format!(" {e} ep")).unwrap_or_default();
            let whose = first.suite.as_deref().unwrap_or("published");
            rows.push(Row {
                kind: "reference".into(),
                model: format!("{}{epochs} ({whose})", first.method.as_deref().unwrap_or(m)),
                method: first.method.clone(),
                checkpoint_sha256: None,
                arch: first.arch.clone().or_else(|| rf.arch.clone()),
                dataset: rf.dataset.clone(),
                cells,
                source: sources.join("; "),
            });
        }
        if unverified {
            footnotes.push("° not confirmed in a primary source (see the source column)".into());
        }
    }

    // Each published row goes right after the runs of the same method, so the two are read side by side.
    let mut ordered: Vec<Row> = Vec::with_capacity(rows.len());
    let (runs, refs): (Vec<Row>, Vec<Row>) = rows.into_iter().partition(|r| r.kind == "run");
    let mut refs: Vec<Option<Row>> = refs.into_iter().map(Some).collect();
    for r in runs {
        let method = r.method.clone();
        ordered.push(r);
        if let Some(m) = method {
            for slot in refs.iter_mut() {
                if slot.as_ref().is_some_and(|x| x.method.as_deref() == Some(m.as_str())) {
                    ordered.push(slot.take().expect("checked"));
                }
            }
        }
    }
    // Runs of one method stay together before its published rows.
    let mut rows: Vec<Row> = Vec::with_capacity(ordered.len());
    for r in ordered {
        match rows.iter().rposition(|x| x.kind == "run" && x.method.is_some() && x.method == r.method).filter(|_| r.kind == "run") {
            Some(i) => rows.insert(i + 1, r),
            None => rows.push(r),
        }
    }
    rows.extend(refs.into_iter().flatten());
    // Empty columns are left out.
    let columns = cols.iter().filter(|c| rows.iter().any(|r| r.cells.contains_key(&c.0))).map(|c| c.0.clone()).collect();
    Table {
        columns,
        rows,
        footnotes,
        reference_file: reference.map(|r| r.origin.clone()),
        reference_version: reference.and_then(|r| r.version.clone()),
    }
}

fn header_of(proto: &str) -> &'static str {
    columns().into_iter().find(|c| c.0 == proto).map(|c| c.1).unwrap_or("?")
}

fn csv_prefix(proto: &str) -> &'static str {
    columns().into_iter().find(|c| c.0 == proto).map(|c| c.2).unwrap_or("?")
}

fn cell_text(c: &Cell, reference: bool) -> String {
    let mut s = if reference { format!("{:.1}", c.value) } else { format!("{:.2}", c.value) };
    if let Some(sd) = c.std {
        s.push_str(&if reference { format!(" ± {sd:.1}") } else { format!(" ± {sd:.2}") });
    }
    match (c.k.filter(|_| !reference), c.temperature) {
        (Some(k), Some(t)) => s.push_str(&format!(" (k={k}, T={t})")),
        (Some(k), None) => s.push_str(&format!(" (k={k})")),
        _ => {}
    }
    match (c.lr, c.blr) {
        (Some(lr), _) => s.push_str(&format!(" (lr {lr})")),
        (None, Some(blr)) => s.push_str(&format!(" (blr {blr})")),
        _ => {}
    }
    for m in &c.marks {
        s.push(' ');
        s.push_str(m);
    }
    s
}

/// Numbered footnotes, one per distinct text, continuing after the reference notes' numbers.
struct Numbered {
    texts: Vec<String>,
    first: usize,
}

impl Numbered {
    fn mark(&mut self, text: String) -> String {
        let i = match self.texts.iter().position(|t| *t == text) {
            Some(i) => i,
            None => {
                self.texts.push(text);
                self.texts.len() - 1
            }
        };
        format!("[{}]", self.first + i)
    }
}

/// `s` cut to [`MAX_CELL`] characters (an ellipsis in the last).
fn fit(s: String) -> String {
    if s.chars().count() <= MAX_CELL {
        return s;
    }
    let mut t: String = s.chars().take(MAX_CELL - 1).collect();
    t.push('…');
    t
}

impl Table {
    /// Keeps only these columns (keys such as `knn`, `lowshot:1img`, or headers such as `k-NN`, `1 img`), in the
    /// table's order; a name that is no column is an error listing the columns.
    pub fn select(&mut self, wanted: &[String]) -> crate::error::Result<()> {
        let cols = columns();
        for w in wanted {
            if !cols.iter().any(|c| c.0.eq_ignore_ascii_case(w) || c.1.eq_ignore_ascii_case(w)) {
                let known: Vec<String> = cols.iter().map(|c| c.0.clone()).collect();
                return Err(crate::error::Error::option("--columns", format!("`{w}` is not a column (columns: {})", known.join(", "))));
            }
        }
        let keep = |key: &str| wanted.iter().any(|w| cols.iter().any(|c| c.0 == key && (c.0.eq_ignore_ascii_case(w) || c.1.eq_ignore_ascii_case(w))));
        self.columns.retain(|c| keep(c));
        Ok(())
    }

    /// The Markdown table: model, arch, data, the columns, the versions and sources as footnote numbers; no cell
    /// longer than [`MAX_CELL`]. Under it the marks' and notes' footnotes, then one numbered footnote per distinct
    /// protocol version and per distinct source, and the columns' groups.
    pub fn markdown(&self) -> String {
        let mut header = vec!["model".to_string(), "arch".into(), "data".into()];
        header.extend(self.columns.iter().map(|p| header_of(p).to_string()));
        header.push("versions".into());
        header.push("source".into());
        let first = self.footnotes.iter().filter_map(|f| f.strip_prefix('[')?.split(']').next()?.parse::<usize>().ok()).max().unwrap_or(0) + 1;
        let mut notes = Numbered { texts: Vec::new(), first };
        let rows: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| {
                let reference = r.kind == "reference";
                let model = match (&r.method, reference) {
                    (_, true) => format!("*{}*", r.model),
                    (Some(m), false) => format!("{} ({m})", r.model),
                    (None, false) => r.model.clone(),
                };
                let mut v = vec![fit(model), fit(r.arch.clone().unwrap_or_default()), fit(r.dataset.clone().unwrap_or_default())];
                for p in &self.columns {
                    v.push(fit(r.cells.get(p).map(|c| cell_text(c, reference)).unwrap_or_else(|| "–".into())));
                }
                let versions: Vec<String> = if reference {
                    r.cells.values().next().and_then(|c| c.version.clone()).map(|v| notes.mark(format!("published numbers: {v}"))).into_iter().collect()
                } else {
                    r.cells
                        .iter()
                        .filter(|(p, _)| self.columns.contains(p))
                        .map(|(p, c)| notes.mark(format!("{}: protocol {p} {}", header_of(p), version_label(c.version.as_deref().unwrap_or("?")))))
                        .collect()
                };
                v.push(fit(versions.join(" ")));
                let source = if reference {
                    r.source.split("; ").filter(|s| !s.is_empty()).map(|s| notes.mark(s.to_string())).collect::<Vec<_>>().join(" ")
                } else {
                    r.source.clone()
                };
                v.push(fit(source));
                v
            })
            .collect();
        let mut s = markdown_table(&header, &rows);
        s.push('\n');
        for f in &self.footnotes {
            s.push_str(&format!("{f}  \n"));
        }
        for (i, t) in notes.texts.iter().enumerate() {
            s.push_str(&format!("[{}] {t}  \n", notes.first + i));
        }
        let mut groups: Vec<(&str, Vec<&str>)> = Vec::new();
        for p in &self.columns {
            match groups.last_mut() {
                Some((g, cols)) if *g == group_of(p) => cols.push(header_of(p)),
                _ => groups.push((group_of(p), vec![header_of(p)])),
            }
        }
        if !groups.is_empty() {
            let line: Vec<String> = groups.iter().map(|(g, cols)| format!("{g}: {}", cols.join(", "))).collect();
            s.push_str(&format!("Columns by group: {}.\n", line.join("; ")));
        }
        s
    }

    pub fn csv(&self) -> String {
        let mut header = vec!["kind", "model", "checkpoint_sha256", "arch", "dataset"].into_iter().map(String::from).collect::<Vec<_>>();
        for p in &self.columns {
            let c = csv_prefix(p);
            header.push(format!("{c}_top1"));
            if p == Protocol::Knn.name() {
                header.push(format!("{c}_top5"));
                header.push(format!("{c}_k"));
            }
            header.push(format!("{c}_version"));
            header.push(format!("{c}_marks"));
        }
        header.push("source".into());
        let mut w = csv::Writer::from_writer(Vec::new());
        w.write_record(&header).expect("in-memory csv");
        for r in &self.rows {
            let mut v = vec![
                r.kind.clone(),
                r.model.clone(),
                r.checkpoint_sha256.clone().unwrap_or_default(),
                r.arch.clone().unwrap_or_default(),
                r.dataset.clone().unwrap_or_default(),
            ];
            for p in &self.columns {
                let c = r.cells.get(p);
                v.push(c.map(|c| format!("{}", c.value)).unwrap_or_default());
                if p == Protocol::Knn.name() {
                    v.push(c.and_then(|c| c.top5).map(|t| t.to_string()).unwrap_or_default());
                    v.push(c.and_then(|c| c.k).map(|k| k.to_string()).unwrap_or_default());
                }
                v.push(c.and_then(|c| c.version.clone()).unwrap_or_default());
                v.push(c.map(|c| c.marks.join(" ")).unwrap_or_default());
            }
            v.push(r.source.clone());
            w.write_record(&v).expect("in-memory csv");
        }
        String::from_utf8(w.into_inner().expect("flush")).expect("utf-8")
    }

    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).expect("table serialises") + "\n"
    }
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}
