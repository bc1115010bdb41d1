//! The f32 elements of a tensor in CPU memory, borrowed for easel's own CPU loops.

use std::ops::{Deref, Range};

use candle_core::{DType, Storage, Tensor};

use crate::VggError;

/// `t` as a contiguous f32 tensor (a cheap clone when it already is one).
pub(crate) fn contiguous_f32(t: &Tensor) -> Result<Tensor, VggError> {
    let t = if t.dtype() == DType::F32 { t.clone() } else { t.to_dtype(DType::F32)? };
    Ok(t.contiguous()?)
}

/// The elements of a contiguous f32 tensor in CPU memory, without copying: a read lock on
/// its storage (`S`, candle's guard), held while the slice is in use.
pub(crate) struct HostSlice<S> {
    storage: S,
    range: Range<usize>,
}

/// Borrows the elements of `t`, which must be a contiguous f32 tensor in CPU memory (the CPU
/// backend only makes such tensors; [`contiguous_f32`] turns others into one).
pub(crate) fn host_slice(t: &Tensor) -> Result<HostSlice<impl Deref<Target = Storage> + '_>, VggError> {
    let (storage, layout) = t.storage_and_layout();
    let range = match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(cpu), Some((start, end))) if cpu.as_slice::<f32>().is_ok_and(|s| end <= s.len()) => {
            start..end
        }
        _ => {
            return Err(VggError::Internal(format!(
                "the CPU backend got a tensor it cannot read in place ({:?}, {:?}, contiguous: {})",
                t.device().location(),
                t.dtype(),
                t.is_contiguous()
            )))
        }
    };
    Ok(HostSlice { storage, range })
}

impl<S: Deref<Target = Storage>> HostSlice<S> {
    /// The elements.
    pub(crate) fn get(&self) -> &[f32] {
        match &*self.storage {
            // `host_slice` checked that the storage is the CPU's, of f32, and holds the range.
            Storage::Cpu(cpu) => cpu.as_slice::<f32>().map_or(&[], |s| &s[self.range.clone()]),
            _ => unreachable!("host_slice accepts CPU storage only"),
        }
    }
}
