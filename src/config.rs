//! Config files: TOML read into serde structs with defaults, `key=value` overrides, and a check that every key is
//! known (a typo in a config is an error that names the file and the key, not a silently ignored value). One
//! loader serves pretraining configs and protocol files alike.
use std::path::{Path, PathBuf};

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tch::{Device, Kind};

use crate::error::{Error, Result};

/// Numeric precision of the forward passes: `auto` is bf16 autocast on CUDA and f32 on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Auto,
    Bf16,
    F32,
}

impl Precision {
    /// The autocast dtype on `device`, `None` for f32.
    pub fn autocast(self, device: Device) -> Option<Kind> {
        match self {
            Precision::Bf16 => Some(Kind::BFloat16),
            Precision::Auto if device.is_cuda() => Some(Kind::BFloat16),
            _ => None,
        }
    }
    /// The name of what actually runs on `device` (`bf16` or `f32`), for records.
    pub fn effective(self, device: Device) -> &'static str {
        if self.autocast(device).is_some() {
            "bf16"
        } else {
            "f32"
        }
    }
}

/// Where a config's text comes from, for error messages.
#[derive(Debug, Clone)]
pub struct Source {
    pub text: String,
    pub origin: PathBuf,
}

impl Source {
    pub fn file(path: &Path) -> Result<Source> {
        let text = crate::fsutil::read_regular_text(path, Some(crate::fsutil::TEXT_LIMIT))?;
        Ok(Source { text, origin: path.to_path_buf() })
    }
}

/// Parses `value` of an override as TOML (number, bool, array, quoted string); bare words are strings.
fn parse_value(value: &str) -> toml::Value {
    let doc = format!("v = {value}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(value.into())),
        Err(_) => toml::Value::String(value.to_string()),
    }
}

fn apply_sets(table: &mut toml::Table, sets: &[String]) -> Result<()> {
    for s in sets {
        let (key, value) = s.split_once('=').ok_or_else(|| Error::option("--set", format!("`{s}` is not key=value")))?;
        let mut parts: Vec<&str> = key.trim().split('.').collect();
        let last = parts.pop().unwrap_or_default();
        let mut t = &mut *table;
        for p in parts {
            t = t
                .entry(p)
                .or_insert_with(|| toml::Value::Table(Default::default()))
                .as_table_mut()
                .ok_or_else(|| Error::option("--set", format!("`{key}`: `{p}` is not a table")))?;
        }
        t.insert(last.to_string(), parse_value(value.trim()));
    }
    Ok(())
}

/// Loads a config: defaults, then the file (if any), then the `key=value` overrides (dotted keys for nested
/// tables). Unknown keys are errors naming the file; a value that does not fit its key names the override when the
/// file alone is fine.
pub fn load<T: Recipe>(path: Option<&Path>, sets: &[String]) -> Result<T> {
    match path {
        Some(p) => load_source(Some(&Source::file(p)?), sets),
        None => load_source(None, sets),
    }
}

/// As [`load`], from text already read (a built-in protocol file). Every numeric key is checked against the
/// recipe's [`Recipe::rules`]; the error names the key, its value, its range and the override or file line.
pub fn load_source<T: Recipe>(src: Option<&Source>, sets: &[String]) -> Result<T> {
    let cfg: T = parse_source(src, sets)?;
    match violation(&cfg) {
        Some(v) => Err(located(&v, src, sets)),
        None => Ok(cfg),
    }
}

