#!/usr/bin/env python3
"""Review session 9, C1. Build first (in $R9_DIR, default /tmp/r9):
  gcc -O2 -g -Wl,--build-id -I lp-userspace/tests/fixtures/proc review9-manythreads.c -o manythreads -pthread
  gcc -O2 review9-nocourtesy.c -o nocourtesy
  gcc -O2 -c -fPIC lp-userspace/tests/fixtures/proc/new_compute.c -o new.o
  livepatch pack --target $R9_DIR/manythreads --object new.o -o $R9_DIR/p.lp
then, as root, under the bench lock: flock /tmp/lp-bench.lock python3 review9-courtesy-stops.py 6 0
(LP= the livepatch binary to measure.)

Per-thread ptrace-stopped time ('t') of a target during nonstop reverts (and applies), the
tool with its courtesy (nice 19) vs without (setpriority refused by nocourtesy), with CPU hogs
running beside (other processes on the machine). Usage: stops.py ROUNDS HOGS"""
import os, re, subprocess, sys, time, statistics
LP = os.environ.get("LP", "/work/target-review9/debug/livepatch")
D = os.environ.get("R9_DIR", "/tmp/r9")  # holds manythreads, nocourtesy and p.lp (see the header)
T = "/sys/kernel/tracing/instances/review9"
rounds, hogs_n = int(sys.argv[1]), int(sys.argv[2])
os.makedirs(T, exist_ok=True)
def w(p, v):
    with open(f"{T}/{p}", "w") as f: f.write(v)
w("buffer_size_kb", "8192")
w("events/sched/sched_switch/enable", "1")
hogs = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(hogs_n)]
tgt = subprocess.Popen([f"{D}/manythreads", "4"], stdout=subprocess.PIPE, text=True)
tgt.stdout.readline()
pid = tgt.pid
tids = {int(x) for x in os.listdir(f"/proc/{pid}/task")}
pat = re.compile(r"\s(\d+\.\d+): sched_switch: .*prev_pid=(\d+) .*prev_state=(\S+) ==> .*next_pid=(\d+)")
def stopped(text):
    start, tot = {}, {}
    for l in text.splitlines():
        m = pat.search(l)
        if not m: continue
        ts, prev, st, nxt = float(m[1]), int(m[2]), m[3], int(m[4])
        if prev in tids and "t" in st: start[prev] = ts
        if nxt in tids and nxt in start:
            tot[nxt] = tot.get(nxt, 0) + ts - start.pop(nxt)
    return tot
res = {"courtesy": [], "nocourtesy": []}
app = {"courtesy": [], "nocourtesy": []}
def run(variant, args):
    cmd = ([f"{D}/nocourtesy"] if variant == "nocourtesy" else []) + [LP] + args
    t = time.time(); r = subprocess.run(cmd, capture_output=True, text=True); return r, time.time() - t
for i in range(rounds):
    for variant in (["courtesy", "nocourtesy"] if i % 2 == 0 else ["nocourtesy", "courtesy"]):
        w("trace", "")
        r, awall = run(variant, ["apply", str(pid), f"{D}/p.lp", "--mode", "nonstop", "--timeout", "60"])
        assert r.returncode == 0, r.stderr
        atot = stopped(open(f"{T}/trace").read())
        app[variant].append((awall * 1e3, max(atot.values()) * 1e6 if atot else 0))
        time.sleep(0.1)
        w("trace", "")
        r, wall = run(variant, ["revert", str(pid), "--mode", "nonstop", "--timeout", "60"])
        assert r.returncode == 0, r.stderr
        tot = stopped(open(f"{T}/trace").read())
        per = sorted(v * 1e6 for k, v in tot.items() if k != pid)  # the workers (main: borrowed)
        res[variant].append((wall * 1e3, max(per) if per else 0, statistics.median(per) if per else 0, tot.get(pid, 0) * 1e6))
for h in hogs: h.kill()
tgt.kill()
w("events/sched/sched_switch/enable", "0")
for v, rows in res.items():
    print(v, "revert wall ms median %.1f; idle threads' ptrace-stopped time per revert (us): max-of-threads median %.0f, max %.0f; thread median-of-medians %.0f; main thread median %.0f" % (
        statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows), max(r[1] for r in rows),
        statistics.median(r[2] for r in rows), statistics.median(r[3] for r in rows)))
    print("   ", [("%.0fms" % r[0], "%.0fus" % r[1]) for r in rows])
for v, rows in app.items():
    print(v, "apply wall ms median %.1f; longest ptrace-stopped thread (the borrowed one) median %.0f us, max %.0f us" % (statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows), max(r[1] for r in rows)))
