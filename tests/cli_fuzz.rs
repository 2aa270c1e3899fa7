//! A deterministic property test over CLI arguments and config values: seeded random argument vectors for the
//! subcommands (wrong types, huge / negative / NaN / infinite numbers, empty strings, unknown keys, odd paths,
//! unicode, as `--set key=value` and bare `key=value`) each end with exit code 0, 1 or 2 within a time bound,
//! never with a panic, a C++ abort or a signal, and an exit 2 always says why. Also: a value of the wrong type
//! names its key and where it came from.
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use assert_cmd::cargo::CommandCargoExt;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const CASES: usize = 80;
const PARALLEL: usize = 4;
/// A case still running after this is a hang (generous: the cases that run train one step, on 2 busy cores).
const TIME_BOUND: Duration = Duration::from_secs(60);

fn bin() -> Command {
    let mut c = Command::cargo_bin("lmim-bench").unwrap();
    c.env("OMP_NUM_THREADS", "1");
    c
}

fn tiny_config() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/configs/lmim_tiny.toml")
}

/// A tiny data set, a pico encoder and a bad config file, shared by all cases.
fn fixtures(dir: &Path) {
    let st = bin()
        .args(["data", "synth", "--out"])
        .arg(dir.join("synth"))
        .args(["--classes", "2", "--train-per-class", "4", "--val-per-class", "2", "--size", "40"])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let st = bin().args(["init", "-c", tiny_config(), "-o"]).arg(dir.join("enc.safetensors")).stderr(Stdio::null()).status().unwrap();
    assert!(st.success());
    std::fs::write(dir.join("bad.toml"), "encoder = \"vit_pico\"\nbatch_size = \"sixty-four\"\n").unwrap();
    std::fs::write(dir.join("garbage.safetensors"), b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":").unwrap();
}

const VALUES: &[&str] = &[
    "-3", "0", "1", "2", "-1", "1.5", "-0.0", "1e-300", "1e300", "-1e300", "nan", "inf", "-inf", "9223372036854775807",
    "-9223372036854775808", "18446744073709551616", "100000000", "\"\"", "''", "\"sixty-four\"", "sixty-four", "true",
    "[1, 2]", "{a = 1}", "é漢字", "\"/dev/zero\"", "\"/nonexistent\"", "", "=", "\"\\u0000\"",
];
const PRETRAIN_KEYS: &[&str] = &[
    "epochs", "batch_size", "micro_batch_size", "accum_iter", "blr", "lr", "tau", "num_vis", "patch_gap", "decoder_depth",
    "decoder_dim", "decoder_heads", "proj_mlp_depth", "proj_mlp_dim", "warmup_epochs", "min_lr_frac", "weight_decay",
    "beta2", "seed", "device", "precision", "log_every", "checkpoint_every", "keep_last", "save_every", "nn_every",
    "num_workers", "encoder", "loss", "target_mom", "sim_init", "sim_end", "avg_sim_coeff", "crop_scale_min",
    "crop_scale_max", "data", "no_such_key", "", "a.b", "ü",
];
const PROTOCOL_KEYS: &[&str] = &[
    "epochs", "warmup_epochs", "blr", "lr", "batch_size", "micro_batch_size", "weight_decay", "beta1", "beta2",
    "layer_decay", "drop_path", "min_lr", "smoothing", "mixup", "cutmix", "mixup_prob", "reprob", "randaug",
    "global_pool", "crop_pct", "seed", "eval_every", "k", "temperature", "version", "no_such_key", "lrs",
];

struct Gen<'a> {
    rng: rand_chacha::ChaCha8Rng,
    dir: &'a Path,
}

