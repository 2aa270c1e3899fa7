//! The Latent MIM model: online encoder with its projection head, EMA target encoder, cross-attention decoder,
//! the patch-gap patchify, the random views and the losses (yibingwei-1/LatentMIM: models_lmim.py and its loss; the paper, sections 3 and 4).
use rand::Rng;
use serde::{Deserialize, Serialize};
use tch::nn;
use tch::{Device, Kind, Tensor};

use super::decoder::{CrossDecoder, DecoderConfig};
use super::pos_embed::PosEmbedKind;
use super::vit::{layer_norm, linear, norm, VisionTransformer, VitConfig};
use crate::config::Rule;
use crate::error::{Error, Result};

/// Model part of a Latent MIM config. Key names follow the reference code (`decoder_depth`, `patch_gap`, ...).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LmimModelConfig {
    /// Encoder: `vit_base`, `vit_small`, `vit_tiny`, `vit_large`, `vit_pico`, or a full timm name.
    pub encoder: String,
    pub decoder_depth: i64,
    pub decoder_dim: i64,
    pub decoder_heads: i64,
    /// Projection head on top of both encoders: depth and hidden width (the reference always builds 3 x 4096).
    pub proj_mlp_depth: i64,
    pub proj_mlp_dim: i64,
    /// Visible patches fed to the online encoder (20 of 196 for ViT-B/16).
    pub num_vis: i64,
    /// Pixels between patch windows; training crops are `grid * (patch + patch_gap)` wide.
    pub patch_gap: i64,
    pub loss: LossKind,
    pub tau: f64,
    /// Weight of the average-similarity regulariser (0 disables it).
    pub avg_sim_coeff: f64,
    /// Similarity target, cosine from `sim_init` to `sim_end` over the run.
    pub sim_init: f64,
    pub sim_end: f64,
    /// EMA momentum, cosine from `target_mom` to 1 over the run.
    pub target_mom: f64,
    pub drop_path: f64,
}

impl Default for LmimModelConfig {
    fn default() -> Self {
        LmimModelConfig {
            encoder: "vit_base".into(),
            decoder_depth: 3,
            decoder_dim: 512,
            decoder_heads: 16,
            proj_mlp_depth: 3,
            proj_mlp_dim: 4096,
            num_vis: 20,
            patch_gap: 4,
            loss: LossKind::InfoncePatches,
            tau: 0.2,
            avg_sim_coeff: 0.1,
            sim_init: 0.75,
            sim_end: 0.25,
            target_mom: 0.99,
            drop_path: 0.0,
        }
    }
}

/// The latent reconstruction loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    /// Patch-level InfoNCE against the target latents (the method).
    #[default]
    InfoncePatches,
    /// Direct regression of normalised latents (the paper's ablation).
    NormL2,
}

impl LmimModelConfig {
    /// Valid values of the numeric keys (`crate::config::Rule`): far above any published model, below what
    /// would only fail later as an allocation abort or a diverged loss.
    pub const RULES: &'static [Rule] = &[
        Rule::int("decoder_depth", 1, 256),
        Rule::int("decoder_dim", 4, 65536).multiple_of("decoder_heads"),
        Rule::int("decoder_heads", 1, 1024),
        Rule::int("proj_mlp_depth", 1, 64),
        Rule::int("proj_mlp_dim", 1, 65536),
        Rule::int("num_vis", 1, 1 << 20),
        Rule::int("patch_gap", 0, 4096),
        Rule::above("tau", 0.0, 100.0),
        Rule::real("avg_sim_coeff", 0.0, 1000.0),
        // Cosine similarities.
        Rule::real("sim_init", -1.0, 1.0),
        Rule::real("sim_end", -1.0, 1.0),
        Rule::real("target_mom", 0.0, 1.0),
        Rule::below("drop_path", 0.0, 1.0),
    ];

    pub fn vit_config(&self) -> Result<VitConfig> {
        let arch = match self.encoder.as_str() {
            "vit_pico" => "vit_pico_patch4_32",
            "vit_tiny" => "vit_tiny_patch16_224",
            "vit_small" => "vit_small_patch16_224",
            "vit_base" => "vit_base_patch16_224",
            "vit_large" => "vit_large_patch16_224",
            other => other,
        };
        let mut cfg = VitConfig::from_arch(arch)?;
        cfg.pos_embed = PosEmbedKind::Lmim;
        cfg.drop_path_rate = self.drop_path;
        cfg.drop_path_uniform = true;
        Ok(cfg)
    }

    /// Side of the training crop: `grid * (patch + gap)` (280 for ViT-B/16 with gap 4).
    pub fn train_size(&self) -> Result<i64> {
        let v = self.vit_config()?;
        Ok(v.grid() * (v.patch_size + self.patch_gap))
    }

    /// What the table ([`Self::RULES`], checked by the pretraining config) cannot say: the encoder's patch count
    /// bounds `num_vis`, and the sine-cosine position embedding needs `decoder_dim` divisible by 4.
    pub fn validate(&self) -> Result<()> {
        let v = self.vit_config()?;
        if self.num_vis >= v.num_patches() {
            return Err(Error::option("num_vis", format!("{} must be between 1 and {} (the patches of {})", self.num_vis, v.num_patches() - 1, v.arch)));
        }
        if self.decoder_dim % 4 != 0 {
            return Err(Error::option("decoder_dim", format!("{} must be divisible by 4", self.decoder_dim)));
        }
        Ok(())
    }
}

