use super::*;
use keel_migration::Role;
use std::os::unix::net::UnixStream;

const KEY: &[u8] = b"the key both ends of this test hold";
const SIZE: u64 = 64 << 20;

fn channels() -> (Channel<UnixStream>, Channel<UnixStream>) {
    let (a, b) = UnixStream::pair().unwrap();
    let r = std::thread::spawn(move || Channel::handshake(b, Role::Receiver, KEY).unwrap());
    let s = Channel::handshake(a, Role::Sender, KEY).unwrap();
    (s, r.join().unwrap())
}

/// Receives until `Resumed` (the test's end marker), applying pages as the receiver does;
/// returns the messages' page counts.
fn receive(mut r: Channel<UnixStream>, mem: GuestMemoryMmap) -> (GuestMemoryMmap, Vec<u64>) {
    let mut counts = Vec::new();
    let filler = Filler::new(&mem);
    loop {
        match r.recv_incoming().unwrap() {
            Incoming::Other(Message::Resumed) => break,
            m => counts.push(filler.apply(&m).unwrap()),
        }
    }
    drop(filler);
    (mem, counts)
}

/// One message applied by a filler of its own.
fn apply(mem: &GuestMemoryMmap, m: &Message) -> Result<u64, String> {
    let m = match m {
        Message::Pages { first_page, data } => Incoming::Pages {
            first_page: *first_page,
            data,
        },
        other => Incoming::Other(other.clone()),
    };
    Filler::new(mem).apply(&m)
}

#[test]
fn every_page_arrives_and_zero_pages_travel_as_ranges() {
    let src = crate::memory::allocate(SIZE).unwrap().all;
    let marks = [0x1000u64, 0x2000, 0x3000, 0x10_0000, 0x200_0000, SIZE - 8];
    for a in marks {
        src.write_obj(a | 0xabc, GuestAddress(a)).unwrap();
    }
    // Stale data on the destination where the source is zero must go.
    let dst = crate::memory::allocate(SIZE).unwrap().all;
    dst.write_obj(0xdeadu64, GuestAddress(0x50_0000)).unwrap();
    let (mut s, r) = channels();
    let rx = std::thread::spawn(move || receive(r, dst));
    let sent = send(&mut s, &src, all_pages(&src)).unwrap();
    s.send(&Message::Resumed).unwrap();
    let (dst, counts) = rx.join().unwrap();
    assert_eq!(
        sent.data_pages, 6,
        "three pages in a row, three alone: {sent:?}"
    );
    let ram_pages: u64 = src.iter().map(|r| r.len()).sum::<u64>() / PAGE as u64;
    assert_eq!(sent.data_pages + sent.zero_pages, ram_pages);
    assert_eq!(counts.iter().sum::<u64>(), ram_pages);
    // Few messages: a run of three pages, then zero ranges between the rest.
    assert!(counts.len() < 16, "{counts:?}");
    for a in marks {
        assert_eq!(dst.read_obj::<u64>(GuestAddress(a)).unwrap(), a | 0xabc);
    }
    assert_eq!(dst.read_obj::<u64>(GuestAddress(0x50_0000)).unwrap(), 0);
}

#[test]
fn dirty_pages_only_and_long_runs_split() {
    let src = crate::memory::allocate(SIZE).unwrap().all;
    for p in 0x1000u64..0x1000 + 600 {
        src.write_obj(p, GuestAddress(p * PAGE as u64)).unwrap();
    }
    let dst = crate::memory::allocate(SIZE).unwrap().all;
    let (mut s, r) = channels();
    let rx = std::thread::spawn(move || receive(r, dst));
    let dirty: Vec<u64> = (0x1000u64..0x1000 + 600).step_by(1).collect();
    let sent = send(&mut s, &src, dirty).unwrap();
    s.send(&Message::Resumed).unwrap();
    let (dst, counts) = rx.join().unwrap();
    assert_eq!(sent.data_pages, 600);
    assert_eq!(counts, [256, 256, 88], "runs of at most 256 pages");
    assert_eq!(
        dst.read_obj::<u64>(GuestAddress(0x1100 * PAGE as u64))
            .unwrap(),
        0x1100
    );
    // Out of order is the caller's bug, refused.
    let (mut s2, _r2) = channels();
    assert!(send(&mut s2, &src, [5u64, 4])
        .unwrap_err()
        .contains("out of order"));
}

#[test]
fn pages_outside_guest_ram_are_refused() {
    let mem = crate::memory::allocate(SIZE).unwrap().all;
    let page = vec![1u8; PAGE];
    let hole = keel_arch::layout::ram_ranges(SIZE)[0].size / PAGE as u64; // the VGA hole
    for (first, n) in [
        (SIZE / PAGE as u64, 1u64),
        (hole, 1),
        (hole - 1, 2),
        (u64::MAX / 2, 1),
    ] {
        let m = Message::Pages {
            first_page: first,
            data: page.repeat(n as usize),
        };
        assert!(apply(&mem, &m).is_err(), "pages {first:#x}+{n}");
        let z = Message::Zeros {
            first_page: first,
            count: n,
        };
        assert!(apply(&mem, &z).is_err(), "zeros {first:#x}+{n}");
    }
    assert!(apply(
        &mem,
        &Message::Zeros {
            first_page: 0,
            count: u64::MAX
        }
    )
    .is_err());
    assert!(apply(&mem, &Message::Resumed).is_err());
    // Nothing was written by the refused ones.
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress((hole - 1) * PAGE as u64))
            .unwrap(),
        0
    );
}
