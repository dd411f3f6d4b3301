//! Many loopback sockets held open by helper processes, for the memory and
//! start-up measurements with 100k existing sockets.
//!
//! A helper is this same binary (`cargo xtask bench hold`): it opens
//! connections, says "ready" on stdout, and holds them until its stdin
//! closes. Raising the hard fd limit needs CAP_SYS_RESOURCE, which root in a
//! container often lacks, so the sockets are spread over as many helpers as
//! the inherited hard limit requires.

use std::{
    env,
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    process::{Child, Command, Stdio},
};

use anyhow::{Context as _, bail};
use clap::Args;

/// Connections per server port: under the ~28k ephemeral ports that one
/// (client address, server address) pair has.
const CONNECTIONS_PER_PORT: u64 = 20_000;
/// fds a helper needs besides the held sockets: listeners, stdio, libraries.
const SPARE_FDS: u64 = 256;

#[derive(Args, Debug)]
pub struct HoldOptions {
    /// Sockets to hold: both ends of half as many loopback connections.
    #[arg(long)]
    pub sockets: u64,
}

/// The helper's side: open, report, hold.
pub fn hold(options: &HoldOptions) -> anyhow::Result<()> {
    let connections = options.sockets.div_ceil(2);
    raise_soft_fd_limit(connections * 2 + SPARE_FDS)?;
    let ports = connections.div_ceil(CONNECTIONS_PER_PORT).max(1);
    let listeners = (0..ports)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<io::Result<Vec<_>>>()
        .context("binding the holder's server ports")?;
    let addresses = listeners
        .iter()
        .map(TcpListener::local_addr)
        .collect::<io::Result<Vec<_>>>()?;
    let mut held = Vec::with_capacity(connections as usize * 2);
    for index in 0..connections as usize {
        let port = index % listeners.len();
        let client = TcpStream::connect(addresses[port])
            .with_context(|| format!("opening held connection {index}"))?;
        let (server, _) = listeners[port]
            .accept()
            .with_context(|| format!("accepting held connection {index}"))?;
        held.push(client);
        held.push(server);
    }
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "ready {}", held.len())?;
    stdout.flush()?;
    // Hold everything until the bench closes our stdin (or exits).
    io::stdin().read_to_end(&mut Vec::new())?;
    // Reset instead of closing politely: 100k connections in FIN_WAIT and
    // TIME_WAIT would outlive the bench for a minute and fill the kernel's
    // orphan and TIME_WAIT limits, which then cut other programs' closing
    // sockets short.
    for socket in &held {
        reset_on_close(socket)?;
    }
    drop(held);
    Ok(())
}

fn reset_on_close(socket: &TcpStream) -> anyhow::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads `linger` (whose size we pass) and changes
    // only the socket behind this open fd.
    let status = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if status != 0 {
        return Err(io::Error::last_os_error()).context("setting SO_LINGER on a held socket");
    }
    Ok(())
}

fn fd_limit() -> anyhow::Result<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error()).context("reading the open file limit");
    }
    Ok(limit)
}

/// Up to the hard limit, which needs no privilege.
fn raise_soft_fd_limit(wanted: u64) -> anyhow::Result<()> {
    let mut limit = fd_limit()?;
    if wanted > limit.rlim_max {
        bail!(
            "holding these sockets needs {wanted} fds; the hard limit is {}",
            limit.rlim_max
        );
    }
    limit.rlim_cur = limit.rlim_cur.max(wanted);
    // SAFETY: setrlimit reads only the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("raising the open file limit to {wanted}"));
    }
    Ok(())
}

/// The bench's side: running helpers holding `count` sockets between them.
pub struct HeldSockets {
    helpers: Vec<Child>,
    pub count: u64,
}

impl HeldSockets {
    pub fn open(sockets: u64) -> anyhow::Result<Self> {
        // Helpers inherit our hard limit; each holds whole connections.
        let per_helper = (fd_limit()?.rlim_max.saturating_sub(SPARE_FDS) / 2 * 2).max(2);
        let helpers = sockets.div_ceil(per_helper).max(1);
        let share = (sockets.div_ceil(helpers)).div_ceil(2) * 2;
        let mut held = Self {
            helpers: Vec::new(),
            count: 0,
        };
        let mut left = sockets;
        while left > 0 {
            let this = share.min(left);
            let (child, count) = start_helper(this)?;
            held.helpers.push(child);
            held.count += count;
            left = left.saturating_sub(this);
        }
        Ok(held)
    }

    pub fn helpers(&self) -> usize {
        self.helpers.len()
    }

    pub fn close(mut self) -> anyhow::Result<()> {
        // End of file on their stdin tells them to let go.
        for helper in &mut self.helpers {
            drop(helper.stdin.take());
        }
        for helper in &mut self.helpers {
            let status = helper.wait().context("waiting for a socket holder")?;
            if !status.success() {
                bail!("a socket holder failed ({status})");
            }
        }
        Ok(())
    }
}

fn start_helper(sockets: u64) -> anyhow::Result<(Child, u64)> {
    let xtask = env::current_exe().context("finding the xtask binary")?;
    let mut child = Command::new(&xtask)
        .args(["bench", "hold", "--sockets", &sockets.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting the socket holder {}", xtask.display()))?;
    let stdout = child
        .stdout
        .take()
        .context("the holder's stdout is not piped")?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .context("reading the holder's ready line")?;
    let Some(count) = line.trim().strip_prefix("ready ") else {
        let status = child.wait()?;
        bail!("a socket holder failed ({status}); see its error above");
    };
    let count = count
        .parse()
        .with_context(|| format!("the holder said {line:?}"))?;
    Ok((child, count))
}

impl Drop for HeldSockets {
    fn drop(&mut self) {
        for helper in &mut self.helpers {
            if let Ok(None) = helper.try_wait() {
                let _ = helper.kill();
                let _ = helper.wait();
            }
        }
    }
}
