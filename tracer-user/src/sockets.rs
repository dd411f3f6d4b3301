//! Stage 3: per-socket state. Turns kernel events into transitions attributed
//! to the process that holds the socket.
//!
//! The kernel sends a socket's transitions in records of one or several,
//! stamped with the owner it learned in process context; this stage hands
//! them on one by one. It covers what the kernel cannot know:
//! - sockets that predate socktrace (seeded from the socket-file iterator),
//! - transitions that happen before anyone owns the socket (a passive open
//!   completes before accept()): they are held back until the owner is known,
//! - sockets whose owner exited while another process (a forked child) still
//!   holds them: re-homed from the kernel's file tables.
//!
//! A socket lives here until its last holder lets go of it, which for a
//! socket the network closed ([`TcpState::ClosedHeld`]) is its release.
//! Where no owner can be found the transition says so; it never names the
//! task that merely happened to be on the CPU.

use std::collections::{HashMap, VecDeque, hash_map::Entry};

use rustc_hash::{FxHashMap, FxHashSet};
use thin_vec::ThinVec;

use crate::{
    decode::Event,
    model::{Comm, ExistingSocket, Output, Owner, Run, Transition, one_per_socket},
    tcp::TcpState,
};

/// Passes on transitions that waited for their owner, under `owner`.
fn release(out: &mut Vec<Output>, pending: ThinVec<Transition>, owner: Owner) {
    out.extend(pending.into_iter().map(|mut t| {
        t.owner = owner;
        Output::Transition(t)
    }));
}

/// What the kernel knows that events do not carry, asked off the event path
/// (on ticks) only.
pub trait KernelView {
    /// A process holding each of these sockets, from the kernel's file
    /// tables (the lowest pid when several share one).
    fn holders(&mut self, sock_ids: &[u64]) -> HashMap<u64, (u32, Comm)>;
}

/// Holder lookups walk every process's files in the kernel: batch them, at
/// most one walk this often.
const MIN_LOOKUP_GAP_NS: u64 = 500_000_000;

/// A socket to look at again once a wait has run: `since_ns` is when the
/// wait began, and tells whether it is still the socket's current one.
#[derive(Clone, Copy)]
struct Wait {
    since_ns: u64,
    kernel_sock_id: u64,
}

/// Sockets whose transitions began waiting for an owner, so that ticks
/// need not scan them all: a host may hold 100k quiet connections. Waits
/// begin in about the order records come (the kernel holds a socket's
/// transitions for at most its hold), so a queue in arrival order is in due
/// order but for that: a wait queued behind a later one is seen that much
/// late.
struct Waits {
    owners: VecDeque<Wait>,
}

impl Waits {
    /// Removes and returns the oldest wait if it began `wait_ns` or more
    /// before `now_ns`. Popped one at a time, not collected: at 10k
    /// connections/s a tick finds thousands due.
    fn pop_due(&mut self, wait_ns: u64, now_ns: u64) -> Option<Wait> {
        let due = self.owners.front()?;
        if now_ns.saturating_sub(due.since_ns) < wait_ns {
            return None;
        }
        self.owners.pop_front()
    }
}

struct Tracked {
    owner: Option<Owner>,
    /// The exited owner this socket was re-homed from. The kernel may go on
    /// naming it (socket storage cannot be written from here) until the new
    /// holder's own system call claims the socket: not believed meanwhile.
    rehomed_from: Option<u32>,
    /// The owner was searched for and not found: stop holding events back.
    owner_search_done: bool,
    state: TcpState,
    /// When it entered `state` (ktime ns).
    state_since_ns: u64,
    /// Transitions waiting for an owner, oldest first. A thin vector (one
    /// pointer, no allocation while empty): few sockets ever wait, and a
    /// server may track 100k of them.
    pending: ThinVec<Transition>,
}

pub struct SocketTable {
    /// Looked up for every event: a fast hash for kernel addresses.
    sockets: FxHashMap<u64, Tracked>,
    /// Live sockets per owner, to know whose exits matter.
    owned: FxHashMap<u32, u32>,
    /// Sockets whose owner exited, with the time to look for a new holder.
    orphans: Vec<(u64, u64)>,
    /// Sockets due a holder lookup, batched until the next walk.
    lookups: Vec<u64>,
    last_lookup_ns: u64,
    /// How long transitions may wait for their owner.
    owner_grace_ns: u64,
    /// How long after an owner's exit to look for the socket's new holder:
    /// the exiting process closes its fds just after the exit event, and
    /// the kernel may hold those transitions for its hold.
    rehome_delay_ns: u64,
    waits: Waits,
    /// Disagreements with the file tables at the last look.
    suspects: Suspects,
    /// See [`Self::ends_unseen`].
    ends_unseen: u64,
    out: Vec<Output>,
}

/// How long after a first look at the file tables a disagreement is
/// believed: the kernel holds a step for at most about a second, and the
/// ring is drained every tenth of one.
const SECOND_LOOK_NS: u64 = 2_000_000_000;

/// A disagreement with the file tables, first seen at `since_ns`, while the
/// socket was in the state it entered at `state_since_ns`.
#[derive(Clone, Copy)]
struct Suspect {
    since_ns: u64,
    state_since_ns: u64,
}

