/* review7_orphan_program's STOPPER, with a main thread that exits (pthread_exit) once the
 * test's apply has started its programs, before the watcher stops the process. */
#include "agent_watched.h"
#include <sys/stat.h>
static volatile int exit_main;
static int main_exited(void) {
    char p[64], buf[512]; snprintf(p, sizeof p, "/proc/self/task/%d/stat", getpid());
    FILE *f = fopen(p, "r"); if (!f) return 1;
    size_t n = fread(buf, 1, sizeof buf - 1, f); fclose(f); buf[n] = 0;
    char *c = strrchr(buf, ')'); return c && (c[2] == 'Z' || c[2] == 'X');
}
static void *watcher(void *arg) {
    (void)arg;
    volatile uint32_t *w = watch_agent_page();
    if (!w) return NULL;
    uint32_t seen = w[0];
    int armed = 0, reverted = 0;
    for (;;) {
        syscall(SYS_futex, (uint32_t *)&w[0], FUTEX_WAIT, seen, NULL, NULL, 0);
        uint32_t req = w[0];
        if (req == seen) continue;
        seen = req;
        if (w[2] == 3) {
            uint32_t n = w[212 / 4];
            if (armed) {
                exit_main = 1;
                while (!main_exited()) usleep(200);
                printf("main exited; stopping with a program of %u operations requested\n", n);
                syscall(SYS_tgkill, getpid(), w[16 / 4], SIGSTOP);
                armed = 0;
                continue;
            }
            if (the_tests_apply(w, &reverted)) armed = 1;
        }
        syscall(SYS_futex, (uint32_t *)&w[0], FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
    }
    return NULL;
}
int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    int n = argc > 1 ? atoi(argv[1]) : 4;
    pthread_t t;
    pthread_create(&t, NULL, watcher, NULL);
    for (long i = 0; i < n; i++) pthread_create(&t, NULL, worker, (void *)i);
    printf("ready %d\n", getpid());
    while (!exit_main) usleep(1000);
    pthread_exit(0);
}
