//! Every protocol through the library entry point `protocols::run`, in-process: the record it writes (protocol,
//! version with the overridden keys, dataset fingerprint over train and val, CSV row), the shared step rule (whole
//! optimiser steps only) and the config path (unknown keys and bad values refused, naming the key).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use lmim_bench::checkpoint;
use lmim_bench::data::synth::{synth, SynthOptions};
use lmim_bench::model::{VisionTransformer, VitConfig};
use lmim_bench::protocols::{run, EvalRequest, Protocol, RunOptions};
use lmim_bench::results::RunRecord;
use tch::{nn, Device};

/// 4 classes x 20 train / 8 val generated images, and a pico encoder with random weights.
fn setup(dir: &Path) -> (PathBuf, PathBuf) {
    let data = dir.join("data");
    synth(&SynthOptions { out: data.clone(), classes: 4, train_per_class: 20, val_per_class: 8, width: 40, height: 36, seed: 3, quality: 90 }).unwrap();
    tch::manual_seed(0);
    let cfg = VitConfig::from_arch("vit_pico_patch4_32").unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let _m = VisionTransformer::new(&vs.root(), &cfg);
    let ck = dir.join("enc.safetensors");
    checkpoint::save_vit(&ck, &vs, &cfg, &BTreeMap::new()).unwrap();
    (data, ck)
}

fn request(p: Protocol, data: &Path, ck: &Path, out: &Path, sets: &[&str]) -> EvalRequest {
    let mut r = EvalRequest::new(p, out);
    r.checkpoint = Some(ck.to_path_buf());
    r.data = Some(data.to_path_buf());
    r.sets = sets.iter().map(|s| s.to_string()).collect();
    r.run = RunOptions { device: "cpu".into(), workers: Some(2), cache_dir: None, tensorboard: false, ..Default::default() };
    r
}

fn check_common(rec: &RunRecord, p: Protocol) {
    assert_eq!(rec.protocol, p.name());
    assert_eq!(rec.model_name, "enc");
    let fp = rec.dataset_fingerprint.as_ref().expect("a dataset fingerprint");
    assert!(fp.get("train").is_some() && fp.get("val").is_some() || p == Protocol::NnLoo, "{p}: {fp}");
    assert!(fp.get("val").is_some(), "{p}: the val split is fingerprinted: {fp}");
    assert_eq!(fp["hash"].as_str().map(str::len), Some(64), "{p}: {fp}");
    let top1 = rec.metrics["top1"];
    assert!((0.0..=100.0).contains(&top1), "{p}: top-1 {top1}");
    assert_eq!(rec.config["run"]["device"], "cpu");
}

