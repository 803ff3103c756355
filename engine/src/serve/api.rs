//! The OpenAI-compatible HTTP API: request parsing and validation, SSE streaming,
//! detokenization and stop strings, and errors in OpenAI's shape.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::metrics::{Metrics, TIERS};
use super::sched::{Event, Finish, Job, SubmitError, Submitter};
use crate::sampler::Sampling;
use crate::{Engine, Message};

/// What the handlers share.
pub struct AppState {
    /// The model, tokenizer and chat template.
    pub engine: Arc<Engine>,
    /// The scheduler's queue.
    pub submitter: Submitter,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The name requests use for the model.
    pub model_id: String,
    /// KV pool pages (a request must fit in them).
    pub pool_pages: usize,
    /// Tokens per page.
    pub page_size: usize,
    /// When the server started (the model's `created`).
    pub created: u64,
    next_id: AtomicU64,
    /// Requests being parsed and tokenized at once; more are refused with 503, so a flood
    /// of large bodies cannot queue unbounded work before `max_waiting` applies.
    preparing: Arc<tokio::sync::Semaphore>,
}

impl AppState {
    /// The state of a server for `model_id`.
    pub fn new(
        engine: Arc<Engine>,
        submitter: Submitter,
        metrics: Arc<Metrics>,
        model_id: String,
        pool_pages: usize,
        page_size: usize,
    ) -> Self {
        AppState {
            engine,
            submitter,
            metrics,
            model_id,
            pool_pages,
            page_size,
            created: unix_now(),
            next_id: AtomicU64::new(1),
            preparing: Arc::new(tokio::sync::Semaphore::new(PREPARING)),
        }
    }
}

/// Largest request body accepted.
pub const MAX_BODY: usize = 4 << 20;

/// Requests parsed and tokenized at once.
const PREPARING: usize = 32;

/// How long a client may take to send a request body.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// The request body, at most [`MAX_BODY`] bytes within [`BODY_TIMEOUT`].
async fn read_body(body: Body) -> Result<Bytes, ApiError> {
    let err = |status, message: String| ApiError {
        status,
        message,
        kind: "invalid_request_error",
        param: None,
        code: None,
    };
    match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, MAX_BODY)).await {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(e)) => Err(err(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body could not be read within the {MAX_BODY}-byte limit: {e}"),
        )),
        Err(_) => Err(err(
            StatusCode::REQUEST_TIMEOUT,
            format!("the request body did not arrive within {BODY_TIMEOUT:?}"),
        )),
    }
}

fn overloaded(s: &AppState, what: &str) -> ApiError {
    s.metrics.rejected.inc();
    ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: format!("the server is at capacity ({what}); retry later"),
        kind: "server_error",
        param: None,
        code: Some("overloaded"),
    }
}

/// The routes.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// An error in OpenAI's shape.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<String>,
    code: Option<&'static str>,
}

impl ApiError {
    fn bad(message: impl Into<String>, param: Option<&str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }});
        let mut r = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: "no such route (the API serves /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics)".into(),
        kind: "invalid_request_error",
        param: None,
        code: Some("not_found"),
    }
}

async fn health() -> impl IntoResponse {
    // The listener opens only after the model is loaded, so answering at all means ready.
    (StatusCode::OK, axum::Json(json!({"status": "ok"})))
}

async fn metrics(State(s): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}

async fn models(State(s): State<Arc<AppState>>) -> impl IntoResponse {
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": s.model_id,
            "object": "model",
            "created": s.created,
            "owned_by": "strata",
            "max_model_len": s.engine.model.config.ctx_len,
        }],
    }))
}

/// The fields both endpoints share, validated.
struct Params {
    max_tokens: Option<usize>,
    sampling: Sampling,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
    ignore_eos: bool,
    return_token_ids: bool,
}

fn parse_body(body: &Bytes) -> Result<serde_json::Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::bad(
            "the request body must be a JSON object",
            None,
        )),
        Err(e) => Err(ApiError::bad(
            format!("the request body is not valid JSON: {e}"),
            None,
        )),
    }
}

