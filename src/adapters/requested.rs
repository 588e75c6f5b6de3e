//! The LoRAs a request names: its `loras` field and A1111's `<lora:NAME:WEIGHT>` prompt tags, resolved to files of
//! one LoRA directory (a name can never reach a file outside it), and A1111's short hash of a LoRA file for the PNG
//! `parameters` chunk.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::LoraSpec;
use crate::{Error, Result};

/// One LoRA of a request body: `{"name": "…", "weight": 0.8}` (weight 1 when absent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraRequest {
    pub name: String,
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

/// A1111's extra-network tags (`<TYPE:ARGS>`) are removed from the prompt; the `lora` ones are returned as
/// (name, weight): `<lora:NAME>` is weight 1, `<lora:NAME:W>` weight W. As in A1111, only the positive prompt's
/// tags are read (a negative prompt's stay text).
pub fn take_prompt_tags(prompt: &str) -> Result<(String, Vec<LoraRequest>)> {
    let mut text = String::with_capacity(prompt.len());
    let mut found = Vec::new();
    let mut rest = prompt;
    while let Some(start) = rest.find('<') {
        text.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        // A1111: `<(\w+):([^>]+)>`.
        let kind_len = after.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(after.len());
        let tag = (kind_len > 0 && after[kind_len..].starts_with(':'))
            .then(|| after[kind_len + 1..].find('>').filter(|&end| end > 0).map(|end| (kind_len, end)))
            .flatten();
        let Some((kind_len, end)) = tag else {
            text.push('<');
            rest = after;
            continue;
        };
        let (kind, args) = (&after[..kind_len], &after[kind_len + 1..kind_len + 1 + end]);
        if kind != "lora" {
            return Err(Error::invalid(
                "prompt",
                format!("extra network `<{kind}:…>` is not supported (only <lora:NAME:WEIGHT>)"),
            ));
        }
        let items: Vec<&str> = args.split(':').collect();
        let weight =
            match items.as_slice() {
                [_] => 1.0,
                [_, w] => w.trim().parse::<f64>().ok().filter(|w| w.is_finite()).ok_or_else(|| {
                    Error::invalid("prompt", format!("<lora:{args}>: the weight {w:?} is not a number"))
                })?,
                _ => {
                    return Err(Error::invalid(
                        "prompt",
                        format!(
                    "<lora:{args}>: only a name and one weight are supported (no separate text-encoder/UNet weights)"
                ),
                    ))
                }
            };
        found.push(LoraRequest { name: items[0].trim().to_string(), weight });
        rest = &after[kind_len + 1 + end + 1..];
    }
    text.push_str(rest);
    Ok((text, found))
}

/// The file of LoRA `name` in `dir`: `dir/NAME.safetensors` (sub-folders as `a/b`). A name that is absolute, holds
/// `..`, or resolves (through links) outside `dir` is refused; a missing one lists the LoRAs `dir` has.
pub fn resolve_in_dir(dir: &Path, name: &str) -> Result<PathBuf> {
    let relative = Path::new(name);
    let escapes = relative.components().any(|c| !matches!(c, Component::Normal(_)));
    if name.is_empty() || escapes || name.contains('\\') {
        return Err(Error::invalid(
            "loras",
            format!("LoRA name {name:?} must be a file stem inside the LoRA directory"),
        ));
    }
    let path = dir.join(format!("{name}.safetensors"));
    let root = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
    match path.canonicalize() {
        Ok(real) if real.starts_with(&root) => Ok(real),
        Ok(_) => Err(Error::invalid("loras", format!("LoRA name {name:?} resolves outside the LoRA directory"))),
        Err(_) => {
            let available = available_in_dir(&root);
            Err(Error::invalid(
                "loras",
                format!(
                    "no LoRA {name:?} in {} (available: {})",
                    dir.display(),
                    if available.is_empty() { "none".to_string() } else { available.join(", ") }
                ),
            ))
        }
    }
}

/// The LoRA names (`.safetensors` stems, sub-folders as `a/b`) under `dir`, sorted.
pub fn available_in_dir(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(root, &path, out);
            } else if path.extension().is_some_and(|e| e == "safetensors") {
                if let Ok(rel) = path.with_extension("").strip_prefix(root) {
                    out.push(rel.to_string_lossy().replace('\\', "/"));
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// The LoRA specs of `requests`, their files in `dir` (an error names the field when there is no directory).
pub fn specs_in_dir(dir: Option<&Path>, requests: &[LoraRequest]) -> Result<Vec<LoraSpec>> {
    if requests.is_empty() {
        return Ok(Vec::new());
    }
    let dir = dir.ok_or_else(|| {
        Error::invalid("loras", "names LoRAs, but no LoRA directory is configured (--lora-dir)".to_string())
    })?;
    requests.iter().map(|r| Ok(LoraSpec { path: resolve_in_dir(dir, &r.name)?, weight: r.weight })).collect()
}

/// A1111's short hash of a LoRA file: the first 12 hex digits of the SHA-256 of everything after the safetensors
/// header (the "addnet" hash civitai matches).
pub fn short_hash(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| Error::io(path, e))?;
    file.seek(SeekFrom::Start(8 + u64::from_le_bytes(len))).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    let digest = hasher.finalize();
    Ok(digest.iter().take(6).map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_removed_and_read_as_a1111_does() {
        let (text, loras) = take_prompt_tags("a cat <lora:style:0.6>, <lora:sub/detail> 8k").unwrap();
        assert_eq!(text, "a cat ,  8k");
        assert_eq!(
            loras,
            vec![
                LoraRequest { name: "style".into(), weight: 0.6 },
                LoraRequest { name: "sub/detail".into(), weight: 1.0 }
            ]
        );
        assert_eq!(take_prompt_tags("a <b> c < d >").unwrap(), ("a <b> c < d >".to_string(), vec![]));
        assert_eq!(take_prompt_tags("x <lora:n:-1.5>").unwrap().1[0].weight, -1.5);
        for bad in ["<hypernet:x:1>", "<lora:x:abc>", "<lora:x:1:0.5>"] {
            assert!(take_prompt_tags(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_never_leave_the_directory() {
        let dir = std::env::temp_dir().join(format!("dreamshaper-loradir-{}", std::process::id()));
        struct Remove(PathBuf);
        impl Drop for Remove {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let _cleanup = Remove(dir.clone());
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("a.safetensors"), b"x").unwrap();
        std::fs::write(dir.join("sub/b.safetensors"), b"x").unwrap();
        assert!(resolve_in_dir(&dir, "a").is_ok());
        assert!(resolve_in_dir(&dir, "sub/b").is_ok());
        for bad in ["../a", "/etc/passwd", "sub/../../a", "", "..\\a"] {
            assert!(resolve_in_dir(&dir, bad).is_err(), "{bad:?}");
        }
        let e = resolve_in_dir(&dir, "c").unwrap_err().to_string();
        assert!(e.contains("a, sub/b"), "{e}");
    }
}
