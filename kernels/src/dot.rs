//! Row dot products: a weight row in its encoding against activations, portable and AVX2.
//!
//! Quantized rows are multiplied with 16-bit [`QAct`] blocks: per block an integer dot product
//! `Σ q_w·q_a`, scaled by `d_w·d_a`, plus the encoding's offset term through `s_a = d_a·Σq_a`
//! (Q4_1: `m_w·s_a`; Q4_0: `−8·d_w·s_a`). The AVX2 path computes exactly the same sums
//! (integer products are exact), so the two paths differ only in float summation order.

use crate::quant::{DType, QAct, QK, bf16_at, f16_at, f32_at};

/// `R` quantized weight rows against `N` activation rows at once: `out[r][k]`.
pub(crate) type QDotFn<const R: usize, const N: usize> =
    fn([&[u8]; R], [&[QAct]; N]) -> [[f32; N]; R];
/// A float-encoded row against float activations.
pub(crate) type FDotFn = fn(&[u8], &[f32]) -> f32;

/// Encoding of a quantized kernel: 0 = Q8_0, 1 = Q4_0, 2 = Q4_1.
const fn kind(ty: DType) -> usize {
    match ty {
        DType::Q8_0 => 0,
        DType::Q4_0 => 1,
        _ => 2,
    }
}

/// Picks the quantized dot product for `ty` on this CPU.
pub(crate) fn qdot<const R: usize, const N: usize>(ty: DType, simd: crate::Simd) -> QDotFn<R, N> {
    #[cfg(target_arch = "x86_64")]
    if simd == crate::Simd::Avx2 && crate::simd() == crate::Simd::Avx2 {
        return match kind(ty) {
            0 => avx2::qdot::<R, N, 0>,
            1 => avx2::qdot::<R, N, 1>,
            _ => avx2::qdot::<R, N, 2>,
        };
    }
    let _ = simd;
    match kind(ty) {
        0 => scalar_rows::<R, N, 0>,
        1 => scalar_rows::<R, N, 1>,
        _ => scalar_rows::<R, N, 2>,
    }
}

fn scalar_rows<const R: usize, const N: usize, const KIND: usize>(
    w: [&[u8]; R],
    a: [&[QAct]; N],
) -> [[f32; N]; R] {
    w.map(|row| {
        if KIND == 0 {
            scalar_q8_0(row, a)
        } else {
            scalar_q4::<N>(row, a, KIND == 2)
        }
    })
}

/// Picks the float dot product for `ty` on this CPU.
pub(crate) fn fdot(ty: DType, simd: crate::Simd) -> FDotFn {
    #[cfg(target_arch = "x86_64")]
    if simd == crate::Simd::Avx2 && crate::simd() == crate::Simd::Avx2 {
        return match ty {
            DType::F32 => avx2::f32_row,
            DType::F16 => avx2::f16_row,
            _ => avx2::bf16_row,
        };
    }
    let _ = simd;
    match ty {
        DType::F32 => |w, x| scalar_f(w, x, 4, f32_at),
        DType::F16 => |w, x| scalar_f(w, x, 2, f16_at),
        _ => |w, x| scalar_f(w, x, 2, bf16_at),
    }
}

fn scalar_f(w: &[u8], x: &[f32], width: usize, at: fn(&[u8], usize) -> f32) -> f32 {
    assert!(w.len() >= x.len() * width);
    x.iter()
        .enumerate()
        .map(|(i, v)| at(w, width * i) * v)
        .sum()
}

fn scalar_q8_0<const N: usize>(w: &[u8], a: [&[QAct]; N]) -> [f32; N] {
    let nb = a[0].len();
    assert!(w.len() >= nb * 34 && a.iter().all(|r| r.len() == nb));
    let mut out = [0f32; N];
    for b in 0..nb {
        let blk = &w[b * 34..b * 34 + 34];
        let d = f16_at(blk, 0);
        for (o, r) in out.iter_mut().zip(a) {
            let isum: i32 = (0..QK)
                .map(|j| i32::from(blk[2 + j] as i8) * i32::from(r[b].qs[j]))
                .sum();
            *o += d * r[b].d * isum as f32;
        }
    }
    out
}

/// Q4_1 (`min`) or Q4_0.
fn scalar_q4<const N: usize>(w: &[u8], a: [&[QAct]; N], min: bool) -> [f32; N] {
    let (hdr, bb) = if min { (4, 20) } else { (2, 18) };
    let nb = a[0].len();
    assert!(w.len() >= nb * bb && a.iter().all(|r| r.len() == nb));
    let mut out = [0f32; N];
    for b in 0..nb {
        let blk = &w[b * bb..b * bb + bb];
        let d = f16_at(blk, 0);
        let m = if min { f16_at(blk, 2) } else { -8.0 * d };
        for (o, r) in out.iter_mut().zip(a) {
            let mut isum = 0i32;
            for j in 0..16 {
                let q = blk[hdr + j];
                isum += i32::from(q & 0x0F) * i32::from(r[b].qs[j]);
                isum += i32::from(q >> 4) * i32::from(r[b].qs[j + 16]);
            }
            *o += d * r[b].d * isum as f32 + m * r[b].s;
        }
    }
    out
}

