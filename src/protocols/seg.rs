//! `eval --protocol seg`: CAPI's frozen-patch semantic segmentation probes on ADE20K, a k-NN and a logistic
//! regression on the patch tokens (facebookresearch/capi:eval_segmentation.py, with utils.py:extract_features and
//! data.py:ADE20K).
//!
//! As that script: every image resized to `resolution` x `resolution` (bicubic; the label nearest), the last
//! block's patch tokens after the final norm in f32, each patch carrying its `p x p` pixel labels; a
//! `StandardScaler` fitted on the training patches; training patches whose label mode is ignored left out of
//! every fit; the k-NN predicts every pixel as the mode, over the k nearest training patches, of their labels at
//! that pixel; the logistic regression (multinomial, L2, intercept) predicts a patch's class for its pixels; the
//! grid point is chosen by mIoU on a held-out tenth of the training images and refitted on all of them. Scores are
//! scikit-learn's `jaccard_score(average="macro")` (mIoU) and pixel accuracy over the non-ignored pixels.
//!
//! Differences, named in the record: the held-out split is a seeded permutation of the training images (CAPI's is
//! unseeded) and is recorded; with one-point grids nothing is held out and the scaler sees every training image
//! (CAPI still holds a tenth out); the logistic regression is scikit-learn's problem (CAPI calls cuML, whose
//! docstring names scikit-learn as the CPU equivalent) solved by the low-shot L-BFGS ([`super::lowshot`]); the
//! k-NN's chunk search is not `torch.compile`d.
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Deserializer, Serialize};
use tch::{Device, Kind, Tensor};

use super::record::{RecordBuilder, SplitPrint};
use super::{EvalRequest, Protocol};
use crate::checkpoint::load_vit_with;
use crate::data::ade20k::{self, AdeSet, Pair};
use crate::error::{Error, Result};
use crate::info::device_name;
use crate::model::pos_embed::GridPosEmbed;
use crate::model::vit::VisionTransformer;
use crate::results::RunRecord;
pub use super::seg_knn::BankPlace;
use super::seg_knn::{Search, SearchOptions};

pub const SOURCE: &str = "facebookresearch/capi:eval_segmentation.py (KNNClassifier, LogregClassifier, mIoU, accuracy, eval_model); utils.py (extract_features, StandardScaler); data.py (ADE20K)";

/// CAPI's `inference_bs`: query patches per search batch.
pub const INFERENCE_BS: i64 = 1024;

/// Which tokens: after the final norm (CAPI's baseline loaders) or before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SegFeature {
    PatchNorm,
    PatchPrenorm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Standardize {
    /// scikit-learn's `StandardScaler` (CAPI's default `standardization`).
    Standard,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Classifier {
    Knn,
    Logreg,
}

/// CAPI's `_cdist`: `cosine` is 1 - cosine similarity, `L2` the Euclidean distance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Distance {
    #[serde(rename = "cosine")]
    Cosine,
    #[serde(rename = "L2")]
    L2,
}

impl Distance {
    pub fn name(self) -> &'static str {
        match self {
            Distance::Cosine => "cosine",
            Distance::L2 => "L2",
        }
    }
}

/// The k-NN's search dtype (CAPI's `dtype`: float32 by default, bfloat16 in its ADE20K config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KnnDtype {
    F32,
    Bf16,
}

impl KnnDtype {
    fn kind(self) -> Kind {
        match self {
            KnnDtype::F32 => Kind::Float,
            KnnDtype::Bf16 => Kind::BFloat16,
        }
    }
}

/// A list key that also takes one value (`knn_k=10`: a one-point grid).
fn one_or_many<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> std::result::Result<Vec<T>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany<T> {
        One(T),
        Many(Vec<T>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(t) => vec![t],
        OneOrMany::Many(v) => v,
    })
}

/// `protocols/seg.toml`. Every key can be overridden with `key=value`; a list key given one value is a one-point
/// grid.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SegConfig {
    pub name: String,
    pub version: String,
    pub description: String,
    pub source: String,
    /// Images and labels are resized to `resolution x resolution` (CAPI's `resolution`).
    pub resolution: i64,
    pub feature: SegFeature,
    pub standardize: Standardize,
    /// Labels left out of fits and scores (CAPI's ADE20K config: 0 and 255).
    pub ignore: Vec<i64>,
    /// Fraction of the training images held out to choose the grid point (CAPI: n // 10).
    pub holdout: f64,
    /// Seed of the held-out permutation.
    pub seed: i64,
    #[serde(deserialize_with = "one_or_many")]
    pub classifiers: Vec<Classifier>,
    #[serde(deserialize_with = "one_or_many")]
    pub knn_k: Vec<i64>,
    #[serde(deserialize_with = "one_or_many")]
    pub knn_distance: Vec<Distance>,
    pub knn_dtype: KnnDtype,
    /// Training patches per distance block (CAPI's `train_set_chunk_size`).
    pub knn_chunk: i64,
    /// Where the bank is held: "auto" (the device as far as it fits, the rest on the host), "device", "host".
    pub knn_bank: BankPlace,
    #[serde(deserialize_with = "one_or_many")]
    pub logreg_c: Vec<f64>,
    pub logreg_max_iter: i64,
    pub logreg_tol: f64,
    /// L-BFGS corrections kept (CAPI's cuML `lbfgs_memory`, 5; scikit-learn's scipy keeps 10): the path, not the
    /// optimum.
    pub logreg_history: i64,
    /// Every n-th training patch row is fitted (CAPI's `train_set_subsampling`: `features[::n]`).
    pub train_subsample: i64,
}

