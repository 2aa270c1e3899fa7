//! `eval --protocol davis`: DINO's DAVIS-2017 label propagation and davis2017-evaluation's J&F, against references
//! written in tests/py/ref_davis.py from those two repositories' definitions (OpenCV, PIL, scikit-image as they
//! call them):
//! - `cv2.resize` INTER_LINEAR on 8-bit RGB, pixel for pixel, on 45 sizes (exact 2x downscales included, which
//!   OpenCV computes with INTER_AREA);
//! - DINO's `read_frame` / `read_seg` on generated frames at 480p (854x480 -> 832x480) and at a short side of 64;
//! - the ViT on a non-square grid with DINO's `interpolate_pos_encoding` and with a regenerated sin-cos table,
//!   within 1e-5 of the reference forward;
//! - J and F of every scored frame and object within 1e-6 of davis2017-evaluation's definitions, with void pixels
//!   in the ground truth, empty predicted masks and shifted ones;
//! - the whole protocol from the command line on a generated set with a seeded timm ViT: at least 99 % of the mask
//!   pixels equal to DINO's algorithm and J&F within 0.5 of its score; the record, the masks (indexed, the first
//!   annotation's palette), `table` and `check`;
//! - bad input (missing sequence, first annotation, frames of different sizes, a non-indexed annotation) exits 2
//!   naming the file and writes no record and no masks.
mod common;

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use lmim_bench::checkpoint::{self, load_vit};
use lmim_bench::data::davis::{self, IndexedImage, SynthDavisOptions};
use lmim_bench::model::pos_embed::GridPosEmbed;
use predicates::str::contains;
use tch::{Device, Kind, Tensor};

fn bin() -> Command {
    Command::cargo_bin("lmim-bench").unwrap()
}

/// A successful `eval --protocol davis --json` of `ckpt` on `data` with the overrides `sets`: its record.
fn eval_json(sets: &[String], ckpt: &Path, data: &Path, out: &Path) -> serde_json::Value {
    let mut args: Vec<String> = ["--protocol", "davis", "--device", "cpu", "--quiet", "--json", "--name", "pico"].iter().map(|s| s.to_string()).collect();
    args.extend_from_slice(sets);
    let assert = common::eval_cmd(&args, ckpt, data, out).assert().success();
    serde_json::from_slice(&assert.get_output().stdout).unwrap()
}

fn synth(out: &Path, sequences: usize, frames: usize, w: u32, h: u32) -> PathBuf {
    let opts = SynthDavisOptions { out: out.to_path_buf(), sequences, frames, max_objects: 3, width: w, height: h, seed: 3, quality: 90 };
    davis::synth_davis(&opts).unwrap();
    out.to_path_buf()
}

fn u8_vec(t: &Tensor) -> Vec<u8> {
    Vec::<u8>::try_from(t.to_kind(Kind::Uint8).contiguous().view([-1])).unwrap()
}

#[test]
fn cv2_resize_is_reproduced_to_the_pixel() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("resize.safetensors");
    common::run_py("ref_davis.py", &["resize", out.to_str().unwrap()]);
    let r = checkpoint::load(&out).unwrap();
    let mut cases = 0;
    for i in 0.. {
        let Some(src) = r.get(&format!("src_{i}")) else { break };
        let dst = r.get(&format!("dst_{i}")).unwrap();
        let (sh, sw) = (src.size()[0] as usize, src.size()[1] as usize);
        let (dh, dw) = (dst.size()[0] as usize, dst.size()[1] as usize);
        let ours = davis::cv2_resize_linear(&u8_vec(src), sw, sh, 3, dw, dh);
        let theirs = u8_vec(dst);
        let diff = ours.iter().zip(&theirs).filter(|(a, b)| a != b).count();
        assert_eq!(diff, 0, "{sw}x{sh} -> {dw}x{dh}: {diff} of {} values differ from cv2.resize", theirs.len());
        cases += 1;
    }
    assert_eq!(cases, 45);
}

