//! Configuration from `IBEX_*` environment variables (SPEC §9), parsed once
//! into one typed struct. Every field is also a `--flag`, and `--help` lists
//! each variable with its default. A bad value is reported by clap with the
//! variable's name and the process exits non-zero (status 2). Values that may
//! hold a secret (`IBEX_REDIS_URL`) are checked after parsing instead, by
//! [`Config::validate`], whose messages never quote the value (clap's do).
//!
//! Not here: anything derived per worker (see `chain::wiring`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Parser, ValueEnum};
use secrecy::{ExposeSecret, SecretString};

use crate::auth::bridge::BridgeConfig;
use crate::http::Limits;
use crate::ratelimit::RateLimitConfig;
use crate::server::ServerConfig;
use crate::tls::{MinVersion, TlsFiles};

/// Deployment environment; `production` tightens nothing in the proxy yet but
/// is logged so operators can see what a process believes it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Environment {
    Development,
    Test,
    Staging,
    Production,
}

/// `IBEX_USAGE_LEDGER`: whether forwarded requests are recorded (always, outside benchmarks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LedgerSwitch {
    On,
    Off,
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "ibex-proxy",
    version,
    about = "IBEX Harness edge proxy: thread-per-core HTTP/1.1 with token auth, agent identity, \
             permissions and per-org rate limits in front of an OpenAI-compatible upstream"
)]
pub struct Config {
    /// Address every worker binds (SO_REUSEPORT).
    #[arg(long, env = "IBEX_PROXY_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Plain-HTTP admin listener for /metrics, /health and /ready (served by
    /// one worker). Keep it on loopback or a private network: /metrics labels
    /// carry org ids.
    #[arg(
        long,
        env = "IBEX_PROXY_ADMIN_LISTEN",
        default_value = "127.0.0.1:9090"
    )]
    pub admin_listen: SocketAddr,

    /// PEM certificate chain (leaf first). With IBEX_TLS_KEY_FILE, the public
    /// listener speaks TLS only; SIGHUP re-reads both files.
    #[arg(long, env = "IBEX_TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,

    /// PEM private key of IBEX_TLS_CERT_FILE's leaf (ECDSA, RSA or Ed25519).
    #[arg(long, env = "IBEX_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,

    /// Lowest TLS version accepted on the public listener: 1.3 or 1.2.
    #[arg(long, env = "IBEX_TLS_MIN_VERSION", default_value = "1.3")]
    pub tls_min_version: MinVersion,

    /// Open connections per client address (IPv4, IPv6 /64) across all
    /// workers; beyond it a new connection is closed at accept. 0 = no cap.
    #[arg(long, env = "IBEX_MAX_CONNS_PER_IP", default_value_t = 256)]
    pub max_conns_per_ip: u32,

    /// Worker threads, one monoio runtime each (default: available cores).
    #[arg(long, env = "IBEX_PROXY_THREADS", default_value_t = default_threads(),
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: u16,

    /// Pin each worker to one CPU of the process affinity mask.
    #[arg(long, env = "IBEX_PROXY_PIN_CPUS", default_value_t = false, action = ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub pin_cpus: bool,

    /// authd gRPC address(es) (token/agent validation and the invalidation feed): one, or
    /// several comma-separated (`http://a:9091,http://b:9091`, at most 16): validations go
    /// to the least busy healthy one, and the proxy holds a feed from each.
    #[arg(long, env = "IBEX_AUTHD_GRPC", default_value = "http://127.0.0.1:9091",
          value_parser = parse_authd_urls)]
    pub authd_grpc: String,

    /// Key presented to authd on ValidateToken, ValidateAgent and WatchInvalidations
    /// (`x-ibex-service-key`); the same value as authd's. Required, at least 32 characters.
    #[arg(long, env = "IBEX_SERVICE_KEY", hide_env_values = true, value_parser = parse_secret)]
    pub service_key: Option<SecretString>,

    /// PEM CA certificate(s) to trust for an `https://` IBEX_AUTHD_GRPC (default: system roots).
    #[arg(long, env = "IBEX_AUTHD_CA_FILE")]
    pub authd_ca_file: Option<PathBuf>,

    /// Redis holding the per-org rate-limit counters: redis://[:password@]host[:port][/db]
    /// only (no TLS, no unix socket). A Redis Cluster is found out by itself from any one
    /// node, or from a seed list: redis://[:password@]host:port,host:port,... (db 0).
    /// The password is never printed.
    #[arg(
        long,
        env = "IBEX_REDIS_URL",
        default_value = "redis://127.0.0.1:6379/0",
        hide_env_values = true
    )]
    pub redis_url: String,

    /// Longest a rate-limit check waits for Redis before the request is
    /// admitted anyway (fail open, counted in metrics).
    #[arg(long, env = "IBEX_REDIS_TIMEOUT", default_value = "25ms",
          value_parser = parse_positive_duration)]
    pub redis_timeout: Duration,

    /// Deadline for one authd validation on a cache miss; past it → 503 AUTH_UNAVAILABLE.
    #[arg(long, env = "IBEX_AUTH_VALIDATE_TIMEOUT", default_value = "50ms",
          value_parser = parse_positive_duration)]
    pub auth_validate_timeout: Duration,

    /// How stale the invalidation feed may be before cached credentials are
    /// re-validated (and revocations must be enforced within).
    #[arg(long, env = "IBEX_REVOCATION_SLA_MS", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub revocation_sla_ms: u64,

    /// Requests per minute for an org whose own limit is 0.
    #[arg(long, env = "IBEX_DEFAULT_RPM", default_value_t = 600,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub default_rpm: u32,

    /// Tokens per minute for an org without its own `tpm_limit` (0 = no limit).
    #[arg(long, env = "IBEX_DEFAULT_TPM", default_value_t = 0)]
    pub default_tpm: u64,

    /// Output tokens reserved for a chat request without `max_tokens` /
    /// `max_completion_tokens` (or what remains of the budget, if smaller).
    #[arg(long, env = "IBEX_DEFAULT_OUTPUT_RESERVE", default_value_t = 4096,
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub default_output_reserve: u64,

    /// Longest a finished request's token settle waits on its worker for
    /// the same org's next reservation to carry it (no round trip of its
    /// own); past it the worker's pending settles go in one call per org.
    #[arg(long, env = "IBEX_TOKEN_SETTLE_DELAY", default_value = "5ms",
          value_parser = parse_positive_duration)]
    pub token_settle_delay: Duration,

    /// Largest request body accepted (413 above it).
    #[arg(long, env = "IBEX_MAX_BODY_BYTES", default_value_t = Limits::DEFAULT_BODY_BYTES as u64,
          value_parser = clap::value_parser!(u64).range(1..=1_073_741_824))]
    pub max_body_bytes: u64,

    /// From a request's first byte until its head is complete (408 after;
    /// also bounds slow-header clients).
    #[arg(long, env = "IBEX_HEADER_TIMEOUT", default_value = "10s",
          value_parser = parse_positive_duration)]
    pub header_timeout: Duration,

    /// For a request's whole body once its head is read (408 after).
    #[arg(long, env = "IBEX_BODY_TIMEOUT", default_value = "30s",
          value_parser = parse_positive_duration)]
    pub body_timeout: Duration,

    /// Keep-alive idle time between requests, and the longest a response
    /// write may stall; the connection is closed after it.
    #[arg(long, env = "IBEX_IDLE_TIMEOUT", default_value = "60s",
          value_parser = parse_positive_duration)]
    pub idle_timeout: Duration,

    /// After SIGTERM: how long in-flight requests get to finish before exit.
    #[arg(long, env = "IBEX_DRAIN_TIMEOUT", default_value = "10s",
          value_parser = parse_positive_duration)]
    pub drain_timeout: Duration,

    /// OpenAI-style base URL with its version path, e.g. https://api.openai.com/v1.
    /// Unset: chat and models answer 501 PROVIDER_NOT_CONFIGURED.
    #[arg(long, env = "IBEX_UPSTREAM_URL", value_parser = parse_http_url)]
    pub upstream_url: Option<String>,

    /// The proxy's own upstream key (never printed).
    #[arg(long, env = "IBEX_UPSTREAM_API_KEY", hide_env_values = true,
          value_parser = parse_secret)]
    pub upstream_api_key: Option<SecretString>,

    /// PEM bundle that replaces the platform roots for the upstream TLS.
    #[arg(long, env = "IBEX_UPSTREAM_CA_FILE")]
    pub upstream_ca_file: Option<PathBuf>,

    /// `OpenAI-Organization` sent upstream: which of the operator's provider
    /// organisations is billed (a client's own header is never forwarded).
    #[arg(long, env = "IBEX_UPSTREAM_ORGANIZATION")]
    pub upstream_organization: Option<String>,

    /// `OpenAI-Project` sent upstream (a client's own header is never forwarded).
    #[arg(long, env = "IBEX_UPSTREAM_PROJECT")]
    pub upstream_project: Option<String>,

    /// TOML providers and routes (SPEC §12); re-read on SIGHUP. Unset: IBEX_UPSTREAM_URL is one
    /// openai provider serving every model.
    #[arg(long, env = "IBEX_PROVIDERS_FILE")]
    pub providers_file: Option<PathBuf>,

    /// Deadline until the upstream's response headers (504 past it).
    #[arg(long, env = "IBEX_UPSTREAM_TIMEOUT", default_value = "60s",
          value_parser = parse_positive_duration)]
    pub upstream_timeout: Duration,

    /// Longest silence between upstream body chunks.
    #[arg(long, env = "IBEX_UPSTREAM_IDLE_TIMEOUT", default_value = "30s",
          value_parser = parse_positive_duration)]
    pub upstream_idle_timeout: Duration,

    /// The usage ledger (SPEC §10): `on`, or `off` to forward unmetered, only for measuring
    /// what the ledger costs (refused when IBEX_ENV=production).
    #[arg(long, env = "IBEX_USAGE_LEDGER", value_enum, default_value_t = LedgerSwitch::On)]
    pub usage_ledger: LedgerSwitch,

    /// Usage spool directory (SPEC §10); required in production. Default: .ibex/spool.
    #[arg(long, env = "IBEX_USAGE_SPOOL_DIR")]
    pub usage_spool_dir: Option<std::path::PathBuf>,

    /// Bound on the usage spool; when it holds this much, forwarded routes answer 503
    /// USAGE_UNAVAILABLE until it drains.
    #[arg(long, env = "IBEX_USAGE_SPOOL_MAX_BYTES", default_value_t = crate::ledger::DEFAULT_MAX_BYTES)]
    pub usage_spool_max_bytes: u64,

    /// JSON prices `{"<model>": {"input_per_mtok": .., "output_per_mtok": ..}}`; re-read on SIGHUP.
    #[arg(long, env = "IBEX_PRICES_FILE")]
    pub prices_file: Option<std::path::PathBuf>,

    /// Deployment environment.
    #[arg(long = "env", env = "IBEX_ENV", value_enum, default_value_t = Environment::Development)]
    pub environment: Environment,

    /// Log level or tracing filter (JSON logs on stderr).
    #[arg(long, env = "IBEX_LOG", default_value = "info", value_parser = parse_log_filter)]
    pub log: String,
}

