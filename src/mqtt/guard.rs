//! Access control for one MQTT connection, applied packet by packet in the codec, because
//! rumqttd has no authorization hook of its own. A refused CONNECT reaches the router as a
//! throwaway session whose CONNACK is rewritten; a denied PUBLISH never reaches the router; a
//! subscription is narrowed to the topics the ACL lets the client read. Answers the router
//! cannot give (a PUBACK with 0x87, a DISCONNECT with 0x96) are written in place of the
//! PINGRESP of a PINGREQ the guard sends the router instead of the refused packet.

use std::collections::{HashMap, HashSet, VecDeque};

use rumqttd::protocol::{
    ConnAck, Connect, ConnectReturnCode, Disconnect, DisconnectProperties, DisconnectReasonCode,
    Filter, LastWill, Login, Packet, PubAck, PubAckReason, PubComp, PubCompReason, PubRec,
    PubRecReason, SubAck, Subscribe, SubscribeReasonCode, UnsubAck, UnsubAckReason, Unsubscribe,
};

use crate::policy::{Action, AuthError, Denial, Door, Policy, Principal, Readable, Refusal};

/// Keep-alive of a refused connection: the router forgets it soon if the client lingers.
const REFUSED_KEEP_ALIVE: u16 = 5;

/// What happens to an inbound packet the guard refuses.
pub(super) enum Verdict {
    /// Dropped without an answer (a denied QoS 0 publish).
    Drop,
    /// Replaced: the router gets a PINGREQ, the client gets these packets instead of its
    /// PINGRESP.
    Answer(Vec<Packet>),
    /// The connection is closed.
    Close,
}

/// What became of each filter of a SUBSCRIBE, in order.
#[derive(Debug)]
enum Slot {
    /// Refused here with this code.
    Refused(SubscribeReasonCode),
    /// Sent to the router as this many filters.
    Sent(usize),
}

/// The access-control state of one connection.
#[derive(Debug, Default)]
pub(super) struct Guard {
    principal: Option<Principal>,
    /// Rate bucket: the principal's name, or the client id of an anonymous client.
    rate_key: String,
    refused: Option<ConnectReturnCode>,
    closing: bool,
    /// One entry per PINGRESP the router will send: the client's own ping (`None`) or
    /// packets to write instead.
    answers: VecDeque<Option<Vec<Packet>>>,
    /// QoS 2 publishes refused here, whose PUBREL the router must not see.
    refused_qos2: HashSet<u16>,
    aliases: HashMap<u16, String>,
    /// Subscribed filters sent to the router as narrower ones.
    narrowed: HashMap<String, Vec<String>>,
    subacks: HashMap<u16, Vec<Slot>>,
    unsubacks: HashMap<u16, Vec<usize>>,
}

impl Guard {
    /// Whether the connection must be closed at its next packet.
    pub(super) fn closing(&self) -> bool {
        self.closing
    }

    /// Authenticates a CONNECT; a refused one is turned into a throwaway session that cannot
    /// take over anyone's session, publish a will or stay long.
    /// `certified` is the common name of the client's TLS certificate: it names the client
    /// whatever the CONNECT says, as Mosquitto's `use_identity_as_username` does.
    pub(super) fn connect(
        &mut self,
        policy: &Policy,
        certified: Option<&str>,
        connect: &mut Connect,
        will: &mut Option<LastWill>,
        login: &mut Option<Login>,
    ) {
        // Refused before its credentials were read (an unsupported protocol level).
        if self.refused() {
            return;
        }
        let verdict = match (certified, login.as_ref()) {
            (Some(name), _) => Ok(policy.certificate(name)),
            (None, None) => policy.anonymous(),
            (None, Some(l)) => match policy.known_password(&l.username, &l.password) {
                Some(p) => Ok(p),
                None => blocking(|| policy.verify_password(&l.username, &l.password)),
            },
        };
        let refusal = match verdict {
            Ok(principal) => {
                let will_denied = will.as_ref().is_some_and(|w| {
                    std::str::from_utf8(&w.topic).map_or(true, |topic| {
                        policy
                            .authorize(&principal, Action::Publish, topic)
                            .is_err()
                    })
                });
                if will_denied {
                    policy.count(Door::Mqtt, Refusal::Acl);
                    Some(ConnectReturnCode::NotAuthorized)
                } else {
                    self.rate_key =
                        Policy::client_key(&principal, || format!("client:{}", connect.client_id));
                    self.principal = Some(principal);
                    None
                }
            }
            Err(e) => {
                policy.count(Door::Mqtt, Refusal::Login);
                Some(match e {
                    AuthError::Required => ConnectReturnCode::NotAuthorized,
                    AuthError::BadPassword | AuthError::BadToken => {
                        ConnectReturnCode::BadUserNamePassword
                    }
                })
            }
        };
        if let Some(code) = refusal {
            self.refuse(code, connect, will, login);
        }
    }

