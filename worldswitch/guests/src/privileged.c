/* privileged: executes in ring 0 the privileged instructions a kernel uses, checking what each did:
 * control registers (mov to and from CR0, CR2, CR3, CR4; clts), MSRs (wrmsr and rdmsr, SYSENTER's,
 * and two wrmsrs the CPU refuses with #GP: an MSR that does not exist, and the x2APIC's EOI in xAPIC
 * mode), swapgs, lgdt and lidt, invlpg, wbinvd, and the interrupt flag (an interrupt held by cli until
 * sti, and sti;hlt woken by one); XCR0 (xsetbv, and one the CPU refuses), the debug registers and
 * LLDT's null selector; then the descriptor stores (sgdt, sidt, sldt, str, smsw), which a kernel
 * may read in ring 0 and its user mode too, and which must show the kernel's own tables. Every host
 * gives the same answer; under the monitor each of them traps and is emulated (docs/monitor.md). Reports, from user mode, DONE(checks passed, ticks, refused
 * wrmsr #GPs, 0).
 *   linux   first loads a GDT with Linux's layout (arch/x86/include/asm/segment.h: kernel CS 0x10,
 *           DS 0x18, user DS 0x2b, CS 0x33, TSS 0x40), reloading CS with LRETQ and SS with MOV, and
 *           runs the same checks on it; it enters user mode with SYSRETQ from Linux's STAR.
 *   linux syscalls [N]  ... then makes N (default 8) SYSCALLs from user mode into an entry shaped
 *           as Linux's, in a supervisor-only page as Linux keeps it (SWAPGS first; SWAPGS, a short
 *           jump over VERW's bytes and SYSRETQ to return), which reads its per-CPU word through GS:
 *           DONE(..., calls that read it); then two into an entry without SWAPGS, which must read
 *           the user mode's word through GS. With `nops`, NOPs stand where the jump and VERW's
 *           bytes were, as in Linux 6.12's return; with `verw`, the VERW itself (under the monitor
 *           only: KVM's emulator of ring 0 has no VERW).
 *   msrgate (under the monitor only) also writes MSRs through the monitor's pv_ops.cpu.write_msr, as
 *           a paravirtual Linux does: the FS base (ring 0 writes it, or ring 3 where the host lets
 *           it), the user mode's GS base behind SWAPGS (likewise, or owed by ring 3 until the monitor
 *           next swaps or reads it), STAR (the monitor keeps it: a trap) and a non-canonical FS base
 *           (a #GP at the pv page's WRMSR): 6 more checks, 1 more refused write. */
#include "ws.h"

#define TIMER_VECTOR 0x30
#define MSR_STAR 0xc0000081
#define MSR_SYSENTER_CS 0x174 /* then ESP, EIP */
#define MSR_GS_BASE 0xc0000101
#define MSR_KERNEL_GS_BASE 0xc0000102
#define MSR_NONEXISTENT 0xdeadbeef
#define MSR_X2APIC_EOI 0x80b
#define PROGRAM_GDT_BASE 0x1000 /* boot/longmode.py: the VMM's GDT, seven entries */
#define PROGRAM_GDT_LIMIT (7 * 8 - 1)
#define PROGRAM_TR 0x28 /* boot/longmode.py PROGRAM_GDT.tss */
#define IDT_LIMIT (256 * 16 - 1) /* runtime.c's IDT */
#define MSR_EFER 0xc0000080
#define EFER_SCE 1
#define MSR_LSTAR 0xc0000082
#define MSR_SFMASK 0xc0000084
#define LINUX_SFMASK 0x47700ul /* TF DF IF IOPL NT AC: what Linux masks at SYSCALL */
#define SUPERVISOR_PAGE 0x06000000ul /* a 2 MiB page of the identity map nothing else uses */
#define MSR_FS_BASE 0xc0000100
#define PV_WRITE_MSR 0xffffffffffe000c0ul /* the monitor's pv page (monitor.h PV_BASE + PV_WRITE_MSR) */

