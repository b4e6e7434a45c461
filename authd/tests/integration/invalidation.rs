//! The invalidation feed across two authd instances on one database.

use std::time::{Duration, Instant};

use ibex_proto::pb::{self, invalidation_event::Kind};
use tonic::Streaming;

use crate::common::*;

/// Waits for the first event matching `want`, skipping heartbeats; panics after `deadline`.
pub(crate) async fn next_matching(
    stream: &mut Streaming<pb::InvalidationEvent>,
    deadline: Duration,
    want: impl Fn(&Kind) -> bool,
) -> pb::InvalidationEvent {
    let end = Instant::now() + deadline;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        let event = tokio::time::timeout(left, stream.message())
            .await
            .expect("event within deadline")
            .expect("stream ok")
            .expect("stream open");
        if event.kind.as_ref().is_some_and(&want) {
            return event;
        }
    }
}

fn is_heartbeat(kind: &Kind) -> bool {
    matches!(kind, Kind::Heartbeat(_))
}

#[tokio::test]
async fn changes_through_authd1_and_plain_sql_reach_a_subscriber_of_authd2() {
    let pg = migrated_postgres().await;
    let authd1 = start_authd(&pg).await;
    let authd2 = start_authd(&pg).await;
    let mut grpc1 = client(&authd1).await;
    let mut grpc2 = client(&authd2).await;
    // Wait until authd2's LISTEN connection is up (first heartbeat), then subscribe.
    assert!(
        eventually(Duration::from_secs(5), || async {
            authd2.validator.feed.is_healthy()
        })
        .await
    );
    let mut stream = grpc2
        .watch_invalidations(internal(pb::WatchInvalidationsRequest {
            subscriber: "test".into(),
        }))
        .await
        .expect("subscribe")
        .into_inner();
    let first = stream.message().await.expect("ok").expect("first event");
    assert_eq!(
        first.kind,
        Some(Kind::Heartbeat(pb::Heartbeat { interval_ms: 100 })),
        "the first event is a heartbeat"
    );
    // Heartbeats keep coming while the LISTEN connection is healthy.
    let mut last_seq = first.seq;
    for _ in 0..3 {
        let beat = next_matching(&mut stream, Duration::from_secs(2), is_heartbeat).await;
        assert!(beat.seq > last_seq);
        last_seq = beat.seq;
    }

    let org = create_org(&mut grpc1, "inv").await;
    let (id, token) = create_token(&mut grpc1, org, 1, 0).await;
    // The creation is announced too (same token id): consume it, so the waits
    // below see the revocation's event and not this one.
    let created = id.to_string();
    next_matching(
        &mut stream,
        Duration::from_secs(2),
        |k| matches!(k, Kind::Token(t) if t.token_id == created),
    )
    .await;
    // authd2 verifies it once (cold) and caches it.
    assert_eq!(
        status(&validate(&mut grpc2, &token).await),
        pb::TokenStatus::Valid
    );

    // 1. Revoke through authd1 → event on authd2's stream.
    let started = Instant::now();
    grpc1
        .revoke_token(admin(pb::RevokeTokenRequest {
            org_id: org.to_string(),
            token_id: id.to_string(),
        }))
        .await
        .expect("revoke");
    let committed = started.elapsed();
    let want = id.to_string();
    let event = next_matching(
        &mut stream,
        Duration::from_secs(2),
        |k| matches!(k, Kind::Token(t) if t.token_id == want),
    )
    .await;
    println!(
        "revoke via authd1 → authd2 subscriber: {:?} after the RPC returned ({:?} RPC)",
        started.elapsed().saturating_sub(committed),
        committed
    );
    assert_eq!(
        event.kind,
        Some(Kind::Token(pb::TokenInvalidated {
            org_id: org.to_string(),
            token_id: id.to_string()
        }))
    );
    assert_eq!(
        status(&validate(&mut grpc2, &token).await),
        pb::TokenStatus::Revoked,
        "authd2's cache was invalidated"
    );

    // 2. A direct SQL UPDATE (no authd involved) → event on authd2's stream.
    let (id2, token2) = create_token(&mut grpc1, org, 1, 0).await;
    let created = id2.to_string();
    next_matching(
        &mut stream,
        Duration::from_secs(2),
        |k| matches!(k, Kind::Token(t) if t.token_id == created),
    )
    .await;
    assert_eq!(
        status(&validate(&mut grpc2, &token2).await),
        pb::TokenStatus::Valid
    );
    let sql = pg.admin_client().await.expect("admin");
    let started = Instant::now();
    sql.execute(
        "UPDATE ibex_core.tokens SET revoked_at = now() WHERE id = $1",
        &[&id2],
    )
    .await
    .expect("update");
    let committed = started.elapsed();
    let want = id2.to_string();
    next_matching(
        &mut stream,
        Duration::from_secs(2),
        |k| matches!(k, Kind::Token(t) if t.token_id == want),
    )
    .await;
    println!(
        "direct SQL UPDATE → authd2 subscriber: {:?} after commit",
        started.elapsed().saturating_sub(committed)
    );
    assert_eq!(
        status(&validate(&mut grpc2, &token2).await),
        pb::TokenStatus::Revoked
    );

    // Agents and org budgets are announced too.
    let agent = create_agent(&mut grpc1, org).await;
    sql.execute(
        "UPDATE ibex_core.agents SET status = 'suspended' WHERE id = $1",
        &[&agent],
    )
    .await
    .expect("suspend");
    let want = agent.to_string();
    next_matching(
        &mut stream,
        Duration::from_secs(2),
        |k| matches!(k, Kind::Agent(a) if a.agent_id == want),
    )
    .await;
    sql.execute(
        "UPDATE ibex_core.organizations SET rpm_limit = 7 WHERE id = $1",
        &[&org],
    )
    .await
    .expect("rpm");
    let want = org.to_string();
    next_matching(
        &mut stream,
        Duration::from_secs(2),
        |k| matches!(k, Kind::Org(o) if o.org_id == want),
    )
    .await;
    let (_, token3) = create_token(&mut grpc1, org, 1, 0).await;
    assert_eq!(validate(&mut grpc2, &token3).await.org_rpm_limit, 7);

    authd2.stop().await.expect("stop 2");
    authd1.stop().await.expect("stop 1");
}

