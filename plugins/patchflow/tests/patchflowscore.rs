// SPDX-License-Identifier: MIT OR Apache-2.0
//! Integration tests of the `patchflowscore` element through gst-check's `Harness`: caps,
//! timestamps, bus messages, the overlay, start-up errors and MQTT publishing.
//!
//! The tests build small untrained models from the converted backbone weights, so run
//! `scripts/setup.sh` first. The MQTT tests start mosquitto on a free loopback port.

mod support;

use std::net::{Ipv4Addr, TcpListener};
use std::path::Path;
use std::time::{Duration, Instant};

use gst::prelude::*;
use gst_check::Harness;
use patchflow::model::ModelConfig;
use support::broker::{Broker, Subscriber, TlsListener, free_port, wait_until};
use support::pki::Pki;

/// Maximum time to wait for a bus message that should already have been posted.
const MESSAGE_TIMEOUT: gst::ClockTime = gst::ClockTime::from_seconds(5);

/// The formats in the element's pad templates.
const FORMATS: [&str; 10] = [
    "RGB", "BGR", "RGBx", "BGRx", "xRGB", "xBGR", "RGBA", "BGRA", "ARGB", "ABGR",
];

/// A configured `patchflowscore` with a bus to read its messages from.
struct Scorer {
    element: gst::Element,
    bus: gst::Bus,
}

impl Scorer {
    /// Creates the element with a model file and the given extra properties.
    fn new(model: &Path, properties: &[(&str, &str)]) -> Scorer {
        support::init();
        let element = gst::ElementFactory::make("patchflowscore")
            .property("model", model.to_str().expect("temporary paths are UTF-8"))
            .build()
            .expect("failed to create patchflowscore");
        for (name, value) in properties {
            element.set_property_from_str(name, value);
        }
        // A harness does not put the element into a bin, so no bus exists unless it is set.
        let bus = gst::Bus::new();
        element.set_bus(Some(&bus));
        Scorer { element, bus }
    }

    /// Wraps the element in a harness, which starts it.
    fn harness(&self, info: &gst_video::VideoInfo) -> Harness {
        let mut harness = Harness::with_element(&self.element, Some("sink"), Some("src"));
        harness.set_src_caps(info.to_caps().expect("valid video info"));
        harness
    }

    /// Pops the next `patchflow` element message, skipping other messages.
    fn next_report(&self) -> gst::Structure {
        let message = self
            .bus
            .timed_pop_filtered(MESSAGE_TIMEOUT, &[gst::MessageType::Element])
            .expect("no patchflow element message was posted");
        let structure = message
            .structure()
            .expect("element messages have a structure")
            .to_owned();
        assert_eq!(structure.name(), "patchflow");
        structure
    }

    /// Starts the element on its own and returns the error message that start-up posted.
    fn start_error(&self) -> gst::glib::Error {
        let result = self.element.set_state(gst::State::Paused);
        assert!(
            result.is_err(),
            "the element started although it should have failed"
        );
        let message = self
            .bus
            .timed_pop_filtered(MESSAGE_TIMEOUT, &[gst::MessageType::Error])
            .expect("no error message was posted");
        let gst::MessageView::Error(error) = message.view() else {
            unreachable!("filtered for error messages");
        };
        let error = error.error();
        self.element.set_state(gst::State::Null).unwrap();
        error
    }
}

fn video_info(format: &str, width: u32, height: u32) -> gst_video::VideoInfo {
    support::init();
    let format = gst_video::VideoFormat::from_string(format);
    gst_video::VideoInfo::builder(format, width, height)
        .fps(gst::Fraction::new(30, 1))
        .build()
        .expect("valid video info")
}

/// Creates a buffer for `info` filled with a byte pattern that varies across the frame.
fn pattern_buffer(info: &gst_video::VideoInfo) -> gst::Buffer {
    let data: Vec<u8> = (0..info.size()).map(|i| (i * 7 % 251) as u8).collect();
    gst::Buffer::from_mut_slice(data)
}

/// Creates a buffer for an RGB or RGBA `info` with `rgb` pixels, `alpha` in every alpha
/// byte and zeros in the row padding.
fn image_buffer(info: &gst_video::VideoInfo, rgb: &[u8], alpha: u8) -> gst::Buffer {
    let width = info.width() as usize;
    let stride = info.stride()[0] as usize;
    let bytes_per_pixel = info.format_info().pixel_stride()[0] as usize;
    let mut data = vec![0u8; info.size()];
    for y in 0..info.height() as usize {
        for x in 0..width {
            let source = &rgb[3 * (y * width + x)..3 * (y * width + x) + 3];
            let target = y * stride + x * bytes_per_pixel;
            data[target..target + 3].copy_from_slice(source);
            if bytes_per_pixel == 4 {
                data[target + 3] = alpha;
            }
        }
    }
    gst::Buffer::from_mut_slice(data)
}

