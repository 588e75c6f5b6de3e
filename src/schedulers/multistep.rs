//! What diffusers' multistep solvers (UniPC, DPM-Solver, DEIS) share: their timestep/σ tables (Karras sigmas mapped
//! back to timesteps, the final σ rule) and the history of converted model outputs with its warm-up count. All
//! scalar arithmetic is float32, as diffusers does it on 0-d float32 tensors.

use candle_core::Tensor;

use super::schedule::{
    interp, karras_sigmas, log_sigmas, sigma_to_t, Class, NoiseSchedule, Prediction, BETA, EXPONENTIAL, THRESHOLDING,
};
use super::sigma::alpha_sigma;
use super::{widen, SchedulerConfig, Timetable};
use crate::Result;

/// The options of the multistep classes that are not implemented here (each refuses those its class reads).
pub const UNSUPPORTED: &[&str] =
    &[THRESHOLDING, EXPONENTIAL, BETA, "use_lu_lambdas", "use_flow_sigmas", "use_dynamic_shifting"];

/// The config keys every multistep class (UniPC, DPM-Solver, DEIS) reads besides the shared schedule keys.
pub const KEYS: &str = "solver_order thresholding dynamic_thresholding_ratio sample_max_value solver_type \
                        lower_order_final use_karras_sigmas use_exponential_sigmas use_beta_sigmas use_flow_sigmas \
                        flow_shift use_dynamic_shifting time_shift_type";

/// How a solver picks the noise level after its last step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalSigma {
    /// `final_sigmas_type`: "zero" (default) or "sigma_min" (UniPC, DPM-Solver).
    FromConfig,
    /// DEIS: the training schedule's smallest sigma, or with Karras sigmas the last Karras sigma repeated.
    Deis,
}

/// What every multistep solver holds: its tables, the prediction type, its order and the history of converted
/// model outputs.
pub struct Multistep {
    pub table: Timetable,
    /// σ per step plus the final one.
    pub sigmas: Vec<f32>,
    pub prediction: Prediction,
    pub solver_order: usize,
    /// `lower_order_final` (default true): lower the order of the last steps.
    pub lower_order_final: bool,
    pub history: History,
}

impl Multistep {
    pub fn new(
        config: &SchedulerConfig,
        class: &Class,
        steps: usize,
        final_sigma: FinalSigma,
        solver_order: usize,
    ) -> Result<Self> {
        let schedule = NoiseSchedule::new(config, class)?;
        let (timesteps, sigmas) = tables(&schedule, config, class.name, steps, final_sigma)?;
        Ok(Self {
            table: Timetable::multistep(timesteps, widen(&sigmas)),
            sigmas,
            prediction: schedule.prediction,
            solver_order,
            lower_order_final: config.bool_or("lower_order_final", true),
            history: History::new(solver_order),
        })
    }

    /// x₀ implied by the model output at evaluation `index`.
    pub fn x0(&self, model_output: &Tensor, sample: &Tensor, index: usize) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[index]);
        self.prediction.x0_at_alpha(model_output, sample, alpha_t, sigma_t)
    }
}

/// `set_timesteps` of the multistep solvers: the spacing rule's timesteps, or Karras sigmas mapped back to (rounded)
/// timesteps when `use_karras_sigmas`, then the final σ.
fn tables(
    schedule: &NoiseSchedule,
    config: &SchedulerConfig,
    scheduler: &'static str,
    n: usize,
    final_sigma: FinalSigma,
) -> Result<(Vec<f64>, Vec<f32>)> {
    let mut timesteps = schedule.multistep_timesteps(n);
    let sigmas_train = schedule.train_sigmas();
    let karras = config.bool_or("use_karras_sigmas", false);
    let mut sigmas: Vec<f64> = if karras {
        let log_sigmas = log_sigmas(&sigmas_train);
        let min = config.f64_or("sigma_min", sigmas_train[0] as f64);
        let max = config.f64_or("sigma_max", sigmas_train[sigmas_train.len() - 1] as f64);
        let sigmas = karras_sigmas(min, max, n);
        let round = config.str_or("beta_schedule", "linear") != "squaredcos_cap_v2";
        timesteps = sigmas
            .iter()
            .map(|&s| {
                let t = sigma_to_t(s, &log_sigmas);
                if round {
                    t.round_ties_even()
                } else {
                    t
                }
            })
            .collect();
        sigmas
    } else {
        timesteps.iter().map(|&t| interp(t, &sigmas_train)).collect()
    };
    let cumprod = &schedule.alphas_cumprod;
    let sigma_min = ((1f32 - cumprod[0]) / cumprod[0]).sqrt() as f64;
    let last = match final_sigma {
        FinalSigma::Deis if karras => *sigmas.last().expect("n ≥ 1"),
        FinalSigma::Deis => sigma_min,
        FinalSigma::FromConfig => {
            config.choice(scheduler, "final_sigmas_type", "zero", &[("zero", 0.0), ("sigma_min", sigma_min)])?
        }
    };
    sigmas.push(last);
    // The model receives integer timesteps (torch int64).
    let timesteps = timesteps.into_iter().map(|t| t.trunc()).collect();
    Ok((timesteps, sigmas.into_iter().map(|s| s as f32).collect()))
}

/// The last `order` converted model outputs (oldest first) and how many steps have run, up to `order`
/// (diffusers' `model_outputs` and `lower_order_nums`).
pub struct History {
    outputs: Vec<Tensor>,
    order: usize,
    /// Steps taken so far, saturating at `order`: the solver's order is limited by it while warming up.
    pub warm_steps: usize,
}

impl History {
    pub fn new(order: usize) -> Self {
        Self { outputs: Vec::with_capacity(order), order, warm_steps: 0 }
    }

    /// Adds the newest output, dropping the oldest when `order` are held.
    pub fn push(&mut self, output: Tensor) {
        if self.outputs.len() == self.order {
            self.outputs.remove(0);
        }
        self.outputs.push(output);
    }

    /// How many outputs are held (at most `order`).
    pub fn len(&self) -> usize {
        self.outputs.len()
    }

    /// The output `back` steps before the newest (0: the newest).
    pub fn back(&self, back: usize) -> &Tensor {
        &self.outputs[self.outputs.len() - 1 - back]
    }

    /// Counts a finished step.
    pub fn step_done(&mut self) {
        if self.warm_steps < self.order {
            self.warm_steps += 1;
        }
    }
}
