//! Shared helpers for the tests: the tiny model, diffusers' reference tensors and comparisons, temporary folders.
#![allow(dead_code)]

use std::collections::HashMap;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor};

pub mod http;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn tiny_model() -> PathBuf {
    root().join("models/tiny-sdxl")
}

pub struct Reference {
    pub tensors: HashMap<String, Tensor>,
    pub json: serde_json::Value,
}

impl Reference {
    pub fn load() -> Self {
        let dir = root().join("tests/fixtures");
        let tensors = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
        let json = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
        Self { tensors, json }
    }

    pub fn get(&self, name: &str) -> Tensor {
        self.tensors.get(name).unwrap_or_else(|| panic!("reference tensor {name} missing")).clone()
    }
}

/// max |a − b| / max |b|: the error relative to the reference's scale.
pub fn relative_error(actual: &Tensor, expected: &Tensor) -> f64 {
    assert_eq!(actual.dims(), expected.dims(), "shape mismatch");
    let a = actual.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let b = expected.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
    let diff = a.iter().zip(&b).fold(0f64, |m, (x, y)| m.max((x - y).abs()));
    diff / scale
}

#[track_caller]
pub fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, tolerance: f64) {
    let err = relative_error(actual, expected);
    assert!(err <= tolerance, "{what}: relative error {err:e} > {tolerance:e}");
    eprintln!("{what}: relative error {err:.2e}");
}

/// Mean absolute difference of two u8 image stacks, in units of 1/255.
pub fn mean_abs_pixel_diff(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).abs()).sum::<f64>() / a.len() as f64
}

/// A new, empty folder under the system temp dir, removed with everything in it when the guard is dropped: at the
/// end of the test, and also when the test panics (unwinding drops it). Named `dreamshaper-{label}-{pid}-{n}`, so
/// tests running in parallel (threads of one process, or several test binaries) never share one.
///
/// It dereferences to [`Path`] (`dir.join("out.png")`, `&dir` where a `&Path` is wanted) and is `AsRef<Path>`
/// (`std::fs::read_dir(&dir)`, `Command::current_dir(&dir)`). Declare it before anything that must be gone before
/// the folder is removed (a child process writing into it, an open file), since locals drop in reverse order.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `dreamshaper-{label}-{pid}-{n}` (`n` counts the guards made by this process).
    pub fn new(label: &str) -> Self {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let n = COUNT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("dreamshaper-{label}-{}-{n}", std::process::id()));
        // A folder left by an earlier process with the same pid (one that was killed before its guards dropped).
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Deref for TempDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // Best effort: a failure to clean up must not turn a passing test into a failing one (or a panic while
        // unwinding into an abort).
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
