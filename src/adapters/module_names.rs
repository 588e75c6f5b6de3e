//! Which module of the loaded model a LoRA key patches. kohya files flatten module paths with `_` (so
//! `to_out_0` could be `to.out.0` or `to_out.0`); rather than guess, every module of the loaded component is indexed
//! under its flattened name — in diffusers' layout and, for the UNet, in Stability's original (SGM) layout that
//! A1111-trained files use — and a stored name is looked up there. A name that matches no module is an error (a LoRA
//! for another architecture must not load with half its weights ignored).

use std::collections::HashMap;

use crate::loading::single_file::SGM_RESNET_LAYERS;
use crate::models::unet::UNetConfig;

/// The modules (weight tensors) of one loaded component, by every name a LoRA file may give them.
pub struct ModuleIndex {
    /// Flattened name (`.` → `_`) → the weight tensor's name in the loaded component.
    by_flat_name: HashMap<String, String>,
}

fn flatten(name: &str) -> String {
    name.replace('.', "_")
}

impl ModuleIndex {
    /// Indexes the `.weight` tensors among `tensor_names`; with `unet`, also under their SGM names. Text encoder
    /// modules are found with or without the `text_model.` prefix of transformers' layouts.
    pub fn new<'a>(tensor_names: impl Iterator<Item = &'a str>, unet: Option<&UNetConfig>) -> Self {
        let sgm = unet.map(sgm_prefixes);
        let mut by_flat_name = HashMap::new();
        for name in tensor_names {
            let Some(module) = name.strip_suffix(".weight") else { continue };
            by_flat_name.insert(flatten(module), name.to_string());
            match module.strip_prefix("text_model.") {
                Some(bare) => by_flat_name.insert(flatten(bare), name.to_string()),
                None => by_flat_name.insert(format!("text_model_{}", flatten(module)), name.to_string()),
            };
            if let Some(sgm_name) = sgm.as_ref().and_then(|prefixes| to_sgm(module, prefixes)) {
                by_flat_name.insert(flatten(&sgm_name), name.to_string());
            }
        }
        Self { by_flat_name }
    }

    /// The weight tensor a LoRA module (as the file names it, without its target prefix) patches.
    pub fn weight_of(&self, module: &str) -> Option<&str> {
        self.by_flat_name.get(&flatten(module)).map(String::as_str)
    }
}

/// A diffusers block prefix, its SGM counterpart, and whether its inner names are ResNet names to rename.
type Prefix = (String, String, bool);

