//! `socktrace-floor --attach tp_btf|tracepoint`: attaches an empty BPF
//! program to `sock:inet_sock_set_state` the given way, says so on stderr,
//! and holds it until SIGINT or SIGTERM. `cargo xtask bench` runs it beside
//! the tracers: what the hook costs before any tracer does work.

use std::process::ExitCode;

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Btf, EbpfLoader,
    programs::{BtfTracePoint, TracePoint},
};

/// socktrace's kernel programs, which include the two empty ones.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/socktrace"));

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("socktrace-floor: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let attach = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["--attach", attach @ ("tp_btf" | "tracepoint")] => attach.to_owned(),
        _ => bail!("usage: socktrace-floor --attach tp_btf|tracepoint"),
    };
    let mut ebpf = EbpfLoader::new()
        .load(EBPF_OBJECT)
        .map_err(|e| anyhow!("loading the eBPF object: {e}"))?;
    if attach == "tp_btf" {
        let btf = Btf::from_sys_fs().map_err(|e| anyhow!("reading kernel BTF: {e}"))?;
        let program: &mut BtfTracePoint = ebpf
            .program_mut("floor_tp_btf")
            .context("program floor_tp_btf missing")?
            .try_into()?;
        program.load("inet_sock_set_state", &btf)?;
        program.attach()?;
    } else {
        let program: &mut TracePoint = ebpf
            .program_mut("floor_tracepoint")
            .context("program floor_tracepoint missing")?
            .try_into()?;
        program.load()?;
        program.attach("sock", "inet_sock_set_state")?;
    }
    eprintln!("socktrace-floor: attached ({attach}); SIGINT or SIGTERM to stop");
    wait_for_a_stop_signal()
}

fn wait_for_a_stop_signal() -> anyhow::Result<()> {
    // SAFETY: plain signal-set manipulation on a set we own; blocking the
    // two signals makes sigwait receive them instead of their default
    // action, which would skip the programs' detach.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            bail!("blocking SIGINT and SIGTERM failed");
        }
        let mut signal = 0;
        libc::sigwait(&set, &mut signal);
    }
    Ok(())
}
