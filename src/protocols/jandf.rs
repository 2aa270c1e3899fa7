//! J&F of DAVIS semi-supervised video object segmentation, exact to davisvideochallenge/davis2017-evaluation
//! (commit ac7c43f, `--task semi-supervised`): `davis2017/metrics.py` (`db_eval_iou`, `f_measure`, `_seg2bmap`),
//! `davis2017/utils.py` (`db_statistics`) and `davis2017/evaluation.py` / `davis.py` (which frames and objects).
//!
//! What that code does, and this module therefore does too:
//! - the ground truth's void pixels (255) are set to background when the masks are read (`_get_all_elements`), so
//!   the `void_pixels` it later passes are never set: a prediction on a void pixel counts as a false positive;
//! - the objects are `1..=max(first annotation)`; the first and last frames are not scored;
//! - J = |A ∩ B| / |A ∪ B|, 1 when the union is empty; F = the boundary F-measure with `bound_th` 0.008 of the
//!   image diagonal (rounded up), boundaries by `_seg2bmap`, matched within `cv2.dilate` by
//!   `skimage.morphology.disk(bound_pix)`;
//! - per object: mean, recall (share of frames > 0.5) and decay (mean of the first quarter minus the last, over
//!   `round(linspace(1, n, 5) + 1e-10) - 1` bins); J&F-Mean = (mean of J means + mean of F means) / 2 over all
//!   objects of all sequences.
use serde::Serialize;

/// `_seg2bmap` at the mask's own size: a pixel is on the boundary when it differs from its east, south or
/// south-east neighbour; on the last row only the east neighbour, on the last column only the south one, and the
/// bottom-right pixel never.
pub fn seg2bmap(seg: &[bool], w: usize, h: usize) -> Vec<bool> {
    let mut b = vec![false; w * h];
    for y in 0..h {
        let row = &seg[y * w..(y + 1) * w];
        let out = &mut b[y * w..(y + 1) * w];
        if y + 1 < h {
            let below = &seg[(y + 1) * w..(y + 2) * w];
            for x in 0..w - 1 {
                let s = row[x];
                out[x] = (s ^ row[x + 1]) | (s ^ below[x]) | (s ^ below[x + 1]);
            }
            out[w - 1] = row[w - 1] ^ below[w - 1];
        } else {
            for x in 0..w - 1 {
                out[x] = row[x] ^ row[x + 1];
            }
        }
    }
    b
}

/// Offsets of `skimage.morphology.disk(r)`: `x^2 + y^2 <= r^2` over `-r..=r`.
pub fn disk_offsets(r: i64) -> Vec<(i64, i64)> {
    let mut v = Vec::new();
    for y in -r..=r {
        for x in -r..=r {
            if x * x + y * y <= r * r {
                v.push((x, y));
            }
        }
    }
    v
}

/// `cv2.dilate(b, disk)` with the default border (pixels outside the image never count): every set pixel stamps
/// the (symmetric) disk.
fn dilate(b: &[bool], w: usize, h: usize, disk: &[(i64, i64)]) -> Vec<bool> {
    let mut out = vec![false; w * h];
    for y in 0..h {
        for x in 0..w {
            if !b[y * w + x] {
                continue;
            }
            for &(dx, dy) in disk {
                let (xx, yy) = (x as i64 + dx, y as i64 + dy);
                if xx >= 0 && yy >= 0 && (xx as usize) < w && (yy as usize) < h {
                    out[yy as usize * w + xx as usize] = true;
                }
            }
        }
    }
    out
}

/// `db_eval_iou` of one frame (no void pixels, see the module notes).
pub fn jaccard(gt: &[bool], seg: &[bool]) -> f64 {
    let (mut inter, mut union) = (0u64, 0u64);
    for (&a, &b) in gt.iter().zip(seg) {
        inter += (a && b) as u64;
        union += (a || b) as u64;
    }
    if union == 0 {
        1.0
    } else {
        inter as f64 / union as f64
    }
}

/// The `bound_pix` of `f_measure`: `bound_th` itself when >= 1, else `ceil(bound_th * ||(h, w)||)`.
pub fn bound_pix(w: usize, h: usize, bound_th: f64) -> i64 {
    if bound_th >= 1.0 {
        bound_th as i64
    } else {
        (bound_th * ((h * h + w * w) as f64).sqrt()).ceil() as i64
    }
}

