//! What the bench reads from /proc about a tracer process and the machine.

use std::{
    fs, io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::Path,
};

use anyhow::{Context as _, bail};

/// CPU time (user + system, all threads) a process has used, in seconds.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15 of stat(5); `fields` starts at field 3.
    let ticks = |index: usize| -> anyhow::Result<u64> {
        fields
            .get(index - 3)
            .and_then(|field| field.parse().ok())
            .with_context(|| format!("field {index} of {path} is missing or not a number"))
    };
    Ok((ticks(14)? + ticks(15)?) as f64 / clock_ticks_per_second())
}

/// CPU time a process's live threads have used, in seconds, to the
/// nanosecond (/proc/PID/task/*/schedstat): /proc/PID/stat counts in 10 ms
/// ticks, too coarse for a collector using 0.02 core over a few seconds. A
/// thread that exits takes its time with it, so this is for processes whose
/// threads outlive the measurement, as the tracers' do once attached.
pub fn run_time_seconds(pid: u32) -> anyhow::Result<f64> {
    let tasks = format!("/proc/{pid}/task");
    let mut ns = 0u64;
    for task in fs::read_dir(&tasks).with_context(|| format!("reading {tasks}"))? {
        let path = task?.path().join("schedstat");
        // A thread that exits in between counts as nothing.
        let Ok(stat) = fs::read_to_string(&path) else {
            continue;
        };
        ns += stat
            .split_whitespace()
            .next()
            .and_then(|field| field.parse::<u64>().ok())
            .with_context(|| format!("{} holds no run time", path.display()))?;
    }
    Ok(ns as f64 / 1e9)
}

/// CPU time of the per-CPU softirq threads, which take over softirq work
/// under load.
pub fn ksoftirqd_cpu_seconds() -> f64 {
    let Ok(entries) = fs::read_dir("/proc") else {
        return 0.0;
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.starts_with("ksoftirqd/"))
        })
        // A thread that vanished in between counts as nothing.
        .filter_map(|pid| cpu_seconds(pid).ok())
        .sum()
}

pub fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// Resident memory now and at its peak.
#[derive(Clone, Copy, Debug, Default)]
pub struct Memory {
    pub rss_kib: u64,
    pub peak_kib: u64,
}

impl Memory {
    pub fn read(pid: u32) -> anyhow::Result<Self> {
        let path = format!("/proc/{pid}/status");
        let status = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let kib = |key: &str| -> anyhow::Result<u64> {
            status
                .lines()
                .find_map(|line| line.strip_prefix(key))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
                .with_context(|| format!("{key} missing from {path}"))
        };
        Ok(Self {
            rss_kib: kib("VmRSS:")?,
            peak_kib: kib("VmHWM:")?,
        })
    }
}

/// Busy and total CPU time of the whole machine, from /proc/stat (in ticks).
#[derive(Clone, Copy, Debug, Default)]
pub struct MachineCpu {
    busy: u64,
    total: u64,
}

impl MachineCpu {
    pub fn read() -> anyhow::Result<Self> {
        let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let Some(cpu) = stat.lines().find(|line| line.starts_with("cpu ")) else {
            bail!("/proc/stat has no cpu line");
        };
        let ticks: Vec<u64> = cpu
            .split_whitespace()
            .skip(1)
            .filter_map(|field| field.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal [guest guest_nice];
        // guest time is already counted in user.
        let total: u64 = ticks.iter().take(8).sum();
        let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
        Ok(Self {
            busy: total - idle,
            total,
        })
    }

    /// CPU seconds spent busy, all CPUs together, between `earlier` and `self`.
    pub fn busy_secs_since(&self, earlier: &Self) -> f64 {
        self.busy.saturating_sub(earlier.busy) as f64 / clock_ticks_per_second()
    }

    /// Share of the machine that was busy between `earlier` and `self`.
    pub fn busy_since(&self, earlier: &Self) -> f64 {
        let total = self.total.saturating_sub(earlier.total);
        if total == 0 {
            return 0.0;
        }
        self.busy.saturating_sub(earlier.busy) as f64 / total as f64
    }
}

/// Counters of the BPF programs a process holds, summed over them, and of
/// each program by name.
#[derive(Clone, Debug, Default)]
pub struct BpfStats {
    /// Kernel time in the programs and how often they ran: counted only
    /// while stats are enabled ([`BpfRunTimeStats`]).
    pub run_time_ns: u64,
    pub run_count: u64,
    /// Runs the kernel skipped because a BPF program was already running on
    /// that CPU (a tracepoint hit from softirq inside another program).
    /// Always counted; the program never sees these events, so they are
    /// lost without the tracer knowing.
    pub recursion_misses: u64,
    pub programs: usize,
    /// Each program's counters, by name.
    pub by_program: Vec<ProgramStats>,
}

/// One BPF program's counters. Programs are told apart by id: the kernel
/// keeps only the first 15 bytes of a name, which two programs on one
/// hook (a program and its `_nested` partner) share.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ProgramStats {
    pub name: String,
    pub id: u32,
    /// The hash of its instructions, which names its code in /proc/kallsyms.
    pub tag: String,
    pub run_time_ns: u64,
    pub run_count: u64,
}

