//! The worker engine, in-process: tokenizer, chat template, sampling, stops.

use std::sync::atomic::AtomicBool;
use std::sync::{Mutex, OnceLock};

use rbee_schemas::error::ErrorCode;
use rbee_schemas::event::StopReason;
use rbee_schemas::job::{ChatMessage, GenerateParams, InferRequest, PromptInput};
use rbee_schemas::worker::Outcome;
use rbee_worker::Engine;

use crate::harness::demo_model_path;

/// One engine for the whole test binary (loading takes half a second).
pub fn engine() -> std::sync::MutexGuard<'static, Engine> {
    static ENGINE: OnceLock<Mutex<Engine>> = OnceLock::new();
    ENGINE
        .get_or_init(|| Mutex::new(Engine::load(&demo_model_path(), candle_core::Device::Cpu).expect("demo model loads")))
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// Runs `params` in-process; the text and the outcome.
pub fn generate(params: &GenerateParams) -> Result<(String, Outcome), rbee_schemas::error::JobError> {
    let mut text = String::new();
    let outcome = engine().generate(params, None, &AtomicBool::new(false), &mut |_, t| text.push_str(t))?;
    Ok((text, outcome))
}

pub fn user(content: &str) -> Vec<ChatMessage> {
    vec![ChatMessage { role: "user".into(), content: content.into() }]
}

#[test]
fn chat_messages_are_rendered_with_the_models_template() {
    let text = engine().render(&PromptInput::Messages(user("Hi"))).unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    // Chat markers are single special tokens, EOS is <|im_end|> = 2.
    let e = engine();
    let tok = e.tokenizer();
    assert_eq!(tok.encode("<|im_start|>").unwrap().len(), 1);
    assert_eq!(tok.encode("<|im_end|>").unwrap(), vec![2]);
    assert!(tok.is_eos(2));
}

#[test]
fn a_fixed_seed_reproduces_the_text() {
    let req = InferRequest {
        messages: Some(user("Name three flowers.")),
        max_tokens: Some(20),
        temperature: Some(0.9),
        top_p: Some(0.95),
        seed: Some(7),
        ..Default::default()
    };
    let params = req.validate(0).unwrap();
    let (a, oa) = generate(&params).unwrap();
    let (b, ob) = generate(&params).unwrap();
    assert!(!a.is_empty());
    assert_eq!(a, b);
    assert_eq!(oa.usage, ob.usage);
}

#[test]
fn stop_strings_end_the_text_before_them() {
    let base = InferRequest { prompt: Some("Once upon a time".into()), max_tokens: Some(40), temperature: Some(0.0), ..Default::default() };
    let (full, o) = generate(&base.validate(0).unwrap()).unwrap();
    assert_eq!(o.stop_reason, StopReason::MaxTokens, "{full:?}");
    // Stop at a 4-character piece from the middle of the greedy text.
    let (mid, _) = full.char_indices().nth(full.chars().count() / 2).expect("some text");
    let stop: String = full[mid..].chars().take(4).collect();
    let cut_at = full.find(&stop).expect("the piece is in the text");
    let with_stop = InferRequest { stop: Some(vec!["NEVER-APPEARS".into(), stop.clone()]), ..base };
    let (cut, o) = generate(&with_stop.validate(0).unwrap()).unwrap();
    assert_eq!(o.stop_reason, StopReason::Stop, "stop {stop:?} in {full:?}");
    assert_eq!(cut, full[..cut_at], "stop {stop:?}");
    assert!(o.usage.completion_tokens < 40);
}

#[test]
fn greedy_generation_ends_on_eos() {
    let req = InferRequest { messages: Some(user("Say only the word yes.")), max_tokens: Some(64), temperature: Some(0.0), ..Default::default() };
    let (text, o) = generate(&req.validate(0).unwrap()).unwrap();
    assert_eq!(o.stop_reason, StopReason::Eos, "{text:?}");
    assert!(o.usage.completion_tokens < 64);
    assert!(!text.contains("<|im_end|>"));
}

