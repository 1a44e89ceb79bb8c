//! The memory behind a model's weights: one buffer, either float32 values owned in memory or
//! a weight image (`dtype::Layout`: float32, or half-precision matrices) mapped read-only from
//! a weight file or held in memory, and `Param`, a tensor's range of it. One buffer per model keeps the
//! weights contiguous, lets a weight file be a plain image of it, and lets every backend that
//! maps the same file share one copy in the page cache.

use std::ops::{Deref, Range};
use std::sync::Arc;

use super::dtype::{DType, Layout, Matrix};
use crate::error::{EngineError, Result};

pub enum Storage {
    /// Float32 values in packing order.
    Owned(Vec<f32>),
    /// A weight image (see `dtype::Layout`) starting `offset` bytes into a read-only file
    /// mapping (offset is a multiple of the page size, so the values are aligned).
    Mapped {
        map: memmap2::Mmap,
        offset: usize,
        layout: Layout,
    },
    /// A weight image in memory: a half-precision model served without weight files.
    Image { words: Vec<u64>, layout: Layout },
}

impl Storage {
    /// A weight image of `values` (all packed values) in `layout`, in memory.
    pub fn image_of(values: &[f32], layout: Layout) -> Result<Self> {
        let mut words = Vec::new();
        words
            .try_reserve_exact(layout.bytes().div_ceil(8))
            .map_err(|_| EngineError::too_large("the weights do not fit in memory"))?;
        words.resize(layout.bytes().div_ceil(8), 0);
        // SAFETY: u64 words viewed as bytes.
        let (_, bytes, _) = unsafe { words.align_to_mut::<u8>() };
        layout.encode_into(&mut bytes[..layout.bytes()], values);
        Ok(Storage::Image { words, layout })
    }

    /// Number of packed values.
    pub fn len(&self) -> usize {
        match self {
            Storage::Owned(v) => v.len(),
            Storage::Mapped { layout, .. } | Storage::Image { layout, .. } => layout.values(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The precision the matrices are held in.
    pub fn dtype(&self) -> DType {
        match self {
            Storage::Owned(_) => DType::Float32,
            Storage::Mapped { layout, .. } | Storage::Image { layout, .. } => layout.dtype,
        }
    }

    /// The bytes of the whole image (float32 values in packing order for a float32 model).
    pub fn image(&self) -> &[u8] {
        match self {
            Storage::Owned(v) => {
                // SAFETY: reading f32 values as bytes is always valid.
                let (_, bytes, _) = unsafe { v.align_to::<u8>() };
                bytes
            }
            Storage::Mapped {
                map,
                offset,
                layout,
            } => &map[*offset..*offset + layout.bytes()],
            Storage::Image { words, layout } => {
                // SAFETY: reading u64 words as bytes is always valid.
                let (_, bytes, _) = unsafe { words.align_to::<u8>() };
                &bytes[..layout.bytes()]
            }
        }
    }

    /// Every value in packing order, when the model is float32.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match self {
            Storage::Owned(v) => Some(v),
            _ if self.dtype() == DType::Float32 => Some(self.f32s(0..self.len())),
            _ => None,
        }
    }

    /// True when the values live in a shared file mapping rather than private memory.
    pub fn is_mapped(&self) -> bool {
        matches!(self, Storage::Mapped { .. })
    }

    /// Float32 values `range` (a vector, or anything of a float32 model).
    fn f32s(&self, range: Range<usize>) -> &[f32] {
        match self {
            Storage::Owned(v) => &v[range],
            Storage::Mapped { layout, .. } | Storage::Image { layout, .. } => {
                layout.f32s(self.image(), range)
            }
        }
    }

    fn matrix(&self, range: Range<usize>) -> Matrix<'_> {
        match self {
            Storage::Owned(v) => Matrix::F32(&v[range]),
            Storage::Mapped { layout, .. } | Storage::Image { layout, .. } => {
                layout.matrix(self.image(), range)
            }
        }
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

impl Param {
    /// The tensor as a matrix for the kernels: float32, or half-precision bits.
    pub fn matrix(&self) -> Matrix<'_> {
        self.storage.matrix(self.range.clone())
    }
}

/// A float32 tensor's values. Vectors are float32 in every model; a matrix of a
/// half-precision model is read through `matrix` (reading it here is a programming error).
impl Deref for Param {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        self.storage.f32s(self.range.clone())
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
