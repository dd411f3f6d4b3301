//! `socktrace trace`: one line per lifecycle event, human or JSON Lines.

use std::{
    borrow::Cow,
    io::{self, Write},
};

use crate::{
    clock::Clock,
    collector::Sink,
    model::{ExistingSocket, Output, Owner, TraceRecord, Transition, owner_source_name},
    probes::Counters,
    scope::Scope,
    tcp::TcpState,
    text,
};

pub struct TraceSink<W: Write> {
    out: W,
    json: bool,
    clock: Clock,
    scope: Scope,
    header_done: bool,
}

impl<W: Write> TraceSink<W> {
    pub fn new(out: W, json: bool, clock: Clock, scope: Scope) -> Self {
        Self {
            out,
            json,
            clock,
            scope,
            header_done: false,
        }
    }

    fn labelled<'a>(&mut self, mut record: TraceRecord<'a>) -> TraceRecord<'a> {
        if let Some(pid) = record.pid {
            let labels = self.scope.labels(pid).clone();
            record.nspid = labels.nspid;
            record.pidns = labels.pidns;
            record.container = labels.container;
        }
        record
    }

    fn record<'a>(&self, owner: &'a Owner, t: &Transition) -> TraceRecord<'a> {
        TraceRecord {
            ts: self.clock.rfc3339(t.ktime_ns),
            pid: owner.pid,
            comm: comm_or_unknown(owner),
            local: t.local.to_string(),
            remote: t.remote.to_string(),
            old: Some(t.old.name()),
            new: t.new.name(),
            dwell_ns: t.dwell_ns,
            cause: t.cause.map(|cause| cause.name()),
            owner_source: owner_source_name(owner.source),
            existing: false,
            sock: format!("{:#x}", t.sock_id),
            nspid: None,
            pidns: None,
            container: None,
        }
    }

    fn existing_record<'a>(&self, s: &'a ExistingSocket, now_ns: u64) -> TraceRecord<'a> {
        TraceRecord {
            ts: self.clock.rfc3339(now_ns),
            pid: s.owner.pid,
            comm: comm_or_unknown(&s.owner),
            local: s.local.to_string(),
            remote: s.remote.to_string(),
            old: None,
            new: s.state.name(),
            dwell_ns: None,
            cause: s.cause.map(|cause| cause.name()),
            owner_source: owner_source_name(s.owner.source),
            existing: true,
            sock: format!("{:#x}", s.sock_id),
            nspid: None,
            pidns: None,
            container: None,
        }
    }

    fn write(&mut self, record: &TraceRecord<'_>) -> io::Result<()> {
        if self.json {
            serde_json::to_writer(&mut self.out, record)?;
            return writeln!(self.out);
        }
        if !self.header_done {
            self.header_done = true;
            writeln!(
                self.out,
                "{:<15} {:>7} {:<15} {:<22} {:<22} {:<27} {:>9} CAUSE",
                "TIME(UTC)", "PID", "COMM", "LOCAL", "REMOTE", "OLD -> NEW", "DWELL"
            )?;
        }
        writeln!(self.out, "{}", human_line(record))
    }
}

fn comm_or_unknown(owner: &Owner) -> Cow<'_, str> {
    if owner.pid.is_none() {
        Cow::Borrowed("unknown")
    } else {
        owner.comm.shown()
    }
}

/// `03:32:22.123456 4242 ruler 127.0.0.1:40274 127.0.0.1:18080 ESTABLISHED -> CLOSE_WAIT 10.002s`
pub fn human_line(r: &TraceRecord<'_>) -> String {
    let time = r.ts.get(11..26).unwrap_or(&r.ts);
    // A process in a container shows its pid there too: host/container.
    let pid = match (r.pid, r.nspid) {
        (None, _) => "-".to_string(),
        (Some(pid), Some(nspid)) if nspid != pid => format!("{pid}/{nspid}"),
        (Some(pid), _) => pid.to_string(),
    };
    let change = format!("{} -> {}", r.old.unwrap_or("EXISTING"), r.new);
    let dwell = r.dwell_ns.map_or_else(|| "-".to_string(), text::duration);
    // The release of a socket the network had closed: who let go, and how.
    let released = r.old == Some(TcpState::ClosedHeld.name()) && r.new == TcpState::Close.name();
    let cause = match (r.cause, r.owner_source) {
        (Some(cause), _) => cause,
        (None, "exit") if released => "released at exit",
        (None, _) if released => "released by close",
        (None, _) => "",
    };
    let line = format!(
        "{time:<15} {pid:>7} {:<15} {:<22} {:<22} {change:<27} {dwell:>9} {cause}",
        r.comm, r.local, r.remote
    );
    line.trim_end().to_string()
}