impl Gen<'_> {
    fn pick<'s>(&mut self, from: &[&'s str]) -> &'s str {
        from.choose(&mut self.rng).unwrap()
    }
    fn path(&mut self, good: &str) -> String {
        let d = self.dir.display();
        let odd = [
            good.to_string(),
            good.to_string(),
            good.to_string(),
            "/dev/zero".into(),
            "/nonexistent/x".into(),
            String::new(),
            "é漢字".into(),
            "/".into(),
            format!("{d}/bad.toml"),
            format!("{d}/garbage.safetensors"),
            format!("{d}/synth"),
            "-".into(),
        ];
        odd.choose(&mut self.rng).unwrap().clone()
    }
    /// One to three overrides of `keys`, as `--set k=v` or bare `k=v`.
    fn sets(&mut self, keys: &[&str]) -> Vec<String> {
        let mut out = Vec::new();
        for _ in 0..self.rng.gen_range(1..=3) {
            let kv = format!("{}={}", self.pick(keys), self.pick(VALUES));
            if self.rng.gen_bool(0.7) {
                out.push("--set".into());
            }
            out.push(kv);
        }
        out
    }
    fn case(&mut self, i: usize) -> Vec<String> {
        let d = self.dir.display().to_string();
        let out = format!("{d}/out/{i}");
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<String>>();
        let small = s(&["--set", "epochs=1", "--set", "batch_size=8", "--set", "micro_batch_size=8"]);
        let kind = self.pick(&["pretrain", "pretrain", "knn", "knn", "linear", "finetune", "nn-loo", "table", "check", "convert", "info", "bench", "sweep", "init", "extract", "plot"]);
        match kind {
            "pretrain" => {
                let config = if self.rng.gen_bool(0.85) { tiny_config().to_string() } else { self.path(tiny_config()) };
                let data = self.path(&format!("{d}/synth"));
                let mut a = s(&["pretrain", "-q", "--no-tensorboard", "-c", &config, "--data", &data, "-o", &out]);
                a.extend(small);
                a.extend(s(&["--set", "device=\"cpu\"", "--set", "nn_every=0"]));
                a.extend(self.sets(PRETRAIN_KEYS));
                a
            }
            "knn" | "linear" | "finetune" | "nn-loo" => {
                let ck = self.path(&format!("{d}/enc.safetensors"));
                let data = self.path(&format!("{d}/synth"));
                let mut a = s(&["eval", "--protocol", kind, "--checkpoint", &ck, "--data", &data, "--device", "cpu", "--quiet", "--no-tensorboard"]);
                a.extend(s(&["--output", &out, "--cache-dir", &format!("{out}/cache")]));
                if kind == "linear" || kind == "finetune" {
                    a.extend(small);
                }
                a.extend(self.sets(PROTOCOL_KEYS));
                let flags = ["--k", "--temperature", "--batch-size", "--workers", "--last-blocks", "--query-chunk", "--bank-chunk", "--headline-k", "--feature", "--arch", "--precision"];
                for _ in 0..self.rng.gen_range(0..=3) {
                    let f = self.pick(&flags);
                    let v = match f {
                        "--feature" => self.pick(&["cls", "avg", "x", ""]),
                        "--arch" => self.pick(&["vit_pico_patch4_32", "vit_base_patch16_224", "x", ""]),
                        "--precision" => self.pick(&["f32", "bf16", "x"]),
                        _ => self.pick(VALUES),
                    };
                    a.extend(s(&[f, v]));
                }
                a
            }
            "table" => {
                let input = self.path(&format!("{d}/out"));
                let format = self.pick(&["markdown", "csv", "json", "x"]);
                let o = self.pick(&["-", "file"]);
                let o = if o == "file" { format!("{out}.md") } else { o.to_string() };
                s(&["table", &input, "--format", format, "-o", &o])
            }
            "check" => {
                let input = self.path(&format!("{d}/out"));
                let mut a = s(&["check", &input, "--tolerance", self.pick(VALUES)]);
                if self.rng.gen_bool(0.5) {
                    let reference = self.path(&format!("{d}/bad.toml"));
                    a.extend(s(&["--reference", &reference]));
                }
                a
            }
            "plot" => {
                let input = self.path(&format!("{d}/out"));
                s(&["plot", &input, "-o", &format!("{out}.png")])
            }
            "convert" => {
                let input = self.path(&format!("{d}/enc.safetensors"));
                let mut a = s(&["convert", &input, &format!("{out}.safetensors")]);
                if self.rng.gen_bool(0.5) {
                    a.extend(s(&["--arch", self.pick(&["vit_pico_patch4_32", "bogus", ""])]));
                }
                a
            }
            "info" => {
                let mut a = s(&["info"]);
                match self.rng.gen_range(0..3) {
                    0 => {}
                    1 => a.extend(s(&["--json"])),
                    _ => a.extend(s(&["--bogus"])),
                }
                a
            }
            "bench" => {
                let what = self.pick(&["pretrain", "finetune"]);
                let mut a = s(&["bench", what, "--device", "cpu", "--steps", self.pick(&["1", "0", "-1", "1e9"]), "--warmup", self.pick(&["0", "1", "-2"])]);
                a.extend(s(&["--set", "batch_size=2", "--set", "micro_batch_size=2"]));
                if what == "pretrain" {
                    a.extend(s(&["-c", tiny_config()]));
                    a.extend(self.sets(PRETRAIN_KEYS));
                } else {
                    a.extend(s(&["--arch", "vit_pico_patch4_32", "--batch-size", self.pick(&["2", "0", "-1", "99999999999"])]));
                    a.extend(self.sets(PROTOCOL_KEYS));
                }
                a
            }
            "sweep" => {
                let mut a = s(&["bench", "sweep", "--device", "cpu", "--steps", "1", "--warmup", "0"]);
                a.extend(s(&["--n", self.pick(&["0", "16", "-1", "64"]), "--dim", self.pick(&["0", "8", "-5"]), "--classes", self.pick(&["0", "2", "1000000000000"])]));
                a.extend(self.sets(&["epochs", "batch_size", "lrs", "no_such_key"]));
                a
            }
            "init" => {
                let mut a = s(&["init", "-c", tiny_config(), "-o", &format!("{out}.safetensors")]);
                a.extend(self.sets(PRETRAIN_KEYS));
                a
            }
            _ => {
                let ck = self.path(&format!("{d}/enc.safetensors"));
                let data = self.path(&format!("{d}/synth"));
                let mut a = s(&["extract", "--checkpoint", &ck, "--data", &data, "--device", "cpu", "--quiet", "--cache-dir", &out]);
                for f in ["--batch-size", "--workers", "--crop-pct", "--last-blocks"] {
                    if self.rng.gen_bool(0.5) {
                        a.extend(s(&[f, self.pick(VALUES)]));
                    }
                }
                a
            }
        }
    }
}

