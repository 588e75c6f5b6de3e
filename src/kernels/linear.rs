//! Fully connected layer: out (rows × n) = x (rows × k) · Wᵀ + b as one matrix product over all leading
//! dimensions (batch and tokens together), with the bias written first and accumulated into.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::gemm::{matmul, View};
use super::gemm_bf16::{self, Kernel, Packed, MR, NR};
use super::gemm_i8;
use super::{contiguous_f32, dot_linear};

/// Whether the weight tensor is stored as (n, k), the checkpoint's layout, or transposed as (k, n).
#[derive(Clone, Copy, PartialEq, Eq)]
enum WeightLayout {
    OutIn,
    InOut,
}

/// The output buffer of `rows` × `n`, holding the bias (or zeros) that the product is then accumulated into.
fn initial_output(bias: Option<&[f32]>, rows: usize, n: usize) -> Vec<f32> {
    match bias {
        Some(bias) => super::repeated_rows(bias, rows),
        None => vec![0f32; rows * n],
    }
}

/// The output shape for input `x` (…, k): the same with the last dimension `n`.
fn output_dims(x: &Layout, n: usize, k: usize) -> Result<Shape> {
    let mut dims = x.shape().dims().to_vec();
    match dims.last_mut() {
        Some(last) if *last == k => *last = n,
        _ => candle_core::bail!("linear: input {:?} does not end in the weight's {k} inputs", x.shape()),
    }
    Ok(Shape::from(dims))
}

fn linear_into(x: &[f32], k: usize, weight: &[f32], layout: WeightLayout, bias: Option<&[f32]>, n: usize) -> Vec<f32> {
    let rows = x.len() / k.max(1);
    if layout == WeightLayout::OutIn && rows <= dot_linear::MAX_ROWS && k > 0 {
        if let Some(out) = dot_linear::linear(x, weight, bias, rows, n, k) {
            return out;
        }
    }
    let mut out = initial_output(bias, rows, n);
    if k > 0 {
        let w_t = match layout {
            WeightLayout::OutIn => View::transposed(weight, k),
            WeightLayout::InOut => View::row_major(weight, n),
        };
        let x = View::row_major(x, k);
        matmul(&mut out, n, x, w_t, (rows, n, k), bias.is_some(), rayon::current_num_threads());
    }
    out
}

fn output_shape(x: &Layout, weight: &Layout, layout: WeightLayout) -> Result<(usize, usize, Shape)> {
    let (n, k) = match (weight.shape().dims2()?, layout) {
        ((n, k), WeightLayout::OutIn) => (n, k),
        ((k, n), WeightLayout::InOut) => (n, k),
    };
    Ok((n, k, output_dims(x, n, k)?))
}

struct LinearOp(WeightLayout);

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "dreamshaper-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        weight: &CpuStorage,
        w_layout: &Layout,
        bias: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, k, shape) = output_shape(x_layout, w_layout, self.0)?;
        let bias = contiguous_f32(bias, b_layout)?;
        if bias.len() != n {
            candle_core::bail!("linear: bias of {} elements for {n} outputs", bias.len());
        }
        let out =
            linear_into(contiguous_f32(x, x_layout)?, k, contiguous_f32(weight, w_layout)?, self.0, Some(bias), n);
        Ok((CpuStorage::F32(out), shape))
    }
}

struct LinearNoBiasOp(WeightLayout);

impl CustomOp2 for LinearNoBiasOp {
    fn name(&self) -> &'static str {
        "dreamshaper-linear-no-bias"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, k, shape) = output_shape(x_layout, w_layout, self.0)?;
        let out = linear_into(contiguous_f32(x, x_layout)?, k, contiguous_f32(w, w_layout)?, self.0, None, n);
        Ok((CpuStorage::F32(out), shape))
    }
}

/// x · Wᵀ + b for f32 CPU tensors: `x` (…, k), `weight` (n, k), `bias` (n).
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    linear_with(x, weight, bias, WeightLayout::OutIn)
}

/// x · W + b for f32 CPU tensors with the weight stored transposed, `weight_t` (k, n). The GEMM then reads the
/// weight as it is instead of repacking it on every call, which dominates when `x` has few rows (a text
/// encoder's 77 tokens).
pub fn linear_transposed(x: &Tensor, weight_t: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    linear_with(x, weight_t, bias, WeightLayout::InOut)
}

fn linear_with(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, layout: WeightLayout) -> Result<Tensor> {
    let (x, weight) = (x.contiguous()?, weight.contiguous()?);
    match bias {
        Some(bias) => x.apply_op3_no_bwd(&weight, &bias.contiguous()?, &LinearOp(layout)),
        None => x.apply_op2_no_bwd(&weight, &LinearNoBiasOp(layout)),
    }
}

