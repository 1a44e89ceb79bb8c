//! Generates a continuation of a prompt.
//!
//!     PG_GPT3_DSN="host=localhost user=postgres dbname=llm" \
//!         cargo run -p pg_gpt3_client --example generate -- "The database said" [model]

use pg_gpt3_client::{Client, GenerateOptions, DEFAULT_MODEL};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), pg_gpt3_client::Error> {
    let dsn = std::env::var("PG_GPT3_DSN").expect("set PG_GPT3_DSN to a database with pg_llm");
    let mut args = std::env::args().skip(1);
    let prompt = args.next().unwrap_or_else(|| "PostgreSQL is".to_string());
    let model = args.next().unwrap_or_else(|| DEFAULT_MODEL.to_string());

    let client = Client::connect(&dsn).await?;
    let opts = GenerateOptions::default()
        .model(model)
        .max_tokens(40)
        .seed(42);
    let text = client.generate(&prompt, &opts).await?;
    println!("{prompt}{text}");
    Ok(())
}
