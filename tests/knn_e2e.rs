//! End to end on the Fashion-MNIST demo set: features of a random-init vit_pico_patch4_32 extracted by lmim-bench
//! and by timm + torchvision (tests/py/ref_extract.py) agree per image, the k-NN and LOO accuracies of both agree,
//! and the feature cache is reused by a second protocol run but never after a change of checkpoint or transform.
mod common;

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use lmim_bench::checkpoint;
use lmim_bench::model::{VisionTransformer, VitConfig};
use lmim_bench::protocols::extract::FeatureSet;
use tch::{nn, Device, Kind, Tensor};

fn bin() -> Command {
    Command::cargo_bin("lmim-bench").unwrap()
}

fn random_pico(path: &Path, seed: i64) {
    tch::manual_seed(seed);
    let cfg = VitConfig::from_arch("vit_pico_patch4_32").unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let _model = VisionTransformer::new(&vs.root(), &cfg);
    checkpoint::save_vit(path, &vs, &cfg, &Default::default()).unwrap();
}

fn demo_data(dir: &Path) -> PathBuf {
    let data = dir.join("demo");
    bin()
        // 1000 val images: the accuracies are compared to 0.5 points, and pixel-level differences of the two
        // pipelines flip a few predictions of a random-init model either way.
        .args(["data", "prepare-demo", "--train-per-class", "100", "--val-per-class", "100"])
        .arg("--out")
        .arg(&data)
        .assert()
        .success();
    data
}

fn extract(ckpt: &Path, data: &Path, split: &str, feature: &str, cache: &Path, out: &Path) {
    bin()
        .args(["extract", "--device", "cpu", "--quiet", "--split", split, "--feature", feature])
        .arg("--checkpoint")
        .arg(ckpt)
        .arg("--data")
        .arg(data)
        .arg("--cache-dir")
        .arg(cache)
        .arg("--out")
        .arg(out)
        .assert()
        .success();
}

fn min_cosine(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_kind(Kind::Double);
    let b = b.to_kind(Kind::Double);
    let dot = (&a * &b).sum_dim_intlist([1i64].as_slice(), false, Kind::Double);
    let na = a.norm_scalaropt_dim(2, [1i64].as_slice(), false);
    let nb = b.norm_scalaropt_dim(2, [1i64].as_slice(), false);
    (dot / (na * nb)).min().double_value(&[])
}

fn eval_json(args: &[&str], extra: &[(&str, &Path)]) -> serde_json::Value {
    let mut cmd = bin();
    cmd.args(["eval", "--device", "cpu", "--quiet", "--json"]).args(args);
    for (flag, p) in extra {
        cmd.arg(flag).arg(p);
    }
    let out = cmd.assert().success();
    serde_json::from_slice(&out.get_output().stdout).unwrap()
}

