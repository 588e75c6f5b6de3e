//! Memory-mapped safetensors files behind a candle `VarBuilder`, with errors that name the file and the tensor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::{Load, MmapedSafetensors};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use super::mapped::Mapping;
use crate::{Error, Result};

/// The tensors of one model component, spread over one or more safetensors files.
pub struct Weights {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    /// Per file: the open file and where each tensor's bytes start in it, for reading tensors straight into their
    /// own memory (see [`read_direct`]).
    direct: Vec<Option<DirectFile>>,
    /// tensor name → index into `files`.
    routing: HashMap<String, usize>,
}

impl Weights {
    /// Memory-maps `paths` and reads their headers. A missing, truncated or corrupt file is an error naming it.
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut routing = HashMap::new();
        let mut direct = Vec::with_capacity(paths.len());
        for (index, path) in paths.iter().enumerate() {
            if !path.is_file() {
                return Err(Error::NotFound(format!("weights file {} does not exist", path.display())));
            }
            // SAFETY: the file is mapped read-only; as with every mmap, modifying it while we run is undefined.
            // We accept that, as every safetensors loader does.
            let st = unsafe { MmapedSafetensors::new(path) }.map_err(|e| {
                Error::model(path, format!("not a valid safetensors file (truncated or corrupt?): {}", root_cause(&e)))
            })?;
            for (name, _) in st.tensors() {
                routing.insert(name, index);
            }
            files.push((path.clone(), st));
            direct.push(DirectFile::open(path));
        }
        Ok(Weights { files, direct, routing })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.routing.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.routing.keys().map(String::as_str)
    }

    /// The file(s) these weights come from, for messages.
    pub fn describe(&self) -> String {
        let names: Vec<String> = self.files.iter().map(|(p, _)| p.display().to_string()).collect();
        names.join(", ")
    }

    /// The stored shape of a tensor, if present.
    pub fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        let index = *self.routing.get(name)?;
        self.files[index].1.get(name).ok().map(|v| v.shape().to_vec())
    }

    /// Loads one tensor as stored (by its name in the file), converted to `dtype`.
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let Some(&index) = self.routing.get(name) else {
            return Err(candle_core::Error::Msg(format!("{}: missing tensor `{name}`", self.describe())));
        };
        if let Some(file) = &self.direct[index] {
            if let Some(tensor) = file.read(name, device)? {
                return tensor.to_dtype(dtype);
            }
        }
        let (path, st) = &self.files[index];
        let view = st
            .get(name)
            .map_err(|e| candle_core::Error::Msg(format!("{}: tensor `{name}`: {}", path.display(), root_cause(&e))))?;
        let tensor = view
            .load(device)
            .map_err(|e| candle_core::Error::Msg(format!("{}: tensor `{name}`: {}", path.display(), root_cause(&e))))?;
        // The tensor now owns a copy: drop the mapped pages from this process (they stay in the page cache), so
        // that loading a UNet of several GB does not count its file a second time in resident memory.
        release_mapped_pages(view.data());
        tensor.to_dtype(dtype)
    }

    /// A `VarBuilder` reading these weights converted to `dtype` on `device`.
    pub fn into_var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }
}

impl SimpleBackend for Weights {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _hint: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Some(&index) = self.routing.get(name) {
            if let Ok(view) = self.files[index].1.get(name) {
                if view.shape() != shape.dims() {
                    return Err(candle_core::Error::Msg(format!(
                        "{}: tensor `{name}` has shape {:?}, the model config expects {:?}",
                        self.files[index].0.display(),
                        view.shape(),
                        shape.dims()
                    )));
                }
            }
        }
        self.load(name, dtype, device)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.contains(name)
    }
}

/// A safetensors file whose tensors are either the file's own mapped memory (zero-copy, [`super::mapped`]) or read
/// with positioned reads: each tensor read once, in parallel chunks, straight into the buffer the tensor then owns
/// (asked to be backed by huge pages), so loading costs one copy from the page cache and resident memory holds each
/// weight once.
struct DirectFile {
    file: std::fs::File,
    /// The file mapped for zero-copy tensors, when the program's allocator allows it (see [`super::mapped`]).
    mapping: Option<Mapping>,
    /// name → (dtype, shape, absolute byte range in the file).
    tensors: HashMap<String, (String, Vec<usize>, u64, u64)>,
}

