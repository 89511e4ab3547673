/* A new worker(): refused while the main thread runs inside the old one (always). */
#include <stdio.h>
#include <unistd.h>

void worker(void) {
    for (;;) {
        puts("new worker");
        usleep(20000);
    }
}