/// CAPI's `10 ** np.linspace(-6, 5, 8)`.
pub fn default_c_grid() -> Vec<f64> {
    (0..8).map(|i| if i == 7 { 1e5 } else { 10f64.powf(-6.0 + i as f64 * 11.0 / 7.0) }).collect()
}

impl Default for SegConfig {
    fn default() -> Self {
        SegConfig {
            name: "seg".into(),
            version: "1".into(),
            description: String::new(),
            source: SOURCE.into(),
            resolution: 224,
            feature: SegFeature::PatchNorm,
            standardize: Standardize::Standard,
            ignore: vec![0, 255],
            holdout: 0.1,
            seed: 0,
            classifiers: vec![Classifier::Knn, Classifier::Logreg],
            knn_k: vec![1, 3, 10, 30],
            knn_distance: vec![Distance::Cosine, Distance::L2],
            knn_dtype: KnnDtype::F32,
            knn_chunk: 262_144,
            knn_bank: BankPlace::Auto,
            logreg_c: default_c_grid(),
            logreg_max_iter: 1000,
            logreg_tol: 1e-12,
            logreg_history: 5,
            train_subsample: 1,
        }
    }
}

impl crate::config::Recipe for SegConfig {
    fn rules() -> Vec<crate::config::Rule> {
        use crate::config::Rule;
        vec![
            Rule::int("resolution", 16, 8192),
            Rule::int("ignore", 0, 255),
            Rule::below("holdout", 0.0, 1.0),
            Rule::int("seed", 0, i64::MAX),
            Rule::int("knn_k", 1, 1 << 20),
            Rule::int("knn_chunk", 1, 1 << 40),
            Rule::above("logreg_c", 0.0, 1e300),
            Rule::int("logreg_max_iter", 1, 100_000_000),
            Rule::real("logreg_tol", 0.0, 1.0),
            Rule::int("logreg_history", 1, 1000),
            Rule::int("train_subsample", 1, 1 << 40),
        ]
    }
}

impl SegConfig {
    pub fn validate(&self) -> Result<()> {
        let nonempty = |key: &str, n: usize| if n == 0 { Err(Error::option(key, "needs at least one value")) } else { Ok(()) };
        nonempty("classifiers", self.classifiers.len())?;
        nonempty("knn_k", self.knn_k.len())?;
        nonempty("knn_distance", self.knn_distance.len())?;
        nonempty("logreg_c", self.logreg_c.len())?;
        if self.classifiers.iter().enumerate().any(|(i, c)| self.classifiers[..i].contains(c)) {
            return Err(Error::option("classifiers", "a classifier is listed twice"));
        }
        if self.needs_holdout() && self.holdout <= 0.0 {
            return Err(Error::option("holdout", "a grid of more than one point needs held-out images (holdout > 0)"));
        }
        Ok(())
    }

    fn knn_grid(&self) -> Vec<(i64, Distance)> {
        // CAPI's itertools.product over {num_neighbors, distance}, in that order.
        self.knn_k.iter().flat_map(|&k| self.knn_distance.iter().map(move |&d| (k, d))).collect()
    }

    /// Whether some classifier in use has a grid to choose from (else nothing is held out).
    pub fn needs_holdout(&self) -> bool {
        self.classifiers.iter().any(|c| match c {
            Classifier::Knn => self.knn_grid().len() > 1,
            Classifier::Logreg => self.logreg_c.len() > 1,
        })
    }
}

// ---------------------------------------------------------------------------------------------- features

/// The patch features `[N * g * g, D]` (f32, CPU) and their pixel labels `[N * g * g, p * p]` (u8, CPU) of a list
/// of images, in list order and row-major patch order within an image (CAPI's `extract_features` rearrangement
/// `bs (ih ph) (iw pw) -> (bs ih iw) (ph pw)`).
pub struct Extracted {
    pub features: Tensor,
    pub labels: Tensor,
    /// Patches per image.
    pub per_image: i64,
}

/// What extraction runs with.
pub struct Extractor<'a> {
    pub model: &'a VisionTransformer,
    pub resolution: i64,
    pub feature: SegFeature,
    pub ignore: Vec<i64>,
    pub batch: usize,
    pub device: Device,
    pub amp: Option<Kind>,
}

/// `[r * r]` labels to `[g * g, p * p]` rows.
pub fn patchify_labels(labels: &[u8], res: i64, patch: i64) -> Tensor {
    let g = res / patch;
    Tensor::from_slice(labels).view([g, patch, g, patch]).permute([0, 2, 1, 3]).reshape([g * g, patch * patch])
}

