//! The sweep: the kernel's iterator over the TCP sockets of socktrace's
//! network namespace (`sweep.rs` of the kernel programs), which reports
//! what they have held long enough. Its link is made here, once, and each
//! pass opens a fresh iterator on it (aya's iterator links open one).

use std::{
    fs::File,
    io::Read as _,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
};

use anyhow::{Context as _, anyhow};
use aya::{Btf, Ebpf, maps::Array, programs::Iter};
use tracer_common::{SWEEP_DUE_MAP, SWEEP_PROGRAM};

// From include/uapi/linux/bpf.h.
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_ITER_CREATE: libc::c_long = 33;
const BPF_TRACE_ITER: u32 = 28;

/// `union bpf_attr` as BPF_LINK_CREATE reads it for an iterator.
#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

/// `union bpf_attr` as BPF_ITER_CREATE reads it.
#[repr(C)]
struct IterCreateAttr {
    link_fd: u32,
    flags: u32,
}

/// The sweep's link, made once; each pass opens an iterator on it.
pub struct Sweep {
    link: OwnedFd,
}

impl Sweep {
    pub fn load(ebpf: &mut Ebpf, btf: &Btf) -> anyhow::Result<Self> {
        let iter: &mut Iter = ebpf
            .program_mut(SWEEP_PROGRAM)
            .context("program sweep_sockets missing from the eBPF object")?
            .try_into()?;
        iter.load("tcp", btf)
            .map_err(|e| anyhow!("loading the sweep (iter/tcp) failed: {e:#}"))?;
        let attr = LinkCreateAttr {
            prog_fd: iter.fd()?.as_fd().as_raw_fd() as u32,
            target_fd: 0,
            attach_type: BPF_TRACE_ITER,
            flags: 0,
        };
        let link = bpf(BPF_LINK_CREATE, &attr).context("linking the sweep")?;
        Ok(Self { link })
    }

    /// One pass: reports what sockets have held since `due_before` (ktime)
    /// or earlier.
    pub fn pass(&self, ebpf: &mut Ebpf, due_before: u64) -> anyhow::Result<()> {
        let mut due: Array<_, u64> = Array::try_from(
            ebpf.map_mut(SWEEP_DUE_MAP)
                .context("map SWEEP_DUE missing")?,
        )?;
        due.set(0, due_before, 0)
            .context("setting the sweep's due time")?;
        let attr = IterCreateAttr {
            link_fd: self.link.as_raw_fd() as u32,
            flags: 0,
        };
        let iterator = bpf(BPF_ITER_CREATE, &attr).context("opening a sweep")?;
        // It reports into the ring buffer and writes nothing here: reading
        // to the end runs it.
        File::from(iterator)
            .read_to_end(&mut Vec::new())
            .context("running the sweep")?;
        Ok(())
    }
}

/// The bpf() system call for a command that returns a new fd.
fn bpf<T>(command: libc::c_long, attr: &T) -> anyhow::Result<OwnedFd> {
    // SAFETY: `attr` is a #[repr(C)] prefix of `union bpf_attr` for this
    // command, live for the call; the kernel reads `size_of::<T>()` bytes
    // of it (and checks that it knows any field we set).
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            std::ptr::from_ref(attr),
            size_of::<T>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
