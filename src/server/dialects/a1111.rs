//! AUTOMATIC1111's web UI API (`/sdapi/v1/*`), so A1111 clients (webuiapi, Krita and Photoshop plug-ins, bots)
//! drive this server: `txt2img` and `img2img` with A1111's field names, types and defaults (its
//! `modules/api/models.py`, built from `StableDiffusionProcessingTxt2Img` / `…Img2Img`), answering
//! `{"images": [base64 PNG with its parameters chunk], "parameters": {…}, "info": "<JSON>"}`; `progress` and
//! `interrupt` for the running job; and the lists clients read at start-up (`samplers`, `schedulers`, `sd-models`,
//! `options`, `loras`, `scripts`).
//!
//! A1111 names a sampler (`DPM++ 2M`) and a schedule type (`Karras`) apart, or together in the older combined form
//! (`DPM++ 2M Karras`); [`resolve_sampler`] turns them into one of the engine's schedulers plus scheduler options.
//! Every generation goes through the same queue, key check, ranges and body limit as the hosted endpoints. Errors
//! take A1111's shapes: FastAPI's 422 `{"detail": [{"loc", "msg", "type"}]}` for a request field, and A1111's
//! `{"error", "detail", "body", "errors"}` for everything else.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::server::decode::{self, Mode};
use crate::server::errors::ApiError;
use crate::server::handlers::AppState;
use crate::server::queue::Outcome;
use crate::{Error, GenerateRequest};

/// This dialect's routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/sdapi/v1/txt2img", post(txt2img))
        .route("/sdapi/v1/img2img", post(img2img))
        .route("/sdapi/v1/progress", get(progress))
        .route("/sdapi/v1/interrupt", post(interrupt))
        .route("/sdapi/v1/samplers", get(samplers))
        .route("/sdapi/v1/schedulers", get(schedulers))
        .route("/sdapi/v1/sd-models", get(sd_models))
        .route("/sdapi/v1/options", get(get_options).post(set_options))
        .route("/sdapi/v1/loras", get(loras))
        .route("/sdapi/v1/scripts", get(scripts))
}

// ---------------------------------------------------------------------------------------------------------------
// Samplers and schedule types.

/// A1111's schedule types (`modules/sd_schedulers.py`): name, label, aliases, and whether this server has it.
const SCHEDULES: &[(&str, &str, &[&str], bool)] = &[
    ("automatic", "Automatic", &[], true),
    ("uniform", "Uniform", &[], true),
    ("karras", "Karras", &[], true),
    ("exponential", "Exponential", &[], false),
    ("polyexponential", "Polyexponential", &[], false),
    ("sgm_uniform", "SGM Uniform", &["SGMUniform"], true),
    ("kl_optimal", "KL Optimal", &[], false),
    ("align_your_steps", "Align Your Steps", &[], false),
    ("simple", "Simple", &[], true),
    ("normal", "Normal", &[], true),
    ("ddim", "DDIM", &[], false),
    ("beta", "Beta", &[], false),
];

/// An A1111 sampler and the engine's schedulers for it.
struct Sampler {
    name: &'static str,
    aliases: &'static [&'static str],
    /// The engine's scheduler with the model's own σ table (Automatic, and with a timestep spacing for Uniform,
    /// Normal, SGM Uniform and Simple); `None`: only Karras σs here.
    plain: Option<&'static str>,
    /// The engine's scheduler with Karras σs.
    karras: Option<&'static str>,
    /// "Automatic" means Karras (A1111's `options["scheduler"]`: `karras` for DPM++ 2M and DPM++ SDE; its
    /// `exponential` for the 2M/3M SDE samplers, which this server does not have, and the model's table for DPM2,
    /// which it does not have either: the nearest it has is Karras, and the infotext says so).
    automatic_karras: bool,
    /// A1111's timestep samplers (DDIM, PLMS, UniPC) and LCM run their own timesteps: the schedule type does not
    /// apply to them, and is ignored as A1111 ignores it.
    timestep: bool,
    /// Its noise is weighted by A1111's `eta` (ancestral and SDE samplers; the engine's weight is 1, A1111's
    /// default).
    uses_eta: bool,
}

const fn k(
    name: &'static str,
    aliases: &'static [&'static str],
    plain: Option<&'static str>,
    karras: Option<&'static str>,
    automatic_karras: bool,
    uses_eta: bool,
) -> Sampler {
    Sampler { name, aliases, plain, karras, automatic_karras, timestep: false, uses_eta }
}

const fn timestep(name: &'static str, aliases: &'static [&'static str], scheduler: &'static str) -> Sampler {
    Sampler {
        name,
        aliases,
        plain: Some(scheduler),
        karras: None,
        automatic_karras: false,
        timestep: true,
        uses_eta: false,
    }
}

/// The A1111 samplers this server runs (A1111's own order).
const SAMPLERS: &[Sampler] = &[
    k("DPM++ 2M", &["k_dpmpp_2m"], Some("DPM Multi"), Some("DPM++ 2M Karras"), true, false),
    k("DPM++ SDE", &["k_dpmpp_sde"], Some("DPM++ SDE"), Some("DPM++ SDE Karras"), true, true),
    k(
        "DPM++ 2M SDE",
        &["k_dpmpp_2m_sde", "k_dpmpp_2m_sde_ka"],
        Some("DPM++ 2M SDE"),
        Some("DPM++ 2M SDE Karras"),
        true,
        true,
    ),
    k("DPM++ 3M SDE", &["k_dpmpp_3m_sde"], None, Some("DPM++ 3M SDE Karras"), true, true),
    k("Euler a", &["k_euler_a", "k_euler_ancestral"], Some("Euler a"), None, false, true),
    k("Euler", &["k_euler"], Some("Euler"), None, false, false),
    k("LMS", &["k_lms"], Some("LMS"), None, false, false),
    k("Heun", &["k_heun"], Some("Heun"), None, false, false),
    k("DPM2", &["k_dpm_2"], None, Some("DPM2 Karras"), true, false),
    k("DPM2 a", &["k_dpm_2_a"], None, Some("DPM2 a Karras"), true, true),
    timestep("DDIM", &["ddim"], "DDIM"),
    timestep("PLMS", &["plms"], "PNDM"),
    timestep("UniPC", &["unipc"], "UniPC"),
    timestep("LCM", &["k_lcm", "lcm"], "LCM"),
];

/// A1111 samplers this server does not have (named in the error rather than called unknown).
const MISSING_SAMPLERS: &[&str] =
    &["DPM++ 2S a", "DPM++ 2M SDE Heun", "DPM fast", "DPM adaptive", "Restart", "DDIM CFG++"];

/// What a request's `sampler_name` / `scheduler` resolve to.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// The engine's scheduler name.
    pub scheduler: &'static str,
    /// Scheduler options on top of the model's config (a timestep spacing for Uniform, Normal, SGM Uniform, Simple).
    pub options: Map<String, Value>,
    /// The A1111 sampler name (for the answer and the infotext), or the engine's name when it was asked for.
    pub sampler: &'static str,
    /// The schedule type that ran (A1111's label), `None` where none applies.
    pub schedule: Option<&'static str>,
    /// Whether the sampler's noise is weighted by A1111's `eta`.
    pub uses_eta: bool,
    /// A schedule type asked for and ignored (timestep samplers).
    pub ignored_schedule: Option<String>,
}

