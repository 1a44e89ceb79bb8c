//! The memory behind a model's weights: one float32 buffer, either owned or mapped read-only
//! from a weight file, and `Param`, a tensor's range of it. One buffer per model keeps the
//! weights contiguous, lets a weight file be a plain image of it, and lets every backend that
//! maps the same file share one copy in the page cache.

use std::ops::{Deref, Range};
use std::sync::Arc;

pub enum Storage {
    Owned(Vec<f32>),
    /// `len` values starting `offset` bytes into a read-only file mapping (offset is a
    /// multiple of the page size, so the values are aligned).
    Mapped {
        map: memmap2::Mmap,
        offset: usize,
        len: usize,
    },
}

impl Storage {
    pub fn as_slice(&self) -> &[f32] {
        match self {
            Storage::Owned(v) => v,
            Storage::Mapped { map, offset, len } => {
                let bytes = &map[*offset..*offset + *len * 4];
                // SAFETY: every bit pattern is a valid f32; alignment is checked below.
                let (head, floats, tail) = unsafe { bytes.align_to::<f32>() };
                assert!(head.is_empty() && tail.is_empty(), "weight file misaligned");
                floats
            }
        }
    }

    /// True when the values live in a shared file mapping rather than private memory.
    pub fn is_mapped(&self) -> bool {
        matches!(self, Storage::Mapped { .. })
    }
}

/// One tensor's values: a range of a model's shared storage.
#[derive(Clone)]
pub struct Param {
    storage: Arc<Storage>,
    range: Range<usize>,
}

impl Param {
    pub fn storage(&self) -> &Arc<Storage> {
        &self.storage
    }

    /// Where this tensor's values lie in the packed buffer (and its gradient in a gradient
    /// buffer of the same packing).
    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }
}

impl Deref for Param {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.storage.as_slice()[self.range.clone()]
    }
}

impl std::fmt::Debug for Param {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Param({:?})", self.range)
    }
}

/// Hands out consecutive ranges of a storage, in packing order.
pub(crate) struct Cursor {
    storage: Arc<Storage>,
    pos: usize,
}

impl Cursor {
    pub fn new(storage: Arc<Storage>) -> Self {
        Self { storage, pos: 0 }
    }

    pub fn take(&mut self, n: usize) -> Param {
        let range = self.pos..self.pos + n;
        self.pos += n;
        Param {
            storage: self.storage.clone(),
            range,
        }
    }

    /// Number of values handed out so far.
    pub fn position(&self) -> usize {
        self.pos
    }
}
