//! The host's side of the kit's `test=snapcount` guest (guest/kit/snapcount.c): parsing its
//! progress lines and checking what it left on its disk.
//!
//! The guest counts at ~10 Hz; count `n` is written to sector `n % slots` of its first
//! virtio-blk disk as 512 bytes: `b"KEELSNAP"`, `n` (u64 LE), the guest's TSC at that tick
//! (u64 LE), then words 3..=63 = `n * 0x9e3779b97f4a7c15 + w` (u64 LE, wrapping). After each
//! completed write it prints `KIT: count=<n> tsc=<t>` (decimal).

/// Bytes per sector (and per slot).
pub const SNAPCOUNT_SECTOR: usize = 512;
/// The first eight bytes of every sector the guest wrote.
pub const SNAPCOUNT_MAGIC: &[u8; 8] = b"KEELSNAP";

const WORDS: usize = SNAPCOUNT_SECTOR / 8;
const FILL_MUL: u64 = 0x9e37_79b9_7f4a_7c15;

/// Word `w` (3..=63) of the sector of count `n`.
fn fill_word(n: u64, w: usize) -> u64 {
    n.wrapping_mul(FILL_MUL).wrapping_add(w as u64)
}

/// The sector the guest writes for count `count` at TSC `tsc`.
pub fn snapcount_sector(count: u64, tsc: u64) -> [u8; SNAPCOUNT_SECTOR] {
    let mut s = [0u8; SNAPCOUNT_SECTOR];
    for (w, word) in s.chunks_exact_mut(8).enumerate() {
        let v = match w {
            0 => u64::from_le_bytes(*SNAPCOUNT_MAGIC),
            1 => count,
            2 => tsc,
            _ => fill_word(count, w),
        };
        word.copy_from_slice(&v.to_le_bytes());
    }
    s
}

/// `(count, tsc)` from a guest line `KIT: count=<n> tsc=<t>` (trailing whitespace allowed);
/// `None` for any other line.
pub fn parse_snapcount_line(line: &str) -> Option<(u64, u64)> {
    let rest = line.trim_end().strip_prefix("KIT: count=")?;
    let (count, tsc) = rest.split_once(" tsc=")?;
    let dec = |s: &str| {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse::<u64>().ok()
    };
    Some((dec(count)?, dec(tsc)?))
}

/// The count slot `slot` must hold after the guest completed exactly counts 1..=last_count:
/// the largest `c <= last_count` with `c % slots == slot`, or `None` when no count hit it.
fn expected_count(slot: u64, last_count: u64, slots: u64) -> Option<u64> {
    if slot >= slots || last_count < slot {
        return None;
    }
    let c = last_count - (last_count - slot) % slots;
    (c > 0).then_some(c)
}

/// The TSC recorded in slot `slot` of `image`, if that sector starts with the magic.
pub fn snapcount_slot_tsc(image: &[u8], slot: u64) -> Option<u64> {
    let at = usize::try_from(slot).ok()?.checked_mul(SNAPCOUNT_SECTOR)?;
    let s = image.get(at..at.checked_add(SNAPCOUNT_SECTOR)?)?;
    if s.get(..8)? != SNAPCOUNT_MAGIC {
        return None;
    }
    Some(u64::from_le_bytes(s.get(16..24)?.try_into().ok()?))
}

