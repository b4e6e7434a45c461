//! Self-test of the harness: throwaway Postgres and Redis come up, answer, and go away.

use ibex_e2e::{Postgres, Redis};

#[tokio::test]
async fn postgres_starts_answers_and_is_removed_on_drop() {
    let pg = Postgres::start().await.expect("start postgres");
    let client = pg.admin_client().await.expect("connect as admin");
    let row = client
        .query_one("select 1::int4", &[])
        .await
        .expect("select 1");
    assert_eq!(row.get::<_, i32>(0), 1);
    let db: String = client
        .query_one("select current_database()", &[])
        .await
        .expect("current_database")
        .get(0);
    assert_eq!(db, "ibex");
    assert!(pg.admin_url().ends_with(&format!(":{}/ibex", pg.port())));

    let port = pg.port();
    drop(client);
    drop(pg);
    // Gone: nothing accepts connections on that port any more.
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err());
}

#[tokio::test]
async fn two_clusters_run_side_by_side() {
    let (a, b) = tokio::join!(Postgres::start(), Postgres::start());
    let (a, b) = (a.expect("start a"), b.expect("start b"));
    assert_ne!(a.port(), b.port());
    a.admin_client().await.expect("connect a");
    b.admin_client().await.expect("connect b");
}

#[tokio::test]
async fn redis_stop_and_restart_on_the_same_port() {
    let mut redis = Redis::start().await.expect("start redis");
    assert_eq!(redis.command(&["PING"]).await.expect("ping"), "+PONG\r\n");
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{}/0", redis.port()));
    let port = redis.port();

    redis.stop().await.expect("stop");
    assert!(
        redis.command(&["PING"]).await.is_err(),
        "redis still answers after stop"
    );

    redis.restart().await.expect("restart");
    assert_eq!(redis.port(), port);
    assert_eq!(redis.command(&["PING"]).await.expect("ping"), "+PONG\r\n");
}

/// Serves each canned response to one connection, in order, after reading the request head.
#[expect(
    clippy::expect_used,
    reason = "test helper: a failure here is a failed test"
)]
async fn canned_server(responses: Vec<&'static [u8]>) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        for response in responses {
            let (mut sock, _) = listener.accept().await.expect("accept");
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = sock.read(&mut buf).await.expect("read");
                assert!(n > 0, "client closed early");
                seen.extend_from_slice(&buf[..n]);
            }
            sock.write_all(response).await.expect("write");
            sock.shutdown().await.expect("shutdown");
        }
    });
    addr
}

#[tokio::test]
async fn http_client_reads_length_chunked_and_close_delimited_bodies() {
    use ibex_e2e::http::Request;
    let addr = canned_server(vec![
        b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nX-Request-ID: r1\r\nContent-Length: 51\r\n\r\n{\"error\":{\"code\":\"MISSING_TOKEN\",\"message\":\"no\"}}  ",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        b"HTTP/1.0 200 OK\r\n\r\nuntil close",
    ])
    .await;

    let first = Request::get("/v1/models").send(addr).await.expect("first");
    assert_eq!(first.status, 401);
    assert_eq!(first.header("x-request-id"), Some("r1"));
    assert_eq!(first.error_code().as_deref(), Some("MISSING_TOKEN"));

    let second = Request::post("/x", "{}").send(addr).await.expect("second");
    assert_eq!(second.text(), "hello world");

    let third = Request::get("/y").send(addr).await.expect("third");
    assert_eq!(third.text(), "until close");
}

#[tokio::test]
async fn whole_stack_serves_the_seeded_probe() {
    use ibex_e2e::http::Request;
    let stack = ibex_e2e::Stack::start().await.expect("start the stack");
    let probe = Request::get("/v1/internal/auth-probe")
        .auth(&stack.seed.token, &stack.seed.agent_id)
        .send(stack.proxy.addr)
        .await
        .expect("probe");
    assert_eq!(probe.status, 200, "{}", probe.dump());
    let body = probe.json().expect("json");
    assert_eq!(body["org_id"], stack.seed.org_id);
    assert_eq!(body["agent_id"], stack.seed.agent_id);

    let anonymous = Request::get("/v1/internal/auth-probe")
        .send(stack.proxy.addr)
        .await
        .expect("anonymous");
    assert_eq!(anonymous.status, 401);
    assert_eq!(anonymous.error_code().as_deref(), Some("MISSING_TOKEN"));

    // The operator path works through the spawned authd.
    let list = stack
        .authd
        .ibexctl_json(&["token", "list", "--org", &stack.seed.org_id])
        .await
        .expect("token list");
    assert!(list["tokens"].is_array(), "{list}");
    let secret = stack.seed.token.rsplit('_').next().expect("secret part");
    assert!(!list.to_string().contains(secret));
    assert!(!stack.authd.log_contents().contains(secret));
    assert!(!stack.proxy.log_contents().contains(secret));
}

#[tokio::test]
async fn authd_and_proxy_restart_on_their_ports() {
    use ibex_e2e::http::Request;
    let mut stack = ibex_e2e::Stack::start().await.expect("start the stack");
    let (grpc, http, proxy) = (
        stack.authd.grpc_addr,
        stack.authd.http_addr,
        stack.proxy.addr,
    );

    stack.authd.kill();
    assert!(!stack.authd.is_running());
    stack.authd.restart().await.expect("restart authd");
    assert!(stack.authd.is_running());
    assert_eq!((stack.authd.grpc_addr, stack.authd.http_addr), (grpc, http));

    stack.proxy.restart().await.expect("restart proxy");
    assert_eq!(stack.proxy.addr, proxy);
    let probe = Request::get("/v1/internal/auth-probe")
        .auth(&stack.seed.token, &stack.seed.agent_id)
        .send(stack.proxy.addr)
        .await
        .expect("probe");
    assert_eq!(probe.status, 200, "{}", probe.dump());
    // Both runs of each process are in its log.
    assert_eq!(stack.authd.log_contents().matches("IBEX_READY").count(), 2);
}
