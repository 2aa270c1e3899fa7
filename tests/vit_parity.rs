//! Numerical parity of the ViT encoder with timm (fp32, CPU), and the checkpoint round trips.
mod common;

use std::path::Path;

use lmim_bench::checkpoint::{self, load_vit};
use lmim_bench::model::vit::GlobalPool;
use tch::{Device, Tensor};

/// Tolerance on the final tokens, max abs difference (fp32; the tokens are LayerNorm outputs of order 1).
const TOL: f64 = 1e-4;

fn io(dir: &Path, name: &str) -> checkpoint::Checkpoint {
    checkpoint::load(&dir.join(format!("{name}_io.safetensors"))).unwrap()
}

fn check_model(dir: &Path, name: &str) {
    let loaded = load_vit(&dir.join(format!("{name}.safetensors")), None, Device::Cpu, 0).unwrap();
    assert_eq!(loaded.model.cfg.arch, name, "architecture inferred from shapes");
    assert!(loaded.report.missing.is_empty() && loaded.report.unexpected.is_empty(), "{}", loaded.report.summary());
    let io = io(dir, name);
    let out = tch::no_grad(|| loaded.model.forward_features(io.get("images").unwrap(), &[1], false));
    let err = common::max_abs(&out.tokens, io.get("tokens").unwrap());
    assert!(err < TOL, "{name}: final tokens differ from timm by {err}");
    let err = common::max_abs(&out.intermediates[0], io.get("block_1").unwrap());
    assert!(err < TOL, "{name}: block 1 output differs from timm by {err}");
    assert!(common::max_abs(&out.cls(), io.get("cls").unwrap()) < TOL);
    assert!(common::max_abs(&out.patch_tokens().mean_dim(1, false, None), io.get("avg").unwrap()) < TOL);

    // .pth import (nested under "model", "module." prefix) -> safetensors -> load gives identical outputs.
    let pth = dir.join(format!("{name}.pth"));
    let from_pth = load_vit(&pth, None, Device::Cpu, 0).unwrap();
    let st = dir.join(format!("{name}_converted.safetensors"));
    checkpoint::save_vit(&st, &from_pth.vs, &from_pth.model.cfg, &Default::default()).unwrap();
    let reloaded = load_vit(&st, None, Device::Cpu, 0).unwrap();
    let again = tch::no_grad(|| reloaded.model.forward_features(io.get("images").unwrap(), &[], false));
    assert!(again.tokens.equal(&out.tokens), "{name}: .pth -> safetensors round trip changed the outputs");
}

/// A timm classifier (`global_pool` avg or token, 10 classes) loads with its pooling detected from its keys, gives
/// timm's logits, and its export loads back into timm with `strict=True`.
fn check_classifier(dir: &Path, name: &str, pool: GlobalPool) {
    let path = dir.join(format!("{name}.safetensors"));
    let loaded = load_vit(&path, None, Device::Cpu, 10).unwrap();
    assert_eq!(loaded.model.cfg.global_pool, pool, "{name}: pooling read from the keys");
    assert_eq!(loaded.model.norm.is_none(), pool == GlobalPool::Avg, "{name}: an average-pooled model has no final norm");
    assert!(loaded.report.missing.is_empty() && loaded.report.unexpected.is_empty(), "{name}: {}", loaded.report.summary());
    let io = io(dir, name);
    let logits = tch::no_grad(|| loaded.model.forward(io.get("images").unwrap(), false));
    let err = common::max_abs(&logits, io.get("logits").unwrap());
    assert!(err < TOL, "{name}: logits differ from timm by {err}");
    let export = dir.join(format!("{name}_export.safetensors"));
    checkpoint::save_vit(&export, &loaded.vs, &loaded.model.cfg, &Default::default()).unwrap();
    let io_path = dir.join(format!("{name}_io.safetensors"));
    let pool_name = if pool == GlobalPool::Avg { "avg" } else { "token" };
    common::run_py("timm_strict_load.py", &[export.to_str().unwrap(), io_path.to_str().unwrap(), pool_name]);
}

#[test]
fn vit_matches_timm_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    common::run_py("ref_vit.py", &[dir.path().to_str().unwrap()]);
    check_model(dir.path(), "vit_pico_patch4_32");
    check_model(dir.path(), "vit_base_patch16_224");
    check_classifier(dir.path(), "pico_cls_avg", GlobalPool::Avg);
    check_classifier(dir.path(), "pico_cls_token", GlobalPool::Token);
}

#[test]
fn sincos_pos_embed_matches_formula() {
    use lmim_bench::model::pos_embed::{sincos_2d, PosEmbedKind};
    // Latent MIM: coordinates linspace(0, 1, 14) * 14; x (column) half first; CLS row zero.
    let pe = sincos_2d(8, 14, PosEmbedKind::Lmim, true);
    assert_eq!(pe.size(), vec![197, 8]);
    assert_eq!(pe.get(0).abs().sum(tch::Kind::Float).double_value(&[]), 0.0);
    let (r, c) = (3.0f64, 5.0f64);
    let (u, v) = (c * 14.0 / 13.0, r * 14.0 / 13.0);
    let w1 = 1.0 / 10000f64.powf(0.5);
    let expect = [u.sin(), (u * w1).sin(), u.cos(), (u * w1).cos(), v.sin(), (v * w1).sin(), v.cos(), (v * w1).cos()];
    let row = pe.get(1 + 3 * 14 + 5);
    for (i, e) in expect.iter().enumerate() {
        assert!((row.double_value(&[i as i64]) - e).abs() < 1e-6, "element {i}");
    }
    // Another grid: the reference scales linspace(0, 1, G) by G, i.e. u = c * G / (G - 1) (8 / 7 here).
    let pe8 = sincos_2d(8, 8, PosEmbedKind::Lmim, false);
    let u: f64 = 5.0 * 8.0 / 7.0;
    assert!((pe8.get(5).double_value(&[0]) - u.sin()).abs() < 1e-6, "column 5 of an 8 x 8 grid");
}

#[test]
fn shape_mismatch_and_corrupt_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let cfg = lmim_bench::model::VitConfig::from_arch("vit_pico_patch4_32").unwrap();
    let _m = lmim_bench::model::VisionTransformer::new(&vs.root(), &cfg);
    let good = dir.path().join("pico.safetensors");
    checkpoint::save_vit(&good, &vs, &cfg, &Default::default()).unwrap();
    // A declared arch that contradicts the metadata.
    let err = load_vit(&good, Some("vit_tiny_patch16_224"), Device::Cpu, 0).err().unwrap().to_string();
    assert!(err.contains("pico.safetensors") && err.contains("vit_pico_patch4_32"), "{err}");
    // A truncated file.
    let bytes = std::fs::read(&good).unwrap();
    let bad = dir.path().join("truncated.safetensors");
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_vit(&bad, None, Device::Cpu, 0).err().unwrap().to_string();
    assert!(err.contains("truncated.safetensors"), "{err}");
    // A tensor with the wrong shape.
    let mut ck = checkpoint::load(&good).unwrap();
    for (n, t) in ck.tensors.iter_mut() {
        if n == "blocks.0.mlp.fc1.weight" {
            *t = Tensor::zeros([10, 96], (tch::Kind::Float, Device::Cpu));
        }
    }
    let wrong = dir.path().join("wrong.safetensors");
    checkpoint::save(&wrong, &ck.tensors, &ck.metadata).unwrap();
    let err = load_vit(&wrong, None, Device::Cpu, 0).err().unwrap().to_string();
    assert!(err.contains("blocks.0.mlp.fc1.weight") && err.contains("[10, 96]"), "{err}");
}
