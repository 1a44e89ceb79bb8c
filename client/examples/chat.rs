//! An interactive loop: each line you type is added to the conversation and the model's
//! reply streams back as it is generated. An empty line or end of input quits.
//!
//!     PG_GPT3_DSN=... cargo run -p pg_gpt3_client --example chat -- [model]

use std::io::Write;

use futures_util::StreamExt;
use pg_gpt3_client::{Client, GenerateOptions, DEFAULT_MODEL};
use tokio::io::{AsyncBufReadExt, BufReader};

/// Characters of conversation kept as the prompt (the model's context is longer; a short
/// window keeps each reply quick).
const WINDOW_CHARS: usize = 2000;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), pg_gpt3_client::Error> {
    let dsn = std::env::var("PG_GPT3_DSN").expect("set PG_GPT3_DSN to a database with pg_llm");
    let model = std::env::args()
        .nth(1)
        .unwrap_or_else(|| DEFAULT_MODEL.to_string());
    let client = Client::connect(&dsn).await?;
    let opts = GenerateOptions::default()
        .model(model)
        .max_tokens(80)
        .temperature(0.8);

    let mut conversation = String::new();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        print!("you> ");
        std::io::stdout().flush().ok();
        let Ok(Some(line)) = lines.next_line().await else {
            break;
        };
        if line.trim().is_empty() {
            break;
        }
        conversation.push_str(&format!("User: {line}\nAssistant:"));
        let start = conversation.len().saturating_sub(WINDOW_CHARS);
        let start = (start..conversation.len())
            .find(|&i| conversation.is_char_boundary(i))
            .unwrap_or(0);
        let prompt = conversation[start..].to_string();

        print!("model>");
        let mut reply = String::new();
        let mut tokens = client.generate_stream(&prompt, &opts).await?;
        while let Some(event) = tokens.next().await {
            let event = event?;
            // A reply ends where the model starts the user's next turn.
            if event.text.contains("\nUser:") {
                break;
            }
            print!("{}", event.token);
            std::io::stdout().flush().ok();
            reply = event.text;
        }
        println!();
        conversation.push_str(&reply);
        conversation.push('\n');
    }
    Ok(())
}
