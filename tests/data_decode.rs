//! The JPEG decoders against PIL and each other: zune-jpeg, libjpeg-turbo at full size, and libjpeg-turbo with
//! DCT scaling under RandomResizedCrop. Needs the `turbojpeg` feature (on by default).
#![cfg(feature = "turbojpeg")]
mod common;

use std::path::Path;

use lmim_bench::data::decode::{dct_scale_for_crop, decode_jpeg_turbo, decode_jpeg_zune};
use lmim_bench::data::synth::{synth, SynthOptions};
use lmim_bench::data::transforms::random_resized_crop_params;
use lmim_bench::data::{decode_image, sample_rng, Dataset, Op, Transform, IMAGENET_STD};

/// Mean and max |a - b| of two u8 buffers, in 1/255 units.
fn diff_u8(a: &[u8], b: &[u8]) -> (f64, u8) {
    assert_eq!(a.len(), b.len());
    let sum: u64 = a.iter().zip(b).map(|(&x, &y)| x.abs_diff(y) as u64).sum();
    (sum as f64 / a.len() as f64, a.iter().zip(b).map(|(&x, &y)| x.abs_diff(y)).max().unwrap_or(0))
}

/// Mean |a - b| of two normalised CHW outputs, in 1/255 pixel units.
fn mad_pixels(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let plane = a.len() / 3;
    let s: f64 = a.iter().zip(b).enumerate().map(|(i, (x, y))| ((x - y).abs() * IMAGENET_STD[i / plane]) as f64).sum();
    s / a.len() as f64 * 255.0
}

/// libjpeg-turbo at full size gives PIL's pixels: Pillow decodes with libjpeg-turbo too (islow IDCT, fancy
/// upsampling). Tolerance: a mean of 0.01/255 and a max of 1/255, for a Pillow wheel built with another
/// libjpeg-turbo 3.x release than the one turbojpeg-sys bundles. zune-jpeg stays within the 1/255 mean that
/// tests/data_transforms.rs allows it.
#[test]
fn turbojpeg_full_decode_matches_pil_and_zune() {
    let dir = tempfile::tempdir().unwrap();
    common::run_py("ref_transforms.py", &[dir.path().to_str().unwrap()]);
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("manifest.json")).unwrap()).unwrap();
    let mut report = Vec::new();
    let mut jpegs = 0;
    for item in m["images"].as_array().unwrap() {
        let name = item["name"].as_str().unwrap();
        let bytes = std::fs::read(dir.path().join(item["file"].as_str().unwrap())).unwrap();
        if !item["file"].as_str().unwrap().ends_with(".jpg") {
            continue;
        }
        jpegs += 1;
        let pil = std::fs::read(dir.path().join(item["rgb"].as_str().unwrap())).unwrap();
        let turbo = decode_jpeg_turbo(&bytes).unwrap();
        let zune = decode_jpeg_zune(&bytes).unwrap();
        assert_eq!((turbo.width, turbo.height), (zune.width, zune.height), "{name}");
        assert_eq!(decode_image(&bytes).unwrap(), turbo, "{name}: the feature's default decoder is libjpeg-turbo");
        let (tm, tx) = diff_u8(&turbo.data, &pil);
        let (zm, zx) = diff_u8(&zune.data, &pil);
        report.push(format!("{name}: turbojpeg vs PIL mean {tm:.4}/255 max {tx}; zune-jpeg vs PIL mean {zm:.4}/255 max {zx}"));
        assert!(tm <= 0.01 && tx <= 1, "{name}: libjpeg-turbo differs from PIL by mean {tm:.4}/255, max {tx}/255");
        assert!(zm <= 1.0, "{name}: zune-jpeg differs from PIL by mean {zm:.4}/255");
    }
    assert_eq!(jpegs, 5);
    eprintln!("{}", report.join("\n"));
}

/// CMYK JPEGs (ImageNet has a few) are left to zune-jpeg: libjpeg-turbo does not convert CMYK to RGB.
#[test]
fn cmyk_jpeg_falls_back_to_zune() {
    let (w, h) = (40, 24);
    let px: Vec<u8> = (0..w * h * 4).map(|i| (i * 7 % 251) as u8).collect();
    let img = turbojpeg::Image { pixels: &px[..], width: w, pitch: 4 * w, height: h, format: turbojpeg::PixelFormat::CMYK };
    let jpg = turbojpeg::compress(img, 90, turbojpeg::Subsamp::None).unwrap();
    let turbo = decode_jpeg_turbo(&jpg).unwrap();
    assert_eq!(turbo, decode_jpeg_zune(&jpg).unwrap());
    assert_eq!((turbo.width, turbo.height), (w as u32, h as u32));
}

