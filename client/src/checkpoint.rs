//! Checkpoints: Hugging Face checkpoints moved between the client's disk and the server as
//! bytes over the connection (in pieces, never the whole model in one allocation), and the
//! server's in-database checkpoints.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio_postgres::IsolationLevel;

use crate::{Client, Error};

/// Bytes per piece sent or received: what the client holds of a checkpoint at a time.
const PIECE_BYTES: usize = 16 << 20;

/// A checkpoint's files as uploaded: (the name the server sees, the local path).
type Uploads = Vec<(String, PathBuf)>;

/// The files of the checkpoint at `path` and the config.json beside them, if any.
fn checkpoint_files(path: &Path) -> Result<(Uploads, Option<PathBuf>), Error> {
    let name_of = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
    let listed = |p: &Path| -> Result<Vec<PathBuf>, Error> {
        let dir = p.parent().unwrap_or(Path::new("."));
        let text = std::fs::read_to_string(p).map_err(|e| Error::file(p, e))?;
        let mut files: Vec<String> = if p.to_string_lossy().ends_with(".jsonl") {
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| {
                    let entry: serde_json::Value =
                        serde_json::from_str(l).map_err(|e| Error::file(p, e))?;
                    entry["file"]
                        .as_str()
                        .map(str::to_string)
                        .ok_or_else(|| Error::file(p, "a manifest line names no file"))
                })
                .collect::<Result<_, _>>()?
        } else {
            let index: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::file(p, e))?;
            index["weight_map"]
                .as_object()
                .ok_or_else(|| Error::file(p, "the index has no weight_map"))?
                .values()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        };
        files.sort();
        files.dedup();
        Ok(files
            .iter()
            .map(|f| dir.join(f))
            .chain([p.to_path_buf()])
            .collect())
    };
    let (paths, dir) = if path.is_dir() {
        let manifest = path.join("model.manifest.jsonl");
        let index = path.join("model.safetensors.index.json");
        let paths = if manifest.exists() {
            listed(&manifest)?
        } else if index.exists() {
            listed(&index)?
        } else {
            vec![path.join("model.safetensors")]
        };
        (paths, path.to_path_buf())
    } else {
        let name = path.to_string_lossy();
        let paths = if name.ends_with(".jsonl") || name.ends_with(".index.json") {
            listed(path)?
        } else {
            vec![path.to_path_buf()]
        };
        (paths, path.parent().unwrap_or(Path::new(".")).to_path_buf())
    };
    let files = paths
        .into_iter()
        .map(|p| {
            let name = name_of(&p).ok_or_else(|| Error::file(&p, "not a file name"))?;
            Ok((name, p))
        })
        .collect::<Result<Vec<_>, Error>>()?;
    let config = Some(dir.join("config.json")).filter(|c| c.exists());
    Ok((files, config))
}

/// A file an export wrote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportedFile {
    pub name: String,
    pub bytes: u64,
}

/// An in-database checkpoint (a row of llm_checkpoint).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub id: i32,
    pub model: String,
    pub note: Option<String>,
    /// Optimizer steps the weights had taken.
    pub step: i32,
    pub n_params: i64,
    pub created_at: SystemTime,
}

