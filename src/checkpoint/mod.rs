//! Checkpoints as safetensors with timm's key names, plus import of PyTorch `.pth` state dicts.
//!
//! Metadata entries: `arch` (timm name), `config` (the model config as JSON), `format` (`lmim-bench`), and any
//! extra entries a caller adds (training state uses `step`, `epoch`, ...). Files are written to a temporary name in
//! the same directory, synced and renamed, so a crash never leaves a half-written checkpoint under the final name
//! (see `crate::fsutil`), and the same tensors and metadata always give the same bytes (and the same SHA-256).
pub mod families;
pub mod pth;

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use safetensors::tensor::Dtype;
use tch::{nn, Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::model::{VisionTransformer, VitConfig};
pub use families::{Conversion, Family};

/// Tensors with names, in a stable order, and string metadata.
#[derive(Debug, Default)]
pub struct Checkpoint {
    pub tensors: Vec<(String, Tensor)>,
    pub metadata: BTreeMap<String, String>,
    pub path: PathBuf,
}

impl Checkpoint {
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }
    pub fn shapes(&self) -> HashMap<String, Vec<i64>> {
        self.tensors.iter().map(|(n, t)| (n.clone(), t.size())).collect()
    }
}

fn to_dtype(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        _ => return None,
    })
}

fn to_kind(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

/// Raw bytes of a tensor in its own dtype, contiguous, on the CPU.
pub fn tensor_bytes(t: &Tensor) -> Vec<u8> {
    let t = t.detach().to_device(Device::Cpu).contiguous();
    let n = t.numel();
    let mut buf = vec![0u8; n * t.kind().elt_size_in_bytes()];
    t.copy_data_u8(&mut buf, n);
    buf
}

pub use crate::fsutil::{clean_stale_temps, sha256_file, write_atomic};

/// Opens a checkpoint for reading: a regular file only (`crate::fsutil::open_regular`).
pub fn open_regular(path: &Path) -> Result<std::fs::File> {
    crate::fsutil::open_regular(path, None)
}

/// The safetensors encoding of `tensors` with `metadata`, byte for byte the same for the same input (the header
/// is written here because `safetensors::serialize` takes the metadata as a `HashMap`, whose order changes from
/// one call to the next, so two saves of the same model hashed differently). Same layout as safetensors'
/// own writer (huggingface/safetensors, safetensors/src/tensor.rs): tensors by descending dtype, then name; the
/// JSON header padded with spaces to a multiple of 8 bytes.
fn serialize_deterministic(path: &Path, tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)], metadata: &BTreeMap<String, String>, checksum: bool) -> Result<Vec<u8>> {
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| tensors[b].1.cmp(&tensors[a].1).then_with(|| tensors[a].0.cmp(&tensors[b].0)));
    if let Some(w) = order.windows(2).find(|w| tensors[w[0]].0 == tensors[w[1]].0) {
        return Err(Error::checkpoint(path, format!("tensor name `{}` appears twice", tensors[w[0]].0)));
    }
    let mut metadata = std::borrow::Cow::Borrowed(metadata);
    if checksum {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for &i in &order {
            h.update(&tensors[i].3);
        }
        metadata.to_mut().insert(DATA_SHA256.to_string(), hex::encode(h.finalize()));
    }
    let mut header = String::from("{\"__metadata__\":");
    header.push_str(&json(metadata.as_ref()));
    let mut offset = 0usize;
    for &i in &order {
        let (name, dtype, shape, bytes) = &tensors[i];
        let numel = shape.iter().product::<usize>();
        if numel * dtype.bitsize() / 8 != bytes.len() {
            return Err(Error::checkpoint(path, format!("tensor `{name}`: {} bytes for shape {shape:?}", bytes.len())));
        }
        header.push_str(&format!(
            ",{}:{{\"dtype\":{},\"shape\":{},\"data_offsets\":[{offset},{}]}}",
            json(name),
            json(dtype),
            json(shape),
            offset + bytes.len()
        ));
        offset += bytes.len();
    }
    header.push('}');
    let mut header = header.into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + header.len() + offset);
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(&header);
    for &i in &order {
        out.extend_from_slice(&tensors[i].3);
    }
    Ok(out)
}

