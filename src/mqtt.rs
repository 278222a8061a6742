// SPDX-License-Identifier: MIT OR Apache-2.0
//! MQTT publisher for per-frame anomaly scores.
//!
//! [`Publisher`] is built for a GStreamer streaming thread, which must never wait on the
//! network. [`Publisher::publish`] only puts the message into a bounded queue, and only
//! [`Publisher::shutdown`] (or dropping the publisher) waits, up to its timeout. A dedicated OS
//! thread runs a current-thread tokio runtime whose single task owns the `rumqttc`
//! [`EventLoop`]. That task connects, reconnects with a doubling backoff, and moves messages
//! from the queue into `rumqttc` only while the broker is connected. The queue therefore holds
//! what arrives during an outage, and messages beyond its capacity are dropped and counted.
//!
//! The broker is reached over plain TCP (`mqtt://HOST[:PORT]`) or TLS (`mqtts://HOST[:PORT]`,
//! see [`TlsFiles`]) with MQTT 3.1.1 and a clean session.
//! [`Publisher::publish`] sends at the settings' QoS without the retain flag, and
//! [`Publisher::publish_with`] chooses both per message. [`MqttSettings::last_will`] registers
//! a Last Will with the broker, [`MqttSettings::birth`] is published first after every
//! connection acknowledgement (for an availability topic), and [`MqttSettings::credentials`]
//! logs in with a user name and password.
//!
//! [`FrameMessage`] is the JSON payload published for each scored frame.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::net::Ipv6Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rumqttc::{
    AsyncClient, ClientError, ConnectionError, Event, EventLoop, Incoming, LastWill, MqttOptions,
    Outgoing, Publish, QoS, Request, TlsConfiguration, Transport,
};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::scoring::{FrameScore, ScoreDomain, Threshold};
use tokio::time::{Instant, sleep_until};

mod tls;

pub use tls::{TlsFileKind, TlsFiles, read_ca_file, read_client_identity};

/// Port used when an `mqtt://` URL names none.
pub const DEFAULT_PORT: u16 = 1883;

/// Port used when an `mqtts://` URL names none.
pub const DEFAULT_TLS_PORT: u16 = 8883;

/// Maximum size of one encoded PUBLISH packet (fixed header, topic and payload), in bytes.
/// Larger messages are rejected by [`Publisher::publish`], because `rumqttc` fails the whole
/// connection on a packet above its limit and would then send the same packet again after
/// every reconnect.
pub const MAX_PACKET_SIZE: usize = 1024 * 1024;

/// Bytes a PUBLISH packet adds to topic and payload: fixed header byte, up to 4 bytes of
/// remaining length, 2 bytes of topic length and 2 bytes of packet id.
const PUBLISH_OVERHEAD: usize = 9;

/// Timeout that [`Drop`] uses when [`Publisher::shutdown`] was not called.
const DROP_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(1);

/// First delay before reconnecting after a failure. It doubles up to [`MAX_BACKOFF`].
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// A failed connection attempt is logged at warn the first time and then every this many
/// consecutive failures, so that an absent broker does not flood the log.
const FAILURE_LOG_INTERVAL: u64 = 10;

/// Dropped messages are logged at warn for the first one and then every this many.
const DROP_LOG_INTERVAL: u64 = 1000;

/// Capacity of `rumqttc`'s own request channel. It is kept small because the bounded queue in
/// front of it is where messages wait during an outage.
const CLIENT_CHANNEL_CAPACITY: usize = 10;

/// Maximum number of QoS 1 and 2 publishes awaiting acknowledgement. MQTT 3.1.1 has no way
/// for the broker to announce its limit. Mosquitto 2.0.11 defaults `max_inflight_messages`
/// to 20 (its example mosquitto.conf), and with `rumqttc`'s default of 100 it acknowledged
/// QoS 2 publishes beyond the 20 pending ones but never delivered them to subscribers.
const MAX_INFLIGHT: u16 = 20;

/// Errors from [`Publisher::start`].
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("invalid MQTT URL {url:?}: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")]
    InvalidUrl { url: String },
    #[error(
        "unsupported MQTT URL {url:?}: TLS cannot verify a certificate for a bracketed IPv6 \
         address, use a host name that resolves to it"
    )]
    TlsIpv6Literal { url: String },
    #[error(
        "MQTT TLS files are set but {url:?} is not a TLS URL: use mqtts://HOST[:PORT] or \
         remove the CA file and client certificate"
    )]
    TlsFilesWithoutTls { url: String },
    #[error("invalid MQTT {kind} {}: {reason}", path.display())]
    TlsFile {
        kind: TlsFileKind,
        path: PathBuf,
        reason: String,
    },
    #[error(
        "missing MQTT client key file: the client certificate {} needs its private key",
        cert_file.display()
    )]
    MissingClientKey { cert_file: PathBuf },
    #[error(
        "missing MQTT client certificate file: the client key {} needs its certificate",
        key_file.display()
    )]
    MissingClientCert { key_file: PathBuf },
    #[error("failed to set up TLS for MQTT: {0}")]
    TlsSetup(#[source] rumqttc::tokio_native_tls::native_tls::Error),
    #[error("invalid MQTT QoS {0}: expected 0, 1 or 2")]
    InvalidQos(u8),
    #[error("invalid MQTT queue capacity 0: expected at least 1 message")]
    ZeroQueueCapacity,
    #[error("invalid MQTT keep-alive {0:?}: expected 0 (off) or whole seconds from 1 s to 65535 s")]
    InvalidKeepAlive(Duration),
    #[error(
        "invalid MQTT topic {topic:?} for the {role}: expected a non-empty name without + and #"
    )]
    InvalidTopic { topic: String, role: &'static str },
    #[error("failed to start the MQTT publisher thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Configuration of a [`Publisher`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttSettings {
    /// Broker URL of the form `mqtt://HOST[:PORT]`, where PORT defaults to [`DEFAULT_PORT`],
    /// or `mqtts://HOST[:PORT]` for TLS, where PORT defaults to [`DEFAULT_TLS_PORT`]. An IPv6
    /// host is written in brackets, `mqtt://[::1]:1883`, and works only without TLS.
    pub url: String,
    /// MQTT client identifier. The broker disconnects an older client with the same id.
    pub client_id: String,
    /// Quality of service of every publish: 0, 1 or 2.
    pub qos: u8,
    /// Maximum number of messages waiting to be handed to the MQTT client.
    pub queue_capacity: usize,
    /// Interval of MQTT keep-alive pings, 0 to disable them. Sub-second parts are truncated.
    pub keep_alive: Duration,
    /// Message that the broker publishes when the connection ends without a DISCONNECT,
    /// such as after a crash or a network failure.
    pub last_will: Option<MqttMessage>,
    /// Message published after every connection acknowledgement, before anything queued.
    pub birth: Option<MqttMessage>,
    /// User name and password sent in CONNECT.
    pub credentials: Option<Credentials>,
    /// CA file and client certificate for an `mqtts://` URL. Must be empty for `mqtt://`.
    pub tls: TlsFiles,
}

