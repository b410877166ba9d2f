/*
 * monitor.c: runs a bare-metal program's ring-0 code deprivileged, natively in ring 3, on hosts
 * that emulate guest ring 0 (docs/monitor.md has the facts and the design; issue 13, stage 1).
 *
 * The program keeps its own view of the machine: its IDT, GDT and TR, its interrupt flag, its
 * control registers. The real ones are the monitor's: a GDT whose guest-kernel segments have
 * DPL 3, an IDT that sends every exception and interrupt to ring 0 (interrupt gates, the TSS
 * stack), and a TSS whose I/O bitmap grants every port, so port I/O needs no help.
 *
 * Two halves. Ring 0 is emulated on the hosts this is for, at about a microsecond an instruction,
 * so ring 0 (monitor.S) only hands each of the guest's events to the body, in seven instructions,
 * and serves the body's own events (monitor_ring0_event). The body (monitor_event, monitor_leave)
 * runs natively in ring 3, on DPL 3 segments of its own, in the monitor's pages, which ring
 * 3 may use; what it cannot do there (CR3, INVLPG, MSRs, HLT, SWAPGS) it asks ring 0 for
 * (privileged). The program's kernel, in ring 3 too, can therefore reach the monitor's pages:
 * long mode has no segment limits to hide them with. What it breaks there is its own VM's.
 *
 * What the guest's events are:
 *   - the privileged instructions (#GP in ring 3): emulated against the virtual state; so are the
 *     descriptor stores (SGDT, SIDT, SLDT, STR, SMSW), which UMIP makes fault, from either mode;
 *   - the program's IRETQ to its kernel (#GP: RPL 0 < CPL 3), and to its user mode (#NP: the user
 *     code segments are not present in the real GDT; user mode runs on a GDT of its own, which its
 *     shadow maps), so that the monitor switches to the user mode's shadow and delivers a held
 *     interrupt at the first chance;
 *   - exceptions and interrupts: reflected through the program's own IDT, as the CPU would have
 *     delivered them, on the stack its TSS names; an interrupt while its virtual IF is clear is
 *     held until it sets IF again (STI, IRETQ, HLT).
 *   - page faults: the shadow page tables' to fill from the program's own, or the program's.
 *   - SYSCALL: the real LSTAR is the monitor's syscall_gate, an int3 into ring 0: this host's KVM
 *     leaves a SYSCALL in ring 3, and the body finishes it into the guest's kernel at the guest's
 *     LSTAR; SYSRETQ and SWAPGS trap (#GP in ring 3) and are emulated. Linux's entry begins with
 *     SWAPGS and its return is SWAPGS; SYSRETQ: the first is done with the SYSCALL, the SYSRETQ at
 *     the second's trap, so a system call is two events, not four. Its return from an interrupt
 *     or exception to user mode, SWAPGS; IRETQ (the IRETQ made a UD2 by the VMM), is one event too.
 * PUSHF and POPF run natively and see the real IF: a paravirtual Linux keeps its IF through the pv
 * page's functions instead (monitor.S; the VMM points its pv_ops.irq there, boot/paravirt.py).
 * More than one vCPU: each runs on a copy of its own (boot/monitor.py), mapped at MONITOR_BASE in
 * its own shadows, so that everything here is per CPU, as a CPU's registers and TLB are; the
 * guest's own memory is all they share, and the monitor writes it as a CPU does (mark: locked).
 * Not yet (docs/monitor.md): SYSENTER itself.
 * Everything the monitor trusts comes from the VMM (the handoff page); a program that breaks the
 * rules the monitor checks ends its own VM with a report, never more.
 */
#include "ws.h"
#include "monitor.h"


#define MSR_EFER 0xc0000080u
#define MSR_STAR 0xc0000081u
#define MSR_LSTAR 0xc0000082u
#define MSR_CSTAR 0xc0000083u
#define MSR_SFMASK 0xc0000084u
#define MSR_SYSENTER_CS 0x174u /* to 0x176: SYSENTER's target */

#define CR4_PGE (1ul << 7)
#define CR4_UMIP (1ul << 11)
#define CR4_OSXSAVE (1ul << 18)
#define CR4_PKE (1ul << 22)
#define DR6_FIXED 0xffff0ff0ul /* the bits DR6 and DR7 read as 1 */
#define DR7_FIXED 0x400ul
#define CPUID_7_UMIP (1u << 2) /* leaf 7, ECX */

#define RFLAGS_IOPL 0x3000ul

#define DESCRIPTOR_PRESENT (1ul << 47)
#define DESCRIPTOR_SEGMENT (1ul << 44) /* S: code or data, not a system descriptor */
#define DESCRIPTOR_CODE (1ul << 43)
#define DESCRIPTOR_DPL3 (3ul << 45)
#define CODE64_DPL3 0x00affa000000fffful
#define DATA_DPL3 0x00cff2000000fffful
#define CODE64_DPL0 0x00af9a000000fffful
#define DATA_DPL0 0x00cf92000000fffful

