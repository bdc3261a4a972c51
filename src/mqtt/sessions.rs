//! Every client id's session across its connections: takeover, Session Expiry, wills and their
//! delay. Connections come and go; what is kept between them waits here with its timers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::message::MqttPublish;
use super::session::Kept;

/// Ends the router's part of a kept session (a clean link with the same client id).
pub(super) type Reap = Arc<dyn Fn(&str) + Send + Sync>;
/// Publishes a will to MQTT subscribers and the gateway's store.
pub(super) type WillSink = Arc<dyn Fn(MqttPublish) + Send + Sync>;

/// A will, waiting for its delay or the end of its session.
#[derive(Debug, Clone)]
pub(super) struct PendingWill {
    pub(super) publish: MqttPublish,
    pub(super) delay: u32,
}

struct Active {
    kick: CancellationToken,
    gone: watch::Receiver<bool>,
}

#[derive(Default)]
struct Entry {
    generation: u64,
    active: Option<Active>,
    kept: Option<Kept>,
    /// Whether the router holds a session for this client id.
    router_kept: bool,
}

/// What a new connection starts from.
pub(super) struct Start {
    pub(super) generation: u64,
    pub(super) kick: CancellationToken,
    pub(super) gone: watch::Sender<bool>,
    /// The session kept from before, when the client resumes one.
    pub(super) kept: Option<Kept>,
    /// The router still holds a session that the client asked to start clean.
    pub(super) reap_first: bool,
}

/// The sessions of one gateway.
pub(super) struct Sessions {
    entries: Mutex<HashMap<String, Entry>>,
    reap: Reap,
    wills: WillSink,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Sessions {
    pub(super) fn new(
        reap: Reap,
        wills: WillSink,
        tracker: TaskTracker,
        cancel: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            entries: Mutex::new(HashMap::new()),
            reap,
            wills,
            tracker,
            cancel,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes the client id over: an active connection with it is told to go (session taken
    /// over) and waited for; a session kept for it is resumed, or discarded with `clean`.
    pub(super) async fn begin(&self, client_id: &str, clean: bool) -> Start {
        let previous = {
            let mut entries = self.lock();
            let entry = entries.entry(client_id.to_owned()).or_default();
            entry.active.take()
        };
        if let Some(active) = previous {
            active.kick.cancel();
            let mut gone = active.gone;
            // The old connection hands its session back before it goes; it is bounded by its
            // own write timeout.
            let _ = tokio::time::timeout(Duration::from_secs(10), gone.wait_for(|g| *g)).await;
        }
        let mut entries = self.lock();
        let entry = entries.entry(client_id.to_owned()).or_default();
        entry.generation += 1;
        let (gone_tx, gone_rx) = watch::channel(false);
        let kick = self.cancel.child_token();
        entry.active = Some(Active {
            kick: kick.clone(),
            gone: gone_rx,
        });
        let kept = entry.kept.take();
        let reap_first = clean && entry.router_kept;
        entry.router_kept = false;
        Start {
            generation: entry.generation,
            kick,
            gone: gone_tx,
            kept: if clean { None } else { kept },
            reap_first,
        }
    }

    /// A connection ended. `kept` is the session to keep for `expiry` seconds (`None`: for
    /// ever, as MQTT 3.1.1 persistent sessions are); its will is published after its delay
    /// unless the client comes back first.
    pub(super) fn end(
        self: &Arc<Self>,
        client_id: &str,
        generation: u64,
        kept: Option<(Kept, Option<u32>)>,
        will: Option<PendingWill>,
    ) {
        let expiry = kept.as_ref().map(|(_, e)| *e);
        {
            let mut entries = self.lock();
            let Some(entry) = entries.get_mut(client_id) else {
                return;
            };
            if entry.generation == generation {
                entry.active = None;
                match kept {
                    Some((kept, _)) => {
                        entry.kept = Some(kept);
                        entry.router_kept = true;
                    }
                    None => {
                        entries.remove(client_id);
                    }
                }
            }
        }
        let session_secs = match expiry {
            None => 0,
            Some(None) => u32::MAX,
            Some(Some(secs)) => secs,
        };
        if let Some(will) = will {
            let delay = will.delay.min(session_secs);
            if delay == 0 {
                (self.wills)(will.publish);
            } else {
                let this = self.clone();
                let id = client_id.to_owned();
                self.tracker.spawn(async move {
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(u64::from(delay))) => {}
                        () = this.cancel.cancelled() => {}
                    }
                    // The will goes unless the client came back to the same session.
                    if this.generation_of(&id) == Some(generation)
                        || this.generation_of(&id).is_none()
                    {
                        (this.wills)(will.publish);
                    }
                });
            }
        }
        if let Some(Some(secs)) = expiry {
            let this = self.clone();
            let id = client_id.to_owned();
            self.tracker.spawn(async move {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(u64::from(secs))) => {}
                    () = this.cancel.cancelled() => return,
                }
                let expired = {
                    let mut entries = this.lock();
                    match entries.get(&id) {
                        Some(e) if e.generation == generation && e.active.is_none() => {
                            entries.remove(&id);
                            true
                        }
                        _ => false,
                    }
                };
                if expired {
                    let reap = this.reap.clone();
                    let _ = tokio::task::spawn_blocking(move || reap(&id)).await;
                }
            });
        }
    }

    fn generation_of(&self, client_id: &str) -> Option<u64> {
        self.lock().get(client_id).map(|e| e.generation)
    }

    /// Ends the router's session for a client id that starts clean.
    pub(super) async fn reap(&self, client_id: &str) {
        let reap = self.reap.clone();
        let id = client_id.to_owned();
        let _ = tokio::task::spawn_blocking(move || reap(&id)).await;
    }
}
