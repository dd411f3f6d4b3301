//! The views: what the user sees of the model. Trace lines (human or JSON
//! Lines), the `watch` table and its JSON Lines; `serve` exports the same
//! reports as metrics (`crate::serve`). Functions here format; the
//! commands choose where the text goes.

pub mod json;
pub mod table;
pub mod trace;

use crate::probes::Counters;

/// Loss is never silent: say it on stderr at exit.
pub fn report_losses(counters: Counters) {
    let losses = [
        (
            counters.lost_events,
            "events lost (ring buffer full); raise --ring-buffer-kib",
        ),
        (
            counters.undecodable,
            "events could not be decoded (kernel programs and collector disagree?)",
        ),
        (
            counters.missed_runs,
            "probe runs skipped by the kernel (another BPF program was running on that CPU); their events are missing",
        ),
        (
            counters.ends_unseen,
            "sockets ended unseen (found when their address was used again); their closes are missing",
        ),
        (
            counters.socket_map_full,
            "sockets untracked (socket map full); raise --max-sockets",
        ),
    ];
    for (count, what) in losses {
        if count > 0 {
            eprintln!("socktrace: {count} {what}");
        }
    }
}
