//! Paths to the guest test kit's images, built by this crate's build script from
//! `guest/kit/` (see that directory for what each test does).
//!
//! A kit guest reads `test=NAME` (and test-specific `key=value`s) from its command line,
//! reports on COM1 with `KIT-PASS NAME` / `KIT-FAIL NAME: why` lines, then ends the VM as
//! `exit=` says: `poweroff` (default, ACPI S5), `acpi-reset`, `i8042`, `triple-fault`, or
//! `bad-fetch` (execute from unbacked memory: a KVM internal error).

use std::path::PathBuf;

mod snapcount;
pub use snapcount::{
    check_snapcount_disk, parse_snapcount_line, snapcount_sector, snapcount_slot_tsc,
    SNAPCOUNT_MAGIC, SNAPCOUNT_SECTOR,
};

/// The kit images, one per loader path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KitImage {
    /// ELF with the PVH note: PVH boot.
    PvhElf,
    /// ELF without the PVH note: 64-bit Linux boot protocol at the ELF entry.
    Elf64,
    /// bzImage: 64-bit Linux boot protocol at load address + 0x200.
    BzImage,
}

impl KitImage {
    pub const ALL: [KitImage; 3] = [KitImage::PvhElf, KitImage::Elf64, KitImage::BzImage];

    /// Where the image was built.
    pub fn path(self) -> PathBuf {
        let name = match self {
            KitImage::PvhElf => "kit-pvh.elf",
            KitImage::Elf64 => "kit-64.elf",
            KitImage::BzImage => "kit.bzImage",
        };
        PathBuf::from(env!("OUT_DIR")).join(name)
    }
}

/// The `KIT-FAIL` lines in `serial`, if any.
pub fn failures(serial: &str) -> Vec<&str> {
    serial
        .lines()
        .filter(|l| l.starts_with("KIT-FAIL"))
        .collect()
}

/// True when `serial` holds `KIT-PASS name`.
pub fn passed(serial: &str, name: &str) -> bool {
    serial
        .lines()
        .any(|l| l.trim_end() == format!("KIT-PASS {name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_were_built() {
        for img in KitImage::ALL {
            let meta = std::fs::metadata(img.path()).unwrap();
            assert!(meta.len() > 512, "{img:?} is suspiciously small");
        }
        let bz = std::fs::read(KitImage::BzImage.path()).unwrap();
        assert_eq!(&bz[0x202..0x206], b"HdrS");
    }

    #[test]
    fn report_parsing() {
        let s = "KIT: x\nKIT-PASS io\nKIT-FAIL mmio: bad\n";
        assert!(passed(s, "io"));
        assert!(!passed(s, "mmio"));
        assert_eq!(failures(s), vec!["KIT-FAIL mmio: bad"]);
    }
}