fn check_reading(data: &Path, short: usize, patch: i64, dir: &Path) {
    let out = dir.join(format!("read_{short}.safetensors"));
    common::run_py("ref_davis.py", &["read", data.to_str().unwrap(), &short.to_string(), &patch.to_string(), out.to_str().unwrap()]);
    let r = checkpoint::load(&out).unwrap();
    let set = davis::open_set(data, "val", "480p").unwrap();
    for seq in &set.sequences {
        for (t, f) in seq.frames.iter().enumerate() {
            let fr = davis::read_frame(f, short).unwrap();
            let ours = Tensor::from_slice(&fr.chw).view([3, fr.height as i64, fr.width as i64]);
            let theirs = r.get(&format!("frame_{}_{t}", seq.name)).unwrap();
            assert_eq!(ours.size(), theirs.size(), "{}: size", f.display());
            assert_eq!(common::max_abs(&ours, theirs), 0.0, "{}: read_frame differs from DINO's", f.display());
        }
        let first = davis::read_indexed_png(&seq.annotations[0]).unwrap();
        let (sw, sh) = davis::dino_seg_size(first.width, first.height, short);
        let (gw, gh) = (sw as i64 / patch, sh as i64 / patch);
        let small = davis::pil_resize_nearest(&first.indices, first.width, first.height, gw as usize, gh as usize);
        let ours = lmim_bench::protocols::davis::one_hot(&small, gh, gw, Device::Cpu);
        let theirs = r.get(&format!("seg_{}", seq.name)).unwrap();
        assert_eq!(ours.size(), theirs.size());
        assert_eq!(common::max_abs(&ours, theirs), 0.0, "{}: read_seg differs", seq.name);
    }
}

#[test]
fn frames_and_annotations_read_as_dino_does() {
    let dir = tempfile::tempdir().unwrap();
    // The real reading path: 854x480 frames (DAVIS 480p) to 832x480.
    let big = synth(&dir.path().join("big"), 1, 3, 854, 480);
    check_reading(&big, 480, 16, dir.path());
    // The small sets of the other tests, at a short side of 64 (patch 4).
    let small = synth(&dir.path().join("small"), 2, 4, 160, 72);
    check_reading(&small, 64, 4, dir.path());
}

#[test]
fn vit_on_a_non_square_grid_matches_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    common::run_py("ref_davis.py", &["vit", dir.path().to_str().unwrap()]);
    let m = load_vit(&dir.path().join("pico.safetensors"), None, Device::Cpu, 0).unwrap();
    let io = checkpoint::load(&dir.path().join("io.safetensors")).unwrap();
    let x = io.get("images").unwrap();
    for (mode, key) in [(GridPosEmbed::Interpolate, "interpolate"), (GridPosEmbed::Sincos, "sincos")] {
        let out = tch::no_grad(|| m.model.forward_features_with(x, &[], false, mode));
        assert_eq!(out.tokens.size(), vec![2, 1 + 10 * 18, 96]);
        let err = common::max_abs(&out.tokens, io.get(key).unwrap());
        assert!(err < 1e-5, "{key}: tokens differ from the reference by {err}");
    }
}

/// A results folder made from the ground truth: object masks shifted by two pixels, every fourth frame empty, and
/// the ground truth given void (255) borders where object 1 meets the background.
fn perturbed(data: &Path, results: &Path) {
    let set = davis::open_set(data, "val", "480p").unwrap();
    for seq in &set.sequences {
        std::fs::create_dir_all(results.join(&seq.name)).unwrap();
        for (i, a) in seq.annotations.iter().enumerate() {
            let mut g = davis::read_indexed_png(a).unwrap();
            let (w, h) = (g.width, g.height);
            let mut p = vec![0u8; w * h];
            if i % 4 != 2 {
                for y in 0..h {
                    for x in 2..w {
                        p[y * w + x] = g.indices[y * w + x - 2];
                    }
                }
            }
            let img = IndexedImage { width: w, height: h, indices: p, palette: g.palette.clone() };
            std::fs::write(results.join(&seq.name).join(format!("{}.png", seq.frame_stem(i))), davis::encode_indexed_png(&img).unwrap()).unwrap();
            let orig = g.indices.clone();
            for y in 1..h - 1 {
                for x in 1..w - 1 {
                    let v = orig[y * w + x];
                    if v == 1 && (orig[y * w + x + 1] == 0 || orig[(y + 1) * w + x] == 0) {
                        g.indices[y * w + x] = 255;
                    }
                }
            }
            std::fs::write(a, davis::encode_indexed_png(&g).unwrap()).unwrap();
        }
    }
}

