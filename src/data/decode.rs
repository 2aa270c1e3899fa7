//! Decoding image files to 8-bit RGB, as PIL's `Image.open(f).convert("RGB")` does for torchvision's loader.
//!
//! JPEG goes through zune-jpeg, or with the cargo feature `turbojpeg` through libjpeg-turbo (the decoder Pillow
//! itself uses, so its pixels are PIL's), which can also decode at 1/2, 1/4 or 1/8 scale in the DCT domain
//! ([`decode_jpeg_turbo_scaled`]). benchmarks/data_pipeline.md compares the decoders.
use std::path::Path;

use zune_jpeg::zune_core::colorspace::ColorSpace;
use zune_jpeg::zune_core::options::DecoderOptions;
use zune_jpeg::JpegDecoder;

use crate::error::{Error, Result};

/// An interleaved 8-bit RGB image (HWC).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

impl RgbImage {
    pub fn new(width: u32, height: u32) -> Self {
        RgbImage { width, height, data: vec![0; width as usize * height as usize * 3] }
    }

    pub fn from_raw(width: u32, height: u32, data: Vec<u8>) -> Option<Self> {
        (data.len() == width as usize * height as usize * 3).then_some(RgbImage { width, height, data })
    }
}

// Guards against decompression bombs; PIL's default limit is ~89 Mpx (warning) / 179 Mpx (error). The same
// limit holds for every format, checked on the header's size before any pixel is decoded.
const MAX_PIXELS: usize = 179_000_000;

/// Refuses a zero-sized image or one above [`MAX_PIXELS`], from the size its header declares.
fn check_size(format: &str, w: usize, h: usize) -> std::result::Result<(), String> {
    if w == 0 || h == 0 {
        return Err(format!("{format} has zero size {w}x{h}"));
    }
    if w.saturating_mul(h) > MAX_PIXELS {
        return Err(format!("{format} is {w}x{h}, more than the {MAX_PIXELS}-pixel limit (a decompression bomb?)"));
    }
    Ok(())
}

/// Whether the bytes start with a JPEG's SOI marker.
pub fn is_jpeg(bytes: &[u8]) -> bool {
    bytes.len() >= 3 && bytes[0] == 0xFF && bytes[1] == 0xD8 && bytes[2] == 0xFF
}

/// Decodes JPEG (libjpeg-turbo with the `turbojpeg` feature, else zune-jpeg) or anything else the `image` crate
/// reads (PNG) into RGB. The format comes from the bytes, not the file name: ImageNet has a PNG and CMYK JPEGs
/// named `.JPEG`.
pub fn decode_image(bytes: &[u8]) -> std::result::Result<RgbImage, String> {
    if !is_jpeg(bytes) {
        return decode_other(bytes);
    }
    #[cfg(feature = "turbojpeg")]
    return decode_jpeg_turbo(bytes);
    #[cfg(not(feature = "turbojpeg"))]
    decode_jpeg_zune(bytes)
}

/// Whether the stream ends its last scan with an EOI marker. zune-jpeg fills a short stream with grey instead of
/// failing, while PIL raises "image file is truncated". 0xFFD9 / 0xFFDA cannot occur inside entropy-coded data,
/// so the last EOI must have no SOS after it (an EXIF thumbnail's EOI comes before the main scans). Only the
/// tail after the last EOI is scanned, usually two bytes.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let Some(eoi) = bytes.windows(2).rposition(|w| w == [0xFF, 0xD9]) else {
        return false;
    };
    !bytes[eoi..].windows(2).any(|w| w == [0xFF, 0xDA])
}

/// Decodes a JPEG with zune-jpeg (pure Rust, SIMD).
pub fn decode_jpeg_zune(bytes: &[u8]) -> std::result::Result<RgbImage, String> {
    if !jpeg_is_complete(bytes) {
        return Err("truncated JPEG (no end-of-image marker after the last scan)".into());
    }
    // Strict mode: a truncated stream is an error (PIL raises "image file is truncated"), not a grey tail.
    let opts = DecoderOptions::default()
        .set_strict_mode(true)
        .set_max_width(1 << 16)
        .set_max_height(1 << 16)
        .jpeg_set_out_colorspace(ColorSpace::RGB);
    let mut dec = JpegDecoder::new_with_options(bytes, opts);
    dec.decode_headers().map_err(|e| format!("not a valid JPEG: {e:?}"))?;
    let (w, h) = dec.dimensions().ok_or("not a valid JPEG: no dimensions")?;
    check_size("JPEG", w, h)?;
    let data = dec.decode().map_err(|e| format!("corrupt or truncated JPEG: {e:?}"))?;
    // zune-jpeg keeps greyscale as one channel; PIL's convert("RGB") replicates it.
    let data = match dec.get_output_colorspace() {
        Some(ColorSpace::RGB) => data,
        Some(ColorSpace::Luma) => data.iter().flat_map(|&v| [v, v, v]).collect(),
        other => return Err(format!("JPEG decoded to unexpected colour space {other:?}")),
    };
    RgbImage::from_raw(w as u32, h as u32, data).ok_or_else(|| "JPEG decoded to a buffer of the wrong size".into())
}

