//! Convolution, GroupNorm, Linear, LayerNorm and Embedding layers with the checkpoint's key names (`weight`,
//! `bias`). f32 tensors on the CPU run the fused kernels of [`crate::kernels`]; other devices and dtypes run
//! candle's own ops.
//!
//! A bf16 model on the CPU runs in mixed precision (see [`compute_dtype`]): Linear and Conv2d weights are packed
//! to bf16 for [`crate::kernels::gemm_bf16`] and everything else (activations, norms, embeddings, attention) is
//! f32, which keeps bf16's speed where the time goes (the matrix products) and f32's accuracy elsewhere. An int8
//! model ([`INT8_WEIGHTS`]) does the same with int8 weights and per-row int8 activations in those products.

use std::sync::Arc;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, Embedding, LayerNorm, VarBuilder};

use crate::kernels;
use crate::kernels::conv::{Conv2dBf16, Conv2dI8, ConvParams};
use crate::kernels::linear::{LinearBf16, LinearI8};

fn fused(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// The model dtype that asks for int8 weights (`--dtype int8`, CPU only). candle has no int8 dtype, so `U8`, which
/// no model's weights use, stands for it: a model loaded with it keeps its Linear and Conv2d weights quantized to
/// int8 per output channel for [`crate::kernels::gemm_i8`] and computes everything else in f32, as
/// a bf16 model does.
pub const INT8_WEIGHTS: DType = DType::U8;

/// How a CPU mixed-precision model keeps its Linear and Conv2d weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PackedFormat {
    Bf16,
    Int8,
}

fn packed_format(vb: &VarBuilder) -> Option<PackedFormat> {
    match vb.dtype() {
        _ if !vb.device().is_cpu() => None,
        DType::BF16 => Some(PackedFormat::Bf16),
        INT8_WEIGHTS => Some(PackedFormat::Int8),
        _ => None,
    }
}

/// The dtype a model with `weights` in that dtype on `device` computes in: f32 in CPU mixed precision (bf16 or
/// int8 weights), else the weights' dtype.
pub fn compute_dtype(device: &Device, weights: DType) -> DType {
    if device.is_cpu() && (weights == DType::BF16 || weights == INT8_WEIGHTS) {
        DType::F32
    } else {
        weights
    }
}

/// The dtype a model built from `vb` computes in.
pub fn activation_dtype(vb: &VarBuilder) -> DType {
    compute_dtype(vb.device(), vb.dtype())
}

/// `vb` for parameters kept in the activation dtype (norms, biases, embeddings).
fn params(vb: VarBuilder) -> VarBuilder {
    let dtype = activation_dtype(&vb);
    vb.to_dtype(dtype)
}

/// `nn.LayerNorm` (weight and bias).
pub fn layer_norm(size: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    candle_nn::layer_norm(size, eps, params(vb))
}

/// `nn.Embedding`.
pub fn embedding(count: usize, size: usize, vb: VarBuilder) -> Result<Embedding> {
    candle_nn::embedding(count, size, params(vb))
}

/// diffusers' `nn.Conv2d` (square kernel, symmetric padding, with bias).
#[derive(Debug, Clone)]
pub struct Conv2d {
    inner: ConvWeights,
    params: ConvParams,
}

#[derive(Debug, Clone)]
enum ConvWeights {
    Candle(candle_nn::Conv2d),
    PackedBf16(Arc<Conv2dBf16>),
    PackedInt8(Arc<Conv2dI8>),
}

impl ConvWeights {
    fn packed(format: PackedFormat, weight: &Tensor, bias: &Tensor, params: ConvParams) -> Result<Self> {
        Ok(match format {
            PackedFormat::Bf16 => Self::PackedBf16(Arc::new(Conv2dBf16::new(weight, bias, params)?)),
            PackedFormat::Int8 => Self::PackedInt8(Arc::new(Conv2dI8::new(weight, bias, params)?)),
        })
    }
}

impl Conv2d {
    pub fn new(
        vb: VarBuilder,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let params = ConvParams { stride, padding };
        if let Some(format) = packed_format(&vb) {
            let vb = vb.to_dtype(DType::F32);
            let weight = vb.get((c_out, c_in, kernel, kernel), "weight")?;
            let inner = ConvWeights::packed(format, &weight, &vb.get(c_out, "bias")?, params)?;
            return Ok(Self { inner, params });
        }
        let config = Conv2dConfig { padding, stride, ..Default::default() };
        Ok(Self { inner: ConvWeights::Candle(candle_nn::conv2d(c_in, c_out, kernel, config, vb)?), params })
    }

