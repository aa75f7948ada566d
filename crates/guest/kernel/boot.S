# Ferry test guest: all ring-0 code (boot, SMP start, interrupt/exception handlers, int3 syscalls).
#
# Included by main.rs through global_asm! (AT&T syntax). The text is a Rust format string: the
# names in braces are const operands supplied by main.rs (struct offsets and sizes), so this file
# must not contain any other braces.
#
# Ring 0 on the Ferry platform is always emulated (~4 M instructions/s) and the emulator cannot
# execute SSE/x87/popcnt/int3/...: keep every path here short and integer-only. Nothing here calls
# compiler-generated (Rust) code; Rust is only entered in ring 3 through iretq.

.equ COM1,          0x3f8
.equ LAPIC,         0xfee00000
.equ LAPIC_ID,      0x20
.equ LAPIC_TPR,     0x80
.equ LAPIC_EOI,     0xb0
.equ LAPIC_SVR,     0xf0
.equ LAPIC_ICR_LO,  0x300
.equ LAPIC_ICR_HI,  0x310
.equ LAPIC_LVT_TMR, 0x320
.equ LAPIC_LVT_LINT0, 0x350
.equ LAPIC_LVT_LINT1, 0x360
.equ MSR_EFER,      0xc0000080
.equ MSR_TSC_DEADLINE, 0x6e0
.equ MSR_KVM_SYSTEM_TIME_NEW, 0x4b564d01
.equ PVH_MAGIC,     0x336ec578
.equ SEL_KCODE64,   0x08
.equ SEL_KDATA,     0x10
.equ SEL_KCODE32,   0x18
.equ SEL_UDATA,     0x23
.equ SEL_UCODE64,   0x2b
.equ SEL_TSS0,      0x30
.equ TSS_STRIDE,    128
.equ TSS_AREA_SIZE, {MAX_CPUS} * TSS_STRIDE
.equ PIT_MIN_TICKS, 50000            # measure over >= 41.9 ms of PIT time
.equ PIT_HZ,        1193182
.equ CHECKIN_CLOSED, 0x80000000

.if {MAX_CPUS} != 16
.error "the .irp lists below assume MAX_CPUS == 16"
.endif

# ---------------------------------------------------------------------------------------------
# PVH ELF note: XEN_ELFNOTE_PHYS32_ENTRY (18) = 32-bit entry point.
    .section .note.Xen, "a", @note
    .balign 4
    .long 4, 4, 18
    .asciz "Xen"
    .balign 4
    .long _start32
    .balign 4

# ---------------------------------------------------------------------------------------------
# BSP entry: 32-bit protected mode, paging off, EBX = hvm_start_info.
    .section .text.boot, "ax", @progbits
    .code32
    .globl _start32
_start32:
    cli
    cld
    mov %ebx, %ebp
    mov %ebx, BOOT_INFO+{BI_SI_PADDR}
    cmpl $PVH_MAGIC, (%ebp)
    jne .Lsi_done
    movl $PVH_MAGIC, BOOT_INFO+{BI_SI_MAGIC}
    mov 4(%ebp), %eax
    mov %eax, BOOT_INFO+{BI_SI_VERSION}

    # command line (copy at most CMDLINE_MAX-1 bytes; only if below 4 GiB)
    cmpl $0, 28(%ebp)
    jne .Lcmdline_done
    mov 24(%ebp), %esi
    test %esi, %esi
    jz .Lcmdline_done
    xor %ecx, %ecx
1:  movb (%esi,%ecx), %al
    test %al, %al
    jz 2f
    movb %al, BOOT_INFO+{BI_CMDLINE}(%ecx)
    inc %ecx
    cmp ${CMDLINE_MAX}-1, %ecx
    jb 1b
