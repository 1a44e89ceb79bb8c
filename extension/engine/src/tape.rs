//! The autograd tape of the relational path: tensor kernels called from SQL record themselves
//! (operation, inputs, output) while autograd mode is on, and `Tape::backward` replays the
//! records in reverse, giving every recorded tensor that depends on a parameter its gradient.
//!
//! Identity: a SQL kernel receives values, not references, so the tape knows a tensor by its
//! content. An input is the most recently recorded tensor holding exactly the same float32
//! bits: a parameter fetched with `llm_param_tensor`, a watched input, or an earlier kernel's
//! output. An input that matches none is a constant (it gets no gradient). "Most recent" is
//! what makes parameters with equal values (zero biases, unit LayerNorm gains) distinct: each
//! fetch records a new tensor, and the kernel it is passed to uses that one.

use std::collections::HashMap;

use crate::error::{EngineError, Result};
use crate::kernels::attention::{
    attention_block_backward, causal_attention_backward, AttnBlockWeights, AttnOptions, AttnShape,
};
use crate::kernels::linear::{bias_backward, linear_backward};
use crate::kernels::matmul::{gemm, Accumulate, MatRef, Threads};
use crate::kernels::{cross_entropy, dropout, elementwise, embedding, layernorm, softmax};
use crate::parallel::Cancel;
use crate::tensor;

/// Index of a tensor on the tape.
pub type TensorId = usize;

/// Where a recorded tensor came from.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    /// A model's parameter; its gradient goes to `llm_param.grad`.
    Param { model: String, name: String },
    /// An input whose gradient was asked for, with an optional label.
    Watched(Option<String>),
    /// A value no recorded kernel produced: no gradient.
    Constant,
    /// The output of a recorded kernel call.
    Output,
}

/// One recorded tensor.
pub struct Node {
    pub data: Vec<f32>,
    pub shape: Vec<usize>,
    pub source: Source,
    /// Whether a parameter or a watched input reaches it, i.e. whether a gradient flows to it.
    pub requires_grad: bool,
    /// dL/d(this tensor) after the last `backward`.
    pub grad: Option<Vec<f32>>,
}

/// A recorded kernel call and the attributes its backward needs.
#[derive(Clone, Debug)]
pub enum Op {
    /// a [m, k] · b [k, n]
    MatMul {
        m: usize,
        k: usize,
        n: usize,
    },
    /// a + b, b broadcast over rows when shorter
    Add,
    Gelu,
    /// softmax of each row of `cols` values
    Softmax {
        cols: usize,
    },
    /// x, gamma, beta
    LayerNorm {
        eps: f32,
    },
    /// mean cross-entropy of the rows of logits against one target each
    CrossEntropy {
        targets: Vec<i64>,
    },
    Dropout {
        p: f32,
        training: bool,
    },
    Transpose {
        rows: usize,
        cols: usize,
    },
    /// x [t, d_in] · w [d_out, d_in]ᵀ (+ b [d_out])
    Linear {
        t: usize,
        d_in: usize,
        d_out: usize,
    },
    /// rows `ids` of a table of `cols` columns
    Embedding {
        ids: Vec<i64>,
        cols: usize,
    },
    /// q, k, v [t, H·dh]
    CausalAttention {
        shape: AttnShape,
        opts: AttnOptions,
    },
    /// pg_gpt2's fused block: x, w_qkv, b_qkv, w_o, b_o
    AttentionBlock {
        n_head: usize,
        t: usize,
        d: usize,
    },
}