#[test]
fn every_protocol_runs_in_process_and_records_what_it_did() {
    let dir = tempfile::tempdir().unwrap();
    let (data, ck) = setup(dir.path());
    let out = dir.path().join("results");

    let knn = run(&request(Protocol::Knn, &data, &ck, &out, &["ks=[5, 10]", "headline_k=5"])).unwrap();
    check_common(&knn, Protocol::Knn);
    assert_eq!(knn.protocol_version, "1+headline_k=5,ks=[5,10]");
    assert!(knn.metrics.contains_key("top1@k10") && !knn.metrics.contains_key("top1@k20"));
    assert_eq!(knn.config["precision"], "f32", "k-NN features are extracted in f32");

    let loo = run(&request(Protocol::NnLoo, &data, &ck, &out, &[])).unwrap();
    check_common(&loo, Protocol::NnLoo);
    assert_eq!(loo.protocol_version, "1");

    // 80 train images in micro-batches of 16 = 5; steps of 32 = 2 micro-batches: 2 whole steps per epoch.
    let lin = run(&request(Protocol::Linear, &data, &ck, &out, &["epochs=2", "warmup_epochs=1", "batch_size=32", "micro_batch_size=16", "eval_every=1"])).unwrap();
    check_common(&lin, Protocol::Linear);
    assert_eq!(lin.protocol_version, "mae-linprobe-2+batch_size=32,epochs=2.0,eval_every=1,micro_batch_size=16,warmup_epochs=1.0");
    assert_eq!(lin.details["steps_per_epoch"], 2);
    assert_eq!(lin.details["steps"], 4);
    assert_eq!(lin.config["lr"].as_f64(), Some(0.1 * 32.0 / 256.0), "lr = blr x global batch / 256");

    let gap = run(&request(Protocol::Linear, &data, &ck, &out, &["epochs=1", "warmup_epochs=0", "batch_size=16", "micro_batch_size=16", "feature=\"global_pool\""])).unwrap();
    assert_eq!(gap.config["feature"], "global_pool");
    assert!(gap.protocol_version.contains("feature=global_pool"));

    let sweep = run(&request(Protocol::LinearSweep, &data, &ck, &out, &["epochs=2", "lrs=[0.01, 0.1]"])).unwrap();
    check_common(&sweep, Protocol::LinearSweep);
    assert_eq!(sweep.details["heads"].as_array().map(Vec::len), Some(2 * 2 * 2));

    let ft = run(&request(Protocol::Finetune, &data, &ck, &out, &["epochs=1", "warmup_epochs=0", "batch_size=32", "micro_batch_size=16"])).unwrap();
    check_common(&ft, Protocol::Finetune);
    assert_eq!(ft.details["steps"], 2, "80 images: 5 micro-batches of 16, 2 whole steps of 32");
    let run_dir = PathBuf::from(ft.details["run_dir"].as_str().unwrap());
    let sha = checkpoint::sha256_file(&ck).unwrap();
    assert!(run_dir.ends_with(format!("enc-finetune-{}", &sha[..12])), "run folder keyed by the source checkpoint: {}", run_dir.display());

    // Every row of the CSV names its dataset fingerprint.
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    let mut rows = csv::Reader::from_reader(csv.as_bytes());
    let col = rows.headers().unwrap().iter().position(|h| h == "dataset_fingerprint").unwrap();
    let n = rows
        .records()
        .map(|r| {
            let r = r.unwrap();
            assert_eq!(r[col].len(), 12, "empty fingerprint in {r:?}");
        })
        .count();
    assert_eq!(n, 6);
}

#[test]
fn overrides_are_checked_and_blamed_on_the_override() {
    let dir = tempfile::tempdir().unwrap();
    let (data, ck) = setup(dir.path());
    let out = dir.path().join("results");
    let err = |p: Protocol, sets: &[&str]| run(&request(p, &data, &ck, &out, sets)).unwrap_err().to_string();
    let e = err(Protocol::Linear, &["epochz=3"]);
    assert!(e.contains("unknown key `epochz`") && e.contains("--set"), "{e}");
    let e = err(Protocol::Finetune, &["epochs=-3"]);
    assert!(e.contains("--set") && !e.contains("finetune.toml"), "a bad override names the override, not the file: {e}");
    let e = err(Protocol::Linear, &["batch_size=100", "micro_batch_size=16"]);
    assert!(e.contains("batch_size") && e.contains("multiple"), "{e}");
    let e = err(Protocol::LinearSweep, &["n_last_blocks=[1, 8]"]);
    assert!(e.contains("n_last_blocks"), "{e}");
    let e = err(Protocol::Knn, &["headline_k=7"]);
    assert!(e.contains("headline_k"), "{e}");
    // Run options are not recipe keys.
    let e = err(Protocol::Linear, &["device=\"cpu\""]);
    assert!(e.contains("unknown key `device`"), "{e}");
}

