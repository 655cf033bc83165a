//! The `murmur-coordinator` binary: parses the command line, checks it,
//! and runs the coordinator until SIGINT, SIGTERM or a Shutdown call.

use std::process::ExitCode;

use clap::Parser;
use murmur_coordinator::config::CoordinatorOptions;

fn main() -> ExitCode {
    let opts = match CoordinatorOptions::try_parse() {
        Ok(o) => o,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!(
                "{}",
                e.render().to_string().lines().next().unwrap_or("error: bad arguments")
            );
            return ExitCode::from(2);
        }
    };
    let cfg = match opts.resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("murmur-coordinator: {e}");
            return ExitCode::from(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("MURMUR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("murmur-coordinator: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(murmur_coordinator::daemon::run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("murmur-coordinator: {e}");
            ExitCode::FAILURE
        }
    }
}