/// A complete MQTT message: topic, payload, QoS and retain flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttMessage {
    pub topic: String,
    pub payload: Vec<u8>,
    /// 0, 1 or 2.
    pub qos: u8,
    pub retain: bool,
}

/// User name and password for the broker. `Debug` prints the user name only.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl Default for MqttSettings {
    /// Local broker, QoS 0, and a queue of 1024 messages, which covers about 34 s of outage
    /// at one message per frame and 30 frames per second.
    fn default() -> Self {
        Self {
            url: format!("mqtt://127.0.0.1:{DEFAULT_PORT}"),
            client_id: "patchflow".to_owned(),
            qos: 0,
            queue_capacity: 1024,
            keep_alive: Duration::from_secs(30),
            last_will: None,
            birth: None,
            credentials: None,
            tls: TlsFiles::default(),
        }
    }
}

/// Snapshot of a [`Publisher`]'s counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PublisherStats {
    /// Messages written to the connection (QoS 0) or acknowledged by the broker (QoS 1 and 2).
    pub published: u64,
    /// Messages rejected by [`Publisher::publish`] (queue full, invalid topic, too large) or
    /// still unsent when the publisher shut down.
    pub dropped: u64,
    /// Messages in the bounded queue. Messages that the publisher thread has taken from the
    /// queue but not sent yet are not counted.
    pub queued: usize,
    /// Whether the broker has acknowledged the current connection.
    pub connected: bool,
    /// Times the publisher scheduled a reconnect after a failed connection attempt or a lost
    /// connection.
    pub reconnect_attempts: u64,
}

/// Non-blocking MQTT publisher running on its own thread.
///
/// Dropping it shuts it down with a timeout of 1 s. Call [`Publisher::shutdown`] to choose
/// the timeout.
#[derive(Debug)]
pub struct Publisher {
    broker: BrokerAddress,
    /// Latest message of each state topic, published again after every reconnection.
    states: States,
    /// QoS of [`Publisher::publish`].
    qos: QoS,
    queue_tx: mpsc::Sender<Message>,
    queue_capacity: usize,
    counters: Arc<Counters>,
    shutdown_tx: Option<oneshot::Sender<std::time::Instant>>,
    thread: Option<JoinHandle<()>>,
}

impl Publisher {
    /// Validates `settings` and starts the publisher thread, which connects in the background.
    ///
    /// Returns without waiting for the broker, so an unreachable broker is reported only in
    /// the log and in [`PublisherStats::connected`].
    pub fn start(settings: MqttSettings) -> Result<Publisher, MqttError> {
        let broker = BrokerAddress::parse(&settings.url)?;
        let qos = qos_from_level(settings.qos)?;
        if settings.queue_capacity == 0 {
            return Err(MqttError::ZeroQueueCapacity);
        }
        let keep_alive = validate_keep_alive(settings.keep_alive)?;
        let birth = match settings.birth {
            Some(message) => Some(Message::from_settings(message, "birth message")?),
            None => None,
        };

        let mut options = MqttOptions::new(settings.client_id, broker.host.clone(), broker.port);
        if broker.tls {
            let connector = tls::connector(&settings.tls)?;
            options.set_transport(Transport::tls_with_config(
                TlsConfiguration::NativeConnector(connector),
            ));
        } else if !settings.tls.is_empty() {
            return Err(MqttError::TlsFilesWithoutTls { url: settings.url });
        }
        options.set_keep_alive(keep_alive);
        if let Some(will) = settings.last_will {
            let will = Message::from_settings(will, "Last Will")?;
            options.set_last_will(LastWill::new(
                will.topic,
                will.payload,
                will.qos,
                will.retain,
            ));
        }
        if let Some(credentials) = settings.credentials {
            options.set_credentials(credentials.username, credentials.password);
        }
        options.set_clean_session(true);
        options.set_inflight(MAX_INFLIGHT);
        options.set_max_packet_size(options.max_packet_size(), MAX_PACKET_SIZE);
        let (client, eventloop) = AsyncClient::new(options, CLIENT_CHANNEL_CAPACITY);

        let (queue_tx, queue_rx) = mpsc::channel(settings.queue_capacity);
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let counters = Arc::new(Counters::default());
        let states = States::default();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(MqttError::Thread)?;

        let worker = Worker {
            eventloop,
            client,
            queue_rx,
            queue_closed: false,
            backlog: VecDeque::new(),
            counters: Arc::clone(&counters),
            broker: broker.clone(),
            tls_files: settings.tls,
            birth,
            states: Arc::clone(&states),
            connected_before: false,
            in_flight: 0,
            client_full: false,
            consecutive_failures: 0,
            backoff: INITIAL_BACKOFF,
            retry_at: None,
        };
        let thread = std::thread::Builder::new()
            .name("mqtt-publisher".to_owned())
            .spawn(move || runtime.block_on(worker.run(shutdown_rx)))
            .map_err(MqttError::Thread)?;
        tracing::info!(broker = %broker, qos = settings.qos, "started MQTT publisher");

        Ok(Publisher {
            broker,
            states,
            qos,
            queue_tx,
            queue_capacity: settings.queue_capacity,
            counters,
            shutdown_tx: Some(shutdown_tx),
            thread: Some(thread),
        })
    }

