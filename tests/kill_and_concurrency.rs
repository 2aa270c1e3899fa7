//! Real processes, real signals: a pretraining killed with SIGKILL at seeded random moments and rerun each time
//! ends with the weights of an uninterrupted run, no temporary files and only loadable checkpoints; four `eval`
//! processes writing into one results folder at once leave four records and a well-formed CSV; a second
//! `pretrain` into a busy run folder is refused while the first completes.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use assert_cmd::cargo::CommandCargoExt;
use lmim_bench::checkpoint;
use rand::{Rng, SeedableRng};

/// The tests of this file, one at a time: the SIGKILL test times its kills from an uninterrupted run, which a
/// concurrent pack or eval would slow down and its reruns would then outrun.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn bin() -> Command {
    let mut c = Command::cargo_bin("lmim-bench").unwrap();
    c.env("OMP_NUM_THREADS", "1");
    c
}

fn synth(dir: &Path, per_class: &str) -> PathBuf {
    let data = dir.join("synth");
    let st = bin()
        .args(["data", "synth", "--out", data.to_str().unwrap(), "--classes", "4", "--train-per-class", per_class, "--val-per-class", "8", "--size", "40"])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    data
}

fn pretrain_cmd(data: &Path, out: &Path, epochs: usize) -> Command {
    let mut c = bin();
    c.args(["pretrain", "-q", "--no-tensorboard", "-c", concat!(env!("CARGO_MANIFEST_DIR"), "/configs/lmim_tiny.toml")])
        .args(["--data", data.to_str().unwrap(), "-o", out.to_str().unwrap()])
        .args(["--set", &format!("epochs={epochs}"), "--set", "batch_size=8", "--set", "micro_batch_size=8", "--set", "checkpoint_every=1"])
        .args(["--set", "keep_last=3", "--set", "num_workers=1", "--set", "nn_every=0", "--set", "device=\"cpu\""])
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    c
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else { return out };
    for e in rd {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

fn is_temp(p: &Path) -> bool {
    p.file_name().unwrap().to_string_lossy().contains(".tmp-")
}

fn newest_checkpoint(run: &Path) -> PathBuf {
    let mut v: Vec<PathBuf> = std::fs::read_dir(run.join("checkpoints")).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "safetensors")).collect();
    v.sort();
    v.pop().expect("a checkpoint")
}

fn assert_same_tensors(a: &Path, b: &Path) {
    let (ta, tb) = (checkpoint::load(a).unwrap().tensors, checkpoint::load(b).unwrap().tensors);
    assert_eq!(ta.len(), tb.len());
    for ((na, xa), (nb, xb)) in ta.iter().zip(&tb) {
        assert_eq!(na, nb);
        assert!(xa.equal(xb), "{na} differs between {} and {}", a.display(), b.display());
    }
}

