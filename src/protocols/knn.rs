//! Nearest-neighbour protocols on L2-normalised features with cosine similarity:
//! - DINO's weighted k-NN (`facebookresearch/dino:eval_knn.py`): each of the k most similar train features votes
//!   for its label with weight exp(sim / T); top-1 and top-5 of the summed votes, all k from one search;
//! - the Latent MIM reference code's leave-one-out 1-NN on the val split: the most similar other val image decides.
//!
//! The search is a chunked matmul + top-k in libtorch: queries in chunks, the bank in chunks whose top-k lists are
//! merged, so memory stays bounded by `query_chunk x bank_chunk` similarities. Results are deterministic and do
//! not depend on the chunk sizes: neighbours are ordered by (similarity desc, bank index asc) and classes by
//! (votes desc, class index asc). Top-5 follows DINO: every class is ranked (a class without a vote has 0), and
//! the first `min(5, k)` count, so with fewer than 5 voted classes the rest are filled by the lowest unvoted ones.
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::extract::FeatureKind;
use crate::error::{Error, Result};


/// Eval transform of a protocol file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TransformSpec {
    /// Resize to floor(img_size / crop_pct), then center-crop img_size.
    pub crop_pct: f64,
    pub interpolation: String,
}

impl Default for TransformSpec {
    fn default() -> Self {
        TransformSpec { crop_pct: 0.875, interpolation: "bicubic".into() }
    }
}

/// A neighbour protocol file (`protocols/knn.toml`, `protocols/nn_loo.toml`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ProtocolSpec {
    pub name: String,
    pub version: String,
    pub description: String,
    pub feature: FeatureKind,
    pub last_blocks: i64,
    /// k-NN only.
    pub ks: Vec<i64>,
    pub temperature: Option<f64>,
    pub headline_k: Option<i64>,
    /// k-NN sweep only: every (k, T) of `ks` x `temperatures` is scored from one search.
    pub temperatures: Vec<f64>,
    /// Splits: `bank` and `query` (k-NN: train and val; LOO: val and val).
    pub bank_split: String,
    pub query_split: String,
    pub transform: TransformSpec,
    pub source: String,
    /// nn-loo only: `all` (every val image) or `lmim-ddp` (the images the Latent MIM code scores: a shuffled
    /// DistributedSampler over `world_size` ranks, seed 0, and the loader's drop_last at `batch_size` per rank).
    pub subset: String,
    pub world_size: Option<i64>,
    pub batch_size: Option<i64>,
}

impl Default for ProtocolSpec {
    fn default() -> Self {
        ProtocolSpec {
            name: String::new(),
            version: String::new(),
            description: String::new(),
            feature: FeatureKind::Cls,
            last_blocks: 1,
            ks: Vec::new(),
            temperature: None,
            headline_k: None,
            temperatures: Vec::new(),
            bank_split: "train".into(),
            query_split: "val".into(),
            transform: TransformSpec::default(),
            source: String::new(),
            subset: "all".into(),
            world_size: None,
            batch_size: None,
        }
    }
}

impl crate::config::Recipe for ProtocolSpec {
    fn rules() -> Vec<crate::config::Rule> {
        use crate::config::Rule;
        vec![
            Rule::int("last_blocks", 1, 64),
            // Per entry.
            Rule::int("ks", 1, 1 << 20),
            Rule::above("temperature", 0.0, 1000.0),
            Rule::above("temperatures", 0.0, 1000.0),
            Rule::int("headline_k", 1, 1 << 20).one_of("ks"),
            Rule::above("transform.crop_pct", 0.0, 1.0),
            Rule::int("world_size", 1, 1 << 16),
            Rule::int("batch_size", 1, 1 << 24),
        ]
    }
}

