//! ACPI tables: RSDP, XSDT, FADT (hardware-reduced), DSDT and MADT.
//!
//! Keel describes a hardware-reduced ACPI platform: no PM1 event/control blocks or PM timer
//! to emulate, power-off through the FADT sleep control register and reset through the FADT
//! reset register, both served by Keel's ACPI PM device on [`PM_PORT_BASE`]. The MADT lists
//! one local APIC per vCPU and the IOAPIC, which is how the guest finds every vCPU.

use crate::layout::{
    IOAPIC_ADDR, LAPIC_ADDR, PCI_ECAM_SIZE, PCI_ECAM_START, PCI_MMIO_SIZE, PCI_MMIO_START,
    ROM_SIZE, ROM_START,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::sdt::Sdt;
use acpi_tables::{aml, rsdp::Rsdp, xsdt::XSDT, Aml};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const OEM_ID: [u8; 6] = *b"KEEL  ";
const OEM_TABLE_ID: [u8; 8] = *b"KEELVMM ";
const OEM_REVISION: u32 = 1;

/// First I/O port of the ACPI PM device: sleep control, sleep status, reset.
pub const PM_PORT_BASE: u16 = 0x600;
pub const PM_SLEEP_CONTROL: u16 = PM_PORT_BASE;
pub const PM_SLEEP_STATUS: u16 = PM_PORT_BASE + 1;
pub const PM_RESET: u16 = PM_PORT_BASE + 2;
pub const PM_PORT_COUNT: u16 = 3;
/// The value written to the reset register to reset the machine.
pub const PM_RESET_VALUE: u8 = 0x1;
/// SLP_TYP for S5 (soft off), as advertised in the DSDT's `_S5_` package.
pub const S5_SLEEP_TYPE: u8 = 5;

/// What the tables describe.
#[derive(Clone, Copy, Debug)]
pub struct AcpiConfig {
    pub vcpus: u32,
    /// IRQ of the system control interrupt (unused by a hardware-reduced guest, but must be
    /// a valid ISA IRQ).
    pub sci_irq: u16,
    /// GSI of the Generic Event Device that signals the power button.
    pub power_button_gsi: u32,
}

/// Notify code for "power button pressed" (ACPI 6.5 §4.8.3.1.1).
const NOTIFY_POWER_BUTTON: u8 = 0x80;

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables ({0} bytes) do not fit in the {ROM_SIZE:#x}-byte ROM area")]
    TooLarge(usize),
    #[error("{0} vCPUs cannot be described with 8-bit APIC IDs")]
    TooManyCpus(u32),
    #[error("cannot write ACPI tables into guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

/// COM1 as the guest must see it: on a hardware-reduced platform Linux wires no ISA IRQs by
/// itself, so a UART only gets its interrupt (GSI 4, edge, active high) from this description.
fn com1() -> Vec<u8> {
    let mut out = Vec::new();
    let hid = aml::EISAName::new("PNP0501");
    let io = aml::IO::new(0x3f8, 0x3f8, 1, 8);
    let irq = aml::Interrupt::new(true, true, false, false, 4);
    let resources = aml::ResourceTemplate::new(vec![&io, &irq]);
    aml::Device::new(
        "_SB_.COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &hid),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &resources),
        ],
    )
    .to_aml_bytes(&mut out);
    out
}

/// The PCI host bridge: bus 0, configuration space through ECAM (MCFG) or 0xCF8, and the
/// window its BARs are assigned from.
fn pci_host_bridge() -> Vec<u8> {
    let mut out = Vec::new();
    let bus = aml::AddressSpace::new_bus_number(0u16, 0u16);
    let cf8 = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let mmio = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO_START as u32,
        (PCI_MMIO_START + PCI_MMIO_SIZE - 1) as u32,
        None,
    );
    let crs = aml::ResourceTemplate::new(vec![&bus, &cf8, &mmio]);
    aml::Device::new(
        "_SB_.PCI0".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08")),
            &aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03")),
            &aml::Name::new("_ADR".into(), &aml::ZERO),
            &aml::Name::new("_SEG".into(), &aml::ZERO),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_BBN".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &crs),
        ],
    )
    .to_aml_bytes(&mut out);
    // The ECAM window is a motherboard resource: Linux checks this before trusting MCFG.
    let ecam = aml::Memory32Fixed::new(false, PCI_ECAM_START as u32, PCI_ECAM_SIZE as u32);
    aml::Device::new(
        "_SB_.MBRD".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C02")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&ecam])),
        ],
    )
    .to_aml_bytes(&mut out);
    out
}

