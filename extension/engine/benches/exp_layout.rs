use pg_llm_engine::kernels::matmul::{gemm, Accumulate, MatRef, Threads};
use pg_llm_engine::parallel;
use std::time::Instant;
fn huge_vec(len: usize, huge: bool) -> &'static mut [f32] {
    unsafe {
        let bytes = (len * 4).next_multiple_of(2 << 20);
        let p = libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if huge {
            assert_eq!(libc::madvise(p, bytes, libc::MADV_HUGEPAGE), 0);
        }
        std::slice::from_raw_parts_mut(p as *mut f32, len)
    }
}
fn main() {
    parallel::set_threads(2);
    for (m, k, n) in [
        (512usize, 3072usize, 768usize),
        (512, 768, 3072),
        (512, 768, 50257),
    ] {
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i % 97) as f32 - 48.0) * 1e-2)
            .collect();
        let flops = 2.0 * (m * k * n) as f64;
        let time = |f: &mut dyn FnMut()| {
            f();
            let mut best = f64::INFINITY;
            for _ in 0..5 {
                let t = Instant::now();
                for _ in 0..3 {
                    f();
                }
                best = best.min(t.elapsed().as_secs_f64() / 3.0);
            }
            flops / best / 1e9
        };
        let mut y = vec![0f32; m * n];
        for huge in [false, true] {
            let w = huge_vec(k * n, huge);
            for (i, v) in w.iter_mut().enumerate() {
                *v = ((i % 89) as f32 - 44.0) * 1e-2;
            }
            let g = time(&mut || {
                gemm(
                    &mut y,
                    MatRef::new(&a, m, k),
                    MatRef::transposed(w, k, n),
                    Accumulate::Overwrite,
                    Threads::Pool,
                );
            });
            let g2 = time(&mut || {
                gemm(
                    &mut y,
                    MatRef::new(&a, m, k),
                    MatRef::new(w, k, n),
                    Accumulate::Overwrite,
                    Threads::Pool,
                );
            });
            println!("{m}x{k}x{n} huge={huge}: W[out,in] {g:.1}  W[in,out] {g2:.1}");
        }
    }
    println!(
        "{}",
        std::fs::read_to_string("/proc/self/smaps_rollup")
            .unwrap()
            .lines()
            .filter(|l| l.contains("AnonHuge"))
            .collect::<Vec<_>>()
            .join(" ")
    );
}