impl Extractor<'_> {
    /// The tokens of a batch of images `[B, 3, r, r]`: `[B, g * g, D]` f32.
    pub fn tokens(&self, x: &Tensor) -> Tensor {
        let keep: &[i64] = if self.feature == SegFeature::PatchPrenorm { &[-1] } else { &[] };
        let out = tch::no_grad(|| crate::model::vit::with_amp(self.amp, || self.model.forward_features_with(x, keep, false, GridPosEmbed::Timm)));
        let t = match self.feature {
            SegFeature::PatchNorm => out.patch_tokens(),
            SegFeature::PatchPrenorm => {
                let b = &out.intermediates[0];
                b.narrow(1, out.prefix, b.size()[1] - out.prefix)
            }
        };
        t.to_kind(Kind::Float)
    }

    /// Features and labels of `pairs`; a file that cannot be read is an error naming it.
    pub fn extract(&self, pairs: &[Pair], quiet: bool, what: &str) -> Result<Extracted> {
        use rayon::prelude::*;
        let res = self.resolution;
        let patch = self.model.cfg.patch_size;
        let g = res / patch;
        let (mut feats, mut labels) = (Vec::new(), Vec::new());
        let t0 = Instant::now();
        // Borrowed alone: the decode threads must not see the model (its tensors are not Sync).
        let ignore = &self.ignore;
        for (bi, chunk) in pairs.chunks(self.batch.max(1)).enumerate() {
            let read: Vec<(Vec<f32>, Vec<u8>)> = chunk
                .par_iter()
                .map(|p| Ok((ade20k::read_image(&p.image, res as u32)?, ade20k::read_label(&p.annotation, res as u32, ignore)?)))
                .collect::<Result<_>>()?;
            let data: Vec<f32> = read.iter().flat_map(|(x, _)| x.iter().copied()).collect();
            let x = Tensor::from_slice(&data).view([chunk.len() as i64, 3, res, res]).to_device(self.device);
            let t = self.tokens(&x);
            if t.isfinite().all().int64_value(&[]) == 0 {
                return Err(Error::NonFinite(format!("the features of {} hold NaN or infinity (the checkpoint's weights?)", chunk[0].image.display())));
            }
            feats.push(t.reshape([-1, t.size()[2]]).to_device(Device::Cpu));
            labels.extend(read.iter().map(|(_, l)| patchify_labels(l, res, patch)));
            if !quiet && bi % 20 == 0 {
                eprintln!("seg: {what} {}/{} images ({:.0} s)", (bi * self.batch + chunk.len()).min(pairs.len()), pairs.len(), t0.elapsed().as_secs_f64());
            }
        }
        Ok(Extracted { features: Tensor::cat(&feats, 0), labels: Tensor::cat(&labels, 0), per_image: g * g })
    }

    /// [`Extractor::extract`] over the ranks of a job: each rank runs the model on its contiguous block of `pairs`,
    /// the feature rows are gathered to rank 0 in image order, and rank 0 reads every label map itself (a PNG
    /// decode, cheap beside a forward). `None` on the other ranks.
    pub fn extract_sharded(&self, pairs: &[Pair], quiet: bool, what: &str) -> Result<Option<Extracted>> {
        let world = crate::dist::world();
        if !world.is_distributed() {
            return self.extract(pairs, quiet, what).map(Some);
        }
        let per = pairs.len().div_ceil(world.size);
        let (lo, hi) = ((world.rank * per).min(pairs.len()), ((world.rank + 1) * per).min(pairs.len()));
        let mine = if lo < hi { Some(self.extract(&pairs[lo..hi], quiet || !world.is_main(), what)?) } else { None };
        let per_image = (self.resolution / self.model.cfg.patch_size).pow(2);
        let local = mine.map(|e| {
            let m = e.features.size()[0];
            let ids = Tensor::arange_start(lo as i64 * per_image, lo as i64 * per_image + m, (Kind::Int64, Device::Cpu));
            (e.features, ids, Tensor::zeros([m], (Kind::Int64, Device::Cpu)))
        });
        let Some((features, _, filled)) = super::extract::gather_rows(world, local, pairs.len() as i64 * per_image)? else { return Ok(None) };
        let features = features.ok_or_else(|| Error::data(&pairs[0].image, format!("no {what} image was extracted")))?;
        if filled as i64 != pairs.len() as i64 * per_image {
            return Err(Error::data(&pairs[0].image, format!("the ranks extracted {filled} of {} {what} patches", pairs.len() as i64 * per_image)));
        }
        use rayon::prelude::*;
        let (res, patch, ignore) = (self.resolution, self.model.cfg.patch_size, &self.ignore);
        let labels: Vec<Tensor> = pairs.par_iter().map(|p| Ok(patchify_labels(&ade20k::read_label(&p.annotation, res as u32, ignore)?, res, patch))).collect::<Result<_>>()?;
        Ok(Some(Extracted { features, labels: Tensor::cat(&labels, 0), per_image }))
    }
}

// ---------------------------------------------------------------------------------------------- scaler

/// scikit-learn's `StandardScaler` as fitted on f32 rows: mean and variance accumulated in f64
/// (`_incremental_mean_and_var`: `T = sum / n`, `var = (sum((x - T)^2) - sum(x - T)^2 / n) / n`), a constant
/// feature (`_is_constant_feature`) or a tiny one scaled by 1.
pub struct Scaler {
    pub mean: Tensor,
    pub scale: Tensor,
}

impl Scaler {
    pub fn fit(x: &Tensor) -> Scaler {
        let _g = tch::no_grad_guard();
        let n = x.size()[0] as f64;
        let x64 = x.to_kind(Kind::Double);
        let mean = x64.sum_dim_intlist([0i64].as_slice(), false, Kind::Double) / n;
        let temp = &x64 - &mean;
        let correction = temp.sum_dim_intlist([0i64].as_slice(), false, Kind::Double);
        let var = ((&temp * &temp).sum_dim_intlist([0i64].as_slice(), false, Kind::Double) - &correction * &correction / n) / n;
        let eps = f64::EPSILON;
        let bound = &var * (n * eps) + (&mean * (n * eps)).square();
        let constant = var.le_tensor(&bound);
        let scale = var.sqrt();
        let tiny = scale.lt(10.0 * eps).logical_or(&constant);
        let scale = scale.masked_fill(&tiny, 1.0);
        Scaler { mean, scale }
    }

    /// `transform` on f32 rows, as numpy runs it in place: `x -= mean` then `x /= scale`, each in f64 and
    /// rounded back to f32. In blocks, so that the f64 copy stays small.
    pub fn transform(&self, x: &Tensor) -> Tensor {
        let _g = tch::no_grad_guard();
        let n = x.size()[0];
        let parts: Vec<Tensor> = (0..n)
            .step_by(65_536)
            .map(|i| {
                let b = x.narrow(0, i, (n - i).min(65_536)).to_kind(Kind::Double);
                let centred = (b - &self.mean).to_kind(Kind::Float).to_kind(Kind::Double);
                (centred / &self.scale).to_kind(Kind::Float)
            })
            .collect();
        if parts.is_empty() {
            return x.shallow_clone();
        }
        Tensor::cat(&parts, 0)
    }
}

