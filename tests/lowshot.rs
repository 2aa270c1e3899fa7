//! The low-shot protocol's numerics against tests/py/ref_lowshot.py: cyanure 1.2.2's preprocessing (run live), the
//! logistic regression against scikit-learn's multinomial `LogisticRegression(C = 1 / lambd, fit_intercept=False)`
//! (objective within 1e-5 relative of scikit-learn's optimum, predictions on >= 99.5 % of val rows), and nn-loo's
//! `lmim-ddp` rows against torch's DistributedSampler + DataLoader(drop_last=True).
mod common;

use lmim_bench::checkpoint;
use lmim_bench::protocols::knn::lmim_ddp_rows;
use lmim_bench::protocols::lowshot::{fit, predict, preprocess, SolveOptions};
use tch::{Device, Kind, Tensor};

/// Overlapping Gaussian classes with a per-row offset and scale (which the row centring and normalisation remove),
/// so the optimum is finite and the preprocessing matters.
fn case(seed: i64, n: i64, m: i64, d: i64, classes: i64) -> (Tensor, Tensor, Tensor, Tensor) {
    tch::manual_seed(seed);
    let opts = (Kind::Double, Device::Cpu);
    let means = Tensor::randn([classes, d], opts);
    let make = |k: i64| {
        let y = Tensor::arange(k, (Kind::Int64, Device::Cpu)).remainder(classes);
        let x = means.index_select(0, &y) + Tensor::randn([k, d], opts) * 1.2;
        let x = x * (Tensor::rand([k, 1], opts) + 0.5) + Tensor::randn([k, 1], opts) * 3.0;
        (x, y)
    };
    let (tr, tl) = make(n);
    let (va, vl) = make(m);
    (tr, tl, va, vl)
}

fn objective(x: &Tensor, y: &Tensor, w: &Tensor, lambd: f64) -> f64 {
    let n = x.size()[0] as f64;
    let logits = x.mm(w);
    let lse = logits.logsumexp([1i64].as_slice(), false);
    let picked = logits.gather(1, &y.unsqueeze(1), false).squeeze_dim(1);
    (lse - picked).mean(Kind::Double).double_value(&[]) + 0.5 * lambd / n * w.square().sum(Kind::Double).double_value(&[])
}

#[test]
fn logistic_regression_matches_scikit_learn_and_preprocessing_matches_cyanure() {
    let dir = tempfile::tempdir().unwrap();
    // MSN's lambd (README) and a 10x larger one; 400 rows, 24 features, 8 classes.
    for (i, lambd) in [0.0025, 0.025].into_iter().enumerate() {
        let (tr, tl, va, _) = case(10 + i as i64, 400, 1000, 24, 8);
        let inp = dir.path().join(format!("in{i}.safetensors"));
        let out = dir.path().join(format!("out{i}.safetensors"));
        let cfg = serde_json::json!({ "lambd": lambd, "num_classes": 8, "tol": 1e-10 });
        let meta = [("config".to_string(), cfg.to_string())].into_iter().collect();
        let t = |n: &str, x: &Tensor| (n.to_string(), x.shallow_clone());
        checkpoint::save(&inp, &[t("train", &tr), t("train_labels", &tl), t("val", &va)], &meta).unwrap();
        common::run_py("ref_lowshot.py", &["fit", inp.to_str().unwrap(), out.to_str().unwrap()]);
        let r = checkpoint::load(&out).unwrap();
        let get = |n: &str| r.get(n).unwrap().shallow_clone();

        let (xt, xv) = (preprocess(&tr), preprocess(&va));
        let dp = common::max_abs(&xt, &get("train_pre")).max(common::max_abs(&xv, &get("val_pre")));
        assert!(dp < 1e-12, "preprocessing differs from cyanure's by {dp:e}");
        // Rows are centred and of unit norm.
        assert!(xt.mean_dim(1, false, Kind::Double).abs().max().double_value(&[]) < 1e-12);
        assert!((xt.square().sum_dim_intlist(1, false, Kind::Double) - 1.0).abs().max().double_value(&[]) < 1e-12);

        let opts = SolveOptions { lambd, grad_tol: 1e-8, max_iter: 100_000, memory: 20, device: Device::Cpu, line_search: lmim_bench::protocols::lowshot::LineSearch::Armijo, f32_products: false };
        let f = fit(&xt, &tl, 8, &opts).unwrap();
        assert!(f.converged, "lambd {lambd}: max |grad| {:e} after {} iterations", f.grad_max, f.iterations);
        assert!((f.lambda - lambd / 400.0).abs() < 1e-18, "lambda = lambd / n");
        let ours = objective(&xt, &tl, &f.weights, lambd);
        assert!((ours - f.objective).abs() <= 1e-12 * ours.abs(), "the reported objective is the objective: {ours} vs {}", f.objective);
        let theirs = get("objective").double_value(&[0]);
        let rel = (ours - theirs) / theirs.abs();
        assert!(rel.abs() <= 1e-5, "lambd {lambd}: objective {ours} vs scikit-learn's {theirs} (relative {rel:e})");
        let pred = predict(&xv, &f.weights);
        let agree = pred.eq_tensor(&get("val_pred")).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
        assert!(agree >= 0.995, "lambd {lambd}: predictions agree on {:.2} % of val rows", 100.0 * agree);
        // The optimum itself: scikit-learn's coef [C, D] is our W^T.
        let dw = common::max_abs(&f.weights, &get("coef").transpose(0, 1)) / get("coef").abs().max().double_value(&[]);
        assert!(dw < 1e-3, "lambd {lambd}: weights differ by {dw:e} of their largest entry");
    }
}