    /// Queues `payload` for `topic` without blocking and returns whether it was queued.
    ///
    /// The message is dropped and counted in [`PublisherStats::dropped`] when the queue is
    /// full, when `topic` is not a valid MQTT topic name (empty, containing `+`, `#` or NUL),
    /// or when the packet would exceed [`MAX_PACKET_SIZE`].
    pub fn publish(&self, topic: &str, payload: Vec<u8>) -> bool {
        self.queue(topic, payload, self.qos, false)
    }

    /// Queues a message like [`Publisher::publish`], with its own QoS (0, 1 or 2) and retain
    /// flag. A QoS above 2 is rejected and counted as dropped.
    pub fn publish_with(&self, topic: &str, payload: Vec<u8>, qos: u8, retain: bool) -> bool {
        match self.qos_or_drop(qos, topic) {
            Some(qos) => self.queue(topic, payload, qos, retain),
            None => false,
        }
    }

    /// Converts a QoS level, or counts the message for `topic` as dropped when it is not
    /// 0, 1 or 2.
    fn qos_or_drop(&self, qos: u8, topic: &str) -> Option<QoS> {
        let qos = qos_from_level(qos).ok();
        if qos.is_none() {
            self.count_drop("invalid MQTT QoS, expected 0, 1 or 2", topic);
        }
        qos
    }

    /// Queues a state message like [`Publisher::publish_with`] and keeps it as the topic's
    /// current state. After every reconnection the current states are published again,
    /// right after the birth message, so that a broker restarted without persistence gets
    /// its retained states back. A state that the full queue dropped still goes out then.
    pub fn publish_state(&self, topic: &str, payload: Vec<u8>, qos: u8, retain: bool) -> bool {
        let Some(qos) = self.qos_or_drop(qos, topic) else {
            return false;
        };
        let Some(message) = self.message(topic, payload, qos, retain) else {
            return false;
        };
        self.states
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(topic.to_owned(), message.clone());
        self.send(message)
    }

    /// Builds a message, or counts it as dropped when it cannot be sent.
    fn message(&self, topic: &str, payload: Vec<u8>, qos: QoS, retain: bool) -> Option<Message> {
        if !is_valid_topic(topic) {
            self.count_drop("invalid MQTT topic name, expected no wildcards", topic);
            return None;
        }
        if topic.len() + payload.len() + PUBLISH_OVERHEAD > MAX_PACKET_SIZE {
            self.count_drop("MQTT message exceeds the maximum packet size", topic);
            return None;
        }
        Some(Message {
            topic: topic.to_owned(),
            payload,
            qos,
            retain,
        })
    }

    fn queue(&self, topic: &str, payload: Vec<u8>, qos: QoS, retain: bool) -> bool {
        match self.message(topic, payload, qos, retain) {
            Some(message) => self.send(message),
            None => false,
        }
    }

