//! Agglomerative clustering of one image's patch features (kodama) and nested cuts of the tree.
//!
//! Cutting the tree at k clusters keeps its first `n - k` merges (kodama sorts the merges by height, as SciPy
//! does), so the cut at k + 1 undoes exactly one more merge: the cuts are nested by construction. Labels are kept
//! stable across cuts: when a cluster splits, its larger child keeps the label (and so the colour) and the smaller
//! child takes the next free label, `k - 1` at level k.
use kodama::{Dendrogram, Method};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Linkage criterion between clusters; distances between patches are Euclidean.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Linkage {
    Ward,
    Average,
    Complete,
}

impl Linkage {
    fn method(self) -> Method {
        match self {
            Linkage::Ward => Method::Ward,
            Linkage::Average => Method::Average,
            Linkage::Complete => Method::Complete,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Linkage::Ward => "ward",
            Linkage::Average => "average",
            Linkage::Complete => "complete",
        }
    }
}

/// Scales each row of `features` (`n` rows of `dim` values) to unit L2 norm; an all-zero row stays zero.
pub fn l2_normalize(features: &mut [f32], dim: usize) {
    for row in features.chunks_exact_mut(dim) {
        let norm = row.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>().sqrt();
        if norm > 0.0 {
            row.iter_mut().for_each(|v| *v = (*v as f64 / norm) as f32);
        }
    }
}

/// Condensed matrix of Euclidean distances (upper triangle, row by row, as SciPy's `pdist`), in f64.
pub fn condensed_euclidean(features: &[f32], dim: usize) -> Vec<f64> {
    let n = features.len() / dim;
    let rows: Vec<&[f32]> = features.chunks_exact(dim).collect();
    let mut out = Vec::with_capacity(n * n.saturating_sub(1) / 2);
    for i in 0..n {
        for j in i + 1..n {
            let d2: f64 = rows[i].iter().zip(rows[j]).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum();
            out.push(d2.sqrt());
        }
    }
    out
}

/// The dendrogram of `n = features.len() / dim` observations.
pub fn linkage(features: &[f32], dim: usize, method: Linkage) -> Result<Dendrogram<f64>> {
    if dim == 0 || !features.len().is_multiple_of(dim) || features.is_empty() {
        return Err(Error::option("features", format!("{} values do not form rows of {dim}", features.len())));
    }
    if features.iter().any(|v| !v.is_finite()) {
        return Err(Error::option("features", "non-finite feature values (the model produced NaN or inf)"));
    }
    let n = features.len() / dim;
    Ok(linkage_condensed(condensed_euclidean(features, dim), n, method))
}

/// The dendrogram from a condensed distance matrix of `n` observations (consumed: kodama works in place).
pub fn linkage_condensed(mut condensed: Vec<f64>, n: usize, method: Linkage) -> Dendrogram<f64> {
    kodama::linkage(&mut condensed, n, method.method())
}

/// Labels of the `n` observations at each of `levels` clusters (any order, each in 1..=n), in the order given.
/// The labels of level k are in `0..k`, nested across levels and colour-stable as described in the module doc.
pub fn cut_nested(dendrogram: &Dendrogram<f64>, levels: &[usize]) -> Result<Vec<Vec<u32>>> {
    let n = dendrogram.observations();
    for &k in levels {
        if k == 0 || k > n {
            return Err(Error::option("--levels", format!("cannot cut {n} patches into {k} clusters (need 1 <= k <= {n})")));
        }
    }
    let max_k = levels.iter().copied().max().unwrap_or(1);
    let steps = dendrogram.steps();
    let children = |node: usize| -> (usize, usize) {
        let s = &steps[node - n];
        (s.cluster1, s.cluster2)
    };
    let size = |node: usize| if node < n { 1 } else { steps[node - n].size };
    // The smallest observation index under each node breaks ties between equal-sized children.
    let mut min_leaf: Vec<usize> = (0..n).collect();
    for s in steps {
        min_leaf.push(min_leaf[s.cluster1].min(min_leaf[s.cluster2]));
    }

    let root = if n == 1 { 0 } else { 2 * n - 2 };
    // Clusters of the current cut as (node, label).
    let mut frontier: Vec<(usize, u32)> = vec![(root, 0)];
    let mut out: Vec<Option<Vec<u32>>> = vec![None; levels.len()];
    for k in 1..=max_k {
        if k > 1 {
            let node = n + (n - k);
            let pos = frontier.iter().position(|&(f, _)| f == node).expect("the latest merge is a cluster of the cut");
            let (_, label) = frontier.swap_remove(pos);
            let (a, b) = children(node);
            let a_keeps = (size(a), std::cmp::Reverse(min_leaf[a])) >= (size(b), std::cmp::Reverse(min_leaf[b]));
            let (keep, new) = if a_keeps { (a, b) } else { (b, a) };
            frontier.push((keep, label));
            frontier.push((new, (k - 1) as u32));
        }
        if levels.contains(&k) {
            let mut labels = vec![0u32; n];
            let mut stack = Vec::new();
            for &(node, label) in &frontier {
                stack.push(node);
                while let Some(x) = stack.pop() {
                    if x < n {
                        labels[x] = label;
                    } else {
                        let (a, b) = children(x);
                        stack.push(a);
                        stack.push(b);
                    }
                }
            }
            for (slot, &lk) in out.iter_mut().zip(levels) {
                if lk == k {
                    *slot = Some(labels.clone());
                }
            }
        }
    }
    Ok(out.into_iter().map(|l| l.expect("every level is cut")).collect())
}

/// Whether every cluster of `fine` lies inside one cluster of `coarse`.
pub fn is_refinement(fine: &[u32], coarse: &[u32]) -> bool {
    let mut parent = std::collections::HashMap::new();
    fine.len() == coarse.len() && fine.iter().zip(coarse).all(|(f, c)| *parent.entry(*f).or_insert(*c) == *c)
}

/// Whether two labelings describe the same partition (equal up to a renaming of the labels).
pub fn same_partition(a: &[u32], b: &[u32]) -> bool {
    is_refinement(a, b) && is_refinement(b, a)
}
