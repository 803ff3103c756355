//! The workloads: what each request says, with lengths in tokens of the model's tokenizer.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};

use super::client::{Msg, Request};
use crate::stats::Rng;

/// Text of an exact number of tokens: words drawn from the tokenizer's own vocabulary
/// (`" word"` entries that encode as exactly one token, so `n` words are `n` tokens).
pub struct Words {
    words: Vec<String>,
}

impl Words {
    /// Builds the word list from a tokenizer (`.gguf` or `tokenizer.json`).
    pub fn from_tokenizer(path: &Path) -> anyhow::Result<Self> {
        let tok = if path.extension().is_some_and(|e| e == "gguf") {
            strata_engine::tokenizer::from_gguf(&strata_engine::gguf::GgufFile::open(path)?)?
        } else {
            strata_engine::tokenizer::from_file(path)?
        };
        let mut seen = HashSet::new();
        let mut words = Vec::new();
        for (piece, _) in tok.get_vocab(false) {
            // Byte-level BPE writes a leading space as 'Ġ', SentencePiece as '▁'.
            let Some(w) = piece.strip_prefix('Ġ').or_else(|| piece.strip_prefix('▁')) else {
                continue;
            };
            if (3..=10).contains(&w.len())
                && w.bytes().all(|b| b.is_ascii_lowercase())
                && seen.insert(w.to_owned())
            {
                let text = format!(" {w}");
                if tok
                    .encode(text.as_str(), false)
                    .map(|e| e.get_ids().len() == 1)
                    .unwrap_or(false)
                {
                    words.push(text);
                }
            }
        }
        words.sort();
        if words.len() < 256 {
            bail!(
                "the tokenizer at {} has only {} usable words",
                path.display(),
                words.len()
            );
        }
        Ok(Words { words })
    }

    /// `n` tokens of text (the first `k` of them are the same for any `n ≥ k` from the same
    /// generator state).
    pub fn text(&self, rng: &mut Rng, n: usize) -> String {
        (0..n)
            .map(|_| self.words[rng.below(self.words.len() as u64) as usize].as_str())
            .collect()
    }
}

/// How long-document QA orders its queries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RepeatMode {
    /// Every (document, question) pair in a seeded random order.
    Random,
    /// All documents with question 0, then all with question 1, ...
    Tile,
    /// Each document's questions back to back.
    Interleave,
}

/// Multi-turn chat with a growing context.
#[derive(Args, Clone, Debug)]
pub struct MultiTurn {
    /// Conversations.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Rounds per conversation.
    #[arg(long, default_value_t = 4)]
    pub rounds: usize,
    /// Tokens of the first user message.
    #[arg(long, default_value_t = 512)]
    pub first_len: usize,
    /// Tokens of each later user message.
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 32)]
    pub output_len: usize,
    /// Every conversation finishes round r before any starts round r + 1.
    #[arg(long)]
    pub barrier: bool,
    /// Tokens of a system prompt shared by every conversation (the same text, the first
    /// message of every request); 0 = none.
    #[arg(long, default_value_t = 0)]
    pub system_len: usize,
}

/// One multi-turn conversation: the history so far and the next request.
pub struct Conversation {
    rng: Rng,
    history: Vec<Msg>,
    /// Prompt tokens of the next request as the workload counts them.
    tokens: usize,
    new_tokens: usize,
    output_len: usize,
}

impl Conversation {
    /// Conversation `client` of `m` under `seed`: the shared system prompt (if any), then
    /// the first user message.
    pub fn new(words: &Words, m: &MultiTurn, seed: u64, client: usize) -> Self {
        let mut rng = Rng((seed ^ 0x5EED)
            .wrapping_add(1)
            .wrapping_add((client as u64).wrapping_mul(7919))
            | 1);
        let mut history = Vec::new();
        if m.system_len > 0 {
            // Its own generator, seeded without the client: every conversation gets the same
            // text, and the per-client texts stay what they are without a system prompt.
            let mut sys = Rng((seed ^ 0x5957_E3F0).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            history.push(Msg {
                role: "system",
                content: words.text(&mut sys, m.system_len),
            });
        }
        history.push(Msg {
            role: "user",
            content: words.text(&mut rng, m.first_len),
        });
        Conversation {
            rng,
            history,
            tokens: m.system_len + m.first_len,
            new_tokens: m.new_tokens,
            output_len: m.output_len,
        }
    }

    /// The next request: the whole history.
    pub fn request(&self) -> Request {
        Request {
            messages: self.history.clone(),
            input_tokens: self.tokens,
            output_tokens: self.output_len,
        }
    }

    /// Appends the server's reply (`output_tokens` long) and the next user message.
    pub fn reply(&mut self, words: &Words, text: String, output_tokens: usize) {
        self.history.push(Msg {
            role: "assistant",
            content: text,
        });
        self.history.push(Msg {
            role: "user",
            content: words.text(&mut self.rng, self.new_tokens),
        });
        self.tokens += output_tokens + self.new_tokens;
    }
}

/// Long-document question answering.
#[derive(Args, Clone, Debug)]
pub struct LongDocQa {
    /// Documents.
    #[arg(long, default_value_t = 4)]
    pub documents: usize,
    /// Questions per document.
    #[arg(long, default_value_t = 3)]
    pub questions: usize,
    /// Tokens per document.
    #[arg(long, default_value_t = 2048)]
    pub doc_len: usize,
    /// Tokens per question.
    #[arg(long, default_value_t = 32)]
    pub question_len: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 16)]
    pub output_len: usize,
    /// Order of the query pass.
    #[arg(long, value_enum, default_value_t = RepeatMode::Tile)]
    pub repeat_mode: RepeatMode,
    /// Skip the warm-up pass (each document once before the queries).
    #[arg(long)]
    pub no_warmup: bool,
}

