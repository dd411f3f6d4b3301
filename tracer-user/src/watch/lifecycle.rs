//! What each TCP transition means for the socket's owner: an open, the
//! owner's close, who closed first, how long it lived.
//!
//! Linux, as seen by `sock:inet_sock_set_state`: active open CLOSE ->
//! SYN_SENT -> ESTABLISHED; passive open LISTEN -> SYN_RECV (on the new child)
//! -> ESTABLISHED; local close first ESTABLISHED -> FIN_WAIT1 -> FIN_WAIT2 ->
//! CLOSE (TIME_WAIT lives in a separate mini socket, so the full socket goes
//! straight to CLOSE); peer close first ESTABLISHED -> CLOSE_WAIT, then the
//! owner's close CLOSE_WAIT -> LAST_ACK -> CLOSE; resets go to CLOSE directly.
//! A reset, timeout or refused connect while the owner still holds the fd
//! goes to CLOSED_HELD instead, and the owner's release (close or exit) ends
//! it: CLOSED_HELD -> CLOSE.

use std::num::NonZeroU64;

use crate::model::Transition;
use crate::tcp::{CloseCause, TcpState};

use super::peers::{Closer, PeerKey};

/// What one transition changed, for the owner's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Effects {
    /// The connection counts as opened now (its owner and peer became known).
    pub opened: bool,
    /// The owner closed the connection (or it ended without the owner).
    pub released: bool,
    pub closer: Option<Closer>,
    /// SYN_SENT to ESTABLISHED: the handshake of a connection it opened.
    pub connect_latency_ns: Option<u64>,
    /// ESTABLISHED to CLOSE.
    pub lifetime_ns: Option<u64>,
    /// ESTABLISHED to the peer's FIN.
    pub peer_close_after_ns: Option<u64>,
    /// CLOSE_WAIT to the owner's close (or to the network's close).
    pub close_wait_dwell_ns: Option<u64>,
    /// Why the kernel ended the connection, when it did with an error.
    pub cause: Option<CloseCause>,
    pub listen_started: Option<u16>,
    pub listen_stopped: Option<u16>,
}

/// A kernel timestamp (ns) that may be unknown, in 8 bytes: ktime is never
/// 0, and a busy server has 100k records.
pub type Stamp = Option<NonZeroU64>;

pub fn stamp(ktime_ns: u64) -> Stamp {
    NonZeroU64::new(ktime_ns)
}

/// Time from `since` to `now_ns`, if `since` is known.
pub fn elapsed(now_ns: u64, since: Stamp) -> Option<u64> {
    since.map(|since| now_ns.saturating_sub(since.get()))
}

/// One socket while it lives.
#[derive(Clone, Debug)]
pub struct SocketRecord {
    /// The owner this socket is counted under, once known.
    pub pid: Option<u32>,
    pub state: TcpState,
    pub peer: Option<PeerKey>,
    /// Where `peer` was in its owner's peer table last (see
    /// `PeerTable::stats_mut`).
    pub peer_hint: u32,
    /// Accepted from a listener (keyed by client address and local port).
    pub inbound: bool,
    pub listener: bool,
    /// Seen from its start, not yet counted as opened.
    pub open_pending: bool,
    pub released: bool,
    pub closer_known: bool,
    pub syn_sent_at_ns: Stamp,
    pub established_at_ns: Stamp,
    pub close_wait_since_ns: Stamp,
    /// In CLOSE_WAIT since before socktrace started: its age is a lower bound.
    pub close_wait_before_start: bool,
    /// When the connection ended while the owner held on: the peer's FIN
    /// (CLOSE_WAIT) or, if none came first, the network's close
    /// (CLOSED_HELD). How long the owner has been sitting on a dead socket.
    pub stranded_since_ns: Stamp,
    /// Stranded since before socktrace started.
    pub stranded_before_start: bool,
    /// In CLOSED_HELD: why the kernel closed it.
    pub cause: Option<CloseCause>,
    pub last_event_ns: u64,
}

impl SocketRecord {
    /// A socket first seen in `t`, before `t` is applied.
    pub fn first_seen(t: &Transition, inbound: bool) -> Self {
        Self {
            pid: None,
            state: t.old,
            peer: None,
            peer_hint: 0,
            inbound,
            listener: false,
            open_pending: TcpState::starts_a_socket(t.old, t.new) && t.new != TcpState::Listen,
            released: false,
            closer_known: false,
            syn_sent_at_ns: None,
            established_at_ns: None,
            close_wait_since_ns: None,
            close_wait_before_start: false,
            stranded_since_ns: None,
            stranded_before_start: false,
            cause: None,
            last_event_ns: t.ktime_ns,
        }
    }