impl<W: Write> Sink for TraceSink<W> {
    fn output(&mut self, output: &Output) -> io::Result<()> {
        match output {
            Output::Transition(t) => {
                if self.scope.wants(&t.owner, t.local, t.remote) {
                    let record = self.record(&t.owner, t);
                    let record = self.labelled(record);
                    self.write(&record)?;
                }
            }
            Output::Existing(s) => {
                if self.scope.wants(&s.owner, s.local, s.remote) {
                    let record = self.existing_record(s, crate::clock::monotonic_ns());
                    let record = self.labelled(record);
                    self.write(&record)?;
                }
            }
            &Output::ProcessExit { pid, ktime_ns } => self.scope.process_exited(pid, ktime_ns),
            // The socket's next transition shows its new owner.
            // Repairs after lost events change counts, not the event log.
            Output::OwnerChanged { .. }
            | Output::LearnedOwner { .. }
            | Output::Gone { .. }
            | Output::Found(_) => {}
        }
        Ok(())
    }

    fn tick(&mut self, _now_ns: u64, _counters: &dyn Fn() -> Counters) -> io::Result<()> {
        self.out.flush()
    }

    fn finish(&mut self, counters: Counters) -> io::Result<()> {
        self.out.flush()?;
        super::report_losses(counters);
        Ok(())
    }

    fn container_stopped(&mut self) {
        self.scope.widen_to_host();
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use tracer_common::OwnerSource;

    use super::*;
    use crate::{scope::Filter, tcp::CloseCause};

    fn sink(json: bool) -> TraceSink<Vec<u8>> {
        let clock = Clock::fixed(0, UNIX_EPOCH + Duration::from_secs(1_795_000_000));
        TraceSink::new(Vec::new(), json, clock, Scope::new(Filter::default(), None))
    }

    fn transition() -> Transition {
        Transition {
            ktime_ns: 1_500_000,
            sock_id: 0xffff_8880_0000_1000,
            owner: Owner {
                pid: Some(4242),
                nspid: None,
                comm: "ruler".into(),
                source: OwnerSource::Connect,
            },
            local: "127.0.0.1:40274".parse().unwrap(),
            remote: "127.0.0.1:18080".parse().unwrap(),
            old: TcpState::Established,
            new: TcpState::CloseWait,
            dwell_ns: Some(10_002_000_000),
            cause: None,
        }
    }

    #[test]
    fn json_line_has_the_documented_fields() {
        let mut s = sink(true);
        s.output(&Output::Transition(transition())).unwrap();
        let line = String::from_utf8(s.out).unwrap();
        let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
        assert_eq!(v["pid"], 4242);
        assert_eq!(v["comm"], "ruler");
        assert_eq!(v["local"], "127.0.0.1:40274");
        assert_eq!(v["remote"], "127.0.0.1:18080");
        assert_eq!(v["old"], "ESTABLISHED");
        assert_eq!(v["new"], "CLOSE_WAIT");
        assert_eq!(v["dwell_ns"], 10_002_000_000u64);
        assert_eq!(v["owner_source"], "connect");
        assert_eq!(v["existing"], false);
        assert_eq!(v["cause"], serde_json::Value::Null);
        assert_eq!(v["ts"], "2026-11-18T11:06:40.001500Z");
    }

    #[test]
    fn closed_held_and_its_release_read_as_such() {
        let mut s = sink(false);
        let mut reset = transition();
        reset.old = TcpState::CloseWait;
        reset.new = TcpState::ClosedHeld;
        reset.cause = Some(CloseCause::Reset);
        let mut release = transition();
        release.old = TcpState::ClosedHeld;
        release.new = TcpState::Close;
        release.owner.source = OwnerSource::Exit;
        s.output(&Output::Transition(reset)).unwrap();
        s.output(&Output::Transition(release)).unwrap();
        let text = String::from_utf8(s.out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].ends_with("CAUSE"), "{}", lines[0]);
        assert!(
            lines[1].contains("CLOSE_WAIT -> CLOSED_HELD"),
            "{}",
            lines[1]
        );
        assert!(lines[1].ends_with(" reset"), "{}", lines[1]);
        assert!(lines[2].contains("CLOSED_HELD -> CLOSE"), "{}", lines[2]);
        assert!(
            lines[2].ends_with("10.002s released at exit"),
            "{}",
            lines[2]
        );
    }

    #[test]
    fn human_line_reads_like_tcpstates() {
        let mut s = sink(false);
        let mut unknown = transition();
        unknown.owner = Owner::unknown();
        unknown.dwell_ns = None;
        s.output(&Output::Transition(transition())).unwrap();
        s.output(&Output::Transition(unknown)).unwrap();
        let text = String::from_utf8(s.out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("TIME(UTC)"));
        assert!(lines[1].contains("4242 ruler"), "{}", lines[1]);
        assert!(lines[1].contains("ESTABLISHED -> CLOSE_WAIT"));
        assert!(lines[1].trim_end().ends_with("10.002s"));
        assert!(lines[2].contains("      - unknown"), "{}", lines[2]);
    }

    #[test]
    fn filtered_out_events_are_not_printed() {
        let mut s = sink(true);
        s.scope.filter.pids = vec![1];
        s.output(&Output::Transition(transition())).unwrap();
        assert!(s.out.is_empty());
    }
}
