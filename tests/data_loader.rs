//! Dataset order and labels against torchvision's ImageFolder, and the loader's determinism, resume and sharding.
mod common;

use std::path::Path;

use lmim_bench::data::synth::{synth, SynthOptions};
use lmim_bench::data::{Batch, Dataset, Loader, LoaderConfig, Transform};

fn make_synth(dir: &Path, classes: usize, train: usize) -> std::path::PathBuf {
    let out = dir.join("synth");
    synth(&SynthOptions {
        out: out.clone(),
        classes,
        train_per_class: train,
        val_per_class: 2,
        width: 40,
        height: 30,
        seed: 3,
        quality: 90,
    })
    .unwrap();
    out
}

fn loader(root: &Path, cfg: LoaderConfig) -> Loader {
    Loader::new(Dataset::open(root, "train").unwrap(), Transform::train(16, 0.2), cfg).unwrap()
}

fn cfg(workers: usize) -> LoaderConfig {
    LoaderConfig { batch_size: 8, seed: 11, workers, ..Default::default() }
}

fn collect(it: impl Iterator<Item = lmim_bench::Result<Batch>>) -> Vec<Batch> {
    it.map(|b| b.unwrap()).collect()
}

fn same(a: &[Batch], b: &[Batch]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.batch, y.batch);
        assert_eq!(x.indices, y.indices);
        assert!(x.images.equal(&y.images), "batch {} images differ", x.batch);
        assert!(x.labels.equal(&y.labels));
    }
}

#[test]
fn order_and_labels_match_torchvision_imagefolder() {
    let dir = tempfile::tempdir().unwrap();
    let root = make_synth(dir.path(), 4, 3);
    // Extra structure ImageFolder handles: a nested folder, a PNG, upper-case extensions, a non-image file.
    let a = root.join("train/class_001");
    std::fs::create_dir_all(a.join("sub")).unwrap();
    std::fs::copy(a.join("000000.jpg"), a.join("sub/x.JPEG")).unwrap();
    std::fs::copy(a.join("000001.jpg"), a.join("B.jpeg")).unwrap();
    image::RgbImage::from_pixel(9, 7, image::Rgb([1, 2, 3])).save(a.join("p.png")).unwrap();
    std::fs::write(a.join("readme.txt"), "not an image").unwrap();
    let ds = Dataset::open(&root, "train").unwrap();
    let json = dir.path().join("ref.json");
    common::run_py("imagefolder_data.py", &[root.join("train").to_str().unwrap(), json.to_str().unwrap()]);
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let classes: Vec<String> = serde_json::from_value(r["classes"].clone()).unwrap();
    let samples: Vec<(String, i64)> = serde_json::from_value(r["samples"].clone()).unwrap();
    assert_eq!(ds.classes, classes);
    let ours: Vec<(String, i64)> = ds
        .samples
        .iter()
        .map(|(p, l)| (p.strip_prefix(root.join("train")).unwrap().to_string_lossy().into_owned(), *l))
        .collect();
    assert_eq!(ours, samples);

    // The fingerprint is stable and sees a changed file size.
    let f1 = ds.fingerprint().unwrap();
    assert_eq!(f1, Dataset::open(&root, "train").unwrap().fingerprint().unwrap());
    assert_eq!((f1.num_files, f1.num_classes), (15, 4));
    std::fs::write(a.join("B.jpeg"), std::fs::read(a.join("000002.jpg")).unwrap()).unwrap();
    // Rewritten in place, the file leaves its folder's time as it was, so an index cached by the opens above
    // (the tree is old enough once torchvision has run) would still be read: the rescan walks.
    let rescan = lmim_bench::data::OpenOptions { rescan: true, ..Default::default() };
    let f2 = Dataset::open_with(&root, "train", &rescan).unwrap().fingerprint().unwrap();
    assert_eq!(f1.classes_hash, f2.classes_hash);
    assert_ne!(f1.files_hash, f2.files_hash);
}

#[test]
fn same_batches_for_any_worker_count_and_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let root = make_synth(dir.path(), 5, 7); // 35 images: 4 full batches and one of 3
    let one = collect(loader(&root, cfg(1)).epoch(2));
    let three = collect(loader(&root, LoaderConfig { prefetch: 1, ..cfg(3) }).epoch(2));
    let eight = collect(loader(&root, LoaderConfig { prefetch: 4, ..cfg(8) }).epoch(2));
    assert_eq!(one.len(), 5);
    assert_eq!(one.last().unwrap().indices.len(), 3);
    assert_eq!(one[0].images.size(), vec![8, 3, 16, 16]);
    assert_eq!(one[0].labels.size(), vec![8]);
    same(&one, &three);
    same(&one, &eight);

    // Every sample once per epoch, with its folder's label.
    let ds = Dataset::open(&root, "train").unwrap();
    let mut seen: Vec<usize> = one.iter().flat_map(|b| b.indices.clone()).collect();
    for b in &one {
        let labels: Vec<i64> = Vec::try_from(&b.labels).unwrap();
        for (&i, &l) in b.indices.iter().zip(&labels) {
            let folder = ds.samples[i].0.parent().unwrap().file_name().unwrap().to_str().unwrap();
            assert_eq!(ds.classes[l as usize], folder);
        }
    }
    seen.sort();
    assert_eq!(seen, (0..35).collect::<Vec<_>>());

    // Another epoch: another order and other crops; another seed: another order.
    let e3 = collect(loader(&root, cfg(2)).epoch(3));
    assert_ne!(one[0].indices, e3[0].indices);
    let other_seed = collect(loader(&root, LoaderConfig { seed: 12, ..cfg(2) }).epoch(2));
    assert_ne!(one[0].indices, other_seed[0].indices);
    // Unshuffled: dataset order.
    let plain = collect(loader(&root, LoaderConfig { shuffle: false, ..cfg(2) }).epoch(0));
    assert_eq!(plain[0].indices, (0..8).collect::<Vec<_>>());
}