/* Linux's GDT layout, for `linux`. */
#define LINUX_KERNEL_CS 0x10
#define LINUX_KERNEL_DS 0x18
#define LINUX_USER32_CS 0x23 /* STAR's SYSRET base: user DS = base + 8, user CS = base + 16 */
#define LINUX_TSS 0x40
static u64 linux_gdt[10] __attribute__((aligned(16)));
static int linux_layout;

static volatile u64 ticks, refused;
static u64 kernel_cr0; /* for user mode's smsw */
static volatile u64 per_cpu = 0x7065722d637075; /* what a kernel's GS base points at after swapgs */
static volatile u64 user_word = 0x757365722d6773; /* what its user mode's GS base points at */
static volatile u64 fs_word = 0x66732d776f7264; /* what msrgate's FS base points at */
static u64 syscalls_wanted;

/* Linux's entry_SYSCALL_64 and its return, reduced to what the monitor recognises in them: the
 * per-CPU word through GS into RAX. The 7 bytes jumped over are VERW's, as Linux's return has them
 * where its CPU needs no VERW (an alternative). No stack: RCX and R11 are SYSRETQ's. Then an entry
 * without SWAPGS, which reads the word the user mode's GS base names (the monitor must not swap for
 * it, having swapped for the first). */
extern const char linux_syscall_entry[], linux_syscall_padding[], plain_syscall_entry[], linux_syscall_end[];
__asm__(".text\n"
        "linux_syscall_entry:\n"
        "    swapgs\n"
        "    movq %gs:0, %rax\n"
        "    swapgs\n"
        "linux_syscall_padding:\n"
        "    jmp 1f\n"
        "    .byte 0x0f, 0x00, 0x2d, 0, 0, 0, 0\n"
        "1:  sysretq\n"
        "plain_syscall_entry:\n"
        "    movq %gs:0, %rax\n"
        "    sysretq\n"
        "linux_syscall_end:\n");

/* The entry copied to the 2 MiB page at SUPERVISOR_PAGE, made supervisor-only (it is position
 * independent): where Linux's is, and where this host's VMM finishes a user-mode SYSCALL into
 * ring 0 (vmm/x86/user_syscall.py). */
static u64 supervisor_entry(void)
{
    supervisor_only(SUPERVISOR_PAGE);
    memcpy((void *)SUPERVISOR_PAGE, linux_syscall_entry, (u64)(linux_syscall_end - linux_syscall_entry));
    if (arg_has("nops")) { /* Linux 6.12's return: NOPs where VERW is not needed (a 7-byte one, and 66 90) */
        static const u8 nops[9] = { 0x0f, 0x1f, 0x80, 0, 0, 0, 0, 0x66, 0x90 };
        memcpy((void *)(SUPERVISOR_PAGE + (u64)(linux_syscall_padding - linux_syscall_entry)), nops, sizeof(nops));
    }
    if (arg_has("verw")) { /* where the CPU needs it (6.12 with TSA): VERW through RIP (its operand the NOP after it) */
        static const u8 verw[9] = { 0x0f, 0x00, 0x2d, 0, 0, 0, 0, 0x66, 0x90 };
        memcpy((void *)(SUPERVISOR_PAGE + (u64)(linux_syscall_padding - linux_syscall_entry)), verw, sizeof(verw));
    }
    return SUPERVISOR_PAGE;
}

static void on_tick(struct trap_frame *frame)
{
    ticks++;
    lapic_write(LAPIC_EOI, 0);
}

static volatile u64 refused_length = 2; /* of the instruction a #GP is expected at: wrmsr's */

static void on_gp(struct trap_frame *frame)
{
    refused++;
    frame->rip += refused_length;
}

static inline u64 rdmsr(u32 index)
{
    u32 low, high;
    __asm__ volatile("rdmsr" : "=a"(low), "=d"(high) : "c"(index));
    return (u64)high << 32 | low;
}

static inline void wrmsr(u32 index, u64 value)
{
    __asm__ volatile("wrmsr" : : "c"(index), "a"((u32)value), "d"((u32)(value >> 32)) : "memory");
}

