//! Stage 1: the kernel programs. Loads them with this kernel's offsets and the
//! user's filters, picks the richest probe mode the kernel allows, attaches,
//! and exposes the event ring buffer and the loss counters.

pub mod features;
pub mod layout;

use std::{
    collections::HashMap as StdHashMap,
    fmt,
    io::Read as _,
    os::fd::{AsFd as _, AsRawFd as _},
    path::PathBuf,
};

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, RingBuf},
    programs::{BtfTracePoint, FEntry, Iter, KProbe, Program, TracePoint},
};
use tracer_common::{
    CONFIG_GLOBAL, COUNTERS_MAP, Config, EVENTS_MAP, NS_FILTER_MAP, NamespaceFilter, OwnerSource,
    PID_FILTER_MAP, SEEDED_MAP, SOCKET_FILES_PROGRAM, SOCKETS_MAP, SocketEntry, SocketOwner,
    TASK_COMM_LEN, counter,
};

pub use features::{Attach, AttachRequest, ModeRequest, ProbeMode};

use crate::{
    decode::decode_socket_files,
    model::{Comm, ExistingSocket, one_per_socket},
    privileges, procfs,
    sockets::KernelView,
    text,
};

/// Map update flags (include/uapi/linux/bpf.h): only a new key, only an
/// existing one.
const MAP_UPDATE_NEW: u64 = 1;
const MAP_UPDATE_EXISTING: u64 = 2;

/// The kernel programs, compiled by build.rs and embedded in the binary.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/socktrace"));

/// Hooks with a BTF-typed variant: (category, tracepoint, classic program,
/// BTF programs). The BTF programs get the kernel's own arguments (no
/// record built per event) and keep the state in socket storage; the
/// `_nested` ones run for the events the kernel does not let the first run
/// (a softirq that lands in it on the same CPU).
const TYPED_HOOKS: [(&str, &str, &str, &[&str]); 4] = [
    (
        "sock",
        "inet_sock_set_state",
        "inet_sock_set_state",
        &["inet_sock_set_state_btf", "inet_sock_set_state_btf_nested"],
    ),
    (
        "tcp",
        "tcp_destroy_sock",
        "tcp_destroy_sock",
        &["tcp_destroy_sock_btf", "tcp_destroy_sock_btf_nested"],
    ),
    (
        "tcp",
        "tcp_retransmit_skb",
        "tcp_retransmit_skb",
        &["tcp_retransmit_skb_btf"],
    ),
    (
        "sched",
        "sched_process_exit",
        "sched_process_exit",
        &["sched_process_exit_btf"],
    ),
];

/// BTF programs whose partner makes up for every skip of theirs that could
/// lose something: the kernel's count of their skipped runs is no loss.
/// (A destroy matters only for a socket with storage, and the storage tells
/// `tcp_destroy_sock_btf_nested` whether the first program took it.)
const SKIPS_MADE_UP_FOR: [&str; 1] = ["tcp_destroy_sock_btf"];

/// Classic tracepoints either way: system call tracepoints have no
/// BTF-typed variant. (category, name, program).
const CLASSIC_ONLY: [(&str, &str, &str); 2] = [
    ("syscalls", "sys_exit_accept4", "accept4_exit"),
    ("syscalls", "sys_exit_accept", "accept_exit"),
];

/// The collector is woken each time the records waiting cross another
/// eighth of the ring buffer; otherwise it drains on its tick
/// (`collector::RunOptions::tick`).
const WAKEUP_FRACTION: u32 = 8;

/// Kernel functions whose entry is probed in the fentry and kprobe modes.
const OWNER_FUNCTIONS: [&str; 2] = ["tcp_connect", "tcp_close"];

