//! Wire types shared by the kernel programs (`tracer-ebpf`) and the collector
//! (`tracer-user`).
//!
//! Every record in the ring buffer starts with an [`EventHeader`] whose `kind`
//! says which payload struct follows. Kinds have explicit, stable numbers; the
//! collector decodes them with `TryFrom` after checking the record length.
//! All structs are `#[repr(C)]` with explicit padding and fixed-width fields so
//! both sides agree on the layout; sizes are asserted at compile time.
#![no_std]

/// Ring buffer carrying every event to the collector.
pub const EVENTS_MAP: &str = "EVENTS";
/// Per-CPU `u64` counters, indexed by [`counter`].
pub const COUNTERS_MAP: &str = "COUNTERS";
/// Socket address (`struct sock *`) -> [`SocketEntry`]: who holds each
/// socket, and its transitions not yet reported.
pub const SOCKETS_MAP: &str = "SOCKETS";
/// Socket-local storage of [`SocketEntry`]s, for the programs on BTF
/// tracepoints (Linux 5.11+): the sockets beyond [`SOCKETS_MAP`]'s size.
pub const SK_STORE_MAP: &str = "SK_STORE";
/// Socket address -> [`SocketOwner`] for sockets found at start, and
/// owners found in userspace or by accept(), with BTF tracepoints (whose
/// state may live in [`SK_STORE_MAP`]): taken at the socket's next event.
pub const SEEDED_MAP: &str = "SEEDED";

/// tgid -> 1 for the `-p` filter (consulted only when `Config::filter_pids` is set).
pub const PID_FILTER_MAP: &str = "PID_FILTER";
/// One [`NamespaceFilter`]: restricts reports to one container. A map, not a
/// load-time constant, so the collector can lift it when the container stops.
pub const NS_FILTER_MAP: &str = "NS_FILTER";
/// Load-time configuration global, see [`Config`].
pub const CONFIG_GLOBAL: &str = "CONFIG";

/// Default ring buffer size: 2 MiB holds about 9k records. `watch` and
/// `serve` get six per loopback connection (the kernel holds transitions,
/// see [`holds`], and accept() names the server's owner), `trace` eleven;
/// the collector is woken each time the records waiting cross another
/// eighth of the ring, and drains it every 100 ms anyway: no loss in a
/// saturated loopback storm on two cores. It counts twice in RSS: the
/// kernel maps the data pages twice.
pub const DEFAULT_RING_BYTES: u32 = 2 << 20;
/// Default capacity of the socket map ([`SOCKETS_MAP`]).
pub const DEFAULT_MAX_SOCKETS: u32 = 262_144;
/// Size of the pid filter map (`-p` may be given this many times).
pub const MAX_PID_FILTER: u32 = 64;

pub const TASK_COMM_LEN: usize = 16;

/// Indexes into the per-CPU [`COUNTERS_MAP`].
pub mod counter {
    /// A ring buffer reserve failed: an event was lost.
    pub const LOST_EVENTS: u32 = 0;
    /// The socket map was full: a socket's owner could not be recorded.
    pub const SOCKET_MAP_FULL: u32 = 1;
    /// State changes the `_nested` BTF tracepoint program handled because
    /// the kernel did not let the first program run inside itself: counted
    /// by the kernel among that program's skipped runs, yet not lost.
    pub const RESCUED: u32 = 2;
    pub const COUNT: u32 = 3;
}

/// Event kinds. Numbers are part of the wire format: never reuse one.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    // 1 was one state transition per record, 2 an owner learned outside a
    // transition, 3 a fork: all replaced by `StateChanges`, or no longer
    // sent.
    /// A thread-group leader exited, [`ExitEvent`].
    Exit = 4,
    /// The last file of a socket that had already reached CLOSE was
    /// released (`close()` or exit), [`ReleaseEvent`].
    Release = 5,
    /// A socket's transitions since its last report, and its owner,
    /// [`StateChangesEvent`].
    StateChanges = 6,
}

impl TryFrom<u32> for EventKind {
    type Error = u32;
    fn try_from(value: u32) -> Result<Self, u32> {
        match value {
            4 => Ok(Self::Exit),
            5 => Ok(Self::Release),
            6 => Ok(Self::StateChanges),
            other => Err(other),
        }
    }
}

