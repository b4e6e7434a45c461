//! ibex-authd: parse config, start, print the ready line, run until SIGTERM/SIGINT, drain.

use clap::Parser;
use ibex_authd::config::{init_logging, AuthdConfig};
use ibex_authd::server::{self, Settings};
use tokio::signal::unix::{signal, SignalKind};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = AuthdConfig::parse();
    init_logging(&config.log);
    match run(config).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "ibex-authd failed");
            eprintln!("ibex-authd: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(config: AuthdConfig) -> anyhow::Result<()> {
    let settings = Settings::from_config(&config)?;
    if settings.admin.is_none() {
        tracing::warn!("IBEX_ADMIN_KEY is not set: admin calls will be refused");
    }
    drop(config);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let running = server::start(settings).await?;
    tracing::info!(grpc = %running.grpc_addr, http = %running.http_addr, "ibex-authd listening");
    println!(
        "IBEX_READY grpc={} http={}",
        running.grpc_addr, running.http_addr
    );
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = int.recv() => tracing::info!("SIGINT: draining"),
    }
    running.stop().await
}
