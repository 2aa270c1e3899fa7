//! `lmim-bench data ...` (being written).
use clap::Args;

#[derive(Debug, Args)]
pub struct DataArgs {}

pub fn run(_a: DataArgs) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
