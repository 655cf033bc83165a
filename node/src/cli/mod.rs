//! The `murmur` command line: one subcommand per module.
//!
//! Exit codes: 0 success, 1 a failure while running, 2 bad input (flags,
//! config, data files) detected before anything was written.

mod bench_allreduce;
mod bench_transfer;
mod chaos;
mod cluster;
mod id;
mod plot;
mod progress;
mod run;
mod sim;
mod status;
mod train;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// murmur: peer-to-peer training with libtorch.
#[derive(Debug, Parser)]
#[command(name = "murmur", version, about, propagate_version = true)]
pub struct Cli {
    /// Log format on stderr: text or json
    #[arg(long, global = true, env = "MURMUR_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train one node locally, with no network.
    Train(Box<train::TrainArgs>),
    /// Run one node: train and mix with peers until the run ends.
    Run(Box<run::RunArgs>),
    /// Start a local cluster of N nodes on 127.0.0.1 and report the result.
    Cluster(Box<cluster::ClusterArgs>),
    /// Simulate many nodes in one process over a lossy network, in virtual time.
    Sim(Box<sim::SimArgs>),
    /// Run a cluster through a timeline of failures (kills, restarts, faults, partitions) and report what they did.
    Chaos(Box<chaos::ChaosArgs>),
    /// Show what running nodes are doing, from their API (HOST:PORT...).
    Status(status::StatusArgs),
    /// Exit 0 if the node or coordinator at HOST:PORT is serving (gRPC health), else 1.
    Health(status::HealthArgs),
    /// Inject, clear or list faults on a running node.
    Fault(status::FaultArgs),
    /// Ask a running node to write a checkpoint now.
    Checkpoint(status::NodeCallArgs),
    /// Ask a running node to stop gracefully (checkpoint, summary, exit 0).
    Shutdown(status::NodeCallArgs),
    /// Print a node's peer id (creates its key in --data-dir on first use).
    Id(id::IdArgs),
    /// Write a new pre-shared key file for a private swarm.
    SwarmKey(id::SwarmKeyArgs),
    /// Write a self-signed certificate and key for the API's TLS.
    ApiCert(id::ApiCertArgs),
    /// Transfer throughput benchmark (scripts/bench_transfer.py runs both ends).
    #[command(hide = true)]
    BenchTransfer(bench_transfer::BenchTransferArgs),
    /// All-reduce benchmark (scripts/bench_allreduce.py runs every rank).
    #[command(hide = true)]
    BenchAllreduce(bench_allreduce::BenchAllReduceArgs),
}

/// Why a command stopped.
#[derive(Debug)]
pub enum CliError {
    /// Bad input, found before anything was written: exit 2.
    Usage(String),
    /// Something failed while running: exit 1.
    Failed(String),
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Usage(m) | CliError::Failed(m) => f.write_str(m),
        }
    }
}

impl CliError {
    pub fn usage(e: impl std::fmt::Display) -> CliError {
        CliError::Usage(e.to_string())
    }

    pub fn failed(e: impl std::fmt::Display) -> CliError {
        CliError::Failed(e.to_string())
    }
}

/// Runs the command line and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return flag_error(e),
    };
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Train(args) => train::run(*args),
        Command::Run(args) => run::run(*args),
        Command::Cluster(args) => cluster::run(*args),
        Command::Sim(args) => sim::run(*args),
        Command::Chaos(args) => chaos::run(*args),
        Command::Status(args) => status::status(args),
        Command::Health(args) => status::health(args),
        Command::Fault(args) => status::fault(args),
        Command::Checkpoint(args) => status::checkpoint(args),
        Command::Shutdown(args) => status::shutdown(args),
        Command::Id(args) => id::id(args),
        Command::SwarmKey(args) => id::swarm_key(args),
        Command::ApiCert(args) => id::api_cert(args),
        Command::BenchTransfer(args) => bench_transfer::run(args),
        Command::BenchAllreduce(args) => bench_allreduce::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Usage(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(2)
        }
        Err(CliError::Failed(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(1)
        }
    }
}

/// Help and version go out as clap prints them; a flag error becomes one
/// line (clap's own spans several) and exit code 2.
fn flag_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion)
        || matches!(e.kind(), ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand)
    {
        e.exit();
    }
    let rendered = e.render().to_string();
    let line: Vec<&str> = rendered
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more information")
        })
        .collect();
    let line = line.join(" ");
    eprintln!("{}", if line.starts_with("error:") { line } else { format!("error: {line}") });
    ExitCode::from(2)
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MURMUR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // Colour only on a terminal: a log file or pipe gets plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