#[test]
fn resume_at_batch_k_gives_the_tail_of_the_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let root = make_synth(dir.path(), 5, 7);
    let l = loader(&root, cfg(2));
    let full = collect(l.epoch(4));
    for k in [0, 1, 3, 4, 5] {
        let tail = collect(loader(&root, cfg(2)).iter_from(4, k));
        same(&full[k..], &tail);
    }
    // Stopping early (dropping the iterator) and resuming later matches too.
    let mut it = l.epoch(4);
    let first: Vec<Batch> = (0..2).map(|_| it.next().unwrap().unwrap()).collect();
    drop(it);
    same(&full[..2], &first);
    same(&full[2..], &collect(l.iter_from(4, 2)));
}

#[test]
fn shards_partition_the_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let root = make_synth(dir.path(), 5, 7); // 35 images
    // Evaluation shards (no drop_last): contiguous blocks that concatenate, in rank order, to the whole epoch.
    let whole = loader(&root, cfg(2)).epoch_indices(6);
    for world in [1usize, 2, 3, 5, 8] {
        let mut all = Vec::new();
        for rank in 0..world {
            let l = loader(&root, LoaderConfig { rank, world_size: world, ..cfg(2) });
            let idx = l.epoch_indices(6);
            assert!(idx.len() <= 35usize.div_ceil(world));
            let from_batches: Vec<usize> = collect(l.epoch(6)).iter().flat_map(|b| b.indices.clone()).collect();
            assert_eq!(from_batches, idx);
            assert_eq!(l.num_batches(), idx.len().div_ceil(8));
            all.extend(idx);
        }
        assert_eq!(all, whole, "world {world}: shards in rank order are the epoch order");
    }
    // Training shards (drop_last): global micro-batches of 4 dealt round-robin, so that rank r's batch k is the
    // single-process batch k * world + r.
    let one = loader(&root, LoaderConfig { drop_last: true, batch_size: 4, ..cfg(1) });
    let single: Vec<Vec<usize>> = collect(one.epoch(3)).into_iter().map(|b| b.indices).collect();
    assert_eq!(single.len(), 8);
    for world in [2usize, 3, 4] {
        for rank in 0..world {
            let l = loader(&root, LoaderConfig { drop_last: true, batch_size: 4, rank, world_size: world, ..cfg(1) });
            let mine: Vec<Vec<usize>> = collect(l.epoch(3)).into_iter().map(|b| b.indices).collect();
            assert_eq!(mine.len(), (8 - rank).div_ceil(world), "world {world}");
            assert_eq!((l.num_batches(), l.global_batches()), (mine.len(), 8));
            for (k, b) in mine.iter().enumerate() {
                assert_eq!(b, &single[k * world + rank], "world {world} rank {rank} batch {k}");
            }
        }
    }
    // drop_last: only full batches.
    let l = loader(&root, LoaderConfig { drop_last: true, ..cfg(2) });
    assert_eq!(l.num_batches(), 4);
    assert!(collect(l.epoch(0)).iter().all(|b| b.indices.len() == 8));
    // Invalid shard.
    let ds = Dataset::open(&root, "train").unwrap();
    assert!(Loader::new(ds, Transform::train(16, 0.2), LoaderConfig { rank: 2, world_size: 2, ..cfg(1) }).is_err());
}

#[test]
fn eval_loader_matches_single_sample_path() {
    let dir = tempfile::tempdir().unwrap();
    let root = make_synth(dir.path(), 3, 4);
    let ds = Dataset::open(&root, "val").unwrap();
    let l = Loader::new(ds, Transform::eval(36, 32), LoaderConfig { shuffle: false, batch_size: 4, ..cfg(2) }).unwrap();
    let batches = collect(l.epoch(0));
    assert_eq!(batches.len(), 2);
    let b = &batches[1];
    let one = l.load_sample(b.indices[1], 0).unwrap();
    let t = tch::Tensor::from_slice(&one).view([3, 32, 32]);
    assert!(b.images.get(1).equal(&t));
}

