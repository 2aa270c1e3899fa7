//! Low-shot ImageNet-1K classification as MSN measures it (facebookresearch/msn `logistic_eval.py`): features of a
//! frozen encoder on a few labelled training images (a subset list, or `shots` images per class drawn with a seed),
//! cyanure's row preprocessing, and a multinomial logistic regression without intercept, solved to optimality and
//! scored on the whole val split.
//!
//! - Preprocessing, `cyanure.preprocess(X, normalize=True, columns=False, centering=True)`: each row minus its own
//!   mean over the features, then divided by its L2 norm.
//! - Objective: `(1/n) sum_i CE(x_i W, y_i) + (lambda/2) ||W||^2`, W [D, C], lambda = `lambd / n` (MSN's
//!   `lambd /= len(embs)`); the same optimum as scikit-learn's `LogisticRegression(C = 1 / lambd,
//!   fit_intercept=False)` for C > 2 classes.
//! - Solver: L-BFGS in f64 on the run's device, stopped at a stated optimality (the largest gradient entry at most
//!   `grad_tol`), so the answer does not depend on the solver; the record keeps the achieved gradient norms.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use super::extract::{FeatureKind, FeatureSet};
use super::knn::TransformSpec;
use super::record::{RecordBuilder, SplitPrint};
use super::EvalRequest;
use crate::data::dataset::Dataset;
use crate::error::{Error, Result};
use crate::info::device_name;
use crate::results::RunRecord;

/// `protocols/lowshot.toml`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LowshotConfig {
    pub name: String,
    pub version: String,
    pub description: String,
    pub source: String,
    /// The evaluation feature; `cls` gives way to a checkpoint family's own (as k-NN), unless asked for.
    /// MSN's is `cls-prenorm` (`forward_blocks`: the CLS token of the last block without the final norm).
    pub feature: FeatureKind,
    pub last_blocks: i64,
    /// MSN's `lambd` (README command 0.0025; the script's default 0.00025); the penalty is lambd / n.
    pub lambd: f64,
    /// Stop when the largest entry of the gradient is at most this.
    pub grad_tol: f64,
    pub max_iter: i64,
    /// L-BFGS history.
    pub memory: i64,
    /// Without `--subset`: draw this many training images per class (0: a list is required).
    pub shots: i64,
    /// Seed of the first draw; draw i uses seed + i.
    pub seed: i64,
    /// Number of draws (each one split, as MSN's three lists).
    pub draws: i64,
    pub transform: TransformSpec,
}

impl Default for LowshotConfig {
    fn default() -> Self {
        LowshotConfig {
            name: "lowshot".into(),
            version: String::new(),
            description: String::new(),
            source: String::new(),
            feature: FeatureKind::Cls,
            last_blocks: 1,
            lambd: 0.0025,
            grad_tol: 3e-10,
            max_iter: 20000,
            memory: 10,
            shots: 0,
            seed: 0,
            draws: 1,
            transform: TransformSpec { crop_pct: 0.875, interpolation: "bilinear".into() },
        }
    }
}

impl crate::config::Recipe for LowshotConfig {
    fn rules() -> Vec<crate::config::Rule> {
        use crate::config::Rule;
        vec![
            Rule::int("last_blocks", 1, 64),
            Rule::above("lambd", 0.0, 1e6),
            Rule::above("grad_tol", 0.0, 1.0),
            Rule::int("max_iter", 1, 10_000_000),
            Rule::int("memory", 1, 1000),
            Rule::int("shots", 0, 1 << 20),
            Rule::int("seed", 0, i64::MAX),
            Rule::int("draws", 1, 1000),
            Rule::above("transform.crop_pct", 0.0, 1.0),
        ]
    }
}

impl LowshotConfig {
    pub fn validate(&self, origin: &str) -> Result<()> {
        let bad = |reason: String| Error::BadConfig { path: origin.into(), reason };
        if let Some(v) = crate::config::violation(self) {
            return Err(bad(format!("key `{}` = {}: {}", v.key, v.value, v.reason)));
        }
        if !matches!(self.transform.interpolation.as_str(), "bilinear" | "bicubic") {
            return Err(bad(format!("interpolation `{}`: bilinear (MSN's Resize default) or bicubic", self.transform.interpolation)));
        }
        if self.name != "lowshot" {
            return Err(bad(format!("the file is for protocol `{}`, not `lowshot`", self.name)));
        }
        Ok(())
    }
}

/// `cyanure.preprocess(X, normalize=True, columns=False, centering=True)`: every row minus its mean, then over its
/// L2 norm (a row that is constant stays zero). Computed in the input's dtype.
pub fn preprocess(x: &Tensor) -> Tensor {
    let centred = x - x.mean_dim(1, true, x.kind());
    let norm = centred.norm_scalaropt_dim(2, [1i64].as_slice(), true);
    // A zero row has nothing to scale; dividing by 1 keeps it zero instead of NaN.
    let safe = norm.where_scalarother(&norm.gt(0.0), 1.0);
    centred / safe
}

