//! One prompt read the A1111 way, before any model runs: its schedule, each distinct text's weighted fragments and
//! its chunks for both tokenizers. The conditioning encodes it; `--explain-prompt` prints it.

use super::attention::{parse_attention, Fragment};
use super::chunks::{chunk_fragments, empty_chunk, Chunk, ChunkTokens, CHUNK_TOKENS};
use super::schedule::{entry_at, schedule_distinct};
use super::{MAX_PROMPT_CHUNKS, MAX_SCHEDULE_TEXTS};
use crate::tokenizer::ClipTokenizer;
use crate::{Error, Result};

/// A prompt read for a number of model evaluations.
#[derive(Debug, Clone)]
pub struct PromptReading {
    pub prompt: String,
    /// The model evaluations the schedule covers.
    pub steps: usize,
    /// A1111's schedule: (`until`, index in `texts`) per entry, ascending, the last `until` = `steps` (see
    /// [`super::Schedule`]).
    pub entries: Vec<(usize, usize)>,
    /// The grammar rejected the prompt, so it is used literally (no editing, no alternation).
    pub literal: bool,
    /// The distinct texts, in order of first use.
    pub texts: Vec<TextReading>,
    /// Chunks per text once padded: every text has this many for both encoders (A1111 pads the texts it encodes
    /// together with empty chunks).
    pub chunk_count: usize,
}

/// One distinct text of a schedule.
#[derive(Debug, Clone)]
pub struct TextReading {
    pub text: String,
    pub fragments: Vec<Fragment>,
    /// Its chunks for the first and the second tokenizer (before padding to `chunk_count`).
    pub chunks: [Vec<Chunk>; 2],
    /// How many schedule entries use it.
    pub uses: usize,
}

impl PromptReading {
    /// Reads `prompt` for `steps` model evaluations with the two SDXL tokenizers, however long it is.
    pub fn new(prompt: &str, steps: usize, tokenizers: [&ClipTokenizer; 2]) -> Result<Self> {
        Self::read(prompt, steps, tokenizers, None)
    }

    /// [`Self::new`] within the limits a generation accepts: at most [`MAX_SCHEDULE_TEXTS`] distinct texts
    /// (refused before any is tokenized) of at most [`MAX_PROMPT_CHUNKS`] chunks each; an error naming `field`
    /// (`"prompt"` or `"negative_prompt"`) otherwise.
    pub fn limited(prompt: &str, steps: usize, tokenizers: [&ClipTokenizer; 2], field: &'static str) -> Result<Self> {
        Self::read(prompt, steps, tokenizers, Some(field))
    }

    fn read(
        prompt: &str,
        steps: usize,
        tokenizers: [&ClipTokenizer; 2],
        limited: Option<&'static str>,
    ) -> Result<Self> {
        let max_texts = if limited.is_some() { MAX_SCHEDULE_TEXTS } else { usize::MAX };
        let schedule = schedule_distinct(prompt, steps, max_texts).map_err(|refused| {
            let field = limited.expect("only a limited reading is refused");
            Error::invalid(
                field,
                format!(
                    "must read as at most {} distinct texts over the steps (each change made by prompt editing \
                     `[a:b:N]` or alternation `[a|b]` is one), got more than {}",
                    refused.limit, refused.limit
                ),
            )
        })?;
        let mut uses = vec![0; schedule.texts.len()];
        for &(_, t) in &schedule.entries {
            uses[t] += 1;
        }
        let mut texts = Vec::with_capacity(schedule.texts.len());
        for (text, uses) in schedule.texts.into_iter().zip(uses) {
            let fragments = parse_attention(&text);
            let chunks = [chunk_fragments(&fragments, tokenizers[0])?, chunk_fragments(&fragments, tokenizers[1])?];
            if let Some(field) = limited {
                let count = chunks.iter().map(Vec::len).max().unwrap_or(1);
                if count > MAX_PROMPT_CHUNKS {
                    return Err(Error::invalid(
                        field,
                        format!(
                            "must fit in at most {MAX_PROMPT_CHUNKS} chunks of {CHUNK_TOKENS} tokens (about {} \
                             tokens), got {count} chunks",
                            MAX_PROMPT_CHUNKS * CHUNK_TOKENS
                        ),
                    ));
                }
            }
            texts.push(TextReading { text, fragments, chunks, uses });
        }
        let chunk_count = texts.iter().flat_map(|t| t.chunks.iter().map(Vec::len)).max().unwrap_or(1);
        Ok(Self {
            prompt: prompt.to_string(),
            steps: steps.max(1),
            entries: schedule.entries,
            literal: schedule.literal,
            texts,
            chunk_count,
        })
    }

    /// The index in `texts` of the text used at 0-based evaluation `index`.
    pub fn text_at(&self, index: usize) -> usize {
        self.entries[entry_at(&self.entries, |e| e.0, index)].1
    }

    /// Chunk `c` of text `t` for encoder `e` (0 or 1), an empty chunk past the text's own chunks.
    pub fn chunk(&self, t: usize, e: usize, c: usize, tokens: ChunkTokens) -> Chunk {
        self.texts[t].chunks[e].get(c).cloned().unwrap_or_else(|| empty_chunk(tokens))
    }

    /// True when every text is empty (A1111 then gives the negative prompt zero embeddings).
    pub fn is_empty(&self) -> bool {
        self.texts.iter().all(|t| t.text.is_empty())
    }
}