__attribute__((section(".handoff"), aligned(4096))) struct handoff handoff = { 0 };
/* Each counter the assembly counts at its offset in monitor.h (HANDOFF_*_COUNT) is where the struct has it. */
#define COUNTER_AT(kind, offset) \
    _Static_assert(__builtin_offsetof(struct handoff, counters[kind]) == (offset), \
                   "monitor.h: " #offset " is not where the counter is")
COUNTER_AT(COUNT_MSR_GATE, HANDOFF_MSR_GATE_COUNT);
COUNTER_AT(COUNT_WRMSR_RING0, HANDOFF_WRMSR_RING0_COUNT);
COUNTER_AT(COUNT_IRETQ_GATE, HANDOFF_IRETQ_GATE_COUNT);
COUNTER_AT(COUNT_INTERRUPTS, HANDOFF_INTERRUPTS_COUNT);
COUNTER_AT(COUNT_HELD_GATE, HANDOFF_HELD_GATE_COUNT);
COUNTER_AT(COUNT_GS_GATE, HANDOFF_GS_GATE_COUNT);
COUNTER_AT(COUNT_GS_NATIVE, HANDOFF_GS_NATIVE_COUNT);
COUNTER_AT(COUNT_MSR_NATIVE, HANDOFF_MSR_NATIVE_COUNT);
COUNTER_AT(COUNT_PV_EOI, HANDOFF_PV_EOI_COUNT);

/* The real GDT (monitor.h has its layout), and at the same address in the user mode's shadow the
 * one its user mode runs on (paging_init): only what the CPU would let user code load there, the
 * guest's user segments (at their own indexes and as USER_ALIASES), and what the CPU itself loads at
 * an event (the monitor's ring-0 segments). Its kernel's segments, the body's and the copies are
 * DPL 3 in the real GDT, since they run in ring 3; in the user mode's they are null, so that user
 * code loading one gets the #GP(selector) the CPU gives for a DPL 0 segment. A page each. */
static u64 gdt[512] __attribute__((section(".gdt"), aligned(4096)));
static u64 user_gdt[512] __attribute__((section(".gdt"), aligned(4096)));

/* What each of the guest's GDT entries is to it (mirror_gdt): the monitor's view of its selectors. */
enum segment_kind { NO_SEGMENT, KERNEL_CODE, KERNEL_DATA, USER_CODE, USER_DATA };
static u8 segment_kind[GUEST_GDT_ENTRIES];
/* The CPU keeps a segment register's descriptor from its load until the next one, whatever LGDT
 * does meanwhile; the monitor reloads CS and SS at every return to the guest. So at the guest's
 * LGDT its CS and SS move to copies of their descriptors (LOADED_CS, LOADED_SS), until it loads
 * them again: what each is to the guest, and the selector it knows. */
static struct {
    u8 kind;
    u16 selector;
} loaded[2];

struct {
    u32 reserved0;
    u64 rsp[3];
    u64 reserved1;
    u64 ist[7];
    u64 reserved2;
    u16 reserved3;
    u16 io_map_base;      /* io_map or user_io_map: the crossings to and from user mode switch it */
    u8 io_map[8192];      /* every port: the guest's kernel's, and a user mode's with IOPL 3 */
    u8 io_map_gap;        /* all ones, so that no access past port 0xffff is granted */
    u8 user_io_map[8192]; /* a user mode's: none, or the guest's own bitmap (user_ports) */
    u8 io_map_end;        /* all ones (SDM vol. 1, 19.5.2) */
} __attribute__((packed, aligned(16))) tss; /* monitor.S turns RSP0 between its two event stacks */

/* What user_io_map holds: no port (DENIED); the guest's own bitmap, copied at the first port access
 * the fence refused (COPIED), good until its kernel runs and may change it; or what is to be made
 * DENIED again before user mode next runs (STALE). */
static enum { PORTS_STALE, PORTS_DENIED, PORTS_COPIED } user_ports = PORTS_STALE;

static u16 io_map_offset(const u8 *map)
{
    return (u16)((u64)map - (u64)&tss);
}

/* The guest's kernel's and the body's bitmap: every port. */
static void open_ports(void)
{
    tss.io_map_base = io_map_offset(tss.io_map);
}

static struct {
    u16 offset_low, selector;
    u8 ist, type_attr;
    u16 offset_mid;
    u32 offset_high, reserved;
} __attribute__((packed)) idt[256] __attribute__((aligned(16)));

extern const u64 event_stubs[256];
extern const u8 error_code_vectors[256];
extern char monitor_stack_top[], syscall_gate[], xcr_write_at[], xcr_refused[];
extern char wrmsr_at[], rdmsr_at[], msr_refused[];
extern char ring0_return[], body_exit[], body_window[], body_window_end[], page_fault_entry[], breakpoint_entry[],
    pv_page[];
extern char general_protection_entry[], fast_wrmsr_fetch[], fast_wrmsr_unread[], fast_wrmsr_at[], fast_wrmsr_refused[];
int xcr_write(u32 index, u64 value);
void wait_for_interrupt(void);
int guest_copy(void *to, const void *from, u64 length);
extern char guest_copy_at[], guest_copy_failed[], msr_gate[], msr_gate_return[], owe_user_gs[], msr_gate_end[], gs_gate[], gs_gate_end[];
extern char gs_load_at[], gs_load_refused[], gs_gate_load[], gs_gate_base_back[], cr3_gate_look[], cr3_gate_end[];
void halt_forever(void) __attribute__((noreturn));
void triple_fault(void) __attribute__((noreturn));
u64 ring0_call(u64 service, u64 a, u64 b);

u64 event_cr2;             /* the guest's page fault's address, which the trampoline read in ring 0 */

/* A PKRU the guest wrote that denied key 0, taken back (key0_allow, monitor.S): what it was, for the
 * body to judge the guest's access by (key0_denied_access), 0 once judged; and the registers of the
 * monitor's code that met it, which key0_allow gives back. */
extern char key0_allow[], key0_allow_end[];
u32 key0_found;
struct { u64 rax, rcx, rdx, rflags, rip; } key0_return;
_Static_assert(__builtin_offsetof(__typeof__(key0_return), rcx) == KEY0_RCX &&
               __builtin_offsetof(__typeof__(key0_return), rdx) == KEY0_RDX &&
               __builtin_offsetof(__typeof__(key0_return), rflags) == KEY0_RFLAGS &&
               __builtin_offsetof(__typeof__(key0_return), rip) == KEY0_RIP, "key0_allow reads these");
volatile u8 leave_again;   /* set by ring 0 when it holds an interrupt: the body's exit looks again */
/* SWAPGS done where ring 0 already is, instead of by a call into it of its own (two a system call):
 * entry_swapgs, for ring 0's SYSCALL entry: the guest's LSTAR begins with SWAPGS, so swap there (the
 * body checks the bytes each time and corrects both; not where the body swaps in ring 3); pending_swapgs:
 * the guest's SWAPGS is owed, done on the way out of the event (leave_swapping_gs, or leave_to_user):
 * no guest code runs with it owed, so nothing reads GS's bases with it owed. */
u8 entry_swapgs, pending_swapgs;
/* What KERNEL_GS_BASE holds in the CPU (an owed base not yet written), where kernel_gs_msr_known: so
 * that the body may do the guest's SWAPGS in ring 3 (leave_swapping_gs). Learnt as the body leaves
 * for user mode, from what leave_to_user leaves there; forgotten wherever else ring 0 swaps or writes
 * it: privileged(), and in monitor.S syscall_entry's swap, gs_gate_event's and msr_gate_event's
 * write, which the gates' native paths and leave_swapping_gs leave unused. */
u8 kernel_gs_msr_known;
u64 kernel_gs_msr;

/* A VERW of the guest's kernel on its way to user mode, passed over where the body does that return
 * in the same event as the SWAPGS before it (Linux's CLEAR_CPU_BUFFERS, where its CPU needs it: 6.12
 * on an AMD CPU with TSA): executed by monitor_leave instead, natively in ring 3 as the kernel's own
 * would have been (KVM's emulator has no VERW, so not in ring 0). Only its side effect counts, the
 * CPU's buffers cleared, which the selector it names does not change. */
static u8 owed_verw;
static const u16 verw_selector = BODY_SS;

/* The guest's IF while its kernel runs (RFLAGS_IF or 0; its user mode always takes interrupts), and
 * the interrupt vectors taken while it was clear, not yet delivered. The pv page's functions
 * (monitor.S) read and write both from the guest's kernel; so the pending set changes only by
 * single locked instructions, and virtual_if by single stores. */
u64 virtual_if;
u64 held[4];

/* The code and stack segments (as the guest sees them) of its kernel's IRETQs to itself, which
 * pv_iret (monitor.S) does natively when a frame has them (its SS may also be null): learnt at the
 * first such IRETQ the body emulates, forgotten when the GDT changes (mirror_gdt). Until then no
 * frame matches, and pv_iret's IRETQ traps to the body. */
u64 iret_kernel_cs = ~0ul, iret_kernel_ss = ~0ul;

/* The code and stack segments its kernel runs on now, as it sees them, for the frame of an
 * interrupt that pv_deliver_held (monitor.S) delivers without the body: ring 3 cannot read them
 * (this host shows its own selectors there). Kept where the kernel's segments change: the body's
 * way back to the kernel, and pv_iret. The code segment is ~0 while the kernel runs on a copy
 * (keep_loaded), whose view is not the selector it runs on: no delivery is done there then. One
 * window is inexact: an event between pv_iret's stores and its IRETQ leaves through the body, which
 * stores the segments before that IRETQ; only SS can differ there (null or the kernel's, both of
 * which a later frame may carry back to the kernel), never CS. */
u64 kernel_cs_view = ~0ul, kernel_ss_view = ~0ul;

/* The guest's IDTR, as its LIDT set it: the pv page's delivery of a held interrupt reads it too. */
struct { u64 base, limit; } guest_idt;

/* The guest's CR2, as its page faults set it: the pv page's read_cr2 reads it too. */
u64 guest_cr2;

/* The rest of the guest's virtual CPU state. */
static struct {
    int user;         /* the mode it runs in now */
    u64 user_iopl;    /* its user mode's RFLAGS.IOPL bits, as its kernel's IRETQ or SYSRETQ set them */
    u64 cr0, cr3, cr4;
    u64 dr[8];        /* its debug registers, kept here: the real ones stay the monitor's (unused) */
    u64 gdt_base, gdt_limit, tr, tss_base, tss_limit;
    u64 star, lstar, cstar, sfmask; /* SYSCALL's MSRs as the guest wrote them (the real LSTAR is the gate) */
    u64 sysenter[3];  /* SYSENTER's CS, ESP and EIP, likewise (the real ones stay null) */
} guest;

/* One locked instruction: ring 0 counts too, between any two instructions of the body. */
static void count(int kind)
{
    __atomic_fetch_add(&handoff.counters[kind], 1, __ATOMIC_RELAXED);
}

/* ---- ring 0: what the body cannot do in ring 3 ---------------------------------------------------- */

static int in_ring0(void)
{
    u64 cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    return (cs & 3) == 0;
}

static int any_pending(void);

/* Do `service` with arguments a and b: directly in ring 0 (init, and ring 0's own events), else
 * through ring0_call, which is monitor_ring0_event coming back here in ring 0. */
static u64 privileged(u64 service, u64 a, u64 b)
{
    if (service == SERVICE_SWAPGS || (service == SERVICE_WRMSR && a == MSR_KERNEL_GS_BASE))
        kernel_gs_msr_known = 0;
    if (!in_ring0()) {
        count(COUNT_RING0);
        return ring0_call(service, a, b);
    }
    switch (service) {
    case SERVICE_CR3: __asm__ volatile("mov %0, %%cr3" : : "r"(a) : "memory"); return 0;
    case SERVICE_INVLPG: __asm__ volatile("invlpg (%0)" : : "r"(a) : "memory"); return 0;
    case SERVICE_CR0: __asm__ volatile("mov %0, %%cr0" : : "r"(a) : "memory"); return 0;
    case SERVICE_CR4: __asm__ volatile("mov %0, %%cr4" : : "r"(a) : "memory"); return 0;
    case SERVICE_CR8: __asm__ volatile("mov %0, %%cr8" : : "r"(a)); return 0;
    case SERVICE_READ_CR8: __asm__ volatile("mov %%cr8, %0" : "=r"(a)); return a;
    case SERVICE_RDMSR: /* b: where the value goes, in the monitor */
    case SERVICE_WRMSR: /* ring 0's entry serves both, with their fault fix-up, from ring 0 too */
        return ring0_call(service, a, b);
    case SERVICE_XSETBV: return (u64)xcr_write((u32)a, b);
    case SERVICE_SWAPGS: __asm__ volatile("swapgs" ::: "memory"); return 0;
    case SERVICE_WAIT:
        while (!any_pending())
            wait_for_interrupt();
        return 0;
    case SERVICE_HALT: halt_forever();
    case SERVICE_TRIPLE_FAULT: triple_fault();
    }
    return 0;
}

static u64 real_cr4_extra; /* CR4 bits the monitor keeps set for itself (UMIP), out of the guest's view */

/* The user mode's FS and GS bases, written by the guest's kernel in its ring 3 (msr_gate, gs_gate):
 * - fsgsbase_native: ring 3 may read and write the bases (RDFSBASE, WRGSBASE...), as this host's
 *   does, whatever CR4 the guest sees (the host's own CR4.FSGSBASE); found out at the body's first
 *   event (probe_segment_bases). Then the user mode's FS base is written with WRFSBASE, and its GS
 *   base, behind SWAPGS while the kernel runs, is owed to KERNEL_GS_BASE:
 * - owed_user_gs, owed_user_gs_base: the base owed, written by ring 0 before it next swaps or leaves
 *   for user mode (leave_to_user, settle_user_gs): the monitor does every SWAPGS of the guest's, and
 *   every read and write of KERNEL_GS_BASE the kernel does not make through the gates.
 * - null_gs_keeps_base: a null selector leaves the base as it was, as on AMD's CPUs without
 *   NullSelectorClearsBase (Linux's X86_BUG_NULL_SEG); elsewhere it is zeroed. */
u8 fsgsbase_native, null_gs_keeps_base, owed_user_gs;
u64 owed_user_gs_base;
static u8 segment_bases_probed;
#define BASE_PROBE 0x1000ul /* any base but 0 */

int fsgsbase_swap(u64 base, u64 *was);
extern char fsgsbase_swap_at[], fsgsbase_refused[];

/* In the body's ring 3, natively, as the kernel's gates will run (ring 0 is emulated where the monitor
 * runs, and KVM's emulator differs: it zeroes the base at a null load, and has no WRFSBASE). The FS
 * base written must reach the MSR ring 0 reads; the null load is Linux's own test. What the probe
 * changes is put back: the FS base, and GS's base and selector, where ring 3 may load that selector
 * (VERR); where it may not, the gates keep their trips. */
static void probe_segment_bases(void)
{
    u64 fs, seen, gs;
    u16 selector;
    u8 loadable = 1;
    segment_bases_probed = 1;
    if (!fsgsbase_swap(BASE_PROBE, &fs))
        return;
    privileged(SERVICE_RDMSR, MSR_FS_BASE, (u64)&seen);
    fsgsbase_swap(fs, &fs);
    __asm__ volatile("mov %%gs, %0" : "=r"(selector));
    if (selector & ~3)
        __asm__ volatile("verr %1; setz %0" : "=r"(loadable) : "r"(selector) : "cc");
    if (seen != BASE_PROBE || !loadable)
        return;
    __asm__ volatile("rdgsbase %0" : "=r"(gs));
    __asm__ volatile("wrgsbase %0; mov %1, %%gs" : : "r"(BASE_PROBE), "r"(0) : "memory");
    __asm__ volatile("rdgsbase %0" : "=r"(seen));
    __asm__ volatile("mov %0, %%gs; wrgsbase %1" : : "r"(selector), "r"(gs) : "memory");
    null_gs_keeps_base = seen == BASE_PROBE;
    fsgsbase_native = 1;
}

/* The user mode's GS base owed, written: before ring 0 swaps, and before the body reads or writes it. */
static void settle_user_gs(void)
{
    if (!owed_user_gs)
        return;
    privileged(SERVICE_WRMSR, MSR_KERNEL_GS_BASE, owed_user_gs_base);
    owed_user_gs = 0;
}

/* The guest's SWAPGS owed (pending_swapgs), as the body leaves. In ring 3 where it may write the GS
 * base and the monitor knows what KERNEL_GS_BASE holds: the base swapped in is written with WRGSBASE,
 * and the one swapped out is owed to KERNEL_GS_BASE, unless that holds it already, as it holds the
 * kernel's own base on its way back to user mode (then nothing is left for ring 0 to do). Else by
 * ring 0: leave_to_user's SWAPGS on the way to user mode, a call of its own on the way to the kernel
 * (an interrupt's or exception's entry from user mode, and each system call's, were one each). */
static void leave_swapping_gs(int to_user)
{
    if (pending_swapgs && fsgsbase_native && kernel_gs_msr_known) {
        u64 out, in = owed_user_gs ? owed_user_gs_base : kernel_gs_msr;
        __asm__ volatile("rdgsbase %0" : "=r"(out));
        __asm__ volatile("wrgsbase %0" : : "r"(in) : "memory");
        owed_user_gs_base = out;
        owed_user_gs = out != kernel_gs_msr;
        pending_swapgs = 0;
        count(COUNT_SWAPGS_NATIVE);
    } else if (pending_swapgs && !to_user) {
        settle_user_gs();
        privileged(SERVICE_SWAPGS, 0, 0);
        pending_swapgs = 0;
    }
    if (to_user && fsgsbase_native) { /* what leave_to_user leaves in KERNEL_GS_BASE */
        if (pending_swapgs) {
            __asm__ volatile("rdgsbase %0" : "=r"(kernel_gs_msr)); /* swapped out there */
            kernel_gs_msr_known = 1;
        } else if (owed_user_gs) {
            kernel_gs_msr = owed_user_gs_base;
            kernel_gs_msr_known = 1;
        }
    }
}

/* ---- reports --------------------------------------------------------------------------------- */

static struct ucall report;

static char *append(char *at, const char *end, const char *text)
{
    while (*text && at < end)
        *at++ = *text++;
    return at;
}

static char *append_hex(char *at, const char *end, u64 value)
{
    char digits[19] = "0x";
    int n = 2;
    for (int shift = 60; shift >= 0; shift -= 4) {
        u64 digit = (value >> shift) & 0xf;
        if (digit || n > 2 || shift == 0)
            digits[n++] = "0123456789abcdef"[digit];
    }
    digits[n] = 0;
    return append(at, end, digits);
}

/* End the VM with a report (the VMX shows it as the guest's abort): the guest broke a rule the
 * monitor enforces, or asked for what this monitor does not do yet. `what` stays under 47
 * characters, so that the report's 96 bytes hold it with both numbers. */
static void __attribute__((noreturn)) stop(u32 line, const char *what, u64 a0, u64 a1)
{
    char *at = report.text, *end = report.text + sizeof(report.text) - 1;
    at = append(at, end, "monitor: ");
    at = append(at, end, what);
    at = append(at, end, " (");
    at = append_hex(at, end, a0);
    at = append(at, end, ", ");
    at = append_hex(at, end, a1);
    at = append(at, end, ")");
    *at = 0;
    append(report.file, report.file + sizeof(report.file) - 1, "monitor.c");
    report.cmd = UCALL_ABORT;
    report.line = line;
    report.args[0] = a0;
    report.args[1] = a1;
    outl(UCALL_PORT, (u32)((u64)&report - MONITOR_BASE + handoff.physical_base));
    privileged(SERVICE_HALT, 0, 0);
    __builtin_unreachable();
}
#define STOP(what, a0, a1) stop(__LINE__, what, (a0), (a1))

/* ---- the guest's memory, through the guest's own page tables ------------------------------------ */

/* The monitor reads the guest's page tables, which name guest-physical addresses, through a direct
 * map of guest RAM (DIRECT_BASE, in its own slot), and walks them as the CPU would to fill its
 * shadows (below); a guest virtual address it reaches through those shadows (guest_pointer). It
 * never touches anything but guest RAM below the monitor. */
#define PAGE_SIZE 4096ul
#define PTE_P 0x1ul
#define PTE_W 0x2ul
#define PTE_U 0x4ul
#define PTE_CACHE 0x18ul /* PWT, PCD */
#define PTE_A 0x20ul
#define PTE_D 0x40ul
#define PTE_PS 0x80ul
#define PTE_G 0x100ul
#define PTE_FROM_1G 0x200ul /* software bit in a shadow PDE: part of a guest 1 GiB page */
#define PTE_NX (1ul << 63)
#define PTE_ADDR 0x000ffffffffff000ul
#define CR0_WP (1ul << 16)
#define DIRECT_BASE (MONITOR_BASE + (256ul << 30)) /* the monitor's slot, from its 256th GiB */
#define SLOT_OF(address) (((address) >> 39) & 511)
#define PF_PRESENT 1ul
#define PF_WRITE 2ul
#define PF_USER 4ul
#define PF_FETCH 0x10ul
#define PF_PK 0x20ul /* the page's protection key forbade the access: under KVM's shadow paging every page has key 0 */

static u64 monitor_pdpt[512] __attribute__((aligned(4096))); /* the monitor's slot: itself, and guest RAM */
/* the same slot in the user mode's shadows: the monitor's pages for ring 0, the SYSCALL gate's for all */
static u64 user_monitor_pdpt[512] __attribute__((aligned(4096)));
static u64 user_monitor_pd[512] __attribute__((aligned(4096)));
static u64 user_monitor_pt[512] __attribute__((aligned(4096)));
static u64 direct_pd[4][512] __attribute__((aligned(4096)));

static u64 physical(const void *monitor_address)
{
    return (u64)monitor_address - MONITOR_BASE + handoff.physical_base;
}

/* Guest RAM: below the monitor's pages, and above 4 GiB. */
static int ram_holds(u64 guest_physical, u64 length)
{
    u64 end = guest_physical >= HIGH_RAM_BASE ? handoff.high_ram_end : handoff.guest_limit;
    return guest_physical < end && length <= end - guest_physical;
}

static void *in_ram(u64 guest_physical, u64 length)
{
    if (!ram_holds(guest_physical, length))
        STOP("the guest pointed outside its memory", guest_physical, length);
    return (void *)(DIRECT_BASE + guest_physical);
}

/* KVM's paravirtual EOI, kept by the monitor (Documentation/virt/kvm/x86/msr.rst, MSR_KVM_PV_EOI_EN):
 * the kernel names a flag in its memory, and skips its next EOI where the flag is set. KVM sets it as
 * it injects and takes it back at the next exit; under the monitor the trampoline always exits first,
 * so the kernel never found it set, and every timer interrupt's EOI was a trip into ring 0. So the
 * monitor keeps the MSR from KVM and does it itself, for the LAPIC timer (x2APIC mode only, where the
 * monitor sees its vector written): ring 0 EOIs the timer's interrupt as it comes (early_eoi,
 * monitor.S), and the flag is set where it is delivered (flag_early_eoi in the body, and
 * pv_deliver_held). As for KVM, a kernel that enables the flag skips an EOI only where it finds it
 * set, and Linux EOIs an interrupt before it takes another.
 * - pv_eoi_msr: the MSR as the kernel wrote it; pv_eoi_flag: its flag, in the monitor's map of RAM;
 * - lapic_timer_vector: the vector of the x2APIC's LVT timer the kernel wrote last (0: none, or the
 *   APIC left x2APIC mode);
 * - early_eoi_vector: that vector where the flag is enabled, else 0, which no interrupt has. */
static u64 pv_eoi_msr, lapic_timer_vector;
u8 *pv_eoi_flag;
u32 early_eoi_vector;
#define PV_EOI_ENABLED 1ul
#define APIC_BASE_X2APIC (1ul << 10)
#define LVT_VECTOR 0xfful

static void choose_early_eoi(void)
{
    early_eoi_vector = pv_eoi_flag && lapic_timer_vector >= 32 ? (u32)lapic_timer_vector : 0;
}

/* The kernel's write of MSR_KVM_PV_EOI_EN: 0 if KVM would have refused it (an address not 4-byte
 * aligned, or outside RAM). */
static int enable_pv_eoi(u64 value)
{
    u64 address = value & ~PV_EOI_ENABLED;
    if ((value & PV_EOI_ENABLED) && ((address & 3) || !ram_holds(address, 4)))
        return 0;
    pv_eoi_msr = value;
    pv_eoi_flag = value & PV_EOI_ENABLED ? in_ram(address, 4) : 0;
    choose_early_eoi();
    return 1;
}

/* The kernel's WRMSR of an MSR not kept in `guest`: 1 if done, 0 if refused. KVM's paravirtual EOI
 * is the monitor's; an INIT to another CPU is announced to the VMM first (AP_INIT_PORT); the
 * x2APIC's timer vector is seen on its way to the CPU. */
static int write_guest_msr(u32 msr, u64 value)
{
    if (msr == MSR_KVM_PV_EOI_EN)
        return enable_pv_eoi(value);
    if (msr == MSR_X2APIC_ICR && (value & ICR_DELIVERY_MODE) == ICR_INIT && (value & ICR_LEVEL_ASSERT))
        outl(AP_INIT_PORT, (value & ICR_SHORTHAND) == ICR_ALL_BUT_SELF ? AP_INIT_ALL : (u32)(value >> 32));
    if (privileged(SERVICE_WRMSR, msr, value))
        return 0;
    if (msr == MSR_X2APIC_LVT_TIMER || (msr == MSR_APIC_BASE && !(value & APIC_BASE_X2APIC))) {
        lapic_timer_vector = msr == MSR_X2APIC_LVT_TIMER ? value & LVT_VECTOR : 0;
        choose_early_eoi();
    }
    return 1;
}

/* An interrupt about to be delivered to the guest: the timer's, EOI'd by ring 0, with the kernel's
 * flag set. */
static void flag_early_eoi(u64 vector)
{
    if (vector != early_eoi_vector)
        return;
    __atomic_fetch_or(pv_eoi_flag, 1, __ATOMIC_RELAXED);
    count(COUNT_PV_EOI);
}

struct translation {
    u64 physical;  /* of the address walked */
    u64 size;      /* of the guest page: 4 KiB, 2 MiB or 1 GiB */
    u64 *leaf;     /* the guest's entry for it */
    u64 *entries[4];
    int levels;    /* entries walked */
    int writable, user, executable;
};

/* Walk the guest's tables for `address`: 1 if mapped (the permissions are in *t), else 0. */
static int walk(u64 address, struct translation *t)
{
    u64 table = guest.cr3 & PTE_ADDR;
    t->writable = t->user = t->executable = 1;
    t->levels = 0;
    for (int level = 3; level >= 0; level--) {
        u64 *entry = in_ram(table + ((address >> (12 + 9 * level)) & 511) * 8, 8);
        u64 e = *entry;
        if (!(e & PTE_P))
            return 0;
        t->entries[t->levels++] = entry;
        t->writable &= (e & PTE_W) != 0;
        t->user &= (e & PTE_U) != 0;
        t->executable &= !(e & PTE_NX);
        if (level == 0 || (level <= 2 && (e & PTE_PS))) {
            t->size = 1ul << (12 + 9 * level);
            t->physical = ((e & PTE_ADDR) & ~(t->size - 1)) | (address & (t->size - 1));
            t->leaf = entry;
            return 1;
        }
        table = e & PTE_ADDR;
    }
    return 0;
}

/* May an access of `kind` (PF_WRITE, PF_USER, PF_FETCH bits) use translation t? As the CPU decides,
 * with the guest's CR0.WP for supervisor writes. */
static int allowed(const struct translation *t, u64 kind)
{
    if ((kind & PF_USER) && !t->user)
        return 0;
    if ((kind & PF_WRITE) && !t->writable && ((kind & PF_USER) || (guest.cr0 & CR0_WP)))
        return 0;
    return !(kind & PF_FETCH) || t->executable;
}

/* The accessed bits the CPU sets on a walk, and the dirty bit on a write: by locked instructions, as
 * the CPU's own, since the guest's kernel on another vCPU may be changing the same entry. */
static void mark(struct translation *t, u64 kind)
{
    for (int i = 0; i < t->levels; i++)
        if (!(*t->entries[i] & PTE_A)) /* set already, as an upper level's mostly is: no locked write */
            __atomic_fetch_or(t->entries[i], PTE_A, __ATOMIC_RELAXED);
    if ((kind & PF_WRITE) && !(*t->leaf & PTE_D))
        __atomic_fetch_or(t->leaf, PTE_D, __ATOMIC_RELAXED);
}

/* A guest virtual address the monitor may use directly: it runs on the same shadow tables, so
 * a plain load or store reaches what the guest would; a page not in the shadow yet faults into
 * own_event, which fills it from the guest's tables (or ends the VM if they do not map it) and the
 * access is retried. Only the monitor's own slot is out of the guest's reach. */
static int canonical(u64 address)
{
    return address < 0x0000800000000000ul || address >= 0xffff800000000000ul;
}

static int monitor_slot_of(u64 address)
{
    return SLOT_OF(address) == MONITOR_SLOT;
}

static void *guest_pointer(u64 address, u64 length)
{
    if (!canonical(address) || !canonical(address + length - 1) || length > (1ul << 39) ||
        monitor_slot_of(address) || monitor_slot_of(address + length - 1))
        STOP("the guest pointed at the monitor's addresses", address, length);
    return (void *)address;
}

/* The copy's page fault when the guest's tables did not give it: what the CPU would report. */
static struct {
    u64 address, code;
} refused_access;

/* Copy to or from guest memory: 0, or 1 where the guest's tables do not give its kernel the access
 * (refused_access then says what the CPU's page fault would). The CPU's own event delivery gets the
 * fault it would have had; elsewhere the monitor ends the VM with its report. */
static int try_read_guest(u64 address, void *buffer, u64 length)
{
    return guest_copy(buffer, guest_pointer(address, length), length);
}

static int try_write_guest(u64 address, const void *buffer, u64 length)
{
    return guest_copy(guest_pointer(address, length), buffer, length);
}

static void read_guest(u64 address, void *buffer, u64 length)
{
    if (try_read_guest(address, buffer, length))
        STOP("the guest's tables do not map this for it", refused_access.address, refused_access.code);
}

static u64 read_u64(u64 address)
{
    u64 value;
    read_guest(address, &value, 8);
    return value;
}

/* ---- shadow page tables ------------------------------------------------------------------------- */

/* The CPU walks the monitor's shadow tables, never the guest's. A shadow is a software TLB: filled
 * from the guest's tables when a page fault finds nothing there, emptied by INVLPG (one page) and
 * checked at a CR3 load (shadow_check: what changed goes), which is what the architecture already
 * asks of a guest that changes a mapping.
 * Every guest page is user-accessible in its kernel's shadow (the guest's kernel runs in ring 3); its
 * user mode runs on a second shadow with only its user pages, and the guest's return to user mode
 * always traps, to switch. Slot MONITOR_SLOT maps the monitor and guest RAM for the body in ring 3 in
 * the kernel's shadows; in the user mode's, only the monitor's own pages, for ring 0 alone, and the
 * page of its SYSCALL gate (user_monitor_pdpt): a guest process cannot reach the monitor, or through
 * it its kernel's memory. No mapping the guest makes may reach the monitor's pages. */
#define SHADOW_PAGES 576

static u64 shadow_pool[SHADOW_PAGES][512] __attribute__((aligned(4096)));
/* A shadow per address space: SPACES of the guest's page tables (CR3 values) are kept, each with
 * its kernel's root and its user mode's; a CR3 load of one of them switches to it and
 * checks it (shadow_check), a load of another takes the least recently made one's place. The roots
 * stay, and are emptied in place: a page the host's own MMU knows as a page table costs a trap to
 * KVM for every write to it, so emptying writes only the entries that were in use (on PVM, zeroing
 * a fresh root page and loading CR3 twice, as the first version did, cost most of a flush). The
 * shadows' lower tables come from one pool; when it runs out every shadow is emptied.
 * Sized for a shell pipeline: with four spaces, seven processes made a shadow again at nearly every
 * context switch (docs/monitor.md). The whole image must leave the top of the monitor's 4 MiB to the
 * boot tables and the directories for RAM above 4 GiB (boot/monitor.py checks it at load). */
#define SPACES 16
static u64 roots[SPACES][2][512] __attribute__((aligned(4096)));
static struct space {
    u64 cr3;   /* the guest's tables */
} spaces[SPACES];
static int space;      /* the current one */
static int next_space; /* the one a new address space takes */
static int shadow_used;

/* Each fill, as it was made: what a CR3 load of the same tables checks (shadow_check). The guest's
 * entries on the way are kept by value, accessed and dirty bits included, so that any change to
 * them, even a cleared accessed bit, takes the shadow's entry away as a flush would. */
#define FILLS 4096
static struct fill {
    u64 address;
    int space;
    u64 *shadow; /* the entry made */
    u64 entry;
    u64 guest[4]; /* the guest's entries walked, top level first */
    int levels;
} fills[FILLS];
static int fills_used;
static u64 monitor_slot; /* the PML4 entry for MONITOR_SLOT */

/* The kernel's half, shared: every Linux process's tables hold the same PML4 entries for the upper
 * half (pgd_alloc copies init_mm's), so the shadow's table under such an entry is made once and
 * linked into each space's kernel root that has the same guest entry, as a CPU's TLB keeps global
 * entries across CR3 loads. Its fills are recorded as SHARED: a CR3 load checks those the guest made
 * global (CR4.PGE and the leaf's G) no more than a CPU flushes them, and the rest as its own; an
 * INVLPG takes the entry out of the shared table, which every space sees. A space whose entry differs
 * gets a table of its own. Emptied with the pool (shadow_flush). */
#define KERNEL_HALF 256
#define SHARED (-1)
static struct shared_slot {
    u64 guest;  /* the guest's PML4 entry, its accessed bit clear */
    u64 *table; /* the shadow's table under it, or 0 */
} shared_slots[512 - KERNEL_HALF];

static u64 *shadow_page(void)
{
    u64 *page = shadow_pool[shadow_used++];
    memset(page, 0, PAGE_SIZE);
    return page;
}

/* A root with only the monitor's slots left. */
static void empty_root(u64 *root)
{
    for (int slot = 0; slot < 512; slot++)
        if (root[slot] && slot != MONITOR_SLOT)
            root[slot] = 0;
}

/* For ring 0 (monitor.S): the current address space's roots, the physical addresses CR3 takes, and
 * which is loaded (monitor.h ON_*_ROOT: ring 0 loads the user mode's when it leaves for user mode,
 * and the trampoline the kernel's again at the next event from there). */
u64 kernel_root_cr3, user_root_cr3;
u8 user_root_loaded;

static void load_root(u64 *root)
{
    privileged(SERVICE_CR3, physical(root), 0);
}

/* The current address space's roots: its kernel's, and its user mode's. */
static u64 *kernel_root(void)
{
    return roots[space][0];
}

static u64 *user_root(void)
{
    return roots[space][1];
}

/* Address space `index` the current one, its roots published for ring 0. */
static void set_space(int index)
{
    space = index;
    kernel_root_cr3 = physical(roots[index][0]);
    user_root_cr3 = physical(roots[index][1]);
}

/* Address space `index` empty, its records gone (the pool's pages it used stay taken). */
static void empty_space(int index)
{
    empty_root(roots[index][0]); /* the CPU may be on it: the monitor's own slots stay */
    empty_root(roots[index][1]);
    int kept = 0;
    for (int i = 0; i < fills_used; i++)
        if (fills[i].space != index)
            fills[kept++] = fills[i];
    fills_used = kept;
}

/* A copy of the monitor loaded afresh where one ran before (a CPU its guest took offline and brought
 * back: boot/monitor.py start_ap) finds its roots zeroed by the VMM, from the host's side, which KVM
 * does not see: its shadow of a root the copy before used may still hold entries to that copy's lower
 * tables, stale, which the CPU would walk (a process on a CPU brought back online returned to an
 * address from another's memory, in about one run of four). A store from the guest to every entry
 * makes KVM drop them (it write-protects each page it shadows as a table, and forgets a page written
 * again and again). Done at the body's first event, where the stores are native (in ring 0 each is
 * emulated), before any fill of its own; then the CPU's TLB is flushed of what ring 0's fills for the
 * monitor's own accesses had put there. Once per copy: a copy that never ran before finds nothing to drop. */
static u8 roots_swept;

static void sweep_roots(void)
{
    roots_swept = 1;
    for (int index = 0; index < SPACES; index++)
        for (int r = 0; r < 2; r++)
            for (int slot = 0; slot < 512; slot++)
                if (slot != MONITOR_SLOT)
                    ((volatile u64 *)roots[index][r])[slot] = 0;
    fills_used = 0;
    memset(shared_slots, 0, sizeof shared_slots);
    load_root(kernel_root());
}

/* Empty every shadow (the pool used up, or what the guest's kernel may write changed): they refill
 * as the guest runs. */
static void shadow_flush(void)
{
    count(COUNT_SHADOW_FLUSH);
    fills_used = 0;
    memset(shared_slots, 0, sizeof shared_slots);
    for (int index = 0; index < SPACES; index++)
        empty_space(index);
    shadow_used = 0;
    load_root(kernel_root());
}

static u64 *table_at(u64 entry)
{
    return (u64 *)(MONITOR_BASE + ((entry & PTE_ADDR) - handoff.physical_base));
}

/* The kernel root's table for `slot` of the kernel's half: the shared one where the guest's entry is
 * the one it was made under; else, for the first space to map the slot, a new one shared from now,
 * and for any other a new one of its own (a shared table's entry stays until the pool is emptied,
 * so that a table is shared exactly where it is the slot's). */
static u64 *kernel_half_table(int slot)
{
    u64 guest_entry = *(u64 *)in_ram((guest.cr3 & PTE_ADDR) + slot * 8, 8) & ~PTE_A;
    struct shared_slot *shared = &shared_slots[slot - KERNEL_HALF];
    if (shared->table && shared->guest == guest_entry)
        return shared->table;
    u64 *table = shadow_page();
    if (!shared->table && (guest_entry & PTE_P)) {
        shared->guest = guest_entry;
        shared->table = table;
    }
    return table;
}

/* A PML4 slot of the kernel's half, other than the monitor's: one a shared table may hold. */
static int shareable_slot(int slot)
{
    return slot >= KERNEL_HALF && slot != MONITOR_SLOT;
}

/* Is `address` of the kernel's half mapped through its shared table in the current kernel root? */
static int in_shared_table(u64 address)
{
    int slot = SLOT_OF(address);
    if (!shareable_slot(slot))
        return 0;
    u64 *table = shared_slots[slot - KERNEL_HALF].table;
    return table && (kernel_root()[slot] & PTE_ADDR) == physical(table);
}

/* The shadow entry that maps `address` at `size` (4 KiB or 2 MiB) in `root`, its tables made. */
static u64 *shadow_entry(u64 *root, u64 address, u64 size)
{
    u64 *table = root;
    int last = size == PAGE_SIZE ? 0 : 1, slot = SLOT_OF(address);
    int shareable = root == kernel_root() && shareable_slot(slot);
    for (int level = 3; level > last; level--) {
        u64 *entry = &table[(address >> (12 + 9 * level)) & 511];
        int split = (*entry & PTE_P) && (*entry & PTE_PS); /* a large page the guest has split */
        if (!(*entry & PTE_P) && level == 3 && shareable)
            *entry = physical(kernel_half_table(slot)) | PTE_P | PTE_W | PTE_U;
        else if (!(*entry & PTE_P) || split)
            *entry = physical(shadow_page()) | PTE_P | PTE_W | PTE_U;
        if (split) { /* its translation goes from the CPU now: shadow_invalidate skips what no shadow maps */
            privileged(SERVICE_INVLPG, address, 0);
            load_root(kernel_root());
        }
        table = table_at(*entry);
    }
    return &table[(address >> (12 + 9 * last)) & 511];
}

/* Map in the current shadow what translation t gives `address` for an access of `kind`. Write
 * permission waits for the guest's dirty bit, so that the first write faults and sets it. */
static void shadow_fill(int user, u64 address, const struct translation *t)
{
    if (shadow_used > SHADOW_PAGES - 3 || fills_used == FILLS)
        shadow_flush(); /* a fill needs at most three new tables, and a record */
    u64 size = t->size == PAGE_SIZE ? PAGE_SIZE : 2ul << 20; /* a 1 GiB guest page: 2 MiB at a time */
    u64 frame = t->physical & ~(size - 1);
    if (frame < handoff.monitor_end && handoff.guest_limit < frame + size) /* any vCPU's copy */
        STOP("the guest mapped the monitor's memory", address, frame);
    u64 *root = user ? user_root() : kernel_root();
    u64 entry = frame | PTE_P | PTE_U | (*t->leaf & PTE_CACHE);
    if ((*t->leaf & PTE_D) && allowed(t, PF_WRITE | (user ? PF_USER : 0)))
        entry |= PTE_W;
    if (!t->executable)
        entry |= PTE_NX;
    if (size != PAGE_SIZE)
        entry |= PTE_PS | (t->size != size ? PTE_FROM_1G : 0);
    u64 *shadow = shadow_entry(root, address, size);
    int shared = !user && in_shared_table(address);
    if (shared && (*shadow & ~(PTE_A | PTE_D)) == entry)
        return; /* another space's fill, linked here by the shared table */
    *shadow = entry;
    struct fill *record = &fills[fills_used++];
    record->address = address & ~(size - 1);
    record->space = shared ? SHARED : space;
    record->shadow = shadow;
    record->entry = entry;
    record->levels = t->levels;
    for (int level = 0; level < t->levels; level++)
        record->guest[level] = *t->entries[level];
    count(COUNT_SHADOW_FILL);
}

/* A CR3 load of tables the current shadow was filled from (the same tables, or a switch back to
 * them): the guest may have changed them, and counts on the load to make its changes seen. Every
 * entry whose guest entries no longer read as they did at its fill goes, as from a flush; the others
 * stay, which a flush and its refills would only have made again (one page fault each, where a CR3
 * load is a context switch). 1 if an entry went, and so the real TLB must be flushed. */
static int shadow_check(void)
{
    count(COUNT_SHADOW_CHECK);
    int kept = 0, gone = 0;
    for (int i = 0; i < fills_used; i++) {
        struct fill *record = &fills[i];
        int global = record->space == SHARED && (guest.cr4 & CR4_PGE) && (record->guest[record->levels - 1] & PTE_G);
        if ((record->space != space && record->space != SHARED) || global) {
            fills[kept++] = *record; /* another space's, or global: a CR3 load keeps it, as a CPU's TLB does */
            continue;
        }
        if ((*record->shadow & ~(PTE_A | PTE_D)) != record->entry) /* the CPU marks the shadow's entries too */
            continue; /* invalidated, or made again since: a later record has it */
        struct translation t;
        int same = walk(record->address, &t) && t.levels == record->levels;
        for (int level = 0; same && level < t.levels; level++)
            same = *t.entries[level] == record->guest[level];
        if (!same) {
            *record->shadow = 0;
            gone = 1;
            continue;
        }
        fills[kept++] = *record;
    }
    fills_used = kept;
    return gone;
}

/* The guest's CR3 load: the same tables are checked; another address space's shadow, kept or new,
 * becomes the current one. */
static void load_guest_tables(u64 cr3)
{
    if (cr3 == guest.cr3) {
        if (shadow_check())
            load_root(kernel_root());
        return;
    }
    guest.cr3 = cr3;
    for (int index = 0; index < SPACES; index++)
        if (spaces[index].cr3 == cr3 && index != space) {
            set_space(index);
            shadow_check();
            load_root(kernel_root());
            return;
        }
    int index = next_space == space ? (next_space + 1) % SPACES : next_space;
    next_space = (index + 1) % SPACES;
    count(COUNT_SHADOW_FLUSH);
    empty_space(index);
    spaces[index].cr3 = cr3;
    set_space(index);
    load_root(kernel_root());
}

/* The entry for `address` out of the tables from `table` (at `level`); 1 if there was one. */
static int invalidate_in(u64 *table, int level, u64 address)
{
    for (; level >= 0; level--) {
        u64 *entry = &table[(address >> (12 + 9 * level)) & 511];
        if (!(*entry & PTE_P))
            return 0;
        if (level == 0 || (*entry & PTE_PS)) {
            if (*entry & PTE_FROM_1G)
                memset(table, 0, PAGE_SIZE);
            else
                *entry = 0;
            return 1;
        }
        table = table_at(*entry);
    }
    return 0;
}

/* INVLPG: the shadow entries for `address` go (all of a guest 1 GiB page's, which the shadow holds
 * as 2 MiB ones). Where neither shadow maps `address`, the CPU holds no translation of it to drop
 * (every entry the monitor takes out of a shadow is flushed then, here or by a CR3 load), and ring 0
 * is not asked: Linux's early_memunmap, for one, invalidates every page of a mapping it touched a
 * byte of (70,000 INVLPGs in a defconfig kernel's MP-table scan, each two trips into ring 0). The
 * kernel's half's shared table loses the entry too where this space has not linked it yet: another
 * space's global entry, which a CPU's INVLPG would drop from its TLB. */
static void shadow_invalidate(u64 address)
{
    int mapped = invalidate_in(roots[space][0], 3, address);
    mapped |= invalidate_in(roots[space][1], 3, address);
    int slot = SLOT_OF(address);
    if (shareable_slot(slot) && shared_slots[slot - KERNEL_HALF].table && !in_shared_table(address))
        mapped |= invalidate_in(shared_slots[slot - KERNEL_HALF].table, 2, address);
    if (!mapped)
        return;
    privileged(SERVICE_INVLPG, address, 0);
    load_root(kernel_root()); /* the monitor runs on the kernel's: the user shadow's TLB entries go too */
}

/* A page fault from the guest (`user`: in its user mode), or from the monitor's own access for it
 * (a supervisor access, on the kernel's shadow): the shadow's to fill (1), or the guest's own (0:
 * *code is the error code its handler gets). */
static int shadow_fault(u64 address, u64 hardware_code, int user, u64 *code)
{
    u64 kind = (hardware_code & (PF_WRITE | PF_FETCH)) | (user ? PF_USER : 0);
    struct translation t;
    if (address - PV_BASE < PV_SIZE && !user) { /* the pv page and the code cache, whatever the guest's tables say */
        /* The kernel writes the cache once, at boot: the return thunk JMPs the VMM moved there, with
         * their .return_sites entries (boot/kernel_sites.py). The pv page stays read-only. */
        u64 writable = address - PV_BASE >= PAGE_SIZE ? PTE_W : 0;
        if ((kind & PF_WRITE) && !writable) {
            *code = kind | PF_PRESENT;
            return 0;
        }
        if (shadow_used > SHADOW_PAGES - 3)
            shadow_flush();
        *shadow_entry(kernel_root(), address, PAGE_SIZE) = (physical(pv_page) + ((address - PV_BASE) & ~(PAGE_SIZE - 1)))
                                                           | PTE_P | PTE_U | writable;
        count(COUNT_SHADOW_FILL);
        return 1;
    }
    if (monitor_slot_of(address)) {
        if (user) { /* its user mode's view holds the monitor for ring 0 alone: a page not there */
            *code = kind;
            return 0;
        }
        STOP("the guest used the monitor's addresses", address, kind);
    }
    if (!walk(address, &t)) {
        *code = kind;
        return 0;
    }
    if (!allowed(&t, kind)) {
        *code = kind | PF_PRESENT;
        return 0;
    }
    mark(&t, kind);
    shadow_fill(user, address, &t);
    return 1;
}

/* The monitor's slot of every shadow, and the first shadow. The monitor starts on the boot tables
 * the VMM made for it (boot/monitor.py), whose map of the monitor goes into its own slot beside
 * guest RAM, mapped with 2 MiB pages from DIRECT_BASE. */
static void paging_init(void)
{
    u64 cr3;
    __asm__ volatile("mov %%cr3, %0" : "=r"(cr3)); /* the VMM's boot tables for the monitor, in its pages */
    guest.cr3 = handoff.guest_cr3;
    u64 boot_slot = ((u64 *)(MONITOR_BASE + (cr3 & PTE_ADDR) - handoff.physical_base))[MONITOR_SLOT];
    monitor_pdpt[0] = ((u64 *)(MONITOR_BASE + (boot_slot & PTE_ADDR) - handoff.physical_base))[0];
    u64 gib = (handoff.guest_limit + (1ul << 30) - 1) >> 30;
    for (u64 g = 0; g < gib && g < 4; g++) {
        monitor_pdpt[((DIRECT_BASE >> 30) & 511) + g] = physical(direct_pd[g]) | PTE_P | PTE_W | PTE_U;
        for (u64 i = 0; i < 512; i++) {
            u64 address = (g << 30) | (i << 21);
            if (address < handoff.guest_limit)
                direct_pd[g][i] = address | PTE_P | PTE_W | PTE_U | PTE_PS | PTE_NX;
        }
    }
    /* RAM above 4 GiB: the VMM's page directories (here in ring 0, each entry would be emulated) */
    if (handoff.high_ram_end > DIRECT_MAP_LIMIT)
        STOP("guest RAM beyond the monitor's map of it", handoff.high_ram_end, DIRECT_MAP_LIMIT);
    for (u64 g = HIGH_RAM_BASE >> 30; g < (handoff.high_ram_end + (1ul << 30) - 1) >> 30; g++)
        monitor_pdpt[((DIRECT_BASE >> 30) & 511) + g] =
            (handoff.high_ram_pds + (g - (HIGH_RAM_BASE >> 30)) * PAGE_SIZE) | PTE_P | PTE_W | PTE_U;
    monitor_slot = physical(monitor_pdpt) | PTE_P | PTE_W | PTE_U;
    /* the user mode's view: the monitor's 4 MiB for ring 0 only (the CPU's own accesses at an event:
     * the IDT, GDT, TSS, trampoline and event stacks), but for the SYSCALL gate's page */
    for (u64 i = 0; i < 512; i++)
        user_monitor_pt[i] = (handoff.physical_base + i * PAGE_SIZE) | PTE_P | PTE_W;
    user_monitor_pt[((u64)syscall_gate - MONITOR_BASE) / PAGE_SIZE] = physical(syscall_gate) | PTE_P | PTE_U;
    user_monitor_pt[((u64)gdt - MONITOR_BASE) / PAGE_SIZE] = physical(user_gdt) | PTE_P | PTE_W;
    user_monitor_pd[0] = physical(user_monitor_pt) | PTE_P | PTE_W | PTE_U;
    user_monitor_pd[1] = (handoff.physical_base + (2ul << 20)) | PTE_P | PTE_W | PTE_PS;
    user_monitor_pdpt[0] = physical(user_monitor_pd) | PTE_P | PTE_W | PTE_U;
    for (int index = 0; index < SPACES; index++) {
        roots[index][0][MONITOR_SLOT] = monitor_slot;
        roots[index][1][MONITOR_SLOT] = physical(user_monitor_pdpt) | PTE_P | PTE_W | PTE_U;
    }
    set_space(0);
    spaces[0].cr3 = guest.cr3;
    next_space = 1;
    load_root(kernel_root()); /* every root empty yet (not emptied here: in ring 0 each entry's test is emulated) */
}

/* TR: the selector, and the TSS's base and limit from the guest's GDT descriptor for it (a 64-bit
 * TSS descriptor spans two entries), read as the CPU reads them into TR's hidden part at LTR; base 0
 * for no TSS. */
static void load_tr(u64 selector)
{
    u64 index = selector & ~7ul;
    guest.tr = selector;
    guest.tss_base = guest.tss_limit = 0;
    if (index == 0 || index + 15 > guest.gdt_limit)
        return;
    u64 low = read_u64(guest.gdt_base + index), high = read_u64(guest.gdt_base + index + 8);
    u64 limit = (low & 0xffff) | ((low >> 48) & 0xf) << 16;
    guest.tss_base = ((low >> 16) & 0xffffff) | ((low >> 56) & 0xff) << 24 | (high & 0xffffffff) << 32;
    guest.tss_limit = (low >> 55) & 1 ? limit << 12 | 0xfff : limit; /* G: in pages */
}

/* ---- the monitor's tables ---------------------------------------------------------------------- */

/* 0 or 1 for the copies of the guest's CS and SS (keep_loaded), else -1. */
static int loaded_copy(u64 selector)
{
    return selector == LOADED_CS ? 0 : selector == LOADED_SS ? 1 : -1;
}

/* Whether `selector` is one of the copies of the guest's user segments its user mode runs on. */
static int user_alias_of(u64 selector)
{
    return (selector >> 3) >= USER_ALIASES && (selector >> 3) < USER_ALIASES + GUEST_GDT_ENTRIES && !(selector & 4);
}

static enum segment_kind kind_of(u64 selector)
{
    u64 index = selector >> 3;
    if (selector == BODY_SS)
        return KERNEL_DATA; /* the guest kernel's null SS (NULL_SS) */
    if (loaded_copy(selector) >= 0)
        return (enum segment_kind)loaded[loaded_copy(selector)].kind;
    if (user_alias_of(selector)) {
        enum segment_kind kind = (enum segment_kind)segment_kind[index - USER_ALIASES];
        return kind == USER_CODE || kind == USER_DATA ? kind : NO_SEGMENT;
    }
    return index < GUEST_GDT_ENTRIES && !(selector & 4) ? (enum segment_kind)segment_kind[index] : NO_SEGMENT;
}

/* The real selector the guest's user mode runs on for its user segment `selector` (USER_ALIASES). */
static u64 user_alias(u64 selector)
{
    u64 index = selector >> 3;
    return index < GUEST_GDT_ENTRIES ? (index + USER_ALIASES) << 3 | 3 : selector;
}

/* A real selector as the guest knows it: its kernel's segments have RPL 0 to it, 3 to the CPU. */
static u64 guest_view(u64 selector)
{
    if (selector == BODY_SS)
        return 0;
    if (loaded_copy(selector) >= 0)
        return loaded[loaded_copy(selector)].selector;
    if (user_alias_of(selector))
        return ((selector >> 3) - USER_ALIASES) << 3 | (selector & 3);
    enum segment_kind kind = kind_of(selector);
    return kind == KERNEL_CODE || kind == KERNEL_DATA ? selector & ~3ul : selector;
}

/* Before the GDT changes under the guest: its segment register `which` (0 CS, 1 SS) onto a copy. */
static void keep_loaded(u64 *selector, int which)
{
    if ((*selector >> 3) >= GUEST_GDT_ENTRIES)
        return; /* on its copy already, since an earlier LGDT, or the null SS, which no GDT holds */
    loaded[which].kind = (u8)kind_of(*selector);
    loaded[which].selector = (u16)guest_view(*selector);
    gdt[(which ? LOADED_SS : LOADED_CS) >> 3] = gdt[*selector >> 3];
    *selector = which ? LOADED_SS : LOADED_CS;
}

/* The guest kernel's null SS (what the CPU loads at a privilege change, or a kernel loads itself):
 * ring 3 cannot run on a null SS, so the real one is the monitor's own flat data segment, which the
 * guest sees as null (guest_view). */
#define NULL_SS BODY_SS

/* SYSCALL's stack segment: the selector after its code segment in STAR, as the CPU takes it. */
static u64 syscall_stack_segment(u64 cs)
{
    u64 ss = (cs & ~7ul) + 8;
    return kind_of(ss) == KERNEL_DATA ? ss | 3 : NULL_SS;
}


/* The guest's GDT, at its LGDT and at the start: each of its code and data segments at its own
 * index in the real GDT, its kernel's (DPL 0) with DPL 3; no system descriptors (the TSS the CPU
 * uses is the monitor's; the guest's is read at its LTR). */
static void mirror_gdt(void)
{
    iret_kernel_cs = iret_kernel_ss = ~0ul; /* their descriptors may change: learnt again */
    for (u64 index = 1; index < GUEST_GDT_ENTRIES; index++) {
        u64 d = index * 8 + 7 <= guest.gdt_limit ? read_u64(guest.gdt_base + index * 8) : 0;
        segment_kind[index] = NO_SEGMENT;
        gdt[index] = gdt[USER_ALIASES + index] = user_gdt[index] = user_gdt[USER_ALIASES + index] = 0;
        if (!(d & DESCRIPTOR_SEGMENT)) {
            if ((d & DESCRIPTOR_PRESENT) && index + 1 < GUEST_GDT_ENTRIES)
                index++, gdt[index] = user_gdt[index] = 0, segment_kind[index] = NO_SEGMENT; /* a system descriptor is two entries */
            continue;
        }
        int code = (d & DESCRIPTOR_CODE) != 0, user = ((d >> 45) & 3) == 3;
        segment_kind[index] = user ? (code ? USER_CODE : USER_DATA) : (code ? KERNEL_CODE : KERNEL_DATA);
        /* the guest's kernel's IRETQ to a user code segment must trap (#NP): the monitor changes shadows */
        gdt[index] = user && code ? d & ~DESCRIPTOR_PRESENT : d | DESCRIPTOR_DPL3;
        if (user)
            gdt[USER_ALIASES + index] = user_gdt[USER_ALIASES + index] = user_gdt[index] = d;
    }
}

u64 monitor_init(void)
{
    if (handoff.magic != HANDOFF_MAGIC)
        halt_forever(); /* not loaded by a VMM that knows the handoff: nothing to report through */
    u64 tss_base = (u64)&tss;
    gdt[BODY_CS >> 3] = CODE64_DPL3;
    gdt[BODY_SS >> 3] = DATA_DPL3;
    gdt[TSS_SELECTOR >> 3] = (sizeof(tss) - 1) | (tss_base & 0xffffff) << 16 | 0x89ul << 40 |
                             ((tss_base >> 24) & 0xff) << 56;
    gdt[(TSS_SELECTOR >> 3) + 1] = tss_base >> 32;
    gdt[MONITOR_CS >> 3] = user_gdt[MONITOR_CS >> 3] = CODE64_DPL0; /* the CPU loads them at an event */
    gdt[MONITOR_DS >> 3] = user_gdt[MONITOR_DS >> 3] = DATA_DPL0;
    tss.rsp[0] = (u64)monitor_stack_top;
    open_ports();
    tss.io_map_gap = tss.io_map_end = 0xff;
    for (int vector = 0; vector < 256; vector++) {
        u64 target = vector == 14 ? (u64)page_fault_entry
                   : vector == 13 ? (u64)general_protection_entry
                   : vector == 3 ? (u64)breakpoint_entry : event_stubs[vector];
        idt[vector].offset_low = target & 0xffff;
        idt[vector].selector = MONITOR_CS;
        /* interrupt gates, DPL 0, except int3 and into, which ring 3 raises on purpose */
        idt[vector].type_attr = vector == 3 || vector == 4 ? 0xee : 0x8e;
        idt[vector].offset_mid = (target >> 16) & 0xffff;
        idt[vector].offset_high = target >> 32;
    }
    struct { u16 limit; u64 base; } __attribute__((packed)) gdtr = { GDT_ENTRIES * 8 - 1, (u64)gdt },
                                                             idtr = { sizeof(idt) - 1, (u64)idt };
    __asm__ volatile("lgdt %0; lidt %1" : : "m"(gdtr), "m"(idtr) : "memory");
    __asm__ volatile("ltr %w0" : : "r"(TSS_SELECTOR));
    __asm__ volatile("mov %%cr0, %0" : "=r"(guest.cr0));
    __asm__ volatile("mov %%cr4, %0" : "=r"(guest.cr4));
    u32 eax = 7, ebx, ecx = 0, edx;
    __asm__ volatile("cpuid" : "+a"(eax), "=b"(ebx), "+c"(ecx), "=d"(edx));
    if (ecx & CPUID_7_UMIP) { /* the descriptor stores fault in ring 3: emulated, they show the guest's */
        real_cr4_extra = CR4_UMIP;
        __asm__ volatile("mov %0, %%cr4" : : "r"(guest.cr4 | real_cr4_extra));
    }
    guest.dr[6] = DR6_FIXED;
    guest.dr[7] = DR7_FIXED;
    guest.gdt_base = handoff.guest_gdt_base;
    guest.gdt_limit = handoff.guest_gdt_limit;
    paging_init();
    return MONITOR_CS;
}

/* The program's entry, as boot/program.py documents it, with its ring-0 code in ring 3. */
void monitor_first_frame(struct trap_frame *frame)
{
    /* on the monitor's own code segment now: its accesses to guest memory may fault and return, and
     * an int3 (ring0_call, for the MSRs) comes back */
    privileged(SERVICE_RDMSR, MSR_STAR, (u64)&guest.star);
    privileged(SERVICE_RDMSR, MSR_LSTAR, (u64)&guest.lstar);
    privileged(SERVICE_RDMSR, MSR_CSTAR, (u64)&guest.cstar);
    privileged(SERVICE_RDMSR, MSR_SFMASK, (u64)&guest.sfmask);
    privileged(SERVICE_WRMSR, MSR_LSTAR, (u64)syscall_gate); /* a SYSCALL, from any mode of the guest, comes here */
    mirror_gdt();
    load_tr(handoff.guest_tr);
    memset(frame, 0, sizeof(*frame));
    frame->rip = handoff.guest_rip;
    frame->rsp = handoff.guest_rsp;
    frame->rdi = handoff.guest_rdi;
    frame->rsi = handoff.guest_rsi;
    frame->rdx = handoff.guest_rdx;
    frame->cs = handoff.guest_cs | 3;
    frame->ss = handoff.guest_ss | 3;
    frame->rflags = RFLAGS_FIXED | RFLAGS_IF; /* the real IF; the guest's starts clear */
}

/* ---- delivering events to the guest ------------------------------------------------------------ */

static int has_error_code(u64 vector)
{
    return error_code_vectors[vector] != 0; /* frame.inc's list, which the stubs follow */
}

static void deliver(struct trap_frame *frame, u64 vector, int error, u64 error_code);

/* What the CPU does when it cannot deliver `vector` because of `fault` (SDM vol. 3, 6.15, interrupt 8,
 * the double-fault conditions): a benign event gets the fault delivered instead; a contributory one
 * (#DE, #TS, #NP, #SS, #GP) or a page fault gets a double fault, and a double fault that cannot be
 * delivered is a triple fault: the VM shuts down, as KVM reports it. */
static int failing; /* deliver_failed is delivering the fault that stopped another delivery */

static void deliver_failed(struct trap_frame *frame, u64 vector, u64 fault, u64 code)
{
    count(COUNT_EXCEPTIONS);
    if (fault == 14) { /* a page fault in the delivery's own access */
        guest_cr2 = refused_access.address;
        code = refused_access.code;
    }
    if (vector == 8)
        privileged(SERVICE_TRIPLE_FAULT, 0, 0);
    if (!failing) { /* the event that began the chain, for the VMX's report if it ends in a triple fault */
        handoff.failed_vector = vector;
        handoff.failed_fault = fault;
        handoff.failed_rip = frame->rip;
        handoff.failed_cr2 = guest_cr2;
    }
    failing++;
    if (vector == 0 || (vector >= 10 && vector <= 14))
        deliver(frame, 8, 1, 0);
    else
        deliver(frame, fault, 1, code);
    failing--;
}

static void deliver_event(struct trap_frame *frame, u64 vector, int error, u64 error_code, int software);

static void deliver(struct trap_frame *frame, u64 vector, int error, u64 error_code)
{
    deliver_event(frame, vector, error, error_code, vector == 3 || vector == 4); /* int3 and into are the program's own */
}

/* Deliver `vector` through the guest's IDT, as the CPU would: on the stack its gate and TSS name,
 * with the frame its handler expects (CS and SS as the guest knows them, its own IF). Where the CPU
 * would fault instead (no gate, a gate not present, memory its tables do not give the kernel), the
 * monitor delivers that fault, up to the triple fault (`code` 0 for a page fault: refused_access).
 * A `software` event (INT n, INT3, INTO) is refused by a gate whose DPL is below the program's
 * privilege, and its error codes do not have the EXT bit. */
static void deliver_event(struct trap_frame *frame, u64 vector, int error, u64 error_code, int software)
{
    u64 idt_code = vector * 8 + 2 + !software; /* IDT, and EXT unless the program raised it */
    if (vector * 16 + 15 > guest_idt.limit) {
        deliver_failed(frame, vector, 13, idt_code);
        return;
    }
    u64 gate[2];
    if (try_read_guest(guest_idt.base + vector * 16, gate, 16)) {
        deliver_failed(frame, vector, 14, 0);
        return;
    }
    u64 low = gate[0], high = gate[1];
    if (!(low & DESCRIPTOR_PRESENT)) {
        deliver_failed(frame, vector, 11, idt_code);
        return;
    }
    u64 target = (low & 0xffff) | ((low >> 48) & 0xffff) << 16 | (high & 0xffffffff) << 32;
    u64 selector = (low >> 16) & 0xffff, type = (low >> 40) & 0xf, dpl = (low >> 45) & 3, ist = (low >> 32) & 7;
    if (software && guest.user && dpl < 3) { /* INT n, INT3 or INTO where the gate forbids it */
        deliver(frame, 13, 1, vector * 8 + 2);
        return;
    }
    u64 rflags = (frame->rflags & ~(RFLAGS_IF | RFLAGS_IOPL)) | (guest.user ? RFLAGS_IF | guest.user_iopl : virtual_if);
    u64 cs = guest_view(frame->cs), ss = guest_view(frame->ss);
    enum segment_kind target_kind = kind_of(selector & ~3ul);
    u64 rsp;
    if (target_kind == USER_CODE && guest.user) {
        rsp = frame->rsp & ~15ul; /* no change of privilege: the current stack */
    } else if (target_kind == KERNEL_CODE) {
        u64 offset = ist ? 0x24 + 8 * (ist - 1) : 4; /* an IST entry, or RSP0 */
        if (ist || guest.user) {
            if (!guest.tss_base) { /* no TSS to take the stack from: #TS */
                deliver_failed(frame, vector, 10, guest.tr & ~3ul);
                return;
            }
            if (try_read_guest(guest.tss_base + offset, &rsp, 8)) {
                deliver_failed(frame, vector, 14, 0);
                return;
            }
        } else {
            rsp = frame->rsp;
        }
        rsp &= ~15ul;
    } else { /* a gate to a code segment the monitor does not know, or to user code from the kernel */
        deliver_failed(frame, vector, 13, selector & ~3ul);
        return;
    }
    u64 pushed[6] = { error_code, frame->rip, cs, rflags, frame->rsp, ss }; /* the frame the CPU pushes */
    u64 words = error ? 6 : 5;
    rsp -= words * 8;
    if (try_write_guest(rsp, pushed + 6 - words, words * 8)) {
        deliver_failed(frame, vector, 14, 0);
        return;
    }
    frame->rip = target;
    frame->rsp = rsp;
    frame->rflags = RFLAGS_FIXED | RFLAGS_IF;
    frame->cs = target_kind == USER_CODE ? user_alias(selector) : selector | 3;
    if (target_kind == KERNEL_CODE) {
        if (guest.user)
            frame->ss = NULL_SS; /* what the CPU loads at a change of privilege */
        guest.user = 0;
        if (type == 0xe)
            virtual_if = 0; /* an interrupt gate; a trap gate leaves IF alone */
    }
}

static int take_pending(void)
{
    for (int word = 3; word >= 0; word--)
        if (held[word]) {
            int bit = 63 - __builtin_clzl(held[word]);
            /* one locked instruction: ring 0 may hold another vector between any two of the body's */
            __atomic_fetch_and(&held[word], ~(1ul << bit), __ATOMIC_RELAXED);
            return word * 64 + bit;
        }
    return -1;
}

static int any_pending(void)
{
    return (held[0] | held[1] | held[2] | held[3]) != 0;
}

static void hold(u64 vector)
{
    __atomic_fetch_or(&held[vector / 64], 1ul << (vector % 64), __ATOMIC_RELAXED);
}

/* An interrupt, through the guest's IDT. */
static void deliver_interrupt(struct trap_frame *frame, u64 vector)
{
    count(COUNT_INTERRUPTS);
    flag_early_eoi(vector);
    deliver(frame, vector, 0, 0);
}

/* A held interrupt, delivered now that the guest takes interrupts (the highest vector first). */
static void deliver_held(struct trap_frame *frame)
{
    if (!(guest.user || virtual_if) || !any_pending())
        return;
    deliver_interrupt(frame, (u64)take_pending());
}

/* ---- emulating the guest kernel's privileged instructions ---------------------------------------- */

/* The instruction at `rip`, up to 16 bytes. The CPU fetched it whole before it faulted, but the bytes
 * after it may lie on a page the guest's tables do not map, or past the end of the canonical lower
 * half, where a plain read would end the VM: those read as zero, and are no part of it. */
static int fetchable(u64 address)
{
    return canonical(address) && !monitor_slot_of(address);
}

static void fetch_instruction(u64 rip, u8 bytes[16])
{
    memset(bytes, 0, 16);
    u64 head = PAGE_SIZE - (rip & (PAGE_SIZE - 1));
    if (head > 16)
        head = 16;
    if (!fetchable(rip) || try_read_guest(rip, bytes, head))
        return;
    if (head < 16 && fetchable(rip + head))
        try_read_guest(rip + head, bytes + head, 16 - head);
}

struct instruction {
    const u8 *bytes;
    int length;   /* so far: prefixes, opcode, ModRM, SIB, displacement */
    int rex;
    int opsize16; /* a 0x66 prefix */
    int mod, reg, rm;
};

static u64 *gpr(struct trap_frame *frame, int n)
{
    switch (n) {
    case 0: return &frame->rax;
    case 1: return &frame->rcx;
    case 2: return &frame->rdx;
    case 3: return &frame->rbx;
    case 4: return &frame->rsp;
    case 5: return &frame->rbp;
    case 6: return &frame->rsi;
    case 7: return &frame->rdi;
    case 8: return &frame->r8;
    case 9: return &frame->r9;
    case 10: return &frame->r10;
    case 11: return &frame->r11;
    case 12: return &frame->r12;
    case 13: return &frame->r13;
    case 14: return &frame->r14;
    default: return &frame->r15;
    }
}

/* ModRM (and SIB and displacement) at insn->bytes[insn->length]; for a memory operand, its address. */
static u64 decode_modrm(struct trap_frame *frame, struct instruction *insn)
{
    u8 modrm = insn->bytes[insn->length++];
    insn->mod = modrm >> 6;
    insn->reg = ((modrm >> 3) & 7) | (insn->rex & 4 ? 8 : 0);
    insn->rm = (modrm & 7) | (insn->rex & 1 ? 8 : 0);
    if (insn->mod == 3)
        return 0;
    u64 address;
    if ((modrm & 7) == 4) { /* SIB */
        u8 sib = insn->bytes[insn->length++];
        int index = ((sib >> 3) & 7) | (insn->rex & 2 ? 8 : 0), base = (sib & 7) | (insn->rex & 1 ? 8 : 0);
        address = index == 4 ? 0 : *gpr(frame, index) << (sib >> 6);
        if ((sib & 7) == 5 && insn->mod == 0) {
            address += (u64)(i64)*(const int *)&insn->bytes[insn->length];
            insn->length += 4;
        } else {
            address += *gpr(frame, base);
        }
    } else if ((modrm & 7) == 5 && insn->mod == 0) { /* RIP-relative: from the next instruction */
        i64 displacement = *(const int *)&insn->bytes[insn->length];
        insn->length += 4;
        return frame->rip + (u64)insn->length + (u64)displacement; /* no immediate follows here */
    } else {
        address = *gpr(frame, insn->rm);
    }
    if (insn->mod == 1)
        address += (u64)(i64)(signed char)insn->bytes[insn->length++];
    else if (insn->mod == 2) {
        address += (u64)(i64)*(const int *)&insn->bytes[insn->length];
        insn->length += 4;
    }
    return address;
}

#define CR0_GUEST_MAY_CHANGE 0x5002eul /* MP EM TS NE WP AM */
#define CR0_GUEST_ONLY 0x60000000ul /* NW CD: the guest's view only (a kernel that found MTRRs on, as a
                                       BIOS leaves them, disables caching to change them); caching stays
                                       on for the CPU, which KVM gives the host's memory types anyway */
