//! torchvision transforms on 8-bit RGB images, matching torchvision on PIL images.
//!
//! Resizing is Pillow's own convolution resampling ([`super::pil_resample`], exact to Pillow 11 to the value):
//! torchvision's PIL path calls `Image.resize`, so `Resize`, `CenterCrop` and `RandomResizedCrop` give PIL's pixels.
//! Crops follow torchvision's integer arithmetic (Python's round-half-even included) and are cut before the resize,
//! as `F.resized_crop` does on a PIL image.
use std::cell::RefCell;

use rand::Rng;

use super::decode::{decode_image, RgbImage};
use super::pil_resample;
use crate::error::{Error, Result};

pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Interpolation, as torchvision's `InterpolationMode` on PIL images (antialiased).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interp {
    Bicubic,
    Bilinear,
}

impl Interp {
    fn filter(self) -> pil_resample::Filter {
        match self {
            Interp::Bicubic => pil_resample::Filter::Bicubic,
            Interp::Bilinear => pil_resample::Filter::Bilinear,
        }
    }
}

/// A crop box in torchvision's order of arguments: `F.crop(img, top, left, height, width)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct CropBox {
    pub top: u32,
    pub left: u32,
    pub height: u32,
    pub width: u32,
}

/// One step of a per-sample pipeline. The ops before `ToTensor` + `Normalize` act on the u8 image; only
/// `RandomErasing` acts on the normalised CHW output, as in timm, and must come last. (Mixup/CutMix mix whole
/// batches: they are applied by the fine-tuning step.)
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub enum Op {
    /// `RandomResizedCrop(size=(h, w), scale, ratio, interpolation)`.
    RandomResizedCrop { size: (u32, u32), scale: (f64, f64), ratio: (f64, f64), interp: Interp },
    /// MAE's `util/crop.py` RandomResizedCrop (the linear probe's): one draw of area and aspect, the crop clamped
    /// to the image, instead of torchvision's 10 tries with a central fallback.
    RandomResizedCropOnce { size: (u32, u32), scale: (f64, f64), ratio: (f64, f64), interp: Interp },
    /// `Resize(size)` with an int: the shorter side becomes `size`, the longer keeps the aspect (truncated).
    Resize { size: u32, interp: Interp },
    /// `CenterCrop((h, w))`; zero padding where the image is smaller, as torchvision.
    CenterCrop { size: (u32, u32) },
    /// `RandomHorizontalFlip(p)`.
    RandomHorizontalFlip { p: f64 },
    /// timm's RandAugment on the u8 image.
    RandAugment(crate::data::augment::RandAugment),
    /// timm's RandomErasing (pixel mode) on the normalised output; last.
    RandomErasing(crate::data::augment::RandomErasing),
}

/// A per-sample pipeline: `ops` on the u8 image, then `ToTensor` and `Normalize(mean, std)` into CHW f32.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Transform {
    pub ops: Vec<Op>,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// Python's `round()` (half to even), which torchvision uses for crop sizes and offsets.
fn py_round(x: f64) -> i64 {
    x.round_ties_even() as i64
}

/// torchvision's `RandomResizedCrop.get_params`: 10 tries of area in `scale` and log-uniform aspect in `ratio`,
/// then the central crop clamped to the ratio range.
pub fn random_resized_crop_params(
    width: u32,
    height: u32,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut impl Rng,
) -> CropBox {
    let (wi, hi) = (width as i64, height as i64);
    let area = (wi * hi) as f64;
    let (lr0, lr1) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target_area = area * uniform(rng, scale.0, scale.1);
        let aspect = uniform(rng, lr0, lr1).exp();
        let w = py_round((target_area * aspect).sqrt());
        let h = py_round((target_area / aspect).sqrt());
        if 0 < w && w <= wi && 0 < h && h <= hi {
            let top = rng.gen_range(0..=hi - h);
            let left = rng.gen_range(0..=wi - w);
            return CropBox { top: top as u32, left: left as u32, height: h as u32, width: w as u32 };
        }
    }
    let in_ratio = wi as f64 / hi as f64;
    let (rmin, rmax) = (ratio.0.min(ratio.1), ratio.0.max(ratio.1));
    let (w, h) = if in_ratio < rmin {
        (wi, py_round(wi as f64 / rmin))
    } else if in_ratio > rmax {
        (py_round(hi as f64 * rmax), hi)
    } else {
        (wi, hi)
    };
    CropBox { top: ((hi - h) / 2) as u32, left: ((wi - w) / 2) as u32, height: h as u32, width: w as u32 }
}

