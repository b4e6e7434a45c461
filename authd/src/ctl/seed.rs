//! `ibexctl seed`: the fixed dev org, agent and token of SPEC §7, for local development only.
//!
//! Refuses `IBEX_ENV=production` and any DSN host that is not loopback or a unix socket.
//! Idempotent: rows are upserted, the agent is made active again, and the token gets a fresh
//! secret on every run (its old plaintext stops working; the change NOTIFYs every authd).
//! Prints `export IBEX_DEV_*=` lines, not JSON.

use anyhow::Context;
use secrecy::ExposeSecret;
use tokio_postgres::config::Host;
use uuid::Uuid;

use super::{connect_admin, Global};
use crate::audit::{self, Actor};
use crate::{hasher, pat, perms};

pub const DEV_ORG: Uuid = Uuid::from_u128(1);
pub const DEV_AGENT: Uuid = Uuid::from_u128(3);
pub const DEV_TOKEN: Uuid = Uuid::from_u128(4);

/// Whether every host of the DSN is local (loopback or unix socket).
pub fn is_local(config: &tokio_postgres::Config) -> bool {
    config.get_hosts().iter().all(|host| match host {
        Host::Unix(_) => true,
        Host::Tcp(name) => {
            name == "localhost"
                || name
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
    })
}

pub async fn run(global: &Global) -> anyhow::Result<String> {
    anyhow::ensure!(
        !global.env.eq_ignore_ascii_case("production"),
        "refusing to seed: IBEX_ENV=production"
    );
    let config = crate::pgtls::Database::from_url(&global.database_admin_url)
        .context("IBEX_DATABASE_ADMIN_URL")?
        .config;
    anyhow::ensure!(
        is_local(&config),
        "refusing to seed: the IBEX_DATABASE_ADMIN_URL host is not local"
    );
    let rpm = i32::try_from(global.default_rpm).context("IBEX_DEFAULT_RPM too large")?;
    let issued = pat::issue(DEV_TOKEN);
    let secret = issued.secret.clone();
    let phc = tokio::task::spawn_blocking(move || hasher::hash_blocking(secret.expose_secret()))
        .await??;

    let mut client = connect_admin(&global.database_admin_url).await?;
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT set_config('ibex.org_id', $1, true)",
        &[&DEV_ORG.to_string()],
    )
    .await?;
    let actor = Actor::Cli("seed");
    tx.execute(
        "INSERT INTO ibex_core.organizations (id, name, rpm_limit) VALUES ($1, 'dev', $2) \
         ON CONFLICT (id) DO NOTHING",
        &[&DEV_ORG, &rpm],
    )
    .await
    .context("seeding the dev org (did you run `ibexctl migrate`?)")?;
    tx.execute(
        "INSERT INTO ibex_core.agents (id, org_id, name) VALUES ($1, $2, 'dev-agent') \
         ON CONFLICT (id) DO UPDATE SET status = 'active', updated_at = now() \
         WHERE ibex_core.agents.status <> 'active'",
        &[&DEV_AGENT, &DEV_ORG],
    )
    .await?;
    let all = i64::try_from(perms::ALL)?;
    tx.execute(
        "INSERT INTO ibex_core.tokens (id, org_id, name, permissions, secret_hash) \
         VALUES ($1, $2, 'dev', $3, $4) \
         ON CONFLICT (id) DO UPDATE SET secret_hash = EXCLUDED.secret_hash, \
             permissions = EXCLUDED.permissions, agent_id = NULL, user_id = NULL, \
             expires_at = NULL, revoked_at = NULL",
        &[&DEV_TOKEN, &DEV_ORG, &all, &phc],
    )
    .await?;
    audit::append(
        &tx,
        DEV_ORG,
        &actor,
        "seed",
        &DEV_ORG.to_string(),
        serde_json::json!({ "agent_id": DEV_AGENT, "token_id": DEV_TOKEN }),
    )
    .await?;
    audit::append(
        &tx,
        DEV_ORG,
        &actor,
        "token.rotate",
        &DEV_TOKEN.to_string(),
        serde_json::json!({ "permissions": perms::ALL }),
    )
    .await?;
    tx.commit().await?;
    Ok(format!(
        "export IBEX_DEV_ORG_ID={DEV_ORG}\nexport IBEX_DEV_AGENT_ID={DEV_AGENT}\nexport IBEX_DEV_TOKEN={}",
        issued.token.expose_secret()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_ids_match_the_spec() {
        assert_eq!(DEV_ORG.to_string(), "00000000-0000-0000-0000-000000000001");
        assert_eq!(
            DEV_AGENT.to_string(),
            "00000000-0000-0000-0000-000000000003"
        );
        assert_eq!(
            DEV_TOKEN.to_string(),
            "00000000-0000-0000-0000-000000000004"
        );
    }

    #[test]
    fn only_local_hosts_pass() {
        let local = |dsn: &str| is_local(&dsn.parse().expect("dsn"));
        assert!(local("postgres://postgres@127.0.0.1:5432/ibex"));
        assert!(local("postgres://postgres@localhost/ibex"));
        assert!(local("postgres://postgres@[::1]:5432/ibex"));
        assert!(local("host=/var/run/postgresql user=postgres dbname=ibex"));
        assert!(!local("postgres://postgres@db.example.com/ibex"));
        assert!(!local("postgres://postgres@10.0.0.5/ibex"));
        assert!(!local("host=127.0.0.1,db.example.com user=postgres"));
    }
}