fn json<T: serde::Serialize + ?Sized>(v: &T) -> String {
    serde_json::to_string(v).expect("header values serialise")
}

/// The metadata key of the sha256 of a checkpoint's tensor bytes ([`save_checked`]).
pub const DATA_SHA256: &str = "data_sha256";

/// Saves named tensors with metadata as safetensors, atomically; the same input gives the same bytes.
pub fn save(path: &Path, tensors: &[(String, Tensor)], metadata: &BTreeMap<String, String>) -> Result<()> {
    save_with(path, tensors, metadata, false)
}

/// As [`save`], with the sha256 of the tensor bytes in the metadata ([`DATA_SHA256`]), which [`load_checked`]
/// verifies: for the checkpoints a run resumes from, where a flipped bit would otherwise load and diverge.
pub fn save_checked(path: &Path, tensors: &[(String, Tensor)], metadata: &BTreeMap<String, String>) -> Result<()> {
    save_with(path, tensors, metadata, true)
}

fn save_with(path: &Path, tensors: &[(String, Tensor)], metadata: &BTreeMap<String, String>, checksum: bool) -> Result<()> {
    let mut owned = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let dtype = to_dtype(t.kind()).ok_or_else(|| Error::checkpoint(path, format!("tensor `{name}` has unsupported kind {:?}", t.kind())))?;
        let shape: Vec<usize> = t.size().iter().map(|&s| s as usize).collect();
        owned.push((name.clone(), dtype, shape, tensor_bytes(t)));
    }
    let bytes = serialize_deterministic(path, &owned, metadata, checksum)?;
    write_atomic(path, &bytes)
}

/// Loads a safetensors file onto the CPU.
pub fn load(path: &Path) -> Result<Checkpoint> {
    load_impl(path, false)
}

/// As [`load`], verifying the tensor bytes against the checksum [`save_checked`] wrote (a file without one, of
/// an older version, loads unverified); a mismatch is an error naming both sums.
pub fn load_checked(path: &Path) -> Result<Checkpoint> {
    load_impl(path, true)
}

fn load_impl(path: &Path, verify: bool) -> Result<Checkpoint> {
    let mut bytes = Vec::new();
    open_regular(path)?.read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::checkpoint(path, format!("cannot parse safetensors ({e}); truncated or not a safetensors file?")))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| Error::checkpoint(path, e.to_string()))?;
    let metadata: BTreeMap<String, String> = header.metadata().clone().unwrap_or_default().into_iter().collect();
    if let (true, Some(want)) = (verify, metadata.get(DATA_SHA256)) {
        use sha2::{Digest, Sha256};
        // The data section follows the 8-byte length and the header (safetensors' layout).
        let start = 8 + u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes, parsed above")) as usize;
        let got = hex::encode(Sha256::digest(&bytes[start..]));
        if &got != want {
            return Err(Error::checkpoint(path, format!("its tensors do not match the checksum written with them (sha256 {got}, written {want}): the file was changed or corrupted after it was saved")));
        }
    }
    let mut tensors = Vec::new();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    for name in names {
        let view = st.tensor(&name).map_err(|e| Error::checkpoint(path, e.to_string()))?;
        let kind = to_kind(view.dtype()).ok_or_else(|| Error::checkpoint(path, format!("tensor `{name}` has unsupported dtype {:?}", view.dtype())))?;
        let shape: Vec<i64> = view.shape().iter().map(|&s| s as i64).collect();
        tensors.push((name, Tensor::from_data_size(view.data(), &shape, kind)));
    }
    Ok(Checkpoint { tensors, metadata, path: path.to_path_buf() })
}

/// Loads a checkpoint of any supported format: safetensors, or a PyTorch `.pth`/`.pt`/`.bin` pickle. A file in
/// the legacy (pre-zip) `torch.save` format is reported as such, not as a broken safetensors file.
pub fn load_any(path: &Path) -> Result<Checkpoint> {
    let mut head = Vec::with_capacity(512);
    open_regular(path)?.take(512).read_to_end(&mut head).map_err(|e| Error::io(path, e))?;
    if head.starts_with(b"PK") || pth::is_legacy_torch_save(&head) {
        pth::load(path)
    } else {
        load(path)
    }
}

