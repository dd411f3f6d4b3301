//! Field offsets of the running kernel, for the kernel programs' [`Layout`].
//!
//! Tracepoint record offsets come from tracefs `format` files; kernel struct
//! member offsets come from BTF. Nothing is compiled in, so one binary runs on
//! kernels whose layouts differ.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow, bail};
use btf_rs::{Backend, Btf, Type};
use rustix::mount::MountFlags;
use tracer_common::{Layout, SET_STATE_RECORD_BYTES, SOCK_COMMON_BYTES};

pub const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";
const TRACEFS_CANDIDATES: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// Returns the tracefs mount, mounting it at /sys/kernel/tracing when no
/// tracefs is mounted (it is not mounted at boot on some hosts).
pub fn tracefs() -> anyhow::Result<PathBuf> {
    let mounted = || {
        TRACEFS_CANDIDATES
            .iter()
            .map(Path::new)
            .find(|p| p.join("events").is_dir())
            .map(Path::to_path_buf)
    };
    if let Some(found) = mounted() {
        return Ok(found);
    }
    let target = Path::new(TRACEFS_CANDIDATES[0]);
    // The mount(2) call itself: the static image has no mount(8).
    if let Err(e) = rustix::mount::mount("nodev", target, "tracefs", MountFlags::empty(), None) {
        // Another process (a second socktrace starting beside this one)
        // may have mounted it meanwhile: the kernel then says EBUSY.
        if let Some(found) = mounted() {
            return Ok(found);
        }
        bail!(
            "tracefs is not mounted and mounting it at {} failed: {e}",
            target.display()
        );
    }
    if !target.join("events").is_dir() {
        bail!("tracefs at {} has no events directory", target.display());
    }
    log::info!("mounted tracefs at {}", target.display());
    Ok(target.to_path_buf())
}

/// Offsets of the named fields of one tracepoint's record.
pub fn tracepoint_fields(
    tracefs: &Path,
    category: &str,
    name: &str,
) -> anyhow::Result<HashMap<String, u16>> {
    let path = tracefs
        .join("events")
        .join(category)
        .join(name)
        .join("format");
    let text = fs::read_to_string(&path).with_context(|| {
        format!(
            "this kernel has no tracepoint {category}:{name} ({} is missing); socktrace needs Linux 4.16 or later with tracepoints enabled",
            path.display()
        )
    })?;
    Ok(parse_format(&text))
}

/// Parses lines like `field:const void * skaddr; offset:8; size:8; signed:0;`
/// (tab-separated).
pub fn parse_format(text: &str) -> HashMap<String, u16> {
    let mut fields = HashMap::new();
    for line in text.lines() {
        let mut decl = None;
        let mut offset = None;
        for part in line.split(';').map(str::trim) {
            if let Some(d) = part.strip_prefix("field:") {
                decl = Some(d);
            } else if let Some(o) = part.strip_prefix("offset:") {
                offset = o.parse::<u16>().ok();
            }
        }
        if let (Some(decl), Some(offset)) = (decl, offset) {
            // The name is the last word, without any array suffix.
            let name = decl.rsplit([' ', '*']).next().unwrap_or(decl);
            let name = name.split('[').next().unwrap_or(name);
            fields.insert(name.to_string(), offset);
        }
    }
    fields
}

fn field(fields: &HashMap<String, u16>, tracepoint: &str, name: &str) -> anyhow::Result<u16> {
    fields
        .get(name)
        .copied()
        .ok_or_else(|| anyhow!("tracepoint {tracepoint} has no field {name}"))
}

/// Byte offset of `member` in `struct name`, looking inside anonymous
/// structs and unions (the kernel nests many members in them).
pub fn member_offset(btf: &Btf, name: &str, member: &str) -> anyhow::Result<u32> {
    Ok(find_struct_member(btf, name, member)?.0)
}

/// As [`member_offset`], for a member the kernel programs read as a whole
/// integer: a bitfield (as `sk_protocol` was before Linux 5.6) is refused.
fn whole_member_offset(btf: &Btf, name: &str, member: &str) -> anyhow::Result<u32> {
    match find_struct_member(btf, name, member)? {
        (offset, false) => Ok(offset),
        (_, true) => bail!(
            "BTF struct {name} has {member} as a bitfield; socktrace needs Linux 5.6 or later"
        ),
    }
}

/// The byte offset of the member and whether it is a bitfield.
fn find_struct_member(btf: &Btf, name: &str, member: &str) -> anyhow::Result<(u32, bool)> {
    let types = btf
        .resolve_types_by_name(name)
        .with_context(|| format!("BTF has no type {name}"))?;
    for ty in types {
        if let Type::Struct(s) = ty
            && let Some((bits, bitfield)) = find_member(btf, &s, member)?
        {
            return Ok((bits / 8, bitfield));
        }
    }
    bail!("BTF struct {name} has no member {member}")
}

