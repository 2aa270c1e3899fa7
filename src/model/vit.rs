//! Vision Transformer encoder with timm's parameter names.
//!
//! Variable paths follow `timm.models.vision_transformer.VisionTransformer`, so a timm state dict loads as is:
//! `cls_token`, `pos_embed`, `patch_embed.proj.{weight,bias}`, `blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,
//! mlp.fc2}`, `norm`, and optionally `fc_norm` and `head` for classifiers. The variants other methods need are
//! timm's too: no CLS token (`class_token=False`, I-JEPA), register tokens (`reg_token`, DINOv2 with registers),
//! layer scale (`blocks.N.ls1.gamma`, `blocks.N.ls2.gamma`) and a position embedding that covers the patches only
//! (`no_embed_class`).
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use super::pos_embed::{sincos_2d, GridPosEmbed, PosEmbedKind};
use crate::error::{Error, Result};

/// Architectures known by name. The patch-16 ones are timm's; `vit_pico_patch4_32` is this project's tiny size
/// for CPU tests and the demo (32-pixel inputs, an 8x8 grid).
pub const ARCH_NAMES: &[&str] = &[
    "vit_pico_patch4_32",
    "vit_tiny_patch16_224",
    "vit_small_patch16_224",
    "vit_base_patch16_224",
    "vit_large_patch16_224",
];

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct VitConfig {
    /// timm name of the architecture, written into checkpoints as `arch`.
    pub arch: String,
    pub img_size: i64,
    pub patch_size: i64,
    pub in_chans: i64,
    pub embed_dim: i64,
    pub depth: i64,
    pub num_heads: i64,
    pub mlp_ratio: f64,
    pub qkv_bias: bool,
    pub ln_eps: f64,
    /// Largest stochastic-depth rate; block i gets `drop_path_rate * i / (depth - 1)` as in timm.
    pub drop_path_rate: f64,
    /// Every block gets `drop_path_rate` (the Latent MIM encoder does this) instead of timm's linear ramp.
    pub drop_path_uniform: bool,
    /// Formula of the fixed position embedding used when a model is created fresh.
    pub pos_embed: PosEmbedKind,
    /// Size of the classification head; 0 means no head (an encoder).
    pub num_classes: i64,
    /// Pooling for the head, as timm: `token` (CLS after `norm`) or `avg` (mean of the last block's patch tokens,
    /// then `fc_norm`; the final `norm` is then an Identity and has no weights, as in timm and MAE's
    /// `models_vit.py` with `global_pool=True`).
    pub global_pool: GlobalPool,
    /// timm `class_token`: a CLS token first (false for I-JEPA, whose feature is the token average).
    pub class_token: bool,
    /// timm `reg_tokens`: learned register tokens after the CLS token (DINOv2 with registers).
    pub reg_tokens: i64,
    /// timm `no_embed_class`: `pos_embed` covers the patch tokens only; the prefix tokens get none.
    pub no_embed_class: bool,
    /// timm `init_values`: layer scale (`ls1.gamma`, `ls2.gamma` per block) when set.
    pub init_values: Option<f64>,
}

/// timm's `global_pool` of a ViT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum GlobalPool {
    #[default]
    Token,
    Avg,
}

impl Default for VitConfig {
    fn default() -> Self {
        VitConfig::from_arch("vit_base_patch16_224").expect("known arch")
    }
}