#define CR4_GUEST_MAY_CHANGE 0x407d8ul /* DE PSE MCE PGE PCE OSFXSR OSXMMEXCPT OSXSAVE; and UMIP, where the CPU has it */
#define CR4_GUEST_ONLY 0x700004ul /* TSD SMEP SMAP PKE: the guest's to set, never the CPU's (its kernel runs in
                                    ring 3). PKE: where the host's ring 3 runs with it, the VMM leaves the kernel
                                    its protection keys (cpuid.py), and its WRPKRU runs natively */

static void write_cr(int cr, u64 value)
{
    switch (cr) {
    case 0:
        if ((value ^ guest.cr0) & ~(CR0_GUEST_MAY_CHANGE | CR0_GUEST_ONLY))
            STOP("the guest changed fixed CR0 bits", guest.cr0, value);
        privileged(SERVICE_CR0, value & ~CR0_GUEST_ONLY, 0);
        if ((value ^ guest.cr0) & CR0_WP)
            shadow_flush(); /* what its kernel may write changed */
        guest.cr0 = value;
        return;
    case 2:
        guest_cr2 = value;
        return;
    case 3:
        load_guest_tables(value);
        return;
    case 4:
        if ((value ^ guest.cr4) & ~(CR4_GUEST_MAY_CHANGE | CR4_GUEST_ONLY | real_cr4_extra))
            STOP("the guest changed fixed CR4 bits", guest.cr4, value);
        privileged(SERVICE_CR4, (value & ~CR4_GUEST_ONLY) | real_cr4_extra, 0);
        if ((value ^ guest.cr4) & CR4_PGE)
            shadow_flush(); /* the CPU's TLB empties, global entries too (SDM vol. 3A, 4.10.4.1): Linux's
                               flush of a kernel range too large for INVLPGs, with no CR3 load to check */
        guest.cr4 = value;
        return;
    case 8:
        privileged(SERVICE_CR8, value, 0);
        return;
    }
}

