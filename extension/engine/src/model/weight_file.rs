//! Weight files: a model's packed weight buffer (see `weights::packing`) written once to disk
//! and then mapped read-only by every process that needs it, so a new connection starts
//! without reading the weights again and all connections share one copy in the page cache.
//!
//! Layout (little-endian):
//!
//! ```text
//! 0   8 bytes  magic "PGLLMW\0" + format version (2; 1 held half-precision matrices
//!              row-major, 2 in the grouped order of `dtype::grouped_index`)
//! 8   u64      length of the JSON header that follows
//! 16  JSON     {"owner", "version", "config", "values", "dtype", "checksum"}
//!          (padded with spaces so that it ends at a multiple of 4096)
//!     the weight image: for float32, float32 × values in packing order; for bfloat16 /
//!     float16, matrices in half precision and vectors in float32 (`dtype::Layout`)
//! ```
//!
//! A file is written under a temporary name (`<name>.tmp<pid>`) and renamed into place once
//! complete, so a reader never sees a partial file. The writer holds an exclusive `flock` on
//! the temporary file while writing; the kernel drops it when the writer dies, which is how a
//! clean-up tells an abandoned temporary file (`is_abandoned`) from one being written. The
//! writer may keep holding it on the renamed file (`Held`) until the state the file holds is
//! settled, such as its writer's transaction committing (`is_held`).
//!
//! The checksum (XXH3 over 16 MiB blocks) is verified on every open instead of forcing the file
//! to disk: a file torn by an operating-system crash, or changed by hand, is detected and
//! rebuilt rather than trusted. Opening a file sets its modification time: it records the last
//! use, for clean-ups that keep the least recently used files last.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::config::ModelConfig;
use super::dtype::{DType, Layout};
use super::storage::Storage;
use super::weights::{packed_len, ModelWeights};
use crate::error::{EngineError, Result};
use crate::parallel::Cancel;

const MAGIC: &[u8; 8] = b"PGLLMW\0\x02";
const ALIGN: usize = 4096;
const MAX_HEADER: u64 = 1 << 20;
const CHECKSUM_BLOCK: usize = 16 << 20;

/// Whose weights a file holds: `owner` names the model (and anything else that must match,
/// such as the database), `version` the state of its weights.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    pub owner: String,
    pub version: i64,
}

#[derive(Serialize, Deserialize)]
struct Header {
    #[serde(flatten)]
    id: FileId,
    config: ModelConfig,
    values: usize,
    /// Files written before half precision have no dtype: float32.
    #[serde(default)]
    dtype: DType,
    /// XXH3-64 of the values (see `checksum`), as 16 hex digits.
    checksum: String,
}

/// Why an existing file was not used.
#[derive(Debug, PartialEq, Eq)]
pub enum Rejected {
    Missing,
    /// Another owner, version or configuration: a stale file.
    Stale,
    /// Not a complete, intact weight file.
    Corrupt(String),
}

/// Maps the weights at `path` when the file exists and holds `id`'s weights for `cfg`, in
/// `dtype`, intact.
pub fn open(
    path: &Path,
    id: &FileId,
    cfg: &ModelConfig,
    dtype: DType,
    cancel: Cancel,
) -> Result<std::result::Result<ModelWeights, Rejected>> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Err(Rejected::Missing)),
        Err(e) => return Err(io(path, "open", e)),
    };
    let (header, offset) = match read_header(&mut file) {
        Ok(h) => h,
        Err(why) => return Ok(Err(Rejected::Corrupt(why))),
    };
    if header.id != *id
        || header.config != *cfg
        || header.dtype != dtype
        || header.values != packed_len(cfg)?
    {
        return Ok(Err(Rejected::Stale));
    }
    let layout = Layout::new(cfg, dtype)?;
    let size = file.metadata().map_err(|e| io(path, "stat", e))?.len();
    if size != (offset + layout.bytes()) as u64 {
        return Ok(Err(Rejected::Corrupt(format!(
            "{size} bytes where {} were expected",
            offset + layout.bytes()
        ))));
    }
    let storage = map_image(&file, path, offset, layout)?;
    if checksum(storage.image(), cancel)? != header.checksum {
        return Ok(Err(Rejected::Corrupt("checksum mismatch".into())));
    }
    // The modification time records the last use: clean-ups remove least recently used files.
    let _ = file.set_modified(std::time::SystemTime::now());
    Ok(Ok(ModelWeights::from_storage(cfg, Arc::new(storage))?))
}

