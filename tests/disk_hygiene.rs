//! What a long run leaves on disk: temporary files of killed writers are cleaned, concurrent writers of results
//! lose nothing, a CSV table torn by a full disk is repaired, a second run cannot write into a locked folder, and
//! the same checkpoint saved twice has the same bytes.
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use lmim_bench::checkpoint;
use lmim_bench::fsutil::{self, clean_stale_temps, RunLock};
use lmim_bench::results::RunRecord;
use lmim_bench::Error;
use tch::{Kind, Tensor};

fn touch(path: &Path) {
    std::fs::write(path, b"partial").unwrap();
}

#[test]
fn stale_temps_of_dead_processes_are_removed_live_ones_kept() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A process that has exited (and been reaped) and one that is running.
    let dead = Command::new("true").spawn().unwrap();
    let dead_pid = dead.id();
    let mut dead = dead;
    dead.wait().unwrap();
    let mut live = Command::new("sleep").arg("60").spawn().unwrap();
    let live_pid = live.id();

    let stale = [d.join(format!("ckpt-100.safetensors.tmp-{dead_pid}")), d.join(format!("rec.json.tmp-{dead_pid}-3"))];
    let kept = [
        d.join(format!("ckpt-200.safetensors.tmp-{live_pid}")),
        d.join(format!("rec.json.tmp-{}", std::process::id())),
        d.join("ckpt-100.safetensors"),
        d.join("notes.tmp-abc"),
    ];
    for p in stale.iter().chain(&kept) {
        touch(p);
    }
    std::fs::create_dir(d.join(format!("folder.tmp-{dead_pid}"))).unwrap();

    let removed = clean_stale_temps(d).unwrap();
    let _ = live.kill();
    let _ = live.wait();

    let mut expected = stale.to_vec();
    expected.sort();
    assert_eq!(removed, expected);
    for p in &stale {
        assert!(!p.exists(), "{} should be gone", p.display());
    }
    for p in &kept {
        assert!(p.exists(), "{} should be kept", p.display());
    }
    assert!(d.join(format!("folder.tmp-{dead_pid}")).is_dir(), "only files are removed");
    // A folder that does not exist has nothing to clean.
    assert!(clean_stale_temps(&d.join("missing")).unwrap().is_empty());
}

#[test]
fn write_atomic_leaves_only_the_final_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/model.safetensors");
    fsutil::write_atomic(&path, b"first").unwrap();
    checkpoint::write_atomic(&path, b"second").unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"second");
    let names: Vec<String> = std::fs::read_dir(path.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(names, ["model.safetensors"]);
}

fn record(seed: u64) -> RunRecord {
    let mut rec = RunRecord::new("knn", "1", "top1");
    rec.model_name = "vit_pico".into();
    // Every record has the same start time: only the writer can keep their names apart.
    rec.started_at = "2025-01-02T03:04:05.678Z".into();
    rec.seed = seed;
    rec.metrics.insert("top1".into(), seed as f64);
    rec
}

fn csv_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap().lines().map(str::to_string).collect()
}

#[test]
fn concurrent_writers_lose_no_record() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("runs");
    std::thread::scope(|s| {
        for w in 0..4u64 {
            let out = &out;
            s.spawn(move || {
                for i in 0..25u64 {
                    record(w * 25 + i).write(out).unwrap();
                }
            });
        }
    });

    let mut seeds = BTreeSet::new();
    let mut json_files = 0;
    for e in std::fs::read_dir(&out).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        assert!(!name.contains(".tmp-"), "temporary file left: {name}");
        if name.ends_with(".json") {
            json_files += 1;
            seeds.insert(RunRecord::read(&p).unwrap().seed);
        }
    }
    assert_eq!(json_files, 100);
    assert_eq!(seeds, (0..100).collect::<BTreeSet<_>>(), "records overwrote each other");

    let lines = csv_lines(&out.join("results.csv"));
    assert_eq!(lines.len(), 101, "one header and 100 rows");
    assert!(lines[0].starts_with("started_at,model,protocol"), "{}", lines[0]);
    assert_eq!(lines.iter().filter(|l| l.starts_with("started_at,")).count(), 1, "the header is written once");
    let mut csv_seeds = BTreeSet::new();
    for l in &lines[1..] {
        let fields: Vec<&str> = l.split(',').collect();
        assert_eq!(fields.len(), 14, "interleaved or torn row: {l}");
        csv_seeds.insert(fields[11].parse::<u64>().unwrap());
    }
    assert_eq!(csv_seeds, (0..100).collect::<BTreeSet<_>>());
}

