//! Every TCP state change (`sock:inet_sock_set_state`), and the release of
//! a socket that reached CLOSE while a file still held it
//! (`tcp:tcp_destroy_sock`), each as a classic tracepoint (the record the
//! kernel builds, state in the hash map) and as a BTF tracepoint (the
//! kernel's own arguments, state in socket storage). One handler serves
//! both, generic over how the fields are read and where the state lives.

use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_current_task, bpf_probe_read_kernel_buf},
    macros::{btf_tracepoint, tracepoint},
    programs::{BtfTracePointContext, TracePointContext},
};
use tracer_common::{
    AF_INET, DWELL_UNKNOWN, Endpoints, EventKind, INFER_WINDOW_NS, IPPROTO_TCP, Layout,
    OwnerSource, ReleaseEvent, SET_STATE_RECORD_BYTES, SOCK_COMMON_BYTES, SocketOwner,
    StateChangeEvent, counter, inferable_successor, owner_claim, state_flags, tcp_state,
};

use crate::{
    EVENTS, RUNNING, SET_STATE_RECORD, SOCK_COMMON, bump, config, current_comm, current_tgid, emit,
    header_at, ktime_ns, netns_wanted, owner_wanted, read_kernel, read_ptr, set_owner_to_current,
    socket_netns,
    store::{HashStore, SkStore, SocketStore, forget_seeded},
    wakeup_flag,
};

/// task->flags bit of a task that is exiting (include/linux/sched.h): its
/// files are being closed by the kernel.
const PF_EXITING: u32 = 0x4;

/// One TCP state change, however the program got it: the fields the
/// handler needs, read on demand.
trait StateChangeFields {
    fn protocol(&self) -> Result<u16, i64>;
    fn family(&self) -> Result<u16, i64>;
    /// The kernel's `struct sock *`, as the store and the helpers want it.
    fn sk(&self) -> Result<*const c_void, i64>;
    fn states(&self) -> Result<(u8, u8), i64>;
    /// (local, remote), host byte order.
    fn ports(&self) -> Result<(u16, u16), i64>;
    /// (local, remote); IPv4 in the first 4 bytes.
    fn addresses(&self, family: u16) -> Result<([u8; 16], [u8; 16]), i64>;
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
}

/// Reads a `T` at `offset` of a copied block, bounds checked.
#[inline(always)]
fn copied_field<T: Copy, const N: usize>(block: &[u8; N], offset: u32) -> Result<T, i64> {
    let offset = offset as usize;
    // Also the bound the verifier needs for the variable offset; the
    // collector checked the layout against it before load.
    if offset > N - size_of::<T>() {
        return Err(-1);
    }
    // SAFETY: in bounds (checked above); any bit pattern is a valid T here
    // (integers and byte arrays).
    Ok(unsafe { core::ptr::read_unaligned(block.as_ptr().add(offset).cast::<T>()) })
}

impl StateChangeFields for SetStateRecord {
    #[inline(always)]
    fn protocol(&self) -> Result<u16, i64> {
        copied_field(self.0, config().layout.set_state_protocol.into())
    }

    #[inline(always)]
    fn family(&self) -> Result<u16, i64> {
        copied_field(self.0, config().layout.set_state_family.into())
    }

    #[inline(always)]
    fn sk(&self) -> Result<*const c_void, i64> {
        copied_field::<u64, _>(self.0, config().layout.set_state_skaddr.into())
            .map(|sk| sk as *const c_void)
    }

    #[inline(always)]
    fn states(&self) -> Result<(u8, u8), i64> {
        let layout = &config().layout;
        let old = copied_field::<i32, _>(self.0, layout.set_state_oldstate.into())?;
        let new = copied_field::<i32, _>(self.0, layout.set_state_newstate.into())?;
        Ok((old as u8, new as u8))
    }

    #[inline(always)]
    fn ports(&self) -> Result<(u16, u16), i64> {
        let layout = &config().layout;
        Ok((
            copied_field(self.0, layout.set_state_sport.into())?,
            copied_field(self.0, layout.set_state_dport.into())?,
        ))
    }