2:  mov %ecx, BOOT_INFO+{BI_CMDLINE_LEN}
.Lcmdline_done:

    # memory map (hvm_start_info version >= 1; only if below 4 GiB)
    cmpl $1, 4(%ebp)
    jb .Lsi_done
    cmpl $0, 44(%ebp)
    jne .Lsi_done
    mov 40(%ebp), %esi
    test %esi, %esi
    jz .Lsi_done
    mov 48(%ebp), %ecx
    mov %ecx, BOOT_INFO+{BI_MEMMAP_TOTAL}
    cmp ${MAX_MEMMAP}, %ecx
    jbe 3f
    mov ${MAX_MEMMAP}, %ecx
3:  mov %ecx, BOOT_INFO+{BI_MEMMAP_ENTRIES}
    imul $24, %ecx, %ecx
    mov $BOOT_INFO+{BI_MEMMAP}, %edi
    rep movsb
.Lsi_done:

    # Identity map [0, gib GiB) with 2 MiB pages, U/S=1:
    # gib = clamp(ceil(highest RAM end / 1 GiB), 4, PD_PAGES)
    mov $4, %ebx
    mov BOOT_INFO+{BI_MEMMAP_ENTRIES}, %ecx
    mov $BOOT_INFO+{BI_MEMMAP}, %esi
4:  test %ecx, %ecx
    jz 6f
    cmpl $1, 16(%esi)
    jne 5f
    mov (%esi), %eax
    mov 4(%esi), %edx
    add 8(%esi), %eax
    adc 12(%esi), %edx
    add $0x3fffffff, %eax
    adc $0, %edx
    mov ${PD_PAGES}, %edi
    cmp $({PD_PAGES} / 4), %edx
    jae 55f
    shrd $30, %edx, %eax
    mov %eax, %edi
55: cmp %ebx, %edi
    jbe 5f
    mov %edi, %ebx
5:  add $24, %esi
    dec %ecx
    jmp 4b
6:  cmp ${PD_PAGES}, %ebx
    jbe 7f
    mov ${PD_PAGES}, %ebx
7:  mov %ebx, BOOT_INFO+{BI_MAPPED_GIB}

    movl $pdpt+7, pml4
    xor %ecx, %ecx
    mov $pd_pool+7, %eax
8:  mov %eax, pdpt(,%ecx,8)
    add $4096, %eax
    inc %ecx
    cmp %ebx, %ecx
    jb 8b

    shl $9, %ebx                      # number of 2 MiB entries
    mov $pd_pool, %edi
    mov $0x87, %eax                   # P | RW | US | PS
    xor %edx, %edx
9:  mov %eax, (%edi)
    mov %edx, 4(%edi)
    add $8, %edi
    add $0x200000, %eax
    adc $0, %edx
    dec %ebx
    jnz 9b
    # IOAPIC (0xfec00000) and LAPIC (0xfee00000) 2 MiB pages: uncached
    orl $0x18, pd_pool + (0xfec00000 >> 21) * 8
    orl $0x18, pd_pool + (0xfee00000 >> 21) * 8

    xor %esi, %esi                    # 0 = BSP
    # fall through

# Common 32-bit -> long mode switch (BSP and APs). ESI = 0 on the BSP, 1 on APs.
lm_enable:
    lgdt gdtr
    mov %cr4, %eax
    or $0x620, %eax                   # PAE | OSFXSR | OSXMMEXCPT
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov $MSR_EFER, %ecx
    rdmsr
    or $0x100, %eax                   # LME
    wrmsr
    mov %cr0, %eax
    and $0x9ffffff3, %eax             # clear CD, NW, TS, EM
    or $0x80010033, %eax              # PG | WP | NE | ET | MP | PE
    mov %eax, %cr0
    ljmp $SEL_KCODE64, $entry64

# AP, after the real-mode trampoline switched to 32-bit protected mode.
ap_entry32:
    mov $SEL_KDATA, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $1, %esi
    jmp lm_enable

# ---------------------------------------------------------------------------------------------
    .code64
entry64:
    mov $SEL_KDATA, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %eax, %eax
    mov %ax, %fs
    mov %ax, %gs
    test %esi, %esi
    jnz ap_main64