/// MAE's `util/crop.py` `RandomResizedCrop.get_params`: target area uniform in `scale` times the image area,
/// log-uniform aspect in `ratio`, width and height rounded and clamped to the image, then a uniform offset.
pub fn random_resized_crop_once_params(width: u32, height: u32, scale: (f64, f64), ratio: (f64, f64), rng: &mut impl Rng) -> CropBox {
    let (u_area, u_ratio) = (rng.gen::<f64>(), rng.gen::<f64>());
    let (h, w) = crop_once_size(width, height, scale, ratio, u_area, u_ratio);
    let (hi, wi) = (height as i64, width as i64);
    let (h, w) = (h as i64, w as i64);
    let top = rng.gen_range(0..=hi - h);
    let left = rng.gen_range(0..=wi - w);
    CropBox { top: top as u32, left: left as u32, height: h as u32, width: w as u32 }
}

/// The (height, width) of MAE's single-draw crop for the uniform draws `u_area`, `u_ratio` in [0, 1).
pub fn crop_once_size(width: u32, height: u32, scale: (f64, f64), ratio: (f64, f64), u_area: f64, u_ratio: f64) -> (u32, u32) {
    let (wi, hi) = (width as i64, height as i64);
    let target_area = (wi * hi) as f64 * (scale.0 + (scale.1 - scale.0) * u_area);
    let (lr0, lr1) = (ratio.0.ln(), ratio.1.ln());
    let aspect = (lr0 + (lr1 - lr0) * u_ratio).exp();
    let w = py_round((target_area * aspect).sqrt()).clamp(1, wi);
    let h = py_round((target_area / aspect).sqrt()).clamp(1, hi);
    (h as u32, w as u32)
}

fn uniform(rng: &mut impl Rng, a: f64, b: f64) -> f64 {
    a + (b - a) * rng.gen::<f64>()
}

thread_local! {
    // Reused per thread: the resizer keeps its intermediate buffers.
    static RESIZER: RefCell<pil_resample::Resizer> = RefCell::new(pil_resample::Resizer::new());
}

/// Pillow's `img.resize((out_w, out_h), filter, box)`; `box_` None is the whole image.
fn resize_impl(src: &RgbImage, box_: Option<(f64, f64, f64, f64)>, out_w: u32, out_h: u32, interp: Interp) -> std::result::Result<RgbImage, String> {
    let b = box_.map_or([0.0, 0.0, src.width as f64, src.height as f64], |(left, top, w, h)| [left, top, left + w, top + h]);
    let mut dst = RgbImage::new(out_w, out_h);
    RESIZER.with(|r| r.borrow_mut().resize_into(&src.data, src.width, src.height, 3, out_w, out_h, interp.filter(), b, &mut dst.data)).map_err(|e| format!("resize: {e}"))?;
    Ok(dst)
}