impl VitConfig {
    /// Sizes a ViT can be built with: positive, consistent, and within what memory can hold (a checkpoint's `config`
    /// metadata is input like any other).
    pub fn validate(&self) -> Result<()> {
        let bad = |r: String| Err(Error::option("config", format!("{}: {r}", self.arch)));
        if self.patch_size < 1 || self.img_size < self.patch_size || self.img_size > 8192 {
            return bad(format!("img_size {} and patch_size {} must satisfy 1 <= patch_size <= img_size <= 8192", self.img_size, self.patch_size));
        }
        if !(1..=1024).contains(&self.depth) || !(1..=1024).contains(&self.num_heads) || !(1..=65536).contains(&self.embed_dim) {
            return bad(format!("depth {}, num_heads {} and embed_dim {} must be in 1..=1024, 1..=1024, 1..=65536", self.depth, self.num_heads, self.embed_dim));
        }
        if self.embed_dim % self.num_heads != 0 || self.embed_dim % 4 != 0 {
            return bad(format!("embed_dim {} must be divisible by num_heads {} and by 4", self.embed_dim, self.num_heads));
        }
        if !(self.mlp_ratio > 0.0 && self.mlp_ratio <= 64.0) || self.in_chans < 1 || self.num_classes < 0 {
            return bad("mlp_ratio must be in (0, 64], in_chans >= 1, num_classes >= 0".into());
        }
        if !(0..=64).contains(&self.reg_tokens) {
            return bad(format!("reg_tokens {} must be in 0..=64", self.reg_tokens));
        }
        if !self.class_token && self.global_pool == GlobalPool::Token && self.num_classes > 0 {
            return bad("a model without a CLS token cannot pool by token; use global_pool = avg".into());
        }
        Ok(())
    }

    pub fn from_arch(arch: &str) -> Result<Self> {
        let (img, patch, dim, depth, heads) = match arch {
            "vit_pico_patch4_32" => (32, 4, 96, 4, 3),
            "vit_tiny_patch16_224" => (224, 16, 192, 12, 3),
            "vit_small_patch16_224" => (224, 16, 384, 12, 6),
            "vit_base_patch16_224" => (224, 16, 768, 12, 12),
            "vit_large_patch16_224" => (224, 16, 1024, 24, 16),
            other => return Err(Error::UnknownArch(other.to_string())),
        };
        Ok(VitConfig {
            arch: arch.to_string(),
            img_size: img,
            patch_size: patch,
            in_chans: 3,
            embed_dim: dim,
            depth,
            num_heads: heads,
            mlp_ratio: 4.0,
            qkv_bias: true,
            ln_eps: 1e-6,
            drop_path_rate: 0.0,
            drop_path_uniform: false,
            pos_embed: PosEmbedKind::Mae,
            num_classes: 0,
            global_pool: GlobalPool::Token,
            class_token: true,
            reg_tokens: 0,
            no_embed_class: false,
            init_values: None,
        })
    }

    /// Guesses the architecture from tensor shapes (a plain timm export carries no metadata).
    pub fn infer(shapes: &std::collections::HashMap<String, Vec<i64>>) -> Option<Self> {
        let proj = shapes.get("patch_embed.proj.weight")?;
        let pos = shapes.get("pos_embed")?;
        let depth = (0..).take_while(|i| shapes.contains_key(&format!("blocks.{i}.norm1.weight"))).count() as i64;
        let (dim, patch) = (proj[0], proj[2]);
        let tokens = pos[pos.len() - 2] - 1;
        let grid = (tokens as f64).sqrt().round() as i64;
        ARCH_NAMES.iter().filter_map(|a| VitConfig::from_arch(a).ok()).find(|c| {
            c.embed_dim == dim && c.patch_size == patch && c.depth == depth && c.img_size / c.patch_size == grid
        })
    }

    pub fn grid(&self) -> i64 {
        self.img_size / self.patch_size
    }
    /// CLS and register tokens before the patch tokens (timm `num_prefix_tokens`).
    pub fn num_prefix_tokens(&self) -> i64 {
        i64::from(self.class_token) + self.reg_tokens
    }
    /// Prefix tokens that have a row in `pos_embed` (none with `no_embed_class`).
    pub fn pos_prefix(&self) -> i64 {
        if self.no_embed_class {
            0
        } else {
            self.num_prefix_tokens()
        }
    }
    /// Rows of `pos_embed`.
    pub fn embed_len(&self) -> i64 {
        self.num_patches() + self.pos_prefix()
    }
    pub fn num_patches(&self) -> i64 {
        self.grid() * self.grid()
    }
    pub fn patch_dim(&self) -> i64 {
        self.in_chans * self.patch_size * self.patch_size
    }
    pub fn drop_path_rates(&self) -> Vec<f64> {
        let d = self.depth.max(1);
        (0..d)
            .map(|i| {
                if self.drop_path_uniform || d == 1 {
                    self.drop_path_rate
                } else {
                    self.drop_path_rate * i as f64 / (d - 1) as f64
                }
            })
            .collect()
    }
}