/// What the kernel programs are loaded with. The default: host-wide, no
/// filter, default sizes, the best mode and attach type the kernel allows.
#[derive(Clone, Debug)]
pub struct ProbeOptions {
    /// Only report sockets owned by these processes (empty: all).
    pub pids: Vec<u32>,
    pub port: Option<u16>,
    /// `AF_INET` or `AF_INET6`; `None` for both.
    pub family: Option<u16>,
    pub ring_bytes: u32,
    pub max_sockets: u32,
    pub mode: ModeRequest,
    pub attach: AttachRequest,
    /// Only sockets of one container.
    pub namespace: Option<NamespaceFilter>,
    /// How long the kernel may hold a socket's transitions before it
    /// reports them (`tracer_common::Config::hold_ns`): for the commands
    /// that aggregate. `trace` shows each transition as it happens (0).
    pub hold_ns: u64,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        Self {
            pids: Vec::new(),
            port: None,
            family: None,
            ring_bytes: tracer_common::DEFAULT_RING_BYTES,
            max_sockets: tracer_common::DEFAULT_MAX_SOCKETS,
            mode: ModeRequest::Auto,
            attach: AttachRequest::Auto,
            namespace: None,
            hold_ns: 0,
        }
    }
}

pub struct Probes {
    ebpf: Ebpf,
    pub mode: ProbeMode,
    /// How the hooks with a BTF-typed variant are attached, and so where
    /// the per-socket state lives.
    pub attach: Attach,
    /// Owns the aya-log map: it must live as long as the programs.
    pub logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// The programs' skipped runs when they were detached (their fds, which
    /// report them, are gone then).
    missed_runs_at_detach: Option<u64>,
}

/// Loss counters summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub lost_events: u64,
    pub socket_map_full: u64,
    /// Records the collector could not decode (counted in userspace).
    pub undecodable: u64,
    /// Program runs the kernel skipped because another BPF program was
    /// running on that CPU (`recursion_misses`); their events never exist.
    pub missed_runs: u64,
    /// Sockets whose end never reached the collector, with no loss counted
    /// for it: found when a new socket started at the address of one still
    /// tracked as open (counted in userspace).
    pub ends_unseen: u64,
    /// Sockets the collector repaired from the kernel's file tables after
    /// losses (counted in userspace).
    pub reconciled: u64,
}

impl Counters {
    /// Events that never reached the reports, whatever the reason.
    pub fn lost(&self) -> u64 {
        self.lost_events + self.undecodable + self.missed_runs + self.ends_unseen
    }

    /// Everything that can leave the socket stage wrong: lost events and
    /// sockets the kernel could not track.
    pub fn losses(&self) -> u64 {
        self.lost() + self.socket_map_full
    }
}

impl Probes {
    pub fn load(options: &ProbeOptions) -> anyhow::Result<Self> {
        let tracefs: PathBuf = layout::tracefs()?;
        let btf = layout::load_btf(std::path::Path::new(layout::BTF_PATH))?;
        let layout = layout::discover(&tracefs, &btf)?;
        drop(btf);
        // Parsed once, for the loader's relocations and the BTF targets.
        let kernel_btf = aya::Btf::from_sys_fs().map_err(|e| anyhow!("reading kernel BTF: {e}"))?;
        let mut failure = None;
        for &attach in options.attach.candidates() {
            match Self::load_as(options, layout, &kernel_btf, attach) {
                Ok(probes) => {
                    release_freed_memory();
                    return Ok(probes);
                }
                Err(e) if options.attach == AttachRequest::Auto && attach == Attach::TpBtf => {
                    log::debug!("{attach} unavailable: {e:#}");
                    failure = Some(e);
                }
                // A forced probe mode that fails is not the attach type's
                // fault.
                Err(e) if e.downcast_ref::<ModeUnusable>().is_some() => return Err(e),
                Err(e) if options.attach != AttachRequest::Auto => {
                    return Err(e.context(format!("--attach {attach} is not usable here")));
                }
                Err(e) => return Err(e),
            }
        }
        Err(failure.unwrap_or_else(|| anyhow!("no attach type is usable")))
    }

