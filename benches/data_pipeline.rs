//! Decode + RandomResizedCrop(224) + flip + normalise, images/s on one thread and on all cores, on generated
//! ImageNet-sized JPEGs (500x375) and on larger ones (1600x1200, where DCT-scaled decoding applies), then
//! torchvision + PIL on the same files (tests/py/bench_data_pipeline.py, with $LMIM_PYTHON) for comparison. With
//! the `turbojpeg` feature, one run measures zune-jpeg, libjpeg-turbo at full size and libjpeg-turbo with DCT
//! scaling side by side. Results: benchmarks/data_pipeline.md.
//!
//!     source scripts/env.sh && cargo bench --bench data_pipeline [--no-default-features]
use std::path::{Path, PathBuf};
use std::process::Command;

use criterion::{criterion_group, BenchmarkGroup, Criterion, Throughput};
use lmim_bench::data::synth::{synth, SynthOptions};
use lmim_bench::data::{decode_image, sample_rng, Dataset, Loader, LoaderConfig, Transform};
use rayon::prelude::*;

/// (width, height, images): ImageNet's typical photo, and a larger one.
const SETS: [(u32, u32, usize); 2] = [(500, 375, 64), (1600, 1200, 16)];

fn images_dir(w: u32, h: u32, n: usize) -> PathBuf {
    let name = if (w, h) == (500, 375) { "lmim-bench-data-pipeline".to_string() } else { format!("lmim-bench-data-pipeline-{w}x{h}") };
    let root = std::env::temp_dir().join(name);
    synth(&SynthOptions { out: root.clone(), classes: 8, train_per_class: n / 8, val_per_class: 0, width: w, height: h, seed: 0, quality: 90 })
        .expect("generate the benchmark JPEGs");
    root
}

fn files(root: &Path) -> Vec<PathBuf> {
    Dataset::open(root, "train").unwrap().samples.into_iter().map(|s| s.0).collect()
}

/// The JPEG decoders of this build.
#[derive(Clone, Copy)]
enum Decoder {
    /// What `decode_image` uses in this build (libjpeg-turbo with the `turbojpeg` feature, else zune-jpeg).
    Default,
    #[cfg(feature = "turbojpeg")]
    Zune,
    /// libjpeg-turbo at 1/2, 1/4 or 1/8 when the crop allows it (`Transform::apply_encoded`).
    #[cfg(feature = "turbojpeg")]
    TurboDct,
}

fn decoders() -> Vec<(&'static str, Decoder)> {
    #[cfg(feature = "turbojpeg")]
    return vec![("zune-jpeg", Decoder::Zune), ("turbojpeg_full", Decoder::Default), ("turbojpeg_dct", Decoder::TurboDct)];
    #[cfg(not(feature = "turbojpeg"))]
    vec![("zune-jpeg", Decoder::Default)]
}

/// Read + decode, as the loader does. TurboDct decodes at the scale that the sample's crop would choose (the
/// transform and sample index are only needed for that).
#[cfg_attr(not(feature = "turbojpeg"), allow(unused_variables))]
fn decode_only(d: Decoder, t: &Transform, path: &Path, i: usize) {
    let bytes = std::fs::read(path).unwrap();
    let img = match d {
        Decoder::Default => decode_image(&bytes),
        #[cfg(feature = "turbojpeg")]
        Decoder::Zune => lmim_bench::data::decode::decode_jpeg_zune(&bytes),
        #[cfg(feature = "turbojpeg")]
        Decoder::TurboDct => {
            use lmim_bench::data::decode::{dct_scale_for_crop, decode_jpeg_turbo_scaled, jpeg_dimensions_for_scaling};
            use lmim_bench::data::transforms::random_resized_crop_params;
            let (w, h) = jpeg_dimensions_for_scaling(&bytes).unwrap().unwrap();
            let lmim_bench::data::Op::RandomResizedCrop { size, scale, ratio, .. } = t.ops[0] else { unreachable!() };
            let b = random_resized_crop_params(w, h, scale, ratio, &mut sample_rng(0, 0, i));
            decode_jpeg_turbo_scaled(&bytes, dct_scale_for_crop(b.width, b.height, size.1, size.0))
        }
    };
    std::hint::black_box(img.unwrap());
}

fn one(d: Decoder, t: &Transform, path: &Path, i: usize, out: &mut [f32]) {
    let bytes = std::fs::read(path).unwrap();
    let mut rng = sample_rng(0, 0, i);
    match d {
        Decoder::Default => t.apply(decode_image(&bytes).unwrap(), &mut rng, out).unwrap(),
        #[cfg(feature = "turbojpeg")]
        Decoder::Zune => t.apply(lmim_bench::data::decode::decode_jpeg_zune(&bytes).unwrap(), &mut rng, out).unwrap(),
        #[cfg(feature = "turbojpeg")]
        Decoder::TurboDct => t.apply_encoded(&bytes, true, &mut rng, out).unwrap(),
    }
}

fn per_decoder(g: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>, files: &[PathBuf], t: &Transform) {
    for (name, d) in decoders() {
        g.bench_function(format!("{name}/decode_only_1_thread"), |b| {
            b.iter(|| {
                for (i, f) in files.iter().enumerate() {
                    decode_only(d, t, f, i);
                }
            })
        });
        g.bench_function(format!("{name}/decode_rrc224_flip_normalize_1_thread"), |b| {
            let mut out = vec![0f32; 3 * 224 * 224];
            b.iter(|| {
                for (i, f) in files.iter().enumerate() {
                    one(d, t, f, i, &mut out);
                }
            })
        });
    }
}

fn bench(c: &mut Criterion) {
    let t = Transform::train(224, 0.08);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for (w, h, n) in SETS {
        let root = images_dir(w, h, n);
        let files = files(&root);
        let mut g = c.benchmark_group(format!("{w}x{h}"));
        g.throughput(Throughput::Elements(files.len() as u64)).sample_size(10);
        per_decoder(&mut g, &files, &t);
        if (w, h) == (500, 375) {
            // The build's default decoder on all cores.
            let pool = rayon::ThreadPoolBuilder::new().num_threads(cores).build().unwrap();
            g.bench_function(format!("default/decode_rrc224_flip_normalize_{cores}_threads"), |b| {
                b.iter(|| {
                    pool.install(|| {
                        files
                            .par_iter()
                            .enumerate()
                            .for_each_init(|| vec![0f32; 3 * 224 * 224], |out, (i, f)| one(Decoder::Default, &t, f, i, out))
                    })
                })
            });
        }
        g.finish();
    }

    // The loader end to end: batches of 32 as tensors, all cores, the build's default decoder.
    let root = images_dir(SETS[0].0, SETS[0].1, SETS[0].2);
    let mut g = c.benchmark_group("loader_train224_batch32");
    let ds = Dataset::open(&root, "train").unwrap();
    g.throughput(Throughput::Elements(ds.len() as u64)).sample_size(10);
    let cfg = LoaderConfig { batch_size: 32, workers: cores, ..Default::default() };
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
    for (w, h, n) in SETS {
        let root = images_dir(w, h, n);
        print!("{w}x{h}: ");
        match Command::new(&py).arg(&script).arg(root.join("train")).output() {
            Ok(o) if o.status.success() => print!("{}", String::from_utf8_lossy(&o.stdout)),
            Ok(o) => eprintln!("PIL reference failed:\n{}", String::from_utf8_lossy(&o.stderr)),
            Err(e) => eprintln!("cannot run {py}: {e}"),
        }
    }
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    python_reference();
}
