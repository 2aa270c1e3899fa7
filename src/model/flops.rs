//! Counted FLOPs of the matrix products (linear layers, patch embedding, attention scores and their weighted sum),
//! for MFU: the layers add their products' FLOPs while a [`count`] is open on the thread. A product whose output
//! takes part in backward costs three times its forward (forward, input gradient, weight gradient), one under
//! no_grad (the target encoder, inference) costs its forward once; element-wise work is not counted, as in the
//! usual MFU accounting (PaLM, Chowdhery et al. 2022, appendix B).
use std::cell::Cell;

use tch::Tensor;

thread_local! {
    static COUNTER: Cell<Option<(f64, f64)>> = const { Cell::new(None) };
}

/// FLOPs counted in one [`count`]: of products in the autograd graph and of products without gradient.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Flops {
    pub forward_with_grad: f64,
    pub forward_no_grad: f64,
}

impl Flops {
    /// FLOPs of a training step: 3x the products that backward goes through, 1x the others.
    pub fn training_step(&self) -> f64 {
        3.0 * self.forward_with_grad + self.forward_no_grad
    }
    /// FLOPs of the forward passes alone.
    pub fn forward(&self) -> f64 {
        self.forward_with_grad + self.forward_no_grad
    }
}

/// Runs `f` with the counter open and returns what its products added.
pub fn count<T>(f: impl FnOnce() -> T) -> (T, Flops) {
    let outer = COUNTER.with(|c| c.replace(Some((0.0, 0.0))));
    let out = f();
    let (g, n) = COUNTER.with(|c| c.replace(outer)).unwrap_or_default();
    (out, Flops { forward_with_grad: g, forward_no_grad: n })
}

/// Adds `flops` forward FLOPs of a product whose output is `out` (no-op unless a count is open).
pub fn add(out: &Tensor, flops: f64) {
    COUNTER.with(|c| {
        if let Some((g, n)) = c.get() {
            c.set(Some(if out.requires_grad() { (g + flops, n) } else { (g, n + flops) }));
        }
    });
}

/// Whether a count is open (so the layers skip the shape arithmetic otherwise).
pub fn counting() -> bool {
    COUNTER.with(|c| c.get().is_some())
}

/// `x [.., K] @ W^T [K, N]`: 2 x rows x K x N.
pub fn add_linear(x: &Tensor, out: &Tensor) {
    if counting() {
        let k = *x.size().last().unwrap_or(&0) as f64;
        add(out, 2.0 * k * out.numel() as f64);
    }
}

/// Scaled dot-product attention of `q [B, H, Nq, Dh]` over `k [B, H, Nk, Dh]`: the scores and the weighted sum of
/// values, 2 x 2 x B x H x Nq x Nk x Dh.
pub fn add_attention(q: &Tensor, k: &Tensor, out: &Tensor) {
    if counting() {
        let nk = k.size()[k.dim() - 2] as f64;
        add(out, 4.0 * q.numel() as f64 * nk);
    }
}
