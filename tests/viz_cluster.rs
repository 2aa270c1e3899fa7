//! Clustering and t-SNE of `visualize`: nested cuts with stable labels, agreement with SciPy's
//! `linkage` + `fcluster(criterion="maxclust")`, t-SNE determinism, and the sin-cos position embedding path.
mod common;

use std::collections::HashMap;

use lmim_bench::data::decode::RgbImage;
use lmim_bench::model::pos_embed::PosEmbedKind;
use lmim_bench::model::{VisionTransformer, VitConfig};
use lmim_bench::viz::cluster::{self, is_refinement, same_partition, Linkage};
use lmim_bench::viz::tsne::{embed_2d, effective_perplexity, TsneOptions};
use lmim_bench::viz::{self, PosEmbedMode, VizOptions};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{nn, Device, Kind, Tensor};

/// `n` points in `dim` dimensions around `centers` random centres, L2-normalised as the pipeline does.
fn blobs(n: usize, dim: usize, centers: usize, spread: f32, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let c: Vec<f32> = (0..centers * dim).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let mut x = Vec::with_capacity(n * dim);
    for i in 0..n {
        let k = i % centers;
        for j in 0..dim {
            x.push(c[k * dim + j] + spread * rng.gen_range(-1.0f32..1.0));
        }
    }
    cluster::l2_normalize(&mut x, dim);
    x
}

fn cut(x: &[f32], dim: usize, method: Linkage, levels: &[usize]) -> Vec<Vec<u32>> {
    let d = cluster::linkage(x, dim, method).unwrap();
    cluster::cut_nested(&d, levels).unwrap()
}

#[test]
fn cuts_are_nested_and_labels_stay_with_the_larger_child() {
    let dim = 12;
    let x = blobs(150, dim, 6, 0.4, 1);
    for method in [Linkage::Ward, Linkage::Average, Linkage::Complete] {
        let levels: Vec<usize> = (1..=10).collect();
        let cuts = cut(&x, dim, method, &levels);
        for (k, labels) in levels.iter().zip(&cuts) {
            let distinct: std::collections::BTreeSet<u32> = labels.iter().copied().collect();
            assert_eq!(distinct, (0..*k as u32).collect(), "{method:?}: level {k} uses labels 0..{k}");
        }
        for w in cuts.windows(2) {
            let (coarse, fine) = (&w[0], &w[1]);
            let k = *coarse.iter().max().unwrap() as usize + 1;
            assert!(is_refinement(fine, coarse), "{method:?}: level {} is not nested in level {k}", k + 1);
            // Exactly one cluster splits; the new label is k, and it goes to the smaller part.
            let changed: Vec<usize> = (0..fine.len()).filter(|&i| fine[i] != coarse[i]).collect();
            assert!(!changed.is_empty());
            assert!(changed.iter().all(|&i| fine[i] == k as u32), "{method:?}: only the new cluster changes label");
            let parent = coarse[changed[0]];
            let kept = fine.iter().zip(coarse).filter(|(f, c)| **c == parent && **f == parent).count();
            assert!(kept >= changed.len(), "{method:?}: the parent's label went to the smaller child ({kept} < {})", changed.len());
        }
    }
    // Levels in any order come back in the order asked, equal to the sorted cut.
    let a = cut(&x, dim, Linkage::Ward, &[5, 3, 4]);
    let b = cut(&x, dim, Linkage::Ward, &[3, 4, 5]);
    assert_eq!((&a[0], &a[1], &a[2]), (&b[2], &b[0], &b[1]));
}

#[test]
fn more_clusters_than_points_is_an_option_error() {
    let x = blobs(6, 4, 2, 0.1, 2);
    let d = cluster::linkage(&x, 4, Linkage::Ward).unwrap();
    let err = cluster::cut_nested(&d, &[3, 7]).unwrap_err();
    assert!(err.to_string().contains("--levels"), "{err}");
    assert_eq!(err.exit_code(), 2);
    assert!(cluster::cut_nested(&d, &[0]).is_err());
    let singletons = &cluster::cut_nested(&d, &[6]).unwrap()[0];
    let distinct: std::collections::BTreeSet<u32> = singletons.iter().copied().collect();
    assert_eq!(distinct.len(), 6);
}

