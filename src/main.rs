fn main() {
    std::process::exit(lmim_bench::cli::main());
}
