//! TLS on both sides of authd: gRPC over TLS (in-process authd, tonic clients and the real
//! `ibexctl`), and Postgres over TLS (`ssl=on`, `sslmode=verify-full`), with certificates made
//! at test time.

use ibex_authd::perms::{READ, TOKENS_MANAGE};
use ibex_authd::pgtls::{Database, Verify};
use ibex_authd::server::TlsFiles;
use ibex_e2e::certs::TestCa;
use ibex_e2e::procs::ibexctl;
use ibex_e2e::Postgres;
use ibex_proto::pb::{self, TokenStatus};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use crate::common::*;

async fn tls_client(url: &str, ca: Option<&TestCa>) -> Result<Client, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new();
    tls = match ca {
        Some(ca) => tls.ca_certificate(Certificate::from_pem(
            std::fs::read(ca.ca_file()).expect("ca"),
        )),
        None => tls.with_native_roots(),
    };
    let channel = Endpoint::from_shared(url.to_owned())?
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(Client::new(channel))
}

#[tokio::test]
async fn grpc_over_tls_from_clients_and_ibexctl_and_untrusting_clients_are_refused() {
    let ca = TestCa::new("ibex test CA").expect("ca");
    let leaf = ca.issue("authd", &["localhost"]).expect("leaf");
    let pg = migrated_postgres().await;
    let mut settings = settings(&pg);
    settings.tls = Some(TlsFiles {
        cert: leaf.cert_file.clone(),
        key: leaf.key_file.clone(),
    });
    let authd = start_with(settings).await;
    let url = format!("https://localhost:{}", authd.grpc_addr.port());

    let mut grpc = tls_client(&url, Some(&ca)).await.expect("trusted TLS");
    let org = create_org(&mut grpc, "tls").await;
    let (_, token) = create_token(&mut grpc, org, READ, 0).await;
    assert_eq!(
        status(&validate(&mut grpc, &token).await),
        TokenStatus::Valid
    );

    // Not trusting the CA (system roots only), or not speaking TLS at all: refused.
    let untrusting = match tls_client(&url, None).await {
        Ok(mut c) => c
            .create_org(admin(pb::CreateOrgRequest {
                name: "x".into(),
                rpm_limit: 0,
            }))
            .await
            .is_ok(),
        Err(_) => false,
    };
    assert!(!untrusting, "a client without the CA got through");
    let plain = Endpoint::from_shared(format!("http://localhost:{}", authd.grpc_addr.port()))
        .expect("url")
        .connect()
        .await;
    let plain_ok = match plain {
        Ok(channel) => Client::new(channel)
            .validate_token(internal(pb::ValidateTokenRequest {
                token: token.clone(),
                client_addr: String::new(),
            }))
            .await
            .is_ok(),
        Err(_) => false,
    };
    assert!(!plain_ok, "plaintext gRPC was answered by a TLS authd");

    // ibexctl: https:// + IBEX_AUTHD_CA_FILE works; without the CA it fails.
    let ca_file = ca.ca_file().display().to_string();
    let base = vec![
        ("IBEX_AUTHD_GRPC".to_owned(), url.clone()),
        ("IBEX_ADMIN_KEY".to_owned(), ADMIN_KEY.to_owned()),
    ];
    let mut trusted = base.clone();
    trusted.push(("IBEX_AUTHD_CA_FILE".to_owned(), ca_file.clone()));
    let created = ibexctl(&trusted, &["org", "create", "--name", "via-tls"])
        .await
        .expect("run")
        .json()
        .expect("org create over TLS");
    assert!(created["id"].is_string());
    let refused = ibexctl(&base, &["org", "create", "--name", "untrusted"])
        .await
        .expect("run");
    assert!(
        !refused.status.success(),
        "ibexctl trusted an unknown CA: {}",
        refused.stdout
    );

    // ibexctl --token from IBEX_TOKEN or a file (never on the command line).
    let manager = grpc
        .create_token(admin(pb::CreateTokenRequest {
            org_id: org.to_string(),
            permissions: READ | TOKENS_MANAGE,
            ..Default::default()
        }))
        .await
        .expect("manager")
        .into_inner()
        .token;
    let org_arg = org.to_string();
    let list = ["token", "list", "--org", org_arg.as_str()];
    let mut by_env = vec![
        ("IBEX_AUTHD_GRPC".to_owned(), url.clone()),
        ("IBEX_AUTHD_CA_FILE".to_owned(), ca_file.clone()),
    ];
    by_env.push(("IBEX_TOKEN".to_owned(), manager.clone()));
    let listed = ibexctl(&by_env, &list)
        .await
        .expect("run")
        .json()
        .expect("token list with IBEX_TOKEN");
    assert!(listed["tokens"].as_array().is_some_and(|t| t.len() >= 2));
    let file = ca.dir().join("pat");
    std::fs::write(&file, format!("{manager}\n")).expect("pat file");
    let file_arg = file.display().to_string();
    let mut by_file: Vec<&str> = list.to_vec();
    by_file.extend(["--token-file", file_arg.as_str()]);
    ibexctl(&by_env[..2], &by_file)
        .await
        .expect("run")
        .json()
        .expect("token list with --token-file");
    authd.stop().await.expect("stop");
}

