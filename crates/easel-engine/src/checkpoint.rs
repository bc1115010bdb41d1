//! Resumable snapshots of a run — image, optimiser state, scale, iteration — in one file written atomically.
//!
//! The file is safetensors: the image and each optimiser tensor keep their exact bits, and the
//! counters and optimiser scalars live in the header's metadata (scalars as f64 bit patterns,
//! since decimal round trips are not guaranteed by every JSON parser). One file, written to a
//! temp name, synced, renamed, and its folder synced, so a power cut leaves either the old
//! checkpoint or the new. (The daemon writes [`Checkpoint::to_bytes`] through its own
//! filesystem calls, in the same order, so that its tests can check it.)

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use easel_core::OptimizerState;
use safetensors::tensor::{Dtype, View};

use crate::EngineError;

/// Version of the checkpoint layout; a file of another version is refused, not misread.
const FORMAT: u32 = 1;
const META_KEY: &str = "easel.checkpoint";
const IMAGE: &str = "image";
const STATE_PREFIX: &str = "optimizer.";

/// Everything a [`crate::StyleRun`] needs to continue exactly where it stood.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Scale index (0-based) the run is in.
    pub scale: usize,
    /// Iterations done in this scale.
    pub iteration: u32,
    /// Iterations done over all scales (the progress count).
    pub done: u32,
    /// Whether the run had finished when the checkpoint was taken.
    pub finished: bool,
    /// The optimiser plugin's `type`; its state only fits the same plugin.
    pub optimizer: String,
    /// The image being optimised, `[1, 3, H, W]`, unclamped.
    pub image: Tensor,
    /// The optimiser's state as [`easel_core::Optimizer::state`] returned it.
    pub state: OptimizerState,
}

/// A tensor's raw little-endian bytes, as safetensors stores them.
struct RawTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &RawTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn bad(path: &Path, reason: impl std::fmt::Display) -> EngineError {
    EngineError::Checkpoint(format!("{}: {reason}", path.display()))
}

fn io(path: &Path, action: &'static str, source: std::io::Error) -> EngineError {
    EngineError::CheckpointIo { path: path.to_path_buf(), action, source }
}

fn invalid(path: &Path, source: safetensors::SafeTensorError) -> EngineError {
    EngineError::CheckpointFormat { path: path.to_path_buf(), source }
}