impl Suspect {
    fn is_due(&self, now_ns: u64) -> bool {
        now_ns.saturating_sub(self.since_ns) >= SECOND_LOOK_NS
    }
}

/// Whether the disagreement about `sock_id` seen at `now_ns`, with the
/// socket in the state it entered at `state_since_ns`, was seen in that
/// same state at an earlier look long enough ago; if not, it goes into
/// `suspects` for the next look, dated from its first sighting in that
/// state.
fn confirmed(
    earlier: &FxHashMap<u64, Suspect>,
    suspects: &mut FxHashMap<u64, Suspect>,
    sock_id: u64,
    state_since_ns: u64,
    now_ns: u64,
) -> bool {
    let first = earlier
        .get(&sock_id)
        .filter(|first| first.state_since_ns == state_since_ns);
    if first.is_some_and(|first| first.is_due(now_ns)) {
        return true;
    }
    let since_ns = first.map_or(now_ns, |first| first.since_ns);
    suspects.insert(
        sock_id,
        Suspect {
            since_ns,
            state_since_ns,
        },
    );
    false
}

/// See [`SocketTable::reconcile`].
#[derive(Default)]
struct Suspects {
    /// Tracked as held, held by no file.
    gone: FxHashMap<u64, Suspect>,
    /// Held by a file, not tracked.
    found: FxHashMap<u64, Suspect>,
}

/// How long a socket stage waits for what comes late.
#[derive(Clone, Copy, Debug)]
pub struct Delays {
    /// How long transitions may wait for their owner.
    pub owner_grace_ns: u64,
    /// After an owner's exit, when to look for the socket's new holder.
    pub rehome_ns: u64,
}

impl SocketTable {
    pub fn new(delays: Delays) -> Self {
        Self {
            sockets: FxHashMap::default(),
            owned: FxHashMap::default(),
            orphans: Vec::new(),
            lookups: Vec::new(),
            last_lookup_ns: 0,
            owner_grace_ns: delays.owner_grace_ns,
            rehome_delay_ns: delays.rehome_ns,
            waits: Waits {
                owners: VecDeque::new(),
            },
            suspects: Suspects::default(),
            ends_unseen: 0,
            out: Vec::new(),
        }
    }

    /// Registers the sockets found at start, but for the unconnected ones
    /// (no connection yet). The iterator that found them has already named
    /// their holders in the kernel's socket map.
    pub fn seed(&mut self, sockets: impl IntoIterator<Item = ExistingSocket>) {
        for socket in sockets.into_iter().filter(|s| !s.is_unconnected()) {
            if self.track_existing(&socket) {
                self.out.push(Output::Existing(socket));
            }
        }
    }

    /// Tracks a socket that exists under its holder, unless it is tracked
    /// already; whether it was new.
    fn track_existing(&mut self, socket: &ExistingSocket) -> bool {
        let Entry::Vacant(entry) = self.sockets.entry(socket.sock_id) else {
            return false;
        };
        Self::move_ownership(&mut self.owned, None, Some(&socket.owner));
        entry.insert(Tracked {
            owner: Some(socket.owner),
            rehomed_from: None,
            owner_search_done: true,
            state: socket.state,
            state_since_ns: 0,
            pending: ThinVec::new(),
        });
        true
    }

    /// Sockets found ended without their end seen, when a new socket
    /// started at their address: a loss no other counter has.
    pub fn ends_unseen(&self) -> u64 {
        self.ends_unseen
    }

    /// Everything produced since the queue was last cleared, oldest first.
    pub fn output_queue(&mut self) -> &mut Vec<Output> {
        &mut self.out
    }

