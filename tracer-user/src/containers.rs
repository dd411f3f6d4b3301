//! Containers: which PID namespace, network namespace and container a process
//! belongs to, and the namespace target of `--container` / `--pidns`.
//!
//! A "container" here is whatever the kernel says: a PID namespace, usually
//! with its own network namespace, and a cgroup whose path carries the
//! runtime's container id (docker, containerd, cri-o, podman).

use std::{
    collections::{HashMap, VecDeque, hash_map::Entry},
    fs::{self, File},
    io,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use thiserror::Error;

use crate::{
    model::{Container, Labels},
    procfs, text,
};

#[derive(Debug, Error)]
pub enum TargetError {
    #[error("pid {0} does not exist")]
    NoSuchPid(u32),
    #[error("{path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("{0} is not a PID namespace (expected a path like /proc/PID/ns/pid)")]
    NotPidNamespace(PathBuf),
    #[error("no process lives in the PID namespace {0} (the container has stopped?)")]
    EmptyNamespace(PathBuf),
    #[error(
        "no container matches '{0}': it is not a running pid, the id (or the start of one) of a running container, or a name podman or docker knows"
    )]
    NoSuchContainer(String),
    #[error("'{prefix}' is the start of {} container ids: {}; give more of it", .ids.len(), .ids.join(", "))]
    AmbiguousContainer { prefix: String, ids: Vec<String> },
}

/// How the user named the container: `--container PID|ID|NAME` or
/// `--pidns PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetSpec {
    Container(String),
    Path(PathBuf),
}

impl TargetSpec {
    pub fn resolve(&self) -> Result<Target, TargetError> {
        match self {
            Self::Container(name) => Target::from_pid(container_member(name)?),
            Self::Path(path) => Target::from_path(path),
        }
    }
}

/// A host pid inside the container `name`: `name` itself when it is a
/// running pid; else a process whose cgroup carries a container id that
/// starts with `name` (the runtime's API is not needed); else the pid that
/// podman or docker gives for a container of that name.
fn container_member(name: &str) -> Result<u32, TargetError> {
    if let Ok(pid) = name.parse::<u32>()
        && procfs::exists(pid)
    {
        return Ok(pid);
    }
    let hex = name.len() >= 3 && name.bytes().all(|b| b.is_ascii_hexdigit());
    if hex {
        let members = procfs::all_pids().into_iter().filter_map(|pid| {
            let (_, id) = container_id(&String::from_utf8_lossy(&procfs::cgroup_path(pid)?))?;
            Some((id, pid))
        });
        if let Some(pid) = with_id_prefix(&name.to_ascii_lowercase(), members)? {
            return Ok(pid);
        }
    }
    runtime_pid(name).ok_or_else(|| TargetError::NoSuchContainer(name.to_string()))
}

/// A pid of the one container whose id starts with `prefix`, among
/// `members` (container id, pid); `None` when there is none.
fn with_id_prefix(
    prefix: &str,
    members: impl Iterator<Item = (String, u32)>,
) -> Result<Option<u32>, TargetError> {
    let mut matching: Vec<(String, u32)> =
        members.filter(|(id, _)| id.starts_with(prefix)).collect();
    matching.sort();
    matching.dedup_by(|a, b| a.0 == b.0);
    match &matching[..] {
        [] => Ok(None),
        [(_, pid)] => Ok(Some(*pid)),
        several => Err(TargetError::AmbiguousContainer {
            prefix: prefix.to_string(),
            ids: several.iter().map(|(id, _)| id[..12].to_string()).collect(),
        }),
    }
}

/// The host pid of the container named `name`, from the podman or docker
/// CLI where either is installed and knows it.
fn runtime_pid(name: &str) -> Option<u32> {
    ["podman", "docker"].into_iter().find_map(|runtime| {
        let out = std::process::Command::new(runtime)
            .args(["inspect", "--format", "{{.State.Pid}}", name])
            .stderr(std::process::Stdio::null())
            .output()
            .ok()?;
        let pid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
        (out.status.success() && pid > 0).then_some(pid)
    })
}

