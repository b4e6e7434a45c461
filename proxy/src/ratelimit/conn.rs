//! One pipelined Redis connection per worker, spoken from the worker's own
//! monoio runtime: no thread hop per request.
//!
//! Many checks from many tasks on the worker share the connection. A check
//! appends its command to one output buffer and a reply slot to a FIFO in
//! the same step; a writer flushes everything queued in a tick with one
//! write, a reader hands each reply to the oldest slot. A driver task
//! connects, hands over, and on any failure drops every slot (their checks
//! fail open), backs off and reconnects. Not a general Redis client: RESP2,
//! one TCP address per connection, no TLS. A cluster is several of these,
//! one per master, routed by [`super::cluster`].

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Duration;

use futures::channel::oneshot;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt, OwnedReadHalf, OwnedWriteHalf, Splitable};
use monoio::net::TcpStream;
use secrecy::{ExposeSecret, SecretString};

use super::resp::{self, Frame};

/// A reply buffer that grows past this without holding one whole reply
/// means a broken or hostile peer.
const MAX_READ_BUF: usize = 256 * 1024;
/// Output buffers larger than this are not kept for reuse.
const KEEP_OUT_CAPACITY: usize = 64 * 1024;
/// A connection that lasted this long resets the reconnect backoff.
const STABLE_AFTER: Duration = Duration::from_secs(1);

/// Where and how to connect, parsed once from `redis://host:port[/db]`.
#[derive(Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub db: i64,
    pub username: Option<String>,
    pub password: Option<SecretString>,
}

