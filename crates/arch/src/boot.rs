//! Loading a kernel, its command line and initrd, and writing the boot-protocol structures.

use crate::layout::{
    e820_map, low_ram_end, E820Entry, CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, PVH_INFO_START,
    ZERO_PAGE_START,
};
use crate::regs::EntryMode;
use linux_loader::loader::bootparam::{
    boot_e820_entry, boot_params, setup_header, CAN_USE_HEAP, XLF_KERNEL_64,
};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

const PVH_START_MAGIC: u32 = 0x336e_c578;
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// Offset of the 64-bit entry point (`startup_64`) in a bzImage's protected-mode part.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Boot protocol 2.06 added `cmdline_size`.
const PROTOCOL_CMDLINE_SIZE: u16 = 0x206;
const PAGE_SIZE: u64 = 4096;

/// The kernel image formats Keel boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// ELF `vmlinux`; boots through PVH when it carries the PVH entry note.
    Elf,
    /// A compressed `bzImage` with a Linux setup header.
    BzImage,
}

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot read the kernel image: {0}")]
    ReadKernel(#[source] std::io::Error),
    #[error("not a kernel image: neither an ELF vmlinux nor a bzImage (no ELF magic, no \"HdrS\" setup header)")]
    UnknownFormat,
    #[error("cannot load the kernel: {0}")]
    Load(#[from] linux_loader::loader::Error),
    #[error("the bzImage has no 64-bit entry point (XLF_KERNEL_64 is not set); Keel boots 64-bit kernels only")]
    No64BitEntry,
    #[error("kernel command line is {len} bytes; this kernel accepts at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("cannot read the initrd: {0}")]
    ReadInitrd(#[source] std::io::Error),
    #[error("initrd is {size} bytes but only {room} bytes of guest memory are free above the kernel; give the VM more memory")]
    InitrdTooLarge { size: u64, room: u64 },
    #[error("the initrd is empty")]
    InitrdEmpty,
    #[error("cannot write boot structures into guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

/// What the loader placed where; the VMM reports it and sets up the boot vCPU from `entry`.
#[derive(Clone, Debug)]
pub struct LoadedKernel {
    pub format: KernelFormat,
    pub entry: EntryMode,
    pub kernel_end: u64,
    pub initrd: Option<(u64, u64)>,
}

/// Identifies a kernel image by its magic numbers.
pub fn detect_format<F: Read + Seek>(image: &mut F) -> Result<KernelFormat, BootError> {
    let mut head = [0u8; 0x206];
    image
        .seek(SeekFrom::Start(0))
        .map_err(BootError::ReadKernel)?;
    let n = read_up_to(image, &mut head).map_err(BootError::ReadKernel)?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        return Ok(KernelFormat::Elf);
    }
    if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        return Ok(KernelFormat::BzImage);
    }
    Err(BootError::UnknownFormat)
}

fn read_up_to<F: Read>(r: &mut F, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Everything the loader needs to know besides the files.
#[derive(Clone, Copy, Debug)]
pub struct BootConfig<'a> {
    pub mem_size: u64,
    pub cmdline: &'a str,
    pub rsdp_addr: u64,
}

/// Loads `kernel` (and `initrd`) into `mem` and writes the boot protocol's structures.
pub fn load_kernel<M: GuestMemoryBackend>(
    mem: &M,
    kernel: &mut File,
    initrd: Option<&mut File>,
    cfg: &BootConfig<'_>,
) -> Result<LoadedKernel, BootError> {
    let format = detect_format(kernel)?;
    let highmem = Some(GuestAddress(HIMEM_START));
    let (result, pvh_entry, linux_entry) = match format {
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, kernel, highmem)?;
            let pvh = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(a) => Some(a.raw_value()),
                _ => None,
            };
            let entry = r.kernel_load.raw_value();
            (r, pvh, entry)
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, kernel, highmem)?;
            let hdr = r.setup_header.unwrap_or_default();
            if hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(BootError::No64BitEntry);
            }
            let entry = r.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY_OFFSET;
            (r, None, entry)
        }
    };
    let kernel_end = result.kernel_load.raw_value() + result.kernel_end;

    let hdr = result.setup_header;
    let cmdline_max = match hdr {
        Some(h) if h.version >= PROTOCOL_CMDLINE_SIZE && h.cmdline_size > 0 => {
            (h.cmdline_size as usize).min(CMDLINE_MAX_SIZE - 1)
        }
        Some(_) => 255,
        None => CMDLINE_MAX_SIZE - 1,
    };
    write_cmdline(mem, cfg.cmdline, cmdline_max)?;

    let initrd_max = match hdr {
        Some(h) if h.initrd_addr_max != 0 => u64::from(h.initrd_addr_max) + 1,
        _ => u64::MAX,
    };
    let initrd = match initrd {
        Some(f) => Some(load_initrd(
            mem,
            f,
            kernel_end,
            low_ram_end(cfg.mem_size).min(initrd_max),
        )?),
        None => None,
    };

    let e820 = e820_map(cfg.mem_size);
    let entry = match pvh_entry {
        Some(entry) => {
            write_pvh_start_info(mem, &e820, initrd, cfg.rsdp_addr)?;
            EntryMode::Pvh {
                entry,
                start_info: PVH_INFO_START,
            }
        }
        None => {
            write_zero_page(mem, hdr, &e820, initrd, cfg)?;
            EntryMode::Linux64 {
                entry: linux_entry,
                boot_params: ZERO_PAGE_START,
            }
        }
    };
    Ok(LoadedKernel {
        format,
        entry,
        kernel_end,
        initrd,
    })
}

