//! Keeps the JSON Schema files in `schemas/json/` true to the Rust types:
//! same fields, same limits, same codes.

use serde_json::Value;

use crate::codec::Encoding;
use crate::error::ErrorCode;
use crate::event::*;
use crate::job::*;

fn load(name: &str) -> Value {
    let path = format!("{}/json/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
    k.sort();
    k
}

#[test]
fn job_schema_lists_exactly_the_job_fields_and_limits() {
    let schema = load("infer-request.schema.json");
    let full = InferRequest {
        id: Some("a".into()),
        model: Some("m".into()),
        prompt: Some("p".into()),
        messages: Some(vec![ChatMessage { role: "user".into(), content: "c".into() }]),
        max_tokens: Some(1),
        temperature: Some(0.0),
        top_p: Some(1.0),
        top_k: Some(1),
        repeat_penalty: Some(1.0),
        seed: Some(1),
        stop: Some(vec!["s".into()]),
        reply_to: Some("r".into()),
        timeout_ms: Some(1),
        deadline_ms: Some(1),
        keep_alive_ms: Some(1),
        ..InferRequest::default()
    };
    let json: Value = serde_json::from_slice(&Encoding::Json.encode(&full)).unwrap();
    assert_eq!(keys(&schema["properties"]), keys(&json));
    let p = &schema["properties"];
    assert_eq!(p["max_tokens"]["minimum"], MAX_TOKENS_RANGE.0);
    assert_eq!(p["max_tokens"]["maximum"], MAX_TOKENS_RANGE.1);
    assert_eq!(p["max_tokens"]["default"], DEFAULT_MAX_TOKENS);
    assert_eq!(p["temperature"]["maximum"].as_f64(), Some(TEMPERATURE_RANGE.1));
    assert_eq!(p["temperature"]["default"].as_f64(), Some(DEFAULT_TEMPERATURE));
    assert_eq!(p["top_k"]["maximum"], TOP_K_RANGE.1);
    assert_eq!(p["repeat_penalty"]["minimum"].as_f64(), Some(REPEAT_PENALTY_RANGE.0));
    assert_eq!(p["stop"]["maxItems"], MAX_STOP);
    assert_eq!(p["stop"]["items"]["maxLength"], MAX_STOP_BYTES);
    assert_eq!(p["messages"]["maxItems"], MAX_MESSAGES);
    assert_eq!(p["timeout_ms"]["maximum"], MAX_TIMEOUT_MS);
    let msg_keys = keys(&schema["$defs"]["message"]["properties"]);
    assert_eq!(msg_keys, ["content", "role"]);
}

#[test]
fn event_schema_covers_every_event_and_error_code() {
    let schema = load("event.schema.json");
    let common = keys(&schema["properties"]);
    let samples = [
        EventBody::Started(Started { hive: "h".into(), worker: "w".into(), model: "m".into(), cold: true, attempt: 1 }),
        EventBody::Token(Token { text: "t".into() }),
        EventBody::Restarted(Restarted { attempt: 1, reason: "r".into(), resume: false }),
        EventBody::Done(Done::generation(StopReason::Eos, Usage::default(), Timings::default(), 1)),
        EventBody::Done(Done::completed(serde_json::json!({"model": "m"}))),
        EventBody::Progress(Progress { stage: "download".into(), done: 1, total: 2, rate: 3.0, message: Some("x".into()) }),
        EventBody::Error(ErrorEvent { code: ErrorCode::Internal, message: "m".into() }),
    ];
    for body in samples {
        let name = body.type_name();
        let json: Value = serde_json::from_slice(&Encoding::Json.encode(&Event::new("j", 0, body))).unwrap();
        let branch = schema["oneOf"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["properties"]["type"]["const"] == name)
            .unwrap_or_else(|| panic!("no schema branch for {name}"));
        let mut allowed = keys(&branch["properties"]);
        allowed.extend(common.clone());
        for k in keys(&json) {
            assert!(allowed.contains(&k), "{name}: field {k} is not in the schema");
        }
        for r in branch["required"].as_array().unwrap() {
            assert!(json.get(r.as_str().unwrap()).is_some(), "{name}: required {r} missing");
        }
    }
    let codes: Vec<&str> = schema["oneOf"][5]["properties"]["code"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let all = [
        ErrorCode::InvalidRequest,
        ErrorCode::UnsupportedVersion,
        ErrorCode::UnknownModel,
        ErrorCode::ContextLengthExceeded,
        ErrorCode::ModelSourceUnreachable,
        ErrorCode::ModelLoadFailed,
        ErrorCode::ModelVerificationFailed,
        ErrorCode::ModelInUse,
        ErrorCode::UnknownWorker,
        ErrorCode::ModelLoadTimeout,
        ErrorCode::InsufficientMemory,
        ErrorCode::InsufficientDisk,
        ErrorCode::WorkerCrashed,
        ErrorCode::DeadlineExceeded,
        ErrorCode::Cancelled,
        ErrorCode::QueueFull,
        ErrorCode::Internal,
    ];
    assert_eq!(codes, all.map(ErrorCode::as_str));
}
