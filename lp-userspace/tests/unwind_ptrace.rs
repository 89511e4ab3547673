//! Unwinding real stacks: a C program whose two threads sleep inside f -> g -> h -> nanosleep,
//! stopped with PTRACE_SEIZE + PTRACE_INTERRUPT; and a thread of this test process inside code
//! linked by `link` (its CFI coming from the patch image's own .eh_frame).

#[path = "elf_support/mod.rs"]
mod support;

use support::in_process::{dlsym, Mapped};

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use lp_userspace::elf::Module;
use lp_userspace::link::Layout;
use lp_userspace::maps;
use lp_userspace::unwind::{
    Backtrace, CfiSource, ProcMemory, Registers, SelfMemory, Unwinder, DEFAULT_MAX_DEPTH,
};

fn ptrace(req: libc::c_uint, tid: i32, data: *mut libc::c_void) -> i64 {
    // SAFETY: plain ptrace requests on a thread of a child we spawned; `data` is null or points
    // to a user_regs_struct we own.
    unsafe { libc::ptrace(req, tid, std::ptr::null_mut::<libc::c_void>(), data) }
}

fn stop_thread(tid: i32) -> libc::user_regs_struct {
    assert_eq!(
        ptrace(libc::PTRACE_SEIZE, tid, std::ptr::null_mut()),
        0,
        "seize {tid}"
    );
    assert_eq!(ptrace(libc::PTRACE_INTERRUPT, tid, std::ptr::null_mut()), 0);
    let mut status = 0;
    // SAFETY: waiting for a traced thread of ours.
    let r = unsafe { libc::waitpid(tid, &mut status, libc::__WALL) };
    assert_eq!(r, tid);
    // SAFETY: zeroed plain-old-data.
    let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
    assert_eq!(
        ptrace(
            libc::PTRACE_GETREGS,
            tid,
            &mut regs as *mut _ as *mut libc::c_void
        ),
        0
    );
    regs
}

/// The name of the function of `module` (loaded at `bias`) containing return address `ra`.
fn function_of(module: &Module, bias: u64, ra: u64) -> Option<String> {
    module
        .symbol_at(ra.wrapping_sub(bias).wrapping_sub(1))
        .map(|s| s.name.clone())
}

