//! Data-parallel training on torch.distributed's C++ engine (c10d) through the shim in `csrc/`: one process per
//! device, launched by torchrun, Slurm's `srun` or plain environment variables, exactly as PyTorch jobs are.
//!
//! A process has one [`World`] (like torch.distributed's default group), set up once by [`init`] from the
//! environment; without a launcher it is a world of one and every collective is a no-op, so the training loops
//! have one code path. Collectives go through c10d's `ProcessGroupGloo` on the CPU and `ProcessGroupNCCL` on CUDA.
//!
//! Gradient synchronisation is bucketed asynchronous all-reduce after backward (25 MB buckets, all started before
//! the first is waited for), not c10d's `Reducer`: its constructor is internal API, and tch's autograd gives no
//! per-parameter hook to start a bucket while backward still runs. With accumulation only the last micro-batch of
//! an optimiser step communicates, as DDP's `no_sync`.
pub mod launch;

use std::ffi::{c_char, c_int, c_void, CString};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

pub use launch::{expand_nodelist, local_device, local_world_size, LaunchEnv, Launcher};

use crate::error::{Error, Result};
use crate::ffi::{self, handles};

/// The collective back-end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Gloo,
    Nccl,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        }
    }
}

/// Whether this build can make Gloo groups (it was compiled with gloo's headers, which the torch wheel lacks).
pub fn has_gloo() -> bool {
    unsafe { ffi::lmim_c10d_has_gloo() != 0 }
}

/// How to get Gloo into a build without it: named wherever a run or a test needs it.
pub const GLOO_HOWTO: &str = "install gloo's headers (Debian/Ubuntu: apt-get install libgloo-dev) or set LMIM_GLOO_INCLUDE to a folder holding gloo/, then rebuild (scripts/env.sh)";

/// Whether this build can make NCCL groups (it was compiled with the CUDA and NCCL headers).
pub fn has_nccl() -> bool {
    unsafe { ffi::lmim_c10d_has_nccl() != 0 }
}

/// PyTorch's default timeouts (torch/distributed/constants.py, from c10d's ProcessGroup.hpp and
/// ProcessGroupNCCL.hpp): 30 minutes for Gloo, 10 minutes for NCCL, whose watchdog aborts the process after it.
pub fn default_timeout(backend: Backend) -> Duration {
    match backend {
        Backend::Gloo => Duration::from_secs(30 * 60),
        Backend::Nccl => Duration::from_secs(10 * 60),
    }
}

/// How to set up the world.
#[derive(Debug, Clone, Default)]
pub struct DistOptions {
    /// None: NCCL when the run computes on CUDA, Gloo on the CPU.
    pub backend: Option<Backend>,
    /// How long a rank waits for its peers (rendezvous and every collective) before it fails; None: PyTorch's
    /// default for the back-end ([`default_timeout`]).
    pub timeout: Option<Duration>,
    /// Whether the run computes on CUDA (its `--device`, see [`crate::info::wants_cuda`]): picks the default
    /// back-end and binds the process to its GPU.
    pub cuda: bool,
}

/// A live process group, freed when the last owner drops it (after [`shutdown`] ended it, or at process exit).
struct Group(*mut c_void);

// SAFETY: collectives run under the World's mutex; the other calls (the failure signal through the store and
// abort) are the ones c10d makes from other threads too (its watchdog): TCPStore serialises its client calls.
unsafe impl Send for Group {}
unsafe impl Sync for Group {}

impl Drop for Group {
    fn drop(&mut self) {
        unsafe { ffi::lmim_c10d_free(self.0) }
    }
}

impl Group {
    /// Makes the group's back-end over its store (Gloo's full mesh, or NCCL's communicator on device `dev`).
    fn join(&self, backend: Backend, timeout_ms: i64, dev: c_int) -> std::result::Result<(), String> {
        let name = CString::new(backend.name()).expect("a back-end name has no NUL");
        // SAFETY: a live group and a NUL-terminated name; the shim catches C++ exceptions.
        if unsafe { ffi::lmim_c10d_join(self.0, name.as_ptr(), timeout_ms, dev) } != 0 {
            return Err(ffi::last_error());
        }
        Ok(())
    }

    /// Shuts NCCL's communicators down (a normal end).
    fn shutdown(&self) {
        // SAFETY: a live group; the shim catches C++ exceptions.
        let _ = unsafe { ffi::lmim_c10d_shutdown(self.0) };
    }

    /// Tells the peers that this rank failed with `msg` and aborts the group's communicators.
    fn fail(&self, msg: &str) {
        let msg = CString::new(msg.replace('\0', " ")).expect("NULs replaced");
        // SAFETY: a live group and a NUL-terminated message; the shim catches C++ exceptions.
        let _ = unsafe { ffi::lmim_c10d_fail(self.0, msg.as_ptr()) };
    }

    /// The first failed rank's message when one has failed, None when none has; an error (the store's) when the
    /// store cannot be reached.
    fn peer_failure(&self) -> std::result::Result<Option<String>, String> {
        let mut buf = vec![0u8; 4096];
        let mut found: c_int = 0;
        // SAFETY: `buf` outlives the call and its length is passed; the shim NUL-terminates what it writes.
        let rc = unsafe { ffi::lmim_c10d_peer_failure(self.0, buf.as_mut_ptr() as *mut c_char, buf.len() as c_int, &mut found) };
        if rc != 0 {
            return Err(ffi::last_error());
        }
        if found == 0 {
            return Ok(None);
        }
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        Ok(Some(String::from_utf8_lossy(&buf[..end]).into_owned()))
    }