/// The container socktrace is pointed at.
#[derive(Debug)]
pub struct Target {
    /// Device and inode of the PID namespace file, for the kernel filter.
    pub pidns_dev: u64,
    pub pidns_ino: u64,
    /// A process inside, whose network namespace is the container's.
    pub member_pid: u32,
    pub netns_ino: u32,
    pub netns_path: PathBuf,
    /// Both namespaces, held open for the whole run: the kernel gives a
    /// freed namespace's inode number to the next one made, so once the
    /// container ended a new one (any other container starting) would
    /// pass the filter above and keep `is_alive` true. An open namespace
    /// file keeps the number taken.
    _namespaces: [File; 2],
}

// From linux/nsfs.h: _IO(0xb7, 0x3).
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// Whether `file` is a namespace file of type `CLONE_NEWPID`.
fn is_pid_namespace(file: &File) -> bool {
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the fd; on a
    // file that is not a namespace it fails with ENOTTY.
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
    kind == libc::CLONE_NEWPID
}

impl Target {
    /// The PID namespace of any process in the container.
    pub fn from_pid(pid: u32) -> Result<Self, TargetError> {
        if !procfs::exists(pid) {
            return Err(TargetError::NoSuchPid(pid));
        }
        Self::resolve(&PathBuf::from(format!("/proc/{pid}/ns/pid")), Some(pid))
    }

    /// `--pidns PATH`: a PID namespace file (e.g. /proc/PID/ns/pid or a bind mount).
    pub fn from_path(path: &Path) -> Result<Self, TargetError> {
        Self::resolve(path, None)
    }

    fn resolve(path: &Path, member: Option<u32>) -> Result<Self, TargetError> {
        let open_error = |source| TargetError::Open {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(open_error)?;
        if !is_pid_namespace(&file) {
            return Err(TargetError::NotPidNamespace(path.to_owned()));
        }
        let meta = file.metadata().map_err(open_error)?;
        let member_pid = match member {
            Some(pid) => pid,
            None => procfs::all_pids()
                .into_iter()
                .find(|&pid| pidns_of(pid) == Some(meta.ino()))
                .ok_or_else(|| TargetError::EmptyNamespace(path.to_owned()))?,
        };
        let netns_path = PathBuf::from(format!("/proc/{member_pid}/ns/net"));
        let netns_open_error = |source| TargetError::Open {
            path: netns_path.clone(),
            source,
        };
        let netns = File::open(&netns_path).map_err(netns_open_error)?;
        let netns_ino = netns.metadata().map_err(netns_open_error)?.ino() as u32;
        Ok(Self {
            pidns_dev: meta.dev(),
            pidns_ino: meta.ino(),
            member_pid,
            netns_ino,
            netns_path,
            _namespaces: [file, netns],
        })
    }

    /// Whether any process still lives in the namespace.
    pub fn is_alive(&self) -> bool {
        pidns_of(self.member_pid) == Some(self.pidns_ino)
            || procfs::all_pids()
                .into_iter()
                .any(|pid| pidns_of(pid) == Some(self.pidns_ino))
    }
}

/// Inode of the PID namespace of `pid`.
pub fn pidns_of(pid: u32) -> Option<u64> {
    fs::metadata(format!("/proc/{pid}/ns/pid"))
        .ok()
        .map(|m| m.ino())
}

/// How long an exited process's labels stay: its sockets go on changing
/// state after the exit event (the kernel closes its fds just after it, and
/// the peers answer later), and those events are still the dead process's.
const EXITED_KEPT_NS: u64 = 60_000_000_000;

/// Reads labels once per process; socket events only look them up. Holds
/// the live processes and those that exited within [`EXITED_KEPT_NS`], no
/// more: a host that starts thousands of processes a minute does not grow
/// it.
#[derive(Default)]
pub struct LabelCache {
    host_pidns: Option<u64>,
    by_pid: HashMap<u32, Cached>,
    /// Exits, oldest first (pid, when), for expiring their labels.
    exits: VecDeque<(u32, u64)>,
    last_exit_ns: u64,
}

struct Cached {
    labels: Labels,
    /// When the process started (/proc/PID/stat), to tell a new process
    /// that took the pid of one that exited.
    started: Option<u64>,
    exited_at_ns: Option<u64>,
}

impl LabelCache {
    pub fn new() -> Self {
        Self {
            // socktrace runs on the host: its own namespace is the host's.
            host_pidns: pidns_of(std::process::id()),
            ..Self::default()
        }
    }