#[test]
fn j_and_f_match_davis2017_evaluation() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(&dir.path().join("set"), 3, 9, 96, 64);
    let results = dir.path().join("results");
    perturbed(&data, &results);
    let set = davis::open_set(&data, "val", "480p").unwrap();
    let (ours, _) = lmim_bench::protocols::davis::score_folder(&set, &results, 0.008).unwrap();
    let json = dir.path().join("jf.json");
    common::run_py("ref_davis.py", &["jf", data.to_str().unwrap(), results.to_str().unwrap(), json.to_str().unwrap()]);
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let theirs = r["objects"].as_array().unwrap();
    assert_eq!(ours.len(), theirs.len(), "objects");
    assert_eq!(ours.len(), 1 + 2 + 3, "sequences of 1, 2 and 3 objects");
    let mut empty_seen = false;
    for (o, t) in ours.iter().zip(theirs) {
        assert_eq!(o.sequence, t["sequence"].as_str().unwrap());
        for (key, v) in [("j", &o.j), ("f", &o.f)] {
            let tv: Vec<f64> = t[key].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
            assert_eq!(v.len(), tv.len(), "{} {key}: frames 1..n-1 scored", o.sequence);
            for (a, b) in v.iter().zip(&tv) {
                assert!((a - b).abs() < 1e-6, "{} object {} {key}: {a} vs {b}", o.sequence, o.object);
            }
            empty_seen |= v.iter().any(|&x| x == 0.0);
        }
        for ((key, _), a) in lmim_bench::protocols::jandf::MEASURES.iter().zip(o.measures.values()) {
            assert!((a - t[*key].as_f64().unwrap()).abs() < 1e-9, "{} {key}", o.sequence);
        }
    }
    assert!(empty_seen, "the empty predicted frames score 0");
    let s = lmim_bench::protocols::jandf::summarise(&ours);
    assert!((s.j_and_f - r["j_and_f"].as_f64().unwrap()).abs() < 1e-9);
    assert!(s.j_and_f > 0.3 && s.j_and_f < 0.95, "a shifted mask scores in between: {}", s.j_and_f);
}

fn read_labels(p: &Path) -> Vec<u8> {
    davis::read_indexed_png(p).unwrap().indices
}