/// Plain f32 dot product (AVX2 when available); attention inlines the AVX2 version.
#[cfg(test)]
pub(crate) fn dot_f32(a: &[f32], b: &[f32], simd: crate::Simd) -> f32 {
    assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if simd == crate::Simd::Avx2 {
        // SAFETY: simd() reported AVX2+FMA on this CPU; lengths are equal (asserted).
        return unsafe { avx2::dot_f32(a, b) };
    }
    let _ = simd;
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `y += alpha·x` (AVX2 when available); attention inlines the AVX2 version.
#[cfg(test)]
pub(crate) fn axpy(alpha: f32, x: &[f32], y: &mut [f32], simd: crate::Simd) {
    assert_eq!(x.len(), y.len());
    #[cfg(target_arch = "x86_64")]
    if simd == crate::Simd::Avx2 {
        // SAFETY: simd() reported AVX2+FMA on this CPU; lengths are equal (asserted).
        unsafe { avx2::axpy(alpha, x, y) };
        return;
    }
    let _ = simd;
    y.iter_mut().zip(x).for_each(|(o, v)| *o += alpha * v);
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // blocks index the weight row and every activation row
pub(crate) mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps::<1>(v);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn h2f(bits: u16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
    }

    pub(super) fn qdot<const R: usize, const N: usize, const KIND: usize>(
        w: [&[u8]; R],
        a: [&[QAct]; N],
    ) -> [[f32; N]; R] {
        let bb = [34, 18, 20][KIND];
        let nb = a[0].len();
        assert!(w.iter().all(|r| r.len() >= nb * bb) && a.iter().all(|r| r.len() == nb));
        // SAFETY: handed out by qdot() only after simd() found AVX2, FMA and F16C; the
        // assert keeps every load inside the weight rows and the activation rows.
        unsafe { qdot_impl::<R, N, KIND>(w, a) }
    }

    /// The weight block `b` of a row as 32 i16 (two halves) with its scale and offset
    /// (`m`: Q4_1's minimum, Q4_0's −8·d, 0 for Q8_0).
    ///
    /// # Safety
    /// AVX2/F16C present; the row holds at least `b + 1` blocks.
    #[inline(always)]
    unsafe fn unpack<const KIND: usize>(row: &[u8], b: usize) -> (__m256i, __m256i, f32, f32) {
        let bb = [34, 18, 20][KIND];
        // SAFETY: the caller guarantees block b lies inside the row.
        unsafe {
            let p = row.as_ptr().add(b * bb);
            let d = h2f(u16::from_le_bytes([*p, *p.add(1)]));
            if KIND == 0 {
                let w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(2) as *const __m128i));
                let w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(18) as *const __m128i));
                (w0, w1, d, 0.0)
            } else {
                let hdr = if KIND == 2 { 4 } else { 2 };
                let m = if KIND == 2 {
                    h2f(u16::from_le_bytes([*p.add(2), *p.add(3)]))
                } else {
                    -8.0 * d
                };
                // Widen the 16 bytes to u16 once; elements 0..16 are the low nibbles, 16..32
                // the high ones (the widened lanes' upper byte is zero, so a shift is enough).
                let q = _mm256_cvtepu8_epi16(_mm_loadu_si128(p.add(hdr) as *const __m128i));
                let w0 = _mm256_and_si256(q, _mm256_set1_epi16(0x0F));
                let w1 = _mm256_srli_epi16::<4>(q);
                (w0, w1, d, m)
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn qdot_impl<const R: usize, const N: usize, const KIND: usize>(
        w: [&[u8]; R],
        a: [&[QAct]; N],
    ) -> [[f32; N]; R] {
        let nb = a[0].len();
        let mut acc = [[_mm256_setzero_ps(); N]; R];
        let mut off = [[0f32; N]; R];
        for b in 0..nb {
            // SAFETY: qdot() checked that every row holds nb blocks.
            let wb: [(__m256i, __m256i, f32, f32); R] =
                std::array::from_fn(|r| unsafe { unpack::<KIND>(w[r], b) });
            for k in 0..N {
                let blk = &a[k][b];
                // SAFETY: qs is 32 i16 = two 32-byte loads.
                let (y0, y1) = unsafe {
                    let yp = blk.qs.as_ptr() as *const __m256i;
                    (_mm256_loadu_si256(yp), _mm256_loadu_si256(yp.add(1)))
                };
                for r in 0..R {
                    let (w0, w1, d, m) = wb[r];
                    let p32 =
                        _mm256_add_epi32(_mm256_madd_epi16(w0, y0), _mm256_madd_epi16(w1, y1));
                    acc[r][k] = _mm256_fmadd_ps(
                        _mm256_set1_ps(d * blk.d),
                        _mm256_cvtepi32_ps(p32),
                        acc[r][k],
                    );
                    if KIND != 0 {
                        off[r][k] += m * blk.s;
                    }
                }
            }
        }
        let mut out = [[0f32; N]; R];
        for r in 0..R {
            for k in 0..N {
                out[r][k] = hsum(acc[r][k]) + off[r][k];
            }
        }
        out
    }

    pub(super) fn f32_row(w: &[u8], x: &[f32]) -> f32 {
        assert!(w.len() >= x.len() * 4);
        // SAFETY: handed out by fdot() only with AVX2/FMA present; bounds asserted.
        unsafe { frow_impl::<0>(w, x) }
    }
    pub(super) fn f16_row(w: &[u8], x: &[f32]) -> f32 {
        assert!(w.len() >= x.len() * 2);
        // SAFETY: handed out by fdot() only with AVX2/FMA/F16C present; bounds asserted.
        unsafe { frow_impl::<1>(w, x) }
    }
    pub(super) fn bf16_row(w: &[u8], x: &[f32]) -> f32 {
        assert!(w.len() >= x.len() * 2);
        // SAFETY: handed out by fdot() only with AVX2/FMA present; bounds asserted.
        unsafe { frow_impl::<2>(w, x) }
    }

    /// KIND 0 = f32, 1 = f16, 2 = bf16 weights.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn frow_impl<const KIND: usize>(w: &[u8], x: &[f32]) -> f32 {
        let n = x.len();
        let width = if KIND == 0 { 4 } else { 2 };
        let mut acc0 = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n and w holds n elements of `width` bytes.
            let wv = unsafe {
                let p = w.as_ptr().add(i * width);
                match KIND {
                    0 => _mm256_loadu_ps(p as *const f32),
                    1 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
                    _ => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
                        _mm_loadu_si128(p as *const __m128i),
                    ))),
                }
            };
            // SAFETY: i + 8 <= n = x.len().
            let xv = unsafe { _mm256_loadu_ps(x.as_ptr().add(i)) };
            acc0 = _mm256_fmadd_ps(wv, xv, acc0);
            i += 8;
        }
        let mut s = hsum(acc0);
        while i < n {
            let wv = match KIND {
                0 => f32_at(w, 4 * i),
                1 => f16_at(w, 2 * i),
                _ => bf16_at(w, 2 * i),
            };
            s += wv * x[i];
            i += 1;
        }
        s
    }

    /// # Safety
    /// AVX2/FMA present; `a.len() == b.len()`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n and both slices have n elements (caller's contract).
            acc = unsafe {
                _mm256_fmadd_ps(
                    _mm256_loadu_ps(a.as_ptr().add(i)),
                    _mm256_loadu_ps(b.as_ptr().add(i)),
                    acc,
                )
            };
            i += 8;
        }
        let mut s = hsum(acc);
        while i < n {
            s += a[i] * b[i];
            i += 1;
        }
        s
    }

    /// `a · b` with `b` in IEEE half, converted with F16C.
    ///
    /// # Safety
    /// AVX2/FMA/F16C present; `a.len() == b.len()`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn dot_f16(a: &[f32], b: &[half::f16]) -> f32 {
        let n = a.len();
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n and both slices have n elements (caller's contract); an
            // f16 is 2 bytes, so 8 of them are one unaligned 128-bit load.
            acc = unsafe {
                _mm256_fmadd_ps(
                    _mm256_loadu_ps(a.as_ptr().add(i)),
                    _mm256_cvtph_ps(_mm_loadu_si128(b.as_ptr().add(i) as *const __m128i)),
                    acc,
                )
            };
            i += 8;
        }
        let mut s = hsum(acc);
        while i < n {
            s += a[i] * h2f(b[i].to_bits());
            i += 1;
        }
        s
    }

    /// `y += alpha·x` with `x` in IEEE half, converted with F16C.
    ///
    /// # Safety
    /// AVX2/FMA/F16C present; `x.len() == y.len()`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn axpy_f16(alpha: f32, x: &[half::f16], y: &mut [f32]) {
        let n = x.len();
        let av = _mm256_set1_ps(alpha);
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n and both slices have n elements (caller's contract).
            unsafe {
                let yp = y.as_mut_ptr().add(i);
                let xv = _mm256_cvtph_ps(_mm_loadu_si128(x.as_ptr().add(i) as *const __m128i));
                _mm256_storeu_ps(yp, _mm256_fmadd_ps(av, xv, _mm256_loadu_ps(yp)));
            }
            i += 8;
        }
        while i < n {
            y[i] += alpha * h2f(x[i].to_bits());
            i += 1;
        }
    }

    /// # Safety
    /// AVX2/FMA present; `x.len() == y.len()`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len();
        let av = _mm256_set1_ps(alpha);
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n and both slices have n elements (caller's contract).
            unsafe {
                let yp = y.as_mut_ptr().add(i);
                _mm256_storeu_ps(
                    yp,
                    _mm256_fmadd_ps(av, _mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(yp)),
                );
            }
            i += 8;
        }
        while i < n {
            y[i] += alpha * x[i];
            i += 1;
        }
    }
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)]
mod tests {
    use super::*;
    use crate::Simd;
    use crate::quant::{dequantize_row, quantize_act, quantize_row};
    use crate::testutil::randv;

