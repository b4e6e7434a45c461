//! Row-level security and the audit log, as the runtime role sees them.

use ibex_e2e::procs::ibexctl;
use ibex_proto::pb;

use crate::common::*;

/// `SELECT * FROM ibex_core.tokens` (no WHERE) as ibex_app, with `ibex.org_id` set to `org`
/// (or unset), returns the org_id of every row visible.
async fn visible_token_orgs(
    app: &mut tokio_postgres::Client,
    org: Option<&str>,
) -> Vec<uuid::Uuid> {
    let tx = app.transaction().await.expect("begin");
    if let Some(org) = org {
        tx.execute("SELECT set_config('ibex.org_id', $1, true)", &[&org])
            .await
            .expect("set org");
    }
    let rows = tx
        .query("SELECT * FROM ibex_core.tokens", &[])
        .await
        .expect("select");
    tx.commit().await.expect("commit");
    rows.iter()
        .map(|r| r.get::<_, uuid::Uuid>("org_id"))
        .collect()
}

#[tokio::test]
async fn rls_isolates_orgs_fails_closed_and_audit_is_append_only_and_verifiable() {
    let pg = migrated_postgres().await;
    let authd = start_authd(&pg).await;
    let mut grpc = client(&authd).await;
    let org_a = create_org(&mut grpc, "a").await;
    let org_b = create_org(&mut grpc, "b").await;
    for _ in 0..2 {
        create_token(&mut grpc, org_a, 1, 0).await;
    }
    create_token(&mut grpc, org_b, 1, 0).await;

    let mut app = pg.app_client().await.expect("ibex_app connects");

    // The runtime role: not superuser, no BYPASSRLS, owns nothing.
    let row = app
        .query_one(
            "SELECT rolsuper, rolbypassrls, \
             (SELECT count(*) FROM pg_tables WHERE schemaname = 'ibex_core' \
              AND tableowner = current_user) \
             FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .expect("role");
    assert!(!row.get::<_, bool>(0), "ibex_app is a superuser");
    assert!(!row.get::<_, bool>(1), "ibex_app bypasses RLS");
    assert_eq!(row.get::<_, i64>(2), 0, "ibex_app owns tables");

    // With the org set: only that org's rows, even without a WHERE clause.
    let a = org_a.to_string();
    let visible = visible_token_orgs(&mut app, Some(&a)).await;
    assert_eq!(visible.len(), 2);
    assert!(visible.iter().all(|o| *o == org_a));
    let b = org_b.to_string();
    assert_eq!(visible_token_orgs(&mut app, Some(&b)).await, vec![org_b]);
    // Unset or empty: nothing at all (fail closed).
    assert!(visible_token_orgs(&mut app, None).await.is_empty());
    assert!(visible_token_orgs(&mut app, Some("")).await.is_empty());
    // The setting is transaction-local: a later transaction without it sees nothing.
    assert!(visible_token_orgs(&mut app, None).await.is_empty());
    // Every tenant table fails closed the same way.
    for table in ["organizations", "agents", "users", "tokens"] {
        let n: i64 = app
            .query_one(&format!("SELECT count(*) FROM ibex_core.{table}"), &[])
            .await
            .expect("count")
            .get(0);
        assert_eq!(n, 0, "{table} visible without ibex.org_id");
    }
    // Writing into another org is refused by the policy's WITH CHECK.
    let tx = app.transaction().await.expect("begin");
    tx.execute("SELECT set_config('ibex.org_id', $1, true)", &[&a])
        .await
        .expect("set");
    let err = tx
        .execute(
            "INSERT INTO ibex_core.agents (id, org_id, name) VALUES (gen_random_uuid(), $1, 'x')",
            &[&org_b],
        )
        .await
        .expect_err("cross-org insert");
    assert!(
        db_message(&err).contains("row-level security"),
        "{}",
        db_message(&err)
    );
    drop(tx);

    // audit_log: ibex_app cannot UPDATE or DELETE, even claiming maintenance.
    for sql in [
        "UPDATE ibex_core.audit_log SET action = 'x'",
        "DELETE FROM ibex_core.audit_log",
    ] {
        let tx = app.transaction().await.expect("begin");
        tx.batch_execute("SET LOCAL ibex.audit_maintenance = 'on'")
            .await
            .expect("set");
        tx.execute("SELECT set_config('ibex.org_id', $1, true)", &[&a])
            .await
            .expect("set");
        let err = tx.execute(sql, &[]).await.expect_err(sql);
        assert!(
            db_message(&err).contains("permission denied"),
            "{sql}: {}",
            db_message(&err)
        );
    }
    // Not even the owner without the explicit maintenance switch.
    let owner = pg.admin_client().await.expect("admin");
    let err = owner
        .execute("DELETE FROM ibex_core.audit_log WHERE id = 1", &[])
        .await
        .expect_err("owner delete");
    assert!(
        db_message(&err).contains("append-only"),
        "{}",
        db_message(&err)
    );
    let err = owner
        .execute("TRUNCATE ibex_core.audit_log", &[])
        .await
        .expect_err("owner truncate");
    assert!(
        db_message(&err).contains("append-only"),
        "{}",
        db_message(&err)
    );

    // Each change wrote its audit row in the same transaction: 2 orgs + 3 tokens.
    let actions: Vec<String> = owner
        .query("SELECT action FROM ibex_core.audit_log ORDER BY id", &[])
        .await
        .expect("audit")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        actions,
        [
            "org.create",
            "org.create",
            "token.create",
            "token.create",
            "token.create"
        ]
    );
    let revoked = grpc
        .list_tokens(admin_req_list(org_b))
        .await
        .expect("list")
        .into_inner()
        .tokens;
    grpc.revoke_token(admin(pb::RevokeTokenRequest {
        org_id: org_b.to_string(),
        token_id: revoked[0].id.clone(),
    }))
    .await
    .expect("revoke");

    // ibexctl audit verify: intact chain.
    let env = vec![("IBEX_DATABASE_ADMIN_URL".to_owned(), pg.admin_url())];
    let ok = ibexctl(&env, &["audit", "verify"])
        .await
        .expect("run")
        .json()
        .expect("verify ok");
    assert_eq!(ok, serde_json::json!({ "ok": true, "entries": 6 }));

    // Tamper with row 3 (as the owner, with the maintenance switch): verify names it.
    owner
        .batch_execute(
            "SET ibex.audit_maintenance = 'on'; \
             UPDATE ibex_core.audit_log SET details = '{\"permissions\": 15}' WHERE id = 3; \
             RESET ibex.audit_maintenance;",
        )
        .await
        .expect("tamper");
    let out = ibexctl(&env, &["audit", "verify"]).await.expect("run");
    assert!(
        !out.status.success(),
        "tampered chain verified: {}",
        out.stdout
    );
    assert!(out.stdout.trim().is_empty(), "stdout: {}", out.stdout);
    assert!(out.stderr.contains("row 3"), "stderr: {}", out.stderr);
    authd.stop().await.expect("stop");
}

fn admin_req_list(org: uuid::Uuid) -> tonic::Request<pb::ListTokensRequest> {
    admin(pb::ListTokensRequest {
        org_id: org.to_string(),
    })
}

fn db_message(err: &tokio_postgres::Error) -> String {
    err.as_db_error()
        .map_or_else(|| err.to_string(), |e| e.message().to_owned())
}
