//! Every kernel, given finite float32 inputs (extremes included: ±3.4e38, ±1e38, subnormals,
//! zeros), returns finite values or `EngineError::OutOfRange`: never NaN, an infinity or a
//! panic. LayerNorm is also compared with a float64 reference.

use pg_llm_engine::kernels::attention::{
    attention_block_backward, attention_block_forward, AttnBlockWeights,
};
use pg_llm_engine::kernels::{cross_entropy, dropout, elementwise, layernorm, matmul, softmax};
use pg_llm_engine::optim::{self, AdamW};
use pg_llm_engine::sample::rng_from_seed;
use pg_llm_engine::{Cancel, EngineError, Result};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{Config, RngSeed, TestCaseResult};

/// 256 cases per property from a fixed seed: a few seconds in all, the same cases on every run.
fn config() -> Config {
    Config {
        cases: 256,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(0x5eed),
        ..Config::default()
    }
}

const EXTREMES: [f32; 18] = [
    f32::MAX,
    -f32::MAX,
    3.4e38,
    -3.4e38,
    3e38,
    -3e38,
    1e38,
    -1e38,
    1e19,
    -1e19,
    f32::MIN_POSITIVE,
    1e-40,
    1e-45,
    -1e-45,
    0.0,
    -0.0,
    1.0,
    -1.0,
];

/// One finite value: an extreme, an ordinary value, or any finite float32.
fn value() -> impl Strategy<Value = f32> {
    use proptest::num::f32::{NEGATIVE, NORMAL, POSITIVE, SUBNORMAL, ZERO};
    prop_oneof![
        3 => select(&EXTREMES[..]),
        3 => -10.0f32..10.0,
        2 => POSITIVE | NEGATIVE | NORMAL | SUBNORMAL | ZERO,
    ]
}

/// `len` values: all ordinary (so that results are often in range), or mixed with extremes.
fn tensor(len: usize) -> impl Strategy<Value = Vec<f32>> {
    prop_oneof![vec(-10.0f32..10.0, len), vec(value(), len)]
}

fn is_out_of_range<T>(r: &Result<T>) -> bool {
    matches!(r, Err(EngineError::OutOfRange(_)))
}

/// The property itself: Ok with every value finite, or OutOfRange.
fn finite_or_out_of_range(what: &str, r: &Result<Vec<f32>>) -> TestCaseResult {
    match r {
        Ok(v) => prop_assert!(v.iter().all(|x| x.is_finite()), "{what}: {v:?}"),
        Err(e) => prop_assert!(is_out_of_range(r), "{what}: unexpected error {e}"),
    }
    Ok(())
}

/// Several results of one call.
fn all_finite_or_out_of_range(what: &str, r: Result<Vec<Vec<f32>>>) -> TestCaseResult {
    match r {
        Ok(parts) => {
            for p in parts {
                finite_or_out_of_range(what, &Ok(p))?;
            }
            Ok(())
        }
        Err(e) => finite_or_out_of_range(what, &Err(e)),
    }
}

/// A float64 reference value and the magnitude of the terms it was formed from (its error
/// is judged relative to them: a sum that cancels has no relative accuracy of its own).
#[derive(Clone, Copy, Debug)]
struct Reference {
    value: f64,
    scale: f64,
}

/// Within 1e-6 of float32's limit, rounding decides whether a value is representable.
fn near_limit(v: f64) -> bool {
    (v.abs() / f32::MAX as f64 - 1.0).abs() < 1e-6
}

