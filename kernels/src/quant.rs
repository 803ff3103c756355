//! Weight encodings and the 8-bit activation blocks quantized products use.

use crate::KernelError;

/// Elements per quantized block (all supported block formats use 32).
pub const QK: usize = 32;

/// A weight encoding, as GGUF and safetensors store it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
    /// Blocks of 32: f16 scale `d`, 32 × i8; value = d·q.
    Q8_0,
    /// Blocks of 32: f16 scale `d`, 16 bytes of nibbles; value = d·(q − 8).
    Q4_0,
    /// Blocks of 32: f16 scale `d`, f16 minimum `m`, 16 bytes of nibbles; value = d·q + m.
    Q4_1,
}

impl DType {
    /// Elements per block.
    pub fn block_elems(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::Bf16 => 1,
            DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => QK,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::Bf16 => 2,
            DType::Q8_0 => 34,
            DType::Q4_0 => 18,
            DType::Q4_1 => 20,
        }
    }

    /// Whether products with this encoding quantize the activations.
    pub fn is_quantized(self) -> bool {
        self.block_elems() > 1
    }

    /// Bytes of a row of `cols` elements; fails when `cols` is not a whole number of blocks.
    pub fn row_bytes(self, cols: usize) -> Result<usize, KernelError> {
        if cols == 0 || !cols.is_multiple_of(self.block_elems()) {
            return Err(KernelError::Shape(format!(
                "a row of {cols} elements is not a whole number of {self:?} blocks of {}",
                self.block_elems()
            )));
        }
        Ok(cols / self.block_elems() * self.block_bytes())
    }
}

/// Largest magnitude of a quantized activation.
pub const QACT_MAX: f32 = 32767.0;

/// One block of 32 activations quantized to 16-bit integers: `x ≈ d·qs`, with `s = d·Σqs`
/// kept for the encodings that carry an offset (Q4_1's minimum, Q4_0's −8).
///
/// llama.cpp quantizes activations to 8 bits; on SmolLM2 that moved logits by up to 0.75
/// and changed the top token at 3% of the positions of a test passage (a hidden state's
/// outlier sets the scale of its whole block). 16-bit activations keep the products exact
/// integer dot products (`vpmaddwd`) with an error of ~1e−4 in the logits.
#[repr(C, align(32))]
#[derive(Clone, Copy, Debug, Default)]
pub struct QAct {
    /// Quantized values in −32767..=32767.
    pub qs: [i16; QK],
    /// Scale.
    pub d: f32,
    /// `d` times the sum of `qs`.
    pub s: f32,
}

/// Quantizes `x` (a whole number of blocks) into `out` (AVX2 when available).
pub fn quantize_act(x: &[f32], out: &mut [QAct]) {
    assert_eq!(x.len(), out.len() * QK, "quantize_act: length mismatch");
    #[cfg(target_arch = "x86_64")]
    if crate::simd() == crate::Simd::Avx2 {
        // SAFETY: AVX2 is present; the lengths match (asserted).
        unsafe { quantize_act_avx2(x, out) };
        return;
    }
    quantize_act_scalar(x, out);
}

fn quantize_act_scalar(x: &[f32], out: &mut [QAct]) {
    for (blk, o) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / QACT_MAX;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in o.qs.iter_mut().zip(blk) {
            // Round half to even, as the AVX2 path's cvtps2dq does.
            let r = (v * id).round_ties_even() as i32;
            *q = r.clamp(-32767, 32767) as i16;
            sum += i32::from(*q);
        }
        o.d = d;
        o.s = d * sum as f32;
    }
}

