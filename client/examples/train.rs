//! Trains a model on its dataset rows with a progress bar showing loss and tokens/s.
//!
//!     PG_GPT3_DSN=... cargo run -p pg_gpt3_client --example train -- [model] [steps] [text file]
//!
//! With a text file, its text is tokenized on the server and added to the model's training
//! rows first (blocks of 128 tokens).

use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use pg_gpt3_client::{Client, DatasetOptions, TrainOptions, DEFAULT_MODEL};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), pg_gpt3_client::Error> {
    let dsn = std::env::var("PG_GPT3_DSN").expect("set PG_GPT3_DSN to a database with pg_llm");
    let mut args = std::env::args().skip(1);
    let model = args.next().unwrap_or_else(|| DEFAULT_MODEL.to_string());
    let steps: i32 = args
        .next()
        .map_or(20, |s| s.parse().expect("steps: a number"));
    let client = Client::connect(&dsn).await?;

    if let Some(file) = args.next() {
        let data = DatasetOptions::default().model(&model).block_size(128);
        let rows = client.dataset_from_files(&[file], &data).await?;
        println!("added {rows} training rows");
    }

    let bar = ProgressBar::new(steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise}]")
            .expect("a valid template"),
    );
    let opts = TrainOptions::default()
        .model(&model)
        .n_steps(steps)
        .batch_size(4)
        .lr_max(3e-4)
        .warmup(steps / 10);
    let mut run = client.train(&opts).await?;
    while let Some(step) = run.next().await {
        let step = step?;
        bar.set_message(format!(
            "loss {:.4}  lr {:.2e}  {:.0} tokens/s",
            step.loss, step.lr, step.tokens_per_s
        ));
        bar.inc(1);
    }
    bar.finish();
    let id = client
        .checkpoint_save(&model, Some("examples/train"))
        .await?;
    println!("saved checkpoint {id}");
    Ok(())
}
