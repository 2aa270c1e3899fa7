//! `eval --protocol davis`: DINO's DAVIS-2017 video label propagation (facebookresearch/dino 7c446df,
//! `eval_video_segmentation.py`), scored by davis2017-evaluation's J&F ([`super::jandf`]).
//!
//! Per video, as DINO's `eval_video_tracking_davis` / `label_propagation`: the features of every frame are the last
//! block's tokens after the final norm with the prefix (CLS) tokens dropped; the first frame's annotation
//! (one-hot at the patch grid) and the soft masks of the last `n_last_frames` frames are the context; the affinity
//! `exp(<f_t, f_s> / temperature)` of L2-normalised features, restricted to a `(2 n + 1)^2` patch window, keeps
//! the `topk` largest sources of each target patch (over all context frames), is column-normalised and carries the
//! context's labels; the soft mask is upsampled bilinearly by the patch size, min-max normalised per channel
//! (`norm_mask`), arg-maxed and resized back with PIL nearest. The differences from that script are only of
//! speed: the frames' features are computed in batches before the propagation (they do not depend on it), the
//! neighbourhood mask is built once per grid with tensor ops instead of a quadruple loop, and everything stays on
//! the run's device.
use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::record::{RecordBuilder, SplitPrint};
use super::{EvalRequest, Protocol};
use crate::checkpoint::load_vit_with;
use crate::data::davis::{self, DavisSet, IndexedImage};
use crate::error::{Error, Result};
use crate::info::device_name;
use crate::model::pos_embed::GridPosEmbed;
use crate::model::vit::VisionTransformer;
use crate::results::RunRecord;

pub const SOURCE: &str = "facebookresearch/dino:eval_video_segmentation.py (7c446df); davisvideochallenge/davis2017-evaluation (ac7c43f)";

/// `protocols/davis.toml`. Every key can be overridden with `key=value`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DavisConfig {
    pub name: String,
    pub version: String,
    pub description: String,
    pub source: String,
    /// `read_frame`'s `scale_size`: the short side; the long side is floored to a multiple of 64.
    pub short_side: i64,
    /// Predicted frames kept as context besides the first one (`--n_last_frames`).
    pub n_last_frames: i64,
    /// Half-width of the patch window a target attends to (`--size_mask_neighborhood`); 0 = everywhere.
    pub neighborhood: i64,
    /// Sources kept per target patch (`--topk`).
    pub topk: i64,
    /// Affinity temperature (DINO's code divides by 0.1).
    pub temperature: f64,
    /// `interpolate` (DINO's `interpolate_pos_encoding`) or `sincos` (the 2-D sine-cosine table made for the grid).
    pub pos_embed: GridPosEmbed,
    /// The ImageSets/2017 list.
    pub subset: String,
    pub resolution: String,
    /// davis2017-evaluation's `bound_th`.
    pub bound_th: f64,
}

impl Default for DavisConfig {
    fn default() -> Self {
        DavisConfig {
            name: "davis".into(),
            version: "1".into(),
            description: String::new(),
            source: SOURCE.into(),
            short_side: 480,
            n_last_frames: 7,
            neighborhood: 12,
            topk: 5,
            temperature: 0.1,
            pos_embed: GridPosEmbed::Interpolate,
            subset: "val".into(),
            resolution: "480p".into(),
            bound_th: 0.008,
        }
    }
}

impl crate::config::Recipe for DavisConfig {
    fn rules() -> Vec<crate::config::Rule> {
        use crate::config::Rule;
        vec![
            Rule::int("short_side", 16, 8192),
            // At 0 DINO's `queue.Queue(0)` is unbounded and its first `get()` blocks: no reference behaviour.
            Rule::int("n_last_frames", 1, 1000),
            Rule::int("neighborhood", 0, 100_000),
            Rule::int("topk", 1, 1 << 30),
            Rule::above("temperature", 0.0, 1000.0),
            Rule::above("bound_th", 0.0, 1000.0),
        ]
    }
}

impl DavisConfig {
    pub fn validate(&self) -> Result<()> {
        if self.pos_embed == GridPosEmbed::Timm {
            return Err(Error::option("pos_embed", "`timm` resamples square grids only; use \"interpolate\" (DINO's) or \"sincos\""));
        }
        // exp(sim / temperature) with |sim| <= 1 (L2-normalised features) overflows float32 above ln(f32::MAX).
        let bound = 1.0 / (f32::MAX as f64).ln();
        if self.temperature < bound {
            return Err(Error::option("temperature", format!("{} is below {bound:.5}: exp(similarity / temperature) overflows float32 (the affinities become inf, the masks NaN)", self.temperature)));
        }
        for (k, v) in [("subset", &self.subset), ("resolution", &self.resolution)] {
            if v.is_empty() || v.contains('/') || v.contains('\\') || v == ".." {
                return Err(Error::option(k, format!("`{v}` is not a folder name")));
            }
        }
        Ok(())
    }
}

