//! `strata-engine serve` over real HTTP with the real model: the same tokens with and without
//! the prefix cache under concurrency and preemption, real reuse, OpenAI-shaped errors,
//! cancellation on disconnect, and 503s under overload.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};
use strata_tests::engine::{EngineServer, metric, model_path};

const MAX_TOKENS: usize = 40;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap()
}

/// 16 prompts over 4 shared prefixes of 100, 150, 200 and 250 tokens (not multiples of the
/// 64-token page) with 4 different suffixes each, from the fixture passage.
fn prompts() -> &'static Vec<Vec<u32>> {
    static P: OnceLock<Vec<Vec<u32>>> = OnceLock::new();
    P.get_or_init(|| {
        let text = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../engine/tests/fixtures/passage.txt"),
        )
        .unwrap();
        let e = strata_engine::Engine::load(&model_path()).unwrap();
        let ids = e.encode_prompt(&text, false).unwrap();
        assert!(ids.len() >= 320, "the passage is {} tokens", ids.len());
        let mut out = Vec::new();
        for (k, len) in [100, 150, 200, 250].into_iter().enumerate() {
            let prefix = &ids[k * 20..k * 20 + len];
            for j in 0..4 {
                let end = 310 - j * 30;
                let mut p = prefix.to_vec();
                p.extend_from_slice(&ids[end - (5 + 3 * j)..end]);
                out.push(p);
            }
        }
        out
    })
}