    /// A socket that existed when socktrace started, at `start_ns`.
    pub fn seeded(
        state: TcpState,
        cause: Option<CloseCause>,
        peer: Option<PeerKey>,
        inbound: bool,
        start_ns: u64,
    ) -> Self {
        let close_wait = state == TcpState::CloseWait;
        let stranded = close_wait || state == TcpState::ClosedHeld;
        Self {
            pid: None,
            state,
            peer: peer.filter(|_| state != TcpState::Listen),
            peer_hint: 0,
            inbound,
            listener: state == TcpState::Listen,
            open_pending: false,
            released: !state.is_held(),
            closer_known: seeded_closer(state).is_some(),
            syn_sent_at_ns: None,
            established_at_ns: None,
            close_wait_since_ns: stamp(start_ns).filter(|_| close_wait),
            close_wait_before_start: close_wait,
            stranded_since_ns: stamp(start_ns).filter(|_| stranded),
            stranded_before_start: stranded,
            cause,
            last_event_ns: start_ns,
        }
    }

    /// Held, but its connection is over: in CLOSE_WAIT or CLOSED_HELD.
    pub fn is_stranded(&self) -> bool {
        self.is_held_connection()
            && matches!(self.state, TcpState::CloseWait | TcpState::ClosedHeld)
    }

    /// Still held by its owner and not a listener: a connection that uses
    /// one of the owner's file descriptors.
    pub fn is_held_connection(&self) -> bool {
        !self.released && !self.listener && self.state.is_held()
    }

    /// Moves the socket to `t.new` and says what that means. `attributed`
    /// tells whether the socket has an owner to count the open under.
    pub fn apply(&mut self, t: &Transition, attributed: bool) -> Effects {
        let now = t.ktime_ns;
        let mut effects = Effects::default();
        // The kernel's dwell dates the entry into `old` when we missed it.
        let entered_old = t
            .dwell_ns
            .and_then(|dwell| stamp(now.saturating_sub(dwell)));
        if t.old == TcpState::Established && self.established_at_ns.is_none() {
            self.established_at_ns = entered_old;
        }
        if t.old == TcpState::CloseWait && self.close_wait_since_ns.is_none() {
            self.close_wait_since_ns = entered_old;
        }
        if self.peer.is_none() && !self.listener && t.new != TcpState::Listen {
            // The remote end may not be filled in yet on the very first event.
            self.peer = PeerKey::new(t.remote, t.local.port(), self.inbound);
        }
        if self.open_pending && attributed && self.peer.is_some() {
            self.open_pending = false;
            effects.opened = true;
        }

        if t.old == TcpState::CloseWait {
            effects.close_wait_dwell_ns = t
                .dwell_ns
                .or_else(|| elapsed(now, self.close_wait_since_ns));
            self.close_wait_since_ns = None;
            self.close_wait_before_start = false;
        }
        if matches!(t.new, TcpState::Close | TcpState::ClosedHeld) && t.cause.is_some() {
            effects.cause = t.cause;
        }
        let mut closer = None;
        match t.new {
            TcpState::SynSent => self.syn_sent_at_ns = stamp(now),
            TcpState::Established => {
                if t.old == TcpState::SynSent {
                    effects.connect_latency_ns =
                        t.dwell_ns.or_else(|| elapsed(now, self.syn_sent_at_ns));
                }
                self.established_at_ns = stamp(now);
            }
            TcpState::CloseWait => {
                closer = Some(Closer::Peer);
                self.close_wait_since_ns = stamp(now);
                self.stranded_since_ns = stamp(now);
                if t.old == TcpState::Established {
                    effects.peer_close_after_ns =
                        t.dwell_ns.or_else(|| elapsed(now, self.established_at_ns));
                }
            }
            TcpState::FinWait1 => {
                if matches!(t.old, TcpState::Established | TcpState::SynRecv) {
                    closer = Some(Closer::Local);
                }
                effects.released = true;
            }
            TcpState::LastAck => effects.released = true,
            // The network ended it; the owner holds on to the fd.
            TcpState::ClosedHeld => {
                if matches!(
                    t.old,
                    TcpState::Established | TcpState::SynSent | TcpState::SynRecv
                ) {
                    closer = Some(Closer::Network);
                }
                if self.stranded_since_ns.is_none() {
                    self.stranded_since_ns = stamp(now);
                }
                self.cause = t.cause;
                effects.lifetime_ns = elapsed(now, self.established_at_ns);
            }
            TcpState::Close => {
                if matches!(
                    t.old,
                    TcpState::Established | TcpState::SynSent | TcpState::SynRecv
                ) {
                    closer = Some(Closer::Network);
                }
                if t.old == TcpState::Listen {
                    effects.listen_stopped = Some(t.local.port());
                }
                effects.released = true;
                // Counted when the network closed it.
                if t.old != TcpState::ClosedHeld {
                    effects.lifetime_ns = elapsed(now, self.established_at_ns);
                }
            }
            TcpState::Listen => {
                self.listener = true;
                effects.listen_started = Some(t.local.port());
            }
            _ => {}
        }
        if !self.closer_known && !self.listener {
            effects.closer = closer;
            self.closer_known = closer.is_some();
        }
        if !matches!(t.new, TcpState::CloseWait | TcpState::ClosedHeld) {
            self.stranded_since_ns = None;
            self.stranded_before_start = false;
        }
        // A listener's close is not a connection's close.
        effects.released &= !self.released && !self.listener;
        self.released |= effects.released;
        self.state = t.new;
        self.last_event_ns = now;
        effects
    }
}

