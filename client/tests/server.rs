//! Integration tests against a real server: set PG_GPT3_DSN to a database with pg_llm
//! installed (scripts/test.sh does). Without it these tests fail rather than pass vacuously.

use pg_gpt3_client::{Client, DEFAULT_MODEL};

fn dsn() -> String {
    std::env::var("PG_GPT3_DSN")
        .expect("PG_GPT3_DSN must point at a database with pg_llm (scripts/test.sh sets it)")
}

#[tokio::test]
async fn reads_the_registry_and_reports_sqlstates() {
    let client = Client::connect(&dsn()).await.unwrap();
    let cfg = client.model_config(DEFAULT_MODEL).await.unwrap();
    assert_eq!(
        (cfg.n_layer, cfg.d_model, cfg.n_positions, cfg.vocab),
        (12, 768, 2048, 50257)
    );
    assert!(client
        .models()
        .await
        .unwrap()
        .contains(&"gpt3-175b".to_string()));
    let err = client.model_config("no-such-model").await.unwrap_err();
    assert_eq!(err.sqlstate(), Some("42704"));
}

#[tokio::test]
async fn runs_kernels_on_the_server() {
    let client = Client::connect(&dsn()).await.unwrap();
    let c = client
        .matmul(
            &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0],
            2,
            3,
            2,
        )
        .await
        .unwrap();
    assert_eq!(c, vec![4.0, 5.0, 10.0, 11.0]);
    let err = client.matmul(&[1.0], &[1.0], 2, 2, 2).await.unwrap_err();
    assert_eq!(err.sqlstate(), Some("22023"));
}

/// A small GPT-3-family model with the real tokenizer, created once per database.
async fn streaming_model(client: &Client) {
    let exists = client
        .raw()
        .query_opt(
            "SELECT 1 FROM llm_model_tokenizer WHERE model = 'client-stream-test'",
            &[],
        )
        .await
        .unwrap()
        .is_some();
    if exists {
        return;
    }
    client
        .execute(
            "INSERT INTO llm_model_config (model, n_layer, n_head, d_model, d_head, d_ff, n_positions, vocab) \
             VALUES ('client-stream-test', 2, 2, 64, 32, 256, 512, 50257) ON CONFLICT DO NOTHING",
        )
        .await
        .unwrap();
    client
        .execute("SELECT llm_init_params('client-stream-test', 1)")
        .await
        .unwrap();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizer");
    let vocab = std::fs::read_to_string(dir.join("encoder.json")).unwrap();
    let merges = std::fs::read_to_string(dir.join("vocab.bpe")).unwrap();
    client
        .raw()
        .execute(
            "SELECT llm_load_tokenizer('client-stream-test', $1, $2)",
            &[&vocab, &merges],
        )
        .await
        .unwrap();
}

/// Rows of llm_generate_stream reach the client while generation is still running: the first
/// row arrives before the server has produced the last one.
#[tokio::test]
async fn generation_streams_rows_as_they_are_produced() {
    use futures_util::StreamExt;
    use std::time::Instant;

    let client = Client::connect(&dsn()).await.unwrap();
    streaming_model(&client).await;
    let opts = pg_gpt3_client::GenerateOptions::default()
        .model("client-stream-test")
        .max_tokens(300)
        .temperature(0.0)
        .eos_token(None);
    let started = Instant::now();
    let stream = client
        .generate_stream("Once upon a time", &opts)
        .await
        .unwrap();
    futures_util::pin_mut!(stream);
    let mut arrivals = Vec::new();
    let mut events = Vec::new();
    while let Some(ev) = stream.next().await {
        arrivals.push(started.elapsed());
        events.push(ev.unwrap());
    }
    assert_eq!(events.len(), 300);
    assert!(events
        .iter()
        .enumerate()
        .all(|(i, e)| e.step == i as i32 + 1 && e.is_complete == (i == 299)));
    let first = arrivals[0];
    let last = *arrivals.last().unwrap();
    // Rows were received spread over the generation, not in one burst at the end.
    assert!(
        first.as_secs_f64() < 0.5 * last.as_secs_f64(),
        "first row after {first:?}, last after {last:?}: rows did not stream"
    );
    // The same tokens as the non-streaming call.
    let text = client.generate("Once upon a time", &opts).await.unwrap();
    assert_eq!(events.last().unwrap().text, text);
}