#[test]
fn sigkill_at_random_moments_then_rerun_equals_an_uninterrupted_run() {
    let _one_at_a_time = serial();
    let dir = tempfile::tempdir().unwrap();
    // 16 steps, so that most of a run is training, not process start-up.
    let data = synth(dir.path(), "16");
    let epochs = 2;
    let full = dir.path().join("full");
    let t0 = Instant::now();
    let st = pretrain_cmd(&data, &full, epochs).stderr(Stdio::null()).status().unwrap();
    assert!(st.success());
    let t_full = t0.elapsed();

    let run = dir.path().join("killed");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(18);
    let mut delivered = 0;
    for k in 0..5 {
        let mut child = pretrain_cmd(&data, &run, epochs).stderr(Stdio::null()).spawn().unwrap();
        let started = Instant::now();
        // Kills 0-3 anywhere from process start-up (libtorch loading, resume) to late in training; kill 4
        // a random moment after the run's first new checkpoint, so that the last rerun has progress to resume.
        let at = t_full.mul_f64(rng.gen_range(0.15..0.95));
        if k == 4 {
            let before = files(&run.join("checkpoints"));
            while files(&run.join("checkpoints")).iter().all(|f| is_temp(f) || before.contains(f)) && child.try_wait().unwrap().is_none() {
                assert!(started.elapsed() < Duration::from_secs(120), "no checkpoint within 120 s");
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        let from = Instant::now();
        let at = if k == 4 { at.mul_f64(0.3) } else { at };
        while from.elapsed() < at && child.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(2));
        }
        if child.try_wait().unwrap().is_none() {
            // SAFETY: signals our own child, which has not been reaped yet.
            unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
            delivered += 1;
        }
        let st = child.wait().unwrap();
        eprintln!("kill {k} at {at:?}: {st}");
        for f in files(&run) {
            if f.extension().is_some_and(|e| e == "safetensors") {
                checkpoint::load(&f).unwrap_or_else(|e| panic!("after kill {k}: {} does not load: {e}", f.display()));
            }
        }
    }
    assert!(delivered >= 4, "only {delivered} of 5 kills hit a running process");
    assert!(run.join("checkpoints").is_dir() && newest_checkpoint(&run).exists(), "the killed runs left a checkpoint");

    // A metrics line cut short (a full disk at the moment of the kill) must not break the file for `plot`.
    let metrics = run.join("metrics.jsonl");
    let mut m = std::fs::read(&metrics).unwrap_or_default();
    m.extend_from_slice(b"{\"step\": 99999, \"lo");
    std::fs::write(&metrics, &m).unwrap();

    let out = pretrain_cmd(&data, &run, epochs).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("resuming from"), "the last run resumed: {err}");

    let left: Vec<PathBuf> = files(&run).into_iter().filter(|p| is_temp(p)).collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
    for f in files(&run) {
        if f.extension().is_some_and(|e| e == "safetensors") {
            checkpoint::load(&f).unwrap_or_else(|e| panic!("{} does not load: {e}", f.display()));
        }
    }
    // Resume is exact on the CPU: the same weights, optimizer state and EMA target as without the kills.
    assert_eq!(newest_checkpoint(&full).file_name(), newest_checkpoint(&run).file_name());
    assert_same_tensors(&newest_checkpoint(&full), &newest_checkpoint(&run));
    assert_same_tensors(&full.join("encoder.safetensors"), &run.join("encoder.safetensors"));

    let text = std::fs::read_to_string(&metrics).unwrap();
    assert!(text.ends_with('\n') && !text.contains("99999"), "the torn line was dropped");
    for (i, line) in text.lines().enumerate() {
        assert!(serde_json::from_str::<serde_json::Value>(line).is_ok_and(|v| v.is_object()), "metrics line {}: {line}", i + 1);
    }
    eprintln!("uninterrupted run {t_full:?}, {delivered} kills, whole test {:?}", t0.elapsed());

    // SIGINT, then SIGTERM, each after a new checkpoint of the run: a clean stop after the current step with a
    // checkpoint there, one line saying how to resume, exit 130 / 143, no temporary file; the run resumed after
    // both ends with the bytes of the uninterrupted one.
    let run = dir.path().join("signalled");
    for (sig, code) in [(libc::SIGINT, 130), (libc::SIGTERM, 143)] {
        let before = files(&run.join("checkpoints"));
        let mut child = pretrain_cmd(&data, &run, epochs).stderr(Stdio::piped()).spawn().unwrap();
        let started = Instant::now();
        while files(&run.join("checkpoints")).iter().all(|f| is_temp(f) || before.contains(f)) && child.try_wait().unwrap().is_none() {
            assert!(started.elapsed() < Duration::from_secs(120), "no checkpoint within 120 s");
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(child.try_wait().unwrap().is_none(), "the run ended before signal {sig}");
        // SAFETY: signals our own child, which has not been reaped yet.
        unsafe { libc::kill(child.id() as i32, sig) };
        let signalled = Instant::now();
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "signal {sig}: {err}");
        assert!(signalled.elapsed() < Duration::from_secs(30), "stopping took {:?}", signalled.elapsed());
        assert!(err.contains("run the same command again to resume"), "{err}");
        assert!(!err.contains("error:"), "a requested stop is not an error: {err}");
        let left: Vec<PathBuf> = files(&run).into_iter().filter(|p| is_temp(p)).collect();
        assert!(left.is_empty(), "temporary files left after signal {sig}: {left:?}");
        let named = newest_checkpoint(&run);
        assert!(err.contains(named.to_str().unwrap()), "the line names the checkpoint written at the stop, {}: {err}", named.display());
        checkpoint::load(&named).unwrap();
    }
    let out = pretrain_cmd(&data, &run, epochs).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_same_tensors(&newest_checkpoint(&full), &newest_checkpoint(&run));
    assert_same_tensors(&full.join("encoder.safetensors"), &run.join("encoder.safetensors"));
}

