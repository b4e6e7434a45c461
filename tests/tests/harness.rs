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
