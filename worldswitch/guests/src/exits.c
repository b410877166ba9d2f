/* exits: N port-I/O exits, then N MMIO exits, from ring 3, to the sequence test device
 * (devices/testdev.py). Each write carries the next number of a sequence, so the VMX can tell a
 * lost or repeated exit. Arguments: [N] [io|mmio|both] [report]; reports DONE(N, io cycles,
 * mmio cycles). With "report" it prints "exits: n=N io_cycles=X mmio_cycles=Y" on COM1 instead
 * and leaves through the debug-exit port: the form bench/ uses, which works under any VMM that
 * has a 16550 and an isa-debug-exit at 0xf4 (QEMU), without worldswitch's test devices. */
#include "ws.h"

static int do_io, do_mmio, report;

static int exits(u64 n)
{
    u64 t0 = rdtsc();
    if (do_io)
        for (u32 i = 1; i <= n; i++)
            outl(TESTDEV_PORT, i);
    u64 t1 = rdtsc();
    if (do_mmio)
        for (u32 i = 1; i <= n; i++)
            mmio_write32(TESTDEV_MMIO, i);
    u64 t2 = rdtsc();
    if (report) {
        ws_printf("exits: n=%lu io_cycles=%lu mmio_cycles=%lu\n", n, do_io ? t1 - t0 : 0, do_mmio ? t2 - t1 : 0);
        ws_exit(0);
    }
    if (do_io)
        GUEST_ASSERT_EQ(inl(TESTDEV_PORT), n);
    if (do_mmio)
        GUEST_ASSERT_EQ(mmio_read32(TESTDEV_MMIO), n);
    GUEST_DONE(n, t1 - t0, t2 - t1, 0);
    return 0;
}

int main(const char *args)
{
    do_io = !arg_has("mmio");
    do_mmio = !arg_has("io");
    report = arg_has("report");
    enter_user(exits, arg_number(0, 1000), 0);
}
