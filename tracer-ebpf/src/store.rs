//! Where each socket's [`SocketEntry`] lives. Classic tracepoints keep it
//! in the `SOCKETS` hash map, keyed by the socket's address, sized by
//! `--max-sockets` ([`HashStore`]). BTF tracepoints (Linux 5.11+) keep it
//! there too while the map has room, and on the socket itself, in
//! socket-local storage, beyond ([`TieredStore`]): nothing is untracked at
//! any count. Socket storage is the cheaper lookup, but dearer to create
//! and free (an allocation with a memory-cgroup charge, and an RCU free),
//! which a storm of short connections pays twice per connection; the hash
//! map's elements come from a per-CPU cache.
//!
//! Programs that see a socket only as an address (the socket-file iterator,
//! the accept() tracepoint, kprobes) cannot reach socket storage: the helper
//! wants the kernel's typed pointer. With BTF tracepoints they write what
//! they learned into the socket's entry in the hash map if it has one, and
//! otherwise leave it in `SEEDED`, a hash map the store takes it from at
//! the socket's next event: a whole entry for a socket found at start, or
//! only the owner (`state` 0) for a socket whose entry has no owner yet.

use core::ffi::c_void;

use aya_ebpf::{bindings::BPF_SK_STORAGE_GET_F_CREATE, helpers::generated::bpf_sk_storage_get};
use tracer_common::{SocketEntry, SocketOwner, counter};

use crate::{SEEDED, SK_STORE, SOCKETS, bump, config, copy_words, sock};

/// What a new entry in the hash map starts from (the helper copies a value
/// from memory: this one is in the program's read-only data, not on its
/// tight stack).
// SAFETY: SocketEntry is made of integers and byte arrays: all zeroes is a
// valid value.
static ZEROED: SocketEntry = unsafe { core::mem::zeroed() };

/// One way to keep per-socket state. `sk` is the kernel's `struct sock *`.
pub trait SocketStore {
    /// The socket's entry, if it has one.
    fn get(sk: *const c_void) -> Option<&'static mut SocketEntry>;
    /// The entry of a socket that may predate socktrace: one the socket-file
    /// iterator found at start is taken over on its first event.
    fn get_or_seeded(sk: *const c_void) -> Option<&'static mut SocketEntry> {
        Self::get(sk)
    }
    /// The owner that a program without the socket's typed pointer left
    /// for it (accept()), taken.
    fn claimed_owner(_sk: *const c_void) -> Option<SocketOwner> {
        None
    }
    /// Gives the socket a zeroed entry; counts a failure (map full).
    fn create(sk: *const c_void) -> Option<&'static mut SocketEntry>;
    /// The socket closed with no file left: its entry has served.
    fn done(sk: *const c_void);
}

/// The `SOCKETS` hash map.
pub struct HashStore;

impl SocketStore for HashStore {
    #[inline(always)]
    fn get(sk: *const c_void) -> Option<&'static mut SocketEntry> {
        // SAFETY: the pointer comes from a successful lookup in a hash map
        // and stays valid for this program run (RCU).
        SOCKETS
            .get_ptr_mut(sk as u64)
            .map(|entry| unsafe { &mut *entry })
    }

    #[inline(always)]
    fn create(sk: *const c_void) -> Option<&'static mut SocketEntry> {
        let created = Self::insert(sk);
        if created.is_none() {
            bump(counter::SOCKET_MAP_FULL);
        }
        created
    }

    #[inline(always)]
    fn done(sk: *const c_void) {
        let _ = SOCKETS.remove(sk as u64);
    }
}

impl HashStore {
    /// Gives the socket a zeroed entry, or None if the map is full.
    #[inline(always)]
    fn insert(sk: *const c_void) -> Option<&'static mut SocketEntry> {
        // By reference: a copy by value would take 168 bytes of stack.
        #[allow(clippy::needless_borrows_for_generic_args)]
        SOCKETS.insert(sk as u64, &ZEROED, 0).ok()?;
        Self::get(sk)
    }
}

/// The `SOCKETS` hash map while it has room, socket-local storage
/// (`SK_STORE`) beyond, with the sockets found at start taken over from
/// `SEEDED`. Only for programs whose `sk` is the kernel's typed pointer
/// (BTF tracepoints): the storage helpers check it. An entry stays until
/// the socket is freed (`tcp_destroy_sock`), so that the `_nested` programs
/// can tell from it whether the first program saw an event.
pub struct TieredStore;

#[inline(always)]
fn sk_store() -> *mut c_void {
    core::ptr::from_ref(&SK_STORE).cast_mut().cast()
}

/// The socket's storage, if it has any.
#[inline(always)]
fn storage_of(sk: *const c_void) -> Option<&'static mut SocketEntry> {
    // SAFETY: `sk` is the program's typed `struct sock *`; the helper
    // returns the socket's storage or null.
    let entry = unsafe { bpf_sk_storage_get(sk_store(), sk.cast_mut(), core::ptr::null_mut(), 0) };
    // SAFETY: non-null storage is a SocketEntry, valid for this run.
    unsafe { entry.cast::<SocketEntry>().as_mut() }
}

