/* A worker that prints a line every 20 ms. Three patches for it are refused, each for a
 * different reason (see README.md). BUILD changes the program, and so its build-id. */
#include <stdio.h>
#include <unistd.h>

#ifndef BUILD
#define BUILD 1
#endif

/* noipa: keep gcc from folding these tiny demo functions into their caller. */
__attribute__((noipa)) int feature_enabled(void) { return 0; }

__attribute__((noipa)) unsigned checksum(const char *s) {
    unsigned h = 5381;
    while (*s)
        h = h * 33 + (unsigned char)*s++;
    return h % 1000;
}

/* The main thread never leaves worker(): a patch replacing it can never find a safe moment. */
__attribute__((noipa)) void worker(void) {
    for (;;) {
        printf("build=%d feature=%d checksum=%u\n", BUILD, feature_enabled(), checksum("abc"));
        fflush(stdout);
        usleep(20000);
    }
}

int main(void) {
    worker();
    return 0;
}
