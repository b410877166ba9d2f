/* paging: what a kernel does with its page tables, checked from the inside; every host (and the
 * monitor's shadow page tables, docs/monitor.md) must give the same answers.
 *   dirty       writes to a 2 MiB page it had not touched: DONE(accessed and dirty bits before, after
 *               a read, after a write)
 *   cr3         builds a second set of tables in which 1 GiB maps the 2 MiB at 32 MiB, loads it, and
 *               reads and writes through both names: DONE(checks passed, value read through the alias)
 *   supervisor  makes a 2 MiB page supervisor-only, uses it in ring 0, then reads it from ring 3: the
 *               runtime reports the #PF (error code 5: present, user); with `sgdt`, ring 3 stores
 *               its GDTR there instead (error code 7: present, write, user)
 *   many        maps the second and third GiB with 4 KiB pages, all 1,024 of their 2 MiB through one
 *               page table, and reads a word in each: DONE(words read as written); a shadow needs
 *               1,024 tables, more than the monitor's pool holds (576)
 *   wide        the same tables, read in every 4 KiB page of 9 of those 2 MiB: DONE(4608, words read
 *               as written)
 *   reload      remaps a 2 MiB page it has used and loads CR3 with the same tables (no INVLPG): the
 *               load must make the new mapping seen; then clears the entry's accessed bit, loads
 *               CR3 again and reads: the bit must be set again. DONE(word before, word after,
 *               accessed bit after the second load)
 *   global      remaps a 2 MiB page it has used, its entry global, and turns CR4.PGE off and on
 *               again (no INVLPG, no CR3 load), as Linux flushes its kernel's global mappings for a
 *               range too large for INVLPGs: the new mapping must be seen. DONE(word before, word
 *               after, CR4.PGE at the end, CR4.PGE at the start)
 *   high        maps a 2 MiB page also at 0xffffffff80000000 (PML4 slot 511, where Linux keeps its
 *               kernel image), writes through each name and reads through the other: DONE(word
 *               read high, word read low)
 *   spaces      alternates CR3 between its tables and a second PML4 that shares their lower levels,
 *               remapping a 2 MiB page before each load: each load must show the mapping made in
 *               the other address space. DONE(loads that read the right word, of 8)
 *   shared      a 2 MiB page at HIGH_ALIAS in two address spaces that share PML4 slot 511, remapped
 *               in one before each load of the other (not global, no INVLPG), then global, read in
 *               the first, remapped and invalidated in a third and read in the first again:
 *               DONE(loads that read the right word, of 8; the word before; the word after)
 *   rotate      loads CR3 with 8 sets of tables in turn (its own and 7 PML4s sharing their lower
 *               levels: 8 processes), 4 rounds, reading a word after each load: DONE(loads that read
 *               it, of 32); the monitor keeps a shadow for each (16 address spaces)
 *   switch [N] [P] [two]  loads CR3 N times (default 200) in ring 0, as a kernel's context switch
 *               does, and reads a word in each of P (up to 8, default 8) 2 MiB pages after each
 *               load, between SYNC and DONE (the bench's "cr3"); with `two`, alternately its tables
 *               and a second PML4 sharing their lower levels (two processes): DONE(N, the sum) */
#include "ws.h"

#define ADDRESS_BITS 0x000ffffffffff000ul
#define PTE_ACCESSED 0x20ul
#define PTE_DIRTY 0x40ul
#define TEST_PAGE 0x02000000ul /* 32 MiB: a 2 MiB page of the identity map nothing else uses */
#define ALIAS 0x40000000ul     /* 1 GiB */

static u64 read_cr3(void)
{
    u64 cr3;
    __asm__ volatile("mov %%cr3, %0" : "=r"(cr3));
    return cr3;
}

static u64 bits(u64 entry)
{
    return entry & (PTE_ACCESSED | PTE_DIRTY);
}