struct Outcome {
    args: Vec<String>,
    code: Option<i32>,
    stderr: String,
    hung: bool,
}

fn run_case(args: &[String], cwd: &Path) -> Outcome {
    let err_path = cwd.join(format!("stderr-{}", rand::random::<u64>()));
    let mut child = bin()
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let (code, hung) = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break (st.code(), false);
        }
        if t0.elapsed() > TIME_BOUND {
            let _ = child.kill();
            let _ = child.wait();
            break (None, true);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = String::from_utf8_lossy(&std::fs::read(&err_path).unwrap()).into_owned();
    Outcome { args: args.to_vec(), code, stderr, hung }
}

#[test]
fn random_arguments_and_config_values_never_panic_or_hang() {
    let dir = tempfile::tempdir().unwrap();
    fixtures(dir.path());
    let mut gen = Gen { rng: rand_chacha::ChaCha8Rng::seed_from_u64(18), dir: dir.path() };
    // First the valid commands the random cases are variations of: they must run, or the cases test little.
    let d = dir.path().display().to_string();
    let valid: Vec<Vec<String>> = [
        format!("pretrain -q --no-tensorboard -c {} --data {d}/synth -o {d}/out/valid --set epochs=1 --set batch_size=8 --set micro_batch_size=8 --set nn_every=0", tiny_config()),
        format!("eval --protocol knn --checkpoint {d}/enc.safetensors --data {d}/synth --device cpu --quiet --output {d}/out/valid-knn --cache-dir {d}/out/cache"),
        format!("convert {d}/enc.safetensors {d}/out/valid-convert.safetensors"),
        "info --json".to_string(),
    ]
    .iter()
    .map(|c| c.split(' ').map(str::to_string).collect())
    .collect();
    let mut cases = valid.clone();
    cases.extend((0..CASES).map(|i| gen.case(i)));
    let next = Mutex::new(0usize);
    let outcomes = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..PARALLEL {
            s.spawn(|| loop {
                let i = {
                    let mut n = next.lock().unwrap();
                    *n += 1;
                    *n - 1
                };
                let Some(args) = cases.get(i) else { break };
                let o = run_case(args, dir.path());
                outcomes.lock().unwrap().push(o);
            });
        }
    });
    let outcomes = outcomes.into_inner().unwrap();
    assert_eq!(outcomes.len(), cases.len());
    let mut bad = Vec::new();
    let mut by_code = [0usize; 3];
    for o in &outcomes {
        let crashed = ["panicked at", "RUST_BACKTRACE", "terminate called", "stack backtrace"].iter().find(|m| o.stderr.contains(*m));
        let why = if o.hung {
            Some(format!("still running after {TIME_BOUND:?}"))
        } else if !matches!(o.code, Some(0..=2)) {
            Some(format!("exit {:?} (a signal when None)", o.code))
        } else if let Some(m) = crashed {
            Some(format!("stderr has `{m}`"))
        } else if o.code == Some(2) && !o.stderr.contains("error") {
            Some("exit 2 without an error message".into())
        } else {
            None
        };
        match why {
            Some(w) => bad.push(format!("{w}: lmim-bench {:?}\n{}", o.args, o.stderr.chars().rev().take(800).collect::<String>().chars().rev().collect::<String>())),
            None => by_code[o.code.unwrap() as usize] += 1,
        }
    }
    assert!(bad.is_empty(), "{} of {} cases failed:\n{}", bad.len(), cases.len(), bad.join("\n---\n"));
    for v in &valid {
        let o = outcomes.iter().find(|o| &o.args == v).unwrap();
        assert_eq!(o.code, Some(0), "a valid command failed: lmim-bench {v:?}\n{}", o.stderr);
    }
    eprintln!("{} cases, exit codes 0/1/2: {by_code:?}", cases.len());
}

