// SPDX-License-Identifier: MIT OR Apache-2.0
//! Tests of `patchflow::mqtt::Publisher` against a real mosquitto broker on 127.0.0.1.
//!
//! Each test starts its own broker on a free port, so the tests can run in parallel. The TLS
//! tests make their certificates with the `openssl` tool.

mod support;

use std::net::{Ipv4Addr, TcpListener};
use std::time::{Duration, Instant};

use patchflow::mqtt::{MqttError, MqttSettings, Publisher, TlsFiles, frame_message};
use patchflow::scoring::{FrameScore, Threshold};
use serde_json::Value;
use support::broker::{Broker, ReceivedMessage, Subscriber, TlsListener, free_port, wait_until};
use support::pki::Pki;
use tracing_subscriber::EnvFilter;

/// Time allowed for messages to reach the subscriber, or for the publisher to connect.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// Time after the last expected message during which no further message may arrive.
const QUIET_PERIOD: Duration = Duration::from_millis(300);

/// Upper bound for calls that must not wait on the network. Each takes well under 1 ms when
/// nothing blocks, so this leaves room for a loaded test machine.
const NON_BLOCKING_LIMIT: Duration = Duration::from_millis(250);

/// Slack allowed beyond a shutdown timeout for the calling thread to be scheduled again.
const SHUTDOWN_SLACK: Duration = Duration::from_millis(100);

/// Number of failed connection attempts after which the publisher waits at least 1.6 s
/// (100 ms doubling to the 2 s cap) before the next one.
const ATTEMPTS_BEFORE_LONG_BACKOFF: u64 = 5;

fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("debug"));
    // Fails when another test in this binary has already installed the subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

fn settings(url: String, client_id: &str, qos: u8, queue_capacity: usize) -> MqttSettings {
    MqttSettings {
        url,
        client_id: client_id.to_owned(),
        qos,
        queue_capacity,
        keep_alive: Duration::from_secs(5),
        ..MqttSettings::default()
    }
}

/// Builds the JSON payload of frame `frame` with values derived from its index.
fn frame_payload(frame: u64) -> Vec<u8> {
    let normalized_score = (frame % 10) as f32 / 10.0;
    let score = FrameScore::without_maps(
        normalized_score * 2.0 - 1.0,
        normalized_score,
        normalized_score * 4.0,
    );
    frame_message(
        "camera-1",
        frame,
        Some(frame * 40_000_000),
        &score,
        Threshold::MODEL,
    )
    .to_json()
}

/// Publishes frames `frames` to `topic` and asserts that each was queued.
fn publish_frames(publisher: &Publisher, topic: &str, frames: std::ops::Range<u64>) {
    for frame in frames {
        assert!(
            publisher.publish(topic, frame_payload(frame)),
            "frame {frame} was not queued: {:?}",
            publisher.stats()
        );
    }
}

fn parse_json(message: &ReceivedMessage) -> Value {
    serde_json::from_str(&message.payload)
        .unwrap_or_else(|error| panic!("payload is not JSON ({error}): {}", message.payload))
}

/// Returns the `frame` field of each message after checking the topic.
fn frame_numbers(messages: &[ReceivedMessage], topic: &str) -> Vec<u64> {
    messages
        .iter()
        .map(|message| {
            assert_eq!(message.topic, topic);
            parse_json(message)["frame"]
                .as_u64()
                .unwrap_or_else(|| panic!("payload has no integer frame: {}", message.payload))
        })
        .collect()
}

/// Asserts that `json` contains every documented field with the values of [`frame_payload`].
fn assert_frame_fields(json: &Value, frame: u64) {
    let normalized_score = (frame % 10) as f32 / 10.0;
    let is_anomalous = normalized_score > 0.5;
    let object = json.as_object().expect("payload is a JSON object");
    assert_eq!(object.len(), 11, "unexpected fields in {json}");
    assert_eq!(json["source"], "camera-1");
    assert_eq!(json["frame"], frame);
    assert_eq!(json["pts_ns"], frame * 40_000_000);
    assert!(json["timestamp_ms"].as_u64().is_some(), "{json}");
    // serde_json writes the shortest decimal that reads back as the same f32.
    assert_eq!(
        json["score"].as_f64().map(|value| value as f32),
        Some(normalized_score * 2.0 - 1.0)
    );
    assert_eq!(
        json["normalized_score"].as_f64().map(|value| value as f32),
        Some(normalized_score)
    );
    assert_eq!(
        json["log_score"].as_f64().map(|value| value as f32),
        Some(normalized_score * 4.0)
    );
    assert_eq!(json["threshold"], 0.5);
    assert_eq!(json["threshold_domain"], "normalized");
    assert_eq!(json["is_anomalous"], is_anomalous);
    let label = if is_anomalous { "anomalous" } else { "normal" };
    assert_eq!(json["label"], label);
}