static void dirty(void)
{
    volatile u64 *entry = identity_pde(TEST_PAGE); /* the CPU (or the monitor) changes it behind the compiler */
    *entry &= ~(PTE_ACCESSED | PTE_DIRTY);
    __asm__ volatile("invlpg (%0)" : : "r"(TEST_PAGE) : "memory");
    u64 before = bits(*entry);
    (void)*(volatile u64 *)(TEST_PAGE + 64);
    u64 after_read = bits(*entry);
    *(volatile u64 *)(TEST_PAGE + 64) = 42;
    u64 after_write = bits(*entry);
    GUEST_DONE(before, after_read, after_write, 0);
}

static u64 tables[3][512] __attribute__((aligned(4096)));

static void second_tables(void)
{
    u64 passed = 0, old = read_cr3();
    u64 *pml4 = (u64 *)(old & ADDRESS_BITS), *pdpt = (u64 *)(pml4[0] & ADDRESS_BITS);
    memcpy(tables[0], pml4, 4096);
    memcpy(tables[1], pdpt, 4096);
    memset(tables[2], 0, 4096);
    tables[0][0] = (u64)tables[1] | 7;
    tables[1][1] = (u64)tables[2] | 7;                   /* the second GiB: one page in it */
    tables[2][0] = TEST_PAGE | 0x87;                      /* 1 GiB -> 32 MiB, 2 MiB, user, writable */
    *(volatile u64 *)TEST_PAGE = 0x5eed;
    __asm__ volatile("mov %0, %%cr3" : : "r"((u64)tables[0]) : "memory");
    GUEST_ASSERT_EQ(read_cr3(), (u64)tables[0]);
    u64 seen = *(volatile u64 *)ALIAS;
    GUEST_ASSERT_EQ(seen, 0x5eed);
    passed++;
    *(volatile u64 *)(ALIAS + 8) = 0xa11a5;
    GUEST_ASSERT_EQ(*(volatile u64 *)(TEST_PAGE + 8), 0xa11a5);
    passed++;
    tables[2][0] = (TEST_PAGE + (2ul << 20)) | 0x87;      /* remapped: stale until INVLPG */
    __asm__ volatile("invlpg (%0)" : : "r"(ALIAS) : "memory");
    *(volatile u64 *)(TEST_PAGE + (2ul << 20)) = 0xbeef;
    GUEST_ASSERT_EQ(*(volatile u64 *)ALIAS, 0xbeef);
    passed++;
    __asm__ volatile("mov %0, %%cr3" : : "r"(old) : "memory");
    GUEST_ASSERT_EQ(read_cr3(), old);
    passed++;
    GUEST_DONE(passed, seen, 0, 0);
}

static u64 small[2][512] __attribute__((aligned(4096))); /* a page directory, and one page table */

#define ALIAS_GIB 2 /* the second and third GiB, unused by the identity map of the program's RAM */

/* The second and third GiB: every 2 MiB of them through one page table of 4 KiB pages over the test
 * page, whose words read 1000 + their page's index. */
static void map_alias(void)
{
    u64 *pml4 = (u64 *)(read_cr3() & ADDRESS_BITS), *pdpt = (u64 *)(pml4[0] & ADDRESS_BITS);
    for (int i = 0; i < 512; i++) {
        small[1][i] = (TEST_PAGE + i * 4096ul) | 7; /* 4 KiB pages over the test page */
        small[0][i] = (u64)small[1] | 7;            /* every 2 MiB through the same table */
        *(volatile u64 *)(TEST_PAGE + i * 4096ul) = 1000 + i;
    }
    for (int gib = 1; gib <= ALIAS_GIB; gib++)
        pdpt[gib] = (u64)small[0] | 7;
    __asm__ volatile("mov %0, %%cr3" : : "r"(read_cr3()) : "memory");
}

static void many(void)
{
    map_alias();
    u64 right = 0;
    for (u64 i = 0; i < ALIAS_GIB * 512; i++) /* 2 MiB apart, and one 4 KiB page further each time */
        right += *(volatile u64 *)(ALIAS + (i << 21) + (i % 512) * 4096ul) == 1000 + i % 512;
    GUEST_DONE(right, 0, 0, 0);
}

