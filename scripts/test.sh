#!/usr/bin/env bash
# SPDX-License-Identifier: MIT OR Apache-2.0
# Sets up the machine (scripts/setup.sh) and runs every check: formatting, clippy and
# all tests of the workspace, including the GStreamer pipelines and the tests against
# a real mosquitto broker, which the tests start themselves on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

# A fresh plugin registry, so that no stale cache hides or blacklists the plugin.
registry_dir=$(mktemp -d)
trap 'rm -rf "$registry_dir"' EXIT
export GST_REGISTRY="$registry_dir/registry.bin"
export GST_PLUGIN_PATH="$PWD/target/release${GST_PLUGIN_PATH:+:$GST_PLUGIN_PATH}"

echo "cargo fmt --check"
cargo fmt --all -- --check
echo "cargo clippy"
# The release profile reuses the build scripts and proc macros of the release build.
cargo clippy --release --workspace --all-targets --locked -- -D warnings
echo "cargo test (release)"
cargo test --workspace --release --locked