/// The DCT scaling factors of the turbojpeg path, as denominators (the decode is 1/d of the full size). These are the
/// power-of-two reductions that libjpeg's `jidctred.c` computes with reduced-size inverse DCTs; libjpeg-turbo's
/// other factors (3/8, 5/8, ...) use generic, non-SIMD IDCTs (libjpeg-turbo docs: `tj3SetScalingFactor`).
pub const DCT_SCALE_DENOMS: [u32; 3] = [8, 4, 2];

/// The largest denominator d of [`DCT_SCALE_DENOMS`] (1 when none fits) such that a `crop_w` x `crop_h` box of
/// the full-size image, decoded at 1/d, still has at least `out_w` x `out_h` pixels: the resize to the output then
/// still downscales (or keeps the size), so only detail finer than the output's pixels is given up.
pub fn dct_scale_for_crop(crop_w: u32, crop_h: u32, out_w: u32, out_h: u32) -> u32 {
    DCT_SCALE_DENOMS
        .into_iter()
        .find(|&d| crop_w as u64 >= out_w as u64 * d as u64 && crop_h as u64 >= out_h as u64 * d as u64)
        .unwrap_or(1)
}

#[cfg(feature = "turbojpeg")]
mod turbo {
    use std::cell::RefCell;

    use turbojpeg::{Colorspace, Decompressor, Image, PixelFormat, ScalingFactor};

    use super::{check_size, jpeg_is_complete, RgbImage};

    thread_local! {
        // One TurboJPEG handle per thread: tj3Init allocates the libjpeg decompressor state.
        static DECOMPRESSOR: RefCell<Option<Decompressor>> = const { RefCell::new(None) };
    }

    /// The JPEG's (width, height) from its header, or an error for an image over the pixel limit. `Ok(None)` for
    /// CMYK / YCCK, which libjpeg-turbo does not convert to RGB, and for a header it cannot read: those go to
    /// zune-jpeg.
    pub(super) fn dimensions(bytes: &[u8]) -> Result<Option<(u32, u32)>, String> {
        with_decompressor(|d| {
            let Ok(h) = d.read_header(bytes) else { return Ok(None) };
            if matches!(h.colorspace, Colorspace::CMYK | Colorspace::YCCK) {
                return Ok(None);
            }
            check_size("JPEG", h.width, h.height)?;
            Ok(Some((h.width as u32, h.height as u32)))
        })
    }

    fn with_decompressor<T>(f: impl FnOnce(&mut Decompressor) -> Result<T, String>) -> Result<T, String> {
        DECOMPRESSOR.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = Some(Decompressor::new().map_err(|e| format!("cannot start libjpeg-turbo: {e}"))?);
            }
            f(slot.as_mut().expect("set above"))
        })
    }

    /// Decodes at 1/`denom` of the full size (1, 2, 4 or 8). `Ok(None)`: a CMYK / YCCK JPEG, or one that
    /// libjpeg-turbo refused with a warning or an error; zune-jpeg then decides, as without the feature.
    pub(super) fn decode(bytes: &[u8], denom: u32) -> Result<Option<RgbImage>, String> {
        if !jpeg_is_complete(bytes) {
            return Err("truncated JPEG (no end-of-image marker after the last scan)".into());
        }
        with_decompressor(|d| {
            let Ok(h) = d.read_header(bytes) else { return Ok(None) };
            if matches!(h.colorspace, Colorspace::CMYK | Colorspace::YCCK) {
                return Ok(None);
            }
            check_size("JPEG", h.width, h.height)?;
            // Lossless JPEG cannot be scaled in the DCT domain (it has none).
            let factor = if h.is_lossless { ScalingFactor::ONE } else { ScalingFactor::new(1, denom as usize) };
            if d.set_scaling_factor(factor).is_err() {
                return Ok(None);
            }
            let (w, ht) = (factor.scale(h.width), factor.scale(h.height));
            let mut img = RgbImage::new(w as u32, ht as u32);
            let out = Image { pixels: &mut img.data[..], width: w, pitch: 3 * w, height: ht, format: PixelFormat::RGB };
            // TurboJPEG 3 reports libjpeg warnings (corrupt data it could skip) as failures; PIL decodes through
            // them, so does zune-jpeg in some cases: leave those files to the zune-jpeg path.
            Ok(d.decompress(bytes, out).is_ok().then_some(img))
        })
    }
}

/// Decodes a JPEG with libjpeg-turbo at full size: the pixels of PIL's decode (both libjpeg-turbo, islow IDCT,
/// fancy upsampling). CMYK / YCCK JPEGs and streams that libjpeg-turbo warns about go to zune-jpeg.
#[cfg(feature = "turbojpeg")]
pub fn decode_jpeg_turbo(bytes: &[u8]) -> std::result::Result<RgbImage, String> {
    decode_jpeg_turbo_scaled(bytes, 1)
}

