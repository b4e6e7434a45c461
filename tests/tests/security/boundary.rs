//! The HTTP boundary: request smuggling, oversized bodies and headers, slow clients.

use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use ibex_e2e::http::Request;

use crate::common::*;
use crate::say;
use crate::support::*;

pub const RAW_WITHIN: Duration = Duration::from_secs(10);

pub async fn raw(ctx: &Ctx, p: usize, what: &str, bytes: Vec<u8>) -> Result<RawOutcome> {
    let out = raw_exchange(
        ctx.env.addr(p),
        ctx.ip,
        vec![bytes],
        Duration::ZERO,
        RAW_WITHIN,
        Duration::from_secs(3),
    )
    .await
    .with_context(|| what.to_owned())?;
    if let Some(r) = &out.resp {
        ctx.record_raw(what, r);
    }
    Ok(out)
}

pub async fn request_smuggling_is_refused_and_the_connection_closed(ctx: Ctx) -> Result<()> {
    let t = ctx.tenant(ALL).await?;
    let auth = format!(
        "Authorization: Bearer {}\r\nX-IBEX-Agent-ID: {}\r\n",
        t.token.pat, t.agent
    );
    let smuggled = "GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
    let post = |headers: &str, body: &str| {
        format!("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{auth}{headers}\r\n{body}")
    };
    let rows: Vec<(&str, String)> = vec![
        ("CL + TE", post("Content-Length: 6\r\nTransfer-Encoding: chunked\r\n", &format!("0\r\n\r\n{smuggled}"))),
        ("TE + CL", post("Transfer-Encoding: chunked\r\nContent-Length: 40\r\n", &format!("0\r\n\r\n{smuggled}"))),
        ("two different Content-Length", post("Content-Length: 5\r\nContent-Length: 40\r\n", &format!("hello{smuggled}"))),
        ("two equal Content-Length", post("Content-Length: 5\r\nContent-Length: 5\r\n", &format!("hello{smuggled}"))),
        ("Content-Length list", post("Content-Length: 5, 5\r\n", &format!("hello{smuggled}"))),
        ("signed Content-Length", post("Content-Length: +5\r\n", &format!("hello{smuggled}"))),
        ("TE other than chunked", post("Transfer-Encoding: xchunked\r\n", &format!("0\r\n\r\n{smuggled}"))),
        ("TE chunked twice", post("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", &format!("0\r\n\r\n{smuggled}"))),
        ("TE chunked, identity", post("Transfer-Encoding: chunked, identity\r\n", &format!("0\r\n\r\n{smuggled}"))),
        ("space before the colon", post("Transfer-Encoding : chunked\r\nContent-Length: 5\r\n", &format!("hello{smuggled}"))),
        (
            "TE on HTTP/1.0",
            format!("POST /v1/chat/completions HTTP/1.0\r\nHost: x\r\n{auth}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"),
        ),
        ("two Host headers", format!("GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n{smuggled}")),
        ("bad chunk size", post("Transfer-Encoding: chunked\r\n", &format!("zz\r\nhello\r\n0\r\n\r\n{smuggled}"))),
    ];
    for p in 0..2 {
        for (what, bytes) in &rows {
            let out = raw(&ctx, p, what, bytes.clone().into_bytes()).await?;
            let resp = out
                .resp
                .ok_or_else(|| anyhow!("{what} (proxy {p}): closed without a response"))?;
            check(&resp, 400, Some("BAD_REQUEST"))
                .with_context(|| format!("{what} (proxy {p})"))?;
            ensure!(
                out.extra.is_empty(),
                "{what} (proxy {p}): more followed the 400 — the smuggled request was served: {:?}",
                String::from_utf8_lossy(&out.extra)
            );
            ensure!(
                out.closed,
                "{what} (proxy {p}): connection left open after the 400"
            );
        }
        // Still serving, and a well-framed keep-alive pair is answered twice.
        let pair = "GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        let out = raw(
            &ctx,
            p,
            "a well-framed pipelined pair",
            pair.as_bytes().to_vec(),
        )
        .await?;
        let first = out
            .resp
            .ok_or_else(|| anyhow!("no answer to a valid request"))?;
        check(&first, 200, None)?;
        ensure!(
            String::from_utf8_lossy(&out.extra).starts_with("HTTP/1.1 200"),
            "the second pipelined request got no answer"
        );
    }
    Ok(())
}

pub async fn oversized_body_is_413_and_the_proxy_keeps_serving(ctx: Ctx) -> Result<()> {
    const SIZE: usize = 20 * 1024 * 1024;
    let t = ctx.tenant(ALL).await?;
    let head = |framing: &str| {
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
             X-IBEX-Agent-ID: {}\r\nContent-Type: application/json\r\n{framing}\r\n",
            t.token.pat, t.agent
        )
        .into_bytes()
    };
    let piece = vec![b'a'; 64 * 1024];
    for p in 0..2 {
        // Declared up front.
        let mut chunks = vec![head(&format!("Content-Length: {SIZE}\r\n"))];
        chunks.extend(std::iter::repeat_n(piece.clone(), SIZE / piece.len()));
        // Streamed in chunks, no length declared.
        let mut chunked = vec![head("Transfer-Encoding: chunked\r\n")];
        for _ in 0..SIZE / piece.len() {
            let mut c = format!("{:x}\r\n", piece.len()).into_bytes();
            c.extend_from_slice(&piece);
            c.extend_from_slice(b"\r\n");
            chunked.push(c);
        }
        chunked.push(b"0\r\n\r\n".to_vec());
        for (what, chunks) in [
            ("20 MiB Content-Length body", chunks),
            ("20 MiB chunked body", chunked),
        ] {
            let out = raw_exchange(
                ctx.env.addr(p),
                ctx.ip,
                chunks,
                Duration::ZERO,
                RAW_WITHIN,
                Duration::from_secs(5),
            )
            .await?;
            let resp = out
                .resp
                .ok_or_else(|| anyhow!("{what} (proxy {p}): closed without a response"))?;
            ctx.record_raw(what, &resp);
            check(&resp, 413, Some("PAYLOAD_TOO_LARGE"))
                .with_context(|| format!("{what} (proxy {p})"))?;
            ensure!(
                out.closed,
                "{what} (proxy {p}): connection left open after the 413"
            );
            // The proxy keeps serving.
            ctx.expect(p, &Request::get("/health"), 200, None).await?;
            ctx.expect(p, &t.probe(), 200, None).await?;
        }
    }
    Ok(())
}

