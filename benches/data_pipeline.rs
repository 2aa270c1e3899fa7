//! Decode + RandomResizedCrop(224) + flip + normalise, images/s on one thread and on all cores, on generated
//! ImageNet-sized JPEGs (500x375), then torchvision + PIL on the same files (tests/py/bench_data_pipeline.py, with
//! $LMIM_PYTHON) for comparison. Results: benchmarks/data_pipeline.md.
//!
//!     source scripts/env.sh && cargo bench --bench data_pipeline
use std::path::{Path, PathBuf};
use std::process::Command;

use criterion::{criterion_group, Criterion, Throughput};
use lmim_bench::data::synth::{synth, SynthOptions};
use lmim_bench::data::{load_rgb, sample_rng, Dataset, Loader, LoaderConfig, Transform};
use rayon::prelude::*;

const N_IMAGES: usize = 64;

fn images_dir() -> PathBuf {
    let root = std::env::temp_dir().join("lmim-bench-data-pipeline");
    synth(&SynthOptions {
        out: root.clone(),
        classes: 8,
        train_per_class: N_IMAGES / 8,
        val_per_class: 0,
        width: 500,
        height: 375,
        seed: 0,
        quality: 90,
    })
    .expect("generate the benchmark JPEGs");
    root
}

fn files(root: &Path) -> Vec<PathBuf> {
    Dataset::open(root, "train").unwrap().samples.into_iter().map(|s| s.0).collect()
}

fn one(t: &Transform, path: &Path, i: usize, out: &mut [f32]) {
    let img = load_rgb(path).unwrap();
    t.apply(img, &mut sample_rng(0, 0, i), out).unwrap();
}

fn bench(c: &mut Criterion) {
    let root = images_dir();
    let files = files(&root);
    let t = Transform::train(224, 0.08);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());

    let mut g = c.benchmark_group("decode_rrc224_flip_normalize");
    g.throughput(Throughput::Elements(files.len() as u64)).sample_size(10);
    g.bench_function("1_thread", |b| {
        let mut out = vec![0f32; 3 * 224 * 224];
        b.iter(|| {
            for (i, f) in files.iter().enumerate() {
                one(&t, f, i, &mut out);
            }
        })
    });
    let pool = rayon::ThreadPoolBuilder::new().num_threads(cores).build().unwrap();
    g.bench_function(format!("{cores}_threads"), |b| {
        b.iter(|| {
            pool.install(|| {
                files
                    .par_iter()
                    .enumerate()
                    .for_each_init(|| vec![0f32; 3 * 224 * 224], |out, (i, f)| one(&t, f, i, out))
            })
        })
    });
    // Decode alone, to see where the time goes.
    g.bench_function("decode_only_1_thread", |b| {
        b.iter(|| {
            for f in &files {
                std::hint::black_box(load_rgb(f).unwrap());
            }
        })
    });
    g.finish();

    // The loader end to end: batches of 32 as tensors, all cores.
    let mut g = c.benchmark_group("loader_train224_batch32");
    g.throughput(Throughput::Elements(files.len() as u64)).sample_size(10);
    let ds = Dataset::open(&root, "train").unwrap();
    let cfg = LoaderConfig { batch_size: 32, workers: cores, pin_memory: false, ..Default::default() };
    let loader = Loader::new(ds, t.clone(), cfg).unwrap();
    g.bench_function(format!("{cores}_workers"), |b| {
        b.iter(|| {
            for batch in loader.epoch(0) {
                std::hint::black_box(batch.unwrap());
            }
        })
    });
    g.finish();
}

/// torchvision + PIL on the same JPEGs, in this run.
fn python_reference() {
    let py = std::env::var("LMIM_PYTHON")
        .unwrap_or_else(|_| format!("{}/.cache/lmim-bench/venv/bin/python", std::env::var("HOME").unwrap_or_default()));
    if !Path::new(&py).exists() {
        eprintln!("no Python for the PIL reference ($LMIM_PYTHON); run `source scripts/env.sh` first");
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/bench_data_pipeline.py");
    let root = images_dir();
    match Command::new(&py).arg(&script).arg(root.join("train")).output() {
        Ok(o) if o.status.success() => print!("{}", String::from_utf8_lossy(&o.stdout)),
        Ok(o) => eprintln!("PIL reference failed:\n{}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => eprintln!("cannot run {py}: {e}"),
    }
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    python_reference();
}
