//! The `watch` view for people: a `top`-like table redrawn in place, sized
//! to the terminal.

use std::io::{self, Write};

use crate::{
    model::{Alert, PeerReport, ProcessReport, Snapshot},
    text::{age, count, counted, seconds_phrase},
};

/// The terminal the table is drawn for.
#[derive(Clone, Copy, Debug)]
pub struct TableStyle {
    /// Columns; every line fits in them.
    pub width: usize,
    /// Process rows shown; the rest are counted on one line.
    pub max_rows: usize,
    /// ANSI bold/red for alerts.
    pub color: bool,
}

impl TableStyle {
    /// For the terminal on stdout (120x40 when it does not say), with
    /// room left for the header and the alert lines.
    pub fn of_terminal() -> Self {
        let (width, height) = match rustix::termios::tcgetwinsize(io::stdout()) {
            Ok(size) if size.ws_col > 0 => (usize::from(size.ws_col), usize::from(size.ws_row)),
            _ => (120, 40),
        };
        Self {
            width,
            max_rows: height.saturating_sub(10).max(5),
            color: true,
        }
    }
}

/// Homes the cursor, clears the screen and draws the table: a live view
/// like top.
pub fn redraw(out: &mut impl Write, snapshot: &Snapshot, style: &TableStyle) -> io::Result<()> {
    write!(out, "\x1b[H\x1b[2J{}", table(snapshot, style))
}

/// Alert messages listed under the table.
const MAX_ALERT_LINES: usize = 5;
const BOLD: &str = "\x1b[1m";
const ALERT: &str = "\x1b[1;31m";
const RESET: &str = "\x1b[0m";

struct Column {
    title: &'static str,
    width: usize,
    left: bool,
    /// On a narrow terminal, columns go lowest first; `None` stays.
    drop_order: Option<u8>,
}

const fn column(title: &'static str, width: usize, left: bool, drop_order: Option<u8>) -> Column {
    Column {
        title,
        width,
        left,
        drop_order,
    }
}

const COLUMNS: [Column; 12] = [
    column("PID", 7, false, None),
    column("COMM", 15, true, None),
    column("CONN/s", 7, false, Some(4)),
    column("CLOSE/s", 7, false, Some(2)),
    column("NET/s", 7, false, Some(1)),
    column("ESTAB", 6, false, Some(3)),
    column("CLOSE_WAIT", 10, false, None),
    column("CLOSED_HELD", 11, false, None),
    column("OLDEST", 7, false, Some(5)),
    column("FDS", 7, false, Some(6)),
    column("LIMIT", 7, false, Some(4)),
    column("ETA", 7, false, None),
];
/// The peer with most connections held, and how many.
const PEER_TITLE: &str = "TOP-PEER (HELD)";
/// The peer column goes first on a narrow terminal, when it would be
/// narrower than this.
const MIN_PEER_WIDTH: usize = 12;

/// A `top`-like view: a header with totals and lost events, one row per
/// process (worst first, alerting rows marked `!` and, with color, red), then
/// the messages of the alerts in force.
pub fn table(snapshot: &Snapshot, style: &TableStyle) -> String {
    let (shown, show_peer) = layout(style.width);
    let paint = |line: String, code: &str| {
        let line = fit(&line, style.width);
        if style.color {
            format!("{code}{line}{RESET}\n")
        } else {
            format!("{line}\n")
        }
    };
    let plain = |line: String| format!("{}\n", fit(&line, style.width));

    let mut out = String::new();
    out.push_str(&paint(header(snapshot), BOLD));
    let titles: Vec<String> = COLUMNS
        .iter()
        .map(|column| column.title.to_string())
        .collect();
    let peer_title = show_peer.then(|| PEER_TITLE.to_string());
    out.push_str(&paint(row(' ', &shown, &titles, peer_title), BOLD));
    for report in snapshot.processes.iter().take(style.max_rows) {
        let alerting = !report.alerts.is_empty();
        let flag = match (alerting, report.exited) {
            (true, _) => '!',
            (false, true) => 'x',
            (false, false) => ' ',
        };
        let peer = show_peer.then(|| top_peer(report));
        let line = row(flag, &shown, &cells(report), peer);
        out.push_str(&if alerting {
            paint(line, ALERT)
        } else {
            plain(line)
        });
    }
    let hidden = snapshot.processes.len().saturating_sub(style.max_rows);
    if hidden > 0 {
        out.push_str(&plain(format!("  … {hidden} more processes")));
    }

    let alerts: Vec<&Alert> = snapshot
        .processes
        .iter()
        .flat_map(|report| &report.alerts)
        .collect();
    for alert in alerts.iter().take(MAX_ALERT_LINES) {
        out.push_str(&paint(format!("! {}", alert.message), ALERT));
    }
    if alerts.len() > MAX_ALERT_LINES {
        let more = alerts.len() - MAX_ALERT_LINES;
        out.push_str(&plain(format!("  … {more} more alerts")));
    }
    out
}

