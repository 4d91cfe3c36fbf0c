use super::*;
use crate::{Message, PAGE};
use std::os::unix::net::UnixStream;

const KEY: &[u8] = b"a key of at least sixteen bytes";

/// Both ends over a socket pair: the receiver on a thread.
fn pair(
    sender_key: &'static [u8],
    receiver_key: &'static [u8],
) -> (Result<Channel<UnixStream>>, Result<Channel<UnixStream>>) {
    let (a, b) = UnixStream::pair().unwrap();
    let r = std::thread::spawn(move || Channel::handshake(b, Role::Receiver, receiver_key));
    let s = Channel::handshake(a, Role::Sender, sender_key);
    (s, r.join().unwrap())
}

#[test]
fn messages_cross_both_ways_under_the_key() {
    let (s, r) = pair(KEY, KEY);
    let (mut s, mut r) = (s.unwrap(), r.unwrap());
    let pages = Message::Pages {
        first_page: 42,
        data: vec![0xab; 256 * PAGE],
    };
    let want = pages.clone();
    // The receiver reads while the sender writes (a 1 MiB frame fills the socket).
    let rx = std::thread::spawn(move || {
        assert_eq!(r.recv().unwrap(), Message::Config(b"{}".to_vec()));
        assert_eq!(r.recv().unwrap(), want);
        r.send(&Message::Resumed).unwrap();
        assert!(matches!(r.recv(), Err(Error::Closed)));
        r.received_bytes()
    });
    s.send(&Message::Config(b"{}".to_vec())).unwrap();
    s.send(&pages).unwrap();
    assert_eq!(s.recv().unwrap(), Message::Resumed);
    let sent = s.sent_bytes();
    drop(s);
    assert_eq!(rx.join().unwrap(), sent, "both ends count the same bytes");
}

#[test]
fn a_peer_without_the_key_is_refused_at_the_handshake() {
    let (s, r) = pair(KEY, b"another key, just as long");
    assert!(matches!(s, Err(Error::Authentication)), "{:?}", s.err());
    assert!(matches!(r, Err(Error::Authentication)), "{:?}", r.err());
    let (a, _b) = UnixStream::pair().unwrap();
    assert!(matches!(
        Channel::handshake(a, Role::Sender, b"short"),
        Err(Error::ShortKey)
    ));
}

#[test]
fn two_senders_or_a_stranger_are_refused() {
    let (a, b) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || Channel::handshake(b, Role::Sender, KEY).err());
    let e = Channel::handshake(a, Role::Sender, KEY).err();
    assert!(matches!(e, Some(Error::SameRole("sender"))), "{e:?}");
    assert!(matches!(t.join().unwrap(), Some(Error::SameRole("sender"))));
    let (mut a, b) = UnixStream::pair().unwrap();
    a.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nxxxxxxxxxxxxxxxxxxxxxxxx")
        .unwrap();
    let e = Channel::handshake(b, Role::Receiver, KEY).err();
    assert!(matches!(e, Some(Error::NotKeel)), "{e:?}");
    let (mut a, b) = UnixStream::pair().unwrap();
    let mut hello = [0u8; GREETING];
    hello[..8].copy_from_slice(MAGIC);
    hello[8..12].copy_from_slice(&99u32.to_le_bytes());
    a.write_all(&hello).unwrap();
    let e = Channel::handshake(b, Role::Receiver, KEY).err();
    assert!(matches!(e, Some(Error::Version(99))), "{e:?}");
}