#[test]
fn eval_davis_end_to_end_matches_dinos_algorithm() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(&dir.path().join("set"), 3, 8, 160, 72);
    common::run_py("ref_davis.py", &["vit", dir.path().join("model").to_str().unwrap()]);
    let ckpt = dir.path().join("model/pico.safetensors");
    let out = dir.path().join("runs");
    let rec = eval_json(&["short_side=64".to_string()], &ckpt, &data, &out);
    assert_eq!(rec["protocol"], "davis");
    assert_eq!(rec["protocol_version"], "1+short_side=64");
    assert_eq!(rec["headline"], "j_and_f");
    assert_eq!(rec["config"]["grid"], "16x32 (rows x cols)");
    let jf = rec["metrics"]["j_and_f"].as_f64().unwrap();
    let (j, f) = (rec["metrics"]["j_mean"].as_f64().unwrap(), rec["metrics"]["f_mean"].as_f64().unwrap());
    assert!(((j + f) / 2.0 - jf).abs() < 1e-9);
    assert_eq!(rec["details"]["objects"], 6);

    // DINO's algorithm on the same frames and checkpoint, one frame per forward as its script.
    let reference = dir.path().join("dino");
    common::run_py("ref_davis.py", &["propagate", data.to_str().unwrap(), ckpt.to_str().unwrap(), "64", reference.to_str().unwrap()]);
    let masks = PathBuf::from(rec["details"]["masks"].as_str().unwrap());
    let set = davis::open_set(&data, "val", "480p").unwrap();
    let (mut same, mut total) = (0usize, 0usize);
    for seq in &set.sequences {
        let palette = davis::read_indexed_png(&seq.annotations[0]).unwrap().palette;
        for i in 0..seq.frames.len() {
            let name = format!("{}.png", seq.frame_stem(i));
            let ours = davis::read_indexed_png(&masks.join(&seq.name).join(&name)).unwrap();
            assert_eq!(ours.palette, palette, "masks carry the first annotation's palette");
            let theirs = read_labels(&reference.join(&seq.name).join(&name));
            same += ours.indices.iter().zip(&theirs).filter(|(a, b)| a == b).count();
            total += theirs.len();
        }
    }
    let agree = same as f64 / total as f64;
    assert!(agree >= 0.99, "masks agree with DINO's on {:.4} of the pixels", agree);
    let json = dir.path().join("jf.json");
    common::run_py("ref_davis.py", &["jf", data.to_str().unwrap(), reference.to_str().unwrap(), json.to_str().unwrap()]);
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let theirs = 100.0 * r["j_and_f"].as_f64().unwrap();
    assert!((jf - theirs).abs() <= 0.5, "J&F {jf:.3} vs DINO's algorithm {theirs:.3}");
    // Our own masks scored from the folder give the record's number.
    let (objs, _) = lmim_bench::protocols::davis::score_folder(&set, &masks, 0.008).unwrap();
    assert!((100.0 * lmim_bench::protocols::jandf::summarise(&objs).j_and_f - jf).abs() < 1e-9);

    // The table has the column; check holds it.
    bin().args(["table"]).arg(&out).assert().success().stdout(contains("DAVIS J&F")).stdout(contains(&format!("{jf:.2}")));
    let golden = dir.path().join("golden.toml");
    std::fs::write(&golden, format!("version = \"1\"\n[[expect]]\nmodel = \"pico\"\nprotocol = \"davis\"\nmetric = \"j_and_f\"\nvalue = {:.4}\ntolerance = 0.01\n", jf + 1.0)).unwrap();
    bin().args(["check"]).arg(&out).arg("--reference").arg(&golden).assert().code(1);
    std::fs::write(&golden, format!("version = \"1\"\n[[expect]]\nmodel = \"pico\"\nprotocol = \"davis\"\nmetric = \"j_and_f\"\nvalue = {jf:.4}\ntolerance = 0.01\n")).unwrap();
    bin().args(["check"]).arg(&out).arg("--reference").arg(&golden).assert().success();
}

fn eval_fails(data: &Path, ckpt: &Path, out: &Path, names: &str) {
    let args = ["--protocol", "davis", "--device", "cpu", "--quiet", "short_side=64"];
    common::eval_fails(&args, ckpt, data, out, names, |p| p.join("masks").exists());
}

