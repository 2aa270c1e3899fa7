//! Bad input to `extract` / `eval` ends with exit code 2 and a message that names the problem: an arch that does
//! not match the checkpoint, an empty split, a features file whose `features` and `labels` differ in N, train and
//! val features with different class counts, and a back-end that is not built.
use std::path::Path;

use assert_cmd::Command;
use lmim_bench::checkpoint;
use lmim_bench::model::{VisionTransformer, VitConfig};
use predicates::prelude::PredicateBooleanExt;
use predicates::str::contains;
use tch::{nn, Device, Kind, Tensor};

fn bin() -> Command {
    Command::cargo_bin("lmim-bench").unwrap()
}

/// `flag path` pairs as command-line arguments.
fn paths(pairs: &[(&str, &Path)]) -> Vec<std::ffi::OsString> {
    pairs.iter().flat_map(|(flag, path)| [std::ffi::OsString::from(flag), path.as_os_str().to_owned()]).collect()
}

fn pico(path: &Path) {
    tch::manual_seed(0);
    let cfg = VitConfig::from_arch("vit_pico_patch4_32").unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let _m = VisionTransformer::new(&vs.root(), &cfg);
    checkpoint::save_vit(path, &vs, &cfg, &Default::default()).unwrap();
}

fn features(path: &Path, n: i64, n_labels: i64, classes: i64) {
    let meta = [("num_classes".to_string(), classes.to_string())].into_iter().collect();
    let x = Tensor::randn([n, 8], (Kind::Float, Device::Cpu));
    let y = Tensor::arange(n_labels, (Kind::Int64, Device::Cpu)).remainder(classes.min(3));
    checkpoint::save(path, &[("features".into(), x), ("labels".into(), y)], &meta).unwrap();
}

fn image(path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::RgbImage::from_fn(28, 28, |x, y| image::Rgb([(x * 9) as u8, (y * 9) as u8, 128])).save(path).unwrap();
}

#[test]
fn arch_mismatch_is_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("pico.safetensors");
    pico(&ckpt);
    image(&dir.path().join("data/train/a/0.png"));
    image(&dir.path().join("data/val/a/0.png"));
    bin()
        .args(["eval", "--protocol", "knn", "--device", "cpu", "--arch", "vit_tiny_patch16_224", "--quiet"])
        .args(paths(&[("--checkpoint", &ckpt), ("--data", &dir.path().join("data")), ("--output", &dir.path().join("runs"))]))
        .assert()
        .code(2)
        .stderr(contains("checkpoint is `vit_pico_patch4_32` but --arch says `vit_tiny_patch16_224`"));
}

#[test]
fn empty_split_is_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("pico.safetensors");
    pico(&ckpt);
    image(&dir.path().join("data/train/a/0.png"));
    std::fs::create_dir_all(dir.path().join("data/val/a")).unwrap();
    bin()
        .args(["extract", "--device", "cpu", "--split", "val", "--quiet"])
        .args(paths(&[("--checkpoint", &ckpt), ("--data", &dir.path().join("data")), ("--cache-dir", &dir.path().join("cache"))]))
        .assert()
        .code(2)
        .stderr(contains("no images"));
    bin()
        .args(["eval", "--protocol", "nn-loo", "--device", "cpu", "--quiet"])
        .args(paths(&[("--checkpoint", &ckpt), ("--data", &dir.path().join("data")), ("--output", &dir.path().join("runs"))]))
        .assert()
        .code(2)
        .stderr(contains("val"))
        .stderr(contains("no images"));
}

