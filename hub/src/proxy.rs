//! A TCP proxy that can cut a link the way networks do: by black-holing traffic (bytes vanish,
//! nothing is closed) rather than by closing sockets. The demo and the tests put it between
//! an agent and its broker.

use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Forward,
    BlackHole,
}

/// A running proxy. Dropping it stops accepting; connections end with their peers.
pub struct Proxy {
    pub addr: SocketAddr,
    mode: watch::Sender<(Mode, u64)>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listen on a free loopback port and forward to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (mode, rx) = watch::channel((Mode::Forward, 0u64));
        let rx = Arc::new(rx);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let rx = (*rx).clone();
                tokio::spawn(serve(client, upstream, rx));
            }
        });
        Ok(Proxy { addr, mode, task })
    }

    /// Black-hole every byte, both ways, on existing and new connections. Nothing is closed.
    pub fn cut(&self) {
        self.mode.send_modify(|m| m.0 = Mode::BlackHole);
    }

    /// Forward again. Connections that lived through the cut are closed, as a real peer
    /// would after its session broke; new connections are forwarded.
    pub fn restore(&self) {
        self.mode.send_modify(|m| *m = (Mode::Forward, m.1 + 1));
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut client: TcpStream, upstream: SocketAddr, mut rx: watch::Receiver<(Mode, u64)>) {
    let (start_mode, generation) = *rx.borrow_and_update();
    let mut server = if start_mode == Mode::Forward {
        TcpStream::connect(upstream).await.ok()
    } else {
        None
    };
    let (mut cbuf, mut sbuf) = (vec![0u8; 16 << 10], vec![0u8; 16 << 10]);
    loop {
        let mode = rx.borrow().0;
        if rx.borrow().1 != generation {
            return;
        }
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return },
            n = client.read(&mut cbuf) => {
                let n = match n { Ok(0) | Err(_) => return, Ok(n) => n };
                if mode == Mode::Forward {
                    match server.as_mut() {
                        Some(s) => if s.write_all(&cbuf[..n]).await.is_err() { return },
                        None => return,
                    }
                }
            }
            n = async { match server.as_mut() { Some(s) => s.read(&mut sbuf).await, None => std::future::pending().await } } => {
                let n = match n { Ok(0) | Err(_) => return, Ok(n) => n };
                if mode == Mode::Forward && client.write_all(&sbuf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}
