//! diffusers' `PNDMScheduler`: pseudo numerical methods for diffusion models (Liu et al. 2022). The update moves
//! the sample along DDIM's transfer function φ(x, ε, t → t′) with an ε combined from past model outputs: linear
//! multistep (Adams–Bashforth, "PLMS") weights, warmed up either by a second evaluation of the first step
//! (`skip_prk_steps`, as SDXL configs set it) or by three classical Runge–Kutta steps (four evaluations each).

use candle_core::Tensor;

use super::schedule::{Class, NoiseSchedule, Spacing, EPSILON_OR_V};
use super::sigma::{divide, scale};
use super::{Scheduler, SchedulerConfig, Timetable};
use crate::rng::TorchRng;
use crate::{Error, Result};

const CLASS: Class = Class { name: "PNDM", default_spacing: Spacing::Leading, predictions: EPSILON_OR_V };

/// Model outputs kept for the linear multistep combination.
const ORDER: usize = 4;

/// The config keys its diffusers class reads besides the shared schedule keys ([`super::schedule::SCHEDULE_KEYS`]).
pub const KEYS: &str = "skip_prk_steps set_alpha_to_one";

pub struct Pndm {
    schedule: NoiseSchedule,
    /// One entry per model evaluation: the Runge–Kutta evaluations (if any), then the linear multistep ones.
    table: Timetable,
    final_alpha_cumprod: f32,
    /// How many of the evaluations are Runge–Kutta evaluations (0 with `skip_prk_steps`).
    prk_evaluations: usize,
    /// num_train_timesteps / steps (integer division), the distance between two inference steps.
    step_ratio: i64,
    /// The last (up to) four model outputs that enter the multistep combination (oldest first).
    history: Vec<Tensor>,
    /// The Runge–Kutta step's weighted sum of its evaluations so far.
    rk_sum: Option<Tensor>,
    /// The sample every evaluation of the current warm-up step starts from.
    start: Option<Tensor>,
    /// Model evaluations stepped so far (diffusers' `counter`: it drives the warm-up, and counts from the first
    /// evaluation run, which image-to-image starts later in the table).
    counter: usize,
}

impl Pndm {
    pub fn boxed(config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
        let schedule = NoiseSchedule::new(config, &CLASS)?;
        let final_alpha_cumprod =
            if config.bool_or("set_alpha_to_one", false) { 1.0 } else { schedule.alphas_cumprod[0] };
        let train = schedule.num_train_timesteps;
        // diffusers' `_timesteps`: the spacing rule's timesteps, cleanest first.
        let ascending: Vec<i64> = schedule.spaced_timesteps(steps).iter().rev().map(|&t| t as i64).collect();
        let (prk, plms) = if config.bool_or("skip_prk_steps", false) {
            // The first step is evaluated twice: t_{n−1}, t_{n−2}, t_{n−2}, t_{n−3}, …, t₀.
            let mut plms = ascending[..steps - 1].to_vec();
            plms.extend(ascending[steps.saturating_sub(2)..steps - 1].iter().chain(&ascending[steps - 1..]));
            plms.reverse();
            (Vec::new(), plms)
        } else {
            if steps < ORDER {
                return Err(Error::invalid(
                    "num_inference_steps",
                    format!(
                        "must be at least {ORDER} for PNDM's Runge–Kutta warm-up (skip_prk_steps = false in the \
                         scheduler config), got {steps}"
                    ),
                ));
            }
            // The last four timesteps and their half-way points, each evaluated as Runge–Kutta needs them.
            let half = (train / steps / 2) as i64;
            let points: Vec<i64> = ascending[steps - ORDER..].iter().flat_map(|&t| [t, t + half]).collect();
            let points = &points[..points.len() - 1];
            let repeated: Vec<i64> = points.iter().flat_map(|&t| [t, t]).collect();
            let mut prk = repeated[1..repeated.len() - 1].to_vec();
            prk.reverse();
            (prk, ascending[..steps - (ORDER - 1)].iter().rev().copied().collect())
        };
        let prk_evaluations = prk.len();
        let mut table =
            Timetable::variance_preserving(prk.into_iter().chain(plms).map(|t| t as f64).collect(), &schedule);
        table.num_inference_steps = steps;
        Ok(Box::new(Self {
            schedule,
            table,
            final_alpha_cumprod,
            prk_evaluations,
            step_ratio: (train / steps) as i64,
            history: Vec::with_capacity(ORDER),
            rk_sum: None,
            start: None,
            counter: 0,
        }))
    }

