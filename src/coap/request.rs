//! A CoAP request parsed at the edge into plain fields, with the option rules of RFC 7252 §5.4:
//! an unknown or malformed critical option, or a repeated non-repeatable one, is a 4.02.

use bytes::Bytes;
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};

use super::wire::{Block, read_uint, uint};

/// A request's method and the options the endpoint understands.
#[derive(Debug)]
pub(crate) struct Request {
    /// The method code.
    pub(crate) method: RequestType,
    /// Whether it came as a confirmable message.
    pub(crate) confirmable: bool,
    /// Uri-Path segments, UTF-8.
    pub(crate) path: Vec<String>,
    /// Uri-Query options split at the first `=`.
    pub(crate) query: Vec<(String, String)>,
    /// Content-Format of the payload.
    pub(crate) content_format: Option<u16>,
    /// Accept.
    pub(crate) accept: Option<u16>,
    /// ETag options: representations the client holds.
    pub(crate) etags: Vec<Vec<u8>>,
    /// If-Match options.
    pub(crate) if_match: Vec<Vec<u8>>,
    /// If-None-Match.
    pub(crate) if_none_match: bool,
    /// Observe: 0 registers, 1 deregisters.
    pub(crate) observe: Option<u32>,
    /// Block1 of an upload.
    pub(crate) block1: Option<Block>,
    /// Block2 asked for.
    pub(crate) block2: Option<Block>,
    /// Size1: the announced size of an upload.
    pub(crate) size1: Option<u32>,
    /// No-Response (RFC 7967) bits: 2 suppresses 2.xx, 8 suppresses 4.xx, 16 suppresses 5.xx.
    pub(crate) no_response: u8,
    /// The payload.
    pub(crate) payload: Bytes,
}

/// A response before it is framed as ACK or NON.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Reply {
    /// The response code.
    pub(crate) code: ResponseType,
    /// Options, in any order.
    pub(crate) options: Vec<(CoapOption, Vec<u8>)>,
    /// The payload; for errors a one-line diagnostic.
    pub(crate) payload: Bytes,
}

impl Reply {
    /// A response without options or payload.
    pub(crate) fn new(code: ResponseType) -> Self {
        Self {
            code,
            options: Vec::new(),
            payload: Bytes::new(),
        }
    }

    /// An error response with a diagnostic payload (RFC 7252 §5.5.2).
    pub(crate) fn error(code: ResponseType, diagnostic: impl Into<String>) -> Self {
        Self {
            code,
            options: Vec::new(),
            payload: Bytes::from(diagnostic.into()),
        }
    }

    /// Adds an option.
    pub(crate) fn with(mut self, option: CoapOption, value: Vec<u8>) -> Self {
        self.options.push((option, value));
        self
    }

    /// Adds an unsigned integer option.
    pub(crate) fn with_uint(self, option: CoapOption, value: u32) -> Self {
        self.with(option, uint(value))
    }

    /// Frames the response: a piggybacked ACK for a confirmable request, else a
    /// non-confirmable message with `mid`.
    pub(crate) fn into_packet(self, confirmable: bool, mid: u16, token: &[u8]) -> Packet {
        let mut packet = Packet::new();
        packet.header.set_type(if confirmable {
            MessageType::Acknowledgement
        } else {
            MessageType::NonConfirmable
        });
        packet.header.code = MessageClass::Response(self.code);
        packet.header.message_id = mid;
        packet.set_token(token.to_vec());
        for (option, value) in self.options {
            packet.add_option(option, value);
        }
        packet.payload = self.payload.to_vec();
        packet
    }
}

/// Options that may appear at most once; a repeated critical one is a 4.02.
const CRITICAL_SINGLE: &[u16] = &[3, 5, 7, 17, 23, 27, 35, 39];

