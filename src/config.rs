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
pub fn load<T: Serialize + DeserializeOwned + Default>(path: Option<&Path>, sets: &[String]) -> Result<T> {
    match path {
        Some(p) => load_source(Some(&Source::file(p)?), sets),
        None => load_source(None, sets),
    }
}

/// As [`load`], from text already read (a built-in protocol file).
pub fn load_source<T: Serialize + DeserializeOwned + Default>(src: Option<&Source>, sets: &[String]) -> Result<T> {
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
