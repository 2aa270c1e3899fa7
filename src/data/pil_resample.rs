//! Pixel-exact port of Pillow's antialiased convolution resampling for 8-bit images.
//!
//! `resize` reproduces Pillow 11's `Image.resize(size, BILINEAR | BICUBIC, box)` (with `reducing_gap=None`)
//! byte for byte. The facts it relies on come from Pillow src/libImaging/Resample.c (`ImagingResample`,
//! `precompute_coeffs`, `normalize_coeffs_8bpc`, the `_8bpc` passes) and src/_imaging.c (`_resize`: the box
//! checks and the crop shortcut):
//!
//! - the box is parsed as C `float` (f32), and `in1 - in0` is a float subtraction;
//! - each output pixel `xx` is centred at `box0 + (xx + 0.5) * scale` with `scale = (box1 - box0) / out`, and the
//!   filter is widened by `filterscale = max(1, scale)` (antialiasing when reducing);
//! - weights are normalised in f64, then rounded half away from zero to fixed point with 22 fractional bits;
//! - sums start at one half (`1 << 21`) and are shifted back and clamped to 0..=255;
//! - the horizontal pass runs first, only over the source rows the vertical pass reads, and either pass is
//!   skipped when its size and box are unchanged.
//!
//! Channels are resampled independently. Pillow resizes "RGBA" and "LA" through premultiplied "RGBa"/"La", so
//! for 2 or 4 channels this matches Pillow's "La"/"RGBa"/"RGBX"/"CMYK" modes, not straight-alpha RGBA.

use std::fmt;

/// The resampling filter (Pillow's `Image.BILINEAR` / `Image.BICUBIC`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    Bilinear,
    Bicubic,
}

impl Filter {
    /// Half-width of the kernel in source pixels at scale 1 (Pillow src/libImaging/Resample.c: `BILINEAR = {.., 1.0}`,
    /// `BICUBIC = {.., 2.0}`).
    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
        }
    }

    /// The kernel, written with the same operation order as Pillow's `bilinear_filter` / `bicubic_filter` so the
    /// f64 weights (and hence the rounded fixed-point ones) come out bit-identical.
    #[inline]
    fn eval(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Filter::Bilinear => {
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Bicubic => {
                // Keys' cubic convolution with a = -0.5 (Catmull-Rom).
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Filter::Bilinear => "bilinear",
            Filter::Bicubic => "bicubic",
        })
    }
}

/// Fixed-point fraction bits: 8 bits for the pixel and 2 spare bits for the overshoot of negative lobes, in an i32
/// (Pillow src/libImaging/Resample.c `PRECISION_BITS`).
const PRECISION_BITS: u32 = 32 - 8 - 2;
/// Accumulators start at one half so the final shift rounds to nearest.
const HALF: i32 = 1 << (PRECISION_BITS - 1);

#[inline(always)]
fn clip8(v: i32) -> u8 {
    // Pillow looks `v >> PRECISION_BITS` up in a table that saturates to 0..=255; an arithmetic shift and a clamp
    // is the same function.
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One axis' resampling plan: for each output index, the first source index, the number of taps and `ksize`
/// fixed-point weights (zero-padded past the taps).
#[derive(Clone, Debug, PartialEq)]
struct Coeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
}

impl Coeffs {
    /// Pillow src/libImaging/Resample.c `precompute_coeffs` followed by `normalize_coeffs_8bpc`.
    fn new(in_size: usize, in0: f32, in1: f32, out_size: usize, filter: Filter) -> Coeffs {
        // The span is a float (f32) subtraction in Pillow; only then is it widened.
        let scale = f64::from(in1 - in0) / out_size as f64;
        let filterscale = if scale < 1.0 { 1.0 } else { scale };
        let support = filter.support() * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let inv_filterscale = 1.0 / filterscale;

        let mut bounds = Vec::with_capacity(out_size);
        let mut weights = vec![0i32; out_size * ksize];
        let mut k = vec![0f64; ksize];
        for (xx, kout) in weights.chunks_exact_mut(ksize).enumerate() {
            let center = f64::from(in0) + (xx as f64 + 0.5) * scale;
            // `(int)(v + 0.5)` in C truncates toward zero; `as i64` does the same.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
            let n = (xmax - xmin).clamp(0, ksize as i64) as usize;
            let mut ww = 0.0;
            for (x, kv) in k[..n].iter_mut().enumerate() {
                // Same expression order as Pillow: ((x + xmin) - center + 0.5) * (1 / filterscale).
                let w = filter.eval(((x as i64 + xmin) as f64 - center + 0.5) * inv_filterscale);
                *kv = w;
                ww += w;
            }
            if ww != 0.0 {
                for kv in &mut k[..n] {
                    *kv /= ww;
                }
            }
            // Round half away from zero to fixed point (`normalize_coeffs_8bpc`).
            let one = f64::from(1u32 << PRECISION_BITS);
            for (dst, &kv) in kout.iter_mut().zip(&k[..n]) {
                *dst = if kv < 0.0 { (-0.5 + kv * one) as i32 } else { (0.5 + kv * one) as i32 };
            }
            bounds.push((xmin as usize, n));
        }
        Coeffs { ksize, bounds, weights }
    }

