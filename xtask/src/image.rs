//! `cargo xtask image`: the OCI image `localhost/socktrace:<version>`, built
//! by podman from deploy/container/Containerfile (`FROM scratch`) around
//! the static musl binary.

use std::{fs, process::Command};

use anyhow::Context as _;

use crate::{build, cmd, setup};

/// The image's name, as podman lists it.
pub const IMAGE: &str = "localhost/socktrace";

/// Builds the image and returns its reference (`name:version`).
pub fn image() -> anyhow::Result<String> {
    setup::run(setup::Needs::Image)?;
    let binary = build::socktrace(false, Some(setup::MUSL_TARGET))?;
    // The build context holds the binary and nothing else.
    let context = cmd::target_dir()?.join("image");
    fs::create_dir_all(&context)?;
    fs::copy(&binary, context.join("socktrace"))
        .with_context(|| format!("copying {} into the build context", binary.display()))?;
    let reference = format!("{IMAGE}:{}", build::version(&binary)?);
    let containerfile = cmd::workspace_root()?.join("deploy/container/Containerfile");
    let mut build = podman();
    build
        .args(["build", "--tag", &reference, "--file"])
        .arg(&containerfile)
        .arg(&context);
    cmd::run(&mut build)?;
    println!("built {reference}");
    Ok(reference)
}

/// podman as it runs here: runc, as crun refuses hybrid cgroups, and
/// cgroupfs, as there is no systemd to manage them.
pub fn podman() -> Command {
    let mut podman = Command::new("podman");
    podman.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"]);
    podman
}