impl TieredStore {
    /// The socket's entry as it is, owner or not, with nothing taken from
    /// `SEEDED`.
    #[inline(always)]
    pub fn peek(sk: *const c_void) -> Option<&'static SocketEntry> {
        Self::get(sk).map(|entry| &*entry)
    }

    /// Forgets the socket, which is being freed (its storage goes with it).
    #[inline(always)]
    pub fn forget(sk: *const c_void) {
        HashStore::done(sk);
    }
}

impl SocketStore for TieredStore {
    #[inline(always)]
    fn get(sk: *const c_void) -> Option<&'static mut SocketEntry> {
        HashStore::get(sk).or_else(|| storage_of(sk))
    }

    #[inline(always)]
    fn get_or_seeded(sk: *const c_void) -> Option<&'static mut SocketEntry> {
        if let Some(entry) = Self::get(sk) {
            return Some(entry);
        }
        // Its first event since start: what the iterator found, if any.
        let seeded = take_seeded(sk).filter(|seeded| seeded.state != 0)?;
        let entry = Self::create(sk)?;
        entry.owner = seeded;
        entry.held.from_state = seeded.state;
        entry.held.from_closed_held = seeded.closed_held;
        Some(entry)
    }

    /// accept() left it under the socket's address, so it is this socket's
    /// only if a file holds the socket (accept() made one). Otherwise it
    /// was left for an earlier socket at that address whose release was
    /// not seen (accept() runs for every socket on the host), and the
    /// socket, still in the accept queue, has no owner yet.
    #[inline(always)]
    fn claimed_owner(sk: *const c_void) -> Option<SocketOwner> {
        let claimed = take_seeded(sk)?;
        sock::held_by_a_file(&config().layout, sk.cast()).then_some(claimed)
    }

    #[inline(always)]
    fn create(sk: *const c_void) -> Option<&'static mut SocketEntry> {
        if let Some(entry) = HashStore::insert(sk) {
            return Some(entry);
        }
        // SAFETY: as in `storage_of`; with F_CREATE and no value the helper
        // gives the socket zeroed storage (or fails under memory pressure:
        // null).
        let created = unsafe {
            bpf_sk_storage_get(
                sk_store(),
                sk.cast_mut(),
                core::ptr::null_mut(),
                u64::from(BPF_SK_STORAGE_GET_F_CREATE),
            )
        };
        // SAFETY: as in `storage_of`.
        let created = unsafe { created.cast::<SocketEntry>().as_mut() };
        if created.is_none() {
            bump(counter::SOCKET_MAP_FULL);
        }
        created
    }

    /// Kept until the socket is freed ([`TieredStore::forget`]); storage is
    /// left on the socket, which frees it: a program's delete would wait
    /// for an RCU tasks-trace grace period per socket.
    #[inline(always)]
    fn done(_sk: *const c_void) {}
}

/// Zeroes an entry in place, as `create` gives it.
#[inline(always)]
pub fn start_afresh(entry: &mut SocketEntry) {
    // SAFETY: both are whole, 8-aligned `SocketEntry`s.
    unsafe { copy_words(entry, &ZEROED) };
}

/// What `SEEDED` holds for the socket, removed from there.
#[inline(always)]
fn take_seeded(sk: *const c_void) -> Option<SocketOwner> {
    let seeded = seeded_owner(sk as u64)?;
    let _ = SEEDED.remove(sk as u64);
    Some(seeded)
}

/// What `SEEDED` holds for the socket, left there.
#[inline(always)]
pub fn seeded_owner(sock_id: u64) -> Option<SocketOwner> {
    // SAFETY: the map value is a plain struct, copied out at once.
    unsafe { SEEDED.get(sock_id) }.copied()
}

/// Takes the owner's identity from `claimed`, keeping the socket's state.
#[inline(always)]
pub fn adopt_owner(owner: &mut SocketOwner, claimed: &SocketOwner) {
    owner.tgid = claimed.tgid;
    owner.ns_tgid = claimed.ns_tgid;
    owner.source = claimed.source;
    owner.in_pidns = claimed.in_pidns;
    owner.comm = claimed.comm;
}

/// Leaves the owner for the store to take at the socket's next report: for
/// programs that see the socket only as an address. A full map loses only
/// the kernel's copy: the caller tells the collector, which keeps it.
#[inline(always)]
pub fn leave_owner(sock_id: u64, owner: &SocketOwner) {
    let claimed = SocketOwner {
        // Only the owner: the state stays what the socket's entry says.
        state: 0,
        ..*owner
    };
    let _ = SEEDED.insert(sock_id, claimed, 0);
}

/// Drops what `SEEDED` has for a socket that is being freed.
#[inline(always)]
pub fn forget_seeded(sock_id: u64) {
    // Looked up first: it is seldom there, and a delete takes the bucket's
    // lock even for a key that is not.
    if seeded_owner(sock_id).is_some() {
        let _ = SEEDED.remove(sock_id);
    }
}
