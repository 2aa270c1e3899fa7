//! The probing benchmark's protocols (billpsomas/efficient-probing): the EP head's forward, gradients and LARS
//! steps against a PyTorch reference written from its definition (tests/py/ref_attentive.py, 1e-5), its export
//! loading strictly into PyTorch with the same predictions, `eval --protocol attentive` end to end on the demo data
//! (library call and command, record, table column, check), and the k-NN sweep's best (k, T) against a brute-force
//! reference over the same grid (tests/py/ref_knn_sweep.py).
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use assert_cmd::Command;
use lmim_bench::checkpoint;
use lmim_bench::model::{VisionTransformer, VitConfig};
use lmim_bench::protocols::attentive::{save_head, AttentiveHead};
use lmim_bench::protocols::probe::BnHead;
use lmim_bench::protocols::extract::{FeatureMeta, FeatureSet};
use lmim_bench::protocols::{run, EvalRequest, Protocol};
use lmim_bench::train::optim::Lars;
use predicates::str::contains;
use tch::{nn, Device, Kind, Tensor};

fn bin() -> Command {
    Command::cargo_bin("lmim-bench").unwrap()
}

#[test]
fn ep_head_matches_reference_and_its_export_loads_strictly_in_pytorch() {
    tch::manual_seed(3);
    let (steps, b, n, d, q, c) = (3i64, 8i64, 17i64, 48i64, 8i64, 5i64);
    let vs = nn::VarStore::new(Device::Cpu);
    let head = AttentiveHead::new(&vs.root(), d, c, q).unwrap();
    // Larger queries than the N(0, 0.02) init, so the attention is far from uniform and its gradient matters.
    tch::no_grad(|| head.cls_token.shallow_clone().copy_(&(Tensor::randn([1, q, d], (Kind::Float, Device::Cpu)) * 0.5)));
    let tokens = Tensor::randn([steps, b, n, d], (Kind::Float, Device::Cpu)) * 2.0 + 0.5;
    let labels = Tensor::randint(c, [steps, b], (Kind::Int64, Device::Cpu));
    let lrs = [0.5, 1.0, 0.25];
    let (wd, momentum, trust) = (0.01, 0.9, 0.001);
    let dir = tempfile::tempdir().unwrap();
    let (inp, outp) = (dir.path().join("in.safetensors"), dir.path().join("out.safetensors"));
    let meta = BTreeMap::from([("config".to_string(), serde_json::json!({"lr": lrs, "wd": wd, "momentum": momentum, "trust": trust}).to_string())]);
    let mut tensors: Vec<(String, Tensor)> = head.state_dict().into_iter().filter(|(k, _)| !k.starts_with("1.")).collect();
    tensors.extend([("tokens".to_string(), tokens.shallow_clone()), ("labels".to_string(), labels.shallow_clone())]);
    checkpoint::save(&inp, &tensors, &meta).unwrap();
    common::run_py("ref_attentive.py", &["train", inp.to_str().unwrap(), outp.to_str().unwrap()]);
    let r = checkpoint::load(&outp).unwrap();
    let within = |what: &str, got: &Tensor, want: &str| {
        let err = common::max_abs(got, r.get(want).unwrap());
        eprintln!("{what}: max |diff| {err:.2e}");
        assert!(err < 1e-5, "{what} differs from the reference by {err}");
    };

    let mut opt = Lars::new(head.params(wd), momentum, trust);
    for s in 0..steps {
        let logits = head.forward(&tokens.get(s), true);
        let loss = logits.cross_entropy_for_logits(&labels.get(s));
        let want = r.get("losses").unwrap().double_value(&[s]);
        assert!((loss.double_value(&[]) - want).abs() < 1e-5, "loss at step {s}");
        opt.zero_grad();
        loss.backward();
        if s == 0 {
            within("logits", &logits, "logits.0");
            for p in head.params(wd) {
                within(&format!("grad {}", p.name), &p.tensor.grad(), &format!("grad.{}", p.name));
            }
        }
        opt.step(lrs[s as usize]);
        for (name, t) in head.state_dict().iter().filter(|(k, _)| !k.ends_with("num_batches_tracked")) {
            within(&format!("{name} after step {s}"), t, &format!("{name}.{s}"));
        }
    }
    let eval_logits = tch::no_grad(|| head.forward(&tokens.get(0), false));
    within("eval-mode logits", &eval_logits, "eval_logits");
    let state = head.state_dict();
    let tracked = &state.iter().find(|(k, _)| k == "1.num_batches_tracked").unwrap().1;
    assert_eq!((tracked.size(), tracked.kind(), tracked.int64_value(&[])), (vec![], Kind::Int64, steps));
    assert_eq!(*tracked, *r.get("num_batches_tracked").unwrap());

    // The export under the benchmark's names loads with strict=True and predicts what lmim-bench predicts.
    let (exported, toks, logits) = (dir.path().join("attentive_head.safetensors"), dir.path().join("tokens.safetensors"), dir.path().join("logits.safetensors"));
    save_head(&exported, &state, &serde_json::json!({ "queries": q })).unwrap();
    let names: Vec<String> = checkpoint::load(&exported).unwrap().tensors.into_iter().map(|(k, _)| k).collect();
    assert_eq!(names, ["0.cls_token", "0.v.weight", "1.num_batches_tracked", "1.running_mean", "1.running_var", "2.bias", "2.weight"]);
    checkpoint::save(&toks, &[("tokens".to_string(), tokens.get(1))], &BTreeMap::new()).unwrap();
    common::run_py("ref_attentive.py", &["load", exported.to_str().unwrap(), toks.to_str().unwrap(), logits.to_str().unwrap()]);
    let want = checkpoint::load(&logits).unwrap();
    let got = tch::no_grad(|| head.forward(&tokens.get(1), false));
    let err = common::max_abs(&got, want.get("logits").unwrap());
    eprintln!("exported head in PyTorch: max |diff| {err:.2e}");
    assert!(err < 1e-5, "the exported head predicts differently in PyTorch ({err})");
    assert_eq!(got.argmax(1, false), want.get("logits").unwrap().argmax(1, false));
}

