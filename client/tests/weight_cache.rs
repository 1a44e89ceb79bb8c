//! The weight-file cache directory stays clean and bounded: a writer killed with SIGKILL in
//! the middle of writing leaves a temporary file that the next use after the restart removes;
//! a dropped database's directory goes at the next use; the total size keeps to
//! pg_llm.weight_cache_size. Everything is observed through the llm_weight_cache view.
//!
//! Needs a superuser connection (the view and `COPY ... TO PROGRAM`, which sends the SIGKILL
//! from the server's machine). The tests run one at a time: one of them restarts the server.

mod common;

use std::time::{Duration, Instant};

use common::{backend_pid, connect, dsn, random_model, reconnect};
use pg_gpt3_client::Client;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// (file, state) of the cache files of database `database` (this one when None).
async fn cache_files(client: &Client, database: Option<u32>) -> Vec<(String, String)> {
    let rows = client
        .raw()
        .query(
            "SELECT file, state FROM llm_weight_cache \
             WHERE database = coalesce($1::oid, (SELECT oid FROM pg_database WHERE datname = current_database())) \
             ORDER BY file",
            &[&database],
        )
        .await
        .unwrap();
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

async fn current_version(client: &Client, model: &str) -> i64 {
    client
        .raw()
        .query_one(
            "SELECT version FROM llm_model_config WHERE model = $1",
            &[&model],
        )
        .await
        .unwrap()
        .get(0)
}

/// Gives `model` a new version without changing a value: its next user writes the file.
async fn new_version_by_hand(client: &Client, model: &str) {
    client
        .raw()
        .execute(
            "UPDATE llm_param SET step = step WHERE model = $1 AND name = 'wpe.weight'",
            &[&model],
        )
        .await
        .unwrap();
}

const SMALL: &str = "client-cache-small";
const SMALL_DIMS: &str = "1, 2, 32, 16, 128, 32, 512";

#[tokio::test]
async fn a_writer_killed_mid_write_leaves_nothing_after_the_restart() {
    let _serial = SERIAL.lock().await;
    // About 210 MB of weights: writing the file takes long enough to be caught in the act.
    let model = "client-crash-test";
    let setup = connect().await;
    random_model(&setup, model, "2, 12, 768, 64, 3072, 64, 50257", 1).await;
    random_model(&setup, SMALL, SMALL_DIMS, 1).await;
    // A new version, written by hand: its first user reads the tables and writes its file.
    new_version_by_hand(&setup, model).await;
    let temp_prefix = format!("{}.weights.tmp", current_version(&setup, model).await);

    let victim = connect().await;
    let pid = backend_pid(&victim).await;
    let load = tokio::spawn(async move {
        victim
            .raw()
            .execute("SELECT length(llm_logits('{1}', $1))", &[&model])
            .await
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let temp = loop {
        let writing = cache_files(&setup, None)
            .await
            .into_iter()
            .find(|(file, state)| file.starts_with(&temp_prefix) && state == "writing");
        if let Some((file, _)) = writing {
            break file;
        }
        assert!(
            !load.is_finished(),
            "the file was written before it could be caught"
        );
        assert!(
            Instant::now() < deadline,
            "no weight file was being written"
        );
    };
    // SIGKILL from the server's side; the postmaster then restarts, dropping every connection.
    let _ = setup
        .raw()
        .batch_execute(&format!("COPY (SELECT 1) TO PROGRAM 'kill -9 {pid}'"))
        .await;
    assert!(load.await.unwrap().is_err(), "the killed call succeeded");

    let after = reconnect().await;
    let files = cache_files(&after, None).await;
    assert!(
        files.contains(&(temp.clone(), "abandoned".to_string())),
        "the kill left no abandoned {temp}: {files:?}"
    );
    // The first use of the cache by a connection sweeps it.
    let user = connect().await;
    user.raw()
        .execute("SELECT length(llm_logits('{1}', $1))", &[&SMALL])
        .await
        .unwrap();
    let files = cache_files(&after, None).await;
    assert!(
        files
            .iter()
            .all(|(file, state)| *file != temp && state != "abandoned"),
        "{files:?}"
    );
    // And the killed model loads (and writes its file) as usual.
    user.raw()
        .execute("SELECT length(llm_logits('{1}', $1))", &[&model])
        .await
        .unwrap();
}

/// Versions of `model`'s complete files in this database's cache.
async fn file_versions(client: &Client, model: &str) -> Vec<i64> {
    let rows = client
        .raw()
        .query(
            "SELECT version FROM llm_weight_cache \
             WHERE model = $1 AND database_name = current_database() AND state = 'ready' \
             ORDER BY version",
            &[&model],
        )
        .await
        .unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

/// A file written for a transaction's own version goes when the transaction or the
/// subtransaction that wrote it rolls back, and the committed version's file stays; a commit
/// keeps only the newest version's file. A transaction that rolls back after reading a
/// version someone else committed keeps that version's file.
#[tokio::test]
async fn rolled_back_writes_leave_no_files() {
    let _serial = SERIAL.lock().await;
    let model = "client-cache-rollback";
    let logits = "SELECT length(llm_logits('{1, 2}', $1))";
    let client = connect().await;
    random_model(&client, model, SMALL_DIMS, 1).await;
    client.raw().execute(logits, &[&model]).await.unwrap();
    let committed = current_version(&client, model).await;
    assert_eq!(file_versions(&client, model).await, [committed]);

    // A whole transaction: an init (its file written as it goes) and a use of it.
    client.execute("BEGIN").await.unwrap();
    client
        .raw()
        .execute("SELECT llm_init_params($1, 2)", &[&model])
        .await
        .unwrap();
    client.raw().execute(logits, &[&model]).await.unwrap();
    let uncommitted = current_version(&client, model).await;
    assert_eq!(
        file_versions(&client, model).await,
        [committed, uncommitted]
    );
    client.execute("ROLLBACK").await.unwrap();
    assert_eq!(file_versions(&client, model).await, [committed]);

    // A version made by hand, whose file the first use writes, inside a subtransaction;
    // then a committed init in the same transaction.
    client.execute("BEGIN").await.unwrap();
    client.execute("SAVEPOINT before").await.unwrap();
    new_version_by_hand(&client, model).await;
    client.raw().execute(logits, &[&model]).await.unwrap();
    assert_eq!(file_versions(&client, model).await.len(), 2);
    client
        .execute("ROLLBACK TO SAVEPOINT before")
        .await
        .unwrap();
    assert_eq!(file_versions(&client, model).await, [committed]);
    client
        .raw()
        .execute("SELECT llm_init_params($1, 3)", &[&model])
        .await
        .unwrap();
    client.execute("COMMIT").await.unwrap();
    let committed = current_version(&client, model).await;
    assert_eq!(file_versions(&client, model).await, [committed]);

    // Another connection commits a new version; this one reads it inside a transaction that
    // has written something else, then rolls back: the file it wrote stays.
    new_version_by_hand(&client, model).await;
    let committed = current_version(&client, model).await;
    let reader = connect().await;
    reader.execute("BEGIN").await.unwrap();
    reader
        .execute("CREATE TEMPORARY TABLE scratch AS SELECT 1 AS x")
        .await
        .unwrap();
    reader.raw().execute(logits, &[&model]).await.unwrap();
    reader.execute("ROLLBACK").await.unwrap();
    assert_eq!(file_versions(&client, model).await, [committed]);
}

#[tokio::test]
async fn a_dropped_database_loses_its_directory() {
    let _serial = SERIAL.lock().await;
    let admin = connect().await;
    random_model(&admin, SMALL, SMALL_DIMS, 1).await;
    admin
        .execute("DROP DATABASE IF EXISTS pg_gpt3_cache_dropped")
        .await
        .unwrap();
    admin
        .execute("CREATE DATABASE pg_gpt3_cache_dropped")
        .await
        .unwrap();
    let oid: u32 = admin
        .raw()
        .query_one(
            "SELECT oid FROM pg_database WHERE datname = 'pg_gpt3_cache_dropped'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    {
        let mut config: tokio_postgres::Config = dsn().parse().unwrap();
        config.dbname("pg_gpt3_cache_dropped");
        let (other, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
        let conn = tokio::spawn(conn);
        other
            .batch_execute(&format!(
                "CREATE EXTENSION pg_llm; \
                 INSERT INTO llm_model_config (model, n_layer, n_head, d_model, d_head, d_ff, n_positions, vocab) \
                 VALUES ('{SMALL}', {SMALL_DIMS}); \
                 SELECT llm_init_params('{SMALL}', 1);"
            ))
            .await
            .unwrap();
        drop(other);
        let _ = conn.await;
    }
    assert_eq!(cache_files(&admin, Some(oid)).await.len(), 1);
    admin
        .execute("DROP DATABASE pg_gpt3_cache_dropped WITH (FORCE)")
        .await
        .unwrap();
    assert_eq!(
        cache_files(&admin, Some(oid)).await.len(),
        1,
        "gone before any sweep?"
    );
    let user = connect().await;
    user.raw()
        .execute("SELECT length(llm_logits('{1}', $1))", &[&SMALL])
        .await
        .unwrap();
    assert_eq!(cache_files(&admin, Some(oid)).await, vec![]);
}

#[tokio::test]
async fn the_cache_keeps_to_its_size_bound() {
    let _serial = SERIAL.lock().await;
    // Three models of about 6.9 MB each against a 16 MB bound.
    let client = connect().await;
    client
        .execute("SET pg_llm.weight_cache_size = '16MB'")
        .await
        .unwrap();
    let models = ["client-bound-a", "client-bound-b", "client-bound-c"];
    for model in models {
        random_model(&client, model, "2, 2, 128, 64, 512, 64, 10000", 1).await;
    }
    let total: i64 = client
        .raw()
        .query_one("SELECT sum(bytes)::bigint FROM llm_weight_cache", &[])
        .await
        .unwrap()
        .get(0);
    assert!(total <= 16 << 20, "{total} bytes");
    let cached: Vec<String> = client
        .raw()
        .query(
            "SELECT model FROM llm_weight_cache WHERE model LIKE 'client-bound-%' ORDER BY model",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // The least recently used file made room for the newest.
    assert_eq!(cached, ["client-bound-b", "client-bound-c"]);

    // A model larger than the whole bound stays private to the connection.
    client
        .execute("SET pg_llm.weight_cache_size = '4MB'")
        .await
        .unwrap();
    random_model(
        &client,
        "client-bound-d",
        "2, 2, 128, 64, 512, 64, 10000",
        1,
    )
    .await;
    // Loaded by its first use (an init writes the tables and the file, not this backend's cache).
    client
        .execute("SELECT llm_logits('{1}', 'client-bound-d')")
        .await
        .unwrap();
    let (mapped, files): (bool, i64) = {
        let row = client
            .raw()
            .query_one(
                "SELECT (SELECT weight_file FROM llm_loaded_models() WHERE model = 'client-bound-d'), \
                        (SELECT count(*) FROM llm_weight_cache WHERE model = 'client-bound-d')",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!((mapped, files), (false, 0));
    // Same logits as a connection reading the tables directly.
    let logits = "SELECT llm_logits('{1, 2, 3}', 'client-bound-d')";
    let private: Vec<u8> = client.raw().query_one(logits, &[]).await.unwrap().get(0);
    let other = connect().await;
    other
        .execute("SET pg_llm.weight_files = off")
        .await
        .unwrap();
    let direct: Vec<u8> = other.raw().query_one(logits, &[]).await.unwrap().get(0);
    assert_eq!(private, direct);
}
