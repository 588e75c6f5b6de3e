//! CLIP tokenizer (placeholder: being written).