/// Maps the image laid out by `layout` starting `offset` bytes into `file`, faulting every
/// page in now.
fn map_image(file: &File, path: &Path, offset: usize, layout: Layout) -> Result<Storage> {
    // SAFETY: weight files are only ever replaced by rename, never modified or truncated in
    // place, so the mapped bytes stay valid for the mapping's lifetime.
    let map = unsafe { memmap2::MmapOptions::new().populate().map(file) }
        .map_err(|e| io(path, "map", e))?;
    Ok(Storage::Mapped {
        map,
        offset,
        layout,
    })
}

/// The owner and version recorded in the file at `path`, if it is a weight file.
pub fn read_id(path: &Path) -> Option<FileId> {
    let mut file = File::open(path).ok()?;
    read_header(&mut file).ok().map(|(h, _)| h.id)
}

/// Writes `values` (packed for `cfg`) as a weight file at `path` in `dtype`, under a
/// temporary name and then renamed into place, and returns the weights mapped from it (the
/// caller can free its copy) and the file's lock.
pub fn write(
    path: &Path,
    id: &FileId,
    cfg: &ModelConfig,
    dtype: DType,
    values: &[f32],
    cancel: Cancel,
) -> Result<(ModelWeights, Held)> {
    if values.len() != packed_len(cfg)? {
        return Err(EngineError::Internal(format!(
            "{} values do not fit the packing of this model",
            values.len()
        )));
    }
    let mut writer = Writer::create(path, &id.owner, cfg, dtype)?;
    // In blocks, each a moment's work, so a cancel is served between them.
    for (k, block) in values.chunks(CHECKSUM_BLOCK / 4).enumerate() {
        cancel.check()?;
        writer.write_at(k * CHECKSUM_BLOCK / 4, block)?;
    }
    writer.finish_mapped(id.version, cancel)
}

/// A weight file written piece by piece at packed offsets (an import writes each tensor as it
/// arrives, in whatever order), so no buffer of the whole model is ever needed. Plain writes,
/// not a writable mapping, so a full disk is an error here rather than a fault later. The
/// temporary file is removed unless `finish` renamed it into place.
pub struct Writer {
    tmp: TempFile,
    path: PathBuf,
    owner: String,
    cfg: ModelConfig,
    layout: Layout,
    /// Where the image starts; the header, written last, is padded to fill the space before.
    offset: usize,
}

impl Writer {
    /// A temporary file sized for `cfg`'s packed values in `dtype`, locked (see
    /// `is_abandoned`).
    pub fn create(path: &Path, owner: &str, cfg: &ModelConfig, dtype: DType) -> Result<Self> {
        let layout = Layout::new(cfg, dtype)?;
        // The longest header this file can get: the version and checksum have fixed maxima.
        let longest = header_json(owner, i64::MIN, cfg, &layout, &"f".repeat(16))?;
        let offset = (16 + longest.len()).div_ceil(ALIGN) * ALIGN;
        let tmp_path = temp_path(path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp_path)
            .map_err(|e| io(&tmp_path, "create", e))?;
        let tmp = TempFile::new(tmp_path, file);
        lock(tmp.file(), false).map_err(|e| io(&tmp.path, "lock", e))?;
        tmp.file()
            .set_len((offset + layout.bytes()) as u64)
            .map_err(|e| io(&tmp.path, "size", e))?;
        Ok(Self {
            tmp,
            path: path.to_path_buf(),
            owner: owner.to_string(),
            cfg: cfg.clone(),
            layout,
            offset,
        })
    }

    /// Writes `values` at packed position `start` (rounded to half precision where the layout
    /// holds matrices in it).
    pub fn write_at(&mut self, start: usize, values: &[f32]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        if start + values.len() > self.layout.values() {
            return Err(EngineError::Internal(format!(
                "values {start}..{} lie outside a packed buffer of {}",
                start + values.len(),
                self.layout.values()
            )));
        }
        for (byte, bytes) in self.layout.encode(start, values) {
            self.tmp
                .file()
                .write_all_at(&bytes, (self.offset + byte) as u64)
                .map_err(|e| io(&self.tmp.path, "write", e))?;
        }
        Ok(())
    }

