//! The running kernel's layout as socktrace reads it: the tracefs format
//! files of its tracepoints, and the struct member offsets in its BTF. The
//! input is a format file, a NUL, then BTF bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tracer_user::probes::layout;

fuzz_target!(|data: &[u8]| {
    let (format, btf) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let fields = layout::parse_format(&String::from_utf8_lossy(format));
    if let Ok(btf) = btf_rs::Btf::from_bytes(btf) {
        let _ = layout::layout_of(&fields, &fields, &fields, &fields, &btf);
    }
});
