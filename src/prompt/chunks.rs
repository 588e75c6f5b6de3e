//! A1111's long prompts: weighted fragments → 75-token chunks, each wrapped in BOS … EOS to CLIP's 77.
//!
//! Tokens fill a chunk until it holds 75. When the 76th token is not a comma and the chunk's last comma is at most
//! 20 tokens back (A1111's default "token wrap length"), the tokens after that comma move to the next chunk so a
//! phrase is not cut in two. `BREAK` closes the current chunk (even an empty one). Short chunks are padded with EOS;
//! every chunk keeps its tokens' weights (1 for BOS, EOS and padding).

use super::attention::Fragment;
use crate::tokenizer::ClipTokenizer;
use crate::Result;

/// Prompt tokens per chunk (CLIP's 77 minus BOS and EOS).
pub const CHUNK_TOKENS: usize = 75;
/// A1111's default `comma_padding_backtrack`.
pub const COMMA_BACKTRACK: usize = 20;

/// One 77-token chunk.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    /// BOS, 75 tokens (prompt tokens, then EOS padding), EOS.
    pub ids: Vec<u32>,
    /// One weight per id.
    pub weights: Vec<f64>,
    /// How many of the 75 are prompt tokens.
    pub len: usize,
}

/// The special tokens chunking needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkTokens {
    pub bos: u32,
    pub eos: u32,
    /// `,</w>`, where a chunk may be cut.
    pub comma: Option<u32>,
}

impl ChunkTokens {
    pub fn of(tokenizer: &ClipTokenizer) -> Self {
        Self { bos: tokenizer.bos_id(), eos: tokenizer.eos_id(), comma: tokenizer.token_id(",</w>") }
    }
}

/// A fragment, tokenized.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Tokens(Vec<u32>, f64),
    Break,
}

