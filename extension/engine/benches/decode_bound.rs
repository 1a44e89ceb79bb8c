//! Decode of GPT-3 Small against the machine's memory-bandwidth bound, measured in the same run.
//!
//! A decoding step reads every weight once (and the keys and values of every earlier position),
//! so tokens/s × bytes read per token cannot exceed the rate at which the compute threads can
//! read memory. This benchmark measures that rate itself: the compute threads sum a buffer of
//! the weights' size with wide loads. It decodes greedily on a short context (16-token prompt)
//! and a long one (prompt of 1984 tokens, so the steps run at positions 1984..2048), for the
//! weights in float32 and with the matrices in bfloat16 and float16 (with each one's ratio to
//! float32; their KV caches hold keys and values in the same precision).
//!
//! The machine these figures come from is shared: its read bandwidth moves by a factor of two
//! or more from one minute to the next. So every decode is bracketed by two reads of the same
//! number of bytes as the decode reads (the same duration, give or take), and its fraction of
//! the bound is its rate over the mean of those two; each case is decoded once per round over
//! five rounds (alternating over the cases), and the median of its five fractions is reported
//! with their range. The fastest single pass over the buffer seen in the whole run (a 20 ms
//! burst; what this benchmark took as the bound until 2026-12-07) is printed too.
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

/// One decode to measure: the weights' precision, the prompt's length, the model and the bytes
/// a decoding step reads.
struct Case {
    dtype: DType,
    prompt_len: usize,
    model: std::sync::Arc<Model>,
    bytes_per_token: f64,
}

fn main() {
    let threads: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(parallel::available_threads);
    parallel::set_threads(threads);
    let cfg = ModelConfig::gpt3(12, 768, 12, 64);
    let weights_bytes = 4 * (packed_len(&cfg).expect("size") - cfg.n_positions * cfg.d_model);
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
            cases.push(Case {
                dtype,
                prompt_len,
                model: model.clone(),
                bytes_per_token,
            });
        }
    }

    let buffer: Vec<f32> = (0..weights_bytes / 4).map(|i| (i % 7) as f32).collect();
    // Warm-up, not counted: a pass over the buffer and every decode once.
    ReadRates::default().rate(&buffer, 1);
    for case in &cases {
        decode_seconds(&case.model, &prompt(case.prompt_len));
    }
    let mut reads = ReadRates::default();
    let mut tokens_per_s = vec![Vec::new(); cases.len()];
    let mut fractions = vec![Vec::new(); cases.len()];
    for _ in 0..ROUNDS {
        for (i, case) in cases.iter().enumerate() {
            let decode_bytes = case.bytes_per_token * NEW_TOKENS as f64;
            let passes = (decode_bytes / weights_bytes as f64).round().max(1.0) as usize;
            let before = reads.rate(&buffer, passes);
            let rate = NEW_TOKENS as f64 / decode_seconds(&case.model, &prompt(case.prompt_len));
            let after = reads.rate(&buffer, passes);
            tokens_per_s[i].push(rate);
            fractions[i].push(rate * case.bytes_per_token / ((before + after) / 2.0));
        }
    }

    println!(
        "threads {threads}: reads of {} MB at {:.1} - {:.1} GB/s over the run (a decode's bytes \
         each); fastest single pass {:.1} GB/s",
        weights_bytes >> 20,
        reads.slowest / 1e9,
        reads.fastest / 1e9,
        reads.fastest_pass / 1e9
    );
    let best_rate = |i: usize| tokens_per_s[i].iter().cloned().fold(0.0, f64::max);
    for (i, case) in cases.iter().enumerate() {
        let float32 = cases
            .iter()
            .position(|c| c.dtype == DType::Float32 && c.prompt_len == case.prompt_len)
            .expect("a float32 case");
        // Ratios to float32 per round (the same minute), median over the rounds.
        let ratios: Vec<f64> = tokens_per_s[i]
            .iter()
            .zip(&tokens_per_s[float32])
            .map(|(half, full)| half / full)
            .collect();
        let (fraction, low, high) = median_and_range(&fractions[i]);
        println!(
            "threads {threads}: {:8} decode at positions {}..{}: {:.1} tokens/s best \
             ({:.2}x float32, median of the rounds), {:.0} MB per token: {:.0} % of the bound \
             (median; rounds {:.0} - {:.0} %)",
            case.dtype.name(),
            case.prompt_len,
            case.prompt_len + NEW_TOKENS,
            best_rate(i),
            median_and_range(&ratios).0,
            case.bytes_per_token / 1e6,
            100.0 * fraction,
            100.0 * low,
            100.0 * high
        );
    }
}

/// A prompt of `len` tokens.
fn prompt(len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| (i * 7919) % 50000 + 100).collect()
}

/// The median of `values` and their lowest and highest.
fn median_and_range(values: &[f64]) -> (f64, f64, f64) {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    (median, sorted[0], sorted[n - 1])
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

/// The read rates seen: the slowest and fastest of the bracketing reads, and the fastest
/// single pass within them.
#[derive(Default)]
struct ReadRates {
    slowest: f64,
    fastest: f64,
    fastest_pass: f64,
}

impl ReadRates {
    /// Bytes per second at which the compute threads read `buffer` `passes` times over, each
    /// thread summing its own contiguous share with wide accumulators.
    fn rate(&mut self, buffer: &[f32], passes: usize) -> f64 {
        let share = buffer.len().div_ceil(parallel::threads());
        let mut total = 0.0;
        let start = Instant::now();
        for _ in 0..passes {
            let pass = Instant::now();
            total += parallel::install(|| {
                buffer
                    .par_chunks(share)
                    .map(sum_wide)
                    .reduce(|| 0.0, |a, b| a + b)
            });
            let pass_rate = std::mem::size_of_val(buffer) as f64 / pass.elapsed().as_secs_f64();
            self.fastest_pass = self.fastest_pass.max(pass_rate);
        }
        // The sums are used, so no pass can be optimised away.
        assert!(total > 0.0);
        let rate = (passes * std::mem::size_of_val(buffer)) as f64 / start.elapsed().as_secs_f64();
        self.slowest = if self.slowest == 0.0 {
            rate
        } else {
            self.slowest.min(rate)
        };
        self.fastest = self.fastest.max(rate);
        rate
    }
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