#[test]
fn a_partial_last_line_is_cut_back_to_the_last_whole_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    record(0).write(out).unwrap();
    let csv = out.join("results.csv");
    // A full disk cut the next row short.
    let mut text = std::fs::read_to_string(&csv).unwrap();
    text.push_str("2025-01-02T03:04:05.678Z,vit_pi");
    std::fs::write(&csv, &text).unwrap();

    record(1).write(out).unwrap();
    let lines = csv_lines(&csv);
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(!lines.iter().any(|l| l.ends_with(",vit_pi")), "the torn row is gone: {lines:?}");
    assert_eq!(lines[2].split(',').count(), 14, "{}", lines[2]);
    assert_eq!(lines[2].split(',').nth(11), Some("1"));
    // The project's own reader (`table`, `plot --results`) takes the repaired file.
    let seeds: Vec<u64> = lmim_bench::results::read_csv(&csv).unwrap().iter().map(|r| r.seed).collect();
    assert_eq!(seeds, [0, 1]);

    // A header torn before its newline is replaced by a whole one.
    std::fs::write(&csv, "started_at,mod").unwrap();
    record(2).write(out).unwrap();
    let lines = csv_lines(&csv);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0].starts_with("started_at,model,protocol,") && lines[0].ends_with(",duration_s"), "{}", lines[0]);
    assert_eq!(lines[1].split(',').nth(11), Some("2"));
}

#[test]
fn a_second_run_cannot_lock_a_busy_folder() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run-a");
    let lock = RunLock::acquire(&run).unwrap();
    assert_eq!(lock.path(), run.join(".lock"));
    assert_eq!(std::fs::read_to_string(run.join(".lock")).unwrap().trim(), std::process::id().to_string());

    let err = RunLock::acquire(&run).unwrap_err();
    assert!(matches!(err, Error::FolderBusy { pid: Some(p), .. } if p == std::process::id()), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(run.to_str().unwrap()), "the error must name the folder: {msg}");
    assert!(msg.contains(&format!("PID {}", std::process::id())), "the error must name the other run: {msg}");
    assert_eq!(err.exit_code(), 2);

    // Another folder is free, and the folder is free again once the first run is done.
    let other = RunLock::acquire(&dir.path().join("run-b")).unwrap();
    drop(lock);
    let again = RunLock::acquire(&run).unwrap();
    drop((again, other));
}

#[test]
fn the_same_checkpoint_saved_twice_has_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    tch::manual_seed(0);
    let tensors = vec![
        ("blocks.0.attn.qkv.weight".to_string(), Tensor::randn([12, 4], (Kind::Float, tch::Device::Cpu))),
        ("cls_token".to_string(), Tensor::randn([1, 1, 4], (Kind::Float, tch::Device::Cpu))),
        ("step".to_string(), Tensor::from_slice(&[7i64])),
        ("half".to_string(), Tensor::randn([3], (Kind::Half, tch::Device::Cpu))),
        ("flag".to_string(), Tensor::from_slice(&[true, false])),
    ];
    // Enough keys that a HashMap's order would differ between two saves.
    let meta: BTreeMap<String, String> =
        (0..16).map(|i| (format!("key{i}"), format!("value \"{i}\"\n"))).chain([("format".into(), "lmim-bench".into())]).collect();
    let (a, b) = (dir.path().join("a.safetensors"), dir.path().join("b.safetensors"));
    checkpoint::save(&a, &tensors, &meta).unwrap();
    checkpoint::save(&b, &tensors, &meta).unwrap();
    assert_eq!(checkpoint::sha256_file(&a).unwrap(), checkpoint::sha256_file(&b).unwrap());

    // And it is a valid safetensors file: for this crate and for the reference implementation in Python.
    let back = checkpoint::load(&a).unwrap();
    assert_eq!(back.metadata, meta);
    for (name, t) in &tensors {
        assert!(back.get(name).unwrap().equal(t), "{name}");
    }
    let check = format!(
        "from safetensors import safe_open\n\
         f = safe_open({a:?}, 'np')\n\
         assert sorted(f.keys()) == {names:?}, f.keys()\n\
         assert f.metadata()['key3'] == 'value \"3\"\\n'\n\
         assert f.get_tensor('step').tolist() == [7]\n",
        a = a.to_str().unwrap(),
        names = { let mut n: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect(); n.sort(); n },
    );
    let out = Command::new(common::python()).args(["-c", &check]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
