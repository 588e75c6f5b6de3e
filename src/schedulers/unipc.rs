//! diffusers' `UniPCMultistepScheduler` (the hosted API's default): a predictor–corrector multistep solver on x₀
//! predictions (`predict_x0`), B(h) = e^h − 1 (`bh2`, the default; `bh1` uses B(h) = h).

use candle_core::Tensor;

use super::multistep::{FinalSigma, Multistep, UNSUPPORTED};
use super::schedule::{Class, Spacing, ALL_PREDICTIONS, RESCALE};
use super::sigma::{alpha_sigma, divide, lambda, scale};
use super::{Scheduler, SchedulerConfig, Timetable};
use crate::rng::TorchRng;
use crate::{Error, Result};

const CLASS: Class = Class { name: "UniPC", default_spacing: Spacing::Linspace, predictions: ALL_PREDICTIONS };

/// The config keys its diffusers class reads besides the shared schedule
/// keys ([`super::schedule::SCHEDULE_KEYS`]) and the multistep keys ([`super::multistep::KEYS`]).
pub const KEYS: &str = "predict_x0 disable_corrector solver_p final_sigmas_type rescale_betas_zero_snr sigma_min \
                        sigma_max shift_terminal";

pub struct UniPc {
    /// Its history holds x₀ predictions.
    core: Multistep,
    bh1: bool,
    disable_corrector: Vec<usize>,
    last_sample: Option<Tensor>,
    this_order: usize,
}

impl UniPc {
    pub fn boxed(config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
        config.refuse_enabled(CLASS.name, UNSUPPORTED)?;
        config.refuse_enabled(CLASS.name, &[RESCALE])?;
        config.refuse_set(CLASS.name, &["solver_p", "shift_terminal"])?;
        if !config.bool_or("predict_x0", true) {
            let (key, value, accepted) = ("predict_x0", "false".into(), "true (the class default)".into());
            return Err(Error::UnsupportedSchedulerConfig { scheduler: CLASS.name, key, value, accepted });
        }
        // diffusers maps the DEIS/DPM solver names (`logrho`, `midpoint`, `heun`) to bh2.
        let solvers = [("bh2", false), ("bh1", true), ("logrho", false), ("midpoint", false), ("heun", false)];
        let bh1 = config.choice(CLASS.name, "solver_type", "bh2", &solvers)?;
        let disable_corrector =
            config.f64_list("disable_corrector").unwrap_or_default().into_iter().map(|v| v as usize).collect();
        let solver_order = config.usize_or("solver_order", 2).max(1);
        Ok(Box::new(Self {
            core: Multistep::new(config, &CLASS, steps, FinalSigma::FromConfig, solver_order)?,
            bh1,
            disable_corrector,
            last_sample: None,
            this_order: 1,
        }))
    }

    /// The coefficients shared by predictor and corrector at step size h (float32 like diffusers): hh = −h,
    /// h·φ₁ = e^{hh} − 1, B(h), and the right-hand side b_k for orders 1…`order`.
    fn coefficients(&self, h: f32, order: usize) -> (f32, f32, Vec<f32>) {
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        let mut h_phi_k = h_phi_1 / hh - 1f32;
        let b_h = if self.bh1 { hh } else { hh.exp_m1() };
        let mut factorial = 1f32;
        let mut b = Vec::with_capacity(order);
        for i in 1..=order {
            b.push(h_phi_k * factorial / b_h);
            factorial *= (i + 1) as f32;
            h_phi_k = h_phi_k / hh - 1f32 / factorial;
        }
        (h_phi_1, b_h, b)
    }

    /// Σ_k ρ_k · D_k over the history differences D_k = (m_k − m₀) / r_k.
    fn weighted_differences(
        &self,
        rhos: &[f32],
        index_of: impl Fn(usize) -> usize,
        lambda_s0: f32,
        h: f32,
    ) -> Result<Option<Tensor>> {
        let m0 = self.core.history.back(0);
        let mut acc: Option<Tensor> = None;
        for (k, &rho) in rhos.iter().enumerate() {
            let i = k + 1;
            let mi = self.core.history.back(i);
            let rk = (lambda(self.core.sigmas[index_of(i)]) - lambda_s0) / h;
            let d = divide(&(mi - m0)?, rk)?;
            let term = scale(&d, rho)?;
            acc = Some(match acc {
                None => term,
                Some(a) => (a + term)?,
            });
        }
        Ok(acc)
    }

    /// The r_k = (λ_{s_k} − λ_{s0}) / h of the history, for the linear systems.
    fn ratios(&self, order: usize, index_of: impl Fn(usize) -> usize, lambda_s0: f32, h: f32) -> Vec<f32> {
        (1..order).map(|i| (lambda(self.core.sigmas[index_of(i)]) - lambda_s0) / h).collect()
    }

