//! The control plane of issue 11 (SPEC §6): the service key, management rules, quotas, the
//! creation queue, the per-(id, address) guess throttle, invalidation edge cases and the operator
//! key. TLS lives in `tls.rs`.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use ibex_authd::authz::{ADMIN_KEY_HEADER, SERVICE_KEY_HEADER};
use ibex_authd::perms::{AGENTS_MANAGE, CHAT, READ, TOKENS_MANAGE};
use ibex_authd::server::Running;
use ibex_proto::pb::{self, invalidation_event::Kind, AgentStatus, TokenStatus};
use tonic::transport::Endpoint;
use tonic::Code;
use uuid::Uuid;

use crate::common::*;
use crate::invalidation::next_matching;

/// A client whose connections come from `local` (127.0.0.x), so authd sees that peer address.
async fn client_from(authd: &Running, local: &str) -> Client {
    let local: IpAddr = local.parse().expect("ip");
    let channel = Endpoint::from_shared(format!("http://{}", authd.grpc_addr))
        .expect("url")
        .local_address(Some(local))
        .connect()
        .await
        .expect("connect");
    Client::new(channel)
}

fn with_key<T>(message: T, key: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(key) = key {
        request
            .metadata_mut()
            .insert(SERVICE_KEY_HEADER, key.parse().expect("ascii"));
    }
    request
}

fn validate_request(token: &str, client_addr: &str) -> pb::ValidateTokenRequest {
    pb::ValidateTokenRequest {
        token: token.into(),
        client_addr: client_addr.into(),
    }
}

async fn metrics(authd: &Running) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(authd.http_addr)
        .await
        .expect("connect");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    let mut out = String::new();
    stream.read_to_string(&mut out).await.expect("read");
    out
}

fn counter(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from:\n{metrics}"))
}

#[tokio::test]
async fn internal_rpcs_need_the_service_key() {
    let pg = migrated_postgres().await;
    let authd = start_authd(&pg).await;
    let mut grpc = client(&authd).await;
    let org = create_org(&mut grpc, "keys").await;
    let agent = create_agent(&mut grpc, org).await;
    let (_, token) = create_token(&mut grpc, org, READ, 0).await;
    let wrong = "x".repeat(service_key().len());

    for key in [None, Some(wrong.as_str()), Some(&service_key()[1..])] {
        let refused = grpc
            .validate_token(with_key(validate_request(&token, ""), key))
            .await
            .expect_err("ValidateToken without the right key");
        assert_eq!(refused.code(), Code::Unauthenticated);
        assert!(!refused.message().contains(service_key()));
        let refused = grpc
            .validate_agent(with_key(
                pb::ValidateAgentRequest {
                    org_id: org.to_string(),
                    agent_id: agent.to_string(),
                },
                key,
            ))
            .await
            .expect_err("ValidateAgent without the right key");
        assert_eq!(refused.code(), Code::Unauthenticated);
        let refused = grpc
            .watch_invalidations(with_key(
                pb::WatchInvalidationsRequest {
                    subscriber: "anonymous".into(),
                },
                key,
            ))
            .await
            .expect_err("WatchInvalidations without the right key");
        assert_eq!(refused.code(), Code::Unauthenticated);
    }
    assert_eq!(
        counter(
            &metrics(&authd).await,
            "ibex_authd_service_key_refusals_total"
        ),
        9
    );

    // The right key.
    let valid = grpc
        .validate_token(with_key(validate_request(&token, ""), Some(service_key())))
        .await
        .expect("validate")
        .into_inner();
    assert_eq!(status(&valid), TokenStatus::Valid);
    let agent_status = grpc
        .validate_agent(with_key(
            pb::ValidateAgentRequest {
                org_id: org.to_string(),
                agent_id: agent.to_string(),
            },
            Some(service_key()),
        ))
        .await
        .expect("validate agent")
        .into_inner();
    assert_eq!(agent_status.status, AgentStatus::Active as i32);
    assert!(
        eventually(Duration::from_secs(5), || async {
            authd.validator.feed.is_healthy()
        })
        .await
    );
    let mut stream = grpc
        .watch_invalidations(with_key(
            pb::WatchInvalidationsRequest {
                subscriber: "proxy".into(),
            },
            Some(service_key()),
        ))
        .await
        .expect("subscribe")
        .into_inner();
    next_matching(&mut stream, Duration::from_secs(5), |k| {
        matches!(k, Kind::Heartbeat(_))
    })
    .await;
    authd.stop().await.expect("stop");
}

