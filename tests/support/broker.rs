// SPDX-License-Identifier: MIT OR Apache-2.0
//! A real mosquitto broker and `mosquitto_sub` subscriber for integration tests.
//!
//! Both listen and connect on 127.0.0.1 only. The broker runs from a configuration file in
//! a temporary directory and is killed when dropped, like the subscriber. Debian's
//! `mosquitto` and `mosquitto-clients` packages (2.0.11 tested) provide the programs.
//!
//! [`Broker::start_tls`] adds a TLS listener next to the plain one, so that a test publishes
//! over TLS while its [`Subscriber`] reads on the plain port.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Debian installs the broker in /usr/sbin, which is not on every user's PATH.
const MOSQUITTO: &str = "/usr/sbin/mosquitto";

/// Time allowed for mosquitto to listen, or for `mosquitto_sub` to subscribe.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Ports tried by [`Broker::start`]. Another process can take a free port between the probe
/// and mosquitto's bind, and a fresh port makes that race unlikely to repeat.
const START_ATTEMPTS: usize = 5;

/// Certificate, key and client CA of a TLS listener, all PEM files.
#[derive(Debug, Clone)]
pub struct TlsListener {
    /// CA that client certificates must chain to.
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Whether clients must present a certificate signed by `ca_file`.
    pub require_certificate: bool,
}

/// A mosquitto process listening on `127.0.0.1:port`, with anonymous access and no
/// persistence, and on `127.0.0.1:tls_port` with TLS when started with a [`TlsListener`].
pub struct Broker {
    pub port: u16,
    /// Port of the TLS listener, 0 without one.
    pub tls_port: u16,
    tls: Option<TlsListener>,
    dir: TempDir,
    child: Option<Child>,
}

impl Broker {
    /// Starts mosquitto on a free loopback port and waits until it accepts connections.
    ///
    /// Panics when mosquitto cannot be started.
    pub fn start() -> Broker {
        Broker::start_with(None)
    }

    /// Starts mosquitto with a plain listener and a TLS listener, each on a free loopback
    /// port, and waits until both accept connections.
    ///
    /// Panics when mosquitto cannot be started.
    pub fn start_tls(listener: TlsListener) -> Broker {
        Broker::start_with(Some(listener))
    }

    fn start_with(tls: Option<TlsListener>) -> Broker {
        let dir = tempfile::tempdir().expect("failed to create a temporary directory");
        let mut broker = Broker {
            port: 0,
            tls_port: 0,
            tls,
            dir,
            child: None,
        };
        let mut errors = Vec::new();
        for _ in 0..START_ATTEMPTS {
            broker.port = free_port();
            if broker.tls.is_some() {
                broker.tls_port = free_port();
            }
            match broker.spawn() {
                Ok(()) => return broker,
                Err(error) => errors.push(error),
            }
        }
        panic!("failed to start mosquitto: {}", errors.join("; "));
    }

    /// Returns the broker URL, `mqtt://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Returns the URL of the TLS listener, `mqtts://HOST:TLS_PORT`. `host` must be a name
    /// in the server certificate that resolves to 127.0.0.1, such as `127.0.0.1` or
    /// `localhost`.
    pub fn tls_url(&self, host: &str) -> String {
        assert!(self.tls.is_some(), "the broker has no TLS listener");
        format!("mqtts://{host}:{}", self.tls_port)
    }

    /// Kills mosquitto and waits for it to exit. [`Broker::restart`] starts it again on the
    /// same port.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // kill fails only if the process has already exited, which wait reports.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops mosquitto if it runs, then starts it again on the same port.
    ///
    /// Panics when mosquitto cannot listen on the port again within [`READY_TIMEOUT`].
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match self.spawn() {
                Ok(()) => return,
                // Another process may have taken the port in the meantime. Waiting does not
                // help then, but it does if the kernel has not released the port yet.
                Err(error) if Instant::now() >= deadline => {
                    panic!("failed to restart mosquitto on port {}: {error}", self.port)
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Returns mosquitto's log so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("mosquitto.log")
    }

    /// Writes the configuration, spawns mosquitto on `self.port` and waits until it listens.
    fn spawn(&mut self) -> Result<(), String> {
        let config_path = self.dir.path().join("mosquitto.conf");
        let mut config = format!(
            "listener {} 127.0.0.1\nallow_anonymous true\npersistence false\n",
            self.port
        );
        // Listener options such as cafile apply to the listener line above them.
        if let Some(tls) = &self.tls {
            config.push_str(&format!(
                "listener {} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate {}\n",
                self.tls_port,
                tls.ca_file.display(),
                tls.cert_file.display(),
                tls.key_file.display(),
                tls.require_certificate,
            ));
        }
        std::fs::write(&config_path, config).map_err(|error| error.to_string())?;

        let log = std::fs::File::create(self.log_path()).map_err(|error| error.to_string())?;
        let child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|error| error.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|error| format!("failed to run {MOSQUITTO}: {error}"))?;
        self.child = Some(child);

        match self.wait_until_listening() {
            Ok(()) => Ok(()),
            Err(error) => {
                let log = self.log();
                self.stop();
                Err(format!("{error}; mosquitto log:\n{log}"))
            }
        }
    }

