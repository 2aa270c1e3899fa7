//! `lmim-bench visualize`: segmentation maps by hierarchical clustering of patch features, and their t-SNE.
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::checkpoint;
use crate::info::parse_device;
use crate::viz::cluster::Linkage;
use crate::viz::tsne::TsneOptions;
use crate::viz::{self, PosEmbedMode, RunInfo, VizOptions};

#[derive(Debug, Args)]
pub struct VisualizeArgs {
    /// ViT checkpoint (safetensors or .pth; any layout `convert` reads), e.g. an exported encoder.safetensors.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Checkpoint layout (default: detected); see `convert --help`.
    #[arg(long, value_parser = crate::cli::parse_family)]
    pub from: Option<crate::checkpoint::Family>,
    /// An image file, or a folder whose .jpg/.jpeg/.png files are all used (repeatable).
    #[arg(long, required = true)]
    pub images: Vec<PathBuf>,
    /// Output folder: one <name>.png figure and one <name>.json (labels per level, t-SNE points) per image.
    #[arg(long)]
    pub out: PathBuf,
    /// Numbers of clusters to cut the tree at (nested cuts), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "3,4,5")]
    pub levels: Vec<usize>,
    /// Input side in pixels, a multiple of the patch size [default: a 28 x 28 grid: 448 for 16-px patches, 112
    /// for vit_pico_patch4_32].
    #[arg(long)]
    pub size: Option<u32>,
    /// Block whose output (before the final norm) gives the features: 0-based, negative counts from the end
    /// [default: the last block].
    #[arg(long, allow_hyphen_values = true)]
    pub layer: Option<i64>,
    /// Linkage of the agglomerative clustering (Euclidean distances between L2-normalised features).
    #[arg(long, value_enum, default_value = "ward")]
    pub linkage: Linkage,
    /// t-SNE perplexity; clamped to (patches - 1) / 3 on small grids.
    #[arg(long, default_value_t = 30.0)]
    pub perplexity: f64,
    /// t-SNE iterations.
    #[arg(long, default_value_t = 1000)]
    pub tsne_iters: usize,
    /// Seed of the t-SNE initialisation; the output is the same for the same seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Position embedding at a grid other than the trained one. auto: recompute the sin-cos embedding when the
    /// checkpoint's is Latent MIM's (its coordinates are normalised to the image, so a finer grid spans the same
    /// range it was trained on), otherwise interpolate (learned embeddings, and MAE's integer-grid formula, which
    /// would extrapolate).
    #[arg(long, value_enum, default_value = "auto")]
    pub pos_embed: PosEmbedMode,
    /// Opacity of the cluster colours over the image.
    #[arg(long, default_value_t = 0.6)]
    pub alpha: f32,
    /// Side of each panel of the figure in pixels (rounded to a multiple of the grid).
    #[arg(long, default_value_t = 224)]
    pub panel: u32,
    /// Architecture (timm name) when the checkpoint has no metadata.
    #[arg(long)]
    pub arch: Option<String>,
    /// Device: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

pub fn visualize(a: VisualizeArgs) -> anyhow::Result<()> {
    let device = parse_device(&a.device)?;
    let images = viz::collect_images(&a.images)?;
    let opts = checkpoint::LoadOptions { arch: a.arch.clone(), from: a.from, img_size: None };
    let loaded = checkpoint::load_vit_with(&a.checkpoint, &opts, device, 0)
        .with_context(|| format!("loading {}", a.checkpoint.display()))?;
    let opts = VizOptions {
        levels: a.levels,
        size: a.size,
        layer: a.layer,
        linkage: a.linkage,
        tsne: TsneOptions { perplexity: a.perplexity, epochs: a.tsne_iters, seed: a.seed, ..Default::default() },
        pos_embed: a.pos_embed,
        alpha: a.alpha,
        panel: a.panel,
    };
    let r = viz::resolve(&loaded.model, &opts)?;
    eprintln!(
        "{}: {} image(s) at {} px ({} x {} patches), block {}/{}, position embedding {}",
        loaded.model.cfg.arch,
        images.len(),
        r.size,
        r.grid,
        r.grid,
        r.layer + 1,
        r.depth,
        r.pos_embed
    );
    let info = RunInfo {
        checkpoint: a.checkpoint.display().to_string(),
        sha256: loaded.sha256.clone(),
        arch: loaded.model.cfg.arch.clone(),
    };
    viz::run(&loaded.model, device, &images, &a.out, &opts, &info, |w| {
        let _ = crate::results::write_output("-", &format!("{} -> {}\n", w.image.display(), w.png.display()));
    })?;
    Ok(())
}
