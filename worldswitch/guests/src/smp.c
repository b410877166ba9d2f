/* smp: starts every application processor with INIT-SIPI-SIPI through the local APIC, as firmware
 * and Linux do, and counts the ones that arrive in long mode (ap_trampoline.S). Each AP reports
 * a SYNC ucall with its APIC ID from its own vCPU. Reports DONE(CPUs running, mask of APIC IDs).
 * Arguments: [seconds to wait, default 30]. */
#include "ws.h"

extern volatile u32 ap_arrived;
extern volatile u64 ap_mask;

static u64 tsc_per_second;

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
    start_aps(0);
    enter_user(wait_for_aps, arg_number(0, 30), 0);
}
