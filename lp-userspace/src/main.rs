//! `livepatch`: live-patch running processes. Errors are one line on stderr and a non-zero
//! exit code that says which kind (see `ErrorKind::exit_code`).
use clap::Parser;
use lp_userspace::cli::{self, Cli};

fn main() {
    let trace = std::env::var_os("LIVEPATCH_TRACE").is_some();
    let entered = monotonic_ns();
    cli::trace_origin();
    // Behave like other command-line tools when the reader of our output goes away
    // (`livepatch status | head`): end quietly instead of failing on EPIPE.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // No `M_ARENA_MAX=1` (session 3 set it): an apply now builds iced-x86's tables on this
    // thread, in the main arena, while the tracer thread works, and with one arena for all
    // threads the tracer queued for the arena lock behind those thousands of allocations
    // (strace of one apply: 98 futex calls, ~15 waits of 0.1-0.6 ms; 26 with an arena per
    // thread, for 11 more `mprotect`s growing the tracer's arena). A MALLOC_ARENA_MAX in the
    // environment still rules (glibc reads it at start-up).
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind as K;
            if matches!(
                e.kind(),
                K::DisplayHelp | K::DisplayVersion | K::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                std::process::exit(if e.kind() == K::DisplayHelpOnMissingArgumentOrSubcommand {
                    2
                } else {
                    0
                });
            }
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("bad usage");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("livepatch: error: {first} (see livepatch --help)");
            std::process::exit(2);
        }
    };
    let changes_a_process = matches!(
        cli.command,
        cli::Command::Apply { .. } | cli::Command::Revert { .. }
    );
    let interrupts = changes_a_process.then(defer_interrupts);
    let result = cli::run(cli);
    if trace {
        trace_process(entered);
    }
    if let Err(e) = &result {
        eprintln!("livepatch: error: {e}");
    }
    if let Some(old) = interrupts {
        // An interrupt that came meanwhile ends us now, by its default action (a shell sees
        // "killed by SIGINT"), with the target whole: patched or as it was.
        // SAFETY: restores the signal mask saved by defer_interrupts; no memory is involved.
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        }
    }
    if let Err(e) = result {
        std::process::exit(e.kind().exit_code());
    }
}

/// Holds back Ctrl-C, SIGTERM, SIGHUP and SIGQUIT until an apply or revert is over: dying in
/// the middle would leave the target half-switched (some functions redirected, our trap handler
/// or int3s behind, threads stopped until the kernel detaches them). They are blocked on this
/// thread before any other starts, so every thread of the tool inherits the mask, and delivered
/// when `main` unblocks them. The switch itself is bounded by `--timeout`. SIGKILL cannot be
/// held back. Returns the mask to restore.
fn defer_interrupts() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use; pthread_sigmask
    // only changes this thread's mask (no other thread exists yet).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
        old
    }
}

/// CLOCK_MONOTONIC in nanoseconds (the clock a benchmark's `Instant` reads).
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `LIVEPATCH_TRACE`: when `main` was entered (CLOCK_MONOTONIC: a caller that noted the time
/// of its spawn gets the exec and dynamic loading time), how long the command took from
/// there, and the CPU time of all our threads (exited ones included).
fn trace_process(entered: u64) {
    // SAFETY: getrusage fills the rusage we own.
    let usage = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    eprintln!(
        "livepatch: trace: main entered at {entered} ns, command done after {} us, cpu user {} us sys {} us, context switches {} voluntary {} involuntary",
        (monotonic_ns() - entered) / 1000,
        us(usage.ru_utime),
        us(usage.ru_stime),
        usage.ru_nvcsw,
        usage.ru_nivcsw
    );
}
