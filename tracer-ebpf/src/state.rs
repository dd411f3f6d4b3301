//! Every TCP state change (`sock:inet_sock_set_state`), and the release of
//! a socket that reached CLOSE while a file still held it
//! (`tcp:tcp_destroy_sock`).

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_current_task, bpf_probe_read_kernel_buf},
    macros::tracepoint,
    programs::TracePointContext,
};
use tracer_common::{
    AF_INET, AF_INET6, DWELL_UNKNOWN, Endpoints, EventKind, INFER_WINDOW_NS, IPPROTO_TCP, Layout,
    OwnerSource, ReleaseEvent, SET_STATE_RECORD_BYTES, SocketOwner, StateChangeEvent,
    inferable_successor, owner_claim, state_flags, tcp_state,
};

use crate::{
    CONFIG, SET_STATE_RECORD, SOCKETS, bump, current_comm, current_tgid, emit, header_at, ktime_ns,
    netns_wanted, owner_wanted, read_kernel, read_ptr, set_owner_to_current, socket_netns,
};

/// task->flags bit of a task that is exiting (include/linux/sched.h): its
/// files are being closed by the kernel.
const PF_EXITING: u32 = 0x4;

/// The `sock:inet_sock_set_state` record, copied with one probe read instead
/// of one per field: those nine helper calls were a quarter of the program's
/// time, and it runs ten times per connection.
struct SetStateRecord(&'static [u8; SET_STATE_RECORD_BYTES]);

impl SetStateRecord {
    #[inline(always)]
    fn read(ctx: &TracePointContext) -> Result<Self, i64> {
        let slot = SET_STATE_RECORD.get_ptr_mut(0).ok_or(-1i64)?;
        // SAFETY: the slot is this CPU's, valid for the whole program run and
        // used by nothing else meanwhile; bpf_probe_read_kernel faults
        // safely, and the record starts a per-CPU buffer far longer than
        // SET_STATE_RECORD_BYTES.
        unsafe {
            bpf_probe_read_kernel_buf(ctx.as_ptr().cast::<u8>(), &mut *slot).map_err(i64::from)?;
            Ok(Self(&*slot))
        }
    }

    #[inline(always)]
    fn field<T: Copy>(&self, offset: u16) -> Result<T, i64> {
        let offset = usize::from(offset);
        // Also the bound the verifier needs for the variable offset; the
        // collector checked the layout against it before load.
        if offset > SET_STATE_RECORD_BYTES - size_of::<T>() {
            return Err(-1);
        }
        // SAFETY: in bounds (checked above); any bit pattern is a valid T
        // here (integers and byte arrays).
        Ok(unsafe { core::ptr::read_unaligned(self.0.as_ptr().add(offset).cast::<T>()) })
    }
}

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let _ = try_inet_sock_set_state(&ctx);
    0
}

fn try_inet_sock_set_state(ctx: &TracePointContext) -> Result<(), i64> {
    let config = CONFIG.load();
    let layout = &config.layout;
    let record = SetStateRecord::read(ctx)?;
    if record.field::<u16>(layout.set_state_protocol)? != IPPROTO_TCP {
        return Ok(());
    }
    let family = record.field::<u16>(layout.set_state_family)?;
    if config.filter_family != 0 && family != config.filter_family {
        return Ok(());
    }
    let sock_id = record.field::<u64>(layout.set_state_skaddr)?;
    let old_state = record.field::<i32>(layout.set_state_oldstate)? as u8;
    let new_state = record.field::<i32>(layout.set_state_newstate)? as u8;
    let now = ktime_ns();

    let change = record_transition(layout, sock_id, old_state, new_state, now);
    // The collector infers it. A known dwell means the map holds the socket,
    // so the new state can be read back from there; a short one means the
    // collector has not read it yet (it waits out the window, then reads
    // once), and a socket stuck in SYN_SENT costs it one read, not one a
    // tick. DWELL_UNKNOWN is never short.
    if config.skip_inferable != 0
        && change.dwell_ns < INFER_WINDOW_NS
        && inferable_successor(old_state) == Some(new_state)
    {
        return Ok(());
    }
    if !owner_wanted(&config, &change.owner) || !netns_wanted(change.owner.netns) {
        return Ok(());
    }

    let mut endpoints = Endpoints {
        family,
        local_port: record.field::<u16>(layout.set_state_sport)?,
        remote_port: record.field::<u16>(layout.set_state_dport)?,
        ..Endpoints::default()
    };
    if config.filter_port != 0
        && endpoints.local_port != config.filter_port
        && endpoints.remote_port != config.filter_port
    {
        return Ok(());
    }
    if family == AF_INET {
        let saddr = record.field::<[u8; 4]>(layout.set_state_saddr)?;
        let daddr = record.field::<[u8; 4]>(layout.set_state_daddr)?;
        endpoints.local_addr[..4].copy_from_slice(&saddr);
        endpoints.remote_addr[..4].copy_from_slice(&daddr);
    } else if family == AF_INET6 {
        endpoints.local_addr = record.field::<[u8; 16]>(layout.set_state_saddr_v6)?;
        endpoints.remote_addr = record.field::<[u8; 16]>(layout.set_state_daddr_v6)?;
    }

    emit(StateChangeEvent {
        header: header_at(EventKind::StateChange, sock_id, now),
        owner: change.owner,
        endpoints,
        old_state,
        new_state,
        flags: change.flags,
        _pad: 0,
        error: change.error,
        dwell_ns: change.dwell_ns,
    });
    Ok(())
}