// ---------------------------------------------------------------------------------------------- classifiers

/// The rows a classifier is fitted on, as CAPI's `Classifier.fit`: every `subsample`-th row, then the rows whose
/// label mode is ignored dropped.
pub fn fit_rows(features: &Tensor, labels: &Tensor, subsample: i64, ignore: &[i64]) -> (Tensor, Tensor) {
    let (f, l) = if subsample > 1 {
        let n = features.size()[0];
        let idx = Tensor::arange_start_step(0, n, subsample, (Kind::Int64, Device::Cpu));
        (features.index_select(0, &idx), labels.index_select(0, &idx))
    } else {
        (features.shallow_clone(), labels.shallow_clone())
    };
    let modes = patch_modes(&l);
    let ign = Tensor::from_slice(&ignore.iter().map(|&v| v as u8).collect::<Vec<u8>>());
    let keep = Tensor::isin(&modes, &ign, false, true);
    let idx = keep.nonzero().view([-1]);
    (f.index_select(0, &idx), l.index_select(0, &idx))
}

/// The label of each patch: `torch.mode` over its pixels (the smallest among the most frequent, as torch does).
pub fn patch_modes(labels: &Tensor) -> Tensor {
    labels.mode(-1, false).0
}

/// The logistic regression fitted: weights `[D + 1, C']` over the classes present in the fit (scikit-learn's
/// `classes_`), the intercept last.
pub struct Logreg {
    pub fit: super::lowshot::Fit,
    pub classes: Tensor,
}

impl Logreg {
    /// scikit-learn's `LogisticRegression(penalty="l2", C, max_iter, tol)` with lbfgs: the mean cross-entropy plus
    /// `||W||^2 / (2 C n)` (intercept unpenalised), on the patches' mode labels.
    pub fn fit(features: &Tensor, labels: &Tensor, c: f64, (max_iter, tol, history): (i64, f64, i64), device: Device) -> Result<Logreg> {
        let y = patch_modes(labels).to_kind(Kind::Int64);
        let classes = y.unique_dim(0, true, false, false).0;
        // Each label's index among the classes present (scikit-learn's `classes_`).
        let present = Vec::<i64>::try_from(&classes).expect("class ids");
        let mut lut = vec![0i64; 256];
        for (i, &c) in present.iter().enumerate() {
            lut[c as usize] = i as i64;
        }
        let y_idx = Tensor::from_slice(&lut).index_select(0, &y);
        let opts = super::lowshot::SolveOptions { lambd: 1.0 / c, grad_tol: tol, max_iter, memory: history, device, line_search: super::lowshot::LineSearch::Wolfe, f32_products: true };
        // scikit-learn's lbfgs options: gtol = tol, ftol = 64 * eps.
        let fit = super::lowshot::fit_with_intercept(features, &y_idx, classes.size()[0], &opts, Some(64.0 * f64::EPSILON))?;
        Ok(Logreg { fit, classes })
    }

    /// Each row's class (the lowest among equal scores), given to its `pixels` pixels: `[n, pixels]` u8.
    pub fn predict(&self, features: &Tensor, pixels: i64) -> Tensor {
        let n = features.size()[0];
        let parts: Vec<Tensor> = (0..n)
            .step_by(65_536)
            .map(|i| {
                let x = super::lowshot::with_ones(&features.narrow(0, i, (n - i).min(65_536)));
                super::lowshot::predict(&x, &self.fit.weights).to_device(Device::Cpu)
            })
            .collect();
        let idx = Tensor::cat(&parts, 0);
        self.classes.index_select(0, &idx).to_kind(Kind::Uint8).unsqueeze(1).expand([n, pixels], false).contiguous()
    }
}

// ---------------------------------------------------------------------------------------------- metrics

/// mIoU and pixel accuracy of one prediction, in [0, 1], and the IoU of every class scored.
#[derive(Debug, Clone, Serialize)]
pub struct Scores {
    pub miou: f64,
    pub accuracy: f64,
    pub per_class: Vec<(u8, f64)>,
}

/// CAPI's `mIoU` and `accuracy`: over the pixels whose truth is not ignored, scikit-learn's
/// `jaccard_score(average="macro")` (the mean over the labels present in the truth or the prediction of
/// `tp / (tp + fp + fn)`) and the fraction equal.
pub fn score(truth: &Tensor, pred: &Tensor, ignore: &[i64]) -> Result<Scores> {
    let gt = Vec::<u8>::try_from(truth.to_kind(Kind::Uint8).contiguous().view([-1])).expect("u8 labels");
    let pr = Vec::<u8>::try_from(pred.to_kind(Kind::Uint8).contiguous().view([-1])).expect("u8 labels");
    let mut ign = [false; 256];
    for &i in ignore {
        ign[i as usize] = true;
    }
    let mut conf = vec![0u64; 256 * 256];
    for (&g, &p) in gt.iter().zip(&pr) {
        if !ign[g as usize] {
            conf[g as usize * 256 + p as usize] += 1;
        }
    }
    let total: u64 = conf.iter().sum();
    if total == 0 {
        return Err(Error::data("validation labels", "every pixel is ignored: nothing to score"));
    }
    let mut per_class = Vec::new();
    let mut correct = 0u64;
    for c in 0..256 {
        let tp = conf[c * 256 + c];
        let row: u64 = conf[c * 256..(c + 1) * 256].iter().sum();
        let col: u64 = (0..256).map(|g| conf[g * 256 + c]).sum();
        correct += tp;
        if row + col > 0 {
            per_class.push((c as u8, tp as f64 / (row + col - tp) as f64));
        }
    }
    let miou = per_class.iter().map(|(_, v)| v).sum::<f64>() / per_class.len() as f64;
    Ok(Scores { miou, accuracy: correct as f64 / total as f64, per_class })
}

