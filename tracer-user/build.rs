use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// Compiles the kernel programs with the nightly toolchain and bpf-linker so the
/// object can be embedded in the `socktrace` binary (`include_bytes_aligned!`).
fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata()?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "tracer-ebpf")
        .ok_or_else(|| anyhow!("tracer-ebpf package not found"))?;
    let root = ebpf
        .manifest_path
        .parent()
        .context("tracer-ebpf manifest has no parent directory")?;
    aya_build::build_ebpf(
        [Package {
            name: "tracer-ebpf",
            root_dir: root.as_str(),
            ..Default::default()
        }],
        Toolchain::default(),
    )
}

fn cargo_metadata() -> anyhow::Result<cargo_metadata::Metadata> {
    cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")
}
