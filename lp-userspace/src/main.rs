//! `livepatch`: live-patch running processes. Errors are one line on stderr and a non-zero
//! exit code that says which kind (see `ErrorKind::exit_code`).
use clap::Parser;
use lp_userspace::cli::{self, Cli};

fn main() {
    // Behave like other command-line tools when the reader of our output goes away
    // (`livepatch status | head`): end quietly instead of failing on EPIPE.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
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
    if let Err(e) = cli::run(cli) {
        eprintln!("livepatch: error: {e}");
        std::process::exit(e.kind().exit_code());
    }
}
