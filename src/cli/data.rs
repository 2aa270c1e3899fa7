//! `lmim-bench data ...`: the Fashion-MNIST demo set, generated sets, and dataset counts and fingerprints.
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::data::fmnist::{self, PrepareOptions};
use crate::data::synth::{self, SynthOptions};
use crate::data::{Dataset, Loader, LoaderConfig, OpenOptions, Transform};
use crate::error::Error;

#[derive(Debug, Args)]
pub struct DataArgs {
    #[command(subcommand)]
    cmd: DataCmd,
}

#[derive(Debug, Subcommand)]
enum DataCmd {
    /// Convert Debian's Fashion-MNIST (package dataset-fashion-mnist) into an ImageFolder tree of 28x28 JPEGs with
    /// train/ and val/ splits; class folders `0_tshirt_top` .. `9_ankle_boot` so that sorted indices equal the
    /// labels. Does nothing when the output was already made with the same options.
    PrepareDemo(PrepareDemoArgs),
    /// Generate an ImageFolder tree of JPEGs (class-dependent colours, gradients and shapes, plus noise),
    /// deterministic from the seed.
    Synth(SynthArgs),
    /// Generate a DAVIS-2017-layout set of short videos (moving textured shapes over a textured background):
    /// JPEGImages/480p/<seq>/*.jpg, Annotations/480p/<seq>/*.png (indexed, the DAVIS palette, every frame) and
    /// ImageSets/2017/val.txt, deterministic from the seed; for `eval --protocol davis` tests and demos.
    SynthDavis(SynthDavisArgs),
    /// Generate an ADE20K-layout set (ADEChallengeData2016/{images,annotations}/{training,validation}): JPEG images
    /// of textured regions of known classes and L-mode PNG labels (0 = unlabeled band along the top), deterministic
    /// from the seed; for `eval --protocol seg` tests and demos.
    SynthAde20k(SynthAdeArgs),
    /// Print image and class counts and the fingerprint of each split of a dataset.
    Info(InfoArgs),
    /// Decode every image of a split through the loader; unreadable files are reported (warning on stderr) and
    /// counted, or with --strict the first one is an error.
    Check(CheckArgs),
    /// Write a split as WebDataset-style tar shards (`<key>.cls` + `<key>.<ext>` members in the dataset's order,
    /// and classes.txt) into OUT/<split>; `--data OUT` then reads them with the folder's fingerprint, samples and
    /// random draws.
    Pack(PackArgs),
}

#[derive(Debug, Args)]
struct PackArgs {
    /// Dataset root, with the split folder inside (an ImageFolder tree, ImageNet's flat val, or shards).
    #[arg(long)]
    data: PathBuf,
    /// Split to pack.
    #[arg(long, default_value = "train")]
    split: String,
    /// Output root: the shards go to OUT/<split>/shard-NNNNNN.tar, which must not exist yet.
    #[arg(long)]
    out: PathBuf,
    /// Largest shard: 1GB, 500MB, 64MiB, or bytes.
    #[arg(long, default_value = "1GB", value_parser = crate::data::shards::parse_size)]
    shard_size: u64,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    scan: super::ScanArgs,
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// Dataset root, with the split folder inside.
    #[arg(long)]
    data: PathBuf,
    /// Split to check.
    #[arg(long, default_value = "train")]
    split: String,
    /// Stop at the first unreadable file or empty class folder, with exit code 2.
    #[arg(long)]
    strict: bool,
    /// Decoding threads (default: all cores).
    #[arg(long, value_parser = crate::cli::workers)]
    workers: Option<usize>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    scan: super::ScanArgs,
}