fn get_present<'a>(m: &'a serde_json::Map<String, Value>, k: &str) -> Option<&'a Value> {
    m.get(k).filter(|v| !v.is_null())
}

fn num(m: &serde_json::Map<String, Value>, k: &str) -> Result<Option<f64>, ApiError> {
    match get_present(m, k) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|x| x.is_finite())
            .map(Some)
            .ok_or_else(|| ApiError::bad(format!("'{k}' must be a number, got {v}"), Some(k))),
    }
}

fn uint(m: &serde_json::Map<String, Value>, k: &str) -> Result<Option<u64>, ApiError> {
    match get_present(m, k) {
        None => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            ApiError::bad(
                format!("'{k}' must be a non-negative integer, got {v}"),
                Some(k),
            )
        }),
    }
}

fn boolean(m: &serde_json::Map<String, Value>, k: &str) -> Result<bool, ApiError> {
    match get_present(m, k) {
        None => Ok(false),
        Some(v) => v
            .as_bool()
            .ok_or_else(|| ApiError::bad(format!("'{k}' must be a boolean, got {v}"), Some(k))),
    }
}

fn params(s: &AppState, m: &serde_json::Map<String, Value>) -> Result<Params, ApiError> {
    if let Some(v) = get_present(m, "model") {
        let name = v.as_str().ok_or_else(|| {
            ApiError::bad(format!("'model' must be a string, got {v}"), Some("model"))
        })?;
        if name != s.model_id && name != "default" {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                message: format!(
                    "the model '{name}' does not exist; this server serves '{}'",
                    s.model_id
                ),
                kind: "invalid_request_error",
                param: Some("model".into()),
                code: Some("model_not_found"),
            });
        }
    }
    let max_tokens = match uint(m, "max_completion_tokens")? {
        Some(n) => Some(n),
        None => uint(m, "max_tokens")?,
    };
    if max_tokens == Some(0) {
        return Err(ApiError::bad(
            "'max_tokens' must be at least 1",
            Some("max_tokens"),
        ));
    }
    let temperature = num(m, "temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad(
            format!("'temperature' must be between 0 and 2, got {temperature}"),
            Some("temperature"),
        ));
    }
    let top_p = num(m, "top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad(
            format!("'top_p' must be in (0, 1], got {top_p}"),
            Some("top_p"),
        ));
    }
    let seed = match get_present(m, "seed") {
        // No seed: a different draw each time, as OpenAI's API does.
        None => {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
                ^ s.next_id.fetch_add(1, Ordering::Relaxed).rotate_left(32)
        }
        Some(v) => v
            .as_i64()
            .map(|x| x as u64)
            .or_else(|| v.as_u64())
            .ok_or_else(|| {
                ApiError::bad(format!("'seed' must be an integer, got {v}"), Some("seed"))
            })?,
    };
    if let Some(n) = uint(m, "n")?
        && n != 1
    {
        return Err(ApiError::bad(format!("'n' must be 1, got {n}"), Some("n")));
    }
    let stop = match get_present(m, "stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                ApiError::bad(
                    "'stop' must be a string or an array of strings",
                    Some("stop"),
                )
            })?,
        Some(v) => {
            return Err(ApiError::bad(
                format!("'stop' must be a string or an array of strings, got {v}"),
                Some("stop"),
            ));
        }
    };
    if stop.len() > 4 || stop.iter().any(|s| s.is_empty() || s.len() > 256) {
        return Err(ApiError::bad(
            "'stop' takes at most 4 non-empty strings of at most 256 bytes",
            Some("stop"),
        ));
    }
    let include_usage = match get_present(m, "stream_options") {
        None => false,
        Some(Value::Object(o)) => boolean(o, "include_usage")?,
        Some(v) => {
            return Err(ApiError::bad(
                format!("'stream_options' must be an object, got {v}"),
                Some("stream_options"),
            ));
        }
    };
    Ok(Params {
        max_tokens: max_tokens.map(|n| n.min(usize::MAX as u64) as usize),
        sampling: Sampling {
            temperature: temperature as f32,
            top_p: top_p as f32,
            seed,
        },
        stop,
        stream: boolean(m, "stream")?,
        include_usage,
        ignore_eos: boolean(m, "ignore_eos")?,
        return_token_ids: boolean(m, "return_token_ids")?,
    })
}

