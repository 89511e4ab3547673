/* A shared library used by several processes. The bug: a typo in the greeting. */
const char *greeting(void) { return "helo, world"; }
