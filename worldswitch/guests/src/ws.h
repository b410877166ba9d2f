/*
 * ws.h: the runtime of worldswitch's built-in guests.
 *
 * A guest is entered in 64-bit long mode at ring 0 (see boot/program.py for the exact state),
 * installs what it needs, and usually drops to ring 3 with enter_user(): on PVM hosts ring-0
 * code is emulated (about 1 M instructions/s) while ring-3 code runs natively, so loops belong
 * in ring 3. Ring-3 code may use port I/O (the TSS I/O bitmap allows every port).
 *
 * Guests report to the VMX through the ucall port (devices/ucall.py), in the style of the Linux
 * KVM selftests: GUEST_SYNC, GUEST_DONE, GUEST_ASSERT, GUEST_PRINTF.
 */
#ifndef WS_H
#define WS_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long i64;
typedef unsigned long size_t;
typedef unsigned long uintptr_t;

#define NULL ((void *)0)
#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/* The worldswitch board (vmm/builder.py). */
#define COM1 0x3f8
#define COM1_IRQ 4
#define DEBUG_EXIT_PORT 0xf4
#define UCALL_PORT 0x1000
#define TESTDEV_PORT 0x1010
#define TESTDEV_MMIO 0xfeb00000UL
#define LAPIC_BASE 0xfee00000UL
#define IOAPIC_BASE 0xfec00000UL
#define UNMAPPED_MMIO 0xd0000000UL /* in the PCI hole, owned by no device */

/* GDT selectors the VMM provides (boot/longmode.py). */
#define KERNEL_CS 0x08
#define KERNEL_DS 0x10
#define USER_DS 0x1b
#define USER_CS 0x23

/* What the VMM passed at entry. */
extern const char *ws_args;
extern u64 ws_ram_size;
extern u64 ws_vcpus;

/* Port and memory-mapped I/O. */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void mmio_write32(u64 addr, u32 v) { *(volatile u32 *)addr = v; }
static inline u32 mmio_read32(u64 addr) { return *(volatile u32 *)addr; }
static inline u64 rdtsc(void) { u32 lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return ((u64)hi << 32) | lo; }
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline void sti(void) { __asm__ volatile("sti" ::: "memory"); }
static inline void cli(void) { __asm__ volatile("cli" ::: "memory"); }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }

/* Interrupts and exceptions: handlers run in ring 0 on the TSS stack. */
struct trap_frame {
    u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
    u64 vector, error_code;
    u64 rip, cs, rflags, rsp, ss; /* pushed by the CPU */
};
typedef void (*trap_handler)(struct trap_frame *frame);
void set_trap_handler(int vector, trap_handler handler);
/* A gate ring 3 may also raise with int/int3 (DPL 3), whose handler runs in the ring of
 * `code_segment`: KERNEL_CS, or USER_CS for a handler in ring 3 itself (no privilege change: the
 * CPU delivers on the current stack), the path an in-guest monitor's IDT takes (docs/monitor.md). */
void set_trap_handler_in(int vector, trap_handler handler, u16 code_segment);
/* After a guest loads a GDT of its own: its gates, set and to come, name `code_segment` as the
 * kernel's (they name KERNEL_CS, the VMM's, until then). */
void use_kernel_code_segment(u16 code_segment);
/* The gate for `vector` marked not present: the CPU answers an event there with #NP. */
void clear_gate_present(int vector);

/* Leave ring 0 for good: run fn(arg) in ring 3 on the runtime's user stack, with RFLAGS.IOPL 3
 * (every port) and interrupts disabled, or as `flags` says. fn's return value becomes the exit status. */
#define USER_INTERRUPTS 1 /* interrupts enabled */
#define USER_IOPL0 2      /* IOPL 0: only the ports the TSS bitmap grants */
void enter_user(int (*fn)(u64), u64 arg, int flags) __attribute__((noreturn));

/* The VMM's identity map (boot/longmode.py: 2 MiB pages, PML4 slot 0): the page-directory entry that
 * maps `address`, and that 2 MiB page made supervisor-only (U/S cleared, its TLB entry flushed). */
u64 *identity_pde(u64 address);
void supervisor_only(u64 address);
/* aps.c (guests that link it): start the other vCPUs; each calls entry(cpu number) at ring 0 if
 * entry is not 0, and halts when it returns. */
void start_aps(void (*entry)(u64 cpu));

/* The local APIC (xAPIC MMIO). */
static inline void lapic_write(u32 reg, u32 v) { mmio_write32(LAPIC_BASE + reg, v); }
static inline u32 lapic_read(u32 reg) { return mmio_read32(LAPIC_BASE + reg); }
#define LAPIC_ID 0x20
#define LAPIC_EOI 0xb0
#define LAPIC_SVR 0xf0
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TIMER_INITIAL 0x380
#define LAPIC_TIMER_CURRENT 0x390
#define LAPIC_TIMER_DIVIDE 0x3e0

/* The 8259 PIC pair, remapped to vectors base..base+15 with every line masked. */
void pic_init(u8 base);
void pic_unmask(int irq);
static inline void pic_eoi(int irq) { if (irq >= 8) outb(0xa0, 0x20); outb(0x20, 0x20); }

/* Console output on COM1 (polled). */
void serial_putc(char c);
void serial_puts(const char *s);
int ws_snprintf(char *buf, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void ws_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Argument string helpers. */
int arg_word(int index, char *buf, size_t size); /* 1 if the index-th word exists */
int arg_has(const char *word);
u64 arg_number(int index_of_number, u64 fallback); /* the n-th numeric word */
int str_eq(const char *a, const char *b);
size_t ws_strlen(const char *s);

/* ucall: reports to the VMX (devices/ucall.py). */
enum { UCALL_SYNC = 1, UCALL_DONE = 2, UCALL_ABORT = 3, UCALL_PRINT = 4 };
struct ucall {
    u32 cmd;
    u32 line;
    u64 args[4];
    char file[32];
    char text[96];
};
void ucall(u32 cmd, const char *file, u32 line, u64 a0, u64 a1, u64 a2, u64 a3, const char *fmt, ...);
void ws_exit(u32 status) __attribute__((noreturn));

#define GUEST_SYNC(a0, a1) ucall(UCALL_SYNC, __FILE__, __LINE__, (a0), (a1), 0, 0, "sync")
#define GUEST_DONE(a0, a1, a2, a3) ucall(UCALL_DONE, __FILE__, __LINE__, (a0), (a1), (a2), (a3), "done")
#define GUEST_PRINTF(...) ucall(UCALL_PRINT, __FILE__, __LINE__, 0, 0, 0, 0, __VA_ARGS__)
#define GUEST_ASSERT(cond)                                                                     \
    do {                                                                                       \
        if (!(cond))                                                                           \
            ucall(UCALL_ABORT, __FILE__, __LINE__, 0, 0, 0, 0, "%s", #cond);                   \
    } while (0)
#define GUEST_ASSERT_EQ(a, b)                                                                  \
    do {                                                                                       \
        u64 _a = (u64)(a), _b = (u64)(b);                                                      \
        if (_a != _b)                                                                          \
            ucall(UCALL_ABORT, __FILE__, __LINE__, _a, _b, 0, 0, "%s == %s (%lu != %lu)", #a, #b, _a, _b); \
    } while (0)

void *memcpy(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);

/* Every guest provides main; it runs in ring 0 and its return value is the exit status. */
int main(const char *args);

#endif