#define WIDE_TABLES 9 /* 4,608 pages: more than the monitor keeps records of fills for (4,096) */

static void wide(void)
{
    map_alias();
    u64 right = 0;
    for (u64 i = 0; i < WIDE_TABLES; i++)
        for (u64 page = 0; page < 512; page++)
            right += *(volatile u64 *)(ALIAS + (i << 21) + page * 4096ul) == 1000 + page;
    GUEST_DONE(right, 0, 0, 0);
}

static void reload(void)
{
    u64 *entry = identity_pde(TEST_PAGE), original = *entry;
    volatile u64 *word = (volatile u64 *)TEST_PAGE;
    *word = 0x1111;
    *(volatile u64 *)(TEST_PAGE + (2ul << 20)) = 0x2222;
    u64 before = *word;
    *entry = (original & ~ADDRESS_BITS) | (TEST_PAGE + (2ul << 20)); /* the next 2 MiB instead */
    __asm__ volatile("mov %0, %%cr3" : : "r"(read_cr3()) : "memory");
    u64 after = *word;
    *entry &= ~PTE_ACCESSED;
    __asm__ volatile("mov %0, %%cr3" : : "r"(read_cr3()) : "memory");
    (void)*word;
    u64 accessed = *(volatile u64 *)entry & PTE_ACCESSED; /* set by the walk, behind the compiler's back */
    *entry = original;
    __asm__ volatile("invlpg (%0)" : : "r"(TEST_PAGE) : "memory");
    GUEST_DONE(before, after, accessed, 0);
}

#define PTE_GLOBAL 0x100ul
#define CR4_PGE 0x80ul

static void global_flush(void)
{
    u64 cr4, *entry = identity_pde(TEST_PAGE), original = *entry;
    __asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
    u64 at_start = (cr4 & CR4_PGE) != 0;
    cr4 |= CR4_PGE;
    __asm__ volatile("mov %0, %%cr4" : : "r"(cr4) : "memory");
    volatile u64 *word = (volatile u64 *)TEST_PAGE;
    *word = 0x1111;
    *(volatile u64 *)(TEST_PAGE + (2ul << 20)) = 0x2222;
    u64 before = *word;
    *entry = (original & ~ADDRESS_BITS) | (TEST_PAGE + (2ul << 20)) | PTE_GLOBAL; /* the next 2 MiB instead */
    __asm__ volatile("mov %0, %%cr4" : : "r"(cr4 & ~CR4_PGE) : "memory");
    __asm__ volatile("mov %0, %%cr4" : : "r"(cr4) : "memory");
    u64 after = *word;
    *entry = original;
    __asm__ volatile("invlpg (%0)" : : "r"(TEST_PAGE) : "memory");
    __asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
    GUEST_DONE(before, after, (cr4 & CR4_PGE) != 0, at_start);
}

#define HIGH_ALIAS 0xffffffff80000000ul
static u64 high_pdpt[512] __attribute__((aligned(4096))), high_pd[512] __attribute__((aligned(4096)));

static void high(void)
{
    u64 *pml4 = (u64 *)(read_cr3() & ADDRESS_BITS);
    high_pd[(HIGH_ALIAS >> 21) & 511] = TEST_PAGE | 0x83; /* present, writable, 2 MiB */
    high_pdpt[(HIGH_ALIAS >> 30) & 511] = (u64)high_pd | 3;
    pml4[511] = (u64)high_pdpt | 3;
    __asm__ volatile("mov %0, %%cr3" : : "r"(read_cr3()) : "memory");
    volatile u64 *low = (volatile u64 *)TEST_PAGE, *alias = (volatile u64 *)HIGH_ALIAS;
    *low = 0x10;
    u64 read_high = *alias;
    *alias = 0x20;
    GUEST_DONE(read_high, *low, 0, 0);
}

static u64 second_pml4[512] __attribute__((aligned(4096)));

