//! Log output that survives a closed stderr pipe (`lmim-bench pretrain ... 2>&1 | head -1`).
//!
//! `main` ignores SIGPIPE so that a closed *stdout* is an EPIPE that every command handles the same way; but then
//! `eprintln!` to a closed stderr pipe would panic, and a progress bar or a libtorch warning would end a training
//! run. When stderr is a pipe or socket, fd 2 is therefore pointed at a pipe
//! of our own, whose read end never closes, and one thread copies it to the real stderr with SIGPIPE blocked in
//! that thread (should the disposition change, the signal stays pending there and the write
//! returns EPIPE). After EPIPE the thread discards what follows. This covers every writer of fd 2: `eprintln!`,
//! progress bars and libtorch's C++ warnings.
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, RawFd};

/// Restores the real stderr and waits until everything written before has been copied to it, when dropped
/// (also while a panic unwinds, so a panic message is not lost).
pub struct Guard {
    real: RawFd,
    copier: Option<std::thread::JoinHandle<()>>,
}

/// Installs the copier when stderr is a pipe or a socket; `None` (stderr untouched) otherwise or on any failure.
pub fn install() -> Option<Guard> {
    // SAFETY: plain POSIX calls on file descriptors this function owns or that the process has (0-2).
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(2, &mut st) != 0 {
            return None;
        }
        let kind = st.st_mode & libc::S_IFMT;
        if kind != libc::S_IFIFO && kind != libc::S_IFSOCK {
            return None;
        }
        let real = libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 3);
        if real < 0 {
            return None;
        }
        let mut fds = [0 as RawFd; 2];
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            libc::close(real);
            return None;
        }
        let (read_end, write_end) = (fds[0], fds[1]);
        // Every descriptor is checked: a -1 handed to the copier thread would panic it in `File::from_raw_fd`.
        let copy_to = libc::fcntl(real, libc::F_DUPFD_CLOEXEC, 3);
        if copy_to < 0 {
            for fd in [read_end, write_end, real] {
                libc::close(fd);
            }
            return None;
        }
        let spawned = std::thread::Builder::new().name("stderr".into()).spawn(move || copy(read_end, copy_to));
        let Ok(copier) = spawned else {
            for fd in [read_end, write_end, real, copy_to] {
                libc::close(fd);
            }
            return None;
        };
        if libc::dup2(write_end, 2) < 0 {
            // fd 2 is untouched: closing the write end ends the copier, and stderr stays as it was.
            libc::close(write_end);
            let _ = copier.join();
            libc::close(real);
            return None;
        }
        libc::close(write_end);
        Some(Guard { real, copier: Some(copier) })
    }
}

fn copy(read_end: RawFd, real: RawFd) {
    // SAFETY: blocks SIGPIPE for this thread only; the descriptors are owned by this thread from here on.
    let (mut from, mut to) = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGPIPE);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        (File::from_raw_fd(read_end), File::from_raw_fd(real))
    };
    let mut buf = [0u8; 8192];
    let mut open = true;
    loop {
        match from.read(&mut buf) {
            Ok(0) => return,
            // A closed or failing stderr loses the log, never the run: keep draining so writers never block.
            Ok(n) if open => open = to.write_all(&buf[..n]).is_ok(),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = std::io::stderr().flush();
        // SAFETY: puts the real stderr back on fd 2, which closes the last write end of our pipe, so the copier
        // reads to the end and returns.
        unsafe {
            libc::dup2(self.real, 2);
            libc::close(self.real);
        }
        if let Some(c) = self.copier.take() {
            let _ = c.join();
        }
    }
}
