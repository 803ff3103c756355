//! A log-linear latency histogram in microseconds: exact below 64 µs, then 32 buckets per
//! power of two (about 3 % wide); mergeable, fixed size.

const LINEAR: usize = 64;
const SUB: usize = 32;
const BUCKETS: usize = LINEAR + 40 * SUB;

/// Counts of latencies.
#[derive(Clone)]
pub struct Hist {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

impl Default for Hist {
    fn default() -> Self {
        Hist {
            counts: vec![0; BUCKETS],
            total: 0,
            max: 0,
        }
    }
}

fn index(v: u64) -> usize {
    if v < LINEAR as u64 {
        return v as usize;
    }
    let e = 63 - v.leading_zeros() as usize; // >= 6
    let sub = ((v >> (e - 5)) & (SUB as u64 - 1)) as usize;
    (LINEAR + (e - 6) * SUB + sub).min(BUCKETS - 1)
}

fn lower(i: usize) -> u64 {
    if i < LINEAR {
        return i as u64;
    }
    let e = (i - LINEAR) / SUB + 6;
    let sub = ((i - LINEAR) % SUB) as u64;
    (1u64 << e) + (sub << (e - 5))
}

impl Hist {
    /// Records one latency.
    pub fn record(&mut self, us: u64) {
        self.counts[index(us)] += 1;
        self.total += 1;
        self.max = self.max.max(us);
    }

    /// Adds another histogram's counts.
    pub fn merge(&mut self, o: &Hist) {
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        self.total += o.total;
        self.max = self.max.max(o.max);
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// The `q` quantile (0..=1), in µs (the lower edge of its bucket; the maximum for 1).
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        if q >= 1.0 {
            return self.max;
        }
        let rank = ((q * self.total as f64).ceil() as u64).max(1);
        let mut acc = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            acc += c;
            if acc >= rank {
                return lower(i).min(self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_a_bucket() {
        let mut h = Hist::default();
        for v in 1..=100_000u64 {
            h.record(v);
        }
        for (q, want) in [(0.5, 50_000.0), (0.99, 99_000.0), (0.999, 99_900.0)] {
            let got = h.quantile(q) as f64;
            assert!((got - want).abs() / want < 0.04, "q{q}: {got} vs {want}");
        }
        assert_eq!(h.quantile(1.0), 100_000);
        for i in 0..BUCKETS - 1 {
            assert_eq!(index(lower(i)), i);
        }
    }
}
