//! A call once answered: ICE runs, the media goes on the selected pair, and the call
//! follows what happens next (pair changes, consent, silence, stats) until it ends.

use std::{sync::Arc, time::Duration};

use webrtc_ice::state::ConnectionState;

use super::{Call, CallEvent, Calls, EndReason, StateChange, security::MediaPlan};
use crate::ice::leg::SelectedPair;

impl Calls {
    /// Runs ICE, then puts the media on the selected pair and follows its changes.
    pub(super) async fn connect(
        self: Arc<Self>,
        call: Arc<Call>,
        controlling: bool,
        ufrag: String,
        pwd: String,
    ) {
        self.notify.to_controller(
            &call.tenant,
            &CallEvent::State {
                call: call.id,
                change: StateChange::Checking,
            },
        );
        let connected = {
            let mut leg = call.leg.lock().await;
            tokio::time::timeout(self.ice_timeout, leg.connect(controlling, ufrag, pwd)).await
        };
        let pair = match connected {
            Ok(Ok(pair)) => pair,
            Ok(Err(err)) => {
                tracing::info!(call = call.id, %err, "calls: ICE failed");
                return self.end(&call, EndReason::IceFailed, true, true).await;
            }
            Err(_) => {
                tracing::info!(call = call.id, "calls: ICE did not connect in time");
                return self.end(&call, EndReason::IceTimeout, true, true).await;
            }
        };
        let conn = call.leg.lock().await.conn();
        let Some(conn) = conn else {
            return self.end(&call, EndReason::IceFailed, true, true).await;
        };
        if matches!(call.inner().plan, MediaPlan::Bridged { .. }) {
            if let Err(reason) = self.start_bridge(&call, conn).await {
                return self.end(&call, reason, true, true).await;
            }
        } else {
            self.start_userspace_media(&call, conn);
        }
        self.install(&call, pair);
        let (app_security, pbx_security) = call.inner().plan.names();
        {
            self.tally
                .lock()
                .expect("calls tally")
                .connected_after(call.created.elapsed().as_secs_f64());
        }
        let state = CallEvent::State {
            call: call.id,
            change: StateChange::Connected {
                local: pair.local,
                remote: pair.remote,
                local_type: pair.local_type,
                remote_type: pair.remote_type,
                app_security,
                pbx_security,
            },
        };
        self.notify.to_controller(&call.tenant, &state);
        self.notify.to_app(&call.tenant, &call.user, &state);
        self.follow(call, pair).await;
    }

    /// A connected call from `pair` on: follows pair changes, consent and silence, sends
    /// stats, until the call ends.
    pub(super) async fn follow(&self, call: Arc<Call>, pair: SelectedPair) {
        let (mut pairs, mut states) = {
            let leg = call.leg.lock().await;
            (leg.pairs(), leg.states())
        };
        let mut current = pair;
        let mut consent = true;
        let mut media_check = aligned_interval(Duration::from_secs(1));
        let mut stats = self.stats_interval.map(aligned_interval);
        loop {
            tokio::select! {
                _ = async { stats.as_mut().expect("guarded").tick().await }, if stats.is_some() => {
                    self.notify.to_controller(&call.tenant, &self.stats_event(&call));
                }
                _ = media_check.tick() => {
                    if consent {
                        self.follow_local_channel(&call, current);
                    }
                    if self.media_idle_sampled(&call) > self.media_timeout {
                        tracing::info!(call = call.id, timeout = ?self.media_timeout, "calls: no media in either direction; the call ends");
                        return self.end(&call, EndReason::MediaTimeout, true, true).await;
                    }
                }
                changed = pairs.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let Some(pair) = *pairs.borrow_and_update() else { continue };
                    if pair != current {
                        tracing::info!(call = call.id, from = %current.remote, to = %pair.remote, "calls: ICE switched pairs; flows replaced");
                        self.install(&call, pair);
                        current = pair;
                        let changed = CallEvent::State {
                            call: call.id,
                            change: StateChange::RouteChanged {
                                remote: pair.remote,
                                remote_type: pair.remote_type,
                            },
                        };
                        self.notify.to_controller(&call.tenant, &changed);
                        self.notify.to_app(&call.tenant, &call.user, &changed);
                    }
                }
                changed = states.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let state = *states.borrow_and_update();
                    match state {
                        // RFC 7675: no answers to the consent checks. Stop sending toward
                        // the app at once; end the call when consent has expired.
                        ConnectionState::Disconnected if consent => {
                            consent = false;
                            tracing::info!(call = call.id, "calls: no consent from the app; media toward it stopped");
                            self.stop_toward_app(&call);
                            self.notify.to_controller(&call.tenant, &CallEvent::State { call: call.id, change: StateChange::ConsentLost });
                        }
                        ConnectionState::Connected if !consent => {
                            consent = true;
                            tracing::info!(call = call.id, "calls: the app answers consent checks again; media toward it resumes");
                            self.install(&call, current);
                        }
                        ConnectionState::Failed | ConnectionState::Closed => {
                            tracing::info!(call = call.id, "calls: ICE consent expired; the call ends");
                            return self.end(&call, EndReason::ConsentLost, true, true).await;
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}

/// An interval whose ticks fall on multiples of `every` since the process began, the first
/// one `every` from now at the latest: every call's once-a-second check wakes relayd once a
/// second in all, not once per call at its own phase (1,000 calls woke it 1,000 times).
fn aligned_interval(every: Duration) -> tokio::time::Interval {
    static EPOCH: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(tokio::time::Instant::now);
    let now = tokio::time::Instant::now();
    let every_ns = every.as_nanos().max(1);
    let since = now.duration_since(epoch).as_nanos();
    let next = epoch + Duration::from_nanos(((since / every_ns + 1) * every_ns) as u64);
    let mut interval = tokio::time::interval_at(next, every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    interval
}
