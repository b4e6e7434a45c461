//! `ibex-proxy`: parse the config, start the authd bridge, bind, announce
//! `IBEX_READY http=<addr> admin=<addr>` (`https=` with TLS) on stdout, serve until SIGTERM, drain, exit 0.
//! Everything per request lives in `ibex_proxy::chain`.

use std::io::Write;
use std::process::ExitCode;
use std::rc::Rc;

use anyhow::Context;
use clap::Parser;
use ibex_proxy::auth::bridge::Bridge;
use ibex_proxy::chain::access_log;
use ibex_proxy::chain::wiring::Wiring;
use ibex_proxy::clock::SystemClock;
use ibex_proxy::config::Config;
use ibex_proxy::server::Server;
use ibex_proxy::upstream::Upstream;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let config = Config::parse();
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&config.log))
        .with_current_span(true)
        .with_span_list(false)
        .with_writer(access_log::Stderr)
        .init();
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "ibex-proxy stopped");
            ExitCode::FAILURE
        }
    }
}

fn run(config: Config) -> anyhow::Result<()> {
    check_before_serving(&config)?;
    let bridge = Bridge::start(config.authd_bridge().map_err(anyhow::Error::msg)?)
        .context("IBEX_AUTHD_GRPC")?;
    let server = Server::bind(config.server())
        .with_context(|| format!("binding {} (admin {})", config.listen, config.admin_listen))?;
    let addr = server.local_addr();
    let admin = server
        .admin_addr()
        .map_or_else(String::new, |a| a.to_string());
    let scheme = if server.is_tls() { "https" } else { "http" };
    let wiring = Wiring::new(config, bridge);
    wiring
        .registry()
        .register_listeners(server.listener_stats());
    tracing::info!(%scheme, listen = %addr, %admin, threads = wiring.threads(), "ibex-proxy serving");
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "IBEX_READY {scheme}={addr} admin={admin}")?;
    stdout.flush()?;
    drop(stdout);

    server.run(move |worker| match wiring.build_worker(worker) {
        Ok(chain) => chain,
        Err(e) => {
            // Checked before serving; reaching this is a bug or a race with
            // the filesystem. A worker without its chain must not serve.
            tracing::error!(worker, error = format!("{e:#}"), "cannot build worker");
            std::process::exit(1);
        }
    })?;
    tracing::info!("drained; exiting");
    Ok(())
}

/// What would make every worker fail is refused before the ready line.
fn check_before_serving(config: &Config) -> anyhow::Result<()> {
    config.validate().map_err(anyhow::Error::msg)?;
    config.authd_bridge().map_err(anyhow::Error::msg)?;
    if let Some(upstream) = Wiring::upstream_config(config) {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .build()?
            .block_on(async {
                Upstream::new(Rc::new(upstream), Rc::new(SystemClock::new())).map(drop)
            })
            .context("IBEX_UPSTREAM_*")?;
    }
    Ok(())
}
