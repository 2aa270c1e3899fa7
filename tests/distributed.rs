//! Data-parallel runs on the real c10d Gloo path, 2 processes on localhost: 2 ranks x accum 1 give the weights of
//! 1 rank x accum 2 (pretraining launched as Slurm's `srun` does, fine-tuning through `torchrun --no-python`, the
//! linear probe through RANK/WORLD_SIZE, with its BatchNorm statistics and one metrics file), a 2-rank k-NN gives the
//! record of a 1-rank one, a 2-rank run resumes exactly on 1 rank, a rank whose peer dies (or never comes) exits
//! non-zero with a message naming it, within the timeout, and a rank that fails with an error stops its peer at
//! once.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use assert_cmd::cargo::CommandCargoExt;
use lmim_bench::checkpoint;

/// Largest difference allowed between weights of runs that split a step differently (fp32 round-off of the
/// gradient sum in another order, over a few steps).
const TOL: f64 = 1e-5;

fn bin() -> Command {
    let mut c = Command::cargo_bin("lmim-bench").unwrap();
    c.env("OMP_NUM_THREADS", "1").env("GLOO_SOCKET_IFNAME", "lo");
    c
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The same command as `world` processes, rank r with the variables `vars(r, port)`.
/// `timeout_s` 0: no `--dist-timeout`, PyTorch's default.
fn spawn_with(args: &[String], world: usize, timeout_s: u64, vars: impl Fn(usize, &str) -> Vec<(&'static str, String)>) -> Vec<Child> {
    spawn_ranks(|_| args.to_vec(), world, timeout_s, vars)
}

/// As [`spawn_with`], with rank r's own arguments `args(r)`.
fn spawn_ranks(args: impl Fn(usize) -> Vec<String>, world: usize, timeout_s: u64, vars: impl Fn(usize, &str) -> Vec<(&'static str, String)>) -> Vec<Child> {
    let port = free_port().to_string();
    (0..world)
        .map(|r| {
            let timeout = if timeout_s > 0 { vec!["--dist-timeout".to_string(), timeout_s.to_string()] } else { vec![] };
            bin()
                .args(args(r))
                .args(timeout)
                .envs(vars(r, &port))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect()
}

/// Started as `srun --ntasks=W` starts tasks on one node: Slurm's variables only (no RANK, no MASTER_ADDR: rank 0's
/// host comes from the node list), MASTER_PORT set by the job script.
fn spawn_slurm(args: &[String], world: usize, timeout_s: u64) -> Vec<Child> {
    spawn_with(args, world, timeout_s, |r, port| {
        vec![
            ("SLURM_PROCID", r.to_string()),
            ("SLURM_NTASKS", world.to_string()),
            ("SLURM_STEP_ID", "0".into()),
            ("SLURM_LOCALID", r.to_string()),
            ("SLURM_NTASKS_PER_NODE", world.to_string()),
            ("SLURM_JOB_NODELIST", "localhost".into()),
            ("MASTER_PORT", port.into()),
        ]
    })
}

/// The plain environment of a launcher for rank r of `world` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).
fn launcher_vars(r: usize, world: usize, port: &str) -> Vec<(&'static str, String)> {
    vec![("RANK", r.to_string()), ("WORLD_SIZE", world.to_string()), ("LOCAL_RANK", r.to_string()), ("MASTER_ADDR", "127.0.0.1".into()), ("MASTER_PORT", port.into())]
}

fn spawn_world(args: &[String], world: usize, timeout_s: u64) -> Vec<Child> {
    spawn_with(args, world, timeout_s, |r, port| launcher_vars(r, world, port))
}

fn wait_all(children: Vec<Child>) -> Vec<Output> {
    children.into_iter().map(|c| c.wait_with_output().unwrap()).collect()
}

fn assert_ok(outs: &[Output]) {
    for (r, o) in outs.iter().enumerate() {
        assert!(o.status.success(), "rank {r} failed: {}", String::from_utf8_lossy(&o.stderr));
    }
}

fn run_world(args: &[String], world: usize) -> Vec<Output> {
    let outs = wait_all(spawn_world(args, world, 120));
    assert_ok(&outs);
    outs
}

fn run_one(args: &[String]) -> Output {
    let o = bin().args(args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn synth(dir: &Path) -> PathBuf {
    let data = dir.join("synth");
    run_one(&strings(&["data", "synth", "--out", s(&data), "--classes", "4", "--train-per-class", "32", "--val-per-class", "8", "--size", "40"]));
    data
}

/// Max abs difference over the tensors of two checkpoints (same names required); `filter` picks names.
fn max_diff(a: &Path, b: &Path, filter: impl Fn(&str) -> bool) -> f64 {
    let (a, b) = (checkpoint::load(a).unwrap(), checkpoint::load(b).unwrap());
    let names: Vec<&String> = a.tensors.iter().map(|(n, _)| n).filter(|n| filter(n)).collect();
    assert!(!names.is_empty());
    let mut worst = 0f64;
    for n in names {
        let (ta, tb) = (a.get(n).unwrap(), b.get(n).unwrap_or_else(|| panic!("{n} missing")));
        assert_eq!(ta.size(), tb.size(), "{n}");
        worst = worst.max(common::max_abs(ta, tb));
    }
    worst
}

fn pretrain_args(data: &Path, out: &Path) -> Vec<String> {
    strings(&[
        "pretrain", "-q", "-c", concat!(env!("CARGO_MANIFEST_DIR"), "/configs/lmim_tiny.toml"), "--data", s(data), "-o", s(out), "--no-tensorboard",
        "epochs=2", "warmup_epochs=1", "batch_size=32", "micro_batch_size=16", "num_workers=1", "nn_every=0", "log_every=1", "keep_last=10", "device=\"cpu\"",
    ])
}

fn record(dir: &Path) -> serde_json::Value {
    let rec = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).find(|p| p.extension().is_some_and(|e| e == "json")).expect("a record");
    serde_json::from_str(&std::fs::read_to_string(rec).unwrap()).unwrap()
}

#[test]
#[cfg_attr(not(lmim_gloo), ignore = "this build has no Gloo (no gloo headers when it was built): apt-get install libgloo-dev or set LMIM_GLOO_INCLUDE, then rebuild")]
fn pretraining_does_not_depend_on_how_a_step_is_split_and_resumes_on_another_world_size() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path());
    let one = dir.path().join("one");
    run_one(&pretrain_args(&data, &one));
    let two = dir.path().join("two");
    let outs = wait_all(spawn_slurm(&pretrain_args(&data, &two), 2, 120));
    assert_ok(&outs);
    // Only rank 0 reports.
    assert!(String::from_utf8_lossy(&outs[0].stderr).contains("done:"));
    assert!(!String::from_utf8_lossy(&outs[1].stderr).contains("done:"));

    let d = max_diff(&one.join("encoder.safetensors"), &two.join("encoder.safetensors"), |_| true);
    assert!(d < TOL, "2 ranks x accum 1 vs 1 rank x accum 2: encoder differs by {d}");
    let cfg = std::fs::read_to_string(two.join("config.toml")).unwrap();
    assert!(cfg.contains("world_size = 2") && cfg.contains("backend = \"gloo\""), "{cfg}");
    let rec = record(&two);
    assert_eq!((rec["config"]["world_size"].as_i64(), rec["config"]["accum_iter"].as_i64()), (Some(2), Some(1)));
    assert_eq!(rec["config"]["launcher"].as_str(), Some("slurm"), "{}", rec["config"]);
    assert_eq!(record(&one)["config"]["accum_iter"].as_i64(), Some(2));
    // The logged losses are means over both ranks: the same curve.
    let losses = |d: &Path| -> Vec<f64> {
        std::fs::read_to_string(d.join("metrics.jsonl")).unwrap().lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("loss")?.as_f64()).collect()
    };
    let (l1, l2) = (losses(&one), losses(&two));
    assert_eq!(l1.len(), l2.len());
    assert!(l1.len() >= 8);
    for (a, b) in l1.iter().zip(&l2) {
        assert!((a - b).abs() < 1e-4, "loss {a} vs {b}");
    }

    // Resume the 2-rank run on 1 rank from its epoch-1 checkpoint: it ends where the others did.
    let resumed = dir.path().join("resumed");
    std::fs::create_dir_all(resumed.join("checkpoints")).unwrap();
    let mut cks: Vec<PathBuf> = std::fs::read_dir(two.join("checkpoints")).unwrap().map(|e| e.unwrap().path()).collect();
    cks.sort();
    assert_eq!(cks.len(), 2, "{cks:?}");
    std::fs::copy(&cks[0], resumed.join("checkpoints").join(cks[0].file_name().unwrap())).unwrap();
    let o = run_one(&pretrain_args(&data, &resumed));
    assert!(String::from_utf8_lossy(&o.stderr).contains("resuming from"));
    let d = max_diff(&one.join("encoder.safetensors"), &resumed.join("encoder.safetensors"), |_| true);
    assert!(d < TOL, "2-rank run resumed on 1 rank: encoder differs by {d}");
}

#[test]
#[cfg_attr(not(lmim_gloo), ignore = "this build has no Gloo (no gloo headers when it was built): apt-get install libgloo-dev or set LMIM_GLOO_INCLUDE, then rebuild")]
fn finetuning_under_torchrun_equals_one_process_with_accumulation() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path());
    let args = |out: &Path| {
        strings(&[
            "eval", "--protocol", "finetune", "--arch", "vit_pico_patch4_32", "--name", "pico", "--device", "cpu", "--workers", "1", "--quiet", "--no-tensorboard",
            "--data", s(&data), "--output", s(out), "--set", "epochs=1", "--set", "batch_size=32", "--set", "micro_batch_size=16", "--set", "warmup_epochs=0.5",
        ])
    };
    let one = dir.path().join("one");
    run_one(&args(&one));
    let two = dir.path().join("two");
    let torchrun = common::python().parent().unwrap().join("torchrun");
    let o = Command::new(&torchrun)
        .args(["--no-python", "--nproc-per-node=2", "--master-addr=127.0.0.1", &format!("--master-port={}", free_port())])
        .arg(Command::cargo_bin("lmim-bench").unwrap().get_program())
        .args(args(&two))
        .args(["--dist-timeout", "120"])
        .env("OMP_NUM_THREADS", "1")
        .env("GLOO_SOCKET_IFNAME", "lo")
        .output()
        .unwrap();
    assert!(o.status.success(), "torchrun: {}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    let run = "pico-finetune-scratch-s0";
    let d = max_diff(&one.join(run).join("finetuned.safetensors"), &two.join(run).join("finetuned.safetensors"), |_| true);
    assert!(d < TOL, "fine-tuning, 2 ranks vs 1 rank x accum 2: weights differ by {d}");
    let (r1, r2) = (record(&one), record(&two));
    assert_eq!(r1["metrics"]["top1"], r2["metrics"]["top1"]);
    assert_eq!((r2["config"]["world_size"].as_i64(), r2["config"]["launcher"].as_str()), (Some(2), Some("torchrun")));
    // One record and one CSV row, from rank 0.
    let csv = std::fs::read_to_string(two.join("results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 2, "{csv}");
}

#[test]
#[cfg_attr(not(lmim_gloo), ignore = "this build has no Gloo (no gloo headers when it was built): apt-get install libgloo-dev or set LMIM_GLOO_INCLUDE, then rebuild")]
fn knn_on_two_ranks_gives_the_one_rank_record() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path());
    let enc = dir.path().join("enc.safetensors");
    run_one(&strings(&["init", "-c", concat!(env!("CARGO_MANIFEST_DIR"), "/configs/lmim_tiny.toml"), "-o", s(&enc)]));
    let args = |out: &Path| strings(&["eval", "--protocol", "knn", "--device", "cpu", "--quiet", "--workers", "1", "--checkpoint", s(&enc), "--data", s(&data), "--output", s(out), "--batch-size", "7"]);
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    run_one(&args(&one));
    // One scan per job: with the tree's folders an hour old (a fresh tree is not indexed) and a cache folder per
    // rank, rank 0 makes and keeps the index of both splits and rank 1, which receives them, keeps none.
    common::age_folders(&data);
    let cache = |r: usize| dir.path().join(format!("cache-{r}"));
    let outs = wait_all(spawn_with(&args(&two), 2, 120, |r, port| {
        let mut v = launcher_vars(r, 2, port);
        v.push(("LMIM_CACHE", s(&cache(r)).into()));
        v
    }));
    assert_ok(&outs);
    assert_eq!(std::fs::read_dir(cache(0).join("data-index")).unwrap().count(), 2, "rank 0 indexed train and val");
    assert!(!cache(1).exists(), "rank 1 made an index of its own");
    let (r1, r2) = (record(&one), record(&two));
    assert_eq!(r1["metrics"], r2["metrics"]);
    assert_eq!(r1["details"]["knn"]["scores"], r2["details"]["knn"]["scores"]);
    assert_eq!(r2["config"]["world_size"].as_i64(), Some(2));
    // The features behind them: each rank extracts its block, the blocks sum into the dataset-order matrix.
    let feats = |out: &Path| strings(&["extract", "--device", "cpu", "--quiet", "--workers", "1", "--no-cache", "--checkpoint", s(&enc), "--data", s(&data), "--split", "train", "--batch-size", "5", "--out", s(out)]);
    let (f1, f2) = (dir.path().join("f1.safetensors"), dir.path().join("f2.safetensors"));
    run_one(&feats(&f1));
    run_world(&feats(&f2), 2);
    assert!(!dir.path().join("f2.safetensors.tmp").exists());
    assert_eq!(max_diff(&f1, &f2, |_| true), 0.0, "2-rank features differ from 1-rank features");
    // The content key is read once per job, by rank 0, and is the 1-rank run's.
    let keyed = |out: &Path| {
        let mut a = feats(out);
        a.retain(|x| x != "--quiet");
        a.extend(strings(&["--content-key", "--json"]));
        a
    };
    let one_key = run_one(&keyed(&dir.path().join("k1.safetensors")));
    let two_keys = run_world(&keyed(&dir.path().join("k2.safetensors")), 2);
    let reads = |o: &Output| stderr(o).matches("content key: reading every file").count();
    assert_eq!((reads(&one_key), reads(&two_keys[0]), reads(&two_keys[1])), (1, 1, 0), "{}", stderr(&two_keys[1]));
    let key = |o: &Output| serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["cache"]["cache_key"].as_str().unwrap().to_string();
    assert_eq!(key(&one_key), key(&two_keys[0]));
}

#[test]
#[cfg_attr(not(lmim_gloo), ignore = "this build has no Gloo (no gloo headers when it was built): apt-get install libgloo-dev or set LMIM_GLOO_INCLUDE, then rebuild")]
fn a_dead_or_missing_peer_is_an_error_within_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path());
    // Rank 1 never comes.
    let t0 = Instant::now();
    let o = bin()
        .args(pretrain_args(&data, &dir.path().join("alone")))
        .args(["--dist-timeout", "3"])
        .env("RANK", "0")
        .env("WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", free_port().to_string())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("rank 0 of 2") && err.contains("cannot join"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(30));

    // Rank 1 is killed mid-run: rank 0 stops with an error naming itself and what it waited for.
    let long = dir.path().join("long");
    let mut args = pretrain_args(&data, &long);
    args.push("epochs=200".into());
    let mut kids = spawn_world(&args, 2, 10);
    std::thread::sleep(Duration::from_secs(4));
    let _ = kids[1].kill();
    let t1 = Instant::now();
    let outs = wait_all(kids);
    let err0 = String::from_utf8_lossy(&outs[0].stderr);
    assert_eq!(outs[0].status.code(), Some(1), "{err0}");
    assert!(err0.contains("rank 0 of 2") && (err0.contains("failed") || err0.contains("cannot join")), "{err0}");
    assert!(t1.elapsed() < Duration::from_secs(40), "rank 0 took {:?} to notice", t1.elapsed());
}

