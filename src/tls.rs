//! TLS with rustls on the ring provider: the proxy listener's certificate, swapped atomically
//! when its PEM files change (or on demand, e.g. from SIGHUP) without touching open connections,
//! and the client configuration for `https://` upstreams, whose host-name check has no switch.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;

use crate::config::{ListenerTls, UpstreamTls};

/// A TLS file that cannot be used. The previous certificate stays in service.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: cannot read: {source}")]
    Read { path: String, source: io::Error },
    #[error("{path}: no PEM certificate in the file")]
    NoCertificate { path: String },
    #[error("{path}: no usable PEM private key in the file ({message})")]
    NoKey { path: String, message: String },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

/// The crypto provider keygate uses everywhere: ring (aws-lc-rs would need cmake to build).
/// sqlx's PostgreSQL TLS is ring too (`tls-rustls-ring-native-roots`) and passes its provider
/// explicitly; no crate in the build enables aws-lc-rs, so rustls never has two providers to
/// choose between and never panics asking for a default.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring the process default too, for any library that asks rustls for the default.
/// Harmless when called twice.
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The listener's certificate and key, behind an `ArcSwap` so a handshake never waits on a
/// reload and a reload never disturbs a connection that already has its session.
pub struct CertStore {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: ArcSwap<CertifiedKey>,
    /// Modification times of the files as last loaded.
    loaded_stamp: Mutex<Option<(SystemTime, SystemTime)>>,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl CertStore {
    /// Loads the files once; a start with unusable files fails.
    pub fn load(cfg: &ListenerTls) -> Result<Arc<CertStore>, TlsError> {
        let provider = provider();
        let stamp = stamp(&cfg.cert_file, &cfg.key_file);
        let key = certified_key(&cfg.cert_file, &cfg.key_file, &provider)?;
        Ok(Arc::new(CertStore {
            cert_file: cfg.cert_file.clone(),
            key_file: cfg.key_file.clone(),
            current: ArcSwap::from_pointee(key),
            loaded_stamp: Mutex::new(stamp),
            provider,
        }))
    }

    /// Re-reads both files now (SIGHUP). On error the old certificate stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let stamp = stamp(&self.cert_file, &self.key_file);
        let key = certified_key(&self.cert_file, &self.key_file, &self.provider)?;
        self.current.store(Arc::new(key));
        *self
            .loaded_stamp
            .lock()
            .expect("stamp lock is never poisoned") = stamp;
        tracing::info!(cert_file = %self.cert_file.display(), "TLS certificate reloaded");
        Ok(())
    }

    /// Reloads when either file's modification time differs from the one last loaded.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let now = stamp(&self.cert_file, &self.key_file);
        let last = *self
            .loaded_stamp
            .lock()
            .expect("stamp lock is never poisoned");
        if now.is_none() || now == last {
            return Ok(false);
        }
        self.reload().map(|()| true)
    }

    /// Polls the files every `interval` until `shutdown`.
    pub async fn watch(self: Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = shutdown.cancelled() => return,
            }
            if let Err(e) = self.reload_if_changed() {
                tracing::warn!(error = %e, "TLS files changed but cannot be used; keeping the previous certificate");
            }
        }
    }

    /// The end-entity certificate in service (tests compare it across reloads).
    pub fn current_leaf(&self) -> CertificateDer<'static> {
        self.current.load().cert[0].clone()
    }
}

/// A rustls server configuration on `store`: TLS 1.2 and 1.3, ALPN h2 then http/1.1.
pub fn server_config(store: Arc<CertStore>) -> Arc<ServerConfig> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("the ring provider supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(store);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// A client configuration for an `https://` upstream: the configured CA bundle or the system
/// roots, an optional client certificate, TLS 1.2 and 1.3. rustls always verifies the
/// certificate chain and the host name; keygate offers no way around it.
pub fn client_config(tls: &UpstreamTls) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let mut roots = RootCertStore::empty();
    match &tls.ca_file {
        Some(path) => {
            for cert in read_certs(path)? {
                roots.add(cert).map_err(|e| TlsError::Invalid {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for e in &native.errors {
                tracing::warn!(error = %e, "a system root certificate could not be read");
            }
            let (added, ignored) = roots.add_parsable_certificates(native.certs);
            tracing::debug!(added, ignored, "system root certificates loaded");
        }
    }
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("the ring provider supports TLS 1.2 and 1.3")
        .with_root_certificates(roots);
    let cfg = match &tls.client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = read_certs(cert)?;
            let key_der = read_key(key)?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| TlsError::Invalid {
                    path: key.display().to_string(),
                    message: e.to_string(),
                })?
        }
    };
    // ALPN stays empty here: the connector sets it to http/1.1 (keygate's upstream protocol).
    Ok(cfg)
}

