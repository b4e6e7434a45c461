//! Open-loop, fixed-rate HTTP/1.1 load generator with latency correction.
//!
//! Each of `--connections` keep-alive connections sends its share of
//! `--rate` requests per second on a fixed schedule; a request's latency is
//! measured from the moment it was *scheduled* whenever the previous response
//! on its connection made it late, so a stalled server cannot hide its
//! queueing delay (no coordinated omission), and from the actual send
//! otherwise (the generator's own timer lateness is not the server's). Prints one JSON
//! object: achieved rate, p50/p99/p99.9/max in µs, errors, status counts.
//!
//! ```text
//! taskset -c 1 target/release/loadgen --addr 127.0.0.1:8080 --path /v1/internal/auth-probe \
//!     --rate 1000 --duration 10 --connections 16 -H "Authorization: Bearer ..." -H "X-IBEX-Agent-ID: ..."
//! ```
//! It runs on one thread (current-thread tokio): pin it to a core the server
//! does not use. `{uuid}` and `{secret}` in a header are replaced by fresh
//! random values on every request (a flood of distinct well-formed tokens);
//! `--bind 127.0.0.2` sends from another loopback address. `--auth-file FILE` (lines of
//! `TOKEN AGENT_ID`) sends request `n` with the credentials of line `n mod lines`, so one run
//! spreads over many tokens (and orgs). A response with `Connection: close` makes its connection
//! reconnect for the next request (counted in `reconnects`), as a well-behaved client does.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Args {
    addr: String,
    path: String,
    method: String,
    body: String,
    rate: f64,
    duration: Duration,
    connections: usize,
    headers: Vec<String>,
    /// Source address to connect from (e.g. 127.0.0.2), to test per-address guards.
    bind: Option<std::net::IpAddr>,
    /// Lines of `TOKEN AGENT_ID`, used in turn.
    auth_file: Option<String>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        addr: "127.0.0.1:8080".into(),
        path: "/".into(),
        method: "GET".into(),
        body: String::new(),
        rate: 1000.0,
        duration: Duration::from_secs(10),
        connections: 16,
        headers: Vec::new(),
        bind: None,
        auth_file: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--addr" => a.addr = val()?,
            "--path" => a.path = val()?,
            "--method" => a.method = val()?,
            "--body" => a.body = val()?,
            "--rate" => a.rate = val()?.parse()?,
            "--duration" => a.duration = Duration::from_secs_f64(val()?.parse()?),
            "--connections" => a.connections = val()?.parse()?,
            "-H" => a.headers.push(val()?),
            "--bind" => a.bind = Some(val()?.parse()?),
            "--auth-file" => a.auth_file = Some(val()?),
            other => bail!("unknown flag {other}"),
        }
    }
    if a.rate <= 0.0 || a.connections == 0 {
        bail!("--rate and --connections must be positive");
    }
    Ok(a)
}

