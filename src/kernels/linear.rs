//! Fully connected layer: out (rows × n) = x (rows × k) · Wᵀ + b as one matrix product over all leading
//! dimensions (batch and tokens together), with the bias written first and accumulated into.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::contiguous_f32;
use super::gemm::{matmul, View};

fn linear_into(x: &[f32], k: usize, weight: &[f32], bias: Option<&[f32]>, n: usize) -> Vec<f32> {
    let rows = x.len() / k.max(1);
    let mut out = vec![0f32; rows * n];
    if let Some(bias) = bias {
        for row in out.chunks_mut(n) {
            row.copy_from_slice(bias);
        }
    }
    if k > 0 {
        let (x, w_t) = (View::row_major(x, k), View::transposed(weight, k));
        matmul(&mut out, n, x, w_t, (rows, n, k), bias.is_some(), rayon::current_num_threads());
    }
    out
}

fn output_shape(x: &Layout, weight: &Layout) -> Result<(usize, usize, Shape)> {
    let (n, k) = weight.shape().dims2()?;
    let mut dims = x.shape().dims().to_vec();
    match dims.last_mut() {
        Some(last) if *last == k => *last = n,
        _ => candle_core::bail!("linear: input {:?} does not end in the weight's {k} inputs", x.shape()),
    }
    Ok((n, k, Shape::from(dims)))
}

struct LinearOp;

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
        let (n, k, shape) = output_shape(x_layout, w_layout)?;
        let bias = contiguous_f32(bias, b_layout)?;
        if bias.len() != n {
            candle_core::bail!("linear: bias of {} elements for {n} outputs", bias.len());
        }
        let out = linear_into(contiguous_f32(x, x_layout)?, k, contiguous_f32(weight, w_layout)?, Some(bias), n);
        Ok((CpuStorage::F32(out), shape))
    }
}

struct LinearNoBiasOp;

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
        let (n, k, shape) = output_shape(x_layout, w_layout)?;
        let out = linear_into(contiguous_f32(x, x_layout)?, k, contiguous_f32(w, w_layout)?, None, n);
        Ok((CpuStorage::F32(out), shape))
    }
}

/// x · Wᵀ + b for f32 CPU tensors: `x` (…, k), `weight` (n, k), `bias` (n).
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (x, weight) = (x.contiguous()?, weight.contiguous()?);
    match bias {
        Some(bias) => x.apply_op3_no_bwd(&weight, &bias.contiguous()?, &LinearOp),
        None => x.apply_op2_no_bwd(&weight, &LinearNoBiasOp),
    }
}
