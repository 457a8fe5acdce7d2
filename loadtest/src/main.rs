//! The `distillery-loadtest` binary: parses flags, builds the tokio runtime the flags ask for,
//! and runs `distillery_loadtest::run_cli`. Everything else lives in the library so the tests
//! drive exactly what the binary does.

use std::process::ExitCode;

use clap::Parser;
use distillery_loadtest::Args;

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(distillery_loadtest::run_cli(&args)) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
