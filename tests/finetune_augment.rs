//! Fine-tuning augmentations: RandAugment's ops against timm's PIL implementations, RandomErasing's boxes,
//! and the seeded Mixup/CutMix batch function.
mod common;

use lmim_bench::checkpoint;
use lmim_bench::data::augment::{apply_op_arg, mixup_cutmix, rand_bbox, AugOp, MixupConfig, RandAugment, RandomErasing};
use lmim_bench::data::decode::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

const FILL: [u8; 3] = [124, 116, 104];

/// A smooth-ish test image with some structure and noise, so geometric ops are not dominated by aliasing.
fn test_image(w: u32, h: u32) -> RgbImage {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut data = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h {
        for x in 0..w {
            for c in 0..3u32 {
                let v = 40.0 + 150.0 * ((x as f64 * 0.3 + c as f64).sin() * 0.5 + 0.5) * ((y as f64 * 0.2).cos() * 0.4 + 0.6);
                data.push((v + rng.gen_range(-10.0..10.0)).clamp(0.0, 255.0) as u8);
            }
        }
    }
    RgbImage { width: w, height: h, data }
}

#[test]
fn randaug_ops_match_timm_pil() {
    let img = test_image(24, 20);
    // (our op, timm function, argument, max |diff|, max fraction of values differing by more than 1). The
    // geometric ops are PIL's bicubic transform (a = -1, truncated); f64 rounding can flip a truncation by 1.
    let cases: Vec<(AugOp, &str, Option<f64>, i32, f64)> = vec![
        (AugOp::AutoContrast, "auto_contrast", None, 0, 0.0),
        (AugOp::Equalize, "equalize", None, 0, 0.0),
        (AugOp::Invert, "invert", None, 0, 0.0),
        (AugOp::PosterizeIncreasing, "posterize", Some(1.0), 0, 0.0),
        (AugOp::PosterizeIncreasing, "posterize", Some(3.0), 0, 0.0),
        (AugOp::SolarizeIncreasing, "solarize", Some(26.0), 0, 0.0),
        (AugOp::SolarizeIncreasing, "solarize", Some(128.0), 0, 0.0),
        (AugOp::SolarizeAdd, "solarize_add", Some(99.0), 0, 0.0),
        (AugOp::ColorIncreasing, "color", Some(1.81), 1, 0.0),
        (AugOp::ColorIncreasing, "color", Some(0.19), 1, 0.0),
        (AugOp::ContrastIncreasing, "contrast", Some(1.81), 1, 0.0),
        (AugOp::BrightnessIncreasing, "brightness", Some(0.19), 1, 0.0),
        (AugOp::SharpnessIncreasing, "sharpness", Some(1.81), 1, 0.0),
        (AugOp::Rotate, "rotate", Some(27.0), 1, 0.0),
        (AugOp::Rotate, "rotate", Some(-13.5), 1, 0.0),
        (AugOp::ShearX, "shear_x", Some(0.27), 1, 0.0),
        (AugOp::ShearY, "shear_y", Some(-0.27), 1, 0.0),
        (AugOp::TranslateXRel, "translate_x_rel", Some(0.25), 1, 0.0),
        (AugOp::TranslateYRel, "translate_y_rel", Some(-0.3), 1, 0.0),
    ];
    let dir = tempfile::tempdir().unwrap();
    let (inp, outp) = (dir.path().join("in.safetensors"), dir.path().join("out.safetensors"));
    let t = Tensor::from_slice(&img.data).view([img.height as i64, img.width as i64, 3]);
    let ops: Vec<serde_json::Value> = cases.iter().map(|c| serde_json::json!([c.1, c.2])).collect();
    let meta = [("ops".to_string(), serde_json::Value::from(ops).to_string())].into_iter().collect();
    checkpoint::save(&inp, &[("img".into(), t)], &meta).unwrap();
    common::run_py("ref_finetune.py", &["randaug", inp.to_str().unwrap(), outp.to_str().unwrap()]);
    let r = checkpoint::load(&outp).unwrap();
    for (i, (op, name, arg, max_diff, max_frac)) in cases.iter().enumerate() {
        let ours = apply_op_arg(*op, img.clone(), arg.unwrap_or(0.0), FILL);
        let want = r.get(&format!("out{i}")).unwrap();
        let want: Vec<u8> = Vec::try_from(want.flatten(0, -1)).unwrap();
        let diffs: Vec<i32> = ours.data.iter().zip(&want).map(|(&a, &b)| (a as i32 - b as i32).abs()).collect();
        let worst = *diffs.iter().max().unwrap();
        let frac = diffs.iter().filter(|&&d| d > 1).count() as f64 / diffs.len() as f64;
        assert!(worst <= *max_diff && frac <= *max_frac, "{name}({arg:?}): max |diff| {worst}, {:.1}% of values off by more than 1", 100.0 * frac);
    }
}

