/* gates: what an exception or interrupt costs on its way from ring 3 to a handler, in ring 3 itself
 * (a gate to the user code segment: the path an in-guest monitor's IDT takes, docs/monitor.md)
 * or, with `kernel`, in ring 0. From ring 3, N times (default 1000):
 *   int3 [kernel]   a breakpoint through a DPL 3 gate;
 *   gp [kernel]     `hlt`, which faults with #GP outside ring 0 whatever IOPL is; the handler steps
 *                   over it;
 *   timer [kernel]  LAPIC timer interrupts, about one a millisecond, while spinning in ring 3.
 * Reports SYNC(1, N) when the rounds begin, then DONE(rounds handled, TSC cycles per round, the
 * ring the handler ran in, 0). For `timer` the cycles are those the spinning loop lost to each
 * interrupt: the gaps it saw in the TSC. */
#include "ws.h"

#define TIMER_VECTOR 0x30
#define SPURIOUS_VECTOR 0xff
#define LAPIC_PERIODIC (1u << 17)
#define HLT_LENGTH 1
#define GAP_CYCLES 1500 /* a loop round takes tens of cycles: a longer pause is an interrupt */

static volatile u64 handled, handler_ring;
static volatile u64 ticks_wanted = ~0ul; /* ticks beyond it are not counted (ticks) */

static u64 current_ring(void)
{
    u64 cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    return cs & 3;
}

static void on_trap(struct trap_frame *frame)
{
    handled++;
    handler_ring = current_ring();
    if (frame->vector == 13)
        frame->rip += HLT_LENGTH;
}

static void on_tick(struct trap_frame *frame)
{
    if (handled < ticks_wanted)
        handled++;
    handler_ring = current_ring();
    lapic_write(LAPIC_EOI, 0);
}

static void on_spurious(struct trap_frame *frame)
{
}

static int use_int3; /* else `hlt` */

static int traps(u64 n)
{
    GUEST_SYNC(1, n);
    u64 t0 = rdtsc();
    for (u64 i = 0; i < n; i++) {
        if (use_int3)
            __asm__ volatile("int3" ::: "memory");
        else
            __asm__ volatile("hlt" ::: "memory");
    }
    u64 t1 = rdtsc();
    GUEST_DONE(handled, (t1 - t0) / n, handler_ring, 0);
    return 0;
}

static int ticks(u64 n)
{
    GUEST_SYNC(1, n);
    /* Count from here (a tick may have come before the SYNC), and only n: the next tick can come
     * between the loop's last look and the report, which on a slow emulated CPU it did. */
    ticks_wanted = n;
    handled = 0;
    u64 lost = 0, last = rdtsc();
    while (handled < n) {
        u64 now = rdtsc();
        if (now - last > GAP_CYCLES)
            lost += now - last;
        last = now;
    }
    GUEST_DONE(handled, lost / n, handler_ring, 0);
    return 0;
}

int main(const char *args)
{
    u64 n = arg_number(0, 1000);
    if (n == 0)
        n = 1;
    u16 code_segment = arg_has("kernel") ? KERNEL_CS : USER_CS;
    use_int3 = arg_has("int3");
    if (use_int3 || arg_has("gp")) {
        set_trap_handler_in(use_int3 ? 3 : 13, on_trap, code_segment);
        enter_user(traps, n, 0);
    }
    GUEST_ASSERT(arg_has("timer"));
    set_trap_handler(SPURIOUS_VECTOR, on_spurious);
    set_trap_handler_in(TIMER_VECTOR, on_tick, code_segment);
    lapic_write(LAPIC_SVR, 0x100 | SPURIOUS_VECTOR); /* software-enable the LAPIC */
    lapic_write(LAPIC_TIMER_DIVIDE, 0x3); /* divide by 16: KVM's 1 GHz APIC bus gives 62.5 MHz */
    lapic_write(LAPIC_LVT_TIMER, TIMER_VECTOR | LAPIC_PERIODIC);
    lapic_write(LAPIC_TIMER_INITIAL, 62500); /* 1 ms */
    enter_user(ticks, n, USER_INTERRUPTS);
}
