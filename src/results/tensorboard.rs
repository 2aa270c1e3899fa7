//! TensorBoard event files, written without a protobuf dependency: TFRecord framing with masked CRC32C around
//! hand-encoded `Event` messages (scalars as `simple_value`, text as the text plugin's string tensor).
//!
//! Why not a crate: `tboard` 0.1.1 (by tch's author) generates its protobuf code with prost-build 0.12 at build
//! time, which needs a `protoc` binary that these machines do not have (a system package for three message
//! types), and brings anyhow-with-backtrace, thiserror 1 and hostname 0.3; `tensorboard-rs` 0.5.9 pulls in
//! protobuf 2 (unmaintained, RUSTSEC-2024-0437) and a second `image` (0.23). The few fields needed here are
//! stable since TensorBoard 1.0, so encoding them takes under a hundred lines, and the test reads the files
//! back with TensorBoard's own `EventAccumulator`.
//!
//! Formats (public sources):
//! - record framing: tensorflow/tensorflow `tensorflow/core/lib/io/record_writer.h` (`uint64 length`,
//!   `uint32 masked_crc32c(length)`, `data`, `uint32 masked_crc32c(data)`, little endian), mask in
//!   `tensorflow/tsl/lib/hash/crc32c.h`;
//! - messages: tensorflow/tensorboard `tensorboard/compat/proto/event.proto`, `summary.proto`, `tensor.proto`,
//!   `tensor_shape.proto`; file naming: `tensorboard/summary/writer/event_file_writer.py`;
//! - text: tensorflow/tensorboard `tensorboard/plugins/text/summary_v2.py` (plugin `text`, a `DT_STRING` tensor).
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bytewise with a table.
pub fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
            }
            *e = c;
        }
        t
    });
    let mut crc = !0u32;
    for &b in data {
        crc = table[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// The checksum TFRecord stores: CRC-32C rotated right by 15 bits plus a constant, so that a CRC of data that
/// itself holds CRCs stays informative.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    crc32c(data).rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord: length, its masked CRC, the payload, the payload's masked CRC.
pub fn tfrecord(payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(payload.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(&masked_crc32c(payload).to_le_bytes());
    out
}

/// Protobuf wire format, only what the messages below use.
mod pb {
    pub fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    fn key(out: &mut Vec<u8>, field: u32, wire: u32) {
        varint(out, ((field << 3) | wire) as u64);
    }
    pub fn uint(out: &mut Vec<u8>, field: u32, v: u64) {
        key(out, field, 0);
        varint(out, v);
    }
    pub fn double(out: &mut Vec<u8>, field: u32, v: f64) {
        key(out, field, 1);
        out.extend_from_slice(&v.to_le_bytes());
    }
    pub fn float(out: &mut Vec<u8>, field: u32, v: f32) {
        key(out, field, 5);
        out.extend_from_slice(&v.to_le_bytes());
    }
    pub fn bytes(out: &mut Vec<u8>, field: u32, v: &[u8]) {
        key(out, field, 2);
        varint(out, v.len() as u64);
        out.extend_from_slice(v);
    }
}

/// What an event carries (field numbers of `Event` and `Summary.Value` in event.proto / summary.proto).
enum What<'a> {
    FileVersion(&'a str),
    Scalar { tag: &'a str, value: f32 },
    Text { tag: &'a str, text: &'a str },
}

/// An encoded `Event`.
fn event(wall_time: f64, step: i64, what: What) -> Vec<u8> {
    let mut e = Vec::new();
    pb::double(&mut e, 1, wall_time);
    if step != 0 {
        // int64 is a varint of the two's complement, as protobuf encodes negative values.
        pb::uint(&mut e, 2, step as u64);
    }
    let mut value = Vec::new();
    match what {
        What::FileVersion(v) => {
            pb::bytes(&mut e, 3, v.as_bytes());
            return e;
        }
        What::Scalar { tag, value: v } => {
            pb::bytes(&mut value, 1, tag.as_bytes());
            pb::float(&mut value, 2, v);
        }
        What::Text { tag, text } => {
            pb::bytes(&mut value, 1, tag.as_bytes());
            // SummaryMetadata { plugin_data: PluginData { plugin_name: "text" } }
            let mut plugin = Vec::new();
            pb::bytes(&mut plugin, 1, b"text");
            let mut meta = Vec::new();
            pb::bytes(&mut meta, 1, &plugin);
            pb::bytes(&mut value, 9, &meta);
            // TensorProto { dtype: DT_STRING (7), tensor_shape: [1], string_val: [text] }
            let mut dim = Vec::new();
            pb::uint(&mut dim, 1, 1);
            let mut shape = Vec::new();
            pb::bytes(&mut shape, 2, &dim);
            let mut tensor = Vec::new();
            pb::uint(&mut tensor, 1, 7);
            pb::bytes(&mut tensor, 2, &shape);
            pb::bytes(&mut tensor, 8, text.as_bytes());
            pb::bytes(&mut value, 8, &tensor);
        }
    }
    let mut summary = Vec::new();
    pb::bytes(&mut summary, 1, &value);
    pb::bytes(&mut e, 5, &summary);
    e
}

fn wall_time() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it or truncates.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = if rc == 0 { String::from_utf8_lossy(&buf[..end]).into_owned() } else { String::new() };
    let name: String = name.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')).collect();
    if name.is_empty() { "localhost".into() } else { name }
}

/// Appends events to one `events.out.tfevents.<unix time>.<host>.<pid>.<n>` file, TensorBoard's own naming
/// (the pid and counter keep two writers started in the same second apart; TensorBoard reads every such file
/// of a folder as one run).
pub struct EventWriter {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
}

impl EventWriter {
    /// Creates `dir` if needed and a new event file in it, starting with the `brain.Event:2` version record.
    pub fn create(dir: &Path) -> Result<EventWriter> {
        static COUNTER: AtomicU64 = AtomicU64::new(1);
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("events.out.tfevents.{now:010}.{}.{}.{n}", hostname(), std::process::id()));
        let file = std::fs::OpenOptions::new().create_new(true).write(true).open(&path).map_err(|e| Error::io(&path, e))?;
        let mut w = EventWriter { path, file: std::io::BufWriter::new(file) };
        w.write(event(wall_time(), 0, What::FileVersion("brain.Event:2")))?;
        w.flush()?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, event: Vec<u8>) -> Result<()> {
        self.file.write_all(&tfrecord(&event)).map_err(|e| Error::io(&self.path, e))
    }

    /// A scalar; TensorBoard keeps scalars as f32.
    pub fn scalar(&mut self, tag: &str, step: i64, value: f32) -> Result<()> {
        self.write(event(wall_time(), step, What::Scalar { tag, value }))
    }

    /// A text summary (TensorBoard renders it as Markdown).
    pub fn text(&mut self, tag: &str, step: i64, text: &str) -> Result<()> {
        self.write(event(wall_time(), step, What::Text { tag, text }))
    }

    /// Hands buffered events to the OS, so that they survive the process being killed.
    pub fn flush(&mut self) -> Result<()> {
        self.file.flush().map_err(|e| Error::io(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_values() {
        // RFC 3720 (iSCSI) B.4 test vectors and the usual check value.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
        let inc: Vec<u8> = (0..32).collect();
        assert_eq!(crc32c(&inc), 0x46DD_794E);
    }

    #[test]
    fn tfrecord_framing() {
        let r = tfrecord(b"abc");
        assert_eq!(r.len(), 8 + 4 + 3 + 4);
        assert_eq!(&r[..8], &3u64.to_le_bytes());
        assert_eq!(u32::from_le_bytes(r[8..12].try_into().unwrap()), masked_crc32c(&3u64.to_le_bytes()));
        assert_eq!(&r[12..15], b"abc");
        assert_eq!(u32::from_le_bytes(r[15..19].try_into().unwrap()), masked_crc32c(b"abc"));
    }

    #[test]
    fn scalar_event_bytes() {
        let e = event(1.5, 300, What::Scalar { tag: "loss", value: 0.25 });
        let mut want = vec![0x09];
        want.extend_from_slice(&1.5f64.to_le_bytes());
        want.extend_from_slice(&[0x10, 0xac, 0x02]); // step 300
        want.extend_from_slice(&[0x2a, 0x0d, 0x0a, 0x0b]); // summary, value, 11 bytes
        want.extend_from_slice(&[0x0a, 0x04]);
        want.extend_from_slice(b"loss");
        want.push(0x15);
        want.extend_from_slice(&0.25f32.to_le_bytes());
        assert_eq!(e, want);
    }
}
