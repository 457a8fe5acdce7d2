//! The loadtest's trivial canned-completion server as a process of its own, so a benchmark can
//! run it beside a real daemon and compare: `cargo run --release -p distillery-loadtest
//! --example canned_server -- --port 0` prints `canned server listening on http://127.0.0.1:PORT`
//! and serves until Ctrl-C or `--max-seconds` (so a forgotten one stops by itself).

use std::time::Duration;

use clap::Parser;
use distillery_loadtest::canned::CannedServer;

#[derive(Parser)]
struct Args {
    /// Port on 127.0.0.1 (0 = any free port).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Server runtime threads (1 = single-threaded).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Stop after this many seconds.
    #[arg(long, default_value_t = 900)]
    max_seconds: u64,
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let server = CannedServer::start(args.port, args.threads)?;
    println!("canned server listening on {}", server.url());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = tokio::time::sleep(Duration::from_secs(args.max_seconds)) => {}
        }
    });
    drop(server);
    Ok(())
}
