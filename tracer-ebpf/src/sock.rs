//! Reading a `struct sock` by address, with offsets taken from the running
//! kernel's BTF: its addresses and ports, its network namespace, whether a
//! file still holds it, and why it closed.

use tracer_common::{AF_INET, Endpoints, Layout, SOCK_COMMON_BYTES};

use crate::{SOCK_COMMON, read_kernel, read_ptr};

/// File type bits of `i_mode` (include/uapi/linux/stat.h).
const S_IFMT: u16 = 0o170000;
const S_IFSOCK: u16 = 0o140000;

/// The `struct sock` behind a file, if it is a socket file:
/// file->private_data (a `struct socket`)->sk, by probe reads.
#[inline(always)]
pub fn of_file(layout: &Layout, file: *const u8) -> Option<*const u8> {
    // SAFETY: every step is a bpf_probe_read_kernel of a kernel pointer; a
    // bad pointer makes the helper fail, it cannot fault.
    unsafe {
        let inode = read_ptr(file, layout.file_inode).ok()?;
        let mode: u16 = read_kernel(inode, layout.inode_mode).ok()?;
        if mode & S_IFMT != S_IFSOCK {
            return None;
        }
        let socket = read_ptr(file, layout.file_private_data).ok()?;
        read_ptr(socket, layout.socket_sk).ok()
    }
}

/// Which `SOCK_COMMON` buffer a reader uses: one per program, since on a
/// CPU a softirq's program can interrupt any other program in the middle
/// of its copy (the kernel refuses only a program's re-entry into itself).
#[derive(Clone, Copy)]
pub enum Reader {
    /// A state program's run.
    Probe = 0,
    /// A `_nested` state program's run, inside one of the above.
    Nested = 1,
    /// accept()'s exit (process context).
    Accept = 2,
    /// A retransmission (a timer's softirq, or process context).
    Retransmit = 3,
    /// A destroy program's run (close() in process context, or a softirq).
    Destroy = 4,
    /// A `_nested` destroy program's run, inside one of the above.
    DestroyNested = 5,
}

/// Reads a `T` at `offset` of a copied block, bounds checked.
#[inline(always)]
pub fn copied_field<T: Copy, const N: usize>(block: &[u8; N], offset: u32) -> Result<T, i64> {
    let offset = offset as usize;
    // Also the bound the verifier needs for the variable offset; the
    // collector checked the layout against it before load.
    if offset > N - size_of::<T>() {
        return Err(-1);
    }
    // SAFETY: in bounds (checked above); any bit pattern is a valid T here
    // (integers and byte arrays).
    Ok(unsafe { core::ptr::read_unaligned(block.as_ptr().add(offset).cast::<T>()) })
}

/// The socket's family, ports and addresses: its `sock_common` copied with
/// one probe read, the local port from `inet_sport` (kept after CLOSE,
/// when `skc_num` is cleared).
#[inline(always)]
pub fn endpoints(layout: &Layout, sk: *const u8, reader: Reader) -> Result<Endpoints, i64> {
    let slot = SOCK_COMMON.get_ptr_mut(reader as u32).ok_or(-1i64)?;
    // SAFETY: this CPU's slot for this reader, used by nothing else while
    // it runs; the probe read tolerates any address.
    let common: &[u8; SOCK_COMMON_BYTES] = unsafe {
        aya_ebpf::helpers::bpf_probe_read_kernel_buf(sk, &mut *slot).map_err(i64::from)?;
        &*slot
    };
    // SAFETY: read_kernel tolerates any address.
    let sport: u16 = unsafe { read_kernel(sk, layout.inet_sport) }?;
    let family: u16 = copied_field(common, layout.sock_family)?;
    let (mut local_addr, mut remote_addr) = ([0; 16], [0; 16]);
    if family == AF_INET {
        local_addr[..4]
            .copy_from_slice(&copied_field::<[u8; 4], _>(common, layout.sock_rcv_saddr)?);
        remote_addr[..4].copy_from_slice(&copied_field::<[u8; 4], _>(common, layout.sock_daddr)?);
    } else {
        local_addr = copied_field(common, layout.sock_v6_rcv_saddr)?;
        remote_addr = copied_field(common, layout.sock_v6_daddr)?;
    }
    Ok(Endpoints {
        family,
        local_port: u16::from_be(sport),
        remote_port: u16::from_be(copied_field(common, layout.sock_dport)?),
        _pad: 0,
        local_addr,
        remote_addr,
    })
}

/// sk->__sk_common.skc_net.net->ns.inum; 0 when unreadable.
#[inline(always)]
pub fn netns(layout: &Layout, sk: *const u8) -> u32 {
    // SAFETY: read_kernel tolerates any address.
    unsafe {
        let Ok(net) = read_ptr(sk, layout.sock_common_net) else {
            return 0;
        };
        read_kernel::<u32>(net, layout.net_ns_inum).unwrap_or(0)
    }
}

/// Whether a file still holds the socket: `sk->sk_socket->file` in use.
/// When the owner's own close() resets a connection (unread data, linger
/// 0) or stops a listener, the socket reaches CLOSE inside the file's
/// release, with `sk_socket` still set but no reference left on the file;
/// a socket orphaned by close() has no `sk_socket` at all.
#[inline(always)]
pub fn held_by_a_file(layout: &Layout, sk: *const u8) -> bool {
    // SAFETY: read_kernel tolerates any address.
    unsafe {
        let Ok(socket) = read_ptr(sk, layout.sock_socket) else {
            return false;
        };
        let Ok(file) = read_ptr(socket, layout.socket_file) else {
            return false;
        };
        let Ok(refs) = read_kernel::<i64>(file, layout.file_refs) else {
            return false;
        };
        if layout.file_refs_less_one != 0 {
            refs >= 0
        } else {
            refs > 0
        }
    }
}

/// Why the kernel closed the socket (positive errno), read at CLOSE: every
/// path that ends a connection on an error sets `sk_err` before it moves
/// the socket to CLOSE (tcp_reset, tcp_write_err, tcp_v4_err).
#[inline(always)]
pub fn close_error(layout: &Layout, sk: *const u8) -> u32 {
    // SAFETY: read_kernel tolerates any address.
    unsafe { read_kernel::<i32>(sk, layout.sock_err) }.map_or(0, |err| err.unsigned_abs())
}
