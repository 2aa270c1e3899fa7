//! The MAE linear-probe head and LARS against a PyTorch reference written from the formulas (1e-5), the
//! probe's lr schedule at chosen steps, and top-k counting.
mod common;

use lmim_bench::checkpoint;
use lmim_bench::protocols::linear::{LinearConfig, ProbeHead};
use lmim_bench::protocols::probe::BnHead;
use lmim_bench::train::step::topk_correct;
use lmim_bench::train::optim::Lars;
use lmim_bench::train::schedule::lr_at_from_zero;
use tch::{nn, Device, Kind, Tensor};

#[test]
fn lars_and_bn_head_match_reference() {
    tch::manual_seed(7);
    let (steps, b, d, c) = (4i64, 32i64, 24i64, 5i64);
    let vs = nn::VarStore::new(Device::Cpu);
    let head = ProbeHead::new(&vs.root(), d, c);
    tch::no_grad(|| head.bias.shallow_clone().copy_(&(Tensor::randn([c], (Kind::Float, Device::Cpu)) * 0.1)));
    let feats = Tensor::randn([steps, b, d], (Kind::Float, Device::Cpu)) * 3.0 + 1.0;
    let labels = Tensor::randint(c, [steps, b], (Kind::Int64, Device::Cpu));
    let lrs = [0.5, 1.0, 2.0, 0.25];
    let (wd, momentum, trust) = (0.01, 0.9, 0.001);
    let dir = tempfile::tempdir().unwrap();
    let inp = dir.path().join("in.safetensors");
    let outp = dir.path().join("out.safetensors");
    let meta = [("config".to_string(), serde_json::json!({"lr": lrs, "wd": wd, "momentum": momentum, "trust": trust}).to_string())].into_iter().collect();
    checkpoint::save(&inp, &[("weight".into(), head.weight.shallow_clone()), ("bias".into(), head.bias.shallow_clone()), ("feats".into(), feats.shallow_clone()), ("labels".into(), labels.shallow_clone())], &meta).unwrap();
    common::run_py("ref_lars.py", &[inp.to_str().unwrap(), outp.to_str().unwrap()]);
    let r = checkpoint::load(&outp).unwrap();

    let mut opt = Lars::new(head.params(), momentum, trust);
    for p in &mut opt.params {
        p.weight_decay = wd;
    }
    for s in 0..steps {
        let loss = head.forward(&feats.get(s), true).cross_entropy_for_logits(&labels.get(s));
        let want = r.get("losses").unwrap().double_value(&[s]);
        assert!((loss.double_value(&[]) - want).abs() < 1e-5, "loss at step {s}");
        opt.zero_grad();
        loss.backward();
        opt.step(lrs[s as usize]);
        for (name, t) in [("weight", &head.weight), ("bias", &head.bias), ("mean", &head.running_mean), ("var", &head.running_var)] {
            let err = common::max_abs(t, r.get(&format!("{name}.{s}")).unwrap());
            assert!(err < 1e-5, "{name} after step {s} differs by {err}");
        }
    }
}

#[test]
fn probe_lr_schedule_matches_mae_at_chosen_steps() {
    // MAE: lr = blr * 16384 / 256 = 6.4, linear warmup from 0 over 10 epochs, cosine to 0 at 90.
    let cfg = LinearConfig::default();
    assert!((cfg.lr() - 6.4).abs() < 1e-12);
    assert_eq!(cfg.accum_iter(), 32);
    let at = |t: f64| lr_at_from_zero(t, cfg.lr(), cfg.min_lr, cfg.warmup_epochs, cfg.epochs);
    for (t, want) in [(0.0, 0.0), (5.0, 3.2), (10.0, 6.4), (50.0, 3.2), (90.0, 0.0)] {
        assert!((at(t) - want).abs() < 1e-9, "lr({t}) = {}, want {want}", at(t));
    }
    // Between: 6.4 * 0.5 * (1 + cos(pi * 20 / 80)).
    let want = 6.4 * 0.5 * (1.0 + (std::f64::consts::PI * 0.25).cos());
    assert!((at(30.0) - want).abs() < 1e-9);
}

#[test]
fn topk_counts_ties_and_fewer_than_five_classes() {
    let logits = Tensor::from_slice(&[0.1f32, 0.9, 0.0, 0.5, 0.2, 0.3]).view([2, 3]);
    let labels = Tensor::from_slice(&[2i64, 0]);
    // Row 0 predicts 1 (label 2 is third); row 1 predicts 0: top-1 = 1, top-5 (= top-3 here) = 2.
    assert_eq!(topk_correct(&logits, &labels), (1, 2));
}
