//! Checked first, so a missing privilege is one clear line, not an errno
//! from deep inside the loader; and given up once the programs are
//! attached, so that a collector running for weeks holds only what it
//! reads with.

use anyhow::{Context as _, bail};
use rustix::{
    io::Errno,
    thread::{self, CapabilitySet, CapabilitySets},
};

pub fn check() -> anyhow::Result<()> {
    let effective = thread::capabilities(None)
        .map(|caps| caps.effective)
        .unwrap_or(CapabilitySet::empty());
    missing(effective)
}

fn missing(caps: CapabilitySet) -> anyhow::Result<()> {
    let admin = caps.contains(CapabilitySet::SYS_ADMIN);
    let bpf = admin || caps.contains(CapabilitySet::BPF);
    let perfmon = admin || caps.contains(CapabilitySet::PERFMON);
    if !bpf || !perfmon {
        bail!(
            "socktrace needs root (CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN) to load its kernel probes; run it with sudo"
        );
    }
    Ok(())
}

/// What the collector reads with once attached, on every kernel: the
/// `/proc/PID/fd` directories of other users' processes are theirs with
/// mode 0500 (DAC_READ_SEARCH), and listing their links or reading
/// `/proc/PID/ns` asks for ptrace read access (SYS_PTRACE).
const STEADY_STATE: CapabilitySet = CapabilitySet::DAC_READ_SEARCH.union(CapabilitySet::SYS_PTRACE);

/// Tried in turn when the held maps and the iterator refuse without them:
/// before Linux 5.19, with unprivileged BPF disabled, every bpf() call asks
/// for CAP_BPF (or CAP_SYS_ADMIN), even on an fd already open (relaxed by
/// "bpf: refine kernel.unprivileged_bpf_disabled behaviour").
const FOR_BPF_CALLS: [CapabilitySet; 2] = [CapabilitySet::BPF, CapabilitySet::SYS_ADMIN];

/// What [`drop_after_attach`] left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kept {
    pub capabilities: CapabilitySet,
    /// The bounding set was narrowed to them too (it takes CAP_SETPCAP,
    /// which a systemd unit or a container usually leaves out: their own
    /// bounding set is narrow already).
    pub bounding_narrowed: bool,
}

impl std::fmt::Display for Kept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self
            .capabilities
            .iter_names()
            .map(|(name, _)| format!("CAP_{name}"))
            .collect();
        if names.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&names.join(" "))
        }
    }
}

