//! The DTLS 1.2 records read before any state exists for a peer: a ClientHello's fields and the
//! HelloVerifyRequest that answers it statelessly.

/// Record header: type, version, epoch, sequence number, length.
const RECORD_HEADER: usize = 13;
/// Handshake header: type, length, message_seq, fragment_offset, fragment_length.
const HANDSHAKE_HEADER: usize = 12;
const CONTENT_HANDSHAKE: u8 = 22;
const CLIENT_HELLO: u8 = 1;
const HELLO_VERIFY_REQUEST: u8 = 3;
/// RFC 6347 4.2.1: a HelloVerifyRequest says DTLS 1.0, whatever version follows.
const DTLS_1_0: [u8; 2] = [0xfe, 0xff];

/// An unfragmented ClientHello in epoch 0, the first record of a datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello<'a> {
    /// The record's sequence number.
    pub record_seq: u64,
    /// The handshake message's sequence number.
    pub message_seq: u16,
    /// The client's random.
    pub random: &'a [u8],
    /// The cookie, empty in a first ClientHello.
    pub cookie: &'a [u8],
    /// Where the cookie's length byte is in the datagram.
    cookie_at: usize,
    /// Where the record ends in the datagram.
    record_end: usize,
}

fn be(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0, |n, b| (n << 8) | u64::from(*b))
}

/// Whether the datagram starts with an epoch-0 handshake record: all a peer without a session
/// may send.
pub fn is_epoch0_handshake(datagram: &[u8]) -> bool {
    datagram.len() >= RECORD_HEADER
        && datagram[0] == CONTENT_HANDSHAKE
        && datagram[3..5] == [0, 0]
        && datagram.get(RECORD_HEADER) == Some(&CLIENT_HELLO)
}

/// The ClientHello the datagram starts with, if it holds a whole one; `None` for anything else
/// or anything malformed.
pub fn parse(datagram: &[u8]) -> Option<ClientHello<'_>> {
    if !is_epoch0_handshake(datagram) || datagram[1] != 0xfe {
        return None;
    }
    let record_len = usize::try_from(be(&datagram[11..13])).ok()?;
    let record_end = RECORD_HEADER.checked_add(record_len)?;
    let record = datagram.get(RECORD_HEADER..record_end)?;
    let handshake = record.get(..HANDSHAKE_HEADER)?;
    let length = usize::try_from(be(&handshake[1..4])).ok()?;
    let (offset, fragment) = (be(&handshake[6..9]), be(&handshake[9..12]));
    if offset != 0 || fragment != length as u64 || HANDSHAKE_HEADER + length > record.len() {
        return None;
    }
    let body = &record[HANDSHAKE_HEADER..HANDSHAKE_HEADER + length];
    let random = body.get(2..34)?;
    let session_len = usize::from(*body.get(34)?);
    let cookie_len_at = 35 + session_len;
    let cookie_len = usize::from(*body.get(cookie_len_at)?);
    let cookie = body.get(cookie_len_at + 1..cookie_len_at + 1 + cookie_len)?;
    // The rest must at least hold the cipher suites' and compression methods' lengths.
    body.get(cookie_len_at + 1 + cookie_len + 3..)?;
    Some(ClientHello {
        record_seq: be(&datagram[5..11]),
        message_seq: u16::try_from(be(&handshake[4..6])).ok()?,
        random,
        cookie,
        cookie_at: RECORD_HEADER + HANDSHAKE_HEADER + cookie_len_at,
        record_end,
    })
}

/// The HelloVerifyRequest answering `hello` with `cookie`: the record and message sequence
/// numbers of the ClientHello, as RFC 6347 4.2.1 asks, so nothing needs remembering.
pub fn verify_request(hello: &ClientHello<'_>, cookie: &[u8]) -> Vec<u8> {
    let body_len = 3 + cookie.len();
    let mut out = Vec::with_capacity(RECORD_HEADER + HANDSHAKE_HEADER + body_len);
    out.push(CONTENT_HANDSHAKE);
    out.extend_from_slice(&DTLS_1_0);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&hello.record_seq.to_be_bytes()[2..]);
    out.extend_from_slice(&((HANDSHAKE_HEADER + body_len) as u16).to_be_bytes());
    out.push(HELLO_VERIFY_REQUEST);
    out.extend_from_slice(&(body_len as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&hello.message_seq.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0]);
    out.extend_from_slice(&(body_len as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&DTLS_1_0);
    // A cookie is at most 255 bytes; ours are 16.
    out.push(cookie.len().min(255) as u8);
    out.extend_from_slice(&cookie[..cookie.len().min(255)]);
    out
}

