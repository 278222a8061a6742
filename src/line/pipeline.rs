// SPDX-License-Identifier: MIT OR Apache-2.0
//! The GStreamer pipeline of one camera, in `gst-launch-1.0` syntax.

use std::path::{Path, PathBuf};

use super::config::{CameraConfig, SinkConfig, SourceConfig};

/// Name of the scoring element inside every camera pipeline.
pub const SCORER_NAME: &str = "scorer";

/// Caps and decoder for image files, chosen by extension.
pub(crate) fn image_decoder(location: &str) -> Option<(&'static str, &'static str)> {
    let ext = Path::new(location)
        .extension()?
        .to_str()?
        .to_ascii_lowercase();
    match ext.as_str() {
        "png" => Some(("image/png", "pngdec")),
        "jpg" | "jpeg" => Some(("image/jpeg", "jpegdec")),
        _ => None,
    }
}

/// Quotes a value for the gst-launch syntax.
pub(crate) fn quote(value: &str) -> String {
    format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Whether an images location is a numbered pattern that `multifilesrc` reads as written.
fn is_numbered_pattern(location: &str) -> bool {
    location.contains('%')
}

/// Matches a file name against a glob with `*` (any run of characters) and `?` (one
/// character).
fn glob_match(pattern: &[char], name: &[char]) -> bool {
    match (pattern.first(), name.first()) {
        (None, None) => true,
        (Some('*'), _) => {
            glob_match(&pattern[1..], name) || (!name.is_empty() && glob_match(pattern, &name[1..]))
        }
        (Some('?'), Some(_)) => glob_match(&pattern[1..], &name[1..]),
        (Some(p), Some(n)) if p == n => glob_match(&pattern[1..], &name[1..]),
        _ => false,
    }
}

/// Lists the images of a folder or of a glob in the file name, sorted by name.
pub fn list_images(location: &str) -> Result<Vec<PathBuf>, String> {
    let path = Path::new(location);
    let (folder, pattern) = if path.is_dir() {
        (path.to_path_buf(), None)
    } else {
        let folder = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().chars().collect::<Vec<_>>());
        (folder, name)
    };
    let entries = std::fs::read_dir(&folder)
        .map_err(|e| format!("cannot list images in {}: {e}", folder.display()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|file| file.is_file())
        .filter(|file| image_decoder(&file.to_string_lossy()).is_some())
        .filter(|file| match (&pattern, file.file_name()) {
            (Some(pattern), Some(name)) => {
                let name: Vec<char> = name.to_string_lossy().chars().collect();
                glob_match(pattern, &name)
            }
            (None, _) => true,
            _ => false,
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(format!("no .png, .jpg or .jpeg images match {location}"));
    }
    let first = image_decoder(&files[0].to_string_lossy());
    if let Some(other) = files
        .iter()
        .find(|file| image_decoder(&file.to_string_lossy()) != first)
    {
        return Err(format!(
            "{location} mixes image formats ({} and {}): use one format per source",
            files[0].display(),
            other.display()
        ));
    }
    Ok(files)
}

/// Numbered links to the images of a folder or glob, for `multifilesrc`. The folder is
/// removed when this is dropped.
#[derive(Debug)]
pub struct StagedImages {
    pub folder: PathBuf,
    /// `FOLDER/%06d.EXT`.
    pub pattern: String,
}

impl StagedImages {
    /// Links the images of `location` as `000000.ext`, `000001.ext`, ... in a new folder.
    pub fn create(location: &str, camera: &str) -> Result<Self, String> {
        let files = list_images(location)?;
        let ext = files[0]
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        let folder = std::env::temp_dir().join(format!(
            "patchflow-{}-{}",
            std::process::id(),
            camera.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
        ));
        if folder.exists() {
            std::fs::remove_dir_all(&folder)
                .map_err(|e| format!("cannot clear {}: {e}", folder.display()))?;
        }
        std::fs::create_dir_all(&folder)
            .map_err(|e| format!("cannot create {}: {e}", folder.display()))?;
        let staged = Self {
            pattern: folder
                .join(format!("%06d.{ext}"))
                .to_string_lossy()
                .into_owned(),
            folder,
        };
        for (i, file) in files.iter().enumerate() {
            let absolute = file
                .canonicalize()
                .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            let link = staged.folder.join(format!("{i:06}.{ext}"));
            std::os::unix::fs::symlink(&absolute, &link)
                .map_err(|e| format!("cannot link {}: {e}", link.display()))?;
        }
        Ok(staged)
    }
}

impl Drop for StagedImages {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.folder) {
            tracing::warn!(folder = %self.folder.display(), error = %e, "cannot remove staged image links");
        }
    }
}

