//! API keys, checked in constant time against the configured keys, as each dialect's clients send them: the hosted
//! API's `x-api-key` header, OpenAI's `Authorization: Bearer KEY`, and HTTP Basic (`--api-auth user:KEY` in A1111's
//! clients: the password is the key, the user name is not checked).

use std::path::Path;

use axum::http::HeaderMap;
use subtle::{Choice, ConstantTimeEq};

use super::errors::ApiError;

/// The header the hosted API reads the key from.
pub const API_KEY_HEADER: &str = "x-api-key";

/// The accepted keys; none means the server is open (fine on loopback).
#[derive(Clone, Default)]
pub struct ApiKeys {
    keys: Vec<Vec<u8>>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the keys themselves.
        write!(f, "ApiKeys({} configured)", self.keys.len())
    }
}

impl ApiKeys {
    /// No key required.
    pub fn none() -> Self {
        Self::default()
    }

    /// These keys (each non-empty, surrounding whitespace removed).
    pub fn new<I, S>(keys: I) -> Result<Self, String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let keys: Vec<Vec<u8>> = keys.into_iter().map(|k| k.as_ref().trim().as_bytes().to_vec()).collect();
        if keys.iter().any(Vec::is_empty) {
            return Err("an API key must not be empty".into());
        }
        Ok(Self { keys })
    }

    /// One key per line; blank lines and lines starting with `#` are skipped. A file without any key is an error.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("--api-keys-file {}: {e}", path.display()))?;
        let keys: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
        if keys.is_empty() {
            return Err(format!("--api-keys-file {}: no key in the file", path.display()));
        }
        Self::new(keys)
    }

    pub fn is_enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether `presented` is one of the keys. Every key is compared, each in time that depends on the lengths
    /// only, so the answer's timing tells nothing about which bytes (or which key) matched.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        let mut any = Choice::from(0);
        for key in &self.keys {
            any |= constant_time_eq(key, presented);
        }
        any.into()
    }

    /// Ok when no key is configured or the request presents one of the keys (see [`presented_key`]); 401
    /// otherwise.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if !self.is_enabled() {
            return Ok(());
        }
        match presented_key(headers) {
            Some(key) if self.accepts(&key) => Ok(()),
            _ => Err(ApiError::unauthorized()),
        }
    }
}

/// The key a request presents: `x-api-key`, else `Authorization: Bearer KEY`, else the password of
/// `Authorization: Basic base64(user:password)`.
pub fn presented_key(headers: &HeaderMap) -> Option<Vec<u8>> {
    if let Some(value) = headers.get(API_KEY_HEADER) {
        return Some(value.as_bytes().to_vec());
    }
    let authorization = headers.get(axum::http::header::AUTHORIZATION)?.as_bytes();
    let (scheme, credentials) = authorization.split_at(authorization.iter().position(|&b| b == b' ')?);
    let credentials = credentials.trim_ascii();
    if scheme.eq_ignore_ascii_case(b"bearer") {
        return Some(credentials.to_vec());
    }
    if scheme.eq_ignore_ascii_case(b"basic") {
        use base64::Engine;
        let decoded = base64::engine::general_purpose::STANDARD.decode(credentials).ok()?;
        let colon = decoded.iter().position(|&b| b == b':')?;
        return Some(decoded[colon + 1..].to_vec());
    }
    None
}

/// Byte-wise equality whose running time depends on the two lengths, never on the contents.
fn constant_time_eq(a: &[u8], b: &[u8]) -> Choice {
    let mut equal = (a.len() as u64).ct_eq(&(b.len() as u64));
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        equal &= x.ct_eq(&y);
    }
    equal
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_whole_keys() {
        let keys = ApiKeys::new(["secret-one", " secret-two "]).unwrap();
        assert!(keys.accepts(b"secret-one"));
        assert!(keys.accepts(b"secret-two"));
        for wrong in [&b""[..], b"secret", b"secret-one2", b"secret-onf", b"SECRET-ONE", b"secret-one\0"] {
            assert!(!keys.accepts(wrong), "{wrong:?}");
        }
        assert!(ApiKeys::new([""]).is_err());
    }

    #[test]
    fn no_keys_means_open() {
        let keys = ApiKeys::none();
        assert!(!keys.is_enabled());
        assert!(keys.check(&HeaderMap::new()).is_ok());
    }

    #[test]
    fn header_check() {
        let keys = ApiKeys::new(["k1"]).unwrap();
        let mut headers = HeaderMap::new();
        assert_eq!(keys.check(&headers).unwrap_err().status, axum::http::StatusCode::UNAUTHORIZED);
        headers.insert(API_KEY_HEADER, "k2".parse().unwrap());
        assert!(keys.check(&headers).is_err());
        headers.insert(API_KEY_HEADER, "k1".parse().unwrap());
        assert!(keys.check(&headers).is_ok());
    }

    #[test]
    fn bearer_and_basic_credentials_are_keys_too() {
        let keys = ApiKeys::new(["k1"]).unwrap();
        let with = |name: &str, value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(), value.parse().unwrap());
            keys.check(&headers).is_ok()
        };
        assert!(with("authorization", "Bearer k1") && with("authorization", "bearer  k1 "));
        assert!(!with("authorization", "Bearer k2") && !with("authorization", "k1"));
        // user:k1 and :k1, base64.
        assert!(with("authorization", "Basic dXNlcjprMQ==") && with("authorization", "Basic Omsx"));
        assert!(!with("authorization", "Basic dXNlcjprMg==") && !with("authorization", "Basic !!"));
        assert!(with("x-api-key", "k1"));
    }

    #[test]
    fn key_file_skips_comments_and_blank_lines() {
        /// Removes the key file when the test ends, passed or failed.
        struct RemoveOnDrop(std::path::PathBuf);
        impl Drop for RemoveOnDrop {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
        let file = RemoveOnDrop(std::env::temp_dir().join(format!("dreamshaper-keys-{}", std::process::id())));
        let path = &file.0;
        std::fs::write(path, "# team keys\n\nalpha\n  beta  \n").unwrap();
        let keys = ApiKeys::from_file(path).unwrap();
        assert_eq!(keys.len(), 2);
        assert!(keys.accepts(b"alpha") && keys.accepts(b"beta") && !keys.accepts(b"# team keys"));
        std::fs::write(path, "# nothing\n").unwrap();
        assert!(ApiKeys::from_file(path).unwrap_err().contains("no key"));
    }
}