fn stderr_of(cmd: &mut Command) -> (Option<i32>, String) {
    let out = cmd.output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn pretrain(dir: &Path) -> Command {
    let mut c = bin();
    c.args(["pretrain", "-q", "--data"]).arg(dir.join("synth")).arg("-o").arg(dir.join("run"));
    c
}

#[test]
fn a_value_of_the_wrong_type_names_its_key_and_source() {
    let dir = tempfile::tempdir().unwrap();
    fixtures(dir.path());
    let bad = dir.path().join("bad.toml");
    let (code, err) = stderr_of(pretrain(dir.path()).arg("-c").arg(&bad));
    assert_eq!(code, Some(2));
    assert!(err.contains("bad.toml") && err.contains("`batch_size`") && err.contains("sixty-four"), "{err}");

    for set in [vec!["--set", "batch_size=sixty-four"], vec!["batch_size=\"sixty-four\""], vec!["--set", "seed=1", "--set", "batch_size=sixty-four", "--set", "epochs=2"]] {
        let (code, err) = stderr_of(pretrain(dir.path()).args(["-c", tiny_config()]).args(&set));
        assert_eq!(code, Some(2), "{set:?}");
        assert!(err.contains("--set") && err.contains("batch_size=") && err.contains("sixty-four"), "{set:?}: {err}");
        assert!(!err.contains("seed=1") && !err.contains("lmim_tiny.toml"), "blames only the bad override: {err}");
    }

    // Fine-tuning: a bad override is blamed, not the (built-in or given) protocol file.
    let ft = |extra: &[&str]| {
        let mut c = bin();
        c.args(["eval", "--protocol", "finetune", "--device", "cpu", "--quiet", "--checkpoint"])
            .arg(dir.path().join("enc.safetensors"))
            .arg("--data")
            .arg(dir.path().join("synth"))
            .arg("--output")
            .arg(dir.path().join("ft"))
            .args(extra);
        stderr_of(&mut c)
    };
    for extra in [&["--set", "epochs=-3"][..], &["epochs=-3"][..]] {
        let (code, err) = ft(extra);
        assert_eq!(code, Some(2));
        assert!(err.contains("--set") && err.contains("`epochs=-3`") && !err.contains("finetune.toml"), "{err}");
    }
    let file = dir.path().join("ft.toml");
    std::fs::write(&file, "epochs = -3\n").unwrap();
    let (code, err) = ft(&["--protocol-file", file.to_str().unwrap()]);
    assert_eq!(code, Some(2));
    assert!(err.contains("ft.toml") && err.contains("`epochs`"), "{err}");
}

/// The dotted numeric keys of a recipe's defaults (the entries of lists and optional keys included).
fn numeric_keys(v: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
    if let serde_json::Value::Object(m) = v {
        for (k, x) in m {
            match x {
                serde_json::Value::Object(_) => numeric_keys(x, &format!("{prefix}{k}."), out),
                serde_json::Value::Number(_) => out.push(format!("{prefix}{k}")),
                serde_json::Value::Array(a) if a.iter().all(|e| e.is_number()) => out.push(format!("{prefix}{k}")),
                // Optional numbers (`lr`, `clip_grad`, `temperature`, `headline_k`) are null by default.
                serde_json::Value::Null => out.push(format!("{prefix}{k}")),
                _ => {}
            }
        }
    }
}

/// Every numeric key of recipe `T` has a rule, and each of the values below, as an override of `src`, either
/// loads and validates (only where the rule admits it) or is an input error (exit 2) naming the key; never a
/// panic, never another exit code.
fn every_key_of<T: lmim_bench::config::Recipe>(src: &lmim_bench::config::Source, validate: impl Fn(&mut T) -> lmim_bench::Result<()>) -> usize {
    use lmim_bench::config::load_source;
    let rules = T::rules();
    let mut keys = Vec::new();
    numeric_keys(&serde_json::to_value(T::default()).unwrap(), "", &mut keys);
    let mut tried = 0;
    for key in &keys {
        let Some(rule) = rules.iter().find(|r| r.key == key) else {
            panic!("{}: key `{key}` has no rule in the validation table", src.origin.display());
        };
        let is_list = matches!(serde_json::to_value(T::default()).unwrap().pointer(&format!("/{}", key.replace('.', "/"))), Some(serde_json::Value::Array(_)));
        let mut values: Vec<String> = ["-3", "-1", "0", "1", "-0.5", "0.5", "nan", "inf", "-inf", "1e308", "-1e308", "9223372036854775807", "\"word\"", "true"].iter().map(|s| s.to_string()).collect();
        if is_list {
            values.extend(["[-1]", "[0]", "[nan]", "[1e308]", "[1]", "[]", "[\"word\"]"].iter().map(|s| s.to_string()));
        }
        for value in values {
            let set = format!("{key}={value}");
            tried += 1;
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                load_source::<T>(Some(src), std::slice::from_ref(&set)).and_then(|mut cfg| validate(&mut cfg).map(|()| cfg))
            }));
            let last = key.rsplit('.').next().unwrap();
            match outcome {
                Err(_) => panic!("`{set}` over {} panicked", src.origin.display()),
                Ok(Ok(cfg)) => {
                    // Accepted: the table must admit what was loaded.
                    let v = toml::Value::try_from(&cfg).unwrap();
                    let mut at = &v;
                    for p in key.split('.') {
                        at = at.get(p).unwrap_or_else(|| panic!("`{set}` accepted but `{key}` is absent"));
                    }
                    let entries: Vec<&toml::Value> = match at {
                        toml::Value::Array(a) => a.iter().collect(),
                        v => vec![v],
                    };
                    assert!(entries.iter().all(|e| rule.admits(e)), "`{set}` accepted over {} though the table says {}", src.origin.display(), rule.range_text());
                }
                Ok(Err(e)) => {
                    let msg = e.to_string();
                    assert_eq!(e.exit_code(), 2, "`{set}` over {}: {msg}", src.origin.display());
                    assert!(msg.contains(last), "`{set}` over {}: the message must name `{key}`: {msg}", src.origin.display());
                }
            }
        }
    }
    tried
}

