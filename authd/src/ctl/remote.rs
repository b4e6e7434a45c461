//! ibexctl's management commands: gRPC calls to authd, authorised by `--token` (a PAT) or
//! `IBEX_ADMIN_KEY`.

use std::time::Duration;

use anyhow::Context;
use ibex_proto::pb::{self, auth_service_client::AuthServiceClient};
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::{time_json, AgentCommand, Global, OrgCommand, TokenCommand};
use crate::authz::ADMIN_KEY_HEADER;
use crate::perms;
use crate::service::agent_status_name;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// `https://` → TLS trusting `ca_file` (PEM) or, without one, the system roots.
pub fn endpoint(url: &str, ca_file: Option<&std::path::Path>) -> anyhow::Result<Endpoint> {
    let mut endpoint =
        Endpoint::from_shared(url.to_owned()).context("IBEX_AUTHD_GRPC is not a valid URL")?;
    if url.starts_with("https://") {
        let mut tls = ClientTlsConfig::new();
        tls = match ca_file {
            Some(path) => {
                let pem = std::fs::read(path)
                    .with_context(|| format!("IBEX_AUTHD_CA_FILE {}", path.display()))?;
                tls.ca_certificate(Certificate::from_pem(pem))
            }
            None => tls.with_native_roots(),
        };
        endpoint = endpoint
            .tls_config(tls)
            .context("IBEX_AUTHD_GRPC / IBEX_AUTHD_CA_FILE")?;
    } else if ca_file.is_some() {
        anyhow::bail!("IBEX_AUTHD_CA_FILE is set but IBEX_AUTHD_GRPC is not an https:// address");
    }
    Ok(endpoint)
}

pub(super) async fn client(global: &Global) -> anyhow::Result<AuthServiceClient<Channel>> {
    let channel = endpoint(&global.authd, global.authd_ca_file.as_deref())?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT)
        .connect()
        .await
        .with_context(|| format!("connecting to authd at {}", global.authd))?;
    Ok(AuthServiceClient::new(channel))
}

/// The PAT from --token / IBEX_TOKEN, or the first line of --token-file.
fn caller_pat(global: &Global) -> anyhow::Result<Option<SecretString>> {
    if let Some(path) = &global.token_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--token-file {}", path.display()))?;
        let first = text.lines().next().unwrap_or_default().trim();
        anyhow::ensure!(
            !first.is_empty(),
            "--token-file {} is empty",
            path.display()
        );
        return Ok(Some(SecretString::from(first.to_owned())));
    }
    Ok(global.token.clone())
}

/// Wraps a message with the caller's credential.
pub(super) fn request<T>(global: &Global, message: T) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = caller_pat(global)? {
        let value = MetadataValue::try_from(format!("Bearer {}", token.expose_secret()))
            .context("the PAT contains characters not allowed in a header")?;
        request.metadata_mut().insert("authorization", value);
    } else if let Some(key) = &global.admin_key {
        let value = MetadataValue::try_from(key.expose_secret())
            .context("IBEX_ADMIN_KEY contains characters not allowed in a header")?;
        request.metadata_mut().insert(ADMIN_KEY_HEADER, value);
    } else {
        anyhow::bail!("no credential: set IBEX_ADMIN_KEY, IBEX_TOKEN or --token-file");
    }
    Ok(request)
}

pub(super) fn rpc_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}

pub async fn org(global: &Global, cmd: OrgCommand) -> anyhow::Result<String> {
    let (name, rpm) = match cmd {
        OrgCommand::Create { name, rpm } => (name, rpm),
        OrgCommand::SetModels { org, allow } => {
            let response = client(global)
                .await?
                .set_org_models(request(
                    global,
                    pb::SetOrgModelsRequest {
                        org_id: org,
                        allowed_models: super::model_list(&allow),
                    },
                )?)
                .await
                .map_err(rpc_error)?
                .into_inner();
            return Ok(json!({
                "id": response.org_id,
                "allowed_models": response.allowed_models,
            })
            .to_string());
        }
        OrgCommand::SetLimits {
            org,
            rpm,
            tpm,
            monthly_tokens,
            monthly_usd,
        } => {
            let (tpm_limit, tpm_default) = match tpm.as_deref() {
                None => (None, false),
                Some("default") => (None, true),
                Some(n) => (
                    Some(n.parse::<u64>().map_err(|_| {
                        anyhow::anyhow!("--tpm must be a number of tokens or `default`")
                    })?),
                    false,
                ),
            };
            let r = client(global)
                .await?
                .set_org_limits(request(
                    global,
                    pb::SetOrgLimitsRequest {
                        org_id: org,
                        rpm_limit: rpm,
                        tpm_limit,
                        monthly_token_budget: monthly_tokens,
                        monthly_usd_budget: monthly_usd,
                        tpm_default,
                    },
                )?)
                .await
                .map_err(rpc_error)?
                .into_inner();
            return Ok(json!({
                "id": r.org_id,
                "rpm_limit": r.rpm_limit,
                "tpm_limit": r.tpm_limit,
                "monthly_token_budget": r.monthly_token_budget,
                "monthly_usd_budget": r.monthly_usd_budget,
            })
            .to_string());
        }
    };
    let response = client(global)
        .await?
        .create_org(request(
            global,
            pb::CreateOrgRequest {
                name,
                rpm_limit: rpm.unwrap_or(0),
            },
        )?)
        .await
        .map_err(rpc_error)?
        .into_inner();
    Ok(json!({ "id": response.org_id, "rpm_limit": response.rpm_limit }).to_string())
}

