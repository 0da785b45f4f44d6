//! Connecting the TCP mesh between the processes of one generation.
//!
//! timely's own `create_sockets` waits forever for a missing peer and accepts any connection that
//! sends a process index. We connect the mesh ourselves and hand the sockets to
//! `initialize_networking_from_sockets`, so that:
//! * setting up has a deadline, and a missing peer becomes an error the supervisor reports;
//! * a connection proves it belongs to this cluster and generation (token and generation in a
//!   handshake), so a stale process of an older generation cannot join a newer one;
//! * every socket has TCP keepalive and a user timeout, so a peer that vanishes without a FIN
//!   (a cut link) is noticed by the kernel instead of hanging the computation.
//!
//! Process `i` connects to every `j < i` and accepts from every `j > i`, as timely does.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::thread;
use std::time::{Duration, Instant};

use socket2::{SockRef, TcpKeepalive};

use sundial_protocol::Formation;

const HELLO: &[u8; 8] = b"SDLMESH1";
const ACK: &[u8; 8] = b"SDLMESOK";

/// Why the mesh could not be connected.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// The formation is inconsistent.
    #[error("invalid formation: {0}")]
    Invalid(String),
    /// A peer did not connect or accept in time.
    #[error("timed out connecting the mesh: {missing}")]
    Timeout {
        /// Which peers were missing.
        missing: String,
    },
    /// A socket operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> MeshError {
    move |source| MeshError::Io { context: context.into(), source }
}

/// Connects this process to every other process of `formation`, accepting on `listener`.
/// The result has one socket per process, `None` at this process's own index.
pub fn connect(
    formation: &Formation,
    listener: TcpListener,
    timeout: Duration,
) -> Result<Vec<Option<TcpStream>>, MeshError> {
    let n = formation.addresses.len();
    let me = formation.index;
    if me >= n {
        return Err(MeshError::Invalid(format!("index {me} is outside {n} processes")));
    }
    let deadline = Instant::now() + timeout;
    let accept_formation = formation.clone();
    let acceptor = thread::Builder::new()
        .name("sundial:mesh-accept".into())
        .spawn(move || accept_all(&accept_formation, listener, deadline))
        .map_err(io_err("spawning the mesh acceptor"))?;

    let mut sockets: Vec<Option<TcpStream>> = Vec::with_capacity(n);
    let mut connect_error = None;
    for peer in 0..me {
        match connect_one(formation, peer, deadline) {
            Ok(stream) => sockets.push(Some(stream)),
            Err(e) => {
                connect_error = Some(e);
                break;
            }
        }
    }
    let accepted = acceptor.join().map_err(|_| MeshError::Invalid("the mesh acceptor panicked".into()))?;
    if let Some(e) = connect_error {
        return Err(e);
    }
    sockets.push(None);
    sockets.extend(accepted?.into_iter().map(Some));
    for stream in sockets.iter().flatten() {
        stream.set_read_timeout(None).map_err(io_err("clearing read timeout"))?;
        stream.set_write_timeout(None).map_err(io_err("clearing write timeout"))?;
    }
    Ok(sockets)
}

fn remaining(deadline: Instant) -> Option<Duration> {
    deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero())
}

fn resolve(addr: &str) -> io::Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = addr.to_socket_addrs()?.collect();
    if addrs.is_empty() {
        return Err(io::Error::new(io::ErrorKind::NotFound, format!("{addr} resolves to no address")));
    }
    Ok(addrs)
}

fn connect_one(formation: &Formation, peer: usize, deadline: Instant) -> Result<TcpStream, MeshError> {
    let addr = &formation.addresses[peer];
    let mut last_error = String::from("no attempt made");
    while let Some(left) = remaining(deadline) {
        match try_connect(formation, addr, left.min(Duration::from_secs(2))) {
            Ok(stream) => return Ok(stream),
            Err(e) => {
                last_error = e.to_string();
                thread::sleep(Duration::from_millis(100).min(remaining(deadline).unwrap_or_default()));
            }
        }
    }
    Err(MeshError::Timeout { missing: format!("process {peer} at {addr} not reachable: {last_error}") })
}

