/* vblk: a virtio-blk driver in ring 3. It finds the first virtio-blk device on PCI bus 0 through
 * ports 0xcf8/0xcfc, walks its virtio capabilities, negotiates VERSION_1, sets up queue 0 in its
 * own memory, and polls the used ring (VIRTQ_AVAIL_F_NO_INTERRUPT: no interrupts needed). Kicks
 * are MMIO writes to the notify address, which KVM hands to the device's ioeventfd.
 *
 *   test           write a pattern to sectors 8..15, read it back, read sector 0 (which the host
 *                  filled with "worldswitch disk 0 sector 0"), flush, get the serial;
 *                  DONE(checks passed, capacity in sectors, serial's first 8 bytes)
 *   seq N [QD]     N sequential 4 KiB reads, QD requests in flight; DONE(N, TSC cycles, QD)
 *   rand N [QD]    the same at random 4 KiB-aligned offsets
 * With the word "second" it drives the second virtio-blk device on the bus instead of the first;
 * with "packed" it negotiates VIRTIO_F_RING_PACKED and uses a packed ring (virtio 1.2, 2.8)
 * instead of the split one: the same requests, the descriptors' AVAIL/USED flags instead of rings.
 */
#include "ws.h"

#define VENDOR_VIRTIO 0x1af4
#define DEVICE_VIRTIO_BLK 0x1042
#define QUEUE_SIZE 128
#define MAX_QD 32
#define BLOCK 4096

enum { CAP_COMMON = 1, CAP_NOTIFY = 2, CAP_ISR = 3, CAP_DEVICE = 4 };
enum { S_ACK = 1, S_DRIVER = 2, S_DRIVER_OK = 4, S_FEATURES_OK = 8 };
enum { T_IN = 0, T_OUT = 1, T_FLUSH = 4, T_GET_ID = 8 };

struct desc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};
struct pdesc {
    u64 addr;
    u32 len;
    u16 id;
    volatile u16 flags;
};
enum { P_NEXT = 1, P_WRITE = 2, P_AVAIL = 1 << 7, P_USED = 1 << 15 };
struct request {
    u32 type, reserved;
    u64 sector;
};

static struct desc descs[QUEUE_SIZE] __attribute__((aligned(16)));
static struct {
    u16 flags, idx, ring[QUEUE_SIZE], used_event;
} avail __attribute__((aligned(2)));
static struct {
    u16 flags;
    volatile u16 idx;
    struct {
        u32 id, len;
    } ring[QUEUE_SIZE];
    u16 avail_event;
} used __attribute__((aligned(4)));
static struct pdesc pdescs[QUEUE_SIZE] __attribute__((aligned(16)));
static struct {
    u16 desc, flags;
} driver_event __attribute__((aligned(4))), device_event __attribute__((aligned(4)));
static int packed;
static u16 next_avail, next_used, slots_of[MAX_QD];
static u8 avail_wrap = 1, used_wrap = 1;
static struct request headers[MAX_QD];
static volatile u8 statuses[MAX_QD];
static u8 buffers[MAX_QD][BLOCK] __attribute__((aligned(4096)));

static u64 common, notify, device_cfg;
static u32 notify_multiplier;
static u16 last_used;

static u32 pci_read(u32 slot, u32 offset)
{
    outl(0xcf8, 0x80000000u | (slot << 11) | (offset & 0xfc));
    return inl(0xcfc);
}

static int find_device(u32 skip)
{
    for (u32 slot = 0; slot < 32; slot++) {
        u32 id = pci_read(slot, 0);
        if ((id & 0xffff) != VENDOR_VIRTIO || id >> 16 != DEVICE_VIRTIO_BLK)
            continue;
        if (skip) {
            skip--;
            continue;
        }
        u64 bars[6];
        for (int i = 0; i < 6; i++)
            bars[i] = pci_read(slot, 0x10 + 4 * i) & ~0xfu;
        for (u32 cap = pci_read(slot, 0x34) & 0xff; cap; cap = (pci_read(slot, cap) >> 8) & 0xff) {
            u32 head = pci_read(slot, cap);
            if ((head & 0xff) != 0x09)
                continue;
            u32 type = (head >> 24) & 0xff, bar = pci_read(slot, cap + 4) & 0xff;
            u64 at = bars[bar] + pci_read(slot, cap + 8);
            if (type == CAP_COMMON)
                common = at;
            else if (type == CAP_NOTIFY) {
                notify = at;
                notify_multiplier = pci_read(slot, cap + 16);
            } else if (type == CAP_DEVICE)
                device_cfg = at;
        }
        return common && notify && device_cfg;
    }
    return 0;
}