# ---- BSP ----
    mov $LAPIC, %eax
    mov LAPIC_ID(%rax), %ebx
    shr $24, %ebx
    mov %ebx, BOOT_INFO+{BI_BSP_ID}
    mov %ebx, %eax
    cmp ${MAX_CPUS}, %ebx
    jb 1f
    xor %eax, %eax                    # APIC id too big: use slot 0 for the stack, then panic
1:  inc %eax
    imul ${KSTACK_SIZE}, %eax, %eax
    lea kstacks(%rax), %rsp
    cmp ${MAX_CPUS}, %ebx
    jae bsp_bad_id

    # TSS descriptors (base is split; the TSS contents themselves are static data)
    lea gdt_tss(%rip), %rdi
    mov $tss_area, %eax
    mov $TSS_AREA_SIZE + 8192, %edx   # limit: iomap offset + 8192 (terminator byte)
    xor %ecx, %ecx
2:  mov %rax, %r8
    and $0xffffff, %r8d
    shl $16, %r8
    mov %rax, %r9
    shr $24, %r9
    shl $56, %r9
    or %r9, %r8
    or %rdx, %r8
    movabs $0x0000890000000000, %r9
    or %r9, %r8
    mov %r8, (%rdi)
    movq $0, 8(%rdi)
    add $16, %rdi
    add $TSS_STRIDE, %eax
    sub $TSS_STRIDE, %edx
    inc %ecx
    cmp ${MAX_CPUS}, %ecx
    jb 2b

    # IDT: 0..31 -> panic stubs, 3 -> int3 syscall (DPL 3), timer, spurious
    xor %edi, %edi
3:  mov %rdi, %rax
    shl $4, %rax
    add $exc_stubs, %rax
    mov $0x8e, %edx
    call set_gate
    inc %edi
    cmp $32, %edi
    jb 3b
    mov $3, %edi
    mov $syscall_entry, %eax
    mov $0xee, %edx
    call set_gate
    mov ${TIMER_VECTOR}, %edi
    mov $timer_entry, %eax
    mov $0x8e, %edx
    call set_gate
    mov $0xff, %edi
    mov $spurious_entry, %eax
    mov $0x8e, %edx
    call set_gate

    # features: TSC-deadline timer (CPUID.1:ECX[24])
    push %rbx
    mov $1, %eax
    cpuid
    shr $24, %ecx
    and $1, %ecx
    mov %ecx, BOOT_INFO+{BI_HAS_DEADLINE}
    pop %rbx

    call percpu_init

    # mask the legacy PICs (nothing of ours uses them)
    mov $0xff, %al
    out %al, $0x21
    out %al, $0xa1

    call tsc_calibrate

    # SMP: trampoline below 1 MiB, INIT / SIPI / SIPI to all excluding self
    mov $1, %eax
    mov %ebx, %ecx
    shl %cl, %eax
    lock orl %eax, BOOT_INFO+{BI_CPU_MASK}
    lea ap_tramp_start(%rip), %rsi
    mov ${TRAMPOLINE}, %edi
    mov $(ap_tramp_end - ap_tramp_start), %ecx
    rep movsb
    mov $LAPIC, %eax
    movl $0, LAPIC_ICR_HI(%rax)
    movl $0x000c4500, LAPIC_ICR_LO(%rax)          # INIT, assert, all excluding self
    mov r0_ticks_per_ms(%rip), %rcx
    call delay
    mov $LAPIC, %eax
    movl $0x000c4600 + ({TRAMPOLINE} >> 12), LAPIC_ICR_LO(%rax)   # SIPI
    mov r0_ticks_per_ms(%rip), %rcx
    shr $2, %rcx
    call delay
    mov $LAPIC, %eax
    movl $0x000c4600 + ({TRAMPOLINE} >> 12), LAPIC_ICR_LO(%rax)   # SIPI again

    # Wait for APs. First for every CPU that CPUID announces (leaf 1: EBX[23:16] logical
    # processors when EDX.HTT; Ferry numbers them 0..N-1), however slow their start is (a
    # nested or emulated host can take seconds), at most 10 s; then as before: at least 50 ms,
    # until no new AP for 20 ms, at most 500 ms from the start (or all 16 in).
    push %rbx
    mov $1, %eax
    cpuid
    mov $1, %r10d
    bt $28, %edx
    jnc 1f
    shr $16, %ebx
    movzbl %bl, %r10d
    cmp $1, %r10d
    jae 1f
    mov $1, %r10d