fn find_member(btf: &Btf, s: &btf_rs::Struct, member: &str) -> anyhow::Result<Option<(u32, bool)>> {
    for m in &s.members {
        let name = btf.resolve_name(m).unwrap_or_default();
        if name == member {
            return Ok(Some((
                m.bit_offset(),
                m.bitfield_size().is_some_and(|size| size > 0),
            )));
        }
        if name.is_empty() {
            let inner = btf.resolve_chained_type(m)?;
            if let Type::Struct(inner) | Type::Union(inner) = inner
                && let Some((bits, bitfield)) = find_member(btf, &inner, member)?
            {
                return Ok(Some((m.bit_offset() + bits, bitfield)));
            }
        }
    }
    Ok(None)
}

/// Where `struct file` counts its references, and whether that count is
/// one less than the references (`file_ref_t`, Linux 6.13 and later) or
/// the plain count (`f_count` before).
fn file_refs(btf: &Btf) -> anyhow::Result<(u32, bool)> {
    match member_offset(btf, "file", "f_ref") {
        Ok(offset) => Ok((offset, true)),
        Err(_) => Ok((member_offset(btf, "file", "f_count")?, false)),
    }
}

pub fn load_btf(path: &Path) -> anyhow::Result<Btf> {
    if !path.exists() {
        bail!(
            "this kernel has no BTF ({} is missing); socktrace needs a kernel built with CONFIG_DEBUG_INFO_BTF=y",
            path.display()
        );
    }
    // Mmap: only the few structs we look up are parsed, not the whole file.
    // Kernels before 6.16 cannot mmap sysfs BTF (ENODEV); those parse it all.
    Btf::from_file_with_backend(path, Backend::Mmap)
        .or_else(|_| Btf::from_file_with_backend(path, Backend::Cache))
        .with_context(|| format!("reading kernel BTF from {}", path.display()))
}

/// Reads every offset the kernel programs need from this kernel.
pub fn discover(tracefs: &Path, btf: &Btf) -> anyhow::Result<Layout> {
    let set_state = tracepoint_fields(tracefs, "sock", "inet_sock_set_state")?;
    let accept = tracepoint_fields(tracefs, "syscalls", "sys_exit_accept4")?;
    let destroy = tracepoint_fields(tracefs, "tcp", "tcp_destroy_sock")?;
    let retransmit = tracepoint_fields(tracefs, "tcp", "tcp_retransmit_skb")?;
    layout_of(&set_state, &accept, &destroy, &retransmit, btf)
}

/// The layout from the four tracepoints' fields and the kernel's BTF.
pub fn layout_of(
    set_state: &HashMap<String, u16>,
    accept: &HashMap<String, u16>,
    destroy: &HashMap<String, u16>,
    retransmit: &HashMap<String, u16>,
    btf: &Btf,
) -> anyhow::Result<Layout> {
    let tp = "sock:inet_sock_set_state";
    let (file_refs, file_refs_less_one) = file_refs(btf)?;
    let layout = Layout {
        set_state_skaddr: field(set_state, tp, "skaddr")?,
        set_state_oldstate: field(set_state, tp, "oldstate")?,
        set_state_newstate: field(set_state, tp, "newstate")?,
        set_state_sport: field(set_state, tp, "sport")?,
        set_state_dport: field(set_state, tp, "dport")?,
        set_state_family: field(set_state, tp, "family")?,
        set_state_protocol: field(set_state, tp, "protocol")?,
        set_state_saddr: field(set_state, tp, "saddr")?,
        set_state_daddr: field(set_state, tp, "daddr")?,
        set_state_saddr_v6: field(set_state, tp, "saddr_v6")?,
        set_state_daddr_v6: field(set_state, tp, "daddr_v6")?,
        accept_ret: field(accept, "syscalls:sys_exit_accept4", "ret")?,
        destroy_skaddr: field(destroy, "tcp:tcp_destroy_sock", "skaddr")?,
        retransmit_skaddr: field(retransmit, "tcp:tcp_retransmit_skb", "skaddr")?,
        file_refs_less_one: u16::from(file_refs_less_one),
        _pad: 0,
        task_files: member_offset(btf, "task_struct", "files")?,
        files_fdt: member_offset(btf, "files_struct", "fdt")?,
        fdtable_max_fds: member_offset(btf, "fdtable", "max_fds")?,
        fdtable_fd: member_offset(btf, "fdtable", "fd")?,
        file_private_data: member_offset(btf, "file", "private_data")?,
        socket_sk: member_offset(btf, "socket", "sk")?,
        sock_common_net: member_offset(btf, "sock_common", "skc_net")?,
        net_ns_inum: member_offset(btf, "net", "ns")? + member_offset(btf, "ns_common", "inum")?,
        sock_socket: member_offset(btf, "sock", "sk_socket")?,
        sock_err: member_offset(btf, "sock", "sk_err")?,
        socket_file: member_offset(btf, "socket", "file")?,
        file_refs,
        file_inode: member_offset(btf, "file", "f_inode")?,
        inode_mode: member_offset(btf, "inode", "i_mode")?,
        // struct sock starts with its sock_common (__sk_common).
        sock_family: member_offset(btf, "sock_common", "skc_family")?,
        sock_state: member_offset(btf, "sock_common", "skc_state")?,
        sock_protocol: whole_member_offset(btf, "sock", "sk_protocol")?,
        sock_type: whole_member_offset(btf, "sock", "sk_type")?,
        sock_dport: member_offset(btf, "sock_common", "skc_dport")?,
        sock_daddr: member_offset(btf, "sock_common", "skc_daddr")?,
        sock_rcv_saddr: member_offset(btf, "sock_common", "skc_rcv_saddr")?,
        sock_v6_daddr: member_offset(btf, "sock_common", "skc_v6_daddr")?,
        sock_v6_rcv_saddr: member_offset(btf, "sock_common", "skc_v6_rcv_saddr")?,
        inet_sport: member_offset(btf, "inet_sock", "inet_sport")?,
        task_tgid: member_offset(btf, "task_struct", "tgid")?,
        task_comm: member_offset(btf, "task_struct", "comm")?,
        task_flags: member_offset(btf, "task_struct", "flags")?,
    };
    check_set_state_record(&layout)?;
    check_sock_common(&layout)?;
    Ok(layout)
}

