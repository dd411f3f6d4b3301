//! Stage 2: ring buffer records -> typed events.
//!
//! Records are checked for length before they are read and their kind is
//! decoded with `TryFrom`; nothing is transmuted blindly.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use thiserror::Error;
use tracer_common::{
    AF_INET, AF_INET6, DWELL_UNKNOWN, Endpoints, EventHeader, EventKind, ExitEvent, MAX_HELD_STEPS,
    OwnerSource, ReleaseEvent, SocketFileRecord, SocketOwner, StateChangesEvent,
};

use crate::{
    model::{Comm, ExistingSocket, Owner, Step, Steps},
    tcp::{CloseCause, TcpState},
};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {len} bytes is too short for a {what} ({need} bytes)")]
    TooShort {
        what: &'static str,
        len: usize,
        need: usize,
    },
    #[error("unknown event kind {0}")]
    UnknownKind(u32),
    #[error("unknown owner source {0}")]
    UnknownOwnerSource(u8),
    #[error("unknown address family {0}")]
    UnknownFamily(u16),
    #[error("{0} transitions in one record (at most {MAX_HELD_STEPS})")]
    TooManySteps(u8),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A socket's transitions since its last record (none: news of its
    /// owner only), and its owner after them.
    StateChanges {
        /// When the kernel sent the record.
        ktime_ns: u64,
        sock_id: u64,
        owner: Option<Owner>,
        local: SocketAddr,
        remote: SocketAddr,
        /// The state before the first step.
        from: TcpState,
        /// When the socket entered `from`; `None` when not seen.
        from_since_ns: Option<u64>,
        steps: Steps,
        /// Why the kernel closed the socket, for a step to CLOSE.
        cause: Option<CloseCause>,
        /// Inode of the socket's network namespace (0: unknown).
        netns: u32,
    },
    Exit {
        ktime_ns: u64,
        tgid: u32,
    },
    /// The last holder of a socket in [`TcpState::ClosedHeld`] let it go.
    Release {
        ktime_ns: u64,
        sock_id: u64,
        /// The releasing process; its source is `Close`, or `Exit` when its
        /// exit closed the fd.
        releaser: Option<Owner>,
        local: SocketAddr,
        remote: SocketAddr,
        /// Time held after the network closed it; `None` when it was
        /// already closed when socktrace started.
        held_ns: Option<u64>,
    },
}

/// Copies a `#[repr(C)]` wire struct out of a record after checking its length.
fn read<T: aya::Pod>(bytes: &[u8], what: &'static str) -> Result<T, DecodeError> {
    let need = size_of::<T>();
    if bytes.len() < need {
        return Err(DecodeError::TooShort {
            what,
            len: bytes.len(),
            need,
        });
    }
    // SAFETY: the length was checked above, read_unaligned tolerates any
    // alignment, and every bit pattern is a valid T (aya::Pod).
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    let header: EventHeader = read(bytes, "event header")?;
    let kind = EventKind::try_from(header.kind).map_err(DecodeError::UnknownKind)?;
    Ok(match kind {
        EventKind::StateChanges => {
            let e: StateChangesEvent = read(bytes, "state changes")?;
            let (local, remote) = socket_addrs(&e.endpoints)?;
            let held = &e.held;
            let count = usize::from(held.count);
            if count > MAX_HELD_STEPS {
                return Err(DecodeError::TooManySteps(held.count));
            }
            Event::StateChanges {
                ktime_ns: header.ktime_ns,
                sock_id: header.sock_id,
                owner: owner(&e.owner)?,
                local,
                remote,
                from: TcpState::from_kernel(held.from_state, held.from_closed_held != 0),
                from_since_ns: (held.from_since_ns != 0).then_some(held.from_since_ns),
                steps: held.steps[..count]
                    .iter()
                    .map(|step| Step {
                        at_ns: step.at_ns,
                        state: TcpState::from_kernel(step.state, step.closed_held != 0),
                    })
                    .collect(),
                cause: CloseCause::from_errno(held.error),
                netns: e.owner.netns,
            }
        }
        EventKind::Exit => {
            let _: ExitEvent = read(bytes, "exit event")?;
            Event::Exit {
                ktime_ns: header.ktime_ns,
                tgid: header.current_tgid,
            }
        }
        EventKind::Release => {
            let e: ReleaseEvent = read(bytes, "release event")?;
            let recorded = owner(&e.owner)?;
            let (local, remote) = socket_addrs(&e.endpoints)?;
            Event::Release {
                ktime_ns: header.ktime_ns,
                sock_id: header.sock_id,
                releaser: (header.current_tgid != 0).then(|| Owner {
                    pid: Some(header.current_tgid),
                    // The pid inside the container is known for the
                    // recorded owner only.
                    nspid: recorded
                        .filter(|r| r.pid == Some(header.current_tgid))
                        .and_then(|r| r.nspid),
                    source: if e.exiting != 0 {
                        OwnerSource::Exit
                    } else {
                        OwnerSource::Close
                    },
                    comm: Comm::from_kernel(&e.releaser_comm),
                }),
                local,
                remote,
                held_ns: known(e.held_ns),
            }
        }
    })
}