// ---------------------------------------------------------------------------------------------- selection

/// The training images as the fits see them: `rest` (fits during selection, in permutation order) and `held`
/// (scored during selection); the final fit takes `rest` then `held`, as CAPI's `torch.cat([train, val])`.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSplit {
    pub held: Vec<usize>,
    pub rest: Vec<usize>,
}

impl TrainSplit {
    /// Nothing held out: every image, in order.
    pub fn all(n: usize) -> TrainSplit {
        TrainSplit { held: Vec::new(), rest: (0..n).collect() }
    }

    /// A seeded permutation (ChaCha8, the same on every machine) of the `n` training images; its first
    /// `floor(n * fraction)` are held out (CAPI: `idxs[: n // 10]`).
    pub fn seeded(n: usize, fraction: f64, seed: u64) -> Result<TrainSplit> {
        let mut perm: Vec<usize> = (0..n).collect();
        perm.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
        let h = ((n as f64 * fraction) + 1e-9).floor() as usize;
        if h == 0 || h == n {
            return Err(Error::option("holdout", format!("{fraction} of {n} training images holds out {h}: choosing a grid point needs at least one held-out image and one to fit")));
        }
        Ok(TrainSplit { held: perm[..h].to_vec(), rest: perm[h..].to_vec() })
    }

    pub fn final_order(&self) -> Vec<usize> {
        self.rest.iter().chain(&self.held).copied().collect()
    }
}

/// The rows of `images` (each `per_image` rows) of an extracted split, in the images' order.
pub fn rows_of(t: &Tensor, images: &[usize], per_image: i64) -> Tensor {
    let idx: Vec<i64> = images.iter().flat_map(|&i| (i as i64 * per_image)..((i as i64 + 1) * per_image)).collect();
    t.index_select(0, &Tensor::from_slice(&idx))
}

/// The patch features and labels every classifier sees, standardised.
pub struct Prepared {
    /// Training rows in `split.final_order()`.
    pub train_x: Tensor,
    pub train_y: Tensor,
    /// The first `rest_rows` of the training rows are the `rest` images.
    pub rest_rows: i64,
    pub val_x: Tensor,
    pub val_y: Tensor,
    pub pixels: i64,
}

impl Prepared {
    /// Reorders the training rows by the split, fits the scaler on the `rest` images (all of them without a
    /// held-out part) and applies it to every row.
    pub fn new(train: &Extracted, val: &Extracted, split: &TrainSplit, standardize: Standardize) -> Prepared {
        let order = split.final_order();
        let train_x = rows_of(&train.features, &order, train.per_image);
        let train_y = rows_of(&train.labels, &order, train.per_image);
        let rest_rows = split.rest.len() as i64 * train.per_image;
        let (train_x, val_x) = match standardize {
            Standardize::Standard => {
                let s = Scaler::fit(&train_x.narrow(0, 0, rest_rows));
                (s.transform(&train_x), s.transform(&val.features))
            }
            Standardize::None => (train_x, val.features.shallow_clone()),
        };
        Prepared { train_x, train_y, rest_rows, val_x, val_y: val.labels.shallow_clone(), pixels: train.labels.size()[1] }
    }
    fn rest(&self) -> (Tensor, Tensor) {
        (self.train_x.narrow(0, 0, self.rest_rows), self.train_y.narrow(0, 0, self.rest_rows))
    }
    fn held(&self) -> (Tensor, Tensor) {
        let n = self.train_x.size()[0];
        (self.train_x.narrow(0, self.rest_rows, n - self.rest_rows), self.train_y.narrow(0, self.rest_rows, n - self.rest_rows))
    }
}

/// One classifier's outcome: the grid's held-out mIoU (percent; empty for a one-point grid), the chosen point,
/// the validation scores, and the fit's details.
#[derive(Debug, Clone, Serialize)]
pub struct ClassifierOutcome {
    pub grid: Vec<(String, f64)>,
    pub chosen: String,
    pub scores: Scores,
    pub fit: serde_json::Value,
    pub seconds: f64,
}

/// The memory a fit on `rows` training rows takes, checked against what this process may use.
/// `queries` is the most rows one search scores (the held-out or the validation patches).
pub fn check_fit_memory(cfg: &SegConfig, which: Classifier, (rows, queries): (i64, i64), dim: i64, pixels: i64, classes: i64) -> Result<()> {
    let rows = (rows / cfg.train_subsample.max(1)) as u128;
    let (queries, dim, pixels, classes) = (queries as u128, dim as u128, pixels as u128, classes as u128);
    let (bytes, what) = match which {
        // The bank and its labels; the queries' copy in the search dtype and their k nearest so far (distances and
        // ids, twice while merging); one block of distances, and the neighbours' label rows of one vote.
        Classifier::Knn => {
            let el = if cfg.knn_dtype == KnnDtype::Bf16 { 2 } else { 4 };
            let k = *cfg.knn_k.iter().max().unwrap_or(&1) as u128;
            let chunk = (cfg.knn_chunk as u128).min(rows.max(1));
            let search = queries * (dim * el + 2 * k * (el + 8)) + INFERENCE_BS as u128 * (chunk * 4 + k * pixels);
            (rows * (dim * el + pixels) + search, "the k-NN bank and its search")
        }
        // f32 rows with the ones column, and a few [rows, classes] f64 logit matrices.
        Classifier::Logreg => (rows * ((dim + 1) * 4 + classes * 8 * 6), "the logistic regression's f32 rows and f64 logits"),
    };
    crate::info::check_fits("train_subsample", &format!("{what} ({rows} training patches; fewer with train_subsample=N)"), bytes)
}