/// Crops the top-left `width` x `height` corner out of a test image, as RGB bytes.
fn cropped_image(name: &str, width: usize, height: usize) -> Vec<u8> {
    let (rgb, image_width, image_height) = support::rgb_image(name);
    assert!(
        width <= image_width,
        "{name} is only {image_width} pixels wide"
    );
    assert!(
        height <= image_height,
        "{name} is only {image_height} pixels high"
    );
    let mut cropped = Vec::with_capacity(3 * width * height);
    for y in 0..height {
        let start = 3 * y * image_width;
        cropped.extend_from_slice(&rgb[start..start + 3 * width]);
    }
    cropped
}

fn map_bytes(buffer: &gst::Buffer) -> Vec<u8> {
    buffer.map_readable().expect("readable buffer").to_vec()
}

#[test]
fn caps_negotiate_for_packed_rgb_formats() {
    let dir = tempfile::tempdir().unwrap();
    let model = support::write_model(dir.path(), &support::small_config());

    for format in FORMATS {
        let scorer = Scorer::new(&model, &[]);
        let info = video_info(format, 80, 60);
        let mut harness = scorer.harness(&info);

        let output = harness.push_and_pull(pattern_buffer(&info));
        assert!(output.is_ok(), "{format}: no buffer came out: {output:?}");
        let caps = harness
            .sinkpad()
            .unwrap()
            .current_caps()
            .expect("output caps are set");
        let output_info = gst_video::VideoInfo::from_caps(&caps).unwrap();
        assert_eq!(output_info.format(), info.format(), "{format}");
        assert_eq!(output_info.width(), 80, "{format}");
        assert_eq!(output_info.height(), 60, "{format}");
    }
}

#[test]
fn caps_reject_i420() {
    let dir = tempfile::tempdir().unwrap();
    let model = support::write_model(dir.path(), &support::small_config());
    let scorer = Scorer::new(&model, &[]);
    let i420 = video_info("I420", 80, 60);
    let sink_pad = scorer.element.static_pad("sink").unwrap();
    assert!(!sink_pad.query_accept_caps(&i420.to_caps().unwrap()));

    let mut harness = scorer.harness(&i420);
    let result = harness.push(pattern_buffer(&i420));
    assert_eq!(result, Err(gst::FlowError::NotNegotiated));
    assert_eq!(sink_pad.current_caps(), None);
}

#[test]
fn timestamps_pass_through() {
    let dir = tempfile::tempdir().unwrap();
    let model = support::write_model(dir.path(), &support::small_config());
    let scorer = Scorer::new(&model, &[]);
    let info = video_info("RGB", 64, 48);
    let mut harness = scorer.harness(&info);
    let frame_duration = gst::ClockTime::from_nseconds(33_333_333);

    for i in 0..5u64 {
        let mut buffer = pattern_buffer(&info);
        {
            let buffer = buffer.get_mut().unwrap();
            buffer.set_pts(frame_duration * i + gst::ClockTime::from_seconds(10));
            buffer.set_dts(frame_duration * i + gst::ClockTime::from_seconds(9));
            buffer.set_duration(frame_duration);
            buffer.set_offset(100 + i);
            buffer.set_offset_end(101 + i);
        }
        let output = harness.push_and_pull(buffer).unwrap();
        let expected_pts = frame_duration * i + gst::ClockTime::from_seconds(10);
        assert_eq!(output.pts(), Some(expected_pts), "frame {i}");
        assert_eq!(
            output.dts(),
            Some(frame_duration * i + gst::ClockTime::from_seconds(9)),
            "frame {i}"
        );
        assert_eq!(output.duration(), Some(frame_duration), "frame {i}");
        assert_eq!(output.offset(), 100 + i, "frame {i}");
        assert_eq!(output.offset_end(), 101 + i, "frame {i}");
    }
}

#[test]
fn element_message_has_all_fields() {
    let dir = tempfile::tempdir().unwrap();
    let model = support::write_model(dir.path(), &support::small_config());
    let scorer = Scorer::new(&model, &[]);
    let info = video_info("BGRx", 64, 48);
    let mut harness = scorer.harness(&info);

    for i in 0..3u64 {
        let mut buffer = pattern_buffer(&info);
        buffer
            .get_mut()
            .unwrap()
            .set_pts(gst::ClockTime::from_mseconds(40 * i));
        harness.push_and_pull(buffer).unwrap();

        let report = scorer.next_report();
        assert_eq!(report.get::<u64>("frame").unwrap(), i);
        assert_eq!(
            report.get::<Option<gst::ClockTime>>("pts").unwrap(),
            Some(gst::ClockTime::from_mseconds(40 * i))
        );
        let score = report.get::<f64>("score").unwrap();
        assert!((-1.0..=0.0).contains(&score), "raw score {score}");
        let normalized = report.get::<f64>("normalized-score").unwrap();
        assert!(
            (0.0..=1.0).contains(&normalized),
            "normalised score {normalized}"
        );
        let log_score = report.get::<f64>("log-score").unwrap();
        assert!(log_score >= 0.0, "log score {log_score}");
        // The map interpolates -exp(-l) between patches, so its maximum cannot exceed the
        // value at the largest l.
        assert!(
            score <= -(-log_score).exp() + 1e-6,
            "raw score {score} above -exp(-{log_score})"
        );
        assert_eq!(report.get::<f64>("threshold").unwrap(), 0.5);
        assert_eq!(
            report.get::<&str>("threshold-domain").unwrap(),
            "normalized"
        );
        let is_anomalous = report.get::<bool>("is-anomalous").unwrap();
        assert_eq!(is_anomalous, normalized > 0.5);
        let label = report.get::<&str>("label").unwrap();
        assert_eq!(label, if is_anomalous { "anomalous" } else { "normal" });
        let inference_ms = report.get::<f64>("inference-ms").unwrap();
        assert!(inference_ms > 0.0, "inference time {inference_ms} ms");
        assert_eq!(report.n_fields(), 10, "unexpected fields in {report}");
    }
}