#[test]
fn messages_arrive_in_order_as_json() {
    init_logging();
    let broker = Broker::start();
    const COUNT: u64 = 200;

    for qos in 0..=2u8 {
        let topic = format!("patchflow/test/qos{qos}");
        let subscriber = Subscriber::start(broker.port, &topic);
        let publisher = Publisher::start(settings(
            broker.url(),
            &format!("order-qos{qos}"),
            qos,
            1000,
        ))
        .unwrap();
        assert!(
            wait_until(DELIVERY_TIMEOUT, || publisher.stats().connected),
            "QoS {qos}: publisher did not connect; broker log:\n{}",
            broker.log()
        );

        publish_frames(&publisher, &topic, 0..COUNT);
        let messages = subscriber.collect(COUNT as usize, DELIVERY_TIMEOUT);
        let expected: Vec<u64> = (0..COUNT).collect();
        assert_eq!(frame_numbers(&messages, &topic), expected, "QoS {qos}");
        for (frame, message) in (0..COUNT).zip(&messages) {
            assert_frame_fields(&parse_json(message), frame);
        }
        assert_eq!(subscriber.collect_for(QUIET_PERIOD), [], "QoS {qos}");

        // QoS 2 counts a message as published only when PUBCOMP arrives, which can be
        // after the subscriber has received it.
        assert!(
            wait_until(DELIVERY_TIMEOUT, || publisher.stats().published == COUNT),
            "QoS {qos}: {:?}",
            publisher.stats()
        );
        let stats = publisher.stats();
        assert_eq!(stats.dropped, 0, "QoS {qos}");
        assert_eq!(stats.queued, 0, "QoS {qos}");
        assert_eq!(stats.reconnect_attempts, 0, "QoS {qos}");
        publisher.shutdown(Duration::from_secs(2));
    }
}

#[test]
fn publish_does_not_block_while_broker_down() {
    init_logging();
    // The port was free a moment ago, so connection attempts are refused.
    let url = format!("mqtt://127.0.0.1:{}", free_port());
    const CAPACITY: usize = 10;
    const ATTEMPTS: usize = 1000;

    let started = Instant::now();
    let publisher = Publisher::start(settings(url, "broker-down", 1, CAPACITY)).unwrap();
    let start_time = started.elapsed();
    assert!(start_time < NON_BLOCKING_LIMIT, "start took {start_time:?}");

    let started = Instant::now();
    let mut accepted = 0;
    for frame in 0..ATTEMPTS as u64 {
        if publisher.publish("patchflow/test/down", frame_payload(frame)) {
            accepted += 1;
        }
    }
    let publish_time = started.elapsed();
    assert!(
        publish_time < NON_BLOCKING_LIMIT,
        "{ATTEMPTS} publishes took {publish_time:?}"
    );

    assert_eq!(accepted, CAPACITY);
    let stats = publisher.stats();
    assert_eq!(stats.queued, CAPACITY);
    assert_eq!(stats.dropped, (ATTEMPTS - CAPACITY) as u64);
    assert_eq!(stats.published, 0);
    assert!(!stats.connected);
    assert!(
        wait_until(DELIVERY_TIMEOUT, || publisher.stats().reconnect_attempts
            >= 2),
        "{:?}",
        publisher.stats()
    );

    let timeout = Duration::from_millis(500);
    let started = Instant::now();
    publisher.shutdown(timeout);
    let shutdown_time = started.elapsed();
    assert!(
        shutdown_time <= timeout + SHUTDOWN_SLACK,
        "shutdown took {shutdown_time:?}"
    );
}

