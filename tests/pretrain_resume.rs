//! Pretraining is safe to kill: a run killed with SIGKILL mid-epoch and resumed ends bitwise equal to an
//! uninterrupted run (CPU); a corrupt newest checkpoint is a clear error and the previous one stays; a NaN loss
//! stops the run naming the step.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use assert_cmd::cargo::CommandCargoExt;
use lmim_bench::checkpoint;

fn bin() -> Command {
    Command::cargo_bin("lmim-bench").unwrap()
}

fn synth(dir: &Path) -> PathBuf {
    let data = dir.join("synth");
    let st = bin()
        .args(["data", "synth", "--out", data.to_str().unwrap(), "--classes", "4", "--train-per-class", "96", "--val-per-class", "8", "--size", "40"])
        .status()
        .unwrap();
    assert!(st.success());
    data
}

fn pretrain_cmd(data: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = bin();
    c.args(["pretrain", "-q", "-c", concat!(env!("CARGO_MANIFEST_DIR"), "/configs/lmim_tiny.toml")])
        .args(["--data", data.to_str().unwrap(), "-o", out.to_str().unwrap()])
        .args(["--set", "epochs=4", "--set", "batch_size=32", "--set", "micro_batch_size=32", "--set", "checkpoint_every=2", "--set", "keep_last=50", "--set", "num_workers=2"])
        .args(extra)
        .env("OMP_NUM_THREADS", "1");
    c
}

fn newest(dir: &Path) -> PathBuf {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("checkpoints")).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "safetensors")).collect();
    v.sort();
    v.pop().expect("a checkpoint")
}

fn tensors(p: &Path) -> Vec<(String, tch::Tensor)> {
    checkpoint::load(p).unwrap().tensors
}

#[test]
fn killed_and_resumed_run_equals_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path());
    let full = dir.path().join("full");
    let st = pretrain_cmd(&data, &full, &[]).status().unwrap();
    assert!(st.success());

    let killed = dir.path().join("killed");
    let mut child = pretrain_cmd(&data, &killed, &[]).spawn().unwrap();
    let t0 = Instant::now();
    // Kill once a few mid-epoch checkpoints exist (3 steps per epoch at batch 32 x 384 images / 4 epochs).
    loop {
        let n = std::fs::read_dir(killed.join("checkpoints")).map(|r| r.count()).unwrap_or(0);
        if n >= 3 {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "run ended before it could be killed");
        assert!(t0.elapsed() < Duration::from_secs(120));
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(child.try_wait().unwrap().is_none(), "run ended before it could be killed");
    unsafe {
        libc::kill(child.id() as i32, libc::SIGKILL);
    }
    let status = child.wait().unwrap();
    assert!(!status.success(), "the first run was killed");
    let before = newest(&killed);
    let out = pretrain_cmd(&data, &killed, &[]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("resuming from"), "the second run resumed");
    assert!(before != newest(&killed));

    let (a, b) = (tensors(&newest(&full)), tensors(&newest(&killed)));
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(ta.equal(tb), "{na} differs between the uninterrupted and the resumed run");
    }
    // The logs too, line for line (times aside): the interrupted epoch's means cover all its steps, not only
    // those after the resume, and lines written after the last checkpoint are not doubled.
    let lines = |run: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v.as_object_mut().unwrap().remove("img_per_s");
                v
            })
            .collect()
    };
    let (la, lb) = (lines(&full), lines(&killed));
    assert!(la.iter().filter(|l| l.get("epoch_loss").is_some()).count() == 4, "{la:?}");
    assert_eq!(la.len(), lb.len(), "\n{la:#?}\n{lb:#?}");
    for (x, y) in la.iter().zip(&lb) {
        assert_eq!(x, y);
    }
    let ea = tensors(&full.join("encoder.safetensors"));
    let eb = tensors(&killed.join("encoder.safetensors"));
    assert!(ea.iter().zip(&eb).all(|((_, x), (_, y))| x.equal(y)), "exported encoders differ");
    assert!(ea.iter().any(|(n, _)| n == "blocks.0.attn.qkv.weight") && !ea.iter().any(|(n, _)| n.starts_with("head.")), "timm names, no projection head");
}