#[derive(Debug, Args)]
struct PrepareDemoArgs {
    /// Folder with the four gzipped IDX files (default: $LMIM_FASHION_MNIST, else /usr/share/datasets/fashion-mnist).
    #[arg(long)]
    source: Option<PathBuf>,
    /// Output folder.
    #[arg(long, default_value = "data/fashion-mnist")]
    out: PathBuf,
    /// Train images per class: the first N of each class in the training file.
    #[arg(long, default_value_t = 500)]
    train_per_class: usize,
    /// Val images per class, taken from the test file (default: all 10 000).
    #[arg(long)]
    val_per_class: Option<usize>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// What every generator takes beside its sizes.
#[derive(Debug, Args)]
struct GenArgs {
    /// Seed of the generated content.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// JPEG quality (1-100).
    #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u8).range(1..=100))]
    quality: u8,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// A generator's result: its JSON, or one line saying whether it was written or found up to date.
fn report_generated<R: serde::Serialize>(json: bool, r: &R, reused: bool, line: impl FnOnce(&str) -> String) -> anyhow::Result<()> {
    let text = if json {
        serde_json::to_string_pretty(r)? + "\n"
    } else {
        line(if reused { "up to date" } else { "written" }) + "\n"
    };
    crate::results::write_output("-", &text)?;
    Ok(())
}

#[derive(Debug, Args)]
struct SynthArgs {
    /// Output folder (replaced only when it was made by `data synth` or `data prepare-demo`).
    #[arg(long)]
    out: PathBuf,
    /// Number of classes.
    #[arg(long, default_value_t = 10)]
    classes: usize,
    /// Train images per class.
    #[arg(long, default_value_t = 20)]
    train_per_class: usize,
    /// Val images per class.
    #[arg(long, default_value_t = 10)]
    val_per_class: usize,
    /// Image size: S (square) or WxH, e.g. 500x375 like an ImageNet photo.
    #[arg(long, default_value = "64")]
    size: String,
    #[command(flatten)]
    gen: GenArgs,
}

#[derive(Debug, Args)]
struct InfoArgs {
    /// Dataset root, with train/ and/or val/ inside.
    #[arg(long)]
    data: PathBuf,
    /// Only this split (default: train and val, those present).
    #[arg(long)]
    split: Option<String>,
    /// An empty class folder is an error instead of a warning.
    #[arg(long)]
    strict: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    scan: super::ScanArgs,
}

#[derive(Debug, Args)]
struct SynthDavisArgs {
    /// Output folder (replaced only when it was made by a `data` generator).
    #[arg(long)]
    out: PathBuf,
    /// Number of sequences.
    #[arg(long, default_value_t = 3)]
    sequences: usize,
    /// Frames per sequence (at least 3: the first and last are not scored).
    #[arg(long, default_value_t = 8)]
    frames: usize,
    /// Objects per sequence: sequence i has 1 + i % N.
    #[arg(long, default_value_t = 3)]
    max_objects: usize,
    /// Frame size WxH (DAVIS 480p is 854x480).
    #[arg(long, default_value = "160x72")]
    size: String,
    #[command(flatten)]
    gen: GenArgs,
}

#[derive(Debug, Args)]
struct SynthAdeArgs {
    /// Output folder (replaced only when it was made by a `data` generator); the tree is OUT/ADEChallengeData2016.
    #[arg(long)]
    out: PathBuf,
    /// Training images.
    #[arg(long, default_value_t = 40)]
    train: usize,
    /// Validation images.
    #[arg(long, default_value_t = 10)]
    val: usize,
    /// Classes 1..=N (at most 150).
    #[arg(long, default_value_t = 6)]
    classes: u8,
    /// Nominal image size WxH (each image adds 0..8 pixels per side).
    #[arg(long, default_value = "160x120")]
    size: String,
    #[command(flatten)]
    gen: GenArgs,
}

fn parse_size(s: &str) -> Result<(u32, u32), Error> {
    let bad = || Error::option("--size", format!("`{s}` is not S or WxH"));
    let (w, h) = match s.split_once(['x', 'X']) {
        Some((w, h)) => (w.trim().parse().map_err(|_| bad())?, h.trim().parse().map_err(|_| bad())?),
        None => {
            let v = s.trim().parse().map_err(|_| bad())?;
            (v, v)
        }
    };
    if !(8..=8192).contains(&w) || !(8..=8192).contains(&h) {
        return Err(Error::option("--size", format!("{w}x{h} is outside 8..8192")));
    }
    Ok((w, h))
}

pub fn run(args: DataArgs) -> anyhow::Result<()> {
    match args.cmd {
        DataCmd::PrepareDemo(a) => {
            let opts = PrepareOptions {
                source: a.source.unwrap_or_else(fmnist::default_source),
                out: a.out,
                train_per_class: a.train_per_class,
                val_per_class: a.val_per_class,
            };
            let r = fmnist::prepare_demo(&opts)?;
            report_generated(a.json, &r, r.reused, |verb| format!("{}: {verb} (train {} images, val {} images, 10 classes)", r.out.display(), r.train_images, r.val_images))?;
        }
        DataCmd::SynthDavis(a) => {
            let (width, height) = parse_size(&a.size)?;
            let opts = crate::data::davis::SynthDavisOptions {
                out: a.out,
                sequences: a.sequences,
                frames: a.frames,
                max_objects: a.max_objects,
                width,
                height,
                seed: a.gen.seed,
                quality: a.gen.quality,
            };
            let r = crate::data::davis::synth_davis(&opts)?;
            report_generated(a.gen.json, &r, r.reused, |verb| format!("{}: {verb} ({} sequences, {} frames, {width}x{height})", r.out.display(), r.sequences, r.frames))?;
        }
        DataCmd::SynthAde20k(a) => {
            let (width, height) = parse_size(&a.size)?;
            let opts = crate::data::ade20k::SynthAdeOptions { out: a.out, train: a.train, val: a.val, classes: a.classes, width, height, seed: a.gen.seed, quality: a.gen.quality };
            let r = crate::data::ade20k::synth_ade20k(&opts)?;
            report_generated(a.gen.json, &r, r.reused, |verb| format!("{}: {verb} (training {} images, validation {}, {} classes, {width}x{height})", r.out.display(), r.train_images, r.val_images, r.classes))?;
        }
        DataCmd::Synth(a) => {
            let (width, height) = parse_size(&a.size)?;
            let opts = SynthOptions {
                out: a.out,
                classes: a.classes,
                train_per_class: a.train_per_class,
                val_per_class: a.val_per_class,
                width,
                height,
                seed: a.gen.seed,
                quality: a.gen.quality,
            };
            let r = synth::synth(&opts)?;
            report_generated(a.gen.json, &r, r.reused, |verb| format!("{}: {verb} (train {} images, val {} images, {} classes, {width}x{height})", r.out.display(), r.train_images, r.val_images, opts.classes))?;
        }
        DataCmd::Info(a) => info(a)?,
        DataCmd::Check(a) => check(a)?,
        DataCmd::Pack(a) => pack(a)?,
    }
    Ok(())
}

fn info(a: InfoArgs) -> anyhow::Result<()> {
    let opts = OpenOptions { strict: a.strict, rescan: a.scan.rescan, content_key: a.scan.content_key, ..Default::default() };
    let splits: Vec<String> = match &a.split {
        Some(s) => vec![s.clone()],
        None => {
            // Surfaces an unreadable or missing root as the dataset error (exit 2).
            let mut found = Vec::new();
            for s in ["train", "val"] {
                let p = a.data.join(s);
                match std::fs::symlink_metadata(&p) {
                    Err(_) => {}
                    // The same answer as `data check` and the commands that open the split.
                    Ok(_) if !p.is_dir() => {
                        Dataset::open_with(&a.data, s, &opts)?;
                    }
                    Ok(_) => found.push(s.to_string()),
                }
            }
            if found.is_empty() {
                return Err(match Dataset::open_with(&a.data, "train", &opts) {
                    Err(e) => e.into(),
                    Ok(_) => Error::data(&a.data, "no train/ or val/ split").into(),
                });
            }
            found
        }
    };
    let mut out = serde_json::Map::new();
    let mut text = String::new();
    for split in &splits {
        let t0 = std::time::Instant::now();
        let ds = Dataset::open_with(&a.data, split, &opts)?;
        let open_seconds = t0.elapsed().as_secs_f64();
        let fp = ds.fingerprint()?;
        let counts = ds.class_counts();
        let (min, max) = (counts.iter().min().copied().unwrap_or(0), counts.iter().max().copied().unwrap_or(0));
        text += &format!(
            "  {split}: {} images, {} classes ({} to {} per class{}), layout {} ({})\n    fingerprint: files {} classes {}\n    cache key: {}\n",
            fp.num_files,
            fp.num_classes,
            min,
            max,
            if ds.empty_classes.is_empty() { String::new() } else { format!(", {} empty", ds.empty_classes.len()) },
            ds.layout,
            ds.index.describe(),
            fp.files_hash,
            fp.classes_hash,
            ds.cache_key(),
        );
        out.insert(
            split.clone(),
            serde_json::json!({
                "fingerprint": fp,
                "cache_key": ds.cache_key(),
                "layout": ds.layout,
                "index": ds.index,
                "open_seconds": open_seconds,
                "classes": ds.classes,
                "class_counts": counts,
                "empty_classes": ds.empty_classes,
            }),
        );
    }
    if a.json {
        let v = serde_json::json!({ "root": a.data, "splits": out });
        crate::results::write_output("-", &(serde_json::to_string_pretty(&v)? + "\n"))?;
    } else {
        crate::results::write_output("-", &format!("{}\n{text}", a.data.display()))?;
    }
    Ok(())
}

fn check(a: CheckArgs) -> anyhow::Result<()> {
    let ds = Dataset::open_with(&a.data, &a.split, &OpenOptions { strict: a.strict, rescan: a.scan.rescan, content_key: a.scan.content_key, ..Default::default() })?;
    let n = ds.len();
    let mut cfg =
        LoaderConfig { batch_size: 64, shuffle: false, strict: a.strict, ..Default::default() };
    if let Some(w) = a.workers {
        cfg.workers = w.max(1);
    }
    // A small output keeps the check about decoding.
    let loader = Loader::new(ds, Transform::eval(32, 32), cfg)?;
    let mut ok = 0;
    for b in loader.epoch(0) {
        ok += b?.indices.len();
    }
    let skipped = loader.skipped();
    if a.json {
        crate::results::write_output("-", &format!("{}\n", serde_json::json!({ "split": a.split, "images": n, "ok": ok, "skipped": skipped })))?;
    } else {
        crate::results::write_output("-", &format!("{}: {n} images, {ok} ok, {skipped} skipped\n", a.data.join(&a.split).display()))?;
    }
    Ok(())
}

fn pack(a: PackArgs) -> anyhow::Result<()> {
    // Before the source is opened: a second pack of this split into this folder is refused at once.
    let lock = crate::data::shards::pack_lock(&a.out, &a.split)?;
    let ds = Dataset::open_with(&a.data, &a.split, &OpenOptions { rescan: a.scan.rescan, content_key: a.scan.content_key, ..Default::default() })?;
    let r = crate::data::shards::pack_locked(&ds, &a.out, a.shard_size, &lock)
        .with_context(|| format!("packing {} into {}", ds.dir.display(), a.out.display()))?;
    let text = if a.json {
        serde_json::to_string_pretty(&r)? + "\n"
    } else {
        format!(
            "{}: {} shards, {} images, {:.1} MB; fingerprint files {} (equal to the folder's)\n",
            r.dir.display(),
            r.shards,
            r.samples,
            r.bytes as f64 / 1e6,
            r.fingerprint.files_hash
        )
    };
    crate::results::write_output("-", &text)?;
    Ok(())
}