#[test]
#[cfg_attr(not(lmim_gloo), ignore = "this build has no Gloo (no gloo headers when it was built): apt-get install libgloo-dev or set LMIM_GLOO_INCLUDE, then rebuild")]
fn linear_probe_on_two_ranks_gives_the_one_rank_head_and_writes_its_metrics_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path());
    let enc = dir.path().join("enc.safetensors");
    run_one(&strings(&["init", "-c", concat!(env!("CARGO_MANIFEST_DIR"), "/configs/lmim_tiny.toml"), "-o", s(&enc)]));
    let args = |out: &Path| {
        strings(&[
            "eval", "--protocol", "linear", "--device", "cpu", "--quiet", "--workers", "1", "--checkpoint", s(&enc), "--name", "enc", "--data", s(&data), "--output", s(out),
            "--set", "epochs=2", "--set", "warmup_epochs=1", "--set", "batch_size=32", "--set", "micro_batch_size=16", "--set", "eval_every=1",
        ])
    };
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    run_one(&args(&one));
    run_world(&args(&two), 2);
    let (r1, r2) = (record(&one), record(&two));
    assert_eq!(r1["metrics"], r2["metrics"]);
    assert_eq!((r1["config"]["accum_iter"].as_i64(), r2["config"]["accum_iter"].as_i64()), (Some(2), Some(1)));
    let head = |r: &serde_json::Value| PathBuf::from(r["details"]["head"].as_str().unwrap());
    let (h1, h2) = (head(&r1), head(&r2));
    // The running statistics see the same micro-batches in the same order: equal to the bit.
    assert_eq!(max_diff(&h1, &h2, |n| n.starts_with("0.")), 0.0, "BatchNorm statistics differ between 1 and 2 ranks");
    let d = max_diff(&h1, &h2, |n| n.starts_with("1."));
    assert!(d < TOL, "probe weights differ by {d}");
    let tracked = checkpoint::load(&h2).unwrap().get("0.num_batches_tracked").unwrap().int64_value(&[]);
    assert_eq!(tracked, 2 * (4 * 32 / 16), "every global micro-batch of 2 epochs moves the statistics once");
    // One writer: rank 0's metrics file has each epoch once, as the 1-rank run's.
    let lines = |r: &serde_json::Value| std::fs::read_to_string(PathBuf::from(r["details"]["run_dir"].as_str().unwrap()).join("metrics.jsonl")).unwrap();
    let (m1, m2) = (lines(&r1), lines(&r2));
    assert_eq!(m2.lines().count(), 2, "{m2}");
    assert_eq!(m1.lines().count(), m2.lines().count());
}