/* A second address space: a PML4 that shares the current one's lower tables, as two processes share
 * their kernel's. Its CR3. */
static u64 second_space(void)
{
    const u64 *pml4 = (const u64 *)(read_cr3() & ADDRESS_BITS);
    for (int i = 0; i < 512; i++)
        second_pml4[i] = pml4[i];
    return (u64)second_pml4;
}

/* 8 loads of CR3, alternately tables[1] and tables[0], each after `entry` (with `flags`) is made to
 * map TEST_PAGE or the 2 MiB after it, which hold 0x1111 and 0x2222, in the space loaded before: how
 * many loads read the new word through `word`. */
static u64 remap_before_loads(volatile u64 *entry, u64 flags, const u64 tables[2], volatile u64 *word)
{
    u64 right = 0;
    *(volatile u64 *)TEST_PAGE = 0x1111;
    *(volatile u64 *)(TEST_PAGE + (2ul << 20)) = 0x2222;
    for (u64 i = 0; i < 8; i++) {
        *entry = flags | (TEST_PAGE + (i % 2) * (2ul << 20)); /* in this space; seen in both */
        __asm__ volatile("mov %0, %%cr3" : : "r"(tables[(i + 1) % 2]) : "memory");
        right += *word == (i % 2 ? 0x2222ul : 0x1111ul);
    }
    return right;
}

static void two_spaces(void)
{
    u64 first = read_cr3();
    u64 tables[2] = { first, second_space() }, *entry = identity_pde(TEST_PAGE), original = *entry;
    u64 right = remap_before_loads(entry, original & ~ADDRESS_BITS, tables, (volatile u64 *)TEST_PAGE);
    __asm__ volatile("mov %0, %%cr3" : : "r"(first) : "memory");
    *entry = original;
    __asm__ volatile("invlpg (%0)" : : "r"(TEST_PAGE) : "memory");
    GUEST_DONE(right, 0, 0, 0);
}

static u64 third_pml4[512] __attribute__((aligned(4096)));

/* The kernel's half shared by two address spaces, as Linux's processes share it (the monitor shares
 * its shadow there too): a 2 MiB page at HIGH_ALIAS remapped in one space before each load of the
 * other, not global and with no INVLPG: each load must show it. Then global: read in the first
 * space, remapped and invalidated in a third, which has not used it, and read in the first again:
 * the INVLPG must have taken the first space's translation too. */
static void shared_half(void)
{
    u64 first = read_cr3(), *pml4 = (u64 *)(first & ADDRESS_BITS), cr4;
    __asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
    __asm__ volatile("mov %0, %%cr4" : : "r"(cr4 | CR4_PGE) : "memory");
    volatile u64 *pde = &high_pd[(HIGH_ALIAS >> 21) & 511], *word = (volatile u64 *)HIGH_ALIAS;
    *pde = TEST_PAGE | 0x83;
    high_pdpt[(HIGH_ALIAS >> 30) & 511] = (u64)high_pd | 3;
    pml4[511] = (u64)high_pdpt | 3;
    u64 tables[2] = { first, second_space() };
    __asm__ volatile("mov %0, %%cr3" : : "r"(first) : "memory");
    u64 right = remap_before_loads(pde, 0x83, tables, word);
    __asm__ volatile("mov %0, %%cr3" : : "r"(first) : "memory");
    *pde = TEST_PAGE | 0x83 | PTE_GLOBAL;
    __asm__ volatile("invlpg (%0)" : : "r"(HIGH_ALIAS) : "memory");
    u64 before = *word;
    memcpy(third_pml4, pml4, sizeof third_pml4); /* a third space, which has not used the page */
    __asm__ volatile("mov %0, %%cr3" : : "r"((u64)third_pml4) : "memory");
    *pde = (TEST_PAGE + (2ul << 20)) | 0x83 | PTE_GLOBAL;
    __asm__ volatile("invlpg (%0)" : : "r"(HIGH_ALIAS) : "memory");
    __asm__ volatile("mov %0, %%cr3" : : "r"(first) : "memory");
    u64 after = *word;
    pml4[511] = 0;
    __asm__ volatile("mov %0, %%cr4" : : "r"(cr4) : "memory"); /* as it was: every global translation goes */
    __asm__ volatile("mov %0, %%cr3" : : "r"(first) : "memory");
    GUEST_DONE(right, before, after, 0);
}

