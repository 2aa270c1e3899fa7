//! The resize is Pillow's, to the value: `pil_resample::resize` against `Image.resize` (tests/py/ref_pil_resize.py:
//! 52 size and box cases, up, down and mixed, both filters), and the eval transform built on it (Resize(256) +
//! CenterCrop(224), bicubic and bilinear) against torchvision's PIL path on odd-sized PNGs, where decoding is
//! exact: 0 differing values.
mod common;

use lmim_bench::data::pil_resample::{resize, Filter};
use lmim_bench::data::transforms::{resize_center_crop, Interp};
use lmim_bench::data::RgbImage;

#[test]
fn resize_equals_pillow_on_every_case() {
    let dir = tempfile::tempdir().unwrap();
    common::run_py("ref_pil_resize.py", &[dir.path().to_str().unwrap()]);
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("manifest.json")).unwrap()).unwrap();
    let cases = m["cases"].as_array().unwrap();
    assert!(cases.len() >= 80, "{} cases", cases.len());
    let mut differing = Vec::new();
    for c in cases {
        let u = |k: &str| c[k].as_u64().unwrap() as u32;
        let src = std::fs::read(dir.path().join(c["src"].as_str().unwrap())).unwrap();
        let want = std::fs::read(dir.path().join(c["out"].as_str().unwrap())).unwrap();
        let filter = if c["filter"] == "BICUBIC" { Filter::Bicubic } else { Filter::Bilinear };
        let b: Vec<f64> = c["box"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let got = resize(&src, u("src_w"), u("src_h"), 3, u("out_w"), u("out_h"), filter, [b[0], b[1], b[2], b[3]]).unwrap();
        let n = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        if n > 0 || got.len() != want.len() {
            differing.push(format!("{c}: {n} values differ"));
        }
    }
    assert!(differing.is_empty(), "Pillow {}: {}", m["pillow"], differing.join("\n"));
}

/// Resize(256) + CenterCrop(224) of PNGs of odd sizes (no decoder in the way), both filters, against torchvision
/// on PIL images: the same u8 pixels.
#[test]
fn the_eval_resize_and_crop_equal_torchvision_on_pil() {
    let dir = tempfile::tempdir().unwrap();
    let script = r#"
import json, sys, numpy as np
from PIL import Image
import torchvision.transforms as T
out = sys.argv[1]
cases = []
for i, (w, h) in enumerate([(333, 251), (97, 403), (257, 256), (600, 451), (120, 90), (1023, 767)]):
    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([(x * 7 + y * 3) % 256, (np.sin(x / 5.0) * 120 + 128), rng.integers(0, 256, (h, w))], -1).astype(np.uint8)
    Image.fromarray(a).save(f"{out}/img{i}.png")
    for interp, name in [(T.InterpolationMode.BICUBIC, "bicubic"), (T.InterpolationMode.BILINEAR, "bilinear")]:
        r = T.Compose([T.Resize(256, interpolation=interp), T.CenterCrop(224)])(Image.open(f"{out}/img{i}.png").convert("RGB"))
        np.asarray(r).tofile(f"{out}/img{i}_{name}.rgb")
        cases.append({"png": f"img{i}.png", "w": w, "h": h, "interp": name, "out": f"img{i}_{name}.rgb"})
json.dump(cases, open(f"{out}/cases.json", "w"))
"#;
    let py = dir.path().join("make.py");
    std::fs::write(&py, script).unwrap();
    let o = std::process::Command::new(common::python()).arg(&py).arg(dir.path()).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cases: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(dir.path().join("cases.json")).unwrap()).unwrap();
    for c in &cases {
        let img = image::open(dir.path().join(c["png"].as_str().unwrap())).unwrap().to_rgb8();
        let (w, h) = img.dimensions();
        let rgb = RgbImage { width: w, height: h, data: img.into_raw() };
        let interp = if c["interp"] == "bicubic" { Interp::Bicubic } else { Interp::Bilinear };
        let ours = resize_center_crop(&rgb, 256, (224, 224), interp).unwrap();
        let want = std::fs::read(dir.path().join(c["out"].as_str().unwrap())).unwrap();
        let n = ours.data.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!((ours.data.len(), n), (want.len(), 0), "{c}: {n} values differ from torchvision's");
    }
}
