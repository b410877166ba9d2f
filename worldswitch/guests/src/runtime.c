/* runtime.c: IDT, trap dispatch, PIC, console, formatting, arguments and ucall for the built-in guests. */
#include "ws.h"

const char *ws_args;
u64 ws_ram_size;
u64 ws_vcpus;

extern const u64 trap_stubs[256];

/* ---- PVH boot (pvh.S): struct hvm_start_info, xen/include/public/arch-x86/hvm/start_info.h ---- */

struct hvm_start_info {
    u32 magic;
    u32 version;
    u32 flags;
    u32 nr_modules;
    u64 modlist_paddr;
    u64 cmdline_paddr;
    u64 rsdp_paddr;
    u64 memmap_paddr;
    u32 memmap_entries;
    u32 reserved;
};

struct hvm_memmap_table_entry {
    u64 addr;
    u64 size;
    u32 type;
    u32 reserved;
};

#define HVM_START_MAGIC 0x336ec578
#define E820_RAM 1

void pvh_boot_info(const struct hvm_start_info *info)
{
    ws_args = "";
    ws_ram_size = 0;
    ws_vcpus = 1; /* PVH does not say; the guests only print it */
    if (!info || info->magic != HVM_START_MAGIC)
        return;
    if (info->cmdline_paddr)
        ws_args = (const char *)info->cmdline_paddr;
    if (info->version >= 1 && info->memmap_paddr) {
        const struct hvm_memmap_table_entry *map = (const void *)info->memmap_paddr;
        for (u32 i = 0; i < info->memmap_entries; i++)
            if (map[i].type == E820_RAM)
                ws_ram_size += map[i].size;
    }
}

/* ---- IDT ---------------------------------------------------------------------------------- */

struct idt_gate {
    u16 offset_low;
    u16 selector;
    u8 ist;
    u8 type_attr;
    u16 offset_mid;
    u32 offset_high;
    u32 reserved;
} __attribute__((packed));

static struct idt_gate idt[256] __attribute__((aligned(16)));
static trap_handler handlers[256];
static u16 kernel_code_segment = KERNEL_CS;

static void set_gate(int vector, int user_callable, u16 code_segment)
{
    u64 target = trap_stubs[vector];
    idt[vector].offset_low = target & 0xffff;
    idt[vector].selector = code_segment;
    idt[vector].ist = 0;
    /* present, DPL 0 or 3; a 64-bit interrupt gate (interrupts off inside the handler), except for
     * a handler in ring 3: there IRETQ cannot set IF again where IOPL is 0 (PVM forces it so in
     * user mode), so a trap gate, which leaves IF as it was, keeps the next interrupt coming */
    u8 type = (code_segment & 3) == 3 ? 0x8f : 0x8e;
    idt[vector].type_attr = type | (user_callable ? 0x60 : 0);
    idt[vector].offset_mid = (target >> 16) & 0xffff;
    idt[vector].offset_high = target >> 32;
}

void set_trap_handler(int vector, trap_handler handler)
{
    handlers[vector] = handler;
    set_gate(vector, 0, kernel_code_segment);
}

void use_kernel_code_segment(u16 code_segment)
{
    for (int vector = 0; vector < 256; vector++)
        if (idt[vector].selector == kernel_code_segment)
            idt[vector].selector = code_segment;
    kernel_code_segment = code_segment;
}

void set_trap_handler_in(int vector, trap_handler handler, u16 code_segment)
{
    handlers[vector] = handler;
    set_gate(vector, 1, code_segment);
}

void clear_gate_present(int vector)
{
    idt[vector].type_attr &= 0x7f;
}

u64 *identity_pde(u64 address)
{
    const u64 address_bits = 0x000ffffffffff000ul;
    u64 cr3;
    __asm__ volatile("mov %%cr3, %0" : "=r"(cr3));
    u64 *pdpt = (u64 *)(((u64 *)(cr3 & address_bits))[0] & address_bits);
    u64 *pd = (u64 *)(pdpt[(address >> 30) & 511] & address_bits);
    return &pd[(address >> 21) & 511];
}

void supervisor_only(u64 address)
{
    *identity_pde(address) &= ~4ul; /* U/S */
    __asm__ volatile("invlpg (%0)" : : "r"(address) : "memory");
}