/// Reads the options of a request packet.
pub(crate) fn parse(packet: &Packet, method: RequestType) -> Result<Request, Reply> {
    let mut req = Request {
        method,
        confirmable: packet.header.get_type() == MessageType::Confirmable,
        path: Vec::new(),
        query: Vec::new(),
        content_format: None,
        accept: None,
        etags: Vec::new(),
        if_match: Vec::new(),
        if_none_match: false,
        observe: None,
        block1: None,
        block2: None,
        size1: None,
        no_response: 0,
        payload: Bytes::from(packet.payload.clone()),
    };
    for (&number, values) in packet.options() {
        let critical = number % 2 == 1;
        if critical && values.len() > 1 && CRITICAL_SINGLE.contains(&number) {
            return Err(bad_option(number, "appears more than once"));
        }
        let Some(first) = values.front() else {
            continue;
        };
        let malformed = |what: &str| {
            if critical {
                Err(bad_option(number, what))
            } else {
                Ok(())
            }
        };
        match CoapOption::from(number) {
            CoapOption::UriHost | CoapOption::UriPort | CoapOption::MaxAge | CoapOption::Size2 => {}
            CoapOption::IfMatch => req.if_match = values.iter().cloned().collect(),
            CoapOption::ETag => req.etags = values.iter().cloned().collect(),
            CoapOption::IfNoneMatch => {
                if first.is_empty() {
                    req.if_none_match = true;
                } else {
                    malformed("must be empty")?;
                }
            }
            CoapOption::Observe => req.observe = read_uint(first, 3),
            CoapOption::UriPath => {
                for segment in values {
                    let text = String::from_utf8(segment.clone()).map_err(|_| {
                        Reply::error(ResponseType::BadRequest, "Uri-Path is not valid UTF-8")
                    })?;
                    req.path.push(text);
                }
            }
            CoapOption::UriQuery => {
                for item in values {
                    let text = String::from_utf8(item.clone()).map_err(|_| {
                        Reply::error(ResponseType::BadRequest, "Uri-Query is not valid UTF-8")
                    })?;
                    let (name, value) = text.split_once('=').unwrap_or((&text, ""));
                    req.query.push((name.to_owned(), value.to_owned()));
                }
            }
            CoapOption::ContentFormat => {
                req.content_format = read_uint(first, 2).map(|v| v as u16);
            }
            CoapOption::Accept => match read_uint(first, 2) {
                Some(v) => req.accept = Some(v as u16),
                None => malformed("is longer than 2 bytes")?,
            },
            CoapOption::Block1 => match Block::decode(first) {
                Some(b) => req.block1 = Some(b),
                None => malformed("is not a valid block value")?,
            },
            CoapOption::Block2 => match Block::decode(first) {
                Some(b) => req.block2 = Some(b),
                None => malformed("is not a valid block value")?,
            },
            CoapOption::Size1 => req.size1 = read_uint(first, 4),
            CoapOption::NoResponse => {
                req.no_response = read_uint(first, 1).map_or(0, |v| v as u8);
            }
            CoapOption::ProxyUri | CoapOption::ProxyScheme => {
                return Err(Reply::error(
                    ResponseType::ProxyingNotSupported,
                    "this endpoint is not a proxy",
                ));
            }
            _ if critical => return Err(bad_option(number, "is not supported")),
            _ => {}
        }
    }
    Ok(req)
}

fn bad_option(number: u16, what: &str) -> Reply {
    Reply::error(
        ResponseType::BadOption,
        format!("critical option {number} {what}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(options: &[(u16, &[u8])]) -> Packet {
        let mut p = Packet::new();
        p.header.code = MessageClass::Request(RequestType::Get);
        for (n, v) in options {
            p.add_option(CoapOption::from(*n), v.to_vec());
        }
        p
    }

    fn code_of(p: &Packet) -> Option<ResponseType> {
        parse(p, RequestType::Get).err().map(|r| r.code)
    }

    #[test]
    fn unknown_critical_options_are_bad_options() {
        assert_eq!(code_of(&get(&[(9, b"x")])), Some(ResponseType::BadOption));
        assert_eq!(code_of(&get(&[(2049, b"")])), Some(ResponseType::BadOption));
        // An unknown elective option is ignored.
        assert_eq!(code_of(&get(&[(2050, b"x")])), None);
        // A repeated Accept, and a malformed Block2.
        assert_eq!(
            code_of(&get(&[(17, b"\x00"), (17, b"\x32")])),
            Some(ResponseType::BadOption)
        );
        assert_eq!(
            code_of(&get(&[(23, b"\x07")])),
            Some(ResponseType::BadOption)
        );
        assert_eq!(
            code_of(&get(&[(35, b"coap://x")])),
            Some(ResponseType::ProxyingNotSupported)
        );
    }

    #[test]
    fn path_query_and_blocks_are_read() {
        let p = get(&[
            (11, b"topics"),
            (11, b"a b"),
            (15, b"qos=1"),
            (15, b"retain"),
            (23, &[0x16]),
            (6, b""),
        ]);
        let req = parse(&p, RequestType::Get).unwrap();
        assert_eq!(req.path, ["topics", "a b"]);
        assert_eq!(
            req.query,
            [
                ("qos".to_owned(), "1".to_owned()),
                ("retain".to_owned(), String::new())
            ]
        );
        assert_eq!(
            req.block2,
            Some(Block {
                num: 1,
                more: false,
                szx: 6
            })
        );
        assert_eq!(req.observe, Some(0));
        let bad = get(&[(11, &[0xff])]);
        assert_eq!(code_of(&bad), Some(ResponseType::BadRequest));
    }
}
