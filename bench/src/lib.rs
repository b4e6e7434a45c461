//! Shared helpers for the benches in `benches/` and the measuring tools in `src/bin/`:
//! environment knobs, CPU time from `/proc`, and Redis' own counters.

use anyhow::Result;

/// The variable `name` as a number, or `default`.
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// utime + stime in clock ticks from a `stat` file (fields 14 and 15).
pub fn ticks(path: &str) -> u64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_ascii_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    f.iter().sum()
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 if that fails).
pub fn clk_tck() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// The first number after `field` in `INFO <section>` of the Redis on `port` (0 if absent).
pub async fn info_field(port: u16, section: &str, field: &str) -> u64 {
    let reply = redis_raw(port, &["INFO", section])
        .await
        .unwrap_or_default();
    reply
        .split(field)
        .nth(1)
        .and_then(|r| {
            r.split(|c: char| !c.is_ascii_digit())
                .find(|s| !s.is_empty())
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// One command on a fresh connection; the first read of the reply, as text.
pub async fn redis_raw(port: u16, args: &[&str]) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(req.as_bytes()).await?;
    let mut buf = vec![0u8; 64 * 1024];
    let n = s.read(&mut buf).await?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// (EVALSHA + EVAL calls, redis-server CPU ticks) summed over the nodes on `ports`.
pub async fn redis_totals(ports: &[u16]) -> (u64, u64) {
    let (mut calls, mut cpu) = (0, 0);
    for &port in ports {
        calls += info_field(port, "commandstats", "cmdstat_evalsha:calls=").await;
        calls += info_field(port, "commandstats", "cmdstat_eval:calls=").await;
        let pid = info_field(port, "server", "process_id:").await;
        cpu += ticks(&format!("/proc/{pid}/stat"));
    }
    (calls, cpu)
}
