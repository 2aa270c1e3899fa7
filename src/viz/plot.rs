//! `lmim-bench plot`: training curves from runs' `metrics.jsonl` (one panel per quantity, one line per run), and
//! a bar chart of NN / k-NN / LP / Ft per model from results records beside the published rows.
//!
//! plotters draws lines, bars and grids in pixel coordinates; text goes through `figure`'s embedded font, as
//! in the `visualize` figures (plotters is built without a font back-end).
use crate::protocols::Protocol;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use super::figure::{color, draw_text, text_width};
use crate::data::decode::RgbImage;
use crate::error::{Error, Result};
use crate::results::table::Table;

/// The quantities drawn, in panel order, when any run logs them: loss, learning rate, then the monitors of
/// Latent MIM pretraining (similarities, target spread) and of the evaluations (top-1 %).
pub const PANELS: &[&str] = &["loss", "lr", "avg_sim_pred", "avg_sim_vis", "avg_sim_trg", "target_std", "val_top1", "nn_top1"];

/// The curves of one run.
#[derive(Debug, Clone)]
pub struct Run {
    /// Legend label: the path as given, without a trailing `metrics.jsonl`.
    pub label: String,
    pub file: PathBuf,
    /// What the x axis counts: `step` when every line has one, else `epoch`, else `line` (the line number).
    pub x_key: &'static str,
    /// Quantity -> (x, y), in file order; only the quantities of `PANELS`.
    pub series: BTreeMap<String, Vec<(f64, f64)>>,
}

/// The metrics file of a run: `<dir>/metrics.jsonl` for a folder, the path itself for a file.
pub fn metrics_file(path: &Path) -> Result<PathBuf> {
    if path.is_dir() {
        let f = path.join("metrics.jsonl");
        if !f.is_file() {
            return Err(Error::data(&f, "no metrics file in this run folder (expected metrics.jsonl)"));
        }
        Ok(f)
    } else if path.exists() {
        Ok(path.to_path_buf())
    } else {
        Err(Error::data(path, "no such run folder or metrics file"))
    }
}

/// Reads a run's JSON lines; a line that is empty or not a JSON object is an error naming the file and line.
pub fn load_run(path: &Path) -> Result<Run> {
    let file = metrics_file(path)?;
    let text = crate::fsutil::read_regular_text(&file, None)?;
    let mut lines = Vec::new();
    for (i, l) in text.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(l).map_err(|e| Error::data(&file, format!("line {}: not JSON: {e}", i + 1)))?;
        match v {
            serde_json::Value::Object(m) => lines.push(m),
            _ => return Err(Error::data(&file, format!("line {}: not a JSON object", i + 1))),
        }
    }
    if lines.is_empty() {
        return Err(Error::data(&file, "no metric lines"));
    }
    let all = |k: &str| lines.iter().all(|m| m.get(k).is_some_and(|v| v.is_number()));
    let x_key = if all("step") { "step" } else if all("epoch") { "epoch" } else { "line" };
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for (i, m) in lines.iter().enumerate() {
        let x = m.get(x_key).and_then(|v| v.as_f64()).unwrap_or((i + 1) as f64);
        for key in PANELS {
            if let Some(y) = m.get(*key).and_then(|v| v.as_f64()).filter(|y| y.is_finite()) {
                series.entry(key.to_string()).or_default().push((x, y));
            }
        }
    }
    if series.is_empty() {
        return Err(Error::data(&file, format!("none of {} in any line", PANELS.join(", "))));
    }
    let shown = path.display().to_string();
    let label = if path.is_dir() { shown.trim_end_matches('/').to_string() } else { shown.trim_end_matches(".jsonl").to_string() };
    let label = label.strip_suffix("/metrics").map(str::to_string).unwrap_or(label);
    Ok(Run { label, file, x_key, series })
}

