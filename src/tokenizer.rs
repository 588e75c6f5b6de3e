//! CLIP byte-level BPE tokenizer, matching what diffusers gets from transformers' `CLIPTokenizer`.
//!
//! transformers 5 builds `CLIPTokenizer` on the `tokenizers` library with a fixed pipeline, whatever the folder holds
//! (`tokenizer.json` only contributes its vocabulary, merges and added tokens): NFC, every whitespace run → one space,
//! lowercase; CLIP's split regex keeping only its matches; byte-level mapping; BPE with the `</w>` end-of-word
//! suffix. There is no ftfy/HTML clean-up. We build the same pipeline with the same library.
//!
//! The special tokens (`bos`, `eos`, `unk`, `pad`, ... from `tokenizer_config.json`) are *added tokens*: they are cut
//! out of the text before BPE. This matters for SDXL's second tokenizer, whose pad token is `"!"`: every `!` in a
//! prompt becomes id 0 there (and `!</w>`, id 256, in the first tokenizer). Whether an added token is matched before
//! or after normalisation (its `normalized` flag) follows transformers' resolution: a token given as a plain string is
//! matched on the raw text, one given as an `AddedToken` dict uses its own flags, and the last special-token entry
//! (in the order bos, eos, unk, sep, pad, cls, mask) with a given content wins.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, NormalizerWrapper, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::{Error, Result};

/// CLIP's pre-tokenisation pattern (applied to lowercased text; only the matches are kept).
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";
/// CLIP's context length, used when a folder has no `tokenizer_config.json`.
const DEFAULT_MAX_LENGTH: usize = 77;
/// Larger `model_max_length` values are placeholders (transformers writes 1e30 when a model has no limit).
const MAX_SANE_LENGTH: usize = 1 << 16;
/// transformers' special-token attributes, in the order it registers them.
const SPECIAL_KEYS: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

/// A CLIP tokenizer as diffusers' SDXL pipeline calls it (`padding="max_length"`, `truncation=True`).
#[derive(Clone)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    max_length: usize,
    /// Textual-inversion words and the text each stands for (`name` → `name name_1 …`), as diffusers'
    /// `maybe_convert_prompt` expands them before tokenizing.
    expansions: Vec<(String, String)>,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &self.tokenizer.get_vocab_size(true))
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .field("max_length", &self.max_length)
            .finish()
    }
}

/// An added (special) token's content and matching flags, as transformers' `AddedToken`.
#[derive(Clone, Debug, PartialEq)]
struct TokenSpec {
    content: String,
    single_word: bool,
    lstrip: bool,
    rstrip: bool,
    normalized: bool,
    special: bool,
}

impl TokenSpec {
    /// A special token given as a plain string: matched on the raw text.
    fn plain(content: &str) -> Self {
        Self {
            content: content.to_string(),
            single_word: false,
            lstrip: false,
            rstrip: false,
            normalized: false,
            special: true,
        }
    }

    /// A token from a string or an `AddedToken`-like dict; `special` is the default of the `special` field (the
    /// default of `normalized` is `!special`, as in the `tokenizers` library).
    fn from_json(value: &Value, special: bool, file: &Path) -> Result<Self> {
        match value {
            Value::String(s) => Ok(Self::plain(s)),
            Value::Object(map) => {
                let content = map
                    .get("content")
                    .and_then(Value::as_str)
                    .ok_or_else(|| Error::model(file, format!("token entry without a string `content`: {value}")))?;
                let flag = |name: &str, default: bool| map.get(name).and_then(Value::as_bool).unwrap_or(default);
                let special = flag("special", special);
                Ok(Self {
                    content: content.to_string(),
                    single_word: flag("single_word", false),
                    lstrip: flag("lstrip", false),
                    rstrip: flag("rstrip", false),
                    normalized: flag("normalized", !special),
                    special,
                })
            }
            other => Err(Error::model(file, format!("expected a token string or object, found {other}"))),
        }
    }

    fn to_added_token(&self) -> AddedToken {
        AddedToken::from(self.content.clone(), self.special)
            .single_word(self.single_word)
            .lstrip(self.lstrip)
            .rstrip(self.rstrip)
            .normalized(self.normalized)
    }
}

