//! A backend killed with SIGKILL in the middle of writing a model leaves the model exactly as
//! it was before the call or exactly as the finished call leaves it, never a mix, and no stray
//! file: for an import of safetensors bytes, an import from large objects, `llm_init_params`
//! and `llm_train`, each killed at three moments drawn from a fixed seed. After each kill and
//! the server's restart: the parameters' digest is the old one or the new one (the new one
//! is what the same call, run to its end on a second model, leaves), the stored tensors match
//! the registry row, `llm_logits` computes, and once a new connection has used the weight
//! cache, the database's directory under `pg_llm_cache` holds only complete weight files of
//! committed versions.
//!
//! Needs a superuser connection (`COPY ... TO PROGRAM` sends the SIGKILL from the server's
//! machine; `pg_ls_dir` lists the cache). The tests run one at a time: each kill restarts the
//! server and drops every connection, so every connection here is made with `reconnect`,
//! which waits for a server that is still restarting.

mod common;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{backend_pid, cache_problems, is_active, param_digest, param_problems, reconnect};
use pg_gpt3_client::Client;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// About 128 MB of weights in GPT-2's layout (so that an exported checkpoint imports back
/// without a config): writing them takes long enough to be caught in the act (a second or
/// more), and little enough that the restarts after the kills stay short.
const DIMS: &str = "2, 8, 512, 64, 2048, 64, 50257";

/// Kill moments, as fractions of the time the same statement took when it ran to its end:
/// one early, one midway, one late, each drawn from a seeded xorshift64* so that a failure
/// replays.
fn moments(seed: u64) -> [f64; 3] {
    let mut state = seed;
    let mut next = || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    };
    [
        0.05 + 0.25 * next(),
        0.35 + 0.25 * next(),
        0.65 + 0.25 * next(),
    ]
}

/// Registers `model` anew in GPT-2's layout with random weights from `seed`.
async fn gpt2_model(client: &Client, model: &str, seed: i64) {
    client
        .raw()
        .execute("DELETE FROM llm_model_config WHERE model = $1", &[&model])
        .await
        .unwrap();
    client
        .execute(&format!(
            "INSERT INTO llm_model_config \
             (model, n_layer, n_head, d_model, d_head, d_ff, n_positions, vocab, family) \
             VALUES ('{model}', {DIMS}, 'gpt2')"
        ))
        .await
        .unwrap();
    init(client, model, seed).await;
}

async fn init(client: &Client, model: &str, seed: i64) {
    client
        .raw()
        .execute("SELECT llm_init_params($1, $2)", &[&model, &seed])
        .await
        .unwrap();
}

/// The digest of `model`'s parameters, with the number of training steps logged for it
/// when `with_log` (a training call logs its steps in the transaction that writes them).
async fn digest(client: &Client, model: &str, with_log: bool) -> String {
    let params = param_digest(client, model)
        .await
        .unwrap_or_else(|| panic!("{model} has no parameters"));
    if !with_log {
        return params;
    }
    let logged: i64 = client
        .raw()
        .query_one(
            "SELECT count(*) FROM llm_train_log WHERE model = $1",
            &[&model],
        )
        .await
        .unwrap()
        .get(0);
    format!("{params}, {logged} steps logged")
}

/// A call running on a connection of its own, observed from another.
struct Running {
    observer: Client,
    /// Held here too, so that the backend lives until a kill even when the call ends first.
    _connection: Arc<Client>,
    pid: i32,
    call: tokio::task::JoinHandle<Result<u64, tokio_postgres::Error>>,
    /// When pg_stat_activity first showed the statement running.
    active_since: Instant,
}