#[test]
fn mismatched_feature_files_are_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    features(&d.join("short_labels.st"), 10, 9, 3);
    features(&d.join("train.st"), 12, 12, 10);
    features(&d.join("val5.st"), 12, 12, 5);
    let eval = |train: &str, val: &str| {
        let mut c = bin();
        c.args(["eval", "--protocol", "knn", "--device", "cpu", "--quiet"])
            .args(paths(&[("--train-features", &d.join(train)), ("--val-features", &d.join(val)), ("--output", &d.join("runs"))]));
        c
    };
    eval("train.st", "short_labels.st").assert().code(2).stderr(contains("`features` has 10 rows but `labels` has 9"));
    eval("train.st", "val5.st").assert().code(2).stderr(contains("5 classes but the train features have 10"));
    eval("train.st", "missing.st").assert().code(2).stderr(contains("no such features file"));
    // faiss: named in the record where it is built in, a clear error where it is not.
    let faiss = bin()
        .args(["eval", "--protocol", "knn", "--backend", "faiss", "--device", "cpu", "--json"])
        .args(paths(&[("--train-features", &d.join("train.st")), ("--val-features", &d.join("train.st")), ("--output", &d.join("faiss-runs"))]))
        .assert();
    if lmim_bench::protocols::knn::faiss_available() {
        let rec: serde_json::Value = serde_json::from_slice(&faiss.code(0).get_output().stdout).unwrap();
        assert_eq!(rec["config"]["backend"], "faiss-cpu");
        assert_eq!(rec["details"]["knn"]["backend"], "faiss-cpu");
    } else {
        faiss.code(2).stderr(contains("faiss is not built"));
    }
    // Neither a checkpoint nor feature files.
    bin().args(["eval", "--protocol", "knn"]).assert().code(2).stderr(contains("--train-features and --val-features"));
    // Nothing was written for the failed runs.
    assert!(!d.join("runs").exists());
}

/// A shorthand flag's bad value is named by the flag the user typed, not by the `--set` it stands for.
#[test]
fn a_bad_shorthand_value_names_its_flag() {
    let dir = tempfile::tempdir().unwrap();
    for (args, expect) in [
        (vec!["--k", "10,0"], "option --k: `--k 10,0`: key `ks`"),
        (vec!["--temperature=-1"], "option --temperature: `--temperature -1`: key `temperature`"),
        (vec!["--k", "10", "--headline-k", "7"], "option --headline-k: `--headline-k 7`: key `headline_k`"),
    ] {
        bin()
            .args(["eval", "--protocol", "knn", "--checkpoint", "none.safetensors", "--data", "none"])
            .args(["--output", dir.path().to_str().unwrap()])
            .args(&args)
            .assert()
            .code(2)
            .stderr(contains(expect))
            .stderr(contains("--set").not());
    }
}

/// A results table that cannot grow (a file-size limit met in the middle of the row): exit 1 naming it, and the
/// table as it was before, not cut or half a row longer.
#[test]
fn a_results_csv_append_that_fails_leaves_the_table_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let (train, val, out) = (dir.path().join("train.safetensors"), dir.path().join("val.safetensors"), dir.path().join("out"));
    features(&train, 30, 30, 3);
    features(&val, 12, 12, 3);
    let eval = |limit: Option<u64>| {
        let bin = assert_cmd::cargo::cargo_bin("lmim-bench");
        let cmd = format!(
            "{}exec '{}' eval --protocol knn --quiet --train-features '{}' --val-features '{}' --output '{}'",
            limit.map_or(String::new(), |b| format!("ulimit -f {b}; ")),
            bin.display(),
            train.display(),
            val.display(),
            out.display()
        );
        std::process::Command::new("bash").args(["-c", &cmd]).output().unwrap()
    };
    assert!(eval(None).status.success());
    let csv = out.join("results.csv");
    let text = std::fs::read_to_string(&csv).unwrap();
    let row = text.lines().nth(1).unwrap().to_string() + "\n";
    // Rows until the last 1 KiB block has less room than a row: the next append is cut by the limit mid-row.
    let mut padded = text.clone();
    while padded.len() < 8192 || {
        let room = (1024 - padded.len() % 1024) % 1024;
        room == 0 || room >= row.len() - 20
    } {
        padded.push_str(&row);
    }
    std::fs::write(&csv, &padded).unwrap();
    let o = eval(Some(padded.len().div_ceil(1024) as u64));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("results.csv"), "{err}");
    assert_eq!(std::fs::read_to_string(&csv).unwrap(), padded, "the table as it was");
}