impl Op {
    /// The SQL kernel's name without its `pg_llm_` prefix.
    pub fn name(&self) -> &'static str {
        match self {
            Op::MatMul { .. } => "matmul",
            Op::Add => "add",
            Op::Gelu => "gelu",
            Op::Softmax { .. } => "softmax",
            Op::LayerNorm { .. } => "layernorm",
            Op::CrossEntropy { .. } => "cross_entropy",
            Op::Dropout { .. } => "dropout",
            Op::Transpose { .. } => "transpose",
            Op::Linear { .. } => "linear",
            Op::Embedding { .. } => "embedding",
            Op::CausalAttention { .. } => "causal_attention",
            Op::AttentionBlock { .. } => "attention",
        }
    }

    /// The attributes as a JSON object (for the `llm_tape` view).
    pub fn attrs_json(&self) -> String {
        let ids = |v: &[i64]| {
            let s: Vec<String> = v.iter().map(|x| x.to_string()).collect();
            format!("[{}]", s.join(","))
        };
        match self {
            Op::MatMul { m, k, n } => format!(r#"{{"m":{m},"k":{k},"n":{n}}}"#),
            Op::Add | Op::Gelu => "{}".into(),
            Op::Softmax { cols } => format!(r#"{{"cols":{cols}}}"#),
            Op::LayerNorm { eps } => format!(r#"{{"eps":{eps:e}}}"#),
            Op::CrossEntropy { targets } => format!(r#"{{"targets":{}}}"#, ids(targets)),
            Op::Dropout { p, training } => format!(r#"{{"p":{p},"training":{training}}}"#),
            Op::Transpose { rows, cols } => format!(r#"{{"rows":{rows},"cols":{cols}}}"#),
            Op::Linear { t, d_in, d_out } => {
                format!(r#"{{"rows":{t},"d_in":{d_in},"d_out":{d_out}}}"#)
            }
            Op::Embedding { ids: v, cols } => {
                format!(r#"{{"ids":{},"cols":{cols}}}"#, ids(v))
            }
            Op::CausalAttention { shape, opts } => format!(
                r#"{{"n_head":{},"T":{},"window":{},"scale":{}}}"#,
                shape.n_head,
                shape.t,
                opts.window.map_or("null".to_string(), |w| w.to_string()),
                opts.scale
            ),
            Op::AttentionBlock { n_head, t, d } => {
                format!(r#"{{"n_head":{n_head},"T":{t},"D":{d}}}"#)
            }
        }
    }
}

/// A recorded kernel call.
pub struct Record {
    pub op: Op,
    pub inputs: Vec<TensorId>,
    pub output: TensorId,
}

/// A session's tape.
#[derive(Default)]
pub struct Tape {
    nodes: Vec<Node>,
    records: Vec<Record>,
    /// content hash → tensors with that hash, oldest first
    index: HashMap<u64, Vec<TensorId>>,
    bytes: usize,
}

/// FNV-1a over the float32 bit patterns, 64 bits at a time: identity is by exact bits.
fn content_hash(data: &[f32]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ data.len() as u64;
    let mut pairs = data.chunks_exact(2);
    for p in &mut pairs {
        let w = (p[0].to_bits() as u64) | ((p[1].to_bits() as u64) << 32);
        h = (h ^ w).wrapping_mul(0x0000_0100_0000_01b3);
    }
    for v in pairs.remainder() {
        h = (h ^ v.to_bits() as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

fn bytes_of(n: usize) -> usize {
    n * std::mem::size_of::<f32>()
}

impl Tape {
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn records(&self) -> &[Record] {
        &self.records
    }

    /// Memory held by recorded values and gradients.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn clear(&mut self) {
        *self = Tape::default();
    }

    fn push(&mut self, data: Vec<f32>, shape: Vec<usize>, source: Source, grad: bool) -> TensorId {
        let id = self.nodes.len();
        self.bytes += bytes_of(data.len());
        self.index.entry(content_hash(&data)).or_default().push(id);
        self.nodes.push(Node {
            data,
            shape,
            source,
            requires_grad: grad,
            grad: None,
        });
        id
    }

    /// Records a parameter or a watched input: a new tensor even when an equal one exists.
    pub fn leaf(&mut self, data: Vec<f32>, shape: Vec<usize>, source: Source) -> TensorId {
        let grad = !matches!(source, Source::Constant | Source::Output);
        self.push(data, shape, source, grad)
    }

    /// The most recent tensor with exactly these values.
    pub fn find(&self, data: &[f32]) -> Option<TensorId> {
        let candidates = self.index.get(&content_hash(data))?;
        candidates
            .iter()
            .rev()
            .copied()
            .find(|&id| same_bits(&self.nodes[id].data, data))
    }

    fn input(&mut self, data: &[f32]) -> TensorId {
        match self.find(data) {
            Some(id) => id,
            None => self.push(data.to_vec(), vec![data.len()], Source::Constant, false),
        }
    }

    /// Records one kernel call; returns its output's id.
    pub fn record(
        &mut self,
        op: Op,
        inputs: &[&[f32]],
        output: Vec<f32>,
        shape: Vec<usize>,
    ) -> TensorId {
        let inputs: Vec<TensorId> = inputs.iter().map(|x| self.input(x)).collect();
        let grad = inputs.iter().any(|&i| self.nodes[i].requires_grad);
        let output = self.push(output, shape, Source::Output, grad);
        self.records.push(Record { op, inputs, output });
        output
    }

    /// Memory `backward` will add: a gradient for every tensor a gradient reaches.
    pub fn backward_bytes(&self) -> usize {
        let n: usize = self
            .nodes
            .iter()
            .filter(|n| n.requires_grad)
            .map(|n| n.data.len())
            .sum();
        bytes_of(n)
    }

    /// dL/d(every recorded tensor) for L = sum of tensor `from`'s values (a loss is one
    /// value). Gradients of an earlier call are replaced. Returns how many tensors got one.
    pub fn backward(&mut self, from: TensorId, cancel: Cancel) -> Result<usize> {
        let Some(start) = self.nodes.get(from) else {
            return Err(EngineError::UndefinedObject(format!(
                "tensor {from} is not on this session's tape ({} tensors recorded)",
                self.nodes.len()
            )));
        };
        if !start.requires_grad {
            return Err(EngineError::invalid(format!(
                "tensor {from} does not depend on any parameter or watched input, so it has no gradients"
            )));
        }
        let mut grads: Vec<Option<Vec<f32>>> = vec![None; self.nodes.len()];
        grads[from] = Some(vec![1.0; start.data.len()]);
        for rec in self.records.iter().rev().filter(|r| r.output <= from) {
            let Some(dy) = grads[rec.output].take() else {
                continue;
            };
            cancel.check()?;
            let inputs: Vec<&[f32]> = rec
                .inputs
                .iter()
                .map(|&i| &self.nodes[i].data[..])
                .collect();
            let need: Vec<bool> = rec
                .inputs
                .iter()
                .map(|&i| self.nodes[i].requires_grad)
                .collect();
            let out = &self.nodes[rec.output].data;
            let dx = op_backward(&rec.op, &inputs, out, &dy, &need, cancel)?;
            grads[rec.output] = Some(dy);
            for ((&i, g), need) in rec.inputs.iter().zip(dx).zip(&need) {
                let (Some(g), true) = (g, *need) else {
                    continue;
                };
                match &mut grads[i] {
                    Some(acc) => acc.iter_mut().zip(&g).for_each(|(a, b)| *a += b),
                    slot => *slot = Some(g),
                }
            }
        }
        // Checked before any is kept: a failed pass leaves the earlier gradients as they were.
        for g in grads.iter().flatten() {
            tensor::check_result(g, "gradient")?;
        }
        let mut count = 0;
        for (node, g) in self.nodes.iter_mut().zip(grads) {
            if let Some(old) = node.grad.take() {
                self.bytes -= bytes_of(old.len());
            }
            if let Some(g) = g {
                self.bytes += bytes_of(g.len());
                node.grad = Some(g);
                count += 1;
            }
        }
        Ok(count)
    }

    /// Every parameter of `model` that received a gradient, summed over the times it was
    /// fetched (a tied head uses the token embedding twice), in order of first use.
    pub fn param_grads(&self, model: &str) -> Vec<(String, Vec<f32>)> {
        let mut out: Vec<(String, Vec<f32>)> = Vec::new();
        for node in &self.nodes {
            let (Source::Param { model: m, name }, Some(g)) = (&node.source, &node.grad) else {
                continue;
            };
            if m != model {
                continue;
            }
            match out.iter_mut().find(|(n, _)| n == name) {
                Some((_, acc)) if acc.len() == g.len() => {
                    acc.iter_mut().zip(g).for_each(|(a, b)| *a += b)
                }
                Some(_) => {} // the same name fetched with another shape cannot happen
                None => out.push((name.clone(), g.clone())),
            }
        }
        out
    }
}

fn wanted(need: bool, f: impl FnOnce() -> Result<Vec<f32>>) -> Result<Option<Vec<f32>>> {
    if need {
        f().map(Some)
    } else {
        Ok(None)
    }
}

/// Gradients of one kernel call's inputs (`None` where not needed), given its output's.
fn op_backward(
    op: &Op,
    x: &[&[f32]],
    y: &[f32],
    dy: &[f32],
    need: &[bool],
    cancel: Cancel,
) -> Result<Vec<Option<Vec<f32>>>> {
    Ok(match op {
        Op::MatMul { m, k, n } => {
            let (m, k, n) = (*m, *k, *n);
            let da = wanted(need[0], || {
                // dA [m, k] = dY [m, n] · Bᵀ
                let mut da = tensor::alloc_zeroed(m * k)?;
                let b_t = MatRef::transposed(x[1], n, k);
                gemm(
                    &mut da,
                    MatRef::new(dy, m, n),
                    b_t,
                    Accumulate::Overwrite,
                    Threads::Pool,
                );
                Ok(da)
            })?;
            let db = wanted(need[1], || {
                // dB [k, n] = Aᵀ · dY
                let mut db = tensor::alloc_zeroed(k * n)?;
                let a_t = MatRef::transposed(x[0], k, m);
                gemm(
                    &mut db,
                    a_t,
                    MatRef::new(dy, m, n),
                    Accumulate::Overwrite,
                    Threads::Pool,
                );
                Ok(db)
            })?;
            vec![da, db]
        }
        Op::Add => {
            let db = wanted(need[1], || {
                if x[1].len() == dy.len() {
                    return Ok(dy.to_vec());
                }
                let mut db = vec![0.0; x[1].len()];
                bias_backward(&mut db, dy, x[1].len());
                Ok(db)
            })?;
            vec![need[0].then(|| dy.to_vec()), db]
        }
        Op::Gelu => vec![wanted(need[0], || elementwise::gelu_backward(x[0], dy))?],
        Op::Softmax { cols } => {
            vec![wanted(need[0], || softmax::softmax_backward(y, dy, *cols))?]
        }
        Op::LayerNorm { eps } => {
            let g = layernorm::layernorm_backward(x[0], dy, x[1], *eps)?;
            vec![Some(g.dx), Some(g.dgamma), Some(g.dbeta)]
        }
        Op::CrossEntropy { targets } => {
            let mut g = cross_entropy::mean_cross_entropy_backward(x[0], targets)?;
            g.iter_mut().for_each(|v| *v *= dy[0]);
            vec![Some(g)]
        }
        Op::Dropout { p, training } => {
            vec![Some(dropout::dropout_backward(x[0], y, dy, *p, *training)?)]
        }
        Op::Transpose { rows, cols } => {
            vec![Some(elementwise::transpose(dy, *cols, *rows)?)]
        }
        Op::Linear { t, d_in, d_out } => {
            let dims = (*t, *d_in, *d_out);
            let mut dx = tensor::alloc_zeroed(t * d_in)?;
            let mut dw = tensor::alloc_zeroed(d_out * d_in)?;
            cancel.check()?;
            linear_backward(Some(&mut dx), &mut dw, x[0], x[1], dy, dims);
            let mut grads = vec![Some(dx), Some(dw)];
            if x.len() == 3 {
                let mut db = vec![0.0; *d_out];
                bias_backward(&mut db, dy, *d_out);
                grads.push(Some(db));
            }
            grads
        }
        Op::Embedding { ids, cols } => {
            let rows = x[0].len() / cols;
            vec![wanted(need[0], || {
                embedding::embedding_backward(dy, ids, rows, *cols)
            })?]
        }
        Op::CausalAttention { shape, opts } => {
            let [dq, dk, dv] =
                causal_attention_backward(x[0], x[1], x[2], dy, *shape, *opts, cancel)?;
            vec![Some(dq), Some(dk), Some(dv)]
        }
        Op::AttentionBlock { n_head, t, d } => {
            let w = AttnBlockWeights {
                w_qkv: x[1],
                b_qkv: x[2],
                w_o: x[3],
                b_o: x[4],
            };
            let g = attention_block_backward(x[0], w, dy, *t, *d, *n_head, cancel)?;
            vec![
                Some(g.dx),
                Some(g.dw_qkv),
                Some(g.db_qkv),
                Some(g.dw_o),
                Some(g.db_o),
            ]
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{layernorm::layernorm_forward, linear::linear};

    fn param(tape: &mut Tape, name: &str, data: Vec<f32>) -> TensorId {
        let source = Source::Param {
            model: "m".into(),
            name: name.into(),
        };
        tape.leaf(data.clone(), vec![data.len()], source)
    }

    /// mean CE(layernorm(x · wᵀ + b)) on a tiny problem, for central differences.
    fn loss(w: &[f32], b: &[f32], gamma: &[f32], beta: &[f32]) -> f32 {
        let x = [0.3, -1.2, 0.8, 2.0, 0.5, -0.4];
        let h = linear(&x, w, Some(b), 2, 3, 3, Cancel::NEVER).unwrap();
        let z = layernorm_forward(&h, gamma, beta, 1e-5).unwrap();
        let targets = [2i64, 0];
        let l = cross_entropy::mean_cross_entropy(&z, &targets).unwrap();
        l
    }

    #[test]
    fn gradients_match_finite_differences_and_equal_parameters_stay_distinct() {
        let w = vec![0.2, -0.5, 0.1, 0.7, 0.3, -0.2, -0.4, 0.6, 0.9];
        // b and beta are equal (zeros), gamma is ones: the tape must keep them apart.
        let (b, gamma, beta) = (vec![0.0; 3], vec![1.0; 3], vec![0.0; 3]);
        // The forward fetches each parameter right before its kernel, as llm_forward_gpt3 does.
        let mut tape2 = Tape::default();
        let w_id = param(&mut tape2, "w", w.clone());
        let b_id = param(&mut tape2, "b", b.clone());
        let x = [0.3f32, -1.2, 0.8, 2.0, 0.5, -0.4];
        let h = linear(&x, &w, Some(&b), 2, 3, 3, Cancel::NEVER).unwrap();
        let lin = Op::Linear {
            t: 2,
            d_in: 3,
            d_out: 3,
        };
        let h_id = tape2.record(lin, &[&x, &w, &b], h.clone(), vec![2, 3]);
        assert_eq!(tape2.records()[0].inputs, vec![2, w_id, b_id]); // x: a constant
        let g_id = param(&mut tape2, "gamma", gamma.clone());
        let beta_id = param(&mut tape2, "beta", beta.clone());
        let z = layernorm_forward(&h, &gamma, &beta, 1e-5).unwrap();
        tape2.record(
            Op::LayerNorm { eps: 1e-5 },
            &[&h, &gamma, &beta],
            z.clone(),
            vec![2, 3],
        );
        assert_eq!(tape2.records()[1].inputs, vec![h_id, g_id, beta_id]);
        let l = cross_entropy::mean_cross_entropy(&z, &[2, 0]).unwrap();
        let out = tape2.record(
            Op::CrossEntropy {
                targets: vec![2, 0],
            },
            &[&z],
            vec![l],
            vec![1],
        );
        tape2.backward(out, Cancel::NEVER).unwrap();
        let grads = tape2.param_grads("m");
        let names: Vec<&str> = grads.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["w", "b", "gamma", "beta"]);

        let params = [w.clone(), b.clone(), gamma.clone(), beta.clone()];
        for (p, (name, g)) in grads.iter().enumerate() {
            for i in 0..params[p].len() {
                let at = |h: f32| {
                    let mut q = params.clone();
                    q[p][i] += h;
                    loss(&q[0], &q[1], &q[2], &q[3]) as f64
                };
                let fd = (at(1e-2) - at(-1e-2)) / 2e-2;
                assert!(
                    (g[i] as f64 - fd).abs() < 2e-3,
                    "{name}[{i}]: {} vs {fd}",
                    g[i]
                );
            }
        }
    }

    #[test]
    fn a_constant_result_has_no_gradient_and_unknown_ids_are_refused() {
        let mut tape = Tape::default();
        let y = tape.record(Op::Gelu, &[&[1.0, 2.0]], vec![0.8, 1.9], vec![2]);
        assert!(matches!(
            tape.backward(y, Cancel::NEVER),
            Err(EngineError::InvalidParameter(_))
        ));
        assert!(matches!(
            tape.backward(99, Cancel::NEVER),
            Err(EngineError::UndefinedObject(_))
        ));
    }

    #[test]
    fn matmul_and_embedding_gradients() {
        let mut tape = Tape::default();
        let a = vec![1.0, 2.0, 3.0, 4.0]; // [2, 2]
        let b = vec![0.5, -1.0, 2.0, 0.25]; // [2, 2]
        tape.leaf(a.clone(), vec![2, 2], Source::Watched(None));
        tape.leaf(b.clone(), vec![2, 2], Source::Watched(None));
        let y = crate::kernels::matmul::matmul(&a, &b, 2, 2, 2, Cancel::NEVER).unwrap();
        let out = tape.record(Op::MatMul { m: 2, k: 2, n: 2 }, &[&a, &b], y, vec![2, 2]);
        tape.backward(out, Cancel::NEVER).unwrap();
        // L = Σ A·B: dA = 1·Bᵀ (row sums of B), dB = Aᵀ·1 (column sums of A)
        assert_eq!(
            tape.nodes()[0].grad.as_deref(),
            Some(&[-0.5, 2.25, -0.5, 2.25][..])
        );
        assert_eq!(
            tape.nodes()[1].grad.as_deref(),
            Some(&[4.0, 4.0, 6.0, 6.0][..])
        );

        let mut tape = Tape::default();
        let table = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        tape.leaf(table.clone(), vec![3, 2], Source::Watched(None));
        let e = embedding::embedding(&table, &[2, 2, 0], 2).unwrap();
        let out = tape.record(
            Op::Embedding {
                ids: vec![2, 2, 0],
                cols: 2,
            },
            &[&table],
            e,
            vec![3, 2],
        );
        tape.backward(out, Cancel::NEVER).unwrap();
        assert_eq!(
            tape.nodes()[0].grad.as_deref(),
            Some(&[1.0, 1.0, 0.0, 0.0, 2.0, 2.0][..])
        );
    }
}
