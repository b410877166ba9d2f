/* smp: starts every application processor with INIT-SIPI-SIPI through the local APIC, as firmware
 * and Linux do, and counts the ones that arrive in long mode (ap_trampoline.S). Each AP reports
 * a SYNC ucall with its APIC ID from its own vCPU. Reports DONE(CPUs running, mask of APIC IDs).
 * Arguments: [seconds to wait, default 30]. */
#include "ws.h"

#define AP_BASE 0x8000
#define SIPI_VECTOR (AP_BASE >> 12)
#define LAPIC_ICR_LOW 0x300
#define LAPIC_ICR_HIGH 0x310
#define ICR_ALL_BUT_SELF (3u << 18)
#define ICR_INIT (5u << 8)
#define ICR_STARTUP (6u << 8)
#define ICR_LEVEL_ASSERT (1u << 14)
#define ICR_BUSY (1u << 12)

extern const char ap_trampoline_start[], ap_trampoline_end[];
extern const char ap_cr3_offset[];
extern volatile u32 ap_arrived;
extern volatile u64 ap_mask;

static u64 tsc_per_second;

static void send_ipi(u32 command)
{
    lapic_write(LAPIC_ICR_HIGH, 0);
    lapic_write(LAPIC_ICR_LOW, command);
    while (lapic_read(LAPIC_ICR_LOW) & ICR_BUSY)
        cpu_relax();
}

static int wait_for_aps(u64 seconds)
{
    u64 expected = ws_vcpus - 1;
    u64 deadline = rdtsc() + seconds * tsc_per_second;
    while (ap_arrived < expected && rdtsc() < deadline)
        cpu_relax();
    GUEST_DONE(ap_arrived + 1, ap_mask | 1, ws_vcpus, 0);
    return 0;
}

int main(const char *args)
{
    tsc_per_second = 2000000000UL; /* a bound for the wait, not a measurement */
    u64 cr3;
    __asm__ volatile("mov %%cr3, %0" : "=r"(cr3));
    memcpy((void *)AP_BASE, ap_trampoline_start, (size_t)(ap_trampoline_end - ap_trampoline_start));
    *(volatile u32 *)(AP_BASE + (u64)ap_cr3_offset) = (u32)cr3;
    lapic_write(LAPIC_SVR, 0x1ff);
    if (ws_vcpus > 1) {
        send_ipi(ICR_ALL_BUT_SELF | ICR_INIT | ICR_LEVEL_ASSERT);
        send_ipi(ICR_ALL_BUT_SELF | ICR_STARTUP | SIPI_VECTOR);
        send_ipi(ICR_ALL_BUT_SELF | ICR_STARTUP | SIPI_VECTOR); /* the MP spec sends it twice */
    }
    enter_user(wait_for_aps, arg_number(0, 30), 0);
}