/// Tokenizes each fragment on its own (as A1111 does) and chunks the result.
pub fn chunk_fragments(fragments: &[Fragment], tokenizer: &ClipTokenizer) -> Result<Vec<Chunk>> {
    let pieces = fragments
        .iter()
        .map(|f| match f {
            Fragment::Text { text, weight } => Ok(Piece::Tokens(tokenizer.encode_tokens(text)?, *weight)),
            Fragment::Break => Ok(Piece::Break),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(chunk_pieces(&pieces, ChunkTokens::of(tokenizer)))
}

/// A chunk of only padding: BOS and 76 EOS.
pub fn empty_chunk(tokens: ChunkTokens) -> Chunk {
    close(Vec::new(), Vec::new(), tokens)
}

fn close(mut ids: Vec<u32>, mut weights: Vec<f64>, tokens: ChunkTokens) -> Chunk {
    let len = ids.len();
    ids.resize(CHUNK_TOKENS, tokens.eos);
    weights.resize(CHUNK_TOKENS, 1.0);
    ids.insert(0, tokens.bos);
    ids.push(tokens.eos);
    weights.insert(0, 1.0);
    weights.push(1.0);
    Chunk { ids, weights, len }
}

/// A1111's chunking of tokenized fragments.
pub fn chunk_pieces(pieces: &[Piece], tokens: ChunkTokens) -> Vec<Chunk> {
    let mut chunks = Vec::new();
    let mut ids: Vec<u32> = Vec::new();
    let mut weights: Vec<f64> = Vec::new();
    let mut last_comma: Option<usize> = None;
    for piece in pieces {
        let (piece_ids, weight) = match piece {
            Piece::Break => {
                chunks.push(close(std::mem::take(&mut ids), std::mem::take(&mut weights), tokens));
                last_comma = None;
                continue;
            }
            Piece::Tokens(ids, weight) => (ids, *weight),
        };
        for &id in piece_ids {
            if Some(id) == tokens.comma {
                last_comma = Some(ids.len());
            } else if let Some(comma) =
                last_comma.filter(|&c| ids.len() == CHUNK_TOKENS && ids.len() - c <= COMMA_BACKTRACK)
            {
                let moved_ids = ids.split_off(comma + 1);
                let moved_weights = weights.split_off(comma + 1);
                chunks.push(close(
                    std::mem::replace(&mut ids, moved_ids),
                    std::mem::replace(&mut weights, moved_weights),
                    tokens,
                ));
                last_comma = None;
            }
            if ids.len() == CHUNK_TOKENS {
                chunks.push(close(std::mem::take(&mut ids), std::mem::take(&mut weights), tokens));
                last_comma = None;
            }
            ids.push(id);
            weights.push(weight);
        }
    }
    if !ids.is_empty() || chunks.is_empty() {
        chunks.push(close(ids, weights, tokens));
    }
    chunks
}

/// The ids an encoder sees for a chunk: everything after the first EOS becomes the tokenizer's pad id (A1111 pads
/// CLIP-L with EOS and OpenCLIP bigG with id 0; SDXL's tokenizers say the same: `<|endoftext|>` and `!`).
pub fn encoder_ids(chunk: &Chunk, eos: u32, pad: u32) -> Vec<u32> {
    let mut ids = chunk.ids.clone();
    if let Some(first) = ids.iter().position(|&t| t == eos) {
        for id in &mut ids[first + 1..] {
            *id = pad;
        }
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: ChunkTokens = ChunkTokens { bos: 1000, eos: 1001, comma: Some(7) };

    fn words(n: usize, id: u32) -> Piece {
        Piece::Tokens(vec![id; n], 1.0)
    }

    #[test]
    fn short_prompt_is_one_padded_chunk() {
        let chunks = chunk_pieces(&[Piece::Tokens(vec![5, 6], 1.5)], T);
        assert_eq!(chunks.len(), 1);
        let c = &chunks[0];
        assert_eq!((c.ids.len(), c.weights.len(), c.len), (77, 77, 2));
        assert_eq!(&c.ids[..4], &[1000, 5, 6, 1001]);
        assert_eq!(&c.weights[..4], &[1.0, 1.5, 1.5, 1.0]);
        assert!(c.ids[3..].iter().all(|&t| t == 1001));
        assert_eq!(chunk_pieces(&[], T), vec![empty_chunk(T)]);
    }

    #[test]
    fn tail_after_a_near_comma_moves_to_the_next_chunk() {
        // 60 words, a comma, 14 words: the chunk is full at 75; the 76th token moves the 14 words on.
        let chunks = chunk_pieces(&[words(60, 5), Piece::Tokens(vec![7], 1.0), words(14, 6), words(3, 8)], T);
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0].len, 61);
        assert_eq!(chunks[0].ids[61], 7);
        assert_eq!(chunks[1].len, 17);
        let mut moved = vec![6; 14];
        moved.push(8);
        assert_eq!(&chunks[1].ids[1..16], &moved[..]);
        // A comma further back than 20 tokens: a hard cut at 75.
        let chunks = chunk_pieces(&[words(10, 5), Piece::Tokens(vec![7], 1.0), words(70, 6)], T);
        assert_eq!((chunks[0].len, chunks[1].len), (75, 6));
    }

    #[test]
    fn break_closes_the_chunk() {
        let chunks = chunk_pieces(&[Piece::Break, words(3, 5), Piece::Break, words(2, 6)], T);
        assert_eq!(chunks.iter().map(|c| c.len).collect::<Vec<_>>(), vec![0, 3, 2]);
    }

    #[test]
    fn padding_after_the_first_eos() {
        let c = &chunk_pieces(&[words(2, 5)], T)[0];
        let ids = encoder_ids(c, 1001, 0);
        assert_eq!(&ids[..5], &[1000, 5, 5, 1001, 0]);
        assert!(ids[4..].iter().all(|&t| t == 0));
        assert_eq!(encoder_ids(c, 1001, 1001), c.ids);
    }
}