#[test]
fn imagenet_flat_val_maps_ids_to_sorted_wnids() {
    let dir = tempfile::tempdir().unwrap();
    let src = make_synth(dir.path(), 1, 1);
    let jpg = std::fs::read(src.join("train/class_000/000000.jpg")).unwrap();
    let root = dir.path().join("imagenet");
    // The devkit's id order is not the sorted wnid order.
    let wnids = ["n03000000", "n01000000", "n02000000"];
    for w in wnids {
        std::fs::create_dir_all(root.join("train").join(w)).unwrap();
        std::fs::write(root.join("train").join(w).join(format!("{w}_1.JPEG")), &jpg).unwrap();
    }
    std::fs::create_dir_all(root.join("val")).unwrap();
    for i in 1..=4 {
        std::fs::write(root.join(format!("val/ILSVRC2012_val_{i:08}.JPEG")), &jpg).unwrap();
    }
    // Without the id -> wnid map the labels would be guesses: an error.
    std::fs::create_dir_all(root.join("anno")).unwrap();
    std::fs::write(root.join("anno/ILSVRC2012_validation_ground_truth.txt"), "1\n3\n2\n1\n").unwrap();
    let err = Dataset::open(&root, "val").unwrap_err();
    assert!(err.to_string().contains("map_clsloc.txt"), "{err}");
    std::fs::write(root.join("map_clsloc.txt"), "n03000000 1 c\nn01000000 2 a\nn02000000 3 b\n").unwrap();
    let val = Dataset::open(&root, "val").unwrap();
    let train = Dataset::open(&root, "train").unwrap();
    assert_eq!(val.layout, "imagenet_val_flat");
    assert_eq!(val.classes, train.classes);
    assert_eq!(val.classes, vec!["n01000000", "n02000000", "n03000000"]);
    let labels: Vec<i64> = val.samples.iter().map(|s| s.1).collect();
    // ids 1, 3, 2, 1 -> n03, n02, n01, n03 -> sorted indices 2, 1, 0, 2.
    assert_eq!(labels, vec![2, 1, 0, 2]);
    // Kaggle's LOC_val_solution.csv (wnid per image) takes precedence.
    std::fs::write(
        root.join("LOC_val_solution.csv"),
        "ImageId,PredictionString\nILSVRC2012_val_00000001,n01000000 1 2 3 4\nILSVRC2012_val_00000002,n01000000 1 1 1 1\n\
         ILSVRC2012_val_00000003,n02000000 1 1 1 1\nILSVRC2012_val_00000004,n03000000 1 1 1 1\n",
    )
    .unwrap();
    let labels: Vec<i64> = Dataset::open(&root, "val").unwrap().samples.iter().map(|s| s.1).collect();
    assert_eq!(labels, vec![0, 0, 1, 2]);
}

/// DCT-scaled decoding is an explicit opt-in: an error without the `turbojpeg` feature; with it, batches that are
/// still independent of the worker count, and that differ from the reference pipeline's once crops are scaled.
#[test]
fn dct_scaling_is_opt_in_and_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let root = make_synth(dir.path(), 2, 4);
    // Output 8 px: crops of 16 px and more of the 40x30 images decode at 1/2.
    let open = |cfg: LoaderConfig| Loader::new(Dataset::open(&root, "train").unwrap(), Transform::train(8, 0.2), cfg);
    let dct = LoaderConfig { dct_scaling: true, ..cfg(2) };
    if !cfg!(feature = "turbojpeg") {
        let err = open(dct).err().expect("dct_scaling without the turbojpeg feature must be refused").to_string();
        assert!(err.contains("turbojpeg"), "{err}");
        return;
    }
    let a = collect(open(dct.clone()).unwrap().epoch(0));
    let b = collect(open(LoaderConfig { workers: 1, ..dct }).unwrap().epoch(0));
    same(&a, &b);
    let reference = collect(open(cfg(2)).unwrap().epoch(0));
    assert!(a.iter().zip(&reference).any(|(x, y)| !x.images.equal(&y.images)), "no crop was DCT-scaled");
    for (x, y) in a.iter().zip(&reference) {
        assert_eq!(x.indices, y.indices);
        assert_eq!(x.images.size(), y.images.size());
    }
}

/// The fingerprint's files hash computed the way it was before the index: a stat of every file.
fn files_hash_by_stat(ds: &Dataset) -> String {
    use sha2::{Digest, Sha256};
    let mut rel: Vec<(String, u64)> = ds
        .samples
        .iter()
        .map(|(p, _)| (p.strip_prefix(&ds.dir).unwrap().to_str().unwrap().to_string(), std::fs::metadata(p).unwrap().len()))
        .collect();
    rel.sort();
    let mut h = Sha256::new();
    for (r, s) in &rel {
        h.update(format!("{r}\t{s}\n").as_bytes());
    }
    hex::encode(h.finalize())
}

#[test]
fn index_is_reused_on_second_open_and_refreshed_on_add_remove_rename() {
    use lmim_bench::data::index::IndexSource::{Cache, Scan};
    use lmim_bench::data::OpenOptions;
    let dir = tempfile::tempdir().unwrap();
    let root = make_synth(dir.path(), 3, 4);
    let opts = OpenOptions { index_dir: Some(dir.path().join("index")), quiet: true, ..Default::default() };
    let open = || Dataset::open_with(&root, "train", &opts).unwrap();
    let fp = |ds: &Dataset| ds.fingerprint().unwrap();
    // Just written: scanned each time, not kept.
    assert_eq!(open().index, Scan);
    assert_eq!(open().index, Scan);
    common::age_folders(&root);
    let scanned = open();
    assert_eq!(scanned.index, Scan);
    assert_eq!(fp(&scanned).files_hash, files_hash_by_stat(&scanned), "the fingerprint keeps its meaning");
    let cached = open();
    assert_eq!(cached.index, Cache);
    assert_eq!((&cached.samples, &cached.sizes, &cached.classes, fp(&cached)), (&scanned.samples, &scanned.sizes, &scanned.classes, fp(&scanned)));
    // A file rewritten in place changes no folder: the cache still answers (proof that it is what is read), and
    // --rescan sees the new size.
    let first = scanned.samples[0].0.clone();
    let mut bytes = std::fs::read(&first).unwrap();
    bytes.extend_from_slice(&[0; 10]);
    std::fs::write(&first, &bytes).unwrap();
    assert_eq!((open().index, fp(&open())), (Cache, fp(&scanned)));
    let rescanned = Dataset::open_with(&root, "train", &OpenOptions { rescan: true, ..opts.clone() }).unwrap();
    assert_eq!(rescanned.index, Scan);
    assert_ne!(fp(&rescanned), fp(&scanned));
    assert_eq!(fp(&rescanned).files_hash, files_hash_by_stat(&rescanned));
    // Added, removed, renamed: the class folder's time changes and the next open walks again.
    let class_dir = first.parent().unwrap().to_path_buf();
    std::fs::copy(&first, class_dir.join("zz.jpg")).unwrap();
    let added = open();
    assert_eq!((added.index, added.len()), (Scan, 13));
    assert!(added.samples.iter().any(|(p, _)| p.ends_with("zz.jpg")));
    common::age_folders(&root);
    open();
    assert_eq!(open().index, Cache);
    std::fs::remove_file(class_dir.join("zz.jpg")).unwrap();
    let removed = open();
    assert_eq!((removed.index, removed.len(), fp(&removed)), (Scan, 12, fp(&rescanned)));
    common::age_folders(&root);
    open();
    std::fs::rename(&first, class_dir.join("renamed.jpg")).unwrap();
    let renamed = open();
    assert_eq!((renamed.index, renamed.len()), (Scan, 12));
    assert_ne!(fp(&renamed), fp(&removed));
    assert_eq!(fp(&renamed).files_hash, files_hash_by_stat(&renamed));
}

