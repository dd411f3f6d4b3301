//! The TCP sockets that existed before socktrace started.
//!
//! The probes only see state changes that happen after they attach, so the
//! socket table is seeded once from the kernel's own view: a sock_diag dump
//! (what `ss -tan` reads) gives every TCP socket with its inode, and one scan
//! of the /proc fd tables maps inodes to the processes holding them.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;

use netlink_packet_core::{
    ErrorBuffer, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NetlinkBuffer, NetlinkHeader,
    NetlinkMessage, Parseable,
};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP, SOCK_DIAG_BY_FAMILY};
use netlink_packet_sock_diag::inet::{
    ExtensionFlags, InetRequest, InetResponseHeader, SocketId, StateFlags,
};
use netlink_sys::{Socket, protocols::NETLINK_SOCK_DIAG};

use crate::procfs;

/// Kernel dump datagrams are at most 32 KiB (netlink caps its dump skbs
/// there); twice that leaves room, and MSG_TRUNC still catches a longer one.
const RECV_BUFFER_LEN: usize = 64 * 1024;

/// Upper bound on the threads that scan /proc fd tables.
const MAX_SCAN_THREADS: usize = 4;

/// Why the socket table could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("cannot open a NETLINK_SOCK_DIAG socket")]
    Socket(#[source] io::Error),
    #[error("cannot send the sock_diag dump request")]
    Send(#[source] io::Error),
    #[error("cannot receive the sock_diag dump")]
    Recv(#[source] io::Error),
    #[error("the kernel refused the sock_diag TCP dump (is inet_diag/tcp_diag available?)")]
    Kernel(#[source] io::Error),
    #[error("malformed sock_diag message: {0}")]
    Malformed(String),
    #[error("cannot open network namespace {}", .path.display())]
    OpenNetns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot enter network namespace {} (setns needs CAP_SYS_ADMIN)", .path.display())]
    EnterNetns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the thread that dumps another network namespace")]
    Thread(#[source] io::Error),
    #[error("a socket seeding thread panicked")]
    ThreadPanicked,
}

/// One TCP socket as the kernel's socket table reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiagSocket {
    /// `AF_INET` or `AF_INET6`; IPv4-mapped addresses stay `AF_INET6`, as the
    /// `sock:inet_sock_set_state` tracepoint reports them.
    pub family: u16,
    /// Kernel TCP state number (`TCP_ESTABLISHED` = 1 ... `TCP_CLOSING` = 11).
    /// Pending connections (request sockets) report `TCP_SYN_RECV`; kernels
    /// that dump bound-only sockets (the `TCP_BOUND_INACTIVE` filter bit)
    /// report those as `TCP_CLOSE` (7).
    pub state: u8,
    /// Ports are in host byte order.
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// 0 for sockets no file refers to: TIME_WAIT, request and orphaned sockets.
    pub inode: u64,
    pub uid: u32,
    /// The socket cookie, the value `bpf_get_socket_cookie` returns.
    pub cookie: u64,
}

/// A pre-existing TCP socket with the processes that hold it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeededSocket {
    pub family: u16,
    pub state: u8,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub inode: u64,
    /// Tgids holding an fd on the socket, sorted; empty when `inode` is 0.
    pub owners: Vec<u32>,
}

/// Every TCP socket that a file can refer to (IPv4 and IPv6, all states but
/// TIME_WAIT and request sockets) in the caller's network namespace.
///
/// TIME_WAIT and request sockets have no inode and so no owner; after a
/// connection storm there can be hundreds of thousands of them, and leaving
/// them out in the kernel keeps a dump cheap.
pub fn dump_tcp_sockets() -> Result<Vec<DiagSocket>, SeedError> {
    let socket = sock_diag_socket()?;
    let mut buffer = vec![0u8; RECV_BUFFER_LEN];
    let mut sockets = Vec::new();
    for (sequence, family) in [(1, AF_INET), (2, AF_INET6)] {
        let id = if family == AF_INET6 {
            SocketId::new_v6()
        } else {
            SocketId::new_v4()
        };
        send_request(&socket, family, sequence, NLM_F_REQUEST | NLM_F_DUMP, id)?;
        receive_dump(&socket, &mut buffer, &mut sockets)?;
    }
    Ok(sockets)
}

/// The TCP sockets with exactly these (local, remote) addresses, in the
/// caller's network namespace. One request per socket: the kernel answers
/// with a hash lookup, where a dump walks every socket (after a connection
/// storm, hundreds of thousands in TIME_WAIT).
pub fn find_tcp_sockets(pairs: &[(SocketAddr, SocketAddr)]) -> Result<Vec<DiagSocket>, SeedError> {
    let socket = sock_diag_socket()?;
    let mut buffer = vec![0u8; RECV_BUFFER_LEN];
    let mut sockets = Vec::new();
    for (sequence, &(local, remote)) in (1..).zip(pairs) {
        let family = if local.is_ipv6() { AF_INET6 } else { AF_INET };
        let id = SocketId {
            source_port: local.port(),
            destination_port: remote.port(),
            source_address: local.ip(),
            destination_address: remote.ip(),
            interface_id: 0,
            // All 0xff: no cookie to match, look the socket up by address.
            cookie: [0xff; 8],
        };
        send_request(&socket, family, sequence, NLM_F_REQUEST, id)?;
        let len = socket
            .recv(&mut &mut buffer[..], 0)
            .map_err(SeedError::Recv)?;
        match parse_datagram(&buffer[..len.min(buffer.len())], &mut sockets) {
            Ok(_) => {}
            // The socket is gone: not an error for a lookup.
            Err(SeedError::Kernel(e)) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(sockets)
}

/// A netlink socket answers for the namespace it was created in.
fn sock_diag_socket() -> Result<Socket, SeedError> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).map_err(SeedError::Socket)?;
    socket.bind_auto().map_err(SeedError::Socket)?;
    // Connected to the kernel (port 0), so no other sender can inject replies.
    socket
        .connect(&netlink_sys::SocketAddr::new(0, 0))
        .map_err(SeedError::Socket)?;
    Ok(socket)
}

/// Every TCP socket in the network namespace of `netns_path` (for example
/// `/proc/PID/ns/net`), leaving the caller's namespace untouched.
pub fn dump_tcp_sockets_in_netns(netns_path: &Path) -> Result<Vec<DiagSocket>, SeedError> {
    in_netns(netns_path, dump_tcp_sockets)
}

/// Runs `work` in the network namespace of `netns_path`, on a short-lived
/// thread, so the caller's namespace is untouched.
pub fn in_netns<T: Send + 'static>(
    netns_path: &Path,
    work: impl FnOnce() -> Result<T, SeedError> + Send + 'static,
) -> Result<T, SeedError> {
    let netns = File::open(netns_path).map_err(|source| SeedError::OpenNetns {
        path: netns_path.to_owned(),
        source,
    })?;
    let path = netns_path.to_owned();
    // setns(CLONE_NEWNET) moves only the calling thread, so a short-lived
    // thread enters the namespace, creates the netlink socket there and exits.
    let worker = thread::Builder::new()
        .name("socktrace-seed-netns".into())
        .spawn(move || {
            // SAFETY: `netns` is an open file owned by this closure; setns only
            // reads the fd and changes this thread's network namespace.
            let rc = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(SeedError::EnterNetns {
                    path,
                    source: io::Error::last_os_error(),
                });
            }
            work()
        })
        .map_err(SeedError::Thread)?;
    worker.join().map_err(|_| SeedError::ThreadPanicked)?
}

