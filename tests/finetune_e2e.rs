//! Fine-tuning end to end on the demo data (Fashion-MNIST subset): a random-init pico ViT, and one loaded from an
//! encoder checkpoint with a fresh head, train for a couple of epochs with the full augmentation pipeline.
use std::collections::BTreeMap;

use lmim_bench::checkpoint;
use lmim_bench::model::{VisionTransformer, VitConfig};
use lmim_bench::protocols::finetune::{run_finetune_with, FinetuneConfig, FinetuneOptions};
use tch::{nn, Device};

mod common;
use common::{cpu_options as cpu, small_finetune as small_cfg};

#[test]
fn finetune_demo_data() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::demo_data(dir.path(), 30, 20);

    // Random init, 2 epochs, eval each epoch.
    let cfg = small_cfg(2);
    let mut logged = Vec::new();
    let t0 = std::time::Instant::now();
    let (r, _) = run_finetune_with(None, Some("vit_pico_patch4_32"), &data, &cfg, &cpu(), &FinetuneOptions::default(), |v| {
        eprintln!("{:.1}s {v}", t0.elapsed().as_secs_f64());
        logged.push(v.clone());
        Ok(())
    })
    .unwrap();
    assert_eq!(logged.len(), 2);
    assert_eq!(r.history.len(), 2);
    assert_eq!(r.accum_iter, 2);
    // 300 train images / 32 = 9 micro-batches per epoch (drop_last) -> 4 whole optimiser steps of 2 (the 9th
    // micro-batch is not used, the rule of every training protocol here).
    assert_eq!(r.steps, 8);
    for v in [r.top1, r.top5, r.best_top1] {
        assert!(v.is_finite() && (0.0..=100.0).contains(&v), "accuracy {v}");
    }
    // It learns: 10 balanced classes (chance 10% top-1, 50% top-5) on 200 val images; this run gets 25% / 77%
    // on the CPU, and a model at chance would sit 2-3 points (one standard deviation) from 10%.
    assert!(r.best_top1 >= 15.0 && r.top5 >= 60.0, "no better than chance: top1 {} top5 {}", r.best_top1, r.top5);
    assert!(r.top5 >= r.top1 && r.best_top1 >= r.top1);
    assert!((1..=2).contains(&r.best_epoch));
    assert!(r.history.iter().all(|h| h["loss"].is_finite()));

    // From an encoder checkpoint (no head): the head and fc_norm are created fresh, the encoder loads.
    tch::manual_seed(3);
    let enc_cfg = VitConfig::from_arch("vit_pico_patch4_32").unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let _enc = VisionTransformer::new(&vs.root(), &enc_cfg);
    let ck = dir.path().join("enc.safetensors");
    checkpoint::save_vit(&ck, &vs, &enc_cfg, &BTreeMap::new()).unwrap();
    let cfg = FinetuneConfig { eval_every: 5, ..small_cfg(1) };
    let (r, fm) = run_finetune_with(Some(&ck), None, &data, &cfg, &cpu(), &FinetuneOptions::default(), |_| Ok(())).unwrap();
    let rep = r.load_report.as_ref().unwrap();
    assert!(rep.missing.iter().all(|m| m.starts_with("head.") || m.starts_with("fc_norm.")), "{}", rep.summary());
    // MAE deletes the final norm of an average-pooled classifier: the encoder's norm is left unused.
    assert!(fm.model.norm.is_none() && rep.unexpected.iter().any(|u| u.starts_with("norm.")), "{}", rep.summary());
    assert_eq!(fm.cfg.num_classes, 10);
    assert_eq!(fm.cfg.global_pool, lmim_bench::model::vit::GlobalPool::Avg);
    assert!(fm.model.fc_norm.is_some());
    assert!((0.0..=100.0).contains(&r.top1));
    assert_eq!(r.history.len(), 1);
    assert!(r.history[0].contains_key("val_top1"), "the last epoch is always evaluated");
}
