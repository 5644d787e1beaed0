//! TLS to PostgreSQL with libpq's `sslmode` semantics, for both kinds of
//! connection: the SQL sessions (tokio-postgres, through the small rustls
//! connector below) and the replication stream (pgwire-replication's own
//! rustls support). Both use rustls with the ring provider, like the sinks.
//!
//! | sslmode     | TLS               | certificate chain | host name |
//! |-------------|-------------------|-------------------|-----------|
//! | disable     | never             | -                 | -         |
//! | prefer      | if the server can | not checked       | -         |
//! | require     | always            | checked only if sslrootcert is given (as libpq) | no |
//! | verify-ca   | always            | checked           | no        |
//! | verify-full | always            | checked           | checked   |
//!
//! Without `sslrootcert`, verify-ca and verify-full trust the Mozilla roots
//! (webpki-roots), as pgwire-replication does.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};
use tokio_postgres::Socket;

/// libpq's `sslmode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn parse(s: &str) -> Result<SslMode, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            // libpq's "allow" tries plain first; usersync does not offer a
            // mode weaker than prefer.
            other => {
                return Err(format!(
                    "sslmode {other:?}: use disable, prefer, require, verify-ca or verify-full"
                ))
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// The TLS part of `[database]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: SslMode,
    /// PEM file of the CA certificates to trust.
    pub root_cert: Option<PathBuf>,
}

impl TlsSettings {
    /// The mode actually applied: like libpq, `require` with a root
    /// certificate verifies the chain (as verify-ca).
    pub fn effective_mode(&self) -> SslMode {
        match (self.mode, &self.root_cert) {
            (SslMode::Require, Some(_)) => SslMode::VerifyCa,
            (m, _) => m,
        }
    }

    /// tokio-postgres only knows disable / prefer / require: verification is
    /// done by the connector.
    pub fn tokio_postgres_mode(&self) -> tokio_postgres::config::SslMode {
        match self.mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        }
    }

    /// The settings for pgwire-replication. An IP host with verify-full is
    /// checked against the certificate's IP addresses (libpq does the same);
    /// pgwire-replication refuses that unless the name is given explicitly.
    pub fn replication(&self, host: &str) -> pgwire_replication::TlsConfig {
        use pgwire_replication::config::SslMode as M;
        let mode = match self.effective_mode() {
            SslMode::Disable => M::Disable,
            SslMode::Prefer => M::Prefer,
            SslMode::Require => M::Require,
            SslMode::VerifyCa => M::VerifyCa,
            SslMode::VerifyFull => M::VerifyFull,
        };
        let sni_hostname = (mode == M::VerifyFull && host.parse::<std::net::IpAddr>().is_ok())
            .then(|| host.to_string());
        pgwire_replication::TlsConfig {
            mode,
            ca_pem_path: self.root_cert.clone(),
            sni_hostname,
            ..Default::default()
        }
    }

    /// The rustls connector for SQL sessions.
    pub fn connector(&self) -> Result<MakeRustls, String> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let roots = Arc::new(self.roots()?);
        let builder = ClientConfig::builder().with_root_certificates(Arc::clone(&roots));
        let mut config = builder.with_no_client_auth();
        match self.effective_mode() {
            SslMode::Disable | SslMode::Prefer | SslMode::Require => {
                config
                    .dangerous()
                    .set_certificate_verifier(Arc::new(NoVerification(provider())));
            }
            SslMode::VerifyCa => {
                let inner = rustls::client::WebPkiServerVerifier::builder(roots)
                    .build()
                    .map_err(|e| format!("cannot build the certificate verifier: {e}"))?;
                config
                    .dangerous()
                    .set_certificate_verifier(Arc::new(ChainOnly(inner)));
            }
            SslMode::VerifyFull => {}
        }
        Ok(MakeRustls {
            config: Arc::new(config),
        })
    }

    fn roots(&self) -> Result<RootCertStore, String> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = RootCertStore::empty();
        match &self.root_cert {
            Some(path) => {
                let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| {
                        format!(
                            "sslrootcert {}: cannot read PEM certificates: {e}",
                            path.display()
                        )
                    })?;
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(format!(
                        "sslrootcert {}: no usable CA certificate in the file",
                        path.display()
                    ));
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        Ok(roots)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Adds what to do about a TLS failure to a connection error: which setting
/// decides, so the operator does not have to guess.
pub fn explain(tls: &TlsSettings, reason: String) -> String {
    let lower = reason.to_ascii_lowercase();
    let hint = if lower.contains("certificate") || lower.contains("unknownissuer") {
        match &tls.root_cert {
            Some(p) => format!(
                "; the server's certificate is not accepted with sslmode={} and sslrootcert={} (is it signed by that CA, and for this host name?)",
                tls.effective_mode().name(),
                p.display()
            ),
            None => format!(
                "; the server's certificate is not accepted with sslmode={} (set database.sslrootcert, or ?sslrootcert= in the URL, to the CA that signed it)",
                tls.effective_mode().name()
            ),
        }
    } else if lower.contains("no encryption") || lower.contains("ssl off") {
        format!(
            "; sslmode={} sends no TLS: if pg_hba.conf admits this client only over TLS (hostssl), use sslmode=require or stricter",
            tls.mode.name()
        )
    } else if lower.contains("does not support tls")
        || lower.contains("server does not support ssl")
    {
        format!(
            "; the server does not offer TLS, but sslmode={} requires it",
            tls.mode.name()
        )
    } else {
        String::new()
    };
    format!("{reason}{hint}")
}

/// Takes `sslmode` and `sslrootcert` out of a `postgres://` URL's query
/// (tokio-postgres knows neither verify-ca/verify-full nor sslrootcert) and
/// returns the rest of the URL with them.
pub fn split_url(url: &str) -> (String, Option<String>, Option<String>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_string(), None, None);
    };
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return (url.to_string(), None, None);
    }
    let mut mode = None;
    let mut root = None;
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "sslmode" => mode = Some(percent_decode(v)),
            "sslrootcert" => root = Some(percent_decode(v)),
            _ => rest.push(pair),
        }
    }
    let url = if rest.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    (url, mode, root)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A tokio-postgres connector backed by rustls.