fn messages(m: &serde_json::Map<String, Value>) -> Result<Vec<Message>, ApiError> {
    let Some(v) = get_present(m, "messages") else {
        return Err(ApiError::bad("'messages' is required", Some("messages")));
    };
    let arr = v.as_array().ok_or_else(|| {
        ApiError::bad(
            format!("'messages' must be an array, got {v}"),
            Some("messages"),
        )
    })?;
    if arr.is_empty() {
        return Err(ApiError::bad(
            "'messages' must not be empty",
            Some("messages"),
        ));
    }
    arr.iter()
        .enumerate()
        .map(|(i, msg)| {
            let p = format!("messages[{i}]");
            let role = msg
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::bad(format!("{p}.role must be a string"), Some(&p)))?;
            if !matches!(role, "system" | "user" | "assistant" | "developer") {
                return Err(ApiError::bad(
                    format!("{p}.role '{role}' is not one of system, user, assistant"),
                    Some(&p),
                ));
            }
            let content = match msg.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut s = String::new();
                    for part in parts {
                        match (part.get("type").and_then(Value::as_str), part.get("text")) {
                            (Some("text"), Some(Value::String(t))) => s.push_str(t),
                            _ => {
                                return Err(ApiError::bad(
                                    format!("{p}.content parts must be {{\"type\": \"text\", \"text\": ...}}"),
                                    Some(&p),
                                ));
                            }
                        }
                    }
                    s
                }
                Some(Value::Null) | None if role == "assistant" => String::new(),
                _ => {
                    return Err(ApiError::bad(
                        format!("{p}.content must be a string or an array of text parts"),
                        Some(&p),
                    ));
                }
            };
            let role = if role == "developer" { "system" } else { role };
            Ok(Message {
                role: role.into(),
                content,
            })
        })
        .collect()
}

async fn chat(State(s): State<Arc<AppState>>, body: Body) -> Response {
    handle(s, body, Kind::Chat).await
}

async fn completions(State(s): State<Arc<AppState>>, body: Body) -> Response {
    handle(s, body, Kind::Text).await
}

/// Reads, parses and tokenizes a request of either endpoint, then runs it.
async fn handle(s: Arc<AppState>, body: Body, kind: Kind) -> Response {
    // Parsing, the chat template and tokenizing a prompt of up to {MAX_BODY} bytes are
    // CPU work: off the async workers, and only {PREPARING} at once.
    let Ok(permit) = s.preparing.clone().try_acquire_owned() else {
        return overloaded(&s, "too many requests being prepared").into_response();
    };
    let st = s.clone();
    let r = match read_body(body).await {
        Ok(body) => {
            blocking(move || {
                let m = parse_body(&body)?;
                let p = params(&st, &m)?;
                let ids = match kind {
                    Kind::Chat => chat_prompt(&st, &m)?,
                    Kind::Text => text_prompt(&st, &m)?,
                };
                Ok((p, ids))
            })
            .await
        }
        Err(e) => Err(e),
    };
    drop(permit);
    match r {
        Ok((p, ids)) => run(s, p, ids, kind).await,
        Err(e) => {
            s.metrics.bad_requests.inc();
            e.into_response()
        }
    }
}

/// The token ids of a chat request: its messages through the model's chat template.
fn chat_prompt(s: &AppState, m: &serde_json::Map<String, Value>) -> Result<Vec<u32>, ApiError> {
    let msgs = messages(m)?;
    let t = s.engine.chat.as_ref().ok_or_else(|| {
        ApiError::bad(
            "this model has no chat template; use /v1/completions",
            Some("messages"),
        )
    })?;
    let text = t
        .render(&msgs)
        .map_err(|e| ApiError::bad(e.to_string(), Some("messages")))?;
    crate::tokenizer::encode(&s.engine.tokenizer, &text)
        .map_err(|e| ApiError::bad(e.to_string(), Some("messages")))
}

