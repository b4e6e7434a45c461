//! Worker threads: listener binding, CPU pinning, the monoio runtime with
//! io_uring (or epoll) and the main thread's wait for a stop signal.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::mpsc;

use super::accept;
use super::config::ServerConfig;
use super::edge::{Edge, ReloadHook};
use super::shutdown::ShutdownHandle;
use crate::http::Service;

const LISTEN_BACKLOG: i32 = 4096;
const RING_ENTRIES: u32 = 1024;

/// A non-blocking SO_REUSEPORT + SO_REUSEADDR listener (usable by both
/// monoio drivers), bound without needing a runtime.
pub(super) fn bind_reuseport(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_port(true)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// A plain non-blocking listener (no SO_REUSEPORT: one process owns it), for
/// the admin port.
pub(super) fn bind_plain(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// CPUs this process may run on, in order, from `/proc/self/status`
/// (`Cpus_allowed_list: 0-3,6`). Empty when unknown.
fn allowed_cpus() -> Vec<usize> {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(parse_cpu_list)
        })
        .unwrap_or_default()
}

pub(super) fn parse_cpu_list(list: &str) -> Vec<usize> {
    let mut cpus = Vec::new();
    for part in list
        .trim()
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        if let (Ok(lo), Ok(hi)) = (lo.trim().parse::<usize>(), hi.trim().parse::<usize>()) {
            // A mask never lists more CPUs than this; guards a garbled file.
            if hi >= lo && hi - lo < 4096 {
                cpus.extend(lo..=hi);
            }
        }
    }
    cpus
}

/// Builds this thread's runtime and runs `fut` to completion on it:
/// io_uring with coop_taskrun + single_issuer + defer_taskrun when the kernel
/// allows, else the legacy (epoll) driver, with a log line saying which.
fn block_on_worker<Fut, Mk>(
    worker: usize,
    legacy: bool,
    make_future: Mk,
) -> std::io::Result<Fut::Output>
where
    Mk: FnOnce() -> Fut,
    Fut: std::future::Future,
{
    #[cfg(target_os = "linux")]
    if !legacy {
        if monoio::utils::detect_uring() {
            let mut urb = io_uring::IoUring::builder();
            urb.setup_coop_taskrun()
                .setup_single_issuer()
                .setup_defer_taskrun();
            match monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                .uring_builder(urb)
                .with_entries(RING_ENTRIES)
                .enable_timer()
                .build()
            {
                Ok(mut rt) => {
                    tracing::debug!(worker, driver = "io_uring", "worker runtime started");
                    return Ok(rt.block_on(make_future()));
                }
                Err(e) => tracing::warn!(
                    worker,
                    error = %e,
                    "io_uring ring could not be built (memlock limit?); using the legacy driver"
                ),
            }
        } else {
            tracing::warn!(
                worker,
                "io_uring unavailable; using the legacy (epoll) driver"
            );
        }
    }
    if legacy {
        tracing::debug!(worker, driver = "legacy", "worker runtime started");
    }
    let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()?;
    Ok(rt.block_on(make_future()))
}

/// What a worker thread reports to the main thread.
enum WorkerEvent {
    /// Listening and serving.
    Ready,
    /// Could not start (bind or runtime failure).
    Failed(std::io::Error),
    /// The thread ended (normally after a drain; early means it died).
    Exited,
}

/// Sends `Exited` when dropped, so a worker that panics is noticed too.
struct ExitGuard {
    worker: usize,
    events: mpsc::UnboundedSender<(usize, WorkerEvent)>,
}

impl Drop for ExitGuard {
    fn drop(&mut self) {
        let _ = self.events.send((self.worker, WorkerEvent::Exited));
    }
}

/// The listeners [`super::Server::bind`] bound on the calling thread.
pub(super) struct Listeners {
    /// Worker 0's public listener; the others bind `local` with SO_REUSEPORT.
    pub(super) first: std::net::TcpListener,
    pub(super) local: SocketAddr,
    /// The admin listener, served by worker 0.
    pub(super) admin: Option<std::net::TcpListener>,
}

/// Runs one worker per thread on `local`; worker 0 takes the `first`
/// listener, bound already by [`super::Server::bind`], and the admin one.
pub(super) fn run_workers<S, F>(
    cfg: ServerConfig,
    listeners: Listeners,
    edge: Edge,
    reload: Vec<ReloadHook>,
    shutdown: ShutdownHandle,
    make: Arc<F>,
) -> std::io::Result<()>
where
    F: Fn(usize) -> S + Send + Sync + 'static,
    S: Service + 'static,
{
    let Listeners {
        first,
        local,
        admin,
    } = listeners;
    let threads = cfg.threads.max(1);
    let cpus = if cfg.pin_cpus {
        allowed_cpus()
    } else {
        Vec::new()
    };
    let (events_tx, mut events) = mpsc::unbounded_channel();

    let mut first = Some(first);
    let mut admin = admin;
    for worker in 0..threads {
        let listener = first.take();
        let admin = admin.take();
        let edge = edge.clone();
        let cfg = cfg.clone();
        let make = make.clone();
        let worker_shutdown = shutdown.clone();
        let events = events_tx.clone();
        let cpu = (!cpus.is_empty()).then(|| cpus[worker % cpus.len()]);
        let spawned = std::thread::Builder::new()
            .name(format!("ibex-worker-{worker}"))
            .spawn(move || {
                let guard = ExitGuard {
                    worker,
                    events: events.clone(),
                };
                if let Some(cpu) = cpu {
                    if let Err(e) = monoio::utils::bind_to_cpu_set([cpu]) {
                        tracing::warn!(worker, cpu, error = ?e, "could not pin worker to its CPU");
                    }
                }
                let result = block_on_worker(worker, cfg.legacy_driver, || {
                    worker_main(WorkerStart {
                        worker,
                        cfg,
                        edge,
                        local,
                        first: listener,
                        admin,
                        make,
                        shutdown: worker_shutdown,
                        events,
                    })
                });
                if let Err(e) = result {
                    let _ = guard.events.send((worker, WorkerEvent::Failed(e)));
                }
            });
        if let Err(e) = spawned {
            // Workers already started see the stop and drain on their own.
            shutdown.shutdown();
            return Err(e);
        }
    }
    drop(events_tx);

    // The main thread only waits: for every worker to be ready, then for a
    // stop signal, then for the workers to drain.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(supervise(
        threads,
        &cfg,
        &edge,
        &reload,
        &shutdown,
        &mut events,
    ))
}

