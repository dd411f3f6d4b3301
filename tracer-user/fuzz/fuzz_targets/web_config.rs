//! `serve --web-config FILE`: YAML written by hand, bcrypt hashes pasted in.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tracer_user::serve::web_config::WebConfig;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        // Relative paths point nowhere: only the parsing is under test.
        let _ = WebConfig::parse(text, std::path::Path::new("/nonexistent"));
    }
});
