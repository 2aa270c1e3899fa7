//! `lmim-bench eval --protocol finetune` from the command line: a from-scratch run writes its record, its run folder
//! (config, metrics, checkpoint, exported classifier) and an Ft cell in the table; a second call resumes instead of
//! training again; bad options exit 2 with a message that names them.
use std::path::Path;

use assert_cmd::Command;

fn bin() -> Command {
    let mut c = Command::cargo_bin("lmim-bench").unwrap();
    c.env("OMP_NUM_THREADS", "2");
    c
}

fn finetune(data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    bin()
        .args(["eval", "--protocol", "finetune", "--arch", "vit_pico_patch4_32", "--name", "pico-scratch", "--device", "cpu", "--workers", "2", "--quiet"])
        .args(["--set", "epochs=1", "--set", "batch_size=32", "--set", "micro_batch_size=16", "--set", "lr=0.001"])
        .arg("--data")
        .arg(data)
        .arg("--output")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn finetune_cli_record_resume_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo");
    bin().args(["data", "prepare-demo", "--train-per-class", "8", "--val-per-class", "4"]).arg("--out").arg(&data).assert().success();
    let out = dir.path().join("runs");

    let o = finetune(&data, &out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.starts_with("pico-scratch finetune: top-1 "), "{stdout}");

    let recs = lmim_bench::results::collect_records(&[out.clone()]).unwrap();
    assert_eq!(recs.len(), 1);
    let r = &recs[0];
    assert_eq!((r.protocol.as_str(), r.protocol_version.as_str()), ("finetune", "mae-finetune-2+batch_size=32,epochs=1,lr=0.001,micro_batch_size=16"));
    assert_eq!(r.arch.as_deref(), Some("vit_pico_patch4_32"));
    assert!(r.checkpoint.is_none() && r.dataset_fingerprint.is_some());
    let top1 = r.metrics["top1"];
    assert!((0.0..=100.0).contains(&top1) && r.metrics["top5"] >= top1, "{:?}", r.metrics);
    // The optional key `lr` is accepted by --set and recorded; 80 images / 16 = 5 micro-batches, 2 per step: 2 whole
    // steps (the trailing micro-batch is dropped, as every training protocol here does).
    assert_eq!(r.config["lr"], serde_json::json!(0.001));
    assert_eq!(r.details["steps"], serde_json::json!(2));
    assert_eq!(r.details["init"], serde_json::json!("random (from scratch)"));

    let run = out.join("pico-scratch-finetune-scratch-s0");
    for f in ["finetune.toml", "metrics.jsonl", "finetune-last.safetensors", "finetuned.safetensors"] {
        assert!(run.join(f).is_file(), "{f} missing in {}", run.display());
    }
    let lines = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 1);
    let saved = std::fs::read_to_string(run.join("finetune.toml")).unwrap();
    assert!(saved.contains("epochs = 1") && saved.contains("layer_decay = 0.65"), "{saved}");

    // The table shows the run in the Ft column.
    let t = bin().arg("table").arg(&out).args(["--format", "csv", "-o", "-"]).output().unwrap();
    assert!(t.status.success());
    let csv = String::from_utf8_lossy(&t.stdout);
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let row: Vec<&str> = csv.lines().find(|l| l.starts_with("run,pico-scratch,")).unwrap_or_else(|| panic!("{csv}")).split(',').collect();
    let ft = header.iter().position(|h| *h == "ft_top1").unwrap();
    assert!((row[ft].parse::<f64>().unwrap() - top1).abs() < 1e-6, "Ft column {} vs record {top1}\n{csv}", row[ft]);

    // Calling again finds the finished checkpoint: nothing is retrained and the history is the same.
    let o = finetune(&data, &out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines().count(), 1);
    let recs = lmim_bench::results::collect_records(&[out.clone()]).unwrap();
    assert_eq!(recs.len(), 2);
    assert!(recs.iter().any(|r| r.details["resumed_from_epoch"] == serde_json::json!(1)));
    assert!(recs.iter().all(|r| r.metrics["top1"] == top1));

    // Bad input: exit 2, the option named.
    let o = bin().args(["eval", "--protocol", "finetune", "--quiet"]).arg("--data").arg(&data).arg("--output").arg(&out).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--checkpoint/--arch"), "{}", String::from_utf8_lossy(&o.stderr));
    let o = finetune(&data, &out, &["--set", "no_such_key=1", "--fresh"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown key `no_such_key`"), "{}", String::from_utf8_lossy(&o.stderr));
    let o = finetune(&data, &out, &["--set", "layer_decay=1.5", "--fresh"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("layer_decay"), "{}", String::from_utf8_lossy(&o.stderr));
}
