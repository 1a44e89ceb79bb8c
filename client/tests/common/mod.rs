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

/// The canonical parameter names and shapes `model`'s registry row calls for. Written out here
/// (after the engine's `ModelConfig::param_specs`) so that the check does not trust the code
/// it checks.
pub async fn expected_params(client: &Client, model: &str) -> Vec<(String, Vec<i32>)> {
    let row = client
        .raw()
        .query_one(
            "SELECT n_layer, n_head * d_head, d_model, d_ff, n_positions + position_offset, \
                    coalesce(padded_vocab, vocab), d_embed, qkv_bias, tied_head, ln_placement = 'pre', \
                    position_embedding = 'learned', residual <> 'parallel_one_norm', out_proj_bias, head_bias \
               FROM llm_model_config WHERE model = $1",
            &[&model],
        )
        .await
        .unwrap();
    let (n_layer, da, d, ff, positions, rows): (i32, i32, i32, i32, i32, i32) = (
        row.get(0),
        row.get(1),
        row.get(2),
        row.get(3),
        row.get(4),
        row.get(5),
    );
    let d_embed: Option<i32> = row.get(6);
    let (qkv_bias, tied_head, pre_ln): (bool, bool, bool) = (row.get(7), row.get(8), row.get(9));
    let (learned_positions, has_ln_2, out_proj_bias, head_bias): (bool, bool, bool, bool) =
        (row.get(10), row.get(11), row.get(12), row.get(13));
    let e = d_embed.unwrap_or(d);
    let mut specs = vec![("wte.weight".to_string(), vec![rows, e])];
    if learned_positions {
        specs.push(("wpe.weight".to_string(), vec![positions, d]));
    }
    if d_embed.is_some() {
        specs.push(("project_in.weight".into(), vec![d, e]));
    }
    for i in 0..n_layer {
        let p = |s: &str| format!("layers.{i}.{s}");
        specs.push((p("ln_1.weight"), vec![d]));
        specs.push((p("ln_1.bias"), vec![d]));
        for q in ["q_proj", "k_proj", "v_proj"] {
            specs.push((p(&format!("attn.{q}.weight")), vec![da, d]));
            if qkv_bias {
                specs.push((p(&format!("attn.{q}.bias")), vec![da]));
            }
        }
        specs.push((p("attn.out_proj.weight"), vec![d, da]));
        if out_proj_bias {
            specs.push((p("attn.out_proj.bias"), vec![d]));
        }
        if has_ln_2 {
            specs.push((p("ln_2.weight"), vec![d]));
            specs.push((p("ln_2.bias"), vec![d]));
        }
        specs.push((p("mlp.fc_in.weight"), vec![ff, d]));
        specs.push((p("mlp.fc_in.bias"), vec![ff]));
        specs.push((p("mlp.fc_out.weight"), vec![d, ff]));
        specs.push((p("mlp.fc_out.bias"), vec![d]));
    }
    if pre_ln {
        specs.push(("ln_f.weight".into(), vec![d]));
        specs.push(("ln_f.bias".into(), vec![d]));
    }
    if d_embed.is_some() {
        specs.push(("project_out.weight".into(), vec![e, d]));
    }
    if !tied_head {
        specs.push(("lm_head.weight".into(), vec![rows, e]));
    }
    if head_bias {
        specs.push(("lm_head.bias".into(), vec![rows]));
    }
    specs.sort();
    specs
}

