//! `strata-bench run` against a scripted OpenAI-compatible server inside the test: it
//! streams the first token exactly X ms after a request arrives and then one token every
//! Y ms, so the harness's measurements can be checked against known values (within 2 %, with
//! all 64 requests in flight at once).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

fn tokenizer() -> PathBuf {
    let models = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models");
    strata_engine::fetch::default_model_in(&models)
        .expect("the tests need the default model's tokenizer")
}

/// How the scripted server answers request number `k` (in arrival order).
#[derive(Clone, Copy)]
enum Script {
    /// First token after `first` ms, then one every `gap` ms.
    Steady { first: u64, gap: u64 },
    /// Like steady, with request k's first token after `first + step·k` ms.
    Ramp { first: u64, step: u64, gap: u64 },
    /// Every 4th request gets HTTP 500, every 4th + 1 loses its connection after two tokens.
    Faulty { first: u64, gap: u64 },
    /// A role-only delta at once, then each token event written byte by byte with CRLF line
    /// endings; after `[DONE]` the connection stays open for two seconds.
    Fragmented { first: u64, gap: u64 },
}

fn serve(script: Script) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    // 80 threads blocked in accept, started before any request: a connection is served at
    // once (no thread start in the timed path), and std sleeps are precise to well under a
    // millisecond.
    for _ in 0..80 {
        let (listener, c) = (listener.try_clone().unwrap(), c.clone());
        std::thread::spawn(move || {
            while let Ok((conn, _)) = listener.accept() {
                let _ = answer(conn, script, &c);
            }
        });
    }
    (url, count)
}

fn answer(conn: TcpStream, script: Script, count: &AtomicUsize) -> std::io::Result<()> {
    let mut r = BufReader::new(conn.try_clone()?);
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    let t0 = Instant::now();
    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let n = req["max_tokens"].as_u64().unwrap_or(8) as u32;
    let k = count.fetch_add(1, Ordering::SeqCst) as u64;
    let mut w = conn;
    let (first, gap) = match script {
        Script::Steady { first, gap } => (first, gap),
        Script::Ramp { first, step, gap } => (first + step * k, gap),
        Script::Fragmented { first, gap } => (first, gap),
        Script::Faulty { first, gap } => {
            if k.is_multiple_of(4) {
                w.write_all(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 5\r\nConnection: close\r\n\r\noops!")?;
                return Ok(());
            }
            (first, gap)
        }
    };
    w.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n",
    )?;
    let fragmented = matches!(script, Script::Fragmented { .. });
    if fragmented {
        w.write_all(b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}],\"error\":null}\r\n\r\n")?;
        w.flush()?;
    }
    for i in 0..n {
        let at = t0 + Duration::from_millis(first + gap * u64::from(i));
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        if matches!(script, Script::Faulty { .. }) && k % 4 == 1 && i == 2 {
            // Drop the connection mid-stream.
            return Ok(());
        }
        if fragmented {
            for b in
                format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\" t{i}\"}}}}]}}\r\n\r\n")
                    .bytes()
            {
                w.write_all(&[b])?;
                w.flush()?;
            }
        } else {
            w.write_all(
                format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\" t{i}\"}}}}]}}\n\n")
                    .as_bytes(),
            )?;
            w.flush()?;
        }
    }
    let usage = format!(
        "data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":100,\"completion_tokens\":{n},\"prompt_tokens_details\":{{\"cached_tokens\":25,\"cached_tokens_by_tier\":{{\"G2\":20,\"G3\":5}}}}}}}}\n\ndata: [DONE]\n\n"
    );
    w.write_all(usage.as_bytes())?;
    w.flush()?;
    if fragmented {
        std::thread::sleep(Duration::from_secs(2));
    }
    Ok(())
}

