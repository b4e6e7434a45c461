//! Shared setup: a throwaway Postgres, migrated, and authd running in-process on 127.0.0.1:0.

use std::time::{Duration, Instant};

use ibex_authd::authz::{KeyDigest, ADMIN_KEY_HEADER, SERVICE_KEY_HEADER};
use ibex_authd::server::{self, Running, Settings};
use ibex_e2e::Postgres;
use ibex_proto::pb::{self, auth_service_client::AuthServiceClient};
use secrecy::SecretString;
use tonic::transport::Channel;
use uuid::Uuid;

pub type Client = AuthServiceClient<Channel>;

pub const ADMIN_KEY: &str = "test-admin-key-0123456789abcdef01234";

/// The service key: the same one `ibex_e2e` gives the binaries it starts, so requests built here
/// work against in-process and binary authd alike.
pub fn service_key() -> &'static str {
    ibex_e2e::procs::service_key()
}

/// Postgres + `ibexctl migrate` (in-process, same code as the binary).
pub async fn migrated_postgres() -> Postgres {
    let pg = Postgres::start().await.expect("postgres");
    let mut admin = pg.admin_client().await.expect("admin client");
    ibex_authd::ctl::migrate::apply(&mut admin, None)
        .await
        .expect("migrate");
    pg
}

/// In-process authd settings with the test keys and two Argon2 workers.
pub fn settings(pg: &Postgres) -> Settings {
    let mut settings = Settings::local(
        ibex_authd::store::Database::from_url(&pg.app_url()).expect("dsn"),
        KeyDigest::new("IBEX_SERVICE_KEY", &SecretString::from(service_key())).expect("key"),
    );
    settings.admin =
        Some(KeyDigest::new("IBEX_ADMIN_KEY", &SecretString::from(ADMIN_KEY)).expect("key"));
    settings.hash_workers = 2;
    settings
}

pub async fn start_authd(pg: &Postgres) -> Running {
    start_with(settings(pg)).await
}

pub async fn start_with(settings: Settings) -> Running {
    server::start(settings).await.expect("authd starts")
}

/// A request carrying the service key (ValidateToken, ValidateAgent, WatchInvalidations).
pub fn internal<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert(SERVICE_KEY_HEADER, service_key().parse().expect("ascii"));
    request
}

pub async fn client(authd: &Running) -> Client {
    AuthServiceClient::connect(format!("http://{}", authd.grpc_addr))
        .await
        .expect("grpc connect")
}

pub fn admin<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert(ADMIN_KEY_HEADER, ADMIN_KEY.parse().expect("ascii"));
    request
}

pub fn bearer<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    request
}

pub async fn create_org(client: &mut Client, name: &str) -> Uuid {
    let org = client
        .create_org(admin(pb::CreateOrgRequest {
            name: name.into(),
            rpm_limit: 0,
        }))
        .await
        .expect("create org")
        .into_inner();
    Uuid::parse_str(&org.org_id).expect("uuid")
}

pub async fn create_agent(client: &mut Client, org: Uuid) -> Uuid {
    let agent = client
        .create_agent(admin(pb::CreateAgentRequest {
            org_id: org.to_string(),
            name: "agent".into(),
        }))
        .await
        .expect("create agent")
        .into_inner();
    Uuid::parse_str(&agent.agent_id).expect("uuid")
}

/// (token id, plaintext) created with the operator key.
pub async fn create_token(
    client: &mut Client,
    org: Uuid,
    permissions: u64,
    expires_in_ms: i64,
) -> (Uuid, String) {
    let token = client
        .create_token(admin(pb::CreateTokenRequest {
            org_id: org.to_string(),
            name: "t".into(),
            permissions,
            expires_in_ms,
            ..Default::default()
        }))
        .await
        .expect("create token")
        .into_inner();
    (Uuid::parse_str(&token.token_id).expect("uuid"), token.token)
}

pub async fn validate(client: &mut Client, token: &str) -> pb::ValidateTokenResponse {
    client
        .validate_token(internal(pb::ValidateTokenRequest {
            token: token.into(),
            client_addr: String::new(),
        }))
        .await
        .expect("validate")
        .into_inner()
}

pub fn status(response: &pb::ValidateTokenResponse) -> pb::TokenStatus {
    pb::TokenStatus::try_from(response.status).expect("known status")
}

/// Polls `check` until it returns true or `deadline` passes.
pub async fn eventually<F, Fut>(deadline: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + deadline;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
