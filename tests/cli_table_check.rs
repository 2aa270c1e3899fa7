//! `lmim-bench table` and `lmim-bench check` on results records: the table's run and reference rows and its marks
//! for mixed protocol versions and datasets; check's printed comparison and exit codes 0 (pass), 1 (a metric
//! below reference - tolerance, a missing result, a baseline drop) and 2 (bad input); and a baseline check that
//! catches a broken checkpoint in a real k-NN run on the demo data.
use std::collections::BTreeMap;
use std::path::Path;

use assert_cmd::Command;
use lmim_bench::results::RunRecord;
use predicates::prelude::*;
use predicates::str::contains;

fn bin() -> Command {
    Command::cargo_bin("lmim-bench").unwrap()
}

struct Rec<'a> {
    model: &'a str,
    protocol: &'a str,
    version: &'a str,
    metrics: &'a [(&'a str, f64)],
    fingerprint: &'a str,
    when: &'a str,
}

fn write(dir: &Path, r: Rec) {
    let mut rec = RunRecord::new(r.protocol, r.version, "top1");
    rec.model_name = r.model.into();
    rec.checkpoint_sha256 = Some(format!("{:0<64}", r.model.len()));
    rec.arch = Some("vit_pico_patch4_32".into());
    rec.dataset = Some("/data/demo".into());
    rec.dataset_fingerprint = Some(serde_json::json!({ "hash": r.fingerprint }));
    rec.metrics = r.metrics.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<_, _>>();
    if r.protocol == "knn" {
        rec.config = serde_json::json!({ "headline_k": 20 });
    }
    rec.started_at = format!("2026-01-0{}T10:00:00.000Z", r.when);
    rec.write(dir).unwrap();
}

fn runs(dir: &Path) {
    let knn = [("top1", 61.2), ("top5", 95.0), ("top1@k20", 61.2), ("top5@k20", 95.0), ("top1@k10", 60.1)];
    write(dir, Rec { model: "pico", protocol: "knn", version: "1", metrics: &knn, fingerprint: "aaaa", when: "1" });
    write(dir, Rec { model: "pico", protocol: "nn-loo", version: "1", metrics: &[("top1", 55.5)], fingerprint: "bbbb", when: "1" });
    // An older knn record of the same model: the table shows the latest.
    write(dir, Rec { model: "pico", protocol: "knn", version: "1", metrics: &[("top1", 10.0)], fingerprint: "aaaa", when: "0" });
    write(dir, Rec { model: "pico-pretrained", protocol: "knn", version: "1", metrics: &[("top1", 70.4), ("top5", 97.0)], fingerprint: "aaaa", when: "2" });
    write(dir, Rec { model: "pico-avg", protocol: "knn", version: "1+feature=avg", metrics: &[("top1", 66.0)], fingerprint: "aaaa", when: "2" });
    write(dir, Rec { model: "pico-other-data", protocol: "knn", version: "1", metrics: &[("top1", 30.0)], fingerprint: "cccc", when: "2" });
}

