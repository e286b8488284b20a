//! Tests of the worker as a whole on the demo model: the two engines give the
//! same text ([`engines`]), and the batch loop gives each of several
//! concurrent jobs the text it gets alone ([`batch`]).

use std::path::Path;
use std::sync::OnceLock;

use rbee_schemas::job::{ChatMessage, GenerateParams, InferRequest};

use crate::{Engine, EngineChoice};

mod batch;
mod engines;


fn load(choice: EngineChoice) -> Engine {
    let path = crate::fast::tests::demo_model();
    assert!(path.exists(), "these tests need the demo model at {}: run scripts/fetch-demo-model.sh", path.display());
    Engine::load_with(&path, candle_core::Device::Cpu, choice).expect("the demo model loads")
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

/// A file the worker cannot run fails its load with the reason, whichever
/// half of the load (tokenizer, weights) finds it; nothing panics.
#[test]
fn a_model_that_cannot_load_says_why() {
    use candle_core::quantized::gguf_file::{self, Value};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let gguf = |name: &str, meta: &[(&str, &Value)]| {
        let path = dir.join(name);
        gguf_file::write(&mut std::fs::File::create(&path).unwrap(), meta, &[]).unwrap();
        path
    };
    let fails = |path: &Path| match Engine::load_with(path, candle_core::Device::Cpu, EngineChoice::Auto) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => {
            assert_eq!(e.code, rbee_schemas::error::ErrorCode::ModelLoadFailed);
            e.message
        }
    };

    let junk = dir.join("junk.gguf");
    std::fs::write(&junk, b"this is not a model").unwrap();
    assert!(fails(&junk).contains("not a GGUF file"));

    let llama = Value::String("llama".into());
    let path = gguf("other-arch.gguf", &[("general.architecture", &Value::String("mamba".into()))]);
    assert!(fails(&path).contains("architecture \"mamba\" is not supported yet"));

    // A tokenizer rbee does not build (and no weights either): the tokenizer's reason.
    let bert = Value::String("bert".into());
    let path = gguf("wordpiece.gguf", &[("general.architecture", &llama), ("tokenizer.ggml.model", &bert)]);
    assert!(fails(&path).contains("tokenizer model \"bert\" is not supported yet"));

    // The demo model's metadata, tokenizer included, and no weights: the weights' reason.
    let mut f = std::fs::File::open(crate::fast::tests::demo_model()).expect("the demo model");
    let demo = gguf_file::Content::read(&mut std::io::BufReader::new(&mut f)).unwrap();
    let meta: Vec<(&str, &Value)> = demo.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let message = fails(&gguf("no-weights.gguf", &meta));
    assert!(message.contains("cannot find tensor info for token_embd.weight"), "{message}");

    // Phi 3's LongRoPE (128k contexts), which neither engine applies: refused,
    // not run with the wrong positions.
    let mut meta: Vec<(&str, &Value)> = meta.into_iter().filter(|(k, _)| *k != "general.architecture").collect();
    let phi3 = Value::String("phi3".into());
    meta.push(("general.architecture", &phi3));
    let t = candle_core::Tensor::ones(32, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    let factors = candle_core::quantized::QTensor::quantize(&t, candle_core::quantized::GgmlDType::F32).unwrap();
    let path = dir.join("long-rope.gguf");
    gguf_file::write(&mut std::fs::File::create(&path).unwrap(), &meta, &[("rope_factors_long.weight", &factors)]).unwrap();
    let message = fails(&path);
    assert!(message.contains("LongRoPE scaling (Phi 3 and 3.5 with 128k contexts) is not supported yet"), "{message}");

    // The demo model cut short halfway: its tensor table promises weights the
    // file no longer holds. The fast path's loader threads say which one.
    let bytes = std::fs::read(crate::fast::tests::demo_model()).unwrap();
    let cut = dir.join("cut-short.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    assert!(!fails(&cut).is_empty());
    match Engine::load_with(&cut, candle_core::Device::Cpu, EngineChoice::Fast) {
        Ok(_) => panic!("a model cut short loaded"),
        Err(e) => {
            assert_eq!(e.code, rbee_schemas::error::ErrorCode::ModelLoadFailed);
            assert!(e.message.contains("reading ") && e.message.contains(".weight"), "{}", e.message);
        }
    }
}
