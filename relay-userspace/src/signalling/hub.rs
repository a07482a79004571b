//! Who is connected and where messages go: one controller per tenant, any number of client
//! sessions per user. Each session has a bounded queue its connection task writes out; a
//! full queue refuses the message (the sender is told `busy`) rather than letting a slow
//! reader grow memory without end.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
};

use serde_json::Value;
use tokio::sync::mpsc;

use super::protocol::{ErrorCode, Outbound, Role, Sender, Target};
use crate::{
    cluster::{Cluster, Recipient},
    push::Push,
};

pub type SessionId = u64;

/// A connected, authenticated peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub tenant: String,
    pub role: Role,
    /// Clients only.
    pub user: Option<String>,
}

struct Session {
    identity: Identity,
    queue: mpsc::Sender<Outbound>,
}

#[derive(Default)]
struct State {
    sessions: HashMap<SessionId, Session>,
    controllers: HashMap<String, SessionId>,
    /// (tenant, user) -> sessions, oldest first.
    users: HashMap<(String, String), Vec<SessionId>>,
}

pub struct Hub {
    state: Mutex<State>,
    next: AtomicU64,
    queue_length: usize,
    /// The push registrations and providers, when `[push]` is enabled: a call for a user
    /// with no session wakes their devices.
    push: Option<Arc<Push>>,
    /// The cluster, when this node is in one: call events for sessions on other nodes.
    cluster: OnceLock<Arc<Cluster>>,
}

/// Why a message could not be routed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteError {
    pub code: ErrorCode,
    pub message: String,
}

impl Hub {
    pub fn new(queue_length: usize) -> Hub {
        Hub::with_push(queue_length, None)
    }

    pub fn with_push(queue_length: usize, push: Option<Arc<Push>>) -> Hub {
        Hub {
            state: Mutex::new(State::default()),
            next: AtomicU64::new(1),
            queue_length,
            push,
            cluster: OnceLock::new(),
        }
    }

