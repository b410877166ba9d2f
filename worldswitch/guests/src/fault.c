/* fault: misbehaves on purpose, for the VMX's error paths.
 *   ud         executes ud2 in ring 3 (the runtime reports the #UD)
 *   gp         reads CR0 in ring 3 (#GP)
 *   triple     loads an empty IDT and executes ud2 in ring 0: a triple fault
 *   unmapped N writes N times to an MMIO address no device owns, then reports DONE(N, value read)
 *   spin       says "spinning in ring 3" and loops forever there (a test waits for the line
 *              before it looks at the vCPU: until then the runtime's ring-0 set-up runs)
 *   halt       halts in ring 0 with interrupts disabled, forever
 *   abort      fails a guest assertion
 *   int3 N     executes int3 N times in ring 0 with a #BP handler installed, then DONE(handled)
 *              (KVM's emulator cannot deliver it on PVM hosts; the VMX does, see vmm/x86/emulate.py)
 *   peek A     reads the word at address A (decimal) in ring 0: DONE(word, RAM size it was given)
 *   upeek A    reads the word at address A (decimal) in ring 3: DONE(word)
 *   ukernel [S] in ring 3, far-returns to code segment selector S (decimal; the kernel's, RPL 3,
 *              by default), then reads CR3 there: DONE(CR3) if both worked, where the CPU refuses
 *              the first with #GP(the selector) for a DPL 0 segment or one past the GDT's limit
 *   usgdt A    stores the GDTR at address A (decimal) in ring 3: DONE(its limit) if it returns
 *   idt A      points its IDT at address A (decimal) and executes int3 in ring 0
 *   stack      points its TSS's RSP0 at an address its tables do not map, then executes ud2 in
 *              ring 3: the #UD, the #PF and the #DF all fail on that stack, a triple fault
 *   gate       executes int3 in ring 0 through a gate marked not present: the CPU raises #NP with
 *              the gate's error code (vector 3 * 8 + 2: the IDT, not external); DONE(error code)
 *   map A      maps the 2 MiB at physical address A (decimal) at the same address in its identity
 *              map (a page the VMM may have left out of it), then reads it: DONE(word)
 *   intn       from user mode: INT 0x80 through a gate user mode may use, then INT 0x81 through one
 *              it may not (#GP with error code 0x81 * 8 + 2): DONE(0x80 handled, the #GP's code)
 *   wipe A N   writes N zero bytes from address A (decimal) in ring 0, then executes int3 there
 *              with a #BP handler installed: DONE(breakpoints) if it came back
 *   uport P    refuses port P (decimal) in its TSS's I/O bitmap, then in ring 3 with IOPL 0 prints a
 *              line (COM1's ports, which the bitmap grants) and reads port P: DONE(13, the #GP's
 *              error code, the ring it came from) from its #GP handler, or DONE(0, the byte) if the
 *              read was granted. With "iopl3", ring 3 runs with IOPL 3, which grants every port.
 *   high A     maps the GiB of RAM at address A (decimal, above 4 GiB) with a page directory of its
 *              own, puts a page table at A that maps the page after it at 0xc0000000, and reads
 *              there: DONE(the word it wrote through the other mapping), its tables above 4 GiB
 *   uedge A    executes hlt in ring 3 at the last byte of the canonical lower half (0x7fffffffffff),
 *              where it maps the 2 MiB at address A (decimal): the #GP is the runtime's report, as
 *              for any hlt in ring 3 */
#include "ws.h"

#define PROGRAM_TSS 0x2000 /* boot/longmode.py: where the VMM put its TSS */
#define TSS_HEADER 0x68   /* and where its I/O bitmap starts */
#define NOT_MAPPED 0x00007f0000000000ul

static int misbehave(u64 unused)
{
    if (arg_has("ud") || arg_has("stack"))
        __asm__ volatile("ud2");
    if (arg_has("gp")) {
        u64 cr0;
        __asm__ volatile("mov %%cr0, %0" : "=r"(cr0));
    }
    if (arg_has("unmapped")) {
        u64 n = arg_number(0, 100);
        for (u32 i = 0; i < n; i++)
            mmio_write32(UNMAPPED_MMIO + 4 * (i % 16), i);
        u32 value = mmio_read32(UNMAPPED_MMIO);
        GUEST_DONE(n, value, 0, 0);
    }
    if (arg_has("spin")) {
        serial_puts("spinning in ring 3\n");
        for (;;)
            barrier();
    }
    if (arg_has("abort"))
        GUEST_ASSERT_EQ(2 + 2, 5);
    GUEST_ASSERT(!"unknown fault mode: use ud, gp, triple, unmapped N, spin, halt or abort");
    return 1;
}

