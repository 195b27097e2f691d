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
use std::sync::Arc;

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

/// An open safetensors file and its header (cheap to clone: both shared).
#[derive(Clone)]
pub struct TensorFile {
    path: Arc<PathBuf>,
    file: Arc<File>,
    entries: Arc<HashMap<String, Entry>>,
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
            path: Arc::new(path.to_path_buf()),
            file: Arc::new(file),
            entries: Arc::new(entries),
        })
    }

    /// This file with the tensors `pairs` name (stored name, other name)
    /// reachable under their other names too.
    pub fn renamed(&self, pairs: &[(&str, &str)]) -> Self {
        let mut entries = (*self.entries).clone();
        for (stored, other) in pairs {
            if let Some(entry) = self.entries.get(*stored) {
                entries.insert(other.to_string(), entry.clone());
            }
        }
        Self {
            entries: Arc::new(entries),
            ..self.clone()
        }
    }

    /// The 2-D float tensor `name` of shape `shape`, left in the file to be
    /// read a row at a time ([`FileRows`]); `None` where the file has no
    /// `name`, an error where it has another shape or is not floats.
    pub fn rows(&self, name: &str, shape: (usize, usize)) -> candle_core::Result<Option<FileRows>> {
        let Some(entry) = self.entries.get(name) else {
            return Ok(None);
        };
        if entry.shape != [shape.0, shape.1] || !entry.dtype.is_float() {
            return Err(candle_core::Error::Msg(format!(
                "{}: {name} is a {:?} tensor of shape {:?}, not floats of shape {shape:?}",
                self.path.display(),
                entry.dtype,
                entry.shape
            )));
        }
        Ok(Some(FileRows {
            file: self.clone(),
            name: name.to_string(),
            entry: entry.clone(),
        }))
    }

    /// The tensor `name`, as stored.
    pub fn read(&self, name: &str) -> candle_core::Result<Tensor> {
        let entry = self.entries.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!("{}: no tensor {name}", self.path.display()))
        })?;
        let io = |e: std::io::Error| {
            candle_core::Error::Msg(format!("{}: reading {name}: {e}", self.path.display()))
        };
        // f32, the common case, is read straight into the tensor's memory,
        // which is not zeroed first (a pass over every weight, 1 to 2% of
        // a one-off query's time).
        #[cfg(target_endian = "little")]
        if entry.dtype == DType::F32 {
            let mut values = Vec::<f32>::with_capacity(entry.len / 4);
            read_into(&self.file, values.spare_capacity_mut(), entry.start).map_err(io)?;
            // Safety: `read_into` wrote every byte of the first `len / 4`
            // elements, and any bytes are a valid f32.
            unsafe { values.set_len(entry.len / 4) };
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
        self.read_all_but(&[])
    }

    /// Every tensor but those named in `but`, in memory.
    pub fn read_all_but(&self, but: &[&str]) -> Result<HashMap<String, Tensor>> {
        self.entries
            .keys()
            .filter(|name| !but.contains(&name.as_str()))
            .map(|name| Ok((name.clone(), self.read(name)?)))
            .collect::<candle_core::Result<_>>()
            .map_err(|e| Error::Weights(e.to_string()))
    }
}

/// Fills `dst` from `file` at byte `offset`, whole or not at all (an error),
/// never reading what `dst` held: its bytes need not be initialised.
fn read_into<T: Copy>(
    file: &File,
    dst: &mut [std::mem::MaybeUninit<T>],
    offset: u64,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let len = std::mem::size_of_val(dst);
    let base = dst.as_mut_ptr() as *mut u8;
    let mut done = 0;
    while done < len {
        let at = libc::off_t::try_from(offset + done as u64)
            .map_err(|_| std::io::Error::other("offset past what the system can read"))?;
        // Safety: the destination lies within `dst`, which is valid for
        // writes of `len` bytes; `pread` only writes to it.
        let n = unsafe {
            libc::pread(
                file.as_raw_fd(),
                base.add(done) as *mut libc::c_void,
                len - done,
                at,
            )
        };
        match n {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n if n > 0 => done += n as usize,
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// The rows of a 2-D tensor of a checkpoint, read from the file as they are
/// asked for: an embedding table of which a query needs a dozen rows
/// (CLIP's 49,408 tokens x 512 are 101 MB of f32, XLM-R's 250,002 words x
/// 768 are 768 MB) stays out of memory, in the kernel's page cache.
#[derive(Clone)]
pub struct FileRows {
    file: TensorFile,
    name: String,
    entry: Entry,
}

impl std::fmt::Debug for FileRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "FileRows({}: {} {:?})",
            self.file.path.display(),
            self.name,
            self.entry.shape
        )
    }
}

