//! 2-D t-SNE of one image's patch features (bhtsne, Barnes-Hut).
//!
//! Made deterministic for a seed: the initial embedding comes from our own seeded generator (bhtsne's own
//! random start is not seedable), the nearest neighbours are computed here by brute force with ties broken by
//! index, and the fit runs on a one-thread rayon pool, because bhtsne's parallel float sums would otherwise add in
//! an order that depends on thread scheduling.
use bhtsne::{tSNE, Neighbor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::error::{Error, Result};

/// Settings of a fit; `perplexity` is the one asked for, clamped by [`effective_perplexity`].
#[derive(Clone, Debug, Serialize)]
pub struct TsneOptions {
    pub perplexity: f64,
    pub epochs: usize,
    pub theta: f64,
    pub seed: u64,
}

impl Default for TsneOptions {
    fn default() -> Self {
        TsneOptions { perplexity: 30.0, epochs: 1000, theta: 0.5, seed: 0 }
    }
}

/// The perplexity actually used for `n` points: each point needs `3 * perplexity` neighbours, so at most
/// `(n - 1) / 3`.
pub fn effective_perplexity(requested: f64, n: usize) -> f64 {
    requested.min((n.saturating_sub(1)) as f64 / 3.0)
}

/// Embeds `n` points in 2-D from their condensed distance matrix (as [`super::cluster::condensed_euclidean`]);
/// returns the points and the perplexity used.
pub fn embed_2d(condensed: &[f64], n: usize, opts: &TsneOptions) -> Result<(Vec<[f32; 2]>, f64)> {
    assert_eq!(condensed.len(), n * n.saturating_sub(1) / 2, "condensed matrix of {n} points");
    if n < 4 {
        return Err(Error::option("--size", format!("t-SNE needs at least 4 patches, the grid has {n}")));
    }
    if opts.perplexity.is_nan() || opts.perplexity <= 0.0 {
        return Err(Error::option("--perplexity", format!("must be positive, got {}", opts.perplexity)));
    }
    let perplexity = effective_perplexity(opts.perplexity, n);
    if perplexity < 1.0 {
        return Err(Error::option("--perplexity", format!("{} leaves fewer than 3 neighbours per point", opts.perplexity)));
    }
    let k = ((3.0 * perplexity) as usize).clamp(1, n - 1);
    let neighbors = knn(condensed, n, k);

    let init = initial_embedding(n, opts.seed);
    let ids: Vec<usize> = (0..n).collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .map_err(|e| Error::option("t-SNE", format!("cannot start a thread pool: {e}")))?;
    let y = pool.install(|| {
        let mut t: tSNE<f64, usize, 2> = tSNE::new(&ids);
        t.perplexity(perplexity).epochs(opts.epochs).initial_embedding(init).barnes_hut_with_neighbors(opts.theta, &neighbors);
        t.embedding()
    });
    if y.iter().any(|v| !v.is_finite()) {
        return Err(Error::option("t-SNE", "the embedding diverged (non-finite coordinates)"));
    }
    Ok((y.chunks_exact(2).map(|p| [p[0] as f32, p[1] as f32]).collect(), perplexity))
}

/// Gaussian start with standard deviation 1e-4, as in van der Maaten's implementation.
fn initial_embedding(n: usize, seed: u64) -> Vec<f64> {
    use rand::Rng;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n * 2)
        .map(|_| {
            // Box-Muller from two uniforms in (0, 1].
            let u1: f64 = 1.0 - rng.gen::<f64>();
            let u2: f64 = rng.gen::<f64>();
            1e-4 * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
        })
        .collect()
}

/// The `k` nearest other points of each point, ties broken by index.
fn knn(condensed: &[f64], n: usize, k: usize) -> Vec<Vec<Neighbor<f64>>> {
    let at = |i: usize, j: usize| {
        let (a, b) = if i < j { (i, j) } else { (j, i) };
        condensed[n * a - a * (a + 1) / 2 + (b - a - 1)]
    };
    (0..n)
        .map(|i| {
            let mut d: Vec<(f64, usize)> = (0..n).filter(|&j| j != i).map(|j| (at(i, j), j)).collect();
            d.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            d.into_iter().take(k).map(|(distance, index)| Neighbor { index, distance }).collect()
        })
        .collect()
}
