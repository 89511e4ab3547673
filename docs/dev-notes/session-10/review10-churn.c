#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
int __attribute__((noipa)) compute(int x) { int r = x + 1; if (x > 1000000) r = x * 5; return r; }
static volatile long n;
static void *relay(void *arg) {
    long id = (long)arg;
    for (int i = 0; i < 20; i++) { volatile int v = compute(41); (void)v; usleep(100); }
    if (++n % 500 == 0) printf("value=%d relays=%ld\n", compute(41), n);
    pthread_t t; pthread_attr_t a; pthread_attr_init(&a); pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
    pthread_create(&t, &a, relay, (void *)id);
    return NULL;
}
int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    pthread_t t; pthread_attr_t a; pthread_attr_init(&a); pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
    for (long i = 0; i < 3; i++) pthread_create(&t, &a, relay, (void *)i);
    printf("ready %d\n", getpid());
    pthread_exit(0);
}
