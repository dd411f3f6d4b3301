//! Owners learned outside a state change: accept() returning a socket, and,
//! where the kernel allows, tcp_connect and tcp_close, which always run in
//! the owner's context (including closes of sockets already reset by the
//! peer, which no state transition reveals).

use core::ffi::c_void;

use aya_ebpf::{
    helpers::bpf_get_current_task,
    macros::{fentry, kprobe, tracepoint},
    programs::{FEntryContext, ProbeContext, TracePointContext},
};
use aya_log_ebpf::warn;
use tracer_common::{
    EventKind, IPPROTO_TCP, Layout, OwnerSource, SocketOwner, StateChangesEvent, counter,
};

use crate::{
    EVENTS, bump, claim_owner, config, header, owner_wanted, read_kernel, read_ptr,
    set_owner_to_current,
    sock::{self, Reader},
    state,
    store::{HashStore, SocketStore, TieredStore, leave_owner},
    wakeup_flag,
};

/// Records `current` as the owner of a socket already tracked: the
/// socket's next report carries it, and the collector is told at once if
/// `at_once` (see `announce`). `sk` must be the typed pointer when `S` is
/// [`TieredStore`]. False if the store has no entry for the socket.
#[inline(always)]
fn claim_socket<S: SocketStore>(sk: *const c_void, source: OwnerSource, at_once: bool) -> bool {
    let Some(known) = S::get_or_seeded(sk) else {
        return false;
    };
    if claim_owner(&mut known.owner, source) {
        announce(sk as u64, &known.owner, at_once);
    }
    true
}

/// Tells the collector a socket's new owner at once: always when each
/// transition is reported as it happens (`trace`: the transitions of a
/// passive open wait for it there), otherwise if `at_once` (accept()). A
/// connect() or close() claim rides with the transition it comes with.
/// The user's filters apply as to every report.
#[inline(always)]
fn announce(sock_id: u64, owner: &SocketOwner, at_once: bool) {
    let config = config();
    if !(config.hold_ns == 0 || at_once) || !owner_wanted(config, owner) {
        return;
    }
    let Ok(endpoints) = sock::endpoints(&config.layout, sock_id as *const u8, Reader::Accept)
    else {
        return;
    };
    if !state::wanted(&endpoints, owner) {
        return;
    }
    let Some(mut slot) = EVENTS.reserve::<StateChangesEvent>(0) else {
        bump(counter::LOST_EVENTS);
        return;
    };
    let event = slot.as_mut_ptr();
    // SAFETY: `event` points into the reserved slot, ours until submitted;
    // a record with no step is news of the owner alone. Only the head of
    // its steps is written: none past `count` is read, and a whole
    // `HeldSteps` would be zeroed by a memset call.
    unsafe {
        (*event).header = header(EventKind::StateChanges, sock_id);
        (*event).owner = *owner;
        (*event).endpoints = endpoints;
        let held = &raw mut (*event).held;
        (*held).count = 0;
        (*held).from_state = 0;
        (*held).from_closed_held = 0;
        (*held).reported = 0;
        (*held).error = 0;
        (*held).from_since_ns = 0;
    }
    slot.submit(wakeup_flag::<StateChangesEvent>());
}

/// A claim from a program that sees the socket as an address only, made if
/// the socket's entry is in the hash map. (With BTF tracepoints, one in
/// socket storage is claimed by its own state changes, `owner_claim`: all
/// but a close that resets the connection, whose owner the collector
/// keeps.)
#[inline(always)]
fn claim_by_address(sock_id: u64, source: OwnerSource) {
    let _ = claim_socket::<HashStore>(sock_id as *const c_void, source, false);
}

