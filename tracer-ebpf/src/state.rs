//! Every TCP state change (`sock:inet_sock_set_state`), and the release of
//! a socket that reached CLOSE while a file still held it
//! (`tcp:tcp_destroy_sock`), each as a classic tracepoint (the record the
//! kernel builds, state in the hash map) and as a BTF tracepoint (the
//! kernel's own arguments, state in the hash map and, beyond its size, in
//! socket storage). One handler serves both, generic over how the fields
//! are read and where the state lives.
//!
//! A transition is applied to the socket's entry. When the collector
//! aggregates, one into a state that TCP's own timers end (a handshake, a
//! close under way: `tracer_common::holds`) is held there and crosses to
//! the collector with the next one, in one record: a connection takes
//! five records instead of ten. What a socket holds is reported anyway
//! when the first held step is `Config::hold_ns` old, at a retransmission
//! (a peer that does not answer), and when the socket is freed.

use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_current_task, bpf_probe_read_kernel_buf},
    macros::{btf_tracepoint, tracepoint},
    programs::{BtfTracePointContext, TracePointContext},
};
use tracer_common::{
    AF_INET, DWELL_UNKNOWN, Endpoints, EventKind, IPPROTO_TCP, Layout, MAX_HELD_STEPS, OwnerSource,
    ReleaseEvent, SET_STATE_RECORD_BYTES, SocketEntry, SocketOwner, StateChangesEvent, counter,
    holds, owner_claim, tcp_state,
};

use crate::{
    EVENTS, RUNNING, SET_STATE_RECORD, bump, claim_owner, config, copy_words, current_comm, emit,
    header_at, ktime_ns, netns_wanted, owner_wanted, read_kernel,
    sock::{self, Reader, copied_field},
    store::{HashStore, SocketStore, TieredStore, adopt_owner, forget_seeded, start_afresh},
    wakeup_flag,
};

/// task->flags bit of a task that is exiting (include/linux/sched.h): its
/// files are being closed by the kernel.
const PF_EXITING: u32 = 0x4;

/// One TCP state change, however the program got it: the fields the
/// handler needs, read on demand.
trait StateChangeFields {
    fn protocol(&self) -> Result<u16, i64>;
    /// The kernel's `struct sock *`, as the store and the helpers want it.
    fn sk(&self) -> *const c_void;
    fn states(&self) -> (u8, u8);
    /// Read only when the socket is reported.
    fn endpoints(&self) -> Result<Endpoints, i64>;
}

/// The `sock:inet_sock_set_state` record, copied with one probe read instead
/// of one per field: those nine helper calls were a quarter of the program's
/// time, and it runs ten times per connection.
struct SetStateRecord {
    record: &'static [u8; SET_STATE_RECORD_BYTES],
    sk: *const c_void,
    old: u8,
    new: u8,
}

impl SetStateRecord {
    #[inline(always)]
    fn read(ctx: &TracePointContext) -> Result<Self, i64> {
        let slot = SET_STATE_RECORD.get_ptr_mut(0).ok_or(-1i64)?;
        // SAFETY: the slot is this CPU's, valid for the whole program run and
        // used by nothing else meanwhile; bpf_probe_read_kernel faults
        // safely, and the record starts a per-CPU buffer far longer than
        // SET_STATE_RECORD_BYTES.
        let record: &[u8; SET_STATE_RECORD_BYTES] = unsafe {
            bpf_probe_read_kernel_buf(ctx.as_ptr().cast::<u8>(), &mut *slot).map_err(i64::from)?;
            &*slot
        };
        let layout = &config().layout;
        let sk = copied_field::<u64, _>(record, layout.set_state_skaddr.into())?;
        let old = copied_field::<i32, _>(record, layout.set_state_oldstate.into())?;
        let new = copied_field::<i32, _>(record, layout.set_state_newstate.into())?;
        Ok(Self {
            record,
            sk: sk as *const c_void,
            old: old as u8,
            new: new as u8,
        })
    }
}

impl StateChangeFields for SetStateRecord {
    #[inline(always)]
    fn protocol(&self) -> Result<u16, i64> {
        copied_field(self.record, config().layout.set_state_protocol.into())
    }

    #[inline(always)]
    fn sk(&self) -> *const c_void {
        self.sk
    }

    #[inline(always)]
    fn states(&self) -> (u8, u8) {
        (self.old, self.new)
    }

