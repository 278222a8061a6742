// SPDX-License-Identifier: MIT OR Apache-2.0
//! Alarm events from per-frame decisions: debouncing, hold time, cooldown, and the
//! `start`, `update` and `end` messages of each event.
//!
//! An [`AlarmTracker`] serves one camera. The caller feeds it every scored frame in
//! order as a [`ScoredFrame`]: the frame's decision, its scores, its number and a
//! monotonic timestamp. [`AlarmTracker::observe`] returns the events and the state
//! change, if any, that the frame caused. The tracker reads no clock, starts no thread
//! and does no I/O, so the same input always gives the same output.
//!
//! # Rules
//!
//! The settings are in [`AlarmConfig`]. Frames are the frames fed to the tracker, so
//! with a scoring interval above 1 they are the scored frames only.
//!
//! - **Raise.** With `raise = "consecutive"`, an event starts on the frame that
//!   completes `raise_frames` anomalous frames in a row. With `raise = "median"`, an
//!   event starts on the first frame at which more than half of the last
//!   `raise_frames` frames are anomalous. Frames not yet seen count as normal, so a
//!   window of 5 needs 3 anomalous frames from the start too.
//! - **Median on decisions.** The median rule reads the caller's decisions, not a
//!   score, so it works with whatever threshold and score domain made them. For
//!   decisions of the form `score > threshold`, it equals comparing the median score
//!   with the threshold: the median of an odd window exceeds the threshold exactly
//!   when more than half of the scores do. For an even window, more than half of the
//!   scores exceed the threshold exactly when the lower of the two middle values does.
//! - **Start.** The event begins at the first anomalous frame among those that raised
//!   it, so `start_time`, `peak_*` and `frames` include the frames before the one that
//!   completed the rule.
//! - **Clear.** An event ends on the first frame at which the alarm has been quiet for
//!   at least `clear_after`, counted from the first quiet frame. In consecutive mode a
//!   frame is quiet when it is not anomalous, so any anomalous frame restarts the hold.
//!   In median mode a frame is quiet when the raise rule does not hold on it, so the
//!   window smooths the end of an event as it smooths the start. With `clear_after = 0`
//!   the first quiet frame ends the event.
//! - **Cooldown.** After an event ends, the raise rule starts afresh and ignores frames
//!   until `cooldown` has passed since the end. The first frame at or after
//!   `end_time + cooldown` is the first one that counts, so a defect that persists
//!   through the cooldown raises a new event `raise_frames` frames later.
//! - **Update.** While an event is active, an `update` is sent when the peak has risen
//!   since the last `start` or `update` of the event and at least `update_interval` has
//!   passed since that message. A rise within the interval is sent with the first
//!   frame after the interval ends. An event whose peak does not rise sends no
//!   updates, and `end` always carries the final peak.
//! - **Maximum duration.** Without `max_duration`, an event lasts as long as the
//!   anomaly. With it, an event that has lasted `max_duration` is split on the frame
//!   that reaches it: that frame ends the event and starts a new one with a new id, so
//!   it counts in both. The new event keeps the hold time already counted and no
//!   cooldown applies, so the state stays `anomalous` and a split never changes when
//!   the alarm as a whole clears.
//! - **State.** The state is `anomalous` while an event is active and `ok` otherwise.
//!   [`AlarmOutput::state_change`] reports each change once, for a retained state
//!   topic.
//! - **Peak.** The peak is the frame with the highest log score, the earliest one on a
//!   tie. The raw and normalised scores saturate at 0 and 1 and cannot rank strongly
//!   anomalous frames. A NaN log score ranks below every other value.
//!
//! # Time
//!
//! [`ScoredFrame::time`] is a monotonic time, such as a pipeline's running time,
//! measured from any origin. A timestamp earlier than the previous one is taken as
//! equal to the previous one, so a hold or cooldown never runs backward. The tracker
//! turns monotonic times into wall-clock times with the `wall_origin` given to
//! [`AlarmTracker::new`]: the Unix time, as a [`Duration`] since 1970-01-01 UTC, of
//! monotonic time zero. A caller that measures time with [`std::time::Instant`] from a
//! start instant passes `SystemTime::now().duration_since(UNIX_EPOCH)` taken at that
//! instant. Payload times are therefore free of wall-clock steps during a run.
//!
//! # Payload
//!
//! [`AlarmEvent`] is the JSON message for an events topic. Times are Unix seconds with
//! millisecond precision (rounded down). `end_time` is `null` until the `end` message.
//! The `peak_` fields are the scores of the peak frame, named like the per-frame
//! message: `peak_score` is the raw score. Example of [`AlarmEvent::to_json`] output
//! (one line, shown wrapped):
//!
//! ```json
//! {"type":"end","id":"line-1-1767225600120-1","camera":"line-1",
//!  "start_time":1767225600.12,"end_time":1767225602.64,"peak_score":-0.0067,
//!  "peak_normalized_score":1.0,"peak_log_score":5.0,"peak_time":1767225600.2,
//!  "peak_frame":5,"frames":64}
//! ```
//!
//! Event ids are `<camera>-<start time in Unix milliseconds>-<counter>`, where the
//! counter numbers the events of one tracker from 1. They are unique within a tracker
//! and across trackers with different camera names. A new tracker for the same camera
//! counts from 1 again, so its ids differ from earlier ones only by the start time.
//!
//! # Config
//!
//! Every setting with its default, as a TOML table:
//!
//! ```toml
//! raise = "consecutive"   # or "median"
//! raise_frames = 3        # frames in a row, or the median window (1 to 10000)
//! clear_after = 2.0       # seconds quiet before an event ends
//! cooldown = 0.0          # seconds after an end before a new event may start
//! update_interval = 1.0   # minimum seconds between messages of one event
//! # max_duration = 600.0  # seconds, no length limit when left out
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::scoring::FrameScore;

/// Maximum of [`AlarmConfig::raise_frames`]. It bounds the frames a tracker keeps:
/// 10000 frames are 400 s of video at 25 frames per second.
pub const MAX_RAISE_FRAMES: u32 = 10_000;

