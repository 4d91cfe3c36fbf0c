//! MC146818-compatible CMOS RTC and NVRAM at ports 0x70 (index) / 0x71 (data).
//!
//! The clock follows the host's wall clock (UTC) plus whatever offset the guest sets by
//! writing the time registers; the NVRAM carries the memory sizes PC firmware reports there.

use crate::BusDevice;
use std::time::{SystemTime, UNIX_EPOCH};

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

const REG_B_24H: u8 = 0x02;
const REG_B_BINARY: u8 = 0x04;
const REG_D_VALID: u8 = 0x80;

/// Source of "now" in seconds since the epoch; replaceable in tests.
pub type Clock = fn() -> i64;

fn host_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub struct Cmos {
    index: u8,
    nvram: [u8; 128],
    /// Guest time minus host time, in seconds.
    offset: i64,
    clock: Clock,
}

impl Cmos {
    pub const BASE: u16 = 0x70;
    pub const LEN: u16 = 2;

    /// A CMOS for a VM with `low_mem` bytes of RAM below 4 GiB and `high_mem` above it.
    pub fn new(low_mem: u64, high_mem: u64) -> Self {
        Self::with_clock(low_mem, high_mem, host_now)
    }

    pub fn with_clock(low_mem: u64, high_mem: u64, clock: Clock) -> Self {
        let mut nvram = [0u8; 128];
        nvram[REG_A as usize] = 0x26; // 32.768 kHz time base, 1024 Hz periodic rate
        nvram[REG_B as usize] = REG_B_24H;
        nvram[REG_D as usize] = REG_D_VALID;
        // Base memory (KiB): 640.
        nvram[0x15] = 0x80;
        nvram[0x16] = 0x02;
        // Extended memory between 1 MiB and 64 MiB, in KiB.
        let ext_kib = (low_mem.saturating_sub(1 << 20) >> 10).min(0xfc00) as u16;
        nvram[0x17..0x19].copy_from_slice(&ext_kib.to_le_bytes());
        nvram[0x30..0x32].copy_from_slice(&ext_kib.to_le_bytes());
        // Memory between 16 MiB and 4 GiB, in 64 KiB blocks.
        let above_16m = (low_mem.saturating_sub(16 << 20) >> 16).min(0xffff) as u16;
        nvram[0x34..0x36].copy_from_slice(&above_16m.to_le_bytes());
        // Memory above 4 GiB, in 64 KiB blocks (24 bits).
        let high = (high_mem >> 16).min(0xff_ffff) as u32;
        nvram[0x5b..0x5e].copy_from_slice(&high.to_le_bytes()[..3]);
        Cmos {
            index: 0,
            nvram,
            offset: 0,
            clock,
        }
    }

    fn binary(&self) -> bool {
        self.nvram[REG_B as usize] & REG_B_BINARY != 0
    }

    fn encode(&self, v: u32) -> u8 {
        if self.binary() {
            v as u8
        } else {
            (((v / 10) % 10) << 4 | (v % 10)) as u8
        }
    }

    fn decode(&self, v: u8) -> u32 {
        if self.binary() {
            u32::from(v)
        } else {
            u32::from(v >> 4) * 10 + u32::from(v & 0xf)
        }
    }

    fn now(&self) -> Civil {
        Civil::from_unix((self.clock)() + self.offset)
    }

    fn read_reg(&self, reg: u8) -> u8 {
        let t = self.now();
        match reg {
            REG_SECONDS => self.encode(t.second),
            REG_MINUTES => self.encode(t.minute),
            REG_HOURS => self.encode(t.hour),
            REG_WEEKDAY => self.encode(t.weekday + 1),
            REG_DAY => self.encode(t.day),
            REG_MONTH => self.encode(t.month),
            REG_YEAR => self.encode(t.year % 100),
            REG_CENTURY => self.encode(t.year / 100),
            // Update-in-progress is never set: reads are always consistent.
            REG_A => self.nvram[REG_A as usize] & 0x7f,
            // Reading C acknowledges interrupts; Keel raises none.
            REG_C => 0,
            r => self.nvram.get(r as usize).copied().unwrap_or(0xff),
        }
    }

    fn write_reg(&mut self, reg: u8, v: u8) {
        let mut t = self.now();
        let d = self.decode(v);
        match reg {
            REG_SECONDS => t.second = d.min(59),
            REG_MINUTES => t.minute = d.min(59),
            REG_HOURS => t.hour = d.min(23),
            REG_DAY => t.day = d.clamp(1, 31),
            REG_MONTH => t.month = d.clamp(1, 12),
            REG_YEAR => t.year = t.year / 100 * 100 + d % 100,
            REG_CENTURY => t.year = d % 100 * 100 + t.year % 100,
            REG_WEEKDAY => return,
            REG_C | REG_D => return, // read-only
            r => {
                if let Some(slot) = self.nvram.get_mut(r as usize) {
                    *slot = v;
                }
                return;
            }
        }
        self.offset = t.to_unix() - (self.clock)();
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(first) = data.first_mut() else {
            return;
        };
        *first = match offset {
            0 => self.index,
            1 => self.read_reg(self.index),
            _ => 0xff,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            // Bit 7 of the index port is the NMI mask on real hardware; it has no effect here.
            0 => self.index = v & 0x7f,
            1 => self.write_reg(self.index, v),
            _ => {}
        }
    }
}

