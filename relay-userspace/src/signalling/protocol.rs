//! The signalling messages: JSON text frames, one object each, with a `type`. Requests carry
//! an `id` the answer (`result` or `error`) repeats. docs/signalling.md lists them all.

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub const PROTOCOL_VERSION: u32 = 1;

/// What a peer sends.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum Inbound {
    /// The first message of every connection: who is connecting.
    #[serde(rename = "hello")]
    Hello {
        v: u32,
        role: Role,
        /// Controllers: their tenant and its API key.
        #[serde(default)]
        tenant: Option<String>,
        #[serde(default)]
        api_key: Option<String>,
        /// Clients: the token their controller minted.
        #[serde(default)]
        token: Option<String>,
    },
    /// Controllers: a token for one of their users' apps.
    #[serde(rename = "token.mint")]
    TokenMint {
        id: u64,
        user: String,
        ttl_secs: u64,
    },
    /// A message for the tenant's controller (from a client) or a user's clients (from
    /// the controller).
    #[serde(rename = "send")]
    Send { id: u64, to: Target, body: Value },
    /// Controllers: the PBX calls `user`'s app with this SDP offer. Apps: the app calls out
    /// (no `user`) with its offer.
    #[serde(rename = "call.create")]
    CallCreate {
        id: u64,
        #[serde(default)]
        user: Option<String>,
        sdp: String,
        /// Controllers: who calls, as the app should show it (in `call.incoming` and in
        /// a push); at most 128 characters.
        #[serde(default)]
        caller: Option<String>,
    },
    /// Apps: the answer to a `call.incoming`.
    #[serde(rename = "call.answer")]
    CallAnswer { id: u64, call: u64, sdp: String },
    /// Either side, once connected: a new offer (the app's ICE restart, the PBX's
    /// re-INVITE); the relay answers it in the result.
    #[serde(rename = "call.update")]
    CallUpdate { id: u64, call: u64, sdp: String },
    /// Apps: one more ICE candidate of theirs (trickle ICE), an `a=candidate` value.
    #[serde(rename = "call.candidate")]
    CallCandidate {
        id: u64,
        call: u64,
        candidate: String,
    },
    /// Either side: the call ends.
    #[serde(rename = "call.hangup")]
    CallHangup { id: u64, call: u64 },
    /// Apps: this device's push target; a call while no app of the user is connected
    /// wakes it (docs/push.md).
    #[serde(rename = "push.register")]
    PushRegister {
        id: u64,
        provider: String,
        token: String,
        #[serde(default)]
        app_id: Option<String>,
        /// APNs: a VoIP push (PushKit) rather than an alert.
        #[serde(default)]
        voip: bool,
    },
    /// Apps: the device no longer wants pushes.
    #[serde(rename = "push.unregister")]
    PushUnregister { id: u64, token: String },
    /// Controllers: how many devices a user registered, by provider (never the tokens).
    #[serde(rename = "push.devices")]
    PushDevices { id: u64, user: String },
}

/// The `type`s a peer may send, for telling "unknown type" from "bad fields".
pub const INBOUND_TYPES: &[&str] = &[
    "hello",
    "token.mint",
    "send",
    "call.create",
    "call.answer",
    "call.update",
    "call.candidate",
    "call.hangup",
    "push.register",
    "push.unregister",
    "push.devices",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Controller,
    Client,
}

/// `{"user": "alice"}` (from a controller) or `{"role": "controller"}` (from a client).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Target {
    User { user: String },
    Role { role: Role },
}

/// What the relay sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Outbound {
    #[serde(rename = "welcome")]
    Welcome {
        v: u32,
        role: Role,
        tenant: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
        session: u64,
        /// The calls in progress this peer may act on (its user's, or its tenant's for a
        /// controller): a reconnected session resumes them. Calls outlive the sessions
        /// that set them up; their media is in the kernel.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        calls: Vec<Value>,
    },
    #[serde(rename = "result")]
    Result {
        id: u64,
        #[serde(flatten)]
        fields: serde_json::Map<String, Value>,
    },
    #[serde(rename = "error")]
    Error {
        /// The request's id; null when the request had none that could be read.
        id: Option<u64>,
        code: ErrorCode,
        message: String,
    },
    #[serde(rename = "message")]
    Message { from: Sender, body: Value },
    /// Something happened to a call: `call.incoming` (to the app, with the relay's SDP),
    /// `call.answered` (to the controller, with the SDP for the PBX), `call.state`,
    /// `call.ended`.
    #[serde(rename = "event")]
    Event {
        event: String,
        call: u64,
        #[serde(flatten)]
        fields: serde_json::Map<String, Value>,
    },
}

