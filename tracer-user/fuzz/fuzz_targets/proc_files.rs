//! The /proc files socktrace reads of other processes (limits, status,
//! cgroup, fdinfo) and the fd links it classifies: whatever a process or
//! a kernel puts there.
#![no_main]

use libfuzzer_sys::fuzz_target;
use procfs::FromBufRead as _;
use tracer_user::{containers, procfs as proc_files};

fuzz_target!(|data: &[u8]| {
    let _ = procfs::process::Limits::from_buf_read(data);
    let _ = procfs::process::Status::from_buf_read(data);
    if let Some(path) = proc_files::preferred_cgroup(data) {
        let _ = containers::container_id(&String::from_utf8_lossy(path));
        let _ = tracer_user::text::shown(path);
    }
    let text = String::from_utf8_lossy(data);
    let _ = proc_files::field::<u64>(&text, "recursion_misses");
    let _ = proc_files::kind_of_link(data, || Some(text.to_string()));
});
