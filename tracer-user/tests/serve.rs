//! Root integration tests of `socktrace serve`: a live scrape checked by
//! `promtool`, a real Prometheus server with the shipped alert rules
//! watching a client leak sockets, the HdrHistogram log read back by the
//! Python `hdrhistogram` package, and bad listen addresses.

// A broken expectation panics: that is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::{
    Role, SOCKTRACE, Tracer, require_root,
    scrape::{TempDir, free_port, get, poll, sample, serve, terminate, wait_for},
    workload,
};
use serde_json::Value;

const ROLES: &str = "leak_roles.py";

/// Whether a tool a test needs is there (`cargo xtask setup` installs them).
fn require_tool(test: &str, what: &str, present: bool) -> bool {
    let missing = format!("{what} is missing; `cargo xtask setup` installs it");
    common::require(test, present, &missing)
}

fn runs(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// The leaking pair: a server that hangs up at once, a client that opens
/// `count` connections every `interval` seconds and never closes them.
fn leak(count: u32, interval: &str) -> (Role, Role) {
    let server = Role::spawn(ROLES, &["server"]);
    let port = server.expect("port")["port"].as_u64().unwrap().to_string();
    let client = Role::spawn(
        ROLES,
        &["client", &port, &count.to_string(), interval, "leak"],
    );
    (server, client)
}

/// Whether a test that checks expositions with promtool can run.
fn require_root_and_promtool(test: &str) -> bool {
    require_root(test)
        && require_tool(
            test,
            "promtool (Debian package prometheus)",
            runs("promtool", &["--version"]),
        )
}

/// `promtool check metrics` finds nothing to say about `exposition`.
fn assert_promtool_accepts(exposition: &str) {
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running promtool");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let checked = promtool.wait_with_output().unwrap();
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    assert!(checked.status.success(), "promtool: {complaints}");
    assert!(complaints.trim().is_empty(), "promtool lint: {complaints}");
}

#[test]
fn scrape_passes_promtool_and_stops_on_sigterm() {
    if !require_root_and_promtool("scrape_passes_promtool_and_stops_on_sigterm") {
        return;
    }
    let (served, addr) = serve(&["--interval", "0.5"]);
    let (_server, client) = leak(12, "0.02");
    client.expect("done");
    let pid = client.pid();
    let text = wait_for(
        "12 CLOSE_WAIT sockets on /metrics",
        Duration::from_secs(20),
        || {
            let response = get(&addr, "/metrics", None).ok()?;
            (sample(&response.body, "socktrace_close_wait_sockets", pid)? >= 12.0)
                .then_some(response)
        },
    );
    assert_eq!(text.status, 200);
    assert!(
        text.content_type.starts_with("text/plain; version=0.0.4"),
        "{}",
        text.content_type
    );
    for family in [
        "socktrace_connects_total",
        "socktrace_closes_total",
        "socktrace_sockets",
        "socktrace_close_wait_oldest_age_seconds",
        "socktrace_open_fds",
        "socktrace_fd_soft_limit",
        "socktrace_connect_latency_seconds_bucket",
        "socktrace_peer_close_wait_sockets",
    ] {
        assert!(
            sample(&text.body, family, pid).is_some(),
            "no {family} for pid {pid}:\n{}",
            text.body
        );
    }
    assert!(
        text.body
            .contains("socktrace_lost_events_total{reason=\"ring_buffer_full\"}")
    );
    assert!(text.body.contains("socktrace_build_info{version=\""));

    assert_promtool_accepts(&text.body);

    let openmetrics = get(
        &addr,
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5"),
    )
    .unwrap();
    assert!(
        openmetrics
            .content_type
            .starts_with("application/openmetrics-text")
    );
    assert!(openmetrics.body.ends_with("# EOF\n"));
    assert!(
        openmetrics
            .body
            .contains("# TYPE socktrace_connects counter\n")
    );
    let health = get(&addr, "/healthz", None).unwrap();
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));

    let started = Instant::now();
    let finished = terminate(served);
    assert_eq!(finished.code, Some(0), "stderr: {:?}", finished.stderr);
    assert!(started.elapsed() < Duration::from_secs(5), "slow to stop");
    assert!(
        TcpStream::connect(&addr).is_err(),
        "still listening after SIGTERM"
    );
}