#[test]
fn shards_give_the_folder_fingerprint_samples_and_batches_and_truncation_is_named() {
    use lmim_bench::data::{shards, OpenOptions};
    let dir = tempfile::tempdir().unwrap();
    let root = make_synth(dir.path(), 3, 5);
    // A PNG keeps its extension and a long nested name goes through the tar's long-name header.
    let long = root.join("train/class_001").join("n".repeat(90)).join("m".repeat(60));
    std::fs::create_dir_all(&long).unwrap();
    image::RgbImage::from_pixel(9, 7, image::Rgb([1, 2, 3])).save(long.join("p.png")).unwrap();
    let opts = OpenOptions { index_dir: Some(dir.path().join("index")), quiet: true, ..Default::default() };
    let folder = Dataset::open_with(&root, "train", &opts).unwrap();
    let out = dir.path().join("packed");
    let report = shards::pack(&folder, &out, 6000).unwrap();
    assert!(report.shards >= 3, "{report:?}");
    let sh = Dataset::open_with(&out, "train", &opts).unwrap();
    assert_eq!(sh.layout, "wds_shards");
    assert_eq!(sh.fingerprint().unwrap(), folder.fingerprint().unwrap());
    assert_eq!((&sh.classes, &sh.sizes), (&folder.classes, &folder.sizes));
    for i in 0..folder.len() {
        assert_eq!((sh.rel_path(i), sh.samples[i].1), (folder.rel_path(i), folder.samples[i].1));
        assert_eq!(sh.read_bytes(i).unwrap(), folder.read_bytes(i).unwrap());
    }
    // The same batches, images bitwise, with shuffling and random crops.
    let batches = |ds: Dataset| collect(Loader::new(ds, Transform::train(16, 0.2), cfg(2)).unwrap().epoch(1));
    same(&batches(Dataset::open_with(&root, "train", &opts).unwrap()), &batches(sh));

    // Python's tarfile reads the shards (names and sizes), and existing WebDataset shards that it writes
    // (`<key>.jpg` + `.cls` + `.json`, no classes file) are read with their labels and bytes.
    let listing = dir.path().join("members.json");
    let tar_dir = out.join("train");
    common::run_py("wds_shards.py", &["list", tar_dir.to_str().unwrap(), listing.to_str().unwrap()]);
    let listed: serde_json::Value = serde_json::from_slice(&std::fs::read(&listing).unwrap()).unwrap();
    let members: Vec<(String, u64)> = listed.as_object().unwrap().values().flat_map(|v| v.as_array().unwrap().clone()).map(|m| (m[0].as_str().unwrap().to_string(), m[1].as_u64().unwrap())).collect();
    let images: Vec<(String, u64)> = members.into_iter().filter(|(n, _)| !n.ends_with(".cls")).collect();
    assert_eq!(images, (0..folder.len()).map(|i| (folder.rel_path(i), folder.sizes[i])).collect::<Vec<_>>());
    let wds = dir.path().join("wds");
    let plain = make_synth(&dir.path().join("plain"), 3, 5);
    common::run_py("wds_shards.py", &["write", plain.join("train").to_str().unwrap(), wds.join("train").to_str().unwrap(), "4"]);
    let theirs = Dataset::open_with(&wds, "train", &opts).unwrap();
    let mine = Dataset::open_with(&plain, "train", &opts).unwrap();
    assert_eq!(theirs.classes, vec!["0", "1", "2"]);
    assert_eq!(theirs.len(), mine.len());
    for i in 0..mine.len() {
        assert_eq!((theirs.samples[i].1, theirs.read_bytes(i).unwrap()), (mine.samples[i].1, mine.read_bytes(i).unwrap()));
    }

    // The last shard cut inside its last image: named at open; that sample is lost with the cut (listed once by
    // --skip-bad), and a strict loader refuses the split up front.
    let last = tar_dir.join(format!("shard-{:06}.tar", report.shards - 1));
    let (m, _) = shards::read_members(&last).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&last).unwrap();
    f.set_len(m.last().unwrap().offset + 10).unwrap();
    let name = last.file_name().unwrap().to_str().unwrap();
    let err = Dataset::open_with(&out, "train", &OpenOptions { strict: true, ..opts.clone() }).unwrap_err().to_string();
    assert!(err.contains(name) && err.contains("truncated"), "{err}");
    let cut = Dataset::open_with(&out, "train", &opts).unwrap();
    assert_eq!((cut.len(), cut.lost().len()), (folder.len() - 1, 1));
    let l = Loader::new(cut, Transform::eval(16, 16), LoaderConfig { shuffle: false, ..cfg(2) }).unwrap();
    let seen: usize = collect(l.epoch(0)).iter().map(|b| b.indices.len()).sum();
    assert_eq!((seen, l.skipped(), l.skipped_files().len()), (folder.len() - 1, 0, 1));
    let strict = Dataset::open_with(&out, "train", &opts).unwrap();
    let err = Loader::new(strict, Transform::eval(16, 16), LoaderConfig { shuffle: false, strict: true, quiet: true, ..cfg(2) }).err().expect("a strict loader refuses a cut split").to_string();
    assert!(err.contains(name) && err.contains("truncated") && err.contains("1 samples"), "{err}");
}