    /// Whether the CONNECT was refused.
    pub(super) fn refused(&self) -> bool {
        self.refused.is_some()
    }

    /// Refuses the CONNECT with `code` (given as MQTT 5 names it): the router gets a throwaway
    /// session that cannot take over anyone's session, publish a will or stay long.
    pub(super) fn refuse(
        &mut self,
        code: ConnectReturnCode,
        connect: &mut Connect,
        will: &mut Option<LastWill>,
        login: &mut Option<Login>,
    ) {
        self.refused = Some(code);
        self.principal = None;
        connect.client_id = format!("topicgate-refused-{:016x}", rand::random::<u64>());
        connect.clean_session = true;
        connect.keep_alive = REFUSED_KEEP_ALIVE;
        *will = None;
        *login = None;
    }

    /// Rewrites the router's CONNACK of a refused CONNECT.
    pub(super) fn connack(&mut self, v5: bool, ack: &mut ConnAck) {
        if let Some(code) = self.refused {
            ack.code = match code {
                // MQTT 3.1.1 has one code for every kind of unavailability.
                ConnectReturnCode::ServerUnavailable
                | ConnectReturnCode::ServerBusy
                | ConnectReturnCode::QuotaExceeded
                    if !v5 =>
                {
                    ConnectReturnCode::ServiceUnavailable
                }
                code => code,
            };
            ack.session_present = false;
            self.closing = true;
        }
    }

    /// Checks a PUBLISH: the rate, then the ACL. `topic` is its topic name (resolved from an
    /// alias when it has none), `qos` and `pkid` as read off the wire. `Ok` lets it through.
    pub(super) fn publish(
        &mut self,
        policy: &Policy,
        v5: bool,
        topic: &str,
        qos: u8,
        pkid: u16,
    ) -> Result<(), Verdict> {
        let Some(principal) = &self.principal else {
            return Err(Verdict::Close);
        };
        if policy.admit(&self.rate_key).is_err() {
            policy.count(Door::Mqtt, Refusal::Rate);
            if !v5 {
                return Err(Verdict::Close);
            }
            let bye = Disconnect {
                reason_code: DisconnectReasonCode::MessageRateTooHigh,
            };
            // rumqttd's MQTT 5 writer miscounts a DISCONNECT with a reason and no properties
            // (one byte short), so a reason string always goes with it.
            let props = DisconnectProperties {
                session_expiry_interval: None,
                reason_string: Some("message rate too high".to_owned()),
                user_properties: Vec::new(),
                server_reference: None,
            };
            return Err(Verdict::Answer(vec![Packet::Disconnect(bye, Some(props))]));
        }
        match policy.authorize(principal, Action::Publish, topic) {
            Ok(()) => return Ok(()),
            Err(Denial::TooLong(_) | Denial::TooDeep(_)) => return Err(Verdict::Close),
            Err(_) => policy.count(Door::Mqtt, Refusal::Acl),
        }
        // MQTT 3.1.1 has no way to say no: the publish is acknowledged and dropped, as
        // Mosquitto does. MQTT 5 gets reason 0x87.
        Err(match qos {
            0 => Verdict::Drop,
            1 => Verdict::Answer(vec![Packet::PubAck(
                PubAck {
                    pkid,
                    reason: if v5 {
                        PubAckReason::NotAuthorized
                    } else {
                        PubAckReason::Success
                    },
                },
                None,
            )]),
            _ => {
                if !v5 {
                    self.refused_qos2.insert(pkid);
                }
                Verdict::Answer(vec![Packet::PubRec(
                    PubRec {
                        pkid,
                        reason: if v5 {
                            PubRecReason::NotAuthorized
                        } else {
                            PubRecReason::Success
                        },
                    },
                    None,
                )])
            }
        })
    }