/// The propagation settings.
#[derive(Clone, Copy, Debug)]
pub struct PropParams {
    pub n_last_frames: usize,
    pub topk: i64,
    pub temperature: f64,
    pub patch: i64,
}

/// DINO's `restrict_neighborhood(h, w)`: `[h*w, h*w]`, 1 where the source patch is within `n` rows and `n`
/// columns of the target.
pub fn neighborhood_mask(h: i64, w: i64, n: i64, device: Device) -> Tensor {
    let opts = (Kind::Int64, device);
    let r = Tensor::arange(h, opts);
    let c = Tensor::arange(w, opts);
    let dr = (r.unsqueeze(1) - r.unsqueeze(0)).abs().le(n); // [h, h]
    let dc = (c.unsqueeze(1) - c.unsqueeze(0)).abs().le(n); // [w, w]
    let m = dr.view([h, 1, h, 1]).logical_and(&dc.view([1, w, 1, w]));
    m.reshape([h * w, h * w]).to_kind(Kind::Float)
}

/// DINO's `to_one_hot` of a label map `[h, w]` (channels = max label + 1): `[1, C, h, w]` f32.
pub fn one_hot(labels: &[u8], h: i64, w: i64, device: Device) -> Tensor {
    let t = Tensor::from_slice(labels).to_kind(Kind::Int64).view([h, w]);
    let c = labels.iter().copied().max().unwrap_or(0) as i64 + 1;
    t.one_hot(c).to_kind(Kind::Float).permute([2, 0, 1]).unsqueeze(0).to_device(device)
}

/// `F.normalize(x, dim, p=2)`.
fn l2_normalize(x: &Tensor, dim: i64) -> Tensor {
    x / x.norm_scalaropt_dim(2, [dim], true).clamp_min(1e-12).expand_as(x)
}

/// DINO's `label_propagation` for one target: `feat_tar` `[hw, D]`, context features `[D, hw]` each, context
/// segs `[1, C, h, w]` each, the (cached) mask. Returns the soft seg `[1, C, h, w]`.
fn label_propagation(p: &PropParams, feat_tar: &Tensor, feats: &[Tensor], segs: &[&Tensor], h: i64, w: i64, mask: Option<&Tensor>) -> Tensor {
    let hw = h * w;
    let n = feats.len() as i64;
    let sources = l2_normalize(&Tensor::stack(feats, 0), 1);
    let tar = l2_normalize(feat_tar, 1).unsqueeze(0).repeat([n, 1, 1]);
    let mut aff = (tar.bmm(&sources) / p.temperature).exp();
    if let Some(m) = mask {
        aff *= m;
    }
    let aff = aff.transpose(2, 1).reshape([-1, hw]);
    let (tk, _) = aff.topk(p.topk, 0, true, true);
    let (tk_min, _) = tk.min_dim(0, false);
    let aff = aff.masked_fill(&aff.lt_tensor(&tk_min), 0.0);
    let aff = &aff / aff.sum_dim_intlist([0i64].as_slice(), true, Kind::Float);
    let segs = Tensor::cat(segs, 0);
    let c = segs.size()[1];
    let segs = segs.reshape([n, c, -1]).transpose(2, 1).reshape([-1, c]).transpose(0, 1);
    segs.mm(&aff).reshape([1, c, h, w])
}

/// The label map at the input's pixel grid from a soft seg `[1, C, h, w]`: bilinear x patch, `norm_mask`,
/// argmax over channels. `[h*patch, w*patch]` u8, on the CPU.
fn soft_to_labels(seg: &Tensor, patch: i64) -> Vec<u8> {
    let (h, w) = (seg.size()[2], seg.size()[3]);
    let up = seg.upsample_bilinear2d([h * patch, w * patch], false, Some(patch as f64), Some(patch as f64)).get(0);
    for c in 0..up.size()[0] {
        let mut m = up.get(c);
        if m.max().double_value(&[]) > 0.0 {
            let shifted = &m - m.min();
            let normed = &shifted / shifted.max();
            m.copy_(&normed);
        }
    }
    let (_, idx) = up.max_dim(0, false);
    let idx = idx.to_kind(Kind::Uint8).to_device(Device::Cpu).contiguous();
    Vec::<u8>::try_from(idx.view([-1])).expect("u8 labels")
}

