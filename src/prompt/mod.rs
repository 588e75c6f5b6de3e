//! Prompt syntax: how a prompt's text becomes what the text encoders see.
//!
//! [`PromptSyntax::A1111`] (the default) reads prompts as AUTOMATIC1111's webui does, with its default settings:
//! emphasis weights `(a:1.2)` `(a)` `[a]`, prompt editing `[a:b:0.5]`, alternation `[a|b]`, `BREAK`, and prompts of
//! any length in 75-token chunks. [`PromptSyntax::None`] is diffusers' reading: the literal text, cut to 77 tokens.
//!
//! One idea per file: [`schedule`](mod@schedule) (editing and alternation → text per step), [`attention`]
//! (emphasis → weighted fragments), [`chunks`] (tokens → 77-token chunks), [`emphasis`] (weights applied to hidden
//! states), [`reading`] (a whole prompt read, before any model runs), [`encode`] (a reading through both text
//! encoders), [`explain`] (a reading, printed).

pub mod attention;
pub mod chars;
pub mod chunks;
pub mod emphasis;
pub mod encode;
pub mod explain;
pub mod reading;
pub mod schedule;

use serde::{Deserialize, Serialize};

pub use attention::{parse_attention, Fragment};
pub use emphasis::Emphasis;
pub use reading::PromptReading;
pub use schedule::{schedule, schedule_distinct, DistinctSchedule, Schedule, ScheduledText};

/// The most characters (Unicode scalar values) a `prompt` or `negative_prompt` may have, whatever its syntax:
/// checked before anything runs ([`crate::GenerateRequest::validate_prompts`]). An A1111 prompt of a few thousand
/// characters is far inside it; a megabyte of text is refused before it is read.
pub const MAX_PROMPT_CHARS: usize = 20_000;

/// The most 75-token chunks each text of an A1111 prompt may take (for either tokenizer): 1,800 tokens, some 7,000
/// characters of ordinary prose. Checked when the prompt is read, before any text encoder runs.
pub const MAX_PROMPT_CHUNKS: usize = 24;

/// The most distinct texts an A1111 prompt may read as over a generation's steps (each one is encoded: prompt
/// editing `[a:b:N]` and alternation `[a|b]` make them). Checked when the prompt is read, before the texts are
/// tokenized; with [`MAX_PROMPT_CHUNKS`] it bounds the text encoders' work to 16 × 24 chunks per prompt.
pub const MAX_SCHEDULE_TEXTS: usize = 16;

/// How prompt text is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptSyntax {
    /// AUTOMATIC1111's syntax and long prompts.
    #[default]
    A1111,
    /// diffusers: literal text, truncated to 77 tokens (with a warning saying how much was cut).
    None,
}