/// The ClientHello a client sends after a HelloVerifyRequest: `hello` with `cookie`, its record
/// and message one later. What a client does; the fuzz target's client uses it.
pub fn with_cookie(datagram: &[u8], hello: &ClientHello<'_>, cookie: &[u8]) -> Option<Vec<u8>> {
    let record_seq = hello.record_seq.checked_add(1)?;
    let message_seq = hello.message_seq.checked_add(1)?;
    let (old, new) = (hello.cookie.len() as u64, cookie.len().min(255) as u64);
    let mut out = Vec::with_capacity(hello.record_end + cookie.len());
    out.extend_from_slice(datagram.get(..hello.cookie_at)?);
    out.push(new as u8);
    out.extend_from_slice(&cookie[..new as usize]);
    out.extend_from_slice(datagram.get(hello.cookie_at + 1 + old as usize..hello.record_end)?);
    out[5..11].copy_from_slice(&record_seq.to_be_bytes()[2..]);
    let record_len = u16::try_from(be(&out[11..13]) + new - old).ok()?;
    out[11..13].copy_from_slice(&record_len.to_be_bytes());
    let length = (be(&out[14..17]) + new - old) as u32;
    out[14..17].copy_from_slice(&length.to_be_bytes()[1..]);
    out[17..19].copy_from_slice(&message_seq.to_be_bytes());
    out[22..25].copy_from_slice(&length.to_be_bytes()[1..]);
    Some(out)
}

/// The cookie of a HelloVerifyRequest.
pub fn verify_request_cookie(datagram: &[u8]) -> Option<&[u8]> {
    if datagram.first() != Some(&CONTENT_HANDSHAKE)
        || datagram.get(RECORD_HEADER) != Some(&HELLO_VERIFY_REQUEST)
    {
        return None;
    }
    let at = RECORD_HEADER + HANDSHAKE_HEADER + 2;
    let len = usize::from(*datagram.get(at)?);
    datagram.get(at + 1..at + 1 + len)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello with the given cookie: one suite, null compression, no extensions.
    fn hello(record_seq: u8, message_seq: u8, cookie: &[u8]) -> Vec<u8> {
        let mut body = vec![0xfe, 0xfd];
        body.extend_from_slice(&[7; 32]);
        body.push(0);
        body.push(cookie.len() as u8);
        body.extend_from_slice(cookie);
        body.extend_from_slice(&[0, 2, 0xc0, 0xa8, 1, 0]);
        let len = body.len() as u8;
        let mut hs = vec![CLIENT_HELLO, 0, 0, len, 0, message_seq, 0, 0, 0, 0, 0, len];
        hs.extend_from_slice(&body);
        let mut rec = vec![
            22,
            0xfe,
            0xfd,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            record_seq,
            0,
            hs.len() as u8,
        ];
        rec.extend_from_slice(&hs);
        rec
    }

    #[test]
    fn reads_a_client_hello_and_its_cookie() {
        let bytes = hello(1, 1, b"abcd");
        let ch = parse(&bytes).expect("a ClientHello");
        assert_eq!((ch.record_seq, ch.message_seq), (1, 1));
        assert_eq!(ch.cookie, b"abcd");
        assert_eq!(ch.random, &[7; 32]);
    }

    #[test]
    fn the_hello_with_cookie_is_one_record_and_message_later() {
        let first = hello(0, 0, b"");
        let second = hello(1, 1, b"0123456789abcdef");
        let ch = parse(&first).expect("a ClientHello");
        assert_eq!(with_cookie(&first, &ch, b"0123456789abcdef"), Some(second));
    }

    #[test]
    fn the_verify_request_echoes_the_sequence_numbers() {
        let bytes = hello(3, 0, b"");
        let ch = parse(&bytes).expect("a ClientHello");
        let hvr = verify_request(&ch, b"0123456789abcdef");
        assert_eq!(hvr.len(), RECORD_HEADER + HANDSHAKE_HEADER + 3 + 16);
        assert_eq!(hvr[10], 3, "record sequence number");
        assert_eq!(hvr[RECORD_HEADER], HELLO_VERIFY_REQUEST);
        assert_eq!(verify_request_cookie(&hvr), Some(&b"0123456789abcdef"[..]));
        assert!(
            hvr.len() < bytes.len(),
            "the answer is smaller than the question"
        );
    }

    #[test]
    fn truncated_or_odd_records_are_not_hellos() {
        let bytes = hello(1, 1, b"abcd");
        for n in 0..bytes.len() {
            assert_eq!(parse(&bytes[..n]), None, "cut at {n}");
        }
        let mut fragmented = bytes.clone();
        fragmented[22] = 1;
        assert_eq!(parse(&fragmented), None);
        let mut epoch1 = bytes;
        epoch1[4] = 1;
        assert_eq!(parse(&epoch1), None);
    }
}
