#![no_main]
//! Signalling text frames as the server parses them: no panic; a refused frame gets an
//! error code and a reason, and the request id back whenever the frame is a JSON object
//! with a numeric id (so the client can match the error to its request). Seeds:
//! fuzz/seeds/signalling_parse.

use libfuzzer_sys::fuzz_target;
use relay::signalling::protocol::parse;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err((id, _code, reason)) = parse(text) {
        assert!(!reason.is_empty(), "an error names its reason");
        if let Ok(serde_json::Value::Object(object)) = serde_json::from_str(text) {
            assert_eq!(
                id,
                object.get("id").and_then(serde_json::Value::as_u64),
                "{text}"
            );
        }
    }
});