impl BpfStats {
    pub fn read(pid: u32) -> anyhow::Result<Self> {
        let fd_dir = format!("/proc/{pid}/fd");
        let entries = fs::read_dir(&fd_dir).with_context(|| format!("listing {fd_dir}"))?;
        let mut sum = Self::default();
        for entry in entries.flatten() {
            let is_program = fs::read_link(entry.path())
                .is_ok_and(|target| target == Path::new("anon_inode:bpf-prog"));
            if !is_program {
                continue;
            }
            let info_path = format!("/proc/{pid}/fdinfo/{}", entry.file_name().to_string_lossy());
            // The fd may have been closed since we listed it.
            let Ok(info) = fs::read_to_string(&info_path) else {
                continue;
            };
            let text = |key: &str| {
                info.lines()
                    .find_map(|line| line.strip_prefix(key))
                    .map_or("", str::trim)
            };
            let field = |key: &str| -> u64 { text(key).parse().unwrap_or(0) };
            sum.run_time_ns += field("run_time_ns:");
            sum.run_count += field("run_cnt:");
            sum.recursion_misses += field("recursion_misses:");
            sum.programs += 1;
            let id = field("prog_id:") as u32;
            sum.by_program.push(ProgramStats {
                name: program_name(id).unwrap_or_else(|| format!("prog {id}")),
                id,
                tag: text("prog_tag:").to_owned(),
                run_time_ns: field("run_time_ns:"),
                run_count: field("run_cnt:"),
            });
        }
        sum.by_program.sort();
        Ok(sum)
    }

    pub fn since(&self, earlier: &Self) -> Self {
        let by_program = self
            .by_program
            .iter()
            .map(|now| {
                let then = earlier.by_program.iter().find(|then| then.id == now.id);
                ProgramStats {
                    run_time_ns: now
                        .run_time_ns
                        .saturating_sub(then.map_or(0, |then| then.run_time_ns)),
                    run_count: now
                        .run_count
                        .saturating_sub(then.map_or(0, |then| then.run_count)),
                    ..now.clone()
                }
            })
            .collect();
        Self {
            run_time_ns: self.run_time_ns.saturating_sub(earlier.run_time_ns),
            run_count: self.run_count.saturating_sub(earlier.run_count),
            recursion_misses: self
                .recursion_misses
                .saturating_sub(earlier.recursion_misses),
            programs: self.programs,
            by_program,
        }
    }

    /// Gives each program its whole name, from the symbol of its code in
    /// /proc/kallsyms (`bpf_prog_<tag>_<name>`), where the kernel lists it.
    /// Reads a large file: call it outside a measured window, while the
    /// programs are still loaded.
    pub fn with_full_names(mut self) -> Self {
        let Ok(symbols) = fs::read_to_string("/proc/kallsyms") else {
            return self;
        };
        for program in &mut self.by_program {
            if let Some(name) = full_name(&symbols, &program.tag, &program.name) {
                program.name = name.to_owned();
            }
        }
        self.by_program.sort();
        self
    }
}

