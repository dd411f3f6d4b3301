//! The load generator: a loopback storm of short TCP connections.
//!
//! Each connection is what a small RPC does: connect, send a 16-byte request,
//! read a 16-byte reply, close. The client closes first and the server closes
//! when it reads the end of stream, so the client's end goes through FIN_WAIT
//! to TIME_WAIT and the server's through CLOSE_WAIT and LAST_ACK: every state
//! a tracer follows, with normal closes (no SO_LINGER resets).
//!
//! Ports: one (client address, server address) pair has ~28k ephemeral ports,
//! which a storm fills with TIME_WAIT sockets in about a second. The server
//! listens on several ports and the clients rotate over them, so each one has
//! its own port space, and `net.ipv4.tcp_tw_reuse` (2, loopback only, the
//! kernel default) lets connect() reuse a port whose TIME_WAIT is more than a
//! second old.

use std::{
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Args;

/// Bytes each way per connection.
const MESSAGE_BYTES: usize = 16;
const REQUEST: [u8; MESSAGE_BYTES] = *b"ping ping ping !";
const REPLY: [u8; MESSAGE_BYTES] = *b"pong pong pong !";

/// How many threads and ports the storm uses.
#[derive(Args, Clone, Debug)]
pub struct StormShape {
    /// Client threads, each running one connection at a time.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Server ports; each has its own accepting threads.
    #[arg(long, default_value_t = 8)]
    pub server_ports: usize,
    /// Accepting threads per server port.
    #[arg(long, default_value_t = 2)]
    pub threads_per_port: usize,
}

/// Counters shared by the storm's threads.
#[derive(Default)]
struct Counters {
    completed: AtomicU64,
    failed: AtomicU64,
}

/// A running storm; stopped (and its threads joined) by [`Storm::stop`].
pub struct Storm {
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    listeners: Vec<Arc<TcpListener>>,
    clients: Vec<JoinHandle<()>>,
    servers: Vec<JoinHandle<()>>,
}

/// Connections completed and failed so far.
#[derive(Clone, Copy, Debug, Default)]
pub struct Progress {
    pub completed: u64,
    pub failed: u64,
}

impl Storm {
    /// Starts the storm: as fast as possible, or `rate` connections per
    /// second over all clients.
    pub fn start(shape: &StormShape, rate: Option<f64>) -> anyhow::Result<Self> {
        if shape.clients == 0 || shape.server_ports == 0 || shape.threads_per_port == 0 {
            bail!("the storm needs at least one client, server port and server thread");
        }
        // At least one connection per client a day, so that a client's pace
        // makes a `Duration`.
        if rate.is_some_and(|rate| !(rate * 86_400.0 >= shape.clients as f64 && rate.is_finite())) {
            bail!("the connection rate must be a positive number of connections per second");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let mut listeners = Vec::new();
        let mut servers = Vec::new();
        for _ in 0..shape.server_ports {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .context("binding a load generator server port on 127.0.0.1")?;
            let listener = Arc::new(listener);
            for _ in 0..shape.threads_per_port {
                let (listener, stop, counters) = (listener.clone(), stop.clone(), counters.clone());
                servers.push(thread::spawn(move || serve(&listener, &stop, &counters)));
            }
            listeners.push(listener);
        }
        let addresses: Vec<SocketAddr> = listeners
            .iter()
            .map(|listener| listener.local_addr())
            .collect::<io::Result<_>>()
            .context("reading the server ports")?;
        let addresses = Arc::new(addresses);
        let started = Instant::now();
        let clients = (0..shape.clients)
            .map(|index| {
                // Each client makes every `clients`-th connection of the schedule.
                let pace = rate.map(|rate| Pace {
                    started,
                    first: Duration::from_secs_f64(index as f64 / rate),
                    interval: Duration::from_secs_f64(shape.clients as f64 / rate),
                });
                let (addresses, stop, counters) =
                    (addresses.clone(), stop.clone(), counters.clone());
                thread::spawn(move || connect_loop(index, &addresses, pace, &stop, &counters))
            })
            .collect();
        Ok(Self {
            stop,
            counters,
            listeners,
            clients,
            servers,
        })
    }

    pub fn progress(&self) -> Progress {
        Progress {
            completed: self.counters.completed.load(Ordering::Relaxed),
            failed: self.counters.failed.load(Ordering::Relaxed),
        }
    }

    /// Stops the clients after their current connection, then the servers.
    pub fn stop(self) -> anyhow::Result<Progress> {
        self.stop.store(true, Ordering::Relaxed);
        for client in self.clients {
            if client.join().is_err() {
                bail!("a load generator client thread panicked");
            }
        }
        for listener in &self.listeners {
            // Shutting down a listening socket wakes the threads blocked in
            // accept() on it (with EINVAL); they then see `stop` and return.
            // SAFETY: the fd belongs to a listener that is still open.
            unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR) };
        }
        for server in self.servers {
            if server.join().is_err() {
                bail!("a load generator server thread panicked");
            }
        }
        Ok(Progress {
            completed: self.counters.completed.load(Ordering::Relaxed),
            failed: self.counters.failed.load(Ordering::Relaxed),
        })
    }
}