#[test]
#[cfg_attr(not(lmim_gloo), ignore = "this build has no Gloo (no gloo headers when it was built): apt-get install libgloo-dev or set LMIM_GLOO_INCLUDE, then rebuild")]
fn a_rank_that_fails_stops_its_peer_long_before_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path());
    let port = free_port().to_string();
    let t0 = Instant::now();
    // Rank 1 is given a data root that does not exist: it fails after joining, while rank 0 waits for it in the
    // first collective (the weight broadcast).
    let kids: Vec<Child> = (0..2)
        .map(|r| {
            let root = if r == 0 { data.clone() } else { dir.path().join("missing") };
            bin()
                .args(pretrain_args(&root, &dir.path().join(format!("out{r}"))))
                .args(["--dist-timeout", "300"])
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", "2")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs = wait_all(kids);
    let (err0, err1) = (String::from_utf8_lossy(&outs[0].stderr), String::from_utf8_lossy(&outs[1].stderr));
    assert_eq!(outs[1].status.code(), Some(2), "{err1}");
    assert!(err1.contains("missing"), "{err1}");
    assert_eq!(outs[0].status.code(), Some(1), "rank 0: {err0}");
    // Rank 0 names the rank that failed first and why, not only its broken connection.
    assert!(err0.contains("rank 1") && err0.contains("missing"), "{err0}");
    assert!(t0.elapsed() < Duration::from_secs(60), "took {:?} with a 300 s timeout", t0.elapsed());
}

/// What the shim says it has is what the binary links and what this machine's headers allow, each read
/// independently of the shim: ProcessGroupNCCL's symbols among the binary's undefined dynamic symbols (`nm`), and
/// gloo's headers where the set-up puts or finds them. Where libtorch has CUDA (this set-up's wheel), NCCL is built.
#[test]
fn the_shims_backends_are_the_linked_symbols_and_the_headers() {
    let nm = Command::new("nm").args(["-D", "-C", "--undefined-only"]).arg(assert_cmd::cargo::cargo_bin("lmim-bench")).output().expect("nm (binutils) runs");
    assert!(nm.status.success(), "{}", String::from_utf8_lossy(&nm.stderr));
    let syms = String::from_utf8_lossy(&nm.stdout);
    let links_nccl = syms.contains("c10d::ProcessGroupNCCL::");
    assert_eq!(lmim_bench::dist::has_nccl(), links_nccl, "the shim says NCCL {} but the binary {} ProcessGroupNCCL", lmim_bench::dist::has_nccl(), if links_nccl { "links" } else { "does not link" });
    let links_gloo = syms.contains("c10d::ProcessGroupGloo::");
    assert_eq!(lmim_bench::dist::has_gloo(), links_gloo, "the shim and the binary's symbols disagree about Gloo");
    let headers = std::env::var_os("LMIM_GLOO_INCLUDE").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/usr/include"));
    assert_eq!(lmim_bench::dist::has_gloo(), headers.join("gloo/config.h").exists(), "gloo headers in {} vs the build's Gloo", headers.display());
    let info = lmim_bench::info::Info::collect();
    if Path::new(&info.libtorch_path).join("libtorch_cuda.so").exists() {
        assert!(links_nccl, "libtorch_cuda is there but the binary does not link ProcessGroupNCCL");
    }
}

/// `LMIM_FAULT` for rank r, none for the others; Gloo over RANK / WORLD_SIZE.
fn spawn_faulty(args: &[String], world: usize, timeout_s: u64, faults: &[(usize, &str)]) -> Vec<Child> {
    let faults: Vec<(usize, String)> = faults.iter().map(|(r, f)| (*r, f.to_string())).collect();
    spawn_with(args, world, timeout_s, move |r, port| {
        let mut v = launcher_vars(r, world, port);
        if let Some((_, f)) = faults.iter().find(|(fr, _)| *fr == r) {
            v.push(("LMIM_FAULT", f.clone()));
        }
        v
    })
}

fn replace_arg(args: &mut [String], from: &str, to: &str) {
    let i = args.iter().position(|a| a == from).unwrap_or_else(|| panic!("no {from} in {args:?}"));
    args[i] = to.into();
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A long pretraining whose ranks would not end on their own within the tests' limits.
fn long_pretrain(data: &Path, out: &Path) -> Vec<String> {
    let mut args = pretrain_args(data, out);
    args.push("epochs=50".into());
    args
}

#[test]
#[cfg_attr(not(lmim_gloo), ignore = "this build has no Gloo (no gloo headers when it was built): apt-get install libgloo-dev or set LMIM_GLOO_INCLUDE, then rebuild")]
fn a_panic_in_one_rank_ends_every_rank_with_its_reason_in_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path());
    // Rank 0 is in rank-local work (stuck) when rank 1 panics: no collective fails for it, only the reason in the
    // store can end it. An index out of range inside a kernel (`assert`: on a GPU a device-side assert, here
    // libtorch's CPU check) takes the same path: tch's panic, its message in the store, both ranks out with it.
    for (fault, reason) in [("step=1:panic", "injected panic"), ("step=1:assert", "out of range")] {
        let t0 = Instant::now();
        let out = dir.path().join(fault.replace([':', '='], "-"));
        let outs = wait_all(spawn_faulty(&long_pretrain(&data, &out), 2, 300, &[(0, "step=1:hang"), (1, fault)]));
        let (e0, e1) = (stderr(&outs[0]), stderr(&outs[1]));
        assert_eq!(outs[1].status.code(), Some(1), "{fault}: the panicking rank exits 1, not 101: {e1}");
        assert!(e1.contains("rank 1 of 2") && e1.contains("panicked") && e1.contains(reason), "{fault}: {e1}");
        assert_eq!(outs[0].status.code(), Some(1), "{fault}: {e0}");
        assert!(e0.contains("rank 1") && e0.contains(reason), "{fault}: rank 0 names rank 1's panic: {e0}");
        assert!(t0.elapsed() < Duration::from_secs(60), "{fault}: took {:?} with a 300 s timeout", t0.elapsed());
    }
}

