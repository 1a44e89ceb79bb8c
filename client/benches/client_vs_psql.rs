//! The client's overhead, side by side with the usual alternatives in one run:
//!   stream   tokens/s of `generate_stream` through this crate vs the same
//!            `llm_generate_stream` query in psql (psql's own `\timing`), greedy, 64 tokens
//!   logits   the [512, 50257] logits of a 512-token input: this crate (binary bytea into an
//!            ndarray) vs psycopg fetching them as text (`pg_llm_to_array`, a float4[] parsed
//!            into NumPy) and as bytea; and the server's compute alone (length() of the
//!            result, nothing sent), so transfer = total - compute
//!
//!     PG_GPT3_DSN="host=/tmp/pg_gpt3_cluster/sock port=54329 user=postgres dbname=bench" \
//!     PYTHON=/tmp/benchvenv/bin/python cargo bench -p pg_gpt3_client --bench client_vs_psql
//!
//! Needs psql on PATH (or PSQL) and a Python with psycopg and numpy (PYTHON). The generation
//! model is gpt3-125m (initialised if it has no weights; PG_GPT3_BENCH_MODEL picks another);
//! the logits model is a 2-layer model with the real 50257-token vocabulary, so the logits
//! are full size while their compute stays small.

use std::process::Command;
use std::time::Instant;

use futures_util::StreamExt;
use pg_gpt3_client::{Client, GenerateOptions};

const NEW_TOKENS: i32 = 64;
const LOGIT_TOKENS: usize = 512;
const ROUNDS: usize = 3;
const LOGITS_MODEL: &str = "bench-client-logits";

fn min(times: &[f64]) -> f64 {
    times.iter().copied().fold(f64::INFINITY, f64::min)
}

/// Seconds psql reports for `sql` (its `\timing`: from sending the query to the last row).
fn psql_seconds(dsn: &str, sql: &str) -> f64 {
    let psql = std::env::var("PSQL").unwrap_or_else(|_| "psql".into());
    let out = Command::new(psql)
        .args([
            dsn,
            "-X",
            "-q",
            "-At",
            "-o",
            "/dev/null",
            "-c",
            "\\timing on",
            "-c",
            sql,
        ])
        .output()
        .expect("psql runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let ms: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Time: "))
        .and_then(|t| t.split_whitespace().next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no timing in psql's output: {text}"));
    ms / 1000.0
}

const PSYCOPG: &str = r#"
import json, sys, time
import numpy as np, psycopg
dsn, model, n, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ids = [(i * 7919) % 50257 for i in range(n)]
with psycopg.connect(dsn) as conn:
    def timed(sql, convert):
        best = float("inf")
        for _ in range(rounds):
            t = time.perf_counter()
            value = conn.execute(sql, (ids, model)).fetchone()[0]
            array = convert(value)
            best = min(best, time.perf_counter() - t)
        assert array.size == n * 50257, array.size
        return best
    text = timed("SELECT pg_llm_to_array(llm_logits(%s, %s))", lambda v: np.array(v, dtype=np.float32))
    binary = timed("SELECT llm_logits(%s, %s)", lambda v: np.frombuffer(v, dtype="<f4"))
