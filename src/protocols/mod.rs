//! Evaluation protocols: feature extraction, k-NN (DINO's, and the probing benchmark's sweep) and leave-one-out
//! 1-NN, linear probe, attentive probe, linear sweep, fine-tuning, DAVIS-2017 video label propagation (J&F), low-shot logistic regression. Evaluation is one library call, [`run`], on an [`EvalRequest`]; the command layer only parses
//! arguments and prints the record.
pub mod attentive;
pub mod davis;
pub mod extract;
pub mod finetune;
pub mod jandf;
pub mod knn;
pub mod linear;
pub mod linear_sweep;
pub mod lowshot;
pub mod neighbors;
pub mod probe;
pub mod record;
pub mod seg;
pub mod seg_knn;
pub mod suite;

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::{Precision, Source};
use crate::data::dataset::Dataset;
use crate::data::loader::{Loader, LoaderConfig};
use crate::data::transforms::Transform;
use crate::error::{Error, Result};
use crate::results::RunRecord;

/// The evaluation protocols; each has a versioned definition in `protocols/<file>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// The Latent MIM code's leave-one-out 1-NN on val (protocols/nn_loo.toml): the "NN" column.
    NnLoo,
    /// DINO's weighted k-NN, train bank -> val (protocols/knn.toml).
    Knn,
    /// The probing benchmark's k-NN: the best (k, T) of a grid, from one search (protocols/knn_sweep.toml).
    KnnSweep,
    /// MAE's linear probe: LARS, BN + Linear head, the backbone on every augmented crop (protocols/linear.toml).
    Linear,
    /// The probing benchmark's efficient probing (EP): attentive pooling + BN + Linear on the frozen encoder's
    /// tokens, LARS (protocols/attentive.toml).
    Attentive,
    /// MAE's full fine-tuning (protocols/finetune.toml); without --checkpoint, from a random init of --arch.
    Finetune,
    /// 52 linear heads on cached features, chosen on held-out train data (protocols/linear_sweep.toml).
    LinearSweep,
    /// DINO's DAVIS-2017 video label propagation, scored by davis2017-evaluation's J&F (protocols/davis.toml).
    Davis,
    /// MSN's low-shot evaluation: logistic regression on the features of a few labelled training images per class
    /// (`--subset` lists or `shots=N`), scored on val (protocols/lowshot.toml).
    Lowshot,
    /// CAPI's frozen-patch segmentation probes on ADE20K: k-NN and logistic regression mIoU (protocols/seg.toml).
    Seg,
}

impl Protocol {
    /// In table order.
    pub const ALL: [Protocol; 10] = [Protocol::NnLoo, Protocol::Knn, Protocol::KnnSweep, Protocol::Linear, Protocol::Attentive, Protocol::Finetune, Protocol::LinearSweep, Protocol::Davis, Protocol::Lowshot, Protocol::Seg];