impl ProtocolSpec {
    /// Checks the settings; `origin` names the file (or the override) in errors. k-NN's list of k is sorted.
    pub fn validate(&mut self, origin: &str) -> Result<()> {
        let bad = |reason: String| Error::BadConfig { path: origin.into(), reason };
        if let Some(v) = crate::config::violation(self) {
            return Err(bad(format!("key `{}` = {}: {}", v.key, v.value, v.reason)));
        }
        if self.transform.interpolation != "bicubic" {
            return Err(bad(format!("interpolation `{}`: only bicubic is implemented", self.transform.interpolation)));
        }
        let voting = self.name == "knn" || self.name == "knn-sweep";
        if voting {
            if self.ks.is_empty() {
                return Err(bad("ks must be a non-empty list of positive integers, e.g. [10, 20, 100, 200]".into()));
            }
            self.ks.sort_unstable();
            self.ks.dedup();
        }
        if self.name == "knn-sweep" {
            if self.temperatures.is_empty() {
                return Err(bad("temperatures must be a non-empty list of positive numbers, e.g. [0.07, 0.1, 0.2]".into()));
            }
            if self.temperature.is_some() || self.headline_k.is_some() {
                return Err(bad("a sweep reports its best (k, T): temperature and headline_k do not apply (use temperatures)".into()));
            }
        } else if !self.temperatures.is_empty() {
            return Err(bad(format!("`{}`: temperatures apply to knn-sweep only", self.name)));
        }
        if self.name == "knn" {
            if self.temperature.is_none() {
                return Err(bad("temperature must be a positive number".into()));
            }
            if self.headline_k.is_none() {
                return Err(bad("headline_k must be one of ks".into()));
            }
        } else if !voting && (!self.ks.is_empty() || self.temperature.is_some() || self.headline_k.is_some()) {
            return Err(bad(format!("`{}` is a 1-NN without voting: ks, temperature and headline_k do not apply", self.name)));
        }
        match (self.name.as_str(), self.subset.as_str()) {
            (_, "all") => {
                if self.world_size.is_some() || self.batch_size.is_some() {
                    return Err(bad("world_size and batch_size apply to subset = \"lmim-ddp\" only".into()));
                }
            }
            ("nn-loo", "lmim-ddp") => {
                if self.world_size.is_none() || self.batch_size.is_none() {
                    return Err(bad("subset = \"lmim-ddp\" needs world_size and batch_size (the reference's GPUs and per-GPU batch, e.g. 8 and 256)".into()));
                }
            }
            ("nn-loo", other) => return Err(bad(format!("subset `{other}`: one of \"all\", \"lmim-ddp\""))),
            (name, other) => return Err(bad(format!("subset `{other}`: `{name}` scores every val image (subset = \"all\")"))),
        }
        Ok(())
    }
}

/// The search implementation: libtorch (chunked matmul + top-k on `device`), or faiss's exact inner-product
/// index on the CPU (`IndexFlatIP`, f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Chunked libtorch matmul + top-k on the device (the faster of the two on the CPU, benchmarks/knn.md).
    Torch,
    /// faiss's exact inner-product index (IndexFlatIP), CPU; cargo feature `faiss`.
    Faiss,
}

/// Search settings.
#[derive(Clone, Debug)]
pub struct SearchConfig {
    /// Queries per similarity block (and per faiss search call).
    pub query_chunk: i64,
    /// Bank rows per similarity block (their top-k lists are merged); torch only.
    pub bank_chunk: i64,
    pub device: Device,
    pub backend: Backend,
}

impl SearchConfig {
    /// libtorch on any device: on the CPU it searched 10 k x 100 k x 768 in 10.3 s against faiss's 18.9 s
    /// (benchmarks/knn.md), so faiss is used only when asked for. Blocks of at most 2^26 similarities
    /// (256 MiB in f32) on the CPU, 2^29 on CUDA.
    pub fn auto(device: Device, n_bank: i64) -> Self {
        Self::with_backend(device, n_bank, Backend::Torch)
    }

    pub fn with_backend(device: Device, n_bank: i64, backend: Backend) -> Self {
        let budget: i64 = if device.is_cuda() { 1 << 29 } else { 1 << 26 };
        let query_chunk = 1024;
        let bank_chunk = (budget / query_chunk).min(n_bank.max(1));
        SearchConfig { query_chunk, bank_chunk, device, backend }
    }