impl Config {
    pub fn revocation_sla(&self) -> Duration {
        Duration::from_millis(self.revocation_sla_ms)
    }

    /// Checks what clap cannot check without echoing a secret. Every problem
    /// is named by its variable; no message contains a configured value.
    pub fn validate(&self) -> Result<(), String> {
        check_redis_url(&self.redis_url).map_err(|e| format!("IBEX_REDIS_URL: {e}"))?;
        if self.environment == Environment::Production && self.usage_spool_dir.is_none() {
            return Err("IBEX_USAGE_SPOOL_DIR is required in production".into());
        }
        if self.environment == Environment::Production && self.usage_ledger == LedgerSwitch::Off {
            return Err("IBEX_USAGE_LEDGER=off is refused in production".into());
        }
        if self.usage_spool_max_bytes == 0 {
            return Err("IBEX_USAGE_SPOOL_MAX_BYTES must be > 0".into());
        }
        Ok(())
    }

    /// The usage spool's settings.
    pub fn ledger(&self) -> crate::ledger::LedgerConfig {
        crate::ledger::LedgerConfig {
            dir: self
                .usage_spool_dir
                .clone()
                .unwrap_or_else(|| crate::ledger::DEFAULT_DIR.into()),
            max_bytes: self.usage_spool_max_bytes,
        }
    }