/// The token ids of a completions request: its prompt text, or the ids it gives.
fn text_prompt(s: &AppState, m: &serde_json::Map<String, Value>) -> Result<Vec<u32>, ApiError> {
    let bad = || {
        ApiError::bad(
            "'prompt' must be a string, an array of token ids, or an array of one string",
            Some("prompt"),
        )
    };
    let ids = match get_present(m, "prompt") {
        None => return Err(ApiError::bad("'prompt' is required", Some("prompt"))),
        Some(Value::String(t)) => s
            .engine
            .encode_prompt(t, false)
            .map_err(|e| ApiError::bad(e.to_string(), Some("prompt")))?,
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => s
            .engine
            .encode_prompt(a[0].as_str().unwrap_or_default(), false)
            .map_err(|e| ApiError::bad(e.to_string(), Some("prompt")))?,
        Some(Value::Array(a)) => {
            let ids: Vec<u32> = a
                .iter()
                .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()))
                .collect::<Option<_>>()
                .ok_or_else(bad)?;
            let vocab = s.engine.model.config.vocab;
            if let Some(t) = ids.iter().find(|t| **t as usize >= vocab) {
                return Err(ApiError::bad(
                    format!("token id {t} is outside the vocabulary of {vocab}"),
                    Some("prompt"),
                ));
            }
            ids
        }
        Some(_) => return Err(bad()),
    };
    Ok(ids)
}

/// Runs `f` on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: format!("request preparation failed: {e}"),
            kind: "server_error",
            param: None,
            code: None,
        })
    })
}

#[derive(Clone, Copy)]
enum Kind {
    Chat,
    Text,
}

/// Checks the prompt and length against the context and the pool, then queues the job.
async fn run(s: Arc<AppState>, p: Params, prompt: Vec<u32>, kind: Kind) -> Response {
    let ctx = s.engine.model.config.ctx_len;
    let fail = |e: ApiError| {
        s.metrics.bad_requests.inc();
        e.into_response()
    };
    if prompt.is_empty() {
        return fail(ApiError::bad("the prompt is empty", Some("prompt")));
    }
    if prompt.len() >= ctx {
        return fail(ApiError::bad(
            format!(
                "the prompt is {} tokens; this model's context is {ctx} tokens, so it must be at most {}",
                prompt.len(),
                ctx - 1
            ),
            Some("messages"),
        ));
    }
    let room = ctx - prompt.len();
    let pool_tokens = s.pool_pages * s.page_size;
    let max_tokens = match p.max_tokens {
        Some(n) if n > room => {
            return fail(ApiError::bad(
                format!(
                    "max_tokens {n} cannot fit: the prompt is {} tokens and the context {ctx}, so at most {room} tokens can be generated",
                    prompt.len()
                ),
                Some("max_tokens"),
            ));
        }
        Some(n) => n,
        None => match kind {
            Kind::Text => 16.min(room),
            Kind::Chat => room.min(pool_tokens.saturating_sub(prompt.len())).max(1),
        },
    };
    if prompt.len() + max_tokens > pool_tokens {
        return fail(ApiError::bad(
            format!(
                "the prompt ({} tokens) plus max_tokens ({max_tokens}) need more KV than the server's pool holds ({pool_tokens} tokens); lower max_tokens or start the server with more --kv-pages",
                prompt.len()
            ),
            Some("max_tokens"),
        ));
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let prompt_len = prompt.len();
    let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let job = Job {
        prompt,
        max_tokens,
        sampling: p.sampling,
        events: tx,
        arrived: Instant::now(),
        ignore_eos: p.ignore_eos,
        stopped: stopped.clone(),
    };
    match s.submitter.submit(job) {
        Ok(()) => {}
        Err(SubmitError::QueueFull) => {
            let what = format!("{} requests waiting", s.submitter.waiting());
            return overloaded(&s, &what).into_response();
        }
        Err(SubmitError::Stopped) => {
            return ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: "the server is shutting down".into(),
                kind: "server_error",
                param: None,
                code: Some("shutting_down"),
            }
            .into_response();
        }
    }
    let id = s.next_id.fetch_add(1, Ordering::Relaxed);
    let out = Output {
        s: s.clone(),
        kind,
        id: match kind {
            Kind::Chat => format!("chatcmpl-{id}"),
            Kind::Text => format!("cmpl-{id}"),
        },
        created: unix_now(),
        text: Detok::new(p.stop),
        prompt_len,
        cached: 0,
        prefill: None,
        return_token_ids: p.return_token_ids,
        stopped,
    };
    if p.stream {
        stream(out, rx, p.include_usage)
    } else {
        complete(out, rx).await
    }
}

