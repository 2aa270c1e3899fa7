//! Durable, concurrency-safe file writing: atomic replacement with fsync, publication that never overwrites,
//! appends of whole lines under an exclusive lock, a per-folder run lock, and the clean-up of temporary files that
//! a killed process left behind.
//!
//! Temporary files are named `<name>.tmp-<PID>` (`<name>.tmp-<PID>-<N>` when one process writes several at once),
//! so that [`clean_stale_temps`] can tell a dead writer's leftovers from a live writer's work in progress.
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// Distinguishes the temporary files of one process's threads.
static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Temporary files this process is writing, removed by [`remove_own_temps`] when a signal stops it at once.
static OWN_TEMPS: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

fn own_temps() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    OWN_TEMPS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Temporary folders this process is filling (a `data pack`), removed with their content at a signal.
static OWN_TEMP_DIRS: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

fn own_temp_dirs() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    OWN_TEMP_DIRS.lock().unwrap_or_else(|e| e.into_inner())
}

/// A temporary folder this process fills: removed (with its content) by [`remove_own_temp_dirs`] when a signal
/// stops the process, and by the guard's drop unless [`TempDir::keep`] was called (it was renamed into place).
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `path` (a stale one of the same name, from an earlier process with this PID, is emptied first).
    pub fn create(path: PathBuf) -> Result<TempDir> {
        if path.exists() {
            std::fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        }
        std::fs::create_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        own_temp_dirs().push(path.clone());
        Ok(TempDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the folder to `dest` (which must not exist) and forgets it: it is no longer temporary.
    pub fn publish(self, dest: &Path) -> Result<()> {
        // Under the lock: a signal's clean-up either removes the folder before the rename or sees it published.
        let mut dirs = own_temp_dirs();
        std::fs::rename(&self.path, dest).map_err(|e| Error::io(dest, e))?;
        dirs.retain(|p| p != &self.path);
        drop(dirs);
        std::mem::forget(self);
        Ok(())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
        own_temp_dirs().retain(|p| p != &self.path);
    }
}

/// Removes the temporary folders this process was filling (for a stop at a signal). Returns those removed.
pub fn remove_own_temp_dirs() -> Vec<PathBuf> {
    let mut dirs = own_temp_dirs();
    // Renamed first: the writer, still running, can no longer add files to it by name (it would race the removal
    // and leave the folder behind); `-0` keeps it a temporary name of this PID for the stale clean-up.
    let gone = |p: &PathBuf| {
        let mut dead = p.clone().into_os_string();
        dead.push("-0");
        let dead = PathBuf::from(dead);
        let at = if std::fs::rename(p, &dead).is_ok() { dead } else { p.clone() };
        (0..100).any(|_| std::fs::remove_dir_all(&at).is_ok() || !at.exists() || {
            std::thread::sleep(std::time::Duration::from_millis(5));
            false
        })
    };
    let removed = dirs.iter().filter(|p| gone(p)).cloned().collect();
    dirs.clear();
    removed
}

/// Forgets a temporary file that was renamed, linked or removed.
fn temp_done(tmp: &Path) {
    own_temps().retain(|p| p != tmp);
}

/// Removes the temporary files this process has not yet published (for a stop at a signal, which leaves no
/// time for the writers to finish). Returns how many it removed.
pub fn remove_own_temps() -> usize {
    let mut temps = own_temps();
    let n = temps.iter().filter(|p| std::fs::remove_file(p).is_ok()).count();
    temps.clear();
    n
}

/// A fresh temporary name next to `path`: `<name>.tmp-<PID>` for the first, `<name>.tmp-<PID>-<N>` after.
fn temp_path(path: &Path) -> PathBuf {
    let seq = TEMP_SEQ.fetch_add(1, Ordering::Relaxed);
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".tmp-{}", std::process::id()));
    if seq > 0 {
        name.push(format!("-{seq}"));
    }
    path.with_file_name(name)
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// What a file type is, in words, for a refusal.
fn kind_of(t: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a named pipe (FIFO)"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a file"
    }
}

/// Opens a file the user named (a checkpoint, a config, a protocol file, an image) for reading, refusing anything
/// but a regular file of at most `limit` bytes, by name and before a byte is read: a FIFO would block in `open`
/// or `read` forever and `/dev/zero` (also behind a symlink) would be read until memory runs out.
/// The type is checked by `stat` before the open (so a device is never opened) and again by `fstat` on the
/// descriptor, which is opened non-blocking so that a FIFO swapped in between cannot block the open either.
/// The only guard of its kind: every reader of user files goes through it.
pub fn open_regular(path: &Path, limit: Option<u64>) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let refuse = |t: std::fs::FileType| Error::data(path, format!("{}, not a regular file", kind_of(t)));
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(refuse(meta.file_type()));
    }
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let meta = f.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(refuse(meta.file_type()));
    }
    if let Some(limit) = limit.filter(|&l| meta.len() > l) {
        return Err(Error::data(path, format!("{} bytes, more than the {limit} a file of this kind may have", meta.len())));
    }
    // Regular files never block; clearing the flag keeps later reads ordinary.
    // SAFETY: fcntl on a descriptor that `f` owns.
    unsafe {
        let flags = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
    Ok(f)
}