/// Builds the pipeline description of a camera. An images source given as a folder or
/// glob reads the numbered links in `staged`.
pub fn description(camera: &CameraConfig, staged: Option<&StagedImages>) -> String {
    let source = match &camera.source {
        SourceConfig::Images {
            location,
            framerate,
            repeat,
        } => {
            let pattern = match staged {
                Some(staged) if !is_numbered_pattern(location) => staged.pattern.as_str(),
                _ => location.as_str(),
            };
            let (caps, decoder) = image_decoder(pattern).unwrap_or(("image/png", "pngdec"));
            format!(
                "multifilesrc location={} index=0 loop={repeat} caps=\"{caps},framerate=(fraction){framerate}/1\" ! {decoder}",
                quote(pattern)
            )
        }
        SourceConfig::Uri { uri } => format!("uridecodebin uri={}", quote(uri)),
        SourceConfig::V4l2 { device } => format!("v4l2src device={}", quote(device)),
        SourceConfig::Test {
            num_buffers,
            width,
            height,
            framerate,
            pattern,
            is_live,
        } => {
            let pattern = pattern
                .as_ref()
                .map(|p| format!(" pattern={}", quote(p)))
                .unwrap_or_default();
            format!(
                "videotestsrc num-buffers={num_buffers}{pattern} is-live={is_live} ! video/x-raw,width={width},height={height},framerate={framerate}/1"
            )
        }
    };
    let s = &camera.scoring;
    let scorer = format!(
        "patchflowscore name={SCORER_NAME} model={} device={}{} threshold-domain={} overlay={} alpha={} colormap={} scoring-mode={} scoring-interval={}",
        quote(&camera.model.path),
        quote(&camera.model.device),
        s.threshold
            .map(|t| format!(" threshold={t}"))
            .unwrap_or_default(),
        s.threshold_domain,
        s.overlay,
        s.alpha,
        s.colormap,
        s.mode,
        s.interval
    );
    let sink = match &camera.sink {
        SinkConfig::None => "fakesink sync=false".to_string(),
        SinkConfig::Display => "autovideosink".to_string(),
        SinkConfig::File { location } if location.ends_with(".mkv") => {
            format!(
                "jpegenc ! matroskamux ! filesink location={}",
                quote(location)
            )
        }
        SinkConfig::File { location } => {
            format!("jpegenc ! avimux ! filesink location={}", quote(location))
        }
        SinkConfig::Frames { folder } => {
            let pattern = Path::new(folder).join("frame-%05d.png");
            format!(
                "pngenc ! multifilesink location={}",
                quote(&pattern.to_string_lossy())
            )
        }
    };
    format!("{source} ! videoconvert ! {scorer} ! videoconvert ! {sink}")
}

/// Whether the camera's images need staging: a folder or a glob.
pub fn needs_staging(camera: &CameraConfig) -> Option<&str> {
    match &camera.source {
        SourceConfig::Images { location, .. } if !is_numbered_pattern(location) => {
            Some(location.as_str())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::{ModelSection, RestartConfig, ScoringConfig, SnapshotConfig};
    use super::*;
    use crate::alarm::AlarmConfig;

    #[test]
    fn quoting_escapes() {
        assert_eq!(quote(r#"a "b"\c"#), r#""a \"b\"\\c""#);
    }

    #[test]
    fn glob_matches_file_names() {
        let matches = |pattern: &str, name: &str| {
            let pattern: Vec<char> = pattern.chars().collect();
            let name: Vec<char> = name.chars().collect();
            glob_match(&pattern, &name)
        };
        assert!(matches("*.png", "a.png"));
        assert!(matches("cell-??.png", "cell-07.png"));
        assert!(!matches("cell-??.png", "cell-7.png"));
        assert!(!matches("*.png", "a.jpg"));
        assert!(matches("a*b*c", "aXXbYc"));
    }

    fn test_camera(source: &str, scoring: &str) -> CameraConfig {
        let source: SourceConfig = toml::from_str(source).unwrap();
        let scoring: ScoringConfig = toml::from_str(scoring).unwrap();
        CameraConfig {
            line: "line".into(),
            name: "cam".into(),
            source,
            model: ModelSection {
                path: "/models/m.safetensors".into(),
                device: "cpu".into(),
            },
            scoring,
            alarm: AlarmConfig::default(),
            sink: SinkConfig::None,
            restart: RestartConfig::default(),
            snapshot: SnapshotConfig::default(),
        }
    }

    #[test]
    fn description_sets_scoring_mode() {
        let default = description(&test_camera("kind = \"test\"", ""), None);
        assert!(
            default.contains(" scoring-mode=interval scoring-interval=1"),
            "{default}"
        );
        let newest = description(&test_camera("kind = \"test\"", "mode = \"newest\""), None);
        assert!(newest.contains(" scoring-mode=newest "), "{newest}");
    }

    #[test]
    fn description_sets_live_test_source() {
        let default = description(&test_camera("kind = \"test\"", ""), None);
        assert!(
            default.contains("videotestsrc num-buffers=100 is-live=false "),
            "{default}"
        );
        let live = description(&test_camera("kind = \"test\"\nis_live = true", ""), None);
        assert!(live.contains(" is-live=true "), "{live}");
    }

    #[test]
    fn staging_links_sorted_images() {
        let dir = std::env::temp_dir().join(format!("patchflow-stage-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for name in ["b.png", "a.png", "c.jpg", "notes.txt"] {
            std::fs::write(dir.join(name), b"x").unwrap();
        }
        let glob = dir.join("*.png");
        let staged = StagedImages::create(&glob.to_string_lossy(), "cam/1").unwrap();
        let first = std::fs::read_link(staged.folder.join("000000.png")).unwrap();
        assert_eq!(first.file_name().unwrap(), "a.png");
        assert!(staged.folder.join("000001.png").exists());
        assert!(!staged.folder.join("000002.png").exists());
        let err = list_images(&dir.to_string_lossy()).unwrap_err();
        assert!(err.contains("mixes image formats"), "{err}");
        let folder = staged.folder.clone();
        drop(staged);
        assert!(!folder.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
