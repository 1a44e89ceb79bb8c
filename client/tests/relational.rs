//! The relational path's autograd tape belongs to its session: two connections recording at
//! the same time never see, change or clear each other's tape, and a backward pass in one
//! runs while the other records.

mod common;

use common::{connect, random_model};
use pg_gpt3_client::Client;

const MODEL: &str = "client-relational-test";
const DIMS: &str = "2, 2, 16, 8, 32, 16, 64";
const LOSS: &str = "SELECT pg_llm_cross_entropy_mean(llm_forward_gpt3($1, $2), $3)";

async fn records(client: &Client) -> i64 {
    let row = client
        .raw()
        .query_one("SELECT count(*) FROM llm_tape", &[])
        .await
        .unwrap();
    row.get(0)
}

async fn with_gradients(client: &Client) -> i64 {
    let row = client
        .raw()
        .query_one(
            "SELECT count(*) FROM llm_tensor_rt WHERE grad IS NOT NULL",
            &[],
        )
        .await
        .unwrap();
    row.get(0)
}

async fn record_loss(client: &Client, tokens: &[i32]) -> f32 {
    let targets: Vec<i32> = tokens.iter().map(|t| (t + 1) % 64).collect();
    let row = client
        .raw()
        .query_one(LOSS, &[&MODEL, &tokens, &targets])
        .await
        .unwrap();
    row.get(0)
}

#[tokio::test]
async fn concurrent_sessions_keep_their_own_tapes() {
    let (a, b) = (connect().await, connect().await);
    random_model(&a, MODEL, DIMS, 3).await;
    for c in [&a, &b] {
        c.raw()
            .batch_execute("SET pg_llm.autograd = on")
            .await
            .unwrap();
    }

    record_loss(&a, &[1, 2, 3, 4]).await;
    let one_forward = records(&a).await;
    assert!(one_forward > 0);
    assert_eq!(records(&b).await, 0, "b sees a's tape");

    // Both record at once: each tape grows by its own forward only.
    let (la, lb) = tokio::join!(
        record_loss(&a, &[5, 6, 7, 8, 9]),
        record_loss(&b, &[10, 11, 12])
    );
    assert!(la > 0.0 && lb > 0.0);
    assert_eq!(records(&a).await, 2 * one_forward);
    assert_eq!(records(&b).await, one_forward);

    // a's backward runs while b records again; only a's tensors get gradients.
    let backprop = "SELECT llm_backprop((SELECT max(output) FROM llm_tape))";
    let (grads, _) = tokio::join!(a.raw().query_one(backprop, &[]), record_loss(&b, &[13, 14]));
    let grads: i32 = grads.unwrap().get(0);
    assert!(grads > 0);
    assert!(with_gradients(&a).await > 0);
    assert_eq!(with_gradients(&b).await, 0, "b's tape got a's gradients");

    // b's reset leaves a's tape alone.
    b.raw()
        .batch_execute("SELECT llm_tape_reset()")
        .await
        .unwrap();
    assert_eq!(records(&b).await, 0);
    assert_eq!(records(&a).await, 2 * one_forward);
}
