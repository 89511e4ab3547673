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

/// Switch mode on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ModeArg {
    /// Stop every thread, check their stacks, switch (default).
    Stop,
    /// Threads keep running; int3 protocol with the tool as tracer.
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
        pid: i32,
        /// The patch file.
        patch: PathBuf,
        /// How to switch.
        #[arg(long, value_enum, default_value = "stop")]
        mode: ModeArg,
        /// Stop mode: give up after this many seconds while a thread is inside a function
        /// being replaced.
        #[arg(long, default_value_t = 5.0)]
        timeout: f64,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Take a patch back out (the newest one by default).
    Revert {
        /// The process.
        pid: i32,
        /// The patch id (or a unique prefix of it).
        patch_id: Option<String>,
        /// How to switch.
        #[arg(long, value_enum, default_value = "stop")]
        mode: ModeArg,
        /// Stop mode: give up after this many seconds while a thread is inside a function
        /// being reverted.
        #[arg(long, default_value_t = 5.0)]
        timeout: f64,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the patches applied to a process, or to every process.
    Status {
        /// The process (default: every process with patches).
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
        } => {
            let patch = crate::patchfile::Patch::load(&patch)?;
            let opts = ApplyOptions {
                mode: mode.into(),
                timeout: secs(timeout)?,
            };
            let applied = apply::apply(pid, &patch, opts)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&applied).unwrap_or_default()
                );
            } else {
                println!(
                    "applied patch {} to process {} ({} mode, stall {} us, total {} us)",
                    applied.id, pid, applied.mode, applied.stats.stall_us, applied.total_us
                );
                for f in &applied.functions {
                    println!(
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
            }
            Ok(())
        }
        Command::Revert {
            pid,
            patch_id,
            mode,
            timeout,
            json,
        } => {
            let r = crate::revert::revert(pid, patch_id.as_deref(), mode.into(), secs(timeout)?)?;
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

fn secs(s: f64) -> Result<Duration, Error> {
    if !(s.is_finite() && s >= 0.0) {
        return Err(Error::Format(
            format!("bad --timeout {s}: expected a number of seconds >= 0"),
            ErrorKind::Other,
        ));
    }
    Ok(Duration::from_secs_f64(s))
}
