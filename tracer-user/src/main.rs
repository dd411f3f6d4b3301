//! socktrace: TCP socket lifecycles per owning process.
//!
//! Data flows through one module per stage: `probes` (kernel programs) →
//! `decode` (ring buffer records) → `sockets` (per-socket state and owners)
//! → `watch` (per-process reports) → the views (`output`, `serve`), all of
//! them speaking the records of `model`. `collector` runs the loop between
//! the stages, `pipeline` sets it up, and `commands` has one module per
//! subcommand; `cli` turns the command line into their options.

mod cli;
mod clock;
mod collector;
mod commands;
mod containers;
mod decode;
mod model;
mod output;
mod pipeline;
mod privileges;
mod probes;
mod procfs;
mod scope;
mod serve;
mod sockets;
mod tcp;
mod text;
mod watch;

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    keep_large_allocations_out_of_the_heap();
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    init_logging(cli.verbose);
    let result = match cli::Action::from(cli.command) {
        cli::Action::Run(command) => commands::run(command),
        cli::Action::Generate(what) => match cli::generate(&what, &mut std::io::stdout().lock()) {
            // `socktrace generate man | head` is not a failure.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            result => result.map_err(Into::into),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("socktrace: {}", text::one_line(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// A bad command line as one line and exit status 2, like the other
/// errors; `--help`, `--version` and a missing command print what clap
/// prints.
fn usage_error(error: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if !error.use_stderr() || error.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        error.exit();
    }
    // clap's message, its possible values and its suggestions ("a
    // similar argument exists: '--json'"), without the usage it repeats.
    let text = error.to_string();
    let said: Vec<String> = text
        .split("\n\n")
        .filter(|part| !part.starts_with("Usage:") && !part.starts_with("For more information"))
        .map(|part| {
            let lines: Vec<&str> = part.lines().map(str::trim).collect();
            lines.join(" ")
        })
        .filter(|part| !part.is_empty())
        .collect();
    let said = said.join("; ");
    let said = said.strip_prefix("error: ").unwrap_or(&said);
    eprintln!("socktrace: {said} (see --help)");
    ExitCode::from(2)
}

/// Blocks of 1 MiB or more (the socket tables, which double as they grow)
/// get pages of their own, returned to the system when freed. By default
/// glibc raises that threshold after the first such block is freed (the
/// kernel BTF parsed at start is one), and later tables then leave freed
/// heap behind them: 10 MB more RSS with 100k sockets, in some runs only.
/// (glibc's tuning; the static build's musl maps large blocks anyway.)
fn keep_large_allocations_out_of_the_heap() {
    // SAFETY: mallopt only changes malloc's tuning; it is called before any
    // other thread exists.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20)
    };
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default))
        .format_timestamp(None)
        .init();
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, fs, path::Path};

    const README: &str = include_str!("../../README.md");

    /// The paths of the README's layout table: the first cell's backquoted
    /// names, a bare name standing beside the path before it.
    fn layout_paths() -> Vec<String> {
        let table = README
            .split_once("## Layout")
            .expect("README has a layout")
            .1
            .lines()
            .skip_while(|line| !line.starts_with("| path |"))
            .skip(2)
            .take_while(|line| line.starts_with('|'));
        let mut paths = Vec::new();
        for row in table {
            let cell = row.split('|').nth(1).unwrap_or_default();
            let mut dir = String::new();
            for name in cell.split('`').skip(1).step_by(2) {
                if name.contains('/') {
                    dir = name
                        .rsplit_once('/')
                        .map(|(d, _)| d)
                        .unwrap_or("")
                        .to_string();
                    paths.push(name.to_string());
                } else if dir.is_empty() {
                    paths.push(name.to_string());
                } else {
                    paths.push(format!("{dir}/{name}"));
                }
            }
        }
        paths
    }

    #[test]
    fn the_readme_layout_matches_the_tree() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let paths = layout_paths();
        for path in &paths {
            assert!(
                root.join(path).exists(),
                "README names {path}, which does not exist"
            );
        }
        let listed: BTreeSet<&str> = paths.iter().map(|p| p.trim_end_matches('/')).collect();
        for entry in fs::read_dir(root.join("tracer-user/src")).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            let path = format!("tracer-user/src/{name}");
            let inside = listed.iter().any(|p| p.starts_with(&format!("{path}/")));
            assert!(
                listed.contains(path.as_str()) || inside,
                "the README's layout does not name {path}"
            );
        }
    }
}
