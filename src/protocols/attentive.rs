//! Efficient probing (EP), the attentive probe of the standing probing benchmark "Probing Frozen Encoders"
//! (billpsomas/efficient-probing at b8f4fb84e8127d41aaad997d35b98c2f43f33125; the head of probe_heads.py with
//! poolings/ep.py, the recipe of main_linprobe.py): `eval --protocol attentive`, the "EP" column.
//!
//! Q learned queries attend over the frozen encoder's tokens with the tokens themselves as keys (scaled by
//! D^-1/2, one head, no key projection); query q averages the q-th D/Q-wide slice of one value projection, and the
//! Q slices side by side are the pooled vector, which a non-affine BatchNorm and a linear layer classify. The
//! training is the MAE linear probe's (LARS, warmup then cosine per step, drop_last) through the shared step
//! skeleton, with an evaluation after every epoch: the benchmark reports the best epoch.
use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use super::record::{RecordBuilder, SplitPrint};
use super::{EvalRequest, Protocol};
use crate::checkpoint::load_vit_with;
use super::probe::{BnHead, FrozenInput, Probe, ProbeRun, ProbeSchedule};
use crate::data::loader::Loader;
use crate::data::transforms::Transform;
use crate::error::{Error, Result};
use crate::info::device_name;
use crate::model::vit::with_amp;
use crate::model::VisionTransformer;
use crate::results::metrics_log::MetricsLog;
use crate::results::RunRecord;
use crate::train::optim::{Lars, Param};

/// The benchmark's code these numbers follow.
pub const SOURCE: &str = "billpsomas/efficient-probing@b8f4fb84e8127d41aaad997d35b98c2f43f33125:probe_heads.py,poolings/ep.py,main_linprobe.py";

/// Which tokens the head pools (the benchmark's `--cls_features`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EpFeature {
    /// The patch tokens (registers excluded).
    Ep,
    /// The CLS token, then the patch tokens.
    EpAll,
}

/// `protocols/attentive.toml`. Every key can be overridden with `key=value`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AttentiveConfig {
    pub version: String,
    pub feature: EpFeature,
    /// Number of queries Q; the embedding width must be a multiple of it.
    pub queries: i64,
    pub epochs: f64,
    pub warmup_epochs: f64,
    /// Base lr; lr = blr * batch_size / 256.
    pub blr: f64,
    /// Global batch per optimiser step, reached by accumulating `micro_batch_size` batches over the processes.
    pub batch_size: i64,
    pub micro_batch_size: i64,
    pub weight_decay: f64,
    pub momentum: f64,
    pub trust_coefficient: f64,
    pub crop_scale_min: f64,
    pub min_lr: f64,
    pub seed: u64,
    /// Epochs between evaluations (the last epoch is always evaluated); 1 finds the best epoch as the benchmark.
    pub eval_every: usize,
}

impl Default for AttentiveConfig {
    fn default() -> Self {
        AttentiveConfig {
            version: "ep-bench-1".into(),
            feature: EpFeature::Ep,
            queries: 32,
            epochs: 90.0,
            warmup_epochs: 10.0,
            blr: 0.1,
            batch_size: 4096,
            micro_batch_size: 256,
            weight_decay: 0.0,
            momentum: 0.9,
            trust_coefficient: 0.001,
            crop_scale_min: 0.08,
            min_lr: 0.0,
            seed: 0,
            eval_every: 1,
        }
    }
}

/// The linear probe's ranges (the same LARS recipe keys), plus the number of queries.
impl crate::config::Recipe for AttentiveConfig {
    fn rules() -> Vec<crate::config::Rule> {
        // The embedding width must also be a multiple of `queries` (checked against the model).
        let mut rules = vec![crate::config::Rule::int("queries", 1, 4096)];
        rules.extend(<super::linear::LinearConfig as crate::config::Recipe>::rules());
        rules
    }
}

impl AttentiveConfig {
    pub fn validate(&self) -> Result<()> {
        self.accum()?;
        if !(self.epochs > 0.0 && self.epochs.is_finite()) || !(0.0..=self.epochs).contains(&self.warmup_epochs) {
            return Err(Error::option("epochs", "need epochs > 0 and 0 <= warmup_epochs <= epochs"));
        }
        if !(self.blr > 0.0 && self.blr.is_finite()) {
            return Err(Error::option("blr", "must be a positive number"));
        }
        if self.queries < 1 {
            return Err(Error::option("queries", "must be at least 1"));
        }
        if !(self.crop_scale_min > 0.0 && self.crop_scale_min <= 1.0) {
            return Err(Error::option("crop_scale_min", "must be in (0, 1]"));
        }
        Ok(())
    }

