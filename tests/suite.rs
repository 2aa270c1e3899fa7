//! `lmim-bench suite` end to end on generated data: one record per entry and the table row; run again, every
//! entry kept (no extraction); interrupted by SIGTERM after the first record and run again, the records of an
//! uninterrupted run; a suite whose DAVIS root is missing is refused before any work; an entry that fails at run
//! time leaves the others complete and the suite exits 1 naming it.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use assert_cmd::cargo::CommandCargoExt;
use lmim_bench::results::RunRecord;

fn bin() -> Command {
    let mut c = Command::cargo_bin("lmim-bench").unwrap();
    c.env("OMP_NUM_THREADS", "1");
    c
}

fn ok(c: &mut Command) -> std::process::Output {
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    ckpt: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    ok(bin().args(["data", "synth", "--classes", "4", "--train-per-class", "12", "--val-per-class", "6", "--size", "40", "--out"]).arg(root.join("img")));
    ok(bin().args(["data", "synth-davis", "--sequences", "2", "--frames", "5", "--out"]).arg(root.join("davis")));
    let ckpt = root.join("pico.safetensors");
    ok(bin().args(["init", "-c", concat!(env!("CARGO_MANIFEST_DIR"), "/configs/lmim_tiny.toml"), "-o"]).arg(&ckpt));
    Fixture { _dir: dir, root, ckpt }
}

const SUITE: &str = r#"
name = "test"
[data]
img = "img"
davis = "davis"

[[eval]]
protocol = "knn"
data = "img"
set = { ks = [5, 10], headline_k = 10 }

[[eval]]
protocol = "davis"
data = "davis"
set = { short_side = 64 }

[[eval]]
protocol = "lowshot"
label = "2img"
data = "img"
set = { shots = 2, draws = 2 }

[[eval]]
protocol = "nn-loo"
data = "img"

[[eval]]
protocol = "knn"
label = "k5"
data = "img"
set = { ks = [5], headline_k = 5 }

[[eval]]
protocol = "linear"
data = "img"
set = { epochs = 12, warmup_epochs = 1, batch_size = 16, micro_batch_size = 16, eval_every = 4 }
"#;

fn write_suite(f: &Fixture, name: &str, text: &str) -> PathBuf {
    let p = f.root.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn suite_cmd(f: &Fixture, suite: &Path, out: &Path) -> Command {
    let mut c = bin();
    c.arg("suite").arg(suite).arg("--checkpoint").arg(&f.ckpt).args(["--name", "pico", "--device", "cpu", "--workers", "2", "--quiet", "--output"]).arg(out).arg("--cache-dir").arg(f.root.join("cache"));
    c
}

fn records(out: &Path) -> Vec<RunRecord> {
    let mut v: Vec<RunRecord> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| RunRecord::read(&p).unwrap())
        .collect();
    v.sort_by(|a, b| (a.protocol.as_str(), a.protocol_version.as_str()).cmp(&(b.protocol.as_str(), b.protocol_version.as_str())));
    v
}

/// What must be equal between two runs of one entry: protocol, version, metrics, the entry's key.
fn essence(r: &RunRecord) -> (String, String, String, Option<String>) {
    (r.protocol.clone(), r.protocol_version.clone(), serde_json::to_string(&r.metrics).unwrap(), r.config.pointer("/run/suite_entry").and_then(|v| v.as_str()).map(String::from))
}