/// Propagates a video: `feats` `[T, hw, D]` (frame order), `first_seg` `[1, C, h, w]`. Returns the label maps of
/// frames 1.. at `[h*patch, w*patch]`; a soft mask holding NaN or infinity is an error naming the frame.
pub fn propagate(p: &PropParams, feats: &Tensor, first_seg: &Tensor, h: i64, w: i64, mask: Option<&Tensor>) -> Result<Vec<Vec<u8>>> {
    let t = feats.size()[0];
    let first = feats.get(0).transpose(0, 1);
    let mut queue: std::collections::VecDeque<(Tensor, Tensor)> = std::collections::VecDeque::new();
    let mut out = Vec::with_capacity(t as usize);
    for i in 1..t {
        let tar = feats.get(i);
        let mut ctx_f = vec![first.shallow_clone()];
        let mut ctx_s = vec![first_seg];
        for (f, s) in &queue {
            ctx_f.push(f.shallow_clone());
            ctx_s.push(s);
        }
        let seg = label_propagation(p, &tar, &ctx_f, &ctx_s, h, w, mask);
        drop(ctx_s);
        if seg.isfinite().all().int64_value(&[]) == 0 {
            return Err(Error::NonFinite(format!("the propagated mask of frame {i} holds NaN or infinity")));
        }
        if queue.len() == p.n_last_frames {
            queue.pop_front();
        }
        queue.push_back((tar.transpose(0, 1), seg.copy()));
        out.push(soft_to_labels(&seg, p.patch));
    }
    Ok(out)
}

/// A sequence checked before anything runs: frame size, annotations.
struct Checked {
    width: usize,
    height: usize,
}

fn header_size(path: &Path) -> Result<(usize, usize)> {
    // Through the regular-file guard: a FIFO among the frames would block the open, a device be read forever.
    let f = crate::fsutil::open_regular(path, Some(crate::fsutil::IMAGE_LIMIT))?;
    let r = image::ImageReader::new(std::io::BufReader::new(f)).with_guessed_format().map_err(|e| Error::io(path, e))?;
    let (w, h) = r.into_dimensions().map_err(|e| Error::data(path, format!("cannot read the image header: {e}")))?;
    Ok((w as usize, h as usize))
}

/// Every frame of the sequence has the first frame's size; the annotation of every frame exists, is an indexed PNG
/// of that size. Errors name the file.
fn check_sequence(seq: &davis::Sequence) -> Result<Checked> {
    use rayon::prelude::*;
    let (w, h) = header_size(&seq.frames[0])?;
    if seq.frames.len() < 3 {
        return Err(Error::data(&seq.frames[0], format!("sequence `{}` has {} frame(s); J&F needs at least 3 (the first and last are not scored)", seq.name, seq.frames.len())));
    }
    if w == h {
        return Err(Error::data(&seq.frames[0], format!("square {w}x{h} frames: DINO's read_frame and read_seg size a square frame and its annotation differently (transposed grids); not supported")));
    }
    seq.frames.par_iter().try_for_each(|f| {
        let s = header_size(f)?;
        if s != (w, h) {
            return Err(Error::data(f, format!("is {}x{}, the first frame of `{}` is {w}x{h}: frames of a sequence must have one size", s.0, s.1, seq.name)));
        }
        Ok(())
    })?;
    seq.annotations.par_iter().enumerate().try_for_each(|(i, a)| {
        if std::fs::metadata(a).is_err() {
            let what = if i == 0 { "first annotation" } else { "annotation" };
            return Err(Error::data(a, format!("{what} of frame {} of `{}` not found", seq.frames[i].display(), seq.name)));
        }
        let bytes = crate::fsutil::read_regular(a, Some(crate::fsutil::IMAGE_LIMIT))?;
        let dec = png::Decoder::new(std::io::Cursor::new(&bytes[..]));
        let r = dec.read_info().map_err(|e| Error::data(a, format!("not a readable PNG: {e}")))?;
        let info = r.info();
        if info.color_type != png::ColorType::Indexed {
            return Err(Error::data(a, format!("not an indexed (palette) PNG: colour type {:?}", info.color_type)));
        }
        if (info.width as usize, info.height as usize) != (w, h) {
            return Err(Error::data(a, format!("is {}x{}, the frames of `{}` are {w}x{h}", info.width, info.height, seq.name)));
        }
        Ok(())
    })?;
    Ok(Checked { width: w, height: h })
}