    fn send(&self, message: Message) -> bool {
        let topic = message.topic.clone();
        match self.queue_tx.try_send(message) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.count_drop("MQTT queue is full", &topic);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.count_drop("MQTT publisher thread has stopped", &topic);
                false
            }
        }
    }

    /// Returns the reason why the latest connection attempt failed or the connection was
    /// lost, with a hint for TLS failures. `None` while connected and before the first failure.
    pub fn last_error(&self) -> Option<String> {
        self.counters
            .last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Returns the current counters.
    pub fn stats(&self) -> PublisherStats {
        PublisherStats {
            published: self.counters.published.load(Ordering::Relaxed),
            dropped: self.counters.dropped.load(Ordering::Relaxed),
            queued: self.queue_capacity - self.queue_tx.capacity(),
            connected: self.counters.connected.load(Ordering::Relaxed),
            reconnect_attempts: self.counters.reconnect_attempts.load(Ordering::Relaxed),
        }
    }

    /// Stops the publisher within `timeout`.
    ///
    /// While the broker is connected, the thread first sends what is queued and waits for
    /// acknowledgements (QoS 1 and 2) for up to three quarters of `timeout`, then disconnects.
    /// Messages still unsent are counted as dropped. If the thread has not finished when
    /// `timeout` expires, it is detached and a warning is logged. Returns the final counters.
    pub fn shutdown(mut self, timeout: Duration) -> PublisherStats {
        self.stop(timeout);
        self.stats()
    }

    fn stop(&mut self, timeout: Duration) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        let deadline = std::time::Instant::now() + timeout;
        if let Some(shutdown_tx) = self.shutdown_tx.take() {
            // An error means the thread has already exited, which the join below handles.
            let _ = shutdown_tx.send(deadline);
        }

        // JoinHandle::join has no timeout, so wait for the thread to finish before joining.
        while !thread.is_finished() {
            if std::time::Instant::now() >= deadline {
                tracing::warn!(
                    broker = %self.broker,
                    ?timeout,
                    "MQTT publisher thread did not stop in time, detaching it"
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if thread.join().is_err() {
            tracing::error!(broker = %self.broker, "MQTT publisher thread panicked");
        }
        tracing::info!(broker = %self.broker, stats = ?self.stats(), "stopped MQTT publisher");
    }

    fn count_drop(&self, reason: &str, topic: &str) {
        let dropped = self.counters.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        if dropped == 1 || dropped.is_multiple_of(DROP_LOG_INTERVAL) {
            tracing::warn!(broker = %self.broker, topic, dropped, "{reason}, dropping message");
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.stop(DROP_SHUTDOWN_TIMEOUT);
    }
}

/// Counters shared between [`Publisher`] and its thread.
#[derive(Debug, Default)]
struct Counters {
    published: AtomicU64,
    dropped: AtomicU64,
    connected: AtomicBool,
    reconnect_attempts: AtomicU64,
    /// See [`Publisher::last_error`].
    last_error: Mutex<Option<String>>,
}

impl Counters {
    fn set_last_error(&self, error: Option<String>) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = error;
    }
}

/// Latest message per state topic, shared by the publisher and its thread.
type States = Arc<Mutex<BTreeMap<String, Message>>>;

#[derive(Debug, Clone)]
struct Message {
    topic: String,
    payload: Vec<u8>,
    qos: QoS,
    retain: bool,
}

impl Message {
    /// Validates a message from the settings. `role` names it in errors.
    fn from_settings(message: MqttMessage, role: &'static str) -> Result<Self, MqttError> {
        if !is_valid_topic(&message.topic) {
            return Err(MqttError::InvalidTopic {
                topic: message.topic,
                role,
            });
        }
        Ok(Self {
            topic: message.topic,
            payload: message.payload,
            qos: qos_from_level(message.qos)?,
            retain: message.retain,
        })
    }
}

impl From<Publish> for Message {
    fn from(publish: Publish) -> Self {
        Self {
            topic: publish.topic,
            payload: publish.payload.to_vec(),
            qos: publish.qos,
            retain: publish.retain,
        }
    }
}

/// Checks that `url` is a broker URL that [`Publisher::start`] accepts.
pub fn validate_url(url: &str) -> Result<(), MqttError> {
    BrokerAddress::parse(url).map(|_| ())
}

/// Checks `url` like [`validate_url`] and returns whether it is an `mqtts://` URL.
pub fn is_tls_url(url: &str) -> Result<bool, MqttError> {
    BrokerAddress::parse(url).map(|broker| broker.tls)
}

/// Broker host and port parsed from an `mqtt://` or `mqtts://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BrokerAddress {
    /// Host name or IP address as `rumqttc` expects it, with brackets around IPv6 addresses.
    host: String,
    port: u16,
    /// Whether the URL is `mqtts://`.
    tls: bool,
}

impl BrokerAddress {
    fn parse(url: &str) -> Result<BrokerAddress, MqttError> {
        let invalid = || MqttError::InvalidUrl {
            url: url.to_owned(),
        };

        let (scheme, rest) = url.split_once("://").ok_or_else(invalid)?;
        let tls = match scheme.to_ascii_lowercase().as_str() {
            "mqtt" => false,
            "mqtts" => true,
            _ => return Err(invalid()),
        };

        // Paths, queries, fragments and user names have no meaning here, so reject them
        // instead of silently ignoring them.
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty()
            || authority.contains(['/', '?', '#', '@'])
            || authority.contains(char::is_whitespace)
        {
            return Err(invalid());
        }

        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let (address, tail) = bracketed.split_once(']').ok_or_else(invalid)?;
            address.parse::<Ipv6Addr>().map_err(|_| invalid())?;
            // `rumqttc` hands the host with its brackets to the TLS library as the name to
            // verify, and OpenSSL matches that against DNS names, never against IP addresses.
            if tls {
                return Err(MqttError::TlsIpv6Literal {
                    url: url.to_owned(),
                });
            }
            let port = match tail {
                "" => None,
                _ => Some(tail.strip_prefix(':').ok_or_else(invalid)?),
            };
            (format!("[{address}]"), port)
        } else {
            match authority.split_once(':') {
                Some((host, port)) => (host.to_owned(), Some(port)),
                None => (authority.to_owned(), None),
            }
        };
        if host.is_empty() {
            return Err(invalid());
        }

        let port = match port {
            None if tls => DEFAULT_TLS_PORT,
            None => DEFAULT_PORT,
            Some(port) => match port.parse::<u16>() {
                Ok(port) if port != 0 => port,
                _ => return Err(invalid()),
            },
        };
        Ok(BrokerAddress { host, port, tls })
    }
}

impl fmt::Display for BrokerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        write!(f, "{scheme}://{}:{}", self.host, self.port)
    }
}

fn qos_from_level(level: u8) -> Result<QoS, MqttError> {
    match level {
        0 => Ok(QoS::AtMostOnce),
        1 => Ok(QoS::AtLeastOnce),
        2 => Ok(QoS::ExactlyOnce),
        _ => Err(MqttError::InvalidQos(level)),
    }
}

/// Checks the keep-alive against what `rumqttc` accepts: it panics below 1 s (except 0), and
/// MQTT encodes the interval as 16-bit seconds.
fn validate_keep_alive(keep_alive: Duration) -> Result<Duration, MqttError> {
    let seconds = keep_alive.as_secs();
    if keep_alive.is_zero() {
        Ok(Duration::ZERO)
    } else if (1..=u64::from(u16::MAX)).contains(&seconds) {
        Ok(Duration::from_secs(seconds))
    } else {
        Err(MqttError::InvalidKeepAlive(keep_alive))
    }
}

/// Checks an MQTT 3.1.1 topic name: 1 to 65535 bytes, no wildcards, no NUL character.
fn is_valid_topic(topic: &str) -> bool {
    !topic.is_empty() && topic.len() <= usize::from(u16::MAX) && !topic.contains(['+', '#', '\0'])
}

/// State of the publisher thread's single task, which owns the `rumqttc` event loop.
struct Worker {
    eventloop: EventLoop,
    client: AsyncClient,
    queue_rx: mpsc::Receiver<Message>,
    /// Whether every sender of the queue is gone, so `recv` would return `None` at once.
    queue_closed: bool,
    /// Messages taken from the queue but not accepted by `rumqttc` yet, oldest first. They
    /// are either refused because `rumqttc`'s channel was full or recovered from `rumqttc`
    /// after a lost connection, and are sent before anything newer in the queue.
    backlog: VecDeque<Message>,
    counters: Arc<Counters>,
    broker: BrokerAddress,
    /// Named in the hint that follows a failed TLS handshake.
    tls_files: TlsFiles,
    /// Message put at the front of the backlog on every connection acknowledgement.
    birth: Option<Message>,
    /// States put after the birth message on every connection acknowledgement but the
    /// first, which the queue already covers.
    states: States,
    connected_before: bool,
    /// Publishes handed to `rumqttc` and not yet written (QoS 0) or acknowledged (QoS 1, 2).
    in_flight: usize,
    /// Whether `rumqttc` refused a message since the event loop last made progress.
    client_full: bool,
    consecutive_failures: u64,
    backoff: Duration,
    /// When to poll the event loop again after a failure. No polling happens before then.
    retry_at: Option<Instant>,
}

