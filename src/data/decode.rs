//! Decoding image files to 8-bit RGB, as PIL's `Image.open(f).convert("RGB")` does for torchvision's loader.
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

/// Decodes JPEG (zune-jpeg, SIMD) or anything else the `image` crate reads (PNG) into RGB. The format comes from
/// the bytes, not the file name: ImageNet has a PNG and CMYK JPEGs named `.JPEG`.
pub fn decode_image(bytes: &[u8]) -> std::result::Result<RgbImage, String> {
    if bytes.len() >= 3 && bytes[0] == 0xFF && bytes[1] == 0xD8 && bytes[2] == 0xFF {
        decode_jpeg(bytes)
    } else {
        decode_other(bytes)
    }
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

fn decode_jpeg(bytes: &[u8]) -> std::result::Result<RgbImage, String> {
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
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_image(&bytes).map_err(|reason| Error::data(path, reason))
}