#[test]
fn element_message_without_pts() {
    let dir = tempfile::tempdir().unwrap();
    let model = support::write_model(dir.path(), &support::small_config());
    let scorer = Scorer::new(&model, &[]);
    let info = video_info("RGB", 64, 48);
    let mut harness = scorer.harness(&info);

    let output = harness.push_and_pull(pattern_buffer(&info)).unwrap();
    assert_eq!(output.pts(), None);
    let report = scorer.next_report();
    assert_eq!(report.get::<Option<gst::ClockTime>>("pts").unwrap(), None);
    assert_eq!(report.get::<u64>("pts").unwrap(), u64::MAX);
}

#[test]
fn threshold_change_applies_while_playing() {
    let dir = tempfile::tempdir().unwrap();
    let model = support::write_model(dir.path(), &support::small_config());
    let scorer = Scorer::new(&model, &[]);
    let info = video_info("RGB", 64, 48);
    let mut harness = scorer.harness(&info);

    // A normalised score is at most 1, so threshold 1 never marks a frame as anomalous.
    scorer.element.set_property("threshold", 1.0f64);
    harness.push_and_pull(pattern_buffer(&info)).unwrap();
    let report = scorer.next_report();
    assert_eq!(report.get::<f64>("threshold").unwrap(), 1.0);
    assert!(!report.get::<bool>("is-anomalous").unwrap());
    assert_eq!(report.get::<&str>("label").unwrap(), "normal");

    // The same frame scores the same, so threshold 0 marks it as anomalous unless its
    // normalised score is exactly 0.
    let normalized = report.get::<f64>("normalized-score").unwrap();
    scorer.element.set_property("threshold", 0.0f64);
    harness.push_and_pull(pattern_buffer(&info)).unwrap();
    let report = scorer.next_report();
    assert_eq!(report.get::<f64>("threshold").unwrap(), 0.0);
    assert_eq!(report.get::<f64>("normalized-score").unwrap(), normalized);
    assert_eq!(
        report.get::<bool>("is-anomalous").unwrap(),
        normalized > 0.0
    );
}

#[test]
fn overlay_changes_pixels() {
    let dir = tempfile::tempdir().unwrap();
    let model = support::write_model(dir.path(), &support::small_config());
    let scorer = Scorer::new(&model, &[("overlay", "true"), ("alpha", "0.5")]);
    // 318 RGB pixels are 954 bytes, so GStreamer pads every row to a 956-byte stride.
    let info = video_info("RGB", 318, 240);
    assert_eq!(info.stride()[0], 956);
    let rgb = cropped_image("brick.png", 318, 240);
    let input = image_buffer(&info, &rgb, 0);
    let mut harness = scorer.harness(&info);

    let output = map_bytes(&harness.push_and_pull(input.clone()).unwrap());
    let input = map_bytes(&input);
    assert_eq!(output.len(), input.len());
    let mut changed = 0usize;
    for y in 0..240 {
        let row = y * 956;
        for x in 0..954 {
            if output[row + x] != input[row + x] {
                changed += 1;
            }
        }
        assert_eq!(&output[row + 954..row + 956], &[0, 0], "padding of row {y}");
    }
    let total = 954 * 240;
    assert!(
        changed > total / 2,
        "only {changed} of {total} bytes changed"
    );
}

#[test]
fn scoring_interval_skips_frames() {
    let dir = tempfile::tempdir().unwrap();
    let model = support::write_model(dir.path(), &support::small_config());
    let scorer = Scorer::new(&model, &[("scoring-interval", "3"), ("alpha", "0.5")]);
    let info = video_info("RGB", 96, 64);
    let rgb = cropped_image("gravel.png", 96, 64);
    let input = image_buffer(&info, &rgb, 0);
    let original = map_bytes(&input);
    let mut harness = scorer.harness(&info);

    for i in 0..7u64 {
        let mut buffer = input.copy();
        buffer
            .get_mut()
            .unwrap()
            .set_pts(gst::ClockTime::from_mseconds(40 * i));
        let output = map_bytes(&harness.push_and_pull(buffer).unwrap());
        // Skipped frames still get the last heatmap drawn on them.
        assert_ne!(output, original, "frame {i} has no overlay");
    }

    let frames: Vec<u64> = (0..3)
        .map(|_| scorer.next_report().get::<u64>("frame").unwrap())
        .collect();
    assert_eq!(frames, vec![0, 3, 6]);
    let extra = scorer.bus.timed_pop_filtered(
        gst::ClockTime::from_mseconds(200),
        &[gst::MessageType::Element],
    );
    assert!(extra.is_none(), "a skipped frame posted a message");
    assert_eq!(scorer.element.property::<u64>("frames-skipped"), 4);
}

