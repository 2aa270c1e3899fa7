//! Versions and devices: what `lmim-bench info` prints and what every results record carries.
use serde::Serialize;
use tch::Cuda;

#[derive(Debug, Clone, Serialize)]
pub struct Info {
    pub crate_version: String,
    pub git_commit: String,
    pub libtorch_version: String,
    pub libtorch_path: String,
    pub cuda_available: bool,
    pub cuda_devices: i64,
    pub cudnn_version: Option<i64>,
    pub cuda_runtime_version: Option<i64>,
    pub cpu_threads: i32,
    pub mkldnn: bool,
    pub openmp: bool,
    /// Collective back-ends of data-parallel runs (c10d through the shim): gloo when built with gloo's headers,
    /// nccl when built with the CUDA headers; none: single-process runs only.
    pub dist_backends: Vec<String>,
    /// The JPEG decoder of this build ([`JPEG_DECODER`]).
    pub jpeg_decoder: String,
    /// Decode threads a run takes by default, and why ([`crate::data::loader::decode_threads`]).
    pub decode_threads: usize,
    pub decode_threads_why: String,
}

/// `libjpeg-turbo <version> (SIMD)` (the default `turbojpeg` feature) or `zune-jpeg <version>`: their pixels differ
/// slightly, so every record names it.
pub const JPEG_DECODER: &str = match option_env!("LMIM_JPEG_DECODER") {
    Some(d) => d,
    None => "unknown",
};

/// The libtorch version: read from the torch package the binary was linked against (`torch/version.py`), or from
/// a plain libtorch's `build-version` file.
fn libtorch_version(lib: &str) -> String {
    let lib = std::path::Path::new(lib);
    let candidates = [lib.join("../version.py"), lib.join("../build-version")];
    for c in candidates {
        if let Ok(text) = std::fs::read_to_string(&c) {
            if let Some(line) = text.lines().find(|l| l.starts_with("__version__")) {
                return line.split('=').nth(1).unwrap_or("").trim().trim_matches(|c| c == '\'' || c == '"').to_string();
            }
            if !text.contains('=') {
                return text.trim().to_string();
            }
        }
    }
    "unknown".into()
}

/// The folder of the libtorch this process loaded (from /proc/self/maps), which on another machine than the build's
/// is not the folder the build linked: the binary finds it through its rpath or LD_LIBRARY_PATH.
fn loaded_libtorch_dir() -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let path = maps.lines().filter_map(|l| l.split_whitespace().nth(5)).find(|p| p.ends_with("/libtorch_cpu.so"))?;
    Some(std::path::Path::new(path).parent()?.display().to_string())
}

impl Info {
    pub fn collect() -> Self {
        // Make sure libtorch is mapped before /proc/self/maps is read (tch loads it lazily on first use).
        let threads = tch::get_num_threads();
        let lib = loaded_libtorch_dir().unwrap_or_else(|| option_env!("LMIM_LIBTORCH_LIB").unwrap_or("").to_string());
        let decode = crate::data::loader::decode_threads();
        let cuda = Cuda::is_available();
        Info {
            crate_version: env!("CARGO_PKG_VERSION").to_string(),
            git_commit: option_env!("LMIM_GIT_COMMIT").unwrap_or("unknown").to_string(),
            libtorch_version: libtorch_version(&lib),
            libtorch_path: lib,
            cuda_available: cuda,
            cuda_devices: Cuda::device_count(),
            cudnn_version: (cuda && Cuda::cudnn_is_available()).then(tch::utils::version_cudnn),
            cuda_runtime_version: cuda.then(tch::utils::version_cudart),
            cpu_threads: threads,
            mkldnn: tch::utils::has_mkldnn(),
            openmp: tch::utils::has_openmp(),
            dist_backends: [("gloo", crate::dist::has_gloo()), ("nccl", crate::dist::has_nccl())].into_iter().filter(|b| b.1).map(|b| b.0.to_string()).collect(),
            jpeg_decoder: JPEG_DECODER.to_string(),
            decode_threads: decode.threads,
            decode_threads_why: decode.why,
        }
    }

