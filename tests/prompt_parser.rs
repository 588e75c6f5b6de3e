//! A1111 prompt syntax without the text encoders: schedules, emphasis fragments and chunks against the references
//! of `scripts/make_a1111_refs.py` (A1111's documented examples, the hosted API's example prompts, random
//! bracket-heavy strings), the hosted prompt's fragments spelled out, and a fuzz test that nothing panics.

mod common;

use common::{root, tiny_model};
use dreamshaper::prompt::chunks::{chunk_fragments, chunk_pieces, ChunkTokens, Piece};
use dreamshaper::prompt::{parse_attention, schedule, Fragment, PromptReading};
use dreamshaper::tokenizer::ClipTokenizer;
use serde_json::Value;

/// Weights are stored as Python `repr` strings: exact through any JSON reader.
fn fixtures() -> Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("tests/fixtures/a1111.json")).unwrap()).unwrap()
}

fn tokenizers() -> (ClipTokenizer, ClipTokenizer) {
    (
        ClipTokenizer::from_dir(&tiny_model().join("tokenizer")).unwrap(),
        ClipTokenizer::from_dir(&tiny_model().join("tokenizer_2")).unwrap(),
    )
}

fn fragments_as_pairs(fragments: &[Fragment]) -> Vec<(String, f64)> {
    fragments
        .iter()
        .map(|f| match f {
            Fragment::Text { text, weight } => (text.clone(), *weight),
            Fragment::Break => ("BREAK".to_string(), -1.0),
        })
        .collect()
}

#[test]
fn schedules_match_the_reference() {
    let fx = fixtures();
    let cases = fx["schedules"].as_array().unwrap();
    assert!(cases.len() > 400);
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        let steps = case["steps"].as_u64().unwrap() as usize;
        let got = schedule(prompt, steps);
        let want: Vec<(usize, String)> = case["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e[0].as_u64().unwrap() as usize, e[1].as_str().unwrap().to_string()))
            .collect();
        let got_entries: Vec<(usize, String)> = got.entries.iter().map(|e| (e.until, e.text.clone())).collect();
        assert_eq!(got_entries, want, "schedule of {prompt:?} for {steps} steps");
        assert_eq!(got.literal, case["literal"].as_bool().unwrap(), "literal flag of {prompt:?}");
    }
}