    /// Loads the object for one attach type (the globals differ) and
    /// attaches everything.
    fn load_as(
        options: &ProbeOptions,
        layout: tracer_common::Layout,
        kernel_btf: &aya::Btf,
        attach: Attach,
    ) -> anyhow::Result<Self> {
        let sk_storage = attach == Attach::TpBtf;
        let config = Config {
            layout,
            self_tgid: std::process::id(),
            filter_pids: u32::from(!options.pids.is_empty()),
            filter_port: options.port.unwrap_or(0),
            filter_family: options.family.unwrap_or(0),
            wakeup_bytes: options.ring_bytes / WAKEUP_FRACTION,
            sk_storage: u32::from(sk_storage),
            hold_ns: options.hold_ns,
        };
        let mut ebpf = EbpfLoader::new()
            .btf(Some(kernel_btf))
            .override_global(CONFIG_GLOBAL, &config, true)
            .map_max_entries(EVENTS_MAP, options.ring_bytes)
            .map_max_entries(SOCKETS_MAP, options.max_sockets)
            .map_max_entries(SEEDED_MAP, options.max_sockets)
            .load(EBPF_OBJECT)
            .map_err(|e| {
                let hint = privileges::refusal_hint(&e);
                anyhow!(
                    "loading the eBPF object failed: {}{hint}",
                    text::one_line(&e)
                )
            })?;
        // Before any program loads: programs that log need the log map.
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(e) => {
                log::debug!("kernel-side logging unavailable: {e}");
                None
            }
        };

        if !options.pids.is_empty() {
            let mut filter: HashMap<_, u32, u8> = HashMap::try_from(
                ebpf.map_mut(PID_FILTER_MAP)
                    .context("map PID_FILTER missing")?,
            )?;
            for &pid in &options.pids {
                filter
                    .insert(pid, 1, 0)
                    .with_context(|| format!("adding pid {pid} to the kernel filter"))?;
            }
        }

        if let Some(filter) = options.namespace {
            // Set before attaching, so every owner is checked against it.
            set_namespace_filter(&mut ebpf, filter)?;
        }

