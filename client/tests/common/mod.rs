//! Shared by the integration tests: they run against a real server. Set PG_GPT3_DSN to a
//! database with pg_llm installed (scripts/test.sh does); without it they fail rather than
//! pass vacuously.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use pg_gpt3_client::Client;

pub fn dsn() -> String {
    std::env::var("PG_GPT3_DSN")
        .expect("PG_GPT3_DSN must point at a database with pg_llm (scripts/test.sh sets it)")
}

pub async fn connect() -> Client {
    Client::connect(&dsn()).await.unwrap()
}

/// Registers `model` (GPT-3 layout; `dims` = n_layer, n_head, d_model, d_head, d_ff,
/// n_positions, vocab) unless it is registered, and gives it random weights from `seed`.
pub async fn random_model(client: &Client, model: &str, dims: &str, seed: i64) {
    client
        .execute(&format!(
            "INSERT INTO llm_model_config (model, n_layer, n_head, d_model, d_head, d_ff, n_positions, vocab) \
             VALUES ('{model}', {dims}) ON CONFLICT DO NOTHING"
        ))
        .await
        .unwrap();
    client
        .execute(&format!("SELECT llm_init_params('{model}', {seed})"))
        .await
        .unwrap();
}

/// `random_model` for a model registered anew: any earlier row of that name, with its
/// weights, data, logs and checkpoints, is removed first.
pub async fn fresh_model(client: &Client, model: &str, dims: &str, seed: i64) {
    client
        .raw()
        .execute("DELETE FROM llm_model_config WHERE model = $1", &[&model])
        .await
        .unwrap();
    random_model(client, model, dims, seed).await;
}

/// Attaches the real GPT-2/3 tokenizer (tests/fixtures/tokenizer) to `model`.
pub async fn real_tokenizer(client: &Client, model: &str) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizer");
    let vocab = std::fs::read_to_string(dir.join("encoder.json")).unwrap();
    let merges = std::fs::read_to_string(dir.join("vocab.bpe")).unwrap();
    client
        .raw()
        .execute(
            "SELECT llm_load_tokenizer($1, $2, $3)",
            &[&model, &vocab, &merges],
        )
        .await
        .unwrap();
}

/// The backend process id of `client`'s connection.
pub async fn backend_pid(client: &Client) -> i32 {
    client
        .raw()
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

/// Whether backend `pid` is running a statement right now.
pub async fn is_active(observer: &Client, pid: i32) -> bool {
    observer
        .raw()
        .query_one(
            "SELECT coalesce((SELECT state = 'active' FROM pg_stat_activity WHERE pid = $1), false)",
            &[&pid],
        )
        .await
        .unwrap()
        .get(0)
}

/// A new connection once the server accepts them again (after a crash restart).
pub async fn reconnect() -> Client {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match Client::connect(&dsn()).await {
            Ok(c) if c.execute("SELECT 1").await.is_ok() => return c,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(250)).await,
            Err(e) => panic!("the server did not come back: {e}"),
            Ok(_) => panic!("the server did not come back"),
        }
    }
}