thread_local! {
    static AMP_KIND: std::cell::Cell<Option<Kind>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with mixed precision: matrix products (linear layers, the patch embedding, attention) in `kind`
/// (bf16 on CUDA), while LayerNorms, the residual stream, losses and the fp32 master weights stay in f32. This is
/// what CUDA autocast does; libtorch's autocast API as exposed by tch only offers fp16, hence the explicit casts.
pub fn with_amp<T>(kind: Option<Kind>, f: impl FnOnce() -> T) -> T {
    let prev = AMP_KIND.with(|k| k.replace(kind));
    let out = f();
    AMP_KIND.with(|k| k.set(prev));
    out
}

pub fn amp_kind() -> Option<Kind> {
    AMP_KIND.with(|k| k.get())
}

/// A linear layer under the current mixed-precision setting.
pub fn linear(l: &nn::Linear, x: &Tensor) -> Tensor {
    let out = match amp_kind() {
        Some(k) => x.to_kind(k).linear(&l.ws.to_kind(k), l.bs.as_ref().map(|b| b.to_kind(k))),
        None => x.linear(&l.ws, l.bs.as_ref()),
    };
    super::flops::add_linear(x, &out);
    out
}

/// Scaled dot-product attention (libtorch picks the flash / memory-efficient / math kernel), FLOPs counted.
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
    let out = Tensor::scaled_dot_product_attention(q, k, v, None::<&Tensor>, 0.0, false, None, false);
    super::flops::add_attention(q, k, &out);
    out
}

/// LayerNorm in f32 whatever the input precision, as autocast does.
pub fn norm(ln: &nn::LayerNorm, x: &Tensor) -> Tensor {
    ln.forward(&x.to_kind(Kind::Float))
}

#[derive(Debug)]
pub struct Attention {
    qkv: nn::Linear,
    proj: nn::Linear,
    num_heads: i64,
}

impl Attention {
    pub fn new(p: nn::Path, dim: i64, num_heads: i64, qkv_bias: bool) -> Self {
        let qkv = nn::linear(&p / "qkv", dim, 3 * dim, nn::LinearConfig { bias: qkv_bias, ..Default::default() });
        let proj = nn::linear(&p / "proj", dim, dim, Default::default());
        Attention { qkv, proj, num_heads }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (b, n, d) = x.size3().expect("attention input is [B, N, D]");
        let h = self.num_heads;
        // Rows of qkv are [q; k; v], each head-major, as in timm.
        let qkv = linear(&self.qkv, x).reshape([b, n, 3, h, d / h]).permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let out = sdpa(&q, &k, &v);
        linear(&self.proj, &out.transpose(1, 2).reshape([b, n, d])).to_kind(Kind::Float)
    }
}

#[derive(Debug)]
pub struct Mlp {
    fc1: nn::Linear,
    fc2: nn::Linear,
}

impl Mlp {
    pub fn new(p: nn::Path, dim: i64, hidden: i64) -> Self {
        Mlp { fc1: nn::linear(&p / "fc1", dim, hidden, Default::default()), fc2: nn::linear(&p / "fc2", hidden, dim, Default::default()) }
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        linear(&self.fc2, &linear(&self.fc1, x).gelu("none")).to_kind(Kind::Float)
    }
}

