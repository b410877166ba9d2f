/*
 * hostread.c: the physical limit for the virtio-blk benchmark. The host reads the same image the
 * guest reads, with the same pattern (the vblk guest's LCG for random offsets), one 4 KiB pread
 * at a time.   hostread FILE seq|rand N   ->   {"reads": N, "ns": T}
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 4)
        return 2;
    int fd = open(argv[1], O_RDONLY);
    if (fd < 0)
        return 1;
    struct stat st;
    fstat(fd, &st);
    uint64_t blocks = st.st_size / 4096, n = strtoull(argv[3], NULL, 10), seed = 12345;
    int random = strcmp(argv[2], "rand") == 0;
    static char buffer[4096];
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (uint64_t i = 0; i < n; i++) {
        uint64_t block;
        if (random) {
            seed = seed * 6364136223846793005ull + 1442695040888963407ull;
            block = (seed >> 33) % blocks;
        } else {
            block = i % blocks;
        }
        if (pread(fd, buffer, 4096, (off_t)(block * 4096)) != 4096)
            return 1;
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("{\"reads\": %llu, \"ns\": %llu}\n", (unsigned long long)n,
           (unsigned long long)((b.tv_sec - a.tv_sec) * 1000000000ull + (b.tv_nsec - a.tv_nsec)));
    return 0;
}