    /// Checksums what was written (read back block by block), writes the header naming
    /// `version` and renames the file to `path` (the one it was created for, or another in
    /// the same directory once the version is known). Nothing is mapped: this process's
    /// memory never holds the model. The lock stays held until the returned handle drops.
    pub fn finish(mut self, path: &Path, version: i64, cancel: Cancel) -> Result<Held> {
        self.write_header(version, cancel)?;
        self.path = path.to_path_buf();
        self.rename()
    }

    /// `finish`, returning the weights mapped from the file too.
    pub fn finish_mapped(self, version: i64, cancel: Cancel) -> Result<(ModelWeights, Held)> {
        self.write_header(version, cancel)?;
        // Mapped through a descriptor of its own: a mapping keeps its descriptor's `flock`
        // alive, and the lock must go when `Held` drops.
        let reader = File::open(&self.tmp.path).map_err(|e| io(&self.tmp.path, "open", e))?;
        let storage = map_image(&reader, &self.tmp.path, self.offset, self.layout.clone())?;
        let cfg = self.cfg.clone();
        let held = self.rename()?;
        Ok((ModelWeights::from_storage(&cfg, Arc::new(storage))?, held))
    }

    fn write_header(&self, version: i64, cancel: Cancel) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let mut hashes = Vec::new();
        let mut block = vec![0u8; CHECKSUM_BLOCK];
        let total = self.layout.bytes();
        for at in (0..total).step_by(CHECKSUM_BLOCK) {
            cancel.check()?;
            let n = CHECKSUM_BLOCK.min(total - at);
            self.tmp
                .file()
                .read_exact_at(&mut block[..n], (self.offset + at) as u64)
                .map_err(|e| io(&self.tmp.path, "read back", e))?;
            hashes.push(xxhash_rust::xxh3::xxh3_64(&block[..n]));
        }
        let checksum = combine(&hashes);
        let mut json = header_json(&self.owner, version, &self.cfg, &self.layout, &checksum)?;
        // JSON allows trailing spaces: padded to fill its reserved space, the header ends
        // where the values start, as `read_header` computes.
        json.resize(self.offset - 16, b' ');
        let mut head = Vec::with_capacity(self.offset);
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&(json.len() as u64).to_le_bytes());
        head.extend_from_slice(&json);
        self.tmp
            .file()
            .write_all_at(&head, 0)
            .map_err(|e| io(&self.tmp.path, "write", e))
    }

    fn rename(self) -> Result<Held> {
        fs::rename(&self.tmp.path, &self.path).map_err(|e| io(&self.path, "rename into", e))?;
        Ok(Held(self.tmp.keep()))
    }
}

/// The writer's lock on a file it renamed into place, released when this drops (or when the
/// writer dies): while it is held, `is_held` tells clean-ups that the file's fate is not
/// settled yet.
pub struct Held(#[allow(dead_code)] File);

fn header_json(
    owner: &str,
    version: i64,
    cfg: &ModelConfig,
    layout: &Layout,
    checksum: &str,
) -> Result<Vec<u8>> {
    let header = Header {
        id: FileId {
            owner: owner.to_string(),
            version,
        },
        config: cfg.clone(),
        values: layout.values(),
        dtype: layout.dtype,
        checksum: checksum.to_string(),
    };
    serde_json::to_vec(&header).map_err(json)
}

fn read_header(file: &mut File) -> std::result::Result<(Header, usize), String> {
    let mut fixed = [0u8; 16];
    file.read_exact(&mut fixed).map_err(|e| e.to_string())?;
    if fixed[..7] == MAGIC[..7] && fixed[7] != MAGIC[7] {
        // An older layout of the image (say, after an upgrade): rebuilt like a corrupt file.
        return Err(format!("weight file format {}, not {}", fixed[7], MAGIC[7]));
    }
    if &fixed[..8] != MAGIC {
        return Err("not a pg_llm weight file".into());
    }
    let len = u64::from_le_bytes(fixed[8..].try_into().unwrap());
    if len > MAX_HEADER {
        return Err(format!("header of {len} bytes"));
    }
    let mut json = vec![0u8; len as usize];
    file.read_exact(&mut json).map_err(|e| e.to_string())?;
    let header: Header = serde_json::from_slice(&json).map_err(|e| e.to_string())?;
    Ok((header, (16 + len as usize).div_ceil(ALIGN) * ALIGN))
}

/// XXH3-64 of each 16 MiB block of the image, combined by XXH3-64 over the block hashes;
/// blocks are hashed in parallel.
fn checksum(bytes: &[u8], cancel: Cancel) -> Result<String> {
    let blocks: Vec<u64> = crate::parallel::install(|| {
        bytes
            .par_chunks(CHECKSUM_BLOCK)
            .map(|block| {
                cancel.check()?;
                Ok(xxhash_rust::xxh3::xxh3_64(block))
            })
            .collect::<Result<_>>()
    })?;
    Ok(combine(&blocks))
}

/// The file checksum from its blocks' hashes (see `checksum`).
fn combine(blocks: &[u64]) -> String {
    let joined: Vec<u8> = blocks.iter().flat_map(|h| h.to_le_bytes()).collect();
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&joined))
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!("{TEMP_MARK}{}", std::process::id()));
    path.with_file_name(name)
}

