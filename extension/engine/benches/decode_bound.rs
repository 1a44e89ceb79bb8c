//! Decode of GPT-3 Small against the machine's memory-bandwidth bound, measured in the same run.
//!
//! A decoding step reads every weight once (and the keys and values of every earlier position),
//! so tokens/s × bytes read per token cannot exceed the rate at which the compute threads can
//! read memory. This benchmark measures that rate itself: the compute threads sum a buffer of
//! the weights' size (and one four times larger, past any cache) with wide loads, best of several
//! passes. It then decodes greedily on a short context (16-token prompt) and a long one (prompt
//! of 1984 tokens, so the steps run at positions 1984..2048), and prints each as a fraction of
//! the bound, for the weights in float32 and with the matrices in bfloat16 and float16 (with
//! each one's ratio to float32; their KV caches hold keys and values in the same precision).
//! The six decodes and the bandwidth passes alternate over five rounds, each keeping its best,
//! so that the ratios compare the same moments of a shared machine.
//!
//! Usage: decode_bound [THREADS] (default: all hardware threads). Random weights; the figures
//! do not depend on the values.

use std::time::Instant;

use pg_llm_engine::model::init::init_params;
use pg_llm_engine::model::weights::packed_len;
use pg_llm_engine::model::{DType, Logits, MapSource, Model, ModelConfig, ModelWeights};
use pg_llm_engine::{parallel, sample, Cancel};
use rayon::prelude::*;

const NEW_TOKENS: usize = 64;
const ROUNDS: usize = 5;

fn main() {
    let threads: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(parallel::available_threads);
    parallel::set_threads(threads);
    let cfg = ModelConfig::gpt3(12, 768, 12, 64);
    let weights_bytes = 4 * (packed_len(&cfg).expect("size") - cfg.n_positions * cfg.d_model);
    // Decoded in float32, bfloat16 and float16 (matrices; widened to float32 in the kernels).

    // Every case is decoded once per round, the rounds alternating over all of them, and
    // each keeps its best: a slow moment of this shared machine then costs every case a round
    // rather than one case all of its rounds (which would move the ratios to float32). The
    // bound is the best rate seen over a buffer of the weights' size and one four times larger
    // (past any cache), measured in every round.
    let sizes = [weights_bytes, 4 * weights_bytes];
    let mut rates = [0.0f64; 2];
    let params = init_params(&cfg, 0).expect("init");
    let mut cases = Vec::new();
    for dtype in [DType::Float32, DType::Bfloat16, DType::Float16] {
        let mut src = MapSource::new(params.clone());
        let weights = ModelWeights::load_as(&cfg, &mut src, dtype).expect("load");
        // Bytes a step reads: the image less the position table (one row of it is read).
        let value_bytes = dtype.value_bytes();
        let wpe_bytes = cfg.n_positions * cfg.d_model * value_bytes;
        let image_bytes = weights.storage().image().len() - wpe_bytes;
        let model = std::sync::Arc::new(Model::new(cfg.clone(), weights).expect("model"));
        for prompt_len in [16, cfg.n_positions - NEW_TOKENS] {
            // Keys and values of every earlier position, read by each layer at each step (the
            // cache holds them in the weights' precision).
            let kv_values: usize = (prompt_len..prompt_len + NEW_TOKENS)
                .map(|pos| 2 * cfg.n_layer * pos * cfg.d_attn())
                .sum();
            let bytes_per_token = (image_bytes + value_bytes * kv_values / NEW_TOKENS) as f64;
            cases.push((dtype, prompt_len, model.clone(), bytes_per_token));
        }
    }
    let mut best = vec![f64::INFINITY; cases.len()];
    for round in 0..=ROUNDS {
        for (rate, &n) in rates.iter_mut().zip(&sizes) {
            *rate = rate.max(read_bandwidth(n));
        }
        for ((_, prompt_len, model, _), best) in cases.iter().zip(&mut best) {
            let prompt: Vec<u32> = (0..*prompt_len as u32)
                .map(|i| (i * 7919) % 50000 + 100)
                .collect();
            let seconds = decode_seconds(model, &prompt);
            // The first round warms every path up and is not counted.
            if round > 0 {
                *best = best.min(seconds);
            }
        }
    }
    let decodes: Vec<(DType, usize, f64, f64)> = cases
        .iter()
        .zip(&best)
        .map(|(&(dtype, prompt_len, _, bytes), &secs)| {
            (dtype, prompt_len, NEW_TOKENS as f64 / secs, bytes)
        })
        .collect();
    let bound = rates.iter().cloned().fold(0.0, f64::max);
    println!(
        "threads {threads}: read bandwidth {:.1} GB/s over {} MB (the weights' size), {:.1} GB/s \
         over {} MB: bound {:.1} GB/s",
        rates[0] / 1e9,
        sizes[0] >> 20,
        rates[1] / 1e9,
        sizes[1] >> 20,
        bound / 1e9
    );
    for &(dtype, prompt_len, tokens_per_s, bytes_per_token) in &decodes {
        let float32 = decodes
            .iter()
            .find(|d| d.0 == DType::Float32 && d.1 == prompt_len)
            .map_or(f64::NAN, |d| d.2);
        println!(
            "threads {threads}: {:8} decode at positions {prompt_len}..{}: {tokens_per_s:.1} \
             tokens/s ({:.2}x float32), {:.0} MB per token, {:.1} GB/s = {:.0} % of the bound",
            dtype.name(),
            prompt_len + NEW_TOKENS,
            tokens_per_s / float32,
            bytes_per_token / 1e6,
            tokens_per_s * bytes_per_token / 1e9,
            100.0 * tokens_per_s * bytes_per_token / bound
        );
    }
}

