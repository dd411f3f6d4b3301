//! `socktrace trace`: one line per lifecycle event, human or JSON Lines.

use crate::{clock::Clock, output::trace::TraceSink, pipeline};

pub struct Options {
    pub pipeline: pipeline::Options,
    pub json: bool,
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    // Every transition as it happens: none inferred.
    let started = pipeline::start(&options.pipeline, false)?;
    let mut sink = TraceSink::new(
        std::io::stdout().lock(),
        options.json,
        Clock::now(),
        started.scope(),
    );
    started.run(&mut sink).await
}