/// Missing and unexpected keys found when loading into a model.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct LoadReport {
    pub missing: Vec<String>,
    pub unexpected: Vec<String>,
}

impl LoadReport {
    pub fn summary(&self) -> String {
        let show = |v: &[String]| if v.is_empty() { "none".to_string() } else { v.join(", ") };
        format!("missing keys: {}; unexpected keys: {}", show(&self.missing), show(&self.unexpected))
    }
}

/// Copies tensors into the var store's variables with the same names. A shape mismatch is an error; missing keys
/// listed in `allow_missing` (by prefix) are tolerated, any other missing key is an error.
pub fn load_into(vs: &nn::VarStore, ckpt: &Checkpoint, allow_missing: &[&str]) -> Result<LoadReport> {
    let vars = vs.variables();
    let mut report = LoadReport::default();
    let by_name: HashMap<&str, &Tensor> = ckpt.tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for name in names {
        let var = &vars[name];
        match by_name.get(name.as_str()) {
            Some(src) => {
                if src.size() != var.size() {
                    return Err(Error::ShapeMismatch { path: ckpt.path.clone(), name: name.clone(), found: src.size(), expected: var.size() });
                }
                // Integers cast to floats would load as weights nobody trained; NaN or inf would surface only as
                // a "diverged" run or NaN features much later.
                if var.is_floating_point() && !src.is_floating_point() {
                    return Err(Error::checkpoint(&ckpt.path, format!("tensor `{name}` is {:?}, not floating point as the model's weights", src.kind())));
                }
                if src.is_floating_point() && src.isfinite().all().int64_value(&[]) == 0 {
                    return Err(Error::checkpoint(&ckpt.path, format!("tensor `{name}` holds NaN or infinite values")));
                }
                tch::no_grad(|| {
                    let mut v = var.shallow_clone();
                    v.copy_(&src.to_kind(var.kind()).to_device(var.device()))
                });
            }
            None => report.missing.push(name.clone()),
        }
    }
    report.unexpected = ckpt.tensors.iter().map(|(n, _)| n.clone()).filter(|n| !vars.contains_key(n)).collect();
    let fatal: Vec<String> = report.missing.iter().filter(|m| !allow_missing.iter().any(|p| m.starts_with(p))).cloned().collect();
    if !fatal.is_empty() {
        return Err(Error::MissingKeys { path: ckpt.path.clone(), names: fatal });
    }
    Ok(report)
}

/// Brings state dicts from other code bases to timm's ViT names:
/// - strips the `module.` prefix of DDP checkpoints;
/// - for a Latent MIM model (keys under `encoder.`), keeps the online encoder and drops its projection head;
/// - converts the Latent MIM Linear patch embedding (`embed.proj`, input in (row, col, channel) order) into timm's
///   conv weight `[D, 3, p, p]`, and the `pos_embed.pos_embeds` buffer `[N+1, D]` into `pos_embed [1, N+1, D]`.
pub fn to_timm_names(mut ckpt: Checkpoint) -> Checkpoint {
    let strip = |t: &mut Vec<(String, Tensor)>, prefix: &str| {
        if !t.is_empty() && t.iter().all(|(n, _)| n.starts_with(prefix)) {
            for (n, _) in t.iter_mut() {
                *n = n[prefix.len()..].to_string();
            }
        }
    };
    strip(&mut ckpt.tensors, "module.");
    if ckpt.tensors.iter().any(|(n, _)| n.starts_with("encoder.")) {
        ckpt.tensors.retain(|(n, _)| n.starts_with("encoder.") && !n.starts_with("encoder.head."));
        strip(&mut ckpt.tensors, "encoder.");
    }
    ckpt.tensors = std::mem::take(&mut ckpt.tensors).into_iter().filter_map(|(n, t)| lmim_to_timm(n, t)).collect();
    ckpt
}