/// The shipped rules with the times shortened so that they fire within
/// seconds; everything else as shipped.
fn rules_for_a_quick_test() -> String {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus/alerts.yml");
    let rules = fs::read_to_string(&shipped).expect("reading deploy/prometheus/alerts.yml");
    let age = "socktrace_close_wait_oldest_age_seconds >= 300";
    assert_eq!(
        rules.matches(age).count(),
        1,
        "the rule changed: update this test"
    );
    let rules = rules.replace(age, "socktrace_close_wait_oldest_age_seconds >= 2");
    let mut shortened = 0;
    let rules: Vec<String> = rules
        .lines()
        .map(|line| match line.trim_start().strip_prefix("for: ") {
            Some(_) => {
                shortened += 1;
                let indent = &line[..line.len() - line.trim_start().len()];
                format!("{indent}for: 3s")
            }
            None => line.to_string(),
        })
        .collect();
    assert!(shortened >= 4, "expected a `for:` in every rule");
    rules.join("\n")
}

/// A Prometheus server of the test's own, killed on drop.
struct Prometheus {
    child: Child,
    addr: String,
}

impl Prometheus {
    /// Scrapes `target` every 2 s; `job` is more of the scrape job's YAML
    /// (indented as its keys), e.g. its `scheme` and `tls_config`.
    fn start(dir: &Path, target: &str, job: &str) -> Self {
        fs::write(dir.join("alerts.yml"), rules_for_a_quick_test()).unwrap();
        let config = format!(
            "global:\n  scrape_interval: 2s\n  scrape_timeout: 2s\n  evaluation_interval: 1s\n\
             rule_files:\n  - alerts.yml\n\
             scrape_configs:\n  - job_name: socktrace\n    static_configs:\n      - targets: ['{target}']\n{job}"
        );
        fs::write(dir.join("prometheus.yml"), config).unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting prometheus");
        let prometheus = Self { child, addr };
        wait_for("prometheus to be ready", Duration::from_secs(30), || {
            let ready = get(&prometheus.addr, "/-/ready", None).ok()?;
            (ready.status == 200).then_some(())
        });
        prometheus
    }

    /// `data` of an API answer.
    fn api(&self, path: &str) -> Option<Value> {
        let response = get(&self.addr, path, None).ok()?;
        let answer: Value = serde_json::from_str(&response.body).ok()?;
        (answer["status"] == "success").then(|| answer["data"].clone())
    }

    /// The raw samples of `series` over the last 5 minutes.
    fn samples(&self, series: &str) -> Option<Vec<f64>> {
        let range = url_encode(&format!("{series}[5m]"));
        let data = self.api(&format!("/api/v1/query?query={range}"))?;
        data["result"][0]["values"]
            .as_array()?
            .iter()
            .map(|sample| sample[1].as_str()?.parse().ok())
            .collect()
    }

    /// How many series `promql` returns now.
    fn series(&self, promql: &str) -> Option<usize> {
        let data = self.api(&format!("/api/v1/query?query={}", url_encode(promql)))?;
        Some(data["result"].as_array()?.len())
    }

    fn query(&self, promql: &str) -> Option<f64> {
        let data = self.api(&format!("/api/v1/query?query={}", url_encode(promql)))?;
        data["result"][0]["value"][1].as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every panel query of deploy/grafana/socktrace.json, as Grafana sends it
/// with every variable at "All" and the rate interval of a 2 s scrape:
/// (panel title, PromQL).
fn dashboard_queries() -> Vec<(String, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/socktrace.json");
    let dashboard: Value = serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let Some(expr) = target["expr"].as_str() else {
                continue;
            };
            let promql = expr
                .replace("$instance", ".*")
                .replace("$comm", ".*")
                .replace("$pid", ".*")
                .replace("$__rate_interval", "30s");
            queries.push((panel["title"].as_str().unwrap_or("?").to_string(), promql));
        }
    }
    assert!(
        queries.len() >= 20,
        "the dashboard lost its panels: {queries:?}"
    );
    queries
}

fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn prometheus_sees_close_wait_rise_and_the_alert_fire() {
    const TEST: &str = "prometheus_sees_close_wait_rise_and_the_alert_fire";
    if !require_root(TEST)
        || !require_tool(
            TEST,
            "prometheus (Debian package prometheus)",
            runs("prometheus", &["--version"]),
        )
    {
        return;
    }
    let dir = TempDir::new(TEST);
    // Reports twice a second, so that socktrace's own verdict (which wants
    // a few points of growth) comes within the leak.
    let (served, addr) = serve(&["--close-wait-age", "2s", "--interval", "0.5"]);
    let prometheus = Prometheus::start(&dir.0, &addr, "");
    // 60 connections over 15 s: the CLOSE_WAIT count climbs while
    // Prometheus scrapes.
    let (_server, client) = leak(60, "0.25");
    let pid = client.pid();
    let pid_label = pid.to_string();
    let series = format!("socktrace_close_wait_sockets{{job=\"socktrace\",pid=\"{pid}\"}}");

    let alert = poll(Duration::from_secs(60), || {
        let alerts = prometheus.api("/api/v1/alerts")?;
        alerts["alerts"]
            .as_array()?
            .iter()
            .find(|alert| {
                alert["labels"]["alertname"] == "SocktraceCloseWaitBuildup"
                    && alert["labels"]["pid"] == pid_label.as_str()
                    && alert["state"] == "firing"
            })
            .cloned()
    });
    let Some(alert) = alert else {
        panic!(
            "the CloseWait alert never fired for pid {pid}; CLOSE_WAIT: {:?}; \
             targets: {:?}; alerts: {:?}",
            prometheus.samples(&series),
            prometheus.api("/api/v1/targets"),
            prometheus.api("/api/v1/alerts"),
        );
    };
    let summary = alert["annotations"]["summary"].as_str().unwrap_or_default();
    assert!(
        summary.starts_with(&format!("python3 (pid {pid}) keeps ")),
        "{alert}"
    );
    // Once the client is done, the series as Prometheus stored it climbs
    // step by step to all 60.
    client.expect("done");
    let seen = wait_for(
        "all 60 sockets in Prometheus",
        Duration::from_secs(20),
        || {
            let samples = prometheus.samples(&series)?;
            (samples.last() == Some(&60.0)).then_some(samples)
        },
    );
    let rose = seen.windows(2).filter(|pair| pair[1] > pair[0]).count();
    let fell = seen.windows(2).any(|pair| pair[1] < pair[0]);
    assert!(
        rose >= 3 && !fell,
        "the CLOSE_WAIT series did not rise: {seen:?}"
    );
    // Prometheus scraped OpenMetrics (what it asks for) without errors.
    let targets = prometheus.api("/api/v1/targets").unwrap();
    let target = &targets["activeTargets"][0];
    assert_eq!(target["health"], "up", "{target}");
    assert_eq!(target["lastError"], "", "{target}");
    // socktrace's own verdict, exported while it holds.
    let verdict =
        format!("max_over_time(socktrace_process_alert{{pid=\"{pid}\",alert=\"close_wait\"}}[5m])");
    wait_for(
        "socktrace's close_wait verdict",
        Duration::from_secs(30),
        || (prometheus.query(&verdict)? == 1.0).then_some(()),
    );
    // Sockets the network closed under their holder, for the dashboard's
    // CLOSED_HELD panels: every panel must show something during a leak.
    let _reset = Role::spawn("closed_roles.py", &["reset-many", "5"]);
    let closed_held = "sum(socktrace_closed_held_sockets{cause=\"reset\"})";
    wait_for(
        "CLOSED_HELD sockets in Prometheus",
        Duration::from_secs(30),
        || (prometheus.query(closed_held)? >= 5.0).then_some(()),
    );
    // Now, or over the leak so far as the dashboard's time range shows it
    // (a forecast, for one, holds only while the fds rise; the subquery's
    // steps may not have reached series that just appeared).
    let has_series = |promql: &str| prometheus.series(promql).is_some_and(|count| count > 0);
    let empty: Vec<String> = dashboard_queries()
        .into_iter()
        .filter(|(_, query)| {
            !has_series(query) && !has_series(&format!("last_over_time(({query})[5m:2s])"))
        })
        .map(|(title, query)| format!("{title}: {query}"))
        .collect();
    assert!(
        empty.is_empty(),
        "dashboard panels with no series during a leak: {empty:#?}"
    );
    drop(prometheus);

    // The verdict was also logged on stderr as a JSON alert line.
    let finished = terminate(served);
    assert_eq!(finished.code, Some(0), "stderr: {:?}", finished.stderr);
    let logged = finished
        .stderr
        .iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|line| line["type"] == "alert" && line["pid"] == pid && line["kind"] == "close_wait");
    assert!(logged.is_some(), "no alert line: {:?}", finished.stderr);
}

