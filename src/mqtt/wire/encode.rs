//! Writing packets: `encode` appends a packet as a given version writes it, sizing the output
//! once with `encoded_len` so that it reserves a single time.

use bytes::{BufMut, Bytes, BytesMut};

use super::packet::{Packet, PublishProperties, QoS, UserProperty, Version, Will};

/// Appends the packet as `version` writes it (properties, v5-only fields and UNSUBACK codes are left out before version 5).
pub(crate) fn encode(packet: &Packet, version: Version, out: &mut BytesMut) {
    let v5 = version == Version::V5;
    let remaining = body_len(packet, version);
    out.reserve(1 + vbi_len(remaining) + remaining);
    out.put_u8(first_byte(packet));
    put_vbi(out, remaining);
    match packet {
        Packet::Connect(c) => {
            if version == Version::V31 {
                put_bytes(out, b"MQIsdp");
                out.put_u8(3);
            } else {
                put_bytes(out, b"MQTT");
                out.put_u8(if v5 { 5 } else { 4 });
            }
            let mut flags = 0u8;
            if c.clean_start {
                flags |= 0x02;
            }
            if let Some(w) = &c.will {
                flags |= 0x04 | ((w.qos as u8) << 3);
                if w.retain {
                    flags |= 0x20;
                }
            }
            if c.password.is_some() {
                flags |= 0x40;
            }
            if c.username.is_some() {
                flags |= 0x80;
            }
            out.put_u8(flags);
            out.put_u16(c.keep_alive);
            if v5 {
                put_vbi(out, connect_props_len(c));
                put_u32_prop(out, 0x11, c.session_expiry);
                put_u16_prop(out, 0x21, c.receive_maximum);
                put_u32_prop(out, 0x27, c.maximum_packet_size);
                put_u16_prop(out, 0x22, c.topic_alias_maximum);
                put_u8_prop(out, 0x19, c.request_response_information);
                put_u8_prop(out, 0x17, c.request_problem_information);
                put_users(out, &c.user_properties);
                put_str_prop(out, 0x15, c.authentication_method.as_deref());
                put_bin_prop(out, 0x16, c.authentication_data.as_ref());
            }
            put_bytes(out, c.client_id.as_bytes());
            if let Some(w) = &c.will {
                if v5 {
                    put_vbi(out, will_props_len(w));
                    put_u32_prop(out, 0x18, w.delay_interval);
                    put_publish_props(out, &w.properties);
                }
                put_bytes(out, w.topic.as_bytes());
                put_bytes(out, &w.payload);
            }
            if let Some(u) = &c.username {
                put_bytes(out, u.as_bytes());
            }
            if let Some(p) = &c.password {
                put_bytes(out, p);
            }
        }
        Packet::ConnAck(c) => {
            out.put_u8(u8::from(c.session_present));
            out.put_u8(c.code);
            if v5 {
                put_vbi(out, connack_props_len(c));
                put_u32_prop(out, 0x11, c.session_expiry);
                put_u16_prop(out, 0x21, c.receive_maximum);
                put_u8_prop(out, 0x24, c.maximum_qos);
                put_u8_prop(out, 0x25, c.retain_available);
                put_u32_prop(out, 0x27, c.maximum_packet_size);
                put_str_prop(out, 0x12, c.assigned_client_identifier.as_deref());
                put_u16_prop(out, 0x22, c.topic_alias_maximum);
                put_str_prop(out, 0x1f, c.reason_string.as_deref());
                put_users(out, &c.user_properties);
                put_u8_prop(out, 0x28, c.wildcard_subscription_available);
                put_u8_prop(out, 0x29, c.subscription_identifiers_available);
                put_u8_prop(out, 0x2a, c.shared_subscription_available);
                put_u16_prop(out, 0x13, c.server_keep_alive);
                put_str_prop(out, 0x1a, c.response_information.as_deref());
                put_str_prop(out, 0x1c, c.server_reference.as_deref());
                put_str_prop(out, 0x15, c.authentication_method.as_deref());
                put_bin_prop(out, 0x16, c.authentication_data.as_ref());
            }
        }
        Packet::Publish(p) => {
            put_bytes(out, p.topic.as_bytes());
            if p.qos != QoS::AtMostOnce {
                out.put_u16(p.packet_id);
            }
            if v5 {
                put_vbi(out, publish_props_len(&p.properties));
                put_publish_props(out, &p.properties);
            }
            out.put_slice(&p.payload);
        }
        Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
            out.put_u16(a.packet_id);
            if v5 {
                let props = ack_props_len(a.reason_string.as_deref(), &a.user_properties);
                if props > 0 || a.reason != 0 {
                    out.put_u8(a.reason);
                }
                if props > 0 {
                    put_vbi(out, props);
                    put_str_prop(out, 0x1f, a.reason_string.as_deref());
                    put_users(out, &a.user_properties);
                }
            }
        }
        Packet::Subscribe(s) => {
            out.put_u16(s.packet_id);
            if v5 {
                put_vbi(out, subscribe_props_len(s));
                if let Some(id) = s.subscription_identifier {
                    out.put_u8(0x0b);
                    put_vbi(out, id as usize);
                }
                put_users(out, &s.user_properties);
            }
            for sub in &s.subscriptions {
                put_bytes(out, sub.filter.as_bytes());
                let mut opts = sub.qos as u8;
                if v5 {
                    if sub.no_local {
                        opts |= 0x04;
                    }
                    if sub.retain_as_published {
                        opts |= 0x08;
                    }
                    opts |= (sub.retain_handling & 0x03) << 4;
                }
                out.put_u8(opts);
            }
        }
        Packet::SubAck(s) | Packet::UnsubAck(s) => {
            out.put_u16(s.packet_id);
            if v5 {
                put_vbi(
                    out,
                    ack_props_len(s.reason_string.as_deref(), &s.user_properties),
                );
                put_str_prop(out, 0x1f, s.reason_string.as_deref());
                put_users(out, &s.user_properties);
            }
            if v5 || matches!(packet, Packet::SubAck(_)) {
                out.put_slice(&s.codes);
            }
        }
        Packet::Unsubscribe(u) => {
            out.put_u16(u.packet_id);
            if v5 {
                put_vbi(out, users_len(&u.user_properties));
                put_users(out, &u.user_properties);
            }
            for f in &u.filters {
                put_bytes(out, f.as_bytes());
            }
        }
        Packet::PingReq | Packet::PingResp => {}
        Packet::Disconnect(d) => {
            if v5 {
                let props = disconnect_props_len(d);
                if props > 0 || d.reason != 0 {
                    out.put_u8(d.reason);
                }
                if props > 0 {
                    put_vbi(out, props);
                    put_u32_prop(out, 0x11, d.session_expiry);
                    put_str_prop(out, 0x1f, d.reason_string.as_deref());
                    put_users(out, &d.user_properties);
                    put_str_prop(out, 0x1c, d.server_reference.as_deref());
                }
            }
        }
        Packet::Auth(a) => {
            let props = auth_props_len(a);
            if props > 0 || a.reason != 0 {
                out.put_u8(a.reason);
                put_vbi(out, props);
                put_str_prop(out, 0x15, a.authentication_method.as_deref());
                put_bin_prop(out, 0x16, a.authentication_data.as_ref());
                put_str_prop(out, 0x1f, a.reason_string.as_deref());
                put_users(out, &a.user_properties);
            }
        }
    }
}

