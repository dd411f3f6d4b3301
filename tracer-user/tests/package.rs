//! Root integration test of the Debian package that `cargo xtask package`
//! builds (`cargo xtask test` builds it and names it in `SOCKTRACE_DEB`):
//! installed with apt as a host would, run from PATH, its man page
//! rendered, then removed without a trace.

// A broken expectation panics: that is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    path::Path,
    process::{Command, Output},
};

use common::{Role, parse, require, require_root};

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"))
}

fn succeeds(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{program} {args:?} failed: {stderr}");
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

#[test]
fn the_debian_package_installs_runs_and_leaves_cleanly() {
    if !require_root("the_debian_package_installs_runs_and_leaves_cleanly") {
        return;
    }
    let deb = std::env::var("SOCKTRACE_DEB").unwrap_or_default();
    let missing =
        "no package to install: SOCKTRACE_DEB names the .deb (`cargo xtask test` builds it)";
    if !require(
        "the_debian_package_installs_runs_and_leaves_cleanly",
        Path::new(&deb).is_file(),
        missing,
    ) {
        return;
    }
    let name = Path::new(&deb)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        name.starts_with("socktrace_") && name.ends_with("_amd64.deb"),
        "{name}"
    );
    // What apt would replace: a package left over from an aborted run.
    let _ = run("dpkg", &["--purge", "socktrace"]);

    succeeds(
        "apt-get",
        &["install", "-y", "--no-install-recommends", &deb],
    );
    let files: Vec<String> = succeeds("dpkg", &["-L", "socktrace"])
        .lines()
        .map(str::to_string)
        .collect();
    for expected in [
        "/usr/bin/socktrace",
        "/usr/share/man/man1/socktrace.1.gz",
        "/usr/share/man/man1/socktrace-watch.1.gz",
        "/usr/share/bash-completion/completions/socktrace",
        "/usr/share/zsh/vendor-completions/_socktrace",
        "/usr/share/fish/vendor_completions.d/socktrace.fish",
    ] {
        assert!(
            files.iter().any(|f| f == expected),
            "{expected} not in {files:#?}"
        );
    }
    let unit = files
        .iter()
        .find(|f| f.ends_with("/systemd/system/socktrace.service"))
        .unwrap_or_else(|| panic!("no systemd unit in {files:#?}"));

    // From PATH, as a user runs it.
    let which = succeeds("sh", &["-c", "command -v socktrace"]);
    assert_eq!(which.trim(), "/usr/bin/socktrace");
    let doctor = succeeds("socktrace", &["doctor"]);
    assert!(doctor.contains("mode: "), "{doctor}");
    // A process that holds connections, for watch to report.
    let server = Role::spawn("watch_roles.py", &["hoard-server"]);
    let port = server.expect("port")["port"].to_string();
    let holder = Role::spawn("watch_roles.py", &["connect-hold", &port, "3"]);
    holder.expect("done");
    let once = succeeds("socktrace", &["watch", "--once", "--interval", "1"]);
    let lines: Vec<_> = once.lines().map(parse).collect();
    assert!(
        lines.iter().any(|line| line["type"] == "process"
            && line["pid"] == holder.pid()
            && line["held"] == 3),
        "watch --once did not report the holder: {once}"
    );

    // The man page renders (no roff warnings) and says what socktrace is.
    let man = Command::new("man")
        .args(["--warnings", "socktrace"])
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "80")
        .output()
        .expect("running man");
    let page = String::from_utf8_lossy(&man.stdout);
    let warnings = String::from_utf8_lossy(&man.stderr);
    assert!(man.status.success(), "man failed: {warnings}");
    assert!(warnings.trim().is_empty(), "man warned: {warnings}");
    assert!(
        page.contains("CLOSE_WAIT") && page.contains("watch"),
        "{page}"
    );

    // The unit as systemd sees it, where systemd is installed.
    if Path::new("/usr/bin/systemd-analyze").exists() {
        succeeds("systemd-analyze", &["verify", unit]);
    } else {
        println!("SKIPPED: systemd-analyze is missing; the unit was not verified");
    }

    succeeds("dpkg", &["--remove", "socktrace"]);
    // dpkg forgets a removed package that kept nothing; "rc" would mean
    // configuration files stayed, and the package has none.
    let status = run("dpkg-query", &["-W", "-f=${db:Status-Abbrev}", "socktrace"]);
    let abbrev = String::from_utf8_lossy(&status.stdout);
    assert!(
        !status.status.success() || abbrev.trim() == "un",
        "status after removal: {abbrev}"
    );
    for file in files.iter().filter(|f| !Path::new(f).is_dir()) {
        assert!(!Path::new(file).exists(), "{file} is still there");
    }
}