static int read_cr(int cr, u64 *value)
{
    switch (cr) {
    case 0: *value = guest.cr0; return 1;
    case 2: *value = guest_cr2; return 1;
    case 3: *value = guest.cr3; return 1;
    case 4: *value = guest.cr4; return 1;
    case 8: *value = privileged(SERVICE_READ_CR8, 0, 0); return 1;
    }
    return 0;
}

/* IRETQ from the guest's kernel: to its kernel (a #GP, the frame's CS having RPL 0) or to its user
 * mode (a #NP on the user code segment). */
static void emulate_iretq(struct trap_frame *frame)
{
    u64 popped[5];
    read_guest(frame->rsp, popped, sizeof(popped));
    u64 rip = popped[0], cs = popped[1], rflags = popped[2], new_rsp = popped[3], ss = popped[4];
    frame->rip = rip;
    frame->rsp = new_rsp;
    frame->rflags = (rflags & RFLAGS_STATUS) | RFLAGS_FIXED | RFLAGS_IF;
    if (kind_of(cs) == USER_CODE && (cs & 3) == 3) {
        if (kind_of(ss) != USER_DATA || (ss & 3) != 3)
            STOP("user-mode return with a non-user stack", ss, rip);
        frame->cs = user_alias(cs);
        frame->ss = user_alias(ss);
        guest.user = 1;
        guest.user_iopl = rflags & RFLAGS_IOPL;
    } else if (kind_of(cs) == KERNEL_CODE && (cs & 3) == 0) {
        frame->cs = cs | 3;
        frame->ss = kind_of(ss) == KERNEL_DATA ? ss | 3 : NULL_SS;
        virtual_if = rflags & RFLAGS_IF;
        if (kind_of(ss) == KERNEL_DATA && (ss & 3) == 0 && ss >> 3) { /* the segments pv_iret may take */
            iret_kernel_cs = cs;
            iret_kernel_ss = ss;
        }
    } else {
        STOP("IRETQ to an unknown code segment", cs, rip);
    }
}