/// `lmim-bench info` as a task would run it: under `taskset -c CPUS` when given, with `vars`.
fn info_line(taskset: Option<&str>, vars: &[(&str, &str)]) -> String {
    use assert_cmd::cargo::CommandCargoExt;
    let mut c = match taskset {
        Some(cpus) => {
            let mut c = std::process::Command::new("taskset");
            c.args(["-c", cpus]).arg(assert_cmd::cargo::cargo_bin("lmim-bench"));
            c
        }
        None => std::process::Command::cargo_bin("lmim-bench").unwrap(),
    };
    for k in ["LOCAL_WORLD_SIZE", "SLURM_STEP_ID", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_CPUS_PER_TASK", "RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"] {
        c.env_remove(k);
    }
    let o = c.arg("info").envs(vars.iter().copied()).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).lines().find(|l| l.starts_with("loader")).unwrap_or_else(|| panic!("no loader line in {}", String::from_utf8_lossy(&o.stdout))).to_string()
}

fn command_number(cmd: &str, args: &[&str]) -> usize {
    let o = std::process::Command::new(cmd).args(args).output().unwrap();
    String::from_utf8_lossy(&o.stdout).trim().parse().unwrap()
}

/// Decode threads follow the launcher's share of the node: under a narrower affinity mask (`srun
/// --cpus-per-task`, here `taskset`) the mask's CPUs, not divided again by the ranks on the node (the README's
/// sbatch of 8 tasks x 12 CPUs got 1 thread per GPU that way); with the whole node in the mask (torchrun on a bare
/// node) the node's CPUs divided by the local ranks. `info` says the count and why.
#[test]
#[cfg_attr(not(lmim_whole_node_mask), ignore = "needs two CPUs and a whole-node affinity mask, which the machine that built the tests did not have")]
fn decode_threads_follow_the_affinity_mask_and_the_local_ranks() {
    let (mask, online) = (command_number("nproc", &[]), command_number("getconf", &["_NPROCESSORS_ONLN"]));
    if online < 2 || mask < online {
        // Only where the tests run on another machine than the one that built them: never a silent pass in CI.
        let why = format!("this machine has {online} CPUs and a mask of {mask}: no narrower mask to make, or no whole-node case");
        assert!(std::env::var_os("CI").is_none(), "NOT RUN under CI: {why}");
        eprintln!("decode_threads_follow_the_affinity_mask_and_the_local_ranks: NOT RUN: {why}");
        return;
    }
    // One task of an `srun --ntasks-per-node=8 --cpus-per-task=1` step, bound to its one CPU.
    let line = info_line(Some("0"), &[("SLURM_STEP_ID", "0"), ("SLURM_NTASKS_PER_NODE", "8"), ("SLURM_CPUS_PER_TASK", "1")]);
    assert!(line.contains(&format!("1 decode threads per process: the 1 CPUs this process may use (its affinity mask holds 1 of the node's {online}")), "{line}");
    // torchrun's two ranks on the whole node.
    let line = info_line(None, &[("LOCAL_WORLD_SIZE", "2")]);
    let usable = std::thread::available_parallelism().unwrap().get();
    assert!(line.contains(&format!("{} decode threads per process: the {usable} CPUs of one affinity mask ({mask} of the node's {online}) shared by 2 ranks", (usable / 2).max(1))), "{line}");
}

/// What an open gives, compared with the clean result: samples, labels, sizes, classes, fingerprint, cache key.
fn view(ds: &Dataset) -> (Vec<(std::path::PathBuf, i64)>, Vec<u64>, Vec<String>, lmim_bench::data::Fingerprint, String) {
    (ds.samples.clone(), ds.sizes.clone(), ds.classes.clone(), ds.fingerprint().unwrap(), ds.cache_key().to_string())
}