const MARGIN: u32 = 12;
const TITLE_H: u32 = 26;
const LEGEND_ROW: u32 = 18;
const PANEL_W: u32 = 440;
const PANEL_H: u32 = 290;
const GAP: u32 = 16;
/// Inside a panel: its title above, y tick labels left, x tick labels and the axis name below.
const PANEL_TOP: u32 = 22;
const PANEL_LEFT: u32 = 64;
const PANEL_BOTTOM: u32 = 36;
const PANEL_RIGHT: u32 = 12;

const INK: [u8; 3] = [30, 30, 30];
const MUTED: [u8; 3] = [90, 90, 90];
const GRID: RGBColor = RGBColor(225, 225, 225);
const FRAME: RGBColor = RGBColor(150, 150, 150);

fn columns(panels: usize) -> u32 {
    match panels {
        0 | 1 => 1,
        2 | 4 => 2,
        _ => 3,
    }
}

/// Width and height of the curves figure for `panels` panels and `runs` runs (one legend row each).
pub fn curves_size(panels: usize, runs: usize) -> (u32, u32) {
    let cols = columns(panels);
    let rows = (panels as u32).div_ceil(cols).max(1);
    let w = 2 * MARGIN + cols * PANEL_W + (cols - 1) * GAP;
    let h = MARGIN + TITLE_H + runs as u32 * LEGEND_ROW + GAP / 2 + rows * PANEL_H + (rows - 1) * GAP + MARGIN;
    (w, h)
}

/// The panels the runs have data for, in `PANELS` order.
pub fn panels_of(runs: &[Run]) -> Vec<&'static str> {
    PANELS.iter().copied().filter(|k| runs.iter().any(|r| r.series.contains_key(*k))).collect()
}

/// Round tick values (1, 2 or 5 times a power of ten apart, the spacing closest to `n` ticks) inside [lo, hi],
/// and their spacing.
pub fn nice_ticks(lo: f64, hi: f64, n: usize) -> (Vec<f64>, f64) {
    let span = (hi - lo).abs().max(f64::MIN_POSITIVE);
    let raw = span / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let count = |s: f64| (span / s - n as f64).abs();
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).min_by(|a, b| count(*a).total_cmp(&count(*b))).unwrap_or(mag);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    ((first..=last).map(|i| i as f64 * step).collect(), step)
}

/// A tick label: scientific for very small or large values (learning rates), else as many decimals as the
/// spacing needs.
fn tick_label(v: f64, step: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs().max(step.abs());
    if a < 1e-2 || a >= 1e6 {
        let s = format!("{v:.1e}");
        return s.replace(".0e", "e");
    }
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    format!("{v:.decimals$}")
}

/// Range with a margin, widened when flat so that a constant curve sits mid-panel.
fn padded(lo: f64, hi: f64, frac: f64) -> (f64, f64) {
    if hi - lo <= f64::EPSILON * hi.abs().max(1.0) {
        let d = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        return (lo - d, hi + d);
    }
    let d = (hi - lo) * frac;
    (lo - d, hi + d)
}

struct Text {
    s: String,
    x: f32,
    top: f32,
    px: f32,
    color: [u8; 3],
}

fn text(s: impl Into<String>, x: f32, top: f32, px: f32, color: [u8; 3]) -> Text {
    Text { s: s.into(), x, top, px, color }
}

fn draw_err<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> Error {
    Error::option("figure", format!("drawing failed: {e}"))
}