/* The guest's copy of an MSR the monitor keeps for it (SYSCALL's and SYSENTER's), or 0 for any
 * other MSR (those pass through to the CPU). A 64-bit kernel sets SYSENTER's at boot for its 32-bit
 * processes; SYSENTER itself is not emulated: with the real MSRs null, it is a #GP. */
static u64 *kept_msr_of(u32 index)
{
    switch (index) {
    case MSR_STAR: return &guest.star;
    case MSR_LSTAR: return &guest.lstar;
    case MSR_CSTAR: return &guest.cstar;
    case MSR_SFMASK: return &guest.sfmask;
    case MSR_SYSENTER_CS: case MSR_SYSENTER_CS + 1: case MSR_SYSENTER_CS + 2:
        return &guest.sysenter[index - MSR_SYSENTER_CS];
    }
    return 0;
}

/* SYSCALL, from the guest's user mode (or its kernel): the CPU saved the return address in RCX and
 * RFLAGS in R11 and jumped to the real LSTAR, the monitor's gate, without leaving ring 3 (which is
 * what this host's KVM does with a ring-3 SYSCALL). The rest, as the CPU does it for the guest (SDM
 * vol. 2, SYSCALL): its kernel's code and stack segments from STAR, RIP from its LSTAR, RFLAGS
 * masked by its SFMASK; the stack pointer is left as it was. */
