//! `lmim-bench suite`: argument definitions and printing; the suite itself is a library call
//! (`protocols::suite::run`).
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::config::Precision;
use crate::error::Error;
use crate::protocols::suite::{self, Outcome, SuiteRequest};
use crate::protocols::RunOptions;
use crate::results::check::{self, CheckOptions, ReferenceFile};
use crate::results::{table, write_output};

#[derive(Debug, Args)]
pub struct SuiteArgs {
    /// Suite file (TOML): named data roots under [data] and [[eval]] entries (protocol, data, set, subset,
    /// label, enabled); suites/imagenet.toml and suites/demo.toml are examples.
    pub suite: PathBuf,
    /// Encoder checkpoint every entry evaluates.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Checkpoint layout: timm, mae, dino, ibot, mocov3, ijepa, dinov2, lmim (default: detected).
    #[arg(long, value_parser = crate::cli::parse_family)]
    pub from: Option<crate::checkpoint::Family>,
    /// Model name of the records and the table row (default: the checkpoint's file stem).
    #[arg(long)]
    pub name: Option<String>,
    /// Folder of the records and results.csv; an entry whose record is already here is kept.
    #[arg(long, default_value = "results/runs", value_parser = crate::cli::output_dir)]
    pub output: PathBuf,
    /// Only these entries: protocol names or `protocol:label`, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Run every entry again, even where its record is already in the output.
    #[arg(long)]
    pub rerun: bool,
    /// Stop at the first entry that fails (default: run the others, then exit 1 listing the failures).
    #[arg(long)]
    pub fail_fast: bool,
    /// End with `check` against this reference (a golden file or the published table): exit 1 on a regression.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// With --reference: compare with this reference model's entries, whatever the records' model name.
    #[arg(long)]
    pub reference_model: Option<String>,
    /// Replace a data root of the suite file: NAME=PATH (repeatable), so one suite file serves every machine.
    #[arg(long = "data", value_name = "NAME=PATH", value_parser = parse_data)]
    pub data: Vec<(String, PathBuf)>,
    /// Device: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Decode threads (default: the cores divided among the ranks on this node).
    #[arg(long, value_parser = crate::cli::workers)]
    pub workers: Option<usize>,
    /// Precision of the forward passes (default: each protocol's).
    #[arg(long, value_enum)]
    pub precision: Option<Precision>,
    /// Images per forward pass of feature extraction.
    #[arg(long, default_value_t = 128, value_parser = crate::cli::batch_size)]
    pub batch_size: usize,
    /// Feature cache: entries that read the same features take one extraction.
    #[arg(long, default_value = "results/cache")]
    pub cache_dir: PathBuf,
    #[arg(long)]
    pub no_cache: bool,
    /// No progress bars (the one line per entry stays).
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub dist: super::DistArgs,
    #[command(flatten)]
    pub scan: super::ScanArgs,
}

fn parse_data(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !v.is_empty() => Ok((k.to_string(), PathBuf::from(v))),
        _ => Err(format!("`{s}` is not NAME=PATH")),
    }
}

pub fn suite(a: SuiteArgs) -> anyhow::Result<i32> {
    let world = a.dist.init(&a.device)?;
    let req = SuiteRequest {
        suite: a.suite.clone(),
        checkpoint: a.checkpoint.clone(),
        from: a.from,
        name: a.name.clone(),
        output: a.output.clone(),
        only: a.only.clone(),
        rerun: a.rerun,
        fail_fast: a.fail_fast,
        data: a.data.clone(),
        run: RunOptions {
            device: a.device.clone(),
            workers: a.workers,
            precision: a.precision,
            batch_size: a.batch_size,
            cache_dir: (!a.no_cache).then(|| a.cache_dir.clone()),
            quiet: a.quiet || !world.is_main(),
            scan: a.scan.flags(),
            ..Default::default()
        },
    };
    // A bad reference file is found before any work, as a bad suite file is.
    let reference = a.reference.as_ref().map(|r| ReferenceFile::load(r)).transpose()?;
    if !a.checkpoint.is_file() {
        return Err(Error::data(&a.checkpoint, "checkpoint not found (a file)").into());
    }
    let result = suite::run(&req).with_context(|| format!("running the suite {}", a.suite.display()))?;
    if !world.is_main() {
        return Ok(if result.failed().is_empty() { 0 } else { 1 });
    }
    let records: Vec<crate::results::RunRecord> = result.records().into_iter().cloned().collect();
    let (ran, kept) = result.entries.iter().fold((0, 0), |(r, k), (_, o)| match o {
        Outcome::Ran(_) => (r + 1, k),
        Outcome::Kept(_) => (r, k + 1),
        Outcome::Failed(_) => (r, k),
    });
    let mut text = String::new();
    if !records.is_empty() {
        let builtin = ReferenceFile::load_or_builtin(std::path::Path::new("protocols/reference.toml")).ok();
        text.push_str(&table::build(&records, builtin.as_ref()).markdown());
    }
    text.push_str(&format!("\nsuite {}: {ran} ran, {kept} kept, {} failed; records in {}\n", a.suite.display(), result.failed().len(), a.output.display()));
    for (e, why) in result.failed() {
        text.push_str(&format!("FAILED entry {} ({}): {why}\n", e.index, e.label));
    }
    let mut code = if result.failed().is_empty() { 0 } else { 1 };
    if let Some(rf) = &reference {
        let opts = CheckOptions { tolerance: None, strict: false, reference_model: a.reference_model.clone() };
        let outcome = check::check(&records, rf, &opts)?;
        text.push('\n');
        text.push_str(&check::render(&outcome, &rf.origin));
        if outcome.failed > 0 {
            text.push_str(&format!("check failed: {} metric(s) below reference - tolerance or missing\n", outcome.failed));
            code = 1;
        }
    }
    write_output("-", &text)?;
    Ok(code)
}