#[test]
fn table_shows_runs_references_and_marks() {
    let dir = tempfile::tempdir().unwrap();
    runs(dir.path());
    let out = bin().arg("table").arg(dir.path()).assert().success();
    let md = String::from_utf8(out.get_output().stdout.clone()).unwrap();
    // Grouped columns (image-level, region-level, label efficiency), empty ones left out (no LP sweep here).
    assert!(md.starts_with("| model | arch | data | NN (LOO 1-NN) | k-NN | k-NN sweep | LP | EP | Ft | DAVIS J&F | ADE20K k-NN | ADE20K LR | 1 img |"), "{md}");
    assert!(md.contains("Columns by group: image-level: NN (LOO 1-NN), k-NN, k-NN sweep, LP, EP, Ft; region-level: DAVIS J&F, ADE20K k-NN, ADE20K LR; label efficiency: 1 img"), "{md}");
    assert!(md.contains("| pico | vit_pico_patch4_32 | demo | 55.50 | 61.20 (k=20) | – | – |"), "{md}");
    assert!(md.contains("| pico-pretrained | vit_pico_patch4_32 | demo | – | 70.40 (k=20) |"), "{md}");
    // Reference rows, with the Latent MIM NN note.
    assert!(md.contains("| *Latent MIM 800 ep (published)* | vit_base_patch16_224 | imagenet-1k | 50.1 [1] | – | – | 72.0 [2] | – | 83.0 [3] |"), "{md}");
    // Versions and sources are numbered footnotes: no cell of the table is longer than 60 characters.
    let longest = md.lines().filter(|l| l.starts_with('|') && !l.starts_with("|---")).flat_map(|l| l.split(" | ").map(|c| c.trim_matches(['|', ' ']).chars().count()).collect::<Vec<_>>()).max().unwrap();
    assert!(longest <= 60, "a cell of {longest} characters:\n{md}");
    let knn_note = md.lines().find(|l| l.contains("] k-NN: protocol knn v1")).unwrap_or_else(|| panic!("a footnote for the k-NN version: {md}"));
    let n = &knn_note[..knn_note.find(']').unwrap() + 1];
    assert!(md.lines().any(|l| l.starts_with("| pico |") && l.contains(n)), "the pico row points to {n}: {md}");
    assert!(md.contains("] facebookresearch/dino:README.md"), "reference sources are footnotes: {md}");
    // --columns keeps the named ones.
    let out = bin().arg("table").arg(dir.path()).args(["--columns", "knn,NN (LOO 1-NN)"]).assert().success();
    let sel = String::from_utf8(out.get_output().stdout.clone()).unwrap();
    assert!(sel.starts_with("| model | arch | data | NN (LOO 1-NN) | k-NN | versions | source |"), "{sel}");
    bin().arg("table").arg(dir.path()).args(["--columns", "nope"]).assert().code(2).stderr(contains("--columns")).stderr(contains("`nope` is not a column"));
    assert!(md.contains("| *DINO (published)* |") && md.contains("76.1"), "{md}");
    assert!(md.contains("| *MAE 1600 ep (published)* |") && md.contains("| 68.0 | – | 83.6 |"), "{md}");
    // Another protocol version and another dataset are marked, and explained.
    assert!(md.contains("66.00 (k=20) †"), "{md}");
    assert!(md.contains("† pico-avg, k-NN: protocol version 1+feature=avg (the column's others: 1)"), "{md}");
    assert!(md.contains("30.00 (k=20) ‡"), "{md}");
    assert!(md.contains("‡ pico-other-data, k-NN: dataset demo (fingerprint cccc; the column's others: aaaa)"), "{md}");
    assert!(!md.contains("61.20 (k=20) †") && !md.contains("61.20 (k=20) ‡"));

    let out = bin().arg("table").arg(dir.path()).args(["--no-reference", "--format", "csv"]).assert().success();
    let csv = String::from_utf8(out.get_output().stdout.clone()).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 5, "{csv}");
    assert!(lines[0].starts_with("kind,model,checkpoint_sha256,arch,dataset,nn_top1,nn_version,nn_marks,knn_top1,knn_top5,knn_k,knn_version"));
    assert!(!csv.contains("published"));

    let file = dir.path().join("table.json");
    bin().arg("table").arg(dir.path()).args(["--format", "json", "-o"]).arg(&file).assert().success().stdout("");
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let rows = j["rows"].as_array().unwrap();
    let pico = rows.iter().find(|r| r["model"] == "pico").unwrap();
    assert_eq!(pico["cells"]["knn"]["value"], 61.2);
    assert_eq!(pico["cells"]["knn"]["records"], 2);
    assert!(rows.iter().any(|r| r["kind"] == "reference" && r["cells"]["nn-loo"]["value"] == 50.1));
}

fn golden(dir: &Path, body: &str) -> std::path::PathBuf {
    golden_named(dir, "golden.toml", body)
}

fn golden_named(dir: &Path, name: &str, body: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("version = \"1\"\n{body}")).unwrap();
    p
}