impl Worker {
    async fn run(mut self, mut shutdown_rx: oneshot::Receiver<std::time::Instant>) {
        let deadline = loop {
            self.forward();

            // Each branch is cancel-safe except `poll()`, which is dropped when another branch
            // completes first. That loses nothing while it waits for the network, the
            // request channel or the keep-alive timer.
            // NOTE: a `poll()` dropped while it waits for room in a full socket send buffer
            // can lose the packet it was writing: a QoS 0 message, or an acknowledgement
            // that leaves a QoS 1 or 2 message pending until the next reconnect.
            let retry_at = self.retry_at;
            tokio::select! {
                biased;
                deadline = &mut shutdown_rx => {
                    // `Publisher::stop` sends before it drops the sender, so an error is not
                    // expected. Treat it as a shutdown without time to drain.
                    break deadline.map_or_else(|_| Instant::now(), Instant::from_std);
                }
                () = sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => {
                    self.retry_at = None;
                }
                event = self.eventloop.poll(), if retry_at.is_none() => match event {
                    Ok(event) => self.on_event(event),
                    Err(error) => self.on_error(&error),
                },
                message = self.queue_rx.recv(), if self.can_receive() => match message {
                    Some(message) => self.backlog.push_back(message),
                    None => self.queue_closed = true,
                },
            }
        };

        let now = Instant::now();
        let remaining = deadline.saturating_duration_since(now);
        self.drain(now + remaining * 3 / 4).await;
        self.disconnect(now + remaining * 9 / 10).await;
        self.discard_unsent();
    }

    /// Hands queued messages to `rumqttc` without waiting, until it refuses one.
    fn forward(&mut self) {
        if !self.is_connected() || self.client_full {
            return;
        }
        loop {
            let message = match self.backlog.pop_front() {
                Some(message) => message,
                None => match self.queue_rx.try_recv() {
                    Ok(message) => message,
                    Err(_) => return,
                },
            };

            // `publish` accepted only valid topics, so a refusal means that the channel is
            // full. The message goes back to the front to keep the order.
            match self.client.try_publish(
                message.topic,
                message.qos,
                message.retain,
                message.payload,
            ) {
                Ok(()) => self.in_flight += 1,
                Err(ClientError::TryRequest(request) | ClientError::Request(request)) => {
                    if let Request::Publish(publish) = request {
                        self.backlog.push_front(Message::from(publish));
                    }
                    self.client_full = true;
                    return;
                }
            }
        }
    }

    fn can_receive(&self) -> bool {
        self.is_connected() && !self.client_full && !self.queue_closed
    }

    fn is_connected(&self) -> bool {
        self.counters.connected.load(Ordering::Relaxed)
    }

    fn on_event(&mut self, event: Event) {
        // Every event means that the event loop ran, so its request channel may have room.
        self.client_full = false;

        match event {
            Event::Incoming(Incoming::ConnAck(_)) => {
                self.counters.connected.store(true, Ordering::Relaxed);
                self.counters.set_last_error(None);
                tracing::info!(
                    broker = %self.broker,
                    failed_attempts = self.consecutive_failures,
                    "connected to MQTT broker"
                );
                self.consecutive_failures = 0;
                self.backoff = INITIAL_BACKOFF;
                if self.connected_before {
                    let states = self
                        .states
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    for state in states.values().rev() {
                        self.backlog.push_front(state.clone());
                    }
                }
                self.connected_before = true;
                if let Some(birth) = &self.birth {
                    self.backlog.push_front(birth.clone());
                }
            }
            // `rumqttc` numbers QoS 1 and 2 publishes from 1, and QoS 0 publishes get packet
            // id 0, so an outgoing publish with id 0 completes a QoS 0 message. QoS 1 and 2
            // messages complete with their PUBACK and PUBCOMP.
            Event::Outgoing(Outgoing::Publish(0))
            | Event::Incoming(Incoming::PubAck(_) | Incoming::PubComp(_)) => {
                self.complete_publish();
            }
            _ => {}
        }
    }

    fn complete_publish(&mut self) {
        self.counters.published.fetch_add(1, Ordering::Relaxed);
        // Saturating, because a write can complete after a connection loss reset the count.
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    /// Records a failed poll and schedules the next attempt. `rumqttc` reconnects on the next
    /// `poll()` by itself.
    fn on_error(&mut self, error: &ConnectionError) {
        let was_connected = self.counters.connected.swap(false, Ordering::Relaxed);
        self.client_full = false;
        self.recover_unsent();
        self.consecutive_failures += 1;
        self.counters
            .reconnect_attempts
            .fetch_add(1, Ordering::Relaxed);

        let retry_in = self.backoff;
        self.retry_at = Some(Instant::now() + retry_in);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);

        let error = self.describe(error, !was_connected);
        self.counters.set_last_error(Some(error.clone()));
        let broker = &self.broker;
        let failures = self.consecutive_failures;
        if was_connected {
            tracing::warn!(
                %broker,
                %error,
                ?retry_in,
                "lost connection to MQTT broker, reconnecting"
            );
        } else if failures == 1 || failures.is_multiple_of(FAILURE_LOG_INTERVAL) {
            tracing::warn!(
                %broker,
                %error,
                failures,
                ?retry_in,
                "failed to connect to MQTT broker, retrying"
            );
        } else {
            tracing::debug!(%broker, %error, failures, "failed to connect to MQTT broker");
        }
    }

