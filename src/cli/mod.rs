//! Command-line interface: argument parsing (clap derive; the doc comments are the `--help`), and the mapping of
//! errors to exit codes: 0 ok, 1 a check failed or a run went wrong, 2 usage or input error.
mod bench_cmds;
pub mod data;
pub mod eval;
mod model_cmds;
pub mod plot;
pub mod report;
#[cfg(unix)]
mod stderr_pipe;
pub mod suite;
mod train_cmds;
pub mod visualize;

use clap::{Parser, Subcommand};

/// Latent MIM pretraining and NN / LP / Ft evaluation of Vision Transformers, on libtorch.
#[derive(Debug, Parser)]
#[command(name = "lmim-bench", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print versions (crate, git commit, libtorch, CUDA, cuDNN), devices and the libtorch path.
    Info(model_cmds::InfoArgs),
    /// Run a ViT forward pass on generated images and print the output shapes and speed.
    Forward(model_cmds::ForwardArgs),
    /// Convert a checkpoint (PyTorch .pth/.pt or safetensors; timm, MAE or Latent MIM keys) into a timm-named
    /// safetensors ViT checkpoint with `arch` and `config` metadata.
    Convert(model_cmds::ConvertArgs),
    /// Prepare and inspect data sets (the Fashion-MNIST demo set, generated sets, fingerprints).
    Data(data::DataArgs),
    /// Pretrain a ViT with Latent MIM (config file plus `--set key=value` overrides); resumes from the newest
    /// checkpoint in the output directory.
    Pretrain(train_cmds::PretrainArgs),
    /// Write the randomly initialised encoder of a pretraining config (step 0), for baseline evaluations.
    Init(train_cmds::InitArgs),
    /// Extract features of a checkpoint over a data split into a cached safetensors file.
    Extract(eval::ExtractArgs),
    /// Evaluate a checkpoint with a protocol (nn-loo, knn, knn-sweep, linear, attentive, finetune, linear-sweep,
    /// davis, lowshot) and write a results record.
    Eval(eval::EvalArgs),
    /// Evaluate a checkpoint on every axis of a suite file (k-NN, probes, DAVIS, low-shot, ...) in one job:
    /// checked before any work, cheap entries first, resumable (entries whose record exists are kept), the table
    /// row at the end; exit 1 when an entry failed or `--reference` finds a regression.
    Suite(suite::SuiteArgs),
    /// Render results records as an NN / LP / Ft table beside the reference numbers (Markdown, CSV or JSON).
    Table(report::TableArgs),
    /// Compare results with a reference or a baseline; exit 1 when a metric falls below reference - tolerance.
    Check(report::CheckArgs),
    /// Segmentation maps by hierarchical clustering of an image's patch features, nested at a few levels, and
    /// a t-SNE of the same features: one PNG figure and one JSON of labels and points per image.
    Visualize(visualize::VisualizeArgs),
    /// Draw training curves of runs (loss, lr, monitors over steps; one line per run) or, with --results, a bar
    /// chart of NN / k-NN / LP / Ft per model beside the published numbers, as PNG.
    Plot(plot::PlotArgs),
    /// Time the training loops (pretraining step, fine-tuning step, linear sweep) and print JSON with img/s and
    /// peak memory.
    Bench(bench_cmds::BenchArgs),
}

/// How a command finds the files of its `--data`.
#[derive(Debug, Clone, clap::Args)]
pub struct ScanArgs {
    /// Walk the dataset's folders (or its shards' tar headers) even when the cached index is up to date, e.g.
    /// after a file was rewritten in place, which the folders' modification times do not show.
    #[arg(long)]
    pub rescan: bool,
    /// Key the feature cache by a hash of every file's bytes instead of the files' times and inodes: reads the
    /// whole split once per run, for file systems (some network or FUSE mounts) whose times cannot be trusted.
    #[arg(long)]
    pub content_key: bool,
}

impl ScanArgs {
    pub fn flags(&self) -> crate::data::ScanFlags {
        crate::data::ScanFlags { rescan: self.rescan, content_key: self.content_key }
    }
}