/// What the solver reached.
#[derive(Debug, Serialize)]
pub struct Fit {
    /// [D, C] on the solve's device, f64.
    #[serde(skip)]
    pub weights: Tensor,
    pub objective: f64,
    /// max |dF/dW| and ||dF/dW||_2 at the returned weights.
    pub grad_max: f64,
    pub grad_norm: f64,
    pub iterations: i64,
    pub evaluations: i64,
    pub converged: bool,
    pub lambda: f64,
    pub seconds: f64,
}

/// The objective and its gradient at `w`.
/// The mean cross-entropy of logits `z = x W` [n, C] against `y`, and the logits' log-sum-exp per row.
fn cross_entropy(z: &Tensor, y: &Tensor) -> (f64, Tensor) {
    let lse = z.logsumexp([1i64].as_slice(), true);
    let picked = z.gather(1, &y.unsqueeze(1), false);
    ((&lse - &picked).sum(Kind::Double).double_value(&[]) / z.size()[0] as f64, lse)
}

/// The gradient of the objective at `w` from its logits `z = x W` and their log-sum-exp.
fn gradient(x: &Tensor, y: &Tensor, z: &Tensor, lse: &Tensor, w: &Tensor, lambda: f64) -> Tensor {
    let mut p = (z - lse).exp();
    let minus = Tensor::full([y.size()[0], 1], -1.0, (p.kind(), p.device()));
    let _ = p.scatter_add_(1, &y.unsqueeze(1), &minus);
    x.transpose(0, 1).mm(&p.to_kind(x.kind())).to_kind(Kind::Double) / x.size()[0] as f64 + w * lambda
}

fn dot(a: &Tensor, b: &Tensor) -> f64 {
    (a * b).sum(Kind::Double).double_value(&[])
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs().max().double_value(&[])
}

/// Solver settings.
#[derive(Clone, Debug)]
pub struct SolveOptions {
    pub lambd: f64,
    pub grad_tol: f64,
    pub max_iter: i64,
    pub memory: i64,
    pub device: Device,
    pub line_search: LineSearch,
    /// The products with the rows in f32 (the rows kept in f32, the weights, logits and solver state in f64): half
    /// the memory and, where f32 is faster, the time, with the objective resolved to f32's round-off (as
    /// scikit-learn on f32 features).
    pub f32_products: bool,
}

/// How a step length is chosen along the L-BFGS direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineSearch {
    /// Backtracking by halves from the unit step until the objective decreases enough (Armijo, c1 = 1e-4).
    Armijo,
    /// The strong Wolfe conditions with scipy L-BFGS-B's constants (c1 = 1e-3, c2 = 0.9): the step also flattens the
    /// slope, so the curvature pairs are informative and far fewer iterations are needed (Nocedal & Wright,
    /// Numerical Optimization, algorithms 3.5 and 3.6).
    Wolfe,
}

/// Multinomial logistic regression without intercept on rows `x` [n, D] (already preprocessed) and labels `y`
/// [n] in 0..num_classes: minimises `(1/n) sum CE + (lambda/2)||W||^2`, lambda = lambd / n, with L-BFGS (two-loop
/// recursion, Armijo backtracking from the unit step) in f64, from W = 0, until max |grad| <= grad_tol. Two products
/// with `x` per iteration, however many trial steps the line search takes.
pub fn fit(x: &Tensor, y: &Tensor, num_classes: i64, opts: &SolveOptions) -> Result<Fit> {
    fit_penalized(x, y, num_classes, opts, None, None)
}

/// [`fit`] with an unpenalised intercept, as scikit-learn's `LogisticRegression(fit_intercept=True)`: a column of
/// ones is appended to `x` and its row of weights left out of the L2 term. The weights are `[D + 1, C]`, the
/// intercept last; [`predict`] takes rows with the ones column appended ([`with_ones`]). `ftol` adds scipy's
/// L-BFGS-B stop on a relative decrease `(f_k - f_k+1) / max(|f_k|, |f_k+1|, 1) <= ftol` (scikit-learn passes
/// `64 * eps`).
pub fn fit_with_intercept(x: &Tensor, y: &Tensor, num_classes: i64, opts: &SolveOptions, ftol: Option<f64>) -> Result<Fit> {
    let d = x.size()[1];
    let mask = Tensor::ones([d + 1, 1], (Kind::Double, opts.device));
    let _ = mask.narrow(0, d, 1).fill_(0.0);
    fit_penalized(&with_ones(x), y, num_classes, opts, Some(&mask), ftol)
}

/// `x` with a column of ones appended (the intercept's input).
pub fn with_ones(x: &Tensor) -> Tensor {
    Tensor::cat(&[x.shallow_clone(), Tensor::ones([x.size()[0], 1], (x.kind(), x.device()))], 1)
}

/// The objective along a direction from the logits `z` and their change `zd = x dir` (the logits are linear in the
/// step): the mean cross-entropy plus `lambda / 2 ||w + t dir||^2 = lambda / 2 (ww + 2 t wd + t^2 dd)`.
struct Along<'a> {
    z: &'a Tensor,
    zd: &'a Tensor,
    y: &'a Tensor,
    lambda: f64,
    ww: f64,
    wd: f64,
    dd: f64,
}

