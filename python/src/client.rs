//! `pg_gpt3_client._native.Client`: the Rust client's calls with Python arguments. Each call
//! releases the GIL while it waits for the server, and Ctrl-C cancels it (runtime::wait).

use std::sync::Arc;

use futures_util::StreamExt;
use numpy::{IntoPyArray, PyArray2};
use pg_gpt3_client as rust;
use pg_gpt3_client::{
    BeamOptions, CancelHandle, DatasetOptions, GenerateOptions, RowsOf, StepOptions, TrainOptions,
    DEFAULT_MODEL,
};
use pyo3::exceptions::{PyRuntimeError, PyStopIteration, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use tokio::sync::Mutex;

use crate::runtime::{runtime, wait};

/// A connection to a database with pg_llm.
#[pyclass(subclass, frozen, module = "pg_gpt3_client._native")]
pub struct Client {
    inner: Arc<Mutex<Option<rust::Client>>>,
    cancel: CancelHandle,
}

impl Client {
    /// Runs `f` on the open connection (ValueError-free RuntimeError once closed).
    fn call<T: Send>(
        &self,
        py: Python<'_>,
        f: impl for<'c> FnOnce(
                &'c mut rust::Client,
            ) -> std::pin::Pin<
                Box<dyn std::future::Future<Output = Result<T, rust::Error>> + Send + 'c>,
            > + Send,
    ) -> PyResult<T> {
        let inner = self.inner.clone();
        let result = wait(py, Some(&self.cancel), async move {
            let mut guard = inner.lock().await;
            match guard.as_mut() {
                Some(client) => f(client).await.map(Some),
                None => Ok(None),
            }
        })?;
        result.ok_or_else(|| PyRuntimeError::new_err("the client is closed"))
    }
}

fn generate_options(
    max_tokens: i32,
    temperature: f32,
    top_k: i32,
    top_p: f32,
    model: String,
    eos_token: Option<i32>,
    seed: Option<i64>,
) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        temperature,
        top_k,
        top_p,
        model,
        eos_token,
        seed,
    }
}

#[pymethods]
impl Client {
    /// Connects to `dsn` (a libpq connection string or URL; default: $PG_GPT3_DSN).
    #[new]
    #[pyo3(signature = (dsn=None))]
    fn new(py: Python<'_>, dsn: Option<String>) -> PyResult<Self> {
        let dsn = match dsn.or_else(|| std::env::var("PG_GPT3_DSN").ok()) {
            Some(d) => d,
            None => {
                return Err(PyValueError::new_err(
                    "no connection string: pass Client(dsn) or set PG_GPT3_DSN",
                ))
            }
        };
        let client = wait(py, None, async move { rust::Client::connect(&dsn).await })?;
        let cancel = client.canceller();
        Ok(Self {
            inner: Arc::new(Mutex::new(Some(client))),
            cancel,
        })
    }

    /// Closes the connection; later calls raise RuntimeError.
    fn close(&self, py: Python<'_>) {
        let inner = self.inner.clone();
        py.detach(|| runtime().block_on(async move { inner.lock().await.take() }));
    }

    /// Whether `close` was called.
    #[getter]
    fn closed(&self, py: Python<'_>) -> bool {
        let inner = self.inner.clone();
        py.detach(|| runtime().block_on(async move { inner.lock().await.is_none() }))
    }

    /// Asks the server to cancel the call running on this connection, from any thread (the
    /// call then raises CancelledError); a no-op when none runs.
    fn cancel(&self, py: Python<'_>) -> PyResult<()> {
        let cancel = self.cancel.clone();
        wait(py, None, async move { cancel.cancel().await })
    }

