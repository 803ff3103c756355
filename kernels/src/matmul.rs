//! Matrix products of a weight matrix in its file encoding with f32 activations.

use rayon::prelude::*;

use crate::dot::{fdot, qdot};
use crate::quant::{DType, QAct, QK, dequantize_row, quantize_act};
use crate::{KernelError, SharedOut};

/// A row-major `rows × cols` weight matrix stored in `ty` (GGUF's and Hugging Face's
/// `[out_features][in_features]` convention).
#[derive(Clone, Copy, Debug)]
pub struct WeightMatrix<'a> {
    ty: DType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    data: &'a [u8],
}

impl<'a> WeightMatrix<'a> {
    /// Checks that `data` holds exactly `rows` rows of `cols` elements of `ty`.
    pub fn new(ty: DType, rows: usize, cols: usize, data: &'a [u8]) -> Result<Self, KernelError> {
        let row_bytes = ty.row_bytes(cols)?;
        if rows == 0 || data.len() != rows * row_bytes {
            return Err(KernelError::Shape(format!(
                "{rows}×{cols} {ty:?} needs {} bytes, got {}",
                rows * row_bytes,
                data.len()
            )));
        }
        Ok(WeightMatrix {
            ty,
            rows,
            cols,
            row_bytes,
            data,
        })
    }

    /// The encoding.
    pub fn dtype(&self) -> DType {
        self.ty
    }
    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// The encoded bytes of row `r`.
    pub fn row(&self, r: usize) -> &'a [u8] {
        &self.data[r * self.row_bytes..(r + 1) * self.row_bytes]
    }
    /// Decodes row `r` into `out` (`cols` floats); an embedding lookup.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        dequantize_row(self.ty, self.row(r), out);
    }
}

/// Rows per parallel task over `total` rows: enough tasks to balance the pool, few enough
/// to amortise them.
fn rows_per_task(total: usize, n: usize) -> usize {
    let tasks = (rayon::current_num_threads() * 8).max(1);
    let per = total.div_ceil(tasks);
    // Prefill: bigger row chunks keep a weight chunk hot in L1/L2 across all tokens.
    let min = if n >= 4 { 16 } else { 8 };
    per.clamp(min.min(total), 256)
}

/// `out[t][r] = Σ_c w[r][c] · x[t][c]` for `n` activation rows `x` (`n × cols`); `out` is
/// `n × rows`. Runs on the rayon pool.
pub fn matmul(w: &WeightMatrix<'_>, x: &[f32], n: usize, out: &mut [f32]) {
    matmul_many(&[w], x, n, &mut [out]);
}