    /// What ProcessGroupNCCL's watchdog reports (None for Gloo, or when it reports nothing).
    fn backend_error(&self) -> Option<&'static str> {
        // SAFETY: a live group; the shim catches C++ exceptions.
        match unsafe { ffi::lmim_c10d_backend_error(self.0) } {
            1 => Some("a collective did not complete within the timeout"),
            2 => Some("NCCL reported a communicator error"),
            3 => Some("NCCL reported a peer's error"),
            _ => None,
        }
    }

    /// Sets `key` to `value` over the main connection, or the watcher's own (`watch`).
    fn put(&self, key: &str, value: &[u8], watch: bool) -> std::result::Result<(), String> {
        let key = CString::new(key).map_err(|_| format!("store key `{key}` holds a NUL byte"))?;
        // SAFETY: a live group; `value` outlives the call and its length is passed.
        let rc = unsafe { ffi::lmim_c10d_store_put(self.0, key.as_ptr(), value.as_ptr() as *const c_char, value.len() as c_int, watch as c_int) };
        if rc != 0 {
            return Err(ffi::last_error());
        }
        Ok(())
    }

    /// Waits up to `timeout` for `key`, then reads its value (over the main connection).
    fn get(&self, key: &str, timeout: Duration) -> std::result::Result<Vec<u8>, String> {
        let ckey = CString::new(key).map_err(|_| format!("store key `{key}` holds a NUL byte"))?;
        let ms = timeout.as_millis().min(i64::MAX as u128) as i64;
        let mut buf = vec![0u8; 4096];
        loop {
            let mut n: c_int = 0;
            // SAFETY: `buf` outlives the call and its length is passed; the shim writes at most that many bytes.
            let rc = unsafe { ffi::lmim_c10d_store_get(self.0, ckey.as_ptr(), ms, buf.as_mut_ptr() as *mut c_char, buf.len() as c_int, &mut n) };
            if rc != 0 {
                return Err(ffi::last_error());
            }
            let n = n.max(0) as usize;
            if n <= buf.len() {
                buf.truncate(n);
                return Ok(buf);
            }
            buf.resize(n, 0);
        }
    }

    /// Adds `delta` to the counter `key` (0 reads it) over the main connection or the watcher's (`watch`).
    fn add(&self, key: &str, delta: i64, watch: bool) -> std::result::Result<i64, String> {
        let ckey = CString::new(key).map_err(|_| format!("store key `{key}` holds a NUL byte"))?;
        let mut v: i64 = 0;
        // SAFETY: a live group, a NUL-terminated key and an out-parameter that outlive the call.
        let rc = unsafe { ffi::lmim_c10d_store_add(self.0, ckey.as_ptr(), delta, watch as c_int, &mut v) };
        if rc != 0 {
            return Err(ffi::last_error());
        }
        Ok(v)
    }

    /// Counts this rank done; the store's host waits (up to `timeout`) for every rank. Whether all were done.
    fn finish(&self, host: bool, timeout: Duration) -> bool {
        let mut all: c_int = 0;
        // SAFETY: a live group, an out-parameter that outlives the call.
        let rc = unsafe { ffi::lmim_c10d_finish(self.0, host as c_int, timeout.as_millis().min(i64::MAX as u128) as i64, &mut all) };
        rc == 0 && all != 0
    }
}

/// This process's place in the job, and its process group when there is more than one process.
pub struct World {
    pub rank: usize,
    pub size: usize,
    pub local_rank: usize,
    pub backend: Backend,
    pub launcher: Launcher,
    pub timeout: Duration,
    /// Where collectives' tensors live: the CPU for Gloo, this rank's GPU for NCCL.
    pub device: Device,
    /// This rank serves the rendezvous store (rank 0 unless torchrun's agent does).
    hosts_store: bool,
    group: Mutex<Option<Arc<Group>>>,
    /// The same group, for the panic hook: it must tell the peers even while the main thread holds `group` in a
    /// collective.
    panic_group: Option<Arc<Group>>,
    /// Where the rendezvous store is, for messages (`host:port`, and who serves it).
    store_desc: String,
    watcher: Mutex<Option<(Arc<AtomicBool>, JoinHandle<()>)>>,
    /// Whether the gradient layout was compared across ranks (on the first averaging).
    layout_checked: AtomicBool,
}

static WORLD: OnceLock<World> = OnceLock::new();

/// The world of this process; a world of one when [`init`] was not called.
pub fn world() -> &'static World {
    WORLD.get_or_init(World::single)
}

/// The world when one was fixed ([`init`], or a [`world`] call), without fixing one: for code that a library user
/// may call before joining the job.
pub fn joined_world() -> Option<&'static World> {
    WORLD.get()
}

