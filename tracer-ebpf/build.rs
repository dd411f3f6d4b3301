use which::which;

/// Rebuild the kernel programs when bpf-linker changes (e.g. after an LLVM upgrade).
fn main() {
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
