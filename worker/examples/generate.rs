//! Runs the engine in-process: `cargo run --release -p rbee-worker --example generate -- MODEL PROMPT [MAX_TOKENS]`.
use std::sync::atomic::AtomicBool;

fn main() {
    let mut args = std::env::args().skip(1);
    let model = args.next().expect("usage: generate MODEL PROMPT [MAX_TOKENS]");
    let prompt = args.next().unwrap_or_else(|| "Write a haiku about bees".to_owned());
    let max_tokens: i64 = args.next().map_or(64, |s| s.parse().expect("MAX_TOKENS is a number"));
    let mut engine = rbee_worker::Engine::load(model.as_ref(), candle_core::Device::Cpu).expect("load");
    eprintln!("{:?}", engine.info());
    let req = rbee_schemas::job::InferRequest {
        messages: Some(vec![rbee_schemas::job::ChatMessage { role: "user".into(), content: prompt }]),
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        ..Default::default()
    };
    let params = req.validate(0).expect("valid");
    let outcome = engine
        .generate(&params, None, &AtomicBool::new(false), &mut |_, t| {
            print!("{t}");
            use std::io::Write;
            let _ = std::io::stdout().flush();
        })
        .expect("generate");
    eprintln!("\n{outcome:?}");
}
