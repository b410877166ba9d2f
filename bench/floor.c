/*
 * floor.c: the smallest VMM that runs worldswitch's `exits` guest, in C.
 *
 * It is the physical floor of the exit round trip on this host: the same guest binary, the same
 * long-mode set-up and in-kernel irqchip as worldswitch, and a run loop that does nothing but
 * count. bench/ compiles it on the fly and runs it beside worldswitch and QEMU.
 *
 *   floor GUEST.elf "ARGS"
 *
 * COM1 output goes to stdout (its line status always says "ready"), the debug-exit port ends the
 * run with the value written, and a ucall prints one line of JSON: {"ucall": [...], ...}.
 */
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MEM_SIZE (128UL << 20)
#define GDT 0x1000
#define TSS 0x2000
#define TSS_SIZE (0x68 + 8192 + 1)
#define ARGS 0x5000
#define PML4 0x9000
#define STACK_TOP 0x8f000
#define TESTDEV_PORT 0x1010
#define TESTDEV_MMIO 0xfeb00000UL
#define UCALL_PORT 0x1000
#define DEBUG_EXIT_PORT 0xf4
#define COM1 0x3f8
#define LSR_THRE_TEMT 0x60

static void die(const char *what)
{
    fprintf(stderr, "floor: %s: %s\n", what, strerror(errno));
    exit(1);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000UL + ts.tv_nsec;
}

static uint64_t descriptor(uint32_t base, uint32_t limit, uint8_t access, uint8_t flags)
{
    return (limit & 0xffffUL) | ((uint64_t)(base & 0xffffff) << 16) | ((uint64_t)access << 40) |
           ((uint64_t)((limit >> 16) & 0xf) << 48) | ((uint64_t)flags << 52) | ((uint64_t)(base >> 24) << 56);
}