/// Checks that the first `slots` sectors of `image` are what the guest leaves after
/// completing exactly counts 1..=`last_count` (and nothing after): slot `s` holds the largest
/// `c <= last_count` with `c % slots == s` (magic, count and fill pattern; the TSC field is
/// not checked), and a slot no count hit is all zeros (the image must start zeroed). Sectors
/// past `slots` are not looked at. The error names the first slot that differs and how.
pub fn check_snapcount_disk(image: &[u8], last_count: u64, slots: u64) -> Result<(), String> {
    if slots < 2 {
        return Err(format!("slots={slots}: the guest needs at least 2 slots"));
    }
    let need = usize::try_from(slots)
        .ok()
        .and_then(|s| s.checked_mul(SNAPCOUNT_SECTOR))
        .ok_or_else(|| format!("slots={slots} is too large for this host"))?;
    if image.len() < need {
        return Err(format!(
            "the image is {} bytes, too small for {slots} slots ({need} bytes)",
            image.len()
        ));
    }
    for (slot, sector) in (0..slots).zip(image.chunks_exact(SNAPCOUNT_SECTOR)) {
        let where_ = format!(
            "slot {slot} (byte offset {})",
            slot as usize * SNAPCOUNT_SECTOR
        );
        let word = |w: usize| -> u64 {
            let mut b = [0u8; 8];
            b.copy_from_slice(&sector[8 * w..8 * w + 8]);
            u64::from_le_bytes(b)
        };
        let Some(want) = expected_count(slot, last_count, slots) else {
            if let Some(i) = sector.iter().position(|&b| b != 0) {
                let what = if sector.starts_with(SNAPCOUNT_MAGIC) {
                    format!("holds count {}", word(1))
                } else {
                    format!("has byte {i} = {:#04x}", sector[i])
                };
                return Err(format!(
                    "{where_}: {what}, but no count up to {last_count} writes it: it must be untouched (all zeros)"
                ));
            }
            continue;
        };
        if !sector.starts_with(SNAPCOUNT_MAGIC) {
            let lost = if sector.iter().all(|&b| b == 0) {
                " (never written: the write was lost)".to_string()
            } else {
                String::new()
            };
            return Err(format!(
                "{where_}: no KEELSNAP magic (first bytes {:02x?}); expected count {want}{lost}",
                &sector[..8]
            ));
        }
        let got = word(1);
        if got != want {
            let why = if got < want {
                "an older count: a later write was lost or rolled back"
            } else {
                "a newer count than the guest completed: a write after the snapshot leaked in"
            };
            return Err(format!(
                "{where_}: holds count {got}, expected {want} ({why})"
            ));
        }
        if let Some(w) = (3..WORDS).find(|&w| word(w) != fill_word(want, w)) {
            return Err(format!(
                "{where_}: count {want} is right but word {w} is {:#018x}, expected {:#018x} (corrupted sector)",
                word(w),
                fill_word(want, w)
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An image after counts 1..=last with `slots` slots and `extra` zero sectors after them.
    fn image(last: u64, slots: u64, extra: usize) -> Vec<u8> {
        let mut img = vec![0u8; (slots as usize + extra) * SNAPCOUNT_SECTOR];
        for c in 1..=last {
            let at = (c % slots) as usize * SNAPCOUNT_SECTOR;
            img[at..at + SNAPCOUNT_SECTOR].copy_from_slice(&snapcount_sector(c, 1000 + c));
        }
        img
    }

    #[test]
    fn sector_layout() {
        let s = snapcount_sector(5, 0x1122);
        assert_eq!(&s[..8], b"KEELSNAP");
        assert_eq!(u64::from_le_bytes(s[8..16].try_into().unwrap()), 5);
        assert_eq!(u64::from_le_bytes(s[16..24].try_into().unwrap()), 0x1122);
        let w3 = 5u64.wrapping_mul(FILL_MUL).wrapping_add(3);
        assert_eq!(u64::from_le_bytes(s[24..32].try_into().unwrap()), w3);
        assert_eq!(u64::from_le_bytes(*SNAPCOUNT_MAGIC), 0x5041_4e53_4c45_454b);
    }

    #[test]
    fn parses_count_lines() {
        assert_eq!(parse_snapcount_line("KIT: count=1 tsc=123"), Some((1, 123)));
        assert_eq!(
            parse_snapcount_line("KIT: count=18446744073709551615 tsc=0\r"),
            Some((u64::MAX, 0))
        );
        for bad in [
            "KIT: count= tsc=1",
            "KIT: count=1 tsc=",
            "KIT: count=1",
            "KIT: count=-1 tsc=2",
            "KIT: count=1 tsc=2 extra",
            "KIT: count=+1 tsc=2",
            "KIT: count=18446744073709551616 tsc=1",
            " KIT: count=1 tsc=2",
            "KIT: snapcount start slots=128 secs=0",
            "KIT-PASS snapcount",
            "",
        ] {
            assert_eq!(parse_snapcount_line(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn expected_counts() {
        assert_eq!(expected_count(0, 0, 4), None);
        assert_eq!(expected_count(1, 0, 4), None);
        assert_eq!(expected_count(1, 1, 4), Some(1));
        assert_eq!(expected_count(2, 1, 4), None);
        assert_eq!(expected_count(0, 3, 4), None);
        assert_eq!(expected_count(0, 4, 4), Some(4));
        assert_eq!(expected_count(1, 10, 4), Some(9));
        assert_eq!(expected_count(2, 10, 4), Some(10));
        assert_eq!(expected_count(3, 10, 4), Some(7));
        assert_eq!(expected_count(4, 10, 4), None);
    }

    #[test]
    fn consistent_images_pass() {
        for (last, slots) in [(0, 2), (1, 2), (5, 128), (20, 16), (37, 8), (16, 16)] {
            let img = image(last, slots, 3);
            check_snapcount_disk(&img, last, slots)
                .unwrap_or_else(|e| panic!("{last}/{slots}: {e}"));
        }
        // Sectors past the slots are not looked at.
        let mut img = image(20, 16, 2);
        let n = img.len();
        img[n - 1] = 0xff;
        check_snapcount_disk(&img, 20, 16).unwrap();
    }

    #[test]
    fn corrupted_sector_is_refused() {
        let mut img = image(20, 16, 0);
        img[3 * SNAPCOUNT_SECTOR + 100] ^= 1; // slot 3 holds count 19
        let e = check_snapcount_disk(&img, 20, 16).unwrap_err();
        assert!(
            e.contains("slot 3") && e.contains("word 12") && e.contains("corrupted"),
            "{e}"
        );
    }

    #[test]
    fn lost_and_extra_writes_are_refused() {
        let img = image(20, 16, 0);
        // The guest completed 21 writes but the image has only 20: 21 is lost.
        let e = check_snapcount_disk(&img, 21, 16).unwrap_err();
        assert!(
            e.contains("slot 5") && e.contains("holds count 5, expected 21"),
            "{e}"
        );
        assert!(e.contains("lost or rolled back"), "{e}");
        // The guest completed 19, but 20 is on disk: a write leaked in.
        let e = check_snapcount_disk(&img, 19, 16).unwrap_err();
        assert!(
            e.contains("slot 4") && e.contains("holds count 20, expected 4"),
            "{e}"
        );
        // A count that never reached an untouched slot.
        let img = image(5, 16, 0);
        let e = check_snapcount_disk(&img, 6, 16).unwrap_err();
        assert!(e.contains("slot 6") && e.contains("never written"), "{e}");
        // An untouched slot that is not zero.
        let mut img = image(5, 16, 0);
        img[9 * SNAPCOUNT_SECTOR + 7] = 1;
        let e = check_snapcount_disk(&img, 5, 16).unwrap_err();
        assert!(e.contains("slot 9") && e.contains("untouched"), "{e}");
        // A bad magic.
        let mut img = image(5, 16, 0);
        img[2 * SNAPCOUNT_SECTOR] = b'X';
        let e = check_snapcount_disk(&img, 5, 16).unwrap_err();
        assert!(
            e.contains("slot 2") && e.contains("no KEELSNAP magic"),
            "{e}"
        );
    }

    #[test]
    fn bad_arguments_are_refused() {
        let img = image(5, 16, 0);
        assert!(check_snapcount_disk(&img, 5, 0)
            .unwrap_err()
            .contains("at least 2"));
        assert!(check_snapcount_disk(&img, 5, 1)
            .unwrap_err()
            .contains("at least 2"));
        let e = check_snapcount_disk(&img[..100], 5, 16).unwrap_err();
        assert!(e.contains("too small"), "{e}");
        let e = check_snapcount_disk(&img, 5, u64::MAX).unwrap_err();
        assert!(e.contains("too large") || e.contains("too small"), "{e}");
    }

    #[test]
    fn slot_tsc() {
        let img = image(20, 16, 0);
        assert_eq!(snapcount_slot_tsc(&img, 4), Some(1020));
        assert_eq!(snapcount_slot_tsc(&image(2, 16, 0), 9), None);
        assert_eq!(snapcount_slot_tsc(&img, 16), None);
        assert_eq!(snapcount_slot_tsc(&img, u64::MAX), None);
    }
}