/// One tensor of a Latent MIM encoder under timm's name (None: not part of a timm ViT): the Linear patch embedding
/// over (row, col, channel) pixels becomes timm's conv weight `[D, 3, p, p]`, the `pos_embeds` buffer `[N+1, D]`
/// becomes `pos_embed [1, N+1, D]`, and the mask projection is dropped. Other names pass through.
pub(crate) fn lmim_to_timm(name: String, t: Tensor) -> Option<(String, Tensor)> {
    Some(match name.as_str() {
        "embed.proj.weight" if t.dim() == 2 => {
            let d = t.size()[0];
            let p = ((t.size()[1] / 3) as f64).sqrt().round() as i64;
            ("patch_embed.proj.weight".to_string(), t.reshape([d, p, p, 3]).permute([0, 3, 1, 2]).contiguous())
        }
        "embed.proj.bias" => ("patch_embed.proj.bias".to_string(), t),
        "pos_embed.pos_embeds" => ("pos_embed".to_string(), t.unsqueeze(0)),
        "mask_proj.weight" | "mask_proj.bias" => return None,
        _ => (name, t),
    })
}

/// How to read an encoder checkpoint: the architecture when the file does not say, the family layout when it
/// must not be detected, and the input size to resample the position embedding to.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadOptions {
    pub arch: Option<String>,
    /// None: detect the layout.
    pub from: Option<Family>,
    /// Input size; the position embedding is resampled to its grid as timm does. None: the file's own, except
    /// DINOv2's 518-pixel backbones, which evaluate at 224 as in DINOv2's own evaluations.
    pub img_size: Option<i64>,
}

impl LoadOptions {
    pub fn arch(arch: Option<&str>) -> Self {
        LoadOptions { arch: arch.map(String::from), ..Default::default() }
    }
}

/// Where an encoder's weights came from, as records and converted files state it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SourceInfo {
    /// The method's layout (`dino`, `ijepa`, ..., `timm`).
    pub family: String,
    /// Key prefix of the sub-model taken (`teacher.backbone.`, ...); empty for a bare state dict.
    pub submodel: String,
    /// sha256 of the original file (for a file written by `convert`, the file it was converted from).
    pub source_sha256: String,
    /// Groups of tensors left out, as `prefix (count)`.
    pub dropped: Vec<String>,
    /// The family's own evaluation feature, used unless the protocol is told otherwise.
    pub eval_feature: Option<String>,
    /// `detected` or `--from`.
    pub chosen_by: String,
    /// `37x37 -> 16x16` when the position embedding was resampled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pos_embed_resampled: Option<String>,
}

impl SourceInfo {
    pub fn summary(&self) -> String {
        let sub = if self.submodel.is_empty() { "the whole state dict".to_string() } else { format!("`{}`", self.submodel.trim_end_matches('.')) };
        let dropped = if self.dropped.is_empty() { "nothing".to_string() } else { self.dropped.join(", ") };
        let mut s = format!("{} layout ({}): took {sub}; dropped {dropped}", self.family, self.chosen_by);
        if let Some(r) = &self.pos_embed_resampled {
            s.push_str(&format!("; pos_embed resampled {r}"));
        }
        if let Some(f) = &self.eval_feature {
            s.push_str(&format!("; eval feature {f}"));
        }
        s
    }

    /// The metadata entries `convert` writes, so that a converted file keeps naming its source.
    pub fn to_metadata(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        m.insert("family".into(), self.family.clone());
        m.insert("submodel".into(), self.submodel.clone());
        m.insert("source_sha256".into(), self.source_sha256.clone());
        m.insert("dropped".into(), serde_json::to_string(&self.dropped).expect("strings serialise"));
        m.insert("chosen_by".into(), self.chosen_by.clone());
        if let Some(f) = &self.eval_feature {
            m.insert("eval_feature".into(), f.clone());
        }
        if let Some(r) = &self.pos_embed_resampled {
            m.insert("pos_embed_resampled".into(), r.clone());
        }
        m
    }
}

/// A ViT with its var store, built from a checkpoint.
pub struct LoadedVit {
    pub vs: nn::VarStore,
    pub model: VisionTransformer,
    pub report: LoadReport,
    pub sha256: String,
    pub source: SourceInfo,
}

/// An encoder's tensors under timm names with the config they build, before any model exists.
pub struct Imported {
    pub ckpt: Checkpoint,
    pub cfg: VitConfig,
    pub sha256: String,
    pub source: SourceInfo,
}

/// Resolves the architecture: `arch` given by the user, else the checkpoint's `config`/`arch` metadata, else a
/// guess from the tensor shapes.
pub fn resolve_config(ckpt: &Checkpoint, arch: Option<&str>) -> Result<VitConfig> {
    resolve_config_with(ckpt, arch, None, None)
}