impl DirectFile {
    /// `None` when the header cannot be read here (the mapped path then reports the problem).
    fn open(path: &Path) -> Option<Self> {
        use std::io::Read;
        if cfg!(target_endian = "big") {
            return None;
        }
        let mut file = std::fs::File::open(path).ok()?;
        let mut len = [0u8; 8];
        file.read_exact(&mut len).ok()?;
        let len = u64::from_le_bytes(len);
        let mut header = vec![0u8; usize::try_from(len).ok()?];
        file.read_exact(&mut header).ok()?;
        let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header).ok()?;
        let data_start = 8 + len;
        let mut tensors = HashMap::new();
        for (name, info) in header {
            if name == "__metadata__" {
                continue;
            }
            let dtype = info.get("dtype")?.as_str()?.to_string();
            let shape =
                info.get("shape")?.as_array()?.iter().map(|d| d.as_u64().map(|d| d as usize)).collect::<Option<_>>()?;
            let offsets = info.get("data_offsets")?.as_array()?;
            let (start, end) = (offsets.first()?.as_u64()?, offsets.get(1)?.as_u64()?);
            tensors.insert(name, (dtype, shape, data_start + start, data_start + end));
        }
        Some(Self { file, mapping: Mapping::open(path), tensors })
    }

    /// The tensor as stored (f32, f16 or bf16 on the CPU); `None` for anything else (the mapped path handles it).
    fn read(&self, name: &str, device: &Device) -> candle_core::Result<Option<Tensor>> {
        let Some((dtype, shape, start, end)) = self.tensors.get(name) else { return Ok(None) };
        if !device.is_cpu() {
            return Ok(None);
        }
        let count: usize = shape.iter().product();
        let tensor = match dtype.as_str() {
            "F32" => Tensor::from_vec(self.elements::<f32>(count, *start, *end)?, shape.as_slice(), device)?,
            "F16" => Tensor::from_vec(self.elements::<half::f16>(count, *start, *end)?, shape.as_slice(), device)?,
            "BF16" => Tensor::from_vec(self.elements::<half::bf16>(count, *start, *end)?, shape.as_slice(), device)?,
            _ => return Ok(None),
        };
        Ok(Some(tensor))
    }

    /// A tensor's elements: the mapped file's own memory when zero-copy is available, else a read copy.
    fn elements<T: bytemuck::Pod>(&self, count: usize, start: u64, end: u64) -> candle_core::Result<Vec<T>> {
        let mapped =
            self.mapping.as_ref().and_then(|m| m.vec::<T>(usize::try_from(start).ok()?, usize::try_from(end).ok()?));
        match mapped {
            Some(v) if v.len() == count => Ok(v),
            _ => self.read_elements(count, start, end),
        }
    }

    fn read_elements<T: bytemuck::Pod + bytemuck::Zeroable>(
        &self,
        count: usize,
        start: u64,
        end: u64,
    ) -> candle_core::Result<Vec<T>> {
        use rayon::prelude::*;
        const CHUNK: usize = 8 << 20;
        let bytes = count * std::mem::size_of::<T>();
        if end.checked_sub(start) != Some(bytes as u64) {
            candle_core::bail!("tensor data of {} bytes for {count} elements", end.saturating_sub(start));
        }
        let mut data = vec![T::zeroed(); count];
        let buffer: &mut [u8] = bytemuck::cast_slice_mut(&mut data);
        advise_huge_pages(buffer);
        buffer
            .par_chunks_mut(CHUNK)
            .enumerate()
            .try_for_each(|(i, chunk)| read_at(&self.file, chunk, start + (i * CHUNK) as u64))?;
        Ok(data)
    }
}

#[cfg(unix)]
fn read_at(file: &std::fs::File, buffer: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buffer, offset)
}

#[cfg(windows)]
fn read_at(file: &std::fs::File, mut buffer: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    while !buffer.is_empty() {
        match std::os::windows::fs::FileExt::seek_read(file, buffer, offset)? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => {
                buffer = &mut buffer[n..];
                offset += n as u64;
            }
        }
    }
    Ok(())
}

/// Asks for transparent huge pages under a large weight buffer (fewer page faults while it is filled).
#[cfg(target_os = "linux")]
pub(crate) fn advise_huge_pages(buffer: &mut [u8]) {
    const HUGE: usize = 2 << 20;
    let (start, end) = (buffer.as_ptr() as usize, buffer.as_ptr() as usize + buffer.len());
    let (first, last) = (start.div_ceil(HUGE) * HUGE, end / HUGE * HUGE);
    if last > first {
        // SAFETY: [first, last) lies inside `buffer`, memory we own; MADV_HUGEPAGE only changes how it is backed.
        unsafe { libc::madvise(first as *mut libc::c_void, last - first, libc::MADV_HUGEPAGE) };
    }
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn advise_huge_pages(_buffer: &mut [u8]) {}

/// Tells the kernel this process no longer needs the whole pages of `data`, a slice of a read-only file mapping.
/// Later reads (if any) fault the pages back in from the file, so this never changes what is read.
#[cfg(unix)]
fn release_mapped_pages(data: &[u8]) {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as usize;
    let (start, end) = (data.as_ptr() as usize, data.as_ptr() as usize + data.len());
    let (first, last) = (start.div_ceil(page) * page, end / page * page);
    if last > first {
        // SAFETY: [first, last) lies inside the mapping `data` belongs to, which is mapped read-only and private:
        // MADV_DONTNEED only drops our page-table entries for file-backed pages, the file is untouched.
        unsafe { libc::madvise(first as *mut libc::c_void, last - first, libc::MADV_DONTNEED) };
    }
}

#[cfg(not(unix))]
fn release_mapped_pages(_data: &[u8]) {}

/// candle errors wrap their cause with backtraces and paths; keep only the message people need.
fn root_cause(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => root_cause(inner),
        candle_core::Error::WithPath { inner, .. } => root_cause(inner),
        other => other.to_string(),
    }
}