    pub fn backend_name(&self) -> String {
        match (self.backend, self.device) {
            (Backend::Faiss, _) => "faiss-cpu".into(),
            (Backend::Torch, Device::Cpu) => "torch-cpu".into(),
            (Backend::Torch, Device::Cuda(i)) => format!("torch-cuda:{i}"),
            (Backend::Torch, d) => format!("torch-{d:?}"),
        }
    }

    /// Positive chunks, and faiss only where it is built in and on the CPU.
    pub fn check(&self) -> Result<()> {
        if self.query_chunk < 1 || self.bank_chunk < 1 {
            return Err(Error::option("--query-chunk/--bank-chunk", "must be positive"));
        }
        // A block holds query_chunk x bank_chunk similarities plus their top-k.
        let block = self.query_chunk as u128 * self.bank_chunk as u128 * 8;
        crate::info::check_fits("--query-chunk/--bank-chunk", &format!("blocks of {} x {} similarities", self.query_chunk, self.bank_chunk), block)?;
        if self.backend == Backend::Faiss {
            if !faiss_available() {
                return Err(Error::option("--backend", "faiss is not built into this binary (cargo feature `faiss`)"));
            }
            if self.device != Device::Cpu {
                return Err(Error::option("--backend", "faiss runs on the CPU here; use --device cpu or the torch back-end"));
            }
        }
        Ok(())
    }
}

/// Keeps the BLAS that faiss links from competing with libtorch's threads (a no-op without faiss). The binary
/// calls it at start; library users that train in-process should too.
pub fn quiet_faiss_blas() {
    #[cfg(feature = "faiss")]
    faiss_bank::single_threaded_blas();
}

/// Whether this build has the faiss back-end (cargo feature `faiss`).
pub fn faiss_available() -> bool {
    cfg!(feature = "faiss")
}

/// A normalised bank ready for searching with either back-end.
enum Bank {
    Torch(Tensor),
    #[cfg(feature = "faiss")]
    Faiss(faiss_bank::FaissBank),
}

impl Bank {
    fn new(bank: Tensor, search: &SearchConfig) -> Result<Bank> {
        match search.backend {
            Backend::Torch => Ok(Bank::Torch(bank)),
            #[cfg(feature = "faiss")]
            Backend::Faiss => Ok(Bank::Faiss(faiss_bank::FaissBank::new(bank)?)),
            #[cfg(not(feature = "faiss"))]
            Backend::Faiss => unreachable!("SearchConfig::check refuses faiss without the feature"),
        }
    }

    /// As [`search_block`]: the top `k` by (similarity desc, index asc), query i excluded at row o + i.
    fn search(&mut self, queries: &Tensor, k: i64, bank_chunk: i64, self_offset: Option<i64>) -> Result<(Tensor, Tensor)> {
        match self {
            Bank::Torch(b) => Ok(search_block(queries, b, k, bank_chunk, self_offset)),
            #[cfg(feature = "faiss")]
            Bank::Faiss(f) => f.search(queries, k, self_offset),
        }
    }
}

#[cfg(feature = "faiss")]
mod faiss_bank {
    use faiss::{FlatIndex, Index};
    use tch::{Device, Kind, Tensor};

    use crate::error::{Error, Result};

    pub struct FaissBank {
        index: FlatIndex,
        /// The same rows in f32, for the exact recount of a row whose k-th place is tied.
        bank: Tensor,
    }

    #[link(name = "openblas")]
    extern "C" {
        fn openblas_set_num_threads(n: std::os::raw::c_int);
    }

    /// OpenBLAS (linked for faiss) keeps its own worker threads beside libtorch's OpenMP pool; measured on 2 cores,
    /// they halve the speed of training steps that never call OpenBLAS. They are held at one thread except while
    /// faiss searches.
    pub fn single_threaded_blas() {
        // SAFETY: a plain setter of OpenBLAS's thread count, callable at any time.
        unsafe { openblas_set_num_threads(1) }
    }

    struct BlasThreads;
    impl BlasThreads {
        fn enter() -> Self {
            // SAFETY: as above.
            unsafe { openblas_set_num_threads(tch::get_num_threads().max(1)) };
            BlasThreads
        }
    }
    impl Drop for BlasThreads {
        fn drop(&mut self) {
            single_threaded_blas();
        }
    }