    /// Call events for a session not connected here go to the cluster's other nodes.
    pub fn join_cluster(&self, cluster: Arc<Cluster>) {
        let _ = self.cluster.set(cluster);
    }

    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.get()
    }

    pub fn push(&self) -> Option<&Arc<Push>> {
        self.push.as_ref()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("signalling hub poisoned")
    }

    /// Registers a session; returns its id and the queue its connection writes out. A
    /// controller replaces its tenant's previous one (a reconnect after a network blip):
    /// the old session's queue closes, and its connection ends.
    pub fn join(&self, identity: Identity) -> (SessionId, mpsc::Receiver<Outbound>) {
        let (queue, receiver) = mpsc::channel(self.queue_length);
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut state = self.state();
        match identity.role {
            Role::Controller => {
                if let Some(old) = state.controllers.insert(identity.tenant.clone(), id) {
                    state.sessions.remove(&old);
                    tracing::info!(tenant = %identity.tenant, old, new = id, "signalling: controller reconnected; the old session is closed");
                }
            }
            Role::Client => {
                let user = identity.user.clone().expect("clients have a user");
                state
                    .users
                    .entry((identity.tenant.clone(), user))
                    .or_default()
                    .push(id);
            }
        }
        state.sessions.insert(id, Session { identity, queue });
        (id, receiver)
    }

    pub fn leave(&self, id: SessionId) {
        let mut state = self.state();
        let Some(session) = state.sessions.remove(&id) else {
            return;
        };
        let identity = session.identity;
        match identity.role {
            Role::Controller => {
                if state.controllers.get(&identity.tenant) == Some(&id) {
                    state.controllers.remove(&identity.tenant);
                }
            }
            Role::Client => {
                let key = (identity.tenant, identity.user.expect("clients have a user"));
                if let Some(sessions) = state.users.get_mut(&key) {
                    sessions.retain(|session| *session != id);
                    if sessions.is_empty() {
                        state.users.remove(&key);
                    }
                }
            }
        }
    }

    /// Sessions connected now: (controllers, clients).
    /// Who is connected: one identity per session.
    pub fn identities(&self) -> Vec<Identity> {
        self.state()
            .sessions
            .values()
            .map(|session| session.identity.clone())
            .collect()
    }

    pub fn counts(&self) -> (usize, usize) {
        let state = self.state();
        let controllers = state.controllers.len();
        (controllers, state.sessions.len() - controllers)
    }

    /// Sends `message` to every session of `user` in `tenant`; returns how many got it.
    pub fn to_user(&self, tenant: &str, user: &str, message: &Outbound) -> usize {
        let state = self.state();
        let Some(sessions) = state.users.get(&(tenant.to_owned(), user.to_owned())) else {
            return 0;
        };
        sessions
            .iter()
            .filter_map(|id| state.sessions.get(id))
            .filter(|session| session.queue.try_send(message.clone()).is_ok())
            .count()
    }

    /// Sends `message` to one session; false when it is gone (or its queue is full).
    pub fn to_session(&self, id: SessionId, message: &Outbound) -> bool {
        self.state()
            .sessions
            .get(&id)
            .is_some_and(|session| session.queue.try_send(message.clone()).is_ok())
    }

    /// Sends `message` to every session of `user` but `except`; how many took it.
    pub fn to_user_except(
        &self,
        tenant: &str,
        user: &str,
        except: SessionId,
        message: &Outbound,
    ) -> usize {
        let state = self.state();
        let Some(sessions) = state.users.get(&(tenant.to_owned(), user.to_owned())) else {
            return 0;
        };
        sessions
            .iter()
            .filter(|id| **id != except)
            .filter_map(|id| state.sessions.get(id))
            .filter(|session| session.queue.try_send(message.clone()).is_ok())
            .count()
    }

    /// Sends `message` to the tenant's controller; false when it is not connected (or its
    /// queue is full).
    pub fn to_controller(&self, tenant: &str, message: &Outbound) -> bool {
        let state = self.state();
        state
            .controllers
            .get(tenant)
            .and_then(|id| state.sessions.get(id))
            .is_some_and(|session| session.queue.try_send(message.clone()).is_ok())
    }

    /// Delivers a message another node routed here to the tenant's controller (`user`
    /// None) or to every session of `user`: how many took it, and how many were full.
    pub fn deliver(&self, tenant: &str, user: Option<&str>, message: &Outbound) -> (usize, usize) {
        let state = self.state();
        let recipients: Vec<SessionId> = match user {
            None => state.controllers.get(tenant).copied().into_iter().collect(),
            Some(user) => state
                .users
                .get(&(tenant.to_owned(), user.to_owned()))
                .cloned()
                .unwrap_or_default(),
        };
        let (mut delivered, mut busy) = (0, 0);
        for session in recipients.iter().filter_map(|id| state.sessions.get(id)) {
            match session.queue.try_send(message.clone()) {
                Ok(()) => delivered += 1,
                Err(mpsc::error::TrySendError::Full(_)) => busy += 1,
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        (delivered, busy)
    }

    /// How many sessions of `to` in `tenant` are connected here.
    pub fn present(&self, tenant: &str, to: &Recipient) -> usize {
        let state = self.state();
        match to {
            Recipient::Controller => usize::from(state.controllers.contains_key(tenant)),
            Recipient::User(user) => state
                .users
                .get(&(tenant.to_owned(), user.clone()))
                .map_or(0, Vec::len),
        }
    }

    /// Whether `user` of `tenant` has a session connected.
    pub fn is_online(&self, tenant: &str, user: &str) -> bool {
        self.state()
            .users
            .contains_key(&(tenant.to_owned(), user.to_owned()))
    }

    /// Delivers `body` from session `from` to `to`: a client may write to its tenant's
    /// controller, a controller to any session of one of its users. Returns how many
    /// sessions got it.
    pub fn route(&self, from: SessionId, to: &Target, body: Value) -> Result<usize, RouteError> {
        let state = self.state();
        let sender = state.sessions.get(&from).ok_or_else(|| RouteError {
            code: ErrorCode::Forbidden,
            message: "this session has ended".to_owned(),
        })?;
        let identity = &sender.identity;
        let recipients: Vec<SessionId> = match (identity.role, to) {
            (
                Role::Client,
                Target::Role {
                    role: Role::Controller,
                },
            ) => match state.controllers.get(&identity.tenant) {
                Some(controller) => vec![*controller],
                None => {
                    return Err(RouteError {
                        code: ErrorCode::Offline,
                        message: format!(
                            "the controller of tenant {} is not connected",
                            identity.tenant
                        ),
                    });
                }
            },
            (Role::Controller, Target::User { user }) => {
                match state.users.get(&(identity.tenant.clone(), user.clone())) {
                    Some(sessions) => sessions.clone(),
                    None => {
                        return Err(RouteError {
                            code: ErrorCode::Offline,
                            message: format!("user {user} has no session connected"),
                        });
                    }
                }
            }
            (Role::Client, Target::User { .. }) => {
                return Err(RouteError {
                    code: ErrorCode::Forbidden,
                    message: "a client writes to its controller only: to {\"role\":\"controller\"}"
                        .to_owned(),
                });
            }
            (_, Target::Role { role }) => {
                return Err(RouteError {
                    code: ErrorCode::BadRequest,
                    message: format!("a {role:?} cannot write to role {role:?}").to_lowercase(),
                });
            }
        };
        let message = Outbound::Message {
            from: Sender {
                role: identity.role,
                user: identity.user.clone(),
                session: from,
            },
            body,
        };
        let mut delivered = 0;
        let mut busy = 0;
        for recipient in recipients {
            let Some(session) = state.sessions.get(&recipient) else {
                continue;
            };
            match session.queue.try_send(message.clone()) {
                Ok(()) => delivered += 1,
                Err(mpsc::error::TrySendError::Full(_)) => busy += 1,
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        match (delivered, busy) {
            (0, 0) => Err(RouteError {
                code: ErrorCode::Offline,
                message: "the recipient's connection is closing".to_owned(),
            }),
            (0, _) => Err(RouteError {
                code: ErrorCode::Busy,
                message: format!(
                    "the recipient's queue ({} messages) is full; try again",
                    self.queue_length
                ),
            }),
            (delivered, _) => Ok(delivered),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controller(tenant: &str) -> Identity {
        Identity {
            tenant: tenant.into(),
            role: Role::Controller,
            user: None,
        }
    }

    fn client(tenant: &str, user: &str) -> Identity {
        Identity {
            tenant: tenant.into(),
            role: Role::Client,
            user: Some(user.into()),
        }
    }

    const TO_CONTROLLER: Target = Target::Role {
        role: Role::Controller,
    };

    fn to_user(user: &str) -> Target {
        Target::User { user: user.into() }
    }

    #[test]
    fn routes_within_a_tenant_and_says_who_is_offline() {
        let hub = Hub::new(8);
        let (alice, mut alice_rx) = hub.join(client("acme", "alice"));
        // No controller yet.
        assert_eq!(
            hub.route(alice, &TO_CONTROLLER, "hi".into())
                .unwrap_err()
                .code,
            ErrorCode::Offline
        );
        let (acme, mut acme_rx) = hub.join(controller("acme"));
        let (_other, mut other_rx) = hub.join(controller("globex"));
        assert_eq!(hub.route(alice, &TO_CONTROLLER, "hi".into()), Ok(1));
        assert_eq!(
            acme_rx.try_recv().unwrap(),
            Outbound::Message {
                from: Sender {
                    role: Role::Client,
                    user: Some("alice".into()),
                    session: alice
                },
                body: "hi".into()
            }
        );
        assert!(other_rx.try_recv().is_err(), "other tenants see nothing");
        // Both of alice's sessions get the controller's message; bob is offline.
        let (_alice2, mut alice2_rx) = hub.join(client("acme", "alice"));
        assert_eq!(hub.route(acme, &to_user("alice"), "ring".into()), Ok(2));
        assert!(alice_rx.try_recv().is_ok() && alice2_rx.try_recv().is_ok());
        assert_eq!(
            hub.route(acme, &to_user("bob"), "ring".into())
                .unwrap_err()
                .code,
            ErrorCode::Offline
        );
        // A client cannot write to a user.
        assert_eq!(
            hub.route(alice, &to_user("alice"), "x".into())
                .unwrap_err()
                .code,
            ErrorCode::Forbidden
        );
        assert_eq!(hub.counts(), (2, 2));
        hub.leave(alice);
        hub.leave(acme);
        assert_eq!(hub.counts(), (1, 1));
    }

    #[test]
    fn a_full_queue_refuses_and_a_new_controller_replaces_the_old() {
        let hub = Hub::new(2);
        let (_acme, mut acme_rx) = hub.join(controller("acme"));
        let (alice, _alice_rx) = hub.join(client("acme", "alice"));
        assert_eq!(hub.route(alice, &TO_CONTROLLER, 1.into()), Ok(1));
        assert_eq!(hub.route(alice, &TO_CONTROLLER, 2.into()), Ok(1));
        assert_eq!(
            hub.route(alice, &TO_CONTROLLER, 3.into()).unwrap_err().code,
            ErrorCode::Busy
        );
        assert!(acme_rx.try_recv().is_ok());
        assert_eq!(hub.route(alice, &TO_CONTROLLER, 3.into()), Ok(1));
        // A reconnect: the new controller gets the messages, the old queue is closed.
        let (_acme2, mut acme2_rx) = hub.join(controller("acme"));
        assert_eq!(hub.route(alice, &TO_CONTROLLER, 4.into()), Ok(1));
        assert!(matches!(acme2_rx.try_recv(), Ok(Outbound::Message { .. })));
        while acme_rx.try_recv().is_ok() {}
        assert!(matches!(
            acme_rx.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
    }
}
