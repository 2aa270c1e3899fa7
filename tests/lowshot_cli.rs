//! `eval --protocol lowshot` end to end on the demo data with a pico ViT: a `shots=2` draw written as a list, the
//! same list given back with `--subset` (the same subset, the same score), two lists (mean ± std in `table`, the
//! "2 img" column), a name that is not in the data (exit 2 naming it), and nn-loo's `lmim-ddp` subset.
mod common;

use std::path::Path;

use assert_cmd::Command;
use lmim_bench::checkpoint;
use lmim_bench::model::{VisionTransformer, VitConfig};
use predicates::str::contains;
use tch::{nn, Device, Kind};

fn bin() -> Command {
    Command::cargo_bin("lmim-bench").unwrap()
}

fn pico(path: &Path) {
    tch::manual_seed(0);
    let cfg = VitConfig::from_arch("vit_pico_patch4_32").unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let _m = VisionTransformer::new(&vs.root(), &cfg);
    checkpoint::save_vit(path, &vs, &cfg, &Default::default()).unwrap();
}

fn records(dir: &Path) -> Vec<serde_json::Value> {
    let mut v: Vec<serde_json::Value> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap())
        .collect();
    v.sort_by(|a, b| a["started_at"].as_str().cmp(&b["started_at"].as_str()));
    v
}

fn eval(args: &[&str], ckpt: &Path, data: &Path, out: &Path, cache: &Path) -> assert_cmd::assert::Assert {
    let mut a = vec!["--protocol", "lowshot", "--device", "cpu", "--workers", "2", "--quiet", "--name", "pico"];
    a.extend_from_slice(args);
    common::eval_cmd(&a, ckpt, data, out).arg("--cache-dir").arg(cache).assert()
}

/// Top-1 of scikit-learn's logistic regression (tests/py/ref_lowshot.py `fit`: cyanure's preprocessing, then
/// `LogisticRegression(C = 1 / lambd, fit_intercept=False)`) on the cache's train and val features of the protocol's
/// run (the train file holds only the rows the subset `list` names, in split order).
fn scikit_learn_top1(cache: &Path, data: &Path, list: &Path, work: &Path) -> f64 {
    let file_of = |split: &str| {
        let mut f: Vec<_> = std::fs::read_dir(cache).unwrap().map(|e| e.unwrap().path()).filter(|p| p.file_name().unwrap().to_string_lossy().contains(&format!("-{split}-"))).collect();
        assert_eq!(f.len(), 1, "one {split} features file in the cache: {f:?}");
        checkpoint::load(&f.pop().unwrap()).unwrap()
    };
    let (train, val) = (file_of("train"), file_of("val"));
    let ds = lmim_bench::data::Dataset::open(data, "train").unwrap();
    let names: Vec<String> = std::fs::read_to_string(list).unwrap().lines().map(String::from).collect();
    let mut rows: Vec<usize> = names.iter().map(|n| ds.samples.iter().position(|(p, _)| p.file_name().unwrap().to_string_lossy() == *n).expect("listed image in the split")).collect();
    rows.sort();
    // Only the listed rows were extracted, in split order: their labels are theirs.
    assert_eq!(train.get("features").unwrap().size()[0], rows.len() as i64, "the train features hold the subset's rows only");
    let want: Vec<i64> = rows.iter().map(|&r| ds.samples[r].1).collect();
    assert_eq!(Vec::<i64>::try_from(train.get("labels").unwrap()).unwrap(), want);
    let x = train.get("features").unwrap().to_kind(Kind::Double);
    let y = train.get("labels").unwrap().shallow_clone();
    let (vx, vy) = (val.get("features").unwrap().to_kind(Kind::Double), val.get("labels").unwrap().shallow_clone());
    let cfg = serde_json::json!({ "lambd": 0.0025, "num_classes": 10, "tol": 1e-10 });
    let meta = [("config".to_string(), cfg.to_string())].into_iter().collect();
    let (inp, out) = (work.join("sk-in.safetensors"), work.join("sk-out.safetensors"));
    checkpoint::save(&inp, &[("train".into(), x), ("train_labels".into(), y), ("val".into(), vx)], &meta).unwrap();
    common::run_py("ref_lowshot.py", &["fit", inp.to_str().unwrap(), out.to_str().unwrap()]);
    let pred = checkpoint::load(&out).unwrap().get("val_pred").unwrap().shallow_clone();
    100.0 * pred.eq_tensor(&vy).to_kind(Kind::Double).mean(Kind::Double).double_value(&[])
}

