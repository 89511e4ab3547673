#include "compute_loop.h"
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void *idle(void *a) { (void)a; for (;;) pause(); return NULL; }
static volatile int started;
static long ns(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1000000000L + t.tv_nsec; }
static void *blocker(void *a) {
    (void)a;
    sigset_t s; sigemptyset(&s); sigaddset(&s, SIGTRAP);
    pthread_sigmask(SIG_BLOCK, &s, NULL);
    started = 1;
    struct timespec nap = {0, 200000};
    unsigned acc = 0;
    long last = ns();
    for (;;) {
        for (int i = 0; i < 1000; i++) acc += compute(41);
        if (ns() - last > 20000000L) { char b[64]; int l = snprintf(b, sizeof b, "blocker=%d\n", compute(41)); if (write(1, b, l) != l) exit(3); last = ns(); }
        nanosleep(&nap, NULL);
    }
    return NULL;
}
int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    int n = atoi(argv[1]);
    pthread_attr_t at; pthread_attr_init(&at); pthread_attr_setstacksize(&at, 64 * 1024);
    pthread_t t;
    for (int i = 0; i < n; i++) if (pthread_create(&t, &at, idle, NULL)) { perror("pthread_create"); return 2; }
    if (argc > 2 && !strcmp(argv[2], "blocker")) { pthread_create(&t, &at, blocker, NULL); while (!started) usleep(1000); }
    printf("ready %d\n", getpid());
    print_compute_forever("v");
}