/// Runs tests/py/ref_cluster.py on the features and returns SciPy's labels per level.
fn scipy_labels(x: &[f32], n: usize, dim: usize, method: &str, levels: &[usize]) -> HashMap<String, Vec<u32>> {
    let dir = tempfile::tempdir().unwrap();
    let feats = dir.path().join("features.f32");
    let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(&feats, bytes).unwrap();
    let out = dir.path().join("labels.json");
    let lv = levels.iter().map(|k| k.to_string()).collect::<Vec<_>>().join(",");
    common::run_py(
        "ref_cluster.py",
        &[feats.to_str().unwrap(), &n.to_string(), &dim.to_string(), method, &lv, out.to_str().unwrap()],
    );
    serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap()
}

fn assert_matches_scipy(x: &[f32], dim: usize, levels: &[usize], what: &str) {
    let n = x.len() / dim;
    for (method, name) in [(Linkage::Ward, "ward"), (Linkage::Average, "average"), (Linkage::Complete, "complete")] {
        let ours = cut(x, dim, method, levels);
        let theirs = scipy_labels(x, n, dim, name, levels);
        for (k, labels) in levels.iter().zip(&ours) {
            let s = &theirs[&k.to_string()];
            assert!(same_partition(labels, s), "{what}, {name}, k={k}: partition differs from SciPy's\nours:  {labels:?}\nscipy: {s:?}");
        }
    }
}

#[test]
fn clustering_matches_scipy_on_synthetic_features() {
    assert_matches_scipy(&blobs(200, 16, 7, 0.5, 3), 16, &[2, 3, 4, 5, 8], "blobs");
    // Pure noise: many merges at similar heights, a harder case for the cut.
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let mut x: Vec<f32> = (0..120 * 8).map(|_| rng.gen_range(-1.0..1.0)).collect();
    cluster::l2_normalize(&mut x, 8);
    assert_matches_scipy(&x, 8, &[3, 4, 5], "noise");
}

/// A tiny ViT with Latent MIM's sin-cos position embedding, randomly initialised.
fn pico(kind: PosEmbedKind) -> (nn::VarStore, VisionTransformer) {
    tch::manual_seed(0);
    let mut cfg = VitConfig::from_arch("vit_pico_patch4_32").unwrap();
    cfg.pos_embed = kind;
    let vs = nn::VarStore::new(Device::Cpu);
    let m = VisionTransformer::new(&vs.root(), &cfg);
    (vs, m)
}

/// A square test picture: a disc and a bar on a gradient.
fn picture(size: u32) -> RgbImage {
    let mut img = RgbImage::new(size, size);
    let s = size as f32;
    for y in 0..size {
        for x in 0..size {
            let (fx, fy) = (x as f32 / s, y as f32 / s);
            let i = ((y * size + x) * 3) as usize;
            let disc = (fx - 0.35).powi(2) + (fy - 0.4).powi(2) < 0.04;
            let bar = fx > 0.65 && fx < 0.8;
            let px = if disc {
                [220, 40, 30]
            } else if bar {
                [30, 60, 200]
            } else {
                [(fx * 120.0) as u8 + 60, (fy * 120.0) as u8 + 80, 90]
            };
            img.data[i..i + 3].copy_from_slice(&px);
        }
    }
    img
}

#[test]
fn clustering_matches_scipy_on_model_features() {
    let (_vs, model) = pico(PosEmbedKind::Lmim);
    for size in [32u32, 64] {
        let opts = VizOptions { size: Some(size), ..Default::default() };
        let r = viz::resolve(&model, &opts).unwrap();
        let f = viz::patch_features(&model, Device::Cpu, &picture(size), &r).unwrap();
        assert_eq!(f.n, (size as usize / 4).pow(2));
        for row in f.data.chunks(f.dim) {
            let norm: f64 = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "features are L2-normalised");
        }
        assert_matches_scipy(&f.data, f.dim, &[3, 4, 5], &format!("vit_pico at {size} px ({})", r.pos_embed));
    }
}

