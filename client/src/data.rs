//! Tokenizers and training data from the client's disk: files are read here and sent as
//! values, so the server needs no access to the client's files.

use std::path::Path;

use futures_util::pin_mut;
use serde::{Deserialize, Serialize};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;

use crate::{Client, Error, DEFAULT_MODEL};

/// How `Client::dataset_from_text` cuts text into rows (`llm_dataset_from_text`'s arguments
/// and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetOptions {
    pub model: String,
    /// Tokens per row.
    pub block_size: i32,
    /// Tokens between row starts; `None`: `block_size` (no overlap).
    pub stride: Option<i32>,
    pub split: String,
}

impl Default for DatasetOptions {
    fn default() -> Self {
        Self {
            model: DEFAULT_MODEL.to_string(),
            block_size: 2048,
            stride: None,
            split: "train".to_string(),
        }
    }
}

impl DatasetOptions {
    pub fn model(mut self, m: impl Into<String>) -> Self {
        self.model = m.into();
        self
    }
    pub fn block_size(mut self, n: i32) -> Self {
        self.block_size = n;
        self
    }
    pub fn stride(mut self, n: i32) -> Self {
        self.stride = Some(n);
        self
    }
    pub fn split(mut self, s: impl Into<String>) -> Self {
        self.split = s.into();
        self
    }
}

fn read_text(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|e| Error::file(path, e))
}

impl Client {
    /// Loads a byte-level BPE tokenizer for `model` from local files: `vocab` is
    /// encoder.json / vocab.json, `merges` is vocab.bpe / merges.txt (`llm_load_tokenizer`).
    /// Returns the vocabulary size.
    pub async fn load_tokenizer(
        &self,
        model: &str,
        vocab: impl AsRef<Path>,
        merges: impl AsRef<Path>,
    ) -> Result<i32, Error> {
        let vocab = read_text(vocab.as_ref())?;
        let merges = read_text(merges.as_ref())?;
        let row = self
            .query_one(
                "SELECT llm_load_tokenizer($1, $2, $3)",
                &[&model, &vocab, &merges],
            )
            .await?;
        Ok(row.try_get(0)?)
    }

    /// Tokenizes `text` on the server with the model's tokenizer and adds rows of
    /// `block_size` tokens with their next-token targets to llm_dataset
    /// (`llm_dataset_from_text`; documents separated by `<|endoftext|>`). Returns the rows
    /// added.
    pub async fn dataset_from_text(&self, text: &str, opts: &DatasetOptions) -> Result<i64, Error> {
        let row = self
            .query_one(
                "SELECT llm_dataset_from_text($1, $2, $3, $4, $5)",
                &[
                    &opts.model,
                    &text,
                    &opts.block_size,
                    &opts.stride,
                    &opts.split,
                ],
            )
            .await?;
        Ok(row.try_get(0)?)
    }

    /// `dataset_from_text` on each local text file (UTF-8; each file is one call, so one
    /// file's text must fit a `text` value, 1 GB). Returns the rows added.
    pub async fn dataset_from_files<P: AsRef<Path>>(
        &self,
        paths: &[P],
        opts: &DatasetOptions,
    ) -> Result<i64, Error> {
        let mut rows = 0;
        for path in paths {
            rows += self
                .dataset_from_text(&read_text(path.as_ref())?, opts)
                .await?;
        }
        Ok(rows)
    }

    /// Adds token blocks already tokenized on the client to the model's `split` rows of
    /// llm_dataset with one binary COPY. Each block holds T+1 ids: T tokens and the one that
    /// follows (the table's trigger cuts it into tokens and next-token targets). All or
    /// nothing; returns the rows added.
    pub async fn dataset_upload_tokens<B: AsRef<[i32]>>(
        &self,
        model: &str,
        split: &str,
        blocks: impl IntoIterator<Item = B>,
    ) -> Result<u64, Error> {
        self.bounded(async {
            let sink = self
                .pg()
                .copy_in("COPY llm_dataset (model, split, tokens) FROM STDIN (FORMAT binary)")
                .await?;
            let writer = BinaryCopyInWriter::new(sink, &[Type::TEXT, Type::TEXT, Type::INT4_ARRAY]);
            pin_mut!(writer);
            for block in blocks {
                let block = block.as_ref();
                writer.as_mut().write(&[&model, &split, &block]).await?;
            }
            Ok(writer.finish().await?)
        })
        .await
    }
}