    /// The rows of one SQL query as dicts of column name → value (numbers, text, bytes,
    /// json, arrays, datetimes; cast other types in the query). For looking at what pg_gpt3
    /// keeps in tables (llm_param, llm_train_log, ...), e.g. into pandas:
    /// `pandas.DataFrame(db.query("SELECT * FROM llm_train_log"))`.
    fn query<'py>(&self, py: Python<'py>, sql: String) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let rows = self.call(py, move |c| {
            Box::pin(async move { Ok(c.raw().query(sql.as_str(), &[]).await?) })
        })?;
        rows.iter().map(|r| crate::rows::to_dict(py, r)).collect()
    }

    /// Runs SQL statements (setup in scripts and tests).
    fn execute(&self, py: Python<'_>, sql: String) -> PyResult<()> {
        self.call(py, move |c| Box::pin(async move { c.execute(&sql).await }))
    }

    /// The continuation of `prompt` (llm_generate).
    #[pyo3(signature = (prompt, max_tokens=64, temperature=1.0, top_k=50, top_p=0.95,
                        model=DEFAULT_MODEL.to_string(), eos_token=Some(50256), seed=None))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &self,
        py: Python<'_>,
        prompt: String,
        max_tokens: i32,
        temperature: f32,
        top_k: i32,
        top_p: f32,
        model: String,
        eos_token: Option<i32>,
        seed: Option<i64>,
    ) -> PyResult<String> {
        let opts = generate_options(
            max_tokens,
            temperature,
            top_k,
            top_p,
            model,
            eos_token,
            seed,
        );
        self.call(py, move |c| {
            Box::pin(async move { c.generate(&prompt, &opts).await })
        })
    }

    /// The token ids continuing `ids` (llm_generate_ids).
    #[pyo3(signature = (ids, max_tokens=64, temperature=1.0, top_k=50, top_p=0.95,
                        model=DEFAULT_MODEL.to_string(), eos_token=Some(50256), seed=None))]
    #[allow(clippy::too_many_arguments)]
    fn generate_ids(
        &self,
        py: Python<'_>,
        ids: Vec<i32>,
        max_tokens: i32,
        temperature: f32,
        top_k: i32,
        top_p: f32,
        model: String,
        eos_token: Option<i32>,
        seed: Option<i64>,
    ) -> PyResult<Vec<i32>> {
        let opts = generate_options(
            max_tokens,
            temperature,
            top_k,
            top_p,
            model,
            eos_token,
            seed,
        );
        self.call(py, move |c| {
            Box::pin(async move { c.generate_ids(&ids, &opts).await })
        })
    }

    /// An iterator of StreamEvent, each yielded as the server produces the token
    /// (llm_generate_stream). Closing or dropping it early cancels the generation.
    #[pyo3(signature = (prompt, max_tokens=64, temperature=1.0, top_k=50, top_p=0.95,
                        model=DEFAULT_MODEL.to_string(), eos_token=Some(50256), seed=None))]
    #[allow(clippy::too_many_arguments)]
    fn stream(
        &self,
        py: Python<'_>,
        prompt: String,
        max_tokens: i32,
        temperature: f32,
        top_k: i32,
        top_p: f32,
        model: String,
        eos_token: Option<i32>,
        seed: Option<i64>,
    ) -> PyResult<TokenStream> {
        let opts = generate_options(
            max_tokens,
            temperature,
            top_k,
            top_p,
            model,
            eos_token,
            seed,
        );
        let rows = self.call(py, move |c| {
            Box::pin(async move { c.generate_stream(&prompt, &opts).await })
        })?;
        Ok(TokenStream(Rows::new(rows, self.cancel.clone())))
    }

    /// The best continuations by beam search (llm_beam_search): a list of dicts with rank,
    /// score, token_ids and text, best first.
    #[pyo3(signature = (prompt, beam_width=4, max_tokens=32, model=DEFAULT_MODEL.to_string(),
                        length_penalty=1.0))]
    fn beam_search<'py>(
        &self,
        py: Python<'py>,
        prompt: String,
        beam_width: i32,
        max_tokens: i32,
        model: String,
        length_penalty: f32,
    ) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let opts = BeamOptions {
            beam_width,
            max_tokens,
            model,
            length_penalty,
        };
        let beams = self.call(py, move |c| {
            Box::pin(async move { c.beam_search(&prompt, &opts).await })
        })?;
        beams
            .into_iter()
            .map(|b| {
                let d = PyDict::new(py);
                d.set_item("rank", b.rank)?;
                d.set_item("score", b.score)?;
                d.set_item("token_ids", b.token_ids)?;
                d.set_item("text", b.text)?;
                Ok(d)
            })
            .collect()
    }

    /// `text` as token ids (llm_encode).
    #[pyo3(signature = (text, model=DEFAULT_MODEL.to_string()))]
    fn encode(&self, py: Python<'_>, text: String, model: String) -> PyResult<Vec<i32>> {
        self.call(py, move |c| {
            Box::pin(async move { c.encode(&text, &model).await })
        })
    }

    /// Token ids back to text (llm_decode).
    #[pyo3(signature = (ids, model=DEFAULT_MODEL.to_string()))]
    fn decode(&self, py: Python<'_>, ids: Vec<i32>, model: String) -> PyResult<String> {
        self.call(py, move |c| {
            Box::pin(async move { c.decode(&ids, &model).await })
        })
    }

    /// float32 logits [T, vocab] as a NumPy array (llm_logits, fetched in binary).
    #[pyo3(signature = (ids, model=DEFAULT_MODEL.to_string()))]
    fn logits<'py>(
        &self,
        py: Python<'py>,
        ids: Vec<i32>,
        model: String,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let logits = self.call(py, move |c| {
            Box::pin(async move { c.logits(&ids, &model).await })
        })?;
        Ok(logits.into_pyarray(py))
    }

    /// Mean cross-entropy predicting `targets` from `tokens` (llm_loss): one sequence (a list
    /// of ids) or a batch (a list of equal-length sequences, or a 2-D array).
    #[pyo3(signature = (tokens, targets, model=DEFAULT_MODEL.to_string()))]
    fn loss(
        &self,
        py: Python<'_>,
        tokens: &Bound<'_, PyAny>,
        targets: &Bound<'_, PyAny>,
        model: String,
    ) -> PyResult<f32> {
        let (tokens, targets) = (matrix(tokens)?, matrix(targets)?);
        self.call(py, move |c| {
            Box::pin(async move { c.loss(&tokens, &targets, &model).await })
        })
    }

    /// One AdamW step (llm_train_step); returns the loss before the update.
    #[pyo3(signature = (tokens, targets, lr, model=DEFAULT_MODEL.to_string(), beta1=0.9,
                        beta2=0.95, eps=1e-8, wd=0.1, grad_clip=1.0))]
    #[allow(clippy::too_many_arguments)]
    fn train_step(
        &self,
        py: Python<'_>,
        tokens: &Bound<'_, PyAny>,
        targets: &Bound<'_, PyAny>,
        lr: f32,
        model: String,
        beta1: f32,
        beta2: f32,
        eps: f32,
        wd: f32,
        grad_clip: f32,
    ) -> PyResult<f32> {
        let (tokens, targets) = (matrix(tokens)?, matrix(targets)?);
        let opts = StepOptions {
            model,
            lr,
            beta1,
            beta2,
            eps,
            wd,
            grad_clip,
        };
        self.call(py, move |c| {
            Box::pin(async move { c.train_step(&tokens, &targets, &opts).await })
        })
    }

    /// An iterator of TrainStep records, each yielded as the server ends the step
    /// (llm_train). Closing it early cancels the run, which then changes nothing.
    #[pyo3(signature = (model=DEFAULT_MODEL.to_string(), n_steps=1, batch_size=1, seq_len=None,
                        lr_max=6e-4, warmup=0, beta1=0.9, beta2=0.95, eps=1e-8, wd=0.1,
                        grad_clip=1.0, dropout_p=0.0, seed=0))]
    #[allow(clippy::too_many_arguments)]
    fn train_stream(
        &self,
        py: Python<'_>,
        model: String,
        n_steps: i32,
        batch_size: i32,
        seq_len: Option<i32>,
        lr_max: f32,
        warmup: i32,
        beta1: f32,
        beta2: f32,
        eps: f32,
        wd: f32,
        grad_clip: f32,
        dropout_p: f32,
        seed: i64,
    ) -> PyResult<TrainSteps> {
        let opts = TrainOptions {
            model,
            n_steps,
            batch_size,
            seq_len,
            lr_max,
            warmup,
            beta1,
            beta2,
            eps,
            wd,
            grad_clip,
            dropout_p,
            seed,
        };
        let rows = self.call(py, move |c| Box::pin(async move { c.train(&opts).await }))?;
        Ok(TrainSteps(Rows::new(rows, self.cancel.clone())))
    }

    /// Mean loss, perplexity, sequences and tokens over a dataset split (llm_eval), as a dict.
    #[pyo3(signature = (model=DEFAULT_MODEL.to_string(), split="validation".to_string()))]
    fn eval<'py>(
        &self,
        py: Python<'py>,
        model: String,
        split: String,
    ) -> PyResult<Bound<'py, PyDict>> {
        let e = self.call(py, move |c| {
            Box::pin(async move { c.eval(&model, &split).await })
        })?;
        let d = PyDict::new(py);
        d.set_item("loss", e.loss)?;
        d.set_item("perplexity", e.perplexity)?;
        d.set_item("sequences", e.sequences)?;
        d.set_item("tokens", e.tokens)?;
        Ok(d)
    }

    /// Loads a BPE tokenizer from local files (encoder.json / vocab.json and vocab.bpe /
    /// merges.txt); returns the vocabulary size (llm_load_tokenizer).
    #[pyo3(signature = (vocab, merges, model=DEFAULT_MODEL.to_string()))]
    fn load_tokenizer(
        &self,
        py: Python<'_>,
        vocab: std::path::PathBuf,
        merges: std::path::PathBuf,
        model: String,
    ) -> PyResult<i32> {
        self.call(py, move |c| {
            Box::pin(async move { c.load_tokenizer(&model, &vocab, &merges).await })
        })
    }

    /// Tokenizes `text` on the server and adds rows of `block_size` tokens to the model's
    /// dataset (llm_dataset_from_text); returns the rows added.
    #[pyo3(signature = (text, model=DEFAULT_MODEL.to_string(), block_size=2048, stride=None,
                        split="train".to_string()))]
    fn dataset_from_text(
        &self,
        py: Python<'_>,
        text: String,
        model: String,
        block_size: i32,
        stride: Option<i32>,
        split: String,
    ) -> PyResult<i64> {
        let opts = DatasetOptions {
            model,
            block_size,
            stride,
            split,
        };
        self.call(py, move |c| {
            Box::pin(async move { c.dataset_from_text(&text, &opts).await })
        })
    }

    /// Adds blocks of T+1 token ids (T tokens and the next) with one binary COPY; returns
    /// the rows added.
    #[pyo3(signature = (blocks, model=DEFAULT_MODEL.to_string(), split="train".to_string()))]
    fn dataset_upload_tokens(
        &self,
        py: Python<'_>,
        blocks: Vec<Vec<i32>>,
        model: String,
        split: String,
    ) -> PyResult<u64> {
        self.call(py, move |c| {
            Box::pin(async move { c.dataset_upload_tokens(&model, &split, &blocks).await })
        })
    }

    /// Uploads a Hugging Face checkpoint (a .safetensors file, an index, a manifest or a
    /// folder) from this machine into `model`; returns the parameters imported.
    #[pyo3(signature = (path, model=DEFAULT_MODEL.to_string()))]
    fn import_checkpoint(
        &self,
        py: Python<'_>,
        path: std::path::PathBuf,
        model: String,
    ) -> PyResult<i64> {
        self.call(py, move |c| {
            Box::pin(async move { c.import_checkpoint(&path, &model).await })
        })
    }

    /// Downloads `model` into the folder `path` as a checkpoint `from_pretrained` loads;
    /// returns {file name: bytes}.
    #[pyo3(signature = (path, model=DEFAULT_MODEL.to_string()))]
    fn export_checkpoint<'py>(
        &self,
        py: Python<'py>,
        path: std::path::PathBuf,
        model: String,
    ) -> PyResult<Bound<'py, PyDict>> {
        let files = self.call(py, move |c| {
            Box::pin(async move { c.export_checkpoint(&path, &model).await })
        })?;
        let d = PyDict::new(py);
        for f in files {
            d.set_item(f.name, f.bytes)?;
        }
        Ok(d)
    }

    /// Saves weights and optimizer state in the database (llm_checkpoint_save); returns its id.
    #[pyo3(signature = (model=DEFAULT_MODEL.to_string(), note=None))]
    fn checkpoint_save(
        &self,
        py: Python<'_>,
        model: String,
        note: Option<String>,
    ) -> PyResult<i32> {
        self.call(py, move |c| {
            Box::pin(async move { c.checkpoint_save(&model, note.as_deref()).await })
        })
    }

    /// Restores an in-database checkpoint (llm_checkpoint_load).
    #[pyo3(signature = (checkpoint_id, model=DEFAULT_MODEL.to_string()))]
    fn checkpoint_load(&self, py: Python<'_>, checkpoint_id: i32, model: String) -> PyResult<()> {
        self.call(py, move |c| {
            Box::pin(async move { c.checkpoint_load(&model, checkpoint_id).await })
        })
    }

    /// The model's in-database checkpoints, oldest first, as dicts.
    #[pyo3(signature = (model=DEFAULT_MODEL.to_string()))]
    fn checkpoints<'py>(
        &self,
        py: Python<'py>,
        model: String,
    ) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let list = self.call(py, move |c| {
            Box::pin(async move { c.checkpoints(&model).await })
        })?;
        list.into_iter()
            .map(|k| {
                let d = PyDict::new(py);
                d.set_item("id", k.id)?;
                d.set_item("model", k.model)?;
                d.set_item("note", k.note)?;
                d.set_item("step", k.step)?;
                d.set_item("n_params", k.n_params)?;
                let secs = k
                    .created_at
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0);
                d.set_item("created_at", secs)?;
                Ok(d)
            })
            .collect()
    }

    /// The registry row of `model` as a dict (llm_get_model_config).
    #[pyo3(signature = (model=DEFAULT_MODEL.to_string()))]
    fn model_config<'py>(&self, py: Python<'py>, model: String) -> PyResult<Bound<'py, PyDict>> {
        let c = self.call(py, move |c| {
            Box::pin(async move { c.model_config(&model).await })
        })?;
        let d = PyDict::new(py);
        d.set_item("model", c.model)?;
        d.set_item("n_layer", c.n_layer)?;
        d.set_item("n_head", c.n_head)?;
        d.set_item("d_model", c.d_model)?;
        d.set_item("d_head", c.d_head)?;
        d.set_item("d_ff", c.d_ff)?;
        d.set_item("n_positions", c.n_positions)?;
        d.set_item("vocab", c.vocab)?;
        d.set_item("activation", c.activation)?;
        d.set_item("attention_pattern", c.attention_pattern)?;
        d.set_item("local_window", c.local_window)?;
        d.set_item("family", c.family)?;
        Ok(d)
    }

    /// Registered model names.
    fn models(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        self.call(py, |c| Box::pin(async move { c.models().await }))
    }

    /// Serves the model in `dtype`: "float32", or "bfloat16" / "float16" for its matrices
    /// (llm_set_weight_dtype rounds the stored matrices); returns how many values changed.
    #[pyo3(signature = (dtype, model=DEFAULT_MODEL.to_string()))]
    fn set_weight_dtype(&self, py: Python<'_>, dtype: String, model: String) -> PyResult<i64> {
        self.call(py, move |c| {
            Box::pin(async move { c.set_weight_dtype(&model, &dtype).await })
        })
    }

    /// Precision of this connection's training steps (pg_llm.train_precision): "float32", or
    /// "bfloat16" / "float16" for mixed precision (float32 weights and moments either way).
    fn set_train_precision(&self, py: Python<'_>, precision: String) -> PyResult<()> {
        self.call(py, move |c| {
            Box::pin(async move { c.set_train_precision(&precision).await })
        })
    }

    /// Fresh GPT-2/3 initialisation of every parameter (llm_init_params); returns the count.
    #[pyo3(signature = (model=DEFAULT_MODEL.to_string(), seed=0))]
    fn init_params(&self, py: Python<'_>, model: String, seed: i64) -> PyResult<i64> {
        self.call(py, move |c| {
            Box::pin(async move { c.init_params(&model, seed).await })
        })
    }
}

