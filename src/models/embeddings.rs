//! Sinusoidal timestep features and the MLP that embeds them (diffusers' `Timesteps` / `TimestepEmbedding`).

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{Module, VarBuilder};

use super::layers::{linear, Linear};

/// diffusers' `get_timestep_embedding`, always computed in f32 (as diffusers does, whatever the run dtype):
/// `exp(-ln(10000) · i / (half - shift))` frequencies, `[sin, cos]` (or `[cos, sin]` with `flip_sin_to_cos`).
#[derive(Debug, Clone, Copy)]
pub struct Timesteps {
    pub channels: usize,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
}

impl Timesteps {
    /// `timesteps`: one value per batch row. Returns (batch, channels) in f32.
    pub fn forward(&self, timesteps: &[f64], device: &Device) -> Result<Tensor> {
        let half = self.channels / 2;
        let exponent: Vec<f32> = (0..half)
            .map(|i| {
                // torch: exponent = -math.log(10000) * arange(half, float32); exponent / (half - shift); exp.
                let e = -(10000f64.ln() as f32) * i as f32;
                (e / (half as f64 - self.freq_shift) as f32).exp()
            })
            .collect();
        let freqs = Tensor::from_vec(exponent, (1, half), device)?;
        let t: Vec<f32> = timesteps.iter().map(|&t| t as f32).collect();
        let t = Tensor::from_vec(t, (timesteps.len(), 1), device)?;
        let args = t.broadcast_mul(&freqs)?;
        let (sin, cos) = (args.sin()?, args.cos()?);
        let mut emb = if self.flip_sin_to_cos { Tensor::cat(&[cos, sin], 1)? } else { Tensor::cat(&[sin, cos], 1)? };
        if self.channels % 2 == 1 {
            emb = emb.pad_with_zeros(1, 0, 1)?;
        }
        Ok(emb)
    }
}

/// linear_1 → SiLU → linear_2.
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn new(vb: VarBuilder, in_channels: usize, embed_dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: linear(in_channels, embed_dim, vb.pp("linear_1"))?,
            linear_2: linear(embed_dim, embed_dim, vb.pp("linear_2"))?,
        })
    }

    /// Casts the f32 features to the layer dtype first, as diffusers does.
    pub fn forward(&self, x: &Tensor, dtype: DType) -> Result<Tensor> {
        let x = self.linear_1.forward(&x.to_dtype(dtype)?)?;
        self.linear_2.forward(&candle_nn::ops::silu(&x)?)
    }
}
