//! DINO weighted k-NN and the leave-one-out 1-NN against tests/py/ref_knn.py (written from the formulas): the
//! same correct counts for several k and T, with exact ties and duplicates, for any chunking; the same through the
//! CLI on feature files; and hand-made cases for the tie rules, top-5 with k < 5 and the self-exclusion.
mod common;

use std::path::Path;

use assert_cmd::Command;
use lmim_bench::checkpoint;
use lmim_bench::protocols::knn::{faiss_available, nn_loo, weighted_knn, Backend, KnnParams, SearchConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

/// Unit-norm (times a power of two) vectors whose entries are multiples of 1/4: every norm and dot product is
/// exact in f32, so equal similarities are real ties in any implementation. Few dimensions give many ties.
fn dyadic(rng: &mut ChaCha8Rng, n: usize, d: usize, classes: i64) -> (Vec<f32>, Vec<i64>) {
    let patterns: [&[f32]; 3] = [&[1.0], &[0.5, 0.5, 0.5, 0.5], &[0.75, 0.5, 0.25, 0.25, 0.25]];
    let mut x = vec![0f32; n * d];
    let mut y = Vec::with_capacity(n);
    for i in 0..n {
        let p = patterns[rng.gen_range(0..3)];
        let mut dims: Vec<usize> = (0..d).collect();
        for j in 0..p.len() {
            let s = rng.gen_range(j..d);
            dims.swap(j, s);
        }
        let scale = [0.5f32, 1.0, 2.0, 4.0][rng.gen_range(0..4)];
        for (j, &v) in p.iter().enumerate() {
            let sign = if rng.gen_bool(0.5) { -1.0 } else { 1.0 };
            x[i * d + dims[j]] = sign * v * scale;
        }
        let signal = dims[0] as i64 % classes;
        y.push(if rng.gen_bool(0.6) { signal } else { rng.gen_range(0..classes) });
    }
    (x, y)
}

/// Copies some rows of `src` into `dst` (exact duplicates), with the source label or a random one.
fn duplicate(rng: &mut ChaCha8Rng, (dst, dl): (&mut [f32], &mut [i64]), (src, sl): (&[f32], &[i64]), d: usize, frac: f64, classes: i64) {
    let (n_dst, n_src) = (dl.len(), sl.len());
    for i in 0..n_dst {
        if rng.gen_bool(frac) {
            let s = rng.gen_range(0..n_src);
            dst[i * d..(i + 1) * d].copy_from_slice(&src[s * d..(s + 1) * d]);
            dl[i] = if rng.gen_bool(0.5) { sl[s] } else { rng.gen_range(0..classes) };
        }
    }
}

struct Case {
    train: Tensor,
    train_labels: Tensor,
    val: Tensor,
    val_labels: Tensor,
    classes: i64,
}

fn dyadic_case(seed: u64) -> Case {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (d, classes) = (8usize, 7i64);
    let (mut tr, mut tl) = dyadic(&mut rng, 600, d, classes);
    let (mut va, mut vl) = dyadic(&mut rng, 250, d, classes);
    let (tr0, tl0) = (tr.clone(), tl.clone());
    duplicate(&mut rng, (&mut tr, &mut tl), (&tr0, &tl0), d, 0.1, classes);
    duplicate(&mut rng, (&mut va, &mut vl), (&tr, &tl), d, 0.3, classes);
    let (va0, vl0) = (va.clone(), vl.clone());
    duplicate(&mut rng, (&mut va, &mut vl), (&va0, &vl0), d, 0.1, classes);
    Case {
        train: Tensor::from_slice(&tr).view([-1, d as i64]),
        train_labels: Tensor::from_slice(&tl),
        val: Tensor::from_slice(&va).view([-1, d as i64]),
        val_labels: Tensor::from_slice(&vl),
        classes,
    }
}

/// Gaussian class clusters in f64: no ties, and f64 keeps both implementations' rounding far below the gaps.
fn gaussian_case(seed: i64) -> Case {
    tch::manual_seed(seed);
    let (d, classes) = (24i64, 10i64);
    let opts = (Kind::Double, Device::Cpu);
    let means = Tensor::randn([classes, d], opts);
    let tl = Tensor::randint(classes, [1500], (Kind::Int64, Device::Cpu));
    let vl = Tensor::randint(classes, [300], (Kind::Int64, Device::Cpu));
    let train = means.index_select(0, &tl) + Tensor::randn([1500, d], opts) * 1.5;
    let val = means.index_select(0, &vl) + Tensor::randn([300, d], opts) * 1.5;
    Case { train, train_labels: tl, val, val_labels: vl, classes }
}

struct Reference {
    top1: Vec<Vec<i64>>,
    top5: Vec<Vec<i64>>,
    loo: i64,
}

fn reference(dir: &Path, name: &str, c: &Case, ks: &[i64], temps: &[f64]) -> Reference {
    let inp = dir.join(format!("{name}_in.safetensors"));
    let out = dir.join(format!("{name}_out.safetensors"));
    let cfg = serde_json::json!({ "ks": ks, "temperatures": temps, "num_classes": c.classes });
    let meta = [("config".to_string(), cfg.to_string())].into_iter().collect();
    let t = |n: &str, x: &Tensor| (n.to_string(), x.shallow_clone());
    checkpoint::save(&inp, &[t("train", &c.train), t("train_labels", &c.train_labels), t("val", &c.val), t("val_labels", &c.val_labels)], &meta).unwrap();
    common::run_py("ref_knn.py", &["knn", inp.to_str().unwrap(), out.to_str().unwrap()]);
    let r = checkpoint::load(&out).unwrap();
    let rows = |n: &str| {
        let x = r.get(n).unwrap();
        (0..temps.len() as i64).map(|a| Vec::<i64>::try_from(&x.get(a)).unwrap()).collect::<Vec<_>>()
    };
    Reference { top1: rows("top1"), top5: rows("top5"), loo: r.get("loo").unwrap().int64_value(&[0]) }
}

/// Both back-ends (faiss where it is built in), several chunkings.
fn chunkings() -> Vec<SearchConfig> {
    let cpu = Device::Cpu;
    let mut v = vec![
        SearchConfig::with_backend(cpu, 10_000, Backend::Torch),
        SearchConfig { query_chunk: 37, bank_chunk: 50, device: cpu, backend: Backend::Torch },
        SearchConfig { query_chunk: 7, bank_chunk: 13, device: cpu, backend: Backend::Torch },
    ];
    if faiss_available() {
        v.push(SearchConfig::with_backend(cpu, 10_000, Backend::Faiss));
        v.push(SearchConfig { query_chunk: 7, bank_chunk: 13, device: cpu, backend: Backend::Faiss });
    }
    v
}

fn assert_matches(c: &Case, r: &Reference, ks: &[i64], temps: &[f64], what: &str) {
    for search in chunkings() {
        for (a, &t) in temps.iter().enumerate() {
            let res = weighted_knn(&c.train, &c.train_labels, &c.val, &c.val_labels, c.classes, &KnnParams { ks, temperature: t }, &search).unwrap();
            for (j, s) in res.scores.iter().enumerate() {
                assert_eq!(s.k, ks[j]);
                let ctx = format!("{what}: T={t} k={} chunks {}x{} {}", s.k, search.query_chunk, search.bank_chunk, search.backend_name());
                assert_eq!(s.correct1, r.top1[a][j], "top-1 {ctx}");
                assert_eq!(s.correct5, r.top5[a][j], "top-5 {ctx}");
            }
        }
        let loo = nn_loo(&c.val, &c.val_labels, c.classes, &search).unwrap();
        assert_eq!(loo.correct, r.loo, "{what}: LOO 1-NN, chunks {}x{} {}", search.query_chunk, search.bank_chunk, search.backend_name());
    }
}

#[test]
fn knn_and_loo_match_reference_with_ties_and_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let c = dyadic_case(3);
    // Unsorted, a k of 1 and 3 (< 5), and a k above the bank size (600).
    let ks = [20, 1, 3, 5, 10, 200, 1000];
    let temps = [0.07, 0.5, 1.0];
    let r = reference(dir.path(), "dyadic", &c, &ks, &temps);
    assert_matches(&c, &r, &ks, &temps, "dyadic f32");
    // The ties really are there: some val rows have several train rows at the same top similarity.
    let sims = lmim_bench::protocols::knn::l2_normalize(&c.val).mm(&lmim_bench::protocols::knn::l2_normalize(&c.train).tr());
    let top2 = sims.topk(2, 1, true, true).0;
    let tied = top2.select(1, 0).eq_tensor(&top2.select(1, 1)).sum(Kind::Int64).int64_value(&[]);
    assert!(tied > 20, "only {tied} rows with a tie at the top");
}