/// Several products of the same activations, `outs[i] = x · ws[i]ᵀ` (as [`matmul`]), in one
/// parallel section: the activations are quantized once and the pool synchronises once
/// (Q/K/V, gate/up).
pub fn matmul_many(ws: &[&WeightMatrix<'_>], x: &[f32], n: usize, outs: &mut [&mut [f32]]) {
    assert_eq!(ws.len(), outs.len(), "matmul: one output per matrix");
    let Some(cols) = ws.first().map(|w| w.cols) else {
        return;
    };
    assert!(
        ws.iter().all(|w| w.cols == cols),
        "matmul: matrices differ in columns"
    );
    assert_eq!(x.len(), n * cols, "matmul: activations are not n × cols");
    for (w, o) in ws.iter().zip(outs.iter()) {
        assert_eq!(o.len(), n * w.rows, "matmul: output is not n × rows");
    }
    let simd = crate::simd();
    let nb = cols / QK;
    let act = if ws.iter().any(|w| w.ty.is_quantized()) {
        let mut act = vec![QAct::default(); n * nb];
        if n > 1 {
            act.par_chunks_mut(nb)
                .zip(x.par_chunks(cols))
                .for_each(|(q, xr)| quantize_act(xr, q));
        } else {
            quantize_act(x, &mut act);
        }
        act
    } else {
        Vec::new()
    };
    let chunk = rows_per_task(ws.iter().map(|w| w.rows).sum(), n);
    let tasks: Vec<(usize, usize, usize)> = ws
        .iter()
        .enumerate()
        .flat_map(|(i, w)| {
            (0..w.rows.div_ceil(chunk)).map(move |c| (i, c * chunk, ((c + 1) * chunk).min(w.rows)))
        })
        .collect();
    let dsts: Vec<SharedOut> = outs.iter_mut().map(|o| SharedOut(o.as_mut_ptr())).collect();
    tasks.into_par_iter().for_each(|(i, r0, r1)| {
        if ws[i].ty.is_quantized() {
            quantized_rows(ws[i], &act, nb, n, dsts[i], r0, r1, simd);
        } else {
            float_rows(ws[i], x, n, dsts[i], r0, r1, simd);
        }
    });
}

/// Rows `r0..r1` of a quantized product (the caller's task owns them).
#[allow(clippy::too_many_arguments)]
fn quantized_rows(
    w: &WeightMatrix<'_>,
    act: &[QAct],
    nb: usize,
    n: usize,
    dst: SharedOut,
    r0: usize,
    r1: usize,
    simd: crate::Simd,
) {
    let rows = w.rows;
    let dot11 = qdot::<1, 1>(w.ty, simd);
    let dot14 = qdot::<1, 4>(w.ty, simd);
    let dot21 = qdot::<2, 1>(w.ty, simd);
    let dot41 = qdot::<4, 1>(w.ty, simd);
    let dot24 = qdot::<2, 4>(w.ty, simd);
    let a = |t: usize| &act[t * nb..(t + 1) * nb];
    // SAFETY: the calling task alone writes rows r0..r1 of each output row of this
    // matrix's output (n × rows, alive for the whole parallel section); callers pass
    // t < n and r0 <= r < r1 <= rows.
    let put = |t: usize, r: usize, v: f32| unsafe { dst.write(t * rows + r, v) };
    if n >= 4 {
        // Rows outside, tokens inside: each pair of weight rows is read from memory once
        // and stays in L1 for every group of tokens (a batch of decode steps reads the
        // weights once, not once per group of four).
        let groups = n / 4;
        let mut r = r0;
        while r + 2 <= r1 {
            let rows2 = [w.row(r), w.row(r + 1)];
            for g in 0..groups {
                let t = g * 4;
                let v = dot24(rows2, [a(t), a(t + 1), a(t + 2), a(t + 3)]);
                for (k, (v0, v1)) in v[0].iter().zip(&v[1]).enumerate() {
                    put(t + k, r, *v0);
                    put(t + k, r + 1, *v1);
                }
            }
            for t in groups * 4..n {
                let v = dot21(rows2, [a(t)]);
                put(t, r, v[0][0]);
                put(t, r + 1, v[1][0]);
            }
            r += 2;
        }
        if r < r1 {
            for g in 0..groups {
                let t = g * 4;
                let v = dot14([w.row(r)], [a(t), a(t + 1), a(t + 2), a(t + 3)]);
                for (k, v0) in v[0].iter().enumerate() {
                    put(t + k, r, *v0);
                }
            }
            for t in groups * 4..n {
                put(t, r, dot11([w.row(r)], [a(t)])[0][0]);
            }
        }
        return;
    }
    for t in 0..n {
        let mut r = r0;
        while r + 4 <= r1 {
            let v = dot41([w.row(r), w.row(r + 1), w.row(r + 2), w.row(r + 3)], [a(t)]);
            for (j, vj) in v.iter().enumerate() {
                put(t, r + j, vj[0]);
            }
            r += 4;
        }
        while r + 2 <= r1 {
            let v = dot21([w.row(r), w.row(r + 1)], [a(t)]);
            put(t, r, v[0][0]);
            put(t, r + 1, v[1][0]);
            r += 2;
        }
        if r < r1 {
            put(t, r, dot11([w.row(r)], [a(t)])[0][0]);
        }
    }
}

/// Rows `r0..r1` of a float-encoded product (the caller's task owns them).
fn float_rows(
    w: &WeightMatrix<'_>,
    x: &[f32],
    n: usize,
    dst: SharedOut,
    r0: usize,
    r1: usize,
    simd: crate::Simd,
) {
    let dot = fdot(w.ty, simd);
    let (rows, cols) = (w.rows, w.cols);
    for t in 0..n {
        let xr = &x[t * cols..(t + 1) * cols];
        for r in r0..r1 {
            let v = dot(w.row(r), xr);
            // SAFETY: the calling task alone writes rows r0..r1; (t, r) is inside n × rows.
            unsafe { dst.write(t * rows + r, v) };
        }
    }
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)]
mod tests {
    use super::*;
    use crate::quant::quantize_row;
    use crate::testutil::randv;

