//! Hostile guests: malformed transmit and receive chains are dropped, never fatal.

use super::*;

#[test]
fn hostile_tx_chains_are_dropped_and_the_device_carries_on() {
    let Some(mut rig) = Rig::new("hostile_tx_chains_are_dropped_and_the_device_carries_on", 0)
    else {
        return;
    };
    let hdr = TX_BUFS;
    let data = TX_BUFS + 0x100;
    rig.write(data, &frame(0, 60));
    let end = MEM_SIZE as u64;
    let q = &mut rig.tx;
    // Outside RAM; straddling its end; a short header; a writable buffer; a 4 GiB length.
    q.chain(0, &[(end + 0x1000, 100, false)]);
    q.chain(1, &[(end - 16, 64, false)]);
    q.chain(2, &[(hdr, 8, false)]);
    q.chain(3, &[(hdr, 12, false), (data, 60, true)]);
    q.chain(5, &[(hdr, 0xffff_fff0, false)]);
    // A loop; a `next` outside the table; an indirect table that loops; one that nests.
    q.desc(6, hdr, 12, NEXT, 7);
    q.desc(7, data, 60, NEXT, 6);
    q.desc(8, hdr, 12, NEXT, 999);
    let table = TX_BUFS + 0x8000;
    let mut t = Vec::new();
    for (addr, len, flags, next) in [
        (hdr, 12u32, NEXT, 1u16),
        (data, 60, NEXT, 0),
        (hdr, 32, INDIRECT, 0),
    ] {
        t.extend(u64::to_le_bytes(addr));
        t.extend(u32::to_le_bytes(len));
        t.extend(u16::to_le_bytes(flags));
        t.extend(u16::to_le_bytes(next));
    }
    rig.write(table, &t);
    let q = &mut rig.tx;
    q.desc(9, table, 32, INDIRECT, 0);
    q.desc(10, table + 32, 16, INDIRECT, 0);
    // A frame far beyond 64 KiB, in RAM.
    q.chain(11, &[(hdr, 12, false), (data, 70_000, false)]);
    for head in [0, 1, 2, 3, 5, 6, 8, 9, 10, 11] {
        q.publish(head);
    }
    // A head outside the descriptor table.
    q.publish(300);
    rig.kick_tx();
    rig.tx.wait_used(10);
    for i in 0..10 {
        assert_eq!(rig.tx.used(i).1, 0);
    }
    wait_for("all hostile chains counted", || {
        rig.counters().tx_dropped == 11
    });

    // Still working.
    let good = frame(9, 80);
    rig.post_tx(20, TX_BUFS + 0x2_0000, &good);
    rig.kick_tx();
    rig.tx.wait_used(11);
    assert_eq!(rig.sock.recv_tagged(9), good);
    let c = rig.counters();
    assert_eq!((c.tx_frames, c.tx_dropped), (1, 11));
    rig.assert_healthy();
}

#[test]
fn hostile_rx_chains_are_returned_unused_and_the_device_carries_on() {
    let Some(mut rig) = Rig::new(
        "hostile_rx_chains_are_returned_unused_and_the_device_carries_on",
        MRG,
    ) else {
        return;
    };
    let end = MEM_SIZE as u64;
    let q = &mut rig.rx;
    // Read-only; outside RAM; a loop; 4 GiB; zero-length; then a good one.
    q.chain(0, &[(RX_BUFS, 2048, false)]);
    q.chain(1, &[(end + 0x1000, 2048, true)]);
    q.desc(2, RX_BUFS, 1024, WRITE | NEXT, 3);
    q.desc(3, RX_BUFS + 0x1000, 1024, WRITE | NEXT, 2);
    q.chain(4, &[(RX_BUFS, 0xffff_0000, true)]);
    q.chain(5, &[(RX_BUFS, 0, true)]);
    q.chain(6, &[(RX_BUFS + 0x4000, 2048, true)]);
    for head in [0, 1, 2, 4, 5, 6] {
        q.publish(head);
    }
    rig.kick_rx();
    let f = frame(1, 90);
    rig.sock.send(&f);
    rig.rx.wait_used(6);
    for (i, head) in [0u32, 1, 2, 4, 5].into_iter().enumerate() {
        assert_eq!(rig.rx.used(i as u16), (head, 0));
    }
    assert_eq!(rig.rx.used(5), (6, 102));
    assert_eq!(rig.read(RX_BUFS + 0x4000 + 12, 90), f);

    // A bad chain between two good ones of a merged frame goes back after them.
    let q = &mut rig.rx;
    q.chain(10, &[(RX_BUFS + 0x8000, 512, true)]);
    q.chain(11, &[(RX_BUFS + 0x9000, 512, false)]);
    q.chain(12, &[(RX_BUFS + 0xa000, 512, true)]);
    for head in [10, 11, 12] {
        q.publish(head);
    }
    rig.kick_rx();
    let f = frame(2, 700);
    rig.sock.send(&f);
    rig.rx.wait_used(9);
    assert_eq!(rig.rx.used(6), (10, 512));
    assert_eq!(rig.rx.used(7), (12, 200));
    assert_eq!(rig.rx.used(8), (11, 0));
    assert_eq!(num_buffers(&rig, RX_BUFS + 0x8000), 2);
    let mut got = rig.read(RX_BUFS + 0x8000 + 12, 500);
    got.extend(rig.read(RX_BUFS + 0xa000, 200));
    assert_eq!(got, f);

    let c = rig.counters();
    assert_eq!((c.rx_frames, c.rx_bad_buffers, c.rx_dropped), (2, 6, 0));
    rig.assert_healthy();
}
