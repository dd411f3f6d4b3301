//! The socket model every stage shares, from the decoded events to the
//! views: a process name, a socket's owner, a transition, a socket found at
//! start, and what the socket stage hands downstream.

use std::{borrow::Cow, net::SocketAddr};

use arrayvec::ArrayVec;
use tracer_common::{MAX_HELD_STEPS, OwnerSource, TASK_COMM_LEN};

use crate::tcp::{CloseCause, TcpState};
use crate::text;

/// A task's command name, kept inline (the kernel's 16 bytes) so events
/// carry it without allocating. Stored as the kernel gives it and checked
/// for UTF-8 only when shown: it is copied for every event, read rarely.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Comm {
    /// NUL-padded.
    bytes: [u8; TASK_COMM_LEN],
}

impl Comm {
    /// From the kernel's NUL-terminated bytes; what follows the first NUL
    /// is cleared so that equal names compare equal.
    pub fn from_kernel(raw: &[u8; TASK_COMM_LEN]) -> Self {
        let mut bytes = *raw;
        if let Some(end) = raw.iter().position(|&b| b == 0) {
            bytes[end..].fill(0);
        }
        Self { bytes }
    }

    pub fn is_empty(&self) -> bool {
        self.bytes[0] == 0
    }

    /// The bytes up to the first NUL.
    fn name_bytes(&self) -> &[u8] {
        let end = self
            .bytes
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(TASK_COMM_LEN);
        &self.bytes[..end]
    }

    /// The name up to its first NUL, or to its first byte that is not valid
    /// UTF-8.
    pub fn as_str(&self) -> &str {
        let bytes = self.name_bytes();
        match std::str::from_utf8(bytes) {
            Ok(text) => text,
            Err(e) => std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or_default(),
        }
    }

    /// The name as every view shows it. Any process can name itself, so
    /// control characters (an escape sequence, a newline) and bytes that are
    /// not UTF-8 are written out as escapes (`\u{1b}`, `\n`, `\xff`): no name
    /// can drive the terminal, split a line or hide what follows it.
    /// Borrowed for a plain name, the common case.
    pub fn shown(&self) -> Cow<'_, str> {
        text::shown(self.name_bytes())
    }
}

impl From<&str> for Comm {
    fn from(text: &str) -> Self {
        let mut raw = [0; TASK_COMM_LEN];
        let mut len = text.len().min(TASK_COMM_LEN - 1);
        while !text.is_char_boundary(len) {
            len -= 1;
        }
        raw[..len].copy_from_slice(&text.as_bytes()[..len]);
        Self::from_kernel(&raw)
    }
}

impl std::ops::Deref for Comm {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(&self.shown())
    }
}

/// The process a socket belongs to, or unknown. Never the task that merely
/// happened to be on the CPU during a softirq transition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Owner {
    /// Host pid (tgid); `None` when the owner is not known.
    pub pid: Option<u32>,
    /// The pid inside the container socktrace is pointed at, as the kernel
    /// saw it (it stays known after the process exits).
    pub nspid: Option<u32>,
    pub comm: Comm,
    pub source: OwnerSource,
}

impl Owner {
    pub fn unknown() -> Self {
        Self {
            pid: None,
            nspid: None,
            comm: Comm::default(),
            source: OwnerSource::Unknown,
        }
    }

    /// A process found holding the socket's file (source `ProcFd`).
    pub fn holder(pid: u32, comm: Comm) -> Self {
        Self {
            pid: Some(pid),
            nspid: None,
            comm,
            source: OwnerSource::ProcFd,
        }
    }
}

/// One lifecycle event of one socket, attributed to its owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns).
    pub ktime_ns: u64,
    /// Identity of the socket while it lives: the kernel address of its
    /// `struct sock`.
    pub sock_id: u64,
    /// For the release of a [`TcpState::ClosedHeld`] socket, the process
    /// that let go (source `Close`, or `Exit` when its exit closed the fd).
    pub owner: Owner,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub old: TcpState,
    pub new: TcpState,
    /// Time spent in `old`; `None` when the socket was not seen entering it.
    pub dwell_ns: Option<u64>,
    /// Why the kernel closed the socket (transitions to CLOSE or
    /// CLOSED_HELD only).
    pub cause: Option<CloseCause>,
}

/// One transition of a socket: into `state` at `at_ns` (ktime).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    pub at_ns: u64,
    pub state: TcpState,
}

/// The transitions of one kernel record, oldest first.
pub type Steps = ArrayVec<Step, MAX_HELD_STEPS>;