    #[cfg(test)]
    fn drain_output(&mut self) -> std::vec::Drain<'_, Output> {
        self.out.drain(..)
    }

    /// Frees the output queue's room once drained: seeding fills it with one
    /// entry per existing socket, far more than events ever need.
    pub fn shrink_output(&mut self) {
        self.out.shrink_to_fit();
    }

    pub fn on_event(&mut self, event: Event) {
        match event {
            Event::StateChanges {
                ktime_ns,
                sock_id,
                owner,
                local,
                remote,
                from,
                from_since_ns,
                steps,
                cause,
                netns: _,
            } => {
                let run = Run {
                    sock_id,
                    owner: owner.unwrap_or_else(Owner::unknown),
                    local,
                    remote,
                    from,
                    from_since_ns,
                    steps,
                    cause,
                };
                for mut transition in run.transitions() {
                    transition.owner = Owner::unknown();
                    self.on_state_change(transition, owner);
                }
                // News of the owner alone (accept(), for `trace`).
                if run.steps.is_empty()
                    && let Some(owner) = owner
                    && self
                        .sockets
                        .get(&sock_id)
                        .is_some_and(|t| t.owner != Some(owner) && t.rehomed_from != owner.pid)
                {
                    self.set_owner(sock_id, owner, ktime_ns);
                }
            }
            Event::Exit { ktime_ns, tgid } => self.on_exit(tgid, ktime_ns),
            Event::Release {
                ktime_ns,
                sock_id,
                releaser,
                local,
                remote,
                held_ns,
            } => {
                let release = Transition {
                    ktime_ns,
                    sock_id,
                    owner: Owner::unknown(),
                    local,
                    remote,
                    old: TcpState::ClosedHeld,
                    new: TcpState::Close,
                    dwell_ns: held_ns,
                    cause: None,
                };
                self.on_release(release, releaser);
            }
        }
    }

    fn on_state_change(&mut self, t: Transition, kernel_owner: Option<Owner>) {
        let starts = TcpState::starts_a_socket(t.old, t.new);
        let kernel_sock_id = t.sock_id;
        let fresh = || Tracked {
            owner: None,
            rehomed_from: None,
            owner_search_done: false,
            // Before `t` applies; when it entered that state is unknown.
            state: t.old,
            state_since_ns: 0,
            pending: ThinVec::new(),
        };
        // One lookup on the common path: this runs for every event.
        let tracked = match self.sockets.entry(kernel_sock_id) {
            Entry::Occupied(entry) if !starts => entry.into_mut(),
            // A new socket where one whose CLOSE was lost lived, or a new
            // life of one that closed while held.
            Entry::Occupied(mut entry) => {
                let stale = entry.insert(fresh());
                // Only a socket closed while held lives on after CLOSE: any
                // other ended without its end reaching us, and no loss was
                // counted for it. Counted now, it makes healing look for
                // others like it.
                if stale.state != TcpState::ClosedHeld {
                    self.ends_unseen += 1;
                    log::debug!(
                        "socket {kernel_sock_id:#x} started again ({} -> {}) while {} under {:?} since {} ns: its end was not seen",
                        t.old,
                        t.new,
                        stale.state,
                        stale.owner,
                        stale.state_since_ns
                    );
                }
                Self::move_ownership(&mut self.owned, stale.owner.as_ref(), None);
                entry.into_mut()
            }
            Entry::Vacant(entry) => entry.insert(fresh()),
        };
        let (out, owned, waits) = (&mut self.out, &mut self.owned, &mut self.waits);
        if Self::advance(tracked, kernel_sock_id, out, owned, waits, t, kernel_owner) {
            self.untrack(kernel_sock_id);
        }
    }

    /// The last holder of a socket the network had closed let go of it: its
    /// lifetime ends, under the process that released it.
    fn on_release(&mut self, mut transition: Transition, releaser: Option<Owner>) {
        let sock_id = transition.sock_id;
        let Some(tracked) = self.sockets.get_mut(&sock_id) else {
            return;
        };
        let owner = releaser.or(tracked.owner).unwrap_or_else(Owner::unknown);
        let pending = std::mem::take(&mut tracked.pending);
        release(&mut self.out, pending, owner);
        transition.owner = owner;
        self.out.push(Output::Transition(transition));
        self.untrack(sock_id);
    }

    /// Applies `t` to its socket and passes it on, or holds it until the
    /// owner is known. Returns whether the socket ended.
    fn advance(
        tracked: &mut Tracked,
        kernel_sock_id: u64,
        out: &mut Vec<Output>,
        owned: &mut FxHashMap<u32, u32>,
        waits: &mut Waits,
        mut t: Transition,
        kernel_owner: Option<Owner>,
    ) -> bool {
        tracked.state = t.new;
        tracked.state_since_ns = t.ktime_ns;
        // A socket closed while held lives on until its release.
        let ended = t.new == TcpState::Close;
        let stale = kernel_owner
            .is_some_and(|owner| owner.pid.is_some() && owner.pid == tracked.rehomed_from);
        if let Some(owner) = kernel_owner.filter(|_| !stale)
            && tracked.owner.as_ref() != Some(&owner)
        {
            let previous = tracked.owner.replace(owner);
            Self::move_ownership(owned, previous.as_ref(), Some(&owner));
        }
        let release_as = match &tracked.owner {
            Some(owner) => Some(*owner),
            None if tracked.owner_search_done || ended => Some(Owner::unknown()),
            None => None,
        };
        match release_as {
            Some(owner) => {
                if !tracked.pending.is_empty() {
                    release(out, std::mem::take(&mut tracked.pending), owner);
                }
                t.owner = owner;
                out.push(Output::Transition(t));
            }
            None => {
                if tracked.pending.is_empty() {
                    waits.owners.push_back(Wait {
                        since_ns: t.ktime_ns,
                        kernel_sock_id,
                    });
                }
                // Room for exactly what waits, mostly one or two
                // transitions (a passive open before accept()), not the
                // four a first push reserves: a burst of 50k connections
                // not yet accepted would take 28 MB for a moment.
                tracked.pending.reserve_exact(1);
                tracked.pending.push(t);
            }
        }
        ended
    }

    fn untrack(&mut self, sock_id: u64) {
        if let Some(gone) = self.sockets.remove(&sock_id) {
            Self::move_ownership(&mut self.owned, gone.owner.as_ref(), None);
        }
    }

    fn set_owner(&mut self, sock_id: u64, owner: Owner, ktime_ns: u64) {
        let Some(tracked) = self.sockets.get_mut(&sock_id) else {
            return;
        };
        let previous = tracked.owner.replace(owner);
        // Its earlier transitions went out under another owner, or none.
        let shown_before = tracked.pending.is_empty() && previous != Some(owner);
        Self::move_ownership(&mut self.owned, previous.as_ref(), Some(&owner));
        let pending = std::mem::take(&mut tracked.pending);
        release(&mut self.out, pending, owner);
        if shown_before {
            self.out.push(Output::OwnerChanged {
                sock_id,
                owner,
                ktime_ns,
            });
        }
    }

    fn move_ownership(owned: &mut FxHashMap<u32, u32>, from: Option<&Owner>, to: Option<&Owner>) {
        if let Some(pid) = from.and_then(|o| o.pid)
            && let Some(count) = owned.get_mut(&pid)
        {
            *count -= 1;
            if *count == 0 {
                owned.remove(&pid);
            }
        }
        if let Some(pid) = to.and_then(|o| o.pid) {
            *owned.entry(pid).or_default() += 1;
        }
    }

    fn on_exit(&mut self, tgid: u32, ktime_ns: u64) {
        self.out.push(Output::ProcessExit {
            pid: tgid,
            ktime_ns,
        });
        if !self.owned.contains_key(&tgid) {
            return;
        }
        let deadline = ktime_ns + self.rehome_delay_ns;
        for (&sock_id, tracked) in &self.sockets {
            if tracked.owner.as_ref().and_then(|o| o.pid) == Some(tgid) {
                self.orphans.push((sock_id, deadline));
            }
        }
    }

    /// Periodic work off the event path: owners for sockets that waited
    /// too long, and new holders for sockets whose owner exited.
    pub fn tick(&mut self, now_ns: u64, kernel: &mut dyn KernelView) {
        let (sockets, lookups) = (&self.sockets, &mut self.lookups);
        self.orphans.retain(|&(sock_id, deadline)| {
            if deadline > now_ns {
                return true;
            }
            // The exiting process closed its fds by now: a socket it was the
            // last holder of has moved on (FIN_WAIT1, LAST_ACK) or gone.
            if sockets.get(&sock_id).is_some_and(|t| t.state.is_held()) {
                lookups.push(sock_id);
            }
            false
        });
        while let Some(wait) = self.waits.pop_due(self.owner_grace_ns, now_ns) {
            // Only if the transitions that began the wait still wait.
            let first_pending = self
                .sockets
                .get(&wait.kernel_sock_id)
                .and_then(|tracked| tracked.pending.first());
            if first_pending.is_some_and(|t| t.ktime_ns == wait.since_ns) {
                self.lookups.push(wait.kernel_sock_id);
            }
        }
        // At the end of a run (now_ns = u64::MAX) nothing may wait longer.
        let gap_ok = now_ns.saturating_sub(self.last_lookup_ns) >= MIN_LOOKUP_GAP_NS;
        if self.lookups.is_empty() || !gap_ok {
            return;
        }
        self.last_lookup_ns = now_ns;
        let mut wanted = std::mem::take(&mut self.lookups);
        wanted.sort_unstable();
        wanted.dedup();
        let found = kernel.holders(&wanted);
        log::debug!(
            "looked up the holders of {} sockets: {} found",
            wanted.len(),
            found.len()
        );
        for sock_id in wanted {
            let Some(tracked) = self.sockets.get_mut(&sock_id) else {
                continue;
            };
            tracked.owner_search_done = true;
            let state = tracked.state;
            match found.get(&sock_id) {
                Some(&(pid, comm)) => {
                    tracked.rehomed_from = tracked
                        .owner
                        .and_then(|owner| owner.pid)
                        .filter(|&previous| previous != pid);
                    self.out.push(Output::LearnedOwner {
                        kernel_sock_id: sock_id,
                        pid,
                        comm: comm.to_string(),
                        state,
                    });
                    self.set_owner(sock_id, Owner::holder(pid, comm), now_ns);
                }
                None => {
                    let previous = tracked.owner.take();
                    Self::move_ownership(&mut self.owned, previous.as_ref(), None);
                    let pending = std::mem::take(&mut tracked.pending);
                    release(&mut self.out, pending, Owner::unknown());
                }
            }
        }
    }

    /// Heals what lost events left wrong, from `files`, the kernel's own
    /// view of who holds which socket: sockets tracked as held that no file
    /// holds are gone, held sockets never seen are found. Sockets still
    /// waiting for their owner (a passive open before accept(), which no
    /// file holds yet) are left alone.
    ///
    /// A disagreement may only be news still on its way (a socket opened or
    /// closed since the last drain, or a step the kernel holds), so it is
    /// repaired at a later look that sees it again, [`SECOND_LOOK_NS`] or
    /// more after the first, with no event of that socket between. Returns
    /// how many were repaired.
    pub fn reconcile(&mut self, files: Vec<ExistingSocket>, now_ns: u64) -> usize {
        let found = one_per_socket(files);
        let held: FxHashSet<u64> = found.iter().map(|s| s.sock_id).collect();
        let earlier = std::mem::take(&mut self.suspects);
        let mut gone = Vec::new();
        for (&sock_id, tracked) in &self.sockets {
            let unheld = tracked.state.is_held()
                && tracked.state != TcpState::SynRecv
                && tracked.owner.is_some()
                && !held.contains(&sock_id);
            if !unheld {
                continue;
            }
            let (earlier, suspects) = (&earlier.gone, &mut self.suspects.gone);
            if confirmed(earlier, suspects, sock_id, tracked.state_since_ns, now_ns) {
                gone.push(sock_id);
            }
        }
        for &sock_id in &gone {
            self.untrack(sock_id);
            self.out.push(Output::Gone {
                sock_id,
                ktime_ns: now_ns,
            });
        }
        let mut repaired = gone.len();
        for socket in found {
            if socket.is_unconnected() || self.sockets.contains_key(&socket.sock_id) {
                continue;
            }
            // Untracked at both looks: no event of it came between.
            let (earlier, suspects) = (&earlier.found, &mut self.suspects.found);
            if confirmed(earlier, suspects, socket.sock_id, 0, now_ns) {
                self.track_existing(&socket);
                self.out.push(Output::Found(socket));
                repaired += 1;
            }
        }
        repaired
    }

    /// Whether a disagreement with the file tables that no event has
    /// explained since waits for its second look, due at `now_ns`.
    pub fn second_look_due(&self, now_ns: u64) -> bool {
        let unexplained_gone = self.suspects.gone.iter().any(|(sock_id, suspect)| {
            suspect.is_due(now_ns)
                && self
                    .sockets
                    .get(sock_id)
                    .is_some_and(|tracked| tracked.state_since_ns == suspect.state_since_ns)
        });
        unexplained_gone
            || (self.suspects.found.iter()).any(|(sock_id, suspect)| {
                suspect.is_due(now_ns) && !self.sockets.contains_key(sock_id)
            })
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.sockets.len()
    }
}

