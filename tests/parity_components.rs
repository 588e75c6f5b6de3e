//! Each pipeline stage against diffusers on the tiny model (f32): initial noise, token ids, both text encoders,
//! prompt encoding, one UNet call with SDXL's added conditioning, and the VAE decode.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, tiny_model, Reference};
use dreamshaper::models::unet::AddedConditioning;
use dreamshaper::rng::TorchRng;
use dreamshaper::{Pipeline, PipelineOptions};

const TOLERANCE: f64 = 1e-4;

fn pipeline() -> Pipeline {
    Pipeline::load(tiny_model().to_str().unwrap(), PipelineOptions::default()).unwrap()
}

fn shape(v: &serde_json::Value) -> Vec<usize> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect()
}

#[test]
fn initial_latents_match_torch_for_every_seed() {
    let r = Reference::load();
    for case in r.json["latents"].as_array().unwrap() {
        let seed = case["seed"].as_u64().unwrap();
        let noise = TorchRng::new(seed).randn_tensor(&shape(&case["shape"]), &Device::Cpu).unwrap();
        assert_close(&format!("latents seed {seed}"), &noise, &r.get(case["tensor"].as_str().unwrap()), 1e-6);
    }
}

#[test]
fn token_ids_and_text_encoders_match() {
    let r = Reference::load();
    let encoders = pipeline().load_text_encoders().unwrap();
    for case in r.json["text_encoders"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let ids1 = encoders.tokenizer.encode_padded(prompt).unwrap();
        let ids2 = encoders.tokenizer_2.encode_padded(prompt).unwrap();
        let want = |k: &str| -> Vec<u32> {
            r.get(case[k].as_str().unwrap())
                .flatten_all()
                .unwrap()
                .to_vec1::<i64>()
                .unwrap()
                .iter()
                .map(|&v| v as u32)
                .collect()
        };
        assert_eq!(ids1, want("te1_ids"), "tokenizer ids for {prompt:?}");
        assert_eq!(ids2, want("te2_ids"), "tokenizer_2 ids for {prompt:?}");
        let t1 = Tensor::from_vec(ids1, (1, 77), &Device::Cpu).unwrap();
        let t2 = Tensor::from_vec(ids2, (1, 77), &Device::Cpu).unwrap();
        let out1 = encoders.text_encoder.forward(&t1).unwrap();
        let out2 = encoders.text_encoder_2.forward(&t2).unwrap();
        assert_close(
            "text_encoder hidden_states[-2]",
            &out1.penultimate,
            &r.get(case["te1_hidden"].as_str().unwrap()),
            TOLERANCE,
        );
        assert_close(
            "text_encoder_2 hidden_states[-2]",
            &out2.penultimate,
            &r.get(case["te2_hidden"].as_str().unwrap()),
            TOLERANCE,
        );
        assert_close(
            "text_encoder_2 pooled",
            &out2.pooled.unwrap(),
            &r.get(case["te2_pooled"].as_str().unwrap()),
            TOLERANCE,
        );
    }
}

#[test]
fn prompt_encoding_matches_encode_prompt() {
    let r = Reference::load();
    let p = pipeline();
    let encoders = p.load_text_encoders().unwrap();
    for case in r.json["encode_prompt"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        // diffusers' `None` negative prompt is our empty one with force_zeros; an explicit "" is encoded.
        let (negative, force_zeros) = match case["negative_prompt"].as_str() {
            Some(n) => (n, false),
            None => ("", true),
        };
        let samples = case["num_images_per_prompt"].as_u64().unwrap() as usize;
        let cond = encoders.condition(prompt, negative, force_zeros, samples, true, &Device::Cpu).unwrap();
        let t = &case["tensors"];
        let get = |k: &str| r.get(t[k].as_str().unwrap());
        let name = case["name"].as_str().unwrap();
        assert_close(
            &format!("{name} negative_prompt_embeds"),
            &cond.context.narrow(0, 0, samples).unwrap(),
            &get("negative_prompt_embeds"),
            TOLERANCE,
        );
        assert_close(
            &format!("{name} prompt_embeds"),
            &cond.context.narrow(0, samples, samples).unwrap(),
            &get("prompt_embeds"),
            TOLERANCE,
        );
        assert_close(
            &format!("{name} negative pooled"),
            &cond.pooled.narrow(0, 0, samples).unwrap(),
            &get("negative_pooled_prompt_embeds"),
            TOLERANCE,
        );
        assert_close(
            &format!("{name} pooled"),
            &cond.pooled.narrow(0, samples, samples).unwrap(),
            &get("pooled_prompt_embeds"),
            TOLERANCE,
        );
    }
}

#[test]
fn unet_call_with_added_conditioning_matches() {
    let r = Reference::load();
    let unet = pipeline().load_unet().unwrap();
    let u = &r.json["unet"];
    let get = |k: &str| r.get(u[k].as_str().unwrap());
    let added = AddedConditioning { text_embeds: get("text_embeds"), time_ids: get("time_ids") };
    for out in u["outputs"].as_array().unwrap() {
        let t = out["timestep"].as_f64().unwrap();
        let pred = unet.forward(&get("sample"), t, &get("encoder_hidden_states"), &added).unwrap();
        assert_close(&format!("unet at t={t}"), &pred, &r.get(out["tensor"].as_str().unwrap()), TOLERANCE);
    }
}

#[test]
fn vae_decode_matches() {
    let r = Reference::load();
    let vae = pipeline().load_vae().unwrap();
    let image = vae.decode(&r.get("vae.latents")).unwrap();
    assert_eq!(image.dtype(), DType::F32);
    assert_close("vae decode", &image, &r.get("vae.image"), TOLERANCE);
}