/// Starts `call` on `model` on a new connection and returns once its statement runs.
async fn start<F, Fut>(call: &F, model: &'static str) -> Running
where
    F: Fn(Arc<Client>, &'static str) -> Fut,
    Fut: Future<Output = Result<u64, tokio_postgres::Error>> + Send + 'static,
{
    let observer = reconnect().await;
    let connection = Arc::new(reconnect().await);
    let pid = backend_pid(&connection).await;
    let call = tokio::spawn(call(connection.clone(), model));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !is_active(&observer, pid).await && !call.is_finished() {
        assert!(Instant::now() < deadline, "the call never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Running {
        observer,
        _connection: connection,
        pid,
        call,
        active_since: Instant::now(),
    }
}

/// Kills the running call's backend with SIGKILL. Returns whether the call had succeeded
/// before the kill, and a connection to the restarted server.
async fn kill(running: Running) -> (bool, Client) {
    // From the server's side; the postmaster then restarts, dropping every connection.
    let _ = running
        .observer
        .raw()
        .batch_execute(&format!(
            "COPY (SELECT 1) TO PROGRAM 'kill -9 {}'",
            running.pid
        ))
        .await;
    let succeeded = running.call.await.unwrap().is_ok();
    // The postmaster may take a moment to notice the death: until it has dropped the
    // observer too, a new connection could still reach the server about to restart.
    let deadline = Instant::now() + Duration::from_secs(60);
    while running.observer.execute("SELECT 1").await.is_ok() {
        assert!(Instant::now() < deadline, "the server did not restart");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (succeeded, reconnect().await)
}

/// One call killed at three moments: `call` runs on `victim`, which holds the old state
/// before each kill (`reset` brings it back there after a kill that came after the commit),
/// and once to its end on `reference`, which then holds the new state. With `with_log`, the
/// state includes the training steps logged.
struct Scenario<F, R> {
    what: &'static str,
    seed: u64,
    victim: &'static str,
    reference: &'static str,
    with_log: bool,
    call: F,
    reset: R,
}

impl<F, Fut, R, RFut> Scenario<F, R>
where
    F: Fn(Arc<Client>, &'static str) -> Fut,
    Fut: Future<Output = Result<u64, tokio_postgres::Error>> + Send + 'static,
    R: Fn(Client, &'static str) -> RFut,
    RFut: Future<Output = ()>,
{
    /// After each kill and restart: the victim holds exactly the old or the new state (only
    /// the new one will do when the call succeeded before the kill), its stored tensors match
    /// its registry row and compute logits, and the weight cache is clean. At least one kill
    /// must have come before the commit.
    async fn run(self) {
        let running = start(&self.call, self.reference).await;
        running.call.await.unwrap().unwrap();
        // From the statement's start, as the kills are timed (an upload comes before it).
        let took = running.active_since.elapsed();
        let setup = reconnect().await;
        let old = digest(&setup, self.victim, self.with_log).await;
        let new = digest(&setup, self.reference, self.with_log).await;
        assert_ne!(old, new);
        let mut states = Vec::new();
        for fraction in moments(self.seed) {
            let delay = took.mul_f64(fraction);
            let running = start(&self.call, self.victim).await;
            tokio::time::sleep(delay).await;
            let (succeeded, after) = kill(running).await;
            let now = digest(&after, self.victim, self.with_log).await;
            let state = if now == old {
                "old"
            } else if now == new {
                "new"
            } else {
                panic!(
                    "{}: {} holds neither the old state ({old}) nor the new one ({new}): {now}",
                    self.what, self.victim
                );
            };
            println!(
                "{}: killed {delay:.2?} into a call of {took:.2?}: {state} state",
                self.what
            );
            assert!(
                !succeeded || state == "new",
                "{}: the call succeeded, yet the old state remains",
                self.what
            );
            assert_eq!(
                param_problems(&after, self.victim).await,
                Vec::<String>::new()
            );
            // param_problems computed logits: this new connection's first use of the cache
            // swept it.
            let stray = cache_problems(&after, &[self.victim]).await;
            assert!(
                stray.is_empty(),
                "{}: stray weight files after a kill {delay:.2?} into the call: {stray:?} (a file \
                 of a version above the current one is a rolled-back write's; see \
                 docs/robustness.md)",
                self.what
            );
            if state == "new" {
                (self.reset)(after, self.victim).await;
            }
            states.push(state);
        }
        assert!(
            states.contains(&"old"),
            "{}: every kill came after the commit",
            self.what
        );
        reconnect()
            .await
            .raw()
            .execute(
                "DELETE FROM llm_model_config WHERE model = ANY ($1)",
                &[&vec![self.victim, self.reference]],
            )
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_killed_init_leaves_the_old_or_the_new_model() {
    let _serial = SERIAL.lock().await;
    let (victim, reference) = ("client-crash-init", "client-crash-init-ref");
    let setup = reconnect().await;
    gpt2_model(&setup, victim, 1).await;
    gpt2_model(&setup, reference, 1).await;
    Scenario {
        what: "llm_init_params",
        seed: 0x1417,
        victim,
        reference,
        with_log: false,
        call: |c: Arc<Client>, model| async move {
            c.raw()
                .execute("SELECT llm_init_params($1, 2)", &[&model])
                .await
        },
        reset: |c, model| async move { init(&c, model, 1).await },
    }
    .run()
    .await;
}

/// The victim starts from seed 1's weights; the imported checkpoint holds seed 2's.
async fn models_and_checkpoint(victim: &str, reference: &str) -> Vec<u8> {
    let setup = reconnect().await;
    gpt2_model(&setup, victim, 1).await;
    // The import replaces every parameter: the reference's own state does not matter.
    gpt2_model(&setup, reference, 2).await;
    setup
        .raw()
        .query_one("SELECT pg_llm_export_safetensors_bytes($1)", &[&reference])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_killed_import_of_bytes_leaves_the_old_or_the_new_model() {
    let _serial = SERIAL.lock().await;
    let (victim, reference) = ("client-crash-import", "client-crash-import-ref");
    let blob = Arc::new(models_and_checkpoint(victim, reference).await);
    Scenario {
        what: "pg_llm_import_safetensors_bytes",
        seed: 0x1b7e5,
        victim,
        reference,
        with_log: false,
        call: |c: Arc<Client>, model| {
            let blob = blob.clone();
            async move {
                c.raw()
                    .execute(
                        "SELECT pg_llm_import_safetensors_bytes($2, $1)",
                        &[&model, &blob.as_slice()],
                    )
                    .await
            }
        },
        reset: |c, model| async move { init(&c, model, 1).await },
    }
    .run()
    .await;
}

/// The client's way to send a checkpoint without a server file: large objects written in a
/// transaction of their own, then one call that reads them (client/src/checkpoint.rs).
#[tokio::test]
async fn a_killed_import_from_large_objects_leaves_the_old_or_the_new_model() {
    let _serial = SERIAL.lock().await;
    let (victim, reference) = ("client-crash-import-lo", "client-crash-import-lo-ref");
    let blob = models_and_checkpoint(victim, reference).await;
    let setup = reconnect().await;
    let object: u32 = setup
        .raw()
        .query_one("SELECT lo_from_bytea(0, $1)", &[&blob])
        .await
        .unwrap()
        .get(0);
    drop(blob);
    Scenario {
        what: "pg_llm_import_safetensors_lo",
        seed: 0x10b,
        victim,
        reference,
        with_log: false,
        call: |c: Arc<Client>, model| async move {
            c.raw()
                .execute(
                    "SELECT pg_llm_import_safetensors_lo(ARRAY[$2::oid], '{model.safetensors}', $1)",
                    &[&model, &object],
                )
                .await
        },
        reset: |c, model| async move { init(&c, model, 1).await },
    }
    .run()
    .await;
    reconnect()
        .await
        .raw()
        .execute("SELECT lo_unlink($1)", &[&object])
        .await
        .unwrap();
}

/// `llm_train` writes the weights, the AdamW moments and its log rows in one transaction.
#[tokio::test]
async fn a_killed_training_run_leaves_the_old_or_the_new_model() {
    let _serial = SERIAL.lock().await;
    let (victim, reference) = ("client-crash-train", "client-crash-train-ref");
    let setup = reconnect().await;
    for model in [victim, reference] {
        gpt2_model(&setup, model, 1).await;
        // The same rows for both, so that the same call takes the same steps.
        setup
            .raw()
            .execute(
                "INSERT INTO llm_dataset (model, tokens) \
                 SELECT $1, array(SELECT (i * 7919 + j * 104729) % 50257 FROM generate_series(0, 64) j) \
                   FROM generate_series(1, 8) i",
                &[&model],
            )
            .await
            .unwrap();
    }
    Scenario {
        what: "llm_train",
        seed: 0x7a1,
        victim,
        reference,
        with_log: true,
        call: |c: Arc<Client>, model| async move {
            c.raw()
                .execute(
                    "SELECT count(*) FROM llm_train($1, 2, batch_size => 2, seed => 7)",
                    &[&model],
                )
                .await
        },
        reset: |c, model| async move {
            init(&c, model, 1).await;
            c.raw()
                .execute("DELETE FROM llm_train_log WHERE model = $1", &[&model])
                .await
                .unwrap();
        },
    }
    .run()
    .await;
}
