/* Patch B, stacked on A: 10% off for the holidays. Reverting B brings A's 5% back. */
extern int discount_percent;

long sale_price(long cents) {
    long price = cents * (100 - discount_percent - 10) / 100;
    return price - price % 5;
}
