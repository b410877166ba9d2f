/* count: every vCPU counts to its target, the BSP from ring 3 and each AP from ring 0 (emulated on
 * PVM hosts, so about a hundred thousand steps a second there). At every step a vCPU checks that
 * the count in memory is the one it holds in a register: a snapshot restored with a wrong register
 * or a wrong page shows up as an error, a lost one as a fault. The snapshot tests' witness.
 * Reports SYNC(address of the per-vCPU slots, BSP target, AP target) at start, then
 * DONE(sum of all counts, errors, vCPUs, BSP target).
 * Arguments: [BSP target, default 1000000000] [AP target, default 100000]. */
#include "ws.h"

#define MAX_CPUS 64

struct slot {
    volatile u64 count;
    volatile u64 errors;
    volatile u64 done;
    u64 pad[5]; /* a cache line each: the vCPUs do not slow each other down */
} __attribute__((aligned(64)));

static struct slot slots[MAX_CPUS];
static u64 ap_target;

static void count_to(struct slot *slot, u64 target)
{
    u64 mine = slot->count;
    while (mine < target) {
        if (slot->count != mine) {
            slot->errors++;
            mine = slot->count;
        }
        mine++;
        slot->count = mine;
    }
    slot->done = 1;
}

static void ap_main(u64 cpu)
{
    if (cpu < MAX_CPUS)
        count_to(&slots[cpu], ap_target);
}

static int bsp_main(u64 target)
{
    count_to(&slots[0], target);
    u64 cpus = ws_vcpus < MAX_CPUS ? ws_vcpus : MAX_CPUS;
    u64 sum = 0, errors = 0;
    for (u64 cpu = 0; cpu < cpus; cpu++) {
        while (!slots[cpu].done)
            cpu_relax();
        sum += slots[cpu].count;
        errors += slots[cpu].errors;
    }
    GUEST_DONE(sum, errors, ws_vcpus, target);
    return 0;
}

int main(const char *args)
{
    u64 target = arg_number(0, 1000000000UL);
    ap_target = arg_number(1, 100000);
    GUEST_SYNC((u64)slots, target);
    start_aps(ap_main);
    enter_user(bsp_main, target, 0);
}
