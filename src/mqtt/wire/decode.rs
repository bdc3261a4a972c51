//! Framing and strict parsing of MQTT packets: a `Decoder` takes whole packets off the front of
//! a receive buffer and refuses anything the protocol says to close the connection for, with the
//! answer (CONNACK, MQTT 5 DISCONNECT reason code or silent close) the peer should get.

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;

use super::packet::{
    Ack, Auth, ConnAck, Connect, Disconnect, Packet, Publish, PublishProperties, QoS, SubAck,
    Subscribe, Subscription, Unsubscribe, Version, Will,
};
use super::{Answer, WireError};

const MALFORMED: u8 = 0x81;
const PROTOCOL: u8 = 0x82;
const TOO_LARGE: u8 = 0x95;

/// Why a packet was refused, before it is turned into an `Answer` for the connection's state.
enum Fail {
    /// An MQTT 5 reason code (a silent close before version 5 or before the CONNECT).
    Code(u8, &'static str),
    /// A silent close whatever the version.
    Close(&'static str),
    /// A CONNACK with this code, written for this version.
    ConnAck(Version, u8, &'static str),
}

type R<T> = Result<T, Fail>;

fn malformed(detail: &'static str) -> Fail {
    Fail::Code(MALFORMED, detail)
}

fn protocol(detail: &'static str) -> Fail {
    Fail::Code(PROTOCOL, detail)
}

/// Decodes the packets of one connection, strictly.
#[derive(Debug, Clone)]
pub(crate) struct Decoder {
    max_packet_size: usize,
    version: Option<Version>,
    /// Decoding what a server sends (the client side of a connection) rather than what a client sends.
    from_server: bool,
    /// The CONNECT carried an Authentication Method, so AUTH packets may follow.
    auth_method: bool,
    /// The CONNECT's Session Expiry Interval was absent or 0, so a DISCONNECT may not raise it.
    expiry_zero: bool,
}

impl Decoder {
    /// A decoder for a new connection: the first packet must be a CONNECT.
    pub(crate) fn new(max_packet_size: usize) -> Self {
        Decoder {
            max_packet_size,
            version: None,
            from_server: false,
            auth_method: false,
            expiry_zero: true,
        }
    }

    #[cfg(test)]
    /// A decoder for the packets a server sends on a connection of this version (used by clients and tests).
    pub(crate) fn for_client(version: Version, max_packet_size: usize) -> Self {
        Decoder {
            max_packet_size,
            version: Some(version),
            from_server: true,
            auth_method: true,
            expiry_zero: false,
        }
    }

    #[cfg(test)]
    /// The version the CONNECT named, once one was decoded.
    pub(crate) fn version(&self) -> Option<Version> {
        self.version
    }

    #[cfg(test)]
    /// Changes the largest packet accepted (bytes, whole packet including fixed header).
    pub(crate) fn set_max_packet_size(&mut self, max: usize) {
        self.max_packet_size = max;
    }

    /// Takes one whole packet off the front of `buf`; Ok(None) when more bytes are needed.
    pub(crate) fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Packet>, WireError> {
        let Some(&b0) = buf.first() else {
            return Ok(None);
        };
        let mut remaining = 0usize;
        let mut i = 1;
        loop {
            let Some(&b) = buf.get(i) else {
                return Ok(None);
            };
            remaining |= usize::from(b & 0x7f) << (7 * (i - 1));
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
            if i == 5 {
                return Err(self.fail(malformed("remaining length longer than 4 bytes")));
            }
        }
        let total = i + remaining;
        let kind = b0 >> 4;
        match self.version {
            None => {
                if kind != 1 {
                    return Err(self.fail(Fail::Close("first packet is not a CONNECT")));
                }
                if total > self.max_packet_size {
                    return Err(self.fail(Fail::Close("packet too large")));
                }
            }
            Some(version) => {
                if total > self.max_packet_size {
                    return Err(self.fail(Fail::Code(TOO_LARGE, "packet too large")));
                }
                if let Err(f) = self.check_header(version, b0, remaining) {
                    return Err(self.fail(f));
                }
            }
        }
        if buf.len() < total {
            // No reserve here: a header alone must not make the connection allocate its claim.
            return Ok(None);
        }
        let frame = buf.split_to(total).freeze();
        let rd = Rd {
            buf: &frame,
            pos: i,
            end: total,
        };
        let result = match self.version {
            None => self.connect(rd, b0).map(|c| {
                self.version = Some(c.version);
                self.auth_method = c.authentication_method.is_some();
                self.expiry_zero = c.session_expiry.unwrap_or(0) == 0;
                Packet::Connect(Box::new(c))
            }),
            Some(version) => self.body(version, b0, rd),
        };
        result.map(Some).map_err(|f| self.fail(f))
    }

    fn fail(&self, f: Fail) -> WireError {
        match f {
            Fail::Code(code, detail) => WireError {
                answer: if self.version == Some(Version::V5) {
                    Answer::Disconnect(code)
                } else {
                    Answer::Close
                },
                detail,
            },
            Fail::Close(detail) => WireError {
                answer: Answer::Close,
                detail,
            },
            Fail::ConnAck(version, code, detail) => WireError {
                answer: Answer::ConnAck { version, code },
                detail,
            },
        }
    }

    /// Checks what the fixed header alone decides, once the CONNECT is behind.
    fn check_header(&self, version: Version, b0: u8, remaining: usize) -> R<()> {
        let v5 = version == Version::V5;
        let flags = b0 & 0x0f;
        let server = self.from_server;
        let flags_are = |want: u8| {
            if flags == want {
                Ok(())
            } else {
                Err(malformed("reserved fixed header flags"))
            }
        };
        match b0 >> 4 {
            0 => Err(protocol("reserved packet type 0")),
            1 => Err(protocol("second CONNECT")),
            2 if !server => Err(protocol("CONNACK from a client")),
            2 => flags_are(0),
            3 => {
                if flags & 0x06 == 0x06 {
                    Err(malformed("PUBLISH with QoS 3"))
                } else if flags & 0x0e == 0x08 {
                    Err(malformed("PUBLISH with DUP set and QoS 0"))
                } else {
                    Ok(())
                }
            }
            4..=7 => {
                flags_are(if b0 >> 4 == 6 { 2 } else { 0 })?;
                if !v5 && remaining != 2 {
                    Err(Fail::Close(
                        "acknowledgement with a remaining length other than 2",
                    ))
                } else {
                    Ok(())
                }
            }
            8 | 10 if server => Err(protocol("subscription request from a server")),
            8 | 10 => flags_are(2),
            9 | 11 => {
                flags_are(0)?;
                if !server {
                    Err(protocol("SUBACK or UNSUBACK from a client"))
                } else if b0 >> 4 == 11 && !v5 && remaining != 2 {
                    Err(Fail::Close("UNSUBACK with a remaining length other than 2"))
                } else {
                    Ok(())
                }
            }
            12 | 13 => {
                if remaining != 0 {
                    return Err(Fail::Close("PINGREQ or PINGRESP with a body"));
                }
                if (b0 >> 4 == 12) == server {
                    return Err(protocol("ping in the wrong direction"));
                }
                flags_are(0)
            }
            14 => {
                if !v5 && remaining != 0 {
                    return Err(Fail::Close("DISCONNECT with a body before MQTT 5"));
                }
                flags_are(0)
            }
            _ => {
                if !v5 {
                    return Err(Fail::Close("AUTH before MQTT 5"));
                }
                if !self.auth_method {
                    return Err(protocol(
                        "AUTH without an Authentication Method in the CONNECT",
                    ));
                }
                flags_are(0)
            }
        }
    }

    fn body(&self, version: Version, b0: u8, mut rd: Rd<'_>) -> R<Packet> {
        let v5 = version == Version::V5;
        Ok(match b0 >> 4 {
            2 => Packet::ConnAck(Box::new(self.connack(v5, &mut rd)?)),
            3 => Packet::Publish(self.publish(v5, b0, rd)?),
            4 => Packet::PubAck(self.ack(v5, 4, &mut rd)?),
            5 => Packet::PubRec(self.ack(v5, 5, &mut rd)?),
            6 => Packet::PubRel(self.ack(v5, 6, &mut rd)?),
            7 => Packet::PubComp(self.ack(v5, 7, &mut rd)?),
            8 => Packet::Subscribe(self.subscribe(v5, &mut rd)?),
            9 => Packet::SubAck(self.suback(v5, false, &mut rd)?),
            10 => Packet::Unsubscribe(self.unsubscribe(v5, &mut rd)?),
            11 => Packet::UnsubAck(self.suback(v5, true, &mut rd)?),
            12 => Packet::PingReq,
            13 => Packet::PingResp,
            14 => Packet::Disconnect(self.disconnect(v5, &mut rd)?),
            _ => Packet::Auth(self.auth(&mut rd)?),
        })
    }

    fn connect(&self, mut rd: Rd<'_>, b0: u8) -> R<Connect> {
        let name_len = usize::from(rd.u16()?);
        let name = rd.take(name_len)?;
        let level = rd.u8()?;
        let version = match (name, level) {
            (b"MQIsdp", 3) => Version::V31,
            (b"MQTT", 4) => Version::V311,
            (b"MQTT", 5) => Version::V5,
            (b"MQIsdp", _) => {
                return Err(Fail::ConnAck(Version::V31, 1, "unsupported protocol level"));
            }
            (b"MQTT", _) => {
                return Err(Fail::ConnAck(
                    Version::V311,
                    1,
                    "unsupported protocol level",
                ));
            }
            _ => return Err(Fail::Close("unknown protocol name")),
        };
        let v5 = version == Version::V5;
        if version != Version::V31 && b0 & 0x0f != 0 {
            return Err(malformed("reserved CONNECT header flags"));
        }
        let flags = rd.u8()?;
        if version != Version::V31 && flags & 0x01 != 0 {
            return Err(malformed("reserved CONNECT flag set"));
        }
        let will_flag = flags & 0x04 != 0;
        let will_qos = (flags >> 3) & 0x03;
        let will_retain = flags & 0x20 != 0;
        if !will_flag && (will_qos != 0 || will_retain) {
            return Err(malformed("will QoS or retain without the will flag"));
        }
        let will_qos = qos_from(will_qos).ok_or(malformed("will QoS 3"))?;
        let user_flag = flags & 0x80 != 0;
        let pass_flag = flags & 0x40 != 0;
        if !v5 && pass_flag && !user_flag {
            return Err(malformed("password flag without user name flag"));
        }
        let mut c = Connect {
            version,
            clean_start: flags & 0x02 != 0,
            keep_alive: rd.u16()?,
            ..Connect::default()
        };
        if v5 {
            let mut p = Props::read(&mut rd, false)?;
            while let Some((id, v)) = p.next()? {
                match (id, v) {
                    (0x11, Val::Four(x)) => c.session_expiry = Some(x),
                    (0x21, Val::Two(x)) => c.receive_maximum = Some(x),
                    (0x27, Val::Four(x)) => c.maximum_packet_size = Some(x),
                    (0x22, Val::Two(x)) => c.topic_alias_maximum = Some(x),
                    (0x19, Val::Byte(x)) => c.request_response_information = Some(x),
                    (0x17, Val::Byte(x)) => c.request_problem_information = Some(x),
                    (0x26, Val::Pair(k, v)) => c.user_properties.push((k.into(), v.into())),
                    (0x15, Val::Str(s)) => c.authentication_method = Some(s.into()),
                    (0x16, Val::Bin(b)) => c.authentication_data = Some(b),
                    _ => p.not_allowed(),
                }
            }
            p.finish()?;
            if c.authentication_data.is_some() && c.authentication_method.is_none() {
                return Err(protocol(
                    "Authentication Data without Authentication Method",
                ));
            }
        }
        c.client_id = rd.str()?.to_owned();
        if c.client_id.is_empty() {
            if version == Version::V31 {
                return Err(Fail::ConnAck(
                    version,
                    2,
                    "empty client identifier in MQTT 3.1",
                ));
            }
            if version == Version::V311 && !c.clean_start {
                return Err(Fail::ConnAck(
                    version,
                    2,
                    "empty client identifier without clean session",
                ));
            }
        }
        if will_flag {
            let mut w = Will {
                qos: will_qos,
                retain: will_retain,
                ..Will::default()
            };
            if v5 {
                let mut p = Props::read(&mut rd, false)?;
                while let Some((id, v)) = p.next()? {
                    let wp = &mut w.properties;
                    match (id, v) {
                        (0x18, Val::Four(x)) => w.delay_interval = Some(x),
                        (0x01, Val::Byte(x)) => wp.payload_format_indicator = Some(x),
                        (0x02, Val::Four(x)) => wp.message_expiry_interval = Some(x),
                        (0x03, Val::Str(s)) => wp.content_type = Some(s.into()),
                        (0x08, Val::Str(s)) => wp.response_topic = Some(s.into()),
                        (0x09, Val::Bin(b)) => wp.correlation_data = Some(b),
                        (0x26, Val::Pair(k, v)) => wp.user_properties.push((k.into(), v.into())),
                        _ => p.not_allowed(),
                    }
                }
                p.finish()?;
            }
            let topic = rd.str()?;
            if topic.is_empty() || has_wildcard(topic) {
                return Err(malformed("invalid will topic"));
            }
            w.topic = topic.to_owned();
            w.payload = rd.bin()?;
            c.will = Some(w);
        }
        if user_flag {
            c.username = Some(rd.str()?.to_owned());
        }
        if pass_flag {
            c.password = Some(rd.bin()?);
        }
        rd.done()?;
        Ok(c)
    }

    fn connack(&self, v5: bool, rd: &mut Rd<'_>) -> R<ConnAck> {
        let flags = rd.u8()?;
        if flags & 0xfe != 0 {
            return Err(malformed("reserved CONNACK flags"));
        }
        let mut c = ConnAck {
            session_present: flags & 1 != 0,
            code: rd.u8()?,
            ..ConnAck::default()
        };
        if v5 {
            let mut p = Props::read(rd, false)?;
            while let Some((id, v)) = p.next()? {
                match (id, v) {
                    (0x11, Val::Four(x)) => c.session_expiry = Some(x),
                    (0x21, Val::Two(x)) => c.receive_maximum = Some(x),
                    (0x24, Val::Byte(x)) => c.maximum_qos = Some(x),
                    (0x25, Val::Byte(x)) => c.retain_available = Some(x),
                    (0x27, Val::Four(x)) => c.maximum_packet_size = Some(x),
                    (0x12, Val::Str(s)) => c.assigned_client_identifier = Some(s.into()),
                    (0x22, Val::Two(x)) => c.topic_alias_maximum = Some(x),
                    (0x1f, Val::Str(s)) => c.reason_string = Some(s.into()),
                    (0x26, Val::Pair(k, v)) => c.user_properties.push((k.into(), v.into())),
                    (0x28, Val::Byte(x)) => c.wildcard_subscription_available = Some(x),
                    (0x29, Val::Byte(x)) => c.subscription_identifiers_available = Some(x),
                    (0x2a, Val::Byte(x)) => c.shared_subscription_available = Some(x),
                    (0x13, Val::Two(x)) => c.server_keep_alive = Some(x),
                    (0x1a, Val::Str(s)) => c.response_information = Some(s.into()),
                    (0x1c, Val::Str(s)) => c.server_reference = Some(s.into()),
                    (0x15, Val::Str(s)) => c.authentication_method = Some(s.into()),
                    (0x16, Val::Bin(b)) => c.authentication_data = Some(b),
                    _ => p.not_allowed(),
                }
            }
            p.finish()?;
        }
        rd.done()?;
        Ok(c)
    }

    fn publish(&self, v5: bool, b0: u8, mut rd: Rd<'_>) -> R<Publish> {
        let qos = qos_from((b0 >> 1) & 0x03).ok_or(malformed("PUBLISH with QoS 3"))?;
        let topic = rd.text()?;
        if has_wildcard(&topic) {
            return Err(malformed("wildcard in a topic name"));
        }
        let packet_id = if qos == QoS::AtMostOnce {
            0
        } else {
            nonzero_id(rd.u16()?)?
        };
        let mut properties = PublishProperties::default();
        if v5 {
            let mut p = Props::read(&mut rd, self.from_server)?;
            while let Some((id, v)) = p.next()? {
                let pp = &mut properties;
                match (id, v) {
                    (0x01, Val::Byte(x)) => pp.payload_format_indicator = Some(x),
                    (0x02, Val::Four(x)) => pp.message_expiry_interval = Some(x),
                    (0x23, Val::Two(x)) => pp.topic_alias = Some(x),
                    (0x08, Val::Str(s)) => pp.response_topic = Some(s.into()),
                    (0x09, Val::Bin(b)) => pp.correlation_data = Some(b),
                    (0x26, Val::Pair(k, v)) => pp.user_properties.push((k.into(), v.into())),
                    // A client may not send one; Mosquitto reads and drops it, and so does this.
                    (0x0b, Val::Var(x)) => {
                        if self.from_server {
                            pp.subscription_identifiers.push(x);
                        }
                    }
                    (0x03, Val::Str(s)) => pp.content_type = Some(s.into()),
                    _ => p.not_allowed(),
                }
            }
            p.finish()?;
        }
        if topic.is_empty() && properties.topic_alias.is_none() {
            return Err(malformed("empty topic name"));
        }
        Ok(Publish {
            dup: b0 & 0x08 != 0,
            qos,
            retain: b0 & 0x01 != 0,
            topic,
            packet_id,
            properties: properties.into(),
            payload: rd.buf.slice(rd.pos..rd.end),
        })
    }

    fn ack(&self, v5: bool, kind: u8, rd: &mut Rd<'_>) -> R<Ack> {
        let mut ack = Ack {
            packet_id: nonzero_id(rd.u16()?)?,
            ..Ack::default()
        };
        if v5 && rd.left() > 0 {
            ack.reason = rd.u8()?;
            let ok = match kind {
                4 | 5 => matches!(
                    ack.reason,
                    0x00 | 0x10 | 0x80 | 0x83 | 0x87 | 0x90 | 0x91 | 0x97 | 0x99
                ),
                _ => matches!(ack.reason, 0x00 | 0x92),
            };
            if !ok {
                return Err(protocol("reason code not allowed in this packet"));
            }
            if rd.left() > 0 {
                let mut p = Props::read(rd, false)?;
                while let Some((id, v)) = p.next()? {
                    match (id, v) {
                        (0x1f, Val::Str(s)) => ack.reason_string = Some(s.into()),
                        (0x26, Val::Pair(k, v)) => ack.user_properties.push((k.into(), v.into())),
                        _ => p.not_allowed(),
                    }
                }
                p.finish()?;
            }
        }
        rd.done()?;
        Ok(ack)
    }

    fn subscribe(&self, v5: bool, rd: &mut Rd<'_>) -> R<Subscribe> {
        // Mosquitto reports a zero packet identifier here as malformed, elsewhere as a protocol error.
        let mut s = Subscribe {
            packet_id: nonzero_id(rd.u16()?).map_err(|_| malformed("packet identifier 0"))?,
            ..Subscribe::default()
        };
        if v5 {
            let mut p = Props::read(rd, false)?.misuse_malformed();
            while let Some((id, v)) = p.next()? {
                match (id, v) {
                    (0x0b, Val::Var(x)) => s.subscription_identifier = Some(x),
                    (0x26, Val::Pair(k, v)) => s.user_properties.push((k.into(), v.into())),
                    _ => p.not_allowed(),
                }
            }
            p.finish()?;
        }
        while rd.left() > 0 {
            let filter = rd.str()?;
            let opts = rd.u8()?;
            let reserved = if v5 { 0xc0 } else { 0xfc };
            if opts & reserved != 0 {
                return Err(malformed("reserved subscription option bits"));
            }
            let qos = qos_from(opts & 0x03).ok_or(malformed("subscription with QoS 3"))?;
            let retain_handling = (opts >> 4) & 0x03;
            if retain_handling == 3 {
                return Err(malformed("Retain Handling 3"));
            }
            let shared = check_filter(filter)?;
            let no_local = opts & 0x04 != 0;
            if shared && no_local {
                return Err(protocol("No Local on a shared subscription"));
            }
            s.subscriptions.push(Subscription {
                filter: filter.to_owned(),
                qos,
                no_local,
                retain_as_published: opts & 0x08 != 0,
                retain_handling,
            });
        }
        if s.subscriptions.is_empty() {
            return Err(malformed("SUBSCRIBE without topic filters"));
        }
        Ok(s)
    }

    fn unsubscribe(&self, v5: bool, rd: &mut Rd<'_>) -> R<Unsubscribe> {
        let mut u = Unsubscribe {
            packet_id: nonzero_id(rd.u16()?).map_err(|_| malformed("packet identifier 0"))?,
            ..Unsubscribe::default()
        };
        if v5 {
            let mut p = Props::read(rd, false)?.misuse_malformed();
            while let Some((id, v)) = p.next()? {
                match (id, v) {
                    (0x26, Val::Pair(k, v)) => u.user_properties.push((k.into(), v.into())),
                    _ => p.not_allowed(),
                }
            }
            p.finish()?;
        }
        while rd.left() > 0 {
            let filter = rd.str()?;
            check_filter(filter)?;
            u.filters.push(filter.to_owned());
        }
        if u.filters.is_empty() {
            return Err(malformed("UNSUBSCRIBE without topic filters"));
        }
        Ok(u)
    }

    fn suback(&self, v5: bool, unsuback: bool, rd: &mut Rd<'_>) -> R<SubAck> {
        let mut s = SubAck {
            packet_id: nonzero_id(rd.u16()?)?,
            ..SubAck::default()
        };
        if v5 {
            let mut p = Props::read(rd, false)?;
            while let Some((id, v)) = p.next()? {
                match (id, v) {
                    (0x1f, Val::Str(x)) => s.reason_string = Some(x.into()),
                    (0x26, Val::Pair(k, v)) => s.user_properties.push((k.into(), v.into())),
                    _ => p.not_allowed(),
                }
            }
            p.finish()?;
        } else if unsuback {
            rd.done()?;
            return Ok(s);
        }
        s.codes = rd.take(rd.left())?.to_vec();
        if s.codes.is_empty() {
            return Err(malformed("acknowledgement without reason codes"));
        }
        Ok(s)
    }

    fn disconnect(&self, v5: bool, rd: &mut Rd<'_>) -> R<Disconnect> {
        let mut d = Disconnect::default();
        if v5 && rd.left() > 0 {
            d.reason = rd.u8()?;
            if rd.left() > 0 {
                let mut p = Props::read(rd, false)?;
                while let Some((id, v)) = p.next()? {
                    match (id, v) {
                        (0x11, Val::Four(x)) => d.session_expiry = Some(x),
                        (0x1f, Val::Str(s)) => d.reason_string = Some(s.into()),
                        (0x26, Val::Pair(k, v)) => d.user_properties.push((k.into(), v.into())),
                        (0x1c, Val::Str(s)) => d.server_reference = Some(s.into()),
                        _ => p.not_allowed(),
                    }
                }
                p.finish()?;
            }
        }
        rd.done()?;
        if !self.from_server {
            if self.expiry_zero && d.session_expiry.is_some_and(|e| e != 0) {
                return Err(protocol(
                    "DISCONNECT sets a Session Expiry Interval after 0",
                ));
            }
            if !matches!(
                d.reason,
                0x00 | 0x04 | 0x80..=0x83 | 0x90 | 0x93..=0x99
            ) {
                return Err(Fail::Close(
                    "reason code not allowed in a client DISCONNECT",
                ));
            }
        }
        Ok(d)
    }

    fn auth(&self, rd: &mut Rd<'_>) -> R<Auth> {
        let mut a = Auth::default();
        if rd.left() == 0 {
            return Ok(a);
        }
        a.reason = rd.u8()?;
        if !matches!(a.reason, 0x00 | 0x18 | 0x19) {
            return Err(protocol("reason code not allowed in AUTH"));
        }
        let mut p = Props::read(rd, false)?;
        while let Some((id, v)) = p.next()? {
            match (id, v) {
                (0x15, Val::Str(s)) => a.authentication_method = Some(s.into()),
                (0x16, Val::Bin(b)) => a.authentication_data = Some(b),
                (0x1f, Val::Str(s)) => a.reason_string = Some(s.into()),
                (0x26, Val::Pair(k, v)) => a.user_properties.push((k.into(), v.into())),
                _ => p.not_allowed(),
            }
        }
        p.finish()?;
        rd.done()?;
        Ok(a)
    }
}

fn qos_from(q: u8) -> Option<QoS> {
    match q {
        0 => Some(QoS::AtMostOnce),
        1 => Some(QoS::AtLeastOnce),
        2 => Some(QoS::ExactlyOnce),
        _ => None,
    }
}

fn nonzero_id(id: u16) -> R<u16> {
    if id == 0 {
        Err(protocol("packet identifier 0"))
    } else {
        Ok(id)
    }
}

fn has_wildcard(s: &str) -> bool {
    s.bytes().any(|b| b == b'+' || b == b'#')
}

/// Validates a topic filter; tells whether it is a shared subscription (`$share/group/filter`).
fn check_filter(f: &str) -> R<bool> {
    if f.is_empty() {
        return Err(malformed("empty topic filter"));
    }
    let (filter, shared) = match f.strip_prefix("$share/") {
        Some(rest) => {
            let Some((group, filter)) = rest.split_once('/') else {
                return Err(protocol("shared subscription without a topic filter"));
            };
            if group.is_empty() || has_wildcard(group) {
                return Err(protocol("invalid shared subscription group name"));
            }
            if filter.is_empty() {
                return Err(protocol("shared subscription without a topic filter"));
            }
            (filter, true)
        }
        None => (f, false),
    };
    let b = filter.as_bytes();
    for (i, &c) in b.iter().enumerate() {
        let after_sep = i == 0 || b[i - 1] == b'/';
        let ok = match c {
            b'+' => after_sep && (i + 1 == b.len() || b[i + 1] == b'/'),
            b'#' => after_sep && i + 1 == b.len(),
            _ => true,
        };
        if !ok {
            return Err(malformed("misplaced wildcard in a topic filter"));
        }
    }
    Ok(shared)
}

/// Validates an MQTT string: well-formed UTF-8 without U+0000, control characters or non-characters.
fn utf8(b: &[u8]) -> R<&str> {
    let s = std::str::from_utf8(b).map_err(|_| malformed("invalid UTF-8"))?;
    allowed(s)?;
    Ok(s)
}

/// Refuses the characters MQTT forbids in a string: U+0000, control characters and
/// non-characters.
fn allowed(s: &str) -> R<()> {
    let bad = if s.is_ascii() {
        s.bytes().any(|c| c < 0x20 || c == 0x7f)
    } else {
        s.chars().any(|c| {
            let u = u32::from(c);
            u < 0x20
                || (0x7f..=0x9f).contains(&u)
                || (0xfdd0..=0xfdef).contains(&u)
                || u & 0xfffe == 0xfffe
        })
    };
    if bad {
        Err(malformed("disallowed character in a string"))
    } else {
        Ok(())
    }
}

/// A cursor over one frame, bounded by `end`.
struct Rd<'a> {
    buf: &'a Bytes,
    pos: usize,
    end: usize,
}

impl<'a> Rd<'a> {
    fn left(&self) -> usize {
        self.end - self.pos
    }

    fn take(&mut self, n: usize) -> R<&'a [u8]> {
        if n > self.left() {
            return Err(malformed("field runs past the end of the packet"));
        }
        let buf: &'a Bytes = self.buf;
        let s = &buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> R<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> R<u16> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> R<u32> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn vbi(&mut self) -> R<u32> {
        let mut v = 0u32;
        for i in 0..4 {
            let b = self.u8()?;
            v |= u32::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(malformed("variable byte integer longer than 4 bytes"))
    }

    fn bin(&mut self) -> R<Bytes> {
        let n = usize::from(self.u16()?);
        if n > self.left() {
            return Err(malformed("field runs past the end of the packet"));
        }
        let b = self.buf.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(b)
    }

    fn str(&mut self) -> R<&'a str> {
        let n = usize::from(self.u16()?);
        utf8(self.take(n)?)
    }

    /// A string as a slice of the packet: no copy, and its UTF-8 checked once.
    fn text(&mut self) -> R<ByteString> {
        let n = usize::from(self.u16()?);
        let raw = self.buf.slice_ref(self.take(n)?);
        let s = ByteString::try_from(raw).map_err(|_| malformed("invalid UTF-8"))?;
        allowed(&s)?;
        Ok(s)
    }

    fn done(&self) -> R<()> {
        if self.pos == self.end {
            Ok(())
        } else {
            Err(malformed("bytes left over at the end of the packet"))
        }
    }
}

/// One property value, typed by its identifier.
enum Val<'a> {
    Byte(u8),
    Two(u16),
    Four(u32),
    Var(u32),
    Str(&'a str),
    Bin(Bytes),
    Pair(&'a str, &'a str),
}

/// A property block being read: malformations fail at once, while protocol errors (a property
/// not allowed here, a duplicate, a value out of range) wait until the whole block has been read.
struct Props<'a> {
    rd: Rd<'a>,
    seen: u64,
    many_sub_ids: bool,
    /// The reason code for a property not allowed here or out of range (Mosquitto reports
    /// these as malformed in SUBSCRIBE and UNSUBSCRIBE, as a protocol error elsewhere).
    misuse: u8,
    deferred: Option<Fail>,
}

impl<'a> Props<'a> {
    fn read(outer: &mut Rd<'a>, many_sub_ids: bool) -> R<Self> {
        let len = outer.vbi()? as usize;
        if len > outer.left() {
            return Err(malformed("properties run past the end of the packet"));
        }
        let rd = Rd {
            buf: outer.buf,
            pos: outer.pos,
            end: outer.pos + len,
        };
        outer.pos += len;
        Ok(Props {
            rd,
            seen: 0,
            many_sub_ids,
            misuse: PROTOCOL,
            deferred: None,
        })
    }