#[test]
fn four_concurrent_evals_into_one_results_folder() {
    let _one_at_a_time = serial();
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path(), "8");
    let ckpt = dir.path().join("enc.safetensors");
    let st = bin().args(["init", "-c", concat!(env!("CARGO_MANIFEST_DIR"), "/configs/lmim_tiny.toml"), "-o"]).arg(&ckpt).stderr(Stdio::null()).status().unwrap();
    assert!(st.success());
    let results = dir.path().join("results");
    let temps = ["0.03", "0.05", "0.07", "0.1"];
    let children: Vec<_> = temps
        .iter()
        .map(|t| {
            bin()
                .args(["eval", "--protocol", "knn", "--device", "cpu", "--quiet", "--no-tensorboard", "--k", "3", "--headline-k", "3", "--temperature", *t])
                .arg("--checkpoint")
                .arg(&ckpt)
                .arg("--data")
                .arg(&data)
                .arg("--output")
                .arg(&results)
                .arg("--cache-dir")
                .arg(dir.path().join("cache"))
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }

    let all = files(&results);
    assert!(!all.iter().any(|p| is_temp(p)), "temporary files left: {all:?}");
    let records: Vec<serde_json::Value> = all
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap())
        .collect();
    assert_eq!(records.len(), 4, "{all:?}");
    let mut seen: Vec<String> = records.iter().map(|r| r.to_string()).filter_map(|s| temps.iter().find(|t| s.contains(&format!("temperature={t}")) || s.contains(&format!("\"temperature\":{t}"))).map(|t| t.to_string())).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 4, "one record per temperature: {records:?}");

    let text = std::fs::read_to_string(results.join("results.csv")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(text.ends_with('\n'));
    assert_eq!(lines.len(), 5, "one header and four rows:\n{text}");
    assert!(lines[0].starts_with("started_at,"), "{text}");
    assert_eq!(lines.iter().filter(|l| l.starts_with("started_at,")).count(), 1, "the header is written once:\n{text}");
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let width = reader.headers().unwrap().len();
    let rows: Vec<csv::StringRecord> = reader.records().map(|r| r.expect("a well-formed row")).collect();
    assert_eq!(rows.len(), 4);
    assert!(rows.iter().all(|r| r.len() == width && r.get(2) == Some("knn")), "{text}");
}

#[test]
fn a_second_pretrain_into_a_busy_run_folder_is_refused() {
    let _one_at_a_time = serial();
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path(), "8");
    let run = dir.path().join("run");
    let mut first = pretrain_cmd(&data, &run, 2).stderr(Stdio::piped()).spawn().unwrap();
    // The first run holds the folder's lock once its PID is in `.lock`.
    let t0 = Instant::now();
    while std::fs::read_to_string(run.join(".lock")).map_or(true, |s| s.trim() != first.id().to_string()) {
        assert!(first.try_wait().unwrap().is_none(), "the first run ended before the second started");
        assert!(t0.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(10));
    }
    let second = pretrain_cmd(&data, &run, 2).output().unwrap();
    let still_running = first.try_wait().unwrap().is_none();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(still_running, "the first run was still writing when the second was refused");
    assert!(!second.status.success(), "the second run was refused");
    assert_eq!(second.status.code(), Some(2));
    assert!(err.contains(run.to_str().unwrap()) && err.contains("another run"), "{err}");
    assert!(err.contains(&format!("PID {}", first.id())), "{err}");

    let out = first.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    checkpoint::load(&run.join("encoder.safetensors")).unwrap();
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let steps: Vec<i64> = text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_i64()).collect();
    assert!(!steps.is_empty() && steps.windows(2).all(|w| w[0] <= w[1]), "one writer's metrics, in order: {steps:?}");
}