impl Along<'_> {
    /// The objective at step `t`, with the logits and their log-sum-exp there.
    fn at(&self, t: f64) -> (f64, Tensor, Tensor) {
        let z = self.z + self.zd * t;
        let (ce, lse) = cross_entropy(&z, self.y);
        (ce + 0.5 * self.lambda * (self.ww + 2.0 * t * self.wd + t * t * self.dd), z, lse)
    }

    /// The slope at step `t` from its logits and log-sum-exp: `mean(softmax . zd) - mean(zd[y]) + lambda (wd + t dd)`,
    /// `picked` the second term.
    fn slope(&self, t: f64, z: &Tensor, lse: &Tensor, picked: f64) -> f64 {
        let p = (z - lse).exp();
        (p * self.zd).sum(Kind::Double).double_value(&[]) / z.size()[0] as f64 - picked + self.lambda * (self.wd + t * self.dd)
    }
}

/// One step along the direction by `search`, from the objective `f` and its slope there: (step, objective, logits,
/// log-sum-exp), None when no step decreases the objective; and the objective evaluations made.
fn line_step(search: LineSearch, along: &Along, f: f64, slope: f64) -> (Option<(f64, f64, Tensor, Tensor)>, i64) {
    match search {
        LineSearch::Armijo => {
            let mut step = 1.0;
            let mut evals = 0;
            loop {
                let (ft, z, lse) = along.at(step);
                evals += 1;
                if ft <= f + 1e-4 * step * slope || step < 1e-20 {
                    return (Some((step, ft, z, lse)), evals);
                }
                step *= 0.5;
            }
        }
        LineSearch::Wolfe => {
            // Along the direction the slope needs no product with x either.
            let picked = along.zd.gather(1, &along.y.unsqueeze(1), false).sum(Kind::Double).double_value(&[]) / along.z.size()[0] as f64;
            let phi = |t: f64| {
                let (ft, z, lse) = along.at(t);
                let gt = along.slope(t, &z, &lse, picked);
                (ft, gt, (z, lse))
            };
            let (step, ft, state, evals) = wolfe_step(phi, f, slope);
            (state.map(|(z, lse)| (step, ft, z, lse)), evals as i64)
        }
    }
}

/// A step `t` along a descent direction of `phi(t) = (objective, slope, state)` with `phi(0) = (f0, g0)` that meets
/// the strong Wolfe conditions (c1 = 1e-3, c2 = 0.9, scipy L-BFGS-B's `dcsrch` constants): doubling from the unit
/// step until the minimum is bracketed, then the bracket narrowed by safeguarded cubic interpolation (Nocedal &
/// Wright, algorithms 3.5 and 3.6). At most 30 evaluations; then the best step with sufficient decrease found, or
/// None when there is none. Returns the step, its objective, its state and the evaluations made.
fn wolfe_step<S>(mut phi: impl FnMut(f64) -> (f64, f64, S), f0: f64, g0: f64) -> (f64, f64, Option<S>, usize) {
    const C1: f64 = 1e-3;
    const C2: f64 = 0.9;
    const MAX_EVALS: usize = 30;
    let armijo = |t: f64, f: f64| f <= f0 + C1 * t * g0;
    let mut evals = 0;
    // (step, objective, slope, state) of the bracket's low end: the best step with sufficient decrease so far.
    let mut lo: (f64, f64, f64, Option<S>) = (0.0, f0, g0, None);
    let mut hi: Option<(f64, f64, f64)> = None;
    let mut t = 1.0;
    while evals < MAX_EVALS {
        let (f, g, s) = phi(t);
        evals += 1;
        if !armijo(t, f) || f >= lo.1 {
            hi = Some((t, f, g));
        } else if g.abs() <= -C2 * g0 {
            return (t, f, Some(s), evals);
        } else {
            // The bracket's low end moves to t; the high end is the side the slope points away from.
            if let Some(h) = hi {
                if g * (h.0 - t) >= 0.0 {
                    hi = Some((lo.0, lo.1, lo.2));
                }
            } else if g >= 0.0 {
                hi = Some((lo.0, lo.1, lo.2));
            }
            lo = (t, f, g, Some(s));
        }
        t = match hi {
            None => 2.0 * t,
            Some(h) => {
                let (a, b) = (lo.0.min(h.0), lo.0.max(h.0));
                if b - a <= 1e-12 * b.max(1e-300) {
                    break;
                }
                let c = cubic_min((lo.0, lo.1, lo.2), h);
                if c.is_finite() && c > a + 0.1 * (b - a) && c < b - 0.1 * (b - a) { c } else { 0.5 * (a + b) }
            }
        };
    }
    (lo.0, lo.1, lo.3, evals)
}