        for (category, name, classic, typed) in TYPED_HOOKS {
            match attach {
                Attach::TpBtf => {
                    for program in typed {
                        attach_btf_tracepoint(&mut ebpf, kernel_btf, name, program)?;
                    }
                }
                Attach::Tracepoint => attach_tracepoint(&mut ebpf, category, name, classic)?,
            }
        }
        for (category, name, program) in CLASSIC_ONLY {
            attach_tracepoint(&mut ebpf, category, name, program)?;
        }
        load_socket_files(&mut ebpf, kernel_btf)?;
        let mode = attach_owner_probes(&mut ebpf, kernel_btf, options.mode)?;
        Ok(Self {
            ebpf,
            mode,
            attach,
            logger,
            missed_runs_at_detach: None,
        })
    }

    /// Every TCP socket that a process holds, from the kernel's file tables
    /// (one record per holder), and each holder recorded in the socket map
    /// for sockets the probes had no owner for. Sockets in CLOSE come as
    /// [`TcpState::ClosedHeld`].
    pub fn socket_files(&mut self) -> anyhow::Result<Vec<ExistingSocket>> {
        let mut bytes = Vec::new();
        self.socket_file_pass()?
            .read_to_end(&mut bytes)
            .context("reading the socket-file iterator")?;
        Ok(decode_socket_files(&bytes)?)
    }

    /// One pass of the socket-file iterator: each pass needs a link of its
    /// own, since reading one to the end consumes it.
    fn socket_file_pass(&mut self) -> anyhow::Result<std::fs::File> {
        let iter: &mut Iter = self
            .ebpf
            .program_mut(SOCKET_FILES_PROGRAM)
            .context("program socket_files missing")?
            .try_into()?;
        let link = iter
            .attach()
            .and_then(|id| iter.take_link(id))
            .context("attaching the socket-file iterator")?;
        link.into_file().context("opening the socket-file iterator")
    }

    /// The kernel calls the running collector makes, each once: the loss
    /// counters read, and an iterator pass opened (its first page read).
    /// Capabilities are dropped only as far as these still work.
    pub fn check_steady_state(&mut self) -> anyhow::Result<()> {
        self.counters()?;
        self.socket_file_pass()?
            .read(&mut [0; 4096])
            .context("reading the socket-file iterator")?;
        Ok(())
    }

    pub fn take_events(&mut self) -> anyhow::Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map(EVENTS_MAP)
            .context("map EVENTS missing")?;
        Ok(RingBuf::try_from(map)?)
    }

    pub fn counters(&self) -> anyhow::Result<Counters> {
        let map: PerCpuArray<_, u64> = PerCpuArray::try_from(
            self.ebpf
                .map(COUNTERS_MAP)
                .context("map COUNTERS missing")?,
        )?;
        let sum = |index: u32| -> anyhow::Result<u64> { Ok(map.get(&index, 0)?.iter().sum()) };
        Ok(Counters {
            lost_events: sum(counter::LOST_EVENTS)?,
            socket_map_full: sum(counter::SOCKET_MAP_FULL)?,
            undecodable: 0,
            // The kernel counts as skipped the runs a nested program then
            // made up for.
            missed_runs: self.missed_runs().saturating_sub(sum(counter::RESCUED)?),
            ends_unseen: 0,
            reconciled: 0,
        })
    }

    /// Detaches and unloads every probe, so that nothing more enters the
    /// ring buffer and it can be drained to the end. The maps stay readable,
    /// and the socket-file iterator stays loaded: it writes nothing to the
    /// ring, and the last tick looks up the holders of sockets still
    /// waiting for their owner with it.
    pub fn detach(&mut self) {
        self.missed_runs_at_detach = Some(self.missed_runs());
        // The probes of the modes not chosen were never loaded.
        let loaded = self
            .ebpf
            .programs_mut()
            .filter(|(_, program)| program.fd().is_ok());
        for (name, program) in loaded {
            let unloaded = match program {
                Program::TracePoint(p) => p.unload(),
                Program::KProbe(p) => p.unload(),
                Program::FEntry(p) => p.unload(),
                Program::BtfTracePoint(p) => p.unload(),
                _ => Ok(()),
            };
            if let Err(e) = unloaded {
                log::warn!("detaching {name}: {e}");
            }
        }
    }

    /// `recursion_misses` summed over our loaded programs, from their fdinfo
    /// (aya does not expose it); 0 on kernels before 5.12, which lack it.
    fn missed_runs(&self) -> u64 {
        if let Some(missed) = self.missed_runs_at_detach {
            return missed;
        }
        self.ebpf
            .programs()
            // A `_nested` program is skipped only while its partner runs
            // the event: nothing is lost then.
            .filter(|(name, _)| !name.ends_with("_nested") && !SKIPS_MADE_UP_FOR.contains(name))
            .filter_map(|(_, program)| program.fd().ok())
            .filter_map(|fd| {
                let fd = fd.as_fd().as_raw_fd();
                let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
                procfs::field::<u64>(&info, "recursion_misses")
            })
            .sum()
    }

    /// Stops restricting reports to one container (it has stopped).
    pub fn clear_namespace_filter(&mut self) -> anyhow::Result<()> {
        set_namespace_filter(&mut self.ebpf, NamespaceFilter::default())
    }

    /// Records an owner learned in userspace (from the file tables) in the
    /// kernel's socket map, so later events carry it and the filters apply.
    /// A socket with no entry there gets one, except with BTF tracepoints,
    /// where its state may be in socket storage, which cannot be written by
    /// address from here: the owner goes to the map the programs take it
    /// from at the socket's next event (and if the socket has storage
    /// already, the socket stage keeps the owner it learned).
    pub fn set_owner(
        &mut self,
        sock_id: u64,
        tgid: u32,
        comm: &str,
        state: u8,
        in_pidns: bool,
    ) -> anyhow::Result<()> {
        let learned = |owner: &mut SocketOwner| {
            owner.tgid = tgid;
            owner.source = OwnerSource::ProcFd as u8;
            owner.in_pidns = u8::from(in_pidns);
            owner.comm = [0; TASK_COMM_LEN];
            let len = comm.len().min(TASK_COMM_LEN - 1);
            owner.comm[..len].copy_from_slice(&comm.as_bytes()[..len]);
        };
        let mut sockets: HashMap<_, u64, SocketEntry> = HashMap::try_from(
            self.ebpf
                .map_mut(SOCKETS_MAP)
                .context("map SOCKETS missing")?,
        )?;
        // The entry is written back whole, so only over the one read (a
        // socket freed meanwhile is not brought back as a stale entry), or
        // only as a new one (one the kernel made meanwhile is not
        // overwritten). Either refusal means the socket moved on: the socket
        // stage keeps the owner.
        let (mut entry, only_if) = match sockets.get(&sock_id, 0) {
            Ok(entry) => (entry, MAP_UPDATE_EXISTING),
            Err(_) if self.attach == Attach::TpBtf => {
                let mut seeded: HashMap<_, u64, SocketOwner> = HashMap::try_from(
                    self.ebpf
                        .map_mut(SEEDED_MAP)
                        .context("map SEEDED missing")?,
                )?;
                let mut owner = seeded.get(&sock_id, 0).unwrap_or(SocketOwner {
                    state,
                    ..SocketOwner::default()
                });
                learned(&mut owner);
                seeded.insert(sock_id, owner, 0)?;
                return Ok(());
            }
            Err(_) => {
                let mut entry = SocketEntry::default();
                entry.owner.state = state;
                entry.held.from_state = state;
                (entry, MAP_UPDATE_NEW)
            }
        };
        learned(&mut entry.owner);
        match sockets.insert(sock_id, entry, only_if) {
            Err(MapError::SyscallError(e))
                if matches!(e.io_error.raw_os_error(), Some(libc::EEXIST | libc::ENOENT)) =>
            {
                log::debug!("socket {sock_id:#x} changed while its owner was recorded");
                Ok(())
            }
            written => Ok(written?),
        }
    }
}