    #[inline(always)]
    fn addresses(&self, family: u16) -> Result<([u8; 16], [u8; 16]), i64> {
        let layout = &config().layout;
        let (mut local, mut remote) = ([0; 16], [0; 16]);
        if family == AF_INET {
            local[..4].copy_from_slice(&copied_field::<[u8; 4], _>(
                self.0,
                layout.set_state_saddr.into(),
            )?);
            remote[..4].copy_from_slice(&copied_field::<[u8; 4], _>(
                self.0,
                layout.set_state_daddr.into(),
            )?);
        } else {
            local = copied_field(self.0, layout.set_state_saddr_v6.into())?;
            remote = copied_field(self.0, layout.set_state_daddr_v6.into())?;
        }
        Ok((local, remote))
    }
}

/// A BTF tracepoint's arguments: the socket itself, its `sock_common` (the
/// family, ports and addresses) copied with one probe read.
struct SockFields {
    sk: *const c_void,
    old: u8,
    new: u8,
    common: &'static [u8; SOCK_COMMON_BYTES],
}

impl SockFields {
    #[inline(always)]
    /// `depth`: 0 for the outer run on this CPU, 1 for one nested in it
    /// (each has a buffer of its own).
    fn read(ctx: &BtfTracePointContext, depth: u32) -> Result<Self, i64> {
        let sk: *const c_void = ctx.arg(0);
        let old: i32 = ctx.arg(1);
        let new: i32 = ctx.arg(2);
        let slot = SOCK_COMMON.get_ptr_mut(depth).ok_or(-1i64)?;
        // SAFETY: this CPU's slot, as in SetStateRecord::read; the probe read
        // tolerates any address.
        unsafe {
            bpf_probe_read_kernel_buf(sk.cast::<u8>(), &mut *slot).map_err(i64::from)?;
            Ok(Self {
                sk,
                old: old as u8,
                new: new as u8,
                common: &*slot,
            })
        }
    }
}

impl StateChangeFields for SockFields {
    #[inline(always)]
    fn protocol(&self) -> Result<u16, i64> {
        // SAFETY: read_kernel tolerates any address.
        unsafe { read_kernel(self.sk.cast(), config().layout.sock_protocol) }
    }

    #[inline(always)]
    fn family(&self) -> Result<u16, i64> {
        copied_field(self.common, config().layout.sock_family)
    }

    #[inline(always)]
    fn sk(&self) -> Result<*const c_void, i64> {
        Ok(self.sk)
    }

    #[inline(always)]
    fn states(&self) -> Result<(u8, u8), i64> {
        Ok((self.old, self.new))
    }

    #[inline(always)]
    fn ports(&self) -> Result<(u16, u16), i64> {
        let layout = &config().layout;
        // SAFETY: read_kernel tolerates any address.
        let sport: u16 = unsafe { read_kernel(self.sk.cast(), layout.inet_sport) }?;
        let dport: u16 = copied_field(self.common, layout.sock_dport)?;
        Ok((u16::from_be(sport), u16::from_be(dport)))
    }

    #[inline(always)]
    fn addresses(&self, family: u16) -> Result<([u8; 16], [u8; 16]), i64> {
        let layout = &config().layout;
        let (mut local, mut remote) = ([0; 16], [0; 16]);
        if family == AF_INET {
            local[..4].copy_from_slice(&copied_field::<[u8; 4], _>(
                self.common,
                layout.sock_rcv_saddr,
            )?);
            remote[..4]
                .copy_from_slice(&copied_field::<[u8; 4], _>(self.common, layout.sock_daddr)?);
        } else {
            local = copied_field(self.common, layout.sock_v6_rcv_saddr)?;
            remote = copied_field(self.common, layout.sock_v6_daddr)?;
        }
        Ok((local, remote))
    }
}

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    if let Ok(record) = SetStateRecord::read(&ctx) {
        let _ = on_state_change::<HashStore>(&record);
    }
    0
}

