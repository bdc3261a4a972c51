//! MQTT rules rumqttd's codecs do not enforce, each of which both MQTT versions answer by closing
//! the connection: checked by `GatewayProtocol` on every packet a client sends.

use rumqttd::protocol::Error;

/// MQTT strings may not hold U+0000 (3.1.1 §1.5.3, 5 §1.5.4); rumqttd's codecs let it through.
pub(super) fn check_text(text: &str) -> Result<(), Error> {
    if text.contains('\0') {
        return Err(Error::MalformedPacket);
    }
    Ok(())
}

/// A filter a client may subscribe to (§4.7): wildcards only as whole levels, `#` last, no
/// U+0000; a shared subscription names a group without wildcards, then a filter. rumqttd checks
/// none of this and subscribes to `a/#/b` as given.
pub(super) fn check_filter(filter: &str) -> Result<(), Error> {
    let inner = match filter.strip_prefix("$share/") {
        Some(rest) => match rest.split_once('/') {
            Some((group, inner)) if !group.is_empty() && !group.contains(['+', '#']) => inner,
            _ => return Err(Error::MalformedPacket),
        },
        None => filter,
    };
    check_text(inner)?;
    if !rumqttd::protocol::valid_filter(inner) {
        return Err(Error::MalformedPacket);
    }
    Ok(())
}

/// What rumqttd's codecs let through although both MQTT versions require the connection to be
/// closed, read from the first bytes of the next packet: reserved fixed-header flags (3.1.1
/// §2.2.2, 5 §2.1.3), packets only a server sends, a second CONNECT (§3.1) and the reserved
/// CONNECT flag (§3.1.2.3).
pub(super) fn check_framing(stream: &[u8], connected: bool) -> Result<(), Error> {
    let Some(&byte1) = stream.first() else {
        return Ok(());
    };
    let (kind, flags) = (byte1 >> 4, byte1 & 0x0F);
    let reserved = match kind {
        1 if connected => return Err(Error::InvalidProtocol),
        1 if connect_flags(stream).is_some_and(|f| f & 1 != 0) => {
            return Err(Error::IncorrectPacketFormat);
        }
        // CONNACK, SUBACK, UNSUBACK, PINGRESP.
        2 | 9 | 11 | 13 => return Err(Error::InvalidPacketType(kind)),
        // PUBLISH: DUP, QoS and RETAIN; the codecs refuse QoS 3.
        3 => return Ok(()),
        // PUBREL, SUBSCRIBE, UNSUBSCRIBE.
        6 | 8 | 10 => 0b0010,
        _ => 0,
    };
    if flags != reserved {
        return Err(Error::IncorrectPacketFormat);
    }
    Ok(())
}

/// The connect flags of a CONNECT named `MQTT` at the start of `stream`, once they have arrived.
fn connect_flags(stream: &[u8]) -> Option<u8> {
    let length_bytes = stream.iter().skip(1).take(4).position(|b| b & 0x80 == 0)? + 1;
    let name = 1 + length_bytes;
    if stream.get(name..name + 6)? != b"\0\x04MQTT" {
        return None;
    }
    stream.get(name + 7).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_the_codecs_let_through() {
        let connect = [0x10, 10, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60];
        assert!(check_framing(&connect, false).is_ok());
        assert!(
            check_framing(&connect[..9], false).is_ok(),
            "flags not there yet"
        );
        assert!(check_framing(&connect, true).is_err(), "a second CONNECT");
        let mut reserved = connect;
        reserved[9] |= 1;
        assert!(check_framing(&reserved, false).is_err());
        for ok in [0x30u8, 0x3B, 0x40, 0x62, 0x82, 0xA2, 0xC0, 0xE0] {
            assert!(check_framing(&[ok, 0], true).is_ok(), "{ok:#x}");
        }
        for bad in [0x41u8, 0x60, 0x80, 0xA0, 0xC1, 0xE8, 0x20, 0x90, 0xB0, 0xD0] {
            assert!(check_framing(&[bad, 0], true).is_err(), "{bad:#x}");
        }
        for ok in ["#", "+", "a/+/b", "a//#", "$share/g/a/#", "/"] {
            assert!(check_filter(ok).is_ok(), "{ok:?}");
        }
        for bad in [
            "",
            "a/#/b",
            "a+",
            "a#",
            "+a/b",
            "a/\0",
            "$share/g",
            "$share//a",
            "$share/+/a",
        ] {
            assert!(check_filter(bad).is_err(), "{bad:?}");
        }
        assert!(check_text("a\0b").is_err());
    }
}