    /// Remembers or resolves a topic alias; `None` for an alias never set.
    pub(super) fn alias(&mut self, alias: Option<u16>, topic: &str) -> Option<String> {
        match alias {
            None => Some(topic.to_owned()),
            Some(a) if topic.is_empty() => self.aliases.get(&a).cloned(),
            Some(a) => {
                self.aliases.insert(a, topic.to_owned());
                Some(topic.to_owned())
            }
        }
    }

    /// The PUBREL of a QoS 2 publish refused here is answered here.
    pub(super) fn pubrel(&mut self, pkid: u16) -> Option<Verdict> {
        self.refused_qos2.remove(&pkid).then(|| {
            Verdict::Answer(vec![Packet::PubComp(
                PubComp {
                    pkid,
                    reason: PubCompReason::Success,
                },
                None,
            )])
        })
    }

    /// Narrows each filter of a SUBSCRIBE to what the client may read. Returns each
    /// requested filter's scope (`None`: refused), or the whole SUBACK when nothing is left
    /// for the router.
    pub(super) fn subscribe(
        &mut self,
        policy: &Policy,
        v5: bool,
        subscribe: &mut Subscribe,
    ) -> Result<Vec<Option<Readable>>, Vec<Packet>> {
        let Some(principal) = self.principal.clone() else {
            return Err(Vec::new());
        };
        let mut slots = Vec::with_capacity(subscribe.filters.len());
        let mut scopes = Vec::with_capacity(subscribe.filters.len());
        let mut sent: Vec<Filter> = Vec::with_capacity(subscribe.filters.len());
        for filter in subscribe.filters.drain(..) {
            let (share, inner) = split_share(&filter.path);
            match policy.subscription(&principal, inner) {
                Ok(Readable::All) => {
                    self.narrowed.remove(&filter.path);
                    slots.push(Slot::Sent(1));
                    scopes.push(Some(Readable::All));
                    sent.push(filter);
                }
                Ok(Readable::Part(parts)) => {
                    let paths: Vec<String> = parts.iter().map(|p| format!("{share}{p}")).collect();
                    slots.push(Slot::Sent(paths.len()));
                    for path in &paths {
                        sent.push(Filter {
                            path: path.clone(),
                            ..filter.clone()
                        });
                    }
                    self.narrowed.insert(filter.path.clone(), paths);
                    scopes.push(Some(Readable::Part(parts)));
                }
                Ok(Readable::Nothing) | Err(Denial::Unauthenticated | Denial::Forbidden(_)) => {
                    policy.count(Door::Mqtt, Refusal::Acl);
                    slots.push(Slot::Refused(if v5 {
                        SubscribeReasonCode::NotAuthorized
                    } else {
                        SubscribeReasonCode::Failure
                    }));
                    scopes.push(None);
                }
                Err(Denial::TooLong(_) | Denial::TooDeep(_)) => {
                    slots.push(Slot::Refused(if v5 {
                        SubscribeReasonCode::TopicFilterInvalid
                    } else {
                        SubscribeReasonCode::Failure
                    }));
                    scopes.push(None);
                }
            }
        }
        if sent.is_empty() {
            let return_codes = slots
                .into_iter()
                .map(|s| match s {
                    Slot::Refused(code) => code,
                    Slot::Sent(_) => SubscribeReasonCode::Failure,
                })
                .collect();
            let ack = SubAck {
                pkid: subscribe.pkid,
                return_codes,
            };
            return Err(vec![Packet::SubAck(ack, None)]);
        }
        subscribe.filters = sent;
        self.subacks.insert(subscribe.pkid, slots);
        Ok(scopes)
    }

    /// Folds the router's SUBACK back onto the filters the client asked for.
    pub(super) fn suback(&mut self, ack: &mut SubAck) {
        let Some(slots) = self.subacks.remove(&ack.pkid) else {
            return;
        };
        let mut codes = std::mem::take(&mut ack.return_codes).into_iter();
        for slot in slots {
            let code = match slot {
                Slot::Refused(code) => code,
                Slot::Sent(n) => codes
                    .by_ref()
                    .take(n)
                    .reduce(|a, b| if granted(&a) { a } else { b })
                    .unwrap_or(SubscribeReasonCode::Failure),
            };
            ack.return_codes.push(code);
        }
    }

