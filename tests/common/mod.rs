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
