//! Integration tests against a real server: set PG_GPT3_DSN to a database with pg_llm
//! installed (scripts/test.sh does). Without it these tests fail rather than pass vacuously.

use pg_gpt3_client::{Client, DEFAULT_MODEL};

fn dsn() -> String {
    std::env::var("PG_GPT3_DSN")
        .expect("PG_GPT3_DSN must point at a database with pg_llm (scripts/test.sh sets it)")
}

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