/// Rule that starts an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RaiseRule {
    /// `raise_frames` anomalous frames in a row.
    #[default]
    Consecutive,
    /// More than half of the last `raise_frames` frames anomalous.
    Median,
}

/// Alarm settings of one camera. Times are in seconds. See the module documentation
/// for the exact rules.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlarmConfig {
    /// Rule that starts an event.
    pub raise: RaiseRule,
    /// Number of anomalous frames in a row (consecutive) or window size (median).
    pub raise_frames: u32,
    /// Time without anomaly, in seconds, before an event ends.
    pub clear_after: f64,
    /// Time after the end of an event, in seconds, before the next one may start.
    pub cooldown: f64,
    /// Minimum time between two messages of one event, in seconds.
    pub update_interval: f64,
    /// Length, in seconds, at which an event is split. `None` sets no limit.
    pub max_duration: Option<f64>,
}

impl Default for AlarmConfig {
    fn default() -> Self {
        Self {
            raise: RaiseRule::Consecutive,
            raise_frames: 3,
            clear_after: 2.0,
            cooldown: 0.0,
            update_interval: 1.0,
            max_duration: None,
        }
    }
}

/// One invalid setting: its name, its value and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidField {
    pub field: &'static str,
    pub value: String,
    pub reason: String,
}

impl fmt::Display for InvalidField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.field, self.value, self.reason)
    }
}

/// An alarm config that cannot be used, with every invalid setting.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid alarm config:\n  {}", problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  "))]
pub struct AlarmConfigError {
    pub problems: Vec<InvalidField>,
}

/// Validated settings with times as durations.
#[derive(Debug, Clone, Copy)]
struct Settings {
    raise: RaiseRule,
    raise_frames: usize,
    clear_after: Duration,
    cooldown: Duration,
    update_interval: Duration,
    max_duration: Option<Duration>,
}

impl AlarmConfig {
    /// Checks every setting and returns the invalid ones, none for a valid config.
    pub fn validate(&self) -> Vec<InvalidField> {
        self.settings().err().unwrap_or_default()
    }

    fn settings(&self) -> Result<Settings, Vec<InvalidField>> {
        let mut problems = Vec::new();
        if !(1..=MAX_RAISE_FRAMES).contains(&self.raise_frames) {
            problems.push(InvalidField {
                field: "raise_frames",
                value: self.raise_frames.to_string(),
                reason: format!("must be from 1 to {MAX_RAISE_FRAMES} frames"),
            });
        }
        let clear_after = seconds("clear_after", self.clear_after, &mut problems);
        let cooldown = seconds("cooldown", self.cooldown, &mut problems);
        let update_interval = seconds("update_interval", self.update_interval, &mut problems);
        let max_duration = self.max_duration.and_then(|value| {
            let duration = Duration::try_from_secs_f64(value)
                .ok()
                .filter(|duration| !duration.is_zero());
            if duration.is_none() {
                problems.push(InvalidField {
                    field: "max_duration",
                    value: value.to_string(),
                    reason: "must be a finite number of seconds above 0, or left out for events without a length limit".into(),
                });
            }
            duration
        });
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Settings {
            raise: self.raise,
            raise_frames: self.raise_frames as usize,
            clear_after: clear_after.unwrap_or_default(),
            cooldown: cooldown.unwrap_or_default(),
            update_interval: update_interval.unwrap_or_default(),
            max_duration,
        })
    }
}

/// Converts a setting in seconds, or records why it is invalid.
fn seconds(field: &'static str, value: f64, problems: &mut Vec<InvalidField>) -> Option<Duration> {
    match Duration::try_from_secs_f64(value) {
        Ok(duration) => Some(duration),
        Err(_) => {
            problems.push(InvalidField {
                field,
                value: value.to_string(),
                reason: "must be a finite number of seconds, 0 or more".into(),
            });
            None
        }
    }
}

/// Image scores of one frame, as in [`FrameScore`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scores {
    /// Raw score, in [-1, 0].
    pub score: f32,
    /// Normalised score, in [0, 1].
    pub normalized_score: f32,
    /// Log score, in [0, inf).
    pub log_score: f32,
}

impl From<&FrameScore> for Scores {
    fn from(frame: &FrameScore) -> Self {
        Self {
            score: frame.score,
            normalized_score: frame.normalized_score,
            log_score: frame.log_score,
        }
    }
}

/// One scored frame, the input of [`AlarmTracker::observe`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoredFrame {
    /// Monotonic time of the frame, as the module documentation describes.
    pub time: Duration,
    /// Frame number, reported as `peak_frame`.
    pub frame: u64,
    /// The caller's decision for this frame.
    pub is_anomalous: bool,
    pub scores: Scores,
}

/// Alarm state of a camera, for a retained state topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AlarmState {
    #[default]
    Ok,
    Anomalous,
}

impl AlarmState {
    /// Lower-case name, used as the state topic's payload.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Anomalous => "anomalous",
        }
    }
}

impl fmt::Display for AlarmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Kind of an event message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Start,
    Update,
    End,
}

/// Message about one event, published as JSON. The module documentation has an example.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlarmEvent {
    #[serde(rename = "type")]
    pub kind: EventKind,
    /// `<camera>-<start time in Unix milliseconds>-<counter>`.
    pub id: String,
    pub camera: String,
    /// Time of the event's first frame, in Unix seconds.
    pub start_time: f64,
    /// Time of the frame that ended the event, in Unix seconds. `None` before the end.
    pub end_time: Option<f64>,
    /// Raw score of the peak frame.
    pub peak_score: f32,
    /// Normalised score of the peak frame.
    pub peak_normalized_score: f32,
    /// Log score of the peak frame, the score that ranks frames.
    pub peak_log_score: f32,
    /// Time of the peak frame, in Unix seconds.
    pub peak_time: f64,
    /// Frame number of the peak frame.
    pub peak_frame: u64,
    /// Number of frames from the event's first frame to the latest one, both included.
    pub frames: u64,
    /// Path of the event's latest snapshot file, when snapshots are saved. Left out of
    /// the JSON when there is none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
}