fn known(ns: u64) -> Option<u64> {
    (ns != DWELL_UNKNOWN).then_some(ns)
}

/// Decodes the socket-file iterator's output: fixed-size records, one after
/// the other (the kernel never splits one across reads).
pub fn decode_socket_files(bytes: &[u8]) -> Result<Vec<ExistingSocket>, DecodeError> {
    let size = size_of::<SocketFileRecord>();
    if !bytes.len().is_multiple_of(size) {
        return Err(DecodeError::TooShort {
            what: "socket file record",
            len: bytes.len() % size,
            need: size,
        });
    }
    bytes
        .chunks_exact(size)
        .map(|chunk| {
            let r: SocketFileRecord = read(chunk, "socket file record")?;
            let (local, remote) = socket_addrs(&r.endpoints)?;
            Ok(ExistingSocket {
                sock_id: r.sock_id,
                owner: Owner::holder(r.tgid, Comm::from_kernel(&r.comm)),
                local,
                remote,
                state: TcpState::from_kernel(r.state, true),
                cause: CloseCause::from_errno(r.error)
                    .filter(|_| r.state == tracer_common::tcp_state::CLOSE),
                netns: r.netns,
            })
        })
        .collect()
}

/// The owner the kernel recorded; `None` when it has not seen one.
fn owner(raw: &SocketOwner) -> Result<Option<Owner>, DecodeError> {
    if raw.tgid == 0 {
        return Ok(None);
    }
    Ok(Some(Owner {
        pid: Some(raw.tgid),
        nspid: (raw.ns_tgid != 0).then_some(raw.ns_tgid),
        source: OwnerSource::try_from(raw.source).map_err(DecodeError::UnknownOwnerSource)?,
        comm: Comm::from_kernel(&raw.comm),
    }))
}

fn socket_addrs(e: &Endpoints) -> Result<(SocketAddr, SocketAddr), DecodeError> {
    let ip = |raw: &[u8; 16]| -> Result<IpAddr, DecodeError> {
        match e.family {
            AF_INET => Ok(IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))),
            AF_INET6 => Ok(IpAddr::V6(Ipv6Addr::from(*raw))),
            other => Err(DecodeError::UnknownFamily(other)),
        }
    };
    Ok((
        SocketAddr::new(ip(&e.local_addr)?, e.local_port),
        SocketAddr::new(ip(&e.remote_addr)?, e.remote_port),
    ))
}

#[cfg(test)]
mod tests {
    use tracer_common::tcp_state;

    use super::*;