// The kernel refuses to run a BPF tracepoint program inside itself on one
// CPU: a softirq that changes a socket's state while the program runs for
// another (an interrupt landed in it) is skipped. So a second program rides
// the same tracepoint, attached after the first, and takes the events the
// kernel skipped the first for: those that come while a run of the first
// is under way on this CPU.

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state_btf(ctx: BtfTracePointContext) -> u32 {
    let _running = Running::start(Partner::SetState);
    if let Ok(fields) = SockFields::read(&ctx, 0) {
        let _ = on_state_change::<SkStore>(&fields);
    }
    0
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state_btf_nested(ctx: BtfTracePointContext) -> u32 {
    let sk: *const c_void = ctx.arg(0);
    let (old, new): (i32, i32) = (ctx.arg(1), ctx.arg(2));
    // A run under way means the kernel skipped the first program for this
    // event. Outside one (the kernel also skips it in the few instructions
    // around its count), the socket's storage tells: the first program
    // applies every transition of a TCP socket it takes there, and gives
    // storage to every such socket that is not closing.
    let skipped = Running::under_way(Partner::SetState)
        || match SkStore::peek(sk) {
            Some(known) => known.state == old as u8,
            None => new as u8 != tcp_state::CLOSE && is_tcp(&ctx),
        };
    if skipped {
        // The kernel counted the skip whatever the event: so is the rescue.
        bump(counter::RESCUED);
        if let Ok(fields) = SockFields::read(&ctx, 1) {
            let _ = on_state_change::<SkStore>(&fields);
        }
    }
    0
}

/// The socket of a BTF tracepoint's first argument is a TCP one.
#[inline(always)]
fn is_tcp(ctx: &BtfTracePointContext) -> bool {
    SockFields::read(ctx, 1).is_ok_and(|fields| fields.protocol() == Ok(IPPROTO_TCP))
}

fn on_state_change<S: SocketStore>(fields: &impl StateChangeFields) -> Result<(), i64> {
    let config = config();
    if fields.protocol()? != IPPROTO_TCP {
        return Ok(());
    }
    let sk = fields.sk()?;
    let (old_state, new_state) = fields.states()?;
    let now = ktime_ns();

    let change = record_transition::<S>(&config.layout, sk, old_state, new_state, now);
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
    // The filters come after the store is up to date: every transition of
    // a socket with storage is in it (the `_nested` partner relies on it).
    let family = fields.family()?;
    if (config.filter_family != 0 && family != config.filter_family)
        || !owner_wanted(config, &change.owner)
        || !netns_wanted(change.owner.netns)
    {
        return Ok(());
    }
    let (local_port, remote_port) = fields.ports()?;
    if config.filter_port != 0
        && local_port != config.filter_port
        && remote_port != config.filter_port
    {
        return Ok(());
    }
    let (local_addr, remote_addr) = fields.addresses(family)?;
    let Some(mut slot) = EVENTS.reserve::<StateChangeEvent>(0) else {
        bump(counter::LOST_EVENTS);
        return Ok(());
    };
    // Written into the ring field by field, not built on the stack and
    // copied: the 512 bytes of stack are tight on older verifiers.
    let event = slot.as_mut_ptr();
    // SAFETY: `event` points into the reserved slot, which is ours and
    // large enough until it is submitted.
    unsafe {
        (*event).header = header_at(EventKind::StateChange, sk as u64, now);
        (*event).owner = change.owner;
        (*event).endpoints = Endpoints {
            family,
            local_port,
            remote_port,
            _pad: 0,
            local_addr,
            remote_addr,
        };
        (*event).old_state = old_state;
        (*event).new_state = new_state;
        (*event).flags = change.flags;
        (*event)._pad = 0;
        (*event).error = change.error;
        (*event).dwell_ns = change.dwell_ns;
    }
    slot.submit(wakeup_flag());
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

/// Applies a transition to the socket's entry in the store.
#[inline(always)]
fn record_transition<S: SocketStore>(
    layout: &Layout,
    sk: *const c_void,
    old_state: u8,
    new_state: u8,
    now: u64,
) -> Change {
    let claim = owner_claim(new_state);
    let closing = new_state == tcp_state::CLOSE;
    let (held, error) = if closing {
        (
            held_by_a_file(layout, sk.cast()),
            close_error(layout, sk.cast()),
        )
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
    // belongs to a dead socket. (Socket storage is not cloned: a new socket
    // has none.)
    let newborn = old_state == tcp_state::LISTEN && new_state == tcp_state::SYN_RECV;
    if !newborn && let Some(known) = S::get(sk) {
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
            known.netns = socket_netns(layout, sk.cast());
        }
        let owner = *known;
        // A socket that closed with no file left is done with: the entry
        // has served. One still held stays until its release
        // (tcp_destroy_sock), or until it connects again and claims its
        // owner anew.
        if closing && !held {
            S::remove(sk);
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
        netns: socket_netns(layout, sk.cast()),
        ..SocketOwner::default()
    };
    if claim != OwnerSource::Unknown {
        set_owner_to_current(&mut owner, claim);
    }
    // A socket first seen closing with no file left has nothing to track.
    if !closing || held {
        let _ = S::create(sk, &owner);
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
    let offset = usize::from(config().layout.destroy_skaddr);
    // SAFETY: bpf_probe_read of the tracepoint record.
    if let Ok(sk) = unsafe { ctx.read_at::<u64>(offset) } {
        let owner = HashStore::get(sk as *const c_void).map(|known| *known);
        HashStore::remove(sk as *const c_void);
        on_destroy(sk, owner);
    }
    0
}

#[btf_tracepoint(function = "tcp_destroy_sock")]
pub fn tcp_destroy_sock_btf(ctx: BtfTracePointContext) -> u32 {
    let _running = Running::start(Partner::Destroy);
    on_destroy_btf(ctx.arg(0));
    0
}

/// See `inet_sock_set_state_btf_nested`; the first program marks the
/// storage of a socket it releases (state 0). A destroy matters only for a
/// socket with storage (a release is said only for one), and for those the
/// storage tells whether the first program took it: every skip that could
/// lose something is made up for here, so the collector does not count the
/// first program's skips (and this one counts no rescues).
#[btf_tracepoint(function = "tcp_destroy_sock")]
pub fn tcp_destroy_sock_btf_nested(ctx: BtfTracePointContext) -> u32 {
    let sk: *const c_void = ctx.arg(0);
    let skipped = Running::under_way(Partner::Destroy)
        || SkStore::peek(sk).is_some_and(|known| known.state != 0);
    if skipped {
        on_destroy_btf(sk);
    }
    0
}

#[inline(always)]
fn on_destroy_btf(sk: *const c_void) {
    // Storage goes with the socket; a socket found at start with no event
    // since is still in SEEDED.
    let owner = SkStore::get(sk).map(|known| {
        let owner = *known;
        known.state = 0;
        owner
    });
    // Whatever SEEDED still has for it (an owner the collector wrote for a
    // socket whose storage named one already) goes with it too.
    forget_seeded(sk as u64);
    on_destroy(sk as u64, owner);
}

/// The socket is freed: if a file held it after CLOSE, say who let go. For
/// a socket closed while held, the kernel destroys it in the release of its
/// last file, in that task's context (close(), or the fds closed at exit).
/// Most sockets left the store at CLOSE: `owner` is `None`.
#[inline(always)]
fn on_destroy(sock_id: u64, owner: Option<SocketOwner>) {
    let Some(owner) = owner else {
        return;
    };
    let config = config();
    // Any other entry is one whose CLOSE event was never seen.
    if owner.closed_held == 0 || owner.state != tcp_state::CLOSE {
        return;
    }
    if !owner_wanted(config, &owner) || !netns_wanted(owner.netns) {
        return;
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
}

/// The BTF tracepoint programs that have a `_nested` partner.
#[derive(Clone, Copy)]
enum Partner {
    SetState = 0,
    Destroy = 1,
}

/// A run of a partnered program, counted on this CPU for as long as it
/// lasts. Only the program itself writes its count, and it never runs
/// nested in itself, so the count needs no atomics.
struct Running(Partner);

impl Running {
    #[inline(always)]
    fn start(program: Partner) -> Self {
        if let Some(count) = RUNNING.get_ptr_mut(program as u32) {
            // SAFETY: this CPU's slot.
            unsafe { *count += 1 };
        }
        Self(program)
    }

    /// Whether a run of `program` is under way on this CPU: one that an
    /// interrupt landed in, so the kernel skipped the program for this
    /// event.
    #[inline(always)]
    fn under_way(program: Partner) -> bool {
        RUNNING.get(program as u32).is_some_and(|&count| count > 0)
    }
}

impl Drop for Running {
    #[inline(always)]
    fn drop(&mut self) {
        if let Some(count) = RUNNING.get_ptr_mut(self.0 as u32) {
            // SAFETY: this CPU's slot.
            unsafe { *count = count.read().saturating_sub(1) };
        }
    }
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