/// Decodes a JPEG with libjpeg-turbo at 1/`denom` of its size (`denom` 1, 2, 4 or 8; the output is
/// ceil(width/denom) x ceil(height/denom)) by computing reduced-size inverse DCTs, which skips most of the IDCT and
/// colour conversion work. This changes pixels relative to PIL's full decode followed by a resize: a scaled IDCT
/// is a box-like low-pass of each 8x8 block, not PIL's bicubic filter. Measured by tests/data_decode.rs
/// (`dct_scaled_crop_close_to_full_decode`) on generated 1600x1200 JPEGs (quality 90) through RandomResizedCrop
/// 224 (scale 0.08-1, bicubic): the final 224 crop differs from the one of the full-size decode by a mean absolute
/// 0.84/255 over the 87 of 96 crops that scaled (0.82/255 at 1/2, 0.85/255 at 1/4; worst crop 2.3/255), and not
/// at all where no scaling applies (every crop of a 500x375 photo at 224). A CMYK / YCCK JPEG, or one that libjpeg-turbo refuses with a warning,
/// is decoded at full size by zune-jpeg instead, so the result may be larger than asked: callers must scale by the
/// size they get, not by `denom`.
#[cfg(feature = "turbojpeg")]
pub fn decode_jpeg_turbo_scaled(bytes: &[u8], denom: u32) -> std::result::Result<RgbImage, String> {
    if ![1, 2, 4, 8].contains(&denom) {
        return Err(format!("DCT scaling 1/{denom} is not one of 1, 1/2, 1/4, 1/8"));
    }
    match turbo::decode(bytes, denom)? {
        Some(img) => Ok(img),
        None => decode_jpeg_zune(bytes),
    }
}

/// The (width, height) a JPEG's header declares, when the turbojpeg path can decode it with DCT scaling; None for
/// a CMYK / YCCK JPEG or a header libjpeg-turbo cannot read (decode those with [`decode_image`]). Errors for an
/// image over the pixel limit.
#[cfg(feature = "turbojpeg")]
pub fn jpeg_dimensions_for_scaling(bytes: &[u8]) -> std::result::Result<Option<(u32, u32)>, String> {
    turbo::dimensions(bytes)
}

fn decode_other(bytes: &[u8]) -> std::result::Result<RgbImage, String> {
    let format = image::guess_format(bytes).map_err(|_| "not an image file (unknown format)".to_string())?;
    // The size from the header alone: `Limits::max_alloc` would let a 20000x20000 PNG (1.2 GB of RGB) through.
    let (w, h) = image::ImageReader::with_format(std::io::Cursor::new(bytes), format)
        .into_dimensions()
        .map_err(|e| format!("cannot decode {format:?} image: {e}"))?;
    check_size(&format!("{format:?} image"), w as usize, h as usize)?;
    let mut reader = image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    limits.max_alloc = Some((MAX_PIXELS * 8) as u64);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| format!("cannot decode {format:?} image: {e}"))?;
    let rgb = img.into_rgb8();
    let (w, h) = rgb.dimensions();
    if w == 0 || h == 0 {
        return Err("image has zero size".into());
    }
    Ok(RgbImage { width: w, height: h, data: rgb.into_raw() })
}

/// Reads and decodes one file; the error names it.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let bytes = crate::fsutil::read_regular(path, Some(crate::fsutil::IMAGE_LIMIT))?;
    decode_image(&bytes).map_err(|reason| Error::data(path, reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dct_scale_is_the_largest_that_keeps_the_output_size() {
        assert_eq!(dct_scale_for_crop(447, 1000, 224, 224), 1);
        assert_eq!(dct_scale_for_crop(448, 448, 224, 224), 2);
        assert_eq!(dct_scale_for_crop(1000, 900, 224, 224), 4);
        assert_eq!(dct_scale_for_crop(1792, 1792, 224, 224), 8);
        assert_eq!(dct_scale_for_crop(4000, 1791, 224, 224), 4);
        // Height and width are checked against their own output size.
        assert_eq!(dct_scale_for_crop(800, 399, 100, 50), 4);
    }

    #[cfg(feature = "turbojpeg")]
    #[test]
    fn turbojpeg_scaled_sizes_round_up_and_bad_factors_fail() {
        let px: Vec<u8> = (0..100 * 75 * 3).map(|i| (i % 97) as u8).collect();
        let jpg = crate::data::fmnist::encode_jpeg(&px, 100, 75, false, 90).unwrap();
        for (d, size) in [(1, (100, 75)), (2, (50, 38)), (4, (25, 19)), (8, (13, 10))] {
            let img = decode_jpeg_turbo_scaled(&jpg, d).unwrap();
            assert_eq!((img.width, img.height), size, "1/{d}");
        }
        assert!(decode_jpeg_turbo_scaled(&jpg, 3).unwrap_err().contains("1/3"));
        assert_eq!(jpeg_dimensions_for_scaling(&jpg).unwrap(), Some((100, 75)));
        assert!(decode_jpeg_turbo(&jpg[..jpg.len() - 10]).unwrap_err().contains("truncated"));
    }
}
