//! The real binaries: `ibexctl` (SPEC §7) and `ibex-authd` (ready line, --help, HTTP, SIGTERM).

use std::process::Stdio;
use std::time::Duration;

use ibex_e2e::procs::{bin_path, ibexctl, migrate, parse_exports, seed};
use ibex_e2e::{Authd, Postgres};
use ibex_proto::pb;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::common::*;

fn db_env(pg: &Postgres) -> Vec<(String, String)> {
    vec![
        ("IBEX_DATABASE_ADMIN_URL".to_owned(), pg.admin_url()),
        ("IBEX_DATABASE_URL".to_owned(), pg.app_url()),
    ]
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = String::new();
    stream.read_to_string(&mut out).await.expect("read");
    out
}

#[tokio::test]
async fn ibexctl_commands_against_the_authd_binary() {
    let pg = Postgres::start().await.expect("postgres");
    let env = db_env(&pg);

    // migrate: idempotent, one JSON object each time.
    let first = ibexctl(&env, &["migrate"])
        .await
        .expect("run")
        .json()
        .expect("json");
    let all: Vec<&str> = ibex_authd::ctl::migrate::MIGRATIONS
        .iter()
        .map(|(name, _)| *name)
        .collect();
    assert_eq!(first["applied"], serde_json::json!(all));
    let again = ibexctl(&env, &["migrate"])
        .await
        .expect("run")
        .json()
        .expect("json");
    assert_eq!(again["applied"], serde_json::json!([]));

    // seed: refuses production and remote hosts before touching anything.
    let mut production = env.clone();
    production.push(("IBEX_ENV".into(), "production".into()));
    let out = ibexctl(&production, &["seed"]).await.expect("run");
    assert!(!out.status.success() && out.stderr.contains("production"));
    let remote = vec![(
        "IBEX_DATABASE_ADMIN_URL".to_owned(),
        "postgres://postgres@db.example.com:5432/ibex".to_owned(),
    )];
    let out = ibexctl(&remote, &["seed"]).await.expect("run");
    assert!(
        !out.status.success() && out.stderr.contains("not local"),
        "{}",
        out.stderr
    );

    let exports = seed(&pg).await.expect("seed");
    assert_eq!(
        exports["IBEX_DEV_ORG_ID"],
        "00000000-0000-0000-0000-000000000001"
    );
    assert_eq!(
        exports["IBEX_DEV_AGENT_ID"],
        "00000000-0000-0000-0000-000000000003"
    );
    let dev_token = exports["IBEX_DEV_TOKEN"].clone();
    assert!(dev_token.starts_with("ibex_pat_00000000-0000-0000-0000-000000000004_"));

    // The authd binary: ready line, health, readiness.
    let authd = Authd::start(&pg, &[]).await.expect("authd");
    assert!(http_get(authd.http_addr, "/health")
        .await
        .contains("200 OK"));
    assert!(http_get(authd.http_addr, "/ready").await.contains("200 OK"));
    assert!(http_get(authd.http_addr, "/nope").await.contains("404"));
    let mut grpc =
        ibex_proto::pb::auth_service_client::AuthServiceClient::connect(authd.grpc_url())
            .await
            .expect("grpc");
    let valid = validate(&mut grpc, &dev_token).await;
    assert_eq!(status(&valid), pb::TokenStatus::Valid);
    assert_eq!(
        valid.permissions,
        ibex_proto::perms::ALL,
        "the dev token holds every bit"
    );
    assert!(valid.agent_id.is_empty());

    // Seeding again is idempotent and rotates the secret: the old token stops working.
    let rotated = seed(&pg).await.expect("seed again")["IBEX_DEV_TOKEN"].clone();
    assert_ne!(rotated, dev_token);
    assert_eq!(
        status(&validate(&mut grpc, &rotated).await),
        pb::TokenStatus::Valid
    );
    assert!(
        eventually(Duration::from_secs(5), || {
            let mut grpc = grpc.clone();
            let old = dev_token.clone();
            async move { status(&validate(&mut grpc, &old).await) == pb::TokenStatus::Invalid }
        })
        .await,
        "the old dev token still validates"
    );

    // The dev token manages its org: token list with --token (no secrets, no hashes).
    let ctl = authd.ibexctl_env();
    let mut with_token: Vec<(String, String)> = ctl
        .iter()
        .filter(|(k, _)| k != "IBEX_ADMIN_KEY")
        .cloned()
        .collect();
    with_token.push(("IBEX_ENV".into(), "development".into()));
    let dev_org = "00000000-0000-0000-0000-000000000001";
    let listed = ibexctl(
        &with_token,
        &["--token", &rotated, "token", "list", "--org", dev_org],
    )
    .await
    .expect("run");
    assert!(!listed.stdout.contains("argon2"));
    assert!(!listed
        .stdout
        .contains(rotated.rsplit('_').next().expect("secret")));
    let listed = listed.json().expect("list json");
    assert_eq!(listed["tokens"].as_array().map(Vec::len), Some(1));

    // org / agent / token commands with the operator key.
    let org = authd
        .ibexctl_json(&["org", "create", "--name", "acme", "--rpm", "1200"])
        .await
        .expect("org create");
    let org_id = org["id"].as_str().expect("id").to_owned();
    let agent = authd
        .ibexctl_json(&["agent", "create", "--org", &org_id, "--name", "bot"])
        .await
        .expect("agent create");
    let agent_id = agent["id"].as_str().expect("id").to_owned();
    let paused = authd
        .ibexctl_json(&[
            "agent",
            "set-status",
            "--org",
            &org_id,
            "--agent",
            &agent_id,
            "--status",
            "paused",
        ])
        .await
        .expect("set-status");
    assert_eq!(
        paused,
        serde_json::json!({ "id": agent_id, "status": "paused" })
    );
    let created = authd
        .ibexctl_json(&[
            "token",
            "create",
            "--org",
            &org_id,
            "--name",
            "ci",
            "--agent",
            &agent_id,
            "--permissions",
            "read,chat",
            "--expires-in",
            "1h",
        ])
        .await
        .expect("token create");
    assert_eq!(created["permissions"], 3);
    assert!(created["expires_at"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));
    let token = created["token"].as_str().expect("token").to_owned();
    let token_id = created["id"].as_str().expect("id").to_owned();
    let valid = validate(&mut grpc, &token).await;
    assert_eq!(valid.agent_id, agent_id);
    assert_eq!(valid.org_rpm_limit, 1200);
    let listed = authd
        .ibexctl_json(&["token", "list", "--org", &org_id])
        .await
        .expect("list");
    assert_eq!(listed["tokens"][0]["id"], Value::String(token_id.clone()));
    assert!(!listed.to_string().contains(&token));
    let revoked = authd
        .ibexctl_json(&["token", "revoke", "--org", &org_id, "--id", &token_id])
        .await
        .expect("revoke");
    assert_eq!(revoked["id"], Value::String(token_id));
    assert!(revoked["revoked_at"].is_string());
    assert_eq!(
        status(&validate(&mut grpc, &token).await),
        pb::TokenStatus::Revoked
    );

    // Errors: stderr and a non-zero exit, nothing on stdout.
    let bad = ibexctl(
        &ctl,
        &["token", "create", "--org", &org_id, "--permissions", "root"],
    )
    .await
    .expect("run");
    assert!(!bad.status.success() && bad.stdout.is_empty() && !bad.stderr.is_empty());
    let no_credential: Vec<_> = ctl
        .iter()
        .filter(|(k, _)| k != "IBEX_ADMIN_KEY")
        .cloned()
        .collect();
    let denied = ibexctl(&no_credential, &["org", "create", "--name", "x"])
        .await
        .expect("run");
    assert!(!denied.status.success() && denied.stdout.is_empty());

    // audit verify sees every change made above.
    let verified = ibexctl(&env, &["audit", "verify"])
        .await
        .expect("run")
        .json()
        .expect("json");
    assert_eq!(verified["ok"], true);
    assert!(verified["entries"].as_u64().is_some_and(|n| n >= 8));

    // Nothing secret was logged by authd.
    let log = authd.log_contents();
    for secret in [&dev_token, &rotated, &token, &authd.admin_key] {
        assert!(
            !log.contains(secret.as_str()),
            "a secret reached authd's log"
        );
    }
    assert!(!log.contains("argon2id"));
}