    /// The name in records, tables and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Knn => "knn",
            Protocol::KnnSweep => "knn-sweep",
            Protocol::Attentive => "attentive",
            Protocol::NnLoo => "nn-loo",
            Protocol::Linear => "linear",
            Protocol::LinearSweep => "linear-sweep",
            Protocol::Finetune => "finetune",
            Protocol::Davis => "davis",
            Protocol::Lowshot => "lowshot",
            Protocol::Seg => "seg",
        }
    }

    pub fn from_name(name: &str) -> Option<Protocol> {
        Protocol::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The protocol file under `protocols/`.
    pub fn file_name(self) -> &'static str {
        match self {
            Protocol::Knn => "knn.toml",
            Protocol::KnnSweep => "knn_sweep.toml",
            Protocol::Attentive => "attentive.toml",
            Protocol::NnLoo => "nn_loo.toml",
            Protocol::Linear => "linear.toml",
            Protocol::LinearSweep => "linear_sweep.toml",
            Protocol::Finetune => "finetune.toml",
            Protocol::Davis => "davis.toml",
            Protocol::Lowshot => "lowshot.toml",
            Protocol::Seg => "seg.toml",
        }
    }

    /// The copy of the protocol file built into the binary.
    pub fn builtin(self) -> &'static str {
        match self {
            Protocol::Knn => include_str!("../../protocols/knn.toml"),
            Protocol::KnnSweep => include_str!("../../protocols/knn_sweep.toml"),
            Protocol::Attentive => include_str!("../../protocols/attentive.toml"),
            Protocol::NnLoo => include_str!("../../protocols/nn_loo.toml"),
            Protocol::Linear => include_str!("../../protocols/linear.toml"),
            Protocol::LinearSweep => include_str!("../../protocols/linear_sweep.toml"),
            Protocol::Finetune => include_str!("../../protocols/finetune.toml"),
            Protocol::Davis => include_str!("../../protocols/davis.toml"),
            Protocol::Lowshot => include_str!("../../protocols/lowshot.toml"),
            Protocol::Seg => include_str!("../../protocols/seg.toml"),
        }
    }

    /// Table header and CSV column prefix.
    pub fn column(self) -> (&'static str, &'static str) {
        match self {
            Protocol::NnLoo => ("NN (LOO 1-NN)", "nn"),
            Protocol::Knn => ("k-NN", "knn"),
            Protocol::KnnSweep => ("k-NN sweep", "knn_sweep"),
            Protocol::Attentive => ("EP", "ep"),
            Protocol::Linear => ("LP", "lp"),
            Protocol::Finetune => ("Ft", "ft"),
            Protocol::LinearSweep => ("LP sweep", "lp_sweep"),
            Protocol::Lowshot => ("low-shot", "lowshot"),
            Protocol::Davis => ("DAVIS J&F", "davis"),
            Protocol::Seg => ("ADE20K k-NN", "ade_knn"),
        }
    }

    /// The metric the table and `check` read: `top1`, `j_and_f` for DAVIS, `miou_knn` for ADE20K.
    pub fn headline_metric(self) -> &'static str {
        match self {
            Protocol::Davis => "j_and_f",
            Protocol::Seg => "miou_knn",
            _ => "top1",
        }
    }

    /// The protocol file: `explicit`, else `protocols/<file>` in the working directory, else the built-in copy.
    pub fn source(self, explicit: Option<&Path>) -> Result<Source> {
        if let Some(p) = explicit {
            return Source::file(p);
        }
        let local = Path::new("protocols").join(self.file_name());
        if local.is_file() {
            return Source::file(&local);
        }
        Ok(Source { text: self.builtin().to_string(), origin: PathBuf::from(format!("<built-in protocols/{}>", self.file_name())) })
    }

    /// Loads the protocol's recipe with the overrides applied. Returns the recipe, the recipe of the file alone
    /// (to name what was overridden) and the file's origin.
    pub fn load<T: crate::config::Recipe>(self, explicit: Option<&Path>, sets: &[String]) -> Result<Loaded<T>> {
        let src = self.source(explicit)?;
        let base: T = crate::config::load_source(Some(&src), &[])?;
        let cfg: T = crate::config::load_source(Some(&src), sets)?;
        Ok(Loaded { cfg, base, origin: src.origin.display().to_string() })
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Loads `protocol`'s recipe with `sets` applied, through its own recipe type: every key and value is checked by
/// the one validation table (unknown keys, ranges) and the recipe's own checks, before any work.
pub fn check_sets(protocol: Protocol, file: Option<&Path>, sets: &[String]) -> Result<()> {
    match protocol {
        Protocol::Knn | Protocol::KnnSweep | Protocol::NnLoo => protocol.load::<knn::ProtocolSpec>(file, sets).map(|_| ()),
        Protocol::Linear => protocol.load::<linear::LinearConfig>(file, sets).map(|_| ()),
        Protocol::Attentive => protocol.load::<attentive::AttentiveConfig>(file, sets).map(|_| ()),
        Protocol::LinearSweep => protocol.load::<linear_sweep::SweepConfig>(file, sets).map(|_| ()),
        Protocol::Finetune => protocol.load::<finetune::FinetuneConfig>(file, sets).and_then(|l| l.cfg.validate()),
        Protocol::Davis => protocol.load::<davis::DavisConfig>(file, sets).and_then(|l| l.cfg.validate()),
        Protocol::Lowshot => protocol.load::<lowshot::LowshotConfig>(file, sets).map(|_| ()),
        Protocol::Seg => protocol.load::<seg::SegConfig>(file, sets).and_then(|l| l.cfg.validate()),
    }
}

/// `protocols/linear.toml` (the struct is in `linear.rs`).
impl crate::config::Recipe for linear::LinearConfig {
    fn rules() -> Vec<crate::config::Rule> {
        use crate::config::Rule;
        vec![
            Rule::above("epochs", 0.0, 1e6),
            Rule::real("warmup_epochs", 0.0, 1e6).at_most("epochs"),
            // MAE's probe: blr 0.1 at batch 16384; the demo's absolute lr 6.4.
            Rule::above("blr", 0.0, 100.0),
            Rule::int("batch_size", 1, 1 << 24),
            Rule::int("micro_batch_size", 1, 65536).at_most("batch_size"),
            Rule::real("weight_decay", 0.0, 10.0),
            Rule::below("momentum", 0.0, 1.0),
            Rule::above("trust_coefficient", 0.0, 1.0),
            Rule::above("crop_scale_min", 0.0, 1.0),
            Rule::real("min_lr", 0.0, 100.0),
            Rule::int("seed", 0, i64::MAX),
            Rule::int("eval_every", 0, 1 << 20),
        ]
    }
}

/// A protocol recipe as loaded.
#[derive(Debug, Clone)]
pub struct Loaded<T> {
    pub cfg: T,
    pub base: T,
    pub origin: String,
}

impl<T: Serialize> Loaded<T> {
    /// `key=value` of every key whose value differs from the protocol file, excluding `ignore`.
    pub fn overrides(&self, ignore: &[&str]) -> Vec<String> {
        crate::config::changed_keys(&self.base, &self.cfg)
            .into_iter()
            .filter(|kv| !ignore.iter().any(|i| kv.split('=').next() == Some(i)))
            .collect()
    }
}

/// The version written in a record: the file's version, plus `+key=value,...` for what was overridden, so that
/// `table` and `check` never mistake a shortened run for the recipe.
pub fn version_with(version: &str, overrides: &[String]) -> String {
    if overrides.is_empty() {
        version.to_string()
    } else {
        format!("{version}+{}", overrides.join(","))
    }
}

/// How a run executes, apart from the protocol's recipe: these never change results (beyond round-off for
/// `precision`, which is recorded).
#[derive(Debug, Clone, Serialize)]
pub struct RunOptions {
    /// `auto`, `cpu`, `cuda`, `cuda:N`.
    pub device: String,
    /// Decode threads (None: the cores divided among the ranks on this node).
    pub workers: Option<usize>,
    /// None: the protocol's default (f32 for the feature protocols, `auto` for the training ones).
    pub precision: Option<Precision>,
    /// Images per forward pass of feature extraction.
    pub batch_size: usize,
    /// Feature cache (None: always extract).
    pub cache_dir: Option<PathBuf>,
    pub quiet: bool,
    /// Fine-tuning: start over instead of resuming from the run folder.
    pub fresh: bool,
    /// k-NN search back-end and block sizes.
    pub backend: knn::Backend,
    pub query_chunk: Option<i64>,
    pub bank_chunk: Option<i64>,
    /// A file of a training split that cannot be read stops the run instead of being skipped (and counted).
    pub strict: bool,
    /// A file of an evaluation split that cannot be read is skipped, counted and listed in the record instead of
    /// stopping the run (the score then covers part of the split).
    pub skip_bad: bool,
    /// TensorBoard event files beside the metrics of the training protocols.
    pub tensorboard: bool,
    /// The suite entry a record belongs to (`lmim-bench suite`): the key that finds it again on a second run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suite_entry: Option<String>,
    /// `--rescan` and `--content-key`.
    pub scan: crate::data::ScanFlags,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            device: "auto".into(),
            workers: None,
            precision: None,
            batch_size: 128,
            cache_dir: None,
            quiet: true,
            fresh: false,
            backend: knn::Backend::Torch,
            query_chunk: None,
            bank_chunk: None,
            strict: false,
            skip_bad: false,
            tensorboard: true,
            suite_entry: None,
            scan: Default::default(),
        }
    }
}

