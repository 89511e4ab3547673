/* The fix for server.c's price_cents(): 10% off from 10 items on. Compiled on its own
 * (gcc -c -fPIC) and packed against the running server's binary. */
#define UNIT_CENTS 250

long price_cents(long quantity) {
    long total = quantity * UNIT_CENTS;
    if (quantity >= 10)
        total -= total / 10;
    return total;
}
