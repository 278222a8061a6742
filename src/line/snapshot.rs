// SPDX-License-Identifier: MIT OR Apache-2.0
//! Snapshots of alarm events: the overlaid frame that starts an event and the frame at its
//! peak, written as JPEG files and optionally published over MQTT.
//!
//! Capturing happens on the pipeline's streaming thread and costs a copy of anomalous
//! frames only. A bus sync handler receives each `patchflow` message as the element posts
//! it. When the frame is anomalous, a buffer probe on the scorer's source pad copies the next
//! buffer that leaves the element, which carries the heatmap overlay. With
//! `scoring.interval` that is the scored frame itself. With `scoring.mode = "newest"` the
//! scoring thread posts the message while later frames pass, so the copy is the next frame
//! to leave, drawn with the scored frame's heatmap.
//!
//! The camera thread takes the copies in [`Snapshots::collect`] and keeps the most recent
//! ones, so that an event's peak frame, which can precede the frame that raised the alarm,
//! is still at hand. Only [`KEPT_FRAMES`] copies are kept on each side: a peak older than
//! that gets no peak snapshot until a later frame outranks it.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use gst::prelude::*;
use gst_video::prelude::*;
use image::ExtendedColorType;
use image::codecs::jpeg::JpegEncoder;

use crate::alarm::{AlarmEvent, EventKind};
use crate::imageops::PixelLayout;

use super::config::SnapshotConfig;

/// Number of anomalous frames kept by the capture side and by the camera thread each.
pub const KEPT_FRAMES: usize = 8;

/// How long the camera thread waits for the copy of a frame whose message it already
/// read: the buffer leaves the element just after the message is posted.
const CAPTURE_WAIT: Duration = Duration::from_millis(200);

/// A copy of one frame as it left the scoring element, rows without padding.
#[derive(Debug)]
pub struct CapturedFrame {
    /// Frame number of the scored frame whose message requested the copy.
    pub frame: u64,
    pub width: usize,
    pub height: usize,
    pub layout: PixelLayout,
    pub data: Vec<u8>,
}

impl CapturedFrame {
    /// Converts to packed RGB.
    pub fn to_rgb(&self) -> Vec<u8> {
        let bpp = self.layout.bytes_per_pixel();
        let [r, g, b] = self.layout.rgb_offsets();
        let mut rgb = Vec::with_capacity(self.width * self.height * 3);
        for px in self.data.chunks_exact(bpp) {
            rgb.extend_from_slice(&[px[r], px[g], px[b]]);
        }
        rgb
    }

    /// Encodes the frame as a baseline JPEG at `quality` (1 to 100).
    pub fn to_jpeg(&self, quality: u8) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        JpegEncoder::new_with_quality(&mut out, quality)
            .encode(
                &self.to_rgb(),
                self.width as u32,
                self.height as u32,
                ExtendedColorType::Rgb8,
            )
            .map_err(|e| format!("cannot encode frame {} as JPEG: {e}", self.frame))?;
        Ok(out)
    }
}

#[derive(Debug, Default)]
struct TapState {
    /// Frame number of the latest anomalous message whose buffer has not been copied yet.
    requested: Option<u64>,
    frames: VecDeque<Arc<CapturedFrame>>,
}

/// The capture side, shared by the bus sync handler, the buffer probe and the camera
/// thread of one pipeline.
#[derive(Debug, Default)]
pub struct FrameTap {
    state: Mutex<TapState>,
    captured: Condvar,
}

