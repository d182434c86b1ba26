//! owfs: the command-line edge. Parses arguments, opens the store, runs one command, and turns
//! errors into one clear line, a hint and a distinct exit status.

mod cli;
mod commands;
mod exit;
mod fuse_util;
mod mount;
mod timetravel;
mod ui;
mod ws;

use clap::Parser;

fn main() {
    // Like other command-line tools, end quietly when a reader closes the pipe
    // (`owfs cat WS f | head`) instead of failing on the write.
    // SAFETY: restoring the default disposition of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = cli::Cli::parse();
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
    std::process::exit(code);
}