/// The bytes of a regular file of at most `limit` bytes (see [`open_regular`]).
pub fn read_regular(path: &Path, limit: Option<u64>) -> Result<Vec<u8>> {
    let f = open_regular(path, limit)?;
    let mut bytes = Vec::new();
    // `take`: a file that grows while it is read still stops at the limit.
    f.take(limit.unwrap_or(u64::MAX)).read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
    Ok(bytes)
}

/// Reads a text file the user named (a config, a record, a reference) through [`open_regular`].
pub fn read_regular_text(path: &Path, limit: Option<u64>) -> Result<String> {
    let bytes = read_regular(path, limit)?;
    String::from_utf8(bytes).map_err(|e| Error::data(path, format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to())))
}

/// Hex SHA-256 of a regular file's bytes (read through [`open_regular`]).
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut f = open_regular(path, None)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Size limit of config, protocol, reference and record files.
pub const TEXT_LIMIT: u64 = 16 << 20;

/// Size limit of an image file: a 179-Mpx image (the decoders' own limit) stored uncompressed is about 540 MB.
pub const IMAGE_LIMIT: u64 = 1 << 30;

/// Flushes a directory's entries (a rename or a new name) to disk.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(dir, e))
}

/// Writes `bytes` to a fresh temporary file next to `path` and syncs it; the caller publishes it.
fn write_temp(path: &Path, bytes: &[u8]) -> Result<PathBuf> {
    write_temp_with(path, &mut |w| w.write_all(bytes))
}

/// As [`write_temp`], with the content written by `fill` through a buffer.
fn write_temp_with(path: &Path, fill: &mut dyn FnMut(&mut dyn Write) -> std::io::Result<()>) -> Result<PathBuf> {
    let dir = parent_dir(path);
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    // A name taken already is the leftover of an earlier process that had the same PID: take the next one.
    let (tmp, mut file) = loop {
        let tmp = temp_path(path);
        match OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(f) => {
                own_temps().push(tmp.clone());
                break (tmp, f);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io(&tmp, e)),
        }
    };
    let written = (|| {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, &mut file);
        fill(&mut w)?;
        w.flush()?;
        drop(w);
        file.sync_all()
    })();
    if let Err(e) = written {
        // A full disk must not leave a half-written temporary behind as well.
        let _ = std::fs::remove_file(&tmp);
        temp_done(&tmp);
        return Err(Error::io(&tmp, e));
    }
    Ok(tmp)
}

/// Replaces `path` with `bytes` atomically: after a crash the file holds either the old or the new content, and
/// once this returns the new content is on disk (the file is synced before the rename, the folder after it).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = write_temp(path, bytes)?;
    let renamed = std::fs::rename(&tmp, path);
    if renamed.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    temp_done(&tmp);
    renamed.map_err(|e| Error::io(path, e))?;
    fsync_dir(parent_dir(path))
}

/// As [`write_atomic`], with the content written by `fill`: a large file need not be held in memory whole.
pub fn write_atomic_with(path: &Path, mut fill: impl FnMut(&mut dyn Write) -> std::io::Result<()>) -> Result<()> {
    let tmp = write_temp_with(path, &mut fill)?;
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    fsync_dir(parent_dir(path))
}

/// Writes `bytes` under a new name that no other writer holds: `<stem>.<ext>`, else `<stem>-2.<ext>`, `-3`, ...
/// The content is complete and synced before the name appears (a hard link, which fails if the name exists,
/// rather than a rename, which would overwrite). Returns the path written.
pub fn write_new_file(dir: &Path, stem: &str, ext: &str, bytes: &[u8]) -> Result<PathBuf> {
    let first = dir.join(format!("{stem}.{ext}"));
    let tmp = write_temp(&first, bytes)?;
    let result = (|| {
        for n in 1..=100_000u32 {
            let path = if n == 1 { first.clone() } else { dir.join(format!("{stem}-{n}.{ext}")) };
            match std::fs::hard_link(&tmp, &path) {
                Ok(()) => return Ok(path),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                // File systems without hard links: O_EXCL creation still never clobbers another writer.
                Err(_) => match OpenOptions::new().write(true).create_new(true).open(&path) {
                    Ok(mut f) => {
                        return match f.write_all(bytes).and_then(|_| f.sync_all()) {
                            Ok(()) => Ok(path),
                            Err(e) => {
                                let _ = std::fs::remove_file(&path);
                                Err(Error::io(&path, e))
                            }
                        };
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(Error::io(&path, e)),
                },
            }
        }
        Err(Error::io(&first, std::io::Error::other("100000 files of this name exist already")))
    })();
    let _ = std::fs::remove_file(&tmp);
    temp_done(&tmp);
    let path = result?;
    fsync_dir(dir)?;
    Ok(path)
}

/// The PID in a temporary name `<name>.tmp-<PID>` or `<name>.tmp-<PID>-<N>`.
pub(crate) fn temp_owner(file_name: &str) -> Option<i32> {
    let (_, tail) = file_name.rsplit_once(".tmp-")?;
    let (pid, seq) = tail.split_once('-').unwrap_or((tail, "0"));
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok().filter(|&p| p > 0)
}

/// Whether a process with this PID exists on this machine (EPERM: it exists but belongs to someone else).
pub fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Removes the temporary files (`*.tmp-<PID>`) in `dir` whose writer is no longer running, such as a checkpoint
/// that a `kill -9` interrupted; files of live processes are kept. Not recursive. A missing folder has nothing
/// to clean. Returns the files removed.
///
/// PIDs are those of this machine: do not share a folder between machines' concurrent runs.
pub fn clean_stale_temps(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(temp_owner) else { continue };
        if pid_alive(pid) || !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let path = entry.path();
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            // Another cleaner got there first.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&path, e)),
        }
    }
    removed.sort();
    Ok(removed)
}