#[test]
fn hdr_log_reads_back_with_python() {
    const TEST: &str = "hdr_log_reads_back_with_python";
    if !require_root(TEST)
        || !require_tool(
            TEST,
            "the Python module hdrh (PyPI package hdrhistogram)",
            runs("python3", &["-c", "import hdrh"]),
        )
    {
        return;
    }
    let dir = TempDir::new(TEST);
    let log = dir.0.join("socktrace.hlog");
    let log_arg = log.display().to_string();
    // Small files, so that the run rotates; enough of them kept to lose none.
    let (served, _) = serve(&[
        "--interval",
        "0.5",
        "--hdr-log",
        &log_arg,
        "--hdr-log-max-bytes",
        "2K",
        "--hdr-log-keep",
        "100",
    ]);
    let server = Role::spawn(ROLES, &["server"]);
    let port = server.expect("port")["port"].as_u64().unwrap().to_string();
    // Five connections, each closed 100 ms after the server's FIN.
    let client = Role::spawn(ROLES, &["client", &port, "5", "0.2", "close"]);
    client.expect("done");
    let files = || -> Vec<String> {
        fs::read_dir(&dir.0)
            .unwrap()
            .map(|entry| entry.unwrap().path().display().to_string())
            .collect()
    };
    // A report every 0.5 s: the 2 KiB files fill within seconds.
    let rotated = poll(Duration::from_secs(10), || {
        (files().len() >= 2).then_some(())
    });
    let finished = terminate(served);
    assert_eq!(finished.code, Some(0), "stderr: {:?}", finished.stderr);
    let files = files();
    assert!(rotated.is_some(), "the log did not rotate: {files:?}");
    let out = Command::new("python3")
        .arg(workload("hdr_log_summary.py"))
        .args(&files)
        .output()
        .expect("running hdr_log_summary.py");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(summary["intervals"].as_u64().unwrap() > 0, "{summary}");
    assert_eq!(
        summary["intervals"], summary["lines"],
        "unreadable intervals"
    );

    let pid = client.pid();
    let tag = |name: &str| summary["tags"][format!("{name}_us.pid{pid}")].clone();
    assert_eq!(tag("connect_latency")["count"], 5, "{summary}");
    assert_eq!(tag("connection_lifetime")["count"], 5, "{summary}");
    let dwell = tag("close_wait_dwell");
    assert_eq!(dwell["count"], 5, "{summary}");
    // Microseconds: the client waited 100 ms in CLOSE_WAIT each time.
    let (min, max) = (
        dwell["min"].as_u64().unwrap(),
        dwell["max"].as_u64().unwrap(),
    );
    assert!((90_000..5_000_000).contains(&min), "{dwell}");
    assert!(max < 5_000_000, "{dwell}");
}

fn run_serve(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(SOCKTRACE)
        .arg("serve")
        .args(args)
        .output()
        .expect("running socktrace");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn busy_port_is_one_clear_line() {
    if !require_root("busy_port_is_one_clear_line") {
        return;
    }
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, stderr) = run_serve(&["--listen", &addr]);
    assert_eq!(code, Some(1), "{stderr}");
    // Bound before the probes load: nothing else was said.
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "socktrace: cannot listen on {addr}: Address already in use"
        )),
        "{stderr}"
    );
}

#[test]
fn unparseable_address_is_one_clear_line() {
    if !require_root("unparseable_address_is_one_clear_line") {
        return;
    }
    for bad in ["localhost:9477", "127.0.0.1", "127.0.0.1:99999", "nonsense"] {
        let (code, stderr) = run_serve(&["--listen", bad]);
        assert_eq!(code, Some(1), "{bad}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{bad}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "--listen \"{bad}\" is not an address: expected IP:PORT"
            )),
            "{stderr}"
        );
    }
}