    fn faiss_err(e: faiss::error::Error) -> Error {
        Error::data("faiss", e.to_string())
    }

    impl FaissBank {
        pub fn new(bank: Tensor) -> Result<Self> {
            let bank = bank.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
            let d = bank.size()[1];
            let mut index = FlatIndex::new_ip(d as u32).map_err(faiss_err)?;
            let flat = Vec::<f32>::try_from(&bank.view([-1])).map_err(|e| Error::data("features", e.to_string()))?;
            index.add(&flat).map_err(faiss_err)?;
            Ok(FaissBank { index, bank })
        }

        /// faiss picks any of several equal similarities at the k-th place; the rule wants the lowest indices, so
        /// such rows (rare in real features) are recounted exactly with libtorch.
        pub fn search(&mut self, queries: &Tensor, k: i64, self_offset: Option<i64>) -> Result<(Tensor, Tensor)> {
            let q = queries.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
            let (nq, n_bank) = (q.size()[0], self.bank.size()[0]);
            let avail = n_bank - i64::from(self_offset.is_some());
            let kk = k.min(avail);
            // One more than needed shows a tie across the k-th place; one more again for the excluded self.
            let ask = (k + 1 + i64::from(self_offset.is_some())).min(n_bank) as usize;
            let flat = Vec::<f32>::try_from(&q.view([-1])).map_err(|e| Error::data("features", e.to_string()))?;
            let res = {
                let _threads = BlasThreads::enter();
                self.index.search(&flat, ask).map_err(faiss_err)?
            };
            let (mut vals, mut idx) = (Vec::with_capacity((nq * kk) as usize), Vec::with_capacity((nq * kk) as usize));
            for r in 0..nq as usize {
                let me = self_offset.map(|o| o + r as i64);
                let mut row: Vec<(f32, i64)> = (0..ask)
                    .filter_map(|j| res.labels[r * ask + j].get().map(|l| (res.distances[r * ask + j], l as i64)))
                    .filter(|&(_, l)| Some(l) != me)
                    .collect();
                row.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                let tied = row.len() > kk as usize && row[kk as usize - 1].0 == row[kk as usize].0;
                if tied || (row.len() < kk as usize) {
                    let sims = self.bank.mv(&q.get(r as i64)).unsqueeze(0);
                    if let Some(m) = me {
                        let _ = sims.get(0).get(m).fill_(f64::NEG_INFINITY);
                    }
                    let (v, i) = super::block_topk(&sims, kk, 0);
                    vals.extend(Vec::<f32>::try_from(&v.view([-1])).expect("f32"));
                    idx.extend(Vec::<i64>::try_from(&i.view([-1])).expect("i64"));
                } else {
                    vals.extend(row.iter().take(kk as usize).map(|x| x.0));
                    idx.extend(row.iter().take(kk as usize).map(|x| x.1));
                }
            }
            Ok((Tensor::from_slice(&vals).view([nq, kk]), Tensor::from_slice(&idx).view([nq, kk])))
        }
    }
}

/// `x / max(||x||_2, 1e-12)` per row, as `torch.nn.functional.normalize`.
pub fn l2_normalize(x: &Tensor) -> Tensor {
    let n = x.norm_scalaropt_dim(2, [1i64].as_slice(), true).clamp_min(1e-12);
    x / n
}

fn check_finite(x: &Tensor, what: &str) -> Result<()> {
    if x.isfinite().logical_not().any().int64_value(&[]) != 0 {
        return Err(Error::data(what, "features contain NaN or infinity"));
    }
    Ok(())
}

/// Orders each row's candidates by (value desc, index asc).
fn order_candidates(vals: &Tensor, idx: &Tensor) -> (Tensor, Tensor) {
    let (si, p1) = idx.sort(1, false);
    let sv = vals.gather(1, &p1, false);
    let (sv, p2) = sv.sort_stable(true, 1, true);
    (sv, si.gather(1, &p2, false))
}

