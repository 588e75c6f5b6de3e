//! One prompt read the A1111 way, before any model runs: its schedule, each distinct text's weighted fragments and
//! its chunks for both tokenizers. The conditioning encodes it; `--explain-prompt` prints it.

use super::attention::{parse_attention, Fragment};
use super::chunks::{chunk_fragments, empty_chunk, Chunk, ChunkTokens};
use super::schedule::{entry_at, schedule, Schedule};
use crate::tokenizer::ClipTokenizer;
use crate::Result;

/// A prompt read for a number of model evaluations.
#[derive(Debug, Clone)]
pub struct PromptReading {
    pub prompt: String,
    /// The model evaluations the schedule covers.
    pub steps: usize,
    pub schedule: Schedule,
    /// For each schedule entry, its text's index in `texts`.
    pub entry_texts: Vec<usize>,
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
    /// Reads `prompt` for `steps` model evaluations with the two SDXL tokenizers.
    pub fn new(prompt: &str, steps: usize, tokenizers: [&ClipTokenizer; 2]) -> Result<Self> {
        let schedule = schedule(prompt, steps);
        let mut texts: Vec<TextReading> = Vec::new();
        let mut entry_texts = Vec::with_capacity(schedule.entries.len());
        for entry in &schedule.entries {
            let index = match texts.iter().position(|t| t.text == entry.text) {
                Some(i) => i,
                None => {
                    let fragments = parse_attention(&entry.text);
                    let chunks =
                        [chunk_fragments(&fragments, tokenizers[0])?, chunk_fragments(&fragments, tokenizers[1])?];
                    texts.push(TextReading { text: entry.text.clone(), fragments, chunks, uses: 0 });
                    texts.len() - 1
                }
            };
            texts[index].uses += 1;
            entry_texts.push(index);
        }
        let chunk_count = texts.iter().flat_map(|t| t.chunks.iter().map(Vec::len)).max().unwrap_or(1);
        Ok(Self { prompt: prompt.to_string(), steps: steps.max(1), schedule, entry_texts, texts, chunk_count })
    }

    /// The index in `texts` of the text used at 0-based evaluation `index`.
    pub fn text_at(&self, index: usize) -> usize {
        self.entry_texts[entry_at(&self.schedule.entries, |e| e.until, index)]
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