#[test]
fn overlay_keeps_alpha_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let model = support::write_model(dir.path(), &support::small_config());
    let scorer = Scorer::new(&model, &[("alpha", "1.0"), ("colormap", "hot")]);
    let info = video_info("RGBA", 96, 64);
    let rgb = cropped_image("gravel.png", 96, 64);
    let mut harness = scorer.harness(&info);

    let output = map_bytes(
        &harness
            .push_and_pull(image_buffer(&info, &rgb, 77))
            .unwrap(),
    );
    for (i, pixel) in output.chunks_exact(4).enumerate() {
        assert_eq!(pixel[3], 77, "alpha of pixel {i}");
    }
}

#[test]
fn overlay_off_leaves_frame_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let model = support::write_model(dir.path(), &support::small_config());
    let scorer = Scorer::new(&model, &[("overlay", "false")]);
    let info = video_info("RGB", 318, 240);
    let rgb = cropped_image("brick.png", 318, 240);
    let input = image_buffer(&info, &rgb, 0);
    let mut harness = scorer.harness(&info);

    let output = harness.push_and_pull(input.clone()).unwrap();
    assert!(map_bytes(&output) == map_bytes(&input), "a pixel changed");
    // The frame was still scored.
    assert_eq!(scorer.next_report().get::<u64>("frame").unwrap(), 0);
}

#[test]
fn log_threshold_decides_on_log_score() {
    let dir = tempfile::tempdir().unwrap();
    let model = support::write_model(dir.path(), &support::small_config());
    let scorer = Scorer::new(&model, &[("threshold-domain", "log")]);
    let info = video_info("RGB", 64, 48);
    let mut harness = scorer.harness(&info);

    // Learn the frame's log score, then put the threshold just below and just above it.
    scorer.element.set_property("threshold", 0.0f64);
    harness.push_and_pull(pattern_buffer(&info)).unwrap();
    let report = scorer.next_report();
    assert_eq!(report.get::<&str>("threshold-domain").unwrap(), "log");
    let log_score = report.get::<f64>("log-score").unwrap();
    assert!(log_score > 0.0, "log score {log_score}");

    for (threshold, expected) in [(log_score * 0.99, true), (log_score * 1.01, false)] {
        scorer.element.set_property("threshold", threshold);
        harness.push_and_pull(pattern_buffer(&info)).unwrap();
        let report = scorer.next_report();
        assert_eq!(report.get::<f64>("log-score").unwrap(), log_score);
        assert_eq!(
            report.get::<f64>("threshold").unwrap(),
            f64::from(threshold as f32)
        );
        assert_eq!(
            report.get::<bool>("is-anomalous").unwrap(),
            expected,
            "threshold {threshold}, log score {log_score}"
        );
    }
}

#[test]
fn unset_threshold_is_the_models_own() {
    let dir = tempfile::tempdir().unwrap();
    let model = support::write_model(dir.path(), &support::small_config());
    let info = video_info("RGB", 64, 48);
    // The untrained model's raw threshold is -0.5 and it has no calibrated log
    // threshold, so its log threshold is -ln(0.5).
    for (domain, expected) in [
        ("normalized", 0.5f32),
        ("raw", -0.5),
        ("log", std::f32::consts::LN_2),
    ] {
        let scorer = Scorer::new(&model, &[("threshold-domain", domain)]);
        let mut harness = scorer.harness(&info);
        harness.push_and_pull(pattern_buffer(&info)).unwrap();
        let report = scorer.next_report();
        assert_eq!(report.get::<&str>("threshold-domain").unwrap(), domain);
        assert_eq!(
            report.get::<f64>("threshold").unwrap(),
            f64::from(expected),
            "{domain}"
        );
    }
}

#[test]
fn out_of_range_threshold_fails_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let model = support::write_model(dir.path(), &support::small_config());
    // 0.5 is a valid normalised or log threshold, but raw scores lie in [-1, 0].
    let scorer = Scorer::new(&model, &[("threshold", "0.5"), ("threshold-domain", "raw")]);

    let error = scorer.start_error();
    let message = error.message();
    assert!(
        error.matches(gst::LibraryError::Settings),
        "unexpected error domain: {error:?}"
    );
    assert!(message.contains("threshold 0.5"), "{message}");
    assert!(message.contains("raw"), "{message}");
}