    /// UniP: the predictor from sample x at step `index` to `index + 1`.
    fn predict(&self, x: &Tensor, index: usize, order: usize) -> Result<Tensor> {
        let m0 = self.core.history.back(0);
        let (sigma_t, sigma_s0) = (self.core.sigmas[index + 1], self.core.sigmas[index]);
        let (alpha_t, sigma_t_) = alpha_sigma(sigma_t);
        let (_, sigma_s0_) = alpha_sigma(sigma_s0);
        let (lambda_t, lambda_s0) = (lambda(sigma_t), lambda(sigma_s0));
        let h = lambda_t - lambda_s0;
        let (h_phi_1, b_h, b) = self.coefficients(h, order);
        let x_t_ = (scale(x, sigma_t_ / sigma_s0_)? - scale(m0, alpha_t * h_phi_1)?)?;
        if order == 1 {
            return Ok(x_t_);
        }
        let rhos: Vec<f32> = if order == 2 {
            vec![0.5]
        } else {
            let rks = self.ratios(order, |i| index - i, lambda_s0, h);
            solve(&vandermonde(&rks, order - 1), &b[..order - 1])
        };
        let pred = self.weighted_differences(&rhos, |i| index - i, lambda_s0, h)?.expect("order ≥ 2");
        Ok((x_t_ - scale(&pred, alpha_t * b_h)?)?)
    }

    /// UniC: corrects `this_sample` (the predictor's result for step `index`) with the new model output.
    fn correct(&self, this_output: &Tensor, last_sample: &Tensor, index: usize, order: usize) -> Result<Tensor> {
        let m0 = self.core.history.back(0);
        let (sigma_t, sigma_s0) = (self.core.sigmas[index], self.core.sigmas[index - 1]);
        let (alpha_t, sigma_t_) = alpha_sigma(sigma_t);
        let (_, sigma_s0_) = alpha_sigma(sigma_s0);
        let (lambda_t, lambda_s0) = (lambda(sigma_t), lambda(sigma_s0));
        let h = lambda_t - lambda_s0;
        let (h_phi_1, b_h, b) = self.coefficients(h, order);
        let rhos_c: Vec<f32> = if order == 1 {
            vec![0.5]
        } else {
            let mut rks = self.ratios(order, |i| index - (i + 1), lambda_s0, h);
            rks.push(1.0);
            solve(&vandermonde(&rks, order), &b)
        };
        let x_t_ = (scale(last_sample, sigma_t_ / sigma_s0_)? - scale(m0, alpha_t * h_phi_1)?)?;
        let (last, history) = rhos_c.split_last().expect("non-empty");
        let corr = self.weighted_differences(history, |i| index - (i + 1), lambda_s0, h)?;
        let d1_t = (this_output - m0)?;
        let mut total = scale(&d1_t, *last)?;
        if let Some(c) = corr {
            total = (c + total)?;
        }
        Ok((x_t_ - scale(&total, alpha_t * b_h)?)?)
    }
}

/// Rows rᵏ for k = 0…n−1 over the given points (diffusers' `R = stack([rks^(i-1)])`).
fn vandermonde(points: &[f32], n: usize) -> Vec<Vec<f32>> {
    (0..n).map(|k| points[..n].iter().map(|r| r.powi(k as i32)).collect()).collect()
}

/// Solves the small dense system `a · x = b` by Gaussian elimination with partial pivoting (as LAPACK's `gesv`).
fn solve(a: &[Vec<f32>], b: &[f32]) -> Vec<f32> {
    let n = b.len();
    let mut m: Vec<Vec<f64>> =
        a.iter().zip(b).map(|(row, &bi)| row.iter().map(|&v| v as f64).chain([bi as f64]).collect()).collect();
    for col in 0..n {
        let pivot = (col..n).max_by(|&i, &j| m[i][col].abs().total_cmp(&m[j][col].abs())).expect("rows");
        m.swap(col, pivot);
        let pivot_row = m[col].clone();
        for row in m.iter_mut().skip(col + 1) {
            let f = row[col] / pivot_row[col];
            for (v, p) in row[col..].iter_mut().zip(&pivot_row[col..]) {
                *v -= f * p;
            }
        }
    }
    let mut x = vec![0f64; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|k| m[row][k] * x[k]).sum();
        x[row] = (m[row][n] - s) / m[row][row];
    }
    x.into_iter().map(|v| v as f32).collect()
}

impl Scheduler for UniPc {
    fn timetable(&self) -> &Timetable {
        &self.core.table
    }

    fn update(&mut self, out: &Tensor, index: usize, sample: &Tensor, _rng: &mut TorchRng) -> Result<Tensor> {
        let mut sample = sample.clone();
        let converted = self.core.x0(out, &sample, index)?;
        let use_corrector = index > 0 && !self.disable_corrector.contains(&(index - 1)) && self.last_sample.is_some();
        if use_corrector {
            let last = self.last_sample.clone().expect("checked");
            sample = self.correct(&converted, &last, index, self.this_order)?;
        }
        self.core.history.push(converted);
        let order = if self.core.lower_order_final {
            self.core.solver_order.min(self.core.table.timesteps.len() - index)
        } else {
            self.core.solver_order
        };
        self.this_order = order.min(self.core.history.warm_steps + 1);
        self.last_sample = Some(sample.clone());
        let prev = self.predict(&sample, index, self.this_order)?;
        self.core.history.step_done();
        Ok(prev)
    }
}