/// The kernel keeps the first `SHORT_NAME` bytes of a program's name.
const SHORT_NAME: usize = 15;

/// The whole name of a program whose short name may be cut: from the
/// symbols of its code, `bpf_prog_<tag>_<name>`, the one that begins with
/// the short name (programs with the same code share a tag), the short
/// name itself if a program has it whole.
fn full_name<'a>(kallsyms: &'a str, tag: &str, short_name: &str) -> Option<&'a str> {
    if tag.is_empty() || short_name.len() < SHORT_NAME {
        return None;
    }
    let prefix = format!("bpf_prog_{tag}_");
    let names: Vec<&str> = kallsyms
        .lines()
        .filter_map(|line| {
            line.split_whitespace()
                .nth(2)?
                .strip_prefix(prefix.as_str())
        })
        .filter(|name| name.starts_with(short_name))
        .collect();
    names
        .iter()
        .find(|&&name| name == short_name)
        .or(names.first())
        .copied()
}

/// The name a BPF program was loaded with (its first 15 bytes), from its id:
/// `BPF_PROG_GET_FD_BY_ID` and `BPF_OBJ_GET_INFO_BY_FD`.
fn program_name(id: u32) -> Option<String> {
    /// `enum bpf_cmd` in `linux/bpf.h`.
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    /// `struct bpf_prog_info` up to and including `name` (offset 64).
    const INFO_LEN: usize = 80;
    const NAME_AT: usize = 64;
    // `union bpf_attr` for GET_FD_BY_ID: { u32 prog_id; u32 next_id; u32 open_flags; }.
    let by_id: [u32; 3] = [id, 0, 0];
    // SAFETY: bpf() reads the attr we pass, which lives across the call; on
    // success it returns a new fd that we own.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_GET_FD_BY_ID,
            by_id.as_ptr(),
            std::mem::size_of_val(&by_id) as libc::c_uint,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: the kernel just returned this fd to us.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let mut info = [0u8; INFO_LEN];
    // `union bpf_attr` for GET_INFO_BY_FD: { u32 bpf_fd; u32 info_len; u64 info; }.
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: INFO_LEN as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: the kernel writes at most `info_len` bytes into `info`, which
    // outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &attr as *const InfoAttr,
            std::mem::size_of::<InfoAttr>() as libc::c_uint,
        )
    };
    if rc != 0 {
        return None;
    }
    let name = info.get(NAME_AT..)?;
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Some(String::from_utf8_lossy(&name[..end]).into_owned())
}

/// Keeps the kernel counting the run time of every BPF program while it
/// lives (`BPF_ENABLE_STATS`): unlike `kernel.bpf_stats_enabled`, the kernel
/// stops counting when the fd closes, even if the bench is killed.
pub struct BpfRunTimeStats {
    _fd: OwnedFd,
}

impl BpfRunTimeStats {
    pub fn enable() -> anyhow::Result<Self> {
        /// `enum bpf_cmd` and `enum bpf_stats_type` in `linux/bpf.h`.
        const BPF_ENABLE_STATS: libc::c_long = 32;
        const BPF_STATS_RUN_TIME: u32 = 0;
        // `union bpf_attr` for this command: `struct { __u32 type; } enable_stats`.
        let attr: u32 = BPF_STATS_RUN_TIME;
        // SAFETY: bpf() reads `size_of::<u32>()` bytes of `attr`, which lives
        // across the call; on success it returns a new fd that we own.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_ENABLE_STATS,
                &attr as *const u32,
                std::mem::size_of::<u32>() as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error())
                .context("enabling BPF run-time stats (BPF_ENABLE_STATS)");
        }
        Ok(Self {
            // SAFETY: the kernel just returned this fd to us and nothing
            // else owns it.
            _fd: unsafe { OwnedFd::from_raw_fd(fd as RawFd) },
        })
    }
}

/// A sysctl under /proc/sys, as `net/ipv4/tcp_tw_reuse`.
pub fn sysctl(name: &str) -> anyhow::Result<String> {
    let path = format!("/proc/sys/{name}");
    let value = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    Ok(value.trim().to_owned())
}