impl Client {
    /// Uploads a Hugging Face checkpoint from the client's disk into `model` and imports it
    /// (`pg_llm_import_safetensors_lo`). `path` is a `.safetensors` file, a sharded
    /// checkpoint's `model.safetensors.index.json`, a tensor manifest (`*.jsonl`, checksums
    /// verified), or a folder holding one of them. A `config.json` beside the weights
    /// creates or checks the model's registry row; without one the model must be registered.
    ///
    /// Each file goes into a large object in 16 MB pieces, inside one transaction that also
    /// imports and removes them: all or nothing, and the server reads no file of its own.
    /// Returns the number of parameters imported.
    ///
    /// ```no_run
    /// # async fn demo(mut client: pg_gpt3_client::Client) -> Result<(), pg_gpt3_client::Error> {
    /// let n = client.import_checkpoint("./gpt-neo-125m", "neo").await?;
    /// # Ok(()) }
    /// ```
    pub async fn import_checkpoint(
        &mut self,
        path: impl AsRef<Path>,
        model: &str,
    ) -> Result<i64, Error> {
        let (files, config_path) = checkpoint_files(path.as_ref())?;
        let config: Option<serde_json::Value> = match &config_path {
            Some(p) => Some(
                serde_json::from_slice(&std::fs::read(p).map_err(|e| Error::file(p, e))?)
                    .map_err(|e| Error::file(p, e))?,
            ),
            None => None,
        };
        let deadline = self.deadline();
        let tx = self.pg_mut().transaction().await?;
        let imported = deadline
            .run(async {
                let mut objects: Vec<u32> = Vec::new();
                let mut buf = vec![0u8; PIECE_BYTES];
                for (_, path) in &files {
                    let mut file = tokio::fs::File::open(path)
                        .await
                        .map_err(|e| Error::file(path, e))?;
                    let mut oid: Option<u32> = None;
                    let mut offset: i64 = 0;
                    loop {
                        let n = read_piece(&mut file, &mut buf)
                            .await
                            .map_err(|e| Error::file(path, e))?;
                        let piece = &buf[..n];
                        match oid {
                            None => {
                                let row = tx
                                    .query_one("SELECT lo_from_bytea(0, $1)", &[&piece])
                                    .await?;
                                oid = Some(row.try_get(0)?);
                            }
                            Some(o) if n > 0 => {
                                tx.execute("SELECT lo_put($1, $2, $3)", &[&o, &offset, &piece])
                                    .await?;
                            }
                            Some(_) => {}
                        }
                        offset += n as i64;
                        if n < buf.len() {
                            break;
                        }
                    }
                    objects.push(oid.expect("every file makes an object"));
                }
                let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
                let row = tx
                    .query_one(
                        "SELECT pg_llm_import_safetensors_lo($1, $2, $3, $4)",
                        &[&objects, &names, &model, &config],
                    )
                    .await?;
                let imported: i64 = row.try_get(0)?;
                tx.execute(
                    "SELECT lo_unlink(o) FROM unnest($1::oid[]) AS o",
                    &[&objects],
                )
                .await?;
                Ok(imported)
            })
            .await?;
        tx.commit().await?;
        Ok(imported)
    }

