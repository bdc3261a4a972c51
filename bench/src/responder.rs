//! A bare MQTT 5 responder on one TCP connection: each request published to its filter is
//! answered on the request's Response Topic, with its Correlation Data and payload, from the
//! same task that read it. Nothing stands between the socket and the reply, so a round trip
//! measured against it is the gateway's (a client library's event loop and channels add hops).

use std::net::SocketAddr;

use anyhow::{Context, bail};
use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A connected responder, subscribed and ready to answer.
pub struct Responder {
    stream: TcpStream,
    read: BytesMut,
}

impl Responder {
    /// Connects as `client_id` and subscribes to `filter` at QoS 0; returns once the SUBACK
    /// grants it.
    pub async fn connect(addr: SocketAddr, client_id: &str, filter: &str) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr).await.context("connecting")?;
        stream.set_nodelay(true)?;
        let mut responder = Self {
            stream,
            read: BytesMut::with_capacity(64 * 1024),
        };
        // CONNECT: "MQTT", level 5, clean start, keep-alive 60 s, no properties.
        let mut body = BytesMut::new();
        put_str(&mut body, "MQTT");
        body.put_slice(&[5, 0x02, 0, 60, 0]);
        put_str(&mut body, client_id);
        responder.send(0x10, &body).await?;
        let (kind, connack) = responder.packet().await?;
        if kind >> 4 != 2 || connack.get(1) != Some(&0) {
            bail!("the broker refused the responder: {connack:?}");
        }
        // SUBSCRIBE: packet id 1, no properties, the filter at QoS 0.
        let mut body = BytesMut::new();
        body.put_slice(&[0, 1, 0]);
        put_str(&mut body, filter);
        body.put_u8(0);
        responder.send(0x82, &body).await?;
        loop {
            let (kind, suback) = responder.packet().await?;
            if kind >> 4 == 9 {
                // Packet id, properties (empty: length 0), then one reason code.
                match suback.last() {
                    Some(0) => return Ok(responder),
                    code => bail!("the broker refused the subscription to {filter}: {code:?}"),
                }
            }
        }
    }

    /// Answers requests until the connection ends.
    pub async fn serve(mut self) -> anyhow::Result<()> {
        let mut out = BytesMut::with_capacity(64 * 1024);
        loop {
            while let Some((kind, body)) = frame(&mut self.read)? {
                if kind >> 4 == 3 {
                    answer(kind, &body, &mut out)?;
                }
            }
            if !out.is_empty() {
                self.stream.write_all(&out).await?;
                out.clear();
            }
            if self.stream.read_buf(&mut self.read).await? == 0 {
                return Ok(());
            }
        }
    }

    async fn send(&mut self, kind: u8, body: &[u8]) -> anyhow::Result<()> {
        let mut out = BytesMut::with_capacity(body.len() + 5);
        out.put_u8(kind);
        put_varint(&mut out, body.len());
        out.put_slice(body);
        self.stream.write_all(&out).await?;
        Ok(())
    }

    async fn packet(&mut self) -> anyhow::Result<(u8, BytesMut)> {
        loop {
            if let Some(packet) = frame(&mut self.read)? {
                return Ok(packet);
            }
            if self.stream.read_buf(&mut self.read).await? == 0 {
                bail!("the broker closed the connection");
            }
        }
    }
}

/// Writes the reply to one PUBLISH (first byte `kind`, then `body`) into `out`.
fn answer(kind: u8, body: &[u8], out: &mut BytesMut) -> anyhow::Result<()> {
    let mut rd = body;
    let _topic = take_str(&mut rd)?;
    if (kind >> 1) & 3 > 0 {
        take(&mut rd, 2)?;
    }
    let len = take_varint(&mut rd)?;
    let mut props = take(&mut rd, len)?;
    let payload = rd;
    let (mut reply_to, mut correlation) = (None, None);
    while !props.is_empty() {
        match take(&mut props, 1)?[0] {
            0x08 => reply_to = Some(take_str(&mut props)?),
            0x09 => correlation = Some(take_bin(&mut props)?),
            0x01 => drop(take(&mut props, 1)?),
            0x23 => drop(take(&mut props, 2)?),
            0x02 => drop(take(&mut props, 4)?),
            0x03 => drop(take_str(&mut props)?),
            0x0B => drop(take_varint(&mut props)?),
            0x26 => drop((take_str(&mut props)?, take_str(&mut props)?)),
            id => bail!("unexpected PUBLISH property {id:#04x}"),
        }
    }
    let Some(reply_to) = reply_to else {
        return Ok(());
    };
    let mut props = BytesMut::new();
    if let Some(data) = correlation {
        props.put_u8(0x09);
        props.put_u16(data.len() as u16);
        props.put_slice(data);
    }
    let mut var = BytesMut::new();
    put_str(&mut var, reply_to);
    put_varint(&mut var, props.len());
    var.put_slice(&props);
    out.put_u8(0x30);
    put_varint(out, var.len() + payload.len());
    out.put_slice(&var);
    out.put_slice(payload);
    Ok(())
}

