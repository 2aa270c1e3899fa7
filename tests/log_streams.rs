//! The log streams never end a run: a pretraining whose stderr (and stdout, as with `2>&1 | head -1`) is a pipe
//! nobody reads any more completes and writes its checkpoints; messages on a pipe still arrive whole. A metrics
//! line cut short by a full disk or a kill is dropped when the log is opened again, so the next line is never
//! glued to it.
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};

use assert_cmd::cargo::CommandCargoExt;
use lmim_bench::checkpoint;
use lmim_bench::results::MetricsLog;

fn bin() -> Command {
    let mut c = Command::cargo_bin("lmim-bench").unwrap();
    c.env("OMP_NUM_THREADS", "1");
    c
}

/// The write end of a pipe whose read end is already closed: every write to it is EPIPE (and SIGPIPE).
fn broken_pipe() -> OwnedFd {
    let mut fds = [0i32; 2];
    // SAFETY: pipe(2) fills two new descriptors, which we own from here on.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read);
    write
}

fn synth(dir: &Path) -> std::path::PathBuf {
    let data = dir.join("synth");
    let st = bin()
        .args(["data", "synth", "--out", data.to_str().unwrap(), "--classes", "2", "--train-per-class", "16", "--val-per-class", "4", "--size", "40"])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    // An unreadable image: the loader warns about it on stderr mid-run.
    std::fs::write(data.join("train/class_000/zz-broken.png"), b"not a png").unwrap();
    data
}

fn pretrain(data: &Path, out: &Path) -> Command {
    let mut c = bin();
    // Not quiet: the start line, loader warnings and the final line all go to stderr.
    c.args(["pretrain", "--no-tensorboard", "-c", concat!(env!("CARGO_MANIFEST_DIR"), "/configs/lmim_tiny.toml")])
        .args(["--data", data.to_str().unwrap(), "-o", out.to_str().unwrap()])
        .args(["--set", "epochs=1", "--set", "batch_size=8", "--set", "micro_batch_size=8", "--set", "nn_every=0", "--set", "device=\"cpu\""])
        .stdin(Stdio::null());
    c
}

#[test]
fn a_closed_stderr_pipe_does_not_end_training() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path());
    assert!(std::fs::read_dir(data.join("train/class_000")).unwrap().count() > 1);
    let out = dir.path().join("run");
    let pipe = broken_pipe();
    let st = pretrain(&data, &out).stdout(Stdio::from(pipe.try_clone().unwrap())).stderr(Stdio::from(pipe)).status().unwrap();
    assert_eq!(st.code(), Some(0), "{st}");
    checkpoint::load(&out.join("encoder.safetensors")).unwrap();
    let ckpts: Vec<_> = std::fs::read_dir(out.join("checkpoints")).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "safetensors")).collect();
    assert!(!ckpts.is_empty());
    for c in &ckpts {
        checkpoint::load(c).unwrap();
    }

    // Through a pipe that is read, every message still arrives, in order, the last one included.
    let res = pretrain(&data, &dir.path().join("run2")).output().unwrap();
    assert!(res.status.success());
    let err = String::from_utf8_lossy(&res.stderr);
    let (start, skipped, done) = (err.find("pretraining vit_pico"), err.find("zz-broken.png"), err.rfind("done: "));
    assert!(start.is_some() && skipped.is_some() && done.is_some() && start < done, "{err}");
    assert!(err.ends_with('\n'), "{err}");
}

#[test]
fn an_error_after_a_closed_stderr_still_exits_with_its_code() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = broken_pipe();
    let st = bin().args(["pretrain", "--set", "epochs=-3", "-o"]).arg(dir.path().join("run")).stderr(Stdio::from(pipe)).status().unwrap();
    assert_eq!(st.code(), Some(2));
}

#[test]
fn a_torn_metrics_line_is_dropped_on_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metrics.jsonl");
    for (before, kept) in [
        (&b"{\"step\":1,\"loss\":2.5}\n{\"step\":2,\"lo"[..], 1),
        (&b"{\"step\":1,\"l"[..], 0),
        (&b"{\"step\":1,\"loss\":2.5}\n"[..], 1),
        (&b""[..], 0),
    ] {
        std::fs::write(&path, before).unwrap();
        {
            let mut log = MetricsLog::open(dir.path(), "metrics.jsonl", false).unwrap();
            log.log(&serde_json::json!({"step": 3, "loss": 1.5})).unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}\n{text}"))).collect();
        assert_eq!(lines.len(), kept + 1, "{text}");
        assert_eq!(lines.last().unwrap()["step"], 3);
        assert!(text.ends_with('\n'));
        if kept == 1 {
            assert_eq!(lines[0]["loss"], 2.5, "the whole line before the torn one stays");
        }
    }
}