/// Reads a PEM certificate chain as the listener or an upstream connection would
/// (configuration validation: each file is named by its setting there).
pub fn check_certs(path: &Path) -> Result<(), TlsError> {
    read_certs(path).map(drop)
}

/// Reads a PEM private key as the listener or an upstream connection would.
pub fn check_key(path: &Path) -> Result<(), TlsError> {
    read_key(path).map(drop)
}

/// Checks that `key` is the private key of the leaf certificate in `cert`.
pub fn check_pair(cert: &Path, key: &Path) -> Result<(), TlsError> {
    certified_key(cert, key, &provider()).map(drop)
}

fn certified_key(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = read_certs(cert)?;
    let key_der = read_key(key)?;
    CertifiedKey::from_der(chain, key_der, provider).map_err(|e| TlsError::Invalid {
        path: key.display().to_string(),
        message: format!("the key does not fit the certificate: {e}"),
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let text = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Invalid {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.display().to_string(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let text = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })?;
    PrivateKeyDer::from_pem_slice(&text).map_err(|e| TlsError::NoKey {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

fn stamp(cert: &Path, key: &Path) -> Option<(SystemTime, SystemTime)> {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some((m(cert)?, m(key)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str) -> ListenerTls {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("rcgen");
        let cert_file = dir.join(format!("{name}.pem"));
        let key_file = dir.join(format!("{name}-key.pem"));
        std::fs::write(&cert_file, cert.cert.pem()).expect("write cert");
        std::fs::write(&key_file, cert.signing_key.serialize_pem()).expect("write key");
        ListenerTls {
            cert_file,
            key_file,
            watch_interval: Duration::from_millis(50),
        }
    }

    #[test]
    fn a_bad_new_certificate_keeps_the_old_one_in_service() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = write_pair(dir.path(), "a");
        let store = CertStore::load(&cfg).expect("loads");
        let before = store.current_leaf();
        std::fs::write(&cfg.cert_file, "not a pem").expect("write");
        assert!(store.reload().is_err());
        assert_eq!(store.current_leaf(), before);
    }

    #[test]
    fn a_key_that_does_not_fit_the_certificate_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = write_pair(dir.path(), "a");
        let b = write_pair(dir.path(), "b");
        let mixed = ListenerTls {
            cert_file: a.cert_file,
            key_file: b.key_file,
            watch_interval: a.watch_interval,
        };
        let err = CertStore::load(&mixed).expect_err("mismatch");
        assert!(err.to_string().contains("does not fit"), "{err}");
    }

    #[test]
    fn reload_if_changed_picks_up_new_files_only_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = write_pair(dir.path(), "a");
        let store = CertStore::load(&cfg).expect("loads");
        assert!(!store.reload_if_changed().expect("no change"));
        let before = store.current_leaf();
        std::thread::sleep(Duration::from_millis(20));
        let fresh = write_pair(dir.path(), "a");
        // Some file systems keep coarse mtimes; force a distinct one.
        let later = SystemTime::now() + Duration::from_secs(5);
        for f in [&fresh.cert_file, &fresh.key_file] {
            std::fs::File::options()
                .write(true)
                .open(f)
                .and_then(|f| f.set_modified(later))
                .expect("set mtime");
        }
        assert!(store.reload_if_changed().expect("changed"));
        assert_ne!(store.current_leaf(), before);
        assert!(!store.reload_if_changed().expect("no further change"));
    }
}
