//! `data prepare-demo` on Debian's Fashion-MNIST files, and `data synth` / `data info` through the CLI.
use std::path::PathBuf;

use assert_cmd::Command;
use lmim_bench::data::fmnist::{default_source, read_idx_images, read_idx_labels, CLASS_NAMES};
use lmim_bench::data::{load_rgb, Dataset};
use predicates::prelude::*;

fn source() -> PathBuf {
    let s = default_source();
    assert!(
        s.join("train-labels-idx1-ubyte.gz").is_file(),
        "Fashion-MNIST is missing at {}: install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist) \
         or set LMIM_FASHION_MNIST",
        s.display()
    );
    s
}

fn bin() -> Command {
    Command::cargo_bin("lmim-bench").unwrap()
}

#[test]
fn prepare_demo_counts_labels_pixels_and_idempotence() {
    let src = source();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fm");
    let args = ["data", "prepare-demo", "--source", src.to_str().unwrap(), "--out", out.to_str().unwrap()];
    bin()
        .args(args)
        .args(["--train-per-class", "3", "--val-per-class", "2"])
        .assert()
        .success()
        .stdout(predicate::str::contains("written (train 30 images, val 20 images"));

    let train = Dataset::open(&out, "train").unwrap();
    let val = Dataset::open(&out, "val").unwrap();
    assert_eq!(train.classes, CLASS_NAMES.to_vec());
    assert_eq!((train.len(), val.len()), (30, 20));
    assert_eq!(train.class_counts(), vec![3; 10]);
    assert_eq!(val.class_counts(), vec![2; 10]);

    // Each file is image number NNNNN of the original split, in the folder of its label, the first of its class,
    // and its pixels are the original ones (up to JPEG at quality 95).
    for (ds, img_f, lab_f, per) in [
        (&train, "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 3),
        (&val, "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 2),
    ] {
        let labels = read_idx_labels(&src.join(lab_f)).unwrap();
        let (_, r, c, px) = read_idx_images(&src.join(img_f)).unwrap();
        let mut expected: Vec<(usize, usize)> = Vec::new();
        let mut taken = [0; 10];
        for (i, &l) in labels.iter().enumerate() {
            if taken[l as usize] < per {
                taken[l as usize] += 1;
                expected.push((l as usize, i));
            }
        }
        expected.sort();
        let ours: Vec<(usize, usize)> = ds
            .samples
            .iter()
            .map(|(p, l)| (*l as usize, p.file_stem().unwrap().to_str().unwrap().parse().unwrap()))
            .collect();
        assert_eq!(ours, expected);
        for (p, _) in ds.samples.iter().step_by(7) {
            let i: usize = p.file_stem().unwrap().to_str().unwrap().parse().unwrap();
            let img = load_rgb(p).unwrap();
            assert_eq!((img.width, img.height), (28, 28));
            let orig = &px[i * r * c..(i + 1) * r * c];
            let mad: f64 =
                img.data.chunks(3).zip(orig).map(|(rgb, &o)| (rgb[0] as f64 - o as f64).abs()).sum::<f64>() / 784.0;
            assert!(mad < 4.0, "{}: mean |diff| {mad} from the IDX pixels", p.display());
            assert!(img.data.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]), "greyscale becomes equal RGB channels");
        }
    }

    // Same options: nothing rewritten.
    let stamp = std::fs::metadata(out.join("lmim-manifest.json")).unwrap().modified().unwrap();
    bin()
        .args(args)
        .args(["--train-per-class", "3", "--val-per-class", "2"])
        .assert()
        .success()
        .stdout(predicate::str::contains("up to date"));
    assert_eq!(stamp, std::fs::metadata(out.join("lmim-manifest.json")).unwrap().modified().unwrap());
    // Other options: rebuilt (val now the whole test split).
    bin()
        .args(args)
        .args(["--train-per-class", "2", "--json"])
        .assert()
        .success()
        .stdout(predicate::str::contains("10000"));
    let val = Dataset::open(&out, "val").unwrap();
    assert_eq!(val.len(), 10_000);
    assert_eq!(Dataset::open(&out, "train").unwrap().len(), 20);
}

#[test]
fn prepare_demo_without_source_says_how_to_get_it() {
    let dir = tempfile::tempdir().unwrap();
    bin()
        .args(["data", "prepare-demo", "--source", dir.path().to_str().unwrap(), "--out"])
        .arg(dir.path().join("o"))
        .assert()
        .code(2)
        .stderr(predicate::str::contains("apt-get install dataset-fashion-mnist"));
    // A folder it did not make is not replaced.
    let other = dir.path().join("mine");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("keep.txt"), "x").unwrap();
    bin()
        .args(["data", "prepare-demo", "--train-per-class", "1", "--val-per-class", "1", "--out"])
        .arg(&other)
        .assert()
        .code(2)
        .stderr(predicate::str::contains("not replacing"));
    assert!(other.join("keep.txt").exists());
}

#[test]
fn synth_and_info_cli() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    for out in [&a, &b] {
        bin()
            .args([
                "data",
                "synth",
                "--classes",
                "3",
                "--train-per-class",
                "4",
                "--val-per-class",
                "2",
                "--size",
                "50x30",
                "--seed",
                "9",
                "--out",
            ])
            .arg(out)
            .assert()
            .success()
            .stdout(predicate::str::contains("train 12 images, val 6 images"));
    }
    // Deterministic from the seed.
    let f = "train/class_002/000003.jpg";
    assert_eq!(std::fs::read(a.join(f)).unwrap(), std::fs::read(b.join(f)).unwrap());
    let img = load_rgb(&a.join(f)).unwrap();
    assert_eq!((img.width, img.height), (50, 30));

    let out = bin().args(["data", "info", "--json", "--data"]).arg(&a).assert().success().get_output().stdout.clone();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["splits"]["train"]["fingerprint"]["num_files"], 12);
    assert_eq!(v["splits"]["val"]["fingerprint"]["num_classes"], 3);
    assert_eq!(v["splits"]["train"]["classes"][2], "class_002");
    let fa = &v["splits"]["train"]["fingerprint"]["files_hash"];
    let out = bin().args(["data", "info", "--json", "--data"]).arg(&b).assert().success().get_output().stdout.clone();
    let w: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(fa, &w["splits"]["train"]["fingerprint"]["files_hash"]);
    bin().args(["data", "synth", "--size", "7", "--out"]).arg(dir.path().join("c")).assert().code(2);
}