/// Groups of prompts sharing a system prompt.
#[derive(Args, Clone, Debug)]
pub struct SharedPrefix {
    /// Groups (distinct system prompts).
    #[arg(long, default_value_t = 4)]
    pub groups: usize,
    /// Prompts per group.
    #[arg(long, default_value_t = 8)]
    pub prompts_per_group: usize,
    /// Tokens of each system prompt.
    #[arg(long, default_value_t = 1024)]
    pub system_len: usize,
    /// Tokens of each question.
    #[arg(long, default_value_t = 64)]
    pub question_len: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 32)]
    pub output_len: usize,
}

/// Replay of a Mooncake-style trace.
#[derive(Args, Clone, Debug)]
pub struct Trace {
    /// JSONL file: one request per line with `timestamp` (ms), `input_length`,
    /// `output_length`, `hash_ids` (equal ids = equal blocks).
    #[arg(long)]
    pub trace: std::path::PathBuf,
    /// Tokens per hash block (Mooncake's traces use 512).
    #[arg(long, default_value_t = 512)]
    pub block_tokens: usize,
    /// Multiply timestamps by this (0.5 = twice as fast).
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// Replay only the first N requests.
    #[arg(long)]
    pub limit: Option<usize>,
}

/// Which workload.
#[derive(Subcommand, Clone, Debug)]
pub enum Workload {
    /// Multi-turn chat: clients × rounds, the context grows every round.
    MultiTurn(MultiTurn),
    /// Long-document QA: documents × questions after a warm-up pass.
    LongDocQa(LongDocQa),
    /// Generated shared prefix: groups of prompts with a common system prompt.
    SharedPrefix(SharedPrefix),
    /// Replay a Mooncake-style JSONL trace (arrival times, lengths, shared blocks).
    Trace(Trace),
}

impl Workload {
    /// Short name.
    pub fn name(&self) -> &'static str {
        match self {
            Workload::MultiTurn(_) => "multi-turn",
            Workload::LongDocQa(_) => "long-doc-qa",
            Workload::SharedPrefix(_) => "shared-prefix",
            Workload::Trace(_) => "trace",
        }
    }
}

/// One line of a Mooncake trace.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct TraceLine {
    /// Arrival, ms after the trace's start.
    pub timestamp: f64,
    /// Prompt tokens.
    pub input_length: usize,
    /// Generated tokens.
    pub output_length: usize,
    /// Block ids of the prompt.
    pub hash_ids: Vec<u64>,
}

/// Reads and checks a trace.
pub fn read_trace(t: &Trace) -> anyhow::Result<Vec<TraceLine>> {
    let text = std::fs::read_to_string(&t.trace)
        .with_context(|| format!("reading {}", t.trace.display()))?;
    let mut out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let l: TraceLine = serde_json::from_str(line)
            .with_context(|| format!("{} line {}", t.trace.display(), i + 1))?;
        if l.input_length > 1 << 20 {
            bail!(
                "{} line {}: input_length {} is over the supported 1,048,576 tokens",
                t.trace.display(),
                i + 1,
                l.input_length
            );
        }
        if l.hash_ids.len().saturating_mul(t.block_tokens) < l.input_length {
            bail!(
                "{} line {}: {} hash blocks of {} tokens cannot hold {} input tokens",
                t.trace.display(),
                i + 1,
                l.hash_ids.len(),
                t.block_tokens,
                l.input_length
            );
        }
        out.push(l);
        if t.limit.is_some_and(|n| out.len() >= n) {
            break;
        }
    }
    if out.is_empty() {
        bail!("{} holds no requests", t.trace.display());
    }
    Ok(out)
}

