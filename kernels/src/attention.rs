//! Causal grouped-query attention over a paged KV cache whose pages hold f32 or IEEE half.

use half::f16;
use rayon::prelude::*;

use crate::{KernelError, SharedOut};

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
}

/// An element type KV pages can hold: `f32`, or IEEE half ([`half::f16`], converted to f32
/// as attention reads it: F16C on AVX2 CPUs, `half` on the portable path). Sealed.
pub trait KvElement: Copy + Send + Sync + sealed::Sealed + 'static {
    /// `q · k`, portable.
    #[doc(hidden)]
    fn dot(q: &[f32], k: &[Self]) -> f32;
    /// `acc += s·v`, portable.
    #[doc(hidden)]
    fn axpy(s: f32, v: &[Self], acc: &mut [f32]);
    /// `q · k` in AVX2.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `q.len() == k.len()`.
    #[doc(hidden)]
    #[cfg(target_arch = "x86_64")]
    unsafe fn dot_avx2(q: &[f32], k: &[Self]) -> f32;
    /// `acc += s·v` in AVX2.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `v.len() == acc.len()`.
    #[doc(hidden)]
    #[cfg(target_arch = "x86_64")]
    unsafe fn axpy_avx2(s: f32, v: &[Self], acc: &mut [f32]);
}