impl KernelView for Probes {
    fn holders(&mut self, sock_ids: &[u64]) -> StdHashMap<u64, (u32, Comm)> {
        let files = match self.socket_files() {
            Ok(files) => files,
            Err(e) => {
                log::warn!("looking up socket holders: {e:#}");
                return StdHashMap::new();
            }
        };
        let wanted: std::collections::HashSet<u64> = sock_ids.iter().copied().collect();
        one_per_socket(files)
            .into_iter()
            .filter(|file| wanted.contains(&file.sock_id))
            .filter_map(|file| Some((file.sock_id, (file.owner.pid?, file.owner.comm))))
            .collect()
    }
}

/// Loads the socket-file iterator; it is attached for each pass.
fn load_socket_files(ebpf: &mut Ebpf, btf: &aya::Btf) -> anyhow::Result<()> {
    let iter: &mut Iter = ebpf
        .program_mut(SOCKET_FILES_PROGRAM)
        .context("program socket_files missing from the eBPF object")?
        .try_into()?;
    iter.load("task_file", btf).map_err(|e| {
        anyhow!(
            "loading the socket-file iterator (iter/task_file, Linux 5.8 or later) failed: {e:#}"
        )
    })
}

fn set_namespace_filter(ebpf: &mut Ebpf, filter: NamespaceFilter) -> anyhow::Result<()> {
    let mut map: Array<_, NamespaceFilter> = Array::try_from(
        ebpf.map_mut(NS_FILTER_MAP)
            .context("map NS_FILTER missing")?,
    )?;
    map.set(0, filter, 0)
        .context("setting the namespace filter")?;
    Ok(())
}

fn attach_btf_tracepoint(
    ebpf: &mut Ebpf,
    btf: &aya::Btf,
    tracepoint: &str,
    program: &str,
) -> anyhow::Result<()> {
    let tp: &mut BtfTracePoint = ebpf
        .program_mut(program)
        .with_context(|| format!("program {program} missing from the eBPF object"))?
        .try_into()?;
    tp.load(tracepoint, btf).map_err(|e| {
        anyhow!(
            "loading the tp_btf/{tracepoint} program failed: {}",
            first_line(&e, "loading", tracepoint)
        )
    })?;
    tp.attach().map_err(|e| {
        anyhow!(
            "attaching to tp_btf/{tracepoint} failed: {}",
            text::one_line(&e)
        )
    })?;
    Ok(())
}