/// Renders the curves of `runs`: one panel per quantity of `PANELS` that any run has, one line per run.
pub fn render_curves(runs: &[Run]) -> Result<RgbImage> {
    let panels = panels_of(runs);
    if panels.is_empty() {
        return Err(Error::option("RUN_DIR", "the runs have no quantity to plot"));
    }
    let (w, h) = curves_size(panels.len(), runs.len());
    let cols = columns(panels.len());
    let mut buf = vec![255u8; (w * h * 3) as usize];
    let mut texts = vec![text("training curves", MARGIN as f32, MARGIN as f32, 17.0, INK)];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        let legend_top = MARGIN + TITLE_H;
        for (i, r) in runs.iter().enumerate() {
            let y = (legend_top + i as u32 * LEGEND_ROW) as i32;
            let [cr, cg, cb] = color(i as u32);
            root.draw(&Rectangle::new([(MARGIN as i32, y + 6), (MARGIN as i32 + 24, y + 9)], RGBColor(cr, cg, cb).filled())).map_err(draw_err)?;
            texts.push(text(format!("{}  ({} lines, x: {})", r.label, r.series.values().map(Vec::len).max().unwrap_or(0), r.x_key), (MARGIN + 32) as f32, y as f32, 13.0, INK));
        }
        let grid_top = legend_top + runs.len() as u32 * LEGEND_ROW + GAP / 2;
        for (p, key) in panels.iter().enumerate() {
            let (c, r) = (p as u32 % cols, p as u32 / cols);
            let x0 = MARGIN + c * (PANEL_W + GAP);
            let y0 = grid_top + r * (PANEL_H + GAP);
            panel(&root, &mut texts, runs, key, (x0, y0))?;
        }
        root.present().map_err(draw_err)?;
    }
    for t in &texts {
        draw_text(&mut buf, w, &t.s, t.x, t.top, t.px, t.color);
    }
    Ok(RgbImage { width: w, height: h, data: buf })
}

fn panel<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    texts: &mut Vec<Text>,
    runs: &[Run],
    key: &str,
    (x0, y0): (u32, u32),
) -> Result<()> {
    let (left, top) = ((x0 + PANEL_LEFT) as i32, (y0 + PANEL_TOP) as i32);
    let (right, bottom) = ((x0 + PANEL_W - PANEL_RIGHT) as i32, (y0 + PANEL_H - PANEL_BOTTOM) as i32);
    let (mut xl, mut xh, mut yl, mut yh) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for r in runs {
        for &(x, y) in r.series.get(key).into_iter().flatten() {
            xl = xl.min(x);
            xh = xh.max(x);
            yl = yl.min(y);
            yh = yh.max(y);
        }
    }
    let (xl, xh) = if xh > xl { (xl, xh) } else { padded(xl, xh, 0.0) };
    let (yl, yh) = padded(yl, yh, 0.05);
    let px = |x: f64| left + ((x - xl) / (xh - xl) * (right - left) as f64).round() as i32;
    let py = |y: f64| bottom - ((y - yl) / (yh - yl) * (bottom - top) as f64).round() as i32;

    let (yt, ys) = nice_ticks(yl, yh, 5);
    for v in &yt {
        let y = py(*v);
        root.draw(&PathElement::new(vec![(left, y), (right, y)], GRID)).map_err(draw_err)?;
        let label = tick_label(*v, ys);
        texts.push(text(label.clone(), left as f32 - 6.0 - text_width(&label, 11.0), y as f32 - 7.0, 11.0, MUTED));
    }
    let (xt, xs) = nice_ticks(xl, xh, 5);
    for v in &xt {
        let x = px(*v);
        root.draw(&PathElement::new(vec![(x, top), (x, bottom)], GRID)).map_err(draw_err)?;
        let label = tick_label(*v, xs);
        texts.push(text(label.clone(), x as f32 - text_width(&label, 11.0) / 2.0, bottom as f32 + 4.0, 11.0, MUTED));
    }
    root.draw(&Rectangle::new([(left, top), (right, bottom)], FRAME.stroke_width(1))).map_err(draw_err)?;

    let mut x_keys: Vec<&str> = runs.iter().filter(|r| r.series.contains_key(key)).map(|r| r.x_key).collect();
    x_keys.dedup();
    let x_name = x_keys.join(" / ");
    texts.push(text(x_name.clone(), (left + right) as f32 / 2.0 - text_width(&x_name, 12.0) / 2.0, bottom as f32 + 19.0, 12.0, MUTED));
    texts.push(text(key, x0 as f32 + PANEL_LEFT as f32, y0 as f32 + 2.0, 14.0, INK));

    for (i, r) in runs.iter().enumerate() {
        let Some(points) = r.series.get(key) else { continue };
        let [cr, cg, cb] = color(i as u32);
        let style = RGBColor(cr, cg, cb);
        let path: Vec<(i32, i32)> = points.iter().map(|&(x, y)| (px(x), py(y))).collect();
        if path.len() == 1 {
            root.draw(&Circle::new(path[0], 3, style.filled())).map_err(draw_err)?;
        } else {
            root.draw(&PathElement::new(path, style.stroke_width(2))).map_err(draw_err)?;
        }
    }
    Ok(())
}