/// The MLP projection head of the reference encoder: (Linear without bias, LayerNorm eps 1e-5, GELU) x (depth-1),
/// then Linear and LayerNorm. Keys `head.linear{i}.weight`, `head.norm{i}.{weight,bias}`.
#[derive(Debug)]
pub struct ProjHead {
    layers: Vec<(nn::Linear, nn::LayerNorm)>,
}

impl ProjHead {
    pub fn new(p: nn::Path, dim: i64, hidden: i64, depth: i64) -> Self {
        let layers = (0..depth)
            .map(|i| {
                let (i_dim, o_dim) = (if i == 0 { dim } else { hidden }, if i == depth - 1 { dim } else { hidden });
                let lin = nn::linear(&p / format!("linear{i}"), i_dim, o_dim, nn::LinearConfig { bias: false, ..Default::default() });
                (lin, layer_norm(&p / format!("norm{i}"), o_dim, 1e-5))
            })
            .collect();
        ProjHead { layers }
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let n = self.layers.len();
        let mut x = x.shallow_clone();
        for (i, (lin, ln)) in self.layers.iter().enumerate() {
            x = norm(ln, &linear(lin, &x));
            if i + 1 < n {
                x = x.gelu("none");
            }
        }
        x
    }
}

/// A ViT with the projection head: the online and the target encoder.
#[derive(Debug)]
pub struct LmimEncoder {
    pub vit: VisionTransformer,
    pub head: ProjHead,
}

impl LmimEncoder {
    pub fn new(p: &nn::Path, vit: &VitConfig, cfg: &LmimModelConfig) -> Self {
        LmimEncoder { vit: VisionTransformer::new(p, vit), head: ProjHead::new(p / "head", vit.embed_dim, cfg.proj_mlp_dim, cfg.proj_mlp_depth) }
    }
    /// Latents of the patches at `pid`, CLS first, after the final norm and the head: `[B, 1+L, D]`.
    pub fn forward(&self, patches: &Tensor, pid: &Tensor, train: bool) -> Tensor {
        self.head.forward(&self.vit.forward_patches(patches, pid, &[], train).tokens)
    }
}

/// Patches of a batch and the split into visible and target ids.
pub struct Views {
    /// `[B, N, C*p*p]`, flattened in (channel, row, col) order.
    pub patches: Tensor,
    pub vis_pid: Tensor,
    pub mask_pid: Tensor,
}

/// Cuts a `grid x grid` set of `patch`-pixel windows out of `images [B, C, H, W]`, `H = grid * (patch + gap)`: the
/// window of cell (r, c) starts at `(r*(patch+gap) + oy[b,r,c], c*(patch+gap) + ox[b,r,c])`. With gap 0 and zero
/// offsets this is the plain patchify. Output `[B, grid*grid, C*patch*patch]`, tokens row-major.
pub fn patchify(images: &Tensor, patch: i64, gap: i64, oy: &Tensor, ox: &Tensor) -> Tensor {
    let (b, c, h, w) = images.size4().expect("images are [B, C, H, W]");
    let cell = patch + gap;
    let grid = h / cell;
    assert_eq!(w / cell, grid, "square inputs only");
    let dev = images.device();
    let ar = |n: i64| Tensor::arange(n, (Kind::Int64, dev));
    // Pixel rows: r*cell + oy[b,r,c] + i, columns: c*cell + ox[b,r,c] + j -> flat index [B, G, G, p, p].
    let rows = (ar(grid) * cell).view([1, grid, 1, 1, 1]) + crate::device::to_device_async(oy, dev).view([b, grid, grid, 1, 1]) + ar(patch).view([1, 1, 1, patch, 1]);
    let cols = (ar(grid) * cell).view([1, 1, grid, 1, 1]) + crate::device::to_device_async(ox, dev).view([b, grid, grid, 1, 1]) + ar(patch).view([1, 1, 1, 1, patch]);
    let idx = (rows * w + cols).view([b, 1, -1]).expand([b, c, grid * grid * patch * patch], false);
    images
        .reshape([b, c, h * w])
        .gather(2, &idx, false)
        .view([b, c, grid * grid, patch, patch])
        .permute([0, 2, 1, 3, 4])
        .reshape([b, grid * grid, c * patch * patch])
}