/// `f_measure(segmentation, annotation)` of one frame.
pub fn f_measure(seg: &[bool], gt: &[bool], w: usize, h: usize, disk: &[(i64, i64)]) -> f64 {
    let fg_b = seg2bmap(seg, w, h);
    let gt_b = seg2bmap(gt, w, h);
    let n_fg = fg_b.iter().filter(|&&v| v).count();
    let n_gt = gt_b.iter().filter(|&&v| v).count();
    let (precision, recall) = match (n_fg, n_gt) {
        (0, 0) => (1.0, 1.0),
        (0, _) => (1.0, 0.0),
        (_, 0) => (0.0, 1.0),
        _ => {
            let fg_dil = dilate(&fg_b, w, h, disk);
            let gt_dil = dilate(&gt_b, w, h, disk);
            let gt_match = gt_b.iter().zip(&fg_dil).filter(|(&a, &b)| a && b).count();
            let fg_match = fg_b.iter().zip(&gt_dil).filter(|(&a, &b)| a && b).count();
            (fg_match as f64 / n_fg as f64, gt_match as f64 / n_gt as f64)
        }
    };
    if precision + recall == 0.0 {
        0.0
    } else {
        2.0 * precision * recall / (precision + recall)
    }
}

/// `db_statistics`: (mean, recall, decay) of per-frame values.
pub fn statistics(v: &[f64]) -> (f64, f64, f64) {
    let n = v.len();
    let mean = |s: &[f64]| if s.is_empty() { f64::NAN } else { s.iter().sum::<f64>() / s.len() as f64 };
    let m = mean(v);
    let r = if n == 0 { f64::NAN } else { v.iter().filter(|&&x| x > 0.5).count() as f64 / n as f64 };
    // np.linspace(1, n, 5): start + i * step, the last one exactly n; + 1e-10, np.round (half to even), - 1,
    // cast to uint8 (wrapping, as numpy's astype does).
    let step = (n as f64 - 1.0) / 4.0;
    let ids: Vec<usize> = (0..5)
        .map(|i| {
            let x = if i == 4 { n as f64 } else { 1.0 + i as f64 * step };
            (((x + 1e-10).round_ties_even() - 1.0) as i64 as u8) as usize
        })
        .collect();
    let bin = |i: usize| {
        let (a, b) = (ids[i].min(n), (ids[i + 1] + 1).min(n));
        if a < b {
            mean(&v[a..b])
        } else {
            f64::NAN
        }
    };
    (m, r, bin(0) - bin(3))
}

/// The six measures of davis2017-evaluation in its order: the record's key and the printed name.
pub const MEASURES: [(&str, &str); 6] = [("j_mean", "J-Mean"), ("j_recall", "J-Recall"), ("j_decay", "J-Decay"), ("f_mean", "F-Mean"), ("f_recall", "F-Recall"), ("f_decay", "F-Decay")];

/// Mean, recall and decay of J and of F (fractions, not percent), in [`MEASURES`]' order by [`Measures::values`].
#[derive(Clone, Copy, Debug, Default, Serialize, serde::Deserialize)]
pub struct Measures {
    pub j_mean: f64,
    pub j_recall: f64,
    pub j_decay: f64,
    pub f_mean: f64,
    pub f_recall: f64,
    pub f_decay: f64,
}

impl Measures {
    fn of(j: &[f64], f: &[f64]) -> Measures {
        let ((j_mean, j_recall, j_decay), (f_mean, f_recall, f_decay)) = (statistics(j), statistics(f));
        Measures { j_mean, j_recall, j_decay, f_mean, f_recall, f_decay }
    }

    pub fn values(&self) -> [f64; 6] {
        [self.j_mean, self.j_recall, self.j_decay, self.f_mean, self.f_recall, self.f_decay]
    }

    fn from_values(v: [f64; 6]) -> Measures {
        Measures { j_mean: v[0], j_recall: v[1], j_decay: v[2], f_mean: v[3], f_recall: v[4], f_decay: v[5] }
    }

    /// `(key, 100 x value)` for each measure, as records hold them.
    pub fn percent(&self) -> impl Iterator<Item = (&'static str, f64)> {
        MEASURES.into_iter().zip(self.values()).map(|((k, _), v)| (k, 100.0 * v))
    }
}

/// The scores of one object of one sequence.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct ObjectScore {
    pub sequence: String,
    pub object: usize,
    pub j: Vec<f64>,
    pub f: Vec<f64>,
    #[serde(flatten)]
    pub measures: Measures,
}