/// One hash over the list, every frame's and annotation's relative path and size.
pub(crate) fn set_fingerprint(set: &DavisSet) -> Result<SplitPrint> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let (mut frames, mut bytes) = (0usize, 0u64);
    for s in &set.sequences {
        for p in s.frames.iter().chain(&s.annotations) {
            let len = std::fs::metadata(p).map_err(|e| Error::io(p, e))?.len();
            let rel = p.strip_prefix(&set.root).unwrap_or(p);
            h.update(format!("{}\t{len}\n", rel.display()).as_bytes());
            bytes += len;
        }
        frames += s.frames.len();
    }
    let hash = hex::encode(h.finalize())[..16].to_string();
    let fingerprint = serde_json::json!({
        "list": set.list.strip_prefix(&set.root).unwrap_or(&set.list).display().to_string(),
        "sequences": set.sequences.len(), "frames": frames, "bytes": bytes, "files_sha256": hash,
    });
    let hash = super::extract::fingerprint_hash(&fingerprint);
    Ok(SplitPrint { role: "davis".into(), fingerprint, hash })
}

/// Frames per forward pass: the request's batch, bounded (a 480p frame is 1,560 tokens).
fn frames_per_batch(req: &EvalRequest, device: Device) -> usize {
    let cap = if device.is_cuda() { 32 } else { 8 };
    req.run.batch_size.clamp(1, cap)
}

/// Features `[T, hw, D]` of a sequence's frames (read in parallel, forwarded in batches on `device`), the patch
/// grid and the frames' input size `(W, H)`.
fn sequence_features(model: &VisionTransformer, seq: &davis::Sequence, short: usize, mode: GridPosEmbed, batch: usize, device: Device, amp: Option<Kind>) -> Result<(Tensor, i64, i64, (i64, i64))> {
    use rayon::prelude::*;
    let mut parts = Vec::new();
    let (mut gh, mut gw, mut size) = (0, 0, (0, 0));
    let p = model.cfg.patch_size;
    for chunk in seq.frames.chunks(batch) {
        let frames: Vec<davis::Frame> = chunk.par_iter().map(|f| davis::read_frame(f, short)).collect::<Result<_>>()?;
        let (fw, fh) = (frames[0].width as i64, frames[0].height as i64);
        let data: Vec<f32> = frames.iter().flat_map(|f| f.chw.iter().copied()).collect();
        let x = Tensor::from_slice(&data).view([frames.len() as i64, 3, fh, fw]).to_device(device);
        let tokens = tch::no_grad(|| crate::model::vit::with_amp(amp, || model.forward_features_with(&x, &[], false, mode).tokens));
        let prefix = model.cfg.num_prefix_tokens();
        let n = tokens.size()[1];
        parts.push(tokens.narrow(1, prefix, n - prefix).to_kind(Kind::Float));
        (gh, gw, size) = (fh / p, fw / p, (fw, fh));
    }
    Ok((Tensor::cat(&parts, 0), gh, gw, size))
}

/// What one sequence gives: its objects' scores, its summary, whether the predicted objects differ, and its
/// timings and geometry. Serialisable, so that ranks can hand theirs to the others through the store.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SequenceOutcome {
    index: usize,
    objects: Vec<super::jandf::ObjectScore>,
    summary: serde_json::Value,
    mismatch: Option<serde_json::Value>,
    seconds_features: f64,
    seconds_propagation: f64,
    frames: usize,
    grid: (i64, i64),
    input: (i64, i64),
}

/// The model and settings every sequence is run with.
struct Propagation<'a> {
    model: &'a VisionTransformer,
    cfg: &'a DavisConfig,
    params: PropParams,
    batch: usize,
    device: Device,
    amp: Option<Kind>,
}

