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

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tch::{Device, Kind, Tensor};

pub use launch::{expand_nodelist, LaunchEnv, Launcher};

use crate::error::{Error, Result};

extern "C" {
    fn lmim_c10d_last_error() -> *const c_char;
    fn lmim_c10d_has_gloo() -> c_int;
    fn lmim_c10d_has_nccl() -> c_int;
    fn lmim_c10d_init(backend: *const c_char, host: *const c_char, port: c_int, rank: c_int, size: c_int, client_only: c_int, timeout_ms: i64, prefix: *const c_char) -> *mut c_void;
    fn lmim_c10d_allreduce_sum(g: *mut c_void, ts: *mut *mut torch_sys::C_tensor, n: c_int) -> c_int;
    fn lmim_c10d_broadcast(g: *mut c_void, ts: *mut *mut torch_sys::C_tensor, n: c_int, root: c_int) -> c_int;
    fn lmim_c10d_allgather(g: *mut c_void, input: *mut torch_sys::C_tensor, outs: *mut *mut torch_sys::C_tensor, size: c_int) -> c_int;
    fn lmim_c10d_barrier(g: *mut c_void) -> c_int;
    fn lmim_c10d_free(g: *mut c_void);
}

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
    unsafe { lmim_c10d_has_gloo() != 0 }
}

/// How to get Gloo into a build without it: named wherever a run or a test needs it.
pub const GLOO_HOWTO: &str = "install gloo's headers (Debian/Ubuntu: apt-get install libgloo-dev) or set LMIM_GLOO_INCLUDE to a folder holding gloo/, then rebuild (scripts/env.sh)";

/// Whether this build can make NCCL groups (it was compiled with the CUDA and NCCL headers).
pub fn has_nccl() -> bool {
    unsafe { lmim_c10d_has_nccl() != 0 }
}

/// How to set up the world.
#[derive(Debug, Clone)]
pub struct DistOptions {
    /// None: NCCL when the processes run on CUDA, Gloo on the CPU.
    pub backend: Option<Backend>,
    /// How long a rank waits for its peers (rendezvous and every collective) before it fails.
    pub timeout: Duration,
    /// Whether the processes compute on CUDA (picks the default back-end and the collective device).
    pub cuda: bool,
}

impl Default for DistOptions {
    fn default() -> Self {
        DistOptions { backend: None, timeout: Duration::from_secs(1800), cuda: false }
    }
}

struct Group(*mut c_void);

// SAFETY: the group is only used under the World's mutex; c10d's process groups are thread-safe for calls that
// are not concurrent, which the mutex guarantees.
unsafe impl Send for Group {}

impl Drop for Group {
    fn drop(&mut self) {
        unsafe { lmim_c10d_free(self.0) }
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
    /// Where collectives' tensors live: the CPU for Gloo, `cuda:LOCAL_RANK` for NCCL.
    pub device: Device,
    group: Option<Mutex<Group>>,
}

static WORLD: OnceLock<World> = OnceLock::new();

/// The world of this process; a world of one when [`init`] was not called.
pub fn world() -> &'static World {
    WORLD.get_or_init(World::single)
}

/// Sets up the world from the launcher's environment (torchrun, Slurm, `RANK`/`WORLD_SIZE`/`MASTER_ADDR`/
/// `MASTER_PORT`); a world of one without them. Called once, before any training; a second call returns the
/// world already made.
pub fn init(opts: &DistOptions) -> Result<&'static World> {
    if let Some(w) = WORLD.get() {
        return Ok(w);
    }
    let env = LaunchEnv::from_env()?;
    let w = if env.world_size <= 1 { World::single() } else { World::connect(&env, opts)? };
    Ok(WORLD.get_or_init(|| w))
}

fn last_error() -> String {
    unsafe { CStr::from_ptr(lmim_c10d_last_error()).to_string_lossy().into_owned() }
}

fn ptrs(ts: &[Tensor]) -> Vec<*mut torch_sys::C_tensor> {
    ts.iter().map(|t| t.as_ptr() as *mut torch_sys::C_tensor).collect()
}

/// Gradients are packed into buckets of about this size for the all-reduce (DDP's default `bucket_cap_mb`).
const BUCKET_BYTES: i64 = 25 << 20;

impl World {
    fn single() -> World {
        World { rank: 0, size: 1, local_rank: 0, backend: Backend::Gloo, launcher: Launcher::Single, timeout: Duration::from_secs(1800), device: Device::Cpu, group: None }
    }