/// The DCT-scaled RandomResizedCrop: the same crop boxes and rng draws as the full decode (bit-identical where no
/// scaling applies), and a final 224 crop within a mean of 2/255 of the full decode's where it does, on generated
/// 1600x1200 JPEGs (quality 90, 4:4:4, as `data synth` writes them). The pixels differ because a reduced IDCT
/// low-passes each 8x8 block instead of PIL's bicubic filter over the full-size pixels; the measured mean is printed
/// (0.84/255 when written, benchmarks/data_pipeline.md).
#[test]
fn dct_scaled_crop_close_to_full_decode() {
    let dir = tempfile::tempdir().unwrap();
    for (w, h) in [(1600, 1200), (500, 375)] {
        let root = dir.path().join(format!("{w}x{h}"));
        synth(&SynthOptions { out: root.clone(), classes: 4, train_per_class: 2, val_per_class: 0, width: w, height: h, seed: 3, quality: 90 })
            .unwrap();
        let files: Vec<_> = Dataset::open(&root, "train").unwrap().samples.into_iter().map(|s| s.0).collect();
        let t = Transform::train(224, 0.08);
        let Op::RandomResizedCrop { scale, ratio, .. } = t.ops[0] else { unreachable!() };
        let (mut scaled, mut same, mut sum, mut worst) = (0usize, 0usize, 0.0f64, 0.0f64);
        let mut per_denom = std::collections::BTreeMap::<u32, (usize, f64)>::new();
        for (fi, f) in files.iter().enumerate() {
            let bytes = std::fs::read(f).unwrap();
            let full = decode_image(&bytes).unwrap();
            for k in 0..12 {
                let idx = fi * 100 + k;
                let b = random_resized_crop_params(w, h, scale, ratio, &mut sample_rng(1, 0, idx));
                let denom = dct_scale_for_crop(b.width, b.height, 224, 224);
                let mut a = vec![0f32; 3 * 224 * 224];
                t.apply(full.clone(), &mut sample_rng(1, 0, idx), &mut a).unwrap();
                let mut d = vec![0f32; 3 * 224 * 224];
                t.apply_encoded(&bytes, true, &mut sample_rng(1, 0, idx), &mut d).unwrap();
                if denom == 1 {
                    assert_eq!(a, d, "{}: no DCT scaling for crop {b:?}, yet the output differs", f.display());
                    same += 1;
                    continue;
                }
                let m = mad_pixels(&a, &d);
                scaled += 1;
                sum += m;
                worst = worst.max(m);
                let e = per_denom.entry(denom).or_default();
                e.0 += 1;
                e.1 += m;
            }
        }
        let by: Vec<String> = per_denom.iter().map(|(d, (n, s))| format!("1/{d}: {n} crops, mean {:.3}/255", s / *n as f64)).collect();
        eprintln!("{w}x{h}: {same} crops at full size (identical), {scaled} DCT-scaled: mean {:.3}/255, worst {worst:.3}/255 ({})",
            if scaled > 0 { sum / scaled as f64 } else { 0.0 }, by.join(", "));
        if (w, h) == (500, 375) {
            // A 224 crop of a 375-high image is never 448 high: ImageNet-sized photos are not scaled.
            assert_eq!(scaled, 0);
        } else {
            assert!(scaled >= 10, "only {scaled} of the crops were DCT-scaled");
            assert!(sum / scaled as f64 <= 2.0, "DCT-scaled crops differ by a mean of {:.3}/255", sum / scaled as f64);
            assert!(worst <= 4.0, "a DCT-scaled crop differs by a mean of {worst:.3}/255");
        }
    }
}

/// Smaller outputs let ImageNet-sized photos scale: the PIL-generated fixtures (4:2:0, 4:4:4, greyscale) through
/// RandomResizedCrop(64), against the full decode.
#[test]
fn dct_scaled_small_output_on_pil_fixtures() {
    let dir = tempfile::tempdir().unwrap();
    common::run_py("ref_transforms.py", &[dir.path().to_str().unwrap()]);
    let t = Transform::train(64, 0.08);
    let mut report = Vec::new();
    for name in ["photo_500x375.jpg", "portrait_333x500.jpg", "gray_300x260.jpg", "q95_444_641x427.jpg"] {
        let bytes = std::fs::read(Path::new(dir.path()).join(name)).unwrap();
        let full = decode_image(&bytes).unwrap();
        let (mut n, mut sum) = (0, 0.0);
        for idx in 0..16 {
            let mut a = vec![0f32; 3 * 64 * 64];
            t.apply(full.clone(), &mut sample_rng(2, 0, idx), &mut a).unwrap();
            let mut d = vec![0f32; 3 * 64 * 64];
            t.apply_encoded(&bytes, true, &mut sample_rng(2, 0, idx), &mut d).unwrap();
            if a != d {
                n += 1;
                sum += mad_pixels(&a, &d);
            }
        }
        assert!(n > 0, "{name}: no crop was DCT-scaled");
        report.push(format!("{name}: {n} of 16 crops scaled, mean {:.3}/255", sum / n as f64));
        assert!(sum / n as f64 <= 3.0, "{}", report.last().unwrap());
    }
    eprintln!("{}", report.join("\n"));
}