const TEMP_MARK: &str = ".tmp";

/// Whether `path` names a temporary file of `write` (complete or not).
pub fn is_temporary(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.rsplit_once(TEMP_MARK))
        .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether `path` is a temporary file no living writer holds (its writer died before renaming
/// it into place). Between creating the file and locking it a writer is unprotected for an
/// instant; a file removed then only costs that writer its rename, which it reports as an I/O
/// error (the model stays private to that connection).
pub fn is_abandoned(path: &Path) -> bool {
    is_temporary(path) && !is_held(path)
}

/// Whether a living writer holds the lock of the file at `path` (writing it, or holding it
/// after renaming it into place; see `Held`).
pub fn is_held(path: &Path) -> bool {
    File::open(path).is_ok_and(|f| lock(&f, true).is_err())
}

/// An exclusive advisory lock on `file`, held until the file is closed.
fn lock(file: &File, nonblocking: bool) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let op = if nonblocking {
        libc::LOCK_EX | libc::LOCK_NB
    } else {
        libc::LOCK_EX
    };
    // SAFETY: flock on a valid open descriptor.
    if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A temporary file being written, removed unless it was renamed into place (error or
/// cancel).
struct TempFile {
    path: PathBuf,
    /// Open until `keep` takes it or the file is removed.
    file: Option<File>,
}

/// Files at least this large are removed or closed for the last time off the caller's
/// thread: freeing their blocks in the kernel takes 0.1 s or more, where a caller could not
/// serve a cancel.
pub const LARGE_FILE: u64 = 64 << 20;

impl TempFile {
    fn new(path: PathBuf, file: File) -> Self {
        Self {
            path,
            file: Some(file),
        }
    }

    fn file(&self) -> &File {
        self.file
            .as_ref()
            .expect("a temporary file stays open until kept or removed")
    }

    /// The file was renamed into place: nothing to remove; its descriptor is handed over.
    fn keep(mut self) -> File {
        self.file
            .take()
            .expect("a temporary file stays open until kept or removed")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let Some(file) = self.file.take() else {
            return;
        };
        // The name goes now (so no stray file outlives the error), the blocks with the last
        // descriptor: closing an unlinked file of hundreds of MB frees its pages in the
        // kernel for 0.1 s or more, where a cancelled caller could not answer; a large one is
        // closed on a thread of its own.
        let _ = fs::remove_file(&self.path);
        if file.metadata().is_ok_and(|m| m.len() >= LARGE_FILE) {
            crate::parallel::detach(move || drop(file));
        }
    }
}

fn io(path: &Path, what: &str, e: std::io::Error) -> EngineError {
    EngineError::Io(format!(
        "could not {what} weight file \"{}\": {e}",
        path.display()
    ))
}

fn json(e: serde_json::Error) -> EngineError {
    EngineError::Internal(format!("weight file header: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::tiny_gpt3;
    use crate::model::dtype::Matrix;
    use crate::model::init::init_params;
    use crate::model::MapSource;

    const F32: DType = DType::Float32;

    fn floats(w: &ModelWeights) -> &[f32] {
        w.storage().as_f32().unwrap()
    }

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "pg_llm_weight_file_{}_{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn round_trip_and_rejections() {
        let cfg = tiny_gpt3();
        let params = init_params(&cfg, 7).unwrap();
        let path = dir().join("1.weights");
        let id = FileId {
            owner: "m".into(),
            version: 1,
        };
        assert_eq!(
            open(&path, &id, &cfg, F32, Cancel::NEVER).unwrap().err(),
            Some(Rejected::Missing)
        );

        let in_memory = ModelWeights::load(&cfg, &mut MapSource::new(params)).unwrap();
        let (written, held) =
            write(&path, &id, &cfg, F32, floats(&in_memory), Cancel::NEVER).unwrap();
        // The writer holds the placed file until it lets it go.
        assert!(is_held(&path));
        drop(held);
        assert!(!is_held(&path));
        let mapped = open(&path, &id, &cfg, F32, Cancel::NEVER).unwrap().unwrap();
        assert!(mapped.storage().is_mapped() && !in_memory.storage().is_mapped());
        assert!(written.storage().is_mapped());
        assert_eq!(floats(&written), floats(&in_memory));
        assert_eq!(floats(&mapped), floats(&in_memory));
        assert_eq!(&mapped.layers[1].w_qkv[..], &in_memory.layers[1].w_qkv[..]);
        assert_eq!(read_id(&path), Some(id.clone()));

        // Another version or owner is stale; a changed value or a cut file is corrupt.
        let newer = FileId {
            version: 2,
            ..id.clone()
        };
        assert_eq!(
            open(&path, &newer, &cfg, F32, Cancel::NEVER).unwrap().err(),
            Some(Rejected::Stale)
        );
        let mut other_cfg = cfg.clone();
        other_cfg.ln_eps = 1e-6;
        assert_eq!(
            open(&path, &id, &other_cfg, F32, Cancel::NEVER)
                .unwrap()
                .err(),
            Some(Rejected::Stale)
        );
        assert_eq!(
            open(&path, &id, &cfg, DType::Bfloat16, Cancel::NEVER)
                .unwrap()
                .err(),
            Some(Rejected::Stale)
        );

        // Replaced by rename, as everything that writes weight files does: truncating a file
        // in place would fault the processes mapping it.
        let replace = |contents: &[u8]| {
            let tmp = path.with_extension("new");
            fs::write(&tmp, contents).unwrap();
            fs::rename(&tmp, &path).unwrap();
        };
        let mut bytes = fs::read(&path).unwrap();
        // A file of the previous format (row-major half-precision matrices) is rebuilt.
        let mut older = bytes.clone();
        older[7] = 1;
        replace(&older);
        assert_eq!(
            open(&path, &id, &cfg, F32, Cancel::NEVER).unwrap().err(),
            Some(Rejected::Corrupt("weight file format 1, not 2".into()))
        );
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        replace(&bytes);
        assert!(matches!(
            open(&path, &id, &cfg, F32, Cancel::NEVER).unwrap().err(),
            Some(Rejected::Corrupt(_))
        ));
        replace(&bytes[..bytes.len() - 4]);
        assert!(matches!(
            open(&path, &id, &cfg, F32, Cancel::NEVER).unwrap().err(),
            Some(Rejected::Corrupt(_))
        ));
        replace(b"garbage");
        assert!(matches!(
            open(&path, &id, &cfg, F32, Cancel::NEVER).unwrap().err(),
            Some(Rejected::Corrupt(_))
        ));
        // The mapping made before the file was replaced still reads the original weights.
        assert_eq!(floats(&mapped), floats(&in_memory));
        fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    /// A half-precision file holds half the bytes, maps back as the rounded matrices and the
    /// float32 vectors, and is stale for a reader that wants another dtype.
    #[test]
    fn half_precision_files() {
        let cfg = tiny_gpt3();
        let params = init_params(&cfg, 3).unwrap();
        let in_memory = ModelWeights::load(&cfg, &mut MapSource::new(params)).unwrap();
        let d = dir();
        let id = FileId {
            owner: "m".into(),
            version: 4,
        };
        for dtype in [DType::Bfloat16, DType::Float16] {
            let path = d.join(format!("{}.weights", dtype.name()));
            let (written, _held) =
                write(&path, &id, &cfg, dtype, floats(&in_memory), Cancel::NEVER).unwrap();
            let mapped = open(&path, &id, &cfg, dtype, Cancel::NEVER)
                .unwrap()
                .unwrap();
            assert_eq!(mapped.storage().dtype(), dtype);
            assert!(mapped.storage().as_f32().is_none());
            assert_eq!(written.storage().image(), mapped.storage().image());
            let size = fs::metadata(&path).unwrap().len() as f64;
            let f32_bytes = (4 * packed_len(&cfg).unwrap()) as f64;
            assert!(size < 0.6 * f32_bytes + 8192.0, "{size} bytes");
            // Row-major or grouped (whichever the shape gets), read value by value.
            let w_fc = mapped.layers[0].w_fc.matrix();
            assert!(
                !matches!(w_fc, Matrix::F32(_)),
                "w_fc is not half precision"
            );
            let widened: Vec<f32> = (0..w_fc.len()).map(|i| w_fc.value(i)).collect();
            let rounded: Vec<f32> = in_memory.layers[0]
                .w_fc
                .iter()
                .map(|&v| dtype.round(v))
                .collect();
            assert_eq!(widened, rounded);
            assert_eq!(&mapped.layers[0].b_fc[..], &in_memory.layers[0].b_fc[..]);
            assert_eq!(
                &mapped.layers[1].ln_2.as_ref().unwrap().weight[..],
                &in_memory.layers[1].ln_2.as_ref().unwrap().weight[..]
            );
            assert_eq!(
                open(&path, &id, &cfg, F32, Cancel::NEVER).unwrap().err(),
                Some(Rejected::Stale)
            );
        }
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn temporary_files_of_dead_writers_are_abandoned() {
        let d = dir();
        let final_path = d.join("4.weights");
        let tmp = temp_path(&final_path);
        assert!(is_temporary(&tmp) && !is_temporary(&final_path));
        assert!(!is_temporary(&d.join("4.weights.tmp")));
        // A writer holding its lock: not abandoned; once its handle is gone (process death
        // closes it), abandoned.
        let writer = File::create(&tmp).unwrap();
        lock(&writer, false).unwrap();
        assert!(!is_abandoned(&tmp));
        drop(writer);
        assert!(is_abandoned(&tmp));
        assert!(!is_abandoned(&final_path));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn pieces_written_in_any_order_make_the_same_file() {
        let cfg = tiny_gpt3();
        let params = init_params(&cfg, 5).unwrap();
        let whole = ModelWeights::load(&cfg, &mut MapSource::new(params.clone())).unwrap();
        let d = dir();
        let (a, b) = (d.join("a.weights"), d.join("b.weights"));
        let id = FileId {
            owner: "m".into(),
            version: 9,
        };
        write(&a, &id, &cfg, F32, floats(&whole), Cancel::NEVER).unwrap();
        // Tensor by tensor, last first, as an import hands them over.
        let mut writer = Writer::create(&b, &id.owner, &cfg, F32).unwrap();
        for (name, range) in crate::model::weights::packed_tensors(&cfg)
            .into_iter()
            .rev()
        {
            writer.write_at(range.start, &params[&name].1).unwrap();
        }
        assert!(writer.write_at(packed_len(&cfg).unwrap(), &[1.0]).is_err());
        assert!(!b.exists(), "nothing at the final name before finish");
        drop(writer.finish(&b, id.version, Cancel::NEVER).unwrap());
        assert_eq!(fs::read(&a).unwrap(), fs::read(&b).unwrap());
        let mapped = open(&b, &id, &cfg, F32, Cancel::NEVER).unwrap().unwrap();
        assert_eq!(floats(&mapped), floats(&whole));
        // Dropped unfinished: no file, no temporary.
        let c = d.join("c.weights");
        drop(Writer::create(&c, "m", &cfg, F32).unwrap());
        assert!(fs::read_dir(&d)
            .unwrap()
            .flatten()
            .all(|e| e.path() != c && !is_temporary(&e.path())));
    }

    #[test]
    fn a_failed_write_leaves_nothing_behind() {
        let cfg = tiny_gpt3();
        let d = dir();
        let path = d.join("2.weights");
        let id = FileId {
            owner: "m".into(),
            version: 2,
        };
        // Values that do not fit the model: refused before any file is created.
        let err = write(&path, &id, &cfg, F32, &[0.0; 10], Cancel::NEVER)
            .err()
            .unwrap();
        assert!(matches!(err, EngineError::Internal(_)), "{err}");
        // A directory that does not exist: an I/O error, and no temporary file anywhere.
        let missing = d.join("no such dir").join("3.weights");
        let values = vec![0.0; packed_len(&cfg).unwrap()];
        assert!(matches!(
            write(&missing, &id, &cfg, F32, &values, Cancel::NEVER),
            Err(EngineError::Io(_))
        ));
        assert_eq!(fs::read_dir(&d).unwrap().count(), 0);
        fs::remove_dir_all(&d).unwrap();
    }
}