/// The attention heads of timm's ViT sizes, by width (the shapes do not say).
fn heads_for_dim(dim: i64) -> i64 {
    match dim {
        96 | 192 => 3,
        384 => 6,
        768 => 12,
        1024 | 1280 => 16,
        1536 => 24,
        d => (d / 64).max(1),
    }
}

fn size_name(dim: i64) -> String {
    match dim {
        96 => "pico".into(),
        192 => "tiny".into(),
        384 => "small".into(),
        768 => "base".into(),
        1024 => "large".into(),
        1280 => "huge".into(),
        1536 => "giant".into(),
        d => format!("d{d}"),
    }
}

/// A timm-style name for a config: a known name when it is one, `vit_small_patch14_reg4_dinov2` for DINOv2 (as
/// timm names them, without a size), else `vit_<size>_patch<p>[_reg<n>][_gap]_<img>`.
fn arch_name(cfg: &VitConfig, family: Option<Family>) -> String {
    for a in crate::model::vit::ARCH_NAMES {
        if let Ok(k) = VitConfig::from_arch(a) {
            let same = k.embed_dim == cfg.embed_dim && k.depth == cfg.depth && k.num_heads == cfg.num_heads && k.patch_size == cfg.patch_size && k.img_size == cfg.img_size && k.mlp_ratio == cfg.mlp_ratio;
            if same && cfg.class_token && cfg.reg_tokens == 0 && cfg.init_values.is_none() && family != Some(Family::Dinov2) {
                return a.to_string();
            }
        }
    }
    let reg = if cfg.reg_tokens > 0 { format!("_reg{}", cfg.reg_tokens) } else { String::new() };
    let size = size_name(cfg.embed_dim);
    if family == Some(Family::Dinov2) {
        return format!("vit_{size}_patch{}{reg}_dinov2", cfg.patch_size);
    }
    let gap = if cfg.class_token { "" } else { "_gap" };
    format!("vit_{size}_patch{}{reg}{gap}_{}", cfg.patch_size, cfg.img_size)
}

fn is_square(n: i64) -> Option<i64> {
    let g = (n.max(0) as f64).sqrt().round() as i64;
    (g > 0 && g * g == n).then_some(g)
}

/// A config from the tensor shapes alone: width, depth, patch and channels from the patch embedding, the MLP
/// ratio from `fc1`, the prefix tokens from `cls_token` / `reg_token`, the grid from `pos_embed` (with or
/// without rows for the prefix tokens), layer scale from `ls1.gamma`; heads from timm's size table unless the
/// family fixes them.
pub fn infer_config(shapes: &HashMap<String, Vec<i64>>, num_heads: Option<i64>, family: Option<Family>) -> Option<VitConfig> {
    let proj = shapes.get("patch_embed.proj.weight").filter(|s| s.len() == 4)?;
    let pos = shapes.get("pos_embed").filter(|s| s.len() == 3)?;
    let depth = (0..).take_while(|i| shapes.contains_key(&format!("blocks.{i}.norm1.weight"))).count() as i64;
    let (dim, in_chans, patch) = (proj[0], proj[1], proj[2]);
    let mut cfg = VitConfig::from_arch("vit_base_patch16_224").ok()?;
    cfg.embed_dim = dim;
    cfg.in_chans = in_chans;
    cfg.patch_size = patch;
    cfg.depth = depth;
    cfg.num_heads = num_heads.unwrap_or_else(|| heads_for_dim(dim));
    if let Some(fc1) = shapes.get("blocks.0.mlp.fc1.weight") {
        cfg.mlp_ratio = fc1[0] as f64 / dim as f64;
    }
    cfg.qkv_bias = shapes.contains_key("blocks.0.attn.qkv.bias");
    cfg.class_token = shapes.contains_key("cls_token");
    cfg.reg_tokens = shapes.get("reg_token").map_or(0, |s| s[1]);
    cfg.init_values = shapes.contains_key("blocks.0.ls1.gamma").then_some(1e-5);
    let prefix = cfg.num_prefix_tokens();
    let rows = pos[1];
    let (grid, no_embed_class) = match (is_square(rows - prefix), is_square(rows)) {
        (Some(g), _) => (g, false),
        (None, Some(g)) if prefix > 0 => (g, true),
        _ => return None,
    };
    cfg.no_embed_class = no_embed_class;
    cfg.img_size = grid * patch;
    cfg.arch = arch_name(&cfg, family);
    Some(cfg)
}