impl RunOptions {
    pub fn device(&self) -> Result<tch::Device> {
        crate::info::parse_device(&self.device)
    }
    pub fn loader_workers(&self) -> usize {
        self.workers.unwrap_or_else(|| crate::data::loader::LoaderConfig::default().workers)
    }
}

/// One evaluation: a protocol on a checkpoint (or on feature files for the neighbour protocols).
#[derive(Debug, Clone)]
pub struct EvalRequest {
    pub protocol: Protocol,
    pub checkpoint: Option<PathBuf>,
    /// Architecture when the checkpoint does not say (fine-tuning from scratch without a checkpoint).
    pub arch: Option<String>,
    /// The checkpoint's family layout (`--from`); None detects it.
    pub from: Option<crate::checkpoint::Family>,
    /// Dataset root with train/ and val/.
    pub data: Option<PathBuf>,
    /// Feature files instead of checkpoint + data (k-NN, nn-loo).
    pub train_features: Option<PathBuf>,
    pub val_features: Option<PathBuf>,
    pub protocol_file: Option<PathBuf>,
    /// `key=value` overrides of the protocol file.
    pub sets: Vec<String>,
    /// Low-shot: training subset lists in MSN's format (files, or folders of `.txt` lists); one split each.
    pub subsets: Vec<PathBuf>,
    /// Model name of the record (default: the checkpoint's file stem).
    pub name: Option<String>,
    /// Folder of the records and results.csv (and the fine-tuning run folders).
    pub output: PathBuf,
    pub run: RunOptions,
}