#[test]
fn every_numeric_key_of_every_recipe_is_in_the_table_and_checked() {
    use lmim_bench::config::Source;
    use lmim_bench::protocols::{attentive::AttentiveConfig, finetune::FinetuneConfig, knn::ProtocolSpec, linear::LinearConfig, linear_sweep::SweepConfig, lowshot::LowshotConfig, Protocol};
    use lmim_bench::train::pretrain::PretrainConfig;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut n = 0;
    for cfg in ["configs/lmim_tiny.toml", "configs/lmim_vit_base.toml"] {
        n += every_key_of::<PretrainConfig>(&Source::file(&root.join(cfg)).unwrap(), |c| c.validate());
    }
    let builtin = |p: Protocol| Source { text: p.builtin().to_string(), origin: format!("<built-in {}>", p.file_name()).into() };
    n += every_key_of::<FinetuneConfig>(&builtin(Protocol::Finetune), |c| c.validate());
    n += every_key_of::<LinearConfig>(&builtin(Protocol::Linear), |c| c.validate());
    n += every_key_of::<SweepConfig>(&builtin(Protocol::LinearSweep), |c| c.validate());
    n += every_key_of::<ProtocolSpec>(&builtin(Protocol::Knn), |c| c.validate("knn"));
    n += every_key_of::<ProtocolSpec>(&builtin(Protocol::NnLoo), |c| c.validate("nn-loo"));
    n += every_key_of::<ProtocolSpec>(&builtin(Protocol::KnnSweep), |c| c.validate("knn-sweep"));
    n += every_key_of::<AttentiveConfig>(&builtin(Protocol::Attentive), |c| c.validate());
    n += every_key_of::<lmim_bench::protocols::davis::DavisConfig>(&builtin(Protocol::Davis), |c| c.validate());
    n += every_key_of::<LowshotConfig>(&builtin(Protocol::Lowshot), |c| c.validate("lowshot"));
    n += every_key_of::<lmim_bench::protocols::seg::SegConfig>(&builtin(Protocol::Seg), |c| c.validate());
    eprintln!("{n} overrides tried");
}