    fn connect(env: &LaunchEnv, opts: &DistOptions) -> Result<World> {
        let backend = opts.backend.unwrap_or(if opts.cuda { Backend::Nccl } else { Backend::Gloo });
        let device = match backend {
            Backend::Nccl => Device::Cuda(env.local_rank),
            Backend::Gloo => Device::Cpu,
        };
        if backend == Backend::Nccl && !has_nccl() {
            return Err(Error::option("--dist-backend", "nccl: this build has no NCCL (it was compiled without the CUDA headers); rebuild after scripts/env.sh, or use gloo"));
        }
        if backend == Backend::Gloo && !has_gloo() {
            return Err(Error::option("--dist-backend", format!("gloo: this build has no Gloo, so it cannot run {} processes on the CPU: {GLOO_HOWTO}", env.world_size)));
        }
        let c = |s: &str, what: &str| CString::new(s).map_err(|_| Error::option(what, format!("`{s}` holds a NUL byte")));
        let (name, host) = (c(backend.name(), "--dist-backend")?, c(&env.master_addr, "MASTER_ADDR")?);
        // torchrun's agent serves the store and counts restarts; keys of another attempt must not be read.
        let prefix = c(&format!("/worker/attempt_{}/lmim-bench/", env.restart_count), "TORCHELASTIC_RESTART_COUNT")?;
        let ms = opts.timeout.as_millis().min(i64::MAX as u128) as i64;
        let ptr = unsafe {
            lmim_c10d_init(name.as_ptr(), host.as_ptr(), env.master_port as c_int, env.rank as c_int, env.world_size as c_int, env.agent_store as c_int, ms, prefix.as_ptr())
        };
        if ptr.is_null() {
            return Err(Error::Dist(format!(
                "rank {} of {}: cannot join the {} group at {}:{} ({}): {}",
                env.rank,
                env.world_size,
                backend.name(),
                env.master_addr,
                env.master_port,
                env.launcher.name(),
                last_error()
            )));
        }
        Ok(World {
            rank: env.rank,
            size: env.world_size,
            local_rank: env.local_rank,
            backend,
            launcher: env.launcher,
            timeout: opts.timeout,
            device,
            group: Some(Mutex::new(Group(ptr))),
        })
    }

    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    pub fn is_distributed(&self) -> bool {
        self.size > 1
    }

    fn call(&self, what: &str, f: impl FnOnce(*mut c_void) -> c_int) -> Result<()> {
        let Some(g) = &self.group else { return Ok(()) };
        let g = g.lock().unwrap_or_else(|e| e.into_inner());
        if f(g.0) == 0 {
            return Ok(());
        }
        Err(Error::Dist(format!(
            "rank {} of {} ({}): {what} failed (a peer exited or did not answer within {} s): {}",
            self.rank,
            self.size,
            self.backend.name(),
            self.timeout.as_secs(),
            last_error()
        )))
    }

    /// In-place sum over ranks of every tensor (contiguous, on [`World::device`]).
    pub fn all_reduce_sum(&self, ts: &[Tensor], what: &str) -> Result<()> {
        if self.size == 1 || ts.is_empty() {
            return Ok(());
        }
        let mut p = ptrs(ts);
        self.call(what, |g| unsafe { lmim_c10d_allreduce_sum(g, p.as_mut_ptr(), p.len() as c_int) })
    }

    /// Sums of `values` over ranks (f64, exact for counts).
    pub fn sum_f64(&self, values: &[f64], what: &str) -> Result<Vec<f64>> {
        if self.size == 1 {
            return Ok(values.to_vec());
        }
        let t = Tensor::from_slice(values).to_device(self.device);
        self.all_reduce_sum(std::slice::from_ref(&t), what)?;
        Vec::<f64>::try_from(&t.to_device(Device::Cpu)).map_err(Error::Torch)
    }

    /// Replaces every tensor by rank `root`'s.
    pub fn broadcast(&self, ts: &[Tensor], root: usize, what: &str) -> Result<()> {
        if self.size == 1 || ts.is_empty() {
            return Ok(());
        }
        let staged: Vec<Tensor> = ts.iter().map(|t| self.staged(t)).collect();
        let mut p = ptrs(&staged);
        self.call(what, |g| unsafe { lmim_c10d_broadcast(g, p.as_mut_ptr(), p.len() as c_int, root as c_int) })?;
        tch::no_grad(|| {
            for (t, s) in ts.iter().zip(&staged) {
                if t.data_ptr() != s.data_ptr() {
                    t.shallow_clone().copy_(s);
                }
            }
        });
        Ok(())
    }

    /// Every rank's `t` (same shape on every rank), in rank order, on the CPU.
    pub fn all_gather(&self, t: &Tensor, what: &str) -> Result<Vec<Tensor>> {
        if self.size == 1 {
            return Ok(vec![t.shallow_clone()]);
        }
        let input = t.to_device(self.device).contiguous();
        let outs: Vec<Tensor> = (0..self.size).map(|_| input.empty_like()).collect();
        let mut p = ptrs(&outs);
        self.call(what, |g| unsafe { lmim_c10d_allgather(g, input.as_ptr() as *mut _, p.as_mut_ptr(), p.len() as c_int) })?;
        Ok(outs.into_iter().map(|o| o.to_device(Device::Cpu)).collect())
    }

    pub fn barrier(&self, what: &str) -> Result<()> {
        self.call(what, |g| unsafe { lmim_c10d_barrier(g) })
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
        if self.size == 1 {
            return Ok(());
        }
        let grads: Vec<Tensor> = params.map(|p| p.grad()).filter(|g| g.defined()).collect();
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

    /// Makes every rank's `tensors` rank 0's, then checks that they are: each tensor's sum and sum of squares
    /// (f64) gathered from all ranks must be equal; a mismatch names the first tensor that differs.
    pub fn sync_parameters(&self, named: &[(String, Tensor)]) -> Result<()> {
        if self.size == 1 {
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
        serde_json::json!({ "world_size": self.size, "backend": self.backend.name(), "launcher": self.launcher.name() })
    }
}