#[test]
#[cfg_attr(not(lmim_gloo), ignore = "this build has no Gloo (no gloo headers when it was built): apt-get install libgloo-dev or set LMIM_GLOO_INCLUDE, then rebuild")]
fn a_dead_store_host_is_reported_by_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path());
    let t0 = Instant::now();
    // Rank 0 (which serves the store) is killed without a word while rank 1 is in rank-local work.
    let outs = wait_all(spawn_faulty(&long_pretrain(&data, &dir.path().join("out")), 2, 300, &[(0, "step=1:die"), (1, "step=1:hang")]));
    let e1 = stderr(&outs[1]);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(outs[0].status.signal(), Some(9), "rank 0 was to die by SIGKILL");
    assert_eq!(outs[1].status.code(), Some(1), "{e1}");
    assert!(e1.contains("rendezvous store that rank 0 serves") && e1.contains("is gone"), "{e1}");
    assert!(t0.elapsed() < Duration::from_secs(60), "took {:?} with a 300 s timeout", t0.elapsed());
}

#[test]
#[cfg_attr(not(lmim_gloo), ignore = "this build has no Gloo (no gloo headers when it was built): apt-get install libgloo-dev or set LMIM_GLOO_INCLUDE, then rebuild")]
fn the_store_host_stays_up_until_the_others_have_read_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path());
    let t0 = Instant::now();
    // Rank 2 fails; ranks 0 and 1 are in rank-local work. Rank 0's watcher reads the failure first or second, but
    // rank 1 must still read rank 2's reason, not only find the store gone.
    let mut args = long_pretrain(&data, &dir.path().join("out"));
    replace_arg(&mut args, "batch_size=32", "batch_size=48");
    let outs = wait_all(spawn_faulty(&args, 3, 300, &[(0, "step=1:hang"), (1, "step=1:hang"), (2, "step=1:error")]));
    for (r, o) in outs.iter().enumerate() {
        let e = stderr(o);
        assert_eq!(o.status.code(), Some(1), "rank {r}: {e}");
        assert!(e.contains("injected error"), "rank {r} names rank 2's error: {e}");
    }
    assert!(t0.elapsed() < Duration::from_secs(90), "took {:?} with a 300 s timeout", t0.elapsed());
}

