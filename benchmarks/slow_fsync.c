/* Make fsync and fdatasync slower, to run the durable benchmark as on a disk whose
 * fsync costs more than this machine's (~0.25 ms): a network or cloud volume, a disk
 * without a write cache. FSYNC_DELAY_US microseconds are added to every call (default
 * 2000). Build and use (see benchmarks/README.md):
 *
 *   gcc -shared -fPIC -O2 -o /tmp/slow_fsync.so benchmarks/slow_fsync.c -ldl
 *   FSYNC_DELAY_US=1000 LD_PRELOAD=/tmp/slow_fsync.so python benchmarks/compare_durable.py
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <time.h>

static void delay(void) {
    const char *text = getenv("FSYNC_DELAY_US");
    long us = text ? atol(text) : 2000;
    struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
    nanosleep(&ts, NULL);
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    delay();
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    delay();
    return real(fd);
}
