//! Times the quantized matrix product on SmolLM2-sized matrices (one thread by default):
//! `cargo run --release -p strata-kernels --example matmul_speed -- [threads]`.

use std::time::Instant;

use strata_kernels::quant::quantize_row;
use strata_kernels::{DType, WeightMatrix, matmul};

fn main() {
    let threads: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1);
    strata_kernels::init_threads(threads).unwrap();
    let (rows, cols) = (1536, 576);
    let mut s = 1u64;
    let mut rnd = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let wf: Vec<f32> = (0..rows * cols).map(|_| rnd()).collect();
    for ty in [DType::Q4_1, DType::Q8_0] {
        let data: Vec<u8> = wf
            .chunks(cols)
            .flat_map(|r| quantize_row(ty, r).unwrap())
            .collect();
        let w = WeightMatrix::new(ty, rows, cols, &data).unwrap();
        for n in [1usize, 512] {
            let x: Vec<f32> = (0..n * cols).map(|_| rnd()).collect();
            let mut out = vec![0f32; n * rows];
            let reps = if n == 1 { 2000 } else { 8 };
            matmul(&w, &x, n, &mut out);
            let t = Instant::now();
            for _ in 0..reps {
                matmul(&w, &x, n, &mut out);
            }
            let s = t.elapsed().as_secs_f64() / reps as f64;
            let gmacs = (rows * cols * n) as f64 / s / 1e9;
            println!(
                "{ty:?} {rows}x{cols} n={n}: {:.1} µs, {gmacs:.2} GMAC/s on {threads} thread(s)",
                s * 1e6
            );
        }
    }
}