#[cfg(test)]
mod tests {
    use tracer_common::OwnerSource;

    use std::net::SocketAddr;

    use super::*;
    use crate::model::Step;
    use crate::tcp::{CloseCause, TcpState::*};

    const SERVER: u32 = 100;
    const CLIENT: u32 = 200;
    const MS: u64 = 1_000_000;
    const NETNS: u32 = 4026531840;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn kernel_owner(tgid: u32, comm: &str, source: OwnerSource) -> Option<Owner> {
        Some(Owner {
            pid: Some(tgid),
            nspid: None,
            source,
            comm: comm.into(),
        })
    }

    /// A record of the kernel's: `steps` (ktime, state) from `from`,
    /// entered at `from_since_ns` (0: unknown).
    fn record(
        sock_id: u64,
        owner: Option<Owner>,
        local: &str,
        remote: &str,
        (from, from_since_ns): (TcpState, u64),
        steps: &[(u64, TcpState)],
    ) -> Event {
        Event::StateChanges {
            ktime_ns: steps.last().map_or(from_since_ns, |step| step.0),
            sock_id,
            owner,
            local: addr(local),
            remote: addr(remote),
            from,
            from_since_ns: (from_since_ns != 0).then_some(from_since_ns),
            steps: steps
                .iter()
                .map(|&(at_ns, state)| Step { at_ns, state })
                .collect(),
            cause: None,
            netns: NETNS,
        }
    }