print(json.dumps({"text": text, "bytea": binary}))
"#;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), pg_gpt3_client::Error> {
    let dsn = std::env::var("PG_GPT3_DSN").expect("set PG_GPT3_DSN");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let model = std::env::var("PG_GPT3_BENCH_MODEL").unwrap_or_else(|_| "gpt3-125m".into());
    let client = Client::connect(&dsn).await?;

    let has_weights: bool = client
        .raw()
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM llm_param WHERE model = $1)",
            &[&model],
        )
        .await?
        .get(0);
    if !has_weights {
        client.init_params(&model, 0).await?;
    }
    let has_tokenizer: bool = client
        .raw()
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM llm_model_tokenizer WHERE model = $1)",
            &[&model],
        )
        .await?
        .get(0);
    if !has_tokenizer {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizer");
        client
            .load_tokenizer(&model, dir.join("encoder.json"), dir.join("vocab.bpe"))
            .await?;
    }
    client
        .execute(&format!(
            "INSERT INTO llm_model_config (model, n_layer, n_head, d_model, d_head, d_ff, n_positions, vocab) \
             VALUES ('{LOGITS_MODEL}', 2, 2, 128, 64, 512, 1024, 50257) ON CONFLICT DO NOTHING; \
             SELECT llm_init_params('{LOGITS_MODEL}', 1) \
              WHERE NOT EXISTS (SELECT 1 FROM llm_param WHERE model = '{LOGITS_MODEL}')"
        ))
        .await?;

    // stream: the same greedy generation of 64 tokens from 16 prompt tokens.
    let prompt: Vec<i32> = (0..16).map(|i| (i * 7919) % 50257).collect();
    let prompt_text = client.decode(&prompt, &model).await?;
    let opts = GenerateOptions::default()
        .model(&model)
        .max_tokens(NEW_TOKENS)
        .temperature(0.0)
        .eos_token(None);
    let sql = format!(
        "SELECT (s).token FROM (SELECT llm_generate_stream({}, {NEW_TOKENS}, 0, 50, 0.95, '{model}', NULL, NULL) AS s) q",
        quote(&prompt_text)
    );
    let (mut ours, mut theirs, mut first_token) = (Vec::new(), Vec::new(), Vec::new());
    client.generate(&prompt_text, &opts).await?; // weights loaded in both sessions' server
    psql_seconds(&dsn, &sql);
    for _ in 0..ROUNDS {
        let t = Instant::now();
        let mut tokens = client.generate_stream(&prompt_text, &opts).await?;
        let mut n = 0;
        while let Some(event) = tokens.next().await {
            event?;
            if n == 0 {
                first_token.push(t.elapsed().as_secs_f64());
            }
            n += 1;
        }
        assert_eq!(n, NEW_TOKENS);
        ours.push(t.elapsed().as_secs_f64());
        theirs.push(psql_seconds(&dsn, &sql));
    }
    let (ours, theirs) = (min(&ours), min(&theirs));
    println!(
        "stream   {model}, greedy, 16-token prompt, {NEW_TOKENS} new tokens, best of {ROUNDS}"
    );
    println!(
        "         client generate_stream  {:8.1} tokens/s  (first token after {:.0} ms)",
        NEW_TOKENS as f64 / ours,
        min(&first_token) * 1e3
    );
    println!(
        "         psql, same query        {:8.1} tokens/s",
        NEW_TOKENS as f64 / theirs
    );
    println!("         ratio client/psql       {:8.2}", theirs / ours);

    // logits: 512 positions x 50257 float32 = 103 MB.
    let ids: Vec<i32> = (0..LOGIT_TOKENS as i32)
        .map(|i| (i * 7919) % 50257)
        .collect();
    let (mut fetch, mut compute) = (Vec::new(), Vec::new());
    client.logits(&ids, LOGITS_MODEL).await?;
    for _ in 0..ROUNDS {
        let t = Instant::now();
        let logits = client.logits(&ids, LOGITS_MODEL).await?;
        fetch.push(t.elapsed().as_secs_f64());
        assert_eq!(logits.dim(), (LOGIT_TOKENS, 50257));
        let t = Instant::now();
        client
            .raw()
            .query_one("SELECT length(llm_logits($1, $2))", &[&ids, &LOGITS_MODEL])
            .await?;
        compute.push(t.elapsed().as_secs_f64());
    }
    let out = Command::new(&python)
        .args([
            "-c",
            PSYCOPG,
            &dsn,
            LOGITS_MODEL,
            &LOGIT_TOKENS.to_string(),
            &ROUNDS.to_string(),
        ])
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let py: serde_json::Value = serde_json::from_slice(&out.stdout).expect("psycopg timings");
    let (text, bytea) = (py["text"].as_f64().unwrap(), py["bytea"].as_f64().unwrap());
    let (fetch, compute) = (min(&fetch), min(&compute));
    println!("logits   [{LOGIT_TOKENS}, 50257] float32 (103 MB), best of {ROUNDS}; server compute alone {:.0} ms", compute * 1e3);
    println!(
        "         client, binary -> ndarray  {:7.0} ms  (transfer {:.0} ms)",
        fetch * 1e3,
        (fetch - compute) * 1e3
    );
    println!(
        "         psycopg, text -> NumPy     {:7.0} ms  (transfer {:.0} ms)",
        text * 1e3,
        (text - compute) * 1e3
    );
    println!(
        "         psycopg, bytea -> NumPy    {:7.0} ms  (transfer {:.0} ms)",
        bytea * 1e3,
        (bytea - compute) * 1e3
    );
    println!("         ratio text/client          {:7.1}", text / fetch);
    Ok(())
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}
