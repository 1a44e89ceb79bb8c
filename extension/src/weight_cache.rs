//! The weight-file cache: `$PGDATA/pg_llm_cache/<database oid>/<version>.weights`, one file
//! per model version, mapped by every connection that uses it (see model_cache.rs for when
//! files are written and engine `model::weight_file` for their format). This module says where
//! a file lives and keeps the directory clean and bounded:
//! - writing a file prunes what it supersedes: earlier versions of the same model, files of
//!   models no longer registered or of an earlier installation of the extension. A file
//!   written by a transaction that has written rows may hold that transaction's own version:
//!   it is settled when the transaction ends (see `placed`), so a rollback leaves no file of
//!   a version that never existed and keeps the file of the version that still stands;
//! - a backend's first use of the cache sweeps it: temporary files whose writer died (kill -9,
//!   crash; see `weight_file::is_abandoned`), files of versions newer than the committed one
//!   that no living writer holds (a crash before the writer's transaction ended) and the
//!   directories of dropped databases go, so a crash leaves nothing behind once the restarted
//!   server is used again;
//! - before a file is written, the least recently used files are removed until the cache fits
//!   `pg_llm.weight_cache_size`; a model larger than the whole bound stays private to each
//!   connection instead. Writers running at the same moment may overshoot the bound by their
//!   files until the next write.
//!
//! Tables stay the source of truth: a removed file is rebuilt from `llm_param` by its next user.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use pg_llm_engine::model::weight_file::{self, FileId, Held, Rejected};
use pg_llm_engine::model::weights::packed_tensors;
use pg_llm_engine::model::{check_shapes, DType, Layout, ModelConfig, ModelWeights, TensorSource};
use pg_llm_engine::{EngineError, Result};
use pgrx::{pg_guard, pg_sys};

use crate::errors::{cancel, spi_error};
use crate::spi;
use crate::store::{TableSource, CHUNK_ELEMS};
use crate::wait::nap;

thread_local! {
    static SWEPT: Cell<bool> = const { Cell::new(false) };
    static UNSETTLED: RefCell<Vec<Unsettled>> = const { RefCell::new(Vec::new()) };
}

/// Where the weight file of one version of a model lives, and the identity it must carry.
#[derive(Clone)]
pub struct FilePlace {
    dir: PathBuf,
    path: PathBuf,
    id: FileId,
    param_table: u32,
    /// The precision the file holds the weights in.
    dtype: DType,
}

impl FilePlace {
    pub fn new(model: &str, version: i64, dtype: DType) -> Result<Self> {
        sweep_once()?;
        let param_table = param_table_oid()?;
        let dir = root().join(current_database().to_string());
        Ok(Self {
            path: dir.join(format!("{version}.weights")),
            dir,
            id: FileId {
                owner: format!("{param_table}:{model}"),
                version,
            },
            param_table,
            dtype,
        })
    }
}

/// The weights mapped from `place`'s file when it holds exactly this version; otherwise read
/// from `src` (the tables) into a new file for the next user, tensor by tensor.
///
/// One backend writes a version's file; the others wait for it and map it, so connections
/// that all need a new version at once (after a write to `llm_param`) read the tables and
/// write the file once between them, and hold one copy of the weights. The writer claims the
/// version with a transaction-level advisory lock (released however its transaction ends,
/// also by a cancel or a crash), which others poll for while they watch for the file.
pub fn open_or_write(
    place: &FilePlace,
    cfg: &ModelConfig,
    src: &mut TableSource,
) -> Result<ModelWeights> {
    let dtype = place.dtype;
    if let Ok(mapped) = weight_file::open(&place.path, &place.id, cfg, dtype, cancel())? {
        return Ok(mapped);
    }
    if file_size(cfg, dtype)? > crate::guc::weight_cache_bytes() {
        // Too large to share: every connection keeps its own copy anyway.
        return write_from(place, cfg, src);
    }
    let mut idle_since: Option<Instant> = None;
    loop {
        let rejected = match weight_file::open(&place.path, &place.id, cfg, dtype, cancel())? {
            Ok(mapped) => return Ok(mapped),
            Err(rejected) => rejected,
        };
        if claim(place.id.version)? {
            if let Rejected::Corrupt(why) = rejected {
                pgrx::log!(
                    "pg_llm: rebuilding weight file \"{}\": {why}",
                    place.path.display()
                );
            }
            return write_from(place, cfg, src);
        }
        // Another connection holds the claim. While it writes, wait for its file; a claim
        // held without a file being written (its writer could not write one and kept a
        // private copy) is not worth waiting for.
        if writer_at_work(place) {
            idle_since = None;
        } else if idle_since.get_or_insert_with(Instant::now).elapsed() > CLAIM_PATIENCE {
            return ModelWeights::load_as(cfg, src, dtype);
        }
        nap(Duration::from_millis(10));
    }
}

