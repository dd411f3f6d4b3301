//! `socktrace serve` run on a free port and scraped over plain HTTP, for the
//! tests of the daemon.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use super::{Finished, Tracer};

pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding a free port");
    listener.local_addr().expect("local address").port()
}

/// A running socktrace that is killed if the test fails before stopping it.
pub struct Served(pub Option<Tracer>);

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(tracer) = &self.0 {
            // SAFETY: kill on our own child's pid.
            unsafe { libc::kill(tracer.pid() as i32, libc::SIGKILL) };
        }
    }
}

/// `socktrace serve` on a free loopback port.
pub fn serve(extra: &[&str]) -> (Served, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut args = vec!["serve", "--listen", &addr];
    args.extend(extra);
    (Served(Some(Tracer::start(&args))), addr)
}

/// SIGTERM, as a service manager stops it; what it printed.
pub fn terminate(mut served: Served) -> Finished {
    let tracer = served.0.take().expect("socktrace still running");
    // SAFETY: kill on our own child's pid.
    unsafe { libc::kill(tracer.pid() as i32, libc::SIGTERM) };
    tracer.wait()
}

pub struct Response {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

/// A plain HTTP/1.0 GET (so no chunked bodies to undo).
pub fn get(addr: &str, path: &str, accept: Option<&str>) -> std::io::Result<Response> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{accept}\r\n"
    )?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let content_type = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-type")
                .then(|| value.trim().to_string())
        })
        .unwrap_or_default();
    Ok(Response {
        status,
        content_type,
        body: body.to_string(),
    })
}

/// The value of the sample `name{...pid="PID"...}` in a text scrape.
pub fn sample(text: &str, name: &str, pid: u32) -> Option<f64> {
    let pid = format!("pid=\"{pid}\"");
    text.lines()
        .filter(|line| line.starts_with(&format!("{name}{{")) && line.contains(&pid))
        .find_map(|line| line.rsplit(' ').next()?.parse().ok())
}

/// Polls until `check` returns something, or gives up after `timeout`.
pub fn poll<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(found) = check() {
            return Some(found);
        }
        if Instant::now() > deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(250));
    }
}

/// Polls until `check` returns something, or panics with `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, check: impl FnMut() -> Option<T>) -> T {
    poll(timeout, check).unwrap_or_else(|| panic!("timed out waiting for {what}"))
}

/// A directory of the test's own, removed at the end.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("socktrace-{test}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("creating a temp dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
