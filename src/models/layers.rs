//! Convolution and GroupNorm layers with the checkpoint's key names (`weight`, `bias`). f32 tensors on the CPU
//! run the fused kernels of [`crate::kernels`]; other devices and dtypes run candle's own ops.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::kernels;
use crate::kernels::conv::ConvParams;

fn fused(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// diffusers' `nn.Conv2d` (square kernel, symmetric padding, with bias).
#[derive(Debug, Clone)]
pub struct Conv2d {
    inner: candle_nn::Conv2d,
    params: ConvParams,
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
        let config = Conv2dConfig { padding, stride, ..Default::default() };
        Ok(Self { inner: candle_nn::conv2d(c_in, c_out, kernel, config, vb)?, params: ConvParams { stride, padding } })
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.inner.bias() {
            Some(bias) if fused(x) && self.inner.weight().dtype() == DType::F32 => {
                kernels::conv::conv2d(x, self.inner.weight(), bias, self.params)
            }
            _ => self.inner.forward(x),
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
pub struct Linear {
    inner: candle_nn::Linear,
}

pub fn linear(c_in: usize, c_out: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear { inner: candle_nn::linear(c_in, c_out, vb)? })
}

pub fn linear_no_bias(c_in: usize, c_out: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear { inner: candle_nn::linear_no_bias(c_in, c_out, vb)? })
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if fused(x) && self.inner.weight().dtype() == DType::F32 {
            kernels::linear::linear(x, self.inner.weight(), self.inner.bias())
        } else {
            self.inner.forward(x)
        }
    }
}