/// What the socket map says about one transition.
struct Change {
    /// The socket's owner, the transition applied.
    owner: SocketOwner,
    /// Time spent in the old state ([`DWELL_UNKNOWN`] if not seen entering it).
    dwell_ns: u64,
    /// [`state_flags`] bits.
    flags: u8,
    /// sk_err, at a transition to CLOSE.
    error: u32,
}

/// Whether a file still holds the socket: `sk->sk_socket->file` in use.
/// When the owner's own close() resets a connection (unread data, linger
/// 0) or stops a listener, the socket reaches CLOSE inside the file's
/// release, with `sk_socket` still set but no reference left on the file;
/// a socket orphaned by close() has no `sk_socket` at all.
#[inline(always)]
fn held_by_a_file(layout: &Layout, sk: *const u8) -> bool {
    // SAFETY: read_kernel tolerates any address.
    unsafe {
        let Ok(socket) = read_ptr(sk, layout.sock_socket) else {
            return false;
        };
        let Ok(file) = read_ptr(socket, layout.socket_file) else {
            return false;
        };
        let Ok(refs) = read_kernel::<i64>(file, layout.file_refs) else {
            return false;
        };
        if layout.file_refs_less_one != 0 {
            refs >= 0
        } else {
            refs > 0
        }
    }
}

/// Why the kernel closed the socket (positive errno), read at CLOSE: every
/// path that ends a connection on an error sets `sk_err` before it moves
/// the socket to CLOSE (tcp_reset, tcp_write_err, tcp_v4_err).
#[inline(always)]
fn close_error(layout: &Layout, sk: *const u8) -> u32 {
    // SAFETY: read_kernel tolerates any address.
    unsafe { read_kernel::<i32>(sk, layout.sock_err) }.map_or(0, |err| err.unsigned_abs())
}