fn parse_source<T: Serialize + DeserializeOwned + Default>(src: Option<&Source>, sets: &[String]) -> Result<T> {
    let origin = src.map_or_else(|| PathBuf::from("<defaults>"), |s| s.origin.clone());
    let table = match src {
        Some(s) => s.text.parse::<toml::Table>().map_err(|e| Error::BadConfig { path: origin.clone(), reason: e.to_string() })?,
        None => toml::Table::new(),
    };
    // JSON keeps `None` fields as null where TOML drops them, so optional keys (e.g. `lr`) count as known.
    let defaults = match serde_json::to_value(T::default()).expect("defaults serialise") {
        serde_json::Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    check_keys(&table, &defaults, "", &origin.display().to_string())?;
    let parse = |t: toml::Table| toml::Value::Table(t).try_into::<T>();
    // serde's message says what was expected but not for which key: find the key by parsing it alone.
    let file_error = |table: &toml::Table, e: toml::de::Error| {
        let reason = match blame_key::<T>(table) {
            Some(key) => format!("key `{key}`: {}", e.message()),
            None => e.message().to_string(),
        };
        Error::BadConfig { path: origin.clone(), reason }
    };
    if sets.is_empty() {
        return parse(table.clone()).map_err(|e| file_error(&table, e));
    }
    let mut with_sets = table.clone();
    apply_sets(&mut with_sets, sets)?;
    check_keys(&with_sets, &defaults, "", "--set")?;
    parse(with_sets.clone()).map_err(|e| match parse(table.clone()) {
        Ok(_) => {
            let culprit = blame_key::<T>(&with_sets).and_then(|key| sets.iter().rev().find(|s| s.split_once('=').is_some_and(|(k, _)| k.trim() == key)));
            match culprit {
                Some(s) => Error::option("--set", format!("`{}`: {}", s.trim(), e.message())),
                None => Error::option("--set", format!("{} ({})", e.message(), sets.join(" "))),
            }
        }
        Err(f) => file_error(&table, f),
    })
}

/// The first (dotted) key of `table` whose value alone, over the defaults, does not parse as `T`.
fn blame_key<T: Serialize + DeserializeOwned + Default>(table: &toml::Table) -> Option<String> {
    fn walk<T: DeserializeOwned>(root: &toml::Table, path: &mut Vec<String>, t: &toml::Table, base: &toml::Table) -> Option<String> {
        for (k, v) in t {
            path.push(k.clone());
            let found = match (v, base.get(k)) {
                (toml::Value::Table(sub), Some(toml::Value::Table(sub_base))) => walk::<T>(root, path, sub, sub_base),
                _ => {
                    let mut trial = root.clone();
                    let mut at = &mut trial;
                    for p in &path[..path.len() - 1] {
                        at = at.get_mut(p)?.as_table_mut()?;
                    }
                    at.insert(k.clone(), v.clone());
                    toml::Value::Table(trial).try_into::<T>().is_err().then(|| path.join("."))
                }
            };
            path.pop();
            if found.is_some() {
                return found;
            }
        }
        None
    }
    let defaults = match toml::Value::try_from(T::default()).ok()? {
        toml::Value::Table(t) => t,
        _ => return None,
    };
    toml::Value::Table(defaults.clone()).try_into::<T>().ok()?;
    walk::<T>(&defaults, &mut Vec::new(), table, &defaults)
}

fn check_keys(t: &toml::Table, defaults: &serde_json::Map<String, serde_json::Value>, prefix: &str, source: &str) -> Result<()> {
    for (k, v) in t {
        let full = format!("{prefix}{k}");
        match defaults.get(k) {
            None if !defaults.is_empty() => {
                let mut known: Vec<&String> = defaults.keys().collect();
                known.sort();
                return Err(Error::BadConfig {
                    path: source.into(),
                    reason: format!("unknown key `{full}` (known: {})", known.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")),
                });
            }
            Some(serde_json::Value::Object(d)) => {
                if let toml::Value::Table(sub) = v {
                    check_keys(sub, d, &format!("{full}."), source)?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// The keys whose values differ between two configs, as `key=value` of `now` (dotted for nested tables, sorted),
/// so that a protocol version can say what was overridden.
pub fn changed_keys<T: Serialize>(base: &T, now: &T) -> Vec<String> {
    fn walk(prefix: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
        match (a, b) {
            (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
                for (k, vb) in y {
                    let va = x.get(k).unwrap_or(&serde_json::Value::Null);
                    walk(&format!("{prefix}{k}."), va, vb, out);
                }
            }
            _ if a != b => {
                let v = match b {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                out.push(format!("{}={v}", prefix.trim_end_matches('.')));
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    let (a, b) = (serde_json::to_value(base).expect("config serialises"), serde_json::to_value(now).expect("config serialises"));
    walk("", &a, &b, &mut out);
    out.sort();
    out
}

/// Writes a config as TOML (beside a run's outputs, so the run can be repeated).
pub fn save<T: Serialize>(cfg: &T, path: &Path) -> Result<()> {
    let text = toml::to_string_pretty(cfg).map_err(|e| Error::BadConfig { path: path.into(), reason: e.to_string() })?;
    crate::checkpoint::write_atomic(path, text.as_bytes())
}

/// The valid values of one numeric recipe key. Each recipe struct lists a [`Rule`] for every numeric key beside
/// its definition ([`Recipe::rules`]); [`check_rules`] checks them for files, `--set` and `key=value` alike.
#[derive(Debug, Clone, Copy)]
pub enum Range {
    /// A finite number between `lo` and `hi`, each end included unless marked open.
    Real { lo: f64, lo_open: bool, hi: f64, hi_open: bool },
    /// A whole number in `lo..=hi`.
    Int { lo: i64, hi: i64 },
}

/// How one key relates to another.
#[derive(Debug, Clone, Copy)]
pub enum Relation {
    /// value <= the other key's value.
    AtMost(&'static str),
    /// value is a multiple of the other key's value.
    MultipleOf(&'static str),
    /// value is one of the other key's (list) values.
    OneOf(&'static str),
}

/// One numeric key of a recipe (dotted for nested tables), its range and relations. A list-valued key has the
/// range per entry; an optional key is checked when present.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    pub key: &'static str,
    pub range: Range,
    pub relation: Option<Relation>,
}

impl Rule {
    /// A finite number in `[lo, hi]`.
    pub const fn real(key: &'static str, lo: f64, hi: f64) -> Rule {
        Rule { key, range: Range::Real { lo, lo_open: false, hi, hi_open: false }, relation: None }
    }
    /// A finite number in `(lo, hi]`.
    pub const fn above(key: &'static str, lo: f64, hi: f64) -> Rule {
        Rule { key, range: Range::Real { lo, lo_open: true, hi, hi_open: false }, relation: None }
    }
    /// A finite number in `[lo, hi)`.
    pub const fn below(key: &'static str, lo: f64, hi: f64) -> Rule {
        Rule { key, range: Range::Real { lo, lo_open: false, hi, hi_open: true }, relation: None }
    }
    /// A whole number in `lo..=hi`.
    pub const fn int(key: &'static str, lo: i64, hi: i64) -> Rule {
        Rule { key, range: Range::Int { lo, hi }, relation: None }
    }
    pub const fn at_most(self, other: &'static str) -> Rule {
        Rule { relation: Some(Relation::AtMost(other)), ..self }
    }
    pub const fn multiple_of(self, other: &'static str) -> Rule {
        Rule { relation: Some(Relation::MultipleOf(other)), ..self }
    }
    pub const fn one_of(self, other: &'static str) -> Rule {
        Rule { relation: Some(Relation::OneOf(other)), ..self }
    }

    /// The range in words: `[0, 1)`, `1..=65536 (whole)`.
    pub fn range_text(&self) -> String {
        match self.range {
            Range::Real { lo, lo_open, hi, hi_open } => {
                format!("a finite number in {}{lo}, {hi}{}", if lo_open { "(" } else { "[" }, if hi_open { ")" } else { "]" })
            }
            Range::Int { lo, hi } => format!("a whole number in {lo}..={hi}"),
        }
    }

    /// Whether one value (an entry of a list key) is in range.
    pub fn admits(&self, v: &toml::Value) -> bool {
        match (self.range, v) {
            (Range::Int { lo, hi }, toml::Value::Integer(i)) => (lo..=hi).contains(i),
            (Range::Real { lo, lo_open, hi, hi_open }, v) => {
                let x = match v {
                    toml::Value::Float(x) => *x,
                    toml::Value::Integer(i) => *i as f64,
                    _ => return false,
                };
                x.is_finite() && (if lo_open { x > lo } else { x >= lo }) && (if hi_open { x < hi } else { x <= hi })
            }
            _ => false,
        }
    }
}

/// A recipe: a config struct read by [`load`] / [`load_source`], with the valid range of every numeric key.
pub trait Recipe: Serialize + DeserializeOwned + Default {
    /// A rule for every numeric key (the property test in `tests/cli_fuzz.rs` checks that none is missing).
    fn rules() -> Vec<Rule>;
}

/// The value at a dotted key.
fn lookup<'a>(table: &'a toml::Table, key: &str) -> Option<&'a toml::Value> {
    let mut parts = key.split('.');
    let mut v = table.get(parts.next()?)?;
    for p in parts {
        v = v.as_table()?.get(p)?;
    }
    Some(v)
}

fn as_f64(v: &toml::Value) -> Option<f64> {
    match v {
        toml::Value::Float(x) => Some(*x),
        toml::Value::Integer(i) => Some(*i as f64),
        _ => None,
    }
}

/// A key whose value is outside its range: the key, its value as written, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    pub key: &'static str,
    /// The other key of a broken relation.
    pub other: Option<&'static str>,
    pub value: String,
    pub reason: String,
}

/// The first key of `cfg` that breaks its [`Rule`], if any.
pub fn violation<T: Recipe>(cfg: &T) -> Option<Violation> {
    let table = match toml::Value::try_from(cfg) {
        Ok(toml::Value::Table(t)) => t,
        _ => return None,
    };
    let rules = T::rules();
    // Ranges first: a relation between two keys names the one out of its own range, if any.
    for rule in &rules {
        let Some(v) = lookup(&table, rule.key) else { continue };
        let entries: Vec<&toml::Value> = match v {
            toml::Value::Array(a) => a.iter().collect(),
            v => vec![v],
        };
        if let Some(bad) = entries.iter().find(|e| !rule.admits(e)) {
            let entry = if matches!(v, toml::Value::Array(_)) { format!("entry {bad}: ") } else { String::new() };
            return Some(Violation { key: rule.key, other: None, value: v.to_string(), reason: format!("{entry}must be {}", rule.range_text()) });
        }
    }
    for rule in &rules {
        let Some(v) = lookup(&table, rule.key) else { continue };
        let shown = |v: &toml::Value| v.to_string();
        let Some(rel) = rule.relation else { continue };
        let (other, ok, words) = match rel {
            Relation::AtMost(o) => {
                let ok = match (as_f64(v), lookup(&table, o).and_then(as_f64)) {
                    (Some(a), Some(b)) => a <= b,
                    _ => true,
                };
                (o, ok, "at most")
            }
            Relation::MultipleOf(o) => {
                let ok = match (v, lookup(&table, o)) {
                    (toml::Value::Integer(a), Some(toml::Value::Integer(b))) => *b != 0 && a % b == 0,
                    _ => true,
                };
                (o, ok, "a multiple of")
            }
            Relation::OneOf(o) => {
                let ok = match lookup(&table, o) {
                    Some(toml::Value::Array(a)) => a.contains(v),
                    _ => true,
                };
                (o, ok, "one of")
            }
        };
        if !ok {
            let theirs = lookup(&table, other).map(shown).unwrap_or_default();
            return Some(Violation { key: rule.key, other: Some(other), value: shown(v), reason: format!("must be {words} `{other}` ({theirs})") });
        }
    }
    None
}

/// Checks `cfg` against its table, for a recipe built in code (no file to name): the error names the key.
pub fn check_rules<T: Recipe>(cfg: &T) -> Result<()> {
    match violation(cfg) {
        Some(v) => Err(Error::option(v.key, v.reason)),
        None => Ok(()),
    }
}

/// The line of `text` that sets `key` (its last dotted part, in the table of the others), 1-based.
fn line_of(text: &str, key: &str) -> Option<usize> {
    let (table, last) = match key.rsplit_once('.') {
        Some((t, l)) => (Some(t), l),
        None => (None, key),
    };
    let mut current: Option<String> = None;
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if let Some(h) = l.strip_prefix('[').and_then(|h| h.split(']').next()) {
            current = Some(h.trim().to_string());
            continue;
        }
        let Some((k, _)) = l.split_once('=') else { continue };
        let k = k.trim().trim_matches('"');
        let full = match &current {
            Some(t) => format!("{t}.{k}"),
            None => k.to_string(),
        };
        if full == key || (table.is_none() && current.is_none() && k == last) {
            return Some(i + 1);
        }
    }
    None
}

/// The error for a violation in a loaded recipe, naming where the value came from: the override that set the
/// key (or its partner in a relation), else the file and line, else the defaults.
fn located(v: &Violation, src: Option<&Source>, sets: &[String]) -> Error {
    let set_of = |key: &str| sets.iter().rev().find(|s| s.split_once('=').is_some_and(|(k, _)| k.trim() == key));
    let msg = format!("key `{}` = {}: {}", v.key, v.value, v.reason);
    if let Some(s) = set_of(v.key).or_else(|| v.other.and_then(set_of)) {
        return Error::option("--set", format!("`{}`: {msg}", s.trim()));
    }
    if let Some(src) = src {
        let line = line_of(&src.text, v.key).or_else(|| v.other.and_then(|o| line_of(&src.text, o)));
        if let Some(line) = line {
            return Error::BadConfig { path: PathBuf::from(format!("{}:{line}", src.origin.display())), reason: msg };
        }
        return Error::BadConfig { path: src.origin.clone(), reason: format!("{msg} (the default)") };
    }
    Error::option(v.key, msg)
}
