//! What a migration receiver reads from the network: (0) the raw bytes of a connection, as
//! the peer of a receiver-side channel (greeting checks, frame lengths, authentication, for
//! someone without the key); (1) one decrypted frame, as `Message::decode` sees it; (2) a
//! whole stream from a peer holding the key: frames (each a u16 LE length and its plaintext)
//! sealed by a real sender-side channel and taken by the receiver's intake as `keel receive`
//! takes them (the offer, guest pages into memory, the state). The first input byte picks
//! the layer. Any input must end in an error or a bounded message, never a panic, a hang or
//! an unbounded allocation.
#![no_main]

use keel_migration::{Channel, Message, Role, MAX_RUN_PAGES, PAGE};
use libfuzzer_sys::fuzz_target;
use std::io::{Read, Write};

/// A connection whose peer sends `input` and swallows whatever it is sent.
struct Wire<'a> {
    input: &'a [u8],
}

impl Read for Wire<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Wire<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const KEY: &[u8] = b"the fuzzer's migration key";

/// Plays a sender holding the key: seals each frame of `input` and sends it to a receiver
/// running the real intake, then hangs up.
fn intake(input: &[u8]) {
    let (a, b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    let frames: Vec<Vec<u8>> = {
        let mut v = Vec::new();
        let mut rest = input;
        while rest.len() >= 2 {
            let n = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
            let end = (2 + n).min(rest.len());
            v.push(rest[2..end].to_vec());
            rest = &rest[end..];
        }
        v
    };
    let sender = std::thread::spawn(move || {
        let Ok(mut ch) = Channel::handshake(a, Role::Sender, KEY) else {
            return;
        };
        for f in frames {
            if ch.send_frame(&f).is_err() {
                return;
            }
        }
    });
    // Bounded: the sender hangs up after its last frame, so every read ends.
    if let Ok(mut ch) = Channel::handshake(b, Role::Receiver, KEY) {
        let _ = keel_vmm::migration::fuzz_intake(&mut ch);
    }
    let _ = sender.join();
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    if which % 3 == 2 {
        intake(rest);
    } else if which % 3 == 0 {
        // Without the key nothing gets past the first frame.
        let wire = Wire { input: rest };
        if let Ok(mut ch) = Channel::handshake(wire, Role::Receiver, b"the fuzzer's migration key") {
            let _ = ch.recv();
            panic!("a stream without the key passed the handshake");
        }
    } else {
        match Message::decode(rest) {
            Ok(Message::Pages { data, .. }) => {
                assert!(!data.is_empty() && data.len() % PAGE == 0);
                assert!(data.len() / PAGE <= MAX_RUN_PAGES);
            }
            Ok(m) => {
                // What decodes, decodes again from its encoding to the same message.
                assert_eq!(Message::decode(&m.encode()).ok(), Some(m));
            }
            Err(_) => {}
        }
    }
});