#[tokio::test]
async fn authd_refuses_to_start_without_a_long_enough_service_key() {
    let bin = ibex_e2e::procs::bin_path("ibex-authd").expect("bin");
    let long = "k".repeat(32);
    let cases: [(&[(&str, &str)], &str); 3] = [
        (&[], "IBEX_SERVICE_KEY"),
        (&[("IBEX_SERVICE_KEY", "too-short-key")], "IBEX_SERVICE_KEY"),
        (
            &[
                ("IBEX_SERVICE_KEY", long.as_str()),
                ("IBEX_ADMIN_KEY", "short-admin-key"),
            ],
            "IBEX_ADMIN_KEY",
        ),
    ];
    for (env, named) in cases {
        let mut cmd = tokio::process::Command::new(&bin);
        for (name, _) in std::env::vars() {
            if name.starts_with("IBEX_") {
                cmd.env_remove(name);
            }
        }
        let out = cmd
            .env("IBEX_AUTHD_GRPC_LISTEN", "127.0.0.1:0")
            .env("IBEX_AUTHD_HTTP_LISTEN", "127.0.0.1:0")
            .envs(env.iter().copied())
            .output()
            .await
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started with {env:?}");
        assert!(stderr.contains(named), "{env:?}: {stderr}");
        assert!(!stderr.contains("too-short-key") && !stderr.contains("short-admin-key"));
        assert!(!String::from_utf8_lossy(&out.stdout).contains("IBEX_READY"));
    }
}

#[tokio::test]
async fn management_rules_hold() {
    let pg = migrated_postgres().await;
    let authd = start_authd(&pg).await;
    let mut grpc = client(&authd).await;
    let org = create_org(&mut grpc, "rules").await;
    let other = create_org(&mut grpc, "other").await;

    // A suspended agent's own token cannot undo the suspension.
    let agent = create_agent(&mut grpc, org).await;
    let bound = grpc
        .create_token(admin(pb::CreateTokenRequest {
            org_id: org.to_string(),
            agent_id: agent.to_string(),
            permissions: READ | AGENTS_MANAGE | TOKENS_MANAGE,
            ..Default::default()
        }))
        .await
        .expect("bound token")
        .into_inner()
        .token;
    let set = |status: AgentStatus| pb::SetAgentStatusRequest {
        org_id: org.to_string(),
        agent_id: agent.to_string(),
        status: status as i32,
    };
    grpc.set_agent_status(admin(set(AgentStatus::Suspended)))
        .await
        .expect("operator suspends");
    let undo = grpc
        .set_agent_status(bearer(&bound, set(AgentStatus::Active)))
        .await
        .expect_err("suspended agent's token un-suspends");
    assert_eq!(undo.code(), Code::PermissionDenied);
    let list = grpc
        .list_tokens(bearer(
            &bound,
            pb::ListTokensRequest {
                org_id: org.to_string(),
            },
        ))
        .await
        .expect_err("manages nothing while suspended");
    assert_eq!(list.code(), Code::PermissionDenied);
    let agent_now = grpc
        .validate_agent(internal(pb::ValidateAgentRequest {
            org_id: org.to_string(),
            agent_id: agent.to_string(),
        }))
        .await
        .expect("agent")
        .into_inner();
    assert_eq!(agent_now.status, AgentStatus::Suspended as i32);
    // Once the operator reactivates it, the same token manages again.
    grpc.set_agent_status(admin(set(AgentStatus::Active)))
        .await
        .expect("operator reactivates");
    grpc.set_agent_status(bearer(&bound, set(AgentStatus::Active)))
        .await
        .expect("active agent's token manages");

    // A child never outlives its creator and never carries bits it lacks.
    let hour = 3_600_000;
    let manager = grpc
        .create_token(admin(pb::CreateTokenRequest {
            org_id: org.to_string(),
            permissions: READ | TOKENS_MANAGE,
            expires_in_ms: hour,
            ..Default::default()
        }))
        .await
        .expect("1 h manager")
        .into_inner();
    for asked in [0, 30 * 24 * hour, hour / 2] {
        let child = grpc
            .create_token(bearer(
                &manager.token,
                pb::CreateTokenRequest {
                    org_id: org.to_string(),
                    permissions: READ,
                    expires_in_ms: asked,
                    ..Default::default()
                },
            ))
            .await
            .expect("child")
            .into_inner();
        assert!(child.expires_at_unix_ms > 0, "asked {asked}: never expires");
        assert!(
            child.expires_at_unix_ms <= manager.expires_at_unix_ms,
            "asked {asked}: child {} outlives creator {}",
            child.expires_at_unix_ms,
            manager.expires_at_unix_ms
        );
    }
    let more_bits = grpc
        .create_token(bearer(
            &manager.token,
            pb::CreateTokenRequest {
                org_id: org.to_string(),
                permissions: READ | CHAT,
                ..Default::default()
            },
        ))
        .await
        .expect_err("a bit the creator lacks");
    assert_eq!(more_bits.code(), Code::PermissionDenied);

    // A user_id must belong to the org.
    let owner = pg.admin_client().await.expect("owner");
    let (mine, theirs) = (Uuid::new_v4(), Uuid::new_v4());
    for (id, org_id) in [(mine, org), (theirs, other)] {
        owner
            .execute(
                "INSERT INTO ibex_core.users (id, org_id, email) VALUES ($1, $2, $3)",
                &[&id, &org_id, &format!("{id}@example.test")],
            )
            .await
            .expect("user");
    }
    let with_user = |user: Uuid| pb::CreateTokenRequest {
        org_id: org.to_string(),
        user_id: user.to_string(),
        permissions: READ,
        ..Default::default()
    };
    grpc.create_token(admin(with_user(mine)))
        .await
        .expect("a user of the org");
    for user in [theirs, Uuid::new_v4()] {
        let refused = grpc
            .create_token(admin(with_user(user)))
            .await
            .expect_err("a user of another org, or none");
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    }
    authd.stop().await.expect("stop");
}