/// Splits one whole packet off `buf`: its first byte and its body.
fn frame(buf: &mut BytesMut) -> anyhow::Result<Option<(u8, BytesMut)>> {
    let mut len = 0usize;
    for i in 1..=4 {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7f) << (7 * (i - 1));
        if b & 0x80 == 0 {
            if buf.len() < 1 + i + len {
                return Ok(None);
            }
            let kind = buf[0];
            buf.advance(1 + i);
            return Ok(Some((kind, buf.split_to(len))));
        }
    }
    bail!("a remaining length over four bytes")
}

fn take<'a>(rd: &mut &'a [u8], n: usize) -> anyhow::Result<&'a [u8]> {
    if rd.len() < n {
        bail!("a packet shorter than its fields");
    }
    let (head, rest) = rd.split_at(n);
    *rd = rest;
    Ok(head)
}

fn take_bin<'a>(rd: &mut &'a [u8]) -> anyhow::Result<&'a [u8]> {
    let len = take(rd, 2)?;
    take(rd, usize::from(u16::from_be_bytes([len[0], len[1]])))
}

fn take_str<'a>(rd: &mut &'a [u8]) -> anyhow::Result<&'a str> {
    Ok(std::str::from_utf8(take_bin(rd)?)?)
}

fn take_varint(rd: &mut &[u8]) -> anyhow::Result<usize> {
    let mut n = 0usize;
    for i in 0..4 {
        let b = take(rd, 1)?[0];
        n |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(n);
        }
    }
    bail!("a variable byte integer over four bytes")
}

fn put_str(out: &mut BytesMut, s: &str) {
    out.put_u16(s.len() as u16);
    out.put_slice(s.as_bytes());
}

fn put_varint(out: &mut BytesMut, mut n: usize) {
    loop {
        let byte = (n % 128) as u8;
        n /= 128;
        if n == 0 {
            out.put_u8(byte);
            return;
        }
        out.put_u8(byte | 0x80);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_answered_on_its_response_topic_with_its_correlation_data() {
        // PUBLISH QoS 0 to "req/x" with Response Topic "rpc/replies/1", Correlation Data "c7"
        // and a user property, payload "hi".
        let mut props = BytesMut::new();
        props.put_u8(0x08);
        put_str(&mut props, "rpc/replies/1");
        props.put_slice(&[0x09, 0, 2, b'c', b'7', 0x26]);
        put_str(&mut props, "k");
        put_str(&mut props, "v");
        let mut body = BytesMut::new();
        put_str(&mut body, "req/x");
        put_varint(&mut body, props.len());
        body.put_slice(&props);
        body.put_slice(b"hi");
        let mut out = BytesMut::new();
        answer(0x30, &body, &mut out).unwrap();
        let (kind, reply) = frame(&mut out).unwrap().unwrap();
        assert_eq!(kind, 0x30);
        let mut rd = &reply[..];
        assert_eq!(take_str(&mut rd).unwrap(), "rpc/replies/1");
        let len = take_varint(&mut rd).unwrap();
        assert_eq!(take(&mut rd, len).unwrap(), &[0x09, 0, 2, b'c', b'7']);
        assert_eq!(rd, b"hi");
        assert!(out.is_empty());
    }

    #[test]
    fn a_packet_is_framed_only_when_whole() {
        let mut buf = BytesMut::from(&[0x30, 0x82][..]);
        assert!(frame(&mut buf).unwrap().is_none());
        buf.put_u8(0x01);
        buf.put_slice(&[0u8; 129]);
        assert!(frame(&mut buf).unwrap().is_none());
        buf.put_u8(0);
        let (kind, body) = frame(&mut buf).unwrap().unwrap();
        assert_eq!((kind, body.len()), (0x30, 130));
    }
}