/// The protocols of the bar chart: the table's always-shown columns, labelled as there.
pub const BAR_PROTOCOLS: [Protocol; 4] = [Protocol::NnLoo, Protocol::Knn, Protocol::Linear, Protocol::Finetune];

const BAR_H: u32 = 11;
const BAR_GAP: u32 = 2;
const BLOCK_GAP: u32 = 12;
const SECTION_H: u32 = 24;
const CHART_W: u32 = 520;
const AXIS_H: u32 = 24;
const VALUE_W: u32 = 44;

/// Models in chart order: the runs, then the reference rows.
fn bar_sections(table: &Table) -> Vec<(String, Vec<&crate::results::table::Row>)> {
    let mut out = Vec::new();
    for (kind, name) in [("run", "runs"), ("reference", "published")] {
        let rows: Vec<_> = table.rows.iter().filter(|r| r.kind == kind && BAR_PROTOCOLS.iter().any(|p| r.cells.contains_key(p.name()))).collect();
        if rows.is_empty() {
            continue;
        }
        let mut sets: Vec<String> = rows.iter().filter_map(|r| r.dataset.clone()).collect();
        sets.sort();
        sets.dedup();
        let title = if sets.is_empty() { name.to_string() } else { format!("{name} ({})", sets.join(", ")) };
        out.push((title, rows));
    }
    out
}

