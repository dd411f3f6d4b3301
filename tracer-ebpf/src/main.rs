//! Kernel programs of socktrace.
//!
//! The spine is `sock:inet_sock_set_state`: every TCP state change. Its
//! context is the task on the CPU, which for packet-driven transitions is
//! whatever process softirq interrupted, often the *peer*. So the owner of a
//! socket is learned only in process context (connect, listen, close,
//! accept) and kept with the socket's state; every record carries that
//! owner, never the current task of a softirq transition.
//!
//! A socket lives until its last file is released, which may be long after
//! TCP reached CLOSE (a reset or timeout while the owner keeps the fd). The
//! map keeps such a socket until `tcp:tcp_destroy_sock`, which the kernel
//! runs in the releasing task's own `close()` or exit.
//!
//! - `state`: state changes and the release of sockets closed while held;
//! - `owners`: accept() and, where the kernel allows, tcp_connect/tcp_close;
//! - `processes`: process exits;
//! - `socket_files`: the iterator over every process's socket files;
//! - `floor`: empty programs for the benchmark's floor.
#![no_std]
#![no_main]

mod floor;
mod owners;
mod processes;
mod sock;
mod socket_files;
mod state;
mod store;

use aya_ebpf::{
    bindings::{
        BPF_F_NO_PREALLOC, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP,
        BPF_RINGBUF_HDR_SZ, bpf_pidns_info,
    },
    btf_maps::SkStorage,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_ns_current_pid_tgid,
        bpf_ktime_get_ns, bpf_probe_read_kernel,
    },
    macros::{btf_map, map},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
};
use tracer_common::{
    Config, DEFAULT_MAX_SOCKETS, DEFAULT_RING_BYTES, EventHeader, EventKind, Layout,
    MAX_PID_FILTER, NamespaceFilter, OwnerSource, SET_STATE_RECORD_BYTES, SOCK_COMMON_BYTES,
    SocketEntry, SocketOwner, TASK_COMM_LEN, counter,
};

/// Overwritten by the collector before load (`EbpfLoader::override_global`);
/// read through [`config`].
#[unsafe(no_mangle)]
static CONFIG: Config = Config {
    layout: Layout {
        set_state_skaddr: 0,
        set_state_oldstate: 0,
        set_state_newstate: 0,
        set_state_sport: 0,
        set_state_dport: 0,
        set_state_family: 0,
        set_state_protocol: 0,
        set_state_saddr: 0,
        set_state_daddr: 0,
        set_state_saddr_v6: 0,
        set_state_daddr_v6: 0,
        accept_ret: 0,
        destroy_skaddr: 0,
        file_refs_less_one: 0,
        retransmit_skaddr: 0,
        _pad: 0,
        task_files: 0,
        files_fdt: 0,
        fdtable_max_fds: 0,
        fdtable_fd: 0,
        file_private_data: 0,
        socket_sk: 0,
        sock_common_net: 0,
        net_ns_inum: 0,
        sock_socket: 0,
        sock_err: 0,
        socket_file: 0,
        file_refs: 0,
        file_inode: 0,
        inode_mode: 0,
        sock_family: 0,
        sock_state: 0,
        sock_protocol: 0,
        sock_type: 0,
        sock_dport: 0,
        sock_daddr: 0,
        sock_rcv_saddr: 0,
        sock_v6_daddr: 0,
        sock_v6_rcv_saddr: 0,
        inet_sport: 0,
        task_tgid: 0,
        task_comm: 0,
        task_flags: 0,
    },
    self_tgid: 0,
    filter_pids: 0,
    filter_port: 0,
    filter_family: 0,
    wakeup_bytes: 0,
    sk_storage: 0,
    hold_ns: 0,
};

/// Sized at load time by the collector (`--ring-buffer-kib`).
#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Not preallocated: most hosts hold far fewer sockets than the capacity,
/// and a preallocated map pins all of it in kernel memory (29 MB at the
/// default), though its inserts and deletes cost less.
#[map(name = "SOCKETS")]
static SOCKETS: HashMap<u64, SocketEntry> =
    HashMap::with_max_entries(DEFAULT_MAX_SOCKETS, BPF_F_NO_PREALLOC);

/// The same state on the socket itself, for the BTF tracepoint programs.
#[btf_map(name = "SK_STORE")]
static SK_STORE: SkStorage<SocketEntry> = SkStorage::new();

/// Sockets found at start (and owners found in userspace) when the state
/// lives in `SK_STORE`, until their first event moves them there.
#[map(name = "SEEDED")]
static SEEDED: HashMap<u64, SocketOwner> =
    HashMap::with_max_entries(DEFAULT_MAX_SOCKETS, BPF_F_NO_PREALLOC);

