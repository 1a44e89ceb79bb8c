//! Matrix-product throughput of the engine, for `benches/matmul_vs_torch.py`.
//!
//! Usage: bench_matmul THREADS [m,k,n ...]. Prints one JSON object per shape:
//! {"m":..,"k":..,"n":..,"threads":..,"seconds":..,"gflops":..}. Each shape runs for at least
//! half a second after a warm-up; the best of five rounds is reported (as the PyTorch side does).

use std::time::Instant;

use pg_llm_engine::kernels::matmul::matmul;
use pg_llm_engine::{parallel, Cancel};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let threads: usize = args.first().and_then(|s| s.parse().ok()).unwrap_or(1);
    parallel::set_threads(threads);
    let shapes: Vec<(usize, usize, usize)> = if args.len() > 1 {
        args[1..]
            .iter()
            .map(|s| {
                let v: Vec<usize> = s.split(',').map(|x| x.parse().expect("m,k,n")).collect();
                (v[0], v[1], v[2])
            })
            .collect()
    } else {
        vec![(768, 768, 768), (512, 768, 3072), (1, 768, 50257)]
    };
    for (m, k, n) in shapes {
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i % 97) as f32 - 48.0) * 1e-2)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i % 89) as f32 - 44.0) * 1e-2)
            .collect();
        let _ = matmul(&a, &b, m, k, n, Cancel::NEVER).unwrap();
        let flops = 2.0 * (m * k * n) as f64;
        let reps = ((0.1e9 * threads as f64 / flops).ceil() as usize).max(3);
        let mut best = f64::INFINITY;
        for _ in 0..5 {
            let start = Instant::now();
            for _ in 0..reps {
                std::hint::black_box(matmul(&a, &b, m, k, n, Cancel::NEVER).unwrap());
            }
            best = best.min(start.elapsed().as_secs_f64() / reps as f64);
        }
        println!(
            "{{\"m\":{m},\"k\":{k},\"n\":{n},\"threads\":{threads},\"seconds\":{best:.6e},\"gflops\":{:.2}}}",
            flops / best / 1e9
        );
    }
}