pub async fn oversized_headers_are_431(ctx: Ctx) -> Result<()> {
    let big = "a".repeat(64 * 1024);
    let many: String = (0..150).map(|i| format!("X-Many-{i}: v\r\n")).collect();
    let rows = [
        (
            "one 64 KiB header",
            format!("GET /v1/internal/auth-probe HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n"),
        ),
        (
            "150 headers",
            format!("GET /v1/internal/auth-probe HTTP/1.1\r\nHost: x\r\n{many}\r\n"),
        ),
    ];
    for p in 0..2 {
        for (what, bytes) in &rows {
            let out = raw(&ctx, p, what, bytes.clone().into_bytes()).await?;
            let resp = out
                .resp
                .ok_or_else(|| anyhow!("{what} (proxy {p}): closed without a response"))?;
            check(&resp, 431, Some("HEADERS_TOO_LARGE"))
                .with_context(|| format!("{what} (proxy {p})"))?;
            ensure!(
                out.closed,
                "{what} (proxy {p}): connection left open after the 431"
            );
        }
        ctx.expect(p, &Request::get("/health"), 200, None).await?;
    }
    Ok(())
}

/// Beyond the matrix: clients that send their headers a few bytes at a time get 408 and are
/// disconnected after the header deadline; meanwhile everyone else is served as usual.
pub async fn slow_header_clients_are_cut_off_without_blocking_others(ctx: Ctx) -> Result<()> {
    const SLOW_CLIENTS: usize = 10;
    let t = ctx.tenant(READ).await?;
    ctx.warm(&t.probe(), 2).await?;
    let started = Instant::now();
    let mut slow = Vec::new();
    for i in 0..SLOW_CLIENTS {
        let addr = ctx.env.addr(i);
        let ip = ctx.env.fresh_ip();
        // A request line, then one header line every 500 ms, never the blank line.
        let mut drip = vec![b"GET /health HTTP/1.1\r\nHost: x\r\n".to_vec()];
        drip.extend((0..100).map(|n| format!("X-Drip-{n}: 1\r\n").into_bytes()));
        slow.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let out = raw_exchange(
                addr,
                ip,
                drip,
                Duration::from_millis(500),
                HEADER_TIMEOUT + Duration::from_secs(10),
                Duration::from_secs(3),
            )
            .await?;
            Ok::<_, anyhow::Error>((i % 2, t0.elapsed(), out))
        }));
    }
    // An idle connection that never sends a byte is closed too (silently).
    let idle = tokio::spawn(raw_exchange(
        ctx.env.addr(0),
        ctx.env.fresh_ip(),
        Vec::new(),
        Duration::ZERO,
        HEADER_TIMEOUT + Duration::from_secs(10),
        Duration::ZERO,
    ));
    // Others are served normally while the slow clients hang on.
    let (mut served, mut worst) = (0u32, Duration::ZERO);
    while !slow.iter().all(|h| h.is_finished()) {
        ensure!(
            started.elapsed() < HEADER_TIMEOUT + Duration::from_secs(15),
            "slow clients still connected"
        );
        for p in 0..2 {
            let t0 = Instant::now();
            ctx.expect(p, &Request::get("/health"), 200, None).await?;
            ctx.expect(p, &t.probe(), 200, None).await?;
            worst = worst.max(t0.elapsed());
            served += 2;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut cut = Vec::new();
    for h in slow {
        let (p, took, out) = h.await??;
        let resp = out
            .resp
            .ok_or_else(|| anyhow!("slow client on proxy {p}: closed without a 408"))?;
        ctx.record_raw("slow headers", &resp);
        check(&resp, 408, Some("REQUEST_TIMEOUT"))
            .with_context(|| format!("slow client on proxy {p}"))?;
        ensure!(
            out.closed,
            "slow client on proxy {p}: left connected after the 408"
        );
        ensure!(
            took >= HEADER_TIMEOUT - Duration::from_millis(500),
            "slow client cut off after only {took:?}"
        );
        cut.push(took);
    }
    let idle = idle.await??;
    ensure!(
        idle.resp.is_none() && idle.closed,
        "idle connection: {:?}",
        idle.resp.map(|r| r.dump())
    );
    ensure!(served >= 20, "only {served} requests served meanwhile");
    say!(
        "   slow headers: {SLOW_CLIENTS} clients cut off with 408 after {:.1}–{:.1} s; {served} other \
         requests served meanwhile (slowest pair {:.1} ms)",
        cut.iter().min().map_or(0.0, Duration::as_secs_f64),
        cut.iter().max().map_or(0.0, Duration::as_secs_f64),
        ms(worst)
    );
    Ok(())
}