/// Crops with zero padding outside the image (torchvision's `F.crop` on PIL).
fn crop_padded(img: &RgbImage, top: i64, left: i64, h: u32, w: u32) -> RgbImage {
    let mut out = RgbImage::new(w, h);
    let (iw, ih) = (img.width as i64, img.height as i64);
    let x0 = left.max(0);
    let x1 = (left + w as i64).min(iw);
    if x1 <= x0 {
        return out;
    }
    for y in 0..h as i64 {
        let sy = top + y;
        if sy < 0 || sy >= ih {
            continue;
        }
        let src = &img.data[((sy * iw + x0) * 3) as usize..((sy * iw + x1) * 3) as usize];
        let d0 = ((y * w as i64 + (x0 - left)) * 3) as usize;
        out.data[d0..d0 + src.len()].copy_from_slice(src);
    }
    out
}

/// torchvision's `F.resized_crop(img, top, left, h, w, size=[out_h, out_w], interp)`.
pub fn crop_resize(
    img: &RgbImage,
    top: u32,
    left: u32,
    h: u32,
    w: u32,
    size: (u32, u32),
    interp: Interp,
) -> std::result::Result<RgbImage, String> {
    if h == 0 || w == 0 || size.0 == 0 || size.1 == 0 {
        return Err(format!("empty crop {h}x{w} or output size {size:?}"));
    }
    // PIL crops first (a new image), so the kernel is clipped at the crop's edges, not the image's.
    if (top, left, h, w) == (0, 0, img.height, img.width) {
        return resize_impl(img, None, size.1, size.0, interp);
    }
    let c = crop_padded(img, top as i64, left as i64, h, w);
    resize_impl(&c, None, size.1, size.0, interp)
}

/// [`crop_resize`] of the box `b` of the full-size image on `img`, the same image decoded at 1/`denom` of its size
/// (DCT scaling): the box becomes the fractional source box `b / denom`, covering the same part of the scene.
/// `denom` 1 is [`crop_resize`] itself.
pub fn crop_resize_scaled(
    img: &RgbImage,
    b: CropBox,
    denom: u32,
    size: (u32, u32),
    interp: Interp,
) -> std::result::Result<RgbImage, String> {
    if denom <= 1 {
        return crop_resize(img, b.top, b.left, b.height, b.width, size, interp);
    }
    if b.height == 0 || b.width == 0 || size.0 == 0 || size.1 == 0 {
        return Err(format!("empty crop {}x{} or output size {size:?}", b.height, b.width));
    }
    let d = denom as f64;
    let fbox = (b.left as f64 / d, b.top as f64 / d, b.width as f64 / d, b.height as f64 / d);
    if fbox.0 + fbox.2 > img.width as f64 || fbox.1 + fbox.3 > img.height as f64 {
        return Err(format!("crop {b:?} at 1/{denom} lies outside the {}x{} decoded image", img.width, img.height));
    }
    resize_impl(img, Some(fbox), size.1, size.0, interp)
}

/// The output size of torchvision's `Resize(size)` with an int: the shorter side becomes `size`.
pub fn resized_dims(width: u32, height: u32, size: u32) -> (u32, u32) {
    let (short, long) = if width <= height { (width, height) } else { (height, width) };
    let new_long = (size as u64 * long as u64 / short.max(1) as u64) as u32;
    if width <= height {
        (size, new_long)
    } else {
        (new_long, size)
    }
}

/// `Resize(size)` (shorter side).
pub fn resize_shorter(img: &RgbImage, size: u32, interp: Interp) -> std::result::Result<RgbImage, String> {
    let (w, h) = resized_dims(img.width, img.height, size);
    if (w, h) == (img.width, img.height) {
        return Ok(img.clone());
    }
    resize_impl(img, None, w, h, interp)
}

fn center_offsets(width: u32, height: u32, size: (u32, u32)) -> (i64, i64) {
    let top = py_round((height as f64 - size.0 as f64) / 2.0);
    let left = py_round((width as f64 - size.1 as f64) / 2.0);
    (top, left)
}

/// `CenterCrop((h, w))`.
pub fn center_crop(img: &RgbImage, size: (u32, u32)) -> RgbImage {
    let (top, left) = center_offsets(img.width, img.height, size);
    crop_padded(img, top, left, size.0, size.1)
}

