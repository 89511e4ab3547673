//! The `livepatch` command line: argument parsing and the text each command prints. The work
//! is done by the library (apply, revert, status, pack, demo); this file only translates.

use crate::apply::{self, ApplyOptions, Error, ErrorKind, Mode};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;

/// Live-patch running Linux processes without restarting them.
#[derive(Debug, Parser)]
#[command(name = "livepatch", version, about)]
pub struct Cli {
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// `--timeout` when not given, in seconds.
const DEFAULT_TIMEOUT: &str = "5";

/// Switch mode on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ModeArg {
    /// Stop every thread, check their stacks, switch (default).
    Stop,
    /// Threads keep running (one borrowed thread is traced); the int3 protocol, with a
    /// handler inside the target sending threads that meet a temporary int3 on their way.
    Nonstop,
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Mode {
        match m {
            ModeArg::Stop => Mode::Stop,
            ModeArg::Nonstop => Mode::Nonstop,
        }
    }
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Make a patch file from a target (executable or shared library) and a relocatable
    /// object holding new versions of some of its functions.
    Pack {
        /// The executable or shared library the patch is for.
        #[arg(long)]
        target: PathBuf,
        /// The relocatable object (gcc -c -fPIC) with the new functions.
        #[arg(long)]
        object: PathBuf,
        /// Replace OLD by NEW (default: functions of the object named like functions of the
        /// target replace them). OLD may be name, name@file.c or name,N.
        #[arg(long = "replace", value_name = "OLD[=NEW]")]
        replace: Vec<String>,
        /// Output patch file.
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
    },
    /// Apply a patch to a running process.
    Apply {
        /// The process.
        #[arg(value_parser = parse_pid, allow_negative_numbers = true)]
        pid: i32,
        /// The patch file.
        patch: PathBuf,
        /// How to switch.
        #[arg(long, value_enum, default_value = "stop")]
        mode: ModeArg,
        /// Stop mode: give up after this many seconds while a thread is inside a function
        /// being replaced.
        #[arg(long, value_name = "SECS", default_value = DEFAULT_TIMEOUT, value_parser = parse_timeout, allow_negative_numbers = true)]
        timeout: Duration,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// Run this tool at the highest CFS priority (nice -20) while it works, so that the
        /// target's own threads and other load preempt it less: a shorter apply on a busy
        /// machine. (The tracer thread runs real-time, SCHED_FIFO, whenever it may, with or
        /// without this.) Needs root or CAP_SYS_NICE; the priority of the target's own threads
        /// is not changed.
        #[arg(long)]
        boost: bool,
    },
    /// Take a patch back out (the newest one by default).
    Revert {
        /// The process.
        #[arg(value_parser = parse_pid, allow_negative_numbers = true)]
        pid: i32,
        /// The patch id (or a unique prefix of it).
        patch_id: Option<String>,
        /// How to switch.
        #[arg(long, value_enum, default_value = "stop")]
        mode: ModeArg,
        /// Stop mode: give up after this many seconds while a thread is inside a function
        /// being reverted.
        #[arg(long, value_name = "SECS", default_value = DEFAULT_TIMEOUT, value_parser = parse_timeout, allow_negative_numbers = true)]
        timeout: Duration,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// Run this tool at the highest CFS priority (nice -20) while it works (see apply).
        #[arg(long)]
        boost: bool,
    },
    /// Show the patches applied to a process, or to every process.
    Status {
        /// The process (default: every process with patches).
        #[arg(value_parser = parse_pid, allow_negative_numbers = true)]
        pid: Option<i32>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show live patching on a bundled program: before, patched, reverted.
    Demo,
    /// Kernel live patches (see docs).
    Kernel {
        /// The kernel subcommand.
        #[command(subcommand)]
        command: KernelCommand,
    },
}

/// `livepatch kernel ...`
#[derive(Debug, Subcommand)]
pub enum KernelCommand {
    /// Build a kernel patch module from a C file with the new functions.
    Pack {
        /// The C file (with LP_PATCH_MODULE(...)).
        source: PathBuf,
        /// Module name (default: the file's stem).
        #[arg(long)]
        name: Option<String>,
        /// Output .ko (default: NAME.ko here).
        #[arg(short = 'o', long = "output")]
        output: Option<PathBuf>,
        /// Kernel build directory.
        #[arg(long)]
        kdir: Option<PathBuf>,
    },
    /// Show the kernel patches applied.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a parsed command line; returns the process exit code.
pub fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::Pack {
            target,
            object,
            replace,
            output,
        } => {
            let mut reps = Vec::new();
            for r in &replace {
                reps.push(r.parse::<crate::pack::Replacement>()?);
            }
            let patch = crate::pack::pack(&target, &object, &reps)?;
            patch.save(&output)?;
            println!(
                "packed patch {} for {} ({} function(s): {}) into {}",
                patch.id,
                patch.target_name,
                patch.functions.len(),
                patch
                    .functions
                    .iter()
                    .map(|f| if f.old_name == f.new_name {
                        f.old_name.clone()
                    } else {
                        format!("{} -> {}", f.old_name, f.new_name)
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
                output.display()
            );
            Ok(())
        }
        Command::Apply {
            pid,
            patch,
            mode,
            timeout,
            json,
            boost,
        } => {
            if boost {
                raise_priority();
            }
            let patch = load_patch(&patch)?;
            trace_point("patch loaded");
            let opts = ApplyOptions {
                mode: mode.into(),
                timeout,
            };
            // This thread is the tracer; the report is printed and the process ended as soon as
            // the outcome is known (see `apply::apply_then_exit`).
            apply::apply_then_exit(pid, &patch, opts, |r| {
                trace_point("applied");
                if let Ok(applied) = r {
                    print_applied(applied, pid, json);
                }
                end_process(r.as_ref().err())
            })
        }
        Command::Revert {
            pid,
            patch_id,
            mode,
            timeout,
            json,
            boost,
        } => {
            if boost {
                raise_priority();
            }
            // Only nonstop mode decodes instructions in a revert: a stop-mode revert never
            // touches iced (perf: no iced frame in 5 profiled reverts without any warm-up), and
            // building the tables costs it ~1 ms of CPU, 3.5 ms of wall time at load 13.
            // Built here, before revert's threads start: its tracer does not wait for them
            // the way apply's does (see apply::iced_tables).
            if matches!(mode, ModeArg::Nonstop) {
                apply::warm_instruction_tables();
            }
            let r = crate::revert::revert(pid, patch_id.as_deref(), mode.into(), timeout)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            } else {
                println!(
                    "reverted patch {} from process {} ({}; total {} us)",
                    r.id,
                    pid,
                    r.functions.join(", "),
                    r.total_us
                );
            }
            Ok(())
        }
        Command::Status { pid, json } => {
            let list = crate::status::status(pid)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&list).unwrap_or_default()
                );
            } else {
                print!("{}", crate::status::render(&list));
            }
            Ok(())
        }
        Command::Demo => crate::demo::run(),
        Command::Kernel { command } => match command {
            KernelCommand::Pack {
                source,
                name,
                output,
                kdir,
            } => {
                let ko = crate::kernel::pack(&crate::kernel::PackOptions {
                    source,
                    name,
                    output,
                    kdir,
                })?;
                println!("packed {}", ko.display());
                Ok(())
            }
            KernelCommand::Status { json } => {
                print!("{}", crate::kernel::status(None, json)?);
                Ok(())
            }
        },
    }
}

