//! scripts/gpu_check.sh in its CPU mode (tiny sizes): every step of the one-call device check runs, the parity
//! checks pass, and the report names every section, so the script that a GPU machine runs in one call never rots.
mod common;

use std::process::Command;

#[test]
fn gpu_check_cpu_mode_runs_every_step_and_writes_the_report() {
    let dir = tempfile::tempdir().unwrap();
    let scratch = dir.path().join("scratch");
    // What the device machine gives back: only $OUT, at most 8 files of 16 MiB, two folders deep.
    let out = dir.path().join("out");
    let res = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/gpu_check.sh"))
        .args(["--cpu", "--scratch", scratch.to_str().unwrap()])
        .env("OUT", &out)
        .env("LMIM_BIN", env!("CARGO_BIN_EXE_lmim-bench"))
        .env("LMIM_PYTHON", common::python())
        .env_remove("LATENTMIM_DIR")
        .env_remove("DINO_DIR")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert_eq!(res.status.code(), Some(0), "stderr: {stderr}");
    let steps = std::fs::read_to_string(scratch.join("steps.tsv")).unwrap();
    let names: Vec<&str> = steps.lines().map(|l| l.split('\t').next().unwrap()).collect();
    for want in ["info", "parity-ref", "parity", "step-ref-input", "step-ref", "step-parity", "pretrain-ours-1", "pretrain-ours-2", "finetune-ours", "finetune-timm", "infer-ours", "infer-timm", "knn-ours", "sweep", "loader"] {
        assert!(names.contains(&want), "step {want} missing from {steps}");
    }
    // The Latent MIM step against the independent PyTorch step (tests/py/ref_lmim_step.py), not only the CPU against
    // itself: every trainable tensor's gradient compared.
    let sp: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(scratch.join("step-parity.json")).unwrap()).unwrap();
    let r = &sp["pytorch_reference"];
    assert_eq!(r["pass"].as_bool(), Some(true), "{sp}");
    assert!(r["gradients"].as_u64().unwrap() >= 40 && r["max_rel_diff_grads"].as_f64().unwrap() <= 1e-3, "{sp}");
    // The process group of one, through Gloo where the build has it (NCCL on a GPU), checked for values.
    if lmim_bench::dist::has_gloo() {
        assert!(names.contains(&"dist-check"), "step dist-check missing from {steps}");
        let check: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(scratch.join("dist-check.json")).unwrap()).unwrap();
        assert_eq!((check["backend"].as_str(), check["world_size"].as_i64(), check["pass"].as_bool()), (Some("gloo"), Some(1), Some(true)), "{check}");
        // The injected out-of-range index ended the group-of-one pretraining through the panic path: exit 1.
        assert!(names.contains(&"device-assert"), "step device-assert missing from {steps}");
        let run: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(scratch.join("device-assert.json")).unwrap()).unwrap();
        assert_eq!(run["exit_code"].as_i64(), Some(1), "{run}");
        let err = std::fs::read_to_string(scratch.join("device-assert-run.err")).unwrap();
        assert!(err.contains("panicked") && err.contains("out of range"), "{err}");
    }
    for l in steps.lines() {
        assert_eq!(l.split('\t').nth(1), Some("0"), "a step failed: {l}");
    }
    // $OUT holds the report and one tarball of the raw files, within the device tool's limits.
    let mut files = Vec::new();
    let mut stack = vec![(out.clone(), 0)];
    while let Some((d, depth)) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                assert!(depth < 2, "{} is more than two folders deep", e.path().display());
                stack.push((e.path(), depth + 1));
            } else {
                assert!(e.metadata().unwrap().len() <= 16 << 20, "{} is over 16 MiB", e.path().display());
                files.push(e.file_name().to_string_lossy().into_owned());
            }
        }
    }
    files.sort();
    assert!(files.len() <= 8, "{files:?}");
    assert_eq!(files, ["gpu-cpu.md", "raw.tar.gz"], "OUT holds {files:?}");
    let listing = Command::new("tar").arg("-tzf").arg(out.join("raw.tar.gz")).output().unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    for want in ["steps.tsv", "parity.json", "pretrain-ours-1.json", "loader.err"] {
        assert!(listing.contains(want), "raw.tar.gz lacks {want}: {listing}");
    }
    let report = std::fs::read_to_string(out.join("gpu-cpu.md")).unwrap();
    for want in ["## Parity", "forward_features fp32 vs timm", "one Latent MIM step", "SDPA kernel", "## Latent MIM pretraining step", "lmim-bench", "Fine-tuning ratio lmim-bench / timm", "Inference ratio", "k-NN (weighted, k = 20", "52-head linear sweep", "Loader,", "## Commands", "not run: LATENTMIM_DIR was not set", "## Collectives"] {
        assert!(report.contains(want), "the report lacks `{want}`:\n{report}");
    }
    // The report is printed too (a device call returns stdout even when its files do not come back).
    assert!(stdout.contains("## Parity") && stdout.contains("## Commands"), "stdout: {stdout}");
    assert!(!report.contains("| False |"), "a parity check failed:\n{report}");
    // The parity numbers come from the comparison, not from the report's template.
    let parity: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(scratch.join("parity.json")).unwrap()).unwrap();
    assert!(parity["f32"]["max_abs"].as_f64().unwrap() <= 1e-3 && parity["pass"] == true, "{parity}");
    let pre: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(scratch.join("pretrain-ours-1.json")).unwrap()).unwrap();
    assert!(pre["details"]["flops_per_step"].as_f64().unwrap() > 1e8, "{pre}");
}