/// Compares a kernel's results with float64 references: OutOfRange exactly when a reference
/// is beyond float32 (either way at the limit), otherwise within 1e-5 of the terms' scale.
fn matches_reference(
    what: &str,
    got: Result<Vec<Vec<f32>>>,
    want: &[Vec<Reference>],
) -> TestCaseResult {
    let flat = || want.iter().flatten();
    let at_limit = flat().any(|r| near_limit(r.value));
    let representable = flat().all(|r| (r.value as f32).is_finite());
    match got {
        Err(EngineError::OutOfRange(_)) => {
            prop_assert!(
                at_limit || !representable,
                "{what}: OutOfRange for {want:?}"
            )
        }
        Err(e) => prop_assert!(false, "{what}: unexpected error {e}"),
        Ok(parts) => {
            prop_assert!(at_limit || representable, "{what}: Ok for {want:?}");
            for (got, want) in parts.iter().zip(want) {
                for (g, r) in got.iter().zip(want) {
                    let tol = 1e-5 * r.scale + 1e-44;
                    prop_assert!(g.is_finite(), "{what}: {got:?}");
                    prop_assert!(
                        (*g as f64 - r.value).abs() <= tol,
                        "{what}: {g} vs {r:?} in {got:?}"
                    );
                }
            }
        }
    }
    Ok(())
}

/// Mean and 1/sqrt(var + eps) of one row in float64, directly from the definition.
fn row_stats(x: &[f32], eps: f32) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean, 1.0 / (var + eps as f64).sqrt())
}

fn layernorm_reference(x: &[f32], g: &[f32], b: &[f32], eps: f32) -> Vec<Reference> {
    x.chunks(g.len())
        .flat_map(|row| {
            let (mean, rstd) = row_stats(row, eps);
            row.iter().zip(g).zip(b).map(move |((&x, &g), &b)| {
                let scaled = (x as f64 - mean) * rstd * g as f64;
                Reference {
                    value: scaled + b as f64,
                    scale: scaled.abs() + (b as f64).abs(),
                }
            })
        })
        .collect()
}

/// dx, dgamma and dbeta of LayerNorm in float64.
fn layernorm_backward_reference(x: &[f32], dy: &[f32], g: &[f32], eps: f32) -> Vec<Vec<Reference>> {
    let c = g.len();
    let mut dx = Vec::new();
    let (mut dgamma, mut dbeta) = (vec![(0.0, 0.0); c], vec![(0.0, 0.0); c]);
    for (row, dy) in x.chunks(c).zip(dy.chunks(c)) {
        let (mean, rstd) = row_stats(row, eps);
        let norm: Vec<f64> = row.iter().map(|&v| (v as f64 - mean) * rstd).collect();
        let dnorm: Vec<f64> = dy
            .iter()
            .zip(g)
            .map(|(&d, &g)| d as f64 * g as f64)
            .collect();
        let mean_of = |f: &dyn Fn(usize) -> f64| (0..c).map(f).sum::<f64>() / c as f64;
        let (md, mdn) = (mean_of(&|i| dnorm[i]), mean_of(&|i| dnorm[i] * norm[i]));
        let (md_abs, mdn_abs) = (
            mean_of(&|i| dnorm[i].abs()),
            mean_of(&|i| (dnorm[i] * norm[i]).abs()),
        );
        for i in 0..c {
            dx.push(Reference {
                value: rstd * (dnorm[i] - md - norm[i] * mdn),
                scale: rstd * (dnorm[i].abs() + md_abs + norm[i].abs() * mdn_abs),
            });
            let t = dy[i] as f64 * norm[i];
            dgamma[i] = (dgamma[i].0 + t, dgamma[i].1 + t.abs());
            dbeta[i] = (dbeta[i].0 + dy[i] as f64, dbeta[i].1 + (dy[i] as f64).abs());
        }
    }
    let refs = |v: Vec<(f64, f64)>| {
        v.into_iter()
            .map(|(value, scale)| Reference { value, scale })
            .collect()
    };
    vec![dx, refs(dgamma), refs(dbeta)]
}

/// Rows × cols, the matrix, and a second tensor of the same shape.
fn matrix_pair() -> impl Strategy<Value = (usize, Vec<f32>, Vec<f32>)> {
    (1usize..4, 1usize..6).prop_flat_map(|(r, c)| (Just(c), tensor(r * c), tensor(r * c)))
}

