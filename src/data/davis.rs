//! DAVIS-2017 data: the folder layout (`JPEGImages/480p/<seq>/*.jpg`, `Annotations/480p/<seq>/*.png` indexed PNGs,
//! `ImageSets/2017/val.txt`), frame and annotation reading exact to the pixel of DINO's `eval_video_segmentation.py`
//! (facebookresearch/dino 7c446df: `read_frame` = `cv2.imread` + `cv2.resize` INTER_LINEAR, `read_seg` = PIL
//! nearest), indexed-PNG reading and writing with the palette, and `data synth-davis`, a generator of small sets in
//! that layout (moving textured shapes with known masks).
use std::path::{Path, PathBuf};

use rand::Rng;
use rayon::prelude::*;

use super::fmnist::{encode_jpeg, write_tree, Manifest};
use super::loader::sample_rng;
use crate::error::{Error, Result};

/// OpenCV's `INTER_RESIZE_COEF_BITS`: 8-bit linear resizing works in fixed point with 11-bit coefficients.
const COEF_BITS: i32 = 11;
const COEF_SCALE: f32 = (1 << COEF_BITS) as f32;

/// `cvRound` / `saturate_cast<short>(float)`: round half to even, saturated.
fn cv_round_i16(v: f32) -> i16 {
    v.round_ties_even().clamp(i16::MIN as f32, i16::MAX as f32) as i16
}

/// `cv2.resize(img, (dw, dh))` with the default INTER_LINEAR on an 8-bit interleaved image of `cn` channels,
/// reproducing OpenCV 4.x's arithmetic (imgproc/src/resize.cpp, `hal::resize` -> `resizeGeneric_` with
/// `HResizeLinear` / `VResizeLinear` and `VResizeLinearVec_32s8u`): source coordinates `(d + 0.5) * scale - 0.5`
/// in float, coefficients rounded to 11 bits, the horizontal pass exact in integers, the vertical pass in the SIMD
/// form of `VResizeLinearVec_32s8u` (`>> 4`, 16-bit high multiply, saturating add, `(+2) >> 2`). That form, not
/// the scalar `(v + 2^21) >> 22`, is what opencv-python 4.12 gives for every pixel of a row, tails included
/// (checked against `cv2.resize` on random sizes down to 1 pixel: tests/davis.rs). The same size is a copy. An
/// exact 2x downscale on both axes is what OpenCV sends to INTER_AREA's fast path: each value the mean of its 2x2
/// block, `(a + b + c + d + 2) >> 2` (`ResizeAreaFastVec`).
pub fn cv2_resize_linear(src: &[u8], sw: usize, sh: usize, cn: usize, dw: usize, dh: usize) -> Vec<u8> {
    assert_eq!(src.len(), sw * sh * cn, "image buffer is sw x sh x cn");
    if sw == dw && sh == dh {
        return src.to_vec();
    }
    let (inv_x, inv_y) = (dw as f64 / sw as f64, dh as f64 / sh as f64);
    let (scale_x, scale_y) = (1.0 / inv_x, 1.0 / inv_y);
    let (ix, iy) = (scale_x.round() as i64, scale_y.round() as i64);
    if (scale_x - ix as f64).abs() < f64::EPSILON && (scale_y - iy as f64).abs() < f64::EPSILON && ix == 2 && iy == 2 {
        return area_fast_2x(src, sw, cn, dw, dh);
    }
    // Horizontal tables, per pixel.
    let mut xmax = dw;
    let mut xofs = vec![0usize; dw];
    let mut alpha = vec![(0i32, 0i32); dw];
    for dx in 0..dw {
        let mut fx = ((dx as f64 + 0.5) * scale_x - 0.5) as f32;
        let mut sx = fx.floor() as i64;
        fx -= sx as f32;
        if sx < 0 {
            fx = 0.0;
            sx = 0;
        }
        if sx + 1 >= sw as i64 {
            xmax = xmax.min(dx);
            if sx >= sw as i64 - 1 {
                fx = 0.0;
                sx = sw as i64 - 1;
            }
        }
        xofs[dx] = sx as usize;
        alpha[dx] = (cv_round_i16((1.0 - fx) * COEF_SCALE) as i32, cv_round_i16(fx * COEF_SCALE) as i32);
    }
    // One source row through the horizontal pass: `dw * cn` ints.
    let hrow = |y: usize| -> Vec<i32> {
        let row = &src[y * sw * cn..(y + 1) * sw * cn];
        let mut out = vec![0i32; dw * cn];
        for dx in 0..dw {
            let s = xofs[dx] * cn;
            for k in 0..cn {
                out[dx * cn + k] = if dx < xmax {
                    row[s + k] as i32 * alpha[dx].0 + row[s + k + cn] as i32 * alpha[dx].1
                } else {
                    row[s + k] as i32 * (1 << COEF_BITS)
                };
            }
        }
        out
    };
    let width = dw * cn;
    let mut dst = vec![0u8; dh * width];
    dst.par_chunks_mut(width).enumerate().for_each(|(dy, out)| {
        let mut fy = ((dy as f64 + 0.5) * scale_y - 0.5) as f32;
        let sy = fy.floor() as i64;
        fy -= sy as f32;
        let (b0, b1) = (cv_round_i16((1.0 - fy) * COEF_SCALE) as i32, cv_round_i16(fy * COEF_SCALE) as i32);
        let clampy = |y: i64| y.clamp(0, sh as i64 - 1) as usize;
        let (r0, r1) = (hrow(clampy(sy)), hrow(clampy(sy + 1)));
        for x in 0..width {
            let t0 = (r0[x] >> 4).clamp(i16::MIN as i32, i16::MAX as i32);
            let t1 = (r1[x] >> 4).clamp(i16::MIN as i32, i16::MAX as i32);
            let sum = (((t0 * b0) >> 16) + ((t1 * b1) >> 16)).clamp(i16::MIN as i32, i16::MAX as i32);
            out[x] = ((sum + 2) >> 2).clamp(0, 255) as u8;
        }
    });
    dst
}

