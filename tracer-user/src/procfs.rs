//! Cheap per-process facts from /proc: the hot ones (fd counts, fd kinds)
//! read by hand, the cold ones (limits without CAP_SYS_RESOURCE, NSpid,
//! cgroup) parsed by the `procfs` crate.
//!
//! Called once per tick per process (or once at start-up), never per event.
//! A process that exits between two reads is normal: such errors keep their
//! `io::Error` kind (`NotFound`, or raw `ESRCH` from syscalls), and
//! [`is_vanished`] tells them apart from real failures.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io;

use procfs::{
    ProcError,
    process::{LimitValue, Process},
};

use crate::model::FdKindCounts;

/// True when `err` means the process (or one of its fds) no longer exists.
pub fn is_vanished(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::NotFound || err.raw_os_error() == Some(libc::ESRCH)
}

/// Number of open file descriptors of `pid`.
pub fn fd_count(pid: u32) -> io::Result<u64> {
    let dir = format!("/proc/{pid}/fd");
    // Since Linux 6.2 ("proc: report open files as size in stat() for
    // /proc/pid/fd") the directory's size is its number of open fds, read from
    // the fd bitmap; older kernels report 0, so count the entries then.
    let size = fs::metadata(&dir)?.len();
    if size > 0 {
        return Ok(size);
    }
    let mut count = 0;
    for entry in fs::read_dir(&dir)? {
        entry?;
        count += 1;
    }
    Ok(count)
}

/// RLIMIT_NOFILE of `pid` as (soft, hard); `u64::MAX` means unlimited.
pub fn nofile_limits(pid: u32) -> io::Result<(u64, u64)> {
    let raw_pid = libc::pid_t::try_from(pid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a null new-limit pointer only reads the limit, and `limit` is a
    // valid, writable rlimit for the kernel to fill.
    let rc = unsafe { libc::prlimit(raw_pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut limit) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        // prlimit on another user's process needs CAP_SYS_RESOURCE; the
        // world-readable /proc/PID/limits says the same without it.
        if err.raw_os_error() == Some(libc::EPERM) {
            let limits = process(pid)?.limits().map_err(io_error)?;
            let value = |limit| match limit {
                LimitValue::Unlimited => u64::MAX,
                LimitValue::Value(value) => value,
            };
            let open_files = limits.max_open_files;
            return Ok((value(open_files.soft_limit), value(open_files.hard_limit)));
        }
        return Err(err);
    }
    // rlim_t is 32 bits wide on some 32-bit targets.
    #[allow(clippy::unnecessary_cast)]
    let widen = |value: libc::rlim_t| {
        if value == libc::RLIM_INFINITY {
            u64::MAX
        } else {
            value as u64
        }
    };
    Ok((widen(limit.rlim_cur), widen(limit.rlim_max)))
}

/// True while `pid` (a process or a thread) exists, zombies included.
pub fn exists(pid: u32) -> bool {
    fs::symlink_metadata(format!("/proc/{pid}")).is_ok()
}

/// The value of `name` in a "name:\tvalue" file (status, fdinfo).
pub fn field<T: std::str::FromStr>(text: &str, name: &str) -> Option<T> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|value| value.trim().parse().ok())
}

/// When `pid` started (clock ticks since boot): with the pid, it names one
/// process, not whichever has the pid now.
pub fn start_time(pid: u32) -> Option<u64> {
    Some(process(pid).ok()?.stat().ok()?.starttime)
}

/// The pid of `pid` in its innermost PID namespace (the last of `NSpid:`).
pub fn innermost_nspid(pid: u32) -> Option<u32> {
    let status = process(pid).ok()?.status().ok()?;
    let innermost = *status.nspid?.last()?;
    u32::try_from(innermost).ok()
}

/// The cgroup path of `pid`: the unified (v2) one, or the first v1
/// hierarchy's. As bytes: a path may hold any byte but `/` and a newline
/// (procfs's parser refuses bytes that are not UTF-8); the views escape it.
pub fn cgroup_path(pid: u32) -> Option<Vec<u8>> {
    let file = fs::read(format!("/proc/{pid}/cgroup")).ok()?;
    preferred_cgroup(&file).map(<[u8]>::to_vec)
}

