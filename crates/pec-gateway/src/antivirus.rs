//! The clamd client: every message the access point accepts is scanned
//! before anything is signed, and a scan that cannot be completed is an
//! error, never a pass (fail closed).
//!
//! Speaks clamd's `INSTREAM` and `PING` commands over TCP or a Unix socket.
//! It touches only the socket it is configured with: no files, no metrics
//! (callers count verdicts).

use std::{fmt, io, path::PathBuf, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpStream, UnixStream},
};

/// The size of each `INSTREAM` chunk; clamd's own default for
/// `StreamMaxLength` is far larger, so this only bounds our write sizes.
const CHUNK: usize = 64 * 1024;

/// How long a scan may wait on any single connect, write or read by default.
const SCAN_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a ping may wait by default; a readiness probe must not hang.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// clamd's replies are one short line; anything longer is not clamd.
const MAX_REPLY: usize = 4096;

/// What clamd found in a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No signature matched.
    Clean,
    /// A signature matched; the name clamd reported (e.g. `Eicar-Signature`).
    Infected(String),
}

/// Why a scan or ping produced no verdict. Either way the message must not
/// pass.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// clamd could not be reached, the connection broke, or it did not answer
    /// in time.
    #[error("clamd unreachable: {0}")]
    Unreachable(#[source] io::Error),
    /// clamd answered with an error (e.g. `INSTREAM size limit exceeded`) or
    /// with something this client does not understand.
    #[error("clamd protocol error: {0}")]
    Protocol(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Endpoint {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            Self::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Where clamd listens and how long to wait for it. Cheap to clone; each
/// scan opens its own connection, so one `Clamd` serves concurrent scans.
#[derive(Debug, Clone)]
pub struct Clamd {
    endpoint: Endpoint,
    scan_timeout: Duration,
    ping_timeout: Duration,
}

/// The commands this client sends.
enum Command<'a> {
    Ping,
    /// One stream, sent as the concatenation of its pieces.
    Instream(&'a [&'a [u8]]),
}

impl Clamd {
    /// Parses `tcp:HOST:PORT` (an IPv6 host in brackets: `tcp:[::1]:3310`)
    /// or `unix:/absolute/path`. The error says what is wrong with `spec`.
    pub fn parse(spec: &str) -> Result<Clamd, String> {
        let endpoint = if let Some(rest) = spec.strip_prefix("tcp:") {
            let (host, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| format!("clamd address {spec:?}: expected tcp:HOST:PORT"))?;
            let host = host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host);
            if host.is_empty() {
                return Err(format!("clamd address {spec:?}: the host is empty"));
            }
            let port = port
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("clamd address {spec:?}: {port:?} is not a TCP port"))?;
            Endpoint::Tcp {
                host: host.to_owned(),
                port,
            }
        } else if let Some(path) = spec.strip_prefix("unix:") {
            // A relative path would depend on the working directory the
            // gateway happens to be started in.
            if !path.starts_with('/') {
                return Err(format!(
                    "clamd address {spec:?}: expected unix:/absolute/path"
                ));
            }
            Endpoint::Unix(PathBuf::from(path))
        } else {
            return Err(format!(
                "clamd address {spec:?}: expected tcp:HOST:PORT or unix:/path"
            ));
        };
        Ok(Clamd {
            endpoint,
            scan_timeout: SCAN_TIMEOUT,
            ping_timeout: PING_TIMEOUT,
        })
    }

    /// Bounds every connect, write and read of a scan by `timeout` (default
    /// 30 s). Pings use the shorter of this and their own 2 s, so a long scan
    /// bound never slows a readiness probe.
    pub fn with_timeout(self, timeout: Duration) -> Self {
        Self {
            scan_timeout: timeout,
            ping_timeout: timeout.min(PING_TIMEOUT),
            ..self
        }
    }

    /// Streams `message` to clamd and returns its verdict. Any failure to get
    /// a verdict is an error, which callers must treat as "do not accept".
    pub async fn scan(&self, message: &[u8]) -> Result<Verdict, ScanError> {
        self.scan_pieces(&[message]).await
    }

    /// Scans the concatenation of `pieces` as one stream, as
    /// [`Clamd::scan`] does (clamd cannot tell the difference), without
    /// copying them into one buffer.
    pub async fn scan_pieces(&self, pieces: &[&[u8]]) -> Result<Verdict, ScanError> {
        let reply = self
            .converse(Command::Instream(pieces), self.scan_timeout)
            .await?;
        parse_scan_reply(&reply)
    }

    /// Checks that clamd answers `PONG`, for the readiness probe.
    pub async fn ping(&self) -> Result<(), ScanError> {
        let reply = self.converse(Command::Ping, self.ping_timeout).await?;
        if reply == "PONG" {
            Ok(())
        } else {
            Err(ScanError::Protocol(format!(
                "unexpected reply to PING: {reply:?}"
            )))
        }
    }

    async fn converse(&self, command: Command<'_>, timeout: Duration) -> Result<String, ScanError> {
        match &self.endpoint {
            Endpoint::Tcp { host, port } => {
                let stream = bounded(
                    timeout,
                    TcpStream::connect((host.as_str(), *port)),
                    "connect",
                )
                .await?;
                // Chunks are written back to back; waiting for ACKs of small
                // segments would only slow the stream down.
                stream.set_nodelay(true).map_err(ScanError::Unreachable)?;
                exchange(stream, command, timeout).await
            }
            Endpoint::Unix(path) => {
                let stream = bounded(timeout, UnixStream::connect(path), "connect").await?;
                exchange(stream, command, timeout).await
            }
        }
        .map_err(|e| match e {
            ScanError::Unreachable(io) => ScanError::Unreachable(io::Error::new(
                io.kind(),
                format!("{}: {io}", self.endpoint),
            )),
            protocol => protocol,
        })
    }
}

