//! Token lifecycle through ValidateToken, agents through ValidateAgent, and what is stored.

use std::time::{Duration, Instant};

use ibex_proto::pb::{self, TokenStatus};
use prost::Message;
use uuid::Uuid;

use crate::common::*;

#[tokio::test]
async fn token_lifecycle_and_storage() {
    let pg = migrated_postgres().await;
    let authd = start_authd(&pg).await;
    let mut grpc = client(&authd).await;
    let org = create_org(&mut grpc, "lifecycle").await;

    // create → validate: VALID with everything the proxy needs.
    let (id, token) = create_token(&mut grpc, org, 3, 0).await;
    assert!(token.starts_with(&format!("ibex_pat_{id}_")));
    let valid = validate(&mut grpc, &token).await;
    assert_eq!(status(&valid), TokenStatus::Valid);
    assert_eq!(valid.org_id, org.to_string());
    assert_eq!(valid.token_id, id.to_string());
    assert_eq!(valid.permissions, 3);
    assert_eq!(valid.org_rpm_limit, 600);
    assert_eq!(valid.expires_at_unix_ms, 0);
    assert!(valid.agent_id.is_empty() && valid.user_id.is_empty());

    // Cold path too (fresh authd, empty cache) gives the same answer.
    let authd2 = start_authd(&pg).await;
    let mut grpc2 = client(&authd2).await;
    assert_eq!(validate(&mut grpc2, &token).await, valid);

    // Stored hash: Argon2id at the OWASP minimum or stronger.
    let admin_db = pg.admin_client().await.expect("admin");
    let phc: String = admin_db
        .query_one(
            "SELECT secret_hash FROM ibex_core.tokens WHERE id = $1",
            &[&id],
        )
        .await
        .expect("row")
        .get(0);
    assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");

    // The plaintext (and its secret part) appears nowhere in the database: every row of every
    // table in every user schema, rendered as text.
    let secret = token.rsplit('_').next().expect("secret");
    let tables = admin_db
        .query(
            "SELECT quote_ident(schemaname) || '.' || quote_ident(tablename) FROM pg_tables \
             WHERE schemaname NOT IN ('pg_catalog', 'information_schema')",
            &[],
        )
        .await
        .expect("tables");
    assert!(tables.len() >= 6);
    for table in tables {
        let table: String = table.get(0);
        let rows = admin_db
            .query(&format!("SELECT t::text FROM {table} t"), &[])
            .await
            .expect("dump");
        for row in rows {
            let text: String = row.get(0);
            assert!(!text.contains(secret), "secret found in {table}");
        }
    }

    // Malformed, unknown id and wrong secret: identical answers (byte for byte).
    let wrong_secret = format!("ibex_pat_{id}_{}", "A".repeat(48));
    let unknown_id = format!("ibex_pat_{}_{}", Uuid::new_v4(), "A".repeat(48));
    let mut answers = Vec::new();
    for (label, candidate) in [
        ("malformed", "ibex_pat_nope".to_owned()),
        ("unknown id", unknown_id.clone()),
        ("wrong secret", wrong_secret.clone()),
    ] {
        let started = Instant::now();
        let response = validate(&mut grpc, &candidate).await;
        println!("{label}: {:?}", started.elapsed());
        assert_eq!(status(&response), TokenStatus::Invalid, "{label}");
        answers.push(response.encode_to_vec());
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "answers differ");
    // Same cost: a few rounds each, medians printed (no assertion on wall-clock time).
    for (label, candidate) in [("unknown id", &unknown_id), ("wrong secret", &wrong_secret)] {
        let mut times = Vec::new();
        for _ in 0..3 {
            let started = Instant::now();
            validate(&mut grpc2, candidate).await;
            times.push(started.elapsed());
        }
        times.sort();
        println!("{label}: median {:?}", times[1]);
    }

    // revoke → REVOKED (on both instances: authd2's cached entry is invalidated by the feed).
    grpc.revoke_token(admin(pb::RevokeTokenRequest {
        org_id: org.to_string(),
        token_id: id.to_string(),
    }))
    .await
    .expect("revoke");
    assert_eq!(
        status(&validate(&mut grpc, &token).await),
        TokenStatus::Revoked
    );
    let revoked_on_2 = eventually(Duration::from_secs(5), || {
        let mut grpc2 = grpc2.clone();
        let token = token.clone();
        async move { status(&validate(&mut grpc2, &token).await) == TokenStatus::Revoked }
    })
    .await;
    assert!(revoked_on_2, "authd2 still accepts the revoked token");

    // Expired: a 1 ms token is VALID-then-EXPIRED, and EXPIRED only with the right secret.
    let (short_id, short) = create_token(&mut grpc, org, 1, 1).await;
    let expired = eventually(Duration::from_secs(5), || {
        let mut grpc = grpc.clone();
        let short = short.clone();
        async move { status(&validate(&mut grpc, &short).await) == TokenStatus::Expired }
    })
    .await;
    assert!(expired, "token never expired");
    assert_eq!(
        status(&validate(&mut grpc2, &short).await),
        TokenStatus::Expired
    );
    let wrong = format!("ibex_pat_{short_id}_{}", "B".repeat(48));
    assert_eq!(
        status(&validate(&mut grpc2, &wrong).await),
        TokenStatus::Invalid
    );

    // last_used_at is written in the background.
    let (used_id, used) = create_token(&mut grpc, org, 1, 0).await;
    validate(&mut grpc, &used).await;
    let recorded = eventually(Duration::from_secs(5), || {
        let mut grpc = grpc.clone();
        async move {
            let tokens = grpc
                .list_tokens(admin(pb::ListTokensRequest {
                    org_id: org.to_string(),
                }))
                .await
                .expect("list")
                .into_inner()
                .tokens;
            tokens
                .iter()
                .any(|t| t.id == used_id.to_string() && t.last_used_at_unix_ms > 0)
        }
    })
    .await;
    assert!(recorded, "last_used_at never set");

    authd2.stop().await.expect("stop 2");
    authd.stop().await.expect("stop");
}

