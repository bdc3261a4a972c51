//! The CoAP framing the codec leaves to us: the checks RFC 7252 §3 asks for before a datagram is
//! trusted, option values as unsigned integers, and the Block1/Block2 option (RFC 7959 §2.2).

use coap_lite::Packet;

/// What to do with a received datagram.
#[derive(Debug)]
pub(crate) enum Inbound {
    /// A well-formed message.
    Message(Packet),
    /// A malformed confirmable message: answer with a Reset carrying this message id.
    Reject(u16),
    /// Drop silently: too short to answer, another version, or a malformed non-confirmable
    /// message, ACK or RST.
    Ignore,
}

/// Checks the framing of a datagram, then decodes it.
pub(crate) fn decode(buf: &[u8]) -> Inbound {
    if buf.len() < 4 || buf[0] >> 6 != 1 {
        return Inbound::Ignore;
    }
    let confirmable = (buf[0] >> 4) & 0b11 == 0;
    let reject = || {
        if confirmable {
            Inbound::Reject(u16::from_be_bytes([buf[2], buf[3]]))
        } else {
            Inbound::Ignore
        }
    };
    if !well_framed(buf) {
        return reject();
    }
    match Packet::from_bytes(buf) {
        Ok(packet) => Inbound::Message(packet),
        Err(_) => reject(),
    }
}

/// Token length 0–8, every option header and value inside the datagram with no 15 nibble, a
/// payload marker only before a payload, and nothing after the header of an Empty message.
fn well_framed(buf: &[u8]) -> bool {
    let token_len = usize::from(buf[0] & 0x0f);
    if token_len > 8 {
        return false;
    }
    if buf[1] == 0 {
        return buf.len() == 4;
    }
    let mut i = 4 + token_len;
    if i > buf.len() {
        return false;
    }
    let mut number: u32 = 0;
    while i < buf.len() {
        let head = buf[i];
        if head == 0xff {
            return i + 1 < buf.len();
        }
        i += 1;
        let Some(delta) = extended(head >> 4, buf, &mut i) else {
            return false;
        };
        let Some(len) = extended(head & 0x0f, buf, &mut i) else {
            return false;
        };
        number += delta as u32;
        if number > u32::from(u16::MAX) {
            return false;
        }
        i += len;
        if i > buf.len() {
            return false;
        }
    }
    true
}

/// Reads an option delta or length nibble with its extended bytes.
fn extended(nibble: u8, buf: &[u8], i: &mut usize) -> Option<usize> {
    match nibble {
        13 => {
            let v = usize::from(*buf.get(*i)?) + 13;
            *i += 1;
            Some(v)
        }
        14 => {
            let v = usize::from(u16::from_be_bytes([*buf.get(*i)?, *buf.get(*i + 1)?])) + 269;
            *i += 2;
            Some(v)
        }
        15 => None,
        n => Some(usize::from(n)),
    }
}

/// An option value as an unsigned integer (RFC 7252 §3.2), if it has at most `max_len` bytes.
pub(crate) fn read_uint(value: &[u8], max_len: usize) -> Option<u32> {
    (value.len() <= max_len.min(4))
        .then(|| value.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)))
}

/// The shortest encoding of an unsigned integer option value.
pub(crate) fn uint(value: u32) -> Vec<u8> {
    let bytes = value.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    bytes[skip..].to_vec()
}

/// A Block1 or Block2 option value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Block {
    /// Block number, up to 2^20 - 1.
    pub(crate) num: u32,
    /// Whether more blocks follow.
    pub(crate) more: bool,
    /// Size exponent: the block is `16 << szx` bytes.
    pub(crate) szx: u8,
}

impl Block {
    /// Decodes an option value; `None` for more than 3 bytes or the size exponent 7, which is
    /// BERT and only defined for CoAP over TCP.
    pub(crate) fn decode(value: &[u8]) -> Option<Self> {
        let n = read_uint(value, 3)?;
        let szx = (n & 0b111) as u8;
        (szx < 7).then_some(Self {
            num: n >> 4,
            more: n & 0b1000 != 0,
            szx,
        })
    }

