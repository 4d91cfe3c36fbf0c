/*
 * Entry points of the Keel guest test kit.
 *
 * - pvh_start: the PVH entry (32-bit protected mode, paging off, %ebx = hvm_start_info),
 *   named by the XEN_ELFNOTE_PHYS32_ENTRY note. Builds identity page tables for the low
 *   4 GiB, enters long mode and calls kit_main(info, KIT_PVH).
 * - entry64: the Linux 64-bit boot protocol entry (long mode, %rsi = boot_params), at
 *   load address + 0x200 as in a bzImage. Calls kit_main(boot_params, KIT_LINUX64).
 * - ap_trampoline: 16-bit real-mode code an application processor runs after SIPI; it is
 *   copied to KIT_AP_BASE at run time.
 */

#define KIT_PVH 1
#define KIT_LINUX64 2
#define AP_BASE 0x8000
#define AP_COUNT (AP_BASE + 0x100)
#define AP_SEEN (AP_BASE + 0x110)

    .section .text.head, "ax"
    .code64
    .globl _start
_start:
    .fill 0x200, 1, 0x90          /* the 64-bit entry lives at +0x200, as in a bzImage */
    .globl entry64
entry64:
    cli
    lea stack_top(%rip), %rsp
    mov %rsi, %rdi
    mov $KIT_LINUX64, %esi
    call kit_main
1:  cli
    hlt
    jmp 1b

    .code32
    .globl pvh_start
pvh_start:
    cli
    mov %ebx, pvh_info
    /* 4 page directories of 2 MiB pages: identity map of 0..4 GiB. */
    mov $pd, %edi
    xor %ecx, %ecx
2:  mov %ecx, %eax
    shl $21, %eax
    or $0x83, %eax
    mov %eax, (%edi,%ecx,8)
    mov %ecx, %eax
    shr $11, %eax                 /* high dword: (i << 21) >> 32 */
    mov %eax, 4(%edi,%ecx,8)
    inc %ecx
    cmp $2048, %ecx
    jne 2b
    mov $pdpt, %edi
    xor %ecx, %ecx
3:  mov %ecx, %eax
    shl $12, %eax
    add $pd, %eax
    or $3, %eax
    mov %eax, (%edi,%ecx,8)
    movl $0, 4(%edi,%ecx,8)
    inc %ecx
    cmp $4, %ecx
    jne 3b
    mov $pdpt, %eax
    or $3, %eax
    mov %eax, pml4
    mov $pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x20, %eax                /* PAE */
    mov %eax, %cr4
    mov $0xc0000080, %ecx         /* EFER.LME */
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax          /* PG | PE */
    mov %eax, %cr0
    lgdt gdt_desc
    ljmp $0x08, $pvh_long

    .code64
pvh_long:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    lea stack_top(%rip), %rsp
    mov pvh_info(%rip), %edi
    mov $KIT_PVH, %esi
    call kit_main
4:  cli
    hlt
    jmp 4b

    /* Interrupt stub for the kit's timer vector: count, EOI, return. */
    .globl timer_isr
timer_isr:
    push %rax
    lock incl timer_ticks(%rip)
    mov $0xfee000b0, %eax         /* LAPIC EOI */
    movl $0, (%rax)
    pop %rax
    iretq

    /* One 16-byte stub per vector: exceptions without an error code and interrupts push a
       dummy one, then every stub pushes its vector and joins isr_common, which calls
       kit_isr(vector, &error_code) with the C caller-saved registers preserved. */
    .globl isr_stubs
    .align 16
isr_stubs:
    .set vec, 0
    .rept 256
0:
    .if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    pushq $0
    .endif
    pushq $vec
    jmp isr_common
    .org 0b + 16                  /* fails to assemble if a stub outgrows its slot */
    .set vec, vec + 1
    .endr

isr_common:
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %r8
    push %r9
    push %r10
    push %r11
    mov 72(%rsp), %rdi            /* the vector */
    lea 80(%rsp), %rsi            /* error code, then the CPU's frame */
    cld
    call kit_isr
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    add $16, %rsp                 /* vector and error code */
    iretq

    /* Real-mode AP code, copied to AP_BASE; entered with CS = AP_BASE >> 4, IP = 0. */
    .code16
    .globl ap_trampoline, ap_trampoline_end
ap_trampoline:
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov $1, %eax
    cpuid
    shr $24, %ebx
    movb $1, AP_SEEN(%bx)
    lock incl AP_COUNT
5:  cli
    hlt
    jmp 5b
ap_trampoline_end:

    .section .data
    .align 16
gdt:
    .quad 0
    .quad 0x00af9b000000ffff      /* 0x08: 64-bit code */
    .quad 0x00cf93000000ffff      /* 0x10: data */
gdt_desc:
    .word gdt_desc - gdt - 1
    .long gdt
    .align 4
pvh_info:
    .long 0
    .globl timer_ticks
timer_ticks:
    .long 0

    .section .bss
    .align 4096
pml4:   .skip 4096
pdpt:   .skip 4096
pd:     .skip 4096 * 4
stack:  .skip 16384
stack_top:

    .section .note.Xen, "a"
    .align 4
    .long 4                       /* name size: "Xen\0" */
    .long 4                       /* descriptor size */
    .long 18                      /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long pvh_start

    .section .note.GNU-stack, "", @progbits