/// Options of a data-parallel run: one process per device started by `torchrun --no-python` or `srun`, which
/// set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT (or SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID /
/// SLURM_JOB_NODELIST). Without a launcher the command runs as one process.
#[derive(Debug, Clone, clap::Args)]
pub struct DistArgs {
    /// Collective back-end of a data-parallel run: nccl (the default when the run computes on CUDA) or gloo (the
    /// default with `--device cpu`).
    #[arg(long, value_enum, value_name = "BACKEND")]
    pub dist_backend: Option<crate::dist::Backend>,
    /// Seconds a rank waits for its peers (rendezvous and every collective) before it exits with an error;
    /// default PyTorch's: 1800 for gloo, 600 for nccl.
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=604_800))]
    pub dist_timeout: Option<u64>,
    /// Deterministic algorithms only (torch.use_deterministic_algorithms, cuDNN deterministic): bitwise repeats on
    /// CUDA at some speed; an operation without a deterministic kernel stops the run.
    #[arg(long)]
    pub deterministic: bool,
}

impl DistArgs {
    /// Joins the job's process group (a no-op without a launcher); `device` is the run's `--device`, which picks
    /// the default back-end (`cpu` gives Gloo even on a machine with GPUs).
    pub fn init(&self, device: &str) -> anyhow::Result<&'static crate::dist::World> {
        if self.deterministic {
            crate::device::set_deterministic(true)?;
        }
        // Every rank would read the same `cuda:N` and share one GPU; a rank's GPU follows its local rank.
        let launch = crate::dist::LaunchEnv::from_env()?;
        if launch.world_size > 1 && device.trim().starts_with("cuda:") {
            return Err(crate::Error::option(
                "--device",
                format!("`{device}` names one GPU for all {} ranks of this run; use `cuda` (each rank takes the GPU of its local rank) and choose the GPUs with CUDA_VISIBLE_DEVICES", launch.world_size),
            )
            .into());
        }
        let opts = crate::dist::DistOptions {
            backend: self.dist_backend,
            timeout: self.dist_timeout.map(std::time::Duration::from_secs),
            cuda: crate::info::wants_cuda(device)?,
        };
        Ok(crate::dist::init(&opts)?)
    }
}

/// Exit code of an error: the library's own classification where there is one, 2 for I/O and parse problems of
/// the user's inputs, 1 otherwise.
/// `--batch-size` of feature extraction: 1..=65536 images (a batch of 65536 224-px images is 39 GB already).
pub(crate) fn batch_size(s: &str) -> Result<usize, String> {
    bounded(s, 1, 65_536)
}

/// `--workers`: 0 (all cores) ..= 1024 decode threads.
pub(crate) fn workers(s: &str) -> Result<usize, String> {
    bounded(s, 0, 1024)
}

/// `--repeat`: 0..=100000 timed passes.
pub(crate) fn repeats(s: &str) -> Result<usize, String> {
    bounded(s, 0, 100_000)
}

fn bounded(s: &str, lo: usize, hi: usize) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(v) if (lo..=hi).contains(&v) => Ok(v),
        _ => Err(format!("`{s}` is not a whole number in {lo}..={hi}")),
    }
}

/// An output folder: `-` (which would become a folder named `-`) and the empty path are refused.
pub(crate) fn output_dir(s: &str) -> Result<std::path::PathBuf, String> {
    match s {
        "-" => Err("`-` is not a folder: records and runs are written into a folder (print a record with --json)".into()),
        "" => Err("empty path".into()),
        s => Ok(s.into()),
    }
}

/// `--from FAMILY` (clap reports a bad value as a usage error, exit 2).
pub(crate) fn parse_family(s: &str) -> Result<crate::checkpoint::Family, String> {
    crate::checkpoint::Family::parse(s).map_err(|e| e.to_string())
}

pub fn exit_code(err: &anyhow::Error) -> i32 {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<crate::Error>() {
            return e.exit_code();
        }
        if let Some(e) = cause.downcast_ref::<std::io::Error>() {
            return if e.kind() == std::io::ErrorKind::BrokenPipe { 0 } else { 2 };
        }
    }
    1
}

