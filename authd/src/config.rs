//! authd's configuration: every `IBEX_*` variable it reads, with its default (`--help` lists them).

use std::net::SocketAddr;

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

    /// Operator key for platform-level calls (CreateOrg, first tokens). Unset: admin calls are
    /// refused. Only its SHA-256 is kept in memory.
    #[arg(long, env = "IBEX_ADMIN_KEY", hide_env_values = true, value_parser = parse_secret)]
    pub admin_key: Option<SecretString>,

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
            "IBEX_DEFAULT_RPM",
            "IBEX_ENV",
            "IBEX_LOG",
        ] {
            assert!(help.contains(var), "{var} missing from --help:\n{help}");
        }
        assert!(help.contains("127.0.0.1:9091") && help.contains("600"));
    }
}
