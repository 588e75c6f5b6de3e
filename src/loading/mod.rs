//! Where weights and configs come from (a diffusers folder, the Hugging Face hub cache). The models know nothing
//! of this: they take a `VarBuilder` and a config.

pub mod mapped;
pub mod repo;
pub mod single_file;
pub mod source;
pub mod taesd;
pub mod weights;

pub use repo::{read_json, ModelRepo, DEFAULT_MODEL};
pub use source::{Component, ModelConfigs, ModelSource};
pub use taesd::{load_taesd, DEFAULT_TAESD};
pub use weights::Weights;