/// When a paced client makes its n-th connection: `started + first + n * interval`.
#[derive(Clone, Copy)]
struct Pace {
    started: Instant,
    first: Duration,
    interval: Duration,
}

fn connect_loop(
    index: usize,
    addresses: &[SocketAddr],
    pace: Option<Pace>,
    stop: &AtomicBool,
    counters: &Counters,
) {
    let mut made: u32 = 0;
    while !stop.load(Ordering::Relaxed) {
        if let Some(pace) = pace {
            // Absolute due times: a late connection is made at once, so the
            // average rate holds even when a sleep oversleeps.
            let due = pace.started + pace.first + pace.interval * made;
            let now = Instant::now();
            if due > now {
                thread::sleep(due - now);
            }
        }
        let address = addresses[(index + made as usize) % addresses.len()];
        made = made.wrapping_add(1);
        match exchange(address) {
            Ok(()) => counters.completed.fetch_add(1, Ordering::Relaxed),
            Err(_) => {
                // Most likely no free port; back off instead of spinning.
                thread::sleep(Duration::from_millis(1));
                counters.failed.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

/// One client connection; dropping the stream closes it first.
fn exchange(address: SocketAddr) -> io::Result<()> {
    let mut stream = TcpStream::connect(address)?;
    stream.write_all(&REQUEST)?;
    let mut reply = [0; MESSAGE_BYTES];
    stream.read_exact(&mut reply)?;
    Ok(())
}

/// Answers until accept() fails after `stop`: a connection accepted after
/// `stop` still belongs to a client that waits for its reply.
fn serve(listener: &TcpListener, stop: &AtomicBool, counters: &Counters) {
    loop {
        let answered = match listener.accept() {
            Ok((mut stream, _)) => answer(&mut stream),
            Err(_) if stop.load(Ordering::Relaxed) => return,
            Err(err) => Err(err),
        };
        if answered.is_err() {
            counters.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn answer(stream: &mut TcpStream) -> io::Result<()> {
    let mut request = [0; MESSAGE_BYTES];
    stream.read_exact(&mut request)?;
    stream.write_all(&REPLY)?;
    // Wait for the client's close, so that ours is the second one.
    let mut rest = [0; MESSAGE_BYTES];
    while stream.read(&mut rest)? > 0 {}
    Ok(())
}

/// `cargo xtask bench loadgen`: run the storm alone and print its rate.
#[derive(Args, Debug)]
pub struct LoadgenOptions {
    #[command(flatten)]
    pub shape: StormShape,
    /// Connections per second over all clients; as fast as possible if unset.
    #[arg(long)]
    pub rate: Option<f64>,
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 10.0, value_parser = super::seconds)]
    pub secs: f64,
}

pub fn run(options: &LoadgenOptions) -> anyhow::Result<()> {
    let storm = Storm::start(&options.shape, options.rate)?;
    let started = Instant::now();
    let mut last = (started, Progress::default());
    while started.elapsed().as_secs_f64() < options.secs {
        thread::sleep(Duration::from_secs(1));
        let now = (Instant::now(), storm.progress());
        let secs = (now.0 - last.0).as_secs_f64();
        println!(
            "{:>8.0} connections/s ({} failed)",
            (now.1.completed - last.1.completed) as f64 / secs,
            now.1.failed - last.1.failed
        );
        last = now;
    }
    let total = storm.stop()?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{} connections in {secs:.1} s: {:.0}/s, {} failed",
        total.completed,
        total.completed as f64 / secs,
        total.failed
    );
    Ok(())
}
