//! What a process's file descriptors are, for when they rise and its TCP
//! sockets do not explain it: pipes, regular files, UDP or Unix sockets,
//! eventfds... The collector reads them from `/proc/PID/fd`
//! (`procfs::fd_kinds`) only for processes under suspicion, at most every
//! [`READ_EVERY_NS`]; this keeps the last two reads and what grew between.

use crate::model::FdKindCounts;

/// How often the fd kinds of one process are read.
pub const READ_EVERY_NS: u64 = 10_000_000_000;

/// The last two reads of one process's fd kinds.
#[derive(Clone, Debug, Default)]
pub struct FdKinds {
    latest: FdKindCounts,
    read_at_ns: u64,
    /// Growth per kind from the read before the latest one.
    rising: Vec<(&'static str, u64)>,
}

impl FdKinds {
    pub fn update(&mut self, counts: FdKindCounts, now_ns: u64) {
        let mut rising: Vec<(&'static str, u64)> = counts
            .iter()
            .filter_map(|(&kind, &count)| {
                let before = self.latest.get(kind).copied().unwrap_or(0);
                (count > before).then(|| (kind, count - before))
            })
            .collect();
        // The first read has nothing to compare with.
        if self.read_at_ns == 0 {
            rising.clear();
        }
        rising.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        self.rising = rising;
        self.latest = counts;
        self.read_at_ns = now_ns;
    }

    pub fn due(&self, now_ns: u64) -> bool {
        now_ns.saturating_sub(self.read_at_ns) >= READ_EVERY_NS
    }

    pub fn counts(&self) -> FdKindCounts {
        self.latest.clone()
    }

    pub fn rising(&self) -> Vec<(&'static str, u64)> {
        self.rising.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_between_reads_most_first() {
        let mut kinds = FdKinds::default();
        kinds.update(FdKindCounts::from([("pipe", 10), ("tcp", 3)]), 1);
        assert!(kinds.rising().is_empty(), "nothing to compare with");
        kinds.update(
            FdKindCounts::from([("pipe", 110), ("tcp", 4), ("file", 2)]),
            READ_EVERY_NS + 1,
        );
        assert_eq!(kinds.rising(), vec![("pipe", 100), ("file", 2), ("tcp", 1)]);
        assert!(!kinds.due(READ_EVERY_NS + 2));
        assert!(kinds.due(2 * READ_EVERY_NS + 1));
    }
}
