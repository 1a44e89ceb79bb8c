//! Integration tests against a real server (see common/mod.rs).

mod common;

use common::{backend_pid, dsn, random_model, real_tokenizer};
use pg_gpt3_client::{Client, DEFAULT_MODEL};

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
    real_tokenizer(client, "client-stream-test").await;
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

async fn greedy_ids(client: &Client, model: &str) -> Vec<i32> {
    client
        .raw()
        .query_one(
            "SELECT llm_generate_ids(ARRAY[5, 17, 99, 3], 12, 0, 0, 1, $1, NULL)",
            &[&model],
        )
        .await
        .unwrap()
        .get(0)
}

/// Connections share weights through the per-version weight file; a write in one connection
/// is seen by every other one, and mapped weights give the same logits as private ones.
#[tokio::test]
async fn weight_changes_reach_every_connection() {
    let model = "client-cache-test";
    let a = Client::connect(&dsn()).await.unwrap();
    random_model(&a, model, "2, 2, 32, 16, 128, 64, 512", 1).await;
    let before = greedy_ids(&a, model).await;
    let b = Client::connect(&dsn()).await.unwrap();
    assert_eq!(greedy_ids(&b, model).await, before);

    // New weights written by b; a (which cached the old version) must use them.
    b.execute(&format!("SELECT llm_init_params('{model}', 2)"))
        .await
        .unwrap();
    let after = greedy_ids(&a, model).await;
    assert_ne!(after, before, "a kept generating with the old weights");

    // A connection reading the tables directly, without weight files, agrees exactly.
    let c = Client::connect(&dsn()).await.unwrap();
    c.execute("SET pg_llm.weight_files = off").await.unwrap();
    assert_eq!(greedy_ids(&c, model).await, after);
    let logits_sql = "SELECT llm_logits(ARRAY[1, 2, 3, 4, 5], $1)";
    let private: Vec<u8> = c
        .raw()
        .query_one(logits_sql, &[&model])
        .await
        .unwrap()
        .get(0);
    let mapped: Vec<u8> = a
        .raw()
        .query_one(logits_sql, &[&model])
        .await
        .unwrap()
        .get(0);
    assert_eq!(private, mapped);
}

#[tokio::test]
async fn logits_arrive_as_an_array_in_binary() {
    let client = Client::connect(&dsn()).await.unwrap();
    random_model(&client, "client-logits", "2, 2, 32, 16, 64, 32, 64", 5).await;
    let ids = [1, 2, 3];
    let logits = client.logits(&ids, "client-logits").await.unwrap();
    assert_eq!(logits.dim(), (3, 64));
    // The same values as the bytea the SQL call returns.
    let raw: Vec<u8> = client
        .raw()
        .query_one("SELECT llm_logits('{1,2,3}', 'client-logits')", &[])
        .await
        .unwrap()
        .get(0);
    let flat = pg_gpt3_client::decode(&raw).unwrap();
    assert_eq!(logits.iter().copied().collect::<Vec<f32>>(), flat);
    assert!(logits.iter().all(|v| v.is_finite()));
    assert_ne!(
        logits.row(0),
        logits.row(2),
        "each position has its own row"
    );
}

#[tokio::test]
async fn errors_say_what_kind_of_failure_they_are() {
    use pg_gpt3_client::ErrorKind;
    let client = Client::connect(&dsn()).await.unwrap();
    random_model(&client, "client-kinds", "1, 2, 32, 16, 64, 32, 64", 1).await;
    let kind = |r: Result<ndarray::Array2<f32>, pg_gpt3_client::Error>| r.unwrap_err().kind();
    assert_eq!(
        kind(client.logits(&[1], "no-such-model").await),
        ErrorKind::UnknownModel
    );
    let err = client.logits(&[1000], "client-kinds").await.unwrap_err();
    assert_eq!(
        (err.kind(), err.sqlstate()),
        (ErrorKind::BadInput, Some("22023"))
    );

    // A server file read by a role without pg_read_server_files.
    client
        .execute(
            "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'client_plain') \
             THEN CREATE ROLE client_plain; END IF; END $$",
        )
        .await
        .unwrap();
    let plain = Client::connect(&dsn()).await.unwrap();
    plain.execute("SET ROLE client_plain").await.unwrap();
    let err = plain
        .execute("SELECT pg_llm_import_safetensors('/nonexistent.safetensors', 'client-kinds')")
        .await
        .unwrap_err();
    assert_eq!(
        (err.kind(), err.sqlstate()),
        (ErrorKind::Permission, Some("42501"))
    );

    // statement_timeout and a cancel both end in 57014, told apart.
    let slow = Client::connect(&dsn()).await.unwrap();
    slow.execute("SET statement_timeout = '50ms'")
        .await
        .unwrap();
    let err = slow.execute("SELECT pg_sleep(5)").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    slow.execute("SET statement_timeout = 0").await.unwrap();
    let token = slow.cancel_token();
    let cancel = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    });
    let err = slow.execute("SELECT pg_sleep(5)").await.unwrap_err();
    cancel.await.unwrap();
    assert_eq!(err.kind(), ErrorKind::Cancelled, "{err}");

    // A model written while an export streams it in READ COMMITTED: run it again.
    let conflict = Client::connect(&dsn()).await.unwrap();
    conflict
        .execute(
            "BEGIN; DECLARE pieces CURSOR FOR SELECT (p).file FROM \
             (SELECT pg_llm_export_safetensors_pieces('client-kinds', 5000000000, 64) AS p) q; \
             FETCH 1 FROM pieces; SELECT llm_init_params('client-kinds', 2)",
        )
        .await
        .unwrap();
    let err = conflict.execute("FETCH ALL FROM pieces").await.unwrap_err();
    assert_eq!(
        (err.kind(), err.sqlstate()),
        (ErrorKind::Conflict, Some("40001")),
        "{err}"
    );
    conflict.execute("ROLLBACK").await.unwrap();

    // A server resource exhausted: the role's connection limit.
    client
        .execute(
            "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'client_no_slots') \
             THEN CREATE ROLE client_no_slots LOGIN CONNECTION LIMIT 0; END IF; END $$",
        )
        .await
        .unwrap();
    let err = Client::connect(&format!("{} user=client_no_slots", dsn()))
        .await
        .err()
        .unwrap();
    assert_eq!(
        (err.kind(), err.sqlstate()),
        (ErrorKind::Resources, Some("53300")),
        "{err}"
    );

    // Nothing listening.
    let err = Client::connect("host=127.0.0.1 port=1 user=nobody connect_timeout=2")
        .await
        .err()
        .unwrap();
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
}