const PASS: &str = r#"
[[expect]]
model = "pico"
protocol = "knn"
metric = "top1@k20"
value = 61.0
tolerance = 0.5
[[expect]]
model = "pico"
protocol = "nn-loo"
value = 56.0
tolerance = 0.5
"#;

#[test]
fn check_exit_0_prints_the_table() {
    let dir = tempfile::tempdir().unwrap();
    runs(dir.path());
    let g = golden(dir.path(), PASS);
    bin()
        .args(["check", "--reference"])
        .arg(&g)
        .arg(dir.path())
        .assert()
        .code(0)
        .stdout(contains("| model | protocol | metric | value | reference | delta | tolerance | gate | verdict | note |"))
        .stdout(contains("| pico | knn | top1@k20 | 61.20 | 61.00 | +0.20 | 0.50 | hard | ok |  |"))
        .stdout(contains("| pico | nn-loo | top1 | 55.50 | 56.00 | -0.50 | 0.50 | hard | ok |  |"))
        .stdout(contains("2 compared (2 ok)"))
        .stdout(contains("PASSED"));
}

#[test]
fn check_exit_1_on_a_drop_or_a_missing_result() {
    let dir = tempfile::tempdir().unwrap();
    runs(dir.path());
    let g = golden(dir.path(), &PASS.replace("value = 56.0", "value = 56.1"));
    bin()
        .args(["check", "--reference"])
        .arg(&g)
        .arg(dir.path())
        .assert()
        .code(1)
        .stdout(contains("| pico | nn-loo | top1 | 55.50 | 56.10 | -0.60 | 0.50 | hard | FAIL |  |"))
        .stdout(contains("| pico | knn | top1@k20 | 61.20 | 61.00 | +0.20 | 0.50 | hard | ok |"))
        .stdout(contains("FAILED (1 metric(s))"))
        .stderr(contains("check failed: 1 metric(s)"));
    // --tolerance overrides the file's.
    bin().args(["check", "--tolerance", "0.7", "--reference"]).arg(&g).arg(dir.path()).assert().code(0);

    let missing = format!("{PASS}\n[[expect]]\nmodel = \"pico\"\nprotocol = \"linear\"\nvalue = 40.0\n");
    let g = golden(dir.path(), &missing);
    bin()
        .args(["check", "--reference"])
        .arg(&g)
        .arg(dir.path())
        .assert()
        .code(1)
        .stdout(contains("| pico | linear | top1 | – | 40.00 | – | 0.10 | hard | MISSING |"));

    // A soft gate warns, and fails only with --strict.
    let soft = PASS.replace("value = 56.0\n", "value = 57.0\ngate = \"soft\"\n");
    let g = golden(dir.path(), &soft);
    bin().args(["check", "--reference"]).arg(&g).arg(dir.path()).assert().code(0).stdout(contains("| soft | warn |"));
    bin().args(["check", "--strict", "--reference"]).arg(&g).arg(dir.path()).assert().code(1);
}

#[test]
fn check_against_the_published_table() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), Rec { model: "my-lmim", protocol: "nn-loo", version: "1", metrics: &[("top1", 45.0)], fingerprint: "x", when: "1" });
    write(dir.path(), Rec { model: "my-lmim", protocol: "linear", version: "1", metrics: &[("top1", 70.5)], fingerprint: "x", when: "1" });
    let reference = Path::new(env!("CARGO_MANIFEST_DIR")).join("protocols/reference.toml");
    let check = |extra: &[&str]| {
        let mut c = bin();
        c.args(["check", "--reference-model", "latentmim-vitb16-800ep", "--reference"]).arg(&reference).arg(dir.path()).args(extra);
        c
    };
    // NN is info only (protocol unknown); LP 1.5 below 72.0 is beyond its soft 1.0 tolerance: a warning.
    check(&[])
        .assert()
        .code(0)
        .stdout(contains("| my-lmim | nn-loo | top1 | 45.00 | 50.10 | -5.10 | 1.00 | info | info |"))
        .stdout(contains("| my-lmim | linear | top1 | 70.50 | 72.00 | -1.50 | 1.00 | soft | warn |"))
        .stdout(contains("1 reference entries without results skipped"));
    check(&["--strict"]).assert().code(1);
    bin()
        .args(["check", "--reference-model", "no-such-model", "--reference"])
        .arg(&reference)
        .arg(dir.path())
        .assert()
        .code(2)
        .stderr(contains("no entries for `no-such-model`"));
}

