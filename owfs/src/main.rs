//! owfs: the command-line edge. Parses arguments, opens the store, runs one command, and turns
//! errors into one clear line, a hint and a distinct exit status.

mod cli;
mod commands;
mod mount_helper;
mod ui;

use owfs::{exit, mount};

use clap::Parser;

fn main() {
    // Like other command-line tools, end quietly when a reader closes the pipe
    // (`owfs cat WS f | head`) instead of failing on the write.
    // SAFETY: restoring the default disposition of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    owfs::daemon::faults::warn_if_ignored();
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let helper = mount_helper::invoked_as_helper(&argv0);
    let cli = if helper {
        match helper_cli() {
            Ok(Some(cli)) => cli,
            Ok(None) => std::process::exit(0),
            Err(msg) => {
                eprintln!("mount.owfs: {msg}");
                eprintln!(
                    "  usage: mount -t owfs WS[@N] DIR [-o store=URL,cache_dir=DIR,OPTIONS] (see `owfs mount --help`)"
                );
                std::process::exit(mount_helper::EXIT_USAGE);
            }
        }
    } else {
        cli::Cli::parse()
    };
    // What owfs creates (store objects, the cache, logs) is the owner's alone, whatever the
    // caller's umask (docs/decisions/local-files-private.md); a restore writes each file with
    // the mode the generation recorded, under the caller's umask for what it does not.
    if !matches!(cli.command, cli::Command::Restore { .. }) {
        rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("owfs-io")
        .build()
        .expect("starting the async runtime");
    let code = match commands::run(&cli, rt.handle().clone()) {
        Ok(code) => code,
        Err(e) => {
            // One line, even when a store's answer (an XML body) spans several.
            let line = e
                .to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            eprintln!("owfs: error: {line}");
            eprintln!("  hint: {}", exit::hint(&e));
            exit::code(&e)
        }
    };
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    // As mount(8)'s helper, answer in its statuses (the error line above says which failure).
    let code = match code {
        c if !helper || c == 0 => c,
        exit::USAGE => mount_helper::EXIT_USAGE,
        _ => mount_helper::EXIT_FAILURE,
    };
    std::process::exit(code);
}

/// The command line of `mount.owfs` (run by mount(8)) as an `owfs mount` one, after the
/// environment file is read; None for `-f` (fake), once everything checked out.
fn helper_cli() -> Result<Option<cli::Cli>, String> {
    let args = std::env::args_os()
        .skip(1)
        .map(|a| {
            a.into_string()
                .map_err(|a| format!("argument {a:?} is not UTF-8"))
        })
        .collect::<Result<Vec<String>, String>>()?;
    let inv = mount_helper::translate(&args, |o| {
        mount::MountOpts::parse(Some(o))
            .map(|_| ())
            .map_err(|e| e.to_string())
    })?;
    if let Some(f) = &inv.env_file {
        let text = std::fs::read_to_string(f).map_err(|e| {
            format!(
                "{}: {e}{}",
                f.display(),
                if inv.env_file_explicit {
                    ""
                } else {
                    " (the default environment file)"
                }
            )
        })?;
        let vars =
            mount_helper::parse_env_file(&text).map_err(|e| format!("{}: {e}", f.display()))?;
        for (k, v) in vars {
            if std::env::var_os(&k).is_none() {
                // Single-threaded here: no runtime or other thread has started yet.
                std::env::set_var(k, v);
            }
        }
    }
    let cli = <cli::Cli as clap::Parser>::try_parse_from(&inv.argv).map_err(|e| {
        e.to_string()
            .lines()
            .next()
            .unwrap_or_default()
            .trim_start_matches("error: ")
            .to_string()
    })?;
    Ok((!inv.fake).then_some(cli))
}