/// OpenCV's INTER_AREA at exactly half size on both axes (`sw = 2 dw`, `sh = 2 dh`): the rounded mean of each 2x2
/// block, channel by channel.
fn area_fast_2x(src: &[u8], sw: usize, cn: usize, dw: usize, dh: usize) -> Vec<u8> {
    let mut dst = vec![0u8; dw * dh * cn];
    dst.par_chunks_mut(dw * cn).enumerate().for_each(|(dy, out)| {
        let (r0, r1) = (&src[2 * dy * sw * cn..], &src[(2 * dy + 1) * sw * cn..]);
        for dx in 0..dw {
            for k in 0..cn {
                let i = 2 * dx * cn + k;
                let sum = r0[i] as u32 + r0[i + cn] as u32 + r1[i] as u32 + r1[i + cn] as u32;
                out[dx * cn + k] = ((sum + 2) >> 2) as u8;
            }
        }
    });
    dst
}

/// PIL's `Image.resize((dw, dh), NEAREST)` of a one-channel 8-bit image (Pillow's `ImagingScaleAffine`: the source
/// index is `int(x0)` with `x0 = scale / 2` advanced by `scale = sw / dw` in double, per axis).
pub fn pil_resize_nearest(src: &[u8], sw: usize, sh: usize, dw: usize, dh: usize) -> Vec<u8> {
    assert_eq!(src.len(), sw * sh, "image buffer is sw x sh");
    if sw == dw && sh == dh {
        return src.to_vec();
    }
    let table = |s: usize, d: usize| -> Vec<usize> {
        let a = s as f64 / d as f64;
        let mut o = a * 0.5;
        (0..d)
            .map(|_| {
                let i = (o as usize).min(s - 1);
                o += a;
                i
            })
            .collect()
    };
    let (xs, ys) = (table(sw, dw), table(sh, dh));
    let mut out = Vec::with_capacity(dw * dh);
    for &y in &ys {
        out.extend(xs.iter().map(|&x| src[y * sw + x]));
    }
    out
}

