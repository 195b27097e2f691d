//! A safetensors checkpoint read tensor by tensor with positioned reads,
//! not through a memory map.
//!
//! Each tensor is read once, straight into the memory the layer keeps or
//! packs from; the file's pages stay in the kernel's page cache and out of
//! this process's resident set. Through a map, every page of a 600 MB
//! ViT-B/32 checkpoint stayed resident until loading ended, next to the
//! copies the layers had made: loading peaked at twice the weights.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

use super::{Error, Result};

/// The largest header read: real checkpoints have well under 1 MB of it.
const MAX_HEADER: u64 = 100 << 20;

/// Where one tensor lies in the file.
#[derive(Clone, Debug)]
struct Entry {
    dtype: DType,
    shape: Vec<usize>,
    /// Byte offset in the file.
    start: u64,
    len: usize,
}

/// An open safetensors file and its header.
pub struct TensorFile {
    path: PathBuf,
    file: File,
    entries: HashMap<String, Entry>,
}

impl TensorFile {
    /// Opens `path` and reads its header; every tensor's place is checked
    /// against its dtype, shape and the file's length.
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |message: String| Error::Weights(format!("{}: {message}", path.display()));
        let file = File::open(path).map_err(|e| bad(e.to_string()))?;
        let file_len = file.metadata().map_err(|e| bad(e.to_string()))?.len();
        let mut head = [0u8; 8];
        file.read_exact_at(&mut head, 0)
            .map_err(|_| bad("too short for a safetensors file".into()))?;
        let header_len = u64::from_le_bytes(head);
        if header_len > MAX_HEADER || 8 + header_len > file_len {
            return Err(bad(format!(
                "not a safetensors file (a header of {header_len} bytes in {file_len})"
            )));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact_at(&mut header, 8)
            .map_err(|e| bad(e.to_string()))?;
        let header: HashMap<String, serde_json::Value> =
            serde_json::from_slice(&header).map_err(|e| bad(format!("unreadable header: {e}")))?;
        let data_start = 8 + header_len;
        let mut entries = HashMap::new();
        for (name, info) in header {
            if name == "__metadata__" {
                continue;
            }
            let entry = parse_entry(&info, data_start, file_len)
                .map_err(|message| bad(format!("tensor {name}: {message}")))?;
            entries.insert(name, entry);
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            entries,
        })
    }

    /// The tensor `name`, as stored.
    pub fn read(&self, name: &str) -> candle_core::Result<Tensor> {
        let entry = self.entries.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!("{}: no tensor {name}", self.path.display()))
        })?;
        let io = |e: std::io::Error| {
            candle_core::Error::Msg(format!("{}: reading {name}: {e}", self.path.display()))
        };
        // f32, the common case, is read straight into the tensor's memory.
        #[cfg(target_endian = "little")]
        if entry.dtype == DType::F32 {
            let mut values = vec![0f32; entry.len / 4];
            // Safety: any bytes are a valid f32, and the slice covers
            // exactly the vector's initialised elements.
            let bytes = unsafe {
                std::slice::from_raw_parts_mut(values.as_mut_ptr() as *mut u8, entry.len)
            };
            self.file.read_exact_at(bytes, entry.start).map_err(io)?;
            return Tensor::from_vec(values, entry.shape.as_slice(), &Device::Cpu);
        }
        let mut bytes = vec![0u8; entry.len];
        self.file
            .read_exact_at(&mut bytes, entry.start)
            .map_err(io)?;
        Tensor::from_raw_buffer(&bytes, entry.dtype, &entry.shape, &Device::Cpu)
    }

    /// Every tensor, in memory.
    pub fn read_all(&self) -> Result<HashMap<String, Tensor>> {
        self.entries
            .keys()
            .map(|name| Ok((name.clone(), self.read(name)?)))
            .collect::<candle_core::Result<_>>()
            .map_err(|e| Error::Weights(e.to_string()))
    }
}