static const char *const exception_names[32] = {
    "#DE (divide error)", "#DB (debug)", "NMI", "#BP (breakpoint)", "#OF (overflow)",
    "#BR (bound range)", "#UD (invalid opcode)", "#NM (device not available)",
    "#DF (double fault)", "coprocessor segment overrun", "#TS (invalid TSS)",
    "#NP (segment not present)", "#SS (stack fault)", "#GP (general protection)",
    "#PF (page fault)", "reserved 15", "#MF (x87 error)", "#AC (alignment check)",
    "#MC (machine check)", "#XM (SIMD error)", "#VE (virtualisation)", "#CP (control protection)",
};

void trap_dispatch(struct trap_frame *frame)
{
    trap_handler handler = handlers[frame->vector];
    if (handler) {
        handler(frame);
        return;
    }
    const char *name = frame->vector < 32 && exception_names[frame->vector] ? exception_names[frame->vector] : "interrupt";
    ucall(UCALL_ABORT, "runtime.c", __LINE__, frame->vector, frame->rip, frame->error_code, frame->cs & 3,
          "unhandled %s, vector %lu, at rip %#lx in ring %lu, error code %#lx", name, frame->vector,
          frame->rip, frame->cs & 3, frame->error_code);
}

void runtime_init(void)
{
    /* Exceptions only: interrupt vectors get a gate when a guest installs a handler. */
    for (int vector = 0; vector < 32; vector++)
        set_gate(vector, 0, KERNEL_CS);
    struct {
        u16 limit;
        u64 base;
    } __attribute__((packed)) idtr = { sizeof(idt) - 1, (u64)idt };
    __asm__ volatile("lidt %0" : : "m"(idtr));
}

/* ---- PIC ---------------------------------------------------------------------------------- */

static u16 pic_mask = 0xffff;

void pic_init(u8 base)
{
    outb(0x20, 0x11); /* ICW1: edge triggered, cascade, ICW4 follows */
    outb(0xa0, 0x11);
    outb(0x21, base); /* ICW2: vector base */
    outb(0xa1, base + 8);
    outb(0x21, 0x04); /* ICW3: slave on IRQ2 */
    outb(0xa1, 0x02);
    outb(0x21, 0x01); /* ICW4: 8086 mode */
    outb(0xa1, 0x01);
    pic_mask = 0xfffb; /* everything masked but the cascade */
    outb(0x21, pic_mask & 0xff);
    outb(0xa1, pic_mask >> 8);
}

void pic_unmask(int irq)
{
    pic_mask &= ~(1u << irq);
    if (irq >= 8)
        outb(0xa1, pic_mask >> 8);
    else
        outb(0x21, pic_mask & 0xff);
}

/* ---- console ------------------------------------------------------------------------------ */

void serial_putc(char c)
{
    while (!(inb(COM1 + 5) & 0x20)) /* LSR.THRE */
        cpu_relax();
    outb(COM1, c);
}

void serial_puts(const char *s)
{
    for (; *s; s++) {
        if (*s == '\n')
            serial_putc('\r');
        serial_putc(*s);
    }
}

size_t ws_strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

int str_eq(const char *a, const char *b)
{
    while (*a && *a == *b)
        a++, b++;
    return *a == *b;
}

struct out {
    char *buf;
    size_t size, len;
};

static void put(struct out *o, char c)
{
    if (o->len + 1 < o->size)
        o->buf[o->len] = c;
    o->len++;
}

static void put_number(struct out *o, u64 value, int base, int negative, int width, char pad, int prefix)
{
    char digits[24];
    int n = 0;
    do {
        digits[n++] = "0123456789abcdef"[value % base];
        value /= base;
    } while (value);
    if (negative)
        put(o, '-');
    if (prefix)
        put(o, '0'), put(o, 'x');
    for (int i = n; i < width; i++)
        put(o, pad);
    while (n)
        put(o, digits[--n]);
}