/// Who a routed message is from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sender {
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    pub session: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON.
    InvalidJson,
    /// JSON without a known `type`.
    UnknownType,
    /// A known type with missing or wrong fields.
    BadRequest,
    UnsupportedVersion,
    /// Bad API key or token (the connection is closed).
    Unauthorized,
    /// The role may not do that (a client minting tokens, a client writing to a user).
    Forbidden,
    /// Nobody to deliver to: the controller or every session of the user is offline.
    Offline,
    /// The recipient's queue is full; try again.
    Busy,
}

/// Parses a text frame: the message, or the error to answer with (and the request id
/// when it could be read).
pub fn parse(text: &str) -> Result<Inbound, (Option<u64>, ErrorCode, String)> {
    let value: Value = serde_json::from_str(text)
        .map_err(|err| (None, ErrorCode::InvalidJson, format!("not JSON: {err}")))?;
    let id = value.get("id").and_then(Value::as_u64);
    match value.get("type").and_then(Value::as_str) {
        Some(kind) if INBOUND_TYPES.contains(&kind) => {}
        Some(kind) => {
            return Err((
                id,
                ErrorCode::UnknownType,
                format!("unknown type {kind:?}; known: {}", INBOUND_TYPES.join(", ")),
            ));
        }
        None => {
            return Err((
                id,
                ErrorCode::UnknownType,
                "a message is an object with a \"type\"".to_owned(),
            ));
        }
    }
    serde_json::from_value(value).map_err(|err| (id, ErrorCode::BadRequest, err.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_tells_bad_json_unknown_types_and_bad_fields_apart() {
        assert_eq!(parse("{").unwrap_err().1, ErrorCode::InvalidJson);
        assert_eq!(parse("[1]").unwrap_err().1, ErrorCode::UnknownType);
        let (id, code, message) = parse(r#"{"type":"call.dance","id":7}"#).unwrap_err();
        assert_eq!((id, code), (Some(7), ErrorCode::UnknownType));
        assert!(message.contains("call.dance"), "{message}");
        let (id, code, message) = parse(r#"{"type":"token.mint","id":3,"user":"a"}"#).unwrap_err();
        assert_eq!((id, code), (Some(3), ErrorCode::BadRequest));
        assert!(message.contains("ttl_secs"), "{message}");
        // An app registers its own device: there is no user to name.
        let (_, code, message) =
            parse(r#"{"type":"push.register","id":4,"provider":"fcm","token":"t","user":"bob"}"#)
                .unwrap_err();
        assert_eq!(code, ErrorCode::BadRequest);
        assert!(message.contains("unknown field `user`"), "{message}");
        assert_eq!(
            parse(r#"{"type":"send","id":1,"to":{"role":"controller"},"body":{"x":1}}"#),
            Ok(Inbound::Send {
                id: 1,
                to: Target::Role {
                    role: Role::Controller
                },
                body: serde_json::json!({"x": 1})
            })
        );
        assert_eq!(
            parse(r#"{"type":"send","id":1,"to":{"user":"alice"},"body":null}"#),
            Ok(Inbound::Send {
                id: 1,
                to: Target::User {
                    user: "alice".into()
                },
                body: Value::Null
            })
        );
    }

    #[test]
    fn outbound_messages_look_as_documented() {
        let error = Outbound::Error {
            id: Some(4),
            code: ErrorCode::Offline,
            message: "nobody".into(),
        };
        assert_eq!(
            serde_json::to_value(&error).unwrap(),
            serde_json::json!({"type": "error", "id": 4, "code": "offline", "message": "nobody"})
        );
        let mut fields = serde_json::Map::new();
        fields.insert("token".into(), "t".into());
        assert_eq!(
            serde_json::to_value(Outbound::Result { id: 2, fields }).unwrap(),
            serde_json::json!({"type": "result", "id": 2, "token": "t"})
        );
    }
}