impl Propagation<'_> {
    /// Features, propagation, masks written under `masks_dir/<sequence>/`, and the scores of one sequence.
    fn sequence(&self, index: usize, seq: &davis::Sequence, chk: &Checked, masks_dir: &Path, masks_cache: &mut Option<((i64, i64), Tensor)>) -> Result<SequenceOutcome> {
        let (cfg, device, patch) = (self.cfg, self.device, self.params.patch);
        let first = davis::read_indexed_png(&seq.annotations[0])?;
        if let Some(w) = missing_ids_warning(&first.indices) {
            eprintln!("warning: {}: {w}", seq.annotations[0].display());
        }
        let (sw, sh) = davis::dino_seg_size(first.width, first.height, cfg.short_side as usize);
        let (gw, gh) = (sw as i64 / patch, sh as i64 / patch);
        let small = davis::pil_resize_nearest(&first.indices, first.width, first.height, gw as usize, gh as usize);
        let t0 = Instant::now();
        let (feats, fh, fw, frame_size) = sequence_features(self.model, seq, cfg.short_side as usize, cfg.pos_embed, self.batch, device, self.amp)?;
        if (fh, fw) != (gh, gw) {
            return Err(Error::data(&seq.annotations[0], format!("its patch grid {gh}x{gw} differs from the frames' {fh}x{fw}")));
        }
        // A device read, so that the time of the (asynchronous) CUDA forward is counted here.
        let _ = device.is_cuda().then(|| feats.sum(Kind::Float).double_value(&[]));
        let seconds_features = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let first_seg = one_hot(&small, gh, gw, device);
        let mask = if cfg.neighborhood > 0 {
            if !matches!(masks_cache, Some((g, _)) if *g == (gh, gw)) {
                *masks_cache = Some(((gh, gw), neighborhood_mask(gh, gw, cfg.neighborhood, device).unsqueeze(0)));
            }
            masks_cache.as_ref().map(|(_, m)| m.shallow_clone())
        } else {
            None
        };
        if feats.isfinite().all().int64_value(&[]) == 0 {
            return Err(Error::NonFinite(format!("the features of sequence `{}` hold NaN or infinity (the checkpoint's weights?)", seq.name)));
        }
        let bytes = propagation_bytes(cfg, (gh * gw) as u128, seq.frames.len() as u128, feats.size()[2] as u128);
        let labels = crate::info::allocating(&format!("the DAVIS propagation of `{}`", seq.name), bytes, || tch::no_grad(|| propagate(&self.params, &feats, &first_seg, gh, gw, mask.as_ref())))?
            .map_err(|e| match e {
                Error::NonFinite(m) => Error::NonFinite(format!("sequence `{}`: {m}", seq.name)),
                other => other,
            })?;
        let seconds_propagation = t1.elapsed().as_secs_f64();
        // Resize back (PIL nearest) and write; the first frame's mask is its annotation, as DINO writes it.
        let (ow, oh) = (chk.width, chk.height);
        let (lw, lh) = ((gw * patch) as usize, (gh * patch) as usize);
        let mut preds: Vec<Vec<u8>> = vec![first.indices.clone()];
        preds.extend(labels.iter().map(|l| davis::pil_resize_nearest(l, lw, lh, ow, oh)));
        let dir = masks_dir.join(&seq.name);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        for (i, p) in preds.iter().enumerate() {
            let img = IndexedImage { width: ow, height: oh, indices: p.clone(), palette: first.palette.clone() };
            let path = dir.join(format!("{}.png", seq.frame_stem(i)));
            crate::fsutil::write_atomic(&path, &davis::encode_indexed_png(&img)?)?;
        }
        let gt: Vec<Vec<u8>> = seq.annotations.iter().map(|a| davis::read_indexed_png(a).map(|i| i.indices)).collect::<Result<_>>()?;
        let (scores, pred_objects) = super::jandf::score_sequence(&seq.name, &gt, &preds, ow, oh, cfg.bound_th);
        let mismatch = (pred_objects != scores.len()).then(|| serde_json::json!({ "sequence": seq.name, "objects": scores.len(), "predicted_objects": pred_objects }));
        let s = super::jandf::summarise(&scores);
        let summary = serde_json::json!({ "objects": scores.len(), "frames": seq.frames.len(), "j_mean": 100.0 * s.measures.j_mean, "f_mean": 100.0 * s.measures.f_mean, "j_and_f": 100.0 * s.j_and_f });
        Ok(SequenceOutcome { index, objects: scores, summary, mismatch, seconds_features, seconds_propagation, frames: seq.frames.len(), grid: (gh, gw), input: frame_size })
    }
}

/// Rough peak bytes of one sequence's propagation: the affinities of every context frame to the target (and their
/// masked, transposed and top-k copies), the neighbourhood mask, and the frames' features.
fn propagation_bytes(cfg: &DavisConfig, patches: u128, frames: u128, dim: u128) -> u128 {
    let ctx = cfg.n_last_frames.max(0) as u128 + 1;
    let aff = ctx * patches * patches * 4;
    3 * aff + patches * patches * 4 + frames * patches * dim * 4
}

/// davis2017-evaluation scores objects 1..=max id of the first annotation; an id missing below the max (ids {1, 3})
/// has an empty truth and an empty prediction, which it scores as perfect: worth a warning naming the ids.
fn missing_ids_warning(first: &[u8]) -> Option<String> {
    let mut present = [false; 256];
    for &v in first {
        present[v as usize] = true;
    }
    let max = (1..255).rev().find(|&i| present[i])?;
    let missing: Vec<String> = (1..max).filter(|&i| !present[i]).map(|i| i.to_string()).collect();
    (!missing.is_empty()).then(|| {
        format!("object id(s) {} missing from the first annotation (ids 1..={max} are scored): davis2017-evaluation scores a missing object as perfect (J = F = 1), which lifts J&F", missing.join(", "))
    })
}

