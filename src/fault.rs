//! Faults injected on purpose (`LMIM_FAULT`), at points of the work that the layers above name: for the tests and
//! for users rehearsing a cluster. The lowest layer, so that data, train and dist can all call it.
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use crate::error::{Error, Result};

static RANK: AtomicI64 = AtomicI64::new(0);
static DEVICE: std::sync::Mutex<Option<tch::Device>> = std::sync::Mutex::new(None);

/// The device the `assert` fault runs its kernel on (the run's own; the CPU when unset).
pub fn set_device(device: tch::Device) {
    *DEVICE.lock().unwrap_or_else(|e| e.into_inner()) = Some(device);
}

/// This process's rank in its job, for the injected panic's message (set by `dist` when the world is known).
pub fn set_rank(rank: i64) {
    RANK.store(rank, Ordering::Relaxed);
}

/// A fault injected into this process at a point of its work, for rehearsing what a job does when a rank fails
/// (the tests do; so can a user on a new cluster): `LMIM_FAULT=step=N:KIND` acts right after optimiser step N of
/// pretraining, in rank-local code between collectives. KIND: `panic` (a bug or a tch unwrap, e.g. CUDA out of
/// memory), `error` (an ordinary error), `die` (SIGKILL: no message, nothing told), `stop` (SIGSTOP: every thread
/// stopped, heartbeat included), `assert` (an index out of range in a kernel on the run's device: on a GPU a
/// device-side assert, which poisons the CUDA context, surfacing as a panic at the next synchronisation), `hang`
/// (stuck for 10 minutes,
/// as in a kernel that never ends), `slow=S` (S seconds of delay, as a slow file system). `LMIM_FAULT=checkpoint=N:KIND`
/// acts on rank 0 before it writes the checkpoint of step N. Set it on one rank only (`env LMIM_FAULT=...
/// lmim-bench` in that task). `LMIM_FAULT=pack=1:KIND` acts in `data pack` after the split took its final name;
/// `LMIM_FAULT=scan=1:KIND` on rank 0 before its dataset scan; `LMIM_FAULT=cache=1:KIND` on rank 0 before it reads
/// a feature-cache file; `LMIM_FAULT=init=1:KIND` on the rank where it is set, after the rendezvous and before the
/// process group is made. A malformed value is refused.
pub fn fault_point(place: &str, n: i64) -> Result<()> {
    static FAULT: OnceLock<std::result::Result<Option<(String, i64, String)>, String>> = OnceLock::new();
    let fault = FAULT.get_or_init(|| {
        let Some(v) = std::env::var("LMIM_FAULT").ok().filter(|v| !v.is_empty()) else { return Ok(None) };
        let bad = || format!("`{v}` is not PLACE=N:KIND (e.g. step=3:panic)");
        let (at, kind) = v.split_once(':').ok_or_else(bad)?;
        let (p, k) = at.split_once('=').ok_or_else(bad)?;
        let n = k.trim().parse().map_err(|_| bad())?;
        if !["step", "checkpoint", "pack", "scan", "cache", "init"].contains(&p) {
            return Err(format!("`{p}` is not a fault point (step, checkpoint, pack, scan, cache, init)"));
        }
        if !matches!(kind, "panic" | "error" | "die" | "stop" | "hang" | "assert") && kind.strip_prefix("slow=").is_none_or(|s| s.parse::<u64>().is_err()) {
            return Err(format!("`{kind}` is not a fault (panic, error, die, stop, hang, assert, slow=S)"));
        }
        Ok(Some((p.to_string(), n, kind.to_string())))
    });
    let fault = fault.as_ref().map_err(|e| Error::option("LMIM_FAULT", e.clone()))?;
    let Some((p, k, kind)) = fault else { return Ok(()) };
    if p != place || *k != n {
        return Ok(());
    }
    let rank = RANK.load(Ordering::Relaxed);
    match kind.as_str() {
        "panic" => panic!("LMIM_FAULT: injected panic after {place} {n} on rank {rank}"),
        "error" => Err(Error::Dist(format!("LMIM_FAULT: injected error after {place} {n}"))),
        "die" => {
            // SAFETY: raise only sends a signal to this process.
            unsafe { libc::raise(libc::SIGKILL) };
            Ok(())
        }
        "stop" => {
            // SAFETY: raise only sends a signal to this process: stopped as by SIGSTOP, every thread at once.
            unsafe { libc::raise(libc::SIGSTOP) };
            Ok(())
        }
        "assert" => {
            let device = DEVICE.lock().unwrap_or_else(|e| e.into_inner()).unwrap_or(tch::Device::Cpu);
            let t = tch::Tensor::zeros([4], (tch::Kind::Float, device));
            let bad = tch::Tensor::from_slice(&[1i64 << 40]).to_device(device);
            // Read back, so that an asynchronous device error surfaces here, in this rank's main thread.
            let v = t.index_select(0, &bad).sum(tch::Kind::Double).double_value(&[]);
            Err(Error::Dist(format!("LMIM_FAULT: the out-of-range index after {place} {n} read {v} on {device:?} without an error")))
        }
        "hang" => {
            std::thread::sleep(Duration::from_secs(600));
            Ok(())
        }
        slow if slow.starts_with("slow=") => {
            let secs: u64 = slow[5..].parse().map_err(|_| Error::option("LMIM_FAULT", format!("`{slow}`: slow=SECONDS")))?;
            std::thread::sleep(Duration::from_secs(secs));
            Ok(())
        }
        other => Err(Error::option("LMIM_FAULT", format!("`{other}` is not a fault (panic, error, die, stop, hang, assert, slow=S)"))),
    }
}