#[tokio::test]
async fn authd_binary_help_ready_line_and_sigterm() {
    let help = tokio::process::Command::new(bin_path("ibex-authd").expect("bin"))
        .arg("--help")
        .output()
        .await
        .expect("help");
    let text = String::from_utf8_lossy(&help.stdout);
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
        assert!(text.contains(var), "--help lacks {var}");
    }

    let pg = Postgres::start().await.expect("postgres");
    migrate(&pg).await.expect("migrate");
    let mut child = tokio::process::Command::new(bin_path("ibex-authd").expect("bin"))
        .env("IBEX_DATABASE_URL", pg.app_url())
        .env("IBEX_AUTHD_GRPC_LISTEN", "127.0.0.1:0")
        .env("IBEX_AUTHD_HTTP_LISTEN", "127.0.0.1:0")
        .env("IBEX_SERVICE_KEY", service_key())
        .env_remove("IBEX_ADMIN_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("ready in time")
        .expect("read")
        .expect("a line");
    let ready = ibex_e2e::procs::parse_ready_line(&line).expect("IBEX_READY line");
    assert!(ready["grpc"].port() != 0 && ready["http"].port() != 0);
    let pid = child.id().expect("pid").to_string();
    let killed = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .expect("kill");
    assert!(killed.success());
    let exit = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("exits after SIGTERM")
        .expect("wait");
    assert!(exit.success(), "exit status {exit}");
    // Nothing more than the ready line on stdout.
    assert_eq!(lines.next_line().await.expect("read"), None);
    let _ = parse_exports("");
}