1:  cmp ${MAX_CPUS}, %r10d
    jbe 2f
    mov ${MAX_CPUS}, %r10d
2:  pop %rbx
    mov %r10d, %ecx
    mov $1, %r9d
    shl %cl, %r9d
    dec %r9d                          # R9D = the mask of the announced CPUs
    rdtsc
    shl $32, %rdx
    or %rdx, %rax
    mov %rax, %r12                    # start
    mov %rax, %r13                    # time of the last change
    mov BOOT_INFO+{BI_CPU_MASK}, %r14d
    mov r0_ticks_per_ms(%rip), %r15
4:  pause
    rdtsc
    shl $32, %rdx
    or %rdx, %rax
    mov BOOT_INFO+{BI_CPU_MASK}, %ecx
    cmp %r14d, %ecx
    je 5f
    mov %ecx, %r14d
    mov %rax, %r13
5:  cmp $0xffff, %cx
    je 6f
    mov %rax, %rdx
    sub %r12, %rdx                    # elapsed
    mov %ecx, %r10d
    and %r9d, %r10d
    cmp %r9d, %r10d
    je 55f                            # every announced CPU is in
    imul $10000, %r15, %r11
    cmp %r11, %rdx
    jb 4b                             # not yet, and less than 10 s
    jmp 6f
55: imul $500, %r15, %rcx
    cmp %rcx, %rdx
    jae 6f
    imul $50, %r15, %rcx
    cmp %rcx, %rdx
    jb 4b
    mov %rax, %rdx
    sub %r13, %rdx                    # since the last check-in
    imul $20, %r15, %rcx
    cmp %rcx, %rdx
    jb 4b
6:  mov BOOT_INFO+{BI_CPU_MASK}, %eax # close the check-in window atomically
7:  mov %eax, %ecx
    or $CHECKIN_CLOSED, %ecx
    lock cmpxchg %ecx, BOOT_INFO+{BI_CPU_MASK}
    jne 7b
    jmp enter_user

bsp_bad_id:
    lea msg_bad_bsp(%rip), %rsi
    call r0_puts
    jmp halt_forever

# ---- AP ----
ap_main64:
    mov $LAPIC, %eax
    mov LAPIC_ID(%rax), %ebx
    shr $24, %ebx
    cmp ${MAX_CPUS}, %ebx
    jae halt_forever
    lea 1(%rbx), %eax
    imul ${KSTACK_SIZE}, %eax, %eax
    lea kstacks(%rax), %rsp
    call percpu_init
    mov BOOT_INFO+{BI_CPU_MASK}, %eax
1:  test $CHECKIN_CLOSED, %eax
    jnz halt_forever                  # too late: the BSP already counted the CPUs
    mov %eax, %ecx
    bts %ebx, %ecx
    lock cmpxchg %ecx, BOOT_INFO+{BI_CPU_MASK}
    jne 1b
    # fall through

# Enter ring 3 at user_main(cpu = RBX, info = &BOOT_INFO) on this CPU's user stack.
enter_user:
    mov %ebx, %eax
    inc %eax
    imul ${USTACK_SIZE}, %eax, %eax
    lea user_stacks-8(%rax), %rax     # RSP % 16 == 8 at function entry
    pushq $SEL_UDATA
    push %rax
    pushq $0x3202                     # IF=1, IOPL=3 (see main.rs: ports after a restore)
    pushq $SEL_UCODE64
    mov $user_main, %eax
    push %rax
    mov %ebx, %edi
    mov $BOOT_INFO, %esi
    xor %eax, %eax
    xor %ebx, %ebx
    xor %ecx, %ecx
    xor %edx, %edx
    xor %ebp, %ebp
    xor %r8d, %r8d
    xor %r9d, %r9d
    xor %r10d, %r10d
    xor %r11d, %r11d
    xor %r12d, %r12d
    xor %r13d, %r13d
    xor %r14d, %r14d
    xor %r15d, %r15d
    iretq