/// The number of bytes `encode` writes for this packet.
pub(crate) fn encoded_len(packet: &Packet, version: Version) -> usize {
    let remaining = body_len(packet, version);
    1 + vbi_len(remaining) + remaining
}

fn first_byte(packet: &Packet) -> u8 {
    match packet {
        Packet::Connect(_) => 0x10,
        Packet::ConnAck(_) => 0x20,
        Packet::Publish(p) => {
            0x30 | (u8::from(p.dup) << 3) | ((p.qos as u8) << 1) | u8::from(p.retain)
        }
        Packet::PubAck(_) => 0x40,
        Packet::PubRec(_) => 0x50,
        Packet::PubRel(_) => 0x62,
        Packet::PubComp(_) => 0x70,
        Packet::Subscribe(_) => 0x82,
        Packet::SubAck(_) => 0x90,
        Packet::Unsubscribe(_) => 0xa2,
        Packet::UnsubAck(_) => 0xb0,
        Packet::PingReq => 0xc0,
        Packet::PingResp => 0xd0,
        Packet::Disconnect(_) => 0xe0,
        Packet::Auth(_) => 0xf0,
    }
}

/// The remaining length of the packet (everything after the fixed header).
fn body_len(packet: &Packet, version: Version) -> usize {
    let v5 = version == Version::V5;
    match packet {
        Packet::Connect(c) => {
            let name = if version == Version::V31 { 8 } else { 6 };
            let mut n = name + 1 + 1 + 2 + 2 + c.client_id.len();
            if v5 {
                n += with_len(connect_props_len(c));
            }
            if let Some(w) = &c.will {
                if v5 {
                    n += with_len(will_props_len(w));
                }
                n += 4 + w.topic.len() + w.payload.len();
            }
            n += c.username.as_ref().map_or(0, |u| 2 + u.len());
            n += c.password.as_ref().map_or(0, |p| 2 + p.len());
            n
        }
        Packet::ConnAck(c) => {
            2 + if v5 {
                with_len(connack_props_len(c))
            } else {
                0
            }
        }
        Packet::Publish(p) => {
            let mut n = 2 + p.topic.len() + p.payload.len();
            if p.qos != QoS::AtMostOnce {
                n += 2;
            }
            if v5 {
                n += with_len(publish_props_len(&p.properties));
            }
            n
        }
        Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
            let props = ack_props_len(a.reason_string.as_deref(), &a.user_properties);
            if !v5 || (props == 0 && a.reason == 0) {
                2
            } else if props == 0 {
                3
            } else {
                3 + with_len(props)
            }
        }
        Packet::Subscribe(s) => {
            let mut n = 2;
            if v5 {
                n += with_len(subscribe_props_len(s));
            }
            n + s
                .subscriptions
                .iter()
                .map(|f| 3 + f.filter.len())
                .sum::<usize>()
        }
        Packet::SubAck(s) | Packet::UnsubAck(s) => {
            if v5 {
                2 + with_len(ack_props_len(
                    s.reason_string.as_deref(),
                    &s.user_properties,
                )) + s.codes.len()
            } else if matches!(packet, Packet::SubAck(_)) {
                2 + s.codes.len()
            } else {
                2
            }
        }
        Packet::Unsubscribe(u) => {
            let mut n = 2;
            if v5 {
                n += with_len(users_len(&u.user_properties));
            }
            n + u.filters.iter().map(|f| 2 + f.len()).sum::<usize>()
        }
        Packet::PingReq | Packet::PingResp => 0,
        Packet::Disconnect(d) => {
            if !v5 {
                return 0;
            }
            let props = disconnect_props_len(d);
            if props > 0 {
                1 + with_len(props)
            } else if d.reason != 0 {
                1
            } else {
                0
            }
        }
        Packet::Auth(a) => {
            let props = auth_props_len(a);
            if props == 0 && a.reason == 0 {
                0
            } else {
                1 + with_len(props)
            }
        }
    }
}

