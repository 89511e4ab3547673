/* Patch A: 5% off everything, on top of the configured discount. The new code reads the
 * running program's own variable `discount_percent`. */
extern int discount_percent;

long sale_price(long cents) {
    long price = cents * (100 - discount_percent - 5) / 100;
    return price - price % 5;
}