/* From user mode's UD2, once its Linux-shaped calls are done: the entry without SWAPGS from now on. */
static void on_ud(struct trap_frame *frame)
{
    wrmsr(MSR_LSTAR, SUPERVISOR_PAGE + (u64)(plain_syscall_entry - linux_syscall_entry));
    frame->rip += 2;
}

/* msrgate: 6 checks, and one refused write (a #GP at the pv page's 2-byte WRMSR, which on_gp steps
 * over to its RET). */
static u64 check_msr_gate(void)
{
    void (*write_msr)(u32, u32, u32) = (void (*)(u32, u32, u32))PV_WRITE_MSR;
    u64 fs = rdmsr(MSR_FS_BASE), base = (u64)&fs_word, through_fs;
    write_msr(MSR_FS_BASE, (u32)base, (u32)(base >> 32));
    GUEST_ASSERT_EQ(rdmsr(MSR_FS_BASE), base);
    __asm__ volatile("mov %%fs:0, %0" : "=r"(through_fs));
    GUEST_ASSERT_EQ(through_fs, fs_word);
    u64 user_gs = rdmsr(MSR_KERNEL_GS_BASE), through_gs;
    write_msr(MSR_KERNEL_GS_BASE, (u32)base, (u32)(base >> 32));
    GUEST_ASSERT_EQ(rdmsr(MSR_KERNEL_GS_BASE), base);
    write_msr(MSR_KERNEL_GS_BASE, (u32)(u64)&user_word, (u32)((u64)&user_word >> 32));
    __asm__ volatile("swapgs; mov %%gs:0, %0; swapgs" : "=r"(through_gs) : : "memory");
    GUEST_ASSERT_EQ(through_gs, user_word);
    wrmsr(MSR_KERNEL_GS_BASE, user_gs);
    u64 star = rdmsr(MSR_STAR);
    write_msr(MSR_STAR, 0, 0x00230010);
    GUEST_ASSERT_EQ(rdmsr(MSR_STAR), 0x0023001000000000ul);
    wrmsr(MSR_STAR, star);
    u64 refused_before = refused;
    write_msr(MSR_FS_BASE, 0, 0x01000000); /* bit 56 set, 57-63 clear: canonical with neither 48 nor 57 bits */
    GUEST_ASSERT_EQ(refused, refused_before + 1);
    GUEST_ASSERT_EQ(rdmsr(MSR_FS_BASE), base);
    wrmsr(MSR_FS_BASE, fs);
    return 6;
}

#define READ_CR(n) ({ u64 _v; __asm__ volatile("mov %%cr" #n ", %0" : "=r"(_v)); _v; })
#define WRITE_CR(n, v) __asm__ volatile("mov %0, %%cr" #n : : "r"((u64)(v)) : "memory")

#define CR4_OSXSAVE (1ul << 18)
#define CR4_DE (1ul << 3)
#define CR4_PSE (1ul << 4)
#define CPUID_1_XSAVE (1u << 26)

static inline void xsetbv(u32 index, u64 value)
{
    __asm__ volatile("xsetbv" : : "c"(index), "a"((u32)value), "d"((u32)(value >> 32)) : "memory");
}

/* XCR0 set with OSXSAVE on (and a value the CPU refuses: #GP), two debug registers, and the null
 * LDT: 2 checks. XCR0 is not read back: KVM's emulator, which runs a PVM guest's ring 0, has no
 * XGETBV, and in ring 3 a PVM guest reads the host's XCR0. Every host worldswitch runs on has XSAVE. */
#define XCR0_X87_SSE 3ul

