//! TCP states as the kernel numbers them, with the names `ss` users know,
//! plus the one state socktrace adds: a socket the network closed while its
//! owner still holds the file descriptor.

use serde::Serialize;
use tracer_common::tcp_state;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(into = "&'static str")]
pub enum TcpState {
    Established,
    SynSent,
    SynRecv,
    FinWait1,
    FinWait2,
    TimeWait,
    Close,
    CloseWait,
    LastAck,
    Listen,
    Closing,
    NewSynRecv,
    /// TCP reached CLOSE (a reset, a timeout, a refused connect) but a
    /// process still holds the socket's file descriptor: lsof's "sock ...
    /// can't identify protocol", listed by no `ss`. The kernel calls it
    /// CLOSE; it ends when the last holder closes the fd or exits.
    ClosedHeld,
    Unknown(u8),
}

impl From<u8> for TcpState {
    fn from(raw: u8) -> Self {
        match raw {
            tcp_state::ESTABLISHED => Self::Established,
            tcp_state::SYN_SENT => Self::SynSent,
            tcp_state::SYN_RECV => Self::SynRecv,
            tcp_state::FIN_WAIT1 => Self::FinWait1,
            tcp_state::FIN_WAIT2 => Self::FinWait2,
            tcp_state::TIME_WAIT => Self::TimeWait,
            tcp_state::CLOSE => Self::Close,
            tcp_state::CLOSE_WAIT => Self::CloseWait,
            tcp_state::LAST_ACK => Self::LastAck,
            tcp_state::LISTEN => Self::Listen,
            tcp_state::CLOSING => Self::Closing,
            tcp_state::NEW_SYN_RECV => Self::NewSynRecv,
            other => Self::Unknown(other),
        }
    }
}

impl TcpState {
    /// Whether `old -> new` starts a new socket (so whatever is kept under
    /// the same id, left by a missed CLOSE, is stale): a connect or listen,
    /// also of a socket that closed while held, or a passive open.
    pub fn starts_a_socket(old: Self, new: Self) -> bool {
        matches!(
            (old, new),
            (Self::Close | Self::ClosedHeld, Self::SynSent | Self::Listen)
                | (Self::Listen, Self::SynRecv)
        )
    }

    /// Whether a process still holds the socket's file in this state (it
    /// has not closed it): after its owner exits, a socket still in one of
    /// them has another holder.
    pub fn is_held(self) -> bool {
        matches!(
            self,
            Self::SynSent
                | Self::SynRecv
                | Self::Established
                | Self::CloseWait
                | Self::Listen
                | Self::ClosedHeld
        )
    }

    /// TCP reached CLOSE, whether a file still holds the socket or not.
    pub fn is_closed(self) -> bool {
        matches!(self, Self::Close | Self::ClosedHeld)
    }

    /// The state the kernel reports as `raw`, held or not by a file.
    pub fn from_kernel(raw: u8, held: bool) -> Self {
        match Self::from(raw) {
            Self::Close if held => Self::ClosedHeld,
            state => state,
        }
    }

    /// The kernel's number for this state (CLOSE for [`TcpState::ClosedHeld`]).
    pub fn raw(self) -> u8 {
        match self {
            Self::Established => tcp_state::ESTABLISHED,
            Self::SynSent => tcp_state::SYN_SENT,
            Self::SynRecv => tcp_state::SYN_RECV,
            Self::FinWait1 => tcp_state::FIN_WAIT1,
            Self::FinWait2 => tcp_state::FIN_WAIT2,
            Self::TimeWait => tcp_state::TIME_WAIT,
            Self::Close => tcp_state::CLOSE,
            Self::CloseWait => tcp_state::CLOSE_WAIT,
            Self::LastAck => tcp_state::LAST_ACK,
            Self::Listen => tcp_state::LISTEN,
            Self::Closing => tcp_state::CLOSING,
            Self::NewSynRecv => tcp_state::NEW_SYN_RECV,
            Self::ClosedHeld => tcp_state::CLOSE,
            Self::Unknown(raw) => raw,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Established => "ESTABLISHED",
            Self::SynSent => "SYN_SENT",
            Self::SynRecv => "SYN_RECV",
            Self::FinWait1 => "FIN_WAIT1",
            Self::FinWait2 => "FIN_WAIT2",
            Self::TimeWait => "TIME_WAIT",
            Self::Close => "CLOSE",
            Self::CloseWait => "CLOSE_WAIT",
            Self::LastAck => "LAST_ACK",
            Self::Listen => "LISTEN",
            Self::Closing => "CLOSING",
            Self::NewSynRecv => "NEW_SYN_RECV",
            Self::ClosedHeld => "CLOSED_HELD",
            Self::Unknown(_) => "UNKNOWN",
        }
    }
}

