// Links the binary against libtorch so that it starts without LD_LIBRARY_PATH and, on a GPU machine,
// really loads libtorch_cuda: the linker would otherwise drop it because no symbol is referenced directly.
// Compiles the C++ shim (csrc/: c10d for data parallelism, the fused AdamW kernel) against the same libtorch's
// headers.
use std::path::{Path, PathBuf};

fn main() {
    git_commit();
    jpeg_decoder();
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    println!("cargo:rustc-env=LMIM_LIBTORCH_LIB={lib}");
    let cuda = Path::new(&lib).join("libtorch_cuda.so").exists();
    if cuda {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,-lc10_cuda,--as-needed");
    }
    c10d_shim(Path::new(&lib), cuda);
}

/// Every C++ file of the shim (the NCCL one compiled only with the CUDA headers; the header is in the build key).
const SHIM_SOURCES: [&str; 5] = ["csrc/c10d_shim.cpp", "csrc/aten_shim.cpp", "csrc/nccl_shim.cpp", "csrc/cuda_shim.cpp", "csrc/shim_error.h"];

/// Where gloo's headers are, which the torch wheel does not ship: the folder LMIM_GLOO_INCLUDE names (an error when
/// it lacks them), else the system's (Debian's libgloo-dev); None builds the shim without Gloo.
fn gloo_include() -> Option<PathBuf> {
    println!("cargo:rerun-if-env-changed=LMIM_GLOO_INCLUDE");
    if let Some(dir) = std::env::var_os("LMIM_GLOO_INCLUDE").filter(|v| !v.is_empty()).map(PathBuf::from) {
        if !dir.join("gloo/config.h").exists() {
            panic!("LMIM_GLOO_INCLUDE={}: no gloo/config.h there (it must name the folder holding gloo/)", dir.display());
        }
        return Some(dir);
    }
    let system = PathBuf::from("/usr/include");
    if system.join("gloo/config.h").exists() {
        println!("cargo:rerun-if-changed=/usr/include/gloo/config.h");
        return Some(system);
    }
    // A missing file would rerun this script on every build; the folder changes when libgloo-dev is installed.
    println!("cargo:rerun-if-changed=/usr/include");
    println!(
        "cargo:warning=Gloo is left out (no gloo headers in /usr/include and LMIM_GLOO_INCLUDE is not set): CPU runs \
         are single-process; Debian's libgloo-dev or LMIM_GLOO_INCLUDE brings it"
    );
    None
}