/// The masks folder every rank writes its sequences into: rank 0 clears it, the others wait for that on the store.
fn shared_masks_folder(run_dir: &Path) -> Result<std::path::PathBuf> {
    let world = crate::dist::world();
    // One name for every rank of a job (they write into one folder), a name per process otherwise.
    let tag = if world.is_distributed() { "ranks".to_string() } else { std::process::id().to_string() };
    let masks_tmp = run_dir.join(format!(".masks.partial-{tag}"));
    if world.is_main() && masks_tmp.exists() {
        std::fs::remove_dir_all(&masks_tmp).map_err(|e| Error::io(&masks_tmp, e))?;
    }
    world.after_rank0_writes("the DAVIS masks folder")?;
    Ok(masks_tmp)
}

/// Every rank's outcomes, in the set's sequence order (each rank ran the sequences `i % size == rank`), through
/// the store: the record of a job is the one-rank record.
fn gather_outcomes(mine: Vec<SequenceOutcome>) -> Result<Vec<SequenceOutcome>> {
    let world = crate::dist::world();
    let bytes = serde_json::to_vec(&mine).expect("outcomes serialise");
    let mut all = Vec::new();
    for (r, b) in world.exchange("davis outcomes", &bytes)?.into_iter().enumerate() {
        let part: Vec<SequenceOutcome> = serde_json::from_slice(&b).map_err(|e| Error::Dist(format!("rank {r}'s DAVIS outcomes do not parse: {e}")))?;
        all.extend(part);
    }
    all.sort_by_key(|o| o.index);
    Ok(all)
}

/// `eval --protocol davis`. Under a launcher the sequences are dealt over the ranks (one masks folder, one
/// record, equal to the one-rank record).
/// Every sequence's grid is known from its size: `topk` and the memory of the propagation are checked before any
/// forward.
fn check_grids(set: &DavisSet, checked: &[Checked], cfg: &DavisConfig, patch: i64, dim: i64, device: Device) -> Result<()> {
    for (seq, chk) in set.sequences.iter().zip(checked) {
        let (sw, sh) = davis::dino_seg_size(chk.width, chk.height, cfg.short_side as usize);
        let (gh, gw) = (sh as i64 / patch, sw as i64 / patch);
        let patches = gh * gw;
        if cfg.topk > patches {
            return Err(Error::option("topk", format!("{} is more than the {patches} patches of a frame of `{}`", cfg.topk, seq.name)));
        }
        if !device.is_cuda() {
            let bytes = propagation_bytes(cfg, patches as u128, seq.frames.len() as u128, dim as u128);
            let what = format!("DAVIS propagation of `{}` (a {gh}x{gw} patch grid at short_side {}: {} context frames of {patches}^2 affinities; lower short_side or n_last_frames, or take a larger patch)", seq.name, cfg.short_side, cfg.n_last_frames + 1);
            crate::info::check_fits("short_side", &what, bytes)?;
        }
    }
    Ok(())
}

/// The record's details of a run's sequences: counts, times, per-sequence and per-object scores, mismatches.
fn outcome_details(set: &DavisSet, outcomes: &[SequenceOutcome], objects: &[super::jandf::ObjectScore]) -> serde_json::Value {
    let per_sequence: serde_json::Map<String, serde_json::Value> = outcomes.iter().map(|o| (set.sequences[o.index].name.clone(), o.summary.clone())).collect();
    let mismatched: Vec<serde_json::Value> = outcomes.iter().filter_map(|o| o.mismatch.clone()).collect();
    let (t_feat, t_prop) = (outcomes.iter().map(|o| o.seconds_features).sum::<f64>(), outcomes.iter().map(|o| o.seconds_propagation).sum::<f64>());
    let n_frames: usize = outcomes.iter().map(|o| o.frames).sum();
    let per_object: serde_json::Map<String, serde_json::Value> = objects
        .iter()
        .map(|o| {
            let m: serde_json::Map<String, serde_json::Value> = o.measures.percent().map(|(k, v)| (k.to_string(), v.into())).collect();
            (format!("{}_{}", o.sequence, o.object), serde_json::Value::Object(m))
        })
        .collect();
    serde_json::json!({
        "sequences": set.sequences.len(), "objects": objects.len(), "frames": n_frames,
        "seconds_features": t_feat, "seconds_propagation": t_prop,
        "frames_per_second": if t_feat + t_prop > 0.0 { n_frames as f64 / (t_feat + t_prop) } else { 0.0 },
        "per_sequence": per_sequence, "per_object": per_object,
        "predicted_objects_differ": mismatched,
        "scoring": "davis2017-evaluation semi-supervised: first and last frames excluded; void (255) read as background; objects 1..max(first annotation)",
    })
}