    /// Downloads `model` into the folder `dir` as the checkpoint `from_pretrained` loads:
    /// config.json, model.safetensors (or 5 GB shards with their index) and the tensor
    /// manifest model.manifest.jsonl — the files `pg_llm_export_safetensors` writes on the
    /// server, streamed here in pieces (`pg_llm_export_safetensors_pieces`) inside one
    /// REPEATABLE READ transaction, so they hold one committed state of the model. Files
    /// appear only once complete; a previous export's weight files there are replaced.
    pub async fn export_checkpoint(
        &mut self,
        dir: impl AsRef<Path>,
        model: &str,
    ) -> Result<Vec<ExportedFile>, Error> {
        let dir = dir.as_ref();
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| Error::file(dir, e))?;
        let deadline = self.deadline();
        let tx = self
            .pg_mut()
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let mut open: BTreeMap<String, (PathBuf, tokio::fs::File, u64)> = BTreeMap::new();
        let streamed = deadline
            .run(async {
                let piece_bytes = PIECE_BYTES as i32;
                let rows = tx
                    .query_raw(
                        // The server's default shard size (Hugging Face's 5 GB).
                        "SELECT (p).file, (p).offset, (p).data FROM \
                         (SELECT pg_llm_export_safetensors_pieces($1, piece_bytes => $2) AS p) q",
                        [
                            &model as &(dyn tokio_postgres::types::ToSql + Sync),
                            &piece_bytes,
                        ],
                    )
                    .await?;
                futures_util::pin_mut!(rows);
                while let Some(row) = rows.try_next().await? {
                    let name: String = row.try_get(0)?;
                    let offset: i64 = row.try_get(1)?;
                    let data: &[u8] = row.try_get(2)?;
                    if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
                        return Err(Error::Protocol(format!(
                            "the server named an export file \"{name}\""
                        )));
                    }
                    if !open.contains_key(&name) {
                        let partial = dir.join(format!(".{name}.partial"));
                        let file = tokio::fs::File::create(&partial)
                            .await
                            .map_err(|e| Error::file(&partial, e))?;
                        open.insert(name.clone(), (partial, file, 0));
                    }
                    let (partial, file, size) = open.get_mut(&name).expect("opened");
                    let io = |e| Error::file(partial, e);
                    file.seek(std::io::SeekFrom::Start(offset as u64))
                        .await
                        .map_err(io)?;
                    file.write_all(data).await.map_err(io)?;
                    *size = (*size).max(offset as u64 + data.len() as u64);
                }
                Ok(())
            })
            .await;
        if let Err(e) = streamed {
            for (partial, _, _) in open.values() {
                let _ = tokio::fs::remove_file(partial).await;
            }
            return Err(e);
        }
        tx.commit().await?;
        let mut written = Vec::new();
        for (name, (partial, file, size)) in open {
            file.sync_all()
                .await
                .map_err(|e| Error::file(&partial, e))?;
            let path = dir.join(&name);
            tokio::fs::rename(&partial, &path)
                .await
                .map_err(|e| Error::file(&path, e))?;
            written.push(ExportedFile { name, bytes: size });
        }
        remove_stale_weights(dir, &written)?;
        Ok(written)
    }

    /// Saves the model's weights and optimizer state as an in-database checkpoint
    /// (`llm_checkpoint_save`); returns its id.
    pub async fn checkpoint_save(&self, model: &str, note: Option<&str>) -> Result<i32, Error> {
        let row = self
            .query_one("SELECT llm_checkpoint_save($1, $2)", &[&model, &note])
            .await?;
        Ok(row.try_get(0)?)
    }

    /// Replaces the model's weights and optimizer state with an in-database checkpoint of it
    /// (`llm_checkpoint_load`).
    pub async fn checkpoint_load(&self, model: &str, checkpoint_id: i32) -> Result<(), Error> {
        self.query_one(
            "SELECT llm_checkpoint_load($1, $2)",
            &[&model, &checkpoint_id],
        )
        .await?;
        Ok(())
    }

    /// The model's in-database checkpoints, oldest first.
    pub async fn checkpoints(&self, model: &str) -> Result<Vec<Checkpoint>, Error> {
        let rows = self
            .query(
                "SELECT id, model, note, step, n_params, created_at FROM llm_checkpoint \
                 WHERE model = $1 ORDER BY id",
                &[&model],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Checkpoint {
                    id: r.try_get(0)?,
                    model: r.try_get(1)?,
                    note: r.try_get(2)?,
                    step: r.try_get(3)?,
                    n_params: r.try_get(4)?,
                    created_at: r.try_get(5)?,
                })
            })
            .collect()
    }

    /// Deletes all but the newest `keep_last` checkpoints of the model
    /// (`llm_checkpoint_prune`); returns how many it deleted.
    pub async fn checkpoint_prune(&self, model: &str, keep_last: i32) -> Result<i32, Error> {
        let row = self
            .query_one("SELECT llm_checkpoint_prune($1, $2)", &[&model, &keep_last])
            .await?;
        Ok(row.try_get(0)?)
    }
}

/// Fills `buf` from `file` unless the file ends first; returns the bytes read.
async fn read_piece(file: &mut tokio::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = file.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

/// Weight files of an earlier export that this one did not write would shadow or mix with
/// it (`from_pretrained` prefers model.safetensors over an index): remove them.
fn remove_stale_weights(dir: &Path, written: &[ExportedFile]) -> Result<(), Error> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::file(dir, e))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let shard =
            name.starts_with("model-") && name.contains("-of-") && name.ends_with(".safetensors");
        let weights =
            shard || name == "model.safetensors" || name == "model.safetensors.index.json";
        if weights && !written.iter().any(|w| w.name == name) {
            std::fs::remove_file(entry.path()).map_err(|e| Error::file(&entry.path(), e))?;
        }
    }
    Ok(())
}