    /// Source range `[first, end)` touched by any output index.
    fn span(&self) -> (usize, usize) {
        let first = self.bounds.first().map_or(0, |b| b.0);
        let end = self.bounds.last().map_or(0, |b| b.0 + b.1);
        (first, end.max(first))
    }
}

/// Rows per block in the horizontal pass: the block is transposed so that each source column of it is one vector of
/// `ROWS * C` bytes, and every tap becomes one multiply-add over `ROWS * C` lanes that the compiler vectorises.
const ROWS: usize = 8;

/// Horizontal pass over whole rows of `src` (each `in_w * C` bytes) into `dst` (rows of `out_w * C`). `L` must be
/// `ROWS * C`; `cols` is scratch space.
#[inline(always)]
fn horizontal<const C: usize, const L: usize>(
    src: &[u8],
    in_w: usize,
    co: &Coeffs,
    dst: &mut [u8],
    cols: &mut Vec<u8>,
) {
    debug_assert_eq!(L, ROWS * C);
    let in_stride = in_w * C;
    let out_stride = co.bounds.len() * C;
    if in_stride == 0 || out_stride == 0 {
        return;
    }
    cols.clear();
    cols.resize(in_w * L, 0);
    let (cols, _) = cols.as_chunks_mut::<L>();
    for (block, out) in src.chunks(in_stride * ROWS).zip(dst.chunks_mut(out_stride * ROWS)) {
        // Transpose: cols[x][r * C + c] = row r, pixel x, channel c. A short last block leaves stale lanes, whose
        // results are not written out.
        for (r, row) in block.chunks_exact(in_stride).enumerate() {
            for (col, px) in cols.iter_mut().zip(row.chunks_exact(C)) {
                col[r * C..r * C + C].copy_from_slice(px);
            }
        }
        let nrows = block.len() / in_stride;
        for (xx, (&(start, n), k)) in co.bounds.iter().zip(co.weights.chunks_exact(co.ksize)).enumerate() {
            let mut acc = [HALF; L];
            for (col, &kv) in cols[start..start + n].iter().zip(&k[..n]) {
                for (a, &v) in acc.iter_mut().zip(col) {
                    *a += i32::from(v) * kv;
                }
            }
            for (r, out_row) in out.chunks_exact_mut(out_stride).enumerate().take(nrows) {
                for (o, &a) in out_row[xx * C..xx * C + C].iter_mut().zip(&acc[r * C..r * C + C]) {
                    *o = clip8(a);
                }
            }
        }
    }
}

/// Vertical pass: each output row is a weighted sum of `n` consecutive rows (`row_len` bytes) of `src`, summed row
/// by row into the i32 line `acc` so the inner loop vectorises. Integer sums do not depend on order, so this gives
/// Pillow's per-pixel result.
#[inline(always)]
fn vertical(src: &[u8], row_len: usize, co: &Coeffs, dst: &mut [u8], acc: &mut Vec<i32>) {
    if row_len == 0 {
        return;
    }
    for (out, (&(start, n), k)) in dst
        .chunks_exact_mut(row_len)
        .zip(co.bounds.iter().zip(co.weights.chunks_exact(co.ksize)))
    {
        acc.clear();
        acc.resize(row_len, HALF);
        let rows = &src[start * row_len..(start + n) * row_len];
        for (row, &kv) in rows.chunks_exact(row_len).zip(&k[..n]) {
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += i32::from(v) * kv;
            }
        }
        for (o, &a) in out.iter_mut().zip(acc.iter()) {
            *o = clip8(a);
        }
    }
}

/// Runs `$body` compiled for AVX2 when the CPU has it (the crate is built for baseline x86-64, whose SSE2 has no
/// 32-bit lane multiply), else as is. The body is the same safe code either way.
macro_rules! with_avx2 {
    ($body:block) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2")]
            fn avx2<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2, checked just above.
                unsafe { avx2(|| $body) }
            } else {
                $body
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $body
        }
    }};
}

