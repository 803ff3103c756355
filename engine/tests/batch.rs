//! The batched forward pass: sequences run together give what each gives alone, a batch the
//! pool cannot hold changes nothing, and decode throughput of 8 sequences against 1.

mod common;

use std::time::Instant;

use common::{engine, ids, reference};
use strata_engine::sampler::argmax;
use strata_engine::{BatchItem, EngineError, KvDtype, KvPool, Logits, Model, Sequence};

/// Smallest page the pool allows: prompts span several pages and end inside one.
const PAGE: usize = 16;

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

fn passage() -> Vec<u32> {
    ids(&reference()["passage"]["tokens"])
}

/// One sequence alone: prefill `prompt`, then `steps` greedy decode steps; every step's
/// logits (prefill's first).
fn alone(m: &Model, dtype: KvDtype, prompt: &[u32], steps: usize) -> Vec<Vec<f32>> {
    let pool = KvPool::new(&m.config, dtype, PAGE, 64).unwrap();
    let mut seq = Sequence::new();
    let mut out = vec![m.forward(&pool, &mut seq, prompt, Logits::Last).unwrap()];
    for _ in 0..steps {
        let t = argmax(out.last().unwrap());
        out.push(m.forward(&pool, &mut seq, &[t], Logits::Last).unwrap());
    }
    out
}

/// Runs one batch of `(sequence, tokens)` wanting the last logits.
fn batch(
    m: &Model,
    pool: &KvPool,
    seqs: &mut [Sequence],
    tokens: &[Vec<u32>],
) -> Result<Vec<Vec<f32>>, EngineError> {
    let mut items: Vec<BatchItem<'_>> = seqs
        .iter_mut()
        .zip(tokens)
        .map(|(seq, t)| BatchItem {
            seq,
            tokens: t,
            logits: Logits::Last,
        })
        .collect();
    m.forward_batch(pool, &mut items)
}

fn prefill_then_decode_in_batches_of_4_matches_alone(dtype: KvDtype) {
    let m = &engine().model;
    let text = passage();
    let lens = [23usize, 50, 71, 100];
    assert!(lens.iter().all(|l| l % PAGE != 0) && text.len() >= 110);
    let prompts: Vec<Vec<u32>> = lens
        .iter()
        .enumerate()
        .map(|(i, l)| text[i..i + l].to_vec())
        .collect();
    let steps = 16;
    let want: Vec<Vec<Vec<f32>>> = prompts.iter().map(|p| alone(m, dtype, p, steps)).collect();

    let pool = KvPool::new(&m.config, dtype, PAGE, 64).unwrap();
    let mut seqs: Vec<Sequence> = (0..4).map(|_| Sequence::new()).collect();
    // got[step][s]: batch logits of sequence s after step `step` (0: the prefill).
    let mut got = vec![batch(m, &pool, &mut seqs, &prompts).unwrap()];
    for _ in 0..steps {
        let next: Vec<Vec<u32>> = got
            .last()
            .unwrap()
            .iter()
            .map(|l| vec![argmax(l)])
            .collect();
        got.push(batch(m, &pool, &mut seqs, &next).unwrap());
    }
    let mut worst = 0f32;
    for (s, alone) in want.iter().enumerate() {
        for (step, (w, g)) in alone.iter().zip(got.iter().map(|b| &b[s])).enumerate() {
            let d = max_diff(g, w);
            worst = worst.max(d);
            assert_eq!(
                argmax(g),
                argmax(w),
                "{dtype}: sequence {s} step {step}: greedy tokens differ (max |Δ| {d})"
            );
        }
    }
    for (s, l) in lens.iter().enumerate() {
        assert_eq!(seqs[s].len(), l + steps);
    }
    println!("{dtype} pages: batch of 4 vs alone, max |Δlogit| = {worst:e}");
    assert!(worst <= 1e-4, "{dtype}: max |Δlogit| {worst} > 1e-4");
}

#[test]
fn prefill_then_decode_in_batches_of_4_matches_alone_f16() {
    prefill_then_decode_in_batches_of_4_matches_alone(KvDtype::F16);
}

#[test]
fn prefill_then_decode_in_batches_of_4_matches_alone_f32() {
    prefill_then_decode_in_batches_of_4_matches_alone(KvDtype::F32);
}

#[test]
fn mixed_prefill_chunk_and_decodes_match_alone() {
    let m = &engine().model;
    let text = passage();
    // Sequence 0 has 20 tokens and prefills a chunk of 37 more; 1..4 decode one token each
    // after prompts of 9, 30 and 45 tokens.
    let prior = [20usize, 9, 30, 45];
    let new: Vec<Vec<u32>> = vec![
        text[20..57].to_vec(),
        vec![text[60]],
        vec![text[61]],
        vec![text[62]],
    ];
    let pool = KvPool::new(&m.config, KvDtype::F16, PAGE, 64).unwrap();
    let mut seqs: Vec<Sequence> = (0..4).map(|_| Sequence::new()).collect();
    let mut want = Vec::new();
    for (s, p) in prior.iter().enumerate() {
        let pool1 = KvPool::new(&m.config, KvDtype::F16, PAGE, 64).unwrap();
        let mut seq1 = Sequence::new();
        m.forward(&pool1, &mut seq1, &text[..*p], Logits::Last)
            .unwrap();
        want.push(m.forward(&pool1, &mut seq1, &new[s], Logits::Last).unwrap());
        m.forward(&pool, &mut seqs[s], &text[..*p], Logits::Last)
            .unwrap();
    }
    let got = batch(m, &pool, &mut seqs, &new).unwrap();
    let mut worst = 0f32;
    for s in 0..4 {
        assert_eq!(argmax(&got[s]), argmax(&want[s]), "sequence {s}");
        worst = worst.max(max_diff(&got[s], &want[s]));
        assert_eq!(seqs[s].len(), prior[s] + new[s].len());
    }
    println!("mixed batch vs alone: max |Δlogit| = {worst:e}");
    assert!(worst <= 1e-4, "max |Δlogit| {worst} > 1e-4");
}