/// The minimiser of the cubic through two points with their values and slopes (Nocedal & Wright, eq. 3.59).
fn cubic_min((t1, f1, g1): (f64, f64, f64), (t2, f2, g2): (f64, f64, f64)) -> f64 {
    let d1 = g1 + g2 - 3.0 * (f1 - f2) / (t1 - t2);
    let disc = d1 * d1 - g1 * g2;
    if disc < 0.0 {
        return f64::NAN;
    }
    let d2 = (t2 - t1).signum() * disc.sqrt();
    t2 - (t2 - t1) * (g2 + d2 - d1) / (g2 - g1 + 2.0 * d2)
}

/// The L-BFGS direction -H g by the two-loop recursion over `hist` ((s, y, 1 / s.y) pairs, oldest first) and its
/// slope g.dir; steepest descent, with the history cleared, where round-off leaves no descent direction.
fn lbfgs_direction(hist: &mut std::collections::VecDeque<(Tensor, Tensor, f64)>, g: &Tensor, gmax: f64) -> (Tensor, f64) {
    let mut q = g.copy();
    let mut alphas = Vec::with_capacity(hist.len());
    for (s, yv, rho) in hist.iter().rev() {
        let a = rho * dot(s, &q);
        q -= yv * a;
        alphas.push(a);
    }
    let gamma = match hist.back() {
        Some((s, yv, _)) => dot(s, yv) / dot(yv, yv),
        None => 1.0 / gmax.max(1e-300),
    };
    let mut r = q * gamma;
    for ((s, yv, rho), a) in hist.iter().zip(alphas.iter().rev()) {
        let b = rho * dot(yv, &r);
        r += s * (a - b);
    }
    let dir = -r;
    let slope = dot(g, &dir);
    if slope < 0.0 {
        return (dir, slope);
    }
    hist.clear();
    let dir = -g / gmax.max(1e-300);
    let slope = dot(g, &dir);
    (dir, slope)
}

/// [`fit`], the L2 term restricted to the rows of W where `penalty` ([D, 1], 0 or 1) is 1 (None: every row).
fn fit_penalized(x: &Tensor, y: &Tensor, num_classes: i64, opts: &SolveOptions, penalty: Option<&Tensor>, ftol: Option<f64>) -> Result<Fit> {
    let pen = |t: &Tensor| match penalty {
        Some(m) => t * m,
        None => t.shallow_clone(),
    };
    let t0 = Instant::now();
    let _guard = tch::no_grad_guard();
    let (n, d) = (x.size()[0], x.size()[1]);
    if n == 0 {
        return Err(Error::data("train features", "no training rows"));
    }
    let x = x.to_device(opts.device).to_kind(if opts.f32_products { Kind::Float } else { Kind::Double });
    let y = y.to_device(opts.device).to_kind(Kind::Int64);
    let mm = |a: &Tensor, b: &Tensor| a.mm(&b.to_kind(a.kind())).to_kind(Kind::Double);
    let lambda = opts.lambd / n as f64;
    let mut w = Tensor::zeros([d, num_classes], (Kind::Double, opts.device));
    // The logits x W are kept with W: along a direction they are linear in the step, so the line search needs one
    // product x dir per iteration and each trial step costs a log-sum-exp, not a matrix product.
    let mut z = Tensor::zeros([n, num_classes], (Kind::Double, opts.device));
    let (mut f, lse) = cross_entropy(&z, &y);
    let mut g = gradient(&x, &y, &z, &lse, &pen(&w), lambda);
    let mut evaluations = 1;
    let mut hist: std::collections::VecDeque<(Tensor, Tensor, f64)> = std::collections::VecDeque::new();
    let mut iterations = 0;
    let mut gmax = max_abs(&g);
    while gmax > opts.grad_tol && iterations < opts.max_iter {
        let (dir, slope) = lbfgs_direction(&mut hist, &g, gmax);
        let zd = mm(&x, &dir);
        // ||w + t dir||^2 = ww + 2 t wd + t^2 dd.
        let (ww, wd, dd) = (dot(&pen(&w), &w), dot(&pen(&w), &dir), dot(&pen(&dir), &dir));
        let along = Along { z: &z, zd: &zd, y: &y, lambda, ww, wd, dd };
        let (found, evals) = line_step(opts.line_search, &along, f, slope);
        evaluations += evals;
        // None: no step decreases the objective in floating point.
        let Some((step, f_new, z_new, lse_new)) = found else { break };
        if f_new > f {
            // No decrease is possible in floating point: the gradient is as small as this precision allows.
            break;
        }
        let w_new = &w + &dir * step;
        let g_new = gradient(&x, &y, &z_new, &lse_new, &pen(&w_new), lambda);
        z = z_new;
        let s = &w_new - &w;
        let yv = &g_new - &g;
        let sy = dot(&s, &yv);
        if sy > 1e-12 * dot(&s, &s).sqrt() * dot(&yv, &yv).sqrt() {
            hist.push_back((s, yv, 1.0 / sy));
            if hist.len() as i64 > opts.memory {
                hist.pop_front();
            }
        }
        w = w_new;
        let decrease = f - f_new;
        f = f_new;
        g = g_new;
        gmax = max_abs(&g);
        if !f.is_finite() || !gmax.is_finite() {
            return Err(Error::NonFinite(format!("the logistic regression's objective or gradient after {iterations} iterations (objective {f}, max |gradient| {gmax}): the features hold values too large?")));
        }
        iterations += 1;
        if ftol.is_some_and(|t| decrease <= t * (f + decrease).abs().max(f.abs()).max(1.0)) {
            break;
        }
    }
    // The objective reported is evaluated afresh at the weights (the kept logits carry the steps' round-off).
    let f = cross_entropy(&mm(&x, &w), &y).0 + 0.5 * lambda * dot(&pen(&w), &w);
    let grad_norm = g.norm().double_value(&[]);
    Ok(Fit { weights: w, objective: f, grad_max: gmax, grad_norm, iterations, evaluations, converged: gmax <= opts.grad_tol, lambda, seconds: t0.elapsed().as_secs_f64() })
}