/// Gives up every capability the running collector does not use (the
/// effective, permitted, inheritable and ambient sets, and the bounding set
/// where allowed), and sets `no_new_privs`. `steady_state` performs the
/// collector's own kernel calls (map reads, an iterator pass); it decides,
/// by trying, whether the bpf() calls still need a capability here.
///
/// Capabilities belong to a thread: this is called before any other thread
/// exists, and threads made later inherit what is left.
pub fn drop_after_attach(
    mut steady_state: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Kept> {
    let before = thread::capabilities(None).context("reading the capabilities")?;
    let base = STEADY_STATE & before.permitted;
    let mut candidates = vec![base];
    candidates.extend(
        FOR_BPF_CALLS
            .iter()
            .filter(|&&cap| before.permitted.contains(cap))
            .map(|&cap| base | cap),
    );
    let mut kept = None;
    let mut refusal = None;
    for candidate in candidates {
        set(before.permitted, candidate, before.inheritable)?;
        match steady_state() {
            Ok(()) => {
                kept = Some(candidate);
                break;
            }
            Err(e) => refusal = Some(e),
        }
    }
    let Some(kept) = kept else {
        set(before.permitted, before.effective, before.inheritable)?;
        let refusal = refusal.unwrap_or_else(|| anyhow::anyhow!("no capability to try"));
        return Err(refusal.context("the collector's kernel calls fail with fewer capabilities"));
    };
    // Narrowing the bounding set takes CAP_SETPCAP, still permitted if held.
    set(
        before.permitted,
        kept | (before.permitted & CapabilitySet::SETPCAP),
        before.inheritable,
    )?;
    let bounding_narrowed = narrow_bounding_set(kept)?;
    thread::set_no_new_privs(true).context("setting no_new_privs")?;
    set(kept, kept, CapabilitySet::empty())?;
    // Lowering the inheritable set lowered the ambient one; kernels before
    // 4.3 have none.
    match thread::clear_ambient_capability_set() {
        Ok(()) | Err(Errno::INVAL) => {}
        Err(e) => return Err(e).context("clearing the ambient capabilities"),
    }
    Ok(Kept {
        capabilities: kept,
        bounding_narrowed,
    })
}

fn set(
    permitted: CapabilitySet,
    effective: CapabilitySet,
    inheritable: CapabilitySet,
) -> anyhow::Result<()> {
    thread::set_capabilities(
        None,
        CapabilitySets {
            effective,
            permitted,
            inheritable,
        },
    )
    .context("setting the capabilities")
}

/// Drops from the bounding set every capability not kept; false if that is
/// not allowed here (no CAP_SETPCAP).
fn narrow_bounding_set(kept: CapabilitySet) -> anyhow::Result<bool> {
    for bit in 0..u64::BITS {
        let cap = CapabilitySet::from_bits_retain(1 << bit);
        if kept.contains(cap) {
            continue;
        }
        match thread::capability_is_in_bounding_set(cap) {
            Ok(false) => continue,
            Ok(true) => {}
            // Past the kernel's last capability.
            Err(Errno::INVAL) => break,
            Err(e) => return Err(e).context("reading the bounding set"),
        }
        match thread::remove_capability_from_bounding_set(cap) {
            Ok(()) => {}
            Err(Errno::PERM) => return Ok(false),
            Err(e) => return Err(e).context("narrowing the bounding set"),
        }
    }
    Ok(true)
}

/// What explains the kernel refusing to load or attach, when a known
/// setting does; empty otherwise. Appended to the loader's error.
pub fn refusal_hint(error: &(dyn std::error::Error + 'static)) -> String {
    let refused = anyhow::Chain::new(error).any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied)
    });
    if !refused {
        return String::new();
    }
    let sysctl = |name: &str| {
        std::fs::read_to_string(format!("/proc/sys/kernel/{name}"))
            .ok()
            .and_then(|value| value.trim().parse::<i64>().ok())
    };
    // Debian's and Ubuntu's kernels, at their default of 3, allow
    // perf_event_open only with CAP_SYS_ADMIN, whatever CAP_PERFMON says.
    if let Some(level @ 3..) = sysctl("perf_event_paranoid") {
        let admin = thread::capabilities(None)
            .is_ok_and(|caps| caps.effective.contains(CapabilitySet::SYS_ADMIN));
        if !admin {
            return format!(
                " (kernel.perf_event_paranoid is {level}: this kernel then attaches tracepoints only for CAP_SYS_ADMIN; set it to 2 with sysctl, or grant CAP_SYS_ADMIN)"
            );
        }
    }
    // Before Linux 5.11 the kernel counts BPF maps against the locked-memory
    // limit (aya raises it if it can).
    let map_refused =
        anyhow::Chain::new(error).any(|cause| cause.to_string().contains("create map"));
    let memlock = rustix::process::getrlimit(rustix::process::Resource::Memlock).current;
    if let (true, Some(bytes)) = (map_refused, memlock) {
        return format!(
            " (RLIMIT_MEMLOCK is {} KiB: kernels before 5.11 count BPF maps against it; raise it, e.g. LimitMEMLOCK=infinity or ulimit -l unlimited)",
            bytes / 1024
        );
    }
    String::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needs_bpf_and_perfmon_or_admin() {
        assert!(missing(CapabilitySet::all()).is_ok());
        assert!(missing(CapabilitySet::empty()).is_err());
        assert!(missing(CapabilitySet::BPF).is_err());
        assert!(missing(CapabilitySet::BPF | CapabilitySet::PERFMON).is_ok());
        assert!(missing(CapabilitySet::SYS_ADMIN).is_ok());
    }

    #[test]
    fn kept_capabilities_are_named_as_the_kernel_names_them() {
        let kept = Kept {
            capabilities: STEADY_STATE | CapabilitySet::BPF,
            bounding_narrowed: true,
        };
        assert_eq!(
            kept.to_string(),
            "CAP_DAC_READ_SEARCH CAP_SYS_PTRACE CAP_BPF"
        );
    }
}
