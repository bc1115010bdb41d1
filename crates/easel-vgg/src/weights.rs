//! A safetensors weights file, memory-mapped once and shared by every job that reads it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata};
use safetensors::SafeTensorError;
use sha2::{Digest, Sha256};

use crate::{VggError, CONVS};

/// A mapped safetensors file. Tensors are converted to f32 only when a model asks for them.
pub struct WeightsFile {
    path: PathBuf,
    mmap: Mmap,
    header_len: usize,
    metadata: Metadata,
    sha256: OnceLock<String>,
}

/// One tensor of a file, as `easel weights inspect` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSummary {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub bytes: usize,
}

/// What a weights file holds and whether easel can use it.
#[derive(Debug, Clone)]
pub struct Inspection {
    pub tensors: Vec<TensorSummary>,
    /// Problems that make the file unusable as VGG-19 (empty when usable).
    pub problems: Vec<String>,
}

/// Maps `file` read-only.
///
/// # Safety
///
/// The caller must ensure the file is not truncated or modified by another process while
/// the map is alive: a shrinking file makes later reads fault (SIGBUS), and a rewrite changes
/// tensors under the reader. easel only maps weights files, which are written once (by
/// `easel weights synth`/`fetch` through a temp name and a rename) and then only read.
unsafe fn map_read_only(file: &File) -> std::io::Result<Mmap> {
    // SAFETY: upheld by this function's caller, see `# Safety`.
    unsafe { Mmap::map(file) }
}

/// Drops the resident pages of `map` (`MADV_DONTNEED`).
///
/// # Safety
///
/// `map` must be a read-only mapping of a file that is not modified while mapped (as for
/// [`map_read_only`]): its pages are then re-read unchanged from the file on the next access.
/// On a private writable mapping this would discard writes, which is why memmap2 marks it unsafe.
unsafe fn release(map: &Mmap) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        // SAFETY: upheld by this function's caller, see `# Safety`.
        unsafe { map.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) }
    }
    #[cfg(not(unix))]
    {
        let _ = map;
        Ok(())
    }
}

fn expected_shape(name: &str) -> Option<Vec<usize>> {
    let rest = name.strip_prefix("features.")?;
    let (index, kind) = rest.split_once('.')?;
    let index: usize = index.parse().ok()?;
    let &(_, cin, cout) = CONVS.iter().find(|(i, _, _)| *i == index)?;
    match kind {
        "weight" => Some(vec![cout, cin, 3, 3]),
        "bias" => Some(vec![cout]),
        _ => None,
    }
}

fn layer_of(index: usize) -> String {
    easel_core::LayerId::from_features_index(index).map(|l| l.name().to_string()).unwrap_or_default()
}