/// A control-method power button, and the Generic Event Device (hardware-reduced ACPI's
/// replacement for GPEs) whose interrupt on `gsi` makes the guest's ACPI code notify it.
fn power_button(gsi: u32) -> Vec<u8> {
    let mut out = Vec::new();
    aml::Device::new(
        "_SB_.PWRB".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
        ],
    )
    .to_aml_bytes(&mut out);
    let irq = aml::Interrupt::new(true, true, false, false, gsi);
    let pwrb = aml::Path::new("\\_SB_.PWRB");
    let notify = aml::Notify::new(&pwrb, &NOTIFY_POWER_BUTTON);
    let is_ours = aml::Equal::new(&aml::Arg(0), &gsi);
    let body = aml::If::new(&is_ours, vec![&notify]);
    aml::Device::new(
        "_SB_.GED_".into(),
        vec![
            &aml::Name::new("_HID".into(), &"ACPI0013"),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&irq])),
            &aml::Method::new("_EVT".into(), 1, true, vec![&body]),
        ],
    )
    .to_aml_bytes(&mut out);
    out
}

fn mcfg() -> Vec<u8> {
    let mut m = acpi_tables::mcfg::MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    m.add_ecam(PCI_ECAM_START, 0, 0, 0);
    let mut out = Vec::new();
    m.to_aml_bytes(&mut out);
    out
}

fn dsdt(cfg: &AcpiConfig) -> Sdt {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let mut body = Vec::new();
    let s5 = aml::Package::new(vec![&S5_SLEEP_TYPE, &aml::ZERO, &aml::ZERO, &aml::ZERO]);
    aml::Name::new("_S5_".into(), &s5).to_aml_bytes(&mut body);
    body.extend_from_slice(&com1());
    body.extend_from_slice(&pci_host_bridge());
    body.extend_from_slice(&power_button(cfg.power_button_gsi));
    dsdt.append_slice(&body);
    dsdt
}

fn fadt(dsdt_addr: u64, sci_irq: u16) -> Vec<u8> {
    let io = |port: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            u64::from(port),
        )
    };
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    b.sci_int = sci_irq.into();
    b.sleep_control_reg = io(PM_SLEEP_CONTROL);
    b.sleep_status_reg = io(PM_SLEEP_STATUS);
    b.reset_reg = io(PM_RESET);
    b.reset_value = PM_RESET_VALUE;
    // "VGA not present" and "no CMOS RTC problems": IAPC_BOOT_ARCH bit 2 (VGA not present).
    b.iapc_boot_arch = (1u16 << 2).into();
    b.hypervisor_vendor_identity = u64::from_le_bytes(*b"KEELVMM ").into();
    let mut out = Vec::new();
    b.finalize().to_aml_bytes(&mut out);
    out
}

