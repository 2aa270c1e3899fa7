//! `MetricsLog` end to end: the JSON lines as given, and the event files read back by TensorBoard's own
//! `EventAccumulator` (tests/py/read_tb.py) with every scalar at its step and value, and the config text.
mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use lmim_bench::results::MetricsLog;
use serde_json::{json, Value};

fn read_tb(dir: &Path) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/read_tb.py");
    let out = Command::new(common::python()).arg(&script).arg(dir).output().expect("start python");
    assert!(out.status.success(), "read_tb.py failed:\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("read_tb.py printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// Pretraining-like lines (integer `step`, float and integer fields, a string and an array that are no scalars).
fn pretrain_lines() -> Vec<Value> {
    (1..=5)
        .map(|i| {
            let s = i * 10;
            json!({
                "step": s,
                "epoch": s as f64 / 26.0,
                "loss": 1.5 / (1.0 + i as f64) + 1e-7 * i as f64,
                "lr": 1.5e-4 * i as f64,
                "avg_sim_pred": 0.9 - 0.05 * i as f64,
                "img_per_s": 400 + i,
                "tokens": 1_000_000 * i,
                "phase": "warmup",
                "per_block": [1.0, 2.0],
            })
        })
        .collect()
}

/// Expected scalars: tag -> (step, value) for every numeric top-level field but the step field.
fn expected(lines: &[Value], step_key: &str) -> BTreeMap<String, Vec<(i64, f64)>> {
    let mut want: BTreeMap<String, Vec<(i64, f64)>> = BTreeMap::new();
    for l in lines {
        let step = l[step_key].as_f64().unwrap().round() as i64;
        for (k, v) in l.as_object().unwrap() {
            if k != step_key {
                if let Some(x) = v.as_f64() {
                    want.entry(k.clone()).or_default().push((step, x));
                }
            }
        }
    }
    want
}

fn assert_scalars(got: &Value, want: &BTreeMap<String, Vec<(i64, f64)>>) {
    let got = got["scalars"].as_object().unwrap();
    let got_tags: Vec<&String> = got.keys().collect();
    let want_tags: Vec<&String> = want.keys().collect();
    assert_eq!(got_tags, want_tags, "scalar tags");
    for (tag, points) in want {
        let series = got[tag].as_array().unwrap();
        assert_eq!(series.len(), points.len(), "{tag}: number of points");
        for (p, (step, value)) in series.iter().zip(points) {
            assert_eq!(p[0].as_i64().unwrap(), *step, "{tag}: step");
            let v = p[1].as_f64().unwrap();
            // TensorBoard stores f32: the value must be the f32 nearest to the logged one.
            assert_eq!(v as f32, *value as f32, "{tag} at step {step}: {v} vs {value}");
            assert!((v - value).abs() <= 1e-6 * value.abs().max(1.0), "{tag} at step {step}: {v} vs {value}");
        }
    }
}

/// Equal JSON, numbers within 1e-15: serde_json's default float parser may be one ulp off.
fn assert_json_close(got: &Value, want: &Value) {
    match (got, want) {
        (Value::Number(a), Value::Number(b)) if a.is_f64() || b.is_f64() => {
            let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
            assert!((a - b).abs() <= 1e-15 * b.abs().max(1.0), "{a} vs {b}");
        }
        (Value::Object(a), Value::Object(b)) => {
            assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
            for (k, v) in b {
                assert_json_close(&a[k], v);
            }
        }
        _ => assert_eq!(got, want),
    }
}

#[test]
fn scalars_and_config_text_read_back_by_tensorboard() {
    let dir = tempfile::tempdir().unwrap();
    let lines = pretrain_lines();
    let config = "```\n[model]\narch = \"vit_pico_patch4_32\"\nmask_ratio = 0.75\n```";
    {
        let mut log = MetricsLog::open(dir.path(), "metrics.jsonl", true).unwrap();
        log.text("config", config).unwrap();
        for l in &lines {
            log.log(l).unwrap();
        }
        let ev = log.event_file().unwrap().file_name().unwrap().to_string_lossy().into_owned();
        assert!(ev.starts_with("events.out.tfevents."), "{ev}");
    }

    let text = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let back: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(back.len(), lines.len());
    for (b, l) in back.iter().zip(&lines) {
        assert_json_close(b, l);
    }

    let got = read_tb(&dir.path().join("tb"));
    assert_eq!(got["files"].as_array().unwrap().len(), 1);
    // The file version record, the text, and one record per scalar.
    let per_line = expected(&lines, "step").len();
    assert_eq!(got["records"], json!(1 + 1 + per_line * lines.len()));
    let want = expected(&lines, "step");
    assert!(want.contains_key("epoch") && want.contains_key("tokens") && !want.contains_key("phase"));
    assert_scalars(&got, &want);
    assert_eq!(got["texts"]["config"], json!([[0, config]]));
}

#[test]
fn epoch_lines_use_the_epoch_as_step_and_curves_survive_without_drop() {
    let dir = tempfile::tempdir().unwrap();
    let lines: Vec<Value> = (1..=4).map(|e| json!({"epoch": e as f64, "loss": 2.3 - 0.3 * e as f64, "lr": 0.1, "val_top1": 30 + 5 * e})).collect();
    let mut log = MetricsLog::open(dir.path(), "linear-metrics.jsonl", true).unwrap();
    for l in &lines {
        log.log(l).unwrap();
    }
    // A killed run never drops its log: what was logged must already be readable.
    let got = read_tb(&dir.path().join("tb"));
    assert_scalars(&got, &expected(&lines, "epoch"));
    assert_eq!(std::fs::read_to_string(dir.path().join("linear-metrics.jsonl")).unwrap().lines().count(), 4);
    drop(log);
}

#[test]
fn reopening_appends_lines_and_adds_an_event_file() {
    let dir = tempfile::tempdir().unwrap();
    for s in [1, 2] {
        let mut log = MetricsLog::open(dir.path(), "metrics.jsonl", true).unwrap();
        log.log(&json!({"step": s, "loss": s as f64})).unwrap();
    }
    assert_eq!(std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap().lines().count(), 2);
    let got = read_tb(&dir.path().join("tb"));
    assert_eq!(got["files"].as_array().unwrap().len(), 2);
    assert_eq!(got["scalars"]["loss"], json!([[1, 1.0], [2, 2.0]]));
}

#[test]
fn no_tensorboard_writes_only_the_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = MetricsLog::open(dir.path(), "metrics.jsonl", false).unwrap();
    log.text("config", "x").unwrap();
    log.log(&json!({"step": 1, "loss": 0.5})).unwrap();
    assert!(log.event_file().is_none());
    drop(log);
    assert!(!dir.path().join("tb").exists());
    let text = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    assert_eq!(text.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()).collect::<Vec<_>>(), vec![json!({"step": 1, "loss": 0.5})]);
    assert!(text.ends_with('\n'));
}

#[test]
fn unwritable_directory_is_an_input_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let err = MetricsLog::open(&file, "metrics.jsonl", true).err().expect("a file is no directory");
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("not-a-dir"), "{err}");
}
