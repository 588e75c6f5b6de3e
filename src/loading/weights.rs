//! Memory-mapped safetensors files behind a candle `VarBuilder`, with errors that name the file and the tensor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::{Load, MmapedSafetensors};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::{Error, Result};

/// The tensors of one model component, spread over one or more safetensors files.
pub struct Weights {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    /// tensor name → index into `files`.
    routing: HashMap<String, usize>,
}

impl Weights {
    /// Memory-maps `paths` and reads their headers. A missing, truncated or corrupt file is an error naming it.
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut routing = HashMap::new();
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
        }
        Ok(Weights { files, routing })
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
        let (path, st) = &self.files[index];
        let view = st
            .get(name)
            .map_err(|e| candle_core::Error::Msg(format!("{}: tensor `{name}`: {}", path.display(), root_cause(&e))))?;
        let tensor = view
            .load(device)
            .map_err(|e| candle_core::Error::Msg(format!("{}: tensor `{name}`: {}", path.display(), root_cause(&e))))?;
        // The tensor now owns a copy: drop the mapped pages from this process (they stay in the page cache), so
        // that loading a 10 GB UNet does not count its file a second time in resident memory.
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

/// Checks a path exists before reading it, so the message names what is missing.
pub fn require_file(path: &Path, what: &str) -> Result<()> {
    if path.is_file() {
        Ok(())
    } else {
        Err(Error::NotFound(format!("{what} not found: {} does not exist", path.display())))
    }
}