/* A small vsnprintf: %d %i %u %x %p %s %c %%, with l/ll, # (0x) and zero-padded widths. */
static int ws_vsnprintf(char *buf, size_t size, const char *fmt, __builtin_va_list ap)
{
    struct out o = { buf, size, 0 };
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            put(&o, *fmt);
            continue;
        }
        fmt++;
        int alt = 0, width = 0, longs = 0;
        char pad = ' ';
        if (*fmt == '#')
            alt = 1, fmt++;
        if (*fmt == '0')
            pad = '0', fmt++;
        while (*fmt >= '0' && *fmt <= '9')
            width = width * 10 + (*fmt++ - '0');
        while (*fmt == 'l')
            longs++, fmt++;
        switch (*fmt) {
        case 'd':
        case 'i': {
            i64 v = longs ? __builtin_va_arg(ap, i64) : __builtin_va_arg(ap, int);
            put_number(&o, v < 0 ? -(u64)v : (u64)v, 10, v < 0, width, pad, 0);
            break;
        }
        case 'u':
            put_number(&o, longs ? __builtin_va_arg(ap, u64) : __builtin_va_arg(ap, u32), 10, 0, width, pad, 0);
            break;
        case 'x':
            put_number(&o, longs ? __builtin_va_arg(ap, u64) : __builtin_va_arg(ap, u32), 16, 0, width, pad, alt);
            break;
        case 'p':
            put_number(&o, (u64)__builtin_va_arg(ap, void *), 16, 0, width, pad, 1);
            break;
        case 's': {
            const char *s = __builtin_va_arg(ap, const char *);
            for (s = s ? s : "(null)"; *s; s++)
                put(&o, *s);
            break;
        }
        case 'c':
            put(&o, (char)__builtin_va_arg(ap, int));
            break;
        case '%':
            put(&o, '%');
            break;
        default:
            put(&o, '?');
            break;
        }
    }
    if (size)
        buf[o.len < size ? o.len : size - 1] = 0;
    return (int)o.len;
}

int ws_snprintf(char *buf, size_t size, const char *fmt, ...)
{
    __builtin_va_list ap;
    __builtin_va_start(ap, fmt);
    int n = ws_vsnprintf(buf, size, fmt, ap);
    __builtin_va_end(ap);
    return n;
}

void ws_printf(const char *fmt, ...)
{
    char line[256];
    __builtin_va_list ap;
    __builtin_va_start(ap, fmt);
    ws_vsnprintf(line, sizeof(line), fmt, ap);
    __builtin_va_end(ap);
    serial_puts(line);
}

/* ---- arguments ---------------------------------------------------------------------------- */

int arg_word(int index, char *buf, size_t size)
{
    const char *p = ws_args ? ws_args : "";
    for (int i = 0;; i++) {
        while (*p == ' ')
            p++;
        if (!*p)
            return 0;
        const char *start = p;
        while (*p && *p != ' ')
            p++;
        if (i == index) {
            size_t n = (size_t)(p - start) < size - 1 ? (size_t)(p - start) : size - 1;
            memcpy(buf, start, n);
            buf[n] = 0;
            return 1;
        }
    }
}

int arg_has(const char *word)
{
    char buf[64];
    for (int i = 0; arg_word(i, buf, sizeof(buf)); i++)
        if (str_eq(buf, word))
            return 1;
    return 0;
}

u64 arg_number(int index_of_number, u64 fallback)
{
    char buf[32];
    for (int i = 0, seen = 0; arg_word(i, buf, sizeof(buf)); i++) {
        if (buf[0] < '0' || buf[0] > '9')
            continue;
        if (seen++ != index_of_number)
            continue;
        u64 v = 0;
        for (char *c = buf; *c >= '0' && *c <= '9'; c++)
            v = v * 10 + (u64)(*c - '0');
        return v;
    }
    return fallback;
}

/* ---- ucall and exit ------------------------------------------------------------------------ */

void ucall(u32 cmd, const char *file, u32 line, u64 a0, u64 a1, u64 a2, u64 a3, const char *fmt, ...)
{
    struct ucall uc;
    memset(&uc, 0, sizeof(uc));
    uc.cmd = cmd;
    uc.line = line;
    uc.args[0] = a0;
    uc.args[1] = a1;
    uc.args[2] = a2;
    uc.args[3] = a3;
    size_t n = ws_strlen(file);
    const char *base = file;
    for (size_t i = 0; i < n; i++)
        if (file[i] == '/')
            base = file + i + 1;
    ws_snprintf(uc.file, sizeof(uc.file), "%s", base);
    __builtin_va_list ap;
    __builtin_va_start(ap, fmt);
    ws_vsnprintf(uc.text, sizeof(uc.text), fmt, ap);
    __builtin_va_end(ap);
    outl(UCALL_PORT, (u32)(uintptr_t)&uc);
    if (cmd == UCALL_DONE || cmd == UCALL_ABORT)
        for (;;)
            cpu_relax(); /* the VMX ends the machine; never run on */
}

void ws_exit(u32 status)
{
    outl(DEBUG_EXIT_PORT, status);
    for (;;)
        cpu_relax();
}
