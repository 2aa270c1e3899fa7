//! Config files: TOML read into serde structs with defaults, `--set key=value` overrides, and a check that every
//! key is known (a typo in a config is an error that names the file and the key, not a silently ignored value).
use std::path::Path;

use serde::{de::DeserializeOwned, Serialize};

use crate::error::{Error, Result};

/// Parses `value` of a `--set` as TOML (number, bool, array, quoted string); bare words are strings.
fn parse_value(value: &str) -> toml::Value {
    let doc = format!("v = {value}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(value.into())),
        Err(_) => toml::Value::String(value.to_string()),
    }
}

/// Loads a config: defaults, then the file (if any), then the `key=value` overrides (dotted keys for nested
/// tables). Unknown keys are errors.
pub fn load<T: Serialize + DeserializeOwned + Default>(path: Option<&Path>, sets: &[String]) -> Result<T> {
    let source = path.map(|p| p.to_path_buf()).unwrap_or_else(|| "<defaults>".into());
    let mut table = match path {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
            text.parse::<toml::Table>().map_err(|e| Error::BadConfig { path: p.into(), reason: e.to_string() })?
        }
        None => toml::Table::new(),
    };
    for s in sets {
        let (key, value) = s.split_once('=').ok_or_else(|| Error::option("--set", format!("`{s}` is not key=value")))?;
        let mut parts: Vec<&str> = key.trim().split('.').collect();
        let last = parts.pop().unwrap_or_default();
        let mut t = &mut table;
        for p in parts {
            t = t.entry(p).or_insert_with(|| toml::Value::Table(Default::default())).as_table_mut().ok_or_else(|| Error::option("--set", format!("`{key}`: `{p}` is not a table")))?;
        }
        t.insert(last.to_string(), parse_value(value.trim()));
    }
    // JSON keeps `None` fields as null where TOML drops them, so optional keys (e.g. `lr`) count as known.
    let defaults = match serde_json::to_value(T::default()).expect("defaults serialise") {
        serde_json::Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    check_keys(&table, &defaults, "", &source)?;
    toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| Error::BadConfig { path: source, reason: e.message().to_string() })
}

fn check_keys(t: &toml::Table, defaults: &serde_json::Map<String, serde_json::Value>, prefix: &str, source: &Path) -> Result<()> {
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

/// Writes a config as TOML (beside a run's outputs, so the run can be repeated).
pub fn save<T: Serialize>(cfg: &T, path: &Path) -> Result<()> {
    let text = toml::to_string_pretty(cfg).map_err(|e| Error::BadConfig { path: path.into(), reason: e.to_string() })?;
    crate::checkpoint::write_atomic(path, text.as_bytes())
}