#[test]
fn newest_mode_scores_last_frame_before_eos() {
    let dir = tempfile::tempdir().unwrap();
    let model = support::write_model(dir.path(), &support::small_config());
    let scorer = Scorer::new(&model, &[("scoring-mode", "newest")]);
    let info = video_info("RGB", 64, 48);
    let mut harness = scorer.harness(&info);

    const FRAMES: u64 = 10;
    for _ in 0..FRAMES {
        harness.push_and_pull(pattern_buffer(&info)).unwrap();
    }
    // End-of-stream waits for the frame left for the scoring thread, so its report is
    // already on the bus when the event has passed.
    assert!(harness.push_event(gst::event::Eos::new()));
    let mut scored = Vec::new();
    while let Some(message) = scorer.bus.pop_filtered(&[gst::MessageType::Element]) {
        scored.push(message.structure().unwrap().get::<u64>("frame").unwrap());
    }
    assert_eq!(scored.last(), Some(&(FRAMES - 1)), "{scored:?}");
    let skipped = scorer.element.property::<u64>("frames-skipped");
    assert_eq!(
        scored.len() as u64 + skipped,
        FRAMES,
        "{scored:?}, {skipped} skipped"
    );
}

#[test]
fn newest_mode_never_waits_for_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = support::write_model(dir.path(), &support::small_config());
    let scorer = Scorer::new(&model, &[("scoring-mode", "newest")]);
    let info = video_info("RGB", 64, 48);
    let mut harness = scorer.harness(&info);

    // Frames are pushed far faster than the model scores them: each passes on at once,
    // and the scoring thread takes the newest one whenever it is free.
    const FRAMES: u64 = 20;
    for i in 0..FRAMES {
        let mut buffer = pattern_buffer(&info);
        buffer
            .get_mut()
            .unwrap()
            .set_pts(gst::ClockTime::from_mseconds(40 * i));
        let output = harness.push_and_pull(buffer).unwrap();
        assert_eq!(output.pts(), Some(gst::ClockTime::from_mseconds(40 * i)));
    }

    // Every frame is either scored (one bus message) or replaced by a newer one before
    // the scoring thread took it (counted as skipped).
    let mut scored = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        while let Some(message) = scorer.bus.timed_pop_filtered(
            gst::ClockTime::from_mseconds(50),
            &[gst::MessageType::Element],
        ) {
            let structure = message.structure().unwrap();
            assert_eq!(structure.name(), "patchflow");
            let frame = structure.get::<u64>("frame").unwrap();
            let pts = structure.get::<Option<gst::ClockTime>>("pts").unwrap();
            assert_eq!(pts, Some(gst::ClockTime::from_mseconds(40 * frame)));
            scored.push(frame);
        }
        let skipped = scorer.element.property::<u64>("frames-skipped");
        if scored.len() as u64 + skipped == FRAMES {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} scored and {skipped} skipped of {FRAMES} frames",
            scored.len()
        );
    }
    assert!(
        scored.windows(2).all(|pair| pair[0] < pair[1]),
        "frames scored out of order: {scored:?}"
    );
    assert_eq!(
        scored.last(),
        Some(&(FRAMES - 1)),
        "the newest frame was not scored"
    );
    assert!(
        scored.len() < FRAMES as usize,
        "no frame was skipped although frames came faster than the model: {scored:?}"
    );
}

#[test]
fn missing_model_fails_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing.safetensors");
    let scorer = Scorer::new(&path, &[]);

    let error = scorer.start_error();
    let message = error.message();
    assert!(
        error.matches(gst::LibraryError::Settings),
        "unexpected error domain: {error:?}"
    );
    assert!(
        message.starts_with(&format!("Failed to load model {}: ", path.display())),
        "{message}"
    );
}

#[test]
fn corrupt_model_fails_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = support::write_model(dir.path(), &support::small_config());
    let length = std::fs::metadata(&path).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(length / 2).unwrap();
    drop(file);
    let scorer = Scorer::new(&path, &[]);

    let error = scorer.start_error();
    let message = error.message();
    assert!(error.matches(gst::LibraryError::Settings), "{error:?}");
    assert!(
        message.starts_with(&format!("Failed to load model {}: ", path.display())),
        "{message}"
    );
    assert!(message.contains("corrupt"), "{message}");
}

#[test]
fn unset_model_fails_to_start() {
    support::init();
    let element = gst::ElementFactory::make("patchflowscore").build().unwrap();
    let bus = gst::Bus::new();
    element.set_bus(Some(&bus));
    let scorer = Scorer { element, bus };

    let error = scorer.start_error();
    assert!(error.matches(gst::LibraryError::Settings), "{error:?}");
    assert!(
        error.message().contains("model=PATH"),
        "{}",
        error.message()
    );
}