/// Applies a transition to the socket map.
#[inline(always)]
fn record_transition(
    layout: &Layout,
    sock_id: u64,
    old_state: u8,
    new_state: u8,
    now: u64,
) -> Change {
    let sk = sock_id as *const u8;
    let claim = owner_claim(new_state);
    let closing = new_state == tcp_state::CLOSE;
    let (held, error) = if closing {
        (held_by_a_file(layout, sk), close_error(layout, sk))
    } else {
        (false, 0)
    };
    let new_flag = if held {
        state_flags::NEW_CLOSED_HELD
    } else {
        0
    };
    // LISTEN -> SYN_RECV is the birth of a child socket cloned from a
    // listener (inet_csk_clone_lock): whatever the map holds for this address
    // belongs to a dead socket.
    let newborn = old_state == tcp_state::LISTEN && new_state == tcp_state::SYN_RECV;
    if !newborn && let Some(known) = SOCKETS.get_ptr_mut(sock_id) {
        // SAFETY: the pointer comes from a successful lookup in a hash map
        // and stays valid for this program run (RCU).
        let known = unsafe { &mut *known };
        let dwell_ns = if known.state_since_ns != 0 && known.state == old_state {
            now.saturating_sub(known.state_since_ns)
        } else {
            DWELL_UNKNOWN
        };
        let old_flag = if known.closed_held != 0 && known.state == tcp_state::CLOSE {
            state_flags::OLD_CLOSED_HELD
        } else {
            0
        };
        if claim != OwnerSource::Unknown {
            if current_tgid() != known.tgid {
                set_owner_to_current(known, claim);
            }
            known.source = claim as u8;
        }
        known.state = new_state;
        known.state_since_ns = now;
        known.closed_held = u8::from(held);
        // Entries the collector wrote (owners found in /proc) lack it.
        if known.netns == 0 {
            known.netns = socket_netns(layout, sk);
        }
        let owner = *known;
        // A socket that closed with no file left is done with: the entry
        // has served. One still held stays until its release
        // (tcp_destroy_sock), or until it connects again and claims its
        // owner anew.
        if closing && !held {
            let _ = SOCKETS.remove(sock_id);
        }
        return Change {
            owner,
            dwell_ns,
            flags: new_flag | old_flag,
            error,
        };
    }

    let mut owner = SocketOwner {
        state: new_state,
        state_since_ns: now,
        closed_held: u8::from(held),
        // A socket never changes namespace: read once, kept in the map.
        netns: socket_netns(layout, sk),
        ..SocketOwner::default()
    };
    if claim != OwnerSource::Unknown {
        set_owner_to_current(&mut owner, claim);
    }
    // A socket first seen closing with no file left has nothing to track.
    if (!closing || held) && SOCKETS.insert(sock_id, owner, 0).is_err() {
        bump(tracer_common::counter::SOCKET_MAP_FULL);
    }
    Change {
        owner,
        dwell_ns: DWELL_UNKNOWN,
        flags: new_flag,
        error,
    }
}

#[tracepoint(category = "tcp", name = "tcp_destroy_sock")]
pub fn tcp_destroy_sock(ctx: TracePointContext) -> u32 {
    let _ = try_tcp_destroy_sock(&ctx);
    0
}

/// The socket is freed: forget it, and if a file held it after CLOSE, say
/// who let go. For a socket closed while held, the kernel destroys it in the
/// release of its last file, in that task's context (close(), or the fds
/// closed at exit).
fn try_tcp_destroy_sock(ctx: &TracePointContext) -> Result<(), i64> {
    let config = CONFIG.load();
    // SAFETY: bpf_probe_read of the tracepoint record.
    let sock_id = unsafe { ctx.read_at::<u64>(usize::from(config.layout.destroy_skaddr)) }
        .map_err(i64::from)?;
    // Most sockets left the map at CLOSE: one failed lookup.
    let Some(known) = SOCKETS.get_ptr_mut(sock_id) else {
        return Ok(());
    };
    // SAFETY: see record_transition.
    let owner = unsafe { *known };
    let _ = SOCKETS.remove(sock_id);
    // Any other entry is one whose CLOSE event was never seen.
    if owner.closed_held == 0 || owner.state != tcp_state::CLOSE {
        return Ok(());
    }
    if !owner_wanted(&config, &owner) || !netns_wanted(owner.netns) {
        return Ok(());
    }
    let now = ktime_ns();
    emit(ReleaseEvent {
        header: header_at(EventKind::Release, sock_id, now),
        owner,
        releaser_comm: current_comm(),
        held_ns: if owner.state_since_ns == 0 {
            DWELL_UNKNOWN
        } else {
            now.saturating_sub(owner.state_since_ns)
        },
        exiting: u8::from(current_task_exiting(&config.layout)),
        _pad: [0; 7],
    });
    Ok(())
}

#[inline(always)]
fn current_task_exiting(layout: &Layout) -> bool {
    // SAFETY: a helper call with no arguments; read_kernel tolerates any
    // address.
    unsafe {
        let task = bpf_get_current_task() as *const u8;
        read_kernel::<u32>(task, layout.task_flags)
    }
    .is_ok_and(|flags| flags & PF_EXITING != 0)
}