fn write_cmdline<M: GuestMemoryBackend>(
    mem: &M,
    cmdline: &str,
    max: usize,
) -> Result<(), BootError> {
    if cmdline.len() > max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    if cmdline.as_bytes().contains(&0) {
        return Err(BootError::CmdlineNul);
    }
    mem.write_slice(cmdline.as_bytes(), GuestAddress(CMDLINE_START))?;
    mem.write_obj(0u8, GuestAddress(CMDLINE_START + cmdline.len() as u64))?;
    Ok(())
}

/// Places the initrd page-aligned at the top of RAM below `limit`, above the kernel.
fn load_initrd<M: GuestMemoryBackend>(
    mem: &M,
    f: &mut File,
    kernel_end: u64,
    limit: u64,
) -> Result<(u64, u64), BootError> {
    let size = f.metadata().map_err(BootError::ReadInitrd)?.len();
    if size == 0 {
        return Err(BootError::InitrdEmpty);
    }
    let floor = (kernel_end + PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
    let room = limit.saturating_sub(floor);
    if size > room {
        return Err(BootError::InitrdTooLarge { size, room });
    }
    let addr = (limit - size) & !(PAGE_SIZE - 1);
    f.seek(SeekFrom::Start(0)).map_err(BootError::ReadInitrd)?;
    mem.read_exact_volatile_from(GuestAddress(addr), f, size as usize)
        .map_err(|e| match e {
            vm_memory::GuestMemoryError::IOError(io) => BootError::ReadInitrd(io),
            other => BootError::Write(other),
        })?;
    Ok((addr, size))
}

fn write_pvh_start_info<M: GuestMemoryBackend>(
    mem: &M,
    e820: &[E820Entry],
    initrd: Option<(u64, u64)>,
    rsdp_addr: u64,
) -> Result<(), BootError> {
    let start_info_size = std::mem::size_of::<hvm_start_info>() as u64;
    let memmap_addr = PVH_INFO_START + start_info_size;
    let modlist_addr =
        memmap_addr + (e820.len() * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
    for (i, e) in e820.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        };
        mem.write_obj(
            entry,
            GuestAddress(memmap_addr + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64),
        )?;
    }
    let mut info = hvm_start_info {
        magic: PVH_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp_addr,
        memmap_paddr: memmap_addr,
        memmap_entries: e820.len() as u32,
        ..Default::default()
    };
    if let Some((paddr, size)) = initrd {
        mem.write_obj(
            hvm_modlist_entry {
                paddr,
                size,
                ..Default::default()
            },
            GuestAddress(modlist_addr),
        )?;
        info.nr_modules = 1;
        info.modlist_paddr = modlist_addr;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_START))?;
    Ok(())
}