#[tokio::test]
async fn org_quotas_for_tokens_and_agents() {
    let pg = migrated_postgres().await;
    let mut settings = settings(&pg);
    settings.limits.max_tokens_per_org = 3;
    settings.limits.max_agents_per_org = 2;
    let authd = start_with(settings).await;
    let mut grpc = client(&authd).await;
    let org = create_org(&mut grpc, "quota").await;
    let other = create_org(&mut grpc, "other").await;
    let new_token = |org: Uuid| pb::CreateTokenRequest {
        org_id: org.to_string(),
        permissions: READ,
        ..Default::default()
    };
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(create_token(&mut grpc, org, READ, 0).await.0);
    }
    let full = grpc
        .create_token(admin(new_token(org)))
        .await
        .expect_err("4th token");
    assert_eq!(full.code(), Code::ResourceExhausted);
    assert!(full.message().contains("IBEX_MAX_TOKENS_PER_ORG"));
    create_token(&mut grpc, other, READ, 0).await; // another org is not affected
    grpc.revoke_token(admin(pb::RevokeTokenRequest {
        org_id: org.to_string(),
        token_id: ids[0].to_string(),
    }))
    .await
    .expect("revoke");
    create_token(&mut grpc, org, READ, 0).await; // a revoked token frees its place

    create_agent(&mut grpc, org).await;
    create_agent(&mut grpc, org).await;
    let full = grpc
        .create_agent(admin(pb::CreateAgentRequest {
            org_id: org.to_string(),
            name: "third".into(),
        }))
        .await
        .expect_err("3rd agent");
    assert_eq!(full.code(), Code::ResourceExhausted);
    assert!(full.message().contains("IBEX_MAX_AGENTS_PER_ORG"));
    create_agent(&mut grpc, other).await;
    authd.stop().await.expect("stop");
}

#[tokio::test]
async fn a_creation_flood_never_delays_a_cold_validation() {
    let pg = migrated_postgres().await;
    let authd = start_authd(&pg).await;
    let mut grpc = client(&authd).await;
    let org = create_org(&mut grpc, "flood").await;
    let (_, token) = create_token(&mut grpc, org, READ, 0).await;
    authd.validator.cache.clear(); // the next validation of `token` is cold (Argon2)

    let pending = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(150));
    let flood: Vec<_> = (0..150)
        .map(|_| {
            let mut grpc = grpc.clone();
            let pending = pending.clone();
            tokio::spawn(async move {
                let answer = grpc
                    .create_token(admin(pb::CreateTokenRequest {
                        org_id: org.to_string(),
                        permissions: READ,
                        ..Default::default()
                    }))
                    .await
                    .map(|_| ())
                    .map_err(|e| e.code());
                pending.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                answer
            })
        })
        .collect();
    // Until the creation pool is busy.
    assert!(
        eventually(Duration::from_secs(10), || async {
            pending.load(std::sync::atomic::Ordering::SeqCst) < 150
        })
        .await
    );
    let started = Instant::now();
    let cold = validate(&mut grpc, &token).await;
    let took = started.elapsed();
    let still_creating = pending.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(status(&cold), TokenStatus::Valid);
    let (mut created, mut refused) = (0, 0);
    for task in flood {
        match task.await.expect("task") {
            Ok(()) => created += 1,
            Err(Code::ResourceExhausted) => refused += 1,
            Err(other) => panic!("creation failed with {other:?}"),
        }
    }
    println!(
        "cold validation during 150 concurrent CreateToken: {took:?} \
         ({still_creating} creations still in flight; {created} created, {refused} refused at once)"
    );
    assert!(
        refused > 0,
        "the creation queue took all 150: it is not bounded"
    );
    assert!(
        still_creating > 0,
        "the validation answered only after every creation had finished"
    );
    authd.stop().await.expect("stop");
}

