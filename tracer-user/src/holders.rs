//! Owners found in userspace, from the kernel socket table (sock_diag) and
//! the /proc fd tables: for sockets that predate socktrace, and for sockets
//! whose owner exited while another process still holds them.

use std::{collections::HashMap, net::SocketAddr, os::unix::fs::MetadataExt as _, path::Path};

use anyhow::Context as _;
use tracer_common::{OwnerSource, tcp_state};

use crate::{
    decode::Comm,
    procfs, seed,
    sockets::{ExistingSocket, HolderLookup, Owner},
    tcp::TcpState,
};

/// Every TCP socket that a process holds, with its owner. When several
/// processes share one (after fork), the lowest pid is named.
pub fn existing_sockets(netns: Option<&Path>) -> anyhow::Result<Vec<ExistingSocket>> {
    let netns_path = netns.unwrap_or(Path::new("/proc/self/ns/net"));
    // stat() on a namespace file gives the namespace's inode number.
    let netns_ino = std::fs::metadata(netns_path)
        .with_context(|| format!("reading network namespace {}", netns_path.display()))?
        .ino() as u32;
    let mut seeded = seed::seed(netns).context("reading the existing sockets (sock_diag)")?;
    // Listeners first, so connections accepted from them are known as inbound.
    seeded.sort_by_key(|s| s.state != tcp_state::LISTEN);
    // One /proc read per process, not per socket: a server may hold 100k.
    let mut comms: HashMap<u32, Comm> = HashMap::new();
    Ok(seeded
        .into_iter()
        .filter_map(|s| {
            let pid = *s.owners.first()?;
            let comm = *comms
                .entry(pid)
                .or_insert_with(|| procfs::comm(pid).as_deref().unwrap_or_default().into());
            Some(ExistingSocket {
                sock_id: s.inode,
                owner: Owner {
                    pid: Some(pid),
                    nspid: None,
                    comm,
                    source: OwnerSource::ProcFd,
                },
                local: s.local,
                remote: s.remote,
                state: TcpState::from(s.state),
                netns: netns_ino,
            })
        })
        .collect())
}

/// Looks holders up in one network namespace (the host's by default).
#[derive(Default)]
pub struct ProcHolderLookup {
    pub netns: Option<std::path::PathBuf>,
}

impl HolderLookup for ProcHolderLookup {
    fn holders(
        &mut self,
        sockets: &[(SocketAddr, SocketAddr)],
        candidates: &[u32],
    ) -> HashMap<(SocketAddr, SocketAddr), (u32, String)> {
        let pairs = sockets.to_vec();
        let found = match &self.netns {
            Some(path) => seed::in_netns(path, move || seed::find_tcp_sockets(&pairs)),
            None => seed::find_tcp_sockets(&pairs),
        };
        let table = match found {
            Ok(table) => table,
            Err(e) => {
                log::warn!("looking up socket holders: {e}");
                return HashMap::new();
            }
        };
        let mut inode_of: HashMap<(SocketAddr, SocketAddr), u64> = HashMap::new();
        for s in table.iter().filter(|s| s.inode != 0) {
            inode_of.insert((s.local, s.remote), s.inode);
        }
        let wanted: HashMap<u64, (SocketAddr, SocketAddr)> = sockets
            .iter()
            .filter_map(|pair| inode_of.get(pair).map(|&inode| (inode, *pair)))
            .collect();
        let mut found = HashMap::new();
        // The likely holders first; the whole process table only if needed.
        // Fork events also name new threads; only processes can hold fds of
        // their own.
        let candidates: Vec<u32> = candidates
            .iter()
            .copied()
            .filter(|&pid| procfs::tgid_of(pid) == Some(pid))
            .collect();
        let mut owners = seed::socket_owners(&candidates, wanted.keys().copied());
        if owners.values().any(Vec::is_empty) {
            let missing: Vec<u64> = owners
                .iter()
                .filter(|(_, pids)| pids.is_empty())
                .map(|(&inode, _)| inode)
                .collect();
            owners.extend(seed::socket_owners(&procfs::all_pids(), missing));
        }
        // One /proc read per holder, not per socket (see existing_sockets).
        let mut comms: HashMap<u32, String> = HashMap::new();
        for (inode, pids) in owners {
            if let (Some(&pid), Some(pair)) = (pids.first(), wanted.get(&inode)) {
                let comm = comms
                    .entry(pid)
                    .or_insert_with(|| procfs::comm(pid).unwrap_or_default());
                found.insert(*pair, (pid, comm.clone()));
            }
        }
        found
    }
}
