// SPDX-License-Identifier: MIT OR Apache-2.0
//! TLS for `mqtts://` brokers through native-tls, which uses the system OpenSSL on Linux.
//!
//! The CA file and the client certificate and key are PEM files. They are read and checked
//! when the publisher starts, so that a bad file fails at once with its path, not on every
//! reconnect. `patchflow config check` runs the same checks.

use std::fmt;
use std::path::{Path, PathBuf};

use rumqttc::tokio_native_tls::native_tls::{Certificate, Identity, TlsConnector};

use super::MqttError;

/// Files for a TLS connection to the broker, all PEM. Every field is optional.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA certificates that the broker's certificate must chain to. When set, they are the
    /// only trusted CAs, so the system trust store is not consulted. When `None`, the system
    /// trust store of OpenSSL is used.
    pub ca_file: Option<PathBuf>,
    /// Client certificate, followed by any intermediate CA certificates, for brokers that
    /// require client authentication. Needs `client_key_file`.
    pub client_cert_file: Option<PathBuf>,
    /// Unencrypted PKCS#8 private key (`-----BEGIN PRIVATE KEY-----`) of the client
    /// certificate. Needs `client_cert_file`.
    pub client_key_file: Option<PathBuf>,
}

impl TlsFiles {
    /// Returns true when no file is set.
    pub fn is_empty(&self) -> bool {
        self.ca_file.is_none() && self.client_cert_file.is_none() && self.client_key_file.is_none()
    }
}

/// The role of a file in [`TlsFiles`], named in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFileKind {
    CaFile,
    ClientCertFile,
    ClientKeyFile,
}

impl fmt::Display for TlsFileKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsFileKind::CaFile => "CA file",
            TlsFileKind::ClientCertFile => "client certificate file",
            TlsFileKind::ClientKeyFile => "client key file",
        })
    }
}

const PEM_BEGIN: &str = "-----BEGIN ";
const PKCS8_KEY_BEGIN: &str = "-----BEGIN PRIVATE KEY-----";

/// Reads every certificate of a PEM CA file. Fails when the file cannot be read or contains
/// no valid certificate.
pub fn read_ca_file(path: &Path) -> Result<Vec<Certificate>, MqttError> {
    read_certificates(path, TlsFileKind::CaFile)
}

/// Reads a client certificate chain and its private key, and checks that the key belongs
/// to the certificate.
pub fn read_client_identity(cert_file: &Path, key_file: &Path) -> Result<Identity, MqttError> {
    let certificates = std::fs::read(cert_file)
        .map_err(|error| file_error(TlsFileKind::ClientCertFile, cert_file, read_reason(&error)))?;
    // Parsing the chain on its own first blames the right file when it is broken.
    parse_certificates(&certificates, cert_file, TlsFileKind::ClientCertFile)?;

    let key = std::fs::read(key_file)
        .map_err(|error| file_error(TlsFileKind::ClientKeyFile, key_file, read_reason(&error)))?;
    let key = pkcs8_key(&key)
        .map_err(|reason| file_error(TlsFileKind::ClientKeyFile, key_file, reason.to_owned()))?;
    let identity = Identity::from_pkcs8(&certificates, key).map_err(|error| {
        file_error(
            TlsFileKind::ClientKeyFile,
            key_file,
            format!("not a valid PEM private key ({error})"),
        )
    })?;

    // OpenSSL checks that the key matches the certificate when a connector takes both.
    TlsConnector::builder()
        .identity(identity.clone())
        .build()
        .map_err(|error| {
            file_error(
                TlsFileKind::ClientKeyFile,
                key_file,
                format!(
                    "the key does not belong to the certificate in {} ({error})",
                    cert_file.display()
                ),
            )
        })?;
    Ok(identity)
}

/// Builds the TLS connector for `files`, reading and checking every file.
pub(super) fn connector(files: &TlsFiles) -> Result<TlsConnector, MqttError> {
    let mut builder = TlsConnector::builder();
    if let Some(ca_file) = &files.ca_file {
        for certificate in read_ca_file(ca_file)? {
            builder.add_root_certificate(certificate);
        }
        builder.disable_built_in_roots(true);
    }
    match (&files.client_cert_file, &files.client_key_file) {
        (Some(cert_file), Some(key_file)) => {
            builder.identity(read_client_identity(cert_file, key_file)?);
        }
        (None, None) => {}
        (Some(cert_file), None) => {
            return Err(MqttError::MissingClientKey {
                cert_file: cert_file.clone(),
            });
        }
        (None, Some(key_file)) => {
            return Err(MqttError::MissingClientCert {
                key_file: key_file.clone(),
            });
        }
    }
    builder.build().map_err(MqttError::TlsSetup)
}

/// Returns an operator's hint for a failed TLS connection to `host`.
pub(super) fn handshake_hint(files: &TlsFiles, host: &str) -> String {
    match &files.ca_file {
        Some(ca_file) => format!(
            "check that the CA file {} contains the CA that signed the broker's certificate, \
             and that the certificate names {host}",
            ca_file.display()
        ),
        None => format!(
            "the broker's certificate must be signed by a CA in the system trust store and \
             name {host}; set a CA file to trust a private CA"
        ),
    }
}

/// TLS alerts, as OpenSSL 3 words them, with which a broker rejects a missing or untrusted
/// client certificate. With TLS 1.3 they arrive after the handshake, on the first read.
const CLIENT_CERTIFICATE_ALERTS: [&str; 5] = [
    "alert certificate required",
    "alert bad certificate",
    "alert unknown ca",
    "alert certificate unknown",
    "alert certificate expired",
];