#[map(name = "PID_FILTER")]
static PID_FILTER: HashMap<u32, u8> = HashMap::with_max_entries(MAX_PID_FILTER, 0);

#[map(name = "NS_FILTER")]
static NS_FILTER: Array<NamespaceFilter> = Array::with_max_entries(1, 0);

/// Room for the copy of the `inet_sock_set_state` record (see
/// `state::SetStateRecord`): the program's 512-byte stack is taken by the
/// event.
#[map(name = "SET_STATE_RECORD")]
static SET_STATE_RECORD: PerCpuArray<[u8; SET_STATE_RECORD_BYTES]> =
    PerCpuArray::with_max_entries(1, 0);

/// Room for the copy of a socket's `sock_common` (see `sock::endpoints`):
/// one per `sock::Reader`, the programs that interrupt one another.
#[map(name = "SOCK_COMMON")]
static SOCK_COMMON: PerCpuArray<[u8; SOCK_COMMON_BYTES]> = PerCpuArray::with_max_entries(6, 0);

/// Per CPU, each BPF tracepoint program with a `_nested` partner (by
/// `state::Partner`): its runs under way, as the kernel skips a program
/// only while a run of it is under way on that CPU, and the event its last
/// run finished (see `state::inet_sock_set_state_btf_nested`).
#[map(name = "RUNNING")]
static RUNNING: PerCpuArray<state::PartnerRuns> = PerCpuArray::with_max_entries(2, 0);

#[inline(always)]
fn ns_filter() -> Option<NamespaceFilter> {
    NS_FILTER.get(0).copied().filter(|f| f.enabled != 0)
}

/// Whether the current task is in the filtered PID namespace (always, when
/// there is no filter), and its tgid there (0 without a filter).
#[inline(always)]
fn current_in_pidns() -> (u8, u32) {
    let Some(filter) = ns_filter() else {
        return (1, 0);
    };
    let mut info = bpf_pidns_info { pid: 0, tgid: 0 };
    // SAFETY: the helper writes at most size_of::<bpf_pidns_info>() bytes
    // into `info`; it fails (non-zero) when current is in another namespace.
    let rc = unsafe {
        bpf_get_ns_current_pid_tgid(
            filter.pidns_dev,
            filter.pidns_ino,
            &mut info,
            size_of::<bpf_pidns_info>() as u32,
        )
    };
    if rc == 0 { (1, info.tgid) } else { (0, 0) }
}

/// Names the current task as a socket's owner, as far as `source` may;
/// whether the owner changed. connect(), listen() and accept() run in the
/// owner's own call. A close runs in whichever task lets go of the file
/// last: mostly the owner, but also a task that held the file for a moment
/// while the owner closed it (a file-table scan: socktrace's own iterator,
/// another socktrace, `ss -p`, lsof), whose deferred fput then runs the
/// close. So a close names an owner only where none is known, and never
/// socktrace itself; a socket handed to another process is followed by the
/// collector when its owner exits.
#[inline(always)]
fn claim_owner(owner: &mut SocketOwner, source: OwnerSource) -> bool {
    if source == OwnerSource::Close {
        if owner.tgid != 0 || current_tgid() == config().self_tgid {
            return false;
        }
    } else if owner.tgid == current_tgid() {
        owner.source = source as u8;
        return false;
    }
    set_owner_to_current(owner, source);
    true
}

/// Records the current task as the owner.
#[inline(always)]
fn set_owner_to_current(owner: &mut SocketOwner, source: OwnerSource) {
    let (in_pidns, ns_tgid) = current_in_pidns();
    owner.tgid = current_tgid();
    owner.source = source as u8;
    owner.comm = current_comm();
    owner.in_pidns = in_pidns;
    owner.ns_tgid = ns_tgid;
}

/// The load-time configuration, read in place. The volatile read of its
/// address keeps the compiler from folding the zeros it was compiled with
/// into the code, and unlike a copy of the whole struct it costs no stack:
/// the programs' 512 bytes are tight.
#[inline(always)]
fn config() -> &'static Config {
    let address: *const Config = &raw const CONFIG;
    // SAFETY: a volatile read of a local; the address it yields is
    // CONFIG's, valid for the program's whole run.
    unsafe { &*core::ptr::read_volatile(&address) }
}

#[inline(always)]
fn bump(index: u32) {
    if let Some(count) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe { *count += 1 };
    }
}

