//! `lmim-bench plot`: training curves of runs, or a bar chart of results, as PNG.
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

use crate::error::Error;
use crate::results::check::ReferenceFile;
use crate::results::{collect_records, read_csv, table};
use crate::viz::{figure, plot};

#[derive(Debug, Args)]
pub struct PlotArgs {
    /// Runs to draw: folders holding a metrics.jsonl (e.g. a `pretrain` output folder) or .jsonl files. One
    /// panel per quantity (loss, lr, avg_sim_pred, avg_sim_vis, avg_sim_trg, target_std, val_top1, nn_top1, those
    /// logged), one line per run, over the lines' `step` (else `epoch`).
    #[arg(value_name = "RUN_DIR", required_unless_present = "results", conflicts_with = "results")]
    pub runs: Vec<PathBuf>,
    /// Draw a bar chart of NN / k-NN / LP / Ft top-1 per model instead, from results records (JSON files or a
    /// folder searched recursively) or a results.csv, beside the published rows.
    #[arg(long, value_name = "DIR_OR_CSV")]
    pub results: Option<PathBuf>,
    /// Output PNG file [default: curves.png, or bars.png with --results].
    #[arg(short = 'o', long, value_name = "FILE.png")]
    pub output: Option<PathBuf>,
    /// Published numbers drawn beside the runs with --results (the built-in copy when the default path is
    /// absent).
    #[arg(long, default_value = "protocols/reference.toml")]
    pub reference: PathBuf,
    /// No published rows in the bar chart.
    #[arg(long)]
    pub no_reference: bool,
}

pub fn plot(a: PlotArgs) -> anyhow::Result<()> {
    let default = if a.results.is_some() { "bars.png" } else { "curves.png" };
    let output = a.output.clone().unwrap_or_else(|| PathBuf::from(default));
    if !output.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")) {
        return Err(Error::option("-o", format!("{}: the figure is a PNG, name it *.png", output.display())).into());
    }
    let img = match &a.results {
        Some(src) => {
            let records = if src.is_file() && src.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv")) {
                read_csv(src)?
            } else {
                collect_records(std::slice::from_ref(src))?
            };
            if records.is_empty() {
                return Err(Error::data(src, "no results records found").into());
            }
            let reference = if a.no_reference {
                None
            } else {
                Some(ReferenceFile::load_or_builtin(&a.reference).context("reading the reference table")?)
            };
            plot::render_bars(&table::build(&records, reference.as_ref()))?
        }
        None => {
            let runs = a.runs.iter().map(|p| plot::load_run(p)).collect::<crate::Result<Vec<_>>>()?;
            plot::render_curves(&runs)?
        }
    };
    write_png(&output, &img)?;
    crate::results::write_output("-", &format!("{}\n", output.display()))?;
    Ok(())
}

fn write_png(path: &Path, img: &crate::data::decode::RgbImage) -> crate::Result<()> {
    crate::checkpoint::write_atomic(path, &figure::encode_png(img)?)
}