#[test]
fn invalid_settings_fail_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let model = support::write_model(dir.path(), &support::small_config());
    let cases: [(&str, &str, &str); 6] = [
        ("device", "gpu", "Failed to set up device \"gpu\""),
        ("mqtt-url", "http://127.0.0.1:1883", "invalid MQTT URL"),
        ("mqtt-url", "mqtts://[::1]:8883", "bracketed IPv6 address"),
        ("mqtt-topic", "patchflow/+/score", "Invalid mqtt-topic"),
        (
            "mqtt-ca-file",
            "/nonexistent/ca.pem",
            "invalid MQTT CA file /nonexistent/ca.pem",
        ),
        (
            "mqtt-client-key-file",
            "/nonexistent/client.key",
            "missing MQTT client certificate file",
        ),
    ];
    for (property, value, expected) in cases {
        let mut properties = vec![(property, value)];
        if property == "mqtt-topic" {
            properties.push(("mqtt-url", "mqtt://127.0.0.1:1883"));
        } else if property.starts_with("mqtt-c") {
            properties.push(("mqtt-url", "mqtts://127.0.0.1:8883"));
        }
        let scorer = Scorer::new(&model, &properties);

        let error = scorer.start_error();
        assert!(
            error.matches(gst::LibraryError::Settings),
            "{property}={value}: {error:?}"
        );
        assert!(
            error.message().contains(expected),
            "{property}={value}: {}",
            error.message()
        );
    }
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_device_needs_cuda_feature() {
    let dir = tempfile::tempdir().unwrap();
    let model = support::write_model(dir.path(), &support::small_config());
    let scorer = Scorer::new(&model, &[("device", "cuda:0")]);

    let error = scorer.start_error();
    let message = error.message();
    assert!(error.matches(gst::LibraryError::Settings), "{error:?}");
    assert!(message.contains("\"cuda:0\""), "{message}");
    assert!(message.contains("`cuda` feature"), "{message}");
}

#[test]
fn properties_have_documented_defaults() {
    support::init();
    let element = gst::ElementFactory::make("patchflowscore")
        .name("camera1")
        .build()
        .unwrap();
    assert_eq!(element.property::<Option<String>>("model"), None);
    assert_eq!(element.property::<String>("device"), "cpu");
    assert_eq!(element.property::<f64>("threshold"), 0.5);
    assert!(element.property::<bool>("overlay"));
    assert_eq!(element.property::<f64>("alpha"), 0.5);
    assert_eq!(
        element.property::<gstpatchflow::Colormap>("colormap"),
        gstpatchflow::Colormap::Jet
    );
    assert_eq!(element.property::<String>("mqtt-url"), "");
    assert_eq!(
        element.property::<String>("mqtt-topic"),
        "patchflow/camera1/score"
    );
    assert_eq!(element.property::<u32>("mqtt-qos"), 0);

    element.set_property("mqtt-topic", "plant/line1");
    assert_eq!(element.property::<String>("mqtt-topic"), "plant/line1");
    element.set_property("mqtt-topic", "");
    assert_eq!(
        element.property::<String>("mqtt-topic"),
        "patchflow/camera1/score"
    );
    let stats = element.property::<gst::Structure>("mqtt-stats");
    assert_eq!(stats.get::<u64>("published").unwrap(), 0);
    assert!(!stats.get::<bool>("connected").unwrap());
}

#[test]
fn mqtt_messages_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let model = support::write_model(dir.path(), &support::small_config());
    let broker = Broker::start();
    let subscriber = Subscriber::start(broker.port, "patchflow/+/score");
    let scorer = Scorer::new(&model, &[("name", "camera1"), ("mqtt-url", &broker.url())]);
    let info = video_info("RGB", 64, 48);
    let mut harness = scorer.harness(&info);

    let mut reports = Vec::new();
    for i in 0..5u64 {
        let mut buffer = pattern_buffer(&info);
        buffer
            .get_mut()
            .unwrap()
            .set_pts(gst::ClockTime::from_mseconds(100 * i));
        harness.push_and_pull(buffer).unwrap();
        reports.push(scorer.next_report());
    }

    let messages = subscriber.collect(5, Duration::from_secs(10));
    assert_eq!(messages.len(), 5, "broker log:\n{}", broker.log());
    for (i, (message, report)) in messages.iter().zip(&reports).enumerate() {
        assert_eq!(message.topic, "patchflow/camera1/score");
        let json: serde_json::Value = serde_json::from_str(&message.payload)
            .unwrap_or_else(|err| panic!("message {i} is not JSON ({err}): {}", message.payload));
        assert_eq!(json["source"], "camera1");
        assert_eq!(json["frame"], i as u64);
        assert_eq!(json["pts_ns"], 100_000_000 * i as u64);
        // The JSON contains the shortest decimal form of the f32 score, which parses back to
        // the same f32 but not to the same f64.
        let json_f32 = |key: &str| json[key].as_f64().map(|value| value as f32);
        let score = report.get::<f64>("score").unwrap() as f32;
        assert_eq!(json_f32("score"), Some(score), "message {i}");
        let normalized = report.get::<f64>("normalized-score").unwrap() as f32;
        assert_eq!(
            json_f32("normalized_score"),
            Some(normalized),
            "message {i}"
        );
        assert_eq!(json["threshold"], 0.5);
        let is_anomalous = report.get::<bool>("is-anomalous").unwrap();
        assert_eq!(json["is_anomalous"], is_anomalous);
        assert_eq!(json["label"], report.get::<&str>("label").unwrap());
    }

    // The publisher thread counts a QoS 0 message once its write returns, which can be
    // just after the subscriber already has it.
    let published = || {
        let stats = scorer.element.property::<gst::Structure>("mqtt-stats");
        stats.get::<u64>("published").unwrap() == 5
    };
    assert!(wait_until(Duration::from_secs(5), published));
    let stats = scorer.element.property::<gst::Structure>("mqtt-stats");
    assert_eq!(stats.get::<u64>("dropped").unwrap(), 0);
    assert!(stats.get::<bool>("connected").unwrap());
}