    /// Returns the error text, followed by what to check when the TLS handshake failed or
    /// the broker rejected the client certificate. `connecting` is true for an error before
    /// the connection acknowledgement.
    fn describe(&self, error: &ConnectionError, connecting: bool) -> String {
        match error {
            ConnectionError::Tls(_) => format!(
                "TLS handshake with {} failed: {error}; {}",
                self.broker,
                tls::handshake_hint(&self.tls_files, &self.broker.host)
            ),
            _ => {
                let text = error.to_string();
                match tls::client_certificate_hint(&self.tls_files, &text, connecting) {
                    Some(hint) if self.broker.tls => format!("{text}; {hint}"),
                    _ => text,
                }
            }
        }
    }

    /// Takes back the publishes that `rumqttc` had not sent, or not had acknowledged, when
    /// the connection failed. `rumqttc` would discard them on reconnecting, because a clean
    /// session never resumes. QoS 1 and 2 messages may therefore reach the broker twice.
    fn recover_unsent(&mut self) {
        let collided = self.eventloop.state.collision.take().map(Request::Publish);
        let pending = self.eventloop.pending.drain(..);
        let recovered: Vec<Message> = collided
            .into_iter()
            .chain(pending)
            .filter_map(|request| match request {
                Request::Publish(publish) => Some(Message::from(publish)),
                _ => None,
            })
            .collect();
        if !recovered.is_empty() {
            let count = recovered.len();
            tracing::debug!(broker = %self.broker, count, "requeued unsent MQTT messages");
        }
        for message in recovered.into_iter().rev() {
            self.backlog.push_front(message);
        }
        self.in_flight = 0;
    }

    /// Sends what is queued while the broker stays connected, until `until`.
    async fn drain(&mut self, until: Instant) {
        // Stops new messages: `Publisher::publish` reports them as dropped from now on.
        self.queue_rx.close();
        loop {
            self.forward();
            let idle = self.backlog.is_empty() && self.queue_rx.is_empty() && self.in_flight == 0;
            if idle || !self.is_connected() {
                return;
            }
            let event = tokio::select! {
                () = sleep_until(until) => return,
                event = self.eventloop.poll() => event,
            };
            match event {
                Ok(event) => self.on_event(event),
                Err(error) => {
                    tracing::warn!(
                        broker = %self.broker,
                        %error,
                        "lost connection to MQTT broker during shutdown"
                    );
                    self.counters.connected.store(false, Ordering::Relaxed);
                    self.recover_unsent();
                    return;
                }
            }
        }
    }

    /// Sends DISCONNECT so that the broker closes the session cleanly, waiting until `until`.
    async fn disconnect(&mut self, until: Instant) {
        if !self.is_connected() {
            return;
        }
        if self.client.try_disconnect().is_ok() {
            loop {
                tokio::select! {
                    () = sleep_until(until) => break,
                    event = self.eventloop.poll() => match event {
                        Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                        Ok(event) => self.on_event(event),
                    },
                }
            }
        }
        self.counters.connected.store(false, Ordering::Relaxed);
        tracing::info!(broker = %self.broker, "disconnected from MQTT broker");
    }

    fn discard_unsent(&mut self) {
        let mut unsent = self.backlog.len();
        while self.queue_rx.try_recv().is_ok() {
            unsent += 1;
        }
        if unsent > 0 || self.in_flight > 0 {
            self.counters
                .dropped
                .fetch_add(unsent as u64, Ordering::Relaxed);
            tracing::warn!(
                broker = %self.broker,
                unsent,
                unacknowledged = self.in_flight,
                "MQTT publisher stopped with messages not delivered"
            );
        }
    }
}

/// JSON message published for each scored frame.
///
/// Example of [`FrameMessage::to_json`] output (one line, shown wrapped):
///
/// ```json
/// {"source":"camera-1","frame":42,"pts_ns":1400000000,"timestamp_ms":1767225600123,
///  "score":-0.8125,"normalized_score":0.73,"log_score":0.2076,"threshold":0.5,
///  "threshold_domain":"normalized","is_anomalous":true,"label":"anomalous"}
/// ```
///
/// Non-finite scores (NaN, infinity) are written as `null`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FrameMessage {
    /// Name of the video source, as configured by the caller.
    pub source: String,
    /// Index of the frame in the stream, counting from 0.
    pub frame: u64,
    /// Presentation timestamp of the frame in nanoseconds, `null` when the buffer has none.
    pub pts_ns: Option<u64>,
    /// Wall-clock time when the message was built, in milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// Raw anomaly score from the model.
    pub score: f32,
    /// Score after normalisation, in [0, 1].
    pub normalized_score: f32,
    /// Log score, the maximum over patches of `0.5 mean_c z^2`.
    pub log_score: f32,
    /// Threshold that decided `is_anomalous`.
    pub threshold: f32,
    /// Score that was compared with `threshold`: `normalized`, `raw` or `log`.
    pub threshold_domain: ScoreDomain,
    /// Whether the frame was classified as anomalous.
    pub is_anomalous: bool,
    /// `"anomalous"` or `"normal"`, matching `is_anomalous`.
    pub label: String,
}

impl FrameMessage {
    /// Serialises the message as compact JSON.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("FrameMessage has only strings, numbers and booleans")
    }
}