    /// One transition, reported as it happened (as `trace` gets them).
    fn change(
        ktime_ns: u64,
        sock_id: u64,
        owner: Option<Owner>,
        local: &str,
        remote: &str,
        old: TcpState,
        new: TcpState,
    ) -> Event {
        record(sock_id, owner, local, remote, (old, 0), &[(ktime_ns, new)])
    }

    /// News of a socket's owner alone: what accept() sends.
    fn owner_news(ktime_ns: u64, sock_id: u64, owner: Option<Owner>) -> Event {
        let mut event = record(
            sock_id,
            owner,
            "127.0.0.1:8080",
            "127.0.0.1:40000",
            (SynRecv, 0),
            &[],
        );
        if let Event::StateChanges { ktime_ns: at, .. } = &mut event {
            *at = ktime_ns;
        }
        event
    }

    fn table() -> SocketTable {
        SocketTable::new(Delays {
            owner_grace_ns: 1_000 * MS,
            rehome_ns: 100 * MS,
        })
    }

    /// A socket the kernel's file tables show the client holding.
    fn held_by_client(sock_id: u64, local: &str, remote: &str, state: TcpState) -> ExistingSocket {
        ExistingSocket {
            sock_id,
            owner: Owner::holder(CLIENT, "client".into()),
            local: addr(local),
            remote: addr(remote),
            state,
            cause: None,
            netns: NETNS,
        }
    }

    fn unknown() -> Option<Owner> {
        None
    }

    fn transitions(table: &mut SocketTable) -> Vec<Transition> {
        table
            .drain_output()
            .filter_map(|o| match o {
                Output::Transition(t) => Some(t),
                _ => None,
            })
            .collect()
    }

    /// The kernel's file tables, as far as a test sets them.
    #[derive(Default)]
    struct FakeKernel {
        holders: HashMap<u64, (u32, Comm)>,
        /// The sockets of each holder lookup.
        lookups: Vec<Vec<u64>>,
    }

    impl KernelView for FakeKernel {
        fn holders(&mut self, sock_ids: &[u64]) -> HashMap<u64, (u32, Comm)> {
            self.lookups.push(sock_ids.to_vec());
            sock_ids
                .iter()
                .filter_map(|id| self.holders.get(id).map(|holder| (*id, *holder)))
                .collect()
        }
    }

    const CLIENT_AT: &str = "127.0.0.1:40000";
    const SERVER_AT: &str = "127.0.0.1:8080";

    /// The client's connect() on socket 9 (its port is not assigned yet).
    fn connect(at_ns: u64) -> Event {
        let client = kernel_owner(CLIENT, "client", OwnerSource::Connect);
        change(at_ns, 9, client, "0.0.0.0:0", SERVER_AT, Close, SynSent)
    }

