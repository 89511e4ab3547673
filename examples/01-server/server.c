/* A tiny pricing server on the loopback interface. A client sends a quantity per line; the
 * server answers "total=<cents>". The bug: bulk orders (10 items or more) should get 10% off,
 * and price_cents() forgot. The fix (fix.c) is applied while the server runs and while a client
 * stays connected: no restart, no dropped connection.
 *
 * Prints "listening on <port>" once ready (port 0 = the kernel picks one). */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define UNIT_CENTS 250

/* noinline: a function this small would be inlined into its caller at -O2, and an inlined
 * copy cannot be replaced at its entry. Real services have real-sized functions. */
__attribute__((noinline)) long price_cents(long quantity) {
    return quantity * UNIT_CENTS;
}

static void serve(int fd) {
    FILE *in = fdopen(dup(fd), "r");
    FILE *out = fdopen(fd, "w");
    char line[64];
    while (in && out && fgets(line, sizeof line, in)) {
        long quantity = strtol(line, NULL, 10);
        fprintf(out, "total=%ld\n", price_cents(quantity));
        fflush(out);
    }
    if (in) fclose(in);
    if (out) fclose(out);
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 0;
    int s = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK); /* loopback only */
    if (bind(s, (struct sockaddr *)&addr, sizeof addr) || listen(s, 8)) {
        perror("server");
        return 1;
    }
    socklen_t len = sizeof addr;
    getsockname(s, (struct sockaddr *)&addr, &len);
    printf("listening on %d\n", ntohs(addr.sin_port));
    fflush(stdout);
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c >= 0) serve(c);
    }
}