#[test]
fn emphasis_matches_the_reference_to_the_bit() {
    let fx = fixtures();
    for case in fx["attention"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<(String, f64)> = case["fragments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| (f[0].as_str().unwrap().to_string(), f[1].as_str().unwrap().parse().unwrap()))
            .collect();
        assert_eq!(fragments_as_pairs(&parse_attention(text)), want, "fragments of {text:?}");
    }
}

#[test]
fn chunks_match_the_reference() {
    let fx = fixtures();
    let (t1, t2) = tokenizers();
    for case in fx["chunks"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let fragments = parse_attention(prompt);
        for (e, tokenizer) in [&t1, &t2].into_iter().enumerate() {
            let got = chunk_fragments(&fragments, tokenizer).unwrap();
            let want = case["encoders"][e].as_array().unwrap();
            assert_eq!(got.len(), want.len(), "chunk count of {prompt:?}, encoder {e}");
            for (g, w) in got.iter().zip(want) {
                let ids: Vec<u32> = w["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
                let weights: Vec<f64> =
                    w["weights"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().parse().unwrap()).collect();
                assert_eq!(g.ids, ids, "chunk ids of {prompt:?}, encoder {e}");
                assert_eq!(g.weights, weights, "chunk weights of {prompt:?}, encoder {e}");
            }
        }
    }
}

/// The hosted API's example prompt, read: the fragments and weights a user expects.
#[test]
fn hosted_example_prompt_reads_as_a1111_does() {
    let prompt = "a photo of (the Grumpy Cat:1.25), (grumpy:1.2), (cyberpunk:1.4), ( best quality:1.9), \
                  (action-packed:1.8), [deformed | disfigured], [bad : wrong], (mutated hands and fingers)";
    let s = schedule(prompt, 4);
    assert!(!s.literal);
    // `[deformed | disfigured]` alternates every step; `[bad : wrong]` has no number: literal text.
    let texts: Vec<&str> = s.entries.iter().map(|e| e.text.as_str()).collect();
    let odd = "a photo of (the Grumpy Cat:1.25), (grumpy:1.2), (cyberpunk:1.4), ( best quality:1.9), \
               (action-packed:1.8), deformed , [bad : wrong], (mutated hands and fingers)";
    let even = odd.replace("deformed ", " disfigured");
    assert_eq!(texts, vec![odd, even.as_str(), odd, even.as_str()]);
    assert_eq!(s.entries.iter().map(|e| e.until).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    let want = vec![
        ("a photo of ", 1.0),
        ("the Grumpy Cat", 1.25),
        (", ", 1.0),
        ("grumpy", 1.2),
        (", ", 1.0),
        ("cyberpunk", 1.4),
        (", ", 1.0),
        (" best quality", 1.9),
        (", ", 1.0),
        ("action-packed", 1.8),
        (", deformed , ", 1.0),
        ("bad : wrong", 1.0 / 1.1),
        (", ", 1.0),
        ("mutated hands and fingers", 1.1),
    ];
    let want: Vec<(String, f64)> = want.into_iter().map(|(t, w)| (t.to_string(), w)).collect();
    assert_eq!(fragments_as_pairs(&parse_attention(odd)), want);
}

#[test]
fn documented_features() {
    let pairs = |text: &str| fragments_as_pairs(&parse_attention(text));
    assert_eq!(pairs("((a))"), vec![("a".into(), 1.1 * 1.1)]);
    assert_eq!(pairs("[a]"), vec![("a".into(), 1.0 / 1.1)]);
    assert_eq!(pairs("((a:1.5) b)"), vec![("a".into(), 1.5 * 1.1), (" b".into(), 1.1)]);
    assert_eq!(pairs("\\(a\\) \\[b\\]"), vec![("(a) [b]".into(), 1.0)]);
    assert_eq!(pairs("a) b] (c"), vec![("a) b] ".into(), 1.0), ("c".into(), 1.1)]);
    // Prompt editing: `when` < 1 with a decimal point is a fraction; whole numbers are steps.
    let s = schedule("a [from:to:0.5] [to:4] [from::2]", 10);
    let got: Vec<(usize, &str)> = s.entries.iter().map(|e| (e.until, e.text.as_str())).collect();
    assert_eq!(got, vec![(2, "a from  from"), (4, "a from  "), (5, "a from to "), (10, "a to to ")]);
    // BREAK splits chunks.
    let (t1, _) = tokenizers();
    let reading = PromptReading::new("a cat BREAK a dog", 10, [&t1, &t1]).unwrap();
    assert_eq!(reading.chunk_count, 2);
    assert_eq!(reading.texts[0].chunks[0].iter().map(|c| c.len).collect::<Vec<_>>(), vec![2, 2]);
}

/// A small deterministic generator (no dev-dependency needed).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Any string reads without panicking, and the results keep their invariants.
#[test]
fn fuzz_any_string_reads() {
    const PIECES: &[&str] = &[
        "(",
        ")",
        "[",
        "]",
        ":",
        "|",
        "\\",
        " ",
        "a",
        "b",
        "1",
        ".",
        "5",
        ",",
        "-",
        "+",
        "e",
        "BREAK",
        " BREAK ",
        "\n",
        "\t",
        "\u{3000}",
        "３",
        "é",
        "猫",
        "[a:b:0.5]",
        "[x|y|]",
        "(c:1.3)",
        ":0.2)",
        "::",
        "[[",
        "))",
        "1e999",
        "(((",
        "]]]",
        "\\(",
        "\\]",
    ];
    let tokens = ChunkTokens { bos: 1, eos: 2, comma: Some(3) };
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    for _ in 0..4000 {
        let len = rng.below(40);
        let text: String = (0..len).map(|_| PIECES[rng.below(PIECES.len())]).collect();
        for steps in [1, 7, 30] {
            let s = schedule(&text, steps);
            assert!(!s.entries.is_empty(), "{text:?}");
            assert_eq!(s.entries.last().unwrap().until, steps, "{text:?}");
            assert!(s.entries.windows(2).all(|w| w[0].until < w[1].until), "{text:?}");
            for entry in &s.entries {
                let fragments = parse_attention(&entry.text);
                assert!(!fragments.is_empty());
                let pieces: Vec<Piece> = fragments
                    .iter()
                    .map(|f| match f {
                        Fragment::Text { text, weight } => Piece::Tokens(
                            text.chars().map(|c| if c == ',' { 3 } else { 10 + c as u32 % 50 }).collect(),
                            *weight,
                        ),
                        Fragment::Break => Piece::Break,
                    })
                    .collect();
                let chunks = chunk_pieces(&pieces, tokens);
                assert!(!chunks.is_empty());
                assert!(chunks.iter().all(|c| c.ids.len() == 77 && c.weights.len() == 77 && c.len <= 75));
            }
        }
        // Text without any syntax is one entry, one fragment, unchanged.
        if !text.chars().any(|c| "()[]:|\\".contains(c)) && !text.contains("BREAK") {
            let s = schedule(&text, 7);
            assert_eq!(s.entries.len(), 1);
            assert_eq!(s.entries[0].text, text);
            assert_eq!(parse_attention(&text), vec![Fragment::Text { text: text.clone(), weight: 1.0 }]);
        }
    }
    // Pathological sizes stay fast and literal where A1111 would fail.
    let deep = format!("{}x{}", "[".repeat(50_000), "]".repeat(50_000));
    assert!(schedule(&deep, 30).literal);
    assert_eq!(parse_attention(&deep).len(), 1);
}
