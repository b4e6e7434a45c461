//! A whole IBEX stack for one test: Postgres (migrated), Redis, authd, the dev seed, a proxy.

use anyhow::{Context, Result};

use crate::pg::Postgres;
use crate::procs::{self, Authd, Proxy};
use crate::redis::Redis;

/// The fixed dev rows `ibexctl seed` creates (SPEC §7) and the token's fresh plaintext.
#[derive(Debug, Clone)]
pub struct Seed {
    pub org_id: String,
    pub agent_id: String,
    pub token_id: String,
    /// Full-permission PAT bound to nothing; rotated by every `seed`.
    pub token: String,
}

pub const DEV_ORG_ID: &str = "00000000-0000-0000-0000-000000000001";
pub const DEV_AGENT_ID: &str = "00000000-0000-0000-0000-000000000003";
pub const DEV_TOKEN_ID: &str = "00000000-0000-0000-0000-000000000004";

impl Seed {
    /// Runs `ibexctl seed` against `pg`.
    pub async fn run(pg: &Postgres) -> Result<Seed> {
        let exports = procs::seed(pg).await?;
        let token = exports
            .get("IBEX_DEV_TOKEN")
            .context("seed printed no IBEX_DEV_TOKEN")?
            .clone();
        Ok(Seed {
            org_id: exports
                .get("IBEX_DEV_ORG_ID")
                .cloned()
                .unwrap_or_else(|| DEV_ORG_ID.to_owned()),
            agent_id: exports
                .get("IBEX_DEV_AGENT_ID")
                .cloned()
                .unwrap_or_else(|| DEV_AGENT_ID.to_owned()),
            token_id: DEV_TOKEN_ID.to_owned(),
            token,
        })
    }
}

#[derive(Debug)]
pub struct Stack {
    // Drop order = declaration order: proxy first, Postgres last.
    pub proxy: Proxy,
    pub authd: Authd,
    pub redis: Redis,
    pub seed: Seed,
    pub pg: Postgres,
}

impl Stack {
    pub async fn start() -> Result<Stack> {
        Stack::start_with(&[], &[]).await
    }

    /// `authd_env` / `proxy_env` override the spawners' defaults (see [`Authd::start`],
    /// [`Proxy::start`]).
    pub async fn start_with(
        authd_env: &[(&str, &str)],
        proxy_env: &[(&str, &str)],
    ) -> Result<Stack> {
        let (pg, redis) = tokio::join!(Postgres::start(), Redis::start());
        let (pg, redis) = (pg?, redis?);
        procs::migrate(&pg).await?;
        let seed = Seed::run(&pg).await?;
        let authd = Authd::start(&pg, authd_env).await?;
        let proxy = Proxy::start(authd.grpc_addr, &redis.url(), proxy_env).await?;
        Ok(Stack {
            proxy,
            authd,
            redis,
            seed,
            pg,
        })
    }
}