fn pico(path: &Path, class_token: bool) {
    tch::manual_seed(0);
    let mut cfg = VitConfig::from_arch("vit_pico_patch4_32").unwrap();
    cfg.class_token = class_token;
    if !class_token {
        cfg.global_pool = lmim_bench::model::vit::GlobalPool::Avg;
    }
    let vs = nn::VarStore::new(Device::Cpu);
    let _m = VisionTransformer::new(&vs.root(), &cfg);
    checkpoint::save_vit(path, &vs, &cfg, &BTreeMap::new()).unwrap();
}

fn request(p: Protocol, data: &Path, ck: &Path, out: &Path, sets: &[&str]) -> EvalRequest {
    let mut r = EvalRequest::new(p, out);
    r.checkpoint = Some(ck.to_path_buf());
    r.data = Some(data.to_path_buf());
    r.sets = sets.iter().map(|s| s.to_string()).collect();
    r.run = common::cpu_options();
    r.run.tensorboard = false;
    r
}

/// 4 epochs of 4 steps (200 train images, micro-batches of 25, steps of 50), evaluated after each. LARS moves a
/// weight by lr x 0.001 of its norm per step: at 16 steps the head learns only with a large lr (12.5).
const SHORT: [&str; 6] = ["epochs=4", "warmup_epochs=1", "batch_size=50", "micro_batch_size=25", "queries=8", "blr=64.0"];

