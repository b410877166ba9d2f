/* probe: a counted loop (dec/jnz) in ring 0 or ring 3, bracketed by two ucalls so that the VMX
 * can time it; `worldswitch info` uses it to measure whether guest code runs natively or is
 * emulated. Arguments: ring0|ring3 [iterations]. */
#include "ws.h"

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
    u64 n = arg_number(0, 100000);
    if (n == 0)
        n = 1;
    if (arg_has("ring0"))
        return probe(n);
    enter_user(probe, n, 0);
}