#[test]
fn check_exit_2_on_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    runs(d);
    let g = golden(d, PASS);
    bin().args(["check", "--reference"]).arg(d.join("nope.toml")).arg(d).assert().code(2).stderr(contains("cannot read the reference file"));
    let bad = d.join("bad.toml");
    std::fs::write(&bad, "[[expect]]\nmodel = 3\n").unwrap();
    bin().args(["check", "--reference"]).arg(&bad).arg(d).assert().code(2).stderr(contains("not a reference file"));
    bin().args(["check", "--reference"]).arg(&g).arg(d.join("no-results")).assert().code(2).stderr(contains("no such results file or directory"));
    let other = golden_named(d, "other.toml", &PASS.replace("\"pico\"", "\"someone-else\""));
    bin().args(["check", "--reference"]).arg(&other).arg(d).assert().code(2).stderr(contains("no results match its entries"));
    let empty = tempfile::tempdir().unwrap();
    bin().args(["check", "--reference"]).arg(&g).arg(empty.path()).assert().code(2).stderr(contains("no results records found"));
    bin().arg("check").arg(d).assert().code(2).stderr(contains("give --reference FILE or --baseline RESULTS"));
    bin().args(["check", "--reference"]).arg(&g).arg("--baseline").arg(d).assert().code(2);
    bin().args(["check", "--tolerance", "-1", "--reference"]).arg(&g).arg(d).assert().code(2);
}

#[test]
fn check_against_a_baseline() {
    let dir = tempfile::tempdir().unwrap();
    let (base, new) = (dir.path().join("base"), dir.path().join("new"));
    write(&base, Rec { model: "pico", protocol: "knn", version: "1", metrics: &[("top1", 60.0), ("top5", 90.0)], fingerprint: "a", when: "1" });
    write(&new, Rec { model: "pico", protocol: "knn", version: "1", metrics: &[("top1", 59.95), ("top5", 91.0)], fingerprint: "a", when: "2" });
    bin()
        .arg("check")
        .arg(&new)
        .arg("--baseline")
        .arg(&base)
        .assert()
        .code(0)
        .stdout(contains("| pico | knn | top1 | 59.95 | 60.00 | -0.05 | 0.10 | hard | ok |"))
        .stdout(contains("check against baseline"));
    write(&new, Rec { model: "pico", protocol: "knn", version: "1", metrics: &[("top1", 58.0), ("top5", 91.0)], fingerprint: "a", when: "3" });
    bin().arg("check").arg(&new).arg("--baseline").arg(&base).assert().code(1).stdout(contains("| 58.00 | 60.00 | -2.00 | 0.10 | hard | FAIL |"));
    write(&new, Rec { model: "pico", protocol: "knn", version: "2", metrics: &[("top1", 65.0), ("top5", 91.0)], fingerprint: "a", when: "4" });
    bin().arg("check").arg(&new).arg("--baseline").arg(&base).assert().code(1).stdout(contains("INCOMPARABLE")).stdout(contains("protocol version 2 vs baseline 1"));
}

