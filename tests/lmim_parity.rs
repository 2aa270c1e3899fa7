//! Latent MIM training step against a PyTorch reference written from the spec (tests/py/ref_lmim_step.py):
//! loss terms, gradients, one AdamW step and the EMA update, fp32 on the CPU. Also the schedules at the values the
//! spec lists, and the ViT-B parameter counts and weight-decay groups the spec verified on the reference code.
mod common;

use lmim_bench::checkpoint;
use lmim_bench::model::lmim::{decays, patchify, Lmim, LmimModelConfig, Views};
use lmim_bench::train::optim::{AdamW, Param};
use lmim_bench::train::schedule::{lr_at, momentum_at, sim_target_at};
use tch::{nn, Device, Kind, Tensor};

fn tiny_cfg() -> LmimModelConfig {
    LmimModelConfig {
        encoder: "vit_pico".into(),
        decoder_depth: 2,
        decoder_dim: 64,
        decoder_heads: 4,
        proj_mlp_depth: 3,
        proj_mlp_dim: 128,
        num_vis: 8,
        patch_gap: 1,
        ..Default::default()
    }
}

#[test]
fn one_training_step_matches_pytorch_reference() {
    tch::manual_seed(3);
    let cfg = tiny_cfg();
    let vs = nn::VarStore::new(Device::Cpu);
    let model = Lmim::new(&vs, &cfg).unwrap();
    // A target that differs from the encoder, as after some training, so the EMA and the stop-gradient matter.
    tch::no_grad(|| {
        for (_, mut t) in model.target_vars(&vs) {
            let _ = t.g_add_(&(t.randn_like() * 0.01));
        }
    });
    let (b, size, patch, gap) = (3i64, 40i64, 4i64, 1i64);
    let grid = size / (patch + gap);
    let images = Tensor::randn([b, 3, size, size], (Kind::Float, Device::Cpu));
    let oy = Tensor::randint(gap, [b, grid, grid], (Kind::Int64, Device::Cpu));
    let ox = Tensor::randint(gap, [b, grid, grid], (Kind::Int64, Device::Cpu));
    let ids = Tensor::stack(&(0..b).map(|_| Tensor::randperm(grid * grid, (Kind::Int64, Device::Cpu))).collect::<Vec<_>>(), 0);
    let (sim_target, lr, wd, momentum) = (0.6, 1e-3, 0.05, 0.9);

    let dir = tempfile::tempdir().unwrap();
    let mut tensors: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    tensors.extend([("images".into(), images.shallow_clone()), ("oy".into(), oy.shallow_clone()), ("ox".into(), ox.shallow_clone()), ("ids".into(), ids.shallow_clone())]);
    let meta_cfg = serde_json::json!({
        "patch": patch, "gap": gap, "num_vis": cfg.num_vis, "tau": cfg.tau, "avg_sim_coeff": cfg.avg_sim_coeff,
        "sim_target": sim_target, "dim": 96, "depth": 4, "heads": 3, "proj_depth": 3, "dec_heads": 4, "dec_depth": 2,
        "lr": lr, "wd": wd, "momentum": momentum,
    });
    let meta = [("config".to_string(), meta_cfg.to_string())].into_iter().collect();
    let inp = dir.path().join("in.safetensors");
    let outp = dir.path().join("out.safetensors");
    checkpoint::save(&inp, &tensors, &meta).unwrap();
    common::run_py("ref_lmim_step.py", &[inp.to_str().unwrap(), outp.to_str().unwrap()]);
    let reference = checkpoint::load(&outp).unwrap();
    let r = |k: &str| reference.get(k).unwrap_or_else(|| panic!("reference lacks {k}")).shallow_clone();

    let views = Views {
        patches: patchify(&images, patch, gap, &oy, &ox),
        vis_pid: ids.narrow(1, 0, cfg.num_vis),
        mask_pid: ids.narrow(1, cfg.num_vis, grid * grid - cfg.num_vis),
    };
    let out = model.forward(&views, sim_target, true);
    // Loss terms: relative 1e-4.
    for (name, v) in [("loss", &out.loss), ("loss_nce", &out.loss_main), ("loss_reg", &out.loss_reg), ("avg_sim_pred", &out.avg_sim_pred), ("avg_sim_vis", &out.avg_sim_vis), ("avg_sim_trg", &out.avg_sim_trg)] {
        let (mine, theirs) = (v.double_value(&[]), r(name).double_value(&[0]));
        assert!((mine - theirs).abs() <= 1e-4 * theirs.abs().max(1e-3), "{name}: {mine} vs reference {theirs}");
    }
    out.loss.backward();
    // Gradients: max abs difference within 1e-3 of the tensor's largest reference gradient (+1e-7).
    let params: Vec<Param> = model
        .trainable_vars(&vs)
        .into_iter()
        .map(|(name, t)| {
            let g = t.grad();
            let rg = r(&format!("grad.{name}"));
            let scale = rg.abs().max().double_value(&[]);
            let err = common::max_abs(&g, &rg);
            assert!(err <= 1e-3 * scale + 1e-7, "gradient of {name} differs by {err} (scale {scale})");
            // The optimiser is tested on identical gradients: Adam's first step divides by |g|, which would
            // amplify the last-bit differences of near-zero gradients.
            tch::no_grad(|| g.shallow_clone().copy_(&rg));
            let weight_decay = if decays(&name, &t) { wd } else { 0.0 };
            Param { name, tensor: t, weight_decay, lr_scale: 1.0 }
        })
        .collect();
    let mut opt = AdamW::new(params, 0.9, 0.95, 1e-8);
    opt.step(lr);
    for p in &opt.params {
        let err = common::max_abs(&p.tensor, &r(&format!("adamw.{}", p.name)));
        assert!(err < 1e-6, "AdamW update of {} differs by {err}", p.name);
    }
    model.ema_update(&vs, momentum);
    for (name, t) in model.target_vars(&vs) {
        let err = common::max_abs(&t, &r(&format!("ema.{name}")));
        assert!(err < 1e-6, "EMA of {name} differs by {err}");
    }
}

