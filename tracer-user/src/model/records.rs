//! The JSON Lines records, one type per kind of line: a `trace` event, a
//! `watch`/`serve` process line and an alert line. The README documents
//! their fields in tables; the tests below hold those tables against these
//! types.

use std::borrow::Cow;

use serde::Serialize;

use super::{Alert, Container, ProcessReport};

/// One JSON line; the schema is documented in the README.
#[derive(Debug, Serialize)]
pub struct TraceRecord<'a> {
    pub ts: String,
    /// Owner's host pid; null when unknown.
    pub pid: Option<u32>,
    pub comm: Cow<'a, str>,
    pub local: String,
    pub remote: String,
    /// Null for a socket that existed before socktrace started.
    pub old: Option<&'static str>,
    pub new: &'static str,
    /// Time spent in `old`; null when unknown. For the release of a
    /// CLOSED_HELD socket, the time it was held after the network closed it.
    pub dwell_ns: Option<u64>,
    /// Why the kernel closed the socket (`reset`, `timed_out`, `refused`,
    /// `unreachable`, `other_error`); null when it gave no error.
    pub cause: Option<&'static str>,
    /// How the owner was learned; for a release, `close` or `exit`: how
    /// the process named in `pid` let go of the socket.
    pub owner_source: &'static str,
    /// True for sockets found at start (their age is unknown).
    pub existing: bool,
    /// Socket identity (kernel address, or inode for pre-existing sockets).
    pub sock: String,
    /// The owner's pid inside its own PID namespace.
    pub nspid: Option<u32>,
    /// Inode of the owner's PID namespace.
    pub pidns: Option<u64>,
    /// The owner's container, when it runs in one.
    pub container: Option<Container>,
}

/// A `"type":"process"` line: one process at one report.
#[derive(Serialize)]
pub struct ProcessLine<'a> {
    #[serde(rename = "type")]
    line_type: &'static str,
    ts: f64,
    #[serde(flatten)]
    report: &'a ProcessReport,
    lost_events: u64,
}

impl<'a> ProcessLine<'a> {
    pub fn new(report: &'a ProcessReport, ts_unix_s: f64, lost_events: u64) -> Self {
        Self {
            line_type: "process",
            ts: millisecond(ts_unix_s),
            report,
            lost_events,
        }
    }
}

/// A `"type":"alert"` line: an alert raised, worse, or resolved.
#[derive(Serialize)]
pub struct AlertLine<'a> {
    #[serde(rename = "type")]
    line_type: &'static str,
    ts: f64,
    #[serde(flatten)]
    alert: &'a Alert,
}

impl<'a> AlertLine<'a> {
    pub fn new(alert: &'a Alert, ts_unix_s: f64) -> Self {
        Self {
            line_type: "alert",
            ts: millisecond(ts_unix_s),
            alert,
        }
    }
}

/// Unix seconds as JSON shows them: to the millisecond.
fn millisecond(unix_s: f64) -> f64 {
    (unix_s * 1e3).round() / 1e3
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::model::{AlertKind, AlertState};

    const README: &str = include_str!("../../../README.md");

    /// The field names of the README's table that follows `intro`: the
    /// backquoted names of each row's first cell.
    fn documented(intro: &str) -> BTreeSet<String> {
        let after = README
            .split_once(intro)
            .unwrap_or_else(|| panic!("README has no {intro:?}"))
            .1;
        let table = after
            .lines()
            .skip_while(|line| !line.starts_with("| field |"))
            .skip(2)
            .take_while(|line| line.starts_with('|'));
        table
            .flat_map(|row| {
                let first = row.split('|').nth(1).unwrap_or_default();
                first
                    .split('`')
                    .skip(1)
                    .step_by(2)
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn keys(record: &impl Serialize) -> BTreeSet<String> {
        let value = serde_json::to_value(record).unwrap();
        value.as_object().unwrap().keys().cloned().collect()
    }

    #[test]
    fn trace_records_are_as_documented() {
        let record = TraceRecord {
            ts: String::new(),
            pid: None,
            comm: "".into(),
            local: String::new(),
            remote: String::new(),
            old: None,
            new: "CLOSE",
            dwell_ns: None,
            cause: None,
            owner_source: "unknown",
            existing: false,
            sock: String::new(),
            nspid: None,
            pidns: None,
            container: None,
        };
        assert_eq!(
            keys(&record),
            documented("`--json` prints JSON Lines, one object per event:")
        );
    }

    #[test]
    fn process_lines_are_as_documented() {
        let report = ProcessReport::default();
        assert_eq!(
            keys(&ProcessLine::new(&report, 1.0, 0)),
            documented("Process lines (`\"type\":\"process\"`)")
        );
    }

    #[test]
    fn alert_lines_are_as_documented() {
        let alert = Alert {
            kind: AlertKind::CloseWait,
            state: AlertState::Raised,
            pid: 7,
            comm: "leaky".into(),
            remote: None,
            eta_s: None,
            close_wait: 0,
            closed_held: 0,
            held: 0,
            fds: None,
            fd_soft_limit: None,
            lost_events: 0,
            message: String::new(),
        };
        assert_eq!(
            keys(&AlertLine::new(&alert, 1.0)),
            documented("Alert lines (`\"type\":\"alert\"`)")
        );
    }
}