/// Top-`k` of each row of `sims` [q, b] by (value desc, column asc); indices are columns + `offset`.
fn block_topk(sims: &Tensor, k: i64, offset: i64) -> (Tensor, Tensor) {
    let (q, b) = (sims.size()[0], sims.size()[1]);
    if b <= k {
        let idx = Tensor::arange(b, (Kind::Int64, sims.device())).unsqueeze(0).expand([q, b], false).contiguous();
        let (v, i) = order_candidates(sims, &idx);
        return (v, i + offset);
    }
    let (v, i) = sims.topk(k + 1, 1, true, true);
    let sel_v = v.narrow(1, 0, k).contiguous();
    let sel_i = i.narrow(1, 0, k).contiguous();
    // A tie across the k-th place: top-k picks any of the tied columns, the rule wants the lowest ones.
    let tied = v.select(1, k - 1).eq_tensor(&v.select(1, k)).nonzero().view([-1]);
    let n_tied = tied.size()[0];
    if n_tied > 0 {
        let rows: Vec<i64> = Vec::<i64>::try_from(&tied.to_device(Device::Cpu)).expect("row indices");
        for r in rows {
            let row = sims.get(r);
            let thr = v.get(r).get(k - 1);
            let above = row.gt_tensor(&thr).nonzero().view([-1]);
            let equal = row.eq_tensor(&thr).nonzero().view([-1]);
            let need = k - above.size()[0];
            let cols = Tensor::cat(&[above, equal.narrow(0, 0, need)], 0);
            sel_v.get(r).copy_(&row.index_select(0, &cols));
            sel_i.get(r).copy_(&cols);
        }
    }
    let (v, i) = order_candidates(&sel_v, &sel_i);
    (v, i + offset)
}

/// For each query row, the `k` most similar bank rows by (similarity desc, index asc): values [q, k'] and bank
/// indices [q, k'], k' = min(k, bank size). Inputs are already normalised and on the search device. With
/// `self_offset = Some(o)`, query i is bank row o + i and is excluded (leave-one-out).
pub fn search_block(queries: &Tensor, bank: &Tensor, k: i64, bank_chunk: i64, self_offset: Option<i64>) -> (Tensor, Tensor) {
    let n_bank = bank.size()[0];
    let q = queries.size()[0];
    let mut best: Option<(Tensor, Tensor)> = None;
    let mut start = 0;
    while start < n_bank {
        let len = bank_chunk.min(n_bank - start);
        let sims = queries.mm(&bank.narrow(0, start, len).transpose(0, 1));
        if let Some(o) = self_offset {
            // Query i sits at bank row o + i; mask it where it falls into this block.
            let lo = (start - o).max(0);
            let hi = (start + len - o).min(q);
            if lo < hi {
                let rows = Tensor::arange_start(lo, hi, (Kind::Int64, sims.device()));
                let flat = &rows * len + (&rows + o - start);
                let _ = sims.view([-1]).index_fill_(0, &flat, f64::NEG_INFINITY);
            }
        }
        let (v, i) = block_topk(&sims, k, start);
        best = Some(match best {
            None => (v, i),
            Some((bv, bi)) => {
                // The earlier blocks hold lower indices, so a stable sort keeps them first among equal values.
                let mv = Tensor::cat(&[bv, v], 1);
                let mi = Tensor::cat(&[bi, i], 1);
                let (sv, p) = mv.sort_stable(true, 1, true);
                let kk = k.min(sv.size()[1]);
                (sv.narrow(1, 0, kk), mi.gather(1, &p, false).narrow(1, 0, kk))
            }
        });
        start += len;
    }
    best.expect("non-empty bank")
}

/// Scores of one k.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct KnnScore {
    pub k: i64,
    /// k actually used (the bank may be smaller).
    pub k_used: i64,
    pub top1: f64,
    pub top5: f64,
    pub correct1: i64,
    pub correct5: i64,
}

#[derive(Clone, Debug, Serialize)]
pub struct KnnResult {
    pub scores: Vec<KnnScore>,
    pub temperature: f64,
    pub n_queries: i64,
    pub n_bank: i64,
    pub num_classes: i64,
    pub backend: String,
    pub seconds: f64,
}

impl KnnResult {
    pub fn score(&self, k: i64) -> Option<&KnnScore> {
        self.scores.iter().find(|s| s.k == k)
    }
}