impl Target {
    pub fn parse(url: &str) -> Result<Self, String> {
        use redis::IntoConnectionInfo as _;
        let info = url
            .into_connection_info()
            // The error text can quote the URL (and its password): keep it out.
            .map_err(|_| "IBEX_REDIS_URL is not a valid redis:// URL".to_string())?;
        let redis::ConnectionAddr::Tcp(host, port) = info.addr().clone() else {
            return Err("IBEX_REDIS_URL: only redis://host:port[/db] is supported".into());
        };
        let settings = info.redis_settings();
        Ok(Self {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port,
            db: settings.db(),
            username: settings.username().map(str::to_string),
            password: settings
                .password()
                .map(|p| SecretString::from(p.to_string())),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No connection; the driver is waiting to retry.
    Down,
    /// The driver is connecting: commands queue and go out once it is up.
    Connecting,
    Up,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    NotConnected,
    QueueFull,
}

struct Pending {
    reply: oneshot::Sender<Frame>,
    queued_ms: u64,
}

struct State {
    phase: Phase,
    /// Commands not yet handed to the socket, in order.
    out: Vec<u8>,
    /// One slot per command written or queued, oldest first.
    pending: VecDeque<Pending>,
}

/// The shared half of the connection: checks call [`Conn::send`], the
/// driver's reader and writer work the socket.
pub struct Conn {
    state: RefCell<State>,
    max_pending: usize,
    write_ready: Notify,
    reset: Notify,
}

impl Conn {
    pub fn new(max_pending: usize) -> Self {
        Self {
            state: RefCell::new(State {
                phase: Phase::Down,
                out: Vec::with_capacity(4096),
                pending: VecDeque::with_capacity(max_pending.min(1024)),
            }),
            max_pending: max_pending.max(1),
            write_ready: Notify::default(),
            reset: Notify::default(),
        }
    }

    pub fn phase(&self) -> Phase {
        self.state.borrow().phase
    }

    /// Queues one command; the receiver gets its reply, or is dropped if
    /// the connection fails first.
    pub fn send(&self, args: &[&[u8]], now_ms: u64) -> Result<oneshot::Receiver<Frame>, SendError> {
        let mut st = self.state.borrow_mut();
        if st.phase == Phase::Down {
            return Err(SendError::NotConnected);
        }
        if st.pending.len() >= self.max_pending {
            return Err(SendError::QueueFull);
        }
        resp::push_command(&mut st.out, args);
        let (reply, rx) = oneshot::channel();
        st.pending.push_back(Pending {
            reply,
            queued_ms: now_ms,
        });
        drop(st);
        self.write_ready.notify();
        Ok(rx)
    }

    /// How long the oldest unanswered command has waited.
    pub fn oldest_wait_ms(&self, now_ms: u64) -> u64 {
        self.state
            .borrow()
            .pending
            .front()
            .map_or(0, |p| now_ms.saturating_sub(p.queued_ms))
    }

    /// Asks the driver to drop the connection and reconnect (a peer that
    /// stopped answering but kept the socket open).
    /// Only an established connection can be reset: a request made while
    /// (re)connecting concerns commands not yet sent.
    pub fn request_reset(&self) {
        if self.phase() == Phase::Up {
            self.reset.notify();
        }
    }

    pub fn pending_len(&self) -> usize {
        self.state.borrow().pending.len()
    }

    pub(super) fn set_phase(&self, phase: Phase) {
        let mut st = self.state.borrow_mut();
        st.phase = phase;
        if phase == Phase::Down {
            // Dropping the senders wakes every waiting check with an error.
            st.pending.clear();
            st.out.clear();
        }
    }

    fn deliver(&self, frame: Frame) -> Result<(), resp::ProtocolError> {
        let slot = self.state.borrow_mut().pending.pop_front();
        match slot {
            // A check that timed out has dropped its receiver: nothing to do.
            Some(p) => {
                let _ = p.reply.send(frame);
                Ok(())
            }
            None => Err(resp::ProtocolError),
        }
    }
}

/// Connects, serves, reconnects with backoff until `shutdown` resolves.
/// `on_event` reports connection changes for logging and counting.
pub async fn drive(
    conn: Rc<Conn>,
    target: Target,
    script: Rc<str>,
    timing: DriveTiming,
    on_event: impl Fn(Event<'_>),
    shutdown: impl Future<Output = ()>,
) {
    let serve = async {
        let mut backoff = timing.backoff_min;
        loop {
            conn.reset.clear();
            conn.set_phase(Phase::Connecting);
            let connected =
                monoio::time::timeout(timing.connect_timeout, connect(&target, &script))
                    .await
                    .unwrap_or_else(|_| {
                        Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))
                    });
            match connected {
                Ok(stream) => {
                    conn.reset.clear();
                    conn.set_phase(Phase::Up);
                    on_event(Event::Connected);
                    let up_since = std::time::Instant::now();
                    let err = serve_connection(&conn, stream).await;
                    conn.set_phase(Phase::Down);
                    on_event(Event::Lost(&err));
                    // A server that accepts and then drops us at once must
                    // not be retried (and logged) at the fastest rate.
                    if up_since.elapsed() >= STABLE_AFTER {
                        backoff = timing.backoff_min;
                    }
                }
                Err(err) => {
                    conn.set_phase(Phase::Down);
                    on_event(Event::ConnectFailed(&err));
                }
            }
            monoio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(timing.backoff_max);
        }
    };
    let serve = std::pin::pin!(serve);
    let shutdown = std::pin::pin!(shutdown);
    futures::future::select(serve, shutdown).await;
    conn.set_phase(Phase::Down);
}

#[derive(Debug, Clone, Copy)]
pub struct DriveTiming {
    pub connect_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

pub enum Event<'a> {
    Connected,
    ConnectFailed(&'a io::Error),
    Lost(&'a io::Error),
}

/// TCP connect plus the handshake (AUTH, SELECT, SCRIPT LOAD), pipelined in
/// one round trip.
async fn connect(target: &Target, script: &str) -> io::Result<TcpStream> {
    let addr = resolve(&target.host, target.port).await?;
    let mut stream = TcpStream::connect_addr(addr).await?;
    stream.set_nodelay(true)?;
    let mut hello = Vec::with_capacity(256 + script.len());
    let mut expected = 1;
    if push_auth(&mut hello, target) {
        expected += 1;
    }
    if target.db != 0 {
        resp::push_command(&mut hello, &[b"SELECT", target.db.to_string().as_bytes()]);
        expected += 1;
    }
    resp::push_command(&mut hello, &[b"SCRIPT", b"LOAD", script.as_bytes()]);
    let (res, _) = stream.write_all(hello).await;
    res?;
    let mut buf = Vec::with_capacity(1024);
    let mut answered = 0;
    while answered < expected {
        buf = read_more(&mut stream, buf).await?;
        let mut at = 0;
        while let Some((frame, used)) = resp::parse(&buf[at..]).map_err(protocol)? {
            at += used;
            answered += 1;
            if let Frame::Error(_) = frame {
                // The text may say why (e.g. WRONGPASS) but never echoes
                // the password; still, keep it out of logs.
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "Redis refused the connection handshake (AUTH, SELECT or SCRIPT LOAD)",
                ));
            }
        }
        buf.drain(..at);
    }
    if !buf.is_empty() {
        return Err(protocol(resp::ProtocolError));
    }
    Ok(stream)
}

/// Appends `AUTH` if the target has a password; says whether it did.
pub(super) fn push_auth(out: &mut Vec<u8>, target: &Target) -> bool {
    let Some(password) = &target.password else {
        return false;
    };
    let password = password.expose_secret().as_bytes();
    match &target.username {
        Some(user) => resp::push_command(out, &[b"AUTH", user.as_bytes(), password]),
        None => resp::push_command(out, &[b"AUTH", password]),
    }
    true
}

pub(super) async fn resolve(host: &str, port: u16) -> io::Result<SocketAddr> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    // Name lookup blocks: do it on a throwaway thread, only when
    // (re)connecting, never on the worker.
    let (tx, rx) = oneshot::channel();
    let name = format!("{host}:{port}");
    std::thread::Builder::new()
        .name("ibex-redis-dns".into())
        .spawn(move || {
            let _ = tx.send(name.to_socket_addrs().map(|mut addrs| addrs.next()));
        })?;
    match rx.await {
        Ok(Ok(Some(addr))) => Ok(addr),
        Ok(Ok(None)) => Err(io::Error::new(
            io::ErrorKind::NotFound,
            "Redis host has no address",
        )),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(io::Error::other("Redis host lookup failed")),
    }
}

/// Runs reader and writer until either fails or a reset is requested.
async fn serve_connection(conn: &Conn, stream: TcpStream) -> io::Error {
    let (rd, wr) = stream.into_split();
    let reader = std::pin::pin!(read_replies(conn, rd));
    let writer = std::pin::pin!(write_commands(conn, wr));
    let reset = std::pin::pin!(async {
        conn.reset.notified().await;
        io::Error::new(io::ErrorKind::TimedOut, "Redis stopped answering")
    });
    let io = futures::future::select(reader, writer);
    match futures::future::select(io, reset).await {
        futures::future::Either::Left((either, _)) => either.factor_first().0,
        futures::future::Either::Right((err, _)) => err,
    }
}

async fn read_replies(conn: &Conn, mut rd: OwnedReadHalf<TcpStream>) -> io::Error {
    let mut buf = Vec::with_capacity(16 * 1024);
    loop {
        buf = match read_more(&mut rd, buf).await {
            Ok(buf) => buf,
            Err(e) => return e,
        };
        let mut at = 0;
        loop {
            match resp::parse(&buf[at..]) {
                Ok(Some((frame, used))) => {
                    at += used;
                    if let Err(e) = conn.deliver(frame) {
                        return protocol(e);
                    }
                }
                Ok(None) => break,
                Err(e) => return protocol(e),
            }
        }
        buf.drain(..at);
        if buf.len() > MAX_READ_BUF {
            return protocol(resp::ProtocolError);
        }
    }
}

/// Appends whatever the socket has to `buf`; EOF is an error.
pub(super) async fn read_more<R: AsyncReadRent>(
    rd: &mut R,
    mut buf: Vec<u8>,
) -> io::Result<Vec<u8>> {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(16 * 1024);
    }
    let len = buf.len();
    let (res, slice) = rd.read(buf.slice_mut(len..)).await;
    let buf = slice.into_inner();
    match res? {
        0 => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "Redis closed the connection",
        )),
        _ => Ok(buf),
    }
}

