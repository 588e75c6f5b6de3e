//! Prompts through SDXL's two text encoders: [`TextEncoders::encode`] is diffusers' reading of one prompt, and
//! [`encode_reading`] encodes a prompt read A1111's way: every chunk through both text encoders (the penultimate
//! layer, as SDXL uses), emphasis per encoder and chunk index over all the prompt's texts at once, chunks
//! concatenated along the sequence, the pooled embedding from the first chunk of the second encoder.

use candle_core::{Device, Tensor};

use super::chunks::{encoder_ids, ChunkTokens, CHUNK_TOKENS};
use super::emphasis::{self, Emphasis};
use super::reading::PromptReading;
use crate::models::clip::ClipTextModel;
use crate::sampling::{report, Progress, ProgressFn};
use crate::tokenizer::ClipTokenizer;
use crate::{Error, Result};

/// The two SDXL text encoders with their tokenizers (CLIP-L first, OpenCLIP bigG second).
pub struct TextEncoders {
    pub tokenizer: ClipTokenizer,
    pub tokenizer_2: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub text_encoder_2: ClipTextModel,
}

/// One prompt, encoded: (1, tokens, width₁ + width₂) penultimate hidden states and (1, projection) pooled.
#[derive(Debug, Clone)]
pub struct PromptEmbedding {
    pub context: Tensor,
    pub pooled: Tensor,
}

impl TextEncoders {
    /// Both encoders on one prompt: `hidden_states[-2]` of each concatenated, the pooled output of the second.
    pub fn encode(&self, text: &str, device: &Device) -> Result<PromptEmbedding> {
        let ids = |tok: &ClipTokenizer| -> Result<Tensor> {
            let ids = tok.encode_padded(text)?;
            let n = ids.len();
            Ok(Tensor::from_vec(ids, (1, n), device)?)
        };
        let first = self.text_encoder.forward(&ids(&self.tokenizer)?)?;
        let second = self.text_encoder_2.forward(&ids(&self.tokenizer_2)?)?;
        let pooled = second.pooled.ok_or_else(no_projection)?;
        let context = Tensor::cat(&[&first.penultimate, &second.penultimate.to_dtype(first.penultimate.dtype())?], 2)?;
        Ok(PromptEmbedding { context, pooled })
    }
}

/// The stage name of prompt encoding's progress reports.
pub const ENCODING_PROMPT: &str = "encoding prompt";

/// The second encoder was built without its `text_projection` (the pooled embedding SDXL needs).
fn no_projection() -> Error {
    Error::model("text_encoder_2", "no text_projection: SDXL's pooled embedding needs CLIPTextModelWithProjection")
}

/// One embedding per distinct text of `reading` (same order): (1, 77 · chunks, width₁ + width₂) and (1, projection).
/// `progress` hears a [`Progress::Part`] of `"encoding prompt"` after each chunk index through each encoder (all
/// the texts' chunks at that index in one batch), and stops the encoding there when it answers stop.
pub fn encode_reading(
    reading: &PromptReading,
    encoders: &TextEncoders,
    emphasis: Emphasis,
    device: &Device,
    progress: &mut ProgressFn,
) -> Result<Vec<PromptEmbedding>> {
    let uses: Vec<usize> = reading.texts.iter().map(|t| t.uses).collect();
    let rows = reading.texts.len();
    let models = [(&encoders.tokenizer, &encoders.text_encoder), (&encoders.tokenizer_2, &encoders.text_encoder_2)];
    let mut contexts = Vec::with_capacity(2);
    let mut pooled = None;
    for (e, (tokenizer, model)) in models.into_iter().enumerate() {
        let tokens = ChunkTokens::of(tokenizer);
        let mut per_chunk = Vec::with_capacity(reading.chunk_count);
        for c in 0..reading.chunk_count {
            let chunks: Vec<_> = (0..rows).map(|t| reading.chunk(t, e, c, tokens)).collect();
            let ids: Vec<u32> =
                chunks.iter().flat_map(|chunk| encoder_ids(chunk, tokens.eos, tokenizer.pad_id())).collect();
            let ids = Tensor::from_vec(ids, (rows, CHUNK_TOKENS + 2), device)?;
            let out = model.forward(&ids)?;
            if e == 1 && c == 0 {
                pooled = out.pooled;
            }
            let weights: Vec<&[f64]> = chunks.iter().map(|chunk| chunk.weights.as_slice()).collect();
            per_chunk.push(emphasis::apply(emphasis, &out.penultimate, &weights, &uses)?);
            let (done, total) = (e * reading.chunk_count + c + 1, 2 * reading.chunk_count);
            report(progress, &Progress::Part { stage: ENCODING_PROMPT, done, total })?;
        }
        contexts.push(Tensor::cat(&per_chunk, 1)?);
    }
    let pooled = pooled.ok_or_else(no_projection)?;
    let context = Tensor::cat(&[&contexts[0], &contexts[1].to_dtype(contexts[0].dtype())?], 2)?;
    (0..rows)
        .map(|t| Ok(PromptEmbedding { context: context.narrow(0, t, 1)?, pooled: pooled.narrow(0, t, 1)? }))
        .collect()
}
