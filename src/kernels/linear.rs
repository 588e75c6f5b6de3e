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

/// How a [`PackedLinear`] keeps its weight (n, k) and multiplies each call's input by it: the weight packed once
/// at load, the input packed per call, the product accumulated into the output (which holds the bias).
pub trait WeightFormat: Send + Sync + 'static {
    /// The op's name in candle's graph.
    const NAME: &'static str;
    type Weight: Send + Sync + std::fmt::Debug;
    fn pack(weight: &[f32], n: usize, k: usize) -> Self::Weight;
    /// (n, k).
    fn dims(weight: &Self::Weight) -> (usize, usize);
    /// out (rows × n) += x (rows × k) · Wᵀ.
    fn multiply_into(out: &mut [f32], x: &[f32], rows: usize, weight: &Self::Weight);
}

impl WeightFormat for super::Bf16 {
    const NAME: &'static str = "dreamshaper-linear-bf16";
    type Weight = (Packed, Kernel);

    fn pack(weight: &[f32], n: usize, k: usize) -> Self::Weight {
        (Packed::from_rows(weight, n, k, NR), Kernel::detect())
    }

    fn dims((weight, _): &Self::Weight) -> (usize, usize) {
        (weight.count(), weight.k())
    }

    fn multiply_into(out: &mut [f32], x: &[f32], rows: usize, (weight, kernel): &Self::Weight) {
        let n = weight.count();
        gemm_bf16::gemm(out, n, &Packed::from_rows(x, rows, weight.k(), MR), weight, *kernel);
    }
}

impl WeightFormat for super::Int8 {
    const NAME: &'static str = "dreamshaper-linear-int8";
    type Weight = (gemm_i8::RightI8, gemm_i8::Kernel);

    fn pack(weight: &[f32], n: usize, k: usize) -> Self::Weight {
        let kernel = gemm_i8::Kernel::detect();
        (gemm_i8::RightI8::from_rows(weight, n, k, kernel), kernel)
    }

    fn dims((weight, _): &Self::Weight) -> (usize, usize) {
        (weight.count(), weight.k())
    }

    fn multiply_into(out: &mut [f32], x: &[f32], rows: usize, (weight, kernel): &Self::Weight) {
        let n = weight.count();
        gemm_i8::gemm(out, n, &gemm_i8::LeftI8::from_rows(x, rows, weight.k(), *kernel), weight, *kernel);
    }
}

/// A linear layer whose weight is packed once in format `F`: f32 activations in and out.
#[derive(Debug)]
pub struct PackedLinear<F: WeightFormat> {
    weight: F::Weight,
    bias: Option<Vec<f32>>,
}

/// Linear layer on bf16 weights (`--dtype bf16` on the CPU).
pub type LinearBf16 = PackedLinear<super::Bf16>;
/// Linear layer on int8 weights (`--dtype int8`).
pub type LinearI8 = PackedLinear<super::Int8>;

impl<F: WeightFormat> PackedLinear<F> {
    /// `weight` (n, k) and `bias` (n), any float dtype, on the CPU.
    pub fn new(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        let (n, k) = weight.dims2()?;
        let weight = super::with_f32_data(weight, |w| F::pack(w, n, k))?;
        Ok(Self { weight, bias: bias_vec(bias, n)? })
    }

    /// x · Wᵀ + b for `x` (…, k) f32.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(self)
    }
}

impl<F: WeightFormat> CustomOp1 for PackedLinear<F> {
    fn name(&self) -> &'static str {
        F::NAME
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, k) = F::dims(&self.weight);
        let shape = output_dims(x_layout, n, k)?;
        let x = contiguous_f32(x, x_layout)?;
        let rows = x.len() / k.max(1);
        let mut out = initial_output(self.bias.as_deref(), rows, n);
        if k > 0 {
            F::multiply_into(&mut out, x, rows, &self.weight);
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