#[test]
fn all_logits_of_a_batch_item_match_alone() {
    let m = &engine().model;
    let text = passage();
    let pool = KvPool::new(&m.config, KvDtype::F32, PAGE, 64).unwrap();
    let (mut a, mut b) = (Sequence::new(), Sequence::new());
    let want = m.forward(&pool, &mut a, &text[..21], Logits::All).unwrap();
    pool.release(&mut a);
    let mut items = [
        BatchItem {
            seq: &mut a,
            tokens: &text[..21],
            logits: Logits::All,
        },
        BatchItem {
            seq: &mut b,
            tokens: &text[30..33],
            logits: Logits::Last,
        },
    ];
    let got = m.forward_batch(&pool, &mut items).unwrap();
    assert_eq!(got[0].len(), 21 * m.config.vocab);
    assert_eq!(got[1].len(), m.config.vocab);
    assert!(max_diff(&got[0], &want) <= 1e-4);
}

#[test]
fn a_batch_the_pool_cannot_hold_changes_nothing() {
    let m = &engine().model;
    let text = passage();
    // 6 pages: three sequences of 17 tokens hold 2 pages each.
    let pool = KvPool::new(&m.config, KvDtype::F16, PAGE, 6).unwrap();
    let mut seqs: Vec<Sequence> = (0..3).map(|_| Sequence::new()).collect();
    for (s, seq) in seqs.iter_mut().enumerate() {
        m.forward(&pool, seq, &text[s..s + 17], Logits::Last)
            .unwrap();
    }
    let before: Vec<(usize, Vec<u32>)> =
        seqs.iter().map(|s| (s.len(), s.pages().to_vec())).collect();
    let used = pool.used_pages();
    // The first two items fit in their pages; the third needs a new page the pool lacks.
    let new = vec![vec![text[40]], vec![text[41]], text[42..58].to_vec()];
    match batch(m, &pool, &mut seqs, &new) {
        Err(EngineError::OutOfPages { pages: 6 }) => {}
        other => panic!("expected OutOfPages, got {:?}", other.map(|l| l.len())),
    }
    let after: Vec<(usize, Vec<u32>)> =
        seqs.iter().map(|s| (s.len(), s.pages().to_vec())).collect();
    assert_eq!(after, before);
    assert_eq!(pool.used_pages(), used);
    // Two sequences needing a page each with one free: refused too, nothing taken.
    pool.release(&mut seqs[2]);
    let mut seqs2: Vec<Sequence> = seqs.drain(..2).collect();
    let mut filler = Sequence::new();
    pool.reserve(&mut filler, 16).unwrap();
    let new2 = vec![text[50..66].to_vec(), text[50..66].to_vec()];
    let before2: Vec<(usize, Vec<u32>)> = seqs2
        .iter()
        .map(|s| (s.len(), s.pages().to_vec()))
        .collect();
    let used2 = pool.used_pages();
    assert!(matches!(
        batch(m, &pool, &mut seqs2, &new2),
        Err(EngineError::OutOfPages { .. })
    ));
    let after2: Vec<(usize, Vec<u32>)> = seqs2
        .iter()
        .map(|s| (s.len(), s.pages().to_vec()))
        .collect();
    assert_eq!(after2, before2);
    assert_eq!(pool.used_pages(), used2);
    // Invalid items are refused before anything runs.
    let bad = vec![vec![text[0]], vec![u32::MAX]];
    assert!(matches!(
        batch(m, &pool, &mut seqs2, &bad),
        Err(EngineError::BadRequest(_))
    ));
    let empty = vec![vec![text[0]], vec![]];
    assert!(matches!(
        batch(m, &pool, &mut seqs2, &empty),
        Err(EngineError::BadRequest(_))
    ));
    assert_eq!(
        seqs2
            .iter()
            .map(|s| (s.len(), s.pages().to_vec()))
            .collect::<Vec<_>>(),
        before2
    );
}

/// Decode throughput, 8 sequences stepping together against 1 alone, on 2 threads. Run with
/// `cargo test --release -p strata-engine --test batch -- --ignored --nocapture`.
#[test]
#[ignore = "timing: run in release"]
fn decode_throughput_8_vs_1() {
    strata_kernels::init_threads(2).unwrap();
    let m = &engine().model;
    let text = passage();
    let steps = 32;
    let run = |b: usize| -> f64 {
        let pool = KvPool::new(&m.config, KvDtype::F16, PAGE, 256).unwrap();
        let mut seqs: Vec<Sequence> = (0..b).map(|_| Sequence::new()).collect();
        let prompts: Vec<Vec<u32>> = (0..b).map(|i| text[i..i + 64].to_vec()).collect();
        let mut logits = batch(m, &pool, &mut seqs, &prompts).unwrap();
        let t0 = Instant::now();
        for _ in 0..steps {
            let next: Vec<Vec<u32>> = logits.iter().map(|l| vec![argmax(l)]).collect();
            logits = batch(m, &pool, &mut seqs, &next).unwrap();
        }
        (b * steps) as f64 / t0.elapsed().as_secs_f64()
    };
    run(1); // warm up
    let one = run(1);
    let eight = run(8);
    println!(
        "decode on {} threads: 1 sequence {one:.1} tok/s, 8 sequences {eight:.1} tok/s, ratio {:.2}",
        strata_kernels::threads(),
        eight / one
    );
}
