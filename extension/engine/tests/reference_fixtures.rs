//! The engine against Hugging Face `transformers` on committed fixtures
//! (tests/fixtures/models, made by tests/fixtures/make_fixtures.py): logits within 1e-4 and
//! identical greedy generations, for every supported family.

mod common;

use std::path::PathBuf;

use common::{fixture_dir, load};
use pg_llm_engine::formats::safetensors;
use pg_llm_engine::model::Logits;
use pg_llm_engine::sample::argmax;
use pg_llm_engine::Cancel;

fn check_family(name: &str) {
    let (model, _) = load(name);
    let expected = std::fs::read(fixture_dir(name).join("expected.safetensors")).unwrap();
    let ids: Vec<u32> = safetensors::read_ints(&expected, "input_ids")
        .unwrap()
        .iter()
        .map(|&x| x as u32)
        .collect();
    let greedy: Vec<u32> = safetensors::read_ints(&expected, "greedy_ids")
        .unwrap()
        .iter()
        .map(|&x| x as u32)
        .collect();
    let want = safetensors::read_one(&expected, "logits").unwrap().1;

    let got = model.logits(&ids, Cancel::NEVER).unwrap();
    assert_eq!(got.len(), want.len());
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst < 1e-4,
        "{name}: logits differ from transformers by {worst}"
    );

    // Greedy decoding with the KV cache: prompt once, then one token per step.
    let mut cache = model.new_cache(ids.len() + greedy.len()).unwrap();
    let mut last = model
        .forward(&ids, &mut cache, Logits::Last, Cancel::NEVER)
        .unwrap();
    let mut out = Vec::new();
    for _ in 0..greedy.len() {
        let next = argmax(&last) as u32;
        out.push(next);
        last = model
            .forward(&[next], &mut cache, Logits::Last, Cancel::NEVER)
            .unwrap();
    }
    assert_eq!(
        out, greedy,
        "{name}: greedy generation differs from transformers"
    );
}

#[test]
fn gpt2_matches_transformers() {
    check_family("gpt2");
}

#[test]
fn cerebras_gpt_matches_transformers() {
    check_family("cerebras");
}

#[test]
fn opt_matches_transformers() {
    check_family("opt");
}

#[test]
fn opt_post_layernorm_with_projection_matches_transformers() {
    check_family("opt_post_ln");
}

#[test]
fn gpt_neo_with_local_attention_matches_transformers() {
    check_family("gpt_neo");
}

#[test]
fn gpt_neox_with_partial_rotary_and_parallel_residual_matches_transformers() {
    check_family("gpt_neox");
}

#[test]
fn gpt_neox_with_full_rotary_and_sequential_residual_matches_transformers() {
    check_family("gpt_neox_full");
}

#[test]
fn gptj_with_interleaved_rotary_and_one_layernorm_matches_transformers() {
    check_family("gptj");
}

/// The tokenizer on the real 50257-token vocabulary against Hugging Face's GPT2Tokenizer
/// (tests/fixtures/tokenizer/expected.json): identical ids, and decoding round-trips.
#[test]
fn tokenizer_matches_the_reference_bpe() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizer");
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    let bpe =
        pg_llm_engine::tokenizer::Bpe::new(&read("encoder.json"), &read("vocab.bpe")).unwrap();
    assert_eq!(bpe.vocab_size(), 50257);
    assert_eq!(bpe.end_of_text(), Some(50256));
    let cases: Vec<serde_json::Value> = serde_json::from_str(&read("expected.json")).unwrap();
    assert!(cases.len() >= 20);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(bpe.encode(text).unwrap(), want, "encoding {text:?}");
        assert_eq!(bpe.decode(&want).unwrap(), text, "decoding {text:?}");
    }
    // Repeated ids decode repeatedly (pg_gpt2 dropped them).
    let the = bpe.encode(" the").unwrap();
    assert_eq!(
        bpe.decode(&[the[0], the[0], the[0]]).unwrap(),
        " the the the"
    );
}