#[test]
fn schedules_match_the_reference_values() {
    // Values listed in the spec (section 5.2 and 2.4/4.2), lr = 2.4e-3, min_lr = 6e-4, 40 warmup of 800 epochs.
    for (t, want) in [(0.0, 6e-4), (20.0, 1.5e-3), (40.0, 2.4e-3), (200.0, 2.21e-3), (420.0, 1.5e-3), (600.0, 8.9e-4), (800.0, 6e-4)] {
        let got = lr_at(t, 2.4e-3, 6e-4, 40.0, 800.0);
        assert!((got - want).abs() <= 0.005 * want + 1e-6, "lr({t}) = {got}, spec {want}");
    }
    for (t, want) in [(0.0, 0.99), (200.0, 0.99146), (420.0, 0.99539), (600.0, 0.99854), (800.0, 1.0)] {
        let got = momentum_at(t, 0.99, 800.0);
        assert!((got - want).abs() < 1e-5, "m({t}) = {got}, spec {want}");
    }
    for (t, want) in [(200.0, 0.677), (420.0, 0.480), (800.0, 0.25)] {
        let got = sim_target_at(t, 0.75, 0.25, 800.0);
        assert!((got - want).abs() < 1e-3, "s({t}) = {got}, spec {want}");
    }
}

#[test]
fn vit_base_parameter_counts_and_decay_groups_match_the_reference() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = Lmim::new(&vs, &LmimModelConfig::default()).unwrap();
    let count = |v: &[(String, Tensor)]| v.iter().map(|(_, t)| t.numel() as i64).sum::<i64>();
    let enc = model.encoder_vars(&vs);
    let all = model.trainable_vars(&vs);
    assert_eq!(count(&enc), 108_733_952, "encoder parameters");
    assert_eq!(count(&all) - count(&enc), 13_404_928, "decoder parameters");
    let (no_decay, decay): (Vec<_>, Vec<_>) = all.into_iter().partition(|(n, t)| !decays(n, t));
    assert_eq!((no_decay.len(), decay.len()), (156, 76), "tensors without / with weight decay");
    assert_eq!(((count(&no_decay) as f64) / 1e4).round() / 100.0, 1.16, "no-decay values (millions)");
    assert_eq!(((count(&decay) as f64) / 1e4).round() / 100.0, 120.98, "decay values (millions)");
    assert!(decay.iter().any(|(n, _)| n == "decoder.mask_token") && no_decay.iter().any(|(n, _)| n == "encoder.patch_embed.proj.weight"));
}

/// `bench step-parity --reference`: the trainer's own step (its views, staging, EMA) against the PyTorch step on the
/// input `--write-reference-input` wrote passes; the same with one reference gradient off by 1 % exits 1.
#[test]
fn step_parity_against_the_pytorch_step_passes_and_a_perturbed_reference_fails() {
    let dir = tempfile::tempdir().unwrap();
    let (inp, outp, bad) = (dir.path().join("in.safetensors"), dir.path().join("out.safetensors"), dir.path().join("bad.safetensors"));
    let cfg = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/lmim_tiny.toml");
    let bench = |extra: &[&std::ffi::OsStr]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_lmim-bench"))
            .args(["bench", "--device", "cpu", "step-parity", "-c", cfg, "--batch-size", "3"])
            .args(extra)
            .env("OMP_NUM_THREADS", "1")
            .output()
            .unwrap()
    };
    let o = bench(&["--write-reference-input".as_ref(), inp.as_os_str()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    common::run_py("ref_lmim_step.py", &[inp.to_str().unwrap(), outp.to_str().unwrap()]);
    let o = bench(&["--reference".as_ref(), outp.as_os_str()]);
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(o.status.code(), Some(0), "{report}");
    let r = &report["pytorch_reference"];
    assert!(r["pass"].as_bool().unwrap() && r["gradients"].as_u64().unwrap() >= 40, "{report}");
    assert!(r["loss_rel_diff"].as_f64().unwrap() <= 1e-4, "{report}");

    let ckpt = checkpoint::load(&outp).unwrap();
    let mut tensors: Vec<(String, Tensor)> = ckpt.tensors.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect();
    let (_, g) = tensors.iter_mut().find(|(k, _)| k == "grad.decoder.head.weight").expect("the decoder head's gradient");
    *g = &*g * 1.01;
    checkpoint::save(&bad, &tensors, &Default::default()).unwrap();
    let o = bench(&["--reference".as_ref(), bad.as_os_str()]);
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(o.status.code(), Some(1), "{report}");
    assert_eq!(report["pytorch_reference"]["worst_tensor"], "decoder.head.weight", "{report}");
}
