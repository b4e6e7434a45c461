//! `ibexctl migrate`: applies the embedded `migrations/*.sql` in order, each in its own
//! transaction, recorded in `ibex_core.schema_migrations`; idempotent and safe to run
//! concurrently (an advisory lock serialises runs). First it makes sure the runtime role
//! `ibex_app` exists with LOGIN and no special powers, and sets its password from
//! `IBEX_DATABASE_URL` when that carries one.

use anyhow::Context;

use super::{connect_admin, Global};

/// Every migration, in order. The SQL is compiled in, so the binary works from any directory.
pub const MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001_core",
        include_str!("../../../migrations/0001_core.sql"),
    ),
    (
        "0002_control",
        include_str!("../../../migrations/0002_control.sql"),
    ),
    (
        "0003_usage",
        include_str!("../../../migrations/0003_usage.sql"),
    ),
    (
        "0004_limits",
        include_str!("../../../migrations/0004_limits.sql"),
    ),
    (
        "0005_models",
        include_str!("../../../migrations/0005_models.sql"),
    ),
];

pub const APP_ROLE: &str = "ibex_app";
const LOCK_KEY: i64 = 0x1be7_0001;

pub async fn run(global: &Global) -> anyhow::Result<String> {
    let app =
        crate::pgtls::Database::from_url(&global.database_url).context("IBEX_DATABASE_URL")?;
    let password = app
        .config
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned());
    let mut client = connect_admin(&global.database_admin_url).await?;
    let applied = apply(&mut client, password.as_deref()).await?;
    Ok(serde_json::json!({
        "ok": true,
        "applied": applied,
        "current": MIGRATIONS.last().map(|(name, _)| *name),
    })
    .to_string())
}

/// Applies what is missing; returns the names applied now.
pub async fn apply(
    client: &mut tokio_postgres::Client,
    app_password: Option<&str>,
) -> anyhow::Result<Vec<String>> {
    let privileged: bool = client
        .query_one(
            "SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await?
        .try_get(0)?;
    anyhow::ensure!(
        privileged,
        "IBEX_DATABASE_ADMIN_URL must be a superuser or a BYPASSRLS role (it owns the schema and \
         its SECURITY DEFINER lookups)"
    );
    client
        .execute("SELECT pg_advisory_lock($1)", &[&LOCK_KEY])
        .await?;
    let result = apply_locked(client, app_password).await;
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY])
        .await;
    result
}

async fn apply_locked(
    client: &mut tokio_postgres::Client,
    app_password: Option<&str>,
) -> anyhow::Result<Vec<String>> {
    ensure_app_role(client, app_password).await?;
    client
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS ibex_core;
             CREATE TABLE IF NOT EXISTS ibex_core.schema_migrations (
                 version    text PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now()
             );
             REVOKE ALL ON ibex_core.schema_migrations FROM PUBLIC;",
        )
        .await?;
    let mut applied = Vec::new();
    for (name, sql) in MIGRATIONS {
        let tx = client.transaction().await?;
        let done = tx
            .query_opt(
                "SELECT 1 FROM ibex_core.schema_migrations WHERE version = $1",
                &[name],
            )
            .await?
            .is_some();
        if done {
            tx.rollback().await?;
            continue;
        }
        tx.batch_execute(sql)
            .await
            .with_context(|| format!("applying migration {name}"))?;
        tx.execute(
            "INSERT INTO ibex_core.schema_migrations (version) VALUES ($1)",
            &[name],
        )
        .await?;
        tx.commit().await?;
        applied.push((*name).to_owned());
    }
    Ok(applied)
}

async fn ensure_app_role(
    client: &tokio_postgres::Client,
    password: Option<&str>,
) -> anyhow::Result<()> {
    let exists = client
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&APP_ROLE])
        .await?
        .is_some();
    if !exists {
        client
            .batch_execute(&format!("CREATE ROLE {APP_ROLE} LOGIN"))
            .await
            .context("creating role ibex_app")?;
    }
    // Whatever it was before: a login role with no way around RLS or the grants.
    client
        .batch_execute(&format!(
            "ALTER ROLE {APP_ROLE} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS \
             NOREPLICATION"
        ))
        .await?;
    if let Some(password) = password {
        // DDL takes no parameters: let Postgres quote the literal.
        let statement: String = client
            .query_one(
                &format!("SELECT format('ALTER ROLE {APP_ROLE} PASSWORD %L', $1::text)"),
                &[&password],
            )
            .await?
            .try_get(0)?;
        client.batch_execute(&statement).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_ordered_and_unique() {
        let names: Vec<_> = MIGRATIONS.iter().map(|(n, _)| *n).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(names, sorted);
        assert!(MIGRATIONS.iter().all(|(_, sql)| !sql.trim().is_empty()));
    }
}
