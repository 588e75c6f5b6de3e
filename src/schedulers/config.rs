//! A model's `scheduler_config.json`, kept whole, and the typed reading of its keys with a class's defaults.

use std::path::Path;

use crate::{Error, Result};

/// A model's `scheduler_config.json`, kept whole: each scheduler reads the keys its diffusers class reads, with that
/// class's defaults for missing (or null) keys, as `Class.from_config(config)` does.
#[derive(Debug, Clone, Default)]
pub struct SchedulerConfig {
    values: serde_json::Map<String, serde_json::Value>,
}

impl SchedulerConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text).map_err(|m| Error::model(path, m))
    }

    pub fn from_json(text: &str) -> std::result::Result<Self, String> {
        let parsed = serde_json::from_str(text).or_else(|e| {
            // Python's json writes `-Infinity` for float('-inf') (diffusers' default `lambda_min_clipped`): read
            // such values as null, i.e. the class default.
            let cleaned =
                text.replace(": -Infinity", ": null").replace(": Infinity", ": null").replace(": NaN", ": null");
            serde_json::from_str(&cleaned).map_err(|_| e)
        });
        match parsed {
            Ok(serde_json::Value::Object(values)) => Ok(Self { values }),
            Ok(_) => Err("a scheduler config must be a JSON object".into()),
            Err(e) => Err(format!("invalid JSON: {e}")),
        }
    }

    /// Sets a key (the `**options` of `from_config`).
    pub fn with(mut self, key: &str, value: serde_json::Value) -> Self {
        self.values.insert(key.to_string(), value);
        self
    }

    fn get(&self, key: &str) -> Option<&serde_json::Value> {
        self.values.get(key).filter(|v| !v.is_null())
    }

    pub fn f64_or(&self, key: &str, default: f64) -> f64 {
        self.get(key).and_then(|v| v.as_f64()).unwrap_or(default)
    }

    pub fn usize_or(&self, key: &str, default: usize) -> usize {
        self.get(key).and_then(|v| v.as_u64()).map_or(default, |v| v as usize)
    }

    pub fn bool_or(&self, key: &str, default: bool) -> bool {
        self.get(key).and_then(|v| v.as_bool()).unwrap_or(default)
    }

    pub fn str_or<'a>(&'a self, key: &str, default: &'a str) -> &'a str {
        self.get(key).and_then(|v| v.as_str()).unwrap_or(default)
    }

    pub fn f64_list(&self, key: &str) -> Option<Vec<f64>> {
        self.get(key)?.as_array()?.iter().map(|v| v.as_f64()).collect()
    }

    /// A string-valued key read into one of `choices` (the class's `default` when absent); any other value is
    /// refused, naming the key and the accepted values.
    pub fn choice<T: Copy>(
        &self,
        scheduler: &'static str,
        key: &'static str,
        default: &str,
        choices: &[(&str, T)],
    ) -> Result<T> {
        let value = self.str_or(key, default);
        choices.iter().find(|(name, _)| *name == value).map(|&(_, v)| v).ok_or_else(|| {
            let accepted = choices.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ");
            Error::UnsupportedSchedulerConfig { scheduler, key, value: format!("{value:?}"), accepted }
        })
    }

    /// Refuses each of `keys` that is set to true: options of the diffusers class that this scheduler does not
    /// implement (their default, false, is what it does).
    pub fn refuse_enabled(&self, scheduler: &'static str, keys: &[&'static str]) -> Result<()> {
        match keys.iter().find(|key| self.bool_or(key, false)) {
            Some(&key) => Err(Error::UnsupportedSchedulerConfig {
                scheduler,
                key,
                value: "true".into(),
                accepted: "false (the class default)".into(),
            }),
            None => Ok(()),
        }
    }

    /// Refuses each of `keys` that is set to anything but null: options whose class default (`None`) is the only
    /// behaviour implemented.
    pub fn refuse_set(&self, scheduler: &'static str, keys: &[&'static str]) -> Result<()> {
        match keys.iter().find_map(|&key| self.get(key).map(|v| (key, v))) {
            Some((key, value)) => Err(Error::UnsupportedSchedulerConfig {
                scheduler,
                key,
                value: value.to_string(),
                accepted: "null (the class default)".into(),
            }),
            None => Ok(()),
        }
    }

    /// An optional non-negative integer key (`None` when absent or null); any other value (negative, fractional,
    /// not a number, beyond u64) is refused, naming the key.
    pub fn u64_opt(&self, scheduler: &'static str, key: &'static str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| Error::UnsupportedSchedulerConfig {
                scheduler,
                key,
                value: v.to_string(),
                accepted: "a non-negative integer below 2^64, or null".into(),
            }),
        }
    }

    /// An integer key that must lie in `range` (the class's `default` when absent).
    pub fn usize_in(
        &self,
        scheduler: &'static str,
        key: &'static str,
        default: usize,
        range: std::ops::RangeInclusive<usize>,
    ) -> Result<usize> {
        let value = self.usize_or(key, default);
        if range.contains(&value) {
            Ok(value)
        } else {
            let accepted = format!("{} to {}", range.start(), range.end());
            Err(Error::UnsupportedSchedulerConfig { scheduler, key, value: value.to_string(), accepted })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_infinities_read_as_the_class_default() {
        let config = SchedulerConfig::from_json(r#"{"lambda_min_clipped": -Infinity, "solver_order": 2}"#).unwrap();
        assert_eq!(config.f64_or("lambda_min_clipped", -1.0), -1.0);
        assert_eq!(config.usize_or("solver_order", 0), 2);
        assert!(SchedulerConfig::from_json("{nope").is_err());
    }
}