/// What the record's config says of how the frames were read and the features made.
fn record_config(cfg: &DavisConfig, model: &crate::model::VitConfig, grid: (i64, i64), input: (i64, i64)) -> serde_json::Value {
    let pos = match cfg.pos_embed {
        GridPosEmbed::Sincos => format!("sincos ({:?} coordinates) regenerated for the {}x{} grid", model.pos_embed, grid.0, grid.1).to_lowercase(),
        _ => format!("DINO's interpolate_pos_encoding from {g}x{g} to {}x{} (bicubic, no antialias, +0.1)", grid.0, grid.1, g = model.grid()),
    };
    serde_json::json!({
        "input_size": format!("{}x{} (W x H)", input.0, input.1),
        "grid": format!("{}x{} (rows x cols)", grid.0, grid.1),
        "pos_embed_handling": pos,
        "feature": "last block's patch tokens after the final norm (get_intermediate_layers(n=1)), prefix tokens dropped, L2-normalised",
        "frame_reading": "cv2.imread + cv2.resize INTER_LINEAR (fixed point) to the short side, long side floored to a multiple of 64; /255, mean (0.485, 0.456, 0.406), std (0.228, 0.224, 0.225); annotation by PIL nearest to the grid",
        "masks_palette": "the first annotation's",
        "source": SOURCE,
    })
}

pub fn run(req: &EvalRequest) -> Result<RunRecord> {
    let loaded = Protocol::Davis.load::<DavisConfig>(req.protocol_file.as_deref(), &req.sets)?;
    let cfg = &loaded.cfg;
    cfg.validate()?;
    let device = req.run.device()?;
    let precision = req.run.precision.unwrap_or(crate::config::Precision::F32);
    let amp = precision.autocast(device);
    let root = req.data.as_deref().ok_or_else(|| Error::option("--data", "the davis protocol needs a DAVIS-2017 root (JPEGImages/480p, Annotations/480p, ImageSets/2017/val.txt)"))?;
    let ckpt = req.checkpoint()?;
    let set = davis::open_set(root, &cfg.subset, &cfg.resolution)?;
    let checked: Vec<Checked> = set.sequences.iter().map(check_sequence).collect::<Result<_>>()?;
    let print = set_fingerprint(&set)?;
    let enc = load_vit_with(ckpt, &req.load_options(), device, 0)?;
    let model = &enc.model;
    let patch = model.cfg.patch_size;
    check_grids(&set, &checked, cfg, patch, model.cfg.embed_dim, device)?;
    let params = PropParams { n_last_frames: cfg.n_last_frames as usize, topk: cfg.topk, temperature: cfg.temperature, patch };
    let name = req.model_name("model");
    let overrides = loaded.overrides(&[]);
    let run_dir = req.output.join(format!("{}-davis-{}", crate::results::sanitize(&name), &enc.sha256[..12]));
    std::fs::create_dir_all(&run_dir).map_err(|e| Error::io(&run_dir, e))?;
    let masks_final = run_dir.join("masks");
    let masks_tmp = shared_masks_folder(&run_dir)?;
    let world = crate::dist::world();
    let mine: Vec<usize> = (0..set.sequences.len()).filter(|i| i % world.size == world.rank).collect();
    let pb = if req.run.quiet || !world.is_main() { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(mine.iter().map(|&i| set.sequences[i].frames.len() as u64).sum()) };
    let prop = Propagation { model, cfg, params, batch: frames_per_batch(req, device), device, amp };
    let mut masks_cache: Option<((i64, i64), Tensor)> = None;
    let result = mine
        .iter()
        .map(|&i| {
            let o = prop.sequence(i, &set.sequences[i], &checked[i], &masks_tmp, &mut masks_cache);
            pb.inc(set.sequences[i].frames.len() as u64);
            o
        })
        .collect::<Result<Vec<_>>>();
    pb.finish_and_clear();
    let outcomes = match result.and_then(gather_outcomes) {
        Ok(o) => o,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&masks_tmp);
            // No empty run folder is left behind (remove_dir only removes an empty one).
            let _ = std::fs::remove_dir(&run_dir);
            return Err(e);
        }
    };
    if world.is_main() {
        if masks_final.exists() {
            std::fs::remove_dir_all(&masks_final).map_err(|e| Error::io(&masks_final, e))?;
        }
        std::fs::rename(&masks_tmp, &masks_final).map_err(|e| Error::io(&masks_final, e))?;
    }
    let objects: Vec<super::jandf::ObjectScore> = outcomes.iter().flat_map(|o| o.objects.iter().cloned()).collect();
    let (grid, input) = outcomes.last().map_or(((0, 0), (0, 0)), |o| (o.grid, o.input));
    let s = super::jandf::summarise(&objects);
    let mut details = outcome_details(&set, &outcomes, &objects);
    details["masks"] = serde_json::json!(masks_final);
    details["run_dir"] = serde_json::json!(run_dir);
    let mut extra = record_config(cfg, &model.cfg, grid, input);
    extra["precision"] = precision.effective(device).into();
    extra["frames_per_forward"] = prop.batch.into();
    RecordBuilder::new(Protocol::Davis, &cfg.version, &overrides)
        .headline("j_and_f")
        .model(name, Some(ckpt), Some(enc.sha256.clone()), Some(model.cfg.arch.clone()))
        .source(serde_json::to_value(&enc.source).ok())
        .data(Some(root.display().to_string()), &[print])
        .config(&loaded.origin, cfg, &overrides, &req.run, extra)
        .metric("j_and_f", 100.0 * s.j_and_f)
        .metrics(s.measures.percent())
        .finish(details, &device_name(device), &req.output)
}

