/* aps.c: starting the application processors, shared by the guests that use more than one vCPU.
 * The BSP copies ap_trampoline.S to AP_BASE and sends INIT-SIPI-SIPI through its local APIC, as
 * firmware and Linux do; each AP climbs to long mode on the BSP's page tables (see there). */
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
extern void (*volatile ap_entry)(u64 cpu);

static void send_ipi(u32 command)
{
    lapic_write(LAPIC_ICR_HIGH, 0);
    lapic_write(LAPIC_ICR_LOW, command);
    while (lapic_read(LAPIC_ICR_LOW) & ICR_BUSY)
        cpu_relax();
}

void start_aps(void (*entry)(u64 cpu))
{
    u64 cr3;
    __asm__ volatile("mov %%cr3, %0" : "=r"(cr3));
    ap_entry = entry;
    memcpy((void *)AP_BASE, ap_trampoline_start, (size_t)(ap_trampoline_end - ap_trampoline_start));
    *(volatile u32 *)(AP_BASE + (u64)ap_cr3_offset) = (u32)cr3;
    lapic_write(LAPIC_SVR, 0x1ff);
    if (ws_vcpus > 1) {
        send_ipi(ICR_ALL_BUT_SELF | ICR_INIT | ICR_LEVEL_ASSERT);
        send_ipi(ICR_ALL_BUT_SELF | ICR_STARTUP | SIPI_VECTOR);
        send_ipi(ICR_ALL_BUT_SELF | ICR_STARTUP | SIPI_VECTOR); /* the MP spec sends it twice */
    }
}