    /// `nn.Conv2d(…, bias=False)`: only a `weight` in the checkpoint. Runs as a convolution with a zero bias, so that
    /// it takes the same kernels as [`Self::new`] (adding 0 changes no value).
    pub fn new_no_bias(
        vb: VarBuilder,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let params = ConvParams { stride, padding };
        let shape = (c_out, c_in, kernel, kernel);
        let init = candle_nn::init::DEFAULT_KAIMING_NORMAL;
        if let Some(format) = packed_format(&vb) {
            let vb = vb.to_dtype(DType::F32);
            let weight = vb.get_with_hints(shape, "weight", init)?;
            let zeros = Tensor::zeros(c_out, DType::F32, vb.device())?;
            return Ok(Self { inner: ConvWeights::packed(format, &weight, &zeros, params)?, params });
        }
        let weight = vb.get_with_hints(shape, "weight", init)?;
        let bias = Tensor::zeros(c_out, weight.dtype(), weight.device())?;
        let config = Conv2dConfig { padding, stride, ..Default::default() };
        Ok(Self { inner: ConvWeights::Candle(candle_nn::Conv2d::new(weight, Some(bias), config)), params })
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.inner {
            ConvWeights::PackedBf16(conv) => conv.forward(&x.to_dtype(DType::F32)?),
            ConvWeights::PackedInt8(conv) => conv.forward(&x.to_dtype(DType::F32)?),
            ConvWeights::Candle(conv) => match conv.bias() {
                Some(bias) if fused(x) && conv.weight().dtype() == DType::F32 => {
                    kernels::conv::conv2d(x, conv.weight(), bias, self.params)
                }
                _ => conv.forward(x),
            },
        }
    }
}

/// 3×3 convolution with padding 1 (stride 2 for down-sampling).
pub fn conv3x3(vb: VarBuilder, c_in: usize, c_out: usize, stride: usize) -> Result<Conv2d> {
    Conv2d::new(vb, c_in, c_out, 3, stride, 1)
}

pub fn conv1x1(vb: VarBuilder, c_in: usize, c_out: usize) -> Result<Conv2d> {
    Conv2d::new(vb, c_in, c_out, 1, 1, 0)
}

/// `nn.GroupNorm` with affine weight and bias.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    inner: candle_nn::GroupNorm,
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    let vb = params(vb);
    let inner = candle_nn::group_norm(groups, channels, eps, vb.clone())?;
    let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?;
    let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?;
    Ok(GroupNorm { inner, weight, bias, groups, eps })
}

impl GroupNorm {
    /// SiLU(GroupNorm(x)), fused on the CPU (the pre-activation of every ResNet block).
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        if fused(x) && self.weight.dtype() == DType::F32 {
            kernels::group_norm::group_norm(x, &self.weight, &self.bias, self.groups, self.eps, true)
        } else {
            candle_nn::ops::silu(&self.inner.forward(x)?)
        }
    }

    /// GroupNorm (then SiLU when `silu`) by given statistics instead of `x`'s own: `given[b · groups + g]` is the
    /// (mean, biased variance) of group g of batch item b.
    pub fn forward_given(&self, x: &Tensor, given: &[(f64, f64)], silu: bool) -> Result<Tensor> {
        if fused(x) && self.weight.dtype() == DType::F32 {
            return kernels::group_norm::group_norm_given(
                x,
                &self.weight,
                &self.bias,
                self.groups,
                self.eps,
                silu,
                given,
            );
        }
        let (batch, channels) = (x.dim(0)?, x.dim(1)?);
        if given.len() != batch * self.groups {
            candle_core::bail!("group norm: {} given statistics for {} groups", given.len(), batch * self.groups);
        }
        // Per (batch, channel): y = x·scale + shift with scale = γ·rstd, shift = β − mean·scale.
        let (gamma, beta) =
            (self.weight.to_dtype(DType::F32)?.to_vec1::<f32>()?, self.bias.to_dtype(DType::F32)?.to_vec1::<f32>()?);
        let per_group = channels / self.groups;
        let (mut scale, mut shift) = (Vec::with_capacity(batch * channels), Vec::with_capacity(batch * channels));
        for b in 0..batch {
            for c in 0..channels {
                let (mean, variance) = given[b * self.groups + c / per_group];
                let s = gamma[c] as f64 / (variance + self.eps).sqrt();
                scale.push(s as f32);
                shift.push((beta[c] as f64 - mean * s) as f32);
            }
        }
        let per_channel = |v: Vec<f32>| Tensor::from_vec(v, (batch, channels, 1, 1), x.device())?.to_dtype(x.dtype());
        let y = x.broadcast_mul(&per_channel(scale)?)?.broadcast_add(&per_channel(shift)?)?;
        if silu {
            candle_nn::ops::silu(&y)
        } else {
            Ok(y)
        }
    }

    pub fn groups(&self) -> usize {
        self.groups
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if fused(x) && self.weight.dtype() == DType::F32 {
            kernels::group_norm::group_norm(x, &self.weight, &self.bias, self.groups, self.eps, false)
        } else {
            self.inner.forward(x)
        }
    }
}

