//! Text generation as SQL: llm_generate, llm_generate_ids, llm_generate_stream (rows reach the
//! client as tokens are produced), llm_beam_search (in the server).

use std::rc::Rc;

use pg_llm_engine::generate::{beam_search, check_fits, GenerateOptions, Generator};
use pg_llm_engine::memory;
use pg_llm_engine::model::Model;
use pg_llm_engine::sample::SamplingParams;
use pg_llm_engine::tokenizer::Bpe;
use pg_llm_engine::{EngineError, Result};
use pgrx::prelude::*;

use super::args::{self, finite, required};
use crate::errors::{cancel, report, run};
use crate::stats::{self, Counter};
use crate::{guc, model_cache, store, tokenizer_cache};

#[allow(clippy::too_many_arguments)]
fn options(
    max_tokens: Option<i32>,
    temperature: Option<f32>,
    topk: Option<i32>,
    topp: Option<f32>,
    eos_token: Option<i32>,
    seed: Option<i64>,
) -> Result<GenerateOptions> {
    let max_tokens = required(max_tokens, "max_tokens")?;
    if max_tokens < 0 {
        return Err(EngineError::invalid(format!(
            "max_tokens must be non-negative, got {max_tokens}"
        )));
    }
    Ok(GenerateOptions {
        max_tokens: max_tokens as usize,
        sampling: SamplingParams::new(
            finite(temperature, "temperature")?,
            required(topk, "topk")? as i64,
            finite(topp, "topp")?,
        )?,
        eos: eos_token.filter(|&e| e >= 0).map(|e| e as u32),
        seed,
    })
}

fn text_without_eos(bpe: &Bpe, ids: &[u32], eos: Option<u32>) -> Result<String> {
    let end = if ids.last().copied() == eos && eos.is_some() {
        ids.len() - 1
    } else {
        ids.len()
    };
    bpe.decode(&ids[..end])
}

/// The tokenizer of a registered model (42704 when the model or its tokenizer is missing).
fn tokenizer(model: &str) -> Result<Rc<Bpe>> {
    store::load_config(model)?;
    tokenizer_cache::for_model(model)
}

/// The model for `what`: `max_new` tokens after a `prompt`-token prompt holding `caches` KV
/// caches at once, once the positions fit its context and the memory `pg_llm.max_memory`.
fn model_for(
    model: &str,
    what: &str,
    prompt: usize,
    max_new: usize,
    caches: usize,
) -> Result<Rc<Model>> {
    model_cache::get_within(model, what, |cfg, dtype| {
        check_fits(cfg, prompt, max_new)?;
        memory::generation(cfg, prompt, max_new, caches, dtype, guc::threads())
    })
}

/// `generate` with the request counted and timed in the metrics (stats.rs).
fn generate_counted(model: &Model, prompt: &[u32], opts: GenerateOptions) -> Result<Vec<u32>> {
    let mut timing = stats::Request::start(Counter::RequestsSql, prompt.len());
    let mut g = Generator::new(model, prompt, opts, cancel())?;
    let mut out = Vec::with_capacity(opts.max_tokens);
    while let Some((t, _)) = g.next_token(cancel())? {
        timing.token();
        out.push(t);
    }
    Ok(out)
}

/// The continuation of `prompt` (EOS not included). Temperature 0 is greedy; `seed` makes
/// sampling reproducible; `eos_token` NULL or negative never stops early.
#[pg_extern(volatile)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
#[allow(clippy::too_many_arguments)]
fn llm_generate(
    prompt: Option<&str>,
    max_tokens: default!(Option<i32>, 64),
    temperature: default!(Option<f32>, 1.0),
    topk: default!(Option<i32>, 50),
    topp: default!(Option<f32>, 0.95),
    model_name: default!(Option<&str>, "'gpt3-125m'"),
    eos_token: default!(Option<i32>, 50256),
    seed: default!(Option<i64>, "NULL"),
) -> String {
    run("llm_generate", || {
        let opts = options(max_tokens, temperature, topk, topp, eos_token, seed)?;
        let name = args::model_name(model_name, "model_name")?;
        let bpe = tokenizer(name)?;
        let ids = bpe.encode(required(prompt, "prompt")?)?;
        let model = model_for(name, "llm_generate", ids.len(), opts.max_tokens, 1)?;
        let out = generate_counted(&model, &ids, opts)?;
        text_without_eos(&bpe, &out, opts.eos)
    })
}

/// Generated token ids after `token_ids` (an EOS that stopped generation is included).
#[pg_extern(volatile)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
#[allow(clippy::too_many_arguments)]
fn llm_generate_ids(
    token_ids: Option<Vec<Option<i32>>>,
    max_tokens: default!(Option<i32>, 64),
    temperature: default!(Option<f32>, 1.0),
    topk: default!(Option<i32>, 50),
    topp: default!(Option<f32>, 0.95),
    model_name: default!(Option<&str>, "'gpt3-125m'"),
    eos_token: default!(Option<i32>, 50256),
    seed: default!(Option<i64>, "NULL"),
) -> Vec<i32> {
    run("llm_generate_ids", || {
        let opts = options(max_tokens, temperature, topk, topp, eos_token, seed)?;
        let ids = super::args::token_ids(token_ids, "token_ids")?;
        let name = args::model_name(model_name, "model_name")?;
        let model = model_for(name, "llm_generate_ids", ids.len(), opts.max_tokens, 1)?;
        Ok(generate_counted(&model, &ids, opts)?
            .into_iter()
            .map(|t| t as i32)
            .collect())
    })
}