    pub fn get(&mut self, pid: u32) -> &Labels {
        &self.entry(pid).labels
    }

    /// Fills in what the kernel reported (the pid inside the target
    /// namespace) where /proc could not tell, e.g. the process has exited.
    pub fn learn(&mut self, pid: u32, nspid: u32, pidns: Option<u64>) {
        let labels = &mut self.entry(pid).labels;
        labels.nspid.get_or_insert(nspid);
        if labels.pidns.is_none() {
            labels.pidns = pidns;
        }
    }

    /// The process exited at `ktime_ns`: its labels stay a while for the
    /// sockets it left, and those of processes gone longer are dropped.
    pub fn forget(&mut self, pid: u32, ktime_ns: u64) {
        self.last_exit_ns = self.last_exit_ns.max(ktime_ns);
        if let Some(cached) = self.by_pid.get_mut(&pid) {
            cached.exited_at_ns = Some(ktime_ns);
            self.exits.push_back((pid, ktime_ns));
        }
        let cutoff = ktime_ns.saturating_sub(EXITED_KEPT_NS);
        while let Some(&(pid, at)) = self.exits.front()
            && at <= cutoff
        {
            self.exits.pop_front();
            // Unless the pid was taken again, or exited again since.
            if self.by_pid.get(&pid).and_then(|c| c.exited_at_ns) == Some(at) {
                self.by_pid.remove(&pid);
            }
        }
    }