#[test]
fn bad_input_exits_2_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    common::run_py("ref_davis.py", &["vit", dir.path().join("model").to_str().unwrap()]);
    let ckpt = dir.path().join("model/pico.safetensors");
    let base = synth(&dir.path().join("base"), 2, 4, 96, 64);
    let copy = |name: &str| {
        let to = dir.path().join(name);
        let status = std::process::Command::new("cp").arg("-r").arg(&base).arg(&to).status().unwrap();
        assert!(status.success());
        to
    };
    let out = dir.path().join("runs");

    let d = copy("no_seq");
    std::fs::write(d.join("ImageSets/2017/val.txt"), "seq_000\nseq_404\n").unwrap();
    eval_fails(&d, &ckpt, &out, "seq_404");

    let d = copy("no_first");
    std::fs::remove_file(d.join("Annotations/480p/seq_001/00000.png")).unwrap();
    eval_fails(&d, &ckpt, &out, "seq_001/00000.png");

    let d = copy("sizes");
    image::RgbImage::from_pixel(80, 64, image::Rgb([9, 9, 9])).save(d.join("JPEGImages/480p/seq_001/00002.jpg")).unwrap();
    eval_fails(&d, &ckpt, &out, "seq_001/00002.jpg");

    let d = copy("rgb_png");
    image::RgbImage::from_pixel(96, 64, image::Rgb([0, 0, 0])).save(d.join("Annotations/480p/seq_000/00000.png")).unwrap();
    eval_fails(&d, &ckpt, &out, "not an indexed");

    let d = copy("no_frame_ann");
    std::fs::remove_file(d.join("Annotations/480p/seq_000/00002.png")).unwrap();
    eval_fails(&d, &ckpt, &out, "seq_000/00002.png");

    // A FIFO (would block for ever) or a device (would be read without end) in place of a frame, an annotation or
    // the list: refused by name as not a regular file.
    let mkfifo = |p: &Path| {
        std::fs::remove_file(p).unwrap();
        assert!(std::process::Command::new("mkfifo").arg(p).status().unwrap().success());
    };
    for (name, rel) in [("fifo_frame", "JPEGImages/480p/seq_001/00001.jpg"), ("fifo_ann", "Annotations/480p/seq_000/00001.png"), ("fifo_list", "ImageSets/2017/val.txt")] {
        let d = copy(name);
        mkfifo(&d.join(rel));
        eval_fails(&d, &ckpt, &out, &format!("{rel}: a named pipe (FIFO), not a regular file"));
    }
    let d = copy("zero_frame");
    let frame = d.join("JPEGImages/480p/seq_001/00001.jpg");
    std::fs::remove_file(&frame).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &frame).unwrap();
    eval_fails(&d, &ckpt, &out, "seq_001/00001.jpg: a character device, not a regular file");
}

/// A temperature for which exp(similarity / temperature) overflows float32 is refused naming the bound, before
/// any work (it would give NaN masks and a J&F of 0).
#[test]
fn a_temperature_that_overflows_float32_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(&dir.path().join("set"), 1, 4, 96, 64);
    let ckpt = dir.path().join("enc.safetensors");
    bin().args(["init", "-c", concat!(env!("CARGO_MANIFEST_DIR"), "/configs/lmim_tiny.toml"), "-o"]).arg(&ckpt).assert().success();
    for (t, ok) in [("0.011", false), ("0.0113", true)] {
        let a = bin()
            .args(["eval", "--protocol", "davis", "--device", "cpu", "--quiet", "short_side=64", &format!("temperature={t}")])
            .arg("--checkpoint")
            .arg(&ckpt)
            .arg("--data")
            .arg(&data)
            .arg("--output")
            .arg(dir.path().join("runs"))
            .assert();
        if ok {
            a.success();
        } else {
            a.code(2).stderr(contains("temperature")).stderr(contains("0.01127")).stderr(contains("overflows float32"));
        }
    }
}

/// The fraction of pixels of `masks` (ours) equal to the reference's in `reference`, over every frame.
fn agreement(set: &davis::DavisSet, masks: &Path, reference: &Path) -> f64 {
    let (mut same, mut total) = (0usize, 0usize);
    for seq in &set.sequences {
        for i in 0..seq.frames.len() {
            let name = format!("{}.png", seq.frame_stem(i));
            let ours = davis::read_indexed_png(&masks.join(&seq.name).join(&name)).unwrap();
            let theirs = read_labels(&reference.join(&seq.name).join(&name));
            same += ours.indices.iter().zip(&theirs).filter(|(a, b)| a == b).count();
            total += theirs.len();
        }
    }
    same as f64 / total as f64
}

