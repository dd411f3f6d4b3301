//! What a process's file descriptors are, for when they rise and its TCP
//! sockets do not explain it: pipes, regular files, UDP or Unix sockets,
//! eventfds... The collector reads them from `/proc/PID/fd` (see
//! `procfs::fd_kinds`) only for processes under suspicion, at most every
//! [`READ_EVERY_NS`]; this keeps the last two reads and what grew between.

use std::collections::BTreeMap;

use serde::Serializer;

/// fds by kind, e.g. `{"pipe": 512, "tcp": 3}`.
pub type FdKindCounts = BTreeMap<&'static str, u64>;

/// How often the fd kinds of one process are read.
pub const READ_EVERY_NS: u64 = 10_000_000_000;

/// The kind of one fd from its `/proc/PID/fd` link (`pipe:[123]`,
/// `anon_inode:[eventfd]`, `/var/log/x`); sockets are told apart by
/// their protocol name (`system.sockprotoname`: `TCP`, `UDPv6`, ...).
pub fn kind_of_link(link: &[u8], socket_protocol: impl FnOnce() -> Option<String>) -> &'static str {
    if link.starts_with(b"socket:[") {
        return match socket_protocol().as_deref() {
            Some("TCP" | "TCPv6") => "tcp",
            Some("UDP" | "UDPv6" | "UDP-Lite" | "UDPLITEv6") => "udp",
            Some(name) if name.starts_with("UNIX") => "unix",
            Some("NETLINK") => "netlink",
            _ => "other_socket",
        };
    }
    if link.starts_with(b"pipe:[") {
        return "pipe";
    }
    if let Some(anon) = link.strip_prefix(b"anon_inode:") {
        let name = anon.trim_ascii_start().strip_prefix(b"[").unwrap_or(anon);
        let name = name.strip_suffix(b"]").unwrap_or(name);
        return match name {
            b"eventfd" => "eventfd",
            b"eventpoll" => "eventpoll",
            b"inotify" => "inotify",
            b"timerfd" => "timerfd",
            b"signalfd" => "signalfd",
            b"pidfd" => "pidfd",
            _ => "other_anon_inode",
        };
    }
    if link.starts_with(b"/dev/") {
        return "device";
    }
    if link.starts_with(b"/") {
        return "file";
    }
    "other"
}

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

/// `fd_kinds_rising` as a JSON object, most first: `{"pipe": 95}`.
pub fn serialize_rising<S: Serializer>(
    rising: &[(&'static str, u64)],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_map(rising.iter().map(|(kind, grew)| (kind, grew)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_name_their_kind() {
        let none = || None;
        assert_eq!(kind_of_link(b"pipe:[4242]", none), "pipe");
        assert_eq!(kind_of_link(b"anon_inode:[eventfd]", none), "eventfd");
        assert_eq!(kind_of_link(b"anon_inode:inotify", none), "inotify");
        assert_eq!(kind_of_link(b"/tmp/log", none), "file");
        assert_eq!(kind_of_link(b"/dev/null", none), "device");
        assert_eq!(kind_of_link(b"socket:[9]", || Some("TCPv6".into())), "tcp");
        assert_eq!(kind_of_link(b"socket:[9]", || Some("UDP".into())), "udp");
        assert_eq!(
            kind_of_link(b"socket:[9]", || Some("UNIX-STREAM".into())),
            "unix"
        );
        assert_eq!(kind_of_link(b"socket:[9]", none), "other_socket");
        assert_eq!(kind_of_link(b"net:[4026531840]", none), "other");
    }

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
