/* hello: the default guest. Prints a banner from ring 3 through the UART, then exits through the
 * debug-exit port with the status given as its first numeric argument (default 0). */
#include "ws.h"

static int hello(u64 status)
{
    u16 cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    ws_printf("Hello from a worldswitch guest: 64-bit long mode, ring %u, %lu MiB of RAM, %lu vCPU%s.\n",
              cs & 3, ws_ram_size >> 20, ws_vcpus, ws_vcpus == 1 ? "" : "s");
    ws_printf("Every character of this banner reached you through a world switch and the VMX's UART.\n");
    if (ws_args && ws_args[0])
        ws_printf("My arguments: %s\n", ws_args);
    return (int)status;
}

int main(const char *args)
{
    enter_user(hello, arg_number(0, 0), 0);
}
