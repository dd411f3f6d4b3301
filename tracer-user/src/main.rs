//! The `socktrace` command: the command line, logging, and errors on one
//! line, over the library (`lib.rs`).

use std::process::ExitCode;

use clap::Parser as _;
use tracer_user::{cli, commands, text};

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
