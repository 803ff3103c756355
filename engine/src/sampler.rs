//! Next-token choice: greedy, or temperature + top-p with a seeded generator.

/// How to pick the next token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// 0 = greedy.
    pub temperature: f32,
    /// Nucleus mass kept (1 = all).
    pub top_p: f32,
    /// Generator seed.
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// The index of the largest logit (the lowest index among equals).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in logits.iter().enumerate() {
        if *v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// A seeded sampler.
pub struct Sampler {
    cfg: Sampling,
    state: u64,
}

impl Sampler {
    /// A sampler for `cfg`.
    pub fn new(cfg: Sampling) -> Self {
        Sampler {
            cfg,
            state: cfg.seed ^ 0x9E37_79B9_7F4A_7C15,
        }
    }

    /// splitmix64 → uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Picks the next token from `logits`.
    pub fn pick(&mut self, logits: &[f32]) -> u32 {
        if self.cfg.temperature <= 0.0 {
            return argmax(logits);
        }
        let t = f64::from(self.cfg.temperature);
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, l)| (i as u32, (f64::from(l - max) / t).exp()))
            .collect();
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let total: f64 = probs.iter().map(|p| p.1).sum();
        let keep_mass = f64::from(self.cfg.top_p.clamp(0.0, 1.0)) * total;
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            cum += p.1;
            if cum >= keep_mass {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep.max(1));
        let mass: f64 = probs.iter().map(|p| p.1).sum();
        let mut r = self.uniform() * mass;
        for (id, p) in &probs {
            r -= p;
            if r <= 0.0 {
                return *id;
            }
        }
        probs[probs.len() - 1].0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_largest_and_sampling_is_seeded() {
        let logits = [0.1, 2.0, 1.9, -1.0];
        assert_eq!(Sampler::new(Sampling::default()).pick(&logits), 1);
        let cfg = Sampling {
            temperature: 1.0,
            top_p: 1.0,
            seed: 42,
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(cfg);
            (0..50).map(|_| s.pick(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(cfg);
            (0..50).map(|_| s.pick(&logits)).collect()
        };
        assert_eq!(a, b, "same seed, same draws");
        assert!(
            a.contains(&1) && a.contains(&2),
            "temperature 1 draws both near-equal tokens"
        );
        // top_p small enough keeps only the most likely token.
        let mut s = Sampler::new(Sampling {
            temperature: 1.0,
            top_p: 0.1,
            seed: 7,
        });
        assert!((0..50).all(|_| s.pick(&logits) == 1));
    }
}