/// How long a claim held with no file being written is waited for.
const CLAIM_PATIENCE: Duration = Duration::from_secs(1);

/// Takes this transaction's claim on writing `version`'s file; false when another
/// transaction holds it. Versions are unique within a database, as advisory locks are.
fn claim(version: i64) -> Result<bool> {
    // "pllm": pg_llm's class of two-key advisory locks; the version's low 32 bits (versions
    // 2^32 apart only ever wait for each other).
    const CLASS: i32 = 0x706c_6c6d;
    Ok(spi::read_one::<bool>(
        "SELECT pg_try_advisory_xact_lock($1, $2)",
        &[CLASS.into(), (version as i32).into()],
    )?
    .unwrap_or(false))
}

/// Whether a living writer is writing `place`'s file (a locked temporary file of it exists).
fn writer_at_work(place: &FilePlace) -> bool {
    let prefix = format!(
        "{}.tmp",
        place.path.file_name().unwrap_or_default().to_string_lossy()
    );
    files_in(&place.dir).iter().any(|path| {
        path.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
            && weight_file::is_temporary(path)
            && !weight_file::is_abandoned(path)
    })
}

/// Reads `src` one chunk at a time into `place`'s weight file and maps it, so loading never
/// holds a private copy of the model (see `write_or_keep_private` for when it does).
fn write_from(place: &FilePlace, cfg: &ModelConfig, src: &mut TableSource) -> Result<ModelWeights> {
    write_or_keep_private(
        place,
        cfg,
        src,
        |src| {
            check_shapes(cfg, &src.shapes()?)?;
            let mut file =
                weight_file::Writer::create(&place.path, &place.id.owner, cfg, place.dtype)?;
            for (name, range) in packed_tensors(cfg) {
                for start in (0..range.len()).step_by(CHUNK_ELEMS) {
                    let piece =
                        src.read_range(&name, start..(start + CHUNK_ELEMS).min(range.len()))?;
                    file.write_at(range.start + start, &piece)?;
                }
            }
            file.finish_mapped(place.id.version, cancel())
        },
        |src| ModelWeights::load_as(cfg, src, place.dtype),
    )
}

/// Writes `values` (all packed float32 values) to their weight file in the place's precision
/// and returns the weights mapped from it (the values are then freed), or keeps a private
/// copy (see `write_or_keep_private`).
pub fn share(place: &FilePlace, cfg: &ModelConfig, values: Vec<f32>) -> Result<ModelWeights> {
    write_or_keep_private(
        place,
        cfg,
        values,
        |values| weight_file::write(&place.path, &place.id, cfg, place.dtype, values, cancel()),
        |values| ModelWeights::from_values(cfg, values, place.dtype),
    )
}

