//! `eval --protocol seg`: CAPI's frozen-patch segmentation probes, against tests/py/ref_seg.py, a reference written
//! from facebookresearch/capi's eval_segmentation.py (KNNClassifier, LogregClassifier with scikit-learn's
//! LogisticRegression in cuML's place, select_hparams, mIoU, accuracy) on a generated ADE20K-layout set and a
//! seeded timm ViT (224 px, patch 16):
//! - images and labels read as CAPI's transforms read them (PIL `convert("P")` + nearest, to the pixel);
//! - patch tokens after the final norm within 1e-5 of timm's `forward_features`;
//! - one-point grids: k-NN mIoU and accuracy equal to 1e-9 (cosine and L2 in f32, cosine in bf16 on every other
//!   training patch), the logistic regression's within 0.1
//!   point; a perturbed reference (torch.mode's tie rule replaced by the largest label) is caught;
//! - the grids on the same held-out split (the k-NN's whole grid, the C grid's five smallest values): the same
//!   chosen grid points, the k-NN's held-out scores to 1e-9;
//! - the command end to end (record, `table` columns, `check`), and bad input exiting 2 naming the file.
mod common;

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use lmim_bench::checkpoint::{self, load_vit};
use lmim_bench::data::ade20k::{self, SynthAdeOptions};
use lmim_bench::protocols::seg::{self, Classifier, Distance, Extracted, Extractor, KnnDtype, Prepared, SegConfig, SegFeature, Standardize, TrainSplit};
use predicates::str::contains;
use tch::{Device, Tensor};

fn bin() -> Command {
    Command::cargo_bin("lmim-bench").unwrap()
}

fn synth(out: &Path, train: usize, val: usize) -> PathBuf {
    let opts = SynthAdeOptions { out: out.to_path_buf(), train, val, classes: 6, width: 150, height: 110, seed: 4, quality: 90 };
    ade20k::synth_ade20k(&opts).unwrap();
    out.to_path_buf()
}

fn vit(dir: &Path) -> PathBuf {
    let p = dir.join("vit.safetensors");
    common::run_py("ref_seg.py", &["vit", p.to_str().unwrap()]);
    p
}

#[test]
fn images_and_labels_read_as_capi_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(&dir.path().join("ade"), 6, 3);
    // A palette (P) annotation and a low-depth one, beside the generated L ones.
    let set = ade20k::open_set(&data).unwrap();
    let (w, h, lab) = ade20k::read_label_png(&set.val[0].annotation).unwrap();
    let img = lmim_bench::data::davis::IndexedImage { width: w, height: h, indices: lab, palette: lmim_bench::data::davis::voc_palette() };
    std::fs::write(&set.val[0].annotation, lmim_bench::data::davis::encode_indexed_png(&img).unwrap()).unwrap();
    let out = dir.path().join("read.safetensors");
    // The reference resizes to 224 and to an odd size, where nearest's rounding matters.
    for res in [224u32, 97] {
        common::run_py("ref_seg.py", &["read", data.to_str().unwrap(), &res.to_string(), out.to_str().unwrap()]);
        let r = checkpoint::load(&out).unwrap();
        for (split, pairs) in [("training", &set.train), ("validation", &set.val)] {
            for (i, p) in pairs.iter().enumerate() {
                let ours = ade20k::read_label(&p.annotation, res, &[0, 255]).unwrap();
                let theirs = Vec::<u8>::try_from(r.get(&format!("{split}_label_{i}")).unwrap().contiguous().view([-1])).unwrap();
                let diff = ours.iter().zip(&theirs).filter(|(a, b)| a != b).count();
                assert_eq!(diff, 0, "{}: {diff} label pixels differ from PIL's at {res}", p.annotation.display());
                let x = Tensor::from_slice(&ade20k::read_image(&p.image, res).unwrap()).view([3, res as i64, res as i64]);
                let theirs = r.get(&format!("{split}_image_{i}")).unwrap();
                if cfg!(feature = "turbojpeg") {
                    // libjpeg-turbo decodes as Pillow's does: the same pixels, then Pillow's bicubic.
                    let err = common::max_abs(&x, theirs);
                    assert!(err < 1e-6, "{}: the image differs from torchvision's by {err}", p.image.display());
                } else {
                    // zune-jpeg's IDCT rounds differently from libjpeg-turbo's by a level here and there.
                    let err = (&x - theirs).abs().mean(tch::Kind::Double).double_value(&[]);
                    assert!(err < 0.02, "{}: the image differs from torchvision's by {err} on average", p.image.display());
                }
            }
        }
    }
}

