//! Helpers shared by the integration tests: the reference Python interpreter and the CLI binary.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::Command;

/// The Python of the project's virtual environment (torch 2.11, timm, torchvision), set by scripts/env.sh.
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("LMIM_PYTHON") {
        return PathBuf::from(p);
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let p = PathBuf::from(home).join(".cache/lmim-bench/venv/bin/python");
    assert!(p.exists(), "no reference Python found: run the tests with `bash scripts/test.sh` (it sets LMIM_PYTHON)");
    p
}

/// Runs `tests/py/<script>` with arguments and panics with its output if it fails.
pub fn run_py(script: &str, args: &[&str]) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py").join(script);
    let out = Command::new(python()).arg(&path).args(args).output().expect("start python");
    assert!(out.status.success(), "{} failed:\n{}\n{}", script, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

/// The max absolute difference of two tensors.
pub fn max_abs(a: &tch::Tensor, b: &tch::Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// The demo data (Fashion-MNIST subset) made by `lmim-bench data prepare-demo` into `<dir>/demo`.
pub fn demo_data(dir: &Path, train_per_class: usize, val_per_class: usize) -> PathBuf {
    let data = dir.join("demo");
    assert_cmd::Command::cargo_bin("lmim-bench")
        .unwrap()
        .args(["data", "prepare-demo", "--train-per-class", &train_per_class.to_string(), "--val-per-class", &val_per_class.to_string()])
        .arg("--out")
        .arg(&data)
        .assert()
        .success();
    data
}

/// Evaluation options for the CPU with two loader workers.
pub fn cpu_options() -> lmim_bench::protocols::RunOptions {
    lmim_bench::protocols::RunOptions { device: "cpu".into(), workers: Some(2), ..Default::default() }
}

/// A short fine-tuning recipe for the pico ViT on the demo data.
pub fn small_finetune(epochs: usize) -> lmim_bench::protocols::finetune::FinetuneConfig {
    lmim_bench::protocols::finetune::FinetuneConfig { epochs, warmup_epochs: 1.0, batch_size: 64, micro_batch_size: 32, blr: 1e-3, ..Default::default() }
}

/// Sets the modification time of every folder under `root` an hour back, as for a tree written long ago (a tree
/// just written is not indexed: its folders may still change within their timestamps' granularity).
pub fn age_folders(root: &Path) {
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
        std::fs::File::open(&d).unwrap().set_modified(old).unwrap();
    }
}

/// `lmim-bench eval` with `args` (the protocol, its options and overrides) on `ckpt` and `data`, records into `out`.
pub fn eval_cmd<S: AsRef<std::ffi::OsStr>>(args: &[S], ckpt: &Path, data: &Path, out: &Path) -> assert_cmd::Command {
    let mut c = assert_cmd::Command::cargo_bin("lmim-bench").unwrap();
    c.arg("eval").args(args).arg("--checkpoint").arg(ckpt).arg("--data").arg(data).arg("--output").arg(out);
    c
}

/// [`eval_cmd`]: exit 2 within two minutes, stderr naming `names`, and no record (nor anything `also_absent` says
/// of a written path) left in `out`.
pub fn eval_fails(args: &[&str], ckpt: &Path, data: &Path, out: &Path, names: &str, also_absent: impl Fn(&Path) -> bool) {
    let o = eval_cmd(args, ckpt, data, out).timeout(std::time::Duration::from_secs(120)).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains(names), "stderr names `{names}`: {err}");
    let written: Vec<PathBuf> = std::fs::read_dir(out).map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect()).unwrap_or_default();
    assert!(written.iter().all(|p| !p.extension().is_some_and(|e| e == "json") && !also_absent(p)), "nothing written: {written:?}");
}