/// Incremental detokenization with stop strings: text is released once it can no longer
/// be the start of a stop string or the first bytes of an unfinished character.
struct Detok {
    ids: Vec<u32>,
    text: String,
    sent: usize,
    /// Decoding window: `ids[prefix..read]` were decoded last time (their text is in
    /// `text`); new tokens are decoded together with them so that a token's text is right in
    /// context (leading spaces, bytes of one character split over tokens).
    prefix: usize,
    read: usize,
    stop: Vec<String>,
    stopped: bool,
}

impl Detok {
    fn new(stop: Vec<String>) -> Self {
        Detok {
            ids: Vec::new(),
            text: String::new(),
            sent: 0,
            prefix: 0,
            read: 0,
            stop,
            stopped: false,
        }
    }

    /// Adds a token; returns the text that became final. When a stop string appears,
    /// `stopped` is set, the text is cut before it, and [`Detok::flush`] releases the rest.
    fn push(&mut self, engine: &Engine, id: u32) -> String {
        self.ids.push(id);
        // Decode a short window instead of the whole output each time (that would be
        // quadratic in the output length).
        let before = engine
            .decode(&self.ids[self.prefix..self.read])
            .unwrap_or_default();
        let now = engine.decode(&self.ids[self.prefix..]).unwrap_or_default();
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') {
            // Concatenative decoders (byte-level BPE) always extend `before`; for others,
            // take what follows its length rather than stall.
            let delta = if now.starts_with(&before) {
                &now[before.len()..]
            } else {
                now.get(before.len()..).unwrap_or_default()
            };
            self.text.push_str(delta);
            self.prefix = self.read;
            self.read = self.ids.len();
        }
        self.step()
    }

    /// Decides what of `text` is final after a new token.
    fn step(&mut self) -> String {
        let search_from = self
            .sent
            .saturating_sub(self.stop.iter().map(String::len).max().unwrap_or(0));
        let search_from = floor_char(&self.text, search_from);
        let hit = self
            .stop
            .iter()
            .filter_map(|s| {
                self.text[search_from..]
                    .find(s.as_str())
                    .map(|i| search_from + i)
            })
            .min();
        if let Some(at) = hit {
            // The text before the stop string is released by `flush`.
            self.stopped = true;
            self.text.truncate(at);
            return String::new();
        }
        let mut end = self.text.len();
        if self.text.ends_with('\u{FFFD}') {
            end -= '\u{FFFD}'.len_utf8();
        }
        // Hold back a tail that could still grow into a stop string.
        for s in &self.stop {
            for k in (1..s.len()).rev() {
                if self.text[..end].ends_with(&s[..floor_char(s, k)]) && k <= end {
                    end = end.min(floor_char(&self.text, end - floor_char(s, k)));
                    break;
                }
            }
        }
        self.release(end)
    }

    fn release(&mut self, end: usize) -> String {
        let end = floor_char(&self.text, end).max(self.sent);
        let out = self
            .text
            .get(self.sent..end)
            .unwrap_or_default()
            .to_string();
        self.sent = end;
        out
    }

    /// The rest, at the end.
    fn flush(&mut self) -> String {
        let end = self.text.len();
        self.release(end)
    }
}