/// The weights mapped from `place`'s file, written by `write` from `state` (see `placed` for
/// what follows). A model too large for `pg_llm.weight_cache_size` (a LOG) or a file-system
/// problem such as a full disk (a WARNING) costs sharing, not the query: `private` makes this
/// connection's own copy from `state` instead.
fn write_or_keep_private<S>(
    place: &FilePlace,
    cfg: &ModelConfig,
    mut state: S,
    write: impl FnOnce(&mut S) -> Result<(ModelWeights, Held)>,
    private: impl FnOnce(S) -> Result<ModelWeights>,
) -> Result<ModelWeights> {
    let bytes = file_size(cfg, place.dtype)?;
    if !make_room(bytes, &place.path) {
        pgrx::log!(
            "pg_llm: the weights of \"{}\" ({bytes} bytes) exceed pg_llm.weight_cache_size; they stay private to this connection",
            place.id.owner
        );
        return private(state);
    }
    let written = create_dir(&place.dir).and_then(|_| write(&mut state));
    match written {
        Ok((mapped, held)) => {
            placed(place, held);
            Ok(mapped)
        }
        Err(EngineError::Io(why)) => {
            pgrx::warning!("pg_llm: model weights stay private to this connection: {why}");
            private(state)
        }
        Err(e) => Err(e),
    }
}

fn create_dir(dir: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| EngineError::Io(format!("could not create \"{}\": {e}", dir.display())))
}

/// A weight file being written piece by piece for a model's next version (an import or an
/// initialisation writes each tensor as it makes it): see `weight_file::Writer`.
pub struct PendingFile {
    writer: weight_file::Writer,
    dir: PathBuf,
    owner: String,
    param_table: u32,
    dtype: DType,
}

/// Starts the weight file of `model`'s next version, or None when weight files are off, the
/// model does not fit `pg_llm.weight_cache_size`, or the file cannot be created (a WARNING:
/// sharing is lost, not the query).
pub fn start_file(model: &str, cfg: &ModelConfig, dtype: DType) -> Result<Option<PendingFile>> {
    if !crate::guc::WEIGHT_FILES.get() {
        return Ok(None);
    }
    // Version 0 is never assigned (the sequence starts at 1): the name is a placeholder
    // until `finish` knows the version.
    let place = FilePlace::new(model, 0, dtype)?;
    if !make_room(file_size(cfg, dtype)?, &place.path) {
        return Ok(None);
    }
    let created = create_dir(&place.dir)
        .and_then(|_| weight_file::Writer::create(&place.path, &place.id.owner, cfg, dtype));
    match created {
        Ok(writer) => Ok(Some(PendingFile {
            writer,
            dir: place.dir,
            owner: place.id.owner,
            param_table: place.param_table,
            dtype,
        })),
        Err(EngineError::Io(why)) => {
            pgrx::warning!("pg_llm: the new weights will not be shared: {why}");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

impl PendingFile {
    pub fn write_at(&mut self, start: usize, values: &[f32]) -> Result<()> {
        self.writer.write_at(start, values)
    }

    /// Puts the complete file in place as `version`'s (see `placed` for what follows).
    pub fn finish(self, version: i64) -> Result<()> {
        let place = FilePlace {
            path: self.dir.join(format!("{version}.weights")),
            dir: self.dir,
            id: FileId {
                owner: self.owner,
                version,
            },
            param_table: self.param_table,
            dtype: self.dtype,
        };
        let held = self.writer.finish(&place.path, version, cancel())?;
        placed(&place, held);
        Ok(())
    }
}

/// A file this transaction put in place, with the writer's lock on it, until the transaction
/// (or the subtransaction that wrote it) ends.
struct Unsettled {
    place: FilePlace,
    subtransaction: pg_sys::SubTransactionId,
    _held: Held,
}

/// What follows putting `place`'s file in place. A committed version prunes the earlier
/// versions of its model at once. This transaction's own version (its registry row was
/// written here) is settled when the transaction ends (`on_transaction_end`): a commit prunes
/// the earlier versions, a rollback of the transaction or of the subtransaction that wrote
/// the file removes it. The writer keeps the file's lock until then, so a sweep after a crash
/// tells a file whose writer died before committing (no lock) from one still waiting for its
/// commit.
fn placed(place: &FilePlace, held: Held) {
    if !version_written_here(place) {
        prune(&place.dir, place.param_table, Some(&place.id));
        return;
    }
    // SAFETY: a plain read of the backend's transaction state.
    let subtransaction = unsafe { pg_sys::GetCurrentSubTransactionId() };
    UNSETTLED.with(|u| {
        u.borrow_mut().push(Unsettled {
            place: place.clone(),
            subtransaction,
            _held: held,
        })
    });
}

/// Whether this transaction (or one of its subtransactions) wrote the registry row that gave
/// `place`'s model its version; when unsure, as if it had (settling a committed version's
/// file at the end of the transaction costs only its prune, or on rollback its file).
fn version_written_here(place: &FilePlace) -> bool {
    // SAFETY: a plain read of the backend's transaction state.
    if unsafe { pg_sys::GetTopTransactionIdIfAny() } == pg_sys::InvalidTransactionId {
        // A transaction that has written nothing reads only committed versions.
        return false;
    }
    let Some(model) = owner_model(&place.id.owner) else {
        return true;
    };
    let writer = spi::read_one::<String>(
        "SELECT xmin::text FROM llm_model_config WHERE model = $1",
        &[model.into()],
    );
    match writer.ok().flatten().and_then(|x| x.parse::<u32>().ok()) {
        // SAFETY: a lookup in the backend's own transaction state.
        Some(xmin) => unsafe { pg_sys::TransactionIdIsCurrentTransactionId(xmin.into()) },
        None => true,
    }
}

/// Registers the transaction callbacks that settle files (once per backend, at load).
pub fn register_callbacks() {
    // SAFETY: registered once, at library load; the callbacks live as long as the library.
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_transaction_end), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subtransaction_end), std::ptr::null_mut());
    }
}