/// Texts of I/O errors for a connection that the peer closed.
const CLOSED_BY_PEER: [&str; 3] = [
    "Connection reset by peer",
    "unexpected EOF",
    "connection closed by peer",
];

/// Returns an operator's hint when `error` shows that the broker rejected the client
/// certificate, or its absence. `connecting` is true for an error before the broker
/// acknowledged the connection.
pub(super) fn client_certificate_hint(
    files: &TlsFiles,
    error: &str,
    connecting: bool,
) -> Option<String> {
    let rejected = CLIENT_CERTIFICATE_ALERTS
        .iter()
        .any(|alert| error.contains(alert));
    // mosquitto 2.0.11 often resets the connection without an alert when it rejects a
    // client certificate, so a reset during connection set-up only suggests the cause.
    let closed = connecting && CLOSED_BY_PEER.iter().any(|text| error.contains(text));
    let hint = match (&files.client_cert_file, rejected) {
        (Some(cert_file), true) => format!(
            "the broker rejected the client certificate {}: it must be valid and signed by a \
             CA that the broker trusts",
            cert_file.display()
        ),
        (None, true) => "the broker requires a client certificate: set the client certificate \
                         and key files"
            .to_owned(),
        (Some(cert_file), false) if closed => format!(
            "the broker closed the TLS connection before acknowledging the MQTT connection, \
             which happens when it rejects the client certificate {}: check that a CA that \
             the broker trusts signed it",
            cert_file.display()
        ),
        (None, false) if closed => "the broker closed the TLS connection before acknowledging \
                                    the MQTT connection, which happens when it requires a \
                                    client certificate"
            .to_owned(),
        _ => return None,
    };
    Some(hint)
}

fn read_certificates(path: &Path, kind: TlsFileKind) -> Result<Vec<Certificate>, MqttError> {
    let pem = std::fs::read(path).map_err(|error| file_error(kind, path, read_reason(&error)))?;
    parse_certificates(&pem, path, kind)
}

fn parse_certificates(
    pem: &[u8],
    path: &Path,
    kind: TlsFileKind,
) -> Result<Vec<Certificate>, MqttError> {
    // OpenSSL skips text and PEM blocks of other types, such as keys, so a file without a
    // certificate block parses as an empty list.
    let certificates = Certificate::stack_from_pem(pem)
        .map_err(|error| file_error(kind, path, format!("not valid PEM certificates ({error})")))?;
    if certificates.is_empty() {
        return Err(file_error(
            kind,
            path,
            "contains no PEM certificate (-----BEGIN CERTIFICATE-----)".to_owned(),
        ));
    }
    Ok(certificates)
}

/// Returns the key from its first PEM block on, because native-tls expects the PKCS#8 header
/// at the very start and files exported from PKCS#12 often have attribute lines before it.
fn pkcs8_key(key: &[u8]) -> Result<&[u8], &'static str> {
    let Some(start) = find(key, PEM_BEGIN.as_bytes()) else {
        return Err("contains no PEM private key (-----BEGIN PRIVATE KEY-----)");
    };
    let key = &key[start..];
    if key.starts_with(PKCS8_KEY_BEGIN.as_bytes()) {
        Ok(key)
    } else if key.starts_with(b"-----BEGIN ENCRYPTED PRIVATE KEY-----") {
        Err("the key is encrypted: decrypt it with \
             `openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.pk8`")
    } else {
        Err(
            "expected an unencrypted PKCS#8 PEM key (-----BEGIN PRIVATE KEY-----): convert \
             it with `openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.pk8`",
        )
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

fn read_reason(error: &std::io::Error) -> String {
    format!("cannot read the file ({error})")
}

fn file_error(kind: TlsFileKind, path: &Path, reason: String) -> MqttError {
    MqttError::TlsFile {
        kind,
        path: path.to_path_buf(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkcs8_key_skips_text_before_the_block() {
        let key = b"Bag Attributes\n    localKeyID: 01\n-----BEGIN PRIVATE KEY-----\nAAAA\n";
        let found = pkcs8_key(key).unwrap();
        assert!(found.starts_with(PKCS8_KEY_BEGIN.as_bytes()));
    }

    #[test]
    fn pkcs8_key_rejects_other_formats() {
        let cases = [
            (&b"-----BEGIN RSA PRIVATE KEY-----\n"[..], "PKCS#8"),
            (&b"-----BEGIN EC PRIVATE KEY-----\n"[..], "PKCS#8"),
            (&b"-----BEGIN ENCRYPTED PRIVATE KEY-----\n"[..], "encrypted"),
            (&b"not a key"[..], "no PEM private key"),
        ];
        for (key, expected) in cases {
            let reason = pkcs8_key(key).unwrap_err();
            assert!(reason.contains(expected), "{reason}");
        }
    }

    #[test]
    fn ca_file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let error = read_ca_file(&missing).err().unwrap();
        let text = error.to_string();
        assert!(text.contains("missing.pem"), "{text}");
        assert!(text.contains("cannot read"), "{text}");

        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "hello\n").unwrap();
        let text = read_ca_file(&garbage).err().unwrap().to_string();
        assert!(text.contains("garbage.pem"), "{text}");
        assert!(text.contains("no PEM certificate"), "{text}");

        let broken = dir.path().join("broken.pem");
        std::fs::write(
            &broken,
            "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let error = read_ca_file(&broken).err().unwrap();
        assert!(
            matches!(
                &error,
                MqttError::TlsFile {
                    kind: TlsFileKind::CaFile,
                    ..
                }
            ),
            "{error:?}"
        );
    }
}
