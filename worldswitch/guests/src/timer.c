/* timer: takes N timer interrupts (default 100) through its IDT while spinning in ring 3, from
 * the LAPIC timer (default) or the PIT through the 8259 PIC ("pit"), both at about 1 kHz. With
 * "held", ring 0 waits with interrupts off until the LAPIC timer's first tick is due.
 * Reports DONE(ticks, ticks that interrupted ring 3, 1 if PIT). */
#include "ws.h"

#define TIMER_VECTOR 0x30
#define PIC_BASE 0x20
#define SPURIOUS_VECTOR 0xff
#define PIT_HZ 1193182
#define LAPIC_PERIODIC (1u << 17)

static volatile u64 ticks, user_ticks;
static u64 target;
static int use_pit;

static void on_tick(struct trap_frame *frame)
{
    if (ticks < target) { /* one that lands between the loop's test and DONE is not counted */
        ticks++;
        if ((frame->cs & 3) == 3)
            user_ticks++;
    }
    if (use_pit)
        pic_eoi(0);
    else
        lapic_write(LAPIC_EOI, 0);
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
        lapic_write(LAPIC_LVT_TIMER, TIMER_VECTOR | LAPIC_PERIODIC);
        lapic_write(LAPIC_TIMER_INITIAL, 62500); /* 1 ms */
        if (arg_has("held")) { /* interrupts stay off until a tick is due: it waits for the drop to ring 3 */
            u32 last = lapic_read(LAPIC_TIMER_CURRENT);
            for (u32 now; (now = lapic_read(LAPIC_TIMER_CURRENT)) <= last; last = now)
                ;
        }
    }
    enter_user(spin, 0, 1);
}
