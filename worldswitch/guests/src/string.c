/* string.c: memset and memcpy for the guests' runtime and the monitor alike; gcc may emit calls to
 * them for struct copies and initialisers even in freestanding code. One string instruction each:
 * where ring 0 is emulated, a loop would cost an emulated instruction per byte. */
#include "ws.h"

void *memset(void *dst, int c, size_t n)
{
    void *d = dst;
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return dst;
}

void *memcpy(void *dst, const void *src, size_t n)
{
    void *d = dst;
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(n) : : "memory");
    return dst;
}