/// How a socket's owner was learned. Stable numbers, carried on the wire.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OwnerSource {
    /// Never seen in process context.
    Unknown = 0,
    /// The process called connect() (CLOSE -> SYN_SENT runs in its context).
    Connect = 1,
    /// The process accept()ed the socket.
    Accept = 2,
    /// The process called listen().
    Listen = 3,
    /// The process closed or shut the socket down (FIN_WAIT1 / LAST_ACK).
    Close = 4,
    /// Found holding the socket's file (sockets that predate socktrace, or
    /// re-homed after their owner exited): by the socket-file iterator.
    ProcFd = 5,
    /// The process exited and the kernel closed its fds (set by the
    /// collector, from [`ReleaseEvent::exiting`]).
    Exit = 6,
}

impl TryFrom<u8> for OwnerSource {
    type Error = u8;
    fn try_from(value: u8) -> Result<Self, u8> {
        match value {
            0 => Ok(Self::Unknown),
            1 => Ok(Self::Connect),
            2 => Ok(Self::Accept),
            3 => Ok(Self::Listen),
            4 => Ok(Self::Close),
            5 => Ok(Self::ProcFd),
            6 => Ok(Self::Exit),
            other => Err(other),
        }
    }
}

/// TCP states as numbered by the kernel (include/net/tcp_states.h).
pub mod tcp_state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
    pub const NEW_SYN_RECV: u8 = 12;
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;

/// Which process, if any, a transition running in the caller's context
/// proves to be the socket's owner. Only transitions that the kernel performs
/// inside a system call of the process holding the file descriptor qualify:
/// connect() moves CLOSE -> SYN_SENT, listen() moves CLOSE -> LISTEN, and
/// close()/shutdown() move to FIN_WAIT1 or LAST_ACK (tcp_close_state).
/// Everything else may run in softirq context on behalf of any task.
pub const fn owner_claim(new_state: u8) -> OwnerSource {
    match new_state {
        tcp_state::SYN_SENT => OwnerSource::Connect,
        tcp_state::LISTEN => OwnerSource::Listen,
        tcp_state::FIN_WAIT1 | tcp_state::LAST_ACK => OwnerSource::Close,
        _ => OwnerSource::Unknown,
    }
}

/// The longest `watch` and `serve` let the kernel hold a socket's
/// transitions ([`Config::hold_ns`]); see [`holds`] for which it holds.
pub const HOLD_NS: u64 = 200_000_000;

/// Whether the kernel may hold a transition into `state` (when the
/// collector aggregates): the states TCP's own timers end, so that the
/// next transition, which reports it, comes soon: a handshake, a close
/// under way (FIN_WAIT1, CLOSING, LAST_ACK, and FIN_WAIT2 once no file
/// holds the socket). A retransmission of the socket reports what it holds
/// too, so a peer that does not answer delays it by one timeout at most.
/// States a socket can stay in for as long as its owner likes
/// (ESTABLISHED, CLOSE_WAIT, LISTEN, a half-close, CLOSE) are reported at
/// once: the view of held sockets never waits on them.
pub const fn holds(state: u8, held_by_a_file: bool) -> bool {
    match state {
        tcp_state::SYN_SENT
        | tcp_state::SYN_RECV
        | tcp_state::FIN_WAIT1
        | tcp_state::CLOSING
        | tcp_state::LAST_ACK => true,
        tcp_state::FIN_WAIT2 => !held_by_a_file,
        _ => false,
    }
}

/// Common prefix of every ring buffer record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    /// An [`EventKind`] number.
    pub kind: u32,
    /// Thread-group id of the task on the CPU (not necessarily the owner).
    pub current_tgid: u32,
    /// bpf_ktime_get_ns() (CLOCK_MONOTONIC) when the event happened.
    pub ktime_ns: u64,
    /// Kernel address of the `struct sock`, used as the socket's identity
    /// while it lives. 0 for process events.
    pub sock_id: u64,
}