#[test]
fn sincos_path_equals_the_model_at_the_trained_grid() {
    let (_vs, model) = pico(PosEmbedKind::Lmim);
    assert_eq!(viz::stored_sincos_kind(&model), Some(PosEmbedKind::Lmim));
    let (_vs2, mae) = pico(PosEmbedKind::Mae);
    assert_eq!(viz::stored_sincos_kind(&mae), Some(PosEmbedKind::Mae));
    let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    let a = viz::block_tokens(&model, &x, 3, Some(PosEmbedKind::Lmim));
    let b = viz::block_tokens(&model, &x, 3, None);
    assert!(common::max_abs(&a, &b) < 1e-5);

    // At another grid, auto recomputes Latent MIM's embedding and interpolates MAE's.
    let opts = VizOptions { size: Some(64), ..Default::default() };
    assert!(viz::resolve(&model, &opts).unwrap().pos_embed.starts_with("sincos"));
    assert!(viz::resolve(&mae, &opts).unwrap().pos_embed.starts_with("interpolate"));
    let forced = VizOptions { pos_embed: PosEmbedMode::Interpolate, ..opts.clone() };
    assert!(viz::resolve(&model, &forced).unwrap().pos_embed.starts_with("interpolate"));
    // A learned embedding cannot be recomputed.
    tch::no_grad(|| {
        let mut pe = model.pos_embed.shallow_clone();
        let _ = pe.normal_(0.0, 0.02);
    });
    let sincos = VizOptions { pos_embed: PosEmbedMode::Sincos, ..opts };
    let err = viz::resolve(&model, &sincos).unwrap_err();
    assert!(err.to_string().contains("--pos-embed"), "{err}");
}

#[test]
fn tsne_is_deterministic_for_a_seed_and_clamps_perplexity() {
    let dim = 10;
    let x = blobs(90, dim, 3, 0.3, 5);
    let d = cluster::condensed_euclidean(&x, dim);
    let opts = TsneOptions { epochs: 300, ..Default::default() };
    let (a, pa) = embed_2d(&d, 90, &opts).unwrap();
    let (b, _) = embed_2d(&d, 90, &opts).unwrap();
    let (c, _) = embed_2d(&d, 90, &TsneOptions { seed: 1, ..opts.clone() }).unwrap();
    assert_eq!(pa, 89.0 / 3.0);
    assert_eq!(a, b, "same seed, same embedding");
    assert_ne!(a, c, "another seed, another start");
    assert!(a.iter().all(|p| p[0].is_finite() && p[1].is_finite()));
    // The three blobs stay apart: each point's nearest embedded neighbour is from its own blob.
    let near = (0..90)
        .filter(|&i| {
            let j = (0..90)
                .filter(|&j| j != i)
                .min_by(|&p, &q| {
                    let dp = (a[i][0] - a[p][0]).powi(2) + (a[i][1] - a[p][1]).powi(2);
                    let dq = (a[i][0] - a[q][0]).powi(2) + (a[i][1] - a[q][1]).powi(2);
                    dp.total_cmp(&dq)
                })
                .unwrap();
            i % 3 == j % 3
        })
        .count();
    assert!(near >= 85, "only {near}/90 nearest neighbours from the same blob");

    // Few points: the perplexity is clamped to (n - 1) / 3 instead of panicking inside bhtsne.
    assert_eq!(effective_perplexity(30.0, 16), 5.0);
    let small = blobs(16, dim, 2, 0.3, 6);
    let (e, p) = embed_2d(&cluster::condensed_euclidean(&small, dim), 16, &opts).unwrap();
    assert_eq!((e.len(), p), (16, 5.0));
    assert!(embed_2d(&cluster::condensed_euclidean(&small[..3 * dim], dim), 3, &opts).is_err());
}