#[test]
fn lowshot_draw_list_and_table() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::demo_data(dir.path(), 8, 20);
    let ckpt = dir.path().join("pico.safetensors");
    pico(&ckpt);
    let (out, cache) = (dir.path().join("runs"), dir.path().join("cache"));

    // A draw of 2 images per class (10 classes), written as a list.
    eval(&["shots=2"], &ckpt, &data, &out, &cache).success();
    let recs = records(&out);
    assert_eq!(recs.len(), 1);
    let r = &recs[0];
    assert_eq!(r["protocol"], "lowshot");
    assert_eq!(r["config"]["column"], "lowshot:2img");
    assert_eq!(r["config"]["lambd"], 0.0025);
    let split = &r["details"]["splits"][0];
    assert_eq!(split["subset"]["count"], 20);
    assert_eq!(split["subset"]["images_per_class_min"], 2);
    assert_eq!(split["subset"]["images_per_class_max"], 2);
    assert_eq!(split["solve"]["converged"], true, "{}", split["solve"]);
    assert!(split["solve"]["grad_max"].as_f64().unwrap() <= 1e-7);
    let top1 = r["metrics"]["top1"].as_f64().unwrap();
    let list = std::path::PathBuf::from(split["subset"]["file"].as_str().unwrap());
    // The same cached features, the same subset rows, solved by scikit-learn after cyanure's preprocessing
    // (tests/py/ref_lowshot.py): the same top-1 on the 200 val images.
    let want = scikit_learn_top1(&cache, &data, &list, dir.path());
    assert!((top1 - want).abs() < 1e-9, "top-1 {top1}, scikit-learn's {want}");
    assert!(list.starts_with(out.join("lowshot-subsets")), "{}", list.display());
    let text = std::fs::read_to_string(&list).unwrap();
    assert_eq!(text.lines().count(), 20);
    assert_eq!(split["subset"]["sha256"].as_str().unwrap(), hex_sha256(text.as_bytes()));

    // The written list given back: the same subset, the same score (features from the cache).
    let out2 = dir.path().join("runs2");
    eval(&["--subset", list.to_str().unwrap()], &ckpt, &data, &out2, &cache).success();
    let r2 = &records(&out2)[0];
    assert_eq!(r2["details"]["splits"][0]["subset"]["sha256"], split["subset"]["sha256"]);
    assert_eq!(r2["metrics"]["top1"].as_f64().unwrap(), top1);

    // Two splits (another draw's list): mean and std, and the table's "2 img" column shows "mean ± std".
    eval(&["shots=2", "seed=1"], &ckpt, &data, &dir.path().join("runs3"), &cache).success();
    let other = std::fs::read_dir(dir.path().join("runs3/lowshot-subsets")).unwrap().next().unwrap().unwrap().path();
    eval(&["--subset", list.to_str().unwrap(), "--subset", other.to_str().unwrap()], &ckpt, &data, &out2, &cache).success();
    let r3 = records(&out2).pop().unwrap();
    let (a, b) = (r3["metrics"]["top1@split1"].as_f64().unwrap(), r3["metrics"]["top1@split2"].as_f64().unwrap());
    assert_eq!(a, top1);
    assert!((r3["metrics"]["top1"].as_f64().unwrap() - (a + b) / 2.0).abs() < 1e-9);
    assert!((r3["metrics"]["top1_std"].as_f64().unwrap() - (a - b).abs() / 2.0).abs() < 1e-9);
    let table = bin().args(["table"]).arg(&out2).assert().success();
    let md = String::from_utf8(table.get_output().stdout.clone()).unwrap();
    assert!(md.contains("2 img"), "{md}");
    assert!(md.contains(&format!("{:.2} ± {:.2}", (a + b) / 2.0, (a - b).abs() / 2.0)), "{md}");

    // A name that is not in the data.
    let bad = dir.path().join("bad.txt");
    std::fs::write(&bad, format!("{}no_such_image.png\n", text)).unwrap();
    eval(&["--subset", bad.to_str().unwrap()], &ckpt, &data, &dir.path().join("runs4"), &cache)
        .code(2)
        .stderr(contains("no_such_image.png"))
        .stderr(contains("line 21"));
    assert!(!dir.path().join("runs4").join("results.csv").exists());

    // A list with a line twice and only the first class's images: both named in warnings, the run goes on.
    let first_two: Vec<&str> = text.lines().take(2).collect();
    let partial = dir.path().join("partial.txt");
    std::fs::write(&partial, format!("{}\n{}\n{}\n", first_two[0], first_two[1], first_two[0])).unwrap();
    eval(&["--subset", partial.to_str().unwrap()], &ckpt, &data, &dir.path().join("runs6"), &cache)
        .success()
        .stderr(contains("1 line(s) name an image already listed"))
        .stderr(contains("9 class(es) have no training image in the list"));

    // nn-loo on the reference's DDP subset of the 200 val images: 3 ranks x batch 16 -> 3 x 64 = 192 rows.
    let out5 = dir.path().join("runs5");
    let nn = ["--protocol", "nn-loo", "--device", "cpu", "--workers", "2", "--quiet", "subset=\"lmim-ddp\"", "world_size=3", "batch_size=16"];
    common::eval_cmd(&nn, &ckpt, &data, &out5).arg("--cache-dir").arg(&cache).assert().success();
    let r5 = &records(&out5)[0];
    assert_eq!(r5["details"]["scored"]["rows"], 192);
    assert_eq!(r5["details"]["nn_loo"]["n"], 192);
    assert!(r5["protocol_version"].as_str().unwrap().contains("subset"), "{}", r5["protocol_version"]);
}

fn hex_sha256(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}