    pub fn human(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!("lmim-bench {} (commit {})\n", self.crate_version, self.git_commit));
        s.push_str(&format!("libtorch   {} at {}\n", self.libtorch_version, self.libtorch_path));
        if self.cuda_available {
            s.push_str(&format!(
                "CUDA       {} device(s), runtime {}, cuDNN {}\n",
                self.cuda_devices,
                self.cuda_runtime_version.map_or("?".into(), |v| v.to_string()),
                self.cudnn_version.map_or("?".into(), |v| v.to_string())
            ));
        } else {
            s.push_str("CUDA       not available (CPU only)\n");
        }
        s.push_str(&format!("CPU        {} torch threads, oneDNN {}, OpenMP {}\n", self.cpu_threads, self.mkldnn, self.openmp));
        let backends = if self.dist_backends.is_empty() { "none".to_string() } else { self.dist_backends.join(", ") };
        if self.dist_backends.iter().any(|b| b == "gloo") {
            s.push_str(&format!("c10d       {backends}\n"));
        } else {
            s.push_str(&format!("c10d       {backends}; no Gloo: one process per run on the CPU (for Gloo: {})\n", crate::dist::GLOO_HOWTO));
        }
        s.push_str(&format!("JPEG       {}\n", self.jpeg_decoder));
        s.push_str(&format!("loader     {} decode threads per process: {}\n", self.decode_threads, self.decode_threads_why));
        s
    }
}

/// Whether a device name asks for CUDA (`auto` does where a GPU is present); checked again, with the device
/// count, by [`parse_device`]. Decides the collective back-end before the world is joined.
pub fn wants_cuda(s: &str) -> crate::Result<bool> {
    match s {
        "auto" => Ok(tch::Cuda::is_available()),
        "cpu" => Ok(false),
        s if s == "cuda" || s.starts_with("cuda:") => Ok(true),
        s => Err(crate::Error::option("--device", format!("`{s}` is not auto, cpu, cuda or cuda:N"))),
    }
}

/// A device name as the commands take it: `auto` picks CUDA when present. A CUDA device that this machine does not
/// have is refused here, before libtorch would abort on it. In a data-parallel run `cuda` (and `auto` with CUDA) is
/// the process's own device: its local rank modulo the devices it sees ([`crate::dist::local_device`], the same
/// choice the world binds NCCL to).
pub fn parse_device(s: &str) -> crate::Result<tch::Device> {
    let n = tch::Cuda::device_count().max(0) as usize;
    let cuda = |i: usize| {
        if i < n {
            Ok(tch::Device::Cuda(i))
        } else {
            Err(crate::Error::option("--device", format!("`{s}`: this process sees {n} CUDA device(s) (CUDA_VISIBLE_DEVICES?)")))
        }
    };
    let own = || crate::dist::local_device(crate::dist::world().local_rank, n).map_or_else(|| cuda(0), cuda);
    match s {
        "auto" if n > 0 => own(),
        "auto" | "cpu" => Ok(tch::Device::Cpu),
        "cuda" => own(),
        s if s.starts_with("cuda:") => s[5..].parse().map_err(|_| crate::Error::option("--device", format!("`{s}` is not cpu, cuda or cuda:N"))).and_then(cuda),
        s => Err(crate::Error::option("--device", format!("`{s}` is not auto, cpu, cuda or cuda:N"))),
    }
}

pub fn device_name(d: tch::Device) -> String {
    match d {
        tch::Device::Cpu => format!("cpu ({} threads)", tch::get_num_threads()),
        tch::Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}"),
    }
}

