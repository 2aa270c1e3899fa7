//! The Latent MIM cross-attention decoder (`CrossDecoder` of the reference code): mask-token queries, built from
//! a position-weighted average of the visible latents ("visual cues"), attend to themselves and to the encoder's
//! visible latents, and are projected back to the encoder width.
use tch::nn;
use tch::{Kind, Tensor};

use super::pos_embed::{sincos_2d, PosEmbedKind};
use super::vit::{layer_norm, linear, norm, sdpa, Mlp};

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct DecoderConfig {
    pub embed_dim: i64,
    pub depth: i64,
    pub num_heads: i64,
    pub mlp_ratio: f64,
    /// Width of the encoder latents it reads and predicts.
    pub out_dim: i64,
    /// Side of the patch grid (14 for ViT-B/16 at 224).
    pub grid: i64,
}

fn heads_split(x: &Tensor, h: i64) -> Tensor {
    let (b, n, d) = x.size3().expect("[B, N, D]");
    x.reshape([b, n, h, d / h]).transpose(1, 2)
}

fn heads_merge(x: &Tensor) -> Tensor {
    let (b, h, n, hd) = x.size4().expect("[B, H, N, hd]");
    x.transpose(1, 2).reshape([b, n, h * hd])
}

#[derive(Debug)]
pub struct SelfAttention {
    qkv: nn::Linear,
    proj: nn::Linear,
    heads: i64,
}

impl SelfAttention {
    pub fn new(p: nn::Path, dim: i64, heads: i64) -> Self {
        SelfAttention { qkv: nn::linear(&p / "qkv", dim, 3 * dim, Default::default()), proj: nn::linear(&p / "proj", dim, dim, Default::default()), heads }
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (b, n, d) = x.size3().expect("[B, N, D]");
        let qkv = linear(&self.qkv, x).reshape([b, n, 3, self.heads, d / self.heads]).permute([2, 0, 3, 1, 4]);
        let out = sdpa(&qkv.get(0), &qkv.get(1), &qkv.get(2));
        linear(&self.proj, &heads_merge(&out)).to_kind(Kind::Float)
    }
}

#[derive(Debug)]
pub struct CrossAttention {
    q_proj: nn::Linear,
    kv_proj: nn::Linear,
    proj: nn::Linear,
    heads: i64,
}

impl CrossAttention {
    pub fn new(p: nn::Path, dim: i64, heads: i64) -> Self {
        CrossAttention {
            q_proj: nn::linear(&p / "q_proj", dim, dim, Default::default()),
            kv_proj: nn::linear(&p / "kv_proj", dim, 2 * dim, Default::default()),
            proj: nn::linear(&p / "proj", dim, dim, Default::default()),
            heads,
        }
    }
    pub fn forward(&self, q: &Tensor, kv: &Tensor) -> Tensor {
        let (b, m, d) = kv.size3().expect("[B, M, D]");
        let q = heads_split(&linear(&self.q_proj, q), self.heads);
        // kv_proj rows are [k; v], each head-major.
        let kv = linear(&self.kv_proj, kv).reshape([b, m, 2, self.heads, d / self.heads]).permute([2, 0, 3, 1, 4]);
        let out = sdpa(&q, &kv.get(0), &kv.get(1));
        linear(&self.proj, &heads_merge(&out)).to_kind(Kind::Float)
    }
}

#[derive(Debug)]
pub struct CrossBlock {
    norm1: nn::LayerNorm,
    self_attn: SelfAttention,
    norm2q: nn::LayerNorm,
    norm2kv: nn::LayerNorm,
    cross_attn: CrossAttention,
    norm3: nn::LayerNorm,
    mlp: Mlp,
}

