//! Review 11: a nonstop apply refused in its preparation leaves the target as it was. Since the
//! sync agent is started before the preparation (`switch::Early`, session 11), the trap area it
//! lives in is made there too — before the patch memory is placed. An apply that then finds no
//! place for it (every gap within reach of the module taken) answered with a one-line error,
//! but the area (a memfd mapping, `livepatch-trap...`) stayed in a process that was never
//! patched. (Only the area is looked at: the remote-call stub stays by design.)

mod common;
use common::*;

/// compute() called in a loop; before that, every gap within 2 GiB (and a little more) of the
/// executable is reserved (PROT_NONE): no room for patch memory within reach.
const TARGET: &str = r#"
#define _GNU_SOURCE
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
int __attribute__((noipa)) compute(int x) {
    int r = x + 1;
    if (x > 1000000) r = x * 5;
    return r;
}
static void fill_near_the_executable(void) {
    char exe[PATH_MAX] = "";
    if (readlink("/proc/self/exe", exe, sizeof exe - 1) < 0) return;
    unsigned long lo = ~0UL, hi = 0, from, to;
    char line[PATH_MAX + 128];
    FILE *f = fopen("/proc/self/maps", "r");
    while (fgets(line, sizeof line, f)) {
        unsigned long a, b;
        char path[PATH_MAX] = "";
        if (sscanf(line, "%lx-%lx %*s %*s %*s %*s %4095s", &a, &b, path) >= 2 && !strcmp(path, exe)) {
            if (a < lo) lo = a;
            if (b > hi) hi = b;
        }
    }
    fclose(f);
    from = lo - (2UL << 30) - (1UL << 24);
    to = hi + (2UL << 30) + (1UL << 24);
    for (int round = 0; round < 4; round++) {
        unsigned long cursor = from;
        f = fopen("/proc/self/maps", "r");
        while (fgets(line, sizeof line, f)) {
            unsigned long a, b;
            if (sscanf(line, "%lx-%lx", &a, &b) != 2) continue;
            if (a > cursor && cursor < to) {
                unsigned long end = a < to ? a : to;
                mmap((void *)cursor, end - cursor, PROT_NONE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED_NOREPLACE, -1, 0);
            }
            if (b > cursor) cursor = b;
        }
        fclose(f);
        if (cursor < to)
            mmap((void *)cursor, to - cursor, PROT_NONE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED_NOREPLACE, -1, 0);
    }
}
int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    fill_near_the_executable();
    printf("ready\n");
    for (;;) { printf("value=%d\n", compute(41)); usleep(20000); }
}
"#;

#[test]
fn review11_a_nonstop_apply_refused_for_want_of_room_leaves_no_area() {
    let dir = tempfile::tempdir().unwrap();
    let (exe, patch) = compute_target_and_patch(dir.path(), "target", TARGET, &[]);
    let target = Target::spawn(&exe, &[]);
    let pid = target.pid();
    target.expect_steady(2, |l| l == "value=42");
    let before = maps_of(&pid);
    let (_, err) = livepatch_err(&nonstop_apply(&pid, &patch));
    assert!(err.contains("no free address space"), "{err}");
    assert_no_trap_area_added(&pid, &before);
    target.expect_steady(2, |l| l == "value=42");
}