fn knn_point((k, d): (i64, Distance)) -> String {
    format!("num_neighbors={k}_distance={}", d.name())
}

fn c_point(c: f64) -> String {
    format!("C={c}")
}

/// The k-NN search's settings.
fn search_options(cfg: &SegConfig, device: Device) -> SearchOptions {
    SearchOptions { chunk: cfg.knn_chunk, dtype: cfg.knn_dtype.kind(), place: cfg.knn_bank, device }
}

/// The scores of the k-NN at each of `points`, its bank fitted on `(x, y)`, queried with `(qx, qy)`.
fn knn_scores(cfg: &SegConfig, search: &mut Search, points: &[(i64, Distance)], (x, y): (Tensor, Tensor), (qx, qy): (&Tensor, &Tensor)) -> Result<Vec<Scores>> {
    let (fx, fy) = fit_rows(&x, &y, cfg.train_subsample, &cfg.ignore);
    search.load(&fx, &fy)?;
    points.iter().map(|&(k, d)| score(qy, &search.predict(qx, k, d)?, &cfg.ignore)).collect()
}

/// A logistic regression fitted on `(x, y)` and scored on `(qx, qy)`; also the fit's report.
fn logreg_score(cfg: &SegConfig, c: f64, (x, y): (Tensor, Tensor), (qx, qy): (&Tensor, &Tensor), pixels: i64, device: Device) -> Result<(Scores, serde_json::Value)> {
    let (fx, fy) = fit_rows(&x, &y, cfg.train_subsample, &cfg.ignore);
    if fx.size()[0] == 0 {
        return Err(Error::option("ignore", "every training patch's label is ignored: nothing to fit"));
    }
    let lr = Logreg::fit(&fx, &fy, c, (cfg.logreg_max_iter, cfg.logreg_tol, cfg.logreg_history), device)?;
    let s = score(qy, &lr.predict(qx, pixels), &cfg.ignore)?;
    let classes = Vec::<i64>::try_from(&lr.classes).unwrap_or_default();
    Ok((s, serde_json::json!({ "fit": lr.fit, "classes": classes })))
}

/// CAPI's `select_hparams` then the refit on every training image and the score on validation, for one
/// classifier. `held` is None when nothing is held out (then the grid must be one point).
pub fn evaluate(cfg: &SegConfig, which: Classifier, data: &Prepared, device: Device) -> Result<ClassifierOutcome> {
    let t0 = Instant::now();
    let dim = data.train_x.size()[1];
    let rows = data.train_x.size()[0];
    check_fit_memory(cfg, which, (rows, data.val_x.size()[0].max(rows - data.rest_rows)), dim, data.pixels, 151)?;
    let has_held = data.rest_rows < data.train_x.size()[0];
    let mut grid = Vec::new();
    let all = (data.train_x.shallow_clone(), data.train_y.shallow_clone());
    let val = (&data.val_x, &data.val_y);
    let (chosen, scores, fit) = match which {
        Classifier::Knn => {
            // Under a launcher the other ranks search their chunks of the bank (`follow`).
            let mut search = Search::new(crate::dist::world(), search_options(cfg, device));
            let points = cfg.knn_grid();
            let mut best = points[0];
            if points.len() > 1 {
                let (hx, hy) = data.held();
                let held = knn_scores(cfg, &mut search, &points, data.rest(), (&hx, &hy))?;
                let mut best_score = f64::NEG_INFINITY;
                for (&p, s) in points.iter().zip(&held) {
                    grid.push((knn_point(p), 100.0 * s.miou));
                    // CAPI's max() over the grid keeps the first best.
                    if s.miou > best_score {
                        (best, best_score) = (p, s.miou);
                    }
                }
            }
            let s = knn_scores(cfg, &mut search, &[best], all, val)?.remove(0);
            let report = search.report();
            search.stop()?;
            (knn_point(best), s, serde_json::json!({ "k": best.0, "distance": best.1.name(), "search": report }))
        }
        Classifier::Logreg => {
            let mut best = cfg.logreg_c[0];
            if cfg.logreg_c.len() > 1 {
                let (hx, hy) = data.held();
                let mut best_score = f64::NEG_INFINITY;
                for &c in &cfg.logreg_c {
                    let s = logreg_score(cfg, c, data.rest(), (&hx, &hy), data.pixels, device)?.0.miou;
                    grid.push((c_point(c), 100.0 * s));
                    if s > best_score {
                        (best, best_score) = (c, s);
                    }
                }
            }
            let (s, fit) = logreg_score(cfg, best, all, val, data.pixels, device)?;
            (c_point(best), s, serde_json::json!({ "C": best, "solver": fit }))
        }
    };
    debug_assert!(has_held || grid.is_empty());
    Ok(ClassifierOutcome { grid, chosen, scores, fit, seconds: t0.elapsed().as_secs_f64() })
}

// ---------------------------------------------------------------------------------------------- run

/// One hash over the relative path and size of every image and annotation of both splits.
pub(crate) fn set_fingerprint(set: &AdeSet) -> Result<SplitPrint> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut bytes = 0u64;
    for p in set.train.iter().chain(&set.val) {
        for f in [&p.image, &p.annotation] {
            let len = std::fs::metadata(f).map_err(|e| Error::io(f, e))?.len();
            h.update(format!("{}\t{len}\n", f.strip_prefix(&set.root).unwrap_or(f).display()).as_bytes());
            bytes += len;
        }
    }
    let fingerprint = serde_json::json!({
        "training": set.train.len(), "validation": set.val.len(), "bytes": bytes,
        "files_sha256": hex::encode(h.finalize())[..16].to_string(),
    });
    let hash = super::extract::fingerprint_hash(&fingerprint);
    Ok(SplitPrint { role: "ade20k".into(), fingerprint, hash })
}

