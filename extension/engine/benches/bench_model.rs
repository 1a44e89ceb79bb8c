//! GPT-3 Small (random weights) prefill and decode timings of the engine alone, without
//! PostgreSQL: for profiling (`perf record target/release/examples/bench_model 2`).
//!
//! Usage: bench_model THREADS [prefill|decode|batch]. Prints prefill tokens/s on 512 tokens,
//! greedy decode tokens/s (16-token prompt, 64 new tokens) and the tokens/s of 1, 4 and 8
//! sequences decoded together (`Model::decode`), best of five rounds; one of them only when
//! named (to profile it alone). BATCHES=8 (a comma-separated list) picks the batch sizes;
//! DTYPE=bfloat16 (or float16) serves the matrices in half precision.

use std::time::Instant;

use pg_llm_engine::model::init::init_params;
use pg_llm_engine::model::{DType, Logits, MapSource, Model, ModelConfig, ModelWeights};
use pg_llm_engine::{parallel, Cancel};

fn main() {
    let threads: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let only = std::env::args().nth(2).unwrap_or_default();
    parallel::set_threads(threads);
    let cfg = ModelConfig::gpt3(12, 768, 12, 64);
    let params = init_params(&cfg, 0).expect("init");
    let dtype = std::env::var("DTYPE").map_or(DType::Float32, |name| {
        DType::parse(&name).expect("DTYPE: float32, bfloat16 or float16")
    });
    let weights = ModelWeights::load_as(&cfg, &mut MapSource::new(params), dtype).expect("load");
    let model = Model::new(cfg, weights).expect("model");
    let long: Vec<u32> = (0..512).map(|i| (i * 104729) % 50000 + 100).collect();
    let prompt: Vec<u32> = (0..16).map(|i| (i * 7919) % 50000 + 100).collect();

    let best = |f: &dyn Fn()| {
        f();
        (0..5)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    };
    let run = |name: &str, f: &dyn Fn()| {
        if only.is_empty() || only == name {
            best(f)
        } else {
            f64::NAN
        }
    };
    let prefill = run("prefill", &|| {
        model.logits(&long, Cancel::NEVER).expect("prefill");
    });
    let decode = run("decode", &|| {
        let mut cache = model.new_cache(80).expect("cache");
        let mut logits = model
            .forward(&prompt, &mut cache, Logits::Last, Cancel::NEVER)
            .expect("prompt");
        for _ in 0..64 {
            let next = pg_llm_engine::sample::argmax(&logits) as u32;
            logits = model
                .forward(&[next], &mut cache, Logits::Last, Cancel::NEVER)
                .expect("step");
        }
    });
    let together = |b: usize| {
        run("batch", &|| {
            let mut caches: Vec<_> = (0..b)
                .map(|s| {
                    let mut cache = model.new_cache(80).expect("cache");
                    let p: Vec<u32> = prompt.iter().map(|t| t + s as u32).collect();
                    model
                        .forward(&p, &mut cache, Logits::Last, Cancel::NEVER)
                        .expect("prompt");
                    cache
                })
                .collect();
            let mut tokens: Vec<u32> = (0..b as u32).map(|s| 100 + s).collect();
            for _ in 0..64 {
                let mut refs: Vec<_> = caches.iter_mut().collect();
                let logits = model
                    .decode(&tokens, &mut refs, Cancel::NEVER)
                    .expect("step");
                for (t, row) in tokens.iter_mut().zip(logits.chunks_exact(50257)) {
                    *t = pg_llm_engine::sample::argmax(row) as u32;
                }
            }
        })
    };
    let batches: Vec<(usize, f64)> = std::env::var("BATCHES")
        .map(|s| {
            s.split(",")
                .map(|v| v.parse().unwrap())
                .collect::<Vec<usize>>()
        })
        .unwrap_or(vec![1, 4, 8])
        .iter()
        .map(|&b| (b, together(b)))
        .collect();
    for (b, secs) in &batches {
        println!(
            "threads {threads}: {b} sequences decoded together {:.1} tokens/s",
            (b * 64) as f64 / secs
        );
    }
    println!(
        "threads {threads}: prefill 512 {:.1} tokens/s, decode 16+64 {:.1} tokens/s",
        512.0 / prefill,
        64.0 / decode
    );
}
