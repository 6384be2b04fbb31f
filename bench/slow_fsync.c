// A slow disk for the benchmark: fsync/fdatasync of files whose path contains "journal"
// take SLOW_FSYNC_MS milliseconds longer, like a store box's SD card or eMMC. The daemon,
// the broker and the benchmark inherit it; only the journal is slowed:
//   gcc -shared -fPIC -O2 -o /tmp/slow_fsync.so bench/slow_fsync.c -ldl
//   LD_PRELOAD=/tmp/slow_fsync.so SLOW_FSYNC_MS=10 .venv/bin/python bench/run.py ...
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int delay_ms = -1;

static void slow(int fd) {
    if (delay_ms < 0) {
        const char *v = getenv("SLOW_FSYNC_MS");
        delay_ms = v ? atoi(v) : 0;
    }
    if (delay_ms <= 0) return;
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n <= 0) return;
    path[n] = 0;
    if (!strstr(path, "journal")) return;
    struct timespec ts = {delay_ms / 1000, (delay_ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

int fsync(int fd) {
    static int (*real)(int) = NULL;
    if (!real) real = dlsym(RTLD_NEXT, "fsync");
    slow(fd);
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int) = NULL;
    if (!real) real = dlsym(RTLD_NEXT, "fdatasync");
    slow(fd);
    return real(fd);
}