#[test]
fn other_than_loopback_is_served_with_a_warning() {
    if !require_root("other_than_loopback_is_served_with_a_warning") {
        return;
    }
    let tracer = Tracer::start(&["serve", "--listen", "0.0.0.0:0", "--duration", "1"]);
    let finished = tracer.wait();
    assert_eq!(finished.code, Some(0), "{:?}", finished.stderr);
    assert!(
        finished
            .stderr
            .iter()
            .any(|line| line.starts_with("socktrace: warning: serving on 0.0.0.0:")),
        "{:?}",
        finished.stderr
    );
}

/// Sockets the network closed while their process keeps the fds are
/// exported by cause and by peer, and the state is in `sockets`.
#[test]
fn closed_held_sockets_are_exported_by_cause() {
    if !require_root("closed_held_sockets_are_exported_by_cause") {
        return;
    }
    let holder = Role::spawn("closed_roles.py", &["reset-many", "12"]);
    let server_port = holder.expect("reset")["server_port"]
        .as_u64()
        .expect("a port");
    let pid = holder.pid();
    let (served, addr) = serve(&["--interval", "0.2", "-p", &pid.to_string()]);
    let text = wait_for("the CLOSED_HELD sockets", Duration::from_secs(20), || {
        let text = get(&addr, "/metrics", None).ok()?.body;
        sample(&text, "socktrace_closed_held_sockets", pid)
            .filter(|&n| n == 12.0)
            .map(|_| text)
    });
    let finished = terminate(served);
    assert_eq!(finished.code, Some(0), "stderr: {:?}", finished.stderr);
    let closed_held: Vec<&str> = text
        .lines()
        .filter(|line| line.starts_with("socktrace_closed_held_sockets{"))
        .collect();
    assert_eq!(closed_held.len(), 1, "{closed_held:?}");
    // Found at start, after the process had not read the error: "reset".
    assert!(
        closed_held[0].contains("cause=\"reset\""),
        "{closed_held:?}"
    );
    assert!(text.contains("state=\"CLOSED_HELD\"} 12\n"), "{text}");
    let peer = format!("peer=\"127.0.0.1:{server_port}\"");
    assert!(
        text.lines().any(
            |line| line.starts_with("socktrace_peer_closed_held_sockets{")
                && line.contains(&peer)
                && line.ends_with(" 12")
        ),
        "{text}"
    );
}