/// [`resolve_config`] with the heads a family fixes and the family (for the architecture's name).
pub fn resolve_config_with(ckpt: &Checkpoint, arch: Option<&str>, num_heads: Option<i64>, family: Option<Family>) -> Result<VitConfig> {
    let has = |k: &str| ckpt.tensors.iter().any(|(n, _)| n == k);
    let mut cfg = if let Some(a) = arch {
        let mut c = VitConfig::from_arch(a)?;
        // The token layout is in the tensors, whatever the size is called.
        c.class_token = has("cls_token");
        c.reg_tokens = ckpt.get("reg_token").map_or(0, |t| t.size()[1]);
        c.init_values = has("blocks.0.ls1.gamma").then_some(1e-5);
        c.no_embed_class = c.num_prefix_tokens() > 0 && ckpt.get("pos_embed").is_some_and(|t| t.size()[1] == c.num_patches());
        c
    } else if let Some(cfg) = ckpt.metadata.get("config") {
        let cfg: VitConfig = serde_json::from_str(cfg).map_err(|e| Error::checkpoint(&ckpt.path, format!("metadata `config` is not a ViT config: {e}")))?;
        if let Some(a) = ckpt.metadata.get("arch").filter(|a| **a != cfg.arch) {
            return Err(Error::checkpoint(&ckpt.path, format!("metadata `arch` is `{a}` but its `config` describes `{}`", cfg.arch)));
        }
        cfg
    } else if let Some(a) = ckpt.metadata.get("arch") {
        VitConfig::from_arch(a).map_err(|e| Error::checkpoint(&ckpt.path, format!("metadata `arch`: {e}")))?
    } else {
        infer_config(&ckpt.shapes(), num_heads, family).ok_or_else(|| {
            Error::checkpoint(&ckpt.path, "no `arch` metadata and the tensor shapes match no ViT (patch_embed.proj.weight and pos_embed needed); pass --arch")
        })?
    };
    // An average-pooled classifier (timm `global_pool='avg'`, MAE fine-tuned) has `fc_norm` and no final `norm`.
    if has("fc_norm.weight") && !has("norm.weight") {
        cfg.global_pool = crate::model::vit::GlobalPool::Avg;
    } else if has("norm.weight") {
        cfg.global_pool = crate::model::vit::GlobalPool::Token;
    }
    cfg.validate().map_err(|e| Error::checkpoint(&ckpt.path, e.to_string()))?;
    Ok(cfg)
}

