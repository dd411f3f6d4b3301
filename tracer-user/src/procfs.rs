//! Cheap per-process facts from /proc.
//!
//! Called once per tick per process (or once at start-up), never per event.
//! A process that exits between two reads is normal: such errors keep their
//! `io::Error` kind (`NotFound`, or raw `ESRCH` from syscalls), and
//! [`is_vanished`] tells them apart from real failures.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;

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
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a null new-limit pointer only reads the limit, and `limit` is a
    // valid, writable rlimit for the kernel to fill.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut limit) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        // prlimit on another user's process needs CAP_SYS_RESOURCE; the
        // world-readable /proc/PID/limits says the same without it.
        if err.raw_os_error() == Some(libc::EPERM) {
            let limits = fs::read_to_string(format!("/proc/{pid}/limits"))?;
            return parse_nofile_limits(&limits).ok_or(err);
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

/// The "Max open files" line of /proc/PID/limits: soft and hard limit.
fn parse_nofile_limits(limits: &str) -> Option<(u64, u64)> {
    let line = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?;
    let mut values = line.split_whitespace().map(|value| match value {
        "unlimited" => Some(u64::MAX),
        number => number.parse().ok(),
    });
    Some((values.next()??, values.next()??))
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

/// Reads the symlink `name` inside `dir` into `buf`; a link longer than `buf`
/// comes back truncated, which is fine since socket links are short.
fn read_link_at<'b>(dir: &File, name: &OsStr, buf: &'b mut [u8]) -> io::Result<&'b [u8]> {
    // fd names are decimal numbers, so a small stack buffer holds them.
    let mut c_name = [0u8; 24];
    let name = name.as_bytes();
    if name.len() >= c_name.len() {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    c_name[..name.len()].copy_from_slice(name);
    // SAFETY: `c_name` is NUL-terminated (zeroed, and `name` is shorter than
    // it), `dir` is an open directory fd, and the kernel writes at most
    // `buf.len()` bytes into `buf`.
    let len = unsafe {
        libc::readlinkat(
            dir.as_raw_fd(),
            c_name.as_ptr().cast(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    let len = usize::try_from(len).map_err(|_| io::Error::last_os_error())?;
    Ok(&buf[..len.min(buf.len())])
}

/// What each of `pid`'s fds is (`crate::watch::fd_kinds::kind_of_link`),
/// counted. One readlink per fd, and for sockets one getxattr of their
/// protocol name: only for processes under suspicion, never per event.
pub fn fd_kinds(pid: u32) -> io::Result<crate::watch::FdKindCounts> {
    let path = format!("/proc/{pid}/fd");
    let dir = File::open(&path)?;
    let mut counts = crate::watch::FdKindCounts::new();
    let mut link = [0u8; 256];
    for entry in fs::read_dir(&path)? {
        let entry = entry?;
        let Ok(text) = read_link_at(&dir, &entry.file_name(), &mut link) else {
            continue;
        };
        let kind = crate::watch::fd_kinds::kind_of_link(text, || socket_protocol(&entry.path()));
        *counts.entry(kind).or_default() += 1;
    }
    Ok(counts)
}

/// The protocol name of the socket behind an fd link (`TCP`, `UDPv6`,
/// `UNIX-STREAM`, ...), from its `system.sockprotoname` attribute: no
/// guessing from sock_diag tables, and CLOSE sockets included.
fn socket_protocol(fd_link: &std::path::Path) -> Option<String> {
    let path = std::ffi::CString::new(fd_link.as_os_str().as_bytes()).ok()?;
    let mut name = [0u8; 32];
    // SAFETY: both strings are NUL-terminated, and the kernel writes at most
    // `name.len()` bytes into `name`.
    let len = unsafe {
        libc::getxattr(
            path.as_ptr(),
            c"system.sockprotoname".as_ptr(),
            name.as_mut_ptr().cast(),
            name.len(),
        )
    };
    let len = usize::try_from(len).ok()?;
    let name = name.get(..len)?;
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    String::from_utf8(name[..end].to_vec()).ok()
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
    fn limits_file_parses() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             95737                95737                processes \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(parse_nofile_limits(limits), Some((1024, 524288)));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(parse_nofile_limits(unlimited), Some((u64::MAX, u64::MAX)));
        assert_eq!(parse_nofile_limits("Max processes 1 1\n"), None);
        let own = fs::read_to_string("/proc/self/limits").unwrap();
        let (soft, hard) = parse_nofile_limits(&own).unwrap();
        assert!(soft > 0 && soft <= hard);
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
        assert!(soft <= hard);
        assert!(all_pids().contains(&pid));
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
