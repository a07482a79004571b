//! Calls on the wire: a session's identity as a call requester, call events as `event`
//! messages, call errors as `error` codes (docs/signalling.md), and the hub as where calls'
//! events go.

use serde_json::{Map, Value};

use super::{
    hub::{Hub, Identity},
    protocol::{ErrorCode, Outbound, Role},
};
use crate::{
    calls::{CallError, CallEvent, Notify, Requester, StateChange, Woken},
    cluster::Recipient,
};

/// Who a session is, as calls see it.
pub fn requester(identity: &Identity) -> Requester {
    match (identity.role, &identity.user) {
        (Role::Client, Some(user)) => Requester::App {
            tenant: identity.tenant.clone(),
            user: user.clone(),
        },
        _ => Requester::Controller {
            tenant: identity.tenant.clone(),
        },
    }
}

/// The answer to a call request: its result fields, or the error.
pub fn answer(id: u64, result: Result<Map<String, Value>, CallError>) -> Outbound {
    match result {
        Ok(fields) => Outbound::Result { id, fields },
        Err(err) => Outbound::Error {
            id: Some(id),
            code: error_code(&err),
            message: err.to_string(),
        },
    }
}

fn error_code(err: &CallError) -> ErrorCode {
    match err {
        CallError::Forbidden(_) => ErrorCode::Forbidden,
        CallError::Offline(_) => ErrorCode::Offline,
        CallError::NoSuchCall(_) | CallError::Sdp(_) | CallError::BadRequest(_) => {
            ErrorCode::BadRequest
        }
        CallError::Busy(_) => ErrorCode::Busy,
    }
}

/// `{"key": value, ...}` from pairs.
pub fn fields<const N: usize>(pairs: [(&str, Value); N]) -> Map<String, Value> {
    pairs
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect()
}

/// The `event` message of a call event.
pub fn event_message(event: &CallEvent) -> Outbound {
    let (name, call, fields) = match event {
        CallEvent::Incoming {
            call,
            user,
            caller,
            sdp,
        } => {
            let mut map = fields([("sdp", sdp.clone().into())]);
            if let Some(user) = user {
                map.insert("user".into(), user.clone().into());
            }
            if let Some(caller) = caller {
                map.insert("caller".into(), caller.clone().into());
            }
            ("call.incoming", *call, map)
        }
        CallEvent::Answered { call, sdp } => (
            "call.answered",
            *call,
            fields([("sdp", sdp.clone().into())]),
        ),
        CallEvent::State { call, change } => {
            let mut map = fields([("state", change.name().into())]);
            match change {
                StateChange::Connected {
                    local,
                    remote,
                    local_type,
                    remote_type,
                    app_security,
                    pbx_security,
                } => {
                    map.insert("app_security".into(), (*app_security).into());
                    map.insert("pbx_security".into(), (*pbx_security).into());
                    map.insert("local".into(), local.to_string().into());
                    map.insert("remote".into(), remote.to_string().into());
                    map.insert("local_type".into(), local_type.to_string().into());
                    map.insert("remote_type".into(), remote_type.to_string().into());
                }
                StateChange::RouteChanged {
                    remote,
                    remote_type,
                }
                | StateChange::Restored {
                    remote,
                    remote_type,
                } => {
                    map.insert("remote".into(), remote.to_string().into());
                    map.insert("remote_type".into(), remote_type.to_string().into());
                }
                StateChange::Moved {
                    remote,
                    remote_type,
                    from,
                } => {
                    map.insert("remote".into(), remote.to_string().into());
                    map.insert("remote_type".into(), remote_type.to_string().into());
                    map.insert("from".into(), from.clone().into());
                }
                StateChange::Ringing { devices } => {
                    map.insert("via".into(), "push".into());
                    map.insert("devices".into(), (*devices).into());
                }
                StateChange::Checking | StateChange::IceRestart | StateChange::ConsentLost => {}
            }
            ("call.state", *call, map)
        }
        CallEvent::Stats {
            call,
            duration_secs,
            to_pbx,
            to_app,
            idle_ms,
        } => (
            "call.stats",
            *call,
            fields([
                ("duration_secs", (*duration_secs).into()),
                ("to_pbx", serde_json::to_value(to_pbx).unwrap_or_default()),
                ("to_app", serde_json::to_value(to_app).unwrap_or_default()),
                ("idle_ms", (*idle_ms).into()),
            ]),
        ),
        CallEvent::Ended { call, reason } => (
            "call.ended",
            *call,
            fields([("reason", reason.name().into())]),
        ),
    };
    Outbound::Event {
        event: name.to_owned(),
        call,
        fields,
    }
}