    /// Unsubscribes the narrower filters a subscription was sent as.
    pub(super) fn unsubscribe(&mut self, unsubscribe: &mut Unsubscribe) {
        if !unsubscribe
            .filters
            .iter()
            .any(|f| self.narrowed.contains_key(f))
        {
            return;
        }
        let mut counts = Vec::with_capacity(unsubscribe.filters.len());
        let mut sent = Vec::new();
        for f in unsubscribe.filters.drain(..) {
            match self.narrowed.remove(&f) {
                Some(paths) => {
                    counts.push(paths.len());
                    sent.extend(paths);
                }
                None => {
                    counts.push(1);
                    sent.push(f);
                }
            }
        }
        unsubscribe.filters = sent;
        self.unsubacks.insert(unsubscribe.pkid, counts);
    }

    /// Folds the router's UNSUBACK back onto the filters the client named.
    pub(super) fn unsuback(&mut self, ack: &mut UnsubAck) {
        let Some(counts) = self.unsubacks.remove(&ack.pkid) else {
            return;
        };
        let mut reasons = std::mem::take(&mut ack.reasons).into_iter();
        for n in counts {
            let reason = reasons
                .by_ref()
                .take(n)
                .reduce(|a, b| if a == UnsubAckReason::Success { a } else { b })
                .unwrap_or(UnsubAckReason::Success);
            ack.reasons.push(reason);
        }
    }

    /// Records a PINGREQ the client sent itself.
    pub(super) fn client_ping(&mut self) {
        self.answers.push_back(None);
    }

    /// Records packets to write at the PINGRESP of the PINGREQ sent in place of a packet.
    pub(super) fn answer_later(&mut self, packets: Vec<Packet>) {
        self.answers.push_back(Some(packets));
    }

    /// What to write for the router's next PINGRESP: itself (`None`) or the packets queued.
    pub(super) fn pingresp(&mut self) -> Option<Vec<Packet>> {
        let packets = self.answers.pop_front().flatten()?;
        // Once a DISCONNECT is written, the connection ends at the client's next packet.
        if packets.iter().any(|p| matches!(p, Packet::Disconnect(..))) {
            self.closing = true;
        }
        Some(packets)
    }
}

fn granted(code: &SubscribeReasonCode) -> bool {
    matches!(
        code,
        SubscribeReasonCode::QoS0
            | SubscribeReasonCode::QoS1
            | SubscribeReasonCode::QoS2
            | SubscribeReasonCode::Success(_)
    )
}

/// `$share/group/` and the filter inside a shared subscription, or `""` and the filter.
pub(super) fn split_share(path: &str) -> (&str, &str) {
    if let Some(rest) = path.strip_prefix("$share/")
        && let Some((group, _)) = rest.split_once('/')
    {
        let at = "$share/".len() + group.len() + 1;
        return (&path[..at], &path[at..]);
    }
    ("", path)
}

/// Runs a slow check (argon2) where the runtime allows blocking this thread.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_subscriptions_are_split() {
        assert_eq!(split_share("$share/g/a/#"), ("$share/g/", "a/#"));
        assert_eq!(split_share("a/#"), ("", "a/#"));
        assert_eq!(split_share("$share/g"), ("", "$share/g"));
    }

    #[test]
    fn a_narrowed_suback_folds_back() {
        let mut g = Guard::default();
        g.subacks.insert(
            7,
            vec![
                Slot::Sent(2),
                Slot::Refused(SubscribeReasonCode::Failure),
                Slot::Sent(1),
            ],
        );
        let mut ack = SubAck {
            pkid: 7,
            return_codes: vec![
                SubscribeReasonCode::Failure,
                SubscribeReasonCode::QoS1,
                SubscribeReasonCode::QoS0,
            ],
        };
        g.suback(&mut ack);
        assert_eq!(
            ack.return_codes,
            vec![
                SubscribeReasonCode::QoS1,
                SubscribeReasonCode::Failure,
                SubscribeReasonCode::QoS0
            ]
        );
    }
}