#[test]
#[cfg_attr(not(lmim_gloo), ignore = "this build has no Gloo (no gloo headers when it was built): apt-get install libgloo-dev or set LMIM_GLOO_INCLUDE, then rebuild")]
fn a_stuck_rank_and_its_waiting_peer_both_end_with_a_message_after_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path());
    let t0 = Instant::now();
    // Rank 1 is stuck (as in a kernel that never ends); rank 0 waits in the next step's all-reduce until
    // --dist-timeout, fails with a message, and the stuck rank reads it and ends too.
    let outs = wait_all(spawn_faulty(&long_pretrain(&data, &dir.path().join("out")), 2, 8, &[(1, "step=1:hang")]));
    let (e0, e1) = (stderr(&outs[0]), stderr(&outs[1]));
    assert_eq!(outs[0].status.code(), Some(1), "{e0}");
    assert!(e0.contains("rank 0 of 2") && e0.contains("failed"), "{e0}");
    assert_eq!(outs[1].status.code(), Some(1), "{e1}");
    assert!(e1.contains("rank 0"), "the stuck rank names rank 0's failure: {e1}");
    assert!(t0.elapsed() < Duration::from_secs(60), "took {:?} with an 8 s timeout", t0.elapsed());
}

#[test]
#[cfg_attr(not(lmim_gloo), ignore = "this build has no Gloo (no gloo headers when it was built): apt-get install libgloo-dev or set LMIM_GLOO_INCLUDE, then rebuild")]
fn a_checkpoint_slower_than_the_timeout_does_not_end_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path());
    // Rank 0 takes 30 s to write the checkpoint at the end of epoch 1 (step 4); the collective timeout is 12 s (a
    // margin for a loaded machine's ordinary steps). The other rank waits for the write on the store, not inside
    // the next step's all-reduce.
    let out = dir.path().join("out");
    let outs = wait_all(spawn_faulty(&pretrain_args(&data, &out), 2, 12, &[(0, "checkpoint=4:slow=30")]));
    assert_ok(&outs);
    assert!(out.join("checkpoints").read_dir().unwrap().count() >= 2, "both epochs' checkpoints");
}

#[test]
fn a_slurm_batch_step_without_srun_runs_as_one_process_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path());
    // sbatch's batch step: SLURM_PROCID=0 and the job's 8 tasks, no SLURM_STEP_ID. Waiting for 7 more ranks would
    // end in the 20 s timeout.
    let mut args = pretrain_args(&data, &dir.path().join("out"));
    replace_arg(&mut args, "epochs=2", "epochs=1");
    let o = bin()
        .args(&args)
        .args(["--dist-timeout", "20"])
        .env("SLURM_PROCID", "0")
        .env("SLURM_NTASKS", "8")
        .env("SLURM_NTASKS_PER_NODE", "8")
        .env("SLURM_JOB_ID", "77")
        .env("SLURM_JOB_NODELIST", "localhost")
        .output()
        .unwrap();
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{e}");
    assert!(e.contains("batch step of Slurm job 77") && e.contains("srun"), "{e}");
    assert_eq!(record(&dir.path().join("out"))["config"]["world_size"].as_i64(), Some(1));
}

