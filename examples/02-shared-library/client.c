/* A process using libgreet.so: prints greeting() every 20 ms, forever. */
#include <stdio.h>
#include <unistd.h>

const char *greeting(void);

int main(void) {
    for (;;) {
        printf("%s\n", greeting());
        fflush(stdout);
        usleep(20000);
    }
}