impl AlarmEvent {
    /// Serialises the message as compact JSON. Non-finite scores are written as `null`.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("AlarmEvent has only strings, numbers and options")
    }
}

/// Event messages and state change caused by one frame.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AlarmOutput {
    /// Event messages in the order they happened. A split gives `end` then `start`.
    pub events: Vec<AlarmEvent>,
    /// The new state when this frame changed it.
    pub state_change: Option<AlarmState>,
}

impl AlarmOutput {
    /// Tells whether the frame caused neither an event message nor a state change.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.state_change.is_none()
    }
}

/// A frame as the tracker keeps it.
#[derive(Debug, Clone, Copy)]
struct Record {
    time: Duration,
    frame: u64,
    is_anomalous: bool,
    scores: Scores,
}

impl From<&ScoredFrame> for Record {
    fn from(frame: &ScoredFrame) -> Self {
        Self {
            time: frame.time,
            frame: frame.frame,
            is_anomalous: frame.is_anomalous,
            scores: frame.scores,
        }
    }
}

/// Tells whether `candidate` ranks above the current `peak`. NaN ranks lowest.
fn outranks(candidate: &Scores, peak: &Scores) -> bool {
    let rank = |log: f32| if log.is_nan() { f32::NEG_INFINITY } else { log };
    rank(candidate.log_score) > rank(peak.log_score)
}

/// The event in progress.
#[derive(Debug, Clone)]
struct ActiveEvent {
    id: String,
    start: Duration,
    peak: Record,
    frames: u64,
    /// Time of the first quiet frame of the current hold, `None` while not quiet.
    quiet_since: Option<Duration>,
    /// Time of the latest `start` or `update` message.
    last_message: Duration,
    /// Whether the peak rose after the latest `start` or `update` message.
    peak_unsent: bool,
}

/// Turns one camera's per-frame decisions into events and state changes.
#[derive(Debug, Clone)]
pub struct AlarmTracker {
    camera: String,
    settings: Settings,
    wall_origin: Duration,
    /// Latest frame time, after clamping.
    last_time: Option<Duration>,
    /// Frames that the raise rule evaluates: at most `raise_frames`, newest last.
    recent: VecDeque<Record>,
    anomalous_in_recent: usize,
    active: Option<ActiveEvent>,
    /// End time of the latest event, which starts the cooldown.
    last_end: Option<Duration>,
    /// Number of events started so far.
    started: u64,
}

impl AlarmTracker {
    /// Creates a tracker for `camera`. `wall_origin` is the Unix time of monotonic
    /// time zero, as the module documentation describes.
    pub fn new(
        camera: impl Into<String>,
        config: &AlarmConfig,
        wall_origin: Duration,
    ) -> Result<Self, AlarmConfigError> {
        let settings = config
            .settings()
            .map_err(|problems| AlarmConfigError { problems })?;
        Ok(Self {
            camera: camera.into(),
            settings,
            wall_origin,
            last_time: None,
            recent: VecDeque::with_capacity(settings.raise_frames),
            anomalous_in_recent: 0,
            active: None,
            last_end: None,
            started: 0,
        })
    }

    pub fn camera(&self) -> &str {
        &self.camera
    }

    /// Current state: `Anomalous` while an event is active.
    pub fn state(&self) -> AlarmState {
        if self.active.is_some() {
            AlarmState::Anomalous
        } else {
            AlarmState::Ok
        }
    }

    /// Replaces the settings, keeping the active event and the frames seen so far. With
    /// fewer `raise_frames` than before, only the newest frames stay in the raise rule's
    /// window. An invalid config leaves the tracker unchanged.
    pub fn reconfigure(&mut self, config: &AlarmConfig) -> Result<(), AlarmConfigError> {
        let settings = config
            .settings()
            .map_err(|problems| AlarmConfigError { problems })?;
        while self.recent.len() > settings.raise_frames {
            if let Some(oldest) = self.recent.pop_front()
                && oldest.is_anomalous
            {
                self.anomalous_in_recent -= 1;
            }
        }
        self.settings = settings;
        Ok(())
    }

    /// Frame number of the active event's peak frame, if an event is active.
    pub fn active_peak_frame(&self) -> Option<u64> {
        self.active.as_ref().map(|event| event.peak.frame)
    }

    /// Id of the active event, if any.
    pub fn active_event_id(&self) -> Option<&str> {
        self.active.as_ref().map(|event| event.id.as_str())
    }

    /// Feeds one frame and returns the events and state change it caused.
    pub fn observe(&mut self, frame: &ScoredFrame) -> AlarmOutput {
        let mut record = Record::from(frame);
        record.time = self.clamp(frame.time);
        let now = record.time;

        let in_cooldown = self.active.is_none()
            && self
                .last_end
                .is_some_and(|end| now - end < self.settings.cooldown);
        if !in_cooldown {
            self.push(record);
        }
        let rule_holds = self.rule_holds();

        let mut output = AlarmOutput::default();
        if self.active.is_some() {
            self.continue_event(record, rule_holds, &mut output);
        } else if rule_holds {
            let event = self.start_event(now);
            output
                .events
                .push(self.message(EventKind::Start, &event, None));
            output.state_change = Some(AlarmState::Anomalous);
            self.active = Some(event);
        }
        output
    }

    /// Ends the active event, if any, at `time`: for the end of a stream or a stop.
    pub fn finish(&mut self, time: Duration) -> AlarmOutput {
        let now = self.clamp(time);
        let mut output = AlarmOutput::default();
        if let Some(event) = self.active.take() {
            output
                .events
                .push(self.message(EventKind::End, &event, Some(now)));
            output.state_change = Some(AlarmState::Ok);
            self.reset_rule(now);
        }
        output
    }

    /// Returns `time`, or the previous frame's time when `time` is earlier.
    fn clamp(&mut self, time: Duration) -> Duration {
        let now = self.last_time.map_or(time, |last| time.max(last));
        self.last_time = Some(now);
        now
    }

    fn push(&mut self, record: Record) {
        if self.recent.len() == self.settings.raise_frames
            && let Some(oldest) = self.recent.pop_front()
            && oldest.is_anomalous
        {
            self.anomalous_in_recent -= 1;
        }
        if record.is_anomalous {
            self.anomalous_in_recent += 1;
        }
        self.recent.push_back(record);
    }

