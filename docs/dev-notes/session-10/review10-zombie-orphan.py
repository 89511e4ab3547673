import os, sys
import sys, struct; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__))); from review10_drive import *
BIN = sys.argv[1]  # the livepatch binary; run in a directory holding zstop (review10-zombie-orphan.c) and zstop.lp
tg = spawn(["./zstop","4"]); pid=str(tg.pid)
def run(*a):
    r = subprocess.run([BIN]+list(a), capture_output=True, text=True, timeout=120); return r.returncode, r.stdout.strip().splitlines()[:1], r.stderr.strip()[-300:]
time.sleep(0.3)
print("setup apply", run("apply",pid,"zstop.lp","--mode","nonstop")); time.sleep(0.3)
print("setup revert", run("revert",pid,"--mode","nonstop")); time.sleep(0.3)
print([l for l in open(OUT).read().splitlines() if l.startswith("agent page")])
t = subprocess.Popen([BIN,"apply",pid,"zstop.lp","--mode","nonstop"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
def jobstopped():
    try:
        return all(open(f"/proc/{pid}/task/{x}/stat").read().rsplit(')',1)[1].split()[0] in 'TtZ' for x in os.listdir(f"/proc/{pid}/task"))
    except Exception: return False
dl = time.time()+20
while not any(l.startswith("main exited") for l in open(OUT).read().splitlines()):
    if t.poll() is not None: print("apply ended first", t.returncode, t.stderr.read().decode()[-300:]); break
    if time.time() > dl: print("timeout"); break
    time.sleep(0.001)
time.sleep(0.01)
t.kill(); t.wait(); print("tool killed; states", [(x, open(f"/proc/{pid}/task/{x}/stat").read().rsplit(')',1)[1].split()[0]) for x in sorted(os.listdir(f"/proc/{pid}/task"))])
print([l for l in open(OUT).read().splitlines() if 'main exited' in l])
live=[x for x in os.listdir(f'/proc/{pid}/task') if x!=pid][0]
page = int([l for l in open(OUT).read().splitlines() if l.startswith("agent page")][0].split()[-1],16)
def words():
    live=[x for x in os.listdir(f'/proc/{pid}/task') if x!=pid and os.path.exists(f"/proc/{pid}/task/{x}/mem")][-1]
    f=open(f"/proc/{pid}/task/{live}/mem","rb"); f.seek(page); b=f.read(224); return dict(REQ=struct.unpack("<I",b[0:4])[0], DONE=struct.unpack("<I",b[4:8])[0], TID=struct.unpack("<I",b[16:20])[0], NOPS=struct.unpack("<I",b[212:216])[0], NEXT=hex(struct.unpack("<I",b[216:220])[0]), COMPLETED=struct.unpack("<I",b[220:224])[0])
print("before the revert", words())
print("revert", run("revert",pid))
print("threads now", sorted(os.listdir(f"/proc/{pid}/task")))
try: print("after the revert", words())
except Exception as e: print("words:", e)
print("status", run("status",pid)[1])
os.kill(tg.pid, signal.SIGCONT)
dl=time.time()+3
while time.time()<dl and tg.poll() is None: time.sleep(0.05)
print("after SIGCONT: exit status", tg.poll(), last(2))
tg.kill()