/// Runs `op` with a deadline; running out of time counts as unreachable,
/// like any other I/O failure.
async fn bounded<T>(
    timeout: Duration,
    op: impl Future<Output = io::Result<T>>,
    what: &str,
) -> Result<T, ScanError> {
    match tokio::time::timeout(timeout, op).await {
        Ok(result) => result.map_err(ScanError::Unreachable),
        Err(_) => Err(ScanError::Unreachable(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{what} took longer than {timeout:?}"),
        ))),
    }
}

async fn exchange<S>(
    mut stream: S,
    command: Command<'_>,
    timeout: Duration,
) -> Result<String, ScanError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match send(&mut stream, &command, timeout).await {
        Ok(()) => read_reply(&mut stream, timeout).await,
        // A peer that stopped reading without closing will not answer
        // either; waiting for it would only double the time spent.
        Err(ScanError::Unreachable(e)) if e.kind() == io::ErrorKind::TimedOut => {
            Err(ScanError::Unreachable(e))
        }
        // clamd says why it stops reading (e.g. the size limit) and then
        // closes, which breaks our write; its reply is the better error.
        Err(write_error) => match read_reply(&mut stream, timeout).await {
            Ok(reply) if !reply.is_empty() => Ok(reply),
            _ => Err(write_error),
        },
    }
}