#[test]
fn a_prompt_longer_than_the_context_is_refused_clearly() {
    let req = InferRequest { prompt: Some("bee ".repeat(5000)), max_tokens: Some(4), ..Default::default() };
    let e = generate(&req.validate(0).unwrap()).unwrap_err();
    assert_eq!(e.code, ErrorCode::ContextLengthExceeded);
    assert!(e.message.contains("context holds 4096"), "{}", e.message);
}

#[test]
fn a_cancelled_job_stops_at_once() {
    let req = InferRequest { prompt: Some("Once upon a time".into()), max_tokens: Some(50), ..Default::default() };
    let mut n = 0;
    let o = engine().generate(&req.validate(1).unwrap(), None, &AtomicBool::new(true), &mut |_, _| n += 1).unwrap();
    assert_eq!(o.stop_reason, StopReason::Cancelled);
    assert_eq!((n, o.usage.completion_tokens), (0, 0));
}

/// Token ids from llama.cpp's own tokenizer (`llama-tokenize --ids --no-bos`,
/// special tokens parsed; llama-cpp-python 0.3.36's vendored llama.cpp) on the demo model.
#[test]
fn the_gguf_tokenizer_matches_llama_cpp() {
    let cases: [(&str, &[u32]); 3] = [
        (
            "Hello, world! 12345 ünïcödé 🐝\n\tdone",
            &[19556, 28, 905, 17, 216, 33, 34, 35, 36, 37, 5549, 137, 94, 25972, 83, 7466, 84, 2756, 15107, 234, 247, 198, 197, 22744],
        ),
        (
            "<|im_start|>user\nWrite a haiku about bees<|im_end|>\n<|im_start|>assistant\n",
            &[1, 4093, 198, 19161, 253, 421, 30614, 563, 9356, 2, 198, 1, 520, 9531, 198],
        ),
        (
            "The year 2024 had 366 days, isn't it?  Two  spaces.",
            &[504, 713, 216, 34, 32, 34, 36, 761, 216, 35, 38, 38, 2009, 28, 3247, 982, 357, 47, 216, 5713, 216, 5600, 30],
        ),
    ];
    let e = engine();
    for (text, ids) in cases {
        assert_eq!(e.tokenizer().encode(text).unwrap(), ids, "{text:?}");
        assert_eq!(e.tokenizer().decode(ids).unwrap(), text.replace("<|im_start|>", "").replace("<|im_end|>", ""));
    }
}

/// llama.cpp's greedy continuation (`llama-completion --temp 0 -n 32`, same
/// GGUF, raw ChatML prompt) was "Bees are the silent guardians of the world,
/// their honey is the essence of life, and their stingers are the only thing
/// that can kill." Teacher-forcing those tokens, every one of them must be
/// within 0.5 logits of the engine's own best choice: the engines agree up to
/// rounding (at the second token the two are 0.2 apart, so greedy text alone
/// is not a fair comparison: candle picks "Bumble", llama.cpp "Bees").
#[test]
fn logits_agree_with_llama_cpp_along_its_greedy_path() {
    let prompt: &[u32] = &[1, 4093, 198, 19161, 253, 421, 30614, 563, 9356, 2, 198, 1, 520, 9531, 198];
    let llama_cpp: &[u32] = &[
        50, 4123, 359, 260, 13879, 24618, 282, 260, 905, 28, 480, 8450, 314, 260, 9615, 282, 1029, 28, 284, 480,
        27081, 366, 359, 260, 805, 2775, 338, 416, 5619, 30, 2,
    ];
    let mut e = engine();
    let mut logits = e.logits(prompt, 0).unwrap();
    let mut worst = 0f32;
    for (i, &want) in llama_cpp.iter().enumerate() {
        let best = logits.iter().cloned().fold(f32::MIN, f32::max);
        let gap = best - logits[want as usize];
        assert!(gap <= 0.5, "step {i}: llama.cpp's token {want} is {gap} logits below our best");
        worst = worst.max(gap);
        if i + 1 < llama_cpp.len() {
            logits = e.logits(&[want], prompt.len() + i).unwrap();
        }
    }
    eprintln!("largest gap to llama.cpp's greedy choice: {worst:.3} logits");
}