fn raw(name: &str, t: &Tensor) -> Result<RawTensor, EngineError> {
    let shape = t.dims().to_vec();
    let flat = t.flatten_all()?;
    let (dtype, bytes) = match t.dtype() {
        DType::F32 => (Dtype::F32, flat.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
        DType::F64 => (Dtype::F64, flat.to_vec1::<f64>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
        other => {
            return Err(EngineError::Checkpoint(format!(
                "tensor `{name}` has dtype {other:?}; checkpoints hold f32 and f64 tensors"
            )))
        }
    };
    Ok(RawTensor { dtype, shape, bytes })
}

fn scalar_text(v: f64) -> String {
    format!("{:016x}", v.to_bits())
}

fn scalar_value(text: &str) -> Option<f64> {
    u64::from_str_radix(text, 16).ok().map(f64::from_bits)
}

impl Checkpoint {
    /// Writes the checkpoint to `path` atomically and durably (temp name, sync, rename, sync of
    /// the folder).
    pub fn write(&self, path: &Path) -> Result<(), EngineError> {
        let bytes = self.to_bytes()?;
        easel_core::write_atomically(path, &bytes).map_err(|source| io(path, "write", source))
    }

    /// The checkpoint file's bytes, for a caller that writes them itself.
    pub fn to_bytes(&self) -> Result<Vec<u8>, EngineError> {
        let mut tensors = vec![(IMAGE.to_string(), raw(IMAGE, &self.image)?)];
        for (name, t) in &self.state.tensors {
            tensors.push((format!("{STATE_PREFIX}{name}"), raw(name, t)?));
        }
        let meta = serde_json::json!({
            "format": FORMAT,
            "scale": self.scale,
            "iteration": self.iteration,
            "done": self.done,
            "finished": self.finished,
            "optimizer": self.optimizer,
            "tensors": self.state.tensors.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            "scalars": self.state.scalars.iter().map(|(n, v)| [n.clone(), scalar_text(*v)]).collect::<Vec<_>>(),
        });
        let metadata = HashMap::from([(META_KEY.to_string(), meta.to_string())]);
        safetensors::tensor::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), &Some(metadata))
            .map_err(|e| EngineError::Checkpoint(format!("cannot serialise the checkpoint: {e}")))
    }

    /// Reads a checkpoint written by [`Checkpoint::write`]; tensors are placed on `device`.
    pub fn read(path: &Path, device: &Device) -> Result<Checkpoint, EngineError> {
        let bytes = std::fs::read(path).map_err(|source| io(path, "read", source))?;
        let file = safetensors::SafeTensors::deserialize(&bytes).map_err(|source| invalid(path, source))?;
        let (_, header) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|source| invalid(path, source))?;
        let meta_text = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(META_KEY))
            .ok_or_else(|| bad(path, "not an easel checkpoint (no metadata)"))?;
        let meta: serde_json::Value = serde_json::from_str(meta_text).map_err(|e| bad(path, e))?;
        if meta["format"].as_u64() != Some(FORMAT as u64) {
            return Err(bad(path, format!("checkpoint format {} is not {FORMAT}", meta["format"])));
        }
        let count = |key: &str| {
            meta[key].as_u64().ok_or_else(|| bad(path, format!("`{key}` is missing or not a count")))
        };
        let tensor = |name: &str| -> Result<Tensor, EngineError> {
            let view = file.tensor(name).map_err(|source| invalid(path, source))?;
            let dtype = match view.dtype() {
                Dtype::F32 => DType::F32,
                Dtype::F64 => DType::F64,
                other => return Err(bad(path, format!("tensor `{name}` has unsupported dtype {other:?}"))),
            };
            Ok(Tensor::from_raw_buffer(view.data(), dtype, view.shape(), device)?)
        };
        let mut state = OptimizerState::default();
        for name in meta["tensors"].as_array().ok_or_else(|| bad(path, "`tensors` is missing"))? {
            let name = name.as_str().ok_or_else(|| bad(path, "a tensor name is not a string"))?;
            state.tensors.push((name.to_string(), tensor(&format!("{STATE_PREFIX}{name}"))?));
        }
        for pair in meta["scalars"].as_array().ok_or_else(|| bad(path, "`scalars` is missing"))? {
            let (Some(name), Some(value)) = (pair[0].as_str(), pair[1].as_str().and_then(scalar_value))
            else {
                return Err(bad(path, format!("malformed scalar {pair}")));
            };
            state.scalars.push((name.to_string(), value));
        }
        let as_u32 =
            |v: u64, key: &str| u32::try_from(v).map_err(|_| bad(path, format!("`{key}` is too large")));
        Ok(Checkpoint {
            scale: count("scale")? as usize,
            iteration: as_u32(count("iteration")?, "iteration")?,
            done: as_u32(count("done")?, "done")?,
            finished: meta["finished"].as_bool().unwrap_or(false),
            optimizer: meta["optimizer"]
                .as_str()
                .ok_or_else(|| bad(path, "`optimizer` is missing"))?
                .to_string(),
            image: tensor(IMAGE)?,
            state,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_errors_keep_their_io_source() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("none.safetensors");
        let err = Checkpoint::read(&path, &Device::Cpu).unwrap_err();
        assert!(
            matches!(&err, EngineError::CheckpointIo { source, .. } if source.kind() == std::io::ErrorKind::NotFound),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(text.starts_with(&format!("checkpoint: {}: cannot read: ", path.display())), "{text}");

        std::fs::write(&path, b"not safetensors").unwrap();
        let err = Checkpoint::read(&path, &Device::Cpu).unwrap_err();
        assert!(matches!(err, EngineError::CheckpointFormat { .. }), "{err:?}");
    }

    #[test]
    fn round_trip_keeps_every_bit() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("c.safetensors");
        let values: Vec<f32> =
            (0..48).map(|i| (i as f32 * 0.37).sin() / 3.0 + f32::EPSILON * i as f32).collect();
        let image = Tensor::from_vec(values.clone(), (1, 3, 4, 4), &Device::Cpu).expect("tensor");
        let history = Tensor::from_vec(vec![1e-300f64, -2.5, 1.0 / 3.0], 3, &Device::Cpu).expect("tensor");
        let checkpoint = Checkpoint {
            scale: 1,
            iteration: 7,
            done: 27,
            finished: false,
            optimizer: "adam".into(),
            image,
            state: OptimizerState {
                tensors: vec![("m".into(), history.clone())],
                scalars: vec![("t".into(), 7.0), ("odd".into(), 0.1 + 0.2)],
            },
        };
        checkpoint.write(&path).expect("write");
        let back = Checkpoint::read(&path, &Device::Cpu).expect("read");
        assert_eq!((back.scale, back.iteration, back.done, back.finished), (1, 7, 27, false));
        assert_eq!(back.optimizer, "adam");
        let bits = |v: Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(back.image.flatten_all().unwrap().to_vec1().unwrap()), bits(values));
        let m = back.state.tensor("m").expect("m").to_vec1::<f64>().unwrap();
        assert_eq!(
            m.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            [1e-300f64, -2.5, 1.0 / 3.0].map(f64::to_bits)
        );
        assert_eq!(back.state.scalar("odd").unwrap().to_bits(), (0.1f64 + 0.2).to_bits());
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temp file is left behind");
    }

    #[test]
    fn a_truncated_file_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("c.safetensors");
        std::fs::write(&path, b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":").expect("write");
        assert!(Checkpoint::read(&path, &Device::Cpu).is_err());
    }
}