pub fn layer_norm(p: nn::Path, dim: i64, eps: f64) -> nn::LayerNorm {
    nn::layer_norm(p, vec![dim], nn::LayerNormConfig { eps, ..Default::default() })
}

#[derive(Debug)]
pub struct Block {
    norm1: nn::LayerNorm,
    attn: Attention,
    norm2: nn::LayerNorm,
    mlp: Mlp,
    drop_path: f64,
    /// Layer scale (timm `LayerScale`, `ls1.gamma` / `ls2.gamma`): per-channel factors on the residual branches.
    ls: Option<(Tensor, Tensor)>,
}

impl Block {
    pub fn new(p: nn::Path, cfg: &VitConfig, drop_path: f64) -> Self {
        let d = cfg.embed_dim;
        Block {
            norm1: layer_norm(&p / "norm1", d, cfg.ln_eps),
            attn: Attention::new(&p / "attn", d, cfg.num_heads, cfg.qkv_bias),
            norm2: layer_norm(&p / "norm2", d, cfg.ln_eps),
            mlp: Mlp::new(&p / "mlp", d, (d as f64 * cfg.mlp_ratio) as i64),
            drop_path,
            ls: cfg.init_values.map(|v| {
                let init = nn::Init::Const(v);
                ((&p / "ls1").var("gamma", &[d], init), (&p / "ls2").var("gamma", &[d], init))
            }),
        }
    }
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let scale = |t: Tensor, i: usize| match &self.ls {
            Some((g1, g2)) => t * if i == 1 { g1 } else { g2 },
            None => t,
        };
        let attn = |t: &Tensor| scale(self.attn.forward(&norm(&self.norm1, t)), 1);
        let mlp = |t: &Tensor| scale(self.mlp.forward(&norm(&self.norm2, t)), 2);
        if train && self.drop_path > 0.0 {
            let x = residual_drop_path(x, self.drop_path, attn);
            return residual_drop_path(&x, self.drop_path, mlp);
        }
        let x = x + attn(x);
        &x + mlp(&x)
    }
}

/// `x + drop_path(branch(x))` (timm's stochastic depth, one draw per sample and branch) that runs `branch` only on
/// the samples it keeps: a dropped sample's branch is multiplied by 0 anyway, so skipping it saves that share of
/// the block's compute (5 % of the blocks' FLOPs on average at fine-tuning's linear ramp to 0.1) and gives the
/// same values. The draw is made on the CPU generator, so choosing the rows needs no device read.
pub fn residual_drop_path(x: &Tensor, p: f64, branch: impl Fn(&Tensor) -> Tensor) -> Tensor {
    let keep = 1.0 - p;
    let b = x.size()[0];
    let kept = Tensor::empty([b], (Kind::Float, tch::Device::Cpu)).bernoulli_float_(keep).nonzero().view([-1]);
    match kept.size()[0] {
        // Every sample dropped: the branch of one sample times 0, so its parameters get zero gradients (as timm's
        // masked branch gives them) rather than none, and the optimiser still decays them. (An empty batch would
        // do the same with no compute, but not every CUDA attention kernel takes batch 0.)
        0 => x + branch(&x.narrow(0, 0, 1)) * 0.0,
        n if n == b => x + branch(x) / keep,
        _ => {
            let rows = crate::device::to_device_async(&kept, x.device());
            let out = branch(&x.index_select(0, &rows)) / keep;
            x.index_add(0, &rows, &out.to_kind(x.kind()))
        }
    }
}

/// What a forward pass returns. `tokens` are the final tokens after `norm`: the prefix tokens (CLS, then
/// registers), then the patches.
#[derive(Debug)]
pub struct VitOutput {
    pub tokens: Tensor,
    /// Outputs of the blocks asked for (before the final norm), in the order asked.
    pub intermediates: Vec<Tensor>,
    /// Number of prefix tokens (CLS and registers) before the patch tokens.
    pub prefix: i64,
    pub has_cls: bool,
}