/// The process holding a socket, as recorded in the kernel's socket map and
/// repeated in each record about that socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketOwner {
    /// Owner's thread-group id; 0 when unknown.
    pub tgid: u32,
    /// Owner's tgid inside the PID namespace of [`NamespaceFilter`]; 0 when
    /// there is no filter or the owner is outside it.
    pub ns_tgid: u32,
    /// An [`OwnerSource`] number.
    pub source: u8,
    /// Current TCP state, to compute dwell times in the kernel.
    pub state: u8,
    /// 1 when the owner is in the PID namespace of [`NamespaceFilter`].
    pub in_pidns: u8,
    /// 1 when `state` is CLOSE and a file still holds the socket: the
    /// network ended the connection, the owner has not let go of it.
    pub closed_held: u8,
    /// Inode of the socket's network namespace, read once per socket; 0 when
    /// not read yet.
    pub netns: u32,
    /// When the socket entered `state` (bpf_ktime_get_ns); 0 when unknown.
    pub state_since_ns: u64,
    /// Owner's command name when it was learned.
    pub comm: [u8; TASK_COMM_LEN],
}

/// Addresses of one TCP connection. IPv4 addresses fill the first 4 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoints {
    pub family: u16,
    /// Host byte order.
    pub local_port: u16,
    /// Host byte order.
    pub remote_port: u16,
    pub _pad: u16,
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
}

/// How many transitions a socket holds before they must be reported: a
/// whole connection's life is five (CLOSE -> SYN_SENT -> ESTABLISHED ->
/// FIN_WAIT1 -> FIN_WAIT2 -> CLOSE).
pub const MAX_HELD_STEPS: usize = 6;

/// One transition a socket made: into `state` at `at_ns`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Step {
    /// bpf_ktime_get_ns() (CLOCK_MONOTONIC).
    pub at_ns: u64,
    pub state: u8,
    /// 1 when `state` is CLOSE and a file still holds the socket.
    pub closed_held: u8,
    pub _pad: [u8; 6],
}

/// The transitions of one socket since it was last reported, oldest first.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeldSteps {
    /// Entries of `steps` in use.
    pub count: u8,
    /// The state before the first step, as last reported (or as first
    /// seen).
    pub from_state: u8,
    /// 1 when `from_state` is CLOSE and a file held the socket.
    pub from_closed_held: u8,
    /// 1 once the collector has had a record of the socket.
    pub reported: u8,
    /// `sk_err` at a step to CLOSE: why the kernel ended the connection
    /// (ECONNRESET, ETIMEDOUT, ...), 0 when it gave no error.
    pub error: u32,
    /// When the socket entered `from_state`; 0 when not seen.
    pub from_since_ns: u64,
    pub steps: [Step; MAX_HELD_STEPS],
}

/// What the kernel keeps per socket (in [`SOCKETS_MAP`] or
/// [`SK_STORE_MAP`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketEntry {
    /// The owner and the state after the last step.
    pub owner: SocketOwner,
    pub held: HeldSteps,
    /// 1 for a socket accepted from a listener (a passive open): accept()
    /// may leave its owner in [`SEEDED_MAP`].
    pub passive: u32,
    pub _pad: u32,
}

/// A socket's transitions since its last report (`sock:inet_sock_set_state`),
/// or, with no step, news of its owner. `watch` and `serve` get the
/// transitions the kernel held (see [`holds`]) together with the next one;
/// `trace` one per transition.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateChangesEvent {
    pub header: EventHeader,
    /// The socket's owner after the last step. The socket's network
    /// namespace is `owner.netns`.
    pub owner: SocketOwner,
    pub endpoints: Endpoints,
    pub held: HeldSteps,
}

pub const DWELL_UNKNOWN: u64 = u64::MAX;

/// sched_process_exit of a thread-group leader (`header.current_tgid`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitEvent {
    pub header: EventHeader,
}

/// `tcp:tcp_destroy_sock` of a socket that reached CLOSE while a file held
/// it: the last holder let go. The kernel destroys such a socket in the
/// releasing task's own `close()` (or exit), so `header.current_tgid` is
/// that task.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReleaseEvent {
    pub header: EventHeader,
    /// The owner recorded for the socket (its state CLOSE since
    /// `owner.state_since_ns`).
    pub owner: SocketOwner,
    /// The addresses it had (the collector does not keep them).
    pub endpoints: Endpoints,
    /// Command of the releasing task.
    pub releaser_comm: [u8; TASK_COMM_LEN],
    /// Time from the socket's CLOSE to its release; [`DWELL_UNKNOWN`] when
    /// the socket was in CLOSE already when socktrace started.
    pub held_ns: u64,
    /// 1 when the releasing task was exiting (its fds closed by the kernel).
    pub exiting: u8,
    pub _pad: [u8; 7],
}