static void emulate_syscall(struct trap_frame *frame)
{
    u64 cs = (guest.star >> 32) & 0xfffc;
    if (kind_of(cs) != KERNEL_CODE)
        STOP("SYSCALL to an unknown code segment", guest.star, frame->rcx);
    frame->r11 = (frame->r11 & ~RFLAGS_IOPL) | guest.user_iopl; /* the RFLAGS its user mode had, as it knows them */
    u64 rflags = frame->r11 & ~guest.sfmask;
    frame->rip = guest.lstar;
    frame->cs = cs | 3;
    frame->ss = syscall_stack_segment(cs);
    frame->rflags = (rflags & RFLAGS_STATUS) | RFLAGS_FIXED | RFLAGS_IF;
    virtual_if = rflags & RFLAGS_IF;
    guest.user = 0;
    /* Linux's entry_SYSCALL_64 begins with SWAPGS (after an ENDBR64, with indirect-branch tracking
     * built in: a no-op without CR4.CET), which would trap at once: done now, in this event (one
     * trip into the monitor fewer per system call; the guest starts after it, as the CPU would be
     * once it had run them, with interrupts still masked by SFMASK) */
    u8 bytes[16];
    fetch_instruction(frame->rip, bytes);
    int at = bytes[0] == 0xf3 && bytes[1] == 0x0f && bytes[2] == 0x1e && bytes[3] == 0xfa ? 4 : 0;
    u8 swaps = bytes[at] == 0x0f && bytes[at + 1] == 0x01 && bytes[at + 2] == 0xf8;
    if (swaps) {
        count(COUNT_SWAPGS);
        frame->rip += (u64)at + 3;
    }
    if (swaps != entry_swapgs) /* ring 0 swapped at the gate for the LSTAR it knew: set it right */
        pending_swapgs ^= 1;
    entry_swapgs = swaps && !fsgsbase_native; /* else the body's, in ring 3 (leave_swapping_gs) */
}

/* How far a NOP or a short jump forward at `bytes` takes the guest (0: neither, or not within
 * `room`): the padding Linux's alternatives leave where an instruction is not needed, a one-byte NOP
 * in a run, or the long NOPs the SDM recommends (0F 1F /0, with 66 and 2E prefixes). */
static int nop_or_jump(const u8 *bytes, int room)
{
    if (room >= 2 && bytes[0] == 0xeb && (signed char)bytes[1] >= 0)
        return 2 + bytes[1];
    int prefixes = 0;
    while (prefixes < room && (bytes[prefixes] == 0x66 || bytes[prefixes] == 0x2e))
        prefixes++;
    if (prefixes < room && bytes[prefixes] == 0x90)
        return prefixes + 1;
    if (prefixes + 3 > room || bytes[prefixes] != 0x0f || bytes[prefixes + 1] != 0x1f)
        return 0;
    u8 modrm = bytes[prefixes + 2];
    if ((modrm >> 3 & 7) != 0 || (modrm >> 6) == 3)
        return 0;
    int length = prefixes + 3 + ((modrm & 7) == 4) + ((modrm >> 6) == 1 ? 1 : (modrm >> 6) == 2 ? 4 : 0);
    if ((modrm >> 6) == 0 && (modrm & 7) == 5)
        length += 4; /* RIP-relative */
    return length <= room ? length : 0;
}

/* How far the way to Linux's return to user mode goes past `bytes`: a NOP or short jump
 * (nop_or_jump), or a VERW through RIP (0F 00 /5, ModRM 2D), which sets *verw. 0 for anything else. */
static int on_the_way_out(const u8 *bytes, int room, int *verw)
{
    if (room >= 7 && bytes[0] == 0x0f && bytes[1] == 0x00 && bytes[2] == 0x2d) {
        *verw = 1;
        return 7;
    }
    return nop_or_jump(bytes, room);
}

/* SYSRETQ from the guest's kernel (#GP: ring 3 may not): to user mode at RCX with RFLAGS from R11,
 * the user segments STAR names, which must be the ones the monitor's GDT has at those indexes. */
static void emulate_sysret(struct trap_frame *frame)
{
    u64 base = (guest.star >> 48) & 0xfffc;
    if (kind_of(base + 16) != USER_CODE || kind_of(base + 8) != USER_DATA)
        STOP("SYSRET to unknown user segments", guest.star, frame->rcx);
    if (!canonical(frame->rcx)) {
        deliver(frame, 13, 1, 0); /* the CPU's #GP(0), in the kernel */
        return;
    }
    frame->rip = frame->rcx;
    frame->rflags = (frame->r11 & RFLAGS_STATUS) | RFLAGS_FIXED | RFLAGS_IF; /* user mode takes interrupts */
    frame->cs = user_alias(base + 16);
    frame->ss = user_alias(base + 8);
    guest.user = 1;
    guest.user_iopl = frame->r11 & RFLAGS_IOPL;
}

/* Linux's returns to user mode, from the SWAPGS's #GP at their start to the instruction that leaves,
 * done in this one event (1), where the SWAPGS and what leaves would each have trapped; 0 leaves the
 * SWAPGS done alone. From `at`, past the SWAPGS, the way out: NOPs and short jumps where VERW would
 * be, or the VERW (on_the_way_out, which owes it); then
 * - SYSRETQ: the return from a system call (entry_SYSCALL_64), at its own address should it fault;
 * - the IRETQ the VMM made a UD2 (guest_iret_site): the return from an interrupt or exception
 *   (swapgs_restore_regs_and_return_to_usermode; 6.1 jumps there), whose UD2 traps too;
 * - 6.12's and 7.2's check before that IRETQ that the frame is user mode's (testb $3, 8(%rsp); jnz
 *   to it), followed where the frame passes it. */
static int emulate_swapgs_return(struct trap_frame *frame, u64 at)
{
    static const u8 test_user_cs[5] = { 0xf6, 0x44, 0x24, 0x08, 0x03 };
    int verw = 0;
    for (int step = 0; step < 8; step++) {
        u8 bytes[16];
        fetch_instruction(at, bytes);
        int skipped = on_the_way_out(bytes, 16, &verw);
        if (skipped > 0) {
            at += (u64)skipped;
            continue;
        }
        if (bytes[0] == 0x48 && bytes[1] == 0x0f && bytes[2] == 0x07) {
            frame->rip = at;
            owed_verw |= (u8)verw;
            count(COUNT_SYSRET);
            emulate_sysret(frame);
            return 1;
        }
        if (handoff.guest_iret_site && at == handoff.guest_iret_site) {
            frame->rip = at;
            owed_verw |= (u8)verw;
            count(COUNT_IRETQ);
            count(COUNT_IRETQ_AT_SWAPGS);
            emulate_iretq(frame);
            return 1;
        }
        int same = 1;
        for (int i = 0; i < 5; i++)
            same &= bytes[i] == test_user_cs[i];
        u64 cs;
        if (!handoff.guest_iret_site || !same || try_read_guest(frame->rsp + 8, &cs, sizeof(cs)) || (cs & 3) != 3)
            return 0;
        if (bytes[5] == 0x75)
            at += 7 + (u64)(long)(signed char)bytes[6];
        else if (bytes[5] == 0x0f && bytes[6] == 0x85)
            at += 11 + (u64)(long)(int)(bytes[7] | bytes[8] << 8 | bytes[9] << 16 | (u32)bytes[10] << 24);
        else
            return 0;
    }
    return 0;
}

/* The guest kernel's SWAPGS, which ends at `past`: the monitor never uses GS, so the CPU's own swap,
 * owed until the way out, is exactly the guest's; and the return to user mode after it, if that is
 * what follows (emulate_swapgs_return: 1 if done). */
static int emulate_swapgs(struct trap_frame *frame, u64 past)
{
    count(COUNT_SWAPGS);
    pending_swapgs ^= 1;
    return emulate_swapgs_return(frame, past);
}

/* The kernel's SWAPGS before its SYSRETQ, reached through sysret_gate (monitor.S; the VMM made the
 * SWAPGS a jump there, through the padding after the SYSRETQ): what its #GP did (emulate_swapgs),
 * from the same bytes, which are the kernel's still after the SWAPGS. The frame's CS and SS are those
 * the kernel runs on, which ring 3 cannot read here (kernel_cs_view, kernel_ss_view); they count
 * only where the body does not do the SYSRETQ (a way out it does not know) and the kernel goes on
 * past its SWAPGS, as after that #GP, to the VERW and the SYSRETQ, which traps. */
