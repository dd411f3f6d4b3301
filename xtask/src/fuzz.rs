//! `cargo xtask fuzz [--secs N] [TARGET...]`: builds the libFuzzer targets
//! of `tracer-user/fuzz` (nightly, address sanitizer), replays the inputs
//! that once crashed them (`regressions/<target>/`), then fuzzes each
//! target for N seconds from its seeds (`seeds/<target>/`) and the corpus
//! that earlier runs grew (`target/fuzz-corpus/<target>`). A crash fails
//! the job and leaves its input in `tracer-user/fuzz/artifacts/<target>/`.

use std::{fs, path::PathBuf, process::Command};

use anyhow::{Context as _, bail};
use clap::Args;

use crate::{cmd, setup};

/// The targets, as `tracer-user/fuzz/Cargo.toml` names them.
const TARGETS: [&str; 6] = [
    "ring_records",
    "proc_files",
    "kernel_layout",
    "http_request",
    "web_config",
    "hdr_log_names",
];

#[derive(Args)]
pub struct FuzzOptions {
    /// Seconds of fuzzing per target.
    #[arg(long, default_value_t = 60)]
    secs: u32,
    /// Only these targets (default: all).
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    targets: Vec<String>,
}

pub fn run(options: &FuzzOptions) -> anyhow::Result<()> {
    setup::run(setup::Needs::Fuzz)?;
    let fuzz_dir = cmd::workspace_root()?.join("tracer-user").join("fuzz");
    let targets: Vec<&str> = if options.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        options.targets.iter().map(String::as_str).collect()
    };
    cmd::run(&mut cargo_fuzz(&fuzz_dir, &["build", "-O"]))?;
    let mut crashed = Vec::new();
    for target in targets {
        let regressions = inputs(&fuzz_dir.join("regressions").join(target))?;
        if !regressions.is_empty() {
            // Files (not directories) are run once each.
            let mut replay = cargo_fuzz(&fuzz_dir, &["run", "-O", target]);
            replay.args(&regressions).args(["--", "-runs=1"]);
            if cmd::run(&mut replay).is_err() {
                crashed.push(format!("{target} (a regression input)"));
                continue;
            }
        }
        let corpus = cmd::target_dir()?.join("fuzz-corpus").join(target);
        fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
        let mut fuzz = cargo_fuzz(&fuzz_dir, &["run", "-O", target]);
        fuzz.arg(&corpus);
        let seeds = fuzz_dir.join("seeds").join(target);
        if seeds.is_dir() {
            fuzz.arg(&seeds);
        }
        fuzz.args(["--", &format!("-max_total_time={}", options.secs)]);
        if cmd::run(&mut fuzz).is_err() {
            crashed.push(target.to_string());
        }
    }
    if !crashed.is_empty() {
        bail!(
            "fuzzing found crashes in: {} (inputs in {}; once fixed, keep them in regressions/)",
            crashed.join(", "),
            fuzz_dir.join("artifacts").display()
        );
    }
    println!("fuzz: no crash in {} s per target", options.secs);
    Ok(())
}

/// `cargo +nightly fuzz ARGS` in the fuzz crate.
fn cargo_fuzz(fuzz_dir: &std::path::Path, args: &[&str]) -> Command {
    let mut cargo = Command::new("cargo");
    cargo
        .arg("+nightly")
        .arg("fuzz")
        .args(args)
        .current_dir(fuzz_dir);
    cargo
}

/// The files in `dir`, if it exists.
fn inputs(dir: &std::path::Path) -> anyhow::Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}
