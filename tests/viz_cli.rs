//! `lmim-bench visualize` end to end: the figure and data files, determinism, and bad inputs (exit 2).
mod common;

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use lmim_bench::checkpoint;
use lmim_bench::model::pos_embed::PosEmbedKind;
use lmim_bench::model::{VisionTransformer, VitConfig};
use lmim_bench::viz::cluster::is_refinement;
use lmim_bench::viz::figure::figure_size;
use tch::{nn, Device};

/// A randomly initialised vit_pico encoder saved like an exported Latent MIM encoder.
fn make_checkpoint(dir: &Path) -> PathBuf {
    tch::manual_seed(0);
    let mut cfg = VitConfig::from_arch("vit_pico_patch4_32").unwrap();
    cfg.pos_embed = PosEmbedKind::Lmim;
    let vs = nn::VarStore::new(Device::Cpu);
    let _model = VisionTransformer::new(&vs.root(), &cfg);
    let path = dir.join("encoder.safetensors");
    checkpoint::save_vit(&path, &vs, &cfg, &Default::default()).unwrap();
    path
}

/// A non-square RGB picture with a few regions, as PNG.
fn write_picture(path: &Path, w: u32, h: u32) {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
        if (fx - 0.3).powi(2) + (fy - 0.5).powi(2) < 0.05 {
            image::Rgb([230, 50, 40])
        } else if fy > 0.75 {
            image::Rgb([40, 140, 60])
        } else {
            image::Rgb([(80.0 + 150.0 * fx) as u8, 120, (200.0 - 100.0 * fy) as u8])
        }
    });
    img.save(path).unwrap();
}

fn bin() -> Command {
    Command::cargo_bin("lmim-bench").unwrap()
}

fn visualize(ckpt: &Path, images: &Path, out: &Path, extra: &[&str]) -> assert_cmd::assert::Assert {
    bin()
        .args(["visualize", "--device", "cpu", "--checkpoint"])
        .arg(ckpt)
        .arg("--images")
        .arg(images)
        .arg("--out")
        .arg(out)
        .args(extra)
        .assert()
}

#[test]
fn writes_a_figure_and_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = make_checkpoint(dir.path());
    let img = dir.path().join("scene.png");
    write_picture(&img, 90, 60);
    let out = dir.path().join("out");
    // Defaults: 112 px for 4-px patches, a 28 x 28 grid, levels 3, 4, 5.
    visualize(&ckpt, &img, &out, &[]).success();

    let png = image::open(out.join("scene.png")).unwrap().to_rgb8();
    assert_eq!(png.dimensions(), figure_size(224, 28, 3));
    let px: Vec<f64> = png.as_raw().iter().map(|v| *v as f64).collect();
    let mean = px.iter().sum::<f64>() / px.len() as f64;
    let var = px.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / px.len() as f64;
    assert!(var > 500.0, "the figure looks blank (pixel variance {var:.1})");
    // Every overlay panel holds several cluster colours, not one flat colour.
    let distinct: std::collections::HashSet<[u8; 3]> = png.pixels().map(|p| p.0).collect();
    assert!(distinct.len() > 100, "only {} colours", distinct.len());

    let rec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("scene.json")).unwrap()).unwrap();
    assert_eq!(rec["input_size"], 112);
    assert_eq!(rec["grid"], 28);
    assert_eq!(rec["layer"], 3);
    assert_eq!(rec["linkage"], "ward");
    assert!(rec["pos_embed"].as_str().unwrap().starts_with("sincos"), "{}", rec["pos_embed"]);
    let levels = rec["levels"].as_array().unwrap();
    assert_eq!(levels.len(), 3);
    let flat: Vec<Vec<u32>> = levels
        .iter()
        .map(|l| {
            let rows = l["labels"].as_array().unwrap();
            assert_eq!(rows.len(), 28);
            rows.iter().flat_map(|r| r.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32)).collect()
        })
        .collect();
    for (l, k) in flat.iter().zip([3u32, 4, 5]) {
        assert_eq!(*l.iter().max().unwrap(), k - 1);
    }
    assert!(is_refinement(&flat[1], &flat[0]) && is_refinement(&flat[2], &flat[1]));
    let pts = rec["tsne"]["points"].as_array().unwrap();
    assert_eq!(pts.len(), 784);
    assert_eq!(rec["tsne"]["perplexity"], 30.0);
}