/// Takes an exclusive `flock` on an open file; `Ok(false)` when `nonblocking` and another holder has it.
fn flock_exclusive(f: &File, nonblocking: bool) -> std::io::Result<bool> {
    let op = libc::LOCK_EX | if nonblocking { libc::LOCK_NB } else { 0 };
    loop {
        // SAFETY: flock on a file descriptor that `f` keeps open.
        if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) if nonblocking => return Ok(false),
            _ => return Err(e),
        }
    }
}

/// Appends text to a line-oriented file (a CSV table) safely when several processes append at once:
/// - under an exclusive `flock` on the file, so appends never interleave;
/// - `header` is written only when the file holds no complete line yet (checked under the lock, so exactly one
///   writer writes it; a header torn by an earlier failure is replaced);
/// - a last line left without its newline by an earlier failure (a full disk) is cut off, back to the last whole
///   line: ending it with a newline would leave a short row that readers of the file reject;
/// - header and lines go out in one write, and the file is synced before the lock is released.
///
/// `lines` must be whole lines, each ending with `\n`.
pub fn append_lines_locked(path: &Path, header: &[u8], lines: &[u8]) -> Result<()> {
    let io = |e| Error::io(path, e);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let mut f = OpenOptions::new().read(true).append(true).create(true).open(path).map_err(io)?;
    flock_exclusive(&f, false).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    let mut buf = Vec::with_capacity(header.len() + lines.len() + 1);
    match last_newline(&mut f, len).map_err(io)? {
        None => {
            f.set_len(0).map_err(io)?;
            buf.extend_from_slice(header);
        }
        Some(end) if end + 1 < len => f.set_len(end + 1).map_err(io)?,
        Some(_) => {}
    }
    buf.extend_from_slice(lines);
    let before = f.metadata().map_err(io)?.len();
    // O_APPEND: the write goes to the end even if the file was truncated above. A write that fails part-way (a
    // full disk) is cut back off, so the table keeps its previous rows and nothing torn.
    if let Err(e) = f.write_all(&buf).and_then(|_| f.sync_data()) {
        let _ = f.set_len(before).and_then(|_| f.sync_data());
        return Err(io(e));
    }
    Ok(())
    // The lock goes with the file descriptor.
}

/// The offset of the file's last `\n` before `len`, None when it has none (not even a whole line).
pub fn last_newline<F: Read + Seek>(f: &mut F, len: u64) -> std::io::Result<Option<u64>> {
    let mut buf = [0u8; 8192];
    let mut end = len;
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(end - start) as usize];
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(chunk)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            return Ok(Some(start + i as u64));
        }
        end = start;
    }
    Ok(None)
}

/// An exclusive lock on a run folder (`flock` on `<dir>/.lock`), held while a run writes into it and released
/// when dropped (also when the process dies, since the kernel drops the lock with the file descriptor). A second
/// run that tries to write into the same folder gets [`Error::FolderBusy`] naming the folder and the holder's PID.
#[derive(Debug)]
pub struct RunLock {
    file: File,
    path: PathBuf,
}

impl RunLock {
    /// Locks `dir` (created if missing) without waiting.
    pub fn acquire(dir: &Path) -> Result<RunLock> {
        Self::acquire_named(dir, ".lock", dir)
    }

    /// Locks `<dir>/<name>` without waiting; a refusal names `what` (the folder the lock guards).
    pub fn acquire_named(dir: &Path, name: &str, what: &Path) -> Result<RunLock> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join(name);
        let io = |e| Error::io(&path, e);
        // Not truncated on open: the file holds the current holder's PID, which a refused run reports.
        let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io)?;
        if !flock_exclusive(&file, true).map_err(io)? {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let pid = text.trim().parse::<u32>().ok();
            return Err(Error::FolderBusy { dir: what.to_path_buf(), pid });
        }
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.write_all(format!("{}\n", std::process::id()).as_bytes()).map_err(io)?;
        Ok(RunLock { file, path })
    }

    /// The lock file, `<dir>/.lock`.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // The file stays: removing it would let a third run lock a new file while a second still waits on the
        // old one. Emptying it tells a reader that nobody holds it.
        let _ = self.file.set_len(0);
    }
}