fn check_inputs(feats: &Tensor, labels: &Tensor, num_classes: i64, what: &str) -> Result<()> {
    if feats.dim() != 2 || labels.dim() != 1 || feats.size()[0] != labels.size()[0] {
        return Err(Error::data(what, format!("features {:?} and labels {:?} do not match", feats.size(), labels.size())));
    }
    if feats.size()[0] == 0 {
        return Err(Error::data(what, "no samples"));
    }
    let (lo, hi) = (labels.min().int64_value(&[]), labels.max().int64_value(&[]));
    if lo < 0 || hi >= num_classes {
        return Err(Error::data(what, format!("labels span {lo}..={hi}, outside 0..{num_classes}")));
    }
    check_finite(feats, what)
}

/// Correct counts per k (`ks` ascending). Votes are accumulated in plain f64 in neighbour order (similarity
/// desc), so that two classes holding equal similarities get bit-equal votes and the (votes desc, class asc) tie
/// rule is exact; `f64::exp` is libm's, the same for every position.
struct Votes {
    ks: Vec<usize>,
    temperature: f64,
    votes: Vec<f64>,
    seen: Vec<bool>,
    c1: Vec<i64>,
    c5: Vec<i64>,
}

impl Votes {
    fn new(ks: Vec<usize>, temperature: f64, num_classes: usize) -> Self {
        let n = ks.len();
        Votes { ks, temperature, votes: vec![0.0; num_classes], seen: vec![false; num_classes], c1: vec![0; n], c5: vec![0; n] }
    }

    /// One chunk: `sims` and `labels` are [q, kmax] row-major, neighbours in order.
    fn add(&mut self, sims: &[f64], labels: &[i64], kmax: usize, query_labels: &[i64]) {
        let mut touched: Vec<usize> = Vec::with_capacity(kmax);
        for (qi, &truth) in query_labels.iter().enumerate() {
            let row = qi * kmax;
            let mut next = 0;
            for (j, &k) in self.ks.iter().enumerate() {
                while next < k.min(kmax) {
                    let c = labels[row + next] as usize;
                    if !self.seen[c] {
                        self.seen[c] = true;
                        touched.push(c);
                    }
                    self.votes[c] += (sims[row + next] / self.temperature).exp();
                    next += 1;
                }
                let votes = &self.votes;
                let mut ranked = touched.clone();
                ranked.sort_by(|&a, &b| votes[b].total_cmp(&votes[a]).then(a.cmp(&b)));
                let truth = truth as usize;
                if ranked.first() == Some(&truth) {
                    self.c1[j] += 1;
                }
                let n5 = k.min(5);
                let in_top5 = ranked.iter().take(n5).any(|&c| c == truth)
                    || (ranked.len() < n5 && !self.seen[truth] && (0..truth).filter(|&c| !self.seen[c]).count() < n5 - ranked.len());
                if in_top5 {
                    self.c5[j] += 1;
                }
            }
            for &c in &touched {
                self.votes[c] = 0.0;
                self.seen[c] = false;
            }
            touched.clear();
        }
    }
}

/// The k values and the temperature of a weighted k-NN.
#[derive(Clone, Debug)]
pub struct KnnParams<'a> {
    pub ks: &'a [i64],
    pub temperature: f64,
}

/// DINO's weighted k-NN: `bank` (train) votes for `queries` (val). Features in any float dtype (computed in it;
/// f16/bf16 are raised to f32), labels i64.
pub fn weighted_knn(
    bank: &Tensor,
    bank_labels: &Tensor,
    queries: &Tensor,
    query_labels: &Tensor,
    num_classes: i64,
    params: &KnnParams,
    search: &SearchConfig,
) -> Result<KnnResult> {
    let mut r = weighted_knn_grid(bank, bank_labels, queries, query_labels, num_classes, params.ks, &[params.temperature], search)?;
    Ok(r.remove(0))
}