/// The random part of a training view: patch offsets `oy`, `ox` `[B, G, G]` in `0..gap` and a permutation of the
/// `G * G` patch ids per image `[B, G * G]` (the first `num_vis` visible, the rest targets, both unsorted).
pub struct ViewDraw {
    pub oy: Tensor,
    pub ox: Tensor,
    pub ids: Tensor,
}

/// Draws a [`ViewDraw`] for `b` images on a `grid` x `grid` patch grid from `rng` (reproducible from the seed).
pub fn draw_views<R: Rng>(b: i64, grid: i64, gap: i64, rng: &mut R) -> ViewDraw {
    let n = grid * grid;
    let offs = |rng: &mut R| {
        let v: Vec<i64> = (0..b * n).map(|_| if gap > 0 { rng.gen_range(0..gap) } else { 0 }).collect();
        Tensor::from_slice(&v).view([b, grid, grid])
    };
    let oy = offs(rng);
    let ox = offs(rng);
    let mut ids = Vec::with_capacity((b * n) as usize);
    for _ in 0..b {
        let mut perm: Vec<i64> = (0..n).collect();
        for i in (1..perm.len()).rev() {
            perm.swap(i, rng.gen_range(0..=i));
        }
        ids.extend(perm);
    }
    ViewDraw { oy, ox, ids: Tensor::from_slice(&ids).view([b, n]) }
}

/// The views of `images` that `draw` selects.
pub fn views_from(images: &Tensor, patch: i64, gap: i64, num_vis: i64, draw: &ViewDraw) -> Views {
    let n = draw.ids.size()[1];
    let ids = crate::device::to_device_async(&draw.ids, images.device());
    Views { patches: patchify(images, patch, gap, &draw.oy, &draw.ox), vis_pid: ids.narrow(1, 0, num_vis), mask_pid: ids.narrow(1, num_vis, n - num_vis) }
}

/// Random views of `images`: [`draw_views`] then [`views_from`].
pub fn random_views<R: Rng>(images: &Tensor, patch: i64, gap: i64, num_vis: i64, rng: &mut R) -> Views {
    let (b, _, h, _) = images.size4().expect("images are [B, C, H, W]");
    views_from(images, patch, gap, num_vis, &draw_views(b, h / (patch + gap), gap, rng))
}

/// Selects tokens `pid [B, L]` of `x [B, N, D]`.
pub fn take_tokens(x: &Tensor, pid: &Tensor) -> Tensor {
    let d = x.size()[2];
    x.gather(1, &pid.unsqueeze(-1).expand([-1, -1, d], false), false)
}

/// Mean cosine similarity over all ordered token pairs (diagonal included) and the whole batch: `[B, N, D]` -> scalar.
/// Computed as |sum of unit vectors|^2 / N^2 per image, which equals the mean of the N x N cosine matrix.
pub fn avg_sim(z: &Tensor) -> Tensor {
    let n = z.size()[1] as f64;
    let u = normalize(&z.to_kind(Kind::Float));
    u.sum_dim_intlist(1, false, None).square().sum_dim_intlist(-1, false, None).mean(None) / (n * n)
}

pub fn normalize(x: &Tensor) -> Tensor {
    // F.normalize: x / max(||x||, 1e-12)
    x / x.norm_scalaropt_dim(2, [-1], true).clamp_min(1e-12)
}