#[test]
fn parity_over_tolerance_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let refs = dir.path().join("ref");
    let py = common::python();
    let gen = Command::new(&py)
        .args([concat!(env!("CARGO_MANIFEST_DIR"), "/benches/py/gpu_side.py"), "parity-ref", "vit_tiny_patch16_224", "1", "cpu", refs.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(gen.status.success(), "{}", String::from_utf8_lossy(&gen.stderr));
    // Perturb timm's output: the comparison must notice.
    let io = refs.join("io.safetensors");
    let ck = lmim_bench::checkpoint::load(&io).unwrap();
    let tensors: Vec<(String, tch::Tensor)> = ck.tensors.iter().map(|(k, t)| (k.clone(), if k == "out_f32" { t + 0.01 } else { t.shallow_clone() })).collect();
    lmim_bench::checkpoint::save(&io, &tensors, &Default::default()).unwrap();
    let res = Command::new(env!("CARGO_BIN_EXE_lmim-bench"))
        .args(["bench", "--device", "cpu", "parity", "--arch", "vit_tiny_patch16_224", "--weights"])
        .arg(refs.join("weights.safetensors"))
        .arg("--io")
        .arg(&io)
        .output()
        .unwrap();
    assert_eq!(res.status.code(), Some(1), "{}", String::from_utf8_lossy(&res.stderr));
    let v: serde_json::Value = serde_json::from_slice(&res.stdout).unwrap();
    let max = v["f32"]["max_abs"].as_f64().unwrap();
    assert!((max - 0.01).abs() < 1e-4 && v["pass"] == false, "{v}");
}

/// On a GPU the NCCL row is required: a report whose collectives check did not run (or was marked missing because
/// the binary has no NCCL) says FAILED in that row and exits 1, never a blank row and exit 0.
#[test]
fn the_gpu_report_fails_when_the_nccl_check_did_not_run() {
    for steps in ["info\t0\t1\tlmim-bench info\n", "info\t0\t1\tlmim-bench info\ndist-check\tmissing\t0\tthis binary has no NCCL\n"] {
        let dir = tempfile::tempdir().unwrap();
        let scratch = dir.path();
        std::fs::write(scratch.join("mode"), "gpu\n").unwrap();
        std::fs::write(scratch.join("steps.tsv"), steps).unwrap();
        let res = Command::new(common::python())
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/benches/py/gpu_report.py"))
            .args([scratch.to_str().unwrap(), env!("CARGO_MANIFEST_DIR"), "", scratch.to_str().unwrap()])
            .output()
            .unwrap();
        assert_eq!(res.status.code(), Some(1), "{}", String::from_utf8_lossy(&res.stderr));
        let path = String::from_utf8_lossy(&res.stdout).trim().to_string();
        let report = std::fs::read_to_string(&path).unwrap();
        let row = report.lines().find(|l| l.contains("process group of one")).unwrap_or_else(|| panic!("no collectives row:\n{report}"));
        assert!(row.contains("**FAILED: not run"), "{row}");
    }
}