    fn as_bytes<T: aya::Pod>(value: &T) -> Vec<u8> {
        // SAFETY: a Pod struct is plain bytes with explicit padding.
        unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }
            .to_vec()
    }

    fn comm(name: &str) -> [u8; 16] {
        let mut out = [0; 16];
        out[..name.len()].copy_from_slice(name.as_bytes());
        out
    }

    /// A record of `steps` (ktime, state, closed while held) from `from`.
    fn changes(from: u8, steps: &[(u64, u8, bool)]) -> StateChangesEvent {
        let mut raw = StateChangesEvent::default();
        raw.header.kind = EventKind::StateChanges as u32;
        raw.endpoints.family = AF_INET;
        raw.held.from_state = from;
        raw.held.count = steps.len() as u8;
        for (slot, &(at_ns, state, held)) in raw.held.steps.iter_mut().zip(steps) {
            slot.at_ns = at_ns;
            slot.state = state;
            slot.closed_held = u8::from(held);
        }
        raw
    }

    #[test]
    fn state_changes_round_trip() {
        let mut local_addr = [0; 16];
        local_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        let mut raw = changes(
            tcp_state::SYN_SENT,
            &[
                (3_000, tcp_state::ESTABLISHED, false),
                (5_000, tcp_state::CLOSE_WAIT, false),
            ],
        );
        raw.header = EventHeader {
            kind: EventKind::StateChanges as u32,
            current_tgid: 77,
            ktime_ns: 6_000,
            sock_id: 0xffff_8880_1234_5678,
        };
        raw.owner = SocketOwner {
            tgid: 4242,
            source: OwnerSource::Connect as u8,
            state: tcp_state::CLOSE_WAIT,
            in_pidns: 1,
            ns_tgid: 1,
            closed_held: 0,
            netns: 4026531840,
            state_since_ns: 5_000,
            comm: comm("ruler"),
        };
        raw.endpoints = Endpoints {
            family: AF_INET,
            local_port: 40274,
            remote_port: 18080,
            _pad: 0,
            local_addr,
            remote_addr: local_addr,
        };
        raw.held.from_since_ns = 1_000;
        let event = decode(&as_bytes(&raw)).unwrap();
        assert_eq!(
            event,
            Event::StateChanges {
                ktime_ns: 6_000,
                sock_id: 0xffff_8880_1234_5678,
                owner: Some(Owner {
                    pid: Some(4242),
                    nspid: Some(1),
                    source: OwnerSource::Connect,
                    comm: "ruler".into()
                }),
                local: "127.0.0.1:40274".parse().unwrap(),
                remote: "127.0.0.1:18080".parse().unwrap(),
                from: TcpState::SynSent,
                from_since_ns: Some(1_000),
                steps: [
                    Step {
                        at_ns: 3_000,
                        state: TcpState::Established
                    },
                    Step {
                        at_ns: 5_000,
                        state: TcpState::CloseWait
                    },
                ]
                .into_iter()
                .collect(),
                cause: None,
                netns: 4026531840,
            }
        );
    }

    #[test]
    fn ipv6_owner_news_and_unknown_entry_time() {
        let mut raw = changes(tcp_state::ESTABLISHED, &[]);
        raw.endpoints.family = AF_INET6;
        raw.endpoints.local_addr = Ipv6Addr::LOCALHOST.octets();
        raw.endpoints.remote_addr = Ipv6Addr::LOCALHOST.octets();
        let Event::StateChanges {
            local,
            from_since_ns,
            steps,
            ..
        } = decode(&as_bytes(&raw)).unwrap()
        else {
            panic!("not state changes");
        };
        assert_eq!(local, "[::1]:0".parse().unwrap());
        assert_eq!(from_since_ns, None);
        assert!(steps.is_empty(), "news of the owner only");
    }

    #[test]
    fn rejects_short_unknown_and_overfull_records() {
        let bytes = as_bytes(&changes(tcp_state::CLOSE, &[]));
        assert!(matches!(
            decode(&bytes[..40]),
            Err(DecodeError::TooShort { need: 216, .. })
        ));
        assert!(matches!(
            decode(&bytes[..8]),
            Err(DecodeError::TooShort { need: 24, .. })
        ));
        let unknown = EventHeader {
            kind: 99,
            ..EventHeader::default()
        };
        assert_eq!(
            decode(&as_bytes(&unknown)),
            Err(DecodeError::UnknownKind(99))
        );
        let mut overfull = changes(tcp_state::CLOSE, &[]);
        overfull.held.count = 7;
        assert_eq!(
            decode(&as_bytes(&overfull)),
            Err(DecodeError::TooManySteps(7))
        );
    }

    #[test]
    fn comm_is_inline_and_always_text() {
        assert_eq!(Comm::from_kernel(&comm("ruler")).as_str(), "ruler");
        let mut raw = comm("ab");
        raw[2] = 0xff;
        raw[3] = b'c';
        assert_eq!(
            Comm::from_kernel(&raw).as_str(),
            "ab",
            "cut at invalid UTF-8"
        );
        assert_eq!(
            Comm::from("a-very-long-command-name").as_str(),
            "a-very-long-com"
        );
        assert_eq!(Comm::from("héllo").to_string(), "héllo");
        let mut stale = comm("sh");
        stale[5] = b'z';
        assert_eq!(
            Comm::from_kernel(&stale),
            Comm::from("sh"),
            "bytes after the NUL do not count"
        );
        assert!(Comm::from("").is_empty() && !Comm::from("sh").is_empty());
    }

    #[test]
    fn close_while_held_and_its_release() {
        let mut raw = changes(tcp_state::CLOSE_WAIT, &[(9, tcp_state::CLOSE, true)]);
        raw.held.error = libc::EPIPE as u32;
        let Event::StateChanges {
            from, steps, cause, ..
        } = decode(&as_bytes(&raw)).unwrap()
        else {
            panic!("not state changes");
        };
        assert_eq!(
            (from, steps[0].state),
            (TcpState::CloseWait, TcpState::ClosedHeld)
        );
        assert_eq!(cause, Some(CloseCause::Reset));
        // Connecting again from a held CLOSE.
        let mut raw = changes(tcp_state::CLOSE, &[(9, tcp_state::SYN_SENT, false)]);
        raw.held.from_closed_held = 1;
        let Event::StateChanges { from, cause, .. } = decode(&as_bytes(&raw)).unwrap() else {
            panic!("not state changes");
        };
        assert_eq!((from, cause), (TcpState::ClosedHeld, None));

        let release = ReleaseEvent {
            header: EventHeader {
                kind: EventKind::Release as u32,
                current_tgid: 11,
                ktime_ns: 9,
                sock_id: 0xffff_0001,
            },
            owner: SocketOwner {
                tgid: 10,
                ns_tgid: 3,
                ..SocketOwner::default()
            },
            endpoints: Endpoints {
                family: AF_INET,
                local_port: 40274,
                ..Endpoints::default()
            },
            releaser_comm: comm("child"),
            held_ns: 2_000,
            exiting: 1,
            _pad: [0; 7],
        };
        assert_eq!(
            decode(&as_bytes(&release)).unwrap(),
            Event::Release {
                ktime_ns: 9,
                sock_id: 0xffff_0001,
                releaser: Some(Owner {
                    pid: Some(11),
                    nspid: None,
                    source: OwnerSource::Exit,
                    comm: "child".into(),
                }),
                local: "0.0.0.0:40274".parse().unwrap(),
                remote: "0.0.0.0:0".parse().unwrap(),
                held_ns: Some(2_000),
            }
        );
    }

    #[test]
    fn socket_file_records() {
        let mut record = SocketFileRecord {
            sock_id: 0xffff_0002,
            tgid: 42,
            netns: 7,
            error: libc::ECONNRESET as u32,
            state: tcp_state::CLOSE,
            comm: comm("leaky"),
            ..SocketFileRecord::default()
        };
        record.endpoints.family = AF_INET6;
        record.endpoints.remote_port = 17000;
        let mut bytes = as_bytes(&record);
        record.state = tcp_state::ESTABLISHED;
        bytes.extend(as_bytes(&record));
        let files = decode_socket_files(&bytes).unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(files[0].state, TcpState::ClosedHeld);
        assert_eq!(files[0].cause, Some(CloseCause::Reset));
        assert_eq!(files[0].remote, "[::]:17000".parse().unwrap());
        assert_eq!(files[0].owner, Owner::holder(42, "leaky".into()));
        assert_eq!(
            (files[1].state, files[1].cause),
            (TcpState::Established, None)
        );
        assert!(decode_socket_files(&bytes[..100]).is_err());
        assert_eq!(decode_socket_files(&[]).unwrap(), Vec::new());
    }
}