    fn accum(&self) -> Result<i64> {
        crate::train::accum_for(self.batch_size, self.micro_batch_size, crate::dist::world().size as i64)
    }

    pub fn lr(&self) -> f64 {
        crate::train::scaled_lr(self.blr, self.batch_size)
    }
}

/// The benchmark's `model.head`: `Sequential(EfficientProbing, BatchNorm1d(D, affine=False, eps=1e-6),
/// Linear(D, C))`, its tensors under the state-dict names of that Sequential.
#[derive(Debug)]
pub struct AttentiveHead {
    pub queries: i64,
    /// `0.cls_token` `[1, Q, D]`: the queries.
    pub cls_token: Tensor,
    /// `0.v.weight` `[D, D]`: the value projection (no bias).
    pub v_weight: Tensor,
    pub running_mean: Tensor,
    pub running_var: Tensor,
    /// Forward passes in training mode (BatchNorm's `num_batches_tracked`).
    pub batches_tracked: std::cell::Cell<i64>,
    /// `2.weight` `[C, D]`, `2.bias` `[C]`.
    pub weight: Tensor,
    pub bias: Tensor,
}

impl AttentiveHead {
    /// A fresh head, initialised as PyTorch's modules of the benchmark are: nn.Linear's default (uniform within
    /// 1/sqrt(fan_in), i.e. kaiming-uniform with a = sqrt(5)) for the value projection and the classifier, and
    /// `randn * 0.02` for the queries, drawn in the order the modules are built.
    pub fn new(p: &nn::Path, dim: i64, classes: i64, queries: i64) -> Result<Self> {
        if queries < 1 || dim % queries != 0 {
            return Err(Error::option("queries", format!("{queries} queries do not divide the embedding width {dim}")));
        }
        let bound = 1.0 / (dim as f64).sqrt();
        let uniform = nn::Init::Uniform { lo: -bound, up: bound };
        let ep = p / "0";
        let v_weight = (&ep / "v").var("weight", &[dim, dim], uniform);
        let cls_token = ep.var("cls_token", &[1, queries, dim], nn::Init::Randn { mean: 0.0, stdev: 0.02 });
        let bn = p / "1";
        let (running_mean, running_var) = (bn.zeros_no_train("running_mean", &[dim]), bn.ones_no_train("running_var", &[dim]));
        let fc = p / "2";
        let weight = fc.var("weight", &[classes, dim], uniform);
        let bias = fc.var("bias", &[classes], uniform);
        Ok(AttentiveHead { queries, cls_token, v_weight, running_mean, running_var, batches_tracked: 0.into(), weight, bias })
    }

    /// EfficientProbing over tokens `[B, N, D]` (f32): `[B, D]`.
    pub fn pool(&self, x: &Tensor) -> Tensor {
        let (b, n, d) = x.size3().expect("tokens are [B, N, D]");
        let q = self.queries;
        let scale = (d as f64).powf(-0.5);
        let attn = (self.cls_token.squeeze_dim(0) * scale).matmul(&x.transpose(1, 2)).softmax(-1, Kind::Float);
        let v = x.matmul(&self.v_weight.tr()).view([b, n, q, d / q]).permute([0, 2, 1, 3]);
        attn.unsqueeze(2).matmul(&v).reshape([b, d])
    }

    /// The trained parameters, LARS's trust ratio applying to the three with more than one dimension.
    pub fn params(&self, weight_decay: f64) -> Vec<Param> {
        [("0.cls_token", &self.cls_token), ("0.v.weight", &self.v_weight), ("2.weight", &self.weight), ("2.bias", &self.bias)]
            .into_iter()
            .map(|(name, t)| Param { name: name.into(), tensor: t.shallow_clone(), weight_decay, lr_scale: 1.0 })
            .collect()
    }
}

impl BnHead for AttentiveHead {
    const WHAT: &'static str = "attentive probe";
    fn forward_eval(&self, tokens: &Tensor) -> Tensor {
        let pooled = self.pool(&tokens.to_kind(Kind::Float));
        let x = Tensor::batch_norm(&pooled, None::<&Tensor>, None::<&Tensor>, Some(&self.running_mean), Some(&self.running_var), false, 0.1, 1e-6, false);
        x.linear(&self.weight, Some(&self.bias))
    }

    fn forward_train(&self, tokens: &Tensor) -> (Tensor, Tensor) {
        let (x, stats) = super::linear::bn_train(&self.pool(&tokens.to_kind(Kind::Float)));
        (x.linear(&self.weight, Some(&self.bias)), stats)
    }

