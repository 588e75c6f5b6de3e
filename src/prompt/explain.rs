//! `--explain-prompt`: how a request's prompts are read, in words — the texts per step, their weighted fragments and
//! their 77-token chunks — so a prompt can be debugged without generating.

use std::fmt::Write;

use super::attention::Fragment;
use super::chunks::Chunk;
use super::reading::PromptReading;
use super::PromptSyntax;
use crate::tokenizer::ClipTokenizer;
use crate::{GenerateRequest, Result};

/// The explanation of `request`'s prompt and negative prompt for `evaluations` model evaluations.
pub fn explain(request: &GenerateRequest, evaluations: usize, tokenizers: [&ClipTokenizer; 2]) -> Result<String> {
    let mut out = String::new();
    let guided = request.guidance_scale > 1.0;
    for (what, text) in [("Prompt", &request.prompt), ("Negative prompt", &request.negative_prompt)] {
        if what == "Negative prompt" && !guided {
            let _ = writeln!(out, "{what}: not used (guidance_scale {} ≤ 1)", request.guidance_scale);
            continue;
        }
        match request.prompt_syntax {
            PromptSyntax::None => explain_literal(&mut out, what, text, tokenizers)?,
            PromptSyntax::A1111 => {
                let reading = PromptReading::new(text, evaluations, tokenizers)?;
                explain_reading(&mut out, what, &reading, request, tokenizers);
            }
        }
    }
    Ok(out)
}

fn explain_literal(out: &mut String, what: &str, text: &str, tokenizers: [&ClipTokenizer; 2]) -> Result<()> {
    let _ = writeln!(out, "{what} (prompt syntax: none, diffusers' reading: literal text, one 77-token window):");
    let _ = writeln!(out, "  {text:?}");
    for (name, tokenizer) in ENCODERS.iter().zip(tokenizers) {
        let ids = tokenizer.encode_tokens(text)?;
        let kept = tokenizer.max_length() - 2;
        if ids.len() <= kept {
            let _ = writeln!(out, "  {name}: {} tokens", ids.len());
        } else {
            let _ = writeln!(
                out,
                "  {name}: {} tokens, the last {} are cut: {:?}",
                ids.len(),
                ids.len() - kept,
                render(&ids[kept..], tokenizer)
            );
        }
    }
    Ok(())
}

const ENCODERS: [&str; 2] = ["CLIP-L", "bigG"];

fn explain_reading(
    out: &mut String,
    what: &str,
    reading: &PromptReading,
    request: &GenerateRequest,
    tokenizers: [&ClipTokenizer; 2],
) {
    let texts = reading.texts.len();
    let _ = writeln!(
        out,
        "{what} (prompt syntax: a1111, emphasis: {}; {} model evaluations; {} text{}, {} chunk{} of 77 tokens):",
        request.emphasis.a1111_name(),
        reading.steps,
        texts,
        plural(texts),
        reading.chunk_count,
        plural(reading.chunk_count),
    );
    if reading.literal {
        let _ = writeln!(
            out,
            "  note: no prompt editing or alternation (a `|` outside `[a|b]`, or a backslash at the end or before a \
             line break): the text is used as written at every step"
        );
    }
    if what == "Negative prompt" && reading.is_empty() {
        let _ = writeln!(out, "  empty: zero embeddings when the model sets force_zeros_for_empty_prompt");
    }
    // Steps (1-based, as the progress bar counts them) per run of schedule entries with the same text.
    let mut runs: Vec<(usize, usize, usize)> = Vec::new();
    let mut first = 0;
    for &(until, text) in &reading.entries {
        let last = until.min(reading.steps - 1);
        if first > last {
            continue;
        }
        match runs.last_mut() {
            Some(run) if run.2 == text => run.1 = last,
            _ => runs.push((first, last, text)),
        }
        first = last + 1;
    }
    let steps_of = |t: usize| -> String {
        let ranges: Vec<String> = runs
            .iter()
            .filter(|run| run.2 == t)
            .map(|&(from, to, _)| if from == to { format!("{}", from + 1) } else { format!("{}–{}", from + 1, to + 1) })
            .collect();
        let word = if ranges.len() == 1 && !ranges[0].contains('–') { "step" } else { "steps" };
        format!("{word} {}", ranges.join(", "))
    };
    for (t, text) in reading.texts.iter().enumerate() {
        let label = if texts > 1 { format!("text {} ({}): ", t + 1, steps_of(t)) } else { String::new() };
        let _ = writeln!(out, "  {label}{:?}", text.text);
        let _ = writeln!(out, "    fragments:");
        for fragment in &text.fragments {
            match fragment {
                Fragment::Text { text, weight } => {
                    let _ = writeln!(out, "      {text:?} ×{}", format_weight(*weight));
                }
                Fragment::Break => {
                    let _ = writeln!(out, "      BREAK (new chunk)");
                }
            }
        }
        let same = text.chunks[0] == text.chunks[1];
        for (e, chunks) in text.chunks.iter().enumerate() {
            if e == 1 && same {
                break;
            }
            let who = if same { "both encoders".to_string() } else { ENCODERS[e].to_string() };
            let tokens: usize = chunks.iter().map(|c| c.len).sum();
            let _ = writeln!(out, "    chunks ({who}): {tokens} tokens in {}", chunks.len());
            for (c, chunk) in chunks.iter().enumerate() {
                let _ = writeln!(out, "      {}: {}", c + 1, describe_chunk(chunk, tokenizers[e]));
            }
        }
        if text.chunks.iter().any(|c| c.len() < reading.chunk_count) {
            let _ = writeln!(out, "    padded with empty chunks to {}", reading.chunk_count);
        }
    }
}

fn describe_chunk(chunk: &Chunk, tokenizer: &ClipTokenizer) -> String {
    let ids = &chunk.ids[1..=chunk.len];
    let weights = &chunk.weights[1..=chunk.len];
    let (lo, hi) = weights.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &w| (lo.min(w), hi.max(w)));
    let range = if chunk.len == 0 || lo == hi {
        String::new()
    } else {
        format!(", weights {}…{}", format_weight(lo), format_weight(hi))
    };
    format!("{} token{}{range}: {:?}", chunk.len, plural(chunk.len), render(ids, tokenizer))
}

/// Token ids as text: vocabulary entries with `</w>` as a space.
fn render(ids: &[u32], tokenizer: &ClipTokenizer) -> String {
    let text: String = ids.iter().map(|&id| tokenizer.token(id).unwrap_or_default().replace("</w>", " ")).collect();
    text.trim_end().to_string()
}

fn format_weight(w: f64) -> String {
    let rounded = format!("{w:.4}");
    let trimmed = rounded.trim_end_matches('0').trim_end_matches('.');
    trimmed.to_string()
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}