#[test]
fn a_signal_during_a_pack_removes_its_folder_and_a_second_pack_is_refused_up_front() {
    let _one_at_a_time = serial();
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path(), "400");
    let out = dir.path().join("packed");
    let pack = || {
        let mut c = bin();
        c.args(["data", "pack", "--split", "train", "--shard-size", "20KB", "--data"]).arg(&data).arg("--out").arg(&out).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        c
    };
    let temps = || -> Vec<PathBuf> { std::fs::read_dir(&out).map_or(Vec::new(), |r| r.map(|e| e.unwrap().path()).filter(|p| is_temp(p)).collect()) };

    // SIGTERM once the temporary folder holds a shard: it goes, and the message says so.
    let mut child = pack().spawn().unwrap();
    let t0 = Instant::now();
    while !temps().iter().any(|t| t.join("shard-000001.tar").exists()) {
        assert!(child.try_wait().unwrap().is_none(), "the pack ended before the signal");
        assert!(t0.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(1));
    }
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(143), "{err}");
    assert!(err.contains("removed the unfinished") && err.contains("train.tmp-"), "{err}");
    // Only the stop's own lines: no error of a writer that lost its temporary folder to the stop.
    assert!(!err.contains("error:") && !err.contains("No such file"), "{err}");
    assert!(temps().is_empty() && !out.join("train").exists(), "{:?}", temps());

    // A second pack of the same split into the same folder while one runs: refused at once, naming its PID, and
    // leaving nothing of its own.
    let mut first = pack().spawn().unwrap();
    let t0 = Instant::now();
    while std::fs::read_to_string(out.join(".train.pack.lock")).map_or(true, |s| s.trim() != first.id().to_string()) {
        assert!(first.try_wait().unwrap().is_none(), "the first pack ended before the second started");
        assert!(t0.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(1));
    }
    // Held still while the second runs (a pack of this size takes well under a second): the refusal must come
    // from the running pack's lock, not from its finished folder.
    // SAFETY: signals our own child, which has not been reaped yet (here and below).
    unsafe {
        libc::kill(first.id() as i32, libc::SIGSTOP);
    }
    let second = pack().output().unwrap();
    unsafe {
        libc::kill(first.id() as i32, libc::SIGCONT);
    }
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(2), "{err}");
    assert!(err.contains(&format!("PID {}", first.id())) && err.contains("train"), "{err}");
    assert!(temps().len() <= 1, "only the first pack's folder: {:?}", temps());
    let o = first.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(temps().is_empty() && out.join("train/counts.tsv").exists());

    // A signal after the split took its final name (held there by LMIM_FAULT) is success: exit 0, and it says so.
    std::fs::remove_dir_all(out.join("train")).unwrap();
    let mut late = pack().env("LMIM_FAULT", "pack=1:slow=30").spawn().unwrap();
    let t0 = Instant::now();
    while !out.join("train/counts.tsv").exists() {
        assert!(late.try_wait().unwrap().is_none(), "the pack ended before its split was published");
        assert!(t0.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(5));
    }
    unsafe {
        libc::kill(late.id() as i32, libc::SIGTERM);
    }
    let o = late.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(err.contains("SIGTERM after the work was done") && err.contains("is complete"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(25), "the signal ended the wait: {:?}", t0.elapsed());
    assert!(temps().is_empty() && out.join("train/counts.tsv").exists());
}