/// [`weighted_knn`] at every temperature of `temperatures` (one result each, in that order), all from one search
/// up to the largest k: the neighbours and their similarities do not depend on T, only the votes do.
#[allow(clippy::too_many_arguments)]
pub fn weighted_knn_grid(
    bank: &Tensor,
    bank_labels: &Tensor,
    queries: &Tensor,
    query_labels: &Tensor,
    num_classes: i64,
    ks: &[i64],
    temperatures: &[f64],
    search: &SearchConfig,
) -> Result<Vec<KnnResult>> {
    let t0 = Instant::now();
    if ks.is_empty() || ks.iter().any(|&k| k < 1) {
        return Err(Error::option("--k", "needs positive values"));
    }
    if temperatures.is_empty() || temperatures.iter().any(|t| !(*t > 0.0 && t.is_finite())) {
        return Err(Error::option("--temperature", "must be positive"));
    }
    search.check()?;
    check_inputs(bank, bank_labels, num_classes, "train features")?;
    check_inputs(queries, query_labels, num_classes, "val features")?;
    if bank.size()[1] != queries.size()[1] {
        return Err(Error::data("val features", format!("dimension {} differs from the train features' {}", queries.size()[1], bank.size()[1])));
    }
    let _guard = tch::no_grad_guard();
    let dev = search.device;
    let work = |t: &Tensor| match t.kind() {
        Kind::Double => t.to_device(dev),
        _ => t.to_device(dev).to_kind(Kind::Float),
    };
    let bank_n = l2_normalize(&work(bank));
    let bank_labels = bank_labels.to_device(dev);
    let n_bank = bank_n.size()[0];
    let mut bank_s = Bank::new(bank_n, search)?;
    let kmax = *ks.iter().max().unwrap();
    let n_q = queries.size()[0];
    // Counted for the k in ascending order, reported in the caller's order.
    let mut order: Vec<usize> = (0..ks.len()).collect();
    order.sort_by_key(|&j| ks[j]);
    let ks_sorted: Vec<usize> = order.iter().map(|&j| ks[j] as usize).collect();
    let mut votes: Vec<Votes> = temperatures.iter().map(|&t| Votes::new(ks_sorted.clone(), t, num_classes as usize)).collect();
    let mut start = 0;
    while start < n_q {
        let len = search.query_chunk.min(n_q - start);
        let q = l2_normalize(&work(&queries.narrow(0, start, len)));
        let ql = query_labels.narrow(0, start, len).to_device(dev);
        let (vals, idx) = bank_s.search(&q, kmax, search.bank_chunk, None)?;
        let idx = idx.to_device(dev);
        let kk = vals.size()[1] as usize;
        let neigh_labels = bank_labels.index_select(0, &idx.reshape([-1]));
        let to_vec_f = |t: &Tensor| Vec::<f64>::try_from(&t.to_device(Device::Cpu).to_kind(Kind::Double).contiguous().view([-1])).expect("f64 values");
        let to_vec_i = |t: &Tensor| Vec::<i64>::try_from(&t.to_device(Device::Cpu).contiguous().view([-1])).expect("i64 values");
        let (sims, neigh, truth) = (to_vec_f(&vals), to_vec_i(&neigh_labels), to_vec_i(&ql));
        for v in &mut votes {
            v.add(&sims, &neigh, kk, &truth);
        }
        start += len;
    }
    let pct = |c: i64| 100.0 * c as f64 / n_q as f64;
    let seconds = t0.elapsed().as_secs_f64();
    let results = votes
        .iter()
        .map(|v| {
            let scores = order
                .iter()
                .enumerate()
                .map(|(s, &j)| (j, KnnScore { k: ks[j], k_used: ks[j].min(n_bank), top1: pct(v.c1[s]), top5: pct(v.c5[s]), correct1: v.c1[s], correct5: v.c5[s] }))
                .collect::<std::collections::BTreeMap<_, _>>()
                .into_values()
                .collect();
            KnnResult { scores, temperature: v.temperature, n_queries: n_q, n_bank, num_classes, backend: search.backend_name(), seconds }
        })
        .collect();
    Ok(results)
}

