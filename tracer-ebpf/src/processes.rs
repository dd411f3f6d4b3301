//! Process deaths: the collector reports an exited process once more, and
//! looks for the new holder of the sockets it still owned (a forked child).

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{btf_tracepoint, tracepoint},
    programs::{BtfTracePointContext, TracePointContext},
};
use tracer_common::{EventKind, ExitEvent};

use crate::{current_in_pidns, emit, header};

#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn sched_process_exit(_ctx: TracePointContext) -> u32 {
    on_exit();
    0
}

#[btf_tracepoint(function = "sched_process_exit")]
pub fn sched_process_exit_btf(_ctx: BtfTracePointContext) -> u32 {
    on_exit();
    0
}

/// The task on the CPU is exiting.
#[inline(always)]
fn on_exit() {
    let pid_tgid = bpf_get_current_pid_tgid();
    // Only the thread-group leader's exit ends a process.
    if pid_tgid as u32 == (pid_tgid >> 32) as u32 && current_in_pidns().0 == 1 {
        emit(ExitEvent {
            header: header(EventKind::Exit, 0),
        });
    }
}