#[test]
fn one_gpu_named_for_every_rank_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let o = bin()
        .args(["eval", "--protocol", "knn", "--device", "cuda:1", "--checkpoint", "none.safetensors", "--data", s(dir.path())])
        .env("RANK", "0")
        .env("WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", free_port().to_string())
        .output()
        .unwrap();
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("--device") && e.contains("cuda:1") && e.contains("CUDA_VISIBLE_DEVICES"), "{e}");
}

#[test]
#[cfg_attr(not(lmim_gloo), ignore = "this build has no Gloo (no gloo headers when it was built): apt-get install libgloo-dev or set LMIM_GLOO_INCLUDE, then rebuild")]
fn the_nn_monitor_sharded_over_two_ranks_gives_the_one_rank_score() {
    let dir = tempfile::tempdir().unwrap();
    // 4 x 9 val images: the ranks' blocks (18 each) are not the monitor's batches of one process.
    let data = dir.path().join("synth9");
    run_one(&strings(&["data", "synth", "--out", s(&data), "--classes", "4", "--train-per-class", "32", "--val-per-class", "9", "--size", "40"]));
    let args = |out: &Path| {
        let mut a = pretrain_args(&data, out);
        replace_arg(&mut a, "nn_every=0", "nn_every=1");
        replace_arg(&mut a, "epochs=2", "epochs=1");
        a
    };
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    run_one(&args(&one));
    run_world(&args(&two), 2);
    let nn = |out: &Path| -> Vec<f64> {
        std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["nn_top1"].as_f64()).collect()
    };
    let (n1, n2) = (nn(&one), nn(&two));
    assert_eq!(n1.len(), 2, "step 0 and epoch 1: {n1:?}");
    assert_eq!(n1.len(), n2.len());
    // Step 0: the same weights on both, so the same features and exactly the same score.
    assert_eq!(n1[0].to_bits(), n2[0].to_bits(), "step-0 monitor: 1 rank {} vs 2 ranks {}", n1[0], n2[0]);
    // After training the weights differ by fp32 round-off (TOL): one of 36 images at most may flip.
    assert!((n1[1] - n2[1]).abs() <= 100.0 / 36.0 + 1e-9, "{n1:?} vs {n2:?}");
}


/// A rank killed (SIGKILL) or stopped (SIGSTOP) says nothing: with the default --dist-timeout (30 minutes on Gloo)
/// its peer is out within a minute anyway, naming it, through the heartbeat it stopped beating; also when it is
/// killed between the rendezvous and the process group (`init`: the peer is then inside Gloo's full-mesh connect,
/// as an NCCL rank would be inside its communicator's initialisation).
#[test]
#[cfg_attr(not(lmim_gloo), ignore = "this build has no Gloo (no gloo headers when it was built): apt-get install libgloo-dev or set LMIM_GLOO_INCLUDE, then rebuild")]
fn a_killed_or_stopped_rank_ends_its_peer_within_a_minute_with_the_default_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path());
    // The faults at once (three jobs of two ranks): the heartbeat's 30 s are waited once.
    let jobs: Vec<(&str, Instant, Vec<Child>)> = ["step=1:stop", "step=1:die", "init=1:die"]
        .into_iter()
        .map(|fault| (fault, Instant::now(), spawn_faulty(&long_pretrain(&data, &dir.path().join(fault.replace([':', '='], "-"))), 2, 0, &[(1, fault)])))
        .collect();
    for (fault, t0, mut children) in jobs {
        let mut rank1 = children.pop().unwrap();
        let out0 = children.pop().unwrap().wait_with_output().unwrap();
        let took = t0.elapsed();
        let _ = rank1.kill();
        let _ = rank1.wait();
        let e0 = stderr(&out0);
        assert_eq!(out0.status.code(), Some(1), "{fault}: {e0}");
        assert!(e0.contains("rank 1 has not been heard from"), "{fault}: rank 0 names rank 1: {e0}");
        assert!(took < Duration::from_secs(60), "{fault}: took {took:?} with the default 30-minute timeout");
    }
}

/// Rank 0's first scan of the data set, longer than --dist-timeout: the other rank waits on the store, not in a
/// collective, and the job trains.
#[test]
#[cfg_attr(not(lmim_gloo), ignore = "this build has no Gloo (no gloo headers when it was built): apt-get install libgloo-dev or set LMIM_GLOO_INCLUDE, then rebuild")]
fn a_first_scan_slower_than_the_timeout_does_not_end_the_job_and_every_rank_names_its_decode_threads() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path());
    let out = dir.path().join("out");
    let mut args = pretrain_args(&data, &out);
    args.retain(|a| a != "-q");
    replace_arg(&mut args, "num_workers=1", "num_workers=0");
    args.push("epochs=1".into());
    let t0 = Instant::now();
    let outs = wait_all(spawn_with(&args, 2, 6, |r, port| {
        let mut v = launcher_vars(r, 2, port);
        v.push(("LOCAL_WORLD_SIZE", "2".into()));
        if r == 0 {
            v.push(("LMIM_FAULT", "scan=1:slow=15".into()));
        }
        v
    }));
    assert_ok(&outs);
    assert!(t0.elapsed() > Duration::from_secs(15), "the scan was delayed");
    for (r, o) in outs.iter().enumerate() {
        let e = stderr(o);
        let line = e.lines().find(|l| l.contains("decode threads")).unwrap_or_else(|| panic!("rank {r} names its decode threads: {e}"));
        assert!(line.starts_with(&format!("rank {r} of 2: decode threads: ")) && line.contains("shared by 2 ranks"), "rank {r}: {line}");
    }
}