/// What socktrace printed: as bytes, so that nothing is hidden by a lossy
/// conversion.
fn socktrace_stdout(args: &[&str]) -> Vec<u8> {
    let out = Command::new(SOCKTRACE)
        .args(args)
        .output()
        .expect("running socktrace");
    assert!(
        out.status.success(),
        "socktrace {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn hostile_process_names_are_escaped_in_every_output() {
    if !require_root_and_promtool("hostile_process_names_are_escaped_in_every_output") {
        return;
    }
    // A name that clears the screen, holds a byte that is not UTF-8 and
    // ends a line: "\x1b[2Jev\xffil\n".
    let holder = Role::spawn(
        "close_wait.py",
        &["4", "--comm-hex", "1b5b324a6576ff696c0a"],
    );
    let line = holder.expect_line();
    let pid = line.split_whitespace().next().unwrap().to_string();
    let check = |what: &str, out: &[u8]| {
        let text =
            std::str::from_utf8(out).unwrap_or_else(|e| panic!("{what}: not UTF-8 ({e}): {out:?}"));
        assert!(!text.contains('\x1b'), "{what}: a raw escape: {text:?}");
        // (JSON and the exposition escape its backslashes once more.)
        assert!(
            text.contains("u{1b}[2Jev"),
            "{what}: the name is not shown escaped: {text}"
        );
        text.to_string()
    };
    check(
        "watch --once",
        &socktrace_stdout(&["watch", "--once", "-p", &pid]),
    );
    let json = check(
        "watch --once --json",
        &socktrace_stdout(&["watch", "--once", "--json", "-p", &pid]),
    );
    for line in json.lines() {
        let line: Value = serde_json::from_str(line).unwrap();
        if line["type"] == "process" {
            assert_eq!(line["comm"], "\\u{1b}[2Jev\\xffil\\n", "{line}");
        }
    }
    let trace = check(
        "trace",
        &socktrace_stdout(&["trace", "--duration", "1", "-p", &pid]),
    );
    assert!(
        trace
            .lines()
            .any(|line| line.contains(" \\u{1b}[2Jev\\xffil\\n ")),
        "{trace}"
    );
    let (served, addr) = serve(&["--interval", "0.2", "-p", &pid]);
    let pid: u32 = pid.parse().unwrap();
    let text = wait_for("the holder on /metrics", Duration::from_secs(20), || {
        let text = get(&addr, "/metrics", None).ok()?.body;
        sample(&text, "socktrace_close_wait_sockets", pid).map(|_| text)
    });
    terminate(served);
    check("/metrics", text.as_bytes());
    assert_promtool_accepts(&text);
}

/// Whether the server closed `stream` (a read returns end of file, or the
/// connection was reset) within `within`.
fn closed_by_server(stream: &mut TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

fn open_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

/// The limits of `serve`'s HTTP side (64 connections at once, 10 s to send
/// the request headers, 16 KiB of them): slow, idle, oversized and too
/// many clients are refused or dropped, and scrapes go on.
#[test]
fn a_hostile_scraper_cannot_exhaust_the_server() {
    if !require_root("a_hostile_scraper_cannot_exhaust_the_server") {
        return;
    }
    const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
    const SLOTS: usize = 64;
    let (served, addr) = serve(&[]);
    let pid = served.0.as_ref().unwrap().pid();
    let fds_before = open_fds(pid);

    // Slow clients: more than there are slots, each sending half a header.
    let mut slow: Vec<TcpStream> = (0..SLOTS + 36)
        .map(|_| {
            let mut stream = TcpStream::connect(&addr).unwrap();
            stream
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
            stream
        })
        .collect();
    let opened = Instant::now();
    thread::sleep(Duration::from_millis(500));
    // The rest wait in the kernel's backlog, not in socktrace's fd table.
    let held = open_fds(pid) - fds_before;
    assert!(held <= SLOTS + 2, "{held} fds held for slow clients");
    // A scrape waits for the slow ones to be dropped, then is served.
    let scrape = get(&addr, "/healthz", None).unwrap();
    assert_eq!(scrape.status, 200);
    let waited = opened.elapsed();
    assert!(
        waited < HEADER_TIMEOUT + Duration::from_secs(5),
        "a scrape waited {waited:?} behind slow clients"
    );
    let dropped = slow
        .iter_mut()
        .take(SLOTS)
        .map(|stream| closed_by_server(stream, Duration::from_secs(1)))
        .filter(|&closed| closed)
        .count();
    assert_eq!(
        dropped,
        SLOTS,
        "slow clients still held after {:?}",
        opened.elapsed()
    );
    drop(slow);

    // An oversized request: 431, and the connection closed.
    let mut big = TcpStream::connect(&addr).unwrap();
    let header = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    // The server may close before it has read it all.
    let _ = big.write_all(header.as_bytes());
    big.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut response = String::new();
    let _ = big.read_to_string(&mut response);
    assert!(
        response.starts_with("HTTP/1.1 431"),
        "oversized request answered {:?}",
        response.lines().next()
    );

    // A kept-alive connection left idle after its scrape is closed too.
    let mut idle = TcpStream::connect(&addr).unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let started = Instant::now();
    assert!(closed_by_server(
        &mut idle,
        HEADER_TIMEOUT + Duration::from_secs(5)
    ));
    assert!(started.elapsed() >= HEADER_TIMEOUT - Duration::from_secs(1));

    let health = get(&addr, "/healthz", None).unwrap();
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
    let finished = terminate(served);
    assert_eq!(finished.code, Some(0), "{:?}", finished.stderr);
}

/// `openssl` with `args`, in `dir`; panics with what it said if it fails.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, and a server (for 127.0.0.1) and a client certificate it signed,
/// as NAME.crt and NAME.key in `dir`.
fn make_certificates(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let ca = [
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=socktrace test CA",
        ],
        &["-addext", "basicConstraints=critical,CA:TRUE"],
        &["-addext", "keyUsage=critical,keyCertSign"],
    ]
    .concat();
    openssl(dir, &ca);
    for (name, extensions) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        ),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        let (key, csr, crt, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("{name}.ext"),
        );
        fs::write(dir.join(&ext), extensions).unwrap();
        let subject = format!("/CN={name}");
        openssl(
            dir,
            &[
                &["req"][..],
                &ec,
                &["-keyout", &key, "-out", &csr, "-subj", &subject],
            ]
            .concat(),
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        );
    }
}

