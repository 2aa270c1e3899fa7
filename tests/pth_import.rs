//! Import of PyTorch `.pth` checkpoints: every tensor read by `checkpoint::pth` must equal, bit for bit, the same
//! tensor written by Python as safetensors (tests/py/make_pth.py writes both), and bad files must give errors that
//! name the file, never a panic.
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use lmim_bench::checkpoint::{self, pth, Checkpoint};

/// The Python with torch: `$LMIM_PYTHON`, else the venv that scripts/env.sh creates.
fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("LMIM_PYTHON").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    let venv = home.join(".cache/lmim-bench/venv/bin/python");
    if !venv.exists() {
        panic!(
            "no Python with torch: LMIM_PYTHON is unset and {} does not exist; run `bash scripts/test.sh` \
             (or `source scripts/env.sh`) to create it",
            venv.display()
        );
    }
    venv
}

/// The directory with the generated checkpoints, made once per test binary.
fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let parent = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        // Remove what earlier runs left behind (an hour old or more, so that concurrent runs keep theirs).
        if let Ok(entries) = std::fs::read_dir(&parent) {
            for e in entries.flatten() {
                let old = e.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok()).is_some_and(|age| age.as_secs() > 3600);
                if e.file_name().to_string_lossy().starts_with("pth_import-") && old {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = parent.join(format!("pth_import-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/make_pth.py");
        let py = python();
        let out = Command::new(&py)
            .arg(&script)
            .arg(&dir)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", py.display()));
        assert!(
            out.status.success(),
            "{} {} failed:\n{}{}",
            py.display(),
            script.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
}

fn assert_same(pth_ckpt: &Checkpoint, reference: &Checkpoint, what: &str) {
    let mut got: Vec<&str> = pth_ckpt.tensors.iter().map(|(n, _)| n.as_str()).collect();
    let mut want: Vec<&str> = reference.tensors.iter().map(|(n, _)| n.as_str()).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want, "{what}: tensor names differ");
    for (name, t) in &reference.tensors {
        let p = pth_ckpt.get(name).unwrap();
        assert_eq!(p.kind(), t.kind(), "{what}: `{name}` dtype");
        assert_eq!(p.size(), t.size(), "{what}: `{name}` shape");
        assert!(p.is_contiguous(), "{what}: `{name}` is not contiguous");
        assert!(checkpoint::tensor_bytes(p) == checkpoint::tensor_bytes(t), "{what}: `{name}` values differ");
    }
}

#[test]
fn pth_tensors_equal_the_safetensors_reference() {
    let dir = fixtures();
    let expected = [
        "plain",
        "nested_model",
        "ddp_state_dict",
        "priority",
        "dtypes",
        "views",
        "protocol1",
        "protocol3",
        "protocol4",
        "protocol5",
        "big_endian",
    ];
    for name in expected {
        let pth_path = dir.join(format!("{name}.pth"));
        let reference = checkpoint::load(&dir.join(format!("{name}.safetensors"))).unwrap();
        assert!(!reference.tensors.is_empty(), "{name}: empty reference");
        let ckpt = pth::load(&pth_path).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_same(&ckpt, &reference, name);
        assert_eq!(ckpt.path, pth_path);
        assert_eq!(ckpt.metadata.get("source_format").map(String::as_str), Some("pth"));
        // load_any recognises the zip and routes it here.
        let any = checkpoint::load_any(&pth_path).unwrap_or_else(|e| panic!("{name} via load_any: {e}"));
        assert_same(&any, &reference, name);
    }
}

#[test]
fn state_dict_nesting_rules() {
    let dir = fixtures();
    let nested = pth::load(&dir.join("nested_model.pth")).unwrap();
    assert_eq!(nested.metadata.get("pth_state_dict_key").map(String::as_str), Some("model"));
    assert!(nested.get("cls_token").is_some());
    assert!(!nested.tensors.iter().any(|(n, _)| n.starts_with("optimizer") || n.starts_with("args")));

    let ddp = pth::load(&dir.join("ddp_state_dict.pth")).unwrap();
    assert_eq!(ddp.metadata.get("pth_state_dict_key").map(String::as_str), Some("state_dict"));
    assert!(ddp.tensors.iter().all(|(n, _)| n.starts_with("module.")), "the module. prefix must be kept");
    // ... and to_timm_names is what strips it.
    let timm = checkpoint::to_timm_names(ddp);
    assert!(timm.get("cls_token").is_some());

    let priority = pth::load(&dir.join("priority.pth")).unwrap();
    assert_eq!(priority.metadata.get("pth_state_dict_key").map(String::as_str), Some("module"));

    let views = pth::load(&dir.join("views.pth")).unwrap();
    assert!(!views.metadata.contains_key("pth_state_dict_key"));
    assert!(views.get("nested.inner.x").is_some());
    // A transposed view keeps its logical layout.
    let base = views.get("base").unwrap();
    let t = views.get("transposed").unwrap();
    assert!(t.equal(&base.tr()));
}

fn assert_err_names_file(path: &Path, must_contain: &str) -> String {
    let err = match pth::load(path) {
        Ok(c) => panic!("{}: loaded {} tensors from a bad file", path.display(), c.tensors.len()),
        Err(e) => e.to_string(),
    };
    let file_name = path.file_name().unwrap().to_string_lossy();
    assert!(err.contains(file_name.as_ref()), "error does not name the file: {err}");
    assert!(err.contains(must_contain), "error `{err}` does not say `{must_contain}`");
    err
}

#[test]
fn truncated_and_random_files_are_errors() {
    let dir = fixtures();
    let bytes = std::fs::read(dir.join("plain.pth")).unwrap();
    for len in [0, 1, 2, 4, 100, 4096, bytes.len() / 2, bytes.len() - 100, bytes.len() - 23, bytes.len() - 1] {
        let p = dir.join(format!("truncated_{len}.pth"));
        std::fs::write(&p, &bytes[..len]).unwrap();
        assert_err_names_file(&p, "");
    }
    // Deterministic pseudo-random bytes, alone and behind a zip signature.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let random: Vec<u8> = (0..10_000)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let p = dir.join("random_bytes.pth");
    std::fs::write(&p, &random).unwrap();
    assert_err_names_file(&p, "not a zip archive");
    let p = dir.join("random_pk.pth");
    std::fs::write(&p, [&b"PK\x03\x04"[..], &random].concat()).unwrap();
    assert_err_names_file(&p, "zip");
}

#[test]
fn unsupported_files_explain_why() {
    let dir = fixtures();
    assert_err_names_file(&dir.join("bad_legacy.pth"), "legacy torch.save format (not zip)");
    // A whole pickled model names classes outside the weights allow-list, as torch.load(weights_only=True) does.
    let err = assert_err_names_file(&dir.join("bad_whole_module.pth"), "is not allowed in a weights file");
    assert!(err.contains("`timm.") && err.contains("state_dict()"), "{err}");
    assert_err_names_file(&dir.join("bad_no_pickle.pth"), "data.pkl");
    assert_err_names_file(&dir.join("bad_no_tensors.pth"), "no tensors");
}

/// Rewrites `src` with its `data.pkl` replaced by `pkl` (all other entries copied).
fn with_pickle(src: &Path, dst: &Path, pkl: &[u8]) {
    let mut zin = zip::ZipArchive::new(std::fs::File::open(src).unwrap()).unwrap();
    let mut zout = zip::ZipWriter::new(std::fs::File::create(dst).unwrap());
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for i in 0..zin.len() {
        let mut f = zin.by_index(i).unwrap();
        let name = f.name().to_string();
        let mut data = Vec::new();
        f.read_to_end(&mut data).unwrap();
        zout.start_file(name.as_str(), opts).unwrap();
        zout.write_all(if name.ends_with("/data.pkl") { pkl } else { &data }).unwrap();
    }
    zout.finish().unwrap();
}

fn read_pickle(src: &Path) -> Vec<u8> {
    let mut zin = zip::ZipArchive::new(std::fs::File::open(src).unwrap()).unwrap();
    let name = zin.file_names().find(|n| n.ends_with("/data.pkl")).unwrap().to_string();
    let mut pkl = Vec::new();
    zin.by_name(&name).unwrap().read_to_end(&mut pkl).unwrap();
    pkl
}

#[test]
fn corrupt_pickles_give_errors_not_panics() {
    let dir = fixtures();
    for src_name in ["views.pth", "protocol4.pth"] {
        let src = dir.join(src_name);
        let pkl = read_pickle(&src);
        let dst = dir.join(format!("corrupt_{src_name}"));
        // Every truncation of the pickle is an error.
        for len in 0..pkl.len() {
            with_pickle(&src, &dst, &pkl[..len]);
            assert_err_names_file(&dst, "");
        }
        // Flipped bytes may or may not make sense, but must never panic.
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..400 {
            let mut bad = pkl.clone();
            for _ in 0..1 + next() % 3 {
                let i = (next() % bad.len() as u64) as usize;
                bad[i] = next() as u8;
            }
            with_pickle(&src, &dst, &bad);
            let _ = pth::load(&dst);
        }
    }
}
