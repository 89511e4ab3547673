#!/bin/busybox sh
# /init of the test VM: runs every scenario against the real kernel and prints one verdict line
# per check on the serial console ("LPTEST PASS name" / "LPTEST FAIL name: why"), then
# "LPTEST DONE pass=N fail=M" and powers off. lp-kernel/test.sh reads these lines.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
M=/lib/lp
PASS=0
FAIL=0
# Keep the console for verdicts: kernel messages are read with dmesg.
echo 1 > /proc/sys/kernel/printk

pass() { PASS=$((PASS + 1)); echo "LPTEST PASS $1"; }
fail() { FAIL=$((FAIL + 1)); echo "LPTEST FAIL $1: $2"; }
# expect NAME ACTUAL EXPECTED
expect() {
  if [ "$2" = "$3" ]; then pass "$1"; else fail "$1" "got '$2', want '$3'"; fi
}
# expect_fail NAME COMMAND... : the command must fail
expect_fail() {
  n=$1; shift
  if "$@" 2>/dev/null; then fail "$n" "'$*' succeeded"; else pass "$n"; fi
}
# dmesg_has NAME TEXT : the kernel log mentions TEXT
dmesg_has() {
  if dmesg | grep -q "$2"; then pass "$1"; else fail "$1" "no '$2' in dmesg"; fi
}
disable() { echo 0 > /sys/kernel/lp/$1/enabled; }
field() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" /proc/lp_target; }

# ---- the core module -----------------------------------------------------------------------
if insmod $M/lpcore.ko switch_timeout_ms=1000; then pass core-loads; else fail core-loads "insmod lpcore.ko"; fi
CMDLINE=$(cat /proc/cmdline)
VERSION=$(cat /proc/version)

# ---- 1. the function behind a /proc file ----------------------------------------------------
expect proc-before "$(cat /proc/cmdline)" "$CMDLINE"
insmod $M/p_cmdline.ko || fail proc-insmod "insmod p_cmdline.ko"
expect proc-during "$(cat /proc/cmdline)" "LPTEST cmdline patched"
expect proc-sysfs-enabled "$(cat /sys/kernel/lp/p_cmdline/enabled)" 1
grep -q "^cmdline_proc_show 0x[0-9a-f]* -> new_cmdline_proc_show.* active depth=1" \
  /sys/kernel/lp/p_cmdline/functions && pass proc-sysfs-functions ||
  fail proc-sysfs-functions "$(cat /sys/kernel/lp/p_cmdline/functions)"
cat /sys/kernel/lp/p_cmdline/functions | sed 's/^/LPSTATUS p_cmdline /'
expect_fail proc-rmmod-while-enabled rmmod p_cmdline
expect proc-still-during "$(cat /proc/cmdline)" "LPTEST cmdline patched"
disable p_cmdline && pass proc-disable || fail proc-disable "echo 0 > enabled"
expect proc-after "$(cat /proc/cmdline)" "$CMDLINE"
rmmod p_cmdline && pass proc-rmmod || fail proc-rmmod "rmmod after disable"
expect proc-gone "$(ls /sys/kernel/lp/)" ""

# ---- 2. static function and static variable of vmlinux --------------------------------------
expect static-before "$(cat /proc/version)" "$VERSION"
insmod $M/p_version.ko || fail static-insmod "insmod p_version.ko"
expect static-during "$(cat /proc/version)" "LPV2 ngroups=$(cat /proc/sys/kernel/ngroups_max) $CMDLINE"
disable p_version && rmmod p_version
expect static-after "$(cat /proc/version)" "$VERSION"

# ---- 3. a function of a module loaded before the patch --------------------------------------
insmod $M/lp_target.ko || fail target-insmod "insmod lp_target.ko"
expect module-before "$(field value)" 1
insmod $M/p_target.ko || fail module-insmod "insmod p_target.ko"
expect module-during "$(field value)" 2
disable p_target
expect module-after "$(field value)" 1
echo 1 > /sys/kernel/lp/p_target/enabled && pass module-reenable || fail module-reenable "echo 1 > enabled"
expect module-reenabled "$(field value)" 2
expect_fail module-rmmod-reenabled rmmod p_target
disable p_target && rmmod p_target
expect module-after-rmmod "$(field value)" 1

# ---- 3b. the new function calls the one it replaces (runs the original, no recursion) ---------
insmod $M/p_wrap.ko || fail wrap-insmod "insmod p_wrap.ko"
expect wrap-during "$(field value)" 105
expect_fail wrap-pins-symbol-module rmmod lp_target
insmod $M/p_stack_a.ko
expect wrap-stacked-under "$(field value)" 101
disable p_stack_a && rmmod p_stack_a
expect wrap-again "$(field value)" 105
disable p_wrap && rmmod p_wrap
expect wrap-after "$(field value)" 1
insmod $M/p_tailwrap.ko || fail tailwrap-insmod "insmod p_tailwrap.ko"
expect tailwrap-during "$(field value)" 1
expect tailwrap-enabled "$(cat /sys/kernel/lp/p_tailwrap/enabled)" 1
disable p_tailwrap && rmmod p_tailwrap

