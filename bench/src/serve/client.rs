//! One streamed request to an OpenAI-compatible server, timed token by token.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

/// Which API a request goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Api {
    /// `/v1/chat/completions` with `messages`.
    Chat,
    /// `/v1/completions` with a `prompt` (multi-turn history is flattened).
    Completions,
}

/// A message of a chat request.
#[derive(Clone, Debug)]
pub struct Msg {
    /// `system`, `user` or `assistant`.
    pub role: &'static str,
    /// Text.
    pub content: String,
}

/// What to send.
#[derive(Clone, Debug)]
pub struct Request {
    /// The conversation so far (a single user message for one-shot workloads).
    pub messages: Vec<Msg>,
    /// Prompt length in tokens as the workload built it (the server's count, when it
    /// reports one, replaces it in the results).
    pub input_tokens: usize,
    /// `max_tokens`.
    pub output_tokens: usize,
}

/// Options shared by every request of a run.
#[derive(Clone, Debug)]
pub struct Target {
    /// Base URL, e.g. `http://127.0.0.1:8080`.
    pub base_url: String,
    /// `model` field.
    pub model: String,
    /// API flavour.
    pub api: Api,
    /// Ask the server to ignore end-of-sequence so every request generates `max_tokens`.
    pub ignore_eos: bool,
    /// Whole-request timeout.
    pub timeout: Duration,
}

/// What one request measured.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// Completed with at least one token and a proper end of stream.
    pub success: bool,
    /// Why it failed.
    pub error: String,
    /// Prompt tokens (the server's count when reported).
    pub input_tokens: usize,
    /// Generated tokens (the server's count when reported, else content chunks).
    pub output_tokens: usize,
    /// Seconds from sending to the first content.
    pub ttft: f64,
    /// Seconds between successive content chunks.
    pub itls: Vec<f64>,
    /// Seconds from sending to the end of the stream.
    pub e2e: f64,
    /// Prompt tokens the server reports as served from its cache.
    pub cached_tokens: Option<usize>,
    /// The server's own prompt-processing time in ms (`timings.prompt_ms`, llama.cpp).
    pub server_prompt_ms: Option<f64>,
    /// Per-tier cached tokens when the server reports them
    /// (`usage.prompt_tokens_details.cached_tokens_by_tier`).
    pub tiers: Vec<(String, usize)>,
    /// The generated text.
    pub text: String,
    /// Seconds after the run started when the request was sent.
    pub start: f64,
}

/// An error with its causes ("error sending request: connection reset: ...").
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

fn body(t: &Target, r: &Request) -> Value {
    let mut b = match t.api {
        Api::Chat => json!({
            "model": t.model,
            "messages": r.messages.iter().map(|m| json!({"role": m.role, "content": m.content})).collect::<Vec<_>>(),
        }),
        Api::Completions => json!({
            "model": t.model,
            "prompt": r.messages.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n"),
        }),
    };
    let o = b.as_object_mut().expect("object");
    o.insert("max_tokens".into(), json!(r.output_tokens));
    o.insert("temperature".into(), json!(0.0));
    o.insert("stream".into(), json!(true));
    o.insert("stream_options".into(), json!({"include_usage": true}));
    if t.ignore_eos {
        o.insert("ignore_eos".into(), json!(true));
    }
    b
}

/// Sends `req` and times its stream. Never fails: errors are recorded in the outcome.
pub async fn send(
    client: &reqwest::Client,
    t: &Target,
    req: &Request,
    run_start: Instant,
) -> Outcome {
    let path = match t.api {
        Api::Chat => "/v1/chat/completions",
        Api::Completions => "/v1/completions",
    };
    let url = format!("{}{path}", t.base_url.trim_end_matches('/'));
    let mut out = Outcome {
        input_tokens: req.input_tokens,
        ..Default::default()
    };
    // The request is built before the clock starts: TTFT covers sending and the server.
    let request = client.post(url).json(&body(t, req));
    let t0 = Instant::now();
    out.start = t0.duration_since(run_start).as_secs_f64();
    let result = tokio::time::timeout(t.timeout, stream(request, t0, &mut out)).await;
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            out.success = false;
            out.error = e;
        }
        Err(_) => {
            out.success = false;
            out.error = format!("timed out after {:?}", t.timeout);
        }
    }
    if !out.success {
        // A failed request still took this long (it counts in the run's duration).
        out.e2e = t0.elapsed().as_secs_f64();
    }
    out
}