    fn update_running(&self, stats: &[Tensor]) {
        super::linear::bn_running_update(&self.running_mean, &self.running_var, stats);
        self.batches_tracked.set(self.batches_tracked.get() + stats.len() as i64);
    }

    /// The benchmark's `model.head.state_dict()`: names, shapes and dtypes (a 0-d int64 `num_batches_tracked`), on
    /// the CPU, copied.
    fn state_dict(&self) -> Vec<(String, Tensor)> {
        let tracked = Tensor::scalar_tensor(self.batches_tracked.get() as f64, (Kind::Int64, Device::Cpu));
        [
            ("0.cls_token", &self.cls_token),
            ("0.v.weight", &self.v_weight),
            ("1.running_mean", &self.running_mean),
            ("1.running_var", &self.running_var),
            ("1.num_batches_tracked", &tracked),
            ("2.weight", &self.weight),
            ("2.bias", &self.bias),
        ]
        .into_iter()
        .map(|(n, t)| (n.to_string(), t.detach().to_device(Device::Cpu).copy()))
        .collect()
    }
}

/// Writes a head's state dict as safetensors that `model.head.load_state_dict(load_file(path), strict=True)`
/// takes.
pub fn save_head(path: &Path, state: &[(String, Tensor)], meta: &serde_json::Value) -> Result<()> {
    let mut m = BTreeMap::from([("format".to_string(), "efficient-probing model.head state_dict".to_string()), ("source".to_string(), SOURCE.to_string())]);
    if let Some(o) = meta.as_object() {
        m.extend(o.iter().map(|(k, v)| (k.clone(), v.as_str().map_or_else(|| v.to_string(), String::from))));
    }
    crate::checkpoint::save(path, state, &m)
}

/// The frozen encoder and which of its tokens the head reads.
pub struct TokenReader<'a> {
    pub model: &'a VisionTransformer,
    pub feature: EpFeature,
    /// The final norm is applied (DINOv2's tokens, as the benchmark reads them through the hub model's
    /// `get_intermediate_layers(norm=True)`); otherwise the last block's output, as models_vit.py.
    pub final_norm: bool,
}

impl FrozenInput for TokenReader<'_> {
    /// Tokens `[B, N, D]` of the last block (no grad, f32).
    fn read(&self, images: &Tensor, amp: Option<Kind>) -> Tensor {
        let last = self.model.cfg.depth - 1;
        tch::no_grad(|| {
            with_amp(amp, || {
                let out = self.model.forward_features(images, &[last], false);
                let x = &out.intermediates[0];
                let x = if self.final_norm { self.model.final_norm(x) } else { x.to_kind(Kind::Float) };
                let (n, prefix) = (x.size()[1], out.prefix);
                let patches = x.narrow(1, prefix, n - prefix);
                match self.feature {
                    EpFeature::Ep => patches,
                    EpFeature::EpAll => Tensor::cat(&[x.narrow(1, 0, 1), patches], 1),
                }
            })
        })
        .to_kind(Kind::Float)
    }
}

/// Trains `head` on the frozen encoder with the benchmark's recipe ([`super::probe::fit`], an evaluation every
/// `eval_every` epochs). `log` receives one JSON object per epoch.
#[allow(clippy::too_many_arguments)]
pub fn train_head(
    reader: &TokenReader,
    head: &AttentiveHead,
    train: &Loader,
    val: &Loader,
    cfg: &AttentiveConfig,
    device: Device,
    amp: Option<Kind>,
    log: impl FnMut(&serde_json::Value) -> Result<()>,
) -> Result<ProbeRun> {
    cfg.validate()?;
    let sched = ProbeSchedule {
        lr: cfg.lr(),
        min_lr: cfg.min_lr,
        warmup_epochs: cfg.warmup_epochs,
        epochs: cfg.epochs,
        accum: cfg.accum()? as usize,
        batch_size: cfg.batch_size,
        micro_batch_size: cfg.micro_batch_size,
        eval_every: cfg.eval_every,
    };
    let opt = Lars::new(head.params(cfg.weight_decay), cfg.momentum, cfg.trust_coefficient);
    super::probe::fit(&Probe { input: reader, head }, opt, &sched, train, val, device, amp, log)
}