#[derive(Clone)]
pub struct MakeRustls {
    config: Arc<ClientConfig>,
}

impl MakeTlsConnect<Socket> for MakeRustls {
    type Stream = RustlsStream;
    type TlsConnect = RustlsConnect;
    type Error = std::io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, std::io::Error> {
        // Unix sockets have no host name; PostgreSQL refuses TLS on them, so
        // the name is never used there.
        let domain = if domain.is_empty() {
            "localhost"
        } else {
            domain
        };
        let name = ServerName::try_from(domain.to_string()).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{domain:?} is not a valid TLS server name: {e}"),
            )
        })?;
        Ok(RustlsConnect {
            config: Arc::clone(&self.config),
            name,
        })
    }
}

pub struct RustlsConnect {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl TlsConnect<Socket> for RustlsConnect {
    type Stream = RustlsStream;
    type Error = std::io::Error;
    type Future = BoxFuture<'static, Result<RustlsStream, std::io::Error>>;

    fn connect(self, stream: Socket) -> Self::Future {
        Box::pin(async move {
            tokio_rustls::TlsConnector::from(self.config)
                .connect(self.name, stream)
                .await
                .map(|s| RustlsStream(Box::new(s)))
        })
    }
}

pub struct RustlsStream(Box<tokio_rustls::client::TlsStream<Socket>>);

impl tokio_postgres::tls::TlsStream for RustlsStream {
    fn channel_binding(&self) -> ChannelBinding {
        // SCRAM works without it; tls-server-end-point would need the
        // certificate's signature hash, which is not worth the code here.
        ChannelBinding::none()
    }
}

impl AsyncRead for RustlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for RustlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

/// prefer / require: encrypt, accept any certificate (libpq's semantics),
/// but still check the handshake signatures.
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// verify-ca: the chain must lead to a trusted CA; the name may differ.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_query_is_split() {
        let (url, mode, root) = split_url(
            "postgres://u@h:5/db?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca.pem",
        );
        assert_eq!(url, "postgres://u@h:5/db?application_name=x");
        assert_eq!(mode.as_deref(), Some("verify-full"));
        assert_eq!(root.as_deref(), Some("/etc/ca.pem"));
        let (url, mode, root) = split_url("postgres://u@h/db?sslmode=require");
        assert_eq!(url, "postgres://u@h/db");
        assert_eq!(mode.as_deref(), Some("require"));
        assert_eq!(root, None);
        assert_eq!(split_url("postgres://u@h/db").0, "postgres://u@h/db");
    }

    fn database(toml: &str, env: &[(&str, &str)]) -> Result<crate::config::DatabaseConfig, String> {
        let env: std::collections::BTreeMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        crate::config::Config::from_parts(Some(toml), "t", &env)
            .map(|c| c.database)
            .map_err(|e| e.to_string())
    }

    const SINK: &str = "[sink]\nurl = \"http://127.0.0.1:9/\"\nsecret_env = \"S\"\n";
    const S: (&str, &str) = ("S", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");

    #[test]
    fn sslmode_from_url_and_keys() {
        let url = |q: &str| format!("[database]\nurl = \"postgres://u@db.example/app{q}\"\n{SINK}");
        let d = database(&url(""), &[S]).unwrap();
        assert_eq!(d.tls.mode, SslMode::Prefer);
        let d = database(&url("?sslmode=verify-full&sslrootcert=/"), &[S]).unwrap();
        assert_eq!(d.tls.mode, SslMode::VerifyFull);
        assert_eq!(d.tls.root_cert.as_deref(), Some(std::path::Path::new("/")));
        assert_eq!(d.dbname, "app");
        let d = database(
            &url("?sslmode=verify-full"),
            &[S, ("USERSYNC_DATABASE_SSLMODE", "require")],
        )
        .unwrap();
        assert_eq!(d.tls.mode, SslMode::Require);
        let e = database(&url("?sslmode=allow"), &[S]).unwrap_err();
        assert!(e.contains("verify-full"), "{e}");
        let e = database(
            &url("?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem"),
            &[S],
        )
        .unwrap_err();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    }

    #[test]
    fn password_in_a_tls_url_is_still_refused() {
        let toml = format!(
            "[database]\nurl = \"postgres://u:hunter2@db.example/app?sslmode=verify-full\"\n{SINK}"
        );
        let e = database(&toml, &[S]).unwrap_err();
        assert!(e.contains("password"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn require_with_root_cert_verifies_the_chain() {
        let s = TlsSettings {
            mode: SslMode::Require,
            root_cert: Some("/ca.pem".into()),
        };
        assert_eq!(s.effective_mode(), SslMode::VerifyCa);
        assert!(SslMode::parse("allow").is_err());
        let full = TlsSettings {
            mode: SslMode::VerifyFull,
            root_cert: None,
        };
        assert_eq!(
            full.replication("10.0.0.1").sni_hostname.as_deref(),
            Some("10.0.0.1")
        );
        assert_eq!(full.replication("db.example").sni_hostname, None);
    }
}
