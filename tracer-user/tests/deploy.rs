//! The manifests of deploy/ checked by the tools their platforms use: the
//! DaemonSet against the Kubernetes schemas. (The systemd unit is verified
//! in tests/package.rs, installed; the dashboard's queries are evaluated by
//! Prometheus in tests/serve.rs; the alert rules by promtool there too.)

// A broken expectation panics: that is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{fs, path::Path, process::Command};

use common::require;

const DAEMONSET: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/kubernetes/daemonset.yaml"
);

/// `kubernetes-validate --strict` (from PyPI, which `cargo xtask test`
/// installs) on `path`: whether it passed, and what it said.
fn validate(path: &Path, kubernetes: &str) -> (bool, String) {
    let out = Command::new("python3")
        .args([
            "-m",
            "kubernetes_validate",
            "--strict",
            "--kubernetes-version",
            kubernetes,
        ])
        .arg(path)
        .output()
        .expect("running python3");
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), said)
}

fn validator_present() -> bool {
    Command::new("python3")
        .args(["-c", "import kubernetes_validate"])
        .status()
        .is_ok_and(|status| status.success())
}

#[test]
fn the_daemonset_passes_the_kubernetes_schemas() {
    const TEST: &str = "the_daemonset_passes_the_kubernetes_schemas";
    let missing =
        "the Python module kubernetes_validate is missing; `cargo xtask test` installs it";
    if !require(TEST, validator_present(), missing) {
        return;
    }
    // 1.30 is the oldest release with securityContext.appArmorProfile.
    for kubernetes in ["1.30.0", "1.37.0"] {
        let (passed, said) = validate(Path::new(DAEMONSET), kubernetes);
        assert!(passed, "Kubernetes {kubernetes}: {said}");
        for kind in ["namespace", "serviceaccount", "daemonset"] {
            assert!(
                said.contains(&format!("passed for resource {kind}/socktrace")),
                "{said}"
            );
        }
    }
    // The validator does reject what is wrong: a misspelt field.
    let manifest = fs::read_to_string(DAEMONSET).unwrap();
    let broken = manifest.replacen("hostPID: true", "hostPid: true", 1);
    assert_ne!(broken, manifest);
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("daemonset-broken.yaml");
    fs::write(&path, broken).unwrap();
    let (passed, said) = validate(&path, "1.37.0");
    assert!(!passed, "a misspelt field passed: {said}");
}

#[test]
fn the_daemonset_runs_the_image_that_cargo_xtask_image_builds() {
    let manifest = fs::read_to_string(DAEMONSET).unwrap();
    let image = manifest
        .lines()
        .find_map(|line| line.trim().strip_prefix("image: "))
        .expect("the DaemonSet names an image");
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        image.ends_with(&format!("socktrace:{version}")),
        "the DaemonSet runs {image}, the build makes socktrace:{version}"
    );
}