/// Settles this transaction's files. Runs after the commit or during the abort, where nothing
/// may raise an error: only file-system calls whose failures are ignored (a file left behind
/// is removed by a later prune or sweep).
#[pg_guard]
unsafe extern "C-unwind" fn on_transaction_end(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    let settle: fn(&FilePlace) = match event {
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT => remove_earlier_versions,
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT => {
            |place| remove_in_background(place.path.clone())
        }
        // A prepared transaction's fate is decided elsewhere: its file is kept and a later
        // sweep removes it should the transaction be rolled back.
        XACT_EVENT_PREPARE => |_| {},
        _ => return,
    };
    for file in UNSETTLED.take() {
        settle(&file.place);
    }
}

/// Hands a committed subtransaction's files to its parent; removes a rolled-back one's.
#[pg_guard]
unsafe extern "C-unwind" fn on_subtransaction_end(
    event: pg_sys::SubXactEvent::Type,
    subtransaction: pg_sys::SubTransactionId,
    parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::SubXactEvent::*;
    UNSETTLED.with(|u| {
        let mut unsettled = u.borrow_mut();
        match event {
            SUBXACT_EVENT_COMMIT_SUB => unsettled
                .iter_mut()
                .filter(|f| f.subtransaction == subtransaction)
                .for_each(|f| f.subtransaction = parent),
            SUBXACT_EVENT_ABORT_SUB => unsettled.retain(|f| {
                let keep = f.subtransaction != subtransaction;
                if !keep {
                    remove_in_background(f.place.path.clone());
                }
                keep
            }),
            _ => {}
        }
    });
}

/// Removes the files of versions of `place`'s model older than its own, reading only the
/// files (no SQL: this runs after a commit).
fn remove_earlier_versions(place: &FilePlace) {
    for path in files_in(&place.dir) {
        if weight_file::is_temporary(&path) || path == place.path {
            continue;
        }
        if weight_file::read_id(&path).is_some_and(|id| is_earlier_version(&id, &place.id)) {
            remove_in_background(path);
        }
    }
}