/// Reads an encoder checkpoint of any supported format and family layout: its tensors under timm names, the
/// config they build (position embedding resampled to the asked input size) and where they came from.
pub fn import(path: &Path, opts: &LoadOptions) -> Result<Imported> {
    let sha256 = sha256_file(path)?;
    let raw = load_any(path)?;
    let meta = raw.metadata.clone();
    let converted = families::convert(raw, opts.from)?;
    let conv = converted.conversion;
    let mut ckpt = converted.ckpt;
    // A file written by `convert` has timm names and says in its metadata what it was converted from.
    let recorded = meta.get("family").filter(|_| conv.family == Family::Timm && opts.from.is_none());
    let own = meta.get("format").is_some_and(|f| f == "lmim-bench") && opts.from.is_none();
    let family = recorded.and_then(|f| Family::parse(f).ok()).unwrap_or(conv.family);
    let mut source = match recorded {
        Some(f) => SourceInfo {
            family: f.clone(),
            submodel: meta.get("submodel").cloned().unwrap_or_default(),
            source_sha256: meta.get("source_sha256").cloned().unwrap_or_else(|| sha256.clone()),
            dropped: meta.get("dropped").and_then(|d| serde_json::from_str(d).ok()).unwrap_or_default(),
            eval_feature: meta.get("eval_feature").cloned(),
            chosen_by: meta.get("chosen_by").cloned().unwrap_or_else(|| "detected".into()),
            pos_embed_resampled: meta.get("pos_embed_resampled").cloned(),
        },
        None => SourceInfo {
            family: if own { "lmim-bench".into() } else { conv.family.name().into() },
            submodel: conv.submodel.clone(),
            source_sha256: sha256.clone(),
            dropped: conv.dropped.clone(),
            eval_feature: conv.family.eval_feature().map(String::from),
            chosen_by: conv.chosen_by.clone(),
            pos_embed_resampled: None,
        },
    };
    let arch = opts.arch.as_deref();
    let mut cfg = resolve_config_with(&ckpt, arch, converted.num_heads, Some(family))?;
    if let Some(meta_arch) = ckpt.metadata.get("arch") {
        if arch.is_some_and(|a| a != meta_arch) {
            return Err(Error::checkpoint(path, format!("checkpoint is `{meta_arch}` but --arch says `{}`", arch.unwrap_or_default())));
        }
    }
    // DINOv2's backbones carry a 518-pixel table; its own k-NN and linear evaluations run at 224.
    let fresh = !ckpt.metadata.contains_key("config");
    let target = opts.img_size.or((family == Family::Dinov2 && fresh).then_some(224));
    if let Some(size) = target.filter(|&s| s != cfg.img_size) {
        if size < cfg.patch_size || size % cfg.patch_size != 0 || size > 8192 {
            return Err(Error::option("--img-size", format!("{size} is not a multiple of the patch size {} (at most 8192)", cfg.patch_size)));
        }
        let (g0, g1) = (cfg.grid(), size / cfg.patch_size);
        let pos = ckpt.tensors.iter_mut().find(|(n, _)| n == "pos_embed").ok_or_else(|| Error::checkpoint(path, "no pos_embed to resample"))?;
        if pos.1.size()[1] != cfg.embed_len() {
            return Err(Error::ShapeMismatch { path: path.to_path_buf(), name: "pos_embed".into(), found: pos.1.size(), expected: vec![1, cfg.embed_len(), cfg.embed_dim] });
        }
        pos.1 = crate::model::pos_embed::resample_abs_pos_embed(&pos.1, g0, g1, cfg.pos_prefix());
        let old_suffix = format!("_{}", cfg.img_size);
        cfg.img_size = size;
        if let Some(stem) = cfg.arch.strip_suffix(&old_suffix) {
            cfg.arch = format!("{stem}_{size}");
        }
        source.pos_embed_resampled = Some(format!("{g0}x{g0} -> {g1}x{g1}"));
    }
    cfg.validate().map_err(|e| Error::checkpoint(path, e.to_string()))?;
    Ok(Imported { ckpt, cfg, sha256, source })
}

/// Loads a ViT encoder from any supported checkpoint. Head tensors are ignored unless `num_classes` > 0.
pub fn load_vit(path: &Path, arch: Option<&str>, device: Device, num_classes: i64) -> Result<LoadedVit> {
    load_vit_with(path, &LoadOptions::arch(arch), device, num_classes)
}

/// [`load_vit`] with a forced family layout and input size.
pub fn load_vit_with(path: &Path, opts: &LoadOptions, device: Device, num_classes: i64) -> Result<LoadedVit> {
    let Imported { ckpt, mut cfg, sha256, source } = import(path, opts)?;
    cfg.num_classes = num_classes;
    cfg.validate().map_err(|e| Error::checkpoint(path, e.to_string()))?;
    let vs = nn::VarStore::new(device);
    let model = VisionTransformer::new(&vs.root(), &cfg);
    let mut report = load_into(&vs, &ckpt, &["head.", "fc_norm."])?;
    if num_classes == 0 {
        report.unexpected.retain(|n| !n.starts_with("head.") && !n.starts_with("fc_norm."));
    }
    Ok(LoadedVit { vs, model, report, sha256, source })
}

/// Saves a ViT's variables under timm names with `arch` and `config` metadata.
pub fn save_vit(path: &Path, vs: &nn::VarStore, cfg: &VitConfig, extra: &BTreeMap<String, String>) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut meta = extra.clone();
    meta.insert("format".into(), "lmim-bench".into());
    meta.insert("arch".into(), cfg.arch.clone());
    meta.insert("config".into(), serde_json::to_string(cfg).expect("config serialises"));
    save(path, &tensors, &meta)
}
