//! One training step of the GPT-3 Small shape (batch 4 × 256 by default) in the engine alone,
//! split into forward, forward + backward, and the optimizer, to see where a step's time
//! goes. The SQL-level comparison with PyTorch is training_vs_torch.py.
//!
//!   cargo run --release -p pg_llm_engine --example bench_train -- [threads] [batch] [len] [recompute] [350m] [bfloat16|float16]
//!
//! Ends with the process's peak resident memory (VmHWM): weights, gradient, both moments and
//! the activations, i.e. what a backend needs for the same step.

use std::time::Instant;

use pg_llm_engine::model::init::init_params;
use pg_llm_engine::model::weights::packed_len;
use pg_llm_engine::model::{Batch, DType, MapSource, ModelConfig, ModelWeights};
use pg_llm_engine::optim::AdamW;
use pg_llm_engine::parallel::{self, Cancel};
use pg_llm_engine::train::{StepSettings, Trainer};

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let threads = args.first().copied().unwrap_or(2);
    let (b, t) = (
        args.get(1).copied().unwrap_or(4),
        args.get(2).copied().unwrap_or(256),
    );
    let recompute = args.get(3).copied().unwrap_or(0) == 1;
    parallel::set_threads(threads);
    let medium = std::env::args().any(|a| a == "350m");
    // float32 (default), bfloat16 or float16 passes (float32 masters either way).
    let precision = std::env::args()
        .skip(1)
        .find_map(|a| DType::parse(&a).ok())
        .unwrap_or(DType::Float32);
    let cfg = if medium {
        ModelConfig::gpt3(24, 1024, 16, 64)
    } else {
        ModelConfig::gpt3(12, 768, 12, 64)
    };
    let weights = ModelWeights::load(&cfg, &mut MapSource::new(init_params(&cfg, 1).unwrap()))
        .unwrap()
        .storage()
        .as_f32()
        .unwrap()
        .to_vec();
    let mut trainer = Trainer::fresh(cfg.clone(), weights).unwrap();
    let tokens: Vec<u32> = (0..b * t).map(|i| (i * 7919 % 50257) as u32).collect();
    let targets: Vec<u32> = (0..b * t)
        .map(|i| ((i + 1) * 7919 % 50257) as u32)
        .collect();
    let batch = Batch {
        tokens: &tokens,
        targets: &targets,
        sequences: b,
        len: t,
    };
    let settings = StepSettings {
        adamw: AdamW {
            lr: 6e-4,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        },
        grad_clip: 1.0,
        micro_batch: 0,
        dropout_p: 0.0,
        dropout_seed: 0,
        recompute,
        precision,
    };
    println!(
        "{} shape, {} parameters, batch {b} × {t}, {threads} threads, recompute {recompute}, {} passes",
        if medium { "gpt3-350m" } else { "gpt3-125m" },
        packed_len(&cfg).unwrap(),
        precision.name()
    );
    trainer.step(batch, &settings, Cancel::NEVER).unwrap();
    // Steps back to back, as llm_train runs them; then one eval-mode forward.
    for _ in 0..if medium { 1 } else { 3 } {
        let started = Instant::now();
        trainer.step(batch, &settings, Cancel::NEVER).unwrap();
        let step = started.elapsed().as_secs_f64();
        println!("step {step:.2} s   {:.0} tokens/s", (b * t) as f64 / step);
    }
    let started = Instant::now();
    trainer.loss(batch, Cancel::NEVER).unwrap();
    println!("forward (eval) {:.2} s", started.elapsed().as_secs_f64());
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if let Some(hwm) = status.lines().find(|l| l.starts_with("VmHWM")) {
        println!("{hwm}");
    }
}
