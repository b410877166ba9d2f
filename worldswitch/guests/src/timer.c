/* timer: takes N timer interrupts (default 100) through its IDT while spinning in ring 3, from
 * the LAPIC timer (default) or the PIT through the 8259 PIC ("pit"), both at about 1 kHz. With
 * "held", ring 0 waits with interrupts off until the LAPIC timer's first tick is due. With
 * "deadline", the LAPIC timer is in TSC-deadline mode, re-armed by each tick; with "x2apic", the
 * LAPIC is in x2APIC mode (MSRs, not MMIO). With "halt", ring 0 waits for the ticks with STI; HLT
 * instead of spinning in ring 3. With "msrs", ring 0 writes and reads back an MSR (FS_BASE) in a
 * loop, interrupts on, until the ticks are in: under the monitor each access is a call into its
 * ring 0, which the ticks interrupt at every point.
 * Reports DONE(ticks, ticks that interrupted ring 3, 1 if PIT, MSR reads that differed). */
#include "ws.h"

#define TIMER_VECTOR 0x30
#define PIC_BASE 0x20
#define SPURIOUS_VECTOR 0xff
#define PIT_HZ 1193182
#define LAPIC_PERIODIC (1u << 17)

static volatile u64 ticks, user_ticks;
static u64 target;
static int use_pit, use_deadline, use_x2apic;

static void msr_write(u32 index, u64 value)
{
    __asm__ volatile("wrmsr" : : "c"(index), "a"((u32)value), "d"((u32)(value >> 32)) : "memory");
}

static u64 msr_read(u32 index)
{
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(index) : "memory");
    return (u64)hi << 32 | lo;
}

#define MSR_FS_BASE 0xc0000100u
#define MSR_APIC_BASE 0x1bu
#define MSR_TSC_DEADLINE 0x6e0u
#define X2APIC_ENABLE 0x400u
#define X2APIC_MSR(reg) (0x800u + ((reg) >> 4)) /* an xAPIC register's x2APIC MSR */
#define LAPIC_TSC_DEADLINE (2u << 17)

static void next_deadline(void)
{
    msr_write(MSR_TSC_DEADLINE, rdtsc() + 2100000); /* about 1 ms at this host's 2.1 GHz */
}

static void on_tick(struct trap_frame *frame)
{
    if (ticks < target) { /* one that lands between the loop's test and DONE is not counted */
        ticks++;
        if ((frame->cs & 3) == 3)
            user_ticks++;
    }
    if (use_pit)
        pic_eoi(0);
    else if (use_x2apic)
        msr_write(X2APIC_MSR(LAPIC_EOI), 0);
    else
        lapic_write(LAPIC_EOI, 0);
    if (use_deadline && ticks < target)
        next_deadline();
}

static void on_spurious(struct trap_frame *frame)
{
}

static int spin(u64 unused)
{
    while (ticks < target)
        cpu_relax();
    GUEST_DONE(ticks, user_ticks, use_pit, 0);
    return 0;
}

int main(const char *args)
{
    target = arg_number(0, 100);
    use_pit = arg_has("pit");
    use_deadline = arg_has("deadline");
    use_x2apic = arg_has("x2apic");
    if (use_x2apic) {
        msr_write(MSR_APIC_BASE, msr_read(MSR_APIC_BASE) | X2APIC_ENABLE);
        msr_write(X2APIC_MSR(LAPIC_SVR), 0x100 | SPURIOUS_VECTOR);
    }
    set_trap_handler(SPURIOUS_VECTOR, on_spurious);
    lapic_write(LAPIC_SVR, 0x100 | SPURIOUS_VECTOR); /* software-enable the LAPIC */
    if (use_pit) {
        set_trap_handler(PIC_BASE, on_tick);
        set_trap_handler(PIC_BASE + 7, on_spurious);
        pic_init(PIC_BASE);
        pic_unmask(0);
        u16 divisor = PIT_HZ / 1000;
        outb(0x43, 0x34); /* channel 0, lo/hi byte, mode 2 (rate generator) */
        outb(0x40, divisor & 0xff);
        outb(0x40, divisor >> 8);
    } else {
        set_trap_handler(TIMER_VECTOR, on_tick);
        lapic_write(LAPIC_TIMER_DIVIDE, 0x3); /* divide by 16: KVM's 1 GHz APIC bus gives 62.5 MHz */
        if (use_x2apic && use_deadline) {
            msr_write(X2APIC_MSR(LAPIC_LVT_TIMER), TIMER_VECTOR | LAPIC_TSC_DEADLINE);
            next_deadline();
        } else if (use_deadline) {
            lapic_write(LAPIC_LVT_TIMER, TIMER_VECTOR | LAPIC_TSC_DEADLINE);
            next_deadline();
        } else if (use_x2apic) {
            msr_write(X2APIC_MSR(LAPIC_TIMER_DIVIDE), 0x3);
            msr_write(X2APIC_MSR(LAPIC_LVT_TIMER), TIMER_VECTOR | LAPIC_PERIODIC);
            msr_write(X2APIC_MSR(LAPIC_TIMER_INITIAL), 62500);
        } else {
            lapic_write(LAPIC_LVT_TIMER, TIMER_VECTOR | LAPIC_PERIODIC);
            lapic_write(LAPIC_TIMER_INITIAL, 62500); /* 1 ms */
        }
        if (arg_has("held")) { /* interrupts stay off until a tick is due: it waits for the drop to ring 3 */
            u32 last = lapic_read(LAPIC_TIMER_CURRENT);
            for (u32 now; (now = lapic_read(LAPIC_TIMER_CURRENT)) <= last; last = now)
                ;
        }
    }
    if (arg_has("halt")) {
        while (ticks < target)
            __asm__ volatile("sti; hlt; cli" ::: "memory");
        GUEST_DONE(ticks, user_ticks, use_pit, 0);
    }
    if (arg_has("msrs")) {
        u64 differed = 0;
        sti();
        for (u64 i = 1; ticks < target; i++) {
            msr_write(MSR_FS_BASE, i << 12);
            differed += msr_read(MSR_FS_BASE) != i << 12;
        }
        cli();
        GUEST_DONE(ticks, user_ticks, use_pit, differed);
    }
    enter_user(spin, 0, USER_INTERRUPTS);
}
