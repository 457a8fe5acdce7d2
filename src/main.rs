//! The `distillery` command line.

use anyhow::Result;
use clap::{Parser, Subcommand};

use distillery::config::{InvalidSettings, LogFormat};

mod gen_model;
mod generate;
mod serve;

/// The daemon allocates small buffers on one thread and frees them on another all the time
/// (request bodies, token events, response JSON); mimalloc handles that pattern far better
/// than glibc's arenas.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Run the OpenAI-compatible HTTP daemon.
    Serve(Box<serve::ServeArgs>),
    /// Generate one completion and stream its text to stdout.
    Generate(generate::GenerateArgs),
    /// Write a model folder with a preset architecture and random bf16 weights (benchmarks).
    GenModel(gen_model::GenModelArgs),
}

/// Prints why the settings cannot work and exits with [`EXIT_BAD_SETTINGS`], so supervisors
/// and CI tell a configuration error from a crash.
fn refuse_settings(e: &anyhow::Error) -> ! {
    eprintln!("error: {e:#}");
    std::process::exit(EXIT_BAD_SETTINGS)
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Pretty => builder.init(),
    }
}

/// candle asks for the thread count on every matmul and, without this variable, works it out
/// by reading /proc and /sys each time; set it once, before any thread starts. Engine replicas
/// share the cores: each gets its part for the ops it splits across threads.
fn set_op_threads(engine_replicas: usize) {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let n = (cores / engine_replicas.max(1)).max(1);
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// Exit status for settings that cannot work, as clap uses for a bad flag.
const EXIT_BAD_SETTINGS: i32 = 2;

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Serve(args) => {
            let mut settings = args.settings().unwrap_or_else(|e| refuse_settings(&e));
            init_logging(settings.log_format);
            // Before any thread starts: the op threads are the cores shared by the replicas.
            serve::resolve_replicas(&mut settings)?;
            set_op_threads(settings.replicas());
            serve::run(settings).inspect_err(|e| {
                if e.downcast_ref::<InvalidSettings>().is_some() {
                    refuse_settings(e)
                }
            })
        }
        Command::Generate(args) => {
            set_op_threads(1);
            init_logging(LogFormat::Pretty);
            generate::run(args)
        }
        Command::GenModel(args) => {
            set_op_threads(1);
            gen_model::run(args)
        }
    }
}
