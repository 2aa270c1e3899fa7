//! Checkpoint layouts of the methods a benchmark compares against, brought to timm's ViT names.
//!
//! Each family's training code nests its encoder in its own way; the facts below come from the public code:
//! - MAE (facebookresearch/mae, `util/misc.py:save_model`, `models_mae.py`): `{'model', 'optimizer', 'epoch',
//!   'scaler', 'args'}`; timm key names plus `mask_token` and a `decoder_*` decoder, dropped here.
//! - DINO (facebookresearch/dino, `main_dino.py`): `{'student', 'teacher', 'optimizer', 'epoch', 'args',
//!   'dino_loss'}`; the student is DDP-wrapped (`module.backbone.`), the teacher is not (`backbone.`); both carry a
//!   `head.` DINOHead. The teacher's backbone is what `eval_knn.py` evaluates by default.
//! - iBOT (bytedance/ibot, `main_ibot.py`, `models/vision_transformer.py`): the same nesting with `ibot_loss`, an
//!   iBOTHead, and `masked_embed` (the mask token) in the backbone.
//! - MoCo v3 (facebookresearch/moco-v3, `main_moco.py`, `moco/builder.py`): `{'epoch', 'arch', 'state_dict',
//!   'optimizer', 'scaler'}` with `module.base_encoder.`, `module.momentum_encoder.` and `module.predictor.`; the
//!   base encoder's `head` is the projector MLP. Its ViT-S (`vits.py:vit_small`) has 12 heads, not timm's 6.
//! - I-JEPA (facebookresearch/ijepa, `src/train.py`, `src/models/vision_transformer.py`): `{'encoder',
//!   'predictor', 'target_encoder', 'opt', 'scaler', 'epoch', 'loss', 'batch_size', 'world_size', 'lr'}`, each
//!   model DDP-wrapped (`module.`); timm key names, no CLS token, a patch-only `pos_embed`.
//! - DINOv2 (facebookresearch/dinov2, `dinov2/models/vision_transformer.py`, `dinov2/train/train.py`): released
//!   backbones are bare state dicts with `mask_token`, layer scale `ls1.gamma`/`ls2.gamma`, optional
//!   `register_tokens`, patch 14 and a 518-pixel (37 x 37) `pos_embed`; training code writes `{'teacher': ...}` or
//!   `{'model': ...}` with `teacher.backbone.`, `student.backbone.`, `dino_head.`, `ibot_head.`, and with block
//!   chunking `blocks.<chunk>.<index>.`. Registers are mapped as timm's `_convert_dinov2` does
//!   (timm/models/vision_transformer.py): `reg_token`, the CLS row of `pos_embed` folded into `cls_token`, and a
//!   patch-only `pos_embed` (`no_embed_class`).
//! - Latent MIM (yibingwei-1/LatentMIM, `main_lmim.py`, `models_lmim.py`, `vits.py`): `{'state_dict', 'optimizer',
//!   'loss_scaler', 'epoch'}` with `encoder.` (online), `target_encoder.` and `decoder.`; the encoder embeds
//!   patches with a Linear `embed.proj` over (row, column, channel) pixels, keeps its sin-cos table in
//!   `pos_embed.pos_embeds`, and has a projection `head.`.
use std::collections::BTreeMap;

use serde::Serialize;
use tch::Tensor;

use super::Checkpoint;
use crate::error::{Error, Result};

/// A method whose checkpoint layout is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// A state dict with timm's names (possibly under `model`/`state_dict`, possibly with `module.`).
    Timm,
    Mae,
    Dino,
    Ibot,
    Mocov3,
    Ijepa,
    Dinov2,
    Lmim,
}

impl Family {
    pub const ALL: [Family; 8] = [Family::Timm, Family::Mae, Family::Dino, Family::Ibot, Family::Mocov3, Family::Ijepa, Family::Dinov2, Family::Lmim];

