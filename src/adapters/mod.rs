//! Adapters that patch a model's weights: LoRA files (kohya/A1111 and diffusers/PEFT layouts) whose low-rank
//! updates are merged into the weights when a component is loaded (`W + w·scale·up·down`, in f32, then the run
//! dtype), so the denoising loop costs the same with or without them.
//!
//! Reading a file ([`lora_file`]) is apart from naming ([`module_names`]: which module of the loaded model a stored
//! key patches) and from the merge ([`merge`]: the weight source that adds the updates).

pub mod embeddings;
pub mod lora_file;
pub mod merge;
pub mod module_names;
pub mod requested;

pub use lora_file::{LoraFile, LoraSpec, LowRank, Target};
pub use merge::{LoraBackend, ResolvedUpdates};
pub use requested::LoraRequest;