#[test]
fn unwind_sleeping_threads_through_libc() {
    let dir = tempfile::tempdir().unwrap();
    let exe = support::executable(dir.path(), &["nested_sleep.c"], "nested", &["-pthread"]);
    let mut child = Command::new(&exe).stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    let pid = child.id() as i32;
    std::thread::sleep(std::time::Duration::from_millis(50)); // both threads reach nanosleep

    let mut unwinder = Unwinder::for_process(pid).unwrap();
    assert!(
        unwinder.sources().iter().any(|s| s.name.contains("libc")),
        "libc CFI loaded"
    );
    let mods = maps::modules(&maps::read(pid).unwrap());
    let me = maps::find_module(&mods, "nested").unwrap();
    let module = Module::open(&me.open_path(pid)).unwrap();
    let bias = me.load_bias(&module).unwrap();

    let tids: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(tids.len(), 2);
    let regs: Vec<_> = tids.iter().map(|&t| stop_thread(t)).collect();
    let mem = ProcMemory::open(pid).unwrap();
    let mut traces: Vec<Backtrace> = Vec::new();
    let started = std::time::Instant::now();
    for r in &regs {
        traces.push(unwinder.unwind(&Registers::from_user_regs(r), &mem, DEFAULT_MAX_DEPTH));
    }
    let cold = started.elapsed();
    let started = std::time::Instant::now();
    for r in &regs {
        unwinder.unwind(&Registers::from_user_regs(r), &mem, DEFAULT_MAX_DEPTH);
    }
    let warm = started.elapsed();
    eprintln!("unwind of 2 threads: cold {cold:?}, warm (cached rows) {warm:?}");
    for &t in &tids {
        ptrace(libc::PTRACE_DETACH, t, std::ptr::null_mut());
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let mut entries = Vec::new();
    for (tid, bt) in tids.iter().zip(&traces) {
        let names: Vec<Option<String>> = bt
            .return_addresses
            .iter()
            .map(|&ra| function_of(&module, bias, ra))
            .collect();
        eprintln!("thread {tid}: {:?} stop {:?}", names, bt.stop);
        assert!(
            bt.complete(),
            "thread {tid}: the chain ends cleanly: {:?}",
            bt.stop
        );
        // nanosleep's frames are in libc, not ours; then h -> g -> f -> entry.
        let first_ours = names
            .iter()
            .position(|n| n.is_some())
            .expect("fixture frames found");
        let ours: Vec<&str> = names[first_ours..]
            .iter()
            .map_while(|n| n.as_deref())
            .collect();
        assert!(ours.len() >= 4, "{ours:?}");
        assert_eq!(&ours[..3], &["h", "g", "f"], "thread {tid}");
        entries.push(ours[3].to_string());
        // Everything after the fixture's frames is libc start code or thread start.
        assert!(names[..first_ours].iter().all(|n| n.is_none()));
    }
    entries.sort();
    assert_eq!(entries, vec!["main".to_string(), "thread_main".to_string()]);
}

/// `for_process` reads no module's CFI up front; unwinding loads exactly the modules the stacks
/// pass through (the fixture and libc, not ld.so or the vDSO), and the stacks are complete: a
/// frame in a module not loaded yet loads it instead of ending the unwind.
#[test]
fn unwind_loads_the_cfi_of_the_modules_the_stacks_reach_and_no_other() {
    let dir = tempfile::tempdir().unwrap();
    let exe = support::executable(dir.path(), &["nested_sleep.c"], "nested", &["-pthread"]);
    let mut child = Command::new(&exe).stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    let pid = child.id() as i32;
    std::thread::sleep(std::time::Duration::from_millis(50)); // both threads reach nanosleep

    let mut unwinder = Unwinder::for_process(pid).unwrap();
    assert!(
        unwinder.loaded_sources().is_empty(),
        "nothing read before an unwind needs it"
    );
    let tids: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_str().unwrap().parse().unwrap())
        .collect();
    let regs: Vec<_> = tids.iter().map(|&t| stop_thread(t)).collect();
    let mem = ProcMemory::open(pid).unwrap();
    let traces: Vec<Backtrace> = regs
        .iter()
        .map(|r| unwinder.unwind(&Registers::from_user_regs(r), &mem, DEFAULT_MAX_DEPTH))
        .collect();
    let loaded: Vec<String> = unwinder
        .loaded_sources()
        .iter()
        .map(|s| s.name.clone())
        .collect();
    let all = unwinder.sources().len();
    for &t in &tids {
        ptrace(libc::PTRACE_DETACH, t, std::ptr::null_mut());
    }
    child.kill().unwrap();
    child.wait().unwrap();

    for bt in &traces {
        assert!(bt.complete(), "{:?}", bt.stop);
        assert!(bt.return_addresses.len() >= 4, "{bt:?}");
    }
    assert_eq!(loaded.len(), 2, "{loaded:?}");
    assert!(loaded.iter().any(|n| n.ends_with("/nested")), "{loaded:?}");
    assert!(loaded.iter().any(|n| n.contains("libc")), "{loaded:?}");
    assert!(all > loaded.len(), "ld.so and the vDSO are known too");
}

static CAPTURED: Mutex<Option<Backtrace>> = Mutex::new(None);
static UNWINDER: Mutex<Option<Unwinder>> = Mutex::new(None);

/// Called from the linked patch code: unwinds the current thread from here.
#[no_mangle]
pub extern "C" fn lp_unwind_test_callback(x: i32) -> i32 {
    let (rip, rsp, rbp): (u64, u64, u64);
    // SAFETY: reads three registers; no memory or stack access.
    unsafe {
        std::arch::asm!("lea {0}, [rip]", "mov {1}, rsp", "mov {2}, rbp", out(reg) rip, out(reg) rsp, out(reg) rbp);
    }
    let mut u = UNWINDER.lock().unwrap();
    if let Some(u) = u.as_mut() {
        let bt = u.unwind(&Registers::minimal(rip, rsp, rbp), &SelfMemory, 64);
        *CAPTURED.lock().unwrap() = Some(bt);
    }
    x
}