fn extractor(model: &lmim_bench::model::vit::VisionTransformer, resolution: i64) -> Extractor<'_> {
    Extractor { model, resolution, feature: SegFeature::PatchNorm, ignore: vec![0, 255], batch: 8, device: Device::Cpu, amp: None }
}

#[test]
fn patch_tokens_match_timm() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(&dir.path().join("ade"), 4, 1);
    let ckpt = vit(dir.path());
    let out = dir.path().join("tokens.safetensors");
    common::run_py("ref_seg.py", &["features", data.to_str().unwrap(), ckpt.to_str().unwrap(), "4", out.to_str().unwrap()]);
    let r = checkpoint::load(&out).unwrap();
    let m = load_vit(&ckpt, None, Device::Cpu, 0).unwrap();
    let ex = extractor(&m.model, 224);
    let theirs = r.get("tokens").unwrap();
    let err = common::max_abs(&ex.tokens(r.get("images").unwrap()), theirs);
    assert!(err < 1e-5, "tokens differ from timm's forward_features by {err}");
    // Through the reader too: the rows are image-major, patches row-major.
    let set = ade20k::open_set(&data).unwrap();
    let e = ex.extract(&set.train, true, "training").unwrap();
    assert_eq!(e.features.size(), vec![4 * 196, 96]);
    assert_eq!(e.labels.size(), vec![4 * 196, 256]);
    let err = common::max_abs(&e.features, &theirs.reshape([-1, 96]));
    // Through the JPEG decoder: exact with libjpeg-turbo (Pillow's), not with zune-jpeg (its IDCT rounds otherwise).
    let bound = if cfg!(feature = "turbojpeg") { 1e-5 } else { 0.5 };
    assert!(err < bound, "extracted features differ from timm's by {err}");
}

/// The fixture's input size.
const RES: i64 = 112;

/// The features of a generated set (train 30, val 8 images), extracted once per test.
struct Fixture {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    data: PathBuf,
    ckpt: PathBuf,
    train: Extracted,
    val: Extracted,
}

fn fixture() -> Fixture {
    let t0 = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let data = synth(&dir.path().join("ade"), 30, 8);
    let ckpt = vit(dir.path());
    // At 112 px (7 x 7 patches of 16 x 16 pixels, the position embedding resampled as the command does), so that
    // the fits are quick; the features at 224 are compared with timm's above.
    let opts = checkpoint::LoadOptions { img_size: Some(RES), ..Default::default() };
    let m = checkpoint::load_vit_with(&ckpt, &opts, Device::Cpu, 0).unwrap();
    let set = ade20k::open_set(&data).unwrap();
    let ex = extractor(&m.model, RES);
    let train = ex.extract(&set.train, true, "training").unwrap();
    let val = ex.extract(&set.val, true, "validation").unwrap();
    let path = dir.path().to_path_buf();
    eprintln!("fixture: {:.1} s", t0.elapsed().as_secs_f64());
    Fixture { _dir: dir, dir: path, data, ckpt, train, val }
}

/// The reference's results on the fixture's features, one per `(cfg, split, tag)`, from one Python process (tag
/// `perturbed` swaps torch.mode's tie rule in the reference's k-NN vote).
fn reference(f: &Fixture, runs: &[(&SegConfig, &TrainSplit, &str)]) -> Vec<serde_json::Value> {
    let feats = f.dir.join("features.safetensors");
    if !feats.exists() {
        let t = [("train_x", &f.train.features), ("train_y", &f.train.labels), ("val_x", &f.val.features), ("val_y", &f.val.labels)];
        Tensor::write_safetensors(&t, &feats).unwrap();
    }
    let names = |v: &[Classifier]| v.iter().map(|c| if *c == Classifier::Knn { "knn" } else { "logreg" }).collect::<Vec<_>>();
    let mut args = vec!["classify".to_string(), feats.display().to_string()];
    let mut outs = Vec::new();
    for (cfg, split, tag) in runs {
        let c = serde_json::json!({
            "per_image": f.train.per_image, "ignore": cfg.ignore, "held": split.held, "rest": split.rest,
            "standardize": cfg.standardize == Standardize::Standard, "classifiers": names(&cfg.classifiers),
            "knn_chunk": cfg.knn_chunk, "train_subsample": cfg.train_subsample,
            "knn_dtype": if cfg.knn_dtype == KnnDtype::Bf16 { "bfloat16" } else { "float32" },
            "knn_k": cfg.knn_k, "knn_distance": cfg.knn_distance.iter().map(|d| d.name()).collect::<Vec<_>>(),
            "logreg_c": cfg.logreg_c, "logreg_max_iter": cfg.logreg_max_iter, "logreg_tol": cfg.logreg_tol,
            "perturb": *tag == "perturbed",
        });
        let cfg_path = f.dir.join(format!("cfg-{tag}.json"));
        let out = f.dir.join(format!("ref-{tag}.json"));
        std::fs::write(&cfg_path, c.to_string()).unwrap();
        args.extend([cfg_path.display().to_string(), out.display().to_string()]);
        outs.push(out);
    }
    let t0 = std::time::Instant::now();
    common::run_py("ref_seg.py", &args.iter().map(String::as_str).collect::<Vec<_>>());
    eprintln!("reference: {:.1} s", t0.elapsed().as_secs_f64());
    outs.iter().map(|o| serde_json::from_str(&std::fs::read_to_string(o).unwrap()).unwrap()).collect()
}