/// accept() returned `sock_id`: its owner is told at once. The handshake
/// went out with ESTABLISHED, before accept() and with no owner, and the
/// socket's next transition may be hours away (a quiet connection, or a
/// CLOSE_WAIT its server never closes); without the news the collector
/// would search the file tables for every server socket. An entry in the
/// hash map is claimed in place; for one in socket storage (BTF
/// tracepoints), the owner is left for the socket's next report to take
/// (this program cannot reach the storage).
#[inline(always)]
fn claim_accepted(layout: &Layout, sock_id: u64) {
    if claim_socket::<HashStore>(sock_id as *const c_void, OwnerSource::Accept, true)
        || config().sk_storage == 0
    {
        return;
    }
    // accept() returns any kind of socket: only TCP ones are tracked (an
    // entry left for another would stay until that socket is freed).
    // SAFETY: read_kernel tolerates any address.
    let protocol = unsafe { read_kernel::<u16>(sock_id as *const u8, layout.sock_protocol) };
    if protocol != Ok(IPPROTO_TCP) {
        return;
    }
    let mut owner = SocketOwner::default();
    set_owner_to_current(&mut owner, OwnerSource::Accept);
    leave_owner(sock_id, &owner);
    announce(sock_id, &owner, true);
}

#[tracepoint(category = "syscalls", name = "sys_exit_accept4")]
pub fn accept4_exit(ctx: TracePointContext) -> u32 {
    on_accept_exit(&ctx);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_accept")]
pub fn accept_exit(ctx: TracePointContext) -> u32 {
    on_accept_exit(&ctx);
    0
}

/// accept() returned a new fd in the caller's context: find the socket behind
/// it and record the caller as its owner.
#[inline(always)]
fn on_accept_exit(ctx: &TracePointContext) {
    let layout = &config().layout;
    // SAFETY: bpf_probe_read of the tracepoint record.
    let Ok(fd) = (unsafe { ctx.read_at::<i64>(usize::from(layout.accept_ret)) }) else {
        return;
    };
    if fd < 0 {
        return;
    }
    match socket_of_fd(layout, fd as u64) {
        Ok(sock_id) => claim_accepted(layout, sock_id),
        Err(_) => warn!(ctx, "accept: could not read the socket behind fd {}", fd),
    }
}

/// current->files->fdt->fd[fd]->private_data->sk, with offsets from BTF.
#[inline(always)]
fn socket_of_fd(layout: &Layout, fd: u64) -> Result<u64, i64> {
    // SAFETY: every step is a bpf_probe_read_kernel of a kernel pointer; a
    // stale or bad pointer makes the helper fail, it cannot fault.
    unsafe {
        let task = bpf_get_current_task() as *const u8;
        let files = read_ptr(task, layout.task_files)?;
        let fdt = read_ptr(files, layout.files_fdt)?;
        let max_fds: u32 = read_kernel(fdt, layout.fdtable_max_fds)?;
        if fd >= u64::from(max_fds) {
            return Err(-1);
        }
        let fd_array = read_ptr(fdt, layout.fdtable_fd)?;
        let file = read_ptr(fd_array, (fd * 8) as u32)?;
        let socket = read_ptr(file, layout.file_private_data)?;
        let sk = read_ptr(socket, layout.socket_sk)?;
        Ok(sk as u64)
    }
}

#[fentry(function = "tcp_connect")]
pub fn tcp_connect_fentry(ctx: FEntryContext) -> u32 {
    claim_typed(ctx.arg(0), OwnerSource::Connect);
    0
}

#[fentry(function = "tcp_close")]
pub fn tcp_close_fentry(ctx: FEntryContext) -> u32 {
    claim_typed(ctx.arg(0), OwnerSource::Close);
    0
}

/// fentry's `sk` is the kernel's typed pointer: socket storage takes it.
#[inline(always)]
fn claim_typed(sk: *const c_void, source: OwnerSource) {
    let _ = if config().sk_storage == 0 {
        claim_socket::<HashStore>(sk, source, false)
    } else {
        claim_socket::<TieredStore>(sk, source, false)
    };
}

#[kprobe]
pub fn tcp_connect_kprobe(ctx: ProbeContext) -> u32 {
    if let Some(sk) = ctx.arg::<u64>(0) {
        claim_by_address(sk, OwnerSource::Connect);
    }
    0
}

#[kprobe]
pub fn tcp_close_kprobe(ctx: ProbeContext) -> u32 {
    if let Some(sk) = ctx.arg::<u64>(0) {
        claim_by_address(sk, OwnerSource::Close);
    }
    0
}
