//! Fine-tuning augmentations as timm implements them for the MAE recipe: Mixup/CutMix on batches with soft
//! targets (`timm.data.Mixup`, mode "batch"), RandomErasing in "pixel" mode on normalised CHW images
//! (`timm.data.RandomErasing`) and RandAugment `rand-m9-mstd0.5-inc1` on u8 RGB images
//! (`timm.data.auto_augment`). Every random draw comes from the `Rng` passed in, so each is reproducible and
//! testable on its own; the deterministic cores (`mix_batch`, `mixup_target`, `erase_box`, the image ops) take
//! their parameters explicitly.
use rand::Rng;
use tch::{Kind, Tensor};

use super::decode::RgbImage;

// ---------------------------------------------------------------------------------------------------------------
// Sampling helpers (rand 0.8 without rand_distr).

/// A standard normal draw (Box-Muller).
pub fn normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = 1.0 - rng.gen::<f64>(); // (0, 1]: ln is finite
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Gamma(shape, 1) by Marsaglia-Tsang; shapes below 1 use the boost `G(a+1) * U^(1/a)`.
pub fn gamma(rng: &mut impl Rng, shape: f64) -> f64 {
    if shape < 1.0 {
        let u: f64 = 1.0 - rng.gen::<f64>();
        return gamma(rng, shape + 1.0) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = normal(rng);
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u: f64 = rng.gen();
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

/// Beta(a, b) as a ratio of gammas.
pub fn beta(rng: &mut impl Rng, a: f64, b: f64) -> f64 {
    let x = gamma(rng, a);
    let y = gamma(rng, b);
    x / (x + y)
}

// ---------------------------------------------------------------------------------------------------------------
// Mixup / CutMix.

/// Settings of timm's `Mixup` (mode "batch"); the defaults are MAE's fine-tuning values.
#[derive(Debug, Clone)]
pub struct MixupConfig {
    pub mixup_alpha: f64,
    pub cutmix_alpha: f64,
    /// Probability of mixing a batch at all.
    pub prob: f64,
    /// Probability of CutMix instead of Mixup when both are on.
    pub switch_prob: f64,
    pub label_smoothing: f64,
    pub num_classes: i64,
}

impl MixupConfig {
    pub fn enabled(&self) -> bool {
        self.mixup_alpha > 0.0 || self.cutmix_alpha > 0.0
    }
}

/// A CutMix box in timm's order `(yl, yh, xl, xh)`, half-open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MixBox {
    pub yl: i64,
    pub yh: i64,
    pub xl: i64,
    pub xh: i64,
}

/// What one batch got: `lam` (after CutMix's area correction) and the box when CutMix was used.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MixParams {
    pub lam: f64,
    pub cutmix: Option<MixBox>,
}

/// Smoothed one-hot targets mixed with the flipped batch's: timm's `mixup_target`.
/// off = smoothing / C, on = 1 - smoothing + off; result `y * lam + y.flip(0) * (1 - lam)`, f32 `[B, C]`.
pub fn mixup_target(labels: &Tensor, num_classes: i64, lam: f64, smoothing: f64) -> Tensor {
    let off = smoothing / num_classes as f64;
    let on = 1.0 - smoothing + off;
    let one_hot = |l: &Tensor| {
        let l = l.to_kind(Kind::Int64).view([-1, 1]);
        Tensor::full([l.size()[0], num_classes], off, (Kind::Float, l.device())).scatter_value(1, &l, on)
    };
    let y1 = one_hot(labels);
    let y2 = one_hot(&labels.flip([0]));
    y1 * lam + y2 * (1.0 - lam)
}

