//! Checked first, so a missing privilege is one clear line, not an errno
//! from deep inside the loader.

use anyhow::bail;

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Effective capabilities from /proc/self/status (`CapEff`).
fn effective_caps(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

fn has(caps: u64, cap: u32) -> bool {
    caps & (1 << cap) != 0
}

pub fn check() -> anyhow::Result<()> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let caps = effective_caps(&status).unwrap_or(0);
    missing(caps)
}

fn missing(caps: u64) -> anyhow::Result<()> {
    let bpf = has(caps, CAP_BPF) || has(caps, CAP_SYS_ADMIN);
    let perfmon = has(caps, CAP_PERFMON) || has(caps, CAP_SYS_ADMIN);
    if !bpf || !perfmon {
        bail!(
            "socktrace needs root (CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN) to load its kernel probes; run it with sudo"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_capabilities() {
        let status = "Name:\tx\nCapEff:\t000001ffffffffff\n";
        assert_eq!(effective_caps(status), Some(0x1ff_ffff_ffff));
        assert!(missing(0x1ff_ffff_ffff).is_ok());
        assert!(missing(0).is_err());
        assert!(missing(1 << CAP_BPF).is_err());
        assert!(missing((1 << CAP_BPF) | (1 << CAP_PERFMON)).is_ok());
    }
}
