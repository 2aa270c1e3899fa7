//! `lmim-bench table` and `lmim-bench check`.
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};

use crate::error::Error;
use crate::results::check::{self, CheckOptions, ReferenceFile};
use crate::results::{table, write_output};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Markdown,
    Csv,
    Json,
}

#[derive(Debug, Args)]
pub struct TableArgs {
    /// Results records (JSON files) or directories searched recursively.
    #[arg(default_value = "results/runs")]
    pub inputs: Vec<PathBuf>,
    #[arg(long, value_enum, default_value = "markdown")]
    pub format: Format,
    /// Output file, or `-` for stdout.
    #[arg(short = 'o', long, default_value = "-")]
    pub output: String,
    /// Published numbers shown beside the runs (the built-in copy when the default path is absent).
    #[arg(long, default_value = "protocols/reference.toml")]
    pub reference: PathBuf,
    /// No reference rows.
    #[arg(long)]
    pub no_reference: bool,
    /// Only these columns, comma-separated: protocol names (`knn`, `davis`, `lowshot:1img`) or headers
    /// (`k-NN`, `1 img`). Empty columns are always left out; CSV and JSON keep every field of a kept column.
    #[arg(long, value_delimiter = ',')]
    pub columns: Vec<String>,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Results records (JSON files) or directories searched recursively.
    #[arg(default_value = "results/runs")]
    pub results: Vec<PathBuf>,
    /// Reference file: a golden results file ([[expect]] entries) or the published table ([[result]] entries),
    /// TOML or JSON.
    #[arg(long, conflicts_with = "baseline")]
    pub reference: Option<PathBuf>,
    /// Compare with a baseline run instead: its records (files or directories).
    #[arg(long, num_args = 1..)]
    pub baseline: Vec<PathBuf>,
    /// Tolerance in percentage points for every metric (overrides the reference file's; baseline default 0.1).
    #[arg(long)]
    pub tolerance: Option<f64>,
    /// Compare every result with this reference model's entries (e.g. latentmim-vitb16-800ep), whatever the
    /// results' model names.
    #[arg(long)]
    pub reference_model: Option<String>,
    /// Soft gates fail too.
    #[arg(long)]
    pub strict: bool,
    /// Print the comparison as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn table(a: TableArgs) -> anyhow::Result<()> {
    let records = crate::results::collect_records(&a.inputs)?;
    let reference = if a.no_reference {
        None
    } else {
        Some(ReferenceFile::load_or_builtin(&a.reference).context("reading the reference table")?)
    };
    if records.is_empty() && reference.is_none() {
        let shown: Vec<String> = a.inputs.iter().map(|p| p.display().to_string()).collect();
        return Err(Error::data(shown.join(", "), "no results records found").into());
    }
    let mut t = table::build(&records, reference.as_ref());
    if !a.columns.is_empty() {
        t.select(&a.columns)?;
    }
    let text = match a.format {
        Format::Markdown => t.markdown(),
        Format::Csv => t.csv(),
        Format::Json => t.json(),
    };
    write_output(&a.output, &text)?;
    Ok(())
}

pub fn check(a: CheckArgs) -> anyhow::Result<i32> {
    if let Some(t) = a.tolerance {
        if !(t.is_finite() && t >= 0.0) {
            return Err(Error::option("--tolerance", "must be a number >= 0").into());
        }
    }
    let records = check::read_results(&a.results).context("reading the results")?;
    let opts = CheckOptions { tolerance: a.tolerance, strict: a.strict, reference_model: a.reference_model.clone() };
    let (outcome, against) = match (&a.reference, a.baseline.is_empty()) {
        (Some(r), true) => {
            let rf = ReferenceFile::load(r)?;
            let against = format!("{}{}", rf.origin, rf.version.as_ref().map(|v| format!(" (v{v})")).unwrap_or_default());
            (check::check(&records, &rf, &opts)?, against)
        }
        (None, false) => {
            let base = check::read_results(&a.baseline).context("reading the baseline")?;
            let shown: Vec<String> = a.baseline.iter().map(|p| p.display().to_string()).collect();
            let against = format!("baseline {}", shown.join(", "));
            (check::check_baseline(&records, &base, &opts, std::path::Path::new(&shown.join(", ")))?, against)
        }
        _ => return Err(Error::option("--reference", "give --reference FILE or --baseline RESULTS").into()),
    };
    let text = if a.json { serde_json::to_string_pretty(&outcome)? + "\n" } else { check::render(&outcome, &against) };
    write_output("-", &text)?;
    if outcome.failed > 0 {
        eprintln!("check failed: {} metric(s) below reference - tolerance or missing", outcome.failed);
        return Ok(1);
    }
    Ok(0)
}