/// Scratch buffers kept across calls, for a loader that resizes many images on one thread.
#[derive(Default)]
pub struct Resizer {
    tmp: Vec<u8>,
    cols: Vec<u8>,
    acc: Vec<i32>,
}

impl Resizer {
    pub fn new() -> Resizer {
        Resizer::default()
    }

    /// As [`resize`], writing into `dst` (cleared and resized to `out_w * out_h * channels`).
    #[allow(clippy::too_many_arguments)]
    pub fn resize_into(
        &mut self,
        src: &[u8],
        w: u32,
        h: u32,
        channels: usize,
        out_w: u32,
        out_h: u32,
        filter: Filter,
        box_: [f64; 4],
        dst: &mut Vec<u8>,
    ) -> Result<(), String> {
        if !(1..=4).contains(&channels) {
            return Err(format!("pil_resample: {channels} channels; expected 1 to 4"));
        }
        let (wu, hu, ow, oh) = (w as usize, h as usize, out_w as usize, out_h as usize);
        let expected = wu
            .checked_mul(hu)
            .and_then(|p| p.checked_mul(channels))
            .ok_or_else(|| "pil_resample: image size overflows".to_string())?;
        if src.len() != expected {
            return Err(format!(
                "pil_resample: buffer has {} bytes; {w}x{h}x{channels} needs {expected}",
                src.len()
            ));
        }
        if w == 0 || h == 0 {
            return Err(format!("pil_resample: empty source image {w}x{h}"));
        }
        if out_w == 0 || out_h == 0 {
            return Err("height and width must be > 0".into());
        }
        if box_.iter().any(|v| !v.is_finite()) {
            return Err(format!("pil_resample: box {box_:?} is not finite"));
        }
        // Pillow src/_imaging.c `_resize` parses the box as four C floats and checks it in that precision.
        let b = box_.map(|v| v as f32);
        if b[0] < 0.0 || b[1] < 0.0 {
            return Err("box offset can't be negative".into());
        }
        if b[2] > w as f32 || b[3] > h as f32 {
            return Err("box can't exceed original image size".into());
        }
        if b[2] - b[0] < 0.0 || b[3] - b[1] < 0.0 {
            return Err("box can't be empty".into());
        }

        let out_len = ow * oh * channels;
        dst.clear();

        // `_resize` crops instead of resampling when the box sits on integers and has the output size.
        if b[0].fract() == 0.0
            && b[1].fract() == 0.0
            && b[2] - b[0] == out_w as f32
            && b[3] - b[1] == out_h as f32
        {
            let (x0, y0) = (b[0] as usize, b[1] as usize);
            if x0 + ow <= wu && y0 + oh <= hu {
                dst.reserve(out_len);
                for row in src.chunks_exact(wu * channels).skip(y0).take(oh) {
                    dst.extend_from_slice(&row[x0 * channels..(x0 + ow) * channels]);
                }
                return Ok(());
            }
        }

        // Pillow src/libImaging/Resample.c `ImagingResampleInner`: a pass is needed when its size or box changes.
        let need_h = out_w != w || b[0] != 0.0 || b[2] != out_w as f32;
        let need_v = out_h != h || b[1] != 0.0 || b[3] != out_h as f32;

        let mut vco = Coeffs::new(hu, b[1], b[3], oh, filter);
        // The horizontal pass only needs the rows the vertical pass will read.
        let (y_first, y_end) = vco.span();

        let Resizer { tmp, cols, acc } = self;
        let (plane, plane_w): (&[u8], usize) = if need_h {
            let hco = Coeffs::new(wu, b[0], b[2], ow, filter);
            for bnd in &mut vco.bounds {
                bnd.0 -= y_first;
            }
            tmp.clear();
            tmp.resize((y_end - y_first) * ow * channels, 0);
            let rows = &src[y_first * wu * channels..y_end * wu * channels];
            with_avx2!({
                match channels {
                    1 => horizontal::<1, { ROWS }>(rows, wu, &hco, tmp, cols),
                    2 => horizontal::<2, { 2 * ROWS }>(rows, wu, &hco, tmp, cols),
                    3 => horizontal::<3, { 3 * ROWS }>(rows, wu, &hco, tmp, cols),
                    _ => horizontal::<4, { 4 * ROWS }>(rows, wu, &hco, tmp, cols),
                }
            });
            (tmp, ow)
        } else {
            (src, wu)
        };

        if need_v {
            dst.resize(out_len, 0);
            with_avx2!({ vertical(plane, plane_w * channels, &vco, dst, acc) });
        } else {
            // Without a vertical pass the rows used are exactly the whole image.
            dst.extend_from_slice(&plane[..out_len]);
        }
        Ok(())
    }
}