/// Prints what an apply did: JSON, or a line per function under a summary line.
fn print_applied(applied: &apply::Applied, pid: i32, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(applied).unwrap_or_default()
        );
        return;
    }
    // One write (stdout is line-buffered: a println per function was a system call each).
    use std::fmt::Write as _;
    let mut out = format!(
        "applied patch {} to process {} ({} mode, stall {} us, total {} us)\n",
        applied.id, pid, applied.mode, applied.stats.stall_us, applied.total_us
    );
    for f in &applied.functions {
        let _ = writeln!(
            out,
            "  {} {:#x} -> {:#x}{}",
            f.name,
            f.old,
            f.new,
            if f.thunk {
                " (via register-saving thunk)"
            } else {
                ""
            }
        );
    }
    print!("{out}");
}

/// Whether `args` (the process's arguments) ask for an apply, and in which mode, guessed from
/// the words alone before they are parsed (`apply` first, a `nonstop` anywhere: the mode), so
/// that `main` can have iced-x86's instruction tables built while another thread parses the
/// arguments, loads the patch and starts the apply. A wrong guess costs CPU time, never a
/// wrong result: the arguments are parsed for real all the same. With `--boost` among them,
/// the priority is raised here already (for every thread started from now on).
pub fn early_apply(args: impl Iterator<Item = std::ffi::OsString>) -> Option<Mode> {
    let words: Vec<std::ffi::OsString> = args.skip(1).collect();
    if words.first().is_none_or(|w| w != "apply") {
        return None;
    }
    if words.iter().any(|w| w == "--boost") {
        raise_priority();
    }
    let nonstop = words
        .iter()
        .any(|w| w.to_str().is_some_and(|w| w.ends_with("nonstop")));
    Some(if nonstop { Mode::Nonstop } else { Mode::Stop })
}

