import re,sys,collections
ev=[];longs=[];res=collections.Counter();durs=collections.defaultdict(list)
kind_of=[]
for l in open(sys.argv[1]):
    m=re.search(r'trace: (.*?) (?:at|\+)\s*\d+ us mono=(\d+)',l)
    if m: ev.append((int(m.group(2)),m.group(1))); continue
    m=re.match(r'LONG (\d+) (\d+) (\d+)',l)
    if m: longs.append((int(m.group(1)),int(m.group(2)),int(m.group(3)))); continue
    m=re.match(r'INTERVAL (\d+) (\d+)',l)
    if m:
        a,b=int(m.group(1)),int(m.group(2))
        evs=[e for e in ev if a-1000000<=e[0]<=b+1000000]
        kind='op' if evs else 'control'
        if kind=='op':
            evs.sort()
            # longest call only
            if longs:
                st,d,th=max(longs,key=lambda x:x[1])
                # phase: last event before call start
                prev=[e for e in evs if e[0]<=st]
                nxt=[e for e in evs if e[0]>st]
                p=prev[-1][1] if prev else 'BEFORE-FIRST'
                n=nxt[0][1] if nxt else 'AFTER-LAST'
                print(f"{d/1000:7.1f} us  thread {th}  after '{p}' (+{(st-prev[-1][0])/1000 if prev else 0:.0f}us) before '{n}'")
        ev=[];longs=[]