    fn wait_until_listening(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut addresses = vec![SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))];
        if self.tls.is_some() {
            addresses.push(SocketAddr::from((Ipv4Addr::LOCALHOST, self.tls_port)));
        }
        loop {
            let child = self.child.as_mut().expect("spawn stores the child first");
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("mosquitto exited with {status}"));
            }

            // mosquitto logs "running" only after it has bound every listener. Checking the
            // log as well as connecting avoids mistaking another server on the port for it.
            let running = self.log().contains(" running");
            let listening = || {
                addresses.iter().all(|address| {
                    TcpStream::connect_timeout(address, Duration::from_millis(100)).is_ok()
                })
            };
            if running && listening() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "mosquitto did not listen on {addresses:?} within {READY_TIMEOUT:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Returns a loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("failed to bind 127.0.0.1:0");
    listener
        .local_addr()
        .expect("bound socket has an address")
        .port()
}

/// One message received by a [`Subscriber`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedMessage {
    pub topic: String,
    pub payload: String,
}

/// A `mosquitto_sub` process subscribed at QoS 1 to one topic filter on `127.0.0.1:port`.
///
/// It prints one `TOPIC PAYLOAD` line per message, so payloads must not contain newlines
/// and topics must not contain spaces or start with `Client `.
pub struct Subscriber {
    child: Child,
    lines: Receiver<String>,
}

impl Subscriber {
    /// Starts `mosquitto_sub` and waits until the broker has acknowledged the subscription.
    ///
    /// Panics when that does not happen within [`READY_TIMEOUT`].
    pub fn start(port: u16, topic: &str) -> Subscriber {
        Self::start_with(port, topic, &["-v"])
    }

    /// Like [`Subscriber::start`], with each payload printed as lowercase hex, for binary
    /// payloads such as JPEG snapshots. [`hex_bytes`] decodes it.
    pub fn start_hex(port: u16, topic: &str) -> Subscriber {
        Self::start_with(port, topic, &["-F", "%t %x"])
    }

    fn start_with(port: u16, topic: &str, format: &[&str]) -> Subscriber {
        // stdbuf makes mosquitto_sub flush every line into the pipe, where stdio would
        // otherwise buffer whole blocks. -d prints the SUBACK, after which published
        // messages reach this subscriber.
        let mut child = Command::new("stdbuf")
            .args(["-oL", "mosquitto_sub", "-h", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .args(["-t", topic, "-q", "1", "-d"])
            .args(format)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("failed to run mosquitto_sub through stdbuf");

        let (line_tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        forward_lines(stdout, line_tx.clone());
        forward_lines(stderr, line_tx);

        let mut subscriber = Subscriber { child, lines };
        subscriber.wait_for_suback(topic, port);
        subscriber
    }

    /// Collects messages until `count` have arrived or `timeout` has passed, and returns them
    /// in arrival order.
    pub fn collect(&self, count: usize, timeout: Duration) -> Vec<ReceivedMessage> {
        let deadline = Instant::now() + timeout;
        let mut messages = Vec::new();
        while messages.len() < count {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(remaining) {
                Ok(line) => messages.extend(parse_message(&line)),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        messages
    }

    /// Returns the messages that arrive within `duration`.
    pub fn collect_for(&self, duration: Duration) -> Vec<ReceivedMessage> {
        self.collect(usize::MAX, duration)
    }

    fn wait_for_suback(&mut self, topic: &str, port: u16) {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut output = Vec::new();
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(remaining) {
                Ok(line) if line.starts_with("Subscribed (mid:") => return,
                Ok(line) => output.push(line),
                Err(error) => panic!(
                    "mosquitto_sub did not subscribe to {topic:?} on port {port} ({error}); output:\n{}",
                    output.join("\n")
                ),
            }
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends each line of `stream` to `line_tx` from a background thread until the stream ends.
/// Bytes that are not UTF-8, such as a binary payload printed by a text subscriber, are
/// replaced rather than ending the stream.
fn forward_lines(stream: impl std::io::Read + Send + 'static, line_tx: mpsc::Sender<String>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).split(b'\n').map_while(Result::ok) {
            if line_tx
                .send(String::from_utf8_lossy(&line).into_owned())
                .is_err()
            {
                return;
            }
        }
    });
}

/// Decodes a payload that [`Subscriber::start_hex`] printed.
pub fn hex_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex digits"))
        .collect()
}

/// Parses a `TOPIC PAYLOAD` line, skipping the debug lines that `-d` adds.
fn parse_message(line: &str) -> Option<ReceivedMessage> {
    if line.starts_with("Client ") || line.starts_with("Subscribed (mid:") {
        return None;
    }
    let (topic, payload) = line.split_once(' ')?;
    Some(ReceivedMessage {
        topic: topic.to_owned(),
        payload: payload.to_owned(),
    })
}

/// Polls `condition` every 5 ms until it returns true or `timeout` passes, and returns its last
/// value.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