    pub fn name(self) -> &'static str {
        match self {
            Family::Timm => "timm",
            Family::Mae => "mae",
            Family::Dino => "dino",
            Family::Ibot => "ibot",
            Family::Mocov3 => "mocov3",
            Family::Ijepa => "ijepa",
            Family::Dinov2 => "dinov2",
            Family::Lmim => "lmim",
        }
    }

    /// The method's name as the reference table (protocols/reference.toml) spells it; None for plain timm files.
    pub fn method(self) -> Option<&'static str> {
        Some(match self {
            Family::Timm => return None,
            Family::Mae => "MAE",
            Family::Dino => "DINO",
            Family::Ibot => "iBOT",
            Family::Mocov3 => "MoCo v3",
            Family::Ijepa => "I-JEPA",
            Family::Dinov2 => "DINOv2",
            Family::Lmim => "Latent MIM",
        })
    }

    /// Parses `--from`.
    pub fn parse(s: &str) -> Result<Family> {
        let norm = s.to_ascii_lowercase().replace(['-', '_', ' '], "");
        let alias = match norm.as_str() {
            "mocov3" | "moco" => "mocov3",
            "latentmim" => "lmim",
            other => other,
        }
        .to_string();
        Family::ALL.into_iter().find(|f| f.name() == alias).ok_or_else(|| {
            Error::option("--from", format!("`{s}` is not a known checkpoint family (known: {})", Family::ALL.map(|f| f.name()).join(", ")))
        })
    }

    /// The feature each method's own evaluation uses: the CLS token after the final norm for DINO, iBOT, MoCo v3
    /// and DINOv2 (their k-NN and linear evaluations), the average of the normed tokens for I-JEPA (no CLS
    /// token). MAE, Latent MIM and timm files keep the protocol's own default (the protocol files already follow
    /// MAE's and Latent MIM's recipes, and lmim-bench's own checkpoints share Latent MIM's layout).
    pub fn eval_feature(self) -> Option<&'static str> {
        match self {
            Family::Dino | Family::Ibot | Family::Mocov3 | Family::Dinov2 => Some("cls"),
            Family::Ijepa => Some("avg"),
            Family::Timm | Family::Mae | Family::Lmim => None,
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What the conversion did: the family, the sub-model taken, and what was left out.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Conversion {
    pub family: Family,
    /// Key prefix of the sub-model that was taken (`teacher.backbone.`, `target_encoder.module.`, ...; empty for
    /// a bare state dict).
    pub submodel: String,
    /// Tensors taken.
    pub taken: usize,
    /// Groups of tensors left out, as `prefix (count)`: other sub-models, heads, projectors, optimiser state.
    pub dropped: Vec<String>,
    /// How the family was chosen: `detected`, or `--from`.
    pub chosen_by: String,
}

impl Conversion {
    pub fn summary(&self) -> String {
        let sub = if self.submodel.is_empty() { "the whole state dict".to_string() } else { format!("`{}`", self.submodel.trim_end_matches('.')) };
        let dropped = if self.dropped.is_empty() { "nothing".to_string() } else { self.dropped.join(", ") };
        format!("{} layout ({}): took {sub} ({} tensors); dropped {dropped}", self.family, self.chosen_by, self.taken)
    }
}

/// A checkpoint under timm names with what its family implies for the model.
pub struct Converted {
    pub ckpt: Checkpoint,
    pub conversion: Conversion,
    /// Heads of the attention, when the family's code fixes them differently from timm's size table.
    pub num_heads: Option<i64>,
}

fn starts(names: &[&str], prefix: &str) -> bool {
    names.iter().any(|n| n.starts_with(prefix))
}

/// A ViT encoder's tensors sit under `prefix`.
fn vit_at(names: &[&str], prefix: &str) -> bool {
    ["patch_embed.proj.weight", "embed.proj.weight", "blocks.0.norm1.weight", "blocks.0.0.norm1.weight"]
        .iter()
        .any(|k| names.iter().any(|n| n.len() == prefix.len() + k.len() && n.starts_with(prefix) && n.ends_with(k)))
}

/// The first prefix of `options` with an encoder under it.
fn first_vit<'a>(names: &[&str], options: &[&'a str]) -> Option<&'a str> {
    options.iter().copied().find(|p| vit_at(names, p))
}