#[test]
fn unwind_through_linked_patch_code_with_its_own_eh_frame() {
    let dir = tempfile::tempdir().unwrap();
    let obj = std::fs::read(support::object(dir.path(), "patch_obj.c", "p.o", &[])).unwrap();
    let layout = Layout::of(&obj).unwrap();
    let mapped = Mapped::new(layout.size(), 0);
    let base = mapped.addr;
    static HOST_VALUE: i32 = 0;
    let image = layout
        .link(base, &|name| match name {
            "host_callback" => Some(lp_unwind_test_callback as *const () as u64),
            "host_value" => Some(&HOST_VALUE as *const i32 as u64),
            _ => dlsym(name),
        })
        .unwrap();
    mapped.load(&image);
    let mut u = Unwinder::for_process(std::process::id() as i32).unwrap();
    let without = {
        // First without the image's CFI: the unwind must stop at the patch code, not invent frames.
        *UNWINDER.lock().unwrap() = Some(Unwinder::for_process(std::process::id() as i32).unwrap());
        let entry: extern "C" fn(i32) -> i32 =
            // SAFETY: linked for this address, text executable; signature from patch_obj.c.
            unsafe { std::mem::transmute(image.symbol("lp_entry").unwrap() as usize) };
        entry(1);
        CAPTURED.lock().unwrap().take().unwrap()
    };
    // The image's CFI as user-proc rebuilds it in a later invocation: read back from memory.
    let eh = image.eh_frame.clone().expect("the object has .eh_frame");
    let mut eh_bytes = vec![0u8; (eh.end - eh.start) as usize];
    lp_userspace::unwind::MemoryReader::read(&SelfMemory, eh.start, &mut eh_bytes).unwrap();
    let text_start = image.text_ranges.iter().map(|r| r.start).min().unwrap();
    let text_end = image.text_ranges.iter().map(|r| r.end).max().unwrap();
    let from_memory = CfiSource::from_eh_frame("patch", text_start, text_end, eh.start, eh_bytes);
    let mut u2 = Unwinder::for_process(std::process::id() as i32).unwrap();
    u2.add(from_memory);
    *UNWINDER.lock().unwrap() = Some(u2);
    // SAFETY: as above.
    let entry2: extern "C" fn(i32) -> i32 =
        unsafe { std::mem::transmute(image.symbol("lp_entry").unwrap() as usize) };
    entry2(1);
    let with_memory = CAPTURED.lock().unwrap().take().unwrap();
    assert!(with_memory.complete(), "{with_memory:?}");

    u.add(CfiSource::from_image(&image).expect("the object has .eh_frame"));
    *UNWINDER.lock().unwrap() = Some(u);
    // SAFETY: as above.
    let entry: extern "C" fn(i32) -> i32 =
        unsafe { std::mem::transmute(image.symbol("lp_entry").unwrap() as usize) };
    entry(1);
    let with = CAPTURED.lock().unwrap().take().unwrap();

    let lp_entry = image
        .symbol_list
        .iter()
        .find(|s| s.name == "lp_entry")
        .unwrap();
    let in_entry = |ra: &u64| *ra > lp_entry.addr && *ra <= lp_entry.addr + lp_entry.size;
    eprintln!("without image CFI: {without:?}\nwith: {with:?}");
    assert!(!without.complete());
    assert!(matches!(without.stop, lp_userspace::unwind::StopReason::NoModule(a) if in_entry(&a)));
    let pos = with
        .return_addresses
        .iter()
        .position(in_entry)
        .expect("lp_entry on the stack");
    // And beyond it: this test function's frames (in the test binary), i.e. the unwind went on.
    assert!(with.return_addresses.len() > pos + 2, "{with:?}");
}

