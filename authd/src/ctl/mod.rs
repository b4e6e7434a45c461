//! ibexctl: the operator CLI (SPEC §7).
//!
//! Every command prints exactly one JSON object on stdout and exits 0, or a message on stderr and
//! exits non-zero (`seed` prints `export` lines instead of JSON). Management commands go through
//! authd's gRPC (`IBEX_AUTHD_GRPC`) with `IBEX_ADMIN_KEY` or `--token`; `migrate`, `seed` and
//! `audit verify` talk to Postgres directly with the owner DSN (`IBEX_DATABASE_ADMIN_URL`).

pub mod migrate;
pub mod remote;
pub mod seed;
pub mod usage;

use clap::{Args, Parser, Subcommand};
use secrecy::SecretString;

/// ibexctl: migrations, dev seed, orgs, agents, tokens, audit.
#[derive(Parser)]
#[command(name = "ibexctl", version, about)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Clone)]
pub struct Global {
    /// authd gRPC address.
    #[arg(
        long,
        global = true,
        env = "IBEX_AUTHD_GRPC",
        default_value = "http://127.0.0.1:9091"
    )]
    pub authd: String,

    /// Operator key (platform-level calls such as `org create`).
    #[arg(long, global = true, env = "IBEX_ADMIN_KEY", hide_env_values = true, value_parser = parse_secret)]
    pub admin_key: Option<SecretString>,

    /// A PAT to act with instead of the operator key (needs the org's `*:manage` bit). Prefer
    /// IBEX_TOKEN or --token-file: a value on the command line shows in `ps` and shell history.
    #[arg(long, global = true, env = "IBEX_TOKEN", hide_env_values = true, value_parser = parse_secret)]
    pub token: Option<SecretString>,

    /// Read the PAT from this file (its first line) instead of --token / IBEX_TOKEN.
    #[arg(long, global = true, env = "IBEX_TOKEN_FILE", conflicts_with = "token")]
    pub token_file: Option<std::path::PathBuf>,

    /// PEM CA certificate(s) to trust for an `https://` IBEX_AUTHD_GRPC (default: system roots).
    #[arg(long, global = true, env = "IBEX_AUTHD_CA_FILE")]
    pub authd_ca_file: Option<std::path::PathBuf>,

    /// Owner DSN for `migrate`, `seed` and `audit verify`.
    #[arg(
        long,
        global = true,
        env = "IBEX_DATABASE_ADMIN_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/ibex",
        hide_env_values = true
    )]
    pub database_admin_url: String,

    /// Runtime DSN (role ibex_app); `migrate` sets that role's password from it when present.
    #[arg(
        long,
        global = true,
        env = "IBEX_DATABASE_URL",
        default_value = "postgres://ibex_app@127.0.0.1:5432/ibex",
        hide_env_values = true
    )]
    pub database_url: String,

    /// Deployment environment; `seed` refuses `production`.
    #[arg(long, global = true, env = "IBEX_ENV", default_value = "development")]
    pub env: String,

    /// Budget of the dev org created by `seed`.
    #[arg(long, global = true, env = "IBEX_DEFAULT_RPM", default_value_t = 600)]
    pub default_rpm: u32,
}

fn parse_secret(value: &str) -> Result<SecretString, std::convert::Infallible> {
    Ok(SecretString::from(value.to_owned()))
}

#[derive(Subcommand)]
pub enum Command {
    /// Apply migrations/*.sql in order (idempotent); create the ibex_app role if missing.
    Migrate,
    /// Create the fixed dev org, agent and token (rotating its secret); dev only.
    Seed,
    /// Organizations.
    #[command(subcommand)]
    Org(OrgCommand),
    /// Agents.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// The usage ledger: totals (default), `export` (JSONL) and `verify` (the hash chain).
    Usage(usage::UsageArgs),
}

#[derive(Subcommand)]
pub enum OrgCommand {
    /// Create an org (operator key).
    Create {
        #[arg(long)]
        name: String,
        /// Requests per minute (default: authd's IBEX_DEFAULT_RPM).
        #[arg(long)]
        rpm: Option<u32>,
    },
    /// Change an org's limits and budgets (operator key); unset flags stay as they are.
    SetLimits {
        #[arg(long)]
        org: String,
        /// Requests per minute (> 0).
        #[arg(long)]
        rpm: Option<u32>,
        /// Tokens per minute: a number (0 = no limit) or `default` (the proxy's IBEX_DEFAULT_TPM).
        #[arg(long)]
        tpm: Option<String>,
        /// Tokens per calendar month (UTC); 0 = no budget.
        #[arg(long = "monthly-tokens")]
        monthly_tokens: Option<u64>,
        /// USD per calendar month (UTC); 0 = no budget.
        #[arg(long = "monthly-usd")]
        monthly_usd: Option<f64>,
    },
    /// Set the org's model allow-list (operator key): names or *-prefixes, comma-separated;
    /// an empty --allow "" allows every model.
    SetModels {
        #[arg(long)]
        org: String,
        #[arg(long)]
        allow: String,
    },
}

