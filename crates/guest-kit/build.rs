//! Builds the guest test kit (`guest/kit`) with the system C toolchain into three images that
//! boot through Keel's three loader paths:
//! - `kit-pvh.elf`: ELF with the PVH entry note (PVH boot);
//! - `kit-64.elf`: the same code without the note (64-bit Linux boot protocol at `e_entry`);
//! - `kit.bzImage`: a Linux setup header followed by the flat 64-bit image (bzImage path).

use std::path::{Path, PathBuf};
use std::process::Command;

const CFLAGS: &[&str] = &[
    "-m64",
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-nostdlib",
    "-static",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-O2",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-Wall",
    "-Wextra",
    "-Werror",
];

/// What the sources include, and the linker script.
const HEADERS: &[&str] = &[
    "kit.h",
    "kit.ld",
    "virtio.h",
    "virtio_dev.h",
    "limits.h",
    "chaos.h",
];

/// The kit's sources and their objects, in link order.
const OBJECTS: &[(&str, &str)] = &[
    ("entry.S", "entry.o"),
    ("kit.c", "kit.o"),
    ("virtio.c", "virtio.o"),
    ("virtio_hostile.c", "virtio_hostile.o"),
    ("limits.c", "limits.o"),
    ("blk_rate.c", "blk_rate.o"),
    ("chaos.c", "chaos.o"),
    ("soak.c", "soak.o"),
    ("snapcount.c", "snapcount.o"),
    ("migrate.c", "migrate.o"),
];

fn run(cmd: &mut Command) {
    let shown = format!("{cmd:?}");
    match cmd.status() {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("guest kit build step failed ({s}): {shown}"),
        Err(e) => panic!("cannot run {shown}: {e} (the guest kit needs gcc, ld and objcopy)"),
    }
}

fn main() {
    let manifest =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let src = manifest.join("../../guest/kit");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    // Every source and what they include: a file missing here would not rebuild the kit.
    let sources = OBJECTS.iter().map(|(source, _)| *source);
    for f in sources.chain(HEADERS.iter().copied()) {
        println!("cargo:rerun-if-changed={}", src.join(f).display());
    }
    let cc = std::env::var("KEEL_KIT_CC").unwrap_or_else(|_| "gcc".into());
    let obj = |name: &str| out.join(name);
    for (source, object) in OBJECTS {
        run(Command::new(&cc)
            .args(CFLAGS)
            .arg("-c")
            .arg(src.join(source))
            .arg("-o")
            .arg(obj(object)));
    }
    let script = std::fs::read_to_string(src.join("kit.ld")).expect("guest/kit/kit.ld is readable");
    let no_note = script.replace("    note PT_NOTE;\n", "").replace(
        ".note : { *(.note.Xen) } :text :note",
        "/DISCARD/ : { *(.note.Xen) }",
    );
    assert_ne!(
        script, no_note,
        "kit.ld no longer has the note lines build.rs edits"
    );
    std::fs::write(out.join("kit-64.ld"), no_note).expect("OUT_DIR is writable");
    let link = |ld: &Path, elf: &str| {
        run(Command::new("ld")
            .args([
                "-m",
                "elf_x86_64",
                "-nostdlib",
                "-z",
                "noexecstack",
                "--no-warn-rwx-segments",
                "-T",
            ])
            .arg(ld)
            .arg("-o")
            .arg(out.join(elf))
            .args(OBJECTS.iter().map(|(_, o)| obj(o))));
    };
    link(&src.join("kit.ld"), "kit-pvh.elf");
    link(&out.join("kit-64.ld"), "kit-64.elf");
    run(Command::new("objcopy")
        .args(["-O", "binary"])
        .arg(out.join("kit-64.elf"))
        .arg(out.join("kit-64.bin")));
    let payload = std::fs::read(out.join("kit-64.bin")).expect("objcopy wrote kit-64.bin");
    std::fs::write(out.join("kit.bzImage"), bzimage(&payload)).expect("OUT_DIR is writable");
}

/// A minimal bzImage: one 512-byte boot sector plus one setup sector with the Linux boot
/// protocol 2.15 header, then the protected-mode payload loaded at 1 MiB.
fn bzimage(payload: &[u8]) -> Vec<u8> {
    let setup_sects: u8 = 1;
    let mut img = vec![0u8; 512 * (usize::from(setup_sects) + 1)];
    let put = |img: &mut Vec<u8>, off: usize, bytes: &[u8]| {
        img[off..off + bytes.len()].copy_from_slice(bytes)
    };
    img[0x1f1] = setup_sects;
    put(&mut img, 0x1fe, &0xaa55u16.to_le_bytes()); // boot_flag
    put(&mut img, 0x202, b"HdrS");
    put(&mut img, 0x206, &0x020fu16.to_le_bytes()); // protocol version 2.15
    img[0x210] = 0xff; // type_of_loader: filled by the loader
    img[0x211] = 0x01; // loadflags: LOADED_HIGH
    put(&mut img, 0x214, &0x0010_0000u32.to_le_bytes()); // code32_start
    put(&mut img, 0x22c, &0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    put(&mut img, 0x230, &0x0020_0000u32.to_le_bytes()); // kernel_alignment
    put(&mut img, 0x236, &0x0001u16.to_le_bytes()); // xloadflags: XLF_KERNEL_64
    put(&mut img, 0x238, &2047u32.to_le_bytes()); // cmdline_size
    put(&mut img, 0x258, &0x0010_0000u64.to_le_bytes()); // pref_address
    let init_size = (payload.len() as u32 + 0x10_0000) & !0xfff; // room for .bss
    put(&mut img, 0x260, &init_size.to_le_bytes());
    put(
        &mut img,
        0x1f4,
        &((payload.len() as u32).div_ceil(16)).to_le_bytes(),
    ); // syssize
    img.extend_from_slice(payload);
    img
}
