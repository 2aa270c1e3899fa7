//! The figure of one image: the input, one cluster overlay per level and the t-SNE scatter, side by side, with
//! titles in an embedded font (DejaVu Sans, vendored under assets/fonts/), so it renders without system fonts.
//!
//! Text is laid out with ab_glyph directly: plotters 0.3.7's ab_glyph text path drops each glyph's left side
//! bearing, which misplaces narrow glyphs ("." and "j" drift left). plotters draws the scatter.
use std::sync::OnceLock;

use ab_glyph::{point, Font, FontRef, PxScale, ScaleFont};
use plotters::prelude::*;

use crate::data::decode::RgbImage;
use crate::data::transforms::{resize_shorter, Interp};
use crate::error::{Error, Result};

static FONT_BYTES: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

fn font() -> &'static FontRef<'static> {
    static FONT: OnceLock<FontRef<'static>> = OnceLock::new();
    FONT.get_or_init(|| FontRef::try_from_slice(FONT_BYTES).expect("the embedded DejaVu Sans font parses"))
}

/// Width in pixels of `text` at `px` pixels per em.
pub(crate) fn text_width(text: &str, px: f32) -> f32 {
    let f = font().as_scaled(PxScale::from(px));
    let mut prev = None;
    let mut w = 0.0;
    for c in text.chars() {
        let id = f.glyph_id(c);
        if let Some(p) = prev {
            w += f.kern(p, id);
        }
        w += f.h_advance(id);
        prev = Some(id);
    }
    w
}

/// Draws `text` into an RGB buffer of width `w` with its left edge at `x` and its ascender line at `top`.
pub(crate) fn draw_text(buf: &mut [u8], w: u32, text: &str, x: f32, top: f32, px: f32, color: [u8; 3]) {
    let h = buf.len() as i64 / (3 * w as i64);
    let f = font().as_scaled(PxScale::from(px));
    let baseline = top + f.ascent();
    let mut caret = x;
    let mut prev = None;
    for c in text.chars() {
        let id = f.glyph_id(c);
        if let Some(p) = prev {
            caret += f.kern(p, id);
        }
        if let Some(outline) = f.outline_glyph(id.with_scale_and_position(px, point(caret, baseline))) {
            let b = outline.px_bounds();
            outline.draw(|gx, gy, cov| {
                let (px_, py) = (b.min.x as i64 + gx as i64, b.min.y as i64 + gy as i64);
                if px_ < 0 || py < 0 || px_ >= w as i64 || py >= h {
                    return;
                }
                let i = ((py * w as i64 + px_) * 3) as usize;
                let a = cov.clamp(0.0, 1.0);
                for ch in 0..3 {
                    buf[i + ch] = ((1.0 - a) * buf[i + ch] as f32 + a * color[ch] as f32).round() as u8;
                }
            });
        }
        caret += f.h_advance(id);
        prev = Some(id);
    }
}

/// matplotlib's tab10, then the light tab20 shades: distinct colours for up to 20 clusters.
const PALETTE: [[u8; 3]; 20] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
    [174, 199, 232],
    [255, 187, 120],
    [152, 223, 138],
    [255, 152, 150],
    [197, 176, 213],
    [196, 156, 148],
    [247, 182, 210],
    [199, 199, 199],
    [219, 219, 141],
    [158, 218, 229],
];

/// Colour of cluster `label`; past the palette, hues spaced by the golden angle.
pub fn color(label: u32) -> [u8; 3] {
    if let Some(c) = PALETTE.get(label as usize) {
        return *c;
    }
    let h = (label as f64 * 137.507_764) % 360.0;
    let (s, v) = (0.65, 0.85);
    let c = v * s;
    let x = c * (1.0 - ((h / 60.0) % 2.0 - 1.0).abs());
    let (r, g, b) = match (h / 60.0) as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = v - c;
    [((r + m) * 255.0) as u8, ((g + m) * 255.0) as u8, ((b + m) * 255.0) as u8]
}

pub fn color_hex(label: u32) -> String {
    let [r, g, b] = color(label);
    format!("#{r:02x}{g:02x}{b:02x}")
}

/// What one figure shows.
pub struct FigureInput<'a> {
    /// The model's input (square).
    pub image: &'a RgbImage,
    /// Side of the patch grid.
    pub grid: usize,
    pub levels: &'a [usize],
    /// Row-major labels of the grid, one vector per level.
    pub labels: &'a [Vec<u32>],
    /// Labels that colour the scatter (the finest level).
    pub scatter_labels: &'a [u32],
    pub embedding: &'a [[f32; 2]],
    pub header: String,
    pub tsne_title: String,
    /// Opacity of the cluster colours over the image.
    pub alpha: f32,
    /// Side of each panel in pixels; rounded to a multiple of the grid so that blocks are whole pixels.
    pub panel: u32,
}

const MARGIN: u32 = 10;
const GAP: u32 = 10;
const HEADER_H: u32 = 24;
const TITLE_H: u32 = 24;

/// Side of a panel: `panel` rounded to a multiple of the grid side.
pub fn panel_side(panel: u32, grid: usize) -> u32 {
    let g = grid.max(1) as u32;
    ((panel + g / 2) / g).max(1) * g
}

/// Width and height of the figure.
pub fn figure_size(panel: u32, grid: usize, levels: usize) -> (u32, u32) {
    let p = panel_side(panel, grid);
    let count = levels as u32 + 2;
    (2 * MARGIN + count * p + (count - 1) * GAP, MARGIN + HEADER_H + TITLE_H + p + MARGIN)
}