async fn write_commands(conn: &Conn, mut wr: OwnedWriteHalf<TcpStream>) -> io::Error {
    let mut spare = Vec::with_capacity(4096);
    loop {
        conn.write_ready.notified().await;
        let batch = {
            let mut st = conn.state.borrow_mut();
            if st.out.is_empty() {
                continue;
            }
            std::mem::replace(&mut st.out, spare)
        };
        let (res, mut batch) = wr.write_all(batch).await;
        if let Err(e) = res {
            return e;
        }
        batch.clear();
        if batch.capacity() > KEEP_OUT_CAPACITY {
            batch = Vec::with_capacity(4096);
        }
        spare = batch;
        // Commands queued while this write was in flight have already
        // notified; the loop picks them up without waiting.
    }
}

pub(super) fn protocol(e: resp::ProtocolError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// A single-thread, single-waiter wake-up flag: `notify` any number of times
/// in a tick, the waiter runs once.
#[derive(Default)]
pub(super) struct Notify {
    flag: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

impl Notify {
    pub(super) fn notify(&self) {
        self.flag.set(true);
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    pub(super) fn clear(&self) {
        self.flag.set(false);
    }

    pub(super) fn notified(&self) -> impl Future<Output = ()> + '_ {
        poll_fn(move |cx| {
            if self.flag.replace(false) {
                Poll::Ready(())
            } else {
                self.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls_with_db_and_password() {
        let t = Target::parse("redis://127.0.0.1:6390/3").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.db), ("127.0.0.1", 6390, 3));
        assert!(t.password.is_none());
        let t = Target::parse("redis://:s3cret@localhost").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.db), ("localhost", 6379, 0));
        assert_eq!(t.password.unwrap().expose_secret(), "s3cret");
        assert!(Target::parse("unix:///tmp/redis.sock").is_err());
        let err = Target::parse("redis://:s3cret@[bad")
            .err()
            .unwrap_or_default();
        assert!(!err.contains("s3cret"));
    }

    #[test]
    fn send_is_refused_when_down_and_bounded_by_max_pending() {
        let conn = Conn::new(2);
        assert_eq!(
            conn.send(&[b"PING"], 0).err(),
            Some(SendError::NotConnected)
        );
        conn.set_phase(Phase::Connecting);
        let a = conn.send(&[b"PING"], 10).unwrap();
        let _b = conn.send(&[b"PING"], 20).unwrap();
        assert_eq!(conn.send(&[b"PING"], 30).err(), Some(SendError::QueueFull));
        assert_eq!(conn.oldest_wait_ms(110), 100);
        conn.deliver(Frame::Integer(1)).unwrap();
        assert_eq!(conn.pending_len(), 1);
        drop(a);
        conn.set_phase(Phase::Down);
        assert_eq!(conn.pending_len(), 0);
        assert!(
            conn.deliver(Frame::Integer(1)).is_err(),
            "a reply nobody asked for"
        );
    }

    #[test]
    fn replies_reach_senders_in_fifo_order() {
        let conn = Conn::new(8);
        conn.set_phase(Phase::Up);
        let mut rxs: Vec<_> = (0..3).map(|i| conn.send(&[b"INCR"], i).unwrap()).collect();
        for i in 0..3 {
            conn.deliver(Frame::Integer(i)).unwrap();
        }
        for (i, rx) in rxs.iter_mut().enumerate() {
            assert_eq!(rx.try_recv().unwrap(), Some(Frame::Integer(i as i64)));
        }
    }
}