/// The `infonce_patches` loss: predictions standardised across the tokens of each image (unbiased std + 1e-4),
/// both sides L2-normalised, within-image InfoNCE with the positive on the diagonal, scaled by 2*tau.
pub fn infonce_patches(pred: &Tensor, trg: &Tensor, tau: f64) -> Tensor {
    let (b, n, _) = pred.size3().expect("[B, N, D]");
    let pred = pred.to_kind(Kind::Float);
    let mean = pred.mean_dim(1, true, None);
    let std = pred.std_dim(1, true, true);
    let pred = normalize(&((&pred - mean) / (std + 1e-4)));
    let trg = normalize(&trg.to_kind(Kind::Float));
    let logits = pred.matmul(&trg.transpose(1, 2)) / tau;
    super::flops::add(&logits, 2.0 * logits.numel() as f64 * pred.size()[2] as f64);
    let labels = Tensor::arange(n, (Kind::Int64, pred.device())).repeat([b]);
    logits.reshape([b * n, n]).cross_entropy_for_logits(&labels) * (2.0 * tau)
}

/// The `norm_l2` loss: targets standardised per token over channels (unbiased var + 1e-6), MSE to the raw prediction.
pub fn norm_l2(pred: &Tensor, trg: &Tensor) -> Tensor {
    let trg = trg.to_kind(Kind::Float);
    let mean = trg.mean_dim(-1, true, None);
    let var = trg.var_dim(-1, true, true);
    let trg = (&trg - mean) / (var + 1e-6).sqrt();
    pred.to_kind(Kind::Float).mse_loss(&trg, tch::Reduction::Mean)
}

/// Loss and the collapse monitors of one forward pass.
pub struct StepOutput {
    pub loss: Tensor,
    pub loss_main: Tensor,
    pub loss_reg: Tensor,
    pub avg_sim_pred: Tensor,
    pub avg_sim_vis: Tensor,
    pub avg_sim_trg: Tensor,
    /// Std across all target tokens of the L2-normalised target latents, per channel, averaged, times sqrt(D):
    /// about 1 for well-spread features, 0 at collapse.
    pub target_std: Tensor,
}

#[derive(Debug)]
pub struct Lmim {
    pub cfg: LmimModelConfig,
    pub vit_cfg: VitConfig,
    pub encoder: LmimEncoder,
    pub target: LmimEncoder,
    pub decoder: CrossDecoder,
}

impl Lmim {
    /// Builds the model under `encoder.*`, `target_encoder.*` and `decoder.*` and initialises it as the reference
    /// code does (xavier-uniform Linears, zero biases, CLS ~ N(0, 0.02)); the target starts as a copy of the encoder.
    pub fn new(vs: &nn::VarStore, cfg: &LmimModelConfig) -> Result<Self> {
        cfg.validate()?;
        let vit_cfg = cfg.vit_config()?;
        let root = vs.root();
        let encoder = LmimEncoder::new(&(&root / "encoder"), &vit_cfg, cfg);
        let target = LmimEncoder::new(&(&root / "target_encoder"), &vit_cfg, cfg);
        let dcfg = DecoderConfig {
            embed_dim: cfg.decoder_dim,
            depth: cfg.decoder_depth,
            num_heads: cfg.decoder_heads,
            mlp_ratio: 4.0,
            out_dim: vit_cfg.embed_dim,
            grid: vit_cfg.grid(),
        };
        let decoder = CrossDecoder::new(&(&root / "decoder"), &dcfg, vit_cfg.embed_dim);
        let model = Lmim { cfg: cfg.clone(), vit_cfg, encoder, target, decoder };
        model.init_weights(vs);
        for (_, t) in model.target_vars(vs) {
            let _ = t.set_requires_grad(false);
        }
        Ok(model)
    }

    fn init_weights(&self, vs: &nn::VarStore) {
        tch::no_grad(|| {
            // Sorted, so that the random draws do not depend on the hash map's order.
            let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
            vars.sort_by(|a, b| a.0.cmp(&b.0));
            for (name, mut t) in vars {
                if name.ends_with("pos_embed") || name.starts_with("target_encoder.") {
                    continue;
                }
                if name.ends_with("cls_token") {
                    let _ = t.normal_(0.0, 0.02);
                } else if name.ends_with("mask_token") || name.ends_with(".bias") && !name.contains("norm") {
                    let _ = t.zero_();
                } else if name.ends_with(".weight") && t.dim() >= 2 {
                    // xavier_uniform on the full matrix (qkv as one matrix; the conv patch embedding as [D, C*p*p]).
                    let fan_out = t.size()[0] as f64;
                    let fan_in = (t.numel() as f64) / fan_out;
                    let a = (6.0 / (fan_in + fan_out)).sqrt();
                    let _ = t.uniform_(-a, a);
                }
            }
            self.copy_encoder_to_target(vs);
        });
    }