fn schedule_label(name: &str) -> Option<(&'static str, bool)> {
    let wanted = name.trim();
    SCHEDULES
        .iter()
        .find(|(n, label, aliases, _)| {
            n.eq_ignore_ascii_case(wanted)
                || label.eq_ignore_ascii_case(wanted)
                || aliases.iter().any(|a| a.eq_ignore_ascii_case(wanted))
        })
        .map(|&(_, label, _, supported)| (label, supported))
}

fn find_sampler(name: &str) -> Option<&'static Sampler> {
    let wanted = name.trim();
    SAMPLERS
        .iter()
        .find(|s| s.name.eq_ignore_ascii_case(wanted) || s.aliases.iter().any(|a| a.eq_ignore_ascii_case(wanted)))
}

fn sampler_names() -> String {
    SAMPLERS.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
}

fn supported_schedules() -> String {
    SCHEDULES.iter().filter(|s| s.3).map(|s| s.1).collect::<Vec<_>>().join(", ")
}

/// The engine's scheduler for A1111's `sampler_name` (or the older `sampler_index`; default `Euler`, as A1111's API
/// model has it) and `scheduler` (a schedule type; none: Automatic). A schedule type may also end the sampler name
/// (`DPM++ 2M Karras`), as A1111 accepts it. The engine's own scheduler names are accepted too (schedule Automatic
/// only). Errors: (field, message) for a 422.
pub fn resolve_sampler(
    sampler_name: Option<&str>,
    sampler_index: Option<&str>,
    scheduler: Option<&str>,
) -> Result<Resolved, (&'static str, String)> {
    let name_field = if sampler_name.is_some_and(|n| !n.trim().is_empty()) { "sampler_name" } else { "sampler_index" };
    let name = sampler_name.filter(|n| !n.trim().is_empty()).or(sampler_index).unwrap_or("Euler").trim();
    let mut schedule = match scheduler.map(str::trim).filter(|s| !s.is_empty()) {
        None => "Automatic",
        Some(s) => match schedule_label(s) {
            Some((label, _)) => label,
            None => {
                let known: Vec<&str> = SCHEDULES.iter().map(|s| s.1).collect();
                return Err(("scheduler", format!("unknown schedule type {s:?}: A1111's are {}", known.join(", "))));
            }
        },
    };
    let mut sampler = find_sampler(name);
    if sampler.is_none() {
        // The combined form: "DPM++ 2M Karras", "DPM2 a Karras".
        for &(_, label, aliases, _) in SCHEDULES {
            for option in std::iter::once(&label).chain(aliases.iter()) {
                let suffix = format!(" {option}");
                if name.len() > suffix.len() && name.to_ascii_lowercase().ends_with(&suffix.to_ascii_lowercase()) {
                    if let Some(found) = find_sampler(&name[..name.len() - suffix.len()]) {
                        (sampler, schedule) = (Some(found), label);
                    }
                }
            }
        }
    }
    let Some(sampler) = sampler else {
        if let Ok(kind) = crate::schedulers::lookup(name) {
            if schedule != "Automatic" {
                let message = format!(
                    "{name:?} is this server's own scheduler name; it takes no schedule type (got {schedule:?}): use \
                     an A1111 sampler ({}) for schedule types",
                    sampler_names()
                );
                return Err(("scheduler", message));
            }
            return Ok(Resolved {
                scheduler: kind.name(),
                options: Map::new(),
                sampler: kind.name(),
                schedule: None,
                uses_eta: false,
                ignored_schedule: None,
            });
        }
        let message = if MISSING_SAMPLERS.iter().any(|m| m.eq_ignore_ascii_case(name)) {
            format!("the A1111 sampler {name:?} is not available on this server; it runs {}", sampler_names())
        } else {
            format!("unknown sampler {name:?}: this server runs {}", sampler_names())
        };
        return Err((name_field, message));
    };
    let resolved = |scheduler: &'static str, spacing: Option<&str>, label: Option<&'static str>| {
        let mut options = Map::new();
        if let Some(spacing) = spacing {
            options.insert("timestep_spacing".into(), Value::from(spacing));
        }
        Resolved {
            scheduler,
            options,
            sampler: sampler.name,
            schedule: label,
            uses_eta: sampler.uses_eta,
            ignored_schedule: None,
        }
    };
    if sampler.timestep {
        let mut r = resolved(sampler.plain.expect("timestep samplers have a scheduler"), None, None);
        if schedule != "Automatic" {
            r.ignored_schedule = Some(schedule.to_string());
        }
        return Ok(r);
    }
    let unavailable = |what: &str| {
        let mut available = Vec::new();
        if sampler.karras.is_some() {
            available.push("Karras");
        }
        if sampler.plain.is_some() {
            available.extend(["Uniform", "Normal", "SGM Uniform", "Simple"]);
        }
        Err((
            "scheduler",
            format!(
                "{what} with {} is not available on this server; it has {} with Automatic, {}",
                sampler.name,
                sampler.name,
                available.join(", ")
            ),
        ))
    };
    match schedule {
        "Automatic" if sampler.automatic_karras => Ok(resolved(sampler.karras.expect("Karras"), None, Some("Karras"))),
        "Automatic" => Ok(resolved(sampler.plain.expect("a plain schedule"), None, None)),
        "Karras" => match sampler.karras {
            Some(s) => Ok(resolved(s, None, Some("Karras"))),
            None => unavailable("the schedule type Karras"),
        },
        // k-diffusion's own σ table and A1111's "normal" both space the timesteps evenly from the last to the first;
        // SGM Uniform and Simple leave out the final timestep (diffusers' documented equivalents).
        "Uniform" | "Normal" | "SGM Uniform" | "Simple" => {
            let spacing = if matches!(schedule, "Uniform" | "Normal") { "linspace" } else { "trailing" };
            let label = SCHEDULES.iter().find(|s| s.1 == schedule).map(|s| s.1);
            match sampler.plain {
                Some(s) => Ok(resolved(s, Some(spacing), label)),
                None => unavailable(&format!("the schedule type {schedule}")),
            }
        }
        other => Err((
            "scheduler",
            format!("the schedule type {other:?} is not available on this server; it has {}", supported_schedules()),
        )),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Errors.

/// An answer in A1111's error shapes.
#[derive(Debug, Clone, PartialEq)]
pub enum A1111Error {
    /// FastAPI's request validation error: 422 `{"detail": [{"type", "loc", "msg"}]}`.
    Invalid { loc: Vec<Value>, msg: String },
    /// A1111's exception answer: `{"error", "detail", "body", "errors"}`.
    Http { status: StatusCode, error: &'static str, detail: String, retry_after: Option<u64> },
}

impl A1111Error {
    fn field(field: &str, msg: impl Into<String>) -> Self {
        Self::Invalid { loc: vec!["body".into(), field.into()], msg: msg.into() }
    }

    fn http(status: StatusCode, detail: impl Into<String>) -> Self {
        Self::Http { status, error: "HTTPException", detail: detail.into(), retry_after: None }
    }
}

/// The engine's field names in its messages, as the A1111 fields a client sent.
const FIELD_NAMES: &[(&str, &str)] = &[
    ("`img_width`", "`width`"),
    ("`img_height`", "`height`"),
    ("`num_inference_steps`", "`steps`"),
    ("`guidance_scale`", "`cfg_scale`"),
    ("`samples`", "`batch_size` × `n_iter`"),
    ("`strength`", "`denoising_strength`"),
    ("`image`", "`init_images`"),
    ("`hires.scale`", "`hr_scale`"),
    ("`hires.strength`", "`denoising_strength`"),
    ("`hires.steps`", "`hr_second_pass_steps`"),
];

impl From<ApiError> for A1111Error {
    fn from(e: ApiError) -> Self {
        if e.status == StatusCode::BAD_REQUEST {
            let msg = FIELD_NAMES.iter().fold(e.message, |m, (ours, theirs)| m.replace(ours, theirs));
            return Self::Invalid { loc: vec!["body".into()], msg };
        }
        Self::Http { status: e.status, error: "HTTPException", detail: e.message, retry_after: e.retry_after }
    }
}

impl IntoResponse for A1111Error {
    fn into_response(self) -> Response {
        let (status, body, retry_after) = match self {
            Self::Invalid { loc, msg } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({"detail": [{"type": "value_error", "loc": loc, "msg": msg}]}),
                None,
            ),
            Self::Http { status, error, detail, retry_after } => {
                (status, json!({"error": error, "detail": detail, "body": "", "errors": detail}), retry_after)
            }
        };
        let mut response =
            (status, [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body.to_string())
                .into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic"));
        }
        if let Some(seconds) = retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

fn check_key(state: &AppState, headers: &HeaderMap) -> Result<(), A1111Error> {
    state.keys.check(headers).map_err(|_| A1111Error::http(StatusCode::UNAUTHORIZED, "Incorrect username or password"))
}

// ---------------------------------------------------------------------------------------------------------------
// Requests.

/// A1111's txt2img / img2img request (`StableDiffusionTxt2ImgProcessingAPI` / `…Img2Img…`): every field optional,
/// `null` meaning the default, unknown fields ignored. The defaults are A1111's API defaults (50 steps, cfg 7,
/// 512×512, sampler `Euler`), not its web page's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Params {
    pub prompt: String,
    pub negative_prompt: String,
    pub styles: Vec<String>,
    pub seed: i64,
    pub subseed: i64,
    pub subseed_strength: f64,
    pub seed_resize_from_h: i64,
    pub seed_resize_from_w: i64,
    pub sampler_name: Option<String>,
    pub sampler_index: String,
    pub scheduler: Option<String>,
    pub batch_size: u32,
    pub n_iter: u32,
    pub steps: u32,
    pub cfg_scale: f64,
    pub width: u32,
    pub height: u32,
    pub restore_faces: Option<bool>,
    pub tiling: Option<bool>,
    pub do_not_save_samples: bool,
    pub do_not_save_grid: bool,
    pub eta: Option<f64>,
    pub denoising_strength: f64,
    pub s_min_uncond: Option<f64>,
    pub s_churn: Option<f64>,
    pub s_tmax: Option<f64>,
    pub s_tmin: Option<f64>,
    pub s_noise: Option<f64>,
    pub override_settings: Map<String, Value>,
    pub override_settings_restore_afterwards: bool,
    pub refiner_checkpoint: Option<String>,
    pub refiner_switch_at: Option<f64>,
    pub disable_extra_networks: bool,
    pub script_name: Option<String>,
    pub script_args: Vec<Value>,
    pub send_images: bool,
    pub save_images: bool,
    pub alwayson_scripts: Map<String, Value>,
    pub force_task_id: Option<String>,
    pub infotext: Option<String>,
    // txt2img: the hires fix.
    pub enable_hr: bool,
    pub firstphase_width: u32,
    pub firstphase_height: u32,
    pub hr_scale: f64,
    pub hr_upscaler: Option<String>,
    pub hr_second_pass_steps: u32,
    pub hr_resize_x: u32,
    pub hr_resize_y: u32,
    pub hr_checkpoint_name: Option<String>,
    pub hr_sampler_name: Option<String>,
    pub hr_scheduler: Option<String>,
    pub hr_prompt: String,
    pub hr_negative_prompt: String,
    // img2img.
    pub init_images: Option<Vec<String>>,
    pub resize_mode: i64,
    pub image_cfg_scale: Option<f64>,
    pub mask: Option<String>,
    pub mask_blur_x: i64,
    pub mask_blur_y: i64,
    pub mask_blur: Option<i64>,
    pub mask_round: bool,
    pub inpainting_fill: i64,
    pub inpaint_full_res: bool,
    pub inpaint_full_res_padding: i64,
    pub inpainting_mask_invert: i64,
    pub initial_noise_multiplier: Option<f64>,
    pub include_init_images: bool,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            styles: Vec::new(),
            seed: -1,
            subseed: -1,
            subseed_strength: 0.0,
            seed_resize_from_h: -1,
            seed_resize_from_w: -1,
            sampler_name: None,
            sampler_index: "Euler".into(),
            scheduler: None,
            batch_size: 1,
            n_iter: 1,
            steps: 50,
            cfg_scale: 7.0,
            width: 512,
            height: 512,
            restore_faces: None,
            tiling: None,
            do_not_save_samples: false,
            do_not_save_grid: false,
            eta: None,
            denoising_strength: 0.75,
            s_min_uncond: None,
            s_churn: None,
            s_tmax: None,
            s_tmin: None,
            s_noise: None,
            override_settings: Map::new(),
            override_settings_restore_afterwards: true,
            refiner_checkpoint: None,
            refiner_switch_at: None,
            disable_extra_networks: false,
            script_name: None,
            script_args: Vec::new(),
            send_images: true,
            save_images: false,
            alwayson_scripts: Map::new(),
            force_task_id: None,
            infotext: None,
            enable_hr: false,
            firstphase_width: 0,
            firstphase_height: 0,
            hr_scale: 2.0,
            hr_upscaler: None,
            hr_second_pass_steps: 0,
            hr_resize_x: 0,
            hr_resize_y: 0,
            hr_checkpoint_name: None,
            hr_sampler_name: None,
            hr_scheduler: None,
            hr_prompt: String::new(),
            hr_negative_prompt: String::new(),
            init_images: None,
            resize_mode: 0,
            image_cfg_scale: None,
            mask: None,
            mask_blur_x: 4,
            mask_blur_y: 4,
            mask_blur: None,
            mask_round: true,
            inpainting_fill: 0,
            inpaint_full_res: true,
            inpaint_full_res_padding: 0,
            inpainting_mask_invert: 0,
            initial_noise_multiplier: None,
            include_init_images: false,
        }
    }
}

/// Fields only one of the two endpoints has (left out of the other's `parameters`).
const TXT2IMG_ONLY: &[&str] = &[
    "enable_hr",
    "firstphase_width",
    "firstphase_height",
    "hr_scale",
    "hr_upscaler",
    "hr_second_pass_steps",
    "hr_resize_x",
    "hr_resize_y",
    "hr_checkpoint_name",
    "hr_sampler_name",
    "hr_scheduler",
    "hr_prompt",
    "hr_negative_prompt",
];
const IMG2IMG_ONLY: &[&str] = &[
    "init_images",
    "resize_mode",
    "image_cfg_scale",
    "mask",
    "mask_blur_x",
    "mask_blur_y",
    "mask_blur",
    "mask_round",
    "inpainting_fill",
    "inpaint_full_res",
    "inpaint_full_res_padding",
    "inpainting_mask_invert",
    "initial_noise_multiplier",
    "include_init_images",
];

/// Reads a body as A1111's request: a JSON object whose `null`s mean the defaults. A type error is a 422 naming the
/// field.
pub fn parse_params(body: &[u8]) -> Result<Params, A1111Error> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| A1111Error::Invalid { loc: vec!["body".into()], msg: format!("JSON decode error: {e}") })?;
    let Value::Object(mut fields) = value else {
        return Err(A1111Error::Invalid { loc: vec!["body".into()], msg: "Input should be a valid dictionary".into() });
    };
    fields.retain(|_, v| !v.is_null());
    serde_path_to_error::deserialize::<_, Params>(Value::Object(fields)).map_err(|e| {
        let field = e.path().iter().next().map(|s| s.to_string()).unwrap_or_default();
        let msg = e.into_inner().to_string();
        A1111Error::Invalid { loc: vec!["body".into(), field.into()], msg }
    })
}

