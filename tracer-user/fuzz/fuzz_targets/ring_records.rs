//! The records the kernel programs write: ring buffer events and the
//! socket-file iterator's output. Malformed ones must be errors, never a
//! panic (a mismatched kernel object, a truncated read).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tracer_user::decode::{decode, decode_socket_files};

fuzz_target!(|data: &[u8]| {
    let _ = decode(data);
    let _ = decode_socket_files(data);
});
