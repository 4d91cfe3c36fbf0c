//! The messages of a migration stream and their encoding: a type byte, then fixed
//! little-endian fields, then (for blobs and pages) the bytes. Decoding checks every length
//! against the frame and against the bounds here.

use crate::{Error, Result};

/// Guest page size.
pub const PAGE: usize = 4096;
/// Most pages one [`Message::Pages`] carries (1 MiB).
pub const MAX_RUN_PAGES: usize = 256;
/// Largest configuration or state blob (JSON), and so the largest frame's payload.
pub const MAX_BLOB: usize = 8 << 20;

const CONFIG: u8 = 1;
const PAGES: u8 = 2;
const ZEROS: u8 = 3;
const ROUND_END: u8 = 4;
const STATE: u8 = 5;
const RESUMED: u8 = 6;
const ABORT: u8 = 7;
const READY: u8 = 8;
const GO: u8 = 9;
const MISSING: u8 = 10;
const WANT: u8 = 11;
const COMPLETE: u8 = 12;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Sender → receiver, first: the machine to build (JSON).
    Config(Vec<u8>),
    /// Guest pages `first_page ..` (guest-physical page numbers), their bytes back to back.
    Pages { first_page: u64, data: Vec<u8> },
    /// `count` pages from `first_page` on are zero (sent instead of their bytes).
    Zeros { first_page: u64, count: u64 },
    /// The end of pre-copy round `round`, which sent `pages` pages.
    RoundEnd { round: u32, pages: u64 },
    /// Sender → receiver, last of the VM: the paused VM's vCPU and device state (JSON).
    State(Vec<u8>),
    /// Receiver → sender: the VM is built and its state restored; it runs on [`Message::Go`].
    Ready,
    /// Sender → receiver: the sender has stopped for good; run the VM. (The commit: before
    /// it the sender may resume, after it never.)
    Go,
    /// Receiver → sender: the VM runs here now.
    Resumed,
    /// Either way: the migration is off, and why.
    Abort(String),
    /// Post-copy, sender → receiver, before the state: pages `first_page..+count` were
    /// written since they were sent; the receiver fetches them when they are touched.
    Missing { first_page: u64, count: u64 },
    /// Post-copy, receiver → sender: send page `page` now (something waits on it).
    Want { page: u64 },
    /// Post-copy, sender → receiver: every missing page has been sent.
    Complete,
}

fn bad(what: impl Into<String>) -> Error {
    Error::Malformed(what.into())
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(bad("the frame ends inside a message"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }

    fn end(&self) -> Result<()> {
        if !self.0.is_empty() {
            return Err(bad(format!("{} bytes after the message", self.0.len())));
        }
        Ok(())
    }
}

/// Longest abort reason carried, in bytes.
const MAX_REASON: usize = 4096;

/// `why` cut to at most [`MAX_REASON`] bytes, at a character boundary.
fn clip_reason(why: &str) -> &str {
    let mut end = why.len().min(MAX_REASON);
    while !why.is_char_boundary(end) {
        end -= 1;
    }
    why.get(..end).unwrap_or_default()
}

/// Pages numbers must stay addressable as guest-physical addresses (52 bits).
const MAX_PAGE: u64 = 1 << 40;

impl Message {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode_into(&mut v);
        v
    }

    /// Appends the encoding to `v` (reusing its allocation).
    pub fn encode_into(&self, v: &mut Vec<u8>) {
        match self {
            Message::Config(b) => {
                v.push(CONFIG);
                v.extend_from_slice(b);
            }
            Message::Pages { first_page, data } => encode_pages(v, *first_page, data),
            Message::Zeros { first_page, count } => {
                v.push(ZEROS);
                v.extend_from_slice(&first_page.to_le_bytes());
                v.extend_from_slice(&count.to_le_bytes());
            }
            Message::RoundEnd { round, pages } => {
                v.push(ROUND_END);
                v.extend_from_slice(&round.to_le_bytes());
                v.extend_from_slice(&pages.to_le_bytes());
            }
            Message::State(b) => {
                v.push(STATE);
                v.extend_from_slice(b);
            }
            Message::Resumed => v.push(RESUMED),
            Message::Ready => v.push(READY),
            Message::Go => v.push(GO),
            Message::Missing { first_page, count } => {
                v.push(MISSING);
                v.extend_from_slice(&first_page.to_le_bytes());
                v.extend_from_slice(&count.to_le_bytes());
            }
            Message::Want { page } => {
                v.push(WANT);
                v.extend_from_slice(&page.to_le_bytes());
            }
            Message::Complete => v.push(COMPLETE),
            Message::Abort(why) => {
                v.push(ABORT);
                v.extend_from_slice(clip_reason(why).as_bytes());
            }
        }
    }

    /// Decodes one frame's message (untrusted bytes: every field is checked).
    pub fn decode(frame: &[u8]) -> Result<Message> {
        Ok(match Incoming::decode(frame)? {
            Incoming::Pages { first_page, data } => Message::Pages {
                first_page,
                data: data.to_vec(),
            },
            Incoming::Other(m) => m,
        })
    }
}

