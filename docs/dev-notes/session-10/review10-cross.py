import os, sys
# Review 10, N1 (cross-build): run in a directory with ./hot (see review10_drive.py users) and p.lp; argv: first second point (old|new).
import sys; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__))); from review10_drive import *
OLD="/tmp/rv/lp-old"
first, second, point = sys.argv[1], sys.argv[2], sys.argv[3]
B = {"old": OLD, "new": LP}
tg = spawn(["./hot","2","hr"]); pid=str(tg.pid)
env = dict(os.environ, LIVEPATCH_DEBUG_STOP=point)
t = subprocess.Popen([B[first],"apply",pid,"p.lp","--mode","nonstop","--timeout","5"], stderr=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
print("first:", t.stderr.readline().decode().strip())
time.sleep(0.2); t.kill(); t.wait()
time.sleep(0.3); print("alive", tg.poll() is None, last(1))
for a in (["apply",pid,"p.lp","--mode","nonstop"], ["revert",pid,"--mode","nonstop"], ["apply",pid,"p.lp","--mode","nonstop"]):
    r = subprocess.run([B[second]]+a, capture_output=True, text=True); print(second, a[0], "rc", r.returncode, r.stdout.strip().splitlines()[:1], r.stderr.strip())
    time.sleep(0.5); print("alive", tg.poll() is None, last(1))
print([l.split()[-2] for l in open(f"/proc/{pid}/maps") if 'livepatch-trap' in l])
tg.kill()
