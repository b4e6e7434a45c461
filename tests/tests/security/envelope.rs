//! SEC-6: request ids, the error envelope over every response of the run, and the logs.

use anyhow::{anyhow, bail, ensure, Result};

use crate::common::*;
use crate::say;
use crate::support::*;

pub async fn request_id_is_echoed_or_replaced(ctx: Ctx) -> Result<()> {
    let t = ctx.tenant(READ).await?;
    let long_ok = "a".repeat(128);
    let too_long = "a".repeat(129);
    let ids: [(&str, bool); 6] = [
        ("sec-6.3:abc_DEF.1", true),
        (long_ok.as_str(), true),
        (too_long.as_str(), false),
        ("has space", false),
        ("a/b", false),
        ("ünïcode", false),
    ];
    for p in 0..2 {
        for (id, kept) in ids {
            for req in [agent_only(&t.agent), t.probe()] {
                let r = ctx.send(p, &req.header("X-Request-ID", id)).await?;
                let got = r
                    .header("X-Request-ID")
                    .ok_or_else(|| anyhow!("SEC-6.4 no X-Request-ID:\n{}", r.dump()))?;
                if kept {
                    ensure!(got == id, "valid X-Request-ID {id:?} replaced by {got:?}");
                } else {
                    ensure!(
                        got != id && uuid::Uuid::parse_str(got).is_ok(),
                        "invalid X-Request-ID {id:?} answered with {got:?}"
                    );
                }
            }
        }
        // Without one, every response gets its own.
        let a = ctx.send(p, &agent_only(&t.agent)).await?;
        let b = ctx.send(p, &agent_only(&t.agent)).await?;
        ensure!(
            a.header("X-Request-ID").is_some()
                && a.header("X-Request-ID") != b.header("X-Request-ID"),
            "request ids not fresh per response"
        );
    }
    Ok(())
}

/// SEC-6.1–6.5 over every response the suite received.
pub fn sec_6_envelope_on_every_response(env: &Env) -> Result<()> {
    let exchanges = env.exchanges();
    let secrets = env.secrets();
    let mut problems = Vec::new();
    let mut codes = std::collections::BTreeMap::<String, u32>::new();
    let mut errors = 0;
    for x in &exchanges {
        let r = &x.resp;
        let text = r.dump();
        let found = leaked(&text, &secrets);
        if !found.is_empty() || text.contains("$argon2") {
            problems.push(format!(
                "[{}] {}: SEC-6.5 a credential in the response:\n{text}",
                x.case, x.what
            ));
        }
        if r.header("x-request-id").is_none() {
            problems.push(format!(
                "[{}] {}: SEC-6.4 no X-Request-ID:\n{text}",
                x.case, x.what
            ));
        }
        if r.status >= 400 {
            errors += 1;
            *codes
                .entry(format!(
                    "{} {}",
                    r.status,
                    r.error_code().unwrap_or_default()
                ))
                .or_default() += 1;
            if let Err(e) = check_envelope(x) {
                problems.push(format!("[{}] {}: {e:#}\n{text}", x.case, x.what));
            }
        }
    }
    say!(
        "   SEC-6: {errors} error responses (of {} in all) checked against {} credentials: {codes:?}",
        exchanges.len(),
        secrets.len()
    );
    ensure!(errors > 0, "no error responses were collected");
    if !problems.is_empty() {
        let shown: Vec<&String> = problems.iter().take(10).collect();
        bail!(
            "{} responses fail SEC-6:\n{}",
            problems.len(),
            shown
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    Ok(())
}

/// S2: none of the credentials the run created or sent is in any service's log.
pub async fn logs_contain_no_credential(env: &Env) -> Result<()> {
    let secrets = env.secrets();
    let mut bytes = 0;
    let mut problems = Vec::new();
    for (name, log) in env.logs().await {
        bytes += log.len();
        ensure!(!log.is_empty(), "{name} wrote no log at all");
        for s in leaked(&log, &secrets) {
            let line = log.lines().find(|l| l.contains(s)).unwrap_or_default();
            problems.push(format!(
                "{name}: a credential ({} chars) in: {line}",
                s.len()
            ));
        }
        if log.contains("$argon2") {
            problems.push(format!("{name}: an Argon2 hash in the log"));
        }
    }
    say!(
        "   logs: {} KiB of authd and proxy logs searched for {} credentials",
        bytes / 1024,
        secrets.len()
    );
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    Ok(())
}
