//! Prompt conditioning: text → the UNet's cross-attention context and pooled embedding, per denoising step.
//!
//! [`TextEncoders::condition`] is diffusers' `StableDiffusionXLPipeline.encode_prompt`; [`TextEncoders::condition_prompts`]
//! reads the prompts with the request's [`PromptSyntax`] (A1111's by default, see [`crate::prompt`]) and gives the
//! loop a [`ConditioningSchedule`].

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use crate::prompt::encode::encode_reading;
pub use crate::prompt::encode::{PromptEmbedding, TextEncoders};
use crate::prompt::schedule::entry_at;
use crate::prompt::{Emphasis, PromptReading, PromptSyntax};
use crate::sampling::ProgressFn;
use crate::Result;

/// One UNet batch's text inputs, for the whole batch: with classifier-free guidance the first half of the rows is the
/// negative prompt and the second half the prompt (diffusers' order).
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// (batch, tokens, width)
    pub context: Tensor,
    /// (batch, projection)
    pub pooled: Tensor,
    /// Whether the rows come in (negative, positive) halves.
    pub guided: bool,
}

impl TextEncoders {
    /// diffusers' `encode_prompt` for `samples` images per prompt. The negative prompt is all zeros when it is
    /// empty and the model's `force_zeros_for_empty_prompt` is set (the hosted API's `""` means "none").
    pub fn condition(
        &self,
        prompt: &str,
        negative_prompt: &str,
        force_zeros_for_empty_prompt: bool,
        samples: usize,
        guided: bool,
        device: &Device,
    ) -> Result<Conditioning> {
        let positive = self.encode(prompt, device)?;
        let repeat = |e: &PromptEmbedding| -> Result<PromptEmbedding> {
            Ok(PromptEmbedding { context: e.context.repeat((samples, 1, 1))?, pooled: e.pooled.repeat((samples, 1))? })
        };
        let positive = repeat(&positive)?;
        if !guided {
            return Ok(Conditioning { context: positive.context, pooled: positive.pooled, guided });
        }
        let negative = if negative_prompt.is_empty() && force_zeros_for_empty_prompt {
            PromptEmbedding { context: positive.context.zeros_like()?, pooled: positive.pooled.zeros_like()? }
        } else {
            repeat(&self.encode(negative_prompt, device)?)?
        };
        Ok(Conditioning {
            context: Tensor::cat(&[negative.context, positive.context], 0)?,
            pooled: Tensor::cat(&[negative.pooled, positive.pooled], 0)?,
            guided,
        })
    }
}

/// The text inputs of the UNet at one denoising step.
#[derive(Debug, Clone)]
pub enum StepConditioning {
    /// One UNet batch (always with diffusers' reading; with A1111's when prompt and negative prompt have the same
    /// number of chunks).
    Batched(Conditioning),
    /// Guidance with a prompt and negative prompt of different token counts: two UNet batches, as A1111 runs them
    /// (its default does not pad one to the other's length).
    Split { negative: PromptEmbedding, positive: PromptEmbedding },
}

/// What the denoising loop is conditioned on at each model evaluation: constant, or changing with A1111's prompt
/// editing and alternation. Each distinct conditioning is stored once.
#[derive(Debug, Clone)]
pub struct ConditioningSchedule {
    conditionings: Vec<StepConditioning>,
    /// (last 0-based evaluation index, index into `conditionings`), ascending; the last entry also covers every later
    /// evaluation.
    entries: Vec<(usize, usize)>,
    /// Whether the rows come in (negative, positive) halves.
    pub guided: bool,
    /// What the user should know about how the prompts were read (truncation with diffusers' reading).
    pub warnings: Vec<String>,
}

impl From<Conditioning> for ConditioningSchedule {
    fn from(conditioning: Conditioning) -> Self {
        let guided = conditioning.guided;
        Self {
            conditionings: vec![StepConditioning::Batched(conditioning)],
            entries: vec![(usize::MAX, 0)],
            guided,
            warnings: Vec::new(),
        }
    }
}