/// `Resize(size)` then `CenterCrop(crop)`, as torchvision runs them on a PIL image: the whole resize, then the
/// crop (a box-limited resize would differ from it in the last bit: Pillow takes the box in single precision).
pub fn resize_center_crop(
    img: &RgbImage,
    size: u32,
    crop: (u32, u32),
    interp: Interp,
) -> std::result::Result<RgbImage, String> {
    Ok(center_crop(&resize_shorter(img, size, interp)?, crop))
}

/// Flips left-right in place.
pub fn hflip(img: &mut RgbImage) {
    let w = img.width as usize;
    for row in img.data.chunks_exact_mut(w * 3) {
        for x in 0..w / 2 {
            let (a, b) = (x * 3, (w - 1 - x) * 3);
            for c in 0..3 {
                row.swap(a + c, b + c);
            }
        }
    }
}

/// `ToTensor` + `Normalize(mean, std)`: HWC u8 to CHW f32 `(v/255 - mean)/std`, computed as torch does in f32.
pub fn to_tensor_normalize(img: &RgbImage, mean: [f32; 3], std: [f32; 3], out: &mut [f32]) {
    let plane = img.width as usize * img.height as usize;
    assert_eq!(out.len(), 3 * plane, "output buffer does not match the image size");
    let mut lut = [[0f32; 256]; 3];
    for (c, table) in lut.iter_mut().enumerate() {
        for (v, x) in table.iter_mut().enumerate() {
            *x = (v as f32 / 255.0 - mean[c]) / std[c];
        }
    }
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for (i, px) in img.data.chunks_exact(3).enumerate() {
        r[i] = lut[0][px[0] as usize];
        g[i] = lut[1][px[1] as usize];
        b[i] = lut[2][px[2] as usize];
    }
}

