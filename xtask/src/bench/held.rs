//! Many loopback sockets held open by a helper process, for the memory and
//! start-up measurements with 100k existing sockets.
//!
//! The helper is this same binary (`cargo xtask bench hold`): it opens the
//! connections, says "ready" on stdout, and holds them until its stdin closes.

use std::{
    env,
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
};

use anyhow::{Context as _, bail};
use clap::Args;

/// Connections per server port: under the ~28k ephemeral ports that one
/// (client address, server address) pair has.
const CONNECTIONS_PER_PORT: u64 = 20_000;
/// fds besides the held sockets: listeners, stdio, libraries.
const SPARE_FDS: u64 = 1_024;

#[derive(Args, Debug)]
pub struct HoldOptions {
    /// Sockets to hold: both ends of half as many loopback connections.
    #[arg(long)]
    pub sockets: u64,
}

/// The helper's side: open, report, hold.
pub fn hold(options: &HoldOptions) -> anyhow::Result<()> {
    let connections = options.sockets.div_ceil(2);
    raise_fd_limit(connections * 2 + SPARE_FDS)?;
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
    drop(held);
    Ok(())
}

fn raise_fd_limit(wanted: u64) -> anyhow::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: wanted,
        rlim_max: wanted,
    };
    // SAFETY: setrlimit reads the struct we pass and nothing else.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(io::Error::last_os_error()).with_context(|| {
            format!(
                "raising the open file limit to {wanted} \
                 (needs root, and fs.nr_open at least that high)"
            )
        });
    }
    Ok(())
}

/// The bench's side: a running helper holding `count` sockets.
pub struct HeldSockets {
    child: Child,
    pub count: u64,
}

impl HeldSockets {
    pub fn open(sockets: u64) -> anyhow::Result<Self> {
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
            bail!("the socket holder failed ({status}); see its error above");
        };
        let count = count
            .parse()
            .with_context(|| format!("the holder said {line:?}"))?;
        Ok(Self { child, count })
    }

    pub fn close(mut self) -> anyhow::Result<()> {
        // End of file on its stdin tells it to let go.
        drop(self.child.stdin.take());
        let status = self.child.wait().context("waiting for the socket holder")?;
        if !status.success() {
            bail!("the socket holder failed ({status})");
        }
        Ok(())
    }
}

impl Drop for HeldSockets {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