impl From<TcpState> for &'static str {
    fn from(state: TcpState) -> Self {
        state.name()
    }
}

impl std::fmt::Display for TcpState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why the kernel ended a connection: the `sk_err` it set as the socket
/// reached CLOSE. Kept to a fixed set of names so that metrics stay bounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(into = "&'static str")]
pub enum CloseCause {
    /// ECONNRESET, or EPIPE for a reset in CLOSE_WAIT (tcp_reset).
    Reset,
    /// ETIMEDOUT: retransmissions, keep-alive probes or TCP_USER_TIMEOUT ran
    /// out (tcp_write_err), or the SYN was never answered.
    TimedOut,
    /// ECONNREFUSED: a reset in answer to the SYN.
    Refused,
    /// EHOSTUNREACH, ENETUNREACH, EHOSTDOWN, ENETDOWN (ICMP errors).
    Unreachable,
    /// Any other error.
    Other,
}

impl CloseCause {
    pub const ALL: [Self; 5] = [
        Self::Reset,
        Self::TimedOut,
        Self::Refused,
        Self::Unreachable,
        Self::Other,
    ];

    /// `None` for 0: the connection ended without an error.
    pub fn from_errno(errno: u32) -> Option<Self> {
        const EPIPE: u32 = libc::EPIPE as u32;
        const ENETDOWN: u32 = libc::ENETDOWN as u32;
        const ENETUNREACH: u32 = libc::ENETUNREACH as u32;
        const ECONNRESET: u32 = libc::ECONNRESET as u32;
        const ETIMEDOUT: u32 = libc::ETIMEDOUT as u32;
        const ECONNREFUSED: u32 = libc::ECONNREFUSED as u32;
        const EHOSTDOWN: u32 = libc::EHOSTDOWN as u32;
        const EHOSTUNREACH: u32 = libc::EHOSTUNREACH as u32;
        Some(match errno {
            0 => return None,
            ECONNRESET | EPIPE => Self::Reset,
            ETIMEDOUT => Self::TimedOut,
            ECONNREFUSED => Self::Refused,
            EHOSTUNREACH | ENETUNREACH | EHOSTDOWN | ENETDOWN => Self::Unreachable,
            _ => Self::Other,
        })
    }

    /// As it appears in JSON and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Self::Reset => "reset",
            Self::TimedOut => "timed_out",
            Self::Refused => "refused",
            Self::Unreachable => "unreachable",
            Self::Other => "other_error",
        }
    }
}

impl From<CloseCause> for &'static str {
    fn from(cause: CloseCause) -> Self {
        cause.name()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_held_is_close_to_the_kernel() {
        assert_eq!(
            TcpState::from_kernel(tcp_state::CLOSE, true),
            TcpState::ClosedHeld
        );
        assert_eq!(
            TcpState::from_kernel(tcp_state::CLOSE, false),
            TcpState::Close
        );
        assert_eq!(
            TcpState::from_kernel(tcp_state::CLOSE_WAIT, true),
            TcpState::CloseWait
        );
        assert_eq!(TcpState::ClosedHeld.raw(), tcp_state::CLOSE);
        assert_eq!(TcpState::ClosedHeld.name(), "CLOSED_HELD");
    }

    #[test]
    fn causes_from_errno() {
        assert_eq!(CloseCause::from_errno(0), None);
        assert_eq!(CloseCause::from_errno(104), Some(CloseCause::Reset));
        assert_eq!(CloseCause::from_errno(32), Some(CloseCause::Reset), "EPIPE");
        assert_eq!(CloseCause::from_errno(110), Some(CloseCause::TimedOut));
        assert_eq!(CloseCause::from_errno(111), Some(CloseCause::Refused));
        assert_eq!(CloseCause::from_errno(113), Some(CloseCause::Unreachable));
        assert_eq!(CloseCause::from_errno(12), Some(CloseCause::Other));
    }
}