    /// DDIM's transfer φ: the sample at `prev` from the sample at `t` and the (combined) ε, in float32 arithmetic as
    /// diffusers' `_get_prev_sample`.
    fn transfer(&self, sample: &Tensor, t: i64, prev: i64, model_output: &Tensor) -> Result<Tensor> {
        let alphas_cumprod = &self.schedule.alphas_cumprod;
        // The Runge–Kutta half steps of the first step reach past the last training timestep when the spacing
        // leaves less than half a step above it.
        let alpha = *alphas_cumprod.get(t as usize).ok_or_else(|| {
            Error::invalid(
                "num_inference_steps",
                format!("PNDM's Runge–Kutta warm-up reaches timestep {t}, outside the model's trained schedule"),
            )
        })?;
        let alpha_prev = if prev >= 0 { alphas_cumprod[prev as usize] } else { self.final_alpha_cumprod };
        let (beta, beta_prev) = (1f32 - alpha, 1f32 - alpha_prev);
        let eps = self.schedule.prediction.epsilon_at_alpha(model_output, sample, alpha.sqrt(), beta.sqrt())?;
        let sample_coeff = (alpha_prev / alpha).sqrt();
        let denominator = alpha * beta_prev.sqrt() + (alpha * beta * alpha_prev).sqrt();
        Ok((scale(sample, sample_coeff)? - divide(&scale(&eps, alpha_prev - alpha)?, denominator)?)?)
    }

    /// One of the four evaluations of a Runge–Kutta warm-up step (`counter` counts evaluations from 0).
    fn step_prk(&mut self, out: &Tensor, counter: usize, t: i64, sample: &Tensor) -> Result<Tensor> {
        let half = self.step_ratio / 2;
        let prev = if counter % 2 == 1 { t } else { t - half };
        let step_t = self.table.timesteps[counter / 4 * 4] as i64;
        let eps = match counter % 4 {
            0 => {
                self.rk_sum = Some(scale(out, (1.0f64 / 6.0) as f32)?);
                self.history.push(out.clone());
                self.start = Some(sample.clone());
                out.clone()
            }
            1 | 2 => {
                let sum = self.rk_sum.take().expect("set by the step's first evaluation");
                self.rk_sum = Some((sum + scale(out, (1.0f64 / 3.0) as f32)?)?);
                out.clone()
            }
            _ => {
                (self.rk_sum.take().expect("set by the step's first evaluation") + scale(out, (1.0f64 / 6.0) as f32)?)?
            }
        };
        let start = self.start.clone().unwrap_or_else(|| sample.clone());
        self.transfer(&start, step_t, prev, &eps)
    }

    /// A linear multistep evaluation (`counter` counts all evaluations from 0).
    fn step_plms(&mut self, out: &Tensor, counter: usize, t: i64, sample: &Tensor) -> Result<Tensor> {
        let (mut t, mut prev) = (t, t - self.step_ratio);
        // The repeated first step (skip_prk_steps): its second evaluation restarts from the first one's sample.
        let repeat = counter == 1;
        if repeat {
            (t, prev) = (t + self.step_ratio, t);
        } else {
            if self.history.len() == ORDER {
                self.history.remove(0);
            }
            self.history.push(out.clone());
        }
        let e = &self.history;
        let n = e.len();
        let mut sample = sample.clone();
        let eps = match n {
            1 if counter == 0 => {
                self.start = Some(sample.clone());
                out.clone()
            }
            1 => {
                sample = self.start.take().expect("set by the first evaluation");
                divide(&(out + &e[0])?, 2.0)?
            }
            2 => divide(&(scale(&e[1], 3.0)? - &e[0])?, 2.0)?,
            3 => divide(&((scale(&e[2], 23.0)? - scale(&e[1], 16.0)?)? + scale(&e[0], 5.0)?)?, 12.0)?,
            _ => {
                let sum = (((scale(&e[3], 55.0)? - scale(&e[2], 59.0)?)? + scale(&e[1], 37.0)?)? - scale(&e[0], 9.0)?)?;
                scale(&sum, (1.0f64 / 24.0) as f32)?
            }
        };
        self.transfer(&sample, t, prev, &eps)
    }
}

impl Scheduler for Pndm {
    fn timetable(&self) -> &Timetable {
        &self.table
    }

    fn update(&mut self, out: &Tensor, index: usize, sample: &Tensor, _rng: &mut TorchRng) -> Result<Tensor> {
        let t = self.table.timesteps[index] as i64;
        let counter = self.counter;
        self.counter += 1;
        if counter < self.prk_evaluations {
            self.step_prk(out, counter, t, sample)
        } else {
            self.step_plms(out, counter, t, sample)
        }
    }
}
