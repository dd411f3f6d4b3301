//! The `watch` and `serve` reports as JSON Lines, one object per line (the
//! records are `crate::model::{ProcessLine, AlertLine}`):
//! - `{"type":"process", "ts", ...ProcessReport fields, "lost_events"}` for
//!   every process, worst first;
//! - `{"type":"alert", "ts", ...Alert fields}` for each alert raised,
//!   worse, or resolved at this report.
//!
//! `ts` is the wall-clock time of the snapshot in seconds since the Unix
//! epoch, as a number with millisecond precision (e.g. `1716200000.123`).

use crate::model::{Alert, AlertLine, ProcessLine, Snapshot};

/// The snapshot as JSON Lines (each line ends with `\n`): process lines,
/// then the alerts announced at this report.
pub fn json_lines(snapshot: &Snapshot, ts_unix_s: f64) -> serde_json::Result<String> {
    let mut out = String::new();
    for report in &snapshot.processes {
        let line = ProcessLine::new(report, ts_unix_s, snapshot.lost_events);
        out.push_str(&serde_json::to_string(&line)?);
        out.push('\n');
    }
    for alert in &snapshot.new_alerts {
        out.push_str(&alert_line(alert, ts_unix_s)?);
        out.push('\n');
    }
    Ok(out)
}

/// One alert as a JSON `alert` line (without the newline).
pub fn alert_line(alert: &Alert, ts_unix_s: f64) -> serde_json::Result<String> {
    serde_json::to_string(&AlertLine::new(alert, ts_unix_s))
}
