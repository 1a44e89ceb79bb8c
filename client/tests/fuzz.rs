//! Fuzzing every SQL function of pg_llm with hostile arguments: NULLs, empty and ragged
//! tensors, NaN and extreme floats, absurd sizes, unknown and empty model names, server paths
//! that are devices, pipes or directories, and damaged safetensors checkpoints. Every call must
//! end in a result or in an SQL error with a meaningful SQLSTATE: never an internal error
//! (XX000, a Rust panic), never a crashed backend, never a hang.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{connect, random_model};
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

/// Values for one argument, by its type and name: (sane values, hostile values). A call mixes
/// mostly sane arguments with one or two hostile ones, so that it gets past the first check.
/// Where export functions may write: a scratch directory (never the fixtures the import
/// functions read), and the hostile paths of `values` less the ones that name fixtures.
fn export_paths() -> (Vec<String>, Vec<String>) {
    let sane = [EXPORT_DIR, &format!("{EXPORT_DIR}/one.safetensors")].map(quote);
    let hostile = [
        FIFO,
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
        ("text", _) => (
            texts(&["Hello", "😀 日本語 \t\n"]),
            texts(&["", "<|endoftext|>", &"long prompt ".repeat(200)]),
        ),
        // Role names (llm_has_privileges_of).
        ("name", _) => (
            texts(&["postgres", "llm_reader"]),
            texts(&["no_such_role", "", "pg_monitor", "ÿ😀"]),
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

#[tokio::test]
async fn no_call_is_an_internal_error_a_crash_or_a_hang() {
    let setup = connect().await;
    random_model(&setup, MODEL, "2, 2, 32, 16, 128, 64, 50257", 1).await;
    // Imports with a config.json register the models they name: remove those afterwards.
    let registered = "SELECT coalesce(array_agg(model), '{}') FROM llm_model_config";
    let before: Vec<String> = setup.raw().query_one(registered, &[]).await.unwrap().get(0);
    setup
        .raw()
        .batch_execute(&format!(
            "COPY (SELECT 1) TO PROGRAM 'rm -f {FIFO}; mkfifo -m 666 {FIFO}'"
        ))
        .await
        .unwrap();
    let functions: Vec<(String, Vec<String>, Vec<String>)> = setup
        .raw()
        .query(
            "SELECT p.proname, coalesce(string_to_array(oidvectortypes(p.proargtypes), ', '), '{}'), \
                    coalesce(p.proargnames[1:p.pronargs], '{}') \
               FROM pg_proc p \
               JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e' \
               JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'pg_llm' \
              WHERE p.prorettype <> 'trigger'::regtype \
              ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
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
    let mut client = fuzz_connection().await;
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    let mut failures = Vec::new();
    let calls_per_function = 300;
    let mut total_calls = 0;
    let started = Instant::now();
    // FUZZ_TRACE=<function> prints that function's calls.
    let trace = std::env::var("FUZZ_TRACE").ok();
    for (name, types, arg_names) in &functions {
        let candidates: Vec<(Vec<String>, Vec<String>)> = types
            .iter()
            .zip(arg_names.iter().chain(std::iter::repeat(&String::new())))
            .map(|(ty, arg)| {
                if name.starts_with("pg_llm_export") && arg == "path" {
                    export_paths()
                } else {
                    values(ty, arg, &pools)
                }
            })
            .collect();
        // Training functions write the model (or run until the 3 s timeout) on most sane
        // calls: fewer of them keep the suite's time in bounds.
        let calls = if WRITERS.contains(&name.as_str()) {
            40
        } else {
            calls_per_function
        };
        total_calls += calls;
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
            let sql = format!("SELECT * FROM {name}({})", args.join(", "));
            if trace.as_deref() == Some(name.as_str()) {
                println!("{}", shorten(&sql));
            }
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
                failures.push(format!("{outcome}: {}", shorten(&sql)));
                client = fuzz_connection().await;
            }
            *outcomes.entry(outcome).or_default() += 1;
        }
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
        .execute("SELECT lo_unlink(o) FROM unnest($1::oid[]) o", &[&objects])
        .await
        .unwrap();
    println!(
        "{} calls over {} functions in {:?}: {outcomes:?}",
        total_calls,
        functions.len(),
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} bad outcomes:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // The fuzzer reached past argument checking: some calls succeeded.
    assert!(outcomes.get("ok").copied().unwrap_or(0) > functions.len());
}

async fn fuzz_connection() -> Client {
    let client = connect().await;
    client
        .execute("SET statement_timeout = '3s'")
        .await
        .unwrap();
    client
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