#[inline(always)]
fn header(kind: EventKind, sock_id: u64) -> EventHeader {
    header_at(kind, sock_id, ktime_ns())
}

/// The header of an event that happened at `ktime_ns`.
#[inline(always)]
fn header_at(kind: EventKind, sock_id: u64, ktime_ns: u64) -> EventHeader {
    EventHeader {
        kind: kind as u32,
        current_tgid: current_tgid(),
        ktime_ns,
        sock_id,
    }
}

#[inline(always)]
fn ktime_ns() -> u64 {
    // SAFETY: a plain helper call with no arguments.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

#[inline(always)]
fn current_comm() -> [u8; TASK_COMM_LEN] {
    bpf_get_current_comm().unwrap_or([0; TASK_COMM_LEN])
}

/// Whether events about a socket owned by `owner` are reported.
#[inline(always)]
fn owner_wanted(config: &Config, owner: &SocketOwner) -> bool {
    let owner_tgid = owner.tgid;
    if owner_tgid == 0 {
        // Unknown owner: let the collector resolve it (seeded sockets).
        return true;
    }
    if owner_tgid == config.self_tgid {
        return false;
    }
    if owner.in_pidns == 0 && ns_filter().is_some() {
        return false;
    }
    // SAFETY: the map value is a plain byte we only test for presence.
    config.filter_pids == 0 || unsafe { PID_FILTER.get(owner_tgid) }.is_some()
}

/// Whether a socket in network namespace `netns` (0: not read) passes the
/// container filter.
#[inline(always)]
fn netns_wanted(netns: u32) -> bool {
    match ns_filter() {
        Some(filter) => filter.netns_ino == 0 || netns == 0 || netns == filter.netns_ino,
        None => true,
    }
}

/// Reserve-fill-submit; a failed reserve is counted, never silent.
#[inline(always)]
fn emit<T: 'static>(event: T) {
    match EVENTS.reserve::<T>(0) {
        Some(mut slot) => {
            slot.write(event);
            slot.submit(wakeup_flag::<T>());
        }
        None => bump(counter::LOST_EVENTS),
    }
}

/// Batches wake-ups: the collector drains on a short timer anyway, so it is
/// only woken when the backlog crosses a multiple of `wakeup_bytes`, by the
/// record of type `T` just reserved. Not at every record beyond it: each
/// wake-up raises an interrupt, and until the collector gets the CPU every
/// record would raise another.
#[inline(always)]
fn wakeup_flag<T>() -> u64 {
    let threshold = u64::from(config().wakeup_bytes);
    if threshold == 0 {
        return BPF_RB_FORCE_WAKEUP as u64;
    }
    // What the ring holds counts this record, with its header.
    let after = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    let before = after.saturating_sub((size_of::<T>() + BPF_RINGBUF_HDR_SZ as usize) as u64);
    if after / threshold > before / threshold {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

/// Copies a wire struct eight bytes at a time. LLVM lowers the assignment
/// of a struct this large to a call of the BPF target's memmove, which
/// copies byte by byte: 600 instructions for a `HeldSteps`, a quarter of
/// the state program's time. Volatile, so that LLVM does not turn the loop
/// back into that call.
///
/// # Safety
/// `dst` and `src` must be valid for `size_of::<T>()` bytes and aligned to 8.
#[inline(always)]
unsafe fn copy_words<T>(dst: *mut T, src: *const T) {
    const { assert!(size_of::<T>().is_multiple_of(8)) };
    let (dst, src) = (dst.cast::<u64>(), src.cast::<u64>());
    for i in 0..size_of::<T>() / 8 {
        // SAFETY: within both objects (the caller's promise).
        unsafe { core::ptr::write_volatile(dst.add(i), core::ptr::read_volatile(src.add(i))) };
    }
}

/// Reads the `T` stored `offset` bytes into the kernel object at `base`.
///
/// # Safety
/// None beyond the helper's: bpf_probe_read_kernel tolerates any address
/// and fails instead of faulting.
#[inline(always)]
unsafe fn read_kernel<T>(base: *const u8, offset: u32) -> Result<T, i64> {
    if base.is_null() {
        return Err(-1);
    }
    // SAFETY: see above.
    unsafe { bpf_probe_read_kernel(base.add(offset as usize).cast::<T>()) }.map_err(i64::from)
}

/// Reads the pointer stored `offset` bytes into `base`.
///
/// # Safety
/// As [`read_kernel`].
#[inline(always)]
unsafe fn read_ptr(base: *const u8, offset: u32) -> Result<*const u8, i64> {
    // SAFETY: as read_kernel.
    unsafe { read_kernel::<*const u8>(base, offset) }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