    fn entry(&mut self, pid: u32) -> &mut Cached {
        let (host_pidns, last_exit_ns) = (self.host_pidns, self.last_exit_ns);
        let exits = &mut self.exits;
        let mut fresh = || {
            let started = procfs::start_time(pid);
            // Gone already (its exit came first): expires as if it had
            // exited with the latest exit seen.
            let exited_at_ns = started.is_none().then(|| {
                exits.push_back((pid, last_exit_ns));
                last_exit_ns
            });
            Cached {
                started,
                labels: read_labels(pid, host_pidns),
                exited_at_ns,
            }
        };
        match self.by_pid.entry(pid) {
            Entry::Occupied(mut entry) => {
                let cached = entry.get();
                // A process that exited keeps its labels, unless another
                // one runs under its pid now.
                if cached.exited_at_ns.is_some()
                    && procfs::start_time(pid).is_some_and(|now| Some(now) != cached.started)
                {
                    entry.insert(fresh());
                }
                entry.into_mut()
            }
            Entry::Vacant(entry) => entry.insert(fresh()),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_pid.len()
    }
}

fn read_labels(pid: u32, host_pidns: Option<u64>) -> Labels {
    let pidns = pidns_of(pid);
    let in_container = pidns.is_some() && pidns != host_pidns;
    Labels {
        nspid: procfs::innermost_nspid(pid),
        pidns,
        container: procfs::cgroup_path(pid)
            .map(|path| {
                // Ids are hex: one in a path that is not UTF-8 is still found.
                let shown = text::shown(&path);
                let (runtime, id) = container_id(&String::from_utf8_lossy(&path)).unzip();
                Container {
                    id,
                    runtime,
                    cgroup: shown.into_owned(),
                }
            })
            // A host process in the root cgroup is not "in a container".
            .filter(|c| c.id.is_some() || in_container),
    }
}

/// Runtime and 64-hex-digit container id from a cgroup path such as
/// `/system.slice/docker-<id>.scope`, `/docker/<id>`,
/// `/kubepods.slice/.../cri-containerd-<id>.scope`, `/.../crio-<id>.scope`,
/// `/machine.slice/libpod-<id>.scope`, `/kubepods/burstable/pod.../<id>`.
pub fn container_id(path: &str) -> Option<(&'static str, String)> {
    const PREFIXES: [(&str, &str); 5] = [
        ("docker-", "docker"),
        ("cri-containerd-", "containerd"),
        ("crio-", "cri-o"),
        ("libpod-", "podman"),
        ("containerd-", "containerd"),
    ];
    let is_id = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    for (i, segment) in segments.iter().enumerate().rev() {
        let name = segment.strip_suffix(".scope").unwrap_or(segment);
        for (prefix, runtime) in PREFIXES {
            if let Some(id) = name.strip_prefix(prefix)
                && is_id(id)
            {
                return Some((runtime, id.to_string()));
            }
        }
        if is_id(name) {
            let parent = i.checked_sub(1).map(|p| segments[p]).unwrap_or_default();
            let runtime = if parent == "docker" {
                "docker"
            } else if path.contains("kubepods") {
                "containerd"
            } else {
                "docker"
            };
            return Some((runtime, name.to_string()));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use std::process::{Command, Stdio};

    use super::*;

    const SECOND_NS: u64 = 1_000_000_000;

    fn exited_child() -> u32 {
        let mut child = Command::new("true").spawn().expect("spawning true");
        let pid = child.id();
        child.wait().expect("waiting for true");
        pid
    }

    #[test]
    fn labels_of_exited_processes_go_after_a_minute() {
        let mut cache = LabelCache::new();
        // A churn of processes, one a second for five minutes, each looked
        // up again after its exit, as its last sockets' events come.
        for second in 0..300 {
            let pid = exited_child();
            cache.get(pid);
            cache.forget(pid, second * SECOND_NS);
            cache.get(pid);
        }
        assert!(cache.len() <= 62, "{} entries kept", cache.len());
    }

    #[test]
    fn an_exited_process_keeps_its_labels_until_another_takes_its_pid() {
        let mut cache = LabelCache::new();
        let mut child = Command::new("sleep")
            .arg("30")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawning sleep");
        let pid = child.id();
        let started = procfs::start_time(pid);
        assert!(started.is_some());
        cache.get(pid);
        // Exited, not yet reaped: the same process.
        cache.forget(pid, 10 * SECOND_NS);
        cache.get(pid);
        assert_eq!(cache.by_pid[&pid].started, started);
        assert_eq!(cache.by_pid[&pid].exited_at_ns, Some(10 * SECOND_NS));
        // As if the pid had been someone else's before: read again.
        cache.by_pid.get_mut(&pid).expect("cached").started = Some(1);
        cache.get(pid);
        assert_eq!(cache.by_pid[&pid].started, started);
        assert_eq!(cache.by_pid[&pid].exited_at_ns, None);
        // Its expiry does not drop the new process's labels.
        cache.forget(exited_child(), 80 * SECOND_NS);
        assert!(cache.by_pid.contains_key(&pid));
        let _ = child.kill();
        let _ = child.wait();
    }

    const ID: &str = "4f7c0d1b2a3e4f5061728394a5b6c7d8e9f00112233445566778899aabbccdd0";

    #[test]
    fn container_ids_of_each_runtime() {
        let cases = [
            (format!("/system.slice/docker-{ID}.scope"), "docker"),
            (format!("/docker/{ID}"), "docker"),
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-{ID}.scope"
                ),
                "containerd",
            ),
            (
                format!("/kubepods.slice/kubepods-pod2.slice/crio-{ID}.scope"),
                "cri-o",
            ),
            (
                format!("/machine.slice/libpod-{ID}.scope/container"),
                "podman",
            ),
            (format!("/kubepods/burstable/pod3/{ID}"), "containerd"),
        ];
        for (path, runtime) in cases {
            assert_eq!(
                container_id(&path),
                Some((runtime, ID.to_string())),
                "{path}"
            );
        }
        assert_eq!(
            container_id("/user.slice/user-0.slice/session-1.scope"),
            None
        );
        assert_eq!(container_id("/"), None);
    }

    #[test]
    fn a_container_is_named_by_a_unique_start_of_its_id() {
        let other = "4f7c99aa".repeat(8);
        let members = || {
            [
                (ID.to_string(), 10),
                (ID.to_string(), 11),
                (other.clone(), 20),
            ]
            .into_iter()
        };
        assert_eq!(with_id_prefix(ID, members()).unwrap(), Some(10));
        assert_eq!(with_id_prefix("4f7c0", members()).unwrap(), Some(10));
        assert_eq!(with_id_prefix("4f7c9", members()).unwrap(), Some(20));
        assert_eq!(with_id_prefix("abc", members()).unwrap(), None);
        let err = with_id_prefix("4f7c", members()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "'4f7c' is the start of 2 container ids: 4f7c0d1b2a3e, 4f7c99aa4f7c; give more of it"
        );
        // A running pid is a pid; nothing else matches a made-up name.
        assert_eq!(
            container_member(&std::process::id().to_string()).unwrap(),
            std::process::id()
        );
        assert!(matches!(
            container_member("no-such-container"),
            Err(TargetError::NoSuchContainer(_))
        ));
    }

    #[test]
    fn rejects_a_path_that_is_not_a_pid_namespace() {
        assert!(matches!(
            Target::from_path(Path::new("/proc/self/ns/net")),
            Err(TargetError::NotPidNamespace(_))
        ));
        assert!(matches!(
            Target::from_path(Path::new("/etc/hostname")),
            Err(TargetError::NotPidNamespace(_)) | Err(TargetError::Open { .. })
        ));
        assert!(matches!(
            Target::from_pid(999_999_999),
            Err(TargetError::NoSuchPid(_))
        ));
        let own = Target::from_path(Path::new("/proc/self/ns/pid")).unwrap();
        assert_eq!(Some(own.pidns_ino), pidns_of(std::process::id()));
    }

    /// A container that ended stays ended, even when the next namespace
    /// made gets its inode number (the kernel reuses a freed one).
    #[test]
    fn an_ended_container_is_not_taken_for_the_next_one() {
        if !rustix::process::geteuid().is_root() {
            println!("SKIPPED: unshare --pid needs root");
            return;
        }
        let in_new_pidns = |command: &str| {
            std::process::Command::new("unshare")
                .args(["--pid", "--fork", "sh", "-c", command])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("running unshare")
        };
        let ended = in_new_pidns("sleep 0.5");
        // unshare's one child is the namespace's pid 1.
        let children = format!("/proc/{0}/task/{0}/children", ended.id());
        let init = (0..100)
            .find_map(|_| {
                std::thread::sleep(std::time::Duration::from_millis(10));
                std::fs::read_to_string(&children).ok()?.trim().parse().ok()
            })
            .expect("the namespace's pid 1");
        let target = Target::from_pid(init).unwrap();
        assert!(target.is_alive());
        assert!(ended.wait_with_output().unwrap().status.success());
        // Time for the kernel to free the namespace, were it not held.
        std::thread::sleep(std::time::Duration::from_secs(1));
        let next = in_new_pidns("stat -L -c %i /proc/self/ns/pid; sleep 0.5");
        let next_ino = String::from_utf8(next.wait_with_output().unwrap().stdout).unwrap();
        assert_ne!(next_ino.trim(), target.pidns_ino.to_string());
        assert!(!target.is_alive());
    }
}
