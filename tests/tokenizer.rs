//! `ClipTokenizer` against transformers' `CLIPTokenizer.from_pretrained(folder)` (what diffusers' SDXL pipeline
//! uses), from the reference ids written by `scripts/make_rng_token_refs.py`.
//!
//! The tokenizer folders are `models/tiny-sdxl/tokenizer{,_2}` (the real CLIP vocab.json/merges.txt with SDXL's
//! tokenizer_config.json and special_tokens_map.json).

use std::path::{Path, PathBuf};

use dreamshaper::tokenizer::ClipTokenizer;
use dreamshaper::Error;
use serde_json::Value;

fn fixture() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/rng_tokens.json");
    let text = std::fs::read_to_string(path).expect("read tests/fixtures/rng_tokens.json");
    serde_json::from_str(&text).expect("parse tests/fixtures/rng_tokens.json")
}

fn folder(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-sdxl").join(name)
}

fn load(name: &str) -> ClipTokenizer {
    ClipTokenizer::from_dir(&folder(name)).unwrap_or_else(|e| panic!("loading {name}: {e}"))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// A fresh scratch directory under the target directory.
fn scratch_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-scratch").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn prompt_text(case: &Value) -> String {
    case["prompt"].as_str().unwrap().repeat(case["repeat"].as_u64().unwrap_or(1) as usize)
}

#[test]
fn special_ids_and_length() {
    let fx = fixture();
    for name in ["tokenizer", "tokenizer_2"] {
        let tok = load(name);
        let meta = &fx["tokenizers"][name];
        assert_eq!(u64::from(tok.bos_id()), meta["bos"].as_u64().unwrap(), "{name} bos");
        assert_eq!(u64::from(tok.eos_id()), meta["eos"].as_u64().unwrap(), "{name} eos");
        assert_eq!(u64::from(tok.pad_id()), meta["pad"].as_u64().unwrap(), "{name} pad");
        assert_eq!(tok.max_length() as u64, meta["max_length"].as_u64().unwrap(), "{name} max_length");
    }
    assert_eq!((load("tokenizer").pad_id(), load("tokenizer_2").pad_id()), (49407, 0));
}

#[test]
fn ids_match_transformers() {
    let fx = fixture();
    let prompts = fx["prompts"].as_array().unwrap();
    assert!(prompts.len() >= 25);
    for name in ["tokenizer", "tokenizer_2"] {
        let tok = load(name);
        for case in prompts {
            let text = prompt_text(case);
            let want = &case[name];
            let what = format!("{name} on {:?} x{}", case["prompt"].as_str().unwrap(), case["repeat"]);
            let padded = tok.encode_padded(&text).unwrap();
            assert_eq!(padded, ids(&want["padded"]), "{what}: padded ids");
            assert_eq!(padded.len(), tok.max_length());
            if !want["tokens"].is_null() {
                assert_eq!(tok.encode_tokens(&text).unwrap(), ids(&want["tokens"]), "{what}: tokens");
            }
            assert_eq!(tok.truncated_count(&text).unwrap() as u64, want["truncated"].as_u64().unwrap(), "{what}");
        }
    }
}

#[test]
fn readme_example() {
    // /work/shared/clip-tokenizer/README.md, checked with transformers' CLIPTokenizer.
    let tok = load("tokenizer");
    let want = [49406, 320, 1125, 539, 320, 23610, 2368, 267, 279, 330, 256, 49407];
    let padded = tok.encode_padded("a photo of a Grumpy cat, 8k!").unwrap();
    assert_eq!(&padded[..want.len()], &want);
    assert!(padded[want.len()..].iter().all(|&id| id == 49407));
    // SDXL's second tokenizer pads with "!" (id 0), and that makes every "!" in a prompt an added token too.
    let padded2 = load("tokenizer_2").encode_padded("a photo of a Grumpy cat, 8k!").unwrap();
    assert_eq!(&padded2[..12], &[49406, 320, 1125, 539, 320, 23610, 2368, 267, 279, 330, 0, 49407]);
    assert!(padded2[12..].iter().all(|&id| id == 0));
}

