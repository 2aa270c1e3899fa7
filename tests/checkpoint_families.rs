//! Checkpoints of the methods a benchmark compares against, in the layouts their own training code writes
//! (tests/py/make_families.py: MAE, DINO, iBOT, MoCo v3, I-JEPA, DINOv2 released and teacher files, Latent MIM,
//! timm): `convert` detects each layout, takes the right sub-model, drops the rest and gives tensors identical to
//! timm's state dict of that encoder; lmim-bench's features from the original file equal timm's forward within
//! 1e-4 (fp32, CPU); ambiguous files are refused with the candidates, and `--from` forces a layout.
mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use assert_cmd::Command;
use lmim_bench::checkpoint::{self, load_vit};
use lmim_bench::protocols::extract::{image_features, FeatureKind};
use tch::Device;

const TOL: f64 = 1e-4;

fn bin() -> Command {
    Command::cargo_bin("lmim-bench").unwrap()
}

/// The generated checkpoints, made once per test binary.
fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let parent = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        // What earlier runs left behind (an hour old or more, so that concurrent runs keep theirs).
        for e in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
            let old = e.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok()).is_some_and(|age| age.as_secs() > 3600);
            if old && e.file_name().to_string_lossy().starts_with("checkpoint_families-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let dir = parent.join(format!("checkpoint_families-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        common::run_py("make_families.py", &[dir.to_str().unwrap()]);
        dir
    })
}

struct Case {
    name: &'static str,
    family: &'static str,
    submodel: &'static str,
    /// The family's evaluation feature recorded with the checkpoint (None: the protocol's default, cls here).
    eval_feature: Option<&'static str>,
    /// Groups that must be reported as dropped (prefixes of the `dropped` entries).
    dropped: &'static [&'static str],
}

const CASES: &[Case] = &[
    Case { name: "timm", family: "timm", submodel: "", eval_feature: None, dropped: &[] },
    Case { name: "mae", family: "mae", submodel: "", eval_feature: None, dropped: &["decoder_blocks", "decoder_pred", "mask_token"] },
    Case { name: "dino", family: "dino", submodel: "teacher.backbone.", eval_feature: Some("cls"), dropped: &["teacher.head", "student.module.backbone", "student.module.head", "optimizer", "dino_loss"] },
    Case { name: "ibot", family: "ibot", submodel: "teacher.backbone.", eval_feature: Some("cls"), dropped: &["teacher.backbone.masked_embed", "teacher.head", "student.module", "ibot_loss"] },
    Case { name: "mocov3", family: "mocov3", submodel: "module.base_encoder.", eval_feature: Some("cls"), dropped: &["module.base_encoder.head", "module.momentum_encoder", "module.predictor"] },
    Case { name: "ijepa", family: "ijepa", submodel: "target_encoder.module.", eval_feature: Some("avg"), dropped: &["encoder", "predictor", "opt"] },
    Case { name: "dinov2_reg", family: "dinov2", submodel: "", eval_feature: Some("cls"), dropped: &["mask_token"] },
    Case { name: "dinov2_teacher", family: "dinov2", submodel: "teacher.backbone.", eval_feature: Some("cls"), dropped: &["teacher.backbone.mask_token", "teacher.dino_head", "teacher.ibot_head"] },
    Case { name: "lmim", family: "lmim", submodel: "module.encoder.", eval_feature: None, dropped: &["module.encoder.head", "module.target_encoder", "module.decoder"] },
];

