//! `lmim-bench data synth`: a generated ImageFolder of JPEGs of any size and class count, for throughput tests and
//! ImageNet-shaped smoke runs. Each class has its own colours, gradient direction and shape; positions, sizes and
//! noise vary per image. Everything is a function of the seed.
use std::path::{Path, PathBuf};

use rand::Rng;
use rayon::prelude::*;

use super::fmnist::{encode_jpeg, read_manifest, write_tree, Manifest};
use super::loader::sample_rng;
use crate::error::{Error, Result};

#[derive(Clone, Debug)]
pub struct SynthOptions {
    pub out: PathBuf,
    pub classes: usize,
    pub train_per_class: usize,
    pub val_per_class: usize,
    pub width: u32,
    pub height: u32,
    pub seed: u64,
    pub quality: u8,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct SynthReport {
    pub out: PathBuf,
    pub train_images: usize,
    pub val_images: usize,
    pub reused: bool,
}

pub fn class_name(c: usize, classes: usize) -> String {
    let digits = classes.saturating_sub(1).max(1).to_string().len().max(3);
    format!("class_{c:0digits$}")
}

fn hsv(h: f32, s: f32, v: f32) -> [f32; 3] {
    let h6 = (h.fract() * 6.0).max(0.0);
    let i = h6.floor() as i32;
    let f = h6 - i as f32;
    let (p, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
    match i % 6 {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    }
}

/// One RGB image of class `c`, drawn with `rng`.
pub fn render(c: usize, classes: usize, w: u32, h: u32, rng: &mut impl Rng) -> Vec<u8> {
    let hue = c as f32 / classes.max(1) as f32;
    let bg0 = hsv(hue, 0.6, 0.9);
    let bg1 = hsv(hue + 0.5, 0.5, 0.3);
    let fg = hsv(hue + 0.25 + rng.gen_range(-0.03..0.03), 0.8, rng.gen_range(0.6..1.0));
    let angle = (c as f32 * 2.399) + rng.gen_range(-0.2..0.2);
    let (ca, sa) = (angle.cos(), angle.sin());
    let shape = c % 4;
    let (wf, hf) = (w as f32, h as f32);
    let r = rng.gen_range(0.15..0.35) * wf.min(hf);
    let cx = rng.gen_range(r..(wf - r).max(r + 1.0));
    let cy = rng.gen_range(r..(hf - r).max(r + 1.0));
    let noise = rng.gen_range(8.0..24.0f32);
    let mut px = vec![0u8; w as usize * h as usize * 3];
    for y in 0..h {
        for x in 0..w {
            let (xf, yf) = (x as f32, y as f32);
            let t = (((xf / wf - 0.5) * ca + (yf / hf - 0.5) * sa) + 0.5).clamp(0.0, 1.0);
            let (dx, dy) = (xf - cx, yf - cy);
            let inside = match shape {
                0 => dx * dx + dy * dy < r * r,
                1 => dx.abs() < r && dy.abs() < r,
                2 => dy > -r && dy < r && dx.abs() < (r - dy) * 0.5,
                _ => dx.abs() < r && dy.abs() < r && ((xf / (r * 0.25)) as i32) % 2 == 0,
            };
            let i = (y as usize * w as usize + x as usize) * 3;
            for k in 0..3 {
                let base = if inside { fg[k] } else { bg0[k] * (1.0 - t) + bg1[k] * t };
                let v = base * 255.0 + rng.gen_range(-noise..noise);
                px[i + k] = v.clamp(0.0, 255.0) as u8;
            }
        }
    }
    px
}

pub fn synth(opts: &SynthOptions) -> Result<SynthReport> {
    if opts.classes == 0 || opts.width < 8 || opts.height < 8 || opts.train_per_class + opts.val_per_class == 0 {
        return Err(Error::option("synth", "needs classes >= 1, size >= 8 and at least one image per class"));
    }
    let options = serde_json::json!({
        "classes": opts.classes, "train_per_class": opts.train_per_class, "val_per_class": opts.val_per_class,
        "width": opts.width, "height": opts.height, "seed": opts.seed, "jpeg_quality": opts.quality,
    });
    let (nt, nv) = (opts.classes * opts.train_per_class, opts.classes * opts.val_per_class);
    if let Some(m) = read_manifest(&opts.out) {
        if m.kind == "synth" && m.options == options {
            return Ok(SynthReport { out: opts.out.clone(), train_images: nt, val_images: nv, reused: true });
        }
    }
    let classes: Vec<String> = (0..opts.classes).map(|c| class_name(c, opts.classes)).collect();
    let manifest = Manifest {
        kind: "synth".into(),
        version: 1,
        options,
        train_images: nt,
        val_images: nv,
        classes: classes.clone(),
    };
    write_tree(&opts.out, &manifest, |tmp: &Path| {
        for (si, (split, per)) in [("train", opts.train_per_class), ("val", opts.val_per_class)].into_iter().enumerate()
        {
            if per == 0 {
                continue;
            }
            for name in &classes {
                let d = tmp.join(split).join(name);
                std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
            }
            (0..opts.classes * per).into_par_iter().try_for_each(|i| {
                let (c, j) = (i / per, i % per);
                let mut rng = sample_rng(opts.seed, si as u64, i);
                let px = render(c, opts.classes, opts.width, opts.height, &mut rng);
                let jpg = encode_jpeg(&px, opts.width, opts.height, false, opts.quality)?;
                let p = tmp.join(split).join(&classes[c]).join(format!("{j:06}.jpg"));
                std::fs::write(&p, jpg).map_err(|e| Error::io(&p, e))
            })?;
        }
        Ok(())
    })?;
    Ok(SynthReport { out: opts.out.clone(), train_images: nt, val_images: nv, reused: false })
}