    /// The option value.
    pub(crate) fn encode(self) -> Vec<u8> {
        uint((self.num << 4) | (u32::from(self.more) << 3) | u32::from(self.szx))
    }

    /// Block size in bytes.
    pub(crate) fn size(self) -> usize {
        16 << self.szx
    }

    /// Byte offset of the block.
    pub(crate) fn offset(self) -> usize {
        self.num as usize * self.size()
    }
}

/// The size exponent of a block size that is a power of two from 16 to 1024.
pub(crate) fn szx_of(size: usize) -> u8 {
    (size.clamp(16, 1024).trailing_zeros() - 4) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reject_mid(buf: &[u8]) -> Option<u16> {
        match decode(buf) {
            Inbound::Reject(mid) => Some(mid),
            _ => None,
        }
    }

    #[test]
    fn malformed_datagrams_are_rejected_or_ignored() {
        // Too short to carry a message id, and another protocol version.
        assert!(matches!(decode(&[0x40, 0x01, 0x00]), Inbound::Ignore));
        assert!(matches!(decode(&[0x80, 0x01, 0, 1]), Inbound::Ignore));
        // Confirmable with token length 9: Reset with the message id.
        assert_eq!(reject_mid(&[0x49, 0x01, 0x12, 0x34]), Some(0x1234));
        // Token longer than the datagram.
        assert_eq!(reject_mid(&[0x44, 0x01, 0, 7, 1, 2]), Some(7));
        // Option delta 15 that is not the payload marker, and option length 15.
        assert_eq!(reject_mid(&[0x40, 0x01, 0, 8, 0xf1, 0x00]), Some(8));
        assert_eq!(reject_mid(&[0x40, 0x01, 0, 9, 0xbf, 0x00]), Some(9));
        // Payload marker with nothing after it.
        assert_eq!(reject_mid(&[0x40, 0x02, 0, 10, 0xff]), Some(10));
        // Option value running past the end.
        assert_eq!(reject_mid(&[0x40, 0x01, 0, 11, 0xb5, b'a']), Some(11));
        // Empty message with a token.
        assert_eq!(reject_mid(&[0x41, 0x00, 0, 12, 0xaa]), Some(12));
        // The same faults in a non-confirmable message are dropped.
        assert!(matches!(decode(&[0x59, 0x01, 0, 1]), Inbound::Ignore));
        assert!(matches!(decode(&[0x50, 0x02, 0, 1, 0xff]), Inbound::Ignore));
    }

    #[test]
    fn well_formed_messages_decode() {
        // CON GET /a with payload "x".
        let Inbound::Message(p) = decode(&[0x40, 0x01, 0, 1, 0xb1, b'a', 0xff, b'x']) else {
            panic!("expected a message");
        };
        assert_eq!(p.payload, b"x");
        // A ping: empty confirmable message.
        assert!(matches!(decode(&[0x40, 0x00, 0, 2]), Inbound::Message(_)));
    }

    #[test]
    fn block_values_round_trip() {
        let b = Block {
            num: 5,
            more: true,
            szx: 6,
        };
        assert_eq!(Block::decode(&b.encode()), Some(b));
        assert_eq!(b.size(), 1024);
        assert_eq!(b.offset(), 5120);
        assert_eq!(
            Block::decode(&[]),
            Some(Block {
                num: 0,
                more: false,
                szx: 0
            })
        );
        assert_eq!(Block::decode(&[0x07]), None, "BERT is refused over UDP");
        assert_eq!(Block::decode(&[1, 2, 3, 4]), None);
        assert_eq!(szx_of(1024), 6);
        assert_eq!(szx_of(16), 0);
        assert_eq!(uint(0), Vec::<u8>::new());
        assert_eq!(uint(0x0100), vec![1, 0]);
        assert_eq!(read_uint(&[1, 0], 2), Some(256));
        assert_eq!(read_uint(&[1, 0, 0], 2), None);
    }
}