async fn send<S>(stream: &mut S, command: &Command<'_>, timeout: Duration) -> Result<(), ScanError>
where
    S: AsyncWrite + Unpin,
{
    match command {
        Command::Ping => bounded(timeout, stream.write_all(b"zPING\0"), "write").await?,
        Command::Instream(pieces) => {
            bounded(timeout, stream.write_all(b"zINSTREAM\0"), "write").await?;
            for chunk in pieces.iter().flat_map(|p| p.chunks(CHUNK)) {
                // `chunks` never yields more than CHUNK bytes, which fits.
                let len = u32::try_from(chunk.len()).unwrap_or(u32::MAX);
                bounded(timeout, stream.write_all(&len.to_be_bytes()), "write").await?;
                bounded(timeout, stream.write_all(chunk), "write").await?;
            }
            bounded(timeout, stream.write_all(&0u32.to_be_bytes()), "write").await?;
        }
    }
    bounded(timeout, stream.flush(), "write").await
}

/// Reads one reply, up to the `\0` that ends it in clamd's `z` mode (or the
/// end of the connection), bounded in size and time as a whole.
async fn read_reply<S>(stream: &mut S, timeout: Duration) -> Result<String, ScanError>
where
    S: AsyncRead + Unpin,
{
    let read = async {
        let mut reply = Vec::new();
        let mut buf = [0u8; 512];
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            let piece = &buf[..n];
            if let Some(end) = piece.iter().position(|b| *b == 0) {
                reply.extend_from_slice(&piece[..end]);
                break;
            }
            reply.extend_from_slice(piece);
            if reply.len() > MAX_REPLY {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("reply longer than {MAX_REPLY} bytes"),
                ));
            }
        }
        Ok(reply)
    };
    let reply = match tokio::time::timeout(timeout, read).await {
        Ok(Ok(reply)) => reply,
        Ok(Err(e)) if e.kind() == io::ErrorKind::InvalidData => {
            return Err(ScanError::Protocol(e.to_string()));
        }
        Ok(Err(e)) => return Err(ScanError::Unreachable(e)),
        Err(_) => {
            return Err(ScanError::Unreachable(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no reply within {timeout:?}"),
            )));
        }
    };
    let reply = String::from_utf8(reply)
        .map_err(|_| ScanError::Protocol("reply is not UTF-8".to_owned()))?;
    Ok(reply.trim().to_owned())
}