static volatile u64 breakpoints, int80s, intn_gp_code;

static void on_int80(struct trap_frame *frame)
{
    GUEST_ASSERT_EQ(frame->vector, 0x80);
    GUEST_ASSERT_EQ(frame->cs, USER_CS);
    int80s++;
}

static void on_intn_gp(struct trap_frame *frame)
{
    intn_gp_code = frame->error_code;
    frame->rip += 2; /* past the int: #GP is a fault, reported at the instruction */
}

static int user_int_n(u64 unused)
{
    __asm__ volatile("int $0x80" ::: "memory");
    __asm__ volatile("int $0x81" ::: "memory");
    GUEST_DONE(int80s, intn_gp_code, 0, 0);
    return 0;
}

static void on_not_present(struct trap_frame *frame)
{
    frame->rip += 1; /* past the int3: #NP is a fault, reported at the instruction */
    GUEST_DONE(frame->error_code, frame->vector, 0, 0);
}

static void on_breakpoint(struct trap_frame *frame)
{
    GUEST_ASSERT_EQ(frame->cs, KERNEL_CS);
    breakpoints++;
}

static int user_peek(u64 address)
{
    GUEST_DONE(*(volatile u64 *)address, 0, 0, 0);
    return 0;
}

static void on_port_gp(struct trap_frame *frame)
{
    GUEST_DONE(13, frame->error_code, frame->cs & 3, 0);
}

static int user_port(u64 port)
{
    serial_puts("ring 3 prints through COM1\n");
    GUEST_DONE(0, inb((u16)port), 0, 0);
    return 0;
}

static int user_jump(u64 address)
{
    ((void (*)(void))address)();
    return 0;
}

#define ADDRESS_BITS 0x000ffffffffff000ul

/* The identity map's PDPT, in the tables the VMM built (boot/longmode.py). */
static u64 *identity_pdpt(void)
{
    u64 cr3;
    __asm__ volatile("mov %%cr3, %0" : "=r"(cr3));
    return (u64 *)(((u64 *)(cr3 & ADDRESS_BITS))[0] & ADDRESS_BITS);
}

static int user_far_return(u64 selector)
{
    u64 cr3;
    __asm__ volatile("pushq %1; leaq 1f(%%rip), %0; pushq %0; lretq; 1: mov %%cr3, %0"
                     : "=&r"(cr3) : "r"(selector) : "memory");
    GUEST_DONE(cr3, 0, 0, 0);
    return 0;
}

static int user_sgdt(u64 address)
{
    __asm__ volatile("sgdt (%0)" : : "r"(address) : "memory");
    GUEST_DONE(*(volatile u16 *)address, 0, 0, 0);
    return 0;
}

static int report_breakpoints(u64 expected)
{
    GUEST_ASSERT_EQ(breakpoints, expected);
    GUEST_DONE(breakpoints, 0, 0, 0);
    return 0;
}