/// The preferred path in a `/proc/PID/cgroup` file (`HIERARCHY:CONTROLLERS:PATH`
/// lines).
pub fn preferred_cgroup(file: &[u8]) -> Option<&[u8]> {
    let mut first = None;
    for line in file.split(|&b| b == b'\n') {
        let mut fields = line.splitn(3, |&b| b == b':');
        let (Some(hierarchy), Some(_), Some(path)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if path.is_empty() {
            continue;
        }
        if hierarchy == b"0" {
            return Some(path);
        }
        first.get_or_insert(path);
    }
    first
}

fn process(pid: u32) -> io::Result<Process> {
    let pid = i32::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    Process::new(pid).map_err(io_error)
}

/// Keeps "the process is gone" recognisable ([`is_vanished`]).
fn io_error(err: ProcError) -> io::Error {
    match err {
        ProcError::NotFound(_) => io::Error::from(io::ErrorKind::NotFound),
        ProcError::Io(err, _) => err,
        other => io::Error::other(other),
    }
}

/// Reads the symlink `name` inside `dir` into `buf`; a link longer than `buf`
/// comes back truncated, which is fine since the links looked at are short.
fn read_link_at<'b>(dir: &File, name: &OsStr, buf: &'b mut [u8]) -> io::Result<&'b [u8]> {
    let len = rustix::fs::readlinkat_raw(dir, name, &mut *buf)?;
    Ok(&buf[..len.min(buf.len())])
}

/// What each of `pid`'s fds is ([`kind_of_link`]),
/// counted. One readlink per fd, and for sockets one getxattr of their
/// protocol name: only for processes under suspicion, never per event.
pub fn fd_kinds(pid: u32) -> io::Result<FdKindCounts> {
    let path = format!("/proc/{pid}/fd");
    let dir = File::open(&path)?;
    let mut counts = FdKindCounts::new();
    let mut link = [0u8; 256];
    for entry in fs::read_dir(&path)? {
        let entry = entry?;
        let Ok(text) = read_link_at(&dir, &entry.file_name(), &mut link) else {
            continue;
        };
        let kind = kind_of_link(text, || socket_protocol(&entry.path()));
        *counts.entry(kind).or_default() += 1;
    }
    Ok(counts)
}

/// The protocol name of the socket behind an fd link (`TCP`, `UDPv6`,
/// `UNIX-STREAM`, ...), from its `system.sockprotoname` attribute: no
/// guessing from sock_diag tables, and CLOSE sockets included.
fn socket_protocol(fd_link: &std::path::Path) -> Option<String> {
    let mut name = [0u8; 32];
    let len = rustix::fs::getxattr(fd_link, "system.sockprotoname", &mut name).ok()?;
    let name = name.get(..len)?;
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    String::from_utf8(name[..end].to_vec()).ok()
}

/// The kind of one fd from its `/proc/PID/fd` link (`pipe:[123]`,
/// `anon_inode:[eventfd]`, `/var/log/x`); sockets are told apart by
/// their protocol name (`system.sockprotoname`: `TCP`, `UDPv6`, ...).
pub fn kind_of_link(link: &[u8], socket_protocol: impl FnOnce() -> Option<String>) -> &'static str {
    if link.starts_with(b"socket:[") {
        return match socket_protocol().as_deref() {
            Some("TCP" | "TCPv6") => "tcp",
            Some("UDP" | "UDPv6" | "UDP-Lite" | "UDPLITEv6") => "udp",
            Some(name) if name.starts_with("UNIX") => "unix",
            Some("NETLINK") => "netlink",
            _ => "other_socket",
        };
    }
    if link.starts_with(b"pipe:[") {
        return "pipe";
    }
    if let Some(anon) = link.strip_prefix(b"anon_inode:") {
        let name = anon.trim_ascii_start().strip_prefix(b"[").unwrap_or(anon);
        let name = name.strip_suffix(b"]").unwrap_or(name);
        return match name {
            b"eventfd" => "eventfd",
            b"eventpoll" => "eventpoll",
            b"inotify" => "inotify",
            b"timerfd" => "timerfd",
            b"signalfd" => "signalfd",
            b"pidfd" => "pidfd",
            _ => "other_anon_inode",
        };
    }
    if link.starts_with(b"/dev/") {
        return "device";
    }
    if link.starts_with(b"/") {
        return "file";
    }
    "other"
}

