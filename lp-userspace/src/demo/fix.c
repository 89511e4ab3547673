/* The fix, compiled on its own as a relocatable object: 10% off. */
int apply_discount(int price) {
    if (price <= 0) return 0;
    return price - price / 10;
}