fn try_connect(formation: &Formation, addr: &str, timeout: Duration) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    for sockaddr in resolve(addr)? {
        match TcpStream::connect_timeout(&sockaddr, timeout) {
            Ok(mut stream) => {
                configure(&stream)?;
                stream.set_read_timeout(Some(timeout))?;
                stream.set_write_timeout(Some(timeout))?;
                let mut hello = Vec::with_capacity(32);
                hello.extend_from_slice(HELLO);
                hello.extend_from_slice(&formation.token.to_be_bytes());
                hello.extend_from_slice(&formation.generation.to_be_bytes());
                hello.extend_from_slice(&(formation.index as u64).to_be_bytes());
                stream.write_all(&hello)?;
                let mut ack = [0u8; 8];
                stream.read_exact(&mut ack)?;
                if &ack != ACK {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "peer did not acknowledge the mesh handshake",
                    ));
                }
                return Ok(stream);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn accept_all(formation: &Formation, listener: TcpListener, deadline: Instant) -> Result<Vec<TcpStream>, MeshError> {
    let n = formation.addresses.len();
    let me = formation.index;
    let mut slots: Vec<Option<TcpStream>> = (me + 1..n).map(|_| None).collect();
    listener.set_nonblocking(true).map_err(io_err("setting the listener non-blocking"))?;
    while slots.iter().any(Option::is_none) {
        if remaining(deadline).is_none() {
            let missing: Vec<String> = slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.is_none())
                .map(|(i, _)| format!("process {} ({})", me + 1 + i, formation.addresses[me + 1 + i]))
                .collect();
            return Err(MeshError::Timeout { missing: format!("no connection from {}", missing.join(", ")) });
        }
        match listener.accept() {
            Ok((stream, from)) => match read_hello(formation, &stream) {
                Ok(peer) if peer > me && peer < n && slots[peer - me - 1].is_none() => {
                    let mut stream = stream;
                    if stream.write_all(ACK).is_ok() {
                        slots[peer - me - 1] = Some(stream);
                    }
                }
                Ok(peer) => {
                    tracing::warn!(%from, peer, "mesh: refused a connection claiming an unexpected or duplicate process index")
                }
                Err(e) => tracing::warn!(%from, error = %e, "mesh: refused a connection"),
            },
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(10)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(MeshError::Io { context: "accepting mesh connections".into(), source: e }),
        }
    }
    Ok(slots.into_iter().flatten().collect())
}

fn read_hello(formation: &Formation, stream: &TcpStream) -> io::Result<usize> {
    stream.set_nonblocking(false)?;
    configure(stream)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut hello = [0u8; 32];
    (&*stream).read_exact(&mut hello)?;
    let word = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&hello[i..i + 8]);
        u64::from_be_bytes(b)
    };
    if &hello[..8] != HELLO {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not a sundial mesh handshake"));
    }
    if word(8) != formation.token || word(16) != formation.generation {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("handshake of generation {} does not belong to this generation {}", word(16), formation.generation),
        ));
    }
    usize::try_from(word(24)).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "process index out of range"))
}

/// No delay, keepalive probes after 5 s idle, and a 15 s user timeout: a peer whose link is cut
/// is dropped by the kernel within seconds instead of never.
fn configure(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let sock = SockRef::from(stream);
    let keepalive =
        TcpKeepalive::new().with_time(Duration::from_secs(5)).with_interval(Duration::from_secs(1)).with_retries(5);
    sock.set_tcp_keepalive(&keepalive)?;
    sock.set_tcp_user_timeout(Some(Duration::from_secs(15)))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn formation(index: usize, addresses: &[String], generation: u64) -> Formation {
        Formation {
            generation,
            index,
            addresses: addresses.to_vec(),
            threads: 1,
            token: 77,
            restore: None,
            checkpoint_interval_ms: 0,
        }
    }

    fn listeners(n: usize) -> (Vec<TcpListener>, Vec<String>) {
        let ls: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let addrs = ls.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
        (ls, addrs)
    }

    #[test]
    fn three_processes_connect() {
        let (ls, addrs) = listeners(3);
        let handles: Vec<_> = ls
            .into_iter()
            .enumerate()
            .map(|(i, l)| {
                let f = formation(i, &addrs, 4);
                thread::spawn(move || connect(&f, l, Duration::from_secs(10)))
            })
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            let sockets = h.join().unwrap().unwrap();
            assert_eq!(sockets.len(), 3);
            for (j, s) in sockets.iter().enumerate() {
                assert_eq!(s.is_none(), i == j);
            }
        }
    }

    #[test]
    fn missing_peer_times_out_with_its_name() {
        let (mut ls, addrs) = listeners(2);
        let l0 = ls.remove(0);
        let f = formation(0, &addrs, 1);
        let err = connect(&f, l0, Duration::from_millis(300)).unwrap_err().to_string();
        assert!(err.contains("no connection from process 1"), "{err}");
    }

    #[test]
    fn other_generation_is_refused() {
        let (mut ls, addrs) = listeners(2);
        let l1 = ls.remove(1);
        let l0 = ls.remove(0);
        let stale = formation(1, &addrs, 3);
        let stale_thread = thread::spawn(move || connect(&stale, l1, Duration::from_millis(600)));
        let current = formation(0, &addrs, 4);
        assert!(connect(&current, l0, Duration::from_millis(600)).is_err());
        assert!(stale_thread.join().unwrap().is_err());
    }
}
