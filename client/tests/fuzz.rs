//! Fuzzing every SQL function and procedure of pg_llm with hostile arguments: NULLs, empty
//! and ragged tensors, NaN and extreme floats, absurd sizes, unknown and empty model names,
//! server paths that are devices, pipes or directories, damaged safetensors checkpoints, odd
//! role names. Every call must end in a result or in an SQL error with a meaningful SQLSTATE:
//! never an internal error (XX000, a Rust panic), never a crashed backend, never a hang. A
//! quarter of the calls run as a plain role that only reads (a member of llm_reader), so that
//! the refusals (42501) are fuzzed too.
//!
//! Nothing is left half-written: after every call, the fuzz model's parameters are unchanged
//! unless a function that writes them ran (and never by the plain role); afterwards every
//! model the calls registered or wrote is whole and consistent with its registry row
//! (`common::param_problems`), the fuzz model holds exactly what the last writing call left,
//! llm_tokenizer_staging holds only halves that successful loads staged, and the weight-file
//! cache holds no file being written or abandoned once the fuzzing connections are gone.
//!
//! `PG_GPT3_FUZZ_CALLS` sets the number of calls (by default 300 per function and 40 per
//! writer, about 17,000); docs/robustness.md records a long run.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{
    backend_pid, cache_problems, connect, param_digest, param_problems, random_model, reconnect,
};
use pg_gpt3_client::{encode, Client};

/// A deterministic pseudo-random source (xorshift64*), so a failure replays exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a>(&mut self, items: &'a [String]) -> &'a str {
        &items[self.below(items.len())]
    }
}

const MODEL: &str = "client-fuzz-test";
/// A model no fuzzed call names: its logits are the cache's first use by a new connection
/// after the fuzzing (which sweeps abandoned files), whatever weights the calls left in MODEL.
const CACHE_USER: &str = "client-fuzz-cache-user";

/// Functions that train, write datasets or copy a model's rows on a sane call.
const WRITERS: [&str; 9] = [
    "llm_checkpoint_load",
    "llm_checkpoint_save",
    "llm_dataset_from_text",
    "llm_dataset_retokenize",
    "llm_eval",
    "llm_train",
    "llm_train_run",
    "llm_train_segment",
    "llm_train_step",
];
const FIFO: &str = "/tmp/pg_gpt3_fuzz_fifo";
const EXPORT_FIFO: &str = "/tmp/pg_gpt3_fuzz_export_fifo";
const EXPORT_DIR: &str = "/tmp/pg_gpt3_fuzz_export";

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn bytea(bytes: &[u8]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("'\\x{hex}'::bytea")
}

fn fixture(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(path)
}

/// Float32 tensors: (ordinary values of many lengths, awkward lengths and values).
fn tensors(rng: &mut Rng) -> (Vec<String>, Vec<String>) {
    let specials = [
        0.0,
        1.0,
        -1.0,
        0.5,
        3.4e38,
        -3.4e38,
        1e38,
        1e-45,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
    ];
    let mut sane = Vec::new();
    let mut hostile = vec![bytea(&[]), bytea(&[0]), bytea(&[1, 2, 3])];
    for len in [1usize, 2, 3, 4, 6, 8, 9, 12, 16, 24, 64, 192, 768] {
        let ordinary: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin()).collect();
        sane.push(bytea(&encode(&ordinary)));
    }
    // Few hostile tensors, so that each is drawn often.
    for len in [1usize, 3, 8, 64] {
        let specials: Vec<f32> = (0..len)
            .map(|_| specials[rng.below(specials.len())])
            .collect();
        hostile.push(bytea(&encode(&specials)));
        let extreme: Vec<f32> = (0..len)
            .map(|i| if i % 2 == 0 { 3e38 } else { -3e38 })
            .collect();
        hostile.push(bytea(&encode(&extreme)));
    }
    (sane, hostile)
}

