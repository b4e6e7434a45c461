//! ibexctl: one command, one JSON object on stdout (or a message on stderr and a non-zero exit).

use clap::Parser;
use ibex_authd::ctl::{self, Cli};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match ctl::run(cli).await {
        Ok(out) => {
            // Empty when the command streamed its own output (`usage export`).
            if !out.is_empty() {
                println!("{out}");
            }
            std::process::ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("ibexctl: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
