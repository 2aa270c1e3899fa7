//! `lmim-bench plot` end to end: the curves of two synthetic runs (size, not blank, one line per run in each
//! run's colour), the bar chart of results records and of a results.csv, and bad inputs (exit 2).
use std::collections::HashMap;
use std::path::Path;

use assert_cmd::Command;
use lmim_bench::results::RunRecord;
use lmim_bench::viz::figure::color;
use lmim_bench::viz::plot::curves_size;
use predicates::str::contains;

fn bin() -> Command {
    Command::cargo_bin("lmim-bench").unwrap()
}

/// A pretraining-like run: `steps` lines with loss, lr and two monitors; `shift` makes the runs differ.
fn write_run(dir: &Path, steps: usize, shift: f64) {
    std::fs::create_dir_all(dir).unwrap();
    let mut text = String::new();
    for i in 1..=steps {
        let s = (i * 10) as f64;
        let line = serde_json::json!({
            "step": i * 10,
            "epoch": s / 50.0,
            "loss": 1.4 * (-s / 300.0).exp() + 0.3 + shift,
            "lr": 1.5e-4 * (s / 100.0).min(1.0),
            "avg_sim_pred": 0.9 - 0.3 * (s / 600.0) + shift,
            "target_std": 0.65 + 0.05 * (s / 100.0).sin() - shift,
            "img_per_s": 500.0,
        });
        text.push_str(&format!("{line}\n"));
    }
    std::fs::write(dir.join("metrics.jsonl"), text).unwrap();
}

fn pixel_counts(png: &Path) -> (u32, u32, HashMap<[u8; 3], usize>) {
    let img = image::open(png).unwrap().to_rgb8();
    let mut counts = HashMap::new();
    for p in img.pixels() {
        *counts.entry(p.0).or_insert(0) += 1;
    }
    (img.width(), img.height(), counts)
}

#[test]
fn curves_of_two_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("run-a"), dir.path().join("run-b"));
    write_run(&a, 60, 0.0);
    write_run(&b, 40, 0.1);
    let out = dir.path().join("figs/curves.png");
    bin().arg("plot").arg(&a).arg(&b).arg("-o").arg(&out).assert().success().stdout(contains("curves.png"));

    let (w, h, counts) = pixel_counts(&out);
    // loss, lr, avg_sim_pred, target_std: four panels, two legend rows.
    assert_eq!((w, h), curves_size(4, 2));
    assert!(counts.len() > 50, "the figure looks blank: {} colours", counts.len());
    let white = counts.get(&[255, 255, 255]).copied().unwrap_or(0);
    assert!(white < (w * h) as usize * 95 / 100, "almost all white");
    // Each run draws a 2-px line across four panels: far more pixels of its colour than its legend swatch (100).
    for run in 0..2 {
        let n = counts.get(&color(run)).copied().unwrap_or(0);
        assert!(n > 1500, "run {run}: only {n} pixels of its colour {:?}", color(run));
    }
    assert_eq!(counts.get(&color(2)).copied().unwrap_or(0), 0, "a third line appeared");
}

#[test]
fn a_jsonl_file_and_epoch_logs_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("linear-metrics.jsonl");
    std::fs::write(&f, "{\"epoch\":1.0,\"loss\":2.3,\"lr\":3.0}\n{\"epoch\":2.0,\"loss\":2.1,\"lr\":6.0}\n{\"epoch\":3.0,\"loss\":1.9,\"lr\":6.3}\n").unwrap();
    let out = dir.path().join("lp.png");
    bin().arg("plot").arg(&f).arg("-o").arg(&out).assert().success();
    let (w, h, counts) = pixel_counts(&out);
    assert_eq!((w, h), curves_size(2, 1));
    assert!(counts.get(&color(0)).copied().unwrap_or(0) > 500);
}

fn record(model: &str, protocol: &str, top1: f64) -> RunRecord {
    let mut r = RunRecord::new(protocol, "1", "top1");
    r.model_name = model.into();
    r.checkpoint_sha256 = Some(format!("{:0>64}", model.len()));
    r.metrics.insert("top1".into(), top1);
    r.dataset = Some("fashion-mnist".into());
    r
}