/// The first line of a load error; the verifier's whole log, which follows
/// it, goes to the debug log (`-vv`).
fn first_line(error: &dyn std::fmt::Display, what: &str, program: &str) -> String {
    let full = format!("{error:#}");
    let mut lines = full.lines();
    let first = lines.next().unwrap_or_default().to_owned();
    if lines.next().is_some() {
        log::debug!("{what} {program}: {full}");
        return format!("{first} (-vv shows the verifier's log)");
    }
    first
}

fn attach_tracepoint(
    ebpf: &mut Ebpf,
    category: &str,
    name: &str,
    program: &str,
) -> anyhow::Result<()> {
    let tp: &mut TracePoint = ebpf
        .program_mut(program)
        .with_context(|| format!("program {program} missing from the eBPF object"))?
        .try_into()?;
    tp.load().map_err(|e| {
        anyhow!(
            "loading the {category}:{name} program failed: {}",
            first_line(&e, "loading", program)
        )
    })?;
    tp.attach(category, name).map_err(|e| {
        let hint = privileges::refusal_hint(&e);
        anyhow!(
            "attaching to tracepoint {category}:{name} failed: {}{hint}",
            text::one_line(&e)
        )
    })?;
    Ok(())
}

/// Hands freed heap back to the system instead of keeping it: parsing kernel
/// BTF, and seeding with many existing sockets, take tens of MB for a moment.
/// (glibc's; musl's allocator, in the static build, returns it by itself.)
pub fn release_freed_memory() {
    // SAFETY: malloc_trim only releases free heap memory; it has no
    // preconditions.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0)
    };
}

/// Attaches the optional owner probes in the richest mode the kernel allows.
/// Every failure here is expected on some kernels (no kprobes, fentry refused
/// under lockdown), so it only lowers the mode.
fn attach_owner_probes(
    ebpf: &mut Ebpf,
    btf: &aya::Btf,
    request: ModeRequest,
) -> anyhow::Result<ProbeMode> {
    for &mode in request.candidates() {
        let attempt = match mode {
            ProbeMode::Fentry => try_fentry(ebpf, btf),
            ProbeMode::Kprobe => try_kprobe(ebpf),
            ProbeMode::Tracepoint => return Ok(ProbeMode::Tracepoint),
        };
        match attempt {
            Ok(()) => return Ok(mode),
            Err(e) if request == ModeRequest::Auto => {
                log::debug!("{mode} probes unavailable: {e:#}");
            }
            Err(e) => return Err(e.context(ModeUnusable(mode))),
        }
    }
    Err(anyhow!("no probe mode is usable"))
}

/// The context of a failure of the probe mode the user forced.
#[derive(Debug)]
struct ModeUnusable(ProbeMode);

impl fmt::Display for ModeUnusable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "--probe-mode {} is not usable here", self.0)
    }
}

fn try_fentry(ebpf: &mut Ebpf, btf: &aya::Btf) -> anyhow::Result<()> {
    for function in OWNER_FUNCTIONS {
        let program = format!("{function}_fentry");
        let fentry: &mut FEntry = ebpf
            .program_mut(&program)
            .with_context(|| format!("program {program} missing"))?
            .try_into()?;
        fentry
            .load(function, btf)
            .with_context(|| format!("loading fentry/{function}"))?;
        fentry
            .attach()
            .with_context(|| format!("attaching fentry/{function}"))?;
    }
    Ok(())
}

fn try_kprobe(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    for function in OWNER_FUNCTIONS {
        let program = format!("{function}_kprobe");
        let kprobe: &mut KProbe = ebpf
            .program_mut(&program)
            .with_context(|| format!("program {program} missing"))?
            .try_into()?;
        kprobe
            .load()
            .with_context(|| format!("loading kprobe/{function}"))?;
        kprobe
            .attach(function, 0)
            .with_context(|| format!("attaching kprobe/{function}"))?;
    }
    Ok(())
}