pub fn set_sysctl(name: &str, value: &str) -> anyhow::Result<()> {
    let path = format!("/proc/sys/{name}");
    fs::write(&path, value).with_context(|| format!("writing {value} to {path}"))
}

/// Other processes that hold attached BPF programs ("pid comm"): tracers
/// left running would slow every run down alike and blur the comparison.
/// `except` names the tracer under test, if any.
pub fn other_bpf_holders(except: Option<u32>) -> Vec<String> {
    let me = std::process::id();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me && Some(pid) != except && has_attached_bpf(pid))
        .map(|pid| {
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            format!("{pid} {}", comm.trim())
        })
        .collect()
}

/// Whether the process holds an attached BPF program: a bpf_link or a
/// perf_event fd next to a program. Tools that print nothing on attach are
/// ready once this is true.
pub fn has_attached_bpf(pid: u32) -> bool {
    let Ok(entries) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    let targets: Vec<String> = entries
        .flatten()
        .filter_map(|entry| fs::read_link(entry.path()).ok())
        .map(|target| target.to_string_lossy().into_owned())
        .collect();
    let has = |name: &str| targets.iter().any(|target| target == name);
    has("anon_inode:bpf-prog") && (has("anon_inode:bpf_link") || has("anon_inode:[perf_event]"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program(name: &str, id: u32, run_time_ns: u64, run_count: u64) -> ProgramStats {
        ProgramStats {
            name: name.into(),
            id,
            tag: format!("{id:016x}"),
            run_time_ns,
            run_count,
        }
    }

    fn stats(by_program: Vec<ProgramStats>) -> BpfStats {
        BpfStats {
            by_program,
            ..BpfStats::default()
        }
    }

    #[test]
    fn programs_that_share_a_short_name_are_counted_apart() {
        // The partner program runs less and sorts first under the shared
        // name: matched by name, the busy one would be charged its time.
        let before = stats(vec![
            program("inet_sock_set_s", 8, 100, 10),
            program("inet_sock_set_s", 7, 5_000, 10),
        ]);
        let after = stats(vec![
            program("inet_sock_set_s", 8, 150, 20),
            program("inet_sock_set_s", 7, 9_000, 20),
        ]);
        let window = after.since(&before);
        let by_id = |id| window.by_program.iter().find(|p| p.id == id).unwrap();
        assert_eq!((by_id(7).run_time_ns, by_id(7).run_count), (4_000, 10));
        assert_eq!((by_id(8).run_time_ns, by_id(8).run_count), (50, 10));
    }

    #[test]
    fn whole_names_come_from_the_programs_symbols() {
        let kallsyms = "\
ffffffffc0001000 t bpf_prog_00000000000000ab_inet_sock_set_state_btf\t[bpf]
ffffffffc0002000 t bpf_prog_00000000000000cd_inet_sock_set_state_btf_nested\t[bpf]
ffffffffc0003000 t bpf_prog_00000000000000ef_tcp_destroy_sock_btf\t[bpf]
ffffffffc0004000 t bpf_prog_00000000000000ef_tcp_destroy_soc\t[bpf]
ffffffff81000000 T _stext
";
        let name = |tag, short| full_name(kallsyms, tag, short);
        assert_eq!(
            name("00000000000000cd", "inet_sock_set_s"),
            Some("inet_sock_set_state_btf_nested")
        );
        assert_eq!(
            name("00000000000000ab", "inet_sock_set_s"),
            Some("inet_sock_set_state_btf")
        );
        // One code under two names that agree in their first 15 bytes:
        // the short name is taken as whole where a program has it whole.
        assert_eq!(
            name("00000000000000ef", "tcp_destroy_soc"),
            Some("tcp_destroy_soc")
        );
        // A short name under 15 bytes is whole already.
        assert_eq!(name("00000000000000ef", "tcp_destroy"), None);
        assert_eq!(name("0000000000000012", "inet_sock_set_s"), None);
        assert_eq!(name("", "inet_sock_set_s"), None);
    }
}