fn num(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn one_point_grids_equal_capis_scores() {
    let f = fixture();
    let split = TrainSplit::all(30);
    // knn_chunk below the bank size: the chunked search and its merge are exercised.
    let knn_only = |k: i64, d: Distance| SegConfig { classifiers: vec![Classifier::Knn], knn_k: vec![k], knn_distance: vec![d], knn_chunk: 2000, ..Default::default() };
    let both = SegConfig { classifiers: vec![Classifier::Knn, Classifier::Logreg], logreg_c: vec![1.0], ..knn_only(10, Distance::Cosine) };
    let l2 = knn_only(3, Distance::L2);
    let perturbed = knn_only(10, Distance::Cosine);
    // CAPI's ADE20K config searches in bfloat16 (with every other training patch, here, as train_set_subsampling).
    let bf16 = SegConfig { knn_dtype: KnnDtype::Bf16, train_subsample: 2, ..knn_only(10, Distance::Cosine) };
    // The bank on the host in 7-row chunks, each copied over for its search: the same neighbours.
    let host = SegConfig { knn_bank: seg::BankPlace::Host, knn_chunk: 7, ..knn_only(10, Distance::Cosine) };
    let refs = reference(&f, &[(&both, &split, "cosine"), (&l2, &split, "l2"), (&perturbed, &split, "perturbed"), (&bf16, &split, "bf16")]);
    let data = Prepared::new(&f.train, &f.val, &split, Standardize::Standard);
    for (cfg, r) in [(&both, &refs[0]), (&l2, &refs[1]), (&bf16, &refs[3]), (&host, &refs[0])] {
        let knn = seg::evaluate(cfg, Classifier::Knn, &data, Device::Cpu).unwrap();
        let (m, a) = (num(&r["knn"]["miou"]), num(&r["knn"]["acc"]));
        eprintln!("k-NN {} {:?}: mIoU {:.6} vs {m:.6}, accuracy {:.6} vs {a:.6}", knn.chosen, cfg.knn_dtype, knn.scores.miou, knn.scores.accuracy);
        assert!((knn.scores.miou - m).abs() < 1e-9, "k-NN mIoU {} vs CAPI's {m}", knn.scores.miou);
        assert!((knn.scores.accuracy - a).abs() < 1e-9, "k-NN accuracy {} vs CAPI's {a}", knn.scores.accuracy);
        for (c, v) in &knn.scores.per_class {
            assert!((v - num(&r["knn"]["per_class"][c.to_string()])).abs() < 1e-9, "class {c}");
        }
        assert_eq!(knn.scores.per_class.len(), r["knn"]["per_class"].as_object().unwrap().len());
        if cfg.knn_bank == seg::BankPlace::Host {
            let rep = &knn.fit["search"];
            assert_eq!((rep["chunks_on_device"].as_u64(), rep["chunks_on_host"].as_u64()), (Some(0), rep["chunks"].as_u64()), "{rep}");
            assert!(rep["chunks"].as_u64().unwrap() > 100, "{rep}");
        }
        if cfg.classifiers.contains(&Classifier::Logreg) {
            // The perturbed reference (the largest label wins a tie of the vote) is told apart.
            let gap = (knn.scores.miou - num(&refs[2]["knn"]["miou"])).abs();
            eprintln!("perturbed reference: k-NN mIoU off by {gap:.2e}");
            assert!(gap > 1e-9, "a reference with another tie rule gives the same mIoU: the comparison cannot fail");
            let lr = seg::evaluate(cfg, Classifier::Logreg, &data, Device::Cpu).unwrap();
            let (m, a) = (num(&r["logreg"]["miou"]), num(&r["logreg"]["acc"]));
            eprintln!("logreg C=1 ({:.1} s): mIoU {:.6} vs {m:.6}, accuracy {:.6} vs {a:.6}", lr.seconds, lr.scores.miou, lr.scores.accuracy);
            assert!((100.0 * (lr.scores.miou - m)).abs() <= 0.1, "logistic regression mIoU {} vs CAPI's {m}", lr.scores.miou);
            assert!((100.0 * (lr.scores.accuracy - a)).abs() <= 0.1, "logistic regression accuracy {} vs CAPI's {a}", lr.scores.accuracy);
            // scipy's history of 10 corrections takes another path to the same optimum.
            let lr10 = seg::evaluate(&SegConfig { logreg_history: 10, ..cfg.clone() }, Classifier::Logreg, &data, Device::Cpu).unwrap();
            assert!((100.0 * (lr10.scores.miou - m)).abs() <= 0.1, "history 10: mIoU {} vs CAPI's {m}", lr10.scores.miou);
        }
    }
}

#[test]
fn grids_choose_capis_points_on_the_same_split() {
    let f = fixture();
    // The k-NN's whole grid; the first five points of the C grid (the three largest C run scikit-learn's L-BFGS to
    // its 1000 iterations, minutes on two cores, and score below these on this set).
    let c_grid = seg::default_c_grid()[..5].to_vec();
    let cfg = SegConfig { knn_chunk: 2000, logreg_c: c_grid, ..Default::default() };
    let split = TrainSplit::seeded(30, cfg.holdout, 0).unwrap();
    assert_eq!(split.held.len(), 3);
    let data = Prepared::new(&f.train, &f.val, &split, cfg.standardize);
    let r = reference(&f, &[(&cfg, &split, "grid")]).remove(0);
    let knn = seg::evaluate(&cfg, Classifier::Knn, &data, Device::Cpu).unwrap();
    let chosen = &r["knn"]["chosen"];
    assert_eq!(knn.chosen, format!("num_neighbors={}_distance={}", chosen["num_neighbors"], chosen["distance"].as_str().unwrap()));
    for (point, score) in &knn.grid {
        let theirs = 100.0 * num(&r["knn"]["grid"][point]);
        assert!((score - theirs).abs() < 1e-7, "{point}: held-out mIoU {score} vs CAPI's {theirs}");
    }
    assert!((knn.scores.miou - num(&r["knn"]["miou"])).abs() < 1e-9);
    let lr = seg::evaluate(&cfg, Classifier::Logreg, &data, Device::Cpu).unwrap();
    let c_theirs = num(&r["logreg"]["chosen"]["C"]);
    eprintln!("seconds: k-NN {:.1}, logreg {:.1}", knn.seconds, lr.seconds);
    eprintln!("k-NN chose {} ({:.4}), logreg chose {} vs C={c_theirs}; held-out {:?}", knn.chosen, knn.scores.miou, lr.chosen, lr.grid);
    assert_eq!(lr.chosen, format!("C={c_theirs}"), "the logistic regression's grid point differs from CAPI's");
    assert!((100.0 * (lr.scores.miou - num(&r["logreg"]["miou"]))).abs() <= 0.1);
}

#[test]
fn the_command_writes_a_record_the_table_shows() {
    let f = fixture();
    let out = f.dir.join("runs");
    let assert = bin()
        .args(["eval", "--protocol", "seg", "--device", "cpu", "--quiet", "--json", "--name", "tiny", "knn_k=10", "knn_distance=cosine", "logreg_c=1.0", "knn_chunk=2000", "resolution=112"])
        .arg("--checkpoint")
        .arg(&f.ckpt)
        .arg("--data")
        .arg(f.data.join("ADEChallengeData2016"))
        .arg("--output")
        .arg(&out)
        .assert()
        .success();
    let rec: serde_json::Value = serde_json::from_slice(&assert.get_output().stdout).unwrap();
    assert_eq!(rec["protocol"], "seg");
    assert_eq!(rec["headline"], "miou_knn");
    assert!(rec["protocol_version"].as_str().unwrap().starts_with("1+"));
    assert_eq!(rec["details"]["split"]["held_out_images"].as_array().unwrap().len(), 0);
    // The library on the same features gives the record's numbers.
    let cfg = SegConfig { knn_k: vec![10], knn_distance: vec![Distance::Cosine], logreg_c: vec![1.0], knn_chunk: 2000, ..Default::default() };
    let data = Prepared::new(&f.train, &f.val, &TrainSplit::all(30), Standardize::Standard);
    let knn = seg::evaluate(&cfg, Classifier::Knn, &data, Device::Cpu).unwrap();
    let miou = num(&rec["metrics"]["miou_knn"]);
    assert!((miou - 100.0 * knn.scores.miou).abs() < 1e-9);
    let lr = num(&rec["metrics"]["miou_logreg"]);
    for key in ["acc_knn", "acc_logreg"] {
        assert!(num(&rec["metrics"][key]) > 0.0);
    }
    bin().args(["table"]).arg(&out).assert().success().stdout(contains("ADE20K k-NN")).stdout(contains("ADE20K LR")).stdout(contains(format!("{miou:.2}"))).stdout(contains(format!("{lr:.2}")));
    let golden = f.dir.join("golden.toml");
    let gate = |v: f64, metric: &str| format!("version = \"1\"\n[[expect]]\nmodel = \"tiny\"\nprotocol = \"seg\"\nmetric = \"{metric}\"\nvalue = {v:.4}\ntolerance = 0.01\n");
    std::fs::write(&golden, gate(lr + 1.0, "miou_logreg")).unwrap();
    bin().args(["check"]).arg(&out).arg("--reference").arg(&golden).assert().code(1);
    std::fs::write(&golden, gate(miou, "miou_knn") + &gate(lr, "miou_logreg").replace("version = \"1\"\n", "")).unwrap();
    bin().args(["check"]).arg(&out).arg("--reference").arg(&golden).assert().success();
}

fn eval_fails(data: &Path, ckpt: &Path, out: &Path, names: &str) {
    let args = ["--protocol", "seg", "--device", "cpu", "--quiet", "knn_k=1", "knn_distance=L2", "classifiers=knn", "resolution=112"];
    common::eval_fails(&args, ckpt, data, out, names, |_| false);
}

#[test]
fn bad_input_exits_2_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = vit(dir.path());
    let base = synth(&dir.path().join("base"), 3, 2);
    let copy = |name: &str| {
        let to = dir.path().join(name);
        assert!(std::process::Command::new("cp").arg("-r").arg(&base).arg(&to).status().unwrap().success());
        to.join("ADEChallengeData2016")
    };
    let out = dir.path().join("runs");

    let d = copy("no_annotation");
    std::fs::remove_file(d.join("annotations/training/ADE_training_00000002.png")).unwrap();
    eval_fails(&d, &ckpt, &out, "ADE_training_00000002.jpg");

    let d = copy("bad_png");
    std::fs::write(d.join("annotations/validation/ADE_validation_00000001.png"), b"not a png").unwrap();
    eval_fails(&d, &ckpt, &out, "ADE_validation_00000001.png");

    let d = copy("label_151");
    let p = d.join("annotations/training/ADE_training_00000003.png");
    let (w, h, mut lab) = ade20k::read_label_png(&p).unwrap();
    lab[5] = 151;
    std::fs::write(&p, ade20k::encode_l_png(&lab, w, h).unwrap()).unwrap();
    eval_fails(&d, &ckpt, &out, "ADE_training_00000003.png");

    let d = copy("empty");
    for e in std::fs::read_dir(d.join("images/validation")).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    // --data may name the tree's parent, as CAPI's root.
    eval_fails(d.parent().unwrap(), &ckpt, &out, "images/validation");

    let d = copy("not_a_tree");
    std::fs::remove_dir_all(d.join("annotations")).unwrap();
    eval_fails(&d, &ckpt, &out, "not an ADE20K tree");

    // Too much for the memory this process may use: the size check names train_subsample before any allocation.
    let cfg = SegConfig::default();
    let err = seg::check_fit_memory(&cfg, Classifier::Knn, (1 << 42, 2000), 768, 256, 151).unwrap_err();
    assert!(err.to_string().contains("train_subsample"), "{err}");
    assert!(seg::check_fit_memory(&SegConfig { train_subsample: 1 << 40, ..cfg }, Classifier::Knn, (1 << 42, 2000), 768, 256, 151).is_ok());
}