/// The memory the extracted features and labels of both splits take, checked before extraction.
fn check_extraction_memory(set: &AdeSet, per_image: i64, dim: i64, pixels: i64) -> Result<()> {
    let n = (set.train.len() + set.val.len()) as u128 * per_image as u128;
    // Features f32 (and their standardised copy) and u8 labels.
    let bytes = n * (dim as u128 * 8 + pixels as u128);
    crate::info::check_fits("--data", &format!("the patch features of {} images ({n} patches of {dim} floats, kept for the fits as CAPI does)", set.train.len() + set.val.len()), bytes)
}

fn outcome_json(o: &ClassifierOutcome) -> serde_json::Value {
    let grid: serde_json::Map<String, serde_json::Value> = o.grid.iter().map(|(k, v)| (k.clone(), serde_json::json!(v))).collect();
    let per_class: serde_json::Map<String, serde_json::Value> = o.scores.per_class.iter().map(|(c, v)| (c.to_string(), serde_json::json!(100.0 * v))).collect();
    serde_json::json!({
        "chosen": o.chosen, "heldout_miou": grid, "per_class_iou": per_class, "fit": o.fit, "seconds": o.seconds,
        "miou": 100.0 * o.scores.miou, "accuracy": 100.0 * o.scores.accuracy,
    })
}

/// Every classifier of `cfg`, the k-NN first: under a launcher the other ranks wait in its collectives, not
/// through the fits.
fn evaluate_all(cfg: &SegConfig, data: &Prepared, device: Device) -> Result<Vec<(Classifier, ClassifierOutcome)>> {
    let mut order = cfg.classifiers.clone();
    order.sort_by_key(|c| *c != Classifier::Knn);
    order.into_iter().map(|c| Ok((c, evaluate(cfg, c, data, device)?))).collect()
}

/// What the record's config says of the inputs, the features and the solvers, in words.
fn config_text(cfg: &SegConfig, patch: i64, precision: crate::config::Precision, device: Device) -> serde_json::Value {
    serde_json::json!({
        "input_size": format!("{r}x{r}", r = cfg.resolution),
        "grid": format!("{g}x{g}", g = cfg.resolution / patch),
        "precision": precision.effective(device),
        "feature_text": match cfg.feature {
            SegFeature::PatchNorm => "last block's patch tokens after the final norm, prefix tokens dropped, f32",
            SegFeature::PatchPrenorm => "last block's patch tokens before the final norm, prefix tokens dropped, f32",
        },
        "image_transform": "convert RGB, Resize((r, r)) bicubic (Pillow), ToTensor, Normalize(ImageNet)",
        "label_transform": "convert P, Resize((r, r)) nearest (Pillow)",
        "knn_search_dtype": format!("{:?}", cfg.knn_dtype).to_lowercase(),
        "logreg_solver": format!("scikit-learn's LogisticRegression objective (multinomial, L2 / (2 C n), intercept unpenalised) by the low-shot L-BFGS (products with the rows in f32, weights, logits and solver state in f64), history {}, strong-Wolfe line search (CAPI: cuML)", cfg.logreg_history),
    })
}