#[test]
fn truncation_and_odd_inputs_never_panic() {
    let tok = load("tokenizer_2");
    let long = "a ".repeat(5000);
    let padded = tok.encode_padded(&long).unwrap();
    assert_eq!(padded.len(), 77);
    assert_eq!((padded[0], padded[76]), (tok.bos_id(), tok.eos_id()));
    assert_eq!(tok.truncated_count(&long).unwrap(), 5000 - 75);
    let empty = tok.encode_padded("").unwrap();
    assert_eq!(&empty[..2], &[tok.bos_id(), tok.eos_id()]);
    assert_eq!(tok.truncated_count("").unwrap(), 0);
    let weird = [
        "\u{0}\u{1}\u{7f}\u{feff}\u{202e}\u{fffd}",
        "🏳️‍🌈👩🏿‍🔬 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u{10ffff}",
        "\u{301}\u{301}\u{301} ̈a",
        "<|endoftext|><|endoftext|><|startoftext|>",
        "<|endof",
        "\r\n\t \u{a0}\u{2028}",
    ];
    for text in weird {
        let ids = tok.encode_padded(text).unwrap();
        assert_eq!(ids.len(), 77, "{text:?}");
    }
    let huge: String = "猫🐱 ".chars().cycle().take(10_000).collect();
    assert_eq!(tok.encode_padded(&huge).unwrap().len(), 77);
}

/// Other folder layouts: the `added_tokens_decoder` config that newer transformers versions write, and no config.
#[test]
fn folder_layout_variants_match_transformers() {
    let fx = fixture();
    for (name, variant) in fx["tokenizer_variants"].as_object().unwrap() {
        let dir = scratch_dir(name);
        for f in ["vocab.json", "merges.txt"] {
            std::fs::copy(folder("tokenizer_2").join(f), dir.join(f)).unwrap();
        }
        for (file, content) in variant["files"].as_object().unwrap() {
            std::fs::write(dir.join(file), serde_json::to_string_pretty(content).unwrap()).unwrap();
        }
        let tok = ClipTokenizer::from_dir(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(u64::from(tok.bos_id()), variant["bos"].as_u64().unwrap(), "{name} bos");
        assert_eq!(u64::from(tok.eos_id()), variant["eos"].as_u64().unwrap(), "{name} eos");
        assert_eq!(u64::from(tok.pad_id()), variant["pad"].as_u64().unwrap(), "{name} pad");
        let want_len = variant["max_length"].as_u64().unwrap_or(77);
        assert_eq!(tok.max_length() as u64, want_len, "{name} max_length");
        for case in variant["cases"].as_array().unwrap() {
            let prompt = case["prompt"].as_str().unwrap();
            assert_eq!(tok.encode_tokens(prompt).unwrap(), ids(&case["tokens"]), "{name} on {prompt:?}");
        }
    }
}

/// A folder with `tokenizer.json` (vocabulary, merges and added tokens inside it) tokenizes like the
/// vocab.json/merges.txt folder with the same configuration.
#[test]
fn tokenizer_json_folder_matches_vocab_merges_folder() {
    let fx = fixture();
    for name in ["tokenizer", "tokenizer_2"] {
        let src = folder(name);
        let dir = scratch_dir(&format!("{name}_json"));
        let vocab: Value = serde_json::from_str(&std::fs::read_to_string(src.join("vocab.json")).unwrap()).unwrap();
        let merges: Vec<Value> = std::fs::read_to_string(src.join("merges.txt"))
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with("#version"))
            .map(|l| Value::String(l.to_string()))
            .collect();
        let pad = if name == "tokenizer" { "<|endoftext|>" } else { "!" };
        let mut added = vec![
            serde_json::json!({"id": 49406, "content": "<|startoftext|>", "single_word": false, "lstrip": false,
                               "rstrip": false, "normalized": true, "special": true}),
            serde_json::json!({"id": 49407, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
                               "rstrip": false, "normalized": name != "tokenizer", "special": true}),
        ];
        if pad == "!" {
            added.insert(
                0,
                serde_json::json!({"id": 0, "content": "!", "single_word": false, "lstrip": false, "rstrip": false,
                                   "normalized": false, "special": true}),
            );
        }
        let json = serde_json::json!({
            "version": "1.0",
            "added_tokens": added,
            "model": {"type": "BPE", "vocab": vocab, "merges": merges, "end_of_word_suffix": "</w>"},
        });
        std::fs::write(dir.join("tokenizer.json"), serde_json::to_string(&json).unwrap()).unwrap();
        for f in ["tokenizer_config.json", "special_tokens_map.json"] {
            std::fs::copy(src.join(f), dir.join(f)).unwrap();
        }
        let from_json = ClipTokenizer::from_dir(&dir).unwrap();
        let from_files = load(name);
        assert_eq!(
            (from_json.bos_id(), from_json.eos_id(), from_json.pad_id(), from_json.max_length()),
            (from_files.bos_id(), from_files.eos_id(), from_files.pad_id(), from_files.max_length())
        );
        for case in fx["prompts"].as_array().unwrap() {
            let text = prompt_text(case);
            assert_eq!(from_json.encode_padded(&text).unwrap(), ids(&case[name]["padded"]), "{name}: {text:?}");
        }
    }
}