/// One TCP socket held by a process, as the socket-file iterator
/// ([`SOCKET_FILES_PROGRAM`]) writes it: the kernel's own view of which
/// process holds which socket, in any state (CLOSE included, which no
/// sock_diag table lists). One record per process and socket: a socket
/// shared after fork appears once for each holder.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketFileRecord {
    /// Kernel address of the `struct sock`: the socket's identity, as in
    /// [`EventHeader::sock_id`].
    pub sock_id: u64,
    /// The holding process (thread-group id).
    pub tgid: u32,
    /// Inode of the socket's network namespace.
    pub netns: u32,
    /// `sk_err`: for a socket in CLOSE, why the kernel ended it.
    pub error: u32,
    pub state: u8,
    pub _pad: [u8; 3],
    pub endpoints: Endpoints,
    pub comm: [u8; TASK_COMM_LEN],
}

/// The socket-file iterator (`iter/task_file`).
pub const SOCKET_FILES_PROGRAM: &str = "socket_files";

/// Bytes of `struct sock_common` the BTF tracepoint programs copy in one
/// read: the family, ports and IPv4 and IPv6 addresses all end within them
/// (the collector checks it against the running kernel).
pub const SOCK_COMMON_BYTES: usize = 96;

/// Bytes of the `sock:inet_sock_set_state` record the kernel program copies
/// in one read; every field it uses must end within them. The record is 72
/// bytes on every kernel that has it, and it sits at the start of a per-CPU
/// buffer of several KiB, so the copy never runs past readable memory.
pub const SET_STATE_RECORD_BYTES: usize = 96;

/// Byte offsets of the fields the kernel programs read, taken from the running
/// kernel (tracefs `format` files and BTF) and written into [`CONFIG_GLOBAL`]
/// before load, so nothing here depends on one kernel build's layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    // sock:inet_sock_set_state record.
    pub set_state_skaddr: u16,
    pub set_state_oldstate: u16,
    pub set_state_newstate: u16,
    pub set_state_sport: u16,
    pub set_state_dport: u16,
    pub set_state_family: u16,
    pub set_state_protocol: u16,
    pub set_state_saddr: u16,
    pub set_state_daddr: u16,
    pub set_state_saddr_v6: u16,
    pub set_state_daddr_v6: u16,
    // syscalls:sys_exit_accept{,4} record.
    pub accept_ret: u16,
    // tcp:tcp_destroy_sock and tcp:tcp_retransmit_skb records.
    pub destroy_skaddr: u16,
    pub retransmit_skaddr: u16,
    /// 1 when `file_refs` is a `file_ref_t` (Linux 6.13, commit
    /// 90ee6ed776c0 "fs: port files to file_ref"): it counts references
    /// less one, so a file in use reads 0 or more. Before, `f_count` is
    /// the plain count, above 0 while in use.
    pub file_refs_less_one: u16,
    pub _pad: u16,
    // Kernel structs (BTF), walked to find the socket behind an accepted fd:
    // current->files->fdt->fd[n]->private_data (struct socket)->sk.
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdtable_max_fds: u32,
    pub fdtable_fd: u32,
    pub file_private_data: u32,
    pub socket_sk: u32,
    // sk->__sk_common.skc_net.net->ns.inum: the socket's network namespace.
    pub sock_common_net: u32,
    pub net_ns_inum: u32,
    // Whether a file still holds a socket that reaches CLOSE, and why it
    // closed: sk->sk_socket->file->f_ref (or f_count), sk->sk_err.
    pub sock_socket: u32,
    pub sock_err: u32,
    pub socket_file: u32,
    pub file_refs: u32,
    // The socket-file iterator: file->f_inode->i_mode tells a socket file;
    // then the socket's family, protocol, type, state and addresses.
    pub file_inode: u32,
    pub inode_mode: u32,
    pub sock_family: u32,
    pub sock_state: u32,
    pub sock_protocol: u32,
    pub sock_type: u32,
    pub sock_dport: u32,
    pub sock_daddr: u32,
    pub sock_rcv_saddr: u32,
    pub sock_v6_daddr: u32,
    pub sock_v6_rcv_saddr: u32,
    /// inet_sock.inet_sport: the local port, kept after CLOSE (skc_num is
    /// cleared when the port is released).
    pub inet_sport: u32,
    pub task_tgid: u32,
    pub task_comm: u32,
    /// task->flags, for PF_EXITING.
    pub task_flags: u32,
}