/// The command line `livepatch apply PID PATCH`, exactly those three words (the usual form:
/// defaults for everything else), parsed without clap into what clap gives for them: building
/// clap's parser for all the commands costs an apply ~0.1 ms on its critical path. `None` for
/// any other command line, which clap parses (and explains when it is wrong): another word
/// or option, a PID that is not a positive number, a PATCH starting with `-`.
pub fn plain_apply(args: impl Iterator<Item = std::ffi::OsString>) -> Option<Cli> {
    let words: Vec<std::ffi::OsString> = args.skip(1).collect();
    let [command, pid, patch] = &words[..] else {
        return None;
    };
    if command != "apply" || patch.is_empty() || patch.as_encoded_bytes().starts_with(b"-") {
        return None;
    }
    Some(Cli {
        command: Command::Apply {
            pid: parse_pid(pid.to_str()?).ok()?,
            patch: PathBuf::from(patch),
            mode: ModeArg::Stop,
            timeout: parse_timeout(DEFAULT_TIMEOUT).ok()?,
            json: false,
            boost: false,
        },
    })
}

/// What `main` noted at its start for [`end_process`].
struct Start {
    /// CLOCK_MONOTONIC at the start of `main`, in nanoseconds.
    entered_ns: u64,
    /// The signal mask before [`interrupts_deferred`] blocked the interrupts, if it did.
    mask: std::sync::OnceLock<Mask>,
}

/// A signal mask (plain data).
#[derive(Clone, Copy)]
struct Mask(libc::sigset_t);

static START: std::sync::OnceLock<Start> = std::sync::OnceLock::new();

/// Notes the start of `main` (CLOCK_MONOTONIC, nanoseconds) for the `LIVEPATCH_TRACE` line of
/// [`end_process`], and starts [`trace_point`]'s clock.
pub fn started(entered_ns: u64) {
    let _ = START.set(Start {
        entered_ns,
        mask: std::sync::OnceLock::new(),
    });
    trace_origin();
}

/// Notes that `main` blocked the interrupts until the command is over; `old` is the mask to
/// restore then (see [`end_process`]).
pub fn interrupts_deferred(old: libc::sigset_t) {
    if let Some(s) = START.get() {
        let _ = s.mask.set(Mask(old));
    }
}

/// [`interrupts_deferred`] was called.
pub fn interrupts_are_deferred() -> bool {
    START.get().is_some_and(|s| s.mask.get().is_some())
}

/// Ends the process, from any thread, once the command is over: the `LIVEPATCH_TRACE` line
/// with the process's figures, `error` on one line, stdout flushed, the interrupts held back
/// meanwhile delivered (one that came ends the process now, by its default action: a shell
/// sees "killed by SIGINT", with the target whole), then the exit code of `error`'s kind (0
/// without one). Nothing else runs: no destructor, no other thread (an apply calls this on
/// its tracer thread, see `apply::apply_then`).
pub fn end_process(error: Option<&Error>) -> ! {
    use std::io::Write as _;
    if let Some(start) = START.get().filter(|_| TRACE_ORIGIN.get().is_some()) {
        trace_process(start.entered_ns);
    }
    if let Some(e) = error {
        eprintln!("livepatch: error: {e}");
    }
    let _ = std::io::stdout().flush();
    if let Some(Mask(old)) = START.get().and_then(|s| s.mask.get()) {
        // SAFETY: restores the signal mask noted by `interrupts_deferred`; no memory involved.
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, old, std::ptr::null_mut());
        }
    }
    let code = error.map_or(0, |e| e.kind().exit_code());
    // SAFETY: _exit ends the process at once; our output is flushed above (stderr is not
    // buffered), and nothing else is owed to anyone: every thread of the target was let go.
    unsafe { libc::_exit(code) }
}