    /// What the authd bridge needs: the service key (required, ≥ 32 characters) and, for an
    /// `https://` address, the CA file. Errors name the variable, never its value.
    pub fn authd_bridge(&self) -> Result<BridgeConfig, String> {
        let key = self
            .service_key
            .as_ref()
            .ok_or("IBEX_SERVICE_KEY is required (the key authd expects from proxies)")?;
        if key.expose_secret().chars().count() < MIN_SERVICE_KEY_LEN {
            return Err(format!(
                "IBEX_SERVICE_KEY must be at least {MIN_SERVICE_KEY_LEN} characters"
            ));
        }
        let authd_urls = authd_urls(&self.authd_grpc);
        if self.authd_ca_file.is_some() && !authd_urls.iter().all(|u| u.starts_with("https://")) {
            return Err("IBEX_AUTHD_CA_FILE is set but IBEX_AUTHD_GRPC is not https://".into());
        }
        Ok(BridgeConfig {
            authd_urls,
            subscriber: format!("ibex-proxy:{}", std::process::id()),
            service_key: key.clone(),
            ca_file: self.authd_ca_file.clone(),
        })
    }

    /// The server's settings: listener, workers, limits and timeouts.
    pub fn server(&self) -> ServerConfig {
        ServerConfig {
            listen: self.listen,
            threads: usize::from(self.threads),
            pin_cpus: self.pin_cpus,
            limits: Limits {
                // At most 1 GiB (checked by clap): fits any usize we run on.
                body_bytes: usize::try_from(self.max_body_bytes).unwrap_or(usize::MAX),
                ..Limits::default()
            },
            header_timeout: self.header_timeout,
            body_timeout: self.body_timeout,
            idle_timeout: self.idle_timeout,
            drain_timeout: self.drain_timeout,
            max_connections: ServerConfig::MAX_CONNECTIONS,
            legacy_driver: false,
            admin_listen: Some(self.admin_listen),
            tls: self.tls(),
            max_conns_per_ip: self.max_conns_per_ip,
        }
    }