static u64 check_extended_state_and_debug(void)
{
    u32 eax = 1, ebx, ecx = 0, edx;
    __asm__ volatile("cpuid" : "+a"(eax), "=b"(ebx), "+c"(ecx), "=d"(edx));
    GUEST_ASSERT(ecx & CPUID_1_XSAVE);
    __asm__ volatile("mov %0, %%cr4" : : "r"(READ_CR(4) | CR4_OSXSAVE) : "memory");
    xsetbv(0, XCR0_X87_SSE);
    refused_length = 3;
    xsetbv(0, 0); /* x87 state cannot be off: #GP */
    refused_length = 2;
    u64 dr0, dr7;
    __asm__ volatile("mov %0, %%dr0" : : "r"(0x1234ul));
    __asm__ volatile("mov %0, %%dr7" : : "r"(0ul));
    __asm__ volatile("mov %%dr0, %0" : "=r"(dr0));
    __asm__ volatile("mov %%dr7, %0" : "=r"(dr7));
    GUEST_ASSERT_EQ(dr0, 0x1234);
    GUEST_ASSERT_EQ(dr7, 0x400); /* bit 10 reads as 1 */
    __asm__ volatile("lldt %w0" : : "r"(0));
    return 2;
}

struct descriptor_table {
    u16 limit;
    u64 base;
} __attribute__((packed));

/* The GDT in use: the VMM's, or Linux's layout. */
static struct descriptor_table program_gdt(void)
{
    struct descriptor_table gdtr = { PROGRAM_GDT_LIMIT, PROGRAM_GDT_BASE };
    if (linux_layout)
        gdtr = (struct descriptor_table){ sizeof(linux_gdt) - 1, (u64)linux_gdt };
    return gdtr;
}

/* Linux's layout, with the runtime's TSS (marked available again, as LTR wants it). */
static void use_linux_gdt(void)
{
    const u64 *vmm_gdt = (const u64 *)PROGRAM_GDT_BASE;
    linux_gdt[1] = 0x00cf9a000000fffful; /* KERNEL32_CS */
    linux_gdt[2] = 0x00af9a000000fffful; /* KERNEL_CS */
    linux_gdt[3] = 0x00cf92000000fffful; /* KERNEL_DS */
    linux_gdt[4] = 0x00cffa000000fffful; /* USER32_CS */
    linux_gdt[5] = 0x00cff2000000fffful; /* USER_DS */
    linux_gdt[6] = 0x00affa000000fffful; /* USER_CS */
    linux_gdt[8] = (vmm_gdt[PROGRAM_TR >> 3] & ~(0xful << 40)) | 0x9ul << 40;
    linux_gdt[9] = vmm_gdt[(PROGRAM_TR >> 3) + 1];
    linux_layout = 1;
    struct descriptor_table gdtr = program_gdt();
    __asm__ volatile("xorl %%eax, %%eax\n" /* a null SS, on the VMM's GDT and on the new one before CS is */
                     "mov %%eax, %%ss\n"   /* reloaded: what a kernel's startup may load (a ring-0 SS may be null) */
                     "lgdt %0\n"
                     "mov %%eax, %%ss\n"
                     "pushq $0x10\n" /* LINUX_KERNEL_CS */
                     "leaq 1f(%%rip), %%rax\n"
                     "pushq %%rax\n"
                     "lretq\n"
                     "1: movl $0x18, %%eax\n" /* LINUX_KERNEL_DS */
                     "mov %%eax, %%ss\n"
                     "mov %%eax, %%ds\n"
                     "mov %%eax, %%es\n"
                     : : "m"(gdtr) : "rax", "memory");
    __asm__ volatile("ltr %w0" : : "r"((u16)LINUX_TSS));
    use_kernel_code_segment(LINUX_KERNEL_CS);
}

/* The descriptor stores show the program's own tables and registers, in either ring: 5 checks. */
static u64 check_descriptor_stores(void)
{
    struct descriptor_table table, gdtr = program_gdt();
    __asm__ volatile("sgdt %0" : "=m"(table));
    GUEST_ASSERT_EQ(table.limit, gdtr.limit);
    GUEST_ASSERT_EQ(table.base, gdtr.base);
    __asm__ volatile("sidt %0" : "=m"(table));
    GUEST_ASSERT_EQ(table.limit, IDT_LIMIT);
    GUEST_ASSERT(table.base < ws_ram_size);
    u64 selector = ~0ul;
    __asm__ volatile("str %k0" : "+r"(selector)); /* a 32-bit register: zero-extended */
    GUEST_ASSERT_EQ(selector, linux_layout ? LINUX_TSS : PROGRAM_TR);
    __asm__ volatile("sldt %k0" : "+r"(selector));
    GUEST_ASSERT_EQ(selector, 0);
    u16 msw;
    __asm__ volatile("smsw %0" : "=m"(msw));
    GUEST_ASSERT_EQ(msw, (u16)kernel_cr0);
    return 5;
}