/// A man in the middle that relays bytes and changes them with `tamper` (given the offset of
/// each chunk in the sender → receiver direction).
fn relayed(
    tamper: impl Fn(usize, &mut Vec<u8>) + Send + 'static,
) -> (
    Channel<UnixStream>,
    std::thread::JoinHandle<Result<Vec<Message>>>,
) {
    let (s_end, mid_a) = UnixStream::pair().unwrap();
    let (mid_b, r_end) = UnixStream::pair().unwrap();
    // receiver → sender: untouched.
    let (mut back_from, mut back_to) = (mid_b.try_clone().unwrap(), mid_a.try_clone().unwrap());
    std::thread::spawn(move || std::io::copy(&mut back_from, &mut back_to));
    // sender → receiver: through `tamper`.
    let (mut from, mut to) = (mid_a, mid_b);
    std::thread::spawn(move || {
        let mut off = 0;
        let mut buf = vec![0u8; 65536];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut chunk = buf[..n].to_vec();
            tamper(off, &mut chunk);
            off += n;
            if to.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
    let r = std::thread::spawn(move || {
        let mut ch = Channel::handshake(r_end, Role::Receiver, KEY)?;
        let mut got = Vec::new();
        loop {
            match ch.recv() {
                Ok(m) => got.push(m),
                Err(Error::Closed) => return Ok(got),
                Err(e) => return Err(e),
            }
        }
    });
    let s = Channel::handshake(s_end, Role::Sender, KEY).unwrap();
    (s, r)
}

fn send_some(mut s: Channel<UnixStream>) {
    for i in 0..4 {
        let _ = s.send(&Message::Pages {
            first_page: i,
            data: vec![i as u8; 4 * PAGE],
        });
    }
    let _ = s.flush();
}

#[test]
fn a_flipped_byte_anywhere_after_the_greeting_ends_the_stream() {
    // 48 greeting + 4 + 32 + 16 transcript frame: then the first message frame.
    for at in [GREETING + 10, GREETING + 60, GREETING + 52 + 48 + 4 + 5000] {
        let (s, r) = relayed(move |off, c| {
            if (off..off + c.len()).contains(&at) {
                c[at - off] ^= 0x01;
            }
        });
        send_some(s);
        let e = r.join().unwrap().err();
        assert!(
            matches!(e, Some(Error::Authentication)),
            "flip at {at}: {e:?}"
        );
    }
}

#[test]
fn a_truncated_stream_is_told_from_a_closed_one() {
    // Cut the stream in the middle of the second message.
    let cut = GREETING + 52 + (4 + 16 + 9 + 4 * PAGE) + 100;
    let (s, r) = relayed(move |off, c| {
        if off + c.len() > cut {
            c.truncate(cut.saturating_sub(off));
        }
    });
    send_some(s);
    let e = r.join().unwrap().err();
    assert!(matches!(e, Some(Error::Truncated)), "{e:?}");
}

#[test]
fn oversized_frames_are_refused_before_any_allocation() {
    let (s, r) = relayed(|off, c| {
        // The first message frame's length field: claim 3 GiB.
        let at = GREETING + 52;
        if (off..off + c.len()).contains(&at) && c.len() >= at - off + 4 {
            c[at - off..at - off + 4].copy_from_slice(&0xc000_0000u32.to_le_bytes());
        }
    });
    send_some(s);
    let e = r.join().unwrap().err();
    assert!(
        matches!(e, Some(Error::FrameTooLarge(0xc000_0000))),
        "{e:?}"
    );
}

#[test]
fn split_directions_go_on_from_the_handshake_and_run_side_by_side() {
    let (s, r) = pair(KEY, KEY);
    let (s, r) = (s.unwrap(), r.unwrap());
    let (mut s_tx, mut s_rx) = s.split().unwrap();
    let (mut r_tx, mut r_rx) = r.split().unwrap();
    // One side streams pages while the other asks for more on the same connection, each
    // direction on a thread of its own.
    let pages = std::thread::spawn(move || {
        for i in 0..64u64 {
            s_tx.send_pages(i, &vec![i as u8; 16 * PAGE]).unwrap();
        }
        s_tx.send(&Message::Go).unwrap();
        s_tx.sent_bytes()
    });
    let asks = std::thread::spawn(move || {
        for i in 0..64u32 {
            r_tx.send(&Message::RoundEnd { round: i, pages: 0 })
                .unwrap();
        }
        r_tx.send(&Message::Resumed).unwrap();
    });
    let mut got = 0u64;
    loop {
        match r_rx.recv().unwrap() {
            Message::Pages { first_page, data } => {
                assert_eq!(first_page, got);
                assert!(data.iter().all(|b| *b == got as u8));
                got += 1;
            }
            Message::Go => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, 64);
    for i in 0..64u32 {
        assert_eq!(
            s_rx.recv().unwrap(),
            Message::RoundEnd { round: i, pages: 0 }
        );
    }
    assert_eq!(s_rx.recv().unwrap(), Message::Resumed);
    asks.join().unwrap();
    assert_eq!(pages.join().unwrap(), r_rx.received_bytes());
}