    fn rule_holds(&self) -> bool {
        match self.settings.raise {
            RaiseRule::Consecutive => self.anomalous_in_recent == self.settings.raise_frames,
            RaiseRule::Median => 2 * self.anomalous_in_recent > self.settings.raise_frames,
        }
    }

    /// Starts the raise rule afresh after an event ended at `end`.
    fn reset_rule(&mut self, end: Duration) {
        self.recent.clear();
        self.anomalous_in_recent = 0;
        self.last_end = Some(end);
    }

    /// Builds the event that the frames in `recent` raised: it begins at their first
    /// anomalous frame.
    fn start_event(&mut self, now: Duration) -> ActiveEvent {
        let first = self
            .recent
            .iter()
            .position(|record| record.is_anomalous)
            .expect("the raise rule holds only with an anomalous frame");
        let mut peak = self.recent[first];
        for record in self.recent.range(first + 1..) {
            if outranks(&record.scores, &peak.scores) {
                peak = *record;
            }
        }
        let start = self.recent[first].time;
        self.new_event(start, peak, (self.recent.len() - first) as u64, now)
    }

    fn new_event(
        &mut self,
        start: Duration,
        peak: Record,
        frames: u64,
        now: Duration,
    ) -> ActiveEvent {
        self.started += 1;
        ActiveEvent {
            id: format!("{}-{}-{}", self.camera, self.unix_ms(start), self.started),
            start,
            peak,
            frames,
            quiet_since: None,
            last_message: now,
            peak_unsent: false,
        }
    }

    /// Adds a frame to the active event and decides whether it ends, splits or
    /// needs an update.
    fn continue_event(&mut self, record: Record, rule_holds: bool, output: &mut AlarmOutput) {
        let now = record.time;
        let settings = self.settings;
        let mut event = self.active.take().expect("called with an active event");
        event.frames += 1;
        if outranks(&record.scores, &event.peak.scores) {
            event.peak = record;
            event.peak_unsent = true;
        }

        let quiet = match settings.raise {
            RaiseRule::Consecutive => !record.is_anomalous,
            RaiseRule::Median => !rule_holds,
        };
        event.quiet_since = if quiet {
            Some(event.quiet_since.unwrap_or(now))
        } else {
            None
        };

        if event
            .quiet_since
            .is_some_and(|since| now - since >= settings.clear_after)
        {
            output
                .events
                .push(self.message(EventKind::End, &event, Some(now)));
            output.state_change = Some(AlarmState::Ok);
            self.reset_rule(now);
            return;
        }

        if settings
            .max_duration
            .is_some_and(|max| now - event.start >= max)
        {
            output
                .events
                .push(self.message(EventKind::End, &event, Some(now)));
            let mut next = self.new_event(now, record, 1, now);
            next.quiet_since = event.quiet_since;
            output
                .events
                .push(self.message(EventKind::Start, &next, None));
            self.active = Some(next);
            return;
        }

        if event.peak_unsent && now - event.last_message >= settings.update_interval {
            output
                .events
                .push(self.message(EventKind::Update, &event, None));
            event.last_message = now;
            event.peak_unsent = false;
        }
        self.active = Some(event);
    }

    fn unix_ms(&self, time: Duration) -> u64 {
        let millis = self.wall_origin.saturating_add(time).as_millis();
        u64::try_from(millis).unwrap_or(u64::MAX)
    }

    fn unix_seconds(&self, time: Duration) -> f64 {
        self.unix_ms(time) as f64 / 1000.0
    }