#[test]
fn every_flipped_byte_of_the_index_cache_gives_the_clean_result_by_a_rescan() {
    use lmim_bench::data::index::IndexSource::{Cache, Scan};
    use lmim_bench::data::OpenOptions;
    let dir = tempfile::tempdir().unwrap();
    let root = make_synth(dir.path(), 2, 2);
    common::age_folders(&root);
    let opts = OpenOptions { index_dir: Some(dir.path().join("index")), quiet: true, ..Default::default() };
    let open = || Dataset::open_with(&root, "val", &opts).unwrap();
    let clean = open();
    assert_eq!(clean.index, Scan);
    assert_eq!(open().index, Cache);
    let file = std::fs::read_dir(dir.path().join("index")).unwrap().next().unwrap().unwrap().path();
    let bytes = std::fs::read(&file).unwrap();
    assert!(bytes.len() > 300 && bytes.len() < 4000, "{} bytes", bytes.len());
    for i in 0..bytes.len() {
        for bit in [0x01u8] {
            let mut bad = bytes.clone();
            bad[i] ^= bit;
            std::fs::write(&file, &bad).unwrap();
            let ds = open();
            assert_eq!(ds.index, Scan, "byte {i} ^ {bit:#x} was believed");
            assert_eq!(view(&ds), view(&clean), "byte {i} ^ {bit:#x}");
        }
    }
    // A label byte changed together with a recomputed header is still refused by the checksum; cut or grown
    // files, a FIFO, /dev/zero and a large sparse file in its place: walked again at once, never read whole.
    let cases: Vec<(&str, Box<dyn Fn(&Path)>)> = vec![
        ("cut", Box::new(|p: &Path| std::fs::write(p, &bytes[..bytes.len() - 40]).unwrap())),
        ("grown", Box::new(|p: &Path| std::fs::write(p, [bytes.as_slice(), &[0u8; 64]].concat()).unwrap())),
        ("empty", Box::new(|p: &Path| std::fs::write(p, b"").unwrap())),
        ("fifo", Box::new(|p: &Path| assert!(std::process::Command::new("mkfifo").arg(p).status().unwrap().success()))),
        ("/dev/zero", Box::new(|p: &Path| std::os::unix::fs::symlink("/dev/zero", p).unwrap())),
        ("sparse", Box::new(|p: &Path| {
            let mut head = bytes[..24].to_vec();
            head[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
            std::fs::write(p, &head).unwrap();
            std::fs::OpenOptions::new().write(true).open(p).unwrap().set_len(3 << 30).unwrap();
        })),
    ];
    for (what, make) in cases {
        let _ = std::fs::remove_file(&file);
        make(&file);
        let t0 = std::time::Instant::now();
        let ds = open();
        assert_eq!((ds.index, view(&ds)), (Scan, view(&clean)), "{what}");
        assert!(t0.elapsed().as_secs_f64() < 5.0, "{what}: {:?}", t0.elapsed());
    }
    assert_eq!(open().index, Cache, "the rescan wrote a good index again");
}

#[test]
fn rescan_sees_a_same_size_rewrite_in_the_cache_key_but_not_in_the_fingerprint() {
    use lmim_bench::data::index::IndexSource::{Cache, Scan};
    use lmim_bench::data::OpenOptions;
    let dir = tempfile::tempdir().unwrap();
    let root = make_synth(dir.path(), 2, 3);
    common::age_folders(&root);
    let opts = OpenOptions { index_dir: Some(dir.path().join("index")), quiet: true, ..Default::default() };
    let first = Dataset::open_with(&root, "train", &opts).unwrap();
    let cached = Dataset::open_with(&root, "train", &opts).unwrap();
    assert_eq!((cached.index, view(&cached)), (Cache, view(&first)));
    // Another image of the same size written over the first, in place (same inode, same folder time).
    let (a, b) = (first.samples[0].0.clone(), first.samples[1].0.clone());
    let mut other = std::fs::read(&b).unwrap();
    other.resize(std::fs::metadata(&a).unwrap().len() as usize, 0);
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&a, &other).unwrap();
    let stale = Dataset::open_with(&root, "train", &opts).unwrap();
    assert_eq!((stale.index, stale.cache_key()), (Cache, first.cache_key()), "the times of the folders cannot show it");
    let rescanned = Dataset::open_with(&root, "train", &OpenOptions { rescan: true, ..opts.clone() }).unwrap();
    assert_eq!(rescanned.index, Scan);
    assert_eq!(rescanned.fingerprint().unwrap(), first.fingerprint().unwrap(), "names and sizes: the portable identity");
    assert_ne!(rescanned.cache_key(), first.cache_key(), "the caches' key sees the rewrite");
    // A copy of the tree is the same data set to records and resumes, and has caches of its own.
    let copy = dir.path().join("copy");
    assert!(std::process::Command::new("cp").arg("-r").arg(&root).arg(&copy).status().unwrap().success());
    let copied = Dataset::open_with(&copy, "train", &opts).unwrap();
    assert_eq!(copied.fingerprint().unwrap(), rescanned.fingerprint().unwrap());
    assert_ne!(copied.cache_key(), rescanned.cache_key());
}

