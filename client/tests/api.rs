//! The typed API against a real server, method by method: training as a stream, single
//! steps, evaluation, tokenizers and datasets from the client's disk, in-database
//! checkpoints, Hugging Face checkpoints over the wire, pools, `Client::from`, TLS, the
//! per-call timeout, cancel from another task and cancel on drop of a stream.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{backend_pid, connect, dsn, fresh_model, is_active, random_model, real_tokenizer};
use futures_util::StreamExt;
use pg_gpt3_client::{
    Client, DatasetOptions, Error, ErrorKind, GenerateOptions, StepOptions, TrainOptions,
};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// A fresh directory for one test's files.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pg_gpt3_client_{name}_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A small model with a real vocabulary and `rows` training rows of 33 tokens.
async fn model_with_data(client: &Client, model: &str, rows: i32) {
    fresh_model(client, model, "2, 4, 64, 16, 256, 128, 50257", 3).await;
    let blocks: Vec<Vec<i32>> = (0..rows)
        .map(|i| (0..33).map(|j| (i * 7919 + j * 104729) % 50257).collect())
        .collect();
    let added = client
        .dataset_upload_tokens(model, "train", &blocks)
        .await
        .unwrap();
    assert_eq!(added, rows as u64);
}

/// Waits until backend `pid` runs nothing (a cancelled call has ended), then a moment more:
/// PostgreSQL signals a cancelled backend twice (the process, then its process group), and
/// the second signal can land after the first ended the call. Idle, the backend ignores it;
/// the next call must not start before then (CI runs of 2026-12-06 and 2026-12-07 saw it
/// cancel the next statement).
async fn after_cancel(observer: &Client, pid: i32) {
    for _ in 0..200 {
        if !is_active(observer, pid).await {
            tokio::time::sleep(Duration::from_millis(100)).await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("backend {pid} still runs its call 10 s after the cancel");
}

#[tokio::test]
async fn train_streams_typed_steps_and_dropping_it_cancels_the_run() {
    let client = connect().await;
    let observer = connect().await;
    model_with_data(&client, "api-train", 16).await;
    let pid = backend_pid(&client).await;

    let opts = TrainOptions::default()
        .model("api-train")
        .n_steps(3)
        .batch_size(2)
        .seq_len(16)
        .lr_max(1e-3)
        .seed(5);
    let mut steps = client.train(&opts).await.unwrap();
    let first = steps.next().await.unwrap().unwrap();
    // The first record is here while the server still trains.
    assert!(is_active(&observer, pid).await);
    let mut all = vec![first];
    while let Some(step) = steps.next().await {
        all.push(step.unwrap());
    }
    assert_eq!(all.iter().map(|s| s.step).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(all
        .iter()
        .all(|s| s.loss.is_finite() && s.lr > 0.0 && s.tokens_per_s > 0.0));
    let logged: Vec<f32> = client
        .raw()
        .query(
            "SELECT loss FROM llm_train_log WHERE model = 'api-train' ORDER BY step",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(logged, all.iter().map(|s| s.loss).collect::<Vec<_>>());

    // A durable run to 7 steps in all, committed every 2: resumes from step 3.
    client.train_run(7, 2, &opts).await.unwrap();
    let log = client.train_log("api-train", 3).await.unwrap();
    assert_eq!(log.iter().map(|s| s.step).collect::<Vec<_>>(), [4, 5, 6, 7]);
    assert_eq!(
        client.train_log("api-train", 0).await.unwrap()[..3],
        all[..]
    );
    client.train_run(7, 2, &opts).await.unwrap();
    assert_eq!(client.train_log("api-train", 0).await.unwrap().len(), 7);

    // Dropped after its first step, a long run stops and leaves the model as it was.
    let before = client.eval("api-train", "train").await.unwrap();
    let mut steps = client.train(&opts.clone().n_steps(500)).await.unwrap();
    steps.next().await.unwrap().unwrap();
    drop(steps);
    after_cancel(&observer, pid).await;
    assert_eq!(client.eval("api-train", "train").await.unwrap(), before);
    client.execute("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn single_steps_losses_and_evaluation() {
    let client = connect().await;
    model_with_data(&client, "api-step", 4).await;
    let tokens = ndarray::Array2::from_shape_fn((2, 8), |(i, j)| (i * 100 + j * 7) as i32);
    let targets = ndarray::Array2::from_shape_fn((2, 8), |(i, j)| (i * 100 + j * 7 + 1) as i32);
    let before = client.loss(&tokens, &targets, "api-step").await.unwrap();
    let opts = StepOptions::default().model("api-step").lr(1e-2);
    let stepped = client.train_step(&tokens, &targets, &opts).await.unwrap();
    assert_eq!(
        stepped, before,
        "the step reports the loss before its update"
    );
    let after = client.loss(&tokens, &targets, "api-step").await.unwrap();
    assert!(after < before, "{after} !< {before}");
    // One sequence from a slice.
    let row: Vec<i32> = tokens.row(0).to_vec();
    let next: Vec<i32> = targets.row(0).to_vec();
    assert!(client
        .loss(&row, &next, "api-step")
        .await
        .unwrap()
        .is_finite());

    let eval = client.eval("api-step", "train").await.unwrap();
    assert_eq!((eval.sequences, eval.tokens), (4, 4 * 32));
    assert!((eval.perplexity - eval.loss.exp()).abs() < 1e-6 * eval.perplexity);

    let err = client
        .train_step(&tokens, &targets, &opts.clone().lr(f32::NAN))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BadInput, "{err}");
    let err = client.eval("api-step", "no-such-split").await.unwrap_err();
    assert_ne!(err.kind(), ErrorKind::Connection, "{err}");
}

#[tokio::test]
async fn mixed_precision_steps_are_logged_with_their_precision() {
    let client = connect().await;
    model_with_data(&client, "api-mixed", 2).await;
    let tokens = ndarray::Array2::from_shape_fn((2, 8), |(i, j)| (i * 100 + j * 7) as i32);
    let targets = ndarray::Array2::from_shape_fn((2, 8), |(i, j)| (i * 100 + j * 7 + 1) as i32);
    let before = client.loss(&tokens, &targets, "api-mixed").await.unwrap();
    let opts = StepOptions::default().model("api-mixed").lr(1e-2);
    for precision in ["bfloat16", "float16"] {
        client.set_train_precision(precision).await.unwrap();
        client.train_step(&tokens, &targets, &opts).await.unwrap();
    }
    let logged: Vec<(String, Option<f32>, bool)> = client
        .raw()
        .query(
            "SELECT precision, loss_scale, skipped FROM llm_train_log \
             WHERE model = 'api-mixed' ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(logged.len(), 2);
    assert_eq!(
        (logged[0].0.as_str(), logged[0].1, logged[0].2),
        ("bfloat16", None, false)
    );
    assert_eq!((logged[1].0.as_str(), logged[1].2), ("float16", false));
    assert!(logged[1].1.is_some());
    assert!(client.loss(&tokens, &targets, "api-mixed").await.unwrap() < before);
    let err = client.set_train_precision("float8").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BadInput, "{err}");
}

#[tokio::test]
async fn tokenizers_and_datasets_come_from_the_clients_disk() {
    let client = connect().await;
    let model = "api-data";
    fresh_model(&client, model, "1, 2, 32, 16, 64, 64, 50257", 1).await;
    let tok = fixtures().join("tokenizer");
    let vocab = client
        .load_tokenizer(model, tok.join("encoder.json"), tok.join("vocab.bpe"))
        .await
        .unwrap();
    assert_eq!(vocab, 50257);
    let ids = client.encode("Hello, world", model).await.unwrap();
    assert_eq!(ids, [15496, 11, 995]);
    assert_eq!(client.decode(&ids, model).await.unwrap(), "Hello, world");

    let text = "The quick brown fox jumps over the lazy dog. ".repeat(20);
    let opts = DatasetOptions::default()
        .model(model)
        .block_size(16)
        .split("validation");
    let rows = client.dataset_from_text(&text, &opts).await.unwrap();
    let tokens = client.encode(&text, model).await.unwrap().len() as i64;
    assert_eq!(rows, (tokens - 1 + 15) / 16);

    let dir = scratch("data");
    let files = [dir.join("a.txt"), dir.join("b.txt")];
    for f in &files {
        std::fs::write(f, &text).unwrap();
    }
    let from_files = client
        .dataset_from_files(&files, &opts.clone().split("train"))
        .await
        .unwrap();
    assert_eq!(from_files, 2 * rows);

    // Token blocks by COPY: T+1 ids become T tokens and their next-token targets.
    client
        .dataset_upload_tokens(model, "extra", [vec![1, 2, 3, 4], vec![5, 6, 7, 8]])
        .await
        .unwrap();
    let row = client
        .raw()
        .query_one(
            "SELECT tokens, target FROM llm_dataset WHERE model = $1 AND split = 'extra' ORDER BY id LIMIT 1",
            &[&model],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, Vec<i32>>(0), row.get::<_, Vec<i32>>(1)),
        (vec![1, 2, 3], vec![2, 3, 4])
    );
    // A refused block refuses the whole upload.
    let err = client
        .dataset_upload_tokens(model, "bad", [vec![1, 2, 3], vec![4, -5, 6]])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BadInput, "{err}");
    let bad: i64 = client
        .raw()
        .query_one("SELECT count(*) FROM llm_dataset WHERE split = 'bad'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(bad, 0);

    let missing = client
        .load_tokenizer(model, dir.join("nope.json"), tok.join("vocab.bpe"))
        .await
        .unwrap_err();
    assert!(matches!(missing, Error::File { .. }), "{missing}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn in_database_checkpoints_save_list_load_and_prune() {
    let client = connect().await;
    let model = "api-ckpt";
    fresh_model(&client, model, "1, 2, 32, 16, 64, 32, 64", 1).await;
    let original = client.logits(&[1, 2, 3], model).await.unwrap();
    let id = client.checkpoint_save(model, Some("seed 1")).await.unwrap();
    let n_params = client.init_params(model, 2).await.unwrap();
    assert_ne!(client.logits(&[1, 2, 3], model).await.unwrap(), original);
    let listed = client.checkpoints(model).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].id, listed[0].note.as_deref(), listed[0].n_params),
        (id, Some("seed 1"), n_params)
    );
    client.checkpoint_load(model, id).await.unwrap();
    assert_eq!(client.logits(&[1, 2, 3], model).await.unwrap(), original);
    let err = client.checkpoint_load(model, id + 1000).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::UnknownModel, "{err}");
    client.checkpoint_save(model, None).await.unwrap();
    assert_eq!(client.checkpoint_prune(model, 1).await.unwrap(), 1);
    assert_eq!(client.checkpoints(model).await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_model_served_in_bfloat16_decodes_like_float32_of_its_rounded_weights() {
    let client = connect().await;
    let model = "api-bf16";
    fresh_model(&client, model, "1, 2, 32, 16, 64, 32, 64", 3).await;
    let float32 = client.logits(&[1, 2, 3], model).await.unwrap();
    assert!(client.set_weight_dtype(model, "bfloat16").await.unwrap() > 0);
    let bf16 = client.logits(&[1, 2, 3], model).await.unwrap();
    assert_eq!(client.set_weight_dtype(model, "float32").await.unwrap(), 0);
    let rounded = client.logits(&[1, 2, 3], model).await.unwrap();
    let max_diff = |a: &ndarray::Array2<f32>, b: &ndarray::Array2<f32>| {
        a.iter()
            .zip(b.iter())
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    };
    assert!(max_diff(&bf16, &rounded) < 1e-5);
    assert!(max_diff(&bf16, &float32) > 1e-5);
    let err = client.set_weight_dtype(model, "int4").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BadInput, "{err}");
}

#[tokio::test]
async fn hugging_face_checkpoints_travel_between_disk_and_server() {
    let mut client = connect().await;
    let (source, copy) = ("api-export", "api-import");
    client
        .raw()
        .execute("DELETE FROM llm_model_config WHERE model = $1", &[&copy])
        .await
        .unwrap();
    fresh_model(&client, source, "2, 2, 32, 16, 64, 32, 96", 4).await;
    let dir = scratch("export");
    let files = client.export_checkpoint(&dir, source).await.unwrap();
    let mut names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        ["config.json", "model.manifest.jsonl", "model.safetensors"]
    );
    for f in &files {
        assert_eq!(std::fs::metadata(dir.join(&f.name)).unwrap().len(), f.bytes);
    }
    let on_server: Vec<u8> = client
        .raw()
        .query_one("SELECT pg_llm_export_safetensors_bytes($1)", &[&source])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        std::fs::read(dir.join("model.safetensors")).unwrap(),
        on_server
    );
    let leftovers = std::fs::read_dir(&dir).unwrap().count();
    assert_eq!(leftovers, 3, "no partial files are left behind");

    // Back in under another name: the folder (config.json creates the model), then the
    // single file and the manifest, each giving the same logits.
    let expected = client.logits(&[5, 6, 7], source).await.unwrap();
    for path in [
        dir.clone(),
        dir.join("model.safetensors"),
        dir.join("model.manifest.jsonl"),
    ] {
        let n = client.import_checkpoint(&path, copy).await.unwrap();
        assert!(n > 0);
        assert_eq!(
            client.logits(&[5, 6, 7], copy).await.unwrap(),
            expected,
            "{path:?}"
        );
    }
    let objects: i64 = client
        .raw()
        .query_one("SELECT count(*) FROM pg_largeobject_metadata", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(objects, 0, "the upload's large objects are gone");

    // A corrupt file is refused and changes nothing.
    client.init_params(copy, 9).await.unwrap();
    let kept = client.logits(&[5, 6, 7], copy).await.unwrap();
    let mut bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    bytes.truncate(bytes.len() - 10);
    std::fs::write(dir.join("model.safetensors"), &bytes).unwrap();
    let err = client
        .import_checkpoint(dir.join("model.safetensors"), copy)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BadInput, "{err}");
    assert_eq!(client.logits(&[5, 6, 7], copy).await.unwrap(), kept);
    let err = client
        .import_checkpoint(dir.join("model.manifest.jsonl"), copy)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BadInput, "{err}");
    let err = client
        .export_checkpoint(&dir, "no-such-model")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::UnknownModel, "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn clients_come_from_a_pool_or_from_tokio_postgres() {
    let pool = pg_gpt3_client::Pool::new(&dsn(), 2).unwrap();
    let a = pool.get().await.unwrap();
    let b = pool.get().await.unwrap();
    assert_ne!(backend_pid(&a).await, backend_pid(&b).await);
    // A third waits for one of the two to come back.
    let pid_a = backend_pid(&a).await;
    let waiting = {
        let pool = pool.clone();
        tokio::spawn(async move { backend_pid(&pool.get().await.unwrap()).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiting.is_finished());
    drop(a);
    assert_eq!(waiting.await.unwrap(), pid_a);
    assert_eq!(pool.status().0, 2);
    let cfg = b.model_config("gpt3-125m").await.unwrap();
    assert_eq!(cfg.d_model, 768);

    let (raw, connection) = tokio_postgres::connect(&dsn(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let client = Client::from(raw);
    assert!(client
        .models()
        .await
        .unwrap()
        .contains(&"gpt3-2.7b".to_string()));
}

#[tokio::test]
async fn timeouts_and_cancels_stop_calls_and_streams() {
    let observer = connect().await;
    let mut client = connect().await;
    let pid = backend_pid(&client).await;
    client.set_timeout(Some(Duration::from_millis(200)));
    let err = client.execute("SELECT pg_sleep(10)").await.unwrap_err();
    assert!(matches!(err, Error::Timeout(_)), "{err}");
    assert_eq!(err.kind(), ErrorKind::Timeout);
    // The cancel request reaches the backend a moment after the client gave up waiting.
    after_cancel(&observer, pid).await;
    client.execute("SELECT 1").await.unwrap();
    client.set_timeout(None);

    // From another task.
    let cancel = client.canceller();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        cancel.cancel().await.unwrap();
    });
    let err = client.execute("SELECT pg_sleep(10)").await.unwrap_err();
    canceller.await.unwrap();
    assert_eq!(err.kind(), ErrorKind::Cancelled, "{err}");
    after_cancel(&observer, pid).await;

    // A generation stream dropped early is cancelled; one read to its end is not, and the
    // next call on the connection is not hit by a stray cancel.
    random_model(&client, "api-stream", "2, 2, 64, 32, 256, 512, 50257", 1).await;
    real_tokenizer(&client, "api-stream").await;
    let long = GenerateOptions::default()
        .model("api-stream")
        .max_tokens(500)
        .eos_token(None)
        .seed(1);
    let mut tokens = client.generate_stream("Once", &long).await.unwrap();
    tokens.next().await.unwrap().unwrap();
    drop(tokens);
    after_cancel(&observer, pid).await;
    let short = long.clone().max_tokens(3);
    let events: Vec<_> = client
        .generate_stream("Once", &short)
        .await
        .unwrap()
        .take(3)
        .collect()
        .await;
    assert!(events.last().unwrap().as_ref().unwrap().is_complete);
    client.execute("SELECT pg_sleep(0.5)").await.unwrap();

    // A stream under a timeout ends with Error::Timeout.
    client.set_timeout(Some(Duration::from_millis(300)));
    let mut tokens = client.generate_stream("Once", &long).await.unwrap();
    let mut last = None;
    while let Some(event) = tokens.next().await {
        last = Some(event);
    }
    assert!(matches!(last, Some(Err(Error::Timeout(_)))), "{last:?}");
    drop(tokens);
    after_cancel(&observer, pid).await;
}

/// TLS: against the test cluster's TLS listener when PG_GPT3_TLS_DSN and PG_GPT3_TLS_ROOT
/// name it (scripts/test.sh does): generation and cancel over TLS. In any case: a server
/// whose certificate does not chain to the given roots is refused.
#[tokio::test]
async fn tls_connections_verify_the_server() {
    use pg_gpt3_client::TlsConfig;
    let own_ca = std::env::var("PG_GPT3_TLS_ROOT").ok();
    let tls_dsn = std::env::var("PG_GPT3_TLS_DSN").ok();
    if let (Some(root), Some(tls_dsn)) = (&own_ca, &tls_dsn) {
        let tls = TlsConfig::root_cert_file(root).unwrap();
        let client = Client::connect_tls(tls_dsn, &tls).await.unwrap();
        let ssl: bool = client
            .raw()
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(ssl);
        assert_eq!(client.model_config("gpt3-125m").await.unwrap().n_layer, 12);
        let cancel = client.canceller();
        let canceller = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            cancel.cancel().await.unwrap();
        });
        let err = client.execute("SELECT pg_sleep(10)").await.unwrap_err();
        canceller.await.unwrap();
        assert_eq!(err.kind(), ErrorKind::Cancelled, "{err}");
        let pool = pg_gpt3_client::Pool::new_tls(tls_dsn, 1, &tls).unwrap();
        pool.get().await.unwrap().execute("SELECT 1").await.unwrap();
    }
    // A CA that signed nothing of the server's.
    let stranger = TlsConfig::root_cert_pem(include_bytes!("data/unrelated_ca.pem")).unwrap();
    let target = tls_dsn.unwrap_or_else(|| format!("{} sslmode=require", dsn()));
    let err = Client::connect_tls(&target, &stranger).await.err().unwrap();
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    assert!(TlsConfig::root_cert_pem(b"not a certificate").is_err());
}
