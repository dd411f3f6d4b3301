//! Probe modes and `socktrace doctor`: what this kernel supports, found by
//! trying it rather than by comparing version numbers.

use std::{fmt, fs, path::Path};

use aya::{maps::MapType, sys::is_map_supported};

use super::{ProbeOptions, Probes, layout};

/// How socket owners are learned besides the tracepoints every mode uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeMode {
    /// fentry on tcp_connect/tcp_close (BTF trampolines, cheapest).
    Fentry,
    /// kprobes on tcp_connect/tcp_close.
    Kprobe,
    /// Tracepoints only: owners from connect/listen/close transitions and accept().
    Tracepoint,
}

impl fmt::Display for ProbeMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Fentry => "fentry",
            Self::Kprobe => "kprobe",
            Self::Tracepoint => "tracepoint",
        })
    }
}

/// How the hooks with a BTF-typed variant (TCP state changes, socket
/// destruction, process exit) are attached, which decides where the
/// per-socket state lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    /// BTF tracepoints (`tp_btf`): the kernel's own arguments, no record
    /// built per event, and only re-entry of the same program refused (not
    /// any other tracing program on the CPU); state in the hash map, and in
    /// socket storage for the sockets beyond its size (Linux 5.11+).
    TpBtf,
    /// Classic tracepoints: a record per event, the per-CPU guard shared
    /// with every kprobe and classic-tracepoint program; state in a hash
    /// map sized by `--max-sockets`.
    Tracepoint,
}

impl Attach {
    /// Where the per-socket state lives with this attach type.
    pub fn store(self) -> &'static str {
        match self {
            Self::TpBtf => "a hash map, sk_storage beyond it",
            Self::Tracepoint => "a hash map",
        }
    }
}

impl fmt::Display for Attach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::TpBtf => "tp_btf",
            Self::Tracepoint => "tracepoint",
        })
    }
}

/// `--attach`: which attach types to try, in order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttachRequest {
    /// BTF tracepoints with socket storage where the kernel allows, else
    /// classic tracepoints with the hash map.
    #[default]
    Auto,
    TpBtf,
    Tracepoint,
}

impl AttachRequest {
    pub fn candidates(self) -> &'static [Attach] {
        match self {
            Self::Auto => &[Attach::TpBtf, Attach::Tracepoint],
            Self::TpBtf => &[Attach::TpBtf],
            Self::Tracepoint => &[Attach::Tracepoint],
        }
    }
}

/// `--probe-mode`: which probe modes to try, in order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ModeRequest {
    /// The richest mode the kernel allows: fentry, then kprobe, then tracepoint.
    #[default]
    Auto,
    Fentry,
    Kprobe,
    Tracepoint,
}

impl ModeRequest {
    pub fn candidates(self) -> &'static [ProbeMode] {
        match self {
            Self::Auto => &[ProbeMode::Fentry, ProbeMode::Kprobe, ProbeMode::Tracepoint],
            Self::Fentry => &[ProbeMode::Fentry],
            Self::Kprobe => &[ProbeMode::Kprobe],
            Self::Tracepoint => &[ProbeMode::Tracepoint],
        }
    }
}

/// One line of the doctor's report.
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

/// Probes the kernel feature by feature, then the mode `auto` would choose.
pub fn doctor(options: &ProbeOptions) -> (Vec<Check>, Option<Chosen>) {
    let mut checks = Vec::new();
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    checks.push(Check {
        name: "kernel",
        ok: true,
        detail: release.trim().to_string(),
    });
    checks.push(Check {
        name: "BTF",
        ok: Path::new(layout::BTF_PATH).exists(),
        detail: layout::BTF_PATH.to_string(),
    });
    checks.push(Check {
        name: "lockdown",
        ok: true,
        detail: fs::read_to_string("/sys/kernel/security/lockdown")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown (securityfs not mounted)".into()),
    });
    let tracefs = layout::tracefs();
    checks.push(Check {
        name: "tracefs",
        ok: tracefs.is_ok(),
        detail: match &tracefs {
            Ok(path) => path.display().to_string(),
            Err(e) => format!("{e:#}"),
        },
    });
    if let Ok(tracefs) = &tracefs {
        let typed = super::TYPED_HOOKS.map(|(category, name, ..)| (category, name));
        let classic = super::CLASSIC_ONLY.map(|(category, name, _)| (category, name));
        for (category, name) in typed.into_iter().chain(classic) {
            let found = tracefs.join("events").join(category).join(name).is_dir();
            checks.push(Check {
                name: "tracepoint",
                ok: found,
                detail: format!("{category}:{name}"),
            });
        }
    }
    let ring = is_map_supported(MapType::RingBuf);
    checks.push(Check {
        name: "ring buffer",
        ok: matches!(ring, Ok(true)),
        detail: match ring {
            Ok(true) => "BPF_MAP_TYPE_RINGBUF".into(),
            Ok(false) => "not supported (needs Linux 5.8)".into(),
            Err(e) => format!("probe failed: {e}"),
        },
    });
    let typed = Probes::load(&ProbeOptions {
        attach: AttachRequest::TpBtf,
        ..options.clone()
    });
    checks.push(Check {
        name: "tp_btf",
        ok: typed.is_ok(),
        detail: match typed {
            Ok(_) => "BTF tracepoints attach, socket storage usable".into(),
            Err(e) => format!("{:#}", e.root_cause()),
        },
    });
    for (name, request) in [
        ("fentry", ModeRequest::Fentry),
        ("kprobe", ModeRequest::Kprobe),
    ] {
        let attempt = Probes::load(&ProbeOptions {
            mode: request,
            ..options.clone()
        });
        checks.push(Check {
            name,
            ok: attempt.is_ok(),
            detail: match attempt {
                Ok(_) => "tcp_connect, tcp_close attach".into(),
                Err(e) => format!("{:#}", e.root_cause()),
            },
        });
    }
    let chosen = Probes::load(&ProbeOptions {
        mode: ModeRequest::Auto,
        ..options.clone()
    })
    .map(|p| Chosen {
        mode: p.mode,
        attach: p.attach,
    });
    if let Err(e) = &chosen {
        checks.push(Check {
            name: "load",
            ok: false,
            detail: format!("{e:#}"),
        });
    }
    (checks, chosen.ok())
}

/// What `auto` chooses on this kernel.
pub struct Chosen {
    pub mode: ProbeMode,
    pub attach: Attach,
}