pub async fn agent(global: &Global, cmd: AgentCommand) -> anyhow::Result<String> {
    let mut client = client(global).await?;
    match cmd {
        AgentCommand::Create { org, name } => {
            let response = client
                .create_agent(request(
                    global,
                    pb::CreateAgentRequest { org_id: org, name },
                )?)
                .await
                .map_err(rpc_error)?
                .into_inner();
            Ok(json!({ "id": response.agent_id, "status": "active" }).to_string())
        }
        AgentCommand::SetLimits {
            org,
            agent,
            tpm,
            monthly_tokens,
        } => {
            let r = client
                .set_agent_limits(request(
                    global,
                    pb::SetAgentLimitsRequest {
                        org_id: org,
                        agent_id: agent,
                        tpm_limit: tpm,
                        monthly_token_budget: monthly_tokens,
                    },
                )?)
                .await
                .map_err(rpc_error)?
                .into_inner();
            Ok(json!({
                "id": r.agent_id,
                "org_id": r.org_id,
                "tpm_limit": r.tpm_limit,
                "monthly_token_budget": r.monthly_token_budget,
            })
            .to_string())
        }
        AgentCommand::SetStatus { org, agent, status } => {
            let wanted = crate::service::agent_status_from_name(&status);
            anyhow::ensure!(
                agent_status_name(wanted).is_some(),
                "--status must be active, paused, archived or suspended"
            );
            let response = client
                .set_agent_status(request(
                    global,
                    pb::SetAgentStatusRequest {
                        org_id: org,
                        agent_id: agent,
                        status: wanted as i32,
                    },
                )?)
                .await
                .map_err(rpc_error)?
                .into_inner();
            Ok(json!({ "id": response.agent_id, "status": status }).to_string())
        }
    }
}

/// `90d`, `1h`, `2s` → milliseconds.
pub fn parse_expires_in(text: &str) -> anyhow::Result<i64> {
    let duration = humantime::parse_duration(text)
        .with_context(|| format!("--expires-in {text:?}: expected e.g. 90d, 1h, 2s"))?;
    anyhow::ensure!(!duration.is_zero(), "--expires-in must be > 0");
    i64::try_from(duration.as_millis()).context("--expires-in is too large")
}

pub async fn token(global: &Global, cmd: TokenCommand) -> anyhow::Result<String> {
    match cmd {
        TokenCommand::Create {
            org,
            name,
            agent,
            permissions,
            expires_in,
            models,
        } => {
            let permissions = perms::parse(&permissions).context("--permissions")?;
            let expires_in_ms = expires_in.as_deref().map(parse_expires_in).transpose()?;
            let response = client(global)
                .await?
                .create_token(request(
                    global,
                    pb::CreateTokenRequest {
                        org_id: org,
                        name,
                        agent_id: agent.unwrap_or_default(),
                        user_id: String::new(),
                        permissions,
                        expires_in_ms: expires_in_ms.unwrap_or(0),
                        allowed_models: super::model_list(&models),
                    },
                )?)
                .await
                .map_err(rpc_error)?
                .into_inner();
            Ok(json!({
                "id": response.token_id,
                "token": response.token,
                "permissions": response.permissions,
                "expires_at": time_json(response.expires_at_unix_ms),
            })
            .to_string())
        }
        TokenCommand::Revoke { org, id } => {
            let response = client(global)
                .await?
                .revoke_token(request(
                    global,
                    pb::RevokeTokenRequest {
                        org_id: org,
                        token_id: id,
                    },
                )?)
                .await
                .map_err(rpc_error)?
                .into_inner();
            Ok(json!({
                "id": response.token_id,
                "revoked_at": time_json(response.revoked_at_unix_ms),
            })
            .to_string())
        }
        TokenCommand::List { org } => {
            let response = client(global)
                .await?
                .list_tokens(request(global, pb::ListTokensRequest { org_id: org })?)
                .await
                .map_err(rpc_error)?
                .into_inner();
            let tokens: Vec<_> = response
                .tokens
                .into_iter()
                .map(|t| {
                    let opt = |s: String| if s.is_empty() { None } else { Some(s) };
                    json!({
                        "id": t.id,
                        "org_id": t.org_id,
                        "name": t.name,
                        "agent_id": opt(t.agent_id),
                        "user_id": opt(t.user_id),
                        "permissions": t.permissions,
                        "created_at": time_json(t.created_at_unix_ms),
                        "expires_at": time_json(t.expires_at_unix_ms),
                        "revoked_at": time_json(t.revoked_at_unix_ms),
                        "last_used_at": time_json(t.last_used_at_unix_ms),
                    })
                })
                .collect();
            Ok(json!({ "tokens": tokens }).to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_durations() {
        assert_eq!(parse_expires_in("2s").ok(), Some(2_000));
        assert_eq!(parse_expires_in("1h").ok(), Some(3_600_000));
        assert_eq!(parse_expires_in("90d").ok(), Some(90 * 86_400_000));
        assert!(parse_expires_in("soon").is_err());
        assert!(parse_expires_in("0s").is_err());
    }
}
