//! Prints a generation token by token, as the server produces them.
//!
//!     PG_GPT3_DSN=... cargo run -p pg_gpt3_client --example stream -- "Once upon a time" [model]

use std::io::Write;

use futures_util::StreamExt;
use pg_gpt3_client::{Client, GenerateOptions, DEFAULT_MODEL};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), pg_gpt3_client::Error> {
    let dsn = std::env::var("PG_GPT3_DSN").expect("set PG_GPT3_DSN to a database with pg_llm");
    let mut args = std::env::args().skip(1);
    let prompt = args
        .next()
        .unwrap_or_else(|| "Once upon a time".to_string());
    let model = args.next().unwrap_or_else(|| DEFAULT_MODEL.to_string());

    let client = Client::connect(&dsn).await?;
    let opts = GenerateOptions::default().model(model).max_tokens(64);
    print!("{prompt}");
    let mut tokens = client.generate_stream(&prompt, &opts).await?;
    while let Some(event) = tokens.next().await {
        print!("{}", event?.token);
        std::io::stdout().flush().ok();
    }
    println!();
    Ok(())
}
