//! Tests of the worker as a whole on the demo model: the two engines give the
//! same text ([`engines`]), and the batch loop gives each of several
//! concurrent jobs the text it gets alone ([`batch`]).

use std::path::Path;
use std::sync::OnceLock;

use rbee_schemas::job::{ChatMessage, GenerateParams, InferRequest};

use crate::{Engine, EngineChoice};

mod batch;
mod engines;

const DEMO_MODEL: &str = "/root/.local/share/rbee/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf";

fn load(choice: EngineChoice) -> Engine {
    let path = Path::new(DEMO_MODEL);
    assert!(path.exists(), "these tests need the demo model at {DEMO_MODEL}: download SmolLM2-135M-Instruct Q4_1 there");
    Engine::load_with(path, candle_core::Device::Cpu, choice).expect("the demo model loads")
}

fn chat(content: &str, max_tokens: i64) -> GenerateParams {
    let messages = vec![ChatMessage { role: "user".into(), content: content.into() }];
    let req = InferRequest { messages: Some(messages), max_tokens: Some(max_tokens), temperature: Some(0.0), ..Default::default() };
    req.validate(0).expect("valid request")
}

fn raw(prompt: &str, max_tokens: i64) -> GenerateParams {
    let req = InferRequest { prompt: Some(prompt.into()), max_tokens: Some(max_tokens), temperature: Some(0.0), ..Default::default() };
    req.validate(0).expect("valid request")
}

/// Greedy prompts used by both test modules.
fn prompts() -> &'static [GenerateParams] {
    static P: OnceLock<Vec<GenerateParams>> = OnceLock::new();
    P.get_or_init(|| {
        vec![
            chat("What is the capital of France?", 40),
            chat("Name three flowers.", 40),
            chat("Say only the word yes.", 40),
            raw("Once upon a time", 40),
            chat("Write a haiku about bees", 40),
        ]
    })
}