async fn stream(
    request: reqwest::RequestBuilder,
    t0: Instant,
    out: &mut Outcome,
) -> Result<(), String> {
    let resp = request
        .send()
        .await
        .map_err(|e| format!("request failed: {}", chain(&e)))?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        return Err(format!(
            "HTTP {status}: {}",
            text.chars().take(200).collect::<String>()
        ));
    }
    let mut bytes = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut last: Option<Instant> = None;
    let mut chunks = 0usize;
    let mut done = false;
    let mut server_output: Option<usize> = None;
    while let Some(part) = bytes.next().await {
        let part =
            part.map_err(|e| format!("stream broken after {chunks} tokens: {}", chain(&e)))?;
        let now = Instant::now();
        buf.extend_from_slice(&part);
        // SSE events end with a blank line; process every complete line.
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim();
            let Some(data) = line.strip_prefix("data:") else {
                continue;
            };
            let data = data.trim();
            if data == "[DONE]" {
                done = true;
                break;
            }
            let v: Value =
                serde_json::from_str(data).map_err(|e| format!("bad event {data:?}: {e}"))?;
            if let Some(err) = v.get("error").filter(|e| !e.is_null()) {
                return Err(format!("server error: {err}"));
            }
            let delta = &v["choices"][0]["delta"];
            let content = delta["content"]
                .as_str()
                .or_else(|| v["choices"][0]["text"].as_str())
                .unwrap_or("");
            // Reasoning models stream their thinking first: it is output too (as vLLM counts it).
            let reasoning = delta["reasoning_content"]
                .as_str()
                .or_else(|| delta["reasoning"].as_str())
                .unwrap_or("");
            let content = if content.is_empty() {
                reasoning
            } else {
                content
            };
            if !content.is_empty() {
                match last {
                    None => out.ttft = now.duration_since(t0).as_secs_f64(),
                    Some(prev) => out.itls.push(now.duration_since(prev).as_secs_f64()),
                }
                last = Some(now);
                chunks += 1;
                out.text.push_str(content);
            }
            if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                if let Some(p) = u["prompt_tokens"].as_u64() {
                    out.input_tokens = p as usize;
                }
                if let Some(c) = u["completion_tokens"].as_u64() {
                    server_output = Some(c as usize);
                }
                let details = &u["prompt_tokens_details"];
                if let Some(c) = details["cached_tokens"].as_u64() {
                    out.cached_tokens = Some(c as usize);
                }
                if let Some(m) = details["cached_tokens_by_tier"].as_object() {
                    out.tiers = m
                        .iter()
                        .filter_map(|(k, v)| v.as_u64().map(|n| (k.clone(), n as usize)))
                        .collect();
                }
            }
            if let Some(tm) = v.get("timings").filter(|t| t.is_object()) {
                out.server_prompt_ms = tm["prompt_ms"].as_f64().or(out.server_prompt_ms);
                if out.cached_tokens.is_none() {
                    out.cached_tokens = tm["cache_n"].as_u64().map(|c| c as usize);
                }
            }
        }
        // The response is complete at [DONE], whenever the server closes the connection.
        if done {
            break;
        }
    }
    out.e2e = t0.elapsed().as_secs_f64();
    if chunks == 0 {
        return Err("the stream carried no tokens".into());
    }
    if !done {
        return Err(format!(
            "the stream ended after {chunks} tokens without [DONE]"
        ));
    }
    out.output_tokens = server_output.unwrap_or(chunks);
    out.success = true;
    Ok(())
}
