//! Interrupts and read-only calls: a long call ends only for a real query cancel, statement
//! timeout or termination, and then promptly; every other interrupt PostgreSQL raises (signal
//! barriers, memory-context dumps, timers) is served while the call keeps running. Read-only
//! calls assign no transaction id (so they run in read-only transactions and on standbys).
//!
//! The tests of this file run one at a time (`SERIAL`): latencies are measured, and the
//! others would compete for the same cores.

mod common;

use std::time::{Duration, Instant};

use common::{backend_pid, connect, is_active, random_model, real_tokenizer};
use pg_gpt3_client::Client;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Small enough to create in a second, slow enough per token (a 50257-row output layer) that
/// 2000 generated tokens take a few seconds.
const MODEL: &str = "client-interrupt-test";
const DIMS: &str = "2, 4, 256, 64, 1024, 2048, 50257";

async fn model_client() -> Client {
    let client = connect().await;
    random_model(&client, MODEL, DIMS, 1).await;
    client
}

async fn wait_until_active(observer: &Client, pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !is_active(observer, pid).await {
        assert!(
            Instant::now() < deadline,
            "backend {pid} never started its call"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// pg_log_backend_memory_contexts and the process-signal barrier of CREATE / DROP DATABASE
/// reach a backend in the middle of a long generation; the generation completes.
#[tokio::test]
async fn harmless_interrupts_do_not_end_a_call() {
    let _serial = SERIAL.lock().await;
    let worker = model_client().await;
    let pid = backend_pid(&worker).await;
    let call = tokio::spawn(async move {
        worker
            .raw()
            .query_one(
                // Four generations in one statement: several seconds even as decoding gets
                // faster, so the interrupts below all land inside it.
                "SELECT sum(cardinality(llm_generate_ids(ARRAY[1, 2, 3], 2000, 0, 0, 1, $1, NULL)))::int \
                 FROM generate_series(1, 4)",
                &[&MODEL],
            )
            .await
            .map(|row| row.get::<_, i32>(0))
    });

    let observer = connect().await;
    wait_until_active(&observer, pid).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..3 {
        observer
            .raw()
            .execute("SELECT pg_log_backend_memory_contexts($1)", &[&pid])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    observer
        .execute("DROP DATABASE IF EXISTS pg_gpt3_barrier_test")
        .await
        .unwrap();
    observer
        .execute("CREATE DATABASE pg_gpt3_barrier_test")
        .await
        .unwrap();
    observer
        .execute("DROP DATABASE pg_gpt3_barrier_test")
        .await
        .unwrap();
    let still_running = is_active(&observer, pid).await;
    let outcome = call.await.unwrap().map_err(|e| e.to_string());
    assert_eq!(outcome, Ok(8000));
    // The interrupts above were raised while the call ran (otherwise this proves nothing).
    assert!(
        still_running,
        "the generation ended before the interrupts were all raised: make it longer"
    );
}

/// The reported case: after two quick statements on one connection, a call running past
/// PostgreSQL's 10-second idle-statistics interval was cancelled. Run with psql exactly so.
#[tokio::test]
async fn a_call_outlives_the_statistics_timer() {
    let _serial = SERIAL.lock().await;
    model_client().await;
    let bindir = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
        .expect("pg_config");
    let psql = std::path::Path::new(String::from_utf8_lossy(&bindir.stdout).trim()).join("psql");
    // Generations until 11 s have passed (the clock test is cheaper and runs first).
    let long = format!(
        "SELECT count(*) FROM generate_series(1, 100000) g \
         WHERE clock_timestamp() < statement_timestamp() + interval '11 s' \
           AND cardinality(llm_generate_ids(ARRAY[464], 100, 1.0, 50, 0.95, '{MODEL}', NULL, g)) = 100"
    );
    let started = Instant::now();
    let out = std::process::Command::new(psql)
        .args([&common::dsn(), "-X", "-At", "-v", "ON_ERROR_STOP=1"])
        .args(["-c", "SELECT 1", "-c", "SELECT 2", "-c", &long])
        .output()
        .expect("psql");
    let elapsed = started.elapsed();
    assert!(
        out.status.success(),
        "psql failed after {elapsed:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let generations: i64 = stdout.lines().last().unwrap().parse().unwrap();
    assert!(
        generations > 0 && elapsed > Duration::from_secs(11),
        "{stdout} in {elapsed:?}"
    );
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Long calls of both kinds (a generation; logits of a 2048-token prompt) end within 100 ms
/// of a statement timeout and of a query cancel, with SQLSTATE 57014, and the connection
/// stays usable. The median of three tries is held to the bound.
#[tokio::test]
async fn cancel_and_statement_timeout_end_calls_within_100ms() {
    let _serial = SERIAL.lock().await;
    let client = model_client().await;
    let calls = [
        (
            "generation",
            "SELECT llm_generate_ids(ARRAY[1, 2, 3], 2000, 0, 0, 1, $1, NULL)",
        ),
        (
            "prefill",
            // Several prompts, so the call outlasts the moment the cancel comes on a fast
            // machine (one 2048-token prefill took under 0.3 s on CI).
            "SELECT sum(length(llm_logits(array(SELECT (g + i) % 50000 \
             FROM generate_series(1, 2048) g), $1))) FROM generate_series(1, 8) i",
        ),
    ];
    let budget = Duration::from_millis(100);
    let fire_after = Duration::from_millis(300);
    for (kind, sql) in calls {
        let mut timeout_latency = Vec::new();
        let mut cancel_latency = Vec::new();
        for _ in 0..3 {
            client
                .execute(&format!(
                    "SET statement_timeout = {}",
                    fire_after.as_millis()
                ))
                .await
                .unwrap();
            let started = Instant::now();
            let err = client.raw().query_one(sql, &[&MODEL]).await.unwrap_err();
            timeout_latency.push(started.elapsed().saturating_sub(fire_after));
            assert_eq!(err.code().map(|c| c.code()), Some("57014"), "{kind}: {err}");
            client.execute("RESET statement_timeout").await.unwrap();

            let token = client.cancel_token();
            let canceller = tokio::spawn(async move {
                tokio::time::sleep(fire_after).await;
                let sent = Instant::now();
                token.cancel_query(tokio_postgres::NoTls).await.unwrap();
                sent
            });
            let err = client.raw().query_one(sql, &[&MODEL]).await.unwrap_err();
            let ended = Instant::now();
            cancel_latency.push(ended.duration_since(canceller.await.unwrap()));
            assert_eq!(err.code().map(|c| c.code()), Some("57014"), "{kind}: {err}");
        }
        println!("{kind}: statement_timeout latency {timeout_latency:?}, cancel latency {cancel_latency:?}");
        assert!(
            median(timeout_latency.clone()) < budget,
            "{kind}: {timeout_latency:?}"
        );
        assert!(
            median(cancel_latency.clone()) < budget,
            "{kind}: {cancel_latency:?}"
        );
    }
    client.execute("SELECT 1").await.unwrap();
}

/// Every read-only call works in a READ ONLY transaction of a new connection (a cold model
/// cache) and assigns no transaction id, as a hot standby requires.
#[tokio::test]
async fn read_only_calls_assign_no_transaction_id() {
    let _serial = SERIAL.lock().await;
    let model = "client-readonly-test";
    let setup = connect().await;
    random_model(&setup, model, "2, 2, 64, 32, 256, 512, 50257", 1).await;
    real_tokenizer(&setup, model).await;

    for weight_files in ["on", "off"] {
        let client = connect().await;
        client
            .execute(&format!("SET pg_llm.weight_files = {weight_files}"))
            .await
            .unwrap();
        client.execute("BEGIN READ ONLY").await.unwrap();
        for sql in [
            "SELECT length(llm_logits('{464, 2068}', $1))",
            "SELECT llm_generate('Hello', 4, 0.8, 50, 0.95, $1, NULL, 1)",
            "SELECT llm_generate_ids('{464}', 4, 0, 0, 1, $1, NULL)",
            "SELECT count(*) FROM llm_generate_stream('Hello', 3, 0, 50, 0.95, $1, NULL)",
            "SELECT count(*) FROM llm_beam_search('Hello', 2, 3, $1)",
            "SELECT llm_decode(llm_encode('Hello world', $1), $1)",
            "SELECT count(*) FROM llm_loaded_models() WHERE model = $1",
        ] {
            client.raw().query_one(sql, &[&model]).await.unwrap();
        }
        let xid: Option<i64> = client
            .raw()
            .query_one("SELECT txid_current_if_assigned()", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(xid, None, "weight_files = {weight_files}");
        client.execute("COMMIT").await.unwrap();
    }
}