halt_forever:
    cli
1:  hlt
    jmp 1b

# Per-CPU setup: GDT, IDT, TSS (EBX = cpu), FPU, LAPIC. Clobbers RAX, RCX.
percpu_init:
    lgdt gdtr(%rip)
    lidt idtr(%rip)
    mov %ebx, %eax
    shl $4, %eax
    add $SEL_TSS0, %eax
    ltr %ax
    fninit
    mov $LAPIC, %eax
    movl $0, LAPIC_TPR(%rax)
    movl $0x1ff, LAPIC_SVR(%rax)      # software enable, spurious vector 0xff
    movl $0x10000, LAPIC_LVT_LINT0(%rax)
    movl $0x10000, LAPIC_LVT_LINT1(%rax)
    mov $0x10000, %ecx                # masked unless TSC-deadline mode is available
    cmpl $0, BOOT_INFO+{BI_HAS_DEADLINE}
    je 1f
    mov $({TIMER_VECTOR} | (2 << 17)), %ecx
1:  mov %ecx, LAPIC_LVT_TMR(%rax)
    ret

# IDT gate: EDI = vector, RAX = handler, EDX = type/attr byte. Clobbers R8, R9.
set_gate:
    mov %rdi, %r8
    shl $4, %r8
    add $idt, %r8
    mov %ax, (%r8)
    movw $SEL_KCODE64, 2(%r8)
    movb $0, 4(%r8)
    mov %dl, 5(%r8)
    mov %rax, %r9
    shr $16, %r9
    mov %r9w, 6(%r8)
    shr $16, %r9
    mov %r9d, 8(%r8)
    movl $0, 12(%r8)
    ret

# Busy-wait RCX TSC ticks. Clobbers RAX, RDX, R8.
delay:
    rdtsc
    shl $32, %rdx
    or %rdx, %rax
    mov %rax, %r8
1:  pause
    rdtsc
    shl $32, %rdx
    or %rdx, %rax
    sub %r8, %rax
    cmp %rcx, %rax
    jb 1b
    ret

# TSC frequency: kvmclock (pvclock mul/shift) if advertised, else PIT channel 0.
# Stores BOOT_INFO.tsc_hz / tsc_source and r0_ticks_per_ms. Clobbers RAX, RCX, RDX, RSI, RDI, R8-R11.
tsc_calibrate:
    push %rbx
    mov $0x40000000, %eax
    cpuid
    cmp $0x4b4d564b, %ebx             # "KVMKVMKVM\0\0\0"
    jne .Lpit
    cmp $0x564b4d56, %ecx
    jne .Lpit
    cmp $0x4d, %edx
    jne .Lpit
    cmp $0x40000001, %eax
    jb .Lpit
    mov $0x40000001, %eax
    cpuid
    test $8, %eax                     # KVM_FEATURE_CLOCKSOURCE2
    jz .Lpit
    mov $MSR_KVM_SYSTEM_TIME_NEW, %ecx
    mov $pvclock+1, %eax
    xor %edx, %edx
    wrmsr
    mov $200000, %r8d
1:  mov pvclock(%rip), %r9d           # version
    test $1, %r9d
    jnz 2f
    mov pvclock+24(%rip), %r10d       # tsc_to_system_mul
    movsbl pvclock+28(%rip), %r11d    # tsc_shift
    cmp pvclock(%rip), %r9d
    jne 2f
    test %r10d, %r10d
    jnz 3f
2:  pause
    dec %r8d
    jnz 1b
    call kvmclock_off
    jmp .Lpit
3:  call kvmclock_off
    movabs $4294967296000000000, %rax # 1e9 << 32
    xor %edx, %edx
    div %r10
    mov %r11d, %ecx
    test %ecx, %ecx
    js 4f
    shr %cl, %rax
    jmp 5f
