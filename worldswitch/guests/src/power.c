/* power: ends the machine the ways an OS does.
 *   off     ACPI S5: SLP_TYP 5 with SLP_EN to the FADT's PM1a control block (port 0x604)
 *   kbd     pulses the reset line through the i8042 (command 0xfe to port 0x64)
 *   acpi    writes the FADT's reset value (6) to the reset register (port 0xcf9)
 * from ring 3, after printing which. */
#include "ws.h"

#define PM1A_CNT 0x604
#define SLP_EN (1u << 13)
#define SLP_TYP_S5 (5u << 10)

static int power(u64 unused)
{
    if (arg_has("off")) {
        serial_puts("power: ACPI S5\n");
        outw(PM1A_CNT, SLP_TYP_S5 | SLP_EN);
    } else if (arg_has("kbd")) {
        serial_puts("power: i8042 reset\n");
        outb(0x64, 0xfe);
    } else if (arg_has("acpi")) {
        serial_puts("power: ACPI reset register\n");
        outb(0xcf9, 0x06);
    } else {
        GUEST_ASSERT(!"use off, kbd or acpi");
    }
    for (;;)
        cpu_relax();
    return 0;
}

int main(const char *args)
{
    enter_user(power, 0, 0);
}
