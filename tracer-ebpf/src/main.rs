//! Kernel programs of socktrace.
//!
//! The spine is `sock:inet_sock_set_state`: every TCP state change. Its
//! context is the task on the CPU, which for packet-driven transitions is
//! whatever process softirq interrupted, often the *peer*. So the owner of a
//! socket is learned only in process context (connect, listen, close,
//! accept) and kept in the `SOCKETS` map; every event carries that owner, never
//! the current task of a softirq transition.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext as _, Global,
    bindings::{
        BPF_F_NO_PREALLOC, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, bpf_pidns_info,
    },
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task,
        bpf_get_ns_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_kernel_buf,
    },
    macros::{fentry, kprobe, map, tracepoint},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::{FEntryContext, ProbeContext, TracePointContext},
};
use aya_log_ebpf::warn;
use tracer_common::{
    AF_INET, AF_INET6, Config, DEFAULT_MAX_SOCKETS, DEFAULT_RING_BYTES, DWELL_UNKNOWN, Endpoints,
    EventHeader, EventKind, ExitEvent, ForkEvent, INFER_WINDOW_NS, IPPROTO_TCP, Layout,
    MAX_PID_FILTER, NamespaceFilter, OwnerEvent, OwnerSource, SET_STATE_RECORD_BYTES, SocketOwner,
    StateChangeEvent, TASK_COMM_LEN, counter, inferable_successor, owner_claim, tcp_state,
};

/// Overwritten by the collector before load (`EbpfLoader::override_global`).
#[unsafe(no_mangle)]
static CONFIG: Global<Config> = Global::new(Config {
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
        fork_child_pid: 0,
        _pad: [0; 3],
        task_files: 0,
        files_fdt: 0,
        fdtable_max_fds: 0,
        fdtable_fd: 0,
        file_private_data: 0,
        socket_sk: 0,
        sock_common_net: 0,
        net_ns_inum: 0,
    },
    self_tgid: 0,
    filter_pids: 0,
    filter_port: 0,
    filter_family: 0,
    wakeup_bytes: 0,
    skip_inferable: 0,
    _pad: 0,
});

/// Sized at load time by the collector (`--ring-buffer-kib`).
#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Not preallocated: most hosts hold far fewer sockets than the capacity,
/// and a preallocated map pins all of it in kernel memory (29 MB at the
/// default), though its inserts and deletes cost less.
#[map(name = "SOCKETS")]
static SOCKETS: HashMap<u64, SocketOwner> =
    HashMap::with_max_entries(DEFAULT_MAX_SOCKETS, BPF_F_NO_PREALLOC);

#[map(name = "PID_FILTER")]
static PID_FILTER: HashMap<u32, u8> = HashMap::with_max_entries(MAX_PID_FILTER, 0);

#[map(name = "NS_FILTER")]
static NS_FILTER: Array<NamespaceFilter> = Array::with_max_entries(1, 0);

/// Room for the copy of the `inet_sock_set_state` record (see
/// [`SetStateRecord`]): the program's 512-byte stack is taken by the event.
#[map(name = "SET_STATE_RECORD")]
static SET_STATE_RECORD: PerCpuArray<[u8; SET_STATE_RECORD_BYTES]> =
    PerCpuArray::with_max_entries(1, 0);

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
    let pid_tgid = bpf_get_current_pid_tgid();
    EventHeader {
        kind: kind as u32,
        current_tid: pid_tgid as u32,
        ktime_ns,
        current_tgid: (pid_tgid >> 32) as u32,
        _pad: 0,
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

/// Reserve-fill-submit; a failed reserve is counted, never silent.
#[inline(always)]
fn emit<T: 'static>(event: T) {
    match EVENTS.reserve::<T>(0) {
        Some(mut slot) => {
            slot.write(event);
            slot.submit(wakeup_flag());
        }
        None => bump(counter::LOST_EVENTS),
    }
}

