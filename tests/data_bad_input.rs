//! Bad input: truncated and non-image files, empty class folders, missing splits and roots.
use std::path::Path;

use assert_cmd::Command;
use lmim_bench::data::synth::{synth, SynthOptions};
use lmim_bench::data::{Dataset, Loader, LoaderConfig, OpenOptions, Transform};
use lmim_bench::Error;
use predicates::prelude::*;

/// A tree with 3 good classes of 4 images, plus in `class_001` a truncated JPEG and a text file named `.jpg`, and
/// an empty class folder `class_001b`.
fn bad_tree(dir: &Path) -> std::path::PathBuf {
    let root = dir.join("bad");
    synth(&SynthOptions {
        out: root.clone(),
        classes: 3,
        train_per_class: 4,
        val_per_class: 0,
        width: 48,
        height: 40,
        seed: 1,
        quality: 90,
    })
    .unwrap();
    let c1 = root.join("train/class_001");
    let good = std::fs::read(c1.join("000000.jpg")).unwrap();
    std::fs::write(c1.join("truncated.jpg"), &good[..good.len() / 2]).unwrap();
    std::fs::write(c1.join("notes.jpg"), "these are notes, not a picture\n").unwrap();
    std::fs::create_dir_all(root.join("train/class_001b")).unwrap();
    root
}

fn cfg(strict: bool) -> LoaderConfig {
    LoaderConfig {
        batch_size: 5,
        shuffle: false,
        strict,
        workers: 2,
        quiet: true,
        ..Default::default()
    }
}

fn bin() -> Command {
    Command::cargo_bin("lmim-bench").unwrap()
}

#[test]
fn empty_class_folder_is_kept_and_warned_or_strict_error() {
    let dir = tempfile::tempdir().unwrap();
    let root = bad_tree(dir.path());
    let ds = Dataset::open_with(&root, "train", &OpenOptions { quiet: true, ..Default::default() }).unwrap();
    // Sorted folder names: the empty class keeps its index, so class_002 is still index 3.
    assert_eq!(ds.classes, vec!["class_000", "class_001", "class_001b", "class_002"]);
    assert_eq!(ds.empty_classes, vec!["class_001b"]);
    assert_eq!(ds.class_counts(), vec![4, 6, 0, 4]);
    let err = Dataset::open_with(&root, "train", &OpenOptions { strict: true, quiet: true, ..Default::default() }).unwrap_err();
    assert!(matches!(err, Error::BadData { .. }));
    assert!(err.to_string().contains("class_001b"), "{err}");
    assert_eq!(err.exit_code(), 2);
}

#[test]
fn unreadable_files_are_skipped_and_counted_or_strict_error() {
    let dir = tempfile::tempdir().unwrap();
    let root = bad_tree(dir.path());
    let open = || Dataset::open_with(&root, "train", &OpenOptions { quiet: true, ..Default::default() }).unwrap();
    let ds = open();
    let names: Vec<String> =
        ds.samples.iter().map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    let bad: Vec<usize> =
        names.iter().enumerate().filter(|(_, n)| *n == "truncated.jpg" || *n == "notes.jpg").map(|(i, _)| i).collect();
    assert_eq!(bad.len(), 2);

    let l = Loader::new(ds.clone(), Transform::eval(36, 32), cfg(false)).unwrap();
    let mut got = Vec::new();
    let mut skipped_in_batches = 0;
    for b in l.epoch(0) {
        let b = b.unwrap();
        let labels: Vec<i64> = Vec::try_from(&b.labels).unwrap();
        assert_eq!(b.images.size()[0] as usize, b.indices.len());
        for (&i, &lab) in b.indices.iter().zip(&labels) {
            assert_eq!(lab, ds.samples[i].1, "label of sample {i}");
        }
        skipped_in_batches += b.skipped;
        got.extend(b.indices);
    }
    assert_eq!(l.skipped(), 2);
    assert_eq!(skipped_in_batches, 2);
    assert_eq!(got.len(), ds.len() - 2);
    assert!(bad.iter().all(|i| !got.contains(i)));

    // Strict: the first bad file ends the epoch with an error naming it.
    let l = Loader::new(open(), Transform::eval(36, 32), cfg(true)).unwrap();
    let results: Vec<_> = l.epoch(0).collect();
    let err = results.iter().find_map(|r| r.as_ref().err()).expect("strict mode must fail");
    let msg = err.to_string();
    assert!(msg.contains("notes.jpg") || msg.contains("truncated.jpg"), "{msg}");
    assert!(results.last().unwrap().is_err(), "nothing after the error");
    assert_eq!(err.exit_code(), 2);
}

#[test]
fn missing_split_and_root_are_errors_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let root = bad_tree(dir.path());
    let err = Dataset::open(&root, "val").unwrap_err();
    assert!(err.to_string().contains(&root.join("val").display().to_string()), "{err}");
    assert!(err.to_string().contains("missing split"), "{err}");
    assert_eq!(err.exit_code(), 2);
    let err = Dataset::open(&dir.path().join("nope"), "train").unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
    assert_eq!(err.exit_code(), 2);
    // A file as the root.
    let f = dir.path().join("file");
    std::fs::write(&f, "x").unwrap();
    assert_eq!(Dataset::open(&f, "train").unwrap_err().exit_code(), 2);
}

