//! The sweep: an iterator over the TCP sockets of socktrace's own network
//! namespace (`iter/tcp`: the kernel's socket tables, orphans included),
//! run by the collector when sockets have held transitions for longer than
//! the hold (`HOLDING`).
//! It reports the transitions a socket has held since `SWEEP[DUE_BEFORE]`
//! or earlier (the state programs report the rest at the socket's next
//! transition or end), and owners the collector was not told of yet
//! (accept() and the owner probes write them outside a transition).
//!
//! Sockets in other network namespaces are out of its reach: the state
//! programs report their transitions at once (`Config::sweep_netns`). The
//! iterators that would reach every socket are refused or too weak on some
//! kernels: over map elements (`iter/bpf_map_elem`,
//! `iter/bpf_sk_storage_map`) EPERM on Linux 6.18 here, and a file's socket
//! (`iter/task_file`) is not a pointer the storage helper trusts.
//!
//! A state program may change the entry while the sweep reads it (the
//! sweep does not hold the socket's lock). So the sweep writes only its own
//! fields: it leaves the steps held, notes how far it reported them, and
//! the collector drops the steps it has seen when the state program reports
//! them again.

use core::ffi::c_void;

use aya_ebpf::helpers::generated::bpf_sk_storage_get;
use tracer_common::{EventKind, SocketEntry, StateChangesEvent};

use crate::{
    EVENTS, SK_STORE, SWEEP_DUE, config, header_at, holding, ktime_ns, netns_wanted, owner_wanted,
    sock::{self, Reader},
    store::{HashStore, SocketStore, adopt_owner, seeded_owner},
    wakeup_flag,
};

/// `struct bpf_iter__tcp` (net/ipv4/tcp_ipv4.c): meta, then the socket
/// (a `struct sock_common *`: full sockets, request and time-wait ones).
const CTX_SOCKET: usize = 8;

/// Called once per TCP socket of the namespace, and once more with none at
/// the end (nothing to do then: the pass writes no output).
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub extern "C" fn sweep_sockets(ctx: *mut c_void) -> i32 {
    let ctx = ctx.cast::<u8>();
    // SAFETY: the iterator's context, laid out as above: the verifier
    // allows this load at exactly this offset and size, and gives the
    // socket the kernel's (trusted) type, which the storage helper checks.
    let sk = unsafe { *(ctx.add(CTX_SOCKET) as *const *mut c_void) };
    if sk.is_null() {
        return 0;
    }
    let entry = if config().sk_storage != 0 {
        let store = core::ptr::from_ref(&SK_STORE).cast_mut().cast();
        // SAFETY: `sk` is the iterator's typed socket; without F_CREATE the
        // helper returns its storage, or null (a socket we do not track,
        // or a request or time-wait socket, which have none).
        let entry = unsafe { bpf_sk_storage_get(store, sk, core::ptr::null_mut(), 0) };
        // SAFETY: non-null storage is a SocketEntry, valid for this run.
        unsafe { entry.cast::<SocketEntry>().as_mut() }
    } else {
        HashStore::get(sk)
    };
    if let Some(entry) = entry {
        sweep_entry(sk as u64, entry, config().sk_storage != 0);
    }
    0
}

/// Reports what the socket holds, if it is due.
#[inline(always)]
fn sweep_entry(sock_id: u64, entry: &mut SocketEntry, storage: bool) {
    let Some(&due_before) = SWEEP_DUE.get(0) else {
        return;
    };
    let count = usize::from(entry.held.count).min(entry.held.steps.len());
    let last_step_ns = match count {
        0 => 0,
        n => entry.held.steps[n - 1].at_ns,
    };
    let unswept = last_step_ns > entry.swept_through_ns;
    let mut owner = entry.owner;
    // With socket storage, accept() leaves the owner in SEEDED; the
    // socket's next transition takes it, the collector hears it now.
    if storage
        && owner.tgid == 0
        && let Some(seeded) = seeded_owner(sock_id)
    {
        adopt_owner(&mut owner, &seeded);
    }
    let owner_news =
        entry.held.reported != 0 && owner.tgid != 0 && owner.tgid != entry.reported_tgid;
    let steps_due = unswept && entry.held.steps[0].at_ns <= due_before;
    if !owner_news && !steps_due {
        return;
    }
    let config = config();
    let Ok(endpoints) = sock::endpoints(&config.layout, sock_id as *const u8, Reader::Sweep) else {
        return;
    };
    let wanted = (config.filter_family == 0 || endpoints.family == config.filter_family)
        && (config.filter_port == 0
            || endpoints.local_port == config.filter_port
            || endpoints.remote_port == config.filter_port)
        && owner_wanted(config, &owner)
        && netns_wanted(owner.netns);
    if wanted {
        // Left for the next pass when the ring is full: still counted.
        let Some(mut slot) = EVENTS.reserve::<StateChangesEvent>(0) else {
            return;
        };
        let event = slot.as_mut_ptr();
        // SAFETY: `event` points into the reserved slot, ours until
        // submitted.
        unsafe {
            (*event).header = header_at(EventKind::StateChanges, sock_id, ktime_ns());
            (*event).owner = owner;
            (*event).endpoints = endpoints;
            (*event).held = entry.held;
            (*event).held.count = count as u8;
        }
        slot.submit(wakeup_flag());
        entry.held.reported = 1;
    }
    entry.swept_through_ns = last_step_ns;
    entry.reported_tgid = owner.tgid;
    // Reported (or unwanted): no longer the sweep's work. The state
    // program clears the steps at the socket's next transition.
    if entry.counted != 0 && count != 0 {
        holding(entry.held.steps[0].at_ns, -1);
        entry.counted = 0;
    }
}