/// Who closed first, as far as a seeded socket's state tells (a CLOSED_HELD
/// one may have been in CLOSE_WAIT before: unknown).
pub fn seeded_closer(state: TcpState) -> Option<Closer> {
    match state {
        TcpState::CloseWait | TcpState::LastAck => Some(Closer::Peer),
        TcpState::FinWait1 | TcpState::FinWait2 | TcpState::Closing => Some(Closer::Local),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Owner;
    use tracer_common::OwnerSource;

    const S: u64 = 1_000_000_000;

    fn transition(at_s: u64, old: TcpState, new: TcpState) -> Transition {
        Transition {
            ktime_ns: at_s * S,
            sock_id: 1,
            owner: Owner {
                pid: Some(1),
                nspid: None,
                comm: "c".into(),
                source: OwnerSource::Connect,
            },
            local: "10.0.0.1:40000".parse().unwrap(),
            remote: "10.0.0.5:17000".parse().unwrap(),
            old,
            new,
            dwell_ns: None,
            cause: None,
        }
    }

    fn step(record: &mut SocketRecord, at_s: u64, old: TcpState, new: TcpState) -> Effects {
        record.apply(&transition(at_s, old, new), true)
    }

    fn first(at_s: u64, old: TcpState, new: TcpState) -> (SocketRecord, Effects) {
        let t = transition(at_s, old, new);
        let mut record = SocketRecord::first_seen(&t, false);
        let effects = record.apply(&t, true);
        (record, effects)
    }

    fn client(at_s: u64) -> (SocketRecord, Effects) {
        first(at_s, TcpState::Close, TcpState::SynSent)
    }

    #[test]
    fn peer_closes_first_then_owner_closes() {
        use TcpState::*;
        // ktime is never 0: the clock counts from boot.
        let (mut record, opened) = client(1);
        assert!(opened.opened);
        assert_eq!(
            step(&mut record, 3, SynSent, Established).connect_latency_ns,
            Some(2 * S)
        );
        let fin = step(&mut record, 11, Established, CloseWait);
        assert_eq!(fin.closer, Some(Closer::Peer));
        assert_eq!(fin.peer_close_after_ns, Some(8 * S));
        assert!(record.is_held_connection());
        let close = step(&mut record, 71, CloseWait, LastAck);
        assert!(close.released);
        assert_eq!(close.close_wait_dwell_ns, Some(60 * S));
        let end = step(&mut record, 72, LastAck, Close);
        assert!(!end.released, "released once");
        assert_eq!(end.closer, None, "closer decided once");
        assert_eq!(end.lifetime_ns, Some(69 * S));
    }

    #[test]
    fn local_close_first_is_released_at_fin_wait1() {
        use TcpState::*;
        let (mut record, _) = client(0);
        step(&mut record, 1, SynSent, Established);
        let close = step(&mut record, 2, Established, FinWait1);
        assert_eq!(close.closer, Some(Closer::Local));
        assert!(close.released);
        assert!(!record.is_held_connection());
        step(&mut record, 2, FinWait1, FinWait2);
        assert_eq!(
            step(&mut record, 3, FinWait2, Close).lifetime_ns,
            Some(2 * S)
        );
    }

    #[test]
    fn reset_and_failed_connect() {
        use TcpState::*;
        let (mut record, _) = client(0);
        step(&mut record, 1, SynSent, Established);
        let reset = step(&mut record, 5, Established, Close);
        assert_eq!(reset.closer, Some(Closer::Network));
        assert!(reset.released);

        let (mut refused, _) = client(0);
        assert_eq!(
            step(&mut refused, 0, SynSent, Close).closer,
            Some(Closer::Network)
        );
    }

    fn with_cause(mut t: Transition, cause: CloseCause) -> Transition {
        t.cause = Some(cause);
        t
    }

    #[test]
    fn reset_while_held_is_held_until_released() {
        use TcpState::*;
        let (mut record, _) = client(0);
        step(&mut record, 1, SynSent, Established);
        let t = with_cause(transition(5, Established, ClosedHeld), CloseCause::Reset);
        let reset = record.apply(&t, true);
        assert_eq!(reset.closer, Some(Closer::Network));
        assert_eq!(reset.cause, Some(CloseCause::Reset));
        assert_eq!(reset.lifetime_ns, Some(4 * S));
        assert!(!reset.released, "the owner still holds it");
        assert!(record.is_held_connection() && record.is_stranded());
        assert_eq!(record.stranded_since_ns, stamp(5 * S));
        let release = step(&mut record, 65, ClosedHeld, Close);
        assert!(release.released);
        assert_eq!(release.lifetime_ns, None, "counted once");
        assert!(!record.is_held_connection());
    }

    #[test]
    fn close_wait_then_reset_stays_stranded_since_the_fin() {
        use TcpState::*;
        let (mut record, _) = client(0);
        step(&mut record, 1, SynSent, Established);
        step(&mut record, 2, Established, CloseWait);
        let t = with_cause(transition(70, CloseWait, ClosedHeld), CloseCause::Reset);
        let keepalive_reset = record.apply(&t, true);
        assert_eq!(keepalive_reset.closer, None, "the peer closed first");
        assert_eq!(keepalive_reset.close_wait_dwell_ns, Some(68 * S));
        assert!(!keepalive_reset.released);
        assert_eq!(record.stranded_since_ns, stamp(2 * S));
        assert_eq!(record.cause, Some(CloseCause::Reset));
    }

    #[test]
    fn refused_connect_kept_open_is_held() {
        use TcpState::*;
        let (mut record, _) = client(0);
        let t = with_cause(transition(0, SynSent, ClosedHeld), CloseCause::Refused);
        assert_eq!(record.apply(&t, true).closer, Some(Closer::Network));
        assert!(record.is_held_connection());
        assert!(
            TcpState::starts_a_socket(ClosedHeld, SynSent),
            "connecting again"
        );
    }

    #[test]
    fn listener_is_not_a_connection() {
        use TcpState::*;
        let (mut record, listen) = first(0, Close, Listen);
        assert_eq!(listen.listen_started, Some(40000));
        assert!(!listen.opened);
        assert!(!record.is_held_connection());
        let stop = step(&mut record, 9, Listen, Close);
        assert_eq!(stop.listen_stopped, Some(40000));
        assert!(!stop.released);
        assert_eq!(stop.closer, None);
    }

    #[test]
    fn seeded_close_wait_is_held_and_dated_from_start() {
        let record = SocketRecord::seeded(TcpState::CloseWait, None, None, false, 7 * S);
        assert!(record.is_held_connection());
        assert!(record.close_wait_before_start);
        assert_eq!(record.close_wait_since_ns, stamp(7 * S));
        assert!(
            !SocketRecord::seeded(TcpState::FinWait2, None, None, false, 0).is_held_connection()
        );
        let closed = SocketRecord::seeded(
            TcpState::ClosedHeld,
            Some(CloseCause::Reset),
            None,
            false,
            7 * S,
        );
        assert!(closed.is_stranded());
        assert_eq!(closed.stranded_since_ns, stamp(7 * S));
    }
}