/// `eval --protocol attentive`.
pub fn run(req: &EvalRequest) -> Result<RunRecord> {
    let loaded = Protocol::Attentive.load::<AttentiveConfig>(req.protocol_file.as_deref(), &req.sets)?;
    let cfg = &loaded.cfg;
    cfg.validate()?;
    let device = req.run.device()?;
    let amp = req.run.precision.unwrap_or_default().autocast(device);
    let ckpt = req.checkpoint()?;
    let enc = load_vit_with(ckpt, &req.load_options(), device, 0)?;
    if !enc.model.cfg.class_token && cfg.feature == EpFeature::EpAll {
        return Err(Error::option("feature", format!("`ep_all`: {} has no CLS token; use feature=\"ep\"", ckpt.display())));
    }
    let (train_ds, val_ds) = super::open_splits(req.data()?, &req.run)?;
    let prints = [SplitPrint::of_dataset("train", &train_ds)?, SplitPrint::of_dataset("val", &val_ds)?];
    let classes = train_ds.classes.len() as i64;
    let size = enc.model.cfg.img_size as u32;
    let micro = cfg.micro_batch_size as usize;
    let train = super::train_loader(train_ds, Transform::linprobe_train(size, cfg.crop_scale_min), micro, cfg.seed, &req.run)?;
    let val = super::eval_loader(val_ds, super::extract::eval_transform(size as i64, 0.875)?, micro, &req.run, true)?;

    tch::manual_seed(cfg.seed as i64);
    let vs = nn::VarStore::new(device);
    let head = AttentiveHead::new(&vs.root(), enc.model.cfg.embed_dim, classes, cfg.queries)?;
    let final_norm = enc.source.family == "dinov2";
    let reader = TokenReader { model: &enc.model, feature: cfg.feature, final_norm };

    let name = req.model_name("model");
    let overrides = loaded.overrides(&[]);
    let b = RecordBuilder::new(Protocol::Attentive, &cfg.version, &overrides);
    let feature = serde_json::to_value(cfg.feature).expect("feature serialises");
    let feature = feature.as_str().unwrap_or("ep");
    // A folder per (model, feature, queries, source checkpoint): TensorBoard shows one run per folder.
    let run_dir = req.output.join(format!("{}-attentive-{feature}-q{}-{}", crate::results::sanitize(&name), cfg.queries, &enc.sha256[..12]));
    let main = crate::dist::world().is_main();
    let mut log = if main { Some(MetricsLog::open(&run_dir, "metrics.jsonl", req.run.tensorboard)?) } else { None };
    let quiet = req.run.quiet;
    let res = train_head(&reader, &head, &train, &val, cfg, device, amp, |v| {
        if !quiet {
            eprintln!("attentive {v}");
        }
        log.as_mut().map_or(Ok(()), |l| l.log(v))
    })?;
    let (last_path, best_path) = (run_dir.join("attentive_head.safetensors"), run_dir.join("attentive_head_best.safetensors"));
    if main {
        let meta = |epoch: usize, top1: f64| serde_json::json!({ "feature": feature, "queries": cfg.queries, "epoch": epoch, "top1": top1, "checkpoint_sha256": enc.sha256 });
        save_head(&last_path, &head.state_dict(), &meta(res.history.len(), res.top1))?;
        save_head(&best_path, &res.best_state, &meta(res.best_epoch, res.best_top1))?;
    }
    let extra = serde_json::json!({
        "lr": cfg.lr(),
        "accum_iter": cfg.accum()?,
        "precision": req.run.precision.unwrap_or_default().effective(device),
        "tokens": if final_norm { "last block, after the final norm (DINOv2, as the benchmark's hub wrapper)" } else { "last block, before the final norm (as the benchmark's models_vit.py)" },
        "source": SOURCE,
    });
    b.model(name, Some(ckpt), Some(enc.sha256.clone()), Some(enc.model.cfg.arch.clone()))
        .source(serde_json::to_value(&enc.source).ok())
        .data(Some(req.data()?.display().to_string()), &prints)
        .config(&loaded.origin, cfg, &overrides, &req.run, extra)
        .seed(cfg.seed)
        .metric("top1", res.best_top1)
        .metric("top5", res.best_top5)
        .metric("last_top1", res.top1)
        .metric("last_top5", res.top5)
        .finish(
            serde_json::json!({
                "reported": "top1/top5 are the best epoch's, as the probing benchmark reports EP (its README: 'Report the best-epoch accuracy'); last_top1/last_top5 are the last epoch's",
                "history": res.history, "best_epoch": res.best_epoch, "steps": res.steps, "steps_per_epoch": res.steps_per_epoch,
                "skipped_files": train.skipped() + val.skipped(), "skipped_eval": val.skipped_files(), "run_dir": run_dir, "head": last_path, "best_head": best_path,
            }),
            &device_name(device),
            &req.output,
        )
}