static int in_user_mode(u64 passed)
{
    passed += check_descriptor_stores();
    u64 through_gs = 0;
    for (u64 i = 0; i < syscalls_wanted; i++) {
        u64 seen;
        __asm__ volatile("syscall" : "=a"(seen) : : "rcx", "r11", "memory");
        through_gs += seen == per_cpu;
    }
    if (syscalls_wanted) {
        __asm__ volatile("ud2"); /* on_ud: to the entry without SWAPGS */
        for (int i = 0; i < 2; i++) {
            u64 seen;
            __asm__ volatile("syscall" : "=a"(seen) : : "rcx", "r11", "memory");
            GUEST_ASSERT_EQ(seen, user_word);
        }
    }
    GUEST_DONE(passed, ticks, refused, through_gs);
    return 0;
}

static u8 user_stack[4096] __attribute__((aligned(16)));

/* User mode as Linux enters it: SYSRETQ, to the user segments its STAR names. */
static void __attribute__((noreturn)) sysret_to_user(u64 passed)
{
    wrmsr(MSR_STAR, (u64)LINUX_USER32_CS << 48 | (u64)LINUX_KERNEL_CS << 32);
    wrmsr(MSR_EFER, rdmsr(MSR_EFER) | EFER_SCE);
    __asm__ volatile("movq %0, %%rsp\n"
                     "sysretq"
                     : : "r"(user_stack + sizeof(user_stack) - 8), "c"(in_user_mode), "r"(0x3002ul), "D"(passed)
                     : "memory");
    __builtin_unreachable();
}

static void one_shot(void)
{
    lapic_write(LAPIC_TIMER_DIVIDE, 0x3);
    lapic_write(LAPIC_LVT_TIMER, TIMER_VECTOR); /* one-shot */
    lapic_write(LAPIC_TIMER_INITIAL, 62500);    /* 1 ms */
}