impl FrameTap {
    /// Installs the bus sync handler and the probe on `scorer`'s source pad.
    pub fn attach(self: &Arc<Self>, pipeline: &gst::Pipeline, scorer: &gst::Element) {
        let tap = Arc::clone(self);
        let bus = pipeline.bus().expect("a pipeline has a bus");
        bus.set_sync_handler(move |_, message| {
            if let gst::MessageView::Element(element) = message.view()
                && let Some(s) = element.structure().filter(|s| s.name() == "patchflow")
                && s.get::<bool>("is-anomalous").unwrap_or(false)
                && let Ok(frame) = s.get::<u64>("frame")
            {
                tap.lock().requested = Some(frame);
            }
            gst::BusSyncReply::Pass
        });
        let Some(pad) = scorer.static_pad("src") else {
            tracing::warn!("the scoring element has no source pad: snapshots are off");
            return;
        };
        let tap = Arc::clone(self);
        pad.add_probe(gst::PadProbeType::BUFFER, move |pad, info| {
            if let Some(buffer) = info.buffer() {
                tap.capture(pad, buffer);
            }
            gst::PadProbeReturn::Ok
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TapState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn capture(&self, pad: &gst::Pad, buffer: &gst::BufferRef) {
        let Some(frame) = self.lock().requested.take() else {
            return;
        };
        let copy = pad
            .current_caps()
            .ok_or_else(|| "no caps".to_owned())
            .and_then(|caps| copy_frame(&caps, buffer, frame));
        match copy {
            Ok(copy) => {
                let mut state = self.lock();
                if state.frames.len() == KEPT_FRAMES {
                    state.frames.pop_front();
                }
                state.frames.push_back(Arc::new(copy));
                drop(state);
                self.captured.notify_all();
            }
            Err(e) => tracing::debug!(frame, error = %e, "cannot copy the frame for a snapshot"),
        }
    }

    /// Removes and returns the copies made so far. With `until` set, first waits up to
    /// [`CAPTURE_WAIT`] for the copy of that frame (or of a later one).
    fn drain(&self, until: Option<u64>) -> Vec<Arc<CapturedFrame>> {
        let mut state = self.lock();
        if let Some(frame) = until {
            let deadline = Instant::now() + CAPTURE_WAIT;
            while !state.frames.iter().any(|f| f.frame >= frame) {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                state = self
                    .captured
                    .wait_timeout(state, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
        }
        state.frames.drain(..).collect()
    }
}

/// Copies the frame in `buffer` with the layout of `caps`, dropping row padding.
fn copy_frame(
    caps: &gst::CapsRef,
    buffer: &gst::BufferRef,
    frame: u64,
) -> Result<CapturedFrame, String> {
    let info = gst_video::VideoInfo::from_caps(caps).map_err(|e| e.to_string())?;
    let layout = PixelLayout::from_video_format(info.format())
        .ok_or_else(|| format!("unsupported format {}", info.format()))?;
    let video = gst_video::VideoFrameRef::from_buffer_ref_readable(buffer, &info)
        .map_err(|e| e.to_string())?;
    let (width, height) = (info.width() as usize, info.height() as usize);
    let stride = usize::try_from(video.plane_stride()[0]).map_err(|e| e.to_string())?;
    let plane = video.plane_data(0).map_err(|e| e.to_string())?;
    let row = width * layout.bytes_per_pixel();
    let mut data = Vec::with_capacity(row * height);
    for y in 0..height {
        let start = y * stride;
        let line = plane
            .get(start..start + row)
            .ok_or_else(|| format!("buffer too small for row {y}"))?;
        data.extend_from_slice(line);
    }
    Ok(CapturedFrame {
        frame,
        width,
        height,
        layout,
        data,
    })
}

/// The camera thread's side: recent copies, the active event's peak, and the files.
#[derive(Debug)]
pub struct Snapshots {
    config: SnapshotConfig,
    tap: Arc<FrameTap>,
    recent: VecDeque<Arc<CapturedFrame>>,
    /// Copy of the active event's peak frame, when it was captured.
    peak: Option<Arc<CapturedFrame>>,
    /// Frame number of the peak snapshot last written for the active event.
    written_peak: Option<u64>,
    /// Path of the active event's start snapshot, once written.
    start_file: Option<String>,
    /// Path of the active event's peak snapshot, once written.
    peak_file: Option<String>,
    /// Snapshot files written and failures, for the run summary.
    pub written: u64,
    pub failed: u64,
}

impl Snapshots {
    pub fn new(config: SnapshotConfig) -> Self {
        Self {
            config,
            tap: Arc::default(),
            recent: VecDeque::with_capacity(KEPT_FRAMES),
            peak: None,
            written_peak: None,
            start_file: None,
            peak_file: None,
            written: 0,
            failed: 0,
        }
    }

    /// Creates the capture side for a new pipeline, keeping the copies of the previous one.
    pub fn new_tap(&mut self) -> Arc<FrameTap> {
        self.collect(None);
        self.tap = Arc::default();
        Arc::clone(&self.tap)
    }

    /// Moves the copies made so far to this side. With `frame` set, waits briefly for the
    /// copy of that frame when it is not there yet.
    pub fn collect(&mut self, frame: Option<u64>) {
        let wait = frame.filter(|f| !self.recent.iter().any(|c| c.frame == *f));
        for copy in self.tap.drain(wait) {
            if self.recent.len() == KEPT_FRAMES {
                self.recent.pop_front();
            }
            self.recent.push_back(copy);
        }
    }

    fn find(&self, frame: u64) -> Option<Arc<CapturedFrame>> {
        self.recent.iter().rev().find(|c| c.frame == frame).cloned()
    }

    /// Records that `frame` is the active event's peak, keeping its copy if there is one.
    pub fn set_peak(&mut self, frame: u64) {
        if self.peak.as_ref().is_some_and(|p| p.frame == frame) {
            return;
        }
        if let Some(copy) = self.find(frame) {
            self.peak = Some(copy);
        }
    }

    /// Writes the snapshots of `event` and fills in its `snapshot` field. Returns the
    /// JPEG to publish, when a new snapshot was written and publishing is on.
    ///
    /// A `start` event writes `<id>-start.jpg` from `frame`, the frame that raised the
    /// alarm, and `<id>-peak.jpg`. An `update` or `end` rewrites the peak file when the
    /// peak frame changed since it was last written.
    pub fn on_event(&mut self, event: &mut AlarmEvent, frame: u64) -> Option<Vec<u8>> {
        let mut published = None;
        if event.kind == EventKind::Start {
            self.peak = None;
            self.written_peak = None;
            self.start_file = None;
            self.peak_file = None;
            self.set_peak(event.peak_frame);
            let name = format!("{}-start.jpg", event.id);
            if let Some(copy) = self.find(frame) {
                let (jpeg, written) = self.write(&copy, &name);
                if written {
                    self.start_file = self.path(&name);
                }
                published = jpeg;
            }
        }
        let peak = self.peak.clone().filter(|p| p.frame == event.peak_frame);
        let name = format!("{}-peak.jpg", event.id);
        if let Some(peak) = peak
            && self.written_peak != Some(peak.frame)
        {
            let (jpeg, written) = self.write(&peak, &name);
            self.written_peak = Some(peak.frame);
            self.peak_file = written.then(|| self.path(&name)).flatten();
            if jpeg.is_some() {
                published = jpeg;
            }
        }
        event.snapshot = self.peak_file.clone().or_else(|| self.start_file.clone());
        if event.kind == EventKind::End {
            self.peak = None;
            self.written_peak = None;
            self.start_file = None;
            self.peak_file = None;
        }
        published.filter(|_| self.config.publish)
    }

    /// Path of the snapshot file `name`, `None` when snapshots are only published.
    fn path(&self, name: &str) -> Option<String> {
        let folder = self.config.folder.as_ref()?;
        Some(Path::new(folder).join(name).to_string_lossy().into_owned())
    }

    /// Encodes `copy` and writes it as `name` into the folder, when one is set. Returns
    /// the JPEG bytes, for publishing even when the file could not be written, and whether
    /// the file was written. Errors are logged and counted.
    fn write(&mut self, copy: &CapturedFrame, name: &str) -> (Option<Vec<u8>>, bool) {
        // The config check keeps the quality within 1 to 100.
        let jpeg = match copy.to_jpeg(self.config.quality.clamp(1, 100) as u8) {
            Ok(jpeg) => jpeg,
            Err(e) => {
                self.failed += 1;
                tracing::warn!(snapshot = name, error = %e, "cannot encode the snapshot");
                return (None, false);
            }
        };
        let Some(folder) = &self.config.folder else {
            return (Some(jpeg), false);
        };
        match write_atomically(&Path::new(folder).join(name), &jpeg) {
            Ok(()) => {
                self.written += 1;
                (Some(jpeg), true)
            }
            Err(e) => {
                self.failed += 1;
                tracing::warn!(snapshot = name, error = %e, "cannot write the snapshot");
                (Some(jpeg), false)
            }
        }
    }
}

/// Writes `bytes` to a temporary file beside `path` and renames it, so that a reader never
/// sees half a JPEG.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let mut temporary = PathBuf::from(path);
    temporary.as_mut_os_string().push(".part");
    std::fs::write(&temporary, bytes)
        .and_then(|()| std::fs::rename(&temporary, path))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(number: u64, value: u8) -> Arc<CapturedFrame> {
        Arc::new(CapturedFrame {
            frame: number,
            width: 4,
            height: 2,
            layout: PixelLayout::Bgrx,
            data: [[value, 0, 255, 0]; 8].concat(),
        })
    }

    #[test]
    fn rgb_follows_the_layout() {
        let copy = frame(0, 7);
        assert_eq!(&copy.to_rgb()[..3], &[255, 0, 7]);
        let jpeg = copy.to_jpeg(90).unwrap();
        assert_eq!(&jpeg[..2], &[0xFF, 0xD8]);
        let decoded = image::load_from_memory(&jpeg).unwrap().to_rgb8();
        assert_eq!(decoded.dimensions(), (4, 2));
        let px = decoded.get_pixel(1, 1).0;
        assert!(px[0] > 200, "{px:?}");
        assert!(px[1] < 40, "{px:?}");
        assert!(px[2] < 40, "{px:?}");
    }

    fn event(kind: EventKind, peak_frame: u64) -> AlarmEvent {
        AlarmEvent {
            kind,
            id: "cam-1-1000-1".into(),
            camera: "cam".into(),
            start_time: 1.0,
            end_time: None,
            peak_score: -0.1,
            peak_normalized_score: 0.9,
            peak_log_score: 3.0,
            peak_time: 1.0,
            peak_frame,
            frames: 3,
            snapshot: None,
        }
    }

    fn snapshots(dir: &Path, publish: bool) -> Snapshots {
        Snapshots::new(SnapshotConfig {
            folder: Some(dir.to_string_lossy().into_owned()),
            quality: 80,
            publish,
        })
    }

    fn give(s: &mut Snapshots, copy: Arc<CapturedFrame>) {
        s.tap.lock().frames.push_back(copy);
        s.collect(None);
    }

    #[test]
    fn peak_file_follows_new_peaks() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = snapshots(dir.path(), true);
        give(&mut s, frame(3, 10));
        give(&mut s, frame(4, 20));
        give(&mut s, frame(5, 30));

        let mut start = event(EventKind::Start, 4);
        let published = s.on_event(&mut start, 5).expect("published");
        let start_file = dir.path().join("cam-1-1000-1-start.jpg");
        let peak_file = dir.path().join("cam-1-1000-1-peak.jpg");
        assert!(start_file.is_file());
        assert!(peak_file.is_file());
        assert_eq!(std::fs::read(&peak_file).unwrap(), published);
        assert_eq!(
            start.snapshot.as_deref(),
            Some(&*peak_file.to_string_lossy())
        );
        assert_eq!(s.written, 2);

        // Same peak: nothing new to write or publish.
        let mut update = event(EventKind::Update, 4);
        assert!(s.on_event(&mut update, 6).is_none());
        assert_eq!(s.written, 2);

        // A later peak rewrites the peak file.
        give(&mut s, frame(9, 90));
        s.set_peak(9);
        let mut update = event(EventKind::Update, 9);
        let published = s.on_event(&mut update, 9).expect("new peak published");
        assert_eq!(std::fs::read(&peak_file).unwrap(), published);
        assert_eq!(s.written, 3);

        let mut end = event(EventKind::End, 9);
        assert!(s.on_event(&mut end, 12).is_none());
        assert_eq!(end.snapshot.as_deref(), Some(&*peak_file.to_string_lossy()));
        assert!(!dir.path().join("cam-1-1000-1-peak.jpg.part").exists());
    }

    #[test]
    fn missing_copies_give_no_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = snapshots(dir.path(), true);
        let mut start = event(EventKind::Start, 4);
        assert!(s.on_event(&mut start, 5).is_none());
        assert_eq!(start.snapshot, None);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn only_the_newest_copies_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = snapshots(dir.path(), false);
        for n in 0..(KEPT_FRAMES as u64 + 3) {
            give(&mut s, frame(n, n as u8));
        }
        assert!(s.find(2).is_none());
        assert!(s.find(3).is_some());
        let mut start = event(EventKind::Start, 1);
        // Publishing is off, but the start file is still written. The old peak is gone.
        assert!(s.on_event(&mut start, 10).is_none());
        assert!(dir.path().join("cam-1-1000-1-start.jpg").is_file());
        assert!(!dir.path().join("cam-1-1000-1-peak.jpg").exists());
    }

    #[test]
    fn unwritable_folder_still_publishes() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = snapshots(&dir.path().join("missing"), true);
        give(&mut s, frame(5, 1));
        let mut start = event(EventKind::Start, 5);
        let published = s
            .on_event(&mut start, 5)
            .expect("published without the file");
        assert_eq!(&published[..2], &[0xFF, 0xD8]);
        assert_eq!((s.written, s.failed), (0, 2));
        assert_eq!(start.snapshot, None);
    }
}