/// curl's HTTP status for `url` (000 when there was no HTTP answer) and
/// the body, with `args` before the URL.
fn curl(args: &[&str], url: &str) -> (String, String) {
    let out = Command::new("curl")
        .args([
            "--silent",
            "--max-time",
            "10",
            "--write-out",
            "\n%{http_code}",
        ])
        .args(args)
        .arg(url)
        .output()
        .expect("running curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    (status.to_string(), body.to_string())
}

/// `--web-config` as the Prometheus exporter toolkit writes it: TLS with
/// verified client certificates and a bcrypt basic-auth user. The real
/// Prometheus scrapes with its `tls_config` and `basic_auth`; a wrong
/// password, no client certificate and plain HTTP are refused.
#[test]
fn prometheus_scrapes_over_tls_with_a_client_certificate_and_a_password() {
    let test = "prometheus_scrapes_over_tls_with_a_client_certificate_and_a_password";
    if !require_root(test)
        || !require_tool(test, "prometheus", runs("prometheus", &["--version"]))
        || !require_tool(test, "openssl", runs("openssl", &["version"]))
        || !require_tool(test, "curl", runs("curl", &["--version"]))
    {
        return;
    }
    let dir = TempDir::new(test);
    make_certificates(&dir.0);
    let password = "correct horse battery staple";
    let hash = bcrypt::hash(password, 6).unwrap();
    fs::write(
        dir.0.join("web.yml"),
        format!(
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  \
             client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n\
             basic_auth_users:\n  prometheus: {hash}\n"
        ),
    )
    .unwrap();
    let web_config = dir.0.join("web.yml").display().to_string();
    let (served, addr) = serve(&["--web-config", &web_config, "--interval", "0.5"]);
    let (_server, client) = leak(12, "0.02");
    client.expect("done");
    let pid = client.pid();

    let ca = dir.0.join("ca.crt").display().to_string();
    let cert = dir.0.join("client.crt").display().to_string();
    let key = dir.0.join("client.key").display().to_string();
    let url = format!("https://{addr}/metrics");
    let with_cert = ["--cacert", &ca, "--cert", &cert, "--key", &key];
    let right = format!("prometheus:{password}");
    let with_password = [&with_cert[..], &["--user", &right]].concat();
    // Scraped until a report has the leak (reports come every 0.5 s).
    wait_for("the leak over TLS", Duration::from_secs(10), || {
        let (status, body) = curl(&with_password, &url);
        assert_eq!(status, "200", "{body}");
        sample(&body, "socktrace_close_wait_sockets", pid)
    });
    let (status, _) = curl(
        &[&with_cert[..], &["--user", "prometheus:wrong"]].concat(),
        &url,
    );
    assert_eq!(status, "401", "a wrong password");
    let (status, _) = curl(&with_cert, &url);
    assert_eq!(status, "401", "no password");
    let (status, body) = curl(&["--cacert", &ca, "--user", &right], &url);
    assert_eq!(status, "000", "no client certificate: {body}");
    let (status, body) = curl(&[], &format!("http://{addr}/metrics"));
    assert_ne!(status, "200", "plain HTTP: {body}");

    let job = format!(
        "    scheme: https\n    tls_config:\n      ca_file: {ca}\n      cert_file: {cert}\n      \
         key_file: {key}\n    basic_auth:\n      username: prometheus\n      password: '{password}'\n"
    );
    let prometheus = Prometheus::start(&dir.0, &addr, &job);
    let seen = wait_for(
        "Prometheus to scrape the leak over TLS",
        Duration::from_secs(30),
        || {
            let up = prometheus.query("up{job=\"socktrace\"}")?;
            let leaked =
                prometheus.query(&format!("socktrace_close_wait_sockets{{pid=\"{pid}\"}}"))?;
            (up == 1.0 && leaked >= 12.0).then_some(leaked)
        },
    );
    assert!(seen >= 12.0);
    let finished = terminate(served);
    assert_eq!(finished.code, Some(0), "{:?}", finished.stderr);
    assert!(
        finished
            .stderr
            .iter()
            .any(|line| line == &format!("socktrace: serving metrics on {url}")),
        "{:?}",
        finished.stderr
    );
}