/// Every process id in /proc (thread-group leaders; threads are not listed).
pub fn all_pids() -> Vec<u32> {
    let entries = match fs::read_dir("/proc") {
        Ok(entries) => entries,
        Err(err) => {
            log::warn!("cannot list /proc: {err}");
            return Vec::new();
        }
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_name_their_kind() {
        let none = || None;
        assert_eq!(kind_of_link(b"pipe:[4242]", none), "pipe");
        assert_eq!(kind_of_link(b"anon_inode:[eventfd]", none), "eventfd");
        assert_eq!(kind_of_link(b"anon_inode:inotify", none), "inotify");
        assert_eq!(kind_of_link(b"/tmp/log", none), "file");
        assert_eq!(kind_of_link(b"/dev/null", none), "device");
        assert_eq!(kind_of_link(b"socket:[9]", || Some("TCPv6".into())), "tcp");
        assert_eq!(kind_of_link(b"socket:[9]", || Some("UDP".into())), "udp");
        assert_eq!(
            kind_of_link(b"socket:[9]", || Some("UNIX-STREAM".into())),
            "unix"
        );
        assert_eq!(kind_of_link(b"socket:[9]", none), "other_socket");
        assert_eq!(kind_of_link(b"net:[4026531840]", none), "other");
    }

    #[test]
    fn the_unified_cgroup_is_preferred() {
        let v1 = b"12:pids:/docker/abc\n11:memory:/docker/abc\n";
        assert_eq!(preferred_cgroup(v1), Some(&b"/docker/abc"[..]));
        let both = b"12:pids:/v1\n0::/system.slice/x.service\n";
        assert_eq!(
            preferred_cgroup(both),
            Some(&b"/system.slice/x.service"[..])
        );
        assert_eq!(preferred_cgroup(b"0::/\n"), Some(&b"/"[..]));
        // A path may hold colons and bytes that are not UTF-8.
        assert_eq!(
            preferred_cgroup(b"0::/a:b\x1b\xff\n"),
            Some(&b"/a:b\x1b\xff"[..])
        );
        assert_eq!(preferred_cgroup(b""), None);
        assert_eq!(preferred_cgroup(b"garbage\n"), None);
    }

    #[test]
    fn named_fields_parse() {
        let status = "Name:\tpython3\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t4242\nNgid:\t0\nPid:\t4243\n";
        assert_eq!(field::<u32>(status, "Tgid"), Some(4242));
        assert_eq!(field::<u32>("Name:\tx\n", "Tgid"), None);
        let fdinfo = "prog_id:\t77\nrun_time_ns:\t0\nrun_cnt:\t0\nrecursion_misses:\t15\n";
        assert_eq!(field::<u64>(fdinfo, "recursion_misses"), Some(15));
        assert_eq!(field::<u64>(fdinfo, "recursion"), None);
    }

    // These read our own process, which needs no privileges.
    fn own_pid() -> u32 {
        std::process::id()
    }

    #[test]
    fn own_process_facts() {
        let pid = own_pid();
        assert!(exists(pid));
        let (soft, hard) = nofile_limits(pid).expect("prlimit on self");
        assert!(soft > 0 && soft <= hard);
        assert!(all_pids().contains(&pid));
        // The test runs in the PID namespace it was started in.
        let status = fs::read_to_string("/proc/self/status").unwrap();
        let nspid: Option<String> = field(&status, "NSpid");
        let innermost = nspid.and_then(|pids| pids.split_whitespace().last()?.parse().ok());
        assert_eq!(innermost_nspid(pid), innermost);
        assert!(cgroup_path(pid).is_some_and(|path| path.starts_with(b"/")));
    }

    #[test]
    fn fd_count_matches_directory() {
        let pid = own_pid();
        // Hold a few extra fds so the count is not trivially small.
        let _files: Vec<File> = (0..3)
            .map(|_| File::open("/proc/self/stat").unwrap())
            .collect();
        let counted = fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count() as u64;
        // read_dir itself holds one fd while counting.
        let reported = fd_count(pid).unwrap();
        assert!(reported.abs_diff(counted) <= 1, "{reported} vs {counted}");
    }

    #[test]
    fn own_fds_by_kind() {
        let _listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (_read, _write) = std::io::pipe().unwrap();
        let kinds = fd_kinds(own_pid()).unwrap();
        assert!(kinds.get("tcp").is_some_and(|&n| n >= 1), "{kinds:?}");
        assert!(kinds.get("udp").is_some_and(|&n| n >= 1), "{kinds:?}");
        assert!(kinds.get("pipe").is_some_and(|&n| n >= 2), "{kinds:?}");
    }

    #[test]
    fn vanished_process_is_recognised() {
        // Pid numbers stop below 2^22 (PID_MAX_LIMIT), so this one never exists.
        let pid = 1 << 23;
        assert!(!exists(pid));
        assert!(is_vanished(&fd_count(pid).unwrap_err()));
        assert!(is_vanished(&fd_kinds(pid).unwrap_err()));
        assert!(is_vanished(&nofile_limits(pid).unwrap_err()));
    }
}