fn floor_char(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// One response being produced.
struct Output {
    s: Arc<AppState>,
    kind: Kind,
    id: String,
    created: u64,
    text: Detok,
    prompt_len: usize,
    cached: usize,
    prefill: Option<Duration>,
    return_token_ids: bool,
    /// Told to the scheduler when a stop string ends the text.
    stopped: Arc<std::sync::atomic::AtomicBool>,
}

/// What the event loop saw last.
enum Step {
    /// New text.
    Text(String),
    /// The end, with its reason.
    End(Finish),
    /// A failure.
    Failed(String),
    /// Nothing to report.
    Nothing,
}

impl Output {
    fn on(&mut self, ev: Event) -> Step {
        match ev {
            Event::Started { cached_tokens } => {
                self.cached = cached_tokens;
                Step::Nothing
            }
            Event::Prefilled {
                prefill_time,
                cached_tokens,
            } => {
                self.prefill = Some(prefill_time);
                self.cached = cached_tokens;
                Step::Nothing
            }
            Event::Token(id) => {
                let t = self.text.push(&self.s.engine, id);
                if self.text.stopped {
                    // Dropping the receiver after this ends the generation; the flag makes
                    // the scheduler count it as finished by a stop.
                    self.stopped.store(true, Ordering::Release);
                    return Step::End(Finish::Stop);
                }
                Step::Text(t)
            }
            Event::Done(why, _) => Step::End(why),
            Event::Failed(e) => Step::Failed(e),
        }
    }

    fn usage(&self) -> Value {
        let n = self.text.ids.len();
        let mut tiers = serde_json::Map::new();
        for (i, t) in TIERS.iter().enumerate() {
            tiers.insert((*t).into(), json!(if i == 0 { self.cached } else { 0 }));
        }
        let prefill_ms = self.prefill.map(|d| d.as_secs_f64() * 1e3);
        json!({
            "prompt_tokens": self.prompt_len,
            "completion_tokens": n,
            "total_tokens": self.prompt_len + n,
            "prompt_tokens_details": {
                "cached_tokens": self.cached,
                "cached_tokens_by_tier": tiers,
                "prefill_time_ms": prefill_ms,
            },
        })
    }

    fn timings(&self) -> Value {
        json!({
            "prompt_n": self.prompt_len.saturating_sub(self.cached),
            "cache_n": self.cached,
            "prompt_ms": self.prefill.map(|d| d.as_secs_f64() * 1e3),
            "predicted_n": self.text.ids.len(),
        })
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Text, _) => "text_completion",
        }
    }

    fn chunk(&self, text: Option<&str>, finish: Option<Finish>, first: bool) -> Value {
        let choice = match self.kind {
            Kind::Chat => {
                let mut delta = serde_json::Map::new();
                if first {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({"index": 0, "delta": delta, "logprobs": null,
                       "finish_reason": finish.map(Finish::as_str)})
            }
            Kind::Text => json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null,
                                 "finish_reason": finish.map(Finish::as_str)}),
        };
        json!({"id": self.id, "object": self.object(true), "created": self.created,
               "model": self.s.model_id, "choices": [choice]})
    }
}

fn failed(e: String) -> ApiError {
    ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message: format!("generation failed: {e}"),
        kind: "server_error",
        param: None,
        code: None,
    }
}

async fn complete(mut out: Output, mut rx: mpsc::UnboundedReceiver<Event>) -> Response {
    let mut text = String::new();
    let finish = loop {
        let Some(ev) = rx.recv().await else {
            return failed("the scheduler dropped the request".into()).into_response();
        };
        match out.on(ev) {
            Step::Text(t) => text.push_str(&t),
            Step::End(f) => break f,
            Step::Failed(e) => return failed(e).into_response(),
            Step::Nothing => {}
        }
    };
    drop(rx);
    text.push_str(&out.text.flush());
    let mut choice = match out.kind {
        Kind::Chat => json!({"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": null, "finish_reason": finish.as_str()}),
        Kind::Text => json!({"index": 0, "text": text, "logprobs": null,
                             "finish_reason": finish.as_str()}),
    };
    if out.return_token_ids {
        choice["token_ids"] = json!(out.text.ids);
    }
    axum::Json(json!({
        "id": out.id, "object": out.object(false), "created": out.created,
        "model": out.s.model_id, "choices": [choice], "usage": out.usage(),
        "timings": out.timings(),
    }))
    .into_response()
}

/// How long an SSE event may wait for a client that does not read before the stream is
/// dropped (and its request cancelled).
const SEND_TIMEOUT: Duration = Duration::from_secs(60);

