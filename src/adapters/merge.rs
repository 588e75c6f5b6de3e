//! The merge: a weight source that returns `W + Σ w·scale·up·down` (f32 arithmetic, then the requested dtype) for
//! the tensors LoRAs patch, and every other tensor untouched (memory-mapped weights are never written: a patched
//! tensor is a new one).

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

use super::lora_file::{LoraFile, LowRank, Target};
use super::module_names::ModuleIndex;
use crate::kernels::gemm::{matmul, View};
use crate::kernels::with_f32_data;
use crate::loading::weights::advise_huge_pages;
use crate::{Error, Result};

/// The updates of one component, by the name of the weight tensor they patch, each with its LoRA's weight.
#[derive(Clone, Default)]
pub struct ResolvedUpdates {
    by_tensor: HashMap<String, Vec<(Arc<LowRank>, f64)>>,
}

impl ResolvedUpdates {
    /// Matches every update of `files` for `target` with a module of the component (`index`); an update that matches
    /// none is an error naming the key and the file.
    pub fn resolve(files: &[(Arc<LoraFile>, f64)], target: Target, index: &ModuleIndex) -> Result<Self> {
        let mut by_tensor: HashMap<String, Vec<(Arc<LowRank>, f64)>> = HashMap::new();
        for (file, weight) in files {
            for update in file.updates.iter().filter(|u| u.target == target) {
                let tensor = index.weight_of(&update.module).ok_or_else(|| {
                    Error::model(
                        &file.path,
                        format!(
                            "LoRA key `{}` matches no module of the loaded model's {target:?} (is this LoRA for \
                             another model, e.g. SD 1.5?)",
                            update.key
                        ),
                    )
                })?;
                by_tensor.entry(tensor.to_string()).or_default().push((Arc::new(update.clone()), *weight));
            }
        }
        Ok(Self { by_tensor })
    }

    pub fn is_empty(&self) -> bool {
        self.by_tensor.is_empty()
    }

    /// How many weight tensors the updates patch.
    pub fn tensor_count(&self) -> usize {
        self.by_tensor.len()
    }
}

/// `ΔW = scale · up · down`, in f32, shaped like `shape` (linear (out, in), or convolution (out, in, kh, kw) from a
/// LoCon pair: a kh×kw `down` convolution and a 1×1 `up`).
fn delta(update: &LowRank, shape: &[usize], device: &Device) -> candle_core::Result<Tensor> {
    let rank = update.down.dim(0)?;
    let down = update.down.to_dtype(DType::F32)?.reshape((rank, ()))?;
    let up = update.up.to_dtype(DType::F32)?.reshape((update.up.dim(0)?, rank))?;
    let product = up.matmul(&down)?;
    if product.elem_count() != shape.iter().product::<usize>() {
        candle_core::bail!(
            "LoRA module `{}`: its update ({:?} × {:?}) does not fit the weight {shape:?}",
            update.key,
            update.up.dims(),
            update.down.dims()
        );
    }
    (product * update.scale)?.reshape(shape)?.to_device(device)
}

/// On the CPU: one copy of the weight, then each update accumulated into it by one matrix product
/// (`W += (w·scale·up) · down`): no intermediate (out × in) tensors, whose fresh pages would cost more than the
/// arithmetic.
fn merged_on_cpu(weight: &Tensor, updates: &[(Arc<LowRank>, f64)]) -> candle_core::Result<Tensor> {
    use rayon::prelude::*;
    let shape = weight.dims().to_vec();
    let rows = shape[0];
    // The copy fills fresh pages: ask for huge pages and fill them from both threads.
    let mut data = with_f32_data(weight, |source| {
        let mut data = vec![0f32; source.len()];
        advise_huge_pages(bytemuck::cast_slice_mut(&mut data));
        const CHUNK: usize = 1 << 20;
        data.par_chunks_mut(CHUNK).zip(source.par_chunks(CHUNK)).for_each(|(d, s)| d.copy_from_slice(s));
        data
    })?;
    let cols = data.len() / rows.max(1);
    for (update, lora_weight) in updates {
        let rank = update.down.dim(0)?;
        let down: Vec<f32> = update.down.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let up: Vec<f32> =
            (update.up.to_dtype(DType::F32)? * (update.scale * lora_weight))?.flatten_all()?.to_vec1()?;
        if down.len() != rank * cols || up.len() != rows * rank {
            candle_core::bail!(
                "LoRA module `{}`: its update ({:?} × {:?}) does not fit the weight {shape:?}",
                update.key,
                update.up.dims(),
                update.down.dims()
            );
        }
        let (up, down) = (View::row_major(&up, rank), View::row_major(&down, cols));
        matmul(&mut data, cols, up, down, (rows, cols, rank), true, rayon::current_num_threads());
    }
    Tensor::from_vec(data, shape, weight.device())
}

/// A component's weights with its LoRA updates merged in.
pub struct LoraBackend {
    inner: Box<dyn SimpleBackend>,
    updates: ResolvedUpdates,
}

impl LoraBackend {
    pub fn new(inner: Box<dyn SimpleBackend>, updates: ResolvedUpdates) -> Self {
        Self { inner, updates }
    }

    fn merged(&self, weight: Tensor, name: &str, dtype: DType) -> candle_core::Result<Tensor> {
        let Some(updates) = self.updates.by_tensor.get(name) else {
            return weight.to_dtype(dtype);
        };
        if weight.device().is_cpu() {
            return merged_on_cpu(&weight, updates)?.to_dtype(dtype);
        }
        let mut merged = weight.to_dtype(DType::F32)?;
        for (update, lora_weight) in updates {
            let d = delta(update, merged.dims(), merged.device())?;
            merged = (merged + (d * *lora_weight)?)?;
        }
        merged.to_dtype(dtype)
    }
}

impl SimpleBackend for LoraBackend {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        hint: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        if self.updates.by_tensor.contains_key(name) {
            let weight = self.inner.get(shape, name, hint, DType::F32, device)?;
            self.merged(weight, name, dtype)
        } else {
            self.inner.get(shape, name, hint, dtype, device)
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        if self.updates.by_tensor.contains_key(name) {
            let weight = self.inner.get_unchecked(name, DType::F32, device)?;
            self.merged(weight, name, dtype)
        } else {
            self.inner.get_unchecked(name, dtype, device)
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}