/// Whether `file` holds an earlier version of the model `written` holds.
fn is_earlier_version(file: &FileId, written: &FileId) -> bool {
    file.owner == written.owner && file.version < written.version
}

/// A file's size is its image plus a header page or two.
fn file_size(cfg: &ModelConfig, dtype: DType) -> Result<u64> {
    Ok((Layout::new(cfg, dtype)?.bytes() + 8192) as u64)
}

/// `$PGDATA/pg_llm_cache`.
fn root() -> PathBuf {
    // SAFETY: DataDir is set at postmaster start and never changes.
    let data_dir = unsafe { std::ffi::CStr::from_ptr(pg_sys::DataDir) }
        .to_string_lossy()
        .into_owned();
    Path::new(&data_dir).join("pg_llm_cache")
}

fn current_database() -> u32 {
    // SAFETY: MyDatabaseId is set once the backend has connected, before any SQL function runs.
    unsafe { pg_sys::MyDatabaseId.to_u32() }
}

/// The OID of `llm_param`: it changes when the extension is dropped and created again, which
/// restarts the version sequence, so files of an earlier installation never match.
fn param_table_oid() -> Result<u32> {
    spi::read_one::<pg_sys::Oid>("SELECT 'llm_param'::regclass::oid", &[])?
        .map(|o| o.to_u32())
        .ok_or_else(|| EngineError::Internal("llm_param has no OID".into()))
}

/// What a file of the cache is.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum FileState {
    /// A complete weight file (or a stranger; see `Entry::model`).
    Ready,
    /// A temporary file a living writer holds.
    Writing,
    /// A temporary file whose writer died; the next sweep removes it.
    Abandoned,
}

impl FileState {
    pub fn name(self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::Writing => "writing",
            Self::Abandoned => "abandoned",
        }
    }
}

/// One file of the cache, as the `llm_weight_cache` view shows it.
pub struct Entry {
    pub database: u32,
    pub path: PathBuf,
    /// The model and version a complete weight file holds (None for anything else).
    pub model: Option<String>,
    pub version: Option<i64>,
    pub bytes: u64,
    pub last_used: SystemTime,
    pub state: FileState,
}

/// Every file in every database directory of the cache.
pub fn entries() -> Vec<Entry> {
    let mut out = Vec::new();
    for (database, dir) in database_dirs() {
        for path in files_in(&dir) {
            let Ok(meta) = fs::metadata(&path) else {
                continue;
            };
            let state = if !weight_file::is_temporary(&path) {
                FileState::Ready
            } else if weight_file::is_abandoned(&path) {
                FileState::Abandoned
            } else {
                FileState::Writing
            };
            let id = (state == FileState::Ready)
                .then(|| weight_file::read_id(&path))
                .flatten();
            out.push(Entry {
                database,
                model: id
                    .as_ref()
                    .and_then(|id| owner_model(&id.owner))
                    .map(str::to_string),
                version: id.map(|id| id.version),
                path,
                bytes: meta.len(),
                last_used: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                state,
            });
        }
    }
    out.sort_by(|a, b| (a.database, &a.path).cmp(&(b.database, &b.path)));
    out
}

/// A file's owner is "<llm_param oid>:<model>" (see `FilePlace::new`).
fn owner_model(owner: &str) -> Option<&str> {
    owner.split_once(':').map(|(_, model)| model)
}

fn database_dirs() -> Vec<(u32, PathBuf)> {
    let entries = fs::read_dir(root()).into_iter().flatten().flatten();
    entries
        .filter_map(|e| Some((e.file_name().to_str()?.parse::<u32>().ok()?, e.path())))
        .collect()
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let entries = fs::read_dir(dir).into_iter().flatten().flatten();
    entries.map(|e| e.path()).filter(|p| p.is_file()).collect()
}

