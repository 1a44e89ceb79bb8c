//! The memory estimates of `pg_llm_engine::memory` against what the engine really allocates:
//! a counting global allocator records the peak heap use of each piece of work, which must
//! stay within its estimate, while the estimate stays within a small factor of it (an
//! estimate far above the truth would refuse work that fits).
//!
//! One test function: the allocator's counters are process-wide, so the cases run one after
//! another.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use pg_llm_engine::generate::{beam_search, generate, GenerateOptions};
use pg_llm_engine::memory::{self, Need};
use pg_llm_engine::model::init::init_params;
use pg_llm_engine::model::weights::MapSource;
use pg_llm_engine::model::{AttnKind, Batch, DType, LnPlacement, Model, ModelConfig, ModelWeights};
use pg_llm_engine::optim::AdamW;
use pg_llm_engine::parallel::{self, Cancel};
use pg_llm_engine::sample::SamplingParams;
use pg_llm_engine::train::{StepSettings, Trainer};

struct Counting;

static LIVE: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            grew(layout.size() as u64);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            grew(layout.size() as u64);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        System.dealloc(p, layout);
        LIVE.fetch_sub(layout.size() as u64, Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let q = System.realloc(p, layout, new_size);
        if !q.is_null() {
            LIVE.fetch_sub(layout.size() as u64, Ordering::Relaxed);
            grew(new_size as u64);
        }
        q
    }
}

fn grew(bytes: u64) {
    let live = LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Peak bytes allocated by `work` on top of what was live before it.
fn peak_of<R>(work: impl FnOnce() -> R) -> u64 {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let result = work();
    let peak = PEAK.load(Ordering::Relaxed) - base;
    drop(result);
    peak
}

/// The measured peak is within the estimate, and the estimate within `factor` of it (past the
/// estimates' fixed margin).
fn check(case: &str, measured: u64, need: Need, factor: f64) {
    let margin = memory::margin(THREADS);
    let estimate = need.working;
    println!(
        "{case}: measured {} estimate {} ({:.2}x)",
        memory::pretty(measured),
        memory::pretty(estimate),
        estimate as f64 / measured as f64
    );
    assert!(
        measured <= estimate,
        "{case}: the work allocated {measured} bytes, more than the estimated {estimate}"
    );
    assert!(
        estimate as f64 <= measured as f64 * factor + margin as f64,
        "{case}: the estimate {estimate} is more than {factor}x the {measured} bytes allocated"
    );
}

fn configs() -> Vec<(&'static str, ModelConfig)> {
    let gpt3 = ModelConfig {
        n_positions: 512,
        vocab: 8192,
        d_ff: 1024,
        local_window: Some(64),
        ..ModelConfig::gpt3(2, 256, 4, 64)
    };
    let post_ln_dense = ModelConfig {
        attention_pattern: vec![AttnKind::Dense],
        local_window: None,
        ln_placement: LnPlacement::Post,
        ..gpt3.clone()
    };
    vec![("gpt3 banded", gpt3), ("post-LN dense", post_ln_dense)]
}

fn model(cfg: &ModelConfig) -> Model {
    let params = init_params(cfg, 7).unwrap();
    let weights = ModelWeights::load(cfg, &mut MapSource::new(params)).unwrap();
    Model::new(cfg.clone(), weights).unwrap()
}

const THREADS: usize = 2;

#[test]
fn estimates_bound_the_memory_the_engine_allocates() {
    let threads = THREADS;
    parallel::set_threads(threads);
    for (name, cfg) in configs() {
        let model = model(&cfg);
        let ids = |n: usize| -> Vec<u32> { (0..n as u32).map(|i| (i * 37) % 8192).collect() };

        for t in [1, 128, 512] {
            let tokens = ids(t);
            let measured = peak_of(|| model.logits(&tokens, Cancel::NEVER).unwrap());
            let need = memory::inference(&cfg, t, t, threads).unwrap();
            check(
                &format!("{name}: logits of {t} tokens"),
                measured,
                need,
                3.0,
            );
        }

        let opts = GenerateOptions {
            max_tokens: 48,
            sampling: SamplingParams {
                temperature: 0.8,
                top_k: 0,
                top_p: 1.0,
            },
            eos: None,
            seed: Some(1),
        };
        let prompt = ids(256);
        let measured = peak_of(|| generate(&model, &prompt, opts, Cancel::NEVER).unwrap());
        let need = memory::generation(&cfg, 256, 48, 1, DType::Float32, threads).unwrap();
        check(&format!("{name}: generation"), measured, need, 3.0);

        // Served in bfloat16: a half-precision KV cache, widened per head for the prompt.
        let params = init_params(&cfg, 7).unwrap();
        let half = ModelWeights::load_as(&cfg, &mut MapSource::new(params), DType::Bfloat16);
        let half = Model::new(cfg.clone(), half.unwrap()).unwrap();
        let measured = peak_of(|| generate(&half, &prompt, opts, Cancel::NEVER).unwrap());
        let need = memory::generation(&cfg, 256, 48, 1, DType::Bfloat16, threads).unwrap();
        check(
            &format!("{name}: generation in bfloat16"),
            measured,
            need,
            3.0,
        );

        let width = 3;
        let measured =
            peak_of(|| beam_search(&model, &prompt, width, 48, 1.0, None, Cancel::NEVER).unwrap());
        let need =
            memory::generation(&cfg, 256, 48, 2 * width + 1, DType::Float32, threads).unwrap();
        check(
            &format!("{name}: beam search of width {width}"),
            measured,
            need,
            3.5,
        );

        let (sequences, len) = (4, 128);
        let tokens = ids(sequences * len);
        let targets: Vec<u32> = tokens.iter().map(|t| (t + 1) % 8192).collect();
        let batch = Batch {
            tokens: &tokens,
            targets: &targets,
            sequences,
            len,
        };
        let measured = peak_of(|| model.loss_and_grads(batch, None, Cancel::NEVER).unwrap());
        let need = memory::loss(&cfg, sequences * len, threads).unwrap();
        check(&format!("{name}: loss"), measured, need, 3.0);

        for (micro, recompute, precision) in [
            (0, false, DType::Float32),
            (1, false, DType::Float32),
            (0, true, DType::Float32),
            (0, false, DType::Bfloat16),
        ] {
            let weights = model.weights.storage().as_f32().unwrap().to_vec();
            let settings = StepSettings {
                adamw: AdamW {
                    lr: 1e-3,
                    beta1: 0.9,
                    beta2: 0.95,
                    eps: 1e-8,
                    weight_decay: 0.1,
                },
                grad_clip: 1.0,
                micro_batch: micro,
                dropout_p: 0.1,
                dropout_seed: 3,
                recompute,
                precision,
            };
            // The training call's own copy of the weights counts (the estimate includes it).
            let trained = cfg.clone();
            let measured = peak_of(move || {
                let mut trainer = Trainer::fresh(trained, weights).unwrap();
                trainer.step(batch, &settings, Cancel::NEVER).unwrap();
                trainer
            });
            let pass = if micro == 0 { sequences } else { micro } * len;
            let need = memory::training(&cfg, pass, recompute, precision, threads).unwrap();
            check(
                &format!(
                    "{name}: training step (micro-batch {micro}, recompute {recompute}, {})",
                    precision.name()
                ),
                measured,
                need,
                2.0,
            );
        }
    }
}