/// `eval --protocol seg`. Under a launcher the ranks share the forward passes and the k-NN search ([`Search`]);
/// rank 0 fits the logistic regression and writes the record.
pub fn run(req: &EvalRequest) -> Result<RunRecord> {
    let loaded = Protocol::Seg.load::<SegConfig>(req.protocol_file.as_deref(), &req.sets)?;
    let cfg = &loaded.cfg;
    cfg.validate()?;
    let device = req.run.device()?;
    let precision = req.run.precision.unwrap_or(crate::config::Precision::F32);
    let amp = precision.autocast(device);
    let root = req.data.as_deref().ok_or_else(|| Error::option("--data", "the seg protocol needs an ADE20K root (ADEChallengeData2016 or its parent folder)"))?;
    let ckpt = req.checkpoint()?;
    let set = ade20k::open_set(root)?;
    let print = set_fingerprint(&set)?;
    let opts = crate::checkpoint::LoadOptions { img_size: Some(cfg.resolution), ..req.load_options() };
    let enc = load_vit_with(ckpt, &opts, device, 0)?;
    let model = &enc.model;
    let patch = model.cfg.patch_size;
    if cfg.resolution % patch != 0 {
        return Err(Error::option("resolution", format!("{} is not a multiple of the model's patch size {patch}", cfg.resolution)));
    }
    let per_image = (cfg.resolution / patch).pow(2);
    check_extraction_memory(&set, per_image, model.cfg.embed_dim, patch * patch)?;
    let split = if cfg.needs_holdout() { TrainSplit::seeded(set.train.len(), cfg.holdout, cfg.seed as u64)? } else { TrainSplit::all(set.train.len()) };
    let ex = Extractor { model, resolution: cfg.resolution, feature: cfg.feature, ignore: cfg.ignore.clone(), batch: req.run.batch_size.clamp(1, if device.is_cuda() { 256 } else { 32 }), device, amp };
    let t0 = Instant::now();
    // Under a launcher the ranks share the forward passes and the k-NN search; the fits run on rank 0.
    let train = ex.extract_sharded(&set.train, req.run.quiet, "training")?;
    let val = ex.extract_sharded(&set.val, req.run.quiet, "validation")?;
    let (Some(train), Some(val)) = (train, val) else {
        if cfg.classifiers.contains(&Classifier::Knn) {
            Search::new(crate::dist::world(), search_options(cfg, device)).follow()?;
        }
        let b = RecordBuilder::new(Protocol::Seg, &cfg.version, &loaded.overrides(&[]));
        return b.finish(serde_json::json!({ "fits": "on rank 0", "k-NN search": "this rank's chunks of the bank" }), &device_name(device), &req.output);
    };
    let seconds_features = t0.elapsed().as_secs_f64();
    let data = Prepared::new(&train, &val, &split, cfg.standardize);
    drop((train, val));
    let outcomes = evaluate_all(cfg, &data, device)?;
    let name = req.model_name("model");
    let overrides = loaded.overrides(&[]);
    let held_stems: Vec<&str> = split.held.iter().map(|&i| set.train[i].stem.as_str()).collect();
    let extra = config_text(cfg, patch, precision, device);
    let mut details = serde_json::json!({
        "split": {
            "seed": cfg.seed, "holdout": cfg.holdout, "training_images": set.train.len(), "validation_images": set.val.len(),
            "held_out_images": held_stems,
            "note": if split.held.is_empty() { "every grid is one point: nothing held out, the scaler fitted on every training image (CAPI still holds a tenth out)" } else { "the scaler and every grid point fitted on the other training images; the chosen point refitted on all (the others, then the held-out ones)" },
        },
        "training_patches": data.train_x.size()[0], "validation_patches": data.val_x.size()[0],
        "seconds_features": seconds_features,
    });
    let mut builder = RecordBuilder::new(Protocol::Seg, &cfg.version, &overrides)
        .headline(if cfg.classifiers.contains(&Classifier::Knn) { "miou_knn" } else { "miou_logreg" })
        .model(name, Some(ckpt), Some(enc.sha256.clone()), Some(model.cfg.arch.clone()))
        .source(serde_json::to_value(&enc.source).ok())
        .data(Some(root.display().to_string()), &[print])
        .config(&loaded.origin, cfg, &overrides, &req.run, extra)
        .seed(cfg.seed as u64);
    for (c, o) in &outcomes {
        let tag = match c {
            Classifier::Knn => "knn",
            Classifier::Logreg => "logreg",
        };
        builder = builder.metric(&format!("miou_{tag}"), 100.0 * o.scores.miou).metric(&format!("acc_{tag}"), 100.0 * o.scores.accuracy);
        details[tag] = outcome_json(o);
    }
    builder.finish(details, &device_name(device), &req.output)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_file_is_the_default_and_one_value_is_a_one_point_grid() {
        let l = Protocol::Seg.load::<SegConfig>(None, &[]).unwrap();
        assert_eq!(l.cfg, SegConfig { description: l.cfg.description.clone(), ..SegConfig::default() });
        assert!(l.cfg.needs_holdout());
        let sets: Vec<String> = ["knn_k=10", "knn_distance=\"L2\"", "logreg_c=1.0", "classifiers=\"knn\""].iter().map(|s| s.to_string()).collect();
        let l = Protocol::Seg.load::<SegConfig>(None, &sets).unwrap();
        assert_eq!((l.cfg.knn_k.clone(), l.cfg.knn_distance.clone(), l.cfg.logreg_c.clone()), (vec![10], vec![Distance::L2], vec![1.0]));
        assert_eq!(l.cfg.classifiers, vec![Classifier::Knn]);
        assert!(!l.cfg.needs_holdout());
        // A grid of the unused classifier holds nothing out either.
        let l = Protocol::Seg.load::<SegConfig>(None, &sets[..3]).unwrap();
        assert!(!l.cfg.needs_holdout());
        let bad = Protocol::Seg.load::<SegConfig>(None, &["knn_k=[]".to_string()]).unwrap().cfg.validate().unwrap_err();
        assert!(bad.to_string().contains("knn_k"), "{bad}");
    }

    #[test]
    fn scores_are_sklearns_macro_jaccard_over_the_labels_present() {
        // Truth 1 1 2 2 0(ignored) 3; prediction 1 2 2 0 1 4: labels present {0, 1, 2, 3, 4} over the 5 scored pixels.
        let truth = Tensor::from_slice(&[1u8, 1, 2, 2, 0, 3]).view([1, 6]);
        let pred = Tensor::from_slice(&[1u8, 2, 2, 0, 1, 4]).view([1, 6]);
        let s = score(&truth, &pred, &[0, 255]).unwrap();
        // IoU: 0 -> 0/1, 1 -> 1/2, 2 -> 1/3, 3 -> 0/2, 4 -> 0/1.
        assert!((s.miou - (0.5 + 1.0 / 3.0) / 5.0).abs() < 1e-15);
        assert!((s.accuracy - 2.0 / 5.0).abs() < 1e-15);
        assert_eq!(s.per_class.iter().map(|(c, _)| *c).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn patch_labels_are_torch_modes_and_the_split_is_seeded() {
        // A tie between 3 and 7: torch.mode gives the smaller.
        let l = Tensor::from_slice(&[7u8, 3, 7, 3, 5, 5, 5, 1]).view([2, 4]);
        assert_eq!(Vec::<u8>::try_from(patch_modes(&l)).unwrap(), vec![3, 5]);
        let a = TrainSplit::seeded(25, 0.1, 3).unwrap();
        assert_eq!(a.held.len(), 2);
        assert_eq!(a.held, TrainSplit::seeded(25, 0.1, 3).unwrap().held);
        assert_ne!(a.held, TrainSplit::seeded(25, 0.1, 4).unwrap().held);
        let mut all = a.final_order();
        all.sort();
        assert_eq!(all, (0..25).collect::<Vec<_>>());
        assert!(TrainSplit::seeded(5, 0.1, 0).is_err());
    }
}
