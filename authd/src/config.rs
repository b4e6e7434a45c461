//! authd's configuration: every `IBEX_*` variable it reads, with its default (`--help` lists them).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use secrecy::SecretString;

/// ibex-authd: token and agent validation over gRPC (Argon2id, Postgres RLS, invalidation feed).
#[derive(Parser, Clone)]
#[command(name = "ibex-authd", version, about)]
pub struct AuthdConfig {
    /// gRPC listen address (ValidateToken, management RPCs, WatchInvalidations).
    #[arg(long, env = "IBEX_AUTHD_GRPC_LISTEN", default_value = "127.0.0.1:9091")]
    pub grpc_listen: SocketAddr,

    /// HTTP listen address for /health and /ready.
    #[arg(long, env = "IBEX_AUTHD_HTTP_LISTEN", default_value = "127.0.0.1:8081")]
    pub http_listen: SocketAddr,

    /// Postgres DSN of the runtime role (ibex_app: not superuser, not owner).
    #[arg(
        long,
        env = "IBEX_DATABASE_URL",
        default_value = "postgres://ibex_app@127.0.0.1:5432/ibex",
        hide_env_values = true
    )]
    pub database_url: String,

    /// Operator key for platform-level calls (CreateOrg, first tokens), at least 32 characters.
    /// Unset: admin calls are refused. Only its SHA-256 is kept in memory.
    #[arg(long, env = "IBEX_ADMIN_KEY", hide_env_values = true, value_parser = parse_secret)]
    pub admin_key: Option<SecretString>,

    /// Service key the proxies present on ValidateToken, ValidateAgent and WatchInvalidations
    /// (metadata `x-ibex-service-key`). Required, at least 32 characters. Only its SHA-256 is
    /// kept in memory.
    #[arg(long, env = "IBEX_SERVICE_KEY", hide_env_values = true, value_parser = parse_secret)]
    pub service_key: Option<SecretString>,

    /// PEM certificate chain for gRPC over TLS (with IBEX_AUTHD_TLS_KEY_FILE). Unset: plaintext.
    #[arg(long, env = "IBEX_AUTHD_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,

    /// PEM private key for gRPC over TLS (with IBEX_AUTHD_TLS_CERT_FILE).
    #[arg(long, env = "IBEX_AUTHD_TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,

    /// Most unrevoked tokens one org may hold; CreateToken past it is RESOURCE_EXHAUSTED.
    #[arg(long, env = "IBEX_MAX_TOKENS_PER_ORG", default_value_t = 10_000)]
    pub max_tokens_per_org: u32,

    /// Most agents one org may hold; CreateAgent past it is RESOURCE_EXHAUSTED.
    #[arg(long, env = "IBEX_MAX_AGENTS_PER_ORG", default_value_t = 10_000)]
    pub max_agents_per_org: u32,

    /// Longest authd trusts a verified token from its own cache before re-reading it (catches
    /// changes made without the NOTIFY triggers, e.g. a restore).
    #[arg(long, env = "IBEX_AUTHD_CACHE_MAX_AGE", default_value = "10m", value_parser = humantime::parse_duration)]
    pub cache_max_age: Duration,

    /// Requests per minute for orgs created without an explicit budget.
    #[arg(long, env = "IBEX_DEFAULT_RPM", default_value_t = 600)]
    pub default_rpm: u32,

    /// Deployment environment (development, production, ...).
    #[arg(long, env = "IBEX_ENV", default_value = "development")]
    pub env: String,

    /// Log level or tracing filter (JSON logs on stderr).
    #[arg(long, env = "IBEX_LOG", default_value = "info")]
    pub log: String,
}

fn parse_secret(value: &str) -> Result<SecretString, std::convert::Infallible> {
    Ok(SecretString::from(value.to_owned()))
}

/// JSON logs to stderr at `level` (a level or an `EnvFilter` directive).
pub fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_current_span(false)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn help_lists_every_variable_with_its_default() {
        let help = AuthdConfig::command().render_long_help().to_string();
        for var in [
            "IBEX_AUTHD_GRPC_LISTEN",
            "IBEX_AUTHD_HTTP_LISTEN",
            "IBEX_DATABASE_URL",
            "IBEX_ADMIN_KEY",
            "IBEX_SERVICE_KEY",
            "IBEX_AUTHD_TLS_CERT_FILE",
            "IBEX_AUTHD_TLS_KEY_FILE",
            "IBEX_MAX_TOKENS_PER_ORG",
            "IBEX_MAX_AGENTS_PER_ORG",
            "IBEX_AUTHD_CACHE_MAX_AGE",
            "IBEX_DEFAULT_RPM",
            "IBEX_ENV",
            "IBEX_LOG",
        ] {
            assert!(help.contains(var), "{var} missing from --help:\n{help}");
        }
        assert!(help.contains("127.0.0.1:9091") && help.contains("600"));
        assert!(help.contains("10000") && help.contains("10m"));
    }
}