#[test]
fn cli_info_on_missing_root_exits_2_naming_it() {
    bin()
        .args(["data", "info", "--data", "/nonexistent"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("/nonexistent"));
}

#[test]
fn cli_check_warns_naming_the_files_and_strict_fails() {
    let dir = tempfile::tempdir().unwrap();
    let root = bad_tree(dir.path());
    bin()
        .args(["data", "check", "--data", root.to_str().unwrap(), "--workers", "2"])
        .assert()
        .success()
        .stdout(predicate::str::contains("14 images, 12 ok, 2 skipped"))
        .stderr(predicate::str::contains("truncated.jpg"))
        .stderr(predicate::str::contains("notes.jpg"))
        .stderr(predicate::str::contains("class_001b"));
    bin()
        .args(["data", "check", "--data", root.to_str().unwrap(), "--strict"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("class_001b"));
    std::fs::remove_dir(root.join("train/class_001b")).unwrap();
    bin()
        .args(["data", "check", "--data", root.to_str().unwrap(), "--strict"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("notes.jpg").or(predicate::str::contains("truncated.jpg")));
    bin()
        .args(["data", "info", "--data", root.to_str().unwrap(), "--split", "val"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("val"));
}

#[test]
fn png_named_jpeg_and_greyscale_decode_to_rgb() {
    let dir = tempfile::tempdir().unwrap();
    // ImageNet has a PNG named .JPEG: the bytes decide the decoder.
    let p = dir.path().join("x.JPEG");
    image::RgbImage::from_pixel(5, 4, image::Rgb([10, 20, 30])).save_with_format(&p, image::ImageFormat::Png).unwrap();
    let img = lmim_bench::data::load_rgb(&p).unwrap();
    assert_eq!((img.width, img.height), (5, 4));
    assert_eq!(&img.data[..3], &[10, 20, 30]);
    let g = dir.path().join("g.png");
    image::GrayImage::from_pixel(3, 2, image::Luma([77])).save(&g).unwrap();
    assert_eq!(lmim_bench::data::load_rgb(&g).unwrap().data, vec![77; 18]);
    // A JPEG cut short by a few bytes (zune-jpeg alone would fill the rest with grey).
    let mut jpg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpg, 90)
        .encode(&vec![128u8; 64 * 48 * 3], 64, 48, image::ExtendedColorType::Rgb8)
        .unwrap();
    assert!(lmim_bench::data::decode_image(&jpg).is_ok());
    assert!(lmim_bench::data::decode_image(&jpg[..jpg.len() - 12]).is_err());
    // Empty and random bytes: errors, not panics.
    assert!(lmim_bench::data::decode_image(&[]).is_err());
    assert!(lmim_bench::data::decode_image(&[0xFF, 0xD8, 0xFF, 0xE0, 0, 16]).is_err());
    let noise: Vec<u8> = (0..5000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    assert!(lmim_bench::data::decode_image(&noise).is_err());
}

#[test]
fn evaluation_refuses_an_unreadable_val_file_unless_skip_bad_which_lists_it_in_the_record_and_table() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    synth(&SynthOptions { out: root.clone(), classes: 2, train_per_class: 4, val_per_class: 3, width: 40, height: 40, seed: 2, quality: 90 }).unwrap();
    std::fs::write(root.join("val/class_001/notes.jpg"), "not a picture\n").unwrap();
    let enc = dir.path().join("enc.safetensors");
    bin().args(["init", "-c", concat!(env!("CARGO_MANIFEST_DIR"), "/configs/lmim_tiny.toml"), "-o"]).arg(&enc).assert().success();
    let out = dir.path().join("runs");
    let knn = |extra: &[&str]| {
        bin()
            .args(["eval", "--protocol", "knn", "--device", "cpu", "--quiet", "--no-cache", "--k", "1", "--headline-k", "1", "--json", "--name", "pico"])
            .arg("--checkpoint")
            .arg(&enc)
            .arg("--data")
            .arg(&root)
            .arg("--output")
            .arg(&out)
            .args(extra)
            .output()
            .unwrap()
    };
    let res = knn(&[]);
    assert_eq!(res.status.code(), Some(2), "{}", String::from_utf8_lossy(&res.stderr));
    assert!(String::from_utf8_lossy(&res.stderr).contains("notes.jpg"), "{}", String::from_utf8_lossy(&res.stderr));
    assert!(!out.join("results.csv").exists(), "a refused evaluation writes no row");

    let res = knn(&["--skip-bad"]);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let rec: serde_json::Value = serde_json::from_slice(&res.stdout).unwrap();
    let skipped = rec["details"]["skipped_eval"].as_array().unwrap();
    assert_eq!(skipped.len(), 1, "{}", rec["details"]);
    assert!(skipped[0].as_str().unwrap().ends_with("val/class_001/notes.jpg"));
    assert_eq!(rec["details"]["n_val"], 6, "the 6 readable val images are scored");
    let t = bin().args(["table", "--format", "markdown", "-o", "-"]).arg(&out).output().unwrap();
    let md = String::from_utf8_lossy(&t.stdout);
    assert!(md.contains("§") && md.contains("1 unreadable files of the evaluation split skipped"), "{md}");
}

/// A `counts.tsv` of a packed split that is a FIFO is refused by name (exit 2), not taken for an absent file.
#[test]
fn a_fifo_counts_file_of_shards_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    bin().args(["data", "synth", "--classes", "2", "--train-per-class", "4", "--val-per-class", "2", "--size", "16", "--out"]).arg(&data).assert().success();
    let packed = dir.path().join("packed");
    bin().args(["data", "pack", "--split", "val", "--data"]).arg(&data).arg("--out").arg(&packed).assert().success();
    let counts = packed.join("val/counts.tsv");
    assert!(counts.is_file());
    std::fs::remove_file(&counts).unwrap();
    assert!(std::process::Command::new("mkfifo").arg(&counts).status().unwrap().success());
    bin()
        .args(["data", "info", "--split", "val", "--rescan", "--data"])
        .arg(&packed)
        .timeout(std::time::Duration::from_secs(60))
        .assert()
        .code(2)
        .stderr(predicate::str::contains("counts.tsv: a named pipe (FIFO), not a regular file"));
}
