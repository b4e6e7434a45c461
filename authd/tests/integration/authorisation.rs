//! Who may manage what: the operator key, PATs with `*:manage` bits, and org boundaries.

use ibex_authd::perms::{AGENTS_MANAGE, ALL, CHAT, READ, TOKENS_MANAGE};
use ibex_proto::pb;
use tonic::Code;
use uuid::Uuid;

use crate::common::*;

fn token_request(org: Uuid, permissions: u64) -> pb::CreateTokenRequest {
    pb::CreateTokenRequest {
        org_id: org.to_string(),
        name: "x".into(),
        permissions,
        ..Default::default()
    }
}

#[tokio::test]
async fn management_is_authorised_per_org_and_per_bit() {
    let pg = migrated_postgres().await;
    let authd = start_authd(&pg).await;
    let mut grpc = client(&authd).await;
    let org_a = create_org(&mut grpc, "a").await;
    let org_b = create_org(&mut grpc, "b").await;
    let (_, plain) = create_token(&mut grpc, org_a, READ | CHAT, 0).await;
    let (_, manager) = create_token(&mut grpc, org_a, READ | TOKENS_MANAGE, 0).await;
    let (b_token_id, _) = create_token(&mut grpc, org_b, READ, 0).await;
    let b_agent = create_agent(&mut grpc, org_b).await;

    let code = |r: Result<tonic::Response<pb::CreateTokenResponse>, tonic::Status>| {
        r.map(|_| ()).map_err(|e| e.code())
    };

    // No credential / bad credentials.
    let anonymous = grpc
        .create_token(tonic::Request::new(token_request(org_a, READ)))
        .await;
    assert_eq!(code(anonymous), Err(Code::Unauthenticated));
    let mut wrong_key = tonic::Request::new(token_request(org_a, READ));
    wrong_key
        .metadata_mut()
        .insert("x-ibex-admin-key", "nope".parse().expect("ascii"));
    assert_eq!(
        code(grpc.create_token(wrong_key).await),
        Err(Code::Unauthenticated)
    );
    let garbage = bearer("ibex_pat_garbage", token_request(org_a, READ));
    assert_eq!(
        code(grpc.create_token(garbage).await),
        Err(Code::Unauthenticated)
    );

    // A PAT without tokens:manage cannot create tokens.
    let denied = grpc
        .create_token(bearer(&plain, token_request(org_a, READ)))
        .await;
    assert_eq!(code(denied), Err(Code::PermissionDenied));

    // A manager can create within its own bits, never beyond them.
    let ok = grpc
        .create_token(bearer(&manager, token_request(org_a, READ)))
        .await;
    assert_eq!(code(ok), Ok(()));
    let beyond = grpc
        .create_token(bearer(&manager, token_request(org_a, READ | CHAT)))
        .await;
    assert_eq!(code(beyond), Err(Code::PermissionDenied));
    // Unknown bits are rejected outright, even for the operator.
    let unknown = grpc
        .create_token(admin(token_request(org_a, 1 << 10)))
        .await;
    assert_eq!(code(unknown), Err(Code::InvalidArgument));
    assert_eq!(
        code(grpc.create_token(admin(token_request(org_a, ALL))).await),
        Ok(())
    );

    // Org A's manager acting on org B: PERMISSION_DENIED, never NOT_FOUND.
    let cross = grpc
        .create_token(bearer(&manager, token_request(org_b, READ)))
        .await;
    assert_eq!(code(cross), Err(Code::PermissionDenied));
    let list = grpc
        .list_tokens(bearer(
            &manager,
            pb::ListTokensRequest {
                org_id: org_b.to_string(),
            },
        ))
        .await
        .map(|_| ())
        .map_err(|e| e.code());
    assert_eq!(list, Err(Code::PermissionDenied));
    for org in [org_b, org_a] {
        // B's token named under B, or smuggled under A's id: both denied.
        let revoke = grpc
            .revoke_token(bearer(
                &manager,
                pb::RevokeTokenRequest {
                    org_id: org.to_string(),
                    token_id: b_token_id.to_string(),
                },
            ))
            .await
            .map(|_| ())
            .map_err(|e| e.code());
        assert_eq!(revoke, Err(Code::PermissionDenied), "revoke via {org}");
    }
    // A's own listing works and shows neither secrets nor hashes.
    let listed = grpc
        .list_tokens(bearer(
            &manager,
            pb::ListTokensRequest {
                org_id: org_a.to_string(),
            },
        ))
        .await
        .expect("list own org")
        .into_inner();
    assert!(listed.tokens.iter().all(|t| t.org_id == org_a.to_string()));
    let dump = format!("{listed:?}");
    assert!(
        !dump.contains("argon2") && !dump.contains(manager.rsplit('_').next().expect("secret"))
    );

    // Agents need agents:manage; another org's agent is PERMISSION_DENIED.
    let agent = grpc
        .create_agent(bearer(
            &manager,
            pb::CreateAgentRequest {
                org_id: org_a.to_string(),
                name: "x".into(),
            },
        ))
        .await
        .map(|_| ())
        .map_err(|e| e.code());
    assert_eq!(agent, Err(Code::PermissionDenied));
    let (_, agent_manager) = create_token(&mut grpc, org_a, AGENTS_MANAGE, 0).await;
    let created = grpc
        .create_agent(bearer(
            &agent_manager,
            pb::CreateAgentRequest {
                org_id: org_a.to_string(),
                name: "x".into(),
            },
        ))
        .await;
    assert!(created.is_ok());
    let foreign = grpc
        .set_agent_status(bearer(
            &agent_manager,
            pb::SetAgentStatusRequest {
                org_id: org_a.to_string(),
                agent_id: b_agent.to_string(),
                status: pb::AgentStatus::Suspended as i32,
            },
        ))
        .await
        .map(|_| ())
        .map_err(|e| e.code());
    assert_eq!(foreign, Err(Code::PermissionDenied));

    // CreateOrg needs the operator key, not a PAT.
    let org = grpc
        .create_org(bearer(
            &manager,
            pb::CreateOrgRequest {
                name: "x".into(),
                rpm_limit: 1,
            },
        ))
        .await
        .map(|_| ())
        .map_err(|e| e.code());
    assert_eq!(org, Err(Code::PermissionDenied));

    // A revoked manager is just unauthenticated.
    let (manager_id, _) = {
        let listed = grpc
            .list_tokens(admin(pb::ListTokensRequest {
                org_id: org_a.to_string(),
            }))
            .await
            .expect("list")
            .into_inner();
        let id = listed
            .tokens
            .iter()
            .find(|t| manager.contains(&t.id))
            .map(|t| t.id.clone())
            .expect("manager listed");
        (id, ())
    };
    grpc.revoke_token(admin(pb::RevokeTokenRequest {
        org_id: org_a.to_string(),
        token_id: manager_id,
    }))
    .await
    .expect("revoke manager");
    let after = grpc
        .create_token(bearer(&manager, token_request(org_a, READ)))
        .await;
    assert_eq!(code(after), Err(Code::Unauthenticated));
    authd.stop().await.expect("stop");
}

#[tokio::test]
async fn admin_calls_are_refused_when_no_admin_key_is_configured() {
    let pg = migrated_postgres().await;
    let mut settings = settings(&pg);
    settings.admin = None;
    settings.hash_workers = 1;
    let authd = ibex_authd::server::start(settings).await.expect("start");
    let mut grpc = client(&authd).await;
    let refused = grpc
        .create_org(admin(pb::CreateOrgRequest {
            name: "x".into(),
            rpm_limit: 0,
        }))
        .await
        .expect_err("no admin key configured");
    assert_eq!(refused.code(), Code::Unauthenticated);
    authd.stop().await.expect("stop");
}