impl WeightsFile {
    /// Maps and parses the header of `path`; tensor data is not read yet.
    ///
    /// # The mapped file
    ///
    /// The file is mapped, not read, so it must not be truncated or rewritten in place while
    /// this value (or a model loading from it) is alive: a shrunk file makes a later read fault
    /// (SIGBUS, which ends the process) and a rewrite changes tensors under the reader. That is
    /// memmap2's `unsafe` contract, which this function takes on rather than passing it to
    /// every caller: easel's own writers (`easel weights synth`, `fetch`, `convert`) write a
    /// temp file and rename it over the old one, which leaves a mapped file untouched, and
    /// the install docs say to replace weights the same way (`mv`, never `cp` over them).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, VggError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| VggError::Io { path: path.clone(), source };
        let file = File::open(&path).map_err(io)?;
        // SAFETY: weights files are written once through a temp name and a rename and are
        // never modified in place (see `map_read_only`); a user editing the file under a
        // running daemon is outside what easel can defend against without copying 550 MB.
        let mmap = unsafe { map_read_only(&file) }.map_err(io)?;
        let (header_len, metadata) = match safetensors::SafeTensors::read_metadata(&mmap[..]) {
            Ok(parsed) => parsed,
            Err(SafeTensorError::MetadataIncompleteBuffer) => {
                let expected = Self::declared_data_len(&mmap).unwrap_or(0);
                let found = mmap.len().saturating_sub(8 + Self::declared_header_len(&mmap).unwrap_or(0));
                return Err(VggError::Truncated { path, expected, found });
            }
            Err(e) => return Err(VggError::NotSafetensors { path, reason: describe(&e, mmap.len()) }),
        };
        Ok(Self { path, mmap, header_len, metadata, sha256: OnceLock::new() })
    }

    fn declared_header_len(bytes: &[u8]) -> Option<usize> {
        let len: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
        usize::try_from(u64::from_le_bytes(len)).ok()
    }

    fn declared_data_len(bytes: &[u8]) -> Option<usize> {
        let n = Self::declared_header_len(bytes)?;
        let header: serde_json::Value = serde_json::from_slice(bytes.get(8..8 + n)?).ok()?;
        header
            .as_object()?
            .iter()
            .filter(|(k, _)| *k != "__metadata__")
            .filter_map(|(_, v)| v.get("data_offsets")?.get(1)?.as_u64())
            .max()
            .map(|m| m as usize)
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Hex sha256 of the whole file, computed once on first use (for provenance).
    ///
    /// Read through a small buffer rather than the map, so hashing does not make the whole
    /// file resident in this process.
    pub fn sha256(&self) -> Result<&str, VggError> {
        if let Some(hex) = self.sha256.get() {
            return Ok(hex);
        }
        let io = |source| VggError::Io { path: self.path.clone(), source };
        let mut file = File::open(&self.path).map_err(io)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = std::io::Read::read(&mut file, &mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        Ok(self.sha256.get_or_init(|| format!("{:x}", hasher.finalize())))
    }

    /// Lets the kernel drop this process's resident pages of the map: after a model has
    /// converted the tensors it needs, the map is only kept for later models.
    pub fn release_pages(&self) {
        // SAFETY: the map is read-only and file-backed, so dropping its pages loses nothing:
        // a later read faults them back in from the file (see `map_read_only`).
        // Only a hint: failing to release costs memory, never correctness.
        let _ = unsafe { release(&self.mmap) };
    }

    /// Every tensor in the file, sorted by name, and whether the file is a usable VGG-19.
    pub fn inspect(&self) -> Inspection {
        let mut tensors: Vec<TensorSummary> = self
            .metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| TensorSummary {
                name,
                dtype: format!("{:?}", info.dtype),
                shape: info.shape.clone(),
                bytes: info.data_offsets.1 - info.data_offsets.0,
            })
            .collect();
        tensors.sort_by_key(|t| {
            let index = t.name.split('.').nth(1).and_then(|i| i.parse::<usize>().ok()).unwrap_or(usize::MAX);
            (index, t.name.clone())
        });
        let problems = CONVS
            .iter()
            .flat_map(|&(i, _, _)| [format!("features.{i}.weight"), format!("features.{i}.bias")])
            .filter_map(|name| self.raw(&name).err().map(|e| e.to_string()))
            .collect();
        Inspection { tensors, problems }
    }

    fn raw(&self, name: &str) -> Result<(Dtype, &[u8]), VggError> {
        let info = self.metadata.info(name).ok_or_else(|| VggError::MissingTensor {
            path: self.path.clone(),
            name: name.to_string(),
            layer: name.split('.').nth(1).and_then(|i| i.parse().ok()).map(layer_of).unwrap_or_default(),
        })?;
        if let Some(expected) = expected_shape(name) {
            if info.shape != expected {
                return Err(VggError::WrongShape {
                    path: self.path.clone(),
                    name: name.to_string(),
                    expected,
                    found: info.shape.clone(),
                });
            }
        }
        if !matches!(info.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            return Err(VggError::UnsupportedDtype {
                path: self.path.clone(),
                name: name.to_string(),
                dtype: format!("{:?}", info.dtype),
            });
        }
        let start = 8 + self.header_len + info.data_offsets.0;
        let end = 8 + self.header_len + info.data_offsets.1;
        Ok((info.dtype, &self.mmap[start..end]))
    }

    /// The tensor `name` as f32 on the host, with its shape checked against VGG-19.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>, VggError> {
        let (dtype, bytes) = self.raw(name)?;
        // Byte-wise little-endian decoding: the data in a mapped file need not be aligned,
        // and this is also correct on big-endian hosts.
        Ok(match dtype {
            Dtype::F32 => {
                bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
            }
            Dtype::F16 => {
                bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
            }
            _ => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        })
    }

    /// The tensor `name` as an f32 tensor on `device`.
    pub fn tensor(&self, name: &str, device: &Device) -> Result<Tensor, VggError> {
        let shape = self.metadata.info(name).map(|i| i.shape.clone()).unwrap_or_default();
        let data = self.read_f32(name)?;
        Ok(Tensor::from_vec(data, shape, device)?)
    }
}

fn describe(e: &SafeTensorError, len: usize) -> String {
    match e {
        SafeTensorError::HeaderTooSmall if len < 8 => format!("only {len} bytes long"),
        SafeTensorError::HeaderTooLarge | SafeTensorError::InvalidHeaderLength => {
            "the first 8 bytes do not give a plausible header length".to_string()
        }
        SafeTensorError::InvalidHeader | SafeTensorError::InvalidHeaderStart => {
            "the header is not valid JSON".to_string()
        }
        SafeTensorError::InvalidHeaderDeserialization => "the header does not describe tensors".to_string(),
        other => other.to_string(),
    }
}