    /// Reports misused properties as malformed rather than as a protocol error.
    fn misuse_malformed(mut self) -> Self {
        self.misuse = MALFORMED;
        self
    }

    fn defer(&mut self, f: Fail) {
        if self.deferred.is_none() {
            self.deferred = Some(f);
        }
    }

    fn not_allowed(&mut self) {
        self.defer(Fail::Code(
            self.misuse,
            "property not allowed in this packet",
        ));
    }

    fn next(&mut self) -> R<Option<(u8, Val<'a>)>> {
        if self.rd.left() == 0 {
            return Ok(None);
        }
        let id = self.rd.vbi()?;
        let val = match id {
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2a => Val::Byte(self.rd.u8()?),
            0x13 | 0x21 | 0x22 | 0x23 => Val::Two(self.rd.u16()?),
            0x02 | 0x11 | 0x18 | 0x27 => Val::Four(self.rd.u32()?),
            0x0b => match self.rd.vbi()? {
                0 => return Err(malformed("Subscription Identifier 0")),
                x => Val::Var(x),
            },
            0x03 | 0x08 | 0x12 | 0x15 | 0x1a | 0x1c | 0x1f => Val::Str(self.rd.str()?),
            0x09 | 0x16 => Val::Bin(self.rd.bin()?),
            0x26 => Val::Pair(self.rd.str()?, self.rd.str()?),
            _ => return Err(malformed("unknown property identifier")),
        };
        let bit = 1u64 << id;
        if id != 0x26 && !(id == 0x0b && self.many_sub_ids) && self.seen & bit != 0 {
            self.defer(protocol("duplicate property"));
        }
        self.seen |= bit;
        let out_of_range = match (id, &val) {
            (_, Val::Byte(x)) => *x > 1,
            (0x21 | 0x23, Val::Two(0)) | (0x27, Val::Four(0)) => true,
            (0x08, Val::Str(s)) => s.is_empty() || has_wildcard(s),
            _ => false,
        };
        if out_of_range {
            self.defer(Fail::Code(self.misuse, "property value out of range"));
        }
        Ok(Some((id as u8, val)))
    }

    fn finish(self) -> R<()> {
        match self.deferred {
            Some(f) => Err(f),
            None => Ok(()),
        }
    }
}