/// Rank 0's read of a feature-cache file, longer than --dist-timeout: the other rank waits on the store, not in a
/// collective, and the evaluation completes from the cache.
#[test]
#[cfg_attr(not(lmim_gloo), ignore = "this build has no Gloo (no gloo headers when it was built): apt-get install libgloo-dev or set LMIM_GLOO_INCLUDE, then rebuild")]
fn a_feature_cache_read_slower_than_the_timeout_does_not_end_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path());
    let enc = dir.path().join("enc.safetensors");
    run_one(&strings(&["init", "-c", concat!(env!("CARGO_MANIFEST_DIR"), "/configs/lmim_tiny.toml"), "-o", s(&enc)]));
    let cache = dir.path().join("cache");
    let args = |out: &Path| strings(&["eval", "--protocol", "knn", "--device", "cpu", "--quiet", "--workers", "1", "--checkpoint", s(&enc), "--data", s(&data), "--output", s(out), "--cache-dir", s(&cache)]);
    run_one(&args(&dir.path().join("first")));
    let t0 = Instant::now();
    let outs = wait_all(spawn_with(&args(&dir.path().join("second")), 2, 4, |r, port| {
        let mut v = launcher_vars(r, 2, port);
        if r == 0 {
            v.push(("LMIM_FAULT", "cache=1:slow=10".into()));
        }
        v
    }));
    assert_ok(&outs);
    assert!(t0.elapsed() > Duration::from_secs(10), "the cache read was delayed");
    assert_eq!(record(&dir.path().join("first"))["metrics"], record(&dir.path().join("second"))["metrics"]);
}

/// Two Slurm jobs on one node, neither naming MASTER_PORT: each job's store is on a port of its own (from its job
/// id), so both run.
#[test]
#[cfg_attr(not(lmim_gloo), ignore = "this build has no Gloo (no gloo headers when it was built): apt-get install libgloo-dev or set LMIM_GLOO_INCLUDE, then rebuild")]
fn two_slurm_jobs_on_one_node_without_master_port_both_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path());
    let jobs: Vec<(PathBuf, Vec<Child>)> = ["7001", "7002"]
        .iter()
        .map(|job| {
            let out = dir.path().join(format!("job{job}"));
            let mut args = pretrain_args(&data, &out);
            args.push("epochs=1".into());
            let children = spawn_with(&args, 2, 60, |r, _| {
                vec![
                    ("SLURM_PROCID", r.to_string()),
                    ("SLURM_NTASKS", "2".into()),
                    ("SLURM_STEP_ID", "0".into()),
                    ("SLURM_LOCALID", r.to_string()),
                    ("SLURM_NTASKS_PER_NODE", "2".into()),
                    ("SLURM_JOB_NODELIST", "localhost".into()),
                    ("SLURM_JOB_ID", job.to_string()),
                ]
            });
            (out, children)
        })
        .collect();
    for (out, children) in jobs {
        let outs = wait_all(children);
        assert_ok(&outs);
        assert_eq!(record(&out)["config"]["world_size"], 2, "{}", out.display());
    }
}

/// Node-local output folders: rank 0 finds checkpoints, rank 1 none. Every rank exits 2 within seconds, naming
/// both ranks' resume points, before any collective (not a SIGABRT, not two ranks training from two states).
#[test]
#[cfg_attr(not(lmim_gloo), ignore = "this build has no Gloo (no gloo headers when it was built): apt-get install libgloo-dev or set LMIM_GLOO_INCLUDE, then rebuild")]
fn ranks_that_would_resume_from_different_points_all_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path());
    let (out0, out1) = (dir.path().join("node0"), dir.path().join("node1"));
    let mut first = pretrain_args(&data, &out0);
    first.push("epochs=1".into());
    run_one(&first);
    assert!(out0.join("checkpoints").read_dir().unwrap().count() >= 1);
    let t0 = Instant::now();
    let outs = wait_all(spawn_ranks(|r| pretrain_args(&data, if r == 0 { &out0 } else { &out1 }), 2, 0, |r, port| launcher_vars(r, 2, port)));
    for (r, o) in outs.iter().enumerate() {
        let e = stderr(o);
        assert_eq!(o.status.code(), Some(2), "rank {r}: {e}");
        assert!(e.contains("disagree on the resume point") && e.contains("rank 0: step") && e.contains("rank 1: a fresh start"), "rank {r}: {e}");
        assert!(e.contains(s(&out1)), "rank {r} names rank 1's folder: {e}");
    }
    assert!(t0.elapsed() < Duration::from_secs(30), "took {:?}", t0.elapsed());
    assert!(!out1.join("checkpoints").read_dir().map_or(false, |mut d| d.next().is_some()), "rank 1 wrote no checkpoint");
}

/// Every file under `dir` (relative path, bytes), sorted.
fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.strip_prefix(dir).unwrap().to_path_buf(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// DAVIS on 2 ranks deals the sequences over them: one masks folder with the one-rank masks, one record with the
/// one-rank scores.
#[test]
#[cfg_attr(not(lmim_gloo), ignore = "this build has no Gloo (no gloo headers when it was built): apt-get install libgloo-dev or set LMIM_GLOO_INCLUDE, then rebuild")]
fn davis_on_two_ranks_gives_the_one_rank_masks_and_record() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("davis");
    run_one(&strings(&["data", "synth-davis", "--out", s(&data), "--sequences", "5", "--frames", "6"]));
    let ckpt = dir.path().join("enc.safetensors");
    run_one(&strings(&["init", "-c", concat!(env!("CARGO_MANIFEST_DIR"), "/configs/lmim_tiny.toml"), "-o", s(&ckpt)]));
    let args = |out: &Path| strings(&["eval", "--protocol", "davis", "--device", "cpu", "--quiet", "--name", "tiny", "--checkpoint", s(&ckpt), "--data", s(&data), "--output", s(out), "short_side=64"]);
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    run_one(&args(&one));
    run_world(&args(&two), 2);
    let run_dir = |out: &Path| std::fs::read_dir(out).unwrap().map(|e| e.unwrap().path()).find(|p| p.is_dir()).expect("a run folder");
    let (m1, m2) = (files_under(&run_dir(&one).join("masks")), files_under(&run_dir(&two).join("masks")));
    assert_eq!(m1.len(), 5 * 6, "every frame's mask");
    assert!(m1 == m2, "the 2-rank masks folder equals the 1-rank one");
    assert!(!std::fs::read_dir(run_dir(&two)).unwrap().any(|e| e.unwrap().file_name().to_string_lossy().starts_with(".masks")), "no partial folder left");
    let (r1, r2) = (record(&one), record(&two));
    assert_eq!(r1["metrics"], r2["metrics"]);
    for k in ["per_sequence", "per_object", "objects", "frames", "sequences", "predicted_objects_differ"] {
        assert_eq!(r1["details"][k], r2["details"][k], "{k}");
    }
    let records = std::fs::read_dir(&two).unwrap().filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "json")).count();
    assert_eq!(records, 1, "one record for the job");
}