#[test]
fn same_seed_same_files_and_folders_are_expanded() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = make_checkpoint(dir.path());
    let imgs = dir.path().join("imgs");
    std::fs::create_dir(&imgs).unwrap();
    write_picture(&imgs.join("a.png"), 40, 40);
    write_picture(&imgs.join("b.png"), 50, 32);
    std::fs::write(imgs.join("notes.txt"), "not an image").unwrap();
    let args = ["--size", "48", "--levels", "2,4", "--tsne-iters", "300"];
    let (o1, o2, o3) = (dir.path().join("o1"), dir.path().join("o2"), dir.path().join("o3"));
    visualize(&ckpt, &imgs, &o1, &args).success();
    visualize(&ckpt, &imgs, &o2, &args).success();
    let mut names: Vec<String> = std::fs::read_dir(&o1).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["a.json", "a.png", "b.json", "b.png"]);
    for n in &names {
        assert_eq!(std::fs::read(o1.join(n)).unwrap(), std::fs::read(o2.join(n)).unwrap(), "{n} differs between two runs");
    }
    let mut seeded = args.to_vec();
    seeded.extend(["--seed", "7"]);
    visualize(&ckpt, &imgs, &o3, &seeded).success();
    assert_ne!(std::fs::read(o1.join("a.json")).unwrap(), std::fs::read(o3.join("a.json")).unwrap());
}

#[test]
fn bad_inputs_exit_2_naming_the_culprit() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = make_checkpoint(dir.path());
    let img = dir.path().join("ok.png");
    write_picture(&img, 32, 32);
    let out = dir.path().join("out");
    let stderr = |a: assert_cmd::assert::Assert| String::from_utf8_lossy(&a.code(2).get_output().stderr).into_owned();

    let missing = dir.path().join("missing.jpg");
    let e = stderr(visualize(&ckpt, &missing, &out, &[]));
    assert!(e.contains("missing.jpg") && e.matches("No such file").count() == 1, "{e}");

    let fake = dir.path().join("fake.png");
    std::fs::write(&fake, "this is text").unwrap();
    let e = stderr(visualize(&ckpt, &fake, &out, &[]));
    assert!(e.contains("fake.png") && e.contains("not an image"), "{e}");

    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let e = stderr(visualize(&ckpt, &empty, &out, &[]));
    assert!(e.contains("empty") && e.contains("no image files"), "{e}");

    // 8 px and 4-px patches: a 2 x 2 grid cannot hold 5 clusters.
    let e = stderr(visualize(&ckpt, &img, &out, &["--size", "8"]));
    assert!(e.contains("--levels") && e.contains("4 patches"), "{e}");
    let e = stderr(visualize(&ckpt, &img, &out, &["--size", "30"]));
    assert!(e.contains("--size"), "{e}");
    let e = stderr(visualize(&ckpt, &img, &out, &["--layer", "4"]));
    assert!(e.contains("--layer"), "{e}");
    let e = stderr(visualize(&ckpt, &img, &out, &["--levels", "3,3"]));
    assert!(e.contains("--levels"), "{e}");
    let e = stderr(visualize(&ckpt, &img, &out, &["--linkage", "single"]));
    assert!(e.contains("single"), "{e}");
    let e = stderr(visualize(&dir.path().join("nope.safetensors"), &img, &out, &[]));
    assert!(e.contains("nope.safetensors"), "{e}");
    assert!(!out.join("ok.png").exists(), "nothing is written for a failed run");
    let e = stderr(visualize(&ckpt, &img, dir.path(), &["--size", "32"]));
    assert!(e.contains("--out") && e.contains("overwrite"), "{e}");

    // A negative layer counts from the end.
    visualize(&ckpt, &img, &out, &["--size", "32", "--layer", "-2", "--levels", "3"]).success();
    let rec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("ok.json")).unwrap()).unwrap();
    assert_eq!(rec["layer"], 2);
    assert_eq!(rec["pos_embed"], "stored (trained grid)");
}
