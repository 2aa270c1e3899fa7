//! The CI regression job: tiny Latent MIM pretraining on the Fashion-MNIST demo set, then k-NN and the
//! leave-one-out NN on the pretrained and the random-init encoder, deterministic on the CPU, checked with
//! `lmim-bench check` against the committed golden file tests/golden/regression.toml. Also proves the check fails
//! when accuracy drops (the random-init encoder evaluated under the pretrained name).
use std::path::Path;
use std::process::Command;

use assert_cmd::cargo::CommandCargoExt;

fn bin() -> Command {
    let mut c = Command::cargo_bin("lmim-bench").unwrap();
    c.env("OMP_NUM_THREADS", "2");
    c
}

fn run(args: &[&str]) -> String {
    let out = bin().args(args).output().unwrap();
    assert!(out.status.success(), "lmim-bench {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn eval(protocol: &str, ckpt: &Path, data: &Path, name: &str, out: &Path, cache: &Path) {
    let (ckpt, data, out, cache) = (ckpt.to_str().unwrap(), data.to_str().unwrap(), out.to_str().unwrap(), cache.to_str().unwrap());
    run(&[
        "eval", "--protocol", protocol, "--checkpoint", ckpt, "--data", data, "--name", name, "--output", out,
        "--cache-dir", cache, "--workers", "2", "--quiet",
    ]);
}

fn metric(dir: &Path, model: &str, protocol: &str) -> f64 {
    let recs = lmim_bench::results::collect_records(&[dir.to_path_buf()]).unwrap();
    let r = recs.iter().find(|r| r.model_name == model && r.protocol == protocol).expect("record");
    r.metrics["top1"]
}

#[test]
fn tiny_pretraining_improves_knn_and_matches_the_golden_file() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("fmnist");
    run(&["data", "prepare-demo", "--out", data.to_str().unwrap(), "--train-per-class", "200", "--val-per-class", "100"]);
    let cfg = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/lmim_tiny.toml");
    let random = tmp.path().join("random.safetensors");
    run(&["init", "-c", cfg, "-o", random.to_str().unwrap()]);
    let pre = tmp.path().join("pretrain");
    let dirs = [data.to_str().unwrap(), pre.to_str().unwrap()];
    let st = bin()
        .args(["pretrain", "-q", "-c", cfg, "--data", dirs[0], "-o", dirs[1], "--set", "epochs=6", "--set", "batch_size=32", "--set", "micro_batch_size=32", "--set", "blr=1e-2", "--set", "num_workers=2"])
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let runs = tmp.path().join("runs");
    let cache = tmp.path().join("cache");
    for (model, ckpt) in [("pico-random-init", random.clone()), ("pico-lmim-pretrained", pre.join("encoder.safetensors"))] {
        for protocol in ["knn", "nn-loo"] {
            eval(protocol, &ckpt, &data, model, &runs, &cache);
        }
    }
    // Learning, not just running: clearly better than the same encoder at initialisation.
    for protocol in ["knn", "nn-loo"] {
        let (r, p) = (metric(&runs, "pico-random-init", protocol), metric(&runs, "pico-lmim-pretrained", protocol));
        eprintln!("{protocol}: random init {r:.2}, pretrained {p:.2}");
        assert!(p > r + 3.0, "{protocol}: pretrained {p:.2} is not above random init {r:.2} + 3");
    }
    let golden = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/regression.toml");
    let out = bin().args(["check", "--reference", golden, runs.to_str().unwrap()]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "golden check failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("pico-lmim-pretrained") && stdout.contains("PASS"), "{stdout}");

    // A deliberately broken "pretrained" model (the random init under its name) must fail the same check.
    let broken = tmp.path().join("broken");
    for protocol in ["knn", "nn-loo"] {
        eval(protocol, &random, &data, "pico-lmim-pretrained", &broken, &cache);
        eval(protocol, &random, &data, "pico-random-init", &broken, &cache);
    }
    let out = bin().args(["check", "--reference", golden, broken.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("FAIL"));
}