/// The memory this process may still take, in bytes, and what sets it: the least of the machine's available
/// memory (`MemAvailable`), the address space left under `RLIMIT_AS` (`ulimit -v`: the limit less what is mapped
/// now) and the room left under the memory limits of this process's cgroups (v2 `memory.max`, which Slurm's
/// `--mem` and container runtimes set, on this cgroup and its ancestors; v1 `memory.limit_in_bytes`). None where
/// none of them can be read.
pub fn memory_limit() -> Option<(u128, String)> {
    let mut best: Option<(u128, String)> = None;
    let mut offer = |bytes: u128, what: String| {
        if best.as_ref().is_none_or(|(b, _)| bytes < *b) {
            best = Some((bytes, what));
        }
    };
    let kib = |text: &str, key: &str| -> Option<u128> {
        let line = text.lines().find(|l| l.starts_with(key))?;
        Some(line.split_whitespace().nth(1)?.parse::<u128>().ok()? * 1024)
    };
    if let Some(avail) = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| kib(&t, "MemAvailable:")) {
        offer(avail, "the machine's available memory (MemAvailable)".into());
    }
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into a local struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut lim) } == 0 && lim.rlim_cur != libc::RLIM_INFINITY {
        let mapped = std::fs::read_to_string("/proc/self/status").ok().and_then(|t| kib(&t, "VmSize:")).unwrap_or(0);
        offer((lim.rlim_cur as u128).saturating_sub(mapped), format!("RLIMIT_AS (ulimit -v) of {:.1} GiB less the {:.1} GiB mapped", gib(lim.rlim_cur as u128), gib(mapped)));
    }
    for (limit, used, what) in cgroup_limits() {
        offer(limit.saturating_sub(used), format!("the cgroup limit {what} of {:.1} GiB less the {:.1} GiB in use", gib(limit), gib(used)));
    }
    best
}

fn gib(b: u128) -> f64 {
    b as f64 / (1u128 << 30) as f64
}

/// (limit, usage, file) of every memory limit of this process's cgroups: v2 from its cgroup up to the root, v1
/// from its memory controller's cgroup.
fn cgroup_limits() -> Vec<(u128, u128, String)> {
    let read = |p: &std::path::Path| std::fs::read_to_string(p).ok().and_then(|t| t.trim().parse::<u128>().ok());
    let mut out = Vec::new();
    let Ok(text) = std::fs::read_to_string("/proc/self/cgroup") else { return out };
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else { continue };
        let rel = path.trim_start_matches('/');
        if controllers.is_empty() {
            let mut dir = std::path::Path::new("/sys/fs/cgroup").join(rel);
            loop {
                if let Some(max) = read(&dir.join("memory.max")) {
                    out.push((max, read(&dir.join("memory.current")).unwrap_or(0), dir.join("memory.max").display().to_string()));
                }
                if dir == std::path::Path::new("/sys/fs/cgroup") || !dir.pop() {
                    break;
                }
            }
        } else if controllers.split(',').any(|c| c == "memory") {
            let dir = std::path::Path::new("/sys/fs/cgroup/memory").join(rel);
            // v1 says "no limit" with a number near 2^63.
            if let Some(max) = read(&dir.join("memory.limit_in_bytes")).filter(|&m| m < 1 << 62) {
                out.push((max, read(&dir.join("memory.usage_in_bytes")).unwrap_or(0), dir.join("memory.limit_in_bytes").display().to_string()));
            }
        }
    }
    out
}

/// Refuses, naming `option`, a size whose `bytes` cannot fit in the memory this process may use
/// ([`memory_limit`]), before libtorch is asked for them. `what` says what the bytes are for.
pub fn check_fits(option: &str, what: &str, bytes: u128) -> crate::Result<()> {
    let Some((limit, source)) = memory_limit() else { return Ok(()) };
    if bytes > limit {
        return Err(crate::Error::option(option, format!("{what} need about {:.1} GiB, more than the {:.1} GiB this process may use ({source})", gib(bytes), gib(limit))));
    }
    Ok(())
}