/// The shim needs gloo's headers for its Gloo part ([`gloo_include`]), and for NCCL the CUDA runtime + crt + cccl
/// and NCCL headers of the CUDA wheels.
fn c10d_shim(lib: &Path, cuda: bool) {
    for f in SHIM_SOURCES {
        println!("cargo:rerun-if-changed={f}");
    }
    let torch = lib.parent().expect("libtorch lib dir has a parent");
    let include = torch.join("include");
    let gloo = gloo_include();
    let base = |b: &mut cc::Build| {
        b.cpp(true)
            .std("c++17")
            .define("_GLIBCXX_USE_CXX11_ABI", "1")
            .include(&include)
            .include(include.join("torch/csrc/api/include"))
            .flag_if_supported("-Wno-interference-size")
            .warnings(false);
    };
    let mut shim = cc::Build::new();
    base(&mut shim);
    if let Some(gloo) = &gloo {
        shim.define("USE_C10D_GLOO", None).define("LMIM_WITH_GLOO", None).include(gloo);
        println!("cargo:rustc-cfg=lmim_gloo");
    }
    println!("cargo:rustc-check-cfg=cfg(lmim_gloo)");
    // tests/noroot_setup.rs needs a private mount namespace (root and unshare): where one cannot be made the test
    // is reported as ignored, with the reason, rather than passing without having run.
    println!("cargo:rustc-check-cfg=cfg(lmim_noroot)");
    if std::process::Command::new("unshare").args(["--mount", "true"]).stderr(std::process::Stdio::null()).status().is_ok_and(|s| s.success()) {
        println!("cargo:rustc-cfg=lmim_noroot");
    }
    // tests/data_loader.rs's decode-thread test needs two CPUs and a whole-node affinity mask (to make a narrower
    // one): where the build saw neither it is reported as ignored, with the reason, not passed without running.
    println!("cargo:rustc-check-cfg=cfg(lmim_whole_node_mask)");
    let count = |cmd: &str, args: &[&str]| -> Option<usize> {
        let o = std::process::Command::new(cmd).args(args).output().ok()?;
        String::from_utf8_lossy(&o.stdout).trim().parse().ok()
    };
    if let (Some(mask), Some(online)) = (count("nproc", &[]), count("getconf", &["_NPROCESSORS_ONLN"])) {
        if online >= 2 && mask == online {
            println!("cargo:rustc-cfg=lmim_whole_node_mask");
        }
    }
    shim.file("csrc/c10d_shim.cpp").file("csrc/aten_shim.cpp");
    // The CUDA wheels' headers sit beside torch in site-packages.
    let nvidia = torch.parent().map(|p| p.join("nvidia"));
    let cuda_inc = nvidia.as_ref().map(|n| n.join("cu13/include"));
    let nccl_inc = nvidia.as_ref().map(|n| n.join("nccl/include"));
    // The CUDA helpers (csrc/cuda_shim.cpp: device binding, pinning, the copy stream, peak memory) need the CUDA
    // runtime headers; the NCCL process group needs NCCL's too. Each part has its own cfg.
    let cuda_headers = cuda && cuda_inc.as_ref().is_some_and(|p| p.join("cuda_runtime.h").exists() && p.join("crt/host_config.h").exists());
    let nccl = cuda_headers && nccl_inc.as_ref().is_some_and(|p| p.join("nccl.h").exists());
    if cuda_headers {
        shim.file("csrc/cuda_shim.cpp").define("USE_CUDA", None).include(cuda_inc.unwrap());
        println!("cargo:rustc-cfg=lmim_cuda");
    }
    if nccl {
        shim.define("LMIM_WITH_NCCL", None).file("csrc/nccl_shim.cpp").define("USE_C10D_NCCL", None).include(nccl_inc.unwrap());
        println!("cargo:rustc-cfg=lmim_nccl");
    } else if cuda {
        println!("cargo:warning=NCCL is left out: the CUDA (crt, cccl) or NCCL headers are not beside torch; scripts/env.sh installs them");
    }
    println!("cargo:rustc-check-cfg=cfg(lmim_nccl)");
    println!("cargo:rustc-check-cfg=cfg(lmim_cuda)");
    // The build script reruns on every commit (git_commit); the shim takes a minute to compile, so it is rebuilt
    // only when its sources or headers' location change.
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let mut key = format!("{} {:?} {cuda_headers} {nccl}\n", include.display(), gloo);
    for f in SHIM_SOURCES {
        key.push_str(&std::fs::read_to_string(f).unwrap_or_default());
    }
    let stamp = out.join("lmim_c10d.key");
    if out.join("liblmim_c10d.a").exists() && std::fs::read_to_string(&stamp).is_ok_and(|k| k == key) {
        println!("cargo:rustc-link-search=native={}", out.display());
        println!("cargo:rustc-link-lib=static=lmim_c10d");
        println!("cargo:rustc-link-lib=stdc++");
    } else {
        shim.compile("lmim_c10d");
        std::fs::write(&stamp, key).expect("write the shim's build key");
    }
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}

/// Names the JPEG decoder of this build for `info` and every record's provenance (pixels differ between decoders):
/// libjpeg-turbo's version from the jconfig.h that turbojpeg-sys built (always with SIMD: `require-simd`), or
/// zune-jpeg's from Cargo.lock.
fn jpeg_decoder() {
    let name = if std::env::var_os("CARGO_FEATURE_TURBOJPEG").is_some() {
        println!("cargo:rerun-if-env-changed=DEP_TURBOJPEG_INCLUDE");
        let version = std::env::var("DEP_TURBOJPEG_INCLUDE")
            .ok()
            .and_then(|dirs| dirs.split(',').find_map(|d| std::fs::read_to_string(Path::new(d).join("jconfig.h")).ok()))
            .and_then(|h| h.lines().find_map(|l| l.strip_prefix("#define LIBJPEG_TURBO_VERSION").map(|v| v.trim().to_string())))
            .unwrap_or_else(|| "unknown version".into());
        format!("libjpeg-turbo {version} (SIMD)")
    } else {
        println!("cargo:rerun-if-changed=Cargo.lock");
        let lock = std::fs::read_to_string("Cargo.lock").unwrap_or_default();
        let version = lock
            .split("[[package]]")
            .filter(|p| p.contains("name = \"zune-jpeg\"\n"))
            .find_map(|p| p.lines().find_map(|l| l.strip_prefix("version = \"0.4.")).map(|v| format!("0.4.{}", v.trim_end_matches('"'))))
            .unwrap_or_else(|| "0.4".into());
        format!("zune-jpeg {version}")
    };
    println!("cargo:rustc-env=LMIM_JPEG_DECODER={name}");
}

/// Records the commit the binary was built from; results carry it as provenance.
fn git_commit() {
    for f in [".git/HEAD", ".git/index"] {
        if Path::new(f).exists() {
            println!("cargo:rerun-if-changed={f}");
        }
    }
    let run = |args: &[&str]| {
        std::process::Command::new("git").args(args).output().ok().filter(|o| o.status.success()).map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let mut commit = run(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into());
    if run(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty()) {
        commit.push_str("-dirty");
    }
    println!("cargo:rustc-env=LMIM_GIT_COMMIT={commit}");
}
