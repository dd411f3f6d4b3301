//! Developer jobs for socktrace that are more than a plain `cargo build`.
//!
//! Run them as `cargo xtask <job>` (an alias in `.cargo/config.toml`).

mod bench;
mod build;
mod cmd;
mod fuzz;
mod image;
mod package;
mod setup;
mod soak;
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
    /// Install what is missing: what building needs, and the tools of one
    /// job (--for) or of all of them.
    Setup {
        #[arg(long = "for", value_enum, default_value = "all")]
        needs: setup::Needs,
    },
    /// Build socktrace with its kernel programs embedded.
    Build(build::BuildOptions),
    /// Build socktrace and run it (as root) with the given arguments.
    Run(build::RunOptions),
    /// Check formatting and lints, then run the unit and integration tests;
    /// with --vm, run the integration tests on other kernels under QEMU instead.
    Test(test::TestOptions),
    /// Benchmark socktrace against no tracer and its peers; writes docs/benchmarks.md.
    Bench(bench::BenchOptions),
    /// Run the fuzz targets of tracer-user for a bounded time each.
    Fuzz(fuzz::FuzzOptions),
    /// A long run against a churn of short-lived processes (root).
    Soak(soak::SoakOptions),
    /// One process of the soak's churn.
    #[command(hide = true)]
    SoakWorker(soak::WorkerOptions),
    /// Build the Debian package (target/debian/socktrace_<version>_amd64.deb).
    Package,
    /// Build the container image localhost/socktrace:<version> with podman.
    Image,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cmd::put_cargo_bin_on_path();
    let result = match cli.job {
        Job::Setup { needs } => setup::run(needs),
        Job::Build(options) => build::build(&options).map(|_| ()),
        Job::Run(options) => build::run(&options),
        Job::Test(options) => test::run(&options),
        Job::Bench(options) => bench::run(&options),
        Job::Fuzz(options) => fuzz::run(&options),
        Job::Soak(options) => soak::run(&options),
        Job::SoakWorker(options) => soak::worker(&options),
        Job::Package => package::package().map(|_| ()),
        Job::Image => image::image().map(|_| ()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