/// Python's float floor division `a // b` (for the positive values here: `floor(a / b)` with CPython's correction).
fn py_floordiv(a: f64, b: f64) -> f64 {
    let m = a % b;
    let div = (a - m) / b;
    let mut f = div.floor();
    if div - f > 0.5 {
        f += 1.0;
    }
    f
}

/// The size `read_frame` resizes a `w x h` frame to (DINO): the short side to `short`, the long side
/// `int(short * long / short_side // 64 * 64)`; a square frame counts as landscape here. `(tw, th)`.
pub fn dino_frame_size(w: usize, h: usize, short: usize) -> (usize, usize) {
    if h > w {
        (short, (py_floordiv((short * h) as f64 / w as f64, 64.0) * 64.0) as usize)
    } else {
        ((py_floordiv((short * w) as f64 / h as f64, 64.0) * 64.0) as usize, short)
    }
}

/// The size `read_seg` computes for a `w x h` annotation before dividing by the patch size; a square one counts as
/// portrait here (the opposite of `read_frame`). `(tw, th)`.
pub fn dino_seg_size(w: usize, h: usize, short: usize) -> (usize, usize) {
    if w > h {
        ((py_floordiv((short * w) as f64 / h as f64, 64.0) * 64.0) as usize, short)
    } else {
        (short, (py_floordiv((short * h) as f64 / w as f64, 64.0) * 64.0) as usize)
    }
}

/// DINO's `color_normalize` mean and std (its std is 0.228, not torchvision's 0.229).
pub const DINO_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const DINO_STD: [f32; 3] = [0.228, 0.224, 0.225];

/// A frame as `read_frame` returns it: CHW f32, normalised, at `(width, height)`.
pub struct Frame {
    pub chw: Vec<f32>,
    pub width: usize,
    pub height: usize,
}

/// DINO's `read_frame(path, [short])`: decode (libjpeg-turbo, islow IDCT, fancy upsampling: OpenCV's and PIL's
/// decoder), resize with [`cv2_resize_linear`] to [`dino_frame_size`], `/ 255` in f32, then `(x - mean) / std`.
pub fn read_frame(path: &Path, short: usize) -> Result<Frame> {
    let img = super::decode::load_rgb(path)?;
    let (w, h) = (img.width as usize, img.height as usize);
    let (tw, th) = dino_frame_size(w, h, short);
    if tw == 0 || th == 0 {
        return Err(Error::data(path, format!("{w}x{h} at short side {short} gives a {tw}x{th} input (the long side is floored to a multiple of 64)")));
    }
    let px = cv2_resize_linear(&img.data, w, h, 3, tw, th);
    let n = tw * th;
    let mut chw = vec![0f32; 3 * n];
    for (i, p) in px.chunks_exact(3).enumerate() {
        for c in 0..3 {
            chw[c * n + i] = (p[c] as f32 / 255.0 - DINO_MEAN[c]) / DINO_STD[c];
        }
    }
    Ok(Frame { chw, width: tw, height: th })
}

/// An 8-bit indexed image with its palette (RGB triplets as stored in PLTE).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexedImage {
    pub width: usize,
    pub height: usize,
    pub indices: Vec<u8>,
    pub palette: Vec<u8>,
}