impl VitOutput {
    /// The CLS token; a model without one (I-JEPA) has no such feature, which callers check first.
    pub fn cls(&self) -> Tensor {
        assert!(self.has_cls, "this model has no CLS token");
        self.tokens.select(1, 0)
    }
    pub fn patch_tokens(&self) -> Tensor {
        self.tokens.narrow(1, self.prefix, self.tokens.size()[1] - self.prefix)
    }
}

#[derive(Debug)]
pub struct VisionTransformer {
    pub cfg: VitConfig,
    /// None without a CLS token (`class_token = false`).
    pub cls_token: Option<Tensor>,
    /// `[1, reg_tokens, D]` register tokens, when the config has any.
    pub reg_token: Option<Tensor>,
    pub pos_embed: Tensor,
    pub patch_embed: nn::Conv2D,
    pub blocks: Vec<Block>,
    /// None with `global_pool = avg` (timm's Identity).
    pub norm: Option<nn::LayerNorm>,
    pub fc_norm: Option<nn::LayerNorm>,
    pub head: Option<nn::Linear>,
}

impl VisionTransformer {
    /// Creates the variables under `p` with timm's names. A fresh model gets timm/MAE-style initialisation and a
    /// fixed sine-cosine position embedding (registered as a non-trainable variable, as MAE freezes it).
    pub fn new(p: &nn::Path, cfg: &VitConfig) -> Self {
        let d = cfg.embed_dim;
        let cls_token = cfg.class_token.then(|| p.var("cls_token", &[1, 1, d], nn::Init::Randn { mean: 0.0, stdev: 0.02 }));
        let reg_token = (cfg.reg_tokens > 0).then(|| p.var("reg_token", &[1, cfg.reg_tokens, d], nn::Init::Randn { mean: 0.0, stdev: 0.02 }));
        let pos_embed = p.zeros_no_train("pos_embed", &[1, cfg.embed_len(), d]);
        tch::no_grad(|| {
            // Prefix rows (if any) stay zero, as MAE's CLS row.
            let pe = sincos_2d(d, cfg.grid(), cfg.pos_embed, false).to_device(pos_embed.device());
            pos_embed.view([-1, d]).narrow(0, cfg.pos_prefix(), cfg.num_patches()).copy_(&pe);
        });
        let patch_embed = nn::conv2d(
            p / "patch_embed" / "proj",
            cfg.in_chans,
            d,
            cfg.patch_size,
            nn::ConvConfig { stride: cfg.patch_size, ..Default::default() },
        );
        let rates = cfg.drop_path_rates();
        let blocks = (0..cfg.depth).map(|i| Block::new(p / "blocks" / i, cfg, rates[i as usize])).collect();
        let avg = cfg.global_pool == GlobalPool::Avg;
        let norm = (!avg).then(|| layer_norm(p / "norm", d, cfg.ln_eps));
        let fc_norm = avg.then(|| layer_norm(p / "fc_norm", d, cfg.ln_eps));
        let head = (cfg.num_classes > 0).then(|| nn::linear(p / "head", d, cfg.num_classes, Default::default()));
        VisionTransformer { cfg: cfg.clone(), cls_token, reg_token, pos_embed, patch_embed, blocks, norm, fc_norm, head }
    }

    /// Position embedding for a `grid x grid` input. At the trained grid it is the stored one; for another grid
    /// it is resampled as timm's `resample_abs_pos_embed` does (bicubic with antialias, prefix rows kept).
    pub fn pos_embed_for_grid(&self, grid: i64) -> Tensor {
        if grid == self.cfg.grid() {
            return self.pos_embed.shallow_clone();
        }
        super::pos_embed::resample_abs_pos_embed(&self.pos_embed, self.cfg.grid(), grid, self.cfg.pos_prefix())
    }

