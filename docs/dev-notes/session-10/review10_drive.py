# Review 10: shared helpers of the review10 scripts (target spawn, tool stopped at a point).
import subprocess, sys, time, os, signal
LP=os.environ.get("LP", "livepatch")
OUT="/tmp/review10-t-%d.out" % os.getpid()
def spawn(args):
    p = subprocess.Popen(args, stdout=open(OUT,"w"), stderr=subprocess.STDOUT)
    time.sleep(0.4); return p
def tool_stop_at(args, point, extra_env={}):
    env = dict(os.environ, LIVEPATCH_DEBUG_STOP=point, **extra_env)
    t = subprocess.Popen([LP]+args, stderr=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    line = t.stderr.readline().decode()
    # wait until stopped
    for _ in range(200):
        st = open(f"/proc/{t.pid}/stat").read().rsplit(')',1)[1].split()[0]
        if st == 'T': break
        time.sleep(0.01)
    return t, line
def last(n=1):
    return open(OUT).read().splitlines()[-n:]
def nlines(): return len(open(OUT).read().splitlines())
def threads(pid):
    out=[]
    for t in sorted(os.listdir(f"/proc/{pid}/task")):
        s=open(f"/proc/{pid}/task/{t}/stat").read().rsplit(')',1)[1].split()
        w=open(f"/proc/{pid}/task/{t}/wchan").read()
        out.append((t,s[0],w))
    return out