/// Token ids as a matrix: one sequence (a flat list) is one row; a list of equal-length
/// sequences (or a 2-D array) one row each.
fn matrix(ids: &Bound<'_, PyAny>) -> PyResult<ndarray::Array2<i32>> {
    let rows: Vec<Vec<i32>> = match ids.extract::<Vec<i32>>() {
        Ok(one) => vec![one],
        Err(_) => ids.extract()?,
    };
    let len = rows.first().map_or(0, Vec::len);
    if rows.iter().any(|r| r.len() != len) {
        return Err(PyValueError::new_err(
            "sequences must all have the same length",
        ));
    }
    let n = rows.len();
    ndarray::Array2::from_shape_vec((n, len), rows.into_iter().flatten().collect())
        .map_err(|e| PyValueError::new_err(e.to_string()))
}

/// One generated token.
#[pyclass(frozen, get_all, module = "pg_gpt3_client._native")]
#[derive(Clone)]
pub struct StreamEvent {
    step: i32,
    token_id: i32,
    token: String,
    text: String,
    is_complete: bool,
}

#[pymethods]
impl StreamEvent {
    fn __repr__(&self) -> String {
        format!(
            "StreamEvent(step={}, token_id={}, token={:?}, is_complete={})",
            self.step,
            self.token_id,
            self.token,
            if self.is_complete { "True" } else { "False" }
        )
    }
}