async fn supervise(
    threads: usize,
    cfg: &ServerConfig,
    edge: &Edge,
    reload: &[ReloadHook],
    shutdown: &ShutdownHandle,
    events: &mut mpsc::UnboundedReceiver<(usize, WorkerEvent)>,
) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut stop = shutdown.subscribe();

    let mut ready = 0;
    let mut exited = 0;
    let mut failure: Option<std::io::Error> = None;
    while ready < threads && exited < threads {
        match events.recv().await {
            Some((_, WorkerEvent::Ready)) => ready += 1,
            Some((worker, WorkerEvent::Failed(e))) => {
                tracing::error!(worker, error = %e, "worker failed to start");
                failure.get_or_insert(e);
                shutdown.shutdown();
            }
            Some((_, WorkerEvent::Exited)) => {
                exited += 1;
                shutdown.shutdown();
            }
            None => break,
        }
    }
    if failure.is_none() && exited > 0 {
        failure = Some(std::io::Error::other("a worker exited while starting"));
    }
    if failure.is_none() {
        tracing::info!(threads, "serving");
        loop {
            tokio::select! {
                _ = sigterm.recv() => tracing::info!("SIGTERM: draining"),
                _ = sigint.recv() => tracing::info!("SIGINT: draining"),
                _ = sighup.recv() => {
                    edge.reload_tls();
                    for hook in reload {
                        hook();
                    }
                    continue;
                }
                _ = stop.wait_for(|stopped| *stopped) => tracing::info!("shutdown requested: draining"),
                Some((worker, event)) = events.recv() => {
                    tracing::error!(worker, "worker stopped unexpectedly: draining the others");
                    match event {
                        WorkerEvent::Exited => exited += 1,
                        WorkerEvent::Failed(e) => {
                            failure.get_or_insert(e);
                        }
                        WorkerEvent::Ready => {}
                    }
                }
            }
            break;
        }
    }
    shutdown.shutdown();

    // Workers enforce drain_timeout themselves; the margin covers their
    // final close and thread exit.
    let deadline = tokio::time::Instant::now() + cfg.drain_timeout + Duration::from_secs(1);
    while exited < threads {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some((_, WorkerEvent::Exited))) => exited += 1,
            Ok(Some((worker, WorkerEvent::Failed(e)))) => {
                tracing::error!(worker, error = %e, "worker failed");
                failure.get_or_insert(e);
            }
            Ok(Some((_, WorkerEvent::Ready))) => {}
            Ok(None) => break,
            Err(_) => {
                tracing::warn!(
                    remaining = threads - exited,
                    "drain deadline passed with workers still running"
                );
                break;
            }
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// What one worker thread starts with.
struct WorkerStart<F> {
    worker: usize,
    cfg: ServerConfig,
    edge: Edge,
    local: SocketAddr,
    /// The listener bound by [`Server::bind`] (worker 0); others bind their own.
    first: Option<std::net::TcpListener>,
    /// The admin listener (worker 0 only).
    admin: Option<std::net::TcpListener>,
    make: Arc<F>,
    shutdown: ShutdownHandle,
    events: mpsc::UnboundedSender<(usize, WorkerEvent)>,
}

async fn worker_main<S, F>(start: WorkerStart<F>) -> std::io::Result<()>
where
    F: Fn(usize) -> S + Send + Sync + 'static,
    S: Service + 'static,
{
    let WorkerStart {
        worker,
        cfg,
        edge,
        local,
        first,
        admin,
        make,
        shutdown,
        events,
    } = start;
    let listener = match first {
        Some(l) => monoio::net::TcpListener::from_std(l)?,
        None => monoio::net::TcpListener::from_std(bind_reuseport(local)?)?,
    };
    let admin = admin.map(monoio::net::TcpListener::from_std).transpose()?;
    let service = make(worker);
    let _ = events.send((worker, WorkerEvent::Ready));
    accept::serve(
        worker,
        cfg,
        edge,
        listener,
        admin,
        service,
        shutdown.subscribe(),
    )
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-1\n"), vec![0, 1]);
        assert_eq!(parse_cpu_list("\t0-2,5,7-8"), vec![0, 1, 2, 5, 7, 8]);
        assert_eq!(parse_cpu_list("3"), vec![3]);
        assert_eq!(parse_cpu_list(""), Vec::<usize>::new());
        assert_eq!(parse_cpu_list("x,2-1,4"), vec![4]);
    }

    #[test]
    fn this_process_has_cpus() {
        assert!(!allowed_cpus().is_empty());
    }
}
