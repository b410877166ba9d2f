/* echo: reads the UART with interrupts (IRQ 4 through the in-kernel 8259 PIC) and echoes each
 * line back in upper case, until it reads the line "quit". Reports DONE(lines echoed). */
#include "ws.h"

#define PIC_BASE 0x20
#define RING 256

static volatile char ring[RING];
static volatile u32 head, tail;

static void on_uart(struct trap_frame *frame)
{
    while (inb(COM1 + 5) & 0x01) /* LSR.DR */
        ring[head++ % RING] = inb(COM1);
    pic_eoi(COM1_IRQ);
}

static void on_spurious(struct trap_frame *frame)
{
}

static int echo(u64 unused)
{
    char line[80];
    u32 len = 0;
    u64 lines = 0;
    serial_puts("echo: type a line ('quit' ends)\n");
    for (int done = 0; !done;) {
        while (tail == head)
            cpu_relax();
        char c = ring[tail++ % RING];
        if (c == '\r' || c == '\n') {
            line[len] = 0;
            serial_puts("\n");
            if (str_eq(line, "quit"))
                done = 1;
            else if (len)
                lines++;
            len = 0;
            continue;
        }
        if (len < sizeof(line) - 1)
            line[len++] = c;
        serial_putc(c >= 'a' && c <= 'z' ? c - 32 : c);
    }
    GUEST_DONE(lines, 0, 0, 0);
    return 0;
}

int main(const char *args)
{
    set_trap_handler(PIC_BASE + COM1_IRQ, on_uart);
    set_trap_handler(PIC_BASE + 7, on_spurious);
    pic_init(PIC_BASE);
    pic_unmask(COM1_IRQ);
    outb(COM1 + 2, 0x07); /* FCR: FIFOs on and cleared, trigger at 1 byte */
    outb(COM1 + 4, 0x0b); /* MCR: DTR, RTS, OUT2 */
    outb(COM1 + 1, 0x01); /* IER: received data available */
    enter_user(echo, 0, USER_INTERRUPTS);
}
