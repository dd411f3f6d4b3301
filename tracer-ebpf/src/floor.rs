//! Empty programs on the TCP state tracepoint, one per attach type, for the
//! benchmark's floor (`socktrace-floor`): what the hook itself costs before
//! any tracer does work. socktrace never loads them.

use aya_ebpf::{
    macros::{btf_tracepoint, tracepoint},
    programs::{BtfTracePointContext, TracePointContext},
};

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn floor_tracepoint(_ctx: TracePointContext) -> u32 {
    0
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn floor_tp_btf(_ctx: BtfTracePointContext) -> u32 {
    0
}
