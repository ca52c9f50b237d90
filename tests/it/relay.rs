//! A TCP relay between keygate and PostgreSQL that a test can sever (every open connection is
//! cut and new ones are closed at once) and restore, to play a database outage without ever
//! stopping the shared PostgreSQL server.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub struct Relay {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    /// Cancelled to cut every connection open now; replaced by a fresh token on each cut.
    cut: Arc<Mutex<CancellationToken>>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// A relay to `target`, passing traffic from the start when `up`.
    pub async fn start(target: SocketAddr, up: bool) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay addr");
        let up = Arc::new(AtomicBool::new(up));
        let cut = Arc::new(Mutex::new(CancellationToken::new()));
        let (up2, cut2) = (up.clone(), cut.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                if !up2.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let token = cut2.lock().expect("lock").clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        () = token.cancelled() => {}
                    }
                });
            }
        });
        Relay {
            addr,
            up,
            cut,
            task,
        }
    }

    /// The database is gone: cut every open connection and refuse new ones.
    pub fn sever(&self) {
        self.up.store(false, Ordering::SeqCst);
        let mut cut = self.cut.lock().expect("lock");
        cut.cancel();
        *cut = CancellationToken::new();
    }

    /// The database is back.
    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }

    /// `url` (postgres://USER@HOST:PORT/DB) with its host and port replaced by this relay's.
    pub fn url_for(&self, url: &str) -> String {
        let at = url.rfind('@').expect("url has a host") + 1;
        let slash = at + url[at..].find('/').expect("url has a database");
        format!("{}{}{}", &url[..at], self.addr, &url[slash..])
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
        self.sever();
    }
}

/// Where the test PostgreSQL server listens.
pub fn postgres_addr() -> SocketAddr {
    let url = crate::harness::pg_admin_url();
    let at = url.rfind('@').expect("url has a host") + 1;
    let host_port = &url[at..at + url[at..].find('/').expect("url has a database")];
    let host_port = if host_port.contains(':') {
        host_port.to_string()
    } else {
        format!("{host_port}:5432")
    };
    std::net::ToSocketAddrs::to_socket_addrs(&host_port)
        .expect("resolve PostgreSQL")
        .next()
        .expect("PostgreSQL has an address")
}