/// The BTF tracepoint programs copy the first [`SOCK_COMMON_BYTES`] of the
/// socket and read its family, ports and addresses from that copy.
fn check_sock_common(layout: &Layout) -> anyhow::Result<()> {
    let end = [
        (layout.sock_family, 2),
        (layout.sock_dport, 2),
        (layout.sock_daddr, 4),
        (layout.sock_rcv_saddr, 4),
        (layout.sock_v6_daddr, 16),
        (layout.sock_v6_rcv_saddr, 16),
    ]
    .map(|(offset, size)| offset as usize + size)
    .into_iter()
    .max()
    .unwrap_or_default();
    if end > SOCK_COMMON_BYTES {
        bail!(
            "struct sock_common has an unexpected layout on this kernel: its fields end at byte {end}, past the {SOCK_COMMON_BYTES} socktrace reads"
        );
    }
    Ok(())
}

/// The kernel program copies the first [`SET_STATE_RECORD_BYTES`] of the
/// record and reads every field from that copy.
fn check_set_state_record(layout: &Layout) -> anyhow::Result<()> {
    let ends = [
        (layout.set_state_skaddr, 8),
        (layout.set_state_oldstate, 4),
        (layout.set_state_newstate, 4),
        (layout.set_state_sport, 2),
        (layout.set_state_dport, 2),
        (layout.set_state_family, 2),
        (layout.set_state_protocol, 2),
        (layout.set_state_saddr, 4),
        (layout.set_state_daddr, 4),
        (layout.set_state_saddr_v6, 16),
        (layout.set_state_daddr_v6, 16),
    ]
    .map(|(offset, size)| usize::from(offset) + size);
    let end = ends.into_iter().max().unwrap_or_default();
    if end > SET_STATE_RECORD_BYTES {
        bail!(
            "sock:inet_sock_set_state has an unexpected layout on this kernel: its fields end at byte {end}, past the {SET_STATE_RECORD_BYTES} socktrace reads"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMAT: &str = "name: inet_sock_set_state
ID: 2287
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;
\tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;

print fmt: \"family=%s\"";

    #[test]
    fn missing_btf_and_tracepoint_say_what_is_needed() {
        let Err(err) = load_btf(Path::new("/nonexistent/vmlinux")) else {
            panic!("a missing BTF file must be an error");
        };
        assert!(
            format!("{err:#}").contains("CONFIG_DEBUG_INFO_BTF=y"),
            "{err:#}"
        );
        let empty = std::env::temp_dir();
        let err = tracepoint_fields(&empty, "sock", "no_such_tracepoint").unwrap_err();
        assert!(
            format!("{err:#}").contains("no tracepoint sock:no_such_tracepoint"),
            "{err:#}"
        );
    }

    #[test]
    fn struct_member_offsets_come_from_btf() {
        let Ok(btf) = load_btf(Path::new(BTF_PATH)) else {
            println!("SKIPPED: this kernel has no BTF at {BTF_PATH}");
            return;
        };
        let sk = member_offset(&btf, "socket", "sk").unwrap();
        assert!(sk > 0 && sk < 64, "{sk}");
        // Members nested in anonymous unions are found too.
        assert!(member_offset(&btf, "file", "private_data").is_ok());
        assert!(member_offset(&btf, "socket", "no_such_member").is_err());
    }

    #[test]
    fn parses_tracefs_format() {
        let fields = parse_format(FORMAT);
        assert_eq!(fields["skaddr"], 8);
        assert_eq!(fields["oldstate"], 16);
        assert_eq!(fields["saddr_v6"], 40);
        assert_eq!(fields["common_type"], 0);
        assert_eq!(fields["parent_comm"], 8);
        assert!(!fields.contains_key("print"));
    }

    #[test]
    fn set_state_fields_must_end_within_the_copied_record() {
        let layout = Layout {
            set_state_daddr_v6: 56,
            ..Layout::default()
        };
        assert!(check_set_state_record(&layout).is_ok());
        let moved = Layout {
            set_state_daddr_v6: 88,
            ..Layout::default()
        };
        let err = check_set_state_record(&moved).unwrap_err().to_string();
        assert!(err.contains("end at byte 104"), "{err}");
    }
}