    /// The position embedding (prefix rows, then `rows x cols` patch rows in row-major order) for an input grid,
    /// by `mode`. `Timm` takes square grids only.
    pub fn pos_embed_hw(&self, rows: i64, cols: i64, mode: GridPosEmbed) -> Tensor {
        let prefix = self.cfg.pos_prefix();
        match mode {
            GridPosEmbed::Timm => {
                assert_eq!(rows, cols, "timm's resampling takes square grids only");
                self.pos_embed_for_grid(rows)
            }
            GridPosEmbed::Interpolate => super::pos_embed::dino_interpolate(&self.pos_embed, self.cfg.grid(), rows, cols, prefix),
            GridPosEmbed::Sincos => {
                let d = self.cfg.embed_dim;
                let table = super::pos_embed::sincos_2d_hw(d, rows, cols, self.cfg.pos_embed, false).to_device(self.pos_embed.device()).to_kind(self.pos_embed.kind()).unsqueeze(0);
                Tensor::cat(&[self.pos_embed.narrow(1, 0, prefix), table], 1)
            }
        }
    }

    /// Patch tokens of images `[B, C, H, W]` with position embeddings added: `[B, N, D]`.
    pub fn embed_images(&self, images: &Tensor) -> Tensor {
        self.embed_images_with(images, GridPosEmbed::Timm)
    }

    /// [`Self::embed_images`] on any `H x W` input (multiples of the patch size), the position embedding met by `mode`.
    pub fn embed_images_with(&self, images: &Tensor, mode: GridPosEmbed) -> Tensor {
        let x = match amp_kind() {
            Some(k) => images.to_kind(k).conv2d(
                &self.patch_embed.ws.to_kind(k),
                self.patch_embed.bs.as_ref().map(|b| b.to_kind(k)),
                [self.cfg.patch_size],
                [0],
                [1],
                1,
            ),
            None => images.apply(&self.patch_embed),
        }
        .to_kind(Kind::Float);
        if super::flops::counting() {
            let k = (self.cfg.in_chans * self.cfg.patch_size * self.cfg.patch_size) as f64;
            super::flops::add(&x, 2.0 * k * x.numel() as f64);
        }
        let (b, d, gh, gw) = x.size4().expect("patch embedding is [B, D, H, W]");
        let x = x.reshape([b, d, gh * gw]).transpose(1, 2);
        x + self.pos_embed_hw(gh, gw, mode).narrow(1, self.cfg.pos_prefix(), gh * gw)
    }

    /// Embeds pre-cut patches `[B, L, C*p*p]` (flattened in (channel, row, col) order, i.e. the conv weight's
    /// layout) at grid positions `pid` `[B, L]`. This is how Latent MIM feeds a subset of jittered patches.
    pub fn embed_patches(&self, patches: &Tensor, pid: &Tensor) -> Tensor {
        let d = self.cfg.embed_dim;
        let w = self.patch_embed.ws.reshape([d, -1]);
        let lin = nn::Linear { ws: w, bs: self.patch_embed.bs.as_ref().map(|b| b.shallow_clone()) };
        let x = linear(&lin, patches).to_kind(Kind::Float);
        let pe = self.pos_embed.select(0, 0).narrow(0, self.cfg.pos_prefix(), self.cfg.num_patches());
        x + pe.index_select(0, &pid.flatten(0, -1)).reshape([pid.size()[0], pid.size()[1], d])
    }

    /// Puts the prefix tokens (CLS, registers) before patch tokens that already carry their position embedding.
    /// Without `no_embed_class` the prefix tokens get their own `pos_embed` rows, as timm adds `pos_embed` after
    /// concatenating; with it they get none.
    pub fn prepend_prefix(&self, x: &Tensor) -> Tensor {
        let (b, d) = (x.size()[0], self.cfg.embed_dim);
        let mut parts = Vec::with_capacity(3);
        let mut row = 0;
        for tok in [&self.cls_token, &self.reg_token].into_iter().flatten() {
            let n = tok.size()[1];
            let t = if self.cfg.no_embed_class { tok.shallow_clone() } else { tok + self.pos_embed.narrow(1, row, n) };
            row += n;
            parts.push(t.expand([b, n, d], false).to_kind(x.kind()));
        }
        if parts.is_empty() {
            return x.shallow_clone();
        }
        parts.push(x.shallow_clone());
        Tensor::cat(&parts, 1)
    }