    fn message(&self, kind: EventKind, event: &ActiveEvent, end: Option<Duration>) -> AlarmEvent {
        AlarmEvent {
            kind,
            id: event.id.clone(),
            camera: self.camera.clone(),
            start_time: self.unix_seconds(event.start),
            end_time: end.map(|time| self.unix_seconds(time)),
            peak_score: event.peak.scores.score,
            peak_normalized_score: event.peak.scores.normalized_score,
            peak_log_score: event.peak.scores.log_score,
            peak_time: self.unix_seconds(event.peak.time),
            peak_frame: event.peak.frame,
            frames: event.frames,
            snapshot: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unix time of monotonic time zero in the tests: 2026-01-01T00:00:00Z.
    const WALL_ORIGIN_MS: u64 = 1_767_225_600_000;

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    /// Payload time of the monotonic time `millis`.
    fn unix(millis: u64) -> f64 {
        (WALL_ORIGIN_MS + millis) as f64 / 1000.0
    }

    fn scores(log_score: f32) -> Scores {
        Scores {
            score: -(-log_score).exp(),
            normalized_score: (log_score / 4.0).min(1.0),
            log_score,
        }
    }

    fn config(raise: RaiseRule, raise_frames: u32, clear_after: f64) -> AlarmConfig {
        AlarmConfig {
            raise,
            raise_frames,
            clear_after,
            cooldown: 0.0,
            update_interval: 1.0,
            max_duration: None,
        }
    }

    /// A tracker on a fake clock, with every non-empty output and the frame that caused
    /// it. Frames are numbered from 0 in the order they are fed.
    struct Harness {
        tracker: AlarmTracker,
        clock: Duration,
        next_frame: u64,
        outputs: Vec<(u64, AlarmOutput)>,
    }

    impl Harness {
        fn new(config: &AlarmConfig) -> Self {
            Self {
                tracker: AlarmTracker::new("line-1", config, ms(WALL_ORIGIN_MS)).unwrap(),
                clock: Duration::ZERO,
                next_frame: 0,
                outputs: Vec::new(),
            }
        }

        /// Feeds one frame at `millis` on the fake clock.
        fn at(&mut self, millis: u64, is_anomalous: bool, log_score: f32) {
            self.clock = ms(millis);
            self.frame(is_anomalous, log_score);
        }

        fn frame(&mut self, is_anomalous: bool, log_score: f32) {
            let frame = ScoredFrame {
                time: self.clock,
                frame: self.next_frame,
                is_anomalous,
                scores: scores(log_score),
            };
            let output = self.tracker.observe(&frame);
            if !output.is_empty() {
                self.outputs.push((self.next_frame, output));
            }
            self.next_frame += 1;
        }

        /// Feeds one frame per character, `step_ms` apart, starting at the current
        /// clock: `.` is normal with log score 0.5, `x` anomalous with log score 2 and a
        /// digit anomalous with that log score. Spaces are skipped.
        fn feed(&mut self, pattern: &str, step_ms: u64) {
            for c in pattern.chars().filter(|c| *c != ' ') {
                match c {
                    '.' => self.frame(false, 0.5),
                    'x' => self.frame(true, 2.0),
                    digit => {
                        let value = digit.to_digit(10).expect("pattern characters are . x 0-9");
                        self.frame(true, value as f32);
                    }
                }
                self.clock += ms(step_ms);
            }
        }

        fn finish(&mut self, millis: u64) -> AlarmOutput {
            self.tracker.finish(ms(millis))
        }

        /// (frame fed, kind) of every event message.
        fn kinds(&self) -> Vec<(u64, EventKind)> {
            self.outputs
                .iter()
                .flat_map(|(frame, output)| output.events.iter().map(|e| (*frame, e.kind)))
                .collect()
        }

        fn events(&self) -> Vec<&AlarmEvent> {
            self.outputs
                .iter()
                .flat_map(|(_, output)| output.events.iter())
                .collect()
        }

        /// (frame fed, new state) of every state change.
        fn states(&self) -> Vec<(u64, AlarmState)> {
            self.outputs
                .iter()
                .filter_map(|(frame, output)| output.state_change.map(|s| (*frame, s)))
                .collect()
        }
    }

    use AlarmState::{Anomalous, Ok as Clear};
    use EventKind::{End, Start, Update};

    #[test]
    fn defect_amid_noise_raises_once() {
        let mut h = Harness::new(&config(RaiseRule::Consecutive, 3, 0.5));
        // Frames 40 ms apart: spikes at 4 and 11, the defect at 20-25 (peak at 23), a
        // spike at 29 inside the hold, then normal frames up to 59.
        h.feed("....x......x........", 40);
        h.feed("345654", 40);
        h.feed("...x", 40);
        h.feed(&".".repeat(30), 40);

        assert_eq!(h.kinds(), vec![(22, Start), (43, End)]);
        assert_eq!(h.states(), vec![(22, Anomalous), (43, Clear)]);
        let events = h.events();
        let start = events[0];
        assert_eq!(start.start_time, unix(800));
        assert_eq!(start.frames, 3);
        assert_eq!(start.peak_frame, 22);
        // The hold restarts at the spike on frame 29 and ends 500 ms after frame 30.
        let end = events[1];
        assert_eq!(end.id, start.id);
        assert_eq!(end.start_time, unix(800));
        assert_eq!(end.end_time, Some(unix(1720)));
        assert_eq!(end.frames, 24);
        assert_eq!(end.peak_frame, 23);
        assert_eq!(end.peak_time, unix(920));
        assert_eq!(end.peak_log_score, 6.0);
    }

    #[test]
    fn reconfigure_keeps_the_active_event() {
        let mut h = Harness::new(&config(RaiseRule::Consecutive, 3, 0.5));
        h.feed("xxx", 40);
        assert_eq!(h.kinds(), vec![(2, Start)]);
        // A longer hold applies to the running event: 400 ms of quiet no longer ends it.
        h.tracker
            .reconfigure(&config(RaiseRule::Consecutive, 3, 1.0))
            .unwrap();
        h.feed("..........", 40);
        assert_eq!(h.kinds(), vec![(2, Start)]);
        h.feed(&".".repeat(20), 40);
        assert_eq!(h.kinds(), vec![(2, Start), (28, End)]);
        assert_eq!(h.events()[1].id, h.events()[0].id);
    }

    #[test]
    fn reconfigure_shrinks_the_raise_window() {
        let mut h = Harness::new(&config(RaiseRule::Consecutive, 5, 0.5));
        h.feed(".xx", 40);
        // Two anomalous frames are already in the window, so a third raises with 3.
        h.tracker
            .reconfigure(&config(RaiseRule::Consecutive, 3, 0.5))
            .unwrap();
        h.feed("x", 40);
        assert_eq!(h.kinds(), vec![(3, Start)]);
        assert_eq!(h.events()[0].frames, 3);
    }

    #[test]
    fn reconfigure_rejects_invalid_settings() {
        let mut h = Harness::new(&config(RaiseRule::Consecutive, 3, 0.5));
        let error = h
            .tracker
            .reconfigure(&config(RaiseRule::Consecutive, 0, 0.5))
            .unwrap_err();
        assert_eq!(error.problems[0].field, "raise_frames");
        // The old settings still apply.
        h.feed("xxx", 40);
        assert_eq!(h.kinds(), vec![(2, Start)]);
    }

    #[test]
    fn single_spikes_never_raise() {
        for pattern in ["x.x.x.x.x", "xx.xx.xx.", ".x..xx...xx.x", "9.9.9.9"] {
            let mut h = Harness::new(&config(RaiseRule::Consecutive, 3, 0.5));
            h.feed(pattern, 40);
            assert!(h.outputs.is_empty(), "{pattern}: {:?}", h.kinds());
            assert_eq!(h.tracker.state(), Clear, "{pattern}");
        }
        let mut h = Harness::new(&config(RaiseRule::Consecutive, 3, 0.5));
        h.feed("x.xxx", 40);
        assert_eq!(h.kinds(), vec![(4, Start)]);
    }

    #[test]
    fn start_includes_raising_frames() {
        let mut h = Harness::new(&config(RaiseRule::Consecutive, 3, 0.5));
        h.feed("..395", 100);
        assert_eq!(h.kinds(), vec![(4, Start)]);
        let start = h.events()[0];
        assert_eq!(start.start_time, unix(200));
        assert_eq!(start.frames, 3);
        assert_eq!(start.peak_frame, 3);
        assert_eq!(start.peak_time, unix(300));
        assert_eq!(start.peak_log_score, 9.0);
    }

    #[test]
    fn median_raises_on_window_majority() {
        /// Frame that raises the event, the event's first frame and its frame count.
        type Raised = Option<(u64, u64, u64)>;
        let cases: [(u32, &str, Raised); 8] = [
            (5, "x.x.x", Some((4, 0, 5))),
            (5, "x..x..x..x..x..x", None),
            (5, "xx", None),
            (5, "..xxx", Some((4, 2, 3))),
            (4, "x.x.x.x", None),
            (4, "xx.x", Some((3, 0, 4))),
            (3, "x.x", Some((2, 0, 3))),
            (1, "..x", Some((2, 2, 1))),
        ];
        for (window, pattern, expected) in cases {
            let mut h = Harness::new(&config(RaiseRule::Median, window, 0.5));
            h.feed(pattern, 40);
            let seen = h
                .outputs
                .first()
                .map(|(frame, output)| (*frame, &output.events[0]));
            match (expected, seen) {
                (None, None) => {}
                (Some((frame, first, frames)), Some((raised_at, event))) => {
                    assert_eq!(raised_at, frame, "W={window} {pattern}");
                    assert_eq!(event.kind, Start, "W={window} {pattern}");
                    assert_eq!(event.start_time, unix(first * 40), "W={window} {pattern}");
                    assert_eq!(event.frames, frames, "W={window} {pattern}");
                }
                (expected, seen) => {
                    panic!("W={window} {pattern}: expected {expected:?}, got {seen:?}")
                }
            }
        }
    }

    #[test]
    fn median_clears_on_window_minority() {
        let mut h = Harness::new(&config(RaiseRule::Median, 3, 0.0));
        // Frame 3 is normal and frame 4 anomalous, but the window keeps a majority until
        // frame 5. The end resets the window, so frames 6-8 raise anew.
        h.feed("xxx.x.x.x", 100);
        assert_eq!(h.kinds(), vec![(1, Start), (5, End), (8, Start)]);
        assert_eq!(h.events()[2].start_time, unix(600));
    }

    #[test]
    fn hold_ends_at_exactly_clear_after() {
        // (time of the second quiet frame after the first one at 100 ms, end expected)
        for (quiet_ms, ends) in [(999, false), (1000, true), (1001, true)] {
            let mut h = Harness::new(&config(RaiseRule::Consecutive, 1, 1.0));
            h.at(0, true, 2.0);
            h.at(100, false, 0.5);
            h.at(100 + quiet_ms, false, 0.5);
            let expected = if ends {
                vec![(0, Start), (2, End)]
            } else {
                vec![(0, Start)]
            };
            assert_eq!(h.kinds(), expected, "quiet for {quiet_ms} ms");
            if ends {
                assert_eq!(
                    h.events()[1].end_time,
                    Some(unix(100 + quiet_ms)),
                    "quiet for {quiet_ms} ms"
                );
            }
        }
        // The same boundary crossed one frame at a time.
        let mut h = Harness::new(&config(RaiseRule::Consecutive, 1, 1.0));
        h.at(0, true, 2.0);
        h.at(100, false, 0.5);
        h.at(1099, false, 0.5);
        assert_eq!(h.tracker.state(), Anomalous);
        h.at(1100, false, 0.5);
        assert_eq!(h.kinds(), vec![(0, Start), (3, End)]);
        assert_eq!(h.events()[1].end_time, Some(unix(1100)));
    }

    #[test]
    fn short_dips_do_not_end() {
        let mut h = Harness::new(&config(RaiseRule::Consecutive, 1, 1.0));
        // Dips of 9 frames (800 ms from the first quiet frame to the last) twice, then
        // 11 quiet frames, which reach 1000 ms on the last one.
        h.feed("xxx .........", 100);
        h.feed("xx .........", 100);
        h.feed("x ...........", 100);
        assert_eq!(h.kinds(), vec![(0, Start), (34, End)]);
        assert_eq!(h.states(), vec![(0, Anomalous), (34, Clear)]);
        assert_eq!(h.events()[1].end_time, Some(unix(3400)));
    }

    #[test]
    fn cooldown_suppresses_then_allows() {
        let mut cfg = config(RaiseRule::Consecutive, 1, 0.0);
        cfg.cooldown = 2.0;
        let mut h = Harness::new(&cfg);
        h.at(0, true, 2.0);
        h.at(100, false, 0.5);
        h.at(2099, true, 2.0);
        assert_eq!(h.kinds(), vec![(0, Start), (1, End)]);
        h.at(2100, true, 2.0);
        assert_eq!(h.kinds(), vec![(0, Start), (1, End), (3, Start)]);
        assert_eq!(h.events()[2].start_time, unix(2100));
        assert_eq!(h.states(), vec![(0, Anomalous), (1, Clear), (3, Anomalous)]);
    }

    #[test]
    fn cooldown_restarts_raise_count() {
        let mut cfg = config(RaiseRule::Consecutive, 3, 0.0);
        cfg.cooldown = 1.0;
        let mut h = Harness::new(&cfg);
        // Ends on frame 3 at 300 ms. The defect is back at 400 ms, but only the frames
        // from 1300 ms on count, so the third of them (frame 15) raises.
        h.feed("xxx.", 100);
        h.feed(&"x".repeat(15), 100);
        assert_eq!(h.kinds(), vec![(2, Start), (3, End), (15, Start)]);
        let restart = h.events()[2];
        assert_eq!(restart.start_time, unix(1300));
        assert_eq!(restart.frames, 3);
    }

    #[test]
    fn updates_are_rate_limited() {
        let mut cfg = config(RaiseRule::Consecutive, 1, 10.0);
        cfg.update_interval = 1.0;
        let mut h = Harness::new(&cfg);
        // Peaks: 2 on frame 1, 3 on frame 11, 5 on frame 15, then flat.
        h.feed("12 111111111 3 111 5", 100);
        h.feed(&"1".repeat(25), 100);
        assert_eq!(h.kinds(), vec![(0, Start), (10, Update), (20, Update)]);
        let events = h.events();
        assert_eq!(events[1].peak_log_score, 2.0);
        assert_eq!(events[1].peak_frame, 1);
        assert_eq!(events[1].end_time, None);
        assert_eq!(events[2].peak_log_score, 5.0);
        assert_eq!(events[2].peak_frame, 15);
        assert_eq!(events[2].frames, 21);
        let end = h.finish(4100);
        assert_eq!(end.events.len(), 1);
        assert_eq!(end.events[0].kind, End);
        assert_eq!(end.events[0].peak_log_score, 5.0);
    }

    #[test]
    fn zero_update_interval_sends_every_rise() {
        let mut cfg = config(RaiseRule::Consecutive, 1, 10.0);
        cfg.update_interval = 0.0;
        let mut h = Harness::new(&cfg);
        h.feed("121311", 100);
        assert_eq!(h.kinds(), vec![(0, Start), (1, Update), (3, Update)]);
        assert_eq!(h.events()[2].peak_log_score, 3.0);
    }

    #[test]
    fn state_changes_once_and_ids_are_unique() {
        let mut h = Harness::new(&config(RaiseRule::Consecutive, 2, 0.2));
        h.feed("xx... xx... xx...", 100);
        assert_eq!(
            h.states(),
            vec![
                (1, Anomalous),
                (4, Clear),
                (6, Anomalous),
                (9, Clear),
                (11, Anomalous),
                (14, Clear)
            ]
        );
        let ids: Vec<&str> = h.events().iter().map(|e| e.id.as_str()).collect();
        assert_eq!(
            ids,
            vec![
                "line-1-1767225600000-1",
                "line-1-1767225600000-1",
                "line-1-1767225600500-2",
                "line-1-1767225600500-2",
                "line-1-1767225601000-3",
                "line-1-1767225601000-3",
            ]
        );
        assert_eq!(h.tracker.active_event_id(), None);
    }

    #[test]
    fn ids_stay_unique_within_one_millisecond() {
        let mut h = Harness::new(&config(RaiseRule::Consecutive, 1, 0.0));
        // Timestamps that do not advance: every event starts at the same millisecond.
        h.feed("x.x.x.", 0);
        let mut ids: Vec<&str> = h.events().iter().map(|e| e.id.as_str()).collect();
        ids.dedup();
        assert_eq!(ids.len(), 3);
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 3);
    }

    #[test]
    fn edge_configs_act_on_one_frame() {
        // raise_frames 1, clear_after 0 and cooldown 0: every change of decision is a
        // change of state.
        let mut h = Harness::new(&config(RaiseRule::Consecutive, 1, 0.0));
        h.feed("x.x.x", 40);
        assert_eq!(
            h.kinds(),
            vec![(0, Start), (1, End), (2, Start), (3, End), (4, Start)]
        );
        assert_eq!(
            h.states(),
            vec![
                (0, Anomalous),
                (1, Clear),
                (2, Anomalous),
                (3, Clear),
                (4, Anomalous)
            ]
        );
        let end = h.events()[1];
        assert_eq!(end.end_time, Some(unix(40)));
        assert_eq!(end.frames, 2);
    }

    #[test]
    fn max_duration_splits_event() {
        let mut cfg = config(RaiseRule::Consecutive, 1, 0.5);
        cfg.max_duration = Some(1.0);
        let mut h = Harness::new(&cfg);
        h.feed(&"x".repeat(25), 100);
        h.feed("......", 100);
        assert_eq!(
            h.kinds(),
            vec![
                (0, Start),
                (10, End),
                (10, Start),
                (20, End),
                (20, Start),
                (30, End)
            ]
        );
        assert_eq!(h.states(), vec![(0, Anomalous), (30, Clear)]);
        let events = h.events();
        assert_eq!(events[1].end_time, Some(unix(1000)));
        assert_eq!(events[1].frames, 11);
        assert_eq!(events[2].start_time, unix(1000));
        assert_eq!(events[2].frames, 1);
        assert_ne!(events[1].id, events[2].id);
        assert_eq!(events[5].id, events[4].id);
        assert_eq!(events[5].end_time, Some(unix(3000)));
    }

    #[test]
    fn split_keeps_hold_time() {
        let mut cfg = config(RaiseRule::Consecutive, 1, 0.5);
        cfg.max_duration = Some(1.0);
        let mut h = Harness::new(&cfg);
        // Quiet from 800 ms. The split at 1000 ms must not restart the hold.
        h.feed("xxxxxxxx......", 100);
        assert_eq!(
            h.kinds(),
            vec![(0, Start), (10, End), (10, Start), (13, End)]
        );
        assert_eq!(h.events()[3].end_time, Some(unix(1300)));
    }

    #[test]
    fn finish_ends_active_event() {
        let mut h = Harness::new(&config(RaiseRule::Consecutive, 1, 1.0));
        h.feed("x9", 100);
        let output = h.finish(5000);
        assert_eq!(output.state_change, Some(Clear));
        assert_eq!(output.events.len(), 1);
        assert_eq!(output.events[0].kind, End);
        assert_eq!(output.events[0].end_time, Some(unix(5000)));
        assert_eq!(output.events[0].frames, 2);
        assert_eq!(output.events[0].peak_frame, 1);
        assert!(h.finish(6000).is_empty());
        assert_eq!(h.tracker.state(), Clear);
    }

    #[test]
    fn earlier_timestamp_counts_as_previous() {
        let mut h = Harness::new(&config(RaiseRule::Consecutive, 1, 1.0));
        h.at(0, true, 2.0);
        h.at(500, false, 0.5);
        h.at(200, false, 0.5);
        h.at(1499, false, 0.5);
        assert_eq!(h.kinds(), vec![(0, Start)]);
        h.at(1500, false, 0.5);
        assert_eq!(h.kinds(), vec![(0, Start), (4, End)]);
        assert_eq!(h.events()[1].end_time, Some(unix(1500)));
    }

    #[test]
    fn peak_ranks_by_log_score() {
        let mut h = Harness::new(&config(RaiseRule::Consecutive, 1, 10.0));
        let mut feed = |time: u64, log_score: f32| {
            let frame = ScoredFrame {
                time: ms(time),
                frame: time / 100,
                is_anomalous: true,
                // Normalised and raw scores saturated on every frame.
                scores: Scores {
                    score: 0.0,
                    normalized_score: 1.0,
                    log_score,
                },
            };
            h.tracker.observe(&frame);
        };
        feed(0, f32::NAN);
        feed(100, 120.0);
        feed(200, 150.0);
        feed(300, 150.0);
        feed(400, f32::NAN);
        feed(500, 130.0);
        let end = h.finish(600);
        assert_eq!(end.events[0].peak_frame, 2);
        assert_eq!(end.events[0].peak_log_score, 150.0);
    }

    #[test]
    fn payload_json_is_stable() {
        let mut tracker = AlarmTracker::new(
            "line-1",
            &config(RaiseRule::Consecutive, 1, 0.0),
            ms(WALL_ORIGIN_MS),
        )
        .unwrap();
        let frame = |time: u64, frame: u64, is_anomalous: bool, scores: Scores| ScoredFrame {
            time: ms(time),
            frame,
            is_anomalous,
            scores,
        };
        let peak = Scores {
            score: -0.0067,
            normalized_score: 1.0,
            log_score: 5.0,
        };
        let start = tracker.observe(&frame(120, 3, true, peak));
        let end = tracker.observe(&frame(240, 4, false, scores(0.5)));
        assert_eq!(
            String::from_utf8(start.events[0].to_json()).unwrap(),
            concat!(
                r#"{"type":"start","id":"line-1-1767225600120-1","camera":"line-1","#,
                r#""start_time":1767225600.12,"end_time":null,"peak_score":-0.0067,"#,
                r#""peak_normalized_score":1.0,"peak_log_score":5.0,"#,
                r#""peak_time":1767225600.12,"peak_frame":3,"frames":1}"#
            )
        );
        assert_eq!(
            String::from_utf8(end.events[0].to_json()).unwrap(),
            concat!(
                r#"{"type":"end","id":"line-1-1767225600120-1","camera":"line-1","#,
                r#""start_time":1767225600.12,"end_time":1767225600.24,"peak_score":-0.0067,"#,
                r#""peak_normalized_score":1.0,"peak_log_score":5.0,"#,
                r#""peak_time":1767225600.12,"peak_frame":3,"frames":2}"#
            )
        );
        assert_eq!(start.state_change.map(AlarmState::name), Some("anomalous"));
        assert_eq!(end.state_change.map(AlarmState::name), Some("ok"));
    }

    #[test]
    fn validation_lists_every_problem() {
        let config = AlarmConfig {
            raise: RaiseRule::Median,
            raise_frames: 0,
            clear_after: -1.0,
            cooldown: f64::NAN,
            update_interval: f64::INFINITY,
            max_duration: Some(0.0),
        };
        let problems = config.validate();
        let fields: Vec<&str> = problems.iter().map(|p| p.field).collect();
        assert_eq!(
            fields,
            vec![
                "raise_frames",
                "clear_after",
                "cooldown",
                "update_interval",
                "max_duration"
            ]
        );
        assert_eq!(
            problems[0].to_string(),
            "raise_frames 0: must be from 1 to 10000 frames"
        );
        assert_eq!(
            problems[1].to_string(),
            "clear_after -1: must be a finite number of seconds, 0 or more"
        );
        assert_eq!(problems[2].value, "NaN");
        assert_eq!(problems[3].value, "inf");
        assert_eq!(
            problems[4].to_string(),
            "max_duration 0: must be a finite number of seconds above 0, or left out for events without a length limit"
        );

        let err = AlarmTracker::new("line-1", &config, Duration::ZERO).unwrap_err();
        assert_eq!(err.problems, problems);
        let message = err.to_string();
        assert!(
            message.starts_with("invalid alarm config:\n  raise_frames 0"),
            "{message}"
        );
        assert_eq!(message.lines().count(), 6, "{message}");

        assert!(AlarmConfig::default().validate().is_empty());
        let limit = AlarmConfig {
            raise_frames: MAX_RAISE_FRAMES + 1,
            max_duration: Some(f64::NAN),
            ..AlarmConfig::default()
        };
        let fields: Vec<&str> = limit.validate().iter().map(|p| p.field).collect();
        assert_eq!(fields, vec!["raise_frames", "max_duration"]);
        for value in [-1.0, f64::INFINITY, 1e-12] {
            let config = AlarmConfig {
                max_duration: Some(value),
                ..AlarmConfig::default()
            };
            let fields: Vec<&str> = config.validate().iter().map(|p| p.field).collect();
            assert_eq!(fields, vec!["max_duration"], "max_duration {value}");
        }
        let config = AlarmConfig {
            raise_frames: MAX_RAISE_FRAMES,
            clear_after: 0.0,
            max_duration: Some(0.001),
            ..AlarmConfig::default()
        };
        assert!(config.validate().is_empty());
    }

    #[test]
    fn config_reads_toml_with_defaults() {
        let config: AlarmConfig = toml::from_str("").unwrap();
        assert_eq!(config, AlarmConfig::default());
        let config: AlarmConfig =
            toml::from_str("raise = \"median\"\nraise_frames = 5\nmax_duration = 60.0").unwrap();
        assert_eq!(config.raise, RaiseRule::Median);
        assert_eq!(config.raise_frames, 5);
        assert_eq!(config.max_duration, Some(60.0));
        assert_eq!(config.clear_after, 2.0);
        let err = toml::from_str::<AlarmConfig>("raise = \"majority\"").unwrap_err();
        assert!(err.to_string().contains("consecutive"), "{err}");
        assert!(toml::from_str::<AlarmConfig>("clear_afterr = 1.0").is_err());
    }

    #[test]
    fn seconds_convert_to_exact_milliseconds() {
        let config = AlarmConfig {
            clear_after: 0.1,
            cooldown: 0.3,
            update_interval: 2.7,
            ..AlarmConfig::default()
        };
        let settings = config.settings().unwrap();
        assert_eq!(settings.clear_after, ms(100));
        assert_eq!(settings.cooldown, ms(300));
        assert_eq!(settings.update_interval, ms(2700));
    }
}
