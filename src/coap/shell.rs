//! What every transport loop around the [`Endpoint`] shares: a thread of its own to run on,
//! running its jobs on the gateway's tracker, waiting for its next deadline and for live
//! messages, and the shutdown sequence.

use std::time::Instant;

use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use super::endpoint::{Endpoint, Job, JobId};
use super::request::Reply;
use crate::bridge::{Bridge, Event, Live};
use crate::deadline::Deadline;

/// Runs `serve` on `socket` on a thread named `name` with a current-thread runtime of its own
/// (`CoapServer::run` says why), and returns when it has ended, however it ends. `what` names
/// the endpoint in the error lines.
pub(crate) async fn on_own_thread<F, Fut>(
    name: &str,
    what: &'static str,
    socket: tokio::net::UdpSocket,
    serve: F,
) where
    F: FnOnce(tokio::net::UdpSocket) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    // The socket is registered with the runtime that bound it; it moves to the endpoint's.
    let socket = match socket.into_std() {
        Ok(socket) => socket,
        Err(e) => return tracing::error!(error = %e, "the {what} socket cannot be moved"),
    };
    let (done, finished) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            match runtime {
                Ok(runtime) => runtime.block_on(async move {
                    match tokio::net::UdpSocket::from_std(socket) {
                        Ok(socket) => serve(socket).await,
                        Err(e) => tracing::error!(error = %e, "the {what} socket cannot be used"),
                    }
                }),
                Err(e) => tracing::error!(error = %e, "the {what} runtime cannot start"),
            }
            drop(done);
        });
    match thread {
        // `done` is dropped when the thread ends, however it ends.
        Ok(_) => {
            let _ = finished.await;
        }
        Err(e) => tracing::error!(error = %e, "the {what} thread cannot start"),
    }
}

/// Runs the endpoint's jobs in tracked tasks and hands their replies back.
pub(crate) struct Jobs {
    bridge: Bridge,
    tracker: TaskTracker,
    done: Option<mpsc::UnboundedSender<(JobId, Reply)>>,
    replies: mpsc::UnboundedReceiver<(JobId, Reply)>,
}

impl Jobs {
    /// Jobs through `bridge`, spawned on `tracker`.
    pub(crate) fn new(bridge: Bridge, tracker: TaskTracker) -> Self {
        let (done, replies) = mpsc::unbounded_channel();
        Self {
            bridge,
            tracker,
            done: Some(done),
            replies,
        }
    }

    /// Starts every job the endpoint asked for.
    pub(crate) fn start(&self, endpoint: &mut Endpoint) {
        while let Some(job) = endpoint.poll_job() {
            self.spawn(job);
        }
    }

    fn spawn(&self, job: Job) {
        let Some(done) = self.done.clone() else {
            return;
        };
        let bridge = self.bridge.clone();
        self.tracker.spawn(async move {
            // At shutdown the loop may be gone; the client then retransmits to a closed port.
            let _ = done.send(job.run(&bridge).await);
        });
    }

    /// The next finished job; `None` once [`Jobs::close`] was called and every job finished.
    pub(crate) async fn next(&mut self) -> Option<(JobId, Reply)> {
        self.replies.recv().await
    }

    /// Starts no more jobs, so that [`Jobs::next`] ends with the last one running.
    pub(crate) fn close(&mut self) {
        self.done = None;
    }
}

/// Sets `deadline` to the endpoint's next one.
pub(crate) fn follow(deadline: &mut Deadline, endpoint: &mut Endpoint) {
    deadline.set(endpoint.poll_timeout().map(tokio::time::Instant::from_std));
}

/// The time to tick the endpoint at once `deadline` passed: now, and never before the
/// deadline, so that every timer due then fires.
pub(crate) fn tick_time(deadline: tokio::time::Instant) -> Instant {
    Instant::now().max(deadline.into_std())
}

/// The next result of the endpoint's live subscription, or never while it holds none.
pub(crate) async fn next_live(live: Option<&mut Live>) -> Result<Event, RecvError> {
    match live {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