/// Reads one response and returns its status and whether it said `Connection: close`.
/// Handles Content-Length bodies only (every server under test answers with one).
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<(u16, bool)> {
    let mut chunk = [0u8; 8192];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(head) = resp.parse(buf)? {
            let status = resp.code.unwrap_or(0);
            let mut len = 0usize;
            let mut close = false;
            for h in resp.headers.iter() {
                if h.name.eq_ignore_ascii_case("content-length") {
                    len = std::str::from_utf8(h.value)?.trim().parse()?;
                } else if h.name.eq_ignore_ascii_case("connection") {
                    close = h.value.eq_ignore_ascii_case(b"close");
                }
            }
            while buf.len() < head + len {
                let n = s.read(&mut chunk).await?;
                if n == 0 {
                    bail!("connection closed mid-body");
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            buf.drain(..head + len);
            return Ok((status, close));
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[derive(Default)]
struct ConnResult {
    latencies_us: Vec<u64>,
    statuses: BTreeMap<u16, u64>,
    errors: u64,
    reconnects: u64,
}

/// Replaces `{uuid}` / `{secret}` with fresh random values (xorshift; the
/// values only need to be distinct, not unpredictable).
fn fill_template(template: &[u8], seed: &mut u64) -> Vec<u8> {
    let mut next = || {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    };
    let text = String::from_utf8_lossy(template);
    let mut out = String::with_capacity(text.len() + 64);
    let mut rest: &str = &text;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(r) = tail.strip_prefix("{uuid}") {
            let (x, y) = (next(), next());
            out.push_str(&format!(
                "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
                x >> 32,
                (x >> 16) & 0xffff,
                x & 0xfff,
                y >> 52,
                y & 0xffff_ffff_ffff
            ));
            rest = r;
        } else if let Some(r) = tail.strip_prefix("{secret}") {
            const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
            for _ in 0..43 {
                out.push(ALNUM[(next() % ALNUM.len() as u64) as usize] as char);
            }
            rest = r;
        } else {
            out.push('{');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out.into_bytes()
}

async fn connect(a: &Args) -> std::io::Result<TcpStream> {
    let addr: std::net::SocketAddr = tokio::net::lookup_host(&a.addr)
        .await?
        .next()
        .ok_or_else(|| std::io::Error::other("no address"))?;
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    if let Some(ip) = a.bind {
        sock.bind(std::net::SocketAddr::new(ip, 0))?;
    }
    sock.connect(addr).await
}

async fn run_conn(
    a: Arc<Args>,
    requests: Arc<Vec<Vec<u8>>>,
    index: usize,
    start: tokio::time::Instant,
    offset: Duration,
) -> ConnResult {
    let interval = Duration::from_secs_f64(a.connections as f64 / a.rate);
    let mut out = ConnResult::default();
    let mut stream: Option<TcpStream> = None;
    let mut buf = Vec::with_capacity(16 * 1024);
    let mut k: u32 = 0;
    // When the previous response on this connection finished: if it came
    // after this request's slot, the server delayed us and latency counts
    // from the slot; otherwise from the actual send (tokio's timer wheel has
    // 1 ms granularity, and that lateness is ours, not the server's).
    let mut prev_done = start;
    let templated = requests[0]
        .windows(6)
        .any(|w| w == b"{uuid}" || w == b"{secr");
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15 ^ (offset.as_nanos() as u64 | 1);
    loop {
        let due = start + offset + interval * k;
        if due.duration_since(start) >= a.duration {
            break;
        }
        k += 1;
        tokio::time::sleep_until(due).await;
        if stream.is_none() {
            match connect(&a).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    stream = Some(s);
                    buf.clear();
                }
                Err(_) => {
                    out.errors += 1;
                    continue;
                }
            }
        }
        let Some(s) = stream.as_mut() else { continue };
        let request = &requests[(index + (k as usize - 1) * a.connections) % requests.len()];
        let sent = tokio::time::Instant::now();
        let reference = if prev_done > due { due } else { sent };
        let result = async {
            if templated {
                s.write_all(&fill_template(request, &mut seed)).await?;
            } else {
                s.write_all(request).await?;
            }
            read_response(s, &mut buf).await
        }
        .await;
        match result {
            Ok((status, close)) => {
                if close {
                    stream = None;
                    out.reconnects += 1;
                }
                prev_done = tokio::time::Instant::now();
                let lat = prev_done.duration_since(reference);
                out.latencies_us.push(lat.as_micros() as u64);
                *out.statuses.entry(status).or_default() += 1;
            }
            Err(_) => {
                out.errors += 1;
                stream = None;
            }
        }
    }
    out
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

fn main() -> anyhow::Result<()> {
    let a = Arc::new(parse_args()?);
    let build = |auth: &[String]| {
        let mut req = format!("{} {} HTTP/1.1\r\nHost: {}\r\n", a.method, a.path, a.addr);
        for h in a.headers.iter().chain(auth) {
            req.push_str(h);
            req.push_str("\r\n");
        }
        if !a.body.is_empty() || a.method == "POST" {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                a.body.len()
            ));
        }
        req.push_str("\r\n");
        req.push_str(&a.body);
        req.into_bytes()
    };
    let requests = match &a.auth_file {
        None => vec![build(&[])],
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
            let mut all = Vec::new();
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let mut parts = line.split_whitespace();
                let (Some(token), Some(agent)) = (parts.next(), parts.next()) else {
                    bail!("{path}: a line is not `TOKEN AGENT_ID`");
                };
                all.push(build(&[
                    format!("Authorization: Bearer {token}"),
                    format!("X-IBEX-Agent-ID: {agent}"),
                ]));
            }
            if all.is_empty() {
                bail!("{path} has no credentials");
            }
            all
        }
    };
    let requests = Arc::new(requests);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let wall = Instant::now();
    let results = rt.block_on(async {
        let start = tokio::time::Instant::now() + Duration::from_millis(50);
        let per_conn = Duration::from_secs_f64(a.connections as f64 / a.rate);
        let mut tasks = Vec::new();
        for i in 0..a.connections {
            let offset = per_conn.mul_f64(i as f64 / a.connections as f64);
            tasks.push(tokio::spawn(run_conn(
                a.clone(),
                requests.clone(),
                i,
                start,
                offset,
            )));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.push(t.await?);
        }
        anyhow::Ok(all)
    })?;
    let elapsed = wall.elapsed().as_secs_f64();
    let mut lat: Vec<u64> = Vec::new();
    let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
    let (mut errors, mut reconnects) = (0, 0);
    for r in results {
        lat.extend(r.latencies_us);
        errors += r.errors;
        reconnects += r.reconnects;
        for (s, n) in r.statuses {
            *statuses.entry(s).or_default() += n;
        }
    }
    lat.sort_unstable();
    let out = serde_json::json!({
        "target_rps": a.rate,
        "achieved_rps": (lat.len() as f64 / elapsed).round(),
        "requests": lat.len(),
        "errors": errors,
        "reconnects": reconnects,
        "statuses": statuses,
        "p50_us": pct(&lat, 0.50),
        "p99_us": pct(&lat, 0.99),
        "p999_us": pct(&lat, 0.999),
        "max_us": lat.last().copied().unwrap_or(0),
    });
    println!("{out}");
    Ok(())
}
