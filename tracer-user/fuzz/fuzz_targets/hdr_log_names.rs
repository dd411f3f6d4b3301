//! `serve --hdr-log FILE` with any file name a user may give (spaces,
//! newlines, bytes that are not UTF-8), rotated: the log and its rotated
//! names must stay inside the directory and never panic.
#![no_main]

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt as _;
use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use tracer_user::{
    serve::hdr_log::{HdrLog, HdrLogOptions},
    watch::distribution::Distributions,
};

fuzz_target!(|data: &[u8]| {
    let Some((&keep, name)) = data.split_first() else {
        return;
    };
    if name.is_empty() || name.len() > 200 || name.contains(&b'/') || name.contains(&0) {
        return;
    }
    if name == b"." || name == b".." {
        return;
    }
    let dir = std::env::temp_dir().join(format!("socktrace-fuzz-hdr-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let options = HdrLogOptions {
        path: dir.join(OsStr::from_bytes(name)),
        max_bytes: 256,
        keep: usize::from(keep % 4),
    };
    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let mut distributions = Distributions::default();
    distributions.lifetime.record_ns(1_000_000);
    for round in 0..3u64 {
        let Ok(mut log) = HdrLog::create(options.clone(), start) else {
            break;
        };
        let now = start + Duration::from_secs(round + 1);
        let _ = log.write_interval(now, [(1, "comm", &distributions)]);
    }
    for entry in std::fs::read_dir(&dir).unwrap() {
        let entry = entry.unwrap();
        assert!(entry.path().starts_with(&dir));
    }
    let _ = std::fs::remove_dir_all(&dir);
});
