//! Transforms against torchvision + PIL on the same files, and RandomResizedCrop's box statistics.
mod common;

use std::path::Path;

use lmim_bench::data::transforms::{crop_resize, random_resized_crop_params, to_tensor_normalize};
use lmim_bench::data::{load_rgb, sample_rng, Interp, Transform, IMAGENET_STD};

fn read_f32(p: &Path) -> Vec<f32> {
    std::fs::read(p).unwrap().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

/// Mean |a - b| in 0..1 pixel units (normalised values times std).
fn mad_pixels(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let plane = a.len() / 3;
    let s: f64 = a.iter().zip(b).enumerate().map(|(i, (x, y))| ((x - y).abs() * IMAGENET_STD[i / plane]) as f64).sum();
    s / a.len() as f64
}

#[test]
fn parity_with_torchvision_pil() {
    let dir = tempfile::tempdir().unwrap();
    common::run_py("ref_transforms.py", &[dir.path().to_str().unwrap()]);
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("manifest.json")).unwrap()).unwrap();
    let eval = Transform::eval(256, 224);
    let mut report = Vec::new();
    let mut worst: f64 = 0.0;
    for item in m["images"].as_array().unwrap() {
        let name = item["name"].as_str().unwrap();
        let img = load_rgb(&dir.path().join(item["file"].as_str().unwrap())).unwrap();
        assert_eq!(
            (img.width as u64, img.height as u64),
            (item["width"].as_u64().unwrap(), item["height"].as_u64().unwrap())
        );
        // The decoder alone, against PIL (libjpeg-turbo).
        let pil = std::fs::read(dir.path().join(item["rgb"].as_str().unwrap())).unwrap();
        let dec: f64 = img.data.iter().zip(&pil).map(|(&a, &b)| (a as f64 - b as f64).abs()).sum::<f64>()
            / pil.len() as f64
            / 255.0;
        assert!(dec <= 1.0 / 255.0, "{name}: decoded pixels differ from PIL by {:.3}/255 on average", dec * 255.0);

        let mut out = vec![0f32; 3 * 224 * 224];
        eval.apply(img.clone(), &mut sample_rng(0, 0, 0), &mut out).unwrap();
        let reference = read_f32(&dir.path().join(item["eval"].as_str().unwrap()));
        let d = mad_pixels(&out, &reference);
        report.push(format!("{name}: decode {:.3}/255, eval {:.3}/255", dec * 255.0, d * 255.0));
        worst = worst.max(d);
        assert!(d <= 1.0 / 255.0, "{name}: eval transform differs from torchvision by {:.3}/255", d * 255.0);

        for c in item["crops"].as_array().unwrap() {
            let g = |k: &str| c[k].as_u64().unwrap() as u32;
            let r =
                crop_resize(&img, g("top"), g("left"), g("height"), g("width"), (224, 224), Interp::Bicubic).unwrap();
            let mut out = vec![0f32; 3 * 224 * 224];
            to_tensor_normalize(&r, eval.mean, eval.std, &mut out);
            let reference = read_f32(&dir.path().join(c["file"].as_str().unwrap()));
            let d = mad_pixels(&out, &reference);
            report.push(format!("  {name} crop {}: {:.3}/255", c["file"], d * 255.0));
            worst = worst.max(d);
            assert!(d <= 1.0 / 255.0, "{name} {c}: resized_crop differs from torchvision by {:.3}/255", d * 255.0);
        }
    }
    eprintln!("{}\nworst {:.3}/255", report.join("\n"), worst * 255.0);
}