/// Renders top-1 % per model as horizontal bars, four per model (NN, k-NN, LP, Ft); published rows are drawn
/// in lighter shades below the runs.
pub fn render_bars(table: &Table) -> Result<RgbImage> {
    let sections = bar_sections(table);
    if sections.is_empty() {
        return Err(Error::option("--results", "no NN, k-NN, LP or Ft result to draw"));
    }
    let label_w = sections.iter().flat_map(|(_, rows)| rows.iter()).map(|r| text_width(&r.model, 13.0)).fold(120.0f32, f32::max) as u32 + 16;
    let block = BAR_PROTOCOLS.len() as u32 * (BAR_H + BAR_GAP) + BLOCK_GAP;
    let models: u32 = sections.iter().map(|(_, r)| r.len() as u32).sum();
    let w = 2 * MARGIN + label_w + CHART_W + VALUE_W;
    let h = MARGIN + TITLE_H + LEGEND_ROW + GAP / 2 + sections.len() as u32 * SECTION_H + models * block + AXIS_H + MARGIN;
    let vmax = sections.iter().flat_map(|(_, rows)| rows.iter()).flat_map(|r| r.cells.values()).map(|c| c.value).fold(100.0f64, f64::max);
    let (ticks, tstep) = nice_ticks(0.0, vmax, 5);
    let xmax = ticks.last().copied().filter(|t| *t >= vmax).unwrap_or(vmax);
    let (left, right) = ((MARGIN + label_w) as i32, (MARGIN + label_w + CHART_W) as i32);
    let px = |v: f64| left + (v.clamp(0.0, xmax) / xmax * (right - left) as f64).round() as i32;

    let mut buf = vec![255u8; (w * h * 3) as usize];
    let mut texts = vec![text("top-1 % per model", MARGIN as f32, MARGIN as f32, 17.0, INK)];
    let chart_top = (MARGIN + TITLE_H + LEGEND_ROW + GAP / 2) as i32;
    let chart_bottom = (h - MARGIN - AXIS_H) as i32;
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        let mut lx = MARGIN as i32;
        let ly = (MARGIN + TITLE_H) as i32;
        for (i, p) in BAR_PROTOCOLS.iter().enumerate() {
            let name = p.column().0;
            let [cr, cg, cb] = color(i as u32);
            root.draw(&Rectangle::new([(lx, ly + 3), (lx + 14, ly + 13)], RGBColor(cr, cg, cb).filled())).map_err(draw_err)?;
            texts.push(text(name, (lx + 20) as f32, ly as f32, 13.0, INK));
            lx += 20 + text_width(name, 13.0) as i32 + 22;
        }
        for v in &ticks {
            let x = px(*v);
            root.draw(&PathElement::new(vec![(x, chart_top), (x, chart_bottom)], GRID)).map_err(draw_err)?;
            let label = tick_label(*v, tstep);
            texts.push(text(label.clone(), x as f32 - text_width(&label, 11.0) / 2.0, chart_bottom as f32 + 4.0, 11.0, MUTED));
        }
        let mut y = chart_top;
        for (si, (title, rows)) in sections.iter().enumerate() {
            if si > 0 {
                root.draw(&PathElement::new(vec![(MARGIN as i32, y + 2), ((w - MARGIN) as i32, y + 2)], FRAME)).map_err(draw_err)?;
            }
            texts.push(text(title.clone(), MARGIN as f32, y as f32 + 6.0, 13.0, MUTED));
            y += SECTION_H as i32;
            let light = rows.first().is_some_and(|r| r.kind == "reference");
            for r in rows {
                let block_h = BAR_PROTOCOLS.len() as i32 * (BAR_H + BAR_GAP) as i32;
                texts.push(text(r.model.clone(), MARGIN as f32, (y + block_h / 2) as f32 - 8.0, 13.0, INK));
                for (i, proto) in BAR_PROTOCOLS.iter().enumerate() {
                    let top = y + i as i32 * (BAR_H + BAR_GAP) as i32;
                    match r.cells.get(proto.name()) {
                        Some(c) => {
                            let [cr, cg, cb] = color(i as u32);
                            // Published numbers in lighter shades: another data set and model size.
                            let c3 = if light { [(cr as u16 + 255) / 2, (cg as u16 + 255) / 2, (cb as u16 + 255) / 2].map(|v| v as u8) } else { [cr, cg, cb] };
                            root.draw(&Rectangle::new([(left, top), (px(c.value).max(left + 1), top + BAR_H as i32 - 1)], RGBColor(c3[0], c3[1], c3[2]).filled()))
                                .map_err(draw_err)?;
                            let label = if light { format!("{:.1}", c.value) } else { format!("{:.2}", c.value) };
                            texts.push(text(label, (px(c.value) + 4) as f32, top as f32 - 1.0, 10.5, MUTED));
                        }
                        None => texts.push(text("\u{2013}", (left + 4) as f32, top as f32 - 1.0, 10.5, MUTED)),
                    }
                }
                y += block as i32;
            }
        }
        root.draw(&PathElement::new(vec![(left, chart_top), (left, chart_bottom)], FRAME)).map_err(draw_err)?;
        root.present().map_err(draw_err)?;
    }
    for t in &texts {
        draw_text(&mut buf, w, &t.s, t.x, t.top, t.px, t.color);
    }
    Ok(RgbImage { width: w, height: h, data: buf })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_inside() {
        let (t, s) = nice_ticks(0.0, 100.0, 5);
        assert_eq!(s, 20.0);
        assert_eq!(t, vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0]);
        let (t, s) = nice_ticks(0.00012, 0.00148, 5);
        assert!((s - 2e-4).abs() < 1e-12, "{s}");
        assert!(t.iter().all(|v| (0.00012..=0.00148).contains(v)) && t.len() >= 5);
        assert_eq!(tick_label(0.0004, 2e-4), "4e-4");
        assert_eq!(tick_label(0.75, 0.05), "0.75");
        assert_eq!(tick_label(300.0, 100.0), "300");
    }

    #[test]
    fn size_grows_with_panels_and_runs() {
        assert_eq!(curves_size(4, 2).0, curves_size(2, 2).0);
        assert!(curves_size(4, 2).1 > curves_size(2, 2).1);
        assert_eq!(curves_size(3, 3).1, curves_size(3, 2).1 + LEGEND_ROW);
    }
}