/// The class of each row: argmax of `x W` (the lowest class among equal scores).
pub fn predict(x: &Tensor, w: &Tensor) -> Tensor {
    let _guard = tch::no_grad_guard();
    let logits = x.to_device(w.device()).to_kind(Kind::Double).mm(w);
    logits.argmax(1, false)
}

/// One labelled training subset: rows of the train split, in list order (a name listed twice counts twice, as MSN's
/// `ImageNetSubset` appends every line).
#[derive(Clone, Debug, Serialize)]
pub struct Subset {
    /// The list file (given, or written for a draw).
    pub file: PathBuf,
    pub sha256: String,
    pub count: usize,
    pub images_per_class_min: usize,
    pub images_per_class_max: usize,
    /// Classes with no image in the subset.
    pub classes_missing: usize,
    pub duplicates: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    #[serde(skip)]
    pub rows: Vec<i64>,
}

/// The names a list may use for a training image: its path under the split (`class/file`) and, where no other
/// image has the same one, its file name (MSN's lists hold bare ImageNet file names, `n01440764_10026.JPEG`).
struct NameIndex {
    by_rel: HashMap<String, usize>,
    by_base: HashMap<String, Option<usize>>,
}

impl NameIndex {
    fn new(ds: &Dataset) -> Self {
        let mut by_rel = HashMap::with_capacity(ds.len());
        let mut by_base: HashMap<String, Option<usize>> = HashMap::with_capacity(ds.len());
        for i in 0..ds.len() {
            let rel = ds.rel_path(i).replace('\\', "/");
            let base = rel.rsplit('/').next().unwrap_or(&rel).to_string();
            by_base.entry(base).and_modify(|v| *v = None).or_insert(Some(i));
            by_rel.insert(rel, i);
        }
        NameIndex { by_rel, by_base }
    }

    /// A line of a list: `class/file`, or a file name (unique in the split, or found as MSN finds it, in the
    /// folder named by the part before its first `_`).
    fn find(&self, name: &str) -> Option<usize> {
        if let Some(&i) = self.by_rel.get(name) {
            return Some(i);
        }
        if let Some(&Some(i)) = self.by_base.get(name) {
            return Some(i);
        }
        let class = name.split('_').next()?;
        self.by_rel.get(&format!("{class}/{name}")).copied()
    }

    /// A bare file name that several classes hold (`find` cannot take it).
    fn is_ambiguous(&self, name: &str) -> bool {
        matches!(self.by_base.get(name), Some(None))
    }