/// A linear layer whose weight is packed to bf16 once, for [`gemm_bf16`]: f32 activations in and out, each
/// multiplied as bf16 with f32 sums (mixed precision on CPUs with AVX512-BF16).
#[derive(Debug)]
pub struct LinearBf16 {
    weight: Packed,
    bias: Option<Vec<f32>>,
    kernel: Kernel,
}

impl LinearBf16 {
    /// `weight` (n, k) and `bias` (n), any float dtype, on the CPU.
    pub fn new(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        let (n, k) = weight.dims2()?;
        let weight = super::with_f32_data(weight, |w| Packed::from_rows(w, n, k, NR))?;
        Ok(Self { weight, bias: bias_vec(bias, n)?, kernel: Kernel::detect() })
    }

    /// x · Wᵀ + b for `x` (…, k) f32.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(self)
    }
}

impl CustomOp1 for LinearBf16 {
    fn name(&self) -> &'static str {
        "dreamshaper-linear-bf16"
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, k) = (self.weight.count(), self.weight.k());
        let shape = output_dims(x_layout, n, k)?;
        let x = contiguous_f32(x, x_layout)?;
        let rows = x.len() / k.max(1);
        let mut out = initial_output(self.bias.as_deref(), rows, n);
        if k > 0 {
            gemm_bf16::gemm(&mut out, n, &Packed::from_rows(x, rows, k, MR), &self.weight, self.kernel);
        }
        Ok((CpuStorage::F32(out), shape))
    }
}

/// A linear layer whose weight is quantized to int8 once, per output channel, for [`gemm_i8`]: f32 activations in
/// and out, each call's input quantized per row (`--dtype int8`).
#[derive(Debug)]
pub struct LinearI8 {
    weight: gemm_i8::RightI8,
    bias: Option<Vec<f32>>,
    kernel: gemm_i8::Kernel,
}

impl LinearI8 {
    /// `weight` (n, k) and `bias` (n), any float dtype, on the CPU.
    pub fn new(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        let (n, k) = weight.dims2()?;
        let weight = super::with_f32_data(weight, |w| gemm_i8::RightI8::from_rows(w, n, k))?;
        Ok(Self { weight, bias: bias_vec(bias, n)?, kernel: gemm_i8::Kernel::detect() })
    }

    /// x · Wᵀ + b for `x` (…, k) f32.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(self)
    }
}

impl CustomOp1 for LinearI8 {
    fn name(&self) -> &'static str {
        "dreamshaper-linear-int8"
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, k) = (self.weight.count(), self.weight.k());
        let shape = output_dims(x_layout, n, k)?;
        let x = contiguous_f32(x, x_layout)?;
        let rows = x.len() / k.max(1);
        let mut out = initial_output(self.bias.as_deref(), rows, n);
        if k > 0 {
            gemm_i8::gemm(&mut out, n, &gemm_i8::LeftI8::from_rows(x, rows, k), &self.weight, self.kernel);
        }
        Ok((CpuStorage::F32(out), shape))
    }
}

/// A bias as f32 values, checked against the `n` outputs.
fn bias_vec(bias: Option<&Tensor>, n: usize) -> Result<Option<Vec<f32>>> {
    match bias {
        Some(b) if b.elem_count() != n => {
            candle_core::bail!("linear: bias of {} elements for {n} outputs", b.elem_count())
        }
        Some(b) => Ok(Some(b.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)),
        None => Ok(None),
    }
}

/// The transpose of an f32 CPU matrix (rows, cols) → (cols, rows), in 64 × 64 tiles over rayon's pool (candle's
/// strided copy goes element by element).
pub fn transpose(m: &Tensor) -> Result<Tensor> {
    use rayon::prelude::*;
    const TILE: usize = 64;
    let (rows, cols) = m.dims2()?;
    let mut dst = vec![0f32; rows * cols];
    super::with_f32_data(m, |src| {
        // One band of TILE destination rows (source columns) per task.
        dst.par_chunks_mut(TILE * rows).enumerate().for_each(|(band, out)| {
            let c0 = band * TILE;
            let width = TILE.min(cols - c0);
            for r0 in (0..rows).step_by(TILE) {
                for r in r0..(r0 + TILE).min(rows) {
                    for c in 0..width {
                        out[c * rows + r] = src[r * cols + c0 + c];
                    }
                }
            }
        })
    })?;
    Tensor::from_vec(dst, (cols, rows), m.device())
}