fn vbi_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// A property block's size including its length prefix.
fn with_len(n: usize) -> usize {
    vbi_len(n) + n
}

fn put_vbi(out: &mut BytesMut, mut n: usize) {
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.put_u8(b);
            return;
        }
        out.put_u8(b | 0x80);
    }
}

fn put_bytes(out: &mut BytesMut, b: &[u8]) {
    out.put_u16(b.len() as u16);
    out.put_slice(b);
}

fn put_u8_prop(out: &mut BytesMut, id: u8, v: Option<u8>) {
    if let Some(v) = v {
        out.put_u8(id);
        out.put_u8(v);
    }
}

fn put_u16_prop(out: &mut BytesMut, id: u8, v: Option<u16>) {
    if let Some(v) = v {
        out.put_u8(id);
        out.put_u16(v);
    }
}

fn put_u32_prop(out: &mut BytesMut, id: u8, v: Option<u32>) {
    if let Some(v) = v {
        out.put_u8(id);
        out.put_u32(v);
    }
}

fn put_str_prop(out: &mut BytesMut, id: u8, v: Option<&str>) {
    if let Some(v) = v {
        out.put_u8(id);
        put_bytes(out, v.as_bytes());
    }
}

fn put_bin_prop(out: &mut BytesMut, id: u8, v: Option<&Bytes>) {
    if let Some(v) = v {
        out.put_u8(id);
        put_bytes(out, v);
    }
}