/// The SGM layout of a UNet of this config: `input_blocks.i.j` count resnets (j = 0), their transformers (j = 1) and
/// down-samplers in order; `output_blocks.i.j` likewise for the up blocks, whose up-sampler follows the last resnet's
/// transformer (j = 2) or resnet (j = 1).
fn sgm_prefixes(cfg: &UNetConfig) -> Vec<Prefix> {
    let n = cfg.block_out_channels.len();
    let mut p: Vec<Prefix> = Vec::new();
    let mut push = |d: String, s: String, resnet: bool| p.push((d, s, resnet));
    for (d, s) in [
        ("conv_in.", "input_blocks.0.0."),
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("add_embedding.linear_1.", "label_emb.0.0."),
        ("add_embedding.linear_2.", "label_emb.0.2."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
        ("mid_block.attentions.0.", "middle_block.1."),
    ] {
        push(d.into(), s.into(), false);
    }
    push("mid_block.resnets.0.".into(), "middle_block.0.".into(), true);
    push("mid_block.resnets.1.".into(), "middle_block.2.".into(), true);
    let mut i = 1;
    for b in 0..n {
        let attention = cfg.down_block_types[b] == "CrossAttnDownBlock2D";
        for l in 0..cfg.layers_per_block.get(b) {
            push(format!("down_blocks.{b}.resnets.{l}."), format!("input_blocks.{i}.0."), true);
            if attention {
                push(format!("down_blocks.{b}.attentions.{l}."), format!("input_blocks.{i}.1."), false);
            }
            i += 1;
        }
        if b + 1 < n {
            push(format!("down_blocks.{b}.downsamplers.0.conv."), format!("input_blocks.{i}.0.op."), false);
            i += 1;
        }
    }
    let mut i = 0;
    for (u, kind) in cfg.up_block_types.iter().enumerate() {
        let attention = kind == "CrossAttnUpBlock2D";
        let layers = cfg.layers_per_block.get(n - 1 - u) + 1;
        for l in 0..layers {
            push(format!("up_blocks.{u}.resnets.{l}."), format!("output_blocks.{i}.0."), true);
            if attention {
                push(format!("up_blocks.{u}.attentions.{l}."), format!("output_blocks.{i}.1."), false);
            }
            if l + 1 == layers && u + 1 < n {
                let j = if attention { 2 } else { 1 };
                push(format!("up_blocks.{u}.upsamplers.0.conv."), format!("output_blocks.{i}.{j}.conv."), false);
            }
            i += 1;
        }
    }
    p
}

/// A diffusers UNet module's SGM name, if the layout has one.
fn to_sgm(module: &str, prefixes: &[Prefix]) -> Option<String> {
    let with_dot = format!("{module}.");
    let (d, s, resnet) =
        prefixes.iter().filter(|(d, _, _)| with_dot.starts_with(d.as_str())).max_by_key(|(d, _, _)| d.len())?;
    let inner = &with_dot[d.len()..];
    let renamed = resnet
        .then(|| {
            SGM_RESNET_LAYERS
                .iter()
                .find_map(|(sgm, diffusers)| inner.strip_prefix(diffusers).map(|r| format!("{sgm}{r}")))
        })
        .flatten();
    let inner = renamed.unwrap_or_else(|| inner.to_string());
    Some(format!("{s}{inner}").trim_end_matches('.').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sdxl_like() -> UNetConfig {
        serde_json::from_value(serde_json::json!({
            "block_out_channels": [32, 64, 64],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "layers_per_block": 2,
            "attention_head_dim": [1, 2, 4],
            "cross_attention_dim": 64,
            "transformer_layers_per_block": [1, 1, 2],
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 80,
            "in_channels": 4,
            "out_channels": 4,
            "sample_size": 16,
            "norm_num_groups": 32,
            "use_linear_projection": true,
            "mid_block_type": "UNetMidBlock2DCrossAttn"
        }))
        .unwrap()
    }

    #[test]
    fn sgm_names_follow_stabilitys_layout() {
        let p = sgm_prefixes(&sdxl_like());
        let sgm = |m: &str| to_sgm(m, &p).unwrap();
        assert_eq!(
            sgm("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
            "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
        );
        assert_eq!(sgm("down_blocks.0.resnets.1.conv1"), "input_blocks.2.0.in_layers.2");
        assert_eq!(sgm("down_blocks.0.downsamplers.0.conv"), "input_blocks.3.0.op");
        assert_eq!(sgm("down_blocks.1.resnets.0.conv_shortcut"), "input_blocks.4.0.skip_connection");
        assert_eq!(sgm("mid_block.attentions.0.proj_in"), "middle_block.1.proj_in");
        assert_eq!(sgm("mid_block.resnets.1.conv2"), "middle_block.2.out_layers.3");
        assert_eq!(sgm("up_blocks.0.attentions.2.proj_out"), "output_blocks.2.1.proj_out");
        assert_eq!(sgm("up_blocks.0.upsamplers.0.conv"), "output_blocks.2.2.conv");
        assert_eq!(sgm("up_blocks.1.upsamplers.0.conv"), "output_blocks.5.2.conv");
        assert_eq!(sgm("up_blocks.2.resnets.0.time_emb_proj"), "output_blocks.6.0.emb_layers.1");
        assert_eq!(sgm("time_embedding.linear_2"), "time_embed.2");
    }

    #[test]
    fn modules_are_found_under_every_layout() {
        let names = [
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.weight",
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.bias",
        ];
        let index = ModuleIndex::new(names.into_iter(), Some(&sdxl_like()));
        let want = Some(names[0]);
        assert_eq!(index.weight_of("down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0"), want);
        assert_eq!(index.weight_of("input_blocks_4_1_transformer_blocks_0_attn1_to_out_0"), want);
        assert_eq!(index.weight_of("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0"), want);
        assert_eq!(index.weight_of("input_blocks_5_1_transformer_blocks_0_attn1_to_out_0"), None);

        let te = ["text_model.encoder.layers.0.self_attn.q_proj.weight"];
        let index = ModuleIndex::new(te.into_iter(), None);
        assert_eq!(index.weight_of("text_model_encoder_layers_0_self_attn_q_proj"), Some(te[0]));
        assert_eq!(index.weight_of("text_model.encoder.layers.0.self_attn.q_proj"), Some(te[0]));
        let te5 = ["encoder.layers.0.self_attn.q_proj.weight"];
        let index = ModuleIndex::new(te5.into_iter(), None);
        assert_eq!(index.weight_of("text_model_encoder_layers_0_self_attn_q_proj"), Some(te5[0]));
    }
}