/// Runs a command; returns the exit code of a completed command (1 for a failed check).
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Check(a) => return report::check(a),
        Command::Bench(a) => return bench_cmds::bench(a),
        Command::Suite(a) => return suite::suite(a),
        _ => {}
    }
    match cli.command {
        Command::Info(a) => model_cmds::info(a),
        Command::Forward(a) => model_cmds::forward(a),
        Command::Convert(a) => model_cmds::convert(a),
        Command::Data(a) => data::run(a),
        Command::Pretrain(a) => train_cmds::pretrain(a),
        Command::Init(a) => train_cmds::init(a),
        Command::Extract(a) => eval::extract(a),
        Command::Eval(a) => eval::eval(a),
        Command::Table(a) => report::table(a),
        Command::Check(_) | Command::Bench(_) | Command::Suite(_) => unreachable!("handled above"),
        Command::Visualize(a) => visualize::visualize(a),
        Command::Plot(a) => plot::plot(a),
    }
    .map(|()| 0)
}

/// glibc hands freed blocks above its mmap threshold back to the kernel and trims the heap top, so every training
/// step maps and zero-fills its activations' pages again (page faults and `clear_page` took 3-5 % of a CPU step).
/// Keeping freed memory in the heap, as PyTorch's recommended jemalloc/tcmalloc set-ups do, removes that work;
/// `LMIM_MALLOC=default` keeps glibc's behaviour.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var("LMIM_MALLOC").map_or(true, |v| v != "default") {
        // SAFETY: mallopt only changes allocator parameters; called before any other thread allocates.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            libc::mallopt(libc::M_TOP_PAD, 256 << 20);
        }
    }
}

/// The message a panic carries.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| payload.downcast_ref::<String>().cloned()).unwrap_or_else(|| "a panic without a message".into())
}

/// In a data-parallel run a panic in any thread of a rank takes the error path of the whole job: its reason in the
/// store, the group aborted, exit 1, the peers out within a second ([`crate::dist::fail_on_panic`]); elsewhere
/// Rust's own report, then the command boundary turns a main-thread panic into exit 1.
fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let at = info.location().map_or(String::new(), |l| format!(" at {}:{}", l.file(), l.line()));
        let msg = format!("panicked{at}: {}", panic_text(info.payload()));
        if !crate::dist::fail_on_panic(&msg) {
            default(info);
        }
    }));
}

/// Entry point of the binary; returns the process exit code.
pub fn main() -> i32 {
    keep_freed_memory();
    // One rule for a closed stdout pipe (`lmim-bench table | head`, `eval ... 2>&1 | head -1`) in every command:
    // the write fails with EPIPE, which `results::write_output` takes as the reader having had enough, and the
    // command finishes its work and exits 0 (a closed stderr pipe is `stderr_pipe`'s).
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        // A file-size limit (`ulimit -f`) makes the write fail with EFBIG, which the writers report and roll back,
        // instead of killing the process mid-write.
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    #[cfg(unix)]
    let _stderr = stderr_pipe::install();
    crate::signals::install();
    install_panic_hook();
    crate::protocols::knn::quiet_faiss_blas();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    // A panic of the main thread (a bug, or a tch call that unwraps: CUDA out of memory is the likeliest) ends the
    // command as an error does: exit 1 with its reason (in a data-parallel run the hook has already ended the rank).
    let outcome = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(cli))) {
        Ok(o) => o,
        Err(p) => Err(anyhow::anyhow!("internal error: {}", panic_text(p.as_ref()))),
    };
    // Every exit path ends the process group: a failure is told to the peers (they stop at once instead of
    // waiting for a collective that never completes), a success shuts NCCL down as it must be before exit.
    match outcome {
        Ok(code) => {
            crate::dist::shutdown(None);
            code
        }
        Err(e) => {
            if crate::signals::stopping() {
                // The watcher ends the process with the stop's own line and code.
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
            }
            let code = exit_code(&e);
            match e.chain().find_map(|c| c.downcast_ref::<crate::Error>()) {
                // Not an error: the one line says where the run stopped and how to resume.
                Some(i @ crate::Error::Interrupted { .. }) => eprintln!("{i}"),
                _ if code != 0 => eprintln!("error: {e:#}"),
                _ => {}
            }
            let msg = format!("{e:#}");
            crate::dist::shutdown_with((code != 0).then_some((msg.as_str(), code)));
            code
        }
    }
}