static uint64_t load_elf(uint8_t *mem, const char *path)
{
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        die(path);
    struct stat st;
    fstat(fd, &st);
    uint8_t *image = mmap(NULL, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    Elf64_Ehdr *eh = (Elf64_Ehdr *)image;
    for (int i = 0; i < eh->e_phnum; i++) {
        Elf64_Phdr *ph = (Elf64_Phdr *)(image + eh->e_phoff + i * eh->e_phentsize);
        if (ph->p_type != PT_LOAD || ph->p_paddr + ph->p_memsz > MEM_SIZE)
            continue;
        memcpy(mem + ph->p_paddr, image + ph->p_offset, ph->p_filesz);
    }
    return eh->e_entry;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: floor GUEST.elf ARGS\n");
        return 2;
    }
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        die("/dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0)
        die("KVM_CREATE_VM");
    ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000UL);
    if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0)
        die("KVM_CREATE_IRQCHIP");
    struct kvm_pit_config pit = { .flags = KVM_PIT_SPEAKER_DUMMY };
    ioctl(vm, KVM_CREATE_PIT2, &pit);

    uint8_t *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    struct kvm_userspace_memory_region region = { 0, 0, 0, MEM_SIZE, (uint64_t)mem };
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
        die("KVM_SET_USER_MEMORY_REGION");

    uint64_t entry = load_elf(mem, argv[1]);
    strncpy((char *)mem + ARGS, argv[2], 4095);

    /* The same scaffolding as worldswitch/boot/longmode.py. */
    uint64_t *gdt = (uint64_t *)(mem + GDT);
    gdt[1] = descriptor(0, 0xfffff, 0x9a, 0xa);
    gdt[2] = descriptor(0, 0xfffff, 0x92, 0xc);
    gdt[3] = descriptor(0, 0xfffff, 0xf2, 0xc);
    gdt[4] = descriptor(0, 0xfffff, 0xfa, 0xa);
    gdt[5] = descriptor(TSS, TSS_SIZE - 1, 0x89, 0);
    gdt[6] = 0;
    *(uint64_t *)(mem + TSS + 4) = STACK_TOP;
    *(uint16_t *)(mem + TSS + 0x66) = 0x68;
    mem[TSS + TSS_SIZE - 1] = 0xff;
    uint64_t *pml4 = (uint64_t *)(mem + PML4), *pdpt = (uint64_t *)(mem + PML4 + 0x1000);
    pml4[0] = (PML4 + 0x1000) | 7;
    for (int g = 0; g < 4; g++) {
        uint64_t *pd = (uint64_t *)(mem + PML4 + 0x2000 + g * 0x1000);
        pdpt[g] = (PML4 + 0x2000 + g * 0x1000) | 7;
        for (int i = 0; i < 512; i++)
            pd[i] = ((uint64_t)g << 30) + ((uint64_t)i << 21) + 0x87;
    }

    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0)
        die("KVM_CREATE_VCPU");
    struct {
        struct kvm_cpuid2 head;
        struct kvm_cpuid_entry2 entries[256];
    } cpuid = { .head.nent = 256 };
    if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, &cpuid) < 0 || ioctl(vcpu, KVM_SET_CPUID2, &cpuid) < 0)
        die("CPUID");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);

    struct kvm_sregs sregs;
    ioctl(vcpu, KVM_GET_SREGS, &sregs);
    struct kvm_segment code = { .base = 0, .limit = 0xffffffff, .selector = 8, .type = 11, .present = 1, .s = 1, .l = 1, .g = 1 };
    struct kvm_segment data = { .base = 0, .limit = 0xffffffff, .selector = 16, .type = 3, .present = 1, .s = 1, .db = 1, .g = 1 };
    sregs.cs = code;
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data;
    sregs.tr = (struct kvm_segment){ .base = TSS, .limit = TSS_SIZE - 1, .selector = 0x28, .type = 11, .present = 1 };
    sregs.ldt = (struct kvm_segment){ .type = 2, .present = 1, .limit = 0xffff, .unusable = 1 };
    sregs.gdt.base = GDT;
    sregs.gdt.limit = 7 * 8 - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr3 = PML4;
    sregs.cr4 = 0x20 | 0x200 | 0x400;
    sregs.cr0 = 0x80050033;
    sregs.efer = 0xd01;
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
        die("KVM_SET_SREGS");
    struct kvm_regs regs = { .rip = entry, .rsp = STACK_TOP, .rdi = ARGS, .rsi = MEM_SIZE, .rdx = 1, .rflags = 2 };
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
        die("KVM_SET_REGS");

    uint64_t exits = 0, port_writes = 0, mmio_writes = 0, start = now_ns();
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) {
            if (errno == EINTR)
                continue;
            die("KVM_RUN");
        }
        exits++;
        if (run->exit_reason == KVM_EXIT_IO) {
            uint8_t *io = (uint8_t *)run + run->io.data_offset;
            if (run->io.port == TESTDEV_PORT) {
                if (run->io.direction == KVM_EXIT_IO_OUT)
                    port_writes++;
                else
                    *(uint32_t *)io = (uint32_t)port_writes;
            } else if (run->io.port == UCALL_PORT) {
                uint32_t *uc = (uint32_t *)(mem + *(uint32_t *)io);
                uint64_t *args = (uint64_t *)(uc + 2);
                printf("{\"ucall\": [%u, %lu, %lu, %lu, %lu], \"exits\": %lu, \"ns\": %lu}\n", uc[0], args[0], args[1],
                       args[2], args[3], exits, now_ns() - start);
                if (uc[0] == 2 || uc[0] == 3)
                    return uc[0] == 2 ? 0 : 1;
            } else if (run->io.port == DEBUG_EXIT_PORT) {
                fflush(stdout);
                return *(uint32_t *)io;
            } else if (run->io.port == COM1 && run->io.direction == KVM_EXIT_IO_OUT) {
                putchar(*io); /* a UART that is always ready, for the guest's report line */
            } else if (run->io.port == COM1 + 5) {
                *io = LSR_THRE_TEMT;
            }
        } else if (run->exit_reason == KVM_EXIT_MMIO) {
            if (run->mmio.is_write)
                mmio_writes++;
            else
                *(uint32_t *)run->mmio.data = (uint32_t)mmio_writes;
        } else {
            fprintf(stderr, "floor: unexpected exit reason %u\n", run->exit_reason);
            return 3;
        }
    }
}