#[test]
fn features_and_accuracy_match_timm_and_cache_is_keyed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = demo_data(d);
    let ckpt = d.join("pico.safetensors");
    random_pico(&ckpt, 0);
    let cache = d.join("cache");

    for (split, feature) in [("train", "cls"), ("val", "cls"), ("val", "avg-prenorm")] {
        extract(&ckpt, &data, split, feature, &cache, &d.join(format!("{split}-{feature}.st")));
    }
    let py = d.join("py.safetensors");
    common::run_py("ref_extract.py", &["features", ckpt.to_str().unwrap(), data.to_str().unwrap(), py.to_str().unwrap()]);
    let r = checkpoint::load(&py).unwrap();
    for (split, feature, key) in [("train", "cls", "train_cls"), ("val", "cls", "val_cls"), ("val", "avg-prenorm", "val_avg_prenorm")] {
        let set = FeatureSet::load(&d.join(format!("{split}-{feature}.st"))).unwrap();
        let want = r.get(key).unwrap();
        assert_eq!(set.features.size(), want.size(), "{key}");
        let labels = r.get(&format!("{split}_labels")).unwrap();
        assert_eq!(set.labels, *labels, "{split} labels");
        let cos = min_cosine(&set.features, want);
        eprintln!("{key}: min cosine {cos:.6}");
        assert!(cos > 0.999, "{key}: min cosine {cos}");
        assert_eq!(set.meta.transform.as_deref(), Some("Resize(36, bicubic) + CenterCrop(32) + Normalize(imagenet)"));
        assert_eq!(set.meta.num_classes, Some(10));
    }

    // k-NN from the checkpoint: both splits come from the cache the extract commands filled.
    let out = d.join("runs");
    let rec = eval_json(&["--protocol", "knn"], &[("--checkpoint", &ckpt), ("--data", &data), ("--cache-dir", &cache), ("--output", &out)]);
    assert_eq!(rec["details"]["train"]["cache_hit"], true);
    assert_eq!(rec["details"]["val"]["cache_hit"], true);
    let knn = rec["metrics"]["top1@k20"].as_f64().unwrap();
    let want = r.get("knn_top1").unwrap().double_value(&[0]);
    eprintln!("k-NN top-1 @20: lmim-bench {knn:.2}, timm pipeline {want:.2}");
    assert!((knn - want).abs() <= 0.5, "k-NN top-1 {knn} vs timm pipeline {want}");
    let want5 = r.get("knn_top5").unwrap().double_value(&[0]);
    assert!((rec["metrics"]["top5@k20"].as_f64().unwrap() - want5).abs() <= 0.5);
    assert_eq!(rec["protocol_version"], "1");
    assert_eq!(rec["model_name"], "pico");
    assert!(rec["dataset_fingerprint"]["hash"].is_string());

    let rec = eval_json(&["--protocol", "nn-loo"], &[("--checkpoint", &ckpt), ("--data", &data), ("--cache-dir", &cache), ("--output", &out)]);
    assert_eq!(rec["details"]["val"]["cache_hit"], true);
    let loo_key = rec["details"]["val"]["cache_key"].clone();
    let loo = rec["metrics"]["top1"].as_f64().unwrap();
    let want = r.get("loo_top1").unwrap().double_value(&[0]);
    eprintln!("LOO 1-NN top-1: lmim-bench {loo:.2}, timm pipeline {want:.2}");
    assert!((loo - want).abs() <= 0.5, "LOO top-1 {loo} vs timm pipeline {want}");

    // Another transform: not from the cache.
    let proto = d.join("knn_crop1.toml");
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("protocols/knn.toml")).unwrap();
    std::fs::write(&proto, text.replace("crop_pct = 0.875", "crop_pct = 1.0")).unwrap();
    let rec = eval_json(&["--protocol", "knn"], &[("--checkpoint", &ckpt), ("--data", &data), ("--cache-dir", &cache), ("--output", &out), ("--protocol-file", &proto)]);
    assert_eq!(rec["details"]["val"]["cache_hit"], false);
    assert_eq!(rec["config"]["transform"], "Resize(32, bicubic) + CenterCrop(32) + Normalize(imagenet)");

    // Another checkpoint under the same file name: not from the cache.
    random_pico(&ckpt, 1);
    let rec = eval_json(&["--protocol", "nn-loo"], &[("--checkpoint", &ckpt), ("--data", &data), ("--cache-dir", &cache), ("--output", &out)]);
    assert_eq!(rec["details"]["val"]["cache_hit"], false);
    assert_ne!(rec["details"]["val"]["cache_key"], loo_key);
}

/// Largest |a - b| of a row over the largest |b| of that row, over all rows.
fn max_relative(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
    let diff = (&a - &b).abs().amax([1i64].as_slice(), false);
    let scale = b.abs().amax([1i64].as_slice(), false);
    (diff / scale).max().double_value(&[])
}

/// PNGs of odd sizes, smaller and larger than the eval transform's 36: the features equal timm + torchvision's on
/// PIL (Resize(36, bicubic) with Pillow's antialiasing, CenterCrop(32)) within 1e-5 of each row's scale, since the
/// resize is Pillow's to the value.
#[test]
fn odd_sized_pngs_give_timms_features() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = d.join("odd");
    let sizes = [(23u32, 29u32), (45, 37), (31, 61), (57, 41), (37, 37), (19, 53)];
    let mut k = 0u32;
    for (split, per_class) in [("train", 12), ("val", 6)] {
        for c in 0..2u32 {
            let folder = data.join(split).join(format!("c{c}"));
            std::fs::create_dir_all(&folder).unwrap();
            for i in 0..per_class {
                let (w, h) = sizes[(k as usize) % sizes.len()];
                k += 1;
                // Gradients, a per-image phase and a hashed texture: edges and smooth parts for both filters' taps.
                let img = image::RgbImage::from_fn(w, h, |x, y| {
                    let t = (x * 7 + y * 13 + k * 31).wrapping_mul(2654435761) >> 24;
                    image::Rgb([((x * 255) / w) as u8 ^ (c * 90) as u8, ((y * 255) / h) as u8, (t as u8).wrapping_add((i * 17) as u8)])
                });
                img.save(folder.join(format!("{i:03}.png"))).unwrap();
            }
        }
    }
    let ckpt = d.join("pico.safetensors");
    random_pico(&ckpt, 1);
    let cache = d.join("cache");
    for split in ["train", "val"] {
        extract(&ckpt, &data, split, "cls", &cache, &d.join(format!("{split}.st")));
    }
    let py = d.join("py.safetensors");
    common::run_py("ref_extract.py", &["features", ckpt.to_str().unwrap(), data.to_str().unwrap(), py.to_str().unwrap()]);
    let r = checkpoint::load(&py).unwrap();
    for split in ["train", "val"] {
        let set = FeatureSet::load(&d.join(format!("{split}.st"))).unwrap();
        let rel = max_relative(&set.features, r.get(&format!("{split}_cls")).unwrap());
        eprintln!("{split}: largest relative difference {rel:.2e}");
        assert!(rel < 1e-5, "{split}: features differ from timm + torchvision's by {rel:e} of their scale");
    }
}