/// The TCP sockets of the caller's network namespace, or of the namespace
/// of `netns` (a path such as `/proc/PID/ns/net`), with their owners.
///
/// The socket table and the fd tables are read side by side, not as one
/// snapshot: a socket opened or closed meanwhile may lack its owner, which
/// the probes, attached beforehand, make up for.
pub fn seed(netns: Option<&Path>) -> Result<Vec<SeededSocket>, SeedError> {
    // Socket inodes are global, so scanning every process (of any
    // namespace) finds the holders of this namespace's sockets.
    let pids = procfs::all_pids();
    // Both reads wait on the kernel and need nothing from each other.
    let (sockets, held) = thread::scope(|scope| {
        let scan = thread::Builder::new()
            .name("socktrace-seed-scan".into())
            .spawn_scoped(scope, || scan_socket_fds(&pids));
        let sockets = match netns {
            Some(path) => dump_tcp_sockets_in_netns(path),
            None => dump_tcp_sockets(),
        };
        let held = match scan {
            Ok(scan) => scan.join().map_err(|_| SeedError::ThreadPanicked),
            Err(_) => Ok(scan_socket_fds(&pids)),
        };
        (sockets, held)
    });
    let sockets = sockets?;
    let owners = collect_owners(held?, sockets.iter().map(|socket| socket.inode));
    Ok(attach_owners(sockets, owners))
}