/// `lmim-bench suite` on 2 ranks (k-NN, whose extraction is sharded, and DAVIS, dealt over the ranks) writes the
/// records of the 1-rank suite; run again on 2 ranks, both entries are kept on every rank.
#[test]
#[cfg_attr(not(lmim_gloo), ignore = "this build has no Gloo (no gloo headers when it was built): apt-get install libgloo-dev or set LMIM_GLOO_INCLUDE, then rebuild")]
fn a_suite_on_two_ranks_gives_the_one_rank_records() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path());
    run_one(&strings(&["data", "synth-davis", "--out", s(&dir.path().join("davis")), "--sequences", "3", "--frames", "5"]));
    let ckpt = dir.path().join("enc.safetensors");
    run_one(&strings(&["init", "-c", concat!(env!("CARGO_MANIFEST_DIR"), "/configs/lmim_tiny.toml"), "-o", s(&ckpt)]));
    let suite = dir.path().join("suite.toml");
    std::fs::write(&suite, format!("[data]\nimg = \"{}\"\ndavis = \"davis\"\n[[eval]]\nprotocol = \"knn\"\ndata = \"img\"\n[[eval]]\nprotocol = \"davis\"\ndata = \"davis\"\nset = {{ short_side = 64 }}\n", s(&data))).unwrap();
    let args = |out: &Path| strings(&["suite", s(&suite), "--checkpoint", s(&ckpt), "--name", "tiny", "--device", "cpu", "--quiet", "--no-cache", "--output", s(out)]);
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    run_one(&args(&one));
    run_world(&args(&two), 2);
    let recs = |out: &Path| {
        let mut v: Vec<(String, String, String)> = std::fs::read_dir(out)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .map(|p| {
                let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
                (r["protocol"].to_string(), r["metrics"].to_string(), r["config"]["run"]["suite_entry"].to_string())
            })
            .collect();
        v.sort();
        v
    };
    assert_eq!(recs(&one).len(), 2);
    assert_eq!(recs(&one), recs(&two), "the 2-rank suite's records are the 1-rank suite's");
    let again = run_world(&args(&two), 2);
    assert!(stderr(&again[0]).matches(": kept (").count() == 2, "{}", stderr(&again[0]));
    assert_eq!(recs(&two).len(), 2, "kept, not run again");
}

/// ADE20K segmentation on 2 ranks shares the forward passes (each rank its block of images, gathered to rank 0 in
/// image order): the one-rank record, written once.
#[test]
#[cfg_attr(not(lmim_gloo), ignore = "this build has no Gloo (no gloo headers when it was built): apt-get install libgloo-dev or set LMIM_GLOO_INCLUDE, then rebuild")]
fn seg_on_two_ranks_gives_the_one_rank_record() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ade");
    run_one(&strings(&["data", "synth-ade20k", "--out", s(&data), "--train", "13", "--val", "5", "--size", "48x40"]));
    let ckpt = dir.path().join("enc.safetensors");
    run_one(&strings(&["init", "-c", concat!(env!("CARGO_MANIFEST_DIR"), "/configs/lmim_tiny.toml"), "-o", s(&ckpt)]));
    let args = |out: &Path| strings(&["eval", "--protocol", "seg", "--device", "cpu", "--quiet", "--name", "tiny", "--checkpoint", s(&ckpt), "--data", s(&data), "--output", s(out), "--batch-size", "4", "resolution=32", "logreg_c=1.0", "knn_chunk=8"]);
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    run_one(&args(&one));
    run_world(&args(&two), 2);
    let (r1, r2) = (record(&one), record(&two));
    assert!(r1["metrics"]["miou_knn"].as_f64().is_some() && r1["metrics"]["miou_logreg"].as_f64().is_some(), "{}", r1["metrics"]);
    assert_eq!(r1["metrics"], r2["metrics"]);
    // The bank's chunks (8 rows each) dealt over both ranks: each searched its own and rank 0 merged them.
    let (s1, s2) = (&r1["details"]["knn"]["fit"]["search"], &r2["details"]["knn"]["fit"]["search"]);
    assert_eq!((s1["ranks"].as_u64(), s2["ranks"].as_u64()), (Some(1), Some(2)), "{s1} {s2}");
    let chunks = s2["chunks"].as_u64().unwrap();
    assert!(chunks >= 4, "{s2}");
    assert_eq!(s2["chunks_on_device"].as_u64().unwrap() + s2["chunks_on_host"].as_u64().unwrap(), chunks.div_ceil(2), "rank 0 holds every other chunk: {s2}");
    // Times and the search's layout aside: every number of both classifiers, the split and the patch counts.
    fn untimed(v: &serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(m) => m.iter().filter(|(k, _)| !k.contains("seconds") && *k != "search").map(|(k, v)| (k.clone(), untimed(v))).collect(),
            other => other.clone(),
        }
    }
    for k in ["knn", "logreg", "split", "training_patches", "validation_patches"] {
        assert_eq!(untimed(&r1["details"][k]), untimed(&r2["details"][k]), "{k}");
    }
    let records = std::fs::read_dir(&two).unwrap().filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "json")).count();
    assert_eq!(records, 1, "one record for the job");
    // One chunk for the whole bank: rank 1 holds none and sends only padding; the same numbers.
    let one_chunk = dir.path().join("one-chunk");
    let mut a = args(&one_chunk);
    *a.last_mut().unwrap() = "knn_chunk=1000000".into();
    run_world(&a, 2);
    let r3 = record(&one_chunk);
    assert_eq!(r3["details"]["knn"]["fit"]["search"]["chunks"].as_u64(), Some(1), "{}", r3["details"]["knn"]["fit"]["search"]);
    assert_eq!(r1["metrics"], r3["metrics"]);
}
