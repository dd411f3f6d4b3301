//! The guests' initramfs: busybox, the kernel modules that reach the host's
//! root over 9p, and an init that mounts it (under a tmpfs overlay) as the
//! new root and hands over to the guest script there.

use std::{fs, path::Path};

use anyhow::Context as _;

use super::debian::Module;

/// The 9p export of the host's root; qemu's `-virtfs` uses the same tag.
pub const ROOT_TAG: &str = "hostroot";

/// Builds the initramfs (an uncompressed newc cpio archive, which the kernel
/// takes as it is). `guest_script` is run by the host's /bin/sh once the
/// host's root is the guest's root.
pub fn build(busybox: &Path, modules: &[Module], guest_script: &Path) -> anyhow::Result<Vec<u8>> {
    let busybox = fs::read(busybox).with_context(|| format!("reading {}", busybox.display()))?;
    let mut cpio = Cpio::default();
    for dir in [
        "bin", "dev", "proc", "sys", "lower", "rw", "newroot", "modules",
    ] {
        cpio.dir(dir);
    }
    // The kernel opens it as init's stdin/stdout/stderr before /dev is mounted.
    cpio.char_device("dev/console", 5, 1);
    cpio.file("bin/busybox", 0o755, &busybox);
    // insmod in this order: the list has dependencies first.
    for (index, module) in modules.iter().enumerate() {
        let path = format!("modules/{index:02}-{}.ko", module.name);
        cpio.file(&path, 0o644, &module.object);
    }
    cpio.file("init", 0o755, init_script(guest_script).as_bytes());
    Ok(cpio.finish())
}

fn init_script(guest_script: &Path) -> String {
    let script = crate::cmd::shell_quote(&guest_script.to_string_lossy());
    format!(
        r#"#!/bin/busybox sh
# Stage 1 of a socktrace test guest.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs dev /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
fail() {{
    echo "VM-ERROR $*"
    echo o >/proc/sysrq-trigger
    sleep 60
}}
for module in /modules/*.ko; do
    insmod "$module" || fail "insmod $module failed"
done
# The host does not change its files while a guest runs, so the guest may
# cache them (cache=loose); that matters a lot under emulation.
mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=262144,cache=loose {ROOT_TAG} /lower ||
    fail "mounting the host's root over 9p failed"
mount -t tmpfs -o mode=0755 rw /rw
mkdir /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot ||
    fail "mounting the overlay root failed"
# The guest's own kernel filesystems, where the host's were.
mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs -o mode=1777 shm /newroot/dev/shm
# /tmp stays the overlay's: the build may live there. /run is the guest's.
mount -t tmpfs -o mode=0755 run /newroot/run
mount -t tracefs tracefs /newroot/sys/kernel/tracing
mount -t debugfs debugfs /newroot/sys/kernel/debug
mount -t securityfs securityfs /newroot/sys/kernel/security
mount -t bpf bpf /newroot/sys/fs/bpf
mount -t cgroup2 cgroup2 /newroot/sys/fs/cgroup
exec switch_root /newroot /bin/sh {script}
"#
    )
}

/// A newc ("070701") cpio archive, as the kernel's initramfs unpacker reads it.
#[derive(Default)]
struct Cpio {
    archive: Vec<u8>,
    inode: u32,
}

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFCHR: u32 = 0o020_000;

impl Cpio {
    fn dir(&mut self, path: &str) {
        self.entry(path, S_IFDIR | 0o755, (0, 0), &[]);
    }

    fn file(&mut self, path: &str, permissions: u32, data: &[u8]) {
        self.entry(path, S_IFREG | permissions, (0, 0), data);
    }

    fn char_device(&mut self, path: &str, major: u32, minor: u32) {
        self.entry(path, S_IFCHR | 0o600, (major, minor), &[]);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.archive
    }

    fn entry(&mut self, path: &str, mode: u32, (rdev_major, rdev_minor): (u32, u32), data: &[u8]) {
        self.inode += 1;
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        // Sizes over 4 GiB cannot be written in this format; none come near.
        let fields = [
            self.inode,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            data.len() as u32,
            0, // device major
            0, // device minor
            rdev_major,
            rdev_minor,
            path.len() as u32 + 1, // with the NUL
            0,                     // checksum (unused by newc)
        ];
        self.archive.extend_from_slice(b"070701");
        for field in fields {
            self.archive
                .extend_from_slice(format!("{field:08X}").as_bytes());
        }
        self.archive.extend_from_slice(path.as_bytes());
        self.archive.push(0);
        self.pad();
        self.archive.extend_from_slice(data);
        self.pad();
    }

    /// Headers, names and data each start on a 4-byte boundary.
    fn pad(&mut self) {
        while !self.archive.len().is_multiple_of(4) {
            self.archive.push(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_newc_entries_aligned() {
        let mut cpio = Cpio::default();
        cpio.file("init", 0o755, b"#!/bin/sh\n");
        let archive = cpio.finish();
        let header = std::str::from_utf8(&archive[..110]).unwrap();
        assert!(header.starts_with("070701"));
        assert_eq!(&header[14..22], "000081ED"); // regular file, 0755
        assert_eq!(&header[54..62], "0000000A"); // 10 bytes of data
        assert_eq!(&header[94..102], "00000005"); // "init" and its NUL
        // 110-byte header + 5-byte name, padded to 116; data padded to 128.
        assert_eq!(&archive[116..126], b"#!/bin/sh\n");
        assert_eq!(&archive[128..134], b"070701");
        assert!(archive.ends_with(b"TRAILER!!!\0\0\0\0"));
        assert_eq!(archive.len() % 4, 0);
    }
}