#[test]
fn attentive_probe_end_to_end_on_the_demo_data() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = common::demo_data(d, 20, 10);
    let ck = d.join("pico.safetensors");
    pico(&ck, true);
    let out = d.join("results");

    let rec = run(&request(Protocol::Attentive, &data, &ck, &out, &SHORT)).unwrap();
    assert_eq!(rec.protocol, "attentive");
    let version = rec.protocol_version.as_str();
    assert!(version.starts_with("ep-bench-1+") && version.contains("queries=8") && version.contains("blr=64"), "{version}");
    let history = rec.details["history"].as_array().unwrap();
    assert_eq!(history.len(), 4);
    assert_eq!(rec.details["steps"], 16);
    let vals: Vec<f64> = history.iter().map(|h| h["val_top1"].as_f64().unwrap()).collect();
    let best = vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    assert_eq!(rec.metrics["top1"], best, "top1 is the best epoch's");
    assert_eq!(rec.metrics["last_top1"], vals[3], "last_top1 is the last epoch's");
    assert_eq!(rec.details["best_epoch"], vals.iter().position(|v| *v == best).unwrap() + 1);
    assert!(rec.details["reported"].as_str().unwrap().contains("best epoch"));
    // 10 classes, a random encoder, 16 steps: well above chance (10 %) on the demo's val split.
    eprintln!("EP on a random pico, 4 epochs: top-1 per epoch {vals:?}");
    assert!(best > 20.0, "EP top-1 {best} is no better than chance");
    assert_eq!(rec.config["lr"], 64.0 * 50.0 / 256.0);
    assert_eq!(rec.config["accum_iter"], 2);
    assert!(rec.config["tokens"].as_str().unwrap().contains("before the final norm"));
    let run_dir = PathBuf::from(rec.details["run_dir"].as_str().unwrap());
    let head = checkpoint::load(&run_dir.join("attentive_head.safetensors")).unwrap();
    assert_eq!(head.get("0.cls_token").unwrap().size(), [1, 8, 96]);
    assert_eq!(head.get("2.weight").unwrap().size(), [10, 96]);
    assert_eq!(head.get("1.num_batches_tracked").unwrap().int64_value(&[]), 32, "one per training micro-batch");
    assert_eq!(head.metadata["epoch"], "4");
    let best_head = checkpoint::load(&run_dir.join("attentive_head_best.safetensors")).unwrap();
    assert_eq!(best_head.metadata["epoch"], rec.details["best_epoch"].to_string());
    assert_eq!(std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap().lines().count(), 4);

    // Refused with the key named: Q must divide the width; ep_all needs a CLS token.
    let e = run(&request(Protocol::Attentive, &data, &ck, &out, &["queries=7"])).unwrap_err().to_string();
    assert!(e.contains("queries") && e.contains("96"), "{e}");
    let no_cls = d.join("nocls.safetensors");
    pico(&no_cls, false);
    let e = run(&request(Protocol::Attentive, &data, &no_cls, &out, &["feature=\"ep_all\""])).unwrap_err().to_string();
    assert!(e.contains("no CLS token"), "{e}");

    // The command, with the CLS token among the pooled tokens.
    let o = bin()
        .args(["eval", "--protocol", "attentive", "--device", "cpu", "--quiet", "--json", "--no-tensorboard", "--name", "pico-ep-all"])
        .args(SHORT)
        .arg("feature=\"ep_all\"")
        .arg("--checkpoint")
        .arg(&ck)
        .arg("--data")
        .arg(&data)
        .arg("--output")
        .arg(&out)
        .assert()
        .success();
    let rec: serde_json::Value = serde_json::from_slice(&o.get_output().stdout).unwrap();
    assert_eq!(rec["config"]["feature"], "ep_all");
    assert!(rec["protocol_version"].as_str().unwrap().contains("feature=ep_all"));

    // The EP column of the table, beside LP; and `check` holds EP numbers.
    bin().args(["table", "--format", "markdown"]).arg(&out).assert().success().stdout(contains("| EP |")).stdout(contains("MAE (probing benchmark)"));
    let reference = Path::new(env!("CARGO_MANIFEST_DIR")).join("protocols/reference.toml");
    bin()
        .args(["check", "--reference-model", "epbench-mae-vitb16", "--reference"])
        .arg(&reference)
        .arg(&out)
        .assert()
        .code(0)
        .stdout(contains("| attentive | top1 |"))
        .stdout(contains("75.46"));
}