#[test]
fn random_resized_crop_boxes_in_bounds_and_deterministic() {
    let (scale, ratio) = ((0.08, 1.0), (3.0 / 4.0, 4.0 / 3.0));
    for &(w, h) in &[(500u32, 375u32), (375, 500), (224, 224), (1000, 100), (30, 900), (1, 1)] {
        let area = (w * h) as f64;
        let mut areas = Vec::new();
        for i in 0..2000 {
            let b = random_resized_crop_params(w, h, scale, ratio, &mut sample_rng(7, 3, i));
            assert!(b.width >= 1 && b.height >= 1, "{w}x{h}: empty box {b:?}");
            assert!(b.left + b.width <= w && b.top + b.height <= h, "{w}x{h}: box {b:?} outside the image");
            let a = (b.width * b.height) as f64 / area;
            let r = b.width as f64 / b.height as f64;
            // Rounding to whole pixels moves area and ratio a little; tiny images fall back to the central crop.
            if w >= 100 && h >= 100 {
                assert!(a <= 1.0 + 1e-9 && a >= scale.0 * 0.9, "{w}x{h}: area fraction {a} outside {scale:?}");
                assert!(r >= ratio.0 * 0.95 && r <= ratio.1 * 1.05, "{w}x{h}: aspect {r} outside {ratio:?} ({b:?})");
            }
            areas.push(a);
            // Same (seed, epoch, index): same box.
            assert_eq!(b, random_resized_crop_params(w, h, scale, ratio, &mut sample_rng(7, 3, i)));
        }
        if (w, h) == (500, 375) {
            // Area fractions are uniform in scale: the mean is about (0.08 + 1) / 2 (fewer large ones fit).
            let mean = areas.iter().sum::<f64>() / areas.len() as f64;
            assert!((0.40..0.56).contains(&mean), "mean area fraction {mean}");
            let distinct: std::collections::HashSet<_> =
                (0..50).map(|i| random_resized_crop_params(w, h, scale, ratio, &mut sample_rng(7, 3, i))).collect();
            assert!(distinct.len() > 45, "boxes are not random");
        }
    }
    // A different seed or epoch gives different boxes.
    let a: Vec<_> =
        (0..20).map(|i| random_resized_crop_params(500, 375, scale, ratio, &mut sample_rng(1, 0, i))).collect();
    let b: Vec<_> =
        (0..20).map(|i| random_resized_crop_params(500, 375, scale, ratio, &mut sample_rng(2, 0, i))).collect();
    let c: Vec<_> =
        (0..20).map(|i| random_resized_crop_params(500, 375, scale, ratio, &mut sample_rng(1, 1, i))).collect();
    assert_ne!(a, b);
    assert_ne!(a, c);
}

#[test]
fn central_fallback_follows_torchvision() {
    // A 1000x10 strip: no box of ratio <= 4/3 with area >= 8% fits in 10 tries... the fallback is the central
    // crop of ratio 4/3: h = 10, w = round(10 * 4/3) = 13, left = (1000 - 13) // 2.
    let mut seen_fallback = false;
    for i in 0..200 {
        let b = random_resized_crop_params(1000, 10, (0.9, 1.0), (3.0 / 4.0, 4.0 / 3.0), &mut sample_rng(0, 0, i));
        assert_eq!(b.height, 10);
        if b.width == 13 && b.left == 493 && b.top == 0 {
            seen_fallback = true;
        }
    }
    assert!(seen_fallback);
}

#[test]
fn train_transform_shapes_and_flip() {
    let mut img = lmim_bench::data::RgbImage::new(64, 48);
    for (i, v) in img.data.iter_mut().enumerate() {
        *v = ((i / 3) % 64 * 4) as u8; // a horizontal ramp
    }
    // p = 1 flips always: the ramp reverses.
    let t = Transform {
        ops: vec![
            lmim_bench::data::Op::RandomHorizontalFlip { p: 1.0 },
            lmim_bench::data::Op::CenterCrop { size: (48, 64) },
        ],
        ..Transform::eval(256, 224)
    };
    let out = t.apply_u8(img.clone(), &mut sample_rng(0, 0, 0)).unwrap();
    assert_eq!(out.data[0], 252);
    assert_eq!(out.data[63 * 3], 0);
    let tr = Transform::train(32, 0.2);
    assert_eq!(tr.validate().unwrap(), (32, 32));
    let mut o = vec![0f32; 3 * 32 * 32];
    tr.apply(img.clone(), &mut sample_rng(5, 1, 2), &mut o).unwrap();
    let mut o2 = vec![0f32; 3 * 32 * 32];
    tr.apply(img, &mut sample_rng(5, 1, 2), &mut o2).unwrap();
    assert_eq!(o, o2);
    assert!(Transform { ops: vec![], ..Transform::eval(256, 224) }.validate().is_err());
}

/// MAE's linear-probe crop (util/crop.py): one draw, no retries, width and height clamped to the image. The sizes
/// equal MAE's rule on the same uniform draws, and boxes always lie inside the image.
#[test]
fn mae_single_draw_crop_matches_reference() {
    use lmim_bench::data::transforms::{crop_once_size, random_resized_crop_once_params};
    let py = common::python();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/ref_mae_crop.py");
    let out = std::process::Command::new(py).arg(script).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<(u32, u32, f64, f64, u32, u32)> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.len(), 100);
    for (w, h, ua, ur, eh, ew) in rows {
        let got = crop_once_size(w, h, (0.08, 1.0), (0.75, 4.0 / 3.0), ua, ur);
        assert_eq!(got, (eh, ew), "{w}x{h} draws ({ua}, {ur})");
    }
    let mut rng = sample_rng(0, 0, 0);
    for _ in 0..500 {
        let b = random_resized_crop_once_params(40, 300, (0.08, 1.0), (0.75, 4.0 / 3.0), &mut rng);
        assert!(b.width >= 1 && b.height >= 1 && b.left + b.width <= 40 && b.top + b.height <= 300, "{b:?}");
    }
}