4:  neg %ecx
    shl %cl, %rax
5:  mov $1, %ecx
    jmp .Lhz

.Lpit:
    # PIT channel 0 (its gate is always on; port 0x61 / channel 2 may not exist, e.g. QEMU
    # microvm has no speaker port), mode 0 from 0xffff, sampled with latch commands. IRQ0 goes
    # nowhere: both PICs and LINT0 are masked and the IOAPIC pins are masked at reset.
    mov $0x30, %al                    # channel 0, lobyte/hibyte, mode 0, binary
    out %al, $0x43
    mov $0xff, %al
    out %al, $0x40
    out %al, $0x40
    call pit_sample
    mov %ecx, %edi                    # first count
    mov %rax, %rsi                    # TSC right after it was read
6:  call pit_sample
    mov %rax, %r8
    sub %rsi, %r8                     # TSC ticks since the first sample
    cmp $500000000, %r8               # give up after 5e8 ticks (>= 50 ms below 10 GHz)
    ja .Lnohz
    mov %edi, %edx
    sub %ecx, %edx                    # PIT ticks since the first sample
    cmp $PIT_MIN_TICKS, %edx
    jb 6b
    mov %r8, %rax
    imul $PIT_HZ, %rax, %rax
    mov %edx, %ecx
    xor %edx, %edx
    div %rcx
    mov $100000000, %rcx              # plausible: 100 MHz .. 20 GHz
    cmp %rcx, %rax
    jb .Lnohz
    movabs $20000000000, %rcx
    cmp %rcx, %rax
    ja .Lnohz
    mov $2, %ecx
    jmp .Lhz
.Lnohz:
    xor %eax, %eax
    xor %ecx, %ecx
.Lhz:
    mov %rax, BOOT_INFO+{BI_TSC_HZ}
    mov %ecx, BOOT_INFO+{BI_TSC_SOURCE}
    test %rax, %rax
    jz 8f
    xor %edx, %edx
    mov $1000, %ecx
    div %rcx
    mov %rax, r0_ticks_per_ms(%rip)
8:  pop %rbx
    ret

# Latch and read PIT channel 0: ECX = count, RAX = TSC just after. Clobbers RDX.
pit_sample:
    xor %eax, %eax                    # latch channel 0
    out %al, $0x43
    in $0x40, %al
    mov %al, %cl
    in $0x40, %al
    mov %al, %ch
    movzwl %cx, %ecx
    rdtsc
    shl $32, %rdx
    or %rdx, %rax
    ret

kvmclock_off:
    mov $MSR_KVM_SYSTEM_TIME_NEW, %ecx
    xor %eax, %eax
    xor %edx, %edx
    wrmsr
    ret

# ---------------------------------------------------------------------------------------------
# Interrupt and exception handlers.

# Vectors 0..31: 16-byte stubs that push (error code or 0, vector) and go to panic_common.
    .balign 16
exc_stubs:
.irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .balign 16
    .if (\v == 8) || (\v == 10) || (\v == 11) || (\v == 12) || (\v == 13) || (\v == 14) || (\v == 17) || (\v == 21) || (\v == 29) || (\v == 30)
    .else
    pushq $0
    .endif
    pushq $\v
    jmp panic_common
.endr

# PANIC cpu=<n> vec=<v> err=0x<hex> rip=0x<hex> cr2=0x<hex>, then halt this CPU forever.
panic_common:
    cli
    cld
    mov (%rsp), %r12                  # vector
    mov 8(%rsp), %r13                 # error code
    mov 16(%rsp), %r14                # rip
    mov %cr2, %r15
    mov $LAPIC, %eax
    mov LAPIC_ID(%rax), %ebx
    shr $24, %ebx
    # Serial lock (shared with ring 3): 0 = free, else owner cpu + 1. Bounded wait.
    lea 1(%rbx), %ecx
    xor %ebp, %ebp                    # 1 if we must release the lock
    mov $100000, %r8d
