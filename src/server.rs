//! Starting and stopping one keygate instance: open the store (lazily: the database may be
//! away at start), start the table sync, the usage writer, the heartbeat and both listeners; on
//! stop, fail readiness, stop accepting, drain in-flight requests within the grace period, then
//! flush last-used stamps. Listeners are bound by the caller, so tests bind port 0 and two
//! instances can share a process. `reload` applies a re-read configuration (SIGHUP).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState, Instance};
use crate::clock::Clock;
use crate::config::{Config, ConfigError};
use crate::fleet::{self, Identity};
use crate::keys::{KeyTable, Verifier};
use crate::manage::Manager;
use crate::metrics::Metrics;
use crate::proxy::{self, ProxyState};
use crate::store::{Store, StoreError};
use crate::sync::{self, SyncStatus};
use crate::tls::{CertStore, TlsError};
use crate::usage::Usage;

/// A running instance.
pub struct Keygate {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub table: Arc<KeyTable>,
    pub store: Store,
    pub proxy: Arc<ProxyState>,
    pub sync: Arc<SyncStatus>,
    pub identity: Identity,
    /// Cancelled at a stop signal: readiness fails from then on.
    stopping: CancellationToken,
    /// How long to keep serving after a stop signal before closing the listeners.
    shutdown_delay: Duration,
    pub metrics: Arc<Metrics>,
    /// The one-time console setup link; it works only while no user exists, and is logged once
    /// the database shows none does.
    pub setup_url: Option<String>,
    /// The proxy listener's certificate when it serves TLS.
    pub certs: Option<Arc<CertStore>>,
    /// The admin listener's state, for what a reload changes there (the scopes).
    admin: Arc<AdminState>,
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
    #[error("{0}")]
    Admin(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// Why a reload was refused; the running configuration stays in force.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("configuration not reloaded: {0}")]
    Config(#[from] ConfigError),
    #[error("TLS certificate not reloaded: {0}")]
    Tls(#[from] TlsError),
    #[error("configuration not reloaded: {0}; restart keygate to apply it")]
    NeedsRestart(String),
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

/// Starts serving on the given listeners. The database need not be reachable yet: the sync
/// task migrates and loads as soon as it is, and until then the proxy answers 503 and `/readyz`
/// says "loading".
pub async fn start(
    config: &Config,
    proxy_listener: TcpListener,
    admin_listener: TcpListener,
    clock: Clock,
) -> Result<Keygate, StartError> {
    // One more than asked for: the change listener holds a connection of its own.
    let store = Store::connect_lazy(&config.database.url, config.database.max_connections + 1)?;
    let sync_status = Arc::new(SyncStatus::new());
    let identity = Identity::new(clock.now_ms());
    let stopping = CancellationToken::new();

    let route_names: Vec<String> = config.routes.iter().map(|r| r.name.clone()).collect();
    let metrics = Arc::new(Metrics::new(
        &route_names,
        config.metrics.per_account_labels,
    ));
    let table = Arc::new(KeyTable::new());
    let verifier =
        Arc::new(Verifier::new(&config.verification).on_argon2(metrics.argon2_observer()));
    let usage = Arc::new(Usage::new());
    metrics.watch(
        table.clone(),
        verifier.clone(),
        usage.clone(),
        clock.clone(),
    );
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
        metrics.clone(),
    )?;
    if let Some(certs) = &certs {
        proxy_state = proxy_state.with_tls(certs.clone());
    }
    let proxy_state = Arc::new(proxy_state);
    let manager = Arc::new(
        Manager::new(store.clone(), config.hashing, clock.clone())
            .map_err(|e| StartError::Admin(e.to_string()))?,
    );
    let admin_state = Arc::new(AdminState::new(
        config,
        table.clone(),
        clock.clone(),
        manager.clone(),
        Instance {
            sync: sync_status.clone(),
            identity: identity.clone(),
            stopping: stopping.clone(),
            metrics: metrics.clone(),
        },
    ));

    let admin_state_for_reload = admin_state.clone();
    let stop_accepting = CancellationToken::new();
    let stop_background = CancellationToken::new();
    let proxy_addr = proxy::local_addr(&proxy_listener);
    let admin_addr = proxy::local_addr(&admin_listener);
    // Armed now, shown (or disarmed) once the database answers: start never waits on it.
    let setup_url = Some(admin_state.arm_setup(admin_addr));

    let mut background = vec![
        tokio::spawn(sync::run(
            store.clone(),
            table.clone(),
            sync_status.clone(),
            clock.clone(),
            config.database.refresh_interval,
            stop_background.clone(),
            metrics.sync.clone(),
        )),
        tokio::spawn(usage.run(
            store.clone(),
            config.last_used.flush_interval,
            stop_background.clone(),
            metrics.last_used.clone(),
        )),
        tokio::spawn(fleet::run(
            store.clone(),
            identity.clone(),
            table.clone(),
            sync_status.clone(),
            clock.clone(),
            config.database.heartbeat_interval,
            stop_background.clone(),
        )),
        tokio::spawn(proxy_state.audit.clone().run(
            store.clone(),
            config.last_used.flush_interval,
            stop_background.clone(),
            metrics.audit.clone(),
            metrics.audit_depth.clone(),
        )),
        tokio::spawn({
            let (admin_state, url, stop) = (
                admin_state.clone(),
                setup_url.clone().unwrap_or_default(),
                stop_background.clone(),
            );
            async move { admin_state.announce_setup(url, stop).await }
        }),
        tokio::spawn(admin::run_auto_retire(
            manager,
            sync_status.clone(),
            config.database.refresh_interval,
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
        sidecar = %identity.id,
        "keygate started"
    );
    Ok(Keygate {
        proxy_addr,
        admin_addr,
        table,
        store,
        proxy: proxy_state,
        sync: sync_status,
        identity,
        stopping,
        shutdown_delay: config.proxy.shutdown_delay,
        metrics,
        setup_url,
        certs,
        admin: admin_state_for_reload,
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

    /// Applies a new configuration without dropping connections: the routes (requests already
    /// routed finish on the old ones), the scopes the console and the API offer for keys and
    /// give gateways (`[gateways] scopes`), and the TLS certificate (re-read from its files; open
    /// connections keep their session). Settings that need a restart are left as they are.
    pub fn reload(&self, config: &Config) -> Result<(), ReloadError> {
        self.proxy
            .check_routes(&config.routes)
            .map_err(ReloadError::NeedsRestart)?;
        self.reload_tls()?;
        self.proxy.replace_routes(&config.routes);
        self.admin.reload(config);
        tracing::info!(
            routes = config.routes.len(),
            tls = self.certs.is_some(),
            "configuration reloaded (routes, the scopes keys and gateways may get, TLS certificate); other settings apply at the next restart"
        );
        Ok(())
    }

    /// Re-reads and validates the configuration file, then `reload`s it. A bad file changes
    /// nothing.
    pub fn reload_file(&self, path: Option<&Path>) -> Result<(), ReloadError> {
        let config = Config::load(path, std::env::vars())?;
        config.check_files()?;
        self.reload(&config)
    }

    /// Re-reads the proxy listener's certificate and key. Open connections keep their session;
    /// on error the previous certificate stays in use. No-op without TLS.
    pub fn reload_tls(&self) -> Result<(), TlsError> {
        match &self.certs {
            Some(certs) => certs.reload(),
            None => Ok(()),
        }
    }

    /// Graceful stop: fail readiness and keep serving for `proxy.shutdown_delay` (so load
    /// balancers stop sending), stop accepting, drain requests (bounded by
    /// `proxy.shutdown_grace`), then flush last-used stamps, remove the heartbeat and close the
    /// pool.
    pub async fn shutdown(self) {
        self.stopping.cancel();
        if !self.shutdown_delay.is_zero() {
            tracing::info!(
                delay_ms = self.shutdown_delay.as_millis() as u64,
                "stop signal received: not ready; still serving"
            );
            tokio::time::sleep(self.shutdown_delay).await;
        }
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