/// For each socket inode in `inodes` (0 is skipped), the sorted tgids among
/// `pids` that hold an fd on it. Processes that vanish or cannot be read
/// during the scan are skipped: without root (CAP_SYS_PTRACE), the sockets
/// of other users' processes come back without owners.
pub fn socket_owners(
    pids: &[u32],
    inodes: impl IntoIterator<Item = u64>,
) -> HashMap<u64, Vec<u32>> {
    collect_owners(scan_socket_fds(pids), inodes)
}

fn collect_owners(
    held: Vec<(u32, Vec<u64>)>,
    inodes: impl IntoIterator<Item = u64>,
) -> HashMap<u64, Vec<u32>> {
    let mut owners: HashMap<u64, Vec<u32>> = inodes
        .into_iter()
        .filter(|&inode| inode != 0)
        .map(|inode| (inode, Vec::new()))
        .collect();
    for (pid, inodes) in held {
        for inode in inodes {
            if let Some(holders) = owners.get_mut(&inode) {
                holders.push(pid);
            }
        }
    }
    for holders in owners.values_mut() {
        // One process may hold a socket through several fds.
        holders.sort_unstable();
        holders.dedup();
    }
    owners
}

/// The socket inodes held by each process of `pids`.
///
/// Every fd costs a readlink of a few microseconds in the kernel, which
/// dominates seeding on hosts with many sockets, so the processes are spread
/// over a few threads.
fn scan_socket_fds(pids: &[u32]) -> Vec<(u32, Vec<u64>)> {
    let next = AtomicUsize::new(0);
    let worker = || {
        let mut found = Vec::new();
        while let Some(&pid) = pids.get(next.fetch_add(1, Ordering::Relaxed)) {
            match procfs::socket_inodes(pid) {
                Ok(held) => found.push((pid, held)),
                Err(err) if procfs::is_vanished(&err) => {}
                Err(err) => log::debug!("cannot read the fds of pid {pid}: {err}"),
            }
        }
        found
    };
    let threads = thread::available_parallelism().map_or(1, usize::from);
    thread::scope(|scope| {
        // Helpers that fail to start only leave more work to this thread.
        let helpers: Vec<_> = (1..threads.min(MAX_SCAN_THREADS))
            .filter_map(|_| thread::Builder::new().spawn_scoped(scope, worker).ok())
            .collect();
        let mut found = worker();
        for helper in helpers {
            // socket_inodes does not panic; were it to, that share is lost.
            found.extend(helper.join().unwrap_or_default());
        }
        found
    })
}

fn attach_owners(
    sockets: Vec<DiagSocket>,
    mut owners: HashMap<u64, Vec<u32>>,
) -> Vec<SeededSocket> {
    sockets
        .into_iter()
        .map(|socket| SeededSocket {
            family: socket.family,
            state: socket.state,
            local: socket.local,
            remote: socket.remote,
            inode: socket.inode,
            owners: owners.remove(&socket.inode).unwrap_or_default(),
        })
        .collect()
}