#[test]
fn a_value_out_of_range_names_its_key_value_range_and_source() {
    let dir = tempfile::tempdir().unwrap();
    fixtures(dir.path());
    // From a file: the key, the value, the range, the file and the line.
    let file = dir.path().join("neg.toml");
    let text = std::fs::read_to_string(tiny_config()).unwrap();
    let line = 1 + text.lines().position(|l| l.starts_with("min_lr_frac")).expect("the tiny config sets min_lr_frac");
    let text: Vec<&str> = text.lines().map(|l| if l.starts_with("min_lr_frac") { "min_lr_frac = -1.0" } else { l }).collect();
    std::fs::write(&file, text.join("\n")).unwrap();
    let (code, err) = stderr_of(pretrain(dir.path()).arg("-c").arg(&file));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(&format!("neg.toml:{line}")) && err.contains("`min_lr_frac` = -1.0") && err.contains("[0, 1]"), "{err}");
    // From overrides: each names its own key (not a neighbour), and the override.
    for (set, key, range) in [
        ("target_mom=1.5", "target_mom", "[0, 1]"),
        ("beta1=5", "beta1", "[0, 1)"),
        ("crop_scale_max=-1", "crop_scale_max", "(0, 1]"),
        ("decoder_depth=0", "decoder_depth", "1..=256"),
        ("clip_grad=nan", "clip_grad", "[0, 1000000]"),
        ("weight_decay=-0.05", "weight_decay", "[0, 10]"),
        ("tau=1e308", "tau", "(0, 100]"),
        ("log_every=-3", "log_every", "1..="),
    ] {
        let (code, err) = stderr_of(pretrain(dir.path()).args(["-c", tiny_config(), "--set", set]));
        assert_eq!(code, Some(2), "{set}: {err}");
        assert!(err.contains(&format!("`{set}`")) && err.contains(&format!("key `{key}`")) && err.contains(range), "{set}: {err}");
    }
    // A relation names both keys.
    let (code, err) = stderr_of(pretrain(dir.path()).args(["-c", tiny_config(), "crop_scale_min=0.9", "crop_scale_max=0.5"]));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("`crop_scale_min`") && err.contains("`crop_scale_max`"), "{err}");
}

#[test]
fn sizes_are_checked_against_the_address_space_limit_not_the_machine() {
    // `ulimit -v` (RLIMIT_AS, what a cluster job's limit is) far below the machine's memory: the size check
    // refuses by that limit, naming it (before: a panic in libtorch, exit 101).
    let bin = assert_cmd::cargo::cargo_bin("lmim-bench");
    let out = Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 6000000 && exec \"$0\" forward --arch vit_pico_patch4_32 --batch-size 25000 --repeat 1 --device cpu")
        .arg(&bin)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--batch-size") && err.contains("RLIMIT_AS") && err.contains("GiB"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // Within the limit, the same command runs.
    let ok = Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 6000000 && exec \"$0\" forward --arch vit_pico_patch4_32 --batch-size 64 --repeat 1 --device cpu")
        .arg(&bin)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
}