#[tokio::test]
async fn guessing_from_one_address_never_refuses_the_holder_at_another() {
    let pg = migrated_postgres().await;
    let authd = start_authd(&pg).await;
    let mut grpc = client(&authd).await;
    let org = create_org(&mut grpc, "guess").await;
    let (id, token) = create_token(&mut grpc, org, READ, 0).await;
    // Restart: a cold authd, nothing cached.
    authd.stop().await.expect("stop");
    let authd = start_authd(&pg).await;
    let mut grpc = client(&authd).await;

    // Guesses from 127.0.0.2, by the gRPC peer address (no client_addr) ...
    let mut guesser = client_from(&authd, "127.0.0.2").await;
    let wrong = format!("ibex_pat_{id}_{}", "W".repeat(48));
    let mut throttled = false;
    for _ in 0..30 {
        match guesser
            .validate_token(internal(validate_request(&wrong, "")))
            .await
        {
            Ok(r) => assert_eq!(status(&r.into_inner()), TokenStatus::Invalid),
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                assert_eq!(
                    e.metadata()
                        .get("x-ibex-refusal")
                        .map(|v| v.as_bytes().to_vec()),
                    Some(b"throttled".to_vec())
                );
                throttled = true;
            }
        }
    }
    assert!(
        throttled,
        "30 wrong secrets from one address never throttled"
    );
    // ... and as a proxy reports them (client_addr), from the same address: the same bucket
    // (a refill may let one more guess through, which is answered INVALID).
    let mut by_field = false;
    for _ in 0..5 {
        match grpc
            .validate_token(internal(validate_request(&wrong, "127.0.0.2")))
            .await
        {
            Ok(r) => assert_eq!(status(&r.into_inner()), TokenStatus::Invalid),
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted);
                by_field = true;
                break;
            }
        }
    }
    assert!(by_field, "client_addr 127.0.0.2 shares the peer's bucket");
    // The holder, at 127.0.0.3, cold: never refused.
    let holder = grpc
        .validate_token(internal(validate_request(&token, "127.0.0.3")))
        .await
        .expect("the holder is not refused")
        .into_inner();
    assert_eq!(status(&holder), TokenStatus::Valid);
    authd.stop().await.expect("stop");
}

#[tokio::test]
async fn failed_admin_keys_are_throttled_per_caller_address() {
    let pg = migrated_postgres().await;
    let authd = start_authd(&pg).await;
    let mut attacker = client_from(&authd, "127.0.0.2").await;
    let mut operator = client_from(&authd, "127.0.0.3").await;
    let create = || pb::CreateOrgRequest {
        name: "o".into(),
        rpm_limit: 0,
    };
    let wrong_admin = || {
        let mut request = tonic::Request::new(create());
        request.metadata_mut().insert(
            ADMIN_KEY_HEADER,
            "wrong-admin-key-0123456789abcdef012"
                .parse()
                .expect("ascii"),
        );
        request
    };
    let mut codes = Vec::new();
    while codes.last() != Some(&Code::ResourceExhausted) {
        assert!(codes.len() < 50, "never throttled: {codes:?}");
        codes.push(
            attacker
                .create_org(wrong_admin())
                .await
                .expect_err("wrong key")
                .code(),
        );
    }
    assert_eq!(codes[0], Code::Unauthenticated);
    // Throttled at that address, whatever the key; another address is not.
    let at_attacker = attacker.create_org(admin(create())).await;
    assert_eq!(
        at_attacker.map(|_| ()).map_err(|e| e.code()),
        Err(Code::ResourceExhausted)
    );
    operator
        .create_org(admin(create()))
        .await
        .expect("the operator at another address");
    let text = metrics(&authd).await;
    assert!(counter(&text, "ibex_authd_admin_key_refusals_total") >= 1);
    assert!(counter(&text, "ibex_authd_admin_key_throttled_total") >= 2);
    authd.stop().await.expect("stop");
}