/// The families whose layout the tensor names match. More than one means the file is ambiguous.
pub fn detect(ckpt: &Checkpoint) -> Vec<Family> {
    let names: Vec<&str> = ckpt.tensors.iter().map(|(n, _)| n.as_str()).collect();
    let names = &names[..];
    let mut out = Vec::new();
    let mut add = |f: Family| {
        if !out.contains(&f) {
            out.push(f)
        }
    };
    // A prefix every name shares (DDP's `module.`) does not change the layout.
    let stripped: Vec<&str> = if !names.is_empty() && names.iter().all(|n| n.starts_with("module.")) { names.iter().map(|n| &n[7..]).collect() } else { names.to_vec() };
    let s = &stripped[..];

    if first_vit(names, &["target_encoder.module.", "target_encoder."]).is_some() && starts(names, "predictor.") {
        add(Family::Ijepa);
    }
    if vit_at(s, "encoder.") && !starts(s, "predictor.") {
        add(Family::Lmim);
    }
    if let Some(p) = first_vit(names, &["teacher.backbone.", "teacher.module.backbone."]) {
        let dinov2 = starts(names, "teacher.dino_head.") || starts(names, "teacher.ibot_head.") || names.contains(&format!("{p}mask_token").as_str());
        let ibot = starts(names, "ibot_loss.") || names.contains(&format!("{p}masked_embed").as_str()) || starts(names, "teacher.head.last_layer2.");
        let dino = starts(names, "dino_loss.");
        if dinov2 {
            add(Family::Dinov2);
        }
        if ibot {
            add(Family::Ibot);
        }
        if dino {
            add(Family::Dino);
        }
        if !dinov2 && !ibot && !dino {
            // DINO's and iBOT's files differ only in the loss state and the head; without either, both fit.
            add(Family::Dino);
            add(Family::Ibot);
        }
    }
    if vit_at(s, "base_encoder.") {
        add(Family::Mocov3);
    }
    if vit_at(s, "") {
        let has = |k: &str| s.contains(&k);
        if starts(s, "decoder_") {
            add(Family::Mae);
        } else if has("register_tokens") || (has("mask_token") && has("blocks.0.ls1.gamma")) || starts(s, "blocks.0.0.") {
            add(Family::Dinov2);
        } else if has("masked_embed") {
            add(Family::Ibot);
        } else if has("mask_token") {
            // A bare ViT with a mask token: DINOv2's released backbones ([1, D]) or an MAE encoder ([1, 1, D]).
            let dim = ckpt.get("mask_token").or_else(|| ckpt.get("module.mask_token")).map_or(0, |t| t.dim());
            add(if dim == 2 { Family::Dinov2 } else { Family::Mae });
        } else {
            add(Family::Timm);
        }
    }
    out
}

/// Takes the tensors under `prefix` (renamed without it) and groups the rest by their first one or two name parts.
fn take(ckpt: &mut Checkpoint, prefix: &str, drop_inside: &[&str]) -> (usize, Vec<String>) {
    let mut kept = Vec::new();
    let mut dropped: BTreeMap<String, usize> = BTreeMap::new();
    for (name, t) in std::mem::take(&mut ckpt.tensors) {
        match name.strip_prefix(prefix) {
            Some(rest) if !drop_inside.iter().any(|d| rest.starts_with(d)) => kept.push((rest.to_string(), t)),
            Some(rest) => {
                // Named by the sub-module (`head`, `decoder_blocks`, `mask_token`).
                let head = rest.split('.').next().unwrap_or(rest);
                *dropped.entry(format!("{prefix}{head}")).or_default() += 1;
            }
            None => {
                let parts: Vec<&str> = name.split('.').collect();
                // `module.` and `teacher.`/`student.` say little alone: name the sub-module below them.
                let depth = match parts.get(1) {
                    _ if parts.len() <= 2 || !matches!(parts[0], "module" | "teacher" | "student" | "model") => 1,
                    Some(&"module") if parts.len() > 3 => 3,
                    _ => 2,
                };
                *dropped.entry(parts[..depth.min(parts.len())].join(".")).or_default() += 1;
            }
        }
    }
    let n = kept.len();
    ckpt.tensors = kept;
    (n, dropped.into_iter().map(|(k, v)| format!("{k} ({v})")).collect())
}

fn no_submodel(ckpt: &Checkpoint, family: Family, wanted: &str) -> Error {
    Error::checkpoint(&ckpt.path, format!("no {family} encoder in this file: expected tensors under {wanted}; pass another --from, or none to detect the layout"))
}

