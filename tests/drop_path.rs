//! Stochastic depth that skips the dropped samples: each row is either `x` (dropped) or `x + branch(x) / keep`
//! (kept), exactly as timm's `x + drop_path(branch(x))`, with the kept share near `1 - p`, gradients only through
//! the kept rows' branch, and the plain residual outside training.
use lmim_bench::model::vit::residual_drop_path;
use tch::{Device, Kind, Tensor};

// Both tests seed and draw from torch's one global CPU generator: they must not run at the same time.
static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn rows_are_either_dropped_or_kept_and_rescaled() {
    let _rng = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(7);
    let (b, n, d, p) = (64, 5, 8, 0.3);
    let x = Tensor::randn([b, n, d], (Kind::Float, Device::Cpu));
    let w = Tensor::randn([d, d], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let branch = |t: &Tensor| t.matmul(&w).tanh();
    let out = residual_drop_path(&x, p, branch);
    let full = &x + branch(&x) / (1.0 - p);
    let (mut kept, mut dropped) = (0, 0);
    let mut kept_rows = Vec::new();
    for i in 0..b {
        let (o, xi, fi) = (out.get(i), x.get(i), full.get(i));
        let to_x = (&o - &xi).abs().max().double_value(&[]);
        let to_full = (&o - &fi).abs().max().double_value(&[]);
        if to_x == 0.0 {
            dropped += 1;
        } else {
            assert!(to_full < 1e-5, "row {i} is neither dropped nor kept: {to_x} / {to_full}");
            kept += 1;
            kept_rows.push(i);
        }
    }
    assert_eq!(kept + dropped, b);
    // 64 draws at keep 0.7: 44.8 expected, 30..60 covers more than 6 standard deviations.
    assert!((30..60).contains(&kept), "kept {kept} of {b}");
    out.sum(Kind::Float).backward();
    // The gradient is exactly that of the kept rows' rescaled branch: dropped rows contribute nothing.
    let w2 = w.detach().copy().set_requires_grad(true);
    let idx = Tensor::from_slice(&kept_rows.iter().map(|&i| i as i64).collect::<Vec<_>>());
    (x.index_select(0, &idx).matmul(&w2).tanh() / (1.0 - p)).sum(Kind::Float).backward();
    let diff = (w.grad() - w2.grad()).abs().max().double_value(&[]);
    let scale = w2.grad().abs().max().double_value(&[]);
    assert!(scale > 0.0 && diff <= 1e-5 * scale, "gradient differs from the kept rows' by {diff} (scale {scale})");
}

#[test]
fn the_same_seed_draws_the_same_rows() {
    let _rng = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let x = Tensor::randn([32, 3, 4], (Kind::Float, Device::Cpu)) + 10.0;
    // Which rows were kept: a kept row is x + 2x / 0.5 = 5x, a dropped one x.
    let kept = |seed: i64| -> Vec<bool> {
        tch::manual_seed(seed);
        let out = residual_drop_path(&x, 0.5, |t| t * 2.0);
        (0..32).map(|i| (out.get(i) - x.get(i)).abs().max().double_value(&[]) > 0.0).collect()
    };
    let a = kept(11);
    assert_eq!(a, kept(11), "the same seed draws the same rows");
    let n = a.iter().filter(|&&k| k).count();
    // 32 draws at keep 0.5: 4..28 covers more than 4 standard deviations.
    assert!((4..28).contains(&n), "kept {n} of 32: the mask must drop some rows and keep others");
    assert_ne!(a, kept(12), "another seed draws other rows");
}

/// A ViT block whose branches drop every sample (p close to 1 on a batch of 2) gives its parameters zero
/// gradients, not none: timm's masked branch does, so AdamW still decays them; and the output is the input.
#[test]
fn a_branch_that_drops_every_sample_gives_zero_gradients() {
    let _rng = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let cfg = lmim_bench::model::VitConfig { depth: 1, embed_dim: 16, num_heads: 2, img_size: 32, patch_size: 16, ..Default::default() };
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let block = lmim_bench::model::vit::Block::new(vs.root() / "blocks" / "0", &cfg, 1.0 - 1e-12);
    tch::manual_seed(3);
    let x = Tensor::randn([2, 5, 16], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let out = block.forward(&x, true);
    assert_eq!((&out - &x).abs().max().double_value(&[]), 0.0);
    out.sum(Kind::Float).backward();
    for (name, t) in vs.variables() {
        let g = t.grad();
        assert!(g.defined(), "{name} has no gradient");
        assert_eq!(g.abs().max().double_value(&[]), 0.0, "{name}");
    }
}