/// Sends one SSE event; false when the client is gone or has not read for
/// [`SEND_TIMEOUT`].
async fn put(tx: &mpsc::Sender<Result<SseEvent, Infallible>>, ev: SseEvent) -> bool {
    matches!(
        tokio::time::timeout(SEND_TIMEOUT, tx.send(Ok(ev))).await,
        Ok(Ok(()))
    )
}

fn stream(
    mut out: Output,
    mut rx: mpsc::UnboundedReceiver<Event>,
    include_usage: bool,
) -> Response {
    let (tx, body_rx) = mpsc::channel::<Result<SseEvent, Infallible>>(16);
    tokio::spawn(async move {
        let send = |v: Value| SseEvent::default().data(v.to_string());
        let mut first = true;
        let finish = loop {
            let ev = tokio::select! {
                ev = rx.recv() => ev,
                // The client went away: dropping `rx` cancels the request.
                _ = tx.closed() => return,
            };
            let Some(ev) = ev else {
                let _ = tx
                    .send(Ok(send(json!({"error": {"message": "the scheduler dropped the request", "type": "server_error", "param": null, "code": null}}))))
                    .await;
                return;
            };
            match out.on(ev) {
                Step::Text(t) => {
                    if t.is_empty() && !first {
                        continue;
                    }
                    let c = out.chunk(Some(&t), None, first);
                    first = false;
                    if !put(&tx, send(c)).await {
                        return;
                    }
                }
                Step::End(f) => break f,
                Step::Failed(e) => {
                    let _ = tx
                        .send(Ok(send(json!({"error": {"message": format!("generation failed: {e}"), "type": "server_error", "param": null, "code": null}}))))
                        .await;
                    return;
                }
                Step::Nothing => {}
            }
        };
        drop(rx);
        let rest = out.text.flush();
        if !rest.is_empty() {
            let c = out.chunk(Some(&rest), None, first);
            first = false;
            let _ = put(&tx, send(c)).await;
        }
        let mut last = out.chunk(None, Some(finish), first);
        last["timings"] = out.timings();
        let _ = put(&tx, send(last)).await;
        if include_usage {
            let u = json!({"id": out.id, "object": out.object(true), "created": out.created,
                           "model": out.s.model_id, "choices": [], "usage": out.usage()});
            let _ = put(&tx, send(u)).await;
        }
        let _ = put(&tx, SseEvent::default().data("[DONE]")).await;
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(body_rx))
        .keep_alive(KeepAlive::default())
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds text pieces through the release logic without a tokenizer.
    fn run(pieces: &[&str], stop: &[&str]) -> (Vec<String>, String, bool) {
        let mut d = Detok::new(stop.iter().map(|s| s.to_string()).collect());
        let mut out = Vec::new();
        for p in pieces {
            d.text.push_str(p);
            d.ids.push(0);
            out.push(d.step());
            if d.stopped {
                break;
            }
        }
        let rest = d.flush();
        (out, rest, d.stopped)
    }

    #[test]
    fn stop_strings_cut_the_text_and_hold_back_possible_starts() {
        let (out, rest, stopped) = run(&["Hello", " wor", "ld. Bye"], &["world"]);
        assert!(stopped);
        assert_eq!(out.concat() + &rest, "Hello ");
        // "wor" could start "world": it is held back until decided.
        assert_eq!(out[1], " ");
        let (out, rest, stopped) = run(&["Hello", " wor", "ks"], &["world"]);
        assert!(!stopped);
        assert_eq!(out.concat() + &rest, "Hello works");
        // A stop string split over many tokens, and one that is found at the very start.
        let (out, rest, _) = run(&["a", "<", "|", "end", "|>", "b"], &["<|end|>"]);
        assert_eq!(out.concat() + &rest, "a");
        let (out, rest, stopped) = run(&["STOP"], &["STOP"]);
        assert!(stopped && (out.concat() + &rest).is_empty());
        // An unfinished character is not released until it is complete.
        let (out, _, _) = run(&["caf", "\u{FFFD}"], &[]);
        assert_eq!(out, vec!["caf".to_string(), String::new()]);
    }
}
