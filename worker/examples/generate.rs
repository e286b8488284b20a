//! Runs the engine in-process, as the worker loads it:
//! `cargo run --release -p rbee-worker --example generate -- MODEL PROMPT [MAX_TOKENS] [BACKEND]`
//! (BACKEND: `cpu`, the default, `cuda` or `metal`; the last two need the
//! crate's feature of that name). Prints the text, then the engine, the
//! backend and the timings on stderr.
use std::sync::atomic::AtomicBool;

fn main() {
    let mut args = std::env::args().skip(1);
    let model = args.next().expect("usage: generate MODEL PROMPT [MAX_TOKENS] [BACKEND]");
    let prompt = args.next().unwrap_or_else(|| "Write a haiku about bees".to_owned());
    let max_tokens: i64 = args.next().map_or(64, |s| s.parse().expect("MAX_TOKENS is a number"));
    let backend = args.next().unwrap_or_else(|| "cpu".to_owned());
    let device = rbee_worker::engine::device_for(&backend, 0).unwrap_or_else(|e| panic!("{e}"));
    let mut engine = rbee_worker::Engine::load_with(model.as_ref(), device, rbee_worker::EngineChoice::Auto).expect("load");
    eprintln!("engine {} on {backend}: {:?}", engine.kind(), engine.info());
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