#[test]
fn mqtt_tls_messages_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let model = support::write_model(dir.path(), &support::small_config());
    let pki = Pki::generate();
    let broker = Broker::start_tls(TlsListener {
        ca_file: pki.ca_file(),
        cert_file: pki.server_cert_file(),
        key_file: pki.server_key_file(),
        require_certificate: true,
    });
    let subscriber = Subscriber::start(broker.port, "patchflow/+/score");
    let url = broker.tls_url("localhost");
    let ca_file = pki.ca_file().display().to_string();
    let cert_file = pki.client_cert_file().display().to_string();
    let key_file = pki.client_key_file().display().to_string();
    let scorer = Scorer::new(
        &model,
        &[
            ("name", "camera1"),
            ("mqtt-url", &url),
            ("mqtt-ca-file", &ca_file),
            ("mqtt-client-cert-file", &cert_file),
            ("mqtt-client-key-file", &key_file),
        ],
    );
    assert_eq!(scorer.element.property::<String>("mqtt-ca-file"), ca_file);
    assert_eq!(
        scorer.element.property::<String>("mqtt-client-key-file"),
        key_file
    );
    let info = video_info("RGB", 64, 48);
    let mut harness = scorer.harness(&info);
    let connected = || {
        let stats = scorer.element.property::<gst::Structure>("mqtt-stats");
        stats.get::<bool>("connected").unwrap()
    };
    assert!(
        wait_until(Duration::from_secs(10), connected),
        "broker log:\n{}",
        broker.log()
    );

    push_frames(&scorer, &mut harness, &info, 3);
    let messages = subscriber.collect(3, Duration::from_secs(10));
    let frames: Vec<u64> = messages
        .iter()
        .map(|message| {
            assert_eq!(message.topic, "patchflow/camera1/score");
            let json: serde_json::Value = serde_json::from_str(&message.payload).unwrap();
            json["frame"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(frames, [0, 1, 2]);
}

#[test]
fn mqtt_tls_wrong_ca_warns() {
    let dir = tempfile::tempdir().unwrap();
    let model = support::write_model(dir.path(), &support::small_config());
    let pki = Pki::generate();
    let broker = Broker::start_tls(TlsListener {
        ca_file: pki.ca_file(),
        cert_file: pki.server_cert_file(),
        key_file: pki.server_key_file(),
        require_certificate: false,
    });
    let url = broker.tls_url("127.0.0.1");
    let other_ca = pki.other_ca_file().display().to_string();
    let scorer = Scorer::new(&model, &[("mqtt-url", &url), ("mqtt-ca-file", &other_ca)]);
    let info = video_info("RGB", 64, 48);
    let mut harness = scorer.harness(&info);

    // The outage warning comes with a frame at least 3 s after the start. `next_report`
    // would drop it, so the messages of each frame are read here up to its report.
    let started = Instant::now();
    let mut warning = None;
    while warning.is_none() && started.elapsed() < Duration::from_secs(15) {
        harness.push_and_pull(pattern_buffer(&info)).unwrap();
        loop {
            let message = scorer
                .bus
                .timed_pop(MESSAGE_TIMEOUT)
                .expect("no patchflow element message was posted");
            match message.view() {
                gst::MessageView::Warning(posted) => {
                    warning = Some(posted.error().to_string());
                }
                gst::MessageView::Element(_) => break,
                _ => {}
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let warning = warning.expect("no warning about the unreachable broker");
    assert!(warning.contains(&url), "{warning}");
    assert!(warning.contains("certificate verify failed"), "{warning}");
    assert!(warning.contains(&other_ca), "{warning}");
    let stats = scorer.element.property::<gst::Structure>("mqtt-stats");
    assert!(!stats.get::<bool>("connected").unwrap());
    assert_eq!(stats.get::<u64>("published").unwrap(), 0);

    assert_unreachable_broker_does_not_block(&model, &url, &[("mqtt-ca-file", &other_ca)]);
}

/// Pushes `count` frames, checks that each comes out with its report and returns the time
/// that took.
fn push_frames(
    scorer: &Scorer,
    harness: &mut Harness,
    info: &gst_video::VideoInfo,
    count: u64,
) -> Duration {
    let started = Instant::now();
    for i in 0..count {
        harness.push_and_pull(pattern_buffer(info)).unwrap();
        assert_eq!(scorer.next_report().get::<u64>("frame").unwrap(), i);
    }
    started.elapsed()
}

/// Checks that frames flow as fast as without MQTT while the broker at `url` does not
/// answer, and that the element then stops promptly.
fn assert_unreachable_broker_does_not_block(
    model: &Path,
    url: &str,
    extra_properties: &[(&str, &str)],
) {
    const FRAMES: u64 = 20;
    let info = video_info("RGB", 64, 48);

    let baseline = Scorer::new(model, &[]);
    let mut harness = baseline.harness(&info);
    let baseline_time = push_frames(&baseline, &mut harness, &info, FRAMES);
    drop(harness);

    let mut properties = vec![("mqtt-url", url)];
    properties.extend_from_slice(extra_properties);
    let scorer = Scorer::new(model, &properties);
    let mut harness = scorer.harness(&info);
    let mqtt_time = push_frames(&scorer, &mut harness, &info, FRAMES);
    // The limit is generous because both runs share the machine with other tests. It still
    // catches a publish that waits for the CONNACK of a silent broker, which takes seconds.
    let limit = baseline_time * 3 + Duration::from_secs(2);
    assert!(
        mqtt_time < limit,
        "{FRAMES} frames took {mqtt_time:?} with an unreachable broker, {baseline_time:?} without MQTT"
    );

    let stats = scorer.element.property::<gst::Structure>("mqtt-stats");
    assert!(!stats.get::<bool>("connected").unwrap());
    assert_eq!(stats.get::<u64>("published").unwrap(), 0);
    let queued = stats.get::<u64>("queued").unwrap();
    let dropped = stats.get::<u64>("dropped").unwrap();
    assert_eq!(queued + dropped, FRAMES, "{stats}");

    // Stopping gives the publisher at most one second to deliver what is queued.
    let started = Instant::now();
    drop(harness);
    scorer.element.set_state(gst::State::Null).unwrap();
    let stop_time = started.elapsed();
    assert!(
        stop_time < Duration::from_secs(3),
        "stopping took {stop_time:?}"
    );
}

#[test]
fn mqtt_closed_port_does_not_block() {
    let dir = tempfile::tempdir().unwrap();
    let model = support::write_model(dir.path(), &support::small_config());
    // A port that was free a moment ago has no listener unless another process took it
    // since, so the connects are refused.
    let url = format!("mqtt://127.0.0.1:{}", free_port());
    assert_unreachable_broker_does_not_block(&model, &url, &[]);
}

#[test]
fn mqtt_silent_broker_does_not_block() {
    let dir = tempfile::tempdir().unwrap();
    let model = support::write_model(dir.path(), &support::small_config());
    // The kernel completes TCP handshakes on a listening socket that never accepts, so the
    // publisher connects and then waits for a CONNACK that never comes.
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let url = format!("mqtt://127.0.0.1:{}", listener.local_addr().unwrap().port());
    assert_unreachable_broker_does_not_block(&model, &url, &[]);
    drop(listener);
}

#[test]
fn mqtt_reconnects_after_broker_restart() {
    let dir = tempfile::tempdir().unwrap();
    let model = support::write_model(dir.path(), &support::small_config());
    let mut broker = Broker::start();
    let scorer = Scorer::new(&model, &[("mqtt-url", &broker.url())]);
    let info = video_info("RGB", 64, 48);
    let mut harness = scorer.harness(&info);
    let connected = || {
        let stats = scorer.element.property::<gst::Structure>("mqtt-stats");
        stats.get::<bool>("connected").unwrap()
    };
    assert!(wait_until(Duration::from_secs(5), connected));

    broker.stop();
    push_frames(&scorer, &mut harness, &info, 3);
    broker.restart();
    let subscriber = Subscriber::start(broker.port, "patchflow/+/score");
    assert!(
        wait_until(Duration::from_secs(10), connected),
        "the publisher did not reconnect; broker log:\n{}",
        broker.log()
    );
    harness.push_and_pull(pattern_buffer(&info)).unwrap();

    // Frames queued during the outage may arrive before the subscription, so only the
    // frame after it is certain to arrive.
    let messages = subscriber.collect(4, Duration::from_secs(5));
    let frames: Vec<u64> = messages
        .iter()
        .map(|message| {
            let json: serde_json::Value = serde_json::from_str(&message.payload).unwrap();
            json["frame"].as_u64().unwrap()
        })
        .collect();
    assert!(frames.contains(&3), "received frames {frames:?}");
    let stats = scorer.element.property::<gst::Structure>("mqtt-stats");
    assert!(
        stats.get::<u64>("reconnect-attempts").unwrap() >= 1,
        "{stats}"
    );
}

#[test]
fn inference_time_default_model_320x240() {
    let dir = tempfile::tempdir().unwrap();
    let config = ModelConfig::lite0();
    let model = support::write_model(dir.path(), &config);
    let scorer = Scorer::new(&model, &[]);
    let info = video_info("RGB", 320, 240);
    let rgb = cropped_image("gravel.png", 320, 240);
    let mut harness = scorer.harness(&info);

    // The first frame can be slower because of one-off allocations, so it is not measured.
    harness.push_and_pull(image_buffer(&info, &rgb, 0)).unwrap();
    scorer.next_report();
    let mut times = Vec::new();
    let started = Instant::now();
    for _ in 0..5 {
        harness.push_and_pull(image_buffer(&info, &rgb, 0)).unwrap();
        times.push(scorer.next_report().get::<f64>("inference-ms").unwrap());
    }
    let per_frame = started.elapsed() / 5;
    times.sort_by(f64::total_cmp);
    println!(
        "lite0 256x256 on 320x240 RGB: median inference {:.1} ms, {:?} per frame including the overlay",
        times[2], per_frame
    );
    assert!(times.iter().all(|ms| *ms > 0.0));
}