#[test]
fn synth_ade20k_writes_the_layout_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ade");
    let run = || bin().args(["data", "synth-ade20k", "--train", "3", "--val", "2", "--classes", "4", "--size", "40x30", "--out"]).arg(&out).assert().success();
    run().stdout(contains("written (training 3 images, validation 2, 4 classes"));
    run().stdout(contains("up to date"));
    let set = ade20k::open_set(&out).unwrap();
    assert_eq!((set.train.len(), set.val.len()), (3, 2));
    let mut seen = [false; 256];
    for p in set.train.iter().chain(&set.val) {
        let bytes = std::fs::read(&p.annotation).unwrap();
        let info = png::Decoder::new(std::io::Cursor::new(&bytes[..])).read_info().unwrap().info().clone();
        assert_eq!((info.color_type, info.bit_depth), (png::ColorType::Grayscale, png::BitDepth::Eight), "L-mode labels");
        let (w, h, lab) = ade20k::read_label_png(&p.annotation).unwrap();
        assert_eq!(image::image_dimensions(&p.image).unwrap(), (w as u32, h as u32));
        lab.iter().for_each(|&v| seen[v as usize] = true);
    }
    assert!(seen[0], "an unlabeled band");
    assert!(seen[5..].iter().all(|s| !s), "labels within 0..=4");
    assert!(seen[1..5].iter().filter(|s| **s).count() >= 2, "several classes");
}