/// The newest checkpoint with a flipped exponent bit in its tensors (it still parses) or cut short: the run says
/// so naming it and the previous checkpoint, resumes from the previous one and sets the bad one aside.
#[test]
fn corrupt_checkpoint_falls_back_to_the_previous_one_with_a_warning() {
    for damage in ["flipped bit", "truncated"] {
        let dir = tempfile::tempdir().unwrap();
        let data = synth(dir.path());
        let out = dir.path().join("run");
        assert!(pretrain_cmd(&data, &out, &["--set", "epochs=1", "--set", "keep_last=3"]).status().unwrap().success());
        let all: Vec<PathBuf> = {
            let mut v: Vec<PathBuf> = std::fs::read_dir(out.join("checkpoints")).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect();
            v.sort();
            v
        };
        assert!(all.len() >= 2, "{all:?}");
        let last = all.last().unwrap();
        let mut bytes = std::fs::read(last).unwrap();
        if damage == "flipped bit" {
            // One bit of the last tensor's bytes (the file still parses; an exponent bit where it is a float).
            let n = bytes.len();
            bytes[n - 1] ^= 0x40;
        } else {
            bytes.truncate(bytes.len() / 3);
        }
        std::fs::write(last, &bytes).unwrap();
        if damage == "flipped bit" {
            assert!(checkpoint::load(last).is_ok(), "a flipped bit still parses: only the checksum sees it");
            let e = checkpoint::load_checked(last).unwrap_err().to_string();
            assert!(e.contains("checksum"), "{e}");
        }
        let res = pretrain_cmd(&data, &out, &["--set", "epochs=2", "--set", "keep_last=3"]).output().unwrap();
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(res.status.success(), "{damage}: {err}");
        let prev = &all[all.len() - 2];
        let name = |p: &PathBuf| p.file_name().unwrap().to_str().unwrap().to_string();
        assert!(err.contains(&format!("not resuming from {}", last.display())) && err.contains(&name(prev)), "{damage}: {err}");
        assert!(err.contains(&format!("resuming from {}", prev.display())), "{damage}: {err}");
        assert!(last.with_extension("safetensors.corrupt").exists(), "{damage}: the bad checkpoint is kept aside");
        if damage == "flipped bit" {
            assert!(err.contains("checksum"), "{err}");
        }
    }
}

#[test]
fn nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path());
    let out = dir.path().join("run");
    // The largest lr and weight decay the table admits: each step multiplies the weights by |1 - lr x wd| ~ 3000.
    let res = pretrain_cmd(&data, &out, &["--set", "blr=1e4", "--set", "weight_decay=10", "--set", "checkpoint_every=1"]).output().unwrap();
    assert_eq!(res.status.code(), Some(1));
    let err = String::from_utf8_lossy(&res.stderr);
    // The loss or the gradient norm, whichever the skeleton reads first.
    assert!(err.contains(" is NaN at step") || err.contains(" is inf at step"), "{err}");
    let kept = newest(&out);
    assert!(err.contains(kept.to_str().unwrap()) && err.contains("lower blr"), "{err}");
    // The checkpoint named as good holds only finite tensors (a diverging update is never saved).
    let ck = checkpoint::load(&kept).unwrap();
    for (name, t) in &ck.tensors {
        assert!(t.isfinite().all().int64_value(&[]) == 1, "{name} is not finite in {}", kept.display());
    }
}

#[test]
fn bad_config_keys_and_values_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path());
    let out = dir.path().join("run");
    let res = pretrain_cmd(&data, &out, &["--set", "patch_gapp=2"]).output().unwrap();
    assert_eq!(res.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&res.stderr).contains("unknown key `patch_gapp`"));
    let res = pretrain_cmd(&data, &out, &["--set", "loss=mse"]).output().unwrap();
    assert_eq!(res.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&res.stderr).contains("loss"));
    let res = pretrain_cmd(&dir.path().join("nowhere"), &out, &[]).output().unwrap();
    assert_eq!(res.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&res.stderr).contains("nowhere"));
}