/// Seconds of one greedy decode of `NEW_TOKENS` tokens after `prompt` (the prompt's own pass
/// is not timed).
fn decode_seconds(model: &Model, prompt: &[u32]) -> f64 {
    let mut cache = model.new_cache(prompt.len() + NEW_TOKENS).expect("cache");
    let mut logits = model
        .forward(prompt, &mut cache, Logits::Last, Cancel::NEVER)
        .expect("prompt");
    let start = Instant::now();
    for _ in 0..NEW_TOKENS {
        let next = sample::argmax(&logits) as u32;
        logits = model
            .forward(&[next], &mut cache, Logits::Last, Cancel::NEVER)
            .expect("step");
    }
    start.elapsed().as_secs_f64()
}

/// Bytes per second at which the compute threads read a buffer of `bytes`, each summing its own
/// contiguous share with eight independent wide accumulators; best of three passes after one
/// that touches the pages.
fn read_bandwidth(bytes: usize) -> f64 {
    let buffer: Vec<f32> = (0..bytes / 4).map(|i| (i % 7) as f32).collect();
    let share = buffer.len().div_ceil(parallel::threads());
    let mut best = f64::INFINITY;
    let mut total = 0.0;
    for _ in 0..=3 {
        let start = Instant::now();
        total += parallel::install(|| {
            buffer
                .par_chunks(share)
                .map(sum_wide)
                .reduce(|| 0.0, |a, b| a + b)
        });
        best = best.min(start.elapsed().as_secs_f64());
    }
    // The sums are used, so no pass can be optimised away.
    assert!(total > 0.0);
    bytes as f64 / best
}

/// Σ x with eight independent wide accumulators: enough loads in flight to saturate memory.
fn sum_wide(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the feature was detected at run time.
        return unsafe { sum_avx512(x) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the feature was detected at run time.
        return unsafe { sum_avx(x) };
    }
    // Independent lanes, which the compiler keeps in separate vector registers; a plain
    // `iter().sum()` is one serial chain of adds, far below memory speed.
    let mut acc = [0.0f32; 64];
    let blocks = x.chunks_exact(64);
    let tail: f32 = blocks.remainder().iter().sum();
    for block in blocks {
        for (a, v) in acc.iter_mut().zip(block) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `sum_avx512` with 256-bit registers (AVX2 machines such as AMD EPYC).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn sum_avx(x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_ps(); 8];
    let blocks = x.chunks_exact(64);
    let tail: f32 = blocks.remainder().iter().sum();
    for block in blocks {
        for (k, a) in acc.iter_mut().enumerate() {
            // SAFETY: block holds 64 values, so 8k..8k+8 is inside it.
            *a = _mm256_add_ps(*a, _mm256_loadu_ps(block.as_ptr().add(8 * k)));
        }
    }
    let sum = acc
        .iter()
        .fold(_mm256_setzero_ps(), |s, &a| _mm256_add_ps(s, a));
    let mut lanes = [0.0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
    lanes.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum_avx512(x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); 8];
    let blocks = x.chunks_exact(128);
    let tail: f32 = blocks.remainder().iter().sum();
    for block in blocks {
        for (k, a) in acc.iter_mut().enumerate() {
            // SAFETY: block holds 128 values, so 16k..16k+16 is inside it.
            *a = _mm512_add_ps(*a, _mm512_loadu_ps(block.as_ptr().add(16 * k)));
        }
    }
    let sum = acc
        .iter()
        .fold(_mm512_setzero_ps(), |s, &a| _mm512_add_ps(s, a));
    _mm512_reduce_add_ps(sum) + tail
}