#[test]
fn from_files_with_explicit_pad() {
    let src = folder("tokenizer");
    let tok = ClipTokenizer::from_files(&src.join("vocab.json"), &src.join("merges.txt"), "!", 77).unwrap();
    assert_eq!((tok.bos_id(), tok.eos_id(), tok.pad_id(), tok.max_length()), (49406, 49407, 0, 77));
    let ids = tok.encode_padded("a photo of a Grumpy cat, 8k!").unwrap();
    assert_eq!(&ids[..12], &[49406, 320, 1125, 539, 320, 23610, 2368, 267, 279, 330, 0, 49407]);
    let short =
        ClipTokenizer::from_files(&src.join("vocab.json"), &src.join("merges.txt"), "<|endoftext|>", 8).unwrap();
    assert_eq!(short.encode_padded("one two three four five six seven").unwrap().len(), 8);
    assert_eq!(short.truncated_count("one two three four five six seven").unwrap(), 1);
    assert!(ClipTokenizer::from_files(&src.join("vocab.json"), &src.join("merges.txt"), "<|endoftext|>", 1).is_err());
    let err = ClipTokenizer::from_files(&src.join("vocab.json"), &src.join("merges.txt"), "<notatoken>", 77)
        .unwrap_err()
        .to_string();
    assert!(err.contains("<notatoken>"), "{err}");
}

fn assert_names_file(err: Error, file: &str) {
    let shown = err.to_string();
    assert!(shown.contains(file), "error {shown:?} does not name {file}");
}

#[test]
fn missing_or_malformed_files_are_named() {
    let src = folder("tokenizer");
    // Missing vocab.json.
    let dir = scratch_dir("missing_vocab");
    std::fs::copy(src.join("merges.txt"), dir.join("merges.txt")).unwrap();
    std::fs::copy(src.join("tokenizer_config.json"), dir.join("tokenizer_config.json")).unwrap();
    let err = ClipTokenizer::from_dir(&dir).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert_names_file(err, "vocab.json");

    // Missing merges.txt.
    let dir = scratch_dir("missing_merges");
    std::fs::copy(src.join("vocab.json"), dir.join("vocab.json")).unwrap();
    assert_names_file(ClipTokenizer::from_dir(&dir).unwrap_err(), "merges.txt");

    // Malformed vocab.json, merges.txt and tokenizer_config.json.
    let dir = scratch_dir("malformed");
    std::fs::write(dir.join("vocab.json"), "{ not json").unwrap();
    std::fs::copy(src.join("merges.txt"), dir.join("merges.txt")).unwrap();
    let err = ClipTokenizer::from_dir(&dir).unwrap_err();
    assert!(matches!(err, Error::Model { .. }), "{err:?}");
    assert_names_file(err, "vocab.json");

    std::fs::copy(src.join("vocab.json"), dir.join("vocab.json")).unwrap();
    std::fs::write(dir.join("merges.txt"), "#version: 0.2\ni n\nthis line has three\n").unwrap();
    assert_names_file(ClipTokenizer::from_dir(&dir).unwrap_err(), "merges.txt");
    std::fs::write(dir.join("merges.txt"), "#version: 0.2\nnotatoken alsonot\n").unwrap();
    assert_names_file(ClipTokenizer::from_dir(&dir).unwrap_err(), "merges.txt");

    std::fs::copy(src.join("merges.txt"), dir.join("merges.txt")).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), "[1, 2").unwrap();
    assert_names_file(ClipTokenizer::from_dir(&dir).unwrap_err(), "tokenizer_config.json");
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"model_max_length": 1e30}"#).unwrap();
    assert_names_file(ClipTokenizer::from_dir(&dir).unwrap_err(), "tokenizer_config.json");
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"pad_token": "<|nope|>"}"#).unwrap();
    assert_names_file(ClipTokenizer::from_dir(&dir).unwrap_err(), "tokenizer_config.json");

    // Missing files given to from_files.
    let err = ClipTokenizer::from_files(&dir.join("nope.json"), &src.join("merges.txt"), "!", 77).unwrap_err();
    assert_names_file(err, "nope.json");
    let err = ClipTokenizer::from_dir(&scratch_dir("empty")).unwrap_err();
    assert_names_file(err, "vocab.json");
}
