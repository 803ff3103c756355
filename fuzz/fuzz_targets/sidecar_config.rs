//! The sidecar's TOML configuration and size parser on arbitrary text: parsing, validating
//! and deriving the write policy and socket paths must return values or errors, never
//! panic; `parse_size` must never panic either.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_server::SidecarConfig;
use strata_server::config::parse_size;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = parse_size(text);
    for line in text.lines().take(8) {
        let _ = parse_size(line);
    }
    if let Ok(cfg) = toml::from_str::<SidecarConfig>(text) {
        let _ = cfg.validate();
        let _ = cfg.parse_write_policy();
        let _ = cfg.socket_path();
        let _ = cfg.shm_socket_path();
    }
});
