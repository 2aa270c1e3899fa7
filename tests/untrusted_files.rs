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

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a C string that lives across the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo {}", path.display());
}

/// Runs the CLI under a time bound (a FIFO that blocks fails the test instead of hanging it) and returns
/// (exit code, stderr).
fn run_bounded(args: &[&str]) -> (Option<i32>, String) {
    let t0 = Instant::now();
    let out = Command::cargo_bin("lmim-bench").unwrap().args(args).timeout(Duration::from_secs(60)).output().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(50), "{args:?} took {:?}", t0.elapsed());
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn named_pipes_and_device_files_are_refused_at_once_wherever_a_file_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fifo_pth = d.join("f.pth");
    let fifo_toml = d.join("f.toml");
    mkfifo(&fifo_pth);
    mkfifo(&fifo_toml);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let data = d.join("synth");
    let st = Command::cargo_bin("lmim-bench").unwrap().args(["data", "synth", "--out", &s(&data), "--classes", "2", "--train-per-class", "4", "--val-per-class", "4", "--size", "32"]).output().unwrap();
    assert!(st.status.success());
    let out = s(&d.join("o.safetensors"));
    let cases: Vec<Vec<String>> = vec![
        vec!["convert".into(), s(&fifo_pth), out.clone()],
        vec!["forward".into(), "--checkpoint".into(), s(&fifo_pth), "--device".into(), "cpu".into()],
        vec!["extract".into(), "--checkpoint".into(), s(&fifo_pth), "--data".into(), s(&data), "--no-cache".into(), "--device".into(), "cpu".into()],
        vec!["eval".into(), "--protocol".into(), "knn".into(), "--checkpoint".into(), s(&fifo_pth), "--data".into(), s(&data), "--no-cache".into(), "--device".into(), "cpu".into(), "--output".into(), s(&d.join("runs"))],
        vec!["pretrain".into(), "-c".into(), s(&fifo_toml), "--data".into(), s(&data), "-o".into(), s(&d.join("pre"))],
        vec!["eval".into(), "--protocol".into(), "linear".into(), "--protocol-file".into(), s(&fifo_toml), "--checkpoint".into(), out.clone(), "--data".into(), s(&data), "--output".into(), s(&d.join("runs"))],
        vec!["table".into(), s(&fifo_toml)],
    ];
    for args in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, err) = run_bounded(&args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains("a named pipe (FIFO), not a regular file"), "{args:?}: {err}");
    }
    // The library guard itself answers at once, from another thread so that a hang fails the test.
    let (tx, rx) = std::sync::mpsc::channel();
    let p = fifo_pth.clone();
    std::thread::spawn(move || tx.send(lmim_bench::fsutil::read_regular(&p, None).map(|_| ()).unwrap_err().to_string()).unwrap());
    let err = rx.recv_timeout(Duration::from_secs(10)).expect("reading a FIFO blocked");
    assert!(err.contains("f.pth") && err.contains("named pipe"), "{err}");

    // Images: a FIFO and a symlink to /dev/zero named like JPEGs in a class folder. Training (and `data check`)
    // skips and counts them; an evaluation refuses the split, naming the file (exit 2). Both at once: neither
    // blocks nor reads the endless device.
    let class = data.join("val").join(std::fs::read_dir(data.join("val")).unwrap().next().unwrap().unwrap().file_name());
    mkfifo(&class.join("zz-fifo.jpg"));
    std::os::unix::fs::symlink("/dev/zero", class.join("zz-zero.jpg")).unwrap();
    let (code, err) = run_bounded(&["data", "check", "--data", &s(&data), "--split", "val"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("zz-fifo.jpg: a named pipe (FIFO), not a regular file"), "{err}");
    assert!(err.contains("zz-zero.jpg: a character device, not a regular file"), "{err}");
    let (code, err) = run_bounded(&["data", "check", "--data", &s(&data), "--split", "val", "--strict"]);
    assert_eq!(code, Some(2), "{err}");
    let init = s(&d.join("enc.safetensors"));
    let st = Command::cargo_bin("lmim-bench").unwrap().args(["init", "-c", concat!(env!("CARGO_MANIFEST_DIR"), "/configs/lmim_tiny.toml"), "-o", &init]).output().unwrap();
    assert!(st.status.success());
    let (code, err) = run_bounded(&["extract", "--checkpoint", &init, "--data", &s(&data), "--split", "val", "--no-cache", "--device", "cpu", "--quiet"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("zz-fifo.jpg") || err.contains("zz-zero.jpg"), "{err}");
}

/// A pico encoder saved by `save_vit`, with one tensor replaced.
fn pico_with(path: &Path, name: &str, replace: impl Fn(&tch::Tensor) -> tch::Tensor, meta: &[(&str, &str)]) {
    let cfg = lmim_bench::model::VitConfig::from_arch("vit_pico_patch4_32").unwrap();
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let _m = lmim_bench::model::VisionTransformer::new(&vs.root(), &cfg);
    checkpoint::save_vit(path, &vs, &cfg, &Default::default()).unwrap();
    let mut ck = checkpoint::load(path).unwrap();
    for (n, t) in ck.tensors.iter_mut() {
        if n == name {
            *t = replace(t);
        }
    }
    for (k, v) in meta {
        ck.metadata.insert(k.to_string(), v.to_string());
    }
    checkpoint::save(path, &ck.tensors, &ck.metadata).unwrap();
}

#[test]
fn nan_weights_integer_weights_and_an_unknown_arch_are_input_errors() {
    let dir = tempfile::tempdir().unwrap();
    let nan = dir.path().join("nan.safetensors");
    pico_with(&nan, "blocks.1.mlp.fc1.weight", |t| t.fill(f64::NAN), &[]);
    let ints = dir.path().join("ints.safetensors");
    pico_with(&ints, "blocks.0.attn.qkv.weight", |t| (t * 100.0).to_kind(tch::Kind::Int64), &[]);
    let arch = dir.path().join("arch.safetensors");
    pico_with(&arch, "", |t| t.shallow_clone(), &[("arch", "vit_huge_patch99_7")]);
    for (path, what) in [(&nan, "`blocks.1.mlp.fc1.weight` holds NaN or infinite values"), (&ints, "`blocks.0.attn.qkv.weight` is Int64, not floating point"), (&arch, "metadata `arch` is `vit_huge_patch99_7`")] {
        let err = checkpoint::load_vit(path, None, tch::Device::Cpu, 0).map(|_| ()).unwrap_err();
        assert_eq!(err.exit_code(), 2, "{err}");
        assert!(err.to_string().contains(path.to_str().unwrap()) && err.to_string().contains(what), "{err}");
        let (code, stderr) = run_bounded(&["forward", "--checkpoint", path.to_str().unwrap(), "--device", "cpu"]);
        assert_eq!(code, Some(2), "{stderr}");
        assert!(stderr.contains(what), "{stderr}");
    }
}