#[test]
fn randaug_is_seeded() {
    let ra = RandAugment::parse("rand-m9-mstd0.5-inc1").unwrap();
    let img = test_image(16, 16);
    let a = ra.apply(img.clone(), &mut ChaCha8Rng::seed_from_u64(9));
    let b = ra.apply(img.clone(), &mut ChaCha8Rng::seed_from_u64(9));
    assert_eq!(a, b);
    let changed = (0..20).filter(|&s| ra.apply(img.clone(), &mut ChaCha8Rng::seed_from_u64(s)) != img).count();
    // Each of the 2 ops runs with probability 0.5, so about 3 in 4 images change.
    assert!((8..=20).contains(&changed), "{changed}");
}

#[test]
fn random_erasing_boxes() {
    let er = RandomErasing::default();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let (c, h, w) = (3usize, 32usize, 40usize);
    let mut erased = 0;
    for _ in 0..2000 {
        let mut img = vec![7.0f32; c * h * w];
        if let Some((top, left, eh, ew)) = er.apply(&mut img, c, h, w, &mut rng) {
            erased += 1;
            assert!(eh < h && ew < w && top + eh <= h && left + ew <= w);
            let area = (eh * ew) as f64 / (h * w) as f64;
            // Rounding of h and w can move the area a little outside [0.02, 1/3].
            assert!((0.01..0.4).contains(&area), "area {area}");
            let changed = img.iter().filter(|&&v| v != 7.0).count();
            assert_eq!(changed, c * eh * ew);
        } else {
            assert!(img.iter().all(|&v| v == 7.0));
        }
    }
    // Probability 0.25 (and almost every attempt fits).
    assert!((400..600).contains(&erased), "{erased}");
    let mut a = vec![0f32; c * h * w];
    let mut b = a.clone();
    let mut r1 = ChaCha8Rng::seed_from_u64(3);
    let mut r2 = ChaCha8Rng::seed_from_u64(3);
    for _ in 0..10 {
        assert_eq!(er.apply(&mut a, c, h, w, &mut r1), er.apply(&mut b, c, h, w, &mut r2));
    }
    assert_eq!(a, b);
}

#[test]
fn mixup_cutmix_batches() {
    let cfg = MixupConfig { mixup_alpha: 0.8, cutmix_alpha: 1.0, prob: 1.0, switch_prob: 0.5, label_smoothing: 0.1, num_classes: 10 };
    let x = Tensor::randn([8, 3, 16, 16], (Kind::Float, Device::Cpu));
    let y = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 5, 6, 7]);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut cutmix = 0;
    for _ in 0..200 {
        let (xm, t, p) = mixup_cutmix(&x, &y, &cfg, &mut rng);
        assert_eq!(xm.size(), x.size());
        assert!((0.0..=1.0).contains(&p.lam));
        let sums = t.sum_dim_intlist(1, false, Kind::Float);
        assert!(common::max_abs(&sums, &Tensor::ones([8], (Kind::Float, Device::Cpu))) < 1e-5);
        // Soft target of sample 0: lam on its class (0), 1 - lam on the flipped pair's (7), plus smoothing.
        let on = t.double_value(&[0, 0]);
        assert!((on - (p.lam * 0.9 + 0.01)).abs() < 1e-6);
        match p.cutmix {
            Some(b) => {
                cutmix += 1;
                let inside = xm.narrow(2, b.yl, b.yh - b.yl).narrow(3, b.xl, b.xh - b.xl);
                let src = x.flip([0]).narrow(2, b.yl, b.yh - b.yl).narrow(3, b.xl, b.xh - b.xl);
                assert!(common::max_abs(&inside, &src) == 0.0);
            }
            None => {
                let want = &x * p.lam + x.flip([0]) * (1.0 - p.lam);
                assert!(common::max_abs(&xm, &want) < 1e-6);
            }
        }
    }
    assert!((60..140).contains(&cutmix), "{cutmix}");
    // rand_bbox: the box has timm's size int(H*sqrt(1-lam)) unless clipped.
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for _ in 0..100 {
        let lam: f64 = rng.gen();
        let b = rand_bbox(16, 20, lam, &mut rng);
        let (ch, cw) = ((16.0 * (1.0 - lam).sqrt()) as i64, (20.0 * (1.0 - lam).sqrt()) as i64);
        assert!(b.yh - b.yl <= 2 * (ch / 2) && b.xh - b.xl <= 2 * (cw / 2));
        assert!(b.yl >= 0 && b.yh <= 16 && b.xl >= 0 && b.xh <= 20);
    }
}