/// One optimizer step of a training run.
#[pyclass(frozen, get_all, module = "pg_gpt3_client._native")]
#[derive(Clone)]
pub struct TrainStep {
    step: i32,
    loss: f32,
    lr: f32,
    grad_norm: f32,
    tokens_per_s: f32,
}

#[pymethods]
impl TrainStep {
    fn __repr__(&self) -> String {
        format!(
            "TrainStep(step={}, loss={:.4}, lr={:.3e}, grad_norm={:.4}, tokens_per_s={:.1})",
            self.step, self.loss, self.lr, self.grad_norm, self.tokens_per_s
        )
    }

    /// The record as a dict (a pandas DataFrame row).
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("step", self.step)?;
        d.set_item("loss", self.loss)?;
        d.set_item("lr", self.lr)?;
        d.set_item("grad_norm", self.grad_norm)?;
        d.set_item("tokens_per_s", self.tokens_per_s)?;
        Ok(d)
    }
}

/// Rows of a server stream, for a Python iterator: the next row with the GIL released and
/// Ctrl-C cancelling; `close()`, or the iterator's end of life, cancels a query still running.
struct Rows<T>(Arc<Mutex<Option<RowsOf<T>>>>, CancelHandle);

impl<T: Send + 'static> Rows<T> {
    fn new(rows: RowsOf<T>, cancel: CancelHandle) -> Self {
        Self(Arc::new(Mutex::new(Some(rows))), cancel)
    }

    fn next(&self, py: Python<'_>) -> PyResult<Option<T>> {
        let rows = self.0.clone();
        wait(py, Some(&self.1), async move {
            let mut guard = rows.lock().await;
            let Some(stream) = guard.as_mut() else {
                return Ok(None);
            };
            match stream.next().await {
                Some(item) => item.map(Some),
                None => {
                    guard.take();
                    Ok(None)
                }
            }
        })
    }

    fn close(&self, py: Python<'_>) {
        let rows = self.0.clone();
        // Dropping the stream cancels its query if it still runs (RowsOf's Drop), which needs
        // the runtime's context: the stream is dropped inside block_on, not returned from it.
        py.detach(|| {
            runtime().block_on(async move {
                drop(rows.lock().await.take());
            })
        });
    }
}

