/* A shop's price display: prints the sale price of a 10.00 item every 20 ms.
 * sale_price() gets two patches stacked on it. */
#include <stdio.h>
#include <unistd.h>

int discount_percent = 0;   /* no sale (yet) */

/* noipa: in a demo this small, gcc would otherwise compute the price once, outside the loop. */
__attribute__((noipa)) long sale_price(long cents) {
    long price = cents * (100 - discount_percent) / 100;
    return price - price % 5;            /* round down to 5 cents */
}

int main(void) {
    for (;;) {
        printf("price=%ld\n", sale_price(1000));
        fflush(stdout);
        usleep(20000);
    }
}