/// Batches wake-ups: the collector drains on a short timer anyway, so it is
/// only woken early when the backlog grows past `wakeup_bytes`.
#[inline(always)]
fn wakeup_flag() -> u64 {
    let threshold = CONFIG.load().wakeup_bytes;
    if threshold == 0 || EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= u64::from(threshold) {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

#[inline(always)]
fn read_field<T>(ctx: &TracePointContext, offset: u16) -> Result<T, i64> {
    // SAFETY: bpf_probe_read of the tracepoint record; a bad offset faults
    // safely and returns an error.
    unsafe { ctx.read_at::<T>(offset as usize) }.map_err(|e| e as i64)
}

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

    let (owner, dwell_ns) = record_transition(layout, sock_id, old_state, new_state, now);
    // The collector infers it. A known dwell means the map holds the socket,
    // so the new state can be read back from there; a short one means the
    // collector has not read it yet (it waits out the window, then reads
    // once), and a socket stuck in SYN_SENT costs it one read, not one a
    // tick. DWELL_UNKNOWN is never short.
    if config.skip_inferable != 0
        && dwell_ns < INFER_WINDOW_NS
        && inferable_successor(old_state) == Some(new_state)
    {
        return Ok(());
    }
    if !owner_wanted(&config, &owner) {
        return Ok(());
    }
    let netns = owner.netns;
    if let Some(filter) = ns_filter()
        && filter.netns_ino != 0
        && netns != 0
        && netns != filter.netns_ino
    {
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
        owner,
        endpoints,
        old_state,
        new_state,
        _pad: [0; 6],
        dwell_ns,
    });
    Ok(())
}

/// sk->__sk_common.skc_net.net->ns.inum; 0 when unreadable.
#[inline(always)]
fn socket_netns(layout: &Layout, sock_id: u64) -> u32 {
    // SAFETY: bpf_probe_read_kernel tolerates any address.
    unsafe {
        let Ok(net) = read_ptr(sock_id as *const u8, layout.sock_common_net) else {
            return 0;
        };
        if net.is_null() {
            return 0;
        }
        bpf_probe_read_kernel(net.add(layout.net_ns_inum as usize).cast::<u32>()).unwrap_or(0)
    }
}

/// Applies a transition to the socket map and returns the socket's owner and
/// the time spent in the old state.
#[inline(always)]
fn record_transition(
    layout: &Layout,
    sock_id: u64,
    old_state: u8,
    new_state: u8,
    now: u64,
) -> (SocketOwner, u64) {
    let claim = owner_claim(new_state);
    // LISTEN -> SYN_RECV is the birth of a child socket cloned from a
    // listener (inet_csk_clone_lock): whatever the map holds for this address
    // belongs to a dead socket.
    let newborn = old_state == tcp_state::LISTEN && new_state == tcp_state::SYN_RECV;
    if !newborn && let Some(known) = SOCKETS.get_ptr_mut(sock_id) {
        // SAFETY: the pointer comes from a successful lookup in a hash map
        // and stays valid for this program run (RCU).
        let known = unsafe { &mut *known };
        let dwell = if known.state_since_ns != 0 && known.state == old_state {
            now.saturating_sub(known.state_since_ns)
        } else {
            DWELL_UNKNOWN
        };
        if claim != OwnerSource::Unknown {
            if current_tgid() != known.tgid {
                set_owner_to_current(known, claim);
            }
            known.source = claim as u8;
        }
        known.state = new_state;
        known.state_since_ns = now;
        // Entries the collector wrote (owners found in /proc) lack it.
        if known.netns == 0 {
            known.netns = socket_netns(layout, sock_id);
        }
        let owner = *known;
        // Every TCP socket passes through CLOSE before it is freed, and a
        // socket used again after CLOSE (connect() or listen() once more)
        // claims its owner anew: the entry has served.
        if new_state == tcp_state::CLOSE {
            let _ = SOCKETS.remove(sock_id);
        }
        return (owner, dwell);
    }

    let mut owner = SocketOwner {
        state: new_state,
        state_since_ns: now,
        // A socket never changes namespace: read once, kept in the map.
        netns: socket_netns(layout, sock_id),
        ..SocketOwner::default()
    };
    if claim != OwnerSource::Unknown {
        set_owner_to_current(&mut owner, claim);
    }
    // A socket first seen closing has nothing left to track.
    if new_state != tcp_state::CLOSE && SOCKETS.insert(sock_id, owner, 0).is_err() {
        bump(counter::SOCKET_MAP_FULL);
    }
    (owner, DWELL_UNKNOWN)
}

