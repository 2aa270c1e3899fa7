//! Weighted k-NN search time on the CPU (torch back-end: chunked matmul + top-k, then the votes) beside a NumPy
//! reference of the same workload (tests/py/ref_knn.py bench), in one run: random f32 features, 1000 classes.
//!
//! `cargo bench --bench knn`; sizes from KNN_BENCH_QUERIES (10000), KNN_BENCH_BANK (100000), KNN_BENCH_DIM (768),
//! KNN_BENCH_REPEAT (2). Results go to stdout as a Markdown table (benchmarks/knn.md keeps a copy).
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use lmim_bench::protocols::knn::{faiss_available, weighted_knn, Backend, KnnParams, SearchConfig};
use tch::{Device, Kind, Tensor};

fn env(name: &str, default: i64) -> i64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn python() -> PathBuf {
    if let Ok(p) = std::env::var("LMIM_PYTHON") {
        return PathBuf::from(p);
    }
    PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/lmim-bench/venv/bin/python")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn numpy(q: i64, n: i64, d: i64, k: i64, repeat: i64) -> Option<(f64, String)> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/py/ref_knn.py");
    let args: Vec<String> = [q, n, d, k, repeat].iter().map(|x| x.to_string()).collect();
    let out = Command::new(python()).arg(script).arg("bench").args(&args).output().ok()?;
    if !out.status.success() {
        eprintln!("numpy reference failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let secs: Vec<f64> = j["seconds"].as_array()?.iter().filter_map(|x| x.as_f64()).collect();
    Some((median(secs), j["numpy"].as_str().unwrap_or("?").to_string()))
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is parsed.
    let (q, n, d, repeat) = (env("KNN_BENCH_QUERIES", 10_000), env("KNN_BENCH_BANK", 100_000), env("KNN_BENCH_DIM", 768), env("KNN_BENCH_REPEAT", 2));
    tch::manual_seed(0);
    let opts = (Kind::Float, Device::Cpu);
    let bank = Tensor::randn([n, d], opts);
    let queries = Tensor::randn([q, d], opts);
    let bl = Tensor::randint(1000, [n], (Kind::Int64, Device::Cpu));
    let ql = Tensor::randint(1000, [q], (Kind::Int64, Device::Cpu));
    let torch = SearchConfig::with_backend(Device::Cpu, n, Backend::Torch);
    let mut backends = vec![torch.clone()];
    if faiss_available() {
        backends.push(SearchConfig::with_backend(Device::Cpu, n, Backend::Faiss));
    }
    println!(
        "k-NN, {q} queries x {n} bank x {d}-d, f32, CPU ({} torch threads), query chunk {}, bank chunk {} (torch); median of {repeat}\n",
        tch::get_num_threads(),
        torch.query_chunk,
        torch.bank_chunk
    );
    println!("| ks | back-end | lmim-bench (s) | NumPy (s) | queries/s lmim-bench | ratio NumPy / lmim-bench |");
    println!("|---|---|---|---|---|---|");
    let mut numpy_version = String::from("?");
    for ks in [vec![20i64], vec![10, 20, 100, 200]] {
        let kmax = *ks.iter().max().unwrap();
        let np = numpy(q, n, d, kmax, repeat);
        for search in &backends {
            // Warm-up: thread pools and allocator.
            let _ = weighted_knn(&bank.narrow(0, 0, 1000), &bl.narrow(0, 0, 1000), &queries.narrow(0, 0, 100), &ql.narrow(0, 0, 100), 1000, &KnnParams { ks: &[20], temperature: 0.07 }, search);
            let mut times = Vec::new();
            for _ in 0..repeat {
                let t = Instant::now();
                let r = weighted_knn(&bank, &bl, &queries, &ql, 1000, &KnnParams { ks: &ks, temperature: 0.07 }, search).expect("k-NN runs");
                times.push(t.elapsed().as_secs_f64());
                assert_eq!(r.n_queries, q);
            }
            let ours = median(times);
            let (np_s, ratio) = match &np {
                Some((s, v)) => {
                    numpy_version = v.clone();
                    (format!("{s:.2}"), format!("{:.2}", s / ours))
                }
                None => ("–".into(), "–".into()),
            };
            println!("| {ks:?} | {} | {ours:.2} | {np_s} | {:.0} | {ratio} |", search.backend_name(), q as f64 / ours);
        }
    }
    println!("\nNumPy {numpy_version}: normalise, matmul per 1024 queries, argpartition top-max(k), then the votes.");
}