/// Renders the figure as an RGB image.
pub fn render(f: &FigureInput) -> Result<RgbImage> {
    let p = panel_side(f.panel, f.grid);
    let (w, h) = figure_size(f.panel, f.grid, f.levels.len());
    let shown = resize_shorter(f.image, p, Interp::Bicubic).map_err(|e| Error::option("--panel", e))?;
    let mut buf = vec![255u8; (w * h * 3) as usize];
    let top = MARGIN + HEADER_H + TITLE_H;
    let x_of = |i: u32| MARGIN + i * (p + GAP);

    blit(&mut buf, w, &shown, x_of(0), top);
    for (i, labels) in f.labels.iter().enumerate() {
        let over = overlay(&shown, f.grid, labels, f.alpha);
        blit(&mut buf, w, &over, x_of(i as u32 + 1), top);
    }

    let sx = x_of(f.levels.len() as u32 + 1);
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        scatter(&root, (sx, top), p, f.embedding, f.scatter_labels)
            .and_then(|_| root.present().map_err(|e| e.to_string()))
            .map_err(|e| Error::option("figure", format!("drawing the t-SNE scatter failed: {e}")))?;
    }
    draw_text(&mut buf, w, &f.header, MARGIN as f32, (MARGIN + 2) as f32, 15.0, [40, 40, 40]);
    let mut titles = vec![format!("input {}\u{d7}{}", f.image.width, f.image.height)];
    titles.extend(f.levels.iter().map(|k| format!("k = {k}")));
    titles.push(f.tsne_title.clone());
    for (i, t) in titles.iter().enumerate() {
        let cx = (x_of(i as u32) + p / 2) as f32;
        draw_text(&mut buf, w, t, cx - text_width(t, 16.0) / 2.0, (MARGIN + HEADER_H + 2) as f32, 16.0, [0, 0, 0]);
    }
    Ok(RgbImage { width: w, height: h, data: buf })
}

fn blit(buf: &mut [u8], w: u32, img: &RgbImage, x0: u32, y0: u32) {
    let row = img.width as usize * 3;
    for y in 0..img.height as usize {
        let d = ((y0 as usize + y) * w as usize + x0 as usize) * 3;
        buf[d..d + row].copy_from_slice(&img.data[y * row..(y + 1) * row]);
    }
}

/// Cluster colours over the image; the label grid is upsampled by nearest neighbour, so blocks follow patches.
pub fn overlay(img: &RgbImage, grid: usize, labels: &[u32], alpha: f32) -> RgbImage {
    let (w, h) = (img.width as usize, img.height as usize);
    let mut out = img.clone();
    for y in 0..h {
        let gy = y * grid / h;
        for x in 0..w {
            let gx = x * grid / w;
            let c = color(labels[gy * grid + gx]);
            let i = (y * w + x) * 3;
            for (ch, cv) in c.iter().enumerate() {
                let v = (1.0 - alpha) * img.data[i + ch] as f32 + alpha * *cv as f32;
                out.data[i + ch] = v.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    out
}

fn scatter<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    (x0, y0): (u32, u32),
    side: u32,
    points: &[[f32; 2]],
    labels: &[u32],
) -> std::result::Result<(), String> {
    let area = root.clone().shrink((x0, y0), (side, side));
    let e = |err: DrawingAreaErrorKind<DB::ErrorType>| err.to_string();
    area.draw(&Rectangle::new([(0, 0), (side as i32 - 1, side as i32 - 1)], RGBColor(160, 160, 160).stroke_width(1)))
        .map_err(e)?;
    let (mut lo, mut hi) = ([f32::INFINITY; 2], [f32::NEG_INFINITY; 2]);
    for q in points {
        for a in 0..2 {
            lo[a] = lo[a].min(q[a]);
            hi[a] = hi[a].max(q[a]);
        }
    }
    // One scale for both axes keeps the embedding's shape; 6 % padding keeps points off the frame.
    let span = (hi[0] - lo[0]).max(hi[1] - lo[1]).max(1e-12);
    let inner = side as f32 * 0.88;
    let off = [
        (side as f32 - inner * (hi[0] - lo[0]) / span) / 2.0,
        (side as f32 - inner * (hi[1] - lo[1]) / span) / 2.0,
    ];
    let r = ((side as f64 / (points.len() as f64).sqrt()) / 4.0).clamp(1.5, 5.0) as i32;
    for (q, &l) in points.iter().zip(labels) {
        let px = (off[0] + (q[0] - lo[0]) / span * inner) as i32;
        // Image rows grow downwards; flip so that +y is up, as in a plot.
        let py = side as i32 - 1 - (off[1] + (q[1] - lo[1]) / span * inner) as i32;
        let [cr, cg, cb] = color(l);
        area.draw(&Circle::new((px, py), r, RGBColor(cr, cg, cb).filled())).map_err(e)?;
    }
    Ok(())
}

/// Encodes an RGB image as PNG at the highest compression.
pub fn encode_png(img: &RgbImage) -> Result<Vec<u8>> {
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    use image::ImageEncoder;
    let mut out = Vec::new();
    PngEncoder::new_with_quality(&mut out, CompressionType::Best, FilterType::Adaptive)
        .write_image(&img.data, img.width, img.height, image::ExtendedColorType::Rgb8)
        .map_err(|e| Error::option("figure", format!("PNG encoding failed: {e}")))?;
    Ok(out)
}