#[test]
fn queued_messages_arrive_when_broker_starts_later() {
    init_logging();
    // Starting and stopping the broker picks a free port, which the restart below reuses.
    let mut broker = Broker::start();
    broker.stop();
    let topic = "patchflow/test/later";
    let publisher = Publisher::start(settings(broker.url(), "later", 1, 50)).unwrap();
    publish_frames(&publisher, topic, 0..20);
    assert_eq!(publisher.stats().queued, 20);

    // The subscriber must subscribe before the publisher connects, or the queued messages
    // reach a broker without subscribers. Right after a failed attempt, the next one is at
    // least 1.6 s away, which is ample time to start both.
    assert!(
        wait_until(DELIVERY_TIMEOUT, || {
            publisher.stats().reconnect_attempts >= ATTEMPTS_BEFORE_LONG_BACKOFF
        }),
        "{:?}",
        publisher.stats()
    );
    broker.restart();
    let subscriber = Subscriber::start(broker.port, topic);
    assert!(
        !publisher.stats().connected,
        "connected before the subscriber"
    );

    let messages = subscriber.collect(20, DELIVERY_TIMEOUT);
    let expected: Vec<u64> = (0..20).collect();
    assert_eq!(frame_numbers(&messages, topic), expected);
    assert!(publisher.stats().connected);

    publish_frames(&publisher, topic, 20..30);
    let messages = subscriber.collect(10, DELIVERY_TIMEOUT);
    let expected: Vec<u64> = (20..30).collect();
    assert_eq!(frame_numbers(&messages, topic), expected);
    assert_eq!(subscriber.collect_for(QUIET_PERIOD), []);

    assert!(
        wait_until(DELIVERY_TIMEOUT, || publisher.stats().published == 30),
        "{:?}",
        publisher.stats()
    );
    assert_eq!(publisher.stats().dropped, 0);
    publisher.shutdown(Duration::from_secs(2));
}

#[test]
fn publisher_reconnects_after_broker_restart() {
    init_logging();
    let mut broker = Broker::start();
    let topic = "patchflow/test/restart";
    let first_subscriber = Subscriber::start(broker.port, topic);
    let publisher = Publisher::start(settings(broker.url(), "restart", 1, 100)).unwrap();

    publish_frames(&publisher, topic, 0..10);
    let messages = first_subscriber.collect(10, DELIVERY_TIMEOUT);
    let expected: Vec<u64> = (0..10).collect();
    assert_eq!(frame_numbers(&messages, topic), expected);
    assert!(wait_until(DELIVERY_TIMEOUT, || publisher.stats().published == 10));
    drop(first_subscriber);

    broker.stop();
    assert!(
        wait_until(DELIVERY_TIMEOUT, || !publisher.stats().connected),
        "publisher did not notice that the broker stopped"
    );
    publish_frames(&publisher, topic, 10..20);
    assert_eq!(publisher.stats().queued, 10);

    // As in the test above, the restarted broker needs a subscriber before the publisher
    // reconnects.
    assert!(
        wait_until(DELIVERY_TIMEOUT, || {
            publisher.stats().reconnect_attempts >= ATTEMPTS_BEFORE_LONG_BACKOFF
        }),
        "{:?}",
        publisher.stats()
    );
    broker.restart();
    let second_subscriber = Subscriber::start(broker.port, topic);

    let messages = second_subscriber.collect(10, DELIVERY_TIMEOUT);
    let expected: Vec<u64> = (10..20).collect();
    assert_eq!(frame_numbers(&messages, topic), expected);

    publish_frames(&publisher, topic, 20..25);
    let messages = second_subscriber.collect(5, DELIVERY_TIMEOUT);
    let expected: Vec<u64> = (20..25).collect();
    assert_eq!(frame_numbers(&messages, topic), expected);
    assert_eq!(second_subscriber.collect_for(QUIET_PERIOD), []);

    let stats = publisher.stats();
    assert!(stats.connected);
    assert_eq!(stats.dropped, 0);
    publisher.shutdown(Duration::from_secs(2));
}

