//! `lmim-bench extract` and `lmim-bench eval` (being written).
use clap::Args;

#[derive(Debug, Args)]
pub struct ExtractArgs {}

#[derive(Debug, Args)]
pub struct EvalArgs {}

pub fn extract(_a: ExtractArgs) -> anyhow::Result<()> {
    anyhow::bail!("extract: not implemented yet")
}

pub fn eval(_a: EvalArgs) -> anyhow::Result<()> {
    anyhow::bail!("eval: not implemented yet")
}