static void emulate_sysret_gate(struct trap_frame *frame)
{
    count(COUNT_SYSRET_GATE);
    frame->rip = handoff.guest_sysret_site;
    frame->cs = kernel_cs_view == ~0ul ? LOADED_CS : kernel_cs_view | 3;
    frame->ss = kernel_ss_view ? kernel_ss_view | 3 : NULL_SS;
    if (!emulate_swapgs(frame, frame->rip + 3))
        frame->rip += 3; /* past the SWAPGS */
}

/* A segment selector operand (LTR, LLDT, MOV to a segment register): the register's low 16 bits,
 * or the word at `address` (decode_modrm's) in memory. */
static u16 selector_operand(struct trap_frame *frame, const struct instruction *insn, u64 address)
{
    u16 selector;
    if (insn->mod == 3)
        return (u16)*gpr(frame, insn->rm);
    read_guest(address, &selector, sizeof(selector));
    return selector;
}

/* Store `length` bytes at the guest's `address` for an instruction it executed: 0 when done, 1 when
 * the address is not canonical (#GP(0)) or its tables do not give it the write (in its user mode,
 * only user pages do; the page fault), and what the CPU would raise has been delivered instead. */
static int store_for_guest(struct trap_frame *frame, u64 address, const void *value, u64 length)
{
    if (!canonical(address) || !canonical(address + length - 1)) {
        deliver(frame, 13, 1, 0);
        return 1;
    }
    if (guest.user) {
        for (u64 page = address & ~(PAGE_SIZE - 1); page <= ((address + length - 1) & ~(PAGE_SIZE - 1)); page += PAGE_SIZE) {
            struct translation t;
            u64 at = page < address ? address : page;
            int mapped = walk(at, &t);
            if (!mapped || !allowed(&t, PF_USER | PF_WRITE)) {
                guest_cr2 = at;
                deliver(frame, 14, 1, PF_USER | PF_WRITE | (mapped ? PF_PRESENT : 0));
                return 1;
            }
        }
    }
    if (try_write_guest(address, value, length)) {
        guest_cr2 = refused_access.address;
        deliver(frame, 14, 1, refused_access.code);
        return 1;
    }
    return 0;
}

/* A register operand of `value`, at the instruction's operand size (a 32-bit one zero-extends). */
static void store_register(struct trap_frame *frame, const struct instruction *insn, u64 value)
{
    u64 *reg = gpr(frame, insn->rm);
    if (insn->opsize16)
        *reg = (*reg & ~0xfffful) | (value & 0xffff);
    else
        *reg = insn->rex & 8 ? value : value & 0xffffffff;
}

/* SGDT, SIDT and SMSW (0f 01 /0, /1, /4), SLDT and STR (0f 00 /0, /1). With UMIP, which the monitor
 * keeps on where the CPU has it, they fault in ring 3, where they would show the monitor's tables:
 * the guest gets its own, in its kernel, and in its user mode unless its CR4 asks for UMIP itself.
 * 0: not one of them; 1: done (RIP moved on, or a page fault delivered). */
static int emulate_store_descriptor(struct trap_frame *frame, struct instruction *insn, u8 second, u64 address)
{
    u8 operand[10];
    u64 value = 0, length = 2;
    if (guest.user && (guest.cr4 & CR4_UMIP))
        return 0; /* the guest's own UMIP: its #GP */
    if (second == 0x01 && insn->reg <= 1) { /* sgdt, sidt: memory only */
        if (insn->mod == 3)
            return 0;
        *(u16 *)operand = (u16)(insn->reg == 0 ? guest.gdt_limit : guest_idt.limit);
        *(u64 *)(operand + 2) = insn->reg == 0 ? guest.gdt_base : guest_idt.base;
        length = 10;
    } else if (second == 0x01 && insn->reg == 4) { /* smsw */
        value = guest.cr0;
    } else if (second == 0x00 && insn->reg <= 1) { /* sldt (no LDT: lldt is not emulated), str */
        value = insn->reg == 0 ? 0 : guest.tr;
    } else {
        return 0;
    }
    count(COUNT_DESCRIPTOR);
    if (length == 2 && insn->mod == 3) {
        store_register(frame, insn, value);
    } else {
        if (length == 2)
            *(u16 *)operand = (u16)value;
        if (store_for_guest(frame, address, operand, length))
            return 1;
    }
    frame->rip += (u64)insn->length;
    return 1;
}

/* The instruction at the guest's RIP, if it is one the monitor emulates: 1 when done. In its user
 * mode only the descriptor stores qualify (UMIP's); everything else is its own #GP. */
static int emulate(struct trap_frame *frame)
{
    u8 fetched[16];
    fetch_instruction(frame->rip, fetched);
    struct instruction insn = { .bytes = fetched };
    while ((insn.bytes[insn.length] & 0xf0) == 0x40 || insn.bytes[insn.length] == 0x66) {
        if ((insn.bytes[insn.length] & 0xf0) == 0x40)
            insn.rex = insn.bytes[insn.length];
        else
            insn.opsize16 = 1;
        if (++insn.length > 4)
            return 0;
    }
    u8 opcode = insn.bytes[insn.length++];
    if (guest.user && opcode != 0x0f)
        return 0;
    switch (opcode) {
    case 0xfa: /* cli */
        count(COUNT_CLI);
        virtual_if = 0;
        frame->rip += (u64)insn.length;
        return 1;
    case 0xfb: /* sti; STI's shadow keeps the next instruction before any interrupt: a HLT there
                * waits for one (the idiom that would otherwise sleep through its wake-up) */
        count(COUNT_STI);
        virtual_if = RFLAGS_IF;
        frame->rip += (u64)insn.length;
        if (insn.bytes[insn.length] != 0xf4)
            return 1;
        insn.length++;
        /* fall through */
    case 0xf4: /* hlt */
        count(COUNT_HLT);
        frame->rip += opcode == 0xf4 ? (u64)insn.length : 1;
        if (!virtual_if) { /* as the CPU: only an NMI or INIT would wake it */
            u64 cpu = (handoff.physical_base - handoff.guest_limit) / MONITOR_SIZE;
            /* a Linux's AP, parked (play_dead): its INIT may come through the xAPIC, unseen. (A
             * program's APs park at their end, and stay on their copies.) */
            if (cpu && handoff.guest_iret_site)
                outl(AP_INIT_PORT, (u32)cpu);
            privileged(SERVICE_HALT, 0, 0);
        }
        privileged(SERVICE_WAIT, 0, 0);
        return 1;
    case 0xcb: { /* lretq, as a kernel reloads CS after its LGDT: to its kernel (RPL 0 < CPL 3) */
        if (!(insn.rex & 8))
            STOP("32-bit far return is not emulated", frame->rip, 0);
        u64 popped[2];
        read_guest(frame->rsp, popped, sizeof(popped));
        if (kind_of(popped[1]) != KERNEL_CODE || (popped[1] & 3))
            STOP("far return to other than the kernel", popped[1], popped[0]);
        count(COUNT_SEGMENT);
        frame->rip = popped[0];
        frame->cs = popped[1] | 3;
        frame->rsp += sizeof(popped);
        return 1;
    }
    case 0x8e: { /* mov to a segment register: SS with RPL 0 faults in ring 3 (the others load) */
        u64 operand = decode_modrm(frame, &insn);
        if (insn.reg != 2)
            return 0;
        u16 selector = selector_operand(frame, &insn, operand);
        if (selector > 3 && kind_of(selector) != KERNEL_DATA) {
            deliver(frame, 13, 1, selector & ~3ul); /* as the CPU: SS must be a data segment of CPL */
            return 1;
        }
        count(COUNT_SEGMENT);
        frame->ss = selector > 3 ? (u64)selector | 3 : NULL_SS;
        frame->rip += (u64)insn.length;
        return 1;
    }
    case 0xcf: /* iretq */
        if (!(insn.rex & 8))
            STOP("32-bit IRET is not emulated", frame->rip, 0);
        count(COUNT_IRETQ);
        emulate_iretq(frame);
        return 1;
    case 0x0f:
        break;
    default:
        return 0;
    }
    u8 second = insn.bytes[insn.length++];
    if (guest.user && second > 0x01)
        return 0;
    u64 value, address, *kept_msr;
    switch (second) {
    case 0x01: {
        address = decode_modrm(frame, &insn);
        if (emulate_store_descriptor(frame, &insn, second, address))
            return 1;
        if (guest.user)
            return 0;
        if (insn.bytes[insn.length - 1] == 0xf8) { /* swapgs */
            if (emulate_swapgs(frame, frame->rip + (u64)insn.length))
                return 1;
            break;
        }
        if (insn.bytes[insn.length - 1] == 0xd1) { /* xsetbv: XCR0, which the CPU keeps for the guest */
            if (!(guest.cr4 & CR4_OSXSAVE)) {
                deliver(frame, 6, 0, 0); /* #UD, as without OSXSAVE */
                return 1;
            }
            count(COUNT_XSETBV);
            if (privileged(SERVICE_XSETBV, (u32)frame->rcx, (frame->rdx & 0xffffffff) << 32 | (frame->rax & 0xffffffff))) {
                deliver(frame, 13, 1, 0); /* what the CPU refused */
                return 1;
            }
            break;
        }
        if (insn.mod == 3)
            STOP("unsupported privileged 0f 01 instruction", frame->rip,
                 insn.bytes[insn.length - 1]);
        if (insn.reg == 2 || insn.reg == 3) { /* lgdt, lidt */
            u8 operand[10];
            read_guest(address, operand, sizeof(operand));
            u64 limit = *(u16 *)operand, base = *(u64 *)(operand + 2);
            count(COUNT_DESCRIPTOR);
            if (insn.reg == 2) {
                guest.gdt_base = base;
                guest.gdt_limit = limit;
                keep_loaded(&frame->cs, 0);
                keep_loaded(&frame->ss, 1);
                mirror_gdt();
            } else {
                guest_idt.base = base;
                guest_idt.limit = limit;
            }
        } else if (insn.reg == 7) { /* invlpg */
            count(COUNT_INVLPG);
            shadow_invalidate(address);
        } else {
            return 0;
        }
        break;
    }
    case 0x00: /* ltr */
        address = decode_modrm(frame, &insn);
        if (emulate_store_descriptor(frame, &insn, second, address))
            return 1;
        if (guest.user)
            return 0;
        if (insn.reg == 2) { /* lldt: only the null selector, as a 64-bit kernel loads it */
            u16 selector = selector_operand(frame, &insn, address);
            if (selector & ~3)
                STOP("an LDT is not emulated", frame->rip, selector);
            count(COUNT_DESCRIPTOR);
            break;
        }
        if (insn.reg != 3)
            return 0;
        count(COUNT_DESCRIPTOR);
        load_tr(selector_operand(frame, &insn, address));
        break;
    case 0x06: /* clts */
        count(COUNT_MOV_CR);
        write_cr(0, guest.cr0 & ~8ul);
        break;
    case 0x21: /* mov %drN, reg */
    case 0x23: { /* mov reg, %drN: the guest's own copies; the CPU's stay clear, so its breakpoints
                  * do not fire (a kernel clears DR7 at boot, and a debugger is not run under this) */
        decode_modrm(frame, &insn);
        int n = insn.reg & 7;
        if (n == 4 || n == 5)
            n += 2; /* DR6 and DR7 by their old names (CR4.DE clear) */
        count(COUNT_MOV_DR);
        if (second == 0x21) {
            *gpr(frame, insn.rm) = guest.dr[n];
        } else {
            value = *gpr(frame, insn.rm);
            guest.dr[n] = n == 6 ? value | DR6_FIXED : n == 7 ? (value & 0xffffffff) | DR7_FIXED : value;
        }
        break;
    }
    case 0x09: /* wbinvd: a VM's caches are the host's to keep coherent; nothing to write back */
        count(COUNT_WBINVD);
        break;
    case 0x20: /* mov %crN, reg */
    case 0x22: /* mov reg, %crN */
        decode_modrm(frame, &insn);
        count(COUNT_MOV_CR);
        if (!read_cr(insn.reg, &value)) {
            deliver(frame, 6, 0, 0); /* #UD: a control register that does not exist */
            return 1;
        }
        if (second == 0x22)
            write_cr(insn.reg, *gpr(frame, insn.rm));
        else
            *gpr(frame, insn.rm) = value;
        break;
    case 0x07: /* sysretq */
        if (!(insn.rex & 8))
            STOP("32-bit SYSRET is not emulated", frame->rip, 0);
        count(COUNT_SYSRET);
        emulate_sysret(frame);
        return 1;
    case 0x30: /* wrmsr */
        count(COUNT_WRMSR);
        if ((u32)frame->rcx == MSR_KERNEL_GS_BASE)
            settle_user_gs(); /* before the write, which supersedes it */
        value = (frame->rdx & 0xffffffff) << 32 | (frame->rax & 0xffffffff);
        kept_msr = kept_msr_of((u32)frame->rcx);
        if (kept_msr != 0 && (kept_msr == &guest.star || kept_msr == &guest.sfmask ||
                              kept_msr == &guest.sysenter[0] || canonical(value))) {
            *kept_msr = value;
        } else if (kept_msr != 0 || !write_guest_msr((u32)frame->rcx, value)) {
            deliver(frame, 13, 1, 0); /* a non-canonical address, or what the CPU (or KVM) refused */
            return 1;
        }
        break;
    case 0x32: /* rdmsr */
        count(COUNT_RDMSR);
        if ((u32)frame->rcx == MSR_KERNEL_GS_BASE)
            settle_user_gs();
        kept_msr = kept_msr_of((u32)frame->rcx);
        if (kept_msr != 0) {
            value = *kept_msr;
        } else if ((u32)frame->rcx == MSR_KVM_PV_EOI_EN) {
            value = pv_eoi_msr;
        } else if (privileged(SERVICE_RDMSR, (u32)frame->rcx, (u64)&value)) {
            deliver(frame, 13, 1, 0);
            return 1;
        }
        frame->rax = value & 0xffffffff;
        frame->rdx = value >> 32;
        break;
    default:
        return 0;
    }
    frame->rip += (u64)insn.length;
    return 1;
}

/* The flags a POPF in ring 0 may change, but IF (the virtual one), IOPL, NT, TF and AC: the real
 * flags of the kernel's ring 3, where AC would turn on alignment checks and TF single steps. */
#define RFLAGS_POPF_KEPT 0xcd5ul /* CF, PF, AF, ZF, SF, DF, OF */

/* A PUSHF or POPF of the guest's kernel, made PUSHF_TRAP or POPF_TRAP by the VMM (flag_traps): done
 * as in ring 0, on the virtual IF. A fault on the stack is the kernel's, as the instruction's. */
