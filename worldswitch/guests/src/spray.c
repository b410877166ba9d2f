/* spray: a hostile guest for the VMX's buses. From ring 3 it reads and writes every size (1, 2, 4
 * and 8 bytes, unaligned too, so that KVM also hands the VMX 3-, 5-, 6- and 7-byte pieces where an
 * access crosses a page) at every offset of every device region the VMX emulates:
 *   - the BARs of every function on PCI bus 0, found through ECAM before anything is written;
 *   - the ECAM pages of bus 0's 32 devices (their first and last 256 bytes) and beyond bus 0;
 *   - the test device's MMIO window and an address nobody owns;
 *   - every I/O port (reads), and writes to every port but the ones whose purpose is to end the VM
 *     (debug exit, ucall, i8042 command, reset control, ACPI PM1 control).
 * Writes alternate all ones and all zeros: enough to set every register to its extremes without
 * pointing a device's DMA into this program's own memory. Interrupts stay off, so whatever the
 * devices raise stays pending. DONE(accesses made, regions, 0, 0) if the VMX is still there.
 *   [STRIDE]   step between offsets (default 1: every offset)
 */
#include "ws.h"

#define ECAM_BASE 0xe0000000UL
#define ECAM_SIZE (1UL << 20)
#define TESTDEV_MMIO_SIZE 0x1000
#define MAX_REGIONS 64

struct region {
    u64 base, size;
};

static struct region regions[MAX_REGIONS];
static u32 region_count;
static u64 accesses, stride = 1;

static void add_region(u64 base, u64 size)
{
    GUEST_ASSERT(region_count < MAX_REGIONS);
    regions[region_count].base = base;
    regions[region_count].size = size;
    region_count++;
}

static u64 access(u64 address, u32 size, int write, u64 value)
{
    accesses++;
    switch (size) {
    case 1:
        if (write)
            *(volatile u8 *)address = (u8)value;
        else
            return *(volatile u8 *)address;
        break;
    case 2:
        if (write)
            *(volatile u16 *)address = (u16)value;
        else
            return *(volatile u16 *)address;
        break;
    case 4:
        if (write)
            *(volatile u32 *)address = (u32)value;
        else
            return *(volatile u32 *)address;
        break;
    default:
        if (write)
            *(volatile u64 *)address = value;
        else
            return *(volatile u64 *)address;
    }
    return 0;
}

static void spray_mmio(u64 base, u64 size)
{
    static const u32 sizes[] = { 1, 2, 4, 8 };
    for (u64 offset = 0; offset < size; offset += stride)
        for (u32 i = 0; i < ARRAY_SIZE(sizes); i++) {
            access(base + offset, sizes[i], 0, 0);
            access(base + offset, sizes[i], 1, (offset & 1) ? ~0ul : 0);
        }
}

/* The BARs of function (bus 0, device, 0), read through ECAM: (base, size) of each memory BAR
 * that is decoded. Sizing writes all ones and restores: the only writes before the spray. */
static void find_bars(u32 device)
{
    volatile u32 *config = (volatile u32 *)(ECAM_BASE + ((u64)device << 15));
    if ((config[0] & 0xffff) == 0xffff)
        return;
    for (u32 bar = 0; bar < 6; bar++) {
        u32 low = config[4 + bar];
        if (low & 1)
            continue; /* I/O BARs: the port spray covers them */
        int wide = (low & 6) == 4;
        u64 address = low & ~0xful;
        if (wide)
            address |= (u64)config[4 + bar + 1] << 32;
        config[4 + bar] = 0xffffffffu;
        u32 mask = config[4 + bar] & ~0xfu;
        config[4 + bar] = low;
        if (address && mask)
            add_region(address, (u64)(~mask + 1));
        bar += wide;
    }
}

static int ends_the_vm(u32 port, u32 size)
{
    static const struct {
        u32 first, last;
    } enders[] = {
        { DEBUG_EXIT_PORT, DEBUG_EXIT_PORT + 3 }, { UCALL_PORT, UCALL_PORT + 3 }, { 0x64, 0x64 },
        { 0xcf9, 0xcf9 }, { 0x604, 0x605 },
    };
    for (u32 i = 0; i < ARRAY_SIZE(enders); i++)
        if (port <= enders[i].last && port + size > enders[i].first)
            return 1;
    return 0;
}

static void spray_ports(void)
{
    /* An access past port 0xffff would be refused by the CPU itself where the TSS bitmap decides
     * (PVM), whose last byte is all ones: not the VMX's business. */
    for (u32 port = 0; port < 0x10000; port += stride) {
        u32 value = (port & 1) ? ~0u : 0;
        u16 word;
        inb(port);
        accesses++;
        if (!ends_the_vm(port, 1))
            outb(port, (u8)value), accesses++;
        if (port + 2 <= 0x10000) {
            __asm__ volatile("inw %w1, %w0" : "=a"(word) : "Nd"((u16)port));
            accesses++;
            if (!ends_the_vm(port, 2))
                outw(port, (u16)value), accesses++;
        }
        if (port + 4 <= 0x10000) {
            inl(port);
            accesses++;
            if (!ends_the_vm(port, 4))
                outl(port, value), accesses++;
        }
    }
}

static int spray(u64 unused)
{
    for (u32 device = 0; device < 32; device++)
        find_bars(device);
    u32 bars = region_count;
    for (u32 i = 0; i < bars; i++)
        spray_mmio(regions[i].base, regions[i].size);
    for (u32 device = 0; device < 32; device++) {
        u64 page = ECAM_BASE + ((u64)device << 15);
        spray_mmio(page, 0x100);
        spray_mmio(page + 0xf00, 0x100);
    }
    spray_mmio(ECAM_BASE + ECAM_SIZE - 0x100, 0x200); /* the end of bus 0 and what lies past it */
    spray_mmio(TESTDEV_MMIO, TESTDEV_MMIO_SIZE);
    spray_mmio(UNMAPPED_MMIO, 0x100);
    spray_ports();
    GUEST_DONE(accesses, region_count + 36, 0, 0);
    return 0;
}

int main(const char *args)
{
    stride = arg_number(0, 1);
    if (stride == 0)
        stride = 1;
    enter_user(spray, 0, 0);
}