    /// f64 dot of the dequantized weights with the dequantized activations: what both paths
    /// must compute, up to float summation order.
    fn reference(ty: DType, w: &[u8], a: &[QAct], cols: usize) -> f64 {
        let mut wf = vec![0f32; cols];
        dequantize_row(ty, w, &mut wf);
        let mut s = 0f64;
        for (b, blk) in a.iter().enumerate() {
            for j in 0..QK {
                s += f64::from(wf[b * QK + j]) * f64::from(blk.d) * f64::from(blk.qs[j]);
            }
        }
        s
    }

    #[test]
    fn quantized_dots_match_the_scalar_reference_on_both_paths() {
        if crate::simd() == Simd::Scalar {
            eprintln!(
                "note: no AVX2 on this CPU (or STRATA_KERNELS=scalar): only the portable path is checked"
            );
        }
        let cols = 32 * 12;
        for ty in [DType::Q8_0, DType::Q4_0, DType::Q4_1] {
            for seed in 0..6u64 {
                let w = quantize_row(ty, &randv(seed, cols, 1.0)).unwrap();
                let acts: Vec<Vec<QAct>> = (0..4)
                    .map(|k| {
                        let mut q = vec![QAct::default(); cols / QK];
                        quantize_act(&randv(100 + seed * 7 + k, cols, 2.0), &mut q);
                        q
                    })
                    .collect();
                let w2 = quantize_row(ty, &randv(seed + 50, cols, 1.0)).unwrap();
                for simd in [Simd::Scalar, crate::simd()] {
                    let one = qdot::<1, 1>(ty, simd);
                    let tile = qdot::<2, 4>(ty, simd);
                    let t = tile([&w, &w2], [&acts[0], &acts[1], &acts[2], &acts[3]]);
                    for k in 0..4 {
                        let want = reference(ty, &w, &acts[k], cols);
                        let want2 = reference(ty, &w2, &acts[k], cols);
                        let got1 = one([&w], [&acts[k]])[0][0];
                        let got4 = [t[0][k], t[1][k]];
                        let tol = 1e-4 * (1.0 + want.abs());
                        assert!(
                            (f64::from(got1) - want).abs() < tol,
                            "{ty:?} {simd:?}: {got1} vs {want}"
                        );
                        for (got, want) in got4.into_iter().zip([want, want2]) {
                            let tol = 1e-4 * (1.0 + want.abs());
                            assert!(
                                (f64::from(got) - want).abs() < tol,
                                "{ty:?} {simd:?} 2x4 tile: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn float_dots_match_the_scalar_reference_on_both_paths() {
        for cols in [8usize, 61, 576] {
            let x = randv(5, cols, 1.5);
            for ty in [DType::F32, DType::F16, DType::Bf16] {
                let w = quantize_row(ty, &randv(9, cols, 1.0)).unwrap();
                let mut wf = vec![0f32; cols];
                dequantize_row(ty, &w, &mut wf);
                let want: f64 = wf
                    .iter()
                    .zip(&x)
                    .map(|(a, b)| f64::from(*a) * f64::from(*b))
                    .sum();
                for simd in [Simd::Scalar, crate::simd()] {
                    let got = fdot(ty, simd)(&w, &x);
                    assert!(
                        (f64::from(got) - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "{ty:?} {simd:?} {cols}"
                    );
                }
            }
            let y = randv(6, cols, 1.0);
            let want: f32 = x.iter().zip(&y).map(|(a, b)| a * b).sum();
            let mut z = y.clone();
            axpy(0.5, &x, &mut z, crate::simd());
            for i in 0..cols {
                assert!((z[i] - (y[i] + 0.5 * x[i])).abs() < 1e-6);
            }
            assert!((dot_f32(&x, &y, crate::simd()) - want).abs() < 1e-3);
        }
    }
}
