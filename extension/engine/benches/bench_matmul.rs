//! Matrix-product throughput of the engine, for `benches/matmul_vs_torch.py`.
//!
//! Usage: bench_matmul THREADS [m,k,n ...]. Prints one JSON object per shape:
//! {"m":..,"k":..,"n":..,"threads":..,"seconds":..,"gflops":..,"gemm_crate_gflops":..}: the
//! engine's `matmul_into` (what `pg_llm_matmul` runs, into an output reused between calls).
//! `gemm_crate_gflops` is the `gemm` crate called directly on the same operands, in the same
//! rounds (the library the engine uses where its own AVX2 product does not serve). Each
//! shape runs for at least a tenth of a second per round after a warm-up; the best of five
//! rounds is reported (as the PyTorch side does).

use std::time::Instant;

use pg_llm_engine::kernels::matmul::matmul_into;
use pg_llm_engine::{parallel, Cancel};

/// c = a · b through the `gemm` crate on the engine's thread count.
fn gemm_crate(c: &mut [f32], a: &[f32], b: &[f32], (m, k, n): (usize, usize, usize)) {
    let threads = parallel::threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: row-major operands of exactly these shapes.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            parallelism,
        )
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let threads: usize = args.first().and_then(|s| s.parse().ok()).unwrap_or(1);
    parallel::set_threads(threads);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
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
        let (mut out, mut c) = (vec![0.0f32; m * n], vec![0.0f32; m * n]);
        matmul_into(&mut out, &a, &b, m, k, n, Cancel::NEVER).unwrap();
        pool.install(|| gemm_crate(&mut c, &a, &b, (m, k, n)));
        let flops = 2.0 * (m * k * n) as f64;
        let reps = ((0.1e9 * threads as f64 / flops).ceil() as usize).max(3);
        let (mut best, mut best_crate) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..5 {
            let start = Instant::now();
            for _ in 0..reps {
                matmul_into(&mut out, &a, &b, m, k, n, Cancel::NEVER).unwrap();
                std::hint::black_box(&out);
            }
            best = best.min(start.elapsed().as_secs_f64() / reps as f64);
            let start = Instant::now();
            for _ in 0..reps {
                pool.install(|| gemm_crate(&mut c, &a, &b, (m, k, n)));
                std::hint::black_box(&c);
            }
            best_crate = best_crate.min(start.elapsed().as_secs_f64() / reps as f64);
        }
        println!(
            "{{\"m\":{m},\"k\":{k},\"n\":{n},\"threads\":{threads},\"seconds\":{best:.6e},\"gflops\":{:.2},\"gemm_crate_gflops\":{:.2}}}",
            flops / best / 1e9,
            flops / best_crate / 1e9
        );
    }
}
