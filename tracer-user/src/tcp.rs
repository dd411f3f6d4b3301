//! TCP states as the kernel numbers them, with the names `ss` users know.

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
    /// The kernel's number for this state.
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