/// `Pages { first_page, data }` encoded into `v` (after what it holds).
pub(crate) fn encode_pages(v: &mut Vec<u8>, first_page: u64, data: &[u8]) {
    v.reserve(9 + data.len());
    v.push(PAGES);
    v.extend_from_slice(&first_page.to_le_bytes());
    v.extend_from_slice(data);
}

/// A message as received, guest pages left in the frame they came in (no copy).
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming<'a> {
    /// [`Message::Pages`], checked the same way.
    Pages { first_page: u64, data: &'a [u8] },
    /// Any other message.
    Other(Message),
}

impl<'a> Incoming<'a> {
    /// Decodes one frame's message (untrusted bytes: every field is checked).
    pub fn decode(frame: &'a [u8]) -> Result<Incoming<'a>> {
        let (&kind, body) = frame.split_first().ok_or_else(|| bad("an empty frame"))?;
        let mut r = Reader(body);
        let blob = |b: &[u8], what: &str| -> Result<Vec<u8>> {
            if b.len() > MAX_BLOB {
                return Err(bad(format!("{what} of {} bytes", b.len())));
            }
            Ok(b.to_vec())
        };
        let m = match kind {
            CONFIG => Message::Config(blob(r.rest(), "a configuration")?),
            PAGES => {
                let first_page = r.u64()?;
                let data = r.rest();
                if data.is_empty() || data.len() % PAGE != 0 {
                    return Err(bad(format!(
                        "{} bytes of pages is not whole pages",
                        data.len()
                    )));
                }
                let count = data.len() / PAGE;
                if count > MAX_RUN_PAGES {
                    return Err(bad(format!(
                        "a run of {count} pages (at most {MAX_RUN_PAGES})"
                    )));
                }
                if first_page
                    .checked_add(count as u64)
                    .is_none_or(|end| end > MAX_PAGE)
                {
                    return Err(bad(format!("pages {first_page:#x}+{count} out of range")));
                }
                return Ok(Incoming::Pages { first_page, data });
            }
            ZEROS | MISSING => {
                let first_page = r.u64()?;
                let count = r.u64()?;
                if count == 0
                    || first_page
                        .checked_add(count)
                        .is_none_or(|end| end > MAX_PAGE)
                {
                    return Err(bad(format!("pages {first_page:#x}+{count} out of range")));
                }
                if kind == ZEROS {
                    Message::Zeros { first_page, count }
                } else {
                    Message::Missing { first_page, count }
                }
            }
            WANT => {
                let page = r.u64()?;
                if page >= MAX_PAGE {
                    return Err(bad(format!("page {page:#x} out of range")));
                }
                Message::Want { page }
            }
            COMPLETE => Message::Complete,
            ROUND_END => Message::RoundEnd {
                round: r.u32()?,
                pages: r.u64()?,
            },
            STATE => Message::State(blob(r.rest(), "a state")?),
            RESUMED => Message::Resumed,
            READY => Message::Ready,
            GO => Message::Go,
            ABORT => {
                let b = r.rest();
                if b.len() > MAX_REASON {
                    return Err(bad(format!(
                        "an abort reason longer than {MAX_REASON} bytes"
                    )));
                }
                // Invalid UTF-8 becomes U+FFFD (three bytes each): clip what that grew.
                let why = String::from_utf8_lossy(b);
                Message::Abort(clip_reason(&why).to_string())
            }
            k => return Err(bad(format!("unknown message type {k}"))),
        };
        r.end()?;
        Ok(Incoming::Other(m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_round_trips() {
        let all = [
            Message::Config(b"{\"vcpus\":2}".to_vec()),
            Message::Pages {
                first_page: 0x100,
                data: vec![7; 3 * PAGE],
            },
            Message::Zeros {
                first_page: 9,
                count: 1000,
            },
            Message::RoundEnd {
                round: 3,
                pages: 77,
            },
            Message::State(vec![b'x'; 100]),
            Message::Resumed,
            Message::Ready,
            Message::Go,
            Message::Abort("the destination has too little memory".into()),
            Message::Missing {
                first_page: 0x300,
                count: 17,
            },
            Message::Want { page: 0x12345 },
            Message::Complete,
        ];
        for m in all {
            assert_eq!(Message::decode(&m.encode()).unwrap(), m);
        }
    }

    #[test]
    fn malformed_messages_are_refused_with_what_is_wrong() {
        let err = |b: &[u8]| Message::decode(b).unwrap_err().to_string();
        assert!(err(&[]).contains("empty"));
        assert!(err(&[99]).contains("unknown message type 99"));
        // Pages: not whole pages, too many, none, out of range, truncated header.
        let mut p = vec![PAGES];
        p.extend_from_slice(&5u64.to_le_bytes());
        let mut half = p.clone();
        half.extend(vec![0; PAGE / 2]);
        assert!(err(&half).contains("not whole pages"));
        assert!(err(&p).contains("not whole pages"));
        let mut many = p.clone();
        many.extend(vec![0; (MAX_RUN_PAGES + 1) * PAGE]);
        assert!(err(&many).contains("a run of 257 pages"));
        let mut far = vec![PAGES];
        far.extend_from_slice(&(MAX_PAGE - 1).to_le_bytes());
        far.extend(vec![0; 2 * PAGE]);
        assert!(err(&far).contains("out of range"));
        assert!(err(&[PAGES, 1, 2]).contains("ends inside"));
        // Zeros: none, wrapping, trailing bytes.
        let zeros = |first: u64, count: u64| {
            let mut z = vec![ZEROS];
            z.extend_from_slice(&first.to_le_bytes());
            z.extend_from_slice(&count.to_le_bytes());
            z
        };
        assert!(err(&zeros(1, 0)).contains("out of range"));
        assert!(err(&zeros(u64::MAX, 2)).contains("out of range"));
        let mut trailing = zeros(1, 1);
        trailing.push(0);
        assert!(err(&trailing).contains("1 bytes after"));
        assert!(err(&[RESUMED, 0]).contains("after the message"));
        // An abort reason of invalid UTF-8 grows when made text: it is clipped, and what
        // decodes encodes to something that decodes the same.
        let mut junk = vec![ABORT];
        junk.extend(vec![0xff; MAX_REASON]);
        let m = Message::decode(&junk).unwrap();
        assert_eq!(Message::decode(&m.encode()).unwrap(), m);
        let Message::Abort(why) = &m else { panic!() };
        assert!(why.len() <= MAX_REASON);
        // A long reason is clipped when sent, not refused.
        let long = Message::Abort("é".repeat(3000));
        assert!(long.encode().len() <= 1 + MAX_REASON);
        assert!(Message::decode(&long.encode()).is_ok());
        let mut big = vec![STATE];
        big.extend(vec![0; MAX_BLOB + 1]);
        assert!(err(&big).contains("a state of"));
    }
}
