//! `info`, `forward` and `convert`.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use tch::{nn, Kind, Tensor};

use crate::checkpoint;
use crate::info::{device_name, parse_device, Info};
use crate::model::{VisionTransformer, VitConfig};
use crate::results::write_output;

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn info(a: InfoArgs) -> anyhow::Result<()> {
    let info = Info::collect();
    let text = if a.json { serde_json::to_string_pretty(&info)? + "\n" } else { info.human() };
    write_output("-", &text)?;
    Ok(())
}

#[derive(Debug, Args)]
pub struct ForwardArgs {
    /// Architecture (timm name) of a freshly initialised model; ignored with --checkpoint.
    #[arg(long, default_value = "vit_pico_patch4_32")]
    pub arch: String,
    /// Load the weights from this checkpoint instead of a random initialisation.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Checkpoint layout: timm, mae, dino, ibot, mocov3, ijepa, dinov2, lmim (default: detected; an ambiguous
    /// file is refused with the candidates).
    #[arg(long, value_parser = crate::cli::parse_family)]
    pub from: Option<crate::checkpoint::Family>,
    /// Number of generated images (refused when they cannot fit in memory).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(i64).range(1..=1 << 20))]
    pub batch_size: i64,
    /// Timed repetitions after one warm-up pass.
    #[arg(long, default_value_t = 3, value_parser = crate::cli::repeats)]
    pub repeat: usize,
    /// Device: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn forward(a: ForwardArgs) -> anyhow::Result<()> {
    let device = parse_device(&a.device)?;
    if a.checkpoint.is_none() {
        let cfg = VitConfig::from_arch(&a.arch)?;
        crate::info::check_fits("--batch-size", &format!("{} images through {}", a.batch_size, cfg.arch), crate::info::vit_forward_bytes(&cfg, a.batch_size as u128))?;
    }
    tch::manual_seed(0);
    let (vs, model) = match &a.checkpoint {
        Some(p) => {
            let opts = checkpoint::LoadOptions { from: a.from, ..Default::default() };
            let l = checkpoint::load_vit_with(p, &opts, device, 0).with_context(|| format!("loading {}", p.display()))?;
            (l.vs, l.model)
        }
        None => {
            let cfg = VitConfig::from_arch(&a.arch)?;
            let vs = nn::VarStore::new(device);
            let m = VisionTransformer::new(&vs.root(), &cfg);
            (vs, m)
        }
    };
    let cfg = &model.cfg;
    let what = format!("{} images through {}", a.batch_size, cfg.arch);
    let bytes = crate::info::vit_forward_bytes(cfg, a.batch_size as u128);
    crate::info::check_fits("--batch-size", &what, bytes)?;
    // The check estimates; the allocations themselves may still fail (memory taken meanwhile, a limit unseen).
    let images = Tensor::f_randn([a.batch_size, 3, cfg.img_size, cfg.img_size], (Kind::Float, device)).map_err(|e| crate::info::torch_alloc(&what, bytes, e))?;
    let (out, secs) = crate::info::allocating(&what, bytes, || {
        let out = tch::no_grad(|| model.forward_features(&images, &[-1], false));
        let mut secs = Vec::new();
        for _ in 0..a.repeat {
            let t = Instant::now();
            let o = tch::no_grad(|| model.forward_features(&images, &[], false));
            let _ = o.tokens.sum(Kind::Float).double_value(&[]);
            secs.push(t.elapsed().as_secs_f64());
        }
        (out, secs)
    })?;
    let best = secs.iter().cloned().fold(f64::INFINITY, f64::min);
    let report = serde_json::json!({
        "arch": cfg.arch,
        "params": crate::model::vit::count_params(&vs),
        "device": device_name(device),
        "input": images.size(),
        "tokens": out.tokens.size(),
        "cls": out.has_cls.then(|| out.cls().size()),
        "patch_tokens": out.patch_tokens().size(),
        "last_block": out.intermediates[0].size(),
        "finite": out.tokens.isfinite().all().int64_value(&[]) == 1,
        "img_per_s": if best.is_finite() { a.batch_size as f64 / best } else { 0.0 },
    });
    let text = if a.json {
        serde_json::to_string_pretty(&report)? + "\n"
    } else {
        format!(
            "{} ({} parameters) on {}: input {:?} -> tokens {:?} (CLS {:?}, patches {:?}); {:.1} img/s\n",
            cfg.arch, report["params"], report["device"].as_str().unwrap_or(""), images.size(), out.tokens.size(),
            out.has_cls.then(|| out.cls().size()), out.patch_tokens().size(), report["img_per_s"].as_f64().unwrap_or(0.0)
        )
    };
    write_output("-", &text)?;
    Ok(())
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Input checkpoint: a PyTorch .pth/.pt or safetensors file in any known layout (a timm state dict, possibly
    /// nested under `model` or `state_dict` with a `module.` prefix; MAE, DINO, iBOT, MoCo v3, I-JEPA and DINOv2
    /// training or released files; Latent MIM's), detected unless --from says.
    pub input: PathBuf,
    /// Output safetensors file (timm names; metadata: config, family, sub-model, source sha256, eval feature).
    pub output: PathBuf,
    /// Architecture (timm name) when the input has no metadata and cannot be inferred from its shapes.
    #[arg(long)]
    pub arch: Option<String>,
    /// Checkpoint layout: timm, mae, dino, ibot, mocov3, ijepa, dinov2, lmim (default: detected; an ambiguous
    /// file is refused with the candidates).
    #[arg(long, value_parser = crate::cli::parse_family)]
    pub from: Option<crate::checkpoint::Family>,
    /// Input size to resample the position embedding to, as timm does (default: the file's; 224 for DINOv2).
    #[arg(long)]
    pub img_size: Option<i64>,
    /// Print what was taken and dropped as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn convert(a: ConvertArgs) -> anyhow::Result<()> {
    let opts = checkpoint::LoadOptions { arch: a.arch.clone(), from: a.from, img_size: a.img_size };
    let loaded = checkpoint::load_vit_with(&a.input, &opts, tch::Device::Cpu, 0).with_context(|| format!("reading {}", a.input.display()))?;
    let mut meta = loaded.source.to_metadata();
    meta.insert("converted_from".to_string(), a.input.display().to_string());
    checkpoint::save_vit(&a.output, &loaded.vs, &loaded.model.cfg, &meta).with_context(|| format!("writing {}", a.output.display()))?;
    eprintln!("{} -> {} ({}; {}; {})", a.input.display(), a.output.display(), loaded.model.cfg.arch, loaded.source.summary(), loaded.report.summary());
    if a.json {
        let report = serde_json::json!({ "arch": loaded.model.cfg.arch, "config": loaded.model.cfg, "source": loaded.source, "load": loaded.report });
        write_output("-", &(serde_json::to_string_pretty(&report)? + "\n"))?;
    }
    Ok(())
}