/// What `--rescan` cannot see, `--content-key` does: a same-size rewrite whose file time is put back (a copy tool
/// that keeps times, a clock step) keeps the time-and-inode key; the content key changes, and is the same for an
/// identical copy of the tree, wherever it lies. Also for tar shards (each shard's bytes).
#[test]
fn content_key_sees_a_rewrite_that_keeps_size_time_and_inode() {
    use lmim_bench::data::OpenOptions;
    let dir = tempfile::tempdir().unwrap();
    let root = make_synth(dir.path(), 2, 3);
    let opts = OpenOptions { index_dir: Some(dir.path().join("index")), quiet: true, rescan: true, ..Default::default() };
    let content = OpenOptions { content_key: true, ..opts.clone() };
    let before = Dataset::open_with(&root, "train", &opts).unwrap();
    let before_content = Dataset::open_with(&root, "train", &content).unwrap();
    assert!(before_content.cache_key().starts_with("content-") && before_content.cache_key() != before.cache_key());
    let copy = dir.path().join("copy");
    assert!(std::process::Command::new("cp").arg("-r").arg(&root).arg(&copy).status().unwrap().success());
    assert_eq!(Dataset::open_with(&copy, "train", &content).unwrap().cache_key(), before_content.cache_key(), "the same bytes elsewhere");

    let (a, b) = (before.samples[0].0.clone(), before.samples[1].0.clone());
    let was = std::fs::metadata(&a).unwrap().modified().unwrap();
    let mut other = std::fs::read(&b).unwrap();
    other.resize(std::fs::metadata(&a).unwrap().len() as usize, 0);
    std::fs::write(&a, &other).unwrap();
    std::fs::File::options().write(true).open(&a).unwrap().set_modified(was).unwrap();
    let after = Dataset::open_with(&root, "train", &opts).unwrap();
    assert_eq!(after.cache_key(), before.cache_key(), "times and inodes cannot show this rewrite");
    assert_ne!(Dataset::open_with(&root, "train", &content).unwrap().cache_key(), before_content.cache_key(), "the bytes do");

    let packed = dir.path().join("packed");
    lmim_bench::data::shards::pack(&before_content, &packed, 4096).unwrap();
    let shard_opts = |c: bool| OpenOptions { content_key: c, ..opts.clone() };
    let k1 = Dataset::open_with(&packed, "train", &shard_opts(true)).unwrap().cache_key().to_string();
    let shard = std::fs::read_dir(packed.join("train")).unwrap().map(|e| e.unwrap().path()).find(|p| p.extension().is_some_and(|e| e == "tar")).unwrap();
    let was = std::fs::metadata(&shard).unwrap().modified().unwrap();
    let mut bytes = std::fs::read(&shard).unwrap();
    // A byte of the first image's data (after the label member's header and block, and the image's header): the
    // tar stays well-formed and the label as it was.
    bytes[1536 + 20] ^= 1;
    std::fs::write(&shard, &bytes).unwrap();
    std::fs::File::options().write(true).open(&shard).unwrap().set_modified(was).unwrap();
    let k2 = Dataset::open_with(&packed, "train", &shard_opts(true)).unwrap().cache_key().to_string();
    assert!(k1.starts_with("content-") && k1 != k2, "a shard's changed byte changes its content key");
}

#[test]
fn a_file_gone_since_the_index_was_made_names_the_cache_and_rescan() {
    use lmim_bench::data::index::IndexSource::Cache;
    use lmim_bench::data::OpenOptions;
    let dir = tempfile::tempdir().unwrap();
    let root = make_synth(dir.path(), 2, 3);
    common::age_folders(&root);
    let opts = OpenOptions { index_dir: Some(dir.path().join("index")), quiet: true, ..Default::default() };
    let ds = Dataset::open_with(&root, "train", &opts).unwrap();
    // Removed, and its folder's time put back as it was (as a copy tool that keeps times does).
    let folder = ds.samples[2].0.parent().unwrap().to_path_buf();
    let was = std::fs::metadata(&folder).unwrap().modified().unwrap();
    std::fs::remove_file(&ds.samples[2].0).unwrap();
    std::fs::File::open(&folder).unwrap().set_modified(was).unwrap();
    let stale = Dataset::open_with(&root, "train", &opts).unwrap();
    assert_eq!(stale.index, Cache);
    let err = stale.read_bytes(2).unwrap_err().to_string();
    assert!(err.contains("dataset index") && err.contains("--rescan") && err.contains(stale.samples[2].0.to_str().unwrap()), "{err}");
}

#[test]
fn cut_or_corrupt_shards_lose_named_samples_that_evaluation_refuses_or_lists() {
    use lmim_bench::data::{shards, OpenOptions};
    let dir = tempfile::tempdir().unwrap();
    let root = make_synth(dir.path(), 2, 8);
    let opts = OpenOptions { index_dir: Some(dir.path().join("index")), quiet: true, ..Default::default() };
    let folder = Dataset::open_with(&root, "train", &opts).unwrap();
    let out = dir.path().join("packed");
    let report = shards::pack(&folder, &out, 1 << 30).unwrap();
    assert_eq!(report.shards, 1);
    let tar = out.join("train/shard-000000.tar");
    assert_eq!(std::fs::read_to_string(out.join("train/counts.tsv")).unwrap().lines().last().unwrap(), "shard-000000.tar\t16");
    let good = std::fs::read(&tar).unwrap();
    let (members, _) = shards::read_members(&tar).unwrap();
    // Members alternate `.cls`, image: sample k's label header starts 512 bytes before members[2k]'s data.
    let header_of = |k: usize| members[2 * k].offset - 512;
    let strict = LoaderConfig { shuffle: false, strict: true, quiet: true, ..cfg(2) };
    let lenient = LoaderConfig { shuffle: false, quiet: true, ..cfg(2) };
    type Cut<'a> = Box<dyn Fn() -> Vec<u8> + 'a>;
    let cases: Vec<(&str, Cut<'_>, u64, usize)> = vec![
        // Cut at a member boundary, with the end-of-archive blocks put back: only the counts show it.
        ("cut at a member boundary", Box::new(|| [&good[..header_of(12) as usize], &[0u8; 1024][..]].concat()), header_of(12) + 1024, 12),
        ("cut inside a header", Box::new(|| good[..header_of(9) as usize + 100].to_vec()), header_of(9), 9),
        // Cut inside sample 7's image bytes: that sample is lost with the rest, counted once by both paths.
        ("cut inside an image", Box::new(|| good[..members[2 * 7 + 1].offset as usize + 10].to_vec()), members[2 * 7 + 1].offset - 512, 7),
        ("a bad header checksum", Box::new(|| {
            let mut b = good.clone();
            b[header_of(5) as usize + 3] ^= 0x20;
            b
        }), header_of(5), 5),
    ];
    for (what, cut, offset, found) in cases {
        std::fs::write(&tar, cut()).unwrap();
        let ds = Dataset::open_with(&out, "train", &opts).unwrap();
        assert_eq!(ds.len(), found, "{what}");
        assert_eq!(ds.lost().len(), 1, "{what}");
        assert_eq!((ds.lost()[0].offset, ds.lost()[0].count), (offset, Some(16 - found as u64)), "{what}");
        let err = Loader::new(ds, Transform::eval(16, 16), strict.clone()).err().expect(what).to_string();
        assert!(err.contains("shard-000000.tar") && err.contains(&format!("byte {offset}")), "{what}: {err}");
        let l = Loader::new(Dataset::open_with(&out, "train", &opts).unwrap(), Transform::eval(16, 16), lenient.clone()).unwrap();
        let seen: usize = collect(l.epoch(0)).iter().map(|b| b.indices.len()).sum();
        let listed: Vec<String> = l.skipped_files().iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(seen, found, "{what}");
        assert_eq!(listed, (found..16).map(|k| format!("shard-000000.tar#{k}")).collect::<Vec<_>>(), "{what}");
    }
    // A shard without counts (someone else's): a cut is the rest of the shard, refused just the same.
    std::fs::remove_file(out.join("train/counts.tsv")).unwrap();
    std::fs::write(&tar, &good[..header_of(12) as usize]).unwrap();
    let ds = Dataset::open_with(&out, "train", &opts).unwrap();
    assert_eq!((ds.len(), ds.lost()[0].count), (12, None));
    assert!(Loader::new(ds, Transform::eval(16, 16), strict).is_err());
}