/// Sets up the world from the launcher's environment (torchrun, Slurm, `RANK`/`WORLD_SIZE`/`MASTER_ADDR`/
/// `MASTER_PORT`); a world of one without them. Called once, before any training; a second call returns the
/// world already made. Refused when a world of one was fixed (by a [`world`] call before `init`) while the
/// launcher says the job has more ranks: that process would train alone and never meet its peers.
pub fn init(opts: &DistOptions) -> Result<&'static World> {
    let env = LaunchEnv::from_env()?;
    if let Some(note) = &env.note {
        eprintln!("note: {note}");
    }
    if let Some(w) = WORLD.get() {
        if w.size != env.world_size.max(1) {
            return Err(Error::Dist(format!(
                "the world was fixed as {} process(es) before joining the job, whose launcher ({}) says {}: join before anything asks for the world",
                w.size,
                env.launcher.name(),
                env.world_size
            )));
        }
        return Ok(w);
    }
    if opts.cuda {
        // PyTorch's order: the device first (torch.cuda.set_device(local_rank)), so the main thread works on this
        // rank's GPU from the start and the group's communicator is made there, then the group.
        let visible = tch::Cuda::device_count().max(0) as usize;
        if let Some(d) = local_device(env.local_rank, visible) {
            crate::device::bind_thread(Device::Cuda(d))?;
        }
    }
    // A world of one has no group, unless a back-end was named for a launched process (RANK=0 WORLD_SIZE=1): a
    // real group of one, e.g. to try NCCL on a machine with one GPU.
    let group_of_one = env.world_size == 1 && env.launcher != Launcher::Single && opts.backend.is_some();
    let w = if env.world_size <= 1 && !group_of_one { World::single() } else { World::connect(&env, opts)? };
    let w = WORLD.get_or_init(|| w);
    crate::fault::set_rank(w.rank as i64);
    // The heartbeat and the failure watcher run before the back-end is made: a rank lost between the rendezvous and
    // the group (Gloo's full mesh, NCCL's communicator initialisation) ends the others with its name, not after
    // the timeout.
    w.start_watcher();
    if !w.no_group() {
        crate::fault::fault_point("init", 1)?;
        w.join()?;
    }
    Ok(w)
}

/// Ends the world at the end of the process, on every exit path of a command: with `failure`, tells the peers
/// (so they stop at once instead of waiting out the timeout) and aborts the group; without, shuts it down
/// (NCCL must be shut down before exit). A no-op for a world of one or a world already ended.
pub fn shutdown(failure: Option<&str>) {
    end_world(failure, None)
}

/// As [`shutdown`] at the end of a process, with the exit code a failing process ends with: it leaves with that
/// code within [`ABORT_GRACE`] even when aborting its communicators blocks.
pub fn shutdown_with(failure: Option<(&str, i32)>) {
    end_world(failure.map(|f| f.0), failure.map(|f| f.1))
}

fn end_world(failure: Option<&str>, exit_code: Option<i32>) {
    let Some(w) = WORLD.get() else { return };
    if failure.is_none() {
        if let Some(g) = w.panic_group.as_ref() {
            // A finished rank beats no more: its watcher must not take that for a lost rank.
            let _ = g.add(&heartbeat_key(w.rank), HEARTBEAT_DONE, true);
        }
    }
    w.stop_watcher();
    let group = w.group.lock().unwrap_or_else(|e| e.into_inner()).take();
    let Some(g) = group else { return };
    match failure {
        Some(msg) => {
            if let Some(code) = exit_code {
                exit_after(ABORT_GRACE, code);
            }
            g.fail(msg);
            w.keep_store_for_peers();
        }
        None => {
            // Every rank counts itself done (its watcher stopped above, so the store's end is no longer a
            // failure to it); the store's host waits for all of them, so none finds the store gone while it
            // is still finishing.
            if !g.finish(w.hosts_store, w.timeout) && w.hosts_store {
                eprintln!("warning: rank 0 of {}: not every rank finished (one failed, or it did not end within {} s); ending anyway", w.size, w.timeout.as_secs());
            }
            g.shutdown();
        }
    }
}

/// The panic hook's path: a panic in any thread of a rank ends the rank as an error does, with the reason in the
/// store (the peers stop within a second with it), the group aborted and exit 1. False in a world without a
/// group (the caller reports the panic as a single process does).
pub fn fail_on_panic(msg: &str) -> bool {
    let Some(w) = WORLD.get() else { return false };
    let Some(g) = w.panic_group.as_ref() else { return false };
    eprintln!("error: rank {} of {}: {msg}", w.rank, w.size);
    exit_after(ABORT_GRACE, 1);
    g.fail(msg);
    w.keep_store_for_peers();
    crate::signals::drain_stderr();
    // SAFETY: ends the process from the panicking thread; the main thread may be inside libtorch.
    unsafe { libc::_exit(1) }
}

/// Gradients are packed into buckets of about this size for the all-reduce (DDP's default `bucket_cap_mb`).
const BUCKET_BYTES: i64 = 25 << 20;

/// Copies the results of a collective back into the caller's tensors where they went through a staged copy.
fn write_back(ts: &[Tensor], staged: &[Tensor]) {
    tch::no_grad(|| {
        for (t, s) in ts.iter().zip(staged) {
            if t.data_ptr() != s.data_ptr() || t.device() != s.device() {
                t.shallow_clone().copy_(s);
            }
        }
    });
}