/// `nn.Linear`: one matrix product over all leading dimensions on the CPU.
#[derive(Debug, Clone)]
pub enum Linear {
    Candle(candle_nn::Linear),
    /// f32 on the CPU with the weight stored transposed, (k, n) (see [`LinearLayout::TransposedForFewRows`]).
    Transposed {
        weight_t: Tensor,
        bias: Option<Tensor>,
    },
    PackedBf16(Arc<LinearBf16>),
    PackedInt8(Arc<LinearI8>),
}

fn linear_with(c_in: usize, c_out: usize, vb: VarBuilder, with_bias: bool) -> Result<Linear> {
    if let Some(format) = packed_format(&vb) {
        let vb = vb.to_dtype(DType::F32);
        let bias = if with_bias { Some(vb.get(c_out, "bias")?) } else { None };
        let weight = vb.get((c_out, c_in), "weight")?;
        return Ok(match format {
            PackedFormat::Bf16 => Linear::PackedBf16(Arc::new(LinearBf16::new(&weight, bias.as_ref())?)),
            PackedFormat::Int8 => Linear::PackedInt8(Arc::new(LinearI8::new(&weight, bias.as_ref())?)),
        });
    }
    Ok(Linear::Candle(if with_bias {
        candle_nn::linear(c_in, c_out, vb)?
    } else {
        candle_nn::linear_no_bias(c_in, c_out, vb)?
    }))
}

pub fn linear(c_in: usize, c_out: usize, vb: VarBuilder) -> Result<Linear> {
    linear_with(c_in, c_out, vb, true)
}

pub fn linear_no_bias(c_in: usize, c_out: usize, vb: VarBuilder) -> Result<Linear> {
    linear_with(c_in, c_out, vb, false)
}

/// How a linear layer keeps its weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LinearLayout {
    /// As stored, (n, k): zero-copy from the file when the allocator allows it (see [`crate::loading::mapped`]).
    #[default]
    AsStored,
    /// For inputs of few rows per call (the text encoders' 77 tokens) that are called many times: in f32 on the
    /// CPU the weight is transposed once at load, so that each call's GEMM reads it in place instead of repacking
    /// all of it for a few rows (faster text encoders, see BENCHMARKS.md), at the price of a copy of the weights at
    /// load. Right for a resident server, not for a one-off generation.
    TransposedForFewRows,
}

/// `nn.Linear` with its weight kept as `layout` says.
pub fn linear_in(layout: LinearLayout, c_in: usize, c_out: usize, vb: VarBuilder, with_bias: bool) -> Result<Linear> {
    if layout == LinearLayout::TransposedForFewRows && vb.device().is_cpu() && vb.dtype() == DType::F32 {
        let weight_t = kernels::linear::transpose(&vb.get((c_out, c_in), "weight")?)?;
        let bias = if with_bias { Some(vb.get(c_out, "bias")?) } else { None };
        return Ok(Linear::Transposed { weight_t, bias });
    }
    linear_with(c_in, c_out, vb, with_bias)
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::PackedBf16(linear) => linear.forward(&x.to_dtype(DType::F32)?),
            Linear::PackedInt8(linear) => linear.forward(&x.to_dtype(DType::F32)?),
            Linear::Transposed { weight_t, bias } => {
                kernels::linear::linear_transposed(&x.to_dtype(DType::F32)?, weight_t, bias.as_ref())
            }
            Linear::Candle(linear) if fused(x) && linear.weight().dtype() == DType::F32 => {
                kernels::linear::linear(x, linear.weight(), linear.bias())
            }
            Linear::Candle(linear) => linear.forward(x),
        }
    }
}