1:  mov SERIAL_LOCK(%rip), %eax
    cmp %ecx, %eax
    je 3f                             # this CPU was interrupted mid-line in ring 3
    test %eax, %eax
    jnz 2f
    lock cmpxchg %ecx, SERIAL_LOCK(%rip)
    jne 2f
    mov $1, %ebp
    jmp 4f
2:  pause
    dec %r8d
    jnz 1b
    jmp 4f
3:  mov $1, %ebp
    mov $10, %al
    call r0_putc
4:  lea msg_panic_cpu(%rip), %rsi
    call r0_puts
    mov %rbx, %rax
    call r0_putdec
    lea msg_panic_vec(%rip), %rsi
    call r0_puts
    mov %r12, %rax
    call r0_putdec
    lea msg_panic_err(%rip), %rsi
    call r0_puts
    mov %r13, %rax
    call r0_puthex
    lea msg_panic_rip(%rip), %rsi
    call r0_puts
    mov %r14, %rax
    call r0_puthex
    lea msg_panic_cr2(%rip), %rsi
    call r0_puts
    mov %r15, %rax
    call r0_puthex
    mov $10, %al
    call r0_putc
    test %ebp, %ebp
    jz halt_forever
    movl $0, SERIAL_LOCK(%rip)
    jmp halt_forever

# int3 from ring 3 = system call. RAX = function, arguments in RDI. Returns RAX (0 = ok,
# -1 = unknown function); every other register is preserved.
#   1: sleep until TSC >= RDI (TSC-deadline timer + hlt)
#   2: halt this CPU forever (interrupts off)
#   3: reset the machine through the i8042 controller (command 0xFE to port 0x64)
syscall_entry:
    cmp $1, %rax
    je 1f
    cmp $2, %rax
    je halt_forever
    cmp $3, %rax
    jne 4f
    mov $0xfe, %al
    out %al, $0x64
    jmp halt_forever                  # no i8042: nothing else to do
4:
    mov $-1, %rax
    iretq
1:  push %rcx
    push %rdx
2:  rdtsc
    shl $32, %rdx
    or %rdx, %rax
    cmp %rdi, %rax
    jae 3f                            # due: done (the timer is not armed again)
    # (Re-)arm the one-shot deadline on every round: a wake-up before the deadline (another
    # interrupt, or a deadline timer that fired a little early, e.g. on a migration
    # destination whose TSC runs with a different offset) has used up the armed timer, and
    # halting again without re-arming it would halt this CPU for good.
    mov $MSR_TSC_DEADLINE, %ecx
    mov %edi, %eax
    mov %rdi, %rdx
    shr $32, %rdx
    wrmsr
    sti
    hlt                               # woken by the deadline timer (or any interrupt)
    cli
    jmp 2b
3:  pop %rdx
    pop %rcx
    xor %eax, %eax
    iretq

timer_entry:
    push %rax
    mov $LAPIC + LAPIC_EOI, %eax
    movl $0, (%rax)
    pop %rax
    iretq

spurious_entry:
    iretq

# Ring-0 serial output helpers (panic path only).
r0_putc:                              # AL -> COM1; clobbers DX
    mov $COM1, %dx
    out %al, %dx
    ret

r0_puts:                              # RSI = NUL-terminated string; clobbers RAX, RDX, RSI
1:  lodsb
    test %al, %al
    jz 2f
    call r0_putc
    jmp 1b
2:  ret

r0_putdec:                            # RAX = value; clobbers RAX, RCX, RDX, RDI
    sub $32, %rsp
    lea 32(%rsp), %rdi
    mov $10, %ecx
1:  xor %edx, %edx
    div %rcx
    add $48, %dl
    dec %rdi
    mov %dl, (%rdi)
    test %rax, %rax
    jnz 1b
2:  mov (%rdi), %al
    call r0_putc
    inc %rdi
    lea 32(%rsp), %rcx
    cmp %rcx, %rdi
    jb 2b
    add $32, %rsp
    ret