/// The least time the other ranks give rank 0 for a checkpoint or an export ([`World::after_rank0_writes`]).
pub const WRITE_WAIT: Duration = Duration::from_secs(2 * 3600);

/// How often a rank looks for a peer's failure in the store.
const WATCH_EVERY: Duration = Duration::from_millis(500);

/// How often a rank counts its heartbeat up and reads the next rank's.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);

/// How long the next rank's heartbeat may stand still before it counts as lost (killed, stopped, its node gone):
/// independent of `--dist-timeout`, since the watcher thread beats whatever the main thread is doing.
pub const HEARTBEAT_STALE: Duration = Duration::from_secs(30);

/// What a rank adds to its heartbeat at a normal end: a finished rank is not waited for.
const HEARTBEAT_DONE: i64 = 1 << 40;

/// How long a failing rank gives the abort of its communicators before it exits anyway.
const ABORT_GRACE: Duration = Duration::from_secs(10);

fn heartbeat_key(rank: usize) -> String {
    format!("lmim-bench/alive/{rank}")
}

/// Ends the process with `code` after `after`, from a thread of its own: the exit of a failing rank must not hang
/// in a blocked abort.
fn exit_after(after: Duration, code: i32) {
    let _ = std::thread::Builder::new().name("lmim-exit-timer".into()).spawn(move || {
        std::thread::sleep(after);
        crate::signals::drain_stderr();
        // SAFETY: ends the process; the other threads may be blocked in libtorch or NCCL.
        unsafe { libc::_exit(code) };
    });
}

/// This rank's heartbeat in the store and its watch over the next rank's.
struct Heartbeat {
    rank: usize,
    next: usize,
    last_beat: Option<Instant>,
    seen: Option<i64>,
    changed: Instant,
}

impl Heartbeat {
    fn new(rank: usize, size: usize) -> Heartbeat {
        Heartbeat { rank, next: (rank + 1) % size, last_beat: None, seen: None, changed: Instant::now() }
    }

    /// Beats (every [`HEARTBEAT_EVERY`]) and returns why to stop when the next rank's heartbeat stood still for
    /// [`HEARTBEAT_STALE`]. A store that does not answer is left to the failure poll.
    fn tick(&mut self, g: &Group) -> Option<String> {
        if self.next == self.rank || self.last_beat.is_some_and(|t| t.elapsed() < HEARTBEAT_EVERY) {
            return None;
        }
        self.last_beat = Some(Instant::now());
        g.add(&heartbeat_key(self.rank), 1, true).ok()?;
        let v = g.add(&heartbeat_key(self.next), 0, true).ok()?;
        if v >= HEARTBEAT_DONE {
            return None;
        }
        if self.seen != Some(v) {
            self.seen = Some(v);
            self.changed = Instant::now();
            return None;
        }
        let still = self.changed.elapsed();
        (still >= HEARTBEAT_STALE).then(|| {
            format!(
                "rank {} has not been heard from for {} s (its heartbeat in the store stopped at {v}): it was killed, stopped (SIGSTOP) or its node was lost",
                self.next,
                still.as_secs()
            )
        })
    }
}

impl World {
    /// The peers learn of a failure through the store this process serves (when it does): keep it up for two of
    /// their polls before exiting.
    fn keep_store_for_peers(&self) {
        if self.hosts_store {
            std::thread::sleep(2 * WATCH_EVERY);
        }
    }

    fn single() -> World {
        World {
            rank: 0,
            size: 1,
            local_rank: 0,
            backend: Backend::Gloo,
            launcher: Launcher::Single,
            timeout: default_timeout(Backend::Gloo),
            device: Device::Cpu,
            hosts_store: false,
            group: Mutex::new(None),
            panic_group: None,
            store_desc: String::new(),
            watcher: Mutex::new(None),
            layout_checked: AtomicBool::new(true),
        }
    }