impl Transform {
    /// The Latent MIM pretraining recipe: `RandomResizedCrop(size, scale=(scale_min, 1), bicubic)` + flip.
    pub fn train(size: u32, scale_min: f64) -> Self {
        Transform {
            ops: vec![
                Op::RandomResizedCrop {
                    size: (size, size),
                    scale: (scale_min, 1.0),
                    ratio: (3.0 / 4.0, 4.0 / 3.0),
                    interp: Interp::Bicubic,
                },
                Op::RandomHorizontalFlip { p: 0.5 },
            ],
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }

    /// MAE's linear-probe training transform: its single-draw RandomResizedCrop (bicubic) + flip.
    pub fn linprobe_train(size: u32, scale_min: f64) -> Self {
        let mut t = Transform::train(size, scale_min);
        t.ops[0] = Op::RandomResizedCropOnce { size: (size, size), scale: (scale_min, 1.0), ratio: (3.0 / 4.0, 4.0 / 3.0), interp: Interp::Bicubic };
        t
    }

    /// MAE's fine-tuning transform (timm `create_transform(is_training=True)`): RandomResizedCrop(0.08-1, bicubic)
    /// + flip, RandAugment, normalisation, RandomErasing.
    pub fn finetune_train(size: u32, randaug: Option<crate::data::augment::RandAugment>, erasing: Option<crate::data::augment::RandomErasing>) -> Self {
        let mut t = Transform::train(size, 0.08);
        t.ops.extend(randaug.map(Op::RandAugment));
        t.ops.extend(erasing.map(Op::RandomErasing));
        t
    }

    /// The evaluation transform: `Resize(resize, bicubic)` + `CenterCrop(crop)`, e.g. 256 and 224.
    pub fn eval(resize: u32, crop: u32) -> Self {
        Transform {
            ops: vec![Op::Resize { size: resize, interp: Interp::Bicubic }, Op::CenterCrop { size: (crop, crop) }],
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }

    /// Checks the parameters and that the pipeline ends at a fixed size, which it returns as (h, w).
    pub fn validate(&self) -> Result<(u32, u32)> {
        let bad = |r: String| Error::option("transform", r);
        let mut fixed = None;
        for (i, op) in self.ops.iter().enumerate() {
            match *op {
                Op::RandomResizedCrop { size, scale, ratio, .. } | Op::RandomResizedCropOnce { size, scale, ratio, .. } => {
                    if size.0 == 0 || size.1 == 0 {
                        return Err(bad(format!("RandomResizedCrop size {size:?} must be positive")));
                    }
                    if !(scale.0 > 0.0 && scale.0 <= scale.1 && ratio.0 > 0.0 && ratio.0 <= ratio.1) {
                        return Err(bad(format!(
                            "RandomResizedCrop needs 0 < scale.0 <= scale.1 and 0 < ratio.0 <= ratio.1, got scale {scale:?} ratio {ratio:?}"
                        )));
                    }
                    fixed = Some(size);
                }
                Op::Resize { size, .. } => {
                    if size == 0 {
                        return Err(bad("Resize size must be positive".into()));
                    }
                    fixed = None;
                }
                Op::CenterCrop { size } => {
                    if size.0 == 0 || size.1 == 0 {
                        return Err(bad(format!("CenterCrop size {size:?} must be positive")));
                    }
                    fixed = Some(size);
                }
                Op::RandomHorizontalFlip { p } => {
                    if !(0.0..=1.0).contains(&p) {
                        return Err(bad(format!("RandomHorizontalFlip p={p} must be in [0, 1]")));
                    }
                }
                Op::RandAugment(_) => {}
                Op::RandomErasing(ref e) => {
                    if i + 1 != self.ops.len() {
                        return Err(bad("RandomErasing acts on the normalised output and must be the last op".into()));
                    }
                    if !(0.0..=1.0).contains(&e.probability) {
                        return Err(bad(format!("RandomErasing probability {} must be in [0, 1]", e.probability)));
                    }
                }
            }
        }
        if self.std.contains(&0.0) {
            return Err(bad("Normalize std must not be zero".into()));
        }
        fixed.ok_or_else(|| bad("the pipeline must end with a fixed size (a crop) to batch its outputs".into()))
    }

    /// Runs the u8 ops. Randomness is drawn in op order from `rng`, so a per-sample rng makes it reproducible.
    pub fn apply_u8(&self, img: RgbImage, rng: &mut impl Rng) -> std::result::Result<RgbImage, String> {
        Self::apply_ops(&self.ops, img, rng)
    }

    fn apply_ops(ops: &[Op], mut img: RgbImage, rng: &mut impl Rng) -> std::result::Result<RgbImage, String> {
        let mut i = 0;
        while i < ops.len() {
            match ops[i] {
                Op::RandomResizedCrop { size, scale, ratio, interp } => {
                    let b = random_resized_crop_params(img.width, img.height, scale, ratio, rng);
                    img = crop_resize(&img, b.top, b.left, b.height, b.width, size, interp)?;
                }
                Op::RandomResizedCropOnce { size, scale, ratio, interp } => {
                    let b = random_resized_crop_once_params(img.width, img.height, scale, ratio, rng);
                    img = crop_resize(&img, b.top, b.left, b.height, b.width, size, interp)?;
                }
                Op::RandAugment(ref ra) => img = ra.apply(img, rng),
                Op::RandomErasing(_) => {}
                Op::Resize { size, interp } => {
                    if let Some(Op::CenterCrop { size: crop }) = ops.get(i + 1) {
                        img = resize_center_crop(&img, size, *crop, interp)?;
                        i += 1;
                    } else {
                        img = resize_shorter(&img, size, interp)?;
                    }
                }
                Op::CenterCrop { size } => {
                    if (img.height, img.width) != size {
                        img = center_crop(&img, size);
                    }
                }
                Op::RandomHorizontalFlip { p } => {
                    if rng.gen::<f64>() < p {
                        hflip(&mut img);
                    }
                }
            }
            i += 1;
        }
        Ok(img)
    }

    /// The whole pipeline into `out` (CHW, `3*h*w` values, (h, w) from [`Transform::validate`]).
    pub fn apply(&self, img: RgbImage, rng: &mut impl Rng, out: &mut [f32]) -> std::result::Result<(), String> {
        let img = self.apply_u8(img, rng)?;
        self.finish(img, rng, out)
    }

    /// [`Transform::apply`] on an encoded file. With `dct_scaling` (a build with the `turbojpeg` feature), a JPEG
    /// whose first op is a RandomResizedCrop is decoded at the smallest DCT scale (1/2, 1/4, 1/8) at which the crop
    /// still has the output's size ([`super::decode::dct_scale_for_crop`]). The crop box is drawn from the full
    /// size as in `apply`, so the same rng gives the same box and the same later draws; the pixels differ from the
    /// full decode's (by how much: [`super::decode::decode_jpeg_turbo_scaled`]).
    pub fn apply_encoded(
        &self,
        bytes: &[u8],
        dct_scaling: bool,
        rng: &mut impl Rng,
        out: &mut [f32],
    ) -> std::result::Result<(), String> {
        if dct_scaling {
            #[cfg(not(feature = "turbojpeg"))]
            return Err("DCT-scaled JPEG decoding needs a build with the `turbojpeg` feature".into());
            #[cfg(feature = "turbojpeg")]
            if let Some(img) = self.first_crop_dct_scaled(bytes, rng)? {
                let img = Self::apply_ops(&self.ops[1..], img, rng)?;
                return self.finish(img, rng, out);
            }
        }
        self.apply(decode_image(bytes)?, rng, out)
    }

    /// The first op, a RandomResizedCrop, on a DCT-scaled decode; None when the file or the pipeline does not
    /// allow it (not a JPEG, CMYK, another first op), before anything is drawn from `rng`.
    #[cfg(feature = "turbojpeg")]
    fn first_crop_dct_scaled(&self, bytes: &[u8], rng: &mut impl Rng) -> std::result::Result<Option<RgbImage>, String> {
        use super::decode::{dct_scale_for_crop, decode_jpeg_turbo_scaled, is_jpeg, jpeg_dimensions_for_scaling};
        let Some(&(Op::RandomResizedCrop { size, scale, ratio, interp } | Op::RandomResizedCropOnce { size, scale, ratio, interp })) =
            self.ops.first()
        else {
            return Ok(None);
        };
        if !is_jpeg(bytes) {
            return Ok(None);
        }
        let Some((w, h)) = jpeg_dimensions_for_scaling(bytes)? else { return Ok(None) };
        let b = match self.ops[0] {
            Op::RandomResizedCrop { .. } => random_resized_crop_params(w, h, scale, ratio, rng),
            _ => random_resized_crop_once_params(w, h, scale, ratio, rng),
        };
        let denom = dct_scale_for_crop(b.width, b.height, size.1, size.0);
        let img = decode_jpeg_turbo_scaled(bytes, denom)?;
        // A file left to zune-jpeg comes back at full size.
        let denom = if (img.width, img.height) == (w, h) { 1 } else { denom };
        crop_resize_scaled(&img, b, denom, size, interp).map(Some)
    }

    /// `ToTensor` + `Normalize` into `out`, then RandomErasing when it is the last op.
    fn finish(&self, img: RgbImage, rng: &mut impl Rng, out: &mut [f32]) -> std::result::Result<(), String> {
        if out.len() != 3 * img.width as usize * img.height as usize {
            return Err(format!(
                "transform produced {}x{} but the output holds {} values",
                img.height,
                img.width,
                out.len()
            ));
        }
        to_tensor_normalize(&img, self.mean, self.std, out);
        if let Some(Op::RandomErasing(er)) = self.ops.last() {
            er.apply(out, 3, img.height as usize, img.width as usize, rng);
        }
        Ok(())
    }
}