#[test]
fn knn_and_loo_match_reference_on_gaussian_features() {
    let dir = tempfile::tempdir().unwrap();
    let c = gaussian_case(5);
    let ks = [1, 5, 20, 100];
    let temps = [0.07, 0.2];
    let r = reference(dir.path(), "gauss", &c, &ks, &temps);
    assert_matches(&c, &r, &ks, &temps, "gaussian f64");
    // There is signal, so the numbers say something.
    assert!(r.top1[0][2] as f64 / 300.0 > 0.5);
}

fn save_features(path: &Path, x: &Tensor, y: &Tensor, classes: Option<i64>) {
    let mut meta = std::collections::BTreeMap::new();
    if let Some(c) = classes {
        meta.insert("num_classes".to_string(), c.to_string());
    }
    checkpoint::save(path, &[("features".into(), x.to_kind(Kind::Float)), ("labels".into(), y.shallow_clone())], &meta).unwrap();
}

fn bin() -> Command {
    Command::cargo_bin("lmim-bench").unwrap()
}

#[test]
fn cli_eval_on_feature_files_matches_reference() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let c = dyadic_case(11);
    let ks = [1, 5, 20];
    let r = reference(d, "cli", &c, &ks, &[0.5]);
    save_features(&d.join("train.st"), &c.train, &c.train_labels, Some(c.classes));
    save_features(&d.join("val.st"), &c.val, &c.val_labels, Some(c.classes));
    let out = bin()
        .args(["eval", "--protocol", "knn", "--device", "cpu", "--k", "1,5,20", "--temperature", "0.5", "--headline-k", "5", "--json", "--quiet"])
        .arg("--train-features")
        .arg(d.join("train.st"))
        .arg("--val-features")
        .arg(d.join("val.st"))
        .arg("--output")
        .arg(d.join("runs"))
        .assert()
        .success();
    let rec: serde_json::Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
    let n = c.val_labels.size()[0] as f64;
    for (j, k) in ks.iter().enumerate() {
        let got1 = rec["metrics"][format!("top1@k{k}")].as_f64().unwrap();
        let got5 = rec["metrics"][format!("top5@k{k}")].as_f64().unwrap();
        assert!((got1 - 100.0 * r.top1[0][j] as f64 / n).abs() < 0.01, "top1@k{k}: {got1}");
        assert!((got5 - 100.0 * r.top5[0][j] as f64 / n).abs() < 0.01, "top5@k{k}: {got5}");
    }
    assert_eq!(rec["metrics"]["top1"], rec["metrics"]["top1@k5"]);
    assert_eq!(rec["protocol"], "knn");
    // Changed settings are part of the version, so the table never mixes them with the standard protocol.
    let version = rec["protocol_version"].as_str().unwrap();
    assert!(version.starts_with("1+") && version.contains("T=0.5") && version.contains("headline_k=5"), "{version}");
    assert!(d.join("runs/results.csv").exists());

    let out = bin()
        .args(["eval", "--protocol", "nn-loo", "--device", "cpu", "--json", "--quiet"])
        .arg("--val-features")
        .arg(d.join("val.st"))
        .arg("--output")
        .arg(d.join("runs"))
        .assert()
        .success();
    let rec: serde_json::Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
    assert_eq!(rec["protocol"], "nn-loo");
    let got = rec["metrics"]["top1"].as_f64().unwrap();
    assert!((got - 100.0 * r.loo as f64 / n).abs() < 0.01, "nn-loo {got}");
}