/// What a tokenizer folder's configuration files say about special tokens and length.
#[derive(Debug)]
struct SpecialTokens {
    /// `added_tokens_decoder` (or, in the legacy layout, `tokenizer.json`'s `added_tokens`), sorted by id.
    decoder: Vec<(u64, TokenSpec)>,
    /// `bos_token`, `eos_token`, ... in [`SPECIAL_KEYS`] order.
    named: Vec<(&'static str, TokenSpec)>,
    /// `additional_special_tokens` / `extra_special_tokens`.
    extra: Vec<TokenSpec>,
    max_length: usize,
}

impl SpecialTokens {
    /// CLIPTokenizer's defaults with an explicit pad token and length.
    fn defaults(pad_token: &str, max_length: usize) -> Self {
        let named = vec![
            ("bos_token", TokenSpec::plain(BOS)),
            ("eos_token", TokenSpec::plain(EOS)),
            ("unk_token", TokenSpec::plain(EOS)),
            ("pad_token", TokenSpec::plain(pad_token)),
        ];
        Self { decoder: Vec::new(), named, extra: Vec::new(), max_length }
    }

    fn get(&self, key: &str) -> Option<&TokenSpec> {
        self.named.iter().find(|(k, _)| *k == key).map(|(_, t)| t)
    }

    /// Reads `tokenizer_config.json` (and, as transformers does when that has no `added_tokens_decoder`,
    /// `special_tokens_map.json` and `tokenizer.json`'s added tokens).
    fn from_dir(dir: &Path, tokenizer_json: Option<&Value>) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let config = match read_json_if_exists(&config_path)? {
            Some(Value::Object(map)) => map,
            Some(_) => return Err(Error::model(&config_path, "expected a JSON object")),
            None => serde_json::Map::new(),
        };
        let mut values: HashMap<&'static str, (Value, PathBuf)> = HashMap::new();
        for key in SPECIAL_KEYS {
            if let Some(v) = config.get(key).filter(|v| !v.is_null()) {
                values.insert(key, (v.clone(), config_path.clone()));
            }
        }

        let mut decoder = Vec::new();
        if let Some(entries) = config.get("added_tokens_decoder").filter(|v| !v.is_null()) {
            let entries = entries
                .as_object()
                .ok_or_else(|| Error::model(&config_path, "`added_tokens_decoder` is not an object"))?;
            for (id, entry) in entries {
                let id = id.parse::<u64>().map_err(|_| {
                    Error::model(&config_path, format!("`added_tokens_decoder` key `{id}` is not an id"))
                })?;
                decoder.push((id, TokenSpec::from_json(entry, false, &config_path)?));
            }
        } else {
            let map_path = dir.join("special_tokens_map.json");
            match read_json_if_exists(&map_path)? {
                Some(Value::Object(map)) => {
                    for key in SPECIAL_KEYS {
                        if let Some(v) = map.get(key).filter(|v| !v.is_null()) {
                            // Dicts in this file are special tokens (normalized defaults to false).
                            let v = match v {
                                Value::Object(o) => {
                                    let mut o = o.clone();
                                    o.insert("special".into(), Value::Bool(true));
                                    Value::Object(o)
                                }
                                other => other.clone(),
                            };
                            values.insert(key, (v, map_path.clone()));
                        }
                    }
                }
                Some(_) => return Err(Error::model(&map_path, "expected a JSON object")),
                None => {}
            }
            if let Some(added) = tokenizer_json.and_then(|j| j.get("added_tokens")).and_then(Value::as_array) {
                let path = dir.join("tokenizer.json");
                for entry in added {
                    let id = entry
                        .get("id")
                        .and_then(Value::as_u64)
                        .ok_or_else(|| Error::model(&path, format!("added token without an id: {entry}")))?;
                    decoder.push((id, TokenSpec::from_json(entry, false, &path)?));
                }
            }
        }
        decoder.sort_by_key(|(id, _)| *id);

        // Named tokens: CLIPTokenizer's defaults where the config is silent; a name whose content is in the decoder
        // table takes that entry (transformers swaps in the decoder's AddedToken).
        let defaults = Self::defaults(EOS, DEFAULT_MAX_LENGTH);
        let mut named = Vec::new();
        for key in SPECIAL_KEYS {
            let spec = match values.get(key) {
                Some((v, path)) => TokenSpec::from_json(v, false, path)?,
                None => match defaults.get(key) {
                    Some(spec) => spec.clone(),
                    None => continue,
                },
            };
            let spec = decoder.iter().find(|(_, t)| t.content == spec.content).map_or(spec, |(_, t)| t.clone());
            named.push((key, spec));
        }