# ---- 4. a function of a module loaded after the patch ---------------------------------------
insmod $M/p_late.ko || fail late-insmod "insmod p_late.ko (module absent)"
grep -q "^lp_late:lp_late_value 0x0 -> .* waiting" /sys/kernel/lp/p_late/functions &&
  pass late-waiting || fail late-waiting "$(cat /sys/kernel/lp/p_late/functions)"
insmod $M/lp_late.ko || fail late-target-insmod "insmod lp_late.ko"
expect late-during "$(cat /proc/lp_late)" "late=20"
dmesg_has late-init-patched "lp_late: init sees 20"
rmmod lp_late
grep -q "waiting" /sys/kernel/lp/p_late/functions && pass late-waits-again ||
  fail late-waits-again "$(cat /sys/kernel/lp/p_late/functions)"
insmod $M/lp_late.ko
expect late-reload-during "$(cat /proc/lp_late)" "late=20"
disable p_late && rmmod p_late
expect late-after "$(cat /proc/lp_late)" "late=10"
rmmod lp_late

# ---- 5. stacking and ordered removal --------------------------------------------------------
expect stack-before "$(field value)" 1
insmod $M/p_stack_a.ko
expect stack-a "$(field value)" 101
insmod $M/p_stack_b.ko
expect stack-b-wins "$(field value)" 102
grep -q "overridden depth=2" /sys/kernel/lp/p_stack_a/functions && pass stack-a-overridden ||
  fail stack-a-overridden "$(cat /sys/kernel/lp/p_stack_a/functions)"
expect_fail stack-remove-a-refused disable p_stack_a
dmesg_has stack-refusal-reason "patch p_stack_b is stacked on top of it"
expect stack-still-b "$(field value)" 102
expect stack-a-still-enabled "$(cat /sys/kernel/lp/p_stack_a/enabled)" 1
disable p_stack_b && pass stack-remove-b || fail stack-remove-b "disable p_stack_b"
expect stack-back-to-a "$(field value)" 101
disable p_stack_a && pass stack-remove-a || fail stack-remove-a "disable p_stack_a"
expect stack-after "$(field value)" 1
rmmod p_stack_b p_stack_a

# ---- 5b. `livepatch kernel status` (the CLI, when test.sh could put it in the VM) ------------
CLI=$(sed -n 's/.*lp_cli=\([^ ]*\).*/\1/p' /proc/cmdline)
if [ -n "$CLI" ] && [ -x "$CLI" ]; then
  expect cli-status-empty "$($CLI kernel status)" "no kernel patches registered"
  insmod $M/p_stack_a.ko
  insmod $M/p_stack_b.ko
  out=$($CLI kernel status)
  echo "$out" | sed 's/^/LPSTATUS cli /'
  echo "$out" | grep -q "^p_stack_a (id [0-9]*): enabled" && pass cli-status-patch || fail cli-status-patch "$out"
  echo "$out" | grep -q "lp_target:lp_target_value 0x[0-9a-f]* -> new_lp_target_value_a 0x[0-9a-f]*  overridden (depth 2)" &&
    pass cli-status-overridden || fail cli-status-overridden "$out"
  echo "$out" | grep -q "new_lp_target_value_b 0x[0-9a-f]*  active (depth 2)" &&
    pass cli-status-active || fail cli-status-active "$out"
  json=$($CLI kernel status --json)
  echo "$json" | tr -d ' \n' | grep -q '"name":"p_stack_b","id":[0-9]*,"enabled":true' &&
    pass cli-status-json || fail cli-status-json "$json"
  disable p_stack_b; disable p_stack_a; rmmod p_stack_b p_stack_a
  rmmod lpcore
  out=$($CLI kernel status 2>&1); rc=$?
  [ $rc != 0 ] && echo "$out" | grep -q "lpcore is not loaded" && pass cli-status-not-loaded ||
    fail cli-status-not-loaded "rc=$rc $out"
  insmod $M/lpcore.ko switch_timeout_ms=1000
fi

# ---- 6. a function kept busy by a sleeping task ---------------------------------------------
echo hold > /proc/lp_target
expect busy-before "$(field sleeping)" 1
expect_fail busy-refused insmod $M/p_busy.ko
dmesg_has busy-reason "patch p_busy refused: task [0-9]* (lp_sleeper) stayed inside lp_target_sleeper"
expect busy-not-switched "$(ls /sys/kernel/lp/)" ""
expect busy-still-inside "$(field sleeping)" 1
expect_fail busy-pair-refused insmod $M/p_busy_pair.ko
expect busy-pair-value-not-switched "$(field value)" 1
dmesg_has busy-pair-reason "patch p_busy_pair refused: task [0-9]* (lp_sleeper) stayed inside lp_target_sleeper"
echo release > /proc/lp_target
expect busy-old-code-ran "$(field sleeper)" 1
insmod $M/p_busy.ko && pass busy-applies-when-free || fail busy-applies-when-free "insmod p_busy.ko"
sleep 1
expect busy-during "$(field sleeper)" 2
disable p_busy && rmmod p_busy
sleep 1
expect busy-after "$(field sleeper)" 1