#[test]
fn a_pack_that_fails_its_check_leaves_no_split_and_an_existing_one_as_it_was() {
    use lmim_bench::data::{shards, OpenOptions};
    let dir = tempfile::tempdir().unwrap();
    let root = make_synth(dir.path(), 2, 4);
    let opts = OpenOptions { index_dir: Some(dir.path().join("index")), quiet: true, ..Default::default() };
    let out = dir.path().join("packed");
    let ds = Dataset::open_with(&root, "train", &opts).unwrap();
    // A file grown after the split was opened: the shards hold its new bytes, whose size the fingerprint refuses.
    let grown = ds.samples[3].0.clone();
    let mut bytes = std::fs::read(&grown).unwrap();
    bytes.extend_from_slice(&[0u8; 7]);
    std::fs::write(&grown, &bytes).unwrap();
    let err = shards::pack(&ds, &out, 1 << 20).unwrap_err().to_string();
    assert!(err.contains("fingerprint") && err.contains("nothing was kept"), "{err}");
    let left: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| !n.starts_with('.')).collect();
    assert!(left.is_empty(), "{left:?}");
    // Packed again from a fresh open: complete. A failed pack over it (the same change) leaves it as it was.
    let fresh = Dataset::open_with(&root, "train", &OpenOptions { rescan: true, ..opts.clone() }).unwrap();
    shards::pack(&fresh, &out, 1 << 20).unwrap();
    let before: Vec<(String, Vec<u8>)> = std::fs::read_dir(out.join("train")).unwrap().map(|e| e.unwrap().path()).map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap())).collect();
    // A second pack of the same split is refused up front (the split exists); a pack of another split into the same
    // folder that fails its own check (a val file grown after the open) leaves no val and the train split as it was.
    assert!(shards::pack(&ds, &out, 1 << 20).unwrap_err().to_string().contains("exists already"));
    let val = Dataset::open_with(&root, "val", &opts).unwrap();
    let mut bytes = std::fs::read(&val.samples[1].0).unwrap();
    bytes.extend_from_slice(&[0u8; 5]);
    std::fs::write(&val.samples[1].0, &bytes).unwrap();
    let err = shards::pack(&val, &out, 1 << 20).unwrap_err().to_string();
    assert!(err.contains("fingerprint") && err.contains("nothing was kept"), "{err}");
    assert!(!out.join("val").exists());
    let after: Vec<(String, Vec<u8>)> = std::fs::read_dir(out.join("train")).unwrap().map(|e| e.unwrap().path()).map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap())).collect();
    assert_eq!(before, after);
}

/// A selection of rows (low-shot's subsets) reads the same bytes and labels as the split, from folders and from tar
/// shards, under a cache key of its own.
#[test]
fn a_selection_of_rows_reads_the_splits_samples_under_its_own_key() {
    use lmim_bench::data::{shards, OpenOptions};
    let dir = tempfile::tempdir().unwrap();
    let root = make_synth(dir.path(), 3, 4);
    let opts = OpenOptions { index_dir: Some(dir.path().join("index")), quiet: true, ..Default::default() };
    let folder = Dataset::open_with(&root, "train", &opts).unwrap();
    let out = dir.path().join("packed");
    shards::pack(&folder, &out, 1 << 12).unwrap();
    let packed = Dataset::open_with(&out, "train", &opts).unwrap();
    for ds in [&folder, &packed] {
        let rows = [7usize, 2, 11];
        let sel = ds.select(&rows).unwrap();
        assert_eq!(sel.len(), 3);
        for (k, &r) in rows.iter().enumerate() {
            assert_eq!((sel.samples[k].1, sel.read_bytes(k).unwrap()), (ds.samples[r].1, ds.read_bytes(r).unwrap()), "{} row {r}", ds.layout);
        }
        assert_eq!(sel.fingerprint().unwrap(), ds.fingerprint().unwrap());
        assert_ne!(sel.cache_key(), ds.cache_key());
        assert_ne!(sel.cache_key(), ds.select(&[2, 7, 11]).unwrap().cache_key(), "the order is part of the key");
        assert!(ds.select(&[ds.len()]).is_err());
    }
}