impl FileRows {
    /// Rows and columns.
    pub fn dims(&self) -> (usize, usize) {
        (self.entry.shape[0], self.entry.shape[1])
    }

    /// Rows `ids` as an (ids.len(), columns) f32 tensor: the values reading
    /// the whole tensor and converting it to f32 gives.
    pub fn gather(&self, ids: &[u32]) -> candle_core::Result<Tensor> {
        let (rows, cols) = self.dims();
        let row_bytes = cols * self.entry.dtype.size_in_bytes();
        let mut bytes = vec![0u8; ids.len() * row_bytes];
        for (&id, dst) in ids.iter().zip(bytes.chunks_exact_mut(row_bytes.max(1))) {
            let id = id as usize;
            if id >= rows {
                return Err(candle_core::Error::Msg(format!(
                    "id {id} is outside {}'s {rows} rows",
                    self.name
                )));
            }
            let at = self.entry.start + (id * row_bytes) as u64;
            self.file.file.read_exact_at(dst, at).map_err(|e| {
                candle_core::Error::Msg(format!(
                    "{}: reading row {id} of {}: {e}",
                    self.file.path.display(),
                    self.name
                ))
            })?;
        }
        Tensor::from_raw_buffer(&bytes, self.entry.dtype, &[ids.len(), cols], &Device::Cpu)?
            .to_dtype(DType::F32)
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

    /// A random tensor of `shape` as "f32", "f16" and "bf16", and `more`.
    fn write_floats(path: &Path, shape: &[usize], seed: u64, more: Vec<(&str, Tensor)>) {
        let x = crate::model::test_support::random(shape, seed);
        let mut tensors = vec![
            ("f32", x.clone()),
            ("f16", x.to_dtype(DType::F16).unwrap()),
            ("bf16", x.to_dtype(DType::BF16).unwrap()),
        ];
        tensors.extend(more);
        write(path, &tensors);
    }

    #[test]
    fn reads_what_candle_wrote_in_every_dtype() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        write_floats(
            &path,
            &[3, 5],
            1,
            vec![
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

    #[test]
    fn rows_left_in_the_file_are_the_rows_of_the_tensor_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        write_floats(
            &path,
            &[7, 5],
            3,
            vec![(
                "ids",
                Tensor::new(&[[1i64, 2], [3, 4]], &Device::Cpu).unwrap(),
            )],
        );
        let file = TensorFile::open(&path).unwrap();
        let ids = [6u32, 0, 3, 3];
        let id_tensor = Tensor::new(&ids, &Device::Cpu).unwrap();
        for name in ["f32", "f16", "bf16"] {
            let rows = file.rows(name, (7, 5)).unwrap().unwrap();
            assert_eq!(rows.dims(), (7, 5));
            let whole = file.read(name).unwrap().to_dtype(DType::F32).unwrap();
            let want = whole
                .embedding(&id_tensor)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let got = rows.gather(&ids).unwrap();
            assert_eq!(got.dtype(), DType::F32);
            assert_eq!(got.to_vec2::<f32>().unwrap(), want, "{name}");
            let e = rows.gather(&[7]).unwrap_err().to_string();
            assert!(e.contains("id 7") && e.contains(name), "{e}");
        }
        // Another shape or an integer tensor is refused, with its name; a
        // missing one is none.
        for (name, shape) in [("f32", (5, 7)), ("ids", (2, 2))] {
            let e = file.rows(name, shape).unwrap_err().to_string();
            assert!(e.contains(name) && e.contains("model.safetensors"), "{e}");
        }
        assert!(file.rows("missing", (7, 5)).unwrap().is_none());
    }

    #[test]
    fn a_file_cut_after_opening_fails_the_lookup_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        write(
            &path,
            &[("table", crate::model::test_support::random(&[64, 16], 4))],
        );
        let rows = TensorFile::open(&path)
            .unwrap()
            .rows("table", (64, 16))
            .unwrap()
            .unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 16 * 4 * 8)
            .unwrap();
        assert!(rows.gather(&[0]).is_ok());
        let e = rows.gather(&[63]).unwrap_err().to_string();
        assert!(
            e.contains("model.safetensors") && e.contains("row 63"),
            "{e}"
        );
    }
}