#[test]
fn unwind_from_inside_the_vdso() {
    let dir = tempfile::tempdir().unwrap();
    let exe = support::executable(dir.path(), &["vdso_loop.c"], "vdso_loop", &[]);
    let mut child = Command::new(&exe).stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let pid = child.id() as i32;
    let all = maps::read(pid).unwrap();
    let vdso = all
        .iter()
        .find(|m| m.path.as_deref() == Some("[vdso]"))
        .expect("a vDSO");
    let mut unwinder = Unwinder::for_process(pid).unwrap();
    assert!(
        unwinder.sources().iter().any(|s| s.name == "[vdso]"),
        "vDSO CFI read from memory"
    );
    let mods = maps::modules(&all);
    let me = maps::find_module(&mods, "vdso_loop").unwrap();
    let module = Module::open(&me.open_path(pid)).unwrap();
    let bias = me.load_bias(&module).unwrap();
    let mem = ProcMemory::open(pid).unwrap();

    assert_eq!(ptrace(libc::PTRACE_SEIZE, pid, std::ptr::null_mut()), 0);
    let mut inside = 0;
    for _ in 0..2000 {
        assert_eq!(ptrace(libc::PTRACE_INTERRUPT, pid, std::ptr::null_mut()), 0);
        let mut status = 0;
        // SAFETY: waiting for our traced child.
        assert_eq!(
            unsafe { libc::waitpid(pid, &mut status, libc::__WALL) },
            pid
        );
        // SAFETY: zeroed plain-old-data.
        let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
        assert_eq!(
            ptrace(
                libc::PTRACE_GETREGS,
                pid,
                &mut regs as *mut _ as *mut libc::c_void
            ),
            0
        );
        if vdso.contains(regs.rip) {
            let bt = unwinder.unwind(&Registers::from_user_regs(&regs), &mem, DEFAULT_MAX_DEPTH);
            assert!(bt.complete(), "{bt:?}");
            let names: Vec<String> = bt
                .return_addresses
                .iter()
                .filter_map(|&ra| function_of(&module, bias, ra))
                .collect();
            // spin may be entered directly from the vDSO or through libc's clock_gettime.
            let at = names
                .iter()
                .position(|n| n == "spin")
                .unwrap_or_else(|| panic!("{names:?}"));
            assert_eq!(&names[at..at + 3], &["spin", "loop", "main"], "{names:?}");
            inside += 1;
        }
        assert_eq!(ptrace(libc::PTRACE_CONT, pid, std::ptr::null_mut()), 0);
        if inside >= 5 {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(inside >= 1, "never stopped inside the vDSO in 2000 tries");
}

#[test]
fn unwind_across_a_signal_frame() {
    let dir = tempfile::tempdir().unwrap();
    let exe = support::executable(dir.path(), &["signal_sleep.c"], "signal_sleep", &[]);
    let mut child = Command::new(&exe).stdout(Stdio::piped()).spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let pid = child.id() as i32;
    std::thread::sleep(std::time::Duration::from_millis(30)); // g reaches pause()
                                                              // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGUSR1) }, 0);
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "in handler");
    std::thread::sleep(std::time::Duration::from_millis(30)); // sleeper reaches nanosleep

    let mut unwinder = Unwinder::for_process(pid).unwrap();
    let mods = maps::modules(&maps::read(pid).unwrap());
    let me = maps::find_module(&mods, "signal_sleep").unwrap();
    let module = Module::open(&me.open_path(pid)).unwrap();
    let bias = me.load_bias(&module).unwrap();
    let regs = stop_thread(pid);
    let mem = ProcMemory::open(pid).unwrap();
    let bt = unwinder.unwind(&Registers::from_user_regs(&regs), &mem, DEFAULT_MAX_DEPTH);
    ptrace(libc::PTRACE_DETACH, pid, std::ptr::null_mut());
    child.kill().unwrap();
    child.wait().unwrap();

    let names: Vec<String> = bt
        .return_addresses
        .iter()
        .filter_map(|&ra| function_of(&module, bias, ra))
        .collect();
    assert!(bt.complete(), "{:?} {names:?}", bt.stop);
    assert_eq!(
        names,
        ["sleeper", "handler", "g", "f", "main", "_start"],
        "{bt:?}"
    );
}
