//! Developer jobs for socktrace that are more than a plain `cargo build`.
//!
//! Run them as `cargo xtask <job>` (an alias in `.cargo/config.toml`).

mod bench;
mod build;
mod cmd;
mod setup;
mod test;
mod vm;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Developer jobs for socktrace")]
struct Cli {
    #[command(subcommand)]
    job: Job,
}

#[derive(Subcommand)]
enum Job {
    /// Install the toolchain pieces and test tools that are missing.
    Setup,
    /// Build socktrace with its kernel programs embedded.
    Build(build::BuildOptions),
    /// Build socktrace and run it (as root) with the given arguments.
    Run(build::RunOptions),
    /// Check formatting and lints, then run the unit and integration tests;
    /// with --vm, run the integration tests on other kernels under QEMU instead.
    Test(test::TestOptions),
    /// Benchmark socktrace against no tracer and its peers; writes docs/benchmarks.md.
    Bench(bench::BenchOptions),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cmd::put_cargo_bin_on_path();
    let result = match cli.job {
        Job::Setup => setup::run(),
        Job::Build(options) => build::build(&options).map(|_| ()),
        Job::Run(options) => build::run(&options),
        Job::Test(options) => test::run(&options),
        Job::Bench(options) => bench::run(&options),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