    /// The name written for row `i`: the file name where it is unique, else `class/file`.
    fn name_of(&self, ds: &Dataset, i: usize) -> String {
        let rel = ds.rel_path(i).replace('\\', "/");
        let base = rel.rsplit('/').next().unwrap_or(&rel).to_string();
        match self.by_base.get(&base) {
            Some(Some(_)) => base,
            _ => rel,
        }
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn describe(file: PathBuf, text: &[u8], rows: Vec<i64>, ds: &Dataset, seed: Option<i64>) -> Subset {
    let mut per_class = vec![0usize; ds.classes.len()];
    let mut seen = BTreeSet::new();
    let mut duplicates = 0;
    for &r in &rows {
        per_class[ds.samples[r as usize].1 as usize] += 1;
        if !seen.insert(r) {
            duplicates += 1;
        }
    }
    let present: Vec<usize> = per_class.iter().copied().filter(|&c| c > 0).collect();
    Subset {
        file,
        sha256: sha256_hex(text),
        count: rows.len(),
        images_per_class_min: per_class.iter().copied().min().unwrap_or(0),
        images_per_class_max: present.iter().copied().max().unwrap_or(0),
        classes_missing: per_class.len() - present.len(),
        duplicates,
        seed,
        rows,
    }
}

/// Reads a list in MSN's format (one training image name per line; blank lines ignored). A name that is not in
/// the split is an input error naming it and the line.
pub fn read_list(path: &Path, ds: &Dataset) -> Result<Subset> {
    let text = crate::fsutil::read_regular_text(path, Some(crate::fsutil::TEXT_LIMIT)).map_err(|e| Error::data(path, format!("cannot read the subset list: {e}")))?;
    let index = NameIndex::new(ds);
    let mut rows = Vec::new();
    for (no, line) in text.lines().enumerate() {
        let name = line.trim();
        if name.is_empty() {
            continue;
        }
        match index.find(name) {
            Some(i) => rows.push(i as i64),
            None if index.is_ambiguous(name) => {
                return Err(Error::data(path, format!("line {}: `{name}` is the name of images in several classes of {}: write it as `class/{name}`", no + 1, ds.dir.display())))
            }
            None => return Err(Error::data(path, format!("line {}: `{name}` is not an image of {}", no + 1, ds.dir.display()))),
        }
    }
    if rows.is_empty() {
        return Err(Error::data(path, "the subset list names no image"));
    }
    for w in list_warnings(&rows, ds) {
        eprintln!("warning: {}: {w}", path.display());
    }
    Ok(describe(path.to_path_buf(), text.as_bytes(), rows, ds, None))
}

/// What a list's rows leave to say: images named more than once (each counted once per line, as MSN's loader
/// does), and classes with no training image in the list (the solver then never predicts them).
fn list_warnings(rows: &[i64], ds: &Dataset) -> Vec<String> {
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let dups = rows.iter().filter(|r| !seen.insert(**r)).count();
    if dups > 0 {
        out.push(format!("{dups} line(s) name an image already listed (each line is one training row, as in MSN's loader)"));
    }
    let mut has = vec![false; ds.classes.len()];
    for &r in rows {
        has[ds.samples[r as usize].1 as usize] = true;
    }
    let without: Vec<&str> = ds.classes.iter().zip(&has).filter(|(_, h)| !**h).map(|(c, _)| c.as_str()).collect();
    if !without.is_empty() {
        let shown: Vec<&str> = without.iter().take(5).copied().collect();
        out.push(format!("{} class(es) have no training image in the list ({}{}): they can never be predicted", without.len(), shown.join(", "), if without.len() > 5 { ", ..." } else { "" }));
    }
    out
}

/// The list files of `--subset` arguments: files as given, a folder's `*.txt` files in name order.
pub fn list_files(args: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for a in args {
        if a.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(a)
                .map_err(|e| Error::io(a, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "txt"))
                .collect();
            files.sort();
            if files.is_empty() {
                return Err(Error::option("--subset", format!("{}: a folder without .txt lists", a.display())));
            }
            out.extend(files);
        } else if a.is_file() {
            out.push(a.clone());
        } else {
            return Err(Error::option("--subset", format!("{}: no such file or folder", a.display())));
        }
    }
    Ok(out)
}

/// `shots` training images per class, drawn with `seed` (ChaCha8: the same on every machine): each class's images
/// in dataset order, shuffled, the first `shots` kept; classes in index order. A class with fewer images is an
/// input error naming it.
pub fn draw_rows(ds: &Dataset, shots: usize, seed: u64) -> Result<Vec<i64>> {
    let mut by_class: Vec<Vec<i64>> = vec![Vec::new(); ds.classes.len()];
    for (i, (_, l)) in ds.samples.iter().enumerate() {
        by_class[*l as usize].push(i as i64);
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut rows = Vec::with_capacity(shots * by_class.len());
    for (c, mut members) in by_class.into_iter().enumerate() {
        if members.is_empty() && ds.empty_classes.contains(&ds.classes[c]) {
            continue;
        }
        if members.len() < shots {
            return Err(Error::option("shots", format!("{shots} per class, but class `{}` has {} training images", ds.classes[c], members.len())));
        }
        members.shuffle(&mut rng);
        rows.extend_from_slice(&members[..shots]);
    }
    Ok(rows)
}

/// A draw written as a list (MSN's format) into `dir`, so that it can be given back with `--subset`.
fn write_draw(dir: &Path, ds: &Dataset, rows: Vec<i64>, shots: usize, seed: i64, data_hash: &str) -> Result<Subset> {
    let index = NameIndex::new(ds);
    let mut text = String::new();
    for &r in &rows {
        text.push_str(&index.name_of(ds, r as usize));
        text.push('\n');
    }
    let dir = dir.join("lowshot-subsets");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let path = dir.join(format!("{shots}imgs_class-seed{seed}-{}.txt", &data_hash[..12.min(data_hash.len())]));
    crate::fsutil::write_atomic(&path, text.as_bytes())?;
    Ok(describe(path, text.as_bytes(), rows, ds, Some(seed)))
}

/// The table column of a run's subsets: `lowshot:<k>img` when every split has exactly k images of every class
/// (k = 1, 2 or 5), `lowshot:1pct` for about 1 % of the training set, else `lowshot`.
pub fn column_kind(subsets: &[Subset], n_train: usize) -> String {
    let fixed = subsets.iter().map(|s| (s.images_per_class_min == s.images_per_class_max && s.classes_missing == 0).then_some(s.images_per_class_min)).collect::<Option<BTreeSet<usize>>>();
    if let Some(ks) = fixed.filter(|k| k.len() == 1) {
        let k = *ks.iter().next().expect("one");
        if [1, 2, 5].contains(&k) {
            return format!("lowshot:{k}img");
        }
    }
    let one_pct = n_train as f64 / 100.0;
    if subsets.iter().all(|s| (s.count as f64 - one_pct).abs() <= 0.02 * one_pct) {
        return "lowshot:1pct".into();
    }
    "lowshot".into()
}

/// Mean and standard deviation (population, numpy's default `ddof=0`).
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

fn accuracy(pred: &Tensor, labels: &Tensor) -> f64 {
    let correct = pred.to_device(Device::Cpu).eq_tensor(&labels.to_device(Device::Cpu)).sum(Kind::Int64).int64_value(&[]);
    100.0 * correct as f64 / labels.size()[0] as f64
}

/// The splits of a run, read (every name checked) or drawn before any feature is extracted: the subset lists, then
/// `draws` draws of `shots` images per class, each written as a list under `output`.
fn subsets_of(lists: &[PathBuf], cfg: &LowshotConfig, train_ds: &Dataset, data_hash: &str, output: &Path) -> Result<Vec<Subset>> {
    let mut subsets = Vec::new();
    for l in lists {
        subsets.push(read_list(l, train_ds)?);
    }
    if cfg.shots > 0 {
        for i in 0..cfg.draws {
            let seed = cfg.seed + i;
            let rows = draw_rows(train_ds, cfg.shots as usize, seed as u64)?;
            subsets.push(write_draw(output, train_ds, rows, cfg.shots as usize, seed, data_hash)?);
        }
    }
    Ok(subsets)
}

/// One logistic regression per split on its rows of `train` (the extracted union: `position` maps a split row to its
/// row there; f64 features on the device, preprocessed here), scored on the preprocessed `val`: each split's
/// details and its top-1.
fn solve_splits(subsets: &[Subset], position: &HashMap<i64, i64>, (train_x, train_y): (&Tensor, &Tensor), (val_x, val_y): (&Tensor, &Tensor), num_classes: i64, opts: &SolveOptions, quiet: bool) -> Result<(Vec<serde_json::Value>, Vec<f64>)> {
    let (mut splits, mut tops) = (Vec::new(), Vec::new());
    for (i, s) in subsets.iter().enumerate() {
        let rows = Tensor::from_slice(&s.rows.iter().map(|r| position[r]).collect::<Vec<i64>>());
        let x = preprocess(&train_x.index_select(0, &rows.to_device(opts.device)));
        let y = train_y.index_select(0, &rows);
        let f = fit(&x, &y, num_classes, opts)?;
        if !f.converged && !quiet {
            eprintln!("warning: split {}: max |gradient| {:.3e} after {} iterations, above grad_tol {:.1e}", i + 1, f.grad_max, f.iterations, opts.grad_tol);
        }
        let train_top1 = accuracy(&predict(&x, &f.weights), &y);
        let top1 = accuracy(&predict(val_x, &f.weights), val_y);
        if !quiet {
            eprintln!("split {} ({}, {} images): top-1 {top1:.2} ({} iterations, {:.1} s)", i + 1, s.file.display(), s.count, f.iterations, f.seconds);
        }
        tops.push(top1);
        splits.push(serde_json::json!({ "subset": s, "top1": top1, "train_top1": train_top1, "solve": f }));
    }
    Ok((splits, tops))
}

pub fn run(req: &EvalRequest) -> Result<RunRecord> {
    let loaded = req.protocol.load::<LowshotConfig>(req.protocol_file.as_deref(), &req.sets)?;
    let origin = loaded.origin.clone();
    loaded.base.validate(&origin)?;
    let set_origin = if req.sets.is_empty() { origin.clone() } else { "--set".to_string() };
    loaded.cfg.validate(&set_origin)?;
    let cfg = loaded.cfg.clone();
    if req.train_features.is_some() || req.val_features.is_some() {
        return Err(Error::option("--train-features", "lowshot needs --checkpoint and --data: the subset lists name training images, which feature files do not"));
    }
    let data = req.data()?.to_path_buf();
    req.checkpoint()?;
    let lists = list_files(&req.subsets)?;
    if lists.is_empty() && cfg.shots == 0 {
        return Err(Error::option("--subset", "give one or more subset lists (MSN's imagenet_subsets*/…txt), or shots=N to draw N images per class"));
    }
    if !lists.is_empty() && cfg.shots > 0 {
        return Err(Error::option("--subset", "either subset lists or shots=N, not both"));
    }
    let device = req.run.device()?;
    let train_ds = Dataset::open_on_all_ranks(&data, "train", req.run.scan)?;
    let train_print = SplitPrint::of_dataset("train", &train_ds)?;
    let subsets = subsets_of(&lists, &cfg, &train_ds, &train_print.hash, &req.output)?;
    // Only the training rows some subset names are extracted (their union, in split order), and all of val.
    let union: Vec<usize> = subsets.iter().flat_map(|s| s.rows.iter().map(|&r| r as usize)).collect::<BTreeSet<_>>().into_iter().collect();
    let position: HashMap<i64, i64> = union.iter().enumerate().map(|(p, &r)| (r as i64, p as i64)).collect();
    let split = |name: &str, rows| super::neighbors::extract_rows(req, cfg.feature, cfg.last_blocks, &cfg.transform, name, device, rows);
    let train = split("train", Some(union.clone()))?;
    let val = split("val", None)?;
    if !crate::dist::world().is_main() {
        let b = RecordBuilder::new(req.protocol, &cfg.version, &loaded.overrides(&[]));
        return b.finish(serde_json::json!({ "solve": "on rank 0" }), &device_name(device), &req.output);
    }
    super::neighbors::check_pair(&train.set, &val.set)?;
    if train.set.len() as usize != union.len() {
        return Err(Error::data(&data, format!("the train features have {} rows but the subsets name {} images", train.set.len(), union.len())));
    }
    let num_classes = val.set.num_classes();
    let _guard = tch::no_grad_guard();
    let work = |set: &FeatureSet| set.features.to_device(device).to_kind(Kind::Double);
    let val_x = preprocess(&work(&val.set));
    let train_x = work(&train.set);
    let opts = SolveOptions { lambd: cfg.lambd, grad_tol: cfg.grad_tol, max_iter: cfg.max_iter, memory: cfg.memory, device, line_search: LineSearch::Armijo, f32_products: false };
    let overrides = loaded.overrides(&[]);
    let mut b = RecordBuilder::new(req.protocol, &cfg.version, &overrides);
    let (splits, tops) = solve_splits(&subsets, &position, (&train_x, &train.set.labels), (&val_x, &val.set.labels), num_classes, &opts, req.run.quiet)?;
    for (i, top1) in tops.iter().enumerate() {
        b = b.metric(&format!("top1@split{}", i + 1), *top1);
    }
    let (mean, std) = mean_std(&tops);
    b = b.metric("top1", mean).metric("top1_std", std);
    let kind = column_kind(&subsets, train_ds.len());
    let details = serde_json::json!({
        "splits": splits,
        "top1_mean": mean,
        "top1_std": std,
        "std": "population (ddof = 0) over the splits",
        "n_val": val.set.len(),
        "train_rows_extracted": union.len(),
        "train": train.source,
        "val": val.source,
        "skipped_eval": val.source.get("skipped_paths").cloned().unwrap_or(serde_json::json!([])),
    });
    let meta = &val.set.meta;
    let name = req.model_name("features");
    let mut prints = vec![train_print];
    if let Some(mut p) = super::neighbors::print(&val.set) {
        p.role = "val".into();
        prints.push(p);
    }
    let per_class: BTreeMap<&str, (usize, usize)> = subsets.iter().map(|s| (s.sha256.as_str(), (s.images_per_class_min, s.images_per_class_max))).collect();
    let extra = serde_json::json!({
        "column": kind,
        "feature": meta.feature.clone().unwrap_or_else(|| cfg.feature.name().into()),
        "transform_applied": meta.transform,
        "precision": meta.precision,
        "splits": subsets.len(),
        "subset_sha256": subsets.iter().map(|s| s.sha256.clone()).collect::<Vec<_>>(),
        "images_per_class": per_class,
        "objective": "(1/n) sum CE(x W, y) + (lambda/2) ||W||^2, lambda = lambd / n, no intercept; rows centred and L2-normalised (cyanure.preprocess)",
        "solver": "L-BFGS f64, stop at max |grad| <= grad_tol",
    });
    b.model(name, req.checkpoint.as_deref(), meta.checkpoint_sha256.clone(), meta.arch.clone())
        .source(meta.checkpoint_source.clone())
        .data(Some(data.display().to_string()), &prints)
        .config(&origin, &cfg, &overrides, &req.run, extra)
        .finish(details, &device_name(device), &req.output)
}

#[cfg(test)]
mod tests {
    use super::wolfe_step;

    #[test]
    fn the_wolfe_step_meets_both_conditions_whether_the_unit_step_is_short_or_long() {
        // (t - m)^2 + (1 - cos t) / 10, with the minimum below, near and far above the unit step.
        for m in [0.01, 0.7, 1.0, 40.0, 3000.0] {
            let phi = |t: f64| ((t - m).powi(2) + (1.0 - t.cos()) / 10.0, 2.0 * (t - m) + t.sin() / 10.0, t);
            let (f0, g0, _) = phi(0.0);
            let (t, f, state, evals) = wolfe_step(phi, f0, g0);
            assert_eq!(state, Some(t));
            assert!(f <= f0 + 1e-3 * t * g0, "minimum {m}: step {t} lacks sufficient decrease");
            assert!(phi(t).1.abs() <= 0.9 * -g0, "minimum {m}: step {t} leaves the slope {} of {g0}", phi(t).1);
            assert!(evals <= 20, "minimum {m}: {evals} evaluations");
        }
        // An ascent direction has no step: None.
        let (_, _, state, _) = wolfe_step(|t: f64| (t, 1.0, ()), 0.0, -1.0);
        assert!(state.is_none());
    }
}