/// The problems with `model`'s stored parameters, none when they are whole: every tensor
/// the registry row calls for is present and no other; every chunk has the tensor's shape;
/// the chunks are numbered from 0 and cover the tensor's values exactly, in order; gradient
/// and AdamW moments, where present, are as long as the weights; `llm_param_info` agrees; and
/// `llm_logits` computes with them.
pub async fn param_problems(client: &Client, model: &str) -> Vec<String> {
    let expected = expected_params(client, model).await;
    let rows = client
        .raw()
        .query(
            "SELECT name, chunk, shape, elem_offset, length(data)::bigint, \
                    coalesce(length(grad), length(data))::bigint, \
                    coalesce(length(m), length(data))::bigint, coalesce(length(v), length(data))::bigint \
               FROM llm_param WHERE model = $1 ORDER BY name COLLATE \"C\", chunk",
            &[&model],
        )
        .await
        .unwrap();
    let mut problems = Vec::new();
    let mut stored: Vec<(String, Vec<i32>)> = Vec::new();
    // (name, next chunk number, elements covered so far)
    let mut covered: Vec<(String, i32, i64)> = Vec::new();
    for row in &rows {
        let (name, chunk, shape): (String, i32, Vec<i32>) = (row.get(0), row.get(1), row.get(2));
        let (offset, bytes, grad, m, v): (i64, i64, i64, i64, i64) =
            (row.get(3), row.get(4), row.get(5), row.get(6), row.get(7));
        if stored.last().map(|(n, _)| n) != Some(&name) {
            stored.push((name.clone(), shape.clone()));
            covered.push((name.clone(), 0, 0));
        } else if stored.last().unwrap().1 != shape {
            problems.push(format!(
                "{name} chunk {chunk}: shape {shape:?} differs from chunk 0"
            ));
        }
        let (_, next, elems) = covered.last_mut().unwrap();
        if chunk != *next || offset != *elems {
            problems.push(format!(
                "{name}: chunk {chunk} at element {offset}, expected chunk {next} at {elems}"
            ));
        }
        if bytes == 0 || bytes % 4 != 0 || [grad, m, v] != [bytes; 3] {
            problems.push(format!(
                "{name} chunk {chunk}: {bytes} bytes of weights, {grad}/{m}/{v} of grad/m/v"
            ));
        }
        *next = chunk + 1;
        *elems += bytes / 4;
    }
    if stored
        .iter()
        .map(|(n, _)| n)
        .ne(expected.iter().map(|(n, _)| n))
    {
        let names = |v: &[(String, Vec<i32>)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        problems.push(format!(
            "tensors {:?}, expected {:?}",
            names(&stored),
            names(&expected)
        ));
        return problems;
    }
    for ((name, shape), (_, want)) in stored.iter().zip(&expected) {
        if shape != want {
            problems.push(format!("{name}: shape {shape:?}, expected {want:?}"));
        }
    }
    for ((name, _, elems), (_, want)) in covered.iter().zip(&expected) {
        let numel: i64 = want.iter().map(|&d| d as i64).product();
        if *elems != numel {
            problems.push(format!(
                "{name}: chunks hold {elems} values, the shape {numel}"
            ));
        }
    }
    let info = client
        .raw()
        .query(
            "SELECT name, shape, numel, chunks FROM llm_param_info WHERE model = $1 ORDER BY name COLLATE \"C\"",
            &[&model],
        )
        .await
        .unwrap();
    let info: Vec<(String, Vec<i32>, i64, i32)> = info
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let agreed: Vec<(String, Vec<i32>, i64, i32)> = expected
        .iter()
        .zip(&covered)
        .map(|((name, shape), (_, chunks, elems))| (name.clone(), shape.clone(), *elems, *chunks))
        .collect();
    if info.len() != agreed.len() {
        problems.push(format!(
            "llm_param_info has {} tensors, expected {}",
            info.len(),
            agreed.len()
        ));
    }
    for (row, want) in info.iter().zip(&agreed) {
        if row != want {
            problems.push(format!(
                "llm_param_info says (name, shape, numel, chunks) {row:?}, the rows {want:?}"
            ));
        }
    }
    let vocab: i32 = client
        .raw()
        .query_one(
            "SELECT vocab FROM llm_model_config WHERE model = $1",
            &[&model],
        )
        .await
        .unwrap()
        .get(0);
    match client
        .raw()
        .query_one("SELECT length(llm_logits('{1}', $1))", &[&model])
        .await
    {
        Ok(row) if row.get::<_, i32>(0) == 4 * vocab => {}
        Ok(row) => problems.push(format!("llm_logits gave {} bytes", row.get::<_, i32>(0))),
        // An overflow comes from computing with every weight: weights that are whole but
        // extreme (a training step with a weight decay of 3e38 leaves them near float32's
        // limit, as the fuzzer's calls may) make the forward pass overflow, cleanly.
        Err(e)
            if e.code() == Some(&tokio_postgres::error::SqlState::NUMERIC_VALUE_OUT_OF_RANGE) => {}
        Err(e) => problems.push(format!(
            "llm_logits failed: {}",
            e.as_db_error()
                .map_or(e.to_string(), |db| db.message().to_string())
        )),
    }
    problems
}

/// A digest of everything stored for `model`'s parameters (names, shapes, chunks, weights,
/// gradients, AdamW moments, step counts), in name and chunk order; it leaves the model's
/// name out, so two models with the same parameters have the same digest. None without rows.
pub async fn param_digest(client: &Client, model: &str) -> Option<String> {
    client
        .raw()
        .query_one(
            "SELECT md5(string_agg(concat_ws(' ', name, chunk, shape, elem_offset, md5(data), \
                    coalesce(md5(grad), '-'), coalesce(md5(m), '-'), coalesce(md5(v), '-'), step), \
                    ',' ORDER BY name, chunk)) \
               FROM llm_param WHERE model = $1",
            &[&model],
        )
        .await
        .unwrap()
        .get(0)
}

/// What is wrong with this database's weight-file cache directory, none when it is clean:
/// a temporary file being written or abandoned, a file the `llm_weight_cache` view does not
/// show as a complete file of a registered model, or a file of one of `models` at a version
/// the model never committed (above its current one: a rolled-back write's). Call it after a
/// use of the cache by a new connection (which sweeps abandoned files and the files of
/// models no longer registered) and while no connection writes.
pub async fn cache_problems(client: &Client, models: &[&str]) -> Vec<String> {
    let rows = client
        .raw()
        .query(
            "WITH dir AS (SELECT 'pg_llm_cache/' || oid AS path FROM pg_database \
                           WHERE datname = current_database()), \
                  listed AS (SELECT pg_ls_dir(path, true, false) AS file FROM dir) \
             SELECT l.file, c.state, c.model, c.version, m.version \
               FROM listed l \
               LEFT JOIN llm_weight_cache c \
                      ON c.file = l.file AND c.database_name = current_database() \
               LEFT JOIN llm_model_config m ON m.model = c.model \
              WHERE c.state IS DISTINCT FROM 'ready' OR m.model IS NULL \
                 OR (c.model = ANY ($1) AND c.version > m.version) \
              ORDER BY 1",
            &[&models],
        )
        .await
        .unwrap();
    rows.iter()
        .map(|r| {
            let (file, state, model): (String, Option<String>, Option<String>) =
                (r.get(0), r.get(1), r.get(2));
            let (version, current): (Option<i64>, Option<i64>) = (r.get(3), r.get(4));
            format!("{file}: state {state:?}, model {model:?}, version {version:?} (current {current:?})")
        })
        .collect()
}