#[test]
fn shutdown_delivers_queued_messages() {
    init_logging();
    let broker = Broker::start();
    let topic = "patchflow/test/drain";
    let subscriber = Subscriber::start(broker.port, topic);
    let publisher = Publisher::start(settings(broker.url(), "drain", 1, 1000)).unwrap();
    assert!(wait_until(DELIVERY_TIMEOUT, || publisher.stats().connected));

    publish_frames(&publisher, topic, 0..500);
    let timeout = Duration::from_secs(5);
    let started = Instant::now();
    publisher.shutdown(timeout);
    let shutdown_time = started.elapsed();
    assert!(shutdown_time < timeout, "shutdown took {shutdown_time:?}");

    let messages = subscriber.collect(500, DELIVERY_TIMEOUT);
    let expected: Vec<u64> = (0..500).collect();
    assert_eq!(frame_numbers(&messages, topic), expected);
    // The broker forwards the last message before it reads the DISCONNECT that follows
    // it, so its log line can come a moment after the subscriber has everything.
    assert!(
        wait_until(DELIVERY_TIMEOUT, || broker
            .log()
            .contains("Client drain disconnected.")),
        "publisher did not send DISCONNECT; broker log:\n{}",
        broker.log()
    );
}

#[test]
fn shutdown_returns_in_time_while_connect_hangs() {
    init_logging();
    // The kernel completes the TCP handshake for this listener, but nothing reads the MQTT
    // CONNECT or replies with CONNACK, so the publisher waits for a CONNACK.
    let silent_listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = silent_listener.local_addr().unwrap().port();
    let publisher =
        Publisher::start(settings(format!("mqtt://127.0.0.1:{port}"), "hang", 0, 10)).unwrap();
    assert!(publisher.publish("patchflow/test/hang", frame_payload(0)));
    std::thread::sleep(Duration::from_millis(200));
    assert!(!publisher.stats().connected);

    let timeout = Duration::from_millis(300);
    let started = Instant::now();
    publisher.shutdown(timeout);
    let shutdown_time = started.elapsed();
    assert!(
        shutdown_time <= timeout + SHUTDOWN_SLACK,
        "shutdown took {shutdown_time:?}"
    );
}

#[test]
fn drop_stops_publisher_while_connect_hangs() {
    init_logging();
    let silent_listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = silent_listener.local_addr().unwrap().port();
    let publisher =
        Publisher::start(settings(format!("mqtt://127.0.0.1:{port}"), "drop", 0, 10)).unwrap();
    std::thread::sleep(Duration::from_millis(200));

    // Drop uses a shutdown timeout of 1 s.
    let started = Instant::now();
    drop(publisher);
    let drop_time = started.elapsed();
    assert!(
        drop_time <= Duration::from_secs(1) + SHUTDOWN_SLACK,
        "drop took {drop_time:?}"
    );
}

#[test]
fn invalid_url_reports_expected_form() {
    for url in ["foo", "mqtt://127.0.0.1:notaport", "http://127.0.0.1:1883"] {
        let error = Publisher::start(settings(url.to_owned(), "invalid", 0, 10)).unwrap_err();
        assert!(
            matches!(&error, MqttError::InvalidUrl { url: value } if value == url),
            "{error:?}"
        );
        assert_eq!(
            error.to_string(),
            format!(
                "invalid MQTT URL \"{url}\": expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]"
            )
        );
    }
}

/// Starts a broker whose TLS listener uses the server certificate of `pki`.
fn tls_broker(pki: &Pki, require_certificate: bool) -> Broker {
    Broker::start_tls(TlsListener {
        ca_file: pki.ca_file(),
        cert_file: pki.server_cert_file(),
        key_file: pki.server_key_file(),
        require_certificate,
    })
}

fn tls_settings(url: String, client_id: &str, tls: TlsFiles) -> MqttSettings {
    MqttSettings {
        tls,
        ..settings(url, client_id, 1, 100)
    }
}

