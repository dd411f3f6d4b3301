//! One module per command, each with one `run`: what it asks of the
//! pipeline, and which view it feeds.

pub mod doctor;
pub mod serve;
pub mod trace;
pub mod watch;

use std::time::Duration;

use crate::{privileges, probes::ProbeOptions, watch::WatchConfig};

/// A command with its options, as the command line gave them.
pub enum Command {
    Trace(trace::Options),
    Watch(watch::Options),
    Serve(serve::Options),
    Doctor(ProbeOptions),
}

/// How often processes are judged, and by which thresholds (`watch` and
/// `serve`).
#[derive(Clone, Debug)]
pub struct ReportOptions {
    pub interval: Duration,
    pub watch: WatchConfig,
}

pub fn run(command: Command) -> anyhow::Result<()> {
    privileges::check()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match command {
        Command::Trace(options) => runtime.block_on(trace::run(options)),
        Command::Watch(options) => runtime.block_on(watch::run(options)),
        Command::Serve(options) => runtime.block_on(serve::run(options)),
        Command::Doctor(options) => doctor::run(&options),
    }
}
