//! The fine-tuning recipe against references written from MAE's code and timm's (tests/py/ref_finetune.py):
//! layer-decay parameter groups on a timm ViT, the lr schedule at chosen steps, Mixup/CutMix with a given lambda
//! and box, label-smoothing targets, the losses, and drop-path rates per block.
mod common;

use std::collections::HashMap;

use lmim_bench::checkpoint;
use lmim_bench::data::augment::{box_lam, mix_batch, mixup_target, MixBox};
use lmim_bench::model::vit::GlobalPool;
use lmim_bench::model::{VisionTransformer, VitConfig};
use lmim_bench::protocols::finetune::{finetune_params, label_smoothing_ce, param_groups_lrd, soft_target_ce, FinetuneConfig};
use lmim_bench::train::schedule::lr_at_from_zero;
use serde_json::Value;
use tch::{nn, Device};

fn reference() -> (checkpoint::Checkpoint, Value) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ref.safetensors");
    common::run_py("ref_finetune.py", &[out.to_str().unwrap()]);
    let ck = checkpoint::load(&out).unwrap();
    let meta: Value = serde_json::from_str(&ck.metadata["result"]).unwrap();
    (ck, meta)
}

#[test]
fn recipe_matches_mae_and_timm() {
    let (ck, r) = reference();

    // --- Layer-wise lr decay groups over our pico ViT (timm names), compared with param_groups_lrd on timm's.
    let mut vcfg = VitConfig::from_arch("vit_pico_patch4_32").unwrap();
    vcfg.num_classes = 10;
    vcfg.global_pool = GlobalPool::Avg;
    let vs = nn::VarStore::new(Device::Cpu);
    let _model = VisionTransformer::new(&vs.root(), &vcfg);
    let mut shapes: Vec<(String, Vec<i64>)> = vs.variables().into_iter().map(|(n, t)| (n, t.size())).collect();
    shapes.sort();
    let ours: HashMap<String, _> = param_groups_lrd(&shapes, vcfg.depth, 0.05, 0.65).into_iter().map(|g| (g.name.clone(), g)).collect();
    let groups = r["groups"].as_object().unwrap();
    for (name, g) in groups {
        let o = ours.get(name).unwrap_or_else(|| panic!("timm parameter `{name}` missing from our model"));
        let shape: Vec<i64> = g["shape"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
        assert_eq!(shapes.iter().find(|(n, _)| n == name).unwrap().1, shape, "{name} shape");
        assert_eq!(o.layer_id, g["layer_id"].as_i64().unwrap(), "{name} layer id");
        assert!((o.lr_scale - g["lr_scale"].as_f64().unwrap()).abs() < 1e-15, "{name} lr scale {} vs {}", o.lr_scale, g["lr_scale"]);
        assert_eq!(o.weight_decay, g["weight_decay"].as_f64().unwrap(), "{name} weight decay");
    }
    // Ours also has the final `norm` (timm's avg-pool model replaces it by Identity): top layer, no decay.
    for (name, o) in &ours {
        if !groups.contains_key(name) {
            assert!(name.starts_with("norm."), "unexpected parameter {name}");
            assert_eq!((o.layer_id, o.lr_scale, o.weight_decay), (5, 1.0, 0.0));
        }
    }
    // The optimiser parameters carry the same settings, and pos_embed becomes trainable as in timm.
    let cfg = FinetuneConfig::default();
    let params = finetune_params(&vs, vcfg.depth, &cfg);
    assert_eq!(params.len(), shapes.len());
    for p in &params {
        assert_eq!((p.lr_scale, p.weight_decay), (ours[&p.name].lr_scale, ours[&p.name].weight_decay), "{}", p.name);
        assert!(p.tensor.requires_grad(), "{} is not trainable", p.name);
    }

    // --- Drop path: timm's torch.linspace(0, dp, depth), and the rates of timm's model itself.
    for (key, want) in r["drop_path"].as_object().unwrap() {
        let (dp, depth) = key.split_once('_').unwrap();
        let mut c = VitConfig::from_arch("vit_pico_patch4_32").unwrap();
        c.drop_path_rate = dp.parse().unwrap();
        c.depth = depth.parse().unwrap();
        let got = c.drop_path_rates();
        let want: Vec<f64> = want.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-7, "drop path {key}: {got:?} vs {want:?}");
        }
    }
    let mut c = VitConfig::from_arch("vit_pico_patch4_32").unwrap();
    c.drop_path_rate = 0.1;
    for (g, w) in c.drop_path_rates().iter().zip(r["drop_path_model"].as_array().unwrap()) {
        assert!((g - w.as_f64().unwrap()).abs() < 1e-7);
    }

    // --- lr schedule (MAE's adjust_learning_rate at fractional epochs), and the recipe's lr.
    let l = &r["lr"];
    assert!((cfg.lr() - l["lr"].as_f64().unwrap()).abs() < 1e-15, "lr {}", cfg.lr());
    assert_eq!(cfg.accum_iter(), 8);
    for (t, want) in l["t"].as_array().unwrap().iter().zip(l["values"].as_array().unwrap()) {
        let got = lr_at_from_zero(t.as_f64().unwrap(), cfg.lr(), cfg.min_lr, cfg.warmup_epochs, cfg.epochs as f64);
        assert!((got - want.as_f64().unwrap()).abs() < 1e-15, "lr at {t}: {got} vs {want}");
    }

    // --- Mixup / CutMix through timm's Mixup with the lambda and box given.
    let x = ck.get("x").unwrap();
    let y = ck.get("y").unwrap();
    let (h, w) = (x.size()[2], x.size()[3]);
    for (i, case) in r["mix_cases"].as_array().unwrap().iter().enumerate() {
        let mut lam = case["lam"].as_f64().unwrap();
        let bx = case["cutmix"].as_bool().unwrap().then(|| {
            let b: Vec<i64> = case["box"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
            MixBox { yl: b[0], yh: b[1], xl: b[2], xh: b[3] }
        });
        if let Some(b) = &bx {
            lam = box_lam(b, h, w);
        }
        let xm = if lam == 1.0 { x.shallow_clone() } else { mix_batch(x, lam, bx) };
        let target = mixup_target(y, 10, lam, 0.1);
        let dx = common::max_abs(&xm, ck.get(&format!("mix{i}_x")).unwrap());
        let dt = common::max_abs(&target, ck.get(&format!("mix{i}_target")).unwrap());
        assert!(dx < 1e-6 && dt < 1e-6, "mix case {i}: |dx| {dx}, |dtarget| {dt}");
        if let Some(lu) = case["lam_used"].as_f64() {
            assert!((lam - lu).abs() < 1e-6, "mix case {i}: lam {lam} vs timm {lu}");
        }
    }
    for s in [0.0, 0.1, 0.25] {
        let t = mixup_target(y, 10, 0.65, s);
        let d = common::max_abs(&t, ck.get(&format!("target_s{s:?}")).unwrap());
        assert!(d < 1e-6, "smoothing {s}: {d}");
    }

    // --- Losses: SoftTargetCrossEntropy and LabelSmoothingCrossEntropy.
    let logits = ck.get("logits").unwrap();
    let soft = soft_target_ce(logits, ck.get("mix0_target").unwrap()).double_value(&[]);
    assert!((soft - ck.get("soft_ce").unwrap().double_value(&[0])).abs() < 1e-6);
    let ls = label_smoothing_ce(logits, y, 0.1).double_value(&[]);
    assert!((ls - ck.get("ls_ce").unwrap().double_value(&[0])).abs() < 1e-6);
}

#[test]
fn protocol_file_equals_defaults() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("protocols/finetune.toml");
    let file: FinetuneConfig = lmim_bench::config::load(Some(&path), &[]).unwrap();
    assert_eq!(file, FinetuneConfig::default());
    file.validate().unwrap();
}