#[test]
fn tls_messages_arrive_with_right_ca() {
    init_logging();
    let pki = Pki::generate();
    let broker = tls_broker(&pki, false);
    const COUNT: u64 = 50;

    // 127.0.0.1 is matched against the certificate's IP address, localhost against its DNS
    // name.
    for host in ["127.0.0.1", "localhost"] {
        let topic = format!("patchflow/test/tls-{host}");
        let subscriber = Subscriber::start(broker.port, &topic);
        let files = TlsFiles {
            ca_file: Some(pki.ca_file()),
            ..TlsFiles::default()
        };
        let publisher =
            Publisher::start(tls_settings(broker.tls_url(host), "tls-ca", files)).unwrap();
        assert!(
            wait_until(DELIVERY_TIMEOUT, || publisher.stats().connected),
            "{host}: publisher did not connect: {:?}; broker log:\n{}",
            publisher.last_error(),
            broker.log()
        );
        assert_eq!(publisher.last_error(), None, "{host}");

        publish_frames(&publisher, &topic, 0..COUNT);
        let messages = subscriber.collect(COUNT as usize, DELIVERY_TIMEOUT);
        let expected: Vec<u64> = (0..COUNT).collect();
        assert_eq!(frame_numbers(&messages, &topic), expected, "{host}");
        for (frame, message) in (0..COUNT).zip(&messages) {
            assert_frame_fields(&parse_json(message), frame);
        }
        assert!(
            wait_until(DELIVERY_TIMEOUT, || publisher.stats().published == COUNT),
            "{host}: {:?}",
            publisher.stats()
        );
        let stats = publisher.shutdown(Duration::from_secs(2));
        assert_eq!(stats.dropped, 0, "{host}");
        assert_eq!(stats.reconnect_attempts, 0, "{host}");
    }
}

#[test]
fn tls_wrong_ca_delivers_nothing_and_reports() {
    init_logging();
    let pki = Pki::generate();
    let broker = tls_broker(&pki, false);
    let topic = "patchflow/test/tls-wrong-ca";
    let subscriber = Subscriber::start(broker.port, topic);
    const CAPACITY: usize = 10;
    const ATTEMPTS: u64 = 1000;

    // Without a CA file the system trust store applies, which does not contain the test CA.
    let cases = [
        (Some(pki.other_ca_file()), "other-ca.pem"),
        (None, "system trust store"),
    ];
    for (ca_file, hint) in cases {
        let url = broker.tls_url("127.0.0.1");
        let files = TlsFiles {
            ca_file,
            ..TlsFiles::default()
        };
        let publisher = Publisher::start(MqttSettings {
            queue_capacity: CAPACITY,
            ..tls_settings(url.clone(), "tls-wrong-ca", files)
        })
        .unwrap();

        let started = Instant::now();
        let mut accepted = 0;
        for frame in 0..ATTEMPTS {
            if publisher.publish(topic, frame_payload(frame)) {
                accepted += 1;
            }
        }
        let publish_time = started.elapsed();
        assert!(
            publish_time < NON_BLOCKING_LIMIT,
            "{hint}: {ATTEMPTS} publishes took {publish_time:?}"
        );
        assert_eq!(accepted, CAPACITY, "{hint}");

        assert!(
            wait_until(DELIVERY_TIMEOUT, || publisher.stats().reconnect_attempts
                >= 2),
            "{hint}: the publisher did not retry: {:?}",
            publisher.stats()
        );
        let error = publisher
            .last_error()
            .expect("a failed handshake is recorded");
        assert!(error.contains(&url), "{error}");
        assert!(error.contains("TLS handshake"), "{error}");
        assert!(error.contains("certificate verify failed"), "{error}");
        assert!(error.contains(hint), "{error}");

        let stats = publisher.stats();
        assert!(!stats.connected, "{hint}");
        assert_eq!(stats.published, 0, "{hint}");
        assert_eq!(stats.queued, CAPACITY, "{hint}");
        assert_eq!(subscriber.collect_for(QUIET_PERIOD), [], "{hint}");

        let timeout = Duration::from_millis(500);
        let started = Instant::now();
        publisher.shutdown(timeout);
        let shutdown_time = started.elapsed();
        assert!(
            shutdown_time <= timeout + SHUTDOWN_SLACK,
            "{hint}: shutdown took {shutdown_time:?}"
        );
    }
}

