//! `lmim-bench bench`: each measurement runs the real loop on a tiny model and reports a positive rate as JSON;
//! `-o FILE` writes the same JSON; zero steps is a usage error.
use assert_cmd::Command;

fn bench(args: &[&str]) -> serde_json::Value {
    let out = Command::cargo_bin("lmim-bench").unwrap().env("OMP_NUM_THREADS", "2").arg("bench").args(args).args(["--device", "cpu"]).output().unwrap();
    assert!(out.status.success(), "bench {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn bench_reports_rates() {
    let cfg = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/lmim_tiny.toml");
    let p = bench(&["pretrain", "-c", cfg, "--batch-size", "8", "--warmup", "1", "--steps", "2"]);
    assert_eq!((p["what"].as_str(), p["arch"].as_str(), p["batch"].as_i64()), (Some("pretrain-step"), Some("vit_pico_patch4_32"), Some(8)));
    assert!(p["items_per_s"].as_f64().unwrap() > 0.0 && p["details"]["last_loss"].as_f64().unwrap().is_finite(), "{p}");
    assert!(p["peak_rss_mib"].as_f64().unwrap() > 10.0);
    assert!(p["provenance"]["git_commit"].is_string());

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo");
    Command::cargo_bin("lmim-bench").unwrap().args(["data", "prepare-demo", "--train-per-class", "4", "--val-per-class", "1"]).arg("--out").arg(&data).assert().success();
    let f = bench(&["finetune", "--arch", "vit_pico_patch4_32", "--batch-size", "8", "--warmup", "1", "--steps", "2", "--data", data.to_str().unwrap()]);
    assert_eq!((f["what"].as_str(), f["details"]["classes"].as_i64()), (Some("finetune-step"), Some(10)));
    assert!(f["items_per_s"].as_f64().unwrap() > 0.0);
    // 40 images give 5 batches of 8: asking for more steps is an input error, not a hang.
    let o = Command::cargo_bin("lmim-bench").unwrap().args(["bench", "finetune", "--arch", "vit_pico_patch4_32", "--batch-size", "8", "--steps", "9", "--device", "cpu", "--data"]).arg(&data).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stderr));

    let out = dir.path().join("sweep.json");
    let o = Command::cargo_bin("lmim-bench").unwrap().args(["bench", "sweep", "--n", "2000", "--dim", "16", "--classes", "10", "--set", "epochs=1", "--device", "cpu", "-o"]).arg(&out).output().unwrap();
    assert!(o.status.success() && o.stdout.is_empty(), "{}", String::from_utf8_lossy(&o.stderr));
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!((s["what"].as_str(), s["details"]["heads"].as_i64()), (Some("linear-sweep"), Some(52)));

    let o = Command::cargo_bin("lmim-bench").unwrap().args(["bench", "pretrain", "-c", cfg, "--steps", "0", "--device", "cpu"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--steps"));
}