/// Scores a results folder as davis2017-evaluation's `evaluation_method.py --results_path` does:
/// `<results>/<seq>/<frame>.png` (indices) against the set's annotations. A missing or mis-sized mask is an error
/// naming it. Returns the per-object scores and, per sequence, the objects the predictions hold.
pub fn score_folder(set: &DavisSet, results: &Path, bound_th: f64) -> Result<(Vec<super::jandf::ObjectScore>, Vec<(String, usize)>)> {
    let mut all = Vec::new();
    let mut pred_objects = Vec::new();
    for seq in &set.sequences {
        let gt: Vec<IndexedImage> = seq.annotations.iter().map(|a| davis::read_indexed_png(a)).collect::<Result<_>>()?;
        let (w, h) = (gt[0].width, gt[0].height);
        let mut preds = Vec::with_capacity(gt.len());
        for i in 0..seq.frames.len() {
            let p = results.join(&seq.name).join(format!("{}.png", seq.frame_stem(i)));
            if i == 0 || i + 1 == seq.frames.len() {
                preds.push(vec![0u8; w * h]);
                continue;
            }
            let m = davis::read_indexed_png(&p)?;
            if (m.width, m.height) != (w, h) {
                return Err(Error::data(&p, format!("is {}x{}, the annotations are {w}x{h}", m.width, m.height)));
            }
            preds.push(m.indices);
        }
        let gt: Vec<Vec<u8>> = gt.into_iter().map(|g| g.indices).collect();
        let (scores, n) = super::jandf::score_sequence(&seq.name, &gt, &preds, w, h, bound_th);
        pred_objects.push((seq.name.clone(), n));
        all.extend(scores);
    }
    Ok((all, pred_objects))
}

#[cfg(test)]
mod tests {
    use super::missing_ids_warning;

    /// DINO's `norm_mask` (min-max per channel before the argmax) is what lets an object whose propagated mass is
    /// weak everywhere take the pixels where it peaks: without it the background wins them all.
    #[test]
    fn norm_mask_decides_a_weak_object() {
        use tch::{Kind, Tensor};
        // Background 0.6 to 0.7 across a 2x4 grid; the object 0.05 everywhere but 0.3 at one patch.
        let bg = Tensor::from_slice(&[0.6f32, 0.62, 0.64, 0.66, 0.68, 0.7, 0.65, 0.63]).view([2, 4]);
        let obj = Tensor::from_slice(&[0.05f32, 0.05, 0.05, 0.05, 0.05, 0.3, 0.05, 0.05]).view([2, 4]);
        let seg = Tensor::stack(&[bg, obj], 0).unsqueeze(0).to_kind(Kind::Float);
        let labels = super::soft_to_labels(&seg, 2);
        // The object takes the pixel at its peak patch (row 1, column 1, upsampled x2: pixel (3, 3) of the 4x8 map).
        assert_eq!(labels[3 * 8 + 3], 1, "{labels:?}");
        // Without the normalisation the background's larger values would win every pixel.
        let (_, raw) = seg.upsample_bilinear2d([4, 8], false, Some(2.0), Some(2.0)).get(0).max_dim(0, false);
        assert_eq!(raw.sum(Kind::Int64).int64_value(&[]), 0);
    }

    #[test]
    fn a_gap_in_the_first_annotations_ids_is_named() {
        assert_eq!(missing_ids_warning(&[0, 1, 2, 3, 255]), None);
        let w = missing_ids_warning(&[0, 1, 3, 3, 255]).unwrap();
        assert!(w.starts_with("object id(s) 2 missing") && w.contains("ids 1..=3"), "{w}");
        assert!(missing_ids_warning(&[0, 4]).unwrap().starts_with("object id(s) 1, 2, 3 missing"));
        assert_eq!(missing_ids_warning(&[0, 0, 255]), None);
    }
}
