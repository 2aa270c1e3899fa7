//! Ctrl-C (SIGINT) and SIGTERM: a clean stop instead of a silent kill.
//!
//! [`install`] (called by the command-line entry point) points both signals at a handler that only writes the
//! signal's number into a pipe; a watcher thread reads it, so nothing but that `write` runs in signal context.
//! What the watcher does depends on where the process is:
//! - inside [`safe_points`] (pretraining in one process), the first signal only sets the flag that
//!   [`interrupted`] reports: the training loop checks it after each optimiser step, saves a checkpoint there and
//!   returns [`crate::Error::Interrupted`], which the command turns into one line saying how to resume and exit
//!   code 130 (SIGINT) or 143 (SIGTERM), as a shell reports a process killed by the signal;
//! - anywhere else, and at a second signal, it stops at once: it removes the temporary files this process is
//!   writing (`crate::fsutil`), prints the line of [`set_resume_hint`] and exits with the same codes. Files under
//!   their final names are always complete (they are renamed into place), so stopping at once loses only work.
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::Mutex;

/// A signal that stops a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Int,
    Term,
}

impl Signal {
    fn from_raw(n: i32) -> Option<Signal> {
        match n {
            libc::SIGINT => Some(Signal::Int),
            libc::SIGTERM => Some(Signal::Term),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Signal::Int => "SIGINT",
            Signal::Term => "SIGTERM",
        }
    }
    /// 128 + the signal's number, the status a shell shows for a process the signal killed.
    pub fn exit_code(self) -> i32 {
        match self {
            Signal::Int => 128 + libc::SIGINT,
            Signal::Term => 128 + libc::SIGTERM,
        }
    }
}

impl std::fmt::Display for Signal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The first signal received (0: none).
static RECEIVED: AtomicI32 = AtomicI32::new(0);
/// Write end of the pipe the handler writes into (-1: not installed).
static PIPE_WRITE: AtomicI32 = AtomicI32::new(-1);
/// Open [`SafePoints`] guards.
static SAFE_POINTS: AtomicUsize = AtomicUsize::new(0);
static HINT: Mutex<Option<String>> = Mutex::new(None);
/// Set when the watcher has begun to stop the process at once.
static STOPPING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// Set once the command's work is on disk: a signal after it is no failure.
static FINISHED: Mutex<Option<String>> = Mutex::new(None);

/// Says that the command's result is complete on disk (`what` names it): a signal from now on stops the
/// process with exit 0 and that line, since there is nothing left to redo.
pub fn set_finished(what: impl Into<String>) {
    *FINISHED.lock().unwrap_or_else(|e| e.into_inner()) = Some(what.into());
}

/// The signal that asked this process to stop, if one did.
pub fn interrupted() -> Option<Signal> {
    Signal::from_raw(RECEIVED.load(Ordering::SeqCst))
}

/// Whether the watcher is stopping the process at once: an error the work meets from now on (a temporary file
/// it removed) is a consequence of the stop, and its line would only confuse the stop's own.
pub fn stopping() -> bool {
    STOPPING.load(Ordering::SeqCst)
}

/// While the returned guard lives, the first signal waits for the caller to reach a safe point (it polls
/// [`interrupted`]); a second one still stops at once.
pub fn safe_points() -> SafePoints {
    SAFE_POINTS.fetch_add(1, Ordering::SeqCst);
    SafePoints(())
}

/// See [`safe_points`].
#[must_use]
pub struct SafePoints(());

impl Drop for SafePoints {
    fn drop(&mut self) {
        SAFE_POINTS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What the line printed at an immediate stop says after "interrupted by SIGINT": how to resume.
pub fn set_resume_hint(hint: impl Into<String>) {
    *HINT.lock().unwrap_or_else(|e| e.into_inner()) = Some(hint.into());
}

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = PIPE_WRITE.load(Ordering::Relaxed);
    if fd >= 0 {
        let b = sig as u8;
        // SAFETY: write(2) is async-signal-safe; a full pipe (many signals at once) drops this byte, not the first.
        unsafe {
            libc::write(fd, (&b as *const u8).cast(), 1);
        }
    }
}

/// Installs the handler and its watcher thread; later calls do nothing.
pub fn install() {
    if PIPE_WRITE.load(Ordering::SeqCst) >= 0 {
        return;
    }
    let mut fds = [0i32; 2];
    // SAFETY: plain POSIX calls on descriptors this function creates; the handler only writes to the pipe.
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) != 0 {
            return;
        }
        // The read end blocks: the watcher waits in it.
        libc::fcntl(fds[0], libc::F_SETFL, 0);
        PIPE_WRITE.store(fds[1], Ordering::SeqCst);
        let read_end = fds[0];
        if std::thread::Builder::new().name("signals".into()).spawn(move || watch(read_end)).is_err() {
            return;
        }
        for sig in [libc::SIGINT, libc::SIGTERM] {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

fn watch(read_end: i32) {
    loop {
        let mut b = 0u8;
        // SAFETY: reads one byte into a local from a descriptor this thread owns.
        let n = unsafe { libc::read(read_end, (&mut b as *mut u8).cast(), 1) };
        if n != 1 {
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        let Some(sig) = Signal::from_raw(b as i32) else { continue };
        let first = RECEIVED.compare_exchange(0, b as i32, Ordering::SeqCst, Ordering::SeqCst).is_ok();
        if first && SAFE_POINTS.load(Ordering::SeqCst) > 0 {
            eprintln!("\n{sig}: stopping after the current step (send it again to stop at once)");
            continue;
        }
        stop_now(interrupted().unwrap_or(sig));
    }
}

/// Removes this process's temporary files, prints how to resume, and exits without running destructors (other
/// threads are still inside libtorch).
fn stop_now(sig: Signal) -> ! {
    STOPPING.store(true, Ordering::SeqCst);
    crate::fsutil::remove_own_temps();
    let dirs = crate::fsutil::remove_own_temp_dirs();
    if let Some(done) = FINISHED.lock().unwrap_or_else(|e| e.into_inner()).clone() {
        eprintln!("\n{sig} after the work was done: {done}");
        drain_stderr();
        // SAFETY: as below; the result is complete on disk.
        unsafe { libc::_exit(0) }
    }
    for d in &dirs {
        eprintln!("\nremoved the unfinished {}", d.display());
    }
    let hint = HINT.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let hint = hint.unwrap_or_else(|| "nothing partial was kept; run the same command again".into());
    eprintln!("\ninterrupted by {sig}: {hint}");
    drain_stderr();
    // SAFETY: ends the process at once; everything that must survive is on disk under its final name.
    unsafe { libc::_exit(sig.exit_code()) }
}

/// Waits (up to 1 s) until what was written to fd 2 has been read, for when fd 2 is a pipe whose reader is this
/// process's own log thread; then gives that thread a moment to write it out. Called before `_exit`.
pub(crate) fn drain_stderr() {
    for _ in 0..100 {
        let mut pending: libc::c_int = 0;
        // SAFETY: FIONREAD into a local; on anything but a pipe it fails and the loop ends.
        if unsafe { libc::ioctl(2, libc::FIONREAD, &mut pending) } != 0 {
            return;
        }
        if pending == 0 {
            std::thread::sleep(std::time::Duration::from_millis(20));
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
