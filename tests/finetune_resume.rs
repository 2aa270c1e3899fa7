//! Fine-tuning checkpoints: resume is exact at epoch boundaries (with model EMA), a changed recipe refuses to
//! resume, and the export loads as a timm-named classifier. Its own test binary, because torch's global RNG
//! (drop path) must not be shared with another test running in parallel.
use lmim_bench::checkpoint;
use lmim_bench::protocols::finetune::{run_finetune_with, FinetuneConfig, FinetuneOptions};
use tch::Device;

mod common;
use common::{cpu_options as cpu, small_finetune as small_cfg};

/// A run stopped after one epoch and resumed gives the same history and weights as an uninterrupted one (with
/// model EMA on), and the export is a timm-named classifier that loads with `load_vit`.
#[test]
fn finetune_resume_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::demo_data(dir.path(), 12, 4);
    let cfg = FinetuneConfig { model_ema: true, model_ema_decay: 0.9, ..small_cfg(2) };
    let full = FinetuneOptions { output_dir: Some(dir.path().join("full")), ..Default::default() };
    let (a, fa) = run_finetune_with(None, Some("vit_pico_patch4_32"), &data, &cfg, &cpu(), &full, |_| Ok(())).unwrap();
    let part = FinetuneOptions { output_dir: Some(dir.path().join("part")), resume: true, stop_after_epochs: Some(1) };
    let (p1, _) = run_finetune_with(None, Some("vit_pico_patch4_32"), &data, &cfg, &cpu(), &part, |_| Ok(())).unwrap();
    assert_eq!(p1.history.len(), 1);
    assert!(p1.exported.is_none());
    let rest = FinetuneOptions { stop_after_epochs: None, ..part };
    let (b, fb) = run_finetune_with(None, Some("vit_pico_patch4_32"), &data, &cfg, &cpu(), &rest, |_| Ok(())).unwrap();
    assert_eq!(b.resumed_from_epoch, Some(1));
    assert_eq!(a.history, b.history);
    assert_eq!((a.steps, a.top1, a.ema_top1), (b.steps, b.top1, b.ema_top1));
    assert!(a.ema_top1.is_some() && a.history[1].contains_key("ema_val_top1"));
    let vb = fb.vs.variables();
    for (n, t) in fa.vs.variables() {
        assert!(t.equal(&vb[&n]), "{n} differs after resume");
    }
    // A different recipe refuses to resume from that checkpoint.
    let other = FinetuneConfig { blr: 2e-3, ..cfg.clone() };
    assert!(run_finetune_with(None, Some("vit_pico_patch4_32"), &data, &other, &cpu(), &rest, |_| Ok(())).is_err());
    // The export loads as a 10-class classifier.
    let exp = a.exported.unwrap();
    let l = checkpoint::load_vit(&exp, None, Device::Cpu, 10).unwrap();
    assert!(l.report.missing.is_empty() && l.report.unexpected.is_empty(), "{}", l.report.summary());
}