/// A call's event for sessions on the cluster's other nodes, when this node is in one: the
/// controller connected to another relay, or the app of a call placed away from its relay.
fn elsewhere(hub: &Hub, tenant: &str, to: Recipient, message: &Outbound) -> bool {
    hub.cluster().is_some_and(|cluster| {
        let json = serde_json::to_value(message).expect("outbound messages serialize");
        cluster.publish(tenant, &to, json)
    })
}

impl Notify for Hub {
    fn is_online(&self, tenant: &str, user: &str) -> bool {
        Hub::is_online(self, tenant, user)
    }

    /// The sessions here that took it; none here: published to the other nodes (0).
    fn to_app(&self, tenant: &str, user: &str, event: &CallEvent) -> usize {
        let message = event_message(event);
        let delivered = self.to_user(tenant, user, &message);
        if delivered == 0 && !Hub::is_online(self, tenant, user) {
            elsewhere(self, tenant, Recipient::User(user.to_owned()), &message);
        }
        delivered
    }

    /// Whether the controller here took it, or it went to the other nodes.
    fn to_controller(&self, tenant: &str, event: &CallEvent) -> bool {
        let message = event_message(event);
        if self.present(tenant, &Recipient::Controller) > 0 {
            return Hub::to_controller(self, tenant, &message);
        }
        elsewhere(self, tenant, Recipient::Controller, &message)
    }

    fn wake(&self, tenant: &str, user: &str, call: u64, caller: Option<&str>) -> Option<Woken> {
        self.push()?.wake(tenant, user, call, caller)
    }

    fn ring_time(&self) -> Option<std::time::Duration> {
        self.push().map(|push| push.ring_time())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calls::{EndReason, Traffic};

    #[test]
    fn call_events_look_as_documented() {
        let json = |event: CallEvent| serde_json::to_value(event_message(&event)).unwrap();
        assert_eq!(
            json(CallEvent::Incoming {
                call: 3,
                user: Some("alice".into()),
                caller: None,
                sdp: "v=0".into()
            }),
            serde_json::json!({"type": "event", "event": "call.incoming", "call": 3, "user": "alice", "sdp": "v=0"})
        );
        assert_eq!(
            json(CallEvent::State {
                call: 3,
                change: StateChange::RouteChanged {
                    remote: "198.51.100.7:4000".parse().unwrap(),
                    remote_type: webrtc_ice::candidate::CandidateType::PeerReflexive,
                }
            }),
            serde_json::json!({"type": "event", "event": "call.state", "call": 3, "state": "route-changed", "remote": "198.51.100.7:4000", "remote_type": "prflx"})
        );
        assert_eq!(
            json(CallEvent::Stats {
                call: 3,
                duration_secs: 10,
                to_pbx: Traffic {
                    packets: 500,
                    bytes: 86_000
                },
                to_app: Traffic::default(),
                idle_ms: 20,
            }),
            serde_json::json!({"type": "event", "event": "call.stats", "call": 3, "duration_secs": 10,
                "to_pbx": {"packets": 500, "bytes": 86000}, "to_app": {"packets": 0, "bytes": 0}, "idle_ms": 20})
        );
        assert_eq!(
            json(CallEvent::Ended {
                call: 3,
                reason: EndReason::ConsentLost
            }),
            serde_json::json!({"type": "event", "event": "call.ended", "call": 3, "reason": "consent-lost"})
        );
    }

    #[test]
    fn call_errors_keep_their_codes() {
        let error = |err: CallError| serde_json::to_value(answer(9, Err(err))).unwrap();
        assert_eq!(
            error(CallError::NoSuchCall(4)),
            serde_json::json!({"type": "error", "id": 9, "code": "bad_request", "message": "call: 4: no such call"})
        );
        assert_eq!(error(CallError::Offline("x".into()))["code"], "offline");
        assert_eq!(error(CallError::Busy("x".into()))["code"], "busy");
        assert_eq!(error(CallError::Forbidden("x".into()))["code"], "forbidden");
    }
}