fn features_file(path: &Path, n: i64, d: i64, classes: i64) {
    let labels = Tensor::randint(classes, [n], (Kind::Int64, Device::Cpu));
    // Class-dependent means: the k-NN is well above chance, and continuous values leave no ties.
    let means = Tensor::randn([classes, d], (Kind::Double, Device::Cpu));
    let features = means.index_select(0, &labels) + Tensor::randn([n, d], (Kind::Double, Device::Cpu)) * 1.5;
    let meta = FeatureMeta { num_classes: Some(classes), ..Default::default() };
    FeatureSet { features, labels, meta }.save(path).unwrap();
}

#[test]
fn knn_sweep_best_pair_equals_brute_force() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tch::manual_seed(11);
    let (train, val) = (d.join("train.safetensors"), d.join("val.safetensors"));
    features_file(&train, 400, 16, 7);
    features_file(&val, 150, 16, 7);
    let mut req = EvalRequest::new(Protocol::KnnSweep, d.join("results"));
    req.train_features = Some(train.clone());
    req.val_features = Some(val.clone());
    req.run = common::cpu_options();
    // Small blocks: the one search up to k = 200 is merged over several bank chunks.
    req.run.query_chunk = Some(64);
    req.run.bank_chunk = Some(96);
    let rec = run(&req).unwrap();
    assert_eq!(rec.protocol, "knn-sweep");
    assert_eq!(rec.protocol_version, "1");

    let (ks, ts) = ([5, 10, 15, 20, 50, 100, 200], [0.07, 0.1, 0.2]);
    let join = |v: Vec<String>| v.join(",");
    let out = d.join("ref.safetensors");
    common::run_py(
        "ref_knn_sweep.py",
        &[train.to_str().unwrap(), val.to_str().unwrap(), out.to_str().unwrap(), &join(ks.iter().map(|k| k.to_string()).collect()), &join(ts.iter().map(|t| t.to_string()).collect())],
    );
    let r = checkpoint::load(&out).unwrap();
    let grid = r.get("top1").unwrap();
    for (i, t) in ts.iter().enumerate() {
        for (j, k) in ks.iter().enumerate() {
            let got = rec.metrics[&format!("top1@k{k}@T{t}")];
            let want = grid.double_value(&[i as i64, j as i64]);
            assert!((got - want).abs() < 1e-9, "k = {k}, T = {t}: {got} vs brute force {want}");
        }
    }
    let best = r.get("best").unwrap();
    let (k, t, top1) = (best.double_value(&[0]), best.double_value(&[1]), best.double_value(&[2]));
    eprintln!("best pair: k = {k}, T = {t}, top-1 {top1:.2} (lmim-bench: {})", rec.details["best"]);
    assert_eq!(rec.details["best"]["k"].as_f64(), Some(k));
    assert_eq!(rec.details["best"]["temperature"].as_f64(), Some(t));
    assert!((rec.metrics["top1"] - top1).abs() < 1e-9);
    assert_eq!(rec.config["best_k"].as_f64(), Some(k));
    // Not the grid's first or last pair: the choice is exercised, not a default.
    assert!(grid.max().double_value(&[]) - grid.min().double_value(&[]) > 1.0, "a flat grid tests nothing");

    // From an encoder on the demo data: the benchmark's feature (CLS before the final norm), its own column.
    let data = common::demo_data(d, 20, 10);
    let ck = d.join("pico.safetensors");
    pico(&ck, true);
    let o = bin()
        .args(["eval", "--protocol", "knn-sweep", "--device", "cpu", "--quiet", "--json", "--no-cache"])
        .arg("--checkpoint")
        .arg(&ck)
        .arg("--data")
        .arg(&data)
        .arg("--output")
        .arg(d.join("runs"))
        .assert()
        .success();
    let rec: serde_json::Value = serde_json::from_slice(&o.get_output().stdout).unwrap();
    assert_eq!(rec["config"]["feature"], "cls-prenorm");
    assert_eq!(rec["details"]["knn_sweep"].as_array().unwrap().len(), 3);
    bin().args(["table"]).arg(d.join("runs")).assert().success().stdout(contains("| k-NN sweep |")).stdout(contains(", T="));
}