static int emulate_flags(struct trap_frame *frame)
{
    u8 bytes[16];
    fetch_instruction(frame->rip, bytes);
    if (bytes[0] == PUSHF_TRAP) {
        u64 value = (frame->rflags & RFLAGS_STATUS) | RFLAGS_FIXED | virtual_if; /* no RF, as PUSHF pushes */
        if (store_for_guest(frame, frame->rsp - 8, &value, 8))
            return 1;
        count(COUNT_PUSHF);
        frame->rsp -= 8;
        frame->rip += 1;
        return 1;
    }
    if (bytes[0] == POPF_TRAP) {
        u64 value;
        if (try_read_guest(frame->rsp, &value, 8)) {
            guest_cr2 = refused_access.address;
            deliver(frame, 14, 1, refused_access.code);
            return 1;
        }
        count(COUNT_POPF);
        frame->rsp += 8;
        frame->rip += 1;
        frame->rflags = (frame->rflags & ~RFLAGS_POPF_KEPT) | (value & RFLAGS_POPF_KEPT);
        virtual_if = value & RFLAGS_IF;
        return 1;
    }
    return 0;
}

/* INT n (CD ib), which this host's KVM turns into #UD in ring 3 before anything sees it (a #UD at a
 * CD byte can have no other cause: it is a valid instruction in every mode): delivered as the CPU
 * would, through the program's gate for n, returning past the instruction. 1 if it was one. */
static int emulate_int_n(struct trap_frame *frame)
{
    u8 bytes[16];
    fetch_instruction(frame->rip, bytes);
    if (bytes[0] != 0xcd)
        return 0;
    count(COUNT_INT_N);
    frame->rip += 2;
    deliver_event(frame, bytes[1], 0, 0, 1);
    return 1;
}

/* ---- the guest's user mode and the ports ---------------------------------------------------------- */

/* Port I/O in ring 3, where the guest's kernel, the body and the guest's user mode all run, is the
 * TSS bitmap's to grant (this host forces IOPL to 0 in ring 3). The kernel's and the body's map grants
 * every port; a user mode whose IOPL the guest set to 3 gets the same. Any other user mode runs on
 * user_io_map, which grants nothing until its first port access: that #GP copies the guest's own
 * bitmap there (as its TSS gives it, the bytes past its limit refusing) and the access is retried, now
 * under the guest's rules: a port it grants runs natively, one it refuses faults again, into the
 * guest. The copy holds until the guest's kernel runs, which may change its bitmap. */
static void fence_ports(void)
{
    if (guest.user_iopl == RFLAGS_IOPL)
        return; /* the body's map, already loaded */
    if (user_ports == PORTS_STALE) {
        memset(tss.user_io_map, 0xff, sizeof(tss.user_io_map));
        user_ports = PORTS_DENIED;
    }
    tss.io_map_base = io_map_offset(tss.user_io_map);
}

/* IN, OUT, INS or OUTS, after any prefixes. */
static int port_instruction(const u8 *bytes)
{
    int at = 0;
    while (at < 15 && ((bytes[at] & 0xf0) == 0x40 || bytes[at] == 0x66 || bytes[at] == 0x67 ||
                       bytes[at] == 0xf2 || bytes[at] == 0xf3 || bytes[at] == 0x26 || bytes[at] == 0x2e ||
                       bytes[at] == 0x36 || bytes[at] == 0x3e || bytes[at] == 0x64 || bytes[at] == 0x65))
        at++;
    u8 opcode = bytes[at];
    return (opcode >= 0xe4 && opcode <= 0xe7) || (opcode >= 0xec && opcode <= 0xef) || (opcode >= 0x6c && opcode <= 0x6f);
}

/* A #GP from user mode: 1 if it was the fence's (a port access before the guest's bitmap was
 * copied), which is then copied for the retry. */
static int unfence_ports(struct trap_frame *frame)
{
    u8 bytes[16];
    if (user_ports != PORTS_DENIED || frame->error_code != 0)
        return 0;
    fetch_instruction(frame->rip, bytes);
    if (!port_instruction(bytes))
        return 0;
    u16 base; /* the guest's I/O map base, at 0x66 in its TSS */
    u64 limit = guest.tss_limit;
    if (guest.tss_base && limit >= 0x67 && !try_read_guest(guest.tss_base + 0x66, &base, sizeof(base)) && base <= limit) {
        u64 length = limit - base + 1 < sizeof(tss.user_io_map) ? limit - base + 1 : sizeof(tss.user_io_map);
        if (try_read_guest(guest.tss_base + base, tss.user_io_map, length))
            memset(tss.user_io_map, 0xff, sizeof(tss.user_io_map)); /* as a CPU that cannot read it */
    }
    count(COUNT_PORT_MAP);
    user_ports = PORTS_COPIED;
    return 1;
}

/* pv_ops.mmu.write_cr3, from the guest's kernel through cr3_gate (monitor.S): its MOV to CR3,
 * without the trap. */
void monitor_cr3_gate(u64 cr3)
{
    count(COUNT_CR3_GATE);
    load_guest_tables(cr3);
}

/* A translated INVLPG, through invlpg_gate (monitor.S): what its trap did, without the trap. */
void monitor_invlpg_gate(u64 address)
{
    count(COUNT_INVLPG_GATE);
    shadow_invalidate(address);
}

/* ---- protection keys ---------------------------------------------------------------------------- */

/* The guest's ring 3 runs on the host's CR4.PKE, so its WRPKRU runs natively; but under KVM's shadow
 * paging every page has key 0, the kernel's and the monitor's too. A PKRU that denies key 0 is
 * therefore taken back (key0_allow) by the first code of the monitor's that meets it, which is the
 * body's entry for the guest's own access: what the body sees here, with key0_found. The access is
 * judged as the CPU would have judged it with the guest's keys: a user-mode access to a page whose
 * key (the guest's entry's bits 62:59) the guest's PKRU denies is the guest's page fault, with PK
 * in its error code (Linux: SIGSEGV, SEGV_PKUERR); anything else, the kernel's accesses above all
 * (its pages are supervisor pages on a CPU, which keys do not govern), is retried, as key 0 now
 * allows. The process goes on with key 0 allowed: RDPKRU shows the two bits clear. */
static void key0_denied_access(struct trap_frame *frame)
{
    u32 pkru = key0_found;
    u64 code = frame->error_code;
    struct translation t;
    if (pkru && guest.user && (guest.cr4 & CR4_PKE) && walk(event_cr2, &t)) {
        u64 key = (*t.leaf >> 59) & 15;
        if ((pkru >> (2 * key)) & ((code & PF_WRITE) ? 3 : 1)) {
            count(COUNT_EXCEPTIONS);
            guest_cr2 = event_cr2;
            deliver(frame, 14, 1, (code & (PF_WRITE | PF_PRESENT)) | PF_USER | PF_PK);
        }
    }
}

/* ---- ring 0's events ---------------------------------------------------------------------------- */

/* An event while the monitor itself ran, in its body or in a ring-0 service: an interrupt (held for
 * the guest), or a fault it expected (a refused MSR, a page of guest memory not in the shadow yet). */
static void own_event(struct trap_frame *frame)
{
    if (frame->vector >= 32) {
        count(COUNT_DEFERRED);
        hold(frame->vector);
        leave_again = 1;
        if (frame->rip >= (u64)body_window && frame->rip < (u64)body_window_end)
            frame->rip = (u64)body_exit; /* past the body's last look at leave_again: look again */
        else if (frame->rip >= (u64)msr_gate_return && frame->rip < (u64)owe_user_gs && frame->rax == 0)
            frame->rip = PV_BASE + PV_WRITE_MSR_DONE; /* written: a trap to deliver it, and back */
        else if (frame->rip >= (u64)msr_gate && frame->rip < (u64)msr_gate_end)
            frame->rip = PV_BASE + PV_WRITE_MSR_TRAP; /* its kernel's write again, through a trap: its event delivers */
        else if (frame->rip >= (u64)gs_gate && frame->rip < (u64)gs_gate_end) {
            if (frame->rip >= (u64)gs_gate_load && frame->rip < (u64)gs_gate_base_back)
                privileged(SERVICE_WRMSR, MSR_GS_BASE, frame->rax); /* the kernel's base, RDGSBASE's */
            frame->rip = PV_BASE + PV_LOAD_GS_INDEX_AGAIN; /* a trap to deliver it, then the gate again */
        }
        else if (frame->rip >= (u64)cr3_gate_look && frame->rip < (u64)cr3_gate_end)
            frame->rip = (u64)cr3_gate_look; /* past its look at the virtual IF: look again */
        return;
    }
    if (frame->vector == 13 && frame->rip == (u64)gs_load_at) {
        frame->rip = (u64)gs_load_refused;
        return;
    }
    if ((frame->vector == 11 || frame->vector == 13) && frame->rip == (u64)gs_gate_load) {
        frame->rdi = 0; /* a selector the CPU refused in the kernel's ring 3: the null one instead */
        return;
    }
    if (frame->vector == 6 && frame->rip == (u64)fsgsbase_swap_at) {
        frame->rip = (u64)fsgsbase_refused;
        return;
    }
    if (frame->vector == 13 && frame->rip == (u64)fast_wrmsr_at) {
        frame->rip = (u64)fast_wrmsr_refused; /* the body emulates it, and delivers the #GP */
        return;
    }
    if ((frame->vector == 13 || frame->vector == 14) && frame->rip == (u64)fast_wrmsr_fetch) {
        frame->rip = (u64)fast_wrmsr_unread; /* the body fetches it, as for any other #GP */
        return;
    }
    if (frame->vector == 13 && frame->rip == (u64)xcr_write_at) {
        frame->rip = (u64)xcr_refused;
        return;
    }
    if (frame->vector == 13 && (frame->rip == (u64)wrmsr_at || frame->rip == (u64)rdmsr_at)) {
        frame->rip = (u64)msr_refused; /* the call, answered in ring0_event's own frame */
        return;
    }
    u64 cr2, code;
    __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
    if (frame->vector == 14 && (frame->error_code & PF_PK)) {
        /* a WRPKRU in the guest's ring 3, which the host's CR4.PKE lets run, denied key 0: the
         * monitor's ring 3 runs on the guest's PKRU, and all its pages have key 0 */
        if (frame->rip >= (u64)key0_allow && frame->rip < (u64)key0_allow_end)
            STOP("key 0 still denied after the monitor allowed it", cr2, frame->error_code);
        key0_return.rax = frame->rax;
        key0_return.rcx = frame->rcx;
        key0_return.rdx = frame->rdx;
        key0_return.rflags = frame->rflags;
        key0_return.rip = frame->rip;
        frame->rip = (u64)key0_allow;
        count(COUNT_KEY0);
        return;
    }
    if (frame->vector == 14 && !monitor_slot_of(cr2)) { /* its access for the guest, not in the shadow yet */
        if (shadow_fault(cr2, frame->error_code, 0, &code)) {
            count(COUNT_OWN_FILL);
            return; /* filled: the access is retried */
        }
        if (frame->rip == (u64)guest_copy_at) {
            refused_access.address = cr2;
            refused_access.code = code;
            frame->rip = (u64)guest_copy_failed;
            return;
        }
        STOP("the guest's tables do not map this for it", cr2, code);
    }
    STOP(frame->vector == 14 ? "page fault in the monitor"
                             : "exception in the monitor",
         frame->vector, frame->vector == 14 ? cr2 : frame->rip);
}

/* Every event that stays in ring 0 (the stubs send the guest's to the body): the body's calls
 * (int3 at ring0_call) and the monitor's own events. */
void monitor_ring0_event(struct trap_frame *frame)
{
    if (frame->vector == 3 && frame->rip == (u64)ring0_return && (frame->cs & 3)) {
        frame->rax = privileged(frame->rdi, frame->rsi, frame->rdx);
        return;
    }
    own_event(frame);
}

/* ---- the body: the guest's events, in ring 3 --------------------------------------------------- */

void monitor_event(struct trap_frame *frame)
{
    open_ports(); /* the body's own: its reports are port I/O */
    if (!segment_bases_probed)
        probe_segment_bases();
    if (!roots_swept)
        sweep_roots();
    u64 vector = frame->vector;
    if (vector != SYSRET_EVENT)
        count(COUNT_EVENTS);
    int syscall = vector == SYSCALL_EVENT;
    guest.user = syscall || user_root_loaded == LEFT_USER_ROOT; /* not CS: its user mode could load others */
    user_root_loaded = ON_KERNEL_ROOT;
    int user_cs_absent = vector == 11 && !(frame->error_code & 7) && kind_of(frame->error_code) == USER_CODE;
    if (syscall) {
        count(COUNT_SYSCALL);
        emulate_syscall(frame);
    } else if (vector == SYSRET_EVENT) {
        emulate_sysret_gate(frame);
    } else if ((vector == 13 || (user_cs_absent && !guest.user)) && emulate(frame)) {
        /* emulated; a held interrupt the guest now takes is delivered on the way out */
    } else if (vector == 13 && guest.user && unfence_ports(frame)) {
        /* the guest's bitmap copied: the access is retried */

    } else if (vector == 14 && (frame->error_code & PF_PK)) {
        key0_denied_access(frame);
    } else if (vector == 14) {
        u64 address = event_cr2, code;
        if (!shadow_fault(address, frame->error_code, guest.user, &code)) {
            count(COUNT_EXCEPTIONS);
            guest_cr2 = address;
            deliver(frame, 14, 1, code);
        }
    } else if (vector == 6 && !guest.user && frame->rip == handoff.guest_iret_site && handoff.guest_iret_site) {
        /* the kernel's IRETQ to user mode, which the VMM made a UD2: on this host a native IRETQ to
         * the user segments Linux shares with the host runs without a trap, and the host would go on
         * reporting the kernel's CS; the monitor must see the guest change mode */
        count(COUNT_IRETQ);
        emulate_iretq(frame);
    } else if (vector == 6 && !guest.user && handoff.flag_traps && emulate_flags(frame)) {
        /* done on the virtual IF; one it turned on takes a held interrupt on the way out */
    } else if (vector == 6 && emulate_int_n(frame)) {
        /* delivered through its gate */
    } else if (vector < 32) {
        count(COUNT_EXCEPTIONS);
        deliver(frame, vector, has_error_code(vector), frame->error_code);
    } else if (guest.user || virtual_if) {
        deliver_interrupt(frame, vector);
    } else {
        count(COUNT_DEFERRED);
        hold(vector);
    }
    key0_found = 0; /* judged, or met on the way to another event: the guest goes on with key 0 allowed */
}

/* The way back to the guest (body_exit; again whenever ring 0 held an interrupt meanwhile): 1 if
 * to its user mode, which ring 0 enters on the user mode's shadow (monitor.S, leave_to_user). */
int monitor_leave(struct trap_frame *frame)
{
    leave_again = 0;
    if (owed_verw) {
        __asm__ volatile("verw %0" : : "m"(verw_selector) : "cc");
        owed_verw = 0;
    }
    deliver_held(frame);
    int to_user = guest.user;
    leave_swapping_gs(to_user);
    if (to_user) {
        fence_ports();
    } else {
        if (user_ports == PORTS_COPIED)
            user_ports = PORTS_STALE; /* its kernel runs: its bitmap may change */
        kernel_cs_view = frame->cs == (guest_view(frame->cs) | 3) ? guest_view(frame->cs) : ~0ul;
        kernel_ss_view = guest_view(frame->ss);
    }
    return to_user;
}