/// Which of [`COLUMNS`] fit in `width`, and whether the peer column does.
fn layout(width: usize) -> (Vec<usize>, bool) {
    // The flag ("! ") and each column with its separating space.
    let used = |shown: &[usize]| {
        2 + shown
            .iter()
            .filter_map(|&index| COLUMNS.get(index))
            .map(|column| column.width + 1)
            .sum::<usize>()
    };
    let mut shown: Vec<usize> = (0..COLUMNS.len()).collect();
    let show_peer = used(&shown) + MIN_PEER_WIDTH <= width;
    let mut droppable: Vec<u8> = COLUMNS
        .iter()
        .filter_map(|column| column.drop_order)
        .collect();
    droppable.sort_unstable();
    for order in droppable {
        if used(&shown) <= width {
            break;
        }
        shown.retain(|&index| {
            COLUMNS
                .get(index)
                .is_some_and(|c| c.drop_order != Some(order))
        });
    }
    (shown, show_peer)
}

fn header(snapshot: &Snapshot) -> String {
    let processes = snapshot.processes.len();
    let held: u64 = snapshot.processes.iter().map(|report| report.held).sum();
    let close_wait: u64 = snapshot
        .processes
        .iter()
        .map(|report| report.close_wait)
        .sum();
    let closed_held: u64 = snapshot
        .processes
        .iter()
        .map(|report| report.closed_held)
        .sum();
    let alerting = snapshot
        .processes
        .iter()
        .filter(|report| !report.alerts.is_empty())
        .count();
    format!(
        "socktrace: {}, {} held, {} in CLOSE_WAIT, {} CLOSED_HELD, \
         {alerting} alerting, {} lost",
        counted(processes as u64, "process", "processes"),
        count(held),
        count(close_wait),
        count(closed_held),
        counted(snapshot.lost_events, "event", "events"),
    )
}

fn cells(report: &ProcessReport) -> Vec<String> {
    let dash = || "-".to_string();
    // The oldest stranded socket: in CLOSE_WAIT or CLOSED_HELD.
    let oldest = match (report.close_wait_oldest_s, report.closed_held_oldest_s) {
        (Some(waiting), closed) if closed.is_none_or(|closed| waiting >= closed) => {
            let prefix = if report.close_wait_oldest_lower_bound {
                "≥"
            } else {
                ""
            };
            format!("{prefix}{}", age(waiting))
        }
        (_, Some(closed)) => age(closed),
        _ => dash(),
    };
    vec![
        report.pid.to_string(),
        report.comm.clone(),
        format!("{:.1}", report.connects_per_s),
        format!("{:.1}", report.closes_per_s),
        format!("{:+.1}", report.net_per_s),
        report
            .sockets
            .get("ESTABLISHED")
            .copied()
            .unwrap_or(0)
            .to_string(),
        report.close_wait.to_string(),
        report.closed_held.to_string(),
        oldest,
        report.fds.map_or_else(dash, compact),
        report.fd_soft_limit.map_or_else(dash, compact),
        report.eta_s.map_or_else(dash, age),
    ]
}

/// "10.0.0.5:17000 (318) idle≈2.0 s"
fn top_peer(report: &ProcessReport) -> String {
    let Some(peer) = report.peers.first() else {
        return String::new();
    };
    let PeerReport {
        remote,
        local_port,
        held,
        peer_idle_timeout_s,
        ..
    } = peer;
    let mut text = match local_port {
        Some(port) => format!("{remote}→:{port} ({held})"),
        None => format!("{remote} ({held})"),
    };
    if let Some(timeout) = peer_idle_timeout_s {
        text.push_str(&format!(" idle≈{}", seconds_phrase(*timeout)));
    }
    text
}

fn row(flag: char, shown: &[usize], cells: &[String], peer: Option<String>) -> String {
    let mut line = format!("{flag} ");
    for &index in shown {
        let (Some(column), Some(cell)) = (COLUMNS.get(index), cells.get(index)) else {
            continue;
        };
        let cell = fit(cell, column.width);
        if column.left {
            line.push_str(&format!("{cell:<width$} ", width = column.width));
        } else {
            line.push_str(&format!("{cell:>width$} ", width = column.width));
        }
    }
    match peer {
        Some(peer) => line.push_str(&peer),
        None => line.truncate(line.trim_end().len()),
    }
    line
}

/// Cuts `text` to `width` characters, marking the cut with "…".
fn fit(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_string();
    }
    let mut cut: String = text.chars().take(width.saturating_sub(1)).collect();
    if width > 0 {
        cut.push('…');
    }
    cut
}

/// Table cells: exact up to 7 digits, then "12M"; RLIM_INFINITY is "unlim".
fn compact(value: u64) -> String {
    match value {
        u64::MAX => "unlim".to_string(),
        0..10_000_000 => value.to_string(),
        _ => format!("{}M", value / 1_000_000),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_cells() {
        assert_eq!(compact(65_535), "65535");
        assert_eq!(compact(u64::MAX), "unlim");
        assert_eq!(compact(1_073_741_816), "1073M");
    }

    #[test]
    fn fit_marks_the_cut() {
        assert_eq!(fit("abcdef", 4), "abc…");
        assert_eq!(fit("abc", 4), "abc");
        assert_eq!(fit("abc", 0), "");
    }
}