/// Consecutive transitions of one socket under one owner, as the kernel
/// sends them in one record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Run {
    pub sock_id: u64,
    pub owner: Owner,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The state before the first step.
    pub from: TcpState,
    /// When the socket entered `from`; `None` when not seen.
    pub from_since_ns: Option<u64>,
    pub steps: Steps,
    /// Why the kernel closed the socket, for a step to CLOSE.
    pub cause: Option<CloseCause>,
}

impl Run {
    /// The steps as transitions, each with its dwell in the state before.
    pub fn transitions(&self) -> impl Iterator<Item = Transition> + '_ {
        let mut old = (self.from, self.from_since_ns);
        self.steps.iter().map(move |&Step { at_ns, state }| {
            let (from, since_ns) = std::mem::replace(&mut old, (state, Some(at_ns)));
            Transition {
                ktime_ns: at_ns,
                sock_id: self.sock_id,
                owner: self.owner,
                local: self.local,
                remote: self.remote,
                old: from,
                new: state,
                dwell_ns: since_ns.map(|since| at_ns.saturating_sub(since)),
                cause: self.cause.filter(|_| state.is_closed()),
            }
        })
    }
}

/// A socket that existed before socktrace started (age unknown): the one
/// record of it every stage uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExistingSocket {
    /// Its kernel address, which later events of the socket carry.
    pub sock_id: u64,
    pub owner: Owner,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: TcpState,
    /// For a socket in CLOSED_HELD, why the kernel closed it.
    pub cause: Option<CloseCause>,
    /// Inode of its network namespace.
    pub netns: u32,
}

impl ExistingSocket {
    /// In CLOSE with no remote end: made and not yet connected or listening
    /// (or disconnected). Its file holds no connection, whatever state the
    /// kernel gives it; its first event (connect, listen) starts it.
    pub fn is_unconnected(&self) -> bool {
        self.state == TcpState::ClosedHeld && self.remote.port() == 0
    }
}

/// One record per socket: when several processes share one (after fork),
/// the lowest pid is named, as the kernel map does; listeners first, so that
/// connections accepted from them are known as inbound.
pub fn one_per_socket(mut sockets: Vec<ExistingSocket>) -> Vec<ExistingSocket> {
    sockets.sort_unstable_by_key(|s| (s.sock_id, s.owner.pid));
    sockets.dedup_by_key(|s| s.sock_id);
    sockets.sort_by_key(|s| s.state != TcpState::Listen);
    sockets
}

/// What the socket stage hands downstream, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    Existing(ExistingSocket),
    Transition(Transition),
    ProcessExit {
        pid: u32,
        ktime_ns: u64,
    },
    /// A socket got a new owner without a state change: accept() came after
    /// its transitions were shown as unknown, or its owner exited and another
    /// process holds it now.
    OwnerChanged {
        sock_id: u64,
        owner: Owner,
        ktime_ns: u64,
    },
    /// Events were lost, and the kernel's file tables show what they hid: a
    /// socket tracked as held that no process holds any more (its end was
    /// lost) ...
    Gone {
        sock_id: u64,
        ktime_ns: u64,
    },
    /// ... or one held that was never seen (its start was lost).
    Found(ExistingSocket),
    /// An owner found in userspace, to be written into the kernel's socket
    /// map so that later events carry it (and `-p` filters by it).
    LearnedOwner {
        kernel_sock_id: u64,
        pid: u32,
        comm: String,
        state: TcpState,
    },
}

/// How an owner was learned, as it appears in JSON (`owner_source`).
pub fn owner_source_name(source: OwnerSource) -> &'static str {
    match source {
        OwnerSource::Unknown => "unknown",
        OwnerSource::Connect => "connect",
        OwnerSource::Accept => "accept",
        OwnerSource::Listen => "listen",
        OwnerSource::Close => "close",
        OwnerSource::ProcFd => "proc_fd",
        OwnerSource::Exit => "exit",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comm(raw: &[u8]) -> Comm {
        let mut bytes = [0; TASK_COMM_LEN];
        bytes[..raw.len()].copy_from_slice(raw);
        Comm::from_kernel(&bytes)
    }

    #[test]
    fn a_name_cannot_drive_the_terminal_or_split_a_line() {
        assert!(matches!(comm(b"ruler").shown(), Cow::Borrowed("ruler")));
        assert_eq!(comm(b"\x1b[2Jev\xffil\n").shown(), "\\u{1b}[2Jev\\xffil\\n");
        assert_eq!(comm("név".as_bytes()).shown(), "név");
        // Padded as a plain name would be.
        assert_eq!(format!("{:<8}|", comm(b"a\tb")), "a\\tb    |");
    }
}