    fn connect(env: &LaunchEnv, opts: &DistOptions) -> Result<World> {
        let backend = opts.backend.unwrap_or(if opts.cuda { Backend::Nccl } else { Backend::Gloo });
        let device = match backend {
            Backend::Nccl => {
                let visible = tch::Cuda::device_count().max(0) as usize;
                let d = local_device(env.local_rank, visible)
                    .ok_or_else(|| Error::option("--dist-backend", "nccl: this process sees no CUDA device (CUDA_VISIBLE_DEVICES?)"))?;
                Device::Cuda(d)
            }
            Backend::Gloo => Device::Cpu,
        };
        if backend == Backend::Nccl && !has_nccl() {
            return Err(Error::option("--dist-backend", "nccl: this build has no NCCL (it was compiled without the CUDA headers); rebuild after scripts/env.sh, or use gloo"));
        }
        if backend == Backend::Gloo && !has_gloo() {
            return Err(Error::option("--dist-backend", format!("gloo: this build has no Gloo, so it cannot run {} processes on the CPU: {GLOO_HOWTO}", env.world_size)));
        }
        let timeout = opts.timeout.unwrap_or_else(|| default_timeout(backend));
        let c = |s: &str, what: &str| CString::new(s).map_err(|_| Error::option(what, format!("`{s}` holds a NUL byte")));
        let host = c(&env.master_addr, "MASTER_ADDR")?;
        // torchrun's agent serves the store and counts restarts; keys of another attempt must not be read.
        let prefix = c(&format!("/worker/attempt_{}/lmim-bench/{}/", env.restart_count, env.job.as_deref().unwrap_or("job")), "TORCHELASTIC_RESTART_COUNT")?;
        let ms = timeout.as_millis().min(i64::MAX as u128) as i64;
        // SAFETY: NUL-terminated strings that outlive the call; the shim catches C++ exceptions.
        let ptr = unsafe { ffi::lmim_c10d_connect(host.as_ptr(), env.master_port as c_int, env.rank as c_int, env.world_size as c_int, env.agent_store as c_int, ms, prefix.as_ptr()) };
        if ptr.is_null() {
            return Err(Error::Dist(format!(
                "rank {} of {}: cannot join the {} group at {}:{} ({}): {}",
                env.rank,
                env.world_size,
                backend.name(),
                env.master_addr,
                env.master_port,
                env.launcher.name(),
                ffi::last_error()
            )));
        }
        let group = Arc::new(Group(ptr));
        let server = if env.agent_store { "torchrun's agent" } else { "rank 0" };
        Ok(World {
            rank: env.rank,
            size: env.world_size,
            local_rank: env.local_rank,
            backend,
            launcher: env.launcher,
            timeout,
            device,
            hosts_store: env.rank == 0 && !env.agent_store,
            group: Mutex::new(Some(group.clone())),
            panic_group: Some(group),
            store_desc: format!("the rendezvous store that {server} serves at {}:{}", env.master_addr, env.master_port),
            watcher: Mutex::new(None),
            layout_checked: AtomicBool::new(false),
        })
    }

    /// A thread that ends this process soon after a peer fails, whatever this rank is doing (a collective, or
    /// rank-local work such as decoding or writing a checkpoint): a failure a peer reported in the store, the
    /// store itself gone (its host, rank 0 or torchrun's agent, died: that is a failure, never "no failure"),
    /// ProcessGroupNCCL's watchdog reporting a timed-out collective, or the next rank's heartbeat standing still
    /// for [`HEARTBEAT_STALE`] (a rank killed, stopped or on a lost node says nothing; each rank watches the next
    /// one in a ring, so any lost set of ranks short of all has a live watcher). Under NCCL the host never waits
    /// in a collective (wait() only orders streams), so without it a rank whose peer died would sit until a
    /// timeout. It polls over its own store connection, so a long store call of the main thread cannot hold it up.
    /// Makes the back-end over the rendezvous store.
    fn join(&self) -> Result<()> {
        let Some(g) = self.group.lock().unwrap_or_else(|e| e.into_inner()).clone() else { return Ok(()) };
        let dev = if let Device::Cuda(d) = self.device { d as c_int } else { -1 };
        let ms = self.timeout.as_millis().min(i64::MAX as u128) as i64;
        g.join(self.backend, ms, dev).map_err(|e| Error::Dist(format!("rank {} of {}: cannot make the {} group over {}: {e}", self.rank, self.size, self.backend.name(), self.store_desc)))
    }

