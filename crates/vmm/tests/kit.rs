//! End-to-end tests on the guest test kit: tiny guests that boot through Keel's real loader
//! paths and exercise exits, devices, interrupts, ACPI, SMP and every way a VM ends.
//! Each runs in milliseconds. Without a usable /dev/kvm every test is reported as ignored
//! (skipped), loudly, never passed. The PCI and virtio tests live in `kit/virtio.rs`, the
//! snapshot counter guest's in `kit/snapcount.rs`.

#[path = "kit/snapcount.rs"]
mod snapcount;
#[path = "kit/virtio.rs"]
mod virtio;

use keel_guest_kit::{failures, passed, KitImage};
use keel_vmm::{ExitReason, Outcome, VmConfig, VmIo, Vmm};
use libtest_mimic::{Arguments, Failed, Trial};
use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

struct Run {
    outcome: Outcome,
    serial: String,
}

fn config(img: KitImage, cmdline: &str, vcpus: u32, memory: u64) -> VmConfig {
    VmConfig {
        cmdline: cmdline.into(),
        vcpus,
        memory,
        host_quirks: false,
        ..VmConfig::new(img.path())
    }
}

fn run_with(cfg: VmConfig, console_in: Option<OwnedFd>) -> Result<Run, Failed> {
    let out = Capture::default();
    let io = VmIo {
        serial_out: Box::new(out.clone()),
        console_in,
        console_escape: false,
    };
    let vmm = Vmm::new(cfg, io).map_err(|e| format!("build failed: {e}"))?;
    let stop = vmm.stop_handle();
    // A kit guest ends itself in milliseconds; a hung one must not hang the suite.
    let watchdog = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(60));
        stop.stop(ExitReason::Signal(libc::SIGALRM));
    });
    let outcome = vmm.run().map_err(|e| format!("run failed: {e}"))?;
    drop(watchdog);
    Ok(Run {
        outcome,
        serial: out.text(),
    })
}

fn run(img: KitImage, cmdline: &str, vcpus: u32, memory: u64) -> Result<Run, Failed> {
    run_with(config(img, cmdline, vcpus, memory), None)
}

/// The guest passed `name` and powered off through ACPI.
fn expect_pass(r: &Run, name: &str) -> Result<(), Failed> {
    let f = failures(&r.serial);
    if !f.is_empty() {
        return Err(format!(
            "guest reported failures: {f:?}\n--- serial ---\n{}",
            r.serial
        )
        .into());
    }
    if !passed(&r.serial, name) {
        return Err(format!("no KIT-PASS {name}\n--- serial ---\n{}", r.serial).into());
    }
    expect_reason(r, &ExitReason::PowerOff { source: "ACPI S5" })
}

fn expect_reason(r: &Run, want: &ExitReason) -> Result<(), Failed> {
    if &r.outcome.reason != want {
        return Err(format!(
            "VM ended with {:?}, expected {want:?}\n--- serial ---\n{}",
            r.outcome.reason, r.serial
        )
        .into());
    }
    Ok(())
}

const MEM: u64 = 64 << 20;