static void w8(u64 off, u8 v) { *(volatile u8 *)(common + off) = v; }
static void w16(u64 off, u16 v) { *(volatile u16 *)(common + off) = v; }
static void w32(u64 off, u32 v) { *(volatile u32 *)(common + off) = v; }
static u8 r8(u64 off) { return *(volatile u8 *)(common + off); }
static u16 r16(u64 off) { return *(volatile u16 *)(common + off); }
static u32 r32(u64 off) { return *(volatile u32 *)(common + off); }
static void w64(u64 off, u64 v)
{
    w32(off, (u32)v);
    w32(off + 4, (u32)(v >> 32));
}

static void setup(void)
{
    GUEST_ASSERT(find_device(arg_has("second") ? 1 : 0));
    w8(0x14, 0); /* reset */
    w8(0x14, S_ACK);
    w8(0x14, S_ACK | S_DRIVER);
    packed = arg_has("packed");
    w32(0x00, 1); /* device_feature_select 1 */
    GUEST_ASSERT(!packed || (r32(0x04) & 4)); /* VIRTIO_F_RING_PACKED offered */
    w32(0x08, 1); /* driver_feature_select 1: bits 32-63 */
    w32(0x0c, packed ? 1 | 4 : 1); /* VIRTIO_F_VERSION_1 (and RING_PACKED), nothing else */
    w32(0x08, 0);
    w32(0x0c, 0);
    w8(0x14, S_ACK | S_DRIVER | S_FEATURES_OK);
    GUEST_ASSERT(r8(0x14) & S_FEATURES_OK);
    w16(0x16, 0); /* queue_select */
    GUEST_ASSERT(r16(0x18) >= QUEUE_SIZE);
    w16(0x18, QUEUE_SIZE);
    if (packed) {
        w64(0x20, (u64)pdescs);
        w64(0x28, (u64)&driver_event);
        w64(0x30, (u64)&device_event);
        driver_event.flags = 1; /* RING_EVENT_FLAGS_DISABLE: this driver polls */
    } else {
        w64(0x20, (u64)descs);
        w64(0x28, (u64)&avail);
        w64(0x30, (u64)&used);
        avail.flags = 1; /* VIRTQ_AVAIL_F_NO_INTERRUPT: this driver polls */
    }
    w16(0x1c, 1); /* queue_enable */
    w8(0x14, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
}

/* The next packed descriptor; the head's flags are kept back until its chain is complete. */
static void packed_put(u64 addr, u32 len, u16 flags, u16 id, u16 *head_flags)
{
    struct pdesc *d = &pdescs[next_avail];
    flags |= avail_wrap ? P_AVAIL : P_USED;
    d->addr = addr;
    d->len = len;
    d->id = id;
    if (head_flags)
        *head_flags = flags;
    else
        d->flags = flags;
    if (++next_avail == QUEUE_SIZE) {
        next_avail = 0;
        avail_wrap ^= 1;
    }
}

static void submit_packed(int slot, u32 type, u32 length)
{
    u16 head = next_avail, head_flags = 0, n = 2;
    packed_put((u64)&headers[slot], sizeof(struct request), P_NEXT, (u16)slot, &head_flags);
    if (type != T_FLUSH) {
        packed_put((u64)buffers[slot], length, type == T_OUT ? P_NEXT : P_NEXT | P_WRITE, (u16)slot, 0);
        n = 3;
    }
    packed_put((u64)&statuses[slot], 1, P_WRITE, (u16)slot, 0);
    slots_of[slot] = n;
    barrier();
    pdescs[head].flags = head_flags;
}

/* Queue request `slot` (three descriptors from 3*slot in the split ring); the caller kicks. */
static void submit(int slot, u32 type, u64 sector, u32 length)
{
    headers[slot] = (struct request){ type, 0, sector };
    statuses[slot] = 0xff;
    if (packed) {
        submit_packed(slot, type, length);
        return;
    }
    int d = 3 * slot;
    descs[d] = (struct desc){ (u64)&headers[slot], sizeof(struct request), 1, (u16)(d + 1) };
    u16 data_flags = type == T_OUT ? 1 : 3; /* NEXT, and WRITE unless the device reads it */
    descs[d + 1] = (struct desc){ (u64)buffers[slot], length, data_flags, (u16)(d + 2) };
    descs[d + 2] = (struct desc){ (u64)&statuses[slot], 1, 2, 0 };
    if (type == T_FLUSH) /* no data buffer */
        descs[d] = (struct desc){ (u64)&headers[slot], sizeof(struct request), 1, (u16)(d + 2) };
    avail.ring[avail.idx % QUEUE_SIZE] = (u16)d;
    barrier();
    avail.idx++;
}

static void kick(void)
{
    barrier();
    *(volatile u16 *)notify = 0; /* queue 0's notify address: offset 0 * multiplier */
}

static void wait_all(int count)
{
    if (packed) {
        for (int i = 0; i < count; i++) {
            volatile struct pdesc *d = &pdescs[next_used];
            while (!!(d->flags & P_USED) != used_wrap || !!(d->flags & P_AVAIL) != used_wrap)
                cpu_relax();
            barrier();
            u16 id = d->id;
            GUEST_ASSERT(id < MAX_QD);
            next_used += slots_of[id];
            if (next_used >= QUEUE_SIZE) {
                next_used -= QUEUE_SIZE;
                used_wrap ^= 1;
            }
        }
        return;
    }
    u16 target = last_used + count;
    while ((u16)(used.idx - target) & 0x8000)
        cpu_relax();
    last_used = target;
}

static int transfer(u32 type, u64 sector, u32 length)
{
    submit(0, type, sector, length);
    kick();
    wait_all(1);
    return statuses[0];
}

static int test(void)
{
    int passed = 0;
    u64 capacity = *(volatile u64 *)device_cfg;
    GUEST_ASSERT(capacity >= 64);
    for (int i = 0; i < BLOCK; i++)
        buffers[0][i] = (u8)(i * 7 + 3);
    passed += transfer(T_OUT, 8, BLOCK) == 0;
    for (int i = 0; i < BLOCK; i++)
        buffers[0][i] = 0;
    passed += transfer(T_IN, 8, BLOCK) == 0;
    int same = 1;
    for (int i = 0; i < BLOCK; i++)
        same &= buffers[0][i] == (u8)(i * 7 + 3);
    passed += same;
    passed += transfer(T_IN, 0, 512) == 0;
    const char *expected = "worldswitch disk 0 sector 0";
    int match = 1;
    for (int i = 0; expected[i]; i++)
        match &= buffers[0][i] == (u8)expected[i];
    passed += match;
    passed += transfer(T_FLUSH, 0, 0) == 0;
    passed += transfer(T_IN, capacity, 512) == 1; /* past the end: VIRTIO_BLK_S_IOERR */
    GUEST_ASSERT(transfer(T_GET_ID, 0, 20) == 0);
    u64 serial = 0;
    for (int i = 7; i >= 0; i--)
        serial = serial << 8 | buffers[0][i];
    GUEST_DONE(passed, capacity, serial, 0);
    return 0;
}

static int bench(int random, u64 n, u64 qd)
{
    u64 capacity = *(volatile u64 *)device_cfg;
    u64 blocks = capacity / (BLOCK / 512), seed = 12345;
    if (qd < 1)
        qd = 1;
    if (qd > MAX_QD)
        qd = MAX_QD;
    u64 start = rdtsc(), done = 0, next = 0;
    while (done < n) {
        u64 batch = n - done < qd ? n - done : qd;
        for (u64 i = 0; i < batch; i++) {
            u64 block;
            if (random) {
                seed = seed * 6364136223846793005ul + 1442695040888963407ul;
                block = (seed >> 33) % blocks;
            } else {
                block = next++ % blocks;
            }
            submit((int)i, T_IN, block * (BLOCK / 512), BLOCK);
        }
        kick();
        wait_all((int)batch);
        for (u64 i = 0; i < batch; i++)
            GUEST_ASSERT_EQ(statuses[i], 0);
        done += batch;
    }
    GUEST_DONE(n, rdtsc() - start, qd, 0);
    return 0;
}

static int run(u64 unused)
{
    setup();
    if (arg_has("seq"))
        return bench(0, arg_number(0, 1000), arg_number(1, 1));
    if (arg_has("rand"))
        return bench(1, arg_number(0, 1000), arg_number(1, 1));
    return test();
}

int main(const char *args)
{
    enter_user(run, 0, 0);
}