#[tokio::test]
async fn agents_throttle_and_saturation() {
    let pg = migrated_postgres().await;
    let authd = start_authd(&pg).await;
    let mut grpc = client(&authd).await;
    let org = create_org(&mut grpc, "a").await;
    let other = create_org(&mut grpc, "b").await;
    let agent = create_agent(&mut grpc, org).await;
    let foreign = create_agent(&mut grpc, other).await;

    let checker = grpc.clone();
    let check = |org: Uuid, agent: Uuid| {
        let mut grpc = checker.clone();
        async move {
            let response = grpc
                .validate_agent(internal(pb::ValidateAgentRequest {
                    org_id: org.to_string(),
                    agent_id: agent.to_string(),
                }))
                .await
                .expect("validate agent")
                .into_inner();
            pb::AgentStatus::try_from(response.status).expect("status")
        }
    };
    assert_eq!(check(org, agent).await, pb::AgentStatus::Active);
    // Another org's agent and an unknown one: the same NOT_FOUND.
    assert_eq!(check(org, foreign).await, pb::AgentStatus::NotFound);
    assert_eq!(check(org, Uuid::new_v4()).await, pb::AgentStatus::NotFound);
    for (wanted, name) in [
        (pb::AgentStatus::Paused, "paused"),
        (pb::AgentStatus::Suspended, "suspended"),
        (pb::AgentStatus::Archived, "archived"),
        (pb::AgentStatus::Active, "active"),
    ] {
        grpc.set_agent_status(admin(pb::SetAgentStatusRequest {
            org_id: org.to_string(),
            agent_id: agent.to_string(),
            status: wanted as i32,
        }))
        .await
        .unwrap_or_else(|e| panic!("set {name}: {e}"));
        assert_eq!(check(org, agent).await, wanted);
    }

    // Repeated failures for one id are throttled; the real (cached) token still passes.
    let (id, token) = create_token(&mut grpc, org, 1, 0).await;
    let wrong = format!("ibex_pat_{id}_{}", "C".repeat(48));
    let mut throttled = false;
    for _ in 0..20 {
        match grpc
            .validate_token(internal(pb::ValidateTokenRequest {
                token: wrong.clone(),
                client_addr: String::new(),
            }))
            .await
        {
            Ok(r) => assert_eq!(status(&r.into_inner()), pb::TokenStatus::Invalid),
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::ResourceExhausted);
                throttled = true;
                break;
            }
        }
    }
    assert!(
        throttled,
        "20 wrong secrets for one id were never throttled"
    );
    assert_eq!(
        status(&validate(&mut grpc, &token).await),
        pb::TokenStatus::Valid
    );

    // A flood of random well-formed tokens: the Argon2 pool refuses what it cannot take at
    // once (RESOURCE_EXHAUSTED), and a cached token is still answered meanwhile.
    let flood: Vec<_> = (0..64)
        .map(|_| {
            let mut grpc = grpc.clone();
            tokio::spawn(async move {
                let token = format!("ibex_pat_{}_{}", Uuid::new_v4(), "D".repeat(48));
                grpc.validate_token(internal(pb::ValidateTokenRequest {
                    token,
                    client_addr: String::new(),
                }))
                .await
                .map(|r| r.into_inner().status)
                .map_err(|e| e.code())
            })
        })
        .collect();
    let warm = validate(&mut grpc, &token).await;
    assert_eq!(status(&warm), pb::TokenStatus::Valid);
    let mut refused = 0;
    for handle in flood {
        match handle.await.expect("task") {
            Ok(s) => assert_eq!(s, pb::TokenStatus::Invalid as i32),
            Err(code) => {
                assert_eq!(code, tonic::Code::ResourceExhausted);
                refused += 1;
            }
        }
    }
    println!("flood of 64 cold validations: {refused} refused at once");
    assert!(refused > 0, "the Argon2 pool queued everything");
    authd.stop().await.expect("stop");
}