fn madt(vcpus: u32) -> Result<Sdt, AcpiError> {
    if vcpus > 254 {
        return Err(AcpiError::TooManyCpus(vcpus));
    }
    let mut madt = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    madt.write_u32(36, LAPIC_ADDR);
    madt.write_u32(40, 1); // PCAT_COMPAT: a dual 8259 PIC is present (in-kernel)
    let mut entries = Vec::new();
    for id in 0..vcpus {
        // Type 0 (processor local APIC), length 8, UID, APIC ID, flags = enabled.
        entries.extend_from_slice(&[0, 8, id as u8, id as u8]);
        entries.extend_from_slice(&1u32.to_le_bytes());
    }
    // Type 1 (IOAPIC), length 12, id, reserved, address, GSI base.
    entries.extend_from_slice(&[1, 12, vcpus as u8, 0]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    entries.extend_from_slice(&0u32.to_le_bytes());
    madt.append_slice(&entries);
    Ok(madt)
}

/// Writes the tables into the ROM area and returns the RSDP's guest-physical address.
pub fn write_acpi_tables<M: GuestMemoryBackend>(
    mem: &M,
    cfg: &AcpiConfig,
) -> Result<u64, AcpiError> {
    let align = |x: u64| (x + 15) & !15;
    let rsdp_addr = ROM_START;
    let dsdt_addr = align(rsdp_addr + Rsdp::len() as u64);
    let dsdt = dsdt(cfg);
    let fadt_addr = align(dsdt_addr + dsdt.len() as u64);
    let fadt = fadt(dsdt_addr, cfg.sci_irq);
    let madt_addr = align(fadt_addr + fadt.len() as u64);
    let madt = madt(cfg.vcpus)?;
    let mcfg_addr = align(madt_addr + madt.len() as u64);
    let mcfg = mcfg();
    let xsdt_addr = align(mcfg_addr + mcfg.len() as u64);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    xsdt.add_entry(mcfg_addr);
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);
    let end = xsdt_addr + xsdt_bytes.len() as u64;
    if end > ROM_START + ROM_SIZE {
        return Err(AcpiError::TooLarge((end - ROM_START) as usize));
    }
    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp);
    mem.write_slice(&rsdp, GuestAddress(rsdp_addr))?;
    mem.write_slice(dsdt.as_slice(), GuestAddress(dsdt_addr))?;
    mem.write_slice(&fadt, GuestAddress(fadt_addr))?;
    mem.write_slice(madt.as_slice(), GuestAddress(madt_addr))?;
    mem.write_slice(&mcfg, GuestAddress(mcfg_addr))?;
    mem.write_slice(&xsdt_bytes, GuestAddress(xsdt_addr))?;
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn checksum_ok(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    fn table_at(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let len: u32 = mem.read_obj(GuestAddress(addr + 4)).unwrap();
        let mut v = vec![0; len as usize];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    #[test]
    fn tables_chain_from_rsdp_with_valid_checksums() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(ROM_START), ROM_SIZE as usize)]).unwrap();
        let rsdp = write_acpi_tables(
            &mem,
            &AcpiConfig {
                vcpus: 3,
                sci_irq: 9,
                power_button_gsi: 5,
            },
        )
        .unwrap();
        let mut r = [0u8; 36];
        mem.read_slice(&mut r, GuestAddress(rsdp)).unwrap();
        assert_eq!(&r[..8], b"RSD PTR ");
        assert!(checksum_ok(&r[..20]) && checksum_ok(&r));
        let xsdt_addr = u64::from_le_bytes(r[24..32].try_into().unwrap());
        let xsdt = table_at(&mem, xsdt_addr);
        assert_eq!(&xsdt[..4], b"XSDT");
        assert!(checksum_ok(&xsdt));
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let mut sigs = Vec::new();
        for e in entries {
            let t = table_at(&mem, e);
            assert!(checksum_ok(&t), "bad checksum in {:?}", &t[..4]);
            sigs.push(t[..4].to_vec());
            if &t[..4] == b"APIC" {
                let lapics = t[44..].chunks(8).take_while(|c| c[0] == 0).count();
                assert_eq!(lapics, 3);
            }
            if &t[..4] == b"FACP" {
                let flags = u32::from_le_bytes(t[112..116].try_into().unwrap());
                assert_ne!(flags & (1 << 20), 0, "hardware-reduced");
                let dsdt_addr = u64::from_le_bytes(t[140..148].try_into().unwrap());
                let dsdt = table_at(&mem, dsdt_addr);
                assert!(checksum_ok(&dsdt));
                assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
                for name in [b"COM1", b"PCI0", b"MBRD", b"PWRB", b"GED_", b"_EVT"] {
                    assert!(dsdt.windows(4).any(|w| w == name), "{name:?} in DSDT");
                }
            }
            if &t[..4] == b"MCFG" {
                // One allocation: base, segment 0, buses 0..=0.
                assert_eq!(t.len(), 44 + 16);
                assert_eq!(
                    u64::from_le_bytes(t[44..52].try_into().unwrap()),
                    PCI_ECAM_START
                );
                assert_eq!((t[54], t[55]), (0, 0));
            }
        }
        assert_eq!(
            sigs,
            vec![b"FACP".to_vec(), b"APIC".to_vec(), b"MCFG".to_vec()]
        );
    }

    #[test]
    fn too_many_cpus_is_an_error() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(ROM_START), ROM_SIZE as usize)]).unwrap();
        assert!(matches!(
            write_acpi_tables(
                &mem,
                &AcpiConfig {
                    vcpus: 300,
                    sci_irq: 9,
                    power_button_gsi: 5,
                }
            ),
            Err(AcpiError::TooManyCpus(300))
        ));
    }
}