/// # Safety
/// AVX2 present; `x.len() == out.len() * QK`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_act_avx2(x: &[f32], out: &mut [QAct]) {
    use std::arch::x86_64::*;
    let sign = _mm256_set1_ps(-0.0);
    for (b, o) in out.iter_mut().enumerate() {
        // SAFETY: block b's 32 floats are inside x (x.len() == out.len() * 32).
        let v: [__m256; 4] = unsafe {
            let p = x.as_ptr().add(b * QK);
            [
                _mm256_loadu_ps(p),
                _mm256_loadu_ps(p.add(8)),
                _mm256_loadu_ps(p.add(16)),
                _mm256_loadu_ps(p.add(24)),
            ]
        };
        let mut m = _mm256_andnot_ps(sign, v[0]);
        for vi in &v[1..] {
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *vi));
        }
        let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)));
        let d = amax / QACT_MAX;
        let id = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
        // |v·id| <= 32767: the conversions cannot saturate.
        let i: [__m256i; 4] = [0, 1, 2, 3].map(|k| _mm256_cvtps_epi32(_mm256_mul_ps(v[k], id)));
        let sum = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
        let s4 = _mm_add_epi32(
            _mm256_castsi256_si128(sum),
            _mm256_extracti128_si256::<1>(sum),
        );
        let s2 = _mm_add_epi32(s4, _mm_shuffle_epi32::<0b01_00_11_10>(s4));
        let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32::<0b10_11_00_01>(s2));
        // packs works per 128-bit lane: fix the order with a 64-bit permute.
        let p01 = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(i[0], i[1]));
        let p23 = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(i[2], i[3]));
        // SAFETY: qs is 32 i16 = two 32-byte stores.
        unsafe {
            let qp = o.qs.as_mut_ptr() as *mut __m256i;
            _mm256_storeu_si256(qp, p01);
            _mm256_storeu_si256(qp.add(1), p23);
        }
        o.d = d;
        o.s = d * _mm_cvtsi128_si32(s1) as f32;
    }
}

#[inline]
pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

#[inline]
pub(crate) fn bf16_at(b: &[u8], i: usize) -> f32 {
    f32::from_bits(u32::from(u16::from_le_bytes([b[i], b[i + 1]])) << 16)
}