    /// (name, tensor) of the online encoder's trainable variables, sorted by name.
    pub fn encoder_vars(&self, vs: &nn::VarStore) -> Vec<(String, Tensor)> {
        prefixed(vs, "encoder.", true)
    }
    pub fn target_vars(&self, vs: &nn::VarStore) -> Vec<(String, Tensor)> {
        prefixed(vs, "target_encoder.", true)
    }
    /// Variables the optimiser updates: the encoder and the decoder, without the fixed position embeddings.
    pub fn trainable_vars(&self, vs: &nn::VarStore) -> Vec<(String, Tensor)> {
        let mut v = prefixed(vs, "encoder.", true);
        v.extend(prefixed(vs, "decoder.", true));
        v
    }

    fn copy_encoder_to_target(&self, vs: &nn::VarStore) {
        tch::no_grad(|| {
            for ((_, mut t), (_, s)) in self.target_vars(vs).into_iter().zip(self.encoder_vars(vs)) {
                t.copy_(&s);
            }
        })
    }

    /// `theta_T <- m * theta_T + (1 - m) * theta` over all encoder parameters (head included).
    pub fn ema_update(&self, vs: &nn::VarStore, m: f64) {
        tch::no_grad(|| {
            for ((_, mut t), (_, s)) in self.target_vars(vs).into_iter().zip(self.encoder_vars(vs)) {
                let _ = t.g_mul_scalar_(m);
                let _ = t.g_add_(&(s.detach() * (1.0 - m)));
            }
        })
    }

    /// One forward pass on prepared views. `sim_target` is s(t) of the regulariser.
    pub fn forward(&self, views: &Views, sim_target: f64, train: bool) -> StepOutput {
        let trg_pix = take_tokens(&views.patches, &views.mask_pid);
        let vis_pix = take_tokens(&views.patches, &views.vis_pid);
        let z_trg = tch::no_grad(|| {
            let z = self.target.forward(&trg_pix, &views.mask_pid, false);
            z.narrow(1, 1, z.size()[1] - 1).to_kind(Kind::Float)
        });
        let z_vis = self.encoder.forward(&vis_pix, &views.vis_pid, train);
        let z_pred = self.decoder.forward(&z_vis, &views.vis_pid, &views.mask_pid);
        let loss_main = match self.cfg.loss {
            LossKind::NormL2 => norm_l2(&z_pred, &z_trg),
            LossKind::InfoncePatches => infonce_patches(&z_pred, &z_trg, self.cfg.tau),
        };
        let avg_sim_pred = avg_sim(&z_pred);
        let avg_sim_vis = avg_sim(&z_vis.narrow(1, 1, z_vis.size()[1] - 1));
        let loss_reg = if self.cfg.avg_sim_coeff > 0.0 {
            ((&avg_sim_pred - sim_target).square() + (&avg_sim_vis - sim_target).square()) * self.cfg.avg_sim_coeff
        } else {
            Tensor::zeros([], (Kind::Float, z_pred.device()))
        };
        let loss = &loss_main + &loss_reg;
        let (avg_sim_trg, target_std) = tch::no_grad(|| {
            let d = z_trg.size()[2];
            let u = normalize(&z_trg).reshape([-1, d]);
            (avg_sim(&z_trg), u.std_dim(0, true, false).mean(None) * (d as f64).sqrt())
        });
        StepOutput {
            loss,
            loss_main,
            loss_reg,
            avg_sim_pred: avg_sim_pred.detach(),
            avg_sim_vis: avg_sim_vis.detach(),
            avg_sim_trg,
            target_std,
        }
    }
}

fn prefixed(vs: &nn::VarStore, prefix: &str, skip_pos_embed: bool) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> =
        vs.variables().into_iter().filter(|(n, _)| n.starts_with(prefix) && !(skip_pos_embed && n.ends_with("pos_embed"))).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The reference's weight-decay rule (timm `param_groups_weight_decay` plus its name filter): no decay for tensors
/// with ndim <= 1 or whose name contains `bias`, `norm` or `embed`.
pub fn decays(name: &str, t: &Tensor) -> bool {
    !(t.dim() <= 1 || name.contains("bias") || name.contains("norm") || name.contains("embed"))
}

/// Timm-named encoder tensors (no projection head) for export as a plain ViT checkpoint.
pub fn export_encoder(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    prefixed(vs, "encoder.", false)
        .into_iter()
        .filter(|(n, _)| !n.starts_with("encoder.head."))
        .map(|(n, t)| (n["encoder.".len()..].to_string(), t.to_device(Device::Cpu)))
        .collect()
}