/// A request mapped onto the engine's, with what the answer reports.
#[derive(Debug)]
pub struct Mapped {
    pub request: GenerateRequest,
    pub resolved: Resolved,
    /// Fields accepted and ignored (or changed) that the client should know about; also logged, and returned as
    /// `info.comments`.
    pub notes: Vec<String>,
}

/// A1111's request as the engine's (the endpoint's ranges are checked afterwards by [`decode::check`]).
pub fn map_params(params: &Params, mode: Mode) -> Result<Mapped, A1111Error> {
    let resolved =
        resolve_sampler(params.sampler_name.as_deref(), Some(&params.sampler_index), params.scheduler.as_deref())
            .map_err(|(field, msg)| A1111Error::field(field, msg))?;
    let mut notes = Vec::new();
    let mut note = |text: String| notes.push(text);
    let images = u64::from(params.batch_size) * u64::from(params.n_iter);
    if !(1..=4).contains(&images) {
        let msg = format!(
            "batch_size × n_iter must be between 1 and 4 images on this server (one batch of up to 4), got {} × {} = \
             {images}",
            params.batch_size, params.n_iter
        );
        let field = if params.batch_size == 0 || params.batch_size > 4 { "batch_size" } else { "n_iter" };
        return Err(A1111Error::field(field, msg));
    }
    if let Some(name) = params.script_name.as_deref().filter(|n| !n.is_empty()) {
        return Err(A1111Error::field("script_name", format!("Script '{name}' not found: this server has no scripts")));
    }
    let mut request = GenerateRequest::new(params.prompt.clone());
    request.negative_prompt = params.negative_prompt.clone();
    request.samples = images as u32;
    request.scheduler = resolved.scheduler.to_string();
    request.scheduler_options = resolved.options.clone();
    request.num_inference_steps = params.steps;
    request.guidance_scale = params.cfg_scale;
    request.seed = params.seed;
    request.img_width = params.width;
    request.img_height = params.height;
    if let Some(schedule) = &resolved.ignored_schedule {
        note(format!("scheduler {schedule:?} ignored: {} runs its own timesteps", resolved.sampler));
    }
    match params.eta {
        // DDIM's η (A1111's `eta`, its default `eta_ddim` 0 when absent) is the engine's `eta`.
        Some(eta) if resolved.scheduler == "DDIM" => request.eta = Some(eta),
        Some(eta) if resolved.uses_eta && eta != 1.0 => {
            note(format!("eta {eta} ignored: {} adds its full noise (eta 1, A1111's default)", resolved.sampler))
        }
        _ => {}
    }
    if !params.styles.is_empty() {
        note(format!("styles {:?} ignored: this server has no saved styles", params.styles));
    }
    if params.subseed_strength != 0.0 {
        note("subseed / subseed_strength ignored: variation seeds are not supported".into());
    }
    if params.seed_resize_from_h > 0 || params.seed_resize_from_w > 0 {
        note("seed_resize_from_h / seed_resize_from_w ignored".into());
    }
    if params.restore_faces == Some(true) {
        note("restore_faces ignored: this server has no face restorer".into());
    }
    if params.tiling == Some(true) {
        note("tiling ignored: tileable images are not supported".into());
    }
    if params.s_churn.is_some_and(|v| v != 0.0) || params.s_noise.is_some_and(|v| v != 1.0) {
        note("s_churn / s_noise ignored: the samplers run without churn".into());
    }
    if !params.override_settings.is_empty() {
        let keys: Vec<&String> = params.override_settings.keys().collect();
        note(format!("override_settings ignored ({keys:?}): this server's settings are fixed"));
    }
    if params.refiner_checkpoint.as_deref().is_some_and(|r| !r.is_empty() && r != "None") {
        note("refiner_checkpoint ignored: this server runs no refiner".into());
    }
    if !params.alwayson_scripts.is_empty() {
        let keys: Vec<&String> = params.alwayson_scripts.keys().collect();
        note(format!("alwayson_scripts ignored ({keys:?}): this server has no scripts"));
    }
    if params.save_images {
        note("save_images ignored: this server saves nothing; the images are in the answer".into());
    }
    if params.infotext.is_some() {
        note("infotext ignored: send the fields themselves".into());
    }
    if params.disable_extra_networks {
        note("disable_extra_networks ignored: <lora:…> tags in the prompt still apply".into());
    }
    match mode {
        Mode::TextToImage => map_hires(params, &resolved, &mut request, &mut notes)?,
        Mode::ImageToImage | Mode::Inpaint => {
            let Some(first) = params.init_images.as_ref().and_then(|images| images.first()) else {
                return Err(A1111Error::field("init_images", "at least one base64 image is required"));
            };
            if params.init_images.as_ref().is_some_and(|images| images.len() > 1) {
                let msg = "one image at a time on this server (A1111 cycles several over the batch)";
                return Err(A1111Error::field("init_images", msg));
            }
            request.image = Some(first.clone());
            request.strength = Some(params.denoising_strength);
            request.mask = params.mask.clone();
            if params.mask.is_some() && params.inpainting_mask_invert != 0 {
                let msg = "inverted masks are not supported: send the mask with white where to repaint";
                return Err(A1111Error::field("inpainting_mask_invert", msg));
            }
            if params.resize_mode != 0 {
                note(format!("resize_mode {} ignored: the output has the input image's size", params.resize_mode));
            }
            if params.initial_noise_multiplier.is_some_and(|v| v != 1.0) {
                note("initial_noise_multiplier ignored".into());
            }
            if params.include_init_images {
                note("include_init_images ignored: the answer has the generated images only".into());
            }
        }
    }
    Ok(Mapped { request, resolved, notes })
}