/// One harness run at a time: the timing tests must not share the two cores with each other.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs the harness: 64 requests (8 groups × 8 prompts), `parallel` of them in flight.
fn run_harness(url: &str, output_len: u32, parallel: usize, extra: &[&str]) -> Value {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::env::temp_dir().join(format!(
        "strata-harness-{}-{}",
        std::process::id(),
        url.rsplit(':').next().unwrap()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("result.json");
    let csv = dir.join("requests.csv");
    let out = Command::new(env!("CARGO_BIN_EXE_strata-bench"))
        .args([
            "run",
            "--base-url",
            url,
            "--max-parallel",
            &parallel.to_string(),
            "--quiet",
            "--tokenizer",
        ])
        .arg(tokenizer())
        .arg("--save-result")
        .arg(&json)
        .arg("--csv")
        .arg(&csv)
        .args(extra)
        .args([
            "shared-prefix",
            "--groups",
            "8",
            "--prompts-per-group",
            "8",
            "--system-len",
            "64",
            "--question-len",
            "8",
        ])
        .args(["--output-len", &output_len.to_string()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Mean TTFT (ms):"), "{stdout}");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let csv_text = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(
        csv_text.lines().count(),
        65,
        "one CSV line per request plus the header"
    );
    // Per-request tier attribution, when the server reports it.
    if csv_text
        .lines()
        .nth(1)
        .is_some_and(|l| l.contains(",true,"))
    {
        assert!(
            csv_text
                .lines()
                .skip(1)
                .filter(|l| l.contains(",true,"))
                .all(|l| l.contains("G2=20 G3=5")),
            "{csv_text}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
    v
}

fn within(got: f64, want: f64, tol: f64) -> bool {
    (got - want).abs() <= want * tol
}

#[test]
fn ttft_and_itl_match_the_injected_delays_at_64_concurrent_clients() {
    let (url, count) = serve(Script::Steady {
        first: 1000,
        gap: 50,
    });
    // All 64 requests start at once: the client's own connect-and-send work on a 2-core
    // machine adds a few ms to each TTFT, well inside 2 % of one second.
    let v = run_harness(&url, 16, 64, &[]);
    assert_eq!(count.load(Ordering::SeqCst), 64);
    assert_eq!(v["completed"], 64);
    assert_eq!(v["failed"], 0);
    for (k, want) in [
        ("mean_ttft_ms", 1000.0),
        ("median_ttft_ms", 1000.0),
        ("p99_ttft_ms", 1000.0),
        ("mean_itl_ms", 50.0),
        ("median_itl_ms", 50.0),
        ("mean_tpot_ms", 50.0),
    ] {
        let got = v[k].as_f64().unwrap();
        println!("{k}: {got:.3} (injected {want})");
        assert!(within(got, want, 0.02), "{k} = {got}, injected {want}");
    }
    // vLLM bench serve's field names, and the raw series.
    for k in [
        "duration",
        "completed",
        "total_input_tokens",
        "total_output_tokens",
        "request_throughput",
        "output_throughput",
        "mean_ttft_ms",
        "median_ttft_ms",
        "std_ttft_ms",
        "p99_ttft_ms",
        "mean_tpot_ms",
        "mean_itl_ms",
        "mean_e2el_ms",
    ] {
        assert!(v[k].is_number(), "{k} missing");
    }
    assert_eq!(v["ttfts"].as_array().unwrap().len(), 64);
    assert_eq!(v["itls"][0].as_array().unwrap().len(), 15);
    assert_eq!(v["total_output_tokens"], 64 * 16);
    assert_eq!(
        v["total_input_tokens"],
        64 * 100,
        "the server's prompt token count is used"
    );
    assert_eq!(v["cache_hit_rate"], 0.25);
    let e2e = v["mean_e2el_ms"].as_f64().unwrap();
    assert!(within(e2e, 1000.0 + 15.0 * 50.0, 0.02), "e2e {e2e}");
}

#[test]
fn percentiles_follow_a_known_distribution() {
    // Request k's first token after 500 + 5k ms: TTFTs are 500, 505, ..., 815 ms.
    let (url, _) = serve(Script::Ramp {
        first: 500,
        step: 5,
        gap: 5,
    });
    // Eight in flight: this test is about the statistics, not the load.
    let v = run_harness(&url, 2, 8, &["--percentiles", "10,50,90,99"]);
    let set: Vec<f64> = (0..64).map(|k| 500.0 + 5.0 * f64::from(k)).collect();
    for (p, k) in [
        (10.0f64, "p10_ttft_ms"),
        (50.0, "p50_ttft_ms"),
        (90.0, "p90_ttft_ms"),
        (99.0, "p99_ttft_ms"),
    ] {
        let rank: f64 = p / 100.0 * 63.0;
        let want = set[rank.floor() as usize]
            + (set[rank.ceil() as usize] - set[rank.floor() as usize]) * rank.fract();
        let got = v[k].as_f64().unwrap();
        println!("{k}: {got:.2} (expected {want:.2})");
        assert!(within(got, want, 0.02), "{k} = {got}, expected {want}");
    }
    let mean = v["mean_ttft_ms"].as_f64().unwrap();
    assert!(within(mean, 657.5, 0.02), "mean {mean}");
}

#[test]
fn errors_and_dropped_streams_count_as_failed_not_fast() {
    let (url, _) = serve(Script::Faulty {
        first: 1000,
        gap: 20,
    });
    let v = run_harness(&url, 8, 64, &[]);
    assert_eq!(v["failed"], 32, "16 HTTP 500s and 16 dropped streams");
    assert_eq!(v["completed"], 32);
    // The failures did not pull the latency figures down.
    let ttft = v["mean_ttft_ms"].as_f64().unwrap();
    assert!(
        within(ttft, 1000.0, 0.02),
        "mean TTFT over the successful requests: {ttft}"
    );
    let errors: Vec<&str> = v["errors"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e.as_str())
        .filter(|e| !e.is_empty())
        .collect();
    assert_eq!(errors.len(), 32);
    assert!(errors.iter().any(|e| e.contains("HTTP 500")), "{errors:?}");
    assert!(
        errors
            .iter()
            .any(|e| e.contains("without [DONE]") || e.contains("stream broken")),
        "{errors:?}"
    );
}

#[test]
fn an_unreachable_server_fails_every_request_and_says_why() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let v = run_harness(&format!("http://127.0.0.1:{port}"), 4, 64, &[]);
    assert_eq!(v["completed"], 0);
    assert_eq!(v["failed"], 64);
    assert!(v["errors"][0].as_str().unwrap().contains("request failed"));
}

#[test]
fn compare_reports_the_ratio_of_two_endpoints() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (a, _) = serve(Script::Steady {
        first: 200,
        gap: 10,
    });
    let (b, _) = serve(Script::Steady {
        first: 400,
        gap: 10,
    });
    let out = Command::new(env!("CARGO_BIN_EXE_strata-bench"))
        .args([
            "compare",
            "--base-url",
            &a,
            "--other-url",
            &b,
            "--repeats",
            "2",
            "--max-parallel",
            "8",
            "--quiet",
            "--tokenizer",
        ])
        .arg(tokenizer())
        .args([
            "shared-prefix",
            "--groups",
            "2",
            "--prompts-per-group",
            "4",
            "--system-len",
            "16",
            "--question-len",
            "4",
            "--output-len",
            "4",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = stdout
        .lines()
        .find(|l| l.starts_with("mean_ttft_ms"))
        .unwrap_or_else(|| panic!("{stdout}"));
    let ratio: f64 = row.split_whitespace().last().unwrap().parse().unwrap();
    println!("{row}");
    assert!((ratio - 2.0).abs() < 0.05, "B/A mean TTFT {ratio}");
}

#[test]
fn a_trace_is_replayed_on_its_timestamps() {
    let (url, count) = serve(Script::Steady { first: 20, gap: 5 });
    let dir = std::env::temp_dir().join(format!("strata-trace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let trace = dir.join("trace.jsonl");
    std::fs::write(
        &trace,
        "{\"timestamp\": 1000, \"input_length\": 40, \"output_length\": 3, \"hash_ids\": [7, 8]}\n\
         {\"timestamp\": 1300, \"input_length\": 50, \"output_length\": 3, \"hash_ids\": [7, 8, 9]}\n\
         {\"timestamp\": 1600, \"input_length\": 20, \"output_length\": 3, \"hash_ids\": [7]}\n",
    )
    .unwrap();
    let json = dir.join("r.json");
    let csv = dir.join("r.csv");
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = Command::new(env!("CARGO_BIN_EXE_strata-bench"))
        .args(["run", "--base-url", &url, "--quiet", "--tokenizer"])
        .arg(tokenizer())
        .arg("--save-result")
        .arg(&json)
        .arg("--csv")
        .arg(&csv)
        .args(["trace", "--block-tokens", "32", "--trace"])
        .arg(&trace)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(count.load(Ordering::SeqCst), 3);
    let starts: Vec<f64> = std::fs::read_to_string(&csv)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(5).unwrap().parse::<f64>().unwrap())
        .collect();
    let mut s = starts.clone();
    s.sort_by(|a, b| a.total_cmp(b));
    // Relative to the first request: 0, 300, 600 ms (the trace's own offsets).
    for (got, want) in s.iter().map(|x| (x - s[0]) * 1e3).zip([0.0, 300.0, 600.0]) {
        assert!(
            (got - want).abs() < 15.0,
            "start {got} ms, trace says {want} ms"
        );
    }
    // A trace whose blocks cannot hold its input is refused with the line number.
    std::fs::write(
        &trace,
        "{\"timestamp\": 0, \"input_length\": 100, \"output_length\": 1, \"hash_ids\": [1]}\n",
    )
    .unwrap();
    let bad = Command::new(env!("CARGO_BIN_EXE_strata-bench"))
        .args(["run", "--base-url", &url, "--quiet", "--tokenizer"])
        .arg(tokenizer())
        .args(["trace", "--block-tokens", "32", "--trace"])
        .arg(&trace)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("line 1"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sse_fragments_crlf_and_role_only_deltas_are_parsed() {
    let (url, _) = serve(Script::Fragmented {
        first: 300,
        gap: 20,
    });
    let v = run_harness(&url, 6, 8, &[]);
    assert_eq!(v["completed"], 64, "{:?}", v["errors"]);
    let ttft = v["mean_ttft_ms"].as_f64().unwrap();
    assert!(
        within(ttft, 300.0, 0.02),
        "the role-only delta is not the first token: TTFT {ttft}"
    );
    let e2e = v["mean_e2el_ms"].as_f64().unwrap();
    assert!(
        within(e2e, 300.0 + 5.0 * 20.0, 0.03),
        "the request ends at [DONE], not at the connection's close: {e2e}"
    );
    assert_eq!(v["itls"][0].as_array().unwrap().len(), 5);
}

#[test]
fn bad_flags_get_a_clear_error() {
    let cases: [(&[&str], &str); 5] = [
        (&["--timeout=-1", "long-doc-qa"], "--timeout"),
        (&["--request-rate=0", "multi-turn"], "request rate"),
        (&["--percentiles", "50,101", "multi-turn"], "percentiles"),
        (&["long-doc-qa", "--questions", "0"], "--questions"),
        (&["--max-parallel", "0", "shared-prefix"], "--max-parallel"),
    ];
    for (args, want) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_strata-bench"))
            .args(["run", "--quiet"])
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} ran");
        assert!(
            stderr.contains(want) && !stderr.contains("panicked"),
            "{args:?}: {stderr}"
        );
    }
}