/// A proleptic-Gregorian UTC date and time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Civil {
    year: u32,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    /// 0 = Sunday.
    weekday: u32,
}

impl Civil {
    /// Howard Hinnant's days-from-civil algorithm, inverted.
    fn from_unix(t: i64) -> Civil {
        let days = t.div_euclid(86_400);
        let secs = t.rem_euclid(86_400) as u32;
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = (yoe + era * 400 + i64::from(month <= 2)).max(0) as u32;
        Civil {
            year,
            month,
            day,
            hour: secs / 3600,
            minute: secs / 60 % 60,
            second: secs % 60,
            weekday: (days + 4).rem_euclid(7) as u32,
        }
    }

    fn to_unix(self) -> i64 {
        let y = i64::from(self.year) - i64::from(self.month <= 2);
        let era = y.div_euclid(400);
        let yoe = y.rem_euclid(400);
        let m = i64::from(self.month);
        let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(self.day) - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era * 146_097 + doe - 719_468;
        days * 86_400 + i64::from(self.hour * 3600 + self.minute * 60 + self.second)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-11-25 10:45:18 UTC, a Wednesday.
    fn fixed() -> i64 {
        1_795_603_518
    }

    fn reg(c: &mut Cmos, r: u8) -> u8 {
        c.write(0, &[r]);
        let mut d = [0u8];
        c.read(1, &mut d);
        d[0]
    }

    #[test]
    fn reads_bcd_time_from_the_clock() {
        let mut c = Cmos::with_clock(256 << 20, 0, fixed);
        assert_eq!(reg(&mut c, REG_YEAR), 0x26);
        assert_eq!(reg(&mut c, REG_CENTURY), 0x20);
        assert_eq!(reg(&mut c, REG_MONTH), 0x11);
        assert_eq!(reg(&mut c, REG_DAY), 0x25);
        assert_eq!(reg(&mut c, REG_HOURS), 0x10);
        assert_eq!(reg(&mut c, REG_MINUTES), 0x45);
        assert_eq!(reg(&mut c, REG_SECONDS), 0x18);
        assert_eq!(reg(&mut c, REG_WEEKDAY), 4);
        assert_eq!(reg(&mut c, REG_D), REG_D_VALID);
        assert_eq!(reg(&mut c, REG_A) & 0x80, 0);
    }

    #[test]
    fn guest_can_set_the_clock_and_binary_mode() {
        let mut c = Cmos::with_clock(256 << 20, 0, fixed);
        c.write(0, &[REG_HOURS]);
        c.write(1, &[0x07]);
        assert_eq!(reg(&mut c, REG_HOURS), 0x07);
        assert_eq!(reg(&mut c, REG_MINUTES), 0x45);
        c.write(0, &[REG_B]);
        c.write(1, &[REG_B_24H | REG_B_BINARY]);
        assert_eq!(reg(&mut c, REG_DAY), 25);
        // Garbage writes are clamped, never panic.
        c.write(0, &[REG_MONTH]);
        c.write(1, &[0xff]);
        assert_eq!(reg(&mut c, REG_MONTH), 12);
    }

    #[test]
    fn civil_round_trips() {
        for t in [0i64, 951_782_400, fixed(), 4_102_444_800, 13_000_000_000] {
            assert_eq!(Civil::from_unix(t).to_unix(), t);
        }
        let leap = Civil::from_unix(951_782_400); // 2000-02-29
        assert_eq!((leap.year, leap.month, leap.day), (2000, 2, 29));
    }

    #[test]
    fn nvram_reports_memory_sizes() {
        let mut c = Cmos::with_clock(3 << 30, 1 << 30, fixed);
        let lo = |c: &mut Cmos, a: u8| u16::from(reg(c, a)) | u16::from(reg(c, a + 1)) << 8;
        assert_eq!(lo(&mut c, 0x34), (((3u64 << 30) - (16 << 20)) >> 16) as u16);
        assert_eq!(reg(&mut c, 0x5c), 0x40); // 1 GiB = 0x4000 64K blocks
                                             // Index beyond 127 wraps into range via the 0x7f mask.
        c.write(0, &[0xff]);
        let mut d = [0u8];
        c.read(1, &mut d);
    }
}