fn trials() -> Vec<Trial> {
    let mut t = Vec::new();
    for img in KitImage::ALL {
        let name = format!("{img:?}").to_lowercase();
        t.push(Trial::test(
            format!("boot_{name}_hello_and_poweroff"),
            move || {
                let r = run(img, "test=hello", 1, MEM)?;
                expect_pass(&r, "hello")?;
                let proto = if img == KitImage::PvhElf {
                    "pvh"
                } else {
                    "linux64"
                };
                if !r.serial.contains(&format!("hello via {proto}")) {
                    return Err(format!("wrong boot protocol:\n{}", r.serial).into());
                }
                Ok(())
            },
        ));
        t.push(Trial::test(
            format!("boot_{name}_memory_map_and_initrd"),
            move || {
                for mem in [48u64 << 20, 256 << 20] {
                    let dir = std::env::temp_dir().join(format!(
                        "keel-kit-initrd-{}-{name}-{mem}",
                        std::process::id()
                    ));
                    let size = 100_003usize;
                    let bytes: Vec<u8> = (0..size).map(|i| (i * 7 + 3) as u8).collect();
                    std::fs::write(&dir, &bytes).map_err(|e| e.to_string())?;
                    let mut cfg = config(
                        img,
                        &format!(
                            "test=memory expect_ram={} expect_initrd={size}",
                            mem - 0x60400
                        ),
                        1,
                        mem,
                    );
                    cfg.initrd = Some(dir.clone());
                    let r = run_with(cfg, None);
                    let _ = std::fs::remove_file(&dir);
                    expect_pass(&r?, "memory")?;
                }
                Ok(())
            },
        ));
    }
    for cpus in [1u32, 2, 4] {
        t.push(Trial::test(
            format!("acpi_tables_describe_{cpus}_cpus"),
            move || {
                expect_pass(
                    &run(
                        KitImage::PvhElf,
                        &format!("test=acpi cpus={cpus}"),
                        cpus,
                        MEM,
                    )?,
                    "acpi",
                )
            },
        ));
    }
    for cpus in [1u32, 3] {
        t.push(Trial::test(
            format!("mp_table_describes_{cpus}_cpus"),
            move || {
                let r = run(
                    KitImage::Elf64,
                    &format!("test=mptable cpus={cpus}"),
                    cpus,
                    MEM,
                )?;
                expect_pass(&r, "mptable")
            },
        ));
    }
    for cpus in [2u32, 4] {
        t.push(Trial::test(
            format!("smp_all_{cpus}_vcpus_start_on_init_sipi"),
            move || {
                let r = run(KitImage::BzImage, "test=smp", cpus, MEM)?;
                expect_pass(&r, "smp")?;
                let want = format!("aps up={} of {}", cpus - 1, cpus - 1);
                if !r.serial.contains(&want) {
                    return Err(format!("expected '{want}':\n{}", r.serial).into());
                }
                Ok(())
            },
        ));
    }
    t.push(Trial::test("port_io_devices_and_unhandled_ports", || {
        let r = run(KitImage::PvhElf, "test=io", 1, MEM)?;
        expect_pass(&r, "io")?;
        if r.outcome.last_post_code != Some(0x42) {
            return Err(format!("POST code {:?}, expected 0x42", r.outcome.last_post_code).into());
        }
        if r.outcome.stats.unhandled_io < 6 {
            return Err(
                format!("unhandled port accesses not counted: {:?}", r.outcome.stats).into(),
            );
        }
        Ok(())
    }));
    t.push(Trial::test(
        "mmio_unbacked_vga_hole_and_read_only_rom",
        || {
            let r = run(KitImage::Elf64, "test=mmio rom=ro", 1, MEM)?;
            expect_pass(&r, "mmio")?;
            let s = r.outcome.stats;
            if s.rom_writes != 1 || s.unhandled_mmio < 3 {
                return Err(format!("MMIO exits not accounted: {s:?}").into());
            }
            Ok(())
        },
    ));
    t.push(Trial::test("hlt_wakes_on_lapic_timer_interrupt", || {
        expect_pass(&run(KitImage::PvhElf, "test=hlt", 1, MEM)?, "hlt")
    }));
    t.push(Trial::test("console_input_reaches_the_guest_uart", || {
        let (rd, wr) = std::io::pipe().map_err(|e| e.to_string())?;
        let mut wr = wr;
        wr.write_all(b"hello-keel\n").map_err(|e| e.to_string())?;
        let r = run_with(
            config(KitImage::PvhElf, "test=console", 1, MEM),
            Some(rd.into()),
        )?;
        drop(wr);
        expect_pass(&r, "console")?;
        if !r.serial.contains("console got 'hello-keel'") {
            return Err(format!("input not echoed:\n{}", r.serial).into());
        }
        Ok(())
    }));
    for (exit, source) in [
        ("acpi-reset", "ACPI reset"),
        ("i8042", "i8042 reset"),
        ("triple-fault", "triple fault"),
    ] {
        t.push(Trial::test(
            format!("guest_reset_via_{}", exit.replace('-', "_")),
            move || {
                let r = run(KitImage::PvhElf, &format!("test=hello exit={exit}"), 1, MEM)?;
                expect_reason(&r, &ExitReason::Reset { source })?;
                if r.outcome.exit_code() != 0 {
                    return Err("a guest reboot must end keel with status 0".into());
                }
                Ok(())
            },
        ));
    }
    t.push(Trial::test(
        "poweroff_with_two_vcpus_stops_every_vcpu",
        || expect_pass(&run(KitImage::PvhElf, "test=smp", 2, MEM)?, "smp"),
    ));
    t.push(Trial::test(
        "kvm_internal_error_reports_registers_and_code",
        || {
            let r = run(KitImage::PvhElf, "test=hello exit=bad-fetch", 1, MEM)?;
            match &r.outcome.reason {
                ExitReason::VcpuFailed {
                    vcpu: 0,
                    error,
                    state,
                } => {
                    if !error.contains("internal error") && !error.contains("emulation") {
                        return Err(format!("unexpected error text: {error}").into());
                    }
                    if !state.contains("rip=0x00000000f0000000") || !state.contains("code at rip") {
                        return Err(format!("registers/code missing: {state}").into());
                    }
                }
                other => return Err(format!("expected a vCPU failure, got {other:?}").into()),
            }
            if r.outcome.exit_code() == 0 {
                return Err("a vCPU failure must end keel with a non-zero status".into());
            }
            Ok(())
        },
    ));
    t.push(Trial::test(
        "unknown_kit_test_is_reported_by_the_guest",
        || {
            let r = run(KitImage::PvhElf, "test=no-such-test", 1, MEM)?;
            if failures(&r.serial).is_empty() {
                return Err("the kit did not report the unknown test".into());
            }
            Ok(())
        },
    ));
    t.extend(virtio::trials());
    t.extend(snapcount::trials());
    t.push(Trial::test("stop_handle_ends_a_busy_guest", || {
        // The console test waits for input that never comes; stop it from outside.
        let (rd, _wr) = std::io::pipe().map_err(|e| e.to_string())?;
        let vmm = Vmm::new(
            config(KitImage::PvhElf, "test=console", 2, MEM),
            VmIo {
                serial_out: Box::new(std::io::sink()),
                console_in: Some(rd.into()),
                console_escape: false,
            },
        )
        .map_err(|e| e.to_string())?;
        let h = vmm.stop_handle();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            h.stop(ExitReason::Signal(libc::SIGTERM));
        });
        let o = vmm.run().map_err(|e| e.to_string())?;
        if o.reason != ExitReason::Signal(libc::SIGTERM) || o.exit_code() != 143 {
            return Err(format!("unexpected outcome {o:?}").into());
        }
        Ok(())
    }));
    t
}

fn kvm_unavailable() -> Option<String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => None,
        Err(e) => Some(format!("/dev/kvm: {e}")),
    }
}

fn main() {
    if let Ok(spec) = std::env::var(virtio::CHILD_ENV) {
        virtio::child_main(&spec);
    }
    let args = Arguments::from_args();
    let mut trials = trials();
    if let Some(why) = kvm_unavailable() {
        eprintln!(
            "\n*** SKIPPING {} KVM guest-kit tests: {why} ***\n",
            trials.len()
        );
        trials = trials
            .into_iter()
            .map(|t| t.with_ignored_flag(true))
            .collect();
    }
    libtest_mimic::run(&args, trials).exit();
}
