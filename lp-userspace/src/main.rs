//! `livepatch`: live-patch running processes. Errors are one line on stderr and a non-zero
//! exit code that says which kind (see `ErrorKind::exit_code`).
use clap::Parser;
use lp_userspace::cli::{self, Cli};

fn main() {
    cli::started(cli::monotonic_ns());
    // Behave like other command-line tools when the reader of our output goes away
    // (`livepatch status | head`): end quietly instead of failing on EPIPE.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // An apply: this thread parses the arguments, loads the patch and applies it (it is the
    // tracer, and ends the process when done: `cli::end_process`), while the one thread it
    // starts builds iced-x86's instruction tables from the start (~0.5 ms of CPU the tracer
    // needs from its first decode on), then runs what the apply would start threads for
    // (`apply::helper`). The tracer is this thread, not a new one: it starts at once, on the
    // malloc arena already set up, while the new thread's start (stack, signal stack, arena)
    // goes off its path.
    if let Some(mode) = cli::early_apply(std::env::args_os()) {
        // Before any other thread starts: all inherit the mask.
        cli::interrupts_deferred(defer_interrupts());
        // Claims the tables before the helper starts, so the apply never starts a thread of
        // its own for them; when the thread cannot be started, the helper (dropped with the
        // closure) gives the claim back and the tracer builds them itself.
        let helper = lp_userspace::apply::helper::Helper::open_for_apply(mode);
        let _ = std::thread::Builder::new()
            .name("livepatch-helper".into())
            .spawn(move || helper.serve());
    }
    run_command()
}

/// Parses the arguments and runs the command; ends the process.
fn run_command() -> ! {
    // No `M_ARENA_MAX=1` (session 3 set it): an apply builds iced-x86's tables on one thread
    // while the tracer thread works, and with one arena for all threads the tracer queued for
    // the arena lock behind those thousands of allocations (strace of one apply: 98 futex
    // calls, ~15 waits of 0.1-0.6 ms; 26 with an arena per thread, for 11 more `mprotect`s
    // growing the tracer's arena). A MALLOC_ARENA_MAX in the environment still rules (glibc
    // reads it at start-up).
    // `livepatch apply PID PATCH` needs no clap (building its parser for every command costs
    // the tracer ~0.1 ms): parsed by hand into what clap would give (see `plain_apply`).
    let parsed = cli::plain_apply(std::env::args_os()).map_or_else(Cli::try_parse, Ok);
    let cli = match parsed {
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
    if changes_a_process && !cli::interrupts_are_deferred() {
        cli::interrupts_deferred(defer_interrupts());
    }
    // An apply ends the process on its own as soon as it is done (see `cli::end_process`);
    // every other command comes back here.
    let result = cli::run(cli);
    cli::end_process(result.as_ref().err())
}

/// Holds back Ctrl-C, SIGTERM, SIGHUP and SIGQUIT until an apply or revert is over: dying in
/// the middle would leave the target half-switched (some functions redirected, our trap handler
/// or int3s behind, threads stopped until the kernel detaches them). They are blocked on this
/// thread before any other starts, so every thread of the tool inherits the mask, and delivered
/// when the command is over (`cli::end_process`). The switch itself is bounded by `--timeout`.
/// SIGKILL cannot be held back. Returns the mask to restore.
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