    /// A later transition of socket 9, after `dwell_ns` in `old`.
    fn client_change(at_ns: u64, dwell_ns: u64, old: TcpState, new: TcpState) -> Event {
        let client = kernel_owner(CLIENT, "client", OwnerSource::Connect);
        let since = (old, at_ns - dwell_ns);
        record(9, client, CLIENT_AT, SERVER_AT, since, &[(at_ns, new)])
    }

    fn steps(out: &[Transition]) -> Vec<(u64, TcpState, TcpState, Option<u64>)> {
        out.iter()
            .map(|t| (t.ktime_ns / MS, t.old, t.new, t.dwell_ns.map(|d| d / MS)))
            .collect()
    }

    #[test]
    fn passive_open_waits_for_accept_then_carries_the_acceptor() {
        let mut table = table();
        let (local, remote) = ("127.0.0.1:8080", "127.0.0.1:40000");
        // The handshake completes in softirq, in the client's context: the
        // kernel knows no owner yet.
        table.on_event(change(1, 7, unknown(), local, remote, Listen, SynRecv));
        table.on_event(change(2, 7, unknown(), local, remote, SynRecv, Established));
        assert!(
            transitions(&mut table).is_empty(),
            "held back until the owner is known"
        );
        table.on_event(owner_news(
            3,
            7,
            kernel_owner(SERVER, "server", OwnerSource::Accept),
        ));
        let out = transitions(&mut table);
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|t| t.owner.pid == Some(SERVER)));
        assert_eq!(out[1].new, Established);
        // Its owner known, nobody searches the file tables after the grace.
        let mut kernel = FakeKernel::default();
        table.tick(2_000 * MS, &mut kernel);
        assert!(kernel.lookups.is_empty(), "searched: {:?}", kernel.lookups);
    }

    #[test]
    fn unaccepted_socket_is_released_as_unknown_after_the_grace_period() {
        let mut table = table();
        let (local, remote) = ("127.0.0.1:8080", "127.0.0.1:40000");
        table.on_event(change(0, 7, unknown(), local, remote, Listen, SynRecv));
        let mut kernel = FakeKernel::default();
        table.tick(500 * MS, &mut kernel);
        assert!(transitions(&mut table).is_empty());
        table.tick(1_000 * MS, &mut kernel);
        let out = transitions(&mut table);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].owner, Owner::unknown());
        // Once searched, later transitions are not held back again.
        table.on_event(change(
            2_000 * MS,
            7,
            unknown(),
            local,
            remote,
            SynRecv,
            Established,
        ));
        assert_eq!(transitions(&mut table).len(), 1);
    }

    #[test]
    fn accept_after_the_grace_period_announces_the_owner() {
        let mut table = table();
        let (local, remote) = ("127.0.0.1:8080", "127.0.0.1:40000");
        table.on_event(change(0, 7, unknown(), local, remote, Listen, SynRecv));
        table.tick(2_000 * MS, &mut FakeKernel::default());
        assert_eq!(transitions(&mut table)[0].owner, Owner::unknown());
        table.on_event(owner_news(
            3_000 * MS,
            7,
            kernel_owner(SERVER, "server", OwnerSource::Accept),
        ));
        let out: Vec<_> = table.drain_output().collect();
        assert!(
            matches!(
                out[..],
                [Output::OwnerChanged {
                    sock_id: 7,
                    owner: Owner {
                        pid: Some(SERVER),
                        ..
                    },
                    ..
                }]
            ),
            "{out:?}"
        );
    }

    #[test]
    fn kernel_owner_is_kept_for_softirq_transitions() {
        let mut table = table();
        let client = kernel_owner(CLIENT, "client", OwnerSource::Connect);
        let (local, remote) = ("127.0.0.1:40000", "127.0.0.1:8080");
        table.on_event(change(1, 9, client, "0.0.0.0:0", remote, Close, SynSent));
        table.on_event(change(2, 9, client, local, remote, SynSent, Established));
        table.on_event(change(3, 9, client, local, remote, Established, CloseWait));
        let out = transitions(&mut table);
        assert_eq!(out.len(), 3);
        assert!(out.iter().all(|t| t.owner.pid == Some(CLIENT)));
    }

    #[test]
    fn seeded_socket_keeps_its_owner_and_identity() {
        let mut table = table();
        let (local, remote) = ("127.0.0.1:40000", "127.0.0.1:8080");
        table.seed([held_by_client(0xffff_0001, local, remote, CloseWait)]);
        let first = table.drain_output().collect::<Vec<_>>();
        assert!(matches!(first[..], [Output::Existing(_)]));
        // The kernel map knows nothing more of it than the iterator told it.
        table.on_event(change(
            5,
            0xffff_0001,
            unknown(),
            local,
            remote,
            CloseWait,
            LastAck,
        ));
        let out = transitions(&mut table);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].sock_id, 0xffff_0001);
        assert_eq!(out[0].owner.pid, Some(CLIENT));
        assert_eq!(out[0].owner.source, OwnerSource::ProcFd);
    }

    #[test]
    fn unconnected_sockets_are_neither_seeded_nor_found() {
        let mut table = table();
        let unconnected = || held_by_client(0xffff_0002, "0.0.0.0:0", "0.0.0.0:0", ClosedHeld);
        table.seed([unconnected()]);
        assert_eq!(table.drain_output().count(), 0);
        assert_eq!(table.len(), 0);
        // Nor at the heal's second look.
        for at_s in [1, 3] {
            assert_eq!(table.reconcile(vec![unconnected()], at_s * 1_000 * MS), 0);
        }
        assert_eq!(table.len(), 0);
    }

    /// The client of a connection the peer reset, holding the fd.
    fn closed_while_held(table: &mut SocketTable) {
        table.on_event(connect(MS));
        table.on_event(client_change(2 * MS, MS, SynSent, Established));
        let mut reset = client_change(50 * MS, 48 * MS, Established, ClosedHeld);
        if let Event::StateChanges { cause, .. } = &mut reset {
            *cause = Some(CloseCause::Reset);
        }
        table.on_event(reset);
    }

    #[test]
    fn a_socket_closed_while_held_lives_until_its_release() {
        let mut table = table();
        closed_while_held(&mut table);
        let out = transitions(&mut table);
        assert_eq!(out[2].new, ClosedHeld);
        assert_eq!(out[2].cause, Some(CloseCause::Reset));
        assert_eq!(table.len(), 1, "still held");
        table.on_event(Event::Release {
            ktime_ns: 2_050 * MS,
            sock_id: 9,
            releaser: kernel_owner(CLIENT, "client", OwnerSource::Close),
            local: addr(CLIENT_AT),
            remote: addr(SERVER_AT),
            held_ns: Some(2_000 * MS),
        });
        let out = transitions(&mut table);
        assert_eq!(steps(&out), [(2_050, ClosedHeld, Close, Some(2_000))]);
        assert_eq!(out[0].owner.source, OwnerSource::Close);
        assert_eq!(out[0].local, addr(CLIENT_AT), "the addresses it had");
        assert_eq!(table.len(), 0);
    }

    #[test]
    fn a_socket_closed_while_held_may_connect_again() {
        let mut table = table();
        closed_while_held(&mut table);
        table.on_event(client_change(60 * MS, 10 * MS, ClosedHeld, SynSent));
        let out = transitions(&mut table);
        assert_eq!(
            out.last().map(|t| (t.old, t.new)),
            Some((ClosedHeld, SynSent))
        );
        assert!(out.iter().all(|t| t.owner.pid == Some(CLIENT)));
        assert_eq!(table.len(), 1);
        assert_eq!(table.ends_unseen(), 0, "its CLOSE was seen");
    }

    #[test]
    fn a_socket_starting_where_an_open_one_is_tracked_counts_an_unseen_end() {
        let mut table = table();
        let client = kernel_owner(CLIENT, "client", OwnerSource::Connect);
        let (local, remote) = ("127.0.0.1:40000", "127.0.0.1:8080");
        table.on_event(change(1, 9, client, local, remote, Close, SynSent));
        table.on_event(change(2, 9, client, local, remote, SynSent, Established));
        // Its end never came; a new socket takes its address.
        table.on_event(change(3, 9, client, local, remote, Close, SynSent));
        assert_eq!(table.ends_unseen(), 1);
        assert_eq!(table.len(), 1, "only the new socket");
    }

    #[test]
    fn socket_of_an_exited_owner_is_rehomed_to_the_process_holding_it() {
        let mut table = table();
        let parent = kernel_owner(SERVER, "parent", OwnerSource::Connect);
        let (local, remote) = ("127.0.0.1:40000", "127.0.0.1:8080");
        table.on_event(change(1, 9, parent, local, remote, Close, SynSent));
        table.on_event(change(2, 9, parent, local, remote, SynSent, Established));
        // A second socket of the parent's, closed by its exit.
        table.on_event(change(
            2,
            10,
            parent,
            "127.0.0.1:40001",
            remote,
            SynSent,
            Established,
        ));
        table.on_event(Event::Exit {
            ktime_ns: 4 * MS,
            tgid: SERVER,
        });
        table.on_event(change(
            5 * MS,
            10,
            unknown(),
            "127.0.0.1:40001",
            remote,
            Established,
            FinWait1,
        ));
        let mut kernel = FakeKernel::default();
        kernel.holders.insert(9, (CLIENT, "child".into()));
        table.tick(50 * MS, &mut kernel);
        assert!(
            kernel.lookups.is_empty(),
            "waits for the exiting process to close its fds"
        );
        table.tick(600 * MS, &mut kernel);
        assert_eq!(
            kernel.lookups,
            vec![vec![9]],
            "only the socket still held is looked up"
        );
        let learned: Vec<_> = table
            .drain_output()
            .filter(|o| matches!(o, Output::LearnedOwner { pid: CLIENT, .. }))
            .collect();
        assert_eq!(learned.len(), 1);
        table.on_event(change(
            700 * MS,
            9,
            kernel_owner(CLIENT, "child", OwnerSource::ProcFd),
            local,
            remote,
            Established,
            CloseWait,
        ));
        assert_eq!(transitions(&mut table)[0].owner.pid, Some(CLIENT));
    }

    #[test]
    fn lost_events_are_healed_from_the_file_tables() {
        let mut table = table();
        // Socket 9 is held, but its end was lost; socket 7 waits for
        // accept(); socket 12 was opened while events were lost.
        closed_while_held(&mut table);
        table.on_event(change(
            5,
            7,
            unknown(),
            SERVER_AT,
            "127.0.0.1:40007",
            Listen,
            SynRecv,
        ));
        table.drain_output().for_each(drop);
        let lost_open = held_by_client(12, "127.0.0.1:40012", SERVER_AT, Established);
        // The first look only suspects; the second, two seconds on, repairs.
        assert_eq!(table.reconcile(vec![lost_open.clone()], 9 * MS), 0);
        assert_eq!(table.drain_output().count(), 0);
        assert!(!table.second_look_due(SECOND_LOOK_NS));
        assert!(table.second_look_due(9 * MS + SECOND_LOOK_NS));
        assert_eq!(table.reconcile(vec![lost_open], 9 * MS + SECOND_LOOK_NS), 2);
        assert!(!table.second_look_due(u64::MAX));
        let out: Vec<Output> = table.drain_output().collect();
        assert!(
            matches!(
                &out[..],
                [Output::Gone { sock_id: 9, .. }, Output::Found(found)] if found.sock_id == 12
            ),
            "{out:?}"
        );
        assert_eq!(table.len(), 2, "7 still waits for its owner; 12 is tracked");
    }

    /// What the ring still carried at the first look (a socket opened since
    /// the last drain, a close the kernel held back) is not taken for a
    /// loss: its events come before the second look.
    #[test]
    fn news_still_on_its_way_is_not_repaired() {
        let mut table = table();
        let client = kernel_owner(CLIENT, "client", OwnerSource::Connect);
        let (local, remote) = ("127.0.0.1:40009", SERVER_AT);
        table.on_event(change(1, 9, client, local, remote, SynSent, Established));
        table.drain_output().for_each(drop);
        // 9 was closed (its FIN_WAIT1 is held in the kernel); 12 was opened
        // after the last drain.
        let opened = held_by_client(12, "127.0.0.1:40012", SERVER_AT, Established);
        assert_eq!(table.reconcile(vec![opened.clone()], 10 * MS), 0);
        table.on_event(change(
            20 * MS,
            9,
            client,
            local,
            remote,
            Established,
            FinWait1,
        ));
        table.on_event(change(
            20 * MS,
            12,
            client,
            "127.0.0.1:40012",
            remote,
            SynSent,
            Established,
        ));
        let second = 10 * MS + SECOND_LOOK_NS;
        assert!(!table.second_look_due(second), "nothing left to look at");
        assert_eq!(table.reconcile(vec![opened], second), 0);
        assert!(
            table
                .drain_output()
                .all(|out| !matches!(out, Output::Gone { .. } | Output::Found(_))),
        );
    }

    #[test]
    fn holder_lookups_are_batched() {
        let mut table = table();
        let mut kernel = FakeKernel::default();
        for (id, at) in [(7, 0), (8, 200 * MS), (9, 400 * MS)] {
            table.on_event(change(
                at,
                id,
                unknown(),
                "127.0.0.1:8080",
                &format!("127.0.0.1:{}", 40_000 + id),
                Listen,
                SynRecv,
            ));
        }
        for tick in 10..=20 {
            table.tick(tick * 100 * MS, &mut kernel);
        }
        assert_eq!(kernel.lookups, vec![vec![7], vec![8, 9]]);
    }

    #[test]
    fn closed_socket_is_forgotten_and_address_reuse_starts_fresh() {
        let mut table = table();
        let client = kernel_owner(CLIENT, "client", OwnerSource::Connect);
        let (local, remote) = ("127.0.0.1:40000", "127.0.0.1:8080");
        table.on_event(change(1, 9, client, local, remote, Close, SynSent));
        table.on_event(change(2, 9, client, local, remote, SynSent, Close));
        assert_eq!(table.len(), 0);
        // Same kernel address, new socket born from a listener: no owner yet.
        table.on_event(change(
            3,
            9,
            unknown(),
            "127.0.0.1:8080",
            "127.0.0.1:5",
            Listen,
            SynRecv,
        ));
        assert!(transitions(&mut table).iter().all(|t| t.new != SynRecv));
    }

    #[test]
    fn a_socket_starting_where_one_whose_close_was_lost_lived_starts_fresh() {
        let mut table = table();
        let server = kernel_owner(SERVER, "server", OwnerSource::Accept);
        table.on_event(change(
            1,
            7,
            server,
            SERVER_AT,
            CLIENT_AT,
            SynRecv,
            Established,
        ));
        table.on_event(change(
            2,
            7,
            server,
            SERVER_AT,
            CLIENT_AT,
            Established,
            LastAck,
        ));
        // Its CLOSE was lost; a client's new socket takes the address.
        let client = kernel_owner(CLIENT, "client", OwnerSource::Connect);
        table.on_event(change(3, 7, client, "0.0.0.0:0", SERVER_AT, Close, SynSent));
        let out = transitions(&mut table);
        let last = out.last().expect("the connect");
        assert_eq!((last.old, last.new), (Close, SynSent));
        assert_eq!(last.owner.pid, Some(CLIENT));
        assert_eq!(table.owned.get(&SERVER), None, "{:?}", table.owned);
        assert_eq!(table.owned.get(&CLIENT), Some(&1), "{:?}", table.owned);
    }
}