fn convert_json(input: &Path, output: &Path, extra: &[&str]) -> serde_json::Value {
    let out = bin().arg("convert").arg(input).arg(output).arg("--json").args(extra).output().unwrap();
    assert!(out.status.success(), "convert {}: {}", input.display(), String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn check_case(dir: &Path, c: &Case) -> (f64, f64) {
    let pth = dir.join(format!("{}.pth", c.name));
    let st = dir.join(format!("{}.safetensors", c.name));
    let report = convert_json(&pth, &st, &[]);
    let src = &report["source"];
    assert_eq!(src["family"], c.family, "{}: {report}", c.name);
    assert_eq!(src["submodel"], c.submodel, "{}: {report}", c.name);
    assert_eq!(src["chosen_by"], "detected");
    assert_eq!(src["eval_feature"].as_str(), c.eval_feature, "{}", c.name);
    let dropped: Vec<String> = serde_json::from_value(src["dropped"].clone()).unwrap();
    for d in c.dropped {
        assert!(dropped.iter().any(|x| x.starts_with(d)), "{}: `{d}` not reported as dropped: {dropped:?}", c.name);
    }
    let sha = checkpoint::sha256_file(&pth).unwrap();
    assert_eq!(src["source_sha256"], sha.as_str());

    // The converted tensors are timm's state dict, bit for bit (pos_embed resampled as timm does included).
    let got = checkpoint::load(&st).unwrap();
    let want = checkpoint::load(&dir.join(format!("{}_ref.safetensors", c.name))).unwrap();
    let mut gn: Vec<&str> = got.tensors.iter().map(|(n, _)| n.as_str()).collect();
    let mut wn: Vec<&str> = want.tensors.iter().map(|(n, _)| n.as_str()).collect();
    gn.sort();
    wn.sort();
    assert_eq!(gn, wn, "{}: tensor names differ from timm's state dict", c.name);
    for (name, t) in &want.tensors {
        let g = got.get(name).unwrap();
        assert_eq!(g.size(), t.size(), "{}: `{name}` shape", c.name);
        assert!(g.equal(t), "{}: `{name}` differs from timm's by {}", c.name, common::max_abs(g, t));
    }
    assert_eq!(got.metadata.get("family").map(String::as_str), Some(c.family));
    assert_eq!(got.metadata.get("source_sha256"), Some(&sha));
    assert_eq!(got.metadata.get("submodel").map(String::as_str), Some(c.submodel));

    // Features straight from the original file equal timm's forward.
    let io = checkpoint::load(&dir.join(format!("{}_io.safetensors", c.name))).unwrap();
    let images = io.get("images").unwrap();
    let loaded = load_vit(&pth, None, Device::Cpu, 0).unwrap_or_else(|e| panic!("{}: {e}", c.name));
    assert!(loaded.report.missing.is_empty(), "{}: {}", c.name, loaded.report.summary());
    assert_eq!(loaded.source.family, c.family);
    let kind = FeatureKind::parse(c.eval_feature.unwrap_or("cls")).unwrap();
    let (tokens, feat) = tch::no_grad(|| (loaded.model.forward_features(images, &[], false).tokens, image_features(&loaded.model, images, kind, 1)));
    let tok_err = common::max_abs(&tokens, io.get("tokens").unwrap());
    let feat_err = common::max_abs(&feat, io.get("feature").unwrap());
    assert!(tok_err < TOL, "{}: tokens differ from timm's by {tok_err}", c.name);
    assert!(feat_err < TOL, "{}: {kind} feature differs from timm's by {feat_err}", c.name);

    // The converted file builds the same model and names the same source.
    let again = load_vit(&st, None, Device::Cpu, 0).unwrap();
    assert_eq!(again.model.cfg, loaded.model.cfg, "{}", c.name);
    assert_eq!(again.source.family, c.family);
    assert_eq!(again.source.source_sha256, sha);
    assert_eq!(again.source.eval_feature.as_deref(), c.eval_feature);
    let f2 = tch::no_grad(|| image_features(&again.model, images, kind, 1));
    assert!(f2.equal(&feat), "{}: converted file gives other features", c.name);
    eprintln!("{:>15}: {} ({}), tokens max |diff| {tok_err:.2e}, {kind} feature {feat_err:.2e}", c.name, loaded.model.cfg.arch, c.family);
    (tok_err, feat_err)
}

#[test]
fn every_family_converts_to_timms_tensors_and_features() {
    let dir = fixtures();
    for c in CASES {
        check_case(dir, c);
    }
    // The variants the families need, as read from the files.
    let cfg = |n: &str| load_vit(&dir.join(format!("{n}.pth")), None, Device::Cpu, 0).unwrap().model.cfg;
    let d2 = cfg("dinov2_reg");
    assert_eq!((d2.patch_size, d2.img_size, d2.reg_tokens, d2.no_embed_class, d2.init_values.is_some()), (14, 224, 4, true, true), "{d2:?}");
    assert_eq!(d2.arch, "vit_pico_patch14_reg4_dinov2");
    let t2 = cfg("dinov2_teacher");
    assert_eq!((t2.img_size, t2.depth, t2.reg_tokens, t2.no_embed_class), (224, 4, 0, false), "{t2:?}");
    let ij = cfg("ijepa");
    assert!(!ij.class_token && ij.patch_size == 14, "{ij:?}");
    assert_eq!(cfg("mocov3").num_heads, 12, "MoCo v3's ViT-S has 12 heads");
    assert_eq!(cfg("lmim").arch, "vit_pico_patch4_32");
}

#[test]
fn pos_embed_resamples_as_timm_at_another_size() {
    // `convert --img-size` resamples any file's table as timm's resample_abs_pos_embed; DINOv2's 518-px table at
    // 224 was checked above against timm's own checkpoint_filter_fn. Back to the native size is the identity.
    let dir = fixtures();
    let out = dir.join("dinov2_reg_518.safetensors");
    let report = convert_json(&dir.join("dinov2_reg.pth"), &out, &["--img-size", "518"]);
    assert_eq!(report["config"]["img_size"], 518);
    assert!(report["source"].get("pos_embed_resampled").is_none(), "{report}");
    let raw = checkpoint::pth::load(&dir.join("dinov2_reg.pth")).unwrap();
    let pe = raw.get("pos_embed").unwrap();
    let got = checkpoint::load(&out).unwrap();
    assert!(got.get("pos_embed").unwrap().equal(&pe.narrow(1, 1, 37 * 37)), "registers: the CLS row leaves pos_embed");
    // A size that is not a multiple of the patch is bad input.
    bin().arg("convert").arg(dir.join("dinov2_reg.pth")).arg(dir.join("bad.safetensors")).args(["--img-size", "100"]).assert().code(2);
}

#[test]
fn ambiguous_files_are_refused_and_from_forces_a_layout() {
    let dir = fixtures();
    let both = dir.join("dino_or_ibot.pth");
    let out = bin().arg("convert").arg(&both).arg(dir.join("x.safetensors")).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("dino_or_ibot.pth") && err.contains("ambiguous") && err.contains("dino, ibot") && err.contains("--from"), "{err}");

    let report = convert_json(&both, &dir.join("forced.safetensors"), &["--from", "ibot"]);
    assert_eq!(report["source"]["family"], "ibot");
    assert_eq!(report["source"]["chosen_by"], "--from");
    assert_eq!(report["source"]["submodel"], "teacher.backbone.");

    // A layout the file does not have, and an unknown family.
    let out = bin().arg("convert").arg(dir.join("dino.pth")).arg(dir.join("y.safetensors")).args(["--from", "ijepa"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("dino.pth") && err.contains("no ijepa encoder"), "{err}");
    let out = bin().arg("convert").arg(dir.join("dino.pth")).arg(dir.join("y.safetensors")).args(["--from", "beit"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("known: timm, mae, dino"));
}

#[test]
fn eval_uses_the_family_feature_and_records_where_the_encoder_came_from() {
    let dir = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("demo");
    bin().args(["data", "prepare-demo", "--train-per-class", "3", "--val-per-class", "2", "--out"]).arg(&data).assert().success();
    let ijepa = dir.join("ijepa.pth");
    let out = tmp.path().join("runs");
    let knn = |extra: &[&str]| {
        bin()
            .args(["eval", "--protocol", "knn", "--device", "cpu", "--quiet", "--no-cache", "--k", "1", "--headline-k", "1", "--json", "--name", "ijepa-tiny"])
            .arg("--checkpoint")
            .arg(&ijepa)
            .arg("--data")
            .arg(&data)
            .arg("--output")
            .arg(&out)
            .args(extra)
            .output()
            .unwrap()
    };
    let res = knn(&[]);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let rec: serde_json::Value = serde_json::from_slice(&res.stdout).unwrap();
    // No CLS token: the family's average pool, not the protocol file's `cls`.
    assert_eq!(rec["config"]["feature"], "avg", "{}", rec["config"]);
    let src = &rec["checkpoint_source"];
    assert_eq!(src["family"], "ijepa");
    assert_eq!(src["submodel"], "target_encoder.module.");
    assert_eq!(src["source_sha256"], checkpoint::sha256_file(&ijepa).unwrap().as_str());
    assert_eq!(rec["checkpoint_sha256"], src["source_sha256"]);
    // Told otherwise, it obeys, and a CLS feature of a model without one is bad input.
    let res = knn(&["--feature", "cls"]);
    assert_eq!(res.status.code(), Some(2), "{}", String::from_utf8_lossy(&res.stderr));
    assert!(String::from_utf8_lossy(&res.stderr).contains("no CLS token"));

    // The table puts the run right before the published I-JEPA row.
    let t = bin().args(["table", "--format", "markdown", "-o", "-"]).arg(&out).output().unwrap();
    assert!(t.status.success(), "{}", String::from_utf8_lossy(&t.stderr));
    let md = String::from_utf8_lossy(&t.stdout);
    let lines: Vec<&str> = md.lines().collect();
    let run = lines.iter().position(|l| l.contains("ijepa-tiny (I-JEPA)")).unwrap_or_else(|| panic!("{md}"));
    assert!(lines[run + 1].contains("I-JEPA") && lines[run + 1].contains("(published)"), "{md}");
}