impl KvElement for f32 {
    #[inline(always)]
    fn dot(q: &[f32], k: &[f32]) -> f32 {
        q.iter().zip(k).map(|(x, y)| x * y).sum()
    }
    #[inline(always)]
    fn axpy(s: f32, v: &[f32], acc: &mut [f32]) {
        acc.iter_mut().zip(v).for_each(|(o, x)| *o += s * x);
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_avx2(q: &[f32], k: &[f32]) -> f32 {
        // SAFETY: the caller's contract is dot_f32's.
        unsafe { crate::dot::avx2::dot_f32(q, k) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn axpy_avx2(s: f32, v: &[f32], acc: &mut [f32]) {
        // SAFETY: the caller's contract is axpy's.
        unsafe { crate::dot::avx2::axpy(s, v, acc) }
    }
}

impl KvElement for f16 {
    #[inline(always)]
    fn dot(q: &[f32], k: &[f16]) -> f32 {
        q.iter().zip(k).map(|(x, y)| x * y.to_f32()).sum()
    }
    #[inline(always)]
    fn axpy(s: f32, v: &[f16], acc: &mut [f32]) {
        acc.iter_mut()
            .zip(v)
            .for_each(|(o, x)| *o += s * x.to_f32());
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_avx2(q: &[f32], k: &[f16]) -> f32 {
        // SAFETY: the caller's contract is dot_f16's.
        unsafe { crate::dot::avx2::dot_f16(q, k) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn axpy_avx2(s: f32, v: &[f16], acc: &mut [f32]) {
        // SAFETY: the caller's contract is axpy_f16's.
        unsafe { crate::dot::avx2::axpy_f16(s, v, acc) }
    }
}

/// The shape attention works on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (divides `n_heads`; each serves `n_heads / n_kv_heads` query heads).
    pub n_kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Tokens per page.
    pub page_size: usize,
}

impl AttnShape {
    /// Elements of one layer's part of one page: `[k|v][token][kv_head][head_dim]`.
    pub fn layer_page_floats(&self) -> usize {
        2 * self.page_size * self.n_kv_heads * self.head_dim
    }

    fn check(&self) -> Result<(), KernelError> {
        if self.n_heads == 0
            || self.n_kv_heads == 0
            || self.head_dim == 0
            || self.page_size == 0
            || !self.n_heads.is_multiple_of(self.n_kv_heads)
        {
            return Err(KernelError::Shape(format!("bad attention shape {self:?}")));
        }
        Ok(())
    }
}

/// Attention of `n` query tokens at positions `start..start + n` over the cached positions
/// `0..start + n` (the new tokens' K/V must already be written into the pages).
///
/// - `q`: `n × n_heads × head_dim`, RoPE applied;
/// - `pages[p]`: layer slice of page `p` ([`AttnShape::layer_page_floats`] elements, f32 or
///   f16), covering positions `p·page_size..(p+1)·page_size`;
/// - `out`: `n × n_heads × head_dim`.
///
/// Query token `i` sees positions `0..=start + i` (causal). Scores are scaled by
/// `1/√head_dim`. Scores and sums are f32 whatever the pages hold.
pub fn paged_attention<T: KvElement>(
    shape: AttnShape,
    q: &[f32],
    n: usize,
    start: usize,
    pages: &[&[T]],
    out: &mut [f32],
) -> Result<(), KernelError> {
    paged_attention_many(
        shape,
        &mut [AttnItem {
            q,
            n,
            start,
            pages,
            out,
        }],
    )
}

/// One sequence's part of a batched attention call ([`paged_attention_many`]); the fields
/// mean what [`paged_attention`]'s arguments of the same names mean.
pub struct AttnItem<'a, T> {
    /// `n × n_heads × head_dim` queries, RoPE applied.
    pub q: &'a [f32],
    /// Query tokens.
    pub n: usize,
    /// Position of the first query token.
    pub start: usize,
    /// The sequence's layer slice of each page, in position order.
    pub pages: &'a [&'a [T]],
    /// `n × n_heads × head_dim` output.
    pub out: &'a mut [f32],
}

/// [`paged_attention`] for several sequences in one parallel section: the (token, kv head)
/// jobs of every item share one pool dispatch, so a batch of decode steps (one token per
/// sequence) keeps each group of query heads together and reads each K/V row once for it,
/// instead of splitting heads to find work for the threads. Each item's output is exactly
/// what [`paged_attention`] gives it alone.
pub fn paged_attention_many<T: KvElement>(
    shape: AttnShape,
    items: &mut [AttnItem<'_, T>],
) -> Result<(), KernelError> {
    let pairs: usize = items.iter().map(|it| it.n * shape.n_kv_heads).sum();
    // Few (token, kv head) pairs: split groups into single heads so every thread has work;
    // otherwise keep a group together so each K/V row is read once for the group.
    let split = pairs < 4 * rayon::current_num_threads();
    paged_attention_jobs(shape, items, split, crate::simd())
}

/// [`paged_attention_many`] with the job split (`split_groups`: one job per query head
/// instead of one per group) and the instruction set chosen by the caller.
fn paged_attention_jobs<T: KvElement>(
    shape: AttnShape,
    items: &mut [AttnItem<'_, T>],
    split_groups: bool,
    simd: crate::Simd,
) -> Result<(), KernelError> {
    shape.check()?;
    let AttnShape {
        n_heads,
        n_kv_heads,
        head_dim: hd,
        page_size,
    } = shape;
    let row = n_heads * hd;
    for it in items.iter() {
        let (n, ctx) = (it.n, it.start + it.n);
        if it.q.len() != n * row || it.out.len() != n * row {
            return Err(KernelError::Shape(format!(
                "attention: q/out must be {n} × {row}"
            )));
        }
        if it.pages.len() * page_size < ctx
            || it
                .pages
                .iter()
                .any(|p| p.len() != shape.layer_page_floats())
        {
            return Err(KernelError::Shape(format!(
                "attention: {} pages of {page_size} do not cover {ctx} positions (or a page has the wrong size)",
                it.pages.len()
            )));
        }
    }
    let group = n_heads / n_kv_heads;
    let per_job = if split_groups { 1 } else { group };
    let jobs_per_kv = group / per_job;
    let jobs: Vec<Job<'_, T>> = items
        .iter_mut()
        .map(|it| Job {
            q: it.q,
            pages: it.pages,
            start: it.start,
            n_kv_heads,
            hd,
            page_size,
            group,
            scale: 1.0 / (hd as f32).sqrt(),
            out: SharedOut(it.out.as_mut_ptr()),
        })
        .collect();
    // Job list: (item, job index within the item).
    let work: Vec<(usize, usize)> = items
        .iter()
        .enumerate()
        .flat_map(|(k, it)| (0..it.n * n_kv_heads * jobs_per_kv).map(move |j| (k, j)))
        .collect();
    work.into_par_iter().for_each(|(k, j)| {
        let i = j / (n_kv_heads * jobs_per_kv);
        let kvh = j / jobs_per_kv % n_kv_heads;
        let g0 = j % jobs_per_kv * per_job;
        let job = &jobs[k];
        #[cfg(target_arch = "x86_64")]
        if simd == crate::Simd::Avx2 {
            // SAFETY: Simd::Avx2 comes from simd(), which found AVX2, FMA and F16C on
            // this CPU.
            unsafe { job.run_avx2(i, kvh, g0..g0 + per_job) };
            return;
        }
        let _ = simd;
        job.run(i, kvh, g0..g0 + per_job, T::dot, T::axpy);
    });
    Ok(())
}

/// One attention call's inputs, shared by its parallel jobs.
struct Job<'a, T> {
    q: &'a [f32],
    pages: &'a [&'a [T]],
    start: usize,
    n_kv_heads: usize,
    hd: usize,
    page_size: usize,
    group: usize,
    scale: f32,
    out: SharedOut,
}

impl<T: KvElement> Job<'_, T> {
    /// Query token `i`, heads `gs` of kv head `kvh`'s group, with the given dot and axpy.
    #[inline(always)]
    fn run(
        &self,
        i: usize,
        kvh: usize,
        gs: std::ops::Range<usize>,
        dot: impl Fn(&[f32], &[T]) -> f32,
        axpy: impl Fn(f32, &[T], &mut [f32]),
    ) {
        let (hd, ps, nkv) = (self.hd, self.page_size, self.n_kv_heads);
        let row = nkv * self.group * hd;
        let seen = self.start + i + 1;
        let ng = gs.len();
        let v_off = ps * nkv * hd;
        let qh = |g: usize| {
            let h = kvh * self.group + g;
            &self.q[i * row + h * hd..i * row + (h + 1) * hd]
        };
        let mut scores = vec![0f32; ng * seen];
        for (pi, page) in self.pages.iter().enumerate().take(seen.div_ceil(ps)) {
            let t0 = pi * ps;
            for t in t0..seen.min(t0 + ps) {
                let o = ((t - t0) * nkv + kvh) * hd;
                let k = &page[o..o + hd];
                for (gi, g) in gs.clone().enumerate() {
                    scores[gi * seen + t] = dot(qh(g), k) * self.scale;
                }
            }
        }
        for s in scores.chunks_exact_mut(seen) {
            crate::ops::softmax(s);
        }
        let mut acc = vec![0f32; ng * hd];
        for (pi, page) in self.pages.iter().enumerate().take(seen.div_ceil(ps)) {
            let t0 = pi * ps;
            for t in t0..seen.min(t0 + ps) {
                let o = v_off + ((t - t0) * nkv + kvh) * hd;
                let v = &page[o..o + hd];
                for gi in 0..ng {
                    axpy(scores[gi * seen + t], v, &mut acc[gi * hd..(gi + 1) * hd]);
                }
            }
        }
        for (gi, g) in gs.enumerate() {
            let h = kvh * self.group + g;
            for (d, val) in acc[gi * hd..(gi + 1) * hd].iter().enumerate() {
                // SAFETY: job (i, kvh, gs) alone writes heads gs of kv head kvh's group of
                // token i; the index is inside the output, alive for the parallel section.
                unsafe { self.out.write(i * row + h * hd + d, *val) };
            }
        }
    }

    /// [`Job::run`] compiled for AVX2 with the element type's AVX2 dot and axpy inlined.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run_avx2(&self, i: usize, kvh: usize, gs: std::ops::Range<usize>) {
        self.run(
            i,
            kvh,
            gs,
            // SAFETY: the caller guarantees AVX2/FMA/F16C; both rows are head_dim long.
            |a, b| unsafe { T::dot_avx2(a, b) },
            // SAFETY: as above; acc and v rows are head_dim long.
            |s, x, y| unsafe { T::axpy_avx2(s, x, y) },
        );
    }
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)]
mod tests {
    use super::*;
    use crate::testutil::randv;