/// Runs `f`, an allocation of about `bytes` for `what` in libtorch, turning its failure (a panic inside tch where
/// the allocator gives up) into [`crate::Error::OutOfMemory`] naming the size and the limit, exit 1. Any other
/// panic goes on.
pub fn allocating<T>(what: &str, bytes: u128, f: impl FnOnce() -> T) -> crate::Result<T> {
    let quiet_hook = std::panic::take_hook();
    // The default hook would print the panic before it is caught: out-of-memory panics are reported as errors.
    std::panic::set_hook(Box::new(|info| {
        let msg = info.payload().downcast_ref::<String>().map(String::as_str).or_else(|| info.payload().downcast_ref::<&str>().copied()).unwrap_or("");
        if !is_alloc_failure(msg) {
            eprintln!("{info}");
        }
    }));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(quiet_hook);
    match r {
        Ok(v) => Ok(v),
        Err(payload) => {
            let msg = payload.downcast_ref::<String>().cloned().or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
            if !is_alloc_failure(&msg) {
                std::panic::resume_unwind(payload);
            }
            Err(alloc_error(what, bytes, &msg))
        }
    }
}

/// The error of a failed allocation of about `bytes` for `what` (`msg`: libtorch's message): the size and the
/// limit, exit 1.
pub fn alloc_error(what: &str, bytes: u128, msg: &str) -> crate::Error {
    let (limit, detail) = memory_limit().map_or(("an unknown amount".into(), "no limit readable".into()), |(b, s)| (format!("{:.1} GiB", gib(b)), s));
    let first = msg.lines().next().unwrap_or("").to_string();
    crate::Error::OutOfMemory { what: what.into(), gib: gib(bytes), limit, detail: format!("{detail}; libtorch: {first}") }
}

/// Turns a libtorch error of an allocating call (tch's fallible `f_` functions) into [`alloc_error`] when it is
/// an allocation failure.
pub fn torch_alloc(what: &str, bytes: u128, e: tch::TchError) -> crate::Error {
    let msg = e.to_string();
    if is_alloc_failure(&msg) {
        alloc_error(what, bytes, &msg)
    } else {
        crate::Error::Torch(e)
    }
}

fn is_alloc_failure(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    m.contains("can't allocate") || m.contains("out of memory") || m.contains("failed to allocate") || m.contains("bad_alloc")
}

/// Rough peak bytes of a ViT forward pass (no grad) over `batch` images: a few tensors of the widest layer
/// (the MLP's hidden tokens or the attention matrix) live at once.
pub fn vit_forward_bytes(cfg: &crate::model::VitConfig, batch: u128) -> u128 {
    let tokens = ((cfg.img_size / cfg.patch_size.max(1)).pow(2) + 1).max(1) as u128;
    let widest = ((cfg.embed_dim as f64 * cfg.mlp_ratio) as u128).max(cfg.num_heads.max(1) as u128 * tokens);
    let input = 3 * (cfg.img_size.max(1) as u128).pow(2);
    batch * 4 * (input + 4 * tokens * widest)
}

#[cfg(test)]
mod memory_tests {
    use super::*;

    #[test]
    fn the_limit_is_at_most_what_the_machine_has_available_and_failed_allocations_are_errors() {
        let (limit, source) = memory_limit().expect("Linux exposes /proc/meminfo");
        assert!(limit > 0 && !source.is_empty());
        let avail = std::fs::read_to_string("/proc/meminfo").unwrap();
        let line = avail.lines().find(|l| l.starts_with("MemAvailable:")).unwrap();
        let kib: u128 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(limit <= kib * 1024 * 2, "{limit} vs MemAvailable {kib} KiB");
        assert!(check_fits("--n", "rows", limit.saturating_mul(4)).unwrap_err().to_string().contains("this process may use"));
        // A petabyte from libtorch: tch panics inside, the caller gets an error with the size and exit 1.
        let e = allocating("a petabyte", 1 << 50, || tch::Tensor::zeros([1i64 << 48], (tch::Kind::Float, tch::Device::Cpu))).unwrap_err();
        assert_eq!(e.exit_code(), 1);
        assert!(e.to_string().contains("1048576.0 GiB") && e.to_string().contains("may use"), "{e}");
        let e = tch::Tensor::f_zeros([1i64 << 48], (tch::Kind::Float, tch::Device::Cpu)).map_err(|e| torch_alloc("a petabyte", 1 << 50, e)).unwrap_err();
        assert!(matches!(e, crate::Error::OutOfMemory { .. }), "{e}");
    }
}