int main(const char *args)
{
    u64 passed = 0;
    if (arg_has("linux"))
        use_linux_gdt();
    syscalls_wanted = arg_has("syscalls") ? arg_number(0, 8) : 0;
    GUEST_ASSERT(!syscalls_wanted || linux_layout); /* they return with SYSRETQ, to Linux's segments */
    u64 cr0 = READ_CR(0);
    WRITE_CR(0, cr0 | 8); /* TS */
    GUEST_ASSERT(READ_CR(0) & 8);
    __asm__ volatile("clts");
    GUEST_ASSERT_EQ(READ_CR(0), cr0 & ~8ul);
    passed += 2;
    WRITE_CR(2, 0x123456789ul);
    GUEST_ASSERT_EQ(READ_CR(2), 0x123456789ul);
    u64 cr3 = READ_CR(3);
    WRITE_CR(3, cr3); /* the same tables: a TLB flush */
    GUEST_ASSERT_EQ(READ_CR(3), cr3);
    GUEST_ASSERT(READ_CR(4) & (1u << 5)); /* PAE, as long mode needs */
    u64 cr4 = READ_CR(4);
    WRITE_CR(4, cr4 | CR4_DE | CR4_PSE); /* as a kernel sets them at boot */
    GUEST_ASSERT_EQ(READ_CR(4), cr4 | CR4_DE | CR4_PSE);
    WRITE_CR(4, cr4);
    passed += 4;

    u64 star = rdmsr(MSR_STAR);
    wrmsr(MSR_STAR, 0x0023001000000000ul);
    GUEST_ASSERT_EQ(rdmsr(MSR_STAR), 0x0023001000000000ul);
    wrmsr(MSR_STAR, star);
    for (u32 i = 0; i < 3; i++) /* SYSENTER's CS, ESP and EIP, as a 64-bit kernel sets them at boot */
        wrmsr(MSR_SYSENTER_CS + i, i == 0 ? KERNEL_CS : 0x7000 + i);
    for (u32 i = 0; i < 3; i++)
        GUEST_ASSERT_EQ(rdmsr(MSR_SYSENTER_CS + i), i == 0 ? KERNEL_CS : 0x7000 + i);
    passed += 1;
    set_trap_handler(13, on_gp);
    wrmsr(MSR_NONEXISTENT, 1);
    GUEST_ASSERT_EQ(refused, 1);
    wrmsr(MSR_X2APIC_EOI, 0); /* with the LAPIC in xAPIC mode: #GP (under the monitor, after its ring 0 tried) */
    GUEST_ASSERT_EQ(refused, 2);
    passed += 3;

    u64 gs = rdmsr(MSR_GS_BASE), kernel_gs = rdmsr(MSR_KERNEL_GS_BASE);
    wrmsr(MSR_GS_BASE, 0x1000);
    wrmsr(MSR_KERNEL_GS_BASE, (u64)&per_cpu);
    __asm__ volatile("swapgs" ::: "memory");
    GUEST_ASSERT_EQ(rdmsr(MSR_GS_BASE), (u64)&per_cpu);
    GUEST_ASSERT_EQ(rdmsr(MSR_KERNEL_GS_BASE), 0x1000);
    u64 through_gs;
    __asm__ volatile("mov %%gs:0, %0" : "=r"(through_gs));
    GUEST_ASSERT_EQ(through_gs, per_cpu);
    __asm__ volatile("swapgs" ::: "memory");
    GUEST_ASSERT_EQ(rdmsr(MSR_GS_BASE), 0x1000);
    wrmsr(MSR_GS_BASE, gs);
    wrmsr(MSR_KERNEL_GS_BASE, kernel_gs);
    passed += 2;
    if (arg_has("msrgate"))
        passed += check_msr_gate();

    struct descriptor_table gdtr = program_gdt();
    __asm__ volatile("lgdt %0" : : "m"(gdtr));
    __asm__ volatile("invlpg (%0)" : : "r"(0x200000ul) : "memory");
    __asm__ volatile("wbinvd" ::: "memory");
    passed += 3;

    set_trap_handler(TIMER_VECTOR, on_tick);
    lapic_write(LAPIC_SVR, 0x1ff); /* software-enable the LAPIC, spurious vector 0xff */
    cli();
    one_shot();
    while (lapic_read(LAPIC_TIMER_CURRENT) != 0)
        cpu_relax();
    for (int i = 0; i < 1000; i++)
        cpu_relax(); /* the tick is due: it must wait for sti */
    GUEST_ASSERT_EQ(ticks, 0);
    sti();
    /* now it comes: at once on hardware, later where the hypervisor must first see the open
     * interrupt window (nested under TCG: thousands of spins); the bound is for a host that never
     * delivers it */
    for (u64 i = 0; i < 100000000 && ticks == 0; i++)
        cpu_relax();
    GUEST_ASSERT_EQ(ticks, 1);
    cli();
    one_shot();
    __asm__ volatile("sti; hlt" ::: "memory"); /* the tick wakes it */
    GUEST_ASSERT_EQ(ticks, 2);
    passed += 2;
    passed += check_extended_state_and_debug();
    kernel_cr0 = READ_CR(0);
    passed += check_descriptor_stores();
    if (linux_layout && syscalls_wanted) {
        wrmsr(MSR_LSTAR, supervisor_entry());
        wrmsr(MSR_SFMASK, LINUX_SFMASK);
        wrmsr(MSR_KERNEL_GS_BASE, (u64)&per_cpu);
        wrmsr(MSR_GS_BASE, (u64)&user_word); /* the user mode's */
        set_trap_handler(6, on_ud);
    }
    if (linux_layout)
        sysret_to_user(passed);
    enter_user(in_user_mode, passed, 0);
}