    /// Dense causal GQA in f64 over contiguous K/V (`ctx × n_kv × hd`).
    #[allow(clippy::too_many_arguments)]
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        n: usize,
        start: usize,
        nh: usize,
        nkv: usize,
        hd: usize,
    ) -> Vec<f64> {
        let mut out = vec![0f64; n * nh * hd];
        for i in 0..n {
            for h in 0..nh {
                let kvh = h / (nh / nkv);
                let seen = start + i + 1;
                let s: Vec<f64> = (0..seen)
                    .map(|t| {
                        (0..hd)
                            .map(|d| {
                                f64::from(q[(i * nh + h) * hd + d])
                                    * f64::from(k[(t * nkv + kvh) * hd + d])
                            })
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let m = s.iter().copied().fold(f64::MIN, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                for t in 0..seen {
                    let p = (s[t] - m).exp() / z;
                    for d in 0..hd {
                        out[(i * nh + h) * hd + d] += p * f64::from(v[(t * nkv + kvh) * hd + d]);
                    }
                }
            }
        }
        out
    }

    /// Scatters K/V into pages of `T` and checks both job splits on both instruction sets
    /// against the f64 reference. `round` is what storing in `T` does to a value, applied to
    /// K/V first so that the reference sees exactly what the pages hold.
    fn check_against_reference<T: KvElement>(from: fn(f32) -> T, round: fn(f32) -> f32) {
        let (nh, nkv, hd, ps) = (6, 2, 20, 8);
        let shape = AttnShape {
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
            page_size: ps,
        };
        for (start, n) in [(0usize, 1usize), (0, 13), (21, 1), (5, 19)] {
            let ctx = start + n;
            let k: Vec<f32> = randv(1 + ctx as u64, ctx * nkv * hd, 1.0)
                .into_iter()
                .map(round)
                .collect();
            let v: Vec<f32> = randv(2 + ctx as u64, ctx * nkv * hd, 1.0)
                .into_iter()
                .map(round)
                .collect();
            let q = randv(3 + ctx as u64, n * nh * hd, 2.0);
            // Scatter K/V into pages (pages hold positions p·ps..(p+1)·ps; the engine's tests
            // cover pages taken from the pool out of order).
            let npages = ctx.div_ceil(ps);
            let junk: Vec<T> = randv(9, shape.layer_page_floats(), 1.0)
                .into_iter()
                .map(from)
                .collect();
            let mut store: Vec<Vec<T>> = vec![junk; npages];
            for t in 0..ctx {
                let p = &mut store[t / ps];
                for kvh in 0..nkv {
                    let src = (t * nkv + kvh) * hd;
                    let dk = (t % ps * nkv + kvh) * hd;
                    let dv = ps * nkv * hd + dk;
                    for d in 0..hd {
                        p[dk + d] = from(k[src + d]);
                        p[dv + d] = from(v[src + d]);
                    }
                }
            }
            let pages: Vec<&[T]> = store.iter().map(|p| p.as_slice()).collect();
            let mut out = vec![0f32; n * nh * hd];
            let want = reference(&q, &k, &v, n, start, nh, nkv, hd);
            // Both job splits (one job per GQA group and one per query head), portable and
            // (where the CPU has it) AVX2.
            for simd in [crate::Simd::Scalar, crate::simd()] {
                for split in [false, true] {
                    out.fill(f32::NAN);
                    let item = AttnItem {
                        q: &q,
                        n,
                        start,
                        pages: &pages,
                        out: &mut out,
                    };
                    paged_attention_jobs(shape, &mut [item], split, simd).unwrap();
                    for (g, w) in out.iter().zip(&want) {
                        assert!(
                            (f64::from(*g) - w).abs() < 1e-4,
                            "start {start} n {n} split {split} {simd:?}: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn paged_attention_matches_dense_causal_gqa() {
        check_against_reference::<f32>(|x| x, |x| x);
    }

    #[test]
    fn paged_attention_over_f16_pages_matches_dense_causal_gqa() {
        check_against_reference::<f16>(f16::from_f32, |x| f16::from_f32(x).to_f32());
    }

    #[test]
    fn too_few_pages_is_an_error() {
        let shape = AttnShape {
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 4,
            page_size: 4,
        };
        let page = vec![0.5f32; shape.layer_page_floats()];
        let mut out = vec![0f32; 2 * 8];
        assert!(paged_attention(shape, &[1.0; 16], 2, 3, &[&page], &mut out).is_err());
        assert!(paged_attention(shape, &[1.0; 16], 2, 2, &[&page], &mut out).is_ok());
    }

    #[test]
    fn a_batch_of_sequences_gives_each_exactly_its_own_result() {
        let shape = AttnShape {
            n_heads: 6,
            n_kv_heads: 2,
            head_dim: 8,
            page_size: 4,
        };
        let (nh, hd) = (shape.n_heads, shape.head_dim);
        let mut x = 7u32;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x % 2001) as f32 / 1000.0 - 1.0
        };
        // Three sequences: a decode step deep in its context, a prefill chunk, a first token.
        let specs = [(1usize, 9usize), (5, 2), (1, 0)];
        let stores: Vec<Vec<Vec<f16>>> = specs
            .iter()
            .map(|(n, start)| {
                (0..(start + n).div_ceil(shape.page_size))
                    .map(|_| {
                        (0..shape.layer_page_floats())
                            .map(|_| f16::from_f32(rnd()))
                            .collect()
                    })
                    .collect()
            })
            .collect();
        let qs: Vec<Vec<f32>> = specs
            .iter()
            .map(|(n, _)| (0..n * nh * hd).map(|_| rnd()).collect())
            .collect();
        let pages: Vec<Vec<&[f16]>> = stores
            .iter()
            .map(|st| st.iter().map(|p| p.as_slice()).collect())
            .collect();
        let alone: Vec<Vec<f32>> = specs
            .iter()
            .enumerate()
            .map(|(k, (n, start))| {
                let mut out = vec![0f32; n * nh * hd];
                paged_attention(shape, &qs[k], *n, *start, &pages[k], &mut out).unwrap();
                out
            })
            .collect();
        let mut outs: Vec<Vec<f32>> = specs
            .iter()
            .map(|(n, _)| vec![f32::NAN; n * nh * hd])
            .collect();
        let mut items: Vec<AttnItem<'_, f16>> = outs
            .iter_mut()
            .enumerate()
            .map(|(k, out)| AttnItem {
                q: &qs[k],
                n: specs[k].0,
                start: specs[k].1,
                pages: &pages[k],
                out,
            })
            .collect();
        paged_attention_many(shape, &mut items).unwrap();
        for (k, (got, want)) in outs.iter().zip(&alone).enumerate() {
            assert!(
                got.iter()
                    .zip(want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "sequence {k} differs from its result alone"
            );
        }
    }
}