    #[inline(always)]
    fn endpoints(&self) -> Result<Endpoints, i64> {
        let layout = &config().layout;
        let record = self.record;
        let family: u16 = copied_field(record, layout.set_state_family.into())?;
        let (mut local_addr, mut remote_addr) = ([0; 16], [0; 16]);
        if family == AF_INET {
            local_addr[..4].copy_from_slice(&copied_field::<[u8; 4], _>(
                record,
                layout.set_state_saddr.into(),
            )?);
            remote_addr[..4].copy_from_slice(&copied_field::<[u8; 4], _>(
                record,
                layout.set_state_daddr.into(),
            )?);
        } else {
            local_addr = copied_field(record, layout.set_state_saddr_v6.into())?;
            remote_addr = copied_field(record, layout.set_state_daddr_v6.into())?;
        }
        Ok(Endpoints {
            family,
            local_port: copied_field(record, layout.set_state_sport.into())?,
            remote_port: copied_field(record, layout.set_state_dport.into())?,
            _pad: 0,
            local_addr,
            remote_addr,
        })
    }
}

/// A BTF tracepoint's arguments: the socket itself and its states; the
/// rest is read from the socket when it is reported.
struct SockFields {
    sk: *const c_void,
    old: u8,
    new: u8,
    reader: Reader,
}

impl SockFields {
    #[inline(always)]
    fn read(ctx: &BtfTracePointContext, reader: Reader) -> Self {
        let old: i32 = ctx.arg(1);
        let new: i32 = ctx.arg(2);
        Self {
            sk: ctx.arg(0),
            old: old as u8,
            new: new as u8,
            reader,
        }
    }