fn put_users(out: &mut BytesMut, users: &[UserProperty]) {
    for (k, v) in users {
        out.put_u8(0x26);
        put_bytes(out, k.as_bytes());
        put_bytes(out, v.as_bytes());
    }
}

fn put_publish_props(out: &mut BytesMut, p: &PublishProperties) {
    put_u8_prop(out, 0x01, p.payload_format_indicator);
    put_u32_prop(out, 0x02, p.message_expiry_interval);
    put_u16_prop(out, 0x23, p.topic_alias);
    put_str_prop(out, 0x08, p.response_topic.as_deref());
    put_bin_prop(out, 0x09, p.correlation_data.as_ref());
    put_users(out, &p.user_properties);
    for &id in &p.subscription_identifiers {
        out.put_u8(0x0b);
        put_vbi(out, id as usize);
    }
    put_str_prop(out, 0x03, p.content_type.as_deref());
}

fn opt<T>(v: &Option<T>, n: usize) -> usize {
    if v.is_some() { 1 + n } else { 0 }
}

fn str_len(v: Option<&str>) -> usize {
    v.map_or(0, |s| 3 + s.len())
}

fn bin_len(v: Option<&Bytes>) -> usize {
    v.map_or(0, |b| 3 + b.len())
}

fn users_len(users: &[UserProperty]) -> usize {
    users.iter().map(|(k, v)| 5 + k.len() + v.len()).sum()
}

fn ack_props_len(reason: Option<&str>, users: &[UserProperty]) -> usize {
    str_len(reason) + users_len(users)
}

fn publish_props_len(p: &PublishProperties) -> usize {
    opt(&p.payload_format_indicator, 1)
        + opt(&p.message_expiry_interval, 4)
        + opt(&p.topic_alias, 2)
        + str_len(p.response_topic.as_deref())
        + bin_len(p.correlation_data.as_ref())
        + users_len(&p.user_properties)
        + p.subscription_identifiers
            .iter()
            .map(|&id| 1 + vbi_len(id as usize))
            .sum::<usize>()
        + str_len(p.content_type.as_deref())
}

fn will_props_len(w: &Will) -> usize {
    opt(&w.delay_interval, 4) + publish_props_len(&w.properties)
}

fn connect_props_len(c: &super::packet::Connect) -> usize {
    opt(&c.session_expiry, 4)
        + opt(&c.receive_maximum, 2)
        + opt(&c.maximum_packet_size, 4)
        + opt(&c.topic_alias_maximum, 2)
        + opt(&c.request_response_information, 1)
        + opt(&c.request_problem_information, 1)
        + users_len(&c.user_properties)
        + str_len(c.authentication_method.as_deref())
        + bin_len(c.authentication_data.as_ref())
}

fn connack_props_len(c: &super::packet::ConnAck) -> usize {
    opt(&c.session_expiry, 4)
        + opt(&c.receive_maximum, 2)
        + opt(&c.maximum_qos, 1)
        + opt(&c.retain_available, 1)
        + opt(&c.maximum_packet_size, 4)
        + str_len(c.assigned_client_identifier.as_deref())
        + opt(&c.topic_alias_maximum, 2)
        + str_len(c.reason_string.as_deref())
        + users_len(&c.user_properties)
        + opt(&c.wildcard_subscription_available, 1)
        + opt(&c.subscription_identifiers_available, 1)
        + opt(&c.shared_subscription_available, 1)
        + opt(&c.server_keep_alive, 2)
        + str_len(c.response_information.as_deref())
        + str_len(c.server_reference.as_deref())
        + str_len(c.authentication_method.as_deref())
        + bin_len(c.authentication_data.as_ref())
}

fn subscribe_props_len(s: &super::packet::Subscribe) -> usize {
    s.subscription_identifier
        .map_or(0, |id| 1 + vbi_len(id as usize))
        + users_len(&s.user_properties)
}

fn disconnect_props_len(d: &super::packet::Disconnect) -> usize {
    opt(&d.session_expiry, 4)
        + str_len(d.reason_string.as_deref())
        + users_len(&d.user_properties)
        + str_len(d.server_reference.as_deref())
}

fn auth_props_len(a: &super::packet::Auth) -> usize {
    str_len(a.authentication_method.as_deref())
        + bin_len(a.authentication_data.as_ref())
        + str_len(a.reason_string.as_deref())
        + users_len(&a.user_properties)
}