        let mut extra = Vec::new();
        for key in ["additional_special_tokens", "extra_special_tokens"] {
            if let Some(list) = config.get(key).and_then(Value::as_array) {
                for v in list {
                    extra.push(TokenSpec::from_json(v, true, &config_path)?);
                }
            }
        }

        let max_length = match config.get("model_max_length") {
            None | Some(Value::Null) => DEFAULT_MAX_LENGTH,
            Some(v) => v
                .as_u64()
                .or_else(|| v.as_f64().filter(|f| *f >= 0.0 && f.fract() == 0.0).map(|f| f as u64))
                .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
                .ok_or_else(|| Error::model(&config_path, format!("`model_max_length` is not a length: {v}")))?,
        };
        Ok(Self { decoder, named, extra, max_length })
    }
}

fn read_json_if_exists(path: &Path) -> Result<Option<Value>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map(Some).map_err(|e| Error::model(path, format!("invalid JSON: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::model(path, format!("invalid JSON: {e}")))
}

/// A vocabulary object (`token → id`).
fn parse_vocab(value: &Value, path: &Path) -> Result<HashMap<String, u32>> {
    let map = value.as_object().ok_or_else(|| Error::model(path, "the vocabulary is not a JSON object"))?;
    map.iter()
        .map(|(token, id)| {
            id.as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .map(|id| (token.clone(), id))
                .ok_or_else(|| Error::model(path, format!("token {token:?} has no valid id: {id}")))
        })
        .collect()
}

/// `merges.txt`: an optional `#version` line, then one `left right` pair per line.
fn parse_merges_txt(text: &str, path: &Path) -> Result<Vec<(String, String)>> {
    text.lines()
        .filter(|line| !line.starts_with("#version"))
        .enumerate()
        .map(|(i, line)| match line.split(' ').collect::<Vec<_>>()[..] {
            [a, b] => Ok((a.to_string(), b.to_string())),
            _ => Err(Error::model(path, format!("merge {} is not two space-separated tokens: {line:?}", i + 1))),
        })
        .collect()
}

/// `tokenizer.json`'s merges: `"a b"` strings or `["a", "b"]` pairs.
fn parse_merges_json(value: &Value, path: &Path) -> Result<Vec<(String, String)>> {
    let list = value.as_array().ok_or_else(|| Error::model(path, "`model.merges` is not a list"))?;
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let pair = match m {
                Value::String(s) => s.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())),
                Value::Array(p) => match &p[..] {
                    [Value::String(a), Value::String(b)] => Some((a.clone(), b.clone())),
                    _ => None,
                },
                _ => None,
            };
            pair.ok_or_else(|| Error::model(path, format!("merge {} is not a token pair: {m}", i + 1)))
        })
        .collect()
}