/// A checkpoint whose `config` metadata cannot make a ViT, and absurd worker counts, are input errors (exit 2)
/// named as such, not panics or aborts inside libtorch.
#[test]
fn impossible_model_configs_and_worker_counts_are_input_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (data, ck) = setup(dir.path());
    let mut c = checkpoint::load(&ck).unwrap();
    for (key, value) in [("num_heads", 0), ("patch_size", 0), ("embed_dim", 1 << 30)] {
        let mut cfg: serde_json::Value = serde_json::from_str(&c.metadata["config"]).unwrap();
        cfg[key] = serde_json::json!(value);
        c.metadata.insert("config".into(), cfg.to_string());
        let bad = dir.path().join(format!("bad-{key}.safetensors"));
        checkpoint::save(&bad, &c.tensors, &c.metadata).unwrap();
        let e = checkpoint::load_vit(&bad, None, Device::Cpu, 0).err().expect("refused");
        assert_eq!(e.exit_code(), 2, "{key}: {e}");
        assert!(e.to_string().contains(&format!("bad-{key}.safetensors")), "{key}: {e}");
        c = checkpoint::load(&ck).unwrap();
    }
    let out = dir.path().join("results");
    let mut req = request(Protocol::NnLoo, &data, &ck, &out, &[]);
    req.run.workers = Some(100_000_000);
    let e = run(&req).unwrap_err();
    assert!(e.exit_code() == 2 && e.to_string().contains("workers"), "{e}");
}

/// Sets every folder's time under `root` an hour back, so that the dataset index of a just-written tree is kept.
fn age_folders(root: &Path) {
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    for e in std::fs::read_dir(root).unwrap().flatten().filter(|e| e.path().is_dir()) {
        age_folders(&e.path());
    }
    std::fs::File::open(root).unwrap().set_modified(old).unwrap();
}

#[test]
fn feature_cache_sees_a_same_size_rewrite_after_rescan_and_extra_tensors_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let (data, ck) = setup(dir.path());
    age_folders(&data);
    let out = dir.path().join("runs");
    let mut req = request(Protocol::NnLoo, &data, &ck, &out, &[]);
    req.run.cache_dir = Some(dir.path().join("features"));
    let val = |rec: &RunRecord| (rec.details["val"]["cache_hit"].as_bool().unwrap(), rec.details["val"]["cache_key"].as_str().unwrap().to_string());
    let first = run(&req).unwrap();
    let again = run(&req).unwrap();
    assert_eq!((val(&first).0, val(&again)), (false, (true, val(&first).1)));
    // A val image rewritten in place with another class's image, padded to the same size: no folder time changes.
    let files = |c: &str| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(data.join("val").join(c)).unwrap().map(|e| e.unwrap().path()).collect();
        v.sort();
        v
    };
    let target = files("class_000")[0].clone();
    let len = std::fs::metadata(&target).unwrap().len() as usize;
    let donor = ["class_001", "class_002", "class_003"].iter().flat_map(|c| files(c)).find(|p| std::fs::metadata(p).unwrap().len() as usize <= len).expect("an image no longer than the target");
    let mut bytes = std::fs::read(&donor).unwrap();
    bytes.resize(len, 0);
    std::fs::write(&target, &bytes).unwrap();
    assert!(val(&run(&req).unwrap()).0, "the index cannot see it: the old features are served");
    let mut with_rescan = req.clone();
    with_rescan.run.scan.rescan = true;
    let rescanned = run(&with_rescan).unwrap();
    assert!(!val(&rescanned).0, "--rescan makes the rewrite visible to the feature cache");
    assert_ne!(val(&rescanned).1, val(&first).1);
    assert_eq!(rescanned.dataset_fingerprint, first.dataset_fingerprint, "the fingerprint (names, sizes) is the same");
    assert!(first.details["val"].get("ignored_keys").is_none());

    // A checkpoint with a tensor that is no weight of the encoder: loaded, and the key named in the record.
    let mut ckpt = checkpoint::load(&ck).unwrap();
    ckpt.tensors.push(("extra.scale".into(), tch::Tensor::ones([3], (tch::Kind::Float, Device::Cpu))));
    let extra = dir.path().join("extra.safetensors");
    checkpoint::save(&extra, &ckpt.tensors, &ckpt.metadata).unwrap();
    let rec = run(&request(Protocol::NnLoo, &data, &extra, &out, &[])).unwrap();
    assert_eq!(rec.details["val"]["ignored_keys"], serde_json::json!(["extra.scale"]));
}