/// `a, b*` → `["a", "b*"]`; empty entries dropped.
pub fn model_list(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

#[derive(Subcommand)]
pub enum AgentCommand {
    /// Create an active agent.
    Create {
        #[arg(long)]
        org: String,
        #[arg(long)]
        name: String,
    },
    /// Change an agent's status.
    SetStatus {
        #[arg(long)]
        org: String,
        #[arg(long)]
        agent: String,
        /// active, paused, archived or suspended.
        #[arg(long)]
        status: String,
    },
    /// Change an agent's limits (operator key, or a PAT with agents:manage); unset flags stay.
    SetLimits {
        #[arg(long)]
        org: String,
        #[arg(long)]
        agent: String,
        /// Tokens per minute; 0 = no limit of its own.
        #[arg(long)]
        tpm: Option<u64>,
        /// Tokens per calendar month (UTC); 0 = no budget of its own.
        #[arg(long = "monthly-tokens")]
        monthly_tokens: Option<u64>,
    },
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Create a token; its plaintext is printed once.
    Create {
        #[arg(long)]
        org: String,
        #[arg(long, default_value = "")]
        name: String,
        /// Bind the token to this agent.
        #[arg(long)]
        agent: Option<String>,
        /// read,chat,tokens:manage,agents:manage,embeddings | all | none | <int>
        #[arg(long, default_value = "read,chat")]
        permissions: String,
        /// e.g. 90d, 1h, 2s (default: never expires).
        #[arg(long)]
        expires_in: Option<String>,
        /// Model allow-list: names or *-prefixes, comma-separated (default: every model, or the
        /// creating PAT's list).
        #[arg(long, default_value = "")]
        models: String,
    },
    /// Revoke a token.
    Revoke {
        #[arg(long)]
        org: String,
        #[arg(long)]
        id: String,
    },
    /// List an org's tokens (no secrets, no hashes).
    List {
        #[arg(long)]
        org: String,
    },
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Recompute the hash chain; fails naming the first row that does not match.
    Verify,
}

/// Runs one command; `Ok(text)` goes to stdout.
pub async fn run(cli: Cli) -> anyhow::Result<String> {
    let global = cli.global;
    match cli.command {
        Command::Migrate => migrate::run(&global).await,
        Command::Seed => seed::run(&global).await,
        Command::Audit(AuditCommand::Verify) => audit_verify(&global).await,
        Command::Org(cmd) => remote::org(&global, cmd).await,
        Command::Agent(cmd) => remote::agent(&global, cmd).await,
        Command::Token(cmd) => remote::token(&global, cmd).await,
        Command::Usage(args) => usage::run(&global, args).await,
    }
}

/// Connects with the owner DSN (honouring its `sslmode`); the connection is driven in the
/// background.
pub async fn connect_admin(dsn: &str) -> anyhow::Result<tokio_postgres::Client> {
    use anyhow::Context;
    let database = crate::pgtls::Database::from_url(dsn).context("IBEX_DATABASE_ADMIN_URL")?;
    tokio::time::timeout(std::time::Duration::from_secs(10), database.connect())
        .await
        .context("connecting to Postgres timed out")?
        .context("connecting to Postgres with IBEX_DATABASE_ADMIN_URL")
}

async fn audit_verify(global: &Global) -> anyhow::Result<String> {
    let client = connect_admin(&global.database_admin_url).await?;
    match crate::audit::verify(&client).await? {
        Ok(entries) => Ok(serde_json::json!({ "ok": true, "entries": entries }).to_string()),
        Err(broken) => anyhow::bail!("audit chain broken: {broken}"),
    }
}

/// Unix ms → RFC 3339 (UTC), `None`/0 → JSON null.
pub fn time_json(ms: i64) -> serde_json::Value {
    if ms <= 0 {
        return serde_json::Value::Null;
    }
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.unsigned_abs());
    serde_json::Value::String(humantime::format_rfc3339_millis(at).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed_and_help_lists_the_variables() {
        Cli::command().debug_assert();
        let help = Cli::command().render_long_help().to_string();
        for var in [
            "IBEX_AUTHD_GRPC",
            "IBEX_AUTHD_CA_FILE",
            "IBEX_TOKEN",
            "IBEX_TOKEN_FILE",
            "IBEX_ADMIN_KEY",
            "IBEX_DATABASE_ADMIN_URL",
            "IBEX_DATABASE_URL",
            "IBEX_ENV",
        ] {
            assert!(help.contains(var), "{var} missing:\n{help}");
        }
    }

    #[test]
    fn times_render_as_rfc3339_or_null() {
        assert_eq!(time_json(0), serde_json::Value::Null);
        assert_eq!(
            time_json(1_700_000_000_123),
            serde_json::json!("2023-11-14T22:13:20.123Z")
        );
    }
}