# ---- 6b. delayed, not refused: the sleeper leaves while lpcore retries -------------------------
echo 10000 > /sys/module/lpcore/parameters/switch_timeout_ms
echo hold > /proc/lp_target
( insmod $M/p_busy.ko; echo $? > /tmp/busy_rc ) &
sleep 1
expect delayed-not-yet "$(field sleeping) $(ls /sys/kernel/lp/)" "1 "
echo release > /proc/lp_target
wait
expect delayed-applied "$(cat /tmp/busy_rc)" 0
attempts=$(dmesg | sed -n 's/.*patch p_busy: switched after \([0-9]*\) attempt(s).*/\1/p' | tail -1)
[ "${attempts:-0}" -gt 1 ] && pass delayed-retried || fail delayed-retried "attempts=$attempts"
sleep 1
expect delayed-during "$(field sleeper)" 2
disable p_busy && rmmod p_busy
echo 1000 > /sys/module/lpcore/parameters/switch_timeout_ms

# ---- 7. malformed and mismatched patch modules ----------------------------------------------
expect_fail bad-abi insmod $M/p_bad_abi.ko
dmesg_has bad-abi-reason "patch p_bad_abi refused: built for patch ABI 99, lpcore speaks 1"
expect_fail bad-sym insmod $M/p_bad_sym.ko
dmesg_has bad-sym-reason "patch p_bad_sym refused: symbol lp_no_such_function_in_this_kernel not found"
expect_fail bad-notrace insmod $M/p_bad_notrace.ko
dmesg_has bad-notrace-reason "patch p_bad_notrace refused: entry_SYSCALL_64 .* has no ftrace entry"
expect_fail bad-ambiguous insmod $M/p_bad_ambiguous.ko
dmesg_has bad-ambiguous-reason "symbol _compound_head is ambiguous"
expect_fail bad-crc insmod $M/p_bad_crc.ko
dmesg_has bad-crc-reason "p_cmdline: disagrees about version of symbol module_layout"
expect bad-unharmed-cmdline "$(cat /proc/cmdline)" "$CMDLINE"
expect bad-nothing-registered "$(ls /sys/kernel/lp/)" ""
expect bad-no-module-left "$(grep -c '^p_bad' /proc/modules)" 0
insmod $M/p_cmdline.ko && expect bad-then-good "$(cat /proc/cmdline)" "LPTEST cmdline patched"
disable p_cmdline && rmmod p_cmdline
expect bad-then-good-after "$(cat /proc/cmdline)" "$CMDLINE"

# ---- 8. calls racing the switch: a reader hammers /proc/cmdline through 20 apply/revert cycles
mkdir -p /tmp
( while :; do cat /proc/cmdline; done ) > /tmp/reads 2>&1 &
reader=$!
cycles=0
for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
  insmod $M/p_cmdline.ko && disable p_cmdline && rmmod p_cmdline && cycles=$((cycles + 1))
done
kill $reader; wait $reader 2>/dev/null
expect race-cycles "$cycles" 20
odd=$(sort -u /tmp/reads | grep -vxF "$CMDLINE" | grep -vxF "LPTEST cmdline patched" | head -3)
expect race-only-old-or-new "$odd" ""
expect race-reads "$(sort -u /tmp/reads | wc -l)" 2
expect race-after "$(cat /proc/cmdline)" "$CMDLINE"

# ---- 9. the example (examples/kernel-cmdline, built by `livepatch kernel pack`) ---------------
case "$CMDLINE" in *lp_demo_secret=hunter2*) pass example-before ;; *) fail example-before "$CMDLINE" ;; esac
REDACTED=$(echo "$CMDLINE" | sed 's/lp_demo_secret=[^ ]*/lp_demo_secret=***/')
insmod $M/lp_redact.ko && pass example-insmod || fail example-insmod "insmod lp_redact.ko"
expect example-during "$(cat /proc/cmdline)" "$REDACTED"
disable lp_redact && rmmod lp_redact
expect example-after "$(cat /proc/cmdline)" "$CMDLINE"

# ---- the end ---------------------------------------------------------------------------------
rmmod lp_target && pass target-unpinned || fail target-unpinned "rmmod lp_target"
rmmod lpcore && pass core-unloads || fail core-unloads "rmmod lpcore"
if dmesg | grep -qE "BUG:|WARNING:|Oops|general protection"; then
  fail kernel-clean "$(dmesg | grep -E 'BUG:|WARNING:|Oops|general protection' | head -3)"
else
  pass kernel-clean
fi
dmesg | grep -E "lpcore|lp_late|lp_target" | sed 's/^/LPDMESG /'
echo "LPTEST DONE pass=$PASS fail=$FAIL"
poweroff -f