impl CrossBlock {
    pub fn new(p: nn::Path, cfg: &DecoderConfig) -> Self {
        let d = cfg.embed_dim;
        CrossBlock {
            norm1: layer_norm(&p / "norm1", d, 1e-6),
            self_attn: SelfAttention::new(&p / "self_attn", d, cfg.num_heads),
            norm2q: layer_norm(&p / "norm2q", d, 1e-6),
            norm2kv: layer_norm(&p / "norm2kv", d, 1e-6),
            cross_attn: CrossAttention::new(&p / "cross_attn", d, cfg.num_heads),
            norm3: layer_norm(&p / "norm3", d, 1e-6),
            mlp: Mlp::new(&p / "mlp", d, (d as f64 * cfg.mlp_ratio) as i64),
        }
    }
    /// Only the queries are updated; the keys/values are re-normalised by every block.
    pub fn forward(&self, q: &Tensor, x: &Tensor) -> Tensor {
        let q = q + self.self_attn.forward(&norm(&self.norm1, q));
        let q = &q + self.cross_attn.forward(&norm(&self.norm2q, &q), &norm(&self.norm2kv, x));
        &q + self.mlp.forward(&norm(&self.norm3, &q))
    }
}

#[derive(Debug)]
pub struct CrossDecoder {
    pub cfg: DecoderConfig,
    embed: nn::Linear,
    cls_token: Tensor,
    mask_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<CrossBlock>,
    norm: nn::LayerNorm,
    head: nn::Linear,
}

impl CrossDecoder {
    pub fn new(p: &nn::Path, cfg: &DecoderConfig, enc_dim: i64) -> Self {
        let d = cfg.embed_dim;
        let pos_embed = p.zeros_no_train("pos_embed", &[cfg.grid * cfg.grid + 1, d]);
        tch::no_grad(|| {
            let mut pe = pos_embed.shallow_clone();
            pe.copy_(&sincos_2d(d, cfg.grid, PosEmbedKind::Lmim, true).to_device(pos_embed.device()))
        });
        CrossDecoder {
            cfg: cfg.clone(),
            embed: nn::linear(p / "embed", enc_dim, d, Default::default()),
            cls_token: p.var("cls_token", &[1, 1, d], nn::Init::Randn { mean: 0.0, stdev: 0.02 }),
            mask_token: p.var("mask_token", &[1, 1, d], nn::Init::Const(0.0)),
            pos_embed,
            blocks: (0..cfg.depth).map(|i| CrossBlock::new(p / "blocks" / i, cfg)).collect(),
            norm: layer_norm(p / "norm", d, 1e-6),
            head: nn::linear(p / "head", d, cfg.out_dim, Default::default()),
        }
    }

    /// Position embeddings of patch ids `[B, L]` (rows `pid + 1`): `[B, L, D]`.
    fn pe(&self, pid: &Tensor) -> Tensor {
        let (b, l) = pid.size2().expect("[B, L]");
        self.pos_embed.index_select(0, &(pid.flatten(0, -1) + 1)).reshape([b, l, self.cfg.embed_dim])
    }

    /// `z_vis [B, 1+V, E]` (encoder output, CLS first), `vis_pid [B, V]`, `mask_pid [B, M]` -> `z_pred [B, M, out]`.
    pub fn forward(&self, z_vis: &Tensor, vis_pid: &Tensor, mask_pid: &Tensor) -> Tensor {
        let d = self.cfg.embed_dim;
        let b = z_vis.size()[0];
        let m = mask_pid.size()[1];
        let x = linear(&self.embed, z_vis).to_kind(Kind::Float);
        let pe_vis = self.pe(vis_pid);
        let pe_mask = self.pe(mask_pid);
        // Visual cues: mask tokens start from a PE-similarity-weighted mean of the embedded visible latents.
        let w = pe_mask.matmul(&pe_vis.transpose(1, 2)).g_mul_scalar(1.0 / (d as f64).sqrt()).softmax(-1, Kind::Float);
        let cues = w.matmul(&x.narrow(1, 1, x.size()[1] - 1));
        let mask = self.mask_token.expand([b, m, d], false) + cues;
        let q = Tensor::cat(&[self.cls_token.expand([b, 1, d], false), mask], 1);
        let zero = Tensor::zeros([b, 1, d], (Kind::Float, x.device()));
        let x = x + Tensor::cat(&[&zero, &pe_vis], 1);
        let mut q = q + Tensor::cat(&[&zero, &pe_mask], 1);
        for blk in &self.blocks {
            q = blk.forward(&q, &x);
        }
        let out = linear(&self.head, &norm(&self.norm, &q)).to_kind(Kind::Float);
        out.narrow(1, 1, m)
    }
}