#[test]
fn a_suite_runs_every_entry_once_keeps_them_on_a_second_run_and_resumes_after_sigterm() {
    let f = fixture();
    let suite = write_suite(&f, "suite.toml", SUITE);
    let out = f.root.join("runs");
    let first = ok(&mut suite_cmd(&f, &suite, &out));
    let stdout = String::from_utf8_lossy(&first.stdout);
    let stderr = String::from_utf8_lossy(&first.stderr);
    let recs = records(&out);
    assert_eq!(recs.iter().map(|r| r.protocol.as_str()).collect::<Vec<_>>(), ["davis", "knn", "knn", "linear", "lowshot", "nn-loo"], "one record per entry");
    assert!(recs.iter().all(|r| r.model_name == "pico" && r.config.pointer("/run/suite_entry").is_some()));
    // Cheap first: the cached-feature protocols, then DAVIS.
    let order: Vec<usize> = ["] nn-loo on", "] knn on", "] knn:k5 on", "] lowshot:2img on", "] davis on", "] linear on"].iter().map(|s| stderr.find(s).unwrap_or_else(|| panic!("{s} in {stderr}"))).collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{stderr}");
    // The second k-NN entry reads the features the first extracted: one extraction per (checkpoint, split,
    // transform, feature).
    assert!(stderr.contains("knn:k5: ") && stderr.contains("features read from the cache (2 split(s))"), "{stderr}");
    for col in ["NN (LOO 1-NN)", "k-NN", "DAVIS J&F", "2 img"] {
        assert!(stdout.contains(col), "the table has {col}: {stdout}");
    }
    assert!(stdout.contains("6 ran, 0 kept, 0 failed"), "{stdout}");

    // Again: every entry kept, nothing extracted, no new record.
    let second = ok(&mut suite_cmd(&f, &suite, &out));
    let stderr2 = String::from_utf8_lossy(&second.stderr);
    assert_eq!(stderr2.matches(": kept (").count(), 6, "{stderr2}");
    assert!(!stderr2.contains("extracted"), "{stderr2}");
    assert_eq!(records(&out).len(), 6);
    assert!(String::from_utf8_lossy(&second.stdout).contains("0 ran, 6 kept"));
    // --rerun runs them again.
    let only = ok(suite_cmd(&f, &suite, &out).args(["--rerun", "--only", "knn:k5"]));
    assert!(String::from_utf8_lossy(&only.stdout).contains("1 ran, 0 kept"));

    // SIGTERM once the first record is there, then the same command: the records of an uninterrupted run (the
    // linear probe, stopped mid-training, resumes from its own checkpoint).
    let out2 = f.root.join("runs2");
    let mut child = suite_cmd(&f, &suite, &out2).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while records_now(&out2) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let partial = records(&out2).len();
    assert!(!status.success() && (1..6).contains(&partial), "{status:?} with {partial} records after SIGTERM");
    let resumed = ok(&mut suite_cmd(&f, &suite, &out2));
    assert!(String::from_utf8_lossy(&resumed.stdout).contains(&format!("{} ran, {partial} kept", 6 - partial)));
    let skip_rerun = |r: &&RunRecord| !(r.protocol == "knn" && r.protocol_version.contains("headline_k=5"));
    let (a, b): (Vec<_>, Vec<_>) = (records(&out).iter().filter(skip_rerun).map(essence).collect(), records(&out2).iter().filter(skip_rerun).map(essence).collect());
    assert_eq!(a, b, "resumed suite = uninterrupted suite");
    assert_eq!(records(&out2).len(), 6, "one record per entry, never two");
}

fn records_now(out: &Path) -> usize {
    std::fs::read_dir(out).map_or(0, |d| d.filter(|e| e.as_ref().is_ok_and(|e| e.path().extension().is_some_and(|x| x == "json"))).count())
}

#[test]
fn a_bad_suite_is_refused_before_any_work_and_a_failing_entry_does_not_stop_the_others() {
    let f = fixture();
    let out = f.root.join("runs");
    // A missing DAVIS root: exit 2 naming the entry and the folder, nothing written.
    let bad = write_suite(&f, "bad.toml", &SUITE.replace("davis = \"davis\"", "davis = \"no-such-davis\""));
    let o = suite_cmd(&f, &bad, &out).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("entry 2 (davis)") && e.contains("no-such-davis"), "{e}");
    assert_eq!(records_now(&out), 0, "nothing run");
    // An unknown key of a protocol: named with its entry.
    let bad = write_suite(&f, "bad2.toml", &SUITE.replace("headline_k = 10", "headline_kk = 10"));
    let o = suite_cmd(&f, &bad, &out).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("entry 1 (knn)") && e.contains("headline_kk"), "{e}");
    // An unknown suite key.
    let bad = write_suite(&f, "bad3.toml", &format!("{SUITE}\n[[eval]]\nprotocol = \"knn\"\ndata = \"img\"\nlabel = \"x\"\nsett = {{ ks = [5] }}\n"));
    let o = suite_cmd(&f, &bad, &out).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("sett"));
    assert_eq!(records_now(&out), 0, "nothing run");

    // An entry that fails at run time (a subset list naming an image the train split does not have): the others
    // complete, exit 1 naming it.
    std::fs::write(f.root.join("subset.txt"), "no_such_image.png\n").unwrap();
    let failing = write_suite(&f, "failing.toml", &SUITE.replace("set = { shots = 2, draws = 2 }", "subset = [\"subset.txt\"]"));
    let o = suite_cmd(&f, &failing, &out).output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("FAILED entry 3 (lowshot:2img)") && stdout.contains("5 ran, 0 kept, 1 failed"), "{stdout}");
    assert_eq!(records(&out).iter().map(|r| r.protocol.as_str()).collect::<Vec<_>>(), ["davis", "knn", "knn", "linear", "nn-loo"]);
}
