//! Untrusted and unusual input files: hostile `.pth` pickles, storages and views that claim more memory than the
//! file holds, the legacy `torch.save` format, a PNG whose header declares a huge image, and a device given as a
//! checkpoint. Each must be refused with an error that says why, quickly, without allocating what it claims.
mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use assert_cmd::Command;
use lmim_bench::checkpoint::{self, pth};
use lmim_bench::data::decode_image;

/// The checkpoints that tests/py/make_untrusted_pth.py writes, made once per test binary.
fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("untrusted_files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        common::run_py("make_untrusted_pth.py", &[dir.to_str().unwrap()]);
        dir
    })
}

fn load_err(path: &Path) -> String {
    match checkpoint::load_any(path) {
        Ok(c) => panic!("{}: loaded {} tensors from a file that must be refused", path.display(), c.tensors.len()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_pickle_naming_posix_system_is_refused_and_named() {
    let dir = fixtures();
    let path = dir.join("evil_global.pth");
    let err = load_err(&path);
    assert!(err.contains("evil_global.pth"), "{err}");
    assert!(err.contains("`posix.system`"), "the error must name the global: {err}");
    assert!(err.contains("not allowed"), "{err}");
    assert!(!dir.join("pwned").exists(), "the pickle's command ran");
    // The direct reader refuses it as well.
    assert!(pth::load(&path).unwrap_err().to_string().contains("posix.system"));
}

#[test]
fn a_storage_claiming_more_than_the_file_is_refused_quickly() {
    let path = fixtures().join("huge_storage.pth");
    let t0 = Instant::now();
    let err = load_err(&path);
    assert!(t0.elapsed() < Duration::from_secs(5), "took {:?}", t0.elapsed());
    assert!(err.contains("claims 4398046511104 bytes"), "{err}");
    assert!(err.contains("more than the"), "{err}");
}

#[test]
fn a_stride_zero_view_bomb_is_refused_before_allocating() {
    let path = fixtures().join("stride0_bomb.pth");
    let t0 = Instant::now();
    let err = load_err(&path);
    assert!(t0.elapsed() < Duration::from_secs(5), "took {:?}", t0.elapsed());
    assert!(err.contains("would expand a storage of 16 bytes to 40000000000 bytes"), "{err}");
}

#[test]
fn a_legacy_pth_gets_a_clear_message() {
    let path = fixtures().join("legacy.pth");
    // load_any sees no zip signature: it must not report a safetensors parse error.
    let err = load_err(&path);
    assert!(err.contains("legacy torch.save format (not zip)"), "{err}");
    assert!(err.contains("_use_new_zipfile_serialization=True"), "{err}");
    assert!(!err.contains("safetensors"), "{err}");
    // Through the command line: exit 2 with the same explanation.
    let out_file = fixtures().join("legacy-out.safetensors");
    let assert = Command::cargo_bin("lmim-bench")
        .unwrap()
        .args(["convert", path.to_str().unwrap(), out_file.to_str().unwrap()])
        .timeout(Duration::from_secs(120))
        .assert()
        .code(2);
    let stderr = String::from_utf8_lossy(&assert.get_output().stderr).into_owned();
    assert!(stderr.contains("legacy torch.save format (not zip)"), "{stderr}");
    assert!(!out_file.exists());
}

/// A PNG chunk: length, type, data, CRC-32 of type and data.
fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut crc = flate2::Crc::new();
    crc.update(kind);
    crc.update(data);
    let mut c = (data.len() as u32).to_be_bytes().to_vec();
    c.extend_from_slice(kind);
    c.extend_from_slice(data);
    c.extend_from_slice(&crc.sum().to_be_bytes());
    c
}

#[test]
fn a_png_header_over_the_pixel_limit_is_refused_before_decoding() {
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&20000u32.to_be_bytes());
    ihdr.extend_from_slice(&20000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB, no interlace
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut z, &[0u8; 61]).unwrap(); // the first row's start: the rest is missing
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(chunk(b"IHDR", &ihdr));
    png.extend(chunk(b"IDAT", &z.finish().unwrap()));
    png.extend(chunk(b"IEND", &[]));

    let t0 = Instant::now();
    let err = decode_image(&png).unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(2), "took {:?}", t0.elapsed());
    assert!(err.contains("20000x20000") && err.contains("pixel limit"), "{err}");

    // The same image at a size within the limit gets past the header check (and fails on its missing rows).
    let mut small = ihdr.clone();
    small[..8].copy_from_slice(&[0, 0, 0, 64, 0, 0, 0, 64]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(chunk(b"IHDR", &small));
    png.extend(chunk(b"IEND", &[]));
    let err = decode_image(&png).unwrap_err();
    assert!(!err.contains("pixel limit"), "{err}");
}

#[test]
fn dev_zero_is_not_a_checkpoint() {
    // The command refuses it (exit 2) instead of hashing an endless stream; checked first, under a timeout.
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("out.safetensors");
    let t0 = Instant::now();
    let assert = Command::cargo_bin("lmim-bench")
        .unwrap()
        .args(["convert", "/dev/zero", out_file.to_str().unwrap()])
        .timeout(Duration::from_secs(120))
        .assert()
        .code(2);
    assert!(t0.elapsed() < Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&assert.get_output().stderr).into_owned();
    assert!(stderr.contains("/dev/zero") && stderr.contains("not a regular file"), "{stderr}");

    let zero = Path::new("/dev/zero");
    for err in [
        checkpoint::sha256_file(zero).unwrap_err().to_string(),
        checkpoint::load_any(zero).unwrap_err().to_string(),
        checkpoint::load(zero).unwrap_err().to_string(),
        pth::load(zero).unwrap_err().to_string(),
    ] {
        assert!(err.contains("/dev/zero") && err.contains("not a regular file"), "{err}");
    }
    assert!(checkpoint::load_any(dir.path()).unwrap_err().to_string().contains("a directory, not a regular file"));
}