int main(const char *args)
{
    if (arg_has("int3")) {
        u64 n = arg_number(0, 3);
        set_trap_handler(3, on_breakpoint);
        for (u64 i = 0; i < n; i++)
            __asm__ volatile("int3; nop" ::: "memory");
        enter_user(report_breakpoints, n, 0);
    }
    if (arg_has("triple")) {
        struct {
            u16 limit;
            u64 base;
        } __attribute__((packed)) empty = { 0, 0 };
        __asm__ volatile("lidt %0; ud2" : : "m"(empty));
    }
    if (arg_has("stack"))
        *(volatile u64 *)(PROGRAM_TSS + 4) = NOT_MAPPED; /* RSP0 */
    if (arg_has("gate")) {
        set_trap_handler(11, on_not_present);
        clear_gate_present(3);
        __asm__ volatile("int3" ::: "memory");
        GUEST_ASSERT(!"int3 through a gate not present came back");
    }
    if (arg_has("intn")) {
        set_trap_handler_in(0x80, on_int80, KERNEL_CS); /* DPL 3 */
        set_trap_handler(0x81, on_int80);                /* DPL 0 */
        set_trap_handler(13, on_intn_gp);
        enter_user(user_int_n, 0, 0);
    }
    if (arg_has("wipe")) {
        set_trap_handler(3, on_breakpoint);
        memset((void *)arg_number(0, 0), 0, arg_number(1, 0));
        __asm__ volatile("int3; nop" ::: "memory");
        GUEST_DONE(breakpoints, 0, 0, 0);
    }
    if (arg_has("ukernel"))
        enter_user(user_far_return, arg_number(0, KERNEL_CS | 3), 0);
    if (arg_has("usgdt"))
        enter_user(user_sgdt, arg_number(0, 0), 0);
    if (arg_has("upeek"))
        enter_user(user_peek, arg_number(0, 0), 0);
    if (arg_has("peek"))
        GUEST_DONE(*(volatile u64 *)arg_number(0, 0), ws_ram_size, 0, 0);
    if (arg_has("map")) {
        u64 address = arg_number(0, 0);
        *identity_pde(address) = (address & ~0x1ffffful) | 0x87; /* present, writable, user, 2 MiB */
        __asm__ volatile("invlpg (%0)" : : "r"(address) : "memory");
        GUEST_DONE(*(volatile u64 *)address, 0, 0, 0);
    }
    if (arg_has("uport")) {
        u64 port = arg_number(0, 0x80);
        *(volatile u8 *)(PROGRAM_TSS + TSS_HEADER + port / 8) |= (u8)(1u << (port % 8));
        set_trap_handler(13, on_port_gp);
        enter_user(user_port, port, arg_has("iopl3") ? 0 : USER_IOPL0);
    }
    if (arg_has("high")) {
        static u64 high_pd[512] __attribute__((aligned(4096)));
        const u64 gib = 1ul << 30, window = 0xc0000000ul;
        u64 table = arg_number(0, 4 * gib) & ~0xffful, cr3;
        __asm__ volatile("mov %%cr3, %0" : "=r"(cr3));
        for (u64 i = 0; i < 512; i++)
            high_pd[i] = ((table & ~(gib - 1)) + (i << 21)) | 0x83; /* present, writable, 2 MiB */
        identity_pdpt()[table >> 30] = (u64)high_pd | 3;
        __asm__ volatile("mov %0, %%cr3" : : "r"(cr3) : "memory");
        u64 *pt = (u64 *)table;
        memset(pt, 0, 4096);
        pt[0] = (table + 4096) | 3;
        *(volatile u64 *)(table + 4096) = 0x5eed0f4161;
        *identity_pde(window) = table | 3; /* a page table, not a 2 MiB page */
        __asm__ volatile("mov %0, %%cr3" : : "r"(cr3) : "memory");
        GUEST_DONE(*(volatile u64 *)window, 0, 0, 0);
    }
    if (arg_has("uedge")) {
        static u64 top_pdpt[512] __attribute__((aligned(4096))), top_pd[512] __attribute__((aligned(4096)));
        const u64 last = 0x00007ffffffffffful;
        u64 page = arg_number(0, 0) & ~0x1ffffful, cr3;
        __asm__ volatile("mov %%cr3, %0" : "=r"(cr3));
        top_pd[511] = page | 0x87; /* present, writable, user, 2 MiB */
        top_pdpt[511] = (u64)top_pd | 7;
        ((volatile u64 *)(cr3 & ADDRESS_BITS))[255] = (u64)top_pdpt | 7;
        *(volatile u8 *)(page + 0x1fffff) = 0xf4; /* hlt, at `last` through the new mapping */
        enter_user(user_jump, last, 0);
    }
    if (arg_has("idt")) {
        struct {
            u16 limit;
            u64 base;
        } __attribute__((packed)) forged = { 4095, arg_number(0, 0) };
        __asm__ volatile("lidt %0; int3" : : "m"(forged));
        GUEST_ASSERT(!"int3 came back through a forged IDT");
    }
    if (arg_has("halt"))
        for (;;)
            __asm__ volatile("cli; hlt");
    enter_user(misbehave, 0, 0);
}