/// Reads a palette ("P" mode) PNG: its indices (1-, 2- and 4-bit ones unpacked, as PIL does) and palette. Any other
/// PNG or file is an error naming it.
pub fn read_indexed_png(path: &Path) -> Result<IndexedImage> {
    let bytes = crate::fsutil::read_regular(path, Some(crate::fsutil::IMAGE_LIMIT))?;
    let mut dec = png::Decoder::new(std::io::Cursor::new(&bytes[..]));
    dec.set_transformations(png::Transformations::IDENTITY);
    let mut reader = dec.read_info().map_err(|e| Error::data(path, format!("not a readable PNG: {e}")))?;
    let info = reader.info();
    if info.color_type != png::ColorType::Indexed {
        return Err(Error::data(path, format!("not an indexed (palette) PNG: colour type {:?}; DAVIS annotations are indexed PNGs whose indices are the object ids", info.color_type)));
    }
    let (w, h) = (info.width as usize, info.height as usize);
    if w == 0 || h == 0 || w.saturating_mul(h) > 179_000_000 {
        return Err(Error::data(path, format!("PNG size {w}x{h} is empty or too large")));
    }
    let palette = info.palette.as_ref().map(|p| p.to_vec()).unwrap_or_default();
    let depth = info.bit_depth as usize;
    let mut buf = vec![0u8; reader.output_buffer_size().ok_or_else(|| Error::data(path, "PNG too large"))?];
    let frame = reader.next_frame(&mut buf).map_err(|e| Error::data(path, format!("cannot decode the PNG: {e}")))?;
    let stride = frame.line_size;
    let mut indices = Vec::with_capacity(w * h);
    for y in 0..h {
        let row = &buf[y * stride..(y + 1) * stride];
        match depth {
            8 => indices.extend_from_slice(&row[..w]),
            1 | 2 | 4 => {
                let per = 8 / depth;
                let mask = (1u16 << depth) as u8 - 1;
                for x in 0..w {
                    let byte = row[x / per];
                    let shift = 8 - depth * (x % per + 1);
                    indices.push((byte >> shift) & mask);
                }
            }
            d => return Err(Error::data(path, format!("indexed PNG with bit depth {d}"))),
        }
    }
    Ok(IndexedImage { width: w, height: h, indices, palette })
}

/// Encodes an 8-bit indexed PNG (the palette padded to whole triplets; an empty one becomes a grey ramp).
pub fn encode_indexed_png(img: &IndexedImage) -> Result<Vec<u8>> {
    let mut palette = img.palette.clone();
    if palette.is_empty() {
        palette = (0..=255u8).flat_map(|v| [v, v, v]).collect();
    }
    palette.truncate(256 * 3);
    palette.truncate(palette.len() / 3 * 3);
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, img.width as u32, img.height as u32);
        enc.set_color(png::ColorType::Indexed);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_palette(palette);
        let mut w = enc.write_header().map_err(|e| Error::data("<png encoder>", e.to_string()))?;
        w.write_image_data(&img.indices).map_err(|e| Error::data("<png encoder>", e.to_string()))?;
    }
    Ok(out)
}

/// The PASCAL VOC / DAVIS palette: index i gets the bits of i spread over R, G, B.
pub fn voc_palette() -> Vec<u8> {
    let mut p = Vec::with_capacity(256 * 3);
    for i in 0..256u32 {
        let (mut r, mut g, mut b, mut c) = (0u32, 0u32, 0u32, i);
        for j in 0..8 {
            r |= ((c >> 0) & 1) << (7 - j);
            g |= ((c >> 1) & 1) << (7 - j);
            b |= ((c >> 2) & 1) << (7 - j);
            c >>= 3;
        }
        p.extend([r as u8, g as u8, b as u8]);
    }
    p
}

/// One sequence of a DAVIS-layout set.
#[derive(Clone, Debug)]
pub struct Sequence {
    pub name: String,
    /// `JPEGImages/<res>/<seq>/*.jpg`, sorted by name (DINO's `sorted(glob)`).
    pub frames: Vec<PathBuf>,
    /// `Annotations/<res>/<seq>/<frame stem>.png` of every frame.
    pub annotations: Vec<PathBuf>,
}

impl Sequence {
    pub fn frame_stem(&self, i: usize) -> String {
        self.frames[i].file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
    }
}