/// timm's `rand_bbox` (margin 0): a box of `int(H*sqrt(1-lam)) x int(W*sqrt(1-lam))` centred uniformly, clipped.
pub fn rand_bbox(h: i64, w: i64, lam: f64, rng: &mut impl Rng) -> MixBox {
    let ratio = (1.0 - lam).sqrt();
    let (cut_h, cut_w) = ((h as f64 * ratio) as i64, (w as f64 * ratio) as i64);
    let cy = rng.gen_range(0..h);
    let cx = rng.gen_range(0..w);
    MixBox {
        yl: (cy - cut_h / 2).clamp(0, h),
        yh: (cy + cut_h / 2).clamp(0, h),
        xl: (cx - cut_w / 2).clamp(0, w),
        xh: (cx + cut_w / 2).clamp(0, w),
    }
}

/// `lam` corrected by the real box area (timm's `correct_lam=True`).
pub fn box_lam(b: &MixBox, h: i64, w: i64) -> f64 {
    1.0 - ((b.yh - b.yl) * (b.xh - b.xl)) as f64 / (h * w) as f64
}

/// Mixes a batch `[B, C, H, W]` with its flip along the batch: with a box, pastes the flipped batch's box
/// (CutMix, `lam` is not used for the pixels); without, `x * lam + x.flip(0) * (1 - lam)` (Mixup).
pub fn mix_batch(x: &Tensor, lam: f64, cutmix: Option<MixBox>) -> Tensor {
    let flipped = x.flip([0]);
    match cutmix {
        Some(b) => {
            let out = x.copy();
            let (hh, ww) = (b.yh - b.yl, b.xh - b.xl);
            if hh > 0 && ww > 0 {
                let src = flipped.narrow(2, b.yl, hh).narrow(3, b.xl, ww);
                out.narrow(2, b.yl, hh).narrow(3, b.xl, ww).copy_(&src);
            }
            out
        }
        None => x * lam + flipped * (1.0 - lam),
    }
}

/// timm's `Mixup.__call__` in mode "batch": draws whether to mix, Mixup or CutMix and lambda, mixes the images
/// and returns the soft targets. Without mixing the targets are only smoothed (lam = 1).
pub fn mixup_cutmix(x: &Tensor, labels: &Tensor, cfg: &MixupConfig, rng: &mut impl Rng) -> (Tensor, Tensor, MixParams) {
    let mut lam = 1.0;
    let mut use_cutmix = false;
    if cfg.enabled() && rng.gen::<f64>() < cfg.prob {
        if cfg.mixup_alpha > 0.0 && cfg.cutmix_alpha > 0.0 {
            use_cutmix = rng.gen::<f64>() < cfg.switch_prob;
            lam = if use_cutmix { beta(rng, cfg.cutmix_alpha, cfg.cutmix_alpha) } else { beta(rng, cfg.mixup_alpha, cfg.mixup_alpha) };
        } else if cfg.mixup_alpha > 0.0 {
            lam = beta(rng, cfg.mixup_alpha, cfg.mixup_alpha);
        } else {
            use_cutmix = true;
            lam = beta(rng, cfg.cutmix_alpha, cfg.cutmix_alpha);
        }
    }
    let mut params = MixParams { lam, cutmix: None };
    let mixed = if lam == 1.0 {
        x.shallow_clone()
    } else if use_cutmix {
        let (h, w) = (x.size()[2], x.size()[3]);
        let b = rand_bbox(h, w, lam, rng);
        params = MixParams { lam: box_lam(&b, h, w), cutmix: Some(b) };
        mix_batch(x, params.lam, Some(b))
    } else {
        mix_batch(x, lam, None)
    };
    let target = mixup_target(labels, cfg.num_classes, params.lam, cfg.label_smoothing);
    (mixed, target.to_device(x.device()), params)
}

// ---------------------------------------------------------------------------------------------------------------
// RandomErasing ("pixel" mode, one box).

/// timm's `RandomErasing(probability, mode="pixel", max_count=1)`: area fraction in [min_area, max_area],
/// log-uniform aspect in [min_aspect, 1/min_aspect], up to 10 attempts.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RandomErasing {
    pub probability: f64,
    pub min_area: f64,
    pub max_area: f64,
    pub min_aspect: f64,
}