/// Records `current` as the owner of `sock_id` (only for sockets already
/// tracked) and tells the collector when the owner changed.
#[inline(always)]
fn claim_socket(sock_id: u64, source: OwnerSource) {
    let Some(known) = SOCKETS.get_ptr_mut(sock_id) else {
        return;
    };
    // SAFETY: see record_transition.
    let known = unsafe { &mut *known };
    if known.tgid == current_tgid() {
        return;
    }
    set_owner_to_current(known, source);
    let owner = *known;
    if owner_wanted(&CONFIG.load(), &owner) {
        emit(OwnerEvent {
            header: header(EventKind::Owner, sock_id),
            owner,
        });
    }
}

#[tracepoint(category = "syscalls", name = "sys_exit_accept4")]
pub fn sys_exit_accept4(ctx: TracePointContext) -> u32 {
    on_accept_exit(&ctx);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_accept")]
pub fn sys_exit_accept(ctx: TracePointContext) -> u32 {
    on_accept_exit(&ctx);
    0
}

/// accept() returned a new fd in the caller's context: find the socket behind
/// it and record the caller as its owner.
#[inline(always)]
fn on_accept_exit(ctx: &TracePointContext) {
    let layout = CONFIG.load().layout;
    let Ok(fd) = read_field::<i64>(ctx, layout.accept_ret) else {
        return;
    };
    if fd < 0 {
        return;
    }
    match socket_of_fd(&layout, fd as u64) {
        Ok(sock_id) => claim_socket(sock_id, OwnerSource::Accept),
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
        let files: *const u8 = read_ptr(task, layout.task_files)?;
        let fdt: *const u8 = read_ptr(files, layout.files_fdt)?;
        let max_fds: u32 = bpf_probe_read_kernel(fdt.add(layout.fdtable_max_fds as usize).cast())?;
        if fd >= max_fds as u64 {
            return Err(-1);
        }
        let fd_array: *const u8 = read_ptr(fdt, layout.fdtable_fd)?;
        let file: *const u8 = read_ptr(fd_array, (fd * 8) as u32)?;
        let socket: *const u8 = read_ptr(file, layout.file_private_data)?;
        let sk: *const u8 = read_ptr(socket, layout.socket_sk)?;
        Ok(sk as u64)
    }
}

/// Reads the pointer stored `offset` bytes into `base`.
#[inline(always)]
unsafe fn read_ptr(base: *const u8, offset: u32) -> Result<*const u8, i64> {
    if base.is_null() {
        return Err(-1);
    }
    // SAFETY: bpf_probe_read_kernel tolerates any address.
    unsafe { bpf_probe_read_kernel(base.add(offset as usize).cast::<*const u8>()) }
        .map_err(i64::from)
}

#[tracepoint(category = "sched", name = "sched_process_fork")]
pub fn sched_process_fork(ctx: TracePointContext) -> u32 {
    if current_in_pidns().0 == 0 {
        return 0;
    }
    if let Ok(child_pid) = read_field::<i32>(&ctx, CONFIG.load().layout.fork_child_pid) {
        emit(ForkEvent {
            header: header(EventKind::Fork, 0),
            child_pid: child_pid as u32,
            _pad: 0,
        });
    }
    0
}

#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn sched_process_exit(_ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    // Only the thread-group leader's exit ends a process.
    if pid_tgid as u32 == (pid_tgid >> 32) as u32 && current_in_pidns().0 == 1 {
        emit(ExitEvent {
            header: header(EventKind::Exit, 0),
        });
    }
    0
}

// Optional layer, attached where the kernel allows it: tcp_connect and
// tcp_close always run in the owner's context, including closes of sockets
// already reset by the peer, which no state transition reveals.

#[fentry(function = "tcp_connect")]
pub fn tcp_connect_fentry(ctx: FEntryContext) -> u32 {
    claim_socket(ctx.arg::<u64>(0), OwnerSource::Connect);
    0
}

#[fentry(function = "tcp_close")]
pub fn tcp_close_fentry(ctx: FEntryContext) -> u32 {
    claim_socket(ctx.arg::<u64>(0), OwnerSource::Close);
    0
}

#[kprobe]
pub fn tcp_connect_kprobe(ctx: ProbeContext) -> u32 {
    if let Some(sk) = ctx.arg::<u64>(0) {
        claim_socket(sk, OwnerSource::Connect);
    }
    0
}

#[kprobe]
pub fn tcp_close_kprobe(ctx: ProbeContext) -> u32 {
    if let Some(sk) = ctx.arg::<u64>(0) {
        claim_socket(sk, OwnerSource::Close);
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