/// Bit N stands for TCP state N (include/net/tcp_states.h): all but
/// TIME_WAIT (6) and NEW_SYN_RECV (12).
const OWNABLE_STATES: u32 = !((1 << 6) | (1 << 12));

fn send_request(
    socket: &Socket,
    family: u8,
    sequence: u32,
    flags: u16,
    socket_id: SocketId,
) -> Result<(), SeedError> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = sequence;
    let request = InetRequest {
        family,
        protocol: IPPROTO_TCP,
        extensions: ExtensionFlags::empty(),
        // Every state bit, including ones newer than this crate's flags
        // (TCP_NEW_SYN_RECV, TCP_BOUND_INACTIVE); the kernel ignores the rest.
        states: StateFlags::from_bits_retain(OWNABLE_STATES),
        socket_id,
    };
    let mut message = NetlinkMessage::new(header, SockDiagMessage::InetRequest(request).into());
    message.finalize();
    let mut bytes = vec![0u8; message.buffer_len()];
    message.serialize(&mut bytes);
    socket.send(&bytes, 0).map_err(SeedError::Send)?;
    Ok(())
}

fn receive_dump(
    socket: &Socket,
    buffer: &mut [u8],
    sockets: &mut Vec<DiagSocket>,
) -> Result<(), SeedError> {
    loop {
        // MSG_TRUNC makes recv return the real datagram length, so a datagram
        // larger than the buffer is detected instead of silently cut.
        let len = match socket.recv(&mut &mut buffer[..], libc::MSG_TRUNC) {
            Ok(len) => len,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(SeedError::Recv(err)),
        };
        if len > buffer.len() {
            return Err(SeedError::Malformed(format!(
                "a {len}-byte datagram exceeds the {}-byte receive buffer",
                buffer.len()
            )));
        }
        if parse_datagram(&buffer[..len], sockets)? == DumpProgress::Done {
            return Ok(());
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum DumpProgress {
    More,
    Done,
}

/// Parses one datagram of a multipart dump reply into `sockets`.
fn parse_datagram(
    mut datagram: &[u8],
    sockets: &mut Vec<DiagSocket>,
) -> Result<DumpProgress, SeedError> {
    while !datagram.is_empty() {
        let message =
            NetlinkBuffer::new_checked(datagram).map_err(|err| malformed("netlink header", err))?;
        let payload = message.payload();
        match message.message_type() {
            SOCK_DIAG_BY_FAMILY => sockets.push(parse_inet_diag_msg(payload)?),
            NLMSG_DONE => {
                // The payload carries the dump's final status: 0, or -errno
                // when the dump failed part-way.
                return match payload.first_chunk::<4>().map(|b| i32::from_ne_bytes(*b)) {
                    Some(status) if status < 0 => Err(SeedError::Kernel(
                        io::Error::from_raw_os_error(status.saturating_neg()),
                    )),
                    _ => Ok(DumpProgress::Done),
                };
            }
            NLMSG_ERROR => {
                let error =
                    ErrorBuffer::new_checked(payload).map_err(|err| malformed("error", err))?;
                // A zero code is an acknowledgement, which a dump never sends,
                // but it is harmless.
                if let Some(code) = error.code() {
                    return Err(SeedError::Kernel(io::Error::from_raw_os_error(
                        code.get().saturating_neg(),
                    )));
                }
            }
            // NLMSG_NOOP and anything else carry no sockets.
            _ => {}
        }
        // Messages start at 4-byte (NLMSG_ALIGNTO) boundaries.
        let next = (message.length() as usize).next_multiple_of(4);
        datagram = datagram.get(next..).unwrap_or_default();
    }
    Ok(DumpProgress::More)
}

/// Decodes the fixed `struct inet_diag_msg` at the start of a reply; the
/// attributes that may follow it are not needed here.
fn parse_inet_diag_msg(payload: &[u8]) -> Result<DiagSocket, SeedError> {
    let header =
        InetResponseHeader::parse(payload).map_err(|err| malformed("inet_diag_msg", err))?;
    let id = header.socket_id;
    // The kernel stores the cookie as two native-endian u32, low half first
    // (sock_diag_save_cookie).
    let low = u32::from_ne_bytes([id.cookie[0], id.cookie[1], id.cookie[2], id.cookie[3]]);
    let high = u32::from_ne_bytes([id.cookie[4], id.cookie[5], id.cookie[6], id.cookie[7]]);
    Ok(DiagSocket {
        family: u16::from(header.family),
        state: header.state,
        // No flow info or scope id: the tracepoints report neither.
        local: SocketAddr::new(id.source_address, id.source_port),
        remote: SocketAddr::new(id.destination_address, id.destination_port),
        inode: u64::from(header.inode),
        uid: header.uid,
        cookie: u64::from(low) | (u64::from(high) << 32),
    })
}

fn malformed(what: &str, err: impl std::fmt::Display) -> SeedError {
    SeedError::Malformed(format!("{what}: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    const TCP_ESTABLISHED: u8 = 1;
    const TCP_TIME_WAIT: u8 = 6;
    const TCP_CLOSE_WAIT: u8 = 8;
    const TCP_LISTEN: u8 = 10;

    fn socket(state: u8, local: &str, remote: &str, inode: u64) -> DiagSocket {
        let local: SocketAddr = local.parse().unwrap();
        DiagSocket {
            family: if local.is_ipv4() { AF_INET } else { AF_INET6 }.into(),
            state,
            local,
            remote: remote.parse().unwrap(),
            inode,
            uid: 1000,
            cookie: 0x1122_3344_5566_7788,
        }
    }

    /// `socket` as the kernel lays out a `struct inet_diag_msg`
    /// (include/uapi/linux/inet_diag.h), written by hand rather than with the
    /// crate that parses it, plus an INET_DIAG_SHUTDOWN attribute.
    fn inet_diag_msg(socket: &DiagSocket) -> Vec<u8> {
        let octets = |address: SocketAddr| match address.ip() {
            IpAddr::V4(ip) => {
                let mut padded = [0u8; 16];
                padded[..4].copy_from_slice(&ip.octets());
                padded
            }
            IpAddr::V6(ip) => ip.octets(),
        };
        let mut bytes = vec![socket.family as u8, socket.state, 0, 0];
        bytes.extend_from_slice(&socket.local.port().to_be_bytes());
        bytes.extend_from_slice(&socket.remote.port().to_be_bytes());
        bytes.extend_from_slice(&octets(socket.local));
        bytes.extend_from_slice(&octets(socket.remote));
        let interface = 0;
        let (cookie_low, cookie_high) = (socket.cookie as u32, (socket.cookie >> 32) as u32);
        let (expires, rqueue, wqueue) = (0, 0, 0);
        let inode = socket.inode as u32;
        for field in [
            interface,
            cookie_low,
            cookie_high,
            expires,
            rqueue,
            wqueue,
            socket.uid,
            inode,
        ] {
            bytes.extend_from_slice(&field.to_ne_bytes());
        }
        assert_eq!(bytes.len(), 72);
        // struct nlattr { len 5, type 8 } and one byte of value, padded to 4.
        bytes.extend_from_slice(&[5, 0, 8, 0, 0, 0, 0, 0]);
        bytes
    }

    /// A `struct nlmsghdr` followed by `payload`, padded to 4 bytes.
    fn netlink_message(message_type: u16, payload: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&(16 + payload.len() as u32).to_ne_bytes());
        bytes.extend_from_slice(&message_type.to_ne_bytes());
        bytes.extend_from_slice(&netlink_packet_core::NLM_F_MULTIPART.to_ne_bytes());
        bytes.extend_from_slice(&1u32.to_ne_bytes()); // sequence
        bytes.extend_from_slice(&0u32.to_ne_bytes()); // port id
        bytes.extend_from_slice(payload);
        bytes.resize(bytes.len().next_multiple_of(4), 0);
        bytes
    }

    #[test]
    fn parses_ipv4_message() {
        let expected = socket(TCP_CLOSE_WAIT, "127.0.0.1:40274", "10.1.2.3:8080", 123_456);
        let payload = inet_diag_msg(&expected);
        // Network byte order on the wire: port 40274 is 0x9d52.
        assert_eq!(payload[4..6], [0x9d, 0x52]);
        assert_eq!(parse_inet_diag_msg(&payload).unwrap(), expected);
    }

    #[test]
    fn parses_ipv6_message() {
        let expected = socket(
            TCP_ESTABLISHED,
            "[2001:db8::1]:443",
            "[2001:db8::2]:50000",
            7,
        );
        assert_eq!(
            parse_inet_diag_msg(&inet_diag_msg(&expected)).unwrap(),
            expected
        );
    }

    #[test]
    fn keeps_ipv4_mapped_addresses_as_ipv6() {
        let expected = socket(
            TCP_ESTABLISHED,
            "[::ffff:127.0.0.1]:1",
            "[::ffff:127.0.0.1]:2",
            9,
        );
        let parsed = parse_inet_diag_msg(&inet_diag_msg(&expected)).unwrap();
        assert_eq!(parsed.family, libc::AF_INET6 as u16);
        assert_eq!(parsed, expected);
    }

    #[test]
    fn rejects_short_message() {
        let payload = inet_diag_msg(&socket(TCP_ESTABLISHED, "1.2.3.4:1", "5.6.7.8:2", 1));
        assert!(matches!(
            parse_inet_diag_msg(&payload[..40]),
            Err(SeedError::Malformed(_))
        ));
    }

    #[test]
    fn parses_multipart_datagram_until_done() {
        let listener = socket(TCP_LISTEN, "0.0.0.0:22", "0.0.0.0:0", 11);
        // TIME_WAIT sockets have no inode and are kept anyway.
        let time_wait = socket(TCP_TIME_WAIT, "127.0.0.1:5000", "127.0.0.1:22", 0);
        let mut datagram = netlink_message(SOCK_DIAG_BY_FAMILY, &inet_diag_msg(&listener));
        datagram.extend(netlink_message(
            SOCK_DIAG_BY_FAMILY,
            &inet_diag_msg(&time_wait),
        ));

        let mut sockets = Vec::new();
        let progress = parse_datagram(&datagram, &mut sockets).unwrap();
        assert_eq!(progress, DumpProgress::More);
        assert_eq!(sockets, [listener.clone(), time_wait.clone()]);

        let done = netlink_message(NLMSG_DONE, &0i32.to_ne_bytes());
        assert_eq!(
            parse_datagram(&done, &mut sockets).unwrap(),
            DumpProgress::Done
        );
        assert_eq!(sockets, [listener, time_wait]);
    }

    #[test]
    fn reports_kernel_errors() {
        let mut error = (-libc::EPERM).to_ne_bytes().to_vec();
        error.extend_from_slice(&[0; 16]); // the offending request's header
        let datagram = netlink_message(NLMSG_ERROR, &error);
        match parse_datagram(&datagram, &mut Vec::new()) {
            Err(SeedError::Kernel(err)) => assert_eq!(err.raw_os_error(), Some(libc::EPERM)),
            other => panic!("expected a kernel error, got {other:?}"),
        }

        let failed_done = netlink_message(NLMSG_DONE, &(-libc::ENOBUFS).to_ne_bytes());
        match parse_datagram(&failed_done, &mut Vec::new()) {
            Err(SeedError::Kernel(err)) => assert_eq!(err.raw_os_error(), Some(libc::ENOBUFS)),
            other => panic!("expected a kernel error, got {other:?}"),
        }
    }

    #[test]
    fn rejects_truncated_datagram() {
        let payload = inet_diag_msg(&socket(TCP_ESTABLISHED, "1.2.3.4:1", "5.6.7.8:2", 1));
        let datagram = netlink_message(SOCK_DIAG_BY_FAMILY, &payload);
        assert!(matches!(
            parse_datagram(&datagram[..datagram.len() - 8], &mut Vec::new()),
            Err(SeedError::Malformed(_))
        ));
    }

    #[test]
    fn owners_are_collected_and_attached_by_inode() {
        let held = vec![(20, vec![5, 5, 99]), (10, vec![5]), (30, vec![6])];
        let owners = collect_owners(held, [5, 0, 6, 7]);
        assert_eq!(owners.get(&5), Some(&vec![10, 20]));
        assert_eq!(owners.get(&6), Some(&vec![30]));
        assert_eq!(owners.get(&7), Some(&vec![]));
        // Only the inodes asked for, and never 0.
        assert!(!owners.contains_key(&99) && !owners.contains_key(&0));

        let sockets =
            [5, 0, 7].map(|inode| socket(TCP_ESTABLISHED, "127.0.0.1:1", "127.0.0.1:2", inode));
        let seeded = attach_owners(sockets.to_vec(), owners);
        let seeded_owners: Vec<_> = seeded.iter().map(|s| s.owners.clone()).collect();
        assert_eq!(seeded_owners, [vec![10, 20], vec![], vec![]]);
    }

    #[test]
    fn own_socket_owner_is_found_without_root() {
        use std::os::unix::fs::MetadataExt;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = listener.as_raw_fd();
        let inode = std::fs::metadata(format!("/proc/self/fd/{fd}"))
            .unwrap()
            .ino();
        let pid = std::process::id();
        let owners = socket_owners(&[pid], [inode]);
        assert_eq!(owners.get(&inode), Some(&vec![pid]));
    }

    #[test]
    fn missing_netns_is_a_clear_error() {
        let err = dump_tcp_sockets_in_netns(Path::new("/nonexistent/ns/net")).unwrap_err();
        assert!(matches!(err, SeedError::OpenNetns { .. }), "{err:?}");
    }
}

/// Root tests: they drive real sockets held by a python workload and read
/// them back through sock_diag and /proc.
#[cfg(test)]
mod root_tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::net::IpAddr;
    use std::process::{Child, Command, Stdio};

    const TCP_FIN_WAIT1: u8 = 4;
    const TCP_FIN_WAIT2: u8 = 5;
    const TCP_CLOSE_WAIT: u8 = 8;
    const TCP_LISTEN: u8 = 10;

    const WORKLOAD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/workloads/close_wait.py");

    /// Returns false (after saying so) when the test cannot run unprivileged.
    fn have_root() -> bool {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            return true;
        }
        if std::env::var("SOCKTRACE_REQUIRE_ROOT_TESTS").as_deref() == Ok("1") {
            panic!("root tests required (SOCKTRACE_REQUIRE_ROOT_TESTS=1) but not running as root");
        }
        println!("SKIPPED: not root");
        false
    }

    /// Kills and reaps the workload however the test ends.
    struct ChildGuard(Child);

    impl Drop for ChildGuard {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    struct Workload {
        guard: ChildGuard,
        /// The python process, which owns every socket of the workload.
        pid: u32,
        server: SocketAddr,
        client: SocketAddr,
    }

    /// Starts `command` (which ends up exec'ing the workload) and waits for
    /// its report: `<pid> <server port> <client port>` once the client
    /// socket is in CLOSE_WAIT.
    fn start(mut command: Command, loopback: IpAddr) -> Workload {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn workload");
        let stdout = child.stdout.take().unwrap();
        let mut guard = ChildGuard(child);
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let fields: Vec<u32> = line
            .split_whitespace()
            .map(|f| f.parse().unwrap())
            .collect();
        assert_eq!(
            fields.len(),
            3,
            "workload said {line:?}, exit {:?}",
            guard.0.try_wait()
        );
        Workload {
            pid: fields[0],
            server: SocketAddr::new(loopback, fields[1] as u16),
            client: SocketAddr::new(loopback, fields[2] as u16),
            guard,
        }
    }

    fn python(family: &str) -> Command {
        let mut command = Command::new("python3");
        command.arg(WORKLOAD).arg(family);
        command
    }

    fn find(
        sockets: &[SeededSocket],
        local: SocketAddr,
        remote: SocketAddr,
    ) -> Option<&SeededSocket> {
        sockets
            .iter()
            .find(|s| s.local == local && s.remote == remote)
    }

    /// The workload's three sockets, as any correct seed must report them.
    fn check_workload(sockets: &[SeededSocket], workload: &Workload, family: i32) {
        let family = family as u16;
        let client = find(sockets, workload.client, workload.server).expect("client socket seeded");
        assert_eq!(client.family, family);
        assert_eq!(client.state, TCP_CLOSE_WAIT);
        assert_ne!(client.inode, 0);
        assert_eq!(client.owners, vec![workload.pid]);

        let unspecified = SocketAddr::new(
            if family == libc::AF_INET as u16 {
                IpAddr::from([0u8; 4])
            } else {
                IpAddr::from([0u8; 16])
            },
            0,
        );
        let listener = find(sockets, workload.server, unspecified).expect("listener seeded");
        assert_eq!(listener.state, TCP_LISTEN);
        assert_eq!(listener.owners, vec![workload.pid]);

        // The server closed its end: an orphan that no fd refers to.
        let server = find(sockets, workload.server, workload.client).expect("server side seeded");
        assert!(
            [TCP_FIN_WAIT1, TCP_FIN_WAIT2].contains(&server.state),
            "{server:?}"
        );
        assert_eq!(server.inode, 0);
        assert!(server.owners.is_empty());
    }

    #[test]
    fn seeds_ipv4_close_wait() {
        if !have_root() {
            return;
        }
        let workload = start(python("4"), IpAddr::from([127, 0, 0, 1]));
        assert_eq!(workload.pid, workload.guard.0.id());
        let sockets = seed(None).unwrap();
        check_workload(&sockets, &workload, libc::AF_INET);
    }

    #[test]
    fn seeds_ipv6_close_wait() {
        if !have_root() {
            return;
        }
        let workload = start(python("6"), IpAddr::from(std::net::Ipv6Addr::LOCALHOST));
        let sockets = seed(None).unwrap();
        check_workload(&sockets, &workload, libc::AF_INET6);
    }

    #[test]
    fn seeds_another_network_namespace() {
        if !have_root() {
            return;
        }
        // unshare and sh exec into python, so the child's pid is python's.
        let mut command = Command::new("unshare");
        command.args([
            "--net",
            "sh",
            "-c",
            "ip link set lo up && exec python3 \"$0\" 4",
            WORKLOAD,
        ]);
        let workload = start(command, IpAddr::from([127, 0, 0, 1]));
        assert_eq!(workload.pid, workload.guard.0.id());

        let netns = PathBuf::from(format!("/proc/{}/ns/net", workload.pid));
        let own_before = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
        let inside = seed(Some(&netns)).unwrap();
        check_workload(&inside, &workload, libc::AF_INET);
        // The caller's namespace is untouched.
        assert_eq!(
            std::fs::read_link("/proc/thread-self/ns/net").unwrap(),
            own_before
        );

        let client = find(&inside, workload.client, workload.server).unwrap();
        let host = dump_tcp_sockets().unwrap();
        assert!(
            !host.iter().any(|s| s.inode == client.inode),
            "the namespaced socket leaked into the host dump"
        );
    }
}