/// A deliberate deviation from cyanure 1.2.2, named in the README's low-shot section: its `preprocess` gives a
/// feature row that is constant (zero after centering) a random unit vector; here it stays zero, so the number does
/// not depend on a random draw. Real features are never constant; the test pins the choice and the arithmetic of
/// the other row (centred by its own mean, then L2-normalised).
#[test]
fn a_constant_row_stays_zero() {
    let x = Tensor::from_slice(&[2.0f64, 2.0, 2.0, 1.0, 2.0, 4.0]).view([2, 3]);
    let p = preprocess(&x);
    assert_eq!(Vec::<f64>::try_from(p.get(0)).unwrap(), vec![0.0, 0.0, 0.0]);
    let r: Vec<f64> = Vec::try_from(p.get(1)).unwrap();
    // (1, 2, 4) - 7/3 = (-4/3, -1/3, 5/3), norm sqrt(42)/3.
    let e = [-4.0 / 42f64.sqrt(), -1.0 / 42f64.sqrt(), 5.0 / 42f64.sqrt()];
    for (a, b) in r.iter().zip(e) {
        assert!((a - b).abs() < 1e-15, "{r:?} vs {e:?}");
    }
}

#[test]
fn lmim_ddp_rows_are_torch_distributed_sampler_with_drop_last() {
    let dir = tempfile::tempdir().unwrap();
    // LatentMIM's ImageNet setting, a padded one (1003 over 3 ranks), one whose ranks repeat images (padding beyond
    // a rank's batches: 10 over 4 ranks, batch 2), and one with no whole batch.
    for (n, w, b) in [(50_000i64, 8i64, 256i64), (1003, 3, 64), (10, 4, 2), (100, 7, 32)] {
        let out = dir.path().join(format!("ddp-{n}-{w}-{b}.safetensors"));
        common::run_py("ref_lowshot.py", &["ddp", &n.to_string(), &w.to_string(), &b.to_string(), out.to_str().unwrap()]);
        let want: Vec<i64> = Vec::try_from(checkpoint::load(&out).unwrap().get("rows").unwrap()).unwrap();
        let got = lmim_ddp_rows(n, w, b, 0).unwrap();
        assert_eq!(got, want, "n {n}, world {w}, batch {b}");
        if n == 50_000 {
            assert_eq!(got.len(), 49_152);
            assert_eq!(got.iter().collect::<std::collections::BTreeSet<_>>().len(), 49_152, "no image twice");
        }
        if (n, w, b) == (100, 7, 32) {
            assert!(got.is_empty());
        }
    }
}
