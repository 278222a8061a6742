// SPDX-License-Identifier: MIT OR Apache-2.0
//! Throwaway certificates for TLS tests, made with the `openssl` command-line tool.
//!
//! [`Pki::generate`] writes into a temporary directory a CA, a server certificate for
//! `localhost` and `127.0.0.1` and a client certificate, both signed by that CA, and a second,
//! unrelated CA with a client certificate of its own. Keys are P-256 EC keys in unencrypted PKCS#8 PEM, which OpenSSL 3 writes by
//! default. Debian's `openssl` package (3.0 tested) provides the tool.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

/// Days that the certificates are valid. A test run needs minutes.
const VALID_DAYS: &str = "2";

/// Configuration of a self-signed CA certificate that may sign other certificates.
const CA_CONFIG: &str = "\
[req]
distinguished_name = subject
prompt = no
x509_extensions = ca

[subject]
CN = patchflow test CA

[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
";

/// Extensions of the broker's certificate: the names that the client verifies.
const SERVER_EXTENSIONS: &str = "\
basicConstraints = CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
";

/// Extensions of the client certificate.
const CLIENT_EXTENSIONS: &str = "\
basicConstraints = CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
";

/// The generated files, deleted when dropped.
pub struct Pki {
    dir: TempDir,
}

impl Pki {
    /// Generates every certificate and key.
    ///
    /// Panics when `openssl` is missing or fails.
    pub fn generate() -> Pki {
        let dir = tempfile::tempdir().expect("failed to create a temporary directory");
        let pki = Pki { dir };
        pki.write("ca.cnf", CA_CONFIG);
        pki.write("server.ext", SERVER_EXTENSIONS);
        pki.write("client.ext", CLIENT_EXTENSIONS);

        pki.make_ca("ca");
        pki.make_ca("other-ca");
        pki.make_signed("server", "localhost", "server.ext", "ca");
        pki.make_signed("client", "patchflow-test-client", "client.ext", "ca");
        pki.make_signed(
            "stranger",
            "patchflow-test-stranger",
            "client.ext",
            "other-ca",
        );
        pki.make_readable();
        pki
    }

    /// CA that signed the server and client certificates.
    pub fn ca_file(&self) -> PathBuf {
        self.path("ca.pem")
    }

    /// CA that signed nothing here, so the broker's certificate fails to verify against it.
    pub fn other_ca_file(&self) -> PathBuf {
        self.path("other-ca.pem")
    }

    pub fn server_cert_file(&self) -> PathBuf {
        self.path("server.pem")
    }

    pub fn server_key_file(&self) -> PathBuf {
        self.path("server.key")
    }

    pub fn client_cert_file(&self) -> PathBuf {
        self.path("client.pem")
    }

    pub fn client_key_file(&self) -> PathBuf {
        self.path("client.key")
    }

    /// Client certificate signed by the other CA, which the broker does not trust.
    pub fn stranger_cert_file(&self) -> PathBuf {
        self.path("stranger.pem")
    }

    pub fn stranger_key_file(&self) -> PathBuf {
        self.path("stranger.key")
    }

    /// Private key of the other CA, which does not belong to the client certificate.
    pub fn other_key_file(&self) -> PathBuf {
        self.path("other-ca.key")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.path(name), text)
            .unwrap_or_else(|error| panic!("failed to write {name}: {error}"));
    }

    /// Writes the self-signed CA `NAME.pem` with its key `NAME.key`.
    fn make_ca(&self, name: &str) {
        self.openssl(&[
            "req",
            "-x509",
            "-config",
            "ca.cnf",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-noenc",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            VALID_DAYS,
        ]);
    }

    /// Writes `NAME.pem`, signed by the CA `CA.pem` with the extensions in `extensions`, and
    /// its key `NAME.key`.
    fn make_signed(&self, name: &str, common_name: &str, extensions: &str, ca: &str) {
        self.openssl(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-noenc",
            "-subj",
            &format!("/CN={common_name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ]);
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-extfile",
            extensions,
            "-days",
            VALID_DAYS,
            "-out",
            &format!("{name}.pem"),
        ]);
    }

    /// Opens the directory and files to every user. mosquitto started as root switches to
    /// the `mosquitto` user before it reads its certificate and key, and would then be
    /// denied the private temporary directory.
    fn make_readable(&self) {
        set_mode(self.dir.path(), 0o755);
        let entries = std::fs::read_dir(self.dir.path()).expect("the directory was just made");
        for entry in entries {
            set_mode(&entry.expect("listing the directory").path(), 0o644);
        }
    }

    fn openssl(&self, args: &[&str]) {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|error| panic!("failed to run openssl (install it): {error}"));
        assert!(
            output.status.success(),
            "openssl {} failed with {}:\n{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|error| panic!("failed to chmod {}: {error}", path.display()));
}