/// The best (k, T) of a sweep as the probing benchmark picks it (billpsomas/efficient-probing
/// tools/parse_knn.py: Python's `max` over the grid in (T, k) order): the highest top-1, the first in that order
/// among equals. `results` are in the order of the temperatures, each result's scores in ascending k.
pub fn best_of_grid(results: &[KnnResult]) -> Option<(f64, &KnnScore)> {
    let mut best: Option<(f64, &KnnScore)> = None;
    for r in results {
        let mut scores: Vec<&KnnScore> = r.scores.iter().collect();
        scores.sort_by_key(|s| s.k);
        for s in scores {
            if best.is_none_or(|(_, b)| s.correct1 > b.correct1) {
                best = Some((r.temperature, s));
            }
        }
    }
    best
}

#[derive(Clone, Debug, Serialize)]
pub struct NnLooResult {
    pub top1: f64,
    pub correct: i64,
    pub n: i64,
    pub backend: String,
    pub seconds: f64,
}

/// The rows the Latent MIM code's `eval_knn` scores out of `n` val images, in the order its all-gather leaves them
/// (rank-major): torch.utils.data.DistributedSampler(shuffle=True, seed=0, drop_last=False) over `world_size`
/// ranks (the permutation of a CPU generator seeded 0, padded to a multiple of the ranks by repeating its head,
/// rank r taking every `world_size`-th entry from r), then the DataLoader's drop_last=True: each rank keeps its
/// first floor(n_rank / batch_size) * batch_size. A padded entry repeats an image, as in the reference.
pub fn lmim_ddp_rows(n: i64, world_size: i64, batch_size: i64, seed: u64) -> Result<Vec<i64>> {
    if n < 1 || world_size < 1 || batch_size < 1 {
        return Err(Error::option("subset", format!("lmim-ddp needs n, world_size and batch_size >= 1 (got {n}, {world_size}, {batch_size})")));
    }
    let mut out = std::ptr::null_mut();
    // SAFETY: the shim writes a new tensor handle into `out` on success.
    crate::ffi::check(unsafe { crate::ffi::lmim_randperm_seeded(n, seed, &mut out) })?;
    let perm = unsafe { crate::ffi::take_tensors(vec![out]) }.remove(0);
    let perm = Vec::<i64>::try_from(&perm).map_err(|e| Error::data("randperm", e.to_string()))?;
    let per_rank = (n + world_size - 1) / world_size;
    let total = per_rank * world_size;
    let padded: Vec<i64> = perm.iter().copied().cycle().take(total as usize).collect();
    let keep = (per_rank / batch_size) * batch_size;
    let mut rows = Vec::with_capacity((keep * world_size) as usize);
    for r in 0..world_size {
        rows.extend(padded.iter().skip(r as usize).step_by(world_size as usize).take(keep as usize));
    }
    Ok(rows)
}

/// Leave-one-out 1-NN: for every row, the most similar other row (cosine; lowest index among ties) decides.
pub fn nn_loo(feats: &Tensor, labels: &Tensor, num_classes: i64, search: &SearchConfig) -> Result<NnLooResult> {
    let t0 = Instant::now();
    check_inputs(feats, labels, num_classes, "val features")?;
    let n = feats.size()[0];
    if n < 2 {
        return Err(Error::data("val features", "leave-one-out needs at least 2 images"));
    }
    search.check()?;
    let _guard = tch::no_grad_guard();
    let dev = search.device;
    let f = match feats.kind() {
        Kind::Double => feats.to_device(dev),
        _ => feats.to_device(dev).to_kind(Kind::Float),
    };
    let bank = l2_normalize(&f);
    let labels = labels.to_device(dev);
    let mut bank_s = Bank::new(bank.shallow_clone(), search)?;
    let mut correct = 0i64;
    let mut start = 0;
    while start < n {
        let len = search.query_chunk.min(n - start);
        let q = bank.narrow(0, start, len);
        let (_, idx) = bank_s.search(&q, 1, search.bank_chunk, Some(start))?;
        let idx = idx.to_device(dev);
        let pred = labels.index_select(0, &idx.reshape([-1]));
        correct += pred.eq_tensor(&labels.narrow(0, start, len)).sum(Kind::Int64).int64_value(&[]);
        start += len;
    }
    Ok(NnLooResult {
        top1: 100.0 * correct as f64 / n as f64,
        correct,
        n,
        backend: search.backend_name(),
        seconds: t0.elapsed().as_secs_f64(),
    })
}