impl ConditioningSchedule {
    /// The conditioning of 0-based model evaluation `index`.
    pub fn at(&self, index: usize) -> &StepConditioning {
        &self.conditionings[self.entries[entry_at(&self.entries, |e| e.0, index)].1]
    }

    /// (last 0-based evaluation index, conditioning) in order; consecutive entries differ.
    pub fn entries(&self) -> impl Iterator<Item = (usize, &StepConditioning)> {
        self.entries.iter().map(|&(until, i)| (until, &self.conditionings[i]))
    }

    /// How many distinct conditionings there are.
    pub fn distinct(&self) -> usize {
        self.conditionings.len()
    }
}

/// A request's prompts and how to read them.
#[derive(Debug, Clone, Copy)]
pub struct PromptInputs<'a> {
    pub prompt: &'a str,
    pub negative_prompt: &'a str,
    pub syntax: PromptSyntax,
    pub emphasis: Emphasis,
    /// The model's `force_zeros_for_empty_prompt`: an empty negative prompt gives zero embeddings.
    pub force_zeros_for_empty_prompt: bool,
    /// Images per prompt.
    pub samples: usize,
    /// Classifier-free guidance (the negative prompt is encoded only then).
    pub guided: bool,
    /// Model evaluations of the denoising loop: A1111's prompt-editing steps count these.
    pub evaluations: usize,
}

impl TextEncoders {
    /// The loop's conditioning for a request's prompts, read with `inputs.syntax`. A1111 prompts are held to
    /// [`crate::prompt::MAX_SCHEDULE_TEXTS`] and [`crate::prompt::MAX_PROMPT_CHUNKS`] (both prompts are read and
    /// checked before either is encoded), and their encoding reports to `progress` after every batch of chunks,
    /// stopping with [`crate::Error::Cancelled`] when it answers stop.
    pub fn condition_prompts(
        &self,
        inputs: &PromptInputs,
        device: &Device,
        progress: &mut ProgressFn,
    ) -> Result<ConditioningSchedule> {
        match inputs.syntax {
            PromptSyntax::None => {
                let mut schedule: ConditioningSchedule = self
                    .condition(
                        inputs.prompt,
                        inputs.negative_prompt,
                        inputs.force_zeros_for_empty_prompt,
                        inputs.samples,
                        inputs.guided,
                        device,
                    )?
                    .into();
                schedule.warnings.extend(self.truncation_warning("prompt", inputs.prompt)?);
                if inputs.guided {
                    schedule.warnings.extend(self.truncation_warning("negative prompt", inputs.negative_prompt)?);
                }
                Ok(schedule)
            }
            PromptSyntax::A1111 => self.schedule_a1111(inputs, device, progress),
        }
    }

    /// diffusers' truncation, said: how many tokens of `text` CLIP does not see.
    fn truncation_warning(&self, what: &str, text: &str) -> Result<Option<String>> {
        let tokens = self.tokenizer.encode_tokens(text)?.len().max(self.tokenizer_2.encode_tokens(text)?.len());
        let kept = self.tokenizer.max_length() - 2;
        Ok((tokens > kept).then(|| {
            format!(
                "the {what} is {tokens} tokens long; CLIP reads the first {kept}, the last {} are ignored \
                 (the a1111 prompt syntax reads long prompts in chunks)",
                tokens - kept
            )
        }))
    }

