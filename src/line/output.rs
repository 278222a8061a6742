// SPDX-License-Identifier: MIT OR Apache-2.0
//! Messages that `patchflow run` publishes over MQTT:
//!
//! - `<prefix>/available`: `online` after every connection acknowledgement, `offline` on a
//!   clean stop and as the Last Will, so it also turns `offline` when the process dies;
//! - `<prefix>/<camera>/state`: `ok` or `anomalous`, at the camera's start, on change and
//!   after every reconnection;
//! - `<prefix>/events`: the alarm tracker's `start`, `update` and `end` messages;
//! - `<prefix>/<camera>/score`: per-frame scores, at most `score_max_rate` per second;
//! - `<prefix>/<camera>/snapshot`: the JPEG of an event's start or new peak, when the
//!   camera's `snapshot.publish` is on.
//!
//! QoS and retain come from the config for each kind of topic.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

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

    /// Publishes a camera's alarm state. The publisher sends it again after every
    /// reconnection, so a broker restarted without persistence gets it back.
    pub fn state(&self, camera: &str, state: AlarmState) {
        let topic = format!("{}/{camera}/state", self.config.prefix);
        let delivery = self.config.state();
        self.publisher.publish_state(
            &topic,
            state.name().as_bytes().to_vec(),
            delivery.qos,
            delivery.retain,
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

    /// Publishes a JPEG snapshot of an event frame. When it cannot be queued (too large,
    /// or the queue is full), an empty retained message clears the topic's retained
    /// picture, so that a late subscriber does not take an older event's picture for this
    /// one.
    pub fn snapshot(&self, camera: &str, jpeg: Vec<u8>) {
        let topic = format!("{}/{camera}/snapshot", self.config.prefix);
        let delivery = self.config.snapshot();
        let queued = self
            .publisher
            .publish_with(&topic, jpeg, delivery.qos, delivery.retain);
        if !queued && delivery.retain {
            self.publisher
                .publish_with(&topic, Vec::new(), delivery.qos, true);
        }
    }

    /// Returns a limiter for one camera's score messages, `None` when no score messages
    /// are published.
    pub fn score_limiter(&self) -> Option<RateLimiter> {
        RateLimiter::new(self.config.score_max_rate)
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

/// Allows at most `rate` messages per second on average, in bursts of up to `rate`
/// messages (at least one).
///
/// It keeps the times of the last `burst` messages and lets a new one through when the
/// oldest of them is at least `burst / rate` seconds old. Frames that arrive together,
/// as after a stall of the bus watch, are then not dropped as long as the average stays
/// under the rate.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    burst: usize,
    window: Duration,
    sent: VecDeque<Instant>,
}

impl RateLimiter {
    /// Creates a limiter for `rate` messages per second, `None` for a rate of 0 or below.
    pub fn new(rate: f64) -> Option<Self> {
        if !(rate > 0.0 && rate.is_finite()) {
            return None;
        }
        let burst = rate.floor().max(1.0);
        Some(Self {
            burst: burst as usize,
            window: Duration::from_secs_f64(burst / rate),
            sent: VecDeque::new(),
        })
    }

    /// Returns whether a message may go out at `now`, and counts it if so.
    pub fn allow(&mut self, now: Instant) -> bool {
        if self.sent.len() == self.burst {
            match self.sent.front() {
                Some(oldest) if now.saturating_duration_since(*oldest) >= self.window => {
                    self.sent.pop_front();
                }
                _ => return false,
            }
        }
        self.sent.push_back(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(limiter: &mut RateLimiter, start: Instant, times_ms: &[u64]) -> Vec<bool> {
        times_ms
            .iter()
            .map(|ms| limiter.allow(start + Duration::from_millis(*ms)))
            .collect()
    }

    #[test]
    fn one_per_second_drops_the_rest() {
        let mut limiter = RateLimiter::new(1.0).unwrap();
        let start = Instant::now();
        let got = allowed(&mut limiter, start, &[0, 500, 999, 1000, 1500, 2100]);
        assert_eq!(got, [true, false, false, true, false, true]);
    }

    #[test]
    fn bursts_up_to_the_rate_pass() {
        let mut limiter = RateLimiter::new(5.0).unwrap();
        let start = Instant::now();
        // Five at once pass, the sixth waits until the first is a second old.
        let got = allowed(&mut limiter, start, &[0, 0, 1, 1, 2, 3, 999, 1000]);
        assert_eq!(got, [true, true, true, true, true, false, false, true]);
    }

    #[test]
    fn fractional_rates_keep_their_average() {
        // 2.5 per second: two per 0.8 s.
        let mut limiter = RateLimiter::new(2.5).unwrap();
        let start = Instant::now();
        let got = allowed(&mut limiter, start, &[0, 10, 20, 799, 800, 810, 1600]);
        assert_eq!(got, [true, true, false, false, true, true, true]);
        // 0.5 per second: one per 2 s.
        let mut slow = RateLimiter::new(0.5).unwrap();
        let got = allowed(&mut slow, start, &[0, 1999, 2000]);
        assert_eq!(got, [true, false, true]);
    }

    #[test]
    fn zero_rate_publishes_nothing() {
        assert!(RateLimiter::new(0.0).is_none());
        assert!(RateLimiter::new(f64::NAN).is_none());
    }
}