    /// The public listener's TLS files, when both are set.
    pub fn tls(&self) -> Option<TlsFiles> {
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                min_version: self.tls_min_version,
            }),
            _ => None,
        }
    }

    /// The rate limiter's settings: the URL and `IBEX_REDIS_TIMEOUT`; the
    /// limiter's own constants for the rest.
    pub fn rate_limit(&self) -> RateLimitConfig {
        RateLimitConfig::new(self.redis_url.clone(), self.redis_timeout)
    }

    /// The token limiter's defaults (SPEC §11).
    pub fn tokens(&self) -> crate::tokens::TokenConfig {
        crate::tokens::TokenConfig {
            default_tpm: self.default_tpm,
            default_output: self.default_output_reserve,
            settle_delay: self.token_settle_delay,
        }
    }
}

/// Shortest `IBEX_SERVICE_KEY` accepted (authd refuses shorter ones too).
pub const MIN_SERVICE_KEY_LEN: usize = 32;

fn default_threads() -> u16 {
    std::thread::available_parallelism()
        .map(|n| u16::try_from(n.get()).unwrap_or(u16::MAX))
        .unwrap_or(1)
}

fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 50ms, 2s, 1m)"))?;
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(d)
}

/// Most authd one proxy lists (each costs it a feed stream and a channel).
const MAX_AUTHD: usize = 16;

