//! `socktrace watch`: the per-process view, live in the terminal or as JSON
//! Lines, from the reports of [`WatchFeed`].

use std::io::{self, IsTerminal as _, Write};

use super::ReportOptions;
use crate::{
    clock::{self, duration_ns},
    collector::Sink,
    model::Output,
    output::{
        self, json,
        table::{self, TableStyle},
    },
    pipeline,
    probes::Counters,
    watch::{Watch, WatchFeed},
};

pub struct Options {
    pub pipeline: pipeline::Options,
    pub report: ReportOptions,
    pub json: bool,
    /// One report, after one interval, then exit.
    pub once: bool,
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    let started = pipeline::start(&options.pipeline, true)?;
    // `--once` waits an interval so that its single report has rates; a
    // continuous watch shows the sockets that exist at start right away.
    let first_report_ns = if options.once {
        started.start_ns + duration_ns(options.report.interval)
    } else {
        started.start_ns
    };
    let feed = WatchFeed::new(
        Watch::new(options.report.watch, started.start_ns),
        started.scope(),
        options.report.interval,
        first_report_ns,
    );
    let mut sink = WatchSink {
        feed,
        out: io::stdout().lock(),
        display: Display::choose(options.json),
        once: options.once,
        reported: false,
    };
    started.run(&mut sink).await
}

/// How reports are shown.
enum Display {
    /// A live table redrawn in place, like `top`.
    Terminal,
    /// JSON Lines (`--json`, or whenever stdout is not a terminal).
    Json,
}

impl Display {
    fn choose(json: bool) -> Self {
        if json || !io::stdout().is_terminal() {
            Self::Json
        } else {
            Self::Terminal
        }
    }
}

struct WatchSink<W: Write> {
    feed: WatchFeed,
    out: W,
    display: Display,
    once: bool,
    reported: bool,
}

impl<W: Write> WatchSink<W> {
    fn report(&mut self, now_ns: u64, lost_events: u64) -> io::Result<()> {
        let snapshot = self.feed.report(now_ns, lost_events);
        match self.display {
            Display::Json => {
                let lines =
                    json::json_lines(&snapshot, clock::unix_now_s()).map_err(io::Error::other)?;
                self.out.write_all(lines.as_bytes())?;
            }
            Display::Terminal => {
                table::redraw(&mut self.out, &snapshot, &TableStyle::of_terminal())?
            }
        }
        self.out.flush()
    }
}

impl<W: Write> Sink for WatchSink<W> {
    fn output(&mut self, output: &Output) -> io::Result<()> {
        self.feed.output(output);
        Ok(())
    }

    fn tick(&mut self, now_ns: u64, counters: &dyn Fn() -> Counters) -> io::Result<()> {
        self.feed.sample(now_ns);
        if (self.once && self.reported) || !self.feed.due(now_ns) {
            return Ok(());
        }
        self.report(now_ns, counters().lost())?;
        self.reported = true;
        Ok(())
    }

    fn finish(&mut self, counters: Counters) -> io::Result<()> {
        self.out.flush()?;
        output::report_losses(counters);
        Ok(())
    }

    fn container_stopped(&mut self) {
        self.feed.container_stopped();
    }

    fn done(&self) -> bool {
        self.once && self.reported
    }
}