    /// A1111: each prompt's schedule, its distinct texts encoded once, combined per evaluation.
    fn schedule_a1111(
        &self,
        inputs: &PromptInputs,
        device: &Device,
        progress: &mut ProgressFn,
    ) -> Result<ConditioningSchedule> {
        let tokenizers = [&self.tokenizer, &self.tokenizer_2];
        let positive = PromptReading::limited(inputs.prompt, inputs.evaluations, tokenizers, "prompt")?;
        let negative = match inputs.guided {
            true => {
                Some(PromptReading::limited(inputs.negative_prompt, inputs.evaluations, tokenizers, "negative_prompt")?)
            }
            false => None,
        };
        let positive_embeddings = self.encode_a1111(&positive, inputs, device, progress)?;
        let negative = if let Some(reading) = negative {
            let embeddings = if reading.is_empty() && inputs.force_zeros_for_empty_prompt {
                // Zeros shaped like the encoding of "": one chunk.
                let like = &positive_embeddings[0];
                let (samples, _, width) = like.context.dims3()?;
                let context = Tensor::zeros((samples, CLIP_TOKENS, width), like.context.dtype(), device)?;
                vec![PromptEmbedding { context, pooled: like.pooled.zeros_like()? }; reading.texts.len()]
            } else {
                self.encode_a1111(&reading, inputs, device, progress)?
            };
            Some((reading, embeddings))
        } else {
            None
        };

        // Every evaluation index where either prompt may change; between two, both are constant.
        let last = inputs.evaluations.max(1) - 1;
        let readings = std::iter::once(&positive).chain(negative.as_ref().map(|(r, _)| r));
        let mut bounds: Vec<usize> = readings.flat_map(|r| r.entries.iter().map(|e| e.0.min(last))).collect();
        bounds.sort_unstable();
        bounds.dedup();

        let mut schedule = ConditioningSchedule {
            conditionings: Vec::new(),
            entries: Vec::new(),
            guided: inputs.guided,
            warnings: Vec::new(),
        };
        let mut known: HashMap<(usize, Option<usize>), usize> = HashMap::new();
        for until in bounds {
            let key = (positive.text_at(until), negative.as_ref().map(|(r, _)| r.text_at(until)));
            let index = match known.get(&key) {
                Some(&i) => i,
                None => {
                    let positive = positive_embeddings[key.0].clone();
                    let negative = negative.as_ref().zip(key.1).map(|((_, embeddings), n)| embeddings[n].clone());
                    schedule.conditionings.push(step_conditioning(positive, negative)?);
                    known.insert(key, schedule.conditionings.len() - 1);
                    schedule.conditionings.len() - 1
                }
            };
            match schedule.entries.last_mut() {
                Some(previous) if previous.1 == index => previous.0 = until,
                _ => schedule.entries.push((until, index)),
            }
        }
        if let Some(final_entry) = schedule.entries.last_mut() {
            final_entry.0 = usize::MAX;
        }
        Ok(schedule)
    }

    /// A reading's embeddings, one per distinct text, repeated for the request's samples.
    fn encode_a1111(
        &self,
        reading: &PromptReading,
        inputs: &PromptInputs,
        device: &Device,
        progress: &mut ProgressFn,
    ) -> Result<Vec<PromptEmbedding>> {
        encode_reading(reading, self, inputs.emphasis, device, progress)?
            .into_iter()
            .map(|e| {
                Ok(PromptEmbedding {
                    context: e.context.repeat((inputs.samples, 1, 1))?,
                    pooled: e.pooled.repeat((inputs.samples, 1))?,
                })
            })
            .collect()
    }
}

/// One evaluation's UNet inputs: the prompt alone, or with the negative prompt in one batch (same length) or two.
fn step_conditioning(positive: PromptEmbedding, negative: Option<PromptEmbedding>) -> Result<StepConditioning> {
    Ok(match negative {
        None => StepConditioning::Batched(Conditioning {
            context: positive.context,
            pooled: positive.pooled,
            guided: false,
        }),
        Some(negative) if negative.context.dim(1)? == positive.context.dim(1)? => {
            StepConditioning::Batched(Conditioning {
                context: Tensor::cat(&[negative.context, positive.context], 0)?,
                pooled: Tensor::cat(&[negative.pooled, positive.pooled], 0)?,
                guided: true,
            })
        }
        Some(negative) => StepConditioning::Split { negative, positive },
    })
}

/// CLIP's sequence length: one chunk.
const CLIP_TOKENS: usize = 77;