    #[inline(always)]
    fn event(&self) -> Event {
        Event {
            sk: self.sk as u64,
            states: (self.old, self.new),
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
    fn sk(&self) -> *const c_void {
        self.sk
    }

    #[inline(always)]
    fn states(&self) -> (u8, u8) {
        (self.old, self.new)
    }

    #[inline(always)]
    fn endpoints(&self) -> Result<Endpoints, i64> {
        sock::endpoints(&config().layout, self.sk.cast(), self.reader)
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
    let fields = SockFields::read(&ctx, Reader::Probe);
    let _running = Running::start(Partner::SetState, fields.event());
    let _ = on_state_change::<TieredStore>(&fields);
    0
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state_btf_nested(ctx: BtfTracePointContext) -> u32 {
    let fields = SockFields::read(&ctx, Reader::Nested);
    let (old, _) = fields.states();
    // A run under way means the kernel skipped the first program for this
    // event; its last run finishing this very event means it did not (the
    // common case, told without a map lookup). Otherwise (the kernel also
    // skips it in the instructions of its own dispatch around that count,
    // which a neighbour's interrupts hit hundreds of times a minute, and an
    // interrupt between the two programs leaves another event's mark), the
    // socket's entry tells: the first program applies every transition of a
    // TCP socket to it, and gives every TCP socket it sees one, kept until
    // the socket is freed.
    let skipped = Running::skipped(Partner::SetState, fields.event()).unwrap_or_else(|| {
        match TieredStore::peek(fields.sk) {
            Some(known) => known.owner.state == old,
            None => fields.protocol() == Ok(IPPROTO_TCP),
        }
    });
    if skipped {
        // The kernel counted the skip whatever the event: so is the rescue.
        bump(counter::RESCUED);
        let _ = on_state_change::<TieredStore>(&fields);
    }
    0
}

fn on_state_change<S: SocketStore>(fields: &impl StateChangeFields) -> Result<(), i64> {
    let config = config();
    let layout = &config.layout;
    let sk = fields.sk();
    let (old_state, new_state) = fields.states();
    let now = ktime_ns();
    // LISTEN -> SYN_RECV is the birth of a child socket cloned from a
    // listener (inet_csk_clone_lock): whatever the map holds for this
    // address belongs to a dead socket. (Socket storage is not cloned: a
    // new socket has none.)
    let newborn = old_state == tcp_state::LISTEN && new_state == tcp_state::SYN_RECV;
    // A socket that starts (connect, listen) or is born cannot be one found
    // at start that waits for its first event.
    let starting = old_state == tcp_state::CLOSE;
    let known = if newborn {
        None
    } else if starting {
        S::get(sk)
    } else {
        S::get_or_seeded(sk)
    };
    let entry = match known {
        // One that starts again after a CLOSE its entry saw (closed while
        // held, connecting again) keeps its entry.
        Some(entry) if !starting || entry.owner.state == tcp_state::CLOSE => entry,
        // An entry whose CLOSE was lost (a skipped run): a dead socket's at
        // this address, or this socket's previous life. Its held steps and
        // owner are not this life's.
        Some(entry) => {
            start_afresh(entry);
            fresh_entry(entry, layout, sk, old_state, newborn)
        }
        // Entries are made for TCP sockets only: a known one is TCP.
        None if fields.protocol()? != IPPROTO_TCP => return Ok(()),
        None => fresh_entry(S::create(sk).ok_or(-1i64)?, layout, sk, old_state, newborn),
    };

    let closing = new_state == tcp_state::CLOSE;
    let held_by_a_file = closing && sock::held_by_a_file(layout, sk.cast());
    let claim = owner_claim(new_state);
    if claim != OwnerSource::Unknown {
        claim_owner(&mut entry.owner, claim);
    }
    // Entries the collector or the iterator wrote lack it.
    if entry.owner.netns == 0 {
        entry.owner.netns = sock::netns(layout, sk.cast());
    }
    // Full only when their report failed (ring buffer full): one more try,
    // then the oldest are given up, counted.
    if usize::from(entry.held.count) >= MAX_HELD_STEPS
        && !report(sk as u64, entry, fields.endpoints(), now)
    {
        bump(counter::LOST_EVENTS);
        clear_held(entry);
    }
    let index = usize::from(entry.held.count).min(MAX_HELD_STEPS - 1);
    // Field by field: a whole `Step` would be written with memset for its
    // padding (a call), which stays zero anyway.
    let step = &mut entry.held.steps[index];
    step.at_ns = now;
    step.state = new_state;
    step.closed_held = u8::from(held_by_a_file);
    entry.held.count = index as u8 + 1;
    if closing {
        entry.held.error = sock::close_error(layout, sk.cast());
    }
    entry.owner.state = new_state;
    entry.owner.state_since_ns = now;
    entry.owner.closed_held = u8::from(held_by_a_file);

    let first_held_ns = entry.held.steps[0].at_ns;
    let due = config.hold_ns == 0
        || !holds(new_state, half_closed(layout, sk, new_state))
        || index + 1 == MAX_HELD_STEPS
        || now.saturating_sub(first_held_ns) >= config.hold_ns;
    if due {
        // A passive open's owner, which accept() left, is taken when its
        // transitions are reported: one lookup per report, not per event.
        if entry.owner.tgid == 0
            && let Some(claimed) = S::claimed_owner(sk)
        {
            adopt_owner(&mut entry.owner, &claimed);
        }
        let reported = report(sk as u64, entry, fields.endpoints(), now);
        // A socket that closed with no file left is done with; one still
        // held stays until its release (tcp_destroy_sock), or until it
        // connects again.
        if closing && !held_by_a_file {
            if !reported {
                bump(counter::LOST_EVENTS);
            }
            S::done(sk);
        }
    }
    Ok(())
}

/// A new entry's first fields.
#[inline(always)]
fn fresh_entry<'a>(
    entry: &'a mut SocketEntry,
    layout: &Layout,
    sk: *const c_void,
    old_state: u8,
    newborn: bool,
) -> &'a mut SocketEntry {
    entry.held.from_state = old_state;
    entry.passive = u32::from(newborn);
    // A socket never changes namespace: read once, kept.
    entry.owner.netns = sock::netns(layout, sk.cast());
    entry
}

/// Whether a file holds a socket in FIN_WAIT2 (a half-close the owner may
/// keep for as long as it likes, not an orphan closing): asked only where
/// `holds` needs it.
#[inline(always)]
fn half_closed(layout: &Layout, sk: *const c_void, state: u8) -> bool {
    state == tcp_state::FIN_WAIT2 && sock::held_by_a_file(layout, sk.cast())
}

/// Sends the socket's held steps and owner to the collector, if the user's
/// filters want the socket, and clears them. False when the ring buffer
/// had no room: the steps stay held.
#[inline(always)]
pub fn report(
    sock_id: u64,
    entry: &mut SocketEntry,
    endpoints: Result<Endpoints, i64>,
    now: u64,
) -> bool {
    let wanted = match &endpoints {
        Ok(endpoints) => wanted(endpoints, &entry.owner),
        Err(_) => false,
    };
    if let (true, Ok(endpoints)) = (wanted, endpoints) {
        let Some(mut slot) = EVENTS.reserve::<StateChangesEvent>(0) else {
            return false;
        };
        let event = slot.as_mut_ptr();
        // SAFETY: `event` points into the reserved slot, which is ours,
        // 8-aligned and large enough until it is submitted; the entry is a
        // map value, 8-aligned too. Written field by field from the entry,
        // not built on the stack: the 512 bytes are tight.
        unsafe {
            (*event).header = header_at(EventKind::StateChanges, sock_id, now);
            copy_words(&raw mut (*event).owner, &raw const entry.owner);
            (*event).endpoints = endpoints;
            copy_words(&raw mut (*event).held, &raw const entry.held);
        }
        slot.submit(wakeup_flag::<StateChangesEvent>());
        entry.held.reported = 1;
    }
    clear_held(entry);
    true
}

/// Whether the user's filters (`--port`, `--family`, `-p`, a container)
/// want the socket's records.
#[inline(always)]
pub fn wanted(endpoints: &Endpoints, owner: &SocketOwner) -> bool {
    let config = config();
    (config.filter_family == 0 || endpoints.family == config.filter_family)
        && (config.filter_port == 0
            || endpoints.local_port == config.filter_port
            || endpoints.remote_port == config.filter_port)
        && owner_wanted(config, owner)
        && netns_wanted(owner.netns)
}

/// Starts holding afresh from the socket's current state.
#[inline(always)]
fn clear_held(entry: &mut SocketEntry) {
    entry.held.count = 0;
    entry.held.error = 0;
    entry.held.from_state = entry.owner.state;
    entry.held.from_closed_held = entry.owner.closed_held;
    entry.held.from_since_ns = entry.owner.state_since_ns;
}

#[tracepoint(category = "tcp", name = "tcp_retransmit_skb")]
pub fn tcp_retransmit_skb(ctx: TracePointContext) -> u32 {
    let offset = usize::from(config().layout.retransmit_skaddr);
    // SAFETY: bpf_probe_read of the tracepoint record.
    if let Ok(sk) = unsafe { ctx.read_at::<u64>(offset) } {
        on_retransmit::<HashStore>(sk as *const c_void);
    }
    0
}

#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn tcp_retransmit_skb_btf(ctx: BtfTracePointContext) -> u32 {
    on_retransmit::<TieredStore>(ctx.arg(0));
    0
}

/// A retransmission: the peer has not answered for a timeout. A socket
/// that holds transitions (a SYN, a FIN) reports them now, so that one
/// stuck in a handshake or a close is in view within that timeout. (A run
/// the kernel skips here costs nothing: the next retransmission reports.)
#[inline(always)]
fn on_retransmit<S: SocketStore>(sk: *const c_void) {
    let Some(entry) = S::get(sk).filter(|entry| entry.held.count != 0) else {
        return;
    };
    let layout = &config().layout;
    let endpoints = sock::endpoints(layout, sk.cast(), Reader::Retransmit);
    // A full ring leaves them held: the next transition or retransmission
    // reports them.
    let _ = report(sk as u64, entry, endpoints, ktime_ns());
}

#[tracepoint(category = "tcp", name = "tcp_destroy_sock")]
pub fn tcp_destroy_sock(ctx: TracePointContext) -> u32 {
    let offset = usize::from(config().layout.destroy_skaddr);
    // SAFETY: bpf_probe_read of the tracepoint record.
    if let Ok(sk) = unsafe { ctx.read_at::<u64>(offset) } {
        let sk = sk as *const c_void;
        if let Some(entry) = HashStore::get(sk) {
            on_destroy(sk, entry, Reader::Destroy);
        }
        HashStore::done(sk);
    }
    0
}

#[btf_tracepoint(function = "tcp_destroy_sock")]
pub fn tcp_destroy_sock_btf(ctx: BtfTracePointContext) -> u32 {
    let sk: *const c_void = ctx.arg(0);
    let _running = Running::start(Partner::Destroy, Event::destroy(sk));
    on_destroy_btf(sk, Reader::Destroy);
    0
}

/// See `inet_sock_set_state_btf_nested`; the first program removes the
/// entry of a socket it releases, or marks it (state 0) in storage. A
/// destroy matters only for a socket with an entry (a release is said only
/// for one), and for those the entry tells whether the first program took
/// it: every skip that could lose something is made up for here, so the
/// collector does not count the first program's skips (and this one counts
/// no rescues).
#[btf_tracepoint(function = "tcp_destroy_sock")]
pub fn tcp_destroy_sock_btf_nested(ctx: BtfTracePointContext) -> u32 {
    let sk: *const c_void = ctx.arg(0);
    let skipped = Running::skipped(Partner::Destroy, Event::destroy(sk))
        .unwrap_or_else(|| TieredStore::peek(sk).is_some_and(|known| known.owner.state != 0));
    if skipped {
        on_destroy_btf(sk, Reader::DestroyNested);
    }
    0
}

#[inline(always)]
fn on_destroy_btf(sk: *const c_void, reader: Reader) {
    // A socket found at start with no event since is still in SEEDED.
    match TieredStore::get_or_seeded(sk) {
        Some(entry) => {
            on_destroy(sk, entry, reader);
            // Released, for the nested program (storage stays readable
            // until the socket's free).
            entry.owner.state = 0;
            // What accept() or the collector left in SEEDED for a socket
            // whose entry named its owner already goes with it.
            if entry.passive != 0 || entry.owner.source == OwnerSource::ProcFd as u8 {
                forget_seeded(sk as u64);
            }
        }
        None => forget_seeded(sk as u64),
    }
    TieredStore::forget(sk);
}

/// The socket is freed: what it still holds is reported (its CLOSE was,
/// unless the ring buffer was full then), and if a file held it after
/// CLOSE, who let go is said. For a socket closed while held, the kernel
/// destroys it in the release of its last file, in that task's context
/// (close(), or the fds closed at exit).
#[inline(always)]
fn on_destroy(sk: *const c_void, entry: &mut SocketEntry, reader: Reader) {
    let config = config();
    let now = ktime_ns();
    if entry.held.count != 0
        && !report(
            sk as u64,
            entry,
            sock::endpoints(&config.layout, sk.cast(), reader),
            now,
        )
    {
        bump(counter::LOST_EVENTS);
    }
    let owner = entry.owner;
    // Any other entry is one whose CLOSE was never seen, or that closed
    // with no file left.
    if owner.closed_held == 0 || owner.state != tcp_state::CLOSE {
        return;
    }
    let Ok(endpoints) = sock::endpoints(&config.layout, sk.cast(), reader) else {
        return;
    };
    if !wanted(&endpoints, &owner) {
        return;
    }
    let mut header = header_at(EventKind::Release, sk as u64, now);
    // socktrace's own file-table scan let go last (see `claim_owner`): the
    // release is the owner's, which the collector names when none is sent.
    if header.current_tgid == config.self_tgid {
        header.current_tgid = 0;
    }
    emit(ReleaseEvent {
        header,
        owner,
        endpoints,
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

/// This CPU's record of a partnered program: see [`Running`].
pub struct PartnerRuns {
    /// Runs under way: one, or none.
    under_way: u32,
    _pad: u32,
    /// The event the last finished run was for, until its partner sees it
    /// (a socket 0 then).
    finished: Event,
}

/// A socket's address, and for a state change its old and new state.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Event {
    sk: u64,
    states: (u8, u8),
}

impl Event {
    #[inline(always)]
    fn destroy(sk: *const c_void) -> Self {
        Self {
            sk: sk as u64,
            states: (0, 0),
        }
    }
}

/// A run of a partnered program, counted on this CPU for as long as it
/// lasts, and marked finished for its event at the end. The slot is this
/// CPU's: only an interrupt on the same CPU comes between its loads and
/// stores (the cases the partner's checks allow for), so no atomics.
struct Running {
    program: Partner,
    event: Event,
}

impl Running {
    #[inline(always)]
    fn start(program: Partner, event: Event) -> Self {
        if let Some(runs) = RUNNING.get_ptr_mut(program as u32) {
            // SAFETY: this CPU's slot.
            unsafe { (*runs).under_way += 1 };
        }
        Self { program, event }
    }

    /// For the partner: whether the kernel skipped `program`'s run for
    /// `event` (a run is under way on this CPU) or not (the last run
    /// finished this event), or `None` when this CPU's slot cannot tell and
    /// the socket's entry must. A finished mark is taken: an event seen
    /// twice is the same socket's next one.
    #[inline(always)]
    fn skipped(program: Partner, event: Event) -> Option<bool> {
        // SAFETY: this CPU's slot.
        let runs = unsafe { &mut *RUNNING.get_ptr_mut(program as u32)? };
        if runs.under_way > 0 {
            Some(true)
        } else if runs.finished == event {
            runs.finished.sk = 0;
            Some(false)
        } else {
            None
        }
    }
}

impl Drop for Running {
    #[inline(always)]
    fn drop(&mut self) {
        if let Some(runs) = RUNNING.get_ptr_mut(self.program as u32) {
            // SAFETY: this CPU's slot.
            let runs = unsafe { &mut *runs };
            runs.under_way = runs.under_way.saturating_sub(1);
            runs.finished = self.event;
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