/// CLOCK_MONOTONIC in nanoseconds (the clock a benchmark's `Instant` reads).
pub fn monotonic_ns() -> u64 {
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

/// `--timeout`: seconds, fractions allowed (a usage error otherwise, exit 2).
fn parse_timeout(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| "expected a number of seconds".to_string())?;
    if !(secs.is_finite() && secs >= 0.0) {
        return Err("expected a number of seconds >= 0".into());
    }
    Duration::try_from_secs_f64(secs).map_err(|_| "too many seconds".into())
}

/// A process id: a positive number (a usage error otherwise, exit 2).
fn parse_pid(s: &str) -> Result<i32, String> {
    match s.parse::<i32>() {
        Ok(pid) if pid > 0 => Ok(pid),
        _ => Err("expected a process id (a positive number)".into()),
    }
}

/// `LIVEPATCH_TRACE`: prints `what` with the microseconds since [`trace_origin`] (the start of
/// `main`), for the steps of an invocation outside the operation's own phases (the patch
/// loaded, the tracer thread joined and reaped...).
pub fn trace_point(what: &str) {
    if let Some(origin) = TRACE_ORIGIN.get() {
        eprintln!(
            "livepatch: trace: {what} at {} us after main",
            origin.elapsed().as_micros()
        );
    }
}

/// Starts [`trace_point`]'s clock when `LIVEPATCH_TRACE` is set ([`started`] calls this).
pub fn trace_origin() {
    if std::env::var_os("LIVEPATCH_TRACE").is_some() {
        let _ = TRACE_ORIGIN.set(std::time::Instant::now());
    }
}

static TRACE_ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

/// Loads a patch file; a format error names the file (the reader's own message does not).
/// The Python binding's `Patch.load` calls this too, so both say the same.
pub fn load_patch(path: &std::path::Path) -> Result<crate::patchfile::Patch, Error> {
    crate::patchfile::Patch::load(path).map_err(|e| match Error::from(e) {
        Error::Format(why, kind) if kind != ErrorKind::Io => {
            Error::Format(format!("{}: {why}", path.display()), kind)
        }
        other => other,
    })
}