impl EvalRequest {
    pub fn new(protocol: Protocol, output: impl Into<PathBuf>) -> Self {
        EvalRequest {
            protocol,
            checkpoint: None,
            arch: None,
            from: None,
            data: None,
            train_features: None,
            val_features: None,
            protocol_file: None,
            sets: Vec::new(),
            subsets: Vec::new(),
            name: None,
            output: output.into(),
            run: RunOptions::default(),
        }
    }

    pub(crate) fn checkpoint(&self) -> Result<&Path> {
        self.checkpoint.as_deref().ok_or_else(|| Error::option("--checkpoint", format!("the {} protocol needs an encoder checkpoint", self.protocol)))
    }

    /// How to read the checkpoint.
    pub(crate) fn load_options(&self) -> crate::checkpoint::LoadOptions {
        crate::checkpoint::LoadOptions { arch: self.arch.clone(), from: self.from, img_size: None }
    }

    /// The protocol's feature was not asked for on the command line (so a family's own may replace it).
    pub(crate) fn feature_is_default(&self) -> bool {
        !self.sets.iter().any(|s| s.trim_start().starts_with("feature="))
    }

    pub(crate) fn data(&self) -> Result<&Path> {
        self.data.as_deref().ok_or_else(|| Error::option("--data", format!("the {} protocol needs a dataset root with train/ and val/", self.protocol)))
    }

    /// The record's model name: `--name`, else the checkpoint's file stem.
    pub(crate) fn model_name(&self, fallback: &str) -> String {
        self.name.clone().unwrap_or_else(|| {
            self.checkpoint.as_ref().and_then(|c| c.file_stem()).map_or(fallback.to_string(), |s| s.to_string_lossy().into_owned())
        })
    }
}

/// The train and val splits of a dataset root; their class lists must agree. Every rank opens them (rank 0
/// scans and sends the index).
pub(crate) fn open_splits(root: &Path, run: &RunOptions) -> Result<(Dataset, Dataset)> {
    let train = Dataset::open_on_all_ranks(root, "train", run.scan)?;
    let val = Dataset::open_on_all_ranks(root, "val", run.scan)?;
    if train.classes != val.classes {
        return Err(Error::data(root, format!("train has {} classes and val {}: the class folders differ", train.classes.len(), val.classes.len())));
    }
    Ok((train, val))
}

/// A training loader of the protocols: shuffled per (seed, epoch), whole batches only (`drop_last`, as the
/// reference's train loaders), bad files skipped the same way everywhere (or refused with `strict`).
/// In a data-parallel run each rank gets its share of the global micro-batches.
pub(crate) fn train_loader(ds: Dataset, t: Transform, batch: usize, seed: u64, run: &RunOptions) -> Result<Loader> {
    let w = crate::dist::world();
    let cfg = LoaderConfig { batch_size: batch, shuffle: true, drop_last: true, seed, rank: w.rank, world_size: w.size, workers: run.loader_workers(), strict: run.strict, quiet: run.quiet, pin_device: Some(run.device()?), ..Default::default() };
    Loader::new(ds, t, cfg)
}

/// An evaluation loader: dataset order, every image; with `shard`, this rank's contiguous block of it (the
/// top-k evaluation sums its counts over ranks). A file that cannot be read stops it, unless `skip_bad`: a score
/// over part of a split is not comparable with one over all of it.
pub(crate) fn eval_loader(ds: Dataset, t: Transform, batch: usize, run: &RunOptions, shard: bool) -> Result<Loader> {
    let w = crate::dist::world();
    let (rank, world_size) = if shard { (w.rank, w.size) } else { (0, 1) };
    let cfg = LoaderConfig { batch_size: batch, shuffle: false, drop_last: false, rank, world_size, workers: run.loader_workers(), strict: !run.skip_bad, quiet: run.quiet, pin_device: Some(run.device()?), ..Default::default() };
    Loader::new(ds, t, cfg)
}

/// Runs the request's protocol, writes its record (JSON + a CSV row) into `req.output` and returns it.
pub fn run(req: &EvalRequest) -> Result<RunRecord> {
    // Every rank that decodes says how many threads it takes, before any scan.
    if !req.run.quiet {
        let w = crate::dist::world();
        let who = if w.is_distributed() { format!("rank {} of {}: ", w.rank, w.size) } else { String::new() };
        eprintln!("{who}{}", crate::data::loader::workers_line(req.run.workers, "--workers N").1);
    }
    match req.protocol {
        Protocol::Knn | Protocol::KnnSweep | Protocol::NnLoo => neighbors::run(req),
        Protocol::Attentive => attentive::run(req),
        Protocol::Linear => linear::run(req),
        Protocol::LinearSweep => linear_sweep::run(req),
        Protocol::Finetune => finetune::run(req),
        Protocol::Davis => davis::run(req),
        Protocol::Lowshot => lowshot::run(req),
        Protocol::Seg => seg::run(req),
    }
}
