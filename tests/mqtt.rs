// SPDX-License-Identifier: MIT OR Apache-2.0
//! Tests of `patchflow::mqtt::Publisher` against a real mosquitto broker on 127.0.0.1.
//!
//! Each test starts its own broker on a free port, so the tests can run in parallel.

mod support;

use std::net::{Ipv4Addr, TcpListener};
use std::time::{Duration, Instant};

use patchflow::mqtt::{MqttError, MqttSettings, Publisher, frame_message};
use patchflow::scoring::{FrameScore, Threshold};
use serde_json::Value;
use support::broker::{Broker, ReceivedMessage, Subscriber, free_port, wait_until};
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
            format!("invalid MQTT URL \"{url}\": expected mqtt://HOST[:PORT]")
        );
    }

    let error = Publisher::start(settings(
        "mqtts://127.0.0.1:8883".to_owned(),
        "invalid",
        0,
        10,
    ))
    .unwrap_err();
    assert_eq!(
        error.to_string(),
        "unsupported MQTT URL \"mqtts://127.0.0.1:8883\": TLS is not supported yet, use mqtt://HOST[:PORT]"
    );
}
