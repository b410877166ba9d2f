/* probe: what this host's KVM does with guest code; `worldswitch info` runs it.
 *   ring0|ring3 [N]  a counted loop (dec/jnz) in that ring, bracketed by two ucalls so that the
 *                    VMX can time it: native or emulated?
 *   syscall          a SYSCALL from ring 3 with STAR/LSTAR set as Linux sets them: does it enter
 *                    ring 0 at LSTAR, as on hardware? DONE(ring the handler ran in, its CS,
 *                    RCX == the return address, R11 = the caller's RFLAGS). Every Linux user
 *                    process depends on it.
 *   syscall kernel   the same with LSTAR in a supervisor-only page, as Linux has it: where the
 *                    host leaves the SYSCALL in ring 3, the fetch there faults, and the VMX's
 *                    SYSCALL completion (vmm/x86/user_syscall.py) is what can bring it to ring 0.
 *   syscall kernel sysret   ... and the handler returns with SYSRETQ, as a kernel does (STAR's
 *                    base then names this runtime's user segments): DONE(ring the handler ran
 *                    in, its CS, RCX == the return address, the CS back in user mode).
 *                    With `wait`, ring 3 first sends SYNC(address of a flag) and spins until the
 *                    host sets the flag: time for a snapshot between WRMSR and SYSCALL.
 *   badlstar         write a non-canonical LSTAR: the CPU answers with #GP, and so must the VMM.
 *   deadline [N]     ring 0 writes the TSC deadline N times (0: the timer stays disarmed), bracketed
 *                    as the loop is: the WRMSR a kernel makes at each timer interrupt. */
#include "ws.h"

#define MSR_EFER 0xc0000080
#define MSR_STAR 0xc0000081
#define MSR_LSTAR 0xc0000082
#define MSR_SFMASK 0xc0000084
#define EFER_SCE 1
#define MSR_TSC_DEADLINE 0x6e0

static inline u64 rdmsr(u32 index)
{
    u32 low, high;
    __asm__ volatile("rdmsr" : "=a"(low), "=d"(high) : "c"(index));
    return (u64)high << 32 | low;
}

static inline void wrmsr(u32 index, u64 value)
{
    __asm__ volatile("wrmsr" : : "c"(index), "a"((u32)value), "d"((u32)(value >> 32)));
}

extern const char syscall_entry[], syscall_return[], sysret_entry[];
u64 handler_cs, handler_rcx;
volatile u64 go;

void syscall_landed(u64 cs, u64 rcx, u64 r11)
{
    GUEST_DONE(cs & 3, cs, rcx == (u64)syscall_return, r11);
}

/* LSTAR: whatever ring this runs in, note CS, RCX (the return address) and R11 (RFLAGS), and
 * report (ucalls work from both rings). */
__asm__(".text\n"
        "syscall_entry:\n"
        "    mov %cs, %rdi\n"
        "    mov %rcx, %rsi\n"
        "    mov %r11, %rdx\n"
        "    and $-16, %rsp\n"
        "    call syscall_landed\n"
        "1:  jmp 1b\n");

/* LSTAR for `sysret`: note CS and RCX, and go back to ring 3 as a kernel does. */
__asm__(".text\n"
        "sysret_entry:\n"
        "    mov %cs, %rax\n"
        "    mov %rax, handler_cs(%rip)\n"
        "    mov %rcx, handler_rcx(%rip)\n"
        "    sysretq\n");

#define SUPERVISOR_PAGE 0x06000000ul /* a 2 MiB page of the identity map nothing else uses */

/* Make the 2 MiB page at SUPERVISOR_PAGE supervisor-only and put a jump to `handler` there
 * (through RAX: RCX and R11 must reach the handler as SYSCALL left them). */
static u64 supervisor_lstar(u64 handler)
{
    supervisor_only(SUPERVISOR_PAGE);
    volatile u8 *stub = (u8 *)SUPERVISOR_PAGE;
    stub[0] = 0x48; /* movabs $syscall_entry, %rax */
    stub[1] = 0xb8;
    for (int i = 0; i < 8; i++)
        stub[2 + i] = (u8)(handler >> (8 * i));
    stub[10] = 0xff; /* jmp *%rax */
    stub[11] = 0xe0;
    return SUPERVISOR_PAGE;
}

static int do_syscall(u64 sysret)
{
    if (arg_has("wait")) {
        GUEST_SYNC((u64)&go, 0);
        while (!go)
            cpu_relax();
    }
    __asm__ volatile("syscall\n"
                     ".globl syscall_return\n"
                     "syscall_return:" : : : "rcx", "r11", "memory");
    GUEST_ASSERT(sysret); /* without `sysret` the handler reports and never returns */
    u64 cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    GUEST_DONE(handler_cs & 3, handler_cs, handler_rcx == (u64)syscall_return, cs);
    return 0;
}

static void loop(u64 n)
{
    __asm__ volatile("1: dec %0; jnz 1b" : "+r"(n) : : "cc");
}

static void deadlines(u64 n)
{
    GUEST_SYNC(0, n);
    for (u64 i = 0; i < n; i++)
        wrmsr(MSR_TSC_DEADLINE, 0);
    GUEST_DONE(n, 0, 0, 0);
}

static int probe(u64 n)
{
    GUEST_SYNC(0, n);
    loop(n);
    GUEST_DONE(n, 0, 0, 0);
    return 0;
}

int main(const char *args)
{
    if (arg_has("badlstar"))
        wrmsr(MSR_LSTAR, 0x8000000000000000ul); /* the runtime reports the #GP */
    if (arg_has("syscall")) {
        /* Linux's layout: kernel CS at STAR[47:32]; SYSRET's base at STAR[63:48] gives user CS
         * base + 16 = 0x33, the only user CS some hosts accept in STAR. For `sysret` the base is
         * this runtime's: user SS 0x18 = base + 8, user CS 0x20 = base + 16. */
        u64 sysret = arg_has("sysret");
        wrmsr(MSR_STAR, (sysret ? (u64)0x10 : (u64)0x23) << 48 | (u64)KERNEL_CS << 32);
        u64 handler = (u64)(sysret ? sysret_entry : syscall_entry);
        wrmsr(MSR_LSTAR, arg_has("kernel") ? supervisor_lstar(handler) : handler);
        wrmsr(MSR_SFMASK, 0x200); /* IF */
        wrmsr(MSR_EFER, rdmsr(MSR_EFER) | EFER_SCE);
        enter_user(do_syscall, sysret, 0);
    }
    u64 n = arg_number(0, 100000);
    if (n == 0)
        n = 1;
    if (arg_has("ring0"))
        return probe(n);
    if (arg_has("deadline")) {
        deadlines(n);
        return 0;
    }
    enter_user(probe, n, 0);
}