/// The addresses of a (validated) `IBEX_AUTHD_GRPC`.
pub fn authd_urls(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect()
}

/// One or more `http(s)://` addresses, comma-separated; kept normalised
/// (trimmed, no trailing `/`).
fn parse_authd_urls(s: &str) -> Result<String, String> {
    let urls = s
        .split(',')
        .map(|u| parse_http_url(u.trim()).map_err(|e| format!("{:?} {e}", u.trim())))
        .collect::<Result<Vec<_>, _>>()?;
    if urls.len() > MAX_AUTHD {
        return Err(format!(
            "lists {} addresses (at most {MAX_AUTHD})",
            urls.len()
        ));
    }
    Ok(urls.join(","))
}

fn parse_http_url(s: &str) -> Result<String, String> {
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
        .ok_or("must start with http:// or https://")?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err("has no host".into());
    }
    Ok(s.trim_end_matches('/').to_owned())
}

/// The limiter speaks plain TCP RESP only: TLS (`rediss://`) and unix
/// sockets would be accepted by the URL grammar but fail every check open,
/// which silently switches rate limiting off. Refused before serving.
fn check_redis_url(url: &str) -> Result<(), String> {
    if !url.starts_with("redis://") {
        return Err(
            "only redis://[:password@]host[:port][,host[:port]...][/db] is supported (not rediss:// or unix://)"
                .into(),
        );
    }
    // The limiter's own parse; its error text is replaced, not wrapped, so
    // this message has one prefix and cannot quote the URL either way.
    RateLimitConfig::new(url, Duration::ZERO)
        .validate()
        .map_err(|_| "not a valid redis://[:password@]host[:port][,host[:port]...][/db] URL".into())
}

fn parse_secret(s: &str) -> Result<SecretString, String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    Ok(SecretString::from(s.to_owned()))
}