#[test]
fn tls_client_certificate_authenticates() {
    init_logging();
    let pki = Pki::generate();
    let broker = tls_broker(&pki, true);
    let topic = "patchflow/test/tls-client";
    let subscriber = Subscriber::start(broker.port, topic);

    let files = TlsFiles {
        ca_file: Some(pki.ca_file()),
        client_cert_file: Some(pki.client_cert_file()),
        client_key_file: Some(pki.client_key_file()),
    };
    let publisher = Publisher::start(tls_settings(
        broker.tls_url("localhost"),
        "tls-client-cert",
        files,
    ))
    .unwrap();
    assert!(
        wait_until(DELIVERY_TIMEOUT, || publisher.stats().connected),
        "publisher did not connect: {:?}; broker log:\n{}",
        publisher.last_error(),
        broker.log()
    );
    publish_frames(&publisher, topic, 0..20);
    let messages = subscriber.collect(20, DELIVERY_TIMEOUT);
    let expected: Vec<u64> = (0..20).collect();
    assert_eq!(frame_numbers(&messages, topic), expected);
    publisher.shutdown(Duration::from_secs(2));

    // The same listener rejects a client without a certificate, which shows that it checks
    // them.
    let files = TlsFiles {
        ca_file: Some(pki.ca_file()),
        ..TlsFiles::default()
    };
    let publisher = Publisher::start(tls_settings(
        broker.tls_url("localhost"),
        "tls-no-client-cert",
        files,
    ))
    .unwrap();
    publish_frames(&publisher, topic, 100..105);
    assert!(
        wait_until(DELIVERY_TIMEOUT, || publisher.stats().reconnect_attempts
            >= 2),
        "{:?}",
        publisher.stats()
    );
    assert!(!publisher.stats().connected);
    let error = publisher
        .last_error()
        .expect("a rejected connection is recorded");
    assert!(error.contains("requires a client certificate"), "{error}");
    publisher.shutdown(Duration::from_millis(500));

    // A client certificate from a CA that the broker does not trust is rejected too.
    let files = TlsFiles {
        ca_file: Some(pki.ca_file()),
        client_cert_file: Some(pki.stranger_cert_file()),
        client_key_file: Some(pki.stranger_key_file()),
    };
    let publisher = Publisher::start(tls_settings(
        broker.tls_url("localhost"),
        "tls-stranger-cert",
        files,
    ))
    .unwrap();
    publish_frames(&publisher, topic, 200..205);
    assert!(
        wait_until(DELIVERY_TIMEOUT, || publisher.stats().reconnect_attempts
            >= 2),
        "{:?}",
        publisher.stats()
    );
    assert!(!publisher.stats().connected);
    let error = publisher
        .last_error()
        .expect("a rejected connection is recorded");
    assert!(error.contains("client certificate"), "{error}");
    assert!(error.contains("stranger.pem"), "{error}");
    assert_eq!(subscriber.collect_for(QUIET_PERIOD), []);
    publisher.shutdown(Duration::from_millis(500));
}

#[test]
fn tls_start_rejects_bad_files() {
    let pki = Pki::generate();
    let url = "mqtts://127.0.0.1:8883".to_owned();
    let start = |files: TlsFiles| {
        Publisher::start(tls_settings(url.clone(), "tls-bad-files", files)).unwrap_err()
    };

    // A key file used as CA file contains no certificate.
    let error = start(TlsFiles {
        ca_file: Some(pki.client_key_file()),
        ..TlsFiles::default()
    });
    assert!(
        error.to_string().starts_with(&format!(
            "invalid MQTT CA file {}: contains no PEM certificate",
            pki.client_key_file().display()
        )),
        "{error}"
    );

    let error = start(TlsFiles {
        client_cert_file: Some(pki.client_cert_file()),
        client_key_file: Some(pki.other_key_file()),
        ..TlsFiles::default()
    });
    let text = error.to_string();
    assert!(text.contains("client key file"), "{text}");
    assert!(
        text.contains("does not belong to the certificate"),
        "{text}"
    );

    let error = start(TlsFiles {
        client_cert_file: Some(pki.client_key_file()),
        client_key_file: Some(pki.client_key_file()),
        ..TlsFiles::default()
    });
    assert!(
        error.to_string().contains("client certificate file"),
        "{error}"
    );
}
