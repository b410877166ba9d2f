/* probe: what this host's KVM does with guest code; `worldswitch info` runs it.
 *   ring0|ring3 [N]  a counted loop (dec/jnz) in that ring, bracketed by two ucalls so that the
 *                    VMX can time it: native or emulated?
 *   syscall          a SYSCALL from ring 3 with STAR/LSTAR set as Linux sets them: does it enter
 *                    ring 0 at LSTAR, as on hardware? DONE(ring the handler ran in, its CS).
 *                    Every Linux user process depends on it. */
#include "ws.h"

#define MSR_EFER 0xc0000080
#define MSR_STAR 0xc0000081
#define MSR_LSTAR 0xc0000082
#define MSR_SFMASK 0xc0000084
#define EFER_SCE 1

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

void syscall_landed(u64 cs)
{
    GUEST_DONE(cs & 3, cs, 0, 0);
}

/* LSTAR: whatever ring this runs in, note CS and report (ucalls work from both rings). */
__asm__(".text\n"
        "syscall_entry:\n"
        "    mov %cs, %rdi\n"
        "    and $-16, %rsp\n"
        "    call syscall_landed\n"
        "1:  jmp 1b\n");
extern const char syscall_entry[];

static int do_syscall(u64 unused)
{
    __asm__ volatile("syscall" : : : "rcx", "r11", "memory");
    GUEST_ASSERT(!"SYSCALL returned without entering the handler");
    return 1;
}

static void loop(u64 n)
{
    __asm__ volatile("1: dec %0; jnz 1b" : "+r"(n) : : "cc");
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
    if (arg_has("syscall")) {
        /* Linux's layout: kernel CS at STAR[47:32]; SYSRET's base at STAR[63:48] gives user CS
         * base + 16 = 0x33, the only user CS some hosts accept in STAR. */
        wrmsr(MSR_STAR, (u64)0x23 << 48 | (u64)KERNEL_CS << 32);
        wrmsr(MSR_LSTAR, (u64)syscall_entry);
        wrmsr(MSR_SFMASK, 0x200); /* IF */
        wrmsr(MSR_EFER, rdmsr(MSR_EFER) | EFER_SCE);
        enter_user(do_syscall, 0, 0);
    }
    u64 n = arg_number(0, 100000);
    if (n == 0)
        n = 1;
    if (arg_has("ring0"))
        return probe(n);
    enter_user(probe, n, 0);
}