fn write_zero_page<M: GuestMemoryBackend>(
    mem: &M,
    hdr: Option<setup_header>,
    e820: &[E820Entry],
    initrd: Option<(u64, u64)>,
    cfg: &BootConfig<'_>,
) -> Result<(), BootError> {
    let mut params = boot_params {
        hdr: hdr.unwrap_or_default(),
        ..Default::default()
    };
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.header = HDR_MAGIC;
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cfg.cmdline.len() as u32 + 1;
    params.hdr.loadflags |= CAN_USE_HEAP;
    params.hdr.heap_end_ptr = 0xfe00;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = cfg.rsdp_addr;
    for (slot, e) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = e820.len().min(params.e820_table.len()) as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_guest_kit::KitImage;
    use std::io::Write;
    use vm_memory::GuestMemoryMmap;

    const MEM: u64 = 64 << 20;

    fn memory() -> GuestMemoryMmap {
        let ranges: Vec<(GuestAddress, usize)> = crate::layout::ram_ranges(MEM)
            .iter()
            .map(|r| (GuestAddress(r.start), r.size as usize))
            .collect();
        GuestMemoryMmap::from_ranges(&ranges).unwrap()
    }

    fn file_with(bytes: &[u8]) -> File {
        let mut f = tempfile();
        f.write_all(bytes).unwrap();
        f
    }

    fn tempfile() -> File {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("keel-boot-test-{}-{n}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        let _ = std::fs::remove_file(&p);
        f
    }

    fn cfg(cmdline: &str) -> BootConfig<'_> {
        BootConfig {
            mem_size: MEM,
            cmdline,
            rsdp_addr: 0xe0000,
        }
    }

    #[test]
    fn each_format_picks_its_entry_protocol() {
        let mem = memory();
        for (img, pvh) in [
            (KitImage::PvhElf, true),
            (KitImage::Elf64, false),
            (KitImage::BzImage, false),
        ] {
            let mut k = File::open(img.path()).unwrap();
            let mut initrd = file_with(&[7u8; 5000]);
            let l = load_kernel(&mem, &mut k, Some(&mut initrd), &cfg("console=ttyS0")).unwrap();
            match (l.entry, pvh) {
                (EntryMode::Pvh { start_info, .. }, true) => {
                    let si: hvm_start_info = mem.read_obj(GuestAddress(start_info)).unwrap();
                    assert_eq!(si.magic, PVH_START_MAGIC);
                    assert_eq!(si.nr_modules, 1);
                    assert_eq!(si.rsdp_paddr, 0xe0000);
                }
                (EntryMode::Linux64 { entry, boot_params }, false) => {
                    assert_eq!(entry, 0x100200);
                    let bp: boot_params = mem.read_obj(GuestAddress(boot_params)).unwrap();
                    assert_eq!({ bp.hdr.ramdisk_size }, 5000);
                    assert_eq!(bp.e820_entries, 4);
                    assert_eq!({ bp.acpi_rsdp_addr }, 0xe0000);
                }
                (e, _) => panic!("{img:?}: unexpected entry {e:?}"),
            }
            let (addr, size) = l.initrd.unwrap();
            assert_eq!(size, 5000);
            assert_eq!(addr % PAGE_SIZE, 0);
            assert!(addr + size <= MEM && addr >= l.kernel_end);
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let mem = memory();
        let mut junk = file_with(b"not a kernel");
        assert!(matches!(
            load_kernel(&mem, &mut junk, None, &cfg("")),
            Err(BootError::UnknownFormat)
        ));
        let mut empty = file_with(b"");
        assert!(matches!(
            load_kernel(&mem, &mut empty, None, &cfg("")),
            Err(BootError::UnknownFormat)
        ));
        let mut k = File::open(KitImage::BzImage.path()).unwrap();
        let long = "x".repeat(3000);
        assert!(matches!(
            load_kernel(&mem, &mut k, None, &cfg(&long)),
            Err(BootError::CmdlineTooLong {
                len: 3000,
                max: 2047
            })
        ));
        assert!(matches!(
            load_kernel(&mem, &mut k, None, &cfg("a\0b")),
            Err(BootError::CmdlineNul)
        ));
        let mut huge = tempfile();
        huge.set_len(MEM).unwrap();
        assert!(matches!(
            load_kernel(&mem, &mut k, Some(&mut huge), &cfg("")),
            Err(BootError::InitrdTooLarge { .. })
        ));
        let mut no64 = std::fs::read(KitImage::BzImage.path()).unwrap();
        no64[0x236] = 0;
        let mut f = file_with(&no64);
        assert!(matches!(
            load_kernel(&mem, &mut f, None, &cfg("")),
            Err(BootError::No64BitEntry)
        ));
    }

    /// Corrupted images (random byte flips and truncations of real ones) must give errors or
    /// load, never panic. A cheap, deterministic companion to the cargo-fuzz target.
    #[test]
    fn corrupted_images_never_panic() {
        let mem = memory();
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for img in KitImage::ALL {
            let orig = std::fs::read(img.path()).unwrap();
            for round in 0..300 {
                let mut b = orig.clone();
                // Concentrate on headers: the first 4 KiB hold ELF/program headers and the
                // setup header.
                for _ in 0..(1 + rnd() % 8) {
                    let i = (rnd() as usize) % b.len().min(4096);
                    b[i] = rnd() as u8;
                }
                if round % 10 == 0 {
                    b.truncate((rnd() as usize) % b.len());
                }
                let mut f = file_with(&b);
                let _ = load_kernel(&mem, &mut f, None, &cfg("console=ttyS0"));
            }
        }
    }
}