/// Every typed call against the same small model with the real tokenizer.
#[tokio::test]
async fn typed_calls_match_their_sql() {
    use pg_gpt3_client::{BeamOptions, ErrorKind, GenerateOptions};
    let client = Client::connect(&dsn()).await.unwrap();
    streaming_model(&client).await;
    let model = "client-stream-test";

    let ids = client.encode("Hello, world!", model).await.unwrap();
    assert_eq!(ids, [15496, 11, 995, 0], "GPT-2's ids for the text");
    assert_eq!(client.decode(&ids, model).await.unwrap(), "Hello, world!");

    let greedy = GenerateOptions::default()
        .model(model)
        .temperature(0.0)
        .max_tokens(6)
        .eos_token(None);
    let continued = client.generate_ids(&ids, &greedy).await.unwrap();
    assert_eq!(continued.len(), 6);
    let sql: Vec<i32> = client
        .raw()
        .query_one(
            "SELECT llm_generate_ids($1, 6, 0, 50, 0.95, $2, NULL)",
            &[&ids, &model],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(continued, sql);
    // top-k 1 sampling is greedy whatever the temperature and seed.
    let top1 = greedy.clone().temperature(1.5).top_k(1).top_p(1.0).seed(7);
    assert_eq!(client.generate_ids(&ids, &top1).await.unwrap(), continued);

    let beams = client
        .beam_search(
            "Hello, world!",
            &BeamOptions::default()
                .model(model)
                .beam_width(3)
                .max_tokens(4),
        )
        .await
        .unwrap();
    assert_eq!(beams.len(), 3);
    assert_eq!(beams.iter().map(|b| b.rank).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(beams.windows(2).all(|w| w[0].score >= w[1].score));
    for b in &beams {
        assert_eq!(client.decode(&b.token_ids, model).await.unwrap(), b.text);
    }

    let loss = client.loss(&ids[..3], &ids[1..], model).await.unwrap();
    assert!(loss.is_finite() && loss > 0.0, "{loss}");
    let err = client.loss(&ids, &ids[1..], model).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BadInput, "{err}");
}

/// Work that does not fit `pg_llm.max_memory` is refused before it allocates (53200,
/// ErrorKind::Resources): the refused session goes on, and a session generating beside it
/// never notices (same backend, every call answered).
#[tokio::test]
async fn refused_work_leaves_the_server_and_other_sessions_alone() {
    let setup = Client::connect(&dsn()).await.unwrap();
    let model = "client-admission-test";
    random_model(&setup, model, "2, 2, 64, 32, 256, 2048, 50257", 3).await;

    let generator = Client::connect(&dsn()).await.unwrap();
    let generator_pid = backend_pid(&generator).await;
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let generating = tokio::spawn(async move {
        let opts = pg_gpt3_client::GenerateOptions::default()
            .model(model)
            .max_tokens(8)
            .seed(1);
        let mut calls = 0;
        loop {
            generator
                .generate_ids(&[464, 2068], &opts)
                .await
                .expect("a generation beside a refused call failed");
            calls += 1;
            if stop_rx.try_recv().is_ok() {
                return (generator, calls);
            }
        }
    });

    let refused = Client::connect(&dsn()).await.unwrap();
    let refused_pid = backend_pid(&refused).await;
    refused
        .execute("SET pg_llm.max_memory = '8GB'")
        .await
        .unwrap();
    let err = refused
        .execute("SELECT llm_init_params('gpt3-6.7b', 1)")
        .await
        .unwrap_err();
    assert_eq!(err.sqlstate(), Some("53200"), "{err}");
    assert_eq!(err.kind(), pg_gpt3_client::ErrorKind::Resources);
    assert!(err.to_string().contains("pg_llm.max_memory"), "{err}");
    refused
        .execute("SET pg_llm.max_memory = '64MB'")
        .await
        .unwrap();
    let long: Vec<i32> = (0..2048).map(|i| (i * 7) % 50257).collect();
    let err = refused.logits(&long, model).await.unwrap_err();
    assert_eq!(err.sqlstate(), Some("53200"), "{err}");
    // The refused session is the same backend and still works.
    assert_eq!(backend_pid(&refused).await, refused_pid);
    assert_eq!(
        refused.logits(&long[..4], model).await.unwrap().shape(),
        [4, 50257]
    );

    stop_tx.send(()).unwrap();
    let (generator, calls) = generating.await.unwrap();
    assert!(calls >= 1);
    assert_eq!(
        backend_pid(&generator).await,
        generator_pid,
        "the generating backend was replaced"
    );
    let rows: i64 = setup
        .raw()
        .query_one(
            "SELECT count(*) FROM llm_param WHERE model = 'gpt3-6.7b'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0, "the refused initialisation wrote rows");
}
