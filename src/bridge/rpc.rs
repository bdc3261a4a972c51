//! Request/response across the topic space: a request is published with a reply topic of its
//! own, and the first message accepted on that topic with its correlation data (or none, as an
//! MQTT 3.1.1 client sends) is handed to the request that waits for it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::oneshot;

use super::message::Message;
use crate::policy::REPLY_PREFIX;

/// How a request is published and how long it waits.
#[derive(Debug, Clone, Copy)]
pub struct Call {
    /// How long to wait for the reply.
    pub timeout: Duration,
    /// Publish the request's JSON envelope (payload and metadata, the reply topic included) as
    /// the payload, for responders that cannot read MQTT 5 properties.
    pub envelope: bool,
}

/// Why a request got no reply.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The request could not be published.
    #[error(transparent)]
    Publish(#[from] super::BridgeError),
    /// Nothing answered in time.
    #[error("no reply within {}", humantime::format_duration(*.0))]
    NoReply(Duration),
    /// The gateway is shutting down: nothing waits for replies any more.
    #[error("the gateway is shutting down")]
    Closed,
}

/// The requests waiting for a reply, by reply topic.
#[derive(Debug, Default)]
pub(crate) struct Replies {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    waiting: HashMap<String, Waiter>,
    /// Set at shutdown: waiting requests are let go and new ones are not registered.
    closed: bool,
}

#[derive(Debug)]
struct Waiter {
    correlation: Bytes,
    reply: oneshot::Sender<Arc<Message>>,
}

impl Replies {
    /// Gives `message` the fresh reply topic and correlation data of a new request, and
    /// registers the request; the returned guard unregisters it when dropped.
    pub(crate) fn register(
        &self,
        message: &mut Message,
        envelope: bool,
    ) -> (Pending<'_>, oneshot::Receiver<Arc<Message>>) {
        let topic = format!("{REPLY_PREFIX}{:032x}", rand::random::<u128>());
        let correlation = Bytes::from(format!("{:032x}", rand::random::<u128>()));
        message.response_topic = Some(topic.clone());
        message.correlation_data = Some(correlation.clone());
        if envelope {
            message.payload = Bytes::from(message.envelope_json(SystemTime::now()));
            message.content_type = Some("application/json".to_owned());
        }
        let (reply, rx) = oneshot::channel();
        let mut state = self.lock();
        // Closed, the sender is dropped here and the request learns it at once.
        if !state.closed {
            state
                .waiting
                .insert(topic.clone(), Waiter { correlation, reply });
        }
        drop(state);
        (
            Pending {
                replies: self,
                topic,
            },
            rx,
        )
    }

    /// Hands `message` to the request waiting on its topic, if it is that request's reply.
    pub(crate) fn deliver(&self, message: &Arc<Message>) {
        let topic = message.topic.as_str();
        if !topic.starts_with(REPLY_PREFIX) {
            return;
        }
        let mut state = self.lock();
        let waiting = &mut state.waiting;
        let Some(waiter) = waiting.get(topic) else {
            return;
        };
        // A reply without correlation data comes from a client that cannot send it; the
        // topic, fresh and unreadable to others, is then the correlation.
        if message
            .correlation_data
            .as_ref()
            .is_some_and(|c| *c != waiter.correlation)
        {
            return;
        }
        if let Some(waiter) = waiting.remove(topic) {
            // The request may have stopped waiting in the meantime: nobody to tell.
            let _ = waiter.reply.send(Arc::clone(message));
        }
    }

    /// Lets every waiting request go, now and from now on: they end as [`CallError::Closed`].
    pub(crate) fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.waiting.clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A registered request; unregisters it when dropped, whether it got its reply, timed out or
/// was abandoned by its client.
pub(crate) struct Pending<'a> {
    replies: &'a Replies,
    topic: String,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.replies.lock().waiting.remove(&self.topic);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridge::message::Origin;
    use crate::topic::Topic;

    fn reply(topic: &str, correlation: Option<&Bytes>) -> Arc<Message> {
        let mut m = Message::new(Topic::parse(topic).unwrap(), "answer", Origin::Mqtt);
        m.correlation_data = correlation.cloned();
        Arc::new(m)
    }

    #[test]
    fn a_reply_reaches_only_its_request() {
        let replies = Replies::default();
        let mut request = Message::new(Topic::parse("svc").unwrap(), "q", Origin::Http);
        let (pending, mut rx) = replies.register(&mut request, false);
        let topic = request.response_topic.clone().unwrap();
        let correlation = request.correlation_data.clone().unwrap();
        assert!(topic.starts_with(REPLY_PREFIX));
        // Another correlation on the topic, or the right one elsewhere, is not the reply.
        replies.deliver(&reply(&topic, Some(&Bytes::from_static(b"other"))));
        replies.deliver(&reply("rpc/replies/x", Some(&correlation)));
        assert!(rx.try_recv().is_err());
        replies.deliver(&reply(&topic, Some(&correlation)));
        assert_eq!(rx.try_recv().unwrap().payload, "answer");
        drop(pending);
        assert!(replies.lock().waiting.is_empty());
    }

    #[test]
    fn a_reply_without_correlation_is_taken_and_an_abandoned_request_is_forgotten() {
        let replies = Replies::default();
        let mut request = Message::new(Topic::parse("svc").unwrap(), "q", Origin::Http);
        let (pending, mut rx) = replies.register(&mut request, true);
        let envelope: serde_json::Value = serde_json::from_slice(&request.payload).unwrap();
        let topic = request.response_topic.clone().unwrap();
        assert_eq!(envelope["payload"], "q");
        assert_eq!(envelope["properties"]["response_topic"], topic.as_str());
        replies.deliver(&reply(&topic, None));
        assert!(rx.try_recv().is_ok());
        let (abandoned, _rx) = replies.register(&mut request, false);
        drop(abandoned);
        drop(pending);
        assert!(replies.lock().waiting.is_empty());
        // At shutdown, waiting and later requests are let go at once.
        let (_waiting, mut before) = replies.register(&mut request, false);
        replies.close();
        let (_late, mut after) = replies.register(&mut request, false);
        for rx in [&mut before, &mut after] {
            assert_eq!(rx.try_recv(), Err(oneshot::error::TryRecvError::Closed));
        }
    }
}