/// The prompt of a trace request: each hash id's block is the same text wherever it
/// appears (seeded by the id), truncated to `input_length` tokens.
pub fn trace_prompt(words: &Words, l: &TraceLine, block_tokens: usize, seed: u64) -> String {
    let mut s = String::new();
    let mut left = l.input_length;
    for id in &l.hash_ids {
        if left == 0 {
            break;
        }
        let n = left.min(block_tokens);
        let mut rng = Rng(id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed | 1);
        // Words are drawn one by one from a generator seeded by the id: the first n words
        // of a block are the same whether or not the block is cut.
        s.push_str(&words.text(&mut rng, n));
        left -= n;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words() -> Words {
        Words {
            words: (0..300).map(|i| format!(" w{i}")).collect(),
        }
    }

    #[test]
    fn texts_have_the_asked_length() {
        let w = words();
        let t = w.text(&mut Rng(5), 37);
        assert_eq!(t.split(' ').skip(1).count(), 37);
    }

    fn multi_turn(system_len: usize) -> MultiTurn {
        MultiTurn {
            clients: 3,
            rounds: 3,
            first_len: 5,
            new_tokens: 4,
            output_len: 2,
            barrier: false,
            system_len,
        }
    }

    /// Plays `rounds` rounds of every conversation with fixed replies; every request sent.
    fn play(w: &Words, m: &MultiTurn, seed: u64) -> Vec<Vec<Request>> {
        (0..m.clients)
            .map(|c| {
                let mut conv = Conversation::new(w, m, seed, c);
                (0..m.rounds)
                    .map(|r| {
                        let req = conv.request();
                        conv.reply(w, format!(" reply{c}x{r}"), 2);
                        req
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn the_system_prompt_opens_every_request_of_every_conversation() {
        let w = words();
        let m = multi_turn(16);
        let convs = play(&w, &m, 7);
        let system = &convs[0][0].messages[0];
        assert_eq!(system.role, "system");
        assert_eq!(system.content.split(' ').skip(1).count(), 16);
        for (c, reqs) in convs.iter().enumerate() {
            for (r, req) in reqs.iter().enumerate() {
                assert_eq!(req.messages[0].role, "system", "conversation {c} round {r}");
                assert_eq!(req.messages[0].content, system.content);
                assert_eq!(
                    req.messages.iter().filter(|m| m.role == "system").count(),
                    1
                );
                // System, then user/assistant pairs, ending with the new user message.
                assert_eq!(req.messages.len(), 2 + 2 * r);
                assert_eq!(req.input_tokens, 16 + 5 + r * (2 + 4));
            }
        }
        assert_ne!(
            convs[0][0].messages[1].content, convs[1][0].messages[1].content,
            "conversations differ after the system prompt"
        );
        let other = play(&w, &m, 8);
        assert_ne!(other[0][0].messages[0].content, system.content, "seeded");
    }

    #[test]
    fn without_a_system_prompt_conversations_are_unchanged() {
        let w = words();
        let (with, without) = (play(&w, &multi_turn(16), 7), play(&w, &multi_turn(0), 7));
        for (a, b) in with.iter().zip(&without) {
            let last = (a.last().expect("rounds"), b.last().expect("rounds"));
            assert_eq!(last.1.messages[0].role, "user");
            assert_eq!(last.0.messages.len(), last.1.messages.len() + 1);
            let texts = |req: &Request, skip: usize| {
                req.messages[skip..]
                    .iter()
                    .map(|m| m.content.clone())
                    .collect::<Vec<_>>()
            };
            assert_eq!(texts(last.0, 1), texts(last.1, 0));
            assert_eq!(last.0.input_tokens, last.1.input_tokens + 16);
        }
    }

    #[test]
    fn trace_prompts_share_exactly_their_common_blocks() {
        let w = words();
        let line = |ids: Vec<u64>, len: usize| TraceLine {
            timestamp: 0.0,
            input_length: len,
            output_length: 1,
            hash_ids: ids,
        };
        let a = trace_prompt(&w, &line(vec![1, 2, 3], 30), 10, 0);
        let b = trace_prompt(&w, &line(vec![1, 2, 9], 30), 10, 0);
        let c = trace_prompt(&w, &line(vec![1, 2], 15), 10, 0);
        let toks = |s: &str| s.split(' ').skip(1).map(str::to_owned).collect::<Vec<_>>();
        let (ta, tb, tc) = (toks(&a), toks(&b), toks(&c));
        assert_eq!(ta.len(), 30);
        assert_eq!(tc.len(), 15, "the last block is cut to input_length");
        assert_eq!(ta[..20], tb[..20], "equal hash ids give equal blocks");
        assert_ne!(
            ta[20..],
            tb[20..],
            "different hash ids give different blocks"
        );
        assert_eq!(
            ta[..15],
            tc[..],
            "a truncated block is a prefix of the full one"
        );
        // The same id at another position is the same text.
        let d = trace_prompt(&w, &line(vec![3], 10), 10, 0);
        assert_eq!(toks(&d), ta[20..]);
    }
}