async fn complete(c: &reqwest::Client, base: &str, prompt: &[u32]) -> Value {
    let r = c
        .post(format!("{base}/v1/completions"))
        .json(
            &json!({"model": "smollm2", "prompt": prompt, "max_tokens": MAX_TOKENS,
                      "temperature": 0, "ignore_eos": true, "return_token_ids": true}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

fn token_ids(v: &Value) -> Vec<u64> {
    v["choices"][0]["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect()
}

async fn metrics(c: &reqwest::Client, base: &str) -> String {
    c.get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// What each prompt gives alone, on a fresh server with the cache off (computed once).
fn reference() -> &'static Vec<Vec<u64>> {
    static R: OnceLock<Vec<Vec<u64>>> = OnceLock::new();
    R.get_or_init(|| {
        let s = EngineServer::start(&["--no-prefix-cache", "--max-running", "1"]);
        rt().block_on(async {
            let c = client();
            let mut out = Vec::new();
            for p in prompts() {
                let v = complete(&c, &s.base, p).await;
                assert_eq!(
                    v["usage"]["prompt_tokens_details"]["cached_tokens"], 0,
                    "cache off reports 0 cached tokens"
                );
                out.push(token_ids(&v));
            }
            out
        })
    })
}

async fn all_at_once(base: &str) -> Vec<Value> {
    let c = client();
    let futs = prompts().iter().map(|p| {
        let c = c.clone();
        let base = base.to_string();
        async move { complete(&c, &base, p).await }
    });
    futures_util::future::join_all(futs).await
}

#[test]
fn same_tokens_with_and_without_the_cache_under_concurrency_and_preemption() {
    let want = reference();
    for (i, w) in want.iter().enumerate() {
        assert_eq!(
            w.len(),
            MAX_TOKENS,
            "prompt {i} generated {} tokens",
            w.len()
        );
    }
    // Prefill chunks of 64 tokens interleave with decode; two rounds: the first shares
    // prefixes between concurrent requests, the second finds them all cached.
    let s = EngineServer::start(&["--chunk", "64"]);
    rt().block_on(async {
        for round in 0..2 {
            let got = all_at_once(&s.base).await;
            for (i, v) in got.iter().enumerate() {
                assert_eq!(
                    &token_ids(v),
                    &want[i],
                    "round {round}, prompt {i}: tokens differ from the cache-off run"
                );
                let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .unwrap();
                assert_eq!(cached % 64, 0, "only whole pages are reused");
                assert_eq!(
                    v["usage"]["prompt_tokens_details"]["cached_tokens_by_tier"]["device"],
                    cached
                );
                if round == 1 {
                    let plen = prompts()[i].len() as u64;
                    assert!(
                        cached >= (plen - 1) / 64 * 64 - 64 && cached > 0,
                        "round 2, prompt {i}: only {cached} of {plen} tokens were cached"
                    );
                }
            }
        }
        let m = metrics(&client(), &s.base).await;
        assert_eq!(metric(&m, "strata:num_requests_running"), Some(0.0));
    });
    drop(s);
    // A pool of 12 pages cannot hold 16 requests of 2 to 5 pages: the scheduler must
    // evict, queue and preempt, and still give the same tokens.
    let s = EngineServer::start(&["--chunk", "64", "--kv-memory-mib", "18"]);
    rt().block_on(async {
        let got = all_at_once(&s.base).await;
        for (i, v) in got.iter().enumerate() {
            assert_eq!(
                &token_ids(v),
                &want[i],
                "small pool, prompt {i}: tokens differ from the cache-off run"
            );
        }
        let m = metrics(&client(), &s.base).await;
        assert!(
            metric(&m, "strata:num_preemptions_total").unwrap() > 0.0,
            "the small pool preempted nothing:\n{m}"
        );
        assert_eq!(metric(&m, "strata:num_requests_running"), Some(0.0));
    });
}

#[test]
fn a_request_that_extends_another_prefills_only_its_new_tokens() {
    let s = EngineServer::start(&[]);
    rt().block_on(async {
        let c = client();
        let p = &prompts()[15]; // 250 + 14 tokens
        let first = complete(&c, &s.base, &p[..200]).await;
        assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
        let before = metric(&metrics(&c, &s.base).await, "strata:prefill_tokens_total").unwrap();
        let second = complete(&c, &s.base, p).await;
        let after = metric(&metrics(&c, &s.base).await, "strata:prefill_tokens_total").unwrap();
        // 200 tokens fill 3 whole pages of 64.
        assert_eq!(
            second["usage"]["prompt_tokens_details"]["cached_tokens"],
            192
        );
        assert_eq!(
            after - before,
            (p.len() - 192) as f64,
            "only the tokens after the cached pages are prefilled"
        );
        assert_eq!(
            metric(
                &metrics(&c, &s.base).await,
                "strata:cached_tokens_total{tier=\"device\"}"
            ),
            Some(192.0)
        );
    });
}

/// What a refused request must answer: status, and the `param` it names or a phrase its
/// message contains.
enum Names {
    Param(&'static str),
    Message(&'static str),
    Code(&'static str),
}

#[test]
fn bad_input_gets_openai_shaped_errors_that_name_the_problem() {
    use Names::*;
    let s = EngineServer::start(&["--kv-memory-mib", "64"]);
    let long = json!({"prompt": vec![42u32; 8192]}).to_string();
    // 64 MiB of f16 KV hold 45 pages (2,880 tokens): a longer request cannot fit the pool.
    let cases: Vec<(&str, String, u16, Names)> = vec![
        (
            "chat",
            "{\"messages\": [".into(),
            400,
            Message("not valid JSON"),
        ),
        (
            "chat",
            r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":"ten"}"#.into(),
            400,
            Param("max_tokens"),
        ),
        (
            "chat",
            r#"{"messages":[]}"#.into(),
            400,
            Message("must not be empty"),
        ),
        (
            "chat",
            r#"{"messages":[{"role":"user","content":5}]}"#.into(),
            400,
            Param("messages[0]"),
        ),
        (
            "chat",
            r#"{"model":"gpt-4","messages":[{"role":"user","content":"hi"}]}"#.into(),
            404,
            Code("model_not_found"),
        ),
        ("cmpl", long, 400, Message("context")),
        (
            "cmpl",
            json!({"prompt": [1, 2, 3], "max_tokens": 9000}).to_string(),
            400,
            Message("cannot fit"),
        ),
        (
            "cmpl",
            json!({"prompt": [1, 2, 3], "max_tokens": 4000}).to_string(),
            400,
            Message("pool"),
        ),
        (
            "cmpl",
            json!({"prompt": [1, 99999999]}).to_string(),
            400,
            Message("vocabulary"),
        ),
        (
            "cmpl",
            json!({"prompt": "hi", "n": 2}).to_string(),
            400,
            Param("n"),
        ),
        (
            "cmpl",
            json!({"prompt": "hi", "temperature": 7}).to_string(),
            400,
            Param("temperature"),
        ),
        ("cmpl", "{}".into(), 400, Param("prompt")),
        ("nope", "{}".into(), 404, Code("not_found")),
    ];
    rt().block_on(async {
        let c = client();
        for (what, body, status, names) in &cases {
            let path = match *what {
                "chat" => "/v1/chat/completions",
                "cmpl" => "/v1/completions",
                _ => "/v1/nope",
            };
            let r = c
                .post(format!("{}{path}", s.base))
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), *status, "{path} {body:.80}");
            let v: Value = r.json().await.unwrap();
            let e = &v["error"];
            assert!(e["message"].is_string() && e["type"].is_string(), "{v}");
            assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
            match names {
                Param(p) => assert_eq!(e["param"], *p, "{v}"),
                Message(m) => assert!(e["message"].as_str().unwrap().contains(m), "{v}"),
                Code(k) => assert_eq!(e["code"], *k, "{v}"),
            }
        }
        // Nothing above reached the scheduler, and the server still serves.
        let v = complete(&c, &s.base, &[1, 2, 3]).await;
        assert_eq!(token_ids(&v).len(), MAX_TOKENS);
        let m = metrics(&c, &s.base).await;
        assert_eq!(
            metric(&m, "strata:request_invalid_total"),
            Some((cases.len() - 1) as f64),
            "every refused request but the unknown route is counted: {m}"
        );
    });
}

#[test]
fn a_client_that_disconnects_mid_stream_frees_its_request_and_pages() {
    let s = EngineServer::start(&[]);
    rt().block_on(async {
        let c = client();
        let r = c
            .post(format!("{}/v1/completions", s.base))
            .json(
                &json!({"prompt": prompts()[3], "max_tokens": 2000, "ignore_eos": true,
                          "temperature": 0, "stream": true}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let mut body = r.bytes_stream();
        let mut seen = 0;
        while seen < 3 {
            let chunk = body.next().await.unwrap().unwrap();
            seen += String::from_utf8_lossy(&chunk).matches("data: ").count();
        }
        let m = metrics(&c, &s.base).await;
        assert_eq!(metric(&m, "strata:num_requests_running"), Some(1.0), "{m}");
        drop(body); // the connection closes
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let m = metrics(&c, &s.base).await;
            let running = metric(&m, "strata:num_requests_running").unwrap();
            let used = metric(&m, "strata:kv_pages{state=\"used\"}").unwrap();
            let cached = metric(&m, "strata:kv_pages{state=\"cached\"}").unwrap();
            if running == 0.0 && used == cached {
                assert_eq!(metric(&m, "strata:request_cancelled_total"), Some(1.0));
                break;
            }
            assert!(
                Instant::now() < deadline,
                "10 s after the disconnect: {running} running, {used} pages used, {cached} cached"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}

#[test]
fn overload_gets_503_with_retry_after_and_the_rest_completes() {
    let s = EngineServer::start(&["--max-waiting", "64", "--kv-memory-mib", "256"]);
    let rss0 = s.rss();
    rt().block_on(async {
        let c = client();
        let futs = (0..200u32).map(|i| {
            let c = c.clone();
            let url = format!("{}/v1/completions", s.base);
            async move {
                let r = c
                    .post(url)
                    .json(&json!({"prompt": [1, 2 + i % 50, 3], "max_tokens": 4,
                                  "ignore_eos": true}))
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let retry = r.headers().get("retry-after").is_some();
                let v: Value = r.json().await.unwrap();
                (status, retry, v)
            }
        });
        let got = futures_util::future::join_all(futs).await;
        let ok = got.iter().filter(|g| g.0 == 200).count();
        let busy: Vec<_> = got.iter().filter(|g| g.0 == 503).collect();
        assert_eq!(ok + busy.len(), 200, "only 200s and 503s");
        assert!(
            !busy.is_empty(),
            "200 requests at once against a queue of 64 got no 503"
        );
        assert!(ok >= 64, "only {ok} requests were served");
        for (_, retry, v) in &busy {
            assert!(*retry, "a 503 without Retry-After");
            assert_eq!(v["error"]["code"], "overloaded");
        }
        for (_, _, v) in got.iter().filter(|g| g.0 == 200) {
            assert_eq!(v["usage"]["completion_tokens"], 4);
        }
        let m = metrics(&c, &s.base).await;
        assert_eq!(
            metric(&m, "strata:request_rejected_total"),
            Some(busy.len() as f64)
        );
        assert_eq!(metric(&m, "strata:num_requests_running"), Some(0.0));
        assert_eq!(metric(&m, "strata:num_requests_waiting"), Some(0.0));
    });
    let grown = s.rss().saturating_sub(rss0);
    assert!(
        grown < 512 << 20,
        "the server grew by {} MiB under the burst",
        grown >> 20
    );
}

/// A non-streamed chat completion's JSON.
async fn chat(c: &reqwest::Client, base: &str, body: &Value) -> Value {
    c.post(format!("{base}/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[test]
fn chat_streams_with_usage_and_stop_strings_end_the_text() {
    let s = EngineServer::start(&[]);
    rt().block_on(async {
        let c = client();
        let body = json!({"model": "smollm2", "temperature": 0, "max_tokens": 24,
            "messages": [{"role": "system", "content": "You are terse."},
                         {"role": "user", "content": "Name three colors."}]});
        let full = chat(&c, &s.base, &body).await;
        let text = full["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(text.len() > 4, "{full}");
        assert_eq!(full["object"], "chat.completion");
        // The same request streamed gives the same text, then a usage chunk and [DONE].
        let mut sb = body.clone();
        sb["stream"] = json!(true);
        sb["stream_options"] = json!({"include_usage": true});
        let raw = c
            .post(format!("{}/v1/chat/completions", s.base))
            .json(&sb)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let events: Vec<Value> = raw
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        assert!(raw.trim_end().ends_with("data: [DONE]"));
        let streamed: String = events
            .iter()
            .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(streamed, text);
        let usage = &events.last().unwrap()["usage"];
        assert_eq!(
            usage["completion_tokens"],
            full["usage"]["completion_tokens"]
        );
        assert!(usage["prompt_tokens_details"]["cached_tokens"].is_u64());
        // A stop string taken from the middle of that text ends the output right before it.
        let cut = text.char_indices().nth(text.chars().count() / 2).unwrap().0;
        let stop: String = text[cut..].chars().take(3).collect();
        let mut stopped = body.clone();
        stopped["stop"] = json!([stop]);
        let v = chat(&c, &s.base, &stopped).await;
        let got = v["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(got, &text[..text.find(&stop).unwrap()]);
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        // Ended by a stop string is a finished request, not a cancelled one (the scheduler
        // learns it at its next step).
        let mut m = metrics(&c, &s.base).await;
        for _ in 0..100 {
            if metric(&m, "strata:num_requests_running") == Some(0.0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            m = metrics(&c, &s.base).await;
        }
        assert_eq!(
            metric(&m, "strata:request_cancelled_total"),
            Some(0.0),
            "{m}"
        );
        assert_eq!(
            metric(&m, "strata:request_success_total{finished_reason=\"stop\"}"),
            Some(1.0),
            "{m}"
        );
        // The models list names the served model.
        let models: Value = c
            .get(format!("{}/v1/models", s.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(models["data"][0]["id"], "smollm2");
    });
    assert!(s.terminate(), "SIGTERM ends the server cleanly");
}

#[test]
fn slow_or_oversized_requests_are_cut_off() {
    use std::io::{Read, Write};
    let s = EngineServer::start(&[]);
    let addr = s.base.trim_start_matches("http://").to_string();
    // Headers that never end: the server closes the connection after its header timeout.
    let mut slow = std::net::TcpStream::connect(&addr).unwrap();
    slow.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let t0 = Instant::now();
    let mut buf = [0u8; 256];
    let n = slow.read(&mut buf).unwrap_or(0);
    assert!(
        t0.elapsed() < Duration::from_secs(25),
        "an unfinished request held its connection for {:?}",
        t0.elapsed()
    );
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(n == 0 || head.starts_with("HTTP/1.1 408"), "{head}");
    // A body over the 4 MiB limit: 413 in OpenAI's shape.
    rt().block_on(async {
        let big = format!("{{\"prompt\": \"{}\"}}", "a".repeat(5 << 20));
        let r = client()
            .post(format!("{}/v1/completions", s.base))
            .header("content-type", "application/json")
            .body(big)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 413);
        let v: Value = r.json().await.unwrap();
        assert!(
            v["error"]["message"].as_str().unwrap().contains("limit"),
            "{v}"
        );
    });
}