/// Pillow's `Image.resize((out_w, out_h), filter, box=(x0, y0, x1, y1))` of an 8-bit image with `channels`
/// interleaved channels (1..=4), row-major, `src.len() == w*h*channels`.
///
/// `box_` is `[0, 0, w, h]` for the whole image. Errors, like Pillow, for a zero output size and for a box with a
/// negative offset, past the image, or of negative extent; also for an empty source, a non-finite box, or a buffer
/// of the wrong length.
#[allow(clippy::too_many_arguments)]
pub fn resize(
    src: &[u8],
    w: u32,
    h: u32,
    channels: usize,
    out_w: u32,
    out_h: u32,
    filter: Filter,
    box_: [f64; 4],
) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    Resizer::new().resize_into(src, w, h, channels, out_w, out_h, filter, box_, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(w: usize, h: usize, c: usize) -> Vec<u8> {
        (0..w * h * c).map(|i| ((i * 37 + (i / (w * c)) * 11) % 256) as u8).collect()
    }

    #[test]
    fn identity_when_size_and_box_unchanged() {
        let src = pattern(13, 7, 3);
        for f in [Filter::Bilinear, Filter::Bicubic] {
            let out = resize(&src, 13, 7, 3, 13, 7, f, [0.0, 0.0, 13.0, 7.0]).unwrap();
            assert_eq!(out, src);
        }
    }

    #[test]
    fn integer_box_of_output_size_is_a_crop() {
        let src = pattern(10, 8, 3);
        let out = resize(&src, 10, 8, 3, 4, 3, Filter::Bicubic, [2.0, 1.0, 6.0, 4.0]).unwrap();
        let mut want = Vec::new();
        for y in 1..4 {
            want.extend_from_slice(&src[(y * 10 + 2) * 3..(y * 10 + 6) * 3]);
        }
        assert_eq!(out, want);
    }

    #[test]
    fn constant_image_stays_constant() {
        for c in 1..=4 {
            let src = vec![173u8; 31 * 17 * c];
            for f in [Filter::Bilinear, Filter::Bicubic] {
                for (ow, oh) in [(7, 5), (64, 40), (31, 3), (100, 17)] {
                    let out = resize(&src, 31, 17, c, ow, oh, f, [0.0, 0.0, 31.0, 17.0]).unwrap();
                    assert_eq!(out.len(), ow as usize * oh as usize * c);
                    assert!(out.iter().all(|&v| v == 173), "{f} {c}ch {ow}x{oh}");
                }
                let out = resize(&src, 31, 17, c, 9, 9, f, [1.25, 2.5, 20.75, 16.0]).unwrap();
                assert!(out.iter().all(|&v| v == 173));
            }
        }
    }

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for f in [Filter::Bilinear, Filter::Bicubic] {
            let co = Coeffs::new(333, 0.0, 333.0, 224, f);
            for (k, &(_, n)) in co.weights.chunks_exact(co.ksize).zip(&co.bounds) {
                let s: i64 = k[..n].iter().map(|&v| i64::from(v)).sum();
                assert!((s - (1 << PRECISION_BITS)).abs() <= n as i64, "{s}");
            }
        }
    }

    #[test]
    fn rejects_what_pillow_rejects() {
        let src = pattern(8, 8, 3);
        let r = |ow, oh, b| resize(&src, 8, 8, 3, ow, oh, Filter::Bilinear, b);
        assert!(r(0, 4, [0.0, 0.0, 8.0, 8.0]).is_err());
        assert!(r(4, 4, [-1.0, 0.0, 8.0, 8.0]).is_err());
        assert!(r(4, 4, [0.0, 0.0, 8.5, 8.0]).is_err());
        assert!(r(4, 4, [5.0, 0.0, 4.0, 8.0]).is_err());
        assert!(resize(&src, 8, 8, 3, 4, 4, Filter::Bilinear, [0.0, 0.0, 8.0, 8.0]).is_ok());
        assert!(resize(&src[1..], 8, 8, 3, 4, 4, Filter::Bilinear, [0.0, 0.0, 8.0, 8.0]).is_err());
    }
}
