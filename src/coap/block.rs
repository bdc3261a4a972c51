//! Block-wise transfers (RFC 7959): cutting a representation into Block2 blocks, and putting a
//! Block1 upload back together within the payload limit and a bounded number of transfers.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::endpoint::Peer;
use super::wire::Block;

/// One block of a representation.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Slice {
    /// The block's bytes.
    pub(crate) payload: Bytes,
    /// The Block2 option to send with it.
    pub(crate) block: Block,
}

/// Block `asked` (or the first one) of `body`, in blocks of the client's size or `max_szx`,
/// whichever is smaller; `None` when the block starts past the end.
pub(crate) fn slice(body: &Bytes, asked: Option<Block>, max_szx: u8) -> Option<Slice> {
    let (num, szx) = match asked {
        Some(b) if b.szx > max_szx => {
            // A smaller size than the client asked: keep the same offset (RFC 7959 §2.4).
            let scale = 1u32 << (b.szx - max_szx);
            (b.num.checked_mul(scale)?, max_szx)
        }
        Some(b) => (b.num, b.szx),
        None => (0, max_szx),
    };
    let mut block = Block {
        num,
        more: false,
        szx,
    };
    let start = block.offset();
    if start >= body.len() && !(start == 0 && body.is_empty()) {
        return None;
    }
    let end = (start + block.size()).min(body.len());
    block.more = end < body.len();
    Some(Slice {
        payload: body.slice(start..end),
        block,
    })
}

/// Identifies an upload: the peer and the request's method and URI.
pub(crate) type UploadKey = (Peer, String);

/// Why a Block1 block was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum UploadError {
    /// 4.08: a block is missing or out of order.
    Incomplete,
    /// 4.13: the whole would be over the payload limit.
    TooLarge,
    /// 4.00: a block that is not the last is not full.
    ShortBlock,
    /// 5.03: too many uploads at once.
    Busy,
}

/// What a block completed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Progress {
    /// More blocks are expected: answer 2.31 Continue.
    Continue,
    /// The last block arrived: here is the whole payload.
    Done(Bytes),
}

#[derive(Debug)]
struct Upload {
    body: BytesMut,
    touched: Instant,
}

/// Uploads in progress.
#[derive(Debug)]
pub(crate) struct Uploads {
    max_payload: usize,
    capacity: usize,
    lifetime: Duration,
    open: HashMap<UploadKey, Upload>,
}

impl Uploads {
    /// At most `capacity` uploads of at most `max_payload` bytes, each forgotten `lifetime`
    /// after its last block.
    pub(crate) fn new(max_payload: usize, capacity: usize, lifetime: Duration) -> Self {
        Self {
            max_payload,
            capacity,
            lifetime,
            open: HashMap::new(),
        }
    }

    /// Takes one block.
    pub(crate) fn receive(
        &mut self,
        key: UploadKey,
        block: Block,
        payload: &[u8],
        now: Instant,
    ) -> Result<Progress, UploadError> {
        let lifetime = self.lifetime;
        self.open
            .retain(|_, u| now.duration_since(u.touched) < lifetime);
        if block.more && payload.len() != block.size() {
            self.open.remove(&key);
            return Err(UploadError::ShortBlock);
        }
        if block.num == 0 {
            self.open.remove(&key);
            if self.open.len() >= self.capacity {
                return Err(UploadError::Busy);
            }
            self.open.insert(
                key.clone(),
                Upload {
                    body: BytesMut::new(),
                    touched: now,
                },
            );
        }
        let Some(upload) = self.open.get_mut(&key) else {
            return Err(UploadError::Incomplete);
        };
        if upload.body.len() != block.offset() {
            self.open.remove(&key);
            return Err(UploadError::Incomplete);
        }
        if upload.body.len() + payload.len() > self.max_payload {
            self.open.remove(&key);
            return Err(UploadError::TooLarge);
        }
        upload.body.extend_from_slice(payload);
        upload.touched = now;
        if block.more {
            return Ok(Progress::Continue);
        }
        let done = self.open.remove(&key).map(|u| u.body.freeze());
        Ok(Progress::Done(done.unwrap_or_default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(num: u32, more: bool, szx: u8) -> Block {
        Block { num, more, szx }
    }

    #[test]
    fn slices_follow_the_negotiated_size() {
        let body = Bytes::from(vec![7u8; 2500]);
        let first = slice(&body, None, 6).unwrap();
        assert_eq!((first.payload.len(), first.block), (1024, b(0, true, 6)));
        let last = slice(&body, Some(b(2, false, 6)), 6).unwrap();
        assert_eq!((last.payload.len(), last.block), (452, b(2, false, 6)));
        assert_eq!(slice(&body, Some(b(3, false, 6)), 6), None);
        // The client asks for 64-byte blocks: it gets them.
        let small = slice(&body, Some(b(1, false, 2)), 6).unwrap();
        assert_eq!((small.payload.len(), small.block), (64, b(1, true, 2)));
        // The client asks for larger blocks than allowed: same offset, smaller size.
        let scaled = slice(&body, Some(b(1, false, 6)), 4).unwrap();
        assert_eq!(scaled.block, b(4, true, 4));
        // An empty body is one empty block.
        assert_eq!(slice(&Bytes::new(), None, 6).unwrap().block, b(0, false, 6));
    }

    fn peer() -> Peer {
        Peer::Udp(std::net::SocketAddr::from(([127, 0, 0, 1], 9)))
    }

    #[test]
    fn uploads_reassemble_in_order_only() {
        let now = Instant::now();
        let mut up = Uploads::new(100, 2, Duration::from_secs(60));
        let k = (peer(), "PUT /t".to_owned());
        assert_eq!(
            up.receive(k.clone(), b(0, true, 0), &[1; 16], now),
            Ok(Progress::Continue)
        );
        assert_eq!(
            up.receive(k.clone(), b(2, true, 0), &[1; 16], now),
            Err(UploadError::Incomplete)
        );
        // The failed sequence is forgotten: block 1 now is out of order too.
        assert_eq!(
            up.receive(k.clone(), b(1, false, 0), &[1; 3], now),
            Err(UploadError::Incomplete)
        );
        up.receive(k.clone(), b(0, true, 0), &[1; 16], now).unwrap();
        assert_eq!(
            up.receive(k.clone(), b(1, false, 0), &[2; 3], now),
            Ok(Progress::Done(Bytes::from(
                [[1u8; 16].as_slice(), &[2; 3]].concat()
            )))
        );
    }

    #[test]
    fn uploads_are_bounded() {
        let now = Instant::now();
        let mut up = Uploads::new(40, 1, Duration::from_secs(60));
        let k = (peer(), "PUT /t".to_owned());
        up.receive(k.clone(), b(0, true, 0), &[0; 16], now).unwrap();
        up.receive(k.clone(), b(1, true, 0), &[0; 16], now).unwrap();
        assert_eq!(
            up.receive(k.clone(), b(2, true, 0), &[0; 16], now),
            Err(UploadError::TooLarge)
        );
        up.receive(k.clone(), b(0, true, 0), &[0; 16], now).unwrap();
        let other = (peer(), "PUT /u".to_owned());
        assert_eq!(
            up.receive(other.clone(), b(0, true, 0), &[0; 16], now),
            Err(UploadError::Busy)
        );
        // Stale uploads make room.
        let later = now + Duration::from_secs(61);
        assert_eq!(
            up.receive(other.clone(), b(0, true, 0), &[0; 16], later),
            Ok(Progress::Continue)
        );
        assert_eq!(
            up.receive(other, b(1, true, 1), &[0; 5], later),
            Err(UploadError::ShortBlock)
        );
    }
}
