//! What a migration receiver reads from the network: (1) the raw bytes of a connection, as
//! the peer of a receiver-side channel (greeting checks, frame lengths, authentication, for
//! someone without the key); (2) decrypted frames, as `Message::decode` sees them (what a
//! peer holding the key could send). The first input byte picks the layer. Any input must end
//! in an error or a bounded message, never a panic or an unbounded allocation.
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

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    if which & 1 == 0 {
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
