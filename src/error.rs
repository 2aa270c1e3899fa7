//! The library's error type. Every variant names the file or option that is at fault, so the command layer
//! can print it as is; `exit_code` maps errors to the CLI's convention (2 = usage or input error).
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `io` is shown in the message, not chained as a source, so that `{:#}` does not print it twice.
    #[error("{path}: {io}")]
    Io { path: PathBuf, io: std::io::Error },
    #[error("{path}: not a valid checkpoint: {reason}")]
    BadCheckpoint { path: PathBuf, reason: String },
    #[error("{path}: tensor `{name}` has shape {found:?}, the model expects {expected:?}")]
    ShapeMismatch { path: PathBuf, name: String, found: Vec<i64>, expected: Vec<i64> },
    #[error("{path}: missing tensors the model needs: {}", names.join(", "))]
    MissingKeys { path: PathBuf, names: Vec<String> },
    #[error("unknown architecture `{0}` (known: {known})", known = crate::model::vit::ARCH_NAMES.join(", "))]
    UnknownArch(String),
    #[error("{path}: {reason}")]
    BadConfig { path: PathBuf, reason: String },
    #[error("option {option}: {reason}")]
    BadOption { option: String, reason: String },
    #[error("{path}: {reason}")]
    BadData { path: PathBuf, reason: String },
    #[error("{0}")]
    Torch(#[from] tch::TchError),
    #[error("training diverged: {0}")]
    Diverged(String),
    /// A NaN or infinity in an evaluation's numbers (features, a propagated mask, a solver's state): the run stops
    /// rather than score it.
    #[error("not finite: {0}")]
    NonFinite(String),
    /// An allocation that the size checks let through failed (the memory in use by then, or a limit they could
    /// not see).
    #[error("out of memory: {what} need about {gib:.1} GiB and the allocation failed; this process may use {limit} ({detail})")]
    OutOfMemory { what: String, gib: f64, limit: String, detail: String },
    #[error(
        "{dir}: another run ({}) is writing into this folder; wait for it to finish or choose another output folder",
        .pid.map_or_else(|| "PID unknown".to_string(), |p| format!("PID {p}"))
    )]
    FolderBusy { dir: PathBuf, pid: Option<u32> },
    /// SIGINT or SIGTERM stopped the run at a safe point; the message says how to resume.
    #[error("interrupted by {signal}: {resume}")]
    Interrupted { signal: crate::signals::Signal, resume: String },
    /// A collective or the rendezvous of a data-parallel run failed (a peer died, timed out or never came).
    #[error("distributed: {0}")]
    Dist(String),
    /// The ranks of a data-parallel run were started on different inputs (a resume point, a data set): an input
    /// error, found before any collective.
    #[error("distributed: the ranks disagree on {0}")]
    RanksDisagree(String),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), io: source }
    }
    pub fn option(option: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::BadOption { option: option.into(), reason: reason.into() }
    }
    pub fn data(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::BadData { path: path.into(), reason: reason.into() }
    }
    pub fn checkpoint(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::BadCheckpoint { path: path.into(), reason: reason.into() }
    }

    /// Exit code under the CLI convention: 2 for bad input or usage, 1 for anything that went wrong at run time.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Torch(_) | Error::Diverged(_) | Error::NonFinite(_) | Error::Dist(_) | Error::OutOfMemory { .. } => 1,
            Error::Interrupted { signal, .. } => signal.exit_code(),
            Error::Io { io, .. } if io.kind() == std::io::ErrorKind::BrokenPipe => 0,
            // A full or read-only disk, or a file-size limit, is a failure of the run, not a bad input.
            Error::Io { io, .. } if matches!(io.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded | std::io::ErrorKind::ReadOnlyFilesystem | std::io::ErrorKind::FileTooLarge) => 1,
            _ => 2,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
