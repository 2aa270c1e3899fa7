//! Fixed 2-D sine-cosine position embeddings.
//!
//! Both MAE and Latent MIM use the same formula: for a token at grid column `c` and row `r`,
//! `[sin(u w), cos(u w), sin(v w), cos(v w)]` with `w_k = 10000^(-4k/D)`, the column (x) half first, and an
//! all-zero row for the class token. They differ only in the coordinates: MAE uses integer positions, Latent MIM
//! rescales `linspace(0, 1, G)` by the grid size, i.e. `u = c * G / (G - 1)` (yibingwei-1/LatentMIM, the
//! `pos_embed` of its encoder; 14 / 13 for ViT-B/16 at 224).
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PosEmbedKind {
    /// Integer grid positions, as MAE's `get_2d_sincos_pos_embed`.
    #[default]
    Mae,
    /// Positions `linspace(0, 1, G) * G`, as the Latent MIM reference code.
    Lmim,
}

/// Returns `[1 + grid*grid, dim]` (`with_cls`) or `[grid*grid, dim]` in f32, on the CPU.
pub fn sincos_2d(dim: i64, grid: i64, kind: PosEmbedKind, with_cls: bool) -> Tensor {
    assert!(dim % 4 == 0, "sin-cos position embeddings need a dimension divisible by 4, got {dim}");
    let quarter = dim / 4;
    let scale = match kind {
        PosEmbedKind::Mae => 1.0,
        PosEmbedKind::Lmim if grid > 1 => grid as f64 / (grid - 1) as f64,
        PosEmbedKind::Lmim => 0.0,
    };
    let mut rows = Vec::with_capacity(((grid * grid + 1) * dim) as usize);
    if with_cls {
        rows.extend(std::iter::repeat(0f64).take(dim as usize));
    }
    let omega: Vec<f64> = (0..quarter).map(|k| 1.0 / 10000f64.powf(k as f64 / quarter as f64)).collect();
    for r in 0..grid {
        for c in 0..grid {
            let u = c as f64 * scale;
            let v = r as f64 * scale;
            rows.extend(omega.iter().map(|w| (u * w).sin()));
            rows.extend(omega.iter().map(|w| (u * w).cos()));
            rows.extend(omega.iter().map(|w| (v * w).sin()));
            rows.extend(omega.iter().map(|w| (v * w).cos()));
        }
    }
    let n = grid * grid + i64::from(with_cls);
    Tensor::from_slice(&rows).reshape([n, dim]).to_kind(Kind::Float)
}