#[test]
fn pretraining_knn_and_linear_probe_from_packed_shards_equal_those_from_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path());
    let packed = dir.path().join("packed");
    let cache = dir.path().join("lmim-cache");
    let run = |c: &mut Command| {
        let out = c.env("LMIM_CACHE", &cache).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    // What a killed pack leaves (a PID no process has): removed by the next pack of that split.
    let stale = packed.join(format!("train.tmp-{}", i32::MAX - 1));
    std::fs::create_dir_all(&stale).unwrap();
    for split in ["train", "val"] {
        let said = run(bin().args(["data", "pack", "--split", split, "--shard-size", "100KB", "--data"]).arg(&data).arg("--out").arg(&packed));
        assert!(said.contains("equal to the folder's"), "{said}");
    }
    let info = |d: &Path| -> serde_json::Value {
        let v: serde_json::Value = serde_json::from_str(&run(bin().args(["data", "info", "--json", "--data"]).arg(d))).unwrap();
        serde_json::json!([v["splits"]["train"]["fingerprint"], v["splits"]["val"]["fingerprint"]])
    };
    assert!(!stale.exists(), "the interrupted pack's folder is still there");
    assert_eq!(info(&data), info(&packed));
    assert!(std::fs::read_dir(packed.join("train")).unwrap().count() > 3, "several shards");

    let (a, b) = (dir.path().join("from-folder"), dir.path().join("from-shards"));
    run(&mut pretrain_cmd(&data, &a, &["--set", "epochs=1"]));
    run(&mut pretrain_cmd(&packed, &b, &["--set", "epochs=1"]));
    let (ta, tb) = (tensors(&newest(&a)), tensors(&newest(&b)));
    assert!(!ta.is_empty() && ta.len() == tb.len());
    for ((na, x), (nb, y)) in ta.iter().zip(&tb) {
        assert_eq!(na, nb);
        assert!(x.equal(y), "{na} differs between the runs from the folder and from the shards");
    }
    let knn = |d: &Path| -> serde_json::Value {
        let out = dir.path().join("records");
        let rec: serde_json::Value = serde_json::from_str(&run(bin()
            .args(["eval", "--protocol", "knn", "--device", "cpu", "--quiet", "--json", "--no-cache", "--checkpoint"])
            .arg(a.join("encoder.safetensors"))
            .arg("--data")
            .arg(d)
            .arg("--output")
            .arg(&out)))
        .unwrap();
        serde_json::json!([rec["metrics"], rec["dataset_fingerprint"]])
    };
    let (from_folder, from_shards) = (knn(&data), knn(&packed));
    assert!(from_folder[0].as_object().is_some_and(|m| !m.is_empty()), "{from_folder}");
    assert_eq!(from_folder, from_shards);

    // The linear probe: RandomResizedCrop + flip draws on every train image, BatchNorm statistics, LARS steps.
    let linear = |d: &Path, name: &str| -> (serde_json::Value, Vec<(String, tch::Tensor)>) {
        let out = dir.path().join(name);
        let rec: serde_json::Value = serde_json::from_str(&run(bin()
            .args(["eval", "--protocol", "linear", "--device", "cpu", "--quiet", "--json", "--checkpoint"])
            .arg(a.join("encoder.safetensors"))
            .arg("--data")
            .arg(d)
            .arg("--output")
            .arg(&out)
            .args(["--set", "epochs=2", "--set", "warmup_epochs=1", "--set", "batch_size=16", "--set", "micro_batch_size=8", "--set", "eval_every=1"])))
        .unwrap();
        let head = tensors(Path::new(rec["details"]["head"].as_str().unwrap()));
        (serde_json::json!([rec["metrics"], rec["dataset_fingerprint"], rec["details"]["history"]]), head)
    };
    let ((rec_folder, head_folder), (rec_shards, head_shards)) = (linear(&data, "lp-folder"), linear(&packed, "lp-shards"));
    assert_eq!(rec_folder, rec_shards);
    assert_eq!(head_folder.len(), 5, "BN running stats + count, Linear weight and bias");
    for ((na, x), (nb, y)) in head_folder.iter().zip(&head_shards) {
        assert_eq!(na, nb);
        assert!(x.equal(y), "linear head {na} differs between the runs from the folder and from the shards");
    }
}