impl Default for RandomErasing {
    fn default() -> Self {
        RandomErasing { probability: 0.25, min_area: 0.02, max_area: 1.0 / 3.0, min_aspect: 0.3 }
    }
}

/// Where an erase lands: (top, left, h, w).
pub type EraseBox = (usize, usize, usize, usize);

impl RandomErasing {
    /// Draws the box as timm does (Python's `round`, `randint` inclusive); None when not erasing.
    pub fn sample_box(&self, h: usize, w: usize, rng: &mut impl Rng) -> Option<EraseBox> {
        if rng.gen::<f64>() > self.probability {
            return None;
        }
        let area = (h * w) as f64;
        let (la, lb) = (self.min_aspect.ln(), (1.0 / self.min_aspect).ln());
        for _ in 0..10 {
            let target = rng.gen_range(self.min_area..self.max_area) * area;
            let aspect = rng.gen_range(la..lb).exp();
            let eh = (target * aspect).sqrt().round_ties_even() as usize;
            let ew = (target / aspect).sqrt().round_ties_even() as usize;
            if ew < w && eh < h {
                let top = rng.gen_range(0..=h - eh);
                let left = rng.gen_range(0..=w - ew);
                return Some((top, left, eh, ew));
            }
        }
        None
    }

    /// Erases a box of a normalised CHW image in place with per-pixel standard normal noise.
    pub fn apply(&self, img: &mut [f32], c: usize, h: usize, w: usize, rng: &mut impl Rng) -> Option<EraseBox> {
        let b = self.sample_box(h, w, rng)?;
        erase_box(img, c, h, w, b, || normal(rng) as f32);
        Some(b)
    }
}