#[inline]
pub(crate) fn f32_at(b: &[u8], i: usize) -> f32 {
    f32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// Decodes a row stored as `ty` into `out` (`src` holds exactly `out.len()` elements).
pub fn dequantize_row(ty: DType, src: &[u8], out: &mut [f32]) {
    let n = out.len();
    assert_eq!(
        src.len(),
        n / ty.block_elems() * ty.block_bytes(),
        "dequantize_row: length"
    );
    match ty {
        DType::F32 => out
            .iter_mut()
            .enumerate()
            .for_each(|(i, o)| *o = f32_at(src, 4 * i)),
        DType::F16 => out
            .iter_mut()
            .enumerate()
            .for_each(|(i, o)| *o = f16_at(src, 2 * i)),
        DType::Bf16 => out
            .iter_mut()
            .enumerate()
            .for_each(|(i, o)| *o = bf16_at(src, 2 * i)),
        DType::Q8_0 => {
            for (blk, o) in src.chunks_exact(34).zip(out.chunks_exact_mut(QK)) {
                let d = f16_at(blk, 0);
                for (j, v) in o.iter_mut().enumerate() {
                    *v = d * f32::from(blk[2 + j] as i8);
                }
            }
        }
        DType::Q4_0 | DType::Q4_1 => {
            let (hdr, bb) = if ty == DType::Q4_0 { (2, 18) } else { (4, 20) };
            for (blk, o) in src.chunks_exact(bb).zip(out.chunks_exact_mut(QK)) {
                let d = f16_at(blk, 0);
                let m = if ty == DType::Q4_0 {
                    -8.0 * d
                } else {
                    f16_at(blk, 2)
                };
                for j in 0..16 {
                    let q = blk[hdr + j];
                    o[j] = d * f32::from(q & 0x0F) + m;
                    o[j + 16] = d * f32::from(q >> 4) + m;
                }
            }
        }
    }
}

/// Encodes `x` as `ty`, as llama.cpp's reference quantizers do (used by tests and tools).
pub fn quantize_row(ty: DType, x: &[f32]) -> Result<Vec<u8>, KernelError> {
    let mut out = Vec::with_capacity(ty.row_bytes(x.len())?);
    let f16b = |v: f32| half::f16::from_f32(v).to_bits().to_le_bytes();
    match ty {
        DType::F32 => x
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::F16 => x.iter().for_each(|v| out.extend_from_slice(&f16b(*v))),
        DType::Bf16 => x
            .iter()
            .for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_bits().to_le_bytes())),
        DType::Q8_0 => {
            for blk in x.chunks_exact(QK) {
                let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16b(d));
                out.extend(
                    blk.iter()
                        .map(|v| ((v * id).round() as i32).clamp(-127, 127) as i8 as u8),
                );
            }
        }
        DType::Q4_0 => {
            for blk in x.chunks_exact(QK) {
                // Scale from the signed value of largest magnitude, as ggml does.
                let max = blk
                    .iter()
                    .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16b(d));
                let q = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
                for j in 0..16 {
                    out.push(q(blk[j]) | (q(blk[j + 16]) << 4));
                }
            }
        }
        DType::Q4_1 => {
            for blk in x.chunks_exact(QK) {
                let min = blk.iter().copied().fold(f32::INFINITY, f32::min);
                let max = blk.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16b(d));
                out.extend_from_slice(&f16b(min));
                let q = |v: f32| (((v - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                for j in 0..16 {
                    out.push(q(blk[j]) | (q(blk[j + 16]) << 4));
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)]
mod tests {
    use super::*;
    use crate::testutil::randv;

    #[test]
    fn every_encoding_round_trips_within_its_precision() {
        let x = randv(7, 32 * 8, 3.0);
        for (ty, tol) in [
            (DType::F32, 0.0),
            (DType::F16, 2e-3),
            (DType::Bf16, 2e-2),
            (DType::Q8_0, 3.0 / 127.0),
            (DType::Q4_0, 3.0 / 7.0),
            (DType::Q4_1, 6.0 / 15.0),
        ] {
            let enc = quantize_row(ty, &x).unwrap();
            assert_eq!(enc.len(), ty.row_bytes(x.len()).unwrap());
            let mut back = vec![0f32; x.len()];
            dequantize_row(ty, &enc, &mut back);
            let err = x
                .iter()
                .zip(&back)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(err <= tol + 1e-6, "{ty:?}: max error {err} over {tol}");
        }
    }

    #[test]
    fn simd_and_scalar_activation_quantization_agree() {
        let x = randv(13, 32 * 16, 7.0);
        let mut a = vec![QAct::default(); 16];
        let mut b = vec![QAct::default(); 16];
        quantize_act(&x, &mut a);
        quantize_act_scalar(&x, &mut b);
        for (p, q) in a.iter().zip(&b) {
            assert_eq!(p.qs, q.qs);
            assert_eq!(p.d, q.d);
            assert!((p.s - q.s).abs() <= 1e-6 * p.s.abs().max(1.0));
        }
    }

    #[test]
    fn activations_reconstruct_the_input() {
        let x = randv(3, 32 * 4, 5.0);
        let mut q = vec![QAct::default(); 4];
        quantize_act(&x, &mut q);
        for (b, blk) in q.iter().enumerate() {
            let sum: i32 = blk.qs.iter().map(|&v| i32::from(v)).sum();
            assert!((blk.s - blk.d * sum as f32).abs() < 1e-3);
            for j in 0..QK {
                let v = blk.d * f32::from(blk.qs[j]);
                assert!((v - x[b * QK + j]).abs() <= blk.d * 0.5 + 1e-6);
            }
        }
    }

    #[test]
    fn rows_must_be_whole_blocks() {
        assert!(DType::Q4_1.row_bytes(33).is_err());
        assert!(DType::Q4_1.row_bytes(0).is_err());
        assert_eq!(DType::Q4_1.row_bytes(64).unwrap(), 40);
        assert_eq!(DType::F16.row_bytes(3).unwrap(), 6);
    }
}