/// A DAVIS-layout root and the sequences of one ImageSets list.
#[derive(Clone, Debug)]
pub struct DavisSet {
    pub root: PathBuf,
    pub list: PathBuf,
    pub sequences: Vec<Sequence>,
}

/// Opens `root` with `ImageSets/2017/<subset>.txt` and the sequences it lists at `resolution` (`480p`): every
/// listed sequence needs its frame folder with at least one `.jpg`, and an annotation folder; a missing one is an
/// error naming it. Annotations are matched to frames by stem (davis2017-evaluation reads them so).
pub fn open_set(root: &Path, subset: &str, resolution: &str) -> Result<DavisSet> {
    let list = root.join("ImageSets").join("2017").join(format!("{subset}.txt"));
    // Only a missing list is "not found": a FIFO or a device is refused by the reader below, by name.
    if std::fs::metadata(&list).is_err() {
        return Err(Error::data(&list, "sequence list not found (a DAVIS-2017 root has ImageSets/2017/val.txt, JPEGImages/480p and Annotations/480p; download DAVIS-2017 trainval 480p from https://davischallenge.org/davis2017/code.html)"));
    }
    let text = crate::fsutil::read_regular_text(&list, Some(crate::fsutil::TEXT_LIMIT))?;
    let names: Vec<String> = text.lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect();
    if names.is_empty() {
        return Err(Error::data(&list, "lists no sequence"));
    }
    let mut sequences = Vec::with_capacity(names.len());
    for name in names {
        if name.contains('/') || name.contains('\\') || name == ".." || name == "." {
            return Err(Error::data(&list, format!("`{name}` is not a sequence folder name")));
        }
        let fdir = root.join("JPEGImages").join(resolution).join(&name);
        let adir = root.join("Annotations").join(resolution).join(&name);
        if !fdir.is_dir() {
            return Err(Error::data(&fdir, format!("frame folder of sequence `{name}` (listed in {}) not found", list.display())));
        }
        let mut frames: Vec<PathBuf> = std::fs::read_dir(&fdir)
            .map_err(|e| Error::io(&fdir, e))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
            .collect();
        frames.sort();
        if frames.is_empty() {
            return Err(Error::data(&fdir, format!("no .jpg frame in sequence `{name}`")));
        }
        if !adir.is_dir() {
            return Err(Error::data(&adir, format!("annotation folder of sequence `{name}` not found")));
        }
        let annotations = frames
            .iter()
            .map(|f| adir.join(format!("{}.png", f.file_stem().map(|s| s.to_string_lossy()).unwrap_or_default())))
            .collect();
        sequences.push(Sequence { name, frames, annotations });
    }
    Ok(DavisSet { root: root.to_path_buf(), list, sequences })
}

