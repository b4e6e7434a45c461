//! `ibex-proxy`: parse the config, start the authd bridge, bind, announce
//! `IBEX_READY http=<addr> admin=<addr>` (`https=` with TLS) on stdout, serve until SIGTERM, drain, exit 0.
//! Everything per request lives in `ibex_proxy::chain`.

use std::io::Write;
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use ibex_proxy::auth::bridge::authd_endpoint;
use ibex_proxy::auth::bridge::Bridge;
use ibex_proxy::chain::access_log;
use ibex_proxy::chain::wiring::Wiring;
use ibex_proxy::clock::SystemClock;
use ibex_proxy::config::{Config, LedgerSwitch};
use ibex_proxy::ledger::meter::MeterFactory;
use ibex_proxy::ledger::prices::{PriceBook, Prices};
use ibex_proxy::ledger::shipper::AuthdSink;
use ibex_proxy::ledger::Ledger;
use ibex_proxy::providers::ProviderBook;
use ibex_proxy::server::Server;
use ibex_proxy::upstream::router::Router;
use secrecy::ExposeSecret;

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
    let providers = check_before_serving(&config)?;
    let bridge = Bridge::start(config.authd_bridge().map_err(anyhow::Error::msg)?)
        .context("IBEX_AUTHD_GRPC")?;
    let (ledger, meters, prices) = match config.usage_ledger {
        LedgerSwitch::On => {
            let (ledger, meters, prices) = start_ledger(&config)?;
            (Some(ledger), Some(meters), prices)
        }
        LedgerSwitch::Off => {
            // Refused in production by `validate`; only for measuring what the ledger costs.
            tracing::warn!("IBEX_USAGE_LEDGER=off: forwarded requests are NOT recorded");
            (None, None, None)
        }
    };
    let mut server = Server::bind(config.server())
        .with_context(|| format!("binding {} (admin {})", config.listen, config.admin_listen))?;
    let addr = server.local_addr();
    let admin = server
        .admin_addr()
        .map_or_else(String::new, |a| a.to_string());
    let scheme = if server.is_tls() { "https" } else { "http" };
    if let Some((path, book)) = prices {
        // SIGHUP re-reads IBEX_PRICES_FILE (after the TLS pair); a bad file keeps the old prices.
        server.on_reload(Box::new(move || match book.reload(&path) {
            Ok(n) => tracing::info!(models = n, "prices reloaded"),
            Err(e) => tracing::error!(
                error = format!("{e:#}"),
                "prices not reloaded; keeping the old ones"
            ),
        }));
    }
    if let Some(book) = providers
        .clone()
        .filter(|_| config.providers_file.is_some())
    {
        // SIGHUP re-reads IBEX_PROVIDERS_FILE; a bad file keeps the old providers and routes.
        // Workers pick the new table up on their next request; requests in flight finish on
        // the connections they hold.
        server.on_reload(Box::new(move || match book.reload() {
            Ok(n) => tracing::info!(routes = n, "providers reloaded"),
            Err(e) => tracing::error!(
                error = format!("{e:#}"),
                "providers not reloaded; keeping the old ones"
            ),
        }));
    }
    let mut wiring = Wiring::new(config, bridge).with_providers(providers);
    if let Some(meters) = meters {
        wiring = wiring.with_ledger(meters);
    }
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
    // Whatever the workers recorded is written and fsynced; the rest ships on the next start.
    if let Some(ledger) = ledger {
        ledger.shutdown();
    }
    tracing::info!("drained; exiting");
    Ok(())
}

/// What `SIGHUP` re-reads into the price book, when a prices file is configured.
type PricesReload = Option<(std::path::PathBuf, Arc<PriceBook>)>;

/// Opens the usage spool, starts its shipper to authd and loads the prices (SPEC §10).
fn start_ledger(config: &Config) -> anyhow::Result<(Ledger, MeterFactory, PricesReload)> {
    let mut ledger = Ledger::open(&config.ledger())?;
    let urls: Vec<String> = config
        .authd_grpc
        .split(',')
        .map(|u| u.trim().to_owned())
        .filter(|u| !u.is_empty())
        .collect();
    let endpoints = urls
        .iter()
        .map(|u| authd_endpoint(u, config.authd_ca_file.as_deref()))
        .collect::<anyhow::Result<Vec<_>>>()
        .context("IBEX_AUTHD_GRPC")?;
    // The same service key the bridge sends (checked by `authd_bridge` before this runs).
    let key = config
        .service_key
        .as_ref()
        .context("IBEX_SERVICE_KEY is required")?;
    let mut value = tonic::metadata::MetadataValue::try_from(key.expose_secret())
        .context("IBEX_SERVICE_KEY cannot go in a header")?;
    value.set_sensitive(true);
    ledger.ship(AuthdSink::new(
        endpoints,
        vec![("x-ibex-service-key", value)],
    )?)?;
    let prices = match &config.prices_file {
        Some(path) => Prices::load(path)?,
        None => Prices::default(),
    };
    tracing::info!(models = prices.len(), "prices loaded");
    let book = Arc::new(PriceBook::new(prices));
    let reload = config.prices_file.clone().map(|path| (path, book.clone()));
    let meters = MeterFactory {
        ledger: ledger.shared().clone(),
        prices: book,
    };
    Ok((ledger, meters, reload))
}

/// What would make every worker fail is refused before the ready line. Returns the providers
/// and routes every worker forwards by, if any are configured.
fn check_before_serving(config: &Config) -> anyhow::Result<Option<Arc<ProviderBook>>> {
    config.validate().map_err(anyhow::Error::msg)?;
    config.authd_bridge().map_err(anyhow::Error::msg)?;
    let Some(table) = Wiring::provider_table(config)? else {
        return Ok(None);
    };
    let routes = table.routes.len();
    let providers = table.providers.len();
    let book = Arc::new(ProviderBook::new(
        table,
        config.providers_file.clone(),
        config.upstream_timeout,
    ));
    monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()?
        .block_on(async {
            Router::new(
                book.clone(),
                Wiring::router_settings(config),
                Rc::new(SystemClock::new()),
                None,
            )
            .map(drop)
        })
        .context("IBEX_UPSTREAM_* / IBEX_PROVIDERS_FILE")?;
    tracing::info!(providers, routes, "providers loaded");
    Ok(Some(book))
}