impl<T> Drop for Rows<T> {
    /// An iterator garbage-collected mid-stream: its stream is dropped inside the runtime's
    /// context too, so that it can still send its cancel request.
    fn drop(&mut self) {
        let _context = runtime().enter();
        if let Ok(mut guard) = self.0.try_lock() {
            guard.take();
        }
    }
}

impl From<rust::StreamEvent> for StreamEvent {
    fn from(e: rust::StreamEvent) -> Self {
        Self {
            step: e.step,
            token_id: e.token_id,
            token: e.token,
            text: e.text,
            is_complete: e.is_complete,
        }
    }
}

impl From<rust::TrainStep> for TrainStep {
    fn from(s: rust::TrainStep) -> Self {
        Self {
            step: s.step,
            loss: s.loss,
            lr: s.lr,
            grad_norm: s.grad_norm,
            tokens_per_s: s.tokens_per_s,
        }
    }
}

/// A Python iterator class over a server stream of `$rust` rows, yielding `$item`s.
macro_rules! row_iterator {
    ($(#[$doc:meta])* $name:ident, $rust:ty, $item:ident, $close:literal) => {
        $(#[$doc])*
        #[pyclass(frozen, module = "pg_gpt3_client._native")]
        pub struct $name(Rows<$rust>);

        #[pymethods]
        impl $name {
            fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
                slf
            }

            fn __next__(&self, py: Python<'_>) -> PyResult<$item> {
                match self.0.next(py)? {
                    Some(row) => Ok(row.into()),
                    None => Err(PyStopIteration::new_err(())),
                }
            }

            #[doc = $close]
            fn close(&self, py: Python<'_>) {
                self.0.close(py)
            }
        }
    };
}

row_iterator!(
    /// The iterator `Client.stream` returns.
    TokenStream,
    rust::StreamEvent,
    StreamEvent,
    "Stops reading; a generation still running is cancelled."
);

row_iterator!(
    /// The iterator `Client.train_stream` returns.
    TrainSteps,
    rust::TrainStep,
    TrainStep,
    "Stops reading; a run still going is cancelled and changes nothing."
);
