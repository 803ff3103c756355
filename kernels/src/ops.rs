//! Element-wise and per-row operations of the forward pass.

/// Which elements RoPE rotates together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeLayout {
    /// `(x[2i], x[2i+1])`: GGUF Llama/Mistral Q/K weights are permuted by the converter so
    /// that adjacent elements form the pairs (ggml's "normal" mode).
    Adjacent,
    /// `(x[i], x[i + d/2])`: Hugging Face weights (`rotate_half`), and GGUF Qwen (NEOX mode).
    HalfSplit,
}

/// `out = x / rms(x) · w` for one row.
pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    assert!(
        x.len() == w.len() && x.len() == out.len(),
        "rmsnorm: lengths"
    );
    let ss: f64 = x.iter().map(|v| f64::from(*v) * f64::from(*v)).sum();
    let scale = (1.0 / (ss / x.len() as f64 + f64::from(eps)).sqrt()) as f32;
    for ((o, v), g) in out.iter_mut().zip(x).zip(w) {
        *o = v * scale * g;
    }
}

/// RMSNorm of every `w.len()`-long row of `x`, in place.
pub fn rmsnorm_rows_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    let mut tmp = vec![0f32; w.len()];
    for row in x.chunks_exact_mut(w.len()) {
        rmsnorm(row, w, eps, &mut tmp);
        row.copy_from_slice(&tmp);
    }
}

/// Precomputed inverse frequencies of rotary position embeddings.
#[derive(Clone, Debug)]
pub struct Rope {
    inv_freq: Vec<f32>,
    layout: RopeLayout,
    head_dim: usize,
}

impl Rope {
    /// `theta_i = base^(−2i/rot_dim)` for `i < rot_dim/2`, optionally divided by per-pair
    /// `freq_factors` (Llama 3.1 scaling). Dimensions past `rot_dim` are not rotated.
    pub fn new(
        head_dim: usize,
        rot_dim: usize,
        base: f32,
        layout: RopeLayout,
        freq_factors: Option<&[f32]>,
    ) -> Self {
        let half = rot_dim.min(head_dim) / 2;
        let inv_freq = (0..half)
            .map(|i| {
                let f = 1.0 / f64::from(base).powf(2.0 * i as f64 / (2 * half) as f64);
                let k = freq_factors
                    .and_then(|ff| ff.get(i))
                    .copied()
                    .unwrap_or(1.0);
                (f / f64::from(k)) as f32
            })
            .collect();
        Rope {
            inv_freq,
            layout,
            head_dim,
        }
    }

    /// Rotates every head (`head_dim` floats each) of one token's vector `x` at `pos`.
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        let half = self.inv_freq.len();
        let cs: Vec<(f32, f32)> = self
            .inv_freq
            .iter()
            .map(|f| {
                let a = pos as f64 * f64::from(*f);
                (a.cos() as f32, a.sin() as f32)
            })
            .collect();
        for head in x.chunks_exact_mut(self.head_dim) {
            for (i, &(c, s)) in cs.iter().enumerate() {
                let (a, b) = match self.layout {
                    RopeLayout::Adjacent => (2 * i, 2 * i + 1),
                    RopeLayout::HalfSplit => (i, i + half),
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * c - x1 * s;
                head[b] = x0 * s + x1 * c;
            }
        }
    }
}

/// `gate[i] = silu(gate[i]) · up[i]`: the SiLU-gated MLP's activation.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// Softmax in place (max-subtracted).
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    x.iter_mut().for_each(|v| *v *= inv);
}

/// `x += y`.
pub fn add_inplace(x: &mut [f32], y: &[f32]) {
    assert_eq!(x.len(), y.len());
    x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)]
mod tests {
    use super::*;
    use crate::testutil::randv;

    #[test]
    fn rmsnorm_matches_the_definition() {
        let x = randv(1, 96, 3.0);
        let w = randv(2, 96, 1.0);
        let mut out = vec![0f32; 96];
        rmsnorm(&x, &w, 1e-5, &mut out);
        let ms: f64 = x.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / 96.0;
        for i in 0..96 {
            let want = f64::from(x[i]) / (ms + 1e-5).sqrt() * f64::from(w[i]);
            assert!((f64::from(out[i]) - want).abs() < 1e-5);
        }
    }

    /// Complex-number reference: pair (a, b) rotated by pos·theta_i.
    fn rope_reference(x: &[f32], hd: usize, pos: usize, base: f64, adjacent: bool) -> Vec<f32> {
        let mut out = x.to_vec();
        for h in 0..x.len() / hd {
            for i in 0..hd / 2 {
                let th = pos as f64 * base.powf(-(2.0 * i as f64) / hd as f64);
                let (a, b) = if adjacent {
                    (2 * i, 2 * i + 1)
                } else {
                    (i, i + hd / 2)
                };
                let (re, im) = (f64::from(x[h * hd + a]), f64::from(x[h * hd + b]));
                out[h * hd + a] = (re * th.cos() - im * th.sin()) as f32;
                out[h * hd + b] = (re * th.sin() + im * th.cos()) as f32;
            }
        }
        out
    }

    #[test]
    fn rope_rotates_the_right_pairs_in_both_layouts() {
        let x = randv(4, 3 * 64, 1.0);
        for (layout, adjacent) in [(RopeLayout::Adjacent, true), (RopeLayout::HalfSplit, false)] {
            let rope = Rope::new(64, 64, 10000.0, layout, None);
            for pos in [0usize, 1, 17, 4000] {
                let mut y = x.clone();
                rope.apply(&mut y, pos);
                let want = rope_reference(&x, 64, pos, 10000.0, adjacent);
                for i in 0..y.len() {
                    assert!((y[i] - want[i]).abs() < 1e-4, "{layout:?} pos {pos} i {i}");
                }
                // The two layouts disagree except at position 0.
                let other = rope_reference(&x, 64, pos, 10000.0, !adjacent);
                if pos > 0 {
                    assert!(y.iter().zip(&other).any(|(a, b)| (a - b).abs() > 1e-3));
                }
            }
        }
    }

    #[test]
    fn silu_mul_and_softmax_match_their_definitions() {
        let mut g = randv(5, 50, 4.0);
        let g0 = g.clone();
        let u = randv(6, 50, 2.0);
        silu_mul(&mut g, &u);
        for i in 0..50 {
            let s = f64::from(g0[i]) / (1.0 + (-f64::from(g0[i])).exp());
            assert!((f64::from(g[i]) - s * f64::from(u[i])).abs() < 1e-5);
        }
        let mut x = randv(7, 40, 30.0);
        let x0 = x.clone();
        softmax(&mut x);
        let m = x0.iter().copied().fold(f32::MIN, f32::max) as f64;
        let z: f64 = x0.iter().map(|v| (f64::from(*v) - m).exp()).sum();
        for i in 0..40 {
            assert!((f64::from(x[i]) - (f64::from(x0[i]) - m).exp() / z).abs() < 1e-6);
        }
    }
}
