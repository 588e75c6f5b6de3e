//! A1111's emphasis: applying token weights to an encoder's hidden states.
//!
//! "Original" (A1111's default) multiplies each token's hidden state by its weight, then rescales the whole batch so
//! its mean equals the unweighted mean. "No norm" only multiplies. A1111 takes that mean over every prompt text it
//! encodes together — all the schedule entries of one prompt, duplicates included — so the rows here carry how often
//! each distinct text appears in that batch.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::Result;

/// How token weights change the text encoders' output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Emphasis {
    /// Weight, then restore the batch mean (A1111's "Original", its default).
    #[default]
    #[serde(alias = "Original")]
    Original,
    /// Weight only (A1111's "No norm").
    #[serde(alias = "No norm", alias = "no_norm")]
    NoNorm,
}

impl Emphasis {
    /// A1111's name for it (its infotext and settings).
    pub fn a1111_name(self) -> &'static str {
        match self {
            Emphasis::Original => "Original",
            Emphasis::NoNorm => "No norm",
        }
    }
}

/// Applies `weights` (one row of 77 per row of `hidden`) to `hidden` (rows, tokens, width); `uses[r]` is how many
/// times row `r` stands in A1111's batch. Rows whose weights are all 1 come back bit-identical when every row's are.
pub fn apply(emphasis: Emphasis, hidden: &Tensor, weights: &[&[f64]], uses: &[usize]) -> Result<Tensor> {
    if weights.iter().all(|row| row.iter().all(|&w| w == 1.0)) {
        return Ok(hidden.clone());
    }
    let (rows, tokens, _) = hidden.dims3()?;
    let flat: Vec<f32> = weights.iter().flat_map(|row| row.iter().map(|&w| w as f32)).collect();
    let w = Tensor::from_vec(flat, (rows, tokens, 1), hidden.device())?;
    let z = hidden.to_dtype(DType::F32)?;
    let weighted = z.broadcast_mul(&w)?;
    let out = match emphasis {
        Emphasis::NoNorm => weighted,
        Emphasis::Original => {
            let factor = batch_mean(&z, uses)? / batch_mean(&weighted, uses)?;
            (weighted * factor)?
        }
    };
    Ok(out.to_dtype(hidden.dtype())?)
}

/// The mean of the batch in which row `r` appears `uses[r]` times (summed in f64 on the CPU: not every GPU backend
/// has f64).
fn batch_mean(z: &Tensor, uses: &[usize]) -> Result<f64> {
    let per_row = z.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.flatten_from(1)?.mean(1)?.to_vec1::<f64>()?;
    let total: usize = uses.iter().sum();
    let sum: f64 = per_row.iter().zip(uses).map(|(m, &n)| m * n as f64).sum();
    Ok(sum / total.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_keeps_the_mean_and_no_norm_only_scales() {
        let z = Tensor::from_vec(vec![1f32, 2.0, 3.0, 4.0, 5.0, 6.0], (1, 3, 2), &Device::Cpu).unwrap();
        let w = [1.0, 2.0, 0.5];
        let out = apply(Emphasis::NoNorm, &z, &[&w], &[1]).unwrap();
        assert_eq!(out.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![1.0, 2.0, 6.0, 8.0, 2.5, 3.0]);
        let out = apply(Emphasis::Original, &z, &[&w], &[1]).unwrap();
        let v = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mean = v.iter().sum::<f32>() / 6.0;
        assert!((mean - 3.5).abs() < 1e-6, "{mean}");
        assert!((v[2] / v[0] - 6.0).abs() < 1e-5);
        let same = apply(Emphasis::Original, &z, &[&[1.0; 3]], &[1]).unwrap();
        assert_eq!(
            same.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            z.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn names() {
        assert_eq!(serde_json::from_str::<Emphasis>("\"no-norm\"").unwrap(), Emphasis::NoNorm);
        assert_eq!(serde_json::from_str::<Emphasis>("\"No norm\"").unwrap(), Emphasis::NoNorm);
        assert_eq!(serde_json::to_string(&Emphasis::Original).unwrap(), "\"original\"");
    }
}