#define ROTATE_SPACES 8
#define ROTATE_ROUNDS 4
static u64 rotate_pml4[ROTATE_SPACES - 1][512] __attribute__((aligned(4096)));

static void rotate(void)
{
    u64 first = read_cr3(), right = 0, tables[ROTATE_SPACES] = { first };
    for (int k = 1; k < ROTATE_SPACES; k++) {
        memcpy(rotate_pml4[k - 1], (const u64 *)(first & ADDRESS_BITS), 4096);
        tables[k] = (u64)rotate_pml4[k - 1];
    }
    *(volatile u64 *)TEST_PAGE = 0x707;
    for (int round = 0; round < ROTATE_ROUNDS; round++)
        for (int k = 0; k < ROTATE_SPACES; k++) {
            __asm__ volatile("mov %0, %%cr3" : : "r"(tables[k]) : "memory");
            right += *(volatile u64 *)TEST_PAGE == 0x707;
        }
    __asm__ volatile("mov %0, %%cr3" : : "r"(first) : "memory");
    GUEST_DONE(right, 0, 0, 0);
}

#define SWITCH_PAGES 8
#define WORKING_SET 0x04000000ul /* 64 MiB: 8 2 MiB pages of the identity map nothing else uses */

static void switches(u64 n, u64 pages, int two)
{
    u64 cr3 = read_cr3(), sum = 0;
    u64 tables[2] = { cr3, two ? second_space() : cr3 };
    GUEST_SYNC(0, n);
    for (u64 i = 0; i < n; i++) {
        __asm__ volatile("mov %0, %%cr3" : : "r"(tables[i % 2]) : "memory");
        for (u64 page = 0; page < pages; page++)
            sum += *(volatile u64 *)(WORKING_SET + ((page % SWITCH_PAGES) << 21));
    }
    GUEST_DONE(n, sum, 0, 0);
}

static int read_from_user(u64 address)
{
    if (arg_has("sgdt"))
        __asm__ volatile("sgdt (%0)" : : "r"(address) : "memory"); /* faults: a store, from user mode */
    GUEST_DONE(*(volatile u64 *)address, 0, 0, 0); /* never: the read faults */
    return 0;
}

static void supervisor(void)
{
    u64 *entry = identity_pde(TEST_PAGE);
    *entry &= ~4ul; /* U/S */
    __asm__ volatile("invlpg (%0)" : : "r"(TEST_PAGE) : "memory");
    *(volatile u64 *)TEST_PAGE = 7; /* ring 0 may */
    GUEST_ASSERT_EQ(*(volatile u64 *)TEST_PAGE, 7);
    enter_user(read_from_user, TEST_PAGE, 0);
}

static void switch_mode(void)
{
    switches(arg_number(0, 200), arg_number(1, SWITCH_PAGES), arg_has("two"));
}

static const struct {
    const char *name;
    void (*run)(void); /* reports DONE, or the runtime reports its fault */
} modes[] = {
    { "dirty", dirty }, { "cr3", second_tables }, { "supervisor", supervisor }, { "many", many },
    { "wide", wide }, { "reload", reload }, { "spaces", two_spaces }, { "high", high }, { "global", global_flush },
    { "switch", switch_mode }, { "rotate", rotate }, { "shared", shared_half },
};

int main(const char *args)
{
    for (u64 i = 0; i < sizeof(modes) / sizeof(modes[0]); i++)
        if (arg_has(modes[i].name))
            modes[i].run();
    GUEST_ASSERT(!"unknown mode: see the modes at the top of paging.c");
    return 1;
}