/// `cargo test --test seg -- --ignored bench --nocapture`: the CPU time of lmim-bench's k-NN (k = 10, cosine) and
/// logistic regression (C = 1), fit and predict, beside CAPI's classes (scikit-learn for cuML) on the same clustered
/// features, at `LMIM_SEG_BENCH` shapes (`n_train:n_val:dim:classes,...`). The numbers of benchmarks/seg.md.
#[test]
#[ignore]
fn bench_against_capis_classes() {
    let shapes = std::env::var("LMIM_SEG_BENCH").unwrap_or_else(|_| "20000:4000:384:20,60000:8000:768:50".into());
    let dir = tempfile::tempdir().unwrap();
    for shape in shapes.split(',') {
        let v: Vec<&str> = shape.split(':').collect();
        let file = dir.path().join("bench.safetensors");
        common::run_py("ref_seg.py", &["bench-data", v[0], v[1], v[2], v[3], file.to_str().unwrap()]);
        let t = checkpoint::load(&file).unwrap();
        let (tx, ty, vx, vy) = (t.get("train_x").unwrap(), t.get("train_y").unwrap(), t.get("val_x").unwrap(), t.get("val_y").unwrap());
        let cfg = SegConfig { knn_k: vec![10], knn_distance: vec![Distance::Cosine], logreg_c: vec![1.0], ..Default::default() };
        let data = Prepared { train_x: tx.shallow_clone(), train_y: ty.shallow_clone(), rest_rows: tx.size()[0], val_x: vx.shallow_clone(), val_y: vy.shallow_clone(), pixels: 256 };
        let knn = seg::evaluate(&cfg, Classifier::Knn, &data, Device::Cpu).unwrap();
        let lr = seg::evaluate(&cfg, Classifier::Logreg, &data, Device::Cpu).unwrap();
        let lr10 = seg::evaluate(&SegConfig { logreg_history: 10, ..cfg.clone() }, Classifier::Logreg, &data, Device::Cpu).unwrap();
        let out = dir.path().join("bench.json");
        common::run_py("ref_seg.py", &["bench", file.to_str().unwrap(), out.to_str().unwrap()]);
        let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        println!(
            "{shape}: k-NN {:.2} s (mIoU {:.4}) vs CAPI's {:.2} s ({:.4}); logreg {:.2} s ({:.4}, {} iterations; history 10: {:.2} s, {:.4}, {} iterations) vs CAPI's with scikit-learn {:.2} s ({:.4}); torch threads {}",
            knn.seconds, knn.scores.miou, num(&r["knn"]["seconds"]), num(&r["knn"]["miou"]),
            lr.seconds, lr.scores.miou, lr.fit["solver"]["fit"]["iterations"], lr10.seconds, lr10.scores.miou, lr10.fit["solver"]["fit"]["iterations"],
            num(&r["logreg"]["seconds"]), num(&r["logreg"]["miou"]), r["threads"]
        );
    }
}