/// Fills `b` of every channel with values from `fill` (channel, then row, then column order).
pub fn erase_box(img: &mut [f32], c: usize, h: usize, w: usize, b: EraseBox, mut fill: impl FnMut() -> f32) {
    let (top, left, eh, ew) = b;
    for ch in 0..c {
        for y in top..top + eh {
            let row = &mut img[ch * h * w + y * w..][..w];
            for v in &mut row[left..left + ew] {
                *v = fill();
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// RandAugment.

/// timm's `_RAND_INCREASING_TRANSFORMS`, the op set of `rand-...-inc1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum AugOp {
    AutoContrast,
    Equalize,
    Invert,
    Rotate,
    PosterizeIncreasing,
    SolarizeIncreasing,
    SolarizeAdd,
    ColorIncreasing,
    ContrastIncreasing,
    BrightnessIncreasing,
    SharpnessIncreasing,
    ShearX,
    ShearY,
    TranslateXRel,
    TranslateYRel,
}

pub const RAND_INCREASING_OPS: [AugOp; 15] = [
    AugOp::AutoContrast,
    AugOp::Equalize,
    AugOp::Invert,
    AugOp::Rotate,
    AugOp::PosterizeIncreasing,
    AugOp::SolarizeIncreasing,
    AugOp::SolarizeAdd,
    AugOp::ColorIncreasing,
    AugOp::ContrastIncreasing,
    AugOp::BrightnessIncreasing,
    AugOp::SharpnessIncreasing,
    AugOp::ShearX,
    AugOp::ShearY,
    AugOp::TranslateXRel,
    AugOp::TranslateYRel,
];

/// A RandAugment policy as parsed from timm's config string (`rand-m9-mstd0.5-inc1`; `n` defaults to 2).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RandAugment {
    pub num_layers: usize,
    pub magnitude: f64,
    pub magnitude_std: f64,
    pub prob: f64,
    pub ops: Vec<AugOp>,
    /// Fill colour of geometric ops: the ImageNet mean in u8 (timm's `img_mean` hparam).
    pub fill: [u8; 3],
}

impl RandAugment {
    /// Parses `rand-m<M>[-n<N>][-mstd<S>][-inc<0|1>][-p<P>]`. Only the increasing op set is implemented, so
    /// `inc0` is refused.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut parts = s.split('-');
        if parts.next() != Some("rand") {
            return Err(format!("RandAugment config `{s}` must start with `rand`"));
        }
        let mut ra = RandAugment {
            num_layers: 2,
            magnitude: 10.0,
            magnitude_std: 0.0,
            prob: 0.5,
            ops: RAND_INCREASING_OPS.to_vec(),
            fill: [124, 116, 104],
        };
        let mut inc = false;
        for p in parts {
            let num = |k: &str| p[k.len()..].parse::<f64>().map_err(|_| format!("bad RandAugment field `{p}` in `{s}`"));
            if p.starts_with("mstd") {
                ra.magnitude_std = num("mstd")?;
            } else if p.starts_with("inc") {
                inc = num("inc")? != 0.0;
            } else if p.starts_with('m') {
                ra.magnitude = num("m")?;
            } else if p.starts_with('n') {
                ra.num_layers = num("n")? as usize;
            } else if p.starts_with('p') {
                ra.prob = num("p")?;
            } else {
                return Err(format!("unknown RandAugment field `{p}` in `{s}`"));
            }
        }
        if !inc {
            return Err(format!("RandAugment `{s}`: only the increasing op set (inc1) is implemented"));
        }
        Ok(ra)
    }

    /// timm's `RandAugment.__call__`: `num_layers` ops chosen uniformly with replacement, each applied with
    /// probability `prob` at a magnitude drawn from N(m, mstd) clipped to [0, 10].
    pub fn apply(&self, mut img: RgbImage, rng: &mut impl Rng) -> RgbImage {
        let chosen: Vec<AugOp> = (0..self.num_layers).map(|_| self.ops[rng.gen_range(0..self.ops.len())]).collect();
        for op in chosen {
            if self.prob < 1.0 && rng.gen::<f64>() > self.prob {
                continue;
            }
            let mut m = self.magnitude;
            if self.magnitude_std > 0.0 {
                m += self.magnitude_std * normal(rng);
            }
            let m = m.clamp(0.0, 10.0);
            img = apply_op(op, img, m, self.fill, rng);
        }
        img
    }
}

fn negate(v: f64, rng: &mut impl Rng) -> f64 {
    if rng.gen::<f64>() > 0.5 {
        -v
    } else {
        v
    }
}

/// timm's level-to-argument function of `op` at magnitude `m` in [0, 10], with the random sign where timm has
/// one (`_randomly_negate`). Ops without an argument return 0.
pub fn level_arg(op: AugOp, m: f64, rng: &mut impl Rng) -> f64 {
    match op {
        AugOp::AutoContrast | AugOp::Equalize | AugOp::Invert => 0.0,
        AugOp::Rotate => negate(m / 10.0 * 30.0, rng),
        AugOp::PosterizeIncreasing => (4 - (m / 10.0 * 4.0) as i64) as f64,
        AugOp::SolarizeIncreasing => (256 - (m / 10.0 * 256.0) as i64) as f64,
        AugOp::SolarizeAdd => ((m / 10.0 * 110.0) as i64) as f64,
        AugOp::ColorIncreasing | AugOp::ContrastIncreasing | AugOp::BrightnessIncreasing | AugOp::SharpnessIncreasing => {
            1.0 + negate(m / 10.0 * 0.9, rng)
        }
        AugOp::ShearX | AugOp::ShearY => negate(m / 10.0 * 0.3, rng),
        AugOp::TranslateXRel | AugOp::TranslateYRel => negate(m / 10.0 * 0.45, rng),
    }
}

/// One op at magnitude `m` in [0, 10] (argument drawn by [`level_arg`]).
pub fn apply_op(op: AugOp, img: RgbImage, m: f64, fill: [u8; 3], rng: &mut impl Rng) -> RgbImage {
    let arg = level_arg(op, m, rng);
    apply_op_arg(op, img, arg, fill)
}

/// One op with its argument as timm's op functions take it: degrees (Rotate), bits (Posterize), threshold
/// (Solarize), addition (SolarizeAdd, threshold 128), enhancement factor (Color, Contrast, Brightness, Sharpness),
/// shear factor, or translation as a fraction of the width/height (TranslateXRel/YRel).
pub fn apply_op_arg(op: AugOp, img: RgbImage, arg: f64, fill: [u8; 3]) -> RgbImage {
    let (w, h) = (img.width as f64, img.height as f64);
    match op {
        AugOp::AutoContrast => auto_contrast(img),
        AugOp::Equalize => equalize(img),
        AugOp::Invert => map_lut(img, |v| 255 - v),
        AugOp::Rotate => affine(&img, rotate_matrix(arg, w, h), fill),
        AugOp::PosterizeIncreasing => posterize(img, arg as i32),
        AugOp::SolarizeIncreasing => {
            let t = arg as i32;
            map_lut(img, |v| if (v as i32) < t { v } else { 255 - v })
        }
        AugOp::SolarizeAdd => {
            let add = arg as i32;
            map_lut(img, |v| if v < 128 { (v as i32 + add).min(255) as u8 } else { v })
        }
        AugOp::ColorIncreasing => {
            let gray = to_gray_rgb(&img);
            blend(&gray, &img, arg)
        }
        AugOp::ContrastIncreasing => {
            let gray = to_gray(&img);
            let mean = (gray.iter().map(|&g| g as f64).sum::<f64>() / gray.len().max(1) as f64 + 0.5) as u8;
            let deg = RgbImage { width: img.width, height: img.height, data: vec![mean; img.data.len()] };
            blend(&deg, &img, arg)
        }
        AugOp::BrightnessIncreasing => {
            let deg = RgbImage::new(img.width, img.height);
            blend(&deg, &img, arg)
        }
        AugOp::SharpnessIncreasing => {
            let deg = smooth(&img);
            blend(&deg, &img, arg)
        }
        AugOp::ShearX => affine(&img, [1.0, arg, 0.0, 0.0, 1.0, 0.0], fill),
        AugOp::ShearY => affine(&img, [1.0, 0.0, 0.0, arg, 1.0, 0.0], fill),
        AugOp::TranslateXRel => affine(&img, [1.0, 0.0, arg * w, 0.0, 1.0, 0.0], fill),
        AugOp::TranslateYRel => affine(&img, [1.0, 0.0, 0.0, 0.0, 1.0, arg * h], fill),
    }
}

/// Applies a 256-entry table to every channel value.
pub fn map_lut(mut img: RgbImage, f: impl Fn(u8) -> u8) -> RgbImage {
    let lut: Vec<u8> = (0..=255u8).map(f).collect();
    for v in &mut img.data {
        *v = lut[*v as usize];
    }
    img
}

fn per_channel_lut(mut img: RgbImage, luts: &[[u8; 256]; 3]) -> RgbImage {
    for px in img.data.chunks_exact_mut(3) {
        for c in 0..3 {
            px[c] = luts[c][px[c] as usize];
        }
    }
    img
}

fn histograms(img: &RgbImage) -> [[u64; 256]; 3] {
    let mut h = [[0u64; 256]; 3];
    for px in img.data.chunks_exact(3) {
        for c in 0..3 {
            h[c][px[c] as usize] += 1;
        }
    }
    h
}

/// PIL's `ImageOps.posterize`: keeps the top `bits` bits (timm returns the image as is for bits >= 8).
pub fn posterize(img: RgbImage, bits: i32) -> RgbImage {
    if bits >= 8 {
        return img;
    }
    let mask = !((1u32 << (8 - bits.max(0))) - 1) as u8;
    map_lut(img, |v| v & mask)
}

/// PIL's `ImageOps.autocontrast` (cutoff 0), per channel.
pub fn auto_contrast(img: RgbImage) -> RgbImage {
    let hist = histograms(&img);
    let mut luts = [[0u8; 256]; 3];
    for c in 0..3 {
        let lo = (0..256).find(|&i| hist[c][i] > 0).unwrap_or(0);
        let hi = (0..256).rev().find(|&i| hist[c][i] > 0).unwrap_or(255);
        for (i, l) in luts[c].iter_mut().enumerate() {
            *l = if hi <= lo {
                i as u8
            } else {
                let scale = 255.0 / (hi - lo) as f64;
                let offset = -(lo as f64) * scale;
                (i as f64 * scale + offset).clamp(0.0, 255.0) as i64 as u8
            };
        }
    }
    per_channel_lut(img, &luts)
}

/// PIL's `ImageOps.equalize`, per channel.
pub fn equalize(img: RgbImage) -> RgbImage {
    let hist = histograms(&img);
    let mut luts = [[0u8; 256]; 3];
    for c in 0..3 {
        let nz: Vec<u64> = hist[c].iter().copied().filter(|&v| v > 0).collect();
        let step = if nz.len() <= 1 { 0 } else { (nz.iter().sum::<u64>() - nz[nz.len() - 1]) / 255 };
        if step == 0 {
            for (i, l) in luts[c].iter_mut().enumerate() {
                *l = i as u8;
            }
            continue;
        }
        let mut n = step / 2;
        for i in 0..256 {
            luts[c][i] = (n / step).min(255) as u8;
            n += hist[c][i];
        }
    }
    per_channel_lut(img, &luts)
}

/// PIL's RGB to L: `(R*19595 + G*38470 + B*7471 + 0x8000) >> 16`.
fn to_gray(img: &RgbImage) -> Vec<u8> {
    img.data
        .chunks_exact(3)
        .map(|p| ((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16) as u8)
        .collect()
}

fn to_gray_rgb(img: &RgbImage) -> RgbImage {
    let g = to_gray(img);
    RgbImage { width: img.width, height: img.height, data: g.iter().flat_map(|&v| [v, v, v]).collect() }
}

/// `Image.blend(a, b, f)` = a + f (b - a), clipped to u8 (ImageEnhance's `enhance`).
fn blend(a: &RgbImage, b: &RgbImage, f: f64) -> RgbImage {
    let data = a.data.iter().zip(&b.data).map(|(&x, &y)| (x as f64 + f * (y as f64 - x as f64)).clamp(0.0, 255.0) as u8).collect();
    RgbImage { width: a.width, height: a.height, data }
}

/// PIL's `ImageFilter.SMOOTH` ([[1,1,1],[1,5,1],[1,1,1]] / 13) with the border kept, as ImageEnhance.Sharpness.
fn smooth(img: &RgbImage) -> RgbImage {
    let (w, h) = (img.width as usize, img.height as usize);
    let mut out = img.clone();
    if w < 3 || h < 3 {
        return out;
    }
    for y in 1..h - 1 {
        for x in 1..w - 1 {
            for c in 0..3 {
                let mut s = 0u32;
                for dy in 0..3 {
                    for dx in 0..3 {
                        let k = if dy == 1 && dx == 1 { 5 } else { 1 };
                        s += k * img.data[((y + dy - 1) * w + x + dx - 1) * 3 + c] as u32;
                    }
                }
                out.data[(y * w + x) * 3 + c] = ((s as f64 / 13.0).round()).min(255.0) as u8;
            }
        }
    }
    out
}

/// PIL's `Image.rotate(deg)` inverse matrix (about the centre, counter-clockwise).
fn rotate_matrix(deg: f64, w: f64, h: f64) -> [f64; 6] {
    let a = -(deg % 360.0).to_radians();
    let (cx, cy) = (w / 2.0, h / 2.0);
    let mut m = [a.cos(), a.sin(), 0.0, -a.sin(), a.cos(), 0.0];
    m[2] = m[0] * -cx + m[1] * -cy + cx;
    m[5] = m[3] * -cx + m[4] * -cy + cy;
    m
}

fn cubic(x: f64) -> f64 {
    // PIL's `transform` (Geometry.c BICUBIC) uses a = -1, unlike its resize (a = -0.5).
    let a = -1.0;
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * a
    } else {
        0.0
    }
}

/// `img.transform(size, AFFINE, (a, b, c, d, e, f), BICUBIC, fillcolor)`: output pixel (x, y) samples the input at
/// (a x' + b y' + c, d x' + e y' + f) with pixel centres x' = x + 0.5; points outside take `fill`. Bicubic with
/// a = -1 and clamped taps, rows first, then truncated to u8, as PIL's Geometry.c.
pub fn affine(img: &RgbImage, m: [f64; 6], fill: [u8; 3]) -> RgbImage {
    let (w, h) = (img.width as i64, img.height as i64);
    let mut out = RgbImage::new(img.width, img.height);
    for y in 0..h {
        for x in 0..w {
            let (xo, yo) = (x as f64 + 0.5, y as f64 + 0.5);
            let xi = m[0] * xo + m[1] * yo + m[2];
            let yi = m[3] * xo + m[4] * yo + m[5];
            let o = ((y * w + x) * 3) as usize;
            if xi < 0.0 || yi < 0.0 || xi >= w as f64 || yi >= h as f64 {
                out.data[o..o + 3].copy_from_slice(&fill);
                continue;
            }
            let (xs, ys) = (xi - 0.5, yi - 0.5);
            let (x0, y0) = (xs.floor() as i64, ys.floor() as i64);
            let (fx, fy) = (xs - x0 as f64, ys - y0 as f64);
            let wx: [f64; 4] = std::array::from_fn(|i| cubic(fx - (i as f64 - 1.0)));
            let wy: [f64; 4] = std::array::from_fn(|i| cubic(fy - (i as f64 - 1.0)));
            for c in 0..3 {
                let mut s = 0.0;
                for (j, wyj) in wy.iter().enumerate() {
                    let yy = (y0 + j as i64 - 1).clamp(0, h - 1);
                    let mut r = 0.0;
                    for (i, wxi) in wx.iter().enumerate() {
                        let xx = (x0 + i as i64 - 1).clamp(0, w - 1);
                        r += wxi * img.data[((yy * w + xx) * 3) as usize + c] as f64;
                    }
                    s += wyj * r;
                }
                out.data[o + c] = s.clamp(0.0, 255.0) as u8;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn parse_mae_policy() {
        let ra = RandAugment::parse("rand-m9-mstd0.5-inc1").unwrap();
        assert_eq!((ra.num_layers, ra.magnitude, ra.magnitude_std, ra.prob, ra.ops.len()), (2, 9.0, 0.5, 0.5, 15));
        assert!(RandAugment::parse("rand-m9-mstd0.5").is_err());
    }

    #[test]
    fn ops_keep_size_and_identity_cases() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let img = RgbImage { width: 7, height: 5, data: (0..105).map(|i| (i * 2) as u8).collect() };
        for op in RAND_INCREASING_OPS {
            let out = apply_op(op, img.clone(), 9.0, [124, 116, 104], &mut rng);
            assert_eq!((out.width, out.height, out.data.len()), (7, 5, 105), "{op:?}");
        }
        // Zero translation/shear is the identity under the bicubic resampler.
        assert_eq!(affine(&img, [1.0, 0.0, 0.0, 0.0, 1.0, 0.0], [0; 3]), img);
        assert_eq!(posterize(img.clone(), 8), img);
        assert_eq!(map_lut(map_lut(img.clone(), |v| 255 - v), |v| 255 - v), img);
    }

    #[test]
    fn beta_mean() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let n = 20000;
        let m: f64 = (0..n).map(|_| beta(&mut rng, 0.8, 0.8)).sum::<f64>() / n as f64;
        assert!((m - 0.5).abs() < 0.02, "{m}");
    }
}