/// Restricts reports to sockets of one container: owned by a process in one
/// PID namespace and, when `netns_ino` is set, living in one network namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NamespaceFilter {
    /// 0: no filter.
    pub enabled: u32,
    /// 0: any network namespace.
    pub netns_ino: u32,
    /// Device and inode of the PID namespace (as `stat` reports them on
    /// /proc/PID/ns/pid), for `bpf_get_ns_current_pid_tgid`.
    pub pidns_dev: u64,
    pub pidns_ino: u64,
}

/// Load-time configuration of the kernel programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub layout: Layout,
    /// The collector's own tgid: its sockets are never reported.
    pub self_tgid: u32,
    /// Non-zero: only report sockets whose owner is in [`PID_FILTER_MAP`]
    /// (sockets with an unknown owner still pass, for the collector to decide).
    pub filter_pids: u32,
    /// Non-zero: only report sockets with this local or remote port.
    pub filter_port: u16,
    /// 0 for both, or [`AF_INET`] / [`AF_INET6`].
    pub filter_family: u16,
    /// Wake the collector only once this many bytes wait in the ring buffer;
    /// between wake-ups it drains on its own timer. Waking it for every event
    /// costs more than the event itself at high rates.
    pub wakeup_bytes: u32,
    /// Non-zero: BTF tracepoints, whose state may live in socket storage
    /// ([`SK_STORE_MAP`]) too, and the iterator records holders in
    /// [`SEEDED_MAP`].
    pub sk_storage: u32,
    /// Transitions into the states [`holds`] names are held in the
    /// socket's entry and reported with the next transition, or when the
    /// first of them is this old, or at a retransmission; a full
    /// [`HeldSteps`] is reported at once. 0: each transition is reported as
    /// it happens (`trace`).
    pub hold_ns: u64,
}

macro_rules! assert_size {
    ($t:ty, $n:expr) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $n);
    };
}
assert_size!(EventHeader, 24);
assert_size!(SocketOwner, 40);
assert_size!(Endpoints, 40);
assert_size!(Step, 16);
assert_size!(HeldSteps, 16 + 16 * MAX_HELD_STEPS);
assert_size!(SocketEntry, 40 + 112 + 8);
assert_size!(StateChangesEvent, 24 + 40 + 40 + 112);
assert_size!(ExitEvent, 24);
assert_size!(ReleaseEvent, 24 + 40 + 40 + 16 + 8 + 8);
assert_size!(SocketFileRecord, 24 + 40 + 16);
assert_size!(Layout, 32 + 4 * 27);
assert_size!(Config, 32 + 4 * 27 + 28);
assert_size!(NamespaceFilter, 24);

#[cfg(feature = "user")]
mod pod {
    macro_rules! pod {
        ($($t:ident),*) => {$(
            // SAFETY: #[repr(C)], made only of integers and byte arrays
            // with explicit padding, so every bit pattern is valid.
            unsafe impl aya::Pod for super::$t {}
        )*};
    }
    pod!(
        SocketOwner,
        SocketEntry,
        Config,
        NamespaceFilter,
        EventHeader,
        StateChangesEvent,
        ExitEvent,
        ReleaseEvent,
        SocketFileRecord
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_states_tcp_ends_by_itself_are_held() {
        use tcp_state::*;
        for state in [SYN_SENT, SYN_RECV, FIN_WAIT1, CLOSING, LAST_ACK] {
            assert!(holds(state, true) && holds(state, false), "{state}");
        }
        // An orphan closing ends by the kernel's timer; a half-close its
        // owner keeps may last for ever.
        assert!(holds(FIN_WAIT2, false) && !holds(FIN_WAIT2, true));
        for state in [ESTABLISHED, CLOSE_WAIT, LISTEN, CLOSE] {
            assert!(!holds(state, true) && !holds(state, false), "{state}");
        }
    }
}