    fn start_watcher(&self) {
        let Some(g) = self.group.lock().unwrap_or_else(|e| e.into_inner()).clone() else { return };
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, rank, size, host, timeout) = (stop.clone(), self.rank, self.size, self.hosts_store, self.timeout);
        let store = self.store_desc.clone();
        let handle = std::thread::Builder::new().name("lmim-dist-watch".into()).spawn(move || {
            let end = |why: String| {
                eprintln!("error: rank {rank} of {size}: stopping because {why}");
                // Out within seconds even if aborting the communicators blocks (ncclCommAbort can).
                exit_after(ABORT_GRACE, 1);
                // Tells the others (where the store still answers) and aborts this rank's communicators.
                g.fail(&why);
                if host {
                    std::thread::sleep(2 * WATCH_EVERY);
                }
                // The line goes through the log thread when stderr is a pipe: let it out before the exit.
                crate::signals::drain_stderr();
                // SAFETY: ends the process at once, from this thread; the main thread may be blocked in libtorch,
                // so no destructors run (atomic writes leave no partial files under their names).
                unsafe { libc::_exit(1) };
            };
            let mut unreachable = 0u32;
            let mut beat = Heartbeat::new(rank, size);
            while !stop2.load(Ordering::Relaxed) {
                std::thread::sleep(WATCH_EVERY);
                if stop2.load(Ordering::Relaxed) {
                    return;
                }
                if let Some(what) = g.backend_error() {
                    end(format!("rank {rank}: {what} (--dist-timeout {} s); the NCCL communicators were aborted", timeout.as_secs()));
                }
                match g.peer_failure() {
                    Ok(Some(msg)) if msg.starts_with(&format!("rank {rank}:")) => return,
                    Ok(Some(_)) if stop2.load(Ordering::Relaxed) => return,
                    Ok(Some(msg)) => end(msg),
                    Ok(None) => unreachable = 0,
                    // Twice in a row (a second), so one slow answer is not taken for a dead host.
                    Err(e) => {
                        unreachable += 1;
                        if unreachable >= 2 && !stop2.load(Ordering::Relaxed) {
                            end(format!("{store} is gone: its process exited or its node failed ({e})"));
                        }
                        continue;
                    }
                }
                if let Some(why) = beat.tick(&g) {
                    if !stop2.load(Ordering::Relaxed) {
                        end(why);
                    }
                }
            }
        });
        if let Ok(h) = handle {
            *self.watcher.lock().unwrap_or_else(|e| e.into_inner()) = Some((stop, h));
        }
    }

    /// Stops the watcher without waiting for it: it may sit in a store call whose host (rank 0) has already gone.
    fn stop_watcher(&self) {
        if let Some((stop, _detached)) = self.watcher.lock().unwrap_or_else(|e| e.into_inner()).take() {
            stop.store(true, Ordering::Relaxed);
        }
    }

    /// A world of one without a process group: every collective is a no-op. (A group of one, made when a
    /// back-end is named for a launched world of one, runs them.)
    fn no_group(&self) -> bool {
        self.panic_group.is_none()
    }

    /// After rank 0's rank-local writes (a checkpoint, the exported encoder): rank 0 says it is done, the others
    /// wait for it on the store, not inside a collective (NCCL's watchdog counts from the moment a collective is
    /// queued, so a slow file system would otherwise end the job after `--dist-timeout`). They wait up to
    /// [`WRITE_WAIT`] or the timeout, whichever is longer; a rank 0 that fails or dies meanwhile ends them
    /// through the failure watcher, as anywhere else. `what` names the write (unique per call in a run).
    pub fn after_rank0_writes(&self, what: &str) -> Result<()> {
        let Some(g) = self.panic_group.as_ref() else { return Ok(()) };
        let key = CString::new(format!("lmim-bench/written/{what}")).map_err(|_| Error::Dist(format!("`{what}` holds a NUL byte")))?;
        let wait = self.timeout.max(WRITE_WAIT);
        // SAFETY: a live group and a NUL-terminated key; the shim catches C++ exceptions.
        let rc = unsafe {
            if self.is_main() {
                ffi::lmim_c10d_store_set(g.0, key.as_ptr())
            } else {
                ffi::lmim_c10d_store_wait(g.0, key.as_ptr(), wait.as_millis().min(i64::MAX as u128) as i64)
            }
        };
        if rc != 0 {
            return Err(Error::Dist(format!("rank {} of {}: waiting for rank 0 to write {what} ({} s at most) failed: {}", self.rank, self.size, wait.as_secs(), ffi::last_error())));
        }
        Ok(())
    }

    /// Every rank's `mine`, in rank order, through the store rather than a collective (values of any length,
    /// rank-local work of any duration before the call: nothing waits inside NCCL). Each `what` is used once per
    /// run. A world of one gets its own value back.
    pub fn exchange(&self, what: &str, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        let Some(g) = self.panic_group.as_ref() else { return Ok(vec![mine.to_vec()]) };
        let base = format!("lmim-bench/exchange/{}", what.replace(' ', "_"));
        let fail = |e: String| Error::Dist(format!("rank {} of {}: exchanging {what} over the store failed: {e}", self.rank, self.size));
        g.put(&format!("{base}/{}", self.rank), mine, false).map_err(fail)?;
        (0..self.size).map(|r| g.get(&format!("{base}/{r}"), self.timeout.max(WRITE_WAIT)).map_err(fail)).collect()
    }

    /// Checks over the store, before any collective, that every rank holds the same `key` for `what` (a resume
    /// point, say); `desc` is what a mismatch shows of this rank (its folder, its step). Every rank finds a
    /// mismatch itself and returns [`Error::RanksDisagree`] naming each rank's value, so all of them exit 2, none
    /// with a collective's abort. Each `what` is used once per run.
    pub fn agree(&self, what: &str, key: &str, desc: &str) -> Result<()> {
        let Some(g) = self.panic_group.as_ref() else { return Ok(()) };
        let base = format!("lmim-bench/agree/{}", what.replace(' ', "_"));
        let fail = |e: String| Error::Dist(format!("rank {} of {}: comparing {what} over the store failed: {e}", self.rank, self.size));
        let all: Vec<(String, String)> = self
            .exchange(&format!("agree {what}"), format!("{key}\t{desc}").as_bytes())?
            .into_iter()
            .map(|v| {
                let v = String::from_utf8_lossy(&v).into_owned();
                let (k, d) = v.split_once('\t').unwrap_or((v.as_str(), ""));
                (k.to_string(), d.to_string())
            })
            .collect();
        let same = all.iter().all(|(k, _)| *k == all[0].0);
        if !same {
            // The failure this rank is about to report is expected from every rank: the watcher must not end it
            // with another rank's report first.
            self.stop_watcher();
        }
        // Every rank has read every value (and stopped its watcher where they differ) before any reports.
        let read = format!("{base}/read");
        g.add(&read, 1, false).map_err(fail)?;
        let deadline = Instant::now() + self.timeout.max(WRITE_WAIT);
        while g.add(&read, 0, false).map_err(fail)? < self.size as i64 {
            if Instant::now() > deadline {
                return Err(fail("not every rank read the others' values in time".into()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if same {
            return Ok(());
        }
        let lines: Vec<String> = all.iter().enumerate().map(|(r, (k, d))| format!("rank {r}: {k} ({d})")).collect();
        Err(Error::RanksDisagree(format!("{what}: {}", lines.join("; "))))
    }

    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    pub fn is_distributed(&self) -> bool {
        self.size > 1
    }

    fn call(&self, what: &str, f: impl FnOnce(*mut c_void) -> c_int) -> Result<()> {
        let guard = self.group.lock().unwrap_or_else(|e| e.into_inner());
        let Some(g) = guard.as_ref() else {
            if self.no_group() {
                return Ok(());
            }
            return Err(Error::Dist(format!("rank {} of {}: {what} after the process group was shut down", self.rank, self.size)));
        };
        if f(g.0) == 0 {
            return Ok(());
        }
        let err = ffi::last_error();
        // The first failure's reason, when a peer reported one, says more than the broken connection it caused.
        let mut cause = g.peer_failure().ok().flatten();
        if cause.is_none() && !err.to_lowercase().contains("timed out") && !err.contains("timeout") {
            // A connection closed without a word (a peer killed): its heartbeat stops, and the watcher of the
            // rank before it says which rank it was; this rank waits for that report rather than leave without
            // a name. The watcher may end this process meanwhile, with the same report.
            let deadline = Instant::now() + HEARTBEAT_STALE + 2 * HEARTBEAT_EVERY;
            while cause.is_none() && Instant::now() < deadline {
                std::thread::sleep(WATCH_EVERY);
                cause = g.peer_failure().ok().flatten();
            }
        }
        let cause = cause.map_or(String::new(), |m| format!(" (first failure: {m})"));
        let waited = match self.backend {
            Backend::Gloo => format!("a peer exited or did not answer within {} s", self.timeout.as_secs()),
            Backend::Nccl => "a peer exited or the communicator was aborted".to_string(),
        };
        Err(Error::Dist(format!("rank {} of {} ({}): {what} failed ({waited}): {err}{cause}", self.rank, self.size, self.backend.name())))
    }

    /// In-place sum over ranks of every tensor. Tensors that are not contiguous or not on the collective device
    /// are summed through a staged copy and written back, so callers may pass CPU tensors to an NCCL world.
    pub fn all_reduce_sum(&self, ts: &[Tensor], what: &str) -> Result<()> {
        if self.no_group() || ts.is_empty() {
            return Ok(());
        }
        let staged: Vec<Tensor> = ts.iter().map(|t| self.staged(t)).collect();
        let mut p = handles(&staged);
        self.call(what, |g| unsafe { ffi::lmim_c10d_allreduce_sum(g, p.as_mut_ptr(), p.len() as c_int) })?;
        write_back(ts, &staged);
        Ok(())
    }

    /// Sums of `values` over ranks (f64, exact for counts).
    pub fn sum_f64(&self, values: &[f64], what: &str) -> Result<Vec<f64>> {
        if self.no_group() {
            return Ok(values.to_vec());
        }
        let t = Tensor::from_slice(values).to_device(self.device);
        self.all_reduce_sum(std::slice::from_ref(&t), what)?;
        Vec::<f64>::try_from(&t.to_device(Device::Cpu)).map_err(Error::Torch)
    }

    /// Replaces every tensor by rank `root`'s.
    pub fn broadcast(&self, ts: &[Tensor], root: usize, what: &str) -> Result<()> {
        if self.no_group() || ts.is_empty() {
            return Ok(());
        }
        let staged: Vec<Tensor> = ts.iter().map(|t| self.staged(t)).collect();
        let mut p = handles(&staged);
        self.call(what, |g| unsafe { ffi::lmim_c10d_broadcast(g, p.as_mut_ptr(), p.len() as c_int, root as c_int) })?;
        write_back(ts, &staged);
        Ok(())
    }

    /// Every rank's `t` (same shape on every rank), in rank order, on the CPU.
    pub fn all_gather(&self, t: &Tensor, what: &str) -> Result<Vec<Tensor>> {
        Ok(self.all_gather_on(t, what)?.into_iter().map(|o| o.to_device(Device::Cpu)).collect())
    }

    /// Every rank's `t` (same shape on every rank), in rank order, on `t`'s device: no host copy when the
    /// collective device is `t`'s (the statistics of a step stay on the GPU under NCCL).
    pub fn all_gather_on(&self, t: &Tensor, what: &str) -> Result<Vec<Tensor>> {
        if self.no_group() {
            return Ok(vec![t.shallow_clone()]);
        }
        let input = self.staged(t);
        let outs: Vec<Tensor> = (0..self.size).map(|_| input.empty_like()).collect();
        let mut p = handles(&outs);
        self.call(what, |g| unsafe { ffi::lmim_c10d_allgather(g, input.as_ptr() as ffi::CTensor, p.as_mut_ptr(), p.len() as c_int) })?;
        Ok(outs.into_iter().map(|o| if o.device() == t.device() { o } else { o.to_device(t.device()) }).collect())
    }

    pub fn barrier(&self, what: &str) -> Result<()> {
        self.call(what, |g| unsafe { ffi::lmim_c10d_barrier(g) })
    }

    /// A contiguous tensor on the collective device sharing `t`'s storage when it can.
    fn staged(&self, t: &Tensor) -> Tensor {
        if t.device() == self.device && t.is_contiguous() {
            t.shallow_clone()
        } else {
            t.to_device(self.device).contiguous()
        }
    }

    /// Averages the gradients of `params` over ranks in place (sum in buckets, then divide by the world size).
    /// Parameters without a gradient are skipped; every rank has the same ones (one model, one code path).
    pub fn average_gradients<'a>(&self, params: impl Iterator<Item = &'a Tensor>) -> Result<()> {
        if self.no_group() {
            return Ok(());
        }
        let all: Vec<Tensor> = params.map(|p| p.grad()).collect();
        if !self.layout_checked.swap(true, Ordering::Relaxed) {
            self.check_gradient_layout(&all)?;
        }
        let grads: Vec<Tensor> = all.into_iter().filter(|g| g.defined()).collect();
        // Buckets of one dtype and device, in parameter order.
        let mut buckets: Vec<Vec<usize>> = Vec::new();
        let mut bytes = 0i64;
        for (i, g) in grads.iter().enumerate() {
            let b = g.numel() as i64 * g.kind().elt_size_in_bytes() as i64;
            let same = buckets.last().and_then(|l| l.last()).is_some_and(|&j| grads[j].kind() == g.kind() && grads[j].device() == g.device());
            if buckets.is_empty() || !same || bytes + b > BUCKET_BYTES {
                buckets.push(Vec::new());
                bytes = 0;
            }
            buckets.last_mut().expect("pushed").push(i);
            bytes += b;
        }
        let flats: Vec<Tensor> = tch::no_grad(|| {
            buckets
                .iter()
                .map(|ids| {
                    let parts: Vec<Tensor> = ids.iter().map(|&i| grads[i].reshape([-1])).collect();
                    Tensor::cat(&parts, 0).to_device(self.device)
                })
                .collect()
        });
        self.all_reduce_sum(&flats, "the gradient all-reduce")?;
        tch::no_grad(|| {
            for (ids, flat) in buckets.iter().zip(&flats) {
                let flat = flat.g_div_scalar(self.size as f64);
                let mut off = 0i64;
                for &i in ids {
                    let n = grads[i].numel() as i64;
                    grads[i].shallow_clone().copy_(&flat.narrow(0, off, n).view(grads[i].size().as_slice()));
                    off += n;
                }
            }
        });
        Ok(())
    }

    /// Buckets are packed from the gradients each rank has, so every rank must have the same ones (a gradient
    /// left undefined on one rank only would shift every bucket after it and average unrelated values): compared
    /// once, on the first step, naming the first parameter that differs.
    fn check_gradient_layout(&self, grads: &[Tensor]) -> Result<()> {
        let mine: Vec<i64> = grads.iter().map(|g| if g.defined() { g.numel() as i64 } else { -1 }).collect();
        let all = self.all_gather(&Tensor::from_slice(&mine), "the gradient layout check")?;
        for (r, other) in all.iter().enumerate() {
            let other = Vec::<i64>::try_from(other).map_err(Error::Torch)?;
            if let Some(i) = mine.iter().zip(&other).position(|(a, b)| a != b) {
                let say = |n: i64| if n < 0 { "no gradient".to_string() } else { format!("a gradient of {n} values") };
                return Err(Error::Dist(format!(
                    "rank {} has {} for parameter {i} and rank {r} has {}: every rank must produce the same gradients (a branch skipped on one rank only?)",
                    self.rank,
                    say(mine[i]),
                    say(other[i])
                )));
            }
        }
        Ok(())
    }

    /// Makes every rank's `tensors` rank 0's, then checks that they are: each tensor's sum and sum of squares
    /// (f64) gathered from all ranks must be equal; a mismatch names the first tensor that differs.
    pub fn sync_parameters(&self, named: &[(String, Tensor)]) -> Result<()> {
        if self.no_group() {
            return Ok(());
        }
        let ts: Vec<Tensor> = named.iter().map(|(_, t)| t.shallow_clone()).collect();
        self.broadcast(&ts, 0, "the parameter broadcast")?;
        let sums = tch::no_grad(|| {
            let s: Vec<Tensor> = ts.iter().flat_map(|t| {
                let d = t.to_kind(Kind::Double);
                [d.sum(Kind::Double), d.square().sum(Kind::Double)]
            }).collect();
            Tensor::stack(&s, 0).to_device(Device::Cpu)
        });
        let all = self.all_gather(&sums, "the parameter check")?;
        let mine = Vec::<f64>::try_from(&all[0]).map_err(Error::Torch)?;
        for (r, other) in all.iter().enumerate().skip(1) {
            let other = Vec::<f64>::try_from(other).map_err(Error::Torch)?;
            if let Some(i) = mine.iter().zip(&other).position(|(a, b)| a.to_bits() != b.to_bits()) {
                return Err(Error::Dist(format!("after the broadcast from rank 0, rank {r} has another `{}`", named[i / 2].0)));
            }
        }
        Ok(())
    }

    /// What records and configs say about the world: `world_size`, `backend` and the launcher.
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({ "world_size": self.size, "backend": self.backend.name(), "launcher": self.launcher.name(), "deterministic": crate::device::deterministic() })
    }
}