fn eps() -> impl Strategy<Value = f32> {
    select(vec![1e-5f32, 1e-12, 1e-45, 1.0, 3e38])
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn layernorm_matches_float64((c, x, _) in matrix_pair(), gb in tensor(12), eps in eps()) {
        let (g, b) = (&gb[..c], &gb[6..6 + c]);
        let got = layernorm::layernorm_forward(&x, g, b, eps).map(|y| vec![y]);
        matches_reference("layernorm", got, &[layernorm_reference(&x, g, b, eps)])?;
    }

    #[test]
    fn layernorm_into_a_buffer((c, x, _) in matrix_pair(), gb in tensor(12), eps in eps()) {
        let mut y = vec![f32::NAN; x.len()];
        let r = layernorm::layernorm_into(&mut y, &x, &gb[..c], &gb[6..6 + c], eps).map(|()| y);
        finite_or_out_of_range("layernorm_into", &r)?;
    }

    #[test]
    fn layernorm_backward_matches_float64(
        (c, x, dy) in matrix_pair(),
        g in tensor(6),
        eps in eps(),
    ) {
        let g = &g[..c];
        let got = layernorm::layernorm_backward(&x, &dy, g, eps)
            .map(|r| vec![r.dx, r.dgamma, r.dbeta]);
        let want = layernorm_backward_reference(&x, &dy, g, eps);
        matches_reference("layernorm_backward", got, &want)?;
    }

    #[test]
    fn elementwise((c, a, b) in matrix_pair()) {
        finite_or_out_of_range("add", &elementwise::add(&a, &b))?;
        finite_or_out_of_range("add bias", &elementwise::add(&a, &b[..c]))?;
        finite_or_out_of_range("gelu", &Ok(elementwise::gelu_forward(&a)))?;
        finite_or_out_of_range("gelu_backward", &elementwise::gelu_backward(&a, &b))?;
        let t = elementwise::transpose(&a, a.len() / c, c);
        prop_assert_eq!(elementwise::transpose(&t.unwrap(), c, a.len() / c).unwrap(), a);
    }

    #[test]
    fn softmax((c, x, dy) in matrix_pair()) {
        let y = softmax::softmax_forward(&x, c);
        finite_or_out_of_range("softmax", &y)?;
        let mut inplace = x.clone();
        softmax::softmax_rows_inplace(&mut inplace, c).unwrap();
        prop_assert_eq!(&inplace, y.as_ref().unwrap());
        // Any finite y, not only a softmax output, as SQL callers may pass.
        finite_or_out_of_range("softmax_backward", &softmax::softmax_backward(&x, &dy, c))?;
        finite_or_out_of_range("softmax_backward", &softmax::softmax_backward(&inplace, &dy, c))?;
    }

    #[test]
    fn dropout(
        (_, x, dy) in matrix_pair(),
        p in select(vec![0.0f32, 1e-7, 0.5, 0.9, 0.999_999_9, 1.0]),
        training: bool,
        seed: i64,
    ) {
        let y = dropout::dropout_forward(&x, p, training, &mut rng_from_seed(Some(seed)));
        finite_or_out_of_range("dropout", &y)?;
        let y = y.unwrap_or_else(|_| x.clone());
        let dx = dropout::dropout_backward(&x, &y, &dy, p, training);
        finite_or_out_of_range("dropout_backward", &dx)?;
    }

    #[test]
    fn cross_entropy(logits in (1usize..8).prop_flat_map(tensor), target in 0usize..8) {
        let target = (target % logits.len()) as i64;
        let loss = cross_entropy::cross_entropy_forward(&logits, target).map(|l| vec![l]);
        finite_or_out_of_range("cross_entropy", &loss)?;
        let grad = cross_entropy::cross_entropy_backward(&logits, target);
        finite_or_out_of_range("cross_entropy_backward", &grad)?;
        prop_assert!(cross_entropy::logsumexp(&logits).is_finite());
    }

    #[test]
    fn matmul_product(
        (m, k, n, a, b) in (1usize..7, 1usize..5, 1usize..5)
            .prop_flat_map(|(m, k, n)| (Just(m), Just(k), Just(n), tensor(m * k), tensor(k * n)))
    ) {
        finite_or_out_of_range("matmul", &matmul::matmul(&a, &b, m, k, n, Cancel::NEVER))?;
    }

    #[test]
    fn attention_block(
        (t, n_head, d, v) in (1usize..4, 1usize..3, 1usize..3)
            .prop_flat_map(|(t, h, dh)| {
                let d = h * dh;
                (Just(t), Just(h), Just(d), tensor(2 * t * d + 4 * d * d + 4 * d))
            })
    ) {
        // One draw split into x, w_qkv, b_qkv, w_o, b_o and dy.
        let mut parts = Vec::new();
        let mut rest = &v[..];
        for len in [t * d, 3 * d * d, 3 * d, d * d, d, t * d] {
            let (head, tail) = rest.split_at(len);
            parts.push(head);
            rest = tail;
        }
        let [x, w_qkv, b_qkv, w_o, b_o, dy] = parts[..] else {
            unreachable!("six parts")
        };
        let w = AttnBlockWeights { w_qkv, b_qkv, w_o, b_o };
        let y = attention_block_forward(x, w, t, d, n_head, Cancel::NEVER);
        finite_or_out_of_range("attention", &y)?;
        let g = attention_block_backward(x, w, dy, t, d, n_head, Cancel::NEVER)
            .map(|g| vec![g.dx, g.dw_qkv, g.db_qkv, g.dw_o, g.db_o]);
        all_finite_or_out_of_range("attention_backward", g)?;
    }

    #[test]
    fn adamw_step(
        (_, w, g) in matrix_pair(),
        mv in vec(value(), 30),
        lr in select(vec![0.0f32, 1e-3, 1.0, 1e30, 3e38]),
        beta1 in select(vec![0.0f32, 0.9, 0.999_999_94]),
        beta2 in select(vec![0.0f32, 0.95, 0.999]),
        eps in select(vec![1e-8f32, 1e-45, 1.0, 3e38]),
        weight_decay in select(vec![0.0f32, 0.1, 1e30]),
        step in select(vec![1i64, 2, 1000, i32::MAX as i64]),
    ) {
        let opt = AdamW { lr, beta1, beta2, eps, weight_decay };
        let n = w.len();
        let (mut w, mut m) = (w, mv[..n].to_vec());
        // The second moment is never negative (the SQL function refuses one).
        let mut v: Vec<f32> = mv[15..15 + n].iter().map(|x| x.abs()).collect();
        let r = opt
            .step(&mut w, &g, &mut m, &mut v, step, Cancel::NEVER)
            .map(|()| vec![w, m, v]);
        all_finite_or_out_of_range("adamw", r)?;
    }

    #[test]
    fn grad_norm_and_clip(
        (_, g, _) in matrix_pair(),
        clip in select(vec![1e-45f32, 1e-30, 1.0, 3e38]),
    ) {
        prop_assert!(optim::grad_norm(&g).is_finite());
        let mut clipped = g.clone();
        let norm = optim::clip_grad_norm(&mut clipped, clip).unwrap();
        prop_assert_eq!(norm, optim::grad_norm(&g));
        // Clipped to clip·norm/(norm + 1e-6) (not to zero when that factor is below float32's
        // range), up to rounding: relative, and half a subnormal step per value.
        let want = norm * (clip as f64 / (norm + 1e-6)).min(1.0);
        let tol = 1e-5 * want + 1e-45 * (g.len() as f64).sqrt();
        prop_assert!((optim::grad_norm(&clipped) - want).abs() <= tol, "{clipped:?}");
        finite_or_out_of_range("clip", &Ok(clipped))?;
    }
}
