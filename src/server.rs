//! Starting and stopping one keygate instance: connect and migrate the store, start the table
//! sync, the usage writer, and both listeners; on stop, stop accepting, drain in-flight
//! requests within the grace period, then flush last-used stamps. Listeners are bound by the
//! caller, so tests bind port 0 and two instances can share a process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState};
use crate::clock::Clock;
use crate::config::Config;
use crate::keys::{KeyTable, Verifier};
use crate::proxy::{self, ProxyState};
use crate::store::{Store, StoreError};
use crate::sync;
use crate::tls::{CertStore, TlsError};
use crate::usage::Usage;

/// A running instance.
pub struct Keygate {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub table: Arc<KeyTable>,
    pub store: Store,
    pub proxy: Arc<ProxyState>,
    /// The proxy listener's certificate when it serves TLS.
    pub certs: Option<Arc<CertStore>>,
    /// Stops the listeners.
    stop_accepting: CancellationToken,
    /// Stops background work once requests have drained.
    stop_background: CancellationToken,
    listeners: Vec<JoinHandle<()>>,
    background: Vec<JoinHandle<()>>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// Binds the proxy and admin listeners from the configuration.
pub async fn bind(config: &Config) -> Result<(TcpListener, TcpListener), StartError> {
    let proxy = TcpListener::bind(config.proxy.listen)
        .await
        .map_err(|source| StartError::Bind {
            what: "proxy.listen",
            addr: config.proxy.listen,
            source,
        })?;
    let admin = TcpListener::bind(config.admin.listen)
        .await
        .map_err(|source| StartError::Bind {
            what: "admin.listen",
            addr: config.admin.listen,
            source,
        })?;
    Ok((proxy, admin))
}

/// Connects to the database, applies migrations and starts serving on the given listeners.
pub async fn start(
    config: &Config,
    proxy_listener: TcpListener,
    admin_listener: TcpListener,
    clock: Clock,
) -> Result<Keygate, StartError> {
    let store = Store::connect(&config.database.url, config.database.max_connections).await?;
    store.migrate().await?;

    let table = Arc::new(KeyTable::new());
    let verifier = Arc::new(Verifier::new(&config.verification));
    let usage = Arc::new(Usage::new());
    crate::tls::install_provider();
    let certs = match &config.proxy.tls {
        Some(tls) => Some(CertStore::load(tls)?),
        None => None,
    };
    let mut proxy_state = ProxyState::new(
        config,
        table.clone(),
        verifier,
        usage.clone(),
        clock.clone(),
    )?;
    if let Some(certs) = &certs {
        proxy_state = proxy_state.with_tls(certs.clone());
    }
    let proxy_state = Arc::new(proxy_state);
    let admin_state = Arc::new(AdminState {
        table: table.clone(),
        clock: clock.clone(),
    });

    let stop_accepting = CancellationToken::new();
    let stop_background = CancellationToken::new();
    let proxy_addr = proxy::local_addr(&proxy_listener);
    let admin_addr = proxy::local_addr(&admin_listener);

    let mut background = vec![
        tokio::spawn(sync::run(
            store.clone(),
            table.clone(),
            clock.clone(),
            config.database.refresh_interval,
            stop_background.clone(),
        )),
        tokio::spawn(usage.run(
            store.clone(),
            config.last_used.flush_interval,
            stop_background.clone(),
        )),
    ];
    if let (Some(certs), Some(tls)) = (&certs, &config.proxy.tls) {
        background.push(tokio::spawn(
            certs
                .clone()
                .watch(tls.watch_interval, stop_background.clone()),
        ));
    }
    let listeners = vec![
        tokio::spawn(proxy::serve(
            proxy_listener,
            proxy_state.clone(),
            stop_accepting.clone(),
            config.proxy.shutdown_grace,
        )),
        tokio::spawn(admin::serve(
            admin_listener,
            admin_state,
            stop_accepting.clone(),
        )),
    ];
    tracing::info!(
        proxy = %proxy_addr,
        admin = %admin_addr,
        database = %config.database.url,
        engine = store.engine(),
        routes = config.routes.len(),
        "keygate started"
    );
    Ok(Keygate {
        proxy_addr,
        admin_addr,
        table,
        store,
        proxy: proxy_state,
        certs,
        stop_accepting,
        stop_background,
        listeners,
        background,
    })
}

impl Keygate {
    /// Waits until the key table has been loaded once (tests; readiness).
    pub async fn ready(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.table.synced_at().is_none() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// Re-reads the proxy listener's certificate and key (for SIGHUP). Open connections keep
    /// their session; on error the previous certificate stays in use. No-op without TLS.
    pub fn reload_tls(&self) -> Result<(), TlsError> {
        match &self.certs {
            Some(certs) => certs.reload(),
            None => Ok(()),
        }
    }

    /// Graceful stop: stop accepting, drain requests (bounded by `proxy.shutdown_grace`), then
    /// flush last-used stamps and close the pool.
    pub async fn shutdown(self) {
        self.stop_accepting.cancel();
        for task in self.listeners {
            let _ = task.await;
        }
        self.stop_background.cancel();
        for task in self.background {
            let _ = task.await;
        }
        self.store.close().await;
        tracing::info!("keygate stopped");
    }
}