    #[test]
    fn matmul_matches_a_scalar_reference_for_every_encoding() {
        let (rows, cols) = (37, 96);
        for n in [1usize, 3, 4, 9] {
            let x = randv(11 + n as u64, n * cols, 1.0);
            for ty in [
                DType::F32,
                DType::F16,
                DType::Bf16,
                DType::Q8_0,
                DType::Q4_0,
                DType::Q4_1,
            ] {
                let wf = randv(21, rows * cols, 0.5);
                let mut data = Vec::new();
                for r in 0..rows {
                    data.extend(quantize_row(ty, &wf[r * cols..(r + 1) * cols]).unwrap());
                }
                let w = WeightMatrix::new(ty, rows, cols, &data).unwrap();
                let mut out = vec![0f32; n * rows];
                matmul(&w, &x, n, &mut out);
                // Reference: decoded weights times unquantized activations, in f64. The
                // quantized paths also quantize activations: allow for that error.
                let tol = if ty.is_quantized() { 2e-2 } else { 1e-4 };
                let mut row = vec![0f32; cols];
                for r in 0..rows {
                    w.dequantize_row(r, &mut row);
                    for t in 0..n {
                        let want: f64 = row
                            .iter()
                            .zip(&x[t * cols..])
                            .map(|(a, b)| f64::from(*a) * f64::from(*b))
                            .sum();
                        let got = f64::from(out[t * rows + r]);
                        assert!(
                            (got - want).abs() < tol * (1.0 + want.abs()),
                            "{ty:?} n={n} r={r} t={t}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn matmul_many_equals_separate_products() {
        let cols = 64;
        let mk = |ty: DType, rows: usize, seed: u64| -> Vec<u8> {
            let wf = randv(seed, rows * cols, 0.5);
            wf.chunks(cols)
                .flat_map(|r| quantize_row(ty, r).unwrap())
                .collect()
        };
        let (d1, d2, d3) = (
            mk(DType::Q4_1, 40, 1),
            mk(DType::Q8_0, 9, 2),
            mk(DType::F16, 13, 3),
        );
        let w1 = WeightMatrix::new(DType::Q4_1, 40, cols, &d1).unwrap();
        let w2 = WeightMatrix::new(DType::Q8_0, 9, cols, &d2).unwrap();
        let w3 = WeightMatrix::new(DType::F16, 13, cols, &d3).unwrap();
        for n in [1usize, 6] {
            let x = randv(4, n * cols, 1.0);
            let (mut o1, mut o2, mut o3) =
                (vec![0f32; n * 40], vec![0f32; n * 9], vec![0f32; n * 13]);
            matmul_many(&[&w1, &w2, &w3], &x, n, &mut [&mut o1, &mut o2, &mut o3]);
            for (w, o) in [(&w1, &o1), (&w2, &o2), (&w3, &o3)] {
                let mut want = vec![0f32; o.len()];
                matmul(w, &x, n, &mut want);
                assert_eq!(o, &want);
            }
        }
    }

    #[test]
    fn shapes_are_checked() {
        assert!(WeightMatrix::new(DType::Q4_1, 2, 64, &[0u8; 79]).is_err());
        assert!(WeightMatrix::new(DType::Q4_1, 2, 64, &[0u8; 80]).is_ok());
        assert!(WeightMatrix::new(DType::F32, 0, 4, &[]).is_err());
    }
}
