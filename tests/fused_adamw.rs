//! The fused AdamW kernel (libtorch's `_fused_adamw_` through the C++ shim) against the per-parameter update that
//! the PyTorch reference tests check (tests/lmim_parity.rs): same weights and moments after several steps, with
//! weight-decay and lr-scale groups (as fine-tuning's layer decay), parameters without a gradient left alone.
use lmim_bench::train::optim::{AdamW, Param};
use tch::{Device, Kind, Tensor};

fn params(seed: i64) -> Vec<Param> {
    tch::manual_seed(seed);
    let shapes: [&[i64]; 5] = [&[64, 32], &[32], &[7, 3, 5, 5], &[200], &[3]];
    shapes
        .iter()
        .enumerate()
        .map(|(i, s)| Param {
            name: format!("p{i}"),
            tensor: Tensor::randn(*s, (Kind::Float, Device::Cpu)).set_requires_grad(true),
            weight_decay: if i % 2 == 0 { 0.05 } else { 0.0 },
            lr_scale: [1.0, 1.0, 0.65, 0.42, 1.0][i],
        })
        .collect()
}

#[test]
fn fused_adamw_equals_the_per_parameter_update() {
    let (mut a, mut b) = (AdamW::new(params(3), 0.9, 0.95, 1e-8), AdamW::new(params(3), 0.9, 0.95, 1e-8));
    a.fused = false;
    b.fused = true;
    for step in 0..6 {
        tch::manual_seed(100 + step);
        let grads: Vec<Tensor> = a.params.iter().map(|p| p.tensor.randn_like()).collect();
        for (opt, fresh) in [(&mut a, &grads), (&mut b, &grads)] {
            opt.zero_grad();
            for (i, (p, g)) in opt.params.iter().zip(fresh).enumerate() {
                // The last parameter never gets a gradient.
                if i == 4 {
                    continue;
                }
                let loss = (&p.tensor * g).sum(Kind::Float);
                loss.backward();
            }
            opt.step(1e-2 * (1.0 + step as f64));
        }
    }
    assert!(b.fused, "the fused kernel ran (no fallback)");
    for (pa, pb) in a.params.iter().zip(&b.params) {
        let d = (&pa.tensor - &pb.tensor).abs().max().double_value(&[]);
        assert!(d < 1e-6, "{}: {d}", pa.name);
    }
    let untouched = params(3).pop().unwrap().tensor;
    assert_eq!((&b.params[4].tensor - untouched).abs().max().double_value(&[]), 0.0);
    for ((na, ta), (nb, tb)) in a.state().iter().zip(&b.state()) {
        assert_eq!(na, nb);
        let d = (ta - tb).abs().max().double_value(&[]);
        assert!(d < 1e-6, "{na}: {d}");
    }
    assert_eq!(a.step, b.step);
}