/// `data synth-davis` options.
#[derive(Clone, Debug)]
pub struct SynthDavisOptions {
    pub out: PathBuf,
    pub sequences: usize,
    pub frames: usize,
    /// Objects per sequence (1 to 3 by default: sequence i gets 1 + i % max_objects).
    pub max_objects: usize,
    pub width: u32,
    pub height: u32,
    pub seed: u64,
    pub quality: u8,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct SynthDavisReport {
    pub out: PathBuf,
    pub sequences: usize,
    pub frames: usize,
    pub reused: bool,
}

struct Blob {
    cx: f32,
    cy: f32,
    vx: f32,
    vy: f32,
    rx: f32,
    ry: f32,
    growth: f32,
    rect: bool,
    colour: [f32; 3],
    colour2: [f32; 3],
    stripe: f32,
    angle: f32,
}

fn rand_colour(rng: &mut impl Rng) -> [f32; 3] {
    [rng.gen_range(20.0..235.0), rng.gen_range(20.0..235.0), rng.gen_range(20.0..235.0)]
}

/// Frames and label maps of one generated sequence: textured objects (stripes of two colours at their own angle)
/// moving in straight lines over a textured background, growing or shrinking slowly; later objects occlude
/// earlier ones. Deterministic from the seed.
fn render_sequence(seq: usize, opts: &SynthDavisOptions) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let mut rng = sample_rng(opts.seed, 7, seq);
    let (w, h) = (opts.width as usize, opts.height as usize);
    let (wf, hf) = (w as f32, h as f32);
    let n_obj = 1 + seq % opts.max_objects.max(1);
    let bg = (rand_colour(&mut rng), rand_colour(&mut rng), rng.gen_range(0.03..0.12f32), rng.gen_range(0.0..3.14f32));
    let mut blobs: Vec<Blob> = (0..n_obj)
        .map(|_| {
            let r = hf.min(wf);
            let (rx, ry) = (rng.gen_range(0.12..0.25) * r, rng.gen_range(0.12..0.25) * r);
            Blob {
                cx: rng.gen_range(rx..(wf - rx)),
                cy: rng.gen_range(ry..(hf - ry)),
                vx: rng.gen_range(-0.02..0.02) * wf,
                vy: rng.gen_range(-0.02..0.02) * hf,
                rx,
                ry,
                growth: rng.gen_range(0.985..1.015),
                rect: rng.gen_bool(0.4),
                colour: rand_colour(&mut rng),
                colour2: rand_colour(&mut rng),
                stripe: rng.gen_range(0.15..0.5),
                angle: rng.gen_range(0.0..3.14),
            }
        })
        .collect();
    let noise = 6.0f32;
    let (mut frames, mut labels) = (Vec::new(), Vec::new());
    for _ in 0..opts.frames {
        let mut px = vec![0u8; w * h * 3];
        let mut lab = vec![0u8; w * h];
        for y in 0..h {
            for x in 0..w {
                let (xf, yf) = (x as f32, y as f32);
                let t = ((xf * bg.3.cos() + yf * bg.3.sin()) * bg.2).sin() * 0.5 + 0.5;
                let mut c = [0f32; 3];
                for k in 0..3 {
                    c[k] = bg.0[k] * t + bg.1[k] * (1.0 - t);
                }
                for (i, b) in blobs.iter().enumerate() {
                    let (dx, dy) = ((xf - b.cx) / b.rx, (yf - b.cy) / b.ry);
                    let inside = if b.rect { dx.abs() < 1.0 && dy.abs() < 1.0 } else { dx * dx + dy * dy < 1.0 };
                    if inside {
                        let s = ((dx * b.angle.cos() + dy * b.angle.sin()) / b.stripe).floor() as i64;
                        c = if s % 2 == 0 { b.colour } else { b.colour2 };
                        lab[y * w + x] = (i + 1) as u8;
                    }
                }
                for k in 0..3 {
                    px[(y * w + x) * 3 + k] = (c[k] + rng.gen_range(-noise..noise)).clamp(0.0, 255.0) as u8;
                }
            }
        }
        frames.push(px);
        labels.push(lab);
        for b in &mut blobs {
            b.cx += b.vx;
            b.cy += b.vy;
            if b.cx < b.rx * 0.5 || b.cx > wf - b.rx * 0.5 {
                b.vx = -b.vx;
            }
            if b.cy < b.ry * 0.5 || b.cy > hf - b.ry * 0.5 {
                b.vy = -b.vy;
            }
            b.rx *= b.growth;
            b.ry *= b.growth;
        }
    }
    (frames, labels)
}