/// DAVIS end to end where every part of the algorithm acts: videos longer than twice the context queue (it
/// evicts), an 8x16 grid larger than the 7x7 neighbourhood window. Our masks equal DINO's algorithm on every pixel
/// and the J&F equals the Python scorer's on them; each mutation of the reference (topk 1 and 10, no window,
/// window 2, n_last_frames 1 and 3, temperature x10) moves its masks off ours, so the 100 % bar catches a protocol
/// with any of those steps broken. (`norm_mask` left out changes no pixel of these generated videos, whose
/// objects propagate with confident masks: measured 100 % and 99.999 % agreement at topk 5 and 20; its effect is
/// checked in the unit test `norm_mask_decides_a_weak_object`.)
#[test]
fn davis_masks_equal_dinos_on_every_pixel_and_every_mutation_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(&dir.path().join("set"), 2, 8, 96, 48);
    common::run_py("ref_davis.py", &["vit", dir.path().join("model").to_str().unwrap()]);
    let ckpt = dir.path().join("model/pico.safetensors");
    let out = dir.path().join("runs");
    // n_last_frames 2 with 8 frames: the queue fills and evicts; neighbourhood 3: a 7x7 window on an 8x16 grid.
    let (n_last, topk, size) = (2, 5, 3);
    let sets = ["short_side=32".to_string(), format!("n_last_frames={n_last}"), format!("topk={topk}"), format!("neighborhood={size}")];
    let rec = eval_json(&sets, &ckpt, &data, &out);
    assert_eq!(rec["config"]["grid"], "8x16 (rows x cols)");
    assert_eq!(rec["config"]["input_size"], "64x32 (W x H)");
    let masks = PathBuf::from(rec["details"]["masks"].as_str().unwrap());
    let set = davis::open_set(&data, "val", "480p").unwrap();
    let variants = serde_json::json!([
        ["same", n_last, topk, size, 0.1, 1],
        ["topk1", n_last, 1, size, 0.1, 1],
        ["topk10", n_last, 10, size, 0.1, 1],
        ["no_window", n_last, topk, 0, 0.1, 1],
        ["window2", n_last, topk, 2, 0.1, 1],
        ["n_last1", 1, topk, size, 0.1, 1],
        ["n_last3", 3, topk, size, 0.1, 1],
        ["temperature_x10", n_last, topk, size, 1.0, 1],
    ]);
    let refs = dir.path().join("dino");
    common::run_py("ref_davis.py", &["propagate-many", data.to_str().unwrap(), ckpt.to_str().unwrap(), "32", refs.to_str().unwrap(), &variants.to_string()]);
    let agree = agreement(&set, &masks, &refs.join("same"));
    assert_eq!(agree, 1.0, "masks agree with DINO's on {agree:.6} of the pixels, not all");
    let json = dir.path().join("jf.json");
    common::run_py("ref_davis.py", &["jf", data.to_str().unwrap(), refs.join("same").to_str().unwrap(), json.to_str().unwrap()]);
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let (ours, theirs) = (rec["metrics"]["j_and_f"].as_f64().unwrap(), 100.0 * r["j_and_f"].as_f64().unwrap());
    assert!((ours - theirs).abs() < 1e-6, "J&F {ours} vs the Python scorer's {theirs} on the same masks");
    for v in variants.as_array().unwrap().iter().skip(1) {
        let name = v[0].as_str().unwrap();
        let agree = agreement(&set, &masks, &refs.join(name));
        assert!(agree < 1.0, "the mutation {name} leaves every pixel as it was: the bar would not catch it");
    }
}

/// A grid whose affinity matrices cannot fit in the memory this process may use (here `ulimit -v` of about 6 GB;
/// a patch-4 model at short side 480: a 120x256 grid, 8 context frames of 30,720^2 affinities) is refused before
/// any forward, exit 2 naming the size, the grid and `short_side`, not a panic in the propagation.
#[test]
fn a_propagation_too_large_for_the_memory_is_refused_naming_the_size() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(&dir.path().join("set"), 1, 4, 160, 72);
    common::run_py("ref_davis.py", &["vit", dir.path().join("model").to_str().unwrap()]);
    let ckpt = dir.path().join("model/pico.safetensors");
    let cmd = format!(
        "ulimit -v 6000000 && exec {} eval --protocol davis --device cpu --quiet short_side=480 'pos_embed=\"sincos\"' --checkpoint {} --data {} --output {}",
        assert_cmd::cargo::cargo_bin("lmim-bench").display(),
        ckpt.display(),
        data.display(),
        dir.path().join("runs").display()
    );
    let o = std::process::Command::new("bash").args(["-c", &cmd]).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("short_side") && e.contains("120x256 patch grid") && e.contains("GiB"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
}