#[test]
fn bars_from_records_and_from_csv() {
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    std::fs::create_dir_all(&runs).unwrap();
    for (m, p, v) in [("pico-a", "nn-loo", 70.0), ("pico-a", "knn", 72.0), ("pico-a", "linear", 65.0), ("pico-bb", "knn", 58.0), ("pico-bb", "finetune", 41.0)] {
        record(m, p, v).write(&runs).unwrap();
    }
    let bars = dir.path().join("bars.png");
    bin().current_dir(dir.path()).args(["plot", "--results", "runs", "-o", "bars.png"]).assert().success();
    let (w, h, counts) = pixel_counts(&bars);
    assert!(w > 600 && h > 300, "{w} x {h}");
    for proto in 0..4 {
        assert!(counts.get(&color(proto)).copied().unwrap_or(0) > 200, "no bars of protocol {proto}");
    }

    let csv_bars = dir.path().join("csv-bars.png");
    bin().arg("plot").arg("--results").arg(runs.join("results.csv")).arg("--no-reference").arg("-o").arg(&csv_bars).assert().success();
    let (w2, h2, _) = pixel_counts(&csv_bars);
    assert!(w2 <= w && h2 < h, "no published rows: a shorter chart ({w2} x {h2} vs {w} x {h})");
}

#[test]
fn bad_input_exits_2_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("x.png");
    let run = |args: &[&std::ffi::OsStr]| bin().arg("plot").args(args).assert();

    let missing = d.join("no-such-run");
    run(&[missing.as_os_str(), "-o".as_ref(), out.as_os_str()]).code(2).stderr(contains("no-such-run"));

    let empty_dir = d.join("empty-run");
    std::fs::create_dir_all(&empty_dir).unwrap();
    run(&[empty_dir.as_os_str(), "-o".as_ref(), out.as_os_str()]).code(2).stderr(contains("empty-run/metrics.jsonl"));

    let empty = d.join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    run(&[empty.as_os_str(), "-o".as_ref(), out.as_os_str()]).code(2).stderr(contains("empty.jsonl")).stderr(contains("no metric lines"));

    let bad = d.join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("metrics.jsonl"), "{\"step\":1,\"loss\":1.0}\n{\"step\":2,\"loss\":\n").unwrap();
    run(&[bad.as_os_str(), "-o".as_ref(), out.as_os_str()]).code(2).stderr(contains("bad/metrics.jsonl")).stderr(contains("line 2"));

    let blank = d.join("blank.jsonl");
    std::fs::write(&blank, "{\"step\":1,\"loss\":1.0}\n\n{\"step\":2,\"loss\":0.5}\n").unwrap();
    run(&[blank.as_os_str(), "-o".as_ref(), out.as_os_str()]).code(2).stderr(contains("blank.jsonl")).stderr(contains("line 2"));

    let nothing = d.join("nothing.jsonl");
    std::fs::write(&nothing, "{\"step\":1,\"img_per_s\":1.0}\n").unwrap();
    run(&[nothing.as_os_str(), "-o".as_ref(), out.as_os_str()]).code(2).stderr(contains("nothing.jsonl"));

    let good = d.join("good");
    write_run(&good, 5, 0.0);
    let blocker = d.join("a-file");
    std::fs::write(&blocker, "x").unwrap();
    let unwritable = blocker.join("out.png");
    run(&[good.as_os_str(), "-o".as_ref(), unwritable.as_os_str()]).code(2).stderr(contains("a-file"));
    run(&[good.as_os_str(), "-o".as_ref(), d.join("out.jpg").as_os_str()]).code(2).stderr(contains("out.jpg"));
    assert!(!out.exists(), "nothing written on bad input");

    run(&["--results".as_ref(), missing.as_os_str(), "-o".as_ref(), out.as_os_str()]).code(2).stderr(contains("no-such-run"));
    run(&["--results".as_ref(), empty_dir.as_os_str(), "-o".as_ref(), out.as_os_str()]).code(2).stderr(contains("empty-run"));
    let csv = d.join("bad.csv");
    std::fs::write(&csv, "a,b\n1,2\n").unwrap();
    run(&["--results".as_ref(), csv.as_os_str(), "-o".as_ref(), out.as_os_str()]).code(2).stderr(contains("bad.csv"));
    // Neither runs nor --results: a usage error.
    bin().arg("plot").assert().code(2);
}