/// Brings `ckpt` to timm names with the layout of `from`, or the detected one. An ambiguous file, or one that
/// matches no layout, is refused (bad input).
pub fn convert(mut ckpt: Checkpoint, from: Option<Family>) -> Result<Converted> {
    let chosen_by = if from.is_some() { "--from" } else { "detected" };
    let family = match from {
        Some(f) => f,
        None => {
            let found = detect(&ckpt);
            match found.as_slice() {
                [one] => *one,
                [] => {
                    let sample: Vec<&str> = ckpt.tensors.iter().take(5).map(|(n, _)| n.as_str()).collect();
                    return Err(Error::checkpoint(
                        &ckpt.path,
                        format!(
                            "no known ViT layout (tensor names start {}); pass --from FAMILY ({})",
                            sample.join(", "),
                            Family::ALL.map(|f| f.name()).join(", ")
                        ),
                    ));
                }
                many => {
                    return Err(Error::checkpoint(
                        &ckpt.path,
                        format!(
                            "ambiguous checkpoint layout: it matches {}; pass --from with one of them",
                            many.iter().map(|f| f.name()).collect::<Vec<_>>().join(", ")
                        ),
                    ))
                }
            }
        }
    };
    let names: Vec<String> = ckpt.tensors.iter().map(|(n, _)| n.clone()).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let module = if !names.is_empty() && names.iter().all(|n| n.starts_with("module.")) { "module." } else { "" };
    let mut num_heads = None;
    let (prefix, drop_inside): (String, Vec<&str>) = match family {
        Family::Timm => (module.to_string(), vec![]),
        Family::Mae => (module.to_string(), vec!["decoder_", "mask_token"]),
        Family::Dino | Family::Ibot => {
            let p = first_vit(&names, &["teacher.backbone.", "teacher.module.backbone.", "backbone.", "module.backbone.", ""])
                .ok_or_else(|| no_submodel(&ckpt, family, "`teacher.backbone.`"))?;
            let p = if p.is_empty() { module } else { p };
            (p.to_string(), vec!["head.", "masked_embed"])
        }
        Family::Dinov2 => {
            let p = first_vit(&names, &["teacher.backbone.", "teacher.module.backbone.", "backbone.", ""])
                .ok_or_else(|| no_submodel(&ckpt, family, "`teacher.backbone.` or the top level"))?;
            let p = if p.is_empty() { module } else { p };
            (p.to_string(), vec!["mask_token", "head."])
        }
        Family::Mocov3 => {
            let p = first_vit(&names, &["module.base_encoder.", "base_encoder."]).ok_or_else(|| no_submodel(&ckpt, family, "`module.base_encoder.`"))?;
            (p.to_string(), vec!["head."])
        }
        Family::Ijepa => {
            let p = first_vit(&names, &["target_encoder.module.", "target_encoder."]).ok_or_else(|| no_submodel(&ckpt, family, "`target_encoder.module.`"))?;
            (p.to_string(), vec![])
        }
        Family::Lmim => {
            let p = format!("{module}encoder.");
            if !vit_at(&names, &p) {
                return Err(no_submodel(&ckpt, family, "`encoder.`"));
            }
            (p, vec!["head."])
        }
    };
    let (taken, dropped) = take(&mut ckpt, &prefix, &drop_inside);
    if taken == 0 {
        return Err(no_submodel(&ckpt, family, &format!("`{prefix}`")));
    }
    let mut out = Vec::with_capacity(ckpt.tensors.len());
    let mut reg: Option<Tensor> = None;
    for (name, t) in std::mem::take(&mut ckpt.tensors) {
        // DINOv2's block chunks (`BlockChunk`, padded with Identity) keep each block's global index inside.
        let name = match (family, name.strip_prefix("blocks.")) {
            (Family::Dinov2, Some(rest)) => {
                let parts: Vec<&str> = rest.splitn(3, '.').collect();
                if parts.len() == 3 && parts[0].parse::<u32>().is_ok() && parts[1].parse::<u32>().is_ok() {
                    format!("blocks.{}.{}", parts[1], parts[2])
                } else {
                    name
                }
            }
            _ => name,
        };
        if name.contains(".mlp.w12.") || name.contains(".mlp.w3.") {
            return Err(Error::checkpoint(&ckpt.path, "SwiGLU feed-forward blocks (DINOv2 ViT-g) are not supported by lmim-bench's ViT"));
        }
        if name == "register_tokens" {
            reg = Some(t);
        } else if let Some(nt) = super::lmim_to_timm(name, t) {
            out.push(nt);
        }
    }
    if let Some(reg) = reg {
        // timm's `_convert_dinov2`: registers take no position; the CLS row of pos_embed moves into cls_token.
        let pos = out.iter().position(|(n, _)| n == "pos_embed").ok_or_else(|| Error::checkpoint(&ckpt.path, "register tokens without a pos_embed"))?;
        let pe = out[pos].1.shallow_clone();
        let n = pe.size()[1];
        out[pos].1 = pe.narrow(1, 1, n - 1).contiguous();
        if let Some(cls) = out.iter_mut().find(|(n, _)| n == "cls_token") {
            cls.1 = &cls.1 + pe.narrow(1, 0, 1);
        }
        out.push(("reg_token".to_string(), reg));
    }
    if family == Family::Mocov3 {
        // moco-v3 vits.py: vit_small is 384 wide with 12 heads.
        let dim = out.iter().find(|(n, _)| n == "patch_embed.proj.weight").map_or(0, |(_, t)| t.size()[0]);
        if dim == 384 {
            num_heads = Some(12);
        }
    }
    ckpt.tensors = out;
    let conversion = Conversion { family, submodel: prefix, taken, dropped, chosen_by: chosen_by.into() };
    Ok(Converted { ckpt, conversion, num_heads })
}