/// Rows of `llm_generate_stream`, produced lazily: each row is computed when PostgreSQL asks
/// for it, so a client reading row by row sees tokens as they are generated.
struct Stream {
    generator: Generator<Rc<Model>>,
    bpe: Rc<Bpe>,
    eos: Option<u32>,
    ids: Vec<u32>,
    step: i32,
    timing: stats::Request,
}

type StreamRow = (i32, i32, String, String, bool);

impl Iterator for Stream {
    type Item = StreamRow;

    fn next(&mut self) -> Option<StreamRow> {
        // The previous row is in PostgreSQL's output buffer: send it before computing this one.
        if self.step > 0 {
            crate::flush::flush_to_client();
        }
        let step = |s: &mut Self| -> Result<Option<StreamRow>> {
            let Some((token, done)) = s.generator.next_token(cancel())? else {
                return Ok(None);
            };
            s.timing.token();
            s.ids.push(token);
            s.step += 1;
            let is_eos = Some(token) == s.eos;
            let piece = if is_eos {
                String::new()
            } else {
                s.bpe.decode(&[token])?
            };
            let text = text_without_eos(&s.bpe, &s.ids, s.eos)?;
            Ok(Some((s.step, token as i32, piece, text, done)))
        };
        match step(self) {
            Ok(row) => row,
            Err(e) => report("llm_generate_stream", e),
        }
    }
}

/// Like llm_generate, one row per generated token: step (from 1), token_id, token (its text),
/// text (the continuation so far), is_complete (true on the last row). A stopping EOS is a
/// row with empty token text. Rows stream to the client when the function is called in the
/// select list, e.g. `SELECT (s).* FROM (SELECT llm_generate_stream(...) AS s) q`.
#[pg_extern(volatile)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
#[allow(clippy::too_many_arguments)]
fn llm_generate_stream(
    prompt: Option<&str>,
    max_tokens: default!(Option<i32>, 64),
    temperature: default!(Option<f32>, 1.0),
    topk: default!(Option<i32>, 50),
    topp: default!(Option<f32>, 0.95),
    model_name: default!(Option<&str>, "'gpt3-125m'"),
    eos_token: default!(Option<i32>, 50256),
    seed: default!(Option<i64>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(step, i32),
        name!(token_id, i32),
        name!(token, String),
        name!(text, String),
        name!(is_complete, bool),
    ),
> {
    let stream = run("llm_generate_stream", || {
        let opts = options(max_tokens, temperature, topk, topp, eos_token, seed)?;
        let name = args::model_name(model_name, "model_name")?;
        let bpe = tokenizer(name)?;
        let ids = bpe.encode(required(prompt, "prompt")?)?;
        let model = model_for(name, "llm_generate_stream", ids.len(), opts.max_tokens, 1)?;
        let timing = stats::Request::start(Counter::RequestsSql, ids.len());
        let generator = Generator::new(model, &ids, opts, cancel())?;
        Ok(Stream {
            generator,
            bpe,
            eos: opts.eos,
            ids: Vec::new(),
            step: 0,
            timing,
        })
    });
    TableIterator::new(stream)
}

/// Beam search in the server: the `beam_width` best continuations of `prompt`, ranked by
/// summed log-probability / length^length_penalty.
#[pg_extern(volatile)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn llm_beam_search(
    prompt: Option<&str>,
    beam_width: default!(Option<i32>, 4),
    max_tokens: default!(Option<i32>, 32),
    model_name: default!(Option<&str>, "'gpt3-125m'"),
    length_penalty: default!(Option<f32>, 1.0),
) -> TableIterator<
    'static,
    (
        name!(rank, i32),
        name!(score, f64),
        name!(token_ids, Vec<i32>),
        name!(text, String),
    ),
> {
    let rows = run("llm_beam_search", || {
        let width = required(beam_width, "beam_width")?;
        let max = required(max_tokens, "max_tokens")?;
        if !(1..=64).contains(&width) {
            return Err(EngineError::invalid(format!(
                "beam_width must be between 1 and 64, got {width}"
            )));
        }
        if max < 1 {
            return Err(EngineError::invalid(format!(
                "max_tokens must be at least 1, got {max}"
            )));
        }
        let name = args::model_name(model_name, "model_name")?;
        let bpe = tokenizer(name)?;
        let ids = bpe.encode(required(prompt, "prompt")?)?;
        // Each beam's cache and, while a step ranks them, its successors'.
        let caches = 2 * width as usize + 1;
        let model = model_for(name, "llm_beam_search", ids.len(), max as usize, caches)?;
        let eos = bpe.end_of_text();
        stats::Request::start(Counter::RequestsSql, ids.len());
        let hyps = beam_search(
            &model,
            &ids,
            width as usize,
            max as usize,
            finite(length_penalty, "length_penalty")? as f64,
            eos,
            cancel(),
        )?;
        hyps.into_iter()
            .enumerate()
            .map(|(i, h)| {
                let text = text_without_eos(&bpe, &h.tokens, eos)?;
                Ok((
                    i as i32 + 1,
                    h.score,
                    h.tokens.iter().map(|&t| t as i32).collect(),
                    text,
                ))
            })
            .collect::<Result<Vec<_>>>()
    });
    TableIterator::new(rows)
}
