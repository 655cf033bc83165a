//! The `murmur` binary: parses the command line and hands off to `cli`.

use std::process::ExitCode;

fn main() -> ExitCode {
    murmur::cli::main()
}
