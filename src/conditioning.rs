//! Prompt conditioning: text → the UNet's cross-attention context and pooled embedding, as diffusers'
//! `StableDiffusionXLPipeline.encode_prompt` computes them.

use candle_core::{Device, Tensor};

use crate::models::clip::ClipTextModel;
use crate::tokenizer::ClipTokenizer;
use crate::Result;

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

/// What the denoising loop is conditioned on, for the whole batch: with classifier-free guidance the first half of
/// the rows is the negative prompt and the second half the prompt (diffusers' order).
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
    /// Both encoders on one prompt: `hidden_states[-2]` of each concatenated, the pooled output of the second.
    pub fn encode(&self, text: &str, device: &Device) -> Result<PromptEmbedding> {
        let ids = |tok: &ClipTokenizer| -> Result<Tensor> {
            let ids = tok.encode_padded(text)?;
            let n = ids.len();
            Ok(Tensor::from_vec(ids, (1, n), device)?)
        };
        let first = self.text_encoder.forward(&ids(&self.tokenizer)?)?;
        let second = self.text_encoder_2.forward(&ids(&self.tokenizer_2)?)?;
        let pooled =
            second.pooled.ok_or_else(|| crate::Error::Other("text_encoder_2 has no text_projection".into()))?;
        let context = Tensor::cat(&[&first.penultimate, &second.penultimate.to_dtype(first.penultimate.dtype())?], 2)?;
        Ok(PromptEmbedding { context, pooled })
    }

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