#[tokio::test]
async fn an_agent_moved_between_orgs_is_announced_for_both() {
    let pg = migrated_postgres().await;
    let authd = start_authd(&pg).await;
    let mut grpc = client(&authd).await;
    let (from, to) = (
        create_org(&mut grpc, "from").await,
        create_org(&mut grpc, "to").await,
    );
    let agent = create_agent(&mut grpc, from).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            authd.validator.feed.is_healthy()
        })
        .await
    );
    let mut stream = grpc
        .watch_invalidations(internal(pb::WatchInvalidationsRequest {
            subscriber: "test".into(),
        }))
        .await
        .expect("subscribe")
        .into_inner();
    let owner = pg.admin_client().await.expect("owner");
    owner
        .execute(
            "UPDATE ibex_core.agents SET org_id = $1 WHERE id = $2",
            &[&to, &agent],
        )
        .await
        .expect("move");
    let is_agent_event = |org: Uuid| {
        move |k: &Kind| {
            matches!(k, Kind::Agent(a)
                if a.org_id == org.to_string() && a.agent_id == agent.to_string())
        }
    };
    next_matching(&mut stream, Duration::from_secs(5), is_agent_event(from)).await;
    next_matching(&mut stream, Duration::from_secs(5), is_agent_event(to)).await;
    let status_in = |org: Uuid| {
        let mut grpc = grpc.clone();
        async move {
            grpc.validate_agent(internal(pb::ValidateAgentRequest {
                org_id: org.to_string(),
                agent_id: agent.to_string(),
            }))
            .await
            .expect("validate agent")
            .into_inner()
            .status
        }
    };
    assert_eq!(status_in(from).await, AgentStatus::NotFound as i32);
    assert_eq!(status_in(to).await, AgentStatus::Active as i32);
    authd.stop().await.expect("stop");
}

#[tokio::test]
async fn verified_entries_have_a_maximum_age() {
    let pg = migrated_postgres().await;
    let mut settings = settings(&pg);
    settings.cache_max_age = Duration::from_secs(1);
    let authd = start_with(settings).await;
    let mut grpc = client(&authd).await;
    let org = create_org(&mut grpc, "age").await;
    let (id, token) = create_token(&mut grpc, org, READ, 0).await;
    assert_eq!(
        status(&validate(&mut grpc, &token).await),
        TokenStatus::Valid
    );
    // Revoked with the triggers off (a restore, a replica-role session): no NOTIFY.
    let owner = pg.admin_client().await.expect("owner");
    owner
        .batch_execute(&format!(
            "SET session_replication_role = replica;
             UPDATE ibex_core.tokens SET revoked_at = now() WHERE id = '{id}';
             SET session_replication_role = origin;"
        ))
        .await
        .expect("silent revoke");
    assert!(
        eventually(Duration::from_secs(15), || {
            let mut grpc = grpc.clone();
            let token = token.clone();
            async move { status(&validate(&mut grpc, &token).await) == TokenStatus::Revoked }
        })
        .await,
        "a silent revocation was never seen"
    );
    authd.stop().await.expect("stop");
}

#[tokio::test]
async fn a_forged_notification_costs_a_validation_but_changes_no_answer() {
    let pg = migrated_postgres().await;
    let authd = start_authd(&pg).await;
    let mut grpc = client(&authd).await;
    let org = create_org(&mut grpc, "forged").await;
    let (id, token) = create_token(&mut grpc, org, READ, 0).await;
    assert_eq!(
        status(&validate(&mut grpc, &token).await),
        TokenStatus::Valid
    );
    let digest = ibex_authd::pat::digest(&token);
    assert!(authd.validator.cache.get(id, &digest).is_some());
    assert!(
        eventually(Duration::from_secs(5), || async {
            authd.validator.feed.is_healthy()
        })
        .await
    );
    // Any role that can connect can NOTIFY, the runtime role included.
    let app = pg.app_client().await.expect("ibex_app");
    for payload in [
        format!(r#"{{"kind":"token","op":"UPDATE","org_id":"{org}","id":"{id}"}}"#),
        format!(r#"{{"kind":"org","op":"UPDATE","org_id":"{org}","id":"{org}"}}"#),
        "not json at all".to_owned(),
    ] {
        app.execute("SELECT pg_notify('ibex_invalidation', $1)", &[&payload])
            .await
            .expect("notify");
        assert!(
            eventually(Duration::from_secs(5), || async {
                // A token notice marks the entry stale (re-read before it answers), the others
                // evict.
                authd
                    .validator
                    .cache
                    .get(id, &digest)
                    .is_none_or(|hit| hit.stale)
            })
            .await,
            "a notice is a hint: the entry is evicted or re-read"
        );
        // Re-read: the same answer as before.
        assert_eq!(
            status(&validate(&mut grpc, &token).await),
            TokenStatus::Valid
        );
    }
    authd.stop().await.expect("stop");
}