/// One sequence: the ground-truth label maps and the predicted ones of every frame (same size, first and last
/// included: they are dropped here). Returns the per-object scores and the number of objects the predictions
/// hold (davis2017-evaluation pads fewer predicted objects with empty masks, scoring them 0 as here, and stops on more;
/// the caller reports a difference).
pub fn score_sequence(name: &str, gt: &[Vec<u8>], pred: &[Vec<u8>], w: usize, h: usize, bound_th: f64) -> (Vec<ObjectScore>, usize) {
    assert_eq!(gt.len(), pred.len());
    let clean = |m: &Vec<u8>| m.iter().map(|&v| if v == 255 { 0 } else { v }).collect::<Vec<u8>>();
    let n_obj = gt.first().map_or(0, |g| clean(g).into_iter().max().unwrap_or(0)) as usize;
    let frames = if gt.len() >= 2 { 1..gt.len() - 1 } else { 0..0 };
    let pred_objects = pred[frames.clone()].iter().flat_map(|p| p.iter().copied()).max().unwrap_or(0) as usize;
    let disk = disk_offsets(bound_pix(w, h, bound_th));
    use rayon::prelude::*;
    // Per frame, per object: (J, F).
    let per_frame: Vec<Vec<(f64, f64)>> = frames
        .into_par_iter()
        .map(|t| {
            let g = clean(&gt[t]);
            (1..=n_obj)
                .map(|o| {
                    let gm: Vec<bool> = g.iter().map(|&v| v as usize == o).collect();
                    let pm: Vec<bool> = pred[t].iter().map(|&v| v as usize == o).collect();
                    (jaccard(&gm, &pm), f_measure(&pm, &gm, w, h, &disk))
                })
                .collect()
        })
        .collect();
    let scores = (0..n_obj)
        .map(|o| {
            let j: Vec<f64> = per_frame.iter().map(|f| f[o].0).collect();
            let f: Vec<f64> = per_frame.iter().map(|f| f[o].1).collect();
            let measures = Measures::of(&j, &f);
            ObjectScore { sequence: name.to_string(), object: o + 1, j, f, measures }
        })
        .collect();
    (scores, pred_objects)
}

/// The global measures of `evaluation_method.py`, over every object: J&F-Mean and the six [`MEASURES`] (fractions,
/// not percent).
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub j_and_f: f64,
    #[serde(flatten)]
    pub measures: Measures,
}

pub fn summarise(objects: &[ObjectScore]) -> Summary {
    let mut sum = [0.0; 6];
    for o in objects {
        for (s, v) in sum.iter_mut().zip(o.measures.values()) {
            *s += v;
        }
    }
    let measures = Measures::from_values(sum.map(|s| s / objects.len() as f64));
    Summary { j_and_f: (measures.j_mean + measures.f_mean) / 2.0, measures }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundary_of_a_square_and_its_f() {
        // A 2x2 square at (1,1) in 4x4: the boundary is offset half a pixel towards the origin.
        let mut s = vec![false; 16];
        for (x, y) in [(1, 1), (2, 1), (1, 2), (2, 2)] {
            s[y * 4 + x] = true;
        }
        let b = seg2bmap(&s, 4, 4);
        let set: Vec<usize> = (0..16).filter(|&i| b[i]).collect();
        assert_eq!(set, vec![0, 1, 2, 4, 6, 8, 9, 10]);
        let d = disk_offsets(1);
        assert_eq!(d.len(), 5);
        assert_eq!(f_measure(&s, &s, 4, 4, &d), 1.0);
        assert_eq!(f_measure(&vec![false; 16], &s, 4, 4, &d), 0.0);
        assert_eq!(f_measure(&vec![false; 16], &vec![false; 16], 4, 4, &d), 1.0);
        assert_eq!(jaccard(&vec![false; 16], &vec![false; 16]), 1.0);
    }

    #[test]
    fn statistics_bins_as_numpy() {
        let v: Vec<f64> = (0..10).map(|i| i as f64 / 10.0).collect();
        let (m, r, d) = statistics(&v);
        assert!((m - 0.45).abs() < 1e-12);
        assert!((r - 0.4).abs() < 1e-12);
        // ids = round(linspace(1, 10, 5) + 1e-10) - 1 = [0, 2, 5, 7, 9]: bins [0..=2] and [7..=9].
        assert!((d - (0.1 - 0.8)).abs() < 1e-12);
    }
}