#[tokio::test]
async fn heartbeats_stop_and_the_cache_is_rechecked_while_listen_is_lost() {
    let pg = migrated_postgres().await;
    let authd = start_authd(&pg).await;
    let mut grpc = client(&authd).await;
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
    next_matching(&mut stream, Duration::from_secs(2), is_heartbeat).await;

    // A cached token, so we can see what authd trusts while its feed is down.
    let org = create_org(&mut grpc, "outage").await;
    let (token_id, token) = create_token(&mut grpc, org, 1, 0).await;
    assert_eq!(
        status(&validate(&mut grpc, &token).await),
        pb::TokenStatus::Valid
    );

    // Keep the listener from reconnecting (existing pooled connections stay up), then kill
    // authd's LISTEN backend from the outside.
    let sql = pg.admin_client().await.expect("admin");
    sql.batch_execute("ALTER ROLE ibex_app NOLOGIN")
        .await
        .expect("nologin");
    let killed: i64 = sql
        .query_one(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = 'ibex-authd-listen') t",
            &[],
        )
        .await
        .expect("terminate")
        .get(0);
    assert_eq!(killed, 1);
    let lost_at = Instant::now();
    assert!(
        eventually(Duration::from_secs(2), || async {
            !authd.validator.feed.is_healthy()
        })
        .await,
        "the feed never noticed"
    );
    let unhealthy_ms = ibex_authd::validator::now_ms();

    // While the LISTEN connection is down, no heartbeat is sent (the listener cannot log in):
    // drain what was sent before, then nothing may arrive for a few intervals.
    let silence = Instant::now() + Duration::from_millis(500);
    while let Ok(Some(event)) = tokio::time::timeout(
        silence.saturating_duration_since(Instant::now()),
        stream.message(),
    )
    .await
    .map(|r| r.expect("stream ok"))
    {
        assert!(
            event.sent_at_unix_ms <= unhealthy_ms,
            "an event was sent while the LISTEN connection was down: {event:?}"
        );
    }
    // A revoke made now produces no notification authd can hear; the cached entry must not be
    // trusted: authd re-reads the row.
    sql.execute(
        "UPDATE ibex_core.tokens SET revoked_at = now() WHERE id = $1",
        &[&token_id],
    )
    .await
    .expect("revoke in SQL");
    assert_eq!(
        status(&validate(&mut grpc, &token).await),
        pb::TokenStatus::Revoked,
        "a cached token was trusted while the feed was down"
    );

    // Heartbeats resume once the listener can reconnect.
    sql.batch_execute("ALTER ROLE ibex_app LOGIN")
        .await
        .expect("login");
    let beat = next_matching(&mut stream, Duration::from_secs(5), is_heartbeat).await;
    println!(
        "heartbeats resumed {:?} after the LISTEN backend was killed",
        lost_at.elapsed()
    );
    assert!(beat.sent_at_unix_ms >= unhealthy_ms);
    assert!(authd.validator.feed.is_healthy());
    authd.stop().await.expect("stop");
}
