import re,sys,bisect
evs=[]
for l in open('/tmp/sched.txt'):
    m=re.match(r'\s*(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+(\S+):\s+(.*)',l)
    if not m: continue
    t=int(round(float(m.group(3))*1e9))
    evs.append((t,int(m.group(2)),int(m.group(1)),m.group(4),m.group(5)))
evs.sort()
times=[e[0] for e in evs]
longs=[]
cur=[]
agents=set()
for l in open('/tmp/sched-bench.log'):
    m=re.search(r'sync agent Some\((\d+)\)',l)
    if m: agents.add(m.group(1))
    m=re.match(r'LONG (\d+) (\d+) (\d+)',l)
    if m: cur.append((int(m.group(1)),int(m.group(2)),int(m.group(3))))
    m=re.match(r'INTERVAL',l)
    if m:
        if cur: longs.append(max(cur,key=lambda x:x[1]))
        cur=[]
longs.sort(key=lambda x:-x[1])
for st,d,th in longs[:int(sys.argv[1])]:
    print(f"=== long call {d/1000:.1f} us (worker {th})")
    i=bisect.bisect_left(times,st-2000)
    while i<len(evs) and evs[i][0]<=st+d+2000:
        t,cpu,tid,ev,rest=evs[i]
        rest=rest.replace('prev_comm=','').replace('next_comm=','')
        rest=re.sub(r'prev_prio=\d+ ','',rest); rest=re.sub(r'next_prio=','prio=',rest)
        for a in agents: rest=rest.replace(f'pid={a} ',f'pid={a}(AGENT) ').replace(f'pid={a}$',f'pid={a}(AGENT)')
        print(f"  {(t-st)/1000:7.1f} cpu{cpu} {ev.split(':')[1]:24} {rest[:110]}")
        i+=1
