//! `lmim-bench table` and `lmim-bench check` (being written).
use clap::Args;

#[derive(Debug, Args)]
pub struct TableArgs {}

#[derive(Debug, Args)]
pub struct CheckArgs {}

pub fn table(_a: TableArgs) -> anyhow::Result<()> {
    anyhow::bail!("table: not implemented yet")
}

pub fn check(_a: CheckArgs) -> anyhow::Result<()> {
    anyhow::bail!("check: not implemented yet")
}
