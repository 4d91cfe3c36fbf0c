//! The kit's snapshot/restore counter guest (`test=snapcount`, guest/kit/snapcount.c) run
//! straight through, no snapshot: what it prints and what it leaves on its disk are exactly
//! what the host-side checks in `keel_guest_kit` (used by the snapshot tests) expect.

use super::virtio::{expect_clean, run_in_child, vm, TempDisk};
use keel_guest_kit::{
    check_snapcount_disk, parse_snapcount_line, snapcount_slot_tsc, SNAPCOUNT_SECTOR,
};
use libtest_mimic::{Failed, Trial};

const SECS: u64 = 2;
const SLOTS: u64 = 16;
/// 64 KiB, zeroed: the slots, then sectors the guest must not touch.
const DISK_SECTORS: usize = 128;

fn counts_and_disk() -> Result<(), Failed> {
    let disk = TempDisk::with_bytes("snapcount", &vec![0u8; DISK_SECTORS * SNAPCOUNT_SECTOR])?;
    let cmdline = format!("test=snapcount secs={SECS} slots={SLOTS}");
    let r = run_in_child(&vm(&cmdline, vec![disk.config()], false))?;
    let last = SECS * 10;
    expect_clean(
        &r,
        "snapcount",
        &[
            &format!("KIT: snapcount start slots={SLOTS} secs={SECS}"),
            &format!("KIT: snapcount done count={last}"),
        ],
    )?;
    // One line per completed write, counts 1, 2, ... with the TSC strictly increasing.
    let lines: Vec<(u64, u64)> = r.serial.lines().filter_map(parse_snapcount_line).collect();
    let counts: Vec<u64> = lines.iter().map(|&(c, _)| c).collect();
    if counts != (1..=last).collect::<Vec<u64>>() {
        return Err(format!("counts are {counts:?}, expected 1..={last}\n{}", r.report()).into());
    }
    if let Some(w) = lines.windows(2).find(|w| w[1].1 <= w[0].1) {
        return Err(format!("the TSC did not move forward: {w:?}\n{}", r.report()).into());
    }
    // ~10 Hz: the last count comes on the guest's 20th tick, 2 s after it armed its timer.
    if r.wall_ms < last * 100 {
        return Err(format!(
            "{last} ticks took {} ms: the guest is not ticking at 10 Hz\n{}",
            r.wall_ms,
            r.report()
        )
        .into());
    }
    let img = std::fs::read(disk.path()).map_err(|e| e.to_string())?;
    if img.len() != DISK_SECTORS * SNAPCOUNT_SECTOR {
        return Err(format!("the image is now {} bytes", img.len()).into());
    }
    check_snapcount_disk(&img, last, SLOTS)?;
    // Each slot's TSC is the one the guest printed for the count it holds.
    for &(c, tsc) in lines.iter().filter(|&&(c, _)| c + SLOTS > last) {
        let got = snapcount_slot_tsc(&img, c % SLOTS);
        if got != Some(tsc) {
            return Err(format!(
                "slot {} has tsc {got:?}, count {c} printed {tsc}",
                c % SLOTS
            )
            .into());
        }
    }
    let tail = SLOTS as usize * SNAPCOUNT_SECTOR;
    if let Some(i) = img[tail..].iter().position(|&b| b != 0) {
        return Err(format!("byte {} past the slots was written", tail + i).into());
    }
    Ok(())
}

pub fn trials() -> Vec<Trial> {
    vec![Trial::test(
        "snapcount_guest_counts_at_10hz_and_its_disk_checks_out",
        counts_and_disk,
    )]
}
