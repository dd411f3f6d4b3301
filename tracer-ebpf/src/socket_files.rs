//! The iterator over every process's open files (`iter/task_file`): for
//! each TCP socket a process holds, one [`SocketFileRecord`] on the
//! iterator's output. This is the kernel's own view of who holds what,
//! sockets in CLOSE included (no sock_diag table lists them). It also
//! records each holder in the socket map, so that the probes name the owner
//! of a socket that predates socktrace, and catch its release.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{BPF_NOEXIST, seq_file},
    helpers::bpf_seq_write,
};
use tracer_common::{
    AF_INET, AF_INET6, Endpoints, IPPROTO_TCP, OwnerSource, SocketFileRecord, SocketOwner,
    TASK_COMM_LEN, tcp_state,
};

use crate::{
    SEEDED, config, netns_wanted, owner_wanted, read_kernel, sock,
    store::{HashStore, SocketStore},
};

/// The socket type (include/linux/net.h).
const SOCK_STREAM: u16 = 1;

/// `struct bpf_iter__task_file` (kernel/bpf/task_iter.c): four 8-byte
/// slots, meta, task, fd, file.
const CTX_META: usize = 0;
const CTX_TASK: usize = 8;
const CTX_FILE: usize = 24;

/// Called once per open file of every process (threads that share their
/// leader's file table are skipped by the kernel), and once more with no
/// file at the end.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task_file")]
pub extern "C" fn socket_files(ctx: *mut c_void) -> i32 {
    let ctx = ctx.cast::<u8>();
    // SAFETY: ctx is the iterator's context, laid out as above: the verifier
    // allows these loads at exactly these offsets and sizes, and gives
    // `meta` and its `seq` the kernel types bpf_seq_write checks.
    let (seq, task, file) = unsafe {
        let meta = *(ctx.add(CTX_META) as *const *const *mut seq_file);
        (
            *meta,
            *(ctx.add(CTX_TASK) as *const *const u8),
            *(ctx.add(CTX_FILE) as *const *const u8),
        )
    };
    if !file.is_null()
        && !task.is_null()
        && let Ok(Some(record)) = tcp_socket_file(task, file)
    {
        // SAFETY: the record lives on our stack for the call; the helper
        // copies it into the iterator's buffer (or reports overflow, and the
        // kernel shows this file again in the next read).
        unsafe {
            bpf_seq_write(
                seq,
                (&record as *const SocketFileRecord).cast(),
                size_of::<SocketFileRecord>() as u32,
            );
        }
    }
    0
}

/// The record for `file` if it is a TCP socket the user's filters want.
#[inline(always)]
fn tcp_socket_file(task: *const u8, file: *const u8) -> Result<Option<SocketFileRecord>, i64> {
    let config = config();
    let layout = &config.layout;
    let Some(sk) = sock::of_file(layout, file) else {
        return Ok(None);
    };
    // SAFETY: every step is a bpf_probe_read_kernel of a kernel pointer; a
    // bad pointer makes the helper fail, it cannot fault.
    unsafe {
        let family: u16 = read_kernel(sk, layout.sock_family)?;
        let protocol: u16 = read_kernel(sk, layout.sock_protocol)?;
        let kind: u16 = read_kernel(sk, layout.sock_type)?;
        if (family != AF_INET && family != AF_INET6)
            || protocol != IPPROTO_TCP
            || kind != SOCK_STREAM
            || (config.filter_family != 0 && family != config.filter_family)
        {
            return Ok(None);
        }
        let tgid: u32 = read_kernel(task, layout.task_tgid)?;
        let netns = sock::netns(layout, sk);
        let state: u8 = read_kernel(sk, layout.sock_state)?;
        let owner = SocketOwner {
            tgid,
            source: OwnerSource::ProcFd as u8,
            state,
            // The collector checks the container of owners found here.
            in_pidns: 1,
            closed_held: u8::from(state == tcp_state::CLOSE),
            netns,
            comm: read_kernel::<[u8; TASK_COMM_LEN]>(task, layout.task_comm)?,
            ..SocketOwner::default()
        };
        if !owner_wanted(config, &owner) || !netns_wanted(netns) {
            return Ok(None);
        }
        let mut endpoints = Endpoints {
            family,
            local_port: u16::from_be(read_kernel(sk, layout.inet_sport)?),
            remote_port: u16::from_be(read_kernel(sk, layout.sock_dport)?),
            ..Endpoints::default()
        };
        if config.filter_port != 0
            && endpoints.local_port != config.filter_port
            && endpoints.remote_port != config.filter_port
        {
            return Ok(None);
        }
        if family == AF_INET {
            endpoints.local_addr[..4]
                .copy_from_slice(&read_kernel::<[u8; 4]>(sk, layout.sock_rcv_saddr)?);
            endpoints.remote_addr[..4]
                .copy_from_slice(&read_kernel::<[u8; 4]>(sk, layout.sock_daddr)?);
        } else {
            endpoints.local_addr = read_kernel(sk, layout.sock_v6_rcv_saddr)?;
            endpoints.remote_addr = read_kernel(sk, layout.sock_v6_daddr)?;
        }
        let error = read_kernel::<i32>(sk, layout.sock_err).map_or(0, |err| err.unsigned_abs());
        record_holder(sk as u64, &owner);
        Ok(Some(SocketFileRecord {
            sock_id: sk as u64,
            tgid,
            netns,
            error,
            state,
            _pad: [0; 3],
            endpoints,
            comm: owner.comm,
        }))
    }
}

/// Names the holder in the socket's entry unless the probes already know
/// its owner: the first holder found (the lowest pid) wins. A socket with
/// no entry gets one, except with socket storage, which this program cannot
/// reach: there the holder goes to `SEEDED`, from where the socket's next
/// event takes it. (An entry in the hash map, made by an event between the
/// attach and this walk, is named in place: a seed beside it would outlive
/// the socket and name a later socket at its address.)
#[inline(always)]
fn record_holder(sock_id: u64, owner: &SocketOwner) {
    let sk = sock_id as *const c_void;
    let known = match HashStore::get(sk) {
        Some(known) => known,
        None if config().sk_storage != 0 => {
            let _ = SEEDED.insert(sock_id, *owner, u64::from(BPF_NOEXIST));
            return;
        }
        None => {
            let Some(created) = HashStore::create(sk) else {
                return;
            };
            created.owner.state = owner.state;
            created.owner.closed_held = owner.closed_held;
            created.owner.netns = owner.netns;
            created.held.from_state = owner.state;
            created.held.from_closed_held = owner.closed_held;
            created
        }
    };
    if known.owner.tgid == 0 {
        known.owner.tgid = owner.tgid;
        known.owner.source = owner.source;
        known.owner.comm = owner.comm;
        known.owner.in_pidns = 1;
    }
}