fn map_hires(
    params: &Params,
    resolved: &Resolved,
    request: &mut GenerateRequest,
    notes: &mut Vec<String>,
) -> Result<(), A1111Error> {
    if params.firstphase_width > 0 || params.firstphase_height > 0 {
        notes.push("firstphase_width / firstphase_height ignored (A1111's legacy hires fields)".into());
    }
    if !params.enable_hr {
        return Ok(());
    }
    if params.hr_resize_x > 0 || params.hr_resize_y > 0 {
        let msg = "a hires target size is not supported: give hr_scale (the factor) instead";
        return Err(A1111Error::field(if params.hr_resize_x > 0 { "hr_resize_x" } else { "hr_resize_y" }, msg));
    }
    match params.hr_upscaler.as_deref().map(str::trim) {
        None | Some("") | Some("Latent") => {}
        Some(other) => {
            let msg = format!(
                "the hires upscaler {other:?} is not available on this server; it has \"Latent\" (bilinear latent \
                 enlargement)"
            );
            return Err(A1111Error::field("hr_upscaler", msg));
        }
    }
    if params.hr_checkpoint_name.as_deref().is_some_and(|c| !c.is_empty() && c != "Use same checkpoint") {
        notes.push("hr_checkpoint_name ignored: the second pass uses the same model".into());
    }
    // "Use same sampler" / "Use same scheduler" (A1111's choices) or the first pass's own: nothing to ignore.
    let differs = |field: Option<&str>, main: Option<&str>| {
        field.map(str::trim).is_some_and(|f| {
            !f.is_empty() && !f.starts_with("Use same") && !main.is_some_and(|m| m.trim().eq_ignore_ascii_case(f))
        })
    };
    let sampler = params.sampler_name.as_deref().or(Some(resolved.sampler));
    if differs(params.hr_sampler_name.as_deref(), sampler)
        || differs(params.hr_scheduler.as_deref(), params.scheduler.as_deref())
    {
        notes.push("hr_sampler_name / hr_scheduler ignored: the second pass uses the first pass's sampler".into());
    }
    if (!params.hr_prompt.is_empty() && params.hr_prompt != params.prompt)
        || (!params.hr_negative_prompt.is_empty() && params.hr_negative_prompt != params.negative_prompt)
    {
        notes.push("hr_prompt / hr_negative_prompt ignored: the second pass uses the first pass's prompts".into());
    }
    request.hires = Some(crate::request::HiresFix {
        scale: params.hr_scale,
        strength: params.denoising_strength,
        steps: params.hr_second_pass_steps,
    });
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// Generation.

async fn txt2img(state: State<AppState>, headers: HeaderMap, body: Body) -> Result<Response, A1111Error> {
    generate(state, headers, body, false).await
}

async fn img2img(state: State<AppState>, headers: HeaderMap, body: Body) -> Result<Response, A1111Error> {
    generate(state, headers, body, true).await
}

async fn generate(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
    image_mode: bool,
) -> Result<Response, A1111Error> {
    check_key(&state, &headers)?;
    decode::check_content_type(&headers)?;
    let bytes = decode::read_body(body, &headers, state.max_body_bytes, state.body_timeout).await?;
    let params = parse_params(&bytes)?;
    let mode = match (image_mode, params.mask.is_some()) {
        (false, _) => Mode::TextToImage,
        (true, false) => Mode::ImageToImage,
        (true, true) => Mode::Inpaint,
    };
    let Mapped { request, resolved, mut notes } = map_params(&params, mode)?;
    let request = decode::check(request, state.ranges, mode)?;
    if mode != Mode::TextToImage && (params.width, params.height) != (request.img_width, request.img_height) {
        notes.push(format!(
            "width / height {}×{} ignored: the output has the input image's size, {}×{}",
            params.width, params.height, request.img_width, request.img_height
        ));
    }
    for n in &notes {
        tracing::warn!("A1111 request: {n}");
    }
    let ticket = state.queue.submit(request.clone()).map_err(ApiError::from)?;
    let outcome = ticket.outcome().await;
    state.metrics.record_outcome(&outcome);
    let answer = Answer { params, request, resolved, notes, model: state.model_name.clone(), image_mode };
    match outcome {
        Outcome::Done(finished) => {
            let body = tokio::task::spawn_blocking(move || answer.body(&finished.images, Some(finished.seed)))
                .await
                .map_err(|e| {
                A1111Error::http(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding failed: {e}"))
            })??;
            Ok(json_response(body))
        }
        // `POST /sdapi/v1/interrupt`: A1111 answers 200 with what it has; the engine stops without an image.
        Outcome::Failed(Error::Cancelled) => Ok(json_response(answer.body(&[], None)?)),
        Outcome::Failed(error) => {
            tracing::warn!(%error, "generation failed");
            Err(ApiError::from_generation(&error).into())
        }
        Outcome::Panicked(message) => {
            tracing::error!(%message, "generation panicked");
            Err(A1111Error::http(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("generation failed: internal error ({message})"),
            ))
        }
        Outcome::ShuttingDown => Err(ApiError::shutting_down().into()),
    }
}

fn json_response(body: Value) -> Response {
    ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body.to_string()).into_response()
}

/// What an answer is made of.
struct Answer {
    params: Params,
    /// The engine's request, as checked (its size is the output's).
    request: GenerateRequest,
    resolved: Resolved,
    notes: Vec<String>,
    model: Arc<str>,
    image_mode: bool,
}

impl Answer {
    /// A1111's infotext for image `index` of `count`: the engine's, with A1111's sampler and schedule names.
    fn infotext(&self, seed: u64, index: usize, count: usize) -> String {
        let mut shown = self.request.clone();
        shown.scheduler = self.resolved.sampler.to_string();
        shown.image = None;
        shown.mask = None;
        let mut text = crate::output::a1111_parameters(&shown, seed, &self.model, &[]);
        if self.image_mode {
            text.push_str(&format!(", Denoising strength: {}", self.params.denoising_strength));
        }
        let settings_start = text.rfind("\nSteps: ").map_or(0, |i| i + 1);
        let (head, settings) = text.split_at(settings_start);
        let mut settings = settings.to_string();
        if let Some(label) = self.resolved.schedule {
            let sampler = format!("Sampler: {}, ", self.resolved.sampler);
            settings = settings.replacen(&sampler, &format!("{sampler}Schedule type: {label}, "), 1);
        }
        if count > 1 {
            settings.push_str(&format!(", Batch size: {count}, Batch pos: {index}"));
        }
        format!("{head}{settings}")
    }

    /// The answer's JSON: the images (PNG with the infotext), the request with its defaults, and `info`. `seed`:
    /// `None` when interrupted before any image.
    fn body(&self, images: &[image::RgbImage], seed: Option<u64>) -> Result<Value, A1111Error> {
        let count = images.len();
        let infotexts: Vec<String> = match seed {
            Some(seed) => (0..count).map(|i| self.infotext(seed, i, count)).collect(),
            None => Vec::new(),
        };
        let encoded = if self.params.send_images {
            images
                .iter()
                .zip(&infotexts)
                .map(|(image, text)| {
                    crate::output::png_bytes(image, text)
                        .map(|png| base64::engine::general_purpose::STANDARD.encode(png))
                        .map_err(|e| A1111Error::http(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()?
        } else {
            Vec::new()
        };
        let mut parameters = serde_json::to_value(&self.params).unwrap_or_else(|_| json!({}));
        if let Value::Object(map) = &mut parameters {
            let other = if self.image_mode { TXT2IMG_ONLY } else { IMG2IMG_ONLY };
            for key in other {
                map.remove(*key);
            }
            // As A1111: the input images are not sent back.
            if self.image_mode {
                map.insert("init_images".into(), Value::Null);
                map.insert("mask".into(), Value::Null);
            }
        }
        // Every image comes from one batch drawn from `seed` (image i is the batch's i-th), so that seed is every
        // image's seed: A1111 gives each image its own consecutive seed instead.
        let seed_value = seed.map_or(Value::from(self.params.seed), Value::from);
        let all_seeds: Vec<Value> = vec![seed_value.clone(); count];
        let mut extra = Map::new();
        if let Some(label) = self.resolved.schedule {
            extra.insert("Schedule type".into(), label.into());
        }
        let info = json!({
            "prompt": self.params.prompt,
            "all_prompts": vec![&self.params.prompt; count],
            "negative_prompt": self.params.negative_prompt,
            "all_negative_prompts": vec![&self.params.negative_prompt; count],
            "seed": seed_value,
            "all_seeds": all_seeds,
            "subseed": -1,
            "all_subseeds": vec![-1; count],
            "subseed_strength": 0,
            "width": self.request.img_width,
            "height": self.request.img_height,
            "sampler_name": self.resolved.sampler,
            "cfg_scale": self.request.guidance_scale,
            "steps": self.request.num_inference_steps,
            "batch_size": self.request.samples,
            "restore_faces": false,
            "face_restoration_model": null,
            "sd_model_name": &*self.model,
            "sd_model_hash": null,
            "sd_vae_name": null,
            "sd_vae_hash": null,
            "seed_resize_from_w": -1,
            "seed_resize_from_h": -1,
            "denoising_strength": if self.image_mode || self.params.enable_hr {
                Value::from(self.params.denoising_strength)
            } else {
                Value::Null
            },
            "extra_generation_params": extra,
            "index_of_first_image": 0,
            "infotexts": infotexts,
            "styles": self.params.styles,
            "job_timestamp": job_timestamp(),
            "clip_skip": 1,
            "is_using_inpainting_conditioning": false,
            "version": concat!("dreamshaper ", env!("CARGO_PKG_VERSION")),
            "interrupted": seed.is_none(),
            "comments": self.notes.iter().map(|n| format!("{n}\n")).collect::<String>(),
        });
        Ok(json!({"images": encoded, "parameters": parameters, "info": info.to_string()}))
    }
}

/// A1111's `job_timestamp`: `YYYYmmddHHMMSS`, UTC.
fn job_timestamp() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}{month:02}{day:02}{:02}{:02}{:02}", rest / 3600, rest / 60 % 60, rest % 60)
}

// ---------------------------------------------------------------------------------------------------------------
// Progress and interrupt.

/// `GET /sdapi/v1/progress[?skip_current_image=true]`: the running job's progress (A1111's `ProgressResponse`);
/// `current_image` is the latest preview (the engine's fast latent→RGB decode), and each call asks for a fresh one
/// at the next model evaluation.
async fn progress(State(state): State<AppState>, headers: HeaderMap, uri: Uri) -> Result<Response, A1111Error> {
    check_key(&state, &headers)?;
    let skip_image = uri.query().unwrap_or("").split('&').any(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        key == "skip_current_image" && matches!(value.to_ascii_lowercase().as_str(), "true" | "1" | "yes" | "on")
    });
    let Some(job) = state.queue.running_progress() else {
        return Ok(json_response(json!({
            "progress": 0.0, "eta_relative": 0.0, "state": progress_state(None), "current_image": null,
            "textinfo": null,
        })));
    };
    let snapshot = job.snapshot();
    let current_image = match (&snapshot.preview, skip_image) {
        (Some((image, _)), false) => {
            let image = image.clone();
            let png = tokio::task::spawn_blocking(move || {
                let mut bytes = Vec::new();
                image::DynamicImage::ImageRgb8((*image).clone())
                    .write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
                    .map(|_| bytes)
            })
            .await;
            match png {
                Ok(Ok(bytes)) => Value::from(base64::engine::general_purpose::STANDARD.encode(bytes)),
                _ => Value::Null,
            }
        }
        _ => Value::Null,
    };
    if !skip_image {
        job.request_preview();
    }
    Ok(json_response(json!({
        "progress": snapshot.fraction(),
        "eta_relative": snapshot.eta_seconds.unwrap_or(0.0),
        "state": progress_state(Some(&snapshot)),
        "current_image": current_image,
        "textinfo": if snapshot.stage.is_empty() { Value::Null } else { Value::from(snapshot.stage) },
    })))
}

/// A1111's `shared.state.dict()`.
fn progress_state(snapshot: Option<&crate::server::queue::ProgressSnapshot>) -> Value {
    json!({
        "skipped": false,
        "interrupted": false,
        "stopping_generation": false,
        "job": snapshot.map_or("", |s| s.stage),
        "job_count": usize::from(snapshot.is_some()),
        "job_timestamp": if snapshot.is_some() { Value::from(job_timestamp()) } else { Value::from("0") },
        "job_no": 0,
        "sampling_step": snapshot.map_or(0, |s| s.step),
        "sampling_steps": snapshot.map_or(0, |s| s.steps),
    })
}

/// `POST /sdapi/v1/interrupt`: stops the running job at its next checkpoint; its client gets 200 without images.
async fn interrupt(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, A1111Error> {
    check_key(&state, &headers)?;
    state.queue.interrupt_running();
    Ok(json_response(json!({})))
}

// ---------------------------------------------------------------------------------------------------------------
// Lists and settings.

async fn samplers(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, A1111Error> {
    check_key(&state, &headers)?;
    let list: Vec<Value> = SAMPLERS
        .iter()
        .map(|s| {
            let mut options = Map::new();
            if s.automatic_karras {
                options.insert("scheduler".into(), "karras".into());
            }
            if s.timestep {
                options.insert("timestep".into(), Value::from(true));
            }
            let scheduler = if s.automatic_karras { s.karras } else { s.plain };
            options.insert("dreamshaper_scheduler".into(), scheduler.into());
            json!({"name": s.name, "aliases": s.aliases, "options": options})
        })
        .collect();
    Ok(json_response(Value::from(list)))
}

async fn schedulers(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, A1111Error> {
    check_key(&state, &headers)?;
    let list: Vec<Value> = SCHEDULES
        .iter()
        .filter(|s| s.3)
        .map(|&(name, label, aliases, _)| {
            let aliases = if aliases.is_empty() { Value::Null } else { Value::from(aliases) };
            let rho = if name == "karras" { Value::from(7.0) } else { Value::Null };
            json!({"name": name, "label": label, "aliases": aliases, "default_rho": rho, "need_inner_model": false})
        })
        .collect();
    Ok(json_response(Value::from(list)))
}

async fn sd_models(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, A1111Error> {
    check_key(&state, &headers)?;
    let name = &*state.model_name;
    Ok(json_response(json!([{
        "title": name, "model_name": name, "hash": null, "sha256": null, "filename": name, "config": null,
    }])))
}

/// The settings A1111 clients read; fixed on this server.
fn options(state: &AppState) -> Value {
    json!({
        "sd_model_checkpoint": &*state.model_name,
        "sd_checkpoint_hash": null,
        "sd_vae": "Automatic",
        "samples_format": "png",
        "CLIP_stop_at_last_layers": 1,
        "eta_ddim": 0.0,
        "eta_ancestral": 1.0,
        "live_previews_enable": true,
        "show_progress_every_n_steps": 1,
        "emphasis": "Original",
        "sd_lora": "None",
    })
}

async fn get_options(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, A1111Error> {
    check_key(&state, &headers)?;
    Ok(json_response(options(&state)))
}

/// `POST /sdapi/v1/options`: accepted and ignored (the settings are fixed), with a warning naming the keys; a
/// checkpoint other than the served model is refused, as A1111 refuses one it does not have.
async fn set_options(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Result<Response, A1111Error> {
    check_key(&state, &headers)?;
    let bytes = decode::read_body(body, &headers, state.max_body_bytes, state.body_timeout).await?;
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|e| A1111Error::Invalid { loc: vec!["body".into()], msg: format!("JSON decode error: {e}") })?;
    let Value::Object(fields) = value else {
        return Err(A1111Error::Invalid { loc: vec!["body".into()], msg: "Input should be a valid dictionary".into() });
    };
    if let Some(checkpoint) = fields.get("sd_model_checkpoint").and_then(Value::as_str) {
        let served = &*state.model_name;
        let stem = checkpoint.split(" [").next().unwrap_or(checkpoint).trim();
        let stem = stem.trim_end_matches(".safetensors").trim_end_matches(".ckpt");
        if stem != served && checkpoint != served {
            return Err(A1111Error::Http {
                status: StatusCode::NOT_FOUND,
                error: "RuntimeError",
                detail: format!("model {checkpoint:?} not found: this server serves {served:?} only"),
                retry_after: None,
            });
        }
    }
    if !fields.is_empty() {
        let keys: Vec<&String> = fields.keys().collect();
        tracing::warn!("A1111 POST /sdapi/v1/options ignored {keys:?}: this server's settings are fixed");
    }
    Ok(json_response(Value::Null))
}

/// `GET /sdapi/v1/loras`: the LoRAs in `--lora-dir` (names relative to it, never file-system paths).
async fn loras(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, A1111Error> {
    check_key(&state, &headers)?;
    let names = match &state.lora_dir {
        Some(dir) => {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || crate::adapters::requested::available_in_dir(&dir))
                .await
                .unwrap_or_default()
        }
        None => Vec::new(),
    };
    let list: Vec<Value> = names
        .iter()
        .map(|name| {
            let alias = name.rsplit('/').next().unwrap_or(name);
            json!({"name": name, "alias": alias, "path": format!("{name}.safetensors"), "metadata": {}})
        })
        .collect();
    Ok(json_response(Value::from(list)))
}

/// `GET /sdapi/v1/scripts`: none (clients such as webuiapi look for extensions here).
async fn scripts(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, A1111Error> {
    check_key(&state, &headers)?;
    Ok(json_response(json!({"txt2img": [], "img2img": []})))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(sampler: &str, scheduler: Option<&str>) -> Result<Resolved, (&'static str, String)> {
        resolve_sampler(Some(sampler), None, scheduler)
    }

    #[test]
    fn a1111_names_map_to_the_engines_schedulers() {
        // (sampler, schedule type) → (scheduler, timestep spacing, schedule type reported)
        type Case = (&'static str, Option<&'static str>, &'static str, Option<&'static str>, Option<&'static str>);
        let cases: &[Case] = &[
            ("DPM++ 2M", None, "DPM++ 2M Karras", None, Some("Karras")),
            ("DPM++ 2M", Some("Karras"), "DPM++ 2M Karras", None, Some("Karras")),
            ("DPM++ 2M", Some("karras"), "DPM++ 2M Karras", None, Some("Karras")),
            ("DPM++ 2M Karras", None, "DPM++ 2M Karras", None, Some("Karras")),
            ("dpm++ 2m karras", None, "DPM++ 2M Karras", None, Some("Karras")),
            ("DPM++ 2M", Some("Normal"), "DPM Multi", Some("linspace"), Some("Normal")),
            ("DPM++ 2M", Some("sgm_uniform"), "DPM Multi", Some("trailing"), Some("SGM Uniform")),
            ("Euler a", None, "Euler a", None, None),
            ("Euler a", Some("automatic"), "Euler a", None, None),
            ("k_euler_a", None, "Euler a", None, None),
            ("Euler", Some("Simple"), "Euler", Some("trailing"), Some("Simple")),
            ("Euler", Some("Uniform"), "Euler", Some("linspace"), Some("Uniform")),
            ("DPM++ SDE Karras", None, "DPM++ SDE Karras", None, Some("Karras")),
            ("DPM++ SDE", Some("Normal"), "DPM++ SDE", Some("linspace"), Some("Normal")),
            ("DPM++ 2M SDE", None, "DPM++ 2M SDE Karras", None, Some("Karras")),
            ("DPM++ 3M SDE", Some("Karras"), "DPM++ 3M SDE Karras", None, Some("Karras")),
            ("DPM2 a Karras", None, "DPM2 a Karras", None, Some("Karras")),
            ("DPM2", None, "DPM2 Karras", None, Some("Karras")),
            ("LMS", None, "LMS", None, None),
            ("Heun", Some("SGM Uniform"), "Heun", Some("trailing"), Some("SGM Uniform")),
            ("DDIM", None, "DDIM", None, None),
            ("PLMS", None, "PNDM", None, None),
            ("UniPC", None, "UniPC", None, None),
            ("LCM", None, "LCM", None, None),
            // The engine's own names.
            ("DEIS", None, "DEIS", None, None),
            ("UniPCMultistepScheduler", None, "UniPC", None, None),
        ];
        for &(sampler, schedule, scheduler, spacing, label) in cases {
            let r = resolve(sampler, schedule).unwrap_or_else(|e| panic!("{sampler} {schedule:?}: {e:?}"));
            assert_eq!(r.scheduler, scheduler, "{sampler} {schedule:?}");
            assert_eq!(r.options.get("timestep_spacing").and_then(Value::as_str), spacing, "{sampler} {schedule:?}");
            assert_eq!(r.schedule, label, "{sampler} {schedule:?}");
        }
        // The API's default: `sampler_index` "Euler"; `sampler_name` wins over it.
        assert_eq!(resolve_sampler(None, Some("Euler"), None).unwrap().scheduler, "Euler");
        assert_eq!(resolve_sampler(Some("DDIM"), Some("Euler"), None).unwrap().scheduler, "DDIM");
        assert_eq!(resolve_sampler(Some(""), Some("Heun"), None).unwrap().scheduler, "Heun");
        // A timestep sampler ignores the schedule type, as A1111 does, and says so.
        let r = resolve("UniPC", Some("Karras")).unwrap();
        assert_eq!((r.scheduler, r.ignored_schedule.as_deref()), ("UniPC", Some("Karras")));
    }

    #[test]
    fn unknown_and_unavailable_names_are_422_naming_the_field() {
        let (field, m) = resolve("Nope", None).unwrap_err();
        assert_eq!(field, "sampler_name");
        assert!(m.contains("unknown sampler") && m.contains("DPM++ 2M"), "{m}");
        let (field, m) = resolve("DPM fast", None).unwrap_err();
        assert_eq!(field, "sampler_name");
        assert!(m.contains("not available"), "{m}");
        let (field, m) = resolve_sampler(None, Some("Restart"), None).unwrap_err();
        assert_eq!(field, "sampler_index");
        assert!(m.contains("not available"), "{m}");
        let (field, m) = resolve("Euler", Some("Exponential")).unwrap_err();
        assert_eq!(field, "scheduler");
        assert!(m.contains("Exponential") && m.contains("Karras"), "{m}");
        let (field, m) = resolve("Euler", Some("Karras")).unwrap_err();
        assert_eq!(field, "scheduler");
        assert!(m.contains("Karras with Euler") || m.contains("Karras"), "{m}");
        let (field, _) = resolve("DPM2", Some("Normal")).unwrap_err();
        assert_eq!(field, "scheduler");
        let (field, m) = resolve("Euler", Some("whatever")).unwrap_err();
        assert_eq!(field, "scheduler");
        assert!(m.contains("unknown schedule type"), "{m}");
        let (field, _) = resolve("DEIS", Some("Karras")).unwrap_err();
        assert_eq!(field, "scheduler");
    }

    /// Every mapping builds on a real scheduler config (the tiny model's, a DEIS config like Dreamshaper's).
    #[test]
    fn every_mapping_builds() {
        let text = include_str!("../../../models/tiny-sdxl/scheduler/scheduler_config.json");
        let config = crate::schedulers::SchedulerConfig::from_json(text).unwrap();
        for sampler in SAMPLERS {
            for &(name, _, _, supported) in SCHEDULES {
                let Ok(r) = resolve(sampler.name, Some(name)) else {
                    continue;
                };
                // Only timestep samplers accept (and ignore) the schedule types this server does not have.
                assert!(supported || r.ignored_schedule.is_some(), "{} {name}", sampler.name);
                let kind = crate::schedulers::lookup(r.scheduler).unwrap();
                let built = kind.configure(&config, &r.options).and_then(|c| kind.build(&c, 8));
                assert!(built.is_ok(), "{} {name}: {:?}", sampler.name, built.err());
            }
        }
    }

    #[test]
    fn params_take_a1111_defaults_and_nulls() {
        let p = parse_params(br#"{"prompt": "a cat", "scheduler": null, "steps": null, "styles": []}"#).unwrap();
        assert_eq!((p.steps, p.cfg_scale, p.width, p.height, p.seed), (50, 7.0, 512, 512, -1));
        assert_eq!((p.sampler_index.as_str(), p.batch_size, p.n_iter, p.denoising_strength), ("Euler", 1, 1, 0.75));
        let e = parse_params(br#"{"prompt": "a cat", "steps": "many"}"#).unwrap_err();
        match e {
            A1111Error::Invalid { loc, .. } => assert_eq!(loc, vec![Value::from("body"), Value::from("steps")]),
            other => panic!("{other:?}"),
        }
        assert!(matches!(parse_params(b"[1]"), Err(A1111Error::Invalid { .. })));
        assert!(matches!(parse_params(b"{"), Err(A1111Error::Invalid { .. })));
    }

    #[test]
    fn mapping_fields_and_batches() {
        let mut p = Params { prompt: "a cat".into(), batch_size: 2, n_iter: 2, steps: 3, ..Params::default() };
        p.sampler_name = Some("DPM++ 2M".into());
        p.scheduler = Some("Karras".into());
        p.cfg_scale = 5.0;
        p.seed = 7;
        let m = map_params(&p, Mode::TextToImage).unwrap();
        let r = &m.request;
        assert_eq!((r.samples, r.num_inference_steps, r.guidance_scale, r.seed), (4, 3, 5.0, 7));
        assert_eq!((r.img_width, r.img_height, r.scheduler.as_str()), (512, 512, "DPM++ 2M Karras"));
        assert!(r.hires.is_none() && r.image.is_none() && m.notes.is_empty());
        p.n_iter = 3;
        assert!(
            matches!(map_params(&p, Mode::TextToImage), Err(A1111Error::Invalid { loc, .. }) if loc[1] == "n_iter")
        );
        p.n_iter = 1;
        p.batch_size = 0;
        assert!(
            matches!(map_params(&p, Mode::TextToImage), Err(A1111Error::Invalid { loc, .. }) if loc[1] == "batch_size")
        );
        p.batch_size = 1;
        // Hires fix.
        p.enable_hr = true;
        p.hr_scale = 1.5;
        p.denoising_strength = 0.6;
        p.hr_upscaler = Some("Latent".into());
        let hires = map_params(&p, Mode::TextToImage).unwrap().request.hires.unwrap();
        assert_eq!((hires.scale, hires.strength, hires.steps), (1.5, 0.6, 0));
        p.hr_upscaler = Some("R-ESRGAN 4x+".into());
        assert!(
            matches!(map_params(&p, Mode::TextToImage), Err(A1111Error::Invalid { loc, .. }) if loc[1] == "hr_upscaler")
        );
        p.hr_upscaler = None;
        // Ignored fields are noted.
        p.override_settings.insert("CLIP_stop_at_last_layers".into(), 2.into());
        p.restore_faces = Some(true);
        let notes = map_params(&p, Mode::TextToImage).unwrap().notes;
        assert!(notes.iter().any(|n| n.contains("override_settings")), "{notes:?}");
        assert!(notes.iter().any(|n| n.contains("restore_faces")), "{notes:?}");
        // img2img: the first init image, denoising strength; a mask makes it inpainting.
        let mut p = Params { prompt: "x".into(), ..Params::default() };
        assert!(
            matches!(map_params(&p, Mode::ImageToImage), Err(A1111Error::Invalid { loc, .. }) if loc[1] == "init_images")
        );
        p.init_images = Some(vec!["abc".into()]);
        let r = map_params(&p, Mode::ImageToImage).unwrap().request;
        assert_eq!((r.image.as_deref(), r.strength), (Some("abc"), Some(0.75)));
        p.script_name = Some("X/Y/Z plot".into());
        assert!(
            matches!(map_params(&p, Mode::ImageToImage), Err(A1111Error::Invalid { loc, .. }) if loc[1] == "script_name")
        );
    }

    #[test]
    fn job_timestamps_are_a1111s_format() {
        let t = job_timestamp();
        assert_eq!(t.len(), 14, "{t}");
        assert!(t.starts_with("20"), "{t}");
    }
}
