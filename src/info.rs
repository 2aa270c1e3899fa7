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

/// This machine's memory in bytes (`MemTotal`), None where it cannot be read.
pub fn memory_total() -> Option<u128> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u128 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Refuses, naming `option`, a size whose `bytes` cannot fit in this machine's memory, before libtorch is asked
/// for them (a failed allocation there is a panic, not an error). `what` says what the bytes are for.
pub fn check_fits(option: &str, what: &str, bytes: u128) -> crate::Result<()> {
    // Without /proc/meminfo: 16 TiB, more than any one machine holds.
    let total = memory_total().unwrap_or(16 << 40);
    if bytes > total {
        let gib = |b: u128| b as f64 / (1u128 << 30) as f64;
        return Err(crate::Error::option(option, format!("{what} need about {:.1} GiB, more than this machine's {:.1} GiB of memory", gib(bytes), gib(total))));
    }
    Ok(())
}

/// Rough peak bytes of a ViT forward pass (no grad) over `batch` images: a few tensors of the widest layer
/// (the MLP's hidden tokens or the attention matrix) live at once.
pub fn vit_forward_bytes(cfg: &crate::model::VitConfig, batch: u128) -> u128 {
    let tokens = ((cfg.img_size / cfg.patch_size.max(1)).pow(2) + 1).max(1) as u128;
    let widest = ((cfg.embed_dim as f64 * cfg.mlp_ratio) as u128).max(cfg.num_heads.max(1) as u128 * tokens);
    let input = 3 * (cfg.img_size.max(1) as u128).pow(2);
    batch * 4 * (input + 4 * tokens * widest)
}
