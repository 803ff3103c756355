//! A minute of `strata-bench soak` against the real sidecar binary: 64 connections of three
//! tenants (Unix socket and TCP, inline and shared memory) under the fault schedule —
//! client processes killed with SIGKILL, the disk tier's file system filled to ENOSPC and
//! freed, the sidecar killed with SIGKILL and restarted on the same disk, attacks at a low
//! rate. Needs root for the loop device (as CI has); without it the ENOSPC fault is
//! skipped and the rest still runs. No timing is asserted, only correctness.

use std::time::Duration;

use strata_bench::soak::{self, SoakConfig};
use strata_tests::sidecar::built_binary;

#[test]
fn a_minute_of_soak_under_faults_reads_no_wrong_byte_and_loses_nothing_on_disk() {
    let cfg = SoakConfig::new(
        built_binary("strata-sidecar-under-test"),
        (built_binary("strata-soak-client"), Vec::new()),
        Duration::from_secs(60),
    );
    let r = soak::run(cfg).expect("the soak ran");
    eprintln!("{}", r.text);
    let j = &r.json;
    assert_eq!(r.wrong_bytes, 0, "wrong bytes read:\n{}", r.text);
    assert!(r.panics.is_empty(), "the sidecar panicked: {:?}", r.panics);
    assert!(j["blocks_checked"].as_u64().unwrap_or(0) > 0, "{}", r.text);
    // Killed clients: their leases were gone before they could expire.
    let leases = &j["killed_client_leases"];
    assert!(leases["checked"].as_u64().unwrap_or(0) > 0, "{}", r.text);
    assert_eq!(leases["still_held"].as_u64(), Some(0), "{}", r.text);
    // Restarts: everything a lookup showed on disk before the SIGKILL was found after.
    let pages = &j["restart_pages"];
    assert!(
        pages["on_disk_before"].as_u64().unwrap_or(0) > 0,
        "{}",
        r.text
    );
    assert_eq!(pages["found_after"], pages["on_disk_before"], "{}", r.text);
    // The full disk was seen by the tier (with root, which the loop device needs).
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let episodes = j["enospc"].as_array().cloned().unwrap_or_default();
        assert!(!episodes.is_empty(), "{}", r.text);
        let warned: u64 = episodes
            .iter()
            .filter_map(|e| e["enospc_warnings_logged"].as_u64())
            .sum();
        assert!(warned > 0, "the disk tier never hit ENOSPC:\n{}", r.text);
    }
    // And every other acceptance check of the soak (RSS bound, leases back to 0 at the
    // end, clean shutdown, no answer breaking the API).
    assert!(r.failures.is_empty(), "{:?}\n{}", r.failures, r.text);
}