/// Interprets `stream: OK`, `stream: <Name> FOUND` and `... ERROR`.
fn parse_scan_reply(reply: &str) -> Result<Verdict, ScanError> {
    if reply.is_empty() {
        return Err(ScanError::Protocol(
            "clamd closed the connection without a verdict".to_owned(),
        ));
    }
    if reply.ends_with("ERROR") {
        return Err(ScanError::Protocol(reply.to_owned()));
    }
    let Some((_, result)) = reply.split_once(": ") else {
        return Err(ScanError::Protocol(format!("unexpected reply {reply:?}")));
    };
    if result == "OK" {
        return Ok(Verdict::Clean);
    }
    match result.strip_suffix(" FOUND").map(str::trim) {
        Some(name) if !name.is_empty() => Ok(Verdict::Infected(name.to_owned())),
        _ => Err(ScanError::Protocol(format!("unexpected reply {reply:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::net::{TcpListener, UnixListener};

    use super::*;

    const EICAR: &[u8] = br"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";

    #[derive(Clone, Copy)]
    enum Behaviour {
        Honest,
        Error,
        Silent,
        /// Refuses after the first chunk and closes, as clamd does at its
        /// `StreamMaxLength`.
        Limited,
    }

    /// What the fake saw: each chunk's length and the reassembled stream.
    #[derive(Default)]
    struct Seen {
        chunk_lengths: Vec<usize>,
        stream: Vec<u8>,
    }

    async fn fake_session<S>(mut s: S, behaviour: Behaviour, seen: Arc<Mutex<Seen>>)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut command = Vec::new();
        loop {
            let mut byte = [0u8; 1];
            if s.read_exact(&mut byte).await.is_err() {
                return;
            }
            if byte[0] == 0 {
                break;
            }
            command.push(byte[0]);
        }
        let reply: &[u8] = match command.as_slice() {
            b"zPING" => b"PONG\0",
            b"zINSTREAM" => {
                let mut stream = Vec::new();
                loop {
                    let mut len = [0u8; 4];
                    if s.read_exact(&mut len).await.is_err() {
                        return;
                    }
                    let len = u32::from_be_bytes(len) as usize;
                    if len == 0 {
                        break;
                    }
                    let mut chunk = vec![0u8; len];
                    if s.read_exact(&mut chunk).await.is_err() {
                        return;
                    }
                    seen.lock().unwrap().chunk_lengths.push(len);
                    stream.extend_from_slice(&chunk);
                    if let Behaviour::Limited = behaviour {
                        let _ = s.write_all(b"INSTREAM size limit exceeded. ERROR\0").await;
                        return;
                    }
                }
                let infected = stream
                    .windows(b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE".len())
                    .any(|w| w == b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE");
                seen.lock().unwrap().stream = stream;
                match behaviour {
                    Behaviour::Error => b"INSTREAM size limit exceeded. ERROR\0",
                    _ if infected => b"stream: Eicar-Test-Signature FOUND\0",
                    _ => b"stream: OK\0",
                }
            }
            _ => b"UNKNOWN COMMAND\0",
        };
        if let Behaviour::Silent = behaviour {
            // Holds the connection open without a word, like a wedged clamd.
            std::future::pending::<()>().await;
        }
        let _ = s.write_all(reply).await;
    }

    async fn fake_clamd(behaviour: Behaviour) -> (Clamd, Arc<Mutex<Seen>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(fake_session(s, behaviour, log.clone()));
            }
        });
        let clamd = Clamd::parse(&format!("tcp:127.0.0.1:{port}")).unwrap();
        (clamd, seen)
    }

    #[tokio::test]
    async fn a_clean_message_is_clean() {
        let (clamd, _) = fake_clamd(Behaviour::Honest).await;
        let verdict = clamd.scan(b"Subject: hello\r\n\r\nciao\r\n").await.unwrap();
        assert_eq!(verdict, Verdict::Clean);
    }

    #[tokio::test]
    async fn an_infected_message_reports_the_signature_name() {
        let (clamd, _) = fake_clamd(Behaviour::Honest).await;
        let mut message = b"Subject: test\r\n\r\n".to_vec();
        message.extend_from_slice(EICAR);
        let verdict = clamd.scan(&message).await.unwrap();
        assert_eq!(
            verdict,
            Verdict::Infected("Eicar-Test-Signature".to_owned())
        );
    }

    #[tokio::test]
    async fn an_error_reply_is_a_protocol_error() {
        let (clamd, _) = fake_clamd(Behaviour::Error).await;
        match clamd.scan(b"anything").await {
            Err(ScanError::Protocol(reply)) => assert!(reply.contains("size limit"), "{reply}"),
            other => panic!("expected a protocol error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn clamd_stopping_mid_stream_is_never_a_verdict() {
        let (clamd, _) = fake_clamd(Behaviour::Limited).await;
        let message = vec![b'x'; 4 * 1024 * 1024];
        match clamd.scan(&message).await {
            // Which one depends on whether clamd's reply is read before the
            // reset of the connection; both refuse the message.
            Err(ScanError::Protocol(reply)) => assert!(reply.contains("size limit"), "{reply}"),
            Err(ScanError::Unreachable(_)) => {}
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn nothing_listening_is_unreachable() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let clamd = Clamd::parse(&format!("tcp:127.0.0.1:{port}")).unwrap();
        assert!(matches!(
            clamd.scan(b"x").await,
            Err(ScanError::Unreachable(_))
        ));
        assert!(matches!(clamd.ping().await, Err(ScanError::Unreachable(_))));
    }

    #[tokio::test]
    async fn a_server_that_never_answers_is_unreachable_after_the_timeout() {
        let (clamd, _) = fake_clamd(Behaviour::Silent).await;
        let clamd = clamd.with_timeout(Duration::from_millis(200));
        match clamd.scan(b"hello").await {
            Err(ScanError::Unreachable(e)) => assert_eq!(e.kind(), io::ErrorKind::TimedOut),
            other => panic!("expected a timeout, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_large_message_is_sent_in_64_kib_chunks_and_reassembled_exactly() {
        let (clamd, seen) = fake_clamd(Behaviour::Honest).await;
        let message: Vec<u8> = (0..200 * 1024).map(|i| (i % 251) as u8).collect();
        assert_eq!(clamd.scan(&message).await.unwrap(), Verdict::Clean);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.chunk_lengths, vec![CHUNK, CHUNK, CHUNK, 8 * 1024]);
        assert!(seen.stream == message, "the reassembled stream differs");
    }

    #[tokio::test]
    async fn pieces_are_scanned_as_one_stream() {
        let (clamd, seen) = fake_clamd(Behaviour::Honest).await;
        // The test string split between two pieces is still found.
        let (head, tail) = EICAR.split_at(30);
        let verdict = clamd
            .scan_pieces(&[b"Subject: x\r\n\r\n", head, tail])
            .await;
        assert!(matches!(verdict, Ok(Verdict::Infected(_))), "{verdict:?}");
        let big: Vec<u8> = (0..100 * 1024).map(|i| (i % 251) as u8).collect();
        let (a, b) = big.split_at(70 * 1024);
        assert_eq!(clamd.scan_pieces(&[a, b]).await.unwrap(), Verdict::Clean);
        let seen = seen.lock().unwrap();
        assert!(seen.stream == big, "the reassembled stream differs");
    }

    #[tokio::test]
    async fn ping_expects_pong() {
        let (clamd, _) = fake_clamd(Behaviour::Honest).await;
        clamd.ping().await.unwrap();
    }

    #[tokio::test]
    async fn a_unix_socket_works_like_tcp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clamd.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(fake_session(s, Behaviour::Honest, seen.clone()));
            }
        });
        let clamd = Clamd::parse(&format!("unix:{}", path.display())).unwrap();
        clamd.ping().await.unwrap();
        assert!(matches!(clamd.scan(EICAR).await, Ok(Verdict::Infected(_))));
    }

    #[test]
    fn addresses_parse_and_bad_ones_are_refused() {
        let tcp = Clamd::parse("tcp:clamd.pec.svc:3310").unwrap();
        assert_eq!(
            tcp.endpoint,
            Endpoint::Tcp {
                host: "clamd.pec.svc".to_owned(),
                port: 3310
            }
        );
        let v6 = Clamd::parse("tcp:[::1]:3310").unwrap();
        assert_eq!(v6.endpoint.to_string(), "tcp:[::1]:3310");
        let unix = Clamd::parse("unix:/run/clamd/clamd.sock").unwrap();
        assert_eq!(
            unix.endpoint,
            Endpoint::Unix(PathBuf::from("/run/clamd/clamd.sock"))
        );
        assert_eq!(unix.scan_timeout, SCAN_TIMEOUT);
        assert_eq!(unix.ping_timeout, PING_TIMEOUT);
        for bad in [
            "",
            "clamd:3310",
            "tcp:clamd",
            "tcp::3310",
            "tcp:clamd:0",
            "tcp:clamd:99999",
            "tcp:clamd:port",
            "unix:",
            "unix:relative.sock",
        ] {
            assert!(Clamd::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn replies_are_interpreted() {
        assert_eq!(parse_scan_reply("stream: OK").unwrap(), Verdict::Clean);
        assert_eq!(
            parse_scan_reply("stream: Win.Test.EICAR_HDB-1 FOUND").unwrap(),
            Verdict::Infected("Win.Test.EICAR_HDB-1".to_owned())
        );
        for bad in ["", "stream: FOUND", "stream:", "OK", "stream: maybe"] {
            assert!(
                matches!(parse_scan_reply(bad), Err(ScanError::Protocol(_))),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn a_shorter_timeout_also_shortens_ping_but_a_longer_one_does_not() {
        let clamd = Clamd::parse("tcp:localhost:3310").unwrap();
        let short = clamd.clone().with_timeout(Duration::from_millis(100));
        assert_eq!(short.ping_timeout, Duration::from_millis(100));
        let long = clamd.with_timeout(Duration::from_secs(120));
        assert_eq!(long.scan_timeout, Duration::from_secs(120));
        assert_eq!(long.ping_timeout, PING_TIMEOUT);
    }
}