/// Builds the [`FrameMessage`] for one scored frame, stamped with the current wall-clock time.
pub fn frame_message(
    source: &str,
    frame: u64,
    pts_ns: Option<u64>,
    score: &FrameScore,
    threshold: Threshold,
) -> FrameMessage {
    // A clock before 1970 is a broken clock. 0 marks it without failing the frame.
    let timestamp_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        });
    let is_anomalous = threshold.is_exceeded_by(score);
    let label = if is_anomalous { "anomalous" } else { "normal" };
    FrameMessage {
        source: source.to_owned(),
        frame,
        pts_ns,
        timestamp_ms,
        score: score.score,
        normalized_score: score.normalized_score,
        log_score: score.log_score,
        threshold: threshold.value,
        threshold_domain: threshold.domain,
        is_anomalous,
        label: label.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(host: &str, port: u16) -> BrokerAddress {
        BrokerAddress {
            host: host.to_owned(),
            port,
            tls: false,
        }
    }

    fn tls_address(host: &str, port: u16) -> BrokerAddress {
        BrokerAddress {
            host: host.to_owned(),
            port,
            tls: true,
        }
    }

    #[test]
    fn url_accepts_host_and_port_forms() {
        let cases = [
            ("mqtt://localhost", address("localhost", 1883)),
            ("mqtt://127.0.0.1:1884", address("127.0.0.1", 1884)),
            (
                "MQTT://broker.example:8883/",
                address("broker.example", 8883),
            ),
            ("mqtt://[::1]", address("[::1]", 1883)),
            ("mqtt://[::1]:1885", address("[::1]", 1885)),
            ("mqtts://localhost", tls_address("localhost", 8883)),
            ("MQTTS://10.0.0.2:9883/", tls_address("10.0.0.2", 9883)),
        ];
        for (url, expected) in cases {
            let parsed = BrokerAddress::parse(url);
            assert_eq!(parsed.ok(), Some(expected), "{url}");
        }
    }

    #[test]
    fn url_rejects_malformed_values() {
        let cases = [
            "",
            "localhost:1883",
            "tcp://localhost",
            "mqtt://",
            "mqtt://:1883",
            "mqtt://host:",
            "mqtt://host:0",
            "mqtt://host:65536",
            "mqtt://host:port",
            "mqtt://host:1883/topic",
            "mqtt://user@host",
            "mqtt://host?client_id=x",
            "mqtt://[::1",
            "mqtt://[not-ipv6]:1883",
            "mqtt://[::1]1883",
            "mqtt://::1:1883",
            "mqtt://my host",
            "ssl://host",
            "wss://host",
            "mqtts://",
            "mqtts://host:0",
        ];
        for url in cases {
            let error = BrokerAddress::parse(url).unwrap_err();
            assert_eq!(
                error.to_string(),
                format!(
                    "invalid MQTT URL {url:?}: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]"
                ),
            );
        }
    }

    #[test]
    fn tls_url_rejects_ipv6_literal() {
        for url in ["mqtts://[::1]", "mqtts://[::1]:8883"] {
            let error = BrokerAddress::parse(url).unwrap_err();
            assert!(
                matches!(&error, MqttError::TlsIpv6Literal { url: value } if value == url),
                "{error:?}"
            );
        }
    }

    #[test]
    fn broker_address_display_keeps_scheme() {
        assert_eq!(
            address("127.0.0.1", 1883).to_string(),
            "mqtt://127.0.0.1:1883"
        );
        assert_eq!(
            tls_address("broker", 8883).to_string(),
            "mqtts://broker:8883"
        );
    }

    #[test]
    fn start_rejects_tls_files_on_plain_url() {
        let settings = MqttSettings {
            tls: TlsFiles {
                ca_file: Some(PathBuf::from("/etc/ssl/certs/ca-certificates.crt")),
                ..TlsFiles::default()
            },
            ..MqttSettings::default()
        };
        let error = Publisher::start(settings).unwrap_err();
        assert!(
            matches!(error, MqttError::TlsFilesWithoutTls { .. }),
            "{error}"
        );
    }

    #[test]
    fn start_rejects_client_cert_without_key() {
        let cases = [
            (
                TlsFiles {
                    client_cert_file: Some(PathBuf::from("client.pem")),
                    ..TlsFiles::default()
                },
                "missing MQTT client key file: the client certificate client.pem needs its private key",
            ),
            (
                TlsFiles {
                    client_key_file: Some(PathBuf::from("client.key")),
                    ..TlsFiles::default()
                },
                "missing MQTT client certificate file: the client key client.key needs its certificate",
            ),
        ];
        for (tls, expected) in cases {
            let settings = MqttSettings {
                url: "mqtts://127.0.0.1:9".to_owned(),
                tls,
                ..MqttSettings::default()
            };
            let error = Publisher::start(settings).unwrap_err();
            assert_eq!(error.to_string(), expected);
        }
    }

    #[test]
    fn start_rejects_missing_ca_file() {
        let settings = MqttSettings {
            url: "mqtts://127.0.0.1:9".to_owned(),
            tls: TlsFiles {
                ca_file: Some(PathBuf::from("/nonexistent/ca.pem")),
                ..TlsFiles::default()
            },
            ..MqttSettings::default()
        };
        let error = Publisher::start(settings).unwrap_err();
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
        assert!(error.to_string().contains("/nonexistent/ca.pem"), "{error}");
    }

    #[test]
    fn start_rejects_invalid_settings() {
        let cases = [
            (
                MqttSettings {
                    qos: 3,
                    ..MqttSettings::default()
                },
                "invalid MQTT QoS 3: expected 0, 1 or 2",
            ),
            (
                MqttSettings {
                    queue_capacity: 0,
                    ..MqttSettings::default()
                },
                "invalid MQTT queue capacity 0: expected at least 1 message",
            ),
            (
                MqttSettings {
                    keep_alive: Duration::from_millis(500),
                    ..MqttSettings::default()
                },
                "invalid MQTT keep-alive 500ms: expected 0 (off) or whole seconds from 1 s to 65535 s",
            ),
            (
                MqttSettings {
                    keep_alive: Duration::from_secs(65536),
                    ..MqttSettings::default()
                },
                "invalid MQTT keep-alive 65536s: expected 0 (off) or whole seconds from 1 s to 65535 s",
            ),
            (
                MqttSettings {
                    last_will: Some(MqttMessage {
                        topic: "patchflow/#".to_owned(),
                        payload: b"offline".to_vec(),
                        qos: 1,
                        retain: true,
                    }),
                    ..MqttSettings::default()
                },
                "invalid MQTT topic \"patchflow/#\" for the Last Will: expected a non-empty name without + and #",
            ),
            (
                MqttSettings {
                    birth: Some(MqttMessage {
                        topic: "patchflow/available".to_owned(),
                        payload: b"online".to_vec(),
                        qos: 4,
                        retain: true,
                    }),
                    ..MqttSettings::default()
                },
                "invalid MQTT QoS 4: expected 0, 1 or 2",
            ),
        ];
        for (settings, expected) in cases {
            let error = Publisher::start(settings).unwrap_err();
            assert_eq!(error.to_string(), expected);
        }
    }

    #[test]
    fn topic_validation() {
        assert!(is_valid_topic("patchflow/camera-1/score"));
        assert!(!is_valid_topic(""));
        assert!(!is_valid_topic("patchflow/+/score"));
        assert!(!is_valid_topic("patchflow/#"));
        assert!(!is_valid_topic("patch\0flow"));
        assert!(!is_valid_topic(&"a".repeat(65536)));
    }

    fn scores(score: f32, normalized_score: f32, log_score: f32) -> FrameScore {
        FrameScore::without_maps(score, normalized_score, log_score)
    }

    #[test]
    fn frame_message_json_schema() {
        let message = frame_message(
            "camera-1",
            42,
            Some(1_400_000_000),
            &scores(-0.8, 0.73, 0.25),
            Threshold::MODEL,
        );
        let json: serde_json::Value = serde_json::from_slice(&message.to_json()).unwrap();
        let object = json.as_object().unwrap();

        let keys: Vec<&str> = object.keys().map(String::as_str).collect();
        let mut expected_keys = [
            "source",
            "frame",
            "pts_ns",
            "timestamp_ms",
            "score",
            "normalized_score",
            "log_score",
            "threshold",
            "threshold_domain",
            "is_anomalous",
            "label",
        ];
        expected_keys.sort_unstable();
        assert_eq!(keys, expected_keys);
        assert_eq!(json["source"], "camera-1");
        assert_eq!(json["frame"], 42);
        assert_eq!(json["pts_ns"], 1_400_000_000u64);
        // serde_json writes the shortest decimal that reads back as the same f32.
        assert_eq!(json["score"].as_f64().map(|value| value as f32), Some(-0.8));
        assert_eq!(
            json["normalized_score"].as_f64().map(|value| value as f32),
            Some(0.73)
        );
        assert_eq!(json["log_score"], 0.25);
        assert_eq!(json["threshold"], 0.5);
        assert_eq!(json["threshold_domain"], "normalized");
        assert_eq!(json["is_anomalous"], true);
        assert_eq!(json["label"], "anomalous");
        // 2020-01-01 in Unix milliseconds: any working clock is later.
        assert!(json["timestamp_ms"].as_u64().unwrap() > 1_577_836_800_000);
    }

    #[test]
    fn frame_message_log_threshold_decides() {
        let threshold = Threshold::new(120.0, ScoreDomain::Log).unwrap();
        let message = frame_message("camera-1", 0, None, &scores(0.0, 1.0, 130.0), threshold);
        let json: serde_json::Value = serde_json::from_slice(&message.to_json()).unwrap();
        assert_eq!(json["threshold"], 120.0);
        assert_eq!(json["threshold_domain"], "log");
        assert_eq!(json["is_anomalous"], true);
        let message = frame_message("camera-1", 1, None, &scores(0.0, 1.0, 110.0), threshold);
        let json: serde_json::Value = serde_json::from_slice(&message.to_json()).unwrap();
        assert_eq!(json["is_anomalous"], false);
    }

    #[test]
    fn frame_message_normal_label_and_missing_pts() {
        let message = frame_message(
            "camera-1",
            0,
            None,
            &scores(-0.9, 0.2, 0.1),
            Threshold::MODEL,
        );
        let json: serde_json::Value = serde_json::from_slice(&message.to_json()).unwrap();
        assert_eq!(json["label"], "normal");
        assert_eq!(json["is_anomalous"], false);
        assert!(json["pts_ns"].is_null());
    }

    #[test]
    fn frame_message_writes_nan_as_null() {
        let message = frame_message(
            "camera-1",
            0,
            None,
            &scores(f32::NAN, f32::NAN, f32::INFINITY),
            Threshold::MODEL,
        );
        let json: serde_json::Value = serde_json::from_slice(&message.to_json()).unwrap();
        assert!(json["score"].is_null());
        assert!(json["normalized_score"].is_null());
        assert!(json["log_score"].is_null());
    }

    #[test]
    fn credentials_debug_hides_password() {
        let credentials = Credentials {
            username: "line-user".to_owned(),
            password: "s3cret-value".to_owned(),
        };
        let settings = MqttSettings {
            credentials: Some(credentials),
            ..MqttSettings::default()
        };
        let printed = format!("{settings:?}");
        assert!(printed.contains("line-user"), "{printed}");
        assert!(!printed.contains("s3cret-value"), "{printed}");
    }

    #[test]
    fn publish_with_rejects_invalid_qos() {
        let publisher = Publisher::start(MqttSettings {
            url: "mqtt://127.0.0.1:9".to_owned(),
            ..MqttSettings::default()
        })
        .unwrap();
        assert!(!publisher.publish_with("a/b", b"x".to_vec(), 3, false));
        assert!(publisher.publish_with("a/b", b"x".to_vec(), 1, true));
        assert_eq!(publisher.stats().dropped, 1);
        publisher.shutdown(Duration::from_millis(100));
    }

    #[test]
    fn publisher_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Publisher>();
    }

    #[test]
    fn publish_rejects_invalid_topic_and_oversized_payload() {
        // The checks below do not need a broker, so whether the port is open does not matter.
        let publisher = Publisher::start(MqttSettings {
            url: "mqtt://127.0.0.1:9".to_owned(),
            ..MqttSettings::default()
        })
        .unwrap();

        assert!(!publisher.publish("a/+/b", b"{}".to_vec()));
        assert!(!publisher.publish("a/b", vec![0; MAX_PACKET_SIZE]));
        assert!(publisher.publish("a/b", vec![0; 1024]));

        let stats = publisher.stats();
        assert_eq!(stats.dropped, 2);
        assert_eq!(stats.queued, 1);
        publisher.shutdown(Duration::from_millis(200));
    }
}
