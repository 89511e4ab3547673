/* A fix for checksum(), packed against build 1 of app.c. */
unsigned checksum(const char *s) {
    unsigned h = 5381;
    while (*s)
        h = (h << 5) + h + (unsigned char)*s++;
    return h % 997;
}