#[tokio::test]
async fn postgres_over_tls_with_verify_full() {
    let ca = TestCa::new("ibex pg CA").expect("ca");
    let leaf = ca.issue("postgres", &["localhost"]).expect("leaf");
    let pg = Postgres::start_tls(&leaf).await.expect("postgres ssl=on");
    let port = pg.port();
    let root = ca.ca_file().display().to_string();
    let admin_url =
        format!("postgres://postgres@localhost:{port}/ibex?sslmode=verify-full&sslrootcert={root}");
    let app_url =
        format!("postgres://ibex_app@localhost:{port}/ibex?sslmode=verify-full&sslrootcert={root}");

    // ibexctl migrate over TLS.
    let env = vec![
        ("IBEX_DATABASE_ADMIN_URL".to_owned(), admin_url.clone()),
        ("IBEX_DATABASE_URL".to_owned(), app_url.clone()),
    ];
    ibexctl(&env, &["migrate"])
        .await
        .expect("run")
        .json()
        .expect("migrate over TLS");

    // The connection really is TLS.
    let db = Database::from_url(&app_url).expect("dsn");
    assert_eq!(db.verify, Verify::Full);
    let pg_client = db.connect().await.expect("verify-full connects");
    let ssl: bool = pg_client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0);
    assert!(ssl);

    // Refused: a CA that did not sign the server's certificate; a host name the certificate
    // does not carry (verify-full), which verify-ca accepts.
    let stranger = TestCa::new("someone else").expect("ca");
    let wrong_ca = format!(
        "postgres://ibex_app@localhost:{port}/ibex?sslmode=verify-full&sslrootcert={}",
        stranger.ca_file().display()
    );
    assert!(Database::from_url(&wrong_ca)
        .expect("dsn")
        .connect()
        .await
        .is_err());
    let by_ip = |mode: &str| {
        format!("postgres://ibex_app@127.0.0.1:{port}/ibex?sslmode={mode}&sslrootcert={root}")
    };
    assert!(Database::from_url(&by_ip("verify-full"))
        .expect("dsn")
        .connect()
        .await
        .is_err());
    Database::from_url(&by_ip("verify-ca"))
        .expect("dsn")
        .connect()
        .await
        .expect("verify-ca ignores the name");

    // authd on that DSN: pool and LISTEN connection.
    let mut settings = settings(&pg);
    settings.database = Database::from_url(&app_url).expect("dsn");
    let authd = start_with(settings).await;
    let mut grpc = client(&authd).await;
    let org = create_org(&mut grpc, "pg-tls").await;
    let (_, token) = create_token(&mut grpc, org, READ, 0).await;
    assert_eq!(
        status(&validate(&mut grpc, &token).await),
        TokenStatus::Valid
    );
    assert!(
        eventually(std::time::Duration::from_secs(10), || async {
            authd.validator.feed.is_healthy()
        })
        .await,
        "the LISTEN connection never came up over TLS"
    );
    authd.stop().await.expect("stop");
}
