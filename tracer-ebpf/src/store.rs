//! Where each socket's [`SocketOwner`] lives: in the `SOCKETS` hash map,
//! keyed by the socket's address (classic tracepoints, any kernel), or on
//! the socket itself in socket-local storage (BTF tracepoints, Linux 5.11+),
//! which costs a third of a hash lookup, needs no size chosen in advance,
//! and is freed with the socket.
//!
//! Programs that see a socket only as an address (the socket-file iterator,
//! the accept() tracepoint, kprobes) cannot reach socket storage: the helper
//! wants the kernel's typed pointer. They leave what they learned in
//! `SEEDED`, a hash map the storage store takes it from at the socket's next
//! event: a whole entry for a socket found at start, or only the owner
//! (`state` 0) for a socket whose storage has no owner yet.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::BPF_SK_STORAGE_GET_F_CREATE,
    helpers::generated::{bpf_sk_storage_delete, bpf_sk_storage_get},
};
use tracer_common::SocketOwner;

use crate::{SEEDED, SK_STORE, SOCKETS, bump};

/// One way to keep per-socket state. `sk` is the kernel's `struct sock *`.
pub trait SocketStore {
    /// The socket's entry, if it has one.
    fn get(sk: *const c_void) -> Option<&'static mut SocketOwner>;
    /// Gives the socket an entry; counts a failure (map full).
    fn create(sk: *const c_void, owner: &SocketOwner) -> Option<&'static mut SocketOwner>;
    /// Forgets the socket (it closed with no file left).
    fn remove(sk: *const c_void);
}

/// The `SOCKETS` hash map.
pub struct HashStore;

impl SocketStore for HashStore {
    #[inline(always)]
    fn get(sk: *const c_void) -> Option<&'static mut SocketOwner> {
        // SAFETY: the pointer comes from a successful lookup in a hash map
        // and stays valid for this program run (RCU).
        SOCKETS
            .get_ptr_mut(sk as u64)
            .map(|entry| unsafe { &mut *entry })
    }

    #[inline(always)]
    fn create(sk: *const c_void, owner: &SocketOwner) -> Option<&'static mut SocketOwner> {
        if SOCKETS.insert(sk as u64, owner, 0).is_err() {
            bump(tracer_common::counter::SOCKET_MAP_FULL);
            return None;
        }
        Self::get(sk)
    }

    #[inline(always)]
    fn remove(sk: *const c_void) {
        let _ = SOCKETS.remove(sk as u64);
    }
}

/// Socket-local storage (`SK_STORE`), with the sockets found at start
/// taken over from `SEEDED`. Only for programs whose `sk` is the kernel's
/// typed pointer (BTF tracepoints): the helpers check it.
pub struct SkStore;

#[inline(always)]
fn sk_store() -> *mut c_void {
    core::ptr::from_ref(&SK_STORE).cast_mut().cast()
}

impl SkStore {
    /// The socket's storage as it is, owner or not, with nothing taken
    /// from `SEEDED`.
    #[inline(always)]
    pub fn peek(sk: *const c_void) -> Option<&'static SocketOwner> {
        // SAFETY: as in `get`.
        let entry =
            unsafe { bpf_sk_storage_get(sk_store(), sk.cast_mut(), core::ptr::null_mut(), 0) };
        // SAFETY: as in `get`.
        unsafe { entry.cast::<SocketOwner>().as_ref() }
    }
}

impl SocketStore for SkStore {
    #[inline(always)]
    fn get(sk: *const c_void) -> Option<&'static mut SocketOwner> {
        // SAFETY: `sk` is the program's typed `struct sock *`; the helper
        // returns the socket's storage or null.
        let entry =
            unsafe { bpf_sk_storage_get(sk_store(), sk.cast_mut(), core::ptr::null_mut(), 0) };
        // SAFETY: non-null storage is a SocketOwner, valid for this run.
        let entry = unsafe { entry.cast::<SocketOwner>().as_mut() };
        match entry {
            // The owner is known: the common case, one helper call.
            Some(entry) if entry.tgid != 0 => Some(entry),
            // Storage without an owner (a passive open before accept()):
            // accept() may have left the owner since.
            Some(entry) => {
                if let Some(claimed) = take_seeded(sk) {
                    adopt_owner(entry, &claimed);
                }
                Some(entry)
            }
            // Its first event since start: what the iterator found, if any.
            None => {
                let seeded = take_seeded(sk).filter(|seeded| seeded.state != 0)?;
                Self::create(sk, &seeded)
            }
        }
    }

    #[inline(always)]
    fn create(sk: *const c_void, owner: &SocketOwner) -> Option<&'static mut SocketOwner> {
        // SAFETY: as in `get`; with F_CREATE the helper copies `owner` into
        // new storage (or fails under memory pressure: null). It only reads
        // `owner`.
        let entry = unsafe {
            bpf_sk_storage_get(
                sk_store(),
                sk.cast_mut(),
                core::ptr::from_ref(owner).cast_mut().cast(),
                u64::from(BPF_SK_STORAGE_GET_F_CREATE),
            )
        };
        // SAFETY: as in `get`.
        let entry = unsafe { entry.cast::<SocketOwner>().as_mut() };
        if entry.is_none() {
            bump(tracer_common::counter::SOCKET_MAP_FULL);
        }
        entry
    }

    #[inline(always)]
    fn remove(sk: *const c_void) {
        // SAFETY: as in `get`.
        unsafe { bpf_sk_storage_delete(sk_store(), sk.cast_mut()) };
    }
}

/// What `SEEDED` holds for the socket, removed from there.
#[inline(always)]
fn take_seeded(sk: *const c_void) -> Option<SocketOwner> {
    // SAFETY: the map value is a plain struct, copied out at once.
    let seeded = unsafe { SEEDED.get(sk as u64) }.copied()?;
    let _ = SEEDED.remove(sk as u64);
    Some(seeded)
}

/// Takes the owner's identity from `claimed`, keeping the socket's state.
#[inline(always)]
fn adopt_owner(entry: &mut SocketOwner, claimed: &SocketOwner) {
    entry.tgid = claimed.tgid;
    entry.ns_tgid = claimed.ns_tgid;
    entry.source = claimed.source;
    entry.in_pidns = claimed.in_pidns;
    entry.comm = claimed.comm;
}

/// Leaves the owner for the store to take at the socket's next event: for
/// programs that see the socket only as an address.
#[inline(always)]
pub fn leave_owner(sock_id: u64, owner: &SocketOwner) {
    let claimed = SocketOwner {
        // Only the owner: the state stays what the socket's storage says.
        state: 0,
        ..*owner
    };
    if SEEDED.insert(sock_id, claimed, 0).is_err() {
        bump(tracer_common::counter::SOCKET_MAP_FULL);
    }
}

/// Drops what `SEEDED` has for a socket that is being freed.
#[inline(always)]
pub fn forget_seeded(sock_id: u64) {
    let _ = SEEDED.remove(sock_id);
}
