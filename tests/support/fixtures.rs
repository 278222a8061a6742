// SPDX-License-Identifier: MIT OR Apache-2.0
//! Shared test inputs: the converted backbone weights and the committed images.

use std::path::{Path, PathBuf};

/// Returns the EfficientNet-Lite0 weights that `scripts/setup.sh` converts, or
/// `$PATCHFLOW_BACKBONE`.
pub fn backbone_path() -> PathBuf {
    let path = std::env::var_os("PATCHFLOW_BACKBONE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_path("data/weights/tf_efficientnet_lite0.safetensors"));
    assert!(
        path.is_file(),
        "backbone weights {} not found: run scripts/setup.sh (or set PATCHFLOW_BACKBONE)",
        path.display()
    );
    path
}

/// A path relative to the repository root: the nearest folder above this crate's
/// manifest that contains the workspace's `Cargo.lock`, so that the plugin crate's tests
/// can include this file too.
pub fn repo_path(relative: &str) -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = manifest
        .ancestors()
        .find(|dir| dir.join("Cargo.lock").is_file())
        .unwrap_or(manifest);
    root.join(relative)
}

/// Returns the path of an image committed under `tests/data`.
pub fn image(name: &str) -> PathBuf {
    repo_path(&format!("tests/data/{name}"))
}