/// A real checkpoint, and damaged copies of it.
fn checkpoints(rng: &mut Rng) -> Vec<String> {
    let good = std::fs::read(fixture("models/gpt2/model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(good[8..8 + header_len].to_vec()).unwrap();
    let with_header = |h: &str| {
        let mut b = (h.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(h.as_bytes());
        b.extend_from_slice(&good[8 + header_len..]);
        b
    };
    let mut blobs = vec![
        good.clone(),
        good[..good.len() / 2].to_vec(),
        good[..8 + header_len].to_vec(),
        [u64::MAX.to_le_bytes().as_slice(), &good[8..]].concat(),
        with_header(&header.replacen("F32", "I64", 1)),
        with_header(&header.replacen("F32", "F16", 3)),
        with_header(&header.replacen("\"shape\":[", "\"shape\":[4294967296,4294967296,", 1)),
        with_header(&header.replacen("\"shape\":[", "\"shape\":[0,", 1)),
        with_header(&header.replacen(
            "{",
            "{\"wte.weight\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},",
            1,
        )),
    ];
    for _ in 0..12 {
        let mut b = good.clone();
        for _ in 0..4 {
            let i = 8 + rng.below(header_len.min(b.len() - 8));
            b[i] = rng.next() as u8;
        }
        blobs.push(b);
    }
    blobs.iter().map(|b| bytea(b)).collect()
}

/// Where export functions may write: a scratch directory (never the fixtures the import
/// functions read), and the hostile paths of `values` less the ones that name fixtures. An
/// export puts its file in place by renaming, which replaces a named pipe: they get a pipe of
/// their own, so that the imports' stays a pipe.
fn export_paths() -> (Vec<String>, Vec<String>) {
    let sane = [EXPORT_DIR, &format!("{EXPORT_DIR}/one.safetensors")].map(quote);
    let hostile = [
        EXPORT_FIFO,
        "/dev/null",
        "/",
        "/etc/passwd",
        "/proc/self/mem",
        "",
        "relative/dir",
    ]
    .map(quote);
    (sane.to_vec(), hostile.to_vec())
}

/// Values for one argument, by its type and name: (sane values, hostile values). A call mixes
/// mostly sane arguments with one or two hostile ones, so that it gets past the first check.
fn values(ty: &str, name: &str, pools: &Pools) -> (Vec<String>, Vec<String>) {
    let texts = |v: &[&str]| v.iter().map(|s| quote(s)).collect::<Vec<_>>();
    let plain = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let typed = |v: &[&str], ty: &str| {
        v.iter()
            .map(|s| format!("{}::{ty}", quote(s)))
            .collect::<Vec<_>>()
    };
    let fixture_path = |p: &str| fixture(p).to_string_lossy().into_owned();
    let (sane, mut hostile) = match (ty, name) {
        ("bytea", "data") => (
            pools.checkpoints[..1].to_vec(),
            pools.checkpoints[1..].to_vec(),
        ),
        ("bytea", _) => (pools.tensors.clone(), pools.hostile_tensors.clone()),
        ("integer", _) => (
            plain(&["1", "2", "3", "4", "8", "16"]),
            plain(&[
                "0",
                "-1",
                "-7",
                "5",
                "64",
                "2147483647",
                "-2147483648",
                "50256",
                "50257",
            ]),
        ),
        ("bigint", _) => (
            plain(&["0", "1", "42"]),
            plain(&["-1", "9223372036854775807", "-9223372036854775808"]),
        ),
        ("real", _) => (
            plain(&["0::real", "0.5::real", "0.95::real", "1::real"]),
            plain(&[
                "-1::real",
                "2::real",
                "1e-45::real",
                "3e38::real",
                "-3e38::real",
                "'NaN'::real",
                "'Infinity'::real",
                "'-Infinity'::real",
            ]),
        ),
        ("boolean", _) => (plain(&["true", "false"]), vec![]),
        ("integer[]", _) => (
            typed(&["{1}", "{1,2,3}", "{50256,464}"], "int[]"),
            typed(
                &[
                    "{}",
                    "{-1}",
                    "{NULL}",
                    "{50257}",
                    "{2147483647}",
                    "{{1,2},{3,4}}",
                ],
                "int[]",
            )
            .into_iter()
            .chain(plain(&[
                "array_fill(1, ARRAY[100])",
                "array_fill(7, ARRAY[3000])",
            ]))
            .collect(),
        ),
        ("real[]", _) => (
            typed(&["{1,2,3}", "{0.5}"], "real[]"),
            typed(
                &["{}", "{NaN}", "{Infinity,1}", "{3e38,-3e38}", "{NULL}"],
                "real[]",
            ),
        ),
        ("jsonb", _) => (
            vec![
                "NULL::jsonb".into(),
                format!(
                    "{}::jsonb",
                    quote(&std::fs::read_to_string(fixture("models/gpt2/config.json")).unwrap())
                ),
            ],
            typed(
                &[
                    "{}",
                    "[]",
                    "\"gpt2\"",
                    r#"{"model_type": "gpt2", "n_layer": -1, "n_embd": 8, "n_head": 2, "vocab_size": 10, "n_positions": 8}"#,
                    r#"{"model_type": "gpt2", "n_layer": 100000, "n_embd": 100000, "n_head": 1, "vocab_size": 2000000000, "n_positions": 2000000000}"#,
                    r#"{"model_type": "llama"}"#,
                ],
                "jsonb",
            ),
        ),
        ("oid[]", _) => {
            let (good, damaged) = pools.objects.split_first().expect("uploaded objects");
            let arrays = |v: &[String]| v.iter().map(|a| format!("{a}::oid[]")).collect();
            (
                arrays(&[format!("ARRAY[{good}]")]),
                arrays(
                    &damaged
                        .iter()
                        .map(|o| format!("ARRAY[{o}]"))
                        .chain(
                            [
                                "'{}'",
                                "'{0}'",
                                "'{4294967295}'",
                                "'{NULL}'",
                                &format!("ARRAY[{good}, {good}]"),
                            ]
                            .map(String::from),
                        )
                        .collect::<Vec<_>>(),
                ),
            )
        }
        ("text[]", _) => (
            typed(&["{model.safetensors}"], "text[]"),
            typed(
                &[
                    "{}",
                    "{\"\"}",
                    "{NULL}",
                    "{a.safetensors,a.safetensors}",
                    "{model.manifest.jsonl}",
                    "{model.safetensors.index.json}",
                    "{config.json}",
                    "{../../etc/passwd}",
                ],
                "text[]",
            ),
        ),
        ("text", "path") => (
            texts(&[
                &fixture_path("models/gpt2/model.safetensors"),
                &fixture_path("models/gpt2_sharded"),
                &fixture_path("tokenizer/encoder.json"),
                &fixture_path("tokenizer/vocab.bpe"),
            ]),
            texts(&[
                FIFO,
                "/dev/zero",
                "/dev/null",
                "/dev/urandom",
                "/",
                "/etc/passwd",
                "/proc/self/mem",
                "/proc/self/environ",
                "",
                "no/such/relative/path",
            ]),
        ),
        ("text", "model" | "model_name") => (
            texts(&[MODEL]),
            texts(&[
                "client-fuzz-unregistered",
                "",
                "x'; DROP TABLE llm_param; --",
                "ÿ😀",
            ]),
        ),
        ("text", "vocab") => (
            texts(&["{\"a\": 0, \"b\": 1, \"ab\": 2}"]),
            texts(&["{}", "not json", "{\"a\": -5}", "[1,2]", ""]),
        ),
        ("text", "merges") => (
            texts(&["#version: 0.2\na b"]),
            texts(&["", "a b c", "#version: 0.2", "a"]),
        ),
        // Role names (model owners).
        ("name", _) => (
            typed(&["postgres", PLAIN_ROLE, "llm_reader"], "name"),
            typed(
                &[
                    "",
                    "no_such_role",
                    "public",
                    "Postgres",
                    "\"postgres\"",
                    "pg_monitor",
                    "ÿ😀",
                    &"r".repeat(100),
                ],
                "name",
            ),
        ),
        ("text", _) => (
            texts(&["Hello", "😀 日本語 \t\n"]),
            texts(&["", "<|endoftext|>", &"long prompt ".repeat(200)]),
        ),
        (other, _) => panic!("no values for arguments of type {other}"),
    };
    hostile.push(format!("NULL::{ty}"));
    (sane, hostile)
}

struct Pools {
    tensors: Vec<String>,
    hostile_tensors: Vec<String>,
    checkpoints: Vec<String>,
    /// Large objects holding the real checkpoint (first) and damaged copies of it.
    objects: Vec<u32>,
}

/// One function of pg_llm: name, whether it is a procedure (called with CALL), argument types
/// and argument names.
struct Function {
    name: String,
    procedure: bool,
    types: Vec<String>,
    arg_names: Vec<String>,
}

/// Calls for each function: `PG_GPT3_FUZZ_CALLS` in all, shared in proportion to a weight of
/// 2 for a writer and 15 for any other function. The default is 20 calls per unit of weight:
/// 300 per function and 40 per writer (training functions write the model, or run until the
/// 3 s timeout, on most sane calls: fewer of them keep the suite's time in bounds).
fn calls_per_function(functions: &[Function]) -> Vec<usize> {
    let weights: Vec<usize> = functions
        .iter()
        .map(|f| {
            if WRITERS.contains(&f.name.as_str()) {
                2
            } else {
                15
            }
        })
        .collect();
    let sum: usize = weights.iter().sum();
    let total = match std::env::var("PG_GPT3_FUZZ_CALLS") {
        Ok(v) => v
            .parse()
            .expect("PG_GPT3_FUZZ_CALLS must be a number of calls"),
        Err(_) => 20 * sum,
    };
    let mut cumulative = 0;
    weights
        .iter()
        .map(|w| {
            let before = total * cumulative / sum;
            cumulative += w;
            total * cumulative / sum - before
        })
        .collect()
}

/// The role a share of the calls runs as (`SET ROLE` on its own connection): it may read
/// what a reader may read and nothing else, so every write and every server file must be
/// refused cleanly (42501), never crash.
const PLAIN_ROLE: &str = "regress_llm_fuzz";
/// One call in PLAIN_SHARE runs as PLAIN_ROLE.
const PLAIN_SHARE: usize = 4;

/// Creates PLAIN_ROLE with a reader's privileges (the extension's llm_reader role).
async fn create_plain_role(setup: &Client) {
    setup
        .raw()
        .batch_execute(&format!(
            "DO $$ BEGIN \
               IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{PLAIN_ROLE}') \
               THEN CREATE ROLE {PLAIN_ROLE} LOGIN; END IF; END $$; \
             GRANT llm_reader TO {PLAIN_ROLE}"
        ))
        .await
        .unwrap();
}

/// The connections calls run on: as the test's (super)user, and as PLAIN_ROLE.
struct Fuzzers {
    admin: Client,
    plain: Client,
    pids: Vec<i32>,
}

impl Fuzzers {
    /// Waits for the server to accept connections (after a crash restart, if any).
    async fn connect() -> Self {
        let admin = fuzz_connection().await;
        let plain = fuzz_connection().await;
        plain
            .execute(&format!("SET ROLE {PLAIN_ROLE}"))
            .await
            .unwrap();
        let pids = vec![backend_pid(&admin).await, backend_pid(&plain).await];
        Self { admin, plain, pids }
    }
}

async fn fuzz_connection() -> Client {
    let client = reconnect().await;
    client
        .execute("SET statement_timeout = '3s'")
        .await
        .unwrap();
    client
}

async fn version(client: &Client, model: &str) -> Option<i64> {
    client
        .raw()
        .query_opt(
            "SELECT version FROM llm_model_config WHERE model = $1",
            &[&model],
        )
        .await
        .unwrap()
        .map(|r| r.get(0))
}

/// Functions that may write the fuzz model's parameters: a call of any other function that
/// changes them (gives the model a new version), or any call as PLAIN_ROLE that does, fails.
const PARAM_WRITERS: [&str; 11] = [
    "llm_checkpoint_load",
    "llm_init_params",
    "llm_train",
    "llm_train_run",
    "llm_train_segment",
    "llm_train_step",
    "pg_llm_import_npz",
    "pg_llm_import_npz_bytes",
    "pg_llm_import_safetensors",
    "pg_llm_import_safetensors_bytes",
    "pg_llm_import_safetensors_lo",
];

/// Staged tokenizer halves: (model, digest of the row, whether it holds the vocabulary,
/// whether it holds the merges).
async fn staging(client: &Client) -> Vec<(String, String, bool, bool)> {
    let rows = client
        .raw()
        .query(
            "SELECT model, md5(concat_ws(' ', md5(vocab), md5(merges))), vocab IS NOT NULL, \
                    merges IS NOT NULL \
               FROM llm_tokenizer_staging ORDER BY model",
            &[],
        )
        .await
        .unwrap();
    rows.iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

#[tokio::test]
async fn no_call_is_an_internal_error_a_crash_or_a_hang() {
    let mut setup = connect().await;
    random_model(&setup, MODEL, "2, 2, 32, 16, 128, 64, 50257", 1).await;
    random_model(&setup, CACHE_USER, "1, 2, 32, 16, 128, 64, 512", 1).await;
    create_plain_role(&setup).await;
    // Imports with a config.json register the models they name: remove those afterwards.
    let registered = "SELECT coalesce(array_agg(model), '{}'), coalesce(array_agg(version), '{}') \
                      FROM llm_model_config";
    let row = setup.raw().query_one(registered, &[]).await.unwrap();
    let (before, versions_before): (Vec<String>, Vec<i64>) = (row.get(0), row.get(1));
    // A half tokenizer an earlier run staged for the fuzz model.
    setup
        .raw()
        .execute(
            "DELETE FROM llm_tokenizer_staging WHERE model = $1",
            &[&MODEL],
        )
        .await
        .unwrap();
    let staged_before = staging(&setup).await;
    setup
        .raw()
        .batch_execute(&format!(
            "COPY (SELECT 1) TO PROGRAM 'rm -f {FIFO} {EXPORT_FIFO}; mkfifo -m 666 {FIFO} {EXPORT_FIFO}'"
        ))
        .await
        .unwrap();
    let functions: Vec<Function> = setup
        .raw()
        .query(
            "SELECT p.proname, p.prokind = 'p', \
                    coalesce(string_to_array(oidvectortypes(p.proargtypes), ', '), '{}'), \
                    coalesce(p.proargnames[1:p.pronargs], '{}') \
               FROM pg_proc p \
               JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e' \
               JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'pg_llm' \
              WHERE p.prorettype IS DISTINCT FROM 'trigger'::regtype \
              ORDER BY 1, 3",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| Function {
            name: r.get(0),
            procedure: r.get(1),
            types: r.get(2),
            arg_names: r.get(3),
        })
        .collect();
    assert!(functions.len() >= 40, "{} functions", functions.len());

    let mut rng = Rng(0x5eed_cafe_f00d_0001);
    let (sane_tensors, hostile_tensors) = tensors(&mut rng);
    let checkpoints = checkpoints(&mut rng);
    // The uploads pg_llm_import_safetensors_lo reads: the real checkpoint and four damaged.
    let mut objects = Vec::new();
    for blob in checkpoints.iter().take(5) {
        let row = setup
            .raw()
            .query_one(&format!("SELECT lo_from_bytea(0, {blob})"), &[])
            .await
            .unwrap();
        objects.push(row.get::<_, u32>(0));
    }
    let pools = Pools {
        tensors: sane_tensors,
        hostile_tensors,
        checkpoints,
        objects: objects.clone(),
    };
    let shares = calls_per_function(&functions);
    let total_calls: usize = shares.iter().sum();
    let mut fuzz = Fuzzers::connect().await;
    // SQLSTATEs (or "ok") by the role that called.
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    let mut plain_outcomes: BTreeMap<String, usize> = BTreeMap::new();
    let mut failures = Vec::new();
    // The fuzz model's version and a digest of its parameters as the last writer left them.
    let mut last_version = version(&setup, MODEL).await;
    let mut digest = param_digest(&setup, MODEL).await;
    // The call that wrote them last, to name in a failure.
    let mut last_write = String::from("none");
    // Models that pg_llm_load_bpe_vocab or _merges staged a half tokenizer for, as literals.
    let mut staged_for = Vec::new();
    let started = Instant::now();
    // FUZZ_TRACE=<function> prints that function's calls.
    let trace = std::env::var("FUZZ_TRACE").ok();
    for (function, &calls) in functions.iter().zip(&shares) {
        let name = function.name.as_str();
        let candidates: Vec<(Vec<String>, Vec<String>)> = function
            .types
            .iter()
            .zip(
                function
                    .arg_names
                    .iter()
                    .chain(std::iter::repeat(&String::new())),
            )
            .map(|(ty, arg)| {
                if name.starts_with("pg_llm_export") && arg == "path" {
                    export_paths()
                } else {
                    values(ty, arg, &pools)
                }
            })
            .collect();
        let model_arg = function.arg_names.iter().position(|a| a == "model");
        for _ in 0..calls {
            // One or two hostile arguments, the others sane.
            let hostile: Vec<usize> = (0..1 + rng.below(2))
                .map(|_| rng.below(candidates.len().max(1)))
                .collect();
            let args: Vec<&str> = candidates
                .iter()
                .enumerate()
                .map(|(i, (sane, bad))| {
                    if hostile.contains(&i) && !bad.is_empty() {
                        rng.pick(bad)
                    } else {
                        rng.pick(sane)
                    }
                })
                .collect();
            let sql = if function.procedure {
                format!("CALL {name}({})", args.join(", "))
            } else {
                format!("SELECT * FROM {name}({})", args.join(", "))
            };
            let plain = rng.below(PLAIN_SHARE) == 0;
            let role = if plain { PLAIN_ROLE } else { "admin" };
            if trace.as_deref() == Some(name) {
                println!("{role}: {}", shorten(&sql));
            }
            let client = if plain { &fuzz.plain } else { &fuzz.admin };
            let outcome = match tokio::time::timeout(
                Duration::from_secs(30),
                client.raw().batch_execute(&sql),
            )
            .await
            {
                Err(_) => "hang".to_string(),
                Ok(Ok(())) => "ok".to_string(),
                Ok(Err(e)) => match e.code() {
                    Some(code) => code.code().to_string(),
                    None => "connection lost".to_string(),
                },
            };
            if ["XX000", "hang", "connection lost"].contains(&outcome.as_str()) {
                failures.push(format!("{outcome} as {role}: {}", shorten(&sql)));
                // A crash restarts the server and drops every connection.
                fuzz = Fuzzers::connect().await;
                setup = reconnect().await;
            }
            let now = version(&setup, MODEL).await;
            if now != last_version {
                if plain || !PARAM_WRITERS.contains(&name) {
                    failures.push(format!(
                        "{MODEL}'s parameters changed ({last_version:?} -> {now:?}) by a call \
                         as {role}: {}",
                        shorten(&sql)
                    ));
                }
                last_version = now;
                digest = param_digest(&setup, MODEL).await;
                last_write = format!("as {role}: {}", shorten(&sql));
            }
            if outcome == "ok" && name.starts_with("pg_llm_load_bpe") {
                staged_for.extend(model_arg.map(|i| args[i].to_string()));
            }
            let by_role = if plain {
                &mut plain_outcomes
            } else {
                &mut outcomes
            };
            *by_role.entry(outcome).or_default() += 1;
        }
    }
    let elapsed = started.elapsed();

    // Nothing half-written. The fuzz connections are closed first: nothing is being written.
    let pids = std::mem::take(&mut fuzz.pids);
    drop(fuzz);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let open: i64 = setup
            .raw()
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY ($1)",
                &[&pids],
            )
            .await
            .unwrap()
            .get(0);
        if open == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the fuzz connections stay open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every model the fuzz registered or wrote (and the fuzz model) is whole.
    let touched: Vec<String> = setup
        .raw()
        .query(
            "SELECT model FROM llm_model_config c \
              WHERE EXISTS (SELECT FROM llm_param p WHERE p.model = c.model) \
                AND (model = $3 OR (model, version) NOT IN \
                     (SELECT * FROM unnest($1::text[], $2::bigint[]))) \
              ORDER BY model",
            &[&before, &versions_before, &MODEL],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for model in &touched {
        let problems = param_problems(&setup, model).await;
        if model == MODEL && !problems.is_empty() {
            failures.push(format!("{MODEL} was last written by a call {last_write}"));
        }
        for problem in problems {
            failures.push(format!("model \"{model}\": {problem}"));
        }
    }
    if param_digest(&setup, MODEL).await != digest {
        failures.push(format!(
            "{MODEL}'s parameters differ from what the last call that wrote them left"
        ));
    }
    // Staged half tokenizers: only those a successful load asked for, and only halves.
    let staged_after = staging(&setup).await;
    for (model, _, vocab, merges) in staged_after.iter().filter(|s| !staged_before.contains(s)) {
        if !staged_for.contains(&quote(model)) || vocab == merges {
            failures.push(format!(
                "llm_tokenizer_staging holds {model:?} (vocab {vocab}, merges {merges})"
            ));
        }
    }
    // No weight file half-written or abandoned once a new connection has used the cache.
    let checker = connect().await;
    if let Err(e) = checker
        .raw()
        .execute("SELECT length(llm_logits('{1}', $1))", &[&CACHE_USER])
        .await
    {
        failures.push(format!("logits of {CACHE_USER}: {e:?}"));
    }
    let touched: Vec<&str> = touched.iter().map(String::as_str).collect();
    for problem in cache_problems(&checker, &touched).await {
        failures.push(format!("weight cache: {problem}"));
    }

    setup
        .raw()
        .execute(
            "DELETE FROM llm_model_config WHERE model <> ALL ($1)",
            &[&before],
        )
        .await
        .unwrap();
    setup
        .raw()
        .execute(
            "DELETE FROM llm_tokenizer_staging WHERE model = $1",
            &[&MODEL],
        )
        .await
        .unwrap();
    setup
        .raw()
        .execute("SELECT lo_unlink(o) FROM unnest($1::oid[]) o", &[&objects])
        .await
        .unwrap();
    let mut all = outcomes.clone();
    for (outcome, n) in &plain_outcomes {
        *all.entry(outcome.clone()).or_default() += n;
    }
    println!(
        "{total_calls} calls over {} functions in {elapsed:.1?} ({:.0} calls/s); {} models checked \
         after; by SQLSTATE: {all:?}; as {PLAIN_ROLE}: {plain_outcomes:?}",
        functions.len(),
        total_calls as f64 / elapsed.as_secs_f64(),
        touched.len(),
    );
    assert!(
        failures.is_empty(),
        "{} bad outcomes:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // The fuzzer reached past argument checking: some calls succeeded, also as PLAIN_ROLE.
    let ok = |m: &BTreeMap<String, usize>| m.get("ok").copied().unwrap_or(0);
    assert!(
        ok(&all) > functions.len() && ok(&plain_outcomes) > 0,
        "too few calls succeeded: {all:?} (PG_GPT3_FUZZ_CALLS too small?)"
    );
}

fn shorten(sql: &str) -> String {
    if sql.len() <= 400 {
        return sql.to_string();
    }
    let cut = (0..=400)
        .rev()
        .find(|&i| sql.is_char_boundary(i))
        .unwrap_or(0);
    format!("{}… ({} bytes)", &sql[..cut], sql.len())
}