fn t2(rows: &[&[f32]]) -> Tensor {
    let d = rows[0].len() as i64;
    let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_slice(&flat).view([-1, d])
}

#[test]
fn tie_rules_top5_with_small_k_and_self_exclusion() {
    for backend in [Backend::Torch, Backend::Faiss].into_iter().filter(|&b| b == Backend::Torch || faiss_available()) {
        tie_rules(&SearchConfig { query_chunk: 2, bank_chunk: 2, device: Device::Cpu, backend });
    }
}

fn tie_rules(cpu: &SearchConfig) {
    // Bank rows 0..4 are equally similar to the query; the lowest indices win the two places.
    let bank = t2(&[&[1.0, 0.0], &[1.0, 0.0], &[1.0, 0.0], &[1.0, 0.0], &[0.0, 1.0]]);
    let bl = Tensor::from_slice(&[3i64, 1, 2, 2, 0]);
    let q = t2(&[&[1.0, 0.0]]);
    let r = weighted_knn(&bank, &bl, &q, &Tensor::from_slice(&[3i64]), 4, &KnnParams { ks: &[1, 2], temperature: 0.07 }, cpu).unwrap();
    // k=1: the neighbour is row 0 (class 3). k=2: rows 0 and 1 tie in votes; class 1 < 3 wins the tie.
    assert_eq!((r.scores[0].correct1, r.scores[1].correct1), (1, 0));
    // Top-5 with k=2: only classes 1 and 3 got votes, and 3 is among them.
    assert_eq!(r.scores[1].correct5, 1);
    let r = weighted_knn(&bank, &bl, &q, &Tensor::from_slice(&[0i64]), 4, &KnnParams { ks: &[2], temperature: 0.07 }, cpu).unwrap();
    // k = 2: DINO's top-5 is over min(5, k) = 2 classes, the two voted ones; class 0 is not among them.
    assert_eq!(r.scores[0].correct5, 0);
    // k = 5 with only classes 1 and 3 voted: DINO ranks every class (unvoted ones at 0, by index), so classes 0 and
    // 2 fill places 3 and 4 of the top-5 (facebookresearch/dino eval_knn.py sorts all class probabilities).
    let row: &[f32] = &[1.0, 0.0];
    let bank6 = t2(&[row; 6]);
    let bl6 = Tensor::from_slice(&[3i64, 1, 3, 1, 3, 1]);
    for (truth, hit) in [(0i64, 1), (2, 1), (3, 1)] {
        let r = weighted_knn(&bank6, &bl6, &q, &Tensor::from_slice(&[truth]), 4, &KnnParams { ks: &[5], temperature: 0.07 }, cpu).unwrap();
        assert_eq!(r.scores[0].correct5, hit, "truth {truth}");
    }
    // 8 classes, 2 voted: the top-5 holds 1, 3 and the unvoted 0, 2, 4, so class 5 is out.
    let r = weighted_knn(&bank6, &bl6, &q, &Tensor::from_slice(&[5i64]), 8, &KnnParams { ks: &[5], temperature: 0.07 }, cpu).unwrap();
    assert_eq!(r.scores[0].correct5, 0);

    // LOO: the point itself never counts; its duplicate (another index) does.
    let f = t2(&[&[1.0, 0.0], &[0.0, 1.0], &[0.0, 1.0], &[0.7, 0.7]]);
    let l = Tensor::from_slice(&[0i64, 1, 1, 0]);
    let r = nn_loo(&f, &l, 2, cpu).unwrap();
    // 0 -> 3, 1 -> 2, 2 -> 1 (exact duplicates), 3 -> 0 (rows 0, 1, 2 tie at cos 0.707; the lowest index wins).
    assert_eq!((r.correct, r.n), (4, 4));
    let l = Tensor::from_slice(&[0i64, 1, 0, 1]);
    // 1 -> 2 (label 0, wrong for 1), 2 -> 1 (wrong), 3 -> 0 (label 0, wrong for 1), 0 -> 3 (wrong).
    assert_eq!(nn_loo(&f, &l, 2, cpu).unwrap().correct, 0);
}

#[test]
fn bad_features_are_data_errors() {
    let cpu = SearchConfig::auto(Device::Cpu, 10);
    let x = Tensor::from_slice(&[1f32, f32::NAN, 0.0, 1.0]).view([2, 2]);
    let y = Tensor::from_slice(&[0i64, 1]);
    let e = weighted_knn(&x, &y, &x, &y, 2, &KnnParams { ks: &[1], temperature: 0.07 }, &cpu).unwrap_err();
    assert!(e.to_string().contains("NaN"), "{e}");
    let ok = Tensor::from_slice(&[1f32, 0.0, 0.0, 1.0]).view([2, 2]);
    let e = weighted_knn(&ok, &Tensor::from_slice(&[0i64, 5]), &ok, &y, 2, &KnnParams { ks: &[1], temperature: 0.07 }, &cpu).unwrap_err();
    assert!(e.to_string().contains("outside 0..2"), "{e}");
    assert_eq!(e.exit_code(), 2);
}
