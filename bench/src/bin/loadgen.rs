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
//! does not use.

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
            other => bail!("unknown flag {other}"),
        }
    }
    if a.rate <= 0.0 || a.connections == 0 {
        bail!("--rate and --connections must be positive");
    }
    Ok(a)
}

/// Reads one response and returns its status. Handles Content-Length bodies
/// only (every server under test answers with one).
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<u16> {
    let mut chunk = [0u8; 8192];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(head) = resp.parse(buf)? {
            let status = resp.code.unwrap_or(0);
            let mut len = 0usize;
            for h in resp.headers.iter() {
                if h.name.eq_ignore_ascii_case("content-length") {
                    len = std::str::from_utf8(h.value)?.trim().parse()?;
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
            return Ok(status);
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
}

async fn run_conn(
    a: Arc<Args>,
    request: Arc<Vec<u8>>,
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
    loop {
        let due = start + offset + interval * k;
        if due.duration_since(start) >= a.duration {
            break;
        }
        k += 1;
        tokio::time::sleep_until(due).await;
        if stream.is_none() {
            match TcpStream::connect(&a.addr).await {
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
        let sent = tokio::time::Instant::now();
        let reference = if prev_done > due { due } else { sent };
        let result = async {
            s.write_all(&request).await?;
            read_response(s, &mut buf).await
        }
        .await;
        match result {
            Ok(status) => {
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
    let mut req = format!("{} {} HTTP/1.1\r\nHost: {}\r\n", a.method, a.path, a.addr);
    for h in &a.headers {
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
    let request = Arc::new(req.into_bytes());

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
                request.clone(),
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
    let mut errors = 0;
    for r in results {
        lat.extend(r.latencies_us);
        errors += r.errors;
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
        "statuses": statuses,
        "p50_us": pct(&lat, 0.50),
        "p99_us": pct(&lat, 0.99),
        "p999_us": pct(&lat, 0.999),
        "max_us": lat.last().copied().unwrap_or(0),
    });
    println!("{out}");
    Ok(())
}
