//! Model loads under concurrent writes: a writer commits, several times a second, an update
//! that switches two tensors (the position embedding and an attention output projection)
//! between two known states A and B. Readers, half with weight files and half without, keep
//! computing logits; every result must equal the logits of exactly one committed state, and
//! that state must be the one of the version the reader's connection says it used.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{connect, random_model};
use pg_gpt3_client::Client;

const MODEL: &str = "client-consistency-test";
const DIMS: &str = "4, 8, 256, 32, 1024, 256, 4096";
const SWITCHED: [&str; 2] = ["wpe.weight", "layers.3.attn.out_proj.weight"];
const IDS: &str = "{464, 2068, 3586, 1, 2, 3, 4, 5}";
/// The issue asks for at least a minute of concurrent writes.
const RUN_FOR: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq)]
enum State {
    A,
    B,
}

async fn tensor(client: &Client, name: &str) -> Vec<u8> {
    client
        .raw()
        .query_one(
            "SELECT data FROM llm_param WHERE model = $1 AND name = $2 AND chunk = 0",
            &[&MODEL, &name],
        )
        .await
        .unwrap()
        .get(0)
}

type Recorded = Arc<Mutex<HashMap<i64, State>>>;

/// Writes `state`'s tensors over the switched tensors in one transaction and records the
/// version it gives the model before committing it (so that no reader can see a version
/// before it is recorded); returns that version.
async fn write_state(
    client: &mut tokio_postgres::Client,
    state: State,
    tensors: &[Vec<u8>],
    recorded: &Recorded,
) -> i64 {
    let tx = client.transaction().await.unwrap();
    for (name, data) in SWITCHED.iter().zip(tensors) {
        tx.execute(
            "UPDATE llm_param SET data = $3 WHERE model = $1 AND name = $2",
            &[&MODEL, name, data],
        )
        .await
        .unwrap();
    }
    let version: i64 = tx
        .query_one(
            "SELECT version FROM llm_model_config WHERE model = $1",
            &[&MODEL],
        )
        .await
        .unwrap()
        .get(0);
    recorded.lock().unwrap().insert(version, state);
    tx.commit().await.unwrap();
    version
}

/// Logits and the version this connection's cached model has after computing them.
async fn logits_and_version(client: &Client) -> (Vec<u8>, i64) {
    let logits: Vec<u8> = client
        .raw()
        .query_one(&format!("SELECT llm_logits('{IDS}', $1)"), &[&MODEL])
        .await
        .unwrap()
        .get(0);
    let version: i64 = client
        .raw()
        .query_one(
            "SELECT version FROM llm_loaded_models() WHERE model = $1",
            &[&MODEL],
        )
        .await
        .unwrap()
        .get(0);
    (logits, version)
}

async fn plain_connection() -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&common::dsn(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

#[derive(Default, Debug)]
struct Tally {
    results: usize,
    mixed: usize,
    wrong_version: usize,
    versions: std::collections::HashSet<i64>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_result_is_one_committed_state() {
    let setup = connect().await;
    setup
        .raw()
        .execute("DELETE FROM llm_model_config WHERE model = $1", &[&MODEL])
        .await
        .unwrap();
    random_model(&setup, MODEL, DIMS, 1).await;
    let a: Vec<Vec<u8>> = futures_util::future::join_all(SWITCHED.map(|n| tensor(&setup, n))).await;
    // State B: every value of both tensors negated.
    let b: Vec<Vec<u8>> = a
        .iter()
        .map(|t| {
            t.chunks_exact(4)
                .flat_map(|c| (-f32::from_le_bytes(c.try_into().unwrap())).to_le_bytes())
                .collect()
        })
        .collect();

    // The logits of each state, computed from the tables alone while nothing else writes.
    let mut writer = plain_connection().await;
    let reference = connect().await;
    reference
        .execute("SET pg_llm.weight_files = off")
        .await
        .unwrap();
    let states = Recorded::default();
    let version_b = write_state(&mut writer, State::B, &b, &states).await;
    let (logits_b, seen) = logits_and_version(&reference).await;
    assert_eq!(seen, version_b);
    let version_a = write_state(&mut writer, State::A, &a, &states).await;
    let (logits_a, seen) = logits_and_version(&reference).await;
    assert_eq!(seen, version_a);
    assert_ne!(logits_a, logits_b);

    let deadline = Instant::now() + RUN_FOR;

    let writer_states = states.clone();
    let writer_task = tokio::spawn(async move {
        let mut commits = 0;
        let mut next = State::B;
        while Instant::now() < deadline {
            let tensors = if next == State::A { &a } else { &b };
            write_state(&mut writer, next, tensors, &writer_states).await;
            commits += 1;
            next = if next == State::A { State::B } else { State::A };
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        commits
    });

    let mut readers = Vec::new();
    for i in 0..4 {
        let weight_files = if i % 2 == 0 { "on" } else { "off" };
        let (states, logits_a, logits_b) = (states.clone(), logits_a.clone(), logits_b.clone());
        readers.push(tokio::spawn(async move {
            let client = connect().await;
            client
                .execute(&format!("SET pg_llm.weight_files = {weight_files}"))
                .await
                .unwrap();
            let mut tally = Tally::default();
            while Instant::now() < deadline {
                let (logits, version) = logits_and_version(&client).await;
                let state = if logits == logits_a {
                    Some(State::A)
                } else if logits == logits_b {
                    Some(State::B)
                } else {
                    None
                };
                tally.results += 1;
                tally.versions.insert(version);
                match state {
                    None => tally.mixed += 1,
                    Some(s) => {
                        let recorded = states.lock().unwrap().get(&version).copied();
                        if recorded != Some(s) {
                            tally.wrong_version += 1;
                        }
                    }
                }
            }
            (weight_files, tally)
        }));
    }

    let commits = writer_task.await.unwrap();
    for reader in readers {
        let (weight_files, tally) = reader.await.unwrap();
        println!(
            "weight_files = {weight_files}: {} results over {} versions, {} mixed, {} with another version's weights ({commits} commits)",
            tally.results,
            tally.versions.len(),
            tally.mixed,
            tally.wrong_version
        );
        assert_eq!(tally.mixed, 0, "weight_files = {weight_files}: {tally:?}");
        assert_eq!(
            tally.wrong_version, 0,
            "weight_files = {weight_files}: {tally:?}"
        );
        // The reader saw the writes interleave with its own loads.
        assert!(
            tally.versions.len() >= 10,
            "weight_files = {weight_files}: {tally:?}"
        );
    }
}