impl ClipTokenizer {
    /// Loads a diffusers `tokenizer/` or `tokenizer_2/` folder: the vocabulary from `tokenizer.json` if present,
    /// otherwise `vocab.json` + `merges.txt`; `tokenizer_config.json` (and `special_tokens_map.json`) give the special
    /// tokens, the pad token and `model_max_length`. Without `tokenizer_config.json`, CLIP's defaults apply (pad
    /// `<|endoftext|>`, 77 tokens).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let json_path = dir.join("tokenizer.json");
        let (vocab, merges, tokenizer_json, source) = if json_path.is_file() {
            let json = read_json(&json_path)?;
            let model = json.get("model").ok_or_else(|| Error::model(&json_path, "no `model` section"))?;
            if model.get("type").and_then(Value::as_str).is_some_and(|t| t != "BPE") {
                return Err(Error::model(&json_path, "the model is not a BPE model"));
            }
            let vocab = parse_vocab(model.get("vocab").unwrap_or(&Value::Null), &json_path)?;
            let merges = parse_merges_json(model.get("merges").unwrap_or(&Value::Null), &json_path)?;
            (vocab, merges, Some(json), json_path)
        } else {
            let vocab_path = dir.join("vocab.json");
            let merges_path = dir.join("merges.txt");
            let vocab = parse_vocab(&read_json(&vocab_path)?, &vocab_path)?;
            let text = std::fs::read_to_string(&merges_path).map_err(|e| Error::io(&merges_path, e))?;
            (vocab, parse_merges_txt(&text, &merges_path)?, None, merges_path)
        };
        let special = SpecialTokens::from_dir(dir, tokenizer_json.as_ref())?;
        Self::build(vocab, merges, &special, &source, &dir.join("tokenizer_config.json"))
    }

    /// From `vocab.json` / `merges.txt` files with an explicit pad token and maximum length (BOS/EOS/UNK are CLIP's
    /// `<|startoftext|>` / `<|endoftext|>`, given as plain strings as CLIPTokenizer does by default).
    pub fn from_files(vocab: &Path, merges: &Path, pad_token: &str, max_length: usize) -> Result<Self> {
        let vocab_map = parse_vocab(&read_json(vocab)?, vocab)?;
        let text = std::fs::read_to_string(merges).map_err(|e| Error::io(merges, e))?;
        let merge_list = parse_merges_txt(&text, merges)?;
        Self::build(vocab_map, merge_list, &SpecialTokens::defaults(pad_token, max_length), merges, vocab)
    }

    /// CLIP's real BPE vocabulary, shipped inside the crate (single-file checkpoints carry no tokenizer). SDXL's
    /// first tokenizer pads with `<|endoftext|>`, the second with `!`.
    pub fn builtin(pad_token: &str) -> Result<Self> {
        const VOCAB: &str = include_str!("../assets/clip-tokenizer/vocab.json");
        const MERGES: &str = include_str!("../assets/clip-tokenizer/merges.txt");
        let origin = Path::new("<built-in CLIP vocabulary>");
        let value: Value =
            serde_json::from_str(VOCAB).map_err(|e| Error::model(origin, format!("invalid JSON: {e}")))?;
        let vocab = parse_vocab(&value, origin)?;
        let merges = parse_merges_txt(MERGES, origin)?;
        Self::build(vocab, merges, &SpecialTokens::defaults(pad_token, 77), origin, origin)
    }

    /// Builds the tokenizer. `model_file` is named in errors about the vocabulary/merges, `config_file` in errors
    /// about special tokens.
    fn build(
        vocab: HashMap<String, u32>,
        merges: Vec<(String, String)>,
        special: &SpecialTokens,
        model_file: &Path,
        config_file: &Path,
    ) -> Result<Self> {
        if !(2..=MAX_SANE_LENGTH).contains(&special.max_length) {
            return Err(Error::model(
                config_file,
                format!(
                    "model_max_length {} is not a usable sequence length (2..={MAX_SANE_LENGTH})",
                    special.max_length
                ),
            ));
        }
        // BOS, EOS and PAD must be tokens the text encoder can embed. (transformers would append an unknown one as
        // a new id past the embedding table.)
        let id_of = |key: &str| -> Result<u32> {
            let content = special.get(key).map_or(EOS, |t| t.content.as_str());
            vocab
                .get(content)
                .copied()
                .ok_or_else(|| Error::model(config_file, format!("{key} {content:?} is not in the vocabulary")))
        };
        let (bos_id, eos_id, pad_id) = (id_of("bos_token")?, id_of("eos_token")?, id_of("pad_token")?);
        let unk = special.get("unk_token").map_or(EOS, |t| t.content.as_str()).to_string();
        // Other special tokens outside the vocabulary would likewise get ids the model cannot embed; leave them out.
        let in_vocab = |t: &&TokenSpec| vocab.contains_key(&t.content);
        let named = special.named.iter().map(|(_, t)| t).filter(in_vocab);
        let decoder_only = special
            .decoder
            .iter()
            .map(|(_, t)| t)
            .filter(|t| !special.named.iter().any(|(_, n)| n.content == t.content))
            .filter(in_vocab);
        let added: Vec<AddedToken> = decoder_only
            .chain(named)
            .chain(special.extra.iter().filter(in_vocab))
            .map(TokenSpec::to_added_token)
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab.into_iter().collect::<Vocab>(), merges)
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".to_string())
            .unk_token(unk)
            .fuse_unk(false)
            .build()
            .map_err(|e| Error::model(model_file, format!("invalid BPE vocabulary/merges: {e}")))?;

        let pipeline_err =
            |e: tokenizers::Error| Error::Tokenizer(format!("building the CLIP tokenizer pipeline: {e}"));
        let normalizer = NormalizerSequence::new(vec![
            NormalizerWrapper::NFC(NFC),
            NormalizerWrapper::Replace(Replace::new(ReplacePattern::Regex(r"\s+".into()), " ").map_err(pipeline_err)?),
            NormalizerWrapper::Lowercase(Lowercase),
        ]);
        let pre_tokenizer = PreTokenizerSequence::new(vec![
            PreTokenizerWrapper::Split(
                Split::new(SplitPattern::Regex(CLIP_PATTERN.into()), SplitDelimiterBehavior::Removed, true)
                    .map_err(pipeline_err)?,
            ),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
        ]);
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_normalizer(Some(normalizer)).map_err(pipeline_err)?;
        tokenizer.with_pre_tokenizer(Some(pre_tokenizer));

        // transformers first adds the decoder table's tokens (by id), then every named special token, then the extra
        // ones; re-adding a content with other flags replaces them, so the last entry wins.
        tokenizer
            .add_special_tokens(added)
            .map_err(|e| Error::model(config_file, format!("cannot add the special tokens: {e}")))?;

        Ok(Self { tokenizer, bos_id, eos_id, pad_id, max_length: special.max_length, expansions: Vec::new() })
    }

    /// Token ids of `text` without BOS/EOS, untruncated.
    pub fn encode_tokens(&self, text: &str) -> Result<Vec<u32>> {
        let mut text = std::borrow::Cow::Borrowed(text);
        for (word, expansion) in &self.expansions {
            if text.contains(word.as_str()) {
                text = std::borrow::Cow::Owned(text.replace(word.as_str(), expansion));
            }
        }
        let encoding = self
            .tokenizer
            .encode(text.as_ref(), false)
            .map_err(|e| Error::Tokenizer(format!("tokenizing the prompt: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Adds a textual-inversion embedding's tokens (`tokens[0]` is the word a prompt uses) after the vocabulary, as
    /// transformers' `add_tokens` does, and returns their ids.
    pub fn add_embedding_tokens(&mut self, tokens: &[String]) -> Result<Vec<u32>> {
        let added: Vec<AddedToken> = tokens.iter().map(|t| AddedToken::from(t.clone(), false)).collect();
        self.tokenizer.add_tokens(added).map_err(|e| Error::Tokenizer(format!("adding embedding tokens: {e}")))?;
        let ids = tokens
            .iter()
            .map(|t| {
                self.tokenizer
                    .token_to_id(t)
                    .ok_or_else(|| Error::Tokenizer(format!("the embedding token {t:?} could not be added")))
            })
            .collect::<Result<Vec<u32>>>()?;
        if tokens.len() > 1 {
            self.expansions.push((tokens[0].clone(), tokens.join(" ")));
        }
        Ok(ids)
    }

    /// The vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// diffusers' call (`padding="max_length"`, `max_length=model_max_length`, `truncation=True`):
    /// BOS + tokens (cut to `max_length - 2`) + EOS, padded with the pad id to `max_length`.
    pub fn encode_padded(&self, text: &str) -> Result<Vec<u32>> {
        let tokens = self.encode_tokens(text)?;
        let kept = tokens.len().min(self.max_length - 2);
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend_from_slice(&tokens[..kept]);
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        Ok(ids)
    }

    /// How many tokens of `text` [`encode_padded`](Self::encode_padded) cuts off.
    pub fn truncated_count(&self, text: &str) -> Result<usize> {
        Ok(self.encode_tokens(text)?.len().saturating_sub(self.max_length - 2))
    }

    /// The id of a vocabulary entry (`",</w>"`), if it has one.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// The vocabulary entry of an id (`"cat</w>"`), if there is one.
    pub fn token(&self, id: u32) -> Option<String> {
        self.tokenizer.id_to_token(id)
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The padded sequence length (`model_max_length`, 77 for SDXL).
    pub fn max_length(&self) -> usize {
        self.max_length
    }
}