fn parse_entry(info: &serde_json::Value, data_start: u64, file_len: u64) -> Result<Entry, String> {
    let dtype = match info["dtype"].as_str() {
        Some("F32") => DType::F32,
        Some("F16") => DType::F16,
        Some("BF16") => DType::BF16,
        Some("F64") => DType::F64,
        Some("I64") => DType::I64,
        Some("U32") => DType::U32,
        Some("U8") => DType::U8,
        Some(other) => return Err(format!("unsupported dtype {other}")),
        None => return Err("no dtype".into()),
    };
    let shape = info["shape"]
        .as_array()
        .and_then(|dims| {
            dims.iter()
                .map(|d| d.as_u64().map(|d| d as usize))
                .collect()
        })
        .ok_or("no shape")?;
    let offsets: Vec<u64> = info["data_offsets"]
        .as_array()
        .and_then(|o| o.iter().map(serde_json::Value::as_u64).collect())
        .filter(|o: &Vec<u64>| o.len() == 2 && o[0] <= o[1])
        .ok_or("bad data offsets")?;
    let shape: Vec<usize> = shape;
    let expected = shape
        .iter()
        .try_fold(dtype.size_in_bytes(), |n, &d| n.checked_mul(d))
        .ok_or("its shape overflows")?;
    let len = offsets[1] - offsets[0];
    if len != expected as u64 {
        return Err(format!(
            "{len} bytes for a {dtype:?} tensor of shape {shape:?} ({expected} expected)"
        ));
    }
    let start = data_start + offsets[0];
    if start + len > file_len {
        return Err(format!(
            "its data ends at byte {}, past the end of the file ({file_len}): truncated?",
            start + len
        ));
    }
    Ok(Entry {
        dtype,
        shape,
        start,
        len: len as usize,
    })
}

impl SimpleBackend for TensorFile {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.get_unchecked(name, dtype, dev)?;
        if tensor.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: tensor.shape().clone(),
            });
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.read(name)?.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, tensors: &[(&str, Tensor)]) {
        let map: HashMap<String, Tensor> = tensors
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        candle_core::safetensors::save(&map, path).unwrap();
    }

    #[test]
    fn reads_what_candle_wrote_in_every_dtype() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let x = crate::model::test_support::random(&[3, 5], 1);
        write(
            &path,
            &[
                ("f32", x.clone()),
                ("f16", x.to_dtype(DType::F16).unwrap()),
                ("bf16", x.to_dtype(DType::BF16).unwrap()),
                ("ids", Tensor::new(&[1i64, 2, 3], &Device::Cpu).unwrap()),
                ("scalar", Tensor::new(2.5f32, &Device::Cpu).unwrap()),
            ],
        );
        let file = TensorFile::open(&path).unwrap();
        let all = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        assert_eq!(file.entries.len(), all.len());
        for (name, want) in &all {
            let got = file.read(name).unwrap();
            assert_eq!(got.dtype(), want.dtype(), "{name}");
            assert_eq!(got.shape(), want.shape(), "{name}");
            let (g, w) = (
                got.to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap(),
                want.to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap(),
            );
            assert_eq!(g, w, "{name}");
        }
        let vb = candle_nn::VarBuilder::from_backend(Box::new(file), DType::F32, Device::Cpu);
        assert_eq!(vb.get((3, 5), "bf16").unwrap().dtype(), DType::F32);
        assert!(vb.get((5, 3), "f32").is_err());
        assert!(vb.get((3, 5), "missing").is_err());
    }

    #[test]
    fn truncated_and_foreign_files_are_refused_with_their_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        write(
            &path,
            &[("w", crate::model::test_support::random(&[64, 64], 2))],
        );
        let bytes = std::fs::read(&path).unwrap();
        let cut = dir.path().join("cut.safetensors");
        std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
        let e = TensorFile::open(&cut).err().unwrap().to_string();
        assert!(
            e.contains("cut.safetensors") && e.contains("truncated"),
            "{e}"
        );
        for (name, content) in [
            ("empty.safetensors", Vec::new()),
            ("text.safetensors", b"not a checkpoint at all".to_vec()),
            ("huge.safetensors", u64::MAX.to_le_bytes().to_vec()),
        ] {
            let p = dir.path().join(name);
            std::fs::write(&p, content).unwrap();
            let e = TensorFile::open(&p).err().unwrap().to_string();
            assert!(e.contains(name), "{e}");
        }
    }
}