    /// Runs the blocks on embedded tokens (CLS included) and returns the normed tokens, keeping the outputs of
    /// the blocks listed in `keep` (indices may be negative, counting from the end).
    pub fn run_blocks(&self, x: Tensor, keep: &[i64], train: bool) -> VitOutput {
        let depth = self.blocks.len() as i64;
        let keep: Vec<i64> = keep.iter().map(|&i| if i < 0 { depth + i } else { i }).collect();
        let mut slots: Vec<Option<Tensor>> = keep.iter().map(|_| None).collect();
        let mut x = x;
        for (i, blk) in self.blocks.iter().enumerate() {
            x = blk.forward(&x, train);
            for (slot, &k) in slots.iter_mut().zip(&keep) {
                if k == i as i64 {
                    *slot = Some(x.shallow_clone());
                }
            }
        }
        let intermediates = slots.into_iter().map(|s| s.expect("block index within depth")).collect();
        VitOutput { tokens: self.final_norm(&x), intermediates, prefix: self.cfg.num_prefix_tokens(), has_cls: self.cfg.class_token }
    }

    /// Forward over whole images: the final tokens and the requested intermediate block outputs.
    pub fn forward_features(&self, images: &Tensor, keep: &[i64], train: bool) -> VitOutput {
        let x = self.prepend_prefix(&self.embed_images(images));
        self.run_blocks(x, keep, train)
    }

    /// [`Self::forward_features`] on an `H x W` input, the position embedding met by `mode`.
    pub fn forward_features_with(&self, images: &Tensor, keep: &[i64], train: bool, mode: GridPosEmbed) -> VitOutput {
        let x = self.prepend_prefix(&self.embed_images_with(images, mode));
        self.run_blocks(x, keep, train)
    }

    /// Forward over a subset of patches at positions `pid`, with the CLS token prepended.
    pub fn forward_patches(&self, patches: &Tensor, pid: &Tensor, keep: &[i64], train: bool) -> VitOutput {
        let x = self.prepend_prefix(&self.embed_patches(patches, pid));
        self.run_blocks(x, keep, train)
    }

    /// Classifier logits (needs `num_classes > 0`): CLS token, or mean of patch tokens then `fc_norm`, as timm.
    /// The final `norm` (an identity for average-pooled models, which have none).
    pub fn final_norm(&self, x: &Tensor) -> Tensor {
        match &self.norm {
            Some(n) => norm(n, x),
            None => x.to_kind(Kind::Float),
        }
    }

    /// timm's `forward_head(pre_logits=True)`: the CLS token, or `fc_norm` of the patch-token mean, or (no CLS
    /// token and no `fc_norm`, timm's `global_pool='avg', fc_norm=False` as for I-JEPA) the mean of the normed
    /// patch tokens.
    pub fn pooled(&self, out: &VitOutput) -> Tensor {
        match &self.fc_norm {
            Some(fc) => norm(fc, &out.patch_tokens().mean_dim(1, false, None)),
            None if !out.has_cls => out.patch_tokens().mean_dim(1, false, None),
            None => out.cls(),
        }
    }

    pub fn forward_head(&self, out: &VitOutput) -> Tensor {
        let head = self.head.as_ref().expect("model built with a head");
        linear(head, &self.pooled(out)).to_kind(Kind::Float)
    }

    pub fn forward(&self, images: &Tensor, train: bool) -> Tensor {
        let out = self.forward_features(images, &[], train);
        self.forward_head(&out)
    }
}

/// Number of elements of all trainable variables in a var store.
pub fn count_params(vs: &nn::VarStore) -> i64 {
    vs.trainable_variables().iter().map(|t| t.numel() as i64).sum()
}