fn parse_log_filter(s: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::try_new(s)
        .map(|_| s.to_owned())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        let mut all = vec!["ibex-proxy"];
        all.extend_from_slice(args);
        Config::try_parse_from(all)
    }

    #[test]
    fn defaults_match_the_spec() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:8080");
        assert!(c.threads >= 1);
        assert!(!c.pin_cpus);
        assert_eq!(c.authd_grpc, "http://127.0.0.1:9091");
        assert_eq!(c.redis_url, "redis://127.0.0.1:6379/0");
        assert_eq!(c.redis_timeout, Duration::from_millis(25));
        assert_eq!(c.rate_limit().timeout, Duration::from_millis(25));
        assert!(c.validate().is_ok());
        assert_eq!(c.auth_validate_timeout, Duration::from_millis(50));
        assert_eq!(c.revocation_sla(), Duration::from_millis(300));
        assert_eq!(c.default_rpm, 600);
        assert_eq!((c.default_tpm, c.default_output_reserve), (0, 4096));
        assert_eq!(c.token_settle_delay, Duration::from_millis(5));
        assert_eq!(c.max_body_bytes, 4_194_304);
        assert!(c.upstream_url.is_none());
        assert_eq!(c.upstream_timeout, Duration::from_secs(60));
        assert_eq!(c.upstream_idle_timeout, Duration::from_secs(30));
        assert_eq!(c.environment, Environment::Development);
        assert_eq!(c.log, "info");
    }

    #[test]
    fn authd_takes_a_list_of_addresses() {
        let c = parse(&["--authd-grpc", " http://a:9091/, https://b:9091 "]).unwrap();
        assert_eq!(c.authd_grpc, "http://a:9091,https://b:9091");
        assert_eq!(
            authd_urls(&c.authd_grpc),
            ["http://a:9091", "https://b:9091"]
        );
        for bad in ["http://a:9091,", "http://a:9091,ftp://b", ",http://a:9091"] {
            assert!(parse(&["--authd-grpc", bad]).is_err(), "{bad}");
        }
        let many = vec!["http://a:9091"; MAX_AUTHD + 1].join(",");
        assert!(parse(&["--authd-grpc", &many]).is_err());
        // A CA file means TLS to every listed authd.
        let key = "k".repeat(MIN_SERVICE_KEY_LEN);
        let mixed = parse(&[
            "--authd-grpc",
            "https://a:9091,http://b:9091",
            "--authd-ca-file",
            "/ca.pem",
            "--service-key",
            &key,
        ])
        .unwrap();
        assert!(mixed.authd_bridge().is_err());
    }

    #[test]
    fn the_ledger_is_on_by_default_and_cannot_be_switched_off_in_production() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.usage_ledger, LedgerSwitch::On);
        let off = parse(&["--usage-ledger", "off"]).unwrap();
        assert_eq!(off.usage_ledger, LedgerSwitch::Off);
        assert!(off.validate().is_ok());
        let prod = parse(&[
            "--usage-ledger",
            "off",
            "--env",
            "production",
            "--usage-spool-dir",
            "/var/lib/ibex/spool",
        ])
        .unwrap();
        let err = prod.validate().unwrap_err();
        assert!(err.contains("IBEX_USAGE_LEDGER"), "{err}");
        let prod_on = parse(&["--env", "production", "--usage-spool-dir", "/s"]).unwrap();
        assert!(prod_on.validate().is_ok());
    }

    #[test]
    fn pin_cpus_takes_the_usual_spellings() {
        assert!(parse(&["--pin-cpus", "1"]).unwrap().pin_cpus);
        assert!(parse(&["--pin-cpus", "true"]).unwrap().pin_cpus);
        assert!(!parse(&["--pin-cpus", "off"]).unwrap().pin_cpus);
    }

    #[test]
    fn bad_values_are_refused_with_the_name() {
        for args in [
            &["--auth-validate-timeout", "fast"][..],
            &["--auth-validate-timeout", "0ms"],
            &["--threads", "0"],
            &["--listen", "nowhere"],
            &["--upstream-url", "ftp://x"],
            &["--redis-timeout", "0s"],
            &["--header-timeout", "0s"],
            &["--body-timeout", "soon"],
            &["--idle-timeout", "1 fortnight"],
            &["--drain-timeout", "0ms"],
            &["--env", "prod-ish"],
            &["--pin-cpus", "maybe"],
        ] {
            let err = parse(args).unwrap_err();
            assert!(err.to_string().contains(args[0]), "{args:?}: {err}");
        }
    }

    #[test]
    fn server_timeouts_default_and_reach_the_server() {
        let s = parse(&[]).unwrap().server();
        assert_eq!(
            (
                s.header_timeout,
                s.body_timeout,
                s.idle_timeout,
                s.drain_timeout
            ),
            (
                Duration::from_secs(10),
                Duration::from_secs(30),
                Duration::from_secs(60),
                Duration::from_secs(10)
            )
        );
        assert_eq!(s.max_connections, ServerConfig::MAX_CONNECTIONS);
        assert_eq!(s.limits.body_bytes, 4_194_304);
        let s = parse(&[
            "--listen",
            "127.0.0.1:0",
            "--threads",
            "3",
            "--max-body-bytes",
            "1000",
            "--header-timeout",
            "2s",
            "--body-timeout",
            "3s",
            "--idle-timeout",
            "4s",
            "--drain-timeout",
            "500ms",
        ])
        .unwrap()
        .server();
        assert_eq!(s.listen.to_string(), "127.0.0.1:0");
        assert_eq!(s.threads, 3);
        assert_eq!(s.limits.body_bytes, 1000);
        assert_eq!(
            (
                s.header_timeout,
                s.body_timeout,
                s.idle_timeout,
                s.drain_timeout
            ),
            (
                Duration::from_secs(2),
                Duration::from_secs(3),
                Duration::from_secs(4),
                Duration::from_millis(500)
            )
        );
    }

    #[test]
    fn redis_timeout_reaches_the_limiter() {
        let c = parse(&["--redis-timeout", "40ms"]).unwrap();
        assert_eq!(c.rate_limit().timeout, Duration::from_millis(40));
        assert_eq!(c.rate_limit().redis_url, c.redis_url);
    }

    #[test]
    fn only_plain_redis_urls_pass_and_no_message_quotes_the_url() {
        for ok in [
            "redis://127.0.0.1:6379/0",
            "redis://:pw@localhost",
            "redis://:pw@10.0.0.1:7000,10.0.0.2:7000",
        ] {
            assert!(
                parse(&["--redis-url", ok]).unwrap().validate().is_ok(),
                "{ok}"
            );
        }
        for bad in [
            "rediss://:hunter2@cache:6380",
            "unix:///tmp/hunter2.sock",
            "localhost:hunter2",
            "redis://:hunter2@[bad",
            "redis://:hunter2@a:7000,,b:7000",
            "",
        ] {
            let err = parse(&["--redis-url", bad])
                .unwrap()
                .validate()
                .unwrap_err();
            assert!(err.starts_with("IBEX_REDIS_URL: "), "{bad}: {err}");
            assert!(!err.contains("hunter2"), "{bad}: {err}");
        }
        let err = parse(&["--redis-url", "rediss://h"])
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(err.contains("only redis://"), "{err}");
    }

    #[test]
    fn help_lists_every_variable_and_hides_the_key() {
        let help = Config::command().render_long_help().to_string();
        for var in [
            "IBEX_PROXY_LISTEN",
            "IBEX_PROXY_THREADS",
            "IBEX_PROXY_PIN_CPUS",
            "IBEX_AUTHD_GRPC",
            "IBEX_SERVICE_KEY",
            "IBEX_AUTHD_CA_FILE",
            "IBEX_REDIS_URL",
            "IBEX_REDIS_TIMEOUT",
            "IBEX_AUTH_VALIDATE_TIMEOUT",
            "IBEX_REVOCATION_SLA_MS",
            "IBEX_DEFAULT_RPM",
            "IBEX_MAX_BODY_BYTES",
            "IBEX_HEADER_TIMEOUT",
            "IBEX_BODY_TIMEOUT",
            "IBEX_IDLE_TIMEOUT",
            "IBEX_DRAIN_TIMEOUT",
            "IBEX_UPSTREAM_URL",
            "IBEX_UPSTREAM_API_KEY",
            "IBEX_UPSTREAM_CA_FILE",
            "IBEX_UPSTREAM_TIMEOUT",
            "IBEX_UPSTREAM_IDLE_TIMEOUT",
            "IBEX_ENV",
            "IBEX_LOG",
        ] {
            assert!(help.contains(var), "{var} missing from --help");
        }
        assert!(help.contains("[default: 50ms]"));
    }

    #[test]
    fn service_key_is_required_long_and_redacted() {
        let err = parse(&[]).unwrap().authd_bridge().unwrap_err();
        assert!(err.contains("IBEX_SERVICE_KEY"), "{err}");
        let short = parse(&["--service-key", "short-key"]).unwrap();
        let err = short.authd_bridge().unwrap_err();
        assert!(
            err.contains("IBEX_SERVICE_KEY") && !err.contains("short-key"),
            "{err}"
        );
        let key = "k".repeat(MIN_SERVICE_KEY_LEN);
        let c = parse(&["--service-key", &key]).unwrap();
        assert_eq!(c.authd_bridge().unwrap().service_key.expose_secret(), key);
        assert!(!format!("{c:?}").contains(&key));
        let err = parse(&["--service-key", &key, "--authd-ca-file", "/ca.pem"])
            .unwrap()
            .authd_bridge()
            .unwrap_err();
        assert!(err.contains("IBEX_AUTHD_CA_FILE"), "{err}");
    }

    #[test]
    fn upstream_key_is_redacted_in_debug() {
        let c = parse(&["--upstream-api-key", "sk-very-secret"]).unwrap();
        let key = c.upstream_api_key.as_ref().unwrap();
        assert_eq!(key.expose_secret(), "sk-very-secret");
        assert!(!format!("{c:?}").contains("sk-very-secret"));
    }
}
