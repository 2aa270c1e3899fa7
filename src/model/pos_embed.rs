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
    sincos_2d_hw(dim, grid, grid, kind, with_cls)
}

/// The sine-cosine table of a `rows x cols` grid, in row-major token order: `[rows*cols (+1), dim]` in f32, on the
/// CPU. The column coordinate fills the first half as in MAE's `get_2d_sincos_pos_embed`; Latent MIM's rescaling
/// is applied per axis (`G / (G - 1)` of that axis).
pub fn sincos_2d_hw(dim: i64, rows: i64, cols: i64, kind: PosEmbedKind, with_cls: bool) -> Tensor {
    assert!(dim % 4 == 0, "sin-cos position embeddings need a dimension divisible by 4, got {dim}");
    let quarter = dim / 4;
    let scale = |g: i64| match kind {
        PosEmbedKind::Mae => 1.0,
        PosEmbedKind::Lmim if g > 1 => g as f64 / (g - 1) as f64,
        PosEmbedKind::Lmim => 0.0,
    };
    let (sr, sc) = (scale(rows), scale(cols));
    let mut out = Vec::with_capacity(((rows * cols + 1) * dim) as usize);
    if with_cls {
        out.extend(std::iter::repeat(0f64).take(dim as usize));
    }
    let omega: Vec<f64> = (0..quarter).map(|k| 1.0 / 10000f64.powf(k as f64 / quarter as f64)).collect();
    for r in 0..rows {
        for c in 0..cols {
            let u = c as f64 * sc;
            let v = r as f64 * sr;
            out.extend(omega.iter().map(|w| (u * w).sin()));
            out.extend(omega.iter().map(|w| (u * w).cos()));
            out.extend(omega.iter().map(|w| (v * w).sin()));
            out.extend(omega.iter().map(|w| (v * w).cos()));
        }
    }
    let n = rows * cols + i64::from(with_cls);
    Tensor::from_slice(&out).reshape([n, dim]).to_kind(Kind::Float)
}

/// How a position embedding trained on a square grid meets an input of another grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum GridPosEmbed {
    /// timm's `resample_abs_pos_embed` (square grids; bicubic with antialias).
    #[default]
    Timm,
    /// DINO's `interpolate_pos_encoding` (facebookresearch/dino vision_transformer.py): bicubic without antialias
    /// by `scale_factor = (G' + 0.1) / G` per axis, any `rows x cols` grid.
    Interpolate,
    /// The fixed 2-D sine-cosine table regenerated for the new grid (MAE, Latent MIM, I-JEPA checkpoints).
    Sincos,
}

/// DINO's `interpolate_pos_encoding`: the `num_prefix` first rows are kept, the `old_grid x old_grid` patch rows are
/// resized to `rows x cols` by `upsample_bicubic2d` (align_corners off, no antialias) with the scale factors
/// `(rows + 0.1) / old_grid` and `(cols + 0.1) / old_grid` (the kernel maps coordinates with 1 / scale; the output
/// size is `floor(old_grid * scale)`, which the +0.1 keeps at `rows`, `cols`). At the trained square grid the
/// table is returned as is, as DINO does. Input and output `[1, rows, D]`.
pub fn dino_interpolate(pos_embed: &Tensor, old_grid: i64, rows: i64, cols: i64, num_prefix: i64) -> Tensor {
    if rows == old_grid && cols == old_grid {
        return pos_embed.shallow_clone();
    }
    let d = pos_embed.size()[2];
    let kind = pos_embed.kind();
    let prefix = pos_embed.narrow(1, 0, num_prefix);
    let grid = pos_embed.narrow(1, num_prefix, old_grid * old_grid).to_kind(Kind::Float).reshape([1, old_grid, old_grid, d]).permute([0, 3, 1, 2]);
    let sqrt_n = ((old_grid * old_grid) as f64).sqrt();
    let (sh, sw) = ((rows as f64 + 0.1) / sqrt_n, (cols as f64 + 0.1) / sqrt_n);
    let (oh, ow) = ((old_grid as f64 * sh) as i64, (old_grid as f64 * sw) as i64);
    assert_eq!((oh, ow), (rows, cols), "DINO's +0.1 keeps the interpolated grid at the asked size");
    let resized = grid.upsample_bicubic2d([oh, ow], false, Some(sh), Some(sw));
    let resized = resized.permute([0, 2, 3, 1]).reshape([1, rows * cols, d]).to_kind(kind);
    Tensor::cat(&[prefix, resized], 1)
}

/// timm's `resample_abs_pos_embed` (timm/layers/pos_embed.py) for square grids: the first `num_prefix` rows (CLS,
/// registers) are kept as they are, the `old_grid x old_grid` patch rows are resized to `new_grid x new_grid` in
/// f32 with bicubic interpolation and antialias (timm's defaults; align_corners off), and cast back. Input and
/// output are `[1, rows, D]`.
pub fn resample_abs_pos_embed(pos_embed: &Tensor, old_grid: i64, new_grid: i64, num_prefix: i64) -> Tensor {
    if old_grid == new_grid {
        return pos_embed.shallow_clone();
    }
    let d = pos_embed.size()[2];
    let kind = pos_embed.kind();
    let prefix = pos_embed.narrow(1, 0, num_prefix);
    let grid = pos_embed.narrow(1, num_prefix, old_grid * old_grid).to_kind(Kind::Float).reshape([1, old_grid, old_grid, d]).permute([0, 3, 1, 2]);
    let resized = grid.internal_upsample_bicubic2d_aa([new_grid, new_grid], false, None::<f64>, None::<f64>);
    let resized = resized.permute([0, 2, 3, 1]).reshape([1, new_grid * new_grid, d]).to_kind(kind);
    Tensor::cat(&[prefix, resized], 1)
}