/// Once per backend, on its first use of the cache: removes abandoned temporary files, the
/// directories of databases that no longer exist, and in this database the files of models no
/// longer registered or of an earlier installation.
fn sweep_once() -> Result<()> {
    if SWEPT.replace(true) {
        return Ok(());
    }
    prune(
        &root().join(current_database().to_string()),
        param_table_oid()?,
        None,
    );
    let mut databases = HashSet::new();
    let listed = spi::read("SELECT oid FROM pg_database", &[], |row| {
        databases.extend(
            row.get::<pg_sys::Oid>(1)
                .map_err(spi_error)?
                .map(|o| o.to_u32()),
        );
        Ok(())
    });
    if listed.is_err() {
        return Ok(());
    }
    for (database, dir) in database_dirs() {
        if !databases.contains(&database) {
            let _ = fs::remove_dir_all(&dir);
            continue;
        }
        for path in files_in(&dir) {
            if weight_file::is_abandoned(&path) {
                let _ = fs::remove_file(&path);
            }
        }
    }
    Ok(())
}

/// Removes least recently used complete files until `needed` more bytes fit the bound;
/// false when they cannot fit (the file at `keep` is never removed).
fn make_room(needed: u64, keep: &Path) -> bool {
    let limit = crate::guc::weight_cache_bytes();
    if needed > limit {
        return false;
    }
    let mut files = entries();
    let mut used: u64 = files.iter().map(|e| e.bytes).sum();
    files.retain(|e| e.state == FileState::Ready && e.path != keep);
    files.sort_by_key(|e| e.last_used);
    for oldest in files {
        if used + needed <= limit {
            break;
        }
        remove_in_background(oldest.path);
        used -= oldest.bytes;
    }
    used + needed <= limit
}

/// Removes the files of `dir` (one database) that no longer belong: files of an earlier
/// installation of the extension (another `llm_param` OID), of models no longer registered,
/// and, given the file just written, the earlier versions of its model. A sweep (`written`
/// None) also removes every version but a model's committed one, except files a living
/// writer still holds (see `placed`). Backends still mapping a removed file keep their
/// mapping.
fn prune(dir: &Path, param_table: u32, written: Option<&FileId>) {
    let mut committed = HashMap::new();
    let listed = spi::read("SELECT model, version FROM llm_model_config", &[], |row| {
        let model = row.get::<String>(1).map_err(spi_error)?;
        let version = row.get::<i64>(2).map_err(spi_error)?;
        if let Some(model) = model {
            committed.insert(model, version.unwrap_or(0));
        }
        Ok(())
    });
    if listed.is_err() {
        return;
    }
    let prefix = format!("{param_table}:");
    for path in files_in(dir) {
        if weight_file::is_temporary(&path) {
            continue;
        }
        let Some(file) = weight_file::read_id(&path) else {
            continue;
        };
        let superseded = match (file.owner.strip_prefix(&prefix), written) {
            (None, _) => true,
            (Some(model), _) if !committed.contains_key(model) => true,
            (Some(_), Some(written)) => is_earlier_version(&file, written),
            (Some(model), None) => {
                let current = committed[model];
                file.version < current || (file.version > current && !weight_file::is_held(&path))
            }
        };
        if superseded {
            remove_in_background(path);
        }
    }
}

/// Removes a weight file; a large one without waiting, since unlinking a file of hundreds of
/// MB frees its blocks in the kernel for 0.1 s or more, during which a cancel could not be
/// served. Backends that still map the file keep their mapping either way.
fn remove_in_background(path: PathBuf) {
    if fs::metadata(&path).is_ok_and(|m| m.len() < weight_file::LARGE_FILE) {
        let _ = fs::remove_file(&path);
        return;
    }
    pg_llm_engine::parallel::detach(move || {
        let _ = fs::remove_file(path);
    });
}