/// The regression check catches a broken checkpoint: k-NN of a random-init ViT on the demo data as the baseline,
/// the same ViT with the final LayerNorm's weight zeroed (every image gets the same feature) as the candidate.
#[test]
fn baseline_check_fails_for_a_broken_checkpoint() {
    use lmim_bench::checkpoint;
    use lmim_bench::model::{VisionTransformer, VitConfig};
    use tch::{nn, Device, Kind, Tensor};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = d.join("demo");
    bin().args(["data", "prepare-demo", "--train-per-class", "30", "--val-per-class", "20"]).arg("--out").arg(&data).assert().success();
    tch::manual_seed(0);
    let cfg = VitConfig::from_arch("vit_pico_patch4_32").unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let _m = VisionTransformer::new(&vs.root(), &cfg);
    checkpoint::save_vit(&d.join("good.safetensors"), &vs, &cfg, &Default::default()).unwrap();
    tch::no_grad(|| {
        // Every token becomes the same vector: all images look alike.
        let vars = vs.variables();
        let _ = vars["norm.weight"].shallow_clone().zero_();
        vars["norm.bias"].shallow_clone().copy_(&Tensor::randn([cfg.embed_dim], (Kind::Float, Device::Cpu)));
    });
    checkpoint::save_vit(&d.join("broken.safetensors"), &vs, &cfg, &Default::default()).unwrap();
    for name in ["good", "broken"] {
        bin()
            .args(["eval", "--protocol", "knn", "--device", "cpu", "--quiet", "--name", "pico"])
            .arg("--checkpoint")
            .arg(d.join(format!("{name}.safetensors")))
            .arg("--data")
            .arg(&data)
            .arg("--cache-dir")
            .arg(d.join("cache"))
            .arg("--output")
            .arg(d.join(name))
            .assert()
            .success();
    }
    bin().arg("check").arg(d.join("good")).arg("--baseline").arg(d.join("good")).assert().code(0);
    bin()
        .arg("check")
        .arg(d.join("broken"))
        .arg("--baseline")
        .arg(d.join("good"))
        .assert()
        .code(1)
        .stdout(contains("| pico | knn | top1@k20 |").and(contains("FAIL")));
}

/// Write errors are run failures (exit 1) naming what could not be written, whether the output is a named file
/// that is a device (`-o /dev/full`, written in place, never replaced by a file) or stdout; a pipe that is not
/// read any more is not an error.
#[test]
fn write_errors_exit_1_and_leave_devices_alone() {
    use std::os::unix::fs::FileTypeExt;
    if !Path::new("/dev/full").exists() {
        eprintln!("no /dev/full on this machine");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    runs(dir.path());
    let full = || std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    bin().arg("table").arg(dir.path()).args(["-o", "/dev/full"]).assert().code(1).stderr(contains("/dev/full"));
    assert!(std::fs::metadata("/dev/full").unwrap().file_type().is_char_device(), "/dev/full is still the device");
    let raw = || std::process::Command::new(assert_cmd::cargo::cargo_bin("lmim-bench"));
    let o = raw().arg("table").arg(dir.path()).stdout(full()).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("<stdout>"));
    let data = dir.path().join("data");
    bin().args(["data", "synth", "--classes", "2", "--train-per-class", "2", "--val-per-class", "1", "--size", "16", "--out"]).arg(&data).assert().success();
    let o = raw().args(["data", "info", "--json", "--data"]).arg(&data).stdout(full()).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("<stdout>"));
}

/// A record cut short (a full disk) or of another schema version is named in a warning by `table` and `check`,
/// not left out silently; other JSON files in the folder (configs) are not.
#[test]
fn unreadable_records_are_named() {
    let dir = tempfile::tempdir().unwrap();
    runs(dir.path());
    let some = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).find(|p| p.extension().is_some_and(|e| e == "json")).unwrap();
    let text = std::fs::read_to_string(&some).unwrap();
    std::fs::write(dir.path().join("cut.json"), &text[..text.len() / 2]).unwrap();
    std::fs::write(dir.path().join("future.json"), text.replacen("\"schema_version\": ", "\"schema_version\": 9", 1)).unwrap();
    std::fs::write(dir.path().join("config.json"), "{\"epochs\": 3}").unwrap();
    for cmd in [vec!["table"], vec!["check", "--reference", "protocols/reference.toml"]] {
        let o = std::process::Command::new(assert_cmd::cargo::cargo_bin("lmim-bench")).current_dir(env!("CARGO_MANIFEST_DIR")).args(&cmd).arg(dir.path()).output().unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains("cut.json: left out: not readable JSON"), "{cmd:?}: {e}");
        assert!(e.contains("future.json: left out:") && e.contains("schema"), "{cmd:?}: {e}");
        assert!(!e.contains("config.json"), "{cmd:?}: {e}");
    }
}