/// `--boost`: nice -20 for this thread, and so for every thread it starts afterwards (the
/// tracer, the warm-up) — Linux keeps a nice value per thread and new threads inherit it. (Not
/// the threads the tracer starts once it runs real-time: `SCHED_RESET_ON_FORK` starts them at
/// nice 0, see `process/realtime.rs`; the planner raises itself.)
/// Only this short-lived process changes: the target's threads keep their priority. Under
/// the CFS scheduler a thread at nice -20 weighs ~87 times one at 0, so the target's threads
/// waking up every few microseconds (and other work) no longer preempt the tool between
/// every two system calls; they still run, at a smaller share, while it works.
///
/// Not a real-time class for every thread on purpose: iced-x86 builds its tables under a
/// spinning `Once`, and a real-time thread spinning on it while the initializing thread waits
/// for the same CPU never yields — a run of the tool at SCHED_FIFO with three threads on two
/// CPUs spun for minutes. (The tracer thread alone runs SCHED_FIFO since session 13: it waits
/// for the tables asleep, `process/realtime.rs`.) Fails with a warning when not allowed.
fn raise_priority() {
    // `early_apply` may have raised it already on the thread that started this one (which
    // inherited it), or failed to: once is enough, and so is one warning.
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    // SAFETY: getpriority has no memory arguments; 0 names the calling thread (Linux).
    if unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) } == -20 {
        return;
    }
    // SAFETY: setpriority has no memory arguments; 0 names the calling thread (Linux).
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, -20) } != 0
        && !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed)
    {
        eprintln!(
            "livepatch: warning: --boost: cannot raise the priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind as UsageError;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("livepatch").chain(args.iter().copied()))
    }

    #[test]
    fn timeout_takes_fractions_and_refuses_negative_or_not_a_number() {
        let cli = parse(&["apply", "42", "p.lp", "--timeout", "0.25"]).unwrap();
        let Command::Apply { timeout, boost, .. } = cli.command else {
            panic!("not apply")
        };
        assert_eq!(timeout, Duration::from_millis(250));
        assert!(!boost);
        for bad in ["-1", "nan", "inf", "abc", "1e30"] {
            let e = parse(&["revert", "42", "--timeout", bad]).unwrap_err();
            assert_eq!(e.kind(), UsageError::ValueValidation, "--timeout {bad}");
            assert!(e.to_string().contains("seconds"), "{e}");
        }
    }

    /// `plain_apply` gives what clap gives for `apply PID PATCH`, and leaves every other command
    /// line to clap.
    #[test]
    fn plain_apply_is_what_clap_parses_or_nothing() {
        let os = |args: &[&str]| -> Vec<std::ffi::OsString> {
            std::iter::once("livepatch")
                .chain(args.iter().copied())
                .map(Into::into)
                .collect()
        };
        for args in [
            &["apply", "42", "p.lp"][..],
            &["apply", "+7", "dir/with space.lp"],
            &["apply", "2147483647", "help"],
        ] {
            let fast = plain_apply(os(args).into_iter()).expect("plain form");
            let clap = parse(args).unwrap();
            assert_eq!(format!("{fast:?}"), format!("{clap:?}"), "{args:?}");
        }
        for args in [
            &["apply", "42", "p.lp", "--json"][..],
            &["apply", "42", "p.lp", "--mode", "nonstop"],
            &["apply", "--boost", "42", "p.lp"],
            &["apply", "42", "--json"],
            &["apply", "42", "-"],
            &["apply", "42", ""],
            &["apply", "0", "p.lp"],
            &["apply", "-5", "p.lp"],
            &["apply", "x", "p.lp"],
            &["apply", "42"],
            &["revert", "42", "abc"],
            &["status", "42", "x"],
        ] {
            assert!(plain_apply(os(args).into_iter()).is_none(), "{args:?}");
        }
    }

    #[test]
    fn a_pid_is_a_positive_number() {
        for bad in ["0", "-5", "x"] {
            for cmd in [
                vec!["apply", bad, "p.lp"],
                vec!["revert", bad],
                vec!["status", bad],
            ] {
                let e = parse(&cmd).unwrap_err();
                assert_eq!(e.kind(), UsageError::ValueValidation, "{cmd:?}");
                assert!(e.to_string().contains("process id"), "{e}");
            }
        }
        assert!(parse(&["status", "1"]).is_ok());
    }

    #[test]
    fn a_patch_file_that_is_not_one_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("notes.txt");
        std::fs::write(&file, "hello, not a patch").unwrap();
        let e = load_patch(&file).unwrap_err();
        assert!(
            e.to_string().starts_with(&format!("{}: ", file.display())),
            "{e}"
        );
        assert_eq!(e.kind().exit_code(), 7);
        // A file that cannot be read already says which.
        let missing = dir.path().join("missing.lp");
        let e = load_patch(&missing).unwrap_err().to_string();
        assert_eq!(e.matches("missing.lp").count(), 1, "{e}");
    }

    /// --boost lowers the nice value of the thread that asks and of the threads it starts (the
    /// tracer and warm-up threads of apply), not of anything else.
    #[test]
    fn boost_raises_this_thread_and_the_threads_it_starts() {
        let cli = parse(&["apply", "42", "p.lp", "--boost"]).unwrap();
        assert!(matches!(cli.command, Command::Apply { boost: true, .. }));
        let nice = || {
            // SAFETY: getpriority has no memory arguments; 0 names the calling thread.
            unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
        };
        let before = nice();
        let (own, child) = std::thread::spawn(move || {
            raise_priority();
            (nice(), std::thread::spawn(nice).join().unwrap())
        })
        .join()
        .unwrap();
        // SAFETY: geteuid has no arguments.
        if unsafe { libc::geteuid() } != 0 {
            return; // not allowed here: raise_priority warned
        }
        assert_eq!((own, child), (-20, -20));
        assert_eq!(nice(), before, "the caller's own thread is unchanged");
    }
}
