//! The `distillery` command line.

use anyhow::Result;
use clap::{Parser, Subcommand};

mod generate;

#[derive(Parser)]
#[command(
    name = "distillery",
    version,
    about = "Serve small distilled student LLMs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate one completion and stream its text to stdout.
    Generate(generate::GenerateArgs),
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match Cli::parse().command {
        Command::Generate(args) => generate::run(args),
    }
}
