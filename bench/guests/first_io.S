/*
 * first_io: the smallest guest that makes a VMM exit, for measuring
 * "launch -> first guest I/O exit" (bench/run.py, measurement a).
 *
 * A PVH ELF: the `.note.Xen` note XEN_ELFNOTE_PHYS32_ENTRY (18) names the
 * 32-bit entry, linked at 1 MiB (see bench/guests/first_io.ld). The ELF
 * entry point is the same code, so a VMM that ignores the PVH note and jumps
 * to e_entry in 64-bit mode runs it too: every instruction below has the same
 * encoding and meaning in 32-bit and 64-bit mode.
 *
 * The first instructions are port writes, each of which ends one kind of VMM:
 *   1. 0x01 -> port 0xf4: QEMU's isa-debug-exit (-device isa-debug-exit,
 *      iobase=0xf4,iosize=0x04); QEMU exits with status (1 << 1) | 1 = 3.
 *   2. 0xfe -> port 0x64: i8042 "pulse reset line": Keel and Firecracker stop
 *      the VM (QEMU with -no-reboot too).
 *   3. 0x34 -> port 0x600: ACPI PM1 sleep control, SLP_TYP = 5 (S5) | SLP_EN:
 *      Keel's (and Cloud Hypervisor's) sleep-control register: power off.
 * A VMM that ignores a write simply resumes the guest at the next one.
 * (Cloud Hypervisor reboots on the i8042 reset instead of exiting, and its
 * reboot would run this guest again; bench/run.py builds it for CH with
 * -DS5_FIRST, which swaps steps 2 and 3.)
 */
    .section .text.head, "ax"
    .code32
    .globl _start
_start:
    cli
    mov $0x01, %al
    outb %al, $0xf4
#ifdef S5_FIRST
    mov $0x34, %al
    mov $0x600, %dx
    outb %al, %dx
    mov $0xfe, %al
    outb %al, $0x64
#else
    mov $0xfe, %al
    outb %al, $0x64
    mov $0x34, %al
    mov $0x600, %dx
    outb %al, %dx
#endif
1:  hlt
    jmp 1b

    .section .note.Xen, "a"
    .align 4
    .long 4                       /* name size: "Xen\0" */
    .long 4                       /* descriptor size */
    .long 18                      /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long _start

    .section .note.GNU-stack, "", @progbits