r0_puthex:                            # RAX = value, printed as 0x<hex>; clobbers RAX, RCX, RDX, RSI, RDI
    mov %rax, %rdi
    mov $48, %al
    call r0_putc
    mov $120, %al
    call r0_putc
    mov $60, %ecx
    xor %esi, %esi
1:  mov %rdi, %rax
    shr %cl, %rax
    and $15, %eax
    test %esi, %esi
    jnz 2f
    test %eax, %eax
    jnz 2f
    test %ecx, %ecx
    jnz 3f
2:  mov $1, %esi
    movzbl hexdigits(%rax), %eax
    call r0_putc
3:  sub $4, %ecx
    jns 1b
    ret

# ---------------------------------------------------------------------------------------------
# AP real-mode trampoline, copied to TRAMPOLINE (SIPI vector TRAMPOLINE >> 12; CS = TRAMPOLINE >> 4).
    .code16
ap_tramp_start:
    cli
    cld
    mov %cs, %ax
    mov %ax, %ds
    lgdtl ap_tramp_gdtr - ap_tramp_start
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $SEL_KCODE32, $ap_entry32
    .balign 4
ap_tramp_gdtr:
    .word gdt_end - gdt - 1
    .long gdt
ap_tramp_end:
    .code64

# ---------------------------------------------------------------------------------------------
    .section .rodata.ferry_r0, "a", @progbits
hexdigits:     .ascii "0123456789abcdef"
msg_panic_cpu: .asciz "PANIC cpu="
msg_panic_vec: .asciz " vec="
msg_panic_err: .asciz " err="
msg_panic_rip: .asciz " rip="
msg_panic_cr2: .asciz " cr2="
msg_bad_bsp:   .asciz "PANIC bsp apic id >= 16\n"

    .section .data.ferry_r0, "aw", @progbits
    .balign 16
gdt:
    .quad 0
    .quad 0x00af9b000000ffff          # 0x08 kernel code 64
    .quad 0x00cf93000000ffff          # 0x10 kernel data
    .quad 0x00cf9b000000ffff          # 0x18 kernel code 32 (AP trampoline)
    .quad 0x00cff3000000ffff          # 0x20 user data (SS = 0x23)
    .quad 0x00affb000000ffff          # 0x28 user code 64 (CS = 0x2b)
gdt_tss:                              # 0x30 + 16 * cpu: TSS descriptors, filled at boot
    .fill {MAX_CPUS} * 2, 8, 0
gdt_end:
    .balign 8
    .word 0, 0, 0
gdtr:
    .word gdt_end - gdt - 1
    .quad gdt
    .word 0, 0, 0
idtr:
    .word 256 * 16 - 1
    .quad idt
    .balign 8
r0_ticks_per_ms:
    .quad 3000000                     # until calibrated: assume 3 GHz

# One 128-byte slot per CPU holding its 104-byte 64-bit TSS, followed by ONE I/O permission
# bitmap shared by all TSSs (each TSS's iomap base is the offset from itself to the bitmap).
    .balign 4096
tss_area:
.irp c, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
    .long 0
    .quad kstacks + (\c + 1) * {KSTACK_SIZE}    # RSP0
    .fill 90, 1, 0
    .word TSS_AREA_SIZE - \c * TSS_STRIDE       # I/O map base
    .fill TSS_STRIDE - 104, 1, 0
.endr
iobitmap:                             # only COM1 (0x3f8-0x3ff = byte 127) allowed
    .fill 127, 1, 0xff
    .byte 0
    .fill 8192 - 128, 1, 0xff
    .byte 0xff                        # terminator
    .balign 8

    .section .bss.ferry_r0, "aw", @nobits
    .balign 4096
pml4:    .skip 4096
pdpt:    .skip 4096
pd_pool: .skip {PD_PAGES} * 4096
idt:     .skip 4096
kstacks: .skip {MAX_CPUS} * {KSTACK_SIZE}
    .globl user_stacks
user_stacks: .skip {MAX_CPUS} * {USTACK_SIZE}
    .balign 64
pvclock: .skip 64

    .text
