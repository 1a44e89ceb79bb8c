// `#[pg_test]`s for the SQL glue: argument conversion, composite results, error mapping and
// GUCs, inside a real backend. The public SQL surface is specified by pg_regress
// (tests/sql → expected/).

use pgrx::prelude::*;

fn floats(sql: &str) -> Vec<f32> {
    Spi::get_one::<Vec<f32>>(sql).expect("query").expect("non-null")
}

#[pg_test]
fn matmul_round_trips_through_bytea() {
    let c = floats(
        "SELECT pg_llm_to_array(pg_llm_matmul(pg_llm_from_array('{1,2,3,4,5,6}'), \
         pg_llm_from_array('{1,0,0,1,1,1}'), 2, 3, 2))",
    );
    assert_eq!(c, vec![4.0, 5.0, 10.0, 11.0]);
}

#[pg_test]
fn composite_results_have_named_fields() {
    let dbeta = floats(
        "SELECT pg_llm_to_array((pg_llm_layernorm_backward(pg_llm_from_array('{1,2,3,4}'), \
         pg_llm_from_array('{1,1,2,2}'), pg_llm_from_array('{1,1}'), 1e-5)).dbeta)",
    );
    assert_eq!(dbeta, vec![3.0, 3.0]);
    let m = floats(
        "SELECT pg_llm_to_array((pg_llm_adamw_step(pg_llm_from_array('{1}'), pg_llm_from_array('{0.5}'), \
         pg_llm_from_array('{0}'), pg_llm_from_array('{0}'), 0.1, 0.9, 0.95, 1e-8, 0, 1)).m)",
    );
    assert!((m[0] - 0.05).abs() < 1e-7);
}

#[pg_test]
fn errors_carry_their_sqlstate() {
    // Spi runs one statement per call: run the DO block, then read the saved state.
    let check = |sql: &str, expected: &str| {
        Spi::run(&format!(
            "DO $$ BEGIN PERFORM {sql}; PERFORM set_config('pg_llm_test.state', 'none', false); \
             EXCEPTION WHEN OTHERS THEN PERFORM set_config('pg_llm_test.state', SQLSTATE, false); END $$"
        ))
        .expect("do block");
        let got = Spi::get_one::<String>("SELECT current_setting('pg_llm_test.state')").unwrap().unwrap();
        assert_eq!(got, expected, "{sql}");
    };
    check("pg_llm_matmul('\\x00'::bytea, '\\x00'::bytea, 1, 1, 1)", "22023");
    check("pg_llm_gelu('\\x000000'::bytea)", "22000");
    check("pg_llm_gelu(NULL)", "22004");
    check("pg_llm_matmul(pg_llm_from_array('{1}'), pg_llm_from_array('{1}'), 1, 1, -1)", "22023");
    check("pg_llm_transpose(pg_llm_from_array('{1}'), 1000000, 1000000)", "54000");
    check("pg_llm_add(pg_llm_from_array('{3e38}'), pg_llm_from_array('{3e38}'))", "22003");
    check("llm_get_model_config('no-such-model')", "42704");
}

#[pg_test]
fn threads_guc_is_honoured() {
    Spi::run("SET pg_llm.threads = 1").unwrap();
    let c = floats(
        "SELECT pg_llm_to_array(pg_llm_matmul(pg_llm_from_array(array_fill(1::float4, ARRAY[4096])), \
         pg_llm_from_array(array_fill(1::float4, ARRAY[4096])), 64, 64, 64))",
    );
    assert_eq!(pg_llm_engine::parallel::threads(), 1);
    assert!(c.iter().all(|v| *v == 64.0));
    Spi::run("SET pg_llm.threads = 2").unwrap();
    let _ = floats("SELECT pg_llm_to_array(pg_llm_gelu(pg_llm_from_array('{1}')))");
    assert_eq!(pg_llm_engine::parallel::threads(), 2);
}

#[pg_test]
fn registry_is_seeded_with_the_gpt3_family() {
    let n = Spi::get_one::<i64>("SELECT count(*) FROM llm_model_config WHERE family = 'gpt3'").unwrap().unwrap();
    assert_eq!(n, 8);
    let heads = Spi::get_one::<i32>("SELECT n_head FROM llm_get_model_config('gpt3-175b')").unwrap().unwrap();
    assert_eq!(heads, 96);
    let version = || Spi::get_one::<i64>("SELECT version FROM llm_model_config WHERE model = 'gpt2-small'").unwrap().unwrap();
    let before = version();
    Spi::run("UPDATE llm_model_config SET note = 'x' WHERE model = 'gpt2-small'").unwrap();
    assert_ne!(version(), before, "a change gives the model a new version");
}

#[pg_test]
fn internal_reads_assign_no_transaction_id_and_see_own_writes() {
    let xid = || unsafe { pg_sys::GetCurrentTransactionIdIfAny() };
    let before = xid();
    let models = crate::spi::read_one::<i64>("SELECT count(*) FROM llm_model_config", &[]).unwrap();
    assert!(models.unwrap() >= 9);
    assert_eq!(xid(), before, "a read assigned a transaction id");
    // A write earlier in the same transaction is visible to a later read, also inside one
    // consistent block (which takes its snapshot after the write).
    Spi::run("UPDATE llm_model_config SET note = 'seen' WHERE model = 'gpt2-small'").unwrap();
    let note = crate::spi::consistent(|| {
        crate::spi::read_one::<String>(
            "SELECT note FROM llm_model_config WHERE model = $1",
            &["gpt2-small".into()],
        )
    })
    .unwrap();
    assert_eq!(note.as_deref(), Some("seen"));
}
