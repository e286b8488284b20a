//! Property-based fuzzing of every decoder a hive or worker runs on input it
//! did not produce: job bodies (both encodings, the tolerant probe and the
//! strict form, then validation), events, job records, pipe frames, model
//! references and keys, content types.
//!
//! Each property holds for arbitrary bytes and for structured but hostile
//! jobs: no panic, and every job is either valid or refused with
//! `INVALID_REQUEST` and a message. CI runs the default number of cases
//! (PROPTEST_CASES, 256 here); a long run:
//!
//!     PROPTEST_CASES=200000 cargo test --release -p rbee-schemas --test fuzz

use proptest::prelude::*;
use rbee_schemas::codec::Encoding;
use rbee_schemas::error::ErrorCode;
use rbee_schemas::event::Event;
use rbee_schemas::job::{InferRequest, JobProbe};
use rbee_schemas::model::ModelRef;
use rbee_schemas::record::JobRecord;
use rbee_schemas::worker::{read_frame, FromWorker, ToWorker};
use serde_json::{json, Value};

fn encodings() -> impl Strategy<Value = Encoding> {
    prop_oneof![Just(Encoding::Json), Just(Encoding::Msgpack)]
}

/// Values of every JSON type, nested a little.
fn any_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-z_]{1,10}", inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Job-shaped objects: the real field names with values of any type and
/// range, sometimes an unknown field, sometimes a missing prompt.
fn job_like() -> impl Strategy<Value = Value> {
    let field = prop_oneof![
        Just("prompt"),
        Just("messages"),
        Just("max_tokens"),
        Just("temperature"),
        Just("top_p"),
        Just("top_k"),
        Just("repeat_penalty"),
        Just("seed"),
        Just("stop"),
        Just("id"),
        Just("reply_to"),
        Just("model"),
        Just("v"),
        Just("timeout_ms"),
        Just("deadline_ms"),
        Just("max_token"),
    ];
    let value = prop_oneof![
        any_value(),
        (-10i64..10_000).prop_map(Value::from),
        (-1.0f64..3.0).prop_map(Value::from),
        prop::collection::vec("[a-z ]{0,8}", 0..10).prop_map(Value::from),
        prop::collection::vec(("(system|user|assistant|robot)", ".{0,20}"), 0..3)
            .prop_map(|m| Value::from(m.into_iter().map(|(r, c)| json!({"role": r, "content": c})).collect::<Vec<_>>())),
    ];
    prop::collection::btree_map(field, value, 0..8).prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()))
}

/// What a hive does with a body: probe, strict decode, validate. Returns
/// `Ok` for a runnable job, else the error code.
fn hive_view(enc: Encoding, bytes: &[u8]) -> Result<(), ErrorCode> {
    let _probe: JobProbe = enc.decode(bytes).unwrap_or_default();
    let req: InferRequest = enc.decode(bytes).map_err(|e| {
        assert!(!e.is_empty());
        ErrorCode::InvalidRequest
    })?;
    match req.validate(0) {
        Ok(p) => {
            assert!(p.max_tokens >= 1 && p.max_tokens <= 8192);
            assert!(p.stop.len() <= 8);
            Ok(())
        }
        Err(e) => {
            assert_eq!(e.code, ErrorCode::InvalidRequest);
            assert!(!e.message.is_empty());
            Err(e.code)
        }
    }
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_any_decoder(enc in encodings(), bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = hive_view(enc, &bytes);
        let _ = enc.decode::<Event>(&bytes);
        let _ = enc.decode::<JobRecord>(&bytes);
        let _ = read_frame::<_, ToWorker>(&mut &bytes[..]);
        let _ = read_frame::<_, FromWorker>(&mut &bytes[..]);
        let _ = rbee_schemas::worker::decode_frame::<ToWorker>(&bytes);
        let _ = rbee_schemas::worker::decode_frame::<FromWorker>(&bytes);
    }

    #[test]
    fn structured_jobs_are_valid_or_refused_with_invalid_request(enc in encodings(), job in job_like()) {
        let bytes = match enc {
            Encoding::Json => serde_json::to_vec(&job).unwrap(),
            Encoding::Msgpack => rmp_serde::to_vec_named(&job).unwrap(),
        };
        if hive_view(enc, &bytes).is_ok() {
            // A runnable job really is one: prompt xor messages, known fields only.
            let o = job.as_object().unwrap();
            prop_assert!(o.contains_key("prompt") ^ o.contains_key("messages"));
            prop_assert!(!o.contains_key("max_token"));
        }
    }

    #[test]
    fn model_references_and_keys_never_panic(s in ".{0,80}") {
        if let Ok(m) = ModelRef::parse(&s) {
            let key = m.subject_key();
            prop_assert!(!key.contains('.') && !key.contains(' ') && !key.contains('*') && !key.contains('>'));
            prop_assert_eq!(ModelRef::from_subject_key(&key).unwrap(), m);
        }
        let _ = ModelRef::from_subject_key(&s);
        let _ = Encoding::from_content_type(Some(&s));
        let _ = rbee_schemas::subjects::is_valid_publish_subject(&s);
        let _ = rbee_schemas::job::is_valid_job_id(&s);
    }

    #[test]
    fn length_prefixed_frames_with_any_length_are_refused_not_trusted(len in any::<u32>(), body in prop::collection::vec(any::<u8>(), 0..64)) {
        let mut bytes = len.to_be_bytes().to_vec();
        bytes.extend(body);
        let _ = read_frame::<_, ToWorker>(&mut &bytes[..]);
    }
}
