/* The demo's long-running "service": it charges orders, and apply_discount() has a bug (it
 * takes 1% off instead of 10%). It prints one line every 200 ms. */
#include <stdio.h>
#include <time.h>
#include <unistd.h>

int __attribute__((noinline)) apply_discount(int price) {
    if (price <= 0) return 0;
    return price - price / 100; /* BUG: should be price / 10 */
}

/* Read from memory on every order (a real service gets its prices from somewhere). */
volatile int list_price = 200;

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct timespec ts = {0, 200 * 1000000L};
    printf("ready %d\n", getpid());
    for (int order = 1;; order++) {
        int price = list_price;
        printf("order %d: list price %d, charged %d\n", order, price, apply_discount(price));
        nanosleep(&ts, NULL);
    }
}
