// SPDX-License-Identifier: MIT OR Apache-2.0
//! Messages that `patchflow run` publishes over MQTT:
//!
//! - `<prefix>/available`: `online` after every connection acknowledgement, `offline` on a
//!   clean stop and as the Last Will, so it also turns `offline` when the process dies;
//! - `<prefix>/<camera>/state`: `ok` or `anomalous`, at the camera's start and on change;
//! - `<prefix>/events`: the alarm tracker's `start`, `update` and `end` messages;
//! - `<prefix>/<camera>/score`: per-frame scores, at most `score_max_rate` per second;
//! - `<prefix>/<camera>/snapshot`: the JPEG of an event's start or new peak, when the
//!   camera's `snapshot.publish` is on.
//!
//! QoS and retain come from the config for each kind of topic.

use std::time::Duration;

use crate::alarm::{AlarmEvent, AlarmState};
use crate::mqtt::{
    Credentials, FrameMessage, MqttError, MqttMessage, MqttSettings, Publisher, PublisherStats,
};

use super::config::{Delivery, MqttConfig};

pub const ONLINE: &str = "online";
pub const OFFLINE: &str = "offline";

/// Time that a clean stop allows for queued messages and `offline` to reach the broker.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// The run's MQTT publisher and topic settings.
#[derive(Debug)]
pub struct Output {
    publisher: Publisher,
    config: MqttConfig,
}

impl Output {
    /// Starts the publisher with the availability Last Will and birth message. The broker
    /// is connected in the background, so an unreachable broker does not fail here.
    pub fn start(config: &MqttConfig) -> Result<Self, String> {
        let availability = config.availability();
        let topic = format!("{}/available", config.prefix);
        let message = |payload: &str| MqttMessage {
            topic: topic.clone(),
            payload: payload.as_bytes().to_vec(),
            qos: availability.qos,
            retain: availability.retain,
        };
        let password = config.password()?;
        let credentials = config.username.clone().map(|username| Credentials {
            username,
            password: password.unwrap_or_default(),
        });
        let settings = MqttSettings {
            url: config.url.clone(),
            client_id: config.client_id(),
            qos: config.score().qos,
            queue_capacity: config.queue_capacity,
            keep_alive: Duration::from_secs(config.keep_alive),
            last_will: Some(message(OFFLINE)),
            birth: Some(message(ONLINE)),
            credentials,
            tls: config.tls_files(),
        };
        let publisher = Publisher::start(settings).map_err(|e: MqttError| e.to_string())?;
        tracing::info!(
            broker = %config.url,
            prefix = %config.prefix,
            client_id = %config.client_id(),
            "publishing availability, state, events and scores"
        );
        Ok(Self {
            publisher,
            config: config.clone(),
        })
    }

    fn send(&self, topic: &str, payload: Vec<u8>, delivery: Delivery) {
        // A rejected message is counted in the publisher's drop counter and logged there.
        self.publisher
            .publish_with(topic, payload, delivery.qos, delivery.retain);
    }

    /// Publishes a camera's alarm state.
    pub fn state(&self, camera: &str, state: AlarmState) {
        let topic = format!("{}/{camera}/state", self.config.prefix);
        self.send(
            &topic,
            state.name().as_bytes().to_vec(),
            self.config.state(),
        );
    }

    /// Publishes an alarm event message.
    pub fn event(&self, event: &AlarmEvent) {
        let topic = format!("{}/events", self.config.prefix);
        self.send(&topic, event.to_json(), self.config.events());
    }

    /// Publishes a per-frame score message. The caller applies the rate limit.
    pub fn score(&self, camera: &str, message: &FrameMessage) {
        let topic = format!("{}/{camera}/score", self.config.prefix);
        self.send(&topic, message.to_json(), self.config.score());
    }

    /// Publishes a JPEG snapshot of an event frame.
    pub fn snapshot(&self, camera: &str, jpeg: Vec<u8>) {
        let topic = format!("{}/{camera}/snapshot", self.config.prefix);
        self.send(&topic, jpeg, self.config.snapshot());
    }

    /// Minimum time between two score messages of one camera, `None` for no score messages.
    pub fn score_interval(&self) -> Option<Duration> {
        let rate = self.config.score_max_rate;
        (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate))
    }

    /// Returns the publisher's current counters.
    pub fn stats(&self) -> PublisherStats {
        self.publisher.stats()
    }

    pub fn url(&self) -> &str {
        &self.config.url
    }

    /// Publishes `offline` and stops the publisher, sending what is queued while the
    /// broker is connected. Returns the final counters.
    pub fn shutdown(self) -> PublisherStats {
        let availability = self.config.availability();
        let topic = format!("{}/available", self.config.prefix);
        self.send(&topic, OFFLINE.as_bytes().to_vec(), availability);
        self.publisher.shutdown(SHUTDOWN_TIMEOUT)
    }
}