/// `lmim-bench data synth-davis`: a DAVIS-2017-layout set of generated sequences (`seq_000`, ...), all listed in
/// `ImageSets/2017/val.txt`, with JPEG frames and indexed-PNG annotations (DAVIS palette) of every frame under
/// `480p`. Does nothing when `out` was made with the same options.
pub fn synth_davis(opts: &SynthDavisOptions) -> Result<SynthDavisReport> {
    if opts.sequences == 0 || opts.frames < 3 || opts.width < 16 || opts.height < 16 || opts.max_objects == 0 || opts.max_objects > 254 {
        return Err(Error::option("synth-davis", "needs sequences >= 1, frames >= 3 (the first and last are not scored), size >= 16 and 1..=254 objects"));
    }
    let options = serde_json::json!({
        "sequences": opts.sequences, "frames": opts.frames, "max_objects": opts.max_objects, "width": opts.width,
        "height": opts.height, "seed": opts.seed, "jpeg_quality": opts.quality,
    });
    let frames_total = opts.sequences * opts.frames;
    if let Some(m) = super::fmnist::read_manifest(&opts.out) {
        if m.kind == "synth-davis" && m.options == options {
            return Ok(SynthDavisReport { out: opts.out.clone(), sequences: opts.sequences, frames: frames_total, reused: true });
        }
    }
    let names: Vec<String> = (0..opts.sequences).map(|i| format!("seq_{i:03}")).collect();
    let manifest = Manifest { kind: "synth-davis".into(), version: 1, options, train_images: 0, val_images: frames_total, classes: names.clone() };
    let palette = voc_palette();
    write_tree(&opts.out, &manifest, |tmp: &Path| {
        let sets = tmp.join("ImageSets").join("2017");
        std::fs::create_dir_all(&sets).map_err(|e| Error::io(&sets, e))?;
        let list = names.join("\n") + "\n";
        std::fs::write(sets.join("val.txt"), &list).map_err(|e| Error::io(sets.join("val.txt"), e))?;
        names.par_iter().enumerate().try_for_each(|(i, name)| {
            let fdir = tmp.join("JPEGImages").join("480p").join(name);
            let adir = tmp.join("Annotations").join("480p").join(name);
            for d in [&fdir, &adir] {
                std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
            }
            let (frames, labels) = render_sequence(i, opts);
            for (t, (px, lab)) in frames.iter().zip(&labels).enumerate() {
                let jpg = encode_jpeg(px, opts.width, opts.height, false, opts.quality)?;
                let p = fdir.join(format!("{t:05}.jpg"));
                std::fs::write(&p, jpg).map_err(|e| Error::io(&p, e))?;
                let img = IndexedImage { width: opts.width as usize, height: opts.height as usize, indices: lab.clone(), palette: palette.clone() };
                let p = adir.join(format!("{t:05}.png"));
                std::fs::write(&p, encode_indexed_png(&img)?).map_err(|e| Error::io(&p, e))?;
            }
            Ok::<(), Error>(())
        })
    })?;
    Ok(SynthDavisReport { out: opts.out.clone(), sequences: opts.sequences, frames: frames_total, reused: false })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dino_sizes_floor_the_long_side_to_64() {
        assert_eq!(dino_frame_size(854, 480, 480), (832, 480));
        assert_eq!(dino_seg_size(854, 480, 480), (832, 480));
        assert_eq!(dino_frame_size(480, 854, 480), (480, 832));
        assert_eq!(dino_seg_size(480, 854, 480), (480, 832));
        // A square frame: read_frame takes it as landscape, read_seg as portrait.
        assert_eq!(dino_frame_size(500, 500, 480), (448, 480));
        assert_eq!(dino_seg_size(500, 500, 480), (480, 448));
    }

    #[test]
    fn pil_nearest_picks_centres() {
        let src: Vec<u8> = (0..8).collect();
        assert_eq!(pil_resize_nearest(&src, 8, 1, 4, 1), vec![1, 3, 5, 7]);
        assert_eq!(pil_resize_nearest(&src, 8, 1, 16, 1), vec![0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7]);
    }

    #[test]
    fn indexed_png_round_trips_with_its_palette() {
        let img = IndexedImage { width: 5, height: 3, indices: (0..15).map(|i| (i % 4) as u8).collect(), palette: voc_palette()[..12].to_vec() };
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.png");
        std::fs::write(&p, encode_indexed_png(&img).unwrap()).unwrap();
        let back = read_indexed_png(&p).unwrap();
        assert_eq!(back, img);
    }
}
